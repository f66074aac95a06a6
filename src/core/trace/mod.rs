//! OpenTelemetry traces (docs/operations.md, "Tracing"): a server span per model request and a
//! client span per upstream attempt, in the caller's W3C trace when it sent one, exported over
//! OTLP http/protobuf off the request path. Spans are built here from what the outcome guard
//! and the dispatch already know; no tracing SDK is involved.
//!
//! The [`Tracer`] is built once by the server and injected into the core (no global). Without
//! `[telemetry] otlp_endpoint` it records nothing, but a caller's `traceparent` is still passed
//! upstream as it came, so the trace stays whole across tollgate.

use std::sync::Arc;
use std::time::Instant;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use tokio::sync::{mpsc, oneshot};

pub mod content;
mod context;
mod export;
pub mod otlp;
mod spans;

pub use context::{format_traceparent, TraceParent};
pub use export::ExporterError;
pub(crate) use spans::{operation, server_span, AttemptEnd};

use crate::config::TelemetryConfig;
use crate::metrics::{Metrics, TraceDropLabels};
pub use crate::providers::TraceHeaders;
use otlp::{KeyValue, Span};

/// Where spans go: the exporter's queue, or nowhere when tracing is off.
#[derive(Clone, Default)]
pub struct Tracer {
    inner: Option<Arc<TracerInner>>,
}

struct TracerInner {
    spans: mpsc::Sender<Span>,
    flushes: mpsc::Sender<oneshot::Sender<()>>,
    capture_content: bool,
    dropped: Family<TraceDropLabels, Counter>,
}

impl Tracer {
    /// A tracer that records nothing (no `otlp_endpoint`).
    pub fn disabled() -> Tracer {
        Tracer::default()
    }

    /// The tracer of `cfg`: disabled without an endpoint, else with its exporter task spawned
    /// on the current runtime.
    pub fn start(cfg: &TelemetryConfig, metrics: &Metrics) -> Result<Tracer, ExporterError> {
        let Some(endpoint) = cfg.otlp_endpoint.as_deref() else {
            return Ok(Tracer::disabled());
        };
        let (spans_tx, spans_rx) = mpsc::channel(cfg.max_queue_spans.max(1));
        let (flush_tx, flush_rx) = mpsc::channel(4);
        let dropped = metrics.trace_spans_dropped.clone();
        let task = export::ExporterTask::new(cfg, endpoint, spans_rx, flush_rx, dropped.clone())?;
        tokio::spawn(task.run());
        Ok(Tracer {
            inner: Some(Arc::new(TracerInner {
                spans: spans_tx,
                flushes: flush_tx,
                capture_content: cfg.capture_content,
                dropped,
            })),
        })
    }

    /// Whether spans are recorded at all.
    pub fn enabled(&self) -> bool {
        self.inner.is_some()
    }

    /// Whether prompt and completion text go on spans (`[telemetry] capture_content`).
    pub fn capture_content(&self) -> bool {
        self.inner.as_ref().is_some_and(|i| i.capture_content)
    }

    /// Queues a finished span; when the queue is full the span is dropped and counted, so that
    /// a slow collector never slows a request.
    fn submit(&self, span: Span) {
        let Some(inner) = &self.inner else { return };
        if inner.spans.try_send(span).is_err() {
            inner
                .dropped
                .get_or_create(&TraceDropLabels {
                    reason: "queue_full",
                })
                .inc();
        }
    }

    /// Posts what is queued now and waits for it (at shutdown).
    pub async fn flush(&self) {
        let Some(inner) = &self.inner else { return };
        let (done, wait) = oneshot::channel();
        if inner.flushes.send(done).await.is_ok() {
            let _ = wait.await;
        }
    }

    /// The trace of a request that entered the core now (`start_unix_ns` by the injected
    /// clock), under the caller's span when it sent one.
    pub fn server_trace(&self, parent: Option<&TraceParent>, start_unix_ns: u64) -> ServerTrace {
        let recording = self.enabled() && parent.is_none_or(TraceParent::sampled);
        let (trace_id, parent_id, flags, trace_state) = match parent {
            Some(p) => (p.trace_id, Some(p.parent_id), p.flags, p.tracestate.clone()),
            None => (new_trace_id(), None, 1, None),
        };
        // Off: the caller's context goes upstream untouched, so its trace is not cut.
        let forward = match (self.enabled(), parent) {
            (false, Some(p)) => Some((
                format_traceparent(&p.trace_id, &p.parent_id, p.flags),
                p.tracestate.clone(),
            )),
            _ => None,
        };
        ServerTrace {
            tracer: self.clone(),
            trace_id,
            span_id: new_span_id(),
            parent_id,
            flags,
            trace_state,
            recording,
            forward,
            start_unix_ns,
            started: Instant::now(),
            input: None,
            output: None,
            finish_reasons: Vec::new(),
            provider: None,
            held: None,
        }
    }
}

