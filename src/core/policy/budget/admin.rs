//! One scope's budget and rate limits, read and set (for `core::admin::Admin`). The functions
//! take a store, not a server, so that the CLI runs them too.

use super::{Period, ScopeKind};
use crate::store::{Store, StoreError};

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
    /// Maximum costs of the requests in flight that reserved one by one.
    pub reserved_micros: i64,
    /// Room the replicas have leased and not yet charged (DESIGN.md section 5): still the
    /// scope's to spend, so it counts in `remaining_micros`.
    pub leased_micros: i64,
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
        leased_micros: 0,
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
        v.leased_micros = if fresh {
            0
        } else {
            store.budget_leased(r.id).await?.min(r.reserved_micros)
        };
        v.reserved_micros = r.reserved_micros - v.leased_micros;
        v.remaining_micros = Some((r.limit_micros - v.spent_micros - v.reserved_micros).max(0));
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
            (Some(usd), Some(p)) => Some((
                limit_from_usd(usd)?,
                Period::parse(p).map_err(|e| e.to_string())?,
            )),
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
    Ok(crate::core::pricing::usd_to_micros(usd))
}
