//! `POST /v1/messages` and `/v1/messages/count_tokens`: the Anthropic Messages API in front of
//! every provider kind. To an `anthropic` model the caller's body passes through byte for byte
//! (only `model` changes, the caller's `anthropic-beta` is forwarded with the provider's merged
//! in) and the answer comes back byte for byte (only `model` rewritten); to a `mock` or `openai`
//! model it is translated through the neutral types. Ledger rows and the availability counter
//! carry `api = "messages"`; errors are in Anthropic's shape.

use serde_json::{json, Value};

use crate::anthropic::{python, run_script};
use crate::common::anthropic_upstream::{self as fake, AnthropicUpstream};
use crate::common::*;

const PROVIDER_BETA: &str = "tollgate-provider-beta";

/// The server, with the fake Anthropic API as provider `claude` (a configured beta value), and
/// an alias whose first target is Claude (overloaded) and second the OpenAI-compatible fake.
async fn start() -> (TestServer, AnthropicUpstream) {
    start_with(Backend::Sqlite, "")
        .await
        .expect("SQLite is always there")
}

/// [`start`] on `backend` with lines added to `[server]`; `None` when the backend is skipped.
async fn start_with(backend: Backend, server: &str) -> Option<(TestServer, AnthropicUpstream)> {
    let up = AnthropicUpstream::start().await;
    let extra = format!(
        "{}anthropic_beta = [\"{PROVIDER_BETA}\"]\n\n{}\
         [aliases.mixed]\nchain = [\"claude/claude-overloaded\", \"up/ok\"]\n\n\
         [aliases.claude_first]\nchain = [\"claude/claude-ok\", \"up/ok\"]\n\n",
        up.provider_toml("claude", &[fake::GOOD_KEY]),
        up.provider_toml(
            "claude_pool",
            &[&format!("{}-1", fake::RATE_LIMITED_PREFIX), fake::GOOD_KEY]
        ),
    );
    let s = TestServer::start(
        backend,
        Opts {
            extra,
            server: server.to_owned(),
            ..Opts::default()
        },
    )
    .await?;
    Some((s, up))
}

/// `POST /v1/messages` as alice with `x-api-key`, the given raw body and extra headers.
async fn post(
    s: &TestServer,
    path: &str,
    body: &str,
    rid: &str,
    headers: &[(&str, &str)],
) -> reqwest::Response {
    let mut rb = s
        .client
        .post(s.url(path))
        .header("x-api-key", ALICE_KEY)
        .header("anthropic-version", "2023-06-01")
        .header("content-type", "application/json")
        .header("x-request-id", rid)
        .body(body.to_owned());
    for (k, v) in headers {
        rb = rb.header(*k, *v);
    }
    rb.send().await.expect("POST /v1/messages")
}

/// Events of an SSE body: (event name, data).
fn events(text: &str) -> Vec<(String, Value)> {
    text.split("\n\n")
        .filter(|e| !e.trim().is_empty())
        .map(|e| {
            let mut name = String::new();
            let mut data = Value::Null;
            for line in e.lines() {
                if let Some(n) = line.strip_prefix("event: ") {
                    name = n.to_owned();
                } else if let Some(d) = line.strip_prefix("data: ") {
                    data = serde_json::from_str(d).unwrap_or_else(|_| panic!("data JSON: {d}"));
                }
            }
            (name, data)
        })
        .collect()
}

/// An Anthropic error body with `status` and `error.type`.
async fn expect_anthropic_error(resp: reqwest::Response, status: u16, ty: &str) -> Value {
    let got = resp.status().as_u16();
    let text = resp.text().await.unwrap();
    assert_eq!(got, status, "{text}");
    let v: Value = serde_json::from_str(&text).unwrap_or_else(|_| panic!("JSON: {text}"));
    assert_eq!(v["type"], "error", "{v}");
    assert_eq!(v["error"]["type"], ty, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{v}"
    );
    v
}

fn messages_avail<'a>(outcome: &'a str, reason: &'a str) -> Vec<(&'a str, &'a str)> {
    vec![
        ("protocol", "http"),
        ("api", "messages"),
        ("outcome", outcome),
        ("reason", reason),
    ]
}

