//! Provisioning users on first sight, under a signup cap that holds across replicas, and the
//! user administration that goes with it (block, unblock, list).
//!
//! The cap is checked and the user inserted in one statement. On SQLite a statement is atomic
//! against every other writer. On PostgreSQL two concurrent statements could each count the
//! same rows, so signups of one service type are serialised by a transaction-scoped advisory
//! lock first; the lock is held only for the insert, and only by requests that sign someone up.

use diesel::prelude::*;
use diesel::sql_types::{BigInt, Text};
use diesel_async::{AsyncConnection, RunQueryDsl};

use super::schema::users;
use super::users::User;
use super::{Store, StoreError};

/// The `auth_method` values of users created by provisioning; only they count as signups.
pub const PROVISIONED_METHODS: [&str; 2] = ["jwt", "introspection"];

const DAY_MS: i64 = 24 * 60 * 60 * 1000;

/// The limits on new users of one service type.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SignupCap {
    /// New users per rolling 24 hours.
    pub per_day: Option<u64>,
    /// New users ever.
    pub total: Option<u64>,
}

/// Signups of one service type so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SignupUsage {
    pub used_24h: i64,
    pub used_total: i64,
}

/// What provisioning an identity did.
#[derive(Debug, Clone)]
pub enum Provisioned {
    /// The identity already had a user.
    Existing(User),
    /// A user was created for it now.
    Created(User),
    /// The identity is new and the service type's cap is reached.
    CapExceeded,
}

#[derive(QueryableByName)]
struct Count {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

fn cap_value(c: Option<u64>) -> i64 {
    c.map(|v| i64::try_from(v).unwrap_or(i64::MAX))
        .unwrap_or(i64::MAX)
}

const INSERT_SQLITE: &str = "INSERT INTO users (external_id, name, auth_method, service_type, blocked, created_at) \
     SELECT ?, NULL, ?, ?, 0, ? \
     WHERE (SELECT count(*) FROM users WHERE service_type = ? AND auth_method IN ('jwt', 'introspection') AND created_at > ?) < ? \
       AND (SELECT count(*) FROM users WHERE service_type = ? AND auth_method IN ('jwt', 'introspection')) < ? \
     ON CONFLICT (external_id) DO NOTHING";

const INSERT_POSTGRES: &str = "INSERT INTO users (external_id, name, auth_method, service_type, blocked, created_at) \
     SELECT $1, NULL, $2, $3, FALSE, $4 \
     WHERE (SELECT count(*) FROM users WHERE service_type = $5 AND auth_method IN ('jwt', 'introspection') AND created_at > $6) < $7 \
       AND (SELECT count(*) FROM users WHERE service_type = $8 AND auth_method IN ('jwt', 'introspection')) < $9 \
     ON CONFLICT (external_id) DO NOTHING";

const COUNT_SQLITE: &str = "SELECT count(*) AS n FROM users WHERE service_type = ? \
     AND auth_method IN ('jwt', 'introspection') AND created_at > ?";
const COUNT_POSTGRES: &str = "SELECT count(*) AS n FROM users WHERE service_type = $1 \
     AND auth_method IN ('jwt', 'introspection') AND created_at > $2";

macro_rules! insert_capped {
    ($sql:expr, $conn:expr, $ext:expr, $method:expr, $st:expr, $now:expr, $cap:expr) => {
        diesel::sql_query($sql)
            .bind::<Text, _>($ext)
            .bind::<Text, _>($method)
            .bind::<Text, _>($st)
            .bind::<BigInt, _>($now)
            .bind::<Text, _>($st)
            .bind::<BigInt, _>($now - DAY_MS)
            .bind::<BigInt, _>(cap_value($cap.per_day))
            .bind::<Text, _>($st)
            .bind::<BigInt, _>(cap_value($cap.total))
            .execute($conn)
            .await
    };
}

impl Store {
    /// The user of an identity, created now if it is new and the service type's cap allows.
    /// Concurrent calls for one new identity create one user.
    pub async fn provision_user(
        &self,
        external_id: &str,
        auth_method: &str,
        service_type: &str,
        cap: SignupCap,
        now_ms: i64,
    ) -> Result<Provisioned, StoreError> {
        if let Some(u) = self.find_user(external_id).await? {
            return Ok(Provisioned::Existing(u));
        }
        let inserted = match self {
            Store::Sqlite { pool, .. } => {
                let mut conn = pool
                    .get()
                    .await
                    .map_err(|e| StoreError::Unavailable(e.to_string()))?;
                insert_capped!(
                    INSERT_SQLITE,
                    &mut *conn,
                    external_id,
                    auth_method,
                    service_type,
                    now_ms,
                    cap
                )?
            }
            Store::Postgres { pool, .. } => {
                let mut conn = pool
                    .get()
                    .await
                    .map_err(|e| StoreError::Unavailable(e.to_string()))?;
                let key = format!("tollgate-signup:{service_type}");
                conn.transaction::<_, diesel::result::Error, _>(async |conn| {
                    diesel::sql_query("SELECT pg_advisory_xact_lock(hashtext($1))")
                        .bind::<Text, _>(&key)
                        .execute(conn)
                        .await?;
                    insert_capped!(
                        INSERT_POSTGRES,
                        conn,
                        external_id,
                        auth_method,
                        service_type,
                        now_ms,
                        cap
                    )
                })
                .await?
            }
        };
        // Nothing inserted: either another request created this identity just now, or the cap
        // is reached.
        match self.find_user(external_id).await? {
            Some(u) if inserted == 1 => Ok(Provisioned::Created(u)),
            Some(u) => Ok(Provisioned::Existing(u)),
            None => Ok(Provisioned::CapExceeded),
        }
    }

