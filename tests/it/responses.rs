//! `POST /v1/responses`: the OpenAI Responses API in front of every provider kind. To an
//! `openai` model the caller's body passes through to `{base_url}/responses` byte for byte (only
//! `model` changes; `previous_response_id`, `store`, built-in tools pass) and the answer and its
//! events come back byte for byte (only `model` rewritten); to a `mock` or `anthropic` model it
//! is translated through the neutral types into a Response object or the typed Responses
//! events. Ledger rows and the availability counter carry `api = "responses"`; errors are in
//! OpenAI's shape.

use serde_json::{json, Value};

use crate::anthropic::{python, run_script};
use crate::common::anthropic_upstream::{self as fake, AnthropicUpstream};
use crate::common::responses_upstream::{self as resp_fake, ResponsesUpstream};
use crate::common::*;

struct Env {
    s: TestServer,
    claude: AnthropicUpstream,
    gpt: ResponsesUpstream,
}

/// The server with the fake Anthropic API as `claude`, the fake Responses API as `gpt`, and an
/// alias whose first target (OpenAI, answering 500) falls back to Claude (translated).
async fn start_with(backend: Backend) -> Option<Env> {
    let claude = AnthropicUpstream::start().await;
    let gpt = ResponsesUpstream::start().await;
    let extra = format!(
        "{}{}[aliases.gpt_then_claude]\nchain = [\"gpt/gpt-fail500\", \"claude/claude-ok\"]\n\n\
         [pricing.\"gpt/gpt-ok\"]\ninput_usd_per_mtok = 1000.0\n\
         cached_input_usd_per_mtok = 100.0\noutput_usd_per_mtok = 2000.0\n\n",
        claude.provider_toml("claude", &[fake::GOOD_KEY]),
        gpt.provider_toml("gpt"),
    );
    let s = TestServer::start(
        backend,
        Opts {
            extra,
            ..Opts::default()
        },
    )
    .await?;
    Some(Env { s, claude, gpt })
}

async fn start() -> Env {
    start_with(Backend::Sqlite).await.expect("SQLite")
}

async fn post(s: &TestServer, body: &str, rid: &str) -> reqwest::Response {
    s.client
        .post(s.url("/v1/responses"))
        .bearer_auth(ALICE_KEY)
        .header("content-type", "application/json")
        .header("x-request-id", rid)
        .body(body.to_owned())
        .send()
        .await
        .expect("POST /v1/responses")
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

/// Every event is named by its type and numbered 0, 1, 2, ...
fn check_numbering(ev: &[(String, Value)]) {
    for (i, (name, data)) in ev.iter().enumerate() {
        assert_eq!(data["type"], name.as_str(), "{data}");
        assert_eq!(data["sequence_number"], i as u64, "{data}");
    }
}

fn names(ev: &[(String, Value)]) -> Vec<&str> {
    ev.iter().map(|(n, _)| n.as_str()).collect()
}

/// To an OpenAI model the body reaches `/v1/responses` untouched but for `model` (state and
/// built-in tools included) and the Response comes back byte for byte but for `model`; the
/// ledger has the upstream's usage under `api = "responses"`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passthrough_is_byte_exact_but_for_the_model() {
    let env = start().await;
    passthrough_byte_exact(&env).await;
}

/// The same on PostgreSQL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passthrough_is_byte_exact_on_postgres() {
    let Some(env) = start_with(Backend::Postgres).await else {
        return;
    };
    passthrough_byte_exact(&env).await;
}

