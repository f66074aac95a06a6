//! Helpers for the budget tests: an upstream whose answers have known costs, and one or more
//! real gateways on one test database, each on a manual clock of its own (time moves only when
//! a test advances it, so periods, expiries and rate-limit windows are exact under any load).
//!
//! The upstream answers by model name:
//!
//! | model  | behaviour |
//! |--------|-----------|
//! | `hold` | waits `hold_ms` (a body field, default 0), then answers with usage = (tollgate's prompt estimate, `max_tokens`): exactly the maximum cost tollgate reserves; streams `max_tokens` chunks of `abcd` (one token each) when asked to |
//! | `drip` | streams `drip` chunks (a body field, default 5) of `abcd`, then waits for [`BudgetUpstream::release`] and sends 20 more, 20 ms apart, then usage and `[DONE]` |
//! | `fail` | 500 |

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Router;
use serde_json::{json, Value};
use tokio::sync::Semaphore;
use tollgate::clock::Clock;
use tollgate::config::Config;
use tollgate::server::RunningServer;
use tollgate::store::Store;

use super::{config_toml, http_client, Backend, Opts, TestDb};

pub const ADMIN: &str = "tg-admin-budget-test-0123456789";
/// USD per million tokens of the priced test models: one token costs 1000 (input) or 2000
/// (output) micro-dollars.
pub const IN_MICROS: i64 = 1000;
pub const OUT_MICROS: i64 = 2000;

struct Shared {
    calls: AtomicUsize,
    gate: Semaphore,
}

/// The upstream of the budget tests.
#[derive(Clone)]
pub struct BudgetUpstream {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
}

impl BudgetUpstream {
    pub async fn start() -> BudgetUpstream {
        let shared = Arc::new(Shared {
            calls: AtomicUsize::new(0),
            gate: Semaphore::new(0),
        });
        let app = Router::new().fallback(handle).with_state(shared.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind upstream");
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        BudgetUpstream { addr, shared }
    }

    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// Chat requests received so far.
    pub fn calls(&self) -> usize {
        self.shared.calls.load(Ordering::SeqCst)
    }

    /// Lets one `drip` stream go on.
    pub fn release(&self) {
        self.shared.gate.add_permits(1);
    }
}

fn chunk(content: Option<&str>, finish: Option<&str>) -> Bytes {
    let delta = match content {
        Some(c) => json!({"content": c}),
        None => json!({}),
    };
    let v = json!({
        "id": "chatcmpl-b", "object": "chat.completion.chunk", "created": 1_700_000_000,
        "model": "m", "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]
    });
    Bytes::from(format!("data: {v}\n\n"))
}

fn usage_chunk(prompt: u64, completion: u64) -> Bytes {
    let v = json!({
        "id": "chatcmpl-b", "object": "chat.completion.chunk", "created": 1_700_000_000,
        "model": "m", "choices": [],
        "usage": {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
    });
    Bytes::from(format!("data: {v}\n\n"))
}

fn sse(body: Body) -> Response {
    Response::builder()
        .status(200)
        .header("content-type", "text/event-stream")
        .body(body)
        .unwrap()
}

async fn handle(State(shared): State<Arc<Shared>>, body: Bytes) -> Response {
    shared.calls.fetch_add(1, Ordering::SeqCst);
    let Ok(Value::Object(body)) = serde_json::from_slice::<Value>(&body) else {
        return (StatusCode::BAD_REQUEST, "not json").into_response();
    };
    let model = body.get("model").and_then(Value::as_str).unwrap_or("");
    let stream = body.get("stream").and_then(Value::as_bool).unwrap_or(false);
    let num = |k: &str, d: u64| body.get(k).and_then(Value::as_u64).unwrap_or(d);
    let prompt = prompt_estimate(&Value::Object(body.clone())) as u64;
    match model {
        "hold" => {
            tokio::time::sleep(Duration::from_millis(num("hold_ms", 0))).await;
            let n = num("max_tokens", 16);
            if stream {
                let mut parts: Vec<Bytes> = (0..n).map(|_| chunk(Some("abcd"), None)).collect();
                parts.push(chunk(None, Some("length")));
                parts.push(usage_chunk(prompt, n));
                parts.push(Bytes::from_static(b"data: [DONE]\n\n"));
                let s = futures_util::stream::iter(parts.into_iter().map(Ok::<_, std::io::Error>));
                return sse(Body::from_stream(s));
            }
            let v = json!({
                "id": "chatcmpl-b", "object": "chat.completion", "created": 1_700_000_000,
                "model": "hold",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "abcd".repeat(n as usize)}, "finish_reason": "length"}],
                "usage": {"prompt_tokens": prompt, "completion_tokens": n, "total_tokens": prompt + n}
            });
            (
                StatusCode::OK,
                [("content-type", "application/json")],
                v.to_string(),
            )
                .into_response()
        }
        "drip" => {
            let first = num("drip", 5);
            let shared = shared.clone();
            let s = async_stream(first, shared, prompt);
            sse(Body::from_stream(s))
        }
        _ => (
            StatusCode::INTERNAL_SERVER_ERROR,
            [("content-type", "application/json")],
            json!({"error": {"message": "boom", "type": "server_error", "code": null, "param": null}})
                .to_string(),
        )
            .into_response(),
    }
}

