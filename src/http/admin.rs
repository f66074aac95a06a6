//! `/admin/...`: users, API keys and upstream key pools, behind the admin token; and the
//! unauthenticated `GET /v1/health` snapshot.

use std::sync::Arc;

use axum::extract::rejection::{JsonRejection, PathRejection};
use axum::extract::{Path, Query, Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use http::StatusCode;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::core::admin::{AdminError, UserRef};
use crate::core::Gateway;
use crate::providers::key_pool::KeySnapshot;
use crate::store::{ApiKey, User};

/// What an admin handler answers.
pub(super) type AdminResult = Result<Response, AdminError>;

/// A JSON body whose rejection is an admin error in the API's JSON shape, not axum's text.
pub struct AdminJson<T>(pub T);

impl<T, S> axum::extract::FromRequest<S> for AdminJson<T>
where
    T: serde::de::DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = AdminError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        Json::<T>::from_request(req, state)
            .await
            .map(|Json(v)| AdminJson(v))
            .map_err(json_rejection)
    }
}

/// A path parameter whose rejection is an admin error in the API's JSON shape.
pub struct AdminPath<T>(pub T);

impl<T, S> axum::extract::FromRequestParts<S> for AdminPath<T>
where
    T: serde::de::DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = AdminError;

    async fn from_request_parts(
        parts: &mut http::request::Parts,
        state: &S,
    ) -> Result<Self, Self::Rejection> {
        Path::<T>::from_request_parts(parts, state)
            .await
            .map(|Path(v)| AdminPath(v))
            .map_err(path_rejection)
    }
}

/// A query string whose rejection is an admin error in the API's JSON shape.
pub struct AdminQuery<T>(pub T);

impl<T, S> axum::extract::FromRequestParts<S> for AdminQuery<T>
where
    T: serde::de::DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = AdminError;

    async fn from_request_parts(
        parts: &mut http::request::Parts,
        state: &S,
    ) -> Result<Self, Self::Rejection> {
        Query::<T>::from_request_parts(parts, state)
            .await
            .map(|Query(v)| AdminQuery(v))
            .map_err(|e| {
                let text = e.body_text();
                let detail = text
                    .strip_prefix("Failed to deserialize query string: ")
                    .unwrap_or(&text);
                AdminError::Invalid(format!("invalid query: {detail}"))
            })
    }
}

/// A body the admin API cannot read, said in its own words (axum's text names Rust types).
fn json_rejection(e: JsonRejection) -> AdminError {
    let text = e.body_text();
    let detail = |prefix: &str| text.strip_prefix(prefix).unwrap_or(&text).to_string();
    AdminError::Invalid(match e {
        JsonRejection::MissingJsonContentType(_) => {
            "the body must be JSON, sent with `Content-Type: application/json`".into()
        }
        JsonRejection::JsonSyntaxError(_) => format!(
            "the body is not valid JSON: {}",
            detail("Failed to parse the request body as JSON: ")
        ),
        JsonRejection::JsonDataError(_) => format!(
            "invalid body: {}",
            detail("Failed to deserialize the JSON body into the target type: ")
        ),
        _ => format!("could not read the body: {text}"),
    })
}

/// A path parameter that does not parse: only ids are typed, so it names the value as a
/// number that is not one.
fn path_rejection(e: PathRejection) -> AdminError {
    if let PathRejection::FailedToDeserializePathParams(p) = &e {
        use axum::extract::path::ErrorKind;
        if let ErrorKind::ParseErrorAtKey { value, .. }
        | ErrorKind::ParseErrorAtIndex { value, .. }
        | ErrorKind::ParseError { value, .. } = p.kind()
        {
            return AdminError::Invalid(format!("`{value}` in the path is not an id (a number)"));
        }
    }
    AdminError::Invalid(format!("invalid path: {}", e.body_text()))
}

