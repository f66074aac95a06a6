//! Reading a configuration: the file, `${ENV}` interpolation, overrides, and validation that
//! names the bad key and its line.

use std::net::SocketAddr;
use std::path::Path;

use super::check::{check_text, did_you_mean, ConfigProblem, KeyPath};
use super::*;

/// The smallest `server.max_header_bytes`: the HTTP/1 parser needs a buffer this large.
const MIN_HEADER_BYTES: usize = 8192;

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
    /// Fails with every problem of the text, each naming its line and dotted key.
    pub fn from_toml_str(text: &str) -> Result<Config, ConfigError> {
        check_text(text).map_err(ConfigError::Problems)
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

    /// Checks what serde cannot: references between sections and sane values. Fails with
    /// every problem found.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let problems = self.problems();
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Problems(problems))
        }
    }

    /// Every inconsistency serde cannot see, each with its key (lines are filled in by the
    /// file check, which knows where the keys are).
    pub fn problems(&self) -> Vec<ConfigProblem> {
        let mut out = Vec::new();
        let mut bad = |key: KeyPath, message: String| out.push(ConfigProblem::at(key, message));
        let top = |name: &str| KeyPath::root().key(name);
        if self.routing.unhealthy_after_failures == 0 {
            bad(
                top("routing").key("unhealthy_after_failures"),
                "must be at least 1".into(),
            );
        }
        if self.server.header_read_timeout_ms == 0 {
            bad(
                top("server").key("header_read_timeout_ms"),
                "must be above 0".into(),
            );
        }
        if self.server.body_read_timeout_ms == 0 {
            bad(
                top("server").key("body_read_timeout_ms"),
                "must be above 0".into(),
            );
        }
        if self.server.max_header_bytes < MIN_HEADER_BYTES {
            bad(
                top("server").key("max_header_bytes"),
                format!("must be at least {MIN_HEADER_BYTES}"),
            );
        }
        if self.server.max_body_bytes == 0 {
            bad(
                top("server").key("max_body_bytes"),
                "must be above 0".into(),
            );
        }
        if let Some(endpoint) = &self.telemetry.otlp_endpoint {
            // Not echoed: an endpoint may carry credentials.
            let ok = reqwest::Url::parse(endpoint)
                .is_ok_and(|u| matches!(u.scheme(), "http" | "https") && u.has_host());
            if !ok {
                bad(
                    top("telemetry").key("otlp_endpoint"),
                    "must be an http:// or https:// URL".into(),
                );
            }
        }
        if let RateLimitBackendConfig::Redis(r) = &self.rate_limits.backend {
            if !r.url_scheme_ok() {
                bad(
                    top("rate_limits").key("redis_url"),
                    "must start with redis:// (or redis+unix:// for a socket)".into(),
                );
            }
        }
        for (key, n) in [
            ("max_queue_spans", self.telemetry.max_queue_spans),
            ("max_batch_spans", self.telemetry.max_batch_spans),
        ] {
            if n == 0 {
                bad(top("telemetry").key(key), "must be above 0".into());
            }
        }
        for (name, p) in &self.providers {
            let at = top("providers").key(name);
            if name.is_empty() || name.contains('/') {
                bad(
                    at.clone(),
                    "a provider name may not be empty or contain '/'".into(),
                );
            }
            let mut seen = std::collections::HashSet::new();
            let Some(http) = p.http() else { continue };
            for (i, k) in http.keys.iter().enumerate() {
                let key = at.clone().key("keys").index(i);
                if k.trim().is_empty() {
                    bad(key, "is empty".into());
                } else if !seen.insert(k) {
                    bad(key, "repeats an earlier key".into());
                }
            }
            if http.total_timeout_ms == 0 || http.connect_timeout_ms == 0 {
                bad(at.clone(), "timeouts must be above 0".into());
            }
            if http.max_response_bytes < 1024 {
                bad(at.key("max_response_bytes"), "must be at least 1024".into());
            }
        }
        for (alias, a) in &self.aliases {
            let at = top("aliases").key(alias);
            if alias.contains('/') {
                bad(at.clone(), "an alias name may not contain '/'".into());
            }
            let chain = at.key("chain");
            if a.chain.is_empty() {
                bad(
                    chain.clone(),
                    "must name at least one provider/model".into(),
                );
            }
            for (i, entry) in a.chain.iter().enumerate() {
                if let Err(m) = self.check_model_ref(entry) {
                    bad(chain.clone().index(i), m);
                }
            }
        }
        for (name, p) in &self.pricing {
            let at = top("pricing").key(name);
            if let Err(m) = self.check_model_ref(name) {
                bad(at.clone(), m);
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
                bad(
                    at.clone(),
                    "prices must be finite, not negative, at most 1e9".into(),
                );
            }
            if p.max_output_tokens == Some(0) {
                bad(at.key("max_output_tokens"), "must be above 0".into());
            }
        }
        if self.pricing_policy.default_max_output_tokens == 0 {
            bad(
                top("pricing_policy").key("default_max_output_tokens"),
                "must be above 0".into(),
            );
        }
        if self.budgets.reservation_ttl_secs == 0 {
            bad(
                top("budgets").key("reservation_ttl_secs"),
                "must be above 0".into(),
            );
        }
        if self.budgets.sweep_interval_secs == 0 {
            bad(
                top("budgets").key("sweep_interval_secs"),
                "must be above 0".into(),
            );
        }
        for (name, st) in &self.service_types {
            let at = top("service_types").key(name);
            if let Some(b) = &st.budget {
                if let Err(m) = b.validate(&format!("service_types.{name}.budget")) {
                    bad(at.clone().key("budget"), m);
                }
            }
            if let Some(r) = &st.rate_limits {
                if let Err(m) = r.validate(&format!("service_types.{name}.rate_limits")) {
                    bad(at.clone().key("rate_limits"), m);
                }
            }
        }
        let mut static_seen = std::collections::HashSet::new();
        for (i, k) in self.auth.static_keys.iter().enumerate() {
            let at = top("auth").key("static_keys").index(i);
            if k.user.trim().is_empty() {
                bad(at.clone().key("user"), "is empty".into());
            }
            if k.key.len() < 8 {
                bad(at.key("key"), "is shorter than 8 characters".into());
            } else if !static_seen.insert(&k.key) {
                bad(at.key("key"), "repeats an earlier key".into());
            }
        }
        if !self.service_types.is_empty()
            && !self
                .service_types
                .contains_key(&self.server.default_service_type)
        {
            bad(
                top("server").key("default_service_type"),
                format!(
                    "{:?} is not a configured service type",
                    self.server.default_service_type
                ),
            );
        }
        if !(self.database.url.starts_with("sqlite://")
            || self.database.url.starts_with("postgres://")
            || self.database.url.starts_with("postgresql://"))
        {
            bad(
                top("database").key("url"),
                "must start with sqlite:// or postgres://".into(),
            );
        }
        out
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

    /// Why `entry` does not name a configured `provider/model`, if it does not.
    fn check_model_ref(&self, entry: &str) -> Result<(), String> {
        match entry.split_once('/') {
            Some((provider, model)) if !model.is_empty() => {
                let Some(p) = self.providers.get(provider) else {
                    let known: Vec<&str> = self.providers.keys().map(String::as_str).collect();
                    let hint = did_you_mean(provider, &known)
                        .map(|near| format!("; did you mean `{near}`?"))
                        .unwrap_or_default();
                    return Err(format!(
                        "{entry:?} names provider {provider:?}, which is not configured{hint}"
                    ));
                };
                if let Some(models) = &p.models {
                    if !models.iter().any(|m| m == model) {
                        return Err(format!("{entry:?} is not in providers.{provider}.models"));
                    }
                }
                Ok(())
            }
            // Chains hold concrete models only, so aliases cannot form cycles.
            _ if self.aliases.contains_key(entry) => Err(format!(
                "{entry:?} is an alias; a chain lists provider/model entries, not aliases"
            )),
            _ => Err(format!("{entry:?} is not of the form provider/model")),
        }
    }

    /// The service types, with an implicit permissive `default` when none are configured.
    pub fn service_type(&self, name: &str) -> Option<&ServiceTypeConfig> {
        // Borrowed, not cloned: this is read on every request.
        static IMPLICIT: std::sync::LazyLock<ServiceTypeConfig> =
            std::sync::LazyLock::new(ServiceTypeConfig::default);
        if self.service_types.is_empty() && name == self.server.default_service_type {
            return Some(&IMPLICIT);
        }
        self.service_types.get(name)
    }
}

/// Replaces `${VAR}` with the environment's value. Comment lines are left alone so that
/// commented-out examples do not demand variables. A variable that is not set is left as
/// written and returned with its line, so that the rest of the file can still be checked.
pub(super) fn interpolate(text: &str) -> (String, Vec<(usize, String)>) {
    let mut out = String::with_capacity(text.len());
    let mut missing = Vec::new();
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
            match std::env::var(var) {
                // Escaped so that a value can never break out of its TOML string, nor add a
                // line (lines of the interpolated text are the file's lines).
                Ok(value) => {
                    for c in value.chars() {
                        match c {
                            '"' => out.push_str("\\\""),
                            '\\' => out.push_str("\\\\"),
                            '\n' => out.push_str("\\n"),
                            '\r' => out.push_str("\\r"),
                            c => out.push(c),
                        }
                    }
                }
                Err(_) => {
                    out.push_str(&rest[start..start + 2 + end + 1]);
                    missing.push((i + 1, var.to_string()));
                }
            }
            rest = &after[end + 1..];
        }
        out.push_str(rest);
    }
    (out, missing)
}
