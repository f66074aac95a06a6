//! A fake Anthropic Messages API for the integration tests: an axum server on a random loopback
//! port that speaks the real wire (`POST /v1/messages`, `x-api-key`, `anthropic-version`, the
//! Message object, the SSE event sequence, error bodies `{"type":"error","error":{..}}` with a
//! `request-id` header) and, like the real API, answers 400 `invalid_request_error` to what the
//! real API refuses (see [`validate()`]). Its answer is chosen by the model name:
//!
//! | model | behaviour |
//! |---|---|
//! | `claude-ok` (and `claude-ok-*`) | text [`OK_TEXT`] (streamed as [`OK_PIECES`]), `end_turn`, usage [`OK_USAGE`] |
//! | `claude-tools` | with `tools`: text [`TOOL_PREAMBLE`] then a `tool_use` ([`TOOL_ID`], the first tool's name, [`tool_input`]; streamed in [`TOOL_INPUT_PIECES`]), `tool_use`; when the last user turn holds a `tool_result`: text [`TOOL_ANSWER`], `end_turn` |
//! | `claude-thinking` | a thinking block ([`THINKING_PIECES`], [`THINKING_SIGNATURE`]) then text [`THINKING_ANSWER`] |
//! | `claude-overloaded` | 529 `overloaded_error` |
//! | `claude-invalid` | 400 `invalid_request_error` [`INVALID_MESSAGE`] |
//! | `claude-midstream-error` | streamed: `message_start`, one text delta [`MIDSTREAM_TEXT`], then an `error` event (`overloaded_error`); not streamed: like `claude-ok` |
//! | `claude-max` | text [`MAX_TEXT`], stop reason `max_tokens` |
//!
//! `POST /v1/messages/count_tokens` answers `{"input_tokens": COUNT_TOKENS}` to a valid body
//! (a Messages body without `max_tokens`). Each exchange records the body and the answer as raw
//! bytes too, so a pass-through can be checked byte for byte.
//!
//! Keys (`x-api-key`, or `Authorization: Bearer` as newer SDKs send them): [`GOOD_KEY`] and [`GOOD_KEY_2`] are accepted; keys starting with
//! [`RATE_LIMITED_PREFIX`] get 429 `rate_limit_error` with `retry-after: 60`; any other key, or
//! none, gets 401 `authentication_error`. Every request is recorded with the status it got.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, Method, Uri};
use axum::response::Response;
use axum::Router;
use serde_json::{json, Value};

mod validate;
pub use validate::validate;

pub const GOOD_KEY: &str = "sk-ant-good";
pub const GOOD_KEY_2: &str = "sk-ant-good-2";
pub const RATE_LIMITED_PREFIX: &str = "sk-ant-rate-limited";
/// The `anthropic-version` tollgate sends by default.
pub const VERSION: &str = "2023-06-01";
pub const OK_TEXT: &str = "Hello from Claude";
pub const OK_PIECES: [&str; 3] = ["Hello", " from", " Claude"];
pub const OK_USAGE: Usage = Usage {
    input: 13,
    output: 9,
    cache_read: 4,
    cache_creation: 2,
};
pub const TOOL_ID: &str = "toolu_01A";
pub const TOOL_PREAMBLE: &str = "Let me check.";
/// `{"city":"Oslo","unit":"celsius"}` cut as the real API cuts it (the first piece is empty).
pub const TOOL_INPUT_PIECES: [&str; 4] =
    ["", "{\"city\": \"Os", "lo\", \"unit\"", ": \"celsius\"}"];
pub const TOOL_ANSWER: &str = "It is 7 degrees.";
pub const TOOLS_USAGE: Usage = Usage::plain(31, 22);
pub const TOOL_ANSWER_USAGE: Usage = Usage::plain(47, 8);
pub const THINKING_PIECES: [&str; 3] = ["The user greets me;", " a greeting back", " fits."];
pub const THINKING_SIGNATURE: &str = "EqQBCgIYAhIM1gbcDa9GJwZA2b3hGgxBdjrkzLoky3dl1pkiMOYds";
pub const THINKING_ANSWER: &str = "Hello! I thought it through.";
pub const THINKING_USAGE: Usage = Usage::plain(17, 40);
pub const MAX_TEXT: &str = "Hello from Claude, and then the tokens ran";
pub const MAX_USAGE: Usage = Usage::plain(13, 10);
pub const INVALID_MESSAGE: &str = "max_tokens: too large (test)";
pub const MIDSTREAM_TEXT: &str = "Hello";
/// What `/v1/messages/count_tokens` answers for any valid body.
pub const COUNT_TOKENS: u64 = 42;

