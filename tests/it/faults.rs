//! Faults and hostile input: upstreams that never stop talking, clients that send too much or
//! too slowly, numbers that do not fit, stores that go away. Each scenario is a real server on
//! loopback ports and a real peer misbehaving.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::common::*;

/// An HTTP/1.1 server that answers every request with a 200 whose chunked body never ends
/// (`sse`: one never-ending SSE `data:` line). Counts the body bytes it managed to write.
struct EndlessUpstream {
    addr: std::net::SocketAddr,
    written: Arc<AtomicU64>,
    closed: Arc<AtomicU64>,
}

impl EndlessUpstream {
    async fn start(sse: bool) -> EndlessUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let written = Arc::new(AtomicU64::new(0));
        let closed = Arc::new(AtomicU64::new(0));
        let (w, c) = (written.clone(), closed.clone());
        tokio::spawn(async move {
            while let Ok((mut sock, _)) = listener.accept().await {
                let (w, c) = (w.clone(), c.clone());
                tokio::spawn(async move {
                    // Read the request head and body (small JSON) without parsing it.
                    let mut buf = vec![0u8; 64 * 1024];
                    let mut seen = Vec::new();
                    loop {
                        let n = sock.read(&mut buf).await.unwrap_or(0);
                        if n == 0 {
                            return;
                        }
                        seen.extend_from_slice(&buf[..n]);
                        if let Some(head_end) = find(&seen, b"\r\n\r\n") {
                            let head = String::from_utf8_lossy(&seen[..head_end]).to_lowercase();
                            let len: usize = head
                                .lines()
                                .find_map(|l| l.strip_prefix("content-length:"))
                                .and_then(|v| v.trim().parse().ok())
                                .unwrap_or(0);
                            if seen.len() >= head_end + 4 + len {
                                break;
                            }
                        }
                    }
                    let ctype = if sse {
                        "text/event-stream"
                    } else {
                        "application/json"
                    };
                    let head = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: {ctype}\r\ntransfer-encoding: chunked\r\n\r\n"
                    );
                    if sock.write_all(head.as_bytes()).await.is_err() {
                        return;
                    }
                    let first: &[u8] = if sse {
                        b"data: {\"x\":\""
                    } else {
                        b"{\"x\":\""
                    };
                    let mut chunk = format!("{:x}\r\n", first.len()).into_bytes();
                    chunk.extend_from_slice(first);
                    chunk.extend_from_slice(b"\r\n");
                    let _ = sock.write_all(&chunk).await;
                    let piece = vec![b'a'; 16 * 1024];
                    let mut frame = format!("{:x}\r\n", piece.len()).into_bytes();
                    frame.extend_from_slice(&piece);
                    frame.extend_from_slice(b"\r\n");
                    // Stop on our own after 1 GiB so a broken gateway cannot hang the test run.
                    for _ in 0..(1 << 16) {
                        if sock.write_all(&frame).await.is_err() {
                            break;
                        }
                        w.fetch_add(piece.len() as u64, Ordering::Relaxed);
                    }
                    c.fetch_add(1, Ordering::Relaxed);
                });
            }
        });
        EndlessUpstream {
            addr,
            written,
            closed,
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// A provider `hostile` in front of an [`EndlessUpstream`] with a 64 KiB answer cap.
fn hostile_opts(up: &EndlessUpstream) -> Opts {
    Opts {
        extra: format!(
            r#"
[providers.hostile]
kind = "openai"
base_url = "http://{}"
keys = ["sk-hostile"]
max_response_bytes = 65536
total_timeout_ms = 60000
idle_timeout_ms = 60000

[aliases.endless]
description = "an upstream whose answer never ends"
chain = ["hostile/m"]
"#,
            up.addr
        ),
        ..Opts::default()
    }
}

/// A non-streamed answer far larger than `max_response_bytes` (chunked, never ending): 502
/// upstream_error quickly, the connection dropped (the upstream's writes fail soon after the
/// cap), counted once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endless_upstream_body_is_cut_at_the_cap() {
    let up = EndlessUpstream::start(false).await;
    let mut s = TestServer::sqlite(hostile_opts(&up)).await;
    let before = s.metrics().await;
    let rid = new_request_id();
    let started = Instant::now();
    let resp = s.chat(&chat_body("endless", &rid), Some(&rid)).await;
    let body = expect_http_error(resp, 502, "upstream_error").await;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("max_response_bytes")),
        "{body}"
    );
    // The gateway hung up: the upstream's writes fail long before its 1 GiB.
    eventually(
        DEADLINE,
        "the upstream connection to be dropped",
        || async { (up.closed.load(Ordering::Relaxed) == 1).then_some(()) },
    )
    .await;
    let written = up.written.load(Ordering::Relaxed);
    assert!(written < 64 << 20, "upstream wrote {written} bytes");
    s.expect_delta(
        &before,
        AVAILABILITY,
        &avail("http", "failure", "upstream_error", "endless"),
        1.0,
    )
    .await;
    s.assert_delta_now(&before, AVAILABILITY, &[], 1.0).await;
    s.shutdown().await;
}

