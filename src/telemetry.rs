//! Request metrics shared by both protocols: counted on arrival, timed to the end of the
//! response body (so streams are timed whole), status recorded when known.

use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;

use crate::metrics::{EndpointLabels, Label, Metrics, StatusCode};

/// The series of one endpoint (a route template, a gRPC method): handles into their families,
/// found once, so that counting a request is an atomic add and not a lookup of its labels.
#[derive(Clone)]
pub struct EndpointSeries {
    requests: Counter,
    in_progress: Gauge,
    latency: Histogram,
}

/// An endpoint whose series are found the first time it is called (so that an endpoint never
/// called has none, as before it was cached).
pub struct Endpoint {
    labels: EndpointLabels,
    series: OnceLock<EndpointSeries>,
}

impl Endpoint {
    /// The endpoint `endpoint` of `protocol`.
    pub fn new(protocol: &'static str, endpoint: Label) -> Self {
        Self {
            labels: EndpointLabels { protocol, endpoint },
            series: OnceLock::new(),
        }
    }

    /// Its `endpoint` label.
    pub fn label(&self) -> &str {
        &self.labels.endpoint
    }

    fn series(&self, m: &Metrics) -> EndpointSeries {
        self.series
            .get_or_init(|| EndpointSeries {
                requests: m.requests.get_or_create(&self.labels).clone(),
                in_progress: m.in_progress.get_or_create(&self.labels).clone(),
                latency: m.request_latency.get_or_create(&self.labels).clone(),
            })
            .clone()
    }
}

/// One request being observed; records latency, status and in-progress when dropped.
pub struct RequestObservation {
    metrics: Arc<Metrics>,
    protocol: &'static str,
    series: EndpointSeries,
    started: Instant,
    /// Known from the response head (HTTP, gRPC trailers-only) or the trailers (gRPC).
    status: Option<StatusCode>,
}

impl RequestObservation {
    /// Counts the request and marks it in progress.
    pub fn start(metrics: Arc<Metrics>, endpoint: &Endpoint) -> Self {
        let series = endpoint.series(&metrics);
        series.requests.inc();
        series.in_progress.inc();
        Self {
            metrics,
            protocol: endpoint.labels.protocol,
            series,
            started: Instant::now(),
            status: None,
        }
    }

    /// Sets the status to record.
    pub fn set_status(&mut self, status: StatusCode) {
        self.status = Some(status);
    }
}

impl Drop for RequestObservation {
    fn drop(&mut self) {
        self.series.in_progress.dec();
        self.series
            .latency
            .observe(self.started.elapsed().as_secs_f64());
        // A body that ends without a status is a gRPC call the client cancelled.
        let status_code = self.status.unwrap_or(StatusCode::Grpc("CANCELLED"));
        self.metrics.count_status(self.protocol, status_code);
    }
}

/// A response body that ends its request's observation when it is finished or dropped, and
/// reads a gRPC status from the trailers.
pub struct ObservedBody<B> {
    inner: B,
    observation: Option<RequestObservation>,
}

impl<B> ObservedBody<B> {
    /// Wraps `inner`.
    pub fn new(inner: B, observation: RequestObservation) -> Self {
        Self {
            inner,
            observation: Some(observation),
        }
    }
}

impl<B> Body for ObservedBody<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(code) = frame
                    .trailers_ref()
                    .and_then(|t| t.get("grpc-status"))
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<i32>().ok())
                {
                    if let Some(o) = self.observation.as_mut() {
                        o.set_status(StatusCode::Grpc(grpc_code_name(code)));
                    }
                }
            }
            Poll::Ready(None) => {
                self.observation.take();
            }
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The canonical name of a gRPC status code.
pub fn grpc_code_name(code: i32) -> &'static str {
    match code {
        0 => "OK",
        1 => "CANCELLED",
        2 => "UNKNOWN",
        3 => "INVALID_ARGUMENT",
        4 => "DEADLINE_EXCEEDED",
        5 => "NOT_FOUND",
        6 => "ALREADY_EXISTS",
        7 => "PERMISSION_DENIED",
        8 => "RESOURCE_EXHAUSTED",
        9 => "FAILED_PRECONDITION",
        10 => "ABORTED",
        11 => "OUT_OF_RANGE",
        12 => "UNIMPLEMENTED",
        13 => "INTERNAL",
        14 => "UNAVAILABLE",
        15 => "DATA_LOSS",
        16 => "UNAUTHENTICATED",
        _ => "UNKNOWN",
    }
}
