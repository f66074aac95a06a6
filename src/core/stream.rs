//! A streamed chat completion on its way to the caller. It owns the request's outcome guard:
//! a clean end records `success`, an upstream failure after the first chunk records
//! `upstream_error`/`upstream_timeout` and yields one error item, and being dropped early (the
//! caller went away) records `client_disconnected` with the tokens produced so far.

use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use futures_util::Stream;

use super::dispatch::upstream_reason;
use super::lifecycle::StreamCut;
use super::outcome::OutcomeGuard;
use super::{Reason, Rejection};
use crate::api::{estimate_tokens, ChatDelta, Usage};
use crate::providers::DeltaStream;

/// The caller's side of a streamed completion.
pub struct ChatStream {
    upstream: DeltaStream,
    first: Option<ChatDelta>,
    guard: Option<OutcomeGuard>,
    resolved: String,
    include_usage: bool,
    prompt_estimate: u64,
    content_chars: usize,
    reported: Option<Usage>,
    saw_finish: bool,
    waited: UpstreamWait,
    policy_headers: crate::error::PolicyHeaders,
    /// Shutdown's end of the grace period.
    cut: StreamCut,
}

impl ChatStream {
    pub(crate) fn new(
        upstream: DeltaStream,
        first: Option<ChatDelta>,
        guard: OutcomeGuard,
        resolved: String,
        include_usage: bool,
        prompt_estimate: u64,
    ) -> Self {
        let cut = guard.stream_cut();
        Self {
            upstream,
            first,
            guard: Some(guard),
            resolved,
            include_usage,
            prompt_estimate,
            content_chars: 0,
            reported: None,
            saw_finish: false,
            waited: UpstreamWait::default(),
            policy_headers: Vec::new(),
            cut,
        }
    }

    /// Rate-limit and budget headers (`x-ratelimit-*`, `x-budget-*`) for the response head.
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

    fn usage(&self) -> Usage {
        self.reported.unwrap_or(Usage {
            prompt_tokens: self.prompt_estimate,
            completion_tokens: estimate_tokens(self.content_chars),
            cached_prompt_tokens: 0,
            cache_creation_tokens: 0,
        })
    }

    fn settle(&mut self, reason: Reason) {
        let usage = self.usage();
        let wait = self.waited.total;
        if let Some(mut guard) = self.guard.take() {
            let rec = guard.record();
            rec.usage = usage;
            rec.upstream_wait += wait;
            guard.finish(reason);
        }
    }

    /// Rewrites and inspects one upstream delta; `None` when it is not for the caller.
    fn accept(&mut self, mut delta: ChatDelta) -> Option<ChatDelta> {
        delta.model.clone_from(&self.resolved);
        if let Some(u) = delta.usage {
            self.reported = Some(u);
        }
        let generated = delta.generated_chars();
        if generated > 0 && self.content_chars == 0 {
            if let Some(g) = self.guard.as_mut() {
                g.record().first_token_at.get_or_insert_with(Instant::now);
            }
        }
        self.content_chars += generated;
        if delta.choices.iter().any(|c| c.finish_reason.is_some()) {
            self.saw_finish = true;
            if let Some(trace) = self.guard.as_mut().and_then(|g| g.trace()) {
                trace.finish_reasons.extend(
                    delta
                        .choices
                        .iter()
                        .filter_map(|c| c.finish_reason.as_ref())
                        .map(|r| r.as_openai().to_string()),
                );
            }
        }
        if delta.is_usage_only() && !self.include_usage {
            // tollgate asked for usage for its own accounting; the caller did not.
            return None;
        }
        if !self.include_usage {
            delta.usage = None;
        }
        Some(delta)
    }
}

impl Stream for ChatStream {
    type Item = Result<ChatDelta, Rejection>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        loop {
            if this.guard.is_none() {
                return Poll::Ready(None);
            }
            if this.cut.poll_cut(cx) {
                this.settle(Reason::InternalError);
                return Poll::Ready(Some(Err(shutdown_cut(&this.resolved))));
            }
            let next = ready!(this
                .waited
                .next(&mut this.first, this.upstream.as_mut(), cx));
            match next {
                Some(Ok(chunk)) => {
                    if let Some(out) = this.accept(chunk) {
                        return Poll::Ready(Some(Ok(out)));
                    }
                }
                Some(Err(e)) => {
                    let reason = match upstream_reason(&e) {
                        Reason::UpstreamTimeout => Reason::UpstreamTimeout,
                        _ => Reason::UpstreamError,
                    };
                    this.settle(reason);
                    return Poll::Ready(Some(Err(Rejection::new(
                        reason,
                        format!("the stream from {} broke: {e}", this.resolved),
                    ))));
                }
                None if this.saw_finish => {
                    this.settle(Reason::Success);
                    return Poll::Ready(None);
                }
                None => {
                    this.settle(Reason::UpstreamError);
                    return Poll::Ready(Some(Err(Rejection::new(
                        Reason::UpstreamError,
                        format!(
                            "the stream from {} ended before the answer was complete",
                            this.resolved
                        ),
                    ))));
                }
            }
        }
    }
}

/// The upstream's share of a stream's time (the record's `upstream_wait`): from a poll that
/// found the upstream with nothing ready to the item it then gave.
#[derive(Debug, Default)]
pub(crate) struct UpstreamWait {
    since: Option<Instant>,
    /// Waited so far.
    pub total: Duration,
}

impl UpstreamWait {
    /// `first` while it is held, then the upstream's items, each timed.
    pub(crate) fn next<T, E, S>(
        &mut self,
        first: &mut Option<T>,
        upstream: Pin<&mut S>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<T, E>>>
    where
        S: Stream<Item = Result<T, E>> + ?Sized,
    {
        if let Some(first) = first.take() {
            return Poll::Ready(Some(Ok(first)));
        }
        let since = *self.since.get_or_insert_with(Instant::now);
        let item = ready!(upstream.poll_next(cx));
        self.total += since.elapsed();
        self.since = None;
        Poll::Ready(item)
    }
}

/// The error a stream still running at the end of the shutdown grace period ends with: the
/// gateway itself ended it (a failure, `internal_error`), with what was produced charged.
pub(crate) fn shutdown_cut(resolved: &str) -> Rejection {
    Rejection::new(
        Reason::InternalError,
        format!(
            "tollgate is shutting down: the stream from {resolved} outlived the shutdown grace period and was ended"
        ),
    )
}

impl Drop for ChatStream {
    fn drop(&mut self) {
        // Dropped before the end: the caller went away. Charge what was produced.
        if self.guard.is_some() {
            self.settle(Reason::ClientDisconnected);
        }
    }
}
