//! What the external verifiers (JWT, token introspection) answer, and the pieces they share.

use std::time::Duration;

/// A credential a verifier accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedToken {
    /// Who the credential belongs to (`sub`).
    pub subject: String,
    /// Who issued it (`iss`).
    pub issuer: String,
    /// The service type the credential names, when the verifier is configured to read one.
    pub service_type: Option<String>,
    /// When the credential stops being valid, in unix milliseconds, when known.
    pub expires_at_ms: Option<i64>,
}

/// Why a verifier did not accept a credential.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// The credential is invalid, expired, unknown or inactive: the caller's problem
    /// (auth_rejected).
    #[error("{0}")]
    Rejected(String),
    /// The verifier could not answer (endpoint down, timing out, 5xx, garbage): tollgate's
    /// problem (auth_system_failure).
    #[error("{0}")]
    Unavailable(String),
}

impl VerifyError {
    pub(crate) fn rejected(msg: impl Into<String>) -> Self {
        VerifyError::Rejected(msg.into())
    }
}

/// Why an HTTP exchange with a verifier endpoint produced no usable answer. The text is meant
/// for callers and logs: it names the failure, never the URL, the credential or the body.
#[derive(Debug)]
pub(crate) enum EndpointError {
    Timeout,
    Connect,
    Status(u16),
    TooLarge,
    Transport,
}

impl std::fmt::Display for EndpointError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            EndpointError::Timeout => f.write_str("timed out"),
            EndpointError::Connect => f.write_str("could not be reached"),
            EndpointError::Status(s) => write!(f, "answered HTTP {s}"),
            EndpointError::TooLarge => f.write_str("answered with an oversized body"),
            EndpointError::Transport => f.write_str("failed during the exchange"),
        }
    }
}

impl From<reqwest::Error> for EndpointError {
    fn from(e: reqwest::Error) -> Self {
        if e.is_timeout() {
            EndpointError::Timeout
        } else if e.is_connect() {
            EndpointError::Connect
        } else {
            EndpointError::Transport
        }
    }
}

/// Sends `req`, requires a 2xx answer and reads at most `cap` bytes of its body, all within
/// `timeout`.
pub(crate) async fn fetch_body(
    req: reqwest::RequestBuilder,
    timeout: Duration,
    cap: usize,
) -> Result<Vec<u8>, EndpointError> {
    let exchange = async {
        let mut resp = req.timeout(timeout).send().await?;
        let status = resp.status();
        if !status.is_success() {
            return Err(EndpointError::Status(status.as_u16()));
        }
        if resp.content_length().is_some_and(|n| n > cap as u64) {
            return Err(EndpointError::TooLarge);
        }
        let mut body = Vec::new();
        while let Some(chunk) = resp.chunk().await? {
            if body.len() + chunk.len() > cap {
                return Err(EndpointError::TooLarge);
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body)
    };
    // reqwest's own timeout covers the exchange too; this one makes the bound independent of
    // how the client was built.
    match tokio::time::timeout(timeout, exchange).await {
        Ok(r) => r,
        Err(_) => Err(EndpointError::Timeout),
    }
}

/// A JSON number claim (`exp`, `nbf`) as whole seconds; fractional values are truncated.
pub(crate) fn numeric_secs(v: &serde_json::Value) -> Option<i64> {
    if let Some(i) = v.as_i64() {
        return Some(i);
    }
    v.as_f64()
        .filter(|f| f.is_finite() && f.abs() < 1e15)
        .map(|f| f as i64)
}
