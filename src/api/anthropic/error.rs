//! What can go wrong between tollgate and the Messages API, and the API's own error bodies.

use serde_json::Value;

/// Why a neutral request cannot be said in the Messages API (the caller's request, for this
/// model): the caller should get a 400, and no other upstream is tried for it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TranslateError {
    /// A feature the Messages API does not have (audio input, `n` above 1, a role, ...).
    #[error("not supported by the Anthropic Messages API: {0}")]
    Unsupported(String),
    /// A tool result without the id of the call it answers.
    #[error("a tool message has no tool_call_id")]
    MissingToolCallId,
    /// An assistant tool call whose arguments are not a JSON object (the API wants `input` as one).
    #[error("tool call {call_id}: arguments are not a JSON object: {reason}")]
    ToolArguments { call_id: String, reason: String },
    /// An image URL that is neither `http(s)://` nor a base64 `data:` URL.
    #[error("image URL must be http(s) or a base64 data URL: {0}")]
    ImageUrl(String),
}

/// Why a stream of Messages API events could not be read on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StreamError {
    /// The API sent an `error` event (for example `overloaded_error`) after the stream began.
    #[error("{error_type}: {message}")]
    Upstream { error_type: String, message: String },
    /// An event that is not what the API documents.
    #[error("malformed Anthropic stream event: {0}")]
    Malformed(String),
}

/// `(error.type, error.message)` of an Anthropic error body
/// `{"type":"error","error":{"type","message"},"request_id"}`; `None` for anything else.
pub fn error_body(text: &str) -> Option<(String, String)> {
    let v: Value = serde_json::from_str(text).ok()?;
    error_fields(&v)
}

/// The `error` object's type and message, as in error bodies and `error` stream events.
pub(super) fn error_fields(v: &Value) -> Option<(String, String)> {
    let err = v.get("error")?;
    let error_type = err.get("type")?.as_str()?.to_string();
    let message = err
        .get("message")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    Some((error_type, message))
}
