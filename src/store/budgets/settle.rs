//! Settlements and expiry: reservations deleted and given back, actual costs added, periods
//! rolled over. The statements are written once ([`release`], [`rollover`], [`charge`]) and run
//! on the async PostgreSQL connection or, for SQLite, in one blocking call.

use std::collections::BTreeMap;
use std::sync::Arc;

use diesel::dsl;
use diesel::prelude::*;
use diesel::OptionalExtension;
use diesel_async::{AsyncConnection, RunQueryDsl};

use super::{Settlement, LEASE_ID_PREFIX};
use crate::store::ledger::pg_insert_rows;
use crate::store::schema::{budget_reservations, budgets};
use crate::store::{NewLedgerRow, Store, StoreError};

/// Reservations of a settlement batch deleted, returning what each gave back to which budget.
type Release<'a> = dsl::Returning<
    dsl::delete<
        dsl::Filter<budget_reservations::table, dsl::EqAny<budget_reservations::id, Vec<&'a str>>>,
    >,
    (
        budget_reservations::budget_id,
        budget_reservations::amount_micros,
    ),
>;

fn release(ids: Vec<&str>) -> Release<'_> {
    diesel::delete(budget_reservations::table.filter(budget_reservations::id.eq_any(ids)))
        .returning((
            budget_reservations::budget_id,
            budget_reservations::amount_micros,
        ))
}

/// A budget still in an older period of the same kind starts the period at `period_start`
/// with nothing spent (reservations in flight are carried over).
pub(super) type Rollover<'a> = dsl::Update<
    dsl::Filter<
        dsl::Filter<
            dsl::Filter<budgets::table, dsl::Eq<budgets::id, i64>>,
            dsl::Eq<budgets::period, &'a str>,
        >,
        dsl::Lt<budgets::period_start, i64>,
    >,
    (
        dsl::Eq<budgets::period_start, i64>,
        dsl::Eq<budgets::spent_micros, i64>,
        dsl::Eq<budgets::updated_at, i64>,
    ),
>;

pub(super) fn rollover(id: i64, period: &str, period_start: i64, now: i64) -> Rollover<'_> {
    diesel::update(
        budgets::table
            .filter(budgets::id.eq(id))
            .filter(budgets::period.eq(period))
            .filter(budgets::period_start.lt(period_start)),
    )
    .set((
        budgets::period_start.eq(period_start),
        budgets::spent_micros.eq(0),
        budgets::updated_at.eq(now),
    ))
}

/// A budget charged `cost` and given back `give_back` of what was reserved.
type Charge = dsl::Update<
    dsl::Filter<budgets::table, dsl::Eq<budgets::id, i64>>,
    (
        dsl::Eq<budgets::spent_micros, dsl::Add<budgets::spent_micros, i64>>,
        dsl::Eq<budgets::reserved_micros, dsl::Sub<budgets::reserved_micros, i64>>,
        dsl::Eq<budgets::updated_at, i64>,
    ),
>;

fn charge(id: i64, cost: i64, give_back: i64, now: i64) -> Charge {
    diesel::update(budgets::table.filter(budgets::id.eq(id))).set((
        budgets::spent_micros.eq(budgets::spent_micros + cost),
        budgets::reserved_micros.eq(budgets::reserved_micros - give_back),
        budgets::updated_at.eq(now),
    ))
}

/// What a batch of settlements writes, worked out before the transaction.
struct Plan<'a> {
    reservations: Vec<&'a str>,
    /// Per lease drawn on: the most it gives up (costs charged to it plus unused handed back).
    leases: BTreeMap<&'a str, i64>,
    /// Per budget, in id order (the order every writer locks them in): the cost to add, and
    /// the period it belongs to (the latest any settlement of the batch names).
    budgets: BTreeMap<i64, (i64, &'a str, i64)>,
}