/// A streamed answer whose first SSE line never ends: the line is cut at the cap, so the call is
/// upstream_error (502: no chunk reached the caller), not an ever-growing buffer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endless_sse_line_is_cut_at_the_cap() {
    let up = EndlessUpstream::start(true).await;
    let mut s = TestServer::sqlite(hostile_opts(&up)).await;
    let before = s.metrics().await;
    let rid = new_request_id();
    let mut body = chat_body("endless", &rid);
    body["stream"] = json!(true);
    let started = Instant::now();
    let resp = s.chat(&body, Some(&rid)).await;
    expect_http_error(resp, 502, "upstream_error").await;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
    eventually(
        DEADLINE,
        "the upstream connection to be dropped",
        || async { (up.closed.load(Ordering::Relaxed) == 1).then_some(()) },
    )
    .await;
    assert!(up.written.load(Ordering::Relaxed) < 64 << 20);
    s.expect_delta(
        &before,
        AVAILABILITY,
        &avail("http", "failure", "upstream_error", "endless"),
        1.0,
    )
    .await;
    s.assert_delta_now(&before, AVAILABILITY, &[], 1.0).await;
    s.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// cost overflow

use crate::common::budget_util::{body as budget_body, BudgetEnv};

macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::Backend::Sqlite).await
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::Backend::Postgres).await
                }
            )*
        }
    };
}

on_both_backends!(huge_max_tokens_are_budget_exceeded);

/// `max_tokens` / `max_completion_tokens` of u64::MAX and i64::MAX under a budget: the maximum
/// cost saturates and the request is 429 budget_exceeded, never a 500; the budget is left
/// untouched (a normal request still fits and nothing stays reserved).
async fn huge_max_tokens_are_budget_exceeded(backend: Backend) {
    let Some(mut env) = BudgetEnv::start(backend, 1, "").await else {
        return;
    };
    let alice = env.alice().await;
    env.put_budget(
        0,
        json!({"scope": "user", "id": alice, "limit_usd": 1, "period": "total"}),
    )
    .await;
    for field in ["max_tokens", "max_completion_tokens"] {
        for n in [u64::MAX, i64::MAX as u64] {
            let mut b = budget_body("b/hold", 1, 10);
            b.as_object_mut().unwrap().remove("max_tokens");
            b[field] = json!(n);
            let resp = env
                .chat(0, ALICE_KEY, &b)
                .send()
                .await
                .expect("chat request");
            let got = expect_http_error(resp, 429, "budget_exceeded").await;
            assert!(
                got["error"]["message"].as_str().unwrap().contains("$"),
                "{field} = {n}: {got}"
            );
        }
    }
    let resp = env
        .chat(0, ALICE_KEY, &budget_body("b/hold", 2, 10))
        .send()
        .await
        .expect("chat request");
    assert_eq!(resp.status(), 200, "{}", resp.text().await.unwrap());
    let budget = env.get_budget(0, "user", alice).await;
    eventually(DEADLINE, "the normal request to settle", || async {
        let b = env.get_budget(0, "user", alice).await;
        (b["reserved_micros"] == 0).then_some(())
    })
    .await;
    assert_eq!(budget["limit_micros"], 1_000_000, "{budget}");
    env.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// database outage

/// A TCP proxy to `target` that the test can cut (every open connection dropped, new ones
/// refused by closing them at once) and restore.
pub(crate) struct CuttableProxy {
    pub(crate) addr: std::net::SocketAddr,
    up: Arc<std::sync::atomic::AtomicBool>,
    conns: Arc<std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>>,
}

impl CuttableProxy {
    pub(crate) async fn start(target: String) -> CuttableProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let up = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let conns: Arc<std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>> = Arc::default();
        let (u, c) = (up.clone(), conns.clone());
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if !u.load(Ordering::SeqCst) {
                    drop(inbound);
                    continue;
                }
                let target = target.clone();
                let task = tokio::spawn(async move {
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect(&target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                c.lock().unwrap().push(task);
            }
        });
        CuttableProxy { addr, up, conns }
    }

    /// The database is gone: open connections die, new ones are closed on arrival.
    pub(crate) fn cut(&self) {
        self.up.store(false, Ordering::SeqCst);
        for t in self.conns.lock().unwrap().drain(..) {
            t.abort();
        }
    }

    pub(crate) fn restore(&self) {
        self.up.store(true, Ordering::SeqCst);
    }
}

