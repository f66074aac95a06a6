//! Open-loop, fixed-rate gRPC load generator for `tollgate.v1.Gateway`: `Complete` (unary) or
//! `StreamComplete` (time to first chunk and the largest gap between chunks). The gRPC twin of
//! `loadgen`, with the same schedule and the same JSON fields, so bench/run.sh and
//! bench/report.py read both alike.
//!
//! Request i is due at `start + i / rate`. `--concurrency` tasks claim due slots in order and
//! send over `--connections` HTTP/2 connections (task k on connection k mod C); a slot claimed
//! after its due time (every task was busy) is charged from its due time, so a stalled server
//! cannot hide its stall by slowing the generator down (coordinated omission).

// Not in src/bin/ itself, so that cargo does not take it for a binary of its own.
#[path = "shared/stats.rs"]
mod stats;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use serde_json::json;
use tokio::time::Instant;
use tollgate::proto;
use tollgate::proto::gateway_client::GatewayClient;
use tonic::metadata::{MetadataKey, MetadataMap, MetadataValue};
use tonic::transport::{Channel, Endpoint};

use stats::{summary, us};

/// Which RPC to call.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Mode {
    /// `Complete`: whole-response latency.
    Unary,
    /// `StreamComplete`: also time to first chunk and largest inter-chunk gap.
    Stream,
}

/// Command-line options of the gRPC load generator.
#[derive(Parser, Debug)]
#[command(about = "Open-loop fixed-rate gRPC load generator for tollgate.v1.Gateway")]
struct Args {
    /// Server URL (plaintext HTTP/2), e.g. http://127.0.0.1:50051.
    #[arg(long)]
    url: String,
    /// Requests per second, scheduled at fixed intervals.
    #[arg(long)]
    rate: f64,
    /// How long to send for.
    #[arg(long, default_value_t = 5.0)]
    duration_secs: f64,
    /// HTTP/2 connections the requests are spread over.
    #[arg(long, default_value_t = 8)]
    connections: usize,
    /// Requests in flight at most (like loadgen's connections).
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Request metadata, "name: value"; repeatable.
    #[arg(long = "header", short = 'H')]
    headers: Vec<String>,
    /// The model of every request.
    #[arg(long, default_value = "up/gpt-bench")]
    model: String,
    /// The user message of every request.
    #[arg(long, default_value = "hello")]
    content: String,
    /// `max_tokens` of every request.
    #[arg(long, default_value_t = 64)]
    max_tokens: u32,
    /// unary: Complete; stream: StreamComplete with TTFT and chunk gaps.
    #[arg(long, value_enum, default_value_t = Mode::Unary)]
    mode: Mode,
    /// Per-request timeout; a timed-out request counts as an error.
    #[arg(long, default_value_t = 5000)]
    timeout_ms: u64,
    /// Stream mode: count streams whose largest gap exceeds this.
    #[arg(long, default_value_t = 200)]
    gap_limit_ms: u64,
    /// Tokio worker threads for the generator itself.
    #[arg(long, default_value_t = 1)]
    workers: usize,
}

/// Request template shared by all tasks.
struct Target {
    request: proto::CompleteRequest,
    metadata: MetadataMap,
    /// Set once the first failure has been described on stderr.
    told: AtomicBool,
}

/// Per-task tallies, merged at the end.
#[derive(Default)]
struct Tally {
    sent: u64,
    ok: u64,
    /// Answers with a non-OK gRPC status (loadgen's non-2xx).
    non_2xx: u64,
    /// Transport failures and timeouts.
    errors: u64,
    /// Slots claimed after they were due: the generator had no free task.
    late: u64,
    latency_us: Vec<u32>,
    ttft_us: Vec<u32>,
    gap_us: Vec<u32>,
    gap_over_limit: u64,
    last_done: Option<Instant>,
}

/// Shared schedule: slot i is due at `start + i * interval`.
struct Schedule {
    start: Instant,
    interval: Duration,
    total: u64,
    next: AtomicU64,
    /// Past this no new request starts, so a stalled server cannot stretch
    /// the run; unclaimed slots are reported as `dropped` (and errors).
    hard_stop: Instant,
}

/// How one call ended; timings are taken from `t0`.
enum Outcome {
    Ok {
        ttft: Option<Duration>,
        max_gap: Option<Duration>,
    },
    /// The server answered with a non-OK status.
    Refused(tonic::Status),
    /// The call failed below gRPC (connection, stream reset).
    Failed(tonic::Status),
}

fn outcome_of(status: tonic::Status) -> Outcome {
    // A status decoded from the server's trailers has no source; one made on this side from
    // a transport or HTTP/2 error carries that error.
    if std::error::Error::source(&status).is_some() {
        Outcome::Failed(status)
    } else {
        Outcome::Refused(status)
    }
}

