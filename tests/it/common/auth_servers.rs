//! Real verifier servers for the auth tests: a JWKS endpoint and an RFC 7662 introspection
//! endpoint, each an axum server on a random loopback port whose behaviour can be switched
//! (healthy, 500, garbage, slow); a closed port for "down"; token minting with the fixture keys
//! in `tests/fixtures/jwt/`; a second handle on a test database for a second replica; and small
//! direct database queries.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Router;
use base64::Engine;
use serde_json::{json, Value};

use super::{Backend, TestDb};

/// The `iss` of every test token (and `[auth.jwt] issuer`).
pub const ISSUER: &str = "https://issuer.tollgate.test/";
/// The `aud` of every test token (and `[auth.jwt] audience`).
pub const AUDIENCE: &str = "tollgate-test";
/// `[auth.introspection] client_id`.
pub const INTROSPECTION_CLIENT_ID: &str = "tollgate-introspector";
/// `[auth.introspection] client_secret`.
pub const INTROSPECTION_SECRET: &str = "introspection-client-secret-7f3a9c";

fn fixture(name: &str) -> String {
    let path = format!("{}/tests/fixtures/jwt/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {path}: {e}"))
}

/// The JWKS of the fixtures: `rsa-1` and `ec-1`.
pub fn jwks_json() -> String {
    fixture("jwks.json")
}

/// The JWKS after a rotation: `rsa-2` and `ec-1`.
pub fn jwks_rotated_json() -> String {
    fixture("jwks-rotated.json")
}

/// DER bytes of a PEM file (the crate's `jsonwebtoken` is built without its PEM feature).
fn pem_to_der(pem: &str) -> Vec<u8> {
    let b64: String = pem
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .map(str::trim)
        .collect();
    base64::engine::general_purpose::STANDARD
        .decode(b64)
        .expect("PEM body is base64")
}

/// A signing key of the fixtures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signer {
    /// `rsa.pem`, published as kid `rsa-1`.
    Rsa1,
    /// `ec.pem`, published as kid `ec-1`.
    Ec1,
    /// `rsa2.pem`, published as kid `rsa-2` only in the rotated JWKS.
    Rsa2,
}

impl Signer {
    fn encoding_key(self) -> jsonwebtoken::EncodingKey {
        match self {
            Signer::Rsa1 => {
                jsonwebtoken::EncodingKey::from_rsa_der(&pem_to_der(&fixture("rsa.pem")))
            }
            Signer::Rsa2 => {
                jsonwebtoken::EncodingKey::from_rsa_der(&pem_to_der(&fixture("rsa2.pem")))
            }
            Signer::Ec1 => jsonwebtoken::EncodingKey::from_ec_der(&pem_to_der(&fixture("ec.pem"))),
        }
    }

    fn alg(self) -> jsonwebtoken::Algorithm {
        match self {
            Signer::Rsa1 | Signer::Rsa2 => jsonwebtoken::Algorithm::RS256,
            Signer::Ec1 => jsonwebtoken::Algorithm::ES256,
        }
    }

    /// The kid this key is published under.
    pub fn kid(self) -> &'static str {
        match self {
            Signer::Rsa1 => "rsa-1",
            Signer::Ec1 => "ec-1",
            Signer::Rsa2 => "rsa-2",
        }
    }
}

pub fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// Good claims for `sub`: our issuer and audience, valid for ten minutes.
pub fn claims(sub: &str) -> Value {
    let now = unix_now();
    json!({"iss": ISSUER, "aud": AUDIENCE, "sub": sub, "iat": now, "nbf": now - 5, "exp": now + 600})
}

/// `claims` signed by `signer`, with its kid in the header.
pub fn jwt(signer: Signer, claims: &Value) -> String {
    jwt_with_kid(signer, signer.kid(), claims)
}

/// `claims` signed by `signer` but claiming to be `kid` (a forged or rotated key).
pub fn jwt_with_kid(signer: Signer, kid: &str, claims: &Value) -> String {
    let mut header = jsonwebtoken::Header::new(signer.alg());
    header.kid = Some(kid.to_owned());
    jsonwebtoken::encode(&header, claims, &signer.encoding_key()).expect("sign test JWT")
}

/// A valid RSA token for `sub`.
pub fn good_jwt(sub: &str) -> String {
    jwt(Signer::Rsa1, &claims(sub))
}

/// An unsigned token (`alg: none`) with a kid the JWKS knows.
pub fn unsigned_jwt(claims: &Value) -> String {
    let b64 = |v: &Value| {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string().as_bytes())
    };
    format!(
        "{}.{}.",
        b64(&json!({"alg": "none", "typ": "JWT", "kid": "rsa-1"})),
        b64(claims)
    )
}

/// An HS256 token "signed" with a secret, claiming kid `rsa-1` (algorithm confusion).
pub fn hs256_jwt(claims: &Value) -> String {
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
    header.kid = Some("rsa-1".into());
    jsonwebtoken::encode(
        &header,
        claims,
        &jsonwebtoken::EncodingKey::from_secret(jwks_json().as_bytes()),
    )
    .expect("sign HS256")
}

