//! `POST /v1/chat/completions`: JSON or Server-Sent Events.

use std::convert::Infallible;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures_util::StreamExt;
use http::{HeaderMap, HeaderValue};
use http_body_util::BodyExt;

use super::error::error_body;
use super::extract::ModelCall;
use crate::api::{openai_chat, ChatDelta};
use crate::core::header_names;
use crate::core::{
    ChatReply, ChatStream, Gateway, NativeCompletion, PassthroughStream, Reason, Rejection,
};

/// Decodes the body, makes one core call, encodes the reply.
pub async fn chat_completions(
    State(gw): State<Arc<Gateway>>,
    ModelCall { ctx, headers, body }: ModelCall,
) -> Response {
    // The call is opened before the body is read, so that a body too large or a client that
    // leaves while sending it is still counted.
    let call = gw.chat(ctx);
    let limit = gw.runtime().config.server.max_body_bytes;
    let decoded = read_body(&headers, body, limit)
        .await
        .and_then(openai_chat::parse_request_keeping_body);
    match call.run(decoded).await {
        Ok(ChatReply::Complete(c)) => json_response(
            openai_chat::encode_response(&c.response).into(),
            &c.resolved_model,
            &c.policy_headers,
        ),
        // A whole answer from an OpenAI-wire upstream: its bytes, only `model` rewritten.
        Ok(ChatReply::Passthrough(c)) => passthrough_response(*c),
        Ok(ChatReply::Stream(s)) => sse_response(*s),
        Ok(ChatReply::PassthroughStream(s)) => passthrough_sse(*s, error_event),
        Err(e) => e.into_response(),
    }
}

/// A JSON body with the resolved-model and policy headers.
pub(super) fn json_response(
    body: Bytes,
    resolved: &str,
    policy: &[crate::error::PolicyHeader],
) -> Response {
    let mut r = (
        [(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        body,
    )
        .into_response();
    set_model_headers(&mut r, resolved, policy);
    r
}

/// Sets the resolved-model and policy headers of a model answer. Room for them (and the
/// request id the request-context layer adds) is made at once: the map would otherwise grow,
/// and rehash, twice on the way to a dozen headers.
pub(super) fn set_model_headers(
    resp: &mut Response,
    resolved: &str,
    policy: &[crate::error::PolicyHeader],
) {
    resp.headers_mut().reserve(policy.len() + 2);
    set_header(resp, header_names::RESOLVED_MODEL, resolved);
    for (name, value) in policy {
        set_header(resp, name.header.clone(), value);
    }
}

/// A whole pass-through answer: the upstream's bytes, only `model` rewritten.
pub(super) fn passthrough_response(c: NativeCompletion) -> Response {
    let NativeCompletion {
        body,
        resolved_model,
        policy_headers,
        ..
    } = c;
    json_response(body, &resolved_model, &policy_headers)
}

/// Sets a response header; a value that cannot be one is left out. `name` is one of
/// tollgate's constants, made once from a static string: it is neither copied (a `&str` name
/// would be, for every response) nor checked again.
pub(super) fn set_header(resp: &mut Response, name: http::HeaderName, value: &str) {
    if let Ok(v) = HeaderValue::from_str(value) {
        resp.headers_mut().insert(name, v);
    }
}

/// Reads the body, refusing it before reading when `Content-Length` is over the limit and while
/// reading when it grows past it.
pub(super) async fn read_body(
    headers: &HeaderMap,
    body: Body,
    limit: usize,
) -> Result<Bytes, Rejection> {
    let too_large = || {
        Rejection::new(
            Reason::PayloadTooLarge,
            format!("the request body is larger than {limit} bytes"),
        )
    };
    let declared = headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(too_large());
    }
    match http_body_util::Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e)
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some() =>
        {
            Err(too_large())
        }
        Err(e) if super::body_guard::is_body_timeout(&*e) => Err(Rejection::new(
            Reason::RequestTimeout,
            format!("the request body was not received in time: {e}"),
        )),
        Err(e) => Err(Rejection::new(
            Reason::InvalidRequest,
            format!("the request body could not be read: {e}"),
        )),
    }
}

