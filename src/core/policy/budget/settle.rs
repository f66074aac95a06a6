//! Settling: what a request holds ([`HoldSlot`]), and the writer that gives a reservation back
//! and adds the actual cost, in one transaction with the request's ledger row.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;

use super::lease::LeasedPart;
use super::{Period, ScopeKey};
use crate::clock::Clock;
use crate::config::{BudgetsConfig, ExpiredReservations};
use crate::core::batch_queue::{BatchQueue, Linger, Producer};
use crate::core::ledger::{write_exactly_once, Ledger};
use crate::core::policy::rate_limit::RateCharge;
use crate::core::policy::Budgets;
use crate::core::policy::WriteCounter;
use crate::providers::Usage;
use crate::store::{NewLedgerRow, SettlePart, Settlement, Store};

/// A request's reservation and rate-limit charge, settled exactly once when its outcome is
/// recorded.
pub struct Hold {
    engine: Arc<Budgets>,
    reservation: Option<Reservation>,
    /// What the request took from this replica's leases (instead of a reservation).
    leased: Vec<LeasedPart>,
    rate: Option<RateCharge>,
}

/// What a request reserved: one amount under one id, in each budget (row id, period, scope).
#[derive(Debug, Clone)]
pub(in crate::core::policy) struct Reservation {
    pub(super) id: String,
    pub(super) parts: Vec<(i64, Period, ScopeKey)>,
}

impl Reservation {
    /// The settlement of this reservation at `now`, and the scopes it gives room back to.
    pub(super) fn settlement(
        self,
        cost_micros: i64,
        ledger: Option<NewLedgerRow>,
        now: i64,
    ) -> (Settlement, Vec<ScopeKey>) {
        let keys = self.parts.iter().map(|p| p.2).collect();
        let settlement = Settlement {
            reservation_id: self.id,
            parts: self
                .parts
                .iter()
                .map(|(id, period, _)| SettlePart {
                    budget_id: *id,
                    period: period.name(),
                    period_start: period.start(now),
                })
                .collect(),
            cost_micros,
            leases: Vec::new(),
            ledger,
        };
        (settlement, keys)
    }
}

/// Where the outcome record keeps a request's [`Hold`]; taking it settles it once. Empty (no
/// allocation) for a request that took nothing, as every request's record starts.
#[derive(Clone, Default)]
pub struct HoldSlot(Option<Arc<Mutex<Option<Hold>>>>);

impl std::fmt::Debug for HoldSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("HoldSlot").field(&self.is_held()).finish()
    }
}

impl HoldSlot {
    /// Settles the request: corrects its rate-limit charge and, if it reserved budget, queues
    /// the settlement together with `ledger_row`; otherwise the row goes to `ledger`.
    pub fn settle(
        &self,
        cost_micros: i64,
        usage: &Usage,
        ledger_row: NewLedgerRow,
        ledger: &Ledger,
    ) {
        let hold = self
            .0
            .as_ref()
            .and_then(|slot| slot.lock().ok().and_then(|mut h| h.take()));
        match hold {
            Some(h) => h.settle(cost_micros, usage, ledger_row, ledger),
            None => ledger.record(ledger_row),
        }
    }

    /// Whether a hold is waiting to be settled.
    pub fn is_held(&self) -> bool {
        self.0
            .as_ref()
            .is_some_and(|slot| slot.lock().is_ok_and(|h| h.is_some()))
    }
}

impl Hold {
    fn settle(self, cost_micros: i64, usage: &Usage, ledger_row: NewLedgerRow, ledger: &Ledger) {
        let now = self.engine.clock.now_ms();
        if let Some(rate) = &self.rate {
            self.engine
                .limiter
                .settle(now, rate, usage.prompt_tokens + usage.completion_tokens);
        }
        if !self.leased.is_empty() {
            self.engine
                .settle_leased(self.leased, cost_micros, Some(ledger_row), now);
            return;
        }
        match self.reservation {
            Some(r) => {
                if cost_micros > 0 {
                    // Over the reservation only if the upstream reported more prompt tokens than
                    // estimated; the ledger and the budget still agree on what was spent.
                    tracing::trace!(reservation = %r.id, cost_micros, "settling");
                }
                let (settlement, keys) = r.settlement(cost_micros, Some(ledger_row), now);
                self.engine.settler.enqueue(settlement, keys);
            }
            None => ledger.record(ledger_row),
        }
    }
}