/// The external id tollgate gives a JWT identity.
pub fn jwt_external_id(sub: &str) -> String {
    format!("{ISSUER}#{sub}")
}

/// The external id tollgate gives an introspection identity.
pub fn introspection_external_id(sub: &str) -> String {
    format!("introspection#{sub}")
}

/// How a verifier server answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Correct answers.
    Healthy,
    /// 500 with a small JSON body.
    Status500,
    /// 200 `application/json` whose body is not JSON.
    Garbage,
    /// Correct answers, after this long.
    Slow(Duration),
}

/// `http://127.0.0.1:PORT/...` of a port nobody listens on (a verifier that is down).
pub fn closed_port_url(path: &str) -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().unwrap();
    drop(l);
    format!("http://{addr}{path}")
}

async fn serve(app: Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind verifier");
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    addr
}

fn garbage() -> Response {
    (
        StatusCode::OK,
        [("content-type", "application/json")],
        "<html>{not json at all",
    )
        .into_response()
}

fn status500() -> Response {
    (
        StatusCode::INTERNAL_SERVER_ERROR,
        [("content-type", "application/json")],
        r#"{"error":"server_error"}"#,
    )
        .into_response()
}

// ---------------------------------------------------------------------------------------------
// JWKS

struct JwksState {
    mode: Mutex<Mode>,
    body: Mutex<String>,
    hits: AtomicUsize,
}

/// A JWKS endpoint serving the fixture keys.
#[derive(Clone)]
pub struct JwksServer {
    pub addr: SocketAddr,
    state: Arc<JwksState>,
}

impl JwksServer {
    pub async fn start(mode: Mode) -> JwksServer {
        let state = Arc::new(JwksState {
            mode: Mutex::new(mode),
            body: Mutex::new(jwks_json()),
            hits: AtomicUsize::new(0),
        });
        let app = Router::new()
            .fallback(jwks_handler)
            .with_state(state.clone());
        JwksServer {
            addr: serve(app).await,
            state,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}/.well-known/jwks.json", self.addr)
    }

    pub fn set_mode(&self, mode: Mode) {
        *self.state.mode.lock().unwrap() = mode;
    }

    /// Serves another key set from now on.
    pub fn set_keys(&self, jwks: String) {
        *self.state.body.lock().unwrap() = jwks;
    }

    /// How many times the key set was asked for.
    pub fn hits(&self) -> usize {
        self.state.hits.load(Ordering::SeqCst)
    }
}

async fn jwks_handler(State(state): State<Arc<JwksState>>) -> Response {
    state.hits.fetch_add(1, Ordering::SeqCst);
    let mode = *state.mode.lock().unwrap();
    match mode {
        Mode::Status500 => return status500(),
        Mode::Garbage => return garbage(),
        Mode::Slow(d) => tokio::time::sleep(d).await,
        Mode::Healthy => {}
    }
    let body = state.body.lock().unwrap().clone();
    (StatusCode::OK, [("content-type", "application/json")], body).into_response()
}

// ---------------------------------------------------------------------------------------------
// introspection

struct IntrospectionState {
    mode: Mutex<Mode>,
    /// token -> the answer for it; unknown tokens are `{"active": false}`.
    tokens: Mutex<HashMap<String, Value>>,
    /// Tokens asked about, in order.
    asked: Mutex<Vec<String>>,
    /// Calls without the right client credentials.
    bad_client: AtomicUsize,
}

/// An RFC 7662 introspection endpoint (`POST /introspect`, form `token=...`, HTTP Basic client
/// credentials [`INTROSPECTION_CLIENT_ID`]:[`INTROSPECTION_SECRET`]).
#[derive(Clone)]
pub struct IntrospectionServer {
    pub addr: SocketAddr,
    state: Arc<IntrospectionState>,
}

impl IntrospectionServer {
    pub async fn start(mode: Mode) -> IntrospectionServer {
        let state = Arc::new(IntrospectionState {
            mode: Mutex::new(mode),
            tokens: Mutex::new(HashMap::new()),
            asked: Mutex::new(Vec::new()),
            bad_client: AtomicUsize::new(0),
        });
        let app = Router::new()
            .fallback(introspection_handler)
            .with_state(state.clone());
        IntrospectionServer {
            addr: serve(app).await,
            state,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}/introspect", self.addr)
    }

    pub fn set_mode(&self, mode: Mode) {
        *self.state.mode.lock().unwrap() = mode;
    }

    /// `token` is active for `sub` for the next ten minutes.
    pub fn add_active(&self, token: &str, sub: &str) {
        self.add_answer(
            token,
            json!({"active": true, "sub": sub, "exp": unix_now() + 600, "iss": ISSUER, "client_id": "some-app", "token_type": "Bearer"}),
        );
    }

