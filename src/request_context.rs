//! The request-context layer both servers share: the call's `CallContext` is built once from
//! the request's headers (gRPC metadata is HTTP/2 headers) and put in the request's extensions,
//! and the request id is echoed on the response (`x-request-id`), whatever route answers.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use http::HeaderValue;
use tower::{Layer, Service};

use crate::core::header_names::REQUEST_ID;
use crate::core::{CallContext, Protocol};

/// Builds each request's `CallContext` and echoes its request id.
#[derive(Debug, Clone, Copy)]
pub struct RequestContextLayer {
    protocol: Protocol,
}

impl RequestContextLayer {
    /// The layer for one server's protocol.
    pub fn new(protocol: Protocol) -> Self {
        Self { protocol }
    }
}

impl<S> Layer<S> for RequestContextLayer {
    type Service = RequestContext<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RequestContext {
            inner,
            protocol: self.protocol,
        }
    }
}

/// The service of [`RequestContextLayer`].
#[derive(Debug, Clone)]
pub struct RequestContext<S> {
    inner: S,
    protocol: Protocol,
}

impl<S, ReqBody, ResBody> Service<http::Request<ReqBody>> for RequestContext<S>
where
    S: Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = EchoRequestId<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<ReqBody>) -> Self::Future {
        let ctx = CallContext::from_headers(self.protocol, req.headers());
        // A sane request id is plain ASCII, so this cannot fail.
        let request_id = HeaderValue::from_str(&ctx.request_id).ok();
        req.extensions_mut().insert(ctx);
        EchoRequestId {
            inner: self.inner.call(req),
            request_id,
        }
    }
}

pin_project_lite::pin_project! {
    /// The inner response, with the request id set on it.
    pub struct EchoRequestId<F> {
        #[pin]
        inner: F,
        request_id: Option<HeaderValue>,
    }
}

impl<F, B, E> Future for EchoRequestId<F>
where
    F: Future<Output = Result<http::Response<B>, E>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let mut resp = std::task::ready!(this.inner.poll(cx))?;
        if let Some(id) = this.request_id.take() {
            resp.headers_mut().insert(REQUEST_ID, id);
        }
        Poll::Ready(Ok(resp))
    }
}

/// The call's context: the one the layer built, or (outside the layer) one built now.
pub fn call_context(
    extensions: &http::Extensions,
    h: &http::HeaderMap,
    protocol: Protocol,
) -> CallContext {
    extensions
        .get::<CallContext>()
        .cloned()
        .unwrap_or_else(|| CallContext::from_headers(protocol, h))
}
