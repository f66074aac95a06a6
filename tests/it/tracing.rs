//! OpenTelemetry traces (issue 15): a real OTLP/HTTP receiver on a loopback port decodes the
//! `ExportTraceServiceRequest` bodies tollgate posts. For a request sent with a `traceparent`
//! it must get a server span under the caller's span and a client span per upstream attempt
//! under the server span, with the GenAI attributes and the upstream's token counts; the
//! upstream must get a `traceparent` of the same trace whose parent is the client span.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use futures_util::StreamExt;
use prost::Message;
use serde_json::json;
use tollgate::core::trace::otlp::{any_value, ExportTraceServiceRequest, Span};

use crate::common::upstream::{OK_CONTENT, OK_USAGE, STREAM_USAGE};
use crate::common::*;

const DEADLINE: Duration = Duration::from_secs(10);
const CALLER_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";

#[derive(Default)]
struct Received {
    spans: Vec<Span>,
    /// Every export body as it came, to search for text that must not be there.
    bodies: Vec<u8>,
    service_names: Vec<String>,
}

/// A collector's OTLP/HTTP traces endpoint.
struct Receiver {
    addr: std::net::SocketAddr,
    received: Arc<Mutex<Received>>,
}

async fn export(State(r): State<Arc<Mutex<Received>>>, body: Bytes) -> StatusCode {
    let Ok(req) = ExportTraceServiceRequest::decode(body.clone()) else {
        return StatusCode::BAD_REQUEST;
    };
    let mut r = r.lock().unwrap();
    r.bodies.extend_from_slice(&body);
    for rs in req.resource_spans {
        if let Some(res) = &rs.resource {
            for kv in &res.attributes {
                if kv.key == "service.name" {
                    r.service_names
                        .push(string_of(kv.value.as_ref()).unwrap_or_default());
                }
            }
        }
        for ss in rs.scope_spans {
            r.spans.extend(ss.spans);
        }
    }
    StatusCode::OK
}

impl Receiver {
    async fn start() -> Receiver {
        let received = Arc::new(Mutex::new(Received::default()));
        let app = axum::Router::new()
            .route("/v1/traces", post(export))
            .with_state(received.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        Receiver { addr, received }
    }

    /// The `[telemetry]` table pointing at this receiver.
    fn config(&self, extra: &str) -> String {
        format!(
            "[telemetry]\notlp_endpoint = \"http://{}\"\nbatch_interval_ms = 20\nservice_name = \"tollgate-test\"\n{extra}\n",
            self.addr
        )
    }

    /// Waits until the trace `trace_id` (hex) has a server span and `clients` client spans.
    async fn trace(&self, trace_id: &str, clients: usize) -> (Span, Vec<Span>) {
        eventually(DEADLINE, &format!("spans of trace {trace_id}"), || {
            let r = self.received.lock().unwrap();
            let of: Vec<&Span> = r
                .spans
                .iter()
                .filter(|s| hex::encode(&s.trace_id) == trace_id)
                .collect();
            let server = of.iter().find(|s| s.kind == 2).cloned().cloned();
            let client: Vec<Span> = of
                .iter()
                .filter(|s| s.kind == 3)
                .cloned()
                .cloned()
                .collect();
            let r = match server {
                Some(s) if client.len() >= clients => Some((s, client)),
                _ => None,
            };
            async move { r }
        })
        .await
    }

    fn bodies(&self) -> Vec<u8> {
        self.received.lock().unwrap().bodies.clone()
    }
}

fn string_of(v: Option<&tollgate::core::trace::otlp::AnyValue>) -> Option<String> {
    match v?.value.as_ref()? {
        any_value::Value::StringValue(s) => Some(s.clone()),
        _ => None,
    }
}

fn attr<'a>(span: &'a Span, key: &str) -> Option<&'a any_value::Value> {
    span.attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref())
        .and_then(|v| v.value.as_ref())
}

fn str_attr(span: &Span, key: &str) -> String {
    match attr(span, key) {
        Some(any_value::Value::StringValue(s)) => s.clone(),
        other => panic!("{}: attribute {key} is {other:?}, not a string", span.name),
    }
}

fn int_attr(span: &Span, key: &str) -> i64 {
    match attr(span, key) {
        Some(any_value::Value::IntValue(n)) => *n,
        other => panic!("{}: attribute {key} is {other:?}, not an int", span.name),
    }
}

