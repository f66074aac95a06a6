//! RFC 7662 token introspection: opaque tokens are sent to the authorization server, which
//! answers whether they are active and whose they are.
//!
//! Positive answers are cached for `cache_ttl_secs` (never past the token's `exp`), keyed by
//! the token's SHA-256; negative answers are not cached, so a token activated later is not
//! refused from the cache.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use serde_json::Value;
use sha2::{Digest, Sha256};

use super::verified::{fetch_body, numeric_secs, VerifiedToken, VerifyError};
use crate::clock::Clock;
use crate::config::IntrospectionConfig;

/// The largest introspection answer accepted.
const MAX_RESPONSE_BYTES: usize = 64 * 1024;
/// How many positive answers are kept at most.
const MAX_CACHE_ENTRIES: usize = 100_000;

/// A cached positive answer.
struct Entry {
    token: VerifiedToken,
    until_ms: i64,
}

/// Verifies opaque tokens with an RFC 7662 introspection endpoint.
pub struct IntrospectionVerifier {
    url: String,
    client_id: String,
    client_secret: String,
    cache_ttl_ms: i64,
    timeout: Duration,
    http: reqwest::Client,
    clock: Clock,
    max_entries: usize,
    /// Positive answers by SHA-256 of the token.
    cache: Mutex<HashMap<[u8; 32], Entry>>,
}

impl std::fmt::Debug for IntrospectionVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IntrospectionVerifier")
            .field("url", &self.url)
            .field("client_id", &self.client_id)
            .field("client_secret", &"<redacted>")
            .finish_non_exhaustive()
    }
}

