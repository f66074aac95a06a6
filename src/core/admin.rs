//! The admin service: users, API keys, budgets and usage. One `Admin` serves the CLI, the HTTP
//! admin API and the gRPC `tollgate.v1.Admin` service; the adapters only convert. A server's
//! `Admin` also forgets what this process cached about a user, a key or a budget it changed,
//! so the change bites here at once (on other replicas within the cache TTLs).

use std::sync::Arc;

use rand::RngCore;
use subtle::ConstantTimeEq;

use super::auth::{hash_key, key_hint, Authenticator, KEY_PREFIX};
use super::policy::budget::{self as budget_admin, BudgetAdminError};
use super::policy::{BudgetUpdate, BudgetView, Budgets, ScopeKind};
use super::provision::Provisioner;
use crate::config::{Config, StaticKeyConfig};
use crate::store::{ApiKey, ModelUsage, Store, StoreError, UsageFilter, User};

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

/// Which user an admin names: by id or by external id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UserRef {
    Id(i64),
    ExternalId(String),
}

impl UserRef {
    /// A user named on a command line: a number is an id, anything else an external id.
    pub fn parse(id_or_external: &str) -> UserRef {
        match id_or_external.parse::<i64>() {
            Ok(id) => UserRef::Id(id),
            Err(_) => UserRef::ExternalId(id_or_external.to_string()),
        }
    }
}

/// What the usage query answers: per resolved model, and the sum of them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageReport {
    pub models: Vec<ModelUsage>,
    pub total: UsageTotal,
}

/// Requests, tokens and spend summed over the models of a usage report.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UsageTotal {
    pub requests: i64,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    pub cost_micros: i64,
}

/// What a serving process caches about credentials and budgets.
#[derive(Clone)]
pub(crate) struct LocalCaches {
    pub auth: Arc<Authenticator>,
    pub provisioner: Arc<Provisioner>,
    pub budgets: Arc<Budgets>,
}

/// The admin service over the store.
#[derive(Clone)]
pub struct Admin {
    store: Store,
    /// `None` in the CLI, which caches nothing.
    caches: Option<LocalCaches>,
}

impl From<BudgetAdminError> for AdminError {
    fn from(e: BudgetAdminError) -> Self {
        match e {
            BudgetAdminError::Invalid(m) => AdminError::Invalid(m),
            BudgetAdminError::NotFound(m) => AdminError::NotFound(m),
            BudgetAdminError::Store(e) => e.into(),
        }
    }
}

impl Admin {
    /// Admin operations on `store`, with nothing cached to forget (the CLI).
    pub fn new(store: Store) -> Self {
        Self {
            store,
            caches: None,
        }
    }

    /// A serving process's admin: changes also clear this process's caches.
    pub(crate) fn serving(store: Store, caches: LocalCaches) -> Self {
        Self {
            store,
            caches: Some(caches),
        }
    }

    fn forget_credentials(&self) {
        if let Some(c) = &self.caches {
            c.auth.forget_all();
            c.provisioner.forget_all();
        }
    }

    /// Creates a user.
    pub async fn create_user(
        &self,
        external_id: &str,
        name: Option<&str>,
    ) -> Result<User, AdminError> {
        if external_id.trim().is_empty() {
            return Err(AdminError::Invalid("external_id must not be empty".into()));
        }
        Ok(self.store.create_user(external_id, name, "admin").await?)
    }

    /// A user by id or external id.
    pub async fn get_user(&self, user: &UserRef) -> Result<User, AdminError> {
        let found = match user {
            UserRef::Id(id) => self.store.get_user(*id).await?,
            UserRef::ExternalId(x) => self.store.find_user(x).await?,
        };
        found.ok_or_else(|| AdminError::NotFound("user".into()))
    }

    /// A user named on a command line: by numeric id or, failing that, by external id (an
    /// external id may look like a number).
    pub async fn find_user(&self, id_or_external: &str) -> Result<User, AdminError> {
        if let UserRef::Id(id) = UserRef::parse(id_or_external) {
            if let Some(u) = self.store.get_user(id).await? {
                return Ok(u);
            }
        }
        self.get_user(&UserRef::ExternalId(id_or_external.to_string()))
            .await
    }

