//! The `anthropic` provider kind: tollgate speaks the Anthropic Messages API upstream (docs/architecture.md,
//! Providers) to a fake of it ([`common::anthropic_upstream`]) that speaks the real wire and
//! refuses what the real API refuses.
//!
//! The first two tests check the fake itself (against the official `anthropic` Python SDK and
//! against the real API's validation rules); the rest go through the gateway: OpenAI callers
//! (the unmodified `openai` SDK and raw HTTP) and gRPC reach Claude models, with tools, thinking,
//! usage and prompt-cache pricing, key pools, fallback and provider health.

use serde_json::{json, Value};
use tollgate::proto::{self, CompleteRequest};

use crate::common::anthropic_upstream::{self as fake, AnthropicUpstream, Exchange};
use crate::common::*;

/// Prices of `claude/claude-ok` (USD per million tokens): one token costs an exact number of
/// micro-dollars.
const CLAUDE_IN: i64 = 3000;
const CLAUDE_CACHED: i64 = 300;
const CLAUDE_OUT: i64 = 15000;

/// `TOLLGATE_PYTHON`, or `None` (after a notice) when it is unset outside CI.
pub(crate) fn python(what: &str) -> Option<String> {
    match std::env::var("TOLLGATE_PYTHON") {
        Ok(p) if !p.trim().is_empty() => Some(p),
        _ => {
            if std::env::var("CI").map(|v| !v.is_empty()).unwrap_or(false) {
                panic!("TOLLGATE_PYTHON is not set but CI is: the {what} test must run in CI");
            }
            eprintln!("SKIPPED: TOLLGATE_PYTHON is not set; {what} test not run");
            None
        }
    }
}

/// Runs `script` (under tests/sdk/) with `args`; fails the test with its output unless it passed.
pub(crate) async fn run_script(python: String, script: &str, args: Vec<String>) -> String {
    let path = format!("{}/tests/sdk/{script}", env!("CARGO_MANIFEST_DIR"));
    assert!(std::path::Path::new(&path).exists(), "{path} is missing");
    let out = blocking(move || {
        std::process::Command::new(&python)
            .arg(&path)
            .args(&args)
            .output()
            .expect("run the SDK check")
    })
    .await;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{script} failed ({}):\nstdout:\n{stdout}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

fn usage_json(u: fake::Usage) -> Value {
    json!({"input": u.input, "output": u.output, "cache_read": u.cache_read, "cache_creation": u.cache_creation})
}

// =============================================================================================
// The fake itself

/// The official `anthropic` Python SDK parses everything the fake says: text, streamed text,
/// tool use (streamed as input_json_delta pieces) and the tool-result turn built from it,
/// thinking with its signature, usage with cache tokens, stop reasons, error bodies with
/// request ids, `retry-after`, and an `error` event mid-stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fake_speaks_the_wire_the_anthropic_sdk_parses() {
    let Some(python) = python("Anthropic Python SDK (fake Messages API)") else {
        return;
    };
    let up = AnthropicUpstream::start().await;
    let expect = json!({
        "ok_text": fake::OK_TEXT,
        "ok_pieces": fake::OK_PIECES,
        "ok_usage": usage_json(fake::OK_USAGE),
        "tool_id": fake::TOOL_ID,
        "tool_preamble": fake::TOOL_PREAMBLE,
        "tool_input": fake::tool_input(),
        "tools_usage": usage_json(fake::TOOLS_USAGE),
        "tool_answer": fake::TOOL_ANSWER,
        "thinking": fake::thinking_text(),
        "thinking_signature": fake::THINKING_SIGNATURE,
        "thinking_answer": fake::THINKING_ANSWER,
        "max_text": fake::MAX_TEXT,
        "invalid_message": fake::INVALID_MESSAGE,
        "midstream_text": fake::MIDSTREAM_TEXT,
    });
    let out = run_script(
        python,
        "anthropic_sdk_fake_check.py",
        vec![up.base_url(), expect.to_string()],
    )
    .await;
    assert!(out.contains("8 passed, 0 failed"), "{out}");

    // What the SDK sent, as the fake recorded it.
    let first = &up.exchanges()[0];
    assert_eq!(first.path, "/v1/messages");
    let key = first.header("x-api-key").or(first.header("authorization"));
    assert!(
        key.is_some_and(|k| k.ends_with(fake::GOOD_KEY)),
        "{first:?}"
    );
    assert!(first.header("anthropic-version").is_some(), "{first:?}");
    assert_eq!(first.body["system"], "You are a test.");
    let refused: Vec<_> = up.refused().into_iter().map(|e| e.error).collect();
    assert_eq!(
        refused.len(),
        1,
        "only the deliberately bad tool_result is refused: {refused:?}"
    );
}

/// Posts `body` to the fake with a good key and the default version; the status and the
/// `error.message` (empty on success).
async fn post_fake(up: &AnthropicUpstream, body: &Value) -> (u16, String) {
    let resp = http_client()
        .post(format!("{}/v1/messages", up.base_url()))
        .header("x-api-key", fake::GOOD_KEY)
        .header("anthropic-version", fake::VERSION)
        .json(body)
        .send()
        .await
        .expect("POST the fake");
    let status = resp.status().as_u16();
    let v: Value = resp.json().await.expect("JSON answer");
    if status != 200 {
        assert_eq!(v["type"], "error", "{v}");
    }
    (
        status,
        v.pointer("/error/message")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned(),
    )
}