/// `{"city":"Oslo","unit":"celsius"}`, the input of the `claude-tools` tool call.
pub fn tool_input() -> Value {
    json!({"city": "Oslo", "unit": "celsius"})
}

/// The full thinking text of `claude-thinking`.
pub fn thinking_text() -> String {
    THINKING_PIECES.concat()
}

/// Anthropic usage: `input` excludes the cache reads and writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    pub input: u64,
    pub output: u64,
    pub cache_read: u64,
    pub cache_creation: u64,
}

impl Usage {
    pub const fn plain(input: u64, output: u64) -> Usage {
        Usage {
            input,
            output,
            cache_read: 0,
            cache_creation: 0,
        }
    }

    /// Every input token: what OpenAI calls `prompt_tokens`.
    pub fn prompt_total(self) -> u64 {
        self.input + self.cache_read + self.cache_creation
    }

    fn json(self, output: u64) -> Value {
        json!({
            "input_tokens": self.input,
            "cache_creation_input_tokens": self.cache_creation,
            "cache_read_input_tokens": self.cache_read,
            "output_tokens": output,
        })
    }
}

/// One request as the fake received it, and what it answered.
#[derive(Debug, Clone)]
pub struct Exchange {
    pub path: String,
    pub headers: HeaderMap,
    /// The body as JSON (`Value::Null` if it was not JSON).
    pub body: Value,
    /// The body exactly as received (for pass-through assertions).
    pub raw: Bytes,
    /// The answer's body exactly as sent (a Message, the SSE frames, or an error body).
    pub answer: Bytes,
    /// The HTTP status answered.
    pub status: u16,
    /// `error.type` and `error.message` when the answer was an error.
    pub error: Option<(String, String)>,
}

impl Exchange {
    pub fn model(&self) -> &str {
        self.body.get("model").and_then(Value::as_str).unwrap_or("")
    }

    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    }

    /// Whether any message mentions `marker`.
    pub fn mentions(&self, marker: &str) -> bool {
        self.body["messages"]
            .as_array()
            .is_some_and(|m| m.iter().any(|m| m.to_string().contains(marker)))
    }
}

#[derive(Default)]
struct Shared {
    exchanges: Mutex<Vec<Exchange>>,
}

/// A running fake. Dropping it leaves the task to die with the test runtime.
#[derive(Clone)]
pub struct AnthropicUpstream {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
}

