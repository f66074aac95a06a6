//! Leases: a replica takes a chunk of a scope's remaining budget in one conditional UPDATE (a
//! reservation row of its own that stays open, `lease-...`) and admits requests against it in
//! memory, with no database call on the request path.
//!
//! - The chunk is reserved like any request's maximum cost (`spent + reserved + chunk <=
//!   limit`), so the leases of all replicas and the per-request reservations never add up to
//!   more than the limit: the UPDATE is the only place budget moves to a replica.
//! - A request admitted on a lease holds its maximum cost in the lease (`inflight`); its
//!   settlement charges the actual cost, taken out of the lease row (the row shrinks, `spent`
//!   grows), so what the database holds for this replica stays what the replica may still use.
//! - A lease is grown and renewed in the background when less than half of its last chunk is
//!   left or half of its TTL has passed; a request waits on the database only when the lease is exhausted (or absent).
//! - Near the limit (less than `lease_min_remaining_fraction` of the limit left, or a chunk
//!   smaller than the request) the replica retires its lease: the unused part goes back at
//!   once, the rest when the requests in flight on it have settled, and requests reserve one by
//!   one, exactly.
//! - A lease expires after `lease_ttl_ms` on the clock of whoever looks: a stopped replica's
//!   lease is released like an expired reservation. A replica stops using its own lease a
//!   quarter TTL before its expiry, so that another replica's clock may run that much ahead.
//!   A lease with requests in flight is renewed by a background task, so that a long stream
//!   does not lose what it holds; an idle one is left to expire.

mod grant;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use super::reserve::budget_headers_of;
use super::{Applied, Period, ScopeKey};
use crate::config::BudgetsConfig;
use crate::core::policy::Budgets;
use crate::error::PolicyHeaders;
use crate::store::{SettlePart, Settlement};

/// The lease settings of one admission, taken from the configuration of the moment.
#[derive(Debug, Clone, Copy)]
pub(in crate::core::policy) struct Knobs {
    fraction: f64,
    min_remaining: f64,
    ttl_ms: i64,
    /// How long a scope found near its limit reserves per request before looking again.
    exact_ms: i64,
}

impl Knobs {
    /// The lease settings, or `None` when leases are off.
    pub(in crate::core::policy) fn of(config: &BudgetsConfig) -> Option<Knobs> {
        let fraction = config.lease_fraction.clamp(0.0, 1.0);
        if fraction <= 0.0 || config.lease_ttl_ms == 0 {
            return None;
        }
        Some(Knobs {
            fraction,
            min_remaining: config.lease_min_remaining_fraction.clamp(0.0, 1.0),
            ttl_ms: i64::try_from(config.lease_ttl_ms).unwrap_or(i64::MAX / 4),
            exact_ms: i64::try_from(config.policy_cache_ms).unwrap_or(i64::MAX / 4),
        })
    }

    /// How long before its expiry a replica stops admitting on its own lease.
    fn margin(&self) -> i64 {
        self.ttl_ms / 4
    }
}

/// One lease of this replica.
#[derive(Debug, Clone)]
struct Lease {
    id: String,
    budget_id: i64,
    period: Period,
    period_start: i64,
    /// What the lease was granted in all (what it holds in the database, plus what was
    /// charged to it).
    granted: i64,
    /// Actual costs charged to it.
    charged: i64,
    /// The size of its last grant: it is refilled when less than half of that is left.
    chunk: i64,
    /// Maximum costs of the requests in flight on it.
    inflight: i64,
    expires_at: i64,
    /// The room nobody held at its last grant (limit - spent - reserved), for the headers.
    outside: i64,
    limit: i64,
    /// A background refill or renewal is under way.
    refilling: bool,
}

impl Lease {
    fn available(&self) -> i64 {
        self.granted - self.charged - self.inflight
    }

    fn usable(&self, ap: &Applied, now: i64, knobs: &Knobs) -> bool {
        self.period_start == ap.period.start(now) && now + knobs.margin() < self.expires_at
    }

