//! Budgets, their reservations, per-scope rate limits and the usage query.
//!
//! A budget row holds a scope's limit, its period and the current period's counters:
//! `spent_micros` (settled) and `reserved_micros` (maximum costs of requests in flight). A
//! reservation is one conditional UPDATE per scope (`spent + reserved + cost <= limit`), all
//! scopes of a request in one transaction together with one `budget_reservations` row per scope
//! (with an expiry, so that a crashed replica's reservations are released by someone else).
//! Settlement deletes those rows, gives the reservation back and adds the actual cost, in one
//! transaction with the request's ledger row: the ledger and the budget agree.

use diesel::dsl::sql;
use diesel::prelude::*;
use diesel::sql_types::BigInt;
use diesel::OptionalExtension;
use diesel_async::{AsyncConnection, RunQueryDsl};

use super::schema::{budget_reservations, budgets, rate_limits, usage_ledger};
use super::{with_conn, NewLedgerRow, Store, StoreError};

/// A budget as stored.
#[derive(Debug, Clone, Queryable, QueryableByName, Selectable, PartialEq, Eq)]
#[diesel(table_name = budgets)]
pub struct BudgetRow {
    pub id: i64,
    pub scope: String,
    pub subject_id: i64,
    /// Set by an admin (else: a service type's default, kept in step with the configuration).
    pub explicit: bool,
    pub limit_micros: i64,
    pub period: String,
    pub period_start: i64,
    pub spent_micros: i64,
    pub reserved_micros: i64,
    pub updated_at: i64,
}

/// Rate limits of one scope as stored.
#[derive(Debug, Clone, Queryable, Selectable, PartialEq, Eq)]
#[diesel(table_name = rate_limits)]
pub struct RateLimitRow {
    pub scope: String,
    pub subject_id: i64,
    pub rpm: Option<i64>,
    pub tpm: Option<i64>,
    pub updated_at: i64,
}

#[derive(Insertable)]
#[diesel(table_name = budgets)]
struct NewBudget<'a> {
    scope: &'a str,
    subject_id: i64,
    explicit: bool,
    limit_micros: i64,
    period: &'a str,
    period_start: i64,
    spent_micros: i64,
    reserved_micros: i64,
    updated_at: i64,
}

#[derive(Insertable)]
#[diesel(table_name = budget_reservations)]
struct NewReservation<'a> {
    id: &'a str,
    budget_id: i64,
    request_id: &'a str,
    amount_micros: i64,
    created_at: i64,
    expires_at: i64,
}

/// One scope of a reservation, as the reserving replica believes it to be. The UPDATE only
/// matches when the row agrees (explicit or not, period, period start, and for a default the
/// configured limit); otherwise the caller looks at the row and fixes what differs.
#[derive(Debug, Clone)]
pub struct ReserveScope {
    pub scope: &'static str,
    pub subject_id: i64,
    pub explicit: bool,
    /// For a default budget: the configured limit the row must have.
    pub default_limit: Option<i64>,
    pub period: String,
    pub period_start: i64,
}

/// What a reservation attempt did.
#[derive(Debug)]
pub enum ReserveOutcome {
    /// Every scope had room: the rows after the reservation, in the order asked.
    Reserved(Vec<BudgetRow>),
    /// The scope at this index did not match or had no room; nothing was reserved.
    Missed(usize),
}

/// One request's settlement.
#[derive(Debug, Clone)]
pub struct Settlement {
    pub reservation_id: String,
    pub parts: Vec<SettlePart>,
    pub cost_micros: i64,
    /// The request's ledger row, written in the same transaction.
    pub ledger: Option<NewLedgerRow>,
}

/// One scope of a settlement.
#[derive(Debug, Clone)]
pub struct SettlePart {
    pub budget_id: i64,
    pub period: String,
    /// The start of the period the cost belongs to (now, at settlement).
    pub period_start: i64,
}

/// Filters of the usage query; times are unix ms, `to` exclusive.
#[derive(Debug, Clone, Default)]
pub struct UsageFilter {
    pub user_id: Option<i64>,
    pub key_id: Option<i64>,
    /// Matches the resolved `provider/model` or the requested name (an alias).
    pub model: Option<String>,
    pub from: Option<i64>,
    pub to: Option<i64>,
}

