//! Tier two of placement: the directory partition a silo owns — which silo holds each grain's activation.
//!
//! The ring of a membership view names one owner per grain id; the owner's partition is the single place where
//! a grain's location is decided. `lookup_or_place` and `register` work on the map's entry for the grain, so of
//! two racing writers the first wins and the second is told the winner. An entry carries a registration id, so
//! that the unregister of an old activation never removes the entry of a newer one.
//!
//! Ownership is a lease on ring ranges, not a guess (the model is Orleans 9's strongly consistent directory):
//!
//! - Every request from another silo carries the caller's [`ViewStamp`]. A partition whose view differs says so
//!   instead of answering: [`Refusal::StaleView`] when the caller is behind, [`Refusal::Behind`] when the
//!   partition is (it re-reads the table and the caller retries).
//! - When a view change gives this silo ranges it did not own, it answers nothing in them
//!   ([`Refusal::NotReady`]) until it has recovered them: the previous owners hand their entries over and every
//!   silo reports its activations in those ranges (see `Cluster::recover`). Only then is the range
//!   [`DirectoryPartition::complete_recovery`]'d.
//! - An entry on a silo that was declared dead is not replaced at once: the dead silo may still be serving until
//!   its own membership lease runs out, so the partition answers [`Refusal::Fenced`] until then.
//!
//! The view and the recovered ring sit behind one lock: an operation checks ownership and touches the map under
//! the read lock, and installing a view takes the write lock, so once a view is installed no operation decided
//! under the old one is still running. That is what makes a hand-off snapshot complete.

use std::sync::{Arc, RwLock, RwLockReadGuard};

use crate::maps::FastDashMap;
use dashmap::mapref::entry::Entry;
use grains::GrainId;
use grains_storage::SiloAddress;

use super::ClusterView;
use super::ring::HashRing;
use super::system::{Refusal, Registration, ViewStamp};

/// What the directory may assume about the silo a registration names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Liveness {
    /// The silo is a member: the registration stands.
    Live,
    /// The silo was declared dead, but may still be serving until its lease runs out: wait.
    Fenced,
    /// The silo is gone for sure: the registration may be replaced.
    Gone,
}

/// The entries this silo owns, and which ranges of the ring it owns them for.
#[derive(Debug)]
pub(crate) struct DirectoryPartition {
    me: SiloAddress,
    entries: FastDashMap<GrainId, Registration>,
    ownership: RwLock<Ownership>,
}

#[derive(Debug)]
struct Ownership {
    /// The view whose ring decides which grains this partition answers for.
    view: Arc<ClusterView>,
    /// The ring whose ranges owned by this silo hold complete entries here (recovered or never moved).
    recovered: HashRing,
}

/// Whether `me` owns, in `new`, any hash that it does not own in `old`.
pub(crate) fn gains(old: &HashRing, new: &HashRing, me: &SiloAddress) -> bool {
    // Ownership is constant between consecutive points of either ring: checking each point of both covers all.
    old.points().chain(new.points()).any(|h| new.owner_of_hash(h) == Some(me) && old.owner_of_hash(h) != Some(me))
}

impl DirectoryPartition {
    /// An empty partition of `me` that owns nothing until a view is installed.
    pub(crate) fn new(me: SiloAddress) -> Self {
        Self {
            me,
            entries: FastDashMap::default(),
            ownership: RwLock::new(Ownership {
                view: Arc::new(ClusterView::default()),
                recovered: HashRing::default(),
            }),
        }
    }

    fn read(&self) -> RwLockReadGuard<'_, Ownership> {
        self.ownership.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Installs `view`. Returns whether this silo gained ranges that it must recover before answering for
    /// them. Entries this silo neither owns now nor owned in the previous view are dropped (a new owner that
    /// wanted them has taken them by now).
    pub(crate) fn install(&self, view: Arc<ClusterView>) -> bool {
        let mut ownership = self.ownership.write().unwrap_or_else(|e| e.into_inner());
        if view.version < ownership.view.version {
            return false;
        }
        if view.ring_id == ownership.view.ring_id {
            ownership.view = view; // same ring: a recovery under way, if any, goes on
            return false;
        }
        let old = std::mem::replace(&mut ownership.view, view.clone());
        let me = &self.me;
        self.entries.retain(|grain, _| view.ring.owner(grain) == Some(me) || old.ring.owner(grain) == Some(me));
        if gains(&ownership.recovered, &view.ring, me) {
            true
        } else {
            ownership.recovered = view.ring.clone();
            false
        }
    }