    fn part(&self) -> SettlePart {
        SettlePart {
            budget_id: self.budget_id,
            period: self.period.name(),
            period_start: self.period_start,
        }
    }
}

/// What a request took from one lease.
#[derive(Debug, Clone)]
pub(in crate::core::policy) struct LeasedPart {
    key: ScopeKey,
    lease_id: String,
    budget_id: i64,
    period: Period,
    amount: i64,
}

/// This replica's leases: the live one of each scope, and retired ones still in use.
#[derive(Default)]
pub(in crate::core::policy) struct Leases {
    state: Mutex<State>,
    /// One grant at a time per scope: it keeps two requests from leasing the same scope twice.
    grant: Mutex<HashMap<ScopeKey, Arc<tokio::sync::Mutex<()>>>>,
    /// The lease settings last admitted with, for the renewal task.
    knobs: Mutex<Option<Knobs>>,
}

#[derive(Default)]
struct State {
    live: HashMap<ScopeKey, Lease>,
    /// Retired leases with requests still in flight, by id: released when the last settles.
    draining: HashMap<String, Lease>,
    /// Scopes found near their limit: until when (and in which period) they reserve per
    /// request without looking at the row again.
    exact: HashMap<ScopeKey, (i64, i64)>,
}

/// What settling or retiring leases leaves to write.
type Writes = Vec<(Settlement, Vec<ScopeKey>)>;

impl State {
    /// Takes `key`'s live lease out of use: its unused part is handed back now, the rest
    /// when its requests in flight settle.
    fn retire(&mut self, key: ScopeKey, out: &mut Writes) {
        let Some(mut lease) = self.live.remove(&key) else {
            return;
        };
        if lease.inflight <= 0 {
            out.push((release(&lease), vec![key]));
            return;
        }
        let unused = lease.available().max(0);
        if unused > 0 {
            lease.granted -= unused;
            out.push((
                Settlement {
                    reservation_id: String::new(),
                    parts: vec![lease.part()],
                    cost_micros: 0,
                    leases: vec![(lease.id.clone(), unused)],
                    ledger: None,
                },
                vec![key],
            ));
        }
        self.draining.insert(lease.id.clone(), lease);
    }
}

impl Leases {
    /// The part of this replica's live lease of `key` (for the budget row `budget_id` in the
    /// period starting at `period_start`) that no request has used or holds: room the row counts
    /// as reserved that is still the scope's to spend.
    pub(in crate::core::policy) fn unused(
        &self,
        key: &ScopeKey,
        budget_id: i64,
        period_start: i64,
    ) -> i64 {
        let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state
            .live
            .get(key)
            .filter(|l| l.budget_id == budget_id && l.period_start == period_start)
            .map_or(0, |l| l.available().max(0))
    }
}

/// The lease row deleted, what it still holds given back.
fn release(lease: &Lease) -> Settlement {
    Settlement {
        reservation_id: lease.id.clone(),
        parts: vec![lease.part()],
        cost_micros: 0,
        leases: Vec::new(),
        ledger: None,
    }
}

impl Budgets {
    /// Admits a request on this replica's leases of every scope in `applied`, taking or
    /// growing a lease when one is missing or exhausted; `None` when a scope is near its limit
    /// (or its row needs fixing): the request then reserves on its own.
    pub(in crate::core::policy) async fn admit_leased(
        self: &Arc<Self>,
        applied: &[Applied],
        max_cost: i64,
        knobs: Knobs,
    ) -> Option<(Vec<LeasedPart>, PolicyHeaders)> {
        if let Ok(mut k) = self.leases.knobs.lock() {
            *k = Some(knobs);
        }
        if self.exact_now(applied) {
            return None;
        }
        for _ in 0..3 {
            let now = self.clock.now_ms();
            let missing = match self.take_local(applied, max_cost, now, knobs) {
                Ok(admitted) => return Some(admitted),
                Err(missing) => missing,
            };
            for i in missing {
                // Boxed: a grant's store calls would make this future, awaited on every
                // leased request, kilobytes to copy.
                match Box::pin(self.grant(&applied[i], max_cost, knobs)).await {
                    Ok(true) => {}
                    Ok(false) => return None,
                    Err(e) => {
                        tracing::warn!(error = %e, "budget lease failed; reserving per request");
                        return None;
                    }
                }
            }
        }
        None
    }

