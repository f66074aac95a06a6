//! `[rate_limits]`: where the RPM/TPM windows live. `backend = "local"` (the default) keeps them
//! in each process; `backend = "redis"` shares them between replicas through one Redis
//! (docs/budgets.md, "Rate limits"). The per-scope limits themselves are
//! `service_types.NAME.rate_limits = { rpm, tpm }` and the admin API, not this section.

use std::time::Duration;

use serde::Deserialize;

/// `[rate_limits]` as validated at load.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(try_from = "RawRateLimitsConfig")]
pub struct RateLimitsConfig {
    /// Where the windows are counted.
    pub backend: RateLimitBackendConfig,
}

/// Where rate-limit windows are counted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum RateLimitBackendConfig {
    /// In this process's memory: each replica counts on its own.
    #[default]
    Local,
    /// In one Redis shared by every replica.
    Redis(RedisRateLimitConfig),
}

/// `backend = "redis"`: how to reach Redis and what to do when it does not answer.
#[derive(Clone, PartialEq, Eq)]
pub struct RedisRateLimitConfig {
    /// `redis://[user:password@]host:port[/db]`; may hold a password (never logged).
    pub url: String,
    /// The longest one check may wait for Redis (connecting included) before it counts as
    /// a Redis failure.
    pub timeout: Duration,
    /// What a request gets while Redis fails.
    pub on_error: OnRedisError,
    /// The first part of every key (`PREFIX:rl:v1:...`), so that deployments (or tests) can
    /// share one Redis.
    pub key_prefix: String,
}

impl std::fmt::Debug for RedisRateLimitConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisRateLimitConfig")
            .field("url", &"<redacted>")
            .field("timeout", &self.timeout)
            .field("on_error", &self.on_error)
            .field("key_prefix", &self.key_prefix)
            .finish()
    }
}

/// What a request gets while the shared rate-limit store fails.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnRedisError {
    /// Admit it unchecked, counted in `tollgate_rate_limit_fail_open_total` (the default: a
    /// rate limit smooths load, budgets still hold through the database, and one Redis outage
    /// should not take every replica down with it).
    #[default]
    FailOpen,
    /// Refuse it with `policy_unavailable` (503 / UNAVAILABLE, a failure).
    FailClosed,
}

impl RedisRateLimitConfig {
    /// Whether the URL names a scheme the client speaks. The scheme only: the rest may hold
    /// a password, which must not be echoed.
    pub fn url_scheme_ok(&self) -> bool {
        self.url.starts_with("redis://") || self.url.starts_with("redis+unix://")
    }
}

impl OnRedisError {
    /// The configuration name.
    pub fn as_str(self) -> &'static str {
        match self {
            OnRedisError::FailOpen => "fail_open",
            OnRedisError::FailClosed => "fail_closed",
        }
    }
}

/// `redis_timeout_ms` when none is given: a same-datacentre Redis answers in well under 1 ms.
pub const DEFAULT_REDIS_TIMEOUT_MS: u64 = 50;

/// `key_prefix` when none is given.
pub const DEFAULT_KEY_PREFIX: &str = "tollgate";

/// Which backend, as written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum BackendKind {
    #[default]
    Local,
    Redis,
}

/// `[rate_limits]` as written; [`RateLimitsConfig`] is what it validates into.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRateLimitsConfig {
    #[serde(default)]
    backend: BackendKind,
    redis_url: Option<String>,
    redis_timeout_ms: Option<u64>,
    on_redis_error: Option<OnRedisError>,
    key_prefix: Option<String>,
}

impl TryFrom<RawRateLimitsConfig> for RateLimitsConfig {
    type Error = String;

