//! The checks every model request passes before its upstream, in order: authentication and
//! provisioning (`Gateway::authenticate`), the blocked check, routing, the service type's model
//! allow-list, then policy (rate limits and budgets).

use super::{Gateway, Principal, Runtime};
use crate::config::ServiceTypeConfig;
use crate::core::outcome::OutcomeGuard;
use crate::core::{CallContext, Reason, Rejection};
use crate::metrics::{none_label, unknown_label, Label};
use crate::routing::model_allowed;
use std::sync::Arc;

/// The policy stage's first check; apart from authentication so that a blocked request is
/// still attributed to its user.
pub(super) fn check_blocked(principal: &Principal) -> Result<(), Rejection> {
    if principal.identity.blocked {
        return Err(Rejection::new(Reason::Blocked, "this user is blocked"));
    }
    Ok(())
}

pub(super) fn check_purpose(
    st: &ServiceTypeConfig,
    purpose: Option<&str>,
) -> Result<Option<String>, Rejection> {
    match purpose {
        None if st.require_purpose => Err(Rejection::new(
            Reason::InvalidAuthRequest,
            "this service type requires X-Tollgate-Purpose",
        )),
        None => Ok(None),
        Some(p) if st.purposes.is_empty() || st.purposes.iter().any(|x| x == p) => {
            Ok(Some(p.to_string()))
        }
        Some(p) => Err(Rejection::new(
            Reason::InvalidAuthRequest,
            format!(
                "purpose `{}` is not accepted by this service type",
                label_safe(p)
            ),
        )),
    }
}

pub(super) fn check_model_allowed(principal: &Principal, model: &str) -> Result<(), Rejection> {
    if model_allowed(&principal.allowed_models, model) {
        Ok(())
    } else {
        Err(Rejection::new(
            Reason::InvalidServiceTypeForModel,
            format!(
                "service type `{}` may not use `{}`",
                principal.service_type,
                label_safe(model)
            ),
        )
        .with_param("model"))
    }
}

/// Caller-supplied text echoed in messages is cut short.
pub(super) fn label_safe(s: &str) -> &str {
    match s.char_indices().nth(100) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

/// Fills what a model request's record knows before its body is decoded.
pub(in crate::core) fn open_record(rt: &Runtime, ctx: &CallContext, guard: &mut OutcomeGuard) {
    let rec = guard.record();
    rec.service_type = ctx.service_type.clone();
    rec.purpose = ctx.purpose.clone();
    rec.service_type_label = service_type_label(rt, ctx.service_type.as_deref());
    rec.purpose_label = purpose_label(rt, ctx.purpose.as_deref());
}

/// The stages every model request (chat, embeddings) runs before its upstream: authentication
/// and provisioning, the blocked check, routing, the model allow-list, then policy (rate limits,
/// then the maximum cost of `demand` reserved in every budget that applies; the hold rides on
/// the outcome guard, which settles it however the request ends). Returns the route and the
/// policy headers.
pub(in crate::core) async fn admit(
    gateway: &Gateway,
    rt: &Runtime,
    ctx: &CallContext,
    guard: &mut OutcomeGuard,
    model: &str,
    demand: crate::core::policy::Demand,
) -> Result<(Arc<crate::routing::Route>, crate::error::PolicyHeaders), Rejection> {
    use tracing::Instrument;
    let mut service_type_seen = None;
    let principal = match gateway
        .authenticate(rt, ctx, &mut service_type_seen)
        .instrument(tracing::debug_span!("auth"))
        .await
    {
        Ok(p) => p,
        Err(e) => {
            if let Some(st) = service_type_seen {
                let rec = guard.record();
                rec.service_type_label = service_type_label(rt, Some(&st));
                rec.service_type = Some(st);
            }
            return Err(e);
        }
    };
    {
        let rec = guard.record();
        rec.user_id = Some(principal.identity.user_id);
        rec.key_id = principal.identity.key_id;
        rec.service_type_label = service_type_label(rt, Some(&principal.service_type));
        // `authenticate` handed over its copy of the name for this; no second one is made.
        rec.service_type =
            Some(service_type_seen.unwrap_or_else(|| principal.service_type.clone()));
    }
    check_blocked(&principal)?;
    let route = rt.router.resolve(model)?;
    check_model_allowed(&principal, model)?;
    guard.record().pricing = Some(rt.pricing.clone());
    let st = rt.config.service_type(&principal.service_type);
    let admission = gateway
        .recorder
        .budgets
        .admit(crate::core::policy::AdmitArgs {
            principal: &principal,
            service_type: st,
            route: &route,
            demand,
            request_id: &ctx.request_id,
            pricing: &rt.pricing,
            config: &rt.config.budgets,
        })
        .instrument(tracing::debug_span!("policy"))
        .await?;
    guard.record().hold = admission.hold;
    Ok((route, admission.headers))
}

fn service_type_label(rt: &Runtime, st: Option<&str>) -> Label {
    let name = st.unwrap_or(&rt.config.server.default_service_type);
    rt.service_types
        .get(name)
        .cloned()
        .unwrap_or_else(unknown_label)
}

fn purpose_label(rt: &Runtime, purpose: Option<&str>) -> Label {
    match purpose {
        None => none_label(),
        Some(p) => rt
            .known_purposes
            .get(p)
            .cloned()
            .unwrap_or_else(unknown_label),
    }
}
