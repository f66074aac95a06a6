//! The outcome taxonomy (docs/operations.md, The availability SLI): one `Reason` decides the availability outcome,
//! the HTTP status, the gRPC code and the error code string. Nothing else maps errors.

use std::time::Duration;

/// How a chat request counts in the availability signal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// The request was served.
    Success,
    /// tollgate or its upstreams failed the caller.
    Failure,
    /// The caller's fault or policy; held out of availability.
    Excluded,
    /// The caller went away; held out of availability.
    Abort,
}

impl Outcome {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Success => "success",
            Outcome::Failure => "failure",
            Outcome::Excluded => "excluded",
            Outcome::Abort => "abort",
        }
    }
}

/// Why a request ended the way it did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    Success,
    PayloadTooLarge,
    InvalidRequest,
    /// The caller did not send its request (body) in time.
    RequestTimeout,
    AuthRejected,
    InvalidAuthRequest,
    InvalidServiceTypeForModel,
    AuthSystemFailure,
    SignupCapExceeded,
    ProvisioningFailure,
    Blocked,
    BudgetExceeded,
    RateLimited,
    /// The store behind a budget or shared rate limit could not answer.
    PolicyUnavailable,
    ModelNotFound,
    UpstreamRejected,
    /// No usable upstream key: `all_disabled` picks 503 over 429.
    UpstreamKeysExhausted {
        all_disabled: bool,
    },
    UpstreamError,
    UpstreamTimeout,
    InternalError,
    ClientDisconnected,
}

/// gRPC status codes used by the taxonomy (kept local so the core does not depend on tonic's types
/// in its decisions; the gRPC adapter converts).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GrpcCode {
    Ok,
    Cancelled,
    InvalidArgument,
    DeadlineExceeded,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Internal,
    Unavailable,
    Unauthenticated,
}

impl GrpcCode {
    /// The canonical code name (`UNAUTHENTICATED`), as gRPC tools print it.
    pub fn as_str(self) -> &'static str {
        match self {
            GrpcCode::Ok => "OK",
            GrpcCode::Cancelled => "CANCELLED",
            GrpcCode::InvalidArgument => "INVALID_ARGUMENT",
            GrpcCode::DeadlineExceeded => "DEADLINE_EXCEEDED",
            GrpcCode::NotFound => "NOT_FOUND",
            GrpcCode::PermissionDenied => "PERMISSION_DENIED",
            GrpcCode::ResourceExhausted => "RESOURCE_EXHAUSTED",
            GrpcCode::Internal => "INTERNAL",
            GrpcCode::Unavailable => "UNAVAILABLE",
            GrpcCode::Unauthenticated => "UNAUTHENTICATED",
        }
    }
}

