//! Routing end to end (issue 6): aliases with ordered fallback chains, provider health, and
//! configuration reload.
//!
//! Every upstream here is a real HTTP server of its own on a random loopback port (a
//! [`Scripted`] upstream whose behaviour the test sets and can change: a good answer, a fixed
//! error status, a stall, a stream cut or stalled after its first chunk), plus a port that
//! refuses connections. Each test asks which upstream saw which request, what the caller got
//! (HTTP status and `X-Tollgate-Resolved-Model`, gRPC code and `x-tollgate-resolved-model`),
//! and how `fallback_total`, `alias_resolved_total`, `provider_healthy` and the availability
//! counter moved. The reload tests run the real binary as a child process.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::common::process::Process;
use crate::common::*;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use futures_util::stream::{self, StreamExt};
use serde_json::{json, Value};
use tollgate::clock::Clock;
use tollgate::proto::admin_client::AdminClient;
use tollgate::proto::{
    CompleteChunk, CompleteResponse, GetHealthRequest, ListAliasesRequest, ReloadConfigRequest,
};
use tonic::Code;

const ADMIN_TOKEN: &str = "tg-admin-routing-test-0123456789";
const FALLBACK: &str = "tollgate_fallback_total";
const ALIAS_RESOLVED: &str = "tollgate_alias_resolved_total";
const PROVIDER_HEALTHY: &str = "tollgate_provider_healthy";
const RELOADS: &str = "tollgate_config_reloads_total";
/// Usage the scripted upstreams report: (prompt, completion).
const SCRIPTED_USAGE: (i64, i64) = (10, 3);

// =============================================================================================
// A scripted upstream

/// What a [`Scripted`] upstream does with the next request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// chat.completion with content `answer from NAME`, or (streaming) chunks `NAME-0`..`NAME-2`,
    /// a usage chunk when asked for, `[DONE]`.
    Ok,
    /// This status with an OpenAI error body `NAME says STATUS`; a 429 carries `Retry-After: 30`.
    Status(u16),
    /// Never answers.
    Stall,
    /// 200, SSE chunk `NAME-0`, then the connection is cut.
    CutAfterFirst,
    /// 200, SSE chunk `NAME-0`, then nothing more.
    StallAfterFirst,
}

struct ScriptedState {
    name: String,
    mode: Mutex<Mode>,
    /// Bodies of the requests received, in order.
    seen: Mutex<Vec<Value>>,
}

/// An OpenAI-compatible upstream of its own, on its own port.
#[derive(Clone)]
struct Scripted {
    addr: SocketAddr,
    state: Arc<ScriptedState>,
}

impl Scripted {
    async fn start(name: &str, mode: Mode) -> Scripted {
        let state = Arc::new(ScriptedState {
            name: name.to_owned(),
            mode: Mutex::new(mode),
            seen: Mutex::new(Vec::new()),
        });
        let app = axum::Router::new()
            .fallback(scripted_handler)
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind scripted upstream");
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Scripted { addr, state }
    }

    fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    fn set(&self, mode: Mode) {
        *self.state.mode.lock().unwrap() = mode;
    }

    fn count(&self) -> usize {
        self.state.seen.lock().unwrap().len()
    }

    /// Whether a request whose messages contain `marker` reached this upstream.
    fn saw(&self, marker: &str) -> bool {
        self.state
            .seen
            .lock()
            .unwrap()
            .iter()
            .any(|b| b["messages"].to_string().contains(marker))
    }

    fn answer(&self) -> String {
        format!("answer from {}", self.state.name)
    }

    fn stream_content(&self) -> String {
        (0..3).map(|i| format!("{}-{i}", self.state.name)).collect()
    }
}

fn sse_chunk(name: &str, content: Option<&str>, finish: Option<&str>) -> Bytes {
    let delta = content.map_or(json!({}), |c| json!({"content": c}));
    let v = json!({
        "id": format!("chatcmpl-{name}"),
        "object": "chat.completion.chunk",
        "created": 1_700_000_000,
        "model": format!("{name}-upstream-name"),
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]
    });
    Bytes::from(format!("data: {v}\n\n"))
}

fn sse_response(body: Body) -> Response {
    Response::builder()
        .status(200)
        .header("content-type", "text/event-stream")
        .body(body)
        .unwrap()
}

async fn scripted_handler(State(st): State<Arc<ScriptedState>>, body: Bytes) -> Response {
    let req: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let streaming = req["stream"].as_bool().unwrap_or(false);
    let include_usage = req
        .pointer("/stream_options/include_usage")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    st.seen.lock().unwrap().push(req);
    let mode = *st.mode.lock().unwrap();
    let name = st.name.clone();
    match mode {
        Mode::Status(code) => {
            let body = json!({"error": {
                "message": format!("{name} says {code}"),
                "type": "scripted_error", "param": null, "code": "scripted"
            }});
            let mut r = (
                StatusCode::from_u16(code).unwrap(),
                [("content-type", "application/json")],
                body.to_string(),
            )
                .into_response();
            if code == 429 {
                r.headers_mut()
                    .insert("retry-after", HeaderValue::from_static("30"));
            }
            r
        }
        Mode::Stall => std::future::pending().await,
        Mode::Ok if !streaming => {
            let v = json!({
                "id": format!("chatcmpl-{name}"),
                "object": "chat.completion",
                "created": 1_700_000_000,
                "model": format!("{name}-upstream-name"),
                "choices": [{
                    "index": 0,
                    "message": {"role": "assistant", "content": format!("answer from {name}")},
                    "finish_reason": "stop"
                }],
                "usage": {"prompt_tokens": SCRIPTED_USAGE.0, "completion_tokens": SCRIPTED_USAGE.1,
                          "total_tokens": SCRIPTED_USAGE.0 + SCRIPTED_USAGE.1}
            });
            (
                StatusCode::OK,
                [("content-type", "application/json")],
                v.to_string(),
            )
                .into_response()
        }
        Mode::Ok => {
            let mut parts: Vec<Bytes> = (0..3)
                .map(|i| {
                    let finish = (i == 2).then_some("stop");
                    sse_chunk(&name, Some(&format!("{name}-{i}")), finish)
                })
                .collect();
            if include_usage {
                let v = json!({
                    "id": format!("chatcmpl-{name}"), "object": "chat.completion.chunk",
                    "created": 1_700_000_000, "model": format!("{name}-upstream-name"), "choices": [],
                    "usage": {"prompt_tokens": SCRIPTED_USAGE.0, "completion_tokens": SCRIPTED_USAGE.1,
                              "total_tokens": SCRIPTED_USAGE.0 + SCRIPTED_USAGE.1}
                });
                parts.push(Bytes::from(format!("data: {v}\n\n")));
            }
            parts.push(Bytes::from_static(b"data: [DONE]\n\n"));
            sse_response(Body::from_stream(stream::iter(
                parts.into_iter().map(Ok::<_, std::io::Error>),
            )))
        }
        Mode::CutAfterFirst => {
            let first = sse_chunk(&name, Some(&format!("{name}-0")), None);
            let body = stream::once(async move { Ok::<_, std::io::Error>(first) }).chain(
                stream::once(async {
                    // Let the first chunk leave before the connection is cut.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    Err(std::io::Error::new(
                        std::io::ErrorKind::ConnectionReset,
                        "scripted cut",
                    ))
                }),
            );
            sse_response(Body::from_stream(body))
        }
        Mode::StallAfterFirst => {
            let first = sse_chunk(&name, Some(&format!("{name}-0")), None);
            let body = stream::once(async move { Ok::<_, std::io::Error>(first) })
                .chain(stream::pending());
            sse_response(Body::from_stream(body))
        }
    }
}

/// A loopback port that refuses connections: bound (so nobody else gets it) but not listening.
struct Refusing {
    _socket: tokio::net::TcpSocket,
    addr: SocketAddr,
}

impl Refusing {
    fn new() -> Refusing {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket
            .bind("127.0.0.1:0".parse().unwrap())
            .expect("bind a port that will refuse");
        let addr = socket.local_addr().unwrap();
        Refusing {
            _socket: socket,
            addr,
        }
    }

    fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }
}

// =============================================================================================
// Configuration pieces

/// `[providers.NAME]` of kind openai with generous timeouts (a loaded machine must not make a
/// good upstream look slow).
fn provider(name: &str, base_url: &str, keys: &[&str]) -> String {
    provider_with_timeouts(name, base_url, keys, 5000)
}

/// The same with first-byte and idle timeouts of 300 ms, for an upstream that stalls.
fn stalling_provider(name: &str, base_url: &str, keys: &[&str]) -> String {
    provider_with_timeouts(name, base_url, keys, 300)
}

fn provider_with_timeouts(name: &str, base_url: &str, keys: &[&str], wait_ms: u64) -> String {
    let keys: Vec<String> = keys.iter().map(|k| format!("\"{k}\"")).collect();
    format!(
        "[providers.{name}]\nkind = \"openai\"\nbase_url = \"{base_url}\"\nkeys = [{}]\n\
         connect_timeout_ms = 2000\nfirst_byte_timeout_ms = {wait_ms}\n\
         idle_timeout_ms = {wait_ms}\ntotal_timeout_ms = 10000\n\n",
        keys.join(", ")
    )
}