fn strings_attr(span: &Span, key: &str) -> Vec<String> {
    match attr(span, key) {
        Some(any_value::Value::ArrayValue(a)) => a
            .values
            .iter()
            .map(|v| string_of(Some(v)).expect("a string"))
            .collect(),
        other => panic!("{}: attribute {key} is {other:?}, not an array", span.name),
    }
}

/// A caller's `traceparent` in [`CALLER_TRACE`] with a fresh span id (hex) of its own.
fn caller_traceparent(flags: &str) -> (String, String) {
    let span: [u8; 8] = rand::random();
    let span = hex::encode(span);
    (format!("00-{CALLER_TRACE}-{span}-{flags}"), span)
}

/// A trace id of its own per test, so parallel tests never see each other's spans.
fn new_trace() -> (String, String, String) {
    let trace = hex::encode(rand::random::<[u8; 16]>());
    let span = hex::encode(rand::random::<[u8; 8]>());
    (format!("00-{trace}-{span}-01"), trace, span)
}

/// The upstream's `traceparent`: same trace, its parent the client span, sampled.
fn assert_upstream_traceparent(got: Option<String>, trace: &str, client: &Span) {
    let got = got.expect("the upstream got a traceparent");
    assert_eq!(
        got,
        format!("00-{trace}-{}-01", hex::encode(&client.span_id)),
        "upstream traceparent"
    );
}

#[tokio::test]
async fn http_request_gets_a_server_span_under_the_caller_and_a_client_span_per_attempt() {
    let receiver = Receiver::start().await;
    let server = TestServer::sqlite(Opts {
        extra: receiver.config(""),
        ..Opts::default()
    })
    .await;
    let (traceparent, trace, caller_span) = new_trace();
    let marker = format!("tr-http-{}", new_request_id());
    let resp = server
        .chat_request(&chat_body("fast", &marker), None)
        .header("traceparent", &traceparent)
        .header("tracestate", "vendor=abc")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let (srv, clients) = receiver.trace(&trace, 1).await;
    assert_eq!(clients.len(), 1, "one attempt, one client span");
    let client = &clients[0];

    assert_eq!(
        hex::encode(&srv.parent_span_id),
        caller_span,
        "server span's parent"
    );
    assert_eq!(srv.name, "chat fast");
    assert_eq!(srv.trace_state, "vendor=abc");
    assert_eq!(str_attr(&srv, "gen_ai.operation.name"), "chat");
    assert_eq!(str_attr(&srv, "gen_ai.provider.name"), "openai");
    assert_eq!(str_attr(&srv, "gen_ai.request.model"), "fast");
    assert_eq!(str_attr(&srv, "gen_ai.response.model"), "up/ok");
    assert_eq!(int_attr(&srv, "gen_ai.usage.input_tokens"), OK_USAGE.0);
    assert_eq!(int_attr(&srv, "gen_ai.usage.output_tokens"), OK_USAGE.1);
    assert_eq!(
        strings_attr(&srv, "gen_ai.response.finish_reasons"),
        ["stop"]
    );
    assert_eq!(str_attr(&srv, "tollgate.reason"), "success");
    assert_eq!(str_attr(&srv, "tollgate.outcome"), "success");
    assert!(int_attr(&srv, "tollgate.user_id") > 0);
    assert_eq!(int_attr(&srv, "http.response.status_code"), 200);
    assert!(srv.status.is_none(), "a success has no error status");
    assert!(srv.end_time_unix_nano >= srv.start_time_unix_nano);
    let now_ns = now_ms() as u64 * 1_000_000;
    assert!(
        srv.start_time_unix_nano > now_ns - 60_000_000_000 && srv.start_time_unix_nano <= now_ns
    );

    assert_eq!(client.parent_span_id, srv.span_id, "client span's parent");
    assert_eq!(client.name, "chat ok");
    assert_eq!(str_attr(client, "gen_ai.provider.name"), "openai");
    assert_eq!(str_attr(client, "gen_ai.request.model"), "ok");
    assert_eq!(str_attr(client, "gen_ai.response.model"), "ok-2024-08-06");
    assert_eq!(str_attr(client, "tollgate.provider"), "up");
    assert_eq!(int_attr(client, "gen_ai.usage.input_tokens"), OK_USAGE.0);
    assert_eq!(int_attr(client, "gen_ai.usage.output_tokens"), OK_USAGE.1);
    assert!(client.start_time_unix_nano >= srv.start_time_unix_nano);
    assert!(client.end_time_unix_nano <= srv.end_time_unix_nano);

    let up = server
        .upstream
        .find("ok", &marker)
        .expect("upstream request");
    assert_upstream_traceparent(up.header("traceparent"), &trace, client);
    assert_eq!(up.header("tracestate").as_deref(), Some("vendor=abc"));

    // No content by default: neither the prompt nor the answer is in any export.
    let bodies = String::from_utf8_lossy(&receiver.bodies()).to_string();
    assert!(!bodies.contains(&marker), "the prompt must not be exported");
    assert!(
        !bodies.contains(OK_CONTENT),
        "the answer must not be exported"
    );
    assert!(receiver
        .received
        .lock()
        .unwrap()
        .service_names
        .iter()
        .all(|n| n == "tollgate-test"));
}