impl Reason {
    /// The stable string used in metrics, error bodies and `ErrorInfo.reason`.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Success => "success",
            Reason::PayloadTooLarge => "payload_too_large",
            Reason::InvalidRequest => "invalid_request",
            Reason::RequestTimeout => "request_timeout",
            Reason::AuthRejected => "auth_rejected",
            Reason::InvalidAuthRequest => "invalid_auth_request",
            Reason::InvalidServiceTypeForModel => "invalid_service_type_for_model",
            Reason::AuthSystemFailure => "auth_system_failure",
            Reason::SignupCapExceeded => "signup_cap_exceeded",
            Reason::ProvisioningFailure => "provisioning_failure",
            Reason::Blocked => "blocked",
            Reason::BudgetExceeded => "budget_exceeded",
            Reason::RateLimited => "rate_limited",
            Reason::PolicyUnavailable => "policy_unavailable",
            Reason::ModelNotFound => "model_not_found",
            Reason::UpstreamRejected => "upstream_rejected",
            Reason::UpstreamKeysExhausted { .. } => "upstream_keys_exhausted",
            Reason::UpstreamError => "upstream_error",
            Reason::UpstreamTimeout => "upstream_timeout",
            Reason::InternalError => "internal_error",
            Reason::ClientDisconnected => "client_disconnected",
        }
    }

    /// How the reason counts in the availability signal.
    pub fn outcome(self) -> Outcome {
        match self {
            Reason::Success => Outcome::Success,
            Reason::AuthSystemFailure
            | Reason::ProvisioningFailure
            | Reason::PolicyUnavailable
            | Reason::UpstreamKeysExhausted { .. }
            | Reason::UpstreamError
            | Reason::UpstreamTimeout
            | Reason::InternalError => Outcome::Failure,
            Reason::ClientDisconnected => Outcome::Abort,
            _ => Outcome::Excluded,
        }
    }

    /// The HTTP status code.
    pub fn http_status(self) -> u16 {
        match self {
            Reason::Success => 200,
            Reason::PayloadTooLarge => 413,
            Reason::RequestTimeout => 408,
            Reason::InvalidRequest | Reason::InvalidAuthRequest | Reason::UpstreamRejected => 400,
            Reason::AuthRejected => 401,
            Reason::InvalidServiceTypeForModel | Reason::SignupCapExceeded | Reason::Blocked => 403,
            Reason::ModelNotFound => 404,
            Reason::BudgetExceeded | Reason::RateLimited => 429,
            Reason::UpstreamKeysExhausted { all_disabled } => {
                if all_disabled {
                    503
                } else {
                    429
                }
            }
            Reason::AuthSystemFailure | Reason::ProvisioningFailure | Reason::PolicyUnavailable => {
                503
            }
            Reason::UpstreamError => 502,
            Reason::UpstreamTimeout => 504,
            Reason::InternalError => 500,
            Reason::ClientDisconnected => 499,
        }
    }

    /// The gRPC status code.
    pub fn grpc_code(self) -> GrpcCode {
        match self {
            Reason::Success => GrpcCode::Ok,
            Reason::PayloadTooLarge
            | Reason::SignupCapExceeded
            | Reason::BudgetExceeded
            | Reason::RateLimited => GrpcCode::ResourceExhausted,
            Reason::InvalidRequest | Reason::InvalidAuthRequest | Reason::UpstreamRejected => {
                GrpcCode::InvalidArgument
            }
            Reason::AuthRejected => GrpcCode::Unauthenticated,
            Reason::InvalidServiceTypeForModel | Reason::Blocked => GrpcCode::PermissionDenied,
            Reason::AuthSystemFailure
            | Reason::ProvisioningFailure
            | Reason::PolicyUnavailable
            | Reason::UpstreamError => GrpcCode::Unavailable,
            Reason::ModelNotFound => GrpcCode::NotFound,
            Reason::UpstreamKeysExhausted { all_disabled } => {
                if all_disabled {
                    GrpcCode::Unavailable
                } else {
                    GrpcCode::ResourceExhausted
                }
            }
            Reason::UpstreamTimeout | Reason::RequestTimeout => GrpcCode::DeadlineExceeded,
            Reason::InternalError => GrpcCode::Internal,
            Reason::ClientDisconnected => GrpcCode::Cancelled,
        }
    }

    /// OpenAI's error `type` for this reason.
    pub fn openai_type(self) -> &'static str {
        match self.http_status() {
            401 => "authentication_error",
            403 => "permission_error",
            404 => "not_found_error",
            429 => "rate_limit_error",
            400 | 408 | 413 => "invalid_request_error",
            _ => "api_error",
        }
    }
}

/// The one error type of the request path.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct Rejection {
    pub reason: Reason,
    /// A message for the caller; never holds a secret.
    pub message: String,
    /// The request field at fault, when one is.
    pub param: Option<String>,
    /// When the caller may try again.
    pub retry_after: Option<Duration>,
    /// Policy headers to send with the error (`x-ratelimit-*`, `x-budget-*`): HTTP response
    /// headers, gRPC trailing metadata.
    pub headers: PolicyHeaders,
}

impl Rejection {
    /// A rejection with a message.
    pub fn new(reason: Reason, message: impl Into<String>) -> Self {
        Self {
            reason,
            message: message.into(),
            param: None,
            retry_after: None,
            headers: Vec::new(),
        }
    }

