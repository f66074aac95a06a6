//! The OTLP exporter: spans are queued on a bounded channel (a full queue drops the span and
//! counts it; a request never waits on tracing) and one task posts them in batches as
//! `application/x-protobuf` to `<otlp_endpoint>/v1/traces`.

use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prost::Message;
use tokio::sync::{mpsc, oneshot};

use super::otlp::{
    ExportTraceServiceRequest, InstrumentationScope, KeyValue, Resource, ResourceSpans, ScopeSpans,
    Span,
};
use crate::config::TelemetryConfig;
use crate::metrics::TraceDropLabels;

/// Why the exporter could not be started.
#[derive(Debug, thiserror::Error)]
pub enum ExporterError {
    /// The HTTP client could not be built.
    #[error("telemetry: cannot build the OTLP HTTP client: {0}")]
    Client(#[source] reqwest::Error),
}

/// What the exporter task is given.
pub(super) struct ExporterTask {
    pub spans: mpsc::Receiver<Span>,
    pub flushes: mpsc::Receiver<oneshot::Sender<()>>,
    client: reqwest::Client,
    url: String,
    resource: Resource,
    interval: Duration,
    max_batch: usize,
    dropped: Family<TraceDropLabels, Counter>,
}

impl ExporterTask {
    /// The task for `cfg` (whose `otlp_endpoint` is set), reading the two channels.
    pub fn new(
        cfg: &TelemetryConfig,
        endpoint: &str,
        spans: mpsc::Receiver<Span>,
        flushes: mpsc::Receiver<oneshot::Sender<()>>,
        dropped: Family<TraceDropLabels, Counter>,
    ) -> Result<ExporterTask, ExporterError> {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_millis(cfg.export_timeout_ms))
            .user_agent(concat!("tollgate/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(ExporterError::Client)?;
        Ok(ExporterTask {
            spans,
            flushes,
            client,
            url: format!("{}/v1/traces", endpoint.trim_end_matches('/')),
            resource: Resource {
                attributes: vec![
                    KeyValue::string("service.name", cfg.service_name.clone()),
                    KeyValue::string("service.version", env!("CARGO_PKG_VERSION")),
                    KeyValue::string("telemetry.sdk.name", "tollgate"),
                    KeyValue::string("telemetry.sdk.language", "rust"),
                ],
            },
            interval: Duration::from_millis(cfg.batch_interval_ms.max(1)),
            max_batch: cfg.max_batch_spans.max(1),
            dropped,
        })
    }

    /// Posts a batch every interval, or as soon as it is full; on a flush request or when every
    /// sender is gone, posts what is queued and answers.
    pub async fn run(mut self) {
        let mut batch: Vec<Span> = Vec::new();
        let mut tick = tokio::time::interval(self.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                span = self.spans.recv() => match span {
                    Some(span) => {
                        batch.push(span);
                        if batch.len() >= self.max_batch {
                            self.post(&mut batch).await;
                        }
                    }
                    None => {
                        self.post(&mut batch).await;
                        return;
                    }
                },
                _ = tick.tick() => self.post(&mut batch).await,
                Some(done) = self.flushes.recv() => {
                    while let Ok(span) = self.spans.try_recv() {
                        batch.push(span);
                        if batch.len() >= self.max_batch {
                            self.post(&mut batch).await;
                        }
                    }
                    self.post(&mut batch).await;
                    let _ = done.send(());
                }
            }
        }
    }

    async fn post(&self, batch: &mut Vec<Span>) {
        if batch.is_empty() {
            return;
        }
        let n = batch.len() as u64;
        let body = ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans {
                resource: Some(self.resource.clone()),
                scope_spans: vec![ScopeSpans {
                    scope: Some(InstrumentationScope {
                        name: "tollgate".into(),
                        version: env!("CARGO_PKG_VERSION").into(),
                    }),
                    spans: std::mem::take(batch),
                    schema_url: String::new(),
                }],
                schema_url: String::new(),
            }],
        }
        .encode_to_vec();
        let result = self
            .client
            .post(&self.url)
            .header(reqwest::header::CONTENT_TYPE, "application/x-protobuf")
            .body(body)
            .send()
            .await;
        let failure = match result {
            Ok(resp) if resp.status().is_success() => return,
            Ok(resp) => format!("the collector answered {}", resp.status()),
            // Without the URL: an endpoint may carry credentials.
            Err(e) => format!("cannot reach the collector: {}", e.without_url()),
        };
        self.dropped
            .get_or_create(&TraceDropLabels {
                reason: "export_failed",
            })
            .inc_by(n);
        tracing::warn!(spans = n, error = %failure, "OTLP trace export failed; spans dropped");
    }
}
