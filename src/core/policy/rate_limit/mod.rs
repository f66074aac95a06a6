//! Requests-per-minute and tokens-per-minute limits, per user and per API key.
//!
//! Each limit is a token bucket holding at most one minute's allowance and refilling at
//! `limit / 60 s`: a burst of the whole minute's allowance passes, then requests are admitted at
//! the steady rate. A request takes one request and its estimated tokens (prompt estimate plus
//! `max_tokens`) from every bucket that applies to it, all or none; when it ends, the estimate
//! is corrected to the tokens actually used (a bucket may go into debt).
//!
//! Two backends keep the buckets with the same arithmetic (`[rate_limits] backend`, DESIGN.md
//! section 6): [`local`] in this process's memory, [`redis`] in one Redis shared by every
//! replica.

pub mod local;
pub mod redis;

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;

use super::budget::ScopeKey;
use crate::config::{RateLimitBackendConfig, RateLimitsConfig};
use crate::error::{PolicyHeaders, PolicyName};
use crate::short_text::ShortText;

pub use self::local::RateLimiter;
pub use self::redis::RedisLimiter;

/// One scope's limits (per minute).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Limits {
    pub rpm: Option<u64>,
    pub tpm: Option<u64>,
}

impl Limits {
    /// Whether any limit is set.
    pub fn any(&self) -> bool {
        self.rpm.is_some() || self.tpm.is_some()
    }
}

/// What one request took, to be corrected when it ends (or given back if it is refused later).
#[derive(Debug, Clone)]
pub struct RateCharge {
    pub scopes: Vec<(ScopeKey, Limits)>,
    pub tokens: u64,
}

/// Why a request was not admitted by its windows.
#[derive(Debug, Clone)]
pub struct RateDenial {
    /// "requests" or "tokens".
    pub what: &'static str,
    pub limit: u64,
    pub retry_after: Duration,
    pub headers: PolicyHeaders,
}

/// Why a request was not admitted: over a limit, or the shared windows could not be asked
/// (and `on_redis_error = "fail_closed"`).
#[derive(Debug, Clone)]
pub enum RateRefusal {
    Limited(RateDenial),
    Unavailable,
}

/// What admission took (`None`: nothing to settle, e.g. admitted unchecked while Redis
/// fails) and the `x-ratelimit-*` headers.
pub type RateAdmission = (Option<RateCharge>, PolicyHeaders);

/// Header names, as OpenAI sends them.
pub mod headers {
    use crate::error::PolicyName;

    pub static LIMIT_REQUESTS: PolicyName = PolicyName::new("x-ratelimit-limit-requests");
    pub static REMAINING_REQUESTS: PolicyName = PolicyName::new("x-ratelimit-remaining-requests");
    pub static RESET_REQUESTS: PolicyName = PolicyName::new("x-ratelimit-reset-requests");
    pub static LIMIT_TOKENS: PolicyName = PolicyName::new("x-ratelimit-limit-tokens");
    pub static REMAINING_TOKENS: PolicyName = PolicyName::new("x-ratelimit-remaining-tokens");
    pub static RESET_TOKENS: PolicyName = PolicyName::new("x-ratelimit-reset-tokens");
}

/// A duration the way OpenAI's reset headers write it: `20ms`, `1s`, `6m0s`, `1h2m3.5s`.
pub fn reset_string(ms: i64) -> String {
    ResetIn(ms).to_string()
}

/// Milliseconds as OpenAI's reset headers write them ([`reset_string`]), written in place.
#[derive(Debug, Clone, Copy)]
pub struct ResetIn(pub i64);

impl ResetIn {
    /// The duration as the headers write it (what `Display` writes), digit by digit.
    pub fn text(self) -> ShortText {
        let mut t = ShortText::default();
        let ms = self.0.max(0) as u64;
        if ms < 1000 {
            t.push_u64(ms, 0);
            t.push_str("ms");
            return t;
        }
        let (h, rest) = (ms / 3_600_000, ms % 3_600_000);
        let (m, rest) = (rest / 60_000, rest % 60_000);
        let (s, milli) = (rest / 1000, rest % 1000);
        if h > 0 {
            t.push_u64(h, 0);
            t.push_str("h");
        }
        if h > 0 || m > 0 {
            t.push_u64(m, 0);
            t.push_str("m");
        }
        t.push_u64(s, 0);
        if milli > 0 {
            // Thousandths without their trailing zeros: 1.5s, 1.25s, 1.125s.
            let (mut frac, mut digits) = (milli, 3);
            while frac % 10 == 0 {
                frac /= 10;
                digits -= 1;
            }
            t.push_str(".");
            t.push_u64(frac, digits);
        }
        t.push_str("s");
        t
    }
}

