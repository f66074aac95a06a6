//! Issue 3, "Who may call": credentials by shape (API keys, OIDC JWTs against a real JWKS
//! server, RFC 7662 introspection against a real introspection server), every auth, provisioning
//! and policy reason on both protocols (status / code, error body, ledger row, exactly one
//! availability increment), race-free provisioning, the signup caps across two replicas,
//! blocking through the admin APIs, service types and purposes, request limits, Authorize, and
//! secrets kept out of the process log.
//!
//! Verifiers are real HTTP servers on random ports (`common::auth_servers`): healthy, down (a
//! closed port), slow (longer than `timeout_ms`), answering 500, answering garbage.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::common::auth_servers::*;
use crate::common::*;
use futures_util::future::join_all;
use serde_json::{json, Value};
use tollgate::clock::Clock;
use tollgate::proto::{AuthorizeRequest, CompleteRequest, CompleteResponse};
use tollgate::store::LedgerRow;
use tonic::Code;

const ADMIN_TOKEN: &str = "tg-admin-auth-test-5b1e0c77";
const AUTH_LATENCY: &str = "tollgate_auth_latency_seconds_count";
const SIGNUPS: &str = "tollgate_signups_total";
const AUTHORIZE: &str = "tollgate_authorize_total";

// =============================================================================================
// callers

/// What a caller sends besides the body: the raw `authorization` value, service type, purpose.
#[derive(Clone, Default, Debug)]
struct Creds {
    authorization: Option<String>,
    service_type: Option<String>,
    purpose: Option<String>,
}

impl Creds {
    fn none() -> Creds {
        Creds::default()
    }
    fn bearer(token: &str) -> Creds {
        Creds::raw(&format!("Bearer {token}"))
    }
    fn raw(value: &str) -> Creds {
        Creds {
            authorization: Some(value.to_owned()),
            ..Creds::default()
        }
    }
    fn st(mut self, service_type: &str) -> Creds {
        self.service_type = Some(service_type.to_owned());
        self
    }
    fn purpose(mut self, purpose: &str) -> Creds {
        self.purpose = Some(purpose.to_owned());
        self
    }
}

fn with_creds(
    mut rb: reqwest::RequestBuilder,
    c: &Creds,
    rid: Option<&str>,
) -> reqwest::RequestBuilder {
    if let Some(a) = &c.authorization {
        rb = rb.header("authorization", a);
    }
    if let Some(st) = &c.service_type {
        rb = rb.header("x-tollgate-service-type", st);
    }
    if let Some(p) = &c.purpose {
        rb = rb.header("x-tollgate-purpose", p);
    }
    if let Some(id) = rid {
        rb = rb.header("x-request-id", id);
    }
    rb
}

fn grpc_req<T>(msg: T, c: &Creds, rid: Option<&str>) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    let md = req.metadata_mut();
    if let Some(a) = &c.authorization {
        md.insert("authorization", a.parse().expect("metadata value"));
    }
    if let Some(st) = &c.service_type {
        md.insert("x-tollgate-service-type", st.parse().unwrap());
    }
    if let Some(p) = &c.purpose {
        md.insert("x-tollgate-purpose", p.parse().unwrap());
    }
    if let Some(id) = rid {
        md.insert("x-request-id", id.parse().unwrap());
    }
    req
}

async fn http_chat_on(
    client: &reqwest::Client,
    base: SocketAddr,
    c: &Creds,
    model: &str,
    rid: &str,
) -> reqwest::Response {
    with_creds(
        client
            .post(format!("http://{base}/v1/chat/completions"))
            .json(&chat_body(model, rid)),
        c,
        Some(rid),
    )
    .send()
    .await
    .expect("HTTP chat request")
}

async fn http_chat(s: &TestServer, c: &Creds, model: &str, rid: &str) -> reqwest::Response {
    http_chat_on(&s.client, s.http, c, model, rid).await
}

async fn grpc_chat(
    s: &TestServer,
    c: &Creds,
    model: &str,
    rid: &str,
) -> Result<tonic::Response<CompleteResponse>, tonic::Status> {
    s.grpc()
        .await
        .complete(grpc_req(complete_request(model, rid), c, Some(rid)))
        .await
}

/// The `param` of a gRPC error (from the ErrorInfo metadata).
fn grpc_param(status: &tonic::Status) -> Option<String> {
    use tonic_types::StatusExt;
    status
        .get_error_details()
        .error_info()
        .and_then(|i| i.metadata.get("param").cloned())
}

// =============================================================================================
// expectations

/// One row of the reason table (DESIGN section 3).
#[derive(Clone, Copy, Debug)]
struct Want {
    reason: &'static str,
    http: u16,
    grpc: Code,
    outcome: &'static str,
}

const AUTH_REJECTED: Want = Want {
    reason: "auth_rejected",
    http: 401,
    grpc: Code::Unauthenticated,
    outcome: "excluded",
};
const INVALID_AUTH_REQUEST: Want = Want {
    reason: "invalid_auth_request",
    http: 400,
    grpc: Code::InvalidArgument,
    outcome: "excluded",
};
const INVALID_SERVICE_TYPE_FOR_MODEL: Want = Want {
    reason: "invalid_service_type_for_model",
    http: 403,
    grpc: Code::PermissionDenied,
    outcome: "excluded",
};
const AUTH_SYSTEM_FAILURE: Want = Want {
    reason: "auth_system_failure",
    http: 503,
    grpc: Code::Unavailable,
    outcome: "failure",
};
const SIGNUP_CAP_EXCEEDED: Want = Want {
    reason: "signup_cap_exceeded",
    http: 403,
    grpc: Code::ResourceExhausted,
    outcome: "excluded",
};
const PROVISIONING_FAILURE: Want = Want {
    reason: "provisioning_failure",
    http: 503,
    grpc: Code::Unavailable,
    outcome: "failure",
};
const BLOCKED: Want = Want {
    reason: "blocked",
    http: 403,
    grpc: Code::PermissionDenied,
    outcome: "excluded",
};
const PAYLOAD_TOO_LARGE: Want = Want {
    reason: "payload_too_large",
    http: 413,
    grpc: Code::ResourceExhausted,
    outcome: "excluded",
};
const INVALID_REQUEST: Want = Want {
    reason: "invalid_request",
    http: 400,
    grpc: Code::InvalidArgument,
    outcome: "excluded",
};

/// Labels of one availability series, every label named.
fn labels<'a>(
    protocol: &'a str,
    outcome: &'a str,
    reason: &'a str,
    model: &'a str,
    service_type: &'a str,
    purpose: &'a str,
) -> [(&'static str, &'a str); 6] {
    [
        ("protocol", protocol),
        ("outcome", outcome),
        ("reason", reason),
        ("model", model),
        ("service_type", service_type),
        ("purpose", purpose),
    ]
}

/// Label values the availability series of a case must carry.
#[derive(Clone, Copy)]
struct Lbl<'a> {
    model: &'a str,
    service_type: &'a str,
    purpose: &'a str,
}

const DEFAULT_LBL: Lbl<'static> = Lbl {
    model: "fast",
    service_type: "default",
    purpose: "none",
};

/// What one both-protocols case left behind.
struct Both {
    /// Metrics before the case.
    before: String,
    http_body: Value,
    grpc_status: tonic::Status,
    http_row: LedgerRow,
    grpc_row: LedgerRow,
}

/// One HTTP chat and one gRPC Complete with `c` for `model`: both must fail with `want`
/// (status / code, OpenAI error body / ErrorInfo reason), each must move its availability series
/// `{protocol, outcome, reason, model, service_type, purpose}` by exactly one and nothing else in
/// that family, and each must leave exactly one ledger row with that outcome and reason.
async fn expect_both_with(
    s: &TestServer,
    c: &Creds,
    model: &str,
    want: Want,
    l: Lbl<'_>,
    what: &str,
) -> Both {
    let before = s.metrics().await;
    let rid_h = new_request_id();
    let rid_g = new_request_id();
    let resp = http_chat(s, c, model, &rid_h).await;
    let got = resp.status().as_u16();
    let text = resp.text().await.unwrap_or_default();
    assert_eq!(
        got, want.http,
        "{what}: HTTP status (want {}); body: {text}",
        want.reason
    );
    let http_body: Value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("{what}: body not JSON ({e}): {text}"));
    assert_eq!(
        http_body["error"]["code"], want.reason,
        "{what}: error.code: {http_body}"
    );
    assert!(
        http_body["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{what}: error.message: {http_body}"
    );
    assert!(
        http_body["error"]["type"].is_string() && http_body["error"].get("param").is_some(),
        "{what}: error.type / error.param: {http_body}"
    );
    let grpc_status = match grpc_chat(s, c, model, &rid_g).await {
        Ok(r) => panic!(
            "{what}: gRPC Complete succeeded, want {}: {r:?}",
            want.reason
        ),
        Err(st) => st,
    };
    assert_eq!(
        grpc_status.code(),
        want.grpc,
        "{what}: gRPC code (want {}): {grpc_status:?}",
        want.reason
    );
    assert_eq!(
        grpc_reason(&grpc_status),
        want.reason,
        "{what}: ErrorInfo reason: {grpc_status:?}"
    );
    s.expect_delta(&before, AVAILABILITY, &[], 2.0).await;
    let now = s.metrics().await;
    for p in ["http", "grpc"] {
        let want_labels = labels(
            p,
            want.outcome,
            want.reason,
            l.model,
            l.service_type,
            l.purpose,
        );
        let d = metric_value(&now, AVAILABILITY, &want_labels)
            - metric_value(&before, AVAILABILITY, &want_labels);
        assert!(
            (d - 1.0).abs() < 1e-9,
            "{what}: {AVAILABILITY}{want_labels:?} grew by {d}, want 1; series that moved:\n{}",
            moved_series(&before, &now, AVAILABILITY)
        );
    }
    let http_row = s.ledger_row(&rid_h).await;
    let grpc_row = s.ledger_row(&rid_g).await;
    for (row, p) in [(&http_row, "http"), (&grpc_row, "grpc")] {
        assert_eq!(
            (
                row.outcome.as_str(),
                row.reason.as_str(),
                row.protocol.as_str()
            ),
            (want.outcome, want.reason, p),
            "{what}: ledger row {row:?}"
        );
    }
    Both {
        before,
        http_body,
        grpc_status,
        http_row,
        grpc_row,
    }
}

