//! Prompt and completion text as the GenAI conventions put it on spans
//! (`gen_ai.input.messages`, `gen_ai.output.messages`: JSON lists of messages of text parts).
//! Only built when `[telemetry] capture_content = true`.

use serde_json::{json, Value};

use crate::api::{ChatResponse, Message};

fn message(m: &Message, finish_reason: Option<&str>) -> Value {
    let mut parts = Vec::new();
    if let Some(content) = &m.content {
        parts.push(json!({"type": "text", "content": content.text()}));
    }
    for call in &m.tool_calls {
        parts.push(json!({"type": "tool_call", "id": call.id, "name": call.name}));
    }
    let mut v = json!({"role": m.role.as_str(), "parts": parts});
    if let Some(reason) = finish_reason {
        v["finish_reason"] = json!(reason);
    }
    v
}

/// `gen_ai.input.messages` of a chat request.
pub fn input_messages(messages: &[Message]) -> String {
    Value::Array(messages.iter().map(|m| message(m, None)).collect()).to_string()
}

/// `gen_ai.output.messages` of a whole answer.
pub fn output_messages(response: &ChatResponse) -> String {
    Value::Array(
        response
            .choices
            .iter()
            .map(|c| message(&c.message, c.finish_reason.as_ref().map(|r| r.as_openai())))
            .collect(),
    )
    .to_string()
}
