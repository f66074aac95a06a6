//! Accounting under chaos: a few hundred concurrent requests over HTTP and gRPC mixing every
//! outcome the tests can cause (success, invalid_request, auth_rejected, rate_limited,
//! budget_exceeded, model_not_found, upstream_error, upstream_timeout, a non-streaming HTTP client that hangs
//! up, a gRPC deadline, a gRPC cancel). The availability counter grows by exactly the number of
//! requests, reason by reason and protocol by protocol, and every request has exactly one
//! ledger row with the reason it was counted under.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::{json, Value};

use crate::common::*;

const BOB_KEY: &str = "tg-test-bob";
const ADMIN: &str = "tg-admin-chaos";

/// One kind of request: protocol, what it sends, the reason it must be counted under.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    Ok,
    Invalid,
    WrongKey,
    RateLimited,
    /// Bob, whose budget (one micro-dollar) no priced request fits in.
    OverBudget,
    NoSuchModel,
    UpstreamFails,
    UpstreamStalls,
    /// HTTP: the client hangs up before the (stalled) answer. gRPC: a deadline.
    HangUp,
    /// gRPC only: the call is dropped (RST_STREAM CANCEL).
    Cancel,
}

/// (kind, HTTP count, gRPC count)
const MIX: &[(Kind, usize, usize)] = &[
    (Kind::Ok, 60, 60),
    (Kind::Invalid, 25, 25),
    (Kind::WrongKey, 20, 20),
    (Kind::RateLimited, 20, 20),
    (Kind::OverBudget, 15, 15),
    (Kind::NoSuchModel, 10, 10),
    (Kind::UpstreamFails, 20, 20),
    (Kind::UpstreamStalls, 8, 8),
    (Kind::HangUp, 10, 10),
    (Kind::Cancel, 0, 10),
];

/// The reason of a finished HTTP response ("success" for a 2xx).
async fn http_reason(resp: reqwest::Response) -> String {
    if resp.status().is_success() {
        let _ = resp.bytes().await;
        return "success".into();
    }
    let v: Value = resp.json().await.unwrap_or(Value::Null);
    v["error"]["code"].as_str().unwrap_or("?").to_owned()
}

/// Sends one request; returns the reason the caller saw (`None`: the caller went away).
async fn http_one(s: &TestServer, kind: Kind, rid: &str) -> Option<String> {
    let (model, key, service_type) = match kind {
        Kind::Ok | Kind::Invalid => ("fast", ALICE_KEY, "default"),
        Kind::WrongKey => ("fast", "tg-not-a-key", "default"),
        Kind::RateLimited => ("fast", ALICE_KEY, "rpm3"),
        Kind::OverBudget => ("fast", BOB_KEY, "default"),
        Kind::NoSuchModel => ("no-such-model", ALICE_KEY, "default"),
        Kind::UpstreamFails => ("broken", ALICE_KEY, "default"),
        Kind::UpstreamStalls | Kind::HangUp | Kind::Cancel => ("slow", ALICE_KEY, "default"),
    };
    let body = if kind == Kind::Invalid {
        json!({"model": model, "messages": 5})
    } else {
        chat_body(model, rid)
    };
    let mut req = s
        .client
        .post(s.url("/v1/chat/completions"))
        .bearer_auth(key)
        .header("x-request-id", rid)
        .header("x-tollgate-service-type", service_type)
        .json(&body);
    if kind == Kind::HangUp {
        // Long enough for the request to reach the gateway on a loaded machine (a hang-up
        // before that is no request at all), and shorter than the stall's first-byte timeout
        // (1.5 s from when the gateway calls upstream), so the hang-up always comes first.
        req = req.timeout(Duration::from_millis(1000));
        let r = req.send().await;
        assert!(
            r.is_err(),
            "the hung-up request must not have been answered"
        );
        return None;
    }
    Some(http_reason(req.send().await.expect("HTTP request")).await)
}

