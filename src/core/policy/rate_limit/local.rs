//! The local backend: the buckets of every scope seen, in this process's memory (each replica
//! counts on its own). The map is split into shards by scope, each under its own mutex, so
//! requests of different users do not wait on one lock; a request locks the shards of its
//! scopes (at most two) in index order, so its check-and-take stays all or none.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use super::{report, Limits, RateCharge, RateDenial, ScopeView, WindowView};
use crate::core::policy::budget::ScopeKey;

/// Shards of the map: a power of two well above the cores of a typical node.
const SHARDS: usize = 64;

/// A shard forgets its full buckets when it holds more scopes than this.
const SHARD_PRUNE_AT: usize = 100_000 / SHARDS;

#[derive(Debug, Clone, Copy)]
struct Bucket {
    limit: f64,
    level: f64,
    at_ms: i64,
}

impl Bucket {
    fn new(limit: u64, now: i64) -> Bucket {
        Bucket {
            limit: limit as f64,
            level: limit as f64,
            at_ms: now,
        }
    }

    /// Refills up to `now` under `limit` (a changed limit takes effect at once).
    fn refill(&mut self, limit: u64, now: i64) {
        let limit = limit as f64;
        if limit != self.limit {
            // Keep what was used: a raised limit adds headroom, a lowered one takes it away.
            self.level += limit - self.limit;
            self.limit = limit;
        }
        let elapsed = (now - self.at_ms).max(0) as f64;
        self.level = (self.level + elapsed * limit / 60_000.0).min(limit);
        self.at_ms = now.max(self.at_ms);
    }

    /// Milliseconds until the bucket holds `need`.
    fn wait_ms(&self, need: f64) -> i64 {
        if self.level >= need {
            0
        } else {
            ((need - self.level) * 60_000.0 / self.limit).ceil() as i64
        }
    }

    fn view(&self) -> WindowView {
        WindowView {
            limit: self.limit as u64,
            level: self.level,
            reset_ms: self.wait_ms(self.limit),
        }
    }

    /// Whether the bucket is full by `now` (then it is the same as no bucket).
    fn full_at(&self, now: i64) -> bool {
        self.level + (now - self.at_ms) as f64 * self.limit / 60_000.0 >= self.limit
    }
}

#[derive(Debug, Default, Clone, Copy)]
struct ScopeBuckets {
    requests: Option<Bucket>,
    tokens: Option<Bucket>,
}

impl ScopeBuckets {
    fn view(&self) -> ScopeView {
        ScopeView {
            requests: self.requests.map(|b| b.view()),
            tokens: self.tokens.map(|b| b.view()),
        }
    }
}

type Shard = HashMap<ScopeKey, ScopeBuckets>;

/// The per-process windows of every scope seen.
pub struct RateLimiter {
    shards: Box<[Mutex<Shard>]>,
    hasher: std::collections::hash_map::RandomState,
}

impl Default for RateLimiter {
    fn default() -> Self {
        RateLimiter {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            hasher: Default::default(),
        }
    }
}

/// The locked shards of one request's scopes.
struct Locked<'a> {
    guards: Scopes<(usize, MutexGuard<'a, Shard>)>,
}

/// One item a scope of a request: a request has a few (user, key, service type), held inline.
type Scopes<T> = smallvec::SmallVec<[T; 4]>;

impl Locked<'_> {
    fn entry(&mut self, shard: usize, key: ScopeKey) -> &mut ScopeBuckets {
        let map = self
            .guards
            .iter_mut()
            .find(|(i, _)| *i == shard)
            .map(|(_, g)| &mut **g)
            .expect("the shard of every scope is locked");
        map.entry(key).or_default()
    }
}

impl RateLimiter {
    fn shard_of(&self, key: &ScopeKey) -> usize {
        (self.hasher.hash_one(key) as usize) % SHARDS
    }

    /// Locks the shards of `scopes` in index order (never two requests in opposite orders).
    fn lock(&self, scopes: &[(ScopeKey, Limits)], now: i64) -> (Locked<'_>, Scopes<usize>) {
        let of: Scopes<usize> = scopes.iter().map(|(k, _)| self.shard_of(k)).collect();
        let mut order = of.clone();
        order.sort_unstable();
        order.dedup();
        let guards = order
            .into_iter()
            .map(|i| {
                let mut g = self.shards[i].lock().unwrap_or_else(|p| p.into_inner());
                if g.len() > SHARD_PRUNE_AT {
                    // Full buckets are the same as no bucket: forget them.
                    let full = |x: &Option<Bucket>| x.is_none_or(|b| b.full_at(now));
                    g.retain(|_, b| !(full(&b.requests) && full(&b.tokens)));
                }
                (i, g)
            })
            .collect();
        (Locked { guards }, of)
    }

