//! Any OpenAI-compatible server: chat completions and embeddings.

use std::sync::Arc;

use futures_util::StreamExt;
use serde_json::{json, Value};

use super::http::{HttpUpstream, KeyHeader};
use super::{
    Capabilities, DeltaStream, EmbedCall, KeyPool, KeyPoolObserver, Provider, UpstreamCall,
    UpstreamError,
};
use crate::api::{openai_chat, ChatResponse, EmbeddingInput, EmbeddingsResponse};
use crate::clock::Clock;
use crate::config::{HttpUpstreamConfig, ProviderKind};

/// An OpenAI-compatible upstream.
pub struct OpenAiProvider {
    chat_url: String,
    embeddings_url: String,
    http: HttpUpstream,
}

impl OpenAiProvider {
    /// Builds the client; the base URL was validated with the config.
    pub fn new(
        name: &str,
        cfg: &HttpUpstreamConfig,
        clock: Clock,
        observer: Arc<dyn KeyPoolObserver>,
    ) -> Result<Self, String> {
        Ok(Self {
            chat_url: format!("{}/chat/completions", cfg.base_url),
            embeddings_url: format!("{}/embeddings", cfg.base_url),
            http: HttpUpstream::new(name, cfg, KeyHeader::Bearer, clock, observer)?,
        })
    }
}

#[async_trait::async_trait]
impl Provider for OpenAiProvider {
    fn kind(&self) -> ProviderKind {
        ProviderKind::Openai
    }

    fn key_pool(&self) -> Option<&KeyPool> {
        Some(self.http.keys())
    }

    fn capabilities(&self, _model: &str) -> Capabilities {
        // An OpenAI-compatible server may serve any model it names; it says no itself.
        Capabilities {
            chat: true,
            stream: true,
            embeddings: true,
        }
    }

    async fn complete(&self, call: UpstreamCall<'_>) -> Result<ChatResponse, UpstreamError> {
        let deadline = self.http.deadline();
        let body = openai_chat::encode_request(call.request, call.model, false);
        let resp = self
            .http
            .post(&self.chat_url, call.request_id, &[], body.into(), deadline)
            .await?;
        let bytes = self.http.body(resp, deadline).await?;
        openai_chat::parse_response(&bytes).map_err(UpstreamError::BadResponse)
    }

    /// Asks for usage so that every stream can be accounted.
    async fn stream(&self, call: UpstreamCall<'_>) -> Result<DeltaStream, UpstreamError> {
        let deadline = self.http.deadline();
        let body = openai_chat::encode_request(call.request, call.model, true);
        let resp = self
            .http
            .post(&self.chat_url, call.request_id, &[], body.into(), deadline)
            .await?;
        let mut failed = false;
        let deltas = self
            .http
            .sse_data(resp, deadline)
            .take_while(|item| {
                let done = matches!(item, Ok(data) if data.trim() == "[DONE]");
                futures_util::future::ready(!done)
            })
            .filter_map(move |item| {
                // After a bad chunk the stream is over: what follows cannot be trusted.
                let out = if failed {
                    None
                } else {
                    Some(item.and_then(|data| {
                        openai_chat::parse_chunk(&data)
                            .map_err(|e| UpstreamError::BadResponse(format!("bad chunk: {e}")))
                    }))
                };
                failed |= matches!(out, Some(Err(_)));
                futures_util::future::ready(out)
            });
        Ok(Box::pin(deltas))
    }

    async fn embed(&self, call: EmbedCall<'_>) -> Result<EmbeddingsResponse, UpstreamError> {
        let deadline = self.http.deadline();
        let req = call.request;
        let mut body = req.extra.clone();
        body.insert("model".into(), Value::String(call.model.to_string()));
        body.insert(
            "input".into(),
            match &req.input {
                EmbeddingInput::Texts(t) => json!(t),
                EmbeddingInput::Tokens(t) => json!(t),
            },
        );
        if let Some(d) = req.dimensions {
            body.insert("dimensions".into(), d.into());
        }
        // Floats from the upstream; the adapter encodes what the caller asked for.
        body.remove("encoding_format");
        let bytes = serde_json::to_vec(&body)
            .map_err(|e| UpstreamError::BadResponse(format!("cannot encode request: {e}")))?;
        let resp = self
            .http
            .post(
                &self.embeddings_url,
                call.request_id,
                &[],
                bytes.into(),
                deadline,
            )
            .await?;
        let bytes = self.http.body(resp, deadline).await?;
        parse_embeddings(&bytes, req.input.len())
    }
}

/// An OpenAI embeddings answer: `data[].embedding` in `index` order, `usage.prompt_tokens`.
fn parse_embeddings(bytes: &[u8], expected: usize) -> Result<EmbeddingsResponse, UpstreamError> {
    let bad = |m: String| UpstreamError::BadResponse(m);
    let v: Value = serde_json::from_slice(bytes).map_err(|e| bad(format!("not JSON: {e}")))?;
    let data = v
        .get("data")
        .and_then(Value::as_array)
        .ok_or_else(|| bad("no `data` in the answer".into()))?;
    let mut vectors: Vec<Option<Vec<f32>>> = vec![None; expected];
    for (i, item) in data.iter().enumerate() {
        let index = item
            .get("index")
            .and_then(Value::as_u64)
            .map_or(i, |n| n as usize);
        let embedding = item
            .get("embedding")
            .and_then(Value::as_array)
            .ok_or_else(|| bad(format!("data[{i}].embedding is not an array")))?
            .iter()
            .map(|x| x.as_f64().map(|f| f as f32))
            .collect::<Option<Vec<f32>>>()
            .ok_or_else(|| bad(format!("data[{i}].embedding holds a non-number")))?;
        match vectors.get_mut(index) {
            Some(slot) => *slot = Some(embedding),
            None => return Err(bad(format!("data[{i}].index {index} is out of range"))),
        }
    }
    let vectors = vectors
        .into_iter()
        .collect::<Option<Vec<_>>>()
        .ok_or_else(|| bad(format!("expected {expected} vectors")))?;
    Ok(EmbeddingsResponse {
        model: v
            .get("model")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string(),
        vectors,
        prompt_tokens: v.pointer("/usage/prompt_tokens").and_then(Value::as_u64),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embeddings_in_index_order() {
        let r = parse_embeddings(
            br#"{"data":[{"index":1,"embedding":[3.0]},{"index":0,"embedding":[1.0,2.0]}],"model":"e","usage":{"prompt_tokens":5}}"#,
            2,
        )
        .unwrap();
        assert_eq!(r.vectors, vec![vec![1.0, 2.0], vec![3.0]]);
        assert_eq!(r.prompt_tokens, Some(5));
        assert!(parse_embeddings(br#"{"data":[]}"#, 1).is_err());
    }
}