    /// The answer for `token`.
    pub fn add_answer(&self, token: &str, answer: Value) {
        self.state
            .tokens
            .lock()
            .unwrap()
            .insert(token.to_owned(), answer);
    }

    /// How many times `token` was asked about.
    pub fn asked(&self, token: &str) -> usize {
        self.state
            .asked
            .lock()
            .unwrap()
            .iter()
            .filter(|t| *t == token)
            .count()
    }

    /// Calls that did not present the configured client credentials.
    pub fn bad_client_calls(&self) -> usize {
        self.state.bad_client.load(Ordering::SeqCst)
    }
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() && s.is_char_boundary(i + 3) => {
                match u8::from_str_radix(&s[i + 1..i + 3], 16) {
                    Ok(b) => {
                        out.push(b);
                        i += 2;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn form_field(body: &str, name: &str) -> Option<String> {
    body.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (percent_decode(k) == name).then(|| percent_decode(v))
    })
}

async fn introspection_handler(
    State(state): State<Arc<IntrospectionState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let expected = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD
            .encode(format!("{INTROSPECTION_CLIENT_ID}:{INTROSPECTION_SECRET}"))
    );
    let auth = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let body = String::from_utf8_lossy(&body).into_owned();
    let token = form_field(&body, "token").unwrap_or_default();
    state.asked.lock().unwrap().push(token.clone());
    let mode = *state.mode.lock().unwrap();
    match mode {
        Mode::Status500 => return status500(),
        Mode::Garbage => return garbage(),
        Mode::Slow(d) => tokio::time::sleep(d).await,
        Mode::Healthy => {}
    }
    if auth != expected {
        state.bad_client.fetch_add(1, Ordering::SeqCst);
        return (
            StatusCode::UNAUTHORIZED,
            [("content-type", "application/json")],
            r#"{"error":"invalid_client"}"#,
        )
            .into_response();
    }
    let answer = state
        .tokens
        .lock()
        .unwrap()
        .get(&token)
        .cloned()
        .unwrap_or_else(|| json!({"active": false}));
    (
        StatusCode::OK,
        [("content-type", "application/json")],
        answer.to_string(),
    )
        .into_response()
}

// ---------------------------------------------------------------------------------------------
// configuration snippets

/// An `[auth.jwt]` table for `jwks_url` with our issuer and audience, plus `more` lines.
pub fn jwt_table(jwks_url: &str, more: &str) -> String {
    format!(
        "[auth.jwt]\njwks_url = \"{jwks_url}\"\nissuer = \"{ISSUER}\"\naudience = \"{AUDIENCE}\"\n{more}\n\n"
    )
}

/// An `[auth.introspection]` table for `url` with our client credentials, plus `more` lines.
pub fn introspection_table(url: &str, more: &str) -> String {
    format!(
        "[auth.introspection]\nurl = \"{url}\"\nclient_id = \"{INTROSPECTION_CLIENT_ID}\"\nclient_secret = \"{INTROSPECTION_SECRET}\"\n{more}\n\n"
    )
}

// ---------------------------------------------------------------------------------------------
// databases

/// A second handle on the same database (for a second replica); dropping it drops nothing.
pub fn shared_db(db: &TestDb) -> TestDb {
    TestDb {
        url: db.url.clone(),
        backend: db.backend,
        dir: None,
        pg_admin: None,
    }
}

/// Runs one statement against the test database itself (PostgreSQL only).
pub async fn pg_exec_on(db: &TestDb, sql: &str) {
    assert_eq!(db.backend, Backend::Postgres);
    super::pg_execute(&db.url, sql)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
}

#[derive(diesel::QueryableByName)]
struct Count {
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    n: i64,
}

/// `SELECT COUNT(*) AS n FROM users WHERE <condition>` on either backend.
pub async fn count_users(db: &TestDb, condition: &str) -> i64 {
    let sql = format!("SELECT CAST(COUNT(*) AS BIGINT) AS n FROM users WHERE {condition}");
    match db.backend {
        Backend::Postgres => {
            use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
            let mut conn = AsyncPgConnection::establish(&db.url)
                .await
                .unwrap_or_else(|e| panic!("connect {}: {e}", db.url));
            diesel::sql_query(sql)
                .get_result::<Count>(&mut conn)
                .await
                .unwrap_or_else(|e| panic!("count users: {e}"))
                .n
        }
        Backend::Sqlite => {
            let path = db
                .url
                .strip_prefix("sqlite://")
                .expect("sqlite url")
                .to_owned();
            tokio::task::spawn_blocking(move || {
                use diesel::{Connection, RunQueryDsl};
                let mut conn = diesel::SqliteConnection::establish(&path)
                    .unwrap_or_else(|e| panic!("open {path}: {e}"));
                diesel::sql_query("PRAGMA busy_timeout = 5000")
                    .execute(&mut conn)
                    .ok();
                diesel::sql_query(sql)
                    .get_result::<Count>(&mut conn)
                    .unwrap_or_else(|e| panic!("count users: {e}"))
                    .n
            })
            .await
            .expect("count task")
        }
    }
}