#[tokio::test]
async fn grpc_request_with_traceparent_metadata_is_traced_the_same_way() {
    let receiver = Receiver::start().await;
    let server = TestServer::sqlite(Opts {
        extra: receiver.config(""),
        ..Opts::default()
    })
    .await;
    let (traceparent, trace, caller_span) = new_trace();
    let marker = format!("tr-grpc-{}", new_request_id());
    let mut req = grpc_request(complete_request("fast", &marker), Some(ALICE_KEY), None);
    req.metadata_mut()
        .insert("traceparent", traceparent.parse().unwrap());
    server.grpc().await.complete(req).await.expect("complete");
    let (srv, clients) = receiver.trace(&trace, 1).await;
    assert_eq!(hex::encode(&srv.parent_span_id), caller_span);
    assert_eq!(str_attr(&srv, "rpc.system"), "grpc");
    assert_eq!(int_attr(&srv, "rpc.grpc.status_code"), 0);
    assert_eq!(str_attr(&srv, "tollgate.protocol"), "grpc");
    assert_eq!(int_attr(&srv, "gen_ai.usage.output_tokens"), OK_USAGE.1);
    assert_eq!(clients[0].parent_span_id, srv.span_id);
    let up = server
        .upstream
        .find("ok", &marker)
        .expect("upstream request");
    assert_upstream_traceparent(up.header("traceparent"), &trace, &clients[0]);
}

#[tokio::test]
async fn a_fallback_shows_one_client_span_per_attempt() {
    let receiver = Receiver::start().await;
    let server = TestServer::sqlite(Opts {
        extra: receiver.config(""),
        ..Opts::default()
    })
    .await;
    let (traceparent, trace, _) = new_trace();
    let marker = format!("tr-fallback-{}", new_request_id());
    let resp = server
        .chat_request(&chat_body("resilient", &marker), None)
        .header("traceparent", &traceparent)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let (srv, mut clients) = receiver.trace(&trace, 2).await;
    assert_eq!(clients.len(), 2, "two attempts");
    clients.sort_by_key(|s| s.start_time_unix_nano);
    let (failed, ok) = (&clients[0], &clients[1]);
    assert_eq!(failed.parent_span_id, srv.span_id);
    assert_eq!(ok.parent_span_id, srv.span_id);
    assert_eq!(str_attr(failed, "gen_ai.request.model"), "fail500");
    assert_eq!(str_attr(failed, "tollgate.provider"), "up");
    assert_eq!(str_attr(failed, "error.type"), "5xx");
    assert_eq!(int_attr(failed, "http.response.status_code"), 500);
    assert_eq!(
        failed.status.as_ref().map(|s| s.code),
        Some(2),
        "error status"
    );
    assert_eq!(str_attr(ok, "tollgate.provider"), "up2");
    assert!(ok.status.is_none());
    assert_eq!(int_attr(ok, "gen_ai.usage.output_tokens"), OK_USAGE.1);
    assert_eq!(str_attr(&srv, "gen_ai.response.model"), "up2/ok");
    // Each upstream request names its own attempt as parent.
    let first = server
        .upstream
        .find("fail500", &marker)
        .expect("first attempt");
    assert_upstream_traceparent(first.header("traceparent"), &trace, failed);
    let second = server.upstream.find("ok", &marker).expect("second attempt");
    assert_upstream_traceparent(second.header("traceparent"), &trace, ok);
}

