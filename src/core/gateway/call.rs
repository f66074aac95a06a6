//! What every model request in flight holds (`OpenCall`), and the steps every one takes in the
//! same order whatever its API: the record filled from the context, the body's decoding
//! checked, the shared admission stages (`admit`), then the API's own upstream step; a
//! rejection at any point is logged and recorded once, by the outcome guard.

use std::sync::Arc;

use super::{admit, open_record, Gateway, Runtime};
use crate::api::{Api, ChatRequest, EmbeddingsRequest};
use crate::core::outcome::OutcomeGuard;
use crate::core::policy::Demand;
use crate::core::{CallContext, Rejection};
use crate::error::PolicyHeaders;
use crate::routing::Route;

/// A model request from the moment it entered the core; dropping it unfinished records
/// `client_disconnected`.
pub(in crate::core) struct OpenCall {
    pub gateway: Arc<Gateway>,
    pub runtime: Arc<Runtime>,
    pub ctx: CallContext,
    pub guard: OutcomeGuard,
}

/// What the shared stages read of a decoded request.
pub(in crate::core) trait ModelRequest {
    /// The model or alias the caller named.
    fn model(&self) -> &str;
    /// Whether the answer is streamed.
    fn stream(&self) -> bool;
    /// What admission charges and reserves for it.
    fn demand(&self) -> Demand;
    /// `gen_ai.input.messages`, for a span that captures content.
    fn trace_input(&self) -> Option<String> {
        None
    }
}

impl ModelRequest for ChatRequest {
    fn model(&self) -> &str {
        &self.model
    }
    fn stream(&self) -> bool {
        self.stream
    }
    fn demand(&self) -> Demand {
        Demand::chat(self)
    }
    fn trace_input(&self) -> Option<String> {
        Some(crate::core::trace::content::input_messages(&self.messages))
    }
}

impl ModelRequest for EmbeddingsRequest {
    fn model(&self) -> &str {
        &self.model
    }
    fn stream(&self) -> bool {
        false
    }
    fn demand(&self) -> Demand {
        Demand::embeddings(self)
    }
}

/// What an API's upstream step is given once admission has passed.
pub(in crate::core) struct Admitted<'a, R> {
    pub gateway: &'a Gateway,
    pub ctx: &'a CallContext,
    pub route: Arc<Route>,
    pub request: R,
    pub guard: OutcomeGuard,
    pub policy_headers: PolicyHeaders,
}

impl Gateway {
    /// Opens a model request that came in on `api`: from here on exactly one outcome will be
    /// recorded for it.
    pub(in crate::core) fn open_call(self: &Arc<Self>, ctx: CallContext, api: Api) -> OpenCall {
        let mut guard = OutcomeGuard::new(
            self.recorder.clone(),
            ctx.protocol,
            api,
            ctx.request_id.clone(),
        );
        guard.start_trace(ctx.trace_parent.as_ref());
        OpenCall {
            gateway: self.clone(),
            runtime: self.runtime(),
            ctx,
            guard,
        }
    }
}

impl OpenCall {
    /// Runs the shared stages on `decoded` (the adapter's decoding of the body, or why it
    /// failed), then `upstream`. Every log line of the request carries its id; stage spans
    /// time auth, policy and the upstream (their close events are logged at debug level).
    pub async fn run<R, T>(
        self,
        decoded: Result<R, Rejection>,
        upstream: impl AsyncFnOnce(Admitted<'_, R>) -> Result<T, (OutcomeGuard, Rejection)>,
    ) -> Result<T, Rejection>
    where
        R: ModelRequest,
    {
        use tracing::Instrument;
        let span = tracing::info_span!(
            "model_request",
            request_id = %self.ctx.request_id,
            protocol = self.ctx.protocol.as_str(),
            api = self.guard.api().as_str()
        );
        // Boxed where it is made: the request's whole state machine (admission, the upstream
        // call) is kilobytes, and every future that holds it by value (this one, the adapter's,
        // the router's box) would otherwise copy all of it when it is moved.
        let inner = Box::pin(self.run_inner(decoded, upstream));
        async move {
            inner
                .await
                .map_err(|(guard, rejection)| {
                    tracing::debug!(reason = rejection.reason.as_str(), message = %rejection.message, "model request rejected");
                    guard.finish(rejection.reason);
                    rejection
                })
        }
        .instrument(span)
        .await
    }

    async fn run_inner<R, T>(
        self,
        decoded: Result<R, Rejection>,
        upstream: impl AsyncFnOnce(Admitted<'_, R>) -> Result<T, (OutcomeGuard, Rejection)>,
    ) -> Result<T, (OutcomeGuard, Rejection)>
    where
        R: ModelRequest,
    {
        let OpenCall {
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
            rec.stream = req.stream();
            rec.requested_model = req.model().to_string();
            rec.model_label = rt.router.label(req.model());
        }
        if let Some(trace) = guard.trace().filter(|t| t.capture_content()) {
            trace.input = req.trace_input();
        }
        let (route, policy_headers) =
            match admit(&gateway, &rt, &ctx, &mut guard, req.model(), req.demand()).await {
                Ok(admitted) => admitted,
                Err(e) => return Err((guard, e)),
            };
        upstream(Admitted {
            gateway: &gateway,
            ctx: &ctx,
            route,
            request: req,
            guard,
            policy_headers,
        })
        .await
    }
}
