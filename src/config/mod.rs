//! Configuration: one TOML file with `${ENV}` interpolation, environment and flag overrides,
//! and validation that names the bad key and its line.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use serde::Deserialize;

mod check;
mod load;
pub mod period;
mod providers;
mod rate_limits;
#[cfg(test)]
mod tests;

pub use check::{ConfigProblem, KeyPath, KeySegment};
pub use load::Overrides;
pub use period::{Period, PeriodError};
pub use providers::{
    AnthropicConfig, HttpUpstreamConfig, MockConfig, ProviderConfig, ProviderKind, ProviderSettings,
};
pub use rate_limits::{
    OnRedisError, RateLimitBackendConfig, RateLimitsConfig, RedisRateLimitConfig,
};

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    /// The TOML is malformed or a key is unknown or has the wrong type.
    #[error("{0}")]
    Parse(String),
    /// A `${VAR}` names an environment variable that is not set.
    #[error("line {line}: environment variable {var} is not set")]
    MissingEnv { line: usize, var: String },
    /// The file parses but says something inconsistent.
    #[error("invalid configuration: {0}")]
    Invalid(String),
    /// Everything wrong with a file, each naming its line and dotted key (one per line).
    #[error("{}", problems_text(.0))]
    Problems(Vec<ConfigProblem>),
}

fn problems_text(problems: &[ConfigProblem]) -> String {
    let lines: Vec<String> = problems.iter().map(ToString::to_string).collect();
    lines.join("\n")
}

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub server: ServerConfig,
    #[serde(default)]
    pub log: LogConfig,
    #[serde(default)]
    pub database: DatabaseConfig,
    #[serde(default)]
    pub auth: AuthConfig,
    #[serde(default)]
    pub service_types: BTreeMap<String, ServiceTypeConfig>,
    #[serde(default)]
    pub providers: BTreeMap<String, ProviderConfig>,
    #[serde(default)]
    pub aliases: BTreeMap<String, AliasConfig>,
    #[serde(default)]
    pub pricing: BTreeMap<String, PricingConfig>,
    #[serde(default)]
    pub routing: RoutingConfig,
    #[serde(default)]
    pub pricing_policy: PricingPolicyConfig,
    #[serde(default)]
    pub budgets: BudgetsConfig,
    /// `[rate_limits]`: where RPM/TPM windows are counted (per process, or a shared Redis).
    #[serde(default)]
    pub rate_limits: RateLimitsConfig,
    #[serde(default)]
    pub telemetry: TelemetryConfig,
}

/// `[telemetry]`: OpenTelemetry traces over OTLP http/protobuf (docs/operations.md,
/// "Tracing"). Read once at start: a change takes a restart.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    /// The collector's base URL; spans are posted to `<otlp_endpoint>/v1/traces`. Absent:
    /// no spans are recorded.
    pub otlp_endpoint: Option<String>,
    /// `service.name` of the exported resource.
    pub service_name: String,
    /// Put prompt and completion text on spans (`gen_ai.input.messages`,
    /// `gen_ai.output.messages`); off by default, as prompts may hold personal data.
    pub capture_content: bool,
    /// How long spans are gathered before one export.
    pub batch_interval_ms: u64,
    /// The most spans in one export.
    pub max_batch_spans: usize,
    /// Spans waiting for export; past this, new spans are dropped and counted.
    pub max_queue_spans: usize,
    /// The deadline of one export request.
    pub export_timeout_ms: u64,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self {
            otlp_endpoint: None,
            service_name: "tollgate".into(),
            capture_content: false,
            batch_interval_ms: 1000,
            max_batch_spans: 512,
            max_queue_spans: 4096,
            export_timeout_ms: 10_000,
        }
    }
}

/// `[pricing_policy]`: what a model without a price costs, and how much output a request
/// without `max_tokens` is assumed to produce when its maximum cost is reserved.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PricingPolicyConfig {
    /// `"free"` (the default): unpriced models cost nothing; `"refuse"`: requests to them are
    /// refused with `model_not_found`.
    pub unpriced: UnpricedPolicy,
    /// Output tokens reserved for a request with no `max_tokens` to a model with no
    /// `max_output_tokens`.
    pub default_max_output_tokens: u64,
}