impl Budgets {
    /// The slot a request's outcome guard keeps; empty when nothing was taken.
    pub(in crate::core::policy) fn hold(
        self: &Arc<Self>,
        reservation: Option<Reservation>,
        leased: Vec<LeasedPart>,
        rate: Option<RateCharge>,
    ) -> HoldSlot {
        if reservation.is_none() && leased.is_empty() && rate.is_none() {
            return HoldSlot::default();
        }
        HoldSlot(Some(Arc::new(Mutex::new(Some(Hold {
            engine: self.clone(),
            reservation,
            leased,
            rate,
        })))))
    }

    /// Waits until every settlement queued before this call is written.
    pub async fn flush(&self) {
        self.settler.flush().await
    }
}

/// The most settlements written in one transaction.
const BATCH_SIZE: usize = 500;

/// A settlement and the scopes it gives room back to.
type Queued = (Settlement, Vec<ScopeKey>);

/// The queue to the settlement writer, and what requests of this process know about it.
/// Dropping it closes the queue: the writer writes what is left and stops.
pub(in crate::core::policy) struct Settler {
    queue: Producer<Queued>,
    shared: Arc<Shared>,
}

struct Shared {
    /// Settlements queued but not yet written, per scope: a request that finds no room waits
    /// for them (they can only free budget) before it answers `budget_exceeded`.
    pending: Mutex<HashMap<ScopeKey, u32>>,
    settled: Notify,
    /// SQLite has one writer at a time, and a writer that finds the database locked sleeps in
    /// its busy handler for milliseconds: this process's budget writes take turns here instead.
    sqlite_writes: tokio::sync::Mutex<()>,
}

impl Shared {
    async fn write_turn(&self, store: &Store) -> Option<tokio::sync::MutexGuard<'_, ()>> {
        match store {
            Store::Sqlite { .. } => Some(self.sqlite_writes.lock().await),
            Store::Postgres { .. } => None,
        }
    }
}

impl Settler {
    /// Starts the settlement writer and the expiry sweep.
    pub(in crate::core::policy) fn start(
        store: Store,
        clock: Clock,
        config: &BudgetsConfig,
        writes: WriteCounter,
    ) -> Settler {
        let (producer, queue) = BatchQueue::open(BATCH_SIZE);
        let shared = Arc::new(Shared {
            pending: Mutex::new(HashMap::new()),
            settled: Notify::new(),
            sqlite_writes: tokio::sync::Mutex::new(()),
        });
        tokio::spawn(writer(
            store,
            clock,
            queue,
            shared.clone(),
            writes,
            Sweep {
                every: Duration::from_secs(config.sweep_interval_secs.max(1)),
                charge_expired: config.expired_reservations == ExpiredReservations::Charge,
            },
            // Briefly when a settlement in the batch gives budget back (a request elsewhere may
            // be waiting for that room), longer when all of them only move a cost from a lease
            // to the spent total (one transaction for many; on SQLite each commit rewrites the
            // touched index pages, so fewer commits are much less work).
            Linger {
                urgent: Duration::from_millis(config.settle_batch_ms),
                usual: Duration::from_millis(config.charge_batch_ms.max(config.settle_batch_ms)),
            },
        ));
        Settler {
            queue: producer,
            shared,
        }
    }

