//! A chat request in flight (`ChatCall`) and what it produces (`ChatReply`).

use super::call::{Admitted, OpenCall};
use crate::api::{ChatRequest, ChatResponse, Usage};
use crate::core::dispatch::Dispatch;
use crate::core::native::{NativeCompletion, PassthroughStream};
use crate::core::stream::ChatStream;
use crate::core::Rejection;

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
    fn set_policy_headers(&mut self, headers: crate::error::PolicyHeaders) {
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
    pub policy_headers: crate::error::PolicyHeaders,
}

/// One chat request in flight. Dropping it before it finishes records `client_disconnected`.
pub struct ChatCall(pub(super) OpenCall);

impl ChatCall {
    /// The request id.
    pub fn request_id(&self) -> &str {
        &self.0.ctx.request_id
    }

    /// Runs the request: `decoded` is the adapter's decoding of the body (or why it failed).
    pub async fn run(
        self,
        decoded: Result<ChatRequest, Rejection>,
    ) -> Result<ChatReply, Rejection> {
        use tracing::Instrument;
        self.0
            .run(decoded, async |a: Admitted<'_, ChatRequest>| {
                let upstream = Dispatch {
                    gateway: a.gateway,
                    request_id: &a.ctx.request_id,
                };
                let reply = if a.request.stream {
                    upstream
                        .stream(a.route, a.request, a.guard)
                        .instrument(tracing::debug_span!("upstream"))
                        .await
                } else {
                    upstream
                        .complete(a.route, a.request, a.guard)
                        .instrument(tracing::debug_span!("upstream"))
                        .await
                };
                reply.map(|mut r| {
                    r.set_policy_headers(a.policy_headers);
                    r
                })
            })
            .await
    }
}
