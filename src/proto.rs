//! Generated protobuf types and gRPC stubs for `tollgate.v1`.

#![allow(clippy::all, missing_docs)]

tonic::include_proto!("tollgate.v1");

/// The encoded descriptor set, served by gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/tollgate_descriptor.bin"));
