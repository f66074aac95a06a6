//! A whole Messages API answer as a neutral one.

use serde_json::Value;

use super::{stop_reason, usage};
use crate::api::{ChatResponse, Choice, Content, JsonObject, Message, Reasoning, Role, ToolCall};

/// Top-level keys of a Message that the neutral answer models itself.
const MODELLED_KEYS: &[&str] = &[
    "id",
    "type",
    "role",
    "content",
    "model",
    "stop_reason",
    "usage",
];

/// A Messages API response as a neutral answer; `created` (unix seconds) is stamped on it.
/// Err: short reason.
pub fn parse_response(bytes: &[u8], created: u64) -> Result<ChatResponse, String> {
    let v: Value =
        serde_json::from_slice(bytes).map_err(|e| format!("response is not JSON: {e}"))?;
    let Value::Object(o) = v else {
        return Err("response is not a JSON object".into());
    };
    match o.get("type").and_then(Value::as_str) {
        Some("message") => {}
        Some("error") => {
            let (ty, msg) =
                super::error::error_fields(&Value::Object(o.clone())).unwrap_or_default();
            return Err(format!("error body in a success response: {ty}: {msg}"));
        }
        other => return Err(format!("response type is {other:?}, not \"message\"")),
    }
    let blocks = o
        .get("content")
        .and_then(Value::as_array)
        .ok_or("response has no content array")?;
    let message = assistant_message(blocks)?;
    let str_of = |k: &str| {
        o.get(k)
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string()
    };
    let extra: JsonObject = o
        .iter()
        .filter(|(k, v)| !MODELLED_KEYS.contains(&k.as_str()) && !v.is_null())
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    Ok(ChatResponse {
        id: str_of("id"),
        created,
        model: str_of("model"),
        choices: vec![Choice {
            index: 0,
            message,
            finish_reason: o
                .get("stop_reason")
                .and_then(Value::as_str)
                .map(stop_reason),
            extra: JsonObject::new(),
        }],
        usage: o.get("usage").and_then(usage),
        extra,
    })
}

/// The assistant message of the content blocks: text joined, thinking as reasoning, tool uses as
/// calls; any other block (server tool results, ...) kept in `extra["content_blocks"]`.
fn assistant_message(blocks: &[Value]) -> Result<Message, String> {
    let mut text = String::new();
    let mut reasoning = Vec::new();
    let mut tool_calls = Vec::new();
    let mut citations = Vec::new();
    let mut others = Vec::new();
    for b in blocks {
        let s = |k: &str| b.get(k).and_then(Value::as_str);
        match s("type") {
            Some("text") => {
                text.push_str(s("text").unwrap_or_default());
                if let Some(c) = b.get("citations").and_then(Value::as_array) {
                    citations.extend(c.iter().cloned());
                }
            }
            Some("thinking") => reasoning.push(Reasoning {
                text: s("thinking").unwrap_or_default().to_string(),
                signature: s("signature").map(str::to_string),
                redacted: None,
            }),
            Some("redacted_thinking") => reasoning.push(Reasoning {
                redacted: Some(s("data").unwrap_or_default().to_string()),
                ..Reasoning::default()
            }),
            Some("tool_use") => tool_calls.push(tool_call(b)?),
            _ => others.push(b.clone()),
        }
    }
    let mut extra = JsonObject::new();
    if !citations.is_empty() {
        extra.insert("citations".into(), Value::Array(citations));
    }
    if !others.is_empty() {
        extra.insert("content_blocks".into(), Value::Array(others));
    }
    Ok(Message {
        role: Role::Assistant,
        content: (!text.is_empty()).then_some(Content::Text(text)),
        name: None,
        tool_calls,
        tool_call_id: None,
        reasoning,
        extra,
    })
}

/// A `tool_use` block as a call; `input` becomes the compact JSON text OpenAI callers expect.
fn tool_call(b: &Value) -> Result<ToolCall, String> {
    let s = |k: &str| b.get(k).and_then(Value::as_str);
    let id = s("id").ok_or("tool_use block without an id")?.to_string();
    let name = s("name")
        .ok_or("tool_use block without a name")?
        .to_string();
    let input = b
        .get("input")
        .cloned()
        .unwrap_or_else(|| Value::Object(JsonObject::new()));
    let extra = b
        .as_object()
        .map(|o| {
            o.iter()
                .filter(|(k, _)| !["type", "id", "name", "input"].contains(&k.as_str()))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect()
        })
        .unwrap_or_default();
    Ok(ToolCall {
        id,
        name,
        arguments: input.to_string(),
        extra,
    })
}
