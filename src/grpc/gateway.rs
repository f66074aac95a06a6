//! `tollgate.v1.Gateway`.

use std::pin::Pin;
use std::sync::Arc;

use futures_util::{Stream, StreamExt};
use tonic::metadata::{MetadataMap, MetadataValue};
use tonic::{Request, Response, Status};

use super::convert::{chat_request, complete_chunk, complete_response, rejection_status};
use crate::core::{CallContext, ChatReply, Gateway, Protocol, Rejection};
use crate::http::headers;
use crate::proto;

/// The Gateway service over the core.
pub struct GatewayService {
    gateway: Arc<Gateway>,
}

impl GatewayService {
    /// A service calling `gateway`.
    pub fn new(gateway: Arc<Gateway>) -> Self {
        Self { gateway }
    }
}

/// The protocol-neutral call context from request metadata.
pub(super) fn context(md: &MetadataMap) -> CallContext {
    let text = |name: &str| {
        md.get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    CallContext::new(
        Protocol::Grpc,
        text("authorization"),
        text(headers::SERVICE_TYPE),
        text(headers::PURPOSE),
        md.get(headers::REQUEST_ID).and_then(|v| v.to_str().ok()),
    )
}

fn with_metadata<T>(message: T, pairs: &[(&'static str, &str)]) -> Response<T> {
    let mut resp = Response::new(message);
    for (k, v) in pairs {
        if let Ok(v) = MetadataValue::try_from(*v) {
            resp.metadata_mut().insert(*k, v);
        }
    }
    resp
}

/// Rate-limit and budget headers as response metadata.
fn add_metadata<T>(resp: &mut Response<T>, pairs: &[(&'static str, String)]) {
    for (k, v) in pairs {
        if let Ok(v) = MetadataValue::try_from(v.as_str()) {
            resp.metadata_mut().insert(*k, v);
        }
    }
}

type ChunkStream = Pin<Box<dyn Stream<Item = Result<proto::CompleteChunk, Status>> + Send>>;

#[tonic::async_trait]
impl proto::gateway_server::Gateway for GatewayService {
    async fn authorize(
        &self,
        request: Request<proto::AuthorizeRequest>,
    ) -> Result<Response<proto::AuthorizeResponse>, Status> {
        let ctx = context(request.metadata());
        let model = request.into_inner().model;
        match self.gateway.authorize(&ctx, Some(&model)).await {
            Ok(p) => Ok(with_metadata(
                proto::AuthorizeResponse {
                    principal: Some(p.into()),
                },
                &[(headers::REQUEST_ID, &ctx.request_id)],
            )),
            Err(e) => Err(rejection_status(&e, &ctx.request_id)),
        }
    }

    async fn complete(
        &self,
        request: Request<proto::CompleteRequest>,
    ) -> Result<Response<proto::CompleteResponse>, Status> {
        let ctx = context(request.metadata());
        let request_id = ctx.request_id.clone();
        let call = self.gateway.chat(ctx);
        let decoded = chat_request(request.into_inner(), false);
        match call.run(decoded).await {
            Ok(ChatReply::Complete(mut c)) => {
                let resolved = c.resolved_model.clone();
                let policy = std::mem::take(&mut c.policy_headers);
                let mut resp = with_metadata(
                    complete_response(*c, &request_id),
                    &[
                        (headers::REQUEST_ID, &request_id),
                        (headers::RESOLVED_MODEL, &resolved),
                    ],
                );
                add_metadata(&mut resp, &policy);
                Ok(resp)
            }
            Ok(ChatReply::Stream(_)) => Err(rejection_status(
                &Rejection::internal("Complete produced a stream"),
                &request_id,
            )),
            Err(e) => Err(rejection_status(&e, &request_id)),
        }
    }

    type StreamCompleteStream = ChunkStream;

    async fn stream_complete(
        &self,
        request: Request<proto::CompleteRequest>,
    ) -> Result<Response<Self::StreamCompleteStream>, Status> {
        let ctx = context(request.metadata());
        let request_id = ctx.request_id.clone();
        let call = self.gateway.chat(ctx);
        let decoded = chat_request(request.into_inner(), true);
        match call.run(decoded).await {
            Ok(ChatReply::Stream(s)) => {
                let s = *s;
                let resolved = s.resolved_model().to_string();
                let policy = s.policy_headers().to_vec();
                let rid = request_id.clone();
                let chunks = {
                    let resolved = resolved.clone();
                    s.map(move |item| match item {
                        Ok(chunk) => Ok(complete_chunk(chunk, &resolved)),
                        Err(e) => Err(rejection_status(&e, &rid)),
                    })
                };
                let mut resp = with_metadata(
                    Box::pin(chunks) as ChunkStream,
                    &[
                        (headers::REQUEST_ID, &request_id),
                        (headers::RESOLVED_MODEL, &resolved),
                    ],
                );
                add_metadata(&mut resp, &policy);
                Ok(resp)
            }
            Ok(ChatReply::Complete(_)) => Err(rejection_status(
                &Rejection::internal("StreamComplete produced a whole answer"),
                &request_id,
            )),
            Err(e) => Err(rejection_status(&e, &request_id)),
        }
    }

    async fn list_models(
        &self,
        request: Request<proto::ListModelsRequest>,
    ) -> Result<Response<proto::ListModelsResponse>, Status> {
        let ctx = context(request.metadata());
        match self.gateway.list_models(&ctx).await {
            Ok(models) => Ok(Response::new(proto::ListModelsResponse {
                models: models.into_iter().map(Into::into).collect(),
            })),
            Err(e) => Err(rejection_status(&e, &ctx.request_id)),
        }
    }
}