/// To an Anthropic model the body reaches the upstream untouched but for `model` (fields
/// tollgate does not model, thinking, signatures and cache_control included, odd whitespace
/// kept), the betas are merged, and the Message comes back byte for byte but for `model`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passthrough_is_byte_exact_but_for_the_model() {
    let (s, up) = start().await;
    passthrough_byte_exact(&s, &up).await;
}

/// The same on PostgreSQL (the ledger's `api` column of its migration).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passthrough_is_byte_exact_on_postgres() {
    let Some((s, up)) = start_with(Backend::Postgres, "").await else {
        return;
    };
    passthrough_byte_exact(&s, &up).await;
}

async fn passthrough_byte_exact(s: &TestServer, up: &AnthropicUpstream) {
    let rid = new_request_id();
    let body = format!(
        r#"{{ "model" :  "claude/claude-ok", "max_tokens": 2048, "top_k": 5,
  "context_management": {{"edits": []}},
  "thinking": {{"type": "enabled", "budget_tokens": 1024}},
  "system": [{{"type": "text", "text": "Be brief.", "cache_control": {{"type": "ephemeral"}}}}],
  "messages": [
    {{"role": "user", "content": [{{"type": "text", "text": "hello {rid} \u00e9", "cache_control": {{"type": "ephemeral"}}}}]}},
    {{"role": "assistant", "content": [{{"type": "thinking", "thinking": "hm", "signature": "sig-1"}}, {{"type": "text", "text": "Hi."}}]}},
    {{"role": "user", "content": "again"}}
  ],
  "temperature": 1.0 }}"#
    );
    let before = s.metrics().await;
    let resp = post(
        s,
        "/v1/messages",
        &body,
        &rid,
        &[("anthropic-beta", "caller-beta-1, caller-beta-2")],
    )
    .await;
    assert_eq!(resp.status(), 200, "{:?}", up.refused());
    assert_eq!(
        resp.headers()["x-tollgate-resolved-model"],
        "claude/claude-ok"
    );
    let answer = resp.text().await.unwrap();
    let ex = up
        .exchanges()
        .into_iter()
        .find(|e| String::from_utf8_lossy(&e.raw).contains(&rid))
        .expect("the fake got the request");
    let expected = body.replacen("\"claude/claude-ok\"", "\"claude-ok\"", 1);
    assert_eq!(String::from_utf8_lossy(&ex.raw), expected);
    assert_eq!(
        ex.header("anthropic-beta").as_deref(),
        Some(format!("caller-beta-1,caller-beta-2,{PROVIDER_BETA}").as_str())
    );
    assert_eq!(
        ex.header("anthropic-version").as_deref(),
        Some("2023-06-01")
    );
    assert_eq!(ex.header("x-api-key").as_deref(), Some(fake::GOOD_KEY));
    let upstream_answer = String::from_utf8_lossy(&ex.answer).into_owned();
    assert_eq!(
        answer,
        upstream_answer.replacen("\"claude-ok-20250514\"", "\"claude/claude-ok\"", 1)
    );
    let row = s.ledger_row(&rid).await;
    assert_eq!(row.api, "messages");
    assert_eq!(row.resolved_model.as_deref(), Some("claude/claude-ok"));
    assert_eq!(row.prompt_tokens as u64, fake::OK_USAGE.prompt_total());
    assert_eq!(row.completion_tokens as u64, fake::OK_USAGE.output);
    assert_eq!(row.reason, "success");
    s.assert_delta_now(
        &before,
        AVAILABILITY,
        &messages_avail("success", "success"),
        1.0,
    )
    .await;
}

