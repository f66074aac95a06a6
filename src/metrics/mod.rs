//! Every metric family (listed in docs/metrics.md), in one registry created once in `main`
//! and injected. Label values are bounded by the callers: models, service types and purposes
//! are collapsed to `unknown` unless configured.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

mod handles;
mod keys;
mod labels;
mod series;
pub use keys::Availability;
use keys::{Handles, ProviderName, Upstream};
pub use labels::*;
pub use series::{ModelSeries, ModelSeriesCache, TokenKind};

/// Labels of `tollgate_build_info`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: &'static str,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// The metric families, registered once.
pub struct Metrics {
    registry: Registry,
    pub chat_availability: Family<ChatLabels, Counter>,
    pub requests: Family<EndpointLabels, Counter>,
    pub in_progress: Family<EndpointLabels, Gauge>,
    pub response_status: Family<StatusLabels, Counter>,
    pub request_latency: HistogramFamily<EndpointLabels>,
    pub overhead: HistogramFamily<ProtocolLabels>,
    pub chat_latency: HistogramFamily<CompletionLabels>,
    pub ttft: HistogramFamily<ModelLabels>,
    pub chat_tokens: Family<TokenLabels, Counter>,
    /// USD spent, by resolved model (from `[pricing]`; exact to the micro-dollar).
    pub spend_usd: Family<ModelLabels, Counter<f64, std::sync::atomic::AtomicU64>>,
    pub trace_spans_dropped: Family<TraceDropLabels, Counter>,
    pub upstream_latency: HistogramFamily<UpstreamLabels>,
    pub key_pool_state: Family<KeyStateLabels, Gauge>,
    pub key_pool_transitions: Family<KeyEventLabels, Counter>,
    pub key_pool_exhaustions: Family<ExhaustionLabels, Counter>,
    pub key_pool_keys_tried: HistogramFamily<ProviderLabels>,
    pub alias_resolved: Family<AliasLabels, Counter>,
    pub fallback: Family<FallbackLabels, Counter>,
    pub provider_healthy: Family<ProviderLabels, Gauge>,
    pub config_reloads: Family<ResultLabels, Counter>,
    pub auth_latency: HistogramFamily<AuthLabels>,
    pub signups: Family<SignupLabels, Counter>,
    pub authorize: Family<AuthorizeLabels, Counter>,
    /// Budget writes to the store (reservations, lease grants and renewals, settlement
    /// batches, expiry releases): with leases, far fewer than requests.
    pub budget_store_writes: Family<BudgetWriteLabels, Counter>,
    /// Requests admitted without a rate-limit check because the rate-limit Redis failed
    /// (`on_redis_error = "fail_open"`).
    pub rate_limit_fail_open: Counter,
    /// The per-model series of the `chat_*` families, by resolved model label.
    pub models: ModelSeriesCache,
    /// Handles of the series every request updates, found by its label values
    /// (`handles::SeriesHandles`).
    handles: Handles,
}

/// Keys tried by one request.
fn keys_tried_buckets() -> Histogram {
    Histogram::new([1.0, 2.0, 3.0, 4.0, 5.0, 10.0])
}

/// Buckets for credential checks: 50 µs (cached key) to 10 s (a stalled verifier).
fn auth_buckets() -> Histogram {
    Histogram::new([
        0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
        1.0, 2.5, 5.0, 10.0,
    ])
}

/// Buckets for whole requests: 1 ms to about 9 minutes.
fn request_buckets() -> Histogram {
    Histogram::new([
        0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
        120.0, 300.0, 600.0,
    ])
}

/// Buckets for time spent inside tollgate: 10 µs to 1 s.
fn overhead_buckets() -> Histogram {
    Histogram::new([
        0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025,
        0.1, 1.0,
    ])
}

/// Buckets for completions and first tokens: 50 ms to 10 minutes.
fn completion_buckets() -> Histogram {
    Histogram::new([
        0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0,
    ])
}

impl Metrics {
    /// Counts a finished model request in `tollgate_chat_availability_total`.
    pub fn count_outcome(&self, labels: &Availability<'_>) {
        self.handles
            .availability
            .with(&self.chat_availability, labels, |c| {
                c.inc();
            });
    }

