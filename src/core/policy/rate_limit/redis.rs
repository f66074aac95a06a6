//! The Redis backend: every replica counts in the same buckets, kept in one Redis. A check is
//! one atomic Lua script (`admit.lua`) over every bucket of the request, run by SHA (EVALSHA,
//! loaded again on NOSCRIPT after a Redis restart); a correction is a second one
//! (`adjust.lua`). Both read Redis's own clock (`TIME`), so replica clocks do not matter, and
//! set an expiry, so idle scopes leave nothing behind. Keys are
//! `PREFIX:rl:v1:{user|key}:ID:{req|tok}`: a change of semantics gets a new version, so two
//! versions of tollgate in a rolling upgrade never read each other's buckets.
//!
//! When Redis does not answer within `redis_timeout_ms`, `on_redis_error` decides: admit
//! unchecked and count it (`tollgate_rate_limit_fail_open_total`), or refuse with
//! `policy_unavailable`. Either is logged once per change (failing, then healthy again). The
//! connection manager reconnects by itself when Redis is back.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::Script;

use super::{
    report, Limits, RateAdmission, RateCharge, RateDenial, RateRefusal, ScopeView, WindowView,
};
use crate::config::{OnRedisError, RedisRateLimitConfig};
use crate::core::policy::budget::ScopeKey;

/// Why one call to Redis failed (logged on the transition to failing; never holds the URL).
#[derive(Debug, thiserror::Error)]
pub enum RedisCallError {
    /// No answer within `redis_timeout_ms`.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// Redis refused the connection, dropped it, or answered with an error.
    #[error("{0}")]
    Redis(#[from] redis::RedisError),
    /// The script's answer is not what this version sends.
    #[error("unexpected reply from the rate-limit script ({0} values)")]
    Reply(usize),
    /// `redis_url` could not be used (caught at load; here only as a safety net).
    #[error("redis_url is not usable")]
    BadUrl,
}

/// Which bucket of a scope.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Window {
    Requests,
    Tokens,
}

/// One bucket of one request: which scope, which window, its limit.
struct Bucket {
    scope: usize,
    window: Window,
    limit: u64,
}

/// Buckets in one shared Redis.
pub struct RedisLimiter {
    /// `None` only if the URL could not be used (a configuration error, logged at start).
    conn: Option<ConnectionManager>,
    timeout: Duration,
    on_error: OnRedisError,
    prefix: String,
    fail_open: Counter,
    healthy: AtomicBool,
    admit_script: Script,
    adjust_script: Script,
}