/// Sends HTTP requests until one is answered `status` (the first may be served from a cache
/// whose renewal it starts), within a deadline.
async fn until_http_status(s: &TestServer, c: &Creds, status: u16, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let got = http_chat(s, c, "fast", &new_request_id()).await.status();
        if got.as_u16() == status {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: still {got}, want {status}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn expect_both(s: &TestServer, c: &Creds, want: Want, what: &str) -> Both {
    expect_both_with(s, c, "fast", want, DEFAULT_LBL, what).await
}

/// The series of `name` whose value changed between two scrapes, with the change.
fn moved_series(before: &str, now: &str, name: &str) -> String {
    let key = |smp: &Sample| {
        let mut l = smp.labels.clone();
        l.sort();
        format!("{l:?}")
    };
    let old: std::collections::HashMap<String, f64> = parse_metrics(before)
        .into_iter()
        .filter(|x| x.name == name)
        .map(|x| (key(&x), x.value))
        .collect();
    parse_metrics(now)
        .into_iter()
        .filter(|x| x.name == name)
        .filter_map(|x| {
            let d = x.value - old.get(&key(&x)).copied().unwrap_or(0.0);
            (d.abs() > 1e-9).then(|| format!("  {} +{d}", key(&x)))
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// One HTTP chat and one gRPC Complete with `c` for `model`: both succeed, each counted once as
/// `success`, each with a `success` ledger row. Returns the rows.
async fn expect_success_both(
    s: &TestServer,
    c: &Creds,
    model: &str,
    what: &str,
) -> (LedgerRow, LedgerRow) {
    let before = s.metrics().await;
    let rid_h = new_request_id();
    let rid_g = new_request_id();
    let resp = http_chat(s, c, model, &rid_h).await;
    let status = resp.status();
    let text = resp.text().await.unwrap_or_default();
    assert_eq!(status, 200, "{what}: HTTP chat; body: {text}");
    if let Err(st) = grpc_chat(s, c, model, &rid_g).await {
        panic!("{what}: gRPC Complete failed: {st:?}");
    }
    s.expect_delta(
        &before,
        AVAILABILITY,
        &[("outcome", "success"), ("reason", "success")],
        2.0,
    )
    .await;
    s.assert_delta_now(&before, AVAILABILITY, &[], 2.0).await;
    let h = s.ledger_row(&rid_h).await;
    let g = s.ledger_row(&rid_g).await;
    for row in [&h, &g] {
        assert_eq!(
            (row.outcome.as_str(), row.reason.as_str()),
            ("success", "success"),
            "{what}: {row:?}"
        );
    }
    (h, g)
}

/// `tollgate_auth_latency_seconds{method, result}` grew by `n` since `before`.
async fn expect_auth_latency(s: &TestServer, before: &str, method: &str, result: &str, n: f64) {
    s.expect_delta(
        before,
        AUTH_LATENCY,
        &[("method", method), ("result", result)],
        n,
    )
    .await;
}

fn admin_opts(extra: String) -> Opts {
    Opts {
        server: format!("admin_token = \"{ADMIN_TOKEN}\""),
        extra,
        ..Opts::default()
    }
}

async fn admin_get(s: &TestServer, path: &str) -> Value {
    let resp = s
        .client
        .get(s.url(path))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    let status = resp.status();
    let text = resp.text().await.unwrap_or_default();
    assert!(status.is_success(), "GET {path}: {status}: {text}");
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("GET {path}: not JSON ({e}): {text}"))
}

async fn admin_post(s: &TestServer, path: &str, body: Value) -> (u16, Value) {
    let resp = s
        .client
        .post(s.url(path))
        .bearer_auth(ADMIN_TOKEN)
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap_or_default();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

/// The user row with this external id, through the store.
async fn user_by_external_id(s: &TestServer, external_id: &str) -> tollgate::store::User {
    s.store()
        .await
        .find_user(external_id)
        .await
        .expect("find_user")
        .unwrap_or_else(|| panic!("no user with external_id {external_id:?}"))
}

/// A user and an API key made through the admin API; returns (user id, key).
async fn admin_user_with_key(s: &TestServer, external_id: &str) -> (i64, String) {
    let (st, user) = admin_post(s, "/admin/users", json!({"external_id": external_id})).await;
    assert!((200..300).contains(&st), "create user: {st} {user}");
    let id = user["id"].as_i64().expect("user id");
    let (st, key) = admin_post(s, "/admin/keys", json!({"user_id": id})).await;
    assert!((200..300).contains(&st), "create key: {st} {key}");
    (id, key["key"].as_str().expect("key").to_owned())
}

// =============================================================================================
// 1. credentials by shape, and every auth reason

/// No verifier configured. Missing Authorization: 401 auth_rejected (auth latency `none`);
/// `Basic`, and `Bearer` with nothing after it: 400 invalid_auth_request; a JWT-shaped or opaque
/// token with no verifier for it, and an unknown `tg-` key: auth_rejected. A static key and an
/// admin-made key work, timed as `static_key` and `api_key`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_by_shape_without_verifiers() {
    let mut s = TestServer::sqlite(admin_opts(String::new())).await;

    let b = expect_both(&s, &Creds::none(), AUTH_REJECTED, "no Authorization").await;
    expect_auth_latency(&s, &b.before, "none", "rejected", 2.0).await;
    assert_eq!(b.http_row.user_id, None);

    expect_both(
        &s,
        &Creds::raw("Basic YWxpY2U6c2VjcmV0"),
        INVALID_AUTH_REQUEST,
        "Basic credentials",
    )
    .await;
    expect_both(
        &s,
        &Creds::raw("Bearer "),
        INVALID_AUTH_REQUEST,
        "Bearer without a token",
    )
    .await;
    expect_both(
        &s,
        &Creds::raw("Bearer"),
        INVALID_AUTH_REQUEST,
        "Bearer alone",
    )
    .await;
    expect_both(
        &s,
        &Creds::bearer(&good_jwt("nobody")),
        AUTH_REJECTED,
        "a JWT with no [auth.jwt]",
    )
    .await;
    expect_both(
        &s,
        &Creds::bearer("opaque-token-without-introspection"),
        AUTH_REJECTED,
        "an opaque token with no [auth.introspection]",
    )
    .await;
    let b = expect_both(
        &s,
        &Creds::bearer("tg-no-such-key-0000"),
        AUTH_REJECTED,
        "an unknown API key",
    )
    .await;
    expect_auth_latency(&s, &b.before, "api_key", "rejected", 2.0).await;

    let before = s.metrics().await;
    let (h, g) = expect_success_both(&s, &Creds::bearer(ALICE_KEY), "fast", "static key").await;
    assert!(h.user_id.is_some() && h.user_id == g.user_id && h.key_id.is_some());
    expect_auth_latency(&s, &before, "static_key", "success", 2.0).await;
    expect_success_both(
        &s,
        &Creds::raw(&format!("bearer {ALICE_KEY}")),
        "fast",
        "the scheme is case-insensitive",
    )
    .await;

    let (uid, key) = admin_user_with_key(&s, "shape-carol").await;
    let before = s.metrics().await;
    let (h, _) = expect_success_both(&s, &Creds::bearer(&key), "fast", "admin-made key").await;
    assert_eq!(h.user_id, Some(uid));
    expect_auth_latency(&s, &before, "api_key", "success", 2.0).await;

    // Streaming requests are refused the same way, before any event, and counted once.
    let before = s.metrics().await;
    let rid_h = new_request_id();
    let mut body = chat_body("fast", &rid_h);
    body["stream"] = json!(true);
    let resp = s
        .client
        .post(s.url("/v1/chat/completions"))
        .header("x-request-id", &rid_h)
        .json(&body)
        .send()
        .await
        .unwrap();
    expect_http_error(resp, 401, "auth_rejected").await;
    let rid_g = new_request_id();
    let st = match s
        .grpc()
        .await
        .stream_complete(grpc_req(
            complete_request("fast", &rid_g),
            &Creds::none(),
            Some(&rid_g),
        ))
        .await
    {
        Err(st) => st,
        Ok(resp) => resp
            .into_inner()
            .message()
            .await
            .expect_err("StreamComplete without a credential"),
    };
    expect_grpc_error(&st, Code::Unauthenticated, "auth_rejected");
    for p in ["http", "grpc"] {
        s.expect_delta(
            &before,
            AVAILABILITY,
            &labels(p, "excluded", "auth_rejected", "fast", "default", "none"),
            1.0,
        )
        .await;
    }
    s.assert_delta_now(&before, AVAILABILITY, &[], 2.0).await;
    for rid in [&rid_h, &rid_g] {
        let row = s.ledger_row(rid).await;
        assert_eq!(
            (row.outcome.as_str(), row.reason.as_str(), row.stream),
            ("excluded", "auth_rejected", true),
            "{row:?}"
        );
    }
    s.shutdown().await;
}

/// `[server] default_service_type = "restricted"`: a request naming no service type is held to
/// restricted's models and labelled `restricted`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configured_default_service_type() {
    let mut s = TestServer::sqlite(Opts {
        server: "default_service_type = \"restricted\"".into(),
        extra: "[service_types.restricted]\nmodels = [\"fast\"]\n".into(),
        ..Opts::default()
    })
    .await;
    let alice = Creds::bearer(ALICE_KEY);
    let b = expect_both_with(
        &s,
        &alice,
        "chatty",
        INVALID_SERVICE_TYPE_FOR_MODEL,
        Lbl {
            model: "chatty",
            service_type: "restricted",
            purpose: "none",
        },
        "the configured default service type",
    )
    .await;
    assert_eq!(b.http_row.service_type.as_deref(), Some("restricted"));
    let (h, _) = expect_success_both(&s, &alice, "fast", "restricted may use fast").await;
    assert_eq!(h.service_type.as_deref(), Some("restricted"));
    expect_success_both(
        &s,
        &alice.clone().st("default"),
        "chatty",
        "the header names another service type",
    )
    .await;
    s.shutdown().await;
}

fn jwt_opts(jwks_url: &str, more_jwt: &str, extra: &str) -> Opts {
    admin_opts(format!("{}{extra}", jwt_table(jwks_url, more_jwt)))
}

/// A healthy JWKS. Valid RSA and EC tokens work and provision a `jwt` user `{iss}#{sub}` on first
/// sight (signups_total +1 each, the request's service type kept); expiry within the leeway is
/// accepted. Expired, not yet valid, bad signature, tampered, wrong audience, wrong issuer,
/// unknown kid, `alg: none`, HS256 with the RSA kid and no `sub` are all auth_rejected on both
/// protocols, create no user, and a flood of unknown kids refetches the JWKS at most once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_valid_and_rejected_tokens() {
    let jwks = JwksServer::start(Mode::Healthy).await;
    let mut s = TestServer::sqlite(jwt_opts(&jwks.url(), "", "")).await;

    let before = s.metrics().await;
    let (h, g) = expect_success_both(
        &s,
        &Creds::bearer(&good_jwt("jwt-alice")),
        "fast",
        "valid RSA token",
    )
    .await;
    let alice = user_by_external_id(&s, &jwt_external_id("jwt-alice")).await;
    assert_eq!(alice.auth_method, "jwt");
    assert_eq!(alice.service_type.as_deref(), Some("default"));
    assert_eq!((h.user_id, g.user_id), (Some(alice.id), Some(alice.id)));
    assert_eq!(h.key_id, None, "a JWT is not a key");
    s.expect_delta(&before, SIGNUPS, &[("auth_method", "jwt")], 1.0)
        .await;
    expect_auth_latency(&s, &before, "jwt", "success", 2.0).await;

    // EC, with a service type and purpose: the user keeps the request's service type.
    let c = Creds::bearer(&jwt(Signer::Ec1, &claims("jwt-ec")))
        .st("batch")
        .purpose("eval");
    let rid = new_request_id();
    let resp = http_chat(&s, &c, "fast", &rid).await;
    assert_eq!(
        resp.status(),
        200,
        "EC token: {}",
        resp.text().await.unwrap_or_default()
    );
    let ec = user_by_external_id(&s, &jwt_external_id("jwt-ec")).await;
    assert_eq!(ec.service_type.as_deref(), Some("batch"));
    let row = s.ledger_row(&rid).await;
    assert_eq!(row.user_id, Some(ec.id));
    assert_eq!(
        (row.service_type.as_deref(), row.purpose.as_deref()),
        (Some("batch"), Some("eval"))
    );

    // `aud` as an array holding our audience (RFC 7519); a `sub` with quotes and non-ASCII is
    // stored exactly.
    let mut arr = claims("jwt-aud-array");
    arr["aud"] = json!(["another-api", AUDIENCE]);
    let resp = http_chat(
        &s,
        &Creds::bearer(&jwt(Signer::Rsa1, &arr)),
        "fast",
        &new_request_id(),
    )
    .await;
    assert_eq!(
        resp.status(),
        200,
        "aud array: {}",
        resp.text().await.unwrap_or_default()
    );
    let odd = "o'brien\"; DROP TABLE users;-- \u{e9}\u{1F600}";
    let resp = http_chat(
        &s,
        &Creds::bearer(&good_jwt(odd)),
        "fast",
        &new_request_id(),
    )
    .await;
    assert_eq!(
        resp.status(),
        200,
        "odd sub: {}",
        resp.text().await.unwrap_or_default()
    );
    let u = user_by_external_id(&s, &jwt_external_id(odd)).await;
    assert_eq!(u.external_id, jwt_external_id(odd));

    // Expired 10 s ago: inside the default 30 s leeway.
    let mut leeway = claims("jwt-leeway");
    leeway["exp"] = json!(unix_now() - 10);
    let rid = new_request_id();
    let resp = http_chat(
        &s,
        &Creds::bearer(&jwt(Signer::Rsa1, &leeway)),
        "fast",
        &rid,
    )
    .await;
    assert_eq!(
        resp.status(),
        200,
        "expired within the leeway: {}",
        resp.text().await.unwrap_or_default()
    );

    let users_before = count_users(&s.db, "auth_method = 'jwt'").await;
    let fetches_before = jwks.hits();
    let before_rejections = s.metrics().await;
    let mut cases: Vec<(&str, String)> = Vec::new();
    let mut expired = claims("jwt-expired");
    expired["exp"] = json!(unix_now() - 3600);
    expired["iat"] = json!(unix_now() - 7200);
    expired["nbf"] = json!(unix_now() - 7200);
    cases.push(("expired an hour ago", jwt(Signer::Rsa1, &expired)));
    let mut early = claims("jwt-early");
    early["nbf"] = json!(unix_now() + 3600);
    cases.push(("not valid for another hour", jwt(Signer::Rsa1, &early)));
    cases.push((
        "signed by another key under kid rsa-1",
        jwt_with_kid(Signer::Rsa2, "rsa-1", &claims("jwt-forged")),
    ));
    let good = good_jwt("jwt-victim");
    let parts: Vec<&str> = good.split('.').collect();
    let evil_payload = {
        use base64::Engine;
        base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(claims("jwt-admin").to_string().as_bytes())
    };
    cases.push((
        "payload swapped after signing",
        format!("{}.{}.{}", parts[0], evil_payload, parts[2]),
    ));
    let mut aud = claims("jwt-aud");
    aud["aud"] = json!("someone-else");
    cases.push(("wrong audience", jwt(Signer::Rsa1, &aud)));
    let mut iss = claims("jwt-iss");
    iss["iss"] = json!("https://evil.example/");
    cases.push(("wrong issuer", jwt(Signer::Rsa1, &iss)));
    cases.push((
        "kid unknown to the JWKS",
        jwt(Signer::Rsa2, &claims("jwt-rotated-too-early")),
    ));
    cases.push(("alg none", unsigned_jwt(&claims("jwt-none"))));
    cases.push(("HS256 under the RSA kid", hs256_jwt(&claims("jwt-hs"))));
    let mut nosub = claims("x");
    nosub.as_object_mut().unwrap().remove("sub");
    cases.push(("no sub", jwt(Signer::Rsa1, &nosub)));
    let mut noexp = claims("jwt-noexp");
    noexp.as_object_mut().unwrap().remove("exp");
    cases.push(("no exp", jwt(Signer::Rsa1, &noexp)));
    for (what, token) in &cases {
        expect_both(&s, &Creds::bearer(token), AUTH_REJECTED, what).await;
    }
    expect_auth_latency(
        &s,
        &before_rejections,
        "jwt",
        "rejected",
        2.0 * cases.len() as f64,
    )
    .await;
    s.assert_delta_now(&before_rejections, SIGNUPS, &[], 0.0)
        .await;
    assert_eq!(
        count_users(&s.db, "auth_method = 'jwt'").await,
        users_before,
        "rejected tokens create no user"
    );
    let refetches = jwks.hits() - fetches_before;
    assert!(
        refetches <= 1,
        "unknown kids refetched the JWKS {refetches} times within jwks_min_refresh_secs"
    );
    s.shutdown().await;
}

/// A key rotation: the JWKS starts serving `rsa-2`; a token signed with it is accepted after
/// the gateway refetches on the unknown kid (`jwks_min_refresh_secs = 0`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_key_rotation_refetches_the_jwks() {
    let jwks = JwksServer::start(Mode::Healthy).await;
    let mut s = TestServer::sqlite(jwt_opts(
        &jwks.url(),
        "jwks_min_refresh_secs = 0\nleeway_secs = 0",
        "",
    ))
    .await;
    expect_success_both(
        &s,
        &Creds::bearer(&good_jwt("rot-1")),
        "fast",
        "before rotation",
    )
    .await;
    // `leeway_secs = 0`: expired 5 s ago is expired.
    let mut late = claims("rot-late");
    late["exp"] = json!(unix_now() - 5);
    expect_both(
        &s,
        &Creds::bearer(&jwt(Signer::Rsa1, &late)),
        AUTH_REJECTED,
        "expired 5 s ago with leeway_secs = 0",
    )
    .await;
    jwks.set_keys(jwks_rotated_json());
    let token = jwt(Signer::Rsa2, &claims("rot-2"));
    expect_success_both(&s, &Creds::bearer(&token), "fast", "new key after rotation").await;
    s.shutdown().await;
}

/// The JWKS endpoint down (closed port), slow (300 ms against `timeout_ms = 100`), answering 500,
/// answering garbage: a valid token gets 503 / UNAVAILABLE auth_system_failure, a `failure`, on
/// both protocols, timed as jwt/failure; the slow one within its deadline. When the 500 endpoint
/// heals, the same token works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_verifier_outages_are_auth_system_failures() {
    let slow = JwksServer::start(Mode::Slow(Duration::from_millis(300))).await;
    let failing = JwksServer::start(Mode::Status500).await;
    let garbled = JwksServer::start(Mode::Garbage).await;
    let more = "timeout_ms = 100\njwks_min_refresh_secs = 0";
    let endpoints = [
        ("JWKS down", closed_port_url("/jwks.json")),
        ("JWKS slow", slow.url()),
        ("JWKS answering 500", failing.url()),
        ("JWKS answering garbage", garbled.url()),
    ];
    let token = good_jwt("outage-user");
    for (what, url) in &endpoints {
        let mut s = TestServer::sqlite(jwt_opts(url, more, "")).await;
        let started = Instant::now();
        let b = expect_both(&s, &Creds::bearer(&token), AUTH_SYSTEM_FAILURE, what).await;
        expect_auth_latency(&s, &b.before, "jwt", "failure", 2.0).await;
        assert_eq!(b.http_row.user_id, None);
        if *what == "JWKS slow" {
            assert!(
                started.elapsed() < Duration::from_secs(3),
                "timeout_ms = 100 not honoured: {:?}",
                started.elapsed()
            );
        }
        if *what == "JWKS answering 500" {
            failing.set_mode(Mode::Healthy);
            eventually(DEADLINE, "JWT accepted once the JWKS heals", || async {
                let resp = http_chat(&s, &Creds::bearer(&token), "fast", &new_request_id()).await;
                (resp.status() == 200).then_some(())
            })
            .await;
        }
        s.shutdown().await;
    }
}

