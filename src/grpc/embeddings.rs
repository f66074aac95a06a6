//! `Embed` messages to and from the core's embeddings values. The typed fields are turned into
//! an OpenAI embeddings body and validated by the same code as HTTP's, so both protocols accept
//! and refuse the same requests.

use serde_json::Value;

use super::convert::parse_object;
use crate::api::{openai_embeddings, EmbeddingsRequest};
use crate::core::{Embeddings, Rejection};
use crate::proto;

/// An `EmbedRequest` as a neutral request. Typed fields win over the same fields in
/// `extra_json`, which is read with OpenAI's meaning.
pub fn embed_request(req: proto::EmbedRequest) -> Result<EmbeddingsRequest, Rejection> {
    let mut body = match req.extra_json.as_deref().filter(|s| !s.trim().is_empty()) {
        Some(json) => parse_object(json, "extra_json")?,
        None => Default::default(),
    };
    // The RPC decides these: vectors travel as floats, the input is typed.
    for key in ["model", "input", "encoding_format"] {
        body.remove(key);
    }
    body.insert("model".into(), Value::String(req.model));
    let input = match (req.texts.is_empty(), req.tokens.is_empty()) {
        (false, false) => {
            return Err(Rejection::invalid(
                "tokens",
                "set `texts` or `tokens`, not both",
            ))
        }
        (false, true) => Some(Value::from(req.texts)),
        (true, false) => Some(Value::Array(
            req.tokens.into_iter().map(|t| Value::from(t.ids)).collect(),
        )),
        (true, true) => None,
    };
    match input {
        Some(input) => body.insert("input".into(), input),
        None => {
            return Err(Rejection::invalid(
                "texts",
                "`texts` or `tokens` is required",
            ))
        }
    };
    if let Some(d) = req.dimensions {
        body.insert("dimensions".into(), d.into());
    }
    if let Some(u) = req.user {
        body.insert("user".into(), Value::String(u));
    }
    openai_embeddings::request_from_object(body)
}

/// A finished embeddings request as an `EmbedResponse`.
pub fn embed_response(e: Embeddings, request_id: &str) -> proto::EmbedResponse {
    proto::EmbedResponse {
        resolved_model: e.resolved_model,
        embeddings: e
            .response
            .vectors
            .into_iter()
            .enumerate()
            .map(|(i, values)| proto::Embedding {
                index: u32::try_from(i).unwrap_or(u32::MAX),
                values,
            })
            .collect(),
        usage: Some(e.usage.into()),
        request_id: request_id.to_string(),
        model: e.requested_model,
    }
}
