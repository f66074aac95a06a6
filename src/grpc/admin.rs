//! `tollgate.v1.Admin`: the admin API over gRPC, behind the admin token.

use std::sync::Arc;

use tonic::{Code, Request, Response, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::core::admin::{AdminError, UserRef};
use crate::core::Gateway;
use crate::proto;
use crate::providers::key_pool::KeySnapshot;
use crate::store::{ApiKey, User};

/// The Admin service over the core.
pub struct AdminService {
    gateway: Arc<Gateway>,
}

impl AdminService {
    /// A service calling `gateway`.
    pub fn new(gateway: Arc<Gateway>) -> Self {
        Self { gateway }
    }
}

/// The admin token check in front of every `tollgate.v1.Admin` RPC.
#[derive(Clone)]
pub struct AdminAuth {
    gateway: Arc<Gateway>,
}

impl AdminAuth {
    /// Checks against `gateway`'s configured admin token (as reloaded).
    pub fn new(gateway: Arc<Gateway>) -> Self {
        Self { gateway }
    }
}

impl tonic::service::Interceptor for AdminAuth {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        let auth = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok());
        self.gateway.check_admin(auth).map_err(admin_status)?;
        Ok(request)
    }
}

/// An admin error as a status with an `ErrorInfo` naming its code.
fn admin_status(e: AdminError) -> Status {
    let code = match e {
        AdminError::Unauthorized => Code::Unauthenticated,
        AdminError::Disabled => Code::PermissionDenied,
        AdminError::NotFound(_) => Code::NotFound,
        AdminError::Conflict(_) => Code::AlreadyExists,
        AdminError::Invalid(_) => Code::InvalidArgument,
        AdminError::Unavailable(_) => Code::Unavailable,
    };
    let details =
        ErrorDetails::with_error_info(e.code(), "tollgate", std::collections::HashMap::new());
    Status::with_error_details(code, e.to_string(), details)
}

impl From<User> for proto::User {
    fn from(u: User) -> Self {
        proto::User {
            id: u.id,
            external_id: u.external_id,
            name: u.name,
            auth_method: u.auth_method,
            blocked: u.blocked,
            blocked_reason: u.blocked_reason,
            created_at_ms: u.created_at,
            blocked_at_ms: u.blocked_at,
            service_type: u.service_type,
        }
    }
}

impl From<KeySnapshot> for proto::UpstreamKey {
    fn from(k: KeySnapshot) -> Self {
        proto::UpstreamKey {
            hint: k.hint,
            state: k.state.as_str().into(),
            reason: k.reason.map(|r| r.as_str().to_string()),
            cooldown_until_ms: k.cooldown_until_ms,
        }
    }
}

impl From<ApiKey> for proto::ApiKeyInfo {
    fn from(k: ApiKey) -> Self {
        proto::ApiKeyInfo {
            id: k.id,
            user_id: k.user_id,
            name: k.name,
            hint: k.hint,
            created_at_ms: k.created_at,
            expires_at_ms: k.expires_at,
            revoked_at_ms: k.revoked_at,
            source: k.source,
        }
    }
}

#[tonic::async_trait]
impl proto::admin_server::Admin for AdminService {
    async fn create_user(
        &self,
        request: Request<proto::CreateUserRequest>,
    ) -> Result<Response<proto::User>, Status> {
        let r = request.into_inner();
        let u = self
            .gateway
            .admin()
            .create_user(&r.external_id, r.name.as_deref())
            .await
            .map_err(admin_status)?;
        Ok(Response::new(u.into()))
    }

    async fn get_user(
        &self,
        request: Request<proto::GetUserRequest>,
    ) -> Result<Response<proto::User>, Status> {
        let user = match request.into_inner().by {
            Some(proto::get_user_request::By::Id(id)) => UserRef::Id(id),
            Some(proto::get_user_request::By::ExternalId(x)) => UserRef::ExternalId(x),
            None => {
                return Err(admin_status(AdminError::Invalid(
                    "give id or external_id".into(),
                )))
            }
        };
        let u = self
            .gateway
            .admin()
            .get_user(&user)
            .await
            .map_err(admin_status)?;
        Ok(Response::new(u.into()))
    }

    async fn create_api_key(
        &self,
        request: Request<proto::CreateApiKeyRequest>,
    ) -> Result<Response<proto::CreatedApiKey>, Status> {
        let r = request.into_inner();
        let created = self
            .gateway
            .admin()
            .create_key(r.user_id, r.name.as_deref(), r.expires_at_ms)
            .await
            .map_err(admin_status)?;
        Ok(Response::new(proto::CreatedApiKey {
            info: Some(created.record.into()),
            key: created.key,
        }))
    }

    async fn list_api_keys(
        &self,
        request: Request<proto::ListApiKeysRequest>,
    ) -> Result<Response<proto::ListApiKeysResponse>, Status> {
        let keys = self
            .gateway
            .admin()
            .list_keys(request.into_inner().user_id)
            .await
            .map_err(admin_status)?;
        Ok(Response::new(proto::ListApiKeysResponse {
            keys: keys.into_iter().map(Into::into).collect(),
        }))
    }

    async fn revoke_api_key(
        &self,
        request: Request<proto::RevokeApiKeyRequest>,
    ) -> Result<Response<proto::ApiKeyInfo>, Status> {
        let k = self
            .gateway
            .admin()
            .revoke_key(request.into_inner().id)
            .await
            .map_err(admin_status)?;
        Ok(Response::new(k.into()))
    }

