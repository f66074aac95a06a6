//! Taking, growing and renewing one scope's lease: the conditional UPDATE that moves budget to
//! this replica.

use std::sync::Arc;

use super::{Knobs, Lease};
use crate::core::policy::budget::Applied;
use crate::core::policy::Budgets;
use crate::store::{
    BudgetRow, LeaseGrow, ReserveOutcome, ReserveRequest, ReserveScope, StoreError,
};

impl Budgets {
    /// Takes, grows or renews the lease of one scope so that it has room for `need` (0: a
    /// background refill). `false`: no lease fits (near the limit, or the row needs the
    /// per-request path to fix it); the scope's lease is then retired.
    pub(super) async fn grant(
        &self,
        ap: &Applied,
        need: i64,
        knobs: Knobs,
    ) -> Result<bool, StoreError> {
        let lock = self.leases.grant.lock().ok().map(|mut g| {
            g.entry(ap.key)
                .or_insert_with(|| Arc::new(tokio::sync::Mutex::new(())))
                .clone()
        });
        let _one = match &lock {
            Some(l) => Some(l.lock().await),
            None => None,
        };
        let now = self.clock.now_ms();
        let live = self.live_lease(ap.key);
        if need == 0 && live.as_ref().is_none_or(|l| !l.usable(ap, now, &knobs)) {
            // A background refill whose lease was retired (near the limit, a new period) or
            // went stale before it ran: taking a new lease is for a request to decide, after
            // it has looked whether the scope reserves exactly. A refill that leased anew here
            // held room a request beside it, reserving exactly, was then refused for.
            return Ok(false);
        }
        if need > 0 {
            if let Some(l) = &live {
                if l.usable(ap, now, &knobs) && l.available() >= need {
                    return Ok(true);
                }
            }
        }
        let (scope, subject) = (ap.key.0.as_str(), ap.key.1);
        let start = ap.period.start(now);
        let row = self.store.budget_get(scope, subject).await?;
        let Some(row) = row.filter(|r| matches(r, ap, start)) else {
            self.retire(ap.key);
            return Ok(false);
        };
        let remaining = row.limit_micros - row.spent_micros - row.reserved_micros;
        let chunk = (remaining.max(0) as f64 * knobs.fraction) as i64;
        let floor = (row.limit_micros as f64 * knobs.min_remaining) as i64;
        let stale = live.as_ref().is_some_and(|l| !l.usable(ap, now, &knobs));
        if stale {
            self.retire(ap.key);
        }
        let live = live.filter(|_| !stale);
        let exhausted = live.as_ref().is_none_or(|l| l.available() < need.max(1));
        let grow_by = if remaining < floor || chunk < need || chunk <= 0 {
            if exhausted || need == 0 {
                // Near the limit: the last dollars are reserved request by request.
                self.retire(ap.key);
                if let Ok(mut st) = self.leases.state.lock() {
                    st.exact
                        .insert(ap.key, (now.saturating_add(knobs.exact_ms), start));
                }
                return Ok(false);
            }
            0
        } else if need == 0
            && live
                .as_ref()
                .is_some_and(|l| l.available() * 2 >= l.granted)
        {
            // Only the expiry is near: renew.
            0
        } else {
            chunk
        };
        let target = ReserveScope {
            scope: ap.key.0.as_str(),
            subject_id: subject,
            explicit: ap.explicit,
            default_limit: ap.default_limit,
            period: ap.period.name(),
            period_start: start,
        };
        let expires_at = now.saturating_add(knobs.ttl_ms);
        match live {
            Some(l) => {
                self.writes.count("lease");
                let turn = self.settler.write_turn(&self.store).await;
                let grown = self
                    .store
                    .budget_lease_grow(&l.id, &target, grow_by, expires_at, now)
                    .await;
                drop(turn);
                let grown = grown?;
                let Ok(mut st) = self.leases.state.lock() else {
                    return Ok(false);
                };
                match grown {
                    LeaseGrow::Grown(row) => {
                        if let Some(l) = st.live.get_mut(&ap.key).filter(|x| x.id == l.id) {
                            l.granted += grow_by;
                            if grow_by > 0 {
                                l.chunk = grow_by;
                            }
                            l.expires_at = expires_at;
                            l.outside = outside(&row);
                            l.limit = row.limit_micros;
                        }
                        Ok(true)
                    }
                    LeaseGrow::Gone => {
                        // Expired and released by someone: nothing of it is left to give back.
                        st.live.remove(&ap.key);
                        Ok(false)
                    }
                    LeaseGrow::NoRoom => {
                        drop(st);
                        self.retire(ap.key);
                        Ok(false)
                    }
                }
            }
            None => {
                let id = format!(
                    "{}{}",
                    crate::store::LEASE_ID_PREFIX,
                    uuid::Uuid::new_v4().simple()
                );
                self.writes.count("lease");
                let turn = self.settler.write_turn(&self.store).await;
                let outcome = self
                    .store
                    .budget_reserve_with(ReserveRequest {
                        scopes: vec![target],
                        amount: grow_by,
                        reservation_id: id.clone(),
                        request_id: id.clone(),
                        now,
                        expires_at,
                        durable: true,
                    })
                    .await?;
                drop(turn);
                let ReserveOutcome::Reserved(rows) = outcome else {
                    return Ok(false);
                };
                let Some(row) = rows.first() else {
                    return Ok(false);
                };
                let lease = Lease {
                    id,
                    budget_id: row.id,
                    period: ap.period,
                    period_start: start,
                    granted: grow_by,
                    charged: 0,
                    chunk: grow_by,
                    inflight: 0,
                    expires_at,
                    outside: outside(row),
                    limit: row.limit_micros,
                    refilling: false,
                };
                if let Ok(mut st) = self.leases.state.lock() {
                    st.live.insert(ap.key, lease);
                }
                Ok(true)
            }
        }
    }
}

/// Whether a row is as the lease would reserve it (else the per-request path fixes it first).
fn matches(row: &BudgetRow, ap: &Applied, start: i64) -> bool {
    row.explicit == ap.explicit
        && (row.explicit || Some(row.limit_micros) == ap.default_limit)
        && row.period == ap.period.name()
        && row.period_start == start
}

fn outside(row: &BudgetRow) -> i64 {
    row.limit_micros - row.spent_micros - row.reserved_micros
}