    /// Admits in memory if every scope's lease has room; else the scopes that do not.
    fn take_local(
        self: &Arc<Self>,
        applied: &[Applied],
        max_cost: i64,
        now: i64,
        knobs: Knobs,
    ) -> Result<(Vec<LeasedPart>, PolicyHeaders), Vec<usize>> {
        let mut refills = Vec::new();
        let result = {
            let Ok(mut st) = self.leases.state.lock() else {
                return Err(Vec::new());
            };
            let missing: Vec<usize> = applied
                .iter()
                .enumerate()
                .filter(|(_, ap)| {
                    !st.live
                        .get(&ap.key)
                        .is_some_and(|l| l.usable(ap, now, &knobs) && l.available() >= max_cost)
                })
                .map(|(i, _)| i)
                .collect();
            if !missing.is_empty() {
                return Err(missing);
            }
            let mut parts = Vec::with_capacity(applied.len());
            let mut tightest: Option<(i64, &Applied, i64, i64)> = None;
            for ap in applied {
                let Some(l) = st.live.get_mut(&ap.key) else {
                    continue;
                };
                l.inflight += max_cost;
                parts.push(LeasedPart {
                    key: ap.key,
                    lease_id: l.id.clone(),
                    budget_id: l.budget_id,
                    period: ap.period,
                    amount: max_cost,
                });
                // Refilled before it runs out, renewed before it expires: in the background.
                if !l.refilling
                    && (l.available() * 2 < l.chunk || l.expires_at - now < knobs.ttl_ms / 2)
                {
                    l.refilling = true;
                    refills.push(ap.clone());
                }
                let remaining = l.outside + l.available();
                if tightest.is_none_or(|t| remaining < t.0) {
                    tightest = Some((remaining, ap, l.limit, l.period_start));
                }
            }
            let headers = tightest
                .map(|(remaining, ap, limit, start)| {
                    budget_headers_of(ap, limit, remaining, start, now)
                })
                .unwrap_or_default();
            (parts, headers)
        };
        for ap in refills {
            let engine = self.clone();
            tokio::spawn(async move {
                if let Err(e) = engine.grant(&ap, 0, knobs).await {
                    tracing::warn!(error = %e, "budget lease refill failed");
                }
                if let Ok(mut st) = engine.leases.state.lock() {
                    if let Some(l) = st.live.get_mut(&ap.key) {
                        l.refilling = false;
                    }
                }
            });
        }
        Ok(result)
    }

    /// Whether a scope of the request was found near its limit a moment ago (in this period).
    fn exact_now(&self, applied: &[Applied]) -> bool {
        let now = self.clock.now_ms();
        let Ok(mut st) = self.leases.state.lock() else {
            return false;
        };
        applied.iter().any(|ap| match st.exact.get(&ap.key) {
            Some(&(until, start)) if until > now && start == ap.period.start(now) => true,
            Some(_) => {
                st.exact.remove(&ap.key);
                false
            }
            None => false,
        })
    }

    /// Forgets what this replica knows of a scope's leasing after an admin change here: its
    /// lease is retired (the next request leases under the new limit) and leasing may resume.
    pub(in crate::core::policy) fn reset_lease(&self, key: ScopeKey) {
        if let Ok(mut st) = self.leases.state.lock() {
            st.exact.remove(&key);
        }
        self.retire(key);
    }

    fn live_lease(&self, key: ScopeKey) -> Option<Lease> {
        self.leases
            .state
            .lock()
            .ok()
            .and_then(|st| st.live.get(&key).cloned())
    }

    /// Retires this replica's lease of `key` (near the limit, an admin change, a new period).
    pub(in crate::core::policy) fn retire(&self, key: ScopeKey) {
        let mut out = Vec::new();
        if let Ok(mut st) = self.leases.state.lock() {
            st.retire(key, &mut out);
        }
        for (s, keys) in out {
            self.settler.enqueue(s, keys);
        }
    }

