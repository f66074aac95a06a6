//! The usage ledger: one row per chat request, whatever its outcome.

use diesel::prelude::*;
use diesel_async::{AsyncConnection, RunQueryDsl};
use std::sync::Arc;

use super::schema::usage_ledger;
use super::{with_conn, Store, StoreError};

/// A ledger row to write. `None` is written as NULL, not as the column's DEFAULT (no nullable
/// column has one): every row has the same SQL shape, so SQLite's statement is prepared once and
/// cached instead of parsed for every row.
#[derive(Debug, Clone, Insertable)]
#[diesel(table_name = usage_ledger, treat_none_as_default_value = false)]
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
    pub async fn insert_ledger_rows(&self, rows: &Arc<[NewLedgerRow]>) -> Result<(), StoreError> {
        if rows.is_empty() {
            return Ok(());
        }
        with_conn!(self, conn => {
            conn.insert_batch(rows).await?;
            Ok(())
        })
    }

    /// Whether `row` is already stored (same request id, start and finish): after a write
    /// whose commit was not acknowledged (the connection died), tells whether it committed.
    pub async fn ledger_row_exists(&self, row: &NewLedgerRow) -> Result<bool, StoreError> {
        with_conn!(self, conn => {
            let n: i64 = usage_ledger::table
                .filter(usage_ledger::request_id.eq(&row.request_id))
                .filter(usage_ledger::started_at.eq(row.started_at))
                .filter(usage_ledger::finished_at.eq(row.finished_at))
                .count()
                .get_result(conn)
                .await?;
            Ok(n > 0)
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

/// A batch of ledger rows written in one transaction: many rows a statement where the backend
/// can, one thread hop where the backend is synchronous.
pub(super) trait LedgerRows {
    /// Inserts `rows` in one transaction (shared, so that a retry does not copy them).
    async fn insert_batch(&mut self, rows: &Arc<[NewLedgerRow]>) -> diesel::QueryResult<()>;
}

impl LedgerRows for diesel_async::AsyncPgConnection {
    async fn insert_batch(&mut self, rows: &Arc<[NewLedgerRow]>) -> diesel::QueryResult<()> {
        self.transaction::<_, diesel::result::Error, _>(async |conn| {
            pg_insert_rows(conn, rows).await
        })
        .await
    }
}

/// Inserts ledger rows on PostgreSQL inside the caller's transaction: one statement of 17
/// arrays, whatever the number of rows, so that PostgreSQL parses one short statement instead of
/// a VALUES list of 17 parameters a row (a different statement for every batch size).
pub(super) async fn pg_insert_rows(
    conn: &mut diesel_async::AsyncPgConnection,
    rows: &[NewLedgerRow],
) -> diesel::QueryResult<()> {
    use diesel::sql_types::{Array, BigInt, Bool, Nullable, Text};
    if rows.is_empty() {
        return Ok(());
    }
    fn col<'a, T>(rows: &'a [NewLedgerRow], f: impl Fn(&'a NewLedgerRow) -> T) -> Vec<T> {
        rows.iter().map(f).collect()
    }
    diesel::sql_query(PG_INSERT_UNNEST)
        .bind::<Array<Text>, _>(col(rows, |r| r.request_id.as_str()))
        .bind::<Array<Nullable<BigInt>>, _>(col(rows, |r| r.user_id))
        .bind::<Array<Nullable<BigInt>>, _>(col(rows, |r| r.key_id))
        .bind::<Array<Text>, _>(col(rows, |r| r.protocol))
        .bind::<Array<Text>, _>(col(rows, |r| r.requested_model.as_str()))
        .bind::<Array<Nullable<Text>>, _>(col(rows, |r| r.resolved_model.as_deref()))
        .bind::<Array<Nullable<Text>>, _>(col(rows, |r| r.service_type.as_deref()))
        .bind::<Array<Nullable<Text>>, _>(col(rows, |r| r.purpose.as_deref()))
        .bind::<Array<Bool>, _>(col(rows, |r| r.stream))
        .bind::<Array<Text>, _>(col(rows, |r| r.outcome))
        .bind::<Array<Text>, _>(col(rows, |r| r.reason))
        .bind::<Array<BigInt>, _>(col(rows, |r| r.prompt_tokens))
        .bind::<Array<BigInt>, _>(col(rows, |r| r.completion_tokens))
        .bind::<Array<BigInt>, _>(col(rows, |r| r.cost_micros))
        .bind::<Array<BigInt>, _>(col(rows, |r| r.started_at))
        .bind::<Array<BigInt>, _>(col(rows, |r| r.finished_at))
        .bind::<Array<Text>, _>(col(rows, |r| r.api))
        .execute(conn)
        .await?;
    Ok(())
}

/// The PostgreSQL ledger insert: rows in the arrays' order (ids follow it).
const PG_INSERT_UNNEST: &str = "INSERT INTO usage_ledger (request_id, user_id, key_id, \
    protocol, requested_model, resolved_model, service_type, purpose, stream, outcome, reason, \
    prompt_tokens, completion_tokens, cost_micros, started_at, finished_at, api) \
    SELECT * FROM unnest($1::text[], $2::int8[], $3::int8[], $4::text[], $5::text[], \
    $6::text[], $7::text[], $8::text[], $9::bool[], $10::text[], $11::text[], $12::int8[], \
    $13::int8[], $14::int8[], $15::int8[], $16::int8[], $17::text[])";

/// Rows a multi-row SQLite INSERT carries: a fixed count, so that the statement has one SQL
/// text and stays in diesel's statement cache (17 parameters a row, far under SQLite's limit).
const ROWS_PER_STATEMENT: usize = 16;

impl LedgerRows
    for diesel_async::sync_connection_wrapper::SyncConnectionWrapper<
        diesel::sqlite::SqliteConnection,
    >
{
    async fn insert_batch(&mut self, rows: &Arc<[NewLedgerRow]>) -> diesel::QueryResult<()> {
        // The wrapper moves every statement to the blocking pool and back (BEGIN, each INSERT,
        // COMMIT: a thread hop each); the whole transaction is one hop instead, and a fsync.
        let rows = rows.clone();
        self.spawn_blocking(move |conn| {
            use diesel::connection::Connection;
            let rows: Vec<&NewLedgerRow> = rows.iter().collect();
            conn.transaction(|conn| sqlite_insert_rows(conn, &rows))
        })
        .await
    }
}

/// Inserts ledger rows on SQLite inside the caller's transaction, with two prepared (cached)
/// statements: one of [`ROWS_PER_STATEMENT`] rows for the whole chunks, whose walk, bind and
/// step overhead is shared by its rows, and one of a single row for the rest.
pub(super) fn sqlite_insert_rows(
    conn: &mut diesel::sqlite::SqliteConnection,
    rows: &[&NewLedgerRow],
) -> diesel::QueryResult<()> {
    let (chunks, rest) = rows.as_chunks::<ROWS_PER_STATEMENT>();
    for chunk in chunks {
        diesel::RunQueryDsl::execute(InsertOrFail(chunk), conn)?;
    }
    for row in rest {
        diesel::RunQueryDsl::execute(diesel::insert_into(usage_ledger::table).values(*row), conn)?;
    }
    Ok(())
}

/// `INSERT OR FAIL` of [`ROWS_PER_STATEMENT`] rows. A plain INSERT of several rows may abort
/// half-way (on a NOT NULL column), so inside a transaction SQLite keeps a statement journal of
/// every page it changes, to undo the statement alone: for 16 ledger rows more than its 64 KiB
/// in memory, so it wrote them to a temporary file, 1.5 `pwrite` calls and about 2% of the
/// CPU a request at 5,000 RPS (bench/README.md). `OR FAIL` stops at a failing row without
/// undoing the rows before it, so no journal is kept; the error still fails the transaction,
/// which undoes the whole batch as before.
struct InsertOrFail<'a>(&'a [&'a NewLedgerRow; ROWS_PER_STATEMENT]);

impl<Conn> diesel::RunQueryDsl<Conn> for InsertOrFail<'_> {}

impl diesel::query_builder::QueryId for InsertOrFail<'_> {
    type QueryId = InsertOrFail<'static>;
    const HAS_STATIC_QUERY_ID: bool = true;
}

impl diesel::query_builder::QueryFragment<diesel::sqlite::Sqlite> for InsertOrFail<'_> {
    fn walk_ast<'b>(
        &'b self,
        mut out: diesel::query_builder::AstPass<'_, 'b, diesel::sqlite::Sqlite>,
    ) -> diesel::QueryResult<()> {
        use diesel::sql_types::{BigInt, Bool, Nullable, Text};
        out.push_sql(
            "INSERT OR FAIL INTO usage_ledger (request_id, user_id, key_id, protocol, \
             requested_model, resolved_model, service_type, purpose, stream, outcome, reason, \
             prompt_tokens, completion_tokens, cost_micros, started_at, finished_at, api) VALUES ",
        );
        for (i, r) in self.0.iter().enumerate() {
            out.push_sql(if i == 0 { "(" } else { ", (" });
            out.push_bind_param::<Text, _>(&r.request_id)?;
            out.push_sql(", ");
            out.push_bind_param::<Nullable<BigInt>, _>(&r.user_id)?;
            out.push_sql(", ");
            out.push_bind_param::<Nullable<BigInt>, _>(&r.key_id)?;
            out.push_sql(", ");
            out.push_bind_param::<Text, _>(r.protocol)?;
            out.push_sql(", ");
            out.push_bind_param::<Text, _>(&r.requested_model)?;
            out.push_sql(", ");
            out.push_bind_param::<Nullable<Text>, _>(&r.resolved_model)?;
            out.push_sql(", ");
            out.push_bind_param::<Nullable<Text>, _>(&r.service_type)?;
            out.push_sql(", ");
            out.push_bind_param::<Nullable<Text>, _>(&r.purpose)?;
            out.push_sql(", ");
            out.push_bind_param::<Bool, _>(&r.stream)?;
            out.push_sql(", ");
            out.push_bind_param::<Text, _>(r.outcome)?;
            out.push_sql(", ");
            out.push_bind_param::<Text, _>(r.reason)?;
            out.push_sql(", ");
            out.push_bind_param::<BigInt, _>(&r.prompt_tokens)?;
            out.push_sql(", ");
            out.push_bind_param::<BigInt, _>(&r.completion_tokens)?;
            out.push_sql(", ");
            out.push_bind_param::<BigInt, _>(&r.cost_micros)?;
            out.push_sql(", ");
            out.push_bind_param::<BigInt, _>(&r.started_at)?;
            out.push_sql(", ");
            out.push_bind_param::<BigInt, _>(&r.finished_at)?;
            out.push_sql(", ");
            out.push_bind_param::<Text, _>(r.api)?;
            out.push_sql(")");
        }
        Ok(())
    }
}
