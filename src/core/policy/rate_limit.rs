//! Requests-per-minute and tokens-per-minute limits, per user and per API key, kept in memory
//! on each replica (docs/budgets.md, Rate limits: the windows are per replica).
//!
//! Each limit is a token bucket holding at most one minute's allowance and refilling at
//! `limit / 60 s`: a burst of the whole minute's allowance passes, then requests are admitted at
//! the steady rate. A request takes one request and its estimated tokens (prompt estimate plus
//! `max_tokens`) from every bucket that applies to it, all or none; when it ends, the estimate
//! is corrected to the tokens actually used (a bucket may go into debt).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use super::budget::ScopeKey;

/// One scope's limits (per minute).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Limits {
    pub rpm: Option<u64>,
    pub tpm: Option<u64>,
}

impl Limits {
    /// Whether any limit is set.
    pub fn any(&self) -> bool {
        self.rpm.is_some() || self.tpm.is_some()
    }
}

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

    /// Milliseconds until the bucket is full again.
    fn reset_ms(&self) -> i64 {
        self.wait_ms(self.limit)
    }

    fn remaining(&self) -> u64 {
        self.level.max(0.0).floor() as u64
    }
}

#[derive(Debug, Default)]
struct ScopeBuckets {
    requests: Option<Bucket>,
    tokens: Option<Bucket>,
}

/// What one request took, to be corrected when it ends (or given back if it is refused later).
#[derive(Debug, Clone)]
pub struct RateCharge {
    pub scopes: Vec<(ScopeKey, Limits)>,
    pub tokens: u64,
}

