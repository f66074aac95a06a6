//! OIDC JWT bearer tokens, verified against the issuer's JWKS.
//!
//! The key set is fetched over HTTP and cached for `jwks_cache_secs`. A token naming a `kid`
//! the cached set lacks causes a refresh, at most once per `jwks_min_refresh_secs`; concurrent
//! requests share one in-flight fetch. A failed refresh keeps the last good set.
//!
//! Failures of the JWKS endpoint are `Unavailable` only when no usable key set is known for the
//! token at hand; everything wrong with the token itself is `Rejected`. Messages never quote the
//! token.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::Value;

use super::verified::{fetch_body, numeric_secs, VerifiedToken, VerifyError};
use crate::clock::Clock;
use crate::config::JwtConfig;

/// Tokens longer than this are rejected before any parsing.
const MAX_TOKEN_LEN: usize = 16 * 1024;
/// The largest JWKS document accepted.
const MAX_JWKS_BYTES: usize = 1024 * 1024;

/// Whether `token` has the shape of a JWS compact serialization: three dot-separated base64url
/// segments, the first two non-empty. Says nothing about validity.
pub fn looks_like_jwt(token: &str) -> bool {
    let mut parts = token.split('.');
    let (Some(h), Some(p), Some(s), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return false;
    };
    let b64url = |seg: &str| {
        seg.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    };
    !h.is_empty() && !p.is_empty() && b64url(h) && b64url(p) && b64url(s)
}

/// The kind of public key a JWK holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KeyKind {
    Rsa,
    EcP256,
    EcP384,
}

/// One usable signature-verification key from the JWKS.
#[derive(Clone)]
struct Key {
    kid: Option<String>,
    alg: Option<Algorithm>,
    kind: KeyKind,
    key: DecodingKey,
}

impl Key {
    /// Whether a token signed with `alg` may be checked with this key.
    fn fits(&self, alg: Algorithm) -> bool {
        if self.alg.is_some_and(|a| a != alg) {
            return false;
        }
        matches!(
            (self.kind, alg),
            (
                KeyKind::Rsa,
                Algorithm::RS256
                    | Algorithm::RS384
                    | Algorithm::RS512
                    | Algorithm::PS256
                    | Algorithm::PS384
                    | Algorithm::PS512
            ) | (KeyKind::EcP256, Algorithm::ES256)
                | (KeyKind::EcP384, Algorithm::ES384)
        )
    }
}

/// A fetched key set.
struct KeySet {
    keys: Vec<Key>,
    fetched_at_ms: i64,
}

impl KeySet {
    fn has_kid(&self, kid: &str) -> bool {
        self.keys.iter().any(|k| k.kid.as_deref() == Some(kid))
    }
}

/// The signature algorithms accepted; `none`, HS* and anything else are refused.
fn parse_alg(alg: &str) -> Option<Algorithm> {
    Some(match alg {
        "RS256" => Algorithm::RS256,
        "RS384" => Algorithm::RS384,
        "RS512" => Algorithm::RS512,
        "PS256" => Algorithm::PS256,
        "PS384" => Algorithm::PS384,
        "PS512" => Algorithm::PS512,
        "ES256" => Algorithm::ES256,
        "ES384" => Algorithm::ES384,
        _ => return None,
    })
}

/// One JWK as published; anything unusable for signature verification is skipped.
fn parse_jwk(v: &Value) -> Option<Key> {
    let s = |name: &str| v.get(name).and_then(Value::as_str);
    if s("use").is_some_and(|u| u != "sig") {
        return None;
    }
    let alg = match s("alg") {
        Some(a) => Some(parse_alg(a)?),
        None => None,
    };
    let (kind, key) = match s("kty")? {
        "RSA" => (
            KeyKind::Rsa,
            DecodingKey::from_rsa_components(s("n")?, s("e")?).ok()?,
        ),
        "EC" => {
            let (kind, len) = match s("crv")? {
                "P-256" => (KeyKind::EcP256, 32),
                "P-384" => (KeyKind::EcP384, 48),
                _ => return None,
            };
            let (x, y) = (s("x")?, s("y")?);
            let ok_len = |c: &str| URL_SAFE_NO_PAD.decode(c).is_ok_and(|b| b.len() == len);
            if !ok_len(x) || !ok_len(y) {
                return None;
            }
            (kind, DecodingKey::from_ec_components(x, y).ok()?)
        }
        _ => return None,
    };
    Some(Key {
        kid: s("kid").map(str::to_owned),
        alg,
        kind,
        key,
    })
}

