//! Persistence: users, API keys and the usage ledger, on SQLite (embedded) or PostgreSQL
//! (shared by replicas), through diesel-async. Every query is written once and run on
//! whichever backend is configured.

mod budgets;
mod ledger;
pub mod schema;
mod signups;
mod users;

use std::time::Duration;

use deadpool::managed::Metrics;
use diesel::sqlite::SqliteConnection;
use diesel::Connection as _;
use diesel_async::async_connection_wrapper::AsyncConnectionWrapper;
use diesel_async::pooled_connection::deadpool::Pool;
use diesel_async::pooled_connection::{AsyncDieselConnectionManager, ManagerConfig};
use diesel_async::sync_connection_wrapper::SyncConnectionWrapper;
use diesel_async::{AsyncPgConnection, SimpleAsyncConnection};
use diesel_migrations::{embed_migrations, EmbeddedMigrations, MigrationHarness};

use crate::clock::Clock;

pub use budgets::{
    BudgetRow, LeaseGrow, ModelUsage, RateLimitRow, ReserveOutcome, ReserveRequest, ReserveScope,
    SettlePart, Settlement, UsageFilter, LEASE_ID_PREFIX,
};
pub use ledger::{LedgerRow, NewLedgerRow};
pub use signups::{Provisioned, SignupCap, SignupUsage, PROVISIONED_METHODS};
pub use users::{ApiKey, KeyOwner, User};

const PG_MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations/postgres");
const SQLITE_MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations/sqlite");

type SqliteAsync = SyncConnectionWrapper<SqliteConnection>;

