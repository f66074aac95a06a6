//! The gRPC adapter (tonic): `tollgate.v1.Gateway`, health and reflection. Each RPC converts
//! its request into a core call, makes it, and converts the result back.

mod admin;
mod budgets;
mod convert;
mod embeddings;
mod gateway;
mod limit;
mod telemetry;

#[cfg(test)]
mod fuzz_tests;

use std::sync::Arc;

use tonic::service::Routes;

use crate::core::Gateway;
use crate::proto::gateway_server::GatewayServer;
pub use convert::rejection_status;
pub use limit::GrpcMessageLimitLayer;
pub use telemetry::GrpcTelemetryLayer;

/// The gRPC services: Gateway, Admin, `grpc.health.v1.Health` and server reflection
/// (`grpc.reflection.v1` and `v1alpha`).
pub async fn routes(gateway: Arc<Gateway>) -> Result<Routes, tonic_reflection::server::Error> {
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter
        .set_serving::<GatewayServer<gateway::GatewayService>>()
        .await;
    // Both reflection versions: grpcurl and newer clients speak v1, many tools and older
    // client libraries still only speak v1alpha.
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection().build_v1()?;
    let reflection_v1alpha = reflection().build_v1alpha()?;
    // Chat messages are limited by `GrpcMessageLimitLayer`, which follows config reloads and
    // records the refusal; tonic's fixed limit would answer OUT_OF_RANGE unrecorded.
    let service = GatewayServer::new(gateway::GatewayService::new(gateway.clone()))
        .max_decoding_message_size(usize::MAX)
        .max_encoding_message_size(usize::MAX);
    let admin = crate::proto::admin_server::AdminServer::with_interceptor(
        admin::AdminService::new(gateway.clone()),
        admin::AdminAuth::new(gateway),
    );
    Ok(Routes::new(service)
        .add_service(admin)
        .add_service(health)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha))
}