/// Spend and tokens of one resolved model.
#[derive(Debug, Clone, PartialEq, Eq, Queryable)]
pub struct ModelUsage {
    pub model: String,
    pub requests: i64,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    pub cost_micros: i64,
}

/// Per budget of a batch of settlements: the cost to add, and the period it belongs to.
fn per_budget(batch: &[Settlement]) -> std::collections::BTreeMap<i64, (i64, String, i64)> {
    let mut per = std::collections::BTreeMap::<i64, (i64, String, i64)>::new();
    for s in batch {
        for part in &s.parts {
            let e =
                per.entry(part.budget_id)
                    .or_insert((0, part.period.clone(), part.period_start));
            e.0 += s.cost_micros;
            if part.period_start > e.2 {
                e.1 = part.period.clone();
                e.2 = part.period_start;
            }
        }
    }
    per
}

/// The SQLite versions of the hot writes, each one transaction in one blocking call (sync
/// diesel; the same statements as the async versions).
mod sqlite_sync {
    use diesel::prelude::*;
    use diesel::sqlite::SqliteConnection;

    use super::{per_budget, BudgetRow, ReserveOutcome, ReserveScope, Settlement, TxError};
    use crate::store::schema::{budget_reservations, budgets, usage_ledger};

    pub fn reserve(
        c: &mut SqliteConnection,
        scopes: &[ReserveScope],
        amount: i64,
        reservation_id: &str,
        request_id: &str,
        now: i64,
        expires_at: i64,
    ) -> QueryResult<ReserveOutcome> {
        let result = c.immediate_transaction::<_, TxError, _>(|c| {
            let mut rows = Vec::with_capacity(scopes.len());
            for (i, s) in scopes.iter().enumerate() {
                let row = diesel::update(budgets::table)
                    .filter(budgets::scope.eq(s.scope))
                    .filter(budgets::subject_id.eq(s.subject_id))
                    .filter(budgets::explicit.eq(s.explicit))
                    .filter(
                        budgets::explicit
                            .eq(true)
                            .or(budgets::limit_micros.eq(s.default_limit.unwrap_or(-1))),
                    )
                    .filter(budgets::period.eq(&s.period))
                    .filter(budgets::period_start.eq(s.period_start))
                    .filter(
                        (budgets::spent_micros + budgets::reserved_micros + amount)
                            .le(budgets::limit_micros),
                    )
                    .set((
                        budgets::reserved_micros.eq(budgets::reserved_micros + amount),
                        budgets::updated_at.eq(now),
                    ))
                    .returning(BudgetRow::as_returning())
                    .get_result(c)
                    .optional()?;
                match row {
                    Some(r) => rows.push(r),
                    None => return Err(TxError::Missed(i)),
                }
            }
            for r in &rows {
                diesel::insert_into(budget_reservations::table)
                    .values((
                        budget_reservations::id.eq(reservation_id),
                        budget_reservations::budget_id.eq(r.id),
                        budget_reservations::request_id.eq(request_id),
                        budget_reservations::amount_micros.eq(amount),
                        budget_reservations::created_at.eq(now),
                        budget_reservations::expires_at.eq(expires_at),
                    ))
                    .execute(c)?;
            }
            Ok(rows)
        });
        match result {
            Ok(rows) => Ok(ReserveOutcome::Reserved(rows)),
            Err(TxError::Missed(i)) => Ok(ReserveOutcome::Missed(i)),
            Err(TxError::Db(e)) => Err(e),
        }
    }

    pub fn settle(c: &mut SqliteConnection, batch: &[Settlement], now: i64) -> QueryResult<()> {
        let per = per_budget(batch);
        c.immediate_transaction(|c| {
            for s in batch {
                if let Some(row) = &s.ledger {
                    diesel::insert_into(usage_ledger::table)
                        .values(row)
                        .execute(c)?;
                }
            }
            let mut held = std::collections::BTreeMap::<i64, i64>::new();
            let ids: Vec<&str> = batch.iter().map(|s| s.reservation_id.as_str()).collect();
            for chunk in ids.chunks(500) {
                let released: Vec<(i64, i64)> = diesel::delete(
                    budget_reservations::table
                        .filter(budget_reservations::id.eq_any(chunk.iter().copied())),
                )
                .returning((
                    budget_reservations::budget_id,
                    budget_reservations::amount_micros,
                ))
                .load(c)?;
                for (budget, amount) in released {
                    *held.entry(budget).or_default() += amount;
                }
            }
            for (budget, (cost, period, period_start)) in &per {
                diesel::update(budgets::table)
                    .filter(budgets::id.eq(*budget))
                    .filter(budgets::period.eq(period))
                    .filter(budgets::period_start.lt(*period_start))
                    .set((
                        budgets::period_start.eq(*period_start),
                        budgets::spent_micros.eq(0),
                    ))
                    .execute(c)?;
                let give_back = held.get(budget).copied().unwrap_or(0);
                diesel::update(budgets::table.filter(budgets::id.eq(*budget)))
                    .set((
                        budgets::spent_micros.eq(budgets::spent_micros + *cost),
                        budgets::reserved_micros.eq(budgets::reserved_micros - give_back),
                        budgets::updated_at.eq(now),
                    ))
                    .execute(c)?;
            }
            Ok(())
        })
    }
}

