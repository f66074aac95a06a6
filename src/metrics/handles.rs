//! Series handles of a family found by the label values a request already holds: a family's
//! own lookup SipHashes a label set that has to be built (its `Arc` labels cloned) for every
//! request, though the set of series a server updates is small and fixed once it has warmed up.

use std::hash::Hasher;
use std::sync::RwLock;

use hashbrown::HashTable;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::{Family, MetricConstructor};
use rustc_hash::FxHasher;

/// A family's label values as a request holds them (borrowed), to find its series by.
pub trait SeriesKey {
    /// The family's label set.
    type Labels;
    /// Hashes the values (equal values, equal hash).
    fn hash_into(&self, h: &mut FxHasher);
    /// Whether `labels` are these values.
    fn matches(&self, labels: &Self::Labels) -> bool;
    /// The label set, built once, when the series is first used.
    fn labels(&self) -> Self::Labels;
}

/// The series of one family already used, by their labels; a miss takes the family's series
/// (creating it) and keeps its handle. Label values are bounded (docs/metrics.md), and so is
/// this.
pub struct SeriesHandles<L, M> {
    table: RwLock<HashTable<(u64, L, M)>>,
}

impl<L, M> Default for SeriesHandles<L, M> {
    fn default() -> Self {
        Self {
            table: RwLock::new(HashTable::new()),
        }
    }
}

impl<L, M> SeriesHandles<L, M>
where
    L: Clone + std::hash::Hash + Eq + EncodeLabelSet,
    M: Clone,
{
    /// Runs `f` on the series of `key` in `family`.
    pub fn with<K, C, R>(&self, family: &Family<L, M, C>, key: &K, f: impl FnOnce(&M) -> R) -> R
    where
        K: SeriesKey<Labels = L>,
        C: MetricConstructor<M>,
    {
        let mut h = FxHasher::default();
        key.hash_into(&mut h);
        let hash = h.finish();
        {
            let table = self.table.read().unwrap_or_else(|e| e.into_inner());
            if let Some((_, _, m)) = table.find(hash, |(_, l, _)| key.matches(l)) {
                return f(m);
            }
        }
        let labels = key.labels();
        let series = family.get_or_create(&labels).clone();
        let out = f(&series);
        let mut table = self.table.write().unwrap_or_else(|e| e.into_inner());
        if table.find(hash, |(_, l, _)| key.matches(l)).is_none() {
            table.insert_unique(hash, (hash, labels, series), |(h, _, _)| *h);
        }
        out
    }
}

/// A label set whose values are all `Copy` is its own key: its hash is the labels' hash.
macro_rules! self_keyed {
    ($($labels:ty),* $(,)?) => {$(
        impl SeriesKey for $labels {
            type Labels = $labels;
            fn hash_into(&self, h: &mut rustc_hash::FxHasher) {
                std::hash::Hash::hash(self, h)
            }
            fn matches(&self, labels: &$labels) -> bool {
                self == labels
            }
            fn labels(&self) -> $labels {
                self.clone()
            }
        }
    )*};
}
pub(crate) use self_keyed;

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::metrics::counter::Counter;

    #[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
    struct Labels {
        name: std::sync::Arc<str>,
        kind: &'static str,
    }

    struct View<'a> {
        name: &'a str,
        kind: &'static str,
    }

    impl SeriesKey for View<'_> {
        type Labels = Labels;
        fn hash_into(&self, h: &mut FxHasher) {
            std::hash::Hash::hash(&(self.name, self.kind), h)
        }
        fn matches(&self, l: &Labels) -> bool {
            &*l.name == self.name && l.kind == self.kind
        }
        fn labels(&self) -> Labels {
            Labels {
                name: self.name.into(),
                kind: self.kind,
            }
        }
    }

    #[test]
    fn a_handle_is_the_familys_own_series_and_is_kept_per_label_set() {
        let family = Family::<Labels, Counter>::default();
        let handles = SeriesHandles::default();
        let a = View {
            name: "a",
            kind: "x",
        };
        let b = View {
            name: "a",
            kind: "y",
        };
        handles.with(&family, &a, |c| c.inc());
        handles.with(&family, &a, |c| c.inc());
        handles.with(&family, &b, |c| c.inc());
        assert_eq!(family.get_or_create(&a.labels()).get(), 2);
        assert_eq!(family.get_or_create(&b.labels()).get(), 1);
        // A series the family already had (made without the handles) is the one found.
        family
            .get_or_create(
                &View {
                    name: "c",
                    kind: "x",
                }
                .labels(),
            )
            .inc_by(5);
        handles.with(
            &family,
            &View {
                name: "c",
                kind: "x",
            },
            |c| c.inc(),
        );
        assert_eq!(
            family
                .get_or_create(
                    &View {
                        name: "c",
                        kind: "x"
                    }
                    .labels()
                )
                .get(),
            6
        );
        assert_eq!(handles.table.read().unwrap().len(), 3);
    }
}
