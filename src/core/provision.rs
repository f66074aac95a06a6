//! Provisioning: a token identity seen for the first time gets a user row, within its service
//! type's signup cap. Known identities are cached briefly (`auth.identity_cache_ttl_ms`), which
//! also bounds how long a block made on another replica takes to bite.

use std::time::Duration;

use super::auth::{ExternalIdentity, Identity};
use super::ttl_cache::{Cached, Load, TtlCache};
use super::{Reason, Rejection};
use crate::store::{Provisioned, SignupCap, Store, User};

/// Finds or creates the user of a token identity.
pub struct Provisioner {
    store: Store,
    ttl_ms: u64,
    cache: TtlCache<String, Identity>,
}

/// A provisioned identity, and whether its user was created by this request.
pub struct ProvisionedIdentity {
    pub identity: Identity,
    pub created: bool,
}

impl Provisioner {
    /// A provisioner over `store`, trusting a known identity's row for `ttl`.
    pub fn new(store: Store, ttl: Duration) -> Self {
        Self {
            cache: TtlCache::new(store.clock().clone()),
            store,
            ttl_ms: ttl.as_millis().min(u64::MAX as u128) as u64,
        }
    }

    /// The user of `ext`, created under `cap` for `service_type` if it is new.
    pub async fn provision(
        &self,
        ext: &ExternalIdentity,
        service_type: &str,
        cap: SignupCap,
        now_ms: i64,
    ) -> Result<ProvisionedIdentity, Rejection> {
        let load = match self.cache.lookup(ext.external_id.as_str(), self.ttl_ms) {
            Cached::Fresh(identity) => {
                return Ok(ProvisionedIdentity {
                    identity,
                    created: false,
                })
            }
            Cached::Refresh(identity, load) => {
                self.refresh(ext.clone(), load);
                return Ok(ProvisionedIdentity {
                    identity,
                    created: false,
                });
            }
            Cached::Missing(load) => load,
        };
        // Boxed: the store call's future is kilobytes, copied with every future that holds
        // this one, on every request, though a cached identity never reaches it.
        Box::pin(self.provision_now(ext, service_type, cap, now_ms, load)).await
    }

    /// Finds or creates the user of an identity the cache does not hold, and caches it.
    async fn provision_now(
        &self,
        ext: &ExternalIdentity,
        service_type: &str,
        cap: SignupCap,
        now_ms: i64,
        load: Load,
    ) -> Result<ProvisionedIdentity, Rejection> {
        let provisioned = self
            .store
            .provision_user(
                &ext.external_id,
                ext.method.as_str(),
                service_type,
                cap,
                now_ms,
            )
            .await
            .map_err(|e| {
                tracing::warn!(error = %e, "provisioning failed");
                Rejection::new(
                    Reason::ProvisioningFailure,
                    "the user store is unavailable; try again",
                )
            })?;
        let (user, created) = match provisioned {
            Provisioned::Existing(u) => (u, false),
            Provisioned::Created(u) => (u, true),
            Provisioned::CapExceeded => {
                return Err(Rejection::new(
                    Reason::SignupCapExceeded,
                    format!(
                        "no new users are accepted for service type `{service_type}` right now"
                    ),
                ))
            }
        };
        let identity = identity_of(user, ext);
        self.cache
            .insert(ext.external_id.clone(), identity.clone(), load, self.ttl_ms);
        Ok(ProvisionedIdentity { identity, created })
    }

    /// Reads a known identity's user again in the background, while requests are served the
    /// cached one (a user gone from the store leaves the cache, and is provisioned anew).
    fn refresh(&self, ext: ExternalIdentity, load: Load) {
        let (store, cache, ttl_ms) = (self.store.clone(), self.cache.clone(), self.ttl_ms);
        let key = ext.external_id.clone();
        let reload = async move {
            match store.find_user(&ext.external_id).await? {
                Some(user) => {
                    let identity = identity_of(user, &ext);
                    cache.insert(ext.external_id, identity, load, ttl_ms);
                }
                None => cache.evict(ext.external_id.as_str()),
            }
            Ok::<_, crate::store::StoreError>(())
        };
        self.cache
            .renew(key, "refreshing a provisioned identity failed", reload);
    }

    /// Forgets cached identities (after a block or unblock in this process).
    pub fn forget_all(&self) {
        self.cache.clear();
    }
}

fn identity_of(user: User, ext: &ExternalIdentity) -> Identity {
    Identity {
        user_id: user.id,
        external_id: user.external_id.into(),
        method: ext.method,
        key_id: None,
        blocked: user.blocked,
        user_service_type: user.service_type.map(Into::into),
    }
}