/// A streamed pass-through: the events arrive as the upstream sent them (only `message.model`
/// of `message_start` rewritten), usage is read from them for the ledger.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passthrough_stream_is_byte_exact_and_accounted() {
    let (s, up) = start().await;
    for model in ["claude-tools", "claude-thinking"] {
        let rid = new_request_id();
        let body = json!({
            "model": format!("claude/{model}"), "max_tokens": 2000, "stream": true,
            "thinking": {"type": "enabled", "budget_tokens": 1024},
            "tools": [{"name": "get_weather", "input_schema": {"type": "object"}}],
            "messages": [{"role": "user", "content": format!("weather {rid}")}],
        })
        .to_string();
        let resp = post(&s, "/v1/messages", &body, &rid, &[]).await;
        assert_eq!(resp.status(), 200, "{:?}", up.refused());
        assert_sse_head(&resp, &format!("Messages pass-through stream {model}"));
        let text = resp.text().await.unwrap();
        let ex = up.find_all(model, &rid).pop().expect("the fake got it");
        let sent = String::from_utf8_lossy(&ex.answer).into_owned();
        let dated = format!("\"{model}-20250514\"");
        assert_eq!(
            text,
            sent.replacen(&dated, &format!("\"claude/{model}\""), 1),
            "{model}"
        );
        let ev = events(&text);
        assert_eq!(ev.first().unwrap().0, "message_start");
        assert_eq!(ev.last().unwrap().0, "message_stop");
        let row = s.ledger_row(&rid).await;
        let usage = if model == "claude-tools" {
            fake::TOOLS_USAGE
        } else {
            fake::THINKING_USAGE
        };
        assert_eq!(row.api, "messages");
        assert!(row.stream);
        assert_eq!(row.prompt_tokens as u64, usage.prompt_total(), "{model}");
        assert_eq!(row.completion_tokens as u64, usage.output, "{model}");
    }
}

/// The pass-through walks the provider's key pool like any call: a rate-limited key cools down
/// and the same body goes to the next key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passthrough_walks_the_key_pool() {
    let (s, up) = start().await;
    let rid = new_request_id();
    let body = json!({"model": "claude_pool/claude-ok", "max_tokens": 5,
        "messages": [{"role": "user", "content": format!("pool {rid}")}]})
    .to_string();
    let resp = post(&s, "/v1/messages", &body, &rid, &[]).await;
    assert_eq!(resp.status(), 200);
    let tried: Vec<u16> = up
        .find_all("claude-ok", &rid)
        .iter()
        .map(|e| e.status)
        .collect();
    assert_eq!(tried, [429, 200]);
    let row = s.ledger_row(&rid).await;
    assert_eq!(row.resolved_model.as_deref(), Some("claude_pool/claude-ok"));
}

/// A body over the limit is `request_too_large` (413), counted with `api="messages"`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_too_large_is_request_too_large() {
    let (s, _up) = start_with(Backend::Sqlite, "max_body_bytes = 2000")
        .await
        .unwrap();
    let before = s.metrics().await;
    let rid = new_request_id();
    let body = json!({"model": "mock/echo", "max_tokens": 5,
        "messages": [{"role": "user", "content": "x".repeat(4000)}]})
    .to_string();
    let resp = post(&s, "/v1/messages", &body, &rid, &[]).await;
    expect_anthropic_error(resp, 413, "request_too_large").await;
    s.assert_delta_now(
        &before,
        AVAILABILITY,
        &messages_avail("excluded", "payload_too_large"),
        1.0,
    )
    .await;
    assert_eq!(s.ledger_row(&rid).await.api, "messages");
}

/// A pass-through stream the upstream breaks with an `error` event ends with an `error` event
/// to the caller, and counts as `upstream_error`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passthrough_stream_error_event_ends_the_stream() {
    let (s, _up) = start().await;
    let rid = new_request_id();
    let body = json!({
        "model": "claude/claude-midstream-error", "max_tokens": 50, "stream": true,
        "messages": [{"role": "user", "content": "hi"}],
    })
    .to_string();
    let resp = post(&s, "/v1/messages", &body, &rid, &[]).await;
    assert_eq!(resp.status(), 200);
    let ev = events(&resp.text().await.unwrap());
    let names: Vec<&str> = ev.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names.first(), Some(&"message_start"));
    assert_eq!(names.last(), Some(&"error"), "{names:?}");
    assert_eq!(ev.last().unwrap().1["error"]["type"], "overloaded_error");
    assert!(ev
        .iter()
        .any(|(_, d)| d["delta"]["text"] == fake::MIDSTREAM_TEXT));
    let row = s.ledger_row(&rid).await;
    assert_eq!(
        (row.outcome.as_str(), row.reason.as_str()),
        ("failure", "upstream_error")
    );
}