/// The fake refuses with 400 `invalid_request_error` what the real API refuses (so a
/// translation mistake in tollgate cannot pass unnoticed), and accepts a well-formed
/// multi-turn tool conversation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fake_refuses_what_the_real_api_refuses() {
    let up = AnthropicUpstream::start().await;
    let user = json!({"role": "user", "content": "hi"});
    let tool_use = json!({"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Oslo"}});
    let tool_result = json!({"type": "tool_result", "tool_use_id": "toolu_1", "content": "7"});
    let base =
        |messages: Value| json!({"model": "claude-ok", "max_tokens": 64, "messages": messages});
    let good_turns = json!([
        user,
        {"role": "assistant", "content": [tool_use]},
        {"role": "user", "content": [tool_result]},
    ]);
    assert_eq!(post_fake(&up, &base(good_turns.clone())).await.0, 200);

    let mut cases: Vec<(&str, Value, &str)> = vec![
        (
            "no max_tokens",
            json!({"model": "claude-ok", "messages": [user]}),
            "max_tokens: Field required",
        ),
        ("empty messages", base(json!([])), "at least one message"),
        (
            "system role",
            base(json!([{"role": "system", "content": "x"}, user])),
            "messages.0.role",
        ),
        (
            "first not user",
            base(json!([{"role": "assistant", "content": "x"}, user])),
            "first message",
        ),
        (
            "empty text block",
            base(json!([{"role": "user", "content": [{"type": "text", "text": ""}]}])),
            "non-empty",
        ),
        (
            "tool_use input not an object",
            base(
                json!([user, {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "f", "input": "{\"city\":\"Oslo\"}"}]}]),
            ),
            "tool_use.input",
        ),
        (
            "tool_result without tool_use",
            base(
                json!([user, {"role": "assistant", "content": "ok"}, {"role": "user", "content": [tool_result]}]),
            ),
            "unexpected `tool_use_id`",
        ),
        (
            "tool_use without tool_result",
            base(json!([user, {"role": "assistant", "content": [tool_use]}, user])),
            "without `tool_result`",
        ),
        (
            "OpenAI tool shape",
            json!({"model": "claude-ok", "max_tokens": 64, "messages": [user], "tools": [{"type": "function", "function": {"name": "f"}}]}),
            "tools.0",
        ),
        (
            "OpenAI-only field",
            json!({"model": "claude-ok", "max_tokens": 64, "messages": [user], "stream_options": {"include_usage": true}}),
            "stream_options: Extra inputs",
        ),
        (
            "temperature above 1",
            json!({"model": "claude-ok", "max_tokens": 64, "messages": [user], "temperature": 1.5}),
            "temperature",
        ),
        (
            "OpenAI image part",
            base(
                json!([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
            ),
            "image_url",
        ),
    ];
    let mut wrong_id = good_turns.clone();
    wrong_id[2]["content"][0]["tool_use_id"] = json!("toolu_other");
    cases.push((
        "tool_result with a wrong id",
        base(wrong_id),
        "unexpected `tool_use_id`",
    ));
    for (what, body, want) in cases {
        let (status, message) = post_fake(&up, &body).await;
        assert_eq!(status, 400, "{what}: {message}");
        assert!(
            message.contains(want),
            "{what}: {message:?} should mention {want:?}"
        );
    }

    // Headers: no version, no key, a bad key, a rate-limited key.
    let post = |key: Option<&str>, version: Option<&str>| {
        let mut rb = http_client()
            .post(format!("{}/v1/messages", up.base_url()))
            .json(&base(json!([user])));
        if let Some(k) = key {
            rb = rb.header("x-api-key", k);
        }
        if let Some(v) = version {
            rb = rb.header("anthropic-version", v);
        }
        rb.send()
    };
    let r = post(Some(fake::GOOD_KEY), None).await.unwrap();
    assert_eq!(r.status(), 400, "no anthropic-version");
    assert!(r.headers().contains_key("request-id"));
    assert_eq!(post(None, Some(fake::VERSION)).await.unwrap().status(), 401);
    assert_eq!(
        post(Some("sk-ant-nope"), Some(fake::VERSION))
            .await
            .unwrap()
            .status(),
        401
    );
    let r = post(Some("sk-ant-rate-limited-9"), Some(fake::VERSION))
        .await
        .unwrap();
    assert_eq!(r.status(), 429);
    assert_eq!(r.headers()["retry-after"], "60");
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["type"], "rate_limit_error", "{v}");
}

// =============================================================================================
// Through the gateway

/// `[pricing."claude/claude-ok"]` with a cached-input price.
fn claude_pricing() -> String {
    format!(
        "[pricing.\"claude/claude-ok\"]\ninput_usd_per_mtok = {CLAUDE_IN}.0\n\
         cached_input_usd_per_mtok = {CLAUDE_CACHED}.0\noutput_usd_per_mtok = {CLAUDE_OUT}.0\n\n"
    )
}

/// The cost of one `claude-ok` answer in micro-dollars: uncached input (plain input and cache
/// writes) at the input price, cache reads at the cached price, output at the output price.
fn ok_cost_micros() -> i64 {
    let u = fake::OK_USAGE;
    (u.input + u.cache_creation) as i64 * CLAUDE_IN
        + u.cache_read as i64 * CLAUDE_CACHED
        + u.output as i64 * CLAUDE_OUT
}

/// A gateway whose `[providers.claude]` (key [`fake::GOOD_KEY`]) is a fresh fake, with
/// `claude/claude-ok` priced and the tables `more` writes for that fake appended.
async fn start(more: impl FnOnce(&AnthropicUpstream) -> String) -> (TestServer, AnthropicUpstream) {
    let up = AnthropicUpstream::start().await;
    let extra = format!(
        "{}{}{}",
        up.provider_toml("claude", &[fake::GOOD_KEY]),
        claude_pricing(),
        more(&up)
    );
    let s = TestServer::sqlite(Opts {
        extra,
        ..Opts::default()
    })
    .await;
    (s, up)
}

/// `system` as text, whether tollgate sent a string or text blocks.
fn system_text(body: &Value) -> String {
    match &body["system"] {
        Value::String(s) => s.clone(),
        Value::Array(blocks) => blocks.iter().filter_map(|b| b["text"].as_str()).collect(),
        _ => String::new(),
    }
}

/// The one request the fake got for `model` with `marker`, which it must have accepted, sent
/// as the Messages API wants it: pool key in `x-api-key`, the version header, the system prompt
/// top-level, `max_tokens` always, the caller's own credential nowhere.
fn claude_request(up: &AnthropicUpstream, model: &str, marker: &str) -> Exchange {
    let all = up.find_all(model, marker);
    assert_eq!(all.len(), 1, "one request for {model} {marker}: {all:#?}");
    let ex = all.into_iter().next().unwrap();
    assert_eq!(
        ex.status, 200,
        "the fake refused tollgate's request: {:?}\n{:#}",
        ex.error, ex.body
    );
    assert_eq!(ex.path, "/v1/messages");
    assert_eq!(ex.header("x-api-key").as_deref(), Some(fake::GOOD_KEY));
    assert_eq!(
        ex.header("anthropic-version").as_deref(),
        Some(fake::VERSION)
    );
    assert!(
        !format!("{:?}", ex.headers).contains(ALICE_KEY),
        "the caller's credential must not reach the upstream: {:?}",
        ex.headers
    );
    ex
}

