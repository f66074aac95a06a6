//! Open-loop, fixed-rate HTTP/1.1 load generator (like `oha -q RATE
//! --latency-correction`), with an SSE mode that measures time to first
//! `data:` line and the largest gap between chunks.
//!
//! Request i is due at `start + i / rate`. C connection tasks claim due slots
//! in order; a slot claimed after its due time (every connection was busy)
//! is charged from its due time, so a stalled server cannot hide its stall
//! by slowing the generator down (coordinated omission). Prints one JSON line.
//! `--mode hold` instead opens streams and holds them silent (see `hold.rs`).

// Beside this file, not in src/bin/, so that cargo does not take them for binaries of their own.
#[path = "loadgen/hold.rs"]
mod hold;
#[path = "shared/stats.rs"]
mod stats;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use clap::{Parser, ValueEnum};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper::header::{HeaderName, HeaderValue, CONTENT_TYPE, HOST};
use hyper::{HeaderMap, Method, Request, Uri};
use hyper_util::rt::TokioIo;
use serde_json::json;
use tokio::net::TcpStream;
use tokio::time::Instant;

use stats::{pct, summary, us};

/// What to measure on each response.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Mode {
    /// Whole-response latency.
    Plain,
    /// SSE: also time to first `data:` line and largest inter-chunk gap.
    Stream,
    /// Open `--connections` streams, wait for each first `data:` line, hold them all open
    /// for `--hold-secs`, then close them (RSS per idle stream; `hold.rs`).
    Hold,
}

/// Command-line options of the load generator.
#[derive(Parser, Debug)]
#[command(about = "Open-loop fixed-rate HTTP/1.1 load generator")]
struct Args {
    /// Target URL (http only), e.g. http://127.0.0.1:8080/v1/chat/completions.
    #[arg(long)]
    url: Uri,
    /// Requests per second, scheduled at fixed intervals.
    #[arg(long)]
    rate: f64,
    /// How long to send for.
    #[arg(long, default_value_t = 5.0)]
    duration_secs: f64,
    /// Keep-alive connections (upper bound on requests in flight).
    #[arg(long, default_value_t = 64)]
    connections: usize,
    /// Extra request header, "Name: value"; repeatable.
    #[arg(long = "header", short = 'H')]
    headers: Vec<String>,
    /// JSON request body (makes the request a POST).
    #[arg(long, conflicts_with = "body_file")]
    body: Option<String>,
    /// File holding the JSON request body (makes the request a POST).
    #[arg(long)]
    body_file: Option<std::path::PathBuf>,
    /// plain: whole-response latency; stream: also SSE TTFT and chunk gaps.
    #[arg(long, value_enum, default_value_t = Mode::Plain)]
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
    /// Also report p50/p99/max per window of this many seconds (by due time); 0: off.
    #[arg(long, default_value_t = 0.0)]
    window_secs: f64,
    /// Hold mode: how long all streams are held open once every one has its first chunk.
    #[arg(long, default_value_t = 3.0)]
    hold_secs: f64,
}

/// Request template shared by all connections.
struct Target {
    authority: String,
    method: Method,
    path: Uri,
    headers: HeaderMap,
    body: Bytes,
}

/// Per-connection tallies, merged at the end.
#[derive(Default)]
struct Tally {
    sent: u64,
    ok: u64,
    non_2xx: u64,
    errors: u64,
    /// Slots claimed after they were due: the generator had no free connection.
    late: u64,
    latency_us: Vec<u32>,
    /// Window index of each `latency_us` entry (only with `--window-secs`).
    window_of: Vec<u32>,
    /// Window index of each error (only with `--window-secs`).
    error_windows: Vec<u32>,
    ttft_us: Vec<u32>,
    gap_us: Vec<u32>,
    gap_over_limit: u64,
    /// Microseconds requests were actually in flight, summed: their mean concurrency.
    busy_us: u64,
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
    /// Requests in flight now, and the most there have been.
    inflight: AtomicU64,
    inflight_max: AtomicU64,
    /// Window length for per-window figures; zero: off.
    window: Duration,
}