fn introspection_opts(url: &str, more: &str, extra: &str) -> Opts {
    admin_opts(format!("{}{extra}", introspection_table(url, more)))
}

/// A healthy introspection endpoint. An active token works on both protocols and provisions an
/// `introspection` user `introspection#{sub}` (signups_total +1); the positive answer is cached
/// (asked once for two requests); the client authenticates with HTTP Basic; a token with `+`, `/`,
/// `=`, `&`, `%` is form-encoded correctly. Inactive, unknown, and active-but-expired tokens are
/// auth_rejected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn introspection_valid_and_rejected_tokens() {
    let intro = IntrospectionServer::start(Mode::Healthy).await;
    let mut s = TestServer::sqlite(introspection_opts(&intro.url(), "", "")).await;

    intro.add_active("opaque-bob-token-1", "intro-bob");
    let before = s.metrics().await;
    let (h, g) = expect_success_both(
        &s,
        &Creds::bearer("opaque-bob-token-1"),
        "fast",
        "active token",
    )
    .await;
    let bob = user_by_external_id(&s, &introspection_external_id("intro-bob")).await;
    assert_eq!(bob.auth_method, "introspection");
    assert_eq!((h.user_id, g.user_id), (Some(bob.id), Some(bob.id)));
    s.expect_delta(&before, SIGNUPS, &[("auth_method", "introspection")], 1.0)
        .await;
    expect_auth_latency(&s, &before, "introspection", "success", 2.0).await;
    assert_eq!(
        intro.asked("opaque-bob-token-1"),
        1,
        "a positive answer is cached for cache_ttl_secs"
    );
    assert_eq!(intro.bad_client_calls(), 0, "HTTP Basic client credentials");

    let special = "tok+with/special=chars&more%20x";
    intro.add_active(special, "intro-special");
    let rid = new_request_id();
    let resp = http_chat(&s, &Creds::bearer(special), "fast", &rid).await;
    assert_eq!(
        resp.status(),
        200,
        "form-encoded token: {}",
        resp.text().await.unwrap_or_default()
    );

    intro.add_answer(
        "opaque-inactive",
        json!({"active": false, "sub": "intro-gone"}),
    );
    let before = s.metrics().await;
    let cases = [
        ("inactive token", "opaque-inactive"),
        ("token the server does not know", "opaque-unknown"),
    ];
    for (what, token) in cases {
        expect_both(&s, &Creds::bearer(token), AUTH_REJECTED, what).await;
    }
    expect_auth_latency(
        &s,
        &before,
        "introspection",
        "rejected",
        2.0 * cases.len() as f64,
    )
    .await;
    s.assert_delta_now(&before, SIGNUPS, &[], 0.0).await;
    // An active answer whose `exp` is already past is refused (401) and never cached past it.
    intro.add_answer(
        "opaque-expired",
        json!({"active": true, "sub": "intro-late", "exp": unix_now() - 3600}),
    );
    let mut answers = Vec::new();
    for _ in 0..2 {
        let resp = http_chat(
            &s,
            &Creds::bearer("opaque-expired"),
            "fast",
            &new_request_id(),
        )
        .await;
        answers.push(resp.status().as_u16());
    }
    assert_eq!(
        answers,
        [401, 401],
        "an endpoint calling an expired token active is not taken at its word"
    );
    assert_eq!(
        intro.asked("opaque-expired"),
        2,
        "an answer is not cached past its exp"
    );
    for sub in ["intro-gone", "intro-late"] {
        assert_eq!(
            count_users(&s.db, &format!("external_id = 'introspection#{sub}'")).await,
            0
        );
    }
    s.shutdown().await;
}

/// The introspection endpoint down, slow (300 ms against `timeout_ms = 100`), answering 500,
/// answering garbage, or refusing tollgate's own client credentials: 503 / UNAVAILABLE
/// auth_system_failure (a `failure`) on both protocols, timed as introspection/failure.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn introspection_outages_are_auth_system_failures() {
    let slow = IntrospectionServer::start(Mode::Slow(Duration::from_millis(300))).await;
    let failing = IntrospectionServer::start(Mode::Status500).await;
    let garbled = IntrospectionServer::start(Mode::Garbage).await;
    let strict = IntrospectionServer::start(Mode::Healthy).await;
    for srv in [&slow, &failing, &garbled, &strict] {
        srv.add_active("opaque-outage", "intro-outage");
    }
    let cases: Vec<(&str, Opts)> = vec![
        (
            "introspection down",
            introspection_opts(&closed_port_url("/introspect"), "timeout_ms = 100", ""),
        ),
        (
            "introspection slow",
            introspection_opts(&slow.url(), "timeout_ms = 100", ""),
        ),
        (
            "introspection answering 500",
            introspection_opts(&failing.url(), "timeout_ms = 100", ""),
        ),
        (
            "introspection answering garbage",
            introspection_opts(&garbled.url(), "timeout_ms = 100", ""),
        ),
        (
            "introspection refusing tollgate's client credentials",
            admin_opts(format!(
                "[auth.introspection]\nurl = \"{}\"\nclient_id = \"{INTROSPECTION_CLIENT_ID}\"\n\
                 client_secret = \"not-the-secret\"\ntimeout_ms = 100\n",
                strict.url()
            )),
        ),
    ];
    for (what, opts) in cases {
        let mut s = TestServer::sqlite(opts).await;
        let started = Instant::now();
        let b = expect_both(
            &s,
            &Creds::bearer("opaque-outage"),
            AUTH_SYSTEM_FAILURE,
            what,
        )
        .await;
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "{what}: took {:?}",
            started.elapsed()
        );
        expect_auth_latency(&s, &b.before, "introspection", "failure", 2.0).await;
        s.shutdown().await;
    }
    assert!(strict.bad_client_calls() >= 1);
}

// =============================================================================================
// 2. provisioning

macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::Backend::Sqlite).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::Backend::Postgres).await;
                }
            )*
        }
    };
}

on_both_backends!(
    first_sight_provisions_exactly_one_user,
    the_cap_never_refuses_an_identity_that_exists
);

/// 50 concurrent first requests of one JWT identity (25 HTTP, 25 gRPC) all succeed and make
/// exactly one user; signups_total{jwt} grows by one; every ledger row names that user.
async fn first_sight_provisions_exactly_one_user(backend: Backend) {
    let jwks = JwksServer::start(Mode::Healthy).await;
    let Some(mut s) = TestServer::start(backend, jwt_opts(&jwks.url(), "", "")).await else {
        return;
    };
    let before = s.metrics().await;
    let token = good_jwt("racer");
    let c = Creds::bearer(&token);
    let grpc = s.grpc().await;
    let rids: Vec<String> = (0..50).map(|_| new_request_id()).collect();
    let results = join_all(rids.iter().enumerate().map(|(i, rid)| {
        let c = c.clone();
        let mut grpc = grpc.clone();
        let s = &s;
        async move {
            if i % 2 == 0 {
                let resp = http_chat(s, &c, "fast", rid).await;
                let st = resp.status().as_u16();
                (st == 200).then_some(()).ok_or(format!(
                    "HTTP {st}: {}",
                    resp.text().await.unwrap_or_default()
                ))
            } else {
                grpc.complete(grpc_req(complete_request("fast", rid), &c, Some(rid)))
                    .await
                    .map(|_| ())
                    .map_err(|e| format!("gRPC {e:?}"))
            }
        }
    }))
    .await;
    let failed: Vec<&String> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    assert!(
        failed.is_empty(),
        "concurrent first requests failed: {failed:#?}"
    );
    assert!(
        jwks.hits() <= 2,
        "50 concurrent requests on a cold key cache fetched the JWKS {} times",
        jwks.hits()
    );
    let ext = jwt_external_id("racer");
    assert_eq!(
        count_users(&s.db, &format!("external_id = '{ext}'")).await,
        1,
        "exactly one user"
    );
    let user = user_by_external_id(&s, &ext).await;
    assert_eq!(user.auth_method, "jwt");
    s.expect_delta(&before, SIGNUPS, &[("auth_method", "jwt")], 1.0)
        .await;
    s.assert_delta_now(&before, SIGNUPS, &[], 1.0).await;
    s.expect_delta(
        &before,
        AVAILABILITY,
        &[("outcome", "success"), ("reason", "success")],
        50.0,
    )
    .await;
    s.assert_delta_now(&before, AVAILABILITY, &[], 50.0).await;
    for rid in &rids {
        assert_eq!(s.ledger_row(rid).await.user_id, Some(user.id));
    }
    s.shutdown().await;
}

/// The users table renamed away under a running server (PostgreSQL): a new identity gets 503 /
/// UNAVAILABLE provisioning_failure, a `failure`, on both protocols; with the table back the
/// identity is provisioned.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provisioning_failure_when_the_database_fails() {
    let jwks = JwksServer::start(Mode::Healthy).await;
    let Some(db) = TestDb::postgres().await else {
        return;
    };
    let mut s = TestServer::start_on(db, jwt_opts(&jwks.url(), "", "")).await;
    // Keys are fetched and the store is warm.
    expect_success_both(&s, &Creds::bearer(&good_jwt("pf-old")), "fast", "warm up").await;
    pg_exec_on(&s.db, "ALTER TABLE users RENAME TO users_offline").await;
    let token = good_jwt("pf-new");
    let b = expect_both(
        &s,
        &Creds::bearer(&token),
        PROVISIONING_FAILURE,
        "users table gone",
    )
    .await;
    assert_eq!(b.http_row.user_id, None);
    pg_exec_on(&s.db, "ALTER TABLE users_offline RENAME TO users").await;
    eventually(DEADLINE, "provisioning works again", || async {
        let resp = http_chat(&s, &Creds::bearer(&token), "fast", &new_request_id()).await;
        (resp.status() == 200).then_some(())
    })
    .await;
    assert_eq!(
        count_users(
            &s.db,
            &format!("external_id = '{}'", jwt_external_id("pf-new"))
        )
        .await,
        1
    );
    s.shutdown().await;
}

// =============================================================================================
// 3. signup caps

/// One first request of a new identity, on `server`, over HTTP or gRPC: Ok(()) on success,
/// Err(reason) otherwise ("HTTP 500 ..." for anything unexpected).
async fn first_request(
    client: &reqwest::Client,
    http: SocketAddr,
    grpc: &mut tollgate::proto::gateway_client::GatewayClient<tonic::transport::Channel>,
    use_grpc: bool,
    c: &Creds,
    rid: &str,
) -> Result<(), String> {
    if use_grpc {
        match grpc
            .complete(grpc_req(complete_request("fast", rid), c, Some(rid)))
            .await
        {
            Ok(_) => Ok(()),
            Err(st) if st.code() == Code::ResourceExhausted => Err(grpc_reason(&st)),
            Err(st) => Err(format!("gRPC {st:?}")),
        }
    } else {
        let resp = http_chat_on(client, http, c, "fast", rid).await;
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap_or_default();
        match status {
            200 => Ok(()),
            403 => {
                let v: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
                Err(v["error"]["code"].as_str().unwrap_or(&text).to_owned())
            }
            _ => Err(format!("HTTP {status}: {text}")),
        }
    }
}

