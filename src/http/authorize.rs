//! `POST /v1/authorize`: the gRPC `Authorize` over HTTP. Runs auth, provisioning and the block
//! check (and the model check when a model is named) without calling a model.

use std::sync::Arc;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use super::chat::read_body;
use super::extract::ModelCall;
use crate::core::{Gateway, Principal, Reason, Rejection};

/// Decodes the optional `{"model": ...}` body, makes one core call, encodes the principal.
pub async fn authorize(
    State(gw): State<Arc<Gateway>>,
    ModelCall { ctx, headers, body }: ModelCall,
) -> Response {
    let limit = gw.runtime().config.server.max_body_bytes;
    let model = match read_body(&headers, body, limit)
        .await
        .and_then(|b| model_of(&b))
    {
        Ok(m) => m,
        Err(e) => return e.into_response(),
    };
    match gw.authorize(&ctx, model.as_deref()).await {
        Ok(p) => Json(principal_json(&p)).into_response(),
        Err(e) => e.into_response(),
    }
}

/// The `model` of an optional JSON object body.
fn model_of(body: &[u8]) -> Result<Option<String>, Rejection> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    let invalid = |m: &str| Rejection::new(Reason::InvalidRequest, m.to_string());
    let v: Value = serde_json::from_slice(body).map_err(|_| invalid("the body is not JSON"))?;
    match v.get("model") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(invalid("`model` must be a string").with_param("model")),
    }
}

/// The principal in the shape of the gRPC `Principal` message.
fn principal_json(p: &Principal) -> Value {
    json!({
        "user_id": p.identity.user_id,
        "external_id": p.identity.external_id,
        "auth_method": p.identity.method.as_str(),
        "service_type": p.service_type,
        "purpose": p.purpose,
        "allowed_models": p.allowed_models,
        "key_id": p.identity.key_id,
        "remaining_budget_micros": p.remaining_budget_micros,
    })
}
