//! The OpenAI-compatible HTTP adapter (axum): decodes requests into core calls and encodes
//! results and rejections in OpenAI's shapes. No decisions are made here.

mod admin;
mod authorize;
mod body_guard;
mod budgets;
mod chat;
mod embeddings;
mod error;
mod extract;
mod messages;
mod openapi;
mod ops;
mod responses;
mod routes;
mod telemetry;

use std::sync::Arc;

use axum::Router;

use crate::core::{Gateway, Protocol};
use crate::request_context::{RequestContext, RequestContextLayer};
pub use budgets::usage_json;
pub use error::error_response;
pub use openapi::document as openapi_document;

pub use crate::core::headers;

/// The HTTP application: the router of the route table, inside the layers every request
/// passes (its context, its metrics, its body's deadline). The layers wrap the router whole,
/// not each route (`Router::layer`), which would box and clone every route's service once a
/// layer for every request.
pub type App = RequestContext<telemetry::Observe<body_guard::BodyGuard<Router>>>;

/// Every HTTP route of the route table (`routes`), with request telemetry around them.
pub fn router(gateway: Arc<Gateway>) -> App {
    use tower::Layer;
    let metrics = gateway.metrics().clone();
    let body_timeout =
        std::time::Duration::from_millis(gateway.runtime().config.server.body_read_timeout_ms);
    let mut router = Router::new();
    let table = routes::table();
    let templates = telemetry::RouteTemplates::new(table.iter().map(|r| r.path));
    for route in table {
        let handler = match route.doc.auth {
            routes::Auth::Admin => route
                .handler
                .route_layer(axum::middleware::from_fn_with_state(
                    gateway.clone(),
                    admin::require_admin,
                )),
            routes::Auth::Public | routes::Auth::Caller => route.handler,
        };
        router = router.route(route.path, handler);
    }
    let router = router.fallback(ops::not_found).with_state(gateway);
    let guarded = body_guard::BodyGuardLayer::new(body_timeout).layer(router);
    let observed = telemetry::ObserveLayer::new(metrics, templates).layer(guarded);
    RequestContextLayer::new(Protocol::Http).layer(observed)
}
