//! Budgets, their reservations, per-scope rate limits and the usage query.
//!
//! A budget row holds a scope's limit, its period and the current period's counters:
//! `spent_micros` (settled) and `reserved_micros` (maximum costs of requests in flight). A
//! reservation is one conditional UPDATE per scope (`spent + reserved + cost <= limit`), all
//! scopes of a request in one transaction together with one `budget_reservations` row per scope
//! (with an expiry, so that a crashed replica's reservations are released by someone else).
//! Settlement deletes those rows, gives the reservation back and adds the actual cost, in one
//! transaction with the request's ledger row: the ledger and the budget agree.

mod reserve;
mod settle;

/// Reservation ids of budget leases start with this (a request's reservation never does).
pub const LEASE_ID_PREFIX: &str = "lease-";

use diesel::dsl::{self, sql};
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

impl<'a> NewBudget<'a> {
    /// A scope's budget row with nothing spent or reserved yet.
    fn fresh(
        scope: &'a str,
        subject_id: i64,
        explicit: bool,
        limit_micros: i64,
        period: &'a str,
        period_start: i64,
        now: i64,
    ) -> Self {
        NewBudget {
            scope,
            subject_id,
            explicit,
            limit_micros,
            period,
            period_start,
            spent_micros: 0,
            reserved_micros: 0,
            updated_at: now,
        }
    }
}

/// The budget row of one scope.
type OfScope<'a> = dsl::Filter<
    dsl::Filter<budgets::table, dsl::Eq<budgets::scope, &'a str>>,
    dsl::Eq<budgets::subject_id, i64>,
>;

fn of_scope(scope: &str, subject_id: i64) -> OfScope<'_> {
    budgets::table
        .filter(budgets::scope.eq(scope))
        .filter(budgets::subject_id.eq(subject_id))
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

/// One reservation attempt: `amount` in every scope, under one id, until `expires_at`.
#[derive(Debug, Clone)]
pub struct ReserveRequest {
    pub scopes: Vec<ReserveScope>,
    pub amount: i64,
    pub reservation_id: String,
    pub request_id: String,
    pub now: i64,
    pub expires_at: i64,
    /// With `false`, PostgreSQL commits the reservation without waiting for its WAL flush
    /// (`synchronous_commit = off` for that transaction only).
    pub durable: bool,
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
    /// The reservation deleted and given back (empty: none, a request admitted on leases).
    pub reservation_id: String,
    pub parts: Vec<SettlePart>,
    pub cost_micros: i64,
    /// Leases (reservation rows kept open) this settlement draws on: each gives up
    /// `cost_micros` plus the amount named here (unused lease handed back), never more than it
    /// holds; the row stays.
    pub leases: Vec<(String, i64)>,
    /// The request's ledger row, written in the same transaction.
    pub ledger: Option<NewLedgerRow>,
}

impl Settlement {
    /// A settlement that only deletes reservation `id` and gives back whatever it held, to
    /// whichever budgets it held it in (nothing if it was never written).
    pub fn release_only(id: String) -> Settlement {
        Settlement {
            reservation_id: id,
            parts: Vec::new(),
            cost_micros: 0,
            leases: Vec::new(),
            ledger: None,
        }
    }
}

/// One scope of a settlement.
#[derive(Debug, Clone)]
pub struct SettlePart {
    pub budget_id: i64,
    pub period: String,
    /// The start of the period the cost belongs to (now, at settlement).
    pub period_start: i64,
}

/// What growing or renewing a lease did.
#[derive(Debug)]
pub enum LeaseGrow {
    /// The lease holds `add` more and expires later: the budget row after it.
    Grown(BudgetRow),
    /// The budget has no room for `add` (or no longer matches): nothing changed.
    NoRoom,
    /// The lease row is gone (it expired and was released): nothing changed.
    Gone,
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

impl Store {
    /// A scope's budget row.
    pub async fn budget_get(
        &self,
        scope: &str,
        subject_id: i64,
    ) -> Result<Option<BudgetRow>, StoreError> {
        with_conn!(self, conn => {
            Ok(of_scope(scope, subject_id)
                .select(BudgetRow::as_select())
                .first(conn)
                .await
                .optional()?)
        })
    }