async fn connect(authority: &str) -> std::io::Result<SendRequest<Full<Bytes>>> {
    let stream = TcpStream::connect(authority).await?;
    // Without this, Nagle plus delayed ACK can add ~40 ms per request.
    stream.set_nodelay(true)?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(std::io::Error::other)?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender)
}

/// Outcome of one exchange; timings are taken from `t0`.
struct Exchange {
    status_ok: bool,
    ttft: Option<Duration>,
    max_gap: Option<Duration>,
}

impl Target {
    /// One request from the template.
    fn request(&self) -> Result<Request<Full<Bytes>>, hyper::http::Error> {
        let mut req = Request::builder()
            .method(self.method.clone())
            .uri(self.path.clone())
            .body(Full::new(self.body.clone()))?;
        *req.headers_mut() = self.headers.clone();
        Ok(req)
    }
}

/// Error of one exchange; only counted, never shown.
type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Whether an SSE frame holds the start of a `data:` line. `carry` keeps the start of an
/// incomplete line across frames, so a `data:` split by a frame boundary is still seen; only
/// the line start matters, so it stays short.
fn has_data_line(data: &[u8], carry: &mut Vec<u8>) -> bool {
    let mut events = false;
    for &b in data {
        if b == b'\n' {
            if carry.starts_with(b"data:") {
                events = true;
            }
            carry.clear();
        } else if carry.len() < 5 {
            carry.push(b);
        }
    }
    events
}

async fn exchange(
    sender: &mut SendRequest<Full<Bytes>>,
    target: &Target,
    mode: Mode,
    t0: Instant,
) -> Result<Exchange, BoxError> {
    let req = target.request()?;
    sender.ready().await?;
    let resp = sender.send_request(req).await?;
    let status_ok = resp.status().is_success();
    let mut body = resp.into_body();
    let mut ttft = None;
    let mut last_event: Option<Instant> = None;
    let mut max_gap: Option<Duration> = None;
    let mut carry: Vec<u8> = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame?;
        if mode != Mode::Stream {
            continue;
        }
        let Ok(data) = frame.into_data() else {
            continue;
        };
        let now = Instant::now();
        if has_data_line(&data, &mut carry) {
            if ttft.is_none() {
                ttft = Some(now - t0);
            }
            if let Some(prev) = last_event {
                let gap = now - prev;
                max_gap = Some(max_gap.map_or(gap, |m| m.max(gap)));
            }
            last_event = Some(now);
        }
    }
    Ok(Exchange {
        status_ok,
        ttft,
        max_gap,
    })
}

async fn worker(
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
    let mut sender: Option<SendRequest<Full<Bytes>>> = None;
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
        // Tokio's timer wakes up to ~1 ms late. That lateness is the
        // generator's, so an idle connection measures from when it actually
        // sends; a connection that was busy past the due time measures from
        // the due time, which is the coordinated-omission correction.
        let t0 = if claimed > due {
            t.late += 1;
            due
        } else {
            tokio::time::sleep_until(due).await;
            Instant::now()
        };
        t.sent += 1;
        let now_in = sched.inflight.fetch_add(1, Ordering::Relaxed) + 1;
        sched.inflight_max.fetch_max(now_in, Ordering::Relaxed);
        let sent_at = Instant::now();
        let result = tokio::time::timeout(timeout, async {
            if sender.as_ref().is_none_or(|s| s.is_closed()) {
                sender = Some(connect(&target.authority).await?);
            }
            let s = sender.as_mut().expect("just connected");
            exchange(s, &target, mode, t0).await
        })
        .await;
        let done = Instant::now();
        sched.inflight.fetch_sub(1, Ordering::Relaxed);
        t.busy_us += u64::from(us(done - sent_at));
        // Requests are binned by due time, so a stall shows in the window it delayed.
        let window = (!sched.window.is_zero()).then(|| {
            (due.saturating_duration_since(sched.start).as_secs_f64() / sched.window.as_secs_f64())
                as u32
        });
        match result {
            Ok(Ok(x)) => {
                if x.status_ok {
                    t.ok += 1;
                } else {
                    t.non_2xx += 1;
                }
                t.latency_us.push(us(done - t0));
                t.window_of.extend(window);
                if let Some(v) = x.ttft {
                    t.ttft_us.push(us(v));
                }
                if let Some(g) = x.max_gap {
                    t.gap_us.push(us(g));
                    if g > gap_limit {
                        t.gap_over_limit += 1;
                    }
                }
            }
            Ok(Err(_)) | Err(_) => {
                t.errors += 1;
                t.error_windows.extend(window);
                // The connection state is unknown after a failure; start afresh.
                sender = None;
            }
        }
        t.last_done = Some(done);
    }
    t
}

