//! Users and their API keys.

use diesel::prelude::*;
use diesel::OptionalExtension;
use diesel_async::RunQueryDsl;

use super::schema::{api_keys, users};
use super::{with_conn, Store, StoreError};

/// A user row.
#[derive(Debug, Clone, Queryable, Selectable, PartialEq, Eq)]
#[diesel(table_name = users)]
pub struct User {
    pub id: i64,
    pub external_id: String,
    pub name: Option<String>,
    pub auth_method: String,
    pub service_type: Option<String>,
    pub blocked: bool,
    pub blocked_reason: Option<String>,
    pub blocked_at: Option<i64>,
    pub created_at: i64,
}

/// An API key row; the key itself is never stored, only its SHA-256.
#[derive(Debug, Clone, Queryable, Selectable, PartialEq, Eq)]
#[diesel(table_name = api_keys)]
pub struct ApiKey {
    pub id: i64,
    pub user_id: i64,
    pub name: Option<String>,
    pub key_hash: String,
    pub hint: String,
    pub source: String,
    pub created_at: i64,
    pub expires_at: Option<i64>,
    pub revoked_at: Option<i64>,
}

/// A key together with the user it belongs to.
#[derive(Debug, Clone)]
pub struct KeyOwner {
    pub key: ApiKey,
    pub user: User,
}

#[derive(Insertable)]
#[diesel(table_name = users)]
struct NewUser<'a> {
    external_id: &'a str,
    name: Option<&'a str>,
    auth_method: &'a str,
    service_type: Option<&'a str>,
    blocked: bool,
    created_at: i64,
}

#[derive(Insertable)]
#[diesel(table_name = api_keys)]
struct NewApiKey<'a> {
    user_id: i64,
    name: Option<&'a str>,
    key_hash: &'a str,
    hint: &'a str,
    source: &'a str,
    created_at: i64,
    expires_at: Option<i64>,
}

impl Store {
    /// Creates a user; fails if the external id is taken.
    pub async fn create_user(
        &self,
        external_id: &str,
        name: Option<&str>,
        auth_method: &str,
    ) -> Result<User, StoreError> {
        let row = NewUser {
            external_id,
            name,
            auth_method,
            service_type: None,
            blocked: false,
            created_at: self.clock().now_ms(),
        };
        with_conn!(self, conn => {
            Ok(diesel::insert_into(users::table)
                .values(&row)
                .returning(User::as_returning())
                .get_result(conn)
                .await?)
        })
    }

    /// Returns the user with this external id, creating it if absent (race-free: concurrent
    /// callers get the same row).
    pub async fn ensure_user(
        &self,
        external_id: &str,
        name: Option<&str>,
        auth_method: &str,
    ) -> Result<User, StoreError> {
        let row = NewUser {
            external_id,
            name,
            auth_method,
            service_type: None,
            blocked: false,
            created_at: self.clock().now_ms(),
        };
        with_conn!(self, conn => {
            diesel::insert_into(users::table)
                .values(&row)
                .on_conflict(users::external_id)
                .do_nothing()
                .execute(conn)
                .await?;
            Ok(users::table
                .filter(users::external_id.eq(external_id))
                .select(User::as_select())
                .first(conn)
                .await?)
        })
    }

    /// A user by id.
    pub async fn get_user(&self, id: i64) -> Result<Option<User>, StoreError> {
        with_conn!(self, conn => {
            Ok(users::table
                .find(id)
                .select(User::as_select())
                .first(conn)
                .await
                .optional()?)
        })
    }

    /// A user by external id.
    pub async fn find_user(&self, external_id: &str) -> Result<Option<User>, StoreError> {
        with_conn!(self, conn => {
            Ok(users::table
                .filter(users::external_id.eq(external_id))
                .select(User::as_select())
                .first(conn)
                .await
                .optional()?)
        })
    }

    /// Stores a new key's hash for a user.
    pub async fn insert_api_key(
        &self,
        user_id: i64,
        name: Option<&str>,
        key_hash: &str,
        hint: &str,
        source: &str,
        expires_at: Option<i64>,
    ) -> Result<ApiKey, StoreError> {
        let row = NewApiKey {
            user_id,
            name,
            key_hash,
            hint,
            source,
            created_at: self.clock().now_ms(),
            expires_at,
        };
        with_conn!(self, conn => {
            Ok(diesel::insert_into(api_keys::table)
                .values(&row)
                .returning(ApiKey::as_returning())
                .get_result(conn)
                .await?)
        })
    }

    /// Stores a key declared in configuration unless its hash is already there; clears a
    /// revocation so that a key put back in the file works again.
    pub async fn upsert_static_key(
        &self,
        user_id: i64,
        name: Option<&str>,
        key_hash: &str,
        hint: &str,
    ) -> Result<(), StoreError> {
        let row = NewApiKey {
            user_id,
            name,
            key_hash,
            hint,
            source: "config",
            created_at: self.clock().now_ms(),
            expires_at: None,
        };
        with_conn!(self, conn => {
            diesel::insert_into(api_keys::table)
                .values(&row)
                .on_conflict(api_keys::key_hash)
                .do_nothing()
                .execute(conn)
                .await?;
            Ok(())
        })
    }

    /// The key with this hash and its owner, if any (revoked and expired keys included: the
    /// caller decides).
    pub async fn find_key_by_hash(&self, key_hash: &str) -> Result<Option<KeyOwner>, StoreError> {
        with_conn!(self, conn => {
            let found: Option<(ApiKey, User)> = api_keys::table
                .inner_join(users::table)
                .filter(api_keys::key_hash.eq(key_hash))
                .select((ApiKey::as_select(), User::as_select()))
                .first(conn)
                .await
                .optional()?;
            Ok(found.map(|(key, user)| KeyOwner { key, user }))
        })
    }

    /// A user's keys, newest first.
    pub async fn list_api_keys(&self, user_id: i64) -> Result<Vec<ApiKey>, StoreError> {
        with_conn!(self, conn => {
            Ok(api_keys::table
                .filter(api_keys::user_id.eq(user_id))
                .order(api_keys::id.desc())
                .select(ApiKey::as_select())
                .load(conn)
                .await?)
        })
    }

    /// Revokes a key; returns it, or `NotFound`.
    pub async fn revoke_api_key(&self, key_id: i64) -> Result<ApiKey, StoreError> {
        let now = self.clock().now_ms();
        with_conn!(self, conn => {
            diesel::update(api_keys::table.find(key_id).filter(api_keys::revoked_at.is_null()))
                .set(api_keys::revoked_at.eq(Some(now)))
                .execute(conn)
                .await?;
            api_keys::table
                .find(key_id)
                .select(ApiKey::as_select())
                .first(conn)
                .await
                .optional()?
                .ok_or(StoreError::NotFound("api key"))
        })
    }
}
