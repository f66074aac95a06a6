//! Upstream providers behind one trait: the OpenAI-compatible client (OpenAI, vLLM, Ollama,
//! ...), the Anthropic Messages client, and the deterministic mock. The core holds them as
//! `dyn Provider` and never looks at their wire formats (docs/architecture.md).

mod anthropic;
mod connector;
mod http;
pub mod key_pool;
mod mock;
mod openai;
pub mod sse;

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures_util::Stream;

use crate::api::{
    Api, ChatDelta, ChatRequest, ChatResponse, EmbeddingsRequest, EmbeddingsResponse, NativeBody,
};
pub use crate::api::{JsonObject, Usage};
use crate::clock::Clock;
use crate::config::{ProviderConfig, ProviderKind, ProviderSettings};
pub use key_pool::{KeyPool, KeyPoolObserver};

/// The W3C trace context sent on an upstream request (`traceparent`, `tracestate`), and the
/// pool keys the upstream turned away during the attempt (for the attempt's span).
#[derive(Debug)]
pub struct TraceHeaders {
    pub traceparent: String,
    pub tracestate: Option<String>,
    rejected_keys: std::sync::Mutex<Vec<RejectedKey>>,
}

/// A pool key the upstream answered 429, 401 or 403 to, before the walk moved on.
#[derive(Debug, Clone, Copy)]
pub struct RejectedKey {
    pub at: std::time::Instant,
    /// The key's position in `keys` (never the key).
    pub index: usize,
    pub status: u16,
}

impl TraceHeaders {
    /// The context of one attempt.
    pub fn new(traceparent: String, tracestate: Option<String>) -> TraceHeaders {
        TraceHeaders {
            traceparent,
            tracestate,
            rejected_keys: std::sync::Mutex::new(Vec::new()),
        }
    }

    /// Notes a key the upstream turned away.
    pub fn reject_key(&self, index: usize, status: u16) {
        let key = RejectedKey {
            at: std::time::Instant::now(),
            index,
            status,
        };
        match self.rejected_keys.lock() {
            Ok(mut v) => v.push(key),
            Err(poisoned) => poisoned.into_inner().push(key),
        }
    }

    /// The keys turned away so far, in order.
    pub fn rejected_keys(&self) -> Vec<RejectedKey> {
        match self.rejected_keys.lock() {
            Ok(v) => v.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }
}

/// One chat call to an upstream: the neutral request and the upstream's name for the model.
#[derive(Debug, Clone, Copy)]
pub struct UpstreamCall<'a> {
    /// The model name the upstream knows (without the `provider/` prefix).
    pub model: &'a str,
    pub request: &'a ChatRequest,
    pub request_id: &'a str,
    /// The attempt's trace context, sent as headers.
    pub trace: Option<&'a TraceHeaders>,
}

/// One embeddings call to an upstream.
#[derive(Debug, Clone, Copy)]
pub struct EmbedCall<'a> {
    pub model: &'a str,
    pub request: &'a EmbeddingsRequest,
    pub request_id: &'a str,
    /// The attempt's trace context, sent as headers.
    pub trace: Option<&'a TraceHeaders>,
}

/// One pass-through call: the caller's body, in the upstream's own wire, with only `model`
/// changed to the upstream's name for it.
#[derive(Debug, Clone, Copy)]
pub struct NativeCall<'a> {
    /// The model name the upstream knows (without the `provider/` prefix).
    pub model: &'a str,
    pub native: &'a NativeBody,
    pub request_id: &'a str,
    /// The attempt's trace context, sent as headers.
    pub trace: Option<&'a TraceHeaders>,
    /// What the answer's `model` is rewritten to (the resolved `provider/model`).
    pub answer_model: &'a str,
}

/// A whole pass-through answer: the upstream's bytes (only `model` rewritten) and the usage read
/// from them.
#[derive(Debug, Clone)]
pub struct NativeResponse {
    pub body: bytes::Bytes,
    /// As the upstream reported it.
    pub usage: Option<Usage>,
    /// Characters generated, for an estimate when no usage came.
    pub generated_chars: usize,
    /// The model the upstream says answered, when it says.
    pub response_model: Option<String>,
    /// Each choice's finish reason, where the wire has choices (chat completions).
    pub finish_reasons: Vec<String>,
}