    fn try_from(r: RawRateLimitsConfig) -> Result<Self, String> {
        let backend = match r.backend {
            BackendKind::Local => {
                let redis_only = [
                    ("redis_url", r.redis_url.is_some()),
                    ("redis_timeout_ms", r.redis_timeout_ms.is_some()),
                    ("on_redis_error", r.on_redis_error.is_some()),
                    ("key_prefix", r.key_prefix.is_some()),
                ];
                if let Some((field, _)) = redis_only.iter().find(|(_, set)| *set) {
                    return Err(format!(
                        "`{field}` applies only to backend = \"redis\", not \"local\""
                    ));
                }
                RateLimitBackendConfig::Local
            }
            BackendKind::Redis => {
                let url = r
                    .redis_url
                    .ok_or("redis_url is required for backend = \"redis\"")?;
                // The scheme is checked with the other problems (`Config::problems`), after
                // `${VAR}` interpolation: as written, the value may be a placeholder.
                let timeout_ms = r.redis_timeout_ms.unwrap_or(DEFAULT_REDIS_TIMEOUT_MS);
                if timeout_ms == 0 || timeout_ms > 60_000 {
                    return Err(format!(
                        "redis_timeout_ms must be from 1 to 60000, not {timeout_ms}"
                    ));
                }
                let key_prefix = r.key_prefix.unwrap_or_else(|| DEFAULT_KEY_PREFIX.into());
                if key_prefix.is_empty()
                    || key_prefix.len() > 128
                    || key_prefix
                        .chars()
                        .any(|c| c.is_whitespace() || c.is_control())
                {
                    return Err(
                        "key_prefix must be 1 to 128 characters without spaces or control \
                         characters"
                            .into(),
                    );
                }
                RateLimitBackendConfig::Redis(RedisRateLimitConfig {
                    url,
                    timeout: Duration::from_millis(timeout_ms),
                    on_error: r.on_redis_error.unwrap_or_default(),
                    key_prefix,
                })
            }
        };
        Ok(RateLimitsConfig { backend })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn load(text: &str) -> Result<Config, String> {
        Config::from_toml_str(text).map_err(|e| e.to_string())
    }

    #[test]
    fn absent_or_local_is_the_local_backend() {
        assert_eq!(
            load("").unwrap().rate_limits.backend,
            RateLimitBackendConfig::Local
        );
        let c = load("[rate_limits]\nbackend = \"local\"\n").unwrap();
        assert_eq!(c.rate_limits.backend, RateLimitBackendConfig::Local);
    }

    #[test]
    fn redis_gets_its_defaults() {
        let c =
            load("[rate_limits]\nbackend = \"redis\"\nredis_url = \"redis://127.0.0.1:6379\"\n")
                .unwrap();
        let RateLimitBackendConfig::Redis(r) = c.rate_limits.backend else {
            panic!("not redis");
        };
        assert_eq!(r.url, "redis://127.0.0.1:6379");
        assert_eq!(r.timeout, Duration::from_millis(DEFAULT_REDIS_TIMEOUT_MS));
        assert_eq!(r.on_error, OnRedisError::FailOpen);
        assert_eq!(r.key_prefix, "tollgate");
    }

    #[test]
    fn redis_settings_are_typed() {
        let c = load(
            "[rate_limits]\nbackend = \"redis\"\nredis_url = \"redis://:pw@h:1/2\"\n\
             redis_timeout_ms = 250\non_redis_error = \"fail_closed\"\nkey_prefix = \"t-1\"\n",
        )
        .unwrap();
        let RateLimitBackendConfig::Redis(r) = c.rate_limits.backend else {
            panic!("not redis");
        };
        assert_eq!(r.timeout, Duration::from_millis(250));
        assert_eq!(r.on_error, OnRedisError::FailClosed);
        assert_eq!(r.key_prefix, "t-1");
        let debug = format!("{r:?}");
        assert!(
            !debug.contains("pw"),
            "the URL's password is redacted: {debug}"
        );
    }

    #[test]
    fn redis_needs_a_url_and_sane_values() {
        let err = load("[rate_limits]\nbackend = \"redis\"\n").unwrap_err();
        assert!(err.contains("redis_url is required"), "{err}");
        assert!(err.contains("line 1"), "{err}");
        let err = load("[rate_limits]\nbackend = \"redis\"\nredis_url = \"http://x:secretpw@h\"\n")
            .unwrap_err();
        assert!(err.contains("redis://"), "{err}");
        assert!(!err.contains("secretpw"), "the URL is not echoed: {err}");
        let err = load(
            "[rate_limits]\nbackend = \"redis\"\nredis_url = \"redis://h\"\nredis_timeout_ms = 0\n",
        )
        .unwrap_err();
        assert!(err.contains("redis_timeout_ms"), "{err}");
        let err = load(
            "[rate_limits]\nbackend = \"redis\"\nredis_url = \"redis://h\"\nkey_prefix = \"a b\"\n",
        )
        .unwrap_err();
        assert!(err.contains("key_prefix"), "{err}");
        let err = load(
            "[rate_limits]\nbackend = \"redis\"\nredis_url = \"redis://h\"\non_redis_error = \"maybe\"\n",
        )
        .unwrap_err();
        assert!(err.contains("maybe") || err.contains("fail_open"), "{err}");
    }

    #[test]
    fn redis_keys_are_refused_for_the_local_backend_and_unknown_keys_everywhere() {
        let err = load("[rate_limits]\nredis_url = \"redis://h\"\n").unwrap_err();
        assert!(err.contains("applies only to backend"), "{err}");
        let err = load("[rate_limits]\nbackend = \"memcached\"\n").unwrap_err();
        assert!(err.contains("memcached") || err.contains("local"), "{err}");
        let err = load("[rate_limits]\nbackend = \"local\"\nrpm = 3\n").unwrap_err();
        assert!(err.contains("rpm"), "{err}");
    }
}
