//! Reservations: the reservation UPDATE, written once ([`ReserveUpdate`]) for both backends,
//! and the three ways it runs: PostgreSQL with one scope (one statement), PostgreSQL with
//! several (one transaction, rows locked in id order), SQLite (one blocking transaction).

use diesel::backend::Backend;
use diesel::query_builder::{AstPass, Query, QueryFragment, QueryId};
use diesel::serialize::ToSql;
use diesel::sql_types::{BigInt, Bool, HasSqlType, Text, Untyped};
use diesel::{OptionalExtension, QueryResult};

use super::{BudgetRow, LeaseGrow, ReserveOutcome, ReserveRequest, ReserveScope};
use crate::store::{Store, StoreError};

/// The reservation UPDATE of one scope: adds `amount` to the row's `reserved_micros` only if
/// the row is as the replica believes it to be (explicit or not, a default's configured limit,
/// period, period start) and has room (`amount <= limit - spent - reserved`); returns the row
/// after it. `(scope, subject_id)` is unique, so it names one row.
struct ReserveUpdate<'a> {
    s: &'a ReserveScope,
    /// A default's configured limit the row must have; -1 (matches nothing) for an explicit
    /// budget, whose row is matched by `explicit` instead.
    default_limit: i64,
    amount: i64,
    now: i64,
}

impl<'a> ReserveUpdate<'a> {
    fn new(s: &'a ReserveScope, amount: i64, now: i64) -> Self {
        Self {
            s,
            default_limit: s.default_limit.unwrap_or(-1),
            amount,
            now,
        }
    }
}

// The SQL text never varies (every value is a bind), so the statement is prepared once per
// connection and cached.
impl QueryId for ReserveUpdate<'_> {
    type QueryId = ReserveUpdate<'static>;
    const HAS_STATIC_QUERY_ID: bool = true;
}

impl Query for ReserveUpdate<'_> {
    type SqlType = Untyped;
}

impl<Conn> diesel::RunQueryDsl<Conn> for ReserveUpdate<'_> {}

impl<DB> QueryFragment<DB> for ReserveUpdate<'_>
where
    DB: Backend + HasSqlType<BigInt> + HasSqlType<Text> + HasSqlType<Bool>,
    i64: ToSql<BigInt, DB>,
    str: ToSql<Text, DB>,
    bool: ToSql<Bool, DB>,
{
    fn walk_ast<'b>(&'b self, mut out: AstPass<'_, 'b, DB>) -> QueryResult<()> {
        out.push_sql("UPDATE budgets SET reserved_micros = reserved_micros + ");
        out.push_bind_param::<BigInt, _>(&self.amount)?;
        out.push_sql(", updated_at = ");
        out.push_bind_param::<BigInt, _>(&self.now)?;
        out.push_sql(" WHERE scope = ");
        out.push_bind_param::<Text, str>(self.s.scope)?;
        out.push_sql(" AND subject_id = ");
        out.push_bind_param::<BigInt, _>(&self.s.subject_id)?;
        out.push_sql(" AND explicit = ");
        out.push_bind_param::<Bool, _>(&self.s.explicit)?;
        out.push_sql(" AND (explicit OR limit_micros = ");
        out.push_bind_param::<BigInt, _>(&self.default_limit)?;
        out.push_sql(") AND period = ");
        out.push_bind_param::<Text, str>(&self.s.period)?;
        out.push_sql(" AND period_start = ");
        out.push_bind_param::<BigInt, _>(&self.s.period_start)?;
        // `amount <= limit - spent - reserved`, not `spent + reserved + amount <= limit`: a
        // saturated amount (i64::MAX) must not overflow a bigint (PostgreSQL errors, SQLite
        // turns it into a float).
        out.push_sql(" AND ");
        out.push_bind_param::<BigInt, _>(&self.amount)?;
        out.push_sql(" <= limit_micros - spent_micros - reserved_micros RETURNING *");
        Ok(())
    }
}

/// A one-scope reservation on PostgreSQL as one statement (reservation row and budget update
/// together), written out so that it is a cacheable prepared statement (diesel's `sql_query`
/// is prepared anew each time: one more round trip).
struct PgReserveOne<'a> {
    update: ReserveUpdate<'a>,
    r: &'a ReserveRequest,
}

impl QueryId for PgReserveOne<'_> {
    type QueryId = PgReserveOne<'static>;
    const HAS_STATIC_QUERY_ID: bool = true;
}

impl Query for PgReserveOne<'_> {
    type SqlType = Untyped;
}

