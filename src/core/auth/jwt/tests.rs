//! Tests of JWT verification against a real JWKS endpoint.

use super::*;
use std::sync::atomic::{AtomicUsize, Ordering};

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use jsonwebtoken::{EncodingKey, Header};
use serde_json::json;

const RSA_PEM: &str = include_str!("../../../../tests/fixtures/jwt/rsa.pem");
const RSA2_PEM: &str = include_str!("../../../../tests/fixtures/jwt/rsa2.pem");
const EC_PEM: &str = include_str!("../../../../tests/fixtures/jwt/ec.pem");
const JWKS: &str = include_str!("../../../../tests/fixtures/jwt/jwks.json");
const JWKS_ROTATED: &str = include_str!("../../../../tests/fixtures/jwt/jwks-rotated.json");

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