/// Ledger rows written with a settlement: many rows a statement where the backend can.
trait LedgerRows {
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
        // still makes the batch a single write.
        for row in rows {
            diesel::insert_into(usage_ledger::table)
                .values(row)
                .execute(self)
                .await?;
        }
        Ok(())
    }
}

/// [`Store::budget_reserve`] for one scope on PostgreSQL, as one statement (reservation
/// row and budget update together), written out so that it is a cacheable prepared statement
/// (diesel's `sql_query` is prepared anew each time: one more round trip).
struct PgReserveOne<'a> {
    s: &'a ReserveScope,
    default_limit: i64,
    amount: i64,
    now: i64,
    reservation_id: &'a str,
    request_id: &'a str,
    expires_at: i64,
    durable: bool,
}

impl diesel::query_builder::QueryId for PgReserveOne<'_> {
    type QueryId = PgReserveOne<'static>;
    const HAS_STATIC_QUERY_ID: bool = true;
}

impl diesel::query_builder::Query for PgReserveOne<'_> {
    type SqlType = diesel::sql_types::Untyped;
}

impl diesel::query_builder::QueryFragment<diesel::pg::Pg> for PgReserveOne<'_> {
    fn walk_ast<'b>(
        &'b self,
        mut out: diesel::query_builder::AstPass<'_, 'b, diesel::pg::Pg>,
    ) -> diesel::QueryResult<()> {
        use diesel::sql_types::{Bool, Text};
        out.push_sql("WITH u AS (UPDATE budgets SET reserved_micros = reserved_micros + ");
        out.push_bind_param::<BigInt, _>(&self.amount)?;
        out.push_sql(", updated_at = ");
        out.push_bind_param::<BigInt, _>(&self.now)?;
        out.push_sql(" WHERE scope = ");
        out.push_bind_param::<Text, _>(&self.s.scope)?;
        out.push_sql(" AND subject_id = ");
        out.push_bind_param::<BigInt, _>(&self.s.subject_id)?;
        out.push_sql(" AND explicit = ");
        out.push_bind_param::<Bool, _>(&self.s.explicit)?;
        out.push_sql(" AND (explicit OR limit_micros = ");
        out.push_bind_param::<BigInt, _>(&self.default_limit)?;
        out.push_sql(") AND period = ");
        out.push_bind_param::<Text, _>(&self.s.period)?;
        out.push_sql(" AND period_start = ");
        out.push_bind_param::<BigInt, _>(&self.s.period_start)?;
        out.push_sql(" AND spent_micros + reserved_micros + ");
        out.push_bind_param::<BigInt, _>(&self.amount)?;
        out.push_sql(
            " <= limit_micros RETURNING *), r AS (INSERT INTO budget_reservations \
             (id, budget_id, request_id, amount_micros, created_at, expires_at) SELECT ",
        );
        out.push_bind_param::<Text, _>(&self.reservation_id)?;
        out.push_sql(", id, ");
        out.push_bind_param::<Text, _>(&self.request_id)?;
        out.push_sql(", ");
        out.push_bind_param::<BigInt, _>(&self.amount)?;
        out.push_sql(", ");
        out.push_bind_param::<BigInt, _>(&self.now)?;
        out.push_sql(", ");
        out.push_bind_param::<BigInt, _>(&self.expires_at)?;
        // Without durability, this transaction alone commits without waiting for the WAL flush.
        out.push_sql(" FROM u), c AS (SELECT set_config('synchronous_commit', CASE WHEN ");
        out.push_bind_param::<Bool, _>(&self.durable)?;
        out.push_sql(
            " THEN current_setting('synchronous_commit') ELSE 'off' END, true) AS sc) \
             SELECT u.id, u.scope, u.subject_id, u.explicit, u.limit_micros, u.period, \
             u.period_start, u.spent_micros, u.reserved_micros, u.updated_at FROM u, c",
        );
        Ok(())
    }
}

