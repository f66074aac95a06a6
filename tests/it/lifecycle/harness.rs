//! What the lifecycle tests share: a paced upstream, the configuration, processes, and the
//! database counted directly.

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

pub(super) const ADMIN: &str = "tg-admin-lifecycle-test-0123456789";
/// How long a process may take to start, drain or exit on a loaded 2-core machine.
pub(super) const SLOW: Duration = Duration::from_secs(30);

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
pub(super) struct Paced {
    pub(super) addr: SocketAddr,
    pub(super) calls: Arc<AtomicUsize>,
}

impl Paced {
    pub(super) async fn start() -> Paced {
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

    pub(super) fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    pub(super) fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

pub(super) fn completion(model: &str) -> Response {
    let v = json!({
        "id": "chatcmpl-p", "object": "chat.completion", "created": 1_700_000_000, "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "paced answer"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}
    });
    ([("content-type", "application/json")], v.to_string()).into_response()
}

pub(super) fn sse_chunk(
    content: Option<&str>,
    finish: Option<&str>,
    usage: Option<(u64, u64)>,
) -> Bytes {
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

pub(super) async fn paced_answer(body: Bytes) -> Response {
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
pub(super) fn config_text(
    db_url: &str,
    up: &Paced,
    grace: u64,
    server: &str,
    extra: &str,
) -> String {
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
pub(super) struct ConfigFile {
    _dir: tempfile::TempDir,
    path: PathBuf,
}

pub(super) fn write_config(text: &str) -> ConfigFile {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("tollgate.toml");
    std::fs::write(&path, text).expect("write config");
    ConfigFile { _dir: dir, path }
}

pub(super) async fn spawn(config: &ConfigFile) -> Process {
    let path = config.path.clone();
    blocking(move || Process::serve(&path, SLOW)).await
}

/// `/readyz` status of a process, `None` when it cannot be reached.
pub(super) async fn readyz(client: &reqwest::Client, p: &Process) -> Option<u16> {
    client
        .get(p.url("/readyz"))
        .timeout(Duration::from_secs(3))
        .send()
        .await
        .ok()
        .map(|r| r.status().as_u16())
}

pub(super) async fn wait_ready(client: &reqwest::Client, p: &Process) {
    eventually(SLOW, "/readyz to answer 200", || async {
        (readyz(client, p).await == Some(200)).then_some(())
    })
    .await;
}

/// Waits for the process to exit; its exit status.
pub(super) async fn wait_exit(p: &mut Process, within: Duration) -> std::process::ExitStatus {
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
pub(super) async fn put_budget(client: &reqwest::Client, p: &Process, body: Value) {
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

pub(super) async fn store_of(url: &str) -> Store {
    Store::connect(url, 2, Clock::system())
        .await
        .unwrap_or_else(|e| panic!("Store::connect({url}): {e}"))
}

/// The reason of every ledger row of each request id.
pub(super) async fn ledger_reasons(store: &Store, ids: &[String]) -> HashMap<String, Vec<String>> {
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
pub(super) struct Held {
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    pub(super) rows: i64,
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    pub(super) leases: i64,
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    pub(super) amount: i64,
}

#[derive(diesel::QueryableByName, Debug)]
pub(super) struct BudgetTotals {
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    pub(super) spent: i64,
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    pub(super) reserved: i64,
}

#[derive(diesel::QueryableByName, Debug)]
pub(super) struct Count {
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    pub(super) n: i64,
}

pub(super) async fn pg(url: &str) -> diesel_async::AsyncPgConnection {
    use diesel_async::AsyncConnection;
    diesel_async::AsyncPgConnection::establish(url)
        .await
        .unwrap_or_else(|e| panic!("connect {url}: {e}"))
}

/// Open reservation rows (leases among them) and what they hold, on PostgreSQL.
pub(super) async fn held(url: &str) -> Held {
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
pub(super) async fn budget_totals(url: &str) -> BudgetTotals {
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
pub(super) async fn ledger_count(url: &str) -> (i64, i64) {
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
pub(super) enum Seen {
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

pub(super) async fn http_call(
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

pub(super) async fn grpc_call(addr: SocketAddr, model: String, stream: bool, id: String) -> Seen {
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

pub(super) const BOB_KEY: &str = "tg-test-bob-lifecycle";

/// Bob: a second static key, with no budget (his rows go through the ledger's flush window).
pub(super) const BOB: &str =
    "[[auth.static_keys]]\nuser = \"bob\"\nkey = \"tg-test-bob-lifecycle\"\n";

/// A chat body whose prompt estimate does not depend on `n` (below 1000).
pub(super) fn fixed_body(model: &str, n: usize, max_tokens: u64) -> Value {
    json!({
        "model": model,
        "messages": [{"role": "user", "content": format!("replica request {n:03}")}],
        "max_tokens": max_tokens,
    })
}

/// The most tollgate reserves for [`fixed_body`] on the priced `p/*` models.
pub(super) fn max_cost(max_tokens: u64) -> i64 {
    let body = fixed_body("p/slow", 0, max_tokens);
    let est = tollgate::api::openai_chat::parse_request(body.to_string().as_bytes())
        .expect("a valid chat body")
        .estimate_prompt_tokens() as i64;
    est * 1000 + max_tokens as i64 * 2000
}

pub(super) async fn send_fixed(
    client: &reqwest::Client,
    p: &Process,
    body: &Value,
    id: &str,
) -> (u16, Value) {
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
