//! A neutral answer, and a rejection, as the Messages API says them to a caller: the Message
//! object and the error body `{"type":"error","error":{"type","message"}}`.

use serde_json::{json, Value};

use crate::api::{ChatResponse, Content, ContentPart, StopReason, Usage};
use crate::error::{Reason, Rejection};

/// A neutral stop reason as a Messages `stop_reason`.
pub fn stop_reason_name(r: &StopReason) -> &'static str {
    match r {
        StopReason::Stop => "end_turn",
        StopReason::Length => "max_tokens",
        StopReason::ToolCalls => "tool_use",
        StopReason::ContentFilter => "refusal",
        StopReason::Other(s) if s == "stop_sequence" => "stop_sequence",
        StopReason::Other(s) if s == "pause_turn" => "pause_turn",
        StopReason::Other(_) => "end_turn",
    }
}

/// A Messages `usage` object; Anthropic's `input_tokens` leaves out cache reads and writes.
pub fn usage_json(u: &Usage) -> Value {
    json!({
        "input_tokens": u
            .prompt_tokens
            .saturating_sub(u.cached_prompt_tokens)
            .saturating_sub(u.cache_creation_tokens),
        "cache_creation_input_tokens": u.cache_creation_tokens,
        "cache_read_input_tokens": u.cached_prompt_tokens,
        "output_tokens": u.completion_tokens,
    })
}

/// A message id: the upstream's when it is one of Anthropic's, else one made from it.
pub fn message_id(id: &str) -> String {
    if id.starts_with("msg_") {
        id.to_string()
    } else if id.is_empty() {
        format!("msg_{}", uuid_like())
    } else {
        format!("msg_{id}")
    }
}

fn uuid_like() -> String {
    use std::time::{SystemTime, UNIX_EPOCH};
    let n = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("{n:x}")
}

/// The Message object of a whole answer (its first choice): thinking blocks, then text, then
/// tool uses, the order Anthropic gives them in. `usage` is what the core accounted.
pub fn encode_response(resp: &ChatResponse, usage: &Usage) -> String {
    let mut content = Vec::new();
    let mut stop = None;
    if let Some(choice) = resp.choices.first() {
        let m = &choice.message;
        for r in &m.reasoning {
            match &r.redacted {
                Some(data) => content.push(json!({"type": "redacted_thinking", "data": data})),
                None => content.push(json!({
                    "type": "thinking",
                    "thinking": r.text,
                    "signature": r.signature.clone().unwrap_or_default(),
                })),
            }
        }
        match &m.content {
            Some(Content::Text(t)) if !t.is_empty() => {
                content.push(json!({"type": "text", "text": t}))
            }
            Some(Content::Parts(parts)) => {
                for p in parts {
                    if let ContentPart::Text { text, .. } = p {
                        if !text.is_empty() {
                            content.push(json!({"type": "text", "text": text}));
                        }
                    }
                }
            }
            _ => {}
        }
        for call in &m.tool_calls {
            // A model may produce arguments that are not an object; Anthropic's input is one.
            let input = serde_json::from_str::<Value>(&call.arguments)
                .ok()
                .filter(Value::is_object)
                .unwrap_or_else(|| json!({}));
            content.push(
                json!({"type": "tool_use", "id": call.id, "name": call.name, "input": input}),
            );
        }
        stop = choice.finish_reason.as_ref().map(stop_reason_name);
    }
    json!({
        "id": message_id(&resp.id),
        "type": "message",
        "role": "assistant",
        "model": resp.model,
        "content": content,
        "stop_reason": stop.unwrap_or("end_turn"),
        "stop_sequence": null,
        "usage": usage_json(usage),
    })
    .to_string()
}

/// Anthropic's error `type` for a reason: upstream failures are `overloaded_error` (what the
/// SDKs retry), tollgate's own failures `api_error`.
pub fn error_type(reason: Reason) -> &'static str {
    match reason {
        Reason::PayloadTooLarge => "request_too_large",
        Reason::RequestTimeout => "invalid_request_error",
        Reason::InvalidRequest | Reason::InvalidAuthRequest | Reason::UpstreamRejected => {
            "invalid_request_error"
        }
        Reason::AuthRejected => "authentication_error",
        Reason::InvalidServiceTypeForModel | Reason::SignupCapExceeded | Reason::Blocked => {
            "permission_error"
        }
        Reason::ModelNotFound => "not_found_error",
        Reason::BudgetExceeded | Reason::RateLimited => "rate_limit_error",
        Reason::UpstreamKeysExhausted {
            all_disabled: false,
        } => "rate_limit_error",
        Reason::UpstreamKeysExhausted { all_disabled: true }
        | Reason::UpstreamError
        | Reason::UpstreamTimeout => "overloaded_error",
        Reason::Success
        | Reason::AuthSystemFailure
        | Reason::ProvisioningFailure
        | Reason::PolicyUnavailable
        | Reason::InternalError
        | Reason::ClientDisconnected => "api_error",
    }
}

/// The error body for a rejection (also the data of a stream's `error` event).
pub fn error_json(r: &Rejection) -> Value {
    json!({
        "type": "error",
        "error": {"type": error_type(r.reason), "message": r.message},
    })
}