impl<'a> Plan<'a> {
    fn of(batch: &'a [Settlement]) -> Plan<'a> {
        let mut budgets = BTreeMap::<i64, (i64, &'a str, i64)>::new();
        let mut leases = BTreeMap::<&'a str, i64>::new();
        for s in batch {
            for (lease, give_back) in &s.leases {
                *leases.entry(lease.as_str()).or_default() += s.cost_micros + give_back;
            }
            for part in &s.parts {
                let e = budgets.entry(part.budget_id).or_insert((
                    0,
                    part.period.as_str(),
                    part.period_start,
                ));
                e.0 += s.cost_micros;
                if part.period_start > e.2 {
                    e.1 = part.period.as_str();
                    e.2 = part.period_start;
                }
            }
        }
        Plan {
            reservations: batch
                .iter()
                .map(|s| s.reservation_id.as_str())
                .filter(|id| !id.is_empty())
                .collect(),
            leases,
            budgets,
        }
    }

    /// The statements that bring each budget up to date, given what its reservations held, in
    /// budget id order. A budget only released from (a reservation whose settlement names no
    /// parts: one whose commit went unconfirmed) is given back without a rollover.
    fn updates<'p>(
        &'p self,
        held: &'p BTreeMap<i64, i64>,
        now: i64,
    ) -> impl Iterator<Item = (Option<Rollover<'a>>, Charge)> + 'p {
        let mut ids: Vec<i64> = self.budgets.keys().chain(held.keys()).copied().collect();
        ids.sort_unstable();
        ids.dedup();
        ids.into_iter().map(move |budget| {
            let give_back = held.get(&budget).copied().unwrap_or(0);
            match self.budgets.get(&budget) {
                Some(&(cost, period, period_start)) => (
                    Some(rollover(budget, period, period_start, now)),
                    charge(budget, cost, give_back, now),
                ),
                None => (None, charge(budget, 0, give_back, now)),
            }
        })
    }
}

/// Adds released `(budget, amount)` pairs to what each budget gets back.
fn add_released(held: &mut BTreeMap<i64, i64>, released: Vec<(i64, i64)>) {
    for (budget, amount) in released {
        *held.entry(budget).or_default() += amount;
    }
}

/// A lease's row: its budget and what it holds.
type LeaseHeld<'a> = dsl::Select<
    dsl::Filter<budget_reservations::table, dsl::Eq<budget_reservations::id, &'a str>>,
    (
        budget_reservations::budget_id,
        budget_reservations::amount_micros,
    ),
>;

fn lease_held(id: &str) -> LeaseHeld<'_> {
    budget_reservations::table
        .filter(budget_reservations::id.eq(id))
        .select((
            budget_reservations::budget_id,
            budget_reservations::amount_micros,
        ))
}

/// A lease giving up `take` of the `amount` it was read with (matches nothing if it changed or
/// went away meanwhile: then it gives up nothing).
type LeaseTake<'a> = dsl::Update<
    dsl::Filter<
        dsl::Filter<budget_reservations::table, dsl::Eq<budget_reservations::id, &'a str>>,
        dsl::Eq<budget_reservations::amount_micros, i64>,
    >,
    dsl::Eq<budget_reservations::amount_micros, i64>,
>;

fn lease_take(id: &str, amount: i64, take: i64) -> LeaseTake<'_> {
    diesel::update(
        budget_reservations::table
            .filter(budget_reservations::id.eq(id))
            .filter(budget_reservations::amount_micros.eq(amount)),
    )
    .set(budget_reservations::amount_micros.eq(amount - take))
}