/// A JWKS document: `{"keys": [...]}` with at least one usable key.
fn parse_jwks(body: &[u8]) -> Result<Vec<Key>, &'static str> {
    let doc: Value =
        serde_json::from_slice(body).map_err(|_| "returned a body that is not JSON")?;
    let keys = doc
        .get("keys")
        .and_then(Value::as_array)
        .ok_or("returned JSON without a `keys` array")?;
    let keys: Vec<Key> = keys.iter().filter_map(parse_jwk).collect();
    if keys.is_empty() {
        return Err("returned no usable signing key");
    }
    Ok(keys)
}

/// The fields of a JOSE header tollgate looks at.
struct TokenHeader {
    alg: Algorithm,
    kid: Option<String>,
}

fn parse_header(token: &str) -> Result<TokenHeader, VerifyError> {
    let malformed = || VerifyError::rejected("malformed JWT");
    if token.len() > MAX_TOKEN_LEN {
        return Err(VerifyError::rejected("the JWT is too large"));
    }
    if !looks_like_jwt(token) {
        return Err(malformed());
    }
    let segment = token.split('.').next().ok_or_else(malformed)?;
    let raw = URL_SAFE_NO_PAD.decode(segment).map_err(|_| malformed())?;
    let header: Value = serde_json::from_slice(&raw).map_err(|_| malformed())?;
    let alg = header
        .get("alg")
        .and_then(Value::as_str)
        .ok_or_else(malformed)?;
    let alg = parse_alg(alg).ok_or_else(|| {
        // The alg is one of a few well-known names or junk; do not echo junk.
        let shown = match alg {
            "none" | "HS256" | "HS384" | "HS512" | "EdDSA" => alg,
            _ => "this",
        };
        VerifyError::Rejected(format!("JWT signature algorithm {shown} is not accepted"))
    })?;
    let kid = match header.get("kid") {
        None => None,
        Some(Value::String(k)) => Some(k.clone()),
        Some(_) => return Err(malformed()),
    };
    Ok(TokenHeader { alg, kid })
}

/// The key-set cache shared by all requests.
#[derive(Default)]
struct CacheState {
    /// The last key set fetched successfully.
    set: Option<Arc<KeySet>>,
    /// Fetch attempts so far; a request that waited for the fetch lock compares it to learn
    /// whether another request fetched meanwhile.
    attempts: u64,
    /// When the last fetch attempt ended.
    last_attempt_ms: Option<i64>,
    /// When the last fetch caused by an unknown `kid` ended.
    last_kid_refresh_ms: Option<i64>,
    /// Why the last attempt failed; `None` when it succeeded.
    last_error: Option<String>,
}

/// Why a request wants the key set fetched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FetchCause {
    /// No key set yet.
    Missing,
    /// The cached set is older than `jwks_cache_secs`.
    Stale,
    /// The token names a `kid` the cached set lacks.
    UnknownKid,
}

/// Verifies JWTs against a JWKS.
pub struct JwtVerifier {
    jwks_url: String,
    issuer: String,
    audience: String,
    leeway_secs: i64,
    cache_ms: i64,
    min_refresh_ms: i64,
    timeout: Duration,
    service_type_claim: Option<String>,
    http: reqwest::Client,
    clock: Clock,
    state: Mutex<CacheState>,
    /// Held while fetching: concurrent requests share one fetch.
    fetch_lock: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for JwtVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtVerifier")
            .field("jwks_url", &self.jwks_url)
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .finish_non_exhaustive()
    }
}