fn chunks_of(events: &[String]) -> Vec<Value> {
    events
        .iter()
        .filter(|e| e.as_str() != "[DONE]")
        .map(|e| serde_json::from_str(e).unwrap_or_else(|err| panic!("not JSON ({err}): {e}")))
        .collect()
}

fn delta_text(chunks: &[Value], field: &str) -> String {
    chunks
        .iter()
        .filter_map(|c| {
            c.pointer(&format!("/choices/0/delta/{field}"))
                .and_then(Value::as_str)
        })
        .collect()
}

fn finish_reasons(chunks: &[Value]) -> Vec<String> {
    chunks
        .iter()
        .filter_map(|c| {
            c.pointer("/choices/0/finish_reason")
                .and_then(Value::as_str)
        })
        .map(str::to_owned)
        .collect()
}

/// Streams `body` (with `stream: true` added) as alice: the chunks, after checking that the
/// stream ended cleanly with `[DONE]`.
async fn stream_chunks(s: &TestServer, mut body: Value, rid: &str) -> Vec<Value> {
    body["stream"] = json!(true);
    let resp = s.chat(&body, Some(rid)).await;
    assert_eq!(
        resp.status(),
        200,
        "{}",
        resp.text().await.unwrap_or_default()
    );
    let (events, end) = SseReader::new(resp).collect().await;
    assert_eq!(end, SseEvent::End, "{events:?}");
    assert_eq!(
        events.last().map(String::as_str),
        Some("[DONE]"),
        "{events:?}"
    );
    chunks_of(&events)
}

async fn ok_json(resp: reqwest::Response) -> Value {
    let status = resp.status();
    let text = resp.text().await.unwrap_or_default();
    assert_eq!(status, 200, "{text}");
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

/// A non-streamed chat completion to `claude/claude-ok` with a system message and no
/// `max_tokens`: the content, `finish_reason: stop`, usage (prompt = input + cache reads + cache
/// writes = 19, cached 4, completion 9), the resolved model, the ledger row with its exact cost
/// (cache reads at the cached price) and the spend; the fake got the system prompt top-level,
/// `max_tokens` = the provider's `default_max_tokens` and only user/assistant messages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_completion_reaches_claude() {
    let (mut s, up) = start(|_| String::new()).await;
    let before = s.metrics().await;
    let rid = new_request_id();
    let resp = s
        .chat(&chat_body("claude/claude-ok", &rid), Some(&rid))
        .await;
    let resolved = resp
        .headers()
        .get("x-tollgate-resolved-model")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body = ok_json(resp).await;
    assert_eq!(resolved.as_deref(), Some("claude/claude-ok"));
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(body["model"], "claude/claude-ok");
    assert_eq!(body["choices"][0]["message"]["role"], "assistant");
    assert_eq!(body["choices"][0]["message"]["content"], fake::OK_TEXT);
    assert_eq!(body["choices"][0]["finish_reason"], "stop");
    let u = fake::OK_USAGE;
    let (prompt, completion) = (u.prompt_total() as i64, u.output as i64);
    assert_eq!((prompt, completion), (19, 9));
    assert_eq!(body["usage"]["prompt_tokens"], prompt, "{body}");
    assert_eq!(body["usage"]["completion_tokens"], completion, "{body}");
    assert_eq!(body["usage"]["total_tokens"], prompt + completion, "{body}");
    assert_eq!(
        body["usage"]["prompt_tokens_details"]["cached_tokens"], u.cache_read,
        "{body}"
    );

    let ex = claude_request(&up, "claude-ok", &rid);
    assert_eq!(system_text(&ex.body), "You are a test.", "{:#}", ex.body);
    assert_eq!(ex.body["max_tokens"], 1024, "{:#}", ex.body);
    assert_ne!(ex.body["stream"], true);
    let roles: Vec<&str> = ex.body["messages"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|m| m["role"].as_str())
        .collect();
    assert_eq!(roles, ["user"], "{:#}", ex.body);

    let row = s.ledger_row(&rid).await;
    assert_eq!(row.resolved_model.as_deref(), Some("claude/claude-ok"));
    assert_eq!(
        (row.outcome.as_str(), row.reason.as_str()),
        ("success", "success")
    );
    assert_eq!(
        (row.prompt_tokens, row.completion_tokens),
        (prompt, completion)
    );
    assert_eq!(row.cost_micros, ok_cost_micros(), "{row:?}");
    assert!(!row.stream);
    s.expect_delta(
        &before,
        "tollgate_spend_usd_total",
        &[("model", "claude/claude-ok")],
        ok_cost_micros() as f64 / 1e6,
    )
    .await;
    s.expect_delta(
        &before,
        AVAILABILITY,
        &avail("http", "success", "success", "claude/claude-ok"),
        1.0,
    )
    .await;
    s.assert_delta_now(&before, AVAILABILITY, &[], 1.0).await;
    s.shutdown().await;
}