/// With its PostgreSQL unreachable (connections cut by a proxy), a budgeted request is 503
/// policy_unavailable, counted as a failure; once the database is back, requests succeed again
/// without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_outage_is_policy_unavailable_and_recovers() {
    let Some(db) = TestDb::postgres().await else {
        return;
    };
    let rest = db.url.split_once("://").expect("url").1;
    let host_port = rest
        .split_once('@')
        .map_or(rest, |(_, h)| h)
        .split('/')
        .next()
        .expect("host")
        .to_string();
    let proxy = CuttableProxy::start(host_port.clone()).await;
    let mut via_proxy = crate::common::auth_servers::shared_db(&db);
    via_proxy.url = db.url.replacen(&host_port, &proxy.addr.to_string(), 1);
    let mut env = BudgetEnv::start_on(via_proxy, 1, "").await;
    let alice = env.alice().await;
    env.put_budget(
        0,
        json!({"scope": "user", "id": alice, "limit_usd": 100, "period": "total"}),
    )
    .await;
    let ok = env
        .chat(0, ALICE_KEY, &budget_body("b/hold", 1, 10))
        .send()
        .await
        .expect("chat request");
    assert_eq!(ok.status(), 200, "{}", ok.text().await.unwrap());
    let metrics = |env: &BudgetEnv| {
        let (client, url) = (env.client.clone(), env.gws[0].url("/metrics"));
        async move {
            client
                .get(url)
                .send()
                .await
                .expect("metrics")
                .text()
                .await
                .expect("metrics body")
        }
    };
    let labels = [
        ("protocol", "http"),
        ("outcome", "failure"),
        ("reason", "policy_unavailable"),
    ];
    let before = metric_value(&metrics(&env).await, AVAILABILITY, &labels);

    proxy.cut();
    for n in 2..5 {
        let resp = env
            .chat(0, ALICE_KEY, &budget_body("b/hold", n, 10))
            .send()
            .await
            .expect("chat request");
        expect_http_error(resp, 503, "policy_unavailable").await;
    }
    let after = metric_value(&metrics(&env).await, AVAILABILITY, &labels);
    assert_eq!(after - before, 3.0, "each refused request counted once");

    proxy.restore();
    eventually(DEADLINE, "requests to succeed again", || async {
        let resp = env
            .chat(0, ALICE_KEY, &budget_body("b/hold", 9, 10))
            .send()
            .await
            .ok()?;
        (resp.status() == 200).then_some(())
    })
    .await;
    env.shutdown().await;
    drop(db);
}

// ---------------------------------------------------------------------------------------------
// clients that send too much, or too slowly

/// Reads one HTTP/1.1 response (head and a Content-Length body) from `sock`; `None` when the
/// connection closed first.
async fn read_response(sock: &mut tokio::net::TcpStream, buf: &mut Vec<u8>) -> Option<String> {
    let mut tmp = [0u8; 8192];
    loop {
        if let Some(end) = find(buf, b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_string();
            let len: usize = head
                .to_lowercase()
                .lines()
                .find_map(|l| {
                    l.strip_prefix("content-length:")
                        .map(|v| v.trim().to_string())
                })
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            if buf.len() >= end + 4 + len {
                let whole = String::from_utf8_lossy(&buf[..end + 4 + len]).to_string();
                buf.drain(..end + 4 + len);
                return Some(whole);
            }
        }
        let n = sock.read(&mut tmp).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&tmp[..n]);
    }
}

