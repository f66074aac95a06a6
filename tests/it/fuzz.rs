//! A black-box mutation fuzzer against the built binary: valid requests of every model API,
//! mutated (wrong types, huge numbers, nesting 10,000 deep, invalid UTF-8, NUL bytes, 1 MB
//! strings, duplicate keys, truncation, flipped bytes, huge and many headers, truncated chunked
//! bodies), over raw TCP for HTTP and over HTTP/2 for gRPC (raw and mutated protobuf), plus
//! slow-loris headers and stalled bodies. Deterministic: case `i` is drawn from a xorshift
//! generator seeded with `i`. A caller's mistake must never be a 5xx (gRPC INTERNAL, UNKNOWN,
//! UNAVAILABLE or DATA_LOSS), a complete request must always get an answer (no reset), and the
//! process log must hold no panic.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prost::Message;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::common::process::Process;
use crate::common::*;
use crate::faults::RawCodec;

/// HTTP and gRPC cases; together at least 10,000.
const HTTP_CASES: usize = 8_000;
const GRPC_CASES: usize = 2_500;
/// Connections in flight at once (the machine is small; the gateway is not the bottleneck).
const CONCURRENCY: usize = 24;
/// `server.header_read_timeout_ms` / `body_read_timeout_ms` of the process under test.
const HEADER_TIMEOUT_MS: u64 = 800;
const BODY_TIMEOUT_MS: u64 = 800;

/// xorshift64*: tiny, deterministic, good enough to pick mutations.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
}

/// The valid request of each HTTP model API: (path, body).
fn seeds() -> Vec<(&'static str, Value)> {
    vec![
        (
            "/v1/chat/completions",
            json!({"model": "mock/echo", "max_tokens": 5, "temperature": 0.5, "stream": false,
                "messages": [{"role": "system", "content": "s"},
                             {"role": "user", "content": [{"type": "text", "text": "hi"}]}],
                "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
                "stop": ["x"], "user": "u", "n": 1}),
        ),
        (
            "/v1/messages",
            json!({"model": "mock/echo", "max_tokens": 5, "system": "s", "stream": false,
                "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]},
                             {"role": "assistant", "content": "ok"},
                             {"role": "user", "content": "again"}],
                "stop_sequences": ["x"], "temperature": 0.1}),
        ),
        (
            "/v1/responses",
            json!({"model": "mock/echo", "max_output_tokens": 5, "instructions": "s",
                "input": [{"role": "user", "content": [{"type": "input_text", "text": "hi"}]}]}),
        ),
        (
            "/v1/embeddings",
            json!({"model": "mock/echo", "input": ["a", "b"], "encoding_format": "float"}),
        ),
    ]
}

/// Every path (object keys and array indices) of `v`.
fn paths(v: &Value, here: Vec<Value>, out: &mut Vec<Vec<Value>>) {
    out.push(here.clone());
    match v {
        Value::Object(o) => {
            for (k, c) in o {
                let mut p = here.clone();
                p.push(json!(k));
                paths(c, p, out);
            }
        }
        Value::Array(a) => {
            for (i, c) in a.iter().enumerate() {
                let mut p = here.clone();
                p.push(json!(i));
                paths(c, p, out);
            }
        }
        _ => {}
    }
}

fn at<'a>(v: &'a mut Value, path: &[Value]) -> &'a mut Value {
    path.iter().fold(v, |v, k| match k {
        Value::String(k) => &mut v[k.as_str()],
        k => &mut v[k.as_u64().unwrap() as usize],
    })
}

/// A value of a random kind, some of them hostile.
fn weird(rng: &mut Rng) -> Value {
    match rng.below(16) {
        0 => Value::Null,
        1 => json!(true),
        2 => json!(-1),
        3 => json!(0),
        4 => json!(u64::MAX),
        5 => json!(i64::MIN),
        6 => json!(1e308),
        7 => json!(0.5),
        8 => json!(""),
        9 => json!("nul\u{0}byte"),
        10 => json!({}),
        11 => json!([]),
        12 => json!([null, 1, "x", {}]),
        13 => json!({"type": "unknown", "text": 5}),
        14 if rng.chance(10) => json!("x".repeat(1 << 20)),
        _ => json!("mock/echo"),
    }
}

