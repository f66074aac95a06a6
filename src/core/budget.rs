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

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot, Notify};

use super::gateway::{Gateway, Principal};
use super::ledger::Ledger;
use super::pricing::{micros_to_usd, Pricing, Unpriced};
use super::rate_limit::{Limits, RateCharge, RateLimiter};
use super::{Reason, Rejection};
use crate::api::ChatRequest;
use crate::clock::Clock;
use crate::config::{BudgetsConfig, ServiceTypeConfig};
use crate::providers::Usage;
use crate::routing::Route;
use crate::store::{
    BudgetRow, NewLedgerRow, ReserveOutcome, ReserveScope, SettlePart, Settlement, Store,
    StoreError, UsageFilter,
};

/// Budget response headers (on success and on `budget_exceeded`).
pub mod headers {
    /// The limit of the tightest budget, USD with six decimals.
    pub const LIMIT: &str = "x-budget-limit-usd";
    /// What is left of it after this request's reservation (or, refused, before it).
    pub const REMAINING: &str = "x-budget-remaining-usd";
    /// When its period ends (RFC 3339, UTC); absent for a `total` budget.
    pub const RESET: &str = "x-budget-reset";
    /// Which budget: `user` or `key`.
    pub const SCOPE: &str = "x-budget-scope";
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

const DAY_MS: i64 = 86_400_000;

/// A budget period. Calendar periods are UTC; weeks start on Monday; a duration is a fixed
/// window of that length aligned to the Unix epoch (so `12h` resets at 00:00 and 12:00 UTC).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Period {
    Daily,
    Weekly,
    Monthly,
    Total,
    Every(i64),
}

impl Period {
    /// Parses `daily`, `weekly`, `monthly`, `total` or a duration: a number and a unit of
    /// `s`, `m`, `h`, `d` or `w` (`"12h"`, `"30m"`, `"7d"`), at least one minute.
    pub fn parse(s: &str) -> Result<Period, String> {
        let s = s.trim();
        match s {
            "daily" => return Ok(Period::Daily),
            "weekly" => return Ok(Period::Weekly),
            "monthly" => return Ok(Period::Monthly),
            "total" => return Ok(Period::Total),
            _ => {}
        }
        let bad = || {
            format!(
                "{s:?} is not a period: use daily, weekly, monthly, total or a duration like \"12h\" (s, m, h, d, w)"
            )
        };
        let split = s.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
        let (n, unit) = s.split_at(split);
        let n: i64 = n.parse().map_err(|_| bad())?;
        let unit_ms = match unit {
            "s" => 1000,
            "m" => 60_000,
            "h" => 3_600_000,
            "d" => DAY_MS,
            "w" => 7 * DAY_MS,
            _ => return Err(bad()),
        };
        let ms = n.checked_mul(unit_ms).ok_or_else(bad)?;
        if ms < 60_000 {
            return Err(format!("{s:?}: a budget period is at least one minute"));
        }
        Ok(Period::Every(ms))
    }

    /// The canonical name, as stored.
    pub fn name(&self) -> String {
        match self {
            Period::Daily => "daily".into(),
            Period::Weekly => "weekly".into(),
            Period::Monthly => "monthly".into(),
            Period::Total => "total".into(),
            Period::Every(ms) => {
                for (unit, size) in [
                    ("w", 7 * DAY_MS),
                    ("d", DAY_MS),
                    ("h", 3_600_000),
                    ("m", 60_000),
                ] {
                    if ms % size == 0 {
                        return format!("{}{unit}", ms / size);
                    }
                }
                format!("{}s", ms / 1000)
            }
        }
    }

    /// The start of the period that contains `now` (unix ms).
    pub fn start(&self, now: i64) -> i64 {
        match self {
            Period::Total => 0,
            Period::Daily => now.div_euclid(DAY_MS) * DAY_MS,
            Period::Weekly => {
                let days = now.div_euclid(DAY_MS);
                // 1970-01-01 was a Thursday: Monday is 3 days before day 0 modulo 7.
                let since_monday = (days + 3).rem_euclid(7);
                (days - since_monday) * DAY_MS
            }
            Period::Monthly => {
                let (y, m, _) = civil_from_days(now.div_euclid(DAY_MS));
                days_from_civil(y, m, 1) * DAY_MS
            }
            Period::Every(len) => now.div_euclid(*len) * len,
        }
    }