fn alias(name: &str, description: &str, chain: &[&str]) -> String {
    let chain: Vec<String> = chain.iter().map(|c| format!("\"{c}\"")).collect();
    format!(
        "[aliases.{name}]\ndescription = \"{description}\"\nchain = [{}]\n\n",
        chain.join(", ")
    )
}

fn routing(after_failures: u32, backoff_secs: u64, max_backoff_secs: u64) -> String {
    format!(
        "[routing]\nunhealthy_after_failures = {after_failures}\n\
         unhealthy_backoff_secs = {backoff_secs}\nunhealthy_backoff_max_secs = {max_backoff_secs}\n\n"
    )
}

/// A server on a manual clock: health backoffs and key cooldowns end only when the test
/// advances `s.clock`, never because the machine was slow.
async fn server(extra: String) -> TestServer {
    TestServer::sqlite(Opts {
        server: format!("admin_token = \"{ADMIN_TOKEN}\""),
        extra,
        clock: Some(Clock::manual()),
        ..Opts::default()
    })
    .await
}

// =============================================================================================
// Small helpers

fn header(resp: &reqwest::Response, name: &str) -> Option<String> {
    resp.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

fn md<T>(resp: &tonic::Response<T>, name: &str) -> Option<String> {
    resp.metadata()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

fn stream_body(model: &str, marker: &str) -> Value {
    let mut b = chat_body(model, marker);
    b["stream"] = json!(true);
    b["stream_options"] = json!({"include_usage": true});
    b
}

async fn grpc_complete(
    s: &TestServer,
    model: &str,
    marker: &str,
) -> Result<tonic::Response<CompleteResponse>, tonic::Status> {
    s.grpc()
        .await
        .complete(grpc_request(
            complete_request(model, marker),
            Some(ALICE_KEY),
            Some(marker),
        ))
        .await
}

/// StreamComplete: the resolved-model metadata, the chunks, and the error that ended it if any.
async fn grpc_stream(
    s: &TestServer,
    model: &str,
    marker: &str,
) -> (Option<String>, Vec<CompleteChunk>, Option<tonic::Status>) {
    let resp = s
        .grpc()
        .await
        .stream_complete(grpc_request(
            complete_request(model, marker),
            Some(ALICE_KEY),
            Some(marker),
        ))
        .await
        .unwrap_or_else(|e| panic!("StreamComplete {model} was refused: {e:?}"));
    let resolved = md(&resp, "x-tollgate-resolved-model");
    let mut stream = resp.into_inner();
    let mut chunks = Vec::new();
    loop {
        match stream.message().await {
            Ok(Some(c)) => chunks.push(c),
            Ok(None) => return (resolved, chunks, None),
            Err(e) => return (resolved, chunks, Some(e)),
        }
    }
}

fn admin_req<T>(msg: T, token: Option<&str>) -> tonic::Request<T> {
    grpc_request(msg, token, None)
}

async fn grpc_admin(addr: SocketAddr) -> AdminClient<tonic::transport::Channel> {
    AdminClient::connect(format!("http://{addr}"))
        .await
        .expect("gRPC admin connect")
}

async fn get_json(client: &reqwest::Client, url: &str) -> Value {
    let resp = client.get(url).send().await.expect("GET");
    assert_eq!(resp.status(), 200, "GET {url}");
    resp.json().await.expect("JSON body")
}

/// One provider's entry of `GET /v1/health`.
async fn health_of(client: &reqwest::Client, base: &str, provider: &str) -> Value {
    let v = get_json(client, &format!("{base}/v1/health")).await;
    v["providers"]
        .as_array()
        .unwrap_or_else(|| panic!("no providers array: {v}"))
        .iter()
        .find(|p| p["provider"] == provider)
        .cloned()
        .unwrap_or_else(|| panic!("provider {provider} missing from /v1/health: {v}"))
}

/// The chain of one alias in `GET /v1/aliases` (`None` if the alias is not listed).
async fn listed_chain(client: &reqwest::Client, base: &str, name: &str) -> Option<Vec<String>> {
    let v = get_json(client, &format!("{base}/v1/aliases")).await;
    v["data"]
        .as_array()?
        .iter()
        .find(|a| a["alias"] == name)
        .map(|a| {
            a["chain"]
                .as_array()
                .unwrap()
                .iter()
                .map(|c| c.as_str().unwrap().to_owned())
                .collect()
        })
}

fn chunks_of(events: &[String]) -> Vec<Value> {
    events
        .iter()
        .filter(|e| e.as_str() != "[DONE]")
        .map(|e| serde_json::from_str(e).unwrap_or_else(|err| panic!("not JSON ({err}): {e}")))
        .collect()
}

fn content_of(chunks: &[Value]) -> String {
    chunks
        .iter()
        .filter_map(|c| {
            c.pointer("/choices/0/delta/content")
                .and_then(Value::as_str)
        })
        .collect()
}

fn fallback<'a>(from: &'a str, to: &'a str, reason: &'a str) -> [(&'static str, &'a str); 3] {
    [("from_model", from), ("to_model", to), ("reason", reason)]
}

fn resolved<'a>(alias: &'a str, target: &'a str) -> [(&'static str, &'a str); 2] {
    [("alias", alias), ("target", target)]
}

// =============================================================================================
// 1. Fallback on every retryable failure, HTTP and gRPC

/// One alias per retryable failure kind, each `[failing/m, good/m]`: a refused connection
/// (`connect_error`), no first byte within 300 ms (`timeout`), a 500 (`upstream_5xx`), a 429
/// from a keyless provider (`rate_limited`) and a 429 that leaves a one-key pool with no usable
/// key (`keys_exhausted`). Over HTTP and gRPC the good upstream answers (it saw the request),
/// the failing one was tried first, the resolved model is `good/m` in the header / metadata /
/// body / response field, and `fallback_total` moved by exactly one per request under exactly
/// that reason, `alias_resolved_total` under `good/m` only, availability counts a success.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn falls_back_on_each_retryable_failure_over_http_and_grpc() {
    let good = Scripted::start("good", Mode::Ok).await;
    let stalled = Scripted::start("stalled", Mode::Stall).await;
    let e500 = Scripted::start("e500", Mode::Status(500)).await;
    let throttled = Scripted::start("throttled", Mode::Status(429)).await;
    let onekey = Scripted::start("onekey", Mode::Status(429)).await;
    let refused = Refusing::new();
    let mut extra = routing(1000, 30, 300);
    extra += &provider("good", &good.base_url(), &["sk-good"]);
    extra += &provider("refused", &refused.base_url(), &["sk-r"]);
    extra += &stalling_provider("stalled", &stalled.base_url(), &["sk-s"]);
    extra += &provider("e500", &e500.base_url(), &["sk-e"]);
    extra += &provider("throttled", &throttled.base_url(), &[]);
    extra += &provider("onekey", &onekey.base_url(), &["sk-onekey-only"]);
    // (alias, first entry, reason, its upstream, whether the gRPC request reaches it too)
    let cases: [(&str, &str, &str, Option<&Scripted>, bool); 5] = [
        ("via_refused", "refused/m", "connect_error", None, false),
        ("via_stalled", "stalled/m", "timeout", Some(&stalled), true),
        ("via_500", "e500/m", "upstream_5xx", Some(&e500), true),
        (
            "via_429",
            "throttled/m",
            "rate_limited",
            Some(&throttled),
            true,
        ),
        // The first 429 cools the only key: the second request is not even sent.
        (
            "via_exhausted",
            "onekey/m",
            "keys_exhausted",
            Some(&onekey),
            false,
        ),
    ];
    for (name, first, _, _, _) in &cases {
        extra += &alias(name, "fallback test", &[*first, "good/m"]);
    }
    let mut s = server(extra).await;
    let before = s.metrics().await;

    let mut sent = 0.0;
    for (name, first, reason, failing, grpc_reaches_first) in cases {
        // HTTP
        let rid = new_request_id();
        let resp = s.chat(&chat_body(name, &rid), Some(&rid)).await;
        let status = resp.status();
        let resolved_hdr = header(&resp, "x-tollgate-resolved-model");
        let body: Value = resp.json().await.unwrap();
        assert_eq!(status, 200, "{name}: {body}");
        assert_eq!(resolved_hdr.as_deref(), Some("good/m"), "{name}");
        assert_eq!(body["model"], "good/m", "{name}: {body}");
        assert_eq!(
            body.pointer("/choices/0/message/content"),
            Some(&json!(good.answer())),
            "{name}: the good upstream's answer"
        );
        assert!(good.saw(&rid), "{name}: the good upstream got the request");
        if let Some(f) = failing {
            assert!(f.saw(&rid), "{name}: {first} was tried first");
        }
        let row = s.ledger_row(&rid).await;
        assert_eq!(row.requested_model, name);
        assert_eq!(row.resolved_model.as_deref(), Some("good/m"), "{name}");
        assert_eq!(
            (row.outcome.as_str(), row.reason.as_str()),
            ("success", "success")
        );
        assert_eq!(
            (row.prompt_tokens, row.completion_tokens),
            SCRIPTED_USAGE,
            "{name}: usage of the upstream that answered"
        );

        // gRPC
        let rid = new_request_id();
        let resp = grpc_complete(&s, name, &rid)
            .await
            .unwrap_or_else(|e| panic!("{name}: gRPC Complete must fall back: {e:?}"));
        assert_eq!(
            md(&resp, "x-tollgate-resolved-model").as_deref(),
            Some("good/m"),
            "{name}"
        );
        let r = resp.into_inner();
        assert_eq!(r.resolved_model, "good/m", "{name}");
        assert_eq!(r.content, good.answer(), "{name}");
        assert!(
            good.saw(&rid),
            "{name}: gRPC request reached the good upstream"
        );
        if let Some(f) = failing {
            assert_eq!(
                f.saw(&rid),
                grpc_reaches_first,
                "{name}: gRPC request at {first}"
            );
        }

        s.assert_delta_now(&before, FALLBACK, &fallback(first, "good/m", reason), 2.0)
            .await;
        s.assert_delta_now(&before, FALLBACK, &[("from_model", first)], 2.0)
            .await;
        s.assert_delta_now(&before, ALIAS_RESOLVED, &resolved(name, "good/m"), 2.0)
            .await;
        s.assert_delta_now(&before, ALIAS_RESOLVED, &[("alias", name)], 2.0)
            .await;
        for protocol in ["http", "grpc"] {
            s.expect_delta(
                &before,
                AVAILABILITY,
                &avail(protocol, "success", "success", name),
                1.0,
            )
            .await;
        }
        sent += 2.0;
        s.assert_delta_now(&before, AVAILABILITY, &[], sent).await;
    }
    s.shutdown().await;
}

