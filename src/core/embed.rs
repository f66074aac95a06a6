//! An embeddings request: the same stages as a chat request ([`super::gateway::admit`]:
//! authentication, provisioning, blocked check, routing, model allow-list, rate limits and a
//! budget reservation priced on the input alone), then the chain walk, under one
//! [`OutcomeGuard`].

use std::sync::Arc;

use super::dispatch::Dispatch;
use super::gateway::{admit, open_record, Gateway, Runtime};
use super::outcome::OutcomeGuard;
use super::policy::Demand;
use super::{CallContext, Rejection};
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
    pub policy_headers: Vec<(&'static str, String)>,
}

/// One embeddings request in flight. Dropping it before it finishes records
/// `client_disconnected`.
pub struct EmbeddingsCall {
    pub(super) gateway: Arc<Gateway>,
    pub(super) runtime: Arc<Runtime>,
    pub(super) ctx: CallContext,
    pub(super) guard: OutcomeGuard,
}

impl EmbeddingsCall {
    /// The request id.
    pub fn request_id(&self) -> &str {
        &self.ctx.request_id
    }

    /// Runs the request: `decoded` is the adapter's decoding of the body (or why it failed).
    pub async fn run(
        self,
        decoded: Result<EmbeddingsRequest, Rejection>,
    ) -> Result<Embeddings, Rejection> {
        use tracing::Instrument;
        let span = tracing::info_span!(
            "embeddings",
            request_id = %self.ctx.request_id,
            protocol = self.ctx.protocol.as_str()
        );
        async move {
            self.run_inner(decoded).await.map_err(|(guard, rejection)| {
                tracing::debug!(reason = rejection.reason.as_str(), message = %rejection.message, "embeddings request rejected");
                guard.finish(rejection.reason);
                rejection
            })
        }
        .instrument(span)
        .await
    }

    async fn run_inner(
        self,
        decoded: Result<EmbeddingsRequest, Rejection>,
    ) -> Result<Embeddings, (OutcomeGuard, Rejection)> {
        use tracing::Instrument;
        let EmbeddingsCall {
            gateway,
            runtime: rt,
            ctx,
            mut guard,
        } = self;
        open_record(&rt, &ctx, &mut guard);
        let req = match decoded {
            Ok(r) => r,
            Err(e) => return Err((guard, e)),
        };
        {
            let rec = guard.record();
            rec.requested_model = req.model.clone();
            rec.model_label = rt.router.label(&req.model);
        }
        let demand = Demand::embeddings(&req);
        let (route, policy_headers) =
            match admit(&gateway, &rt, &ctx, &mut guard, &req.model, demand).await {
                Ok(admitted) => admitted,
                Err(e) => return Err((guard, e)),
            };
        let upstream = Dispatch {
            gateway: &gateway,
            request_id: &ctx.request_id,
        };
        upstream
            .embed(route, req, guard)
            .instrument(tracing::debug_span!("upstream"))
            .await
            .map(|mut e| {
                e.policy_headers = policy_headers;
                e
            })
    }
}