impl Store {
    /// Writes settlements (and their ledger rows) in one transaction: the reservation rows are
    /// deleted and their amounts given back (unless they already expired and were released),
    /// a period that ended while a request ran is rolled over, and the actual costs are added.
    /// Each budget row is updated once per batch, last, in id order.
    pub async fn budget_settle(
        &self,
        batch: &Arc<[Settlement]>,
        now: i64,
    ) -> Result<(), StoreError> {
        if batch.is_empty() {
            return Ok(());
        }
        match self {
            Store::Sqlite { pool, .. } => {
                let mut conn = pool.get().await?;
                let batch = batch.clone();
                conn.spawn_blocking(move |c| sqlite::settle(c, &batch, now))
                    .await?;
            }
            Store::Postgres { pool, .. } => {
                let mut conn = pool.get().await?;
                let plan = Plan::of(batch);
                let ledger: Vec<NewLedgerRow> =
                    batch.iter().filter_map(|s| s.ledger.clone()).collect();
                conn.transaction::<_, diesel::result::Error, _>(async |conn| {
                    pg_insert_rows(conn, &ledger).await?;
                    let mut held = BTreeMap::new();
                    // One parameter an id; PostgreSQL takes at most 65535 in one statement.
                    for chunk in plan.reservations.chunks(1000) {
                        add_released(&mut held, release(chunk.to_vec()).load(conn).await?);
                    }
                    for (&lease, &want) in &plan.leases {
                        // Locked (lease row before budget row, as everywhere): a lease grown
                        // meanwhile must not make the take below miss.
                        let Some((budget, amount)) = lease_held(lease)
                            .for_update()
                            .first::<(i64, i64)>(conn)
                            .await
                            .optional()?
                        else {
                            continue;
                        };
                        let take = amount.min(want).max(0);
                        if take > 0 && lease_take(lease, amount, take).execute(conn).await? > 0 {
                            add_released(&mut held, vec![(budget, take)]);
                        }
                    }
                    for (roll, charge) in plan.updates(&held, now) {
                        if let Some(roll) = roll {
                            roll.execute(conn).await?;
                        }
                        charge.execute(conn).await?;
                    }
                    Ok(())
                })
                .await?;
            }
        }
        Ok(())
    }

    /// Releases reservations that expired by `now` (of one budget, or of all), at most
    /// `limit` of them, through the expiry indexes. Returns how many were released.
    pub async fn budget_release_expired(
        &self,
        budget_id: Option<i64>,
        now: i64,
        limit: i64,
    ) -> Result<usize, StoreError> {
        self.budget_expire_reservations(budget_id, now, limit, false)
            .await
    }

    /// As [`Store::budget_release_expired`]; with `charge_requests` a request's expired
    /// reservation is charged as spent instead of given back (leases are always given back).
    pub async fn budget_expire_reservations(
        &self,
        budget_id: Option<i64>,
        now: i64,
        limit: i64,
        charge_requests: bool,
    ) -> Result<usize, StoreError> {
        match self {
            // A deferred transaction that reads and then deletes fails at once with
            // SQLITE_BUSY when another connection committed in between (WAL does not wait
            // `busy_timeout` on that upgrade): take the write lock at the start instead.
            Store::Sqlite { pool, .. } => {
                let mut conn = pool.get().await?;
                Ok(conn
                    .spawn_blocking(move |c| {
                        sqlite::expire(c, budget_id, now, limit, charge_requests)
                    })
                    .await?)
            }
            Store::Postgres { pool, .. } => {
                let mut conn = pool.get().await?;
                Ok(conn
                    .transaction::<_, diesel::result::Error, _>(async |conn| {
                        let expired = budget_reservations::table
                            .filter(budget_reservations::expires_at.le(now))
                            .select((budget_reservations::id, budget_reservations::budget_id))
                            .limit(limit)
                            .into_boxed();
                        let expired: Vec<(String, i64)> = match budget_id {
                            Some(b) => expired.filter(budget_reservations::budget_id.eq(b)),
                            None => expired.order(budget_reservations::expires_at.asc()),
                        }
                        .load(&mut *conn)
                        .await?;
                        let mut expiry = Expiry::new(charge_requests);
                        for (id, budget) in expired {
                            let amount = expire_one(&id, budget, now)
                                .get_result(&mut *conn)
                                .await
                                .optional()?;
                            expiry.add(&id, budget, amount);
                        }
                        for charge in expiry.charges(now) {
                            charge.execute(&mut *conn).await?;
                        }
                        Ok(expiry.released)
                    })
                    .await?)
            }
        }
    }
}

/// One expired reservation deleted, returning what it held (nothing if a settlement racing
/// the expiry deleted it first: whoever deletes the row gives the amount back, once).
type ExpireOne<'a> = dsl::Returning<
    dsl::delete<
        dsl::Filter<
            dsl::Filter<
                dsl::Filter<budget_reservations::table, dsl::Eq<budget_reservations::id, &'a str>>,
                dsl::Eq<budget_reservations::budget_id, i64>,
            >,
            dsl::LtEq<budget_reservations::expires_at, i64>,
        >,
    >,
    budget_reservations::amount_micros,
>;