// =============================================================================================
// 2. A caller's 4xx never falls back

/// `[picky/m, good/m]` where picky answers 400 and `[fussy/m, good/m]` where fussy answers 422:
/// the caller gets 400 `upstream_rejected` (gRPC INVALID_ARGUMENT) with the upstream's message,
/// the good upstream never sees the request, nothing is counted as a fallback or an alias
/// resolution, availability says `excluded`; and because a 4xx is the caller's doing it does not
/// count against the provider's health even with `unhealthy_after_failures = 1`: the next request
/// still reaches picky.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_callers_4xx_does_not_fall_back_or_mark_the_provider_unhealthy() {
    let good = Scripted::start("good", Mode::Ok).await;
    let picky = Scripted::start("picky", Mode::Status(400)).await;
    let fussy = Scripted::start("fussy", Mode::Status(422)).await;
    let mut extra = routing(1, 30, 300);
    extra += &provider("good", &good.base_url(), &["sk-good"]);
    extra += &provider("picky", &picky.base_url(), &["sk-picky"]);
    extra += &provider("fussy", &fussy.base_url(), &["sk-fussy"]);
    extra += &alias("strict400", "", &["picky/m", "good/m"]);
    extra += &alias("strict422", "", &["fussy/m", "good/m"]);
    let mut s = server(extra).await;
    let before = s.metrics().await;

    let mut sent = 0.0;
    for (name, upstream, status) in [("strict400", &picky, 400), ("strict422", &fussy, 422)] {
        for round in 0..2 {
            let rid = new_request_id();
            let resp = s.chat(&chat_body(name, &rid), Some(&rid)).await;
            assert_eq!(header(&resp, "x-tollgate-resolved-model"), None);
            let body = expect_http_error(resp, 400, "upstream_rejected").await;
            let msg = body["error"]["message"].as_str().unwrap();
            assert!(
                msg.contains(&format!("{} says {status}", upstream.state.name)),
                "the upstream's message reaches the caller: {msg}"
            );
            assert!(
                upstream.saw(&rid),
                "{name} round {round}: the first entry was tried"
            );
            assert!(
                !good.saw(&rid),
                "{name} round {round}: no fallback on a 4xx"
            );
            let row = s.ledger_row(&rid).await;
            assert_eq!(
                (row.outcome.as_str(), row.reason.as_str()),
                ("excluded", "upstream_rejected")
            );

            let rid = new_request_id();
            let err = grpc_complete(&s, name, &rid)
                .await
                .expect_err("a 4xx is an error over gRPC too");
            expect_grpc_error(&err, Code::InvalidArgument, "upstream_rejected");
            assert!(
                upstream.saw(&rid),
                "{name}: gRPC request reached the first entry"
            );
            assert!(!good.saw(&rid), "{name}: no gRPC fallback on a 4xx");
        }
        let h = health_of(
            &s.client,
            &format!("http://{}", s.http),
            upstream.state.name.as_str(),
        )
        .await;
        assert_eq!(
            h["healthy"], true,
            "a 4xx says nothing against the provider: {h}"
        );
        assert_eq!(h["consecutive_failures"], 0, "{h}");
        s.assert_delta_now(&before, FALLBACK, &[("to_model", "good/m")], 0.0)
            .await;
        s.assert_delta_now(&before, ALIAS_RESOLVED, &[("alias", name)], 0.0)
            .await;
        s.expect_delta(
            &before,
            AVAILABILITY,
            &avail("http", "excluded", "upstream_rejected", name),
            2.0,
        )
        .await;
        s.expect_delta(
            &before,
            AVAILABILITY,
            &avail("grpc", "excluded", "upstream_rejected", name),
            2.0,
        )
        .await;
        sent += 4.0;
        s.assert_delta_now(&before, AVAILABILITY, &[], sent).await;
    }
    assert_eq!(good.count(), 0, "the good upstream never saw anything");
    s.shutdown().await;
}

// =============================================================================================
// 3. The whole chain failing

/// When every entry fails the last cause decides: connect error last -> 502 `upstream_error`
/// (UNAVAILABLE), timeout last -> 504 `upstream_timeout` (DEADLINE_EXCEEDED), a pool whose only
/// key is revoked (401) last -> 503 `upstream_keys_exhausted` (UNAVAILABLE), a pool whose only
/// key is cooling after a 429 last -> 429 with `Retry-After` (RESOURCE_EXHAUSTED). The message
/// lists every attempt in order; a chain of one names its single attempt. Availability counts
/// a failure under that reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_chain_answers_by_its_last_cause_and_lists_every_attempt() {
    let stalled = Scripted::start("stalled", Mode::Stall).await;
    let e500 = Scripted::start("e500", Mode::Status(500)).await;
    let disabled = Scripted::start("disabled", Mode::Status(401)).await;
    let onekey = Scripted::start("onekey", Mode::Status(429)).await;
    let refused = Refusing::new();
    let mut extra = routing(1000, 30, 300);
    extra += &provider("refused", &refused.base_url(), &["sk-r"]);
    extra += &stalling_provider("stalled", &stalled.base_url(), &["sk-s"]);
    extra += &provider("e500", &e500.base_url(), &["sk-e"]);
    extra += &provider("disabled", &disabled.base_url(), &["sk-disabled-only"]);
    extra += &provider("onekey", &onekey.base_url(), &["sk-onekey-only"]);
    extra += &alias("dead_connect", "", &["e500/m", "refused/m"]);
    extra += &alias("dead_timeout", "", &["refused/m", "stalled/m"]);
    extra += &alias("dead_keys", "", &["e500/m", "disabled/m"]);
    extra += &alias("dead_cooling", "", &["stalled/m", "onekey/m"]);
    extra += &alias("lone", "", &["e500/m"]);
    let mut s = server(extra).await;
    let before = s.metrics().await;

    // (alias, HTTP status, reason, gRPC code, what each attempt's part of the message says)
    let cases: [(&str, u16, &str, Code, &[&str]); 5] = [
        (
            "dead_connect",
            502,
            "upstream_error",
            Code::Unavailable,
            &[
                "e500/m: upstream answered 500: e500 says 500",
                "refused/m: cannot connect",
            ],
        ),
        (
            "dead_timeout",
            504,
            "upstream_timeout",
            Code::DeadlineExceeded,
            &["refused/m: cannot connect", "stalled/m: upstream timed out"],
        ),
        (
            "dead_keys",
            503,
            "upstream_keys_exhausted",
            Code::Unavailable,
            &[
                "e500/m: upstream answered 500",
                "disabled/m: no usable upstream key",
            ],
        ),
        (
            "dead_cooling",
            429,
            "upstream_keys_exhausted",
            Code::ResourceExhausted,
            &[
                "stalled/m: upstream timed out",
                "onekey/m: no usable upstream key",
            ],
        ),
        (
            "lone",
            502,
            "upstream_error",
            Code::Unavailable,
            &["e500/m: upstream answered 500: e500 says 500"],
        ),
    ];
    let mut sent = 0.0;
    for (name, status, reason, code, parts) in cases {
        let check_message = |msg: &str| {
            let mut at = 0;
            for part in parts {
                let pos = msg[at..]
                    .find(part)
                    .unwrap_or_else(|| panic!("{name}: {part:?} missing (in order) from {msg:?}"));
                at += pos + part.len();
            }
            if parts.len() > 1 {
                assert!(
                    msg.contains(&format!("all {} targets failed", parts.len())),
                    "{name}: {msg}"
                );
            } else {
                assert!(!msg.contains("targets failed"), "{name}: {msg}");
            }
        };
        let rid = new_request_id();
        let resp = s.chat(&chat_body(name, &rid), Some(&rid)).await;
        let retry_after = header(&resp, "retry-after");
        let body = expect_http_error(resp, status, reason).await;
        check_message(body["error"]["message"].as_str().unwrap());
        if status == 429 {
            let secs: u64 = retry_after
                .as_deref()
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("{name}: 429 needs Retry-After, got {retry_after:?}"));
            assert!((28..=30).contains(&secs), "{name}: Retry-After {secs}");
        }
        let row = s.ledger_row(&rid).await;
        assert_eq!(
            (row.outcome.as_str(), row.reason.as_str()),
            ("failure", reason)
        );

        let rid = new_request_id();
        let err = grpc_complete(&s, name, &rid)
            .await
            .expect_err("a failing chain fails over gRPC too");
        expect_grpc_error(&err, code, reason);
        check_message(err.message());

        for protocol in ["http", "grpc"] {
            s.expect_delta(
                &before,
                AVAILABILITY,
                &avail(protocol, "failure", reason, name),
                1.0,
            )
            .await;
        }
        sent += 2.0;
        s.assert_delta_now(&before, ALIAS_RESOLVED, &[("alias", name)], 0.0)
            .await;
    }
    s.assert_delta_now(&before, AVAILABILITY, &[], sent).await;
    // Every move along a chain was counted once, under the cause of the entry left behind.
    s.assert_delta_now(
        &before,
        FALLBACK,
        &fallback("e500/m", "refused/m", "upstream_5xx"),
        2.0,
    )
    .await;
    s.assert_delta_now(
        &before,
        FALLBACK,
        &fallback("refused/m", "stalled/m", "connect_error"),
        2.0,
    )
    .await;
    s.assert_delta_now(
        &before,
        FALLBACK,
        &fallback("e500/m", "disabled/m", "upstream_5xx"),
        2.0,
    )
    .await;
    s.assert_delta_now(
        &before,
        FALLBACK,
        &fallback("stalled/m", "onekey/m", "timeout"),
        2.0,
    )
    .await;
    assert_eq!(disabled.count(), 1, "a revoked key is not tried again");
    assert_eq!(onekey.count(), 1, "a cooling key is not tried again");
    s.shutdown().await;
}