impl RedisLimiter {
    /// A limiter over `config`; connects lazily (a Redis down at start is a Redis failure,
    /// not a failure to start).
    pub fn new(config: &RedisRateLimitConfig, fail_open: Counter) -> RedisLimiter {
        let manager_config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(config.timeout))
            .set_response_timeout(Some(config.timeout))
            // Few, quick retries per reconnection: a request never waits longer than its own
            // timeout anyway, and the next request starts a new reconnection.
            .set_number_of_retries(2)
            .set_min_delay(Duration::from_millis(20))
            .set_max_delay(Duration::from_millis(500));
        let conn = redis::Client::open(config.url.as_str())
            .and_then(|c| ConnectionManager::new_lazy_with_config(c, manager_config));
        let conn = match conn {
            Ok(c) => Some(c),
            Err(e) => {
                tracing::error!(kind = ?e.kind(), "rate-limit redis_url cannot be used; every check fails");
                None
            }
        };
        RedisLimiter {
            conn,
            timeout: config.timeout,
            on_error: config.on_error,
            prefix: config.key_prefix.clone(),
            fail_open,
            healthy: AtomicBool::new(true),
            admit_script: Script::new(include_str!("admit.lua")),
            adjust_script: Script::new(include_str!("adjust.lua")),
        }
    }

    /// Whether requests are refused while Redis fails.
    pub fn fails_closed(&self) -> bool {
        self.on_error == OnRedisError::FailClosed
    }

    fn key(&self, scope: ScopeKey, window: Window) -> String {
        let w = match window {
            Window::Requests => "req",
            Window::Tokens => "tok",
        };
        format!("{}:rl:v1:{}:{}:{w}", self.prefix, scope.0.as_str(), scope.1)
    }

    /// The buckets of `scopes`, in order.
    fn buckets(scopes: &[(ScopeKey, Limits)]) -> Vec<Bucket> {
        let mut out = Vec::with_capacity(scopes.len() * 2);
        for (i, (_, l)) in scopes.iter().enumerate() {
            if let Some(limit) = l.rpm {
                out.push(Bucket {
                    scope: i,
                    window: Window::Requests,
                    limit,
                });
            }
            if let Some(limit) = l.tpm {
                out.push(Bucket {
                    scope: i,
                    window: Window::Tokens,
                    limit,
                });
            }
        }
        out
    }

    /// Runs `script` over `keys` and `args` within the timeout.
    async fn run(
        &self,
        script: &Script,
        keys: Vec<String>,
        args: Vec<String>,
    ) -> Result<Vec<i64>, RedisCallError> {
        let mut conn = self.conn.clone().ok_or(RedisCallError::BadUrl)?;
        let mut call = script.prepare_invoke();
        for k in keys {
            call.key(k);
        }
        for a in args {
            call.arg(a);
        }
        match tokio::time::timeout(self.timeout, call.invoke_async::<Vec<i64>>(&mut conn)).await {
            Ok(r) => Ok(r?),
            Err(_) => Err(RedisCallError::Timeout(self.timeout)),
        }
    }

    fn succeeded(&self) {
        if !self.healthy.load(Ordering::Relaxed) && !self.healthy.swap(true, Ordering::Relaxed) {
            tracing::info!("rate-limit Redis answers again; shared rate limits are enforced");
        }
    }

    fn failed(&self, e: &RedisCallError) {
        if self.healthy.swap(false, Ordering::Relaxed) {
            let effect = match self.on_error {
                OnRedisError::FailOpen => "requests are admitted without rate limits (fail_open)",
                OnRedisError::FailClosed => {
                    "requests with rate limits are refused with policy_unavailable (fail_closed)"
                }
            };
            tracing::warn!(error = %e, "rate-limit Redis is failing; {effect}");
        }
    }

    /// Takes one request and `tokens` from every bucket of `scopes`, all or none.
    pub async fn admit(
        &self,
        scopes: &[(ScopeKey, Limits)],
        tokens: u64,
    ) -> Result<RateAdmission, RateRefusal> {
        let buckets = Self::buckets(scopes);
        let keys = buckets
            .iter()
            .map(|b| self.key(scopes[b.scope].0, b.window))
            .collect();
        let mut args = Vec::with_capacity(buckets.len() * 2);
        for b in &buckets {
            args.push(b.limit.to_string());
            args.push(match b.window {
                Window::Requests => "1".to_string(),
                Window::Tokens => tokens.to_string(),
            });
        }
        let reply = match self.run(&self.admit_script, keys, args).await {
            Ok(r) if r.len() == 3 + 2 * buckets.len() => Ok(r),
            Ok(r) => Err(RedisCallError::Reply(r.len())),
            Err(e) => Err(e),
        }
        .map_err(|e| self.failed(&e));
        let Ok(reply) = reply else {
            return match self.on_error {
                OnRedisError::FailOpen => {
                    self.fail_open.inc();
                    Ok((None, Vec::new()))
                }
                OnRedisError::FailClosed => Err(RateRefusal::Unavailable),
            };
        };
        self.succeeded();
        let mut views = vec![ScopeView::default(); scopes.len()];
        for (i, b) in buckets.iter().enumerate() {
            let view = WindowView {
                limit: b.limit,
                level: reply[3 + 2 * i] as f64,
                reset_ms: reply[4 + 2 * i],
            };
            match b.window {
                Window::Requests => views[b.scope].requests = Some(view),
                Window::Tokens => views[b.scope].tokens = Some(view),
            }
        }
        let headers = report(&views);
        if reply[0] == 1 {
            return Ok((
                Some(RateCharge {
                    scopes: scopes.to_vec(),
                    tokens,
                }),
                headers,
            ));
        }
        let refused = usize::try_from(reply[1] - 1)
            .ok()
            .and_then(|i| buckets.get(i))
            .unwrap_or(&buckets[0]);
        Err(RateRefusal::Limited(RateDenial {
            what: match refused.window {
                Window::Requests => "requests",
                Window::Tokens => "tokens",
            },
            limit: refused.limit,
            retry_after: Duration::from_millis(reply[2].max(1) as u64),
            headers,
        }))
    }

    /// Adds `requests` and `tokens` back to the buckets of `charge` (negative: takes more).
    async fn adjust(&self, charge: &RateCharge, requests: i128, tokens: i128) {
        let mut keys = Vec::new();
        let mut args = Vec::new();
        for b in Self::buckets(&charge.scopes) {
            let delta = match b.window {
                Window::Requests => requests,
                Window::Tokens => tokens,
            };
            if delta != 0 {
                keys.push(self.key(charge.scopes[b.scope].0, b.window));
                args.push(b.limit.to_string());
                args.push(delta.to_string());
            }
        }
        if keys.is_empty() {
            return;
        }
        match self.run(&self.adjust_script, keys, args).await {
            Ok(_) => self.succeeded(),
            // A lost correction only errs by one request's estimate, for at most a minute.
            Err(e) => self.failed(&e),
        }
    }

    /// Gives back what a request took (refused after admission), off the request path.
    pub fn refund_later(self: Arc<Self>, charge: RateCharge) {
        spawn(async move {
            let tokens = i128::from(charge.tokens);
            self.adjust(&charge, 1, tokens).await
        });
    }

    /// Corrects the tokens taken at admission to `used`, off the request path.
    pub fn settle_later(self: Arc<Self>, charge: RateCharge, used: u64) {
        spawn(async move {
            let delta = i128::from(charge.tokens) - i128::from(used);
            self.adjust(&charge, 0, delta).await
        });
    }

    /// Whether Redis answers a PING within the timeout (readiness).
    pub async fn ping(&self) -> bool {
        let Some(mut conn) = self.conn.clone() else {
            return false;
        };
        let cmd = redis::cmd("PING");
        let ping = cmd.query_async::<String>(&mut conn);
        matches!(tokio::time::timeout(self.timeout, ping).await, Ok(Ok(_)))
    }
}

/// Runs a correction on the current runtime (settlement may run where none is entered, e.g.
/// a guard dropped at shutdown: then the correction is skipped, as when Redis fails).
fn spawn(f: impl std::future::Future<Output = ()> + Send + 'static) {
    if let Ok(rt) = tokio::runtime::Handle::try_current() {
        rt.spawn(f);
    }
}
