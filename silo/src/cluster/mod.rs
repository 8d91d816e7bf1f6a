//! The cluster: membership, the two-tier placement lookup, and the connections between silos.
//!
//! - `membership` keeps this silo's row in the membership table, probes peers, votes suspects dead, and
//!   turns each table snapshot into a [`ClusterView`].
//! - Tier one, [`ring`]: a consistent-hash ring over the view's active silos names the directory owner of a
//!   grain id. Tier two, `directory`: the owner's partition records which silo holds the activation, and
//!   places the grain (by its `placement` strategy) when none does.
//! - Callers cache what the directory told them; a silo that no longer hosts a grain answers
//!   [`CallError::NotHere`] and the caller asks the directory again.
//! - Silos talk over one multiplexed stream per peer (`connection`); `system` calls (probes,
//!   directory operations) share those streams with grain calls.
//!
//! A single silo is a cluster of one (with the in-memory membership table by default): every path is the same.

pub(crate) mod directory;
pub(crate) mod membership;
pub(crate) mod placement;
pub mod ring;
pub(crate) mod seed;
pub(crate) mod system;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use grains::{CallError, GrainId, Placement};
use grains_storage::{MembershipEntry, MembershipSnapshot, MembershipTable, SiloAddress, SiloStatus};
use tokio::sync::{Notify, watch};
use tokio::time::Instant;

use crate::config::ClusterTimings;
use crate::connection::{Connection, ConnectionPool, PeerKind};
use crate::peer_auth::PeerIdentity;
use directory::DirectoryPartition;
use ring::HashRing;
pub use system::Registration;
use system::{SystemRequest, SystemResponse};

/// What this silo believes the cluster looks like: one membership table snapshot, digested.
#[derive(Debug, Clone, Default)]
pub struct ClusterView {
    /// The table version the view was read at.
    pub version: i64,
    /// Every row.
    pub rows: Vec<MembershipEntry>,
    /// Active silos, sorted.
    pub active: Vec<SiloAddress>,
    /// The ring over the active silos.
    pub ring: HashRing,
}

impl ClusterView {
    /// The view of a table snapshot.
    pub fn from_snapshot(snapshot: &MembershipSnapshot) -> Self {
        let rows: Vec<MembershipEntry> = snapshot.rows.iter().map(|r| r.entry.clone()).collect();
        let active: BTreeSet<SiloAddress> =
            rows.iter().filter(|r| r.status == SiloStatus::Active).map(|r| r.silo.clone()).collect();
        let active: Vec<SiloAddress> = active.into_iter().collect();
        let ring = HashRing::new(&active);
        ClusterView { version: snapshot.version, rows, active, ring }
    }

    /// Whether `silo` is active in this view.
    pub fn is_active(&self, silo: &SiloAddress) -> bool {
        self.active.binary_search(silo).is_ok()
    }

    /// The status of `silo` in this view.
    pub fn status(&self, silo: &SiloAddress) -> Option<SiloStatus> {
        self.rows.iter().find(|r| &r.silo == silo).map(|r| r.status)
    }

    /// The gateway addresses of the active silos.
    pub fn gateways(&self) -> Vec<String> {
        self.rows.iter().filter(|r| r.status == SiloStatus::Active).filter_map(|r| r.gateway.clone()).collect()
    }
}

/// The cluster machinery of one silo.
pub(crate) struct Cluster {
    pub(crate) me: SiloAddress,
    pub(crate) timings: ClusterTimings,
    pub(crate) table: Arc<dyn MembershipTable>,
    view: watch::Sender<Arc<ClusterView>>,
    pub(crate) directory: DirectoryPartition,
    pub(crate) cache: DashMap<GrainId, Registration>,
    evictions: std::sync::atomic::AtomicU32,
    pub(crate) loads: DashMap<SiloAddress, u64>,
    peers: ConnectionPool,
    pub(crate) refresh_now: Notify,
}

