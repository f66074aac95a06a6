//! Handles into the per-model series a finished request updates (`tollgate_chat_*` by
//! resolved model), found once a model and kept, so that recording an outcome is a few atomic
//! adds instead of a lookup of each series' labels.

use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, OnceLock, RwLock};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::histogram::Histogram;

use super::{CompletionLabels, Label, Metrics, ModelLabels, TokenLabels};
use crate::error::Outcome;

/// The series of one resolved model. Each is found the first time it is used, so a model
/// shows only the series it has had (as when every update looked its series up).
pub struct ModelSeries {
    model: Label,
    /// `tollgate_chat_completion_latency_seconds`, by outcome and by whether it streamed.
    latency: [[OnceLock<Histogram>; 2]; 4],
    ttft: OnceLock<Histogram>,
    prompt_tokens: OnceLock<Counter>,
    completion_tokens: OnceLock<Counter>,
    spend: OnceLock<Counter<f64, AtomicU64>>,
}

/// Which token count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenKind {
    Prompt,
    Completion,
}

impl ModelSeries {
    fn new(model: Label) -> Self {
        Self {
            model,
            latency: Default::default(),
            ttft: OnceLock::new(),
            prompt_tokens: OnceLock::new(),
            completion_tokens: OnceLock::new(),
            spend: OnceLock::new(),
        }
    }

    /// Its `tollgate_chat_completion_latency_seconds` series for `outcome` and `stream`.
    pub fn latency(&self, m: &Metrics, outcome: Outcome, stream: bool) -> &Histogram {
        let at = match outcome {
            Outcome::Success => 0,
            Outcome::Failure => 1,
            Outcome::Excluded => 2,
            Outcome::Abort => 3,
        };
        self.latency[at][usize::from(stream)].get_or_init(|| {
            m.chat_latency
                .get_or_create(&CompletionLabels {
                    model: self.model.clone(),
                    result: outcome.as_str(),
                    stream: if stream { "true" } else { "false" },
                })
                .clone()
        })
    }

    /// Its `tollgate_chat_ttft_seconds` series.
    pub fn ttft(&self, m: &Metrics) -> &Histogram {
        self.ttft
            .get_or_init(|| m.ttft.get_or_create(&self.labels()).clone())
    }

    /// Its `tollgate_chat_tokens_total` series of `kind`.
    pub fn tokens(&self, m: &Metrics, kind: TokenKind) -> &Counter {
        let (cell, name) = match kind {
            TokenKind::Prompt => (&self.prompt_tokens, "prompt"),
            TokenKind::Completion => (&self.completion_tokens, "completion"),
        };
        cell.get_or_init(|| {
            m.chat_tokens
                .get_or_create(&TokenLabels {
                    model: self.model.clone(),
                    r#type: name,
                })
                .clone()
        })
    }

    /// Its `tollgate_spend_usd_total` series.
    pub fn spend(&self, m: &Metrics) -> &Counter<f64, AtomicU64> {
        self.spend
            .get_or_init(|| m.spend_usd.get_or_create(&self.labels()).clone())
    }

    fn labels(&self) -> ModelLabels {
        ModelLabels {
            model: self.model.clone(),
        }
    }
}

/// The series of every model seen so far. Model labels are bounded (configured models, or
/// `unknown`), and so is this.
#[derive(Default)]
pub struct ModelSeriesCache(RwLock<HashMap<Label, Arc<ModelSeries>>>);

impl ModelSeriesCache {
    /// The series of `model`.
    pub fn get(&self, model: &Label) -> Arc<ModelSeries> {
        if let Some(s) = self.0.read().unwrap_or_else(|e| e.into_inner()).get(model) {
            return s.clone();
        }
        self.0
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .entry(model.clone())
            .or_insert_with(|| Arc::new(ModelSeries::new(model.clone())))
            .clone()
    }
}