/// The same streamed: the text deltas in order, one `finish_reason: stop`, every chunk naming
/// `claude/claude-ok`, the usage chunk last when asked for (and none when not), the ledger row
/// with the tokens either way; the fake got `stream: true` and no OpenAI-only field.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_reaches_claude() {
    let (mut s, up) = start(|_| String::new()).await;
    let u = fake::OK_USAGE;
    let (prompt, completion) = (u.prompt_total() as i64, u.output as i64);

    let rid = new_request_id();
    let mut body = chat_body("claude/claude-ok", &rid);
    body["stream_options"] = json!({"include_usage": true});
    let chunks = stream_chunks(&s, body, &rid).await;
    assert_eq!(delta_text(&chunks, "content"), fake::OK_TEXT);
    assert!(
        chunks
            .iter()
            .filter(|c| {
                c.pointer("/choices/0/delta/content")
                    .and_then(Value::as_str)
                    .is_some_and(|t| !t.is_empty())
            })
            .count()
            >= fake::OK_PIECES.len(),
        "{chunks:#?}"
    );
    assert_eq!(finish_reasons(&chunks), ["stop"]);
    assert!(
        chunks.iter().all(|c| c["model"] == "claude/claude-ok"),
        "{chunks:#?}"
    );
    let last = chunks.last().unwrap();
    assert_eq!(last["choices"], json!([]), "{last}");
    assert_eq!(last["usage"]["prompt_tokens"], prompt, "{last}");
    assert_eq!(last["usage"]["completion_tokens"], completion, "{last}");
    let with_usage = chunks.iter().filter(|c| !c["usage"].is_null()).count();
    assert_eq!(with_usage, 1, "{chunks:#?}");
    let ex = claude_request(&up, "claude-ok", &rid);
    assert_eq!(ex.body["stream"], true);
    assert_eq!(system_text(&ex.body), "You are a test.");
    let row = s.ledger_row(&rid).await;
    assert!(row.stream);
    assert_eq!(
        (row.prompt_tokens, row.completion_tokens),
        (prompt, completion)
    );
    assert_eq!(row.cost_micros, ok_cost_micros());

    let rid2 = new_request_id();
    let chunks = stream_chunks(&s, chat_body("claude/claude-ok", &rid2), &rid2).await;
    assert_eq!(delta_text(&chunks, "content"), fake::OK_TEXT);
    assert!(
        chunks
            .iter()
            .all(|c| c["usage"].is_null() && c["choices"] != json!([])),
        "no usage chunk unless asked: {chunks:#?}"
    );
    claude_request(&up, "claude-ok", &rid2);
    let row = s.ledger_row(&rid2).await;
    assert_eq!(
        (row.prompt_tokens, row.completion_tokens),
        (prompt, completion)
    );
    s.shutdown().await;
}

/// `max_tokens` is always sent: the caller's (`max_tokens` or `max_completion_tokens`), else
/// the model's `model_max_tokens`, else the provider's `default_max_tokens`. Anthropic's
/// `max_tokens` stop reason comes back as `finish_reason: length`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_tokens_always_sent_and_length_stop() {
    let (mut s, up) = start(|_| String::new()).await;
    // model_max_tokens belongs in the provider's table, so this test writes its own provider.
    let (mut s2, up2) = {
        let up2 = AnthropicUpstream::start().await;
        let extra = up2.provider_toml("claude", &[fake::GOOD_KEY]).replace(
            "default_max_tokens = 1024\n",
            "default_max_tokens = 1024\nmodel_max_tokens = { \"claude-ok-big\" = 8192 }\n",
        );
        let s2 = TestServer::sqlite(Opts {
            extra,
            ..Opts::default()
        })
        .await;
        (s2, up2)
    };
    for (field, value) in [("max_tokens", 77), ("max_completion_tokens", 55)] {
        let rid = new_request_id();
        let mut body = chat_body("claude/claude-ok", &rid);
        body[field] = json!(value);
        ok_json(s.chat(&body, Some(&rid)).await).await;
        let ex = claude_request(&up, "claude-ok", &rid);
        assert_eq!(ex.body["max_tokens"], value, "{field}: {:#}", ex.body);
    }
    for (model, want) in [("claude-ok-big", 8192), ("claude-ok", 1024)] {
        let rid = new_request_id();
        ok_json(
            s2.chat(&chat_body(&format!("claude/{model}"), &rid), Some(&rid))
                .await,
        )
        .await;
        let ex = claude_request(&up2, model, &rid);
        assert_eq!(ex.body["max_tokens"], want, "{model}: {:#}", ex.body);
    }

    let rid = new_request_id();
    let body = ok_json(
        s.chat(&chat_body("claude/claude-max", &rid), Some(&rid))
            .await,
    )
    .await;
    assert_eq!(body["choices"][0]["message"]["content"], fake::MAX_TEXT);
    assert_eq!(body["choices"][0]["finish_reason"], "length", "{body}");
    let rid = new_request_id();
    let chunks = stream_chunks(&s, chat_body("claude/claude-max", &rid), &rid).await;
    assert_eq!(finish_reasons(&chunks), ["length"]);
    s.shutdown().await;
    s2.shutdown().await;
}

fn weather_tool() -> Value {
    json!({
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The current weather in a city.",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"type": "string"}}, "required": ["city"]}
        }
    })
}

