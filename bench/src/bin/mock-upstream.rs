//! An OpenAI-compatible mock upstream for tollgate's speed benchmark.
//!
//! Answers `POST /v1/chat/completions` (and `/chat/completions`) with a fixed
//! ~1 KB `chat.completion`, or, when the request has `"stream": true`, with
//! deadline-paced SSE chunks, a usage chunk and `data: [DONE]`. Everything it
//! sends is serialized once at start-up so the mock costs as little CPU per
//! request as possible: the benchmark wants to measure the gateway, not this.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt, Either, Full};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::header::{HeaderValue, CACHE_CONTROL, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::time::{Instant, Sleep};

/// Command-line options of the mock upstream.
#[derive(Parser, Debug)]
#[command(about = "OpenAI-compatible mock upstream for benchmarks")]
struct Args {
    /// Address to listen on; port 0 picks a free one (printed on stdout).
    #[arg(long, default_value = "127.0.0.1:0")]
    addr: SocketAddr,
    /// Tokio worker threads.
    #[arg(long, default_value_t = 1)]
    workers: usize,
    /// Fixed delay before answering (both modes), in milliseconds.
    #[arg(long, default_value_t = 0)]
    delay_ms: u64,
    /// Content chunks in a streamed answer.
    #[arg(long, default_value_t = 20)]
    chunks: u32,
    /// Pacing of streamed chunks: chunk i is due at start + i * this.
    #[arg(long, default_value_t = 20)]
    chunk_interval_ms: u64,
}

/// Pre-serialized answers shared by every connection.
struct Canned {
    completion: Bytes,
    first_chunk: Bytes,
    mid_chunk: Bytes,
    last_chunk: Bytes,
    usage_chunk: Bytes,
    delay: Duration,
    chunks: u32,
    interval: Duration,
}

const DONE: &[u8] = b"data: [DONE]\n\n";

impl Canned {
    fn new(args: &Args) -> Self {
        // Pad the message so the whole body is about 1 KB, a typical short answer.
        let content = "The quick brown fox jumps over the lazy dog. ".repeat(16);
        let completion = json!({
            "id": "chatcmpl-bench",
            "object": "chat.completion",
            "created": 1_700_000_000u64,
            "model": "gpt-bench",
            "system_fingerprint": "fp_bench",
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": content},
                "logprobs": null,
                "finish_reason": "stop"
            }],
            "usage": {"prompt_tokens": 9, "completion_tokens": 160, "total_tokens": 169}
        });
        let chunk = |delta: serde_json::Value, finish: serde_json::Value| {
            sse(&json!({
                "id": "chatcmpl-bench",
                "object": "chat.completion.chunk",
                "created": 1_700_000_000u64,
                "model": "gpt-bench",
                "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}]
            }))
        };
        let usage_chunk = sse(&json!({
            "id": "chatcmpl-bench",
            "object": "chat.completion.chunk",
            "created": 1_700_000_000u64,
            "model": "gpt-bench",
            "choices": [],
            "usage": {"prompt_tokens": 9, "completion_tokens": args.chunks, "total_tokens": 9 + args.chunks}
        }));
        Canned {
            completion: Bytes::from(serde_json::to_vec(&completion).expect("static JSON")),
            first_chunk: chunk(
                json!({"role": "assistant", "content": "tok "}),
                serde_json::Value::Null,
            ),
            mid_chunk: chunk(json!({"content": "tok "}), serde_json::Value::Null),
            last_chunk: chunk(json!({"content": "end"}), json!("stop")),
            usage_chunk,
            delay: Duration::from_millis(args.delay_ms),
            chunks: args.chunks,
            interval: Duration::from_millis(args.chunk_interval_ms),
        }
    }
}

fn sse(v: &serde_json::Value) -> Bytes {
    Bytes::from(format!("data: {v}\n\n"))
}