    /// The view the partition answers under.
    pub(crate) fn view(&self) -> Arc<ClusterView> {
        self.read().view.clone()
    }

    /// Runs `op` if this partition may answer for `grain` under the caller's `stamp` (`None`: a caller in this
    /// silo, which shares the partition's view).
    fn owned<R>(&self, grain: &GrainId, stamp: Option<&ViewStamp>, op: impl FnOnce() -> R) -> Result<R, Refusal> {
        let ownership = self.read();
        check_stamp(&ownership.view, stamp)?;
        if ownership.view.ring.owner(grain) != Some(&self.me) {
            return Err(Refusal::Behind);
        }
        if ownership.recovered.owner(grain) != Some(&self.me) {
            return Err(Refusal::NotReady);
        }
        Ok(op())
    }

    /// The live registration of `grain`, or a new one made by `place` (first writer wins).
    pub(crate) fn lookup_or_place(
        &self,
        grain: &GrainId,
        stamp: Option<&ViewStamp>,
        liveness: impl Fn(&Registration) -> Liveness,
        place: impl FnOnce() -> Registration,
    ) -> Result<Registration, Refusal> {
        self.owned(grain, stamp, || match self.entries.entry(grain.clone()) {
            Entry::Occupied(mut slot) => match liveness(slot.get()) {
                Liveness::Live => Ok(slot.get().clone()),
                Liveness::Fenced => Err(Refusal::Fenced),
                Liveness::Gone => {
                    slot.insert(place());
                    Ok(slot.get().clone())
                }
            },
            Entry::Vacant(slot) => Ok(slot.insert(place()).clone()),
        })?
    }

    /// Registers `registration` for `grain` unless a live registration on another silo is there; returns the
    /// winner. A silo's new registration replaces its own older one (a silo holds at most one activation of a
    /// grain, so the older one has ended).
    pub(crate) fn register(
        &self,
        grain: &GrainId,
        stamp: Option<&ViewStamp>,
        registration: Registration,
        liveness: impl Fn(&Registration) -> Liveness,
    ) -> Result<Registration, Refusal> {
        self.lookup_or_place(
            grain,
            stamp,
            |current| if current.silo == registration.silo { Liveness::Gone } else { liveness(current) },
            || registration.clone(),
        )
    }

    /// Removes `grain`'s entry if it is `registration`.
    pub(crate) fn unregister(&self, grain: &GrainId, registration: &Registration) {
        let _ownership = self.read();
        self.entries.remove_if(grain, |_, current| current == registration);
    }

    /// Hands the entries of the grains that `requester` owns under `stamp` over to it (removing them here).
    /// Refuses unless this partition's view is the requester's.
    pub(crate) fn hand_off(
        &self,
        stamp: &ViewStamp,
        requester: &SiloAddress,
    ) -> Result<Vec<(GrainId, Registration)>, Refusal> {
        let ownership = self.read();
        check_stamp(&ownership.view, Some(stamp))?;
        let ring = &ownership.view.ring;
        let mut handed = Vec::new();
        self.entries.retain(|grain, registration| {
            if ring.owner(grain) == Some(requester) {
                handed.push((grain.clone(), registration.clone()));
                false
            } else {
                true
            }
        });
        Ok(handed)
    }

    /// Ends the recovery of the ranges gained in the view with `ring_id`: `entries` (one per grain, decided by
    /// the recovery) are installed and the ranges answer from now on. Returns false, changing nothing, if the
    /// view has moved on meanwhile (a newer recovery is under way).
    pub(crate) fn complete_recovery(&self, ring_id: u64, entries: Vec<(GrainId, Registration)>) -> bool {
        let mut ownership = self.ownership.write().unwrap_or_else(|e| e.into_inner());
        if ownership.view.ring_id != ring_id {
            return false;
        }
        for (grain, registration) in entries {
            if ownership.view.ring.owner(&grain) == Some(&self.me)
                && ownership.recovered.owner(&grain) != Some(&self.me)
            {
                self.entries.insert(grain, registration);
            }
        }
        ownership.recovered = ownership.view.ring.clone();
        true
    }

