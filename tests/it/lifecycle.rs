//! Process lifecycle on the built binary, each gateway a separate process (issue 13 items 1-3
//! and 7, issue 14 item 5): SIGTERM under load, SIGKILL and restart, a database that goes
//! away while requests flow, two replicas on one fresh database, a rolling restart. The
//! database is counted directly: every request that reached a gateway must have exactly one
//! ledger row, and no lease or reservation may be left behind.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::response::{IntoResponse, Response};
use axum::Router;
use futures_util::StreamExt;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tollgate::clock::Clock;
use tollgate::proto::gateway_client::GatewayClient;
use tollgate::store::Store;

use crate::common::process::Process;
use crate::common::*;

const ADMIN: &str = "tg-admin-lifecycle-test-0123456789";
/// How long a process may take to start, drain or exit on a loaded 2-core machine.
const SLOW: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------------------------
// a paced upstream

/// An OpenAI-compatible upstream whose answers take known time, by model name:
///
/// | model   | behaviour |
/// |---------|-----------|
/// | `slow`  | waits 2 s, then a chat.completion with usage 10/5 |
/// | `quick` | a chat.completion with usage 10/5 at once |
/// | `short` | streamed: 10 chunks 150 ms apart, then usage 10/10 and `[DONE]` (1.5 s) |
/// | `long`  | streamed: 600 chunks 100 ms apart (a minute: outlives any grace period) |
///
/// A non-streamed request for `short` or `long` is answered like `quick`.
#[derive(Clone)]
struct Paced {
    addr: SocketAddr,
    calls: Arc<AtomicUsize>,
}

impl Paced {
    async fn start() -> Paced {
        let calls = Arc::new(AtomicUsize::new(0));
        let c = calls.clone();
        let app = Router::new().fallback(move |body: Bytes| {
            let c = c.clone();
            async move {
                c.fetch_add(1, Ordering::SeqCst);
                paced_answer(body).await
            }
        });
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind upstream");
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Paced { addr, calls }
    }

    fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

fn completion(model: &str) -> Response {
    let v = json!({
        "id": "chatcmpl-p", "object": "chat.completion", "created": 1_700_000_000, "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "paced answer"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}
    });
    ([("content-type", "application/json")], v.to_string()).into_response()
}

fn sse_chunk(content: Option<&str>, finish: Option<&str>, usage: Option<(u64, u64)>) -> Bytes {
    let choices = match (content, finish) {
        (None, None) => json!([]),
        _ => {
            json!([{"index": 0, "delta": content.map_or(json!({}), |c| json!({"content": c})), "finish_reason": finish}])
        }
    };
    let mut v = json!({
        "id": "chatcmpl-p", "object": "chat.completion.chunk", "created": 1_700_000_000,
        "model": "m", "choices": choices,
    });
    if let Some((p, c)) = usage {
        v["usage"] = json!({"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c});
    }
    Bytes::from(format!("data: {v}\n\n"))
}

async fn paced_answer(body: Bytes) -> Response {
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let model = body["model"].as_str().unwrap_or("").to_string();
    let stream = body["stream"].as_bool().unwrap_or(false);
    let (chunks, pace) = match model.as_str() {
        "short" => (10u64, 150u64),
        "long" => (600, 100),
        "slow" => {
            tokio::time::sleep(Duration::from_secs(2)).await;
            return completion(&model);
        }
        _ => return completion(&model),
    };
    if !stream {
        return completion(&model);
    }
    let s = futures_util::stream::unfold(0u64, move |i| async move {
        if i > chunks + 1 {
            return None;
        }
        let item = if i < chunks {
            if i > 0 {
                tokio::time::sleep(Duration::from_millis(pace)).await;
            }
            sse_chunk(Some("tok "), None, None)
        } else if i == chunks {
            let mut b = sse_chunk(None, Some("stop"), None).to_vec();
            b.extend_from_slice(&sse_chunk(None, None, Some((10, chunks))));
            Bytes::from(b)
        } else {
            Bytes::from_static(b"data: [DONE]\n\n")
        };
        Some((Ok::<_, std::io::Error>(item), i + 1))
    });
    Response::builder()
        .status(200)
        .header("content-type", "text/event-stream")
        .body(Body::from_stream(s))
        .unwrap()
}

// ---------------------------------------------------------------------------------------------
// configuration, processes and the database

/// The standard test configuration with an admin token, provider `p` on the paced upstream
/// (priced: 1000/2000 USD per million tokens), `grace` seconds of shutdown grace, and extra
/// `[server]` lines and tables.
fn config_text(db_url: &str, up: &Paced, grace: u64, server: &str, extra: &str) -> String {
    let opts = Opts {
        server: format!("admin_token = \"{ADMIN}\"\n{server}"),
        ledger_flush_ms: Some(200),
        extra: format!(
            r#"[providers.p]
kind = "openai"
base_url = "{base}"
keys = ["sk-upstream-test"]
first_byte_timeout_ms = 10000
idle_timeout_ms = 10000
total_timeout_ms = 120000

[pricing."p/slow"]
input_usd_per_mtok = 1000.0
output_usd_per_mtok = 2000.0

[pricing."p/quick"]
input_usd_per_mtok = 1000.0
output_usd_per_mtok = 2000.0

[pricing."p/short"]
input_usd_per_mtok = 1000.0
output_usd_per_mtok = 2000.0

[pricing."p/long"]
input_usd_per_mtok = 1000.0
output_usd_per_mtok = 2000.0

{extra}
"#,
            base = up.base_url()
        ),
        ..Opts::default()
    };
    let text = config_toml(db_url, &up.base_url(), &opts);
    let text = text.replace(
        "shutdown_grace_secs = 2\n",
        &format!("shutdown_grace_secs = {grace}\n"),
    );
    assert!(text.contains(&format!("shutdown_grace_secs = {grace}\n")));
    text
}

/// A config file in a temp dir of its own.
struct ConfigFile {
    _dir: tempfile::TempDir,
    path: PathBuf,
}

fn write_config(text: &str) -> ConfigFile {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("tollgate.toml");
    std::fs::write(&path, text).expect("write config");
    ConfigFile { _dir: dir, path }
}

async fn spawn(config: &ConfigFile) -> Process {
    let path = config.path.clone();
    blocking(move || Process::serve(&path, SLOW)).await
}

/// `/readyz` status of a process, `None` when it cannot be reached.
async fn readyz(client: &reqwest::Client, p: &Process) -> Option<u16> {
    client
        .get(p.url("/readyz"))
        .timeout(Duration::from_secs(3))
        .send()
        .await
        .ok()
        .map(|r| r.status().as_u16())
}

async fn wait_ready(client: &reqwest::Client, p: &Process) {
    eventually(SLOW, "/readyz to answer 200", || async {
        (readyz(client, p).await == Some(200)).then_some(())
    })
    .await;
}

/// Waits for the process to exit; its exit status.
async fn wait_exit(p: &mut Process, within: Duration) -> std::process::ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(status) = p.exited() {
            return status;
        }
        assert!(
            start.elapsed() < within,
            "tollgate did not exit within {within:?}\n--- log ---\n{}",
            p.log_text()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `PUT /admin/budgets` on a process.
async fn put_budget(client: &reqwest::Client, p: &Process, body: Value) {
    let resp = client
        .put(p.url("/admin/budgets"))
        .bearer_auth(ADMIN)
        .json(&body)
        .send()
        .await
        .expect("PUT /admin/budgets");
    let status = resp.status();
    let text = resp.text().await.unwrap_or_default();
    assert_eq!(status, 200, "PUT /admin/budgets: {text}");
}

async fn store_of(url: &str) -> Store {
    Store::connect(url, 2, Clock::system())
        .await
        .unwrap_or_else(|e| panic!("Store::connect({url}): {e}"))
}

/// The reason of every ledger row of each request id.
async fn ledger_reasons(store: &Store, ids: &[String]) -> HashMap<String, Vec<String>> {
    let mut out = HashMap::new();
    for id in ids {
        let rows = store
            .ledger_by_request_id(id)
            .await
            .unwrap_or_else(|e| panic!("ledger_by_request_id: {e}"));
        out.insert(id.clone(), rows.into_iter().map(|r| r.reason).collect());
    }
    out
}

#[derive(diesel::QueryableByName, Debug, PartialEq)]
struct Held {
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    rows: i64,
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    leases: i64,
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    amount: i64,
}

#[derive(diesel::QueryableByName, Debug)]
struct BudgetTotals {
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    spent: i64,
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    reserved: i64,
}

#[derive(diesel::QueryableByName, Debug)]
struct Count {
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    n: i64,
}

async fn pg(url: &str) -> diesel_async::AsyncPgConnection {
    use diesel_async::AsyncConnection;
    diesel_async::AsyncPgConnection::establish(url)
        .await
        .unwrap_or_else(|e| panic!("connect {url}: {e}"))
}

/// Open reservation rows (leases among them) and what they hold, on PostgreSQL.
async fn held(url: &str) -> Held {
    use diesel_async::RunQueryDsl;
    diesel::sql_query(
        "SELECT COUNT(*)::BIGINT AS rows, \
         COUNT(*) FILTER (WHERE id LIKE 'lease-%')::BIGINT AS leases, \
         COALESCE(SUM(amount_micros), 0)::BIGINT AS amount FROM budget_reservations",
    )
    .get_result(&mut pg(url).await)
    .await
    .expect("count reservations")
}

/// Spent and reserved of every budget row together, on PostgreSQL.
async fn budget_totals(url: &str) -> BudgetTotals {
    use diesel_async::RunQueryDsl;
    diesel::sql_query(
        "SELECT COALESCE(SUM(spent_micros), 0)::BIGINT AS spent, \
         COALESCE(SUM(reserved_micros), 0)::BIGINT AS reserved FROM budgets",
    )
    .get_result(&mut pg(url).await)
    .await
    .expect("sum budgets")
}

/// Ledger rows and their cost, on PostgreSQL.
async fn ledger_count(url: &str) -> (i64, i64) {
    use diesel_async::RunQueryDsl;
    let n: Count = diesel::sql_query("SELECT COUNT(*)::BIGINT AS n FROM usage_ledger")
        .get_result(&mut pg(url).await)
        .await
        .expect("count ledger");
    let cost: Count =
        diesel::sql_query("SELECT COALESCE(SUM(cost_micros), 0)::BIGINT AS n FROM usage_ledger")
            .get_result(&mut pg(url).await)
            .await
            .expect("sum ledger");
    (n.n, cost.n)
}

/// How one request sent during a test ended, as the caller saw it.
#[derive(Debug, Clone, PartialEq)]
enum Seen {
    /// A whole answer (200 and, for a stream, `[DONE]`).
    Answered,
    /// A stream that ended with an error event / gRPC status whose reason is given.
    StreamError(String),
    /// A refusal with this HTTP status (or gRPC code) and reason.
    Refused(String, String),
    /// The connection was refused before the request was sent (nothing reached the gateway).
    NotConnected,
    /// Anything else (a cut connection, a broken body): always a failure of the test.
    Broken(String),
}

async fn http_call(
    client: reqwest::Client,
    url: String,
    model: String,
    stream: bool,
    id: String,
) -> Seen {
    let mut body = json!({
        "model": model,
        "messages": [{"role": "user", "content": format!("lifecycle {id}")}],
        "max_tokens": 20,
    });
    if stream {
        body["stream"] = json!(true);
    }
    let resp = match client
        .post(url)
        .bearer_auth(ALICE_KEY)
        .header("x-request-id", &id)
        .json(&body)
        .send()
        .await
    {
        Ok(r) => r,
        Err(e) if e.is_connect() => return Seen::NotConnected,
        Err(e) => return Seen::Broken(format!("send: {e:?}")),
    };
    let status = resp.status().as_u16();
    if status != 200 {
        let text = resp.text().await.unwrap_or_default();
        let v: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        return match v["error"]["code"].as_str() {
            Some(code) => Seen::Refused(status.to_string(), code.to_string()),
            None => Seen::Broken(format!("{status}: {text}")),
        };
    }
    if !stream {
        return match resp.json::<Value>().await {
            Ok(v) if v["choices"][0]["message"]["content"].is_string() => Seen::Answered,
            Ok(v) => Seen::Broken(format!("not a completion: {v}")),
            Err(e) => Seen::Broken(format!("body: {e}")),
        };
    }
    let (events, end) = SseReader::new(resp).collect().await;
    if end != SseEvent::End {
        return Seen::Broken(format!(
            "stream ended {end:?} after {} events",
            events.len()
        ));
    }
    match events.last().map(String::as_str) {
        Some("[DONE]") => Seen::Answered,
        Some(last) => {
            let v: Value = serde_json::from_str(last).unwrap_or(Value::Null);
            match v["error"]["code"].as_str() {
                Some(code) => Seen::StreamError(code.to_string()),
                None => Seen::Broken(format!("stream ended on {last}")),
            }
        }
        None => Seen::Broken("empty stream".into()),
    }
}

async fn grpc_call(addr: SocketAddr, model: String, stream: bool, id: String) -> Seen {
    let mut client = match GatewayClient::connect(format!("http://{addr}")).await {
        Ok(c) => c,
        Err(_) => return Seen::NotConnected,
    };
    let req = grpc_request(complete_request(&model, &id), Some(ALICE_KEY), Some(&id));
    let refused = |s: tonic::Status| Seen::Refused(format!("{:?}", s.code()), grpc_reason(&s));
    if !stream {
        return match client.complete(req).await {
            Ok(_) => Seen::Answered,
            Err(s) if grpc_reason(&s).is_empty() => Seen::Broken(format!("{s:?}")),
            Err(s) => refused(s),
        };
    }
    let mut chunks = match client.stream_complete(req).await {
        Ok(r) => r.into_inner(),
        Err(s) if grpc_reason(&s).is_empty() => return Seen::Broken(format!("{s:?}")),
        Err(s) => return refused(s),
    };
    let mut n = 0;
    loop {
        match chunks.next().await {
            Some(Ok(_)) => n += 1,
            None if n > 0 => return Seen::Answered,
            None => return Seen::Broken("empty stream".into()),
            Some(Err(s)) if grpc_reason(&s).is_empty() => {
                return Seen::Broken(format!("after {n} chunks: {s:?}"))
            }
            Some(Err(s)) => return Seen::StreamError(grpc_reason(&s)),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 1. SIGTERM under load

/// SIGTERM while non-streamed requests and streams are in flight on both protocols, with a
/// budget leased by the replica: `/readyz` turns 503 at once, requests and streams that fit in
/// the grace period finish, streams that do not end with an error event (a gRPC status) and are
/// recorded, the process exits 0, every request has exactly one ledger row, the lease is back
/// in the budget (no reservation row left, nothing reserved, spent = the ledger's cost), and a
/// restart on the same database duplicates nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_drains_records_and_returns_leases() {
    let Some(db) = TestDb::postgres().await else {
        return;
    };
    let up = Paced::start().await;
    let text = config_text(
        &db.url,
        &up,
        4,
        "shutdown_delay_ms = 1000",
        "[budgets]\nlease_fraction = 0.1\nlease_ttl_ms = 30000\n",
    );
    let config = write_config(&text);
    let mut p = spawn(&config).await;
    let client = http_client();
    wait_ready(&client, &p).await;
    let store = store_of(&db.url).await;
    let alice = store.find_user("alice").await.unwrap().expect("alice").id;
    put_budget(
        &client,
        &p,
        json!({"scope": "user", "id": alice, "limit_usd": 1000, "period": "total"}),
    )
    .await;
    // One request first, so that the replica holds a lease when the load comes.
    let warm = http_call(
        client.clone(),
        p.url("/v1/chat/completions"),
        "p/quick".into(),
        false,
        "life-warm".into(),
    )
    .await;
    assert_eq!(warm, Seen::Answered);
    let before = held(&db.url).await;
    assert!(
        before.leases >= 1 && before.amount > 0,
        "a lease is held: {before:?}"
    );

    // (protocol, model, stream, how many)
    let mix: [(&str, &str, bool, usize); 6] = [
        ("http", "p/slow", false, 24),
        ("http", "p/short", true, 6),
        ("http", "p/long", true, 4),
        ("grpc", "p/slow", false, 10),
        ("grpc", "p/short", true, 3),
        ("grpc", "p/long", true, 3),
    ];
    let mut tasks = Vec::new();
    let mut ids = vec!["life-warm".to_string()];
    for (proto, model, stream, n) in mix {
        for i in 0..n {
            let id = format!("life-{proto}-{}-{i}", model.trim_start_matches("p/"));
            ids.push(id.clone());
            let (client, url, grpc) = (client.clone(), p.url("/v1/chat/completions"), p.grpc);
            let model = model.to_string();
            tasks.push(tokio::spawn(async move {
                let seen = match proto {
                    "http" => http_call(client, url, model.clone(), stream, id.clone()).await,
                    _ => grpc_call(grpc, model.clone(), stream, id.clone()).await,
                };
                (id, model, seen)
            }));
        }
    }
    let sent = ids.len();
    // Every request has reached the upstream: all of them are in flight.
    eventually(SLOW, "every request to reach the upstream", || async {
        (up.calls() >= sent).then_some(())
    })
    .await;
    p.signal("TERM");
    let term_at = Instant::now();
    eventually(
        Duration::from_secs(1),
        "/readyz to answer 503 after SIGTERM",
        || async { (readyz(&client, &p).await == Some(503)).then_some(()) },
    )
    .await;
    let status = wait_exit(&mut p, SLOW).await;
    let exit_after = term_at.elapsed();
    assert!(status.success(), "exit status {status:?}\n{}", p.log_text());
    let mut answered = 0;
    for t in tasks {
        let (id, model, seen) = t.await.expect("request task");
        if model == "p/long" {
            assert_eq!(seen, Seen::StreamError("internal_error".into()), "{id}");
        } else {
            assert_eq!(
                seen,
                Seen::Answered,
                "{id} finishes within the grace period"
            );
            answered += 1;
        }
    }
    let rows = ledger_reasons(&store, &ids).await;
    let lost: Vec<_> = rows
        .iter()
        .filter(|(_, r)| r.is_empty())
        .map(|(id, _)| id)
        .collect();
    let doubled: Vec<_> = rows.iter().filter(|(_, r)| r.len() > 1).collect();
    eprintln!(
        "SIGTERM figures: {} requests in flight at SIGTERM ({answered} answered, {} streams \
         cut), exit after {exit_after:?}, ledger rows lost: {}",
        sent - 1,
        sent - 1 - answered,
        lost.len()
    );
    assert!(lost.is_empty(), "requests without a ledger row: {lost:?}");
    assert!(
        doubled.is_empty(),
        "requests with more than one row: {doubled:?}"
    );
    for (id, reasons) in &rows {
        let want = if id.contains("-long-") {
            "internal_error"
        } else {
            "success"
        };
        assert_eq!(reasons, &vec![want.to_string()], "{id}");
    }
    // The lease went back: no reservation row is left and nothing is reserved; what was spent
    // is exactly what the ledger charged.
    assert_eq!(
        held(&db.url).await,
        Held {
            rows: 0,
            leases: 0,
            amount: 0
        }
    );
    let totals = budget_totals(&db.url).await;
    let (ledger_rows, ledger_cost) = ledger_count(&db.url).await;
    assert_eq!(ledger_rows as usize, sent);
    assert_eq!(totals.reserved, 0, "{totals:?}");
    assert_eq!(totals.spent, ledger_cost, "{totals:?}");

    // A restart on the same database duplicates nothing.
    let mut again = spawn(&config).await;
    wait_ready(&client, &again).await;
    again.signal("TERM");
    let status = wait_exit(&mut again, SLOW).await;
    assert!(status.success(), "{}", again.log_text());
    assert_eq!(ledger_count(&db.url).await, (ledger_rows, ledger_cost));
    assert_eq!(ledger_reasons(&store, &ids).await, rows);
}

// ---------------------------------------------------------------------------------------------
// 2. SIGKILL and restart

const BOB_KEY: &str = "tg-test-bob-lifecycle";

/// Bob: a second static key, with no budget (his rows go through the ledger's flush window).
const BOB: &str = "[[auth.static_keys]]\nuser = \"bob\"\nkey = \"tg-test-bob-lifecycle\"\n";

/// Sends `p/quick` requests as bob from `workers` loops until one fails (the process died);
/// the id of every answered request, and when its answer came.
async fn steady_load(url: String, workers: usize, prefix: String) -> Vec<(String, Instant)> {
    let client = http_client();
    let mut loops = Vec::new();
    for w in 0..workers {
        let (client, url, prefix) = (client.clone(), url.clone(), prefix.clone());
        loops.push(tokio::spawn(async move {
            let mut answered = Vec::new();
            for i in 0.. {
                let id = format!("{prefix}-{w}-{i}");
                let resp = client
                    .post(&url)
                    .bearer_auth(BOB_KEY)
                    .header("x-request-id", &id)
                    .json(&json!({"model": "p/quick", "messages": [{"role": "user", "content": "hi"}]}))
                    .timeout(Duration::from_secs(10))
                    .send()
                    .await;
                let Ok(r) = resp else { break };
                if r.status() != 200 || r.bytes().await.is_err() {
                    break;
                }
                answered.push((id, Instant::now()));
            }
            answered
        }));
    }
    let mut all = Vec::new();
    for l in loops {
        all.extend(l.await.expect("load loop"));
    }
    all
}

/// SIGKILL with budgeted requests in flight and steady unbudgeted traffic, then a restart:
/// the dead process's reservations expire after `reservation_ttl_secs` and are released or
/// (`expired_reservations = "charge"`) charged at their reserved maximum; the answered requests
/// that have no ledger row are bounded by the ledger's flush window.
async fn sigkill_then_restart(policy: &str) {
    let Some(db) = TestDb::postgres().await else {
        return;
    };
    let up = Paced::start().await;
    let text = config_text(
        &db.url,
        &up,
        2,
        "",
        &format!(
            "[budgets]\nlease_fraction = 0\nreservation_ttl_secs = 3\nsweep_interval_secs = 1\n\
             expired_reservations = \"{policy}\"\n\n{BOB}"
        ),
    );
    let config = write_config(&text);
    let mut p = spawn(&config).await;
    let client = http_client();
    wait_ready(&client, &p).await;
    let store = store_of(&db.url).await;
    let alice = store.find_user("alice").await.unwrap().expect("alice").id;
    put_budget(
        &client,
        &p,
        json!({"scope": "user", "id": alice, "limit_usd": 1000, "period": "total"}),
    )
    .await;
    let url = p.url("/v1/chat/completions");
    let slow: Vec<_> = (0..6)
        .map(|i| {
            let (client, url) = (client.clone(), url.clone());
            tokio::spawn(http_call(
                client,
                url,
                "p/slow".into(),
                false,
                format!("kill-slow-{policy}-{i}"),
            ))
        })
        .collect();
    eventually(
        SLOW,
        "the budgeted requests to reach the upstream",
        || async { (up.calls() >= slow.len()).then_some(()) },
    )
    .await;
    let reserved = held(&db.url).await;
    assert_eq!((reserved.rows, reserved.leases), (6, 0), "{reserved:?}");
    assert!(reserved.amount > 0);

    let load = tokio::spawn(steady_load(url, 4, format!("kill-{policy}")));
    // Let the load run for a while (answers keep coming: the process is healthy).
    let base = up.calls();
    eventually(SLOW, "steady traffic", || async {
        (up.calls() >= base + 100).then_some(())
    })
    .await;
    // ... for several flush windows, so that most rows have been written.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    p.signal("KILL");
    let killed_at = Instant::now();
    let status = wait_exit(&mut p, SLOW).await;
    assert!(!status.success(), "SIGKILL ends the process: {status:?}");
    let answered = load.await.expect("load");
    for s in slow {
        let seen = s.await.expect("slow request");
        assert!(matches!(seen, Seen::Broken(_)), "{seen:?}");
    }

    let mut again = spawn(&config).await;
    wait_ready(&client, &again).await;
    let ids: Vec<String> = answered.iter().map(|(id, _)| id.clone()).collect();
    let rows = ledger_reasons(&store, &ids).await;
    let lost: Vec<&(String, Instant)> = answered
        .iter()
        .filter(|(id, _)| rows[id].is_empty())
        .collect();
    assert!(rows.values().all(|r| r.len() <= 1), "a row written twice");
    let window = Duration::from_millis(200);
    let last_window = answered
        .iter()
        .filter(|(_, at)| {
            killed_at.saturating_duration_since(*at) <= window + Duration::from_millis(1000)
        })
        .count();
    let oldest_lost = lost
        .iter()
        .map(|(_, at)| killed_at.saturating_duration_since(*at))
        .max()
        .unwrap_or_default();
    eprintln!(
        "SIGKILL figures ({policy}): {} answered, {} without a ledger row (the oldest answered \
         {oldest_lost:?} before the kill; {last_window} answered in the last 1.2 s)",
        answered.len(),
        lost.len()
    );
    assert!(answered.len() >= 100, "steady traffic was answered");
    // Only rows still waiting for their flush (at most `ledger_flush_ms` old, plus the write
    // under way) can be lost.
    assert!(
        oldest_lost <= window + Duration::from_millis(1000),
        "a row older than the flush window was lost ({oldest_lost:?})"
    );

    // The reservations of the dead process expire and are swept by the new one.
    eventually(
        SLOW,
        "the dead process's reservations to be swept",
        || async { (held(&db.url).await.rows == 0).then_some(()) },
    )
    .await;
    let totals = budget_totals(&db.url).await;
    assert_eq!(totals.reserved, 0, "{totals:?}");
    let want_spent = if policy == "charge" {
        reserved.amount
    } else {
        0
    };
    assert_eq!(totals.spent, want_spent, "{policy}: {totals:?}");
    again.signal("TERM");
    assert!(wait_exit(&mut again, SLOW).await.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_expired_reservations_are_released() {
    sigkill_then_restart("release").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_expired_reservations_are_charged_when_configured() {
    sigkill_then_restart("charge").await;
}

// ---------------------------------------------------------------------------------------------
// 4. two replicas as two processes

/// A chat body whose prompt estimate does not depend on `n` (below 1000).
fn fixed_body(model: &str, n: usize, max_tokens: u64) -> Value {
    json!({
        "model": model,
        "messages": [{"role": "user", "content": format!("replica request {n:03}")}],
        "max_tokens": max_tokens,
    })
}

/// The most tollgate reserves for [`fixed_body`] on the priced `p/*` models.
fn max_cost(max_tokens: u64) -> i64 {
    let body = fixed_body("p/slow", 0, max_tokens);
    let est = tollgate::api::openai_chat::parse_request(body.to_string().as_bytes())
        .expect("a valid chat body")
        .estimate_prompt_tokens() as i64;
    est * 1000 + max_tokens as i64 * 2000
}

async fn send_fixed(client: &reqwest::Client, p: &Process, body: &Value, id: &str) -> (u16, Value) {
    let resp = client
        .post(p.url("/v1/chat/completions"))
        .bearer_auth(ALICE_KEY)
        .header("x-request-id", id)
        .json(body)
        .send()
        .await
        .expect("chat request");
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

/// Two processes started at the same moment on a fresh database (their migrations race);
/// 100 concurrent budgeted requests across both, room for exactly 10: 10 answers, 90
/// `budget_exceeded`, and the budget spent exactly what the ledger charged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_race_migrations_and_share_one_budget_exactly() {
    let Some(db) = TestDb::postgres().await else {
        return;
    };
    let up = Paced::start().await;
    let text = config_text(&db.url, &up, 2, "", "[budgets]\nlease_fraction = 0\n");
    let config = write_config(&text);
    let (a, b) = tokio::join!(spawn(&config), spawn(&config));
    let mut replicas = [a, b];
    let client = http_client();
    for p in &replicas {
        wait_ready(&client, p).await;
    }
    let store = store_of(&db.url).await;
    let alice = store.find_user("alice").await.unwrap().expect("alice").id;
    let max = max_cost(20);
    put_budget(
        &client,
        &replicas[0],
        json!({"scope": "user", "id": alice, "limit_usd": (10 * max) as f64 / 1e6, "period": "total"}),
    )
    .await;
    let mut tasks = Vec::new();
    for n in 0..100 {
        let client = client.clone();
        let url = replicas[n % 2].url("/v1/chat/completions");
        tasks.push(tokio::spawn(async move {
            let resp = client
                .post(url)
                .bearer_auth(ALICE_KEY)
                .header("x-request-id", format!("replica-budget-{n:03}"))
                .json(&fixed_body("p/slow", n, 20))
                .send()
                .await
                .expect("chat request");
            let status = resp.status().as_u16();
            let v: Value = resp.json().await.unwrap_or(Value::Null);
            (
                status,
                v["error"]["code"].as_str().unwrap_or("").to_string(),
            )
        }));
    }
    let mut seen: HashMap<(u16, String), usize> = HashMap::new();
    for t in tasks {
        *seen.entry(t.await.expect("task")).or_default() += 1;
    }
    assert_eq!(seen.get(&(200, String::new())), Some(&10), "{seen:?}");
    assert_eq!(
        seen.get(&(429, "budget_exceeded".into())),
        Some(&90),
        "{seen:?}"
    );
    for p in &mut replicas {
        p.signal("TERM");
    }
    for p in &mut replicas {
        assert!(wait_exit(p, SLOW).await.success(), "{}", p.log_text());
    }
    let (rows, cost) = ledger_count(&db.url).await;
    assert_eq!(rows, 100, "one row per request");
    let totals = budget_totals(&db.url).await;
    assert_eq!((totals.spent, totals.reserved), (cost, 0));
    assert!(totals.spent <= 10 * max);
}

/// A replica holding a lease is killed: its lease keeps that room from the other replica until
/// `lease_ttl_ms`, then the other replica gets the whole budget.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_of_a_killed_replica_is_reclaimed_after_its_ttl() {
    let Some(db) = TestDb::postgres().await else {
        return;
    };
    let up = Paced::start().await;
    let leasing = config_text(
        &db.url,
        &up,
        2,
        "",
        "[budgets]\nlease_fraction = 0.5\nlease_min_remaining_fraction = 0.1\nlease_ttl_ms = 3000\n",
    );
    let exact = config_text(&db.url, &up, 2, "", "[budgets]\nlease_fraction = 0\n");
    let (c1, c2) = (write_config(&leasing), write_config(&exact));
    let (mut r1, mut r2) = tokio::join!(spawn(&c1), spawn(&c2));
    let client = http_client();
    wait_ready(&client, &r1).await;
    wait_ready(&client, &r2).await;
    let store = store_of(&db.url).await;
    let alice = store.find_user("alice").await.unwrap().expect("alice").id;
    // A request needing 70% of the limit: it fits only if the dead replica's lease (half of
    // the room) is back.
    let big = max_cost(200);
    let limit = big * 10 / 7;
    put_budget(
        &client,
        &r1,
        json!({"scope": "user", "id": alice, "limit_usd": limit as f64 / 1e6, "period": "total"}),
    )
    .await;
    let (status, v) = send_fixed(&client, &r1, &fixed_body("p/quick", 1, 1), "lease-warm").await;
    assert_eq!(status, 200, "{v}");
    let lease = held(&db.url).await;
    assert_eq!(lease.leases, 1, "{lease:?}");
    assert!(
        lease.amount > limit - big,
        "the lease holds what the big request needs: {lease:?}"
    );
    r1.signal("KILL");
    wait_exit(&mut r1, SLOW).await;
    let killed_at = Instant::now();
    let (status, v) = send_fixed(&client, &r2, &fixed_body("p/quick", 2, 200), "lease-early").await;
    if killed_at.elapsed() < Duration::from_secs(2) {
        assert_eq!(
            (status, v["error"]["code"].as_str()),
            (429, Some("budget_exceeded")),
            "{v}"
        );
    }
    let reclaimed = eventually(
        SLOW,
        "the big request to fit after the lease TTL",
        || async {
            let (status, _) =
                send_fixed(&client, &r2, &fixed_body("p/quick", 3, 200), "lease-late").await;
            (status == 200).then(|| killed_at.elapsed())
        },
    )
    .await;
    eprintln!("lease figures: the killed replica's lease came back {reclaimed:?} after SIGKILL (lease_ttl_ms = 3000)");
    assert!(
        reclaimed >= Duration::from_millis(1500),
        "not before the TTL: {reclaimed:?}"
    );
    assert_eq!(held(&db.url).await.leases, 0);
    r2.signal("TERM");
    assert!(wait_exit(&mut r2, SLOW).await.success());
}

// ---------------------------------------------------------------------------------------------
// 5. rolling restart

/// Steady traffic across two replicas while one is restarted (SIGTERM, wait for its exit,
/// start it again): every request either gets its answer or a connection refusal before
/// anything reached the gateway (then it is sent to the other replica), and every answered
/// request has exactly one ledger row, no more rows than answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_restart_loses_no_accepted_request_and_no_row() {
    let Some(db) = TestDb::postgres().await else {
        return;
    };
    let up = Paced::start().await;
    let text = config_text(&db.url, &up, 4, "shutdown_delay_ms = 500", "");
    let config = write_config(&text);
    let (a, b) = tokio::join!(spawn(&config), spawn(&config));
    let check = http_client();
    wait_ready(&check, &a).await;
    wait_ready(&check, &b).await;
    let urls = Arc::new(std::sync::Mutex::new([
        a.url("/v1/chat/completions"),
        b.url("/v1/chat/completions"),
    ]));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    // A new connection per request, as behind a load balancer that spreads connections: a
    // refused connection is then the only way a request can miss a stopping replica.
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .expect("client");
    let mut workers = Vec::new();
    for w in 0..4usize {
        let (client, urls, stop) = (client.clone(), urls.clone(), stop.clone());
        let model = if w < 2 { "p/quick" } else { "p/slow" };
        workers.push(tokio::spawn(async move {
            let mut out = Vec::new();
            let mut i = 0usize;
            while !stop.load(Ordering::SeqCst) {
                let id = format!("roll-{w}-{i}");
                let mut refusals = 0;
                let seen = loop {
                    let url = urls.lock().unwrap()[(i + refusals) % 2].clone();
                    let seen =
                        http_call(client.clone(), url, model.into(), false, id.clone()).await;
                    if seen != Seen::NotConnected || refusals >= 20 {
                        break seen;
                    }
                    refusals += 1;
                };
                out.push((id, seen));
                i += 1;
            }
            out
        }));
    }
    let base = up.calls();
    eventually(SLOW, "traffic before the restart", || async {
        (up.calls() >= base + 40).then_some(())
    })
    .await;
    let mut a = a;
    a.signal("TERM");
    let status = wait_exit(&mut a, SLOW).await;
    assert!(status.success(), "{}", a.log_text());
    let a2 = spawn(&config).await;
    wait_ready(&check, &a2).await;
    urls.lock().unwrap()[0] = a2.url("/v1/chat/completions");
    let base = up.calls();
    eventually(SLOW, "traffic after the restart", || async {
        (up.calls() >= base + 40).then_some(())
    })
    .await;
    stop.store(true, Ordering::SeqCst);
    let mut seen = Vec::new();
    for w in workers {
        seen.extend(w.await.expect("worker"));
    }
    let mut replicas = [a2, b];
    for p in &mut replicas {
        p.signal("TERM");
    }
    for p in &mut replicas {
        assert!(wait_exit(p, SLOW).await.success(), "{}", p.log_text());
    }
    let bad: Vec<_> = seen.iter().filter(|(_, s)| *s != Seen::Answered).collect();
    assert!(bad.is_empty(), "requests not answered: {bad:?}");
    let ids: Vec<String> = seen.iter().map(|(id, _)| id.clone()).collect();
    let rows = ledger_reasons(&store_of(&db.url).await, &ids).await;
    let wrong: Vec<_> = rows.iter().filter(|(_, r)| r.len() != 1).collect();
    eprintln!(
        "rolling restart figures: {} requests answered, {} with other than one ledger row",
        ids.len(),
        wrong.len()
    );
    assert!(wrong.is_empty(), "{wrong:?}");
    assert_eq!(ledger_count(&db.url).await.0 as usize, ids.len());
}

// ---------------------------------------------------------------------------------------------
// 3. the database goes away while serving

/// PostgreSQL unreachable for 4 s (a proxy between tollgate and the database drops every
/// connection and refuses new ones) under steady traffic from a budgeted and an unbudgeted
/// user: callers get 503 with a failure reason (never a 500, never a hang past the timeouts),
/// `/readyz` goes 503 and back, tollgate recovers without a restart, the availability counter
/// counts every 503 as a failure, and once the database is back every request has exactly one
/// ledger row and the budget's settlements are all written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_outage_under_load_fails_cleanly_and_loses_nothing() {
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
    let proxy = crate::faults::CuttableProxy::start(host_port.clone()).await;
    let via_proxy = db.url.replacen(&host_port, &proxy.addr.to_string(), 1);
    let up = Paced::start().await;
    let text = config_text(
        &via_proxy,
        &up,
        4,
        "",
        &format!("[budgets]\nlease_fraction = 0\n\n{BOB}"),
    );
    let config = write_config(&text);
    let mut p = spawn(&config).await;
    let client = http_client();
    wait_ready(&client, &p).await;
    let store = store_of(&db.url).await;
    let alice = store.find_user("alice").await.unwrap().expect("alice").id;
    put_budget(
        &client,
        &p,
        json!({"scope": "user", "id": alice, "limit_usd": 1000, "period": "total"}),
    )
    .await;

    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut workers = Vec::new();
    for w in 0..4usize {
        let (client, url, stop) = (client.clone(), p.url("/v1/chat/completions"), stop.clone());
        let key = if w % 2 == 0 { ALICE_KEY } else { BOB_KEY };
        workers.push(tokio::spawn(async move {
            let mut out = Vec::new();
            let mut i = 0;
            while !stop.load(Ordering::SeqCst) {
                let id = format!("outage-{w}-{i}");
                i += 1;
                let start = Instant::now();
                let resp = client
                    .post(&url)
                    .bearer_auth(key)
                    .header("x-request-id", &id)
                    .json(&json!({"model": "p/quick", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}))
                    .timeout(Duration::from_secs(30))
                    .send()
                    .await;
                let seen = match resp {
                    Ok(r) => {
                        let status = r.status().as_u16();
                        let v: Value = r.json().await.unwrap_or(Value::Null);
                        (status, v["error"]["code"].as_str().unwrap_or("").to_string())
                    }
                    Err(e) => (0, format!("{e:?}")),
                };
                out.push((id, seen, start.elapsed()));
                // Steady, not flooding: the outage must not fill the machine.
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            out
        }));
    }
    let base = up.calls();
    eventually(SLOW, "traffic before the outage", || async {
        (up.calls() >= base + 40).then_some(())
    })
    .await;
    proxy.cut();
    eventually(SLOW, "/readyz to answer 503 during the outage", || async {
        (readyz(&client, &p).await == Some(503)).then_some(())
    })
    .await;
    // The outage lasts a few seconds of steady traffic.
    tokio::time::sleep(Duration::from_secs(4)).await;
    proxy.restore();
    let restored_at = Instant::now();
    let recovered = eventually(
        SLOW,
        "a budgeted request to succeed after the outage",
        || async {
            let (status, _) = send_fixed(
                &client,
                &p,
                &fixed_body("p/quick", 1, 5),
                &format!("outage-probe-{}", now_ms()),
            )
            .await;
            (status == 200).then(|| restored_at.elapsed())
        },
    )
    .await;
    eventually(SLOW, "/readyz to answer 200 again", || async {
        (readyz(&client, &p).await == Some(200)).then_some(())
    })
    .await;
    let base = up.calls();
    eventually(SLOW, "traffic after the outage", || async {
        (up.calls() >= base + 20).then_some(())
    })
    .await;
    stop.store(true, Ordering::SeqCst);
    let mut seen = Vec::new();
    for w in workers {
        seen.extend(w.await.expect("worker"));
    }
    let metrics = client
        .get(p.url("/metrics"))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .unwrap();
    p.signal("TERM");
    assert!(wait_exit(&mut p, SLOW).await.success(), "{}", p.log_text());

    let refused: Vec<_> = seen.iter().filter(|(_, (s, _), _)| *s != 200).collect();
    let bad: Vec<_> = refused
        .iter()
        .filter(|(_, (s, code), _)| {
            *s != 503
                || ![
                    "policy_unavailable",
                    "provisioning_failure",
                    "auth_system_failure",
                ]
                .contains(&code.as_str())
        })
        .collect();
    assert!(bad.is_empty(), "not a clean 503: {bad:?}");
    let slowest = seen.iter().map(|(_, _, d)| *d).max().unwrap_or_default();
    let mut reasons: HashMap<&str, usize> = HashMap::new();
    for (_, (_, code), _) in &refused {
        *reasons.entry(code.as_str()).or_default() += 1;
    }
    eprintln!(
        "outage figures: {} requests, {} refused during the outage {reasons:?}, slowest answer \
         {slowest:?}, recovered {recovered:?} after the database returned",
        seen.len(),
        refused.len()
    );
    assert!(!refused.is_empty(), "the outage was seen by callers");
    assert!(
        slowest < Duration::from_secs(15),
        "a request hung: {slowest:?}"
    );
    let failures = metric_value(&metrics, AVAILABILITY, &[("outcome", "failure")]);
    assert_eq!(
        failures as usize,
        refused.len(),
        "every refusal counted as a failure"
    );

    let ids: Vec<String> = seen.iter().map(|(id, _, _)| id.clone()).collect();
    let rows = ledger_reasons(&store, &ids).await;
    let wrong: Vec<_> = rows.iter().filter(|(_, r)| r.len() != 1).collect();
    assert!(
        wrong.is_empty(),
        "requests without exactly one row: {wrong:?}"
    );
    let totals = budget_totals(&db.url).await;
    assert_eq!(totals.reserved, 0, "every settlement written: {totals:?}");
    assert_eq!(held(&db.url).await.rows, 0);
}

/// SQLite busy: another connection holds an exclusive lock on the database file for 3 s under
/// steady budgeted traffic. Requests wait for the lock (`busy_timeout`) or are refused with a
/// 503 failure reason, never a 500 and never past the timeouts; once the lock is gone every
/// request has exactly one ledger row and nothing stays reserved.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_locked_by_another_process_fails_cleanly_and_loses_nothing() {
    let db = TestDb::sqlite();
    let file = db.dir().unwrap().join("tollgate-test.db");
    let up = Paced::start().await;
    let text = config_text(
        &db.url,
        &up,
        4,
        "",
        &format!("[budgets]\nlease_fraction = 0\n\n{BOB}"),
    );
    let config = write_config(&text);
    let mut p = spawn(&config).await;
    let client = http_client();
    wait_ready(&client, &p).await;
    let store = store_of(&db.url).await;
    let alice = store.find_user("alice").await.unwrap().expect("alice").id;
    put_budget(
        &client,
        &p,
        json!({"scope": "user", "id": alice, "limit_usd": 1000, "period": "total"}),
    )
    .await;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut workers = Vec::new();
    for w in 0..4usize {
        let (client, url, stop) = (client.clone(), p.url("/v1/chat/completions"), stop.clone());
        let key = if w % 2 == 0 { ALICE_KEY } else { BOB_KEY };
        workers.push(tokio::spawn(async move {
            let mut out = Vec::new();
            let mut i = 0;
            while !stop.load(Ordering::SeqCst) {
                let id = format!("locked-{w}-{i}");
                i += 1;
                let start = Instant::now();
                let resp = client
                    .post(&url)
                    .bearer_auth(key)
                    .header("x-request-id", &id)
                    .json(&json!({"model": "p/quick", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}))
                    .timeout(Duration::from_secs(30))
                    .send()
                    .await;
                let seen = match resp {
                    Ok(r) => {
                        let status = r.status().as_u16();
                        let v: Value = r.json().await.unwrap_or(Value::Null);
                        (status, v["error"]["code"].as_str().unwrap_or("").to_string())
                    }
                    Err(e) => (0, format!("{e:?}")),
                };
                out.push((id, seen, start.elapsed()));
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            out
        }));
    }
    let base = up.calls();
    eventually(SLOW, "traffic before the lock", || async {
        (up.calls() >= base + 40).then_some(())
    })
    .await;
    let (locked_tx, locked_rx) = tokio::sync::oneshot::channel();
    let lock = std::thread::spawn(move || {
        use diesel::connection::SimpleConnection;
        use diesel::Connection;
        let mut conn = diesel::SqliteConnection::establish(file.to_str().unwrap()).expect("open");
        conn.batch_execute("PRAGMA busy_timeout = 10000; BEGIN EXCLUSIVE;")
            .expect("exclusive lock");
        let _ = locked_tx.send(());
        // The outage: the lock is held this long.
        std::thread::sleep(Duration::from_secs(3));
        conn.batch_execute("COMMIT;").expect("unlock");
    });
    locked_rx.await.expect("locked");
    blocking(move || lock.join().expect("lock thread")).await;
    let base = up.calls();
    eventually(SLOW, "traffic after the lock", || async {
        (up.calls() >= base + 40).then_some(())
    })
    .await;
    stop.store(true, Ordering::SeqCst);
    let mut seen = Vec::new();
    for w in workers {
        seen.extend(w.await.expect("worker"));
    }
    p.signal("TERM");
    assert!(wait_exit(&mut p, SLOW).await.success(), "{}", p.log_text());
    let refused: Vec<_> = seen.iter().filter(|(_, (s, _), _)| *s != 200).collect();
    let bad: Vec<_> = refused
        .iter()
        .filter(|(_, (s, code), _)| {
            *s != 503
                || ![
                    "policy_unavailable",
                    "provisioning_failure",
                    "auth_system_failure",
                ]
                .contains(&code.as_str())
        })
        .collect();
    let slowest = seen.iter().map(|(_, _, d)| *d).max().unwrap_or_default();
    eprintln!(
        "SQLite lock figures: {} requests, {} refused, slowest answer {slowest:?}",
        seen.len(),
        refused.len()
    );
    assert!(bad.is_empty(), "not a clean 503: {bad:?}");
    assert!(
        slowest < Duration::from_secs(15),
        "a request hung: {slowest:?}"
    );
    assert!(
        slowest > Duration::from_secs(1),
        "the lock was felt: {slowest:?}"
    );
    let ids: Vec<String> = seen.iter().map(|(id, _, _)| id.clone()).collect();
    let rows = ledger_reasons(&store, &ids).await;
    let wrong: Vec<_> = rows.iter().filter(|(_, r)| r.len() != 1).collect();
    assert!(
        wrong.is_empty(),
        "requests without exactly one row: {wrong:?}"
    );
    let budget = store
        .budget_get("user", alice)
        .await
        .expect("budget row")
        .expect("alice's budget");
    assert_eq!(
        budget.reserved_micros, 0,
        "every settlement written: {budget:?}"
    );
    assert_eq!(
        store
            .budget_reservation_count(budget.id)
            .await
            .expect("count"),
        0
    );
}

/// The signup cap on two processes started at the same moment on a fresh database:
/// `signup_cap_per_day = 20`, 80 concurrent first requests of 80 new JWT identities across both
/// replicas: exactly 20 answered, 60 `signup_cap_exceeded`, exactly 20 users created.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_share_one_signup_cap() {
    use crate::common::auth_servers::{good_jwt, jwt_table, JwksServer, Mode};
    let jwks = JwksServer::start(Mode::Healthy).await;
    let Some(db) = TestDb::postgres().await else {
        return;
    };
    let up = Paced::start().await;
    let extra = format!(
        "{}[service_types.capped]\nmodels = [\"*\"]\nsignup_cap_per_day = 20\n",
        jwt_table(&jwks.url(), "")
    );
    let config = write_config(&config_text(&db.url, &up, 2, "", &extra));
    let (a, b) = tokio::join!(spawn(&config), spawn(&config));
    let mut replicas = [a, b];
    let client = http_client();
    for p in &replicas {
        wait_ready(&client, p).await;
    }
    let mut tasks = Vec::new();
    for i in 0..80 {
        let client = client.clone();
        let url = replicas[i % 2].url("/v1/chat/completions");
        tasks.push(tokio::spawn(async move {
            let resp = client
                .post(url)
                .bearer_auth(good_jwt(&format!("replica-cap-{i}")))
                .header("x-tollgate-service-type", "capped")
                .header("x-request-id", format!("replica-cap-{i}"))
                .json(&json!({"model": "p/quick", "messages": [{"role": "user", "content": "hi"}]}))
                .send()
                .await
                .expect("chat request");
            let status = resp.status().as_u16();
            let v: Value = resp.json().await.unwrap_or(Value::Null);
            (
                status,
                v["error"]["code"].as_str().unwrap_or("").to_string(),
            )
        }));
    }
    let mut seen: HashMap<(u16, String), usize> = HashMap::new();
    for t in tasks {
        *seen.entry(t.await.expect("task")).or_default() += 1;
    }
    assert_eq!(seen.get(&(200, String::new())), Some(&20), "{seen:?}");
    assert_eq!(
        seen.get(&(403, "signup_cap_exceeded".into())),
        Some(&60),
        "{seen:?}"
    );
    use diesel_async::RunQueryDsl;
    let users: Count =
        diesel::sql_query("SELECT COUNT(*)::BIGINT AS n FROM users WHERE service_type = 'capped'")
            .get_result(&mut pg(&db.url).await)
            .await
            .expect("count users");
    assert_eq!(users.n, 20);
    for p in &mut replicas {
        p.signal("TERM");
    }
    for p in &mut replicas {
        assert!(wait_exit(p, SLOW).await.success(), "{}", p.log_text());
    }
    assert_eq!(ledger_count(&db.url).await.0, 80, "one row per request");
}