impl JwtVerifier {
    /// A verifier for `cfg`, fetching keys with `http` and reading time from `clock`. Nothing
    /// is fetched until the first token arrives.
    pub fn new(cfg: &JwtConfig, http: reqwest::Client, clock: Clock) -> Self {
        let secs_ms = |s: u64| i64::try_from(s.saturating_mul(1000)).unwrap_or(i64::MAX);
        Self {
            jwks_url: cfg.jwks_url.clone(),
            issuer: cfg.issuer.clone(),
            audience: cfg.audience.clone(),
            leeway_secs: i64::try_from(cfg.leeway_secs).unwrap_or(i64::MAX / 2),
            cache_ms: secs_ms(cfg.jwks_cache_secs),
            min_refresh_ms: secs_ms(cfg.jwks_min_refresh_secs),
            timeout: Duration::from_millis(cfg.timeout_ms),
            service_type_claim: cfg.service_type_claim.clone(),
            http,
            clock,
            state: Mutex::new(CacheState::default()),
            fetch_lock: tokio::sync::Mutex::new(()),
        }
    }

    /// Verifies a JWT: signature against the JWKS, `iss`, `aud`, `exp`, `nbf` and `sub`.
    pub async fn verify(&self, token: &str) -> Result<VerifiedToken, VerifyError> {
        let header = parse_header(token)?;
        let set = self.key_set_for(header.kid.as_deref()).await?;
        let candidates: Vec<&Key> = set
            .keys
            .iter()
            .filter(|k| match header.kid.as_deref() {
                Some(kid) => k.kid.as_deref() == Some(kid),
                None => true,
            })
            .collect();
        if candidates.is_empty() {
            return Err(VerifyError::rejected("the JWT's signing key is unknown"));
        }
        let fitting: Vec<&Key> = candidates
            .into_iter()
            .filter(|k| k.fits(header.alg))
            .collect();
        if fitting.is_empty() {
            return Err(VerifyError::rejected(
                "the JWT's algorithm does not match its signing key",
            ));
        }
        let mut validation = Validation::new(header.alg);
        // Claims are checked below against tollgate's clock; the library checks the signature.
        validation.required_spec_claims.clear();
        validation.validate_exp = false;
        validation.validate_nbf = false;
        validation.validate_aud = false;
        let mut last = VerifyError::rejected("the JWT signature is invalid");
        for key in fitting {
            match jsonwebtoken::decode::<Value>(token, &key.key, &validation) {
                Ok(data) => return self.check_claims(&data.claims),
                Err(e) => {
                    use jsonwebtoken::errors::ErrorKind as K;
                    last = match e.kind() {
                        K::InvalidSignature => {
                            VerifyError::rejected("the JWT signature is invalid")
                        }
                        K::InvalidAlgorithm => VerifyError::rejected(
                            "the JWT's algorithm does not match its signing key",
                        ),
                        _ => VerifyError::rejected("malformed JWT"),
                    };
                }
            }
        }
        Err(last)
    }

    /// Checks the claims of a token whose signature verified.
    fn check_claims(&self, claims: &Value) -> Result<VerifiedToken, VerifyError> {
        let Some(claims) = claims.as_object() else {
            return Err(VerifyError::rejected(
                "malformed JWT: claims are not an object",
            ));
        };
        let now_s = self.clock.now_ms().div_euclid(1000);
        let exp = match claims.get("exp") {
            None => return Err(VerifyError::rejected("the JWT has no `exp` claim")),
            Some(v) => numeric_secs(v)
                .ok_or_else(|| VerifyError::rejected("the JWT's `exp` claim is not a number"))?,
        };
        if now_s > exp.saturating_add(self.leeway_secs) {
            return Err(VerifyError::rejected("the JWT has expired"));
        }
        if let Some(v) = claims.get("nbf") {
            let nbf = numeric_secs(v)
                .ok_or_else(|| VerifyError::rejected("the JWT's `nbf` claim is not a number"))?;
            if nbf > now_s.saturating_add(self.leeway_secs) {
                return Err(VerifyError::rejected("the JWT is not valid yet"));
            }
        }
        let issuer = match claims.get("iss").and_then(Value::as_str) {
            Some(iss) if iss == self.issuer => iss.to_owned(),
            Some(_) => return Err(VerifyError::rejected("the JWT's issuer is not accepted")),
            None => return Err(VerifyError::rejected("the JWT has no `iss` claim")),
        };
        let aud_ok = match claims.get("aud") {
            Some(Value::String(a)) => *a == self.audience,
            Some(Value::Array(list)) => list.iter().any(|a| a.as_str() == Some(&self.audience)),
            _ => false,
        };
        if !aud_ok {
            return Err(VerifyError::rejected(
                "the JWT's audience does not include this service",
            ));
        }
        let subject = match claims.get("sub").and_then(Value::as_str) {
            Some(sub) if !sub.is_empty() => sub.to_owned(),
            _ => return Err(VerifyError::rejected("the JWT has no `sub` claim")),
        };
        let service_type = self
            .service_type_claim
            .as_deref()
            .and_then(|name| claims.get(name))
            .and_then(Value::as_str)
            .map(str::to_owned);
        Ok(VerifiedToken {
            subject,
            issuer,
            service_type,
            expires_at_ms: Some(exp.saturating_mul(1000)),
        })
    }