    /// When the period that started at `start` ends; `None` for `total`.
    pub fn end(&self, start: i64) -> Option<i64> {
        match self {
            Period::Total => None,
            Period::Daily => Some(start + DAY_MS),
            Period::Weekly => Some(start + 7 * DAY_MS),
            Period::Monthly => {
                let (y, m, _) = civil_from_days(start.div_euclid(DAY_MS));
                let (y, m) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
                Some(days_from_civil(y, m, 1) * DAY_MS)
            }
            Period::Every(len) => Some(start + len),
        }
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The date of a day number (inverse of [`days_from_civil`]).
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// Unix ms as RFC 3339 UTC (`2026-11-28T00:00:00Z`).
pub fn rfc3339(ms: i64) -> String {
    let days = ms.div_euclid(DAY_MS);
    let rest = ms.rem_euclid(DAY_MS) / 1000;
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rest / 3600,
        rest % 3600 / 60,
        rest % 60
    )
}

/// Parses a time given as unix milliseconds, an RFC 3339 UTC time (`...Z`) or a date
/// (`YYYY-MM-DD`, midnight UTC).
pub fn parse_time(s: &str) -> Result<i64, String> {
    let s = s.trim();
    if let Ok(ms) = s.parse::<i64>() {
        return Ok(ms);
    }
    let bad = || {
        format!("{s:?} is not a time: use unix milliseconds, YYYY-MM-DD or YYYY-MM-DDTHH:MM:SSZ")
    };
    let num = |a: usize, b: usize| -> Result<i64, String> {
        s.get(a..b)
            .filter(|t| t.bytes().all(|c| c.is_ascii_digit()))
            .and_then(|t| t.parse().ok())
            .ok_or_else(bad)
    };
    if s.len() < 10 || &s[4..5] != "-" || &s[7..8] != "-" {
        return Err(bad());
    }
    let (y, mo, d) = (num(0, 4)?, num(5, 7)?, num(8, 10)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) {
        return Err(bad());
    }
    let mut ms = days_from_civil(y, mo, d) * DAY_MS;
    if s.len() > 10 {
        let t = &s[10..];
        if !(t.starts_with('T') || t.starts_with(' ')) || !t.ends_with('Z') || t.len() < 10 {
            return Err(bad());
        }
        let (h, mi, se) = (num(11, 13)?, num(14, 16)?, num(17, 19)?);
        if h > 23 || mi > 59 || se > 60 {
            return Err(bad());
        }
        ms += (h * 3600 + mi * 60 + se) * 1000;
    }
    Ok(ms)
}

// ---------------------------------------------------------------------------------------------
// the engine

/// What a replica knows about one scope's settings (cached for `budgets.policy_cache_ms`).
#[derive(Debug, Clone, Default)]
struct ScopePolicy {
    /// The stored budget row, if any (explicit or a default's counters).
    budget: Option<CachedBudget>,
    limits: Limits,
}

#[derive(Debug, Clone, Copy)]
struct CachedBudget {
    explicit: bool,
    period: Option<Period>,
}

/// The budget that applies to one scope of one request.
#[derive(Debug, Clone)]
struct Applied {
    key: ScopeKey,
    explicit: bool,
    /// A default's configured limit.
    default_limit: Option<i64>,
    period: Period,
}

enum Command {
    Settle(Box<Settlement>, Vec<ScopeKey>),
    Flush(oneshot::Sender<()>),
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

/// Budgets and rate limits: one per process, outliving configuration reloads.
pub struct Budgets {
    store: Store,
    clock: Clock,
    tx: mpsc::UnboundedSender<Command>,
    shared: Arc<Shared>,
    cache: Mutex<HashMap<ScopeKey, (Instant, ScopePolicy)>>,
    limiter: RateLimiter,
}

impl std::fmt::Debug for Budgets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Budgets").finish_non_exhaustive()
    }
}

/// What admission gives a request: its hold (settled when it ends) and response headers.
pub struct Admission {
    pub hold: HoldSlot,
    pub headers: Vec<(&'static str, String)>,
}

/// A request's reservation and rate-limit charge, settled exactly once when its outcome is
/// recorded.
pub struct Hold {
    engine: Arc<Budgets>,
    reservation: Option<Reservation>,
    rate: Option<RateCharge>,
}

#[derive(Debug, Clone)]
struct Reservation {
    id: String,
    parts: Vec<(i64, Period, ScopeKey)>,
}

/// Where the outcome record keeps a request's [`Hold`]; taking it settles it once.
#[derive(Clone, Default)]
pub struct HoldSlot(Arc<Mutex<Option<Hold>>>);

impl std::fmt::Debug for HoldSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let held = self.0.lock().map(|h| h.is_some()).unwrap_or(false);
        f.debug_tuple("HoldSlot").field(&held).finish()
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
        let hold = self.0.lock().ok().and_then(|mut h| h.take());
        match hold {
            Some(h) => h.settle(cost_micros, usage, ledger_row, ledger),
            None => ledger.record(ledger_row),
        }
    }

    /// Whether a hold is waiting to be settled.
    pub fn is_held(&self) -> bool {
        self.0.lock().map(|h| h.is_some()).unwrap_or(false)
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
        match self.reservation {
            Some(r) => {
                if cost_micros > 0 {
                    // Over the reservation only if the upstream reported more prompt tokens than
                    // estimated; the ledger and the budget still agree on what was spent.
                    tracing::trace!(reservation = %r.id, cost_micros, "settling");
                }
                let keys = r.parts.iter().map(|p| p.2).collect();
                let settlement = Settlement {
                    reservation_id: r.id,
                    parts: r
                        .parts
                        .iter()
                        .map(|(id, period, _)| SettlePart {
                            budget_id: *id,
                            period: period.name(),
                            period_start: period.start(now),
                        })
                        .collect(),
                    cost_micros,
                    ledger: Some(ledger_row),
                };
                self.engine.enqueue(settlement, keys);
            }
            None => ledger.record(ledger_row),
        }
    }
}

/// What one scope's budget looks like now (admin API, Authorize).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BudgetView {
    pub scope: ScopeKind,
    pub id: i64,
    /// Set through the admin API (else: the service type's default, last applied).
    pub explicit: bool,
    pub limit_micros: Option<i64>,
    pub period: Option<String>,
    pub period_start: Option<i64>,
    pub reset_at: Option<i64>,
    pub spent_micros: i64,
    pub reserved_micros: i64,
    pub remaining_micros: Option<i64>,
    pub rpm: Option<u64>,
    pub tpm: Option<u64>,
}

/// What to set on a scope through the admin API: a budget (or none) and rate limits (or none).
#[derive(Debug, Clone, PartialEq)]
pub struct BudgetUpdate {
    pub scope: ScopeKind,
    pub id: i64,
    /// Limit in micro-dollars and period; `None` removes the scope's own budget.
    pub budget: Option<(i64, Period)>,
    pub rpm: Option<u64>,
    pub tpm: Option<u64>,
}

