//! Configuration: one TOML file with `${ENV}` interpolation, environment and flag overrides,
//! and validation that names the bad key and its line.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;

use serde::Deserialize;

pub mod period;

pub use period::{Period, PeriodError};

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
    /// How long settlements are gathered into one transaction (0: write each at once).
    pub settle_batch_ms: u64,
    /// PostgreSQL: commit reservations without waiting for their WAL flush. Faster under load
    /// on one budget; a database crash may then forget reservations of requests in flight
    /// (their settlements still charge the actual cost). Settlements are always durable.
    pub fast_reservations: bool,
}

impl Default for BudgetsConfig {
    fn default() -> Self {
        Self {
            reservation_ttl_secs: 900,
            sweep_interval_secs: 30,
            policy_cache_ms: 5000,
            settle_batch_ms: 10,
            fast_reservations: false,
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
    pub default_service_type: String,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            http_addr: SocketAddr::from(([127, 0, 0, 1], 8080)),
            grpc_addr: SocketAddr::from(([127, 0, 0, 1], 50051)),
            max_body_bytes: 3 * 1024 * 1024,
            admin_token: None,
            shutdown_grace_secs: 30,
            default_service_type: "default".into(),
        }
    }
}

/// `[log]`: format and level of the process log.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    pub format: LogFormat,
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            format: LogFormat::Text,
            level: "info".into(),
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
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        Self {
            url: "sqlite://tollgate.db".into(),
            max_connections: 16,
            run_migrations: true,
            ledger_batch_size: 500,
            ledger_flush_ms: 200,
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
    pub models: Vec<String>,
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
            models: vec!["*".into()],
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

/// Which protocol a provider speaks.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ProviderKind {
    /// Any OpenAI-compatible chat-completions server (OpenAI, vLLM, Ollama, Groq, ...).
    Openai,
    /// The Anthropic Messages API.
    Anthropic,
    /// Deterministic tokens, for demos, tests and benchmarks.
    Mock,
}

impl ProviderKind {
    /// The name used in configuration.
    pub fn as_str(self) -> &'static str {
        match self {
            ProviderKind::Openai => "openai",
            ProviderKind::Anthropic => "anthropic",
            ProviderKind::Mock => "mock",
        }
    }
}

/// `[providers.NAME]`: one upstream, validated at load into the settings of its kind.
#[derive(Clone, Deserialize)]
#[serde(try_from = "RawProviderConfig")]
pub struct ProviderConfig {
    /// Allow-list of model names; absent lets any name through to the upstream.
    pub models: Option<Vec<String>>,
    /// What the kind needs to reach its upstream.
    pub settings: ProviderSettings,
}

/// The settings of one provider kind.
#[derive(Clone)]
pub enum ProviderSettings {
    Openai(HttpUpstreamConfig),
    Anthropic(AnthropicConfig),
    Mock(MockConfig),
}

impl ProviderConfig {
    /// Which protocol it speaks.
    pub fn kind(&self) -> ProviderKind {
        match &self.settings {
            ProviderSettings::Openai(_) => ProviderKind::Openai,
            ProviderSettings::Anthropic(_) => ProviderKind::Anthropic,
            ProviderSettings::Mock(_) => ProviderKind::Mock,
        }
    }

    /// The HTTP upstream settings, for kinds that call one.
    pub fn http(&self) -> Option<&HttpUpstreamConfig> {
        match &self.settings {
            ProviderSettings::Openai(h) => Some(h),
            ProviderSettings::Anthropic(a) => Some(&a.http),
            ProviderSettings::Mock(_) => None,
        }
    }
}

/// Where and how an HTTP upstream is called, and how its key pool behaves.
#[derive(Clone)]
pub struct HttpUpstreamConfig {
    /// Without a trailing `/`.
    pub base_url: String,
    pub keys: Vec<String>,
    pub connect_timeout_ms: u64,
    pub first_byte_timeout_ms: u64,
    pub idle_timeout_ms: u64,
    pub total_timeout_ms: u64,
    /// How long a key rests after a 429 that names no Retry-After.
    pub rate_limit_cooldown_secs: u64,
    /// When set, 401/403 rest a key this long instead of disabling it until an operator acts.
    pub auth_failure_cooldown_secs: Option<u64>,
}