// =============================================================================================
// 4. Provider health

/// `[flaky/m, good/m]` with `unhealthy_after_failures = 2`, `unhealthy_backoff_secs = 1`: two
/// 500s (one HTTP, one gRPC) mark flaky unhealthy (`/v1/health` and gRPC GetHealth say so with
/// the failure count, last error and the end of the backoff; `provider_healthy` is 0); while it
/// is unhealthy it gets no requests and each one counts `fallback_total{reason=
/// "unhealthy_skipped"}`. Once the backoff ends it is tried again; one more failure marks it
/// unhealthy again for twice as long; after it recovers and the backoff passes, a success
/// resolves to flaky/m and clears its health (failures 0, gauge 1). Time is the server's manual
/// clock: the backoffs end when the test advances it, to the millisecond.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unhealthy_provider_is_skipped_then_retried_after_a_growing_backoff() {
    let good = Scripted::start("good", Mode::Ok).await;
    let flaky = Scripted::start("flaky", Mode::Status(500)).await;
    let mut extra = routing(2, 1, 60);
    extra += &provider("good", &good.base_url(), &["sk-good"]);
    extra += &provider("flaky", &flaky.base_url(), &["sk-flaky"]);
    extra += &alias("wobbly", "flaky first", &["flaky/m", "good/m"]);
    let mut s = server(extra).await;
    let clock = s.clock.clone();
    let base = format!("http://{}", s.http);
    let before = s.metrics().await;
    let mut admin = grpc_admin(s.grpc_addr).await;

    let http_ok = |resp: reqwest::Response, want: &'static str| async move {
        assert_eq!(resp.status(), 200);
        assert_eq!(
            header(&resp, "x-tollgate-resolved-model").as_deref(),
            Some(want)
        );
    };

    // Two failures, one per protocol.
    let r1 = new_request_id();
    http_ok(s.chat(&chat_body("wobbly", &r1), None).await, "good/m").await;
    assert!(flaky.saw(&r1) && good.saw(&r1));
    let h = health_of(&s.client, &base, "flaky").await;
    assert_eq!(
        (h["healthy"].clone(), h["consecutive_failures"].clone()),
        (json!(true), json!(1)),
        "{h}"
    );
    let t0 = clock.now_ms();
    let r2 = new_request_id();
    let resp = grpc_complete(&s, "wobbly", &r2).await.expect("falls back");
    assert_eq!(resp.get_ref().resolved_model, "good/m");
    assert!(flaky.saw(&r2) && good.saw(&r2));

    let h = health_of(&s.client, &base, "flaky").await;
    assert_eq!(h["healthy"], false, "{h}");
    assert_eq!(h["consecutive_failures"], 2, "{h}");
    assert!(
        h["last_error"].as_str().is_some_and(|e| e.contains("500")),
        "{h}"
    );
    let until = h["unhealthy_until_ms"]
        .as_i64()
        .unwrap_or_else(|| panic!("{h}"));
    assert_eq!(
        until,
        t0 + 1000,
        "first backoff is 1 s from the failure, by the server's clock"
    );
    let g = admin
        .get_health(admin_req(GetHealthRequest {}, Some(ADMIN_TOKEN)))
        .await
        .expect("GetHealth")
        .into_inner();
    let gf = g
        .providers
        .iter()
        .find(|p| p.provider == "flaky")
        .expect("flaky in GetHealth");
    assert!(!gf.healthy);
    assert_eq!(gf.consecutive_failures, 2);
    assert_eq!(gf.unhealthy_until_ms, Some(until));
    assert!(gf.last_error.as_deref().is_some_and(|e| e.contains("500")));
    assert!(g
        .providers
        .iter()
        .find(|p| p.provider == "good")
        .is_some_and(|p| p.healthy));
    let text = s.metrics().await;
    assert_eq!(
        metric_value(&text, PROVIDER_HEALTHY, &[("provider", "flaky")]),
        0.0
    );
    assert_eq!(
        metric_value(&text, PROVIDER_HEALTHY, &[("provider", "good")]),
        1.0
    );

    // Skipped while unhealthy, on both protocols.
    let seen = flaky.count();
    let r3 = new_request_id();
    http_ok(s.chat(&chat_body("wobbly", &r3), None).await, "good/m").await;
    let r4 = new_request_id();
    let resp = grpc_complete(&s, "wobbly", &r4)
        .await
        .expect("skips to good");
    assert_eq!(
        md(&resp, "x-tollgate-resolved-model").as_deref(),
        Some("good/m")
    );
    assert!(
        clock.now_ms() < until,
        "the skip checks ran inside the backoff"
    );
    assert_eq!(
        flaky.count(),
        seen,
        "an unhealthy provider gets no requests"
    );
    assert!(good.saw(&r3) && good.saw(&r4));
    s.assert_delta_now(
        &before,
        FALLBACK,
        &fallback("flaky/m", "good/m", "unhealthy_skipped"),
        2.0,
    )
    .await;

    // The backoff ends by itself (derived when read, no request needed) once the clock reaches
    // its end, not a millisecond before: tried again, fails again, and this second trip in a
    // row lasts twice as long.
    clock.advance(Duration::from_millis((until - 1 - clock.now_ms()) as u64));
    let h = health_of(&s.client, &base, "flaky").await;
    assert_eq!(
        h["healthy"], false,
        "1 ms before the end of the backoff: {h}"
    );
    clock.advance(Duration::from_millis(1));
    let h = eventually(
        DEADLINE,
        "flaky healthy again after its 1 s backoff",
        || async {
            let h = health_of(&s.client, &base, "flaky").await;
            (h["healthy"] == true).then_some(h)
        },
    )
    .await;
    assert!(
        clock.now_ms() >= until,
        "healthy only once the backoff ended"
    );
    assert_eq!(h["unhealthy_until_ms"], Value::Null, "{h}");
    assert_eq!(
        s.metric(PROVIDER_HEALTHY, &[("provider", "flaky")]).await,
        1.0
    );
    let t2 = clock.now_ms();
    let r5 = new_request_id();
    http_ok(s.chat(&chat_body("wobbly", &r5), None).await, "good/m").await;
    assert!(
        flaky.saw(&r5),
        "after the backoff the provider is tried again"
    );
    let h = health_of(&s.client, &base, "flaky").await;
    assert_eq!(
        (h["healthy"].clone(), h["consecutive_failures"].clone()),
        (json!(false), json!(3)),
        "{h}"
    );
    let until2 = h["unhealthy_until_ms"].as_i64().unwrap();
    assert_eq!(
        until2,
        t2 + 2000,
        "second trip in a row doubles the backoff"
    );

    // It recovers, but stays skipped until its backoff ends; then one success heals it.
    flaky.set(Mode::Ok);
    let seen = flaky.count();
    let r6 = new_request_id();
    http_ok(s.chat(&chat_body("wobbly", &r6), None).await, "good/m").await;
    assert_eq!(flaky.count(), seen, "still skipped during the backoff");
    clock.advance(Duration::from_millis((until2 - clock.now_ms()) as u64));
    eventually(DEADLINE, "flaky's 2 s backoff to end", || async {
        (health_of(&s.client, &base, "flaky").await["healthy"] == true).then_some(())
    })
    .await;
    let r7 = new_request_id();
    let resp = s.chat(&chat_body("wobbly", &r7), Some(&r7)).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(
        header(&resp, "x-tollgate-resolved-model").as_deref(),
        Some("flaky/m")
    );
    let body: Value = resp.json().await.unwrap();
    assert_eq!(
        body.pointer("/choices/0/message/content"),
        Some(&json!(flaky.answer()))
    );
    assert!(!good.saw(&r7));
    let h = health_of(&s.client, &base, "flaky").await;
    assert_eq!(h["healthy"], true, "{h}");
    assert_eq!(
        h["consecutive_failures"], 0,
        "a success clears the count: {h}"
    );
    assert_eq!(h["last_error"], Value::Null, "{h}");
    assert_eq!(h["unhealthy_until_ms"], Value::Null, "{h}");

    let text = s.metrics().await;
    assert_eq!(
        metric_value(&text, PROVIDER_HEALTHY, &[("provider", "flaky")]),
        1.0
    );
    s.assert_delta_now(
        &before,
        FALLBACK,
        &fallback("flaky/m", "good/m", "upstream_5xx"),
        3.0,
    )
    .await;
    s.assert_delta_now(
        &before,
        FALLBACK,
        &fallback("flaky/m", "good/m", "unhealthy_skipped"),
        3.0,
    )
    .await;
    s.assert_delta_now(&before, ALIAS_RESOLVED, &resolved("wobbly", "good/m"), 6.0)
        .await;
    s.assert_delta_now(&before, ALIAS_RESOLVED, &resolved("wobbly", "flaky/m"), 1.0)
        .await;
    s.shutdown().await;
}