    /// This process's turn to write budgets (SQLite only; PostgreSQL takes writers at once).
    pub(super) async fn write_turn(
        &self,
        store: &Store,
    ) -> Option<tokio::sync::MutexGuard<'_, ()>> {
        self.shared.write_turn(store).await
    }

    /// Queues a settlement; `keys` are the scopes it gives room back to.
    pub(super) fn enqueue(&self, settlement: Settlement, keys: Vec<ScopeKey>) {
        if let Ok(mut p) = self.shared.pending.lock() {
            for k in &keys {
                *p.entry(*k).or_default() += 1;
            }
        }
        let gives_back = !keys.is_empty();
        self.queue.push((settlement, keys), gives_back);
    }

    /// How many settlements of `key` this process has queued but not written.
    pub(super) fn pending(&self, key: ScopeKey) -> u32 {
        self.shared
            .pending
            .lock()
            .map(|p| p.get(&key).copied().unwrap_or(0))
            .unwrap_or(0)
    }

    /// Waits (up to `limit`) until this replica has written its queued settlements of `key`.
    pub(super) async fn wait_settled(&self, key: ScopeKey, limit: Duration) {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let notified = self.shared.settled.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.pending(key) == 0 {
                return;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return;
            }
        }
    }

    async fn flush(&self) {
        self.queue.flush().await;
    }
}

/// How often expired reservations are swept, and whether they are charged.
struct Sweep {
    every: Duration,
    charge_expired: bool,
}

/// The settlement writer: writes what is queued in one transaction once the batch's [`Linger`]
/// is up, retrying until it succeeds; and every `sweep` releases expired reservations.
async fn writer(
    store: Store,
    clock: Clock,
    queue: Arc<BatchQueue<Queued>>,
    shared: Arc<Shared>,
    writes: WriteCounter,
    sweep: Sweep,
    linger: Linger,
) {
    let Sweep {
        every: sweep,
        charge_expired,
    } = sweep;
    let mut tick = tokio::time::interval(sweep);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        // The sweep runs while a batch is gathered, without restarting its linger.
        let mut taken = {
            let next = queue.next_batch(linger);
            tokio::pin!(next);
            loop {
                tokio::select! {
                    taken = &mut next => break taken,
                    _ = tick.tick() => {
                        sweep_expired(&store, &clock, &shared, &writes, charge_expired).await;
                    }
                }
            }
        };
        // A flush with nothing queued is answered at once.
        while let Some(chunk) = taken.next_chunk() {
            let (batch, keys): (Vec<Settlement>, Vec<Vec<ScopeKey>>) = chunk.into_iter().unzip();
            {
                let _turn = shared.write_turn(&store).await;
                write_with_retry(&store, &clock, batch.into(), &writes).await;
            }
            if let Ok(mut p) = shared.pending.lock() {
                for k in keys.into_iter().flatten() {
                    if let Some(n) = p.get_mut(&k) {
                        *n = n.saturating_sub(1);
                        if *n == 0 {
                            p.remove(&k);
                        }
                    }
                }
            }
            shared.settled.notify_waiters();
        }
        let closed = taken.closed;
        taken.answer_flushes();
        if closed {
            break;
        }
    }
}

/// Releases reservations past their expiry (or charges them: `budgets.expired_reservations`).
async fn sweep_expired(
    store: &Store,
    clock: &Clock,
    shared: &Shared,
    writes: &WriteCounter,
    charge_expired: bool,
) {
    let turn = shared.write_turn(store).await;
    writes.count("release");
    let released = store
        .budget_expire_reservations(None, clock.now_ms(), 500, charge_expired)
        .await;
    drop(turn);
    match released {
        Ok(0) => {}
        Ok(n) => tracing::info!(released = n, "released expired budget reservations"),
        Err(e) => tracing::warn!(error = %e, "expired reservation sweep failed"),
    }
}

async fn write_with_retry(
    store: &Store,
    clock: &Clock,
    batch: Arc<[Settlement]>,
    writes: &WriteCounter,
) {
    if batch.is_empty() {
        return;
    }
    let probe = batch.iter().find_map(|s| s.ledger.as_ref());
    write_exactly_once("budget settlement", batch.len(), probe, store, || {
        writes.count("settle");
        store.budget_settle(&batch, clock.now_ms())
    })
    .await
}

#[cfg(test)]
#[path = "settle_tests.rs"]
mod tests;
