//! Reading a configuration: the file, `${ENV}` interpolation, overrides, and validation that
//! names the bad key and its line.

use std::net::SocketAddr;
use std::path::Path;

/// The smallest `server.max_header_bytes`: the HTTP/1 parser needs a buffer this large.
const MIN_HEADER_BYTES: usize = 8192;

use super::*;

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
        if self.server.header_read_timeout_ms == 0 || self.server.body_read_timeout_ms == 0 {
            return bad(
                "server.header_read_timeout_ms and body_read_timeout_ms must be above 0".into(),
            );
        }
        if self.server.max_header_bytes < MIN_HEADER_BYTES {
            return bad(format!(
                "server.max_header_bytes must be at least {MIN_HEADER_BYTES}"
            ));
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
            if http.max_response_bytes < 1024 {
                return bad(format!(
                    "providers.{name}.max_response_bytes must be at least 1024"
                ));
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