enum TxError {
    Db(diesel::result::Error),
    Missed(usize),
}

impl From<diesel::result::Error> for TxError {
    fn from(e: diesel::result::Error) -> Self {
        TxError::Db(e)
    }
}

impl Store {
    /// Reserves `amount` in every scope at once, or in none. The reservation rows are written
    /// first (they lock nothing but a key share of the budget rows); the budget rows are then
    /// updated in id order, so that the row locks are held only until the commit and are taken
    /// in the same order by every transaction (no deadlocks with settlements or other
    /// replicas).
    #[allow(clippy::too_many_arguments)]
    pub async fn budget_reserve(
        &self,
        scopes: &[ReserveScope],
        amount: i64,
        reservation_id: &str,
        request_id: &str,
        now: i64,
        expires_at: i64,
    ) -> Result<ReserveOutcome, StoreError> {
        self.budget_reserve_with(
            scopes,
            amount,
            reservation_id,
            request_id,
            now,
            expires_at,
            true,
        )
        .await
    }

    /// [`Store::budget_reserve`]; with `durable` false, PostgreSQL commits the reservation
    /// without waiting for its WAL flush (`synchronous_commit = off` for that transaction only).
    #[allow(clippy::too_many_arguments)]
    pub async fn budget_reserve_with(
        &self,
        scopes: &[ReserveScope],
        amount: i64,
        reservation_id: &str,
        request_id: &str,
        now: i64,
        expires_at: i64,
        durable: bool,
    ) -> Result<ReserveOutcome, StoreError> {
        use diesel::sql_types::Text;
        use diesel::IntoSql;
        if let (Store::Postgres { pool, .. }, [s]) = (self, scopes) {
            // One scope on PostgreSQL: one statement, one round trip, the row lock held only
            // for its own execution.
            let mut conn = pool
                .get()
                .await
                .map_err(|e| StoreError::Unavailable(e.to_string()))?;
            let row: Option<BudgetRow> = PgReserveOne {
                s,
                default_limit: s.default_limit.unwrap_or(-1),
                amount,
                now,
                reservation_id,
                request_id,
                expires_at,
                durable,
            }
            .get_result(&mut *conn)
            .await
            .optional()?;
            return Ok(match row {
                Some(r) => ReserveOutcome::Reserved(vec![r]),
                None => ReserveOutcome::Missed(0),
            });
        }
        if let Store::Sqlite { pool, .. } = self {
            // SQLite: the whole transaction in one blocking call, taking the write lock at its
            // start (BEGIN IMMEDIATE), instead of a thread hop per statement.
            let mut conn = pool
                .get()
                .await
                .map_err(|e| StoreError::Unavailable(e.to_string()))?;
            let (scopes, rid, req) = (
                scopes.to_vec(),
                reservation_id.to_string(),
                request_id.to_string(),
            );
            return Ok(conn
                .spawn_blocking(move |c| {
                    sqlite_sync::reserve(c, &scopes, amount, &rid, &req, now, expires_at)
                })
                .await?);
        }
        let relaxed = !durable && matches!(self, Store::Postgres { .. });
        let result = with_conn!(self, conn => {
            conn.transaction::<_, TxError, _>(async |conn| {
                if relaxed {
                    diesel::sql_query("SET LOCAL synchronous_commit = off")
                        .execute(&mut *conn)
                        .await?;
                }
                let mut order = Vec::with_capacity(scopes.len());
                for (i, s) in scopes.iter().enumerate() {
                    let budget: Option<i64> = diesel::insert_into(budget_reservations::table)
                        .values(
                            budgets::table
                                .filter(budgets::scope.eq(s.scope))
                                .filter(budgets::subject_id.eq(s.subject_id))
                                .select((
                                    reservation_id.into_sql::<Text>(),
                                    budgets::id,
                                    request_id.into_sql::<Text>(),
                                    amount.into_sql::<BigInt>(),
                                    now.into_sql::<BigInt>(),
                                    expires_at.into_sql::<BigInt>(),
                                )),
                        )
                        .into_columns((
                            budget_reservations::id,
                            budget_reservations::budget_id,
                            budget_reservations::request_id,
                            budget_reservations::amount_micros,
                            budget_reservations::created_at,
                            budget_reservations::expires_at,
                        ))
                        .returning(budget_reservations::budget_id)
                        .get_result(&mut *conn)
                        .await
                        .optional()?;
                    match budget {
                        Some(b) => order.push((b, i)),
                        None => return Err(TxError::Missed(i)),
                    }
                }
                order.sort_unstable();
                let mut rows: Vec<Option<BudgetRow>> = vec![None; scopes.len()];
                for (budget, i) in order {
                    let s = &scopes[i];
                    let row = diesel::update(budgets::table)
                        .filter(budgets::id.eq(budget))
                        .filter(budgets::explicit.eq(s.explicit))
                        .filter(
                            budgets::explicit
                                .eq(true)
                                .or(budgets::limit_micros.eq(s.default_limit.unwrap_or(-1))),
                        )
                        .filter(budgets::period.eq(&s.period))
                        .filter(budgets::period_start.eq(s.period_start))
                        .filter(
                            (budgets::spent_micros + budgets::reserved_micros + amount)
                                .le(budgets::limit_micros),
                        )
                        .set((
                            budgets::reserved_micros.eq(budgets::reserved_micros + amount),
                            budgets::updated_at.eq(now),
                        ))
                        .returning(BudgetRow::as_returning())
                        .get_result(&mut *conn)
                        .await
                        .optional()?;
                    match row {
                        Some(r) => rows[i] = Some(r),
                        None => return Err(TxError::Missed(i)),
                    }
                }
                Ok(rows.into_iter().flatten().collect::<Vec<_>>())
            })
            .await
        });
        match result {
            Ok(rows) => Ok(ReserveOutcome::Reserved(rows)),
            Err(TxError::Missed(i)) => Ok(ReserveOutcome::Missed(i)),
            Err(TxError::Db(e)) => Err(e.into()),
        }
    }

