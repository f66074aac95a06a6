//! The one extractor of the model routes: the call's context, the request's headers and its
//! body, taken out of the request rather than cloned from it (axum's `Extension` and
//! `HeaderMap` extractors clone theirs for every request).

use axum::body::Body;
use axum::extract::{FromRequest, Request};
use http::HeaderMap;

use crate::core::{CallContext, Protocol};

/// A request as the model routes read it.
pub struct ModelCall {
    /// Built by the request-context layer (or here, for a request that did not pass it).
    pub ctx: CallContext,
    pub headers: HeaderMap,
    pub body: Body,
}

impl<S: Send + Sync> FromRequest<S> for ModelCall {
    type Rejection = std::convert::Infallible;

    async fn from_request(req: Request, _: &S) -> Result<Self, Self::Rejection> {
        let (mut parts, body) = req.into_parts();
        let ctx = parts
            .extensions
            .remove::<CallContext>()
            .unwrap_or_else(|| CallContext::from_headers(Protocol::Http, &parts.headers));
        Ok(ModelCall {
            ctx,
            headers: parts.headers,
            body,
        })
    }
}