/// Chunks as `data: {json}` events; `data: [DONE]` after a clean end, an error event (and no
/// `[DONE]`) after a failure.
fn sse_response(stream: ChatStream) -> Response {
    let resolved = stream.resolved_model().to_string();
    let policy = stream.policy_headers().to_vec();
    let events = futures_util::stream::unfold(Some(stream), |state| async move {
        let mut stream = state?;
        let bytes = match stream.next().await {
            Some(Ok(delta)) => {
                return Some((Ok::<_, Infallible>(chunk_events(delta)), Some(stream)));
            }
            Some(Err(e)) => event(&error_body(&e).to_string()),
            None => Bytes::from_static(b"data: [DONE]\n\n"),
        };
        Some((Ok(bytes), None))
    });
    sse_head(Response::new(Body::from_stream(events)), &resolved, &policy)
}

/// An upstream's events as they came (an OpenAI stream's own `data: [DONE]` included); a
/// failure mid-way ends with the event `error_event` makes of it, in the caller's wire.
pub(super) fn passthrough_sse(
    stream: PassthroughStream,
    error_event: fn(&Rejection) -> Bytes,
) -> Response {
    let resolved = stream.resolved_model().to_string();
    let policy = stream.policy_headers().to_vec();
    let events = futures_util::stream::unfold(Some(stream), move |state| async move {
        let mut stream = state?;
        match stream.next().await {
            Some(Ok(bytes)) => Some((Ok::<_, Infallible>(bytes), Some(stream))),
            Some(Err(e)) => Some((Ok(error_event(&e)), None)),
            None => None,
        }
    });
    sse_head(Response::new(Body::from_stream(events)), &resolved, &policy)
}

/// A chat stream's error event, as a translated stream ends with.
fn error_event(e: &Rejection) -> Bytes {
    event(&error_body(e).to_string())
}

/// The head of every event stream (chat, Messages, Responses): its type, the resolved model and
/// the policy headers. `Cache-Control: no-cache` keeps caches from holding a stream back, and
/// `X-Accel-Buffering: no` tells nginx (and proxies that honour it) to pass each event on at
/// once instead of buffering the response, which would stall tokens until the buffer fills.
pub(super) fn sse_head(
    mut resp: Response,
    resolved: &str,
    policy: &[crate::error::PolicyHeader],
) -> Response {
    let h = resp.headers_mut();
    h.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(
        http::header::CACHE_CONTROL,
        HeaderValue::from_static("no-cache"),
    );
    h.insert(
        http::HeaderName::from_static("x-accel-buffering"),
        HeaderValue::from_static("no"),
    );
    set_model_headers(&mut resp, resolved, policy);
    resp
}

/// A delta as OpenAI chunk events. OpenAI sends usage on a chunk of its own, with no choices,
/// and clients look for it there; a provider that reports usage with its last choice delta
/// (Anthropic's `message_delta`) gets it split off.
fn chunk_events(mut delta: ChatDelta) -> Bytes {
    match delta.usage {
        Some(usage) if !delta.choices.is_empty() => {
            delta.usage = None;
            let mut out = event(&openai_chat::encode_chunk(&delta)).to_vec();
            delta.choices.clear();
            delta.usage = Some(usage);
            out.extend_from_slice(&event(&openai_chat::encode_chunk(&delta)));
            Bytes::from(out)
        }
        _ => event(&openai_chat::encode_chunk(&delta)),
    }
}

fn event(json: &str) -> Bytes {
    let mut s = String::with_capacity(json.len() + 8);
    s.push_str("data: ");
    s.push_str(json);
    s.push_str("\n\n");
    Bytes::from(s)
}