/// A number given as text (query strings), naming the parameter when it is not one.
pub(super) fn number(name: &str, value: Option<&str>) -> Result<Option<i64>, AdminError> {
    match value.map(str::trim).filter(|v| !v.is_empty()) {
        None => Ok(None),
        Some(v) => v
            .parse()
            .map(Some)
            .map_err(|_| AdminError::Invalid(format!("`{name}` must be a number, not {v:?}"))),
    }
}

/// A user as a body or query names it: a numeric id, or text that is a numeric id or, failing
/// that, an external id (as the CLI resolves `--user`).
#[derive(Debug, Clone)]
pub(super) enum UserName {
    Id(i64),
    Text(String),
}

impl<'de> Deserialize<'de> for UserName {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match Value::deserialize(d)? {
            Value::Number(n) => n
                .as_i64()
                .map(UserName::Id)
                .ok_or_else(|| serde::de::Error::custom(format!("{n} is not an id (an integer)"))),
            Value::String(s) => Ok(UserName::Text(s)),
            other => Err(serde::de::Error::custom(format!(
                "expected an id or an external id, not {other}"
            ))),
        }
    }
}

impl UserName {
    /// The user's id; `NotFound` when there is no such user.
    pub(super) async fn user_id(&self, gw: &Gateway) -> Result<i64, AdminError> {
        let user = match self {
            UserName::Id(id) => gw.admin().get_user(&UserRef::Id(*id)).await?,
            UserName::Text(s) => gw.admin().find_user(s).await?,
        };
        Ok(user.id)
    }

    /// The id of an API key, which is only ever named by number.
    pub(super) fn key_id(&self) -> Result<i64, AdminError> {
        match self {
            UserName::Id(id) => Ok(*id),
            UserName::Text(s) => number("id", Some(s))?
                .ok_or_else(|| AdminError::Invalid("`id` must be a key id (a number)".into())),
        }
    }
}