/// `signup_cap_per_day = 1`: 30 concurrent first requests of ONE new identity (HTTP and gRPC)
/// all succeed (the racers that lose the insert find the winner's user; they are not signups);
/// exactly one user; the next new identity is refused; a user provisioned under another service
/// type is not a signup and passes the full cap.
async fn the_cap_never_refuses_an_identity_that_exists(backend: Backend) {
    let jwks = JwksServer::start(Mode::Healthy).await;
    let Some(mut s) = TestServer::start(
        backend,
        jwt_opts(
            &jwks.url(),
            "",
            "[service_types.one]\nmodels = [\"*\"]\nsignup_cap_per_day = 1\n",
        ),
    )
    .await
    else {
        return;
    };
    let existing = Creds::bearer(&good_jwt("one-existing"));
    expect_success_both(&s, &existing, "fast", "provisioned under default").await;
    let before = s.metrics().await;
    let grpc = s.grpc().await;
    let c = Creds::bearer(&good_jwt("one-racer")).st("one");
    let results = join_all((0..30).map(|i| {
        let mut grpc = grpc.clone();
        let c = c.clone();
        let s = &s;
        async move {
            let rid = new_request_id();
            first_request(&s.client, s.http, &mut grpc, i % 2 == 1, &c, &rid).await
        }
    }))
    .await;
    let failed: Vec<&String> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    assert!(
        failed.is_empty(),
        "racers of one identity refused: {failed:#?}"
    );
    assert_eq!(count_users(&s.db, "service_type = 'one'").await, 1);
    s.expect_delta(&before, SIGNUPS, &[("auth_method", "jwt")], 1.0)
        .await;
    expect_both_with(
        &s,
        &Creds::bearer(&good_jwt("one-second")).st("one"),
        "fast",
        SIGNUP_CAP_EXCEEDED,
        Lbl {
            model: "fast",
            service_type: "one",
            purpose: "none",
        },
        "the second identity",
    )
    .await;
    expect_success_both(
        &s,
        &existing.clone().st("one"),
        "fast",
        "an existing user is not a signup",
    )
    .await;
    s.shutdown().await;
}

/// The per-day cap is a rolling 24 h window and the total cap counts every signup: with users
/// of the service type created 25 h ago (outside the day) and 1 h ago (inside), `cap_per_day = 2`
/// admits one more today and `cap_total = 5` counts the old ones too. GET /admin/signup-cap
/// agrees.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signup_cap_window_is_rolling_24_hours() {
    let jwks = JwksServer::start(Mode::Healthy).await;
    let mut s = TestServer::sqlite(jwt_opts(
        &jwks.url(),
        "",
        "[service_types.rolling]\nmodels = [\"*\"]\nsignup_cap_per_day = 2\n\
         signup_cap_total = 5\n",
    ))
    .await;
    let now = now_ms();
    let hour = 3_600_000;
    let path = s.db.url.strip_prefix("sqlite://").unwrap().to_owned();
    blocking(move || {
        use diesel::{Connection, RunQueryDsl};
        let mut conn = diesel::SqliteConnection::establish(&path).unwrap();
        diesel::sql_query("PRAGMA busy_timeout = 5000")
            .execute(&mut conn)
            .ok();
        for (ext, at) in [
            ("old#1", now - 25 * hour),
            ("old#2", now - 30 * hour),
            ("recent#1", now - hour),
        ] {
            diesel::sql_query(format!(
                "INSERT INTO users (external_id, auth_method, service_type, blocked, created_at) \
                 VALUES ('{ext}', 'jwt', 'rolling', false, {at})"
            ))
            .execute(&mut conn)
            .expect("insert a past signup");
        }
    })
    .await;
    let c1 = Creds::bearer(&good_jwt("rolling-new-1")).st("rolling");
    let resp = http_chat(&s, &c1, "fast", &new_request_id()).await;
    assert_eq!(
        resp.status(),
        200,
        "one slot left in the last 24 h: {}",
        resp.text().await.unwrap_or_default()
    );
    expect_both_with(
        &s,
        &Creds::bearer(&good_jwt("rolling-new-2")).st("rolling"),
        "fast",
        SIGNUP_CAP_EXCEEDED,
        Lbl {
            model: "fast",
            service_type: "rolling",
            purpose: "none",
        },
        "the day is full",
    )
    .await;
    let report = admin_get(&s, "/admin/signup-cap").await;
    let entry = report["service_types"]
        .as_array()
        .and_then(|v| v.iter().find(|e| e["service_type"] == "rolling"))
        .unwrap_or_else(|| panic!("no `rolling` in {report}"))
        .clone();
    assert_eq!(entry["used_24h"], 2, "{entry}");
    assert_eq!(entry["used_total"], 4, "{entry}");
    assert_eq!(entry["remaining"], 0, "{entry}");
    s.shutdown().await;
}

/// THE signup-cap test: `signup_cap_per_day = 50` on PostgreSQL, two gateway replicas on the
/// same database, 200 concurrent first requests of 200 new identities (half per replica, half
/// HTTP, half gRPC): exactly 50 succeed, 150 get signup_cap_exceeded (403 / RESOURCE_EXHAUSTED,
/// `excluded`), exactly 50 users exist, signups_total adds up to 50, and GET /admin/signup-cap on
/// either replica reports 50 used, 0 remaining. Provisioned identities keep working; a refused
/// one stays refused; the uncapped default service type is unaffected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signup_cap_per_day_holds_across_two_replicas() {
    let jwks = JwksServer::start(Mode::Healthy).await;
    let Some(db) = TestDb::postgres().await else {
        return;
    };
    let db2 = shared_db(&db);
    let opts = jwt_opts(
        &jwks.url(),
        "",
        "[service_types.capped]\nmodels = [\"*\"]\nsignup_cap_per_day = 50\n",
    );
    let mut a = TestServer::start_on(db, opts.clone()).await;
    let mut b = TestServer::start_on(db2, opts).await;
    let before_a = a.metrics().await;
    let before_b = b.metrics().await;
    let grpc_a = a.grpc().await;
    let grpc_b = b.grpc().await;

    let work: Vec<(usize, Creds, String)> = (0..200)
        .map(|i| {
            (
                i,
                Creds::bearer(&good_jwt(&format!("cap-{i}"))).st("capped"),
                new_request_id(),
            )
        })
        .collect();
    let started = Instant::now();
    let results =
        join_all(
            work.iter().map(|(i, c, rid)| {
                let (server, mut grpc) = if i % 2 == 0 {
                    (&a, grpc_a.clone())
                } else {
                    (&b, grpc_b.clone())
                };
                let use_grpc = (i / 2) % 2 == 1;
                async move {
                    first_request(&server.client, server.http, &mut grpc, use_grpc, c, rid).await
                }
            }),
        )
        .await;
    let elapsed = started.elapsed();
    let ok: Vec<usize> = (0..200).filter(|i| results[*i].is_ok()).collect();
    let capped: Vec<usize> = (0..200)
        .filter(|i| results[*i].as_ref().err().map(String::as_str) == Some("signup_cap_exceeded"))
        .collect();
    let other: Vec<(usize, &String)> = results
        .iter()
        .enumerate()
        .filter_map(|(i, r)| r.as_ref().err().map(|e| (i, e)))
        .filter(|(_, e)| e.as_str() != "signup_cap_exceeded")
        .collect();
    assert!(other.is_empty(), "unexpected answers: {other:#?}");
    assert_eq!(
        (ok.len(), capped.len()),
        (50, 150),
        "successes / signup_cap_exceeded (in {elapsed:?})"
    );
    assert_eq!(
        count_users(&a.db, "service_type = 'capped'").await,
        50,
        "users of the capped service type"
    );

    let signups = |t: &str| metric_value(t, SIGNUPS, &[("auth_method", "jwt")]);
    let avail_of = |t: &str, reason: &str| {
        metric_value(
            t,
            AVAILABILITY,
            &[("reason", reason), ("service_type", "capped")],
        )
    };
    let (now_a, now_b) = (a.metrics().await, b.metrics().await);
    assert_eq!(
        signups(&now_a) - signups(&before_a) + signups(&now_b) - signups(&before_b),
        50.0,
        "signups_total over both replicas"
    );
    assert_eq!(
        avail_of(&now_a, "signup_cap_exceeded") + avail_of(&now_b, "signup_cap_exceeded"),
        150.0,
        "{}",
        series_dump(&now_a, AVAILABILITY)
    );
    assert_eq!(
        avail_of(&now_a, "success") + avail_of(&now_b, "success"),
        50.0
    );
    for i in capped.iter().take(3).chain(ok.iter().take(3)) {
        let row = a.ledger_row(&work[*i].2).await;
        let want = if results[*i].is_ok() {
            ("success", "success")
        } else {
            ("excluded", "signup_cap_exceeded")
        };
        assert_eq!((row.outcome.as_str(), row.reason.as_str()), want);
        assert_eq!(row.service_type.as_deref(), Some("capped"));
    }

    for s in [&a, &b] {
        let report = admin_get(s, "/admin/signup-cap").await;
        let capped_entry = report["service_types"]
            .as_array()
            .and_then(|v| v.iter().find(|e| e["service_type"] == "capped"))
            .unwrap_or_else(|| panic!("no `capped` in {report}"))
            .clone();
        assert_eq!(capped_entry["cap_per_day"], 50, "{capped_entry}");
        assert_eq!(capped_entry["used_24h"], 50, "{capped_entry}");
        assert_eq!(capped_entry["remaining"], 0, "{capped_entry}");
        assert_eq!(capped_entry["used_total"], 50, "{capped_entry}");
    }

    // Provisioned identities keep working; refused ones stay refused; other service types are
    // not capped.
    let provisioned = &work[ok[0]].1;
    let refused = &work[capped[0]].1;
    expect_success_both(&b, provisioned, "fast", "a provisioned identity").await;
    expect_both_with(
        &a,
        refused,
        "fast",
        SIGNUP_CAP_EXCEEDED,
        Lbl {
            model: "fast",
            service_type: "capped",
            purpose: "none",
        },
        "a refused identity again",
    )
    .await;
    expect_success_both(
        &a,
        &Creds::bearer(&good_jwt("cap-default-1")),
        "fast",
        "the default service type has no cap",
    )
    .await;

    // One new identity racing on both replicas at once: one user, one signup in all.
    let (before_a, before_b) = (a.metrics().await, b.metrics().await);
    let shared = Creds::bearer(&good_jwt("cap-shared-racer"));
    let results = join_all((0..40).map(|i| {
        let (server, mut grpc) = if i % 2 == 0 {
            (&a, grpc_a.clone())
        } else {
            (&b, grpc_b.clone())
        };
        let c = shared.clone();
        async move {
            let rid = new_request_id();
            first_request(
                &server.client,
                server.http,
                &mut grpc,
                (i / 2) % 2 == 1,
                &c,
                &rid,
            )
            .await
        }
    }))
    .await;
    let failed: Vec<&String> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    assert!(
        failed.is_empty(),
        "one identity on two replicas: {failed:#?}"
    );
    assert_eq!(
        count_users(
            &a.db,
            &format!("external_id = '{}'", jwt_external_id("cap-shared-racer"))
        )
        .await,
        1
    );
    let (now_a, now_b) = (a.metrics().await, b.metrics().await);
    assert_eq!(
        signups(&now_a) - signups(&before_a) + signups(&now_b) - signups(&before_b),
        1.0,
        "one signup over both replicas"
    );
    a.shutdown().await;
    b.shutdown().await;
}

