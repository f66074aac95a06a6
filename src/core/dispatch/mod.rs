//! The upstream stage: walks a route's targets in order, skipping unhealthy providers while a
//! healthy one remains, and falls back on failures another target can fix (connect errors,
//! timeouts, 5xx, 429, key-pool exhaustion), never on a caller's 4xx.

mod chain;
mod embeddings;

use std::sync::Arc;
use std::time::Instant;

use super::gateway::{ChatCompletion, ChatReply, Gateway};
use super::native::{NativeCompletion, PassthroughStream};
use super::outcome::OutcomeGuard;
use super::stream::ChatStream;
use super::trace::{operation, Attempt, AttemptEnd, AttemptTarget};
use super::{Reason, Rejection};
use crate::api::{Api, ChatDelta, ChatRequest, ChatResponse, NativeBody, Usage};
use crate::metrics::AliasLabels;
use crate::providers::{
    DeltaStream, NativeCall, NativeChunk, NativeResponse, NativeStream, TraceHeaders, UpstreamCall,
    UpstreamError,
};
use crate::routing::{Route, Target};
pub(crate) use chain::upstream_reason;
use chain::{counts_against_health, ChainWalk};

/// One request's upstream stage.
pub(crate) struct Dispatch<'a> {
    pub gateway: &'a Gateway,
    pub request_id: &'a str,
}

/// The `status_class` label (and span `error.type`) of an upstream call's result.
fn status_class(result: Result<(), &UpstreamError>) -> &'static str {
    match result {
        Ok(()) => "2xx",
        Err(UpstreamError::Status { status, .. }) if *status < 500 => "4xx",
        Err(UpstreamError::Status { .. }) => "5xx",
        Err(UpstreamError::Timeout(_)) => "timeout",
        Err(UpstreamError::Connect(_)) => "connect_error",
        Err(UpstreamError::BadResponse(_)) => "bad_response",
        Err(UpstreamError::KeysExhausted { .. }) => "keys_exhausted",
        Err(UpstreamError::Unsupported(_)) => "unsupported",
    }
}

/// How a failed attempt ends its client span.
fn failed_attempt(e: &UpstreamError) -> AttemptEnd {
    AttemptEnd::Failure {
        error_type: status_class(Err(e)),
        http_status: match e {
            UpstreamError::Status { status, .. } => Some(*status),
            _ => None,
        },
    }
}

