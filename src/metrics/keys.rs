//! The label values of the series every request updates, as the request holds them: the keys
//! its `SeriesHandles` find those series by.

use std::sync::Arc;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::histogram::Histogram;

use super::handles::{self_keyed, SeriesHandles, SeriesKey};
use super::labels::*;

/// The series handles of the families every request updates.
#[derive(Default)]
pub(super) struct Handles {
    pub(super) availability: SeriesHandles<ChatLabels, Counter>,
    pub(super) overhead: SeriesHandles<ProtocolLabels, Histogram>,
    pub(super) response_status: SeriesHandles<StatusLabels, Counter>,
    pub(super) upstream_latency: SeriesHandles<UpstreamLabels, Histogram>,
    pub(super) auth_latency: SeriesHandles<AuthLabels, Histogram>,
    pub(super) keys_tried: SeriesHandles<ProviderLabels, Histogram>,
}

self_keyed!(ProtocolLabels, StatusLabels, AuthLabels);

/// A finished request's `tollgate_chat_availability_total` labels, as its record holds them.
pub struct Availability<'a> {
    pub protocol: &'static str,
    pub api: &'static str,
    pub outcome: &'static str,
    pub reason: &'static str,
    pub model: &'a Label,
    pub service_type: &'a Label,
    pub purpose: &'a Label,
}

/// The same label value: most often the very same `Arc`, as both came from the configuration.
fn same(a: &Label, b: &Label) -> bool {
    Arc::ptr_eq(a, b) || a == b
}

impl SeriesKey for Availability<'_> {
    type Labels = ChatLabels;
    fn hash_into(&self, h: &mut rustc_hash::FxHasher) {
        use std::hash::Hash;
        (self.protocol, self.api, self.outcome, self.reason).hash(h);
        (&**self.model, &**self.service_type, &**self.purpose).hash(h);
    }
    fn matches(&self, l: &ChatLabels) -> bool {
        l.reason == self.reason
            && l.outcome == self.outcome
            && l.api == self.api
            && l.protocol == self.protocol
            && same(&l.model, self.model)
            && same(&l.service_type, self.service_type)
            && same(&l.purpose, self.purpose)
    }
    fn labels(&self) -> ChatLabels {
        ChatLabels {
            protocol: self.protocol,
            api: self.api,
            outcome: self.outcome,
            reason: self.reason,
            model: self.model.clone(),
            service_type: self.service_type.clone(),
            purpose: self.purpose.clone(),
        }
    }
}

/// An upstream call's `tollgate_upstream_latency_seconds` labels.
pub(super) struct Upstream<'a> {
    pub(super) provider: &'a Label,
    pub(super) status_class: &'static str,
}

impl SeriesKey for Upstream<'_> {
    type Labels = UpstreamLabels;
    fn hash_into(&self, h: &mut rustc_hash::FxHasher) {
        std::hash::Hash::hash(&(&**self.provider, self.status_class), h)
    }
    fn matches(&self, l: &UpstreamLabels) -> bool {
        l.status_class == self.status_class && same(&l.provider, self.provider)
    }
    fn labels(&self) -> UpstreamLabels {
        UpstreamLabels {
            provider: self.provider.clone(),
            status_class: self.status_class,
        }
    }
}

/// A provider's name, for the families labelled by it alone.
pub(super) struct ProviderName<'a>(pub(super) &'a str);

impl SeriesKey for ProviderName<'_> {
    type Labels = ProviderLabels;
    fn hash_into(&self, h: &mut rustc_hash::FxHasher) {
        std::hash::Hash::hash(self.0, h)
    }
    fn matches(&self, l: &ProviderLabels) -> bool {
        l.provider == self.0
    }
    fn labels(&self) -> ProviderLabels {
        ProviderLabels {
            provider: self.0.to_string(),
        }
    }
}