/// SQLite, one replica: `signup_cap_total = 3` lets three identities in and refuses the fourth
/// on both protocols; `signup_cap_per_day = 10` lets exactly 10 of 30 concurrent identities in;
/// GET /admin/signup-cap reports both; admin-made users are not signups.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signup_caps_total_and_daily() {
    let jwks = JwksServer::start(Mode::Healthy).await;
    let mut s = TestServer::sqlite(jwt_opts(
        &jwks.url(),
        "",
        "[service_types.trial]\nmodels = [\"*\"]\nsignup_cap_total = 3\n\n\
         [service_types.daily]\nmodels = [\"*\"]\nsignup_cap_per_day = 10\n",
    ))
    .await;
    admin_user_with_key(&s, "not-a-signup").await;
    let before = s.metrics().await;
    for i in 0..3 {
        let c = Creds::bearer(&good_jwt(&format!("trial-{i}"))).st("trial");
        let rid = new_request_id();
        let resp = http_chat(&s, &c, "fast", &rid).await;
        assert_eq!(
            resp.status(),
            200,
            "trial-{i}: {}",
            resp.text().await.unwrap_or_default()
        );
    }
    let b = expect_both_with(
        &s,
        &Creds::bearer(&good_jwt("trial-3")).st("trial"),
        "fast",
        SIGNUP_CAP_EXCEEDED,
        Lbl {
            model: "fast",
            service_type: "trial",
            purpose: "none",
        },
        "fourth identity over signup_cap_total = 3",
    )
    .await;
    assert_eq!(b.http_row.user_id, None);
    assert_eq!(count_users(&s.db, "service_type = 'trial'").await, 3);
    // Authorize provisions too, under the same cap.
    let late = Creds::bearer(&good_jwt("trial-4")).st("trial");
    let (st, e) = http_authorize(&s, &late, Some(json!({"model": "fast"}))).await;
    assert_eq!(
        (st, &e["error"]["code"]),
        (403, &json!("signup_cap_exceeded")),
        "{e}"
    );
    let status = s
        .grpc()
        .await
        .authorize(grpc_req(AuthorizeRequest::default(), &late, None))
        .await
        .expect_err("Authorize over the cap");
    expect_grpc_error(&status, Code::ResourceExhausted, "signup_cap_exceeded");

    let grpc = s.grpc().await;
    let work: Vec<(Creds, String)> = (0..30)
        .map(|i| {
            (
                Creds::bearer(&good_jwt(&format!("daily-{i}"))).st("daily"),
                new_request_id(),
            )
        })
        .collect();
    let results = join_all(work.iter().enumerate().map(|(i, (c, rid))| {
        let mut grpc = grpc.clone();
        let s = &s;
        async move { first_request(&s.client, s.http, &mut grpc, i % 2 == 1, c, rid).await }
    }))
    .await;
    let ok = results.iter().filter(|r| r.is_ok()).count();
    let other: Vec<&String> = results
        .iter()
        .filter_map(|r| r.as_ref().err())
        .filter(|e| e.as_str() != "signup_cap_exceeded")
        .collect();
    assert!(other.is_empty(), "{other:#?}");
    assert_eq!(
        ok, 10,
        "signup_cap_per_day = 10 of 30 concurrent identities"
    );
    assert_eq!(count_users(&s.db, "service_type = 'daily'").await, 10);
    s.expect_delta(&before, SIGNUPS, &[("auth_method", "jwt")], 13.0)
        .await;

    let report = admin_get(&s, "/admin/signup-cap").await;
    let entry = |name: &str| {
        report["service_types"]
            .as_array()
            .and_then(|v| v.iter().find(|e| e["service_type"] == name))
            .unwrap_or_else(|| panic!("no `{name}` in {report}"))
            .clone()
    };
    let trial = entry("trial");
    assert_eq!(
        (&trial["cap_total"], &trial["used_total"]),
        (&json!(3), &json!(3)),
        "{trial}"
    );
    let daily = entry("daily");
    assert_eq!(
        (
            &daily["cap_per_day"],
            &daily["used_24h"],
            &daily["remaining"]
        ),
        (&json!(10), &json!(10), &json!(0)),
        "{daily}"
    );
    let resp = s
        .client
        .get(s.url("/admin/signup-cap"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401, "signup-cap needs the admin token");
    s.shutdown().await;
}

// =============================================================================================
// 4. blocking

async fn http_block(s: &TestServer, id: i64, reason: &str) -> Value {
    let (st, user) = admin_post(
        s,
        &format!("/admin/users/{id}/block"),
        json!({"reason": reason}),
    )
    .await;
    assert_eq!(st, 200, "block {id}: {user}");
    user
}

async fn http_unblock(s: &TestServer, id: i64) -> Value {
    let (st, user) = admin_post(s, &format!("/admin/users/{id}/unblock"), json!({})).await;
    assert_eq!(st, 200, "unblock {id}: {user}");
    user
}

/// The HTTP admin API (`identity_cache_ttl_ms = 0`, `key_cache_ttl_ms = 0`): a JWT-provisioned
/// user and an API-key user are blocked (user JSON: blocked, reason, time), both protocols answer
/// 403 / PERMISSION_DENIED blocked (`excluded`, ledger names the user), Authorize too; unblock
/// restores. Unknown user: 404; missing or wrong admin token: 401. Users are listed by
/// `limit` / `after_id` pages and found by external id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn block_and_unblock_via_http_admin() {
    let jwks = JwksServer::start(Mode::Healthy).await;
    let mut opts = jwt_opts(&jwks.url(), "", "");
    opts.auth = "identity_cache_ttl_ms = 0\nkey_cache_ttl_ms = 0".into();
    let mut s = TestServer::sqlite(opts).await;

    let jwt_creds = Creds::bearer(&good_jwt("blockee"));
    expect_success_both(&s, &jwt_creds, "fast", "before the block").await;
    let ext = jwt_external_id("blockee");
    let resp = s
        .client
        .get(s.url("/admin/users"))
        .query(&[("external_id", ext.as_str())])
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let found: Value = resp.json().await.unwrap();
    let found = if found.get("users").is_some() {
        found["users"][0].clone()
    } else {
        found
    };
    assert_eq!(found["external_id"], ext.as_str(), "{found}");
    assert_eq!(found["auth_method"], "jwt", "{found}");
    let jwt_uid = found["id"].as_i64().expect("id");

    let user = http_block(&s, jwt_uid, "abuse report 17").await;
    assert_eq!(user["id"], jwt_uid);
    assert_eq!(user["blocked"], true, "{user}");
    assert_eq!(user["blocked_reason"], "abuse report 17", "{user}");
    assert!(user["blocked_at"].is_i64(), "{user}");
    for k in ["external_id", "name", "auth_method", "created_at"] {
        assert!(user.get(k).is_some(), "user JSON lacks {k}: {user}");
    }
    let blocked_jwt = expect_both(&s, &jwt_creds, BLOCKED, "blocked JWT user").await;
    let st = s
        .grpc()
        .await
        .authorize(grpc_req(
            AuthorizeRequest {
                model: "fast".into(),
            },
            &jwt_creds,
            None,
        ))
        .await
        .expect_err("Authorize of a blocked user");
    expect_grpc_error(&st, Code::PermissionDenied, "blocked");
    let (st, e) = http_authorize(&s, &jwt_creds, Some(json!({"model": "fast"}))).await;
    assert_eq!((st, &e["error"]["code"]), (403, &json!("blocked")), "{e}");
    expect_success_both(&s, &Creds::bearer(ALICE_KEY), "fast", "others unaffected").await;

    let user = http_unblock(&s, jwt_uid).await;
    assert_eq!(user["blocked"], false, "{user}");
    assert!(user["blocked_reason"].is_null(), "{user}");
    expect_success_both(&s, &jwt_creds, "fast", "unblocked JWT user").await;

    let (key_uid, key) = admin_user_with_key(&s, "key-blockee").await;
    let key_creds = Creds::bearer(&key);
    http_block(&s, key_uid, "unpaid").await;
    let blocked_key = expect_both(&s, &key_creds, BLOCKED, "blocked API-key user").await;
    http_unblock(&s, key_uid).await;
    expect_success_both(&s, &key_creds, "fast", "unblocked API-key user").await;

    let (st, body) = admin_post(&s, "/admin/users/987654321/block", json!({"reason": "x"})).await;
    assert_eq!(st, 404, "{body}");
    for token in [None, Some("wrong-admin-token"), Some(ALICE_KEY)] {
        for path in [
            format!("/admin/users/{jwt_uid}/block"),
            format!("/admin/users/{jwt_uid}/unblock"),
        ] {
            let mut rb = s.client.post(s.url(&path)).json(&json!({"reason": "x"}));
            if let Some(t) = token {
                rb = rb.bearer_auth(t);
            }
            let status = rb.send().await.unwrap().status();
            assert_eq!(status, 401, "{path} with token {token:?}");
        }
        let mut rb = s.client.get(s.url("/admin/users?limit=10"));
        if let Some(t) = token {
            rb = rb.bearer_auth(t);
        }
        assert_eq!(rb.send().await.unwrap().status(), 401);
    }
    expect_success_both(&s, &jwt_creds, "fast", "a failed admin call blocked nobody").await;

    // Paging: one user a page, ids rising, everyone seen once.
    let mut seen: Vec<i64> = Vec::new();
    let mut after = 0i64;
    for _ in 0..20 {
        let page = admin_get(&s, &format!("/admin/users?limit=1&after_id={after}")).await;
        let users = page["users"].as_array().expect("users array").clone();
        assert!(users.len() <= 1, "limit=1: {page}");
        let Some(u) = users.first() else { break };
        let id = u["id"].as_i64().unwrap();
        assert!(id > after, "after_id={after} returned {id}");
        seen.push(id);
        after = id;
    }
    for id in [jwt_uid, key_uid] {
        assert!(seen.contains(&id), "user {id} not listed: {seen:?}");
    }
    let all = admin_get(&s, "/admin/users?limit=100").await;
    assert_eq!(all["users"].as_array().unwrap().len(), seen.len());

    // The ledger row of a blocked request names the (known) user and key.
    assert_eq!(
        (blocked_jwt.http_row.user_id, blocked_jwt.grpc_row.user_id),
        (Some(jwt_uid), Some(jwt_uid)),
        "ledger rows of the blocked JWT user's requests"
    );
    assert_eq!(
        blocked_key.http_row.user_id,
        Some(key_uid),
        "ledger row of the blocked key user's request"
    );
    assert!(blocked_key.http_row.key_id.is_some());
    s.shutdown().await;
}

fn admin_req<T>(msg: T, token: Option<&str>) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    if let Some(t) = token {
        req.metadata_mut()
            .insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
    req
}

/// The gRPC Admin service (`identity_cache_ttl_ms = 0`): a JWT user and an introspection user
/// are blocked with BlockUser (User: blocked, reason, time), both protocols answer blocked,
/// UnblockUser restores. ListUsers pages by `limit` / `after_id`; GetSignupCap reports a capped
/// service type (cap, used, remaining) and an uncapped one (no remaining). Missing or wrong admin
/// token: UNAUTHENTICATED; unknown user: NOT_FOUND.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn block_and_unblock_via_grpc_admin() {
    use tollgate::proto::admin_client::AdminClient;
    use tollgate::proto::{
        BlockUserRequest, GetSignupCapRequest, ListUsersRequest, UnblockUserRequest,
    };
    let jwks = JwksServer::start(Mode::Healthy).await;
    let intro = IntrospectionServer::start(Mode::Healthy).await;
    let mut opts = admin_opts(format!(
        "{}{}[service_types.capped]\nmodels = [\"*\"]\nsignup_cap_per_day = 5\n",
        jwt_table(&jwks.url(), ""),
        introspection_table(&intro.url(), "cache_ttl_secs = 0"),
    ));
    opts.auth = "identity_cache_ttl_ms = 0\nkey_cache_ttl_ms = 0".into();
    let mut s = TestServer::sqlite(opts).await;
    let mut admin = AdminClient::connect(format!("http://{}", s.grpc_addr))
        .await
        .expect("Admin client");

    intro.add_active("opaque-grpc-blockee", "grpc-blockee");
    let users = [
        (
            Creds::bearer(&good_jwt("grpc-jwt-blockee")),
            jwt_external_id("grpc-jwt-blockee"),
            "jwt",
        ),
        (
            Creds::bearer("opaque-grpc-blockee"),
            introspection_external_id("grpc-blockee"),
            "introspection",
        ),
    ];
    for (creds, ext, method) in &users {
        expect_success_both(&s, creds, "fast", "before the block").await;
        let listed = admin
            .list_users(admin_req(
                ListUsersRequest {
                    after_id: 0,
                    limit: 1000,
                },
                Some(ADMIN_TOKEN),
            ))
            .await
            .expect("ListUsers")
            .into_inner()
            .users;
        let u = listed
            .iter()
            .find(|u| &u.external_id == ext)
            .unwrap_or_else(|| panic!("{ext} not in ListUsers: {listed:?}"))
            .clone();
        assert_eq!(u.auth_method, *method);
        assert!(!u.blocked);

        let blocked = admin
            .block_user(admin_req(
                BlockUserRequest {
                    user_id: u.id,
                    reason: "grpc block".into(),
                },
                Some(ADMIN_TOKEN),
            ))
            .await
            .expect("BlockUser")
            .into_inner();
        assert!(blocked.blocked, "{blocked:?}");
        assert_eq!(blocked.blocked_reason.as_deref(), Some("grpc block"));
        assert!(blocked.blocked_at_ms.is_some(), "{blocked:?}");
        expect_both(
            &s,
            creds,
            BLOCKED,
            &format!("{method} user blocked over gRPC"),
        )
        .await;

        let unblocked = admin
            .unblock_user(admin_req(
                UnblockUserRequest { user_id: u.id },
                Some(ADMIN_TOKEN),
            ))
            .await
            .expect("UnblockUser")
            .into_inner();
        assert!(!unblocked.blocked, "{unblocked:?}");
        assert_eq!(unblocked.blocked_reason, None);
        expect_success_both(&s, creds, "fast", "unblocked over gRPC").await;
    }

    for token in [None, Some("wrong-admin-token")] {
        let st = admin
            .block_user(admin_req(
                BlockUserRequest {
                    user_id: 1,
                    reason: "x".into(),
                },
                token,
            ))
            .await
            .expect_err("BlockUser without the admin token");
        assert_eq!(st.code(), Code::Unauthenticated, "{st:?}");
        let st = admin
            .list_users(admin_req(ListUsersRequest::default(), token))
            .await
            .expect_err("ListUsers without the admin token");
        assert_eq!(st.code(), Code::Unauthenticated, "{st:?}");
        let st = admin
            .get_signup_cap(admin_req(GetSignupCapRequest {}, token))
            .await
            .expect_err("GetSignupCap without the admin token");
        assert_eq!(st.code(), Code::Unauthenticated, "{st:?}");
    }
    let st = admin
        .block_user(admin_req(
            BlockUserRequest {
                user_id: 987_654_321,
                reason: "x".into(),
            },
            Some(ADMIN_TOKEN),
        ))
        .await
        .expect_err("unknown user");
    assert_eq!(st.code(), Code::NotFound, "{st:?}");

    // Pages of one.
    let mut seen = Vec::new();
    let mut after = 0;
    for _ in 0..20 {
        let page = admin
            .list_users(admin_req(
                ListUsersRequest {
                    after_id: after,
                    limit: 1,
                },
                Some(ADMIN_TOKEN),
            ))
            .await
            .expect("ListUsers page")
            .into_inner()
            .users;
        assert!(page.len() <= 1, "{page:?}");
        let Some(u) = page.first() else { break };
        assert!(u.id > after);
        seen.push(u.id);
        after = u.id;
    }
    assert_eq!(seen.len(), 3, "alice and two provisioned users: {seen:?}");

    for i in 0..2 {
        let c = Creds::bearer(&good_jwt(&format!("grpc-capped-{i}"))).st("capped");
        let resp = http_chat(&s, &c, "fast", &new_request_id()).await;
        assert_eq!(resp.status(), 200);
    }
    let caps = admin
        .get_signup_cap(admin_req(GetSignupCapRequest {}, Some(ADMIN_TOKEN)))
        .await
        .expect("GetSignupCap")
        .into_inner()
        .service_types;
    let capped = caps
        .iter()
        .find(|c| c.service_type == "capped")
        .unwrap_or_else(|| panic!("{caps:?}"));
    assert_eq!(capped.cap_per_day, Some(5), "{capped:?}");
    assert_eq!(capped.used_24h, 2, "{capped:?}");
    assert_eq!(capped.remaining, Some(3), "{capped:?}");
    assert_eq!(capped.cap_total, None, "{capped:?}");
    assert_eq!(capped.used_total, 2, "{capped:?}");
    let default = caps
        .iter()
        .find(|c| c.service_type == "default")
        .unwrap_or_else(|| panic!("{caps:?}"));
    assert_eq!(default.cap_per_day, None, "{default:?}");
    assert_eq!(default.remaining, None, "uncapped: {default:?}");
    s.shutdown().await;
}

