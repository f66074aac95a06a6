//! A chat request as the core sees it: the OpenAI body, validated once for both protocols.

use serde_json::Value;

use super::{Reason, Rejection};
use crate::providers::JsonObject;

/// A validated chat-completions request. The whole body is kept so that fields tollgate does
/// not read (tools, response_format, seed, ...) reach the upstream untouched.
#[derive(Debug, Clone)]
pub struct ChatRequest {
    pub model: String,
    pub stream: bool,
    /// Whether the caller asked for the usage chunk at the end of a stream.
    pub include_usage: bool,
    pub body: JsonObject,
}

impl ChatRequest {
    /// Parses an OpenAI chat-completions body.
    pub fn from_json_bytes(bytes: &[u8]) -> Result<ChatRequest, Rejection> {
        let value: Value = serde_json::from_slice(bytes).map_err(|e| {
            Rejection::new(
                Reason::InvalidRequest,
                format!("the body is not valid JSON: {e}"),
            )
        })?;
        match value {
            Value::Object(body) => Self::from_body(body),
            _ => Err(Rejection::new(
                Reason::InvalidRequest,
                "the body must be a JSON object",
            )),
        }
    }

    /// Validates a body object: `model` a non-empty string, `messages` a non-empty array of
    /// objects with a string `role`.
    pub fn from_body(body: JsonObject) -> Result<ChatRequest, Rejection> {
        let model = match body.get("model") {
            Some(Value::String(m)) if !m.trim().is_empty() => m.clone(),
            Some(Value::String(_)) | None => {
                return Err(Rejection::invalid("model", "`model` is required"))
            }
            Some(_) => return Err(Rejection::invalid("model", "`model` must be a string")),
        };
        match body.get("messages") {
            Some(Value::Array(msgs)) if msgs.is_empty() => {
                return Err(Rejection::invalid(
                    "messages",
                    "`messages` must not be empty",
                ))
            }
            Some(Value::Array(msgs)) => {
                for (i, m) in msgs.iter().enumerate() {
                    let Some(obj) = m.as_object() else {
                        return Err(Rejection::invalid(
                            &format!("messages[{i}]"),
                            format!("`messages[{i}]` must be an object"),
                        ));
                    };
                    if !matches!(obj.get("role"), Some(Value::String(r)) if !r.is_empty()) {
                        return Err(Rejection::invalid(
                            &format!("messages[{i}].role"),
                            format!("`messages[{i}].role` must be a non-empty string"),
                        ));
                    }
                }
            }
            Some(_) => {
                return Err(Rejection::invalid(
                    "messages",
                    "`messages` must be an array",
                ))
            }
            None => return Err(Rejection::invalid("messages", "`messages` is required")),
        }
        let stream = match body.get("stream") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(_) => return Err(Rejection::invalid("stream", "`stream` must be a boolean")),
        };
        for field in ["max_tokens", "max_completion_tokens"] {
            match body.get(field) {
                None | Some(Value::Null) => {}
                Some(v) if v.as_u64().is_some() => {}
                Some(_) => {
                    return Err(Rejection::invalid(
                        field,
                        format!("`{field}` must be a non-negative integer"),
                    ))
                }
            }
        }
        if let Some(t) = body.get("temperature") {
            if !t.is_null() && !t.is_number() {
                return Err(Rejection::invalid(
                    "temperature",
                    "`temperature` must be a number",
                ));
            }
        }
        let include_usage = body
            .get("stream_options")
            .and_then(|o| o.get("include_usage"))
            .and_then(Value::as_bool)
            .unwrap_or(false);
        Ok(ChatRequest {
            model,
            stream,
            include_usage,
            body,
        })
    }

    /// The caller's output cap, if any.
    pub fn max_tokens(&self) -> Option<u64> {
        self.body
            .get("max_completion_tokens")
            .or_else(|| self.body.get("max_tokens"))
            .and_then(Value::as_u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(body: &str) -> Rejection {
        ChatRequest::from_json_bytes(body.as_bytes()).unwrap_err()
    }

    #[test]
    fn names_the_bad_field() {
        assert_eq!(err("{").reason, Reason::InvalidRequest);
        assert_eq!(
            err(r#"{"messages":[{"role":"user"}]}"#).param.as_deref(),
            Some("model")
        );
        assert_eq!(
            err(r#"{"model":"m","messages":[]}"#).param.as_deref(),
            Some("messages")
        );
        assert_eq!(
            err(r#"{"model":"m","messages":[{"content":"x"}]}"#)
                .param
                .as_deref(),
            Some("messages[0].role")
        );
        assert_eq!(
            err(r#"{"model":"m","messages":[{"role":"user"}],"max_tokens":"x"}"#)
                .param
                .as_deref(),
            Some("max_tokens")
        );
    }

    #[test]
    fn keeps_unknown_fields() {
        let r = ChatRequest::from_json_bytes(
            br#"{"model":"m","messages":[{"role":"user","content":"hi"}],"seed":7,"stream":true,"stream_options":{"include_usage":true}}"#,
        )
        .unwrap();
        assert!(r.stream && r.include_usage);
        assert_eq!(r.body["seed"], 7);
    }
}
