//! Budgets that never leak: per user and per API key spending limits with periods, enforced
//! exactly across replicas sharing a database by reserving each request's maximum cost before
//! the upstream call and settling the actual cost after it.
//!
//! - **Reserve.** Before the upstream is called, the request's maximum cost (estimated prompt
//!   tokens plus `max_tokens`, or the model's output cap, at the dearest target's price) is
//!   added to `reserved` of every budget that applies (the user's and the key's) with one
//!   conditional UPDATE each (`spent + reserved + cost <= limit`), in one transaction with a
//!   reservation row per scope that expires. Concurrent requests on any number of replicas
//!   queue on the row lock; the database decides, so together they never pass the limit.
//! - **Settle.** However the request ends (success, failure, upstream error, client gone
//!   mid-stream), its outcome guard hands the actual cost to [`Hold::settle`]; a background
//!   writer deletes the reservation rows, gives their amount back and adds the actual cost, in
//!   one transaction with the request's ledger row (so the ledger and the budget agree). A
//!   failed write is retried; shutdown waits for the queue like the ledger's.
//! - **Periods** roll over lazily: the row holds its `period_start`; a reservation or
//!   settlement that finds an older one starts the new period (spent to 0, reservations in flight
//!   carried over). No background job, no table scan.
//! - **Crashes.** A replica that dies holding reservations never settles them; they expire after
//!   `budgets.reservation_ttl_secs` and are released by a request that finds no room, or by each
//!   replica's periodic sweep (bounded, through the expiry index).

mod admin;
mod lease;
mod period;
mod reserve;
mod settle;

pub use admin::{limit_from_usd, set, view, BudgetAdminError, BudgetUpdate, BudgetView};
pub(super) use lease::{Knobs, LeasedPart, Leases};
pub use period::{parse_time, rfc3339, Period, PeriodError, Rfc3339};
pub use settle::{Hold, HoldSlot};
pub(super) use settle::{Reservation, Settler};

use super::{Budgets, Scopes};
use crate::config::{BudgetsConfig, ServiceTypeConfig};
use crate::core::gateway::Principal;
use crate::store::{BudgetRow, StoreError};

/// Budget response headers (on success and on `budget_exceeded`).
pub mod headers {
    use crate::error::PolicyName;

    /// The limit of the tightest budget, USD with six decimals.
    pub static LIMIT: PolicyName = PolicyName::new("x-budget-limit-usd");
    /// What is left of it after this request's reservation (or, refused, before it).
    pub static REMAINING: PolicyName = PolicyName::new("x-budget-remaining-usd");
    /// When its period ends (RFC 3339, UTC); absent for a `total` budget.
    pub static RESET: PolicyName = PolicyName::new("x-budget-reset");
    /// Which budget: `user` or `key`.
    pub static SCOPE: PolicyName = PolicyName::new("x-budget-scope");
}

// ---------------------------------------------------------------------------------------------
// scopes and periods

/// Whose budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ScopeKind {
    User,
    Key,
}

impl ScopeKind {
    /// The stored and wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            ScopeKind::User => "user",
            ScopeKind::Key => "key",
        }
    }

    /// Parses `user` or `key`.
    pub fn parse(s: &str) -> Result<ScopeKind, String> {
        match s {
            "user" => Ok(ScopeKind::User),
            "key" => Ok(ScopeKind::Key),
            other => Err(format!("scope must be \"user\" or \"key\", not {other:?}")),
        }
    }
}

/// A scope: a user id or a key id.
pub type ScopeKey = (ScopeKind, i64);

/// A stored budget row as far as admission cares: whose it is and its period.
#[derive(Debug, Clone, Copy)]
pub(super) struct CachedBudget {
    pub(super) explicit: bool,
    pub(super) period: Option<Period>,
}

/// The budget that applies to one scope of one request.
#[derive(Debug, Clone)]
pub(super) struct Applied {
    key: ScopeKey,
    explicit: bool,
    /// A default's configured limit.
    default_limit: Option<i64>,
    period: Period,
}

impl Scopes {
    /// The budgets that apply: the user's own or else its service type's default, and the
    /// key's own.
    pub(super) fn applied(&self, st: Option<&ServiceTypeConfig>) -> Vec<Applied> {
        let mut out = Vec::new();
        let (ukey, upol) = &self.user;
        match upol.budget {
            Some(CachedBudget {
                explicit: true,
                period: Some(period),
            }) => out.push(Applied {
                key: *ukey,
                explicit: true,
                default_limit: None,
                period,
            }),
            _ => {
                if let Some(b) = st.and_then(|s| s.budget.as_ref()) {
                    out.push(Applied {
                        key: *ukey,
                        explicit: false,
                        default_limit: Some(crate::core::pricing::usd_to_micros(b.limit_usd)),
                        period: b.period,
                    });
                }
            }
        }
        if let Some((kkey, kpol)) = &self.key {
            if let Some(CachedBudget {
                explicit: true,
                period: Some(period),
            }) = kpol.budget
            {
                out.push(Applied {
                    key: *kkey,
                    explicit: true,
                    default_limit: None,
                    period,
                });
            }
        }
        out
    }
}

/// The room one scope has in its current period.
fn remaining_of(row: &BudgetRow, period: Period, now: i64) -> i64 {
    let spent = if row.period_start < period.start(now) {
        0
    } else {
        row.spent_micros
    };
    row.limit_micros
        .saturating_sub(spent)
        .saturating_sub(row.reserved_micros)
}

impl Budgets {
    /// The room left for a principal: the least of its user's and key's budgets (`None` when no
    /// budget applies). Nothing is reserved. Room other replicas
    /// have leased but not used counts as held.
    pub async fn remaining(
        self: &std::sync::Arc<Self>,
        principal: &Principal,
        st: Option<&ServiceTypeConfig>,
        config: &BudgetsConfig,
    ) -> Result<Option<i64>, StoreError> {
        let now = self.clock.now_ms();
        let applied = self
            .load_scopes(principal, config.policy_cache_ms)
            .await?
            .applied(st);
        let mut least: Option<i64> = None;
        for ap in applied {
            let row = self.store.budget_get(ap.key.0.as_str(), ap.key.1).await?;
            let room = match row {
                None => ap.default_limit.unwrap_or(0),
                Some(mut r) => {
                    if let Some(l) = ap.default_limit.filter(|_| !r.explicit) {
                        r.limit_micros = l;
                    }
                    // This replica's lease is counted as reserved by the row, but its unused
                    // part is still the scope's to spend.
                    let own = if r.period_start == ap.period.start(now) {
                        self.leases.unused(&ap.key, r.id, r.period_start)
                    } else {
                        0
                    };
                    remaining_of(&r, ap.period, now).saturating_add(own)
                }
            };
            least = Some(least.map_or(room, |l: i64| l.min(room)));
        }
        Ok(least.map(|l| l.max(0)))
    }
}