/// Two replicas on one PostgreSQL database with `identity_cache_ttl_ms = key_cache_ttl_ms = 300`
/// and one manual clock: a block made through replica A is answered by replica B, whose caches
/// were warm, exactly when the TTL has passed (served 299 ms after, refused at 300 ms), on both
/// protocols, for a JWT user and a key user; A refuses at once. An unblock through B reaches A
/// the same way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn block_reaches_every_replica_within_the_cache_ttl() {
    let jwks = JwksServer::start(Mode::Healthy).await;
    let Some(db) = TestDb::postgres().await else {
        return;
    };
    let db2 = shared_db(&db);
    let clock = Clock::manual();
    let mut opts = jwt_opts(&jwks.url(), "", "");
    opts.auth = "identity_cache_ttl_ms = 300\nkey_cache_ttl_ms = 300".into();
    opts.clock = Some(clock.clone());
    let mut a = TestServer::start_on(db, opts.clone()).await;
    let mut b = TestServer::start_on(db2, opts).await;
    let jwt_creds = Creds::bearer(&good_jwt("replica-blockee"));
    let (key_uid, key) = admin_user_with_key(&a, "replica-key-blockee").await;
    let key_creds = Creds::bearer(&key);
    expect_success_both(&a, &jwt_creds, "fast", "provision the JWT user").await;
    let jwt_uid = user_by_external_id(&a, &jwt_external_id("replica-blockee"))
        .await
        .id;
    let before_half = Duration::from_millis(149);
    let past_half = Duration::from_millis(2);
    let ttl = Duration::from_millis(300);

    for (uid, creds) in [(jwt_uid, &jwt_creds), (key_uid, &key_creds)] {
        for s in [&a, &b] {
            expect_success_both(s, creds, "fast", "warm the caches").await;
        }
        http_block(&a, uid, "replica test").await;
        expect_both(&a, creds, BLOCKED, "blocked at once on replica A").await;
        expect_success_both(&b, creds, "fast", "B still trusts its cache").await;
        clock.advance(before_half);
        expect_success_both(&b, creds, "fast", "B, before half the TTL").await;
        // Past half the TTL a request renews B's entry in the background: B learns of the
        // block before the TTL ends.
        clock.advance(past_half);
        until_http_status(&b, creds, BLOCKED.http, "B renews its entry").await;
        expect_both(&b, creds, BLOCKED, "B, before the TTL ends").await;
        // Every entry expires: A reads the block again, which starts its cache entry.
        clock.advance(ttl);
        expect_both(&a, creds, BLOCKED, "A, as the unblock is made").await;

        http_unblock(&b, uid).await;
        expect_success_both(&b, creds, "fast", "unblocked at once on replica B").await;
        expect_both(&a, creds, BLOCKED, "A still trusts its cache").await;
        clock.advance(before_half);
        expect_both(&a, creds, BLOCKED, "A, before half the TTL").await;
        clock.advance(past_half);
        until_http_status(&a, creds, 200, "A renews its entry").await;
        expect_success_both(&a, creds, "fast", "A, before the TTL ends").await;
        clock.advance(ttl);
    }
    a.shutdown().await;
    b.shutdown().await;
}

// =============================================================================================
// 5. service types and purposes

/// A model the service type may not use: 403 / PERMISSION_DENIED invalid_service_type_for_model
/// with `param = model`. An unknown purpose, or a missing one where it is required, or an unknown
/// service type: 400 / INVALID_ARGUMENT invalid_auth_request, with unknown label values collapsed
/// to `unknown`. No service type: the configured default. A JWT claim names the service type
/// when the request does not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_types_and_purposes() {
    let jwks = JwksServer::start(Mode::Healthy).await;
    let mut s = TestServer::sqlite(jwt_opts(
        &jwks.url(),
        "service_type_claim = \"tg_service\"",
        "[service_types.restricted]\nmodels = [\"fast\"]\n\n\
         [service_types.strict]\nmodels = [\"*\"]\npurposes = [\"audit\"]\nrequire_purpose = true\n",
    ))
    .await;
    let alice = Creds::bearer(ALICE_KEY);

    let b = expect_both_with(
        &s,
        &alice.clone().st("restricted"),
        "chatty",
        INVALID_SERVICE_TYPE_FOR_MODEL,
        Lbl {
            model: "chatty",
            service_type: "restricted",
            purpose: "none",
        },
        "restricted may use only fast",
    )
    .await;
    assert_eq!(b.http_body["error"]["param"], "model", "{}", b.http_body);
    assert_eq!(grpc_param(&b.grpc_status).as_deref(), Some("model"));
    assert_eq!(b.http_row.service_type.as_deref(), Some("restricted"));
    expect_success_both(
        &s,
        &alice.clone().st("restricted"),
        "fast",
        "restricted on fast",
    )
    .await;

    expect_both_with(
        &s,
        &alice.clone().st("batch").purpose("mining"),
        "fast",
        INVALID_AUTH_REQUEST,
        Lbl {
            model: "fast",
            service_type: "batch",
            purpose: "unknown",
        },
        "a purpose batch does not accept",
    )
    .await;
    expect_both_with(
        &s,
        &alice.clone().st("strict"),
        "fast",
        INVALID_AUTH_REQUEST,
        Lbl {
            model: "fast",
            service_type: "strict",
            purpose: "none",
        },
        "strict requires a purpose",
    )
    .await;
    // `eval` is a known purpose (of batch), but not one strict accepts.
    expect_both_with(
        &s,
        &alice.clone().st("strict").purpose("eval"),
        "fast",
        INVALID_AUTH_REQUEST,
        Lbl {
            model: "fast",
            service_type: "strict",
            purpose: "eval",
        },
        "strict accepts only audit",
    )
    .await;
    let (h, _) = expect_success_both(
        &s,
        &alice.clone().st("strict").purpose("audit"),
        "fast",
        "strict with its purpose",
    )
    .await;
    assert_eq!(h.purpose.as_deref(), Some("audit"));
    expect_both_with(
        &s,
        &alice.clone().st("no-such-service-type"),
        "fast",
        INVALID_AUTH_REQUEST,
        Lbl {
            model: "fast",
            service_type: "unknown",
            purpose: "none",
        },
        "an unknown service type",
    )
    .await;

    // No service type: the default, in the label and the ledger.
    let before = s.metrics().await;
    let (h, g) = expect_success_both(&s, &alice, "fast", "default service type").await;
    assert_eq!(
        (h.service_type.as_deref(), g.service_type.as_deref()),
        (Some("default"), Some("default"))
    );
    for p in ["http", "grpc"] {
        s.expect_delta(
            &before,
            AVAILABILITY,
            &labels(p, "success", "success", "fast", "default", "none"),
            1.0,
        )
        .await;
    }
    s.assert_delta_now(&before, AVAILABILITY, &[], 2.0).await;

    // An unknown model is labelled `unknown`.
    let rid = new_request_id();
    let resp = http_chat(&s, &alice, "no-such-model-xyz", &rid).await;
    assert_eq!(resp.status(), 404);
    let row = s.ledger_row(&rid).await;
    assert_eq!(row.reason, "model_not_found");
    let m = s.metrics().await;
    assert!(
        !m.contains("no-such-model-xyz")
            && !m.contains("no-such-service-type")
            && !m.contains("mining"),
        "caller-chosen label values leaked into metrics"
    );

    // The service type from the JWT claim when the request names none; the header wins.
    let mut cl = claims("claimed-restricted");
    cl["tg_service"] = json!("restricted");
    let claimed = Creds::bearer(&jwt(Signer::Rsa1, &cl));
    expect_both_with(
        &s,
        &claimed,
        "chatty",
        INVALID_SERVICE_TYPE_FOR_MODEL,
        Lbl {
            model: "chatty",
            service_type: "restricted",
            purpose: "none",
        },
        "service type from the JWT claim",
    )
    .await;
    let u = user_by_external_id(&s, &jwt_external_id("claimed-restricted")).await;
    assert_eq!(u.service_type.as_deref(), Some("restricted"));
    expect_success_both(
        &s,
        &claimed.clone().st("default"),
        "chatty",
        "the header names the service type",
    )
    .await;
    // Last (a known failure would hide the checks above): the label follows the service type
    // the claim named, collapsed to `unknown`.
    let mut bogus = claims("claimed-bogus");
    bogus["tg_service"] = json!("bogus-service");
    expect_both_with(
        &s,
        &Creds::bearer(&jwt(Signer::Rsa1, &bogus)),
        "fast",
        INVALID_AUTH_REQUEST,
        Lbl {
            model: "fast",
            service_type: "unknown",
            purpose: "none",
        },
        "an unknown service type from the JWT claim",
    )
    .await;
    s.shutdown().await;
}

// =============================================================================================
// 6. request limits

/// A raw HTTP/1.1 exchange: writes `head` then each of `parts`, then reads one response (status,
/// body) with a deadline. A connection cut after the response is fine.
async fn raw_http(addr: SocketAddr, head: String, parts: Vec<Vec<u8>>) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut sock = tokio::net::TcpStream::connect(addr).await.expect("connect");
    sock.set_nodelay(true).ok();
    sock.write_all(head.as_bytes()).await.expect("write head");
    for p in parts {
        // The server may stop reading (and answer) before all of it is sent.
        if sock.write_all(&p).await.is_err() {
            break;
        }
    }
    let mut buf = Vec::new();
    let read = async {
        let mut chunk = [0u8; 8192];
        loop {
            if let Some(end) = find(&buf, b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&buf[..end]).to_string();
                let len = head
                    .lines()
                    .find_map(|l| {
                        let (k, v) = l.split_once(':')?;
                        k.trim()
                            .eq_ignore_ascii_case("content-length")
                            .then(|| v.trim().parse::<usize>().ok())?
                    })
                    .unwrap_or(0);
                if buf.len() >= end + 4 + len {
                    return;
                }
            }
            match sock.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(5), read)
        .await
        .expect("no response within 5 s: the server waited for the body");
    let text = String::from_utf8_lossy(&buf).to_string();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no HTTP response: {text:?}"));
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn assert_error_code(body: &str, reason: &str) -> Value {
    let v: Value =
        serde_json::from_str(body).unwrap_or_else(|e| panic!("error body not JSON ({e}): {body}"));
    assert_eq!(v["error"]["code"], reason, "{v}");
    v
}

