//! Tier one of placement: a consistent-hash ring over the active silos.
//!
//! Every silo contributes [`VIRTUAL_NODES`] points to a ring of `u32` hashes; a grain id hashes to a point and
//! its directory owner is the silo owning the first ring point at or after it (wrapping). Virtual nodes spread
//! each silo's share evenly, and adding or removing one silo moves only the keys in the ranges it gains or
//! loses — about `1/n` of them. The ring is a pure function of the set of active silos, so every silo that has
//! read the same membership view computes the same ring.

use grains::{GrainId, GrainKey};
use grains_storage::{RingRange, SiloAddress};
use xxhash_rust::xxh3::xxh3_64;

/// Points per silo on the ring.
pub const VIRTUAL_NODES: u32 = 64;

/// The stable hash of a grain id on the ring (the same in every process and version of Grains).
pub fn grain_hash(id: &GrainId) -> u32 {
    let mut bytes = Vec::with_capacity(64);
    bytes.extend_from_slice(id.grain_type().as_bytes());
    bytes.push(0);
    match id.key() {
        GrainKey::Str(s) => {
            bytes.push(b's');
            bytes.extend_from_slice(s.as_bytes());
        }
        GrainKey::Int(i) => {
            bytes.push(b'i');
            bytes.extend_from_slice(&i.to_le_bytes());
        }
        GrainKey::Uuid(u) => {
            bytes.push(b'u');
            bytes.extend_from_slice(u.as_bytes());
        }
        GrainKey::Compound(i, s) => {
            bytes.push(b'c');
            bytes.extend_from_slice(&i.to_le_bytes());
            bytes.extend_from_slice(s.as_bytes());
        }
    }
    fold(xxh3_64(&bytes))
}

fn fold(h: u64) -> u32 {
    (h >> 32) as u32 ^ h as u32
}

fn point(silo: &SiloAddress, vnode: u32) -> u32 {
    fold(xxh3_64(format!("{}@{}#{vnode}", silo.endpoint, silo.epoch).as_bytes()))
}

/// The ring for one membership view.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HashRing {
    points: Vec<(u32, SiloAddress)>,
}