    /// What the replicas' leases on a budget row still hold (granted and not yet charged).
    pub async fn budget_leased(&self, budget_id: i64) -> Result<i64, StoreError> {
        with_conn!(self, conn => {
            // One row per replica holding a lease: summed here, not in SQL (PostgreSQL's
            // SUM of a bigint is a numeric).
            let held: Vec<i64> = budget_reservations::table
                .filter(budget_reservations::budget_id.eq(budget_id))
                .filter(budget_reservations::id.like("lease-%"))
                .select(budget_reservations::amount_micros)
                .load(conn)
                .await?;
            Ok(held.into_iter().fold(0i64, i64::saturating_add))
        })
    }

    /// A scope's budget row and rate limits, in one go.
    pub async fn budget_policy(
        &self,
        scope: &str,
        subject_id: i64,
    ) -> Result<(Option<BudgetRow>, Option<RateLimitRow>), StoreError> {
        with_conn!(self, conn => {
            let budget = of_scope(scope, subject_id)
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
                .values(NewBudget::fresh(
                    scope,
                    subject_id,
                    false,
                    limit_micros,
                    period,
                    period_start,
                    now,
                ))
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
            settle::rollover(id, period, period_start, now)
                .execute(conn)
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
                        .values(NewBudget::fresh(
                            scope,
                            subject_id,
                            true,
                            limit_micros,
                            period,
                            period_start,
                            now,
                        ))
                        .on_conflict_do_nothing()
                        .execute(&mut *conn)
                        .await?;
                    diesel::update(of_scope(scope, subject_id).filter(budgets::period.ne(period)))
                        .set((budgets::period.eq(period), budgets::period_start.eq(period_start)))
                        .execute(&mut *conn)
                        .await?;
                    diesel::update(of_scope(scope, subject_id))
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
            let n = diesel::update(of_scope(scope, subject_id).filter(budgets::explicit.eq(true)))
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

    /// Moves a lease's expiry (its replica still has requests in flight on it); `false` if
    /// the lease is gone.
    pub async fn budget_lease_renew(
        &self,
        lease_id: &str,
        expires_at: i64,
    ) -> Result<bool, StoreError> {
        with_conn!(self, conn => {
            let n = diesel::update(
                budget_reservations::table.filter(budget_reservations::id.eq(lease_id)),
            )
            .set(budget_reservations::expires_at.eq(expires_at))
            .execute(conn)
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
            // Only the filters given are added, so that a user's or key's report can use the
            // (user_id, started_at) or (key_id, started_at) index: `col = ? OR ? IS NULL` would
            // keep the planner off both.
            let mut q = usage_ledger::table
                .filter(usage_ledger::resolved_model.is_not_null())
                .group_by(usage_ledger::resolved_model)
                .select((
                    usage_ledger::resolved_model,
                    sql::<BigInt>("CAST(COUNT(*) AS BIGINT)"),
                    sql::<BigInt>("CAST(COALESCE(SUM(prompt_tokens), 0) AS BIGINT)"),
                    sql::<BigInt>("CAST(COALESCE(SUM(completion_tokens), 0) AS BIGINT)"),
                    sql::<BigInt>("CAST(COALESCE(SUM(cost_micros), 0) AS BIGINT)"),
                ))
                .order(usage_ledger::resolved_model.asc())
                .into_boxed();
            if let Some(user_id) = f.user_id {
                q = q.filter(usage_ledger::user_id.eq(user_id));
            }
            if let Some(key_id) = f.key_id {
                q = q.filter(usage_ledger::key_id.eq(key_id));
            }
            if let Some(model) = f.model.clone() {
                q = q.filter(
                    usage_ledger::resolved_model
                        .eq(model.clone())
                        .or(usage_ledger::requested_model.eq(model)),
                );
            }
            if let Some(from) = f.from {
                q = q.filter(usage_ledger::started_at.ge(from));
            }
            if let Some(to) = f.to {
                q = q.filter(usage_ledger::started_at.lt(to));
            }
            let rows: Vec<(Option<String>, i64, i64, i64, i64)> = q.load(conn).await?;
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
