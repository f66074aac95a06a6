//! `POST /v1/responses`: the OpenAI Responses API. The body is decoded into a neutral request
//! that also carries the caller's bytes, one core call is made, and its reply is said back in
//! the Responses shapes: a passed-through answer as the upstream's bytes, a translated one as a
//! Response object or as typed Responses events, a rejection in OpenAI's error shape. No
//! decisions are made here.

use std::convert::Infallible;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures_util::StreamExt;
use serde_json::json;

use super::chat::{json_response, passthrough_response, read_body};
use super::extract::ModelCall;
use crate::api::openai_responses::{self as responses, Echo, StreamEncoder};
use crate::api::Api;
use crate::core::{ChatReply, ChatStream, Gateway, PassthroughStream, Rejection};

/// Decodes the body, makes one core call, encodes the reply.
pub async fn responses(
    State(gw): State<Arc<Gateway>>,
    ModelCall { ctx, headers, body }: ModelCall,
) -> Response {
    // Opened before the body is read, so that a body too large is still counted.
    let call = gw.model_call(ctx, Api::Responses);
    let limit = gw.runtime().config.server.max_body_bytes;
    let decoded = read_body(&headers, body, limit)
        .await
        .and_then(responses::parse_request);
    let (decoded, echo) = match decoded {
        Ok((req, echo)) => (Ok(req), echo),
        Err(e) => (Err(e), Echo::default()),
    };
    match call.run(decoded).await {
        Ok(ChatReply::Complete(c)) => {
            let body = responses::encode_response(&c.response, &c.usage, &echo);
            json_response(body.into(), &c.resolved_model, &c.policy_headers)
        }
        Ok(ChatReply::Passthrough(c)) => passthrough_response(*c),
        Ok(ChatReply::Stream(s)) => translated_stream(*s, echo),
        Ok(ChatReply::PassthroughStream(s)) => passthrough_stream(*s),
        Err(e) => e.into_response(),
    }
}

/// Neutral deltas said as Responses events; a failure mid-way ends with `response.failed`.
fn translated_stream(stream: ChatStream, echo: Echo) -> Response {
    let resolved = stream.resolved_model().to_string();
    let policy = stream.policy_headers().to_vec();
    let state = (Some(stream), StreamEncoder::new(echo));
    let events = futures_util::stream::unfold(state, |(state, mut enc)| async move {
        let mut stream = state?;
        let (events, more) = match stream.next().await {
            Some(Ok(delta)) => (enc.push(&delta), true),
            Some(Err(e)) => (enc.failed(&e), false),
            None => (enc.finish(), false),
        };
        let text: String = events.iter().map(responses::sse).collect();
        let next = more.then_some(stream);
        Some((Ok::<_, Infallible>(Bytes::from(text)), (next, enc)))
    });
    super::chat::sse_head(Response::new(Body::from_stream(events)), &resolved, &policy)
}

/// The upstream's events as they came; a transport failure mid-way ends with an `error` event
/// numbered after the last event passed (the upstream numbers its events from 0).
fn passthrough_stream(stream: PassthroughStream) -> Response {
    let resolved = stream.resolved_model().to_string();
    let policy = stream.policy_headers().to_vec();
    let events = futures_util::stream::unfold((Some(stream), 0u64), |(state, n)| async move {
        let mut stream = state?;
        match stream.next().await {
            Some(Ok(bytes)) => Some((Ok::<_, Infallible>(bytes), (Some(stream), n + 1))),
            Some(Err(e)) => {
                let event = ("error".to_string(), error_event(&e, n));
                Some((Ok(Bytes::from(responses::sse(&event))), (None, n)))
            }
            None => None,
        }
    });
    super::chat::sse_head(Response::new(Body::from_stream(events)), &resolved, &policy)
}

/// The Responses `error` event for a rejection.
fn error_event(r: &Rejection, sequence_number: u64) -> serde_json::Value {
    json!({
        "type": "error",
        "code": r.reason.as_str(),
        "message": r.message,
        "param": r.param,
        "sequence_number": sequence_number,
    })
}
