//! The usage ledger: one row per chat request, whatever its outcome.

use diesel::prelude::*;
use diesel_async::{AsyncConnection, RunQueryDsl};

use super::schema::usage_ledger;
use super::{with_conn, Store, StoreError};

/// A ledger row to write.
#[derive(Debug, Clone, Insertable)]
#[diesel(table_name = usage_ledger)]
pub struct NewLedgerRow {
    pub request_id: String,
    pub user_id: Option<i64>,
    pub key_id: Option<i64>,
    pub protocol: &'static str,
    pub requested_model: String,
    pub resolved_model: Option<String>,
    pub service_type: Option<String>,
    pub purpose: Option<String>,
    pub stream: bool,
    pub outcome: &'static str,
    pub reason: &'static str,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    pub cost_micros: i64,
    pub started_at: i64,
    pub finished_at: i64,
    /// The inbound API (`chat_completions`, `messages`, `responses`, `embeddings`).
    pub api: &'static str,
}

/// A ledger row as stored.
#[derive(Debug, Clone, Queryable, Selectable, PartialEq, Eq)]
#[diesel(table_name = usage_ledger)]
pub struct LedgerRow {
    pub id: i64,
    pub request_id: String,
    pub user_id: Option<i64>,
    pub key_id: Option<i64>,
    pub protocol: String,
    pub requested_model: String,
    pub resolved_model: Option<String>,
    pub service_type: Option<String>,
    pub purpose: Option<String>,
    pub stream: bool,
    pub outcome: String,
    pub reason: String,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    pub cost_micros: i64,
    #[diesel(column_name = started_at)]
    pub started_at_ms: i64,
    #[diesel(column_name = finished_at)]
    pub finished_at_ms: i64,
    /// The inbound API (`chat_completions`, `messages`, `responses`, `embeddings`).
    pub api: String,
}

impl Store {
    /// Writes a batch of rows in one transaction.
    pub async fn insert_ledger_rows(&self, rows: &[NewLedgerRow]) -> Result<(), StoreError> {
        if rows.is_empty() {
            return Ok(());
        }
        with_conn!(self, conn => {
            conn.transaction::<_, diesel::result::Error, _>(async |conn| {
                conn.insert_rows(rows).await
            })
            .await?;
            Ok(())
        })
    }

    /// The rows of one request (normally one).
    pub async fn ledger_by_request_id(
        &self,
        request_id: &str,
    ) -> Result<Vec<LedgerRow>, StoreError> {
        with_conn!(self, conn => {
            Ok(usage_ledger::table
                .filter(usage_ledger::request_id.eq(request_id))
                .order(usage_ledger::id.asc())
                .select(LedgerRow::as_select())
                .load(conn)
                .await?)
        })
    }
}

/// Ledger rows written in a transaction of the caller's: many rows a statement where the
/// backend can.
pub(super) trait LedgerRows {
    /// Inserts `rows`.
    async fn insert_rows(&mut self, rows: &[NewLedgerRow]) -> diesel::QueryResult<()>;
}

impl LedgerRows for diesel_async::AsyncPgConnection {
    async fn insert_rows(&mut self, rows: &[NewLedgerRow]) -> diesel::QueryResult<()> {
        // 16 parameters a row; PostgreSQL takes at most 65535 in one statement.
        for chunk in rows.chunks(1000) {
            diesel::insert_into(usage_ledger::table)
                .values(chunk)
                .execute(self)
                .await?;
        }
        Ok(())
    }
}

impl LedgerRows
    for diesel_async::sync_connection_wrapper::SyncConnectionWrapper<
        diesel::sqlite::SqliteConnection,
    >
{
    async fn insert_rows(&mut self, rows: &[NewLedgerRow]) -> diesel::QueryResult<()> {
        // SQLite cannot take diesel's multi-row insert with nullable columns; one transaction
        // still makes the batch a single fsync.
        for row in rows {
            diesel::insert_into(usage_ledger::table)
                .values(row)
                .execute(self)
                .await?;
        }
        Ok(())
    }
}