/// `kind = "anthropic"`: the Messages API.
#[derive(Clone)]
pub struct AnthropicConfig {
    pub http: HttpUpstreamConfig,
    /// The `anthropic-version` header.
    pub anthropic_version: String,
    /// `anthropic-beta` values sent with every request.
    pub anthropic_beta: Vec<String>,
    /// `max_tokens` sent when the caller gives none (the Messages API requires it).
    pub default_max_tokens: u64,
    /// Per-model overrides of `default_max_tokens`.
    pub model_max_tokens: BTreeMap<String, u64>,
}

impl AnthropicConfig {
    /// The `max_tokens` for a request to `model` that names none.
    pub fn max_tokens_for(&self, model: &str) -> u64 {
        self.model_max_tokens
            .get(model)
            .copied()
            .unwrap_or(self.default_max_tokens)
    }
}

/// `kind = "mock"`: deterministic tokens with configurable latency.
#[derive(Debug, Clone)]
pub struct MockConfig {
    /// Completion tokens per reply (capped by `max_tokens`).
    pub tokens: u32,
    /// Delay before each token.
    pub token_latency_ms: u64,
    /// Extra delay before the first token.
    pub first_token_latency_ms: u64,
}

impl std::fmt::Debug for ProviderConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut d = f.debug_struct("ProviderConfig");
        d.field("kind", &self.kind()).field("models", &self.models);
        if let Some(h) = self.http() {
            d.field("base_url", &h.base_url)
                .field("keys", &format_args!("<{} redacted>", h.keys.len()));
        }
        d.finish_non_exhaustive()
    }
}

/// `[providers.NAME]` as written; [`ProviderConfig`] is what it validates into.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProviderConfig {
    kind: ProviderKind,
    base_url: Option<String>,
    #[serde(default)]
    keys: Vec<String>,
    models: Option<Vec<String>>,
    connect_timeout_ms: Option<u64>,
    first_byte_timeout_ms: Option<u64>,
    idle_timeout_ms: Option<u64>,
    total_timeout_ms: Option<u64>,
    rate_limit_cooldown_secs: Option<u64>,
    auth_failure_cooldown_secs: Option<u64>,
    anthropic_version: Option<String>,
    anthropic_beta: Option<Vec<String>>,
    default_max_tokens: Option<u64>,
    model_max_tokens: Option<BTreeMap<String, u64>>,
    tokens: Option<u32>,
    token_latency_ms: Option<u64>,
    first_token_latency_ms: Option<u64>,
}

impl TryFrom<RawProviderConfig> for ProviderConfig {
    type Error = String;