/// One HTTP case: the bytes to send, and whether the request is complete (so an answer is due).
struct HttpCase {
    what: String,
    bytes: Vec<u8>,
    complete: bool,
    /// Whether its head is over the header limit (the server may close before reading it all).
    oversized_head: bool,
}

fn http_case(i: usize) -> HttpCase {
    let mut rng = Rng::new(i as u64 + 1);
    let seeds = seeds();
    let (path, mut body) = seeds[rng.below(seeds.len())].clone();
    let mut what = vec![format!("#{i} {path}")];
    // Structural mutations.
    for _ in 0..1 + rng.below(3) {
        let mut all = Vec::new();
        paths(&body, Vec::new(), &mut all);
        let p = all[rng.below(all.len())].clone();
        match rng.below(4) {
            0 | 1 => {
                let w = weird(&mut rng);
                what.push(format!("set {p:?}"));
                *at(&mut body, &p) = w;
            }
            2 if !p.is_empty() => {
                what.push(format!("drop {p:?}"));
                let (last, parent) = p.split_last().unwrap();
                match (at(&mut body, parent), last) {
                    (Value::Object(o), Value::String(k)) => {
                        o.remove(k);
                    }
                    (Value::Array(a), k) => {
                        a.remove(k.as_u64().unwrap() as usize);
                    }
                    _ => {}
                }
            }
            _ => {
                if let Some(o) = body.as_object_mut() {
                    what.push("stream".into());
                    o.insert("stream".into(), json!(rng.chance(70)));
                }
            }
        }
    }
    let mut raw = if body.is_object() || body.is_array() || rng.chance(50) {
        serde_json::to_vec(&body).unwrap()
    } else {
        b"{}".to_vec()
    };
    // Byte-level mutations.
    match rng.below(12) {
        0 => {
            what.push("duplicate keys".into());
            raw = [
                b"{\"model\":\"x\",\"model\":\"mock/echo\",\"stream\":1,\"stream\":false,"
                    .as_slice(),
                &raw[1..],
            ]
            .concat();
        }
        1 => {
            what.push("invalid UTF-8".into());
            if let Some(q) = raw.iter().rposition(|&b| b == b'"') {
                raw.splice(q..q, [0xff, 0xfe, 0xc3]);
            }
        }
        2 => {
            what.push("truncated".into());
            let n = rng.below(raw.len().max(1));
            raw.truncate(n);
        }
        3 => {
            what.push("flipped bytes".into());
            for _ in 0..1 + rng.below(4) {
                let k = rng.below(raw.len().max(1));
                if let Some(b) = raw.get_mut(k) {
                    *b ^= 1 << rng.below(8);
                }
            }
        }
        4 if rng.chance(15) => {
            what.push("nested 10,000 deep".into());
            let field = ["messages", "input", "tools", "max_tokens", "model"][rng.below(5)];
            raw = format!(
                "{{\"model\":\"mock/echo\",\"max_tokens\":5,\"{field}\":{}{}}}",
                "[".repeat(10_000),
                "]".repeat(10_000)
            )
            .into_bytes();
        }
        5 => {
            what.push("raw NUL".into());
            let k = rng.below(raw.len().max(1));
            raw.insert(k.min(raw.len()), 0);
        }
        6 => {
            what.push("numbers past u64 and f64".into());
            let n = [
                "18446744073709551616000",
                "1e400",
                "-1e400",
                "0x10",
                "NaN",
                "1.5e-400",
            ][rng.below(6)];
            raw = String::from_utf8_lossy(&raw)
                .replacen(":5", &format!(":{n}"), 1)
                .into_bytes();
        }
        7 => {
            what.push("not an object".into());
            raw = [&b"["[..], &raw, b"]"].concat();
        }
        _ => {}
    }
    // The head.
    let mut headers = vec![
        format!("POST {path} HTTP/1.1"),
        "host: fuzz".into(),
        "connection: close".into(),
    ];
    match rng.below(20) {
        0 => what.push("no credentials".into()),
        1 => {
            what.push("wrong key".into());
            headers.push("authorization: Bearer tg-wrong".into());
        }
        2 => {
            what.push("credentials with NUL-like bytes".into());
            headers.push("authorization: Bearer \u{7f}\u{1}x".into());
        }
        _ if path == "/v1/messages" => headers.push(format!("x-api-key: {ALICE_KEY}")),
        _ => headers.push(format!("authorization: Bearer {ALICE_KEY}")),
    }
    if path == "/v1/messages" {
        headers.push("anthropic-version: 2023-06-01".into());
    }
    match rng.below(20) {
        0 => what.push("no content-type".into()),
        1 => {
            what.push("text/plain".into());
            headers.push("content-type: text/plain".into());
        }
        _ => headers.push("content-type: application/json".into()),
    }
    let mut oversized_head = false;
    match rng.below(40) {
        0 => {
            what.push("a 32 KiB header".into());
            headers.push(format!("x-big: {}", "h".repeat(32 << 10)));
        }
        1 => {
            what.push("a 1 MiB header".into());
            headers.push(format!("x-huge: {}", "h".repeat(1 << 20)));
            oversized_head = true;
        }
        2 => {
            what.push("300 headers".into());
            for k in 0..300 {
                headers.push(format!("x-many-{k}: v"));
            }
            oversized_head = true;
        }
        3 => {
            what.push("x-request-id of 10 KB".into());
            headers.push(format!("x-request-id: {}", "r".repeat(10_000)));
        }
        _ => {}
    }
    let chunked_cut = rng.chance(3);
    let mut bytes = Vec::new();
    if chunked_cut {
        what.push("chunked, cut off".into());
        headers.push("transfer-encoding: chunked".into());
        bytes.extend(headers.join("\r\n").into_bytes());
        bytes.extend(b"\r\n\r\n");
        let half = &raw[..raw.len() / 2];
        bytes.extend(format!("{:x}\r\n", raw.len()).into_bytes());
        bytes.extend(half);
    } else {
        headers.push(format!("content-length: {}", raw.len()));
        bytes.extend(headers.join("\r\n").into_bytes());
        bytes.extend(b"\r\n\r\n");
        bytes.extend(&raw);
    }
    HttpCase {
        what: what.join(", "),
        bytes,
        complete: !chunked_cut,
        oversized_head,
    }
}

