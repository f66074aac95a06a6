//! The upstream API keys of one provider and their states. A state is derived when read (no
//! timers): a key cooling down past its deadline is valid again.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::clock::Clock;

/// Why a key left `valid`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TransitionReason {
    /// 429 from the upstream.
    RateLimited,
    /// 401 from the upstream.
    Unauthorized,
    /// 403 from the upstream.
    Forbidden,
}

impl TransitionReason {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            TransitionReason::RateLimited => "rate_limited",
            TransitionReason::Unauthorized => "unauthorized",
            TransitionReason::Forbidden => "forbidden",
        }
    }
}

/// A key's state as read now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KeyState {
    Valid,
    /// Cooling down until a deadline.
    Temporary,
    /// Disabled until an operator enables it.
    Permanent,
}

impl KeyState {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            KeyState::Valid => "valid",
            KeyState::Temporary => "temporary",
            KeyState::Permanent => "permanent",
        }
    }
}

/// How a pool ran out of keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExhaustionOutcome {
    /// At least one key is cooling down from a rate limit.
    RateLimited,
    /// Every key is disabled for auth failures.
    AuthFailed,
}

impl ExhaustionOutcome {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            ExhaustionOutcome::RateLimited => "rate_limited",
            ExhaustionOutcome::AuthFailed => "auth_failed",
        }
    }
}

/// Hears about pool events; the metrics implement it (the pool itself imports no metrics).
pub trait KeyPoolObserver: Send + Sync {
    /// A key changed state.
    fn transition(&self, provider: &str, reason: TransitionReason);
    /// A request found no usable key.
    fn exhausted(&self, provider: &str, outcome: ExhaustionOutcome);
    /// How many keys one request tried.
    fn keys_tried(&self, provider: &str, tried: usize);
}

/// An observer that ignores everything.
pub struct NoObserver;

impl KeyPoolObserver for NoObserver {
    fn transition(&self, _: &str, _: TransitionReason) {}
    fn exhausted(&self, _: &str, _: ExhaustionOutcome) {}
    fn keys_tried(&self, _: &str, _: usize) {}
}

#[derive(Debug, Clone, Copy)]
enum Status {
    Valid,
    Cooling {
        until_ms: i64,
        reason: TransitionReason,
    },
    Disabled {
        reason: TransitionReason,
    },
}

struct PooledKey {
    secret: String,
    hint: String,
    status: Mutex<Status>,
}

/// What an operator sees of a key: never the key itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeySnapshot {
    pub hint: String,
    pub state: KeyState,
    pub reason: Option<TransitionReason>,
    /// Unix milliseconds when a cooling key becomes valid again.
    pub cooldown_until_ms: Option<i64>,
}

/// How an attempt with a key went, as far as the key is concerned.
#[derive(Debug, Clone, Copy)]
pub enum KeyVerdict {
    /// 429, with the upstream's Retry-After if it sent one.
    RateLimited(Option<Duration>),
    Unauthorized,
    Forbidden,
}

/// Pool behaviour from configuration.
#[derive(Debug, Clone)]
pub struct KeyPoolSettings {
    pub default_cooldown: Duration,
    /// When set, 401/403 cool a key down for this long instead of disabling it.
    pub auth_failure_cooldown: Option<Duration>,
}

/// A provider's upstream keys; successive requests start at successive keys (round-robin).
pub struct KeyPool {
    provider: String,
    keys: Vec<PooledKey>,
    next: AtomicUsize,
    clock: Clock,
    settings: KeyPoolSettings,
    observer: Arc<dyn KeyPoolObserver>,
}

/// The masked form of an upstream key: its last four characters.
pub fn upstream_key_hint(key: &str) -> String {
    let tail: Vec<char> = key.chars().rev().take(4).collect();
    format!("...{}", tail.into_iter().rev().collect::<String>())
}

impl KeyPool {
    /// `text` with every key of this pool replaced by its hint: upstreams may quote the key
    /// they were sent in an error message, and that message is passed on to callers.
    pub fn redact(&self, text: &str) -> String {
        let mut out = text.to_string();
        for k in &self.keys {
            if !k.secret.is_empty() && out.contains(k.secret.as_str()) {
                out = out.replace(k.secret.as_str(), &k.hint);
            }
        }
        out
    }

