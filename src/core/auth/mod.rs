//! Credential verification, chosen by the credential's shape: virtual API keys (`tg-...`) are
//! looked up by their SHA-256 (a verified key is cached briefly so that the store is not asked
//! on every request); JWTs are checked against a JWKS; anything else goes to token
//! introspection. Verifiers never put a credential in a message or a log line.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use sha2::{Digest, Sha256};

use super::ttl_cache::{Cached, Load, TtlCache};
use super::{Reason, Rejection};
use crate::store::{KeyOwner, Store};

/// The prefix of every tollgate API key.
pub const KEY_PREFIX: &str = "tg-";

/// How a caller proved who they are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMethod {
    /// A key created through the admin API or CLI.
    ApiKey,
    /// A key declared in the configuration file.
    StaticKey,
    /// An OIDC JWT bearer token.
    Jwt,
    /// An RFC 7662 introspected token.
    Introspection,
}

impl AuthMethod {
    /// The label and wire value.
    pub fn as_str(self) -> &'static str {
        match self {
            AuthMethod::ApiKey => "api_key",
            AuthMethod::StaticKey => "static_key",
            AuthMethod::Jwt => "jwt",
            AuthMethod::Introspection => "introspection",
        }
    }
}

/// Who is calling, once verified.
#[derive(Debug, Clone)]
pub struct Identity {
    pub user_id: i64,
    /// Shared, like `user_service_type`: a cached identity is cloned for every request.
    pub external_id: std::sync::Arc<str>,
    pub method: AuthMethod,
    pub key_id: Option<i64>,
    pub blocked: bool,
    pub user_service_type: Option<std::sync::Arc<str>>,
}

/// An identity vouched for by a token verifier, not yet matched to a user.
#[derive(Debug, Clone)]
pub struct ExternalIdentity {
    /// `{iss}#{sub}` for JWTs, `introspection#{sub}` for introspected tokens.
    pub external_id: String,
    pub method: AuthMethod,
    /// The service type the token names, if configured to read one.
    pub service_type: Option<String>,
}

/// What verification established.
#[derive(Debug, Clone)]
pub enum Credential {
    /// An API key: its user is known.
    Known(Identity),
    /// A token: its user is found or provisioned next.
    External(ExternalIdentity),
}

/// The token verifiers a configuration enables; rebuilt on reload.
#[derive(Default)]
pub struct Verifiers {
    pub jwt: Option<jwt::JwtVerifier>,
    pub introspection: Option<introspection::IntrospectionVerifier>,
}

impl Verifiers {
    /// The verifiers `[auth.jwt]` and `[auth.introspection]` ask for.
    pub fn from_config(cfg: &crate::config::AuthConfig, clock: crate::clock::Clock) -> Self {
        // One client for both: connection reuse to the identity provider matters on every
        // uncached request.
        let http = reqwest::Client::builder()
            .pool_idle_timeout(Duration::from_secs(90))
            .build()
            .unwrap_or_default();
        Self {
            jwt: cfg
                .jwt
                .as_ref()
                .map(|c| jwt::JwtVerifier::new(c, http.clone(), clock.clone())),
            introspection: cfg
                .introspection
                .as_ref()
                .map(|c| introspection::IntrospectionVerifier::new(c, http, clock)),
        }
    }

    /// Which method a bearer token will be verified with, if any.
    pub fn method_for(&self, token: &str) -> Option<AuthMethod> {
        if token.starts_with(KEY_PREFIX) {
            Some(AuthMethod::ApiKey)
        } else if self.jwt.is_some() && jwt::looks_like_jwt(token) {
            Some(AuthMethod::Jwt)
        } else if self.introspection.is_some() {
            Some(AuthMethod::Introspection)
        } else {
            None
        }
    }
}

/// SHA-256 of a key, hex-encoded: the only form in which keys are stored.
pub fn hash_key(key: &str) -> String {
    hex::encode(key_digest(key))
}