async fn passthrough_byte_exact(env: &Env) {
    let rid = new_request_id();
    let body = format!(
        r#"{{ "model" :  "gpt/gpt-ok", "input": "hi {rid}",
  "previous_response_id": "resp_earlier", "store": true, "include": ["reasoning.encrypted_content"],
  "tools": [{{"type": "web_search"}}], "x_unknown": 1.50e0 }}"#
    );
    let resp = post(&env.s, &body, &rid).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-tollgate-resolved-model"], "gpt/gpt-ok");
    let text = resp.text().await.unwrap();
    let ex = env
        .gpt
        .exchanges()
        .into_iter()
        .find(|e| String::from_utf8_lossy(&e.body).contains(&rid))
        .expect("the fake got it");
    assert_eq!(ex.path, "/v1/responses");
    // The provider's pool key, never the caller's credential.
    assert_eq!(
        ex.headers["authorization"],
        format!("Bearer {}", resp_fake::GOOD_KEY).as_str()
    );
    assert_eq!(
        String::from_utf8_lossy(&ex.body),
        body.replacen("\"gpt/gpt-ok\"", "\"gpt-ok\"", 1)
    );
    assert_eq!(
        text,
        String::from_utf8_lossy(&ex.answer).replacen("\"gpt-ok\"", "\"gpt/gpt-ok\"", 1)
    );
    let row = env.s.ledger_row(&rid).await;
    assert_eq!(row.api, "responses");
    assert_eq!(row.outcome, "success");
    assert!(!row.stream);
    let (i, _, o) = resp_fake::USAGE;
    assert_eq!(
        (row.prompt_tokens as u64, row.completion_tokens as u64),
        (i, o)
    );
}

/// A streamed pass-through: every event's bytes as sent, `response.model` rewritten; usage from
/// `response.completed`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passthrough_stream_is_byte_exact_and_accounted() {
    let env = start().await;
    let rid = new_request_id();
    let body =
        json!({"model": "gpt/gpt-ok", "input": format!("hi {rid}"), "stream": true}).to_string();
    let resp = post(&env.s, &body, &rid).await;
    assert_eq!(resp.status(), 200);
    assert_sse_head(&resp, "Responses pass-through stream");
    let text = resp.text().await.unwrap();
    let sent = resp_fake::sse_text(&resp_fake::events_for("gpt-ok", false));
    assert_eq!(text, sent.replace("\"gpt-ok\"", "\"gpt/gpt-ok\""));
    let row = env.s.ledger_row(&rid).await;
    assert_eq!(row.api, "responses");
    assert!(row.stream);
    assert_eq!(row.outcome, "success");
    let (i, _, o) = resp_fake::USAGE;
    assert_eq!(
        (row.prompt_tokens as u64, row.completion_tokens as u64),
        (i, o)
    );

    // `response.failed` upstream ends the stream with an `error` event, counted as a failure.
    let rid = new_request_id();
    let body = json!({"model": "gpt/gpt-failed", "input": "x", "stream": true}).to_string();
    let text = post(&env.s, &body, &rid).await.text().await.unwrap();
    let ev = events(&text);
    assert_eq!(
        names(&ev),
        ["response.created", "response.output_text.delta", "error"]
    );
    assert_eq!(ev[2].1["sequence_number"], 2);
    assert_eq!(env.s.ledger_row(&rid).await.reason, "upstream_error");
}

/// To the mock a Response object: a message item with `output_text`, usage, the requested model.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn translated_to_mock() {
    let env = start().await;
    let s = &env.s;
    let rid = new_request_id();
    let body = json!({"model": "mock/echo", "instructions": "Be brief.",
        "input": [{"role": "user", "content": [{"type": "input_text", "text": "one two"}]}],
        "max_output_tokens": 3, "metadata": {"k": "v"}})
    .to_string();
    let resp = post(s, &body, &rid).await;
    assert_eq!(resp.status(), 200);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["object"], "response");
    assert!(v["id"].as_str().unwrap().starts_with("resp_"), "{v}");
    assert_eq!(v["model"], "mock/echo");
    assert_eq!(v["instructions"], "Be brief.");
    assert_eq!(v["metadata"], json!({"k": "v"}));
    assert_eq!(v["output"][0]["type"], "message");
    assert_eq!(v["output"][0]["content"][0]["type"], "output_text");
    assert_eq!(v["output"][0]["content"][0]["text"], "one two one");
    assert_eq!(v["usage"]["output_tokens"], 3);
    assert!(v["usage"]["total_tokens"].as_u64().unwrap() > 3);
    let row = s.ledger_row(&rid).await;
    assert_eq!(row.api, "responses");
    assert_eq!(row.resolved_model.as_deref(), Some("mock/echo"));
    assert_eq!(row.completion_tokens, 3);
    let n = s
        .metric(
            AVAILABILITY,
            &[
                ("api", "responses"),
                ("outcome", "success"),
                ("model", "mock/echo"),
            ],
        )
        .await;
    assert!(n >= 1.0);
}

