//! Request metrics for HTTP, by route template.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::body::Body;
use axum::extract::Request;
use axum::response::Response;

use crate::metrics::{Label, Metrics, StatusCode};
use crate::telemetry::{Endpoint, ObservedBody, RequestObservation};

/// The route templates of the table (`/admin/users/{id}`), matched the way the router matches
/// them, each with its label made once. The layer wraps the router whole rather than each of
/// its routes (axum boxes and clones a route's service once for every layer on it, for every
/// request), so it matches the path itself instead of reading the router's `MatchedPath`.
pub struct RouteTemplates {
    templates: matchit::Router<Endpoint>,
    unmatched: Endpoint,
}

impl RouteTemplates {
    /// The templates of `paths`, in axum's (and matchit's) path syntax.
    pub fn new<'a>(paths: impl IntoIterator<Item = &'a str>) -> Self {
        let mut templates = matchit::Router::new();
        for path in paths {
            // A path of the table twice (one route a method) is one template.
            let _ = templates.insert(path, Endpoint::new("http", Label::from(path)));
        }
        Self {
            templates,
            unmatched: Endpoint::new("http", Label::from("unmatched")),
        }
    }

    /// The endpoint of a request path.
    pub fn endpoint(&self, path: &str) -> &Endpoint {
        match self.templates.at(path) {
            Ok(m) => m.value,
            Err(_) => &self.unmatched,
        }
    }
}

/// Counts, times and classifies every HTTP request; unmatched paths share one label. A tower
/// layer, not `axum::middleware::from_fn`: that boxes the inner service and the future of
/// every request.
#[derive(Clone)]
pub struct ObserveLayer {
    metrics: Arc<Metrics>,
    routes: Arc<RouteTemplates>,
}

impl ObserveLayer {
    /// Records into `metrics`, by the templates of `routes`.
    pub fn new(metrics: Arc<Metrics>, routes: RouteTemplates) -> Self {
        Self {
            metrics,
            routes: Arc::new(routes),
        }
    }
}

impl<S> tower::Layer<S> for ObserveLayer {
    type Service = Observe<S>;
    fn layer(&self, inner: S) -> Observe<S> {
        Observe {
            inner,
            metrics: self.metrics.clone(),
            routes: self.routes.clone(),
        }
    }
}

/// The service of [`ObserveLayer`].
#[derive(Clone)]
pub struct Observe<S> {
    inner: S,
    metrics: Arc<Metrics>,
    routes: Arc<RouteTemplates>,
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
        let endpoint = self.routes.endpoint(req.uri().path());
        // Dropped unfinished (the client left), it records the request as such.
        let observation = RequestObservation::start(self.metrics.clone(), endpoint);
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
        observation.set_status(StatusCode::Http(resp.status().as_u16()));
        let (parts, body) = resp.into_parts();
        Poll::Ready(Ok(Response::from_parts(
            parts,
            Body::new(ObservedBody::new(body, observation)),
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::RouteTemplates;

    #[test]
    fn a_path_is_labelled_by_its_route_template_as_the_router_matches_it() {
        let table = super::super::routes::table();
        let routes = RouteTemplates::new(table.iter().map(|r| r.path));
        let label = |path| routes.endpoint(path).label().to_string();
        assert_eq!(label("/v1/chat/completions"), "/v1/chat/completions");
        assert_eq!(label("/admin/users/42"), "/admin/users/{id}");
        assert_eq!(label("/admin/users/42/block"), "/admin/users/{id}/block");
        assert_eq!(
            label("/admin/providers/up/keys/sk-...abcd/enable"),
            "/admin/providers/{provider}/keys/{hint}/enable"
        );
        // Paths the router does not serve share one label, so callers cannot make series.
        assert_eq!(label("/v1/chat/completions/"), "unmatched");
        assert_eq!(label("/no/such/path"), "unmatched");
        assert_eq!(label("/admin/users/42/nope"), "unmatched");
    }
}
