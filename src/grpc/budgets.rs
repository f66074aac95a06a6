//! The budget and usage RPCs of `tollgate.v1.Admin` (the caller has checked the admin token).

use crate::core::admin::AdminError;
use crate::core::policy::{BudgetUpdate, BudgetView, ScopeKind};
use crate::core::Gateway;
use crate::proto;
use crate::store::UsageFilter;

impl From<BudgetView> for proto::Budget {
    fn from(v: BudgetView) -> Self {
        proto::Budget {
            scope: v.scope.as_str().into(),
            id: v.id,
            explicit: v.explicit,
            limit_micros: v.limit_micros,
            period: v.period,
            period_start_ms: v.period_start,
            reset_at_ms: v.reset_at,
            spent_micros: v.spent_micros,
            reserved_micros: v.reserved_micros,
            leased_micros: v.leased_micros,
            remaining_micros: v.remaining_micros,
            rpm: v.rpm,
            tpm: v.tpm,
        }
    }
}

/// `SetBudget`.
pub async fn set_budget(
    gw: &Gateway,
    r: proto::SetBudgetRequest,
) -> Result<proto::Budget, AdminError> {
    let update = BudgetUpdate::parse(
        &r.scope,
        r.id,
        r.limit_usd,
        Some(r.period.as_str()),
        r.rpm,
        r.tpm,
    )
    .map_err(AdminError::Invalid)?;
    Ok(gw.admin().set_budget(&update).await?.into())
}

/// `GetBudget`.
pub async fn get_budget(
    gw: &Gateway,
    r: proto::GetBudgetRequest,
) -> Result<proto::Budget, AdminError> {
    let scope = ScopeKind::parse(&r.scope).map_err(AdminError::Invalid)?;
    Ok(gw.admin().get_budget(scope, r.id).await?.into())
}

/// `QueryUsage`.
pub async fn query_usage(
    gw: &Gateway,
    r: proto::QueryUsageRequest,
) -> Result<proto::QueryUsageResponse, AdminError> {
    let filter = UsageFilter {
        user_id: r.user_id,
        key_id: r.key_id,
        model: r.model.filter(|m| !m.is_empty()),
        from: r.from_ms,
        to: r.to_ms,
    };
    let report = gw.admin().query_usage(&filter).await?;
    Ok(proto::QueryUsageResponse {
        total_requests: report.total.requests,
        total_prompt_tokens: report.total.prompt_tokens,
        total_completion_tokens: report.total.completion_tokens,
        total_cost_micros: report.total.cost_micros,
        models: report
            .models
            .into_iter()
            .map(|m| proto::ModelUsage {
                model: m.model,
                requests: m.requests,
                prompt_tokens: m.prompt_tokens,
                completion_tokens: m.completion_tokens,
                cost_micros: m.cost_micros,
            })
            .collect(),
    })
}