/// Why an admin budget operation failed.
#[derive(Debug, thiserror::Error)]
pub enum BudgetAdminError {
    #[error("{0}")]
    Invalid(String),
    #[error("{0} not found")]
    NotFound(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<BudgetAdminError> for super::admin::AdminError {
    fn from(e: BudgetAdminError) -> Self {
        match e {
            BudgetAdminError::Invalid(m) => super::admin::AdminError::Invalid(m),
            BudgetAdminError::NotFound(m) => super::admin::AdminError::NotFound(m),
            BudgetAdminError::Store(e) => e.into(),
        }
    }
}

/// What a request asks of admission.
pub struct AdmitArgs<'a> {
    pub principal: &'a Principal,
    pub service_type: Option<&'a ServiceTypeConfig>,
    pub route: &'a Route,
    pub request: &'a ChatRequest,
    pub request_id: &'a str,
    pub pricing: &'a Pricing,
    pub config: &'a BudgetsConfig,
}

/// The room one scope has in its current period.
fn remaining_of(row: &BudgetRow, period: Period, now: i64) -> i64 {
    let spent = if row.period_start < period.start(now) {
        0
    } else {
        row.spent_micros
    };
    row.limit_micros - spent - row.reserved_micros
}

impl Budgets {
    /// Starts the settlement writer and the expiry sweep.
    pub fn start(store: Store, clock: Clock, config: &BudgetsConfig) -> Arc<Budgets> {
        let (tx, rx) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared {
            pending: Mutex::new(HashMap::new()),
            settled: Notify::new(),
            sqlite_writes: tokio::sync::Mutex::new(()),
        });
        tokio::spawn(writer(
            store.clone(),
            clock.clone(),
            rx,
            shared.clone(),
            Duration::from_secs(config.sweep_interval_secs.max(1)),
            Duration::from_millis(config.settle_batch_ms),
        ));
        Arc::new(Budgets {
            store,
            clock,
            tx,
            shared,
            cache: Mutex::new(HashMap::new()),
            limiter: RateLimiter::default(),
        })
    }

    /// Waits until every settlement queued before this call is written.
    pub async fn flush(&self) {
        let (done, wait) = oneshot::channel();
        if self.tx.send(Command::Flush(done)).is_ok() {
            let _ = wait.await;
        }
    }

    /// Forgets cached settings of a scope (after an admin change here).
    pub fn forget(&self, key: ScopeKey) {
        if let Ok(mut c) = self.cache.lock() {
            c.remove(&key);
        }
    }

    fn enqueue(&self, settlement: Settlement, keys: Vec<ScopeKey>) {
        if let Ok(mut p) = self.shared.pending.lock() {
            for k in &keys {
                *p.entry(*k).or_default() += 1;
            }
        }
        if self
            .tx
            .send(Command::Settle(Box::new(settlement), keys))
            .is_err()
        {
            tracing::error!("budget settlement writer is gone; a settlement was not recorded");
        }
    }

    fn pending(&self, key: ScopeKey) -> u32 {
        self.shared
            .pending
            .lock()
            .map(|p| p.get(&key).copied().unwrap_or(0))
            .unwrap_or(0)
    }