    /// Creates an API key for an existing user; the returned key is shown once and never
    /// stored.
    pub async fn create_key(
        &self,
        user_id: i64,
        name: Option<&str>,
        expires_at_ms: Option<i64>,
    ) -> Result<CreatedKey, AdminError> {
        self.get_user(&UserRef::Id(user_id)).await?;
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

    /// A user's keys (hints only); `NotFound` for a user that does not exist.
    pub async fn list_keys(&self, user_id: i64) -> Result<Vec<ApiKey>, AdminError> {
        self.get_user(&UserRef::Id(user_id)).await?;
        Ok(self.store.list_api_keys(user_id).await?)
    }

    /// Revokes a key; refused here at once.
    pub async fn revoke_key(&self, key_id: i64) -> Result<ApiKey, AdminError> {
        let key = self.store.revoke_api_key(key_id).await?;
        self.forget_credentials();
        Ok(key)
    }

    /// Blocks a user with a reason; requests fail with `blocked` from now on (on other
    /// replicas once their credential caches expire).
    pub async fn block_user(&self, user_id: i64, reason: &str) -> Result<User, AdminError> {
        let reason = if reason.trim().is_empty() {
            "blocked by an operator"
        } else {
            reason
        };
        let user = self
            .store
            .set_blocked(user_id, Some(reason), self.store.clock().now_ms())
            .await?;
        self.forget_credentials();
        Ok(user)
    }

    /// Lifts a block.
    pub async fn unblock_user(&self, user_id: i64) -> Result<User, AdminError> {
        let user = self
            .store
            .set_blocked(user_id, None, self.store.clock().now_ms())
            .await?;
        self.forget_credentials();
        Ok(user)
    }

    /// Users in id order after `after_id` (0 for the first page); at most 1000 at a time.
    pub async fn list_users(&self, after_id: i64, limit: i64) -> Result<Vec<User>, AdminError> {
        let limit = if limit <= 0 { 100 } else { limit.min(1000) };
        Ok(self.store.list_users(after_id, limit).await?)
    }

    /// The signup cap of every configured service type, with what is used of it now.
    pub async fn signup_caps(&self, config: &Config) -> Result<Vec<SignupCapStatus>, AdminError> {
        let now_ms = self.store.clock().now_ms();
        let mut names: Vec<String> = config.service_types.keys().cloned().collect();
        if names.is_empty() {
            names.push(config.server.default_service_type.clone());
        }
        let mut out = Vec::with_capacity(names.len());
        for name in names {
            let st = config.service_type(&name).cloned().unwrap_or_default();
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

    /// A scope's budget and rate limits as stored; `NotFound` for a user or key that does not
    /// exist (as `set_budget` answers), not an empty budget.
    pub async fn get_budget(&self, scope: ScopeKind, id: i64) -> Result<BudgetView, AdminError> {
        self.ensure_scope_exists(scope, id).await?;
        let now = self.store.clock().now_ms();
        Ok(budget_admin::view(&self.store, now, scope, id).await?)
    }

    /// Sets a scope's budget and rate limits. Takes effect in this process at once and on
    /// other replicas within `budgets.policy_cache_ms` (a changed limit amount at once
    /// everywhere).
    pub async fn set_budget(&self, update: &BudgetUpdate) -> Result<BudgetView, AdminError> {
        let now = self.store.clock().now_ms();
        let view = budget_admin::set(&self.store, now, update).await?;
        if let Some(c) = &self.caches {
            c.budgets.forget((update.scope, update.id));
        }
        Ok(view)
    }

    /// `NotFound` unless the user or key exists.
    async fn ensure_scope_exists(&self, scope: ScopeKind, id: i64) -> Result<(), AdminError> {
        let exists = match scope {
            ScopeKind::User => self.store.get_user(id).await?.is_some(),
            ScopeKind::Key => self.store.api_key_exists(id).await?,
        };
        if exists {
            Ok(())
        } else {
            Err(AdminError::NotFound(format!("{} {id}", scope.as_str())))
        }
    }

    /// Spend and tokens per resolved model, and their sum; `NotFound` when the filter names a
    /// user or key that does not exist.
    pub async fn query_usage(&self, filter: &UsageFilter) -> Result<UsageReport, AdminError> {
        if let Some(id) = filter.user_id {
            self.ensure_scope_exists(ScopeKind::User, id).await?;
        }
        if let Some(id) = filter.key_id {
            self.ensure_scope_exists(ScopeKind::Key, id).await?;
        }
        let models = self.store.usage_by_model(filter).await?;
        let mut total = UsageTotal::default();
        for m in &models {
            total.requests += m.requests;
            total.prompt_tokens += m.prompt_tokens;
            total.completion_tokens += m.completion_tokens;
            total.cost_micros += m.cost_micros;
        }
        Ok(UsageReport { models, total })
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