fn build_target(args: &Args) -> Result<Target, String> {
    if args.url.scheme_str() != Some("http") {
        return Err("only http:// URLs are supported".into());
    }
    let auth = args.url.authority().ok_or("URL has no host")?;
    let authority = match auth.port_u16() {
        Some(_) => auth.to_string(),
        None => format!("{}:80", auth.host()),
    };
    let path = args
        .url
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/")
        .parse::<Uri>()
        .map_err(|e| e.to_string())?;
    let body = match (&args.body, &args.body_file) {
        (Some(b), _) => Some(Bytes::from(b.clone())),
        (None, Some(f)) => Some(Bytes::from(
            std::fs::read(f).map_err(|e| format!("{}: {e}", f.display()))?,
        )),
        (None, None) => None,
    };
    let mut headers = HeaderMap::new();
    headers.insert(
        HOST,
        HeaderValue::from_str(auth.as_str()).map_err(|e| e.to_string())?,
    );
    if body.is_some() {
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    }
    for h in &args.headers {
        let (k, v) = h
            .split_once(':')
            .ok_or_else(|| format!("header {h:?} is not \"Name: value\""))?;
        headers.insert(
            HeaderName::from_bytes(k.trim().as_bytes()).map_err(|e| e.to_string())?,
            HeaderValue::from_str(v.trim()).map_err(|e| e.to_string())?,
        );
    }
    Ok(Target {
        authority,
        method: if body.is_some() {
            Method::POST
        } else {
            Method::GET
        },
        path,
        headers,
        body: body.unwrap_or_default(),
    })
}

/// Per-window figures: for each window of due times, requests, errors, p50, p99 and max.
/// `latency_us` and `window_of` are parallel; keys start with `w_` so they never shadow the
/// run's own fields for a reader that picks fields out of the line by name.
fn windows(
    latency_us: &[u32],
    window_of: &[u32],
    error_windows: &[u32],
    secs: f64,
) -> serde_json::Value {
    let n = window_of
        .iter()
        .chain(error_windows)
        .max()
        .map_or(0, |&m| m as usize + 1);
    let mut bins: Vec<Vec<u32>> = vec![Vec::new(); n];
    for (&l, &w) in latency_us.iter().zip(window_of) {
        bins[w as usize].push(l);
    }
    let mut errors = vec![0u64; n];
    for &w in error_windows {
        errors[w as usize] += 1;
    }
    let rows: Vec<_> = bins
        .iter_mut()
        .zip(errors)
        .enumerate()
        .map(|(i, (v, e))| {
            v.sort_unstable();
            json!({
                "w_t": i as f64 * secs,
                "w_n": v.len(),
                "w_errors": e,
                "w_p50_us": pct(v, 0.5),
                "w_p99_us": pct(v, 0.99),
                "w_max_us": v.last().copied().unwrap_or(0),
            })
        })
        .collect();
    json!(rows)
}

