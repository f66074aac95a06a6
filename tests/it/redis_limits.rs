//! Shared rate limits (issue 14): `[rate_limits] backend = "redis"` on real tollgate processes,
//! one fresh PostgreSQL database (the replicas start at the same moment, so their migrations
//! race) and one real Redis. A user's RPM and TPM hold across two and three replicas exactly;
//! a Redis of the test's own is killed mid-test: `fail_closed` answers `policy_unavailable`
//! (HTTP 503, gRPC UNAVAILABLE, a failure in the availability counter), `fail_open` admits and
//! counts; started again on the same port, both recover without a restart.
//!
//! Redis: `TEST_REDIS_URL` (default `redis://127.0.0.1:6379`; `.ci/run` starts one when none
//! answers); every test uses a key prefix of its own. The outage test runs its own
//! `redis-server` from PATH (skipped with a notice when there is none, outside CI).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use futures_util::future::join_all;
use serde_json::{json, Value};
use tollgate::proto::gateway_client::GatewayClient;
use tonic::Code;

use crate::common::process::Process;
use crate::common::*;

const AVAIL: &str = "tollgate_chat_availability_total";
const FAIL_OPEN: &str = "tollgate_rate_limit_fail_open_total";
/// Completion tokens of the test's mock provider; requests ask for exactly this many, so what
/// a request uses equals what admission took and settlement changes nothing.
const MOCK_TOKENS: u64 = 20;

fn redis_url() -> String {
    std::env::var("TEST_REDIS_URL")
        .ok()
        .filter(|v| !v.trim().is_empty())
        .unwrap_or_else(|| "redis://127.0.0.1:6379".into())
}

/// A key prefix no other test (or run) uses.
fn prefix() -> String {
    format!("tgtest-{}", uuid::Uuid::new_v4().simple())
}

/// `redis://host:port` as an address.
fn redis_addr(url: &str) -> SocketAddr {
    let rest = url.trim_start_matches("redis://");
    let hostport = rest.rsplit('@').next().unwrap().split('/').next().unwrap();
    let hostport = hostport.replace("localhost", "127.0.0.1");
    hostport.parse().expect("TEST_REDIS_URL host:port")
}

/// Whether a Redis answers PING at `addr` (plain RESP over TCP: no client needed).
fn redis_answers(addr: SocketAddr) -> bool {
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
    if s.write_all(b"PING\r\n").is_err() {
        return false;
    }
    let mut buf = [0u8; 16];
    matches!(s.read(&mut buf), Ok(n) if buf[..n].starts_with(b"+PONG"))
}

/// The shared Redis must answer (CI starts one); elsewhere its absence skips the test.
fn shared_redis() -> Option<String> {
    let url = redis_url();
    if redis_answers(redis_addr(&url)) {
        return Some(url);
    }
    if std::env::var("CI").is_ok_and(|v| !v.is_empty()) {
        panic!("no Redis answers at {url} but CI is set: .ci/run must start one (TEST_REDIS_URL)");
    }
    eprintln!("SKIPPED: no Redis answers at {url} (set TEST_REDIS_URL)");
    None
}

/// A config for one replica: the standard test config, a service type `rl` with `limits`,
/// a mock provider answering `MOCK_TOKENS` tokens, and `[rate_limits]` lines.
fn replica_config(db_url: &str, limits: &str, rate_limits: &str) -> String {
    let opts = Opts {
        extra: format!(
            "[service_types.rl]\nmodels = [\"*\"]\nrate_limits = {{ {limits} }}\n\n\
             [providers.rlmock]\nkind = \"mock\"\ntokens = {MOCK_TOKENS}\n\n\
             [rate_limits]\n{rate_limits}\n"
        ),
        ..Opts::default()
    };
    // No upstream is called: the test's requests go to the mock provider.
    config_toml(db_url, "http://127.0.0.1:9", &opts)
}

