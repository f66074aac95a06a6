//! A small map whose entries expire after a time to live read from the gateway's `Clock`, so
//! that tests move time past a TTL instead of sleeping through it. Used for verified keys,
//! provisioned identities and budget policies: each bounds how long a change made on another
//! replica takes to bite.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::RwLock;

use crate::clock::Clock;

/// Entries kept at most; past it the map starts over, so a flood of distinct keys (valid
/// credentials, identities) cannot grow it without limit.
const MAX_ENTRIES: usize = 100_000;

/// A clock-driven cache: an entry is served until `ttl_ms` after it was stored.
pub struct TtlCache<K, V> {
    clock: Clock,
    entries: RwLock<HashMap<K, (i64, V)>>,
}

impl<K: Eq + Hash, V: Clone> TtlCache<K, V> {
    /// An empty cache reading time from `clock`.
    pub fn new(clock: Clock) -> Self {
        Self {
            clock,
            entries: RwLock::new(HashMap::new()),
        }
    }

    /// The value stored for `key` less than `ttl_ms` ago (never, when `ttl_ms` is 0).
    pub fn get<Q>(&self, key: &Q, ttl_ms: u64) -> Option<V>
    where
        K: std::borrow::Borrow<Q>,
        Q: Eq + Hash + ?Sized,
    {
        if ttl_ms == 0 {
            return None;
        }
        let now = self.clock.now_ms();
        let entries = self.entries.read().ok()?;
        let (at, value) = entries.get(key)?;
        (now.saturating_sub(*at) < ttl_ms.min(i64::MAX as u64) as i64).then(|| value.clone())
    }

    /// Stores `value` for `key` as of now (nothing, when `ttl_ms` is 0: the cache is off).
    pub fn insert(&self, key: K, value: V, ttl_ms: u64) {
        if ttl_ms == 0 {
            return;
        }
        let now = self.clock.now_ms();
        if let Ok(mut entries) = self.entries.write() {
            if entries.len() >= MAX_ENTRIES {
                entries.clear();
            }
            entries.insert(key, (now, value));
        }
    }

    /// Forgets one entry.
    pub fn remove<Q>(&self, key: &Q)
    where
        K: std::borrow::Borrow<Q>,
        Q: Eq + Hash + ?Sized,
    {
        if let Ok(mut entries) = self.entries.write() {
            entries.remove(key);
        }
    }

    /// Forgets every entry.
    pub fn clear(&self) {
        if let Ok(mut entries) = self.entries.write() {
            entries.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn an_entry_lives_exactly_its_ttl_on_the_clock() {
        let clock = Clock::manual();
        let cache = TtlCache::new(clock.clone());
        cache.insert("k".to_string(), 7, 1_000);
        clock.advance(Duration::from_millis(999));
        assert_eq!(cache.get("k", 1_000), Some(7));
        clock.advance(Duration::from_millis(1));
        assert_eq!(cache.get("k", 1_000), None, "expired at exactly the ttl");
    }

    #[test]
    fn a_zero_ttl_turns_it_off_and_forgetting_works() {
        let cache = TtlCache::new(Clock::manual());
        cache.insert(1, "a", 0);
        assert_eq!(cache.get(&1, 1_000), None);
        cache.insert(1, "a", 1_000);
        cache.insert(2, "b", 1_000);
        cache.remove(&1);
        assert_eq!(cache.get(&1, 1_000), None);
        assert_eq!(cache.get(&2, 1_000), Some("b"));
        cache.clear();
        assert_eq!(cache.get(&2, 1_000), None);
    }
}