async fn call(
    client: &mut GatewayClient<Channel>,
    target: &Target,
    mode: Mode,
    t0: Instant,
) -> Outcome {
    let mut req = tonic::Request::new(target.request.clone());
    *req.metadata_mut() = target.metadata.clone();
    if mode == Mode::Unary {
        return match client.complete(req).await {
            Ok(_) => Outcome::Ok {
                ttft: None,
                max_gap: None,
            },
            Err(s) => outcome_of(s),
        };
    }
    let mut stream = match client.stream_complete(req).await {
        Ok(r) => r.into_inner(),
        Err(s) => return outcome_of(s),
    };
    let mut ttft = None;
    let mut last: Option<Instant> = None;
    let mut max_gap: Option<Duration> = None;
    loop {
        match stream.message().await {
            Ok(Some(_)) => {
                let now = Instant::now();
                if ttft.is_none() {
                    ttft = Some(now - t0);
                }
                if let Some(prev) = last {
                    let gap = now - prev;
                    max_gap = Some(max_gap.map_or(gap, |m| m.max(gap)));
                }
                last = Some(now);
            }
            Ok(None) => return Outcome::Ok { ttft, max_gap },
            Err(s) => return outcome_of(s),
        }
    }
}

/// Describes the first failure of the run on stderr, so a run of errors says why.
fn tell(target: &Target, what: &str, status: &tonic::Status) {
    if !target.told.swap(true, Ordering::Relaxed) {
        eprintln!(
            "grpc-loadgen: first failure ({what}): {:?} {}",
            status.code(),
            status.message()
        );
    }
}

async fn worker(
    mut client: GatewayClient<Channel>,
    target: Arc<Target>,
    sched: Arc<Schedule>,
    mode: Mode,
    timeout: Duration,
    gap_limit: Duration,
) -> Tally {
    let mut t = Tally {
        latency_us: Vec::with_capacity(1024),
        ..Tally::default()
    };
    loop {
        let i = sched.next.fetch_add(1, Ordering::Relaxed);
        if i >= sched.total {
            break;
        }
        let due = sched.start + sched.interval.mul_f64(i as f64);
        let claimed = Instant::now();
        if claimed >= sched.hard_stop {
            // The slot stays unsent; main reports it as dropped.
            break;
        }
        // As in loadgen: an idle task measures from when it actually sends (Tokio's timer
        // wakes up to ~1 ms late, and that lateness is the generator's); a task that was busy
        // past the due time measures from the due time (the coordinated-omission correction).
        let t0 = if claimed > due {
            t.late += 1;
            due
        } else {
            tokio::time::sleep_until(due).await;
            Instant::now()
        };
        t.sent += 1;
        let result = tokio::time::timeout(timeout, call(&mut client, &target, mode, t0)).await;
        let done = Instant::now();
        match result {
            Ok(Outcome::Ok { ttft, max_gap }) => {
                t.ok += 1;
                t.latency_us.push(us(done - t0));
                if let Some(v) = ttft {
                    t.ttft_us.push(us(v));
                }
                if let Some(g) = max_gap {
                    t.gap_us.push(us(g));
                    if g > gap_limit {
                        t.gap_over_limit += 1;
                    }
                }
            }
            Ok(Outcome::Refused(s)) => {
                tell(&target, "status", &s);
                t.non_2xx += 1;
                t.latency_us.push(us(done - t0));
            }
            Ok(Outcome::Failed(s)) => {
                tell(&target, "transport", &s);
                t.errors += 1;
            }
            Err(_) => {
                tell(
                    &target,
                    "timeout",
                    &tonic::Status::deadline_exceeded("timed out"),
                );
                t.errors += 1;
            }
        }
        t.last_done = Some(done);
    }
    t
}

fn build_target(args: &Args) -> Result<Target, String> {
    let mut metadata = MetadataMap::new();
    for h in &args.headers {
        let (k, v) = h
            .split_once(':')
            .ok_or_else(|| format!("header {h:?} is not \"name: value\""))?;
        let key = MetadataKey::from_bytes(k.trim().to_ascii_lowercase().as_bytes())
            .map_err(|e| format!("header {k:?}: {e}"))?;
        let value = MetadataValue::try_from(v.trim()).map_err(|e| e.to_string())?;
        metadata.insert(key, value);
    }
    Ok(Target {
        request: proto::CompleteRequest {
            model: args.model.clone(),
            messages: vec![proto::ChatMessage {
                role: "user".into(),
                content: args.content.clone(),
                ..Default::default()
            }],
            max_tokens: Some(args.max_tokens),
            ..Default::default()
        },
        metadata,
        told: AtomicBool::new(false),
    })
}