impl Default for PricingPolicyConfig {
    fn default() -> Self {
        Self {
            unpriced: UnpricedPolicy::Free,
            default_max_output_tokens: 4096,
        }
    }
}

/// What a model without `[pricing]` costs.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum UnpricedPolicy {
    Free,
    Refuse,
}

/// `[budgets]`: how reservations behave.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BudgetsConfig {
    /// A reservation not settled by then (its replica crashed) is released by whoever finds it.
    /// Must outlast the longest request.
    pub reservation_ttl_secs: u64,
    /// How often each replica releases expired reservations (a bounded, indexed sweep).
    pub sweep_interval_secs: u64,
    /// How long a replica trusts its copy of a user's or key's budget and rate-limit settings
    /// (an admin change made on another replica is seen within this time; the limit amount
    /// itself is always read from the database by the reservation).
    pub policy_cache_ms: u64,
    /// How long settlements that give budget back (a reservation's, a lease's release) are
    /// gathered into one transaction (0: write each at once).
    pub settle_batch_ms: u64,
    /// How long settlements that give nothing back (the charge of a request admitted on a
    /// lease, with its ledger row) are gathered, when no settlement of the first kind is queued.
    pub charge_batch_ms: u64,
    /// PostgreSQL: commit reservations without waiting for their WAL flush. Faster under load
    /// on one budget; a database crash may then forget reservations of requests in flight
    /// (their settlements still charge the actual cost). Settlements are always durable.
    pub fast_reservations: bool,
    /// Leases: the share of a budget's remaining room one replica leases at a time, to admit
    /// requests in memory against it (0: no leases, every request reserves; default 0.1).
    pub lease_fraction: f64,
    /// Below this share of the limit left (not spent nor held), a replica stops leasing and
    /// hands its unused lease back: the last dollars are reserved per request, exactly.
    pub lease_min_remaining_fraction: f64,
    /// A lease not renewed by then (its replica stopped) returns to the budget.
    pub lease_ttl_ms: u64,
    /// What an expired request reservation (its replica crashed) does to the budget.
    pub expired_reservations: ExpiredReservations,
}

/// `budgets.expired_reservations`: a reservation whose request never settled (its replica
/// died) either goes back to the budget or is charged as spent. Leases are always given back:
/// their unused part was never spent.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExpiredReservations {
    /// Given back: the request is assumed not to have cost anything (it may have).
    #[default]
    Release,
    /// Charged at the reserved maximum: the upstream may have served and billed it.
    Charge,
}

impl Default for BudgetsConfig {
    fn default() -> Self {
        Self {
            reservation_ttl_secs: 900,
            sweep_interval_secs: 30,
            policy_cache_ms: 5000,
            settle_batch_ms: 10,
            charge_batch_ms: 50,
            fast_reservations: false,
            lease_fraction: 0.1,
            lease_min_remaining_fraction: 0.2,
            lease_ttl_ms: 30_000,
            expired_reservations: ExpiredReservations::Release,
        }
    }
}

/// `[routing]`: when a provider is taken out of rotation.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RoutingConfig {
    /// Consecutive retryable failures that mark a provider unhealthy.
    pub unhealthy_after_failures: u32,
    /// How long the first trip lasts; doubles on each trip in a row.
    pub unhealthy_backoff_secs: u64,
    /// The longest a provider stays out.
    pub unhealthy_backoff_max_secs: u64,
}

impl Default for RoutingConfig {
    fn default() -> Self {
        Self {
            unhealthy_after_failures: 2,
            unhealthy_backoff_secs: 30,
            unhealthy_backoff_max_secs: 300,
        }
    }
}