    /// Waits (up to `limit`) until this replica has written its queued settlements of `key`.
    async fn wait_settled(&self, key: ScopeKey, limit: Duration) {
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

    async fn policy(&self, key: ScopeKey, ttl_ms: u64) -> Result<ScopePolicy, StoreError> {
        if let Ok(c) = self.cache.lock() {
            if let Some((at, p)) = c.get(&key) {
                if at.elapsed() < Duration::from_millis(ttl_ms) {
                    return Ok(p.clone());
                }
            }
        }
        let (budget, limits) = self.store.budget_policy(key.0.as_str(), key.1).await?;
        let policy = ScopePolicy {
            budget: budget.map(|b| CachedBudget {
                explicit: b.explicit,
                period: Period::parse(&b.period).ok(),
            }),
            limits: limits
                .map(|l| Limits {
                    rpm: l.rpm.and_then(|v| u64::try_from(v).ok()),
                    tpm: l.tpm.and_then(|v| u64::try_from(v).ok()),
                })
                .unwrap_or_default(),
        };
        if let Ok(mut c) = self.cache.lock() {
            if c.len() > 100_000 {
                c.clear();
            }
            c.insert(key, (Instant::now(), policy.clone()));
        }
        Ok(policy)
    }

    /// The budgets that apply to a request's scopes.
    fn applied(
        user: (ScopeKey, &ScopePolicy),
        key: Option<(ScopeKey, &ScopePolicy)>,
        st: Option<&ServiceTypeConfig>,
    ) -> Vec<Applied> {
        let mut out = Vec::new();
        let (ukey, upol) = user;
        match upol.budget {
            Some(CachedBudget {
                explicit: true,
                period: Some(period),
            }) => out.push(Applied {
                key: ukey,
                explicit: true,
                default_limit: None,
                period,
            }),
            _ => {
                if let Some(b) = st.and_then(|s| s.budget.as_ref()) {
                    if let Ok(period) = Period::parse(&b.period) {
                        out.push(Applied {
                            key: ukey,
                            explicit: false,
                            default_limit: Some(super::pricing::usd_to_micros(b.limit_usd)),
                            period,
                        });
                    }
                }
            }
        }
        if let Some((kkey, kpol)) = key {
            if let Some(CachedBudget {
                explicit: true,
                period: Some(period),
            }) = kpol.budget
            {
                out.push(Applied {
                    key: kkey,
                    explicit: true,
                    default_limit: None,
                    period,
                });
            }
        }
        out
    }

    /// Checks rate limits and reserves the request's maximum cost in every budget that
    /// applies, or refuses it (`rate_limited`, `budget_exceeded`, or `model_not_found` for an
    /// unpriced model under `pricing_policy.unpriced = "refuse"`).
    pub async fn admit(self: &Arc<Self>, a: AdmitArgs<'_>) -> Result<Admission, Rejection> {
        let now = self.clock.now_ms();
        // A model without a price, where those are refused.
        if let Some(t) = a
            .route
            .targets
            .iter()
            .find(|t| a.pricing.refuses(&t.resolved))
        {
            return Err(Rejection::new(
                Reason::ModelNotFound,
                format!(
                    "`{}` has no price and unpriced models are refused here",
                    t.resolved
                ),
            )
            .with_param("model"));
        }
        let identity = &a.principal.identity;
        let ukey = (ScopeKind::User, identity.user_id);
        let kkey = identity.key_id.map(|k| (ScopeKind::Key, k));
        let ttl = a.config.policy_cache_ms;
        let internal = |e: StoreError| Rejection::internal(format!("budget lookup: {e}"));
        let mut upol = self.policy(ukey, ttl).await.map_err(internal)?;
        let mut kpol = match kkey {
            Some(k) => Some(self.policy(k, ttl).await.map_err(internal)?),
            None => None,
        };

        // Rate limits, in memory.
        let st_limits = a.service_type.and_then(|s| s.rate_limits.as_ref());
        let mut rate_scopes = Vec::new();
        let user_limits = Limits {
            rpm: upol.limits.rpm.or(st_limits.and_then(|l| l.rpm)),
            tpm: upol.limits.tpm.or(st_limits.and_then(|l| l.tpm)),
        };
        if user_limits.any() {
            rate_scopes.push((ukey, user_limits));
        }
        if let (Some(k), Some(p)) = (kkey, &kpol) {
            if p.limits.any() {
                rate_scopes.push((k, p.limits));
            }
        }
        let mut applied = Self::applied((ukey, &upol), kkey.zip(kpol.as_ref()), a.service_type);
        if rate_scopes.is_empty() && applied.is_empty() {
            // Nothing to count or reserve: no estimate, no database.
            return Ok(Admission {
                hold: HoldSlot::default(),
                headers: Vec::new(),
            });
        }
        let prompt = a.request.estimate_prompt_tokens();
        let max_tokens = a.request.max_tokens;
        let mut headers = Vec::new();
        let rate = if rate_scopes.is_empty() {
            None
        } else {
            match self
                .limiter
                .admit(now, &rate_scopes, prompt + max_tokens.unwrap_or(0))
            {
                Ok((charge, h)) => {
                    headers.extend(h);
                    Some(charge)
                }
                Err(d) => {
                    let secs =
                        d.retry_after.as_secs() + u64::from(d.retry_after.subsec_nanos() > 0);
                    let mut r = Rejection::new(
                        Reason::RateLimited,
                        format!(
                            "rate limit of {} {} per minute reached; try again in {}",
                            d.limit,
                            d.what,
                            super::rate_limit::reset_string(d.retry_after.as_millis() as i64)
                        ),
                    )
                    .with_retry_after(Duration::from_secs(secs.max(1)));
                    r.headers = d.headers;
                    return Err(r);
                }
            }
        };
        let refund = |this: &Budgets| {
            if let Some(c) = &rate {
                this.limiter.refund(this.clock.now_ms(), c);
            }
        };

        // The most this request can cost.
        let targets = a.route.targets.iter().map(|t| t.resolved.as_str());
        let max_cost = match a.pricing.max_cost_micros(targets, prompt, max_tokens) {
            Ok(c) => c,
            Err(Unpriced(model)) => {
                refund(self);
                return Err(Rejection::new(
                    Reason::ModelNotFound,
                    format!("`{model}` has no price and unpriced models are refused here"),
                )
                .with_param("model"));
            }
        };

        if applied.is_empty() || max_cost == 0 {
            return Ok(Admission {
                hold: self.hold(None, rate),
                headers,
            });
        }

        let reservation_id = uuid::Uuid::new_v4().simple().to_string();
        let ttl_ms = (a.config.reservation_ttl_secs as i64).saturating_mul(1000);
        // A row found ahead of our clock (another replica's clock is later) sets the period.
        let mut starts: HashMap<ScopeKey, i64> = HashMap::new();
        let mut waited = false;
        for _attempt in 0..8 {
            let now = self.clock.now_ms();
            let scopes: Vec<ReserveScope> = applied
                .iter()
                .map(|ap| ReserveScope {
                    scope: ap.key.0.as_str(),
                    subject_id: ap.key.1,
                    explicit: ap.explicit,
                    default_limit: ap.default_limit,
                    period: ap.period.name(),
                    period_start: starts
                        .get(&ap.key)
                        .copied()
                        .unwrap_or_else(|| ap.period.start(now)),
                })
                .collect();
            let outcome = self
                .reserve_detached(
                    scopes.clone(),
                    max_cost,
                    reservation_id.clone(),
                    a.request_id.to_string(),
                    now,
                    now.saturating_add(ttl_ms),
                    applied.clone(),
                    !a.config.fast_reservations,
                )
                .await;
            let outcome = match outcome {
                Ok(o) => o,
                Err(e) => {
                    refund(self);
                    return Err(Rejection::internal(format!("budget reservation: {e}")));
                }
            };
            match outcome {
                ReserveOutcome::Reserved(rows) => {
                    let tightest = rows
                        .iter()
                        .zip(&applied)
                        .min_by_key(|(r, ap)| remaining_of(r, ap.period, now));
                    if let Some((row, ap)) = tightest {
                        headers.extend(budget_headers(row, ap, now));
                    }
                    let reservation = Reservation {
                        id: reservation_id,
                        parts: rows
                            .iter()
                            .zip(&applied)
                            .map(|(r, ap)| (r.id, ap.period, ap.key))
                            .collect(),
                    };
                    return Ok(Admission {
                        hold: self.hold(Some(reservation), rate),
                        headers,
                    });
                }
                ReserveOutcome::Missed(i) => {
                    let ap = applied[i].clone();
                    let step = self
                        .diagnose(&ap, &scopes[i], max_cost, now, &mut waited)
                        .await;
                    match step {
                        Ok(Step::Retry) => {}
                        Ok(Step::Ahead(start)) => {
                            starts.insert(ap.key, start);
                        }
                        Ok(Step::Reload) => {
                            self.forget(ap.key);
                            let internal =
                                |e: StoreError| Rejection::internal(format!("budget lookup: {e}"));
                            match self.policy(ukey, 0).await {
                                Ok(p) => upol = p,
                                Err(e) => {
                                    refund(self);
                                    return Err(internal(e));
                                }
                            }
                            if let Some(k) = kkey {
                                match self.policy(k, 0).await {
                                    Ok(p) => kpol = Some(p),
                                    Err(e) => {
                                        refund(self);
                                        return Err(internal(e));
                                    }
                                }
                            }
                            applied = Self::applied(
                                (ukey, &upol),
                                kkey.zip(kpol.as_ref()),
                                a.service_type,
                            );
                            if applied.is_empty() {
                                return Ok(Admission {
                                    hold: self.hold(None, rate),
                                    headers,
                                });
                            }
                        }
                        Ok(Step::Exceeded(row)) => {
                            refund(self);
                            return Err(exceeded(&row, &ap, max_cost, now));
                        }
                        Err(e) => {
                            refund(self);
                            return Err(Rejection::internal(format!("budget reservation: {e}")));
                        }
                    }
                }
            }
        }
        refund(self);
        Err(Rejection::internal(
            "budget reservation did not settle after repeated attempts",
        ))
    }

    fn hold(
        self: &Arc<Self>,
        reservation: Option<Reservation>,
        rate: Option<RateCharge>,
    ) -> HoldSlot {
        if reservation.is_none() && rate.is_none() {
            return HoldSlot::default();
        }
        HoldSlot(Arc::new(Mutex::new(Some(Hold {
            engine: self.clone(),
            reservation,
            rate,
        }))))
    }

    /// Runs the reservation on a task of its own, so that a request cancelled meanwhile (its
    /// client went away) cannot cut the transaction short; a reservation nobody is left to
    /// receive is released at once.
    #[allow(clippy::too_many_arguments)]
    async fn reserve_detached(
        self: &Arc<Self>,
        scopes: Vec<ReserveScope>,
        amount: i64,
        reservation_id: String,
        request_id: String,
        now: i64,
        expires_at: i64,
        applied: Vec<Applied>,
        durable: bool,
    ) -> Result<ReserveOutcome, StoreError> {
        let (tx, rx) = oneshot::channel();
        let engine = self.clone();
        tokio::spawn(async move {
            let turn = engine.shared.write_turn(&engine.store).await;
            let result = engine
                .store
                .budget_reserve_with(
                    &scopes,
                    amount,
                    &reservation_id,
                    &request_id,
                    now,
                    expires_at,
                    durable,
                )
                .await;
            drop(turn);
            if let Err(Ok(ReserveOutcome::Reserved(rows))) = tx.send(result) {
                let now = engine.clock.now_ms();
                let keys = applied.iter().map(|a| a.key).collect();
                engine.enqueue(
                    Settlement {
                        reservation_id,
                        parts: rows
                            .iter()
                            .zip(&applied)
                            .map(|(r, ap)| SettlePart {
                                budget_id: r.id,
                                period: ap.period.name(),
                                period_start: ap.period.start(now),
                            })
                            .collect(),
                        cost_micros: 0,
                        ledger: None,
                    },
                    keys,
                );
            }
        });
        match rx.await {
            Ok(r) => r,
            Err(_) => Err(StoreError::Unavailable(
                "budget reservation task failed".into(),
            )),
        }
    }

    /// Works out why a scope's UPDATE matched nothing, and fixes it if it can.
    async fn diagnose(
        &self,
        ap: &Applied,
        tried: &ReserveScope,
        cost: i64,
        now: i64,
        waited: &mut bool,
    ) -> Result<Step, StoreError> {
        let (scope, subject) = (ap.key.0.as_str(), ap.key.1);
        let Some(row) = self.store.budget_get(scope, subject).await? else {
            if ap.explicit {
                return Ok(Step::Reload);
            }
            let limit = ap.default_limit.unwrap_or(0);
            self.store
                .budget_insert_default(
                    scope,
                    subject,
                    limit,
                    &ap.period.name(),
                    tried.period_start,
                    now,
                )
                .await?;
            return Ok(Step::Retry);
        };
        if row.explicit != ap.explicit {
            return Ok(Step::Reload);
        }
        let name = ap.period.name();
        if !row.explicit && (Some(row.limit_micros) != ap.default_limit || row.period != name) {
            self.store
                .budget_sync_default(
                    row.id,
                    ap.default_limit.unwrap_or(0),
                    &name,
                    tried.period_start,
                    now,
                )
                .await?;
            return Ok(Step::Retry);
        }
        if row.period != name {
            return Ok(Step::Reload);
        }
        if row.period_start < tried.period_start {
            self.store
                .budget_rollover(row.id, &name, tried.period_start, now)
                .await?;
            return Ok(Step::Retry);
        }
        if row.period_start > tried.period_start {
            return Ok(Step::Ahead(row.period_start));
        }
        // The row agrees with us: there is no room. Settlements this replica still has queued
        // can only give room back; expired reservations of crashed replicas too.
        if row.spent_micros + row.reserved_micros + cost > row.limit_micros {
            if !*waited && self.pending(ap.key) > 0 {
                *waited = true;
                self.wait_settled(ap.key, Duration::from_secs(2)).await;
                return Ok(Step::Retry);
            }
            if row.reserved_micros > 0 {
                let turn = self.shared.write_turn(&self.store).await;
                let released = self
                    .store
                    .budget_release_expired(Some(row.id), self.clock.now_ms(), 1000)
                    .await;
                drop(turn);
                if released? > 0 {
                    return Ok(Step::Retry);
                }
            }
            return Ok(Step::Exceeded(row));
        }
        // It fits now (a settlement landed in between): try again.
        Ok(Step::Retry)
    }

    /// The room left for a principal: the least of its user's and key's budgets (`None` when no
    /// budget applies). Nothing is reserved.
    pub async fn remaining(
        &self,
        principal: &Principal,
        st: Option<&ServiceTypeConfig>,
        config: &BudgetsConfig,
    ) -> Result<Option<i64>, StoreError> {
        let now = self.clock.now_ms();
        let ukey = (ScopeKind::User, principal.identity.user_id);
        let kkey = principal.identity.key_id.map(|k| (ScopeKind::Key, k));
        let upol = self.policy(ukey, config.policy_cache_ms).await?;
        let kpol = match kkey {
            Some(k) => Some(self.policy(k, config.policy_cache_ms).await?),
            None => None,
        };
        let applied = Self::applied((ukey, &upol), kkey.zip(kpol.as_ref()), st);
        let mut least: Option<i64> = None;
        for ap in applied {
            let row = self.store.budget_get(ap.key.0.as_str(), ap.key.1).await?;
            let room = match row {
                None => ap.default_limit.unwrap_or(0),
                Some(mut r) => {
                    if let Some(l) = ap.default_limit.filter(|_| !r.explicit) {
                        r.limit_micros = l;
                    }
                    remaining_of(&r, ap.period, now)
                }
            };
            least = Some(least.map_or(room, |l: i64| l.min(room)));
        }
        Ok(least.map(|l| l.max(0)))
    }

    /// A scope's budget and rate limits as stored (the admin API's view).
    pub async fn view(&self, scope: ScopeKind, id: i64) -> Result<BudgetView, StoreError> {
        view(&self.store, self.clock.now_ms(), scope, id).await
    }

    /// Sets a scope's budget and rate limits (admin).
    pub async fn set(&self, update: &BudgetUpdate) -> Result<BudgetView, BudgetAdminError> {
        let view = set(&self.store, self.clock.now_ms(), update).await?;
        self.forget((update.scope, update.id));
        Ok(view)
    }
}

enum Step {
    Retry,
    Reload,
    Ahead(i64),
    Exceeded(BudgetRow),
}

fn budget_headers(row: &BudgetRow, ap: &Applied, now: i64) -> Vec<(&'static str, String)> {
    let mut h = vec![
        (headers::SCOPE, ap.key.0.as_str().to_string()),
        (headers::LIMIT, micros_to_usd(row.limit_micros)),
        (
            headers::REMAINING,
            micros_to_usd(remaining_of(row, ap.period, now).max(0)),
        ),
    ];
    let start = row.period_start.max(ap.period.start(now));
    if let Some(end) = ap.period.end(start) {
        h.push((headers::RESET, rfc3339(end)));
    }
    h
}

fn exceeded(row: &BudgetRow, ap: &Applied, cost: i64, now: i64) -> Rejection {
    let remaining = remaining_of(row, ap.period, now).max(0);
    let whose = match ap.key.0 {
        ScopeKind::User => "this user's",
        ScopeKind::Key => "this API key's",
    };
    let period = match ap.period {
        Period::Total => "in total".to_string(),
        p => format!("per {} period", p.name()),
    };
    let mut r = Rejection::new(
        Reason::BudgetExceeded,
        format!(
            "{whose} budget of ${} {period} has ${} left (some may be held by requests in flight); this request may cost up to ${}",
            micros_to_usd(row.limit_micros),
            micros_to_usd(remaining),
            micros_to_usd(cost),
        ),
    );
    let start = row.period_start.max(ap.period.start(now));
    if let Some(end) = ap.period.end(start) {
        // Settled spend alone leaves no room: nothing changes before the period ends.
        if row.spent_micros + cost > row.limit_micros {
            r = r.with_retry_after(Duration::from_millis((end - now).max(1000) as u64));
        }
    }
    r.headers = budget_headers(row, ap, now);
    r
}

/// The settlement writer: writes whatever is queued in one transaction, at once (settlements
/// give budget back, so they are not held for a batch deadline), retrying until it succeeds;
/// and every `sweep` releases expired reservations.
async fn writer(
    store: Store,
    clock: Clock,
    mut rx: mpsc::UnboundedReceiver<Command>,
    shared: Arc<Shared>,
    sweep: Duration,
    linger: Duration,
) {
    let mut tick = tokio::time::interval(sweep);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        let first = tokio::select! {
            cmd = rx.recv() => match cmd {
                Some(c) => c,
                None => break,
            },
            _ = tick.tick() => {
                let turn = shared.write_turn(&store).await;
                let released = store.budget_release_expired(None, clock.now_ms(), 500).await;
                drop(turn);
                match released {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(released = n, "released expired budget reservations"),
                    Err(e) => tracing::warn!(error = %e, "expired reservation sweep failed"),
                }
                continue;
            }
        };
        let mut batch = Vec::new();
        let mut keys = Vec::new();
        let mut waiting = Vec::new();
        // Gather for up to `linger` (one transaction for many settlements), less when a flush
        // is asked for or the batch is full.
        let deadline = tokio::time::Instant::now() + linger;
        let mut next = Some(first);
        while let Some(cmd) = next.take() {
            match cmd {
                Command::Settle(s, k) => {
                    batch.push(*s);
                    keys.extend(k);
                }
                Command::Flush(done) => waiting.push(done),
            }
            if batch.len() >= 500 || !waiting.is_empty() {
                break;
            }
            next = match rx.try_recv() {
                Ok(c) => Some(c),
                Err(_) => tokio::time::timeout_at(deadline, rx.recv())
                    .await
                    .ok()
                    .flatten(),
            };
        }
        {
            let _turn = shared.write_turn(&store).await;
            write_with_retry(&store, &clock, &batch).await;
        }
        if let Ok(mut p) = shared.pending.lock() {
            for k in keys {
                if let Some(n) = p.get_mut(&k) {
                    *n = n.saturating_sub(1);
                    if *n == 0 {
                        p.remove(&k);
                    }
                }
            }
        }
        shared.settled.notify_waiters();
        for w in waiting {
            let _ = w.send(());
        }
    }
}