    /// A pool over `keys` (may be empty: the upstream needs no key).
    pub fn new(
        provider: &str,
        keys: Vec<String>,
        settings: KeyPoolSettings,
        clock: Clock,
        observer: Arc<dyn KeyPoolObserver>,
    ) -> Self {
        Self {
            provider: provider.to_string(),
            keys: keys
                .into_iter()
                .map(|secret| PooledKey {
                    hint: upstream_key_hint(&secret),
                    secret,
                    status: Mutex::new(Status::Valid),
                })
                .collect(),
            next: AtomicUsize::new(0),
            clock,
            settings,
            observer,
        }
    }

    /// The provider this pool belongs to.
    pub fn provider(&self) -> &str {
        &self.provider
    }

    /// Whether the upstream is called without a key.
    pub fn is_keyless(&self) -> bool {
        self.keys.is_empty()
    }

    fn status(&self, i: usize) -> Status {
        *self.keys[i]
            .status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    fn state_of(status: Status, now_ms: i64) -> KeyState {
        match status {
            Status::Valid => KeyState::Valid,
            Status::Cooling { until_ms, .. } if until_ms <= now_ms => KeyState::Valid,
            Status::Cooling { .. } => KeyState::Temporary,
            Status::Disabled { .. } => KeyState::Permanent,
        }
    }

    /// The order in which one request should try the keys: every key once, starting at the
    /// next round-robin position. Validity is checked as each is reached.
    pub fn walk(&self) -> KeyWalk<'_> {
        let n = self.keys.len();
        let start = if n == 0 {
            0
        } else {
            self.next.fetch_add(1, Ordering::Relaxed) % n
        };
        KeyWalk {
            pool: self,
            start,
            step: 0,
            tried: 0,
        }
    }

    /// Records what the upstream said of a key; counts a transition only when the state changes.
    pub fn report(&self, index: usize, verdict: KeyVerdict) {
        let now = self.clock.now_ms();
        let (reason, new) = match verdict {
            KeyVerdict::RateLimited(after) => {
                let after = after.unwrap_or(self.settings.default_cooldown);
                let until_ms = now + after.as_millis().max(1) as i64;
                (
                    TransitionReason::RateLimited,
                    Status::Cooling {
                        until_ms,
                        reason: TransitionReason::RateLimited,
                    },
                )
            }
            KeyVerdict::Unauthorized | KeyVerdict::Forbidden => {
                let reason = if matches!(verdict, KeyVerdict::Unauthorized) {
                    TransitionReason::Unauthorized
                } else {
                    TransitionReason::Forbidden
                };
                match self.settings.auth_failure_cooldown {
                    Some(d) => (
                        reason,
                        Status::Cooling {
                            until_ms: now + d.as_millis() as i64,
                            reason,
                        },
                    ),
                    None => (reason, Status::Disabled { reason }),
                }
            }
        };
        let mut status = self.keys[index]
            .status
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let before = Self::state_of(*status, now);
        let merged = match (*status, new) {
            // A longer cooldown already in force wins.
            (
                Status::Cooling {
                    until_ms: old,
                    reason: r,
                },
                Status::Cooling { until_ms, .. },
            ) if old > until_ms && old > now => Status::Cooling {
                until_ms: old,
                reason: r,
            },
            (Status::Disabled { reason: r }, Status::Cooling { .. }) => {
                Status::Disabled { reason: r }
            }
            (_, n) => n,
        };
        *status = merged;
        let after = Self::state_of(merged, now);
        drop(status);
        if before != after {
            self.observer.transition(&self.provider, reason);
        }
    }

    /// When no key is usable: how the pool ran out and, if keys are cooling down, when the
    /// soonest is usable again (rounded up to whole seconds by the caller).
    pub fn exhaustion(&self) -> (ExhaustionOutcome, Option<Duration>) {
        let now = self.clock.now_ms();
        let soonest = (0..self.keys.len())
            .filter_map(|i| match self.status(i) {
                Status::Cooling { until_ms, .. } if until_ms > now => Some(until_ms),
                _ => None,
            })
            .min();
        match soonest {
            Some(t) => (
                ExhaustionOutcome::RateLimited,
                Some(Duration::from_millis((t - now) as u64)),
            ),
            None => (ExhaustionOutcome::AuthFailed, None),
        }
    }

    /// Every key's state now.
    pub fn snapshot(&self) -> Vec<KeySnapshot> {
        let now = self.clock.now_ms();
        (0..self.keys.len())
            .map(|i| {
                let status = self.status(i);
                let state = Self::state_of(status, now);
                let (reason, until) = match status {
                    Status::Cooling { until_ms, reason } if state == KeyState::Temporary => {
                        (Some(reason), Some(until_ms))
                    }
                    Status::Disabled { reason } => (Some(reason), None),
                    _ => (None, None),
                };
                KeySnapshot {
                    hint: self.keys[i].hint.clone(),
                    state,
                    reason,
                    cooldown_until_ms: until,
                }
            })
            .collect()
    }