/// Starts `n` replicas of `config` at the same moment (their migrations race).
async fn start_replicas(n: usize, config: &str, dir: &std::path::Path) -> Vec<Process> {
    let path = dir.join("tollgate.toml");
    std::fs::write(&path, config).unwrap();
    join_all((0..n).map(|_| {
        let path = path.clone();
        blocking(move || Process::serve(&path, DEADLINE))
    }))
    .await
}

fn body(marker: &str) -> Value {
    let mut b = chat_body("rlmock/echo", marker);
    b["max_tokens"] = json!(MOCK_TOKENS);
    b
}

/// The tokens one request of `body` takes from a TPM window: tollgate's prompt estimate plus
/// its `max_tokens`.
fn tokens_of(body: &Value) -> u64 {
    let req = tollgate::api::openai_chat::parse_request(body.to_string().as_bytes())
        .expect("a valid chat request");
    req.estimate_prompt_tokens() + MOCK_TOKENS
}

async fn chat(client: &reqwest::Client, p: &Process, body: &Value) -> reqwest::Response {
    client
        .post(p.url("/v1/chat/completions"))
        .bearer_auth(ALICE_KEY)
        .header("x-tollgate-service-type", "rl")
        .json(body)
        .send()
        .await
        .expect("chat request")
}

async fn metrics(client: &reqwest::Client, p: &Process) -> String {
    client
        .get(p.url("/metrics"))
        .send()
        .await
        .expect("GET /metrics")
        .text()
        .await
        .unwrap()
}

/// Sends 40 requests at once, alternating between `replicas`; asserts exactly 10 answers and
/// 30 `rate_limited` refusals with `Retry-After`.
async fn forty_requests_ten_answers(replicas: &[Process], what: &str) {
    let client = http_client();
    let bodies: Vec<Value> = (0..40).map(|_| body("same")).collect();
    let responses = join_all(
        bodies
            .iter()
            .enumerate()
            .map(|(i, b)| chat(&client, &replicas[i % replicas.len()], b)),
    )
    .await;
    let (mut ok, mut limited) = (0, 0);
    for resp in responses {
        match resp.status().as_u16() {
            200 => {
                ok += 1;
                resp.bytes().await.unwrap();
            }
            429 => {
                limited += 1;
                let retry = resp
                    .headers()
                    .get("retry-after")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<u64>().ok())
                    .expect("a rate_limited answer carries Retry-After in seconds");
                assert!((1..=60).contains(&retry), "Retry-After {retry}");
                expect_http_error(resp, 429, "rate_limited").await;
            }
            s => panic!(
                "{what}: unexpected status {s}: {}\n--- replica 0 log ---\n{}",
                resp.text().await.unwrap_or_default(),
                replicas[0].log_text()
            ),
        }
    }
    assert_eq!(
        (ok, limited),
        (10, 30),
        "{what}: {} replicas share one window",
        replicas.len()
    );
}

async fn exact_across_replicas(n: usize, limits: &str) {
    let Some(redis) = shared_redis() else { return };
    let Some(db) = TestDb::postgres().await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let rate_limits = format!(
        "backend = \"redis\"\nredis_url = \"{redis}\"\nkey_prefix = \"{}\"\n\
         redis_timeout_ms = 2000\non_redis_error = \"fail_closed\"",
        prefix()
    );
    let config = replica_config(&db.url, limits, &rate_limits);
    let replicas = start_replicas(n, &config, dir.path()).await;
    forty_requests_ten_answers(&replicas, limits).await;
    // Refusals are `excluded`, never failures; nothing was admitted unchecked.
    let client = http_client();
    let mut limited = 0.0;
    for p in &replicas {
        let m = metrics(&client, p).await;
        limited += metric_value(&m, AVAIL, &[("reason", "rate_limited")]);
        assert_eq!(metric_value(&m, AVAIL, &[("outcome", "failure")]), 0.0);
        assert_eq!(metric_value(&m, FAIL_OPEN, &[]), 0.0);
    }
    assert_eq!(limited, 30.0, "every refusal counted once");
}

/// `rpm = 10` across two replicas: exactly 10 of 40 requests.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rpm_holds_across_two_replicas() {
    exact_across_replicas(2, "rpm = 10").await;
}