impl std::fmt::Display for ResetIn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text())
    }
}

/// One bucket as the headers see it.
#[derive(Debug, Clone, Copy)]
pub(super) struct WindowView {
    pub limit: u64,
    /// May be below zero (a bucket in debt); compared to find the tightest scope.
    pub level: f64,
    /// Milliseconds until the bucket is full again.
    pub reset_ms: i64,
}

/// A scope's two buckets as the headers see them.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct ScopeView {
    pub requests: Option<WindowView>,
    pub tokens: Option<WindowView>,
}

/// The headers of the tightest scope, for requests and for tokens separately.
pub(super) fn report(views: &[ScopeView]) -> PolicyHeaders {
    let mut out = Vec::with_capacity(6);
    type Pick = fn(&ScopeView) -> Option<WindowView>;
    let kinds: [(Pick, [&'static PolicyName; 3]); 2] = [
        (
            |s| s.requests,
            [
                &headers::LIMIT_REQUESTS,
                &headers::REMAINING_REQUESTS,
                &headers::RESET_REQUESTS,
            ],
        ),
        (
            |s| s.tokens,
            [
                &headers::LIMIT_TOKENS,
                &headers::REMAINING_TOKENS,
                &headers::RESET_TOKENS,
            ],
        ),
    ];
    for (pick, [limit, remaining, reset]) in kinds {
        let tightest = views
            .iter()
            .filter_map(pick)
            .min_by(|a, b| a.level.total_cmp(&b.level));
        if let Some(b) = tightest {
            out.push((limit, ShortText::from_u64(b.limit)));
            out.push((
                remaining,
                ShortText::from_u64(b.level.max(0.0).floor() as u64),
            ));
            out.push((reset, ResetIn(b.reset_ms).text()));
        }
    }
    out
}

/// Where the windows live: one per process, chosen at start (`[rate_limits] backend`).
pub enum RateLimitBackend {
    Local(RateLimiter),
    Redis(Arc<RedisLimiter>),
}

impl RateLimitBackend {
    /// The backend `config` names; `fail_open` counts requests admitted unchecked.
    pub fn from_config(config: &RateLimitsConfig, fail_open: Counter) -> RateLimitBackend {
        match &config.backend {
            RateLimitBackendConfig::Local => RateLimitBackend::Local(RateLimiter::default()),
            RateLimitBackendConfig::Redis(r) => {
                RateLimitBackend::Redis(Arc::new(RedisLimiter::new(r, fail_open)))
            }
        }
    }

    /// Takes one request and `tokens` from every scope's windows, all or none. `now` is this
    /// process's clock (the local backend); Redis reads its own.
    pub async fn admit(
        &self,
        now: i64,
        scopes: &[(ScopeKey, Limits)],
        tokens: u64,
    ) -> Result<RateAdmission, RateRefusal> {
        match self {
            RateLimitBackend::Local(l) => match l.admit(now, scopes, tokens) {
                Ok((charge, headers)) => Ok((Some(charge), headers)),
                Err(d) => Err(RateRefusal::Limited(d)),
            },
            RateLimitBackend::Redis(r) => r.admit(scopes, tokens).await,
        }
    }

    /// Gives back what a request took (it was refused after admission, by its budget).
    pub fn refund(&self, now: i64, charge: &RateCharge) {
        match self {
            RateLimitBackend::Local(l) => l.refund(now, charge),
            RateLimitBackend::Redis(r) => r.clone().refund_later(charge.clone()),
        }
    }

    /// Corrects the tokens taken at admission to what the request actually used.
    pub fn settle(&self, now: i64, charge: &RateCharge, used_tokens: u64) {
        match self {
            RateLimitBackend::Local(l) => l.settle(now, charge, used_tokens),
            RateLimitBackend::Redis(r) => r.clone().settle_later(charge.clone(), used_tokens),
        }
    }

    /// Readiness: `None` for the local backend, else whether Redis answers a PING in time.
    pub async fn redis_ready(&self) -> Option<bool> {
        match self {
            RateLimitBackend::Local(_) => None,
            RateLimitBackend::Redis(r) => Some(r.ping().await),
        }
    }

    /// Whether a Redis backend refuses requests while Redis fails (readiness reports it).
    pub fn fails_closed(&self) -> bool {
        match self {
            RateLimitBackend::Local(_) => false,
            RateLimitBackend::Redis(r) => r.fails_closed(),
        }
    }
}
