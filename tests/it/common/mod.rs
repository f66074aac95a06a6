//! Shared helpers for the integration tests: a real tollgate server on random loopback ports,
//! a real upstream ([`upstream::Upstream`]), a fresh database per test (SQLite file in a temp
//! dir, or a new PostgreSQL database), polling with a deadline, an SSE reader and a small
//! Prometheus text parser.

pub mod anthropic_upstream;
pub mod auth_servers;
pub mod budget_util;
pub mod process;
pub mod responses_upstream;
pub mod upstream;

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use serde_json::{json, Value};
use tollgate::clock::Clock;
use tollgate::config::Config;
use tollgate::proto::gateway_client::GatewayClient;
use tollgate::proto::{ChatMessage, CompleteRequest};
use tollgate::server::RunningServer;
use tollgate::store::{LedgerRow, Store};
use tonic::transport::Channel;

use upstream::Upstream;

pub const ALICE_KEY: &str = "tg-test-alice";
pub const AVAILABILITY: &str = "tollgate_chat_availability_total";
/// How long anything that should happen "soon" may take before a test fails.
pub const DEADLINE: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------------------
// polling

/// Polls `f` until it returns `Some`, at most for `deadline`; panics naming `what` otherwise.
pub async fn eventually<T, F, Fut>(deadline: Duration, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = f().await {
            return v;
        }
        if start.elapsed() > deadline {
            panic!("timed out after {deadline:?} waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

pub fn new_request_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// Runs a blocking closure (a child process, say) off the async workers.
pub async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.expect("blocking task")
}

// ---------------------------------------------------------------------------------------------
// databases

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// A database of its own for one test. SQLite: a file in a temp dir. PostgreSQL: a fresh
/// database `tg_<uuid>` on the server named by `TEST_DATABASE_URL`, dropped when this is dropped.
pub struct TestDb {
    pub url: String,
    pub backend: Backend,
    dir: Option<tempfile::TempDir>,
    pg_admin: Option<(String, String)>,
}

/// `TEST_DATABASE_URL`, or `None` (after a notice) when it is unset outside CI.
/// Panics when it is unset and `CI` is set: CI must run the PostgreSQL tests.
pub fn postgres_admin_url() -> Option<String> {
    match std::env::var("TEST_DATABASE_URL") {
        Ok(url) if !url.trim().is_empty() => Some(url),
        _ => {
            if std::env::var("CI").map(|v| !v.is_empty()).unwrap_or(false) {
                panic!(
                    "TEST_DATABASE_URL is not set but CI is: the PostgreSQL tests must run in CI \
                     (e.g. TEST_DATABASE_URL=postgres://postgres@127.0.0.1:5432/postgres)"
                );
            }
            eprintln!(
                "SKIPPED: TEST_DATABASE_URL is not set; PostgreSQL backend test not run \
                 (set it, e.g. postgres://postgres@127.0.0.1:5432/postgres)"
            );
            None
        }
    }
}

/// Replaces the database name (the path) of a postgres URL, keeping any query string.
pub fn with_database(url: &str, db: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let scheme_end = base.find("://").map(|i| i + 3).unwrap_or(0);
    let prefix = match base[scheme_end..].find('/') {
        Some(i) => &base[..scheme_end + i],
        None => base,
    };
    match query {
        Some(q) => format!("{prefix}/{db}?{q}"),
        None => format!("{prefix}/{db}"),
    }
}

async fn pg_execute(admin_url: &str, sql: &str) -> Result<(), String> {
    use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
    let mut conn = AsyncPgConnection::establish(admin_url)
        .await
        .map_err(|e| format!("connect {admin_url}: {e}"))?;
    diesel::sql_query(sql)
        .execute(&mut conn)
        .await
        .map_err(|e| format!("{sql}: {e}"))?;
    Ok(())
}

impl TestDb {
    pub fn sqlite() -> TestDb {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("tollgate-test.db");
        TestDb {
            url: format!("sqlite://{}", path.display()),
            backend: Backend::Sqlite,
            dir: Some(dir),
            pg_admin: None,
        }
    }

    /// A fresh PostgreSQL database, or `None` when the PostgreSQL tests are skipped.
    pub async fn postgres() -> Option<TestDb> {
        let admin = postgres_admin_url()?;
        let name = format!("tg_{}", uuid::Uuid::new_v4().simple());
        let mut last = String::new();
        for _ in 0..5 {
            match pg_execute(&admin, &format!("CREATE DATABASE {name}")).await {
                Ok(()) => {
                    return Some(TestDb {
                        url: with_database(&admin, &name),
                        backend: Backend::Postgres,
                        dir: None,
                        pg_admin: Some((admin, name)),
                    })
                }
                // Concurrent CREATE DATABASE can collide on the template; try again.
                Err(e) => last = e,
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("could not create a PostgreSQL test database: {last}");
    }

    pub async fn new(backend: Backend) -> Option<TestDb> {
        match backend {
            Backend::Sqlite => Some(TestDb::sqlite()),
            Backend::Postgres => TestDb::postgres().await,
        }
    }

    /// PostgreSQL only: drops the database now, cutting every connection to it (a database
    /// outage as the server sees it).
    pub async fn drop_postgres_database_now(&self) {
        let (admin, name) = self.pg_admin.as_ref().expect("a PostgreSQL test database");
        pg_execute(
            admin,
            &format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"),
        )
        .await
        .expect("drop the test database");
    }

    /// The temp dir holding the SQLite file (for config files written next to it).
    pub fn dir(&self) -> Option<&std::path::Path> {
        self.dir.as_ref().map(|d| d.path())
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if let Some((admin, name)) = self.pg_admin.take() {
            // Drop the per-test database from a thread of its own (Drop cannot await, and we
            // may be inside a runtime).
            let _ = std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("runtime");
                let sql = format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)");
                if let Err(e) = rt.block_on(pg_execute(&admin, &sql)) {
                    eprintln!("warning: could not drop test database: {e}");
                }
            })
            .join();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// configuration

/// Per-test additions to the standard test configuration.
#[derive(Default, Clone)]
pub struct Opts {
    /// Lines added to `[server]`.
    pub server: String,
    /// Lines added to `[auth]`.
    pub auth: String,
    /// Lines added to `[database]`.
    pub database: String,
    /// Tables appended at the end.
    pub extra: String,
    /// `ledger_flush_ms` (default 10).
    pub ledger_flush_ms: Option<u64>,
    /// Tables appended after `extra`, with `{upstream}` replaced by the OpenAI upstream's base
    /// URL (for providers of a test's own in front of [`upstream::Upstream`]).
    pub extra_upstream: String,
    /// The server's clock (default: the system clock); a test that keeps a clone of a
    /// [`Clock::manual`] moves the server's time with `advance`.
    pub clock: Option<Clock>,
}

/// Aliases of the standard config, so the `model` label has a name: alias -> upstream model.
pub const ALIASES: &[(&str, &str)] = &[
    ("fast", "up/ok"),
    ("chatty", "up/stream"),
    ("broken", "up/fail500"),
    ("slow", "up/stall"),
    ("picky", "up/fail400"),
    ("flaky", "up/reset"),
    ("gate", "up/gated"),
    ("garbled", "up/badjson"),
];

/// Input and output prices of `up/ok` (USD per million tokens); with them a token costs an
/// exact number of micro-dollars: cost_micros = prompt * IN + completion * OUT.
pub const PRICE_IN: i64 = 1000;
pub const PRICE_OUT: i64 = 2000;

pub fn config_toml(db_url: &str, upstream_base: &str, opts: &Opts) -> String {
    let mut aliases = String::new();
    for (name, target) in ALIASES {
        aliases.push_str(&format!(
            "[aliases.{name}]\ndescription = \"test alias for {target}\"\nchain = [\"{target}\"]\n\n"
        ));
    }
    format!(
        r#"[server]
http_addr = "127.0.0.1:0"
grpc_addr = "127.0.0.1:0"
shutdown_grace_secs = 2
{server}

[log]
level = "warn"

[database]
url = "{db_url}"
ledger_flush_ms = {flush}
{database}

[auth]
{auth}

[[auth.static_keys]]
user = "alice"
key = "{ALICE_KEY}"

[service_types.default]
models = ["*"]

[service_types.batch]
models = ["*"]
purposes = ["eval", "nightly"]

[providers.up]
kind = "openai"
base_url = "{upstream_base}"
keys = ["{key}"]
connect_timeout_ms = 1000
first_byte_timeout_ms = 1500
idle_timeout_ms = 1500
total_timeout_ms = 5000

[providers.up2]
kind = "openai"
base_url = "{upstream_base}"
keys = ["{key}"]
connect_timeout_ms = 1000
first_byte_timeout_ms = 1500
idle_timeout_ms = 1500
total_timeout_ms = 5000

# Providers of their own for chains whose first entry must really be tried (provider health
# is per provider: failures of `up` in one part of a test must not decide another part).
[providers.edge]
kind = "openai"
base_url = "{upstream_base}"
keys = ["{key}"]

[providers.sick]
kind = "openai"
base_url = "{upstream_base}"
keys = ["{key}"]

# Key pools: a 429 key, a 401 key and a good one; a pool of one 429 key; a pool of one 401 key.
[providers.pool]
kind = "openai"
base_url = "{upstream_base}"
keys = ["sk-rate-limited-1", "sk-revoked-1", "{key}"]

[providers.limited]
kind = "openai"
base_url = "{upstream_base}"
keys = ["sk-rate-limited-2"]

[providers.revoked]
kind = "openai"
base_url = "{upstream_base}"
keys = ["sk-revoked-2"]

[providers.mock]
kind = "mock"
tokens = 8
models = ["echo"]

{aliases}[aliases.resilient]
description = "falls back from a failing upstream"
chain = ["up/fail500", "up2/ok"]

[aliases.strict]
description = "a caller's 4xx must not fall back"
chain = ["edge/fail400", "up2/ok"]

[aliases.midstream]
description = "a stream that already sent a chunk must not fall back"
chain = ["edge/reset", "up2/ok"]

[aliases.sickly]
description = "its first provider fails until it is marked unhealthy"
chain = ["sick/fail500", "up2/ok"]

[aliases.pooled]
description = "falls back when a key pool is exhausted"
chain = ["limited/ok", "up2/ok"]

[pricing."up/ok"]
input_usd_per_mtok = {PRICE_IN}.0
output_usd_per_mtok = {PRICE_OUT}.0

{extra}
{extra_upstream}
"#,
        server = opts.server,
        database = opts.database,
        auth = opts.auth,
        extra = opts.extra,
        extra_upstream = opts.extra_upstream.replace("{upstream}", upstream_base),
        flush = opts.ledger_flush_ms.unwrap_or(10),
        key = upstream::UPSTREAM_KEY,
    )
}

// ---------------------------------------------------------------------------------------------
// the server under test

pub struct TestServer {
    pub upstream: Upstream,
    pub db: TestDb,
    pub http: SocketAddr,
    pub grpc_addr: SocketAddr,
    pub client: reqwest::Client,
    pub config_text: String,
    /// The clock the server reads deadlines from (health backoffs, key cooldowns, budgets).
    pub clock: Clock,
    server: Option<RunningServer>,
    store: tokio::sync::OnceCell<Store>,
}

pub fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("reqwest client")
}

impl TestServer {
    /// Starts upstream and server on `backend`; `None` when that backend is skipped.
    pub async fn start(backend: Backend, opts: Opts) -> Option<TestServer> {
        let db = TestDb::new(backend).await?;
        Some(TestServer::start_on(db, opts).await)
    }

    pub async fn sqlite(opts: Opts) -> TestServer {
        TestServer::start_on(TestDb::sqlite(), opts).await
    }

    pub async fn start_on(db: TestDb, opts: Opts) -> TestServer {
        let upstream = Upstream::start().await;
        let text = config_toml(&db.url, &upstream.base_url(), &opts);
        let config = Config::from_toml_str(&text)
            .unwrap_or_else(|e| panic!("test config rejected: {e}\n---\n{text}"));
        let clock = opts.clock.clone().unwrap_or_else(Clock::system);
        let server = RunningServer::start_with_clock(config, clock.clone())
            .await
            .unwrap_or_else(|e| panic!("server did not start: {e}"));
        let http = server.http_addr();
        let grpc_addr = server.grpc_addr();
        assert_ne!(http.port(), 0, "http_addr() must be the bound address");
        assert_ne!(grpc_addr.port(), 0, "grpc_addr() must be the bound address");
        TestServer {
            upstream,
            db,
            http,
            grpc_addr,
            client: http_client(),
            config_text: text,
            clock,
            server: Some(server),
            store: tokio::sync::OnceCell::new(),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.http, path)
    }

    /// `POST /v1/chat/completions` as alice, with our own request id when given.
    pub fn chat_request(&self, body: &Value, request_id: Option<&str>) -> reqwest::RequestBuilder {
        let mut rb = self
            .client
            .post(self.url("/v1/chat/completions"))
            .bearer_auth(ALICE_KEY)
            .json(body);
        if let Some(id) = request_id {
            rb = rb.header("x-request-id", id);
        }
        rb
    }

    pub async fn chat(&self, body: &Value, request_id: Option<&str>) -> reqwest::Response {
        self.chat_request(body, request_id)
            .send()
            .await
            .expect("chat request")
    }

    pub async fn metrics(&self) -> String {
        let resp = self
            .client
            .get(self.url("/metrics"))
            .send()
            .await
            .expect("GET /metrics");
        assert_eq!(resp.status(), 200, "GET /metrics");
        resp.text().await.expect("metrics body")
    }

    pub async fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        metric_value(&self.metrics().await, name, labels)
    }

    /// Waits until `name{labels}` has grown by exactly `delta` since `before` (fails at once if it
    /// grew by more).
    pub async fn expect_delta(
        &self,
        before: &str,
        name: &str,
        labels: &[(&str, &str)],
        delta: f64,
    ) {
        let start = metric_value(before, name, labels);
        let what = format!("{name}{labels:?} to grow by {delta} from {start}");
        eventually(DEADLINE, &what, || async {
            let now = self.metric(name, labels).await;
            assert!(
                now - start <= delta + 1e-9,
                "{name}{labels:?} grew by {} (expected {delta})\n{}",
                now - start,
                series_dump(&self.metrics().await, name)
            );
            ((now - start - delta).abs() < 1e-9).then_some(())
        })
        .await;
    }

    /// The same check, but immediately: `name{labels}` grew by exactly `delta` since `before`.
    pub async fn assert_delta_now(
        &self,
        before: &str,
        name: &str,
        labels: &[(&str, &str)],
        delta: f64,
    ) {
        let now = self.metrics().await;
        let d = metric_value(&now, name, labels) - metric_value(before, name, labels);
        assert!(
            (d - delta).abs() < 1e-9,
            "{name}{labels:?} grew by {d}, expected exactly {delta}\n{}",
            series_dump(&now, name)
        );
    }

    /// The running server's metrics registry, still readable after [`TestServer::shutdown`]
    /// (what is counted only during the shutdown: streams cut at the grace period's end).
    pub fn metrics_registry(&self) -> std::sync::Arc<tollgate::metrics::Metrics> {
        self.server
            .as_ref()
            .expect("the server is running")
            .gateway()
            .metrics()
            .clone()
    }

    pub async fn grpc(&self) -> GatewayClient<Channel> {
        GatewayClient::connect(format!("http://{}", self.grpc_addr))
            .await
            .expect("gRPC connect")
    }

    pub async fn store(&self) -> &Store {
        self.store
            .get_or_init(|| async {
                Store::connect(&self.db.url, 2, tollgate::clock::Clock::system())
                    .await
                    .unwrap_or_else(|e| panic!("Store::connect({}): {e}", self.db.url))
            })
            .await
    }

    pub async fn ledger_rows(&self, request_id: &str) -> Vec<LedgerRow> {
        self.store()
            .await
            .ledger_by_request_id(request_id)
            .await
            .unwrap_or_else(|e| panic!("ledger_by_request_id: {e}"))
    }

    /// Waits for the ledger row of `request_id` (written asynchronously) and checks that it is
    /// the only one.
    pub async fn ledger_row(&self, request_id: &str) -> LedgerRow {
        let rows = eventually(
            DEADLINE,
            &format!("ledger row for request {request_id}"),
            || async {
                let rows = self.ledger_rows(request_id).await;
                (!rows.is_empty()).then_some(rows)
            },
        )
        .await;
        assert_eq!(
            rows.len(),
            1,
            "exactly one ledger row per request: {rows:#?}"
        );
        let row = rows.into_iter().next().unwrap();
        assert_eq!(row.request_id, request_id);
        assert!(
            row.started_at_ms <= row.finished_at_ms,
            "started_at_ms after finished_at_ms: {row:?}"
        );
        let now = now_ms();
        assert!(
            row.started_at_ms > now - 120_000 && row.finished_at_ms <= now + 1_000,
            "ledger timestamps are not epoch milliseconds of this test: {row:?}"
        );
        row
    }

    /// Graceful shutdown (flushes the ledger). The database and upstream stay usable.
    pub async fn shutdown(&mut self) {
        if let Some(server) = self.server.take() {
            tokio::time::timeout(Duration::from_secs(15), server.shutdown())
                .await
                .expect("graceful shutdown took longer than 15 s");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// request builders

pub fn chat_body(model: &str, marker: &str) -> Value {
    json!({
        "model": model,
        "messages": [
            {"role": "system", "content": "You are a test."},
            {"role": "user", "content": format!("hello {marker}")}
        ]
    })
}

pub fn complete_request(model: &str, marker: &str) -> CompleteRequest {
    CompleteRequest {
        model: model.to_owned(),
        messages: vec![
            ChatMessage {
                role: "system".into(),
                content: "You are a test.".into(),
                ..Default::default()
            },
            ChatMessage {
                role: "user".into(),
                content: format!("hello {marker}"),
                ..Default::default()
            },
        ],
        ..Default::default()
    }
}

/// A gRPC request with `authorization: Bearer <key>` (when given) and `x-request-id`.
pub fn grpc_request<T>(msg: T, key: Option<&str>, request_id: Option<&str>) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    if let Some(key) = key {
        req.metadata_mut()
            .insert("authorization", format!("Bearer {key}").parse().unwrap());
    }
    if let Some(id) = request_id {
        req.metadata_mut()
            .insert("x-request-id", id.parse().unwrap());
    }
    req
}

/// The `google.rpc.ErrorInfo` reason of a status ("" when there is none).
pub fn grpc_reason(status: &tonic::Status) -> String {
    use tonic_types::StatusExt;
    status
        .get_error_details()
        .error_info()
        .map(|i| i.reason.clone())
        .unwrap_or_default()
}

/// Asserts an HTTP error response: status, OpenAI error shape, `code` = reason. Returns the body.
pub async fn expect_http_error(resp: reqwest::Response, status: u16, reason: &str) -> Value {
    let got = resp.status().as_u16();
    let text = resp.text().await.unwrap_or_default();
    assert_eq!(got, status, "HTTP status for {reason}; body: {text}");
    let body: Value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("error body is not JSON ({e}): {text}"));
    let err = body
        .get("error")
        .unwrap_or_else(|| panic!("no `error` object: {body}"));
    assert_eq!(err["code"], reason, "error.code: {body}");
    assert!(
        err["message"].as_str().is_some_and(|m| !m.is_empty()),
        "error.message must be a non-empty string: {body}"
    );
    assert!(
        err["type"].is_string(),
        "error.type must be a string: {body}"
    );
    assert!(
        err.get("param").is_some(),
        "error.param must be present: {body}"
    );
    body
}

/// Asserts a gRPC error: code and ErrorInfo reason.
pub fn expect_grpc_error(status: &tonic::Status, code: tonic::Code, reason: &str) {
    assert_eq!(status.code(), code, "gRPC code for {reason}: {status:?}");
    assert_eq!(grpc_reason(status), reason, "ErrorInfo reason: {status:?}");
}

// ---------------------------------------------------------------------------------------------
// availability labels and ledger comparison

/// Labels of one availability series.
pub fn avail<'a>(
    protocol: &'a str,
    outcome: &'a str,
    reason: &'a str,
    model: &'a str,
) -> [(&'static str, &'a str); 6] {
    [
        ("protocol", protocol),
        ("outcome", outcome),
        ("reason", reason),
        ("model", model),
        ("service_type", "default"),
        ("purpose", "none"),
    ]
}

/// A ledger row without what must differ between two requests (request id, protocol, times).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LedgerCore {
    pub user_id: Option<i64>,
    pub key_id: Option<i64>,
    pub requested_model: String,
    pub resolved_model: Option<String>,
    pub service_type: Option<String>,
    pub purpose: Option<String>,
    pub stream: bool,
    pub outcome: String,
    pub reason: String,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    pub cost_micros: i64,
}

pub fn ledger_core(row: &LedgerRow) -> LedgerCore {
    LedgerCore {
        user_id: row.user_id,
        key_id: row.key_id,
        requested_model: row.requested_model.clone(),
        resolved_model: row.resolved_model.clone(),
        service_type: row.service_type.clone(),
        purpose: row.purpose.clone(),
        stream: row.stream,
        outcome: row.outcome.clone(),
        reason: row.reason.clone(),
        prompt_tokens: row.prompt_tokens,
        completion_tokens: row.completion_tokens,
        cost_micros: row.cost_micros,
    }
}

// ---------------------------------------------------------------------------------------------
// Server-Sent Events

type ByteStream = Pin<Box<dyn Stream<Item = reqwest::Result<Bytes>> + Send>>;

/// Reads `data:` payloads of an SSE response one event at a time.
pub struct SseReader {
    stream: ByteStream,
    buf: Vec<u8>,
    eof: bool,
}

#[derive(Debug, PartialEq)]
pub enum SseEvent {
    Data(String),
    /// The body ended cleanly.
    End,
    /// The body was cut (transport error).
    Broken(String),
}

impl SseReader {
    pub fn new(resp: reqwest::Response) -> SseReader {
        SseReader {
            stream: Box::pin(resp.bytes_stream()),
            buf: Vec::new(),
            eof: false,
        }
    }

    fn take_event(&mut self) -> Option<String> {
        loop {
            let (pos, sep) = find_event_end(&self.buf)?;
            let raw: Vec<u8> = self.buf.drain(..pos + sep).collect();
            let text = String::from_utf8_lossy(&raw[..pos]).replace("\r\n", "\n");
            let data: Vec<&str> = text
                .lines()
                .filter_map(|l| l.strip_prefix("data:"))
                .map(|d| d.strip_prefix(' ').unwrap_or(d))
                .collect();
            if !data.is_empty() {
                return Some(data.join("\n"));
            }
            // comment or keep-alive: next
        }
    }

    pub async fn next(&mut self) -> SseEvent {
        loop {
            if let Some(data) = self.take_event() {
                return SseEvent::Data(data);
            }
            if self.eof {
                return SseEvent::End;
            }
            match self.stream.next().await {
                Some(Ok(bytes)) => self.buf.extend_from_slice(&bytes),
                Some(Err(e)) => {
                    self.eof = true;
                    return SseEvent::Broken(e.to_string());
                }
                None => {
                    self.eof = true;
                    if !self.buf.iter().all(|b| b.is_ascii_whitespace()) {
                        // A last event without its blank line.
                        self.buf.extend_from_slice(b"\n\n");
                    }
                }
            }
        }
    }

    /// Every `data:` payload to the end, and how the body ended.
    pub async fn collect(mut self) -> (Vec<String>, SseEvent) {
        let mut out = Vec::new();
        loop {
            match self.next().await {
                SseEvent::Data(d) => out.push(d),
                end => return (out, end),
            }
        }
    }
}

fn find_event_end(buf: &[u8]) -> Option<(usize, usize)> {
    let a = buf.windows(2).position(|w| w == b"\n\n").map(|p| (p, 2));
    let b = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|p| (p, 4));
    match (a, b) {
        (Some(x), Some(y)) => Some(if x.0 <= y.0 { x } else { y }),
        (x, y) => x.or(y),
    }
}

