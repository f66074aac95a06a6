//! `/admin/budgets` and `/admin/usage`, behind the admin token: a user's or an API key's budget
//! and rate limits, and spend and tokens per model from the usage ledger.

use std::sync::Arc;

use axum::extract::State;
use axum::response::IntoResponse;
use axum::Json;
use serde::{Deserialize, Deserializer};
use serde_json::{json, Value};

use crate::core::admin::{AdminError, UsageReport};
use crate::core::policy::{parse_time, rfc3339, BudgetUpdate, BudgetView, ScopeKind};
use crate::core::pricing::micros_to_usd;
use crate::core::Gateway;
use crate::store::UsageFilter;

use super::admin::{number, AdminJson, AdminQuery, AdminResult, UserName};

/// A budget as JSON: exact micro-dollars, and USD as decimal strings.
pub fn budget_json(v: &BudgetView) -> Value {
    let usd = |m: Option<i64>| m.map(micros_to_usd);
    json!({
        "scope": v.scope.as_str(),
        "id": v.id,
        "explicit": v.explicit,
        "limit_usd": usd(v.limit_micros),
        "limit_micros": v.limit_micros,
        "period": v.period,
        "period_start": v.period_start,
        "reset_at": v.reset_at,
        "reset_at_rfc3339": v.reset_at.map(rfc3339),
        "spent_usd": micros_to_usd(v.spent_micros),
        "spent_micros": v.spent_micros,
        "reserved_micros": v.reserved_micros,
        "leased_micros": v.leased_micros,
        "remaining_usd": usd(v.remaining_micros),
        "remaining_micros": v.remaining_micros,
        "rpm": v.rpm,
        "tpm": v.tpm,
    })
}

/// Scope and id: `?scope=user&id=7`.
#[derive(Deserialize)]
pub(super) struct Which {
    scope: String,
    id: String,
}

/// The id of the user or key a budget request names (a user by id or external id).
async fn subject(gw: &Gateway, scope: ScopeKind, id: &UserName) -> Result<i64, AdminError> {
    match scope {
        ScopeKind::User => id.user_id(gw).await,
        ScopeKind::Key => id.key_id(),
    }
}

pub(super) async fn get_budget(
    State(gw): State<Arc<Gateway>>,
    AdminQuery(q): AdminQuery<Which>,
) -> AdminResult {
    let scope = ScopeKind::parse(&q.scope).map_err(AdminError::Invalid)?;
    let id = subject(&gw, scope, &UserName::Text(q.id)).await?;
    let v = gw.admin().get_budget(scope, id).await?;
    Ok(Json(budget_json(&v)).into_response())
}

/// `PUT /admin/budgets`: replaces the scope's own budget and rate limits. `limit_usd` may be
/// a number or a decimal string; leaving it out (or null) removes the scope's own budget.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct PutBudget {
    scope: String,
    id: UserName,
    #[serde(default, deserialize_with = "usd")]
    limit_usd: Option<f64>,
    period: Option<String>,
    rpm: Option<u64>,
    tpm: Option<u64>,
}

fn usd<'de, D: Deserializer<'de>>(d: D) -> Result<Option<f64>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Usd {
        Number(f64),
        Text(String),
    }
    match Option::<Usd>::deserialize(d)? {
        None => Ok(None),
        Some(Usd::Number(n)) => Ok(Some(n)),
        Some(Usd::Text(t)) => t
            .trim()
            .parse()
            .map(Some)
            .map_err(|_| serde::de::Error::custom(format!("limit_usd {t:?} is not a number"))),
    }
}

pub(super) async fn put_budget(
    State(gw): State<Arc<Gateway>>,
    AdminJson(b): AdminJson<PutBudget>,
) -> AdminResult {
    let scope = ScopeKind::parse(&b.scope).map_err(AdminError::Invalid)?;
    let id = subject(&gw, scope, &b.id).await?;
    let update = BudgetUpdate::parse(&b.scope, id, b.limit_usd, b.period.as_deref(), b.rpm, b.tpm)
        .map_err(AdminError::Invalid)?;
    let v = gw.admin().set_budget(&update).await?;
    Ok(Json(budget_json(&v)).into_response())
}

#[derive(Deserialize)]
pub(super) struct UsageQuery {
    user_id: Option<String>,
    key_id: Option<String>,
    model: Option<String>,
    from: Option<String>,
    to: Option<String>,
}

/// `GET /admin/usage`: spend and tokens per resolved model of the requests that started in
/// `[from, to)` (unix ms, `YYYY-MM-DD` or RFC 3339 UTC), for a user, a key and/or a model.
pub(super) async fn usage(
    State(gw): State<Arc<Gateway>>,
    AdminQuery(q): AdminQuery<UsageQuery>,
) -> AdminResult {
    let time = |t: &Option<String>| -> Result<Option<i64>, AdminError> {
        t.as_deref()
            .filter(|s| !s.is_empty())
            .map(parse_time)
            .transpose()
            .map_err(AdminError::Invalid)
    };
    let user_id = match q
        .user_id
        .as_deref()
        .map(str::trim)
        .filter(|u| !u.is_empty())
    {
        Some(u) => Some(gw.admin().find_user(u).await?.id),
        None => None,
    };
    let filter = UsageFilter {
        user_id,
        key_id: number("key_id", q.key_id.as_deref())?,
        model: q.model.filter(|m| !m.is_empty()),
        from: time(&q.from)?,
        to: time(&q.to)?,
    };
    let report = gw.admin().query_usage(&filter).await?;
    Ok(Json(usage_json(&filter, &report)).into_response())
}

/// A usage report as JSON (also `tollgate admin usage --json`): exact micro-dollars, and USD
/// as decimal strings.
pub fn usage_json(filter: &UsageFilter, report: &UsageReport) -> Value {
    let total = &report.total;
    let models: Vec<Value> = report
        .models
        .iter()
        .map(|m| {
            json!({
                "model": m.model,
                "requests": m.requests,
                "prompt_tokens": m.prompt_tokens,
                "completion_tokens": m.completion_tokens,
                "cost_micros": m.cost_micros,
                "spend_usd": micros_to_usd(m.cost_micros),
            })
        })
        .collect();
    json!({
        "user_id": filter.user_id,
        "key_id": filter.key_id,
        "model": filter.model,
        "from": filter.from,
        "to": filter.to,
        "models": models,
        "total": {
            "requests": total.requests,
            "prompt_tokens": total.prompt_tokens,
            "completion_tokens": total.completion_tokens,
            "cost_micros": total.cost_micros,
            "spend_usd": micros_to_usd(total.cost_micros),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::super::admin::tests::{json_fields, proto_fields};
    use super::*;

    #[test]
    fn budget_json_has_every_proto_field_and_only_usd_conveniences_beside() {
        let v = BudgetView {
            scope: ScopeKind::User,
            id: 1,
            explicit: true,
            limit_micros: Some(1),
            period: Some("daily".into()),
            period_start: Some(0),
            reset_at: Some(1),
            spent_micros: 0,
            reserved_micros: 0,
            leased_micros: 0,
            remaining_micros: Some(1),
            rpm: None,
            tpm: None,
        };
        let json = json_fields(&budget_json(&v));
        let proto = proto_fields("Budget");
        assert!(proto.is_subset(&json), "{proto:?} ⊄ {json:?}");
        let extra: Vec<_> = json.difference(&proto).collect();
        assert!(
            extra
                .iter()
                .all(|f| f.ends_with("_usd") || f.ends_with("_rfc3339")),
            "{extra:?}"
        );
    }
}