    /// How many keys are in each state now.
    pub fn state_counts(&self) -> [(KeyState, usize); 3] {
        let mut counts = [
            (KeyState::Valid, 0),
            (KeyState::Temporary, 0),
            (KeyState::Permanent, 0),
        ];
        let now = self.clock.now_ms();
        for i in 0..self.keys.len() {
            let s = Self::state_of(self.status(i), now);
            for c in counts.iter_mut() {
                if c.0 == s {
                    c.1 += 1;
                }
            }
        }
        counts
    }

    /// Makes every key with this hint valid again; returns how many there were.
    pub fn enable(&self, hint: &str) -> usize {
        let mut n = 0;
        for k in self.keys.iter().filter(|k| k.hint == hint) {
            *k.status.lock().unwrap_or_else(|p| p.into_inner()) = Status::Valid;
            n += 1;
        }
        n
    }

    /// Carries key states over from an older pool of the same provider (config reload), for
    /// keys that are still configured.
    pub fn inherit(&self, old: &KeyPool) {
        for k in &self.keys {
            if let Some(o) = old.keys.iter().find(|o| o.secret == k.secret) {
                let s = *o.status.lock().unwrap_or_else(|p| p.into_inner());
                *k.status.lock().unwrap_or_else(|p| p.into_inner()) = s;
            }
        }
    }

    /// The observer, for reporting a request's totals.
    pub fn observer(&self) -> &dyn KeyPoolObserver {
        self.observer.as_ref()
    }
}

/// One request's walk over a pool.
pub struct KeyWalk<'a> {
    pool: &'a KeyPool,
    start: usize,
    step: usize,
    tried: usize,
}

impl<'a> KeyWalk<'a> {
    /// The next valid key to try: its index and secret.
    pub fn next_key(&mut self) -> Option<(usize, &'a str)> {
        let n = self.pool.keys.len();
        let now = self.pool.clock.now_ms();
        while self.step < n {
            let i = (self.start + self.step) % n;
            self.step += 1;
            if KeyPool::state_of(self.pool.status(i), now) == KeyState::Valid {
                self.tried += 1;
                return Some((i, &self.pool.keys[i].secret));
            }
        }
        None
    }

    /// How many keys this walk handed out.
    pub fn tried(&self) -> usize {
        self.tried
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(keys: &[&str]) -> (KeyPool, Clock) {
        let clock = Clock::manual();
        let p = KeyPool::new(
            "p",
            keys.iter().map(|k| k.to_string()).collect(),
            KeyPoolSettings {
                default_cooldown: Duration::from_secs(60),
                auth_failure_cooldown: None,
            },
            clock.clone(),
            Arc::new(NoObserver),
        );
        (p, clock)
    }

    #[test]
    fn round_robin_skips_unusable_and_recovers() {
        let (p, clock) = pool(&["k-aaaa", "k-bbbb", "k-cccc"]);
        let first: Vec<_> = (0..3).map(|_| p.walk().next_key().unwrap().0).collect();
        assert_eq!(first, [0, 1, 2]);
        p.report(1, KeyVerdict::RateLimited(Some(Duration::from_secs(3))));
        p.report(2, KeyVerdict::Unauthorized);
        let mut w = p.walk();
        assert_eq!(w.next_key().map(|k| k.0), Some(0));
        assert_eq!(w.next_key(), None);
        p.report(0, KeyVerdict::RateLimited(Some(Duration::from_secs(5))));
        let (outcome, after) = p.exhaustion();
        assert_eq!(outcome, ExhaustionOutcome::RateLimited);
        assert_eq!(
            after,
            Some(Duration::from_secs(3)),
            "the soonest deadline, exactly"
        );
        clock.advance(Duration::from_secs(4));
        let states: Vec<_> = p.snapshot().into_iter().map(|s| s.state).collect();
        assert_eq!(
            states,
            [KeyState::Temporary, KeyState::Valid, KeyState::Permanent]
        );
        assert_eq!(p.enable("...cccc"), 1);
        assert_eq!(p.state_counts()[0], (KeyState::Valid, 2));
    }

    #[test]
    fn longer_cooldown_wins() {
        let (p, _) = pool(&["k1"]);
        p.report(0, KeyVerdict::RateLimited(Some(Duration::from_secs(100))));
        p.report(0, KeyVerdict::RateLimited(Some(Duration::from_secs(1))));
        assert_eq!(p.exhaustion().1, Some(Duration::from_secs(100)));
    }
}
