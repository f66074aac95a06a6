//! The request size limit for model RPCs (chat and embeddings), enforced from the gRPC frame header before the
//! message is read, so that an oversized request is refused as `payload_too_large`
//! (RESOURCE_EXHAUSTED) and counted like any other chat request. tonic's own decode limit would
//! answer OUT_OF_RANGE before the core ever saw the call. A message within the limit is read
//! whole here and decoded once as a check: one that is not a valid protobuf message of its
//! method is `invalid_request` (INVALID_ARGUMENT), counted and written to the ledger like an
//! HTTP bad body, instead of tonic's uncounted INTERNAL.

use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use futures_util::future::BoxFuture;
use http_body_util::BodyExt;
use tower::{Layer, Service};

use super::convert::rejection_status;
use crate::core::{Gateway, Protocol, Reason, Rejection};
use crate::request_context::call_context;

/// The methods whose request is a chat request.
const CHAT_METHODS: &[&str] = &[
    "/tollgate.v1.Gateway/Complete",
    "/tollgate.v1.Gateway/StreamComplete",
];

/// The method whose request is an embeddings request.
const EMBED_METHOD: &str = "/tollgate.v1.Gateway/Embed";

/// gRPC length-prefixed message header: one flag byte and a big-endian u32 length.
const FRAME_HEADER: usize = 5;

/// Wraps the gRPC server with the chat message size limit.
#[derive(Clone)]
pub struct GrpcMessageLimitLayer {
    gateway: Arc<Gateway>,
}

impl GrpcMessageLimitLayer {
    /// A layer refusing chat messages over the gateway's `server.max_body_bytes`.
    pub fn new(gateway: Arc<Gateway>) -> Self {
        Self { gateway }
    }
}

impl<S> Layer<S> for GrpcMessageLimitLayer {
    type Service = GrpcMessageLimit<S>;

    fn layer(&self, inner: S) -> Self::Service {
        GrpcMessageLimit {
            inner,
            gateway: self.gateway.clone(),
        }
    }
}

/// The service produced by [`GrpcMessageLimitLayer`].
#[derive(Clone)]
pub struct GrpcMessageLimit<S> {
    inner: S,
    gateway: Arc<Gateway>,
}

impl<S, ReqBody> Service<http::Request<ReqBody>> for GrpcMessageLimit<S>
where
    S: Service<http::Request<tonic::body::Body>, Response = http::Response<tonic::body::Body>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    ReqBody: http_body::Body<Data = Bytes> + Send + Unpin + 'static,
    ReqBody::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<ReqBody>) -> Self::Future {
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let embed = req.uri().path() == EMBED_METHOD;
        if !embed && !CHAT_METHODS.contains(&req.uri().path()) {
            return Box::pin(inner.call(req.map(tonic::body::Body::new)));
        }
        let gateway = self.gateway.clone();
        Box::pin(async move {
            let (parts, mut body) = req.into_parts();
            let limit = gateway.runtime().config.server.max_body_bytes;
            let mut head = BytesMut::new();
            // Read until the frame header is complete; an error or early end is left for
            // tonic to report as it would.
            while head.len() < FRAME_HEADER {
                match body.frame().await {
                    Some(Ok(frame)) => {
                        if let Ok(data) = frame.into_data() {
                            head.extend_from_slice(&data);
                        }
                    }
                    _ => break,
                }
            }
            if head.len() >= FRAME_HEADER {
                let compressed = head[0] != 0;
                let len = (&head[1..FRAME_HEADER]).get_u32() as usize;
                let mut refusal = (len > limit).then(|| {
                    Rejection::new(
                        Reason::PayloadTooLarge,
                        format!("the request message is larger than {limit} bytes"),
                    )
                });
                if refusal.is_none() && !compressed {
                    // Within the limit: read the message whole (bounded by the limit) and check
                    // that it decodes; an early end is left for tonic to report.
                    while head.len() < FRAME_HEADER + len {
                        match body.frame().await {
                            Some(Ok(frame)) => {
                                if let Ok(data) = frame.into_data() {
                                    head.extend_from_slice(&data);
                                }
                            }
                            _ => break,
                        }
                    }
                    if head.len() >= FRAME_HEADER + len {
                        let msg = &head[FRAME_HEADER..FRAME_HEADER + len];
                        refusal = undecodable(embed, msg);
                    }
                }
                if let Some(rejection) = refusal {
                    let ctx = call_context(&parts.extensions, &parts.headers, Protocol::Grpc);
                    let request_id = ctx.request_id.clone();
                    // Recorded as the kind of request it is, like any other refusal.
                    let recorded = if embed {
                        gateway.embed(ctx).run(Err(rejection)).await.err()
                    } else {
                        gateway.chat(ctx).run(Err(rejection)).await.err()
                    };
                    let status = match recorded {
                        Some(r) => rejection_status(&r, &request_id),
                        None => tonic::Status::internal("unexpected reply"),
                    };
                    return Ok(status.into_http());
                }
            }
            let prefix = head.freeze();
            let rest = body.map_err(Into::into);
            let body = PrefixedBody {
                prefix: (!prefix.is_empty()).then_some(prefix),
                rest,
            };
            inner
                .call(http::Request::from_parts(
                    parts,
                    tonic::body::Body::new(body),
                ))
                .await
        })
    }
}

/// `invalid_request` when `msg` is not a valid `EmbedRequest` / `CompleteRequest`.
fn undecodable(embed: bool, msg: &[u8]) -> Option<Rejection> {
    use prost::Message;
    let (what, result) = if embed {
        (
            "EmbedRequest",
            crate::proto::EmbedRequest::decode(msg).map(drop),
        )
    } else {
        (
            "CompleteRequest",
            crate::proto::CompleteRequest::decode(msg).map(drop),
        )
    };
    result.err().map(|e| {
        Rejection::new(
            Reason::InvalidRequest,
            format!("the request message is not a valid tollgate.v1.{what}: {e}"),
        )
    })
}

/// A body that yields bytes already read, then the rest of the original body.
struct PrefixedBody<B> {
    prefix: Option<Bytes>,
    rest: B,
}

impl<B> http_body::Body for PrefixedBody<B>
where
    B: http_body::Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        if let Some(p) = self.prefix.take() {
            return Poll::Ready(Some(Ok(http_body::Frame::data(p))));
        }
        std::pin::Pin::new(&mut self.rest).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.prefix.is_none() && self.rest.is_end_stream()
    }
}
