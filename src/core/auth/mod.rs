//! Credential verification. Virtual API keys (`tg-...`) are looked up by their SHA-256; a
//! verified key is cached briefly so that the store is not asked on every request.

use std::collections::HashMap;
use std::sync::RwLock;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use super::{Reason, Rejection};
use crate::store::{now_ms, KeyOwner, Store};

/// The prefix of every tollgate API key.
pub const KEY_PREFIX: &str = "tg-";

/// How a caller proved who they are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMethod {
    /// A key created through the admin API or CLI.
    ApiKey,
    /// A key declared in the configuration file.
    StaticKey,
}

impl AuthMethod {
    /// The label and wire value.
    pub fn as_str(self) -> &'static str {
        match self {
            AuthMethod::ApiKey => "api_key",
            AuthMethod::StaticKey => "static_key",
        }
    }
}

/// Who is calling, once verified.
#[derive(Debug, Clone)]
pub struct Identity {
    pub user_id: i64,
    pub external_id: String,
    pub method: AuthMethod,
    pub key_id: Option<i64>,
    pub blocked: bool,
    pub user_service_type: Option<String>,
}

/// SHA-256 of a key, hex-encoded: the only form in which keys are stored.
pub fn hash_key(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

/// The masked form of a key shown in listings: prefix and last four characters.
pub fn key_hint(key: &str) -> String {
    let tail: String = key
        .chars()
        .rev()
        .take(4)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    format!("{KEY_PREFIX}...{tail}")
}

/// Verifies credentials against the store, with a short-lived cache of verified keys.
pub struct Authenticator {
    store: Store,
    ttl: Duration,
    cache: RwLock<HashMap<String, (Identity, Instant)>>,
}

impl Authenticator {
    /// An authenticator over `store` caching verified keys for `ttl` (zero disables the cache).
    pub fn new(store: Store, ttl: Duration) -> Self {
        Self {
            store,
            ttl,
            cache: RwLock::new(HashMap::new()),
        }
    }

    /// Verifies an `authorization` value.
    pub async fn verify(&self, authorization: Option<&str>) -> Result<Identity, Rejection> {
        let Some(raw) = authorization else {
            return Err(Rejection::new(
                Reason::AuthRejected,
                "missing credential: send Authorization: Bearer <key>",
            ));
        };
        let token = match raw.split_once(' ') {
            Some((scheme, token))
                if scheme.eq_ignore_ascii_case("bearer") && !token.trim().is_empty() =>
            {
                token.trim()
            }
            _ => {
                return Err(Rejection::new(
                    Reason::InvalidAuthRequest,
                    "malformed Authorization header: expected `Bearer <credential>`",
                ))
            }
        };
        if token.starts_with(KEY_PREFIX) {
            return self.verify_key(token).await;
        }
        Err(Rejection::new(Reason::AuthRejected, "unknown credential"))
    }

    async fn verify_key(&self, key: &str) -> Result<Identity, Rejection> {
        let hash = hash_key(key);
        if !self.ttl.is_zero() {
            if let Some((identity, at)) = self.cache.read().ok().and_then(|c| c.get(&hash).cloned())
            {
                if at.elapsed() < self.ttl {
                    return Ok(identity);
                }
            }
        }
        let found = self.store.find_key_by_hash(&hash).await.map_err(|e| {
            tracing::warn!(error = %e, "key lookup failed");
            Rejection::new(
                Reason::AuthSystemFailure,
                "the credential store is unavailable",
            )
        })?;
        let Some(KeyOwner { key, user }) = found else {
            return Err(Rejection::new(Reason::AuthRejected, "unknown API key"));
        };
        if key.revoked_at.is_some() {
            return Err(Rejection::new(
                Reason::AuthRejected,
                "the API key was revoked",
            ));
        }
        if key.expires_at.is_some_and(|t| t <= now_ms()) {
            return Err(Rejection::new(
                Reason::AuthRejected,
                "the API key has expired",
            ));
        }
        let identity = Identity {
            user_id: user.id,
            external_id: user.external_id,
            method: if key.source == "config" {
                AuthMethod::StaticKey
            } else {
                AuthMethod::ApiKey
            },
            key_id: Some(key.id),
            blocked: user.blocked,
            user_service_type: user.service_type,
        };
        if !self.ttl.is_zero() {
            if let Ok(mut c) = self.cache.write() {
                // Bound the cache: a flood of distinct valid keys cannot grow it without limit.
                if c.len() > 100_000 {
                    c.clear();
                }
                c.insert(hash, (identity.clone(), Instant::now()));
            }
        }
        Ok(identity)
    }

    /// Forgets cached verifications (after a revocation in this process).
    pub fn forget_all(&self) {
        if let Ok(mut c) = self.cache.write() {
            c.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hint_and_hash() {
        assert_eq!(key_hint("tg-abcdef123456"), "tg-...3456");
        assert_eq!(hash_key("x").len(), 64);
    }
}
