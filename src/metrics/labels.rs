//! The label sets of the metric families (docs/metrics.md).

use std::sync::{Arc, LazyLock};

use prometheus_client::encoding::EncodeLabelSet;

/// A label value computed once (at load, from the configuration) and shared: setting it on a
/// request's labels is a reference count, not an allocation.
pub type Label = Arc<str>;

/// The `unknown` label value (a model, service type or purpose not configured).
pub fn unknown_label() -> Label {
    static UNKNOWN: LazyLock<Label> = LazyLock::new(|| Arc::from("unknown"));
    UNKNOWN.clone()
}

/// The `none` label value (no purpose given).
pub fn none_label() -> Label {
    static NONE: LazyLock<Label> = LazyLock::new(|| Arc::from("none"));
    NONE.clone()
}

/// Labels of `tollgate_chat_availability_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ChatLabels {
    pub protocol: &'static str,
    /// The inbound API: `chat_completions`, `messages`.
    pub api: &'static str,
    pub outcome: &'static str,
    pub reason: &'static str,
    pub model: Label,
    pub service_type: Label,
    pub purpose: Label,
}

/// Labels of per-endpoint request metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EndpointLabels {
    pub protocol: &'static str,
    /// The route template (HTTP) or method path (gRPC); `unmatched` / `unknown` otherwise.
    pub endpoint: Label,
}

/// Labels of `tollgate_response_status_codes_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StatusLabels {
    pub protocol: &'static str,
    pub status_code: StatusCode,
}

/// The `status_code` label: an HTTP status as its number, or a gRPC code by name
/// (`OK`, `CANCELLED`); set without formatting a string for every request.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum StatusCode {
    Http(u16),
    Grpc(&'static str),
}

impl prometheus_client::encoding::EncodeLabelValue for StatusCode {
    fn encode(
        &self,
        encoder: &mut prometheus_client::encoding::LabelValueEncoder,
    ) -> Result<(), std::fmt::Error> {
        match self {
            StatusCode::Http(code) => code.encode(encoder),
            StatusCode::Grpc(name) => name.encode(encoder),
        }
    }
}

/// A protocol label alone.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProtocolLabels {
    pub protocol: &'static str,
}

/// Labels of `tollgate_chat_completion_latency_seconds`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CompletionLabels {
    pub model: Label,
    pub result: &'static str,
    pub stream: &'static str,
}

/// A model label alone.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModelLabels {
    pub model: Label,
}

/// Labels of `tollgate_chat_tokens_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TokenLabels {
    pub model: Label,
    pub r#type: &'static str,
}

/// Labels of `tollgate_upstream_request_latency_seconds`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UpstreamLabels {
    pub provider: Label,
    pub status_class: &'static str,
}

/// Labels of `tollgate_key_pool_state`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KeyStateLabels {
    pub provider: String,
    pub state: &'static str,
}

/// A provider and a reason or outcome.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KeyEventLabels {
    pub provider: String,
    pub reason: &'static str,
}

/// Labels of `tollgate_key_pool_exhaustions_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ExhaustionLabels {
    pub provider: String,
    pub outcome: &'static str,
}

/// A provider label alone.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProviderLabels {
    pub provider: String,
}

/// Labels of `tollgate_alias_resolved_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AliasLabels {
    pub alias: String,
    pub target: String,
}

/// Labels of `tollgate_fallback_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FallbackLabels {
    pub from_model: String,
    pub to_model: String,
    pub reason: &'static str,
}

/// A result label alone.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: &'static str,
}

/// Labels of `tollgate_auth_latency_seconds`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AuthLabels {
    /// api_key, static_key, jwt, introspection, or none (no usable credential).
    pub method: &'static str,
    /// success, rejected or failure.
    pub result: &'static str,
}

/// Labels of `tollgate_signups_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SignupLabels {
    pub auth_method: &'static str,
}

/// Labels of `tollgate_authorize_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AuthorizeLabels {
    pub protocol: &'static str,
    /// The reason string (`success` when authorized).
    pub result: &'static str,
}

/// Labels of `tollgate_trace_spans_dropped_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TraceDropLabels {
    /// `queue_full` or `export_failed`.
    pub reason: &'static str,
}

/// Labels of `tollgate_budget_store_writes_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BudgetWriteLabels {
    /// `reserve` (a request's own reservation), `lease` (a lease granted, grown or renewed),
    /// `settle` (a settlement batch), `fix` (a budget row created, synced or rolled over) or
    /// `release` (expired reservations released).
    pub kind: &'static str,
}