fn async_stream(
    first: u64,
    shared: Arc<Shared>,
    prompt: u64,
) -> impl futures_util::Stream<Item = Result<Bytes, std::io::Error>> {
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(64);
    tokio::spawn(async move {
        for _ in 0..first {
            if tx.send(chunk(Some("abcd"), None)).await.is_err() {
                return;
            }
        }
        let Ok(permit) = shared.gate.acquire().await else {
            return;
        };
        permit.forget();
        for _ in 0..20 {
            tokio::time::sleep(Duration::from_millis(20)).await;
            if tx.send(chunk(Some("abcd"), None)).await.is_err() {
                return;
            }
        }
        let _ = tx.send(chunk(None, Some("stop"))).await;
        let _ = tx.send(usage_chunk(prompt, first + 20)).await;
        let _ = tx.send(Bytes::from_static(b"data: [DONE]\n\n")).await;
    });
    futures_util::stream::unfold(
        rx,
        |mut rx| async move { rx.recv().await.map(|b| (Ok(b), rx)) },
    )
}

/// The configuration of a budget test gateway: the standard test configuration with every
/// provider on the budget upstream, an admin token, a provider `b` with default timeouts and
/// priced models `b/hold`, `b/drip`, `b/fail`, plus `extra`.
pub fn budget_config(db: &TestDb, upstream: &BudgetUpstream, extra: &str) -> String {
    let base = upstream.base_url();
    // Leases are on by default; tests that count reservations row by row reserve per request
    // unless they opt into leases.
    let extra = if extra.contains("lease_fraction") {
        extra.to_string()
    } else if extra.contains("[budgets]") {
        extra.replacen("[budgets]\n", "[budgets]\nlease_fraction = 0.0\n", 1)
    } else {
        format!("[budgets]\nlease_fraction = 0.0\n{extra}")
    };
    let opts = Opts {
        server: format!("admin_token = \"{ADMIN}\""),
        extra: format!(
            r#"[providers.b]
kind = "openai"
base_url = "{base}"
keys = ["sk-upstream-test"]

[pricing."b/hold"]
input_usd_per_mtok = 1000.0
output_usd_per_mtok = 2000.0

[pricing."b/drip"]
input_usd_per_mtok = 1000.0
output_usd_per_mtok = 2000.0

[pricing."b/fail"]
input_usd_per_mtok = 1000.0
output_usd_per_mtok = 2000.0

{extra}
"#
        ),
        ..Opts::default()
    };
    config_toml(&db.url, &base, &opts)
}

/// One running gateway.
pub struct Gw {
    pub http: SocketAddr,
    pub grpc: SocketAddr,
    /// This gateway's manual clock.
    pub clock: Clock,
    server: Option<RunningServer>,
}

impl Gw {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.http, path)
    }

    pub async fn shutdown(&mut self) {
        if let Some(s) = self.server.take() {
            tokio::time::timeout(Duration::from_secs(15), s.shutdown())
                .await
                .expect("graceful shutdown took longer than 15 s");
        }
    }
}

/// Gateways on one database and one upstream.
pub struct BudgetEnv {
    pub db: TestDb,
    pub upstream: BudgetUpstream,
    pub gws: Vec<Gw>,
    pub client: reqwest::Client,
    pub config_text: String,
    store: tokio::sync::OnceCell<Store>,
}

