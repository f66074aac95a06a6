//! A small map whose entries expire after a time to live read from the gateway's `Clock`, so
//! that tests move time past a TTL instead of sleeping through it. Used for verified keys,
//! provisioned identities and budget policies: each bounds how long a change made on another
//! replica takes to bite.
//!
//! A busy entry is reloaded before it expires: the first lookup past half its TTL is told to
//! refresh it (in the background) while every lookup goes on being served the value it holds,
//! so that no request of a key in steady use waits on the store (before, every request in
//! flight when a busy key's entry expired waited for the store, every TTL). A value is still
//! never served longer than the TTL after the store was read for it: a load's entry counts
//! from when the load began, and a load begun before a `remove` or `clear` is not stored.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use crate::clock::Clock;

/// Entries kept at most; past it the map starts over, so a flood of distinct keys (valid
/// credentials, identities) cannot grow it without limit.
const MAX_ENTRIES: usize = 100_000;

/// A clock-driven cache: an entry is served until `ttl_ms` after its load began. Clones share
/// the entries.
pub struct TtlCache<K, V> {
    clock: Clock,
    shared: Arc<Shared<K, V>>,
}

struct Shared<K, V> {
    entries: RwLock<HashMap<K, Entry<V>>>,
    /// Bumped by `remove` and `clear`: a load begun under an older generation is dropped.
    generation: AtomicU64,
}

struct Entry<V> {
    loaded_at: i64,
    value: V,
    /// A lookup was told to refresh this entry.
    refresh_claimed: AtomicBool,
}

/// What a lookup found.
#[derive(Debug, PartialEq)]
pub enum Cached<V> {
    /// Loaded less than half its TTL ago.
    Fresh(V),
    /// Loaded more than half its TTL ago and still live: serve it, and reload it in the
    /// background with the load. One lookup per entry gets this.
    Refresh(V, Load),
    /// Absent or expired: load it (and wait).
    Missing(Load),
}

/// A load of an entry under way: what `insert` needs to date the entry and to drop it when the
/// cache was cleared meanwhile.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Load {
    started_at: i64,
    generation: u64,
}

impl<K, V> Clone for TtlCache<K, V> {
    fn clone(&self) -> Self {
        Self {
            clock: self.clock.clone(),
            shared: self.shared.clone(),
        }
    }
}

impl<K: Eq + Hash, V: Clone> TtlCache<K, V> {
    /// An empty cache reading time from `clock`.
    pub fn new(clock: Clock) -> Self {
        Self {
            clock,
            shared: Arc::new(Shared {
                entries: RwLock::new(HashMap::new()),
                generation: AtomicU64::new(0),
            }),
        }
    }

    /// The value for `key` loaded less than `ttl_ms` ago, and whether to reload it (never
    /// served, when `ttl_ms` is 0).
    pub fn lookup<Q>(&self, key: &Q, ttl_ms: u64) -> Cached<V>
    where
        K: std::borrow::Borrow<Q>,
        Q: Eq + Hash + ?Sized,
    {
        let load = self.begin_load();
        if ttl_ms == 0 {
            return Cached::Missing(load);
        }
        let ttl = ttl_ms.min(i64::MAX as u64) as i64;
        let Ok(entries) = self.shared.entries.read() else {
            return Cached::Missing(load);
        };
        let Some(entry) = entries.get(key) else {
            return Cached::Missing(load);
        };
        let age = load.started_at.saturating_sub(entry.loaded_at);
        if age >= ttl {
            Cached::Missing(load)
        } else if age < ttl / 2 || entry.refresh_claimed.swap(true, Ordering::Relaxed) {
            Cached::Fresh(entry.value.clone())
        } else {
            Cached::Refresh(entry.value.clone(), load)
        }
    }

