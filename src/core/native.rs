//! A pass-through answer on its way to the caller: the upstream's own bytes (a provider that
//! takes the caller's wire natively), with the request's outcome guard. It settles exactly like
//! [`super::ChatStream`]: a clean end records `success`, a failure after the first event
//! `upstream_error`/`upstream_timeout` (one error item), a drop `client_disconnected`; usage is
//! read from the events as they pass.

use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use futures_util::Stream;

use super::dispatch::upstream_reason;
use super::lifecycle::StreamCut;
use super::outcome::OutcomeGuard;
use super::stream::UpstreamWait;
use super::{Reason, Rejection};
use crate::api::{estimate_tokens, Usage};
use crate::providers::{NativeChunk, NativeStream};

/// A finished, non-streamed pass-through answer.
#[derive(Debug)]
pub struct NativeCompletion {
    /// The upstream's body, `model` rewritten to the resolved `provider/model`.
    pub body: Bytes,
    pub resolved_model: String,
    pub usage: Usage,
    /// Rate-limit and budget headers (`x-ratelimit-*`, `x-budget-*`).
    pub policy_headers: crate::error::PolicyHeaders,
}

/// The caller's side of a streamed pass-through answer: event bytes as the upstream sent them.
pub struct PassthroughStream {
    upstream: NativeStream,
    first: Option<NativeChunk>,
    guard: Option<OutcomeGuard>,
    resolved: String,
    prompt_estimate: u64,
    generated_chars: usize,
    reported: Option<Usage>,
    saw_finish: bool,
    waited: UpstreamWait,
    policy_headers: crate::error::PolicyHeaders,
    /// Shutdown's end of the grace period.
    cut: StreamCut,
}

impl PassthroughStream {
    pub(crate) fn new(
        upstream: NativeStream,
        first: NativeChunk,
        guard: OutcomeGuard,
        resolved: String,
        prompt_estimate: u64,
    ) -> Self {
        let cut = guard.stream_cut();
        Self {
            upstream,
            first: Some(first),
            guard: Some(guard),
            resolved,
            prompt_estimate,
            generated_chars: 0,
            reported: None,
            saw_finish: false,
            waited: UpstreamWait::default(),
            policy_headers: Vec::new(),
            cut,
        }
    }

    /// Rate-limit and budget headers for the response head.
    pub fn policy_headers(&self) -> &[crate::error::PolicyHeader] {
        &self.policy_headers
    }

    pub(crate) fn set_policy_headers(&mut self, headers: crate::error::PolicyHeaders) {
        self.policy_headers = headers;
    }

    /// `provider/model` that is answering.
    pub fn resolved_model(&self) -> &str {
        &self.resolved
    }

    fn settle(&mut self, reason: Reason) {
        let usage = self.reported.unwrap_or(Usage {
            prompt_tokens: self.prompt_estimate,
            completion_tokens: estimate_tokens(self.generated_chars),
            ..Usage::default()
        });
        let wait = self.waited.total;
        if let Some(mut guard) = self.guard.take() {
            let rec = guard.record();
            rec.usage = usage;
            rec.upstream_wait += wait;
            guard.finish(reason);
        }
    }

    fn accept(&mut self, chunk: NativeChunk) -> Bytes {
        if let Some(u) = chunk.usage {
            self.reported = Some(u);
        }
        if chunk.generated_chars > 0 && self.generated_chars == 0 {
            if let Some(g) = self.guard.as_mut() {
                g.record().first_token_at.get_or_insert_with(Instant::now);
            }
        }
        self.generated_chars += chunk.generated_chars;
        self.saw_finish |= chunk.finished;
        if !chunk.finish_reasons.is_empty() {
            if let Some(trace) = self.guard.as_mut().and_then(|g| g.trace()) {
                trace.finish_reasons.extend(chunk.finish_reasons);
            }
        }
        chunk.bytes
    }
}

impl Stream for PassthroughStream {
    type Item = Result<Bytes, Rejection>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        if this.guard.is_none() {
            return Poll::Ready(None);
        }
        if this.cut.poll_cut(cx) {
            this.settle(Reason::InternalError);
            return Poll::Ready(Some(Err(super::stream::shutdown_cut(&this.resolved))));
        }
        let next = loop {
            let next = ready!(this
                .waited
                .next(&mut this.first, this.upstream.as_mut(), cx));
            match next {
                // Read for accounting only: nothing for the caller, so on to the next one.
                Some(Ok(chunk)) if chunk.bytes.is_empty() => {
                    this.accept(chunk);
                }
                next => break next,
            }
        };
        Poll::Ready(match next {
            Some(Ok(chunk)) => Some(Ok(this.accept(chunk))),
            Some(Err(e)) => {
                let reason = match upstream_reason(&e) {
                    Reason::UpstreamTimeout => Reason::UpstreamTimeout,
                    _ => Reason::UpstreamError,
                };
                this.settle(reason);
                Some(Err(Rejection::new(
                    reason,
                    format!("the stream from {} broke: {e}", this.resolved),
                )))
            }
            None if this.saw_finish => {
                this.settle(Reason::Success);
                None
            }
            None => {
                this.settle(Reason::UpstreamError);
                Some(Err(Rejection::new(
                    Reason::UpstreamError,
                    format!(
                        "the stream from {} ended before the answer was complete",
                        this.resolved
                    ),
                )))
            }
        })
    }
}

impl Drop for PassthroughStream {
    fn drop(&mut self) {
        // Dropped before the end: the caller went away. Charge what was produced.
        if self.guard.is_some() {
            self.settle(Reason::ClientDisconnected);
        }
    }
}