/// `[server]`: listeners, limits and the admin token.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    pub http_addr: SocketAddr,
    pub grpc_addr: SocketAddr,
    pub max_body_bytes: usize,
    pub admin_token: Option<String>,
    pub shutdown_grace_secs: u64,
    /// After SIGTERM, how long `/readyz` answers 503 while both listeners keep serving, before
    /// they stop accepting: load balancers see the replica leave before its port closes.
    pub shutdown_delay_ms: u64,
    pub default_service_type: String,
    /// How long an HTTP client may take to send a request's headers (a trickling client is
    /// cut off instead of holding its connection forever).
    pub header_read_timeout_ms: u64,
    /// How long an HTTP client may take to send a request's body, from its headers on; past it
    /// the request is 408 `request_timeout`.
    pub body_read_timeout_ms: u64,
    /// The most bytes of an HTTP request's head (request line and headers); past it the answer
    /// is 431 and the connection is closed, so a client cannot make the server buffer without
    /// bound. At least 8192.
    pub max_header_bytes: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            http_addr: SocketAddr::from(([127, 0, 0, 1], 8080)),
            grpc_addr: SocketAddr::from(([127, 0, 0, 1], 50051)),
            max_body_bytes: 3 * 1024 * 1024,
            admin_token: None,
            shutdown_grace_secs: 30,
            shutdown_delay_ms: 0,
            default_service_type: "default".into(),
            header_read_timeout_ms: 30_000,
            body_read_timeout_ms: 60_000,
            max_header_bytes: 64 * 1024,
        }
    }
}

/// `[log]`: format and level of the process log.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    pub format: LogFormat,
    pub level: String,
    /// One `tollgate::access` line at info per model request when it finishes (on by default;
    /// follows reloads).
    pub access: bool,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            format: LogFormat::Text,
            level: "info".into(),
            access: true,
        }
    }
}

/// Log line format.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

/// `[database]`: where users, keys and the usage ledger live.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DatabaseConfig {
    pub url: String,
    pub max_connections: usize,
    pub run_migrations: bool,
    pub ledger_batch_size: usize,
    pub ledger_flush_ms: u64,
    /// Pooled connections unused this long are closed (all but one); 0 keeps them open.
    pub idle_connection_timeout_secs: u64,
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        Self {
            url: "sqlite://tollgate.db".into(),
            max_connections: 16,
            run_migrations: true,
            ledger_batch_size: 500,
            ledger_flush_ms: 200,
            idle_connection_timeout_secs: 60,
        }
    }
}

/// `[auth]`: how credentials are verified.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    pub static_keys: Vec<StaticKeyConfig>,
    /// How long a verified API key is trusted before the store is asked again.
    pub key_cache_ttl_ms: u64,
    /// How long a token identity's user row (and so its blocked flag) is trusted before the
    /// store is asked again.
    pub identity_cache_ttl_ms: u64,
    /// OIDC JWT bearer tokens, checked against a JWKS.
    pub jwt: Option<JwtConfig>,
    /// RFC 7662 token introspection.
    pub introspection: Option<IntrospectionConfig>,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            static_keys: Vec::new(),
            key_cache_ttl_ms: 5000,
            identity_cache_ttl_ms: 5000,
            jwt: None,
            introspection: None,
        }
    }
}

/// `[auth.jwt]`: OIDC JWT bearer tokens.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwtConfig {
    pub jwks_url: String,
    pub issuer: String,
    pub audience: String,
    /// Accepted clock difference for `exp` and `nbf`.
    #[serde(default = "defaults::jwt_leeway_secs")]
    pub leeway_secs: u64,
    /// How long a fetched key set is used before it is fetched again.
    #[serde(default = "defaults::jwks_cache_secs")]
    pub jwks_cache_secs: u64,
    /// The least time between two fetches caused by an unknown `kid`.
    #[serde(default = "defaults::jwks_min_refresh_secs")]
    pub jwks_min_refresh_secs: u64,
    /// Deadline for one JWKS fetch.
    #[serde(default = "defaults::verifier_timeout_ms")]
    pub timeout_ms: u64,
    /// A claim naming the caller's service type, used when the request names none.
    pub service_type_claim: Option<String>,
}