impl Cluster {
    /// The cluster machinery of silo `me`, which proves its membership to peers with `identity`.
    pub(crate) fn new(
        me: SiloAddress,
        timings: ClusterTimings,
        table: Arc<dyn MembershipTable>,
        identity: PeerIdentity,
    ) -> Self {
        placement::seed_from_clock();
        // Until the table is read, the silo sees itself alone: a single silo works from the first call.
        let alone = ClusterView { active: vec![me.clone()], ring: HashRing::new([&me]), ..ClusterView::default() };
        Cluster {
            me,
            timings,
            table,
            view: watch::Sender::new(Arc::new(alone)),
            directory: DirectoryPartition::default(),
            cache: DashMap::new(),
            evictions: std::sync::atomic::AtomicU32::new(0),
            loads: DashMap::new(),
            peers: ConnectionPool::new(PeerKind::Silo, timings.connect_timeout, Some(identity)),
            refresh_now: Notify::new(),
        }
    }

    /// The current view.
    pub(crate) fn view(&self) -> Arc<ClusterView> {
        self.view.borrow().clone()
    }

    /// Remembers where a remote grain lives. The cache is bounded: past `capacity` entries, about half of them
    /// (chosen by hash, alternating halves) are forgotten, to be looked up again when next called.
    pub(crate) fn remember(&self, grain: GrainId, registration: Registration, capacity: usize) {
        self.cache.insert(grain, registration);
        if self.cache.len() > capacity {
            let half = u32::from(self.evictions.fetch_add(1, std::sync::atomic::Ordering::Relaxed).is_multiple_of(2));
            self.cache.retain(|grain, _| ring::grain_hash(grain) % 2 != half);
        }
    }

    /// Installs a new view; returns the previous one.
    pub(crate) fn install_view(&self, view: Arc<ClusterView>) -> Arc<ClusterView> {
        self.view.send_replace(view)
    }

    /// The open connection to `silo`, opening one if needed.
    pub(crate) async fn peer(&self, silo: &SiloAddress) -> Result<Arc<Connection>, CallError> {
        self.peers.get(&silo.endpoint).await
    }

    /// Closes the connections to silos that are dead (or gone from the table): their calls in flight fail
    /// now. A silo that is shutting down keeps its connections until it has answered what it was sent.
    pub(crate) fn close_peers_not_in(&self, view: &ClusterView) {
        self.peers
            .retain(|endpoint| view.rows.iter().any(|r| r.silo.endpoint == endpoint && r.status != SiloStatus::Dead));
    }

    /// A system call to `silo`.
    pub(crate) async fn system_call(
        &self,
        silo: &SiloAddress,
        request: &SystemRequest,
        deadline: Instant,
    ) -> Result<SystemResponse, CallError> {
        let conn = self.peer(silo).await?;
        system::call(&conn, request, deadline).await
    }

    /// The registration of `grain` at its directory owner here: existing and live, or newly placed.
    pub(crate) fn local_lookup_or_place(
        &self,
        grain: &GrainId,
        caller: &SiloAddress,
        strategy: Placement,
    ) -> Registration {
        let view = self.view();
        self.directory.lookup_or_place(
            grain,
            |r| view.is_active(&r.silo),
            || {
                let silo = if view.active.is_empty() {
                    self.me.clone()
                } else {
                    placement::place(strategy, grain, caller, &view.active, &self.loads)
                };
                Registration { silo, id: placement::registration_id() }
            },
        )
    }

    /// Registers `registration` for `grain` here (first writer wins); returns the winner.
    pub(crate) fn local_register(&self, grain: &GrainId, registration: Registration) -> Registration {
        let view = self.view();
        self.directory.register(grain, registration, |r| view.is_active(&r.silo) || r.silo == self.me)
    }

    /// Where `grain` lives, asking its directory owner (placing it if it lives nowhere).
    pub(crate) async fn locate(
        &self,
        grain: &GrainId,
        strategy: Placement,
        deadline: Instant,
    ) -> Result<Registration, CallError> {
        let owner = self.view().ring.owner(grain).cloned().unwrap_or_else(|| self.me.clone());
        if owner == self.me {
            return Ok(self.local_lookup_or_place(grain, &self.me, strategy));
        }
        let request =
            SystemRequest::LookupOrPlace { grain: grain.clone(), caller: self.me.clone(), placement: strategy };
        match self.system_call(&owner, &request, deadline).await? {
            SystemResponse::Placed(registration) => Ok(registration),
            other => Err(CallError::Protocol(format!("unexpected directory answer {other:?}"))),
        }
    }