impl QueryFragment<diesel::pg::Pg> for PgReserveOne<'_> {
    fn walk_ast<'b>(&'b self, mut out: AstPass<'_, 'b, diesel::pg::Pg>) -> QueryResult<()> {
        out.push_sql("WITH u AS (");
        self.update.walk_ast(out.reborrow())?;
        out.push_sql(
            "), r AS (INSERT INTO budget_reservations \
             (id, budget_id, request_id, amount_micros, created_at, expires_at) SELECT ",
        );
        out.push_bind_param::<Text, str>(&self.r.reservation_id)?;
        out.push_sql(", id, ");
        out.push_bind_param::<Text, str>(&self.r.request_id)?;
        out.push_sql(", ");
        out.push_bind_param::<BigInt, _>(&self.r.amount)?;
        out.push_sql(", ");
        out.push_bind_param::<BigInt, _>(&self.r.now)?;
        out.push_sql(", ");
        out.push_bind_param::<BigInt, _>(&self.r.expires_at)?;
        // Without durability, this transaction alone commits without waiting for the WAL flush.
        out.push_sql(" FROM u), c AS (SELECT set_config('synchronous_commit', CASE WHEN ");
        out.push_bind_param::<Bool, _>(&self.r.durable)?;
        out.push_sql(
            " THEN current_setting('synchronous_commit') ELSE 'off' END, true) AS sc) \
             SELECT u.id, u.scope, u.subject_id, u.explicit, u.limit_micros, u.period, \
             u.period_start, u.spent_micros, u.reserved_micros, u.updated_at FROM u, c",
        );
        Ok(())
    }
}

/// Why a reservation transaction was rolled back.
enum TxError {
    Db(diesel::result::Error),
    Missed(usize),
}

impl From<diesel::result::Error> for TxError {
    fn from(e: diesel::result::Error) -> Self {
        TxError::Db(e)
    }
}

/// What a reservation transaction's result means.
fn outcome(result: Result<Vec<BudgetRow>, TxError>) -> QueryResult<ReserveOutcome> {
    match result {
        Ok(rows) => Ok(ReserveOutcome::Reserved(rows)),
        Err(TxError::Missed(i)) => Ok(ReserveOutcome::Missed(i)),
        Err(TxError::Db(e)) => Err(e),
    }
}

impl Store {
    /// [`Store::budget_reserve_with`], durable (for tools and tests).
    pub async fn budget_reserve(
        &self,
        scopes: &[ReserveScope],
        amount: i64,
        reservation_id: &str,
        request_id: &str,
        now: i64,
        expires_at: i64,
    ) -> Result<ReserveOutcome, StoreError> {
        self.budget_reserve_with(ReserveRequest {
            scopes: scopes.to_vec(),
            amount,
            reservation_id: reservation_id.to_string(),
            request_id: request_id.to_string(),
            now,
            expires_at,
            durable: true,
        })
        .await
    }

    /// Reserves `r.amount` in every scope at once, or in none, with one reservation row per
    /// scope. Row locks are held only until the commit and taken in one order by every
    /// transaction (no deadlocks with settlements or other replicas).
    pub async fn budget_reserve_with(
        &self,
        r: ReserveRequest,
    ) -> Result<ReserveOutcome, StoreError> {
        match self {
            Store::Postgres { pool, .. } => {
                let mut conn = pool.get().await?;
                Ok(match r.scopes.as_slice() {
                    // One scope: one statement, one round trip, the row lock held only for its
                    // own execution.
                    [s] => {
                        let row: Option<BudgetRow> = {
                            use diesel_async::RunQueryDsl;
                            PgReserveOne {
                                update: ReserveUpdate::new(s, r.amount, r.now),
                                r: &r,
                            }
                            .get_result(&mut *conn)
                            .await
                            .optional()?
                        };
                        match row {
                            Some(row) => ReserveOutcome::Reserved(vec![row]),
                            None => ReserveOutcome::Missed(0),
                        }
                    }
                    _ => pg_many::reserve(&mut conn, &r).await?,
                })
            }
            Store::Sqlite { pool, .. } => {
                // The whole transaction in one blocking call, taking the write lock at its
                // start (BEGIN IMMEDIATE), instead of a thread hop per statement.
                let mut conn = pool.get().await?;
                Ok(conn.spawn_blocking(move |c| sqlite::reserve(c, &r)).await?)
            }
        }
    }
}

