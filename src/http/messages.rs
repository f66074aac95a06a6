//! `POST /v1/messages` and `POST /v1/messages/count_tokens`: the Anthropic Messages API. The
//! body is decoded into a neutral request that also carries the caller's bytes, one core call
//! is made, and its reply is said back in Anthropic's shapes: a passed-through answer as the
//! upstream's bytes, a translated one as a Message or as Messages events, a rejection as
//! `{"type":"error","error":{..}}`. No decisions are made here.

use std::convert::Infallible;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures_util::StreamExt;
use http::{HeaderMap, HeaderValue, StatusCode};

use super::chat::{json_response, passthrough_response, passthrough_sse, read_body};
use super::extract::ModelCall;
use crate::api::anthropic::{self, Endpoint, InboundHeaders, StreamEncoder};
use crate::api::Api;
use crate::core::{CallContext, ChatReply, ChatStream, Gateway, Rejection};

/// Decodes the body, makes one core call, encodes the reply.
pub async fn messages(
    State(gw): State<Arc<Gateway>>,
    ModelCall { ctx, headers, body }: ModelCall,
) -> Response {
    // Opened before the body is read, so that a body too large is still counted.
    let call = gw.model_call(with_api_key(ctx, &headers), Api::Messages);
    let limit = gw.runtime().config.server.max_body_bytes;
    let decoded = read_body(&headers, body, limit).await.and_then(|b| {
        anthropic::parse_messages_request(b, Endpoint::Messages, inbound_headers(&headers))
    });
    match call.run(decoded).await {
        Ok(ChatReply::Complete(c)) => {
            let body = anthropic::encode_message(&c.response, &c.usage);
            json_response(body.into(), &c.resolved_model, &c.policy_headers)
        }
        Ok(ChatReply::Passthrough(c)) => passthrough_response(*c),
        Ok(ChatReply::Stream(s)) => translated_stream(*s),
        Ok(ChatReply::PassthroughStream(s)) => passthrough_sse(*s, error_event),
        Err(e) => error_response(&e),
    }
}

/// `{"input_tokens": N}` for a Messages body.
pub async fn count_tokens(
    State(gw): State<Arc<Gateway>>,
    ModelCall { ctx, headers, body }: ModelCall,
) -> Response {
    let ctx = with_api_key(ctx, &headers);
    let limit = gw.runtime().config.server.max_body_bytes;
    let decoded = read_body(&headers, body, limit).await.and_then(|b| {
        anthropic::parse_messages_request(b, Endpoint::CountTokens, inbound_headers(&headers))
    });
    match gw.count_tokens(&ctx, decoded).await {
        Ok(n) => (
            [(
                http::header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            )],
            serde_json::json!({ "input_tokens": n }).to_string(),
        )
            .into_response(),
        Err(e) => error_response(&e),
    }
}

/// Anthropic's clients send the key in `x-api-key`; it stands for `Authorization: Bearer` when
/// that is absent.
fn with_api_key(mut ctx: CallContext, headers: &HeaderMap) -> CallContext {
    if ctx.authorization.is_none() {
        if let Some(key) = headers.get("x-api-key").and_then(|v| v.to_str().ok()) {
            ctx.authorization = Some(format!("Bearer {}", key.trim()));
        }
    }
    ctx
}

/// The caller's `anthropic-version` and `anthropic-beta` (repeated or comma-separated).
fn inbound_headers(headers: &HeaderMap) -> InboundHeaders {
    InboundHeaders {
        version: headers
            .get("anthropic-version")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string),
        beta: headers
            .get_all("anthropic-beta")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .filter(|v| !v.is_empty())
            .map(str::to_string)
            .collect(),
    }
}

/// A rejection in Anthropic's shape, with the reason's status, Retry-After and policy headers.
fn error_response(r: &Rejection) -> Response {
    let status =
        StatusCode::from_u16(r.reason.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    super::error::with_headers(
        r,
        (status, axum::Json(anthropic::error_json(r))).into_response(),
    )
}

/// Neutral deltas said as Messages events; a failure mid-way ends with an `error` event.
fn translated_stream(stream: ChatStream) -> Response {
    let resolved = stream.resolved_model().to_string();
    let policy = stream.policy_headers().to_vec();
    let state = (Some(stream), StreamEncoder::new());
    let events = futures_util::stream::unfold(state, |(state, mut enc)| async move {
        let mut stream = state?;
        let (events, more) = match stream.next().await {
            Some(Ok(delta)) => (enc.push(&delta), true),
            Some(Err(e)) => (vec![enc.error(&e)], false),
            None => (enc.finish(), false),
        };
        let text: String = events.iter().map(anthropic::sse).collect();
        let next = more.then_some(stream);
        Some((Ok::<_, Infallible>(Bytes::from(text)), (next, enc)))
    });
    super::chat::sse_head(Response::new(Body::from_stream(events)), &resolved, &policy)
}

/// A Messages stream's `error` event, for a failure after the first event.
fn error_event(e: &Rejection) -> Bytes {
    Bytes::from(anthropic::sse(&("error", anthropic::error_json(e))))
}