async fn write_with_retry(store: &Store, clock: &Clock, batch: &[Settlement]) {
    if batch.is_empty() {
        return;
    }
    let mut backoff = Duration::from_millis(50);
    loop {
        match store.budget_settle(batch, clock.now_ms()).await {
            Ok(()) => return,
            Err(e) => {
                tracing::warn!(error = %e, settlements = batch.len(), "budget settlement failed; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// admin operations (also used by the CLI, which has a store but no server)

/// A scope's budget and rate limits as stored.
pub async fn view(
    store: &Store,
    now: i64,
    scope: ScopeKind,
    id: i64,
) -> Result<BudgetView, StoreError> {
    let (row, limits) = store.budget_policy(scope.as_str(), id).await?;
    let mut v = BudgetView {
        scope,
        id,
        explicit: false,
        limit_micros: None,
        period: None,
        period_start: None,
        reset_at: None,
        spent_micros: 0,
        reserved_micros: 0,
        remaining_micros: None,
        rpm: limits
            .as_ref()
            .and_then(|l| l.rpm)
            .and_then(|v| u64::try_from(v).ok()),
        tpm: limits
            .as_ref()
            .and_then(|l| l.tpm)
            .and_then(|v| u64::try_from(v).ok()),
    };
    if let Some(r) = row {
        let period = Period::parse(&r.period).ok();
        let current = period.map(|p| p.start(now)).unwrap_or(r.period_start);
        let fresh = r.period_start < current;
        let start = r.period_start.max(current);
        v.explicit = r.explicit;
        v.limit_micros = Some(r.limit_micros);
        v.period = Some(r.period.clone());
        v.period_start = Some(start);
        v.reset_at = period.and_then(|p| p.end(start));
        v.spent_micros = if fresh { 0 } else { r.spent_micros };
        v.reserved_micros = r.reserved_micros;
        v.remaining_micros = Some((r.limit_micros - v.spent_micros - r.reserved_micros).max(0));
    }
    Ok(v)
}

/// Sets a scope's budget and rate limits; the user or key must exist.
pub async fn set(
    store: &Store,
    now: i64,
    u: &BudgetUpdate,
) -> Result<BudgetView, BudgetAdminError> {
    let exists = match u.scope {
        ScopeKind::User => store.get_user(u.id).await?.is_some(),
        ScopeKind::Key => store.api_key_exists(u.id).await?,
    };
    if !exists {
        return Err(BudgetAdminError::NotFound(format!(
            "{} {}",
            u.scope.as_str(),
            u.id
        )));
    }
    for (name, v) in [("rpm", u.rpm), ("tpm", u.tpm)] {
        if v == Some(0) || v.is_some_and(|v| v > i64::MAX as u64) {
            return Err(BudgetAdminError::Invalid(format!(
                "{name} must be above 0 (leave it out for no limit)"
            )));
        }
    }
    match &u.budget {
        Some((limit, period)) => {
            if *limit < 0 {
                return Err(BudgetAdminError::Invalid(
                    "limit_usd may not be negative".into(),
                ));
            }
            store
                .budget_set(
                    u.scope.as_str(),
                    u.id,
                    *limit,
                    &period.name(),
                    period.start(now),
                    now,
                )
                .await?;
        }
        None => {
            store.budget_clear(u.scope.as_str(), u.id, now).await?;
        }
    }
    store
        .rate_limits_set(
            u.scope.as_str(),
            u.id,
            u.rpm.map(|v| v as i64),
            u.tpm.map(|v| v as i64),
            now,
        )
        .await?;
    Ok(view(store, now, u.scope, u.id).await?)
}

impl BudgetUpdate {
    /// Checks what an admin asked for: a scope, an id, and a limit with its period (or
    /// neither), rate limits above 0.
    pub fn parse(
        scope: &str,
        id: i64,
        limit_usd: Option<f64>,
        period: Option<&str>,
        rpm: Option<u64>,
        tpm: Option<u64>,
    ) -> Result<BudgetUpdate, String> {
        let scope = ScopeKind::parse(scope)?;
        let budget = match (limit_usd, period.map(str::trim).filter(|p| !p.is_empty())) {
            (Some(usd), Some(p)) => Some((limit_from_usd(usd)?, Period::parse(p)?)),
            (Some(_), None) => return Err("period is required with limit_usd".into()),
            (None, Some(_)) => return Err("limit_usd is required with period".into()),
            (None, None) => None,
        };
        for (name, v) in [("rpm", rpm), ("tpm", tpm)] {
            if v == Some(0) || v.is_some_and(|v| v > i64::MAX as u64) {
                return Err(format!(
                    "{name} must be above 0 (leave it out for no limit)"
                ));
            }
        }
        Ok(BudgetUpdate {
            scope,
            id,
            budget,
            rpm,
            tpm,
        })
    }
}

/// A limit in USD as micro-dollars, checked.
pub fn limit_from_usd(usd: f64) -> Result<i64, String> {
    if !usd.is_finite() || !(0.0..=1e9).contains(&usd) {
        return Err(format!(
            "limit_usd must be a number from 0 to 1e9, not {usd}"
        ));
    }
    Ok(super::pricing::usd_to_micros(usd))
}

impl Gateway {
    /// The budget left to a principal: the least of what its user's and its key's budgets
    /// have left in their current periods, in micro-dollars (`None` when no budget applies to
    /// it). Reserves nothing; for `AuthorizeResponse.principal.remaining_budget_micros`.
    pub async fn remaining_budget(&self, principal: &Principal) -> Result<Option<i64>, Rejection> {
        let rt = self.runtime();
        let st = rt.config.service_type(&principal.service_type);
        self.budgets()
            .remaining(principal, st.as_ref(), &rt.config.budgets)
            .await
            .map_err(|e| Rejection::internal(format!("budget lookup: {e}")))
    }

    /// A scope's budget and rate limits (admin).
    pub async fn get_budget(
        &self,
        scope: ScopeKind,
        id: i64,
    ) -> Result<BudgetView, BudgetAdminError> {
        Ok(self.budgets().view(scope, id).await?)
    }

    /// Sets a scope's budget and rate limits (admin). Takes effect on this replica at once and
    /// on others within `budgets.policy_cache_ms` (a changed limit amount at once everywhere).
    pub async fn set_budget(&self, update: &BudgetUpdate) -> Result<BudgetView, BudgetAdminError> {
        self.budgets().set(update).await
    }

    /// Spend and tokens per resolved model, and their sum (admin).
    pub async fn query_usage(&self, filter: &UsageFilter) -> Result<UsageReport, BudgetAdminError> {
        let models = self.store().usage_by_model(filter).await?;
        let mut total = UsageTotal::default();
        for m in &models {
            total.requests += m.requests;
            total.prompt_tokens += m.prompt_tokens;
            total.completion_tokens += m.completion_tokens;
            total.cost_micros += m.cost_micros;
        }
        Ok(UsageReport { models, total })
    }
}

/// What the usage query answers: per resolved model, and the sum of them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageReport {
    pub models: Vec<crate::store::ModelUsage>,
    pub total: UsageTotal,
}

/// Requests, tokens and spend summed over the models of a usage report.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UsageTotal {
    pub requests: i64,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    pub cost_micros: i64,
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: i64 = 1_795_000_000_000; // 2026-11-18T...Z

    #[test]
    fn periods_parse_and_name() {
        for (s, name) in [
            ("daily", "daily"),
            ("weekly", "weekly"),
            ("monthly", "monthly"),
            ("total", "total"),
            ("12h", "12h"),
            ("720m", "12h"),
            ("90m", "90m"),
            ("7d", "1w"),
            ("3600s", "1h"),
        ] {
            assert_eq!(Period::parse(s).unwrap().name(), name, "{s}");
        }
        for bad in ["", "yearly", "12", "h", "10s", "-1h", "1.5h"] {
            assert!(Period::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn calendar_periods_are_utc() {
        let now = parse_time("2026-11-27T15:04:05Z").unwrap();
        let at = |s: &str| parse_time(s).unwrap();
        assert_eq!(Period::Daily.start(now), at("2026-11-27"));
        assert_eq!(Period::Daily.end(at("2026-11-27")), Some(at("2026-11-28")));
        // 2026-11-27 is a Friday; the week began on Monday the 23rd.
        assert_eq!(Period::Weekly.start(now), at("2026-11-23"));
        assert_eq!(Period::Weekly.end(at("2026-11-23")), Some(at("2026-11-30")));
        assert_eq!(Period::Monthly.start(now), at("2026-11-01"));
        assert_eq!(
            Period::Monthly.end(at("2026-11-01")),
            Some(at("2026-12-01"))
        );
        assert_eq!(
            Period::Monthly.end(at("2026-12-01")),
            Some(at("2027-01-01"))
        );
        assert_eq!(
            Period::Monthly.start(at("2024-02-29T23:59:59Z")),
            at("2024-02-01")
        );
        assert_eq!(
            Period::Monthly.end(at("2024-02-01")),
            Some(at("2024-03-01"))
        );
        assert_eq!(
            Period::Every(12 * 3_600_000).start(now),
            at("2026-11-27T12:00:00Z")
        );
        assert_eq!(Period::Total.start(now), 0);
        assert_eq!(Period::Total.end(0), None);
        assert_eq!(rfc3339(at("2026-11-28")), "2026-11-28T00:00:00Z");
        assert_eq!(rfc3339(now), "2026-11-27T15:04:05Z");
        const { assert!(T > 0) };
    }

    #[test]
    fn civil_round_trip() {
        for days in (-800_000..800_000).step_by(997) {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days);
        }
    }

    #[test]
    fn times_parse() {
        assert_eq!(parse_time("0").unwrap(), 0);
        assert_eq!(parse_time("1970-01-02").unwrap(), DAY_MS);
        assert_eq!(parse_time("1970-01-01T00:01:00Z").unwrap(), 60_000);
        assert!(parse_time("1970-13-01").is_err());
        assert!(parse_time("yesterday").is_err());
    }
}
