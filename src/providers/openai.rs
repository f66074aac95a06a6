//! Any OpenAI-compatible server: chat completions and embeddings.

use std::sync::Arc;

use futures_util::StreamExt;

use super::http::{HttpUpstream, KeyHeader};
use super::{
    Capabilities, DeltaStream, EmbedCall, KeyPool, KeyPoolObserver, Provider, UpstreamCall,
    UpstreamError,
};
use crate::api::{openai_chat, openai_embeddings, ChatResponse, EmbeddingsResponse};
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
        let body = openai_embeddings::encode_request(call.request, call.model);
        let resp = self
            .http
            .post(
                &self.embeddings_url,
                call.request_id,
                &[],
                body.into(),
                deadline,
            )
            .await?;
        let bytes = self.http.body(resp, deadline).await?;
        openai_embeddings::parse_response(&bytes, call.request.input.len())
            .map_err(UpstreamError::BadResponse)
    }
}