/// What one case showed; `Err` is a finding.
type Finding = String;

/// Sends a case on a fresh connection and reads the answer to its end.
async fn run_http(addr: SocketAddr, case: &HttpCase) -> Result<u16, Finding> {
    let mut sock = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let written = sock.write_all(&case.bytes).await;
    if !case.complete {
        // The body stops midway: the client closes its side.
        let _ = sock.shutdown().await;
    }
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(30), sock.read_to_end(&mut answer)).await;
    let status = std::str::from_utf8(answer.get(..12).unwrap_or_default())
        .ok()
        .and_then(|h| h.strip_prefix("HTTP/1.1 "))
        .and_then(|s| s.get(..3))
        .and_then(|s| s.parse::<u16>().ok());
    match (status, read) {
        (_, Err(_)) => Err("no answer within 30 s".into()),
        (Some(s), _) if s >= 500 => Err(format!(
            "answered {s}: {}",
            String::from_utf8_lossy(&answer[..answer.len().min(400)])
        )),
        (Some(s), _) => Ok(s),
        // A head over the limit may be answered by a close before it is all read.
        (None, _) if case.oversized_head || !case.complete => Ok(0),
        (None, Ok(Err(e))) => Err(format!(
            "connection reset without an answer ({e}; write: {written:?})"
        )),
        (None, Ok(Ok(_))) => Err(format!(
            "connection closed without an answer ({} bytes)",
            answer.len()
        )),
    }
}

const METHODS: [&str; 3] = [
    "/tollgate.v1.Gateway/Complete",
    "/tollgate.v1.Gateway/StreamComplete",
    "/tollgate.v1.Gateway/Embed",
];