/// The mock streamed: the exact typed event sequence, numbered, ending in `response.completed`
/// with the whole response and usage.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn translated_stream_event_sequence() {
    let env = start().await;
    let rid = new_request_id();
    let body = json!({"model": "mock/echo", "input": "a b", "stream": true}).to_string();
    let resp = post(&env.s, &body, &rid).await;
    assert_sse_head(&resp, "Responses translated stream");
    let text = resp.text().await.unwrap();
    let ev = events(&text);
    check_numbering(&ev);
    let n = ev.len();
    assert_eq!(
        names(&ev)[..4],
        [
            "response.created",
            "response.in_progress",
            "response.output_item.added",
            "response.content_part.added"
        ]
    );
    assert!(names(&ev)[4..n - 4]
        .iter()
        .all(|e| *e == "response.output_text.delta"));
    assert_eq!(
        names(&ev)[n - 4..],
        [
            "response.output_text.done",
            "response.content_part.done",
            "response.output_item.done",
            "response.completed"
        ]
    );
    let deltas: String = ev
        .iter()
        .filter(|(n, _)| n == "response.output_text.delta")
        .map(|(_, d)| d["delta"].as_str().unwrap())
        .collect();
    assert_eq!(ev[n - 4].1["text"], deltas.as_str());
    let item_id = ev[2].1["item"]["id"].as_str().unwrap();
    for (_, d) in &ev[3..n - 2] {
        assert_eq!(d["item_id"], item_id, "{d}");
        assert_eq!(d["output_index"], 0);
    }
    let done = &ev[n - 1].1["response"];
    assert_eq!(done["status"], "completed");
    assert_eq!(done["output"][0]["content"][0]["text"], deltas.as_str());
    let row = env.s.ledger_row(&rid).await;
    assert_eq!(row.api, "responses");
    assert!(row.stream);
    assert_eq!(done["usage"]["output_tokens"], row.completion_tokens);
}

