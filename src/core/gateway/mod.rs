//! `Gateway`: the one struct both protocol adapters call. A model request (chat here,
//! embeddings in `embed.rs`) runs authorize -> route -> upstream -> settle, under an
//! [`OutcomeGuard`](super::outcome::OutcomeGuard).

use std::collections::HashSet;
use std::sync::{Arc, RwLock};
use std::time::Duration;

mod admit;
mod authenticate;
mod call;
mod chat;

pub(super) use admit::{admit, open_record};
use admit::{check_blocked, check_model_allowed, label_safe};
pub(in crate::core) use call::{Admitted, OpenCall};
pub use chat::{ChatCall, ChatCompletion, ChatReply};

use super::admin::{verify_admin_token, Admin, AdminError, LocalCaches};
use super::auth::{Authenticator, Identity, Verifiers};
use super::dispatch::Dispatch;
use super::ledger::Ledger;
use super::outcome::Recorder;
use super::provision::Provisioner;
use super::{CallContext, Rejection};
use crate::api::{Api, ChatRequest};
use crate::config::{Config, Overrides};
use crate::metrics::{Label, Metrics};
use crate::providers::key_pool::KeySnapshot;
use crate::routing::{model_allowed, ProviderDeps, Router};
use crate::store::Store;

/// What a configuration becomes at run time; swapped whole on reload so that a request keeps
/// the one it started with.
pub struct Runtime {
    pub config: Arc<Config>,
    pub router: Router,
    /// Token verifiers of `[auth.jwt]` and `[auth.introspection]`.
    pub verifiers: Verifiers,
    /// `[pricing]` in integer pico-dollars per token.
    pub pricing: Arc<super::pricing::Pricing>,
    /// Purposes and service types configured, as the labels they are counted under.
    known_purposes: HashSet<Label>,
    service_types: HashSet<Label>,
}

impl Runtime {
    /// Builds providers and routes from a validated configuration.
    pub fn new(config: Config, deps: &ProviderDeps) -> Result<Runtime, String> {
        let router = Router::from_config(&config, deps)?;
        let known_purposes = config
            .service_types
            .values()
            .flat_map(|s| s.purposes.iter().map(|p| Label::from(p.as_str())))
            .collect();
        let mut service_types: HashSet<Label> = config
            .service_types
            .keys()
            .map(|s| Label::from(s.as_str()))
            .collect();
        // With none configured, the default is served by an implicit one.
        if config.service_types.is_empty() {
            service_types.insert(Label::from(config.server.default_service_type.as_str()));
        }
        let verifiers = Verifiers::from_config(&config.auth, deps.clock.clone());
        let pricing = Arc::new(super::pricing::Pricing::from_config(&config));
        Ok(Runtime {
            config: Arc::new(config),
            router,
            verifiers,
            pricing,
            known_purposes,
            service_types,
        })
    }
}

/// Who is calling and what they may do, after authentication.
#[derive(Debug, Clone)]
pub struct Principal {
    pub identity: Identity,
    pub service_type: String,
    pub purpose: Option<String>,
    /// The service type's `models` (config), shared.
    pub allowed_models: std::sync::Arc<[String]>,
    /// What the tightest budget leaves this period, in micro-dollars; set by `authorize`
    /// (`None`: no budget applies, or not asked).
    pub remaining_budget_micros: Option<i64>,
}

/// One provider as operators see it.
#[derive(Debug, Clone)]
pub struct ProviderStatus {
    pub provider: String,
    pub health: crate::routing::health::HealthSnapshot,
    pub keys: Vec<KeySnapshot>,
}

/// A model or alias a caller may use.
#[derive(Debug, Clone)]
pub struct ModelEntry {
    pub id: String,
    pub alias: bool,
    pub owned_by: String,
    pub description: String,
    pub chain: Vec<String>,
    /// The inbound APIs it serves (every target of an alias must serve one for the alias to).
    pub apis: Vec<Api>,
}

/// Where a reload reads the configuration from.
#[derive(Debug, Clone)]
pub struct ConfigSource {
    pub path: std::path::PathBuf,
    pub overrides: Overrides,
}

/// The parts of the core that outlive a configuration.
pub struct GatewayParts {
    pub store: Store,
    pub metrics: Arc<Metrics>,
    pub ledger: Ledger,
    pub deps: ProviderDeps,
    /// `None`: no file to reload from (embedded use).
    pub source: Option<ConfigSource>,
    /// Where spans go ([`Tracer::disabled`](super::trace::Tracer::disabled) for none).
    pub tracer: super::trace::Tracer,
}