/// To a mock model, a Messages request is translated: a Message back, and streamed, the exact
/// Anthropic event sequence with the first text never dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn translated_to_mock_and_openai() {
    let (s, _up) = start().await;
    let before = s.metrics().await;
    // Whole answers.
    for (model, text) in [("mock/echo", None), ("up/ok", Some(upstream::OK_CONTENT))] {
        let rid = new_request_id();
        let body = json!({
            "model": model, "max_tokens": 50,
            "system": "You are a test.",
            "messages": [{"role": "user", "content": [{"type": "text", "text": "alpha beta"}]}],
        })
        .to_string();
        let resp = post(&s, "/v1/messages", &body, &rid, &[]).await;
        assert_eq!(resp.status(), 200);
        let v: Value = resp.json().await.unwrap();
        assert_eq!(v["type"], "message", "{v}");
        assert_eq!(v["role"], "assistant");
        assert_eq!(v["model"], model);
        assert_eq!(v["content"][0]["type"], "text");
        if let Some(t) = text {
            assert_eq!(v["content"][0]["text"], t);
            assert_eq!(v["usage"]["input_tokens"], upstream::OK_USAGE.0);
        } else {
            assert!(v["content"][0]["text"].as_str().unwrap().contains("alpha"));
        }
        assert_eq!(v["stop_reason"], "end_turn");
        let row = s.ledger_row(&rid).await;
        assert_eq!(row.api, "messages");
        assert!(row.completion_tokens > 0);
    }
    // Streams.
    for model in ["mock/echo", "up/stream"] {
        let rid = new_request_id();
        let body = json!({
            "model": model, "max_tokens": 50, "stream": true,
            "messages": [{"role": "user", "content": "alpha beta gamma"}],
        })
        .to_string();
        let resp = post(&s, "/v1/messages", &body, &rid, &[]).await;
        assert_eq!(resp.status(), 200);
        assert_sse_head(&resp, &format!("Messages translated stream {model}"));
        let ev = events(&resp.text().await.unwrap());
        let names: Vec<&str> = ev.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            &names[..3],
            ["message_start", "ping", "content_block_start"],
            "{model}"
        );
        assert_eq!(
            &names[names.len() - 3..],
            ["content_block_stop", "message_delta", "message_stop"],
            "{model}"
        );
        assert!(names[3..names.len() - 3]
            .iter()
            .all(|n| *n == "content_block_delta"));
        let text: String = ev
            .iter()
            .filter_map(|(_, d)| d["delta"]["text"].as_str())
            .collect();
        if model == "up/stream" {
            assert_eq!(text, upstream::STREAM_CHUNKS.concat());
        } else {
            assert!(text.starts_with("alpha"), "{text}");
        }
        assert!(ev
            .iter()
            .all(|(_, d)| d.get("index").is_none() || d["index"] == 0));
        let delta = &ev[ev.len() - 2].1;
        assert_eq!(delta["delta"]["stop_reason"], "end_turn");
        assert!(delta["usage"]["output_tokens"].as_u64().unwrap() > 0);
        let row = s.ledger_row(&rid).await;
        assert_eq!(row.api, "messages");
        assert!(row.stream);
    }
    s.assert_delta_now(
        &before,
        AVAILABILITY,
        &messages_avail("success", "success"),
        4.0,
    )
    .await;
}

/// An alias whose first target is Anthropic (overloaded: falls back) and second OpenAI: the
/// second attempt is translated, whole and streamed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mixed_chain_falls_back_from_passthrough_to_translation() {
    let (s, up) = start().await;
    // The first target passes through (before `claude` is marked unhealthy below).
    let rid = new_request_id();
    let body = json!({"model": "claude_first", "max_tokens": 5,
        "messages": [{"role": "user", "content": "hi"}]})
    .to_string();
    let resp = post(&s, "/v1/messages", &body, &rid, &[]).await;
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["model"], "claude/claude-ok");
    assert!(v["id"].as_str().unwrap().starts_with("msg_test_"));
    for stream in [false, true] {
        let rid = new_request_id();
        let body = json!({
            "model": "mixed", "max_tokens": 50, "stream": stream,
            "messages": [{"role": "user", "content": format!("hi {rid}")}],
        })
        .to_string();
        let resp = post(&s, "/v1/messages", &body, &rid, &[]).await;
        assert_eq!(resp.status(), 200);
        let text = resp.text().await.unwrap();
        if stream {
            let ev = events(&text);
            assert_eq!(ev[0].1["message"]["model"], "up/ok");
            assert_eq!(ev.last().unwrap().0, "message_stop");
        } else {
            let v: Value = serde_json::from_str(&text).unwrap();
            assert_eq!(v["model"], "up/ok");
            assert_eq!(v["content"][0]["text"], upstream::OK_CONTENT);
        }
        assert_eq!(up.find_all("claude-overloaded", &rid).len(), 1);
        let row = s.ledger_row(&rid).await;
        assert_eq!(row.resolved_model.as_deref(), Some("up/ok"));
        assert_eq!(row.api, "messages");
    }
}

