//! Authentication: the credential verified, the service type and purpose settled, and a new
//! token identity provisioned.

use super::admit::{check_purpose, label_safe};
use super::{Gateway, Principal, Runtime};
use crate::core::auth::Credential;
use crate::core::{CallContext, Reason, Rejection};

impl Gateway {
    /// Verifies the credential, settles the service type and purpose, and provisions a new
    /// token identity. `service_type_seen` receives the service type as soon as it is known, so
    /// that a refusal after that point is still labelled with it.
    pub(super) async fn authenticate(
        &self,
        rt: &Runtime,
        ctx: &CallContext,
        service_type_seen: &mut Option<String>,
    ) -> Result<Principal, Rejection> {
        let started = std::time::Instant::now();
        let (method, verified) = self
            .auth
            .verify(ctx.authorization.as_deref(), &rt.verifiers)
            .await;
        let result = match &verified {
            Ok(_) => "success",
            Err(e) if e.reason == Reason::AuthSystemFailure => "failure",
            Err(_) => "rejected",
        };
        self.recorder.metrics.observe_auth(
            method.map(|m| m.as_str()).unwrap_or("none"),
            result,
            started.elapsed().as_secs_f64(),
        );
        let credential = verified?;
        let config = &rt.config;
        let claimed = match &credential {
            Credential::Known(i) => i.user_service_type.as_deref().map(str::to_string),
            Credential::External(e) => e.service_type.clone(),
        };
        let service_type = ctx
            .service_type
            .clone()
            .or(claimed)
            .unwrap_or_else(|| config.server.default_service_type.clone());
        *service_type_seen = Some(service_type.clone());
        let Some(st) = config.service_type(&service_type) else {
            return Err(Rejection::new(
                Reason::InvalidAuthRequest,
                format!("unknown service type `{}`", label_safe(&service_type)),
            ));
        };
        let purpose = check_purpose(st, ctx.purpose.as_deref())?;
        let identity = match credential {
            Credential::Known(identity) => identity,
            Credential::External(ext) => {
                let cap = crate::store::SignupCap {
                    per_day: st.signup_cap_per_day,
                    total: st.signup_cap_total,
                };
                let p = self
                    .provisioner
                    .provision(&ext, &service_type, cap, self.deps.clock.now_ms())
                    .await?;
                if p.created {
                    tracing::info!(user_id = p.identity.user_id, auth_method = ext.method.as_str(), service_type = %service_type, "user provisioned");
                    self.recorder
                        .metrics
                        .signups
                        .get_or_create(&crate::metrics::SignupLabels {
                            auth_method: ext.method.as_str(),
                        })
                        .inc();
                }
                p.identity
            }
        };
        Ok(Principal {
            identity,
            service_type,
            purpose,
            allowed_models: st.models.clone(),
            remaining_budget_micros: None,
        })
    }
}