/// A TPM of exactly ten requests' tokens across two replicas: exactly 10 of 40 requests.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tpm_holds_across_two_replicas() {
    let tpm = 10 * tokens_of(&body("same"));
    exact_across_replicas(2, &format!("tpm = {tpm}")).await;
}

/// Both limits across three replicas: exactly 10 of 40 requests.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rpm_and_tpm_hold_across_three_replicas() {
    // The TPM allows 12 requests, the RPM 10: the RPM decides; both windows are checked and
    // taken in the same script.
    let tpm = 12 * tokens_of(&body("same"));
    exact_across_replicas(3, &format!("rpm = 10, tpm = {tpm}")).await;
}

/// TPM is reserve-then-settle in Redis too: admission takes the estimate (prompt + `max_tokens`),
/// settlement gives back what the request did not use. The bucket is one key per scope and
/// window, named `PREFIX:rl:v1:user:ID:tok`, with an expiry: once full again it is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_settle_in_redis_and_idle_keys_expire() {
    let Some(url) = shared_redis() else { return };
    let db = TestDb::sqlite();
    let prefix = prefix();
    let rate_limits = format!(
        "backend = \"redis\"\nredis_url = \"{url}\"\nkey_prefix = \"{prefix}\"\n\
         redis_timeout_ms = 2000\non_redis_error = \"fail_closed\""
    );
    let config = replica_config(&db.url, "tpm = 1000", &rate_limits);
    let p = start_replicas(1, &config, db.dir().unwrap())
        .await
        .remove(0);
    let client = http_client();

    // The mock `mock/echo` answers 8 tokens; the request reserves 500 of output.
    let mut b = chat_body("mock/echo", "settle");
    b["max_tokens"] = json!(500);
    let reserved = tollgate::api::openai_chat::parse_request(b.to_string().as_bytes())
        .unwrap()
        .estimate_prompt_tokens()
        + 500;
    let resp = chat(&client, &p, &b).await;
    assert_eq!(resp.status(), 200);
    let remaining: u64 = resp.headers()["x-ratelimit-remaining-tokens"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(
        remaining,
        1000 - reserved,
        "admission takes the whole estimate"
    );
    let usage: Value = resp.json().await.unwrap();
    let used = usage["usage"]["total_tokens"].as_u64().unwrap();
    assert!(used < reserved);

    let mut redis = redis::Client::open(url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .expect("connect to the test Redis");
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}:*"))
        .query_async(&mut redis)
        .await
        .unwrap();
    assert_eq!(keys.len(), 1, "one bucket (the user's TPM): {keys:?}");
    let key = keys[0].clone();
    let rest = key
        .strip_prefix(&format!("{prefix}:rl:v1:user:"))
        .and_then(|r| r.strip_suffix(":tok"))
        .unwrap_or_else(|| panic!("versioned key name: {key}"));
    assert!(rest.parse::<i64>().is_ok(), "the user id: {key}");

    // Settled: the level comes back to about the limit less what was used (refill adds about
    // 17 tokens a second, far less than the 400-odd given back).
    let what = "the unused estimate to come back to the bucket";
    let level = eventually(DEADLINE, what, || {
        let mut redis = redis.clone();
        let key = key.clone();
        async move {
            let v: Option<f64> = redis::cmd("HGET")
                .arg(&key)
                .arg("v")
                .query_async(&mut redis)
                .await
                .unwrap();
            v.filter(|v| *v >= (1000 - used) as f64 - 1.0)
        }
    })
    .await;
    assert!(level < 1000.0, "not more than the limit: {level}");
    let pttl: i64 = redis::cmd("PTTL")
        .arg(&key)
        .query_async(&mut redis)
        .await
        .unwrap();
    assert!(
        (1..=61_000).contains(&pttl),
        "the key expires when its bucket is full again (+1 s): {pttl} ms"
    );
    // Idle: the bucket refills in a few seconds and its key is gone.
    eventually(
        Duration::from_secs(15),
        "the idle bucket's key to expire",
        || {
            let mut redis = redis.clone();
            let key = key.clone();
            async move {
                let n: i64 = redis::cmd("EXISTS")
                    .arg(&key)
                    .query_async(&mut redis)
                    .await
                    .unwrap();
                (n == 0).then_some(())
            }
        },
    )
    .await;
}

