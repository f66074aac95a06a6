//! The policy stage: rate limits and budgets, checked for every model request (chat,
//! embeddings) after it is authorized and routed, before any upstream is called. A request is
//! seen through its [`Demand`] (estimated prompt tokens and an output cap).
//!
//! [`Budgets::admit`] runs the steps in order: refuse an unpriced model where those are
//! refused; load the settings of the request's scopes (its user and its key, cached briefly);
//! take the request from its rate-limit windows; reserve its maximum cost in every budget that
//! applies. A refusal after the rate-limit step gives the rate-limit charge back. What is taken
//! rides on the request's outcome guard as a [`HoldSlot`] and is settled when the request ends.

pub mod budget;
pub mod rate_limit;

use std::sync::Arc;
use std::time::Duration;

pub use budget::{
    headers, limit_from_usd, parse_time, rfc3339, BudgetAdminError, BudgetUpdate, BudgetView,
    HoldSlot, Period, ScopeKey, ScopeKind,
};

use self::budget::{Applied, CachedBudget, Knobs, LeasedPart, Leases, Reservation, Settler};
use self::rate_limit::{Limits, RateCharge, RateDenial, RateLimitBackend, RateRefusal};
use super::gateway::Principal;
use super::pricing::{OutputCap, Pricing, Unpriced};
use super::ttl_cache::{Cached, Load, TtlCache};
use super::{Reason, Rejection};
use crate::api::{ChatRequest, EmbeddingsRequest};
use crate::clock::Clock;
use crate::config::{BudgetsConfig, RateLimitsConfig, ServiceTypeConfig};
use crate::error::PolicyHeaders;
use crate::metrics::BudgetWriteLabels;
use crate::routing::Route;
use crate::store::{Store, StoreError};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;

/// Budgets and rate limits: one per process, outliving configuration reloads.
pub struct Budgets {
    store: Store,
    clock: Clock,
    settler: Settler,
    cache: TtlCache<ScopeKey, ScopePolicy>,
    limiter: RateLimitBackend,
    leases: Leases,
    writes: WriteCounter,
    /// `budgets.expired_reservations = "charge"` (read at start).
    charge_expired: bool,
}

/// Counts budget writes to the store by kind (`tollgate_budget_store_writes_total`).
#[derive(Clone, Default)]
pub struct WriteCounter(Family<BudgetWriteLabels, Counter>);

impl WriteCounter {
    /// Counts one write of `kind`.
    fn count(&self, kind: &'static str) {
        self.0.get_or_create(&BudgetWriteLabels { kind }).inc();
    }
}

impl std::fmt::Debug for Budgets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Budgets").finish_non_exhaustive()
    }
}

/// What admission gives a request: its hold (settled when it ends) and response headers.
pub struct Admission {
    pub hold: HoldSlot,
    pub headers: PolicyHeaders,
}

/// What a request asks of admission.
pub struct AdmitArgs<'a> {
    pub principal: &'a Principal,
    pub service_type: Option<&'a ServiceTypeConfig>,
    pub route: &'a Route,
    pub demand: Demand,
    pub request_id: &'a str,
    pub pricing: &'a Pricing,
    pub config: &'a BudgetsConfig,
}

/// What a request may consume, estimated before it runs: the tokens its rate-limit windows are
/// charged and the maximum cost its budgets reserve (both settled on what it really used).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Demand {
    pub prompt_tokens: u64,
    pub output: OutputCap,
}

impl Demand {
    /// A chat request: its estimated prompt and up to its `max_tokens` of output.
    pub fn chat(req: &ChatRequest) -> Demand {
        Demand {
            prompt_tokens: req.estimate_prompt_tokens(),
            output: OutputCap::UpTo(req.max_tokens),
        }
    }

    /// An embeddings request: its estimated input tokens and no output.
    pub fn embeddings(req: &EmbeddingsRequest) -> Demand {
        Demand {
            prompt_tokens: req.input.estimate_tokens(),
            output: OutputCap::Nothing,
        }
    }

    /// The tokens charged to tokens-per-minute windows up front.
    fn rate_tokens(&self) -> u64 {
        match self.output {
            OutputCap::Nothing | OutputCap::UpTo(None) => self.prompt_tokens,
            // A caller may ask for u64::MAX tokens: saturate, the window refuses it anyway.
            OutputCap::UpTo(Some(max)) => self.prompt_tokens.saturating_add(max),
        }
    }
}

/// What a replica knows about one scope's settings (cached for `budgets.policy_cache_ms`).
#[derive(Debug, Clone, Default)]
struct ScopePolicy {
    /// The stored budget row, if any (explicit or a default's counters).
    budget: Option<CachedBudget>,
    limits: Limits,
}