    /// A scope's budget row.
    pub async fn budget_get(
        &self,
        scope: &str,
        subject_id: i64,
    ) -> Result<Option<BudgetRow>, StoreError> {
        with_conn!(self, conn => {
            Ok(budgets::table
                .filter(budgets::scope.eq(scope))
                .filter(budgets::subject_id.eq(subject_id))
                .select(BudgetRow::as_select())
                .first(conn)
                .await
                .optional()?)
        })
    }

    /// A scope's budget row and rate limits, in one go.
    pub async fn budget_policy(
        &self,
        scope: &str,
        subject_id: i64,
    ) -> Result<(Option<BudgetRow>, Option<RateLimitRow>), StoreError> {
        with_conn!(self, conn => {
            let budget = budgets::table
                .filter(budgets::scope.eq(scope))
                .filter(budgets::subject_id.eq(subject_id))
                .select(BudgetRow::as_select())
                .first(&mut *conn)
                .await
                .optional()?;
            let limits = rate_limits::table
                .filter(rate_limits::scope.eq(scope))
                .filter(rate_limits::subject_id.eq(subject_id))
                .select(RateLimitRow::as_select())
                .first(&mut *conn)
                .await
                .optional()?;
            Ok((budget, limits))
        })
    }

    /// Creates a scope's row for a service type's default budget (if it has none yet).
    pub async fn budget_insert_default(
        &self,
        scope: &str,
        subject_id: i64,
        limit_micros: i64,
        period: &str,
        period_start: i64,
        now: i64,
    ) -> Result<(), StoreError> {
        with_conn!(self, conn => {
            diesel::insert_into(budgets::table)
                .values(NewBudget {
                    scope,
                    subject_id,
                    explicit: false,
                    limit_micros,
                    period,
                    period_start,
                    spent_micros: 0,
                    reserved_micros: 0,
                    updated_at: now,
                })
                .on_conflict_do_nothing()
                .execute(conn)
                .await?;
            Ok(())
        })
    }