/// SSE body that emits chunk i no earlier than `start + i * interval`.
///
/// Pacing by deadline rather than sleeping after each send keeps the schedule
/// from drifting with write latency, so gaps seen by a client are the
/// gateway's doing, not the mock's.
struct SseBody {
    canned: Arc<Canned>,
    start: Instant,
    next: u32,
    sleep: Pin<Box<Sleep>>,
}

impl SseBody {
    fn new(canned: Arc<Canned>) -> Self {
        let start = Instant::now();
        SseBody {
            canned,
            start,
            next: 0,
            sleep: Box::pin(tokio::time::sleep_until(start)),
        }
    }
}

impl Body for SseBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = &mut *self;
        let n = this.canned.chunks;
        let i = this.next;
        // Content chunks 0..n, then the usage chunk, then [DONE].
        if i < n {
            let due = this.start + this.canned.interval * i;
            if Instant::now() < due {
                this.sleep.as_mut().reset(due);
                if this.sleep.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
            }
        }
        let data = if i == 0 && n > 0 {
            this.canned.first_chunk.clone()
        } else if i + 1 < n {
            this.canned.mid_chunk.clone()
        } else if i + 1 == n {
            this.canned.last_chunk.clone()
        } else if i == n {
            this.canned.usage_chunk.clone()
        } else if i == n + 1 {
            Bytes::from_static(DONE)
        } else {
            return Poll::Ready(None);
        };
        this.next += 1;
        Poll::Ready(Some(Ok(Frame::data(data))))
    }

    fn is_end_stream(&self) -> bool {
        self.next > self.canned.chunks + 1
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

type RespBody = Either<Full<Bytes>, SseBody>;

async fn handle(
    req: Request<Incoming>,
    canned: Arc<Canned>,
) -> Result<Response<RespBody>, Infallible> {
    let path = req.uri().path();
    let is_chat = path == "/v1/chat/completions" || path == "/chat/completions";
    // /readyz lets the mock stand in for tollgate when testing run.sh itself.
    if req.method() == Method::GET && matches!(path, "/health" | "/readyz" | "/v1/models") {
        return Ok(plain(StatusCode::OK, "application/json", "{\"ok\":true}"));
    }
    if !is_chat {
        return Ok(plain(StatusCode::NOT_FOUND, "text/plain", "not found"));
    }
    if req.method() != Method::POST {
        return Ok(plain(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "POST only",
        ));
    }
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return Ok(plain(StatusCode::BAD_REQUEST, "text/plain", "bad body")),
    };
    let stream = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v.get("stream").and_then(|s| s.as_bool()))
        .unwrap_or(false);
    if !canned.delay.is_zero() {
        tokio::time::sleep(canned.delay).await;
    }
    let resp = if stream {
        let mut r = Response::new(Either::Right(SseBody::new(canned.clone())));
        let h = r.headers_mut();
        h.insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
        h.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        r
    } else {
        let mut r = Response::new(Either::Left(Full::new(canned.completion.clone())));
        r.headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        r
    };
    Ok(resp)
}

fn plain(status: StatusCode, ctype: &'static str, body: &'static str) -> Response<RespBody> {
    let mut r = Response::new(Either::Left(Full::new(Bytes::from_static(body.as_bytes()))));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(ctype));
    r
}

async fn serve(listener: TcpListener, canned: Arc<Canned>) {
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                // EMFILE and friends are transient under load; back off briefly.
                eprintln!("accept: {e}");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        // Nagle plus delayed ACK would add ~40 ms to small writes (SSE chunks).
        let _ = stream.set_nodelay(true);
        let canned = canned.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| handle(req, canned.clone()));
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

fn main() {
    let args = Args::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.workers.max(1))
        .enable_all()
        .build()
        .expect("tokio runtime");
    rt.block_on(async {
        let listener = TcpListener::bind(args.addr).await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        // First stdout line is the contract with run.sh; flush so it is seen at once.
        println!("listening {addr}");
        use std::io::Write;
        let _ = std::io::stdout().flush();
        let canned = Arc::new(Canned::new(&args));
        tokio::select! {
            _ = serve(listener, canned) => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    });
}
