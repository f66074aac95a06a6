//! The access log (issue 15): the real binary with `[log] format = "json"` writes exactly one
//! `tollgate::access` line per model request when it finishes (a success, a refusal, a stream
//! that fails mid-way, over HTTP and gRPC), with its request id, status and reason, and never a
//! key; `[log] access = false` writes none.

use std::time::Duration;

use crate::common::process::Process;
use crate::common::upstream::{Upstream, UPSTREAM_KEY};
use crate::common::*;
use serde_json::Value;

const BAD_KEY: &str = "tg-access-log-wrong-key-5f1c";

/// Writes the standard config with JSON logs (and `extra_log` in `[log]`) and starts the binary.
async fn start(upstream: &Upstream, extra_log: &str) -> (Process, TestDb) {
    let db = TestDb::sqlite();
    let text = config_toml(&db.url, &upstream.base_url(), &Opts::default()).replace(
        "[log]\nlevel = \"warn\"",
        &format!("[log]\nlevel = \"warn\"\nformat = \"json\"\n{extra_log}"),
    );
    assert!(text.contains("format = \"json\""));
    let path = db.dir().unwrap().join("tollgate.toml");
    std::fs::write(&path, text).unwrap();
    let process = blocking(move || Process::serve(&path, DEADLINE)).await;
    (process, db)
}

/// The `fields` of every access line in the log.
fn access_lines(log: &str) -> Vec<Value> {
    log.lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["target"] == "tollgate::access")
        .map(|v| v["fields"].clone())
        .collect()
}

fn lines_for(log: &str, request_id: &str) -> Vec<Value> {
    access_lines(log)
        .into_iter()
        .filter(|f| f["request_id"] == request_id)
        .collect()
}

fn request_id(resp: &reqwest::Response) -> String {
    resp.headers()["x-request-id"].to_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_access_line_per_request_with_status_and_reason_and_no_key() {
    let upstream = Upstream::start().await;
    let (process, _db) = start(&upstream, "").await;
    let client = http_client();
    let chat = |key: &'static str, body: Value| {
        client
            .post(process.url("/v1/chat/completions"))
            .bearer_auth(key)
            .json(&body)
            .send()
    };

    // A success.
    let resp = chat(ALICE_KEY, chat_body("up/ok", "access-ok"))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let ok_id = request_id(&resp);
    resp.bytes().await.unwrap();

    // A refusal: a key nobody issued.
    let resp = chat(BAD_KEY, chat_body("up/ok", "access-refused"))
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    let refused_id = request_id(&resp);
    resp.bytes().await.unwrap();

    // A stream the upstream cuts after its first chunks: it finishes when it ends.
    let mut body = chat_body("up/reset", "access-stream");
    body["stream"] = Value::Bool(true);
    let resp = chat(ALICE_KEY, body).await.unwrap();
    assert_eq!(resp.status(), 200, "the stream had started");
    let stream_id = request_id(&resp);
    let _ = resp.bytes().await;

    // A gRPC refusal: its status is the gRPC code name.
    let mut grpc =
        tollgate::proto::gateway_client::GatewayClient::connect(format!("http://{}", process.grpc))
            .await
            .unwrap();
    let grpc_id = new_request_id();
    let err = grpc
        .complete(grpc_request(
            complete_request("up/ok", "access-grpc"),
            Some(BAD_KEY),
            Some(&grpc_id),
        ))
        .await
        .expect_err("a bad key is refused");
    assert_eq!(err.code(), tonic::Code::Unauthenticated);

    let ids = [&ok_id, &refused_id, &stream_id, &grpc_id];
    eventually(DEADLINE, "an access line for every request", || {
        let log = process.log_text();
        let done = ids.iter().all(|id| !lines_for(&log, id).is_empty());
        async move { done.then_some(()) }
    })
    .await;
    // Time for a second line to show up, were there one.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let log = process.log_text();

    let one = |id: &str| -> Value {
        let lines = lines_for(&log, id);
        assert_eq!(lines.len(), 1, "exactly one access line for {id}:\n{log}");
        lines.into_iter().next().unwrap()
    };
    let ok = one(&ok_id);
    assert_eq!(ok["protocol"], "http", "{ok}");
    assert_eq!(ok["api"], "chat_completions", "{ok}");
    assert_eq!(ok["status"], "200", "{ok}");
    assert_eq!(ok["outcome"], "success", "{ok}");
    assert_eq!(ok["reason"], "success", "{ok}");
    assert_eq!(ok["requested_model"], "up/ok", "{ok}");
    assert_eq!(ok["resolved_model"], "up/ok", "{ok}");
    assert!(ok["user_id"].is_i64() || ok["user_id"].is_u64(), "{ok}");
    assert!(ok["key_id"].is_i64() || ok["key_id"].is_u64(), "{ok}");
    assert!(ok["latency_ms"].is_u64(), "{ok}");
    assert!(ok["prompt_tokens"].as_u64().unwrap() > 0, "{ok}");
    assert!(ok["completion_tokens"].as_u64().unwrap() > 0, "{ok}");
    assert!(ok["cost_usd"].as_f64().unwrap() > 0.0, "{ok}");
    assert!(ok.get("ttft_ms").is_none(), "not a stream: {ok}");

    let refused = one(&refused_id);
    assert_eq!(refused["status"], "401", "{refused}");
    assert_eq!(refused["reason"], "auth_rejected", "{refused}");
    assert_eq!(refused["outcome"], "excluded", "{refused}");
    assert!(refused.get("key_id").is_none(), "{refused}");

    let stream = one(&stream_id);
    assert_eq!(stream["status"], "502", "{stream}");
    assert_eq!(stream["reason"], "upstream_error", "{stream}");
    assert_eq!(stream["outcome"], "failure", "{stream}");
    assert!(stream["ttft_ms"].is_u64(), "a stream with tokens: {stream}");

    let g = one(&grpc_id);
    assert_eq!(g["protocol"], "grpc", "{g}");
    assert_eq!(g["status"], "UNAUTHENTICATED", "{g}");
    assert_eq!(g["reason"], "auth_rejected", "{g}");

    for (what, key) in [
        ("caller key", ALICE_KEY),
        ("wrong caller key", BAD_KEY),
        ("upstream key", UPSTREAM_KEY),
    ] {
        assert!(!log.contains(key), "the {what} is in the log:\n{log}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_false_writes_no_access_line() {
    let upstream = Upstream::start().await;
    let (process, _db) = start(&upstream, "access = false").await;
    let client = http_client();
    for key in [ALICE_KEY, BAD_KEY] {
        let resp = client
            .post(process.url("/v1/chat/completions"))
            .bearer_auth(key)
            .json(&chat_body("up/ok", "access-off"))
            .send()
            .await
            .unwrap();
        resp.bytes().await.unwrap();
    }
    // The requests are recorded (so their outcome was emitted) before looking at the log.
    eventually(DEADLINE, "both requests counted", || {
        let url = process.url("/metrics");
        let client = client.clone();
        async move {
            let text = client.get(url).send().await.ok()?.text().await.ok()?;
            let n: f64 = parse_metrics(&text)
                .iter()
                .filter(|s| s.name == AVAILABILITY)
                .map(|s| s.value)
                .sum();
            (n >= 2.0).then_some(())
        }
    })
    .await;
    let log = process.log_text();
    assert!(access_lines(&log).is_empty(), "access = false:\n{log}");
}