impl HashRing {
    /// The ring over `silos` (order does not matter; duplicates are ignored).
    pub fn new<'a>(silos: impl IntoIterator<Item = &'a SiloAddress>) -> Self {
        let mut points: Vec<(u32, SiloAddress)> = silos
            .into_iter()
            .flat_map(|silo| (0..VIRTUAL_NODES).map(move |v| (point(silo, v), silo.clone())))
            .collect();
        points.sort();
        points.dedup();
        HashRing { points }
    }

    /// Whether the ring has no silo.
    pub fn is_empty(&self) -> bool {
        self.points.is_empty()
    }

    /// The silo owning `hash`: the first point at or after it, wrapping around.
    pub fn owner_of_hash(&self, hash: u32) -> Option<&SiloAddress> {
        if self.points.is_empty() {
            return None;
        }
        let i = self.points.partition_point(|(p, _)| *p < hash);
        Some(&self.points[i % self.points.len()].1)
    }

    /// The hashes of the ring's points, in order.
    pub fn points(&self) -> impl Iterator<Item = u32> + '_ {
        self.points.iter().map(|(h, _)| *h)
    }

    /// Whether `silo` has points on the ring.
    pub fn contains(&self, silo: &SiloAddress) -> bool {
        self.points.iter().any(|(_, s)| s == silo)
    }

    /// The directory owner of `id`.
    pub fn owner(&self, id: &GrainId) -> Option<&SiloAddress> {
        self.owner_of_hash(grain_hash(id))
    }

    /// The ranges of hashes `silo` owns (those [`owner_of_hash`](Self::owner_of_hash) names it for), adjacent
    /// ones merged; one range `(h, h]`, the whole ring, when it owns every point.
    pub fn ranges_of(&self, silo: &SiloAddress) -> Vec<RingRange> {
        let n = self.points.len();
        let mut ranges: Vec<RingRange> = Vec::new();
        for i in 0..n {
            let (end, owner) = &self.points[i];
            let begin = self.points[(i + n - 1) % n].0;
            if owner != silo || (n > 1 && begin == *end) {
                continue; // another's, or a point sharing its hash with the one before (which owns it)
            }
            match ranges.last_mut() {
                Some(last) if last.end == begin => last.end = *end,
                _ => ranges.push(RingRange::new(begin, *end)),
            }
        }
        // The last range may run on into the first, across the wrap.
        if ranges.len() > 1 && ranges[ranges.len() - 1].end == ranges[0].begin {
            let last = ranges.pop().map_or(0, |r| r.begin);
            ranges[0].begin = last;
        }
        ranges
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn silo(port: u16) -> SiloAddress {
        SiloAddress { endpoint: format!("127.0.0.1:{port}"), epoch: 1_700_000_000_000 + i64::from(port) }
    }

    fn keys(n: i64) -> Vec<GrainId> {
        (0..n).map(|i| GrainId::new("Counter", i)).collect()
    }

    #[test]
    fn every_silo_computes_the_same_ring_from_the_same_view() {
        let view = [silo(1), silo(2), silo(3)];
        let shuffled = [silo(3), silo(1), silo(2), silo(1)];
        assert_eq!(HashRing::new(&view), HashRing::new(&shuffled));
        let a = HashRing::new(&view);
        let b = HashRing::new(&shuffled);
        for id in keys(1000) {
            assert_eq!(a.owner(&id), b.owner(&id));
        }
    }

    #[test]
    fn adding_a_fourth_silo_moves_about_a_quarter_of_the_keys_all_to_it() {
        let before = HashRing::new(&[silo(1), silo(2), silo(3)]);
        let after = HashRing::new(&[silo(1), silo(2), silo(3), silo(4)]);
        let ids = keys(20_000);
        let mut moved = 0;
        for id in &ids {
            let (old, new) = (before.owner(id).unwrap(), after.owner(id).unwrap());
            if old != new {
                moved += 1;
                assert_eq!(new, &silo(4), "a key only ever moves to the new silo");
            }
        }
        let share = moved as f64 / ids.len() as f64;
        assert!((0.17..=0.33).contains(&share), "moved {share:.3} of the keys, expected about 0.25");
    }

    #[test]
    fn load_is_spread_evenly() {
        let ring = HashRing::new(&[silo(1), silo(2), silo(3)]);
        let mut counts: HashMap<&SiloAddress, usize> = HashMap::new();
        let ids = keys(30_000);
        for id in &ids {
            *counts.entry(ring.owner(id).unwrap()).or_default() += 1;
        }
        for (silo, n) in counts {
            let share = n as f64 / ids.len() as f64;
            assert!((0.22..=0.45).contains(&share), "{silo} owns {share:.3}");
        }
    }

    #[test]
    fn ranges_cover_exactly_what_each_silo_owns() {
        let silos = [silo(1), silo(2), silo(3)];
        let ring = HashRing::new(&silos);
        let ranges: Vec<Vec<RingRange>> = silos.iter().map(|s| ring.ranges_of(s)).collect();
        let mut probes: Vec<u32> = (0..20_000u32).map(|i| i.wrapping_mul(2_654_435_761)).collect();
        probes.extend(ring.points().flat_map(|p| [p, p.wrapping_add(1), p.wrapping_sub(1)]));
        probes.extend([0, u32::MAX]);
        for hash in probes {
            let owner = ring.owner_of_hash(hash).unwrap();
            for (silo, ranges) in silos.iter().zip(&ranges) {
                let inside = ranges.iter().filter(|r| r.contains(hash)).count();
                assert_eq!(inside, usize::from(silo == owner), "hash {hash}: {silo} holds it in {inside} ranges");
            }
        }
        assert!(
            ranges.iter().all(|r| r.len() > 10 && r.len() <= VIRTUAL_NODES as usize),
            "{:?}",
            ranges.iter().map(Vec::len).collect::<Vec<_>>()
        );
    }

    #[test]
    fn a_silo_alone_owns_the_whole_ring_in_one_range() {
        let ring = HashRing::new(&[silo(1)]);
        let ranges = ring.ranges_of(&silo(1));
        assert_eq!(ranges.len(), 1);
        assert_eq!(ranges[0].begin, ranges[0].end, "(h, h] is the whole ring");
        assert!(ring.ranges_of(&silo(2)).is_empty());
        assert!(HashRing::default().ranges_of(&silo(1)).is_empty());
    }

    #[test]
    fn the_grain_hash_is_stable() {
        // Pinned: the hash decides placement and reminder ranges across versions and processes.
        assert_eq!(grain_hash(&GrainId::new("Counter", 42i64)), 4258974698, "pinned value");
        assert_eq!(grain_hash(&GrainId::new("Cart", "alice")), 2972130459, "pinned value");
        assert_ne!(grain_hash(&GrainId::new("Counter", 42i64)), grain_hash(&GrainId::new("Counter", "42")));
        assert_eq!(HashRing::default().owner(&GrainId::new("X", 1i64)), None);
    }
}