    /// Observes a request's time in tollgate itself (`tollgate_overhead_seconds`).
    pub fn observe_overhead(&self, protocol: &'static str, seconds: f64) {
        self.handles
            .overhead
            .with(&self.overhead, &ProtocolLabels { protocol }, |h| {
                h.observe(seconds)
            });
    }

    /// Counts a response's status (`tollgate_response_status_codes_total`).
    pub fn count_status(&self, protocol: &'static str, status_code: StatusCode) {
        let labels = StatusLabels {
            protocol,
            status_code,
        };
        self.handles
            .response_status
            .with(&self.response_status, &labels, |c| {
                c.inc();
            });
    }

    /// Observes an upstream call's latency (`tollgate_upstream_latency_seconds`).
    pub fn observe_upstream(&self, provider: &Label, status_class: &'static str, seconds: f64) {
        let key = Upstream {
            provider,
            status_class,
        };
        self.handles
            .upstream_latency
            .with(&self.upstream_latency, &key, |h| h.observe(seconds));
    }

    /// Observes a credential check (`tollgate_auth_latency_seconds`).
    pub fn observe_auth(&self, method: &'static str, result: &'static str, seconds: f64) {
        self.handles
            .auth_latency
            .with(&self.auth_latency, &AuthLabels { method, result }, |h| {
                h.observe(seconds)
            });
    }