/// The SHA-256 of a key, as bytes: what the cache of verified keys is keyed by (the hex form,
/// for the store, is made only when the cache does not have the key).
fn key_digest(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
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
    keys: Arc<KeyLookup>,
    /// Store lookups in flight, by key hash: the requests that find a key not cached (all of a
    /// busy key's requests in flight, when its entry expired) wait for one lookup instead of
    /// each asking the store (and each opening a database connection for it).
    lookups: std::sync::Mutex<HashMap<[u8; 32], Arc<Lookup>>>,
}

/// One store lookup of a key, shared by every request that waits for it.
type Lookup = tokio::sync::OnceCell<Result<Identity, Rejection>>;

/// Reads keys from the store into the cache; shared with the background refreshes.
struct KeyLookup {
    store: Store,
    ttl_ms: u64,
    /// Verified keys by hash, with the key's expiry so that a cached key still expires on time.
    cache: TtlCache<[u8; 32], (Identity, Option<i64>)>,
    /// Store lookups made.
    made: AtomicU64,
}

impl Authenticator {
    /// An authenticator over `store` caching verified keys for `ttl` (zero disables the cache).
    pub fn new(store: Store, ttl: Duration) -> Self {
        Self {
            keys: Arc::new(KeyLookup {
                cache: TtlCache::new(store.clock().clone()),
                store,
                ttl_ms: ttl.as_millis().min(u64::MAX as u128) as u64,
                made: AtomicU64::new(0),
            }),
            lookups: Default::default(),
        }
    }

    /// Verifies an `authorization` value. Returns the method tried (for metrics) with the result.
    pub async fn verify(
        &self,
        authorization: Option<&str>,
        verifiers: &Verifiers,
    ) -> (Option<AuthMethod>, Result<Credential, Rejection>) {
        let token = match bearer_token(authorization) {
            Ok(t) => t,
            Err(e) => return (None, Err(e)),
        };
        let method = verifiers.method_for(token);
        let result = match method {
            Some(AuthMethod::ApiKey | AuthMethod::StaticKey) => {
                self.verify_key(token).await.map(Credential::Known)
            }
            // The verifiers' futures (and a key's store lookup) are boxed where they are
            // awaited: held inline, their kilobytes would be copied with every future that
            // holds this one, on every request, though a cached key never reaches them.
            Some(AuthMethod::Jwt) => match verifiers.jwt.as_ref() {
                Some(v) => Box::pin(v.verify(token))
                    .await
                    .map(|t| external(AuthMethod::Jwt, format!("{}#{}", t.issuer, t.subject), t))
                    .map_err(verify_rejection),
                None => Err(Rejection::new(Reason::AuthRejected, "unknown credential")),
            },
            Some(AuthMethod::Introspection) => match verifiers.introspection.as_ref() {
                Some(v) => Box::pin(v.verify(token))
                    .await
                    .map(|t| {
                        let id = format!("introspection#{}", t.subject);
                        external(AuthMethod::Introspection, id, t)
                    })
                    .map_err(verify_rejection),
                None => Err(Rejection::new(Reason::AuthRejected, "unknown credential")),
            },
            None => Err(Rejection::new(Reason::AuthRejected, "unknown credential")),
        };
        // A key's method is only known once its row is read.
        let method = match &result {
            Ok(Credential::Known(i)) => Some(i.method),
            _ => method,
        };
        (method, result)
    }
}

fn external(method: AuthMethod, external_id: String, t: verified::VerifiedToken) -> Credential {
    Credential::External(ExternalIdentity {
        external_id,
        method,
        service_type: t.service_type,
    })
}

fn verify_rejection(e: verified::VerifyError) -> Rejection {
    match e {
        verified::VerifyError::Rejected(m) => Rejection::new(Reason::AuthRejected, m),
        verified::VerifyError::Unavailable(m) => {
            tracing::warn!(error = %m, "token verifier unavailable");
            Rejection::new(
                Reason::AuthSystemFailure,
                "the credential verifier is unavailable",
            )
        }
    }
}

/// The token of an `Authorization: Bearer` value.
fn bearer_token(authorization: Option<&str>) -> Result<&str, Rejection> {
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
    Ok(token)
}