/// The core, shared by both adapters.
pub struct Gateway {
    runtime: RwLock<Arc<Runtime>>,
    store: Store,
    auth: Arc<Authenticator>,
    provisioner: Arc<Provisioner>,
    admin: Admin,
    recorder: Recorder,
    deps: ProviderDeps,
    source: Option<ConfigSource>,
    /// One reload at a time, so that two cannot interleave their swaps.
    reloading: tokio::sync::Mutex<()>,
}

impl Gateway {
    /// Builds the core over a connected store, a registry and a ledger writer.
    pub fn new(runtime: Runtime, parts: GatewayParts) -> Gateway {
        let ttl = Duration::from_millis(runtime.config.auth.key_cache_ttl_ms);
        let identity_ttl = Duration::from_millis(runtime.config.auth.identity_cache_ttl_ms);
        let access = runtime.config.log.access;
        let budgets = super::policy::Budgets::start(
            parts.store.clone(),
            parts.deps.clock.clone(),
            &runtime.config.budgets,
            parts.metrics.budget_store_writes.clone(),
            &runtime.config.rate_limits,
            parts.metrics.rate_limit_fail_open.clone(),
        );
        let auth = Arc::new(Authenticator::new(parts.store.clone(), ttl));
        let provisioner = Arc::new(Provisioner::new(parts.store.clone(), identity_ttl));
        let admin = Admin::serving(
            parts.store.clone(),
            LocalCaches {
                auth: auth.clone(),
                provisioner: provisioner.clone(),
                budgets: budgets.clone(),
            },
        );
        Gateway {
            runtime: RwLock::new(Arc::new(runtime)),
            auth,
            provisioner,
            admin,
            store: parts.store,
            recorder: Recorder {
                metrics: parts.metrics,
                ledger: parts.ledger,
                budgets,
                clock: parts.deps.clock.clone(),
                access_log: Arc::new(std::sync::atomic::AtomicBool::new(access)),
                tracer: parts.tracer,
                lifecycle: crate::core::lifecycle::Lifecycle::new(),
            },
            deps: parts.deps,
            source: parts.source,
            reloading: tokio::sync::Mutex::new(()),
        }
    }

    /// Re-reads the configuration file and swaps providers, aliases, pricing, service types
    /// and limits at once. On any error the running configuration stays; the failure is logged
    /// and counted. Requests in flight finish on the configuration they started with.
    pub async fn reload(&self) -> Result<(), String> {
        let result = match &self.source {
            None => Err("no configuration file to reload from".to_string()),
            Some(source) => match Config::load(&source.path) {
                Ok(mut config) => {
                    config.apply(&source.overrides);
                    match config.validate() {
                        Ok(()) => self.apply_config(config).await,
                        Err(e) => Err(e.to_string()),
                    }
                }
                Err(e) => Err(format!("{}: {e}", source.path.display())),
            },
        };
        let label = if result.is_ok() { "success" } else { "failure" };
        self.recorder
            .metrics
            .config_reloads
            .get_or_create(&crate::metrics::ResultLabels { result: label })
            .inc();
        match &result {
            Ok(()) => tracing::info!("configuration reloaded"),
            Err(e) => {
                tracing::error!(error = %e, "configuration reload failed; the previous configuration stays")
            }
        }
        result
    }

    async fn apply_config(&self, config: Config) -> Result<(), String> {
        let _one_at_a_time = self.reloading.lock().await;
        let old = self.runtime();
        if config.server.http_addr != old.config.server.http_addr
            || config.server.grpc_addr != old.config.server.grpc_addr
            || config.database.url != old.config.database.url
        {
            tracing::warn!("listen addresses and the database URL change only on restart");
        }
        if config.rate_limits != old.config.rate_limits {
            tracing::warn!("[rate_limits] (the backend and its Redis) changes only on restart");
        }
        self.admin
            .sync_static_keys(&config.auth.static_keys)
            .await
            .map_err(|e| format!("cannot store static keys: {e}"))?;
        let access = config.log.access;
        let runtime = Runtime::new(config, &self.deps)?;
        runtime.router.inherit(&old.router);
        self.recorder
            .access_log
            .store(access, std::sync::atomic::Ordering::Relaxed);
        match self.runtime.write() {
            Ok(mut r) => *r = Arc::new(runtime),
            Err(poisoned) => *poisoned.into_inner() = Arc::new(runtime),
        }
        self.auth.forget_all();
        Ok(())
    }