/// `max_body_bytes = 4096`. A Content-Length of 10 MB is refused with 413 payload_too_large
/// before any body byte is sent; a chunked body growing past the cap is refused without its end;
/// a gRPC Complete / StreamComplete message over the limit is RESOURCE_EXHAUSTED
/// payload_too_large. Each is counted once as `excluded` with its ledger row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_size_limits() {
    let mut s = TestServer::sqlite(Opts {
        server: "max_body_bytes = 4096".into(),
        ..Opts::default()
    })
    .await;
    let before = s.metrics().await;

    let rid_cl = new_request_id();
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {ALICE_KEY}\r\n\
         Content-Type: application/json\r\nX-Request-Id: {rid_cl}\r\nContent-Length: 10000000\r\n\r\n",
        s.http
    );
    let (status, body) = raw_http(s.http, head, Vec::new()).await;
    assert_eq!(status, 413, "declared 10 MB: {body}");
    assert_error_code(&body, "payload_too_large");

    let rid_ch = new_request_id();
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {ALICE_KEY}\r\n\
         Content-Type: application/json\r\nX-Request-Id: {rid_ch}\r\nTransfer-Encoding: chunked\r\n\r\n",
        s.http
    );
    let mut parts = Vec::new();
    let start = br#"{"model":"fast","messages":[{"role":"user","content":""#.to_vec();
    parts.push(format!("{:x}\r\n", start.len()).into_bytes());
    parts.push([start, b"\r\n".to_vec()].concat());
    for _ in 0..6 {
        let data = vec![b'x'; 1024];
        parts.push(format!("{:x}\r\n", data.len()).into_bytes());
        parts.push([data, b"\r\n".to_vec()].concat());
    }
    // No terminating chunk: the body never ends.
    let (status, body) = raw_http(s.http, head, parts).await;
    assert_eq!(status, 413, "chunked body past the cap: {body}");
    assert_error_code(&body, "payload_too_large");

    let rid_g = new_request_id();
    let big = "y".repeat(10_000);
    let st = s
        .grpc()
        .await
        .complete(grpc_req(
            complete_request("fast", &big),
            &Creds::bearer(ALICE_KEY),
            Some(&rid_g),
        ))
        .await
        .expect_err("oversized Complete");
    expect_grpc_error(&st, PAYLOAD_TOO_LARGE.grpc, PAYLOAD_TOO_LARGE.reason);
    let rid_gs = new_request_id();
    let st = match s
        .grpc()
        .await
        .stream_complete(grpc_req(
            complete_request("fast", &big),
            &Creds::bearer(ALICE_KEY),
            Some(&rid_gs),
        ))
        .await
    {
        Err(st) => st,
        Ok(resp) => resp
            .into_inner()
            .message()
            .await
            .expect_err("oversized StreamComplete"),
    };
    expect_grpc_error(&st, Code::ResourceExhausted, "payload_too_large");

    for (p, n) in [("http", 2.0), ("grpc", 2.0)] {
        s.expect_delta(
            &before,
            AVAILABILITY,
            &[
                ("protocol", p),
                ("outcome", "excluded"),
                ("reason", "payload_too_large"),
            ],
            n,
        )
        .await;
    }
    s.assert_delta_now(&before, AVAILABILITY, &[], 4.0).await;
    for rid in [&rid_cl, &rid_ch, &rid_g, &rid_gs] {
        let row = s.ledger_row(rid).await;
        assert_eq!(
            (row.outcome.as_str(), row.reason.as_str()),
            ("excluded", "payload_too_large"),
            "{row:?}"
        );
    }
    assert!(
        s.upstream.requests().is_empty(),
        "nothing reached the upstream"
    );
    s.shutdown().await;
}

/// Malformed JSON, wrong types and empty messages: 400 / INVALID_ARGUMENT invalid_request with
/// `param` naming the field (HTTP error body, gRPC ErrorInfo metadata), counted once each, with
/// ledger rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_requests_name_the_param() {
    let mut s = TestServer::sqlite(Opts::default()).await;
    let before = s.metrics().await;
    let msgs = json!([{"role": "user", "content": "hi"}]);
    let cases: Vec<(String, Option<&str>)> = vec![
        (r#"{"model": "fast", "messages": ["#.into(), None),
        ("[1, 2, 3]".into(), None),
        (
            json!({"model": 5, "messages": msgs}).to_string(),
            Some("model"),
        ),
        (json!({"messages": msgs}).to_string(), Some("model")),
        (
            json!({"model": "fast", "messages": "hi"}).to_string(),
            Some("messages"),
        ),
        (
            json!({"model": "fast", "messages": []}).to_string(),
            Some("messages"),
        ),
        (json!({"model": "fast"}).to_string(), Some("messages")),
        (
            json!({"model": "fast", "messages": [{"content": "x"}]}).to_string(),
            Some("messages[0].role"),
        ),
        (
            json!({"model": "fast", "messages": msgs, "max_tokens": "ten"}).to_string(),
            Some("max_tokens"),
        ),
        (
            json!({"model": "fast", "messages": msgs, "stream": "yes"}).to_string(),
            Some("stream"),
        ),
        (
            json!({"model": "fast", "messages": msgs, "temperature": "hot"}).to_string(),
            Some("temperature"),
        ),
    ];
    let mut rids = Vec::new();
    for (raw, param) in &cases {
        let rid = new_request_id();
        let resp = s
            .client
            .post(s.url("/v1/chat/completions"))
            .bearer_auth(ALICE_KEY)
            .header("content-type", "application/json")
            .header("x-request-id", &rid)
            .body(raw.clone())
            .send()
            .await
            .unwrap();
        let body = expect_http_error(resp, 400, "invalid_request").await;
        if let Some(p) = param {
            assert_eq!(body["error"]["param"], *p, "{raw}: {body}");
        }
        rids.push(rid);
    }
    let mut grpc_cases: Vec<(CompleteRequest, &str)> = Vec::new();
    let mut r = complete_request("fast", "x");
    r.messages.clear();
    grpc_cases.push((r, "messages"));
    grpc_cases.push((complete_request("", "x"), "model"));
    let mut r = complete_request("fast", "x");
    r.extra_json = Some("{not json".into());
    grpc_cases.push((r, "extra_json"));
    let mut r = complete_request("fast", "x");
    r.messages[0].role = String::new();
    grpc_cases.push((r, "messages[0].role"));
    let n_grpc = grpc_cases.len();
    for (req, param) in grpc_cases {
        let rid = new_request_id();
        let st = s
            .grpc()
            .await
            .complete(grpc_req(req, &Creds::bearer(ALICE_KEY), Some(&rid)))
            .await
            .expect_err("invalid gRPC request");
        expect_grpc_error(&st, Code::InvalidArgument, "invalid_request");
        assert_eq!(grpc_param(&st).as_deref(), Some(param), "{st:?}");
        rids.push(rid);
    }
    for (p, n) in [("http", cases.len()), ("grpc", n_grpc)] {
        s.expect_delta(
            &before,
            AVAILABILITY,
            &[
                ("protocol", p),
                ("outcome", "excluded"),
                ("reason", "invalid_request"),
            ],
            n as f64,
        )
        .await;
    }
    s.assert_delta_now(&before, AVAILABILITY, &[], (cases.len() + n_grpc) as f64)
        .await;
    for rid in &rids {
        let row = s.ledger_row(rid).await;
        assert_eq!(
            (row.outcome.as_str(), row.reason.as_str()),
            (INVALID_REQUEST.outcome, INVALID_REQUEST.reason)
        );
    }
    s.shutdown().await;
}

// =============================================================================================
// 7. Authorize

async fn http_authorize(s: &TestServer, c: &Creds, body: Option<Value>) -> (u16, Value) {
    let mut rb = with_creds(s.client.post(s.url("/v1/authorize")), c, None);
    if let Some(b) = body {
        rb = rb.json(&b);
    }
    let resp = rb.send().await.unwrap();
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap_or_default();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

/// HTTP `POST /v1/authorize` and gRPC `Authorize` return the principal (static key, JWT first
/// sight provisioning, service type and purpose), refuse with the same reasons as chat, count
/// `tollgate_authorize_total{protocol, result}` and never touch the chat availability counter.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authorize_on_both_protocols() {
    let jwks = JwksServer::start(Mode::Healthy).await;
    let mut s = TestServer::sqlite(jwt_opts(
        &jwks.url(),
        "",
        "[service_types.restricted]\nmodels = [\"fast\"]\n",
    ))
    .await;
    let before = s.metrics().await;
    let alice = Creds::bearer(ALICE_KEY);

    let (st, p) = http_authorize(&s, &alice, Some(json!({"model": "fast"}))).await;
    assert_eq!(st, 200, "{p}");
    for k in [
        "user_id",
        "external_id",
        "auth_method",
        "service_type",
        "purpose",
        "allowed_models",
        "key_id",
        "remaining_budget_micros",
    ] {
        assert!(p.get(k).is_some(), "principal lacks {k}: {p}");
    }
    assert!(p["user_id"].is_i64() && p["key_id"].is_i64(), "{p}");
    assert_eq!(p["auth_method"], "static_key");
    assert_eq!(p["service_type"], "default");
    assert!(p["purpose"].is_null());
    assert_eq!(p["allowed_models"], json!(["*"]));
    let alice_id = p["user_id"].as_i64().unwrap();

    let (st, p2) = http_authorize(&s, &alice, None).await;
    assert_eq!(st, 200, "no body checks the credential only: {p2}");
    assert_eq!(p2["user_id"], alice_id);

    let g = s
        .grpc()
        .await
        .authorize(grpc_req(
            AuthorizeRequest {
                model: "fast".into(),
            },
            &alice.clone().st("batch").purpose("eval"),
            None,
        ))
        .await
        .expect("gRPC Authorize")
        .into_inner()
        .principal
        .expect("principal");
    assert_eq!(g.user_id, alice_id);
    assert_eq!(g.auth_method, "static_key");
    assert_eq!(g.service_type, "batch");
    assert_eq!(g.purpose.as_deref(), Some("eval"));
    assert!(g.key_id.is_some());

    // First sight through Authorize provisions the JWT user.
    let token = good_jwt("authorize-first");
    let jc = Creds::bearer(&token);
    let (st, p) = http_authorize(&s, &jc, Some(json!({"model": "fast"}))).await;
    assert_eq!(st, 200, "{p}");
    assert_eq!(p["auth_method"], "jwt");
    assert_eq!(p["external_id"], jwt_external_id("authorize-first"));
    assert!(p["key_id"].is_null());
    let g = s
        .grpc()
        .await
        .authorize(grpc_req(AuthorizeRequest::default(), &jc, None))
        .await
        .expect("gRPC Authorize (JWT)")
        .into_inner()
        .principal
        .unwrap();
    assert_eq!(g.user_id, p["user_id"].as_i64().unwrap());
    assert_eq!(g.auth_method, "jwt");
    assert_eq!(g.key_id, None);
    s.expect_delta(&before, SIGNUPS, &[("auth_method", "jwt")], 1.0)
        .await;

    // Refusals: the same reasons as chat.
    let (st, e) = http_authorize(&s, &Creds::none(), Some(json!({"model": "fast"}))).await;
    assert_eq!(
        (st, &e["error"]["code"]),
        (401, &json!("auth_rejected")),
        "{e}"
    );
    let (st, e) = http_authorize(
        &s,
        &alice.clone().st("restricted"),
        Some(json!({"model": "chatty"})),
    )
    .await;
    assert_eq!(
        (st, &e["error"]["code"]),
        (403, &json!("invalid_service_type_for_model")),
        "{e}"
    );
    let resp = s
        .client
        .post(s.url("/v1/authorize"))
        .bearer_auth(ALICE_KEY)
        .header("content-type", "application/json")
        .body("{\"model\": ")
        .send()
        .await
        .unwrap();
    expect_http_error(resp, 400, "invalid_request").await;
    let (st, e) = http_authorize(&s, &alice, Some(json!({"model": "no-such-model"}))).await;
    assert_eq!(
        (st, &e["error"]["code"]),
        (404, &json!("model_not_found")),
        "{e}"
    );
    let (st, e) = http_authorize(&s, &Creds::raw("Basic eDp5"), None).await;
    assert_eq!(
        (st, &e["error"]["code"]),
        (400, &json!("invalid_auth_request")),
        "{e}"
    );
    let status = s
        .grpc()
        .await
        .authorize(grpc_req(
            AuthorizeRequest {
                model: "chatty".into(),
            },
            &alice.clone().st("restricted"),
            None,
        ))
        .await
        .expect_err("restricted may not use chatty");
    expect_grpc_error(
        &status,
        Code::PermissionDenied,
        "invalid_service_type_for_model",
    );
    let status = s
        .grpc()
        .await
        .authorize(grpc_req(AuthorizeRequest::default(), &Creds::none(), None))
        .await
        .expect_err("no credential");
    expect_grpc_error(&status, Code::Unauthenticated, "auth_rejected");

    let count = |p: &'static str, r: &'static str| [("protocol", p), ("result", r)];
    s.expect_delta(&before, AUTHORIZE, &count("http", "success"), 3.0)
        .await;
    s.expect_delta(&before, AUTHORIZE, &count("grpc", "success"), 2.0)
        .await;
    s.expect_delta(&before, AUTHORIZE, &count("http", "auth_rejected"), 1.0)
        .await;
    s.expect_delta(
        &before,
        AUTHORIZE,
        &count("http", "invalid_service_type_for_model"),
        1.0,
    )
    .await;
    s.expect_delta(
        &before,
        AUTHORIZE,
        &count("http", "invalid_auth_request"),
        1.0,
    )
    .await;
    s.expect_delta(
        &before,
        AUTHORIZE,
        &count("grpc", "invalid_service_type_for_model"),
        1.0,
    )
    .await;
    s.expect_delta(&before, AUTHORIZE, &count("grpc", "auth_rejected"), 1.0)
        .await;
    s.assert_delta_now(&before, AVAILABILITY, &[], 0.0).await;
    s.shutdown().await;
}

// =============================================================================================
// 8. secrets never in logs

/// `tollgate serve` as a child process whose stdout and stderr are captured whole; killed when
/// dropped.
struct LoggedChild {
    child: std::process::Child,
    log: Arc<Mutex<String>>,
    readers: Vec<std::thread::JoinHandle<()>>,
    http: SocketAddr,
    grpc: SocketAddr,
}

