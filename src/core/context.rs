//! What both servers know about a call before its body is read: the protocol, the credential,
//! the service type and purpose, and the request id (the caller's when it is sane, else a new
//! one). Built once per request by `crate::context::RequestContextLayer` from the HTTP headers
//! or the gRPC metadata, which use the same names.

use super::trace::TraceParent;

/// Header (and gRPC metadata) names tollgate reads and writes.
pub mod headers {
    pub const REQUEST_ID: &str = "x-request-id";
    pub const SERVICE_TYPE: &str = "x-tollgate-service-type";
    pub const PURPOSE: &str = "x-tollgate-purpose";
    pub const RESOLVED_MODEL: &str = "x-tollgate-resolved-model";
    /// W3C Trace Context: the caller's span.
    pub const TRACEPARENT: &str = "traceparent";
    /// W3C Trace Context: vendors' trace state, passed on.
    pub const TRACESTATE: &str = "tracestate";
}

/// The [`headers`] an HTTP request is read by, as names made once: a `&str` name is parsed and
/// checked at every lookup, and copied into every response it is set on.
pub mod header_names {
    use super::headers;
    use http::HeaderName;

    pub const REQUEST_ID: HeaderName = HeaderName::from_static(headers::REQUEST_ID);
    pub const SERVICE_TYPE: HeaderName = HeaderName::from_static(headers::SERVICE_TYPE);
    pub const PURPOSE: HeaderName = HeaderName::from_static(headers::PURPOSE);
    pub const TRACEPARENT: HeaderName = HeaderName::from_static(headers::TRACEPARENT);
    pub const TRACESTATE: HeaderName = HeaderName::from_static(headers::TRACESTATE);
    pub const RESOLVED_MODEL: HeaderName = HeaderName::from_static(headers::RESOLVED_MODEL);
}

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
    /// The caller's span (`traceparent`, `tracestate`) when it sent a valid one.
    pub trace_parent: Option<TraceParent>,
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
            .field("trace_parent", &self.trace_parent)
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
            // Time-ordered (UUIDv7): the ledger's request-id index then grows at its end
            // instead of taking each row on a random page, which keeps every batch commit to
            // a few dirty pages however large the ledger grows.
            _ => uuid::Uuid::now_v7().simple().to_string(),
        };
        Self {
            protocol,
            authorization,
            service_type: service_type.filter(|s| !s.is_empty()),
            purpose: purpose.filter(|s| !s.is_empty()),
            request_id,
            trace_parent: None,
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

impl CallContext {
    /// The context of a request with these headers (gRPC metadata is HTTP/2 headers).
    pub fn from_headers(protocol: Protocol, h: &http::HeaderMap) -> CallContext {
        use header_names::{PURPOSE, REQUEST_ID, SERVICE_TYPE, TRACEPARENT, TRACESTATE};
        let text = |name: &http::HeaderName| {
            h.get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        let mut ctx = CallContext::new(
            protocol,
            text(&http::header::AUTHORIZATION),
            text(&SERVICE_TYPE),
            text(&PURPOSE),
            h.get(REQUEST_ID).and_then(|v| v.to_str().ok()),
        );
        // Several `tracestate` headers are one list (W3C Trace Context, section 3.3).
        let states: Vec<&str> = h
            .get_all(TRACESTATE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect();
        let state = (!states.is_empty()).then(|| states.join(","));
        ctx.trace_parent = h
            .get(TRACEPARENT)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| TraceParent::parse(v, state.as_deref()));
        ctx
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_request_ids_sort_in_the_order_they_were_made() {
        let ids: Vec<String> = (0..2000)
            .map(|_| CallContext::new(Protocol::Http, None, None, None, None).request_id)
            .collect();
        assert!(ids.iter().all(|id| id.len() == 32));
        assert!(ids.windows(2).all(|w| w[0] < w[1]), "not ascending");
    }

    #[test]
    fn a_sane_caller_request_id_is_kept() {
        let ctx = CallContext::new(Protocol::Http, None, None, None, Some("abc-123"));
        assert_eq!(ctx.request_id, "abc-123");
    }
}
