//! The one place a chat request's outcome is recorded. An [`OutcomeGuard`] is created when a
//! chat request enters the core and records exactly one outcome: the reason it is finished
//! with, or `client_disconnected` if it is dropped unfinished.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::policy::{Budgets, HoldSlot};
use super::pricing::Pricing;
use super::trace::{AttemptEnd, ServerTrace, TraceParent, Tracer};
use super::{Protocol, Reason};
use crate::api::Api;
use crate::clock::Clock;
use crate::core::ledger::Ledger;
use crate::metrics::{none_label, unknown_label, Label, Metrics, TokenKind};
use crate::providers::Usage;
use crate::store::NewLedgerRow;

/// What a guard needs to record: the shared sinks.
#[derive(Clone)]
pub struct Recorder {
    pub metrics: Arc<Metrics>,
    pub ledger: Ledger,
    /// Budgets and rate limits: a request's hold is settled when its outcome is recorded.
    pub budgets: Arc<Budgets>,
    /// Stamps the ledger row's start and finish.
    pub clock: Clock,
    /// `[log] access`: shared so that a reload turns the access log on or off at once.
    pub access_log: Arc<AtomicBool>,
    /// Where the request's spans go.
    pub tracer: Tracer,
    /// Shutdown: streams watch it to end at the grace period's end.
    pub lifecycle: crate::core::lifecycle::Lifecycle,
}

/// Everything known about a chat request so far; filled in as it moves through the stages.
#[derive(Debug, Clone)]
pub struct ChatRecord {
    pub protocol: Protocol,
    /// The inbound API the request came in on.
    pub api: Api,
    pub request_id: String,
    pub stream: bool,
    pub requested_model: String,
    /// Bounded label values.
    pub model_label: Label,
    pub service_type_label: Label,
    pub purpose_label: Label,
    pub service_type: Option<String>,
    pub purpose: Option<String>,
    pub user_id: Option<i64>,
    pub key_id: Option<i64>,
    pub resolved_model: Option<String>,
    /// The bounded label of `resolved_model` for metrics.
    pub resolved_label: Option<Label>,
    pub usage: Usage,
    /// Computed from `pricing` and the usage when the outcome is recorded.
    pub cost_micros: i64,
    /// The price table the request runs under.
    pub pricing: Option<Arc<Pricing>>,
    /// The request's budget reservation and rate-limit charge, settled with the outcome.
    pub hold: HoldSlot,
    /// Time spent waiting on upstreams, so that overhead can be told apart.
    pub upstream_wait: Duration,
    pub first_token_at: Option<Instant>,
}

/// Records one outcome per chat request, on finish or on drop.
pub struct OutcomeGuard {
    recorder: Recorder,
    started: Instant,
    started_ms: i64,
    /// Boxed: the guard is held by value in every future of the request (often twice: as an
    /// argument and as a local), and each future is copied whole when it is made and boxed;
    /// inline, the record and span were 700 bytes of each copy.
    open: Option<Box<Open>>,
}

/// What a guard holds until it records.
struct Open {
    record: ChatRecord,
    /// The request's server span; ended with the outcome.
    trace: Option<ServerTrace>,
}

impl OutcomeGuard {
    /// Opens the record of a chat request.
    pub fn new(recorder: Recorder, protocol: Protocol, api: Api, request_id: String) -> Self {
        let started_ms = recorder.clock.now_ms();
        Self {
            recorder,
            started: Instant::now(),
            started_ms,
            open: Some(Box::new(Open {
                trace: None,
                record: ChatRecord {
                    protocol,
                    api,
                    request_id,
                    stream: false,
                    requested_model: String::new(),
                    model_label: unknown_label(),
                    service_type_label: unknown_label(),
                    purpose_label: none_label(),
                    service_type: None,
                    purpose: None,
                    user_id: None,
                    key_id: None,
                    resolved_model: None,
                    resolved_label: None,
                    usage: Usage::default(),
                    cost_micros: 0,
                    pricing: None,
                    hold: HoldSlot::default(),
                    upstream_wait: Duration::ZERO,
                    first_token_at: None,
                },
            })),
        }
    }

    /// The record being filled in.
    pub fn record(&mut self) -> &mut ChatRecord {
        &mut self
            .open
            .as_mut()
            .expect("an OutcomeGuard is not used after it is finished")
            .record
    }

    /// Opens the request's server span, under the caller's span when it sent one.
    pub fn start_trace(&mut self, parent: Option<&TraceParent>) {
        let start_ns = u64::try_from(self.started_ms)
            .unwrap_or(0)
            .saturating_mul(1_000_000);
        let trace = self.recorder.tracer.server_trace(parent, start_ns);
        if let Some(open) = self.open.as_mut() {
            open.trace = Some(trace);
        }
    }

    /// The request's server span, to open attempts on and to note what it learns.
    pub fn trace(&mut self) -> Option<&mut ServerTrace> {
        self.open.as_mut().and_then(|o| o.trace.as_mut())
    }

    /// When shutdown cuts the streams still running (for a stream to watch).
    pub fn stream_cut(&self) -> crate::core::lifecycle::StreamCut {
        self.recorder.lifecycle.stream_cut()
    }

    /// The inbound API the request came in on.
    pub fn api(&self) -> Api {
        self.open.as_ref().map(|o| o.record.api).unwrap_or_default()
    }

    /// When the request entered the core.
    pub fn started(&self) -> Instant {
        self.started
    }

