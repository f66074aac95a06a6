//! Hostile upstreams: a raw TCP server on a loopback port that speaks just enough HTTP/1.1 to
//! misbehave in the ways real upstreams do (broken SSE, streams that end early, answers that are
//! not what they claim, connections reset mid-body, peers that accept and never answer). Each
//! case checks the caller's error in its protocol's shape, the reason on the availability
//! counter and in the ledger, and that a good request afterwards still succeeds.
//!
//! Covered elsewhere and not repeated here: a never-ending body and a never-ending SSE line cut
//! at `max_response_bytes` (faults.rs), a 200 whose JSON is garbled and an axum body error after
//! two chunks (chat.rs).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tollgate::proto::CompleteChunk;
use tonic::Code;

use crate::common::*;

/// Behaviours, by the upstream model name the gateway sends (OpenAI wire unless `claude-`).
///
/// | model | behaviour |
/// |---|---|
/// | `bad-line` | SSE: chunk `a`, then a `data:` line that is not JSON, then more chunks and `[DONE]` |
/// | `no-done` | SSE: chunks `a`, `b` (no finish_reason), then a clean EOF: no `[DONE]` |
/// | `not-json` | 200 whose body is HTML (as `application/json`, or as `text/event-stream`) |
/// | `no-choices` | 200 chat.completion (or one chunk and `[DONE]`) without `choices` |
/// | `reset` | 200 with half a body (one chunk when streaming), then a TCP reset |
/// | `silent` | reads the request, never answers |
/// | `stalled` | SSE: chunk `a`, then silence with the connection open |
/// | `trickle` | 200, then a byte (JSON whitespace, or an SSE comment) every 100 ms, forever |
/// | `claude-delta-first` | Messages SSE: `content_block_delta` before `message_start` |
/// | `claude-orphan-delta` | Messages SSE: `message_start`, then a delta for a block never started |
struct Hostile {
    addr: SocketAddr,
}

impl Hostile {
    async fn start() -> Hostile {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            while let Ok((sock, _)) = listener.accept().await {
                tokio::spawn(serve(sock));
            }
        });
        Hostile { addr }
    }
}

/// A listener whose accept queue is full, so that a new connection's SYN is dropped and its
/// connect hangs: the peer of a connect timeout. Holds the queued connections open.
struct Blackhole {
    addr: SocketAddr,
    _listener: tokio::net::TcpListener,
    _queued: Vec<TcpStream>,
}

impl Blackhole {
    async fn start() -> Blackhole {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket.bind("127.0.0.1:0".parse().unwrap()).expect("bind");
        let listener = socket.listen(0).expect("listen");
        let addr = listener.local_addr().expect("addr");
        let mut queued = Vec::new();
        // Fill the queue (never accepted) until a connect no longer completes.
        for _ in 0..16 {
            match tokio::time::timeout(Duration::from_millis(200), TcpStream::connect(addr)).await {
                Ok(Ok(s)) => queued.push(s),
                _ => {
                    return Blackhole {
                        addr,
                        _listener: listener,
                        _queued: queued,
                    }
                }
            }
        }
        panic!("the accept queue of a backlog-0 listener never filled");
    }
}

/// Reads one request (head and a `content-length` body): its path and JSON body.
async fn read_request(sock: &mut TcpStream) -> Option<(String, Value)> {
    let mut seen = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = sock.read(&mut buf).await.ok()?;
        if n == 0 {
            return None;
        }
        seen.extend_from_slice(&buf[..n]);
        let Some(end) = seen.windows(4).position(|w| w == b"\r\n\r\n") else {
            continue;
        };
        let head = String::from_utf8_lossy(&seen[..end]).to_lowercase();
        let len: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        if seen.len() >= end + 4 + len {
            let path = head.split_whitespace().nth(1).unwrap_or("").to_owned();
            let body = serde_json::from_slice(&seen[end + 4..end + 4 + len]).unwrap_or(Value::Null);
            return Some((path, body));
        }
    }
}

