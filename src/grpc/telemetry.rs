//! Request metrics for gRPC, by method path; the status comes from the trailers.

use std::sync::Arc;
use std::task::{Context, Poll};

use futures_util::future::BoxFuture;
use tower::{Layer, Service};

use crate::metrics::{Label, Metrics};
use crate::telemetry::{grpc_code_name, Endpoint, ObservedBody, RequestObservation};

/// Wraps gRPC services with request telemetry.
#[derive(Clone)]
pub struct GrpcTelemetryLayer {
    metrics: Arc<Metrics>,
    methods: Arc<Methods>,
}

/// The served methods' endpoints, and the one every other path shares.
struct Methods {
    served: std::collections::HashMap<Label, Endpoint>,
    unknown: Endpoint,
}

impl GrpcTelemetryLayer {
    /// A layer recording into `metrics`.
    pub fn new(metrics: Arc<Metrics>) -> Self {
        let served = served_methods()
            .iter()
            .map(|m| (m.clone(), Endpoint::new("grpc", m.clone())))
            .collect();
        Self {
            metrics,
            methods: Arc::new(Methods {
                served,
                unknown: Endpoint::new("grpc", crate::metrics::unknown_label()),
            }),
        }
    }
}

impl<S> Layer<S> for GrpcTelemetryLayer {
    type Service = GrpcTelemetry<S>;

    fn layer(&self, inner: S) -> Self::Service {
        GrpcTelemetry {
            inner,
            metrics: self.metrics.clone(),
            methods: self.methods.clone(),
        }
    }
}

/// The service produced by [`GrpcTelemetryLayer`].
#[derive(Clone)]
pub struct GrpcTelemetry<S> {
    inner: S,
    metrics: Arc<Metrics>,
    methods: Arc<Methods>,
}

/// Method paths served, from the compiled descriptors: tollgate's own services, health and
/// reflection. Constant data, computed once.
fn served_methods() -> &'static std::collections::HashSet<Label> {
    static SERVED: std::sync::OnceLock<std::collections::HashSet<Label>> =
        std::sync::OnceLock::new();
    SERVED.get_or_init(|| {
        use prost::Message;
        let mut out: std::collections::HashSet<Label> = [
            "/grpc.health.v1.Health/Check",
            "/grpc.health.v1.Health/Watch",
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
            "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        ]
        .into_iter()
        .map(Label::from)
        .collect();
        if let Ok(set) = prost_types::FileDescriptorSet::decode(crate::proto::FILE_DESCRIPTOR_SET) {
            for file in &set.file {
                let package = file.package();
                for service in &file.service {
                    for method in &service.method {
                        out.insert(
                            format!("/{package}.{}/{}", service.name(), method.name()).into(),
                        );
                    }
                }
            }
        }
        out
    })
}

impl<S, ReqBody> Service<http::Request<ReqBody>> for GrpcTelemetry<S>
where
    S: Service<http::Request<ReqBody>, Response = http::Response<tonic::body::Body>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    ReqBody: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<ReqBody>) -> Self::Future {
        // Served method paths are labels as they are; anything else is `unknown`, so that a
        // caller cannot create series at will.
        let m = &self.methods;
        let endpoint = m.served.get(req.uri().path()).unwrap_or(&m.unknown);
        let mut observation = RequestObservation::start(self.metrics.clone(), endpoint);
        // Take the service that was driven to readiness; leave a clone in its place.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        Box::pin(async move {
            let resp = inner.call(req).await?;
            if let Some(code) = resp
                .headers()
                .get("grpc-status")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<i32>().ok())
            {
                observation.set_status(crate::metrics::StatusCode::Grpc(grpc_code_name(code)));
            }
            let (parts, body) = resp.into_parts();
            Ok(http::Response::from_parts(
                parts,
                tonic::body::Body::new(ObservedBody::new(body, observation)),
            ))
        })
    }
}