    /// Registers activations with their directory owners; returns the winner of each, in order.
    pub(crate) async fn register(
        &self,
        entries: Vec<(GrainId, Registration)>,
        deadline: Instant,
    ) -> Result<Vec<Registration>, CallError> {
        let view = self.view();
        let mut by_owner: std::collections::HashMap<SiloAddress, Vec<(usize, GrainId, Registration)>> =
            std::collections::HashMap::new();
        for (i, (grain, registration)) in entries.into_iter().enumerate() {
            let owner = view.ring.owner(&grain).cloned().unwrap_or_else(|| self.me.clone());
            by_owner.entry(owner).or_default().push((i, grain, registration));
        }
        let total: usize = by_owner.values().map(Vec::len).sum();
        let mut winners: Vec<Option<Registration>> = vec![None; total];
        for (owner, batch) in by_owner {
            if owner == self.me {
                for (i, grain, registration) in batch {
                    winners[i] = Some(self.local_register(&grain, registration));
                }
                continue;
            }
            let request =
                SystemRequest::Register { entries: batch.iter().map(|(_, g, r)| (g.clone(), r.clone())).collect() };
            match self.system_call(&owner, &request, deadline).await? {
                SystemResponse::Registered(list) if list.len() == batch.len() => {
                    for ((i, _, _), winner) in batch.into_iter().zip(list) {
                        winners[i] = Some(winner);
                    }
                }
                other => return Err(CallError::Protocol(format!("unexpected directory answer {other:?}"))),
            }
        }
        winners.into_iter().map(|w| w.ok_or_else(|| CallError::Protocol("missing registration".into()))).collect()
    }

    /// Removes `grain`'s directory entry if it is still `registration` (in the background).
    pub(crate) fn unregister(self: &Arc<Self>, grain: GrainId, registration: Registration) {
        self.cache.remove_if(&grain, |_, r| r == &registration);
        let owner = self.view().ring.owner(&grain).cloned().unwrap_or_else(|| self.me.clone());
        if owner == self.me {
            self.directory.unregister(&grain, &registration);
            return;
        }
        let cluster = self.clone();
        tokio::spawn(async move {
            let request = SystemRequest::Unregister { grain, registration };
            let deadline = system::deadline_in(cluster.timings.connect_timeout);
            if let Err(error) = cluster.system_call(&owner, &request, deadline).await {
                tracing::debug!(%error, "unregister failed; the owner drops the entry when it notices");
            }
        });
    }

    /// Asks every other active silo to re-read the membership table now.
    pub(crate) fn broadcast_membership_changed(self: &Arc<Self>) {
        let view = self.view();
        for silo in view.active.iter().filter(|s| **s != self.me) {
            let (cluster, silo) = (self.clone(), silo.clone());
            tokio::spawn(async move {
                let deadline = system::deadline_in(Duration::from_secs(2));
                let _ = cluster.system_call(&silo, &SystemRequest::MembershipChanged, deadline).await;
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use grains_storage::MemoryMembershipTable;

    use super::*;

    #[test]
    fn the_routing_cache_stays_within_its_capacity() {
        let me = SiloAddress { endpoint: "127.0.0.1:1".into(), epoch: 1 };
        let identity = PeerIdentity { credentials: Default::default(), endpoint: me.endpoint.clone() };
        let table = Arc::new(MemoryMembershipTable::new());
        let cluster = Cluster::new(me.clone(), ClusterTimings::fast(), table, identity);
        for i in 0..10_000i64 {
            cluster.remember(GrainId::new("G", i), Registration { silo: me.clone(), id: 1 }, 1_000);
            assert!(cluster.cache.len() <= 1_000, "{} entries at {i}", cluster.cache.len());
        }
        assert!(cluster.cache.len() > 100, "eviction forgets part of the cache, not all of it");
    }
}