/// Tools both ways with `claude/claude-tools`: the OpenAI tool definition reaches the fake as
/// an Anthropic tool (`input_schema`); `tool_choice` `"auto"` as `{"type": "auto"}` (or left
/// out), `"required"` as `any`, a named function as `tool`, `"none"` as `none`; the answer's
/// `tool_use` comes back as a tool call (`finish_reason: tool_calls`, arguments = the input as
/// JSON), streamed as argument pieces that add up to it; the next turn (assistant tool_calls
/// with null content, then the tool message) reaches the fake as a `tool_use` / `tool_result`
/// pair it accepts, and the answer is the text after the tool.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tool_calls_translate_both_ways() {
    let (mut s, up) = start(|_| String::new()).await;
    let rid = new_request_id();
    let mut body = chat_body("claude/claude-tools", &rid);
    body["tools"] = json!([weather_tool()]);
    body["tool_choice"] = json!("auto");
    let resp = ok_json(s.chat(&body, Some(&rid)).await).await;
    let choice = &resp["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls", "{resp}");
    assert_eq!(choice["message"]["content"], fake::TOOL_PREAMBLE, "{resp}");
    let calls = choice["message"]["tool_calls"]
        .as_array()
        .expect("tool_calls");
    assert_eq!(calls.len(), 1, "{resp}");
    assert_eq!(calls[0]["id"], fake::TOOL_ID);
    assert_eq!(calls[0]["type"], "function");
    assert_eq!(calls[0]["function"]["name"], "get_weather");
    let args: Value = serde_json::from_str(calls[0]["function"]["arguments"].as_str().unwrap())
        .expect("arguments are a JSON string");
    assert_eq!(args, fake::tool_input());

    let ex = claude_request(&up, "claude-tools", &rid);
    let tool = &ex.body["tools"][0];
    assert_eq!(tool["name"], "get_weather", "{:#}", ex.body);
    assert_eq!(tool["description"], "The current weather in a city.");
    assert_eq!(
        tool["input_schema"],
        weather_tool()["function"]["parameters"]
    );
    // "auto" is the Messages API's default, so it may also be left out.
    assert!(
        [json!({"type": "auto"}), Value::Null].contains(&ex.body["tool_choice"]),
        "{:#}",
        ex.body
    );

    // The other tool choices.
    for (choice, want) in [
        (json!("required"), json!({"type": "any"})),
        (
            json!({"type": "function", "function": {"name": "get_weather"}}),
            json!({"type": "tool", "name": "get_weather"}),
        ),
        (json!("none"), json!({"type": "none"})),
    ] {
        let rid = new_request_id();
        let mut body = chat_body("claude/claude-tools", &rid);
        body["tools"] = json!([weather_tool()]);
        body["tool_choice"] = choice.clone();
        ok_json(s.chat(&body, Some(&rid)).await).await;
        let ex = claude_request(&up, "claude-tools", &rid);
        assert_eq!(ex.body["tool_choice"], want, "{choice}: {:#}", ex.body);
    }

    // Streamed: the tool call arrives as an id and name, then argument pieces.
    let rid = new_request_id();
    let mut body = chat_body("claude/claude-tools", &rid);
    body["tools"] = json!([weather_tool()]);
    let chunks = stream_chunks(&s, body, &rid).await;
    assert_eq!(finish_reasons(&chunks), ["tool_calls"]);
    assert_eq!(delta_text(&chunks, "content"), fake::TOOL_PREAMBLE);
    let deltas: Vec<&Value> = chunks
        .iter()
        .filter_map(|c| c.pointer("/choices/0/delta/tool_calls"))
        .flat_map(|t| t.as_array().unwrap())
        .collect();
    assert!(deltas.iter().all(|d| d["index"] == 0), "{deltas:#?}");
    let ids: Vec<&Value> = deltas
        .iter()
        .filter_map(|d| d.get("id"))
        .filter(|i| !i.is_null())
        .collect();
    assert_eq!(
        ids,
        [&json!(fake::TOOL_ID)],
        "the id comes once: {deltas:#?}"
    );
    let pieces: Vec<&str> = deltas
        .iter()
        .filter_map(|d| d.pointer("/function/arguments").and_then(Value::as_str))
        .filter(|a| !a.is_empty())
        .collect();
    assert!(pieces.len() >= 2, "arguments arrive in pieces: {deltas:#?}");
    let args: Value = serde_json::from_str(&pieces.concat()).expect("assembled arguments");
    assert_eq!(args, fake::tool_input());
    claude_request(&up, "claude-tools", &rid);

    // The second turn, non-streamed and streamed.
    for stream in [false, true] {
        let rid = new_request_id();
        let mut body = chat_body("claude/claude-tools", &rid);
        let call = json!({"id": fake::TOOL_ID, "type": "function", "function": {"name": "get_weather", "arguments": fake::tool_input().to_string()}});
        let content = if stream {
            json!(fake::TOOL_PREAMBLE)
        } else {
            Value::Null
        };
        body["messages"].as_array_mut().unwrap().extend([
            json!({"role": "assistant", "content": content, "tool_calls": [call]}),
            json!({"role": "tool", "tool_call_id": fake::TOOL_ID, "content": "7 degrees"}),
        ]);
        body["tools"] = json!([weather_tool()]);
        let text = if stream {
            let chunks = stream_chunks(&s, body, &rid).await;
            assert_eq!(finish_reasons(&chunks), ["stop"]);
            delta_text(&chunks, "content")
        } else {
            let resp = ok_json(s.chat(&body, Some(&rid)).await).await;
            assert_eq!(resp["choices"][0]["finish_reason"], "stop", "{resp}");
            resp["choices"][0]["message"]["content"]
                .as_str()
                .unwrap_or_default()
                .to_owned()
        };
        assert_eq!(text, fake::TOOL_ANSWER, "stream={stream}");
        let ex = claude_request(&up, "claude-tools", &rid);
        let msgs = ex.body["messages"].as_array().unwrap();
        assert_eq!(msgs.len(), 3, "{:#}", ex.body);
        let tool_use = msgs[1]["content"]
            .as_array()
            .and_then(|c| c.iter().find(|b| b["type"] == "tool_use"))
            .unwrap_or_else(|| panic!("no tool_use block: {:#}", ex.body));
        assert_eq!(tool_use["id"], fake::TOOL_ID);
        assert_eq!(tool_use["input"], fake::tool_input());
        let result = &msgs[2]["content"][0];
        assert_eq!(result["type"], "tool_result", "{:#}", ex.body);
        assert_eq!(result["tool_use_id"], fake::TOOL_ID);
    }
    assert!(up.refused().is_empty(), "{:#?}", up.refused());
    s.shutdown().await;
}

/// Thinking with `claude/claude-thinking`: the answer's `reasoning_content` carries the
/// thinking text, the deltas carry it piece by piece when streamed, and `content` is the text.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thinking_becomes_reasoning_content() {
    let (mut s, up) = start(|_| String::new()).await;
    let rid = new_request_id();
    let resp = ok_json(
        s.chat(&chat_body("claude/claude-thinking", &rid), Some(&rid))
            .await,
    )
    .await;
    let msg = &resp["choices"][0]["message"];
    assert_eq!(msg["reasoning_content"], fake::thinking_text(), "{resp}");
    assert_eq!(msg["content"], fake::THINKING_ANSWER, "{resp}");
    assert_eq!(resp["choices"][0]["finish_reason"], "stop");
    claude_request(&up, "claude-thinking", &rid);

    let rid = new_request_id();
    let chunks = stream_chunks(&s, chat_body("claude/claude-thinking", &rid), &rid).await;
    let pieces = chunks
        .iter()
        .filter(|c| {
            c.pointer("/choices/0/delta/reasoning_content")
                .and_then(Value::as_str)
                .is_some_and(|r| !r.is_empty())
        })
        .count();
    assert!(pieces >= 2, "reasoning arrives in pieces: {chunks:#?}");
    assert_eq!(
        delta_text(&chunks, "reasoning_content"),
        fake::thinking_text()
    );
    assert_eq!(delta_text(&chunks, "content"), fake::THINKING_ANSWER);
    assert_eq!(finish_reasons(&chunks), ["stop"]);
    s.shutdown().await;
}

