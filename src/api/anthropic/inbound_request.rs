//! A caller's Messages API body (`POST /v1/messages`, `/v1/messages/count_tokens`) validated
//! into a neutral [`ChatRequest`], with the body itself kept as its [`NativeBody`] for an
//! Anthropic upstream. The neutral form is what policy reads (model, caps, token estimate) and
//! what a non-Anthropic upstream receives; fields it cannot express to one (`thinking`, `top_k`,
//! server tools' details, ...) live on only in the native body.

use std::sync::Arc;

use serde_json::{json, Value};

use crate::api::{
    Api, ChatRequest, Content, ContentPart, FunctionTool, JsonObject, Message, NativeBody,
    Reasoning, Role, Tool, ToolCall, ToolChoice,
};
use crate::error::{Reason, Rejection};

/// What an endpoint requires of a body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// `/v1/messages`: `max_tokens` is required, as Anthropic requires it.
    Messages,
    /// `/v1/messages/count_tokens`: no `max_tokens`, no `stream`.
    CountTokens,
}

/// The caller's Anthropic headers, forwarded to an Anthropic upstream.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InboundHeaders {
    pub version: Option<String>,
    pub beta: Vec<String>,
}

/// Validates a Messages body into a neutral request that carries the body natively too.
pub fn parse_messages_request(
    bytes: bytes::Bytes,
    endpoint: Endpoint,
    headers: InboundHeaders,
) -> Result<ChatRequest, Rejection> {
    let value: Value = serde_json::from_slice(&bytes).map_err(|e| {
        Rejection::new(
            Reason::InvalidRequest,
            format!("the body is not valid JSON: {e}"),
        )
    })?;
    let Value::Object(body) = value else {
        return Err(Rejection::new(
            Reason::InvalidRequest,
            "the body must be a JSON object",
        ));
    };
    let mut req = request_from_object(&body, endpoint)?;
    req.native = Some(Arc::new(NativeBody {
        api: Api::Messages,
        body: bytes,
        anthropic_version: headers.version,
        anthropic_beta: headers.beta,
        hide_usage: false,
        untranslatable: None,
    }));
    Ok(req)
}

fn bad(param: &str, message: impl Into<String>) -> Rejection {
    Rejection::invalid(param, message)
}

/// The neutral request of a Messages body.
fn request_from_object(body: &JsonObject, endpoint: Endpoint) -> Result<ChatRequest, Rejection> {
    let model = match body.get("model") {
        Some(Value::String(m)) if !m.trim().is_empty() => m.clone(),
        _ => return Err(bad("model", "`model` is required and must be a string")),
    };
    let max_tokens = match (body.get("max_tokens"), endpoint) {
        (None | Some(Value::Null), Endpoint::Messages) => {
            return Err(bad("max_tokens", "`max_tokens` is required"))
        }
        (None | Some(Value::Null), Endpoint::CountTokens) => None,
        (Some(v), _) => match v.as_u64() {
            Some(n) if n >= 1 => Some(n),
            _ => {
                return Err(bad(
                    "max_tokens",
                    "`max_tokens` must be an integer of at least 1",
                ))
            }
        },
    };
    let stream = match body.get("stream") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b && endpoint == Endpoint::Messages,
        Some(_) => return Err(bad("stream", "`stream` must be a boolean")),
    };
    let mut messages = Vec::new();
    if let Some(system) = body.get("system") {
        if let Some(m) = system_message(system)? {
            messages.push(m);
        }
    }
    let turns = match body.get("messages") {
        Some(Value::Array(t)) if !t.is_empty() => t,
        Some(Value::Array(_)) => return Err(bad("messages", "`messages` must not be empty")),
        _ => return Err(bad("messages", "`messages` is required and must be a list")),
    };
    for (i, turn) in turns.iter().enumerate() {
        turn_messages(i, turn, &mut messages)?;
    }
    let mut req = ChatRequest::new(model, messages);
    req.api = Api::Messages;
    req.max_tokens = max_tokens;
    req.stream = stream;
    // The answer goes back as Anthropic events, whose `message_delta` always carries usage.
    req.include_usage = true;
    req.temperature = number(body, "temperature")?;
    req.top_p = number(body, "top_p")?;
    match body.get("stop_sequences") {
        None | Some(Value::Null) => {}
        Some(Value::Array(a)) if a.iter().all(Value::is_string) => {
            req.stop = a
                .iter()
                .filter_map(Value::as_str)
                .map(str::to_string)
                .collect();
        }
        Some(_) => {
            return Err(bad(
                "stop_sequences",
                "`stop_sequences` must be a list of strings",
            ))
        }
    }
    match body.get("tools") {
        None | Some(Value::Null) => {}
        Some(Value::Array(tools)) => {
            for (i, t) in tools.iter().enumerate() {
                req.tools.push(tool(i, t)?);
            }
        }
        Some(_) => return Err(bad("tools", "`tools` must be a list")),
    }
    if let Some(choice) = body.get("tool_choice").filter(|v| !v.is_null()) {
        let (choice, parallel) = tool_choice(choice)?;
        req.tool_choice = Some(choice);
        if parallel == Some(false) {
            req.extra.insert("parallel_tool_calls".into(), json!(false));
        }
    }
    match body.get("metadata") {
        None | Some(Value::Null) => {}
        Some(Value::Object(m)) => {
            // OpenAI's name for the end user.
            if let Some(user) = m.get("user_id").and_then(Value::as_str) {
                req.extra.insert("user".into(), json!(user));
            }
        }
        Some(_) => return Err(bad("metadata", "`metadata` must be an object")),
    }
    if let Some(t) = body.get("thinking").filter(|v| !v.is_null()) {
        if !t.is_object() {
            return Err(bad("thinking", "`thinking` must be an object"));
        }
    }
    req.check_required()?;
    Ok(req)
}