/// Why a store operation failed. Messages never carry secrets.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// No connection could be had.
    #[error("database unavailable: {0}")]
    Unavailable(String),
    /// A query failed.
    #[error("database query failed: {0}")]
    Query(#[from] diesel::result::Error),
    /// A migration failed.
    #[error("migration failed: {0}")]
    Migration(String),
    /// The URL names no supported backend.
    #[error("unsupported database url (use sqlite://PATH or postgres://...)")]
    BadUrl,
    /// The row asked for does not exist.
    #[error("{0} not found")]
    NotFound(&'static str),
}

impl From<deadpool::managed::PoolError<diesel_async::pooled_connection::PoolError>> for StoreError {
    fn from(e: deadpool::managed::PoolError<diesel_async::pooled_connection::PoolError>) -> Self {
        StoreError::Unavailable(e.to_string())
    }
}

/// The store: one pool on one backend, and the clock that stamps the rows it writes.
#[derive(Clone)]
pub enum Store {
    /// Embedded, one node.
    Sqlite {
        pool: Pool<SqliteAsync>,
        path: String,
        clock: Clock,
    },
    /// Shared by replicas.
    Postgres {
        pool: Pool<AsyncPgConnection>,
        url: String,
        clock: Clock,
    },
}

/// Runs `$body` with `$conn` bound to a pooled connection of whichever backend is configured;
/// the body is compiled once per backend.
macro_rules! with_conn {
    ($store:expr, $conn:ident => $body:expr) => {
        match $store {
            $crate::store::Store::Sqlite { pool, .. } => {
                let mut guard = pool
                    .get()
                    .await
                    .map_err(|e| $crate::store::StoreError::Unavailable(e.to_string()))?;
                let $conn = &mut *guard;
                $body
            }
            $crate::store::Store::Postgres { pool, .. } => {
                let mut guard = pool
                    .get()
                    .await
                    .map_err(|e| $crate::store::StoreError::Unavailable(e.to_string()))?;
                let $conn = &mut *guard;
                $body
            }
        }
    };
}
pub(crate) use with_conn;

/// Puts SQLite in its multi-thread mode: a connection is used by one thread at a time here (the
/// pool hands it out, diesel-async's wrapper locks it), so the per-connection and per-statement
/// mutexes that the default serialized mode takes in every call (about 1% of a request's CPU in
/// the full profile) guard nothing. Call it in `main` beside `allocator::tune`, before any
/// database is opened; once SQLite is initialized it refuses the setting and keeps the
/// serialized mode, which is harmless (a library user that never calls it keeps that mode).
pub fn sqlite_multithread() {
    // SAFETY: SQLITE_CONFIG_MULTITHREAD takes no argument; called before sqlite3_initialize it
    // is applied, after it refused with SQLITE_MISUSE and nothing changes. sqlite3_config must
    // not run beside other SQLite calls: `main` calls it on its only thread, before the runtime
    // that opens databases starts.
    unsafe {
        libsqlite3_sys::sqlite3_config(libsqlite3_sys::SQLITE_CONFIG_MULTITHREAD);
    }
}

impl Store {
    /// Whether a write that failed with `e` may still have committed: a PostgreSQL connection
    /// lost after the commit went out fails the query without saying whether it took. SQLite
    /// commits in-process, and with no connection had nothing was sent.
    pub fn commit_unknown(&self, e: &StoreError) -> bool {
        matches!(self, Store::Postgres { .. }) && matches!(e, StoreError::Query(_))
    }

    /// Opens a pool for `sqlite://PATH` or `postgres://...`; rows are stamped with `clock`.
    pub async fn connect(
        url: &str,
        max_connections: usize,
        clock: Clock,
    ) -> Result<Store, StoreError> {
        let max = max_connections.max(1);
        if let Some(path) = url.strip_prefix("sqlite://") {
            let path = path.to_string();
            let mut config = ManagerConfig::default();
            config.custom_setup = Box::new(|url| {
                let url = url.to_string();
                Box::pin(async move {
                    use diesel_async::AsyncConnection;
                    let mut conn = SqliteAsync::establish(&url).await?;
                    // WAL lets readers run beside the ledger writer; busy_timeout makes writers
                    // wait for each other instead of failing.
                    conn.batch_execute(
                        "PRAGMA busy_timeout = 10000; PRAGMA journal_mode = WAL; \
                         PRAGMA synchronous = NORMAL; PRAGMA foreign_keys = ON;",
                    )
                    .await
                    .map_err(diesel::ConnectionError::CouldntSetupConfiguration)?;
                    Ok(conn)
                })
            });
            let manager =
                AsyncDieselConnectionManager::<SqliteAsync>::new_with_config(&path, config);
            let pool = Pool::builder(manager)
                .max_size(max.min(8))
                .wait_timeout(Some(Duration::from_secs(10)))
                .runtime(deadpool::Runtime::Tokio1)
                .build()
                .map_err(|e| StoreError::Unavailable(e.to_string()))?;
            Ok(Store::Sqlite { pool, path, clock })
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            let manager = AsyncDieselConnectionManager::<AsyncPgConnection>::new(url);
            let pool = Pool::builder(manager)
                .max_size(max)
                .wait_timeout(Some(Duration::from_secs(10)))
                .create_timeout(Some(Duration::from_secs(10)))
                .runtime(deadpool::Runtime::Tokio1)
                .build()
                .map_err(|e| StoreError::Unavailable(e.to_string()))?;
            Ok(Store::Postgres {
                pool,
                url: url.to_string(),
                clock,
            })
        } else {
            Err(StoreError::BadUrl)
        }
    }

    /// Closes pooled connections unused for `idle` or longer, all but one, and returns how many
    /// it closed: a SQLite connection keeps up to 2 MiB of page cache, a PostgreSQL one a server
    /// process, long after the burst that opened it. The closing runs on the blocking pool (the
    /// last SQLite connection to close would checkpoint the WAL, so one is always kept).
    pub async fn close_idle_connections(&self, idle: Duration) -> usize {
        fn stale<T>(mut keep_one: bool, idle: Duration) -> impl FnMut(&T, Metrics) -> bool {
            move |_, m| std::mem::take(&mut keep_one) || m.last_used() < idle
        }
        let closed = match self {
            Store::Sqlite { pool, .. } => {
                let removed = pool.retain(stale(true, idle)).removed;
                let n = removed.len();
                if n > 0 {
                    let _ = tokio::task::spawn_blocking(move || drop(removed)).await;
                }
                n
            }
            Store::Postgres { pool, .. } => {
                let removed = pool.retain(stale(true, idle)).removed;
                let n = removed.len();
                drop(removed);
                n
            }
        };
        if closed > 0 {
            tracing::debug!(closed, "closed idle database connections");
        }
        closed
    }

    /// Connections open in the pool now (in use or idle).
    pub fn open_connections(&self) -> usize {
        match self {
            Store::Sqlite { pool, .. } => pool.status().size,
            Store::Postgres { pool, .. } => pool.status().size,
        }
    }

    /// The clock this store (and whoever works on it) reads the time from.
    pub fn clock(&self) -> &Clock {
        match self {
            Store::Sqlite { clock, .. } | Store::Postgres { clock, .. } => clock,
        }
    }

    /// The backend's name, for logs.
    pub fn backend(&self) -> &'static str {
        match self {
            Store::Sqlite { .. } => "sqlite",
            Store::Postgres { .. } => "postgres",
        }
    }

    /// Runs pending migrations. Safe to call from several replicas at once (PostgreSQL takes an
    /// advisory lock).
    pub async fn migrate(&self) -> Result<(), StoreError> {
        let store = self.clone();
        tokio::task::spawn_blocking(move || store.migrate_blocking())
            .await
            .map_err(|e| StoreError::Migration(e.to_string()))?
    }

    fn migrate_blocking(&self) -> Result<(), StoreError> {
        let mig =
            |e: Box<dyn std::error::Error + Send + Sync>| StoreError::Migration(e.to_string());
        match self {
            Store::Sqlite { path, .. } => {
                let mut conn = SqliteConnection::establish(path)
                    .map_err(|e| StoreError::Unavailable(e.to_string()))?;
                diesel::connection::SimpleConnection::batch_execute(
                    &mut conn,
                    "PRAGMA busy_timeout = 10000; PRAGMA journal_mode = WAL;",
                )?;
                conn.run_pending_migrations(SQLITE_MIGRATIONS)
                    .map_err(mig)?;
            }
            Store::Postgres { url, .. } => {
                let mut conn = AsyncConnectionWrapper::<AsyncPgConnection>::establish(url)
                    .map_err(|e| StoreError::Unavailable(e.to_string()))?;
                diesel::connection::SimpleConnection::batch_execute(
                    &mut conn,
                    "SELECT pg_advisory_lock(7423001)",
                )?;
                let result = conn
                    .run_pending_migrations(PG_MIGRATIONS)
                    .map(|_| ())
                    .map_err(mig);
                diesel::connection::SimpleConnection::batch_execute(
                    &mut conn,
                    "SELECT pg_advisory_unlock(7423001)",
                )?;
                result?;
            }
        }
        Ok(())
    }

    /// Checks that the database answers.
    pub async fn ping(&self) -> Result<(), StoreError> {
        with_conn!(self, conn => {
            conn.batch_execute("SELECT 1").await?;
            Ok(())
        })
    }
}