/// Whether the server closed `sock` (EOF or reset) within `within`.
async fn closed_within(sock: &mut tokio::net::TcpStream, within: Duration) -> bool {
    let mut tmp = [0u8; 1024];
    match tokio::time::timeout(within, async {
        loop {
            match sock.read(&mut tmp).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    {
        Ok(()) => true,
        Err(_) => false,
    }
}

/// Large POSTs refused before their body is read (401 on an admin route, 413 on chat) on one
/// keep-alive connection: each answer that leaves the body unread says `Connection: close`, so
/// a client knows to open a new connection; a pooled client (one connection at most) gets every
/// answer, the normal request after them included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_large_bodies_keep_clients_working() {
    let mut s = TestServer::sqlite(Opts {
        server: "admin_token = \"tg-admin-faults-0123456789\"\nmax_body_bytes = 65536".into(),
        ..Opts::default()
    })
    .await;
    let big = "x".repeat(100 * 1024);

    // Raw: the answer to a refused body names the close.
    let mut sock = tokio::net::TcpStream::connect(s.http)
        .await
        .expect("connect");
    let req = format!(
        "POST /admin/users HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n\
         content-length: {}\r\n\r\n",
        big.len()
    );
    sock.write_all(req.as_bytes()).await.unwrap();
    sock.write_all(&big.as_bytes()[..1024]).await.unwrap();
    let mut buf = Vec::new();
    let head = read_response(&mut sock, &mut buf).await.expect("an answer");
    assert!(head.starts_with("HTTP/1.1 401"), "{head}");
    assert!(
        head.to_lowercase().contains("connection: close"),
        "a response that leaves the body unread must say so: {head}"
    );

    // A pooled client with one connection: every request answered.
    let client = reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(1)
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    for i in 0..4 {
        let resp = client
            .post(s.url("/admin/users"))
            .header("content-type", "application/json")
            .body(big.clone())
            .send()
            .await
            .unwrap_or_else(|e| panic!("refused admin POST {i}: {e}"));
        assert_eq!(resp.status(), 401);
        let resp = client
            .post(s.url("/v1/chat/completions"))
            .bearer_auth(ALICE_KEY)
            .header("content-type", "application/json")
            .body(big.clone())
            .send()
            .await
            .unwrap_or_else(|e| panic!("oversized chat POST {i}: {e}"));
        assert_eq!(resp.status(), 413);
        let resp = client
            .get(s.url("/healthz"))
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET after refused bodies {i}: {e}"));
        assert_eq!(resp.status(), 200);
    }
    let resp = client
        .post(s.url("/v1/chat/completions"))
        .bearer_auth(ALICE_KEY)
        .json(&chat_body("fast", "after"))
        .send()
        .await
        .expect("normal chat after refused bodies");
    assert_eq!(resp.status(), 200);
    s.shutdown().await;
}

/// A chat body that stops after 10 bytes: 408 request_timeout within the configured
/// `body_read_timeout_ms` plus slack, the connection closed, counted once (excluded).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_body_is_request_timeout() {
    let mut s = TestServer::sqlite(Opts {
        server: "body_read_timeout_ms = 300".into(),
        ..Opts::default()
    })
    .await;
    let before = s.metrics().await;
    let mut sock = tokio::net::TcpStream::connect(s.http)
        .await
        .expect("connect");
    let req = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {ALICE_KEY}\r\n\
         content-type: application/json\r\ncontent-length: 500\r\n\r\n{{\"model\":"
    );
    let started = Instant::now();
    sock.write_all(req.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    let resp = tokio::time::timeout(Duration::from_secs(5), read_response(&mut sock, &mut buf))
        .await
        .expect("answered within the timeout plus slack")
        .expect("an answer before the close");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    assert!(resp.starts_with("HTTP/1.1 408"), "{resp}");
    assert!(resp.contains("request_timeout"), "{resp}");
    assert!(
        closed_within(&mut sock, Duration::from_secs(3)).await,
        "connection closed"
    );
    s.expect_delta(
        &before,
        AVAILABILITY,
        &[
            ("protocol", "http"),
            ("outcome", "excluded"),
            ("reason", "request_timeout"),
        ],
        1.0,
    )
    .await;
    s.assert_delta_now(&before, AVAILABILITY, &[], 1.0).await;
    s.shutdown().await;
}

/// A client trickling its request head (a byte every 50 ms, never finishing): the connection is
/// closed once `header_read_timeout_ms` has passed, plus slack; a prompt client on another
/// connection is served meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trickled_headers_are_cut_off() {
    let mut s = TestServer::sqlite(Opts {
        server: "header_read_timeout_ms = 300".into(),
        ..Opts::default()
    })
    .await;
    let mut sock = tokio::net::TcpStream::connect(s.http)
        .await
        .expect("connect");
    let head = b"GET /healthz HTTP/1.1\r\nhost: x\r\nx-slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    let started = Instant::now();
    let mut closed_after = None;
    for b in head.iter() {
        if sock.write_all(&[*b]).await.is_err() {
            closed_after = Some(started.elapsed());
            break;
        }
        // The server may have closed already: a read that returns at once tells.
        let mut tmp = [0u8; 512];
        if let Ok(r) = tokio::time::timeout(Duration::from_millis(50), sock.read(&mut tmp)).await {
            match r {
                Ok(0) | Err(_) => {
                    closed_after = Some(started.elapsed());
                    break;
                }
                Ok(_) => {
                    // hyper may answer 408 before closing; the close follows.
                    if closed_within(&mut sock, Duration::from_secs(3)).await {
                        closed_after = Some(started.elapsed());
                    }
                    break;
                }
            }
        }
        let ok = s
            .client
            .get(s.url("/healthz"))
            .send()
            .await
            .expect("healthz");
        assert_eq!(ok.status(), 200);
    }
    let after = closed_after.expect("the trickling connection must be closed");
    assert!(
        after >= Duration::from_millis(250) && after < Duration::from_secs(3),
        "closed after {after:?}"
    );
    s.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// undecodable gRPC messages

/// A codec that sends its bytes as the message as they are, and reads answers as raw bytes.
#[derive(Clone, Copy, Default)]
pub(crate) struct RawCodec;

impl tonic::codec::Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawCodec;
    type Decoder = RawCodec;

    fn encoder(&mut self) -> Self::Encoder {
        RawCodec
    }

    fn decoder(&mut self) -> Self::Decoder {
        RawCodec
    }
}

impl tonic::codec::Encoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn encode(
        &mut self,
        item: Vec<u8>,
        dst: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), tonic::Status> {
        bytes::BufMut::put_slice(dst, &item);
        Ok(())
    }
}

impl tonic::codec::Decoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn decode(
        &mut self,
        src: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<Vec<u8>>, tonic::Status> {
        let n = bytes::Buf::remaining(src);
        Ok(Some(bytes::Buf::copy_to_bytes(src, n).to_vec()))
    }
}

/// Garbage sent as `Complete`, `StreamComplete` and `Embed` messages over a real HTTP/2 gRPC
/// connection: INVALID_ARGUMENT with ErrorInfo `invalid_request`, each counted once under its
/// api and written to the ledger.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undecodable_grpc_messages_are_invalid_request() {
    let mut s = TestServer::sqlite(Opts::default()).await;
    let before = s.metrics().await;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", s.grpc_addr))
        .unwrap()
        .connect()
        .await
        .expect("gRPC connect");
    let mut grpc = tonic::client::Grpc::new(channel);
    // An invalid varint where a tag is due; then a length-delimited field running past the end.
    let garbage: [&[u8]; 2] = [&[0xff; 12], &[0x0a, 0x40, b'x']];
    let methods = [
        "/tollgate.v1.Gateway/Complete",
        "/tollgate.v1.Gateway/StreamComplete",
        "/tollgate.v1.Gateway/Embed",
    ];
    let mut rids = Vec::new();
    for method in methods {
        for g in garbage {
            let rid = new_request_id();
            grpc.ready().await.expect("ready");
            let status = grpc
                .unary::<Vec<u8>, Vec<u8>, _>(
                    grpc_request(g.to_vec(), Some(ALICE_KEY), Some(&rid)),
                    http::uri::PathAndQuery::from_static(method),
                    RawCodec,
                )
                .await
                .expect_err("garbage must be refused");
            expect_grpc_error(&status, tonic::Code::InvalidArgument, "invalid_request");
            rids.push((method, rid));
        }
    }
    let labels = |api| {
        [
            ("protocol", "grpc"),
            ("api", api),
            ("outcome", "excluded"),
            ("reason", "invalid_request"),
        ]
    };
    s.expect_delta(&before, AVAILABILITY, &labels("chat_completions"), 4.0)
        .await;
    s.expect_delta(&before, AVAILABILITY, &labels("embeddings"), 2.0)
        .await;
    s.assert_delta_now(&before, AVAILABILITY, &[], 6.0).await;
    for (method, rid) in &rids {
        let row = s.ledger_row(rid).await;
        assert_eq!(
            (row.outcome.as_str(), row.reason.as_str()),
            ("excluded", "invalid_request"),
            "{method}"
        );
        let api = if method.ends_with("Embed") {
            "embeddings"
        } else {
            "chat_completions"
        };
        assert_eq!(row.api, api, "{method}");
    }
    s.shutdown().await;
}
