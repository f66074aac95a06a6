//! `POST /v1/embeddings`: OpenAI's embeddings wire over the core's embeddings call.

use std::sync::Arc;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use http::HeaderValue;

use super::chat::{read_body, set_model_headers};
use super::extract::ModelCall;
use crate::api::openai_embeddings;
use crate::core::Gateway;

/// Decodes the body, makes one core call, encodes the reply.
pub async fn embeddings(
    State(gw): State<Arc<Gateway>>,
    ModelCall { ctx, headers, body }: ModelCall,
) -> Response {
    // Opened before the body is read, so that a body too large or a client that leaves while
    // sending it is still counted.
    let call = gw.embed(ctx);
    let limit = gw.runtime().config.server.max_body_bytes;
    let decoded = read_body(&headers, body, limit)
        .await
        .and_then(|b| openai_embeddings::parse_request(&b));
    match call.run(decoded).await {
        Ok(e) => {
            let json = openai_embeddings::encode_response(
                &e.response,
                &e.requested_model,
                e.encoding_format,
                e.usage.prompt_tokens,
            );
            let mut r = (
                [(
                    http::header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                )],
                json,
            )
                .into_response();
            set_model_headers(&mut r, &e.resolved_model, &e.policy_headers);
            r
        }
        Err(e) => e.into_response(),
    }
}
