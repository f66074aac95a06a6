//! Operational routes: health, readiness, metrics, the model list, and 404s.

use std::sync::Arc;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use http::StatusCode;
use serde_json::json;

use super::error_response;
use crate::core::{CallContext, Gateway, Reason, Rejection};

/// The process is up.
pub async fn healthz() -> &'static str {
    "ok"
}

/// The store answers, a configuration is loaded, and the process is not shutting down; with
/// `[rate_limits] backend = "redis"`, the body also says whether Redis answers, and a replica
/// that fails closed is not ready while it does not (one that fails open still serves, so it
/// stays ready).
pub async fn readyz(State(gw): State<Arc<Gateway>>) -> Response {
    if gw.draining() {
        return (StatusCode::SERVICE_UNAVAILABLE, "shutting down").into_response();
    }
    let (store, redis) = tokio::join!(gw.ready(), gw.redis_ready());
    if !store {
        return (StatusCode::SERVICE_UNAVAILABLE, "store unreachable").into_response();
    }
    match redis {
        None => (StatusCode::OK, "ready").into_response(),
        Some((true, _)) => (StatusCode::OK, "ready\nredis: ok").into_response(),
        Some((false, false)) => (
            StatusCode::OK,
            "ready\nredis: unreachable (fail_open: requests are admitted without rate limits)",
        )
            .into_response(),
        Some((false, true)) => (
            StatusCode::SERVICE_UNAVAILABLE,
            "redis unreachable (fail_closed: rate-limited requests are refused)",
        )
            .into_response(),
    }
}

/// Prometheus exposition.
pub async fn metrics(State(gw): State<Arc<Gateway>>) -> Response {
    gw.refresh_scrape_gauges();
    (
        [(
            http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        gw.metrics().encode(),
    )
        .into_response()
}

/// `GET /v1/models`: the models and aliases this caller may use, in OpenAI's list shape.
pub async fn models(
    State(gw): State<Arc<Gateway>>,
    Extension(ctx): Extension<CallContext>,
) -> Response {
    match gw.list_models(&ctx).await {
        Ok(models) => {
            let data: Vec<_> = models
                .into_iter()
                .map(|m| {
                    json!({
                        "id": m.id,
                        "object": "model",
                        "created": 0,
                        "owned_by": m.owned_by,
                        "tollgate": {
                            "kind": if m.alias { "alias" } else { "model" },
                            "description": m.description,
                            "chain": m.chain,
                            "apis": m.apis.iter().map(|a| a.as_str()).collect::<Vec<_>>(),
                        },
                    })
                })
                .collect();
            Json(json!({"object": "list", "data": data})).into_response()
        }
        Err(e) => error_response(&e),
    }
}

/// Unknown routes answer in the OpenAI error shape too.
pub async fn not_found() -> Response {
    let mut r = error_response(&Rejection::new(Reason::InvalidRequest, "no such route"));
    *r.status_mut() = StatusCode::NOT_FOUND;
    r
}
