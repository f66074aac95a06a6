//! A chat request in flight (`ChatCall`) and what it produces (`ChatReply`).

use std::sync::Arc;

use super::{admit, open_record, Gateway, Runtime};
use crate::api::{ChatRequest, ChatResponse, Usage};
use crate::core::dispatch::Dispatch;
use crate::core::native::{NativeCompletion, PassthroughStream};
use crate::core::outcome::OutcomeGuard;
use crate::core::stream::ChatStream;
use crate::core::{CallContext, Rejection};

/// What a chat request produced.
pub enum ChatReply {
    /// A whole chat.completion.
    Complete(Box<ChatCompletion>),
    /// Chunks as the upstream produces them.
    Stream(Box<ChatStream>),
    /// A whole answer passed through in the caller's own wire (only for a request that carries
    /// a native body).
    Passthrough(Box<NativeCompletion>),
    /// Events passed through in the caller's own wire.
    PassthroughStream(Box<PassthroughStream>),
}

impl ChatReply {
    fn set_policy_headers(&mut self, headers: Vec<(&'static str, String)>) {
        match self {
            ChatReply::Complete(c) => c.policy_headers = headers,
            ChatReply::Stream(s) => s.set_policy_headers(headers),
            ChatReply::Passthrough(c) => c.policy_headers = headers,
            ChatReply::PassthroughStream(s) => s.set_policy_headers(headers),
        }
    }
}

/// A finished, non-streamed completion.
#[derive(Debug)]
pub struct ChatCompletion {
    /// The answer, `model` set to the resolved `provider/model`.
    pub response: ChatResponse,
    pub resolved_model: String,
    pub usage: Usage,
    /// Rate-limit and budget headers (`x-ratelimit-*`, `x-budget-*`).
    pub policy_headers: Vec<(&'static str, String)>,
}

/// One chat request in flight. Dropping it before it finishes records `client_disconnected`.
pub struct ChatCall {
    pub(super) gateway: Arc<Gateway>,
    pub(super) runtime: Arc<Runtime>,
    pub(super) ctx: CallContext,
    pub(super) guard: OutcomeGuard,
}

impl ChatCall {
    /// The request id.
    pub fn request_id(&self) -> &str {
        &self.ctx.request_id
    }

    /// Runs the request: `decoded` is the adapter's decoding of the body (or why it failed).
    pub async fn run(
        self,
        decoded: Result<ChatRequest, Rejection>,
    ) -> Result<ChatReply, Rejection> {
        use tracing::Instrument;
        // Every log line of the request carries its id; stage spans time auth, policy and the
        // upstream (their close events are logged at debug level).
        let span = tracing::info_span!(
            "chat",
            request_id = %self.ctx.request_id,
            protocol = self.ctx.protocol.as_str()
        );
        async move {
            self.run_inner(decoded).await.map_err(|(guard, rejection)| {
                tracing::debug!(reason = rejection.reason.as_str(), message = %rejection.message, "chat request rejected");
                guard.finish(rejection.reason);
                rejection
            })
        }
        .instrument(span)
        .await
    }

    async fn run_inner(
        self,
        decoded: Result<ChatRequest, Rejection>,
    ) -> Result<ChatReply, (OutcomeGuard, Rejection)> {
        use tracing::Instrument;
        let ChatCall {
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
            rec.stream = req.stream;
            rec.requested_model = req.model.clone();
            rec.model_label = rt.router.label(&req.model);
        }
        let demand = crate::core::policy::Demand::chat(&req);
        let (route, policy_headers) =
            match admit(&gateway, &rt, &ctx, &mut guard, &req.model, demand).await {
                Ok(admitted) => admitted,
                Err(e) => return Err((guard, e)),
            };
        let upstream = Dispatch {
            gateway: &gateway,
            request_id: &ctx.request_id,
        };
        let reply = if req.stream {
            upstream
                .stream(route, req, guard)
                .instrument(tracing::debug_span!("upstream"))
                .await
        } else {
            upstream
                .complete(route, req, guard)
                .instrument(tracing::debug_span!("upstream"))
                .await
        };
        reply.map(|mut r| {
            r.set_policy_headers(policy_headers);
            r
        })
    }
}