/// Caller mistakes get Anthropic error bodies with the Reason table's statuses, never a 5xx,
/// and count as `excluded` with `api="messages"`; `Authorization: Bearer` works as well.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_in_anthropic_shape() {
    let (s, _up) = start().await;
    let before = s.metrics().await;
    let user = json!([{"role": "user", "content": "hi"}]);
    let rid = new_request_id();
    expect_anthropic_error(
        post(&s, "/v1/messages", "{not json", &rid, &[]).await,
        400,
        "invalid_request_error",
    )
    .await;
    let no_cap = json!({"model": "mock/echo", "messages": user}).to_string();
    let v = expect_anthropic_error(
        post(&s, "/v1/messages", &no_cap, &rid, &[]).await,
        400,
        "invalid_request_error",
    )
    .await;
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("max_tokens"));
    let unknown = json!({"model": "nope/none", "max_tokens": 5, "messages": user}).to_string();
    expect_anthropic_error(
        post(&s, "/v1/messages", &unknown, &rid, &[]).await,
        404,
        "not_found_error",
    )
    .await;
    let good = json!({"model": "mock/echo", "max_tokens": 5, "messages": user}).to_string();
    let resp = s
        .client
        .post(s.url("/v1/messages"))
        .header("x-api-key", "tg-wrong")
        .body(good.clone())
        .send()
        .await
        .unwrap();
    expect_anthropic_error(resp, 401, "authentication_error").await;
    // A caller's 4xx at the upstream is a 400, never a 5xx.
    let invalid =
        json!({"model": "claude/claude-invalid", "max_tokens": 5, "messages": user}).to_string();
    expect_anthropic_error(
        post(&s, "/v1/messages", &invalid, &rid, &[]).await,
        400,
        "invalid_request_error",
    )
    .await;
    // An upstream outage is overloaded_error.
    let overloaded =
        json!({"model": "claude/claude-overloaded", "max_tokens": 5, "messages": user}).to_string();
    expect_anthropic_error(
        post(&s, "/v1/messages", &overloaded, &rid, &[]).await,
        502,
        "overloaded_error",
    )
    .await;
    let resp = s
        .client
        .post(s.url("/v1/messages"))
        .bearer_auth(ALICE_KEY)
        .body(good)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    for reason in [
        "invalid_request",
        "model_not_found",
        "auth_rejected",
        "upstream_rejected",
    ] {
        let n = if reason == "invalid_request" {
            2.0
        } else {
            1.0
        };
        let labels = [
            ("api", "messages"),
            ("outcome", "excluded"),
            ("reason", reason),
        ];
        s.assert_delta_now(&before, AVAILABILITY, &labels, n).await;
    }
    s.assert_delta_now(
        &before,
        AVAILABILITY,
        &[
            ("api", "messages"),
            ("outcome", "failure"),
            ("reason", "upstream_error"),
        ],
        1.0,
    )
    .await;
    s.assert_delta_now(&before, AVAILABILITY, &[("api", "chat_completions")], 0.0)
        .await;
}

/// count_tokens: forwarded natively to an Anthropic upstream, estimated for other kinds, with
/// the same auth, and no availability count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn count_tokens_native_and_estimated() {
    let (s, up) = start().await;
    let before = s.metrics().await;
    let rid = new_request_id();
    let body = json!({"model": "claude/claude-ok",
        "messages": [{"role": "user", "content": format!("count {rid}")}]})
    .to_string();
    let resp = post(
        &s,
        "/v1/messages/count_tokens",
        &body,
        &rid,
        &[("anthropic-beta", "b-9")],
    )
    .await;
    assert_eq!(resp.status(), 200);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v, json!({"input_tokens": fake::COUNT_TOKENS}));
    let ex = up
        .exchanges()
        .into_iter()
        .find(|e| e.path == "/v1/messages/count_tokens")
        .expect("forwarded");
    assert_eq!(
        String::from_utf8_lossy(&ex.raw),
        body.replacen("claude/claude-ok", "claude-ok", 1)
    );
    assert_eq!(
        ex.header("anthropic-beta").as_deref(),
        Some(format!("b-9,{PROVIDER_BETA}").as_str())
    );
    let text = "a".repeat(400);
    let body =
        json!({"model": "mock/echo", "messages": [{"role": "user", "content": text}]}).to_string();
    let v: Value = post(&s, "/v1/messages/count_tokens", &body, &rid, &[])
        .await
        .json()
        .await
        .unwrap();
    // The reservation's estimate: about four characters a token, plus a little per message.
    assert_eq!(v["input_tokens"], 101);
    let resp = s
        .client
        .post(s.url("/v1/messages/count_tokens"))
        .header("x-api-key", "tg-wrong")
        .body(body)
        .send()
        .await
        .unwrap();
    expect_anthropic_error(resp, 401, "authentication_error").await;
    s.assert_delta_now(&before, AVAILABILITY, &[], 0.0).await;
}