    /// Admits a request carrying `tokens` estimated tokens against every scope's limits, or
    /// refuses it with the wait until it would fit. Scopes without limits are ignored.
    pub fn admit(
        &self,
        now: i64,
        scopes: &[(ScopeKey, Limits)],
        tokens: u64,
    ) -> Result<(RateCharge, crate::error::PolicyHeaders), RateDenial> {
        let (mut locked, shard_of) = self.lock(scopes, now);
        // First look, then take: all or nothing.
        let mut denial: Option<RateDenial> = None;
        let mut views: Scopes<ScopeView> = Scopes::new();
        for ((key, limits), shard) in scopes.iter().zip(&shard_of) {
            let entry = locked.entry(*shard, *key);
            sync(&mut entry.requests, limits.rpm, now);
            sync(&mut entry.tokens, limits.tpm, now);
            let mut consider = |what: &'static str, limit: u64, wait: i64| {
                if wait > 0
                    && denial
                        .as_ref()
                        .is_none_or(|d| d.retry_after.as_millis() < wait as u128)
                {
                    denial = Some(RateDenial {
                        what,
                        limit,
                        retry_after: Duration::from_millis(wait as u64),
                        headers: Vec::new(),
                    });
                }
            };
            if let (Some(b), Some(limit)) = (&entry.requests, limits.rpm) {
                consider("requests", limit, b.wait_ms(1.0));
            }
            if let (Some(b), Some(limit)) = (&entry.tokens, limits.tpm) {
                consider("tokens", limit, b.wait_ms((tokens as f64).min(b.limit)));
            }
            views.push(entry.view());
        }
        if let Some(mut d) = denial {
            d.headers = report(&views);
            return Err(d);
        }
        views.clear();
        for ((key, _), shard) in scopes.iter().zip(&shard_of) {
            let entry = locked.entry(*shard, *key);
            if let Some(b) = entry.requests.as_mut() {
                b.level -= 1.0;
            }
            if let Some(b) = entry.tokens.as_mut() {
                b.level -= tokens as f64;
            }
            views.push(entry.view());
        }
        Ok((
            RateCharge {
                scopes: scopes.to_vec(),
                tokens,
            },
            report(&views),
        ))
    }

    /// Gives back what a request took (it was refused after admission, by its budget).
    pub fn refund(&self, now: i64, charge: &RateCharge) {
        self.apply(now, charge, 1.0, charge.tokens as f64);
    }

    /// Corrects the tokens taken at admission to what the request actually used.
    pub fn settle(&self, now: i64, charge: &RateCharge, used_tokens: u64) {
        self.apply(now, charge, 0.0, charge.tokens as f64 - used_tokens as f64);
    }

    fn apply(&self, now: i64, charge: &RateCharge, requests: f64, tokens: f64) {
        let (mut locked, shard_of) = self.lock(&charge.scopes, now);
        for ((key, limits), shard) in charge.scopes.iter().zip(&shard_of) {
            let entry = locked.entry(*shard, *key);
            sync(&mut entry.requests, limits.rpm, now);
            sync(&mut entry.tokens, limits.tpm, now);
            if let Some(b) = entry.requests.as_mut() {
                b.level = (b.level + requests).min(b.limit);
            }
            if let Some(b) = entry.tokens.as_mut() {
                b.level = (b.level + tokens).min(b.limit);
            }
        }
    }
}

fn sync(bucket: &mut Option<Bucket>, limit: Option<u64>, now: i64) {
    match (bucket.as_mut(), limit) {
        (_, None) => *bucket = None,
        (None, Some(l)) => *bucket = Some(Bucket::new(l, now)),
        (Some(b), Some(l)) => b.refill(l, now),
    }
}

#[cfg(test)]
mod tests {
    use super::super::{headers, reset_string};
    use super::*;
    use crate::core::policy::budget::ScopeKind;