impl Authenticator {
    async fn verify_key(&self, key: &str) -> Result<Identity, Rejection> {
        let digest = key_digest(key);
        let keys = &self.keys;
        let load = match keys.cache.lookup(&digest, keys.ttl_ms) {
            Cached::Fresh(found) => keys.unexpired(found),
            Cached::Refresh(found, load) => {
                // Served from the cache while one background lookup renews the entry (a key
                // found revoked meanwhile leaves the cache at once).
                let refresh = keys.clone();
                let reload = async move {
                    match refresh.look_up(digest, load).await {
                        Err(r) if r.reason == Reason::AuthSystemFailure => Err(r.message),
                        _ => Ok(()),
                    }
                };
                keys.cache
                    .renew(digest, "refreshing a verified key failed", reload);
                keys.unexpired(found)
            }
            Cached::Missing(load) => Err(load),
        };
        match load {
            Ok(identity) => Ok(identity),
            Err(load) => Box::pin(self.look_up_key(digest, load)).await,
        }
    }

    /// A key the cache does not hold, read from the store (one lookup at a time per key: a
    /// request that comes meanwhile waits for it).
    async fn look_up_key(&self, digest: [u8; 32], load: Load) -> Result<Identity, Rejection> {
        let keys = &self.keys;
        let lookup = self
            .lookups
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(digest)
            .or_default()
            .clone();
        // If the request making the lookup goes away, a waiting one makes it instead.
        let result = lookup
            .get_or_init(|| keys.look_up(digest, load))
            .await
            .clone();
        let mut lookups = self.lookups.lock().unwrap_or_else(|e| e.into_inner());
        if lookups
            .get(&digest)
            .is_some_and(|l| Arc::ptr_eq(l, &lookup))
        {
            lookups.remove(&digest);
        }
        result
    }

    /// Store lookups of keys made so far (not answered from the cache or another request's
    /// lookup).
    pub fn lookups_made(&self) -> u64 {
        self.keys.made.load(Ordering::Relaxed)
    }

    /// Forgets cached verifications (after a revocation in this process).
    pub fn forget_all(&self) {
        self.keys.cache.clear();
    }
}

impl KeyLookup {
    /// A cached key's identity, unless the key has expired since (then: look it up).
    fn unexpired(&self, (identity, expires_at): (Identity, Option<i64>)) -> Result<Identity, Load> {
        if expires_at.is_none_or(|t| t > self.store.clock().now_ms()) {
            Ok(identity)
        } else {
            Err(self.cache.begin_load())
        }
    }

    /// Looks a key up in the store, caching it if it is valid and forgetting it if it is not.
    async fn look_up(&self, digest: [u8; 32], load: Load) -> Result<Identity, Rejection> {
        let result = self.read(digest).await;
        match &result {
            Ok((identity, expires_at)) => {
                self.cache
                    .insert(digest, (identity.clone(), *expires_at), load, self.ttl_ms)
            }
            Err(r) if r.reason == Reason::AuthRejected => self.cache.evict(&digest),
            Err(_) => {}
        }
        result.map(|(identity, _)| identity)
    }