/// The unmodified Anthropic Python SDK against tollgate's `/v1/messages`, for a Claude model
/// (passed through) and for mock and OpenAI models (translated): whole and streamed, with a
/// tool, with thinking, errors as the SDK's typed exceptions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anthropic_sdk_against_tollgate() {
    let Some(python) = python("Anthropic Python SDK (tollgate /v1/messages)") else {
        return;
    };
    let (s, up) = start().await;
    let expect = json!({
        "ok_text": fake::OK_TEXT,
        "tool_id": fake::TOOL_ID,
        "tool_input": fake::tool_input(),
        "tool_answer": fake::TOOL_ANSWER,
        "thinking": fake::thinking_text(),
        "thinking_signature": fake::THINKING_SIGNATURE,
        "thinking_answer": fake::THINKING_ANSWER,
        "openai_text": upstream::OK_CONTENT,
        "stream_text": upstream::STREAM_CHUNKS.concat(),
    });
    let out = run_script(
        python,
        "anthropic_sdk_messages_check.py",
        vec![s.url(""), ALICE_KEY.to_string(), expect.to_string()],
    )
    .await;
    assert!(out.contains(" passed, 0 failed"), "{out}");
    assert!(up.refused().is_empty(), "{:?}", up.refused());
}

/// One event of a stream's shape: its name, block index, and block or delta type.
type ShapeItem = (String, Option<u64>, Option<String>);

/// The shape of an Anthropic event stream: each event's name, block index and block or delta
/// type (pings left out, runs of one delta kind counted once), and the final stop reason.
fn stream_shape(text: &str) -> (Vec<ShapeItem>, Value) {
    let mut shape: Vec<ShapeItem> = Vec::new();
    let mut stop = Value::Null;
    for (name, data) in events(text) {
        if name == "ping" {
            continue;
        }
        if name == "message_delta" {
            stop = data["delta"]["stop_reason"].clone();
        }
        let kind = match name.as_str() {
            "content_block_start" => data["content_block"]["type"].as_str(),
            "content_block_delta" => data["delta"]["type"].as_str(),
            _ => None,
        }
        .map(str::to_string);
        let item = (name, data["index"].as_u64(), kind);
        if item.0 == "content_block_delta" && shape.last() == Some(&item) {
            continue;
        }
        shape.push(item);
    }
    (shape, stop)
}

/// A stream translated from an OpenAI upstream has the shape of the real Messages API's
/// (recorded in `tests/fixtures/anthropic/`): the same events, block indexes, block and delta
/// types in the same order, and the same stop reason; for text, and for text then two tool
/// calls with streamed arguments.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn translated_streams_have_the_real_apis_shape() {
    let (s, _up) = start().await;
    for (model, fixture) in [("up/stream", "text.sse"), ("up/tools", "tool_use.sse")] {
        let body = json!({"model": model, "max_tokens": 64, "stream": true,
            "messages": [{"role": "user", "content": "weather and time in Paris?"}]});
        let resp = post(
            &s,
            "/v1/messages",
            &body.to_string(),
            &new_request_id(),
            &[],
        )
        .await;
        assert_eq!(resp.status(), 200, "{model}");
        let got = stream_shape(&resp.text().await.unwrap());
        let recorded = std::fs::read_to_string(format!(
            "{}/tests/fixtures/anthropic/{fixture}",
            env!("CARGO_MANIFEST_DIR")
        ))
        .expect("fixture");
        assert_eq!(got, stream_shape(&recorded), "{model} against {fixture}");
    }
}