/// A request's server span while it runs, and what will go on it.
pub struct ServerTrace {
    tracer: Tracer,
    trace_id: [u8; 16],
    span_id: [u8; 8],
    parent_id: Option<[u8; 8]>,
    flags: u8,
    trace_state: Option<String>,
    /// Tracing is on and the caller did not ask for its trace to go unrecorded.
    recording: bool,
    /// With tracing off: the caller's `traceparent` and `tracestate`, passed on as they came.
    forward: Option<(String, Option<String>)>,
    start_unix_ns: u64,
    started: Instant,
    /// `gen_ai.input.messages` (only with `capture_content`).
    pub input: Option<String>,
    /// `gen_ai.output.messages` (only with `capture_content`).
    pub output: Option<String>,
    /// `gen_ai.response.finish_reasons`.
    pub finish_reasons: Vec<String>,
    /// `gen_ai.provider.name` of the attempt that answered.
    pub provider: Option<&'static str>,
    /// A stream's answering attempt: its client span ends with the stream.
    held: Option<Attempt>,
}

/// One upstream attempt's client span while it runs.
pub struct Attempt {
    span_id: [u8; 8],
    started: Instant,
    name: String,
    provider: &'static str,
    attributes: Vec<KeyValue>,
    headers: Option<TraceHeaders>,
}

impl Attempt {
    /// The `traceparent` (and `tracestate`) to send upstream with this attempt.
    pub fn headers(&self) -> Option<&TraceHeaders> {
        self.headers.as_ref()
    }
}

/// What an attempt is a call to.
pub struct AttemptTarget<'a> {
    /// `gen_ai.operation.name`.
    pub operation: &'static str,
    /// `gen_ai.provider.name` (the provider's kind: `openai`, `anthropic`).
    pub provider: &'static str,
    /// The configured provider's name.
    pub provider_name: &'a str,
    /// The model the upstream is asked for.
    pub model: &'a str,
}

impl ServerTrace {
    /// Whether content may be captured on this request's spans.
    pub fn capture_content(&self) -> bool {
        self.recording && self.tracer.capture_content()
    }

    /// Opens the client span of an attempt about to start.
    pub fn attempt(&self, target: AttemptTarget<'_>) -> Attempt {
        let span_id = new_span_id();
        let headers = if self.tracer.enabled() {
            Some(TraceHeaders::new(
                format_traceparent(&self.trace_id, &span_id, self.flags),
                self.trace_state.clone(),
            ))
        } else {
            self.forward
                .clone()
                .map(|(parent, state)| TraceHeaders::new(parent, state))
        };
        // The span's name and attributes are only built for a span that will be exported.
        let (name, attributes) = if self.recording {
            (
                format!("{} {}", target.operation, target.model),
                vec![
                    KeyValue::string("gen_ai.operation.name", target.operation),
                    KeyValue::string("gen_ai.provider.name", target.provider),
                    KeyValue::string("gen_ai.request.model", target.model),
                    KeyValue::string("tollgate.provider", target.provider_name),
                ],
            )
        } else {
            (String::new(), Vec::new())
        };
        Attempt {
            span_id,
            started: Instant::now(),
            name,
            provider: target.provider,
            attributes,
            headers,
        }
    }

    /// Ends an attempt's client span now.
    pub(crate) fn end_attempt(&mut self, attempt: Attempt, end: AttemptEnd) {
        if end.is_success() {
            self.provider = Some(attempt.provider);
        }
        if self.recording {
            let span = spans::client_span(self, attempt, end, Instant::now());
            self.tracer.submit(span);
        }
    }

    /// Keeps a stream's answering attempt open until the stream ends.
    pub fn hold_attempt(&mut self, attempt: Attempt) {
        self.provider = Some(attempt.provider);
        self.held = Some(attempt);
    }

    /// Ends the request's spans: a held attempt with `held_end`, then the server span.
    pub(crate) fn finish(
        mut self,
        held_end: impl FnOnce() -> AttemptEnd,
        server: impl FnOnce(&ServerTrace) -> Span,
    ) {
        if !self.recording {
            return;
        }
        if let Some(attempt) = self.held.take() {
            let span = spans::client_span(&self, attempt, held_end(), Instant::now());
            self.tracer.submit(span);
        }
        let span = server(&self);
        self.tracer.submit(span);
    }

    /// Unix nanoseconds of `at`, on the clock the span started by.
    fn unix_ns(&self, at: Instant) -> u64 {
        let since = at.saturating_duration_since(self.started).as_nanos();
        self.start_unix_ns
            .saturating_add(u64::try_from(since).unwrap_or(u64::MAX))
    }
}

fn new_trace_id() -> [u8; 16] {
    loop {
        let id: [u8; 16] = rand::random();
        if id != [0; 16] {
            return id;
        }
    }
}

fn new_span_id() -> [u8; 8] {
    loop {
        let id: [u8; 8] = rand::random();
        if id != [0; 8] {
            return id;
        }
    }
}