    /// Settles a request admitted on leases: its maximum cost leaves the leases, its actual
    /// cost is charged to them (with its ledger row); a retired lease whose last request this
    /// was is released.
    pub(in crate::core::policy) fn settle_leased(
        &self,
        parts: Vec<LeasedPart>,
        cost_micros: i64,
        ledger: Option<crate::store::NewLedgerRow>,
        now: i64,
    ) {
        let mut out = Vec::new();
        if let Ok(mut st) = self.leases.state.lock() {
            for p in &parts {
                let live = st.live.get_mut(&p.key).filter(|l| l.id == p.lease_id);
                if let Some(l) = live {
                    l.inflight -= p.amount;
                    l.charged += cost_micros;
                    continue;
                }
                let drained = match st.draining.get_mut(&p.lease_id) {
                    Some(l) => {
                        l.inflight -= p.amount;
                        l.charged += cost_micros;
                        l.inflight <= 0
                    }
                    None => false,
                };
                if drained {
                    if let Some(l) = st.draining.remove(&p.lease_id) {
                        out.push((release(&l), vec![p.key]));
                    }
                }
            }
        }
        let charge = Settlement {
            reservation_id: String::new(),
            parts: parts
                .iter()
                .map(|p| SettlePart {
                    budget_id: p.budget_id,
                    period: p.period.name(),
                    period_start: p.period.start(now),
                })
                .collect(),
            cost_micros,
            leases: parts.iter().map(|p| (p.lease_id.clone(), 0)).collect(),
            ledger,
        };
        // The charge first: it is queued before the release, so a batch never loses it. It
        // frees no room (the lease held the cost), so no request waits for it to be written.
        self.settler.enqueue(charge, Vec::new());
        for (s, keys) in out {
            self.settler.enqueue(s, keys);
        }
    }

    /// Keeps leases with requests in flight from expiring under them (a stream can outlive the
    /// TTL while no new request comes to renew it): moves the expiry of every such lease whose
    /// TTL is half gone. An idle lease is left to expire, so that other replicas get it back.
    pub(in crate::core::policy) async fn renew_busy_leases(&self) {
        let Some(knobs) = self.leases.knobs.lock().ok().and_then(|k| *k) else {
            return;
        };
        let now = self.clock.now_ms();
        let due: Vec<String> = match self.leases.state.lock() {
            Ok(st) => st
                .live
                .values()
                .chain(st.draining.values())
                .filter(|l| l.inflight > 0 && l.expires_at - now < knobs.ttl_ms / 2)
                .map(|l| l.id.clone())
                .collect(),
            Err(_) => return,
        };
        for id in due {
            let expires_at = now.saturating_add(knobs.ttl_ms);
            let turn = self.settler.write_turn(&self.store).await;
            let renewed = self.store.budget_lease_renew(&id, expires_at).await;
            drop(turn);
            // Counted once made, not when due: a renewal runs in the background, and whoever
            // reads the count to know it happened must find it in the store.
            self.writes.count("lease");
            match renewed {
                Ok(true) => {
                    if let Ok(mut st) = self.leases.state.lock() {
                        let State { live, draining, .. } = &mut *st;
                        for l in live.values_mut().chain(draining.values_mut()) {
                            if l.id == id {
                                l.expires_at = l.expires_at.max(expires_at);
                            }
                        }
                    }
                }
                Ok(false) => {}
                Err(e) => tracing::warn!(error = %e, "budget lease renewal failed"),
            }
        }
    }

    /// Hands every lease back (at shutdown): what is unused now, the rest as requests settle.
    pub fn release_leases(&self) {
        let keys: Vec<ScopeKey> = self
            .leases
            .state
            .lock()
            .map(|st| st.live.keys().copied().collect())
            .unwrap_or_default();
        for k in keys {
            self.retire(k);
        }
    }
}

#[cfg(test)]
mod tests;