/// One provider's entry of `GET /v1/health`.
async fn health_of(s: &TestServer, provider: &str) -> Value {
    let v = ok_json(s.client.get(s.url("/v1/health")).send().await.unwrap()).await;
    v["providers"]
        .as_array()
        .and_then(|p| p.iter().find(|p| p["provider"] == provider).cloned())
        .unwrap_or_else(|| panic!("provider {provider} missing from /v1/health: {v}"))
}

/// The `/v1/health` view of the key of `provider` whose hint is `...` + its last 4 characters.
async fn key_state(s: &TestServer, provider: &str, key: &str) -> Value {
    let hint = format!("...{}", &key[key.len() - 4..]);
    let p = health_of(s, provider).await;
    p["keys"]
        .as_array()
        .and_then(|k| k.iter().find(|k| k["hint"] == hint.as_str()).cloned())
        .unwrap_or_else(|| panic!("no key {hint} in {p}"))
}

/// Key pools over the Messages API: a 429 (`rate_limit_error`, `retry-after: 60`) cools its
/// key down (`temporary`, reason `rate_limited`) and the request succeeds on the next key; a
/// 401 (`authentication_error`) disables its key (`permanent`, reason `unauthorized`), likewise.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_pool_cools_a_429_key_and_disables_a_401_key() {
    const LIMITED: &str = "sk-ant-rate-limited-1";
    const REVOKED: &str = "sk-ant-revoked-1";
    let (mut s, up) = start(|up| {
        format!(
            "{}{}",
            up.provider_toml("claude_limited", &[LIMITED, fake::GOOD_KEY]),
            up.provider_toml("claude_revoked", &[REVOKED, fake::GOOD_KEY])
        )
    })
    .await;
    for (provider, bad, state, reason) in [
        ("claude_limited", LIMITED, "temporary", "rate_limited"),
        ("claude_revoked", REVOKED, "permanent", "unauthorized"),
    ] {
        let rid = new_request_id();
        let resp = s
            .chat(
                &chat_body(&format!("{provider}/claude-ok"), &rid),
                Some(&rid),
            )
            .await;
        let body = ok_json(resp).await;
        assert_eq!(body["choices"][0]["message"]["content"], fake::OK_TEXT);
        let keys: Vec<String> = up
            .find_all("claude-ok", &rid)
            .iter()
            .filter_map(|e| e.header("x-api-key"))
            .collect();
        assert_eq!(
            keys,
            [bad, fake::GOOD_KEY],
            "{provider}: the keys tried, in order"
        );
        let k = key_state(&s, provider, bad).await;
        assert_eq!(k["state"], state, "{provider}: {k}");
        assert_eq!(k["reason"], reason, "{provider}: {k}");
        assert_eq!(
            key_state(&s, provider, fake::GOOD_KEY).await["state"],
            "valid"
        );
        assert_eq!(s.ledger_row(&rid).await.outcome, "success");
    }
    s.shutdown().await;
}

/// 529 `overloaded_error` is a 5xx: the alias [claude/claude-overloaded, mock/echo] answers from
/// mock (`fallback_total{reason="upstream_5xx"}` +1 per request) and, with
/// `unhealthy_after_failures = 2`, two of them mark `claude` unhealthy (`/v1/health`,
/// `provider_healthy 0`), after which the chain skips it; asked alone it is still tried and
/// fails as `upstream_error` (502).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overloaded_falls_back_and_counts_against_health() {
    let (mut s, up) = start(|_| {
        "[routing]\nunhealthy_after_failures = 2\n\n\
         [aliases.claude_busy]\ndescription = \"overloaded, then mock\"\n\
         chain = [\"claude/claude-overloaded\", \"mock/echo\"]\n\n"
            .into()
    })
    .await;
    let before = s.metrics().await;
    for i in 0..3 {
        let rid = new_request_id();
        let resp = s.chat(&chat_body("claude_busy", &rid), Some(&rid)).await;
        let body = ok_json(resp).await;
        assert_eq!(body["model"], "mock/echo", "request {i}: {body}");
        assert_eq!(
            s.ledger_row(&rid).await.resolved_model.as_deref(),
            Some("mock/echo")
        );
    }
    assert_eq!(
        up.for_model("claude-overloaded").len(),
        2,
        "after two failures the unhealthy provider is skipped"
    );
    s.assert_delta_now(
        &before,
        "tollgate_fallback_total",
        &[
            ("from_model", "claude/claude-overloaded"),
            ("to_model", "mock/echo"),
            ("reason", "upstream_5xx"),
        ],
        2.0,
    )
    .await;
    let h = health_of(&s, "claude").await;
    assert_eq!(h["healthy"], false, "{h}");
    let text = s.metrics().await;
    assert_eq!(
        metric_value(
            &text,
            "tollgate_provider_healthy",
            &[("provider", "claude")]
        ),
        0.0,
        "{}",
        series_dump(&text, "tollgate_provider_healthy")
    );

    let rid = new_request_id();
    let resp = s
        .chat(&chat_body("claude/claude-overloaded", &rid), Some(&rid))
        .await;
    expect_http_error(resp, 502, "upstream_error").await;
    assert_eq!(
        up.for_model("claude-overloaded").len(),
        3,
        "a lone entry is tried anyway"
    );
    assert_eq!(s.ledger_row(&rid).await.reason, "upstream_error");
    s.shutdown().await;
}

/// A 400 `invalid_request_error` is the caller's fault: `upstream_rejected` (400) with the
/// upstream's message, no fallback along [claude/claude-invalid, mock/echo], no health penalty.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_request_is_rejected_without_fallback() {
    let (mut s, up) = start(|_| {
        "[routing]\nunhealthy_after_failures = 1\n\n\
         [aliases.claude_picky]\ndescription = \"invalid, then mock\"\n\
         chain = [\"claude/claude-invalid\", \"mock/echo\"]\n\n"
            .into()
    })
    .await;
    let before = s.metrics().await;
    for model in ["claude/claude-invalid", "claude_picky"] {
        let rid = new_request_id();
        let resp = s.chat(&chat_body(model, &rid), Some(&rid)).await;
        let body = expect_http_error(resp, 400, "upstream_rejected").await;
        let message = body["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains(fake::INVALID_MESSAGE), "{model}: {body}");
        assert_eq!(up.find_all("claude-invalid", &rid).len(), 1);
        let row = s.ledger_row(&rid).await;
        assert_eq!(
            (row.outcome.as_str(), row.reason.as_str()),
            ("excluded", "upstream_rejected")
        );
    }
    s.assert_delta_now(
        &before,
        "tollgate_fallback_total",
        &[("from_model", "claude/claude-invalid")],
        0.0,
    )
    .await;
    assert_eq!(health_of(&s, "claude").await["healthy"], true);
    s.shutdown().await;
}

