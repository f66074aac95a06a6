//! A translated answer as a Response object: a `reasoning` item where the upstream reasoned, a
//! `message` item with `output_text`, then one `function_call` item per call; `status`
//! `incomplete` when the output cap cut it short.

use serde_json::{json, Value};

use super::request::Echo;
use super::{id_with, usage_json};
use crate::api::{ChatResponse, Reasoning, StopReason, ToolCall, Usage};

/// The Response object of a whole answer (its first choice); `usage` is what the core accounted.
pub fn encode_response(resp: &ChatResponse, usage: &Usage, echo: &Echo) -> String {
    let mut output = Vec::new();
    let mut stop = None;
    if let Some(choice) = resp.choices.first() {
        stop = choice.finish_reason.clone();
        let m = &choice.message;
        if !m.reasoning.is_empty() {
            output.push(reasoning_item(
                &id_with("rs_", &resp.id, 0),
                &m.reasoning,
                "completed",
            ));
        }
        let text = m
            .content
            .as_ref()
            .map(crate::api::Content::text)
            .unwrap_or_default();
        if !text.is_empty() || m.tool_calls.is_empty() {
            output.push(message_item(
                &id_with("msg_", &resp.id, 0),
                &text,
                "completed",
            ));
        }
        for (i, call) in m.tool_calls.iter().enumerate() {
            output.push(function_call_item(
                &id_with("fc_", &resp.id, i),
                call,
                "completed",
            ));
        }
    }
    let (status, incomplete) = status_of(stop.as_ref());
    let r = response_object(
        &id_with("resp_", &resp.id, 0),
        resp.created,
        echo,
        status,
        incomplete,
        output,
        Some(usage),
    );
    r.to_string()
}

/// `status` and `incomplete_details` for how the model stopped.
pub(super) fn status_of(stop: Option<&StopReason>) -> (&'static str, Value) {
    match stop {
        Some(StopReason::Length) => ("incomplete", json!({"reason": "max_output_tokens"})),
        Some(StopReason::ContentFilter) => ("incomplete", json!({"reason": "content_filter"})),
        _ => ("completed", Value::Null),
    }
}

/// A Response object: the echoed request fields, `output`, `usage` (null while in progress).
pub(super) fn response_object(
    id: &str,
    created: u64,
    echo: &Echo,
    status: &str,
    incomplete: Value,
    output: Vec<Value>,
    usage: Option<&Usage>,
) -> Value {
    let mut r = json!({
        "id": id,
        "object": "response",
        "created_at": created,
        "status": status,
        "background": false,
        "error": null,
        "incomplete_details": incomplete,
        "model": echo.model,
        "output": output,
        "previous_response_id": null,
        "usage": usage.map(usage_json),
    });
    if let Value::Object(o) = &mut r {
        for (k, v) in &echo.fields {
            o.insert(k.clone(), v.clone());
        }
    }
    r
}

/// An assistant `message` item holding one `output_text` part.
pub(super) fn message_item(id: &str, text: &str, status: &str) -> Value {
    json!({
        "id": id,
        "type": "message",
        "status": status,
        "role": "assistant",
        "content": [output_text(text)],
    })
}

/// An `output_text` content part.
pub(super) fn output_text(text: &str) -> Value {
    json!({"type": "output_text", "text": text, "annotations": [], "logprobs": []})
}

/// A `function_call` item.
pub(super) fn function_call_item(id: &str, call: &ToolCall, status: &str) -> Value {
    json!({
        "id": id,
        "type": "function_call",
        "status": status,
        "call_id": call.id,
        "name": call.name,
        "arguments": call.arguments,
    })
}

/// A `reasoning` item: the reasoning text as `reasoning_text` content; Anthropic's signature
/// rides in `encrypted_content`, so that a caller sending the item back round-trips it.
pub(super) fn reasoning_item(id: &str, reasoning: &[Reasoning], status: &str) -> Value {
    let content: Vec<Value> = reasoning
        .iter()
        .filter(|r| r.redacted.is_none())
        .map(|r| json!({"type": "reasoning_text", "text": r.text}))
        .collect();
    let signature = reasoning.iter().rev().find_map(|r| r.signature.clone());
    json!({
        "id": id,
        "type": "reasoning",
        "status": status,
        "summary": [],
        "content": content,
        "encrypted_content": signature,
    })
}