/// `[sick_a/m, sick_b/m]` with `unhealthy_after_failures = 1`: after one failing request both
/// entries are unhealthy, yet the next request still tries both (no `unhealthy_skipped`, both
/// upstreams see it): failing without an attempt would make recovery impossible. When sick_b
/// recovers it answers (and is healthy again); from then on sick_a is skipped while sick_b is
/// healthy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chain_with_no_healthy_entry_is_still_tried() {
    let a = Scripted::start("sick_a", Mode::Status(500)).await;
    let b = Scripted::start("sick_b", Mode::Status(503)).await;
    let mut extra = routing(1, 30, 300);
    extra += &provider("sick_a", &a.base_url(), &["sk-a"]);
    extra += &provider("sick_b", &b.base_url(), &["sk-b"]);
    extra += &alias("both_sick", "", &["sick_a/m", "sick_b/m"]);
    let mut s = server(extra).await;
    let base = format!("http://{}", s.http);
    let before = s.metrics().await;

    for round in 0..2 {
        let rid = new_request_id();
        let resp = s.chat(&chat_body("both_sick", &rid), Some(&rid)).await;
        let body = expect_http_error(resp, 502, "upstream_error").await;
        assert!(
            a.saw(&rid) && b.saw(&rid),
            "round {round}: every entry tried: {body}"
        );
        for p in ["sick_a", "sick_b"] {
            assert_eq!(health_of(&s.client, &base, p).await["healthy"], false);
        }
    }
    let text = s.metrics().await;
    assert_eq!(
        metric_value(&text, PROVIDER_HEALTHY, &[("provider", "sick_a")]),
        0.0
    );
    assert_eq!(
        metric_value(&text, PROVIDER_HEALTHY, &[("provider", "sick_b")]),
        0.0
    );
    s.assert_delta_now(&before, FALLBACK, &[("reason", "unhealthy_skipped")], 0.0)
        .await;

    b.set(Mode::Ok);
    let rid = new_request_id();
    let resp = grpc_complete(&s, "both_sick", &rid)
        .await
        .expect("the recovered entry answers though it was marked unhealthy");
    assert_eq!(
        md(&resp, "x-tollgate-resolved-model").as_deref(),
        Some("sick_b/m")
    );
    assert_eq!(resp.get_ref().content, b.answer());
    assert!(
        a.saw(&rid),
        "sick_a was tried too: nothing was healthy when the request began"
    );
    let hb = health_of(&s.client, &base, "sick_b").await;
    assert_eq!(
        (hb["healthy"].clone(), hb["consecutive_failures"].clone()),
        (json!(true), json!(0)),
        "{hb}"
    );

    let rid = new_request_id();
    let resp = s.chat(&chat_body("both_sick", &rid), Some(&rid)).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(
        header(&resp, "x-tollgate-resolved-model").as_deref(),
        Some("sick_b/m")
    );
    assert!(
        !a.saw(&rid),
        "with a healthy entry left, the unhealthy one is skipped"
    );
    s.assert_delta_now(
        &before,
        FALLBACK,
        &fallback("sick_a/m", "sick_b/m", "upstream_5xx"),
        3.0,
    )
    .await;
    s.assert_delta_now(
        &before,
        FALLBACK,
        &fallback("sick_a/m", "sick_b/m", "unhealthy_skipped"),
        1.0,
    )
    .await;
    s.expect_delta(
        &before,
        AVAILABILITY,
        &avail("http", "failure", "upstream_error", "both_sick"),
        2.0,
    )
    .await;
    for protocol in ["http", "grpc"] {
        s.expect_delta(
            &before,
            AVAILABILITY,
            &avail(protocol, "success", "success", "both_sick"),
            1.0,
        )
        .await;
    }
    s.assert_delta_now(&before, AVAILABILITY, &[], 4.0).await;
    s.shutdown().await;
}

// =============================================================================================
// 5. Streaming

/// A stream whose first entry fails before any chunk (refused, stalled past the first-byte
/// timeout, 500, 429) falls back: over HTTP the client gets the whole stream of the second
/// upstream (every chunk's `model` is `good/m`, its content, the usage chunk, `[DONE]`), over
/// gRPC every chunk's `resolved_model` and the metadata say `good/m`; the ledger row is a
/// success resolved to `good/m`; `fallback_total` counts the right reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_falls_back_when_its_first_entry_fails_before_the_first_chunk() {
    let good = Scripted::start("good", Mode::Ok).await;
    let stalled = Scripted::start("stalled", Mode::Stall).await;
    let e500 = Scripted::start("e500", Mode::Status(500)).await;
    let throttled = Scripted::start("throttled", Mode::Status(429)).await;
    let refused = Refusing::new();
    let mut extra = routing(1000, 30, 300);
    extra += &provider("good", &good.base_url(), &["sk-good"]);
    extra += &provider("refused", &refused.base_url(), &["sk-r"]);
    extra += &stalling_provider("stalled", &stalled.base_url(), &["sk-s"]);
    extra += &provider("e500", &e500.base_url(), &["sk-e"]);
    extra += &provider("throttled", &throttled.base_url(), &[]);
    let cases: [(&str, &str, &str, Option<&Scripted>); 4] = [
        ("s_refused", "refused/m", "connect_error", None),
        ("s_stalled", "stalled/m", "timeout", Some(&stalled)),
        ("s_500", "e500/m", "upstream_5xx", Some(&e500)),
        ("s_429", "throttled/m", "rate_limited", Some(&throttled)),
    ];
    for (name, first, _, _) in &cases {
        extra += &alias(name, "", &[*first, "good/m"]);
    }
    let mut s = server(extra).await;
    let before = s.metrics().await;

    let mut sent = 0.0;
    for (name, first, reason, failing) in cases {
        let rid = new_request_id();
        let resp = s.chat(&stream_body(name, &rid), Some(&rid)).await;
        assert_eq!(resp.status(), 200, "{name}");
        assert_eq!(
            header(&resp, "x-tollgate-resolved-model").as_deref(),
            Some("good/m"),
            "{name}: a stream names its resolved model in the head"
        );
        let (events, end) = SseReader::new(resp).collect().await;
        assert_eq!(end, SseEvent::End, "{name}");
        assert_eq!(
            events.last().map(String::as_str),
            Some("[DONE]"),
            "{name}: {events:?}"
        );
        let chunks = chunks_of(&events);
        assert!(
            chunks.iter().all(|c| c["model"] == "good/m"),
            "{name}: {events:?}"
        );
        assert!(
            chunks.iter().all(|c| c.get("error").is_none()),
            "{name}: {events:?}"
        );
        assert_eq!(content_of(&chunks), good.stream_content(), "{name}");
        let usage = chunks
            .iter()
            .find_map(|c| c.get("usage").filter(|u| !u.is_null()))
            .unwrap_or_else(|| panic!("{name}: a usage chunk was asked for: {events:?}"));
        assert_eq!(usage["completion_tokens"], SCRIPTED_USAGE.1, "{name}");
        assert!(good.saw(&rid), "{name}");
        if let Some(f) = failing {
            assert!(f.saw(&rid), "{name}: {first} tried first");
        }
        let row = s.ledger_row(&rid).await;
        assert!(row.stream);
        assert_eq!(row.resolved_model.as_deref(), Some("good/m"), "{name}");
        assert_eq!(
            (row.outcome.as_str(), row.reason.as_str()),
            ("success", "success")
        );

        let rid = new_request_id();
        let (md_resolved, chunks, err) = grpc_stream(&s, name, &rid).await;
        assert!(err.is_none(), "{name}: {err:?}");
        assert_eq!(md_resolved.as_deref(), Some("good/m"), "{name}");
        assert!(!chunks.is_empty());
        assert!(
            chunks.iter().all(|c| c.resolved_model == "good/m"),
            "{name}: {chunks:?}"
        );
        let text: String = chunks.iter().map(|c| c.delta_content.as_str()).collect();
        assert_eq!(text, good.stream_content(), "{name}");
        assert!(good.saw(&rid), "{name}");

        s.assert_delta_now(&before, FALLBACK, &fallback(first, "good/m", reason), 2.0)
            .await;
        s.assert_delta_now(&before, FALLBACK, &[("from_model", first)], 2.0)
            .await;
        s.assert_delta_now(&before, ALIAS_RESOLVED, &resolved(name, "good/m"), 2.0)
            .await;
        for protocol in ["http", "grpc"] {
            s.expect_delta(
                &before,
                AVAILABILITY,
                &avail(protocol, "success", "success", name),
                1.0,
            )
            .await;
        }
        sent += 2.0;
        s.assert_delta_now(&before, AVAILABILITY, &[], sent).await;
    }
    s.shutdown().await;
}

