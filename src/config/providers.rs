//! `[providers.NAME]`: which kind of upstream, its models, and the settings of that kind,
//! validated into typed values at load (a key of another kind is refused with its line).

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;

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

/// `max_response_bytes` when the config names none: 32 MiB, far above any real answer.
pub const DEFAULT_MAX_RESPONSE_BYTES: u64 = 32 << 20;

/// Default of `max_idle_connections`: enough warm connections for a busy replica, few enough
/// that the memory a burst of hundreds of concurrent streams took is given back when it ends
/// (an idle pooled connection keeps its buffers until `pool_idle_timeout_secs`).
pub const DEFAULT_MAX_IDLE_CONNECTIONS: u64 = 128;

/// Default of `pool_idle_timeout_secs`: what common HTTP clients keep an unused connection for.
pub const DEFAULT_POOL_IDLE_TIMEOUT_SECS: u64 = 90;

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
    /// The most bytes read of one non-streamed answer or one SSE event; past it the call is
    /// `upstream_error` and the connection is dropped, so a hostile upstream cannot fill memory.
    pub max_response_bytes: u64,
    /// How long a key rests after a 429 that names no Retry-After.
    pub rate_limit_cooldown_secs: u64,
    /// When set, 401/403 rest a key this long instead of disabling it until an operator acts.
    pub auth_failure_cooldown_secs: Option<u64>,
    /// Idle pooled connections kept open to this upstream; one returned past it is closed.
    pub max_idle_connections: usize,
    /// How long a pooled connection may sit unused before it is closed (and its buffers freed).
    pub pool_idle_timeout: Duration,
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
    max_response_bytes: Option<u64>,
    rate_limit_cooldown_secs: Option<u64>,
    auth_failure_cooldown_secs: Option<u64>,
    max_idle_connections: Option<u64>,
    pool_idle_timeout_secs: Option<u64>,
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
                max_response_bytes: r.max_response_bytes.unwrap_or(DEFAULT_MAX_RESPONSE_BYTES),
                rate_limit_cooldown_secs: r.rate_limit_cooldown_secs.unwrap_or(60),
                auth_failure_cooldown_secs: r.auth_failure_cooldown_secs,
                max_idle_connections: usize::try_from(
                    r.max_idle_connections
                        .unwrap_or(DEFAULT_MAX_IDLE_CONNECTIONS),
                )
                .unwrap_or(usize::MAX),
                pool_idle_timeout: Duration::from_secs(
                    r.pool_idle_timeout_secs
                        .unwrap_or(DEFAULT_POOL_IDLE_TIMEOUT_SECS)
                        .max(1),
                ),
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
                    ("max_response_bytes", r.max_response_bytes.is_some()),
                    (
                        "rate_limit_cooldown_secs",
                        r.rate_limit_cooldown_secs.is_some(),
                    ),
                    (
                        "auth_failure_cooldown_secs",
                        r.auth_failure_cooldown_secs.is_some(),
                    ),
                    ("max_idle_connections", r.max_idle_connections.is_some()),
                    ("pool_idle_timeout_secs", r.pool_idle_timeout_secs.is_some()),
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
