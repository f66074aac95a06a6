//! The core: everything both protocols share. It knows nothing of HTTP or gRPC; adapters
//! decode their wire format into these types, make one call, and encode the result.

pub mod admin;
pub mod auth;
mod dispatch;
mod gateway;
pub mod ledger;
pub mod outcome;
pub mod policy;
pub mod pricing;
mod provision;
mod stream;

pub use crate::error::{GrpcCode, Outcome, Reason, Rejection};
pub use gateway::{
    ChatCall, ChatCompletion, ChatReply, ConfigSource, Gateway, GatewayParts, ModelEntry,
    Principal, ProviderStatus, Runtime,
};
pub use stream::ChatStream;

/// The policy's former paths (`core::budget::*`, `core::rate_limit::*`), for code written
/// before it moved to `core::policy`; new code names `core::policy`.
pub mod budget {
    pub use super::policy::budget::*;
    pub use super::policy::{Admission, AdmitArgs, Budgets};
}
pub use policy::rate_limit;

/// Which wire a request came in on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Protocol {
    Http,
    Grpc,
}

impl Protocol {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Http => "http",
            Protocol::Grpc => "grpc",
        }
    }
}

/// What an adapter knows about a call before reading its body: the protocol-neutral headers.
#[derive(Clone)]
pub struct CallContext {
    pub protocol: Protocol,
    /// The raw `authorization` value, if sent.
    pub authorization: Option<String>,
    pub service_type: Option<String>,
    pub purpose: Option<String>,
    pub request_id: String,
}

impl std::fmt::Debug for CallContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CallContext")
            .field("protocol", &self.protocol)
            .field(
                "authorization",
                &self.authorization.as_ref().map(|_| "<redacted>"),
            )
            .field("service_type", &self.service_type)
            .field("purpose", &self.purpose)
            .field("request_id", &self.request_id)
            .finish()
    }
}

impl CallContext {
    /// A context; `request_id` is kept when it is a sane token, otherwise a new one is made.
    pub fn new(
        protocol: Protocol,
        authorization: Option<String>,
        service_type: Option<String>,
        purpose: Option<String>,
        request_id: Option<&str>,
    ) -> Self {
        let request_id = match request_id {
            Some(id) if is_sane_request_id(id) => id.to_string(),
            _ => uuid::Uuid::new_v4().simple().to_string(),
        };
        Self {
            protocol,
            authorization,
            service_type: service_type.filter(|s| !s.is_empty()),
            purpose: purpose.filter(|s| !s.is_empty()),
            request_id,
        }
    }
}

/// A client-chosen request id goes into logs, the ledger and upstream headers, so it must be
/// short and plain.
fn is_sane_request_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
}