impl IntoResponse for AdminError {
    fn into_response(self) -> Response {
        let status =
            StatusCode::from_u16(self.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let body = json!({"error": {"message": self.to_string(), "type": "admin_error", "code": self.code(), "param": null}});
        (status, Json(body)).into_response()
    }
}

/// Refuses requests without the admin token, in the admin error shape.
pub(super) async fn require_admin(
    State(gw): State<Arc<Gateway>>,
    req: Request,
    next: Next,
) -> Response {
    let auth = req
        .headers()
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    match gw.check_admin(auth) {
        Ok(()) => next.run(req).await,
        Err(e) => e.into_response(),
    }
}

/// A user as JSON.
pub fn user_json(u: &User) -> Value {
    json!({
        "id": u.id,
        "external_id": u.external_id,
        "name": u.name,
        "auth_method": u.auth_method,
        "blocked": u.blocked,
        "blocked_reason": u.blocked_reason,
        "blocked_at": u.blocked_at,
        "created_at": u.created_at,
        "service_type": u.service_type,
    })
}

/// A key as JSON: hint only.
pub fn key_json(k: &ApiKey) -> Value {
    json!({
        "id": k.id,
        "user_id": k.user_id,
        "name": k.name,
        "hint": k.hint,
        "source": k.source,
        "created_at": k.created_at,
        "expires_at": k.expires_at,
        "revoked_at": k.revoked_at,
    })
}

fn snapshot_json(k: &KeySnapshot) -> Value {
    json!({
        "hint": k.hint,
        "state": k.state.as_str(),
        "reason": k.reason.map(|r| r.as_str()),
        "cooldown_until_ms": k.cooldown_until_ms,
    })
}

#[derive(Deserialize)]
pub(super) struct CreateUser {
    external_id: String,
    name: Option<String>,
}

pub(super) async fn create_user(
    State(gw): State<Arc<Gateway>>,
    AdminJson(body): AdminJson<CreateUser>,
) -> AdminResult {
    let u = gw
        .admin()
        .create_user(&body.external_id, body.name.as_deref())
        .await?;
    Ok((StatusCode::CREATED, Json(user_json(&u))).into_response())
}

#[derive(Deserialize)]
pub(super) struct FindUser {
    external_id: Option<String>,
    after_id: Option<String>,
    limit: Option<String>,
}

/// `?external_id=` finds one user; without it, a page of users in id order.
pub(super) async fn find_user(
    State(gw): State<Arc<Gateway>>,
    AdminQuery(q): AdminQuery<FindUser>,
) -> AdminResult {
    if let Some(external_id) = q.external_id {
        let u = gw
            .admin()
            .get_user(&UserRef::ExternalId(external_id))
            .await?;
        return Ok(Json(user_json(&u)).into_response());
    }
    let after_id = number("after_id", q.after_id.as_deref())?.unwrap_or(0);
    let limit = number("limit", q.limit.as_deref())?.unwrap_or(100);
    let users = gw.admin().list_users(after_id, limit).await?;
    Ok(Json(json!({"users": users.iter().map(user_json).collect::<Vec<_>>()})).into_response())
}

#[derive(Deserialize, Default)]
pub(super) struct BlockUser {
    #[serde(default)]
    reason: String,
}

pub(super) async fn block_user(
    State(gw): State<Arc<Gateway>>,
    AdminPath(user): AdminPath<String>,
    body: axum::body::Bytes,
) -> AdminResult {
    // The body is optional: an empty one blocks with a default reason.
    let reason = if body.iter().all(u8::is_ascii_whitespace) {
        String::new()
    } else {
        serde_json::from_slice::<BlockUser>(&body)
            .map_err(|e| AdminError::Invalid(format!("bad JSON body: {e}")))?
            .reason
    };
    let id = gw.admin().find_user(&user).await?.id;
    let u = gw.admin().block_user(id, &reason).await?;
    Ok(Json(user_json(&u)).into_response())
}

pub(super) async fn unblock_user(
    State(gw): State<Arc<Gateway>>,
    AdminPath(user): AdminPath<String>,
) -> AdminResult {
    let id = gw.admin().find_user(&user).await?.id;
    let u = gw.admin().unblock_user(id).await?;
    Ok(Json(user_json(&u)).into_response())
}

pub(super) async fn signup_cap(State(gw): State<Arc<Gateway>>) -> AdminResult {
    let rt = gw.runtime();
    let caps = gw.admin().signup_caps(&rt.config).await?;
    let data: Vec<Value> = caps
        .iter()
        .map(|c| {
            json!({
                "service_type": c.service_type,
                "cap_per_day": c.cap_per_day,
                "used_24h": c.used_24h,
                "cap_total": c.cap_total,
                "used_total": c.used_total,
                "remaining": c.remaining,
            })
        })
        .collect();
    Ok(Json(json!({"service_types": data})).into_response())
}

pub(super) async fn get_user(
    State(gw): State<Arc<Gateway>>,
    AdminPath(user): AdminPath<String>,
) -> AdminResult {
    let u = gw.admin().find_user(&user).await?;
    Ok(Json(user_json(&u)).into_response())
}

#[derive(Deserialize)]
pub(super) struct CreateKey {
    user_id: UserName,
    name: Option<String>,
    expires_at: Option<i64>,
}

pub(super) async fn create_key(
    State(gw): State<Arc<Gateway>>,
    AdminJson(body): AdminJson<CreateKey>,
) -> AdminResult {
    let user_id = body.user_id.user_id(&gw).await?;
    let created = gw
        .admin()
        .create_key(user_id, body.name.as_deref(), body.expires_at)
        .await?;
    Ok((
        StatusCode::CREATED,
        Json(json!({"id": created.record.id, "key": created.key, "hint": created.record.hint})),
    )
        .into_response())
}

#[derive(Deserialize)]
pub(super) struct ListKeys {
    user_id: String,
}

pub(super) async fn list_keys(
    State(gw): State<Arc<Gateway>>,
    AdminQuery(q): AdminQuery<ListKeys>,
) -> AdminResult {
    let user_id = gw.admin().find_user(&q.user_id).await?.id;
    let keys = gw.admin().list_keys(user_id).await?;
    Ok(Json(json!({"data": keys.iter().map(key_json).collect::<Vec<_>>()})).into_response())
}

pub(super) async fn revoke_key(
    State(gw): State<Arc<Gateway>>,
    AdminPath(id): AdminPath<i64>,
) -> AdminResult {
    let k = gw.admin().revoke_key(id).await?;
    Ok(Json(key_json(&k)).into_response())
}

pub(super) async fn upstream_keys(State(gw): State<Arc<Gateway>>) -> AdminResult {
    Ok(Json(health_json(&gw)).into_response())
}

pub(super) async fn reload(State(gw): State<Arc<Gateway>>) -> AdminResult {
    gw.reload().await.map_err(AdminError::Invalid)?;
    Ok(Json(json!({"reloaded": true})).into_response())
}

pub(super) async fn enable_upstream_key(
    State(gw): State<Arc<Gateway>>,
    AdminPath((provider, hint)): AdminPath<(String, String)>,
) -> AdminResult {
    let n = gw.enable_upstream_key(&provider, &hint)?;
    Ok(Json(json!({"enabled": n})).into_response())
}

fn health_json(gw: &Gateway) -> Value {
    let providers: Vec<Value> = gw
        .provider_status()
        .into_iter()
        .map(|p| {
            json!({
                "provider": p.provider,
                "healthy": p.health.healthy,
                "consecutive_failures": p.health.consecutive_failures,
                "last_error": p.health.last_error,
                "unhealthy_until_ms": p.health.unhealthy_until_ms,
                "keys": p.keys.iter().map(snapshot_json).collect::<Vec<_>>(),
            })
        })
        .collect();
    json!({"providers": providers})
}

/// `GET /v1/health`: each provider's health and key pool (hints only).
pub async fn health(State(gw): State<Arc<Gateway>>) -> Response {
    Json(health_json(&gw)).into_response()
}

/// `GET /v1/aliases`: each alias with its description and chain.
pub async fn aliases(State(gw): State<Arc<Gateway>>) -> Response {
    let rt = gw.runtime();
    let data: Vec<Value> = rt
        .router
        .aliases()
        .iter()
        .map(|(name, a)| json!({"alias": name, "description": a.description, "chain": a.chain}))
        .collect();
    Json(json!({"data": data})).into_response()
}

#[cfg(test)]
pub(super) mod tests {
    use std::collections::BTreeSet;