    /// Creates and registers every family.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("tollgate");
        let m = Metrics {
            chat_availability: Family::default(),
            requests: Family::default(),
            in_progress: Family::default(),
            response_status: Family::default(),
            request_latency: Family::new_with_constructor(request_buckets),
            overhead: Family::new_with_constructor(overhead_buckets),
            chat_latency: Family::new_with_constructor(completion_buckets),
            ttft: Family::new_with_constructor(completion_buckets),
            chat_tokens: Family::default(),
            spend_usd: Family::default(),
            trace_spans_dropped: Family::default(),
            upstream_latency: Family::new_with_constructor(request_buckets),
            key_pool_state: Family::default(),
            key_pool_transitions: Family::default(),
            key_pool_exhaustions: Family::default(),
            key_pool_keys_tried: Family::new_with_constructor(keys_tried_buckets),
            alias_resolved: Family::default(),
            fallback: Family::default(),
            provider_healthy: Family::default(),
            config_reloads: Family::default(),
            auth_latency: Family::new_with_constructor(auth_buckets),
            signups: Family::default(),
            authorize: Family::default(),
            budget_store_writes: Family::default(),
            rate_limit_fail_open: Counter::default(),
            models: ModelSeriesCache::default(),
            handles: Handles::default(),
            registry: Registry::default(),
        };
        registry.register(
            "chat_availability",
            "Chat requests by outcome and reason, counted exactly once each; availability = success / (success + failure)",
            m.chat_availability.clone(),
        );
        registry.register(
            "requests",
            "Requests received, by protocol and endpoint",
            m.requests.clone(),
        );
        registry.register(
            "in_progress_requests",
            "Requests being served now, by protocol and endpoint",
            m.in_progress.clone(),
        );
        registry.register(
            "response_status_codes",
            "Responses by protocol and status code (HTTP number or gRPC code name)",
            m.response_status.clone(),
        );
        registry.register(
            "request_latency_seconds",
            "Time from request to the end of the response, by protocol and endpoint",
            m.request_latency.clone(),
        );
        registry.register(
            "overhead_seconds",
            "Time spent in tollgate itself: request time minus time waiting on the upstream",
            m.overhead.clone(),
        );
        registry.register(
            "chat_completion_latency_seconds",
            "Whole chat completions by resolved model, result and streaming",
            m.chat_latency.clone(),
        );
        registry.register(
            "chat_completion_ttft_seconds",
            "Time to the first streamed token, by resolved model",
            m.ttft.clone(),
        );
        registry.register(
            "chat_tokens",
            "Tokens by resolved model and type (prompt, completion)",
            m.chat_tokens.clone(),
        );
        registry.register(
            "spend_usd",
            "USD spent on chat completions, by resolved provider/model (from [pricing])",
            m.spend_usd.clone(),
        );
        registry.register(
            "trace_spans_dropped",
            "Trace spans not exported: the export queue was full, or the collector failed",
            m.trace_spans_dropped.clone(),
        );
        registry.register(
            "upstream_request_latency_seconds",
            "Upstream calls by provider and status class, to the response head",
            m.upstream_latency.clone(),
        );
        registry.register(
            "key_pool_state",
            "Upstream keys per provider and state (valid, temporary, permanent), read at scrape time",
            m.key_pool_state.clone(),
        );
        registry.register(
            "key_pool_state_transitions",
            "Upstream keys leaving valid, by provider and reason (rate_limited, unauthorized, forbidden)",
            m.key_pool_transitions.clone(),
        );
        registry.register(
            "key_pool_exhaustions",
            "Requests that found no usable upstream key, by provider and outcome (rate_limited, auth_failed)",
            m.key_pool_exhaustions.clone(),
        );
        registry.register(
            "key_pool_keys_tried",
            "Upstream keys tried by one request, by provider",
            m.key_pool_keys_tried.clone(),
        );
        registry.register(
            "alias_resolved",
            "Requests for an alias, by alias and the chain entry that answered",
            m.alias_resolved.clone(),
        );
        registry.register(
            "fallback",
            "Moves from one chain entry to the next, by from_model, to_model and reason",
            m.fallback.clone(),
        );
        registry.register(
            "provider_healthy",
            "1 when a provider is taking requests, 0 while it is marked unhealthy",
            m.provider_healthy.clone(),
        );
        registry.register(
            "config_reloads",
            "Configuration reloads by result (success, failure)",
            m.config_reloads.clone(),
        );
        registry.register(
            "auth_latency_seconds",
            "Credential verification time by method and result (success, rejected, failure)",
            m.auth_latency.clone(),
        );
        registry.register(
            "signups",
            "Users provisioned on first sight, by auth method",
            m.signups.clone(),
        );
        registry.register(
            "authorize",
            "Authorize calls (not chat requests), by protocol and result reason",
            m.authorize.clone(),
        );
        registry.register(
            "budget_store_writes",
            "Budget writes to the store by kind: reserve, lease, settle, fix, release",
            m.budget_store_writes.clone(),
        );
        registry.register(
            "rate_limit_fail_open",
            "Requests admitted without a rate-limit check because the rate-limit Redis failed (on_redis_error = fail_open)",
            m.rate_limit_fail_open.clone(),
        );
        // Both results exist from the start, so that a failure rate can be computed at once.
        for result in ["success", "failure"] {
            let _ = m.config_reloads.get_or_create(&ResultLabels { result });
        }
        let build_info: Family<BuildLabels, Gauge> = Family::default();
        build_info
            .get_or_create(&BuildLabels {
                version: env!("CARGO_PKG_VERSION"),
            })
            .set(1);
        registry.register("build_info", "The running build; always 1", build_info);
        #[cfg(feature = "alloc-count")]
        registry.register_collector(Box::new(crate::alloc_count::AllocationCollector));
        Metrics { registry, ..m }
    }

    /// The Prometheus text exposition of every family.
    pub fn encode(&self) -> String {
        let mut out = String::with_capacity(16 * 1024);
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::error!(error = %e, "metrics encoding failed");
        }
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl crate::providers::KeyPoolObserver for Metrics {
    fn transition(&self, provider: &str, reason: crate::providers::key_pool::TransitionReason) {
        self.key_pool_transitions
            .get_or_create(&KeyEventLabels {
                provider: provider.to_string(),
                reason: reason.as_str(),
            })
            .inc();
    }

    fn exhausted(&self, provider: &str, outcome: crate::providers::key_pool::ExhaustionOutcome) {
        self.key_pool_exhaustions
            .get_or_create(&ExhaustionLabels {
                provider: provider.to_string(),
                outcome: outcome.as_str(),
            })
            .inc();
    }

    fn keys_tried(&self, provider: &str, tried: usize) {
        self.handles
            .keys_tried
            .with(&self.key_pool_keys_tried, &ProviderName(provider), |h| {
                h.observe(tried as f64)
            });
    }
}

impl crate::routing::health::HealthListener for Metrics {
    fn health_changed(&self, provider: &str, healthy: bool) {
        self.provider_healthy
            .get_or_create(&ProviderLabels {
                provider: provider.to_string(),
            })
            .set(i64::from(healthy));
    }
}