impl AnthropicUpstream {
    pub async fn start() -> AnthropicUpstream {
        let shared = Arc::new(Shared::default());
        let app = Router::new().fallback(handle).with_state(shared.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the fake Anthropic API");
        let addr = listener.local_addr().expect("fake Anthropic addr");
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        AnthropicUpstream { addr, shared }
    }

    /// `http://127.0.0.1:PORT`: the provider's `base_url` (requests go to `{base_url}/v1/messages`).
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A `[providers.NAME]` table of kind `anthropic` for this fake with `default_max_tokens = 1024`.
    pub fn provider_toml(&self, name: &str, keys: &[&str]) -> String {
        let keys: Vec<String> = keys.iter().map(|k| format!("\"{k}\"")).collect();
        format!(
            "[providers.{name}]\nkind = \"anthropic\"\nbase_url = \"{}\"\nkeys = [{}]\n\
             anthropic_version = \"{VERSION}\"\ndefault_max_tokens = 1024\n\n",
            self.base_url(),
            keys.join(", ")
        )
    }

    pub fn exchanges(&self) -> Vec<Exchange> {
        self.shared.exchanges.lock().unwrap().clone()
    }

    pub fn for_model(&self, model: &str) -> Vec<Exchange> {
        self.exchanges()
            .into_iter()
            .filter(|e| e.model() == model)
            .collect()
    }

    /// The requests for `model` that mention `marker`, in arrival order.
    pub fn find_all(&self, model: &str, marker: &str) -> Vec<Exchange> {
        self.for_model(model)
            .into_iter()
            .filter(|e| e.mentions(marker))
            .collect()
    }

    /// Every request the fake refused as the real API would (400 `invalid_request_error`, other
    /// than the deliberate one of `claude-invalid`), for failure messages and assertions.
    pub fn refused(&self) -> Vec<Exchange> {
        self.exchanges()
            .into_iter()
            .filter(|e| {
                e.status == 400
                    && e.model() != "claude-invalid"
                    && e.error
                        .as_ref()
                        .is_some_and(|(t, _)| t == "invalid_request_error")
            })
            .collect()
    }
}

// ---------------------------------------------------------------------------------------------
// answers

/// One content block of a planned answer, with the pieces it streams in.
enum Block {
    Text(Vec<String>),
    ToolUse {
        id: String,
        name: String,
        pieces: Vec<String>,
    },
    Thinking {
        pieces: Vec<String>,
        signature: String,
    },
}

/// A planned answer: rendered as a Message or as SSE events.
struct Plan {
    model: String,
    blocks: Vec<Block>,
    stop_reason: &'static str,
    usage: Usage,
    /// `message_delta` repeats every usage field (the newer API) instead of `output_tokens` only.
    full_delta_usage: bool,
    /// Stop after the first delta of the first block with an `error` event.
    cut_with_error: bool,
}

enum Reply {
    Error {
        status: u16,
        kind: &'static str,
        message: String,
    },
    Message(Plan),
    Stream(Plan),
    /// The answer of `/v1/messages/count_tokens`.
    Count(u64),
}

fn owned(pieces: &[&str]) -> Vec<String> {
    pieces.iter().map(|p| (*p).to_owned()).collect()
}

fn text_block(pieces: &[&str]) -> Block {
    Block::Text(owned(pieces))
}

impl Block {
    fn complete(&self) -> Value {
        match self {
            Block::Text(p) => json!({"type": "text", "text": p.concat()}),
            Block::ToolUse { id, name, pieces } => json!({
                "type": "tool_use", "id": id, "name": name,
                "input": serde_json::from_str::<Value>(&pieces.concat()).expect("tool input JSON"),
            }),
            Block::Thinking { pieces, signature } => {
                json!({"type": "thinking", "thinking": pieces.concat(), "signature": signature})
            }
        }
    }

    /// `content_block_start`'s empty block.
    fn start(&self) -> Value {
        match self {
            Block::Text(_) => json!({"type": "text", "text": ""}),
            Block::ToolUse { id, name, .. } => {
                json!({"type": "tool_use", "id": id, "name": name, "input": {}})
            }
            Block::Thinking { .. } => json!({"type": "thinking", "thinking": "", "signature": ""}),
        }
    }

    fn deltas(&self) -> Vec<Value> {
        match self {
            Block::Text(p) => p
                .iter()
                .map(|t| json!({"type": "text_delta", "text": t}))
                .collect(),
            Block::ToolUse { pieces, .. } => pieces
                .iter()
                .map(|j| json!({"type": "input_json_delta", "partial_json": j}))
                .collect(),
            Block::Thinking { pieces, signature } => pieces
                .iter()
                .map(|t| json!({"type": "thinking_delta", "thinking": t}))
                .chain([json!({"type": "signature_delta", "signature": signature})])
                .collect(),
        }
    }
}

impl Plan {
    fn new(model: &str, blocks: Vec<Block>, stop_reason: &'static str, usage: Usage) -> Plan {
        Plan {
            model: model.to_owned(),
            blocks,
            stop_reason,
            usage,
            full_delta_usage: false,
            cut_with_error: false,
        }
    }

    fn message(&self, id: &str) -> Value {
        json!({
            "id": id,
            "type": "message",
            "role": "assistant",
            // The API answers with the dated model name; tollgate must answer with its own.
            "model": format!("{}-20250514", self.model),
            "content": self.blocks.iter().map(Block::complete).collect::<Vec<_>>(),
            "stop_reason": self.stop_reason,
            "stop_sequence": null,
            "usage": self.usage.json(self.usage.output),
        })
    }