/// Once a chunk went out a stream never falls back: `[cut/m, good/m]` (connection cut after the
/// first chunk) and `[idle/m, good/m]` (nothing after the first chunk, idle timeout 300 ms).
/// Over HTTP the client sees the first chunk (model `cut/m`), then an error event
/// (`upstream_error` / `upstream_timeout`) and no `[DONE]`; over gRPC the chunk then an
/// UNAVAILABLE / DEADLINE_EXCEEDED status. The good upstream never sees these requests; the
/// alias counts as resolved to the first entry, there is no fallback, and the ledger and the
/// availability counter record a failure with that reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_never_falls_back_after_its_first_chunk() {
    let good = Scripted::start("good", Mode::Ok).await;
    let cut = Scripted::start("cut", Mode::CutAfterFirst).await;
    let idle = Scripted::start("idle", Mode::StallAfterFirst).await;
    let mut extra = routing(1000, 30, 300);
    extra += &provider("good", &good.base_url(), &["sk-good"]);
    extra += &provider("cut", &cut.base_url(), &["sk-cut"]);
    extra += &stalling_provider("idle", &idle.base_url(), &["sk-idle"]);
    extra += &alias("s_cut", "", &["cut/m", "good/m"]);
    extra += &alias("s_idle", "", &["idle/m", "good/m"]);
    let mut s = server(extra).await;
    let before = s.metrics().await;

    let cases = [
        ("s_cut", "cut/m", &cut, "upstream_error", Code::Unavailable),
        (
            "s_idle",
            "idle/m",
            &idle,
            "upstream_timeout",
            Code::DeadlineExceeded,
        ),
    ];
    let mut sent = 0.0;
    for (name, target, upstream, reason, code) in cases {
        let first_content = format!("{}-0", upstream.state.name);
        let rid = new_request_id();
        let resp = s.chat(&stream_body(name, &rid), Some(&rid)).await;
        assert_eq!(resp.status(), 200, "{name}");
        let (events, end) = SseReader::new(resp).collect().await;
        assert_eq!(
            end,
            SseEvent::End,
            "{name}: the body ends cleanly after the error event"
        );
        assert!(
            !events.iter().any(|e| e == "[DONE]"),
            "{name}: no [DONE] after a failure: {events:?}"
        );
        let values = chunks_of(&events);
        let (last, got) = values.split_last().expect("events");
        assert_eq!(
            last.pointer("/error/code"),
            Some(&json!(reason)),
            "{name}: {events:?}"
        );
        assert!(
            !got.is_empty(),
            "{name}: the first chunk reached the client: {events:?}"
        );
        assert!(
            got.iter().all(|c| c["model"] == target),
            "{name}: {events:?}"
        );
        assert_eq!(content_of(got), first_content, "{name}");
        assert!(upstream.saw(&rid));
        assert!(!good.saw(&rid), "{name}: no fallback after the first chunk");
        let row = s.ledger_row(&rid).await;
        assert!(row.stream);
        assert_eq!(
            (row.outcome.as_str(), row.reason.as_str()),
            ("failure", reason),
            "{name}"
        );
        assert_eq!(row.resolved_model.as_deref(), Some(target), "{name}");

        let rid = new_request_id();
        let (md_resolved, chunks, err) = grpc_stream(&s, name, &rid).await;
        assert_eq!(md_resolved.as_deref(), Some(target), "{name}");
        let err = err.unwrap_or_else(|| panic!("{name}: the gRPC stream must end in an error"));
        expect_grpc_error(&err, code, reason);
        let text: String = chunks.iter().map(|c| c.delta_content.as_str()).collect();
        assert_eq!(text, first_content, "{name}: the chunk before the failure");
        assert!(chunks.iter().all(|c| c.resolved_model == target));
        assert!(
            !good.saw(&rid),
            "{name}: no gRPC fallback after the first chunk"
        );

        for protocol in ["http", "grpc"] {
            s.expect_delta(
                &before,
                AVAILABILITY,
                &avail(protocol, "failure", reason, name),
                1.0,
            )
            .await;
        }
        sent += 2.0;
        s.assert_delta_now(&before, FALLBACK, &[("from_model", target)], 0.0)
            .await;
        s.assert_delta_now(&before, ALIAS_RESOLVED, &resolved(name, target), 2.0)
            .await;
        s.assert_delta_now(&before, ALIAS_RESOLVED, &resolved(name, "good/m"), 0.0)
            .await;
    }
    s.assert_delta_now(&before, AVAILABILITY, &[], sent).await;
    assert_eq!(good.count(), 0);
    s.shutdown().await;
}

// =============================================================================================
// 6. Listing aliases and health

