//! The cluster: membership, the two-tier placement lookup, and the connections between silos.
//!
//! - `membership` keeps this silo's row in the membership table, probes peers, votes suspects dead, and
//!   turns each table snapshot into a [`ClusterView`]; `health` tells it when this silo itself runs too late
//!   for its probe timeouts to mean anything.
//! - Tier one, `ring`: a consistent-hash ring over the view's active silos names the directory owner of a
//!   grain id. Tier two, `directory`: the owner's partition records which silo holds the activation, and
//!   places the grain (by its `placement` strategy) when none does.
//! - Callers cache what the directory told them; a silo that no longer hosts a grain answers
//!   [`CallError::NotHere`] and the caller asks the directory again.
//! - Silos talk over one multiplexed stream per peer (`connection`); `system` calls (probes,
//!   directory operations) share those streams with grain calls.
//!
//! A single silo is a cluster of one (with the in-memory membership table by default): every path is the same.

pub(crate) mod directory;
pub(crate) mod health;
pub(crate) mod membership;
pub(crate) mod placement;
pub(crate) mod ring;
pub(crate) mod seed;
pub(crate) mod system;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use grains::{CallError, GrainId, Placement};
use grains_storage::{MembershipEntry, MembershipSnapshot, MembershipTable, SiloAddress, SiloStatus};
use tokio::sync::{Notify, watch};
use tokio::time::Instant;

use crate::config::ClusterTimings;
use crate::connection::{Connection, ConnectionPool, PeerKind};
use crate::maps::{FastDashMap, FastHashMap};
use crate::peer_auth::PeerIdentity;
use directory::{DirectoryPartition, Liveness};
use ring::HashRing;
pub use system::Registration;
use system::{Refusal, SystemRequest, SystemResponse, ViewStamp};

/// What this silo believes the cluster looks like: one membership table snapshot, digested.
#[derive(Debug, Clone, Default)]
pub struct ClusterView {
    /// The table version the view was read at.
    pub(crate) version: i64,
    /// Every row.
    pub(crate) rows: Vec<MembershipEntry>,
    /// Active silos, sorted.
    pub(crate) active: Vec<SiloAddress>,
    /// The ring over the active silos.
    pub(crate) ring: HashRing,
    /// Identifies the ring: views with the same active silos have the same id, whatever their versions.
    pub(crate) ring_id: u64,
}

impl ClusterView {
    /// The membership table version the view was read at (0: no view yet).
    pub fn version(&self) -> i64 {
        self.version
    }

    /// Every row of the membership table: each silo incarnation and its status.
    pub fn rows(&self) -> &[MembershipEntry] {
        &self.rows
    }

    /// The active silos, sorted.
    pub fn active(&self) -> &[SiloAddress] {
        &self.active
    }

    /// The directory owner of `grain` in this view (tier one of placement: the consistent-hash ring over the
    /// active silos); `None` when no silo is active.
    pub fn directory_owner(&self, grain: &GrainId) -> Option<&SiloAddress> {
        self.ring.owner(grain)
    }

    /// Identifies the set of active silos: views with the same active silos have the same id, whatever their
    /// versions.
    pub fn ring_id(&self) -> u64 {
        self.ring_id
    }

    /// The view of a table snapshot.
    pub fn from_snapshot(snapshot: &MembershipSnapshot) -> Self {
        let rows: Vec<MembershipEntry> = snapshot.rows.iter().map(|r| r.entry.clone()).collect();
        let active: BTreeSet<SiloAddress> =
            rows.iter().filter(|r| r.status == SiloStatus::Active).map(|r| r.silo.clone()).collect();
        ClusterView { rows, ..Self::of_active(snapshot.version, active.into_iter().collect()) }
    }

    /// A view at `version` in which `active` (sorted) are the active silos, and no other rows.
    pub(crate) fn of_active(version: i64, active: Vec<SiloAddress>) -> Self {
        let ring = HashRing::new(&active);
        let ids: Vec<String> = active.iter().map(|s| format!("{}@{}", s.endpoint, s.epoch)).collect();
        let ring_id = xxhash_rust::xxh3::xxh3_64(ids.join(",").as_bytes());
        ClusterView { version, rows: Vec::new(), active, ring, ring_id }
    }