impl IntrospectionVerifier {
    /// A verifier for `cfg`, calling the endpoint with `http` and reading time from `clock`.
    pub fn new(cfg: &IntrospectionConfig, http: reqwest::Client, clock: Clock) -> Self {
        Self {
            url: cfg.url.clone(),
            client_id: cfg.client_id.clone(),
            client_secret: cfg.client_secret.clone(),
            cache_ttl_ms: i64::try_from(cfg.cache_ttl_secs.saturating_mul(1000))
                .unwrap_or(i64::MAX),
            timeout: Duration::from_millis(cfg.timeout_ms),
            http,
            clock,
            max_entries: MAX_CACHE_ENTRIES,
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// Asks the endpoint (or the cache of its positive answers) whether `token` is active.
    pub async fn verify(&self, token: &str) -> Result<VerifiedToken, VerifyError> {
        let key: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        if let Some(hit) = self.cached(&key) {
            return Ok(hit);
        }
        let answer = self.introspect(token).await?;
        let now = self.clock.now_ms();
        // An endpoint that calls an expired token active is not taken at its word.
        if answer.expires_at_ms.is_some_and(|exp| exp <= now) {
            return Err(VerifyError::rejected("the token has expired"));
        }
        let mut until = now.saturating_add(self.cache_ttl_ms);
        if let Some(exp) = answer.expires_at_ms {
            until = until.min(exp);
        }
        if until > now {
            let mut cache = self.lock_cache();
            if cache.len() >= self.max_entries {
                cache.retain(|_, e| e.until_ms > now);
            }
            // When still full of live entries, the answer is simply not cached.
            if cache.len() < self.max_entries {
                cache.insert(
                    key,
                    Entry {
                        token: answer.clone(),
                        until_ms: until,
                    },
                );
            }
        }
        Ok(answer)
    }

    fn lock_cache(&self) -> std::sync::MutexGuard<'_, HashMap<[u8; 32], Entry>> {
        self.cache.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn cached(&self, key: &[u8; 32]) -> Option<VerifiedToken> {
        let now = self.clock.now_ms();
        let mut cache = self.lock_cache();
        match cache.get(key) {
            Some(e) if e.until_ms > now => Some(e.token.clone()),
            Some(_) => {
                cache.remove(key);
                None
            }
            None => None,
        }
    }

    async fn introspect(&self, token: &str) -> Result<VerifiedToken, VerifyError> {
        let req = self
            .http
            .post(&self.url)
            .basic_auth(&self.client_id, Some(&self.client_secret))
            .header(reqwest::header::ACCEPT, "application/json")
            .form(&[("token", token), ("token_type_hint", "access_token")]);
        let body = fetch_body(req, self.timeout, MAX_RESPONSE_BYTES)
            .await
            .map_err(|e| {
                tracing::warn!(url = %self.url, error = %e, "token introspection failed");
                VerifyError::Unavailable(format!("the introspection endpoint {e}"))
            })?;
        let garbage = |what: &str| {
            tracing::warn!(url = %self.url, what, "token introspection answered garbage");
            VerifyError::Unavailable(format!("the introspection endpoint {what}"))
        };
        let answer: Value = serde_json::from_slice(&body)
            .map_err(|_| garbage("answered with a body that is not JSON"))?;
        let Some(answer) = answer.as_object() else {
            return Err(garbage("answered with JSON that is not an object"));
        };
        match answer.get("active") {
            Some(Value::Bool(true)) => {}
            Some(Value::Bool(false)) => {
                return Err(VerifyError::rejected("the token is not active"))
            }
            _ => return Err(garbage("answered without a boolean `active`")),
        }
        let subject = match answer.get("sub").and_then(Value::as_str) {
            Some(sub) if !sub.is_empty() => sub.to_owned(),
            _ => return Err(VerifyError::rejected("the token names no subject")),
        };
        let issuer = answer
            .get("iss")
            .and_then(Value::as_str)
            .filter(|i| !i.is_empty())
            .unwrap_or(&self.url)
            .to_owned();
        let expires_at_ms = answer
            .get("exp")
            .and_then(numeric_secs)
            .map(|s| s.saturating_mul(1000));
        Ok(VerifiedToken {
            subject,
            issuer,
            service_type: None,
            expires_at_ms,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    use axum::extract::State;
    use axum::http::{HeaderMap, StatusCode};
    use axum::response::{IntoResponse, Response};
    use axum::routing::post;
    use axum::{Json, Router};
    use base64::Engine as _;
    use serde_json::json;
    use subtle::ConstantTimeEq;

    const CLIENT_ID: &str = "tollgate";
    const SECRET: &str = "s3cr3t-Very-Private";
    const ISS: &str = "https://auth.test";

    #[derive(Clone, Copy)]
    enum Mode {
        Normal,
        Status(u16),
        Garbage,
        NoActive,
        Stall,
    }

    struct Server {
        hits: AtomicUsize,
        mode: Mutex<Mode>,
        /// Every token received, decoded from the form.
        seen: Mutex<Vec<String>>,
    }

    impl Server {
        fn hits(&self) -> usize {
            self.hits.load(Ordering::SeqCst)
        }
        fn set(&self, mode: Mode) {
            *self.mode.lock().unwrap() = mode;
        }
    }

    fn now_s() -> i64 {
        Clock::system().now_ms() / 1000
    }

    /// application/x-www-form-urlencoded, decoded by hand (axum's `form` feature is off).
    fn form_decode(body: &str) -> HashMap<String, String> {
        let dec = |s: &str| {
            let s = s.replace('+', " ");
            let b = s.as_bytes();
            let mut out = Vec::new();
            let mut i = 0;
            while i < b.len() {
                if b[i] == b'%' && i + 2 < b.len() {
                    let hex = std::str::from_utf8(&b[i + 1..i + 3]).unwrap();
                    out.push(u8::from_str_radix(hex, 16).unwrap());
                    i += 3;
                } else {
                    out.push(b[i]);
                    i += 1;
                }
            }
            String::from_utf8(out).unwrap()
        };
        body.split('&')
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (dec(k), dec(v)))
            .collect()
    }

    async fn introspect(
        State(s): State<Arc<Server>>,
        headers: HeaderMap,
        body: String,
    ) -> Response {
        s.hits.fetch_add(1, Ordering::SeqCst);
        let expected = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{CLIENT_ID}:{SECRET}"))
        );
        let given = headers
            .get("authorization")
            .map(|v| v.as_bytes())
            .unwrap_or_default();
        if !bool::from(given.ct_eq(expected.as_bytes())) {
            return StatusCode::UNAUTHORIZED.into_response();
        }
        let form = form_decode(&body);
        if form.get("token_type_hint").map(String::as_str) != Some("access_token") {
            return StatusCode::BAD_REQUEST.into_response();
        }
        let Some(token) = form.get("token").cloned() else {
            return StatusCode::BAD_REQUEST.into_response();
        };
        s.seen.lock().unwrap().push(token.clone());
        let mode = *s.mode.lock().unwrap();
        match mode {
            Mode::Status(code) => return StatusCode::from_u16(code).unwrap().into_response(),
            Mode::Garbage => return "<html>oops</html>".into_response(),
            Mode::NoActive => return Json(json!({"sub": "x"})).into_response(),
            Mode::Stall => {
                tokio::time::sleep(Duration::from_secs(10)).await;
            }
            Mode::Normal => {}
        }
        let answer = if token.starts_with("active") {
            json!({"active": true, "sub": "svc-user", "iss": ISS, "exp": now_s() + 3600,
                   "client_id": "someone", "token_type": "Bearer"})
        } else if token.starts_with("short") {
            json!({"active": true, "sub": "svc-user", "iss": ISS, "exp": now_s() + 60})
        } else if token.starts_with("bare") {
            json!({"active": true, "sub": "bare-user"})
        } else if token.starts_with("nosub") {
            json!({"active": true, "sub": ""})
        } else if token.starts_with("weird") {
            json!({"active": "true", "sub": "x"})
        } else if token.starts_with("array") {
            json!([{"active": true}])
        } else {
            json!({"active": false})
        };
        Json(answer).into_response()
    }

    async fn server() -> (String, Arc<Server>) {
        let state = Arc::new(Server {
            hits: AtomicUsize::new(0),
            mode: Mutex::new(Mode::Normal),
            seen: Mutex::new(Vec::new()),
        });
        let app = Router::new()
            .route("/introspect", post(introspect))
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        (format!("http://{addr}/introspect"), state)
    }

    fn cfg(url: &str) -> IntrospectionConfig {
        IntrospectionConfig {
            url: url.to_owned(),
            client_id: CLIENT_ID.to_owned(),
            client_secret: SECRET.to_owned(),
            cache_ttl_secs: 300,
            timeout_ms: 300,
        }
    }

    fn verifier_with(cfg: &IntrospectionConfig) -> (IntrospectionVerifier, Clock) {
        let clock = Clock::system();
        let v = IntrospectionVerifier::new(cfg, reqwest::Client::new(), clock.clone());
        (v, clock)
    }

    fn assert_unavailable(r: Result<VerifiedToken, VerifyError>, token: &str) -> String {
        match r {
            Err(VerifyError::Unavailable(m)) => {
                assert!(!m.contains(token) && !m.contains(SECRET), "{m}");
                m
            }
            other => panic!("expected Unavailable, got {other:?}"),
        }
    }

    fn assert_rejected(r: Result<VerifiedToken, VerifyError>, token: &str) -> String {
        match r {
            Err(VerifyError::Rejected(m)) => {
                assert!(!m.contains(token) && !m.contains(SECRET), "{m}");
                m
            }
            other => panic!("expected Rejected, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn active_token_is_accepted_and_cached() {
        let (url, server) = server().await;
        let (v, _clock) = verifier_with(&cfg(&url));
        // Characters that need form encoding survive the trip.
        let token = "active+/=&token=x %41";
        let t = v.verify(token).await.unwrap();
        assert_eq!(t.subject, "svc-user");
        assert_eq!(t.issuer, ISS);
        assert_eq!(t.service_type, None);
        let exp = t.expires_at_ms.unwrap();
        assert!((exp - (now_s() + 3600) * 1000).abs() <= 2000, "{exp}");
        assert_eq!(server.seen.lock().unwrap().as_slice(), [token]);
        assert_eq!(server.hits(), 1);

        // Served from the cache: the endpoint is not asked again, even when it is broken.
        server.set(Mode::Status(500));
        assert_eq!(v.verify(token).await.unwrap(), t);
        assert_eq!(server.hits(), 1);
        // The cache is keyed by the token's digest, not the token.
        let key: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        assert!(v.lock_cache().contains_key(&key));
        // Another token is not served from that entry.
        assert_unavailable(v.verify("active-2").await, "active-2");
        assert_eq!(server.hits(), 2);
    }

    #[tokio::test]
    async fn issuer_defaults_to_url_and_exp_is_optional() {
        let (url, server) = server().await;
        let (v, clock) = verifier_with(&cfg(&url));
        let t = v.verify("bare-1").await.unwrap();
        assert_eq!(t.subject, "bare-user");
        assert_eq!(t.issuer, url);
        assert_eq!(t.expires_at_ms, None);
        // Cached for cache_ttl_secs (300).
        clock.advance(Duration::from_secs(299));
        v.verify("bare-1").await.unwrap();
        assert_eq!(server.hits(), 1);
        clock.advance(Duration::from_secs(2));
        v.verify("bare-1").await.unwrap();
        assert_eq!(server.hits(), 2);
    }

    #[tokio::test]
    async fn inactive_is_rejected_and_not_cached() {
        let (url, server) = server().await;
        let (v, _clock) = verifier_with(&cfg(&url));
        for _ in 0..2 {
            let m = assert_rejected(v.verify("revoked-1").await, "revoked-1");
            assert!(m.contains("not active"), "{m}");
        }
        assert_eq!(server.hits(), 2, "negative answers are not cached");
        let m = assert_rejected(v.verify("nosub-1").await, "nosub-1");
        assert!(m.contains("subject"), "{m}");
        assert_rejected(v.verify("nosub-1").await, "nosub-1");
        assert_eq!(server.hits(), 4);
        assert!(v.lock_cache().is_empty());
    }

    #[tokio::test]
    async fn endpoint_failures_are_unavailable() {
        let (url, server) = server().await;
        let (v, _clock) = verifier_with(&cfg(&url));
        let token = "active-x";
        for (mode, expect) in [
            (Mode::Status(500), "HTTP 500"),
            (Mode::Status(503), "HTTP 503"),
            (Mode::Status(404), "HTTP 404"),
            (Mode::Garbage, "not JSON"),
            (Mode::NoActive, "`active`"),
        ] {
            server.set(mode);
            let m = assert_unavailable(v.verify(token).await, token);
            assert!(m.contains(expect), "{m}");
        }
        server.set(Mode::Normal);
        let m = assert_unavailable(v.verify("weird-1").await, "weird-1");
        assert!(m.contains("`active`"), "{m}");
        let m = assert_unavailable(v.verify("array-1").await, "array-1");
        assert!(m.contains("not an object"), "{m}");
        // Failures are not cached either: the recovered endpoint is asked.
        let before = server.hits();
        assert!(v.verify(token).await.is_ok());
        assert_eq!(server.hits(), before + 1);
    }

    #[tokio::test]
    async fn down_endpoint_is_unavailable() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let (v, _clock) = verifier_with(&cfg(&format!("http://{addr}/introspect")));
        let m = assert_unavailable(v.verify("active-1").await, "active-1");
        assert!(m.contains("could not be reached"), "{m}");
    }

    #[tokio::test]
    async fn slow_endpoint_is_unavailable_within_timeout() {
        let (url, server) = server().await;
        server.set(Mode::Stall);
        let (v, _clock) = verifier_with(&cfg(&url));
        let started = std::time::Instant::now();
        let m = assert_unavailable(v.verify("active-1").await, "active-1");
        assert!(m.contains("timed out"), "{m}");
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "{:?}",
            started.elapsed()
        );
        assert_eq!(server.hits(), 1);
    }

    #[tokio::test]
    async fn basic_auth_is_sent_and_secret_never_shown() {
        let (url, server) = server().await;
        let mut bad = cfg(&url);
        bad.client_secret = "wrong-secret".into();
        let (v, _clock) = verifier_with(&bad);
        let m = assert_unavailable(v.verify("active-1").await, "active-1");
        assert!(m.contains("HTTP 401"), "{m}");
        assert!(!m.contains("wrong-secret"), "{m}");
        assert!(!format!("{v:?}").contains("wrong-secret"));
        // The server saw no token: it refused the caller before reading it.
        assert!(server.seen.lock().unwrap().is_empty());

        let (v, _clock) = verifier_with(&cfg(&url));
        assert!(v.verify("active-1").await.is_ok());
        let debug = format!("{v:?}");
        assert!(
            !debug.contains(SECRET) && debug.contains("redacted"),
            "{debug}"
        );
    }

    #[tokio::test]
    async fn cache_honours_exp_and_ttl() {
        let (url, server) = server().await;
        let mut c = cfg(&url);
        c.cache_ttl_secs = 3600;
        let (v, clock) = verifier_with(&c);
        // exp = now + 60 caps the 3600 s TTL.
        v.verify("short-1").await.unwrap();
        v.verify("short-1").await.unwrap();
        assert_eq!(server.hits(), 1);
        clock.advance(Duration::from_secs(61));
        // The entry expired with the token; the endpoint is asked again. Its `exp` is now behind
        // tollgate's clock, so its "active" is not believed, and the refusal is not cached.
        for hits in [2, 3] {
            let m = assert_rejected(v.verify("short-1").await, "short-1");
            assert!(m.contains("expired"), "{m}");
            assert_eq!(server.hits(), hits);
        }
        assert!(v.lock_cache().is_empty());

        // A TTL shorter than exp caps the entry instead.
        let mut c = cfg(&url);
        c.cache_ttl_secs = 30;
        let (v, clock) = verifier_with(&c);
        v.verify("active-1").await.unwrap();
        clock.advance(Duration::from_secs(29));
        v.verify("active-1").await.unwrap();
        assert_eq!(server.hits(), 4);
        clock.advance(Duration::from_secs(2));
        v.verify("active-1").await.unwrap();
        assert_eq!(server.hits(), 5);

        // A zero TTL disables the cache.
        let mut c = cfg(&url);
        c.cache_ttl_secs = 0;
        let (v, _clock) = verifier_with(&c);
        v.verify("active-1").await.unwrap();
        v.verify("active-1").await.unwrap();
        assert_eq!(server.hits(), 7);
    }

    #[tokio::test]
    async fn cache_is_bounded() {
        let (url, server) = server().await;
        let (mut v, clock) = verifier_with(&cfg(&url));
        v.max_entries = 3;
        for i in 0..5 {
            v.verify(&format!("active-{i}")).await.unwrap();
        }
        assert_eq!(v.lock_cache().len(), 3);
        // The first three are cached; the last two were not.
        v.verify("active-0").await.unwrap();
        assert_eq!(server.hits(), 5);
        v.verify("active-4").await.unwrap();
        assert_eq!(server.hits(), 6);
        // Once entries expire, a full cache makes room by dropping them.
        clock.advance(Duration::from_secs(301));
        v.verify("active-9").await.unwrap();
        assert_eq!(v.lock_cache().len(), 1);
    }
}