/// One gRPC case: method, message bytes, and what it is.
fn grpc_case(i: usize) -> (&'static str, Vec<u8>, String) {
    let mut rng = Rng::new(0xC0FFEE + i as u64);
    let method = METHODS[rng.below(METHODS.len())];
    let mut req = complete_request("mock/echo", &format!("fuzz-{i}"));
    req.max_tokens = Some(5);
    let mut what = vec![format!("#{i} {method}")];
    match rng.below(8) {
        0 => {
            what.push("huge max_tokens".into());
            req.max_tokens = Some(u32::MAX);
        }
        1 => {
            what.push("NUL in content".into());
            req.messages[1].content = "a\u{0}b".into();
        }
        2 => {
            what.push("unknown role".into());
            req.messages[0].role = "\u{1}".into();
        }
        3 if rng.chance(20) => {
            what.push("1 MB content".into());
            req.messages[1].content = "x".repeat(1 << 20);
        }
        4 => {
            what.push("no messages".into());
            req.messages.clear();
        }
        5 => {
            what.push("empty model".into());
            req.model.clear();
        }
        _ => {}
    }
    let mut bytes = if method.ends_with("Embed") {
        tollgate::proto::EmbedRequest {
            model: "mock/echo".into(),
            texts: vec!["a".into()],
            ..Default::default()
        }
        .encode_to_vec()
    } else {
        req.encode_to_vec()
    };
    match rng.below(4) {
        0 => {
            what.push("random bytes".into());
            let n = rng.below(64);
            bytes = (0..n).map(|_| rng.next() as u8).collect();
        }
        1 => {
            what.push("flipped bytes".into());
            for _ in 0..1 + rng.below(3) {
                let k = rng.below(bytes.len().max(1));
                if let Some(b) = bytes.get_mut(k) {
                    *b ^= 1 << rng.below(8);
                }
            }
        }
        2 => {
            what.push("truncated".into());
            let n = rng.below(bytes.len().max(1));
            bytes.truncate(n);
        }
        _ => {}
    }
    (method, bytes, what.join(", "))
}

/// Codes a caller's mistake must never get.
fn grpc_server_fault(code: tonic::Code) -> bool {
    matches!(
        code,
        tonic::Code::Internal
            | tonic::Code::Unknown
            | tonic::Code::Unavailable
            | tonic::Code::DataLoss
    )
}

async fn run_grpc(
    grpc: &mut tonic::client::Grpc<tonic::transport::Channel>,
    method: &'static str,
    bytes: Vec<u8>,
) -> Result<(), Finding> {
    grpc.ready().await.map_err(|e| format!("not ready: {e}"))?;
    let req = grpc_request(bytes, Some(ALICE_KEY), None);
    let path = http::uri::PathAndQuery::from_static(method);
    let result = if method.ends_with("StreamComplete") {
        match grpc.server_streaming(req, path, RawCodec).await {
            Ok(resp) => {
                let mut s = resp.into_inner();
                loop {
                    match s.message().await {
                        Ok(Some(_)) => {}
                        Ok(None) => break Ok(()),
                        Err(status) => break Err(status),
                    }
                }
            }
            Err(status) => Err(status),
        }
    } else {
        grpc.unary::<Vec<u8>, Vec<u8>, _>(req, path, RawCodec)
            .await
            .map(|_| ())
    };
    match result {
        Err(s) if grpc_server_fault(s.code()) => Err(format!("{:?}: {}", s.code(), s.message())),
        _ => Ok(()),
    }
}

/// Headers trickled a byte every 100 ms (never finished), and a body that stops after 10
/// bytes: the first is cut off after `header_read_timeout_ms`, the second is answered 408.
async fn slow_client(addr: SocketAddr, headers: bool) -> Result<u16, Finding> {
    let mut sock = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let started = Instant::now();
    if headers {
        let head = format!("POST /v1/chat/completions HTTP/1.1\r\nhost: slow\r\nauthorization: Bearer {ALICE_KEY}\r\nx-pad: {}", "p".repeat(200));
        for b in head.bytes() {
            if sock.write_all(&[b]).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            if started.elapsed() > Duration::from_secs(10) {
                return Err("a trickling client was not cut off within 10 s".into());
            }
        }
        let mut rest = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), sock.read_to_end(&mut rest)).await;
        Ok(0)
    } else {
        let head = format!("POST /v1/chat/completions HTTP/1.1\r\nhost: slow\r\nauthorization: Bearer {ALICE_KEY}\r\ncontent-type: application/json\r\ncontent-length: 500\r\nconnection: close\r\n\r\n{{\"model\":");
        sock.write_all(head.as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        let mut answer = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), sock.read_to_end(&mut answer))
            .await
            .map_err(|_| "a stalled body was not answered within 10 s".to_string())?
            .map_err(|e| format!("stalled body: {e}"))?;
        let text = String::from_utf8_lossy(&answer);
        if !text.starts_with("HTTP/1.1 408") {
            return Err(format!(
                "a stalled body got {}",
                &text[..text.len().min(200)]
            ));
        }
        Ok(408)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutated_requests_never_get_a_5xx_a_reset_or_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        r#"[server]