    fn lock_state(&self) -> std::sync::MutexGuard<'_, CacheState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The key set to check a token naming `kid` against, fetching it first when needed.
    async fn key_set_for(&self, kid: Option<&str>) -> Result<Arc<KeySet>, VerifyError> {
        let (cause, seen_attempts) = {
            let st = self.lock_state();
            (self.fetch_cause(&st, kid), st.attempts)
        };
        if let Some(cause) = cause {
            self.fetch_shared(cause, seen_attempts).await;
        }
        let st = self.lock_state();
        match &st.set {
            None => Err(VerifyError::Unavailable(format!(
                "the JWKS endpoint {}",
                st.last_error.as_deref().unwrap_or("gave no key set")
            ))),
            Some(set) => {
                if let (Some(kid), Some(err)) = (kid, &st.last_error) {
                    if !set.has_kid(kid) {
                        // The token may be signed by a key published since the last good
                        // fetch: whether it is valid cannot be told right now.
                        return Err(VerifyError::Unavailable(format!(
                            "the JWT's signing key is not cached and the JWKS endpoint {err}"
                        )));
                    }
                }
                Ok(set.clone())
            }
        }
    }

    /// Whether (and why) the key set should be fetched before checking a token naming `kid`.
    fn fetch_cause(&self, st: &CacheState, kid: Option<&str>) -> Option<FetchCause> {
        let now = self.clock.now_ms();
        let elapsed = |t: Option<i64>| t.map_or(i64::MAX, |t| now.saturating_sub(t));
        let Some(set) = &st.set else {
            return Some(FetchCause::Missing);
        };
        if now.saturating_sub(set.fetched_at_ms) >= self.cache_ms
            && elapsed(st.last_attempt_ms) >= self.min_refresh_ms
        {
            return Some(FetchCause::Stale);
        }
        match kid {
            Some(kid)
                if !set.has_kid(kid) && elapsed(st.last_kid_refresh_ms) >= self.min_refresh_ms =>
            {
                Some(FetchCause::UnknownKid)
            }
            _ => None,
        }
    }

    /// Fetches the key set unless another request did so while this one waited for the lock.
    async fn fetch_shared(&self, cause: FetchCause, seen_attempts: u64) {
        let _guard = self.fetch_lock.lock().await;
        if self.lock_state().attempts != seen_attempts {
            return;
        }
        let result = self.fetch().await;
        let now = self.clock.now_ms();
        let mut st = self.lock_state();
        st.attempts += 1;
        st.last_attempt_ms = Some(now);
        if cause == FetchCause::UnknownKid {
            st.last_kid_refresh_ms = Some(now);
        }
        match result {
            Ok(keys) => {
                st.set = Some(Arc::new(KeySet {
                    keys,
                    fetched_at_ms: now,
                }));
                st.last_error = None;
            }
            Err(e) => {
                tracing::warn!(url = %self.jwks_url, error = %e, ?cause, "JWKS fetch failed");
                st.last_error = Some(e);
            }
        }
    }

    async fn fetch(&self) -> Result<Vec<Key>, String> {
        let body = fetch_body(
            self.http
                .get(&self.jwks_url)
                .header(reqwest::header::ACCEPT, "application/json"),
            self.timeout,
            MAX_JWKS_BYTES,
        )
        .await
        .map_err(|e| e.to_string())?;
        parse_jwks(&body).map_err(str::to_owned)
    }
}

#[cfg(test)]
mod tests;
