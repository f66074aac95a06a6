//! Accounting under chaos: a few hundred concurrent requests over HTTP and gRPC mixing every
//! outcome the tests can cause (success, invalid_request, auth_rejected, rate_limited,
//! budget_exceeded, model_not_found, upstream_error, upstream_timeout, a non-streaming HTTP client that hangs
//! up, a gRPC deadline, a gRPC cancel, and internal_error: streams held open through the whole
//! mix and cut by the shutdown at the end of its grace period). The availability counter grows
//! by exactly the number of requests, reason by reason and protocol by protocol, and every
//! request has exactly one ledger row with the reason it was counted under.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::sync::oneshot;
use tollgate::proto::gateway_client::GatewayClient;

use crate::common::upstream::UPSTREAM_KEY;
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

/// Streams held open (HTTP, gRPC): the upstream sends a first chunk, then nothing until the
/// server's shutdown cuts them at the end of its grace period, as `internal_error`. The only
/// way the gateway itself fails a request: the other `internal_error` paths are invariant
/// checks (a non-stream call answered as a stream, a budget reservation still racing after
/// every retry) that no input reaches.
const HELD: (usize, usize) = (8, 8);

/// `gated` on a provider of its own whose idle timeout outlasts the mix: the stream stays open
/// (the test never opens the gate) until the cut.
const HELD_MODEL: &str = "held/gated";

/// Starts one held HTTP stream; `first` fires once its first chunk arrived. Returns the error
/// code of the event that ended it.
async fn http_held(
    client: reqwest::Client,
    url: String,
    rid: String,
    first: oneshot::Sender<()>,
) -> String {
    let mut body = chat_body(HELD_MODEL, &rid);
    body["stream"] = json!(true);
    let resp = client
        .post(url)
        .bearer_auth(ALICE_KEY)
        .header("x-request-id", &rid)
        .json(&body)
        .send()
        .await
        .expect("held HTTP stream");
    assert_eq!(resp.status(), 200, "held HTTP stream");
    let mut sse = SseReader::new(resp);
    let head = sse.next().await;
    assert!(matches!(head, SseEvent::Data(_)), "first chunk: {head:?}");
    let _ = first.send(());
    let (events, end) = sse.collect().await;
    assert_eq!(
        end,
        SseEvent::End,
        "the gateway ends the body after the error event"
    );
    assert!(
        !events.iter().any(|e| e == "[DONE]"),
        "no [DONE] after a cut: {events:?}"
    );
    let last: Value = serde_json::from_str(events.last().expect("an error event")).unwrap();
    let message = last.pointer("/error/message").and_then(Value::as_str);
    assert!(
        message.is_some_and(|m| m.contains("outlived the shutdown grace period and was ended")),
        "the error event says why: {last}"
    );
    last.pointer("/error/code")
        .and_then(Value::as_str)
        .unwrap_or("?")
        .to_owned()
}