fn chunk(content: Option<&str>, finish: Option<&str>) -> String {
    let delta = content.map_or(json!({}), |c| json!({"content": c}));
    let v = json!({"id": "chatcmpl-h", "object": "chat.completion.chunk", "created": 1,
        "model": "m", "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]});
    format!("data: {v}\n\n")
}

fn event(name: &str, data: Value) -> String {
    format!("event: {name}\ndata: {data}\n\n")
}

/// A response head; without a length the body ends when the connection closes.
fn head(ctype: &str, length: Option<usize>) -> String {
    let length = length.map_or(String::new(), |n| format!("content-length: {n}\r\n"));
    format!("HTTP/1.1 200 OK\r\ncontent-type: {ctype}\r\n{length}connection: close\r\n\r\n")
}

const SSE: &str = "text/event-stream";

async fn serve(mut sock: TcpStream) {
    let Some((path, body)) = read_request(&mut sock).await else {
        return;
    };
    let model = body["model"].as_str().unwrap_or("").to_owned();
    let stream = body["stream"].as_bool().unwrap_or(false);
    let out = |parts: Vec<String>| parts.concat().into_bytes();
    let message_start = json!({"type": "message_start", "message": {"id": "msg_h", "type": "message",
        "role": "assistant", "model": "claude-h", "content": [], "stop_reason": null,
        "usage": {"input_tokens": 5, "output_tokens": 1}}});
    let text_delta = |i: u64| json!({"type": "content_block_delta", "index": i, "delta": {"type": "text_delta", "text": "x"}});
    let anthropic_tail = vec![
        event(
            "message_delta",
            json!({"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 3}}),
        ),
        event("message_stop", json!({"type": "message_stop"})),
    ];
    let bytes: Vec<u8> = match (model.as_str(), stream) {
        ("bad-line", _) => out(vec![
            head(SSE, None),
            chunk(Some("a"), None),
            "data: {\"choices\": [oops this is not json\n\n".into(),
            chunk(Some("b"), Some("stop")),
            "data: [DONE]\n\n".into(),
        ]),
        ("no-done", _) => out(vec![
            head(SSE, None),
            chunk(Some("a"), None),
            chunk(Some("b"), None),
        ]),
        ("not-json", false) => {
            let b = "<html><body>502 Bad Gateway</body></html>";
            out(vec![head("application/json", Some(b.len())), b.into()])
        }
        ("not-json", true) => out(vec![
            head(SSE, None),
            "<html><body>502 Bad Gateway</body></html>\n".into(),
        ]),
        ("no-choices", false) => {
            let b = json!({"id": "chatcmpl-h", "object": "chat.completion", "created": 1,
                "model": "m", "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}})
            .to_string();
            out(vec![head("application/json", Some(b.len())), b])
        }
        ("no-choices", true) => {
            let c = json!({"id": "chatcmpl-h", "object": "chat.completion.chunk", "created": 1, "model": "m"});
            out(vec![
                head(SSE, None),
                format!("data: {c}\n\n"),
                "data: [DONE]\n\n".into(),
            ])
        }
        ("reset", s) => {
            let first = if s {
                head(SSE, None) + &chunk(Some("a"), None)
            } else {
                head("application/json", Some(400))
                    + "{\"id\":\"chatcmpl-h\",\"object\":\"chat.comp"
            };
            let _ = sock.write_all(first.as_bytes()).await;
            let _ = sock.flush().await;
            tokio::time::sleep(Duration::from_millis(100)).await;
            // SO_LINGER 0: close sends a RST, not a FIN (and a zero linger never blocks).
            #[allow(deprecated)]
            let _ = sock.set_linger(Some(Duration::ZERO));
            return;
        }
        ("silent", _) => {
            tokio::time::sleep(Duration::from_secs(30)).await;
            return;
        }
        ("stalled", _) => {
            let first = head(SSE, None) + &chunk(Some("a"), None);
            let _ = sock.write_all(first.as_bytes()).await;
            tokio::time::sleep(Duration::from_secs(30)).await;
            return;
        }
        ("trickle", s) => {
            let (h, drip): (String, &[u8]) = if s {
                (head(SSE, None), b": keep-alive\n\n")
            } else {
                (head("application/json", Some(1 << 20)), b" ")
            };
            if sock.write_all(h.as_bytes()).await.is_err() {
                return;
            }
            for _ in 0..300 {
                tokio::time::sleep(Duration::from_millis(100)).await;
                if sock.write_all(drip).await.is_err() {
                    return;
                }
            }
            return;
        }
        ("claude-delta-first", _) => {
            let mut parts = vec![
                head(SSE, None),
                event("content_block_delta", text_delta(0)),
                event("message_start", message_start),
            ];
            parts.extend(anthropic_tail);
            out(parts)
        }
        ("claude-orphan-delta", _) => {
            let mut parts = vec![
                head(SSE, None),
                event("message_start", message_start),
                event("content_block_delta", text_delta(3)),
            ];
            parts.extend(anthropic_tail);
            out(parts)
        }
        (other, _) => {
            let b = json!({"error": {"message": format!("no behaviour {other} at {path}")}})
                .to_string();
            format!(
                "HTTP/1.1 404 Not Found\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{b}",
                b.len()
            )
            .into_bytes()
        }
    };
    let _ = sock.write_all(&bytes).await;
    let _ = sock.shutdown().await;
}

/// Aliases (named as the behaviour) of the hostile providers, and their deadlines.
const CONNECT_MS: u64 = 300;
const FIRST_BYTE_MS: u64 = 700;
const IDLE_MS: u64 = 700;
const TOTAL_MS: u64 = 1800;

async fn start() -> (TestServer, Hostile, Blackhole) {
    let h = Hostile::start().await;
    let bh = Blackhole::start().await;
    let mut extra = format!(
        r#"
[routing]
# Every case must reach its upstream: no provider is taken out of rotation here.
unhealthy_after_failures = 1000000

[providers.hostile]
kind = "openai"
base_url = "http://{addr}/v1"
keys = ["sk-hostile"]
connect_timeout_ms = {CONNECT_MS}
first_byte_timeout_ms = {FIRST_BYTE_MS}
idle_timeout_ms = {IDLE_MS}
total_timeout_ms = {TOTAL_MS}

[providers.hostile_claude]
kind = "anthropic"
base_url = "http://{addr}"
keys = ["sk-hostile"]
anthropic_version = "2023-06-01"
default_max_tokens = 64
connect_timeout_ms = {CONNECT_MS}
first_byte_timeout_ms = {FIRST_BYTE_MS}
idle_timeout_ms = {IDLE_MS}
total_timeout_ms = {TOTAL_MS}

[aliases.claude-trickle]
chain = ["hostile_claude/trickle"]

[providers.blackhole]
kind = "openai"
base_url = "http://{bh}/v1"
keys = ["sk-hostile"]
connect_timeout_ms = {CONNECT_MS}
first_byte_timeout_ms = 5000
total_timeout_ms = 5000

[aliases.unreachable]
chain = ["blackhole/m"]
"#,
        addr = h.addr,
        bh = bh.addr,
    );
    for m in [
        "bad-line",
        "no-done",
        "not-json",
        "no-choices",
        "reset",
        "silent",
        "stalled",
        "trickle",
    ] {
        extra.push_str(&format!("\n[aliases.{m}]\nchain = [\"hostile/{m}\"]\n"));
    }
    for m in ["claude-delta-first", "claude-orphan-delta"] {
        extra.push_str(&format!(
            "\n[aliases.{m}]\nchain = [\"hostile_claude/{m}\"]\n"
        ));
    }
    let s = TestServer::sqlite(Opts {
        extra,
        ..Opts::default()
    })
    .await;
    (s, h, bh)
}

fn stream_body(model: &str, rid: &str) -> Value {
    let mut b = chat_body(model, rid);
    b["stream"] = json!(true);
    b
}

/// A streamed HTTP chat whose stream started: the data events before the error event, and the
/// error event's `error` object (the body must end cleanly, without `[DONE]`).
async fn http_stream_error(s: &TestServer, model: &str, rid: &str) -> (Vec<Value>, Value) {
    let resp = s.chat(&stream_body(model, rid), Some(rid)).await;
    assert_eq!(resp.status(), 200, "{model}: the stream had started");
    let (events, end) = SseReader::new(resp).collect().await;
    assert_eq!(
        end,
        SseEvent::End,
        "{model}: the gateway ends the body itself"
    );
    assert!(
        !events.iter().any(|e| e == "[DONE]"),
        "{model}: no [DONE] after a failure: {events:?}"
    );
    let mut parsed: Vec<Value> = events
        .iter()
        .map(|e| serde_json::from_str(e).unwrap_or_else(|_| panic!("{model}: event {e}")))
        .collect();
    let last = parsed.pop().expect("events");
    let err = last
        .get("error")
        .unwrap_or_else(|| panic!("{model}: the last event is not an error: {events:?}"))
        .clone();
    (parsed, err)
}

/// A gRPC StreamComplete that ends in an error: the chunks before it and the status.
async fn grpc_stream(
    s: &TestServer,
    model: &str,
    rid: &str,
) -> (Vec<CompleteChunk>, tonic::Status) {
    let mut stream = match s
        .grpc()
        .await
        .stream_complete(grpc_request(
            complete_request(model, rid),
            Some(ALICE_KEY),
            Some(rid),
        ))
        .await
    {
        Ok(r) => r.into_inner(),
        Err(status) => return (Vec::new(), status),
    };
    let mut chunks = Vec::new();
    loop {
        match stream.message().await {
            Ok(Some(c)) => chunks.push(c),
            Ok(None) => panic!("{model}: the gRPC stream ended without an error: {chunks:?}"),
            Err(status) => return (chunks, status),
        }
    }
}

/// A gRPC Complete that must fail.
async fn grpc_complete_error(s: &TestServer, model: &str, rid: &str) -> tonic::Status {
    s.grpc()
        .await
        .complete(grpc_request(
            complete_request(model, rid),
            Some(ALICE_KEY),
            Some(rid),
        ))
        .await
        .expect_err(model)
}

/// The ledger row of `rid` says `failure` / `reason`.
async fn expect_failure_row(s: &TestServer, rid: &str, reason: &str) {
    let row = s.ledger_row(rid).await;
    assert_eq!(
        (row.outcome.as_str(), row.reason.as_str()),
        ("failure", reason),
        "ledger row of {rid}"
    );
}

/// After the hostile cases a good request over each protocol still succeeds.
async fn still_healthy(s: &TestServer) {
    let resp = s.chat(&chat_body("fast", "after"), None).await;
    assert_eq!(
        resp.status(),
        200,
        "a good HTTP request after the hostile ones"
    );
    let body: Value = resp.json().await.unwrap();
    assert_eq!(
        body["choices"][0]["message"]["content"],
        upstream::OK_CONTENT
    );
    s.grpc()
        .await
        .complete(grpc_request(
            complete_request("fast", "after"),
            Some(ALICE_KEY),
            None,
        ))
        .await
        .expect("a good gRPC request after the hostile ones");
}

/// A data line that is not JSON, and a stream that ends without `[DONE]` or a finish_reason:
/// the chunks before it reach the caller, then an `upstream_error` (SSE error event; gRPC
/// UNAVAILABLE), one failure each on the counter and in the ledger.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_sse_streams_end_in_upstream_error() {
    let (mut s, _h, _bh) = start().await;
    let before = s.metrics().await;
    for model in ["bad-line", "no-done"] {
        let rid = new_request_id();
        let (chunks, err) = http_stream_error(&s, model, &rid).await;
        assert_eq!(err["code"], "upstream_error", "{model}: {err}");
        assert!(err["message"].as_str().is_some_and(|m| !m.is_empty()));
        assert_eq!(
            chunks
                .first()
                .and_then(|c| c.pointer("/choices/0/delta/content")),
            Some(&json!("a")),
            "{model}: the first chunk went out: {chunks:?}"
        );
        expect_failure_row(&s, &rid, "upstream_error").await;

        let rid = new_request_id();
        let (chunks, status) = grpc_stream(&s, model, &rid).await;
        expect_grpc_error(&status, Code::Unavailable, "upstream_error");
        assert!(
            chunks.iter().any(|c| c.delta_content == "a"),
            "{model}: {chunks:?}"
        );
        expect_failure_row(&s, &rid, "upstream_error").await;
        for protocol in ["http", "grpc"] {
            s.expect_delta(
                &before,
                AVAILABILITY,
                &avail(protocol, "failure", "upstream_error", model),
                1.0,
            )
            .await;
        }
    }
    s.assert_delta_now(&before, AVAILABILITY, &[], 4.0).await;
    still_healthy(&s).await;
    s.shutdown().await;
}

/// Answers that are not what they claim: HTML as JSON or as SSE, a chat.completion (or a chunk)
/// without `choices`. Nothing reached the caller yet, so each is a 502 `upstream_error` in the
/// OpenAI shape (gRPC UNAVAILABLE), streamed or not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_that_are_not_chat_completions_are_upstream_error() {
    let (mut s, _h, _bh) = start().await;
    let before = s.metrics().await;
    for model in ["not-json", "no-choices"] {
        for streamed in [false, true] {
            let rid = new_request_id();
            let body = if streamed {
                stream_body(model, &rid)
            } else {
                chat_body(model, &rid)
            };
            let resp = s.chat(&body, Some(&rid)).await;
            expect_http_error(resp, 502, "upstream_error").await;
            expect_failure_row(&s, &rid, "upstream_error").await;
        }
        let rid = new_request_id();
        let status = grpc_complete_error(&s, model, &rid).await;
        expect_grpc_error(&status, Code::Unavailable, "upstream_error");
        expect_failure_row(&s, &rid, "upstream_error").await;
        let rid = new_request_id();
        let (chunks, status) = grpc_stream(&s, model, &rid).await;
        expect_grpc_error(&status, Code::Unavailable, "upstream_error");
        assert!(chunks.is_empty(), "{model}: {chunks:?}");
        expect_failure_row(&s, &rid, "upstream_error").await;
        s.expect_delta(
            &before,
            AVAILABILITY,
            &avail("http", "failure", "upstream_error", model),
            2.0,
        )
        .await;
        s.expect_delta(
            &before,
            AVAILABILITY,
            &avail("grpc", "failure", "upstream_error", model),
            2.0,
        )
        .await;
    }
    s.assert_delta_now(&before, AVAILABILITY, &[], 8.0).await;
    still_healthy(&s).await;
    s.shutdown().await;
}

/// A TCP reset in the middle of the body: non-streamed a 502 `upstream_error`; streamed, after
/// the first chunk, an error event (gRPC: the chunk, then UNAVAILABLE).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_mid_body_is_upstream_error() {
    let (mut s, _h, _bh) = start().await;
    let before = s.metrics().await;
    let rid = new_request_id();
    let resp = s.chat(&chat_body("reset", &rid), Some(&rid)).await;
    expect_http_error(resp, 502, "upstream_error").await;
    expect_failure_row(&s, &rid, "upstream_error").await;

    let rid = new_request_id();
    let (chunks, err) = http_stream_error(&s, "reset", &rid).await;
    assert_eq!(err["code"], "upstream_error", "{err}");
    assert_eq!(chunks.len(), 1, "{chunks:?}");
    expect_failure_row(&s, &rid, "upstream_error").await;

    let rid = new_request_id();
    let status = grpc_complete_error(&s, "reset", &rid).await;
    expect_grpc_error(&status, Code::Unavailable, "upstream_error");
    let rid = new_request_id();
    let (chunks, status) = grpc_stream(&s, "reset", &rid).await;
    expect_grpc_error(&status, Code::Unavailable, "upstream_error");
    assert_eq!(chunks.len(), 1, "{chunks:?}");
    expect_failure_row(&s, &rid, "upstream_error").await;

    for protocol in ["http", "grpc"] {
        s.expect_delta(
            &before,
            AVAILABILITY,
            &avail(protocol, "failure", "upstream_error", "reset"),
            2.0,
        )
        .await;
    }
    s.assert_delta_now(&before, AVAILABILITY, &[], 4.0).await;
    still_healthy(&s).await;
    s.shutdown().await;
}

/// The four upstream deadlines, each on a peer that trips only it: a connect that never
/// completes (`connect_timeout_ms`), a peer that accepts and never answers
/// (`first_byte_timeout_ms`), a stream that stops after its first chunk (`idle_timeout_ms`),
/// and a body that trickles in forever, too slowly to finish but never idle
/// (`total_timeout_ms`). Each is `upstream_timeout` (504 / DEADLINE_EXCEEDED, or an error event
/// once a chunk went out), names its phase, and fires at its own deadline, not another's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_first_byte_idle_and_total_timeouts_are_told_apart() {
    let (mut s, _h, _bh) = start().await;
    let before = s.metrics().await;
    // (alias, streamed, phase named in the message, its deadline)
    let cases = [
        ("unreachable", false, "connect", CONNECT_MS),
        ("silent", false, "first byte", FIRST_BYTE_MS),
        ("silent", true, "first byte", FIRST_BYTE_MS),
        ("trickle", false, "total", TOTAL_MS),
        ("trickle", true, "total", TOTAL_MS),
    ];
    let runs = cases.iter().map(|&(model, streamed, phase, ms)| {
        let s = &s;
        async move {
            let rid = new_request_id();
            let body = if streamed {
                stream_body(model, &rid)
            } else {
                chat_body(model, &rid)
            };
            let started = Instant::now();
            let resp = s.chat(&body, Some(&rid)).await;
            let body = expect_http_error(resp, 504, "upstream_timeout").await;
            let took = started.elapsed();
            let message = body["error"]["message"].as_str().unwrap_or("").to_owned();
            assert!(
                message.contains(&format!("waiting for {phase}")),
                "{model} (streamed: {streamed}): {message}"
            );
            assert!(
                took >= Duration::from_millis(ms) && took < Duration::from_millis(ms + 1500),
                "{model} (streamed: {streamed}) took {took:?}, its deadline is {ms} ms"
            );
            expect_failure_row(s, &rid, "upstream_timeout").await;
        }
    });
    futures_util::future::join_all(runs).await;

    // Idle: the first chunk went out, so the timeout is an error event after it.
    let rid = new_request_id();
    let started = Instant::now();
    let (chunks, err) = http_stream_error(&s, "stalled", &rid).await;
    let took = started.elapsed();
    assert_eq!(err["code"], "upstream_timeout", "{err}");
    assert!(
        err["message"]
            .as_str()
            .is_some_and(|m| m.contains("next chunk")),
        "{err}"
    );
    assert_eq!(chunks.len(), 1, "{chunks:?}");
    assert!(
        took >= Duration::from_millis(IDLE_MS) && took < Duration::from_millis(TOTAL_MS),
        "idle timeout took {took:?}"
    );
    expect_failure_row(&s, &rid, "upstream_timeout").await;

    // gRPC: the same reasons, as DEADLINE_EXCEEDED.
    let rid = new_request_id();
    let status = grpc_complete_error(&s, "silent", &rid).await;
    expect_grpc_error(&status, Code::DeadlineExceeded, "upstream_timeout");
    let rid = new_request_id();
    let (chunks, status) = grpc_stream(&s, "stalled", &rid).await;
    expect_grpc_error(&status, Code::DeadlineExceeded, "upstream_timeout");
    assert_eq!(chunks.len(), 1, "{chunks:?}");

    let expected = [
        ("http", "unreachable", 1.0),
        ("http", "silent", 2.0),
        ("http", "trickle", 2.0),
        ("http", "stalled", 1.0),
        ("grpc", "silent", 1.0),
        ("grpc", "stalled", 1.0),
    ];
    for (protocol, model, n) in expected {
        s.expect_delta(
            &before,
            AVAILABILITY,
            &avail(protocol, "failure", "upstream_timeout", model),
            n,
        )
        .await;
    }
    s.assert_delta_now(&before, AVAILABILITY, &[], 8.0).await;
    still_healthy(&s).await;
    s.shutdown().await;
}

/// Passed-through streams (Responses, Messages) whose upstream sends nothing but keep-alive
/// comments: a comment starts no answer (passed on, it would have committed a 200 with
/// nothing in it and ended the chance to fall back), so the caller gets the total timeout as a
/// 504 in its API's error shape, and the ledger a failure; the chat completions stream (the
/// `trickle` case above) does the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passed_through_streams_of_keep_alives_alone_are_a_timeout_not_an_answer() {
    let (mut s, _h, _bh) = start().await;
    let responses = s
        .client
        .post(s.url("/v1/responses"))
        .bearer_auth(ALICE_KEY)
        .json(&json!({"model": "trickle", "input": "hello", "stream": true}));
    let messages = s
        .client
        .post(s.url("/v1/messages"))
        .header("x-api-key", ALICE_KEY)
        .header("anthropic-version", "2023-06-01")
        .json(
            &json!({"model": "claude-trickle", "max_tokens": 16, "stream": true,
            "messages": [{"role": "user", "content": "hi"}]}),
        );
    let runs = [("responses", responses), ("messages", messages)].map(|(api, rb)| {
        let s = &s;
        async move {
            let rid = new_request_id();
            let started = Instant::now();
            let resp = rb
                .header("x-request-id", &rid)
                .send()
                .await
                .expect("request");
            let status = resp.status().as_u16();
            let text = resp.text().await.unwrap_or_default();
            let took = started.elapsed();
            assert_eq!(status, 504, "{api}: {text}");
            let v: Value = serde_json::from_str(&text).unwrap_or_else(|_| panic!("{api}: {text}"));
            let message = if api == "messages" {
                assert_eq!(v["type"], "error", "{v}");
                assert_eq!(v["error"]["type"], "overloaded_error", "{v}");
                v["error"]["message"].as_str().unwrap_or("")
            } else {
                assert_eq!(v["error"]["code"], "upstream_timeout", "{v}");
                v["error"]["message"].as_str().unwrap_or("")
            };
            assert!(message.contains("waiting for total"), "{api}: {v}");
            assert!(
                took >= Duration::from_millis(TOTAL_MS)
                    && took < Duration::from_millis(TOTAL_MS + 1500),
                "{api} took {took:?}, the total deadline is {TOTAL_MS} ms"
            );
            expect_failure_row(s, &rid, "upstream_timeout").await;
        }
    });
    futures_util::future::join_all(runs).await;
    still_healthy(&s).await;
    s.shutdown().await;
}

/// An Anthropic upstream whose events come out of order (a delta before `message_start`, a
/// delta for a block that was never started): `upstream_error`, translated (chat completions,
/// gRPC) and passed through (`/v1/messages`, in Anthropic's error shape), never a made-up answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anthropic_events_out_of_order_are_upstream_error() {
    let (mut s, _h, _bh) = start().await;
    let before = s.metrics().await;
    let rid = new_request_id();
    let resp = s
        .chat(&stream_body("claude-delta-first", &rid), Some(&rid))
        .await;
    let body = expect_http_error(resp, 502, "upstream_error").await;
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("message_start")),
        "{body}"
    );
    expect_failure_row(&s, &rid, "upstream_error").await;

    let rid = new_request_id();
    let (chunks, err) = http_stream_error(&s, "claude-orphan-delta", &rid).await;
    assert_eq!(err["code"], "upstream_error", "{err}");
    assert!(
        chunks
            .iter()
            .all(|c| c.pointer("/choices/0/delta/content").is_none()),
        "no text of the orphan delta reached the caller: {chunks:?}"
    );
    expect_failure_row(&s, &rid, "upstream_error").await;

    for model in ["claude-delta-first", "claude-orphan-delta"] {
        let rid = new_request_id();
        let (chunks, status) = grpc_stream(&s, model, &rid).await;
        expect_grpc_error(&status, Code::Unavailable, "upstream_error");
        assert!(
            chunks.iter().all(|c| c.delta_content.is_empty()),
            "{model}: {chunks:?}"
        );
        // Passed through: the first event is already out of order.
        let rid = new_request_id();
        let body = json!({"model": model, "max_tokens": 50, "stream": true,
            "messages": [{"role": "user", "content": "hi"}]});
        let resp = s
            .client
            .post(s.url("/v1/messages"))
            .header("x-api-key", ALICE_KEY)
            .header("anthropic-version", "2023-06-01")
            .header("x-request-id", &rid)
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap();
        if model == "claude-delta-first" {
            assert_eq!(status, 502, "{text}");
            let v: Value = serde_json::from_str(&text).unwrap();
            assert_eq!(v["type"], "error", "{v}");
            // Upstream failures are `overloaded_error` in this shape (what the SDKs retry).
            assert_eq!(v["error"]["type"], "overloaded_error", "{v}");
        } else {
            assert_eq!(status, 200, "{text}");
            assert!(text.contains("event: error"), "{text}");
            assert!(!text.contains("message_stop"), "{text}");
        }
        expect_failure_row(&s, &rid, "upstream_error").await;
        s.expect_delta(
            &before,
            AVAILABILITY,
            &avail("http", "failure", "upstream_error", model),
            2.0,
        )
        .await;
        s.expect_delta(
            &before,
            AVAILABILITY,
            &avail("grpc", "failure", "upstream_error", model),
            1.0,
        )
        .await;
    }
    s.assert_delta_now(&before, AVAILABILITY, &[], 6.0).await;
    still_healthy(&s).await;
    s.shutdown().await;
}