/// To Claude with a function tool: a `function_call` item, then the tool result round trip; the
/// streamed call as `function_call_arguments` events; `max_tokens` as `incomplete`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn translated_to_anthropic_with_tools() {
    let env = start().await;
    let s = &env.s;
    let tools = json!([{"type": "function", "name": "get_weather", "description": "Weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}, "strict": true}]);
    let rid = new_request_id();
    let body = json!({"model": "claude/claude-tools", "input": "weather in Oslo?",
        "tools": tools, "tool_choice": "auto"})
    .to_string();
    let resp = post(s, &body, &rid).await;
    assert_eq!(resp.status(), 200, "{:?}", env.claude.refused());
    let v: Value = resp.json().await.unwrap();
    let out = v["output"].as_array().unwrap();
    assert_eq!(out[0]["type"], "message", "{v}");
    assert_eq!(out[0]["content"][0]["text"], fake::TOOL_PREAMBLE);
    assert_eq!(out[1]["type"], "function_call", "{v}");
    assert_eq!(out[1]["call_id"], fake::TOOL_ID);
    assert_eq!(out[1]["name"], "get_weather");
    let args: Value = serde_json::from_str(out[1]["arguments"].as_str().unwrap()).unwrap();
    assert_eq!(args, fake::tool_input());
    assert_eq!(v["usage"]["input_tokens"], fake::TOOLS_USAGE.prompt_total());
    assert_eq!(s.ledger_row(&rid).await.api, "responses");

    // The round trip: the output items sent back, then the call's output.
    let mut input = vec![json!({"role": "user", "content": "weather in Oslo?"})];
    input.extend(out.iter().cloned());
    input.push(json!({"type": "function_call_output", "call_id": fake::TOOL_ID, "output": "7C"}));
    let body = json!({"model": "claude/claude-tools", "input": input, "tools": tools}).to_string();
    let resp = post(s, &body, &new_request_id()).await;
    assert_eq!(resp.status(), 200, "{:?}", env.claude.refused());
    let v: Value = resp.json().await.unwrap();
    assert_eq!(
        v["output"][0]["content"][0]["text"],
        fake::TOOL_ANSWER,
        "{v}"
    );
    assert_eq!(v["status"], "completed");

    // Streamed: a message item, then a function_call item with its arguments in pieces.
    let body = json!({"model": "claude/claude-tools", "input": "weather?", "tools": tools,
        "stream": true})
    .to_string();
    let text = post(s, &body, &new_request_id())
        .await
        .text()
        .await
        .unwrap();
    let ev = events(&text);
    check_numbering(&ev);
    let tail: Vec<&str> = names(&ev)
        .into_iter()
        .skip_while(|n| *n != "response.output_item.done")
        .collect();
    assert_eq!(tail[1], "response.output_item.added");
    assert!(tail.contains(&"response.function_call_arguments.delta"));
    assert_eq!(
        tail[tail.len() - 3..],
        [
            "response.function_call_arguments.done",
            "response.output_item.done",
            "response.completed"
        ]
    );
    let done = &ev.last().unwrap().1["response"];
    assert_eq!(done["output"][1]["type"], "function_call");
    assert_eq!(done["output"][1]["call_id"], fake::TOOL_ID);
    let args: Value =
        serde_json::from_str(done["output"][1]["arguments"].as_str().unwrap()).unwrap();
    assert_eq!(args, fake::tool_input());

    // Cut short by the output cap.
    let body =
        json!({"model": "claude/claude-max", "input": "long", "max_output_tokens": 10}).to_string();
    let v: Value = post(s, &body, &new_request_id())
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(v["status"], "incomplete", "{v}");
    assert_eq!(v["incomplete_details"]["reason"], "max_output_tokens");
    assert!(
        env.claude.refused().is_empty(),
        "{:?}",
        env.claude.refused()
    );
}

/// An OpenAI target that fails over to Claude: the same Responses body, translated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn falls_back_from_passthrough_to_translation() {
    let env = start().await;
    let rid = new_request_id();
    let body = json!({"model": "gpt_then_claude", "input": "hi"}).to_string();
    let resp = post(&env.s, &body, &rid).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers()["x-tollgate-resolved-model"],
        "claude/claude-ok"
    );
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["output"][0]["content"][0]["text"], fake::OK_TEXT);
    assert_eq!(v["model"], "gpt_then_claude");
}