fn number(body: &JsonObject, key: &str) -> Result<Option<f64>, Rejection> {
    match body.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_f64()
            .map(Some)
            .ok_or_else(|| bad(key, format!("`{key}` must be a number"))),
    }
}

/// `system` as one instruction message: a string, or text blocks (their `cache_control` kept).
fn system_message(system: &Value) -> Result<Option<Message>, Rejection> {
    match system {
        Value::Null => Ok(None),
        Value::String(s) => Ok(Some(Message::text(Role::System, s.clone()))),
        Value::Array(blocks) => {
            let mut parts = Vec::new();
            for (j, b) in blocks.iter().enumerate() {
                let at = format!("system[{j}]");
                let o = b
                    .as_object()
                    .ok_or_else(|| bad(&at, format!("`{at}` must be an object")))?;
                if o.get("type").and_then(Value::as_str) != Some("text") {
                    return Err(bad(&at, format!("`{at}` must be a text block")));
                }
                parts.push(text_part(o, &at)?);
            }
            let mut m = Message::text(Role::System, String::new());
            m.content = Some(Content::Parts(parts));
            Ok(Some(m))
        }
        _ => Err(bad(
            "system",
            "`system` must be a string or a list of text blocks",
        )),
    }
}

/// The neutral messages of one turn: a user turn's `tool_result` blocks become tool messages
/// (first, as OpenAI wants them right after the assistant's calls), the rest one user message;
/// an assistant turn's thinking, text and tool uses one assistant message.
fn turn_messages(i: usize, turn: &Value, out: &mut Vec<Message>) -> Result<(), Rejection> {
    let at = format!("messages[{i}]");
    let o = turn
        .as_object()
        .ok_or_else(|| bad(&at, format!("`{at}` must be an object")))?;
    let role = match o.get("role").and_then(Value::as_str) {
        Some("user") => Role::User,
        Some("assistant") => Role::Assistant,
        _ => {
            return Err(bad(
                &format!("{at}.role"),
                format!("`{at}.role` must be \"user\" or \"assistant\""),
            ))
        }
    };
    let blocks = match o.get("content") {
        Some(Value::String(s)) => {
            out.push(Message::text(role, s.clone()));
            return Ok(());
        }
        Some(Value::Array(b)) => b,
        _ => {
            return Err(bad(
                &format!("{at}.content"),
                format!("`{at}.content` must be a string or a list of blocks"),
            ))
        }
    };
    let mut msg = Message::text(role.clone(), String::new());
    msg.content = None;
    let mut parts = Vec::new();
    for (j, b) in blocks.iter().enumerate() {
        let bat = format!("{at}.content[{j}]");
        let block = b
            .as_object()
            .ok_or_else(|| bad(&bat, format!("`{bat}` must be an object")))?;
        let ty = block.get("type").and_then(Value::as_str).unwrap_or("");
        match (ty, &role) {
            ("text", _) => parts.push(text_part(block, &bat)?),
            ("image", Role::User) => parts.push(image_part(block, &bat)?),
            ("tool_result", Role::User) => out.push(tool_result(block, &bat)?),
            ("thinking", Role::Assistant) => msg.reasoning.push(Reasoning {
                text: str_of(block, "thinking").to_string(),
                signature: block
                    .get("signature")
                    .and_then(Value::as_str)
                    .map(str::to_string),
                redacted: None,
            }),
            ("redacted_thinking", Role::Assistant) => msg.reasoning.push(Reasoning {
                redacted: Some(str_of(block, "data").to_string()),
                ..Reasoning::default()
            }),
            ("tool_use", Role::Assistant) => msg.tool_calls.push(tool_use(block, &bat)?),
            ("", _) => return Err(bad(&bat, format!("`{bat}.type` is required"))),
            // Documents, search results, server tool blocks, ...: kept whole.
            _ => parts.push(ContentPart::Other(block.clone())),
        }
    }
    let only_text = parts
        .iter()
        .all(|p| matches!(p, ContentPart::Text { extra, .. } if extra.is_empty()));
    if !parts.is_empty() {
        msg.content = Some(if only_text {
            Content::Text(
                parts
                    .iter()
                    .filter_map(|p| match p {
                        ContentPart::Text { text, .. } => Some(text.as_str()),
                        _ => None,
                    })
                    .collect(),
            )
        } else {
            Content::Parts(parts)
        });
    }
    if msg.content.is_some() || !msg.tool_calls.is_empty() || !msg.reasoning.is_empty() {
        out.push(msg);
    }
    Ok(())
}