/// Why a request was not admitted.
#[derive(Debug, Clone)]
pub struct RateDenial {
    /// "requests" or "tokens".
    pub what: &'static str,
    pub limit: u64,
    pub retry_after: Duration,
    pub headers: Vec<(&'static str, String)>,
}

/// The per-replica windows of every scope seen.
#[derive(Default)]
pub struct RateLimiter {
    buckets: Mutex<HashMap<ScopeKey, ScopeBuckets>>,
}

/// Header names, as OpenAI sends them.
pub mod headers {
    pub const LIMIT_REQUESTS: &str = "x-ratelimit-limit-requests";
    pub const REMAINING_REQUESTS: &str = "x-ratelimit-remaining-requests";
    pub const RESET_REQUESTS: &str = "x-ratelimit-reset-requests";
    pub const LIMIT_TOKENS: &str = "x-ratelimit-limit-tokens";
    pub const REMAINING_TOKENS: &str = "x-ratelimit-remaining-tokens";
    pub const RESET_TOKENS: &str = "x-ratelimit-reset-tokens";
}

/// A duration the way OpenAI's reset headers write it: `20ms`, `1s`, `6m0s`, `1h2m3.5s`.
pub fn reset_string(ms: i64) -> String {
    let ms = ms.max(0);
    if ms < 1000 {
        return format!("{ms}ms");
    }
    let (h, rest) = (ms / 3_600_000, ms % 3_600_000);
    let (m, rest) = (rest / 60_000, rest % 60_000);
    let (s, milli) = (rest / 1000, rest % 1000);
    let secs = if milli == 0 {
        format!("{s}s")
    } else {
        let frac = format!("{milli:03}");
        format!("{s}.{}s", frac.trim_end_matches('0'))
    };
    match (h, m) {
        (0, 0) => secs,
        (0, m) => format!("{m}m{secs}"),
        (h, m) => format!("{h}h{m}m{secs}"),
    }
}

impl RateLimiter {
    /// Admits a request carrying `tokens` estimated tokens against every scope's limits, or
    /// refuses it with the wait until it would fit. Scopes without limits are ignored.
    pub fn admit(
        &self,
        now: i64,
        scopes: &[(ScopeKey, Limits)],
        tokens: u64,
    ) -> Result<(RateCharge, crate::error::PolicyHeaders), RateDenial> {
        let mut map = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() > 100_000 {
            // Full buckets are the same as no bucket: forget them.
            map.retain(|_, b| {
                let full = |x: &Option<Bucket>| {
                    x.is_none_or(|b| {
                        b.level + (now - b.at_ms) as f64 * b.limit / 60_000.0 >= b.limit
                    })
                };
                !(full(&b.requests) && full(&b.tokens))
            });
        }
        // First look, then take: all or nothing.
        let mut denial: Option<RateDenial> = None;
        for (key, limits) in scopes {
            let entry = map.entry(*key).or_default();
            sync(&mut entry.requests, limits.rpm, now);
            sync(&mut entry.tokens, limits.tpm, now);
            if let (Some(b), Some(limit)) = (&entry.requests, limits.rpm) {
                let wait = b.wait_ms(1.0);
                if wait > 0
                    && denial
                        .as_ref()
                        .is_none_or(|d| d.retry_after.as_millis() < wait as u128)
                {
                    denial = Some(RateDenial {
                        what: "requests",
                        limit,
                        retry_after: Duration::from_millis(wait as u64),
                        headers: Vec::new(),
                    });
                }
            }
            if let (Some(b), Some(limit)) = (&entry.tokens, limits.tpm) {
                let need = (tokens as f64).min(b.limit);
                let wait = b.wait_ms(need);
                if wait > 0
                    && denial
                        .as_ref()
                        .is_none_or(|d| d.retry_after.as_millis() < wait as u128)
                {
                    denial = Some(RateDenial {
                        what: "tokens",
                        limit,
                        retry_after: Duration::from_millis(wait as u64),
                        headers: Vec::new(),
                    });
                }
            }
        }
        if let Some(mut d) = denial {
            d.headers = report(&map, scopes);
            return Err(d);
        }
        for (key, _) in scopes {
            let entry = map.entry(*key).or_default();
            if let Some(b) = entry.requests.as_mut() {
                b.level -= 1.0;
            }
            if let Some(b) = entry.tokens.as_mut() {
                b.level -= tokens as f64;
            }
        }
        let headers = report(&map, scopes);
        Ok((
            RateCharge {
                scopes: scopes.to_vec(),
                tokens,
            },
            headers,
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
        let mut map = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        for (key, limits) in &charge.scopes {
            let entry = map.entry(*key).or_default();
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

/// The headers of the tightest scope, for requests and for tokens separately.
fn report(
    map: &HashMap<ScopeKey, ScopeBuckets>,
    scopes: &[(ScopeKey, Limits)],
) -> Vec<(&'static str, String)> {
    let mut out = Vec::new();
    type Pick = fn(&ScopeBuckets) -> Option<&Bucket>;
    let kinds: [(Pick, [&'static str; 3]); 2] = [
        (
            |s| s.requests.as_ref(),
            [
                headers::LIMIT_REQUESTS,
                headers::REMAINING_REQUESTS,
                headers::RESET_REQUESTS,
            ],
        ),
        (
            |s| s.tokens.as_ref(),
            [
                headers::LIMIT_TOKENS,
                headers::REMAINING_TOKENS,
                headers::RESET_TOKENS,
            ],
        ),
    ];
    for (pick, names) in kinds {
        let tightest = scopes
            .iter()
            .filter_map(|(k, _)| map.get(k).and_then(pick))
            .min_by(|a, b| a.level.total_cmp(&b.level));
        if let Some(b) = tightest {
            out.push((names[0], (b.limit as u64).to_string()));
            out.push((names[1], b.remaining().to_string()));
            out.push((names[2], reset_string(b.reset_ms())));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::super::budget::ScopeKind;
    use super::*;

    fn header<'a>(h: &'a [(&'static str, String)], name: &str) -> Option<&'a str> {
        h.iter().find(|(n, _)| *n == name).map(|(_, v)| v.as_str())
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
                header(&h, headers::REMAINING_REQUESTS),
                Some(&*(2 - i).to_string())
            );
        }
        let d = rl.admit(t0, &scopes, 0).unwrap_err();
        assert_eq!(d.what, "requests");
        assert_eq!(d.retry_after, Duration::from_secs(20));
        assert_eq!(header(&d.headers, headers::RESET_REQUESTS), Some("1m0s"));
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
        assert_eq!(header(&h, headers::REMAINING_TOKENS), Some("20"));
        assert_eq!(header(&h, headers::REMAINING_REQUESTS), Some("9"));
        let d = rl.admit(t, &[user, key], 30).unwrap_err();
        assert_eq!(d.what, "tokens");
        // Used 20 of the 80 it was charged: 60 come back.
        rl.settle(t, &charge, 20);
        let (charge, _) = rl.admit(t, &[user, key], 30).unwrap();
        rl.refund(t, &charge);
        let (_, h) = rl.admit(t, &[user, key], 0).unwrap();
        assert_eq!(header(&h, headers::REMAINING_TOKENS), Some("80"));
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
    }
}