    fn try_from(r: RawProviderConfig) -> Result<Self, String> {
        let kind = r.kind.as_str();
        let only = |field: &str, set: bool, applies_to: &str| -> Result<(), String> {
            if set {
                Err(format!(
                    "`{field}` applies only to kind {applies_to}, not \"{kind}\""
                ))
            } else {
                Ok(())
            }
        };
        if r.kind != ProviderKind::Mock {
            only("tokens", r.tokens.is_some(), "\"mock\"")?;
            only("token_latency_ms", r.token_latency_ms.is_some(), "\"mock\"")?;
            only(
                "first_token_latency_ms",
                r.first_token_latency_ms.is_some(),
                "\"mock\"",
            )?;
        }
        if r.kind != ProviderKind::Anthropic {
            only(
                "anthropic_version",
                r.anthropic_version.is_some(),
                "\"anthropic\"",
            )?;
            only(
                "anthropic_beta",
                r.anthropic_beta.is_some(),
                "\"anthropic\"",
            )?;
            only(
                "default_max_tokens",
                r.default_max_tokens.is_some(),
                "\"anthropic\"",
            )?;
            only(
                "model_max_tokens",
                r.model_max_tokens.is_some(),
                "\"anthropic\"",
            )?;
        }
        let http = |default_base: Option<&str>| -> Result<HttpUpstreamConfig, String> {
            let base_url = match (r.base_url.as_deref(), default_base) {
                (Some(u), _) if u.starts_with("http://") || u.starts_with("https://") => u,
                (Some(u), _) => return Err(format!("base_url: {u:?} is not an http(s) URL")),
                (None, Some(d)) => d,
                (None, None) => return Err(format!("base_url is required for kind \"{kind}\"")),
            };
            Ok(HttpUpstreamConfig {
                base_url: base_url.trim_end_matches('/').to_string(),
                keys: r.keys.clone(),
                connect_timeout_ms: r.connect_timeout_ms.unwrap_or(5_000),
                first_byte_timeout_ms: r.first_byte_timeout_ms.unwrap_or(60_000),
                idle_timeout_ms: r.idle_timeout_ms.unwrap_or(30_000),
                total_timeout_ms: r.total_timeout_ms.unwrap_or(600_000),
                rate_limit_cooldown_secs: r.rate_limit_cooldown_secs.unwrap_or(60),
                auth_failure_cooldown_secs: r.auth_failure_cooldown_secs,
            })
        };
        let settings = match r.kind {
            ProviderKind::Openai => ProviderSettings::Openai(http(None)?),
            ProviderKind::Anthropic => {
                let default_max_tokens = r.default_max_tokens.unwrap_or(4096);
                if default_max_tokens == 0
                    || r.model_max_tokens.iter().flatten().any(|(_, n)| *n == 0)
                {
                    return Err("max_tokens defaults must be above 0".into());
                }
                ProviderSettings::Anthropic(AnthropicConfig {
                    http: http(Some("https://api.anthropic.com"))?,
                    anthropic_version: r
                        .anthropic_version
                        .clone()
                        .unwrap_or_else(|| "2023-06-01".into()),
                    anthropic_beta: r.anthropic_beta.clone().unwrap_or_default(),
                    default_max_tokens,
                    model_max_tokens: r.model_max_tokens.clone().unwrap_or_default(),
                })
            }
            ProviderKind::Mock => {
                let fields = [
                    ("base_url", r.base_url.is_some()),
                    ("keys", !r.keys.is_empty()),
                    ("connect_timeout_ms", r.connect_timeout_ms.is_some()),
                    ("first_byte_timeout_ms", r.first_byte_timeout_ms.is_some()),
                    ("idle_timeout_ms", r.idle_timeout_ms.is_some()),
                    ("total_timeout_ms", r.total_timeout_ms.is_some()),
                    (
                        "rate_limit_cooldown_secs",
                        r.rate_limit_cooldown_secs.is_some(),
                    ),
                    (
                        "auth_failure_cooldown_secs",
                        r.auth_failure_cooldown_secs.is_some(),
                    ),
                ];
                for (field, set) in fields {
                    only(field, set, "\"openai\" or \"anthropic\"")?;
                }
                ProviderSettings::Mock(MockConfig {
                    tokens: r.tokens.unwrap_or(16).max(1),
                    token_latency_ms: r.token_latency_ms.unwrap_or(0),
                    first_token_latency_ms: r.first_token_latency_ms.unwrap_or(0),
                })
            }
        };
        Ok(ProviderConfig {
            models: r.models,
            settings,
        })
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

/// Overrides from flags and environment, applied after the file.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub http_addr: Option<SocketAddr>,
    pub grpc_addr: Option<SocketAddr>,
    pub database_url: Option<String>,
    pub admin_token: Option<String>,
}

impl Overrides {
    /// Reads `TOLLGATE_HTTP_ADDR`, `TOLLGATE_GRPC_ADDR`, `TOLLGATE_DATABASE_URL`, `TOLLGATE_ADMIN_TOKEN`.
    pub fn from_env() -> Result<Self, ConfigError> {
        let addr = |name: &str| -> Result<Option<SocketAddr>, ConfigError> {
            match std::env::var(name) {
                Ok(v) if !v.is_empty() => v
                    .parse()
                    .map(Some)
                    .map_err(|e| ConfigError::Invalid(format!("{name}={v:?}: {e}"))),
                _ => Ok(None),
            }
        };
        let text = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        Ok(Self {
            http_addr: addr("TOLLGATE_HTTP_ADDR")?,
            grpc_addr: addr("TOLLGATE_GRPC_ADDR")?,
            database_url: text("TOLLGATE_DATABASE_URL"),
            admin_token: text("TOLLGATE_ADMIN_TOKEN"),
        })
    }

    /// Later overrides win over earlier ones.
    pub fn merge(self, later: Overrides) -> Overrides {
        Overrides {
            http_addr: later.http_addr.or(self.http_addr),
            grpc_addr: later.grpc_addr.or(self.grpc_addr),
            database_url: later.database_url.or(self.database_url),
            admin_token: later.admin_token.or(self.admin_token),
        }
    }
}

impl Config {
    /// Reads, interpolates, parses and validates a file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_toml_str(&text)
    }