    /// The configuration in force.
    pub fn runtime(&self) -> Arc<Runtime> {
        match self.runtime.read() {
            Ok(r) => r.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// The metrics registry.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.recorder.metrics
    }

    /// The store.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// At shutdown: hands this replica's budget leases back and waits until every ledger row
    /// and settlement recorded so far is written.
    /// Exports the spans still queued (at shutdown).
    pub async fn flush_traces(&self) {
        self.recorder.tracer.flush().await;
    }

    pub async fn flush_ledger(&self) {
        self.recorder.ledger.flush().await;
        // At shutdown: this replica's leases go back to their budgets, not after their TTL.
        self.recorder.budgets.release_leases();
        self.recorder.budgets.flush().await;
    }

    /// Budgets and rate limits.
    pub fn budgets(&self) -> &Arc<super::policy::Budgets> {
        &self.recorder.budgets
    }

    /// Shutdown has begun: readiness answers 503 from now on, requests are still served.
    pub fn start_draining(&self) {
        self.recorder.lifecycle.start_draining();
    }

    /// Whether shutdown has begun.
    pub fn draining(&self) -> bool {
        self.recorder.lifecycle.is_draining()
    }

    /// The grace period is over: streams still running end with an error event and record
    /// their outcome and usage.
    pub fn cut_streams(&self) {
        self.recorder.lifecycle.cut_streams();
    }

    /// Whether the store answers (readiness).
    pub async fn ready(&self) -> bool {
        tokio::time::timeout(Duration::from_secs(2), self.store.ping())
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// Readiness of the rate-limit Redis: `None` without one (`backend = "local"`), else
    /// whether it answers a PING and whether this replica refuses requests while it does not.
    pub async fn redis_ready(&self) -> Option<(bool, bool)> {
        let limiter = self.recorder.budgets.rate_limiter();
        Some((limiter.redis_ready().await?, limiter.fails_closed()))
    }

    /// Every provider's health and upstream keys (masked), by name.
    pub fn provider_status(&self) -> Vec<ProviderStatus> {
        let rt = self.runtime();
        let mut out: Vec<ProviderStatus> = rt
            .router
            .providers()
            .map(|p| ProviderStatus {
                provider: p.name.clone(),
                health: p.health.snapshot(),
                keys: p
                    .client
                    .key_pool()
                    .map(|k| k.snapshot())
                    .unwrap_or_default(),
            })
            .collect();
        out.sort_by(|a, b| a.provider.cmp(&b.provider));
        out
    }

    /// Makes a provider's key (by hint) valid again; returns how many keys had that hint.
    pub fn enable_upstream_key(&self, provider: &str, hint: &str) -> Result<usize, AdminError> {
        let rt = self.runtime();
        let pool = rt
            .router
            .providers()
            .find(|p| p.name == provider)
            .and_then(|p| p.client.key_pool())
            .ok_or_else(|| {
                AdminError::NotFound(format!("provider `{}` with keys", label_safe(provider)))
            })?;
        match pool.enable(hint) {
            0 => Err(AdminError::NotFound(format!(
                "key `{}` of provider `{provider}`",
                label_safe(hint)
            ))),
            n => Ok(n),
        }
    }

    /// The admin service (users, keys, budgets, usage); the caller has checked the admin
    /// token.
    pub fn admin(&self) -> &Admin {
        &self.admin
    }

    /// The budget left to a principal: the least of what its user's and its key's budgets
    /// have left in their current periods, in micro-dollars (`None` when no budget applies to
    /// it). Reserves nothing; for `AuthorizeResponse.principal.remaining_budget_micros`.
    pub async fn remaining_budget(&self, principal: &Principal) -> Result<Option<i64>, Rejection> {
        let rt = self.runtime();
        let st = rt.config.service_type(&principal.service_type);
        self.budgets()
            .remaining(principal, st, &rt.config.budgets)
            .await
            .map_err(|e| crate::core::policy::store_failed("budget lookup", e))
    }

    /// Checks an admin token.
    pub fn check_admin(&self, authorization: Option<&str>) -> Result<(), AdminError> {
        let rt = self.runtime();
        verify_admin_token(rt.config.server.admin_token.as_deref(), authorization)
    }

    /// Sets the gauges that are read at scrape time.
    pub fn refresh_scrape_gauges(&self) {
        let rt = self.runtime();
        let metrics = &self.recorder.metrics;
        metrics.provider_healthy.clear();
        for p in rt.router.providers() {
            metrics
                .provider_healthy
                .get_or_create(&crate::metrics::ProviderLabels {
                    provider: p.name.clone(),
                })
                .set(i64::from(p.health.is_healthy()));
        }
        let family = &metrics.key_pool_state;
        family.clear();
        for p in rt.router.providers() {
            let Some(pool) = p.client.key_pool().filter(|k| !k.is_keyless()) else {
                continue;
            };
            for (state, n) in pool.state_counts() {
                family
                    .get_or_create(&crate::metrics::KeyStateLabels {
                        provider: p.name.clone(),
                        state: state.as_str(),
                    })
                    .set(n as i64);
            }
        }
    }

    /// Authenticates a caller and, if `model` is given, checks it may use that model.
    pub async fn authorize(
        &self,
        ctx: &CallContext,
        model: Option<&str>,
    ) -> Result<Principal, Rejection> {
        let rt = self.runtime();
        let result: Result<Principal, Rejection> = async {
            let mut principal = self.authenticate(&rt, ctx, &mut None).await?;
            check_blocked(&principal)?;
            if let Some(model) = model.filter(|m| !m.is_empty()) {
                rt.router.resolve(model)?;
                check_model_allowed(&principal, model)?;
            }
            // Reported, not enforced: a free model still works with nothing left.
            principal.remaining_budget_micros = self.remaining_budget(&principal).await?;
            Ok(principal)
        }
        .await;
        // Not a chat request: counted apart from the availability signal.
        self.recorder
            .metrics
            .authorize
            .get_or_create(&crate::metrics::AuthorizeLabels {
                protocol: ctx.protocol.as_str(),
                result: match &result {
                    Ok(_) => "success",
                    Err(e) => e.reason.as_str(),
                },
            })
            .inc();
        result
    }

    /// The models and aliases this caller may use.
    pub async fn list_models(&self, ctx: &CallContext) -> Result<Vec<ModelEntry>, Rejection> {
        let rt = self.runtime();
        let principal = self.authenticate(&rt, ctx, &mut None).await?;
        check_blocked(&principal)?;
        let mut out = Vec::new();
        for (name, alias) in rt.router.aliases() {
            if model_allowed(&principal.allowed_models, name) {
                out.push(ModelEntry {
                    id: name.clone(),
                    alias: true,
                    owned_by: "tollgate".into(),
                    description: alias.description.clone(),
                    chain: alias.chain.clone(),
                    apis: served_apis(&rt, name),
                });
            }
        }
        for model in rt.router.listed_models() {
            if model_allowed(&principal.allowed_models, &model) {
                let owned_by = model
                    .split_once('/')
                    .map(|(p, _)| p.to_string())
                    .unwrap_or_default();
                out.push(ModelEntry {
                    apis: served_apis(&rt, &model),
                    id: model,
                    alias: false,
                    owned_by,
                    description: String::new(),
                    chain: Vec::new(),
                });
            }
        }
        Ok(out)
    }

    /// Opens a chat request: from here on exactly one outcome will be recorded for it.
    pub fn chat(self: &Arc<Self>, ctx: CallContext) -> ChatCall {
        self.model_call(ctx, Api::ChatCompletions)
    }

    /// Opens a model request that came in on `api` (`Gateway::chat` is chat completions).
    pub fn model_call(self: &Arc<Self>, ctx: CallContext, api: Api) -> ChatCall {
        ChatCall(self.open_call(ctx, api))
    }

    /// The input tokens of a request (`/v1/messages/count_tokens`): authenticated and checked
    /// like a model request (blocked, model known and allowed) but not one (no outcome, no
    /// budget, no ledger row). `decoded` is the adapter's decoding of the body.
    pub async fn count_tokens(
        &self,
        ctx: &CallContext,
        decoded: Result<ChatRequest, Rejection>,
    ) -> Result<u64, Rejection> {
        let rt = self.runtime();
        let req = decoded?;
        let principal = self.authenticate(&rt, ctx, &mut None).await?;
        check_blocked(&principal)?;
        let route = rt.router.resolve(&req.model)?;
        check_model_allowed(&principal, &req.model)?;
        Dispatch {
            gateway: self,
            request_id: &ctx.request_id,
        }
        .count_tokens(&route, &req)
        .await
    }

    /// Opens an embeddings request: from here on exactly one outcome will be recorded for it.
    pub fn embed(self: &Arc<Self>, ctx: CallContext) -> super::embed::EmbeddingsCall {
        super::embed::EmbeddingsCall(self.open_call(ctx, Api::Embeddings))
    }
}

/// The inbound APIs a model or alias serves. Every kind serves the chat-shaped APIs (chat
/// completions, Messages and Responses are translated where a kind does not speak them);
/// embeddings need every target's provider to embed, as a chain stops at one that cannot.
fn served_apis(rt: &Runtime, name: &str) -> Vec<Api> {
    let mut apis = vec![Api::ChatCompletions, Api::Messages, Api::Responses];
    let embeds = rt.router.resolve(name).is_ok_and(|route| {
        route
            .targets
            .iter()
            .all(|t| t.provider.client.capabilities(&t.model).embeddings)
    });
    if embeds {
        apis.push(Api::Embeddings);
    }
    apis
}
