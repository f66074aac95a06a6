//! Embeddings through a route: the first target that serves them.

use std::sync::Arc;
use std::time::Instant;

use super::chain::ChainWalk;
use super::{failed_attempt, Dispatch};
use crate::api::{EmbeddingsRequest, Usage};
use crate::core::embed::Embeddings;
use crate::core::outcome::OutcomeGuard;
use crate::core::trace::{Attempt, AttemptEnd};
use crate::core::{Reason, Rejection};
use crate::providers::{EmbedCall, UpstreamError};
use crate::routing::Route;

impl Dispatch<'_> {
    /// Vectors from the first target that gives them. A target whose provider cannot embed ends
    /// the walk with `invalid_request`: another target would not make the request right.
    pub async fn embed(
        &self,
        route: Arc<Route>,
        req: EmbeddingsRequest,
        mut guard: OutcomeGuard,
    ) -> Result<Embeddings, (OutcomeGuard, Rejection)> {
        let mut walk = ChainWalk::new(&route);
        let mut cannot_embed = false;
        while let Some(target) = walk.next_target(self.gateway) {
            let caps = target.provider.client.capabilities(&target.model);
            if !caps.embeddings {
                walk.failed(
                    target,
                    UpstreamError::Unsupported("this model does not serve embeddings".into()),
                );
                cannot_embed = true;
                break;
            }
            let attempt = self.open_attempt(&mut guard, target);
            let started = Instant::now();
            let call = EmbedCall {
                model: &target.model,
                request: &req,
                request_id: self.request_id,
                trace: attempt.as_ref().and_then(Attempt::headers),
            };
            let result = target.provider.client.embed(call).await;
            guard.record().upstream_wait += started.elapsed();
            self.observe(target, started, result.as_ref().map(|_| ()));
            match result {
                Ok(mut response) => {
                    self.resolved(&route, target);
                    response.model.clone_from(&target.resolved);
                    // Settled on what the upstream counted; the estimate only when it is silent.
                    let usage = Usage {
                        prompt_tokens: response
                            .prompt_tokens
                            .unwrap_or_else(|| req.input.estimate_tokens()),
                        ..Usage::default()
                    };
                    self.end_attempt(
                        &mut guard,
                        attempt,
                        AttemptEnd::Success {
                            response_model: Some(target.model.clone()),
                            usage: Some(usage),
                        },
                    );
                    let rec = guard.record();
                    rec.resolved_model = Some(target.resolved.clone());
                    rec.resolved_label = Some(target.label.clone());
                    rec.usage = usage;
                    guard.finish(Reason::Success);
                    return Ok(Embeddings {
                        response,
                        requested_model: req.model,
                        resolved_model: target.resolved.clone(),
                        usage,
                        encoding_format: req.encoding_format.unwrap_or_default(),
                        policy_headers: Vec::new(),
                    });
                }
                Err(e) => {
                    self.end_attempt(&mut guard, attempt, failed_attempt(&e));
                    if !walk.failed(target, e) {
                        break;
                    }
                }
            }
        }
        let rejection = walk.into_rejection();
        let rejection = if cannot_embed {
            rejection.with_param("model")
        } else {
            rejection
        };
        Err((guard, rejection))
    }
}