    /// Brings a default budget in step with the configuration. A changed period starts at
    /// `period_start` and keeps what was spent (changing the period is no way to a fresh
    /// budget).
    pub async fn budget_sync_default(
        &self,
        id: i64,
        limit_micros: i64,
        period: &str,
        period_start: i64,
        now: i64,
    ) -> Result<(), StoreError> {
        with_conn!(self, conn => {
            diesel::update(budgets::table)
                .filter(budgets::id.eq(id))
                .filter(budgets::explicit.eq(false))
                .filter(budgets::period.ne(period))
                .set((budgets::period.eq(period), budgets::period_start.eq(period_start)))
                .execute(&mut *conn)
                .await?;
            diesel::update(budgets::table)
                .filter(budgets::id.eq(id))
                .filter(budgets::explicit.eq(false))
                .set((budgets::limit_micros.eq(limit_micros), budgets::updated_at.eq(now)))
                .execute(&mut *conn)
                .await?;
            Ok(())
        })
    }

    /// Starts a new period: spent goes to 0, reservations in flight are carried over (they
    /// will be charged to the new period when they settle). Only if the row is still in an
    /// older period of the same kind.
    pub async fn budget_rollover(
        &self,
        id: i64,
        period: &str,
        period_start: i64,
        now: i64,
    ) -> Result<(), StoreError> {
        with_conn!(self, conn => {
            diesel::update(budgets::table)
                .filter(budgets::id.eq(id))
                .filter(budgets::period.eq(period))
                .filter(budgets::period_start.lt(period_start))
                .set((
                    budgets::period_start.eq(period_start),
                    budgets::spent_micros.eq(0),
                    budgets::updated_at.eq(now),
                ))
                .execute(conn)
                .await?;
            Ok(())
        })
    }

    /// Releases reservations that expired by `now` (of one budget, or of all), at most
    /// `limit` of them, through the expiry indexes. Returns how many were released.
    pub async fn budget_release_expired(
        &self,
        budget_id: Option<i64>,
        now: i64,
        limit: i64,
    ) -> Result<usize, StoreError> {
        with_conn!(self, conn => {
            Ok(conn
                .transaction::<_, diesel::result::Error, _>(async |conn| {
                    let expired: Vec<(String, i64)> = match budget_id {
                        Some(b) => {
                            budget_reservations::table
                                .filter(budget_reservations::budget_id.eq(b))
                                .filter(budget_reservations::expires_at.le(now))
                                .select((budget_reservations::id, budget_reservations::budget_id))
                                .limit(limit)
                                .load(&mut *conn)
                                .await?
                        }
                        None => {
                            budget_reservations::table
                                .filter(budget_reservations::expires_at.le(now))
                                .order(budget_reservations::expires_at.asc())
                                .select((budget_reservations::id, budget_reservations::budget_id))
                                .limit(limit)
                                .load(&mut *conn)
                                .await?
                        }
                    };
                    let mut give_back = std::collections::BTreeMap::<i64, i64>::new();
                    let mut released = 0;
                    for (id, budget) in expired {
                        // Deleted here or by a settlement racing us: whoever deletes the row
                        // gives the amount back, once.
                        let amount: Option<i64> = diesel::delete(
                            budget_reservations::table
                                .filter(budget_reservations::id.eq(&id))
                                .filter(budget_reservations::budget_id.eq(budget))
                                .filter(budget_reservations::expires_at.le(now)),
                        )
                        .returning(budget_reservations::amount_micros)
                        .get_result(&mut *conn)
                        .await
                        .optional()?;
                        if let Some(amount) = amount {
                            *give_back.entry(budget).or_default() += amount;
                            released += 1;
                        }
                    }
                    // Budget rows last and in id order: locks held briefly, in one order.
                    for (budget, amount) in give_back {
                        diesel::update(budgets::table.filter(budgets::id.eq(budget)))
                            .set((
                                budgets::reserved_micros.eq(budgets::reserved_micros - amount),
                                budgets::updated_at.eq(now),
                            ))
                            .execute(&mut *conn)
                            .await?;
                    }
                    Ok(released)
                })
                .await?)
        })
    }