/// An `error` event after the stream began: the caller got the first delta, then the stream
/// ends with an error event (`upstream_error`) and no `[DONE]`; the request counts as a failure.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn midstream_error_event_ends_the_stream() {
    let (mut s, _up) = start(|_| String::new()).await;
    let before = s.metrics().await;
    let rid = new_request_id();
    let mut body = chat_body("claude/claude-midstream-error", &rid);
    body["stream"] = json!(true);
    let resp = s.chat(&body, Some(&rid)).await;
    assert_eq!(resp.status(), 200);
    let (events, _) = SseReader::new(resp).collect().await;
    assert!(!events.iter().any(|e| e == "[DONE]"), "{events:?}");
    let chunks = chunks_of(&events);
    let (last, rest) = chunks.split_last().expect("events");
    assert_eq!(
        last.pointer("/error/code"),
        Some(&json!("upstream_error")),
        "{events:?}"
    );
    assert_eq!(
        delta_text(rest, "content"),
        fake::MIDSTREAM_TEXT,
        "{events:?}"
    );
    let row = s.ledger_row(&rid).await;
    assert_eq!(
        (row.outcome.as_str(), row.reason.as_str()),
        ("failure", "upstream_error")
    );
    s.expect_delta(
        &before,
        AVAILABILITY,
        &[
            ("protocol", "http"),
            ("outcome", "failure"),
            ("reason", "upstream_error"),
        ],
        1.0,
    )
    .await;
    s.assert_delta_now(&before, AVAILABILITY, &[], 1.0).await;
    s.shutdown().await;
}

/// gRPC `Complete` and `StreamComplete` reach `claude/claude-ok`: content, finish reason,
/// usage and resolved model; the fake got the system prompt top-level.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_complete_and_stream_complete_reach_claude() {
    let (mut s, up) = start(|_| String::new()).await;
    let u = fake::OK_USAGE;
    let want_usage = (
        u.prompt_total() as u32,
        u.output as u32,
        (u.prompt_total() + u.output) as u32,
    );
    let mut client = s.grpc().await;

    let rid = new_request_id();
    let req: CompleteRequest = complete_request("claude/claude-ok", &rid);
    let r = client
        .complete(grpc_request(req, Some(ALICE_KEY), Some(&rid)))
        .await
        .expect("gRPC Complete")
        .into_inner();
    assert_eq!(r.resolved_model, "claude/claude-ok");
    assert_eq!(r.content, fake::OK_TEXT);
    assert_eq!(r.finish_reason, "stop");
    let usage = r.usage.expect("usage");
    assert_eq!(
        (
            usage.prompt_tokens,
            usage.completion_tokens,
            usage.total_tokens
        ),
        want_usage
    );
    let ex = claude_request(&up, "claude-ok", &rid);
    assert_eq!(system_text(&ex.body), "You are a test.");
    assert_eq!(s.ledger_row(&rid).await.cost_micros, ok_cost_micros());

    let rid = new_request_id();
    let mut stream = client
        .stream_complete(grpc_request(
            complete_request("claude/claude-ok", &rid),
            Some(ALICE_KEY),
            Some(&rid),
        ))
        .await
        .expect("gRPC StreamComplete")
        .into_inner();
    let mut chunks = Vec::new();
    while let Some(c) = stream.message().await.expect("stream chunk") {
        chunks.push(c);
    }
    assert!(
        chunks
            .iter()
            .all(|c| c.resolved_model == "claude/claude-ok"),
        "{chunks:?}"
    );
    let text: String = chunks.iter().map(|c| c.delta_content.as_str()).collect();
    assert_eq!(text, fake::OK_TEXT);
    assert!(
        chunks.iter().any(|c| c.finish_reason == "stop"),
        "{chunks:?}"
    );
    let usage = chunks
        .last()
        .and_then(|c| c.usage)
        .expect("the last chunk carries usage");
    assert_eq!(
        (
            usage.prompt_tokens,
            usage.completion_tokens,
            usage.total_tokens
        ),
        want_usage
    );
    assert_eq!(claude_request(&up, "claude-ok", &rid).body["stream"], true);
    s.shutdown().await;
}

/// The unmodified OpenAI Python SDK through tollgate to Claude (script
/// tests/sdk/openai_sdk_anthropic_check.py): completion and stream with a system message and no
/// max_tokens, tool calls (arguments assembled from streamed pieces by the SDK) and the turn
/// after them, thinking as `reasoning_content`. Then the ledger rows and what the fake got.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_sdk_reaches_claude() {
    let Some(python) = python("OpenAI Python SDK (via tollgate to Claude)") else {
        return;
    };
    let (mut s, up) = start(|_| String::new()).await;
    let u = fake::OK_USAGE;
    let prefix = new_request_id();
    let expect = json!({
        "ok_text": fake::OK_TEXT,
        "ok_usage": {"prompt": u.prompt_total(), "completion": u.output},
        "ok_cached": u.cache_read,
        "tool_id": fake::TOOL_ID,
        "tool_preamble": fake::TOOL_PREAMBLE,
        "tool_input": fake::tool_input(),
        "tool_answer": fake::TOOL_ANSWER,
        "thinking": fake::thinking_text(),
        "thinking_answer": fake::THINKING_ANSWER,
    });
    let out = run_script(
        python,
        "openai_sdk_anthropic_check.py",
        vec![
            format!("http://{}/v1", s.http),
            ALICE_KEY.into(),
            prefix.clone(),
            expect.to_string(),
        ],
    )
    .await;
    assert!(out.contains("5 passed, 0 failed"), "{out}");

    for (name, stream) in [("whole", false), ("streamed", true)] {
        let rid = format!("{prefix}-{name}");
        let row = s.ledger_row(&rid).await;
        assert_eq!(
            row.resolved_model.as_deref(),
            Some("claude/claude-ok"),
            "{row:?}"
        );
        assert_eq!(row.stream, stream);
        assert_eq!(
            (row.prompt_tokens, row.completion_tokens),
            (19, 9),
            "{row:?}"
        );
        assert_eq!(row.cost_micros, ok_cost_micros(), "{row:?}");
        let ex = claude_request(&up, "claude-ok", &rid);
        assert_eq!(system_text(&ex.body), "You are a test.", "{:#}", ex.body);
        assert_eq!(ex.body["max_tokens"], 1024);
    }
    for name in [
        "tools-whole",
        "tools-streamed",
        "answer-whole",
        "answer-streamed",
    ] {
        let rid = format!("{prefix}-{name}");
        let row = s.ledger_row(&rid).await;
        assert_eq!(
            row.resolved_model.as_deref(),
            Some("claude/claude-tools"),
            "{row:?}"
        );
        claude_request(&up, "claude-tools", &rid);
    }
    assert!(up.refused().is_empty(), "{:#?}", up.refused());
    s.shutdown().await;
}

