//! The Anthropic Messages API (DESIGN.md section 5): `POST {base_url}/v1/messages` with the
//! pool key in `x-api-key`, `anthropic-version` and the configured `anthropic-beta`. The
//! translation itself lives in `crate::api::anthropic`.

use std::sync::Arc;

use futures_util::StreamExt;

use super::http::{HttpUpstream, KeyHeader};
use super::{
    unix_secs, Capabilities, DeltaStream, EmbedCall, KeyPool, KeyPoolObserver, Provider,
    UpstreamCall, UpstreamError,
};
use crate::api::anthropic::{self, StreamDecoder, StreamError};
use crate::api::{ChatResponse, EmbeddingsResponse};
use crate::clock::Clock;
use crate::config::{AnthropicConfig, ProviderKind};

/// An Anthropic upstream.
pub struct AnthropicProvider {
    url: String,
    http: HttpUpstream,
    config: AnthropicConfig,
    beta: Option<String>,
    clock: Clock,
}

impl AnthropicProvider {
    /// Builds the client; the base URL was validated with the config.
    pub fn new(
        name: &str,
        cfg: &AnthropicConfig,
        clock: Clock,
        observer: Arc<dyn KeyPoolObserver>,
    ) -> Result<Self, String> {
        // `https://api.anthropic.com` and `https://api.anthropic.com/v1` both mean the API root.
        let base = cfg.http.base_url.trim_end_matches("/v1");
        let beta = (!cfg.anthropic_beta.is_empty()).then(|| cfg.anthropic_beta.join(","));
        Ok(Self {
            url: format!("{base}/v1/messages"),
            http: HttpUpstream::new(name, &cfg.http, KeyHeader::XApiKey, clock.clone(), observer)?,
            config: cfg.clone(),
            beta,
            clock,
        })
    }

    async fn send(
        &self,
        call: UpstreamCall<'_>,
        stream: bool,
        deadline: std::time::Instant,
    ) -> Result<reqwest::Response, UpstreamError> {
        let body = anthropic::encode_request(
            call.request,
            call.model,
            stream,
            self.config.max_tokens_for(call.model),
        )
        .map_err(|e| UpstreamError::Unsupported(e.to_string()))?;
        let bytes = serde_json::to_vec(&body)
            .map_err(|e| UpstreamError::BadResponse(format!("cannot encode request: {e}")))?;
        let mut headers = vec![("anthropic-version", self.config.anthropic_version.as_str())];
        if let Some(beta) = &self.beta {
            headers.push(("anthropic-beta", beta.as_str()));
        }
        self.http
            .post(&self.url, call.request_id, &headers, bytes.into(), deadline)
            .await
    }
}

#[async_trait::async_trait]
impl Provider for AnthropicProvider {
    fn kind(&self) -> ProviderKind {
        ProviderKind::Anthropic
    }

    fn key_pool(&self) -> Option<&KeyPool> {
        Some(self.http.keys())
    }

    fn capabilities(&self, _model: &str) -> Capabilities {
        Capabilities {
            chat: true,
            stream: true,
            embeddings: false,
        }
    }

    async fn complete(&self, call: UpstreamCall<'_>) -> Result<ChatResponse, UpstreamError> {
        let deadline = self.http.deadline();
        let resp = self.send(call, false, deadline).await?;
        let bytes = self.http.body(resp, deadline).await?;
        anthropic::parse_response(&bytes, unix_secs(&self.clock))
            .map_err(UpstreamError::BadResponse)
    }

    async fn stream(&self, call: UpstreamCall<'_>) -> Result<DeltaStream, UpstreamError> {
        let deadline = self.http.deadline();
        let resp = self.send(call, true, deadline).await?;
        let mut decoder = StreamDecoder::new(unix_secs(&self.clock));
        let mut over = false;
        let deltas = self.http.sse_data(resp, deadline).filter_map(move |item| {
            let out = if over {
                None
            } else {
                match item {
                    Err(e) => Some(Err(e)),
                    Ok(data) => match decoder.event(&data) {
                        Ok(delta) => delta.map(Ok),
                        Err(StreamError::Upstream {
                            error_type,
                            message,
                        }) => Some(Err(UpstreamError::BadResponse(format!(
                            "{error_type}: {message}"
                        )))),
                        Err(StreamError::Malformed(m)) => {
                            Some(Err(UpstreamError::BadResponse(format!("bad event: {m}"))))
                        }
                    },
                }
            };
            // After an error, or once `message_stop` is in, nothing more is for the caller.
            over |= matches!(out, Some(Err(_))) || decoder.is_finished();
            futures_util::future::ready(out)
        });
        Ok(Box::pin(deltas))
    }

    async fn embed(&self, _call: EmbedCall<'_>) -> Result<EmbeddingsResponse, UpstreamError> {
        Err(UpstreamError::Unsupported(
            "this model does not serve embeddings".into(),
        ))
    }
}
