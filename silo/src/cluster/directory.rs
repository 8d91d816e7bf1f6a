//! Tier two of placement: the directory partition a silo owns — which silo holds each grain's activation.
//!
//! The ring names one owner per grain id; the owner's partition is the single place where a grain's location
//! is decided. `lookup_or_place` and `register` work on the map's entry for the grain, so of two racing
//! writers the first wins and the second is told the winner. An entry carries a registration id, so that the
//! unregister of an old activation never removes the entry of a newer one.

use dashmap::DashMap;
use dashmap::mapref::entry::Entry;
use grains::GrainId;

use super::system::Registration;

/// The entries this silo owns.
#[derive(Debug, Default)]
pub(crate) struct DirectoryPartition {
    entries: DashMap<GrainId, Registration>,
}

impl DirectoryPartition {
    /// The live registration of `grain`, or a new one made by `place` (first writer wins).
    pub(crate) fn lookup_or_place(
        &self,
        grain: &GrainId,
        is_live: impl Fn(&Registration) -> bool,
        place: impl FnOnce() -> Registration,
    ) -> Registration {
        match self.entries.entry(grain.clone()) {
            Entry::Occupied(mut slot) => {
                if !is_live(slot.get()) {
                    slot.insert(place());
                }
                slot.get().clone()
            }
            Entry::Vacant(slot) => slot.insert(place()).clone(),
        }
    }

    /// Registers `registration` for `grain` unless a live registration on another silo is there; returns the
    /// winner. A silo's new registration replaces its own older one (a silo holds at most one activation of a
    /// grain, so the older one has ended).
    pub(crate) fn register(
        &self,
        grain: &GrainId,
        registration: Registration,
        is_live: impl Fn(&Registration) -> bool,
    ) -> Registration {
        self.lookup_or_place(
            grain,
            |current| is_live(current) && current.silo != registration.silo,
            || registration.clone(),
        )
    }

    /// Removes `grain`'s entry if it is `registration`.
    pub(crate) fn unregister(&self, grain: &GrainId, registration: &Registration) {
        self.entries.remove_if(grain, |_, current| current == registration);
    }

    /// Removes and returns every entry `keep` rejects.
    pub(crate) fn retain(&self, keep: impl Fn(&GrainId, &Registration) -> bool) -> usize {
        let before = self.entries.len();
        self.entries.retain(|grain, registration| keep(grain, registration));
        before - self.entries.len()
    }

    /// Number of entries.
    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }
}

#[cfg(test)]
mod tests {
    use grains_storage::SiloAddress;

    use super::*;

    fn reg(port: u16, id: u64) -> Registration {
        Registration { silo: SiloAddress { endpoint: format!("h:{port}"), epoch: 1 }, id }
    }

    #[test]
    fn the_first_registration_wins_and_later_ones_learn_the_winner() {
        let partition = DirectoryPartition::default();
        let grain = GrainId::new("G", 1i64);
        assert_eq!(partition.register(&grain, reg(1, 10), |_| true), reg(1, 10));
        assert_eq!(partition.register(&grain, reg(2, 20), |_| true), reg(1, 10));
        assert_eq!(partition.lookup_or_place(&grain, |_| true, || reg(3, 30)), reg(1, 10));
    }

    #[test]
    fn a_silo_re_registering_replaces_its_own_older_entry_and_the_stale_unregister_misses() {
        let partition = DirectoryPartition::default();
        let grain = GrainId::new("G", 1i64);
        partition.register(&grain, reg(1, 10), |_| true);
        assert_eq!(partition.register(&grain, reg(1, 11), |_| true), reg(1, 11));
        partition.unregister(&grain, &reg(1, 10));
        assert_eq!(partition.register(&grain, reg(2, 20), |_| true), reg(1, 11), "another silo still loses");
    }

    #[test]
    fn an_entry_on_a_dead_silo_is_replaced() {
        let partition = DirectoryPartition::default();
        let grain = GrainId::new("G", 1i64);
        partition.register(&grain, reg(1, 10), |_| true);
        let alive = |r: &Registration| r.silo.endpoint != "h:1";
        assert_eq!(partition.lookup_or_place(&grain, alive, || reg(2, 20)), reg(2, 20));
    }

    #[test]
    fn a_stale_unregister_leaves_the_newer_entry() {
        let partition = DirectoryPartition::default();
        let grain = GrainId::new("G", 1i64);
        partition.register(&grain, reg(1, 10), |_| true);
        partition.unregister(&grain, &reg(1, 10));
        partition.register(&grain, reg(1, 11), |_| true);
        partition.unregister(&grain, &reg(1, 10));
        assert_eq!(partition.lookup_or_place(&grain, |_| true, || reg(9, 99)), reg(1, 11));
    }
}
