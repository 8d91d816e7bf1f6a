//! Placement strategies: which active silo a new activation goes to.

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::maps::FastDashMap;
use grains::{GrainId, Placement};
use grains_storage::SiloAddress;

use super::ring::grain_hash;

thread_local! {
    /// The generator's state, one per thread: a simulation runs on one thread and seeds it, so its choices
    /// repeat; real threads seed theirs apart from each other (clock, process, thread index).
    static STATE: Cell<u64> = Cell::new(crate::sim::thread_seed().unwrap_or_else(fresh_seed));
}

/// How many threads have seeded a generator (so that two threads never start alike).
static THREADS: AtomicU64 = AtomicU64::new(0);

fn fresh_seed() -> u64 {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
    let thread = THREADS.fetch_add(1, Ordering::Relaxed);
    mix(nanos ^ u64::from(std::process::id()).rotate_left(32) ^ thread.wrapping_mul(0xD6E8_FEB8_6659_FD93))
}

fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A fast, non-cryptographic random number (splitmix64 over this thread's state).
fn random_u64() -> u64 {
    STATE.with(|state| {
        let next = state.get().wrapping_add(0x9E37_79B9_7F4A_7C15);
        state.set(next);
        mix(next)
    })
}

/// Sets this thread's generator state (a simulation, for repeatable choices).
pub(crate) fn seed(seed: u64) {
    STATE.with(|state| state.set(seed));
}

/// A fresh registration id.
pub(crate) fn registration_id() -> u64 {
    random_u64()
}

/// Picks the silo for a new activation of `grain` among `active` (sorted, non-empty).
pub(crate) fn place(
    strategy: Placement,
    grain: &GrainId,
    caller: &SiloAddress,
    active: &[SiloAddress],
    loads: &FastDashMap<SiloAddress, u64>,
) -> SiloAddress {
    let pick = |i: u64| active[(i % active.len() as u64) as usize].clone();
    match strategy {
        Placement::Random => pick(random_u64()),
        Placement::PreferLocal if active.contains(caller) => caller.clone(),
        Placement::PreferLocal => pick(random_u64()),
        Placement::Hash => pick(u64::from(grain_hash(grain))),
        Placement::FewestActivations => {
            let offset = random_u64() as usize;
            (0..active.len())
                .map(|i| &active[(i + offset) % active.len()])
                .min_by_key(|silo| loads.get(*silo).map_or(0, |l| *l))
                .cloned()
                .unwrap_or_else(|| pick(0))
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn silos() -> Vec<SiloAddress> {
        (1..=3).map(|p| SiloAddress { endpoint: format!("h:{p}"), epoch: 1 }).collect()
    }

    #[test]
    fn random_placement_uses_every_silo() {
        let active = silos();
        let mut seen: HashMap<SiloAddress, usize> = HashMap::new();
        for i in 0..3000i64 {
            let silo = place(Placement::Random, &GrainId::new("G", i), &active[0], &active, &FastDashMap::default());
            *seen.entry(silo).or_default() += 1;
        }
        assert_eq!(seen.len(), 3);
        assert!(seen.values().all(|&n| n > 700), "{seen:?}");
    }

    #[test]
    fn prefer_local_hash_and_fewest_activations_pick_as_named() {
        let active = silos();
        let grain = GrainId::new("G", 7i64);
        let loads = FastDashMap::default();
        assert_eq!(place(Placement::PreferLocal, &grain, &active[1], &active, &loads), active[1]);
        let hashed = place(Placement::Hash, &grain, &active[0], &active, &loads);
        assert_eq!(place(Placement::Hash, &grain, &active[2], &active, &loads), hashed);
        loads.insert(active[0].clone(), 10);
        loads.insert(active[1].clone(), 3);
        loads.insert(active[2].clone(), 7);
        assert_eq!(place(Placement::FewestActivations, &grain, &active[0], &active, &loads), active[1]);
    }
}