/// Starts one held gRPC `StreamComplete`; returns the reason of the status that ended it.
async fn grpc_held(addr: std::net::SocketAddr, rid: String, first: oneshot::Sender<()>) -> String {
    let mut client = GatewayClient::connect(format!("http://{addr}"))
        .await
        .expect("gRPC connect");
    let mut stream = client
        .stream_complete(grpc_request(
            complete_request(HELD_MODEL, &rid),
            Some(ALICE_KEY),
            Some(&rid),
        ))
        .await
        .expect("held StreamComplete starts")
        .into_inner();
    let chunk = stream.message().await.expect("first chunk");
    assert!(chunk.is_some(), "first chunk");
    let _ = first.send(());
    loop {
        match stream.message().await {
            Ok(Some(_)) => {}
            Ok(None) => panic!("held gRPC stream ended without a status"),
            Err(status) => {
                assert_eq!(status.code(), tonic::Code::Internal, "{status:?}");
                return grpc_reason(&status);
            }
        }
    }
}

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
        // Long enough for the request to be wholly handed over on a loaded machine (at 300 ms
        // some clients left before the server had their body, and were counted only when the
        // client's connection finally closed, ~30 s later), and shorter than the stall's
        // first-byte timeout (1.5 s from when the gateway calls upstream).
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
            extra_upstream: format!(
                "[providers.held]\nkind = \"openai\"\nbase_url = \"{{upstream}}\"\n\
                 keys = [\"{UPSTREAM_KEY}\"]\nidle_timeout_ms = 120000\n"
            ),
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
    let registry = s.metrics_registry();

    // The held streams first: each has its first chunk before the mix starts, and is still open
    // when the mix ends.
    let mut held = Vec::new();
    let mut firsts = Vec::new();
    for (protocol, n) in [("http", HELD.0), ("grpc", HELD.1)] {
        for _ in 0..n {
            let rid = new_request_id();
            let (tx, rx) = oneshot::channel();
            firsts.push(rx);
            let task = if protocol == "http" {
                tokio::spawn(http_held(
                    http_client(),
                    s.url("/v1/chat/completions"),
                    rid.clone(),
                    tx,
                ))
            } else {
                tokio::spawn(grpc_held(s.grpc_addr, rid.clone(), tx))
            };
            held.push((protocol, rid, task));
        }
    }
    for rx in firsts {
        rx.await.expect("a held stream got its first chunk");
    }

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

    // Every request of the mix counted (the held streams are still open), then each series.
    let start = metric_value(&before, AVAILABILITY, &[]);
    // (On a timeout the last scrape is compared below, to show what is missing.)
    let waiting = std::time::Instant::now();
    let counted = loop {
        let now = s.metrics().await;
        if metric_value(&now, AVAILABILITY, &[]) - start >= total as f64
            || waiting.elapsed() > DEADLINE
        {
            break now;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let mut seen: BTreeMap<(&str, String), usize> = BTreeMap::new();
    for smp in parse_metrics(&counted) {
        let label = |k: &str| {
            smp.labels
                .iter()
                .find(|(lk, _)| lk == k)
                .map(|(_, v)| v.clone())
        };
        let (Some(p), Some(reason)) = (label("protocol"), label("reason")) else {
            continue;
        };
        let protocol = if p == "http" { "http" } else { "grpc" };
        if smp.name != AVAILABILITY || seen.contains_key(&(protocol, reason.clone())) {
            continue;
        }
        let series = [("protocol", p.as_str()), ("reason", reason.as_str())];
        let d = metric_value(&counted, AVAILABILITY, &series)
            - metric_value(&before, AVAILABILITY, &series);
        if d != 0.0 {
            seen.insert((protocol, reason), d as usize);
        }
    }
    assert_eq!(
        seen,
        expected,
        "the counter's increase by protocol and reason\n{}",
        series_dump(&counted, AVAILABILITY)
    );
    assert_eq!(
        metric_value(&counted, AVAILABILITY, &[]) - start,
        total as f64,
        "the counter grew by the number of requests"
    );

    // One ledger row per request, under the reason it was counted as.
    let mut rows: BTreeMap<(&str, String), usize> = BTreeMap::new();
    for (protocol, kind, rid, _) in &results {
        let row = s.ledger_row(rid).await;
        assert_eq!(row.protocol, *protocol, "{kind:?}");
        *rows.entry((protocol, row.reason.clone())).or_default() += 1;
    }
    assert_eq!(rows, expected, "ledger rows by protocol and reason");

    // The shutdown cuts the held streams (still open: none counted above) at the end of its
    // grace period; each is counted then, and its row flushed before the server stops.
    s.shutdown().await;
    let after = registry.encode();
    let held_total = HELD.0 + HELD.1;
    for (protocol, n) in [("http", HELD.0), ("grpc", HELD.1)] {
        let labels = [
            ("protocol", protocol),
            ("outcome", "failure"),
            ("reason", "internal_error"),
        ];
        let d = metric_value(&after, AVAILABILITY, &labels)
            - metric_value(&before, AVAILABILITY, &labels);
        assert_eq!(
            d,
            n as f64,
            "{protocol} internal_error\n{}",
            series_dump(&after, AVAILABILITY)
        );
        expected.insert((protocol, "internal_error".into()), n);
    }
    let d = metric_value(&after, AVAILABILITY, &[]) - metric_value(&before, AVAILABILITY, &[]);
    assert_eq!(
        d,
        (total + held_total) as f64,
        "every request counted once\n{}",
        series_dump(&after, AVAILABILITY)
    );
    for (protocol, rid, task) in held {
        let seen = task.await.expect("held stream task");
        assert_eq!(seen, "internal_error", "{protocol} held stream {rid}");
        let row = s.ledger_row(&rid).await;
        assert_eq!(
            (row.protocol.as_str(), row.reason.as_str(), row.stream),
            (protocol, "internal_error", true),
            "{row:?}"
        );
    }
    eprintln!(
        "chaos: {} concurrent requests, by protocol and reason: {expected:?}",
        total + held_total
    );
}
