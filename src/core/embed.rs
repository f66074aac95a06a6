//! An embeddings request: the same stages as a chat request ([`super::gateway::admit`]:
//! authentication, provisioning, blocked check, routing, model allow-list, rate limits and a
//! budget reservation priced on the input alone), then the chain walk, under one
//! [`OutcomeGuard`].

use super::dispatch::Dispatch;
use super::gateway::{Admitted, OpenCall};
use super::Rejection;
use crate::api::{EmbeddingsRequest, EmbeddingsResponse, EncodingFormat, Usage};

/// A finished embeddings request.
#[derive(Debug)]
pub struct Embeddings {
    /// The vectors, `model` set to the resolved `provider/model`.
    pub response: EmbeddingsResponse,
    /// The model or alias the caller named (OpenAI's answer echoes it).
    pub requested_model: String,
    pub resolved_model: String,
    /// Input tokens as the upstream reported them (estimated when it reported none).
    pub usage: Usage,
    /// How the caller asked for the vectors to be encoded.
    pub encoding_format: EncodingFormat,
    /// Rate-limit and budget headers (`x-ratelimit-*`, `x-budget-*`).
    pub policy_headers: crate::error::PolicyHeaders,
}

/// One embeddings request in flight. Dropping it before it finishes records
/// `client_disconnected`.
pub struct EmbeddingsCall(pub(super) OpenCall);

impl EmbeddingsCall {
    /// The request id.
    pub fn request_id(&self) -> &str {
        &self.0.ctx.request_id
    }

    /// Runs the request: `decoded` is the adapter's decoding of the body (or why it failed).
    pub async fn run(
        self,
        decoded: Result<EmbeddingsRequest, Rejection>,
    ) -> Result<Embeddings, Rejection> {
        use tracing::Instrument;
        self.0
            .run(decoded, async |a: Admitted<'_, EmbeddingsRequest>| {
                Dispatch {
                    gateway: a.gateway,
                    request_id: &a.ctx.request_id,
                }
                .embed(a.route, a.request, a.guard)
                .instrument(tracing::debug_span!("upstream"))
                .await
                .map(|mut e| {
                    e.policy_headers = a.policy_headers;
                    e
                })
            })
            .await
    }
}