impl Store {
    /// Grows the lease `lease_id` by `add` (0: only renews it) and moves its expiry to
    /// `expires_at`, in one transaction: the lease row first, then the budget row's conditional
    /// UPDATE (the same lock order as a reservation's). Off the request path.
    pub async fn budget_lease_grow(
        &self,
        lease_id: &str,
        scope: &ReserveScope,
        add: i64,
        expires_at: i64,
        now: i64,
    ) -> Result<LeaseGrow, StoreError> {
        use crate::store::schema::budget_reservations as r;
        use diesel::prelude::*;
        use diesel_async::{AsyncConnection, RunQueryDsl};
        /// Why the grow transaction was rolled back.
        enum Undo {
            Db(diesel::result::Error),
            Gone,
            NoRoom,
        }
        impl From<diesel::result::Error> for Undo {
            fn from(e: diesel::result::Error) -> Self {
                Undo::Db(e)
            }
        }
        let result = crate::store::with_conn!(self, conn => {
            conn.transaction::<_, Undo, _>(async |conn| {
                let n = diesel::update(r::table.filter(r::id.eq(lease_id)))
                    .set((
                        r::amount_micros.eq(r::amount_micros + add),
                        r::expires_at.eq(expires_at),
                    ))
                    .execute(&mut *conn)
                    .await?;
                if n == 0 {
                    return Err(Undo::Gone);
                }
                let row: Option<BudgetRow> = ReserveUpdate::new(scope, add, now)
                    .get_result(&mut *conn)
                    .await
                    .optional()?;
                row.ok_or(Undo::NoRoom)
            })
            .await
        });
        match result {
            Ok(row) => Ok(LeaseGrow::Grown(row)),
            Err(Undo::Gone) => Ok(LeaseGrow::Gone),
            Err(Undo::NoRoom) => Ok(LeaseGrow::NoRoom),
            Err(Undo::Db(e)) => Err(e.into()),
        }
    }
}

/// Several scopes on PostgreSQL.
mod pg_many {
    use diesel::prelude::*;
    use diesel::sql_types::{BigInt, Text};
    use diesel::IntoSql;
    use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};

    use super::{outcome, ReserveUpdate, TxError};
    use crate::store::budgets::{BudgetRow, ReserveOutcome, ReserveRequest};
    use crate::store::schema::{budget_reservations, budgets};

    /// The reservation rows are written first (they lock nothing but a key share of the budget
    /// rows); the budget rows are then updated in id order.
    pub(super) async fn reserve(
        conn: &mut AsyncPgConnection,
        r: &ReserveRequest,
    ) -> QueryResult<ReserveOutcome> {
        let result = conn
            .transaction::<_, TxError, _>(async |conn| {
                if !r.durable {
                    diesel::sql_query("SET LOCAL synchronous_commit = off")
                        .execute(&mut *conn)
                        .await?;
                }
                let mut order = Vec::with_capacity(r.scopes.len());
                for (i, s) in r.scopes.iter().enumerate() {
                    let budget: Option<i64> = diesel::insert_into(budget_reservations::table)
                        .values(
                            budgets::table
                                .filter(budgets::scope.eq(s.scope))
                                .filter(budgets::subject_id.eq(s.subject_id))
                                .select((
                                    r.reservation_id.as_str().into_sql::<Text>(),
                                    budgets::id,
                                    r.request_id.as_str().into_sql::<Text>(),
                                    r.amount.into_sql::<BigInt>(),
                                    r.now.into_sql::<BigInt>(),
                                    r.expires_at.into_sql::<BigInt>(),
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
                let mut rows: Vec<Option<BudgetRow>> = vec![None; r.scopes.len()];
                for (_, i) in order {
                    let row: Option<BudgetRow> = ReserveUpdate::new(&r.scopes[i], r.amount, r.now)
                        .get_result(&mut *conn)
                        .await
                        .optional()?;
                    match row {
                        Some(row) => rows[i] = Some(row),
                        None => return Err(TxError::Missed(i)),
                    }
                }
                Ok(rows.into_iter().flatten().collect::<Vec<_>>())
            })
            .await;
        outcome(result)
    }
}

/// SQLite, on the blocking connection (sync diesel).
mod sqlite {
    use diesel::prelude::*;
    use diesel::sqlite::SqliteConnection;

    use super::{outcome, ReserveUpdate, TxError};
    use crate::store::budgets::{BudgetRow, NewReservation, ReserveOutcome, ReserveRequest};
    use crate::store::schema::budget_reservations;

    /// The budget rows are updated in the order asked (SQLite has one writer: no lock order
    /// to keep), then the reservation rows written.
    pub(super) fn reserve(
        c: &mut SqliteConnection,
        r: &ReserveRequest,
    ) -> QueryResult<ReserveOutcome> {
        let result = c.immediate_transaction::<_, TxError, _>(|c| {
            let mut rows = Vec::with_capacity(r.scopes.len());
            for (i, s) in r.scopes.iter().enumerate() {
                let row: Option<BudgetRow> = ReserveUpdate::new(s, r.amount, r.now)
                    .get_result(c)
                    .optional()?;
                match row {
                    Some(row) => rows.push(row),
                    None => return Err(TxError::Missed(i)),
                }
            }
            for row in &rows {
                diesel::insert_into(budget_reservations::table)
                    .values(NewReservation {
                        id: &r.reservation_id,
                        budget_id: row.id,
                        request_id: &r.request_id,
                        amount_micros: r.amount,
                        created_at: r.now,
                        expires_at: r.expires_at,
                    })
                    .execute(c)?;
            }
            Ok(rows)
        });
        outcome(result)
    }
}