fn str_of<'a>(o: &'a JsonObject, key: &str) -> &'a str {
    o.get(key).and_then(Value::as_str).unwrap_or("")
}

/// The fields of a block other than `skip`, which ride in the part's `extra`.
fn rest(o: &JsonObject, skip: &[&str]) -> JsonObject {
    o.iter()
        .filter(|(k, _)| !skip.contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

fn text_part(o: &JsonObject, at: &str) -> Result<ContentPart, Rejection> {
    let text = o
        .get("text")
        .and_then(Value::as_str)
        .ok_or_else(|| bad(at, format!("`{at}.text` must be a string")))?;
    Ok(ContentPart::Text {
        text: text.to_string(),
        extra: rest(o, &["type", "text"]),
    })
}

/// An image block as a URL part: base64 bytes become a `data:` URL.
fn image_part(o: &JsonObject, at: &str) -> Result<ContentPart, Rejection> {
    let source = o
        .get("source")
        .and_then(Value::as_object)
        .ok_or_else(|| bad(at, format!("`{at}.source` must be an object")))?;
    let url = match source.get("type").and_then(Value::as_str) {
        Some("base64") => format!(
            "data:{};base64,{}",
            str_of(source, "media_type"),
            str_of(source, "data")
        ),
        Some("url") => str_of(source, "url").to_string(),
        // A file id or a source kind only Anthropic knows: kept whole.
        _ => return Ok(ContentPart::Other(o.clone())),
    };
    Ok(ContentPart::Image {
        url,
        detail: None,
        extra: rest(o, &["type", "source"]),
    })
}

/// A `tool_result` block as a tool message.
fn tool_result(o: &JsonObject, at: &str) -> Result<Message, Rejection> {
    let id = o
        .get("tool_use_id")
        .and_then(Value::as_str)
        .ok_or_else(|| bad(at, format!("`{at}.tool_use_id` must be a string")))?;
    let content = match o.get("content") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(Content::Text(s.clone())),
        Some(Value::Array(blocks)) => {
            let mut parts = Vec::new();
            for (k, b) in blocks.iter().enumerate() {
                let bat = format!("{at}.content[{k}]");
                let block = b
                    .as_object()
                    .ok_or_else(|| bad(&bat, format!("`{bat}` must be an object")))?;
                parts.push(match block.get("type").and_then(Value::as_str) {
                    Some("text") => text_part(block, &bat)?,
                    Some("image") => image_part(block, &bat)?,
                    _ => ContentPart::Other(block.clone()),
                });
            }
            Some(Content::Parts(parts))
        }
        Some(_) => {
            return Err(bad(
                at,
                format!("`{at}.content` must be a string or a list of blocks"),
            ))
        }
    };
    let mut m = Message::text(Role::Tool, String::new());
    m.content = content;
    m.tool_call_id = Some(id.to_string());
    m.extra = rest(o, &["type", "tool_use_id", "content"]);
    Ok(m)
}

/// A `tool_use` block as a call whose arguments are the input's JSON text.
fn tool_use(o: &JsonObject, at: &str) -> Result<ToolCall, Rejection> {
    let id = o
        .get("id")
        .and_then(Value::as_str)
        .ok_or_else(|| bad(at, format!("`{at}.id` must be a string")))?;
    let name = o
        .get("name")
        .and_then(Value::as_str)
        .ok_or_else(|| bad(at, format!("`{at}.name` must be a string")))?;
    let input = o.get("input").cloned().unwrap_or_else(|| json!({}));
    Ok(ToolCall {
        id: id.to_string(),
        name: name.to_string(),
        arguments: input.to_string(),
        extra: rest(o, &["type", "id", "name", "input"]),
    })
}

/// A tool definition: a custom tool is a function; a server tool (`web_search_...`, ...) is
/// kept whole.
fn tool(i: usize, t: &Value) -> Result<Tool, Rejection> {
    let at = format!("tools[{i}]");
    let o = t
        .as_object()
        .ok_or_else(|| bad(&at, format!("`{at}` must be an object")))?;
    match o.get("type").and_then(Value::as_str) {
        None | Some("custom") => {}
        Some(_) => return Ok(Tool::Other(o.clone())),
    }
    let name = o
        .get("name")
        .and_then(Value::as_str)
        .filter(|n| !n.is_empty())
        .ok_or_else(|| bad(&at, format!("`{at}.name` is required")))?;
    Ok(Tool::Function(FunctionTool {
        name: name.to_string(),
        description: o
            .get("description")
            .and_then(Value::as_str)
            .map(str::to_string),
        parameters: o.get("input_schema").cloned(),
        extra: rest(
            o,
            &[
                "type",
                "name",
                "description",
                "input_schema",
                "cache_control",
            ],
        ),
    }))
}

/// `tool_choice`, and its `disable_parallel_tool_use` turned around (OpenAI's
/// `parallel_tool_calls`).
fn tool_choice(v: &Value) -> Result<(ToolChoice, Option<bool>), Rejection> {
    let o = v
        .as_object()
        .ok_or_else(|| bad("tool_choice", "`tool_choice` must be an object"))?;
    let parallel = o
        .get("disable_parallel_tool_use")
        .and_then(Value::as_bool)
        .map(|d| !d);
    let choice = match o.get("type").and_then(Value::as_str) {
        Some("auto") => ToolChoice::Auto,
        Some("any") => ToolChoice::Required,
        Some("none") => ToolChoice::None,
        Some("tool") => ToolChoice::Function(
            o.get("name")
                .and_then(Value::as_str)
                .ok_or_else(|| bad("tool_choice.name", "`tool_choice.name` is required"))?
                .to_string(),
        ),
        _ => {
            return Err(bad(
                "tool_choice.type",
                "`tool_choice.type` must be auto, any, tool or none",
            ))
        }
    };
    Ok((choice, parallel))
}