/// One event of a pass-through stream: its bytes as the upstream sent them (only `model`
/// rewritten), and what it says for accounting. Empty bytes: an event read for accounting and
/// kept from the caller (a usage chunk the caller did not ask for).
#[derive(Debug, Clone, Default)]
pub struct NativeChunk {
    pub bytes: bytes::Bytes,
    /// Usage so far, when this event reports it.
    pub usage: Option<Usage>,
    pub generated_chars: usize,
    /// The event that ends a complete answer (`message_stop`, a chat chunk's `finish_reason`).
    pub finished: bool,
    /// The finish reasons it gives, in OpenAI's words, where the wire has choices (chat).
    pub finish_reasons: Vec<String>,
}

/// Pass-through events as they arrive.
pub type NativeStream = Pin<Box<dyn Stream<Item = Result<NativeChunk, UpstreamError>> + Send>>;

/// Streamed deltas as they arrive; ends after the upstream's end of stream.
pub type DeltaStream = Pin<Box<dyn Stream<Item = Result<ChatDelta, UpstreamError>> + Send>>;

/// What a provider can do for a model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capabilities {
    pub chat: bool,
    pub stream: bool,
    pub embeddings: bool,
}

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
    /// The answer could not be read or parsed, or the stream reported an error.
    #[error("upstream sent a bad response: {0}")]
    BadResponse(String),
    /// The request asks for something this provider cannot do (the caller's request, for this
    /// target): an Anthropic model asked for embeddings, an audio part sent to Claude.
    #[error("{0}")]
    Unsupported(String),
}

/// An upstream the core can call.
#[async_trait::async_trait]
pub trait Provider: Send + Sync {
    /// The protocol it speaks.
    fn kind(&self) -> ProviderKind;

    /// Its upstream key pool, if it has one.
    fn key_pool(&self) -> Option<&KeyPool> {
        None
    }

    /// What it can do for `model`.
    fn capabilities(&self, model: &str) -> Capabilities;

    /// One non-streamed completion.
    async fn complete(&self, call: UpstreamCall<'_>) -> Result<ChatResponse, UpstreamError>;

    /// One streamed completion; returns once the upstream has accepted the request.
    async fn stream(&self, call: UpstreamCall<'_>) -> Result<DeltaStream, UpstreamError>;

    /// Embedding vectors for the inputs.
    async fn embed(&self, call: EmbedCall<'_>) -> Result<EmbeddingsResponse, UpstreamError>;

    /// Whether it takes requests of `api` natively (the caller's body passed through).
    fn native(&self, _api: Api) -> bool {
        false
    }

    /// One non-streamed pass-through call (only for an `api` that [`Provider::native`] takes).
    async fn native_complete(
        &self,
        _call: NativeCall<'_>,
    ) -> Result<NativeResponse, UpstreamError> {
        Err(UpstreamError::Unsupported(
            "this provider takes no pass-through requests".into(),
        ))
    }

    /// One streamed pass-through call; returns once the upstream has accepted the request.
    async fn native_stream(&self, _call: NativeCall<'_>) -> Result<NativeStream, UpstreamError> {
        Err(UpstreamError::Unsupported(
            "this provider takes no pass-through requests".into(),
        ))
    }

    /// The upstream's own count of the request's input tokens (Anthropic's
    /// `/v1/messages/count_tokens`).
    async fn native_count_tokens(&self, _call: NativeCall<'_>) -> Result<u64, UpstreamError> {
        Err(UpstreamError::Unsupported(
            "this provider counts no tokens".into(),
        ))
    }
}

/// Builds the provider for a configuration.
pub fn from_config(
    name: &str,
    cfg: &ProviderConfig,
    clock: Clock,
    observer: Arc<dyn KeyPoolObserver>,
) -> Result<Arc<dyn Provider>, String> {
    Ok(match &cfg.settings {
        ProviderSettings::Openai(h) => {
            Arc::new(openai::OpenAiProvider::new(name, h, clock, observer)?)
        }
        ProviderSettings::Anthropic(a) => {
            Arc::new(anthropic::AnthropicProvider::new(name, a, clock, observer)?)
        }
        ProviderSettings::Mock(m) => Arc::new(mock::MockProvider::new(m, clock)),
    })
}

/// Unix seconds of a clock, for the `created` field of answers.
fn unix_secs(clock: &Clock) -> u64 {
    u64::try_from(clock.now_ms() / 1000).unwrap_or(0)
}