    /// The value stored for `key` less than `ttl_ms` ago (never, when `ttl_ms` is 0), with no
    /// refresh asked for.
    #[cfg(test)]
    pub fn get<Q>(&self, key: &Q, ttl_ms: u64) -> Option<V>
    where
        K: std::borrow::Borrow<Q>,
        Q: Eq + Hash + ?Sized,
    {
        if ttl_ms == 0 {
            return None;
        }
        let now = self.clock.now_ms();
        let entries = self.shared.entries.read().ok()?;
        let entry = entries.get(key)?;
        (now.saturating_sub(entry.loaded_at) < ttl_ms.min(i64::MAX as u64) as i64)
            .then(|| entry.value.clone())
    }

    /// A load starting now, for `insert`.
    pub fn begin_load(&self) -> Load {
        Load {
            started_at: self.clock.now_ms(),
            generation: self.shared.generation.load(Ordering::Acquire),
        }
    }

    /// Stores what `load` read for `key` (nothing when `ttl_ms` is 0, the cache being off, or
    /// when the cache was cleared or the key removed since the load began).
    pub fn insert(&self, key: K, value: V, load: Load, ttl_ms: u64) {
        if ttl_ms == 0 {
            return;
        }
        if let Ok(mut entries) = self.shared.entries.write() {
            // Read under the lock `remove` and `clear` bump it under.
            if self.shared.generation.load(Ordering::Acquire) != load.generation {
                return;
            }
            if entries.len() >= MAX_ENTRIES {
                entries.clear();
            }
            entries.insert(
                key,
                Entry {
                    loaded_at: load.started_at,
                    value,
                    refresh_claimed: AtomicBool::new(false),
                },
            );
        }
    }

    /// Runs `reload` (what a `Cached::Refresh` asked for) in the background; when it fails,
    /// `what` is logged and the next lookup past half the TTL tries again.
    pub fn renew<E: std::fmt::Display>(
        &self,
        key: K,
        what: &'static str,
        reload: impl std::future::Future<Output = Result<(), E>> + Send + 'static,
    ) where
        K: Send + Sync + 'static,
        V: Send + Sync + 'static,
    {
        let cache = self.clone();
        tokio::spawn(async move {
            if let Err(e) = reload.await {
                tracing::warn!(error = %e, "{what}");
                cache.refresh_failed(&key);
            }
        });
    }

    /// Lets the next lookup past half the TTL refresh `key` again (after a refresh failed).
    pub fn refresh_failed<Q>(&self, key: &Q)
    where
        K: std::borrow::Borrow<Q>,
        Q: Eq + Hash + ?Sized,
    {
        if let Ok(entries) = self.shared.entries.read() {
            if let Some(entry) = entries.get(key) {
                entry.refresh_claimed.store(false, Ordering::Relaxed);
            }
        }
    }

    /// Drops one entry that a load found gone from the store (loads of other keys under way
    /// are kept).
    pub fn evict<Q>(&self, key: &Q)
    where
        K: std::borrow::Borrow<Q>,
        Q: Eq + Hash + ?Sized,
    {
        if let Ok(mut entries) = self.shared.entries.write() {
            entries.remove(key);
        }
    }

    /// Forgets one entry, and any load under way.
    pub fn remove<Q>(&self, key: &Q)
    where
        K: std::borrow::Borrow<Q>,
        Q: Eq + Hash + ?Sized,
    {
        if let Ok(mut entries) = self.shared.entries.write() {
            self.shared.generation.fetch_add(1, Ordering::AcqRel);
            entries.remove(key);
        }
    }

