//! Request metrics for HTTP, by route template.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::Response;

use crate::metrics::Metrics;
use crate::telemetry::{ObservedBody, RequestObservation};

/// Counts, times and classifies every HTTP request; unmatched paths share one label.
pub async fn observe(State(metrics): State<Arc<Metrics>>, req: Request, next: Next) -> Response {
    let endpoint = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".to_string());
    let mut observation = RequestObservation::start(metrics, "http", endpoint);
    let resp = next.run(req).await;
    observation.set_status(resp.status().as_u16().to_string());
    let (parts, body) = resp.into_parts();
    Response::from_parts(parts, Body::new(ObservedBody::new(body, observation)))
}
