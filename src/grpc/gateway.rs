//! `tollgate.v1.Gateway`.

use std::pin::Pin;
use std::sync::Arc;

use futures_util::{Stream, StreamExt};
use tonic::metadata::MetadataValue;
use tonic::{Request, Response, Status};

use super::convert::{
    chat_request, complete_chunk, complete_response, rejection_status, set_policy_metadata,
};
use crate::core::headers;
use crate::core::{CallContext, ChatReply, Gateway, Protocol, Rejection};
use crate::proto;
use crate::request_context::call_context;

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

/// The call's context, as the request-context layer built it.
pub(super) fn context<T>(request: &Request<T>) -> CallContext {
    call_context(
        request.extensions(),
        request.metadata().as_ref(),
        Protocol::Grpc,
    )
}

/// A reply with the resolved model and the rate-limit and budget headers as metadata (the
/// request-context layer sets the request id).
fn reply<T>(message: T, resolved: &str, policy: &[crate::error::PolicyHeader]) -> Response<T> {
    let mut resp = Response::new(message);
    if let Ok(v) = MetadataValue::try_from(resolved) {
        resp.metadata_mut().insert(headers::RESOLVED_MODEL, v);
    }
    set_policy_metadata(resp.metadata_mut(), policy);
    resp
}

type ChunkStream = Pin<Box<dyn Stream<Item = Result<proto::CompleteChunk, Status>> + Send>>;

#[tonic::async_trait]
impl proto::gateway_server::Gateway for GatewayService {
    async fn authorize(
        &self,
        request: Request<proto::AuthorizeRequest>,
    ) -> Result<Response<proto::AuthorizeResponse>, Status> {
        let ctx = context(&request);
        let model = request.into_inner().model;
        match self.gateway.authorize(&ctx, Some(&model)).await {
            Ok(p) => Ok(Response::new(proto::AuthorizeResponse {
                principal: Some(p.into()),
            })),
            Err(e) => Err(rejection_status(&e, &ctx.request_id)),
        }
    }

    async fn complete(
        &self,
        request: Request<proto::CompleteRequest>,
    ) -> Result<Response<proto::CompleteResponse>, Status> {
        let ctx = context(&request);
        let request_id = ctx.request_id.clone();
        let call = self.gateway.chat(ctx);
        let decoded = chat_request(request.into_inner(), false);
        match call.run(decoded).await {
            Ok(ChatReply::Complete(mut c)) => {
                let resolved = c.resolved_model.clone();
                let policy = std::mem::take(&mut c.policy_headers);
                Ok(reply(
                    complete_response(*c, &request_id),
                    &resolved,
                    &policy,
                ))
            }
            Ok(_) => Err(rejection_status(
                &Rejection::internal("Complete produced no whole chat completion"),
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
        let ctx = context(&request);
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
                Ok(reply(Box::pin(chunks) as ChunkStream, &resolved, &policy))
            }
            Ok(_) => Err(rejection_status(
                &Rejection::internal("StreamComplete produced no chat stream"),
                &request_id,
            )),
            Err(e) => Err(rejection_status(&e, &request_id)),
        }
    }

    async fn embed(
        &self,
        request: Request<proto::EmbedRequest>,
    ) -> Result<Response<proto::EmbedResponse>, Status> {
        let ctx = context(&request);
        let request_id = ctx.request_id.clone();
        let call = self.gateway.embed(ctx);
        let decoded = super::embeddings::embed_request(request.into_inner());
        match call.run(decoded).await {
            Ok(mut e) => {
                let resolved = e.resolved_model.clone();
                let policy = std::mem::take(&mut e.policy_headers);
                Ok(reply(
                    super::embeddings::embed_response(e, &request_id),
                    &resolved,
                    &policy,
                ))
            }
            Err(e) => Err(rejection_status(&e, &request_id)),
        }
    }

    async fn list_models(
        &self,
        request: Request<proto::ListModelsRequest>,
    ) -> Result<Response<proto::ListModelsResponse>, Status> {
        let ctx = context(&request);
        match self.gateway.list_models(&ctx).await {
            Ok(models) => Ok(Response::new(proto::ListModelsResponse {
                models: models.into_iter().map(Into::into).collect(),
            })),
            Err(e) => Err(rejection_status(&e, &ctx.request_id)),
        }
    }
}