    /// Writes settlements (and their ledger rows) in one transaction: the reservation rows are
    /// deleted and their amounts given back (unless they already expired and were released),
    /// a period that ended while a request ran is rolled over, and the actual costs are added.
    /// Each budget row is updated once per batch, last, in id order.
    pub async fn budget_settle(&self, batch: &[Settlement], now: i64) -> Result<(), StoreError> {
        if batch.is_empty() {
            return Ok(());
        }
        if let Store::Sqlite { pool, .. } = self {
            let mut conn = pool
                .get()
                .await
                .map_err(|e| StoreError::Unavailable(e.to_string()))?;
            let batch = batch.to_vec();
            return Ok(conn
                .spawn_blocking(move |c| sqlite_sync::settle(c, &batch, now))
                .await?);
        }
        let per = per_budget(batch);
        let ids: Vec<&str> = batch.iter().map(|s| s.reservation_id.as_str()).collect();
        let ledger: Vec<NewLedgerRow> = batch.iter().filter_map(|s| s.ledger.clone()).collect();
        with_conn!(self, conn => {
            conn.transaction::<_, diesel::result::Error, _>(async |conn| {
                LedgerRows::insert_rows(&mut *conn, &ledger).await?;
                let mut held = std::collections::BTreeMap::<i64, i64>::new();
                for chunk in ids.chunks(1000) {
                    let released: Vec<(i64, i64)> = diesel::delete(
                        budget_reservations::table
                            .filter(budget_reservations::id.eq_any(chunk.iter().copied())),
                    )
                    .returning((
                        budget_reservations::budget_id,
                        budget_reservations::amount_micros,
                    ))
                    .load(&mut *conn)
                    .await?;
                    for (budget, amount) in released {
                        *held.entry(budget).or_default() += amount;
                    }
                }
                for (budget, (cost, period, period_start)) in &per {
                    diesel::update(budgets::table)
                        .filter(budgets::id.eq(*budget))
                        .filter(budgets::period.eq(period))
                        .filter(budgets::period_start.lt(*period_start))
                        .set((
                            budgets::period_start.eq(*period_start),
                            budgets::spent_micros.eq(0),
                        ))
                        .execute(&mut *conn)
                        .await?;
                    let give_back = held.get(budget).copied().unwrap_or(0);
                    diesel::update(budgets::table.filter(budgets::id.eq(*budget)))
                        .set((
                            budgets::spent_micros.eq(budgets::spent_micros + *cost),
                            budgets::reserved_micros.eq(budgets::reserved_micros - give_back),
                            budgets::updated_at.eq(now),
                        ))
                        .execute(&mut *conn)
                        .await?;
                }
                Ok(())
            })
            .await?;
            Ok(())
        })
    }

    /// Sets a scope's budget (admin). Keeps what was spent in the current period; a changed
    /// period starts at `period_start`.
    pub async fn budget_set(
        &self,
        scope: &str,
        subject_id: i64,
        limit_micros: i64,
        period: &str,
        period_start: i64,
        now: i64,
    ) -> Result<BudgetRow, StoreError> {
        with_conn!(self, conn => {
            Ok(conn
                .transaction::<_, diesel::result::Error, _>(async |conn| {
                    diesel::insert_into(budgets::table)
                        .values(NewBudget {
                            scope,
                            subject_id,
                            explicit: true,
                            limit_micros,
                            period,
                            period_start,
                            spent_micros: 0,
                            reserved_micros: 0,
                            updated_at: now,
                        })
                        .on_conflict_do_nothing()
                        .execute(&mut *conn)
                        .await?;
                    diesel::update(budgets::table)
                        .filter(budgets::scope.eq(scope))
                        .filter(budgets::subject_id.eq(subject_id))
                        .filter(budgets::period.ne(period))
                        .set((budgets::period.eq(period), budgets::period_start.eq(period_start)))
                        .execute(&mut *conn)
                        .await?;
                    diesel::update(budgets::table)
                        .filter(budgets::scope.eq(scope))
                        .filter(budgets::subject_id.eq(subject_id))
                        .set((
                            budgets::explicit.eq(true),
                            budgets::limit_micros.eq(limit_micros),
                            budgets::updated_at.eq(now),
                        ))
                        .returning(BudgetRow::as_returning())
                        .get_result(&mut *conn)
                        .await
                })
                .await?)
        })
    }

    /// Removes a scope's own budget (admin): a user falls back to the service type's default.
    /// What was spent stays on the row.
    pub async fn budget_clear(
        &self,
        scope: &str,
        subject_id: i64,
        now: i64,
    ) -> Result<bool, StoreError> {
        with_conn!(self, conn => {
            let n = diesel::update(budgets::table)
                .filter(budgets::scope.eq(scope))
                .filter(budgets::subject_id.eq(subject_id))
                .filter(budgets::explicit.eq(true))
                .set((budgets::explicit.eq(false), budgets::updated_at.eq(now)))
                .execute(conn)
                .await?;
            Ok(n > 0)
        })
    }