/// `GET /v1/aliases` and gRPC Admin ListAliases list exactly the configured aliases, in name
/// order, with description and chain in chain order; `GET /v1/health` and GetHealth list every
/// configured provider, healthy at first, with key hints but never the keys; after a failure
/// with `unhealthy_after_failures = 1` both show the provider unhealthy with the same details.
/// The Admin RPCs want the admin token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aliases_and_health_are_listed_over_http_and_grpc() {
    let good = Scripted::start("good", Mode::Ok).await;
    let frail = Scripted::start("frail", Mode::Status(503)).await;
    let mut extra = routing(1, 45, 300);
    extra += &provider("good", &good.base_url(), &["sk-good-secret-1"]);
    extra += &provider("frail", &frail.base_url(), &["sk-frail-secret-1"]);
    extra += &alias("tiered", "three tiers", &["frail/m", "good/m", "mock/echo"]);
    let mut s = server(extra).await;
    let base = format!("http://{}", s.http);
    let config = tollgate::config::Config::from_toml_str(&s.config_text).unwrap();
    let mut admin = grpc_admin(s.grpc_addr).await;

    // Aliases over HTTP: exactly the configuration.
    let v = get_json(&s.client, &format!("{base}/v1/aliases")).await;
    let http_aliases: Vec<(String, String, Vec<String>)> = v["data"]
        .as_array()
        .unwrap_or_else(|| panic!("{v}"))
        .iter()
        .map(|a| {
            (
                a["alias"].as_str().unwrap().to_owned(),
                a["description"].as_str().unwrap().to_owned(),
                serde_json::from_value(a["chain"].clone()).unwrap(),
            )
        })
        .collect();
    let configured: Vec<(String, String, Vec<String>)> = config
        .aliases
        .iter()
        .map(|(n, a)| (n.clone(), a.description.clone(), a.chain.clone()))
        .collect();
    assert_eq!(http_aliases, configured);
    assert!(http_aliases.contains(&(
        "tiered".into(),
        "three tiers".into(),
        vec!["frail/m".into(), "good/m".into(), "mock/echo".into()]
    )));

    // ... and over gRPC, behind the admin token.
    for token in [None, Some("wrong-token")] {
        let err = admin
            .list_aliases(admin_req(ListAliasesRequest {}, token))
            .await
            .expect_err("ListAliases needs the admin token");
        assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
        let err = admin
            .get_health(admin_req(GetHealthRequest {}, token))
            .await
            .expect_err("GetHealth needs the admin token");
        assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    }
    let listed = admin
        .list_aliases(admin_req(ListAliasesRequest {}, Some(ADMIN_TOKEN)))
        .await
        .expect("ListAliases")
        .into_inner();
    let grpc_aliases: Vec<(String, String, Vec<String>)> = listed
        .aliases
        .into_iter()
        .map(|a| (a.alias, a.description, a.chain))
        .collect();
    assert_eq!(grpc_aliases, configured);

    // Health at first: every provider, healthy, keys by hint only.
    let v = get_json(&s.client, &format!("{base}/v1/health")).await;
    let text = v.to_string();
    assert!(
        !text.contains("sk-good-secret-1") && !text.contains("sk-frail-secret-1"),
        "{text}"
    );
    let names: Vec<&str> = v["providers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["provider"].as_str().unwrap())
        .collect();
    let configured_providers: Vec<&str> = config.providers.keys().map(String::as_str).collect();
    assert_eq!(names, configured_providers, "every provider, by name");
    for p in v["providers"].as_array().unwrap() {
        assert_eq!(p["healthy"], true, "{p}");
        assert_eq!(p["consecutive_failures"], 0, "{p}");
        assert_eq!(p["unhealthy_until_ms"], Value::Null, "{p}");
    }
    let good_keys = health_of(&s.client, &base, "good").await["keys"].clone();
    assert_eq!(good_keys.as_array().map(Vec::len), Some(1), "{good_keys}");

    // One failure marks frail unhealthy; both views agree.
    let t0 = s.clock.now_ms();
    let rid = new_request_id();
    let resp = s.chat(&chat_body("frail/m", &rid), Some(&rid)).await;
    expect_http_error(resp, 502, "upstream_error").await;
    let h = health_of(&s.client, &base, "frail").await;
    assert_eq!(h["healthy"], false, "{h}");
    assert_eq!(h["consecutive_failures"], 1, "{h}");
    let last_error = h["last_error"]
        .as_str()
        .unwrap_or_else(|| panic!("{h}"))
        .to_owned();
    assert!(
        last_error.contains("503") && last_error.contains("frail says 503"),
        "{h}"
    );
    let until = h["unhealthy_until_ms"].as_i64().unwrap();
    assert_eq!(until, t0 + 45_000, "a 45 s backoff from the failure: {h}");

    let g = admin
        .get_health(admin_req(GetHealthRequest {}, Some(ADMIN_TOKEN)))
        .await
        .expect("GetHealth")
        .into_inner();
    let grpc_names: Vec<&str> = g.providers.iter().map(|p| p.provider.as_str()).collect();
    assert_eq!(grpc_names, configured_providers);
    for p in &g.providers {
        if p.provider == "frail" {
            assert!(!p.healthy);
            assert_eq!(p.consecutive_failures, 1);
            assert_eq!(p.last_error.as_deref(), Some(last_error.as_str()));
            assert_eq!(p.unhealthy_until_ms, Some(until));
            assert_eq!(p.keys.len(), 1);
        } else {
            assert!(p.healthy, "{p:?}");
            assert_eq!(p.unhealthy_until_ms, None, "{p:?}");
        }
    }
    let grpc_text = format!("{g:?}");
    assert!(!grpc_text.contains("sk-frail-secret-1"), "{grpc_text}");
    let text = s.metrics().await;
    assert_eq!(
        metric_value(&text, PROVIDER_HEALTHY, &[("provider", "frail")]),
        0.0
    );
    for p in configured_providers.iter().filter(|p| **p != "frail") {
        assert_eq!(
            metric_value(&text, PROVIDER_HEALTHY, &[("provider", *p)]),
            1.0,
            "{p}\n{}",
            series_dump(&text, PROVIDER_HEALTHY)
        );
    }

    // The alias skips frail now and resolves to its second entry.
    let rid = new_request_id();
    let resp = s.chat(&chat_body("tiered", &rid), Some(&rid)).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(
        header(&resp, "x-tollgate-resolved-model").as_deref(),
        Some("good/m")
    );
    assert!(!frail.saw(&rid));
    s.shutdown().await;
}

// =============================================================================================
// 7. Reload, on the real binary

/// A config file for a child `tollgate serve`: the providers (all openai-compatible, one
/// scripted upstream each), aliases, `unhealthy_after_failures = 1` with a 60 s backoff.
fn child_config(
    db_url: &str,
    providers: &[(&str, &Scripted)],
    aliases: &[(&str, &str, &[&str])],
) -> String {
    let mut text = format!(
        "[server]\nhttp_addr = \"127.0.0.1:0\"\ngrpc_addr = \"127.0.0.1:0\"\n\
         admin_token = \"{ADMIN_TOKEN}\"\nshutdown_grace_secs = 1\n\n\
         [log]\nlevel = \"info\"\n\n\
         [database]\nurl = \"{db_url}\"\nledger_flush_ms = 10\n\n\
         [[auth.static_keys]]\nuser = \"alice\"\nkey = \"{ALICE_KEY}\"\n\n"
    );
    text += &routing(1, 60, 300);
    for (name, up) in providers {
        text += &provider(name, &up.base_url(), &[format!("sk-{name}").as_str()]);
    }
    for (name, description, chain) in aliases {
        text += &alias(name, description, chain);
    }
    text
}

/// A child process with its database and config file in a temp dir of its own.
struct Child {
    // Field order: the process is killed before its directory goes.
    process: Process,
    config: PathBuf,
    db: TestDb,
    client: reqwest::Client,
}

impl Child {
    async fn start(text_for: impl FnOnce(&str) -> String) -> Child {
        let db = TestDb::sqlite();
        let config = db.dir().unwrap().join("tollgate.toml");
        std::fs::write(&config, text_for(&db.url)).unwrap();
        let path = config.clone();
        let process = blocking(move || Process::serve(&path, DEADLINE)).await;
        Child {
            process,
            config,
            db,
            client: http_client(),
        }
    }

    fn write_config(&self, text: &str) {
        // Write then rename, so that a reload never reads half a file.
        let tmp = self.config.with_extension("tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, &self.config).unwrap();
    }

    fn base(&self) -> String {
        format!("http://{}", self.process.http)
    }

    /// A chat request: status and resolved model.
    async fn chat(&self, model: &str, marker: &str) -> (u16, Option<String>) {
        let resp = self
            .client
            .post(self.process.url("/v1/chat/completions"))
            .bearer_auth(ALICE_KEY)
            .json(&chat_body(model, marker))
            .send()
            .await
            .expect("chat request to the child");
        let status = resp.status().as_u16();
        let resolved = header(&resp, "x-tollgate-resolved-model");
        let text = resp.text().await.unwrap_or_default();
        assert!(
            status == 200 || resolved.is_none(),
            "an error carries no resolved model: {text}"
        );
        (status, resolved)
    }

    async fn reloads(&self, result: &str) -> f64 {
        let text = self
            .client
            .get(self.process.url("/metrics"))
            .send()
            .await
            .expect("GET /metrics")
            .text()
            .await
            .unwrap();
        metric_value(&text, RELOADS, &[("result", result)])
    }

    async fn wait_reloads(&self, result: &str, n: f64) {
        let what = format!("{RELOADS}{{result={result}}} to reach {n}");
        eventually(DEADLINE, &what, || async {
            let v = self.reloads(result).await;
            assert!(v <= n, "{what}: already {v}\n{}", self.process.log_text());
            (v == n).then_some(())
        })
        .await;
    }

    async fn reload_over_http(&self, token: Option<&str>) -> (u16, Value) {
        let mut rb = self.client.post(self.process.url("/admin/reload"));
        if let Some(t) = token {
            rb = rb.bearer_auth(t);
        }
        let resp = rb.send().await.expect("POST /admin/reload");
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(Value::Null))
    }
}

