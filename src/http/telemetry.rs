//! Request metrics for HTTP, by route template.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::body::Body;
use axum::extract::{MatchedPath, Request};
use axum::response::Response;

use crate::metrics::Metrics;
use crate::telemetry::{ObservedBody, RequestObservation};

/// Counts, times and classifies every HTTP request; unmatched paths share one label. A tower
/// layer, not `axum::middleware::from_fn`: that boxes the inner service and the future of
/// every request.
#[derive(Clone)]
pub struct ObserveLayer {
    metrics: Arc<Metrics>,
}

impl ObserveLayer {
    /// Records into `metrics`.
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self { metrics }
    }
}

impl<S> tower::Layer<S> for ObserveLayer {
    type Service = Observe<S>;
    fn layer(&self, inner: S) -> Observe<S> {
        Observe {
            inner,
            metrics: self.metrics.clone(),
        }
    }
}

/// The service of [`ObserveLayer`].
#[derive(Clone)]
pub struct Observe<S> {
    inner: S,
    metrics: Arc<Metrics>,
}

impl<S> tower::Service<Request> for Observe<S>
where
    S: tower::Service<Request, Response = Response>,
{
    type Response = Response;
    type Error = S::Error;
    type Future = ObservedResponse<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request) -> Self::Future {
        let endpoint = req
            .extensions()
            .get::<MatchedPath>()
            .map(|p| p.as_str().to_string())
            .unwrap_or_else(|| "unmatched".to_string());
        // Dropped unfinished (the client left), it records the request as such.
        let observation = RequestObservation::start(self.metrics.clone(), "http", endpoint);
        ObservedResponse {
            inner: self.inner.call(req),
            observation: Some(observation),
        }
    }
}

pin_project_lite::pin_project! {
    /// The response of an observed request, its body observed until it ends.
    pub struct ObservedResponse<F> {
        #[pin]
        inner: F,
        observation: Option<RequestObservation>,
    }
}

impl<F, E> Future for ObservedResponse<F>
where
    F: Future<Output = Result<Response, E>>,
{
    type Output = Result<Response, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let resp = std::task::ready!(this.inner.poll(cx))?;
        let Some(mut observation) = this.observation.take() else {
            return Poll::Ready(Ok(resp));
        };
        observation.set_status(resp.status().as_u16().to_string());
        let (parts, body) = resp.into_parts();
        Poll::Ready(Ok(Response::from_parts(
            parts,
            Body::new(ObservedBody::new(body, observation)),
        )))
    }
}