impl BudgetEnv {
    /// `n` gateways on `backend`; `None` when that backend is skipped.
    pub async fn start(backend: Backend, n: usize, extra: &str) -> Option<BudgetEnv> {
        let db = TestDb::new(backend).await?;
        Some(Self::start_on(db, n, extra).await)
    }

    pub async fn start_on(db: TestDb, n: usize, extra: &str) -> BudgetEnv {
        let upstream = BudgetUpstream::start().await;
        let text = budget_config(&db, &upstream, extra);
        let mut gws = Vec::new();
        for _ in 0..n {
            let config = Config::from_toml_str(&text)
                .unwrap_or_else(|e| panic!("test config rejected: {e}\n---\n{text}"));
            let clock = Clock::manual();
            let server = RunningServer::start_with_clock(config, clock.clone())
                .await
                .unwrap_or_else(|e| panic!("server did not start: {e}"));
            gws.push(Gw {
                http: server.http_addr(),
                grpc: server.grpc_addr(),
                clock,
                server: Some(server),
            });
        }
        BudgetEnv {
            db,
            upstream,
            gws,
            client: http_client(),
            config_text: text,
            store: tokio::sync::OnceCell::new(),
        }
    }

    /// A store of the test's own on the gateways' database.
    pub async fn store(&self) -> &Store {
        self.store
            .get_or_init(|| async {
                Store::connect(&self.db.url, 4, Clock::system())
                    .await
                    .unwrap_or_else(|e| panic!("Store::connect({}): {e}", self.db.url))
            })
            .await
    }

    /// Alice's user id (the static key's user).
    pub async fn alice(&self) -> i64 {
        self.store()
            .await
            .find_user("alice")
            .await
            .unwrap()
            .expect("alice exists")
            .id
    }

    /// `POST /v1/chat/completions` on gateway `i` with `key`.
    pub fn chat(&self, i: usize, key: &str, body: &Value) -> reqwest::RequestBuilder {
        self.client
            .post(self.gws[i].url("/v1/chat/completions"))
            .bearer_auth(key)
            .json(body)
    }

    /// An admin call on gateway `i`; returns status and JSON body.
    pub async fn admin(
        &self,
        i: usize,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let mut rb = self
            .client
            .request(method, self.gws[i].url(path))
            .bearer_auth(ADMIN);
        if let Some(b) = body {
            rb = rb.json(&b);
        }
        let resp = rb.send().await.expect("admin request");
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap_or_default();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    /// `PUT /admin/budgets` that must succeed.
    pub async fn put_budget(&self, i: usize, body: Value) -> Value {
        let (status, v) = self
            .admin(i, reqwest::Method::PUT, "/admin/budgets", Some(body))
            .await;
        assert_eq!(status, 200, "PUT /admin/budgets: {v}");
        v
    }

    /// `GET /admin/budgets?scope=&id=` that must succeed.
    pub async fn get_budget(&self, i: usize, scope: &str, id: i64) -> Value {
        let (status, v) = self
            .admin(
                i,
                reqwest::Method::GET,
                &format!("/admin/budgets?scope={scope}&id={id}"),
                None,
            )
            .await;
        assert_eq!(status, 200, "GET /admin/budgets: {v}");
        v
    }

    pub async fn shutdown(&mut self) {
        for g in &mut self.gws {
            g.shutdown().await;
        }
    }
}

/// A chat body for `model` whose prompt estimate is the same whatever `n` is (below 1000).
pub fn body(model: &str, n: usize, max_tokens: u64) -> Value {
    json!({
        "model": model,
        "messages": [{"role": "user", "content": format!("budget request {n:03}")}],
        "max_tokens": max_tokens,
    })
}

/// tollgate's prompt estimate of a body.
pub fn prompt_estimate(body: &Value) -> i64 {
    let mut body = body.clone();
    // The upstream sees the gateway's own fields too; they do not change the estimate.
    if let Some(o) = body.as_object_mut() {
        o.remove("stream_options");
    }
    tollgate::api::openai_chat::parse_request(body.to_string().as_bytes())
        .expect("a valid chat body")
        .estimate_prompt_tokens() as i64
}

/// The cost of a `hold` answer to `body` (= the maximum tollgate reserves for it).
pub fn hold_cost(body: &Value) -> i64 {
    prompt_estimate(body) * IN_MICROS + body["max_tokens"].as_i64().unwrap() * OUT_MICROS
}

/// A response header as text.
pub fn header(resp: &reqwest::Response, name: &str) -> Option<String> {
    resp.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}