    fn events(&self, id: &str) -> Vec<(&'static str, Value)> {
        let mut start = self.message(id);
        start["content"] = json!([]);
        start["stop_reason"] = Value::Null;
        start["usage"] = self.usage.json(1);
        let mut out = vec![(
            "message_start",
            json!({"type": "message_start", "message": start}),
        )];
        for (index, block) in self.blocks.iter().enumerate() {
            out.push((
                "content_block_start",
                json!({"type": "content_block_start", "index": index, "content_block": block.start()}),
            ));
            if index == 0 {
                out.push(("ping", json!({"type": "ping"})));
            }
            for delta in block.deltas() {
                out.push((
                    "content_block_delta",
                    json!({"type": "content_block_delta", "index": index, "delta": delta}),
                ));
                if self.cut_with_error {
                    out.push((
                        "error",
                        json!({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}),
                    ));
                    return out;
                }
            }
            out.push((
                "content_block_stop",
                json!({"type": "content_block_stop", "index": index}),
            ));
        }
        let usage = if self.full_delta_usage {
            self.usage.json(self.usage.output)
        } else {
            json!({"output_tokens": self.usage.output})
        };
        out.push((
            "message_delta",
            json!({"type": "message_delta", "delta": {"stop_reason": self.stop_reason, "stop_sequence": null}, "usage": usage}),
        ));
        out.push(("message_stop", json!({"type": "message_stop"})));
        out
    }
}

/// Whether the last user turn carries a `tool_result` block.
fn answers_a_tool(body: &Value) -> bool {
    body["messages"]
        .as_array()
        .and_then(|m| m.iter().rev().find(|m| m["role"] == "user"))
        .and_then(|m| m["content"].as_array())
        .is_some_and(|c| c.iter().any(|b| b["type"] == "tool_result"))
}

fn plan_for(model: &str, body: &Value) -> Result<Plan, Reply> {
    let plan = match model {
        m if m.starts_with("claude-ok") || m == "claude-midstream-error" => {
            Plan::new(model, vec![text_block(&OK_PIECES)], "end_turn", OK_USAGE)
        }
        "claude-tools" if answers_a_tool(body) => Plan::new(
            model,
            vec![text_block(&["It is", " 7 degrees."])],
            "end_turn",
            TOOL_ANSWER_USAGE,
        ),
        "claude-tools" => {
            let Some(name) = body["tools"][0]["name"].as_str() else {
                return Ok(Plan::new(
                    model,
                    vec![text_block(&["I have", " no tools."])],
                    "end_turn",
                    TOOLS_USAGE,
                ));
            };
            let tool = Block::ToolUse {
                id: TOOL_ID.into(),
                name: name.into(),
                pieces: owned(&TOOL_INPUT_PIECES),
            };
            let mut plan = Plan::new(
                model,
                vec![text_block(&["Let me", " check."]), tool],
                "tool_use",
                TOOLS_USAGE,
            );
            plan.full_delta_usage = true;
            plan
        }
        "claude-thinking" => {
            let thinking = Block::Thinking {
                pieces: owned(&THINKING_PIECES),
                signature: THINKING_SIGNATURE.into(),
            };
            let text = text_block(&["Hello!", " I thought it through."]);
            Plan::new(model, vec![thinking, text], "end_turn", THINKING_USAGE)
        }
        "claude-max" => Plan::new(
            model,
            vec![text_block(&[
                "Hello from Claude,",
                " and then the tokens ran",
            ])],
            "max_tokens",
            MAX_USAGE,
        ),
        "claude-overloaded" => return Err(error(529, "overloaded_error", "Overloaded")),
        "claude-invalid" => return Err(error(400, "invalid_request_error", INVALID_MESSAGE)),
        other => return Err(error(404, "not_found_error", &format!("model: {other}"))),
    };
    Ok(plan)
}

fn error(status: u16, kind: &'static str, message: &str) -> Reply {
    Reply::Error {
        status,
        kind,
        message: message.to_owned(),
    }
}

fn answer(method: &Method, uri: &Uri, headers: &HeaderMap, body: &Value) -> Reply {
    let counting = uri.path() == "/v1/messages/count_tokens";
    if method != Method::POST || (uri.path() != "/v1/messages" && !counting) {
        return error(404, "not_found_error", "Not Found");
    }
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    // The SDKs of newer API versions send the key as a bearer token; the API takes both.
    let key = header("x-api-key")
        .or_else(|| header("authorization").and_then(|a| a.strip_prefix("Bearer ")));
    match key {
        None => return error(401, "authentication_error", "x-api-key header is required"),
        Some(k) if k.starts_with(RATE_LIMITED_PREFIX) => {
            return error(
                429,
                "rate_limit_error",
                "This request would exceed the rate limit for your organization of 50 requests per minute.",
            )
        }
        Some(k) if k == GOOD_KEY || k == GOOD_KEY_2 => {}
        Some(_) => return error(401, "authentication_error", "invalid x-api-key"),
    }
    match header("anthropic-version") {
        None => {
            return error(
                400,
                "invalid_request_error",
                "anthropic-version: header is required",
            )
        }
        // A dated version (the SDKs send their own, newer than tollgate's default).
        Some(v) if is_date(v) => {}
        Some(_) => {
            return error(
                400,
                "invalid_request_error",
                "anthropic-version: invalid version",
            )
        }
    }
    let Some(obj) = body.as_object() else {
        return error(
            400,
            "invalid_request_error",
            "There was an issue with your request body: invalid JSON",
        );
    };
    if counting {
        // count_tokens takes a Messages body without max_tokens (and without stream); the
        // rest is checked as a Messages body with a cap above any thinking budget.
        let mut with_cap = obj.clone();
        with_cap.insert("max_tokens".into(), json!(u32::MAX));
        return match validate(&with_cap) {
            Err(message) => error(400, "invalid_request_error", &message),
            Ok(()) if obj.contains_key("max_tokens") || obj.contains_key("stream") => error(
                400,
                "invalid_request_error",
                "max_tokens: Extra inputs are not permitted",
            ),
            Ok(()) => Reply::Count(COUNT_TOKENS),
        };
    }
    if let Err(message) = validate(obj) {
        return error(400, "invalid_request_error", &message);
    }
    let model = obj["model"].as_str().unwrap_or_default();
    let stream = obj.get("stream").and_then(Value::as_bool).unwrap_or(false);
    match plan_for(model, body) {
        Err(reply) => reply,
        Ok(mut plan) if stream => {
            plan.cut_with_error = model == "claude-midstream-error";
            Reply::Stream(plan)
        }
        Ok(plan) => Reply::Message(plan),
    }
}

/// `YYYY-MM-DD`.
fn is_date(v: &str) -> bool {
    let b = v.as_bytes();
    b.len() == 10
        && b.iter().enumerate().all(|(i, c)| match i {
            4 | 7 => *c == b'-',
            _ => c.is_ascii_digit(),
        })
}

async fn handle(
    State(shared): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let json_body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let reply = answer(&method, &uri, &headers, &json_body);
    let (status, error) = match &reply {
        Reply::Error {
            status,
            kind,
            message,
        } => (*status, Some(((*kind).to_owned(), message.clone()))),
        _ => (200, None),
    };
    // Numbered before answering, so the ids in the answer match the record.
    let n = {
        let mut ex = shared.exchanges.lock().unwrap();
        ex.push(Exchange {
            path: uri.path().to_owned(),
            headers,
            body: json_body,
            raw: body,
            answer: Bytes::new(),
            status,
            error,
        });
        ex.len()
    };
    let request_id = format!("req_test_{n:06}");
    let message_id = format!("msg_test_{n:06}");
    let builder = Response::builder().header("request-id", &request_id);
    let (builder, answer) = match reply {
        Reply::Error {
            status,
            kind,
            message,
        } => {
            let mut b = builder
                .status(status)
                .header("content-type", "application/json");
            if status == 429 {
                b = b.header("retry-after", "60");
            }
            let body = json!({"type": "error", "error": {"type": kind, "message": message}, "request_id": request_id});
            (b, body.to_string())
        }
        Reply::Count(n) => (
            builder
                .status(200)
                .header("content-type", "application/json"),
            json!({ "input_tokens": n }).to_string(),
        ),
        Reply::Message(plan) => (
            builder
                .status(200)
                .header("content-type", "application/json"),
            plan.message(&message_id).to_string(),
        ),
        Reply::Stream(plan) => {
            let frames: Vec<Result<Bytes, std::convert::Infallible>> = plan
                .events(&message_id)
                .into_iter()
                .map(|(name, data)| Ok(Bytes::from(format!("event: {name}\ndata: {data}\n\n"))))
                .collect();
            let all: Vec<u8> = frames
                .iter()
                .flat_map(|f| f.as_ref().unwrap().to_vec())
                .collect();
            shared.exchanges.lock().unwrap()[n - 1].answer = Bytes::from(all);
            return builder
                .status(200)
                .header("content-type", "text/event-stream; charset=utf-8")
                .header("cache-control", "no-cache")
                .body(Body::from_stream(futures_util::stream::iter(frames)))
                .unwrap();
        }
    };
    shared.exchanges.lock().unwrap()[n - 1].answer = Bytes::from(answer.clone());
    builder.body(Body::from(answer)).unwrap()
}