/// SIGHUP reloads the file of the real binary: the alias `switch` moves from `a/m` to `b/m`
/// (observed by polling: the other upstream answers, `/v1/aliases` shows the new chain,
/// `config_reloads_total{result="success"}` is 1). A file that does not parse, and then one that
/// parses but names an unknown provider, each count a `failure`, are logged, and leave the last
/// good configuration serving (still `b/m`); the process keeps running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_file_and_a_broken_file_keeps_the_last_good_config() {
    let a = Scripted::start("a", Mode::Ok).await;
    let b = Scripted::start("b", Mode::Ok).await;
    let ups = [("a", &a), ("b", &b)];
    let mut child =
        Child::start(|db| child_config(db, &ups, &[("switch", "to a", &["a/m"])])).await;
    let log = |c: &Child| c.process.log_text();

    let m = new_request_id();
    assert_eq!(
        child.chat("switch", &m).await,
        (200, Some("a/m".into())),
        "{}",
        log(&child)
    );
    assert!(a.saw(&m) && !b.saw(&m));
    assert_eq!(child.reloads("success").await, 0.0);

    child.write_config(&child_config(
        &child.db.url,
        &ups,
        &[("switch", "to b", &["b/m"])],
    ));
    child.process.signal("HUP");
    let m = eventually(DEADLINE, "SIGHUP to switch the alias to b/m", || async {
        let m = new_request_id();
        let (status, resolved) = child.chat("switch", &m).await;
        assert_eq!(status, 200, "{}", log(&child));
        (resolved.as_deref() == Some("b/m")).then_some(m)
    })
    .await;
    assert!(
        b.saw(&m) && !a.saw(&m),
        "the other upstream answers after the reload"
    );
    assert_eq!(
        listed_chain(&child.client, &child.base(), "switch").await,
        Some(vec!["b/m".into()])
    );
    child.wait_reloads("success", 1.0).await;
    assert_eq!(child.reloads("failure").await, 0.0);

    // A file that does not parse.
    let good_text = std::fs::read_to_string(&child.config).unwrap();
    child.write_config(&format!("{good_text}\n[aliases.switch\nchain = [\n"));
    child.process.signal("HUP");
    child.wait_reloads("failure", 1.0).await;
    // A file that parses but does not validate.
    child.write_config(&child_config(
        &child.db.url,
        &ups,
        &[("switch", "nowhere", &["nowhere/m"])],
    ));
    child.process.signal("HUP");
    child.wait_reloads("failure", 2.0).await;

    let m = new_request_id();
    assert_eq!(
        child.chat("switch", &m).await,
        (200, Some("b/m".into())),
        "the last good config stays"
    );
    assert!(b.saw(&m));
    assert_eq!(
        listed_chain(&child.client, &child.base(), "switch").await,
        Some(vec!["b/m".into()])
    );
    assert_eq!(child.reloads("success").await, 1.0);
    assert_eq!(
        child.process.exited(),
        None,
        "a bad file must not stop the process"
    );
    eventually(DEADLINE, "the failed reloads to be logged", || async {
        let text = log(&child);
        (text.matches("reload failed").count() >= 2 && text.contains("nowhere")).then_some(())
    })
    .await;
}

/// `POST /admin/reload` on the real binary: without or with a wrong admin token it is refused
/// (401) and nothing changes; with the token it answers `{"reloaded": true}` and the new
/// routing is in force at once (a changed chain to a new provider `c`, a new alias); provider
/// health outlives the reload (a provider marked unhealthy before stays unhealthy). A file that
/// does not validate answers 400 naming the problem, counts a failure and keeps the routing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_http_reload_applies_a_new_file_at_once() {
    let a = Scripted::start("a", Mode::Ok).await;
    let b = Scripted::start("b", Mode::Ok).await;
    let c = Scripted::start("c", Mode::Ok).await;
    let sick = Scripted::start("sick", Mode::Status(500)).await;
    let before_ups = [("a", &a), ("b", &b), ("sick", &sick)];
    let child = Child::start(|db| child_config(db, &before_ups, &[("switch", "", &["a/m"])])).await;
    let base = child.base();

    let (status, _) = child.chat("sick/m", &new_request_id()).await;
    assert_eq!(status, 502);
    assert_eq!(
        health_of(&child.client, &base, "sick").await["healthy"],
        false
    );

    let after_ups = [("a", &a), ("b", &b), ("c", &c), ("sick", &sick)];
    child.write_config(&child_config(
        &child.db.url,
        &after_ups,
        &[("switch", "", &["c/m"]), ("extra", "new alias", &["b/m"])],
    ));
    for token in [None, Some("not-the-admin-token")] {
        let (status, body) = child.reload_over_http(token).await;
        assert_eq!(status, 401, "{body}");
        assert_eq!(body["error"]["code"], "auth_rejected", "{body}");
    }
    assert_eq!(
        child.chat("switch", &new_request_id()).await,
        (200, Some("a/m".into()))
    );
    assert_eq!(
        child.reloads("success").await + child.reloads("failure").await,
        0.0
    );

    let (status, body) = child.reload_over_http(Some(ADMIN_TOKEN)).await;
    assert_eq!(
        (status, body.clone()),
        (200, json!({"reloaded": true})),
        "{}",
        child.process.log_text()
    );
    let m = new_request_id();
    assert_eq!(
        child.chat("switch", &m).await,
        (200, Some("c/m".into())),
        "in force at once"
    );
    assert!(c.saw(&m) && !a.saw(&m));
    let m = new_request_id();
    assert_eq!(child.chat("extra", &m).await, (200, Some("b/m".into())));
    assert!(b.saw(&m));
    assert_eq!(
        listed_chain(&child.client, &base, "extra").await,
        Some(vec!["b/m".into()])
    );
    assert_eq!(child.reloads("success").await, 1.0);
    let h = health_of(&child.client, &base, "sick").await;
    assert_eq!(h["healthy"], false, "health outlives a reload: {h}");
    assert_eq!(h["consecutive_failures"], 1, "{h}");
    assert_eq!(health_of(&child.client, &base, "c").await["healthy"], true);

    child.write_config(&child_config(
        &child.db.url,
        &after_ups,
        &[("switch", "", &["nowhere/m"])],
    ));
    let (status, body) = child.reload_over_http(Some(ADMIN_TOKEN)).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["code"], "invalid_request", "{body}");
    let msg = body["error"]["message"].as_str().unwrap_or_default();
    assert!(
        msg.contains("nowhere"),
        "the error names the bad entry: {body}"
    );
    assert_eq!(child.reloads("failure").await, 1.0);
    assert_eq!(
        child.chat("switch", &new_request_id()).await,
        (200, Some("c/m".into()))
    );
    assert_eq!(
        listed_chain(&child.client, &base, "extra").await,
        Some(vec!["b/m".into()])
    );
}

/// gRPC Admin ReloadConfig on the real binary: refused without the admin token (and nothing is
/// reloaded); with it, `reloaded: true` and ListAliases and Complete (metadata and field) show
/// the new chain at once; a file that does not parse is INVALID_ARGUMENT naming its line, counts
/// a failure and leaves the routing as it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_grpc_reload_applies_a_new_file_at_once() {
    let a = Scripted::start("a", Mode::Ok).await;
    let b = Scripted::start("b", Mode::Ok).await;
    let ups = [("a", &a), ("b", &b)];
    let child = Child::start(|db| child_config(db, &ups, &[("switch", "to a", &["a/m"])])).await;
    let mut admin = grpc_admin(child.process.grpc).await;
    let mut gateway = tollgate::proto::gateway_client::GatewayClient::connect(format!(
        "http://{}",
        child.process.grpc
    ))
    .await
    .expect("gRPC connect");

    child.write_config(&child_config(
        &child.db.url,
        &ups,
        &[("switch", "to b", &["b/m"])],
    ));
    let err = admin
        .reload_config(admin_req(ReloadConfigRequest {}, None))
        .await
        .expect_err("ReloadConfig needs the admin token");
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    let m = new_request_id();
    let r = gateway
        .complete(grpc_request(
            complete_request("switch", &m),
            Some(ALICE_KEY),
            None,
        ))
        .await
        .expect("Complete");
    assert_eq!(
        r.get_ref().resolved_model,
        "a/m",
        "not reloaded without the token"
    );

    let r = admin
        .reload_config(admin_req(ReloadConfigRequest {}, Some(ADMIN_TOKEN)))
        .await
        .expect("ReloadConfig")
        .into_inner();
    assert!(r.reloaded);
    let listed = admin
        .list_aliases(admin_req(ListAliasesRequest {}, Some(ADMIN_TOKEN)))
        .await
        .expect("ListAliases")
        .into_inner();
    let switch = listed
        .aliases
        .iter()
        .find(|a| a.alias == "switch")
        .expect("switch listed");
    assert_eq!(
        (switch.description.as_str(), switch.chain.clone()),
        ("to b", vec!["b/m".to_string()])
    );
    let m = new_request_id();
    let r = gateway
        .complete(grpc_request(
            complete_request("switch", &m),
            Some(ALICE_KEY),
            None,
        ))
        .await
        .expect("Complete");
    assert_eq!(md(&r, "x-tollgate-resolved-model").as_deref(), Some("b/m"));
    assert_eq!(r.get_ref().resolved_model, "b/m");
    assert_eq!(r.get_ref().content, b.answer());
    assert!(b.saw(&m) && !a.saw(&m));
    assert_eq!(child.reloads("success").await, 1.0);

    let good_text = std::fs::read_to_string(&child.config).unwrap();
    let broken_line = good_text.lines().count() + 2;
    child.write_config(&format!("{good_text}\n[aliases.switch\n"));
    let err = admin
        .reload_config(admin_req(ReloadConfigRequest {}, Some(ADMIN_TOKEN)))
        .await
        .expect_err("a broken file is refused");
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(
        err.message().contains(&format!("line {broken_line}")),
        "names the bad line {broken_line}: {err:?}"
    );
    assert_eq!(child.reloads("failure").await, 1.0);
    let m = new_request_id();
    let r = gateway
        .complete(grpc_request(
            complete_request("switch", &m),
            Some(ALICE_KEY),
            None,
        ))
        .await
        .expect("Complete after a failed reload");
    assert_eq!(
        r.get_ref().resolved_model,
        "b/m",
        "the last good config stays"
    );
}