/// What needs state or a built-in tool is refused for a translated target with a clear message;
/// bad bodies are 400 in OpenAI's shape with their `param`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_in_openai_shape() {
    let env = start().await;
    let s = &env.s;
    let rid = new_request_id();
    let body =
        json!({"model": "mock/echo", "input": "hi", "previous_response_id": "resp_1"}).to_string();
    let v = expect_http_error(post(s, &body, &rid).await, 400, "invalid_request").await;
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(msg.contains("keeps no conversation state"), "{msg}");
    assert!(msg.contains("previous_response_id"), "{msg}");
    let row = s.ledger_row(&rid).await;
    assert_eq!(
        (row.api.as_str(), row.outcome.as_str()),
        ("responses", "excluded")
    );

    let body = json!({"model": "claude/claude-ok", "input": "hi",
        "tools": [{"type": "web_search"}]})
    .to_string();
    let v = expect_http_error(
        post(s, &body, &new_request_id()).await,
        400,
        "invalid_request",
    )
    .await;
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("built-in tool `web_search`"),
        "{v}"
    );
    assert!(env.claude.exchanges().is_empty(), "nothing reached Claude");

    for (body, param) in [
        (json!({"input": "hi"}), "model"),
        (json!({"model": "mock/echo"}), "input"),
        (json!({"model": "mock/echo", "input": []}), "input"),
        (json!({"model": "mock/echo", "input": 5}), "input"),
        (
            json!({"model": "mock/echo", "input": [{"role": "robot", "content": "x"}]}),
            "input[0].role",
        ),
        (
            json!({"model": "mock/echo", "input": [{"type": "function_call", "name": "f"}]}),
            "input[0].call_id",
        ),
        (
            json!({"model": "mock/echo", "input": "x", "max_output_tokens": 0}),
            "max_output_tokens",
        ),
        (
            json!({"model": "mock/echo", "input": "x", "tools": [{"type": "function"}]}),
            "tools[0].name",
        ),
        (
            json!({"model": "mock/echo", "input": "x", "text": {"format": {"type": "json_schema"}}}),
            "text.format.name",
        ),
    ] {
        let v = expect_http_error(
            post(s, &body.to_string(), &new_request_id()).await,
            400,
            "invalid_request",
        )
        .await;
        assert_eq!(v["error"]["param"], param, "{body}: {v}");
    }
    let v = expect_http_error(
        post(s, "{not json", &new_request_id()).await,
        400,
        "invalid_request",
    )
    .await;
    assert_eq!(v["error"]["type"], "invalid_request_error");
    let resp = s
        .client
        .post(s.url("/v1/responses"))
        .body(json!({"model": "mock/echo", "input": "x"}).to_string())
        .send()
        .await
        .unwrap();
    expect_http_error(resp, 401, "auth_rejected").await;
    let body = json!({"model": "nope/none", "input": "x"}).to_string();
    expect_http_error(
        post(s, &body, &new_request_id()).await,
        404,
        "model_not_found",
    )
    .await;
}

/// The unmodified OpenAI Python SDK: `client.responses.create` against the mock, Claude (tool
/// round trip) and the OpenAI pass-through, whole and streamed; typed errors.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_sdk_against_responses() {
    let Some(python) = python("OpenAI Python SDK (tollgate /v1/responses)") else {
        return;
    };
    let env = start().await;
    let expect = json!({
        "tool_id": fake::TOOL_ID,
        "tool_input": fake::tool_input(),
        "tool_preamble": fake::TOOL_PREAMBLE,
        "tool_answer": fake::TOOL_ANSWER,
        "ok_text": fake::OK_TEXT,
        "gpt_text": resp_fake::TEXT,
        "gpt_usage": [resp_fake::USAGE.0, resp_fake::USAGE.1, resp_fake::USAGE.2],
    });
    let out = run_script(
        python,
        "openai_sdk_responses_check.py",
        vec![env.s.url("/v1"), ALICE_KEY.to_string(), expect.to_string()],
    )
    .await;
    assert!(out.contains(" passed, 0 failed"), "{out}");
    assert!(
        env.claude.refused().is_empty(),
        "{:?}",
        env.claude.refused()
    );
}

/// A body over the limit is `payload_too_large` in OpenAI's shape, counted once as a Responses
/// request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn body_too_large_is_counted() {
    let s = TestServer::sqlite(Opts {
        server: "max_body_bytes = 256".to_owned(),
        ..Opts::default()
    })
    .await;
    let rid = new_request_id();
    let body = json!({"model": "mock/echo", "input": "x".repeat(1000)}).to_string();
    expect_http_error(post(&s, &body, &rid).await, 413, "payload_too_large").await;
    let row = s.ledger_row(&rid).await;
    assert_eq!(
        (row.api.as_str(), row.reason.as_str()),
        ("responses", "payload_too_large")
    );
}
