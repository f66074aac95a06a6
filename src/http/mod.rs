//! The OpenAI-compatible HTTP adapter (axum): decodes requests into core calls and encodes
//! results and rejections in OpenAI's shapes. No decisions are made here.

mod admin;
mod authorize;
mod body_guard;
mod budgets;
mod chat;
mod embeddings;
mod error;
mod messages;
mod ops;
mod responses;
mod telemetry;

use std::sync::Arc;

use axum::routing::{get, post};
use axum::Router;

use crate::core::{Gateway, Protocol};
use crate::request_context::RequestContextLayer;
pub use error::error_response;

pub use crate::core::headers;

/// Every HTTP route, with request telemetry around them.
pub fn router(gateway: Arc<Gateway>) -> Router {
    let metrics = gateway.metrics().clone();
    let body_timeout =
        std::time::Duration::from_millis(gateway.runtime().config.server.body_read_timeout_ms);
    Router::new()
        .route("/v1/chat/completions", post(chat::chat_completions))
        .route("/v1/messages", post(messages::messages))
        .route("/v1/messages/count_tokens", post(messages::count_tokens))
        .route("/v1/responses", post(responses::responses))
        .route("/v1/embeddings", post(embeddings::embeddings))
        .route("/v1/models", get(ops::models))
        .route("/v1/authorize", post(authorize::authorize))
        .route("/healthz", get(ops::healthz))
        .route("/readyz", get(ops::readyz))
        .route("/metrics", get(ops::metrics))
        .route("/v1/health", get(admin::health))
        .route("/v1/aliases", get(admin::aliases))
        .merge(admin::routes(gateway.clone()))
        .merge(budgets::routes(gateway.clone()))
        .fallback(ops::not_found)
        .with_state(gateway)
        .layer(axum::middleware::from_fn_with_state(
            body_timeout,
            body_guard::guard,
        ))
        .layer(axum::middleware::from_fn_with_state(
            metrics,
            telemetry::observe,
        ))
        .layer(RequestContextLayer::new(Protocol::Http))
}
