//! Upstream providers: the OpenAI-compatible client (OpenAI, vLLM, Ollama, ...) and the
//! deterministic mock. The core talks to them through [`Provider`].

pub mod key_pool;
mod mock;
mod openai;
pub mod sse;

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures_util::Stream;
use serde_json::{Map, Value};

use crate::clock::Clock;
use crate::config::{ProviderConfig, ProviderKind};
pub use key_pool::{KeyPool, KeyPoolObserver};

/// A JSON object (an OpenAI request body, response or chunk).
pub type JsonObject = Map<String, Value>;

pub use crate::api::Usage;

/// One call to an upstream: the OpenAI body with `model` already set to the upstream's name.
#[derive(Debug, Clone)]
pub struct UpstreamRequest {
    pub model: String,
    pub body: JsonObject,
    pub request_id: String,
}

/// A whole (non-streamed) answer.
#[derive(Debug)]
pub struct UpstreamReply {
    pub body: JsonObject,
    pub usage: Option<Usage>,
}

/// Streamed chunks as they arrive; ends after the upstream's `[DONE]` or end of body.
pub type UpstreamStream = Pin<Box<dyn Stream<Item = Result<JsonObject, UpstreamError>> + Send>>;

/// Why an upstream call failed.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// No connection could be made.
    #[error("cannot connect to upstream: {0}")]
    Connect(String),
    /// A deadline passed (`phase`: first byte, idle between chunks, or total).
    #[error("upstream timed out waiting for {0}")]
    Timeout(&'static str),
    /// The upstream answered with an error status.
    #[error("upstream answered {status}: {message}")]
    Status {
        status: u16,
        message: String,
        retry_after: Option<Duration>,
    },
    /// Every key of the provider is cooling down (`retry_after` is the soonest) or disabled.
    #[error("no usable upstream key")]
    KeysExhausted { retry_after: Option<Duration> },
    /// The answer could not be read or parsed.
    #[error("upstream sent a bad response: {0}")]
    BadResponse(String),
}

/// A configured upstream.
pub enum Provider {
    /// Any OpenAI-compatible server.
    OpenAi(openai::OpenAiProvider),
    /// Deterministic tokens for demos, tests and benchmarks.
    Mock(mock::MockProvider),
}

impl Provider {
    /// Builds the client for a provider's configuration.
    pub fn from_config(
        name: &str,
        cfg: &ProviderConfig,
        clock: Clock,
        observer: Arc<dyn KeyPoolObserver>,
    ) -> Result<Provider, String> {
        Ok(match cfg.kind {
            ProviderKind::Openai => {
                Provider::OpenAi(openai::OpenAiProvider::new(name, cfg, clock, observer)?)
            }
            ProviderKind::Mock => Provider::Mock(mock::MockProvider::new(cfg)),
        })
    }

    /// The provider's upstream key pool, if it has one.
    pub fn key_pool(&self) -> Option<&KeyPool> {
        match self {
            Provider::OpenAi(p) => Some(p.keys()),
            Provider::Mock(_) => None,
        }
    }

    /// One non-streamed completion.
    pub async fn complete(&self, req: UpstreamRequest) -> Result<UpstreamReply, UpstreamError> {
        match self {
            Provider::OpenAi(p) => p.complete(req).await,
            Provider::Mock(p) => p.complete(req).await,
        }
    }

    /// One streamed completion; returns once the upstream has accepted the request.
    pub async fn stream(&self, req: UpstreamRequest) -> Result<UpstreamStream, UpstreamError> {
        match self {
            Provider::OpenAi(p) => p.stream(req).await,
            Provider::Mock(p) => Ok(p.stream(req)),
        }
    }
}

/// Counts tokens the cheap way (about four characters a token) when an upstream reports none.
pub fn estimate_tokens(chars: usize) -> u64 {
    chars.div_ceil(4) as u64
}

/// Estimates prompt tokens from an OpenAI `messages` array.
pub fn estimate_prompt_tokens(body: &JsonObject) -> u64 {
    let chars: usize = body
        .get("messages")
        .and_then(Value::as_array)
        .map(|msgs| {
            msgs.iter()
                .map(|m| match m.get("content") {
                    Some(Value::String(s)) => s.len(),
                    Some(other) => other.to_string().len(),
                    None => 0,
                } + 4)
                .sum()
        })
        .unwrap_or(0);
    estimate_tokens(chars)
}