    /// Records the outcome for `reason`; the guard is spent.
    pub fn finish(mut self, reason: Reason) {
        if let Some(open) = self.open.take() {
            let Open { record, trace } = *open;
            self.emit(record, reason, trace);
        }
    }

    fn emit(&self, mut r: ChatRecord, reason: Reason, trace: Option<ServerTrace>) {
        let m = &self.recorder.metrics;
        if let (Some(pricing), Some(resolved)) = (&r.pricing, &r.resolved_model) {
            r.cost_micros = pricing.cost_micros(resolved, &r.usage);
        }
        let outcome = reason.outcome();
        let elapsed = self.started.elapsed();
        m.count_outcome(&crate::metrics::Availability {
            protocol: r.protocol.as_str(),
            api: r.api.as_str(),
            outcome: outcome.as_str(),
            reason: reason.as_str(),
            model: &r.model_label,
            service_type: &r.service_type_label,
            purpose: &r.purpose_label,
        });
        m.observe_overhead(
            r.protocol.as_str(),
            elapsed.saturating_sub(r.upstream_wait).as_secs_f64(),
        );
        if let Some(resolved) = &r.resolved_label {
            let series = m.models.get(resolved);
            series
                .latency(m, outcome, r.stream)
                .observe(elapsed.as_secs_f64());
            if let Some(t) = r.first_token_at {
                series
                    .ttft(m)
                    .observe(t.duration_since(self.started).as_secs_f64());
            }
            for (kind, n) in [
                (TokenKind::Prompt, r.usage.prompt_tokens),
                (TokenKind::Completion, r.usage.completion_tokens),
            ] {
                if n > 0 {
                    series.tokens(m, kind).inc_by(n);
                }
            }
            if r.cost_micros > 0 {
                series.spend(m).inc_by(r.cost_micros as f64 / 1e6);
            }
        }
        if outcome == super::Outcome::Failure {
            tracing::warn!(request_id = %r.request_id, reason = reason.as_str(), model = %r.requested_model, "chat request failed");
        }
        if self.recorder.access_log.load(Ordering::Relaxed) {
            // Here, where the outcome is recorded, so that every request (refused, failed, or a
            // stream when it ends) has exactly one line. Identities are ids: the caller's key
            // and the upstream's never reach the record.
            let status = match r.protocol {
                Protocol::Http => AccessStatus::Http(reason.http_status()),
                Protocol::Grpc => AccessStatus::Grpc(reason.grpc_code().as_str()),
            };
            tracing::info!(
                target: "tollgate::access",
                request_id = %r.request_id,
                protocol = r.protocol.as_str(),
                api = r.api.as_str(),
                status = %status,
                outcome = outcome.as_str(),
                reason = reason.as_str(),
                requested_model = %r.requested_model,
                resolved_model = r.resolved_model.as_deref(),
                user_id = r.user_id,
                key_id = r.key_id,
                latency_ms = elapsed.as_millis() as u64,
                ttft_ms = r
                    .first_token_at
                    .filter(|_| r.stream)
                    .map(|t| t.duration_since(self.started).as_millis() as u64),
                prompt_tokens = r.usage.prompt_tokens,
                completion_tokens = r.usage.completion_tokens,
                cost_usd = r.cost_micros as f64 / 1e6,
                "access"
            );
        }
        if let Some(trace) = trace {
            // A stream's answering attempt ends with the stream, on the usage it reported.
            let usage = r.usage;
            let response_model = r.resolved_model.clone();
            trace.finish(
                || match reason {
                    Reason::Success => AttemptEnd::Success {
                        response_model,
                        usage: Some(usage),
                    },
                    // It broke (or the caller left) after its first chunk.
                    other => AttemptEnd::Failure {
                        error_type: other.as_str(),
                        http_status: None,
                    },
                },
                |t| super::trace::server_span(t, &r, reason),
            );
        }
        let row = NewLedgerRow {
            request_id: r.request_id,
            user_id: r.user_id,
            key_id: r.key_id,
            protocol: r.protocol.as_str(),
            requested_model: r.requested_model,
            resolved_model: r.resolved_model,
            service_type: r.service_type,
            purpose: r.purpose,
            stream: r.stream,
            outcome: outcome.as_str(),
            reason: reason.as_str(),
            prompt_tokens: r.usage.prompt_tokens as i64,
            completion_tokens: r.usage.completion_tokens as i64,
            cost_micros: r.cost_micros,
            started_at: self.started_ms,
            finished_at: self.recorder.clock.now_ms(),
            api: r.api.as_str(),
        };
        // With a budget reservation the row is written together with its settlement, so the
        // ledger and the budget agree; otherwise it goes to the ledger writer.
        r.hold
            .settle(r.cost_micros, &r.usage, row, &self.recorder.ledger);
    }
}

impl Drop for OutcomeGuard {
    fn drop(&mut self) {
        if let Some(open) = self.open.take() {
            let Open { record, trace } = *open;
            self.emit(record, Reason::ClientDisconnected, trace);
        }
    }
}

/// The `status` of an access-log line: the HTTP status or the gRPC code's name, written by the
/// log itself (a `String` of it was made for every request).
enum AccessStatus {
    Http(u16),
    Grpc(&'static str),
}

impl std::fmt::Display for AccessStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AccessStatus::Http(code) => code.fmt(f),
            AccessStatus::Grpc(name) => f.write_str(name),
        }
    }
}