/// The typed proto fields (content parts, tools, tool choice, tool calls, tool results) reach
/// Claude without any JSON written by the caller, and the answer's tool calls come back typed,
/// whole and streamed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_typed_tools_reach_claude() {
    let (mut s, up) = start(|_| String::new()).await;
    let mut client = s.grpc().await;
    let tool = proto::Tool {
        name: "get_weather".into(),
        description: Some("The current weather in a city.".into()),
        parameters_json: Some(
            json!({"type": "object", "properties": {"city": {"type": "string"}}}).to_string(),
        ),
    };
    let user = |rid: &str| proto::ChatMessage {
        role: "user".into(),
        parts: vec![
            proto::ContentPart {
                part: Some(proto::content_part::Part::Text(format!("hello {rid}"))),
            },
            proto::ContentPart {
                part: Some(proto::content_part::Part::Image(proto::ImagePart {
                    url: "data:image/png;base64,iVBORw0KGgo=".into(),
                    detail: None,
                })),
            },
        ],
        ..Default::default()
    };
    let first_turn = |rid: &str| CompleteRequest {
        model: "claude/claude-tools".into(),
        messages: vec![user(rid)],
        tools: vec![tool.clone()],
        tool_choice: Some(proto::ToolChoice {
            choice: Some(proto::tool_choice::Choice::Function("get_weather".into())),
        }),
        ..Default::default()
    };

    let rid = new_request_id();
    let r = client
        .complete(grpc_request(first_turn(&rid), Some(ALICE_KEY), Some(&rid)))
        .await
        .expect("gRPC Complete")
        .into_inner();
    assert_eq!(r.finish_reason, "tool_calls", "{r:?}");
    let call = r.tool_calls.first().expect("a typed tool call").clone();
    assert_eq!(
        (call.id.as_str(), call.name.as_str()),
        (fake::TOOL_ID, "get_weather")
    );
    let args: Value = serde_json::from_str(&call.arguments).expect("arguments are JSON");
    assert_eq!(args, fake::tool_input());
    let ex = claude_request(&up, "claude-tools", &rid);
    assert_eq!(ex.body["tools"][0]["name"], "get_weather", "{:#}", ex.body);
    assert_eq!(
        ex.body["tools"][0]["input_schema"]["properties"]["city"]["type"],
        "string"
    );
    assert_eq!(
        ex.body["tool_choice"],
        json!({"type": "tool", "name": "get_weather"})
    );
    let blocks = &ex.body["messages"][0]["content"];
    assert_eq!(blocks[0]["type"], "text", "{blocks:#}");
    assert_eq!(
        blocks[1]["source"],
        json!({"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="})
    );

    // The same turn streamed: the call arrives in pieces, id and name first.
    let rid = new_request_id();
    let mut stream = client
        .stream_complete(grpc_request(first_turn(&rid), Some(ALICE_KEY), Some(&rid)))
        .await
        .expect("gRPC StreamComplete")
        .into_inner();
    let mut pieces = Vec::new();
    while let Some(c) = stream.message().await.expect("stream chunk") {
        pieces.extend(c.tool_calls);
    }
    assert!(
        pieces.len() >= 2,
        "arguments should arrive in pieces: {pieces:?}"
    );
    assert_eq!(pieces[0].id.as_deref(), Some(fake::TOOL_ID));
    assert_eq!(pieces[0].name.as_deref(), Some("get_weather"));
    assert!(pieces.iter().all(|p| p.index == 0), "{pieces:?}");
    let args: String = pieces.iter().map(|p| p.arguments.as_str()).collect();
    assert_eq!(
        serde_json::from_str::<Value>(&args).expect("JSON"),
        fake::tool_input()
    );

    // The second turn: the assistant's typed call and the tool's result.
    let rid = new_request_id();
    let mut req = first_turn(&rid);
    req.tool_choice = None;
    req.messages.push(proto::ChatMessage {
        role: "assistant".into(),
        tool_calls: vec![call.clone()],
        ..Default::default()
    });
    req.messages.push(proto::ChatMessage {
        role: "tool".into(),
        content: "7 degrees".into(),
        tool_call_id: Some(call.id.clone()),
        ..Default::default()
    });
    let r = client
        .complete(grpc_request(req, Some(ALICE_KEY), Some(&rid)))
        .await
        .expect("the second turn")
        .into_inner();
    assert_eq!(r.content, fake::TOOL_ANSWER);
    assert_eq!(r.finish_reason, "stop");
    let ex = claude_request(&up, "claude-tools", &rid);
    let turns = ex.body["messages"].as_array().expect("messages");
    assert_eq!(turns[1]["content"][0]["type"], "tool_use", "{:#}", ex.body);
    assert_eq!(
        turns[2]["content"][0]["type"], "tool_result",
        "{:#}",
        ex.body
    );
    assert_eq!(turns[2]["content"][0]["tool_use_id"], fake::TOOL_ID);
    assert!(up.refused().is_empty(), "{:#?}", up.refused());
    s.shutdown().await;
}
