//! The silo's hashed maps: one hasher, chosen for speed and seeded so that keys from the network cannot
//! aim at one bucket.

use dashmap::DashMap;

/// The hasher of the silo's maps: fast, and seeded at random per map (keys come from the network) — except
/// under a simulator, where seeds derive from the simulation's seed, so that iteration orders, and with them
/// a run, repeat exactly.
#[derive(Clone, Debug)]
pub(crate) struct FastHash(foldhash::fast::FixedState);

impl Default for FastHash {
    fn default() -> Self {
        FastHash(foldhash::fast::FixedState::with_seed(crate::sim::hash_seed()))
    }
}

impl std::hash::BuildHasher for FastHash {
    type Hasher = foldhash::fast::FoldHasher<'static>;

    fn build_hasher(&self) -> Self::Hasher {
        self.0.build_hasher()
    }
}

/// A concurrent map with the silo's hasher.
pub(crate) type FastDashMap<K, V> = DashMap<K, V, FastHash>;

/// A map with the silo's hasher.
pub(crate) type FastHashMap<K, V> = std::collections::HashMap<K, V, FastHash>;
