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
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use axum::extract::State;
    use axum::http::StatusCode;
    use axum::response::{IntoResponse, Response};
    use axum::routing::get;
    use axum::Router;
    use jsonwebtoken::{EncodingKey, Header};
    use serde_json::json;

    const RSA_PEM: &str = include_str!("../../../tests/fixtures/jwt/rsa.pem");
    const RSA2_PEM: &str = include_str!("../../../tests/fixtures/jwt/rsa2.pem");
    const EC_PEM: &str = include_str!("../../../tests/fixtures/jwt/ec.pem");
    const JWKS: &str = include_str!("../../../tests/fixtures/jwt/jwks.json");
    const JWKS_ROTATED: &str = include_str!("../../../tests/fixtures/jwt/jwks-rotated.json");

    const ISS: &str = "https://issuer.test";
    const AUD: &str = "tollgate";

    /// What the test JWKS server answers.
    #[derive(Clone)]
    enum Mode {
        Serve(&'static str),
        Status(u16),
        Garbage,
        Stall(Duration),
    }

    struct Jwks {
        hits: AtomicUsize,
        mode: Mutex<Mode>,
    }

    impl Jwks {
        fn set(&self, mode: Mode) {
            *self.mode.lock().unwrap() = mode;
        }
        fn hits(&self) -> usize {
            self.hits.load(Ordering::SeqCst)
        }
    }

    async fn serve_jwks(State(s): State<Arc<Jwks>>) -> Response {
        s.hits.fetch_add(1, Ordering::SeqCst);
        let mode = s.mode.lock().unwrap().clone();
        match mode {
            Mode::Serve(doc) => ([("content-type", "application/json")], doc).into_response(),
            Mode::Status(code) => StatusCode::from_u16(code).unwrap().into_response(),
            Mode::Garbage => "<html>not a key set</html>".into_response(),
            Mode::Stall(d) => {
                tokio::time::sleep(d).await;
                JWKS.into_response()
            }
        }
    }

    /// A JWKS server on a random loopback port, bound before it is returned.
    async fn jwks_server(mode: Mode) -> (String, Arc<Jwks>) {
        let state = Arc::new(Jwks {
            hits: AtomicUsize::new(0),
            mode: Mutex::new(mode),
        });
        let app = Router::new()
            .route("/jwks.json", get(serve_jwks))
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        (format!("http://{addr}/jwks.json"), state)
    }

    /// A URL on a loopback port nothing listens on.
    async fn closed_url() -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        format!("http://{addr}/jwks.json")
    }

    fn cfg(url: &str) -> JwtConfig {
        JwtConfig {
            jwks_url: url.to_owned(),
            issuer: ISS.to_owned(),
            audience: AUD.to_owned(),
            leeway_secs: 30,
            jwks_cache_secs: 3600,
            jwks_min_refresh_secs: 10,
            timeout_ms: 300,
            service_type_claim: Some("svc".to_owned()),
        }
    }

    fn verifier(url: &str) -> (JwtVerifier, Clock) {
        let clock = Clock::system();
        (
            JwtVerifier::new(&cfg(url), reqwest::Client::new(), clock.clone()),
            clock,
        )
    }

    fn pem_der(pem: &str) -> Vec<u8> {
        let b64: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
        base64::engine::general_purpose::STANDARD
            .decode(b64)
            .unwrap()
    }

    fn rsa_key() -> EncodingKey {
        EncodingKey::from_rsa_der(&pem_der(RSA_PEM))
    }
    fn rsa2_key() -> EncodingKey {
        EncodingKey::from_rsa_der(&pem_der(RSA2_PEM))
    }
    fn ec_key() -> EncodingKey {
        EncodingKey::from_ec_der(&pem_der(EC_PEM))
    }

    fn now_s(clock: &Clock) -> i64 {
        clock.now_ms() / 1000
    }

    fn claims(clock: &Clock) -> Value {
        json!({
            "iss": ISS,
            "aud": AUD,
            "sub": "user-1",
            "exp": now_s(clock) + 600,
            "iat": now_s(clock),
            "svc": "batch",
        })
    }

    fn sign(alg: Algorithm, kid: &str, key: &EncodingKey, claims: &Value) -> String {
        let mut h = Header::new(alg);
        h.kid = Some(kid.to_owned());
        jsonwebtoken::encode(&h, claims, key).unwrap()
    }

    fn rs256(clock: &Clock) -> String {
        sign(Algorithm::RS256, "rsa-1", &rsa_key(), &claims(clock))
    }

    /// A token with a hand-written header and claims and the given signature segment.
    fn raw_token(header: Value, claims: &Value, sig: &str) -> String {
        format!(
            "{}.{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string()),
            sig
        )
    }

    fn assert_rejected(r: Result<VerifiedToken, VerifyError>, token: &str) -> String {
        match r {
            Err(VerifyError::Rejected(m)) => {
                assert!(
                    token.is_empty() || !m.contains(token),
                    "message quotes the token: {m}"
                );
                for part in token.split('.').filter(|p| p.len() > 8) {
                    assert!(!m.contains(part), "message quotes part of the token: {m}");
                }
                m
            }
            other => panic!("expected Rejected, got {other:?}"),
        }
    }

    fn assert_unavailable(r: Result<VerifiedToken, VerifyError>) -> String {
        match r {
            Err(VerifyError::Unavailable(m)) => m,
            other => panic!("expected Unavailable, got {other:?}"),
        }
    }

    #[test]
    fn jwt_shape() {
        assert!(looks_like_jwt("eyJh.eyJz.c2ln"));
        assert!(looks_like_jwt("eyJh.eyJz."));
        assert!(!looks_like_jwt("tg-abc"));
        assert!(!looks_like_jwt("a.b"));
        assert!(!looks_like_jwt("a.b.c.d"));
        assert!(!looks_like_jwt(".b.c"));
        assert!(!looks_like_jwt("a+/.b.c"));
        assert!(!looks_like_jwt("a.b=.c"));
    }

    #[tokio::test]
    async fn accepts_rs256_and_es256() {
        let (url, server) = jwks_server(Mode::Serve(JWKS)).await;
        let (v, clock) = verifier(&url);
        let c = claims(&clock);
        let t = v.verify(&rs256(&clock)).await.unwrap();
        assert_eq!(
            t,
            VerifiedToken {
                subject: "user-1".into(),
                issuer: ISS.into(),
                service_type: Some("batch".into()),
                expires_at_ms: Some(c["exp"].as_i64().unwrap() * 1000),
            }
        );
        let es = sign(Algorithm::ES256, "ec-1", &ec_key(), &c);
        assert_eq!(v.verify(&es).await.unwrap().subject, "user-1");
        // The key set was fetched once and then served from the cache.
        assert_eq!(server.hits(), 1);
    }

    #[tokio::test]
    async fn audience_list_and_non_string_service_type() {
        let (url, _server) = jwks_server(Mode::Serve(JWKS)).await;
        let (v, clock) = verifier(&url);
        let mut c = claims(&clock);
        c["aud"] = json!(["other", AUD]);
        c["svc"] = json!(42);
        let t = v
            .verify(&sign(Algorithm::RS256, "rsa-1", &rsa_key(), &c))
            .await
            .unwrap();
        assert_eq!(t.service_type, None);
    }

    #[tokio::test]
    async fn time_claims_honour_leeway() {
        let (url, _server) = jwks_server(Mode::Serve(JWKS)).await;
        let (v, clock) = verifier(&url);
        let now = now_s(&clock);
        let with = |k: &str, val: i64| {
            let mut c = claims(&clock);
            c[k] = json!(val);
            sign(Algorithm::RS256, "rsa-1", &rsa_key(), &c)
        };
        // Expired, but within the 30 s leeway.
        assert!(v.verify(&with("exp", now - 10)).await.is_ok());
        let t = with("exp", now - 60);
        let m = assert_rejected(v.verify(&t).await, &t);
        assert!(m.contains("expired"), "{m}");
        // Not yet valid, within and beyond the leeway.
        assert!(v.verify(&with("nbf", now + 10)).await.is_ok());
        let t = with("nbf", now + 120);
        let m = assert_rejected(v.verify(&t).await, &t);
        assert!(m.contains("not valid yet"), "{m}");
        // A token valid now expires as tollgate's clock moves.
        let t = rs256(&clock);
        assert!(v.verify(&t).await.is_ok());
        clock.advance(Duration::from_secs(600 + 31));
        assert_rejected(v.verify(&t).await, &t);
    }

    #[tokio::test]
    async fn rejects_bad_claims() {
        let (url, _server) = jwks_server(Mode::Serve(JWKS)).await;
        let (v, clock) = verifier(&url);
        let cases: Vec<(&str, Value)> = vec![
            ("issuer", json!({"iss": "https://evil.test"})),
            ("audience", json!({"aud": "someone-else"})),
            ("audience", json!({"aud": ["a", "b"]})),
            ("audience", json!({"aud": null})),
            ("`sub`", json!({"sub": ""})),
            ("`sub`", json!({"sub": null})),
            ("`exp`", json!({"exp": null})),
            ("`exp`", json!({"exp": "tomorrow"})),
            ("`iss`", json!({"iss": null})),
        ];
        for (expect, patch) in cases {
            let mut c = claims(&clock);
            for (k, val) in patch.as_object().unwrap() {
                if val.is_null() {
                    c.as_object_mut().unwrap().remove(k);
                } else {
                    c[k] = val.clone();
                }
            }
            let t = sign(Algorithm::RS256, "rsa-1", &rsa_key(), &c);
            let m = assert_rejected(v.verify(&t).await, &t);
            assert!(m.contains(expect), "{patch}: {m}");
        }
    }

    #[tokio::test]
    async fn rejects_bad_signatures_and_algorithms() {
        let (url, server) = jwks_server(Mode::Serve(JWKS)).await;
        let (v, clock) = verifier(&url);
        let c = claims(&clock);

        // Signed by another key under a known kid.
        let t = sign(Algorithm::RS256, "rsa-1", &rsa2_key(), &c);
        let m = assert_rejected(v.verify(&t).await, &t);
        assert!(m.contains("signature is invalid"), "{m}");

        // A valid token whose claims were altered after signing.
        let good = rs256(&clock);
        let parts: Vec<&str> = good.split('.').collect();
        let mut forged = c.clone();
        forged["sub"] = json!("admin");
        let t = format!(
            "{}.{}.{}",
            parts[0],
            URL_SAFE_NO_PAD.encode(forged.to_string()),
            parts[2]
        );
        assert_rejected(v.verify(&t).await, &t);

        // A valid token with its signature swapped for another token's.
        let other = sign(Algorithm::RS256, "rsa-1", &rsa_key(), &claims(&clock));
        let mut c2 = c.clone();
        c2["sub"] = json!("user-2");
        let other2 = sign(Algorithm::RS256, "rsa-1", &rsa_key(), &c2);
        let t = format!(
            "{}.{}",
            other.rsplit_once('.').unwrap().0,
            other2.rsplit_once('.').unwrap().1
        );
        assert_rejected(v.verify(&t).await, &t);

        // alg none, with and without a signature segment.
        for sig in ["", "c2ln"] {
            let t = raw_token(json!({"alg": "none", "kid": "rsa-1"}), &c, sig);
            let m = assert_rejected(v.verify(&t).await, &t);
            assert!(m.contains("none"), "{m}");
        }

        // HS256 signed with the RSA public key material as the secret (alg confusion).
        let secret = JWKS.as_bytes();
        let mut h = Header::new(Algorithm::HS256);
        h.kid = Some("rsa-1".into());
        let t = jsonwebtoken::encode(&h, &c, &EncodingKey::from_secret(secret)).unwrap();
        let m = assert_rejected(v.verify(&t).await, &t);
        assert!(m.contains("HS256"), "{m}");

        // The alg does not match the key the kid names.
        let t = sign(Algorithm::RS256, "ec-1", &rsa_key(), &c);
        let m = assert_rejected(v.verify(&t).await, &t);
        assert!(m.contains("does not match"), "{m}");
        let t = sign(Algorithm::ES256, "rsa-1", &ec_key(), &c);
        assert_rejected(v.verify(&t).await, &t);
        // The JWK says RS256; an RS384 token under it is refused even with the right key.
        let t = sign(Algorithm::RS384, "rsa-1", &rsa_key(), &c);
        assert_rejected(v.verify(&t).await, &t);

        // Garbage.
        for t in [
            "",
            "garbage",
            "a.b.c",
            "eyJ.eyJ.c2ln",
            "!!!.???.***",
            &format!("{}.x", good),
        ] {
            assert_rejected(v.verify(t).await, t);
        }
        let huge = format!("{}.{}.sig", "a".repeat(MAX_TOKEN_LEN), "b");
        assert_rejected(v.verify(&huge).await, &huge);
        let t = raw_token(json!({"alg": "RS256", "kid": 7}), &c, "c2ln");
        assert_rejected(v.verify(&t).await, &t);
        let t = raw_token(json!({"kid": "rsa-1"}), &c, "c2ln");
        assert_rejected(v.verify(&t).await, &t);
        let t = format!("{}.bm90IGpzb24.{}", parts[0], parts[2]);
        assert_rejected(v.verify(&t).await, &t);

        // None of this needed more than the first fetch (kids known, no refresh).
        assert_eq!(server.hits(), 1);
    }

    #[tokio::test]
    async fn token_without_kid_is_checked_against_fitting_keys() {
        let (url, _server) = jwks_server(Mode::Serve(JWKS)).await;
        let (v, clock) = verifier(&url);
        let c = claims(&clock);
        let t = jsonwebtoken::encode(&Header::new(Algorithm::ES256), &c, &ec_key()).unwrap();
        assert_eq!(v.verify(&t).await.unwrap().subject, "user-1");
        let t = jsonwebtoken::encode(&Header::new(Algorithm::RS256), &c, &rsa2_key()).unwrap();
        assert_rejected(v.verify(&t).await, &t);
    }

    #[tokio::test]
    async fn jwks_down_without_cache_is_unavailable() {
        let url = closed_url().await;
        let (v, clock) = verifier(&url);
        let m = assert_unavailable(v.verify(&rs256(&clock)).await);
        assert!(m.contains("could not be reached"), "{m}");
        // Malformed tokens are still the caller's problem.
        assert_rejected(v.verify("garbage").await, "garbage");
    }

    #[tokio::test]
    async fn jwks_errors_without_cache_are_unavailable() {
        let (url, server) = jwks_server(Mode::Status(500)).await;
        let (v, clock) = verifier(&url);
        let t = rs256(&clock);
        let m = assert_unavailable(v.verify(&t).await);
        assert!(m.contains("HTTP 500"), "{m}");

        server.set(Mode::Status(404));
        let m = assert_unavailable(v.verify(&t).await);
        assert!(m.contains("HTTP 404"), "{m}");

        server.set(Mode::Garbage);
        let m = assert_unavailable(v.verify(&t).await);
        assert!(m.contains("not JSON"), "{m}");

        server.set(Mode::Serve(
            r#"{"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}"#,
        ));
        let m = assert_unavailable(v.verify(&t).await);
        assert!(m.contains("no usable"), "{m}");

        server.set(Mode::Serve(r#"{"nokeys": true}"#));
        assert_unavailable(v.verify(&t).await);

        // Without a key set every request tries again; once the endpoint recovers, it works.
        server.set(Mode::Serve(JWKS));
        assert!(v.verify(&t).await.is_ok());
        assert_eq!(server.hits(), 6);
    }

    #[tokio::test]
    async fn stalling_jwks_is_unavailable_within_timeout() {
        let (url, server) = jwks_server(Mode::Stall(Duration::from_secs(10))).await;
        let (v, clock) = verifier(&url);
        let started = std::time::Instant::now();
        let m = assert_unavailable(v.verify(&rs256(&clock)).await);
        assert!(m.contains("timed out"), "{m}");
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "{:?}",
            started.elapsed()
        );
        assert_eq!(server.hits(), 1);
    }

    #[tokio::test]
    async fn unknown_kid_refreshes_once_under_concurrency() {
        let (url, server) = jwks_server(Mode::Serve(JWKS)).await;
        let (v, clock) = verifier(&url);
        let v = Arc::new(v);
        assert!(v.verify(&rs256(&clock)).await.is_ok());
        assert_eq!(server.hits(), 1);

        // rsa-2 is not published in jwks.json.
        let unknown = sign(Algorithm::RS256, "rsa-2", &rsa2_key(), &claims(&clock));
        let tasks: Vec<_> = (0..50)
            .map(|_| {
                let v = v.clone();
                let t = unknown.clone();
                tokio::spawn(async move { v.verify(&t).await })
            })
            .collect();
        for task in tasks {
            let m = assert_rejected(task.await.unwrap(), &unknown);
            assert!(m.contains("unknown"), "{m}");
        }
        assert_eq!(
            server.hits(),
            2,
            "one refresh for 50 concurrent unknown kids"
        );

        // Within jwks_min_refresh_secs, more unknown kids do not fetch again.
        assert_rejected(v.verify(&unknown).await, &unknown);
        clock.advance(Duration::from_secs(9));
        assert_rejected(v.verify(&unknown).await, &unknown);
        assert_eq!(server.hits(), 2);

        // After it, one does.
        clock.advance(Duration::from_secs(2));
        let unknown = sign(Algorithm::RS256, "rsa-2", &rsa2_key(), &claims(&clock));
        assert_rejected(v.verify(&unknown).await, &unknown);
        assert_rejected(v.verify(&unknown).await, &unknown);
        assert_eq!(server.hits(), 3);
    }

    #[tokio::test]
    async fn rotation_is_picked_up_by_refresh() {
        let (url, server) = jwks_server(Mode::Serve(JWKS)).await;
        let (v, clock) = verifier(&url);
        assert!(v.verify(&rs256(&clock)).await.is_ok());

        server.set(Mode::Serve(JWKS_ROTATED));
        let new = sign(Algorithm::RS256, "rsa-2", &rsa2_key(), &claims(&clock));
        assert_eq!(v.verify(&new).await.unwrap().subject, "user-1");
        assert_eq!(server.hits(), 2);
        // The retired key is gone from the refreshed set; its kid is now unknown (and the
        // refresh it would trigger is rate-limited).
        let old = rs256(&clock);
        assert_rejected(v.verify(&old).await, &old);
        assert_eq!(server.hits(), 2);
        // The EC key survived the rotation.
        let es = sign(Algorithm::ES256, "ec-1", &ec_key(), &claims(&clock));
        assert!(v.verify(&es).await.is_ok());
    }

    #[tokio::test]
    async fn failed_refresh_keeps_last_good_set() {
        let (url, server) = jwks_server(Mode::Serve(JWKS)).await;
        let (v, clock) = verifier(&url);
        assert!(v.verify(&rs256(&clock)).await.is_ok());

        server.set(Mode::Status(503));
        // The cached set goes stale; the refresh fails; the last good set is still used.
        clock.advance(Duration::from_secs(3601));
        assert!(v.verify(&rs256(&clock)).await.is_ok());
        assert_eq!(server.hits(), 2);
        // Failed refreshes are retried at most once per jwks_min_refresh_secs.
        assert!(v.verify(&rs256(&clock)).await.is_ok());
        assert_eq!(server.hits(), 2);

        // Garbage and stalls do not replace the set either.
        server.set(Mode::Garbage);
        clock.advance(Duration::from_secs(11));
        assert!(v.verify(&rs256(&clock)).await.is_ok());
        server.set(Mode::Stall(Duration::from_secs(10)));
        clock.advance(Duration::from_secs(11));
        assert!(v.verify(&rs256(&clock)).await.is_ok());
        assert_eq!(server.hits(), 4);

        // A kid the last good set lacks cannot be judged while the endpoint fails.
        server.set(Mode::Status(500));
        clock.advance(Duration::from_secs(11));
        let new = sign(Algorithm::RS256, "rsa-2", &rsa2_key(), &claims(&clock));
        let m = assert_unavailable(v.verify(&new).await);
        assert!(m.contains("HTTP 500"), "{m}");
        // A bad signature under a cached kid is still the caller's problem.
        let bad = sign(Algorithm::RS256, "rsa-1", &rsa2_key(), &claims(&clock));
        assert_rejected(v.verify(&bad).await, &bad);

        // Recovery: the next refresh replaces the set.
        server.set(Mode::Serve(JWKS_ROTATED));
        clock.advance(Duration::from_secs(11));
        assert!(v.verify(&new).await.is_ok());
    }

    #[tokio::test]
    async fn stale_set_is_refreshed() {
        let (url, server) = jwks_server(Mode::Serve(JWKS)).await;
        let (v, clock) = verifier(&url);
        assert!(v.verify(&rs256(&clock)).await.is_ok());
        clock.advance(Duration::from_secs(3599));
        assert!(v.verify(&rs256(&clock)).await.is_ok());
        assert_eq!(server.hits(), 1);
        clock.advance(Duration::from_secs(2));
        assert!(v.verify(&rs256(&clock)).await.is_ok());
        assert_eq!(server.hits(), 2);
    }

    #[test]
    fn jwks_parsing_skips_unusable_keys() {
        let doc = json!({"keys": [
            {"kty": "oct", "k": "c2VjcmV0", "kid": "hmac"},
            {"kty": "RSA", "kid": "enc", "use": "enc", "n": "AQAB", "e": "AQAB"},
            {"kty": "RSA", "kid": "odd-alg", "alg": "RSA-OAEP", "n": "AQAB", "e": "AQAB"},
            {"kty": "EC", "kid": "p521", "crv": "P-521", "x": "AA", "y": "AA"},
            {"kty": "EC", "kid": "short", "crv": "P-256", "x": "AA", "y": "AA"},
            {"kty": "OKP", "kid": "ed", "crv": "Ed25519", "x": "AA"},
        ]});
        assert!(parse_jwks(doc.to_string().as_bytes()).is_err());
        let mut doc: Value = serde_json::from_str(JWKS).unwrap();
        doc["keys"]
            .as_array_mut()
            .unwrap()
            .push(json!({"kty": "oct", "k": "c2VjcmV0"}));
        let keys = parse_jwks(doc.to_string().as_bytes()).unwrap();
        let kids: Vec<_> = keys.iter().map(|k| k.kid.clone().unwrap()).collect();
        assert_eq!(kids, ["rsa-1", "ec-1"]);
        assert_eq!(keys[0].kind, KeyKind::Rsa);
        assert_eq!(keys[1].kind, KeyKind::EcP256);
        assert!(keys[0].fits(Algorithm::RS256) && !keys[0].fits(Algorithm::PS256));
        assert!(keys[1].fits(Algorithm::ES256) && !keys[1].fits(Algorithm::ES384));
    }
}
