//! Administrative operations on users and keys, shared by the CLI and the admin APIs.

use rand::RngCore;
use subtle::ConstantTimeEq;

use super::auth::{hash_key, key_hint, KEY_PREFIX};
use crate::config::{Config, StaticKeyConfig};
use crate::store::{ApiKey, Store, StoreError, User};

/// Why an admin operation failed.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// No or a wrong admin token.
    #[error("admin token missing or wrong")]
    Unauthorized,
    /// The admin API is off: no admin token is configured.
    #[error("the admin API is disabled: set server.admin_token")]
    Disabled,
    /// The thing asked for does not exist.
    #[error("{0} not found")]
    NotFound(String),
    /// The request contradicts what exists (for example a taken external id).
    #[error("{0}")]
    Conflict(String),
    /// The request is malformed.
    #[error("{0}")]
    Invalid(String),
    /// The store could not answer.
    #[error("store unavailable: {0}")]
    Unavailable(String),
}

impl AdminError {
    /// The HTTP status.
    pub fn http_status(&self) -> u16 {
        match self {
            AdminError::Unauthorized => 401,
            AdminError::Disabled => 403,
            AdminError::NotFound(_) => 404,
            AdminError::Conflict(_) => 409,
            AdminError::Invalid(_) => 400,
            AdminError::Unavailable(_) => 503,
        }
    }

    /// The error code string.
    pub fn code(&self) -> &'static str {
        match self {
            AdminError::Unauthorized => "auth_rejected",
            AdminError::Disabled => "admin_disabled",
            AdminError::NotFound(_) => "not_found",
            AdminError::Conflict(_) => "conflict",
            AdminError::Invalid(_) => "invalid_request",
            AdminError::Unavailable(_) => "store_unavailable",
        }
    }
}

impl From<StoreError> for AdminError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound(what) => AdminError::NotFound(what.to_string()),
            StoreError::Query(diesel::result::Error::DatabaseError(
                diesel::result::DatabaseErrorKind::UniqueViolation,
                _,
            )) => AdminError::Conflict("already exists".into()),
            StoreError::Query(diesel::result::Error::DatabaseError(
                diesel::result::DatabaseErrorKind::ForeignKeyViolation,
                _,
            )) => AdminError::NotFound("user".into()),
            other => AdminError::Unavailable(other.to_string()),
        }
    }
}

/// Checks an `authorization` value against the configured admin token, in constant time.
pub fn verify_admin_token(
    configured: Option<&str>,
    authorization: Option<&str>,
) -> Result<(), AdminError> {
    let Some(expected) = configured.filter(|t| !t.is_empty()) else {
        return Err(AdminError::Disabled);
    };
    let presented = authorization
        .and_then(|a| a.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, t)| t.trim())
        .unwrap_or("");
    if bool::from(presented.as_bytes().ct_eq(expected.as_bytes())) {
        Ok(())
    } else {
        Err(AdminError::Unauthorized)
    }
}

/// A key just created: the only moment the key itself is known.
#[derive(Debug)]
pub struct CreatedKey {
    pub key: String,
    pub record: ApiKey,
}

/// A service type's signup cap and its use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignupCapStatus {
    pub service_type: String,
    pub cap_per_day: Option<u64>,
    /// Users provisioned in the last 24 hours.
    pub used_24h: i64,
    pub cap_total: Option<u64>,
    pub used_total: i64,
    /// New users still accepted now, under both caps; `None` when uncapped.
    pub remaining: Option<i64>,
}

/// Admin operations over the store.
#[derive(Clone)]
pub struct Admin {
    store: Store,
}

impl Admin {
    /// Admin operations on `store`.
    pub fn new(store: Store) -> Self {
        Self { store }
    }

    /// Creates a user.
    pub async fn create_user(
        &self,
        external_id: &str,
        name: Option<&str>,
    ) -> Result<User, StoreError> {
        self.store.create_user(external_id, name, "admin").await
    }