http_addr = "127.0.0.1:0"
grpc_addr = "127.0.0.1:0"
max_body_bytes = 2097152
header_read_timeout_ms = {HEADER_TIMEOUT_MS}
body_read_timeout_ms = {BODY_TIMEOUT_MS}
shutdown_grace_secs = 1

[log]
level = "warn"
access = false

[database]
url = "sqlite://{db}"
ledger_flush_ms = 200

[[auth.static_keys]]
user = "alice"
key = "{ALICE_KEY}"

[service_types.default]
models = ["*"]

[providers.mock]
kind = "mock"
tokens = 3
token_latency_ms = 0
models = ["echo"]
"#,
        db = dir.path().join("fuzz.db").display()
    );
    let path = dir.path().join("tollgate.toml");
    std::fs::write(&path, config).unwrap();
    let process = blocking(move || Process::serve(&path, Duration::from_secs(30))).await;
    let (http_addr, grpc_addr) = (process.http, process.grpc);
    let started = Instant::now();

    let findings: Arc<Mutex<Vec<String>>> = Arc::default();
    let statuses: Arc<Mutex<std::collections::BTreeMap<u16, usize>>> = Arc::default();
    let next = Arc::new(AtomicUsize::new(0));
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{grpc_addr}"))
        .unwrap()
        .connect()
        .await
        .expect("gRPC connect");
    let grpc_next = Arc::new(AtomicUsize::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..CONCURRENCY {
        let (findings, statuses, next) = (findings.clone(), statuses.clone(), next.clone());
        tasks.spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= HTTP_CASES {
                    break;
                }
                let case = http_case(i);
                match run_http(http_addr, &case).await {
                    // `server.max_header_bytes` (64 KiB) and hyper's 100 headers bound the head.
                    // (A head that is also malformed may be refused as a 400 first.)
                    Ok(s) if case.oversized_head && !matches!(s, 0 | 400 | 431) => findings
                        .lock()
                        .unwrap()
                        .push(format!("{}: an oversized head got {s}, not 431", case.what)),
                    Ok(431) if !case.oversized_head => findings
                        .lock()
                        .unwrap()
                        .push(format!("{}: a head within the limits got 431", case.what)),
                    Ok(s) => *statuses.lock().unwrap().entry(s).or_default() += 1,
                    Err(f) => findings.lock().unwrap().push(format!("{}: {f}", case.what)),
                }
            }
        });
    }
    for _ in 0..8 {
        let (findings, grpc_next) = (findings.clone(), grpc_next.clone());
        let mut grpc = tonic::client::Grpc::new(channel.clone());
        tasks.spawn(async move {
            loop {
                let i = grpc_next.fetch_add(1, Ordering::Relaxed);
                if i >= GRPC_CASES {
                    break;
                }
                let (method, bytes, what) = grpc_case(i);
                if let Err(f) = run_grpc(&mut grpc, method, bytes).await {
                    findings.lock().unwrap().push(format!("gRPC {what}: {f}"));
                }
            }
        });
    }
    let slow_cases = 8;
    for k in 0..slow_cases {
        let findings = findings.clone();
        tasks.spawn(async move {
            if let Err(f) = slow_client(http_addr, k % 2 == 0).await {
                findings
                    .lock()
                    .unwrap()
                    .push(format!("slow client {k}: {f}"));
            }
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.expect("a fuzz task panicked");
    }
    let took = started.elapsed();

    // The gateway is still healthy.
    let resp = http_client()
        .post(process.url("/v1/chat/completions"))
        .bearer_auth(ALICE_KEY)
        .json(&json!({"model": "mock/echo", "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .expect("a good request after the fuzzing");
    assert_eq!(resp.status(), 200);

    let total = HTTP_CASES + GRPC_CASES + slow_cases;
    let findings = findings.lock().unwrap().clone();
    eprintln!(
        "fuzz: {total} cases ({HTTP_CASES} HTTP, {GRPC_CASES} gRPC, {slow_cases} slow clients) in \
         {took:?}; HTTP statuses {:?}; findings {}",
        statuses.lock().unwrap(),
        findings.len()
    );
    let log = process.log_text();
    assert!(
        !log.contains("panicked"),
        "a panic in the process log:\n{}",
        log.lines()
            .filter(|l| l.contains("panicked"))
            .take(5)
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(
        findings.is_empty(),
        "{} of {total} cases found something:\n{}",
        findings.len(),
        findings
            .iter()
            .take(15)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
}