    /// A key's identity and expiry, as the store holds them now.
    async fn read(&self, digest: [u8; 32]) -> Result<(Identity, Option<i64>), Rejection> {
        self.made.fetch_add(1, Ordering::Relaxed);
        let found = self
            .store
            .find_key_by_hash(&hex::encode(digest))
            .await
            .map_err(|e| {
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
        if key
            .expires_at
            .is_some_and(|t| t <= self.store.clock().now_ms())
        {
            return Err(Rejection::new(
                Reason::AuthRejected,
                "the API key has expired",
            ));
        }
        let identity = Identity {
            user_id: user.id,
            external_id: user.external_id.into(),
            method: if key.source == "config" {
                AuthMethod::StaticKey
            } else {
                AuthMethod::ApiKey
            },
            key_id: Some(key.id),
            blocked: user.blocked,
            user_service_type: user.service_type.map(Into::into),
        };
        Ok((identity, key.expires_at))
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

    async fn wait_for_lookups(auth: &Authenticator, n: u64) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while auth.lookups_made() < n {
            assert!(std::time::Instant::now() < deadline, "lookup {n} not made");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    /// A key in use past half its cache TTL is looked up again in the background while its
    /// requests are served from the cache, and a key found revoked by that lookup leaves the
    /// cache at once.
    #[tokio::test]
    async fn a_busy_key_is_renewed_in_the_background_and_a_revoked_one_leaves() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("auth.db").display());
        let clock = crate::clock::Clock::manual();
        let store = Store::connect(&url, 4, clock.clone()).await.unwrap();
        store.migrate().await.unwrap();
        let user = store.create_user("alice", None, "api_key").await.unwrap();
        let key = store
            .insert_api_key(user.id, None, &hash_key("tg-k1"), "tg-...k1", "api", None)
            .await
            .unwrap();
        let auth = Authenticator::new(store.clone(), Duration::from_millis(1_000));
        auth.verify_key("tg-k1").await.unwrap();
        assert_eq!(auth.lookups_made(), 1);
        clock.advance(Duration::from_millis(400));
        auth.verify_key("tg-k1").await.unwrap();
        assert_eq!(auth.lookups_made(), 1, "fresh: served from the cache");
        clock.advance(Duration::from_millis(200));
        auth.verify_key("tg-k1").await.unwrap();
        wait_for_lookups(&auth, 2).await;
        // Renewed as of 600 ms: still fresh 400 ms later, past the first load's TTL.
        clock.advance(Duration::from_millis(450));
        auth.verify_key("tg-k1").await.unwrap();
        assert_eq!(auth.lookups_made(), 2);
        store.revoke_api_key(key.id).await.unwrap();
        clock.advance(Duration::from_millis(100));
        auth.verify_key("tg-k1").await.unwrap();
        wait_for_lookups(&auth, 3).await;
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let refused = loop {
            match auth.verify_key("tg-k1").await {
                Err(r) => break r,
                Ok(_) => assert!(std::time::Instant::now() < deadline, "still served"),
            }
            tokio::task::yield_now().await;
        };
        assert_eq!(refused.reason, Reason::AuthRejected);
    }

    /// Every request of a busy key finds it uncached at once when its entry expires: they wait
    /// for one store lookup, and a later request after the cache is cleared makes a new one.
    #[tokio::test]
    async fn concurrent_requests_with_an_uncached_key_make_one_lookup() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("auth.db").display());
        let store = Store::connect(&url, 4, crate::clock::Clock::system())
            .await
            .unwrap();
        store.migrate().await.unwrap();
        let user = store.create_user("alice", None, "api_key").await.unwrap();
        store
            .insert_api_key(user.id, None, &hash_key("tg-k1"), "tg-...k1", "api", None)
            .await
            .unwrap();
        let auth = Arc::new(Authenticator::new(store, Duration::from_secs(60)));
        let barrier = Arc::new(tokio::sync::Barrier::new(32));
        let tasks: Vec<_> = (0..32)
            .map(|_| {
                let (auth, barrier) = (auth.clone(), barrier.clone());
                tokio::spawn(async move {
                    barrier.wait().await;
                    auth.verify_key("tg-k1").await
                })
            })
            .collect();
        for t in tasks {
            assert_eq!(t.await.unwrap().unwrap().user_id, user.id);
        }
        assert_eq!(auth.lookups_made(), 1);
        assert!(auth.lookups.lock().unwrap().is_empty());
        // A key that is not there is refused, and its lookup is not kept either.
        let unknown = auth.verify_key("tg-nope").await.unwrap_err();
        assert_eq!(unknown.reason, Reason::AuthRejected);
        auth.forget_all();
        auth.verify_key("tg-k1").await.unwrap();
        assert_eq!(auth.lookups_made(), 3);
    }
}
pub mod introspection;
pub mod jwt;
pub mod verified;