/// One channel per HTTP/2 connection. Connected before the clock starts so that the first
/// requests do not pay the handshakes; one that cannot connect yet retries on first use, and
/// its requests fail (and are counted) if it still cannot.
async fn channels(endpoint: &Endpoint, n: usize) -> Vec<Channel> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        out.push(match endpoint.connect().await {
            Ok(c) => c,
            Err(_) => endpoint.connect_lazy(),
        });
    }
    out
}

fn main() {
    let args = Args::parse();
    let positive = |x: f64| x.is_finite() && x > 0.0;
    if !positive(args.rate)
        || !positive(args.duration_secs)
        || args.connections == 0
        || args.concurrency == 0
    {
        eprintln!(
            "grpc-loadgen: --rate, --duration-secs, --connections and --concurrency must be positive"
        );
        std::process::exit(2);
    }
    let (target, endpoint) = match build_target(&args).and_then(|t| {
        let e = Endpoint::from_shared(args.url.clone()).map_err(|e| format!("--url: {e}"))?;
        Ok((Arc::new(t), e))
    }) {
        Ok(x) => x,
        Err(e) => {
            eprintln!("grpc-loadgen: {e}");
            std::process::exit(2);
        }
    };
    let timeout = Duration::from_millis(args.timeout_ms);
    // Without TCP_NODELAY, Nagle plus delayed ACK can add ~40 ms per request.
    let endpoint = endpoint.tcp_nodelay(true).connect_timeout(timeout);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.workers.max(1))
        .enable_all()
        .build()
        .expect("tokio runtime");
    let total = (args.rate * args.duration_secs).round().max(1.0) as u64;
    let line = rt.block_on(async {
        let chans = channels(&endpoint, args.connections).await;
        // A short lead-in lets every task start before slot 0 is due.
        let start = Instant::now() + Duration::from_millis(20);
        let duration = Duration::from_secs_f64(args.duration_secs);
        let sched = Arc::new(Schedule {
            start,
            interval: Duration::from_secs_f64(1.0 / args.rate),
            total,
            next: AtomicU64::new(0),
            hard_stop: start + duration + timeout,
        });
        let tasks: Vec<_> = (0..args.concurrency)
            .map(|k| {
                let client = GatewayClient::new(chans[k % chans.len()].clone());
                tokio::spawn(worker(
                    client,
                    target.clone(),
                    sched.clone(),
                    args.mode,
                    timeout,
                    Duration::from_millis(args.gap_limit_ms),
                ))
            })
            .collect();
        let mut all = Tally::default();
        for task in tasks {
            let t = task.await.expect("worker panicked");
            all.sent += t.sent;
            all.ok += t.ok;
            all.non_2xx += t.non_2xx;
            all.errors += t.errors;
            all.late += t.late;
            all.gap_over_limit += t.gap_over_limit;
            all.latency_us.extend(t.latency_us);
            all.ttft_us.extend(t.ttft_us);
            all.gap_us.extend(t.gap_us);
            all.last_done = all.last_done.max(t.last_done);
        }
        let dropped = total - all.sent;
        let elapsed = all
            .last_done
            .map_or(0.0, |d| d.saturating_duration_since(start).as_secs_f64());
        let completed = all.ok + all.non_2xx;
        let mut out = serde_json::Map::new();
        out.insert(
            "mode".into(),
            json!(match args.mode {
                Mode::Unary => "unary",
                Mode::Stream => "stream",
            }),
        );
        out.insert("rate".into(), json!(args.rate));
        out.insert("duration_secs".into(), json!(args.duration_secs));
        out.insert("connections".into(), json!(args.connections));
        out.insert("concurrency".into(), json!(args.concurrency));
        out.insert("sent".into(), json!(all.sent));
        out.insert("ok".into(), json!(all.ok));
        // Unsent slots are failures of the run, so they count as errors too.
        out.insert("errors".into(), json!(all.errors + dropped));
        out.insert("non_2xx".into(), json!(all.non_2xx));
        out.insert("dropped".into(), json!(dropped));
        out.insert("late".into(), json!(all.late));
        let rps = if elapsed > 0.0 {
            completed as f64 / elapsed
        } else {
            0.0
        };
        out.insert("achieved_rps".into(), json!((rps * 10.0).round() / 10.0));
        summary("", &mut all.latency_us, &mut out);
        if args.mode == Mode::Stream {
            summary("ttft_", &mut all.ttft_us, &mut out);
            summary("gap_", &mut all.gap_us, &mut out);
            out.insert("gap_over_limit".into(), json!(all.gap_over_limit));
        }
        serde_json::Value::Object(out).to_string()
    });
    println!("{line}");
    // Connection tasks may still hold sockets; don't wait for them.
    rt.shutdown_timeout(Duration::from_millis(100));
}