/// `[auth.introspection]`: RFC 7662 token introspection.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IntrospectionConfig {
    pub url: String,
    pub client_id: String,
    pub client_secret: String,
    /// How long a positive answer is trusted.
    #[serde(default = "defaults::introspection_cache_ttl_secs")]
    pub cache_ttl_secs: u64,
    /// Deadline for one introspection call.
    #[serde(default = "defaults::verifier_timeout_ms")]
    pub timeout_ms: u64,
}

impl std::fmt::Debug for IntrospectionConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IntrospectionConfig")
            .field("url", &self.url)
            .field("client_id", &self.client_id)
            .field("client_secret", &"<redacted>")
            .field("cache_ttl_secs", &self.cache_ttl_secs)
            .finish_non_exhaustive()
    }
}

/// `[[auth.static_keys]]`: an API key declared in the file, stored hashed like any other.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StaticKeyConfig {
    pub user: String,
    pub key: String,
    pub name: Option<String>,
}

impl std::fmt::Debug for StaticKeyConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StaticKeyConfig")
            .field("user", &self.user)
            .field("key", &"<redacted>")
            .finish()
    }
}

/// `[service_types.NAME]`: what a kind of caller may use.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServiceTypeConfig {
    /// Shared with every request's `Principal`, which holds it without a copy.
    pub models: std::sync::Arc<[String]>,
    pub purposes: Vec<String>,
    pub require_purpose: bool,
    pub signup_cap_per_day: Option<u64>,
    /// At most this many users provisioned for this service type, ever.
    pub signup_cap_total: Option<u64>,
    pub budget: Option<BudgetConfig>,
    pub rate_limits: Option<RateLimitConfig>,
}

impl Default for ServiceTypeConfig {
    fn default() -> Self {
        Self {
            models: std::sync::Arc::from(["*".to_string()]),
            purposes: Vec::new(),
            require_purpose: false,
            signup_cap_per_day: None,
            signup_cap_total: None,
            budget: None,
            rate_limits: None,
        }
    }
}

/// A spending limit in USD over a period: `daily`, `weekly`, `monthly` (calendar, UTC),
/// `total`, or a duration such as `"12h"` (windows of that length aligned to the Unix epoch).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BudgetConfig {
    pub limit_usd: f64,
    /// Checked while the file is parsed: a bad period is a parse error naming its line.
    pub period: Period,
}

impl BudgetConfig {
    /// Checks the amount; `key` names the table in messages.
    pub fn validate(&self, key: &str) -> Result<(), String> {
        if !self.limit_usd.is_finite() || self.limit_usd < 0.0 || self.limit_usd > 1e9 {
            return Err(format!(
                "{key}.limit_usd must be a number from 0 to 1e9, not {}",
                self.limit_usd
            ));
        }
        Ok(())
    }
}

/// Requests and tokens per minute.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitConfig {
    pub rpm: Option<u64>,
    pub tpm: Option<u64>,
}

impl RateLimitConfig {
    /// Limits must be above 0 (leave one out for no limit).
    pub fn validate(&self, key: &str) -> Result<(), String> {
        if self.rpm == Some(0) || self.tpm == Some(0) {
            return Err(format!(
                "{key}: rpm and tpm must be above 0 (leave one out for no limit)"
            ));
        }
        Ok(())
    }
}

mod defaults {
    pub fn jwt_leeway_secs() -> u64 {
        30
    }
    pub fn jwks_cache_secs() -> u64 {
        300
    }
    pub fn jwks_min_refresh_secs() -> u64 {
        10
    }
    pub fn verifier_timeout_ms() -> u64 {
        3_000
    }
    pub fn introspection_cache_ttl_secs() -> u64 {
        60
    }
}

/// `[aliases.NAME]`: a name callers use for an ordered fallback chain.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AliasConfig {
    #[serde(default)]
    pub description: String,
    pub chain: Vec<String>,
}

/// `[pricing."provider/model"]`: USD per million tokens.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PricingConfig {
    pub input_usd_per_mtok: f64,
    pub output_usd_per_mtok: f64,
    pub cached_input_usd_per_mtok: Option<f64>,
    /// The most output tokens one request can produce; caps the reserved maximum cost.
    pub max_output_tokens: Option<u64>,
}