// ---------------------------------------------------------------------------------------------
// Prometheus text format

/// One sample line: metric name, labels, value.
#[derive(Debug, Clone)]
pub struct Sample {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

/// Parses the Prometheus / OpenMetrics text exposition format (comments skipped).
pub fn parse_metrics(text: &str) -> Vec<Sample> {
    text.lines()
        .filter_map(|line| {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                return None;
            }
            Some(parse_sample(line).unwrap_or_else(|| panic!("unparsable metrics line: {line}")))
        })
        .collect()
}

fn parse_sample(line: &str) -> Option<Sample> {
    let name_end = line.find(|c: char| c == '{' || c.is_whitespace())?;
    let name = line[..name_end].to_owned();
    let mut rest = &line[name_end..];
    let mut labels = Vec::new();
    if rest.starts_with('{') {
        let mut chars = rest.char_indices().skip(1).peekable();
        let end;
        loop {
            // skip separators
            while let Some(&(_, c)) = chars.peek() {
                if c == ',' || c.is_whitespace() {
                    chars.next();
                } else {
                    break;
                }
            }
            let (_, c) = *chars.peek()?;
            if c == '}' {
                let (i, _) = chars.next()?;
                end = i;
                break;
            }
            let mut key = String::new();
            for (_, c) in chars.by_ref() {
                if c == '=' {
                    break;
                }
                key.push(c);
            }
            if chars.next()?.1 != '"' {
                return None;
            }
            let mut value = String::new();
            loop {
                let (_, c) = chars.next()?;
                match c {
                    '\\' => match chars.next()?.1 {
                        'n' => value.push('\n'),
                        other => value.push(other),
                    },
                    '"' => break,
                    c => value.push(c),
                }
            }
            labels.push((key.trim().to_owned(), value));
        }
        rest = &rest[end + 1..];
    }
    let value_text = rest.split_whitespace().next()?;
    let value = match value_text {
        "+Inf" | "Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().ok()?,
    };
    Some(Sample {
        name,
        labels,
        value,
    })
}

/// Sum of the series of `name` whose labels include all of `labels` (0 if none).
pub fn metric_value(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    parse_metrics(text)
        .into_iter()
        .filter(|s| s.name == name)
        .filter(|s| {
            labels
                .iter()
                .all(|(k, v)| s.labels.iter().any(|(sk, sv)| sk == k && sv == v))
        })
        .map(|s| s.value)
        .sum()
}

/// The lines of `name` (for failure messages).
pub fn series_dump(text: &str, name: &str) -> String {
    text.lines()
        .filter(|l| l.starts_with(name))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The head of an event stream: `text/event-stream`, `Cache-Control: no-cache` and
/// `X-Accel-Buffering: no` (so that nginx-style proxies pass each event on at once).
pub fn assert_sse_head(resp: &reqwest::Response, what: &str) {
    let h = |name: &str| {
        resp.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned()
    };
    assert!(
        h("content-type").starts_with("text/event-stream"),
        "{what}: content-type {:?}",
        resp.headers()
    );
    assert_eq!(
        h("cache-control"),
        "no-cache",
        "{what}: {:?}",
        resp.headers()
    );
    assert_eq!(h("x-accel-buffering"), "no", "{what}: {:?}", resp.headers());
}
