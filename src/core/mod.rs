//! The core: everything both protocols share. It knows nothing of HTTP or gRPC; adapters
//! decode their wire format into these types, make one call, and encode the result.

pub mod admin;
pub mod auth;
mod batch_queue;
pub mod context;
mod dispatch;
mod embed;
mod gateway;
pub mod ledger;
pub mod lifecycle;
mod native;
pub mod outcome;
pub mod policy;
pub mod pricing;
mod provision;
mod stream;
pub mod trace;
mod ttl_cache;

pub use crate::error::{GrpcCode, Outcome, Reason, Rejection};
pub use embed::{Embeddings, EmbeddingsCall};
pub use gateway::{
    ChatCall, ChatCompletion, ChatReply, ConfigSource, Gateway, GatewayParts, ModelEntry,
    Principal, ProviderStatus, Runtime,
};
pub use native::{NativeCompletion, PassthroughStream};
pub use stream::ChatStream;

pub use context::{header_names, headers, CallContext, Protocol};