    /// Sets (or, with neither, removes) a scope's own rate limits.
    pub async fn rate_limits_set(
        &self,
        scope: &str,
        subject_id: i64,
        rpm: Option<i64>,
        tpm: Option<i64>,
        now: i64,
    ) -> Result<(), StoreError> {
        with_conn!(self, conn => {
            conn.transaction::<_, diesel::result::Error, _>(async |conn| {
                diesel::delete(
                    rate_limits::table
                        .filter(rate_limits::scope.eq(scope))
                        .filter(rate_limits::subject_id.eq(subject_id)),
                )
                .execute(&mut *conn)
                .await?;
                if rpm.is_some() || tpm.is_some() {
                    diesel::insert_into(rate_limits::table)
                        .values((
                            rate_limits::scope.eq(scope),
                            rate_limits::subject_id.eq(subject_id),
                            rate_limits::rpm.eq(rpm),
                            rate_limits::tpm.eq(tpm),
                            rate_limits::updated_at.eq(now),
                        ))
                        .execute(&mut *conn)
                        .await?;
                }
                Ok(())
            })
            .await?;
            Ok(())
        })
    }

    /// Whether an API key with this id exists (revoked or not).
    pub async fn api_key_exists(&self, id: i64) -> Result<bool, StoreError> {
        with_conn!(self, conn => {
            let n: i64 = super::schema::api_keys::table
                .filter(super::schema::api_keys::id.eq(id))
                .count()
                .get_result(conn)
                .await?;
            Ok(n > 0)
        })
    }

    /// Open reservations of a budget (for operators and tests).
    pub async fn budget_reservation_count(&self, budget_id: i64) -> Result<i64, StoreError> {
        with_conn!(self, conn => {
            Ok(budget_reservations::table
                .filter(budget_reservations::budget_id.eq(budget_id))
                .count()
                .get_result(conn)
                .await?)
        })
    }

    /// Spend and tokens per resolved model over the ledger rows that match.
    pub async fn usage_by_model(&self, f: &UsageFilter) -> Result<Vec<ModelUsage>, StoreError> {
        with_conn!(self, conn => {
            use diesel::IntoSql;
            use diesel::sql_types::Bool;
            let model = f.model.clone().unwrap_or_default();
            let rows: Vec<(Option<String>, i64, i64, i64, i64)> = usage_ledger::table
                .filter(usage_ledger::resolved_model.is_not_null())
                .filter(
                    usage_ledger::user_id
                        .eq(f.user_id.unwrap_or(0))
                        .or(f.user_id.is_none().into_sql::<Bool>()),
                )
                .filter(
                    usage_ledger::key_id
                        .eq(f.key_id.unwrap_or(0))
                        .or(f.key_id.is_none().into_sql::<Bool>()),
                )
                .filter(
                    usage_ledger::resolved_model
                        .eq(model.clone())
                        .or(usage_ledger::requested_model.eq(model.clone()))
                        .or(f.model.is_none().into_sql::<Bool>()),
                )
                .filter(usage_ledger::started_at.ge(f.from.unwrap_or(i64::MIN)))
                .filter(usage_ledger::started_at.lt(f.to.unwrap_or(i64::MAX)))
                .group_by(usage_ledger::resolved_model)
                .select((
                    usage_ledger::resolved_model,
                    sql::<BigInt>("CAST(COUNT(*) AS BIGINT)"),
                    sql::<BigInt>("CAST(COALESCE(SUM(prompt_tokens), 0) AS BIGINT)"),
                    sql::<BigInt>("CAST(COALESCE(SUM(completion_tokens), 0) AS BIGINT)"),
                    sql::<BigInt>("CAST(COALESCE(SUM(cost_micros), 0) AS BIGINT)"),
                ))
                .order(usage_ledger::resolved_model.asc())
                .load(conn)
                .await?;
            Ok(rows
                .into_iter()
                .map(|(model, requests, prompt_tokens, completion_tokens, cost_micros)| {
                    ModelUsage {
                        model: model.unwrap_or_default(),
                        requests,
                        prompt_tokens,
                        completion_tokens,
                        cost_micros,
                    }
                })
                .collect())
        })
    }
}