    async fn block_user(
        &self,
        request: Request<proto::BlockUserRequest>,
    ) -> Result<Response<proto::User>, Status> {
        let r = request.into_inner();
        let u = self
            .gateway
            .admin()
            .block_user(r.user_id, &r.reason)
            .await
            .map_err(admin_status)?;
        Ok(Response::new(u.into()))
    }

    async fn unblock_user(
        &self,
        request: Request<proto::UnblockUserRequest>,
    ) -> Result<Response<proto::User>, Status> {
        let u = self
            .gateway
            .admin()
            .unblock_user(request.into_inner().user_id)
            .await
            .map_err(admin_status)?;
        Ok(Response::new(u.into()))
    }

    async fn list_users(
        &self,
        request: Request<proto::ListUsersRequest>,
    ) -> Result<Response<proto::ListUsersResponse>, Status> {
        let r = request.into_inner();
        let users = self
            .gateway
            .admin()
            .list_users(r.after_id, r.limit)
            .await
            .map_err(admin_status)?;
        Ok(Response::new(proto::ListUsersResponse {
            users: users.into_iter().map(Into::into).collect(),
        }))
    }

    async fn get_signup_cap(
        &self,
        _request: Request<proto::GetSignupCapRequest>,
    ) -> Result<Response<proto::GetSignupCapResponse>, Status> {
        let rt = self.gateway.runtime();
        let caps = self
            .gateway
            .admin()
            .signup_caps(&rt.config)
            .await
            .map_err(admin_status)?;
        Ok(Response::new(proto::GetSignupCapResponse {
            service_types: caps
                .into_iter()
                .map(|c| proto::SignupCapStatus {
                    service_type: c.service_type,
                    cap_per_day: c.cap_per_day,
                    used_24h: c.used_24h,
                    cap_total: c.cap_total,
                    used_total: c.used_total,
                    remaining: c.remaining,
                })
                .collect(),
        }))
    }

    async fn list_upstream_keys(
        &self,
        _request: Request<proto::ListUpstreamKeysRequest>,
    ) -> Result<Response<proto::ListUpstreamKeysResponse>, Status> {
        let providers = self
            .gateway
            .provider_status()
            .into_iter()
            .filter(|p| !p.keys.is_empty())
            .map(|p| proto::ProviderKeys {
                provider: p.provider,
                keys: p.keys.into_iter().map(Into::into).collect(),
            })
            .collect();
        Ok(Response::new(proto::ListUpstreamKeysResponse { providers }))
    }

    async fn reload_config(
        &self,
        _request: Request<proto::ReloadConfigRequest>,
    ) -> Result<Response<proto::ReloadConfigResponse>, Status> {
        self.gateway
            .reload()
            .await
            .map_err(|e| admin_status(AdminError::Invalid(e)))?;
        Ok(Response::new(proto::ReloadConfigResponse {
            reloaded: true,
        }))
    }

    async fn list_aliases(
        &self,
        _request: Request<proto::ListAliasesRequest>,
    ) -> Result<Response<proto::ListAliasesResponse>, Status> {
        let rt = self.gateway.runtime();
        let aliases = rt
            .router
            .aliases()
            .iter()
            .map(|(name, a)| proto::AliasInfo {
                alias: name.clone(),
                description: a.description.clone(),
                chain: a.chain.clone(),
            })
            .collect();
        Ok(Response::new(proto::ListAliasesResponse { aliases }))
    }

    async fn get_health(
        &self,
        _request: Request<proto::GetHealthRequest>,
    ) -> Result<Response<proto::GetHealthResponse>, Status> {
        let providers = self
            .gateway
            .provider_status()
            .into_iter()
            .map(|p| proto::ProviderHealth {
                provider: p.provider,
                healthy: p.health.healthy,
                consecutive_failures: p.health.consecutive_failures,
                last_error: p.health.last_error,
                unhealthy_until_ms: p.health.unhealthy_until_ms,
                keys: p.keys.into_iter().map(Into::into).collect(),
            })
            .collect();
        Ok(Response::new(proto::GetHealthResponse { providers }))
    }

    async fn enable_upstream_key(
        &self,
        request: Request<proto::EnableUpstreamKeyRequest>,
    ) -> Result<Response<proto::EnableUpstreamKeyResponse>, Status> {
        let r = request.into_inner();
        let n = self
            .gateway
            .enable_upstream_key(&r.provider, &r.hint)
            .map_err(admin_status)?;
        Ok(Response::new(proto::EnableUpstreamKeyResponse {
            enabled: n as u32,
        }))
    }

    async fn set_budget(
        &self,
        request: Request<proto::SetBudgetRequest>,
    ) -> Result<Response<proto::Budget>, Status> {
        super::budgets::set_budget(&self.gateway, request.into_inner())
            .await
            .map(Response::new)
            .map_err(admin_status)
    }

    async fn get_budget(
        &self,
        request: Request<proto::GetBudgetRequest>,
    ) -> Result<Response<proto::Budget>, Status> {
        super::budgets::get_budget(&self.gateway, request.into_inner())
            .await
            .map(Response::new)
            .map_err(admin_status)
    }

    async fn query_usage(
        &self,
        request: Request<proto::QueryUsageRequest>,
    ) -> Result<Response<proto::QueryUsageResponse>, Status> {
        super::budgets::query_usage(&self.gateway, request.into_inner())
            .await
            .map(Response::new)
            .map_err(admin_status)
    }
}