    /// Number of entries.
    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }
}

/// Refuses a caller whose view is not `view`.
fn check_stamp(view: &ClusterView, stamp: Option<&ViewStamp>) -> Result<(), Refusal> {
    match stamp {
        Some(stamp) if stamp.ring_id != view.ring_id => {
            if stamp.version < view.version {
                Err(Refusal::StaleView { version: view.version })
            } else {
                Err(Refusal::Behind)
            }
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn silo(port: u16) -> SiloAddress {
        SiloAddress { endpoint: format!("h:{port}"), epoch: 1 }
    }

    fn reg(port: u16, id: u64) -> Registration {
        Registration { silo: silo(port), id }
    }

    fn view(version: i64, ports: &[u16]) -> Arc<ClusterView> {
        Arc::new(ClusterView::of_active(version, ports.iter().map(|p| silo(*p)).collect()))
    }

    fn live(_: &Registration) -> Liveness {
        Liveness::Live
    }

    /// A partition of silo 1 that owns every grain: the only silo of its first view.
    fn alone() -> DirectoryPartition {
        let partition = DirectoryPartition::new(silo(1));
        assert!(partition.install(view(1, &[1])), "the first view gains the whole ring");
        assert!(partition.complete_recovery(view(1, &[1]).ring_id, Vec::new()));
        partition
    }

    #[test]
    fn the_first_registration_wins_and_later_ones_learn_the_winner() {
        let partition = alone();
        let grain = GrainId::new("G", 1i64);
        assert_eq!(partition.register(&grain, None, reg(1, 10), live), Ok(reg(1, 10)));
        assert_eq!(partition.register(&grain, None, reg(2, 20), live), Ok(reg(1, 10)));
        assert_eq!(partition.lookup_or_place(&grain, None, live, || reg(3, 30)), Ok(reg(1, 10)));
    }

    #[test]
    fn a_silo_re_registering_replaces_its_own_older_entry_and_the_stale_unregister_misses() {
        let partition = alone();
        let grain = GrainId::new("G", 1i64);
        partition.register(&grain, None, reg(1, 10), live).unwrap();
        assert_eq!(partition.register(&grain, None, reg(1, 11), live), Ok(reg(1, 11)));
        partition.unregister(&grain, &reg(1, 10));
        assert_eq!(partition.register(&grain, None, reg(2, 20), live), Ok(reg(1, 11)), "another silo still loses");
    }

    #[test]
    fn an_entry_on_a_gone_silo_is_replaced_and_one_on_a_fenced_silo_is_not() {
        let partition = alone();
        let grain = GrainId::new("G", 1i64);
        partition.register(&grain, None, reg(2, 10), live).unwrap();
        let fenced = |r: &Registration| if r.silo == silo(2) { Liveness::Fenced } else { Liveness::Live };
        assert_eq!(partition.lookup_or_place(&grain, None, fenced, || reg(3, 30)), Err(Refusal::Fenced));
        let gone = |r: &Registration| if r.silo == silo(2) { Liveness::Gone } else { Liveness::Live };
        assert_eq!(partition.lookup_or_place(&grain, None, gone, || reg(3, 30)), Ok(reg(3, 30)));
    }

    #[test]
    fn a_stale_unregister_leaves_the_newer_entry() {
        let partition = alone();
        let grain = GrainId::new("G", 1i64);
        partition.register(&grain, None, reg(1, 10), live).unwrap();
        partition.unregister(&grain, &reg(1, 10));
        partition.register(&grain, None, reg(1, 11), live).unwrap();
        partition.unregister(&grain, &reg(1, 10));
        assert_eq!(partition.lookup_or_place(&grain, None, live, || reg(9, 99)), Ok(reg(1, 11)));
    }

    #[test]
    fn callers_with_another_view_are_told_who_is_behind() {
        let partition = alone();
        let grain = GrainId::new("G", 1i64);
        let older = ViewStamp { version: 0, ring_id: 7 };
        let newer = ViewStamp { version: 5, ring_id: 7 };
        assert_eq!(
            partition.lookup_or_place(&grain, Some(&older), live, || reg(1, 1)),
            Err(Refusal::StaleView { version: 1 })
        );
        assert_eq!(partition.lookup_or_place(&grain, Some(&newer), live, || reg(1, 1)), Err(Refusal::Behind));
        let same = view(1, &[1]).stamp();
        assert_eq!(partition.lookup_or_place(&grain, Some(&same), live, || reg(1, 1)), Ok(reg(1, 1)));
    }

    #[test]
    fn a_gained_range_answers_nothing_until_recovered_and_then_holds_the_handed_over_entries() {
        // Silo 2 leaves a two-silo cluster: silo 1 gains silo 2's ranges.
        let partition = DirectoryPartition::new(silo(1));
        let both = view(1, &[1, 2]);
        assert!(partition.install(both.clone()));
        assert!(partition.complete_recovery(both.ring_id, Vec::new()));
        let gained = (0..1000i64)
            .map(|i| GrainId::new("G", i))
            .find(|g| both.ring.owner(g) == Some(&silo(2)))
            .expect("silo 2 owns some grain");
        let kept = (0..1000i64).map(|i| GrainId::new("G", i)).find(|g| both.ring.owner(g) == Some(&silo(1))).unwrap();
        let one = view(2, &[1]);
        assert!(partition.install(one.clone()), "silo 1 gains silo 2's ranges");
        assert_eq!(partition.lookup_or_place(&gained, None, live, || reg(1, 1)), Err(Refusal::NotReady));
        assert_eq!(partition.register(&gained, None, reg(1, 1), live), Err(Refusal::NotReady));
        assert_eq!(partition.lookup_or_place(&kept, None, live, || reg(1, 5)), Ok(reg(1, 5)), "old ranges answer");
        assert!(!partition.complete_recovery(both.ring_id, Vec::new()), "a recovery for an older view is void");
        assert!(partition.complete_recovery(one.ring_id, vec![(gained.clone(), reg(3, 30))]));
        assert_eq!(partition.lookup_or_place(&gained, None, live, || reg(1, 1)), Ok(reg(3, 30)));
    }

    #[test]
    fn a_hand_off_moves_the_requesters_entries_and_only_under_the_same_view() {
        let partition = alone();
        let grains: Vec<GrainId> = (0..200i64).map(|i| GrainId::new("G", i)).collect();
        for (i, grain) in grains.iter().enumerate() {
            partition.register(grain, None, reg(1, i as u64), live).unwrap();
        }
        let both = view(2, &[1, 2]);
        assert!(!partition.install(both.clone()), "a joining silo only takes ranges away");
        let theirs = grains.iter().filter(|g| both.ring.owner(g) == Some(&silo(2))).count();
        assert!(theirs > 0);
        for grain in grains.iter().filter(|g| both.ring.owner(g) == Some(&silo(2))) {
            assert_eq!(partition.lookup_or_place(grain, None, live, || reg(1, 1)), Err(Refusal::Behind));
        }
        assert_eq!(partition.hand_off(&view(1, &[1]).stamp(), &silo(2)), Err(Refusal::StaleView { version: 2 }));
        let handed = partition.hand_off(&both.stamp(), &silo(2)).unwrap();
        assert_eq!(handed.len(), theirs);
        assert_eq!(partition.len(), grains.len() - theirs);
    }

    #[test]
    fn gains_are_exact() {
        let (one, two) = (view(1, &[1]).ring.clone(), view(2, &[1, 2]).ring.clone());
        assert!(gains(&HashRing::default(), &one, &silo(1)));
        assert!(!gains(&one, &two, &silo(1)), "a newcomer takes ranges away, it gives none");
        assert!(gains(&one, &two, &silo(2)));
        assert!(gains(&two, &one, &silo(1)));
        assert!(!gains(&two, &two, &silo(1)));
    }
}