    /// Forgets every entry, and any load under way.
    pub fn clear(&self) {
        if let Ok(mut entries) = self.shared.entries.write() {
            self.shared.generation.fetch_add(1, Ordering::AcqRel);
            entries.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn fill(cache: &TtlCache<String, i32>, key: &str, value: i32, ttl: u64) {
        let load = cache.begin_load();
        cache.insert(key.to_string(), value, load, ttl);
    }

    #[test]
    fn an_entry_lives_exactly_its_ttl_on_the_clock() {
        let clock = Clock::manual();
        let cache = TtlCache::new(clock.clone());
        fill(&cache, "k", 7, 1_000);
        clock.advance(Duration::from_millis(999));
        assert_eq!(cache.get("k", 1_000), Some(7));
        clock.advance(Duration::from_millis(1));
        assert_eq!(cache.get("k", 1_000), None, "expired at exactly the ttl");
        assert!(matches!(cache.lookup("k", 1_000), Cached::Missing(_)));
    }

    /// Past half its TTL exactly one lookup is asked to refresh an entry; the others are served
    /// it, and a refreshed entry counts from when its load began.
    #[test]
    fn one_lookup_past_half_the_ttl_refreshes_and_the_rest_are_served() {
        let clock = Clock::manual();
        let cache = TtlCache::new(clock.clone());
        fill(&cache, "k", 1, 1_000);
        clock.advance(Duration::from_millis(499));
        assert_eq!(cache.lookup("k", 1_000), Cached::Fresh(1));
        clock.advance(Duration::from_millis(1));
        let Cached::Refresh(1, load) = cache.lookup("k", 1_000) else {
            panic!("the first lookup past half the ttl refreshes");
        };
        assert_eq!(
            cache.lookup("k", 1_000),
            Cached::Fresh(1),
            "only one refreshes"
        );
        // The reload takes 300 ms: its entry is dated from its start.
        clock.advance(Duration::from_millis(300));
        cache.insert("k".to_string(), 2, load, 1_000);
        assert_eq!(cache.lookup("k", 1_000), Cached::Fresh(2));
        clock.advance(Duration::from_millis(699));
        assert!(matches!(cache.lookup("k", 1_000), Cached::Refresh(2, _)));
        clock.advance(Duration::from_millis(1));
        assert!(matches!(cache.lookup("k", 1_000), Cached::Missing(_)));
    }

    #[test]
    fn a_failed_refresh_lets_the_next_lookup_try_again() {
        let clock = Clock::manual();
        let cache = TtlCache::new(clock.clone());
        fill(&cache, "k", 1, 1_000);
        clock.advance(Duration::from_millis(600));
        assert!(matches!(cache.lookup("k", 1_000), Cached::Refresh(1, _)));
        assert_eq!(cache.lookup("k", 1_000), Cached::Fresh(1));
        cache.refresh_failed("k");
        assert!(matches!(cache.lookup("k", 1_000), Cached::Refresh(1, _)));
    }

    /// A load begun before the cache was cleared (a revocation here) does not put back what it
    /// read.
    #[test]
    fn a_load_begun_before_a_clear_is_not_stored() {
        let cache = TtlCache::new(Clock::manual());
        let load = cache.begin_load();
        cache.clear();
        cache.insert("k".to_string(), 1, load, 1_000);
        assert_eq!(cache.get("k", 1_000), None);
        let load = cache.begin_load();
        cache.remove("other");
        cache.insert("k".to_string(), 1, load, 1_000);
        assert_eq!(cache.get("k", 1_000), None);
        fill(&cache, "k", 1, 1_000);
        assert_eq!(cache.get("k", 1_000), Some(1));
    }

    #[test]
    fn a_zero_ttl_turns_it_off_and_forgetting_works() {
        let cache = TtlCache::new(Clock::manual());
        fill(&cache, "a", 1, 0);
        assert_eq!(cache.get("a", 1_000), None);
        assert!(matches!(cache.lookup("a", 0), Cached::Missing(_)));
        fill(&cache, "a", 1, 1_000);
        fill(&cache, "b", 2, 1_000);
        cache.remove("a");
        assert_eq!(cache.get("a", 1_000), None);
        assert_eq!(cache.get("b", 1_000), Some(2));
        cache.clear();
        assert_eq!(cache.get("b", 1_000), None);
    }
}