    /// The stamp directory requests decided under this view carry.
    pub(crate) fn stamp(&self) -> ViewStamp {
        ViewStamp { version: self.version, ring_id: self.ring_id }
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

/// The activations of the silo a [`Cluster`] belongs to, as the directory sees them.
pub(crate) trait LocalActivations: Send + Sync {
    /// The confirmed activations here whose grain `keep` accepts, with their registrations.
    fn activations_where(&self, keep: &dyn Fn(&GrainId) -> bool) -> Vec<(GrainId, Registration)>;
    /// Stops the activation of `grain` registered as `registration`, a duplicate, before its next turn.
    fn evict(&self, grain: &GrainId, registration: &Registration);
    /// Stops every activation before its next turn (this silo was declared dead).
    fn evict_all(&self);
}

/// This silo's membership lease: it may serve calls and write state only while its last confirmation that it
/// is still a member (a table read showing it not dead) is younger than the lease. Peers wait out the same
/// duration after declaring a silo dead before they re-place its grains, so a silo that was frozen, partitioned
/// or slow has stopped on its own before its grains live anywhere else.
#[derive(Debug)]
pub(crate) struct Lease {
    origin: Instant,
    until_ms: AtomicU64,
    duration: Duration,
    revoked: std::sync::atomic::AtomicBool,
}

impl Lease {
    fn new(duration: Duration) -> Self {
        // A starting silo has not been declared dead by anybody: it holds one lease from the start.
        Self {
            origin: Instant::now(),
            until_ms: AtomicU64::new(duration.as_millis() as u64),
            duration,
            revoked: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Ends the lease for good (the silo was declared dead, or has stopped).
    pub(crate) fn revoke(&self) {
        self.revoked.store(true, Ordering::Release);
    }

    /// Extends the lease from `confirmed_at`: the moment the read that confirmed membership started.
    pub(crate) fn renew(&self, confirmed_at: Instant) {
        let until = (confirmed_at.saturating_duration_since(self.origin) + self.duration).as_millis() as u64;
        self.until_ms.fetch_max(until, Ordering::AcqRel);
    }

    /// Whether the lease holds now. Reads the clock (a frozen process must see the time it lost; outside a
    /// simulation, `tokio::time::Instant` is the system's monotonic clock).
    pub(crate) fn is_valid(&self) -> bool {
        self.is_valid_at(Instant::now())
    }

    /// Whether the lease holds at `now`, a clock reading just taken.
    pub(crate) fn is_valid_at(&self, now: Instant) -> bool {
        !self.revoked.load(Ordering::Acquire)
            && (now.saturating_duration_since(self.origin).as_millis() as u64) < self.until_ms.load(Ordering::Acquire)
    }
}

/// Retry pacing: doubling sleeps from 5 ms up to a cap, never past a deadline.
#[derive(Debug)]
pub(crate) struct Backoff {
    next: Duration,
    cap: Duration,
}

impl Backoff {
    /// Sleeps from 5 ms up to `cap`.
    pub(crate) fn new(cap: Duration) -> Self {
        Self { next: Duration::from_millis(5), cap }
    }

    /// Sleeps for the next interval; if that would end past `deadline`, sleeps until `deadline` and returns
    /// false. It always sleeps: a retry loop around it never spins (a simulation found one that did, opening
    /// connections in a tight loop until its deadline).
    pub(crate) async fn wait(&mut self, deadline: Instant) -> bool {
        let wake = Instant::now() + self.next;
        if wake >= deadline {
            tokio::time::sleep_until(deadline).await;
            return false;
        }
        tokio::time::sleep_until(wake).await;
        self.next = (self.next * 2).min(self.cap);
        true
    }
}

/// The cluster machinery of one silo.
pub(crate) struct Cluster {
    pub(crate) me: SiloAddress,
    pub(crate) timings: ClusterTimings,
    pub(crate) table: Arc<dyn MembershipTable>,
    view: watch::Sender<Arc<ClusterView>>,
    pub(crate) directory: DirectoryPartition,
    pub(crate) cache: FastDashMap<GrainId, Registration>,
    evictions: AtomicU32,
    pub(crate) loads: FastDashMap<SiloAddress, u64>,
    peers: ConnectionPool,
    /// Connections for probes only, so that a probe never queues behind a flood of calls on a peer stream
    /// (head-of-line blocking there made loaded silos suspect each other).
    probes: ConnectionPool,
    pub(crate) refresh_now: Notify,
    pub(crate) lease: Lease,
    /// How late this silo's own runtime runs: probes that time out while it is late do not count.
    pub(crate) health: Arc<health::LocalHealth>,
    /// Silos declared dead that may still serve until the instant given (their lease, seen from here).
    fenced: Mutex<FastHashMap<SiloAddress, Instant>>,
    /// Silos that announced they are stopping: no new activations go there.
    draining: FastDashMap<SiloAddress, ()>,
    /// This silo's activations.
    activations: Arc<dyn LocalActivations>,
    /// Set once this silo serves no more: declared dead by the cluster, or shut down.
    stopped: watch::Sender<bool>,
    /// The same, read on every call: a watch's value sits behind a lock whose readers all write its state,
    /// one cache line two cores calling at once would fight over.
    is_stopped: AtomicBool,
    /// The membership changes this silo has seen, for the dashboard.
    pub(crate) events: crate::stats::MembershipEvents,
}

impl Cluster {
    /// The cluster machinery of silo `me`, which proves its membership to peers with `identity` and hosts
    /// `activations`.
    pub(crate) fn new(
        me: SiloAddress,
        timings: ClusterTimings,
        table: Arc<dyn MembershipTable>,
        identity: PeerIdentity,
        activations: Arc<dyn LocalActivations>,
    ) -> Self {
        // Until the table is read, the silo sees itself alone (version 0): routing waits for the first real view,
        // and its directory partition owns nothing yet.
        let alone = ClusterView::of_active(0, vec![me.clone()]);
        Cluster {
            directory: DirectoryPartition::new(me.clone()),
            me,
            timings,
            table,
            view: watch::Sender::new(Arc::new(alone)),
            cache: FastDashMap::default(),
            evictions: AtomicU32::new(0),
            loads: FastDashMap::default(),
            peers: ConnectionPool::new(PeerKind::Silo, timings.connect_timeout, Some(identity.clone())),
            probes: ConnectionPool::new(PeerKind::Silo, timings.connect_timeout, Some(identity)),
            refresh_now: Notify::new(),
            lease: Lease::new(timings.lease),
            health: Arc::new(health::LocalHealth::new(timings.probe_timeout)),
            fenced: Mutex::new(FastHashMap::default()),
            draining: FastDashMap::default(),
            activations,
            stopped: watch::Sender::new(false),
            is_stopped: AtomicBool::new(false),
            events: Default::default(),
        }
    }

    /// Whether this silo has stopped serving (declared dead, or shut down).
    pub(crate) fn is_stopped(&self) -> bool {
        self.is_stopped.load(Ordering::Acquire)
    }

    /// Resolves once this silo has stopped serving.
    pub(crate) fn stopped(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut stopped = self.stopped.subscribe();
        async move {
            let _ = stopped.wait_for(|s| *s).await;
        }
    }

    /// Stops serving for good: the lease ends, and the silo's activations leave before their next turn when
    /// `evict` (declared dead: their grains may live elsewhere by now).
    pub(crate) fn stop(&self, evict: bool) {
        self.lease.revoke();
        self.is_stopped.store(true, Ordering::Release);
        self.stopped.send_replace(true);
        if evict {
            self.activations.evict_all();
        }
    }

    /// The current view.
    pub(crate) fn view(&self) -> Arc<ClusterView> {
        self.view.borrow().clone()
    }

    /// Every view this silo adopts from now on, as it adopts it.
    pub(crate) fn watch_view(&self) -> watch::Receiver<Arc<ClusterView>> {
        self.view.subscribe()
    }

    /// Waits until the view is at least `version`, or `deadline`.
    async fn wait_for_version(&self, version: i64, deadline: Instant) {
        let mut views = self.view.subscribe();
        self.refresh_now.notify_one();
        let _ = tokio::time::timeout_at(deadline, views.wait_for(|v| v.version >= version)).await;
    }

    /// Remembers where a remote grain lives. The cache is bounded: past `capacity` entries, about half of them
    /// (chosen by hash, alternating halves) are forgotten, to be looked up again when next called.
    pub(crate) fn remember(&self, grain: GrainId, registration: Registration, capacity: usize) {
        self.cache.insert(grain, registration);
        if self.cache.len() > capacity {
            let half = u32::from(self.evictions.fetch_add(1, Ordering::Relaxed).is_multiple_of(2));
            self.cache.retain(|grain, _| ring::grain_hash(grain) % 2 != half);
        }
    }

    /// What the directory may assume about `silo` under `view`.
    fn liveness(&self, view: &ClusterView, silo: &SiloAddress) -> Liveness {
        if view.is_active(silo) || silo == &self.me {
            return Liveness::Live;
        }
        let fenced = self.fenced.lock().unwrap_or_else(|e| e.into_inner());
        match fenced.get(silo) {
            Some(until) if Instant::now() < *until => Liveness::Fenced,
            _ => Liveness::Gone,
        }
    }

    /// How long after this silo has seen a peer declared dead the peer may still believe in its lease.
    fn fence_margin(&self) -> Duration {
        self.timings.lease + self.timings.lease / 10
    }

    /// Adopts a newer membership view: forget dead silos, fence the newly dead until their leases have run
    /// out, and take over (recover) the directory ranges this silo gains. A view that declares this silo dead
    /// stops it instead.
    pub(crate) fn apply_view(self: &Arc<Self>, view: ClusterView) {
        if view.status(&self.me) == Some(SiloStatus::Dead) {
            if !self.is_stopped() {
                tracing::error!(silo = %self.me, "this silo was declared dead by the cluster; it stops serving");
                self.stop(true);
            }
            return;
        }
        let view = Arc::new(view);
        let old = {
            let mut old = None;
            self.view.send_if_modified(|current| {
                if view.version < current.version {
                    return false; // an older snapshot read concurrently with a newer one
                }
                old = Some(std::mem::replace(current, view.clone()));
                true
            });
            match old {
                Some(old) => old,
                None => return,
            }
        };
        self.fence_newly_dead(&old, &view);
        self.events.record(&old, &view);
        if old.ring_id != view.ring_id {
            tracing::info!(version = view.version, active = ?view.active.iter().map(ToString::to_string).collect::<Vec<_>>(), "membership view changed");
            self.close_peers_not_in(&view);
            self.cache.retain(|_, r| self.liveness(&view, &r.silo) == Liveness::Live);
            self.draining.retain(|silo, _| view.is_active(silo));
        }
        if self.directory.install(view.clone()) {
            tokio::spawn(self.clone().recover(view));
        }
    }

    /// Fences every silo that was a member in `old` and is dead or gone in `new` (a silo that announced its
    /// shutdown has ended its activations first, so it needs no fence). In the first view, silos declared dead
    /// shortly before are fenced for what remains of their lease, judged by the declaration time.
    fn fence_newly_dead(&self, old: &ClusterView, new: &ClusterView) {
        let now = Instant::now();
        let margin = self.fence_margin();
        let mut fenced = self.fenced.lock().unwrap_or_else(|e| e.into_inner());
        fenced.retain(|_, until| *until > now);
        for row in &new.rows {
            if row.status != SiloStatus::Dead || fenced.contains_key(&row.silo) {
                continue;
            }
            let until = if old.version == 0 {
                let declared = row.suspicions.iter().map(|s| s.at_ms).max().unwrap_or(row.heartbeat_at_ms);
                let since = Duration::from_millis(membership::now_ms().saturating_sub(declared).max(0) as u64);
                match margin.checked_sub(since) {
                    Some(left) => now + left,
                    None => continue,
                }
            } else if old.status(&row.silo) == Some(SiloStatus::Active) {
                now + margin
            } else {
                continue;
            };
            tracing::info!(silo = %row.silo, fence = ?until.saturating_duration_since(now), "fencing a dead silo until its lease has run out");
            fenced.insert(row.silo.clone(), until);
        }
        for silo in old.active.iter().filter(|s| new.status(s).is_none()) {
            fenced.entry(silo.clone()).or_insert(now + margin);
        }
    }

    /// The latest instant until which some silo is fenced.
    fn fenced_until(&self) -> Option<Instant> {
        self.fenced.lock().unwrap_or_else(|e| e.into_inner()).values().max().copied()
    }

    /// Recovers the directory ranges gained in `view`: waits out the leases of silos declared dead (their
    /// activations may have had no other record), then takes every previous owner's entries in those ranges
    /// and every live silo's report of its activations there, settles duplicates, and opens the ranges. Ends
    /// early when a newer view arrives (its own recovery takes over).
    async fn recover(self: Arc<Self>, view: Arc<ClusterView>) {
        let started = Instant::now();
        let stamp = view.stamp();
        let mut answers: FastHashMap<SiloAddress, RecoveryAnswer> = FastHashMap::default();
        let mut backoff = Backoff::new(Duration::from_millis(200));
        loop {
            // Statuses move on without changing the ring (a stopping silo ends Dead): ask who is alive now.
            let current = self.view();
            if current.ring_id != view.ring_id {
                return;
            }
            let peers: Vec<SiloAddress> = current
                .rows
                .iter()
                .filter(|r| matches!(r.status, SiloStatus::Active | SiloStatus::ShuttingDown) && r.silo != self.me)
                .map(|r| r.silo.clone())
                .collect();
            if let Some(until) = self.fenced_until().filter(|u| *u > Instant::now()) {
                tokio::time::sleep_until(until.min(Instant::now() + Duration::from_millis(50))).await;
                continue;
            }
            let missing: Vec<&SiloAddress> = peers.iter().filter(|p| !answers.contains_key(*p)).collect();
            let cluster = &*self;
            let asks = missing.iter().map(|peer| async move {
                let request = SystemRequest::Recover { requester: cluster.me.clone(), view: stamp };
                let deadline = system::deadline_in(cluster.timings.connect_timeout * 2);
                ((*peer).clone(), cluster.system_call(peer, &request, deadline).await)
            });
            let mut failed = 0;
            for (peer, answer) in futures_util::future::join_all(asks).await {
                match answer {
                    Ok(SystemResponse::Recovered { entries, activations }) => {
                        answers.insert(peer, (entries, activations));
                    }
                    Ok(SystemResponse::Refused(Refusal::StaleView { version })) => {
                        failed += 1;
                        self.wait_for_version(version, Instant::now() + Duration::from_millis(500)).await;
                    }
                    other => {
                        failed += 1;
                        tracing::debug!(%peer, answer = ?other.map(|_| ()), "directory recovery: no answer yet");
                    }
                }
            }
            if failed > 0 {
                backoff.wait(Instant::now() + Duration::from_secs(3600)).await;
                continue;
            }
            let mine = |grain: &GrainId| view.ring.owner(grain) == Some(&self.me);
            let local = self.activations.activations_where(&mine);
            let (entries, evictions) = settle(answers.values(), local);
            let count = entries.len();
            if !self.directory.complete_recovery(view.ring_id, entries) {
                return;
            }
            tracing::info!(version = view.version, entries = count, duplicates = evictions.len(), took = ?started.elapsed(), "directory ranges recovered");
            for (grain, registration) in evictions {
                self.evict(grain, registration);
            }
            return;
        }
    }

    /// Tells the silo of `registration` that its activation of `grain` is a duplicate.
    fn evict(self: &Arc<Self>, grain: GrainId, registration: Registration) {
        tracing::warn!(%grain, silo = %registration.silo, "duplicate activation found; evicting it");
        if registration.silo == self.me {
            self.activations.evict(&grain, &registration);
            return;
        }
        let cluster = self.clone();
        tokio::spawn(async move {
            let silo = registration.silo.clone();
            let request = SystemRequest::Evict { grain, registration };
            let deadline = system::deadline_in(cluster.timings.connect_timeout * 2);
            if let Err(error) = cluster.system_call(&silo, &request, deadline).await {
                tracing::warn!(%silo, %error, "eviction not delivered");
            }
        });
    }

    /// Answers a peer's `Recover`: hands over this partition's entries in the requester's new ranges, with
    /// this silo's activations there. A partition behind the requester re-reads membership first.
    pub(crate) fn answer_recover(&self, requester: &SiloAddress, stamp: &ViewStamp) -> SystemResponse {
        let handed = match self.directory.hand_off(stamp, requester) {
            Ok(handed) => handed,
            Err(refusal) => {
                if refusal == Refusal::Behind {
                    self.refresh_now.notify_one();
                }
                return SystemResponse::Refused(refusal);
            }
        };
        let ring = self.directory.view().ring.clone();
        let theirs = |grain: &GrainId| ring.owner(grain) == Some(requester);
        let activations = self.activations.activations_where(&theirs);
        SystemResponse::Recovered { entries: handed, activations }
    }

    /// The open connection to `silo`, opening one if needed.
    pub(crate) async fn peer(&self, silo: &SiloAddress) -> Result<Arc<Connection>, CallError> {
        self.peers.get(&silo.endpoint).await
    }

    /// Closes the connections to silos that are dead (or gone from the table): their calls in flight fail
    /// now. A silo that is shutting down keeps its connections until it has answered what it was sent.
    pub(crate) fn close_peers_not_in(&self, view: &ClusterView) {
        let keep =
            |endpoint: &str| view.rows.iter().any(|r| r.silo.endpoint == endpoint && r.status != SiloStatus::Dead);
        self.peers.retain(keep);
        self.probes.retain(keep);
    }

    /// Probes `silo` on the probe connection.
    pub(crate) async fn probe(&self, silo: &SiloAddress, deadline: Instant) -> Result<SystemResponse, CallError> {
        let conn = self.probes.get(&silo.endpoint).await?;
        system::call(&conn, &SystemRequest::Ping, deadline).await
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

    /// Marks `silo` as stopping: no new activations are placed there.
    pub(crate) fn mark_draining(&self, silo: SiloAddress) {
        self.draining.insert(silo, ());
    }

    /// The registration of `grain` at its directory owner here: existing and live, or newly placed.
    pub(crate) fn local_lookup_or_place(
        &self,
        grain: &GrainId,
        caller: &SiloAddress,
        strategy: Placement,
        stamp: Option<&ViewStamp>,
    ) -> Result<Registration, Refusal> {
        let view = self.directory.view();
        self.directory.lookup_or_place(
            grain,
            stamp,
            |r| self.liveness(&view, &r.silo),
            || {
                let open: Vec<SiloAddress> =
                    view.active.iter().filter(|s| !self.draining.contains_key(*s)).cloned().collect();
                let candidates = if open.is_empty() { &view.active } else { &open };
                let silo = if candidates.is_empty() {
                    self.me.clone()
                } else {
                    placement::place(strategy, grain, caller, candidates, &self.loads)
                };
                Registration { silo, id: placement::registration_id() }
            },
        )
    }

    /// Registers `registration` for `grain` here (first writer wins); returns the winner.
    pub(crate) fn local_register(
        &self,
        grain: &GrainId,
        registration: Registration,
        stamp: Option<&ViewStamp>,
    ) -> Result<Registration, Refusal> {
        let view = self.directory.view();
        self.directory.register(grain, stamp, registration, |r| self.liveness(&view, &r.silo))
    }

    /// Asks `grain`'s directory owner (by this silo's view) once; refusals are the caller's to retry.
    async fn ask_owner(
        &self,
        grain: &GrainId,
        ask: &DirectoryAsk<'_>,
        deadline: Instant,
    ) -> Result<Result<Registration, Refusal>, CallError> {
        let view = self.view();
        let stamp = view.stamp();
        let owner = view.ring.owner(grain).cloned().unwrap_or_else(|| self.me.clone());
        if owner == self.me {
            return Ok(match ask {
                DirectoryAsk::Locate(strategy) => self.local_lookup_or_place(grain, &self.me, *strategy, Some(&stamp)),
                DirectoryAsk::Register(registration) => {
                    self.local_register(grain, (*registration).clone(), Some(&stamp))
                }
            });
        }
        let request = match ask {
            DirectoryAsk::Locate(strategy) => SystemRequest::LookupOrPlace {
                grain: grain.clone(),
                caller: self.me.clone(),
                placement: *strategy,
                view: stamp,
            },
            DirectoryAsk::Register(registration) => {
                SystemRequest::Register { entries: vec![(grain.clone(), (*registration).clone())], view: stamp }
            }
        };
        match self.system_call(&owner, &request, deadline).await? {
            SystemResponse::Placed(registration) => Ok(Ok(registration)),
            SystemResponse::Registered(mut list) if list.len() == 1 => Ok(list.remove(0)),
            SystemResponse::Refused(refusal) => Ok(Err(refusal)),
            other => Err(CallError::Protocol(format!("unexpected directory answer {other:?}"))),
        }
    }

    /// Runs a directory request until its owner answers: after a refusal it waits (catching up with a newer
    /// view when told its own is stale) and asks again, until `deadline`.
    async fn until_answered(
        &self,
        grain: &GrainId,
        ask: DirectoryAsk<'_>,
        deadline: Instant,
    ) -> Result<Registration, CallError> {
        let mut backoff = Backoff::new(Duration::from_millis(100));
        loop {
            let refusal = match self.ask_owner(grain, &ask, deadline).await? {
                Ok(registration) => return Ok(registration),
                Err(refusal) => refusal,
            };
            tracing::debug!(%grain, %refusal, "directory did not answer; retrying");
            if let Refusal::StaleView { version } = refusal {
                self.wait_for_version(version, deadline.min(Instant::now() + Duration::from_millis(500))).await;
            }
            if !backoff.wait(deadline).await {
                return Err(CallError::Unavailable(format!("directory for {grain}: {refusal}")));
            }
        }
    }

    /// Where `grain` lives, asking its directory owner (placing it if it lives nowhere).
    pub(crate) async fn locate(
        &self,
        grain: &GrainId,
        strategy: Placement,
        deadline: Instant,
    ) -> Result<Registration, CallError> {
        self.until_answered(grain, DirectoryAsk::Locate(strategy), deadline).await
    }

    /// Registers an activation with its directory owner; returns the winner.
    pub(crate) async fn register(
        &self,
        grain: &GrainId,
        registration: &Registration,
        deadline: Instant,
    ) -> Result<Registration, CallError> {
        self.until_answered(grain, DirectoryAsk::Register(registration), deadline).await
    }

    /// Removes `grain`'s directory entry if it is still `registration`.
    pub(crate) async fn unregister(&self, grain: GrainId, registration: Registration) {
        self.cache.remove_if(&grain, |_, r| r == &registration);
        let owner = self.view().ring.owner(&grain).cloned().unwrap_or_else(|| self.me.clone());
        if owner == self.me {
            self.directory.unregister(&grain, &registration);
            return;
        }
        let request = SystemRequest::Unregister { grain, registration };
        let deadline = system::deadline_in(self.timings.connect_timeout);
        if let Err(error) = self.system_call(&owner, &request, deadline).await {
            tracing::debug!(%error, "unregister failed; the entry is replaced when the grain is next placed");
        }
    }

    /// Asks every other active silo to re-read the membership table now.
    pub(crate) fn broadcast_membership_changed(self: &Arc<Self>) {
        self.broadcast(SystemRequest::MembershipChanged);
    }

    /// Sends `request` to every other active silo, without waiting for answers.
    pub(crate) fn broadcast(self: &Arc<Self>, request: SystemRequest) {
        let view = self.view();
        for silo in view.active.iter().filter(|s| **s != self.me) {
            let (cluster, silo, request) = (self.clone(), silo.clone(), request.clone());
            tokio::spawn(async move {
                let deadline = system::deadline_in(Duration::from_secs(2));
                let _ = cluster.system_call(&silo, &request, deadline).await;
            });
        }
    }
}

/// Grains and registrations.
type Placements = Vec<(GrainId, Registration)>;

/// What one silo answered a recovery: the directory entries it handed over, and its activations.
type RecoveryAnswer = (Placements, Placements);

/// A directory request, as `Cluster::until_answered` repeats it.
enum DirectoryAsk<'a> {
    /// Where does the grain live? Place it (by this strategy) if nowhere.
    Locate(Placement),
    /// Register this activation (first writer wins).
    Register(&'a Registration),
}

/// One registration per grain from what a recovery gathered: every silo's `(entries handed over,
/// activations reported)`, and this silo's own activations. A reported activation beats a handed-over entry
/// (it is the ground truth); of several activations of one grain, the one the previous owner's entry names
/// wins, else the lowest silo; the others are returned to be evicted.
fn settle<'a>(answers: impl Iterator<Item = &'a RecoveryAnswer>, local: Placements) -> (Placements, Placements) {
    let mut entries: FastHashMap<GrainId, Registration> = FastHashMap::default();
    let mut activations: FastHashMap<GrainId, Vec<Registration>> = FastHashMap::default();
    for (handed, reported) in answers {
        for (grain, registration) in handed {
            entries.insert(grain.clone(), registration.clone());
        }
        for (grain, registration) in reported {
            activations.entry(grain.clone()).or_default().push(registration.clone());
        }
    }
    for (grain, registration) in local {
        activations.entry(grain).or_default().push(registration);
    }
    let mut evictions = Vec::new();
    for (grain, mut found) in activations {
        found.sort_by(|a, b| a.silo.cmp(&b.silo).then(a.id.cmp(&b.id)));
        found.dedup();
        let winner = match entries.get(&grain) {
            Some(entry) if found.contains(entry) => entry.clone(),
            _ => found[0].clone(),
        };
        evictions.extend(found.into_iter().filter(|r| *r != winner).map(|r| (grain.clone(), r)));
        entries.insert(grain, winner);
    }
    (entries.into_iter().collect(), evictions)
}

#[cfg(test)]
mod tests {
    use grains_storage::MemoryMembershipTable;

    use super::*;

    fn silo(port: u16) -> SiloAddress {
        SiloAddress { endpoint: format!("127.0.0.1:{port}"), epoch: 1 }
    }

    #[test]
    fn recovery_keeps_one_activation_per_grain_and_evicts_the_rest() {
        let (a, b, c) = (GrainId::new("G", 1i64), GrainId::new("G", 2i64), GrainId::new("G", 3i64));
        let on = |port: u16, id: u64| Registration { silo: silo(port), id };
        // Silo 2 handed over its entries: a on silo 3, c on silo 4 (not reported: activating, or gone).
        // Silo 3 reports a and b; silo 4 also reports a (a duplicate) and this silo (5) reports b (another).
        let answers = [
            (vec![(a.clone(), on(3, 30)), (c.clone(), on(4, 40))], vec![]),
            (vec![], vec![(a.clone(), on(3, 30)), (b.clone(), on(3, 31))]),
        ];
        let from_four: RecoveryAnswer = (vec![], vec![(a.clone(), on(4, 41))]);
        let (entries, evictions) =
            settle(answers.iter().chain(std::iter::once(&from_four)), vec![(b.clone(), on(5, 50))]);
        let entries: std::collections::HashMap<GrainId, Registration> = entries.into_iter().collect();
        assert_eq!(entries[&a], on(3, 30), "the handed-over entry names the activation that stays");
        assert_eq!(entries[&b], on(3, 31), "without an entry, the lowest silo's activation stays");
        assert_eq!(entries[&c], on(4, 40), "an entry without a report is kept");
        let mut evictions: Vec<_> = evictions.into_iter().map(|(_, r)| r).collect();
        evictions.sort_by(|x, y| x.silo.cmp(&y.silo));
        assert_eq!(evictions, vec![on(4, 41), on(5, 50)]);
    }

    #[test]
    fn a_lease_holds_from_its_last_confirmation_and_a_revoked_one_never_again() {
        let lease = Lease::new(Duration::from_millis(50));
        assert!(lease.is_valid(), "a starting silo holds one lease");
        std::thread::sleep(Duration::from_millis(80));
        assert!(!lease.is_valid(), "no confirmation: the lease ran out (as after a freeze)");
        lease.renew(Instant::now());
        assert!(lease.is_valid());
        lease.revoke();
        lease.renew(Instant::now());
        assert!(!lease.is_valid(), "a revoked lease is not renewed");
    }

    #[test]
    fn the_routing_cache_stays_within_its_capacity() {
        let me = SiloAddress { endpoint: "127.0.0.1:1".into(), epoch: 1 };
        let identity = PeerIdentity { credentials: Default::default(), endpoint: me.endpoint.clone(), tls: None };
        let table = Arc::new(MemoryMembershipTable::new());
        let activations = Arc::new(crate::activation_table::ActivationTable::default());
        let cluster = Cluster::new(me.clone(), ClusterTimings::fast(), table, identity, activations);
        for i in 0..10_000i64 {
            cluster.remember(GrainId::new("G", i), Registration { silo: me.clone(), id: 1 }, 1_000);
            assert!(cluster.cache.len() <= 1_000, "{} entries at {i}", cluster.cache.len());
        }
        assert!(cluster.cache.len() > 100, "eviction forgets part of the cache, not all of it");
    }
}
