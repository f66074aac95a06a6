//! Rejections as OpenAI error bodies: `{"error": {"message", "type", "code", "param"}}`.

use axum::response::{IntoResponse, Response};
use axum::Json;
use http::{HeaderValue, StatusCode};
use serde_json::json;

use crate::core::Rejection;

/// The OpenAI error object for a rejection.
pub fn error_body(r: &Rejection) -> serde_json::Value {
    json!({
        "error": {
            "message": r.message,
            "type": r.reason.openai_type(),
            "code": r.reason.as_str(),
            "param": r.param,
        }
    })
}

/// The HTTP response for a rejection: status from the reason, OpenAI body, Retry-After.
pub fn error_response(r: &Rejection) -> Response {
    let status =
        StatusCode::from_u16(r.reason.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    with_headers(r, (status, Json(error_body(r))).into_response())
}

/// A rejection's Retry-After and policy headers set on its error response (whatever its body's
/// shape).
pub(super) fn with_headers(r: &Rejection, mut resp: Response) -> Response {
    if let Some(after) = r.retry_after {
        let secs = after.as_secs() + u64::from(after.subsec_nanos() > 0);
        if let Ok(v) = HeaderValue::from_str(&secs.max(1).to_string()) {
            resp.headers_mut().insert(http::header::RETRY_AFTER, v);
        }
    }
    for (name, value) in &r.headers {
        if let Ok(v) = HeaderValue::from_str(value) {
            resp.headers_mut().insert(name.header.clone(), v);
        }
    }
    resp
}

/// A rejection answers in OpenAI's error shape (the default of this API; `/v1/messages`
/// answers in Anthropic's).
impl IntoResponse for Rejection {
    fn into_response(self) -> Response {
        error_response(&self)
    }
}