fn expire_one(id: &str, budget: i64, now: i64) -> ExpireOne<'_> {
    diesel::delete(
        budget_reservations::table
            .filter(budget_reservations::id.eq(id))
            .filter(budget_reservations::budget_id.eq(budget))
            .filter(budget_reservations::expires_at.le(now)),
    )
    .returning(budget_reservations::amount_micros)
}

/// What an expiry pass released, per budget.
struct Expiry {
    charge_requests: bool,
    /// Per budget: (charged as spent, given back from reserved).
    give_back: BTreeMap<i64, (i64, i64)>,
    released: usize,
}

impl Expiry {
    fn new(charge_requests: bool) -> Expiry {
        Expiry {
            charge_requests,
            give_back: BTreeMap::new(),
            released: 0,
        }
    }

    /// Counts reservation `id` of `budget`, which held `amount` if this pass deleted it.
    fn add(&mut self, id: &str, budget: i64, amount: Option<i64>) {
        let Some(amount) = amount else { return };
        let e = self.give_back.entry(budget).or_default();
        if self.charge_requests && !id.starts_with(LEASE_ID_PREFIX) {
            e.0 += amount;
        }
        e.1 += amount;
        self.released += 1;
    }

    /// The budget updates, last and in id order: locks held briefly, in one order.
    fn charges(&self, now: i64) -> impl Iterator<Item = Charge> + '_ {
        self.give_back
            .iter()
            .map(move |(&budget, &(spent, amount))| charge(budget, spent, amount, now))
    }
}

/// [`Store::budget_settle`] on SQLite: the same statements, sync diesel, in one transaction
/// that takes the write lock at its start.
mod sqlite {
    use std::collections::BTreeMap;

    use diesel::prelude::*;
    use diesel::sqlite::SqliteConnection;

    use super::{add_released, expire_one, lease_held, lease_take, release, Expiry, Plan};
    use crate::store::budgets::Settlement;
    use crate::store::ledger::sqlite_insert_rows;
    use crate::store::schema::budget_reservations;
    use crate::store::NewLedgerRow;

    pub(super) fn expire(
        c: &mut SqliteConnection,
        budget_id: Option<i64>,
        now: i64,
        limit: i64,
        charge_requests: bool,
    ) -> QueryResult<usize> {
        c.immediate_transaction(|c| {
            let expired = budget_reservations::table
                .filter(budget_reservations::expires_at.le(now))
                .select((budget_reservations::id, budget_reservations::budget_id))
                .limit(limit)
                .into_boxed();
            let expired: Vec<(String, i64)> = match budget_id {
                Some(b) => expired.filter(budget_reservations::budget_id.eq(b)),
                None => expired.order(budget_reservations::expires_at.asc()),
            }
            .load(c)?;
            let mut expiry = Expiry::new(charge_requests);
            for (id, budget) in expired {
                let amount = expire_one(&id, budget, now).get_result(c).optional()?;
                expiry.add(&id, budget, amount);
            }
            for charge in expiry.charges(now) {
                charge.execute(c)?;
            }
            Ok(expiry.released)
        })
    }

    pub(super) fn settle(
        c: &mut SqliteConnection,
        batch: &[Settlement],
        now: i64,
    ) -> QueryResult<()> {
        let plan = Plan::of(batch);
        c.immediate_transaction(|c| {
            let rows: Vec<&NewLedgerRow> = batch.iter().filter_map(|s| s.ledger.as_ref()).collect();
            sqlite_insert_rows(c, &rows)?;
            let mut held = BTreeMap::new();
            // SQLite's default limit is 32766 parameters a statement; older builds took 999.
            for chunk in plan.reservations.chunks(500) {
                add_released(&mut held, release(chunk.to_vec()).load(c)?);
            }
            for (&lease, &want) in &plan.leases {
                let Some((budget, amount)) = lease_held(lease).first::<(i64, i64)>(c).optional()?
                else {
                    continue;
                };
                let take = amount.min(want).max(0);
                if take > 0 && lease_take(lease, amount, take).execute(c)? > 0 {
                    add_released(&mut held, vec![(budget, take)]);
                }
            }
            for (roll, charge) in plan.updates(&held, now) {
                if let Some(roll) = roll {
                    roll.execute(c)?;
                }
                charge.execute(c)?;
            }
            Ok(())
        })
    }
}