/// The scopes of one request with their settings: its user's, and its key's if it came with
/// one.
struct Scopes {
    user: (ScopeKey, ScopePolicy),
    key: Option<(ScopeKey, ScopePolicy)>,
}

impl Scopes {
    /// The rate limits that apply: the user's own or else its service type's, and the key's.
    fn rate_limits(&self, st: Option<&ServiceTypeConfig>) -> Vec<(ScopeKey, Limits)> {
        let st_limits = st.and_then(|s| s.rate_limits.as_ref());
        let (ukey, upol) = &self.user;
        let mut out = Vec::new();
        let user_limits = Limits {
            rpm: upol.limits.rpm.or(st_limits.and_then(|l| l.rpm)),
            tpm: upol.limits.tpm.or(st_limits.and_then(|l| l.tpm)),
        };
        if user_limits.any() {
            out.push((*ukey, user_limits));
        }
        if let Some((k, p)) = &self.key {
            if p.limits.any() {
                out.push((*k, p.limits));
            }
        }
        out
    }
}

impl Budgets {
    /// Starts the settlement writer and the expiry sweep, over the rate-limit backend
    /// `rate_limits` names (`fail_open` counts requests it admits unchecked).
    pub fn start(
        store: Store,
        clock: Clock,
        config: &BudgetsConfig,
        writes: Family<BudgetWriteLabels, Counter>,
        rate_limits: &RateLimitsConfig,
        fail_open: Counter,
    ) -> Arc<Budgets> {
        let writes = WriteCounter(writes);
        let settler = Settler::start(store.clone(), clock.clone(), config, writes.clone());
        let budgets = Arc::new(Budgets {
            store,
            clock: clock.clone(),
            settler,
            cache: TtlCache::new(clock.clone()),
            limiter: RateLimitBackend::from_config(rate_limits, fail_open),
            leases: Leases::default(),
            writes,
            charge_expired: config.expired_reservations
                == crate::config::ExpiredReservations::Charge,
        });
        // Leases with requests in flight are renewed every second until those requests end.
        let weak = Arc::downgrade(&budgets);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(budgets) = weak.upgrade() else {
                    break;
                };
                budgets.renew_busy_leases().await;
            }
        });
        budgets
    }

    /// Checks rate limits and reserves the request's maximum cost in every budget that
    /// applies, or refuses it (`rate_limited`, `budget_exceeded`, or `model_not_found` for an
    /// unpriced model under `pricing_policy.unpriced = "refuse"`).
    pub async fn admit(self: &Arc<Self>, a: AdmitArgs<'_>) -> Result<Admission, Rejection> {
        let now = self.clock.now_ms();
        refuse_unpriced(&a)?;
        let scopes = self
            .load_scopes(a.principal, a.config.policy_cache_ms)
            .await
            .map_err(lookup_failed)?;
        let rate_scopes = scopes.rate_limits(a.service_type);
        let applied = scopes.applied(a.service_type);
        if rate_scopes.is_empty() && applied.is_empty() {
            // Nothing to count or reserve: no estimate, no database.
            return Ok(Admission {
                hold: HoldSlot::default(),
                headers: Vec::new(),
            });
        }
        let (rate, mut headers) = self
            .take_rate(now, &rate_scopes, a.demand.rate_tokens())
            .await?;
        match self.reserve_max_cost(&a, applied).await {
            Ok((reservation, leased, budget_headers)) => {
                headers.extend(budget_headers);
                Ok(Admission {
                    hold: self.hold(reservation, leased, rate),
                    headers,
                })
            }
            Err(r) => {
                // Refused by its budget: the request never ran, so it takes nothing from the
                // rate-limit windows either.
                if let Some(c) = &rate {
                    self.limiter.refund(self.clock.now_ms(), c);
                }
                Err(r)
            }
        }
    }

    /// Takes the request from the rate-limit windows of its scopes (none: nothing to take).
    async fn take_rate(
        &self,
        now: i64,
        scopes: &[(ScopeKey, Limits)],
        tokens: u64,
    ) -> Result<(Option<RateCharge>, PolicyHeaders), Rejection> {
        if scopes.is_empty() {
            return Ok((None, Vec::new()));
        }
        match self.limiter.admit(now, scopes, tokens).await {
            Ok(admitted) => Ok(admitted),
            Err(RateRefusal::Limited(d)) => Err(rate_limited(d)),
            Err(RateRefusal::Unavailable) => Err(Rejection::new(
                Reason::PolicyUnavailable,
                "the rate-limit store could not be reached; try again shortly",
            )),
        }
    }

    /// Reserves the most the request can cost in the budgets that apply (none, or a free
    /// request: nothing is reserved): on this replica's leases when they have room, else in
    /// the database.
    async fn reserve_max_cost(
        self: &Arc<Self>,
        a: &AdmitArgs<'_>,
        applied: Vec<Applied>,
    ) -> Result<(Option<Reservation>, Vec<LeasedPart>, PolicyHeaders), Rejection> {
        let targets = a.route.targets.iter().map(|t| t.resolved.as_str());
        let max_cost = a
            .pricing
            .max_cost_micros(targets, a.demand.prompt_tokens, a.demand.output)
            .map_err(|Unpriced(model)| unpriced(&model))?;
        if applied.is_empty() || max_cost == 0 {
            return Ok((None, Vec::new(), Vec::new()));
        }
        if let Some(knobs) = Knobs::of(a.config) {
            if let Some((leased, headers)) = self.admit_leased(&applied, max_cost, knobs).await {
                return Ok((None, leased, headers));
            }
        }
        // Boxed, as every store call on this path: see `policy`.
        let (reservation, headers) = Box::pin(self.reserve(a, applied, max_cost)).await?;
        Ok((reservation, Vec::new(), headers))
    }

    /// The settings of a request's scopes, cached for `ttl_ms` (0: read now).
    async fn load_scopes(
        self: &Arc<Self>,
        principal: &Principal,
        ttl_ms: u64,
    ) -> Result<Scopes, StoreError> {
        let identity = &principal.identity;
        let ukey = (ScopeKind::User, identity.user_id);
        let user = (ukey, self.policy(ukey, ttl_ms).await?);
        let key = match identity.key_id.map(|k| (ScopeKind::Key, k)) {
            Some(k) => Some((k, self.policy(k, ttl_ms).await?)),
            None => None,
        };
        Ok(Scopes { user, key })
    }

    /// A scope's settings from the cache (renewed in the background past half its TTL), or
    /// read now.
    async fn policy(
        self: &Arc<Self>,
        key: ScopeKey,
        ttl_ms: u64,
    ) -> Result<ScopePolicy, StoreError> {
        match self.cache.lookup(&key, ttl_ms) {
            Cached::Fresh(p) => Ok(p),
            Cached::Refresh(p, load) => {
                let budgets = self.clone();
                let reload = async move { budgets.read_policy(key, load, ttl_ms).await.map(drop) };
                self.cache
                    .renew(key, "refreshing budget settings failed", reload);
                Ok(p)
            }
            // Boxed: the store call's future is kilobytes, copied with every future that holds
            // this one, on every request, though cached settings never reach it.
            Cached::Missing(load) => Box::pin(self.read_policy(key, load, ttl_ms)).await,
        }
    }

    /// Reads a scope's settings from the store into the cache.
    async fn read_policy(
        &self,
        key: ScopeKey,
        load: Load,
        ttl_ms: u64,
    ) -> Result<ScopePolicy, StoreError> {
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
        self.cache.insert(key, policy.clone(), load, ttl_ms);
        Ok(policy)
    }

    /// Where this process counts rate-limit windows.
    pub fn rate_limiter(&self) -> &RateLimitBackend {
        &self.limiter
    }

    /// Forgets cached settings of a scope (after an admin change here), and retires this
    /// replica's lease of it so that a changed limit applies to the next request.
    pub fn forget(&self, key: ScopeKey) {
        self.cache.remove(&key);
        self.reset_lease(key);
    }
}