// ---------------------------------------------------------------------------------------------
// Redis outage

/// A `redis-server` of the test's own, on a port of its own, without persistence.
struct OwnRedis {
    child: Option<Child>,
    port: u16,
    dir: PathBuf,
}

impl OwnRedis {
    fn find() -> Option<PathBuf> {
        std::env::var_os("PATH").and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|d| d.join("redis-server"))
                .find(|p| p.is_file())
        })
    }

    fn free_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }

    /// Starts on `port` and waits until it answers PING.
    async fn start(bin: PathBuf, port: u16, dir: PathBuf) -> OwnRedis {
        let child = Command::new(&bin)
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(&dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", bin.display()));
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        eventually(DEADLINE, "own redis-server to answer PING", || async move {
            blocking(move || redis_answers(addr)).await.then_some(())
        })
        .await;
        OwnRedis {
            child: Some(child),
            port,
            dir,
        }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Kills it (SIGKILL: an outage, not a shutdown) and waits until the port is closed.
    async fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let addr: SocketAddr = ([127, 0, 0, 1], self.port).into();
        eventually(
            DEADLINE,
            "killed redis-server to stop answering",
            || async move { (!blocking(move || redis_answers(addr)).await).then_some(()) },
        )
        .await;
    }

    /// Starts again on the same port.
    async fn restart(&mut self) {
        let bin = OwnRedis::find().expect("redis-server");
        let again = OwnRedis::start(bin, self.port, self.dir.clone()).await;
        *self = again;
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Whether an HTTP answer was checked against Redis (only a checked one has the headers).
fn checked(resp: &reqwest::Response) -> bool {
    resp.headers().contains_key("x-ratelimit-limit-requests")
}

fn count_lines(p: &Process, needle: &str) -> usize {
    p.log_text().lines().filter(|l| l.contains(needle)).count()
}

/// Asserts that `needle` is logged exactly once: waited for first, since the child's log is
/// read by a thread of its own and can trail the answer that followed the line.
async fn logged_once(p: &Process, needle: &str) {
    eventually(Duration::from_secs(10), needle, || async {
        (count_lines(p, needle) > 0).then_some(())
    })
    .await;
    assert_eq!(count_lines(p, needle), 1, "{}", p.log_text());
}

/// Redis killed mid-test and started again on the same port: `fail_closed` refuses with
/// `policy_unavailable` (HTTP 503, gRPC UNAVAILABLE, failures in the availability counter) and
/// is not ready; `fail_open` admits, counts every such request and stays ready; each logs the
/// change once, not per request; both enforce limits again without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_outage_fail_closed_and_fail_open_then_recovery() {
    let Some(bin) = OwnRedis::find() else {
        if std::env::var("CI").is_ok_and(|v| !v.is_empty()) {
            panic!("redis-server is not on PATH but CI is set: .ci/run installs it");
        }
        eprintln!("SKIPPED: redis-server is not on PATH (apt-get install redis-server)");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let mut redis = OwnRedis::start(bin, OwnRedis::free_port(), dir.path().to_owned()).await;
    let mode = |on: &str| {
        format!(
            "backend = \"redis\"\nredis_url = \"{}\"\nkey_prefix = \"{}\"\n\
             redis_timeout_ms = 1000\non_redis_error = \"{on}\"",
            redis.url(),
            prefix()
        )
    };
    let closed_db = TestDb::sqlite();
    let open_db = TestDb::sqlite();
    let closed_cfg = replica_config(&closed_db.url, "rpm = 1000", &mode("fail_closed"));
    let open_cfg = replica_config(&open_db.url, "rpm = 1000", &mode("fail_open"));
    let closed = start_replicas(1, &closed_cfg, closed_db.dir().unwrap())
        .await
        .remove(0);
    let open = start_replicas(1, &open_cfg, open_db.dir().unwrap())
        .await
        .remove(0);
    let client = http_client();

    for (p, name) in [(&closed, "fail_closed"), (&open, "fail_open")] {
        let resp = chat(&client, p, &body("up")).await;
        assert_eq!(resp.status(), 200, "{name} with Redis up");
        assert!(checked(&resp), "{name}: checked against Redis");
        let ready = client.get(p.url("/readyz")).send().await.unwrap();
        assert_eq!(ready.status(), 200);
        assert!(ready.text().await.unwrap().contains("redis: ok"));
    }

    redis.kill().await;

    // fail_closed: 503 policy_unavailable over HTTP, UNAVAILABLE over gRPC, counted as failures.
    for i in 0..3 {
        let resp = chat(&client, &closed, &body(&format!("down-{i}"))).await;
        expect_http_error(resp, 503, "policy_unavailable").await;
    }
    let mut grpc = GatewayClient::connect(format!("http://{}", closed.grpc))
        .await
        .expect("gRPC connect");
    let mut req = grpc_request(
        complete_request("rlmock/echo", "g-down"),
        Some(ALICE_KEY),
        None,
    );
    req.metadata_mut()
        .insert("x-tollgate-service-type", "rl".parse().unwrap());
    let status = grpc.complete(req).await.expect_err("Redis is down");
    expect_grpc_error(&status, Code::Unavailable, "policy_unavailable");
    let m = metrics(&client, &closed).await;
    let failures = [("outcome", "failure"), ("reason", "policy_unavailable")];
    assert_eq!(metric_value(&m, AVAIL, &failures), 4.0, "3 HTTP + 1 gRPC");
    assert_eq!(
        metric_value(
            &m,
            AVAIL,
            &[("protocol", "grpc"), ("reason", "policy_unavailable")]
        ),
        1.0
    );
    assert_eq!(metric_value(&m, FAIL_OPEN, &[]), 0.0);
    let ready = client.get(closed.url("/readyz")).send().await.unwrap();
    assert_eq!(
        ready.status(),
        503,
        "fail_closed without Redis is not ready"
    );

    // fail_open: answered unchecked, and counted.
    for i in 0..3 {
        let resp = chat(&client, &open, &body(&format!("open-{i}"))).await;
        assert_eq!(resp.status(), 200, "fail_open admits while Redis is down");
        assert!(!checked(&resp), "admitted without a check");
        resp.bytes().await.unwrap();
    }
    let m = metrics(&client, &open).await;
    assert_eq!(metric_value(&m, FAIL_OPEN, &[]), 3.0);
    assert_eq!(metric_value(&m, AVAIL, &[("outcome", "failure")]), 0.0);
    let ready = client.get(open.url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 200, "fail_open stays ready");
    assert!(ready.text().await.unwrap().contains("redis: unreachable"));

    // Logged once per change, not per request.
    for p in [&closed, &open] {
        logged_once(p, "rate-limit Redis is failing").await;
    }

    redis.restart().await;

    // Both recover on their own: checked again, without a restart.
    for (p, name) in [(&closed, "fail_closed"), (&open, "fail_open")] {
        let what = format!("{name} to check against Redis again");
        let client = &client;
        eventually(Duration::from_secs(20), &what, || async move {
            let resp = chat(client, p, &body("back")).await;
            (resp.status() == 200 && checked(&resp)).then_some(())
        })
        .await;
        let ready = client.get(p.url("/readyz")).send().await.unwrap();
        assert_eq!(ready.status(), 200, "{name} ready again");
        logged_once(p, "rate-limit Redis answers again").await;
    }
    let before = metric_value(&metrics(&client, &open).await, FAIL_OPEN, &[]);
    let resp = chat(&client, &open, &body("after")).await;
    assert!(checked(&resp));
    let after = metric_value(&metrics(&client, &open).await, FAIL_OPEN, &[]);
    assert_eq!(before, after, "no fail-open admissions once Redis is back");
}