    use prost::Message;

    use super::*;

    /// The field names of a `tollgate.v1` message, with the proto's `_ms` suffix dropped (JSON
    /// gives the same unix milliseconds without it).
    pub(in crate::http) fn proto_fields(message: &str) -> BTreeSet<String> {
        let set = prost_types::FileDescriptorSet::decode(crate::proto::FILE_DESCRIPTOR_SET)
            .expect("descriptor set");
        let m = set
            .file
            .iter()
            .filter(|f| f.package() == "tollgate.v1")
            .flat_map(|f| f.message_type.iter())
            .find(|m| m.name() == message)
            .unwrap_or_else(|| panic!("no message {message}"));
        m.field
            .iter()
            .map(|f| f.name().trim_end_matches("_ms").to_string())
            .collect()
    }

    pub(in crate::http) fn json_fields(v: &Value) -> BTreeSet<String> {
        v.as_object().expect("object").keys().cloned().collect()
    }

    #[test]
    fn user_and_key_json_agree_with_the_proto_field_for_field() {
        let user = User {
            id: 1,
            external_id: "x".into(),
            name: None,
            auth_method: "admin".into(),
            service_type: Some("default".into()),
            blocked: false,
            blocked_reason: None,
            blocked_at: None,
            created_at: 0,
        };
        assert_eq!(json_fields(&user_json(&user)), proto_fields("User"));
        let key = ApiKey {
            id: 1,
            user_id: 1,
            name: None,
            key_hash: "h".into(),
            hint: "tg-...abcd".into(),
            source: "admin".into(),
            created_at: 0,
            expires_at: None,
            revoked_at: None,
        };
        assert_eq!(json_fields(&key_json(&key)), proto_fields("ApiKeyInfo"));
    }
}
