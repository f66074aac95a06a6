//! tollgate: an LLM gateway. One core (`core::Gateway`) behind an OpenAI-compatible HTTP API
//! and a gRPC API, with authentication, routing, upstream key pools and exactly-once outcome
//! accounting.

#[cfg(feature = "alloc-count")]
pub mod alloc_count;
pub mod allocator;
pub mod api;
pub mod cli;
pub mod clock;
pub mod config;
pub mod core;
pub mod error;
pub mod grpc;
pub mod http;
pub mod metrics;
pub mod proto;
pub mod providers;
pub mod request_context;
pub mod routing;
pub mod server;
pub mod short_text;
pub mod store;
pub mod telemetry;