    fn header<'a>(
        h: &'a [crate::error::PolicyHeader],
        name: &crate::error::PolicyName,
    ) -> Option<&'a str> {
        h.iter()
            .find(|(n, _)| n.text == name.text)
            .map(|(_, v)| v.as_str())
    }

    #[test]
    fn rpm_bucket_admits_a_minute_then_the_steady_rate() {
        let rl = RateLimiter::default();
        let scopes = [(
            (ScopeKind::User, 1),
            Limits {
                rpm: Some(3),
                tpm: None,
            },
        )];
        let t0 = 1_000_000;
        for i in 0..3 {
            let (_, h) = rl.admit(t0, &scopes, 0).expect("within rpm");
            assert_eq!(
                header(&h, &headers::REMAINING_REQUESTS),
                Some(&*(2 - i).to_string())
            );
        }
        let d = rl.admit(t0, &scopes, 0).unwrap_err();
        assert_eq!(d.what, "requests");
        assert_eq!(d.retry_after, Duration::from_secs(20));
        assert_eq!(header(&d.headers, &headers::RESET_REQUESTS), Some("1m0s"));
        assert!(rl.admit(t0 + 19_999, &scopes, 0).is_err());
        assert!(rl.admit(t0 + 20_000, &scopes, 0).is_ok());
    }

    #[test]
    fn tokens_are_corrected_after_the_request_and_refunds_work() {
        let rl = RateLimiter::default();
        let user = (
            (ScopeKind::User, 1),
            Limits {
                rpm: None,
                tpm: Some(100),
            },
        );
        let key = (
            (ScopeKind::Key, 9),
            Limits {
                rpm: Some(10),
                tpm: None,
            },
        );
        let t = 5_000;
        let (charge, h) = rl.admit(t, &[user, key], 80).unwrap();
        assert_eq!(header(&h, &headers::REMAINING_TOKENS), Some("20"));
        assert_eq!(header(&h, &headers::REMAINING_REQUESTS), Some("9"));
        let d = rl.admit(t, &[user, key], 30).unwrap_err();
        assert_eq!(d.what, "tokens");
        // Used 20 of the 80 it was charged: 60 come back.
        rl.settle(t, &charge, 20);
        let (charge, _) = rl.admit(t, &[user, key], 30).unwrap();
        rl.refund(t, &charge);
        let (_, h) = rl.admit(t, &[user, key], 0).unwrap();
        assert_eq!(header(&h, &headers::REMAINING_TOKENS), Some("80"));
        // A request larger than the whole minute waits for a full bucket, then goes into debt.
        assert!(rl.admit(t, &[user], 500).is_err());
        assert!(rl.admit(t + 60_000, &[user], 500).is_ok());
    }

    #[test]
    fn reset_strings_look_like_openai() {
        assert_eq!(reset_string(20), "20ms");
        assert_eq!(reset_string(1000), "1s");
        assert_eq!(reset_string(1500), "1.5s");
        assert_eq!(reset_string(360_000), "6m0s");
        assert_eq!(reset_string(3_723_000), "1h2m3s");
        assert_eq!(reset_string(1250), "1.25s");
        assert_eq!(reset_string(1001), "1.001s");
        assert_eq!(reset_string(61_010), "1m1.01s");
        assert_eq!(reset_string(-5), "0ms");
    }
}

#[cfg(test)]
mod concurrency_tests {
    use super::*;
    use crate::core::policy::budget::ScopeKind;

    /// Threads racing on one user (and each on a key of its own, in other shards) admit
    /// exactly the user's minute: the shards of a request are locked together.
    #[test]
    fn racing_threads_admit_exactly_the_limit() {
        let rl = std::sync::Arc::new(RateLimiter::default());
        let user = (
            (ScopeKind::User, 7),
            Limits {
                rpm: Some(50),
                tpm: None,
            },
        );
        let threads: Vec<_> = (0..8)
            .map(|t| {
                let rl = rl.clone();
                std::thread::spawn(move || {
                    let key = (
                        (ScopeKind::Key, 100 + t),
                        Limits {
                            rpm: Some(1000),
                            tpm: None,
                        },
                    );
                    (0..100)
                        .filter(|_| rl.admit(1_000, &[user, key], 0).is_ok())
                        .count()
                })
            })
            .collect();
        let admitted: usize = threads.into_iter().map(|t| t.join().unwrap()).sum();
        assert_eq!(admitted, 50);
    }
}
