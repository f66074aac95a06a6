//! `--mode hold`: what an open, idle stream costs the server. N streams are opened at `rate`
//! per second, each on its own connection; once every one has its first `data:` line (or
//! failed), `open OPENED FAILED` is printed on its own line so the caller can read the
//! server's memory, the streams are held for `hold` and then all closed at once, and the JSON
//! result is printed after that line by `main`.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http_body_util::BodyExt;
use hyper_util::rt::TokioIo;
use serde_json::json;
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::{has_data_line, summary, us, BoxError, Target};

/// Shared tallies of every stream.
#[derive(Default)]
struct State {
    opened: u64,
    failed: u64,
    /// Streams the server ended (or whose connection broke) while they were being held.
    ended: u64,
    ttft_us: Vec<u32>,
}

/// Opens one stream at `due` and reads it until the server ends it; the caller aborts the task
/// to close it. The connection is driven inside this task rather than spawned, so that
/// aborting the task drops the socket at once.
async fn hold_one(target: Arc<Target>, due: Instant, state: Arc<Mutex<State>>) {
    tokio::time::sleep_until(due).await;
    let t0 = Instant::now();
    let mut opened = false;
    // Whichever way it ends, only whether it had opened first matters.
    let _: Result<(), BoxError> = async {
        let stream = TcpStream::connect(&target.authority).await?;
        stream.set_nodelay(true)?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        let exchange = async {
            let req = target.request()?;
            sender.ready().await?;
            let resp = sender.send_request(req).await?;
            if !resp.status().is_success() {
                return Err(format!("status {}", resp.status()).into());
            }
            let mut body = resp.into_body();
            let mut carry = Vec::new();
            while let Some(frame) = body.frame().await {
                let Ok(data) = frame?.into_data() else {
                    continue;
                };
                if !opened && has_data_line(&data, &mut carry) {
                    opened = true;
                    let mut s = state.lock().expect("hold state");
                    s.opened += 1;
                    s.ttft_us.push(us(t0.elapsed()));
                }
            }
            Ok::<(), BoxError>(())
        };
        tokio::select! {
            r = conn => Ok(r?),
            r = exchange => r,
        }
    }
    .await;
    let mut s = state.lock().expect("hold state");
    if opened {
        s.ended += 1;
    } else {
        s.failed += 1;
    }
}

/// Runs the hold: `n` streams opened at `rate` per second, held for `hold` once all are open
/// (or `timeout` after the last was due), then closed. Returns the JSON fields.
pub async fn run(
    target: Arc<Target>,
    n: usize,
    rate: f64,
    timeout: Duration,
    hold: Duration,
) -> serde_json::Map<String, serde_json::Value> {
    let state = Arc::new(Mutex::new(State::default()));
    let interval = Duration::from_secs_f64(1.0 / rate);
    let start = Instant::now() + Duration::from_millis(20);
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let due = start + interval.mul_f64(i as f64);
            tokio::spawn(hold_one(target.clone(), due, state.clone()))
        })
        .collect();
    // Polls with a deadline: every stream open (or failed), or the slowest given up on.
    let deadline = start + interval.mul_f64(n as f64) + timeout;
    let (opened, failed) = loop {
        let (opened, failed) = {
            let s = state.lock().expect("hold state");
            (s.opened, s.failed)
        };
        if opened + failed >= n as u64 || Instant::now() >= deadline {
            break (opened, n as u64 - opened);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let open_secs = start.elapsed().as_secs_f64();
    println!("open {opened} {failed}");
    let _ = std::io::stdout().flush();
    tokio::time::sleep(hold).await;
    let ended = state.lock().expect("hold state").ended;
    for t in &tasks {
        t.abort();
    }
    for t in tasks {
        let _ = t.await;
    }
    let mut out = serde_json::Map::new();
    out.insert("mode".into(), json!("hold"));
    out.insert("rate".into(), json!(rate));
    out.insert("streams".into(), json!(n));
    out.insert("opened".into(), json!(opened));
    out.insert("errors".into(), json!(failed));
    out.insert("ended_early".into(), json!(ended));
    out.insert(
        "open_secs".into(),
        json!((open_secs * 100.0).round() / 100.0),
    );
    out.insert("hold_secs".into(), json!(hold.as_secs_f64()));
    let mut ttft = std::mem::take(&mut state.lock().expect("hold state").ttft_us);
    summary("ttft_", &mut ttft, &mut out);
    out
}