    /// Signups of a service type in the 24 hours before `now_ms`, and in total.
    pub async fn signup_usage(
        &self,
        service_type: &str,
        now_ms: i64,
    ) -> Result<SignupUsage, StoreError> {
        let sql = match self {
            Store::Sqlite { .. } => COUNT_SQLITE,
            Store::Postgres { .. } => COUNT_POSTGRES,
        };
        let first = |rows: Vec<Count>| rows.into_iter().next().map(|c| c.n).unwrap_or(0);
        super::with_conn!(self, conn => {
            let day: Vec<Count> = diesel::sql_query(sql)
                .bind::<Text, _>(service_type)
                .bind::<BigInt, _>(now_ms - DAY_MS)
                .load(conn)
                .await?;
            let total: Vec<Count> = diesel::sql_query(sql)
                .bind::<Text, _>(service_type)
                .bind::<BigInt, _>(i64::MIN)
                .load(conn)
                .await?;
            Ok(SignupUsage {
                used_24h: first(day),
                used_total: first(total),
            })
        })
    }

    /// Blocks (with a reason) or unblocks a user; returns it, or `NotFound`.
    pub async fn set_blocked(
        &self,
        user_id: i64,
        blocked: Option<&str>,
        now_ms: i64,
    ) -> Result<User, StoreError> {
        let (flag, reason, at) = match blocked {
            Some(r) => (true, Some(r.to_string()), Some(now_ms)),
            None => (false, None, None),
        };
        super::with_conn!(self, conn => {
            diesel::update(users::table.find(user_id))
                .set((
                    users::blocked.eq(flag),
                    users::blocked_reason.eq(reason),
                    users::blocked_at.eq(at),
                ))
                .execute(conn)
                .await?;
            users::table
                .find(user_id)
                .select(User::as_select())
                .first(conn)
                .await
                .optional()?
                .ok_or(StoreError::NotFound("user"))
        })
    }

    /// Users in id order, after `after_id`, at most `limit`.
    pub async fn list_users(&self, after_id: i64, limit: i64) -> Result<Vec<User>, StoreError> {
        super::with_conn!(self, conn => {
            Ok(users::table
                .filter(users::id.gt(after_id))
                .order(users::id.asc())
                .limit(limit)
                .select(User::as_select())
                .load(conn)
                .await?)
        })
    }
}