async fn grpc_one(s: &TestServer, kind: Kind, rid: &str) -> Option<String> {
    let (model, key, service_type) = match kind {
        Kind::Ok | Kind::Invalid => ("fast", ALICE_KEY, "default"),
        Kind::WrongKey => ("fast", "tg-not-a-key", "default"),
        Kind::RateLimited => ("fast", ALICE_KEY, "rpm3"),
        Kind::OverBudget => ("fast", BOB_KEY, "default"),
        Kind::NoSuchModel => ("no-such-model", ALICE_KEY, "default"),
        Kind::UpstreamFails => ("broken", ALICE_KEY, "default"),
        Kind::UpstreamStalls | Kind::HangUp | Kind::Cancel => ("slow", ALICE_KEY, "default"),
    };
    let mut msg = complete_request(model, rid);
    if kind == Kind::Invalid {
        msg.messages.clear();
    }
    let mut req = grpc_request(msg, Some(key), Some(rid));
    req.metadata_mut()
        .insert("x-tollgate-service-type", service_type.parse().unwrap());
    let mut client = s.grpc().await;
    match kind {
        Kind::HangUp => {
            req.set_timeout(Duration::from_millis(300));
            let code = client
                .complete(req)
                .await
                .expect_err("past its deadline")
                .code();
            // tonic's client ends the call itself when the deadline passes (CANCELLED), or the
            // server does (DEADLINE_EXCEEDED), whichever is first.
            assert!(
                matches!(code, tonic::Code::Cancelled | tonic::Code::DeadlineExceeded),
                "{code:?}"
            );
            None
        }
        Kind::Cancel => {
            let r = tokio::time::timeout(Duration::from_millis(300), client.complete(req)).await;
            assert!(r.is_err(), "the cancelled call must not have been answered");
            None
        }
        _ => Some(match client.complete(req).await {
            Ok(_) => "success".into(),
            Err(status) => grpc_reason(&status),
        }),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_request_is_counted_once_under_its_reason_on_sqlite() {
    counted_once(Backend::Sqlite).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_request_is_counted_once_under_its_reason_on_postgres() {
    counted_once(Backend::Postgres).await
}

async fn counted_once(backend: Backend) {
    let Some(mut s) = TestServer::start(
        backend,
        Opts {
            extra:
                "[routing]\n# `broken` and `slow` share `up` with `fast`: keep it in rotation.\n\
                unhealthy_after_failures = 1000000\n\n\
                [service_types.rpm3]\nmodels = [\"*\"]\nrate_limits = { rpm = 3 }\n\n\
                [[auth.static_keys]]\nuser = \"bob\"\nkey = \"tg-test-bob\"\n"
                    .into(),
            server: format!("admin_token = \"{ADMIN}\""),
            ..Opts::default()
        },
    )
    .await
    else {
        return;
    };
    let bob = s
        .store()
        .await
        .find_user("bob")
        .await
        .unwrap()
        .expect("bob exists")
        .id;
    let resp = s
        .client
        .put(s.url("/admin/budgets"))
        .bearer_auth(ADMIN)
        .json(&json!({"scope": "user", "id": bob, "limit_usd": 0.000001, "period": "total"}))
        .send()
        .await
        .unwrap();
    assert_eq!(
        resp.status(),
        200,
        "{}",
        resp.text().await.unwrap_or_default()
    );
    let before = s.metrics().await;

    // Interleave the kinds, so that every kind runs alongside every other.
    let mut plan: Vec<(&str, Kind)> = Vec::new();
    let most = MIX.iter().map(|m| m.1.max(m.2)).max().unwrap();
    for i in 0..most {
        for &(kind, h, g) in MIX {
            if i < h {
                plan.push(("http", kind));
            }
            if i < g {
                plan.push(("grpc", kind));
            }
        }
    }
    let total = plan.len();
    let runs = plan.iter().map(|&(protocol, kind)| {
        let s = &s;
        async move {
            let rid = new_request_id();
            let seen = if protocol == "http" {
                http_one(s, kind, &rid).await
            } else {
                grpc_one(s, kind, &rid).await
            };
            (protocol, kind, rid, seen)
        }
    });
    let results = futures_util::future::join_all(runs).await;

    // What each caller saw must be the reason its kind stands for.
    let mut expected: BTreeMap<(&str, String), usize> = BTreeMap::new();
    for (protocol, kind, _, seen) in &results {
        let reason = match (kind, seen) {
            (Kind::RateLimited, Some(r)) if r == "success" => "success",
            (Kind::RateLimited, _) => "rate_limited",
            (Kind::Ok, _) => "success",
            (Kind::Invalid, _) => "invalid_request",
            (Kind::WrongKey, _) => "auth_rejected",
            (Kind::OverBudget, _) => "budget_exceeded",
            (Kind::NoSuchModel, _) => "model_not_found",
            (Kind::UpstreamFails, _) => "upstream_error",
            (Kind::UpstreamStalls, _) => "upstream_timeout",
            (Kind::HangUp | Kind::Cancel, _) => "client_disconnected",
        };
        if let Some(seen) = seen {
            assert_eq!(seen, reason, "{protocol} {kind:?}");
        }
        *expected.entry((protocol, reason.to_string())).or_default() += 1;
    }
    let limited_ok = results
        .iter()
        .filter(|r| r.1 == Kind::RateLimited && r.3.as_deref() == Some("success"))
        .count();
    assert_eq!(limited_ok, 3, "rpm = 3 lets exactly three through");

    for ((protocol, reason), n) in &expected {
        s.expect_delta(
            &before,
            AVAILABILITY,
            &[("protocol", protocol), ("reason", reason)],
            *n as f64,
        )
        .await;
    }
    s.assert_delta_now(&before, AVAILABILITY, &[], total as f64)
        .await;

    // One ledger row per request, under the reason it was counted as.
    let mut rows: BTreeMap<(&str, String), usize> = BTreeMap::new();
    for (protocol, kind, rid, _) in &results {
        let row = s.ledger_row(rid).await;
        assert_eq!(row.protocol, *protocol, "{kind:?}");
        *rows.entry((protocol, row.reason.clone())).or_default() += 1;
    }
    assert_eq!(rows, expected, "ledger rows by protocol and reason");
    eprintln!("chaos: {total} concurrent requests, by protocol and reason: {expected:?}");
    s.shutdown().await;
}