impl Drop for LoggedChild {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl LoggedChild {
    /// Blocking: starts the binary with `TOLLGATE_LOG=trace` and waits for its listening line.
    fn start(config: &std::path::Path) -> LoggedChild {
        use std::io::{BufRead, BufReader};
        use std::process::{Command, Stdio};
        let bin = env!("CARGO_BIN_EXE_tollgate");
        let mut cmd = Command::new(bin);
        cmd.arg("serve").arg("--config").arg(config);
        for (k, _) in std::env::vars() {
            if k.starts_with("TOLLGATE_") {
                cmd.env_remove(k);
            }
        }
        cmd.env("TOLLGATE_LOG", "trace")
            .env("RUST_LOG", "trace")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {bin}: {e}"));
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let mut readers = Vec::new();
        let pipes: Vec<Box<dyn std::io::Read + Send>> = vec![
            Box::new(child.stdout.take().unwrap()),
            Box::new(child.stderr.take().unwrap()),
        ];
        for pipe in pipes {
            let log = log.clone();
            let tx = tx.clone();
            readers.push(std::thread::spawn(move || {
                let mut r = BufReader::new(pipe);
                let mut line = Vec::new();
                loop {
                    line.clear();
                    match r.read_until(b'\n', &mut line) {
                        Ok(0) | Err(_) => break,
                        Ok(_) => {
                            let text = String::from_utf8_lossy(&line).into_owned();
                            if let Some(addrs) = crate::common::process::listening_addrs(&text) {
                                let _ = tx.send(addrs);
                            }
                            log.lock().unwrap().push_str(&text);
                        }
                    }
                }
            }));
        }
        drop(tx);
        let (http, grpc) = match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(a) => a,
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "tollgate did not log where it listens within 30 s:\n{}",
                    log.lock().unwrap()
                );
            }
        };
        LoggedChild {
            child,
            log,
            readers,
            http,
            grpc,
        }
    }

    /// Blocking: SIGTERM, wait (at most 10 s, then kill), and the whole log.
    fn stop(mut self) -> String {
        let pid = self.child.id().to_string();
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status();
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(10) {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
        let log = self.log.lock().unwrap().clone();
        log
    }
}

/// An upstream that answers every request 401 with the presented key in its error message (as
/// some OpenAI-compatible servers do).
async fn key_echoing_upstream() -> SocketAddr {
    use axum::http::HeaderMap;
    use axum::response::IntoResponse;
    let app = axum::Router::new().fallback(|headers: HeaderMap| async move {
        let auth = headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        (
            axum::http::StatusCode::UNAUTHORIZED,
            [("content-type", "application/json")],
            json!({"error": {"message": format!("Incorrect API key provided: {auth}"), "type": "invalid_request_error", "param": null, "code": "invalid_api_key"}}).to_string(),
        )
            .into_response()
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    addr
}

/// The real binary at `trace`: API keys (static, admin-made, unknown), JWTs (valid, forged,
/// expired, with the JWKS failing), introspection tokens (active, inactive, with the endpoint
/// failing), the introspection client secret, the admin token (right and wrong), Basic
/// credentials, and upstream keys (one echoed back by its upstream) never appear in its output,
/// in either log format. Every call's HTTP status and gRPC outcome is asserted, so a call that
/// failed early (before the secret was handled) cannot pass for one that was logged cleanly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_never_appear_in_logs() {
    secrets_never_appear_in_logs_of("text").await
}

/// [`secrets_never_appear_in_logs`] with `[log] format = "json"`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_never_appear_in_json_logs() {
    secrets_never_appear_in_logs_of("json").await
}

async fn secrets_never_appear_in_logs_of(format: &str) {
    let dir = tempfile::tempdir().unwrap();
    let jwks = JwksServer::start(Mode::Healthy).await;
    let intro = IntrospectionServer::start(Mode::Healthy).await;
    let upstream = crate::common::upstream::Upstream::start().await;
    let echo = key_echoing_upstream().await;
    let leaky_key = "sk-leaky-upstream-secret-94c1d2e8";
    let wrong_admin = "tg-admin-wrong-secret-3391aa";
    let basic_secret = "basic-password-secret-77e0";
    let db = format!("sqlite://{}", dir.path().join("t.db").display());
    let opts = Opts {
        server: format!("admin_token = \"{ADMIN_TOKEN}\""),
        extra: format!(
            "{}{}[providers.leaky]\nkind = \"openai\"\nbase_url = \"http://{echo}/v1\"\n\
             keys = [\"{leaky_key}\"]\n\n[aliases.leaky]\ndescription = \"a key-echoing \
             upstream first\"\nchain = [\"leaky/ok\", \"up2/ok\"]\n",
            jwt_table(&jwks.url(), "jwks_min_refresh_secs = 0\ntimeout_ms = 500"),
            introspection_table(&intro.url(), "timeout_ms = 500"),
        ),
        ..Opts::default()
    };
    let text = config_toml(&db, &upstream.base_url(), &opts).replace(
        "[log]\nlevel = \"warn\"",
        &format!("[log]\nlevel = \"trace\"\nformat = \"{format}\""),
    );
    assert!(text.contains("level = \"trace\""));
    let path = dir.path().join("tollgate.toml");
    std::fs::write(&path, &text).unwrap();
    let child = blocking(move || LoggedChild::start(&path)).await;
    let base = format!("http://{}", child.http);
    let child_http = child.http;
    let child_grpc = child.grpc;
    let client = http_client();
    let mut grpc =
        tollgate::proto::gateway_client::GatewayClient::connect(format!("http://{}", child.grpc))
            .await
            .expect("connect to the child");

    let mut secrets: Vec<(String, String)> = vec![
        ("admin token".into(), ADMIN_TOKEN.into()),
        ("wrong admin token".into(), wrong_admin.into()),
        ("static key".into(), ALICE_KEY.into()),
        (
            "upstream key".into(),
            crate::common::upstream::UPSTREAM_KEY.into(),
        ),
        ("echoed upstream key".into(), leaky_key.into()),
        (
            "introspection client secret".into(),
            INTROSPECTION_SECRET.into(),
        ),
        ("Basic password".into(), basic_secret.into()),
    ];
    {
        use base64::Engine;
        let b = base64::engine::general_purpose::STANDARD;
        secrets.push((
            "introspection Basic credentials".into(),
            b.encode(format!("{INTROSPECTION_CLIENT_ID}:{INTROSPECTION_SECRET}")),
        ));
        secrets.push((
            "caller Basic credentials".into(),
            b.encode(format!("alice:{basic_secret}")),
        ));
    }

    // Admin: a user and a key (the key is a secret), with the right and a wrong token.
    let resp = client
        .post(format!("{base}/admin/users"))
        .bearer_auth(ADMIN_TOKEN)
        .json(&json!({"external_id": "log-user"}))
        .send()
        .await
        .unwrap();
    assert!(resp.status().is_success(), "create user");
    let uid = resp.json::<Value>().await.unwrap()["id"].as_i64().unwrap();
    let resp = client
        .post(format!("{base}/admin/keys"))
        .bearer_auth(ADMIN_TOKEN)
        .json(&json!({"user_id": uid}))
        .send()
        .await
        .unwrap();
    let made_key = resp.json::<Value>().await.unwrap()["key"]
        .as_str()
        .expect("key")
        .to_owned();
    secrets.push(("admin-made API key".into(), made_key.clone()));
    let resp = client
        .get(format!("{base}/admin/users?limit=5"))
        .bearer_auth(wrong_admin)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);

    let mut expired = claims("log-expired");
    expired["exp"] = json!(unix_now() - 3600);
    let valid_jwt = good_jwt("log-jwt");
    let forged_jwt = jwt_with_kid(Signer::Rsa2, "rsa-1", &claims("log-forged"));
    let expired_jwt = jwt(Signer::Rsa1, &expired);
    intro.add_active("opaque-log-active-secret-1", "log-intro");
    intro.add_answer("opaque-log-inactive-secret-2", json!({"active": false}));
    let calls: Vec<(String, String, &'static str)> = vec![
        ("static key".into(), format!("Bearer {ALICE_KEY}"), "fast"),
        ("made key".into(), format!("Bearer {made_key}"), "fast"),
        (
            "unknown key".into(),
            "Bearer tg-unknown-key-secret-5521".into(),
            "fast",
        ),
        ("valid JWT".into(), format!("Bearer {valid_jwt}"), "fast"),
        ("forged JWT".into(), format!("Bearer {forged_jwt}"), "fast"),
        (
            "expired JWT".into(),
            format!("Bearer {expired_jwt}"),
            "fast",
        ),
        (
            "active token".into(),
            "Bearer opaque-log-active-secret-1".into(),
            "fast",
        ),
        (
            "inactive token".into(),
            "Bearer opaque-log-inactive-secret-2".into(),
            "fast",
        ),
        (
            "Basic".into(),
            format!("Basic {}", secrets.last().unwrap().1),
            "fast",
        ),
        (
            "echoing upstream".into(),
            format!("Bearer {ALICE_KEY}"),
            "leaky",
        ),
    ];
    secrets.push(("unknown key".into(), "tg-unknown-key-secret-5521".into()));
    for t in [&valid_jwt, &forged_jwt, &expired_jwt] {
        secrets.push(("JWT".into(), t.clone()));
        secrets.push((
            "JWT signature".into(),
            t.rsplit('.').next().unwrap().to_owned(),
        ));
    }
    secrets.push((
        "introspection token".into(),
        "opaque-log-active-secret-1".into(),
    ));
    secrets.push((
        "introspection token".into(),
        "opaque-log-inactive-secret-2".into(),
    ));

    let run = |calls: Vec<(String, String, &'static str)>| {
        let client = client.clone();
        let mut grpc = grpc.clone();
        async move {
            let mut statuses = Vec::new();
            for (what, auth, model) in calls {
                let c = Creds::raw(&auth);
                let resp = http_chat_on(&client, child_http, &c, model, &new_request_id()).await;
                let h = resp.status().as_u16();
                let g = grpc
                    .complete(grpc_req(complete_request(model, "log"), &c, None))
                    .await
                    .map(|_| "OK".to_string())
                    .unwrap_or_else(|s| format!("{:?}/{}", s.code(), grpc_reason(&s)));
                statuses.push((what, h, g));
            }
            statuses
        }
    };
    let statuses = run(calls).await;
    let get = |name: &str| statuses.iter().find(|s| s.0 == name).unwrap().1;
    for (name, want) in [
        ("static key", 200),
        ("made key", 200),
        ("unknown key", 401),
        ("valid JWT", 200),
        ("forged JWT", 401),
        ("expired JWT", 401),
        ("active token", 200),
        ("inactive token", 401),
        ("Basic", 400),
        ("echoing upstream", 200),
    ] {
        assert_eq!(get(name), want, "{name}: {statuses:?}");
        let grpc_want = match want {
            200 => "OK",
            401 => "Unauthenticated/auth_rejected",
            _ => "InvalidArgument/invalid_auth_request",
        };
        let g = &statuses.iter().find(|s| s.0 == name).unwrap().2;
        assert_eq!(g, grpc_want, "{name} over gRPC: {statuses:?}");
    }

    // The verifiers fail: a JWT with a kid the gateway must fetch, a new opaque token.
    jwks.set_mode(Mode::Status500);
    intro.set_mode(Mode::Garbage);
    let rotated_jwt = jwt(Signer::Rsa2, &claims("log-rotated"));
    secrets.push(("JWT (JWKS failing)".into(), rotated_jwt.clone()));
    intro.add_active("opaque-log-outage-secret-3", "log-outage");
    secrets.push((
        "introspection token (endpoint failing)".into(),
        "opaque-log-outage-secret-3".into(),
    ));
    let statuses2 = run(vec![
        (
            "JWKS failing".into(),
            format!("Bearer {rotated_jwt}"),
            "fast",
        ),
        (
            "introspection failing".into(),
            "Bearer opaque-log-outage-secret-3".into(),
            "fast",
        ),
    ])
    .await;
    for (what, h, g) in &statuses2 {
        assert_eq!(
            (*h, g.as_str()),
            (503, "Unavailable/auth_system_failure"),
            "{what}"
        );
    }

    // Authorize and ListModels with secrets too; the gRPC Admin with the right and a wrong token.
    let (st, _) = {
        let resp = client
            .post(format!("{base}/v1/authorize"))
            .bearer_auth(&valid_jwt)
            .json(&json!({"model": "fast"}))
            .send()
            .await
            .unwrap();
        (resp.status().as_u16(), ())
    };
    assert_eq!(st, 200);
    let mut admin =
        tollgate::proto::admin_client::AdminClient::connect(format!("http://{}", child_grpc))
            .await
            .unwrap();
    for token in [ADMIN_TOKEN, wrong_admin] {
        let mut req = tonic::Request::new(tollgate::proto::ListUsersRequest::default());
        req.metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
        let got = admin
            .list_users(req)
            .await
            .map(|_| ())
            .map_err(|s| s.code());
        let want = if token == ADMIN_TOKEN {
            Ok(())
        } else {
            Err(tonic::Code::Unauthenticated)
        };
        assert_eq!(
            got, want,
            "gRPC ListUsers with the right / a wrong admin token"
        );
    }
    grpc.authorize(grpc_req(
        AuthorizeRequest::default(),
        &Creds::bearer(&made_key),
        None,
    ))
    .await
    .expect("gRPC Authorize with the made key");
    let resp = client
        .get(format!("{base}/v1/models"))
        .bearer_auth(&made_key)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "/v1/models with the made key");

    let log = blocking(move || child.stop()).await;
    eprintln!(
        "captured {} log lines; statuses {statuses:?} {statuses2:?}",
        log.lines().count()
    );
    assert!(
        log.contains("tollgate listening") && log.contains("user provisioned"),
        "the log was captured, request-time lines included:\n{log}"
    );
    assert!(
        log.lines().count() > 20,
        "trace logging was on (only {} lines):\n{log}",
        log.lines().count()
    );
    let mut leaks = Vec::new();
    for (what, secret) in &secrets {
        if log.contains(secret.as_str()) {
            let lines: Vec<&str> = log
                .lines()
                .filter(|l| l.contains(secret.as_str()))
                .take(3)
                .collect();
            leaks.push(format!("{what} ({secret}):\n    {}", lines.join("\n    ")));
        }
    }
    assert!(
        leaks.is_empty(),
        "secrets in the process output ({} log lines; statuses {statuses:?} {statuses2:?}):\n{}",
        log.lines().count(),
        leaks.join("\n")
    );
}
