//! Provider health: consecutive retryable failures past a threshold mark a provider unhealthy
//! for a backoff that doubles on repeated trips; a success marks it healthy. State is derived
//! when read: an unhealthy provider whose backoff passed is tried again.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::clock::Clock;

/// Hears about health transitions; the metrics implement it (this module imports no metrics).
pub trait HealthListener: Send + Sync {
    /// A provider became healthy or unhealthy.
    fn health_changed(&self, provider: &str, healthy: bool);
}

/// When a provider is marked unhealthy, and for how long.
#[derive(Debug, Clone)]
pub struct HealthSettings {
    pub failure_threshold: u32,
    pub backoff: Duration,
    pub max_backoff: Duration,
}

impl Default for HealthSettings {
    fn default() -> Self {
        Self {
            failure_threshold: 2,
            backoff: Duration::from_secs(30),
            max_backoff: Duration::from_secs(300),
        }
    }
}

#[derive(Debug, Default, Clone)]
struct State {
    consecutive_failures: u32,
    unhealthy_until_ms: Option<i64>,
    trips: u32,
    last_error: Option<String>,
}

/// What an operator sees of a provider's health.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthSnapshot {
    pub healthy: bool,
    pub consecutive_failures: u32,
    pub last_error: Option<String>,
    pub unhealthy_until_ms: Option<i64>,
}

/// One provider's health.
pub struct ProviderHealth {
    provider: String,
    state: Mutex<State>,
    clock: Clock,
    settings: Mutex<HealthSettings>,
    listener: Arc<dyn HealthListener>,
}

impl ProviderHealth {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether requests should go to this provider now.
    pub fn is_healthy(&self) -> bool {
        let now = self.clock.now_ms();
        self.lock().unhealthy_until_ms.is_none_or(|t| t <= now)
    }

    /// A call succeeded.
    pub fn record_success(&self) {
        let was_unhealthy = {
            let mut s = self.lock();
            let was = s.unhealthy_until_ms.is_some();
            *s = State::default();
            was
        };
        if was_unhealthy {
            tracing::info!(provider = %self.provider, "provider healthy again");
            self.listener.health_changed(&self.provider, true);
        }
    }

    /// A call failed in a way another provider might not.
    pub fn record_failure(&self, error: &str) {
        let settings = self
            .settings
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let now = self.clock.now_ms();
        let tripped = {
            let mut s = self.lock();
            s.consecutive_failures += 1;
            s.last_error = Some(error.chars().take(300).collect());
            let currently_unhealthy = s.unhealthy_until_ms.is_some_and(|t| t > now);
            if s.consecutive_failures >= settings.failure_threshold && !currently_unhealthy {
                let factor = 2u32.saturating_pow(s.trips.min(16));
                let backoff = settings
                    .backoff
                    .saturating_mul(factor)
                    .min(settings.max_backoff);
                s.unhealthy_until_ms = Some(now + backoff.as_millis() as i64);
                s.trips += 1;
                Some(backoff)
            } else {
                None
            }
        };
        if let Some(backoff) = tripped {
            tracing::warn!(provider = %self.provider, backoff_secs = backoff.as_secs(), error, "provider marked unhealthy");
            self.listener.health_changed(&self.provider, false);
        }
    }

    /// The state now.
    pub fn snapshot(&self) -> HealthSnapshot {
        let now = self.clock.now_ms();
        let s = self.lock().clone();
        let until = s.unhealthy_until_ms.filter(|t| *t > now);
        HealthSnapshot {
            healthy: until.is_none(),
            consecutive_failures: s.consecutive_failures,
            last_error: s.last_error,
            unhealthy_until_ms: until,
        }
    }
}

/// Health of every provider by name; outlives configuration reloads so that state carries over.
pub struct HealthRegistry {
    clock: Clock,
    listener: Arc<dyn HealthListener>,
    providers: Mutex<HashMap<String, Arc<ProviderHealth>>>,
}

impl HealthRegistry {
    /// An empty registry.
    pub fn new(clock: Clock, listener: Arc<dyn HealthListener>) -> Self {
        Self {
            clock,
            listener,
            providers: Mutex::new(HashMap::new()),
        }
    }

    /// The health of a provider, created healthy on first use; settings follow the latest config.
    pub fn provider(&self, name: &str, settings: &HealthSettings) -> Arc<ProviderHealth> {
        let mut map = self.providers.lock().unwrap_or_else(|p| p.into_inner());
        let h = map
            .entry(name.to_string())
            .or_insert_with(|| {
                self.listener.health_changed(name, true);
                Arc::new(ProviderHealth {
                    provider: name.to_string(),
                    state: Mutex::new(State::default()),
                    clock: self.clock.clone(),
                    settings: Mutex::new(settings.clone()),
                    listener: self.listener.clone(),
                })
            })
            .clone();
        *h.settings.lock().unwrap_or_else(|p| p.into_inner()) = settings.clone();
        h
    }

    /// Forgets providers no longer configured.
    pub fn retain(&self, names: &[&str]) {
        self.providers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|k, _| names.contains(&k.as_str()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Quiet;
    impl HealthListener for Quiet {
        fn health_changed(&self, _: &str, _: bool) {}
    }

    #[test]
    fn trips_backs_off_and_recovers() {
        let clock = Clock::manual();
        let reg = HealthRegistry::new(clock.clone(), Arc::new(Quiet));
        let h = reg.provider("p", &HealthSettings::default());
        h.record_failure("boom");
        assert!(h.is_healthy());
        h.record_failure("boom");
        assert!(!h.is_healthy());
        clock.advance(Duration::from_millis(29_999));
        assert!(!h.is_healthy(), "1 ms before the 30 s backoff ends");
        clock.advance(Duration::from_millis(1));
        assert!(h.is_healthy(), "backoff passed: try again");
        h.record_failure("again");
        assert!(!h.is_healthy());
        clock.advance(Duration::from_secs(31));
        assert!(!h.is_healthy(), "second trip doubles the backoff");
        clock.advance(Duration::from_secs(30));
        h.record_success();
        assert!(h.is_healthy());
        assert_eq!(h.snapshot().consecutive_failures, 0);
    }
}