#[tokio::test]
async fn capture_content_puts_prompt_and_answer_on_the_server_span() {
    let receiver = Receiver::start().await;
    let server = TestServer::sqlite(Opts {
        extra: receiver.config("capture_content = true"),
        ..Opts::default()
    })
    .await;
    let (traceparent, trace, _) = new_trace();
    let marker = format!("tr-content-{}", new_request_id());
    let resp = server
        .chat_request(&chat_body("fast", &marker), None)
        .header("traceparent", &traceparent)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let (srv, _) = receiver.trace(&trace, 1).await;
    let input: serde_json::Value =
        serde_json::from_str(&str_attr(&srv, "gen_ai.input.messages")).unwrap();
    let last = &input.as_array().unwrap().last().unwrap().clone();
    assert_eq!(last["role"], "user");
    assert_eq!(last["parts"][0]["content"], format!("hello {marker}"));
    let output: serde_json::Value =
        serde_json::from_str(&str_attr(&srv, "gen_ai.output.messages")).unwrap();
    assert_eq!(
        output,
        json!([{"role": "assistant", "parts": [{"type": "text", "content": OK_CONTENT}], "finish_reason": "stop"}])
    );
}

#[tokio::test]
async fn a_stream_span_ends_with_the_stream_and_carries_its_usage() {
    let receiver = Receiver::start().await;
    let server = TestServer::sqlite(Opts {
        extra: receiver.config(""),
        ..Opts::default()
    })
    .await;
    let (traceparent, trace, _) = new_trace();
    let marker = format!("tr-stream-{}", new_request_id());
    let mut body = chat_body("chatty", &marker);
    body["stream"] = json!(true);
    let resp = server
        .chat_request(&body, None)
        .header("traceparent", &traceparent)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut stream = resp.bytes_stream();
    while let Some(chunk) = stream.next().await {
        chunk.expect("stream chunk");
    }
    let (srv, clients) = receiver.trace(&trace, 1).await;
    assert_eq!(str_attr(&srv, "tollgate.stream"), "true");
    assert_eq!(int_attr(&srv, "gen_ai.usage.input_tokens"), STREAM_USAGE.0);
    assert_eq!(int_attr(&srv, "gen_ai.usage.output_tokens"), STREAM_USAGE.1);
    assert_eq!(
        strings_attr(&srv, "gen_ai.response.finish_reasons"),
        ["stop"]
    );
    let client = &clients[0];
    assert_eq!(
        int_attr(client, "gen_ai.usage.output_tokens"),
        STREAM_USAGE.1
    );
    assert!(client.end_time_unix_nano <= srv.end_time_unix_nano);
}

#[tokio::test]
async fn an_unsampled_caller_gets_no_spans_but_its_trace_goes_upstream() {
    let receiver = Receiver::start().await;
    let server = TestServer::sqlite(Opts {
        extra: receiver.config(""),
        ..Opts::default()
    })
    .await;
    let (unsampled, _) = caller_traceparent("00");
    let marker = format!("tr-unsampled-{}", new_request_id());
    let resp = server
        .chat_request(&chat_body("fast", &marker), None)
        .header("traceparent", &unsampled)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let up = server
        .upstream
        .find("ok", &marker)
        .expect("upstream request");
    let got = up.header("traceparent").expect("traceparent upstream");
    assert!(
        got.starts_with(&format!("00-{CALLER_TRACE}-")) && got.ends_with("-00"),
        "{got}"
    );
    // Spans leave in order: once a later sampled request's spans are in, the unsampled one's
    // would have been too.
    let (traceparent, trace, _) = new_trace();
    let resp = server
        .chat_request(&chat_body("fast", "tr-after"), None)
        .header("traceparent", &traceparent)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    receiver.trace(&trace, 1).await;
    let r = receiver.received.lock().unwrap();
    assert!(
        r.spans
            .iter()
            .all(|s| hex::encode(&s.trace_id) != CALLER_TRACE),
        "an unsampled trace must not be recorded"
    );
}