impl Dispatch<'_> {
    fn call<'r>(
        &'r self,
        target: &'r Target,
        req: &'r ChatRequest,
        trace: Option<&'r TraceHeaders>,
    ) -> UpstreamCall<'r> {
        UpstreamCall {
            model: &target.model,
            request: req,
            request_id: self.request_id,
            trace,
        }
    }

    /// Opens the client span of an attempt on `target`.
    fn open_attempt(&self, guard: &mut OutcomeGuard, target: &Target) -> Option<Attempt> {
        let op = operation(guard.api());
        let trace = guard.trace()?;
        Some(trace.attempt(AttemptTarget {
            operation: op,
            provider: target.provider.client.kind().as_str(),
            provider_name: &target.provider.name,
            model: &target.model,
        }))
    }

    /// Ends an attempt's client span.
    fn end_attempt(&self, guard: &mut OutcomeGuard, attempt: Option<Attempt>, end: AttemptEnd) {
        if let (Some(trace), Some(attempt)) = (guard.trace(), attempt) {
            trace.end_attempt(attempt, end);
        }
    }

    /// Upstream latency, and what the outcome says about the provider's health.
    fn observe(&self, target: &Target, started: Instant, result: Result<(), &UpstreamError>) {
        let status_class = status_class(result);
        self.gateway.metrics().observe_upstream(
            &target.provider.label,
            status_class,
            started.elapsed().as_secs_f64(),
        );
        match result {
            Ok(()) => target.provider.health.record_success(),
            Err(e) if counts_against_health(e) => {
                target.provider.health.record_failure(&e.to_string())
            }
            // A 4xx or an exhausted key pool says nothing against the provider being up.
            Err(_) => {}
        }
    }

    fn resolved(&self, route: &Route, target: &Target) {
        if let Some(alias) = &route.alias {
            self.gateway
                .metrics()
                .alias_resolved
                .get_or_create(&AliasLabels {
                    alias: alias.clone(),
                    target: target.resolved.clone(),
                })
                .inc();
        }
    }

    /// The caller's native body, when this target takes the request's wire natively.
    fn native_for<'r>(&self, target: &Target, req: &'r ChatRequest) -> Option<&'r NativeBody> {
        req.native
            .as_deref()
            .filter(|n| target.provider.client.native(n.api))
    }

    /// Why this target cannot serve the request: its body needs the wire natively (stored
    /// state, a built-in tool) and the target does not take that wire.
    fn untranslatable(&self, target: &Target, req: &ChatRequest) -> Option<UpstreamError> {
        let native = req.native.as_deref()?;
        let why = native.untranslatable.as_deref()?;
        (!target.provider.client.native(native.api))
            .then(|| UpstreamError::Unsupported(why.to_string()))
    }

    /// A whole answer from the first target that gives one: passed through from a target that
    /// takes the caller's wire natively, else translated through the neutral types.
    pub async fn complete(
        &self,
        route: Arc<Route>,
        req: ChatRequest,
        mut guard: OutcomeGuard,
    ) -> Result<ChatReply, (OutcomeGuard, Rejection)> {
        // A span that records the answer's text gets it from the neutral answer: a chat
        // completion is then translated rather than passed through.
        let captures_output = guard.trace().is_some_and(|t| t.capture_content());
        let mut walk = ChainWalk::new(&route);
        while let Some(target) = walk.next_target(self.gateway) {
            if let Some(e) = self.untranslatable(target, &req) {
                walk.failed(target, e);
                break;
            }
            let attempt = self.open_attempt(&mut guard, target);
            let trace = attempt.as_ref().and_then(Attempt::headers);
            let started = Instant::now();
            let native = self
                .native_for(target, &req)
                .filter(|n| n.api != Api::ChatCompletions || !captures_output);
            let result = match native {
                Some(native) => target
                    .provider
                    .client
                    .native_complete(NativeCall {
                        model: &target.model,
                        native,
                        request_id: self.request_id,
                        trace,
                        answer_model: &target.resolved,
                    })
                    .await
                    .map(Whole::Native),
                None => target
                    .provider
                    .client
                    .complete(self.call(target, &req, trace))
                    .await
                    .map(Whole::Neutral),
            };
            guard.record().upstream_wait += started.elapsed();
            self.observe(target, started, result.as_ref().map(|_| ()));
            match result {
                Ok(whole) => {
                    self.resolved(&route, target);
                    let answered_model;
                    let (reply, usage) = match whole {
                        Whole::Neutral(mut response) => {
                            if let Some(trace) = guard.trace() {
                                trace.finish_reasons = finish_reasons(&response);
                                if trace.capture_content() {
                                    trace.output =
                                        Some(super::trace::content::output_messages(&response));
                                }
                            }
                            answered_model = Some(std::mem::take(&mut response.model));
                            response.model.clone_from(&target.resolved);
                            let usage = response
                                .usage
                                .unwrap_or_else(|| estimate_reply_usage(&req, &response));
                            let c = ChatCompletion {
                                response,
                                resolved_model: target.resolved.clone(),
                                usage,
                                policy_headers: Vec::new(),
                            };
                            (ChatReply::Complete(Box::new(c)), usage)
                        }
                        Whole::Native(n) => {
                            if let Some(trace) = guard.trace() {
                                trace.finish_reasons = n.finish_reasons;
                            }
                            answered_model = n.response_model;
                            let usage = n.usage.unwrap_or_else(|| Usage {
                                prompt_tokens: req.estimate_prompt_tokens(),
                                completion_tokens: crate::api::estimate_tokens(n.generated_chars),
                                ..Usage::default()
                            });
                            let c = NativeCompletion {
                                body: n.body,
                                resolved_model: target.resolved.clone(),
                                usage,
                                policy_headers: Vec::new(),
                            };
                            (ChatReply::Passthrough(Box::new(c)), usage)
                        }
                    };
                    let response_model = answered_model
                        .filter(|m| !m.is_empty())
                        .unwrap_or_else(|| target.model.clone());
                    self.end_attempt(
                        &mut guard,
                        attempt,
                        AttemptEnd::Success {
                            response_model: Some(response_model),
                            usage: Some(usage),
                        },
                    );
                    let rec = guard.record();
                    rec.resolved_model = Some(target.resolved.clone());
                    rec.resolved_label = Some(target.label.clone());
                    rec.usage = usage;
                    guard.finish(Reason::Success);
                    return Ok(reply);
                }
                Err(e) => {
                    self.end_attempt(&mut guard, attempt, failed_attempt(&e));
                    if !walk.failed(target, e) {
                        break;
                    }
                }
            }
        }
        Err((guard, walk.into_rejection()))
    }

    /// A stream from the first target that produces a first chunk. Falling back is only
    /// possible while nothing has reached the caller, so the first chunk is awaited here.
    pub async fn stream(
        &self,
        route: Arc<Route>,
        req: ChatRequest,
        mut guard: OutcomeGuard,
    ) -> Result<ChatReply, (OutcomeGuard, Rejection)> {
        use futures_util::StreamExt;
        let mut walk = ChainWalk::new(&route);
        while let Some(target) = walk.next_target(self.gateway) {
            if let Some(e) = self.untranslatable(target, &req) {
                walk.failed(target, e);
                break;
            }
            let attempt = self.open_attempt(&mut guard, target);
            let trace = attempt.as_ref().and_then(Attempt::headers);
            let started = Instant::now();
            let first = match self.native_for(target, &req) {
                Some(native) => {
                    let call = NativeCall {
                        model: &target.model,
                        native,
                        request_id: self.request_id,
                        trace,
                        answer_model: &target.resolved,
                    };
                    match target.provider.client.native_stream(call).await {
                        Ok(mut s) => match s.next().await {
                            Some(Ok(chunk)) => Ok(Started::Native(s, chunk)),
                            Some(Err(e)) => Err(e),
                            None => Err(empty_stream()),
                        },
                        Err(e) => Err(e),
                    }
                }
                None => match target
                    .provider
                    .client
                    .stream(self.call(target, &req, trace))
                    .await
                {
                    Ok(mut s) => match s.next().await {
                        Some(Ok(chunk)) => Ok(Started::Neutral(s, chunk)),
                        Some(Err(e)) => Err(e),
                        None => Err(empty_stream()),
                    },
                    Err(e) => Err(e),
                },
            };
            guard.record().upstream_wait += started.elapsed();
            self.observe(target, started, first.as_ref().map(|_| ()));
            match first {
                Ok(started) => {
                    self.resolved(&route, target);
                    if let (Some(trace), Some(attempt)) = (guard.trace(), attempt) {
                        trace.hold_attempt(attempt);
                    }
                    guard.record().resolved_model = Some(target.resolved.clone());
                    guard.record().resolved_label = Some(target.label.clone());
                    let prompt_estimate = req.estimate_prompt_tokens();
                    return Ok(match started {
                        Started::Neutral(s, first) => ChatReply::Stream(Box::new(ChatStream::new(
                            s,
                            Some(first),
                            guard,
                            target.resolved.clone(),
                            req.include_usage,
                            prompt_estimate,
                        ))),
                        Started::Native(s, first) => {
                            ChatReply::PassthroughStream(Box::new(PassthroughStream::new(
                                s,
                                first,
                                guard,
                                target.resolved.clone(),
                                prompt_estimate,
                            )))
                        }
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
        Err((guard, walk.into_rejection()))
    }

    /// The input tokens of a request, for `count_tokens`: counted by the first usable target
    /// that takes the caller's wire natively, else estimated the way a budget reservation
    /// estimates them.
    pub async fn count_tokens(&self, route: &Route, req: &ChatRequest) -> Result<u64, Rejection> {
        let mut walk = ChainWalk::new(route);
        let Some(target) = walk.next_target(self.gateway) else {
            return Ok(req.estimate_prompt_tokens());
        };
        let Some(native) = self.native_for(target, req) else {
            return Ok(req.estimate_prompt_tokens());
        };
        let call = NativeCall {
            model: &target.model,
            native,
            request_id: self.request_id,
            trace: None,
            answer_model: &target.resolved,
        };
        match target.provider.client.native_count_tokens(call).await {
            Ok(n) => Ok(n),
            Err(e) => {
                walk.failed(target, e);
                Err(walk.into_rejection())
            }
        }
    }
}

/// A whole answer of one attempt.
enum Whole {
    Neutral(ChatResponse),
    Native(NativeResponse),
}

/// A stream that produced its first item.
enum Started {
    Neutral(DeltaStream, ChatDelta),
    Native(NativeStream, NativeChunk),
}

fn empty_stream() -> UpstreamError {
    UpstreamError::BadResponse("the stream ended before its first chunk".into())
}

/// `gen_ai.response.finish_reasons` of a whole answer.
fn finish_reasons(response: &ChatResponse) -> Vec<String> {
    response
        .choices
        .iter()
        .filter_map(|c| c.finish_reason.as_ref().map(|r| r.as_openai().to_string()))
        .collect()
}

fn estimate_reply_usage(request: &ChatRequest, response: &ChatResponse) -> Usage {
    Usage {
        prompt_tokens: request.estimate_prompt_tokens(),
        completion_tokens: crate::api::estimate_tokens(response.estimate_completion_chars()),
        ..Usage::default()
    }
}