    /// Names the request field at fault.
    pub fn with_param(mut self, param: impl Into<String>) -> Self {
        self.param = Some(param.into());
        self
    }

    /// Adds a Retry-After.
    pub fn with_retry_after(mut self, after: Duration) -> Self {
        self.retry_after = Some(after);
        self
    }

    /// `invalid_request` naming a field.
    pub fn invalid(param: &str, message: impl Into<String>) -> Self {
        Self::new(Reason::InvalidRequest, message).with_param(param)
    }

    /// `internal_error`; the detail goes to the log, the caller sees a generic message.
    pub fn internal(detail: impl std::fmt::Display) -> Self {
        tracing::error!(error = %detail, "internal error");
        Self::new(Reason::InternalError, "internal error")
    }
}

/// Response headers a policy stage adds (budget and rate-limit state), name and value.
pub type PolicyHeaders = Vec<PolicyHeader>;

/// One policy header: its name and value (a number, a duration, a time: short, kept inline).
pub type PolicyHeader = (&'static PolicyName, crate::short_text::ShortText);

/// The name of a policy header, as text (gRPC metadata takes a static string) and as an HTTP
/// header name made once: a `&str` made a `HeaderName` is checked byte by byte every time.
#[derive(Debug)]
pub struct PolicyName {
    pub text: &'static str,
    pub header: http::HeaderName,
}

impl PolicyName {
    /// A lowercase header name (checked when the constant is made).
    pub const fn new(text: &'static str) -> Self {
        Self {
            text,
            header: http::HeaderName::from_static(text),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn taxonomy_matches_design_table() {
        let rows: &[(Reason, &str, Outcome, u16, GrpcCode)] = &[
            (
                Reason::Success,
                "success",
                Outcome::Success,
                200,
                GrpcCode::Ok,
            ),
            (
                Reason::PayloadTooLarge,
                "payload_too_large",
                Outcome::Excluded,
                413,
                GrpcCode::ResourceExhausted,
            ),
            (
                Reason::AuthRejected,
                "auth_rejected",
                Outcome::Excluded,
                401,
                GrpcCode::Unauthenticated,
            ),
            (
                Reason::AuthSystemFailure,
                "auth_system_failure",
                Outcome::Failure,
                503,
                GrpcCode::Unavailable,
            ),
            (
                Reason::RequestTimeout,
                "request_timeout",
                Outcome::Excluded,
                408,
                GrpcCode::DeadlineExceeded,
            ),
            (
                Reason::PolicyUnavailable,
                "policy_unavailable",
                Outcome::Failure,
                503,
                GrpcCode::Unavailable,
            ),
            (
                Reason::ModelNotFound,
                "model_not_found",
                Outcome::Excluded,
                404,
                GrpcCode::NotFound,
            ),
            (
                Reason::UpstreamKeysExhausted {
                    all_disabled: false,
                },
                "upstream_keys_exhausted",
                Outcome::Failure,
                429,
                GrpcCode::ResourceExhausted,
            ),
            (
                Reason::UpstreamKeysExhausted { all_disabled: true },
                "upstream_keys_exhausted",
                Outcome::Failure,
                503,
                GrpcCode::Unavailable,
            ),
            (
                Reason::UpstreamError,
                "upstream_error",
                Outcome::Failure,
                502,
                GrpcCode::Unavailable,
            ),
            (
                Reason::UpstreamTimeout,
                "upstream_timeout",
                Outcome::Failure,
                504,
                GrpcCode::DeadlineExceeded,
            ),
            (
                Reason::ClientDisconnected,
                "client_disconnected",
                Outcome::Abort,
                499,
                GrpcCode::Cancelled,
            ),
        ];
        for &(r, s, o, h, g) in rows {
            assert_eq!(
                (r.as_str(), r.outcome(), r.http_status(), r.grpc_code()),
                (s, o, h, g)
            );
        }
    }
}