#[tokio::test]
async fn without_an_endpoint_the_callers_traceparent_goes_upstream_unchanged() {
    let server = TestServer::sqlite(Opts::default()).await;
    let (traceparent, _) = caller_traceparent("01");
    let marker = format!("tr-off-{}", new_request_id());
    let resp = server
        .chat_request(&chat_body("fast", &marker), None)
        .header("traceparent", &traceparent)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let up = server
        .upstream
        .find("ok", &marker)
        .expect("upstream request");
    assert_eq!(up.header("traceparent"), Some(traceparent));
    // A request without one sends none.
    let marker = format!("tr-off-none-{}", new_request_id());
    let resp = server.chat(&chat_body("fast", &marker), None).await;
    assert_eq!(resp.status(), 200);
    let up = server
        .upstream
        .find("ok", &marker)
        .expect("upstream request");
    assert_eq!(up.header("traceparent"), None);
}

#[tokio::test]
async fn key_pool_retries_show_as_events_on_the_attempt() {
    let receiver = Receiver::start().await;
    let server = TestServer::sqlite(Opts {
        extra: receiver.config(""),
        ..Opts::default()
    })
    .await;
    let (traceparent, trace, _) = new_trace();
    let marker = format!("tr-keys-{}", new_request_id());
    let resp = server
        .chat_request(&chat_body("pool/ok", &marker), None)
        .header("traceparent", &traceparent)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let (_, clients) = receiver.trace(&trace, 1).await;
    assert_eq!(clients.len(), 1, "one provider attempt");
    let client = &clients[0];
    assert_eq!(str_attr(client, "tollgate.provider"), "pool");
    assert_eq!(int_attr(client, "tollgate.keys_rejected"), 2);
    let events: Vec<(String, i64, i64)> = client
        .events
        .iter()
        .map(|e| {
            let int = |k: &str| {
                e.attributes
                    .iter()
                    .find(|kv| kv.key == k)
                    .and_then(|kv| kv.value.as_ref()?.value.as_ref())
                    .map(|v| match v {
                        any_value::Value::IntValue(n) => *n,
                        other => panic!("{k}: {other:?}"),
                    })
                    .unwrap_or(-1)
            };
            (
                e.name.clone(),
                int("tollgate.key_index"),
                int("http.response.status_code"),
            )
        })
        .collect();
    assert_eq!(
        events,
        [
            ("tollgate.key_rejected".to_string(), 0, 429),
            ("tollgate.key_rejected".to_string(), 1, 401)
        ]
    );
    // Every key's request went out in the attempt's context.
    let sent: Vec<Option<String>> = server
        .upstream
        .requests_for("ok")
        .into_iter()
        .filter(|r| r.body.to_string().contains(&marker))
        .map(|r| r.header("traceparent"))
        .collect();
    assert_eq!(sent.len(), 3, "three keys tried");
    for got in sent {
        assert_upstream_traceparent(got, &trace, client);
    }
    // Keys never reach an export.
    let bodies = String::from_utf8_lossy(&receiver.bodies()).to_string();
    assert!(!bodies.contains("sk-"), "no key in spans");
}

/// On the binary: with a batch interval far longer than the test, the spans can only arrive
/// through the export a graceful stop makes of what is queued.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_stop_exports_the_queued_spans() {
    use crate::common::process::Process;
    let receiver = Receiver::start().await;
    let upstream = crate::common::upstream::Upstream::start().await;
    let db = TestDb::sqlite();
    let opts = Opts {
        extra: format!(
            "[telemetry]\notlp_endpoint = \"http://{}\"\nbatch_interval_ms = 3600000\n",
            receiver.addr
        ),
        ..Opts::default()
    };
    let text = config_toml(&db.url, &upstream.base_url(), &opts);
    let path = db.dir().unwrap().join("tollgate.toml");
    std::fs::write(&path, text).unwrap();
    let mut process = blocking(move || Process::serve(&path, DEADLINE)).await;
    let (traceparent, trace, _) = new_trace();
    let resp = http_client()
        .post(process.url("/v1/chat/completions"))
        .bearer_auth(ALICE_KEY)
        .header("traceparent", &traceparent)
        .json(&chat_body("fast", "tr-shutdown"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    // Nothing is exported before the stop: the first tick of the interval had an empty batch.
    assert!(receiver.received.lock().unwrap().spans.is_empty());
    process.signal("TERM");
    let status = eventually(DEADLINE, "tollgate to exit", || {
        let s = process.exited();
        async move { s }
    })
    .await;
    assert!(status.success(), "exit status {status:?}");
    let (srv, clients) = receiver.trace(&trace, 1).await;
    assert_eq!(srv.name, "chat fast");
    assert_eq!(clients.len(), 1);
}