    /// Finds a user by numeric id or, failing that, by external id.
    pub async fn find_user(&self, id_or_external: &str) -> Result<User, StoreError> {
        if let Ok(id) = id_or_external.parse::<i64>() {
            if let Some(u) = self.store.get_user(id).await? {
                return Ok(u);
            }
        }
        self.store
            .find_user(id_or_external)
            .await?
            .ok_or(StoreError::NotFound("user"))
    }

    /// Creates an API key for a user; the returned key is shown once and never stored.
    pub async fn create_key(
        &self,
        user_id: i64,
        name: Option<&str>,
        expires_at_ms: Option<i64>,
    ) -> Result<CreatedKey, StoreError> {
        let mut secret = [0u8; 24];
        rand::rng().fill_bytes(&mut secret);
        let key = format!("{KEY_PREFIX}{}", hex::encode(secret));
        let record = self
            .store
            .insert_api_key(
                user_id,
                name,
                &hash_key(&key),
                &key_hint(&key),
                "admin",
                expires_at_ms,
            )
            .await?;
        Ok(CreatedKey { key, record })
    }

    /// A user's keys (hints only).
    pub async fn list_keys(&self, user_id: i64) -> Result<Vec<ApiKey>, StoreError> {
        self.store.list_api_keys(user_id).await
    }

    /// Revokes a key.
    pub async fn revoke_key(&self, key_id: i64) -> Result<ApiKey, StoreError> {
        self.store.revoke_api_key(key_id).await
    }

    /// Blocks a user with a reason; requests fail with `blocked` from now on (on other
    /// replicas once their credential caches expire).
    pub async fn block_user(&self, user_id: i64, reason: &str) -> Result<User, StoreError> {
        let reason = if reason.trim().is_empty() {
            "blocked by an operator"
        } else {
            reason
        };
        self.store
            .set_blocked(user_id, Some(reason), self.store.clock().now_ms())
            .await
    }

    /// Lifts a block.
    pub async fn unblock_user(&self, user_id: i64) -> Result<User, StoreError> {
        self.store
            .set_blocked(user_id, None, self.store.clock().now_ms())
            .await
    }

    /// Users in id order after `after_id` (0 for the first page); at most 1000 at a time.
    pub async fn list_users(&self, after_id: i64, limit: i64) -> Result<Vec<User>, StoreError> {
        let limit = if limit <= 0 { 100 } else { limit.min(1000) };
        self.store.list_users(after_id, limit).await
    }

    /// The signup cap of every configured service type, with what is used of it.
    pub async fn signup_caps(
        &self,
        config: &Config,
        now_ms: i64,
    ) -> Result<Vec<SignupCapStatus>, StoreError> {
        let mut names: Vec<String> = config.service_types.keys().cloned().collect();
        if names.is_empty() {
            names.push(config.server.default_service_type.clone());
        }
        let mut out = Vec::with_capacity(names.len());
        for name in names {
            let st = config.service_type(&name).unwrap_or_default();
            let used = self.store.signup_usage(&name, now_ms).await?;
            let remaining = |cap: Option<u64>, used: i64| cap.map(|c| (c as i64 - used).max(0));
            let remaining = match (
                remaining(st.signup_cap_per_day, used.used_24h),
                remaining(st.signup_cap_total, used.used_total),
            ) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            out.push(SignupCapStatus {
                service_type: name,
                cap_per_day: st.signup_cap_per_day,
                used_24h: used.used_24h,
                cap_total: st.signup_cap_total,
                used_total: used.used_total,
                remaining,
            });
        }
        Ok(out)
    }

    /// Makes sure every key declared in the configuration exists, with its user.
    pub async fn sync_static_keys(&self, keys: &[StaticKeyConfig]) -> Result<(), StoreError> {
        for k in keys {
            let user = self
                .store
                .ensure_user(&k.user, Some(&k.user), "static_key")
                .await?;
            self.store
                .upsert_static_key(
                    user.id,
                    k.name.as_deref(),
                    &hash_key(&k.key),
                    &key_hint(&k.key),
                )
                .await?;
        }
        Ok(())
    }
}