/// utime+stime of this process so far, in clock ticks (`/proc/self/stat`; 0 elsewhere): the
/// generator's own CPU, to show whether it was near a core's worth.
fn self_cpu_ticks() -> u64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return 0;
    };
    // Fields after "pid (comm) ": utime is the 12th, stime the 13th.
    let rest = stat.rsplit_once(") ").map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let get = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    get(11) + get(12)
}

/// The fixed-rate run (plain and stream modes): its JSON fields.
async fn run_rate(args: &Args, target: Arc<Target>) -> serde_json::Map<String, serde_json::Value> {
    let timeout = Duration::from_millis(args.timeout_ms);
    let total = (args.rate * args.duration_secs).round().max(1.0) as u64;
    // A short lead-in lets every connection task start before slot 0 is due.
    let start = Instant::now() + Duration::from_millis(20);
    let duration = Duration::from_secs_f64(args.duration_secs);
    let sched = Arc::new(Schedule {
        start,
        interval: Duration::from_secs_f64(1.0 / args.rate),
        total,
        next: AtomicU64::new(0),
        hard_stop: start + duration + timeout,
        inflight: AtomicU64::new(0),
        inflight_max: AtomicU64::new(0),
        window: Duration::from_secs_f64(args.window_secs.max(0.0)),
    });
    let tasks: Vec<_> = (0..args.connections)
        .map(|_| {
            tokio::spawn(worker(
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
        all.busy_us += t.busy_us;
        all.latency_us.extend(t.latency_us);
        all.window_of.extend(t.window_of);
        all.error_windows.extend(t.error_windows);
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
        json!(if args.mode == Mode::Stream {
            "stream"
        } else {
            "plain"
        }),
    );
    out.insert("rate".into(), json!(args.rate));
    out.insert("duration_secs".into(), json!(args.duration_secs));
    out.insert("connections".into(), json!(args.connections));
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
    out.insert(
        "inflight_max".into(),
        json!(sched.inflight_max.load(Ordering::Relaxed)),
    );
    let mean = if elapsed > 0.0 {
        all.busy_us as f64 / 1e6 / elapsed
    } else {
        0.0
    };
    out.insert("inflight_mean".into(), json!((mean * 10.0).round() / 10.0));
    if !sched.window.is_zero() {
        let w = windows(
            &all.latency_us,
            &all.window_of,
            &all.error_windows,
            args.window_secs,
        );
        out.insert("windows".into(), w);
    }
    summary("", &mut all.latency_us, &mut out);
    if args.mode == Mode::Stream {
        summary("ttft_", &mut all.ttft_us, &mut out);
        summary("gap_", &mut all.gap_us, &mut out);
        out.insert("gap_over_limit".into(), json!(all.gap_over_limit));
    }
    out
}

fn main() {
    let args = Args::parse();
    let positive = |x: f64| x.is_finite() && x > 0.0;
    if !positive(args.rate) || !positive(args.duration_secs) || args.connections == 0 {
        eprintln!("loadgen: --rate, --duration-secs and --connections must be positive");
        std::process::exit(2);
    }
    let target = match build_target(&args) {
        Ok(t) => Arc::new(t),
        Err(e) => {
            eprintln!("loadgen: {e}");
            std::process::exit(2);
        }
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.workers.max(1))
        .enable_all()
        .build()
        .expect("tokio runtime");
    let mut out = rt.block_on(async {
        if args.mode == Mode::Hold {
            hold::run(
                target,
                args.connections,
                args.rate,
                Duration::from_millis(args.timeout_ms),
                Duration::from_secs_f64(args.hold_secs.max(0.0)),
            )
            .await
        } else {
            run_rate(&args, target).await
        }
    });
    out.insert("self_cpu_ticks".into(), json!(self_cpu_ticks()));
    println!("{}", serde_json::Value::Object(out));
    // Connection tasks may still hold sockets; don't wait for them.
    rt.shutdown_timeout(Duration::from_millis(100));
}