    /// Parses and validates configuration text, interpolating `${VAR}` from the environment.
    pub fn from_toml_str(text: &str) -> Result<Config, ConfigError> {
        // Parse once before interpolation so that syntax errors quote the file as written,
        // never a secret that came from the environment.
        toml::from_str::<Config>(text)
            .map_err(|e| ConfigError::Parse(describe_toml_error(text, &e)))?;
        let expanded = interpolate(text)?;
        let config: Config = toml::from_str(&expanded).map_err(|e| {
            let line = e.span().map(|s| line_of(&expanded, s.start)).unwrap_or(0);
            ConfigError::Parse(format!(
                "line {line}: a value taken from the environment does not fit here ({})",
                e.message()
            ))
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Applies flag and environment overrides.
    pub fn apply(&mut self, o: &Overrides) {
        if let Some(a) = o.http_addr {
            self.server.http_addr = a;
        }
        if let Some(a) = o.grpc_addr {
            self.server.grpc_addr = a;
        }
        if let Some(u) = &o.database_url {
            self.database.url = u.clone();
        }
        if let Some(t) = &o.admin_token {
            self.server.admin_token = Some(t.clone());
        }
    }

    /// Checks what serde cannot: references between sections and sane values.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        if self.routing.unhealthy_after_failures == 0 {
            return bad("routing.unhealthy_after_failures must be at least 1".into());
        }
        if self.server.max_body_bytes == 0 {
            return bad("server.max_body_bytes must be above 0".into());
        }
        for (name, p) in &self.providers {
            if name.is_empty() || name.contains('/') {
                return bad(format!(
                    "providers.{name}: a provider name may not be empty or contain '/'"
                ));
            }
            let mut seen = std::collections::HashSet::new();
            let Some(http) = p.http() else { continue };
            for (i, k) in http.keys.iter().enumerate() {
                if k.trim().is_empty() {
                    return bad(format!("providers.{name}.keys[{i}] is empty"));
                }
                if !seen.insert(k) {
                    return bad(format!("providers.{name}.keys[{i}] repeats an earlier key"));
                }
            }
            if http.total_timeout_ms == 0 || http.connect_timeout_ms == 0 {
                return bad(format!("providers.{name}: timeouts must be above 0"));
            }
        }
        for (alias, a) in &self.aliases {
            if alias.contains('/') {
                return bad(format!(
                    "aliases.{alias}: an alias name may not contain '/'"
                ));
            }
            if a.chain.is_empty() {
                return bad(format!(
                    "aliases.{alias}.chain must name at least one provider/model"
                ));
            }
            for entry in &a.chain {
                self.check_model_ref(&format!("aliases.{alias}.chain"), entry)?;
            }
        }
        for model in self.pricing.keys() {
            self.check_model_ref("pricing", model)?;
        }
        for (name, p) in &self.pricing {
            if p.input_usd_per_mtok < 0.0 || p.output_usd_per_mtok < 0.0 {
                return bad(format!("pricing.\"{name}\": prices may not be negative"));
            }
            let prices = [
                Some(p.input_usd_per_mtok),
                Some(p.output_usd_per_mtok),
                p.cached_input_usd_per_mtok,
            ];
            if prices
                .iter()
                .flatten()
                .any(|v| !v.is_finite() || *v < 0.0 || *v > 1e9)
            {
                return bad(format!(
                    "pricing.\"{name}\": prices must be finite, not negative, at most 1e9"
                ));
            }
            if p.max_output_tokens == Some(0) {
                return bad(format!(
                    "pricing.\"{name}\".max_output_tokens must be above 0"
                ));
            }
        }
        if self.pricing_policy.default_max_output_tokens == 0 {
            return bad("pricing_policy.default_max_output_tokens must be above 0".into());
        }
        if self.budgets.reservation_ttl_secs == 0 || self.budgets.sweep_interval_secs == 0 {
            return bad(
                "budgets.reservation_ttl_secs and budgets.sweep_interval_secs must be above 0"
                    .into(),
            );
        }
        for (name, st) in &self.service_types {
            if let Some(b) = &st.budget {
                b.validate(&format!("service_types.{name}.budget"))
                    .map_err(ConfigError::Invalid)?;
            }
            if let Some(r) = &st.rate_limits {
                r.validate(&format!("service_types.{name}.rate_limits"))
                    .map_err(ConfigError::Invalid)?;
            }
        }
        let mut static_seen = std::collections::HashSet::new();
        for (i, k) in self.auth.static_keys.iter().enumerate() {
            if k.user.trim().is_empty() {
                return bad(format!("auth.static_keys[{i}].user is empty"));
            }
            if k.key.len() < 8 {
                return bad(format!(
                    "auth.static_keys[{i}].key is shorter than 8 characters"
                ));
            }
            if !static_seen.insert(&k.key) {
                return bad(format!("auth.static_keys[{i}].key repeats an earlier key"));
            }
        }
        if !self.service_types.is_empty()
            && !self
                .service_types
                .contains_key(&self.server.default_service_type)
        {
            return bad(format!(
                "server.default_service_type {:?} is not a configured service type",
                self.server.default_service_type
            ));
        }
        if !(self.database.url.starts_with("sqlite://")
            || self.database.url.starts_with("postgres://")
            || self.database.url.starts_with("postgresql://"))
        {
            return bad("database.url must start with sqlite:// or postgres://".into());
        }
        Ok(())
    }

    /// What is valid but probably not meant: models named in alias chains or providers' model
    /// lists that have no `[pricing]` (they are free, or refused with
    /// `pricing_policy.unpriced = "refuse"`, and budgets do not see them).
    pub fn warnings(&self) -> Vec<String> {
        let mut named = std::collections::BTreeMap::<String, String>::new();
        for (alias, a) in &self.aliases {
            for entry in &a.chain {
                named
                    .entry(entry.clone())
                    .or_insert_with(|| format!("aliases.{alias}.chain"));
            }
        }
        for (name, p) in &self.providers {
            for m in p.models.iter().flatten() {
                named
                    .entry(format!("{name}/{m}"))
                    .or_insert_with(|| format!("providers.{name}.models"));
            }
        }
        let effect = match self.pricing_policy.unpriced {
            UnpricedPolicy::Free => "it is free and budgets do not count it",
            UnpricedPolicy::Refuse => "requests to it are refused (pricing_policy.unpriced)",
        };
        named
            .into_iter()
            .filter(|(model, _)| !self.pricing.contains_key(model))
            .map(|(model, at)| format!("{at}: {model:?} has no [pricing.\"{model}\"]; {effect}"))
            .collect()
    }

    fn check_model_ref(&self, key: &str, entry: &str) -> Result<(), ConfigError> {
        match entry.split_once('/') {
            Some((provider, model)) if !model.is_empty() => {
                let Some(p) = self.providers.get(provider) else {
                    return Err(ConfigError::Invalid(format!(
                        "{key}: {entry:?} names provider {provider:?}, which is not configured"
                    )));
                };
                if let Some(models) = &p.models {
                    if !models.iter().any(|m| m == model) {
                        return Err(ConfigError::Invalid(format!(
                            "{key}: {entry:?} is not in providers.{provider}.models"
                        )));
                    }
                }
                Ok(())
            }
            _ => Err(ConfigError::Invalid(format!(
                "{key}: {entry:?} is not of the form provider/model"
            ))),
        }
    }

    /// The service types, with an implicit permissive `default` when none are configured.
    pub fn service_type(&self, name: &str) -> Option<ServiceTypeConfig> {
        if self.service_types.is_empty() && name == self.server.default_service_type {
            return Some(ServiceTypeConfig::default());
        }
        self.service_types.get(name).cloned()
    }
}

/// Replaces `${VAR}` with the environment's value. Comment lines are left alone so that
/// commented-out examples do not demand variables.
fn interpolate(text: &str) -> Result<String, ConfigError> {
    let mut out = String::with_capacity(text.len());
    for (i, line) in text.split_inclusive('\n').enumerate() {
        if line.trim_start().starts_with('#') {
            out.push_str(line);
            continue;
        }
        let mut rest = line;
        while let Some(start) = rest.find("${") {
            out.push_str(&rest[..start]);
            let after = &rest[start + 2..];
            let Some(end) = after.find('}') else {
                out.push_str(&rest[start..]);
                rest = "";
                break;
            };
            let var = &after[..end];
            let value = std::env::var(var).map_err(|_| ConfigError::MissingEnv {
                line: i + 1,
                var: var.to_string(),
            })?;
            // Escape so that a value can never break out of its TOML string.
            for c in value.chars() {
                match c {
                    '"' => out.push_str("\\\""),
                    '\\' => out.push_str("\\\\"),
                    '\n' => out.push_str("\\n"),
                    c => out.push(c),
                }
            }
            rest = &after[end + 1..];
        }
        out.push_str(rest);
    }
    Ok(out)
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

fn describe_toml_error(text: &str, e: &toml::de::Error) -> String {
    let line = e.span().map(|s| line_of(text, s.start));
    match line {
        Some(line) => format!("line {line}: {}", e.message().trim()),
        None => e.message().trim().to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_key_is_named_with_its_line() {
        let err = Config::from_toml_str("[server]\nhttp_addr = \"127.0.0.1:1\"\nbogus_key = 1\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("line 3"), "{err}");
        assert!(err.contains("bogus_key"), "{err}");
    }

    #[test]
    fn env_is_interpolated_and_escaped() {
        std::env::set_var("TG_TEST_SECRET_X", "a\"b");
        let c = Config::from_toml_str(
            "[server]\nadmin_token = \"${TG_TEST_SECRET_X}\"\n# keys = [\"${NOT_SET_ANYWHERE}\"]\n",
        )
        .unwrap();
        assert_eq!(c.server.admin_token.as_deref(), Some("a\"b"));
    }

    #[test]
    fn missing_env_names_variable_and_line() {
        let err = Config::from_toml_str("[server]\nadmin_token = \"${TG_SURELY_UNSET_VAR}\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("line 2") && err.contains("TG_SURELY_UNSET_VAR"),
            "{err}"
        );
    }

    #[test]
    fn alias_must_name_configured_provider() {
        let err = Config::from_toml_str("[aliases.fast]\nchain = [\"nope/x\"]\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("nope"), "{err}");
    }

    #[test]
    fn a_bad_budget_period_is_refused_at_its_line() {
        let err = Config::from_toml_str(
            "[service_types.default]\nbudget = { limit_usd = 1.0, period = \"yearly\" }\n",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("line 2"), "{err}");
        assert!(err.contains("\"yearly\" is not a period"), "{err}");
        let c = Config::from_toml_str(
            "[service_types.default]\nbudget = { limit_usd = 1.0, period = \"12h\" }\n",
        )
        .unwrap();
        let budget = c.service_types["default"].budget.as_ref().map(|b| b.period);
        assert_eq!(budget, Some(Period::Every(12 * 3_600_000)));
    }

    #[test]
    fn duplicate_upstream_keys_are_refused() {
        let err = Config::from_toml_str(
            "[providers.o]\nkind = \"openai\"\nbase_url = \"http://x\"\nkeys = [\"k1\", \"k1\"]\n",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("repeats"), "{err}");
        assert!(!err.contains("k1\""), "key must not be echoed: {err}");
    }

    #[test]
    fn provider_kinds_validate_into_their_settings() {
        let c = Config::from_toml_str(
            "[providers.c]\nkind = \"anthropic\"\nkeys = [\"k\"]\nmodel_max_tokens = { big = 8192 }\n\
             [providers.m]\nkind = \"mock\"\ntokens = 3\n",
        )
        .unwrap();
        match &c.providers["c"].settings {
            ProviderSettings::Anthropic(a) => {
                assert_eq!(a.http.base_url, "https://api.anthropic.com");
                assert_eq!(a.anthropic_version, "2023-06-01");
                assert_eq!(a.max_tokens_for("big"), 8192);
                assert_eq!(a.max_tokens_for("other"), 4096);
            }
            _ => panic!("not anthropic"),
        }
        assert!(matches!(&c.providers["m"].settings, ProviderSettings::Mock(m) if m.tokens == 3));
    }

    #[test]
    fn fields_of_another_kind_are_refused_with_their_line() {
        let err = Config::from_toml_str(
            "[providers.o]\nkind = \"openai\"\nbase_url = \"http://x\"\ntokens = 4\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("`tokens` applies only to kind \"mock\""),
            "{err}"
        );
        assert!(err.contains("line "), "{err}");
        let err = Config::from_toml_str("[providers.m]\nkind = \"mock\"\nkeys = [\"k\"]\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("`keys`"), "{err}");
        let err = Config::from_toml_str("[providers.o]\nkind = \"openai\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("base_url is required"), "{err}");
    }
}