/// A model without a price, where those are refused.
fn refuse_unpriced(a: &AdmitArgs<'_>) -> Result<(), Rejection> {
    match a
        .route
        .targets
        .iter()
        .find(|t| a.pricing.refuses(&t.resolved))
    {
        Some(t) => Err(unpriced(&t.resolved)),
        None => Ok(()),
    }
}

fn unpriced(model: &str) -> Rejection {
    Rejection::new(
        Reason::ModelNotFound,
        format!("`{model}` has no price and unpriced models are refused here"),
    )
    .with_param("model")
}

fn rate_limited(d: RateDenial) -> Rejection {
    let secs = d.retry_after.as_secs() + u64::from(d.retry_after.subsec_nanos() > 0);
    let mut r = Rejection::new(
        Reason::RateLimited,
        format!(
            "rate limit of {} {} per minute reached; try again in {}",
            d.limit,
            d.what,
            rate_limit::reset_string(d.retry_after.as_millis() as i64)
        ),
    )
    .with_retry_after(Duration::from_secs(secs.max(1)));
    r.headers = d.headers;
    r
}

fn lookup_failed(e: StoreError) -> Rejection {
    store_failed("budget lookup", e)
}

/// The store behind a budget could not answer: `policy_unavailable` (an outage, it lowers
/// availability and says 503 so that callers retry), the detail in the log only.
pub(crate) fn store_failed(stage: &str, e: StoreError) -> Rejection {
    tracing::warn!(error = %e, stage, "policy store unavailable");
    Rejection::new(
        Reason::PolicyUnavailable,
        "the budget store could not be reached; try again shortly",
    )
}
