//! The silo core: what one silo is made of, and the [`Silo`] handle that starts, inspects and stops it.
//!
//! A silo is a few parts, each in its own module with a narrow interface, the dependency arrows running one
//! way (from here outwards):
//! - [`ActivationTable`] (`activation_table.rs`): the grains active here and their mailboxes;
//! - activations (`activation.rs`): one task per grain running its turns, seeing the silo only through
//!   [`ActivationHost`];
//! - routing (`routing.rs`): how a call finds its grain's one activation, here or on a peer;
//! - serving (`serve.rs`): requests arriving on the endpoint, and the server side of system calls;
//! - the [`Cluster`] (`cluster/`): membership view, directory partition, lease, peers; it owns view
//!   application and stops the silo's activations itself when the cluster declares the silo dead;
//! - the reminder service (`reminders.rs`): fires the durable reminders of the ring ranges this silo owns,
//!   through the silo's call path;
//! - the builder (`builder.rs`), which wires them together.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use bytes::Bytes;
use grains::__private::runtime::{Call, GrainRuntime, Invoked, Payload};
use grains::__private::{ActivationServices, GrainRegistration, RefCore, ReminderRegistry, TimerHost};
use grains::{CallError, Grain, GrainContext, GrainId, GrainKey, GrainRef, Placement};
use grains_storage::{GrainStateStore, SiloAddress, SiloStatus};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::activation::{ActivationHost, Drainer, Invocation};
use crate::activation_table::ActivationTable;
use crate::cluster::system::SystemRequest;
use crate::cluster::{Cluster, ClusterView, membership};
use crate::config::SiloConfig;
use crate::filter::{CallFilters, CallerIdentity};
use crate::gateway::GatewayHandle;
use crate::maps::FastHash;
use crate::metrics::{Metrics, MetricsSnapshot};
use crate::reminders::{ReminderService, ReminderStats};
use crate::routing::{Beside, wait_reply};

/// The grain types a silo hosts, with each one's idle timeout.
pub(crate) type HostedTypes = HashMap<&'static str, (&'static GrainRegistration, Duration), FastHash>;

/// What a silo is built from (see `builder.rs`).
pub(crate) struct SiloParts {
    pub(crate) config: SiloConfig,
    pub(crate) types: HostedTypes,
    pub(crate) table: Arc<ActivationTable>,
    pub(crate) store: Arc<dyn GrainStateStore>,
    pub(crate) journal: Arc<dyn grains_storage::EventJournal>,
    pub(crate) cluster: Arc<Cluster>,
    pub(crate) reminders: Arc<ReminderService>,
    pub(crate) filters: CallFilters,
    pub(crate) metrics: Metrics,
    pub(crate) services: grains::__private::Services,
}

pub(crate) struct SiloInner {
    pub(crate) config: SiloConfig,
    pub(crate) types: HostedTypes,
    pub(crate) table: Arc<ActivationTable>,
    pub(crate) store: Arc<dyn GrainStateStore>,
    pub(crate) journal: Arc<dyn grains_storage::EventJournal>,
    pub(crate) cluster: Arc<Cluster>,
    pub(crate) reminders: Arc<ReminderService>,
    clock_origin: Instant,
    coarse_now_ms: Arc<AtomicU64>,
    /// Set when a graceful shutdown begins: new calls are refused.
    shutting_down: AtomicBool,
    /// Set when an operator asks the silo to stop (`POST /silo/shutdown`); its owner carries it out.
    pub(crate) shutdown_requested: tokio::sync::watch::Sender<bool>,
    pub(crate) metrics: Metrics,
    pub(crate) filters: CallFilters,
    /// The application services given to the builder, handed to every activation's context.
    services: grains::__private::Services,
    this: Weak<SiloInner>,
}

impl SiloInner {
    /// The silo made of these parts.
    pub(crate) fn new(parts: SiloParts) -> Arc<Self> {
        let SiloParts { config, types, table, store, journal, cluster, reminders, filters, metrics, services } = parts;
        Arc::new_cyclic(|this| SiloInner {
            config,
            types,
            table,
            store,
            journal,
            cluster,
            reminders,
            clock_origin: Instant::now(),
            coarse_now_ms: Arc::new(AtomicU64::new(0)),
            shutting_down: AtomicBool::new(false),
            shutdown_requested: tokio::sync::watch::Sender::new(false),
            metrics,
            filters,
            services,
            this: this.clone(),
        })
    }

    /// This silo as the runtime that grain contexts and references call through.
    pub(crate) fn runtime(&self) -> Arc<dyn GrainRuntime> {
        self.arc()
    }

    pub(crate) fn arc(&self) -> Arc<SiloInner> {
        match self.this.upgrade() {
            Some(me) => me,
            None => unreachable!("a silo's own methods run only while it is alive"),
        }
    }

    /// Milliseconds since the silo started, as of the idle collector's last tick: the clock of idle
    /// bookkeeping. Coarse on purpose — a turn stamps it without reading the system clock — and consistent,
    /// since idleness is judged on the same clock.
    pub(crate) fn now_ms(&self) -> u64 {
        self.coarse_now_ms.load(Ordering::Relaxed)
    }

    /// Advances the coarse clock to the real time.
    fn tick_clock(&self) -> u64 {
        let now = self.clock_origin.elapsed().as_millis() as u64;
        self.coarse_now_ms.store(now, Ordering::Relaxed);
        now
    }

    /// This silo's address in the cluster.
    pub(crate) fn me(&self) -> &SiloAddress {
        &self.cluster.me
    }

    /// Whether the silo has stopped serving (shut down, or declared dead).
    pub(crate) fn is_stopped(&self) -> bool {
        self.cluster.is_stopped()
    }

    /// Whether the silo refuses new work (shutting down, or stopped).
    pub(crate) fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::Relaxed) || self.is_stopped()
    }

    /// The registration of a grain type hosted here.
    pub(crate) fn grain_type(&self, name: &str) -> Option<&'static GrainRegistration> {
        self.types.get(name).map(|(r, _)| *r)
    }

    pub(crate) fn placement(&self, id: &GrainId) -> Placement {
        self.grain_type(id.grain_type()).map_or(Placement::Random, |r| r.options.placement)
    }

    /// Refuses calls the silo cannot run now, before anything else: while it shuts down, while it cannot
    /// confirm its membership, and calls that would close a cycle.
    ///
    /// The lease is judged at the call's `issued` time, read by whoever made the call just before handing it
    /// over: a freeze after that reading is no different from one after this check.
    pub(crate) fn admit(&self, call: &Call) -> Result<(), CallError> {
        if self.is_shutting_down() {
            return Err(CallError::ShuttingDown);
        }
        if !self.cluster.lease.is_valid_at(call.issued) {
            // This silo cannot confirm it is still a member: it may have been declared dead while it was frozen
            // or cut off, so it runs nothing until it has re-read the table. Refused before running: the caller
            // may send the call elsewhere.
            self.cluster.refresh_now.notify_one();
            return Err(CallError::ShuttingDown);
        }
        if call.chain.contains(&call.target) {
            let chain = call.chain.iter().chain(std::iter::once(&call.target)).map(ToString::to_string).collect();
            return Err(CallError::Deadlock { chain });
        }
        Ok(())
    }

    /// The registration of grain type `name`, refusing a type this silo does not host.
    pub(crate) fn registration_of(&self, name: &str) -> Result<&'static GrainRegistration, CallError> {
        self.grain_type(name).ok_or_else(|| CallError::UnknownGrainType(name.to_owned()))
    }

    /// The silo's counters now.
    pub(crate) fn metrics_snapshot(&self) -> MetricsSnapshot {
        self.metrics.snapshot(self.table.len(), self.cluster.directory.len())
    }

    /// Hands a call queued at a departed activation to the grain's next activation.
    pub(crate) fn redeliver(&self, id: GrainId, invocation: Invocation) {
        if self.is_shutting_down() {
            let _ = invocation.reply.send(Err(CallError::ShuttingDown));
            return;
        }
        tokio::spawn(self.arc().route(id, invocation));
    }

    /// Sends every activation a deactivation request (idle ones leave, busy ones stay unless `force`).
    fn signal_all(&self, force: bool) {
        self.table.signal(self.tick_clock(), force);
    }

    /// Writes this silo's status and tells the peers, giving up (with a warning) after `timeout`: a silo that
    /// cannot reach the membership table still stops.
    async fn set_status_within(&self, status: SiloStatus, timeout: Duration) {
        match tokio::time::timeout(timeout, membership::set_status(&self.cluster, status)).await {
            Ok(Ok(())) => self.cluster.broadcast_membership_changed(),
            Ok(Err(error)) => tracing::warn!(%error, ?status, "could not write the status"),
            Err(_) => tracing::warn!(?status, "could not write the status in time"),
        }
    }
}

impl ActivationHost for SiloInner {
    fn cluster(&self) -> &Arc<Cluster> {
        &self.cluster
    }

    fn activations(&self) -> &ActivationTable {
        &self.table
    }

    fn context(&self, id: GrainId, timers: Arc<dyn TimerHost>) -> GrainContext {
        let reminders = self.reminders.clone() as Arc<dyn ReminderRegistry>;
        let services =
            ActivationServices { timers: Some(timers), reminders: Some(reminders), app: self.services.clone() };
        GrainContext::with_services(id, self.runtime(), self.store.clone(), services).with_journal(self.journal.clone())
    }

    fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    fn now_ms(&self) -> u64 {
        SiloInner::now_ms(self)
    }

    fn coarse_clock(&self) -> &Arc<AtomicU64> {
        &self.coarse_now_ms
    }

    fn call_timeout(&self) -> Duration {
        self.config.call_timeout
    }

    fn cache_capacity(&self) -> usize {
        self.config.directory_cache_size
    }

    fn redeliver(&self, id: GrainId, invocation: Invocation) {
        SiloInner::redeliver(self, id, invocation);
    }
}

impl GrainRuntime for SiloInner {
    fn invoke(&self, mut call: Call) -> Invoked {
        let encoded = matches!(call.payload, Payload::Encoded(_));
        let refuse = |error| {
            self.metrics.call_errors.fetch_add(1, Ordering::Relaxed);
            Invoked::ready(Err(error))
        };
        if let Err(error) = self.admit(&call) {
            return refuse(error);
        }
        // An idle activation here: its grain type is hosted here (no lookup of it), and the turn runs on this
        // task once the call is decoded and filtered (refused, it only lets the claim go).
        let claim = self.table.claim_idle(&call.target);
        let registration = match &claim {
            Some(claim) => claim.grain_type(),
            None => match self.registration_of(call.target.grain_type()) {
                Ok(registration) => registration,
                Err(error) => return refuse(error),
            },
        };
        // A call with undecodable arguments never costs an activation (or its storage read).
        if let Err(error) = decode_arguments(&mut call, registration) {
            return refuse(error);
        }
        if !self.filters.is_empty() {
            // A call from a grain's turn names its caller last in its chain.
            let caller = call.chain.last().map_or(CallerIdentity::Local, |grain| CallerIdentity::Grain(grain.clone()));
            if let Err(error) = self.filter(&caller, &call) {
                return refuse(error);
            }
        }
        if let Some(claim) = claim {
            return self.run_inline(claim, call, encoded);
        }
        let (reply, waiter) = oneshot::channel();
        let (id, invocation) = Invocation::of(call, reply);
        let deadline = invocation.deadline;
        // The caller routes its call itself (to another silo too: it writes the request, and the reply wakes it
        // straight from the connection's reader), and runs the drain its delivery starts, while it waits.
        let beside = match self.try_local(&id, invocation, Drainer::Sender) {
            Ok(drain) => Beside::drain(drain),
            Err(invocation) => Beside::work(self.arc().route(id, invocation)),
        };
        if !encoded {
            return Invoked::pending(wait_reply(waiter, deadline, beside));
        }
        // Its arguments were decoded on arrival; an encoded call is still answered with an encoded reply.
        Invoked::pending(async move { Ok(Payload::Encoded(wait_reply(waiter, deadline, beside).await?.into_bytes()?)) })
    }

    fn default_timeout(&self) -> Duration {
        self.config.call_timeout
    }
}

/// Decodes an encoded call's arguments for `registration`'s grain type (a local call's are typed already), so
/// that a call to an unknown method, or with arguments that do not decode, is refused before it is delivered.
pub(crate) fn decode_arguments(call: &mut Call, registration: &GrainRegistration) -> Result<(), CallError> {
    if matches!(call.payload, Payload::Encoded(_)) {
        let payload = std::mem::replace(&mut call.payload, Payload::Encoded(Bytes::new()));
        call.payload = registration.decode_payload(&call.method, payload)?;
    }
    Ok(())
}

/// A running silo. Dropping it does not stop it; call [`Silo::shutdown`].
pub struct Silo {
    pub(crate) inner: Arc<SiloInner>,
    pub(crate) tasks: Vec<JoinHandle<()>>,
    pub(crate) gateway: Option<GatewayHandle>,
}

impl std::fmt::Debug for Silo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Silo").field("name", &self.inner.config.name).field("address", self.inner.me()).finish()
    }
}

/// Every `collection_interval`, asks idle activations to leave.
pub(crate) async fn collect_idle(silo: Weak<SiloInner>) {
    let Some(interval) = silo.upgrade().map(|s| s.config.collection_interval) else { return };
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let Some(silo) = silo.upgrade() else { return };
        if silo.is_shutting_down() {
            return;
        }
        silo.signal_all(false);
    }
}

impl Silo {
    /// A typed reference to grain `key` of type `G`, calling through this silo.
    pub fn grain<G: Grain>(&self, key: impl Into<GrainKey>) -> G::Ref {
        G::Ref::from_core(RefCore::new(GrainId::new(G::TYPE_NAME, key), self.inner.runtime()))
    }

    /// This silo as a [`GrainRuntime`], for untyped calls (the workspace's tests and simulator; [`GrainRuntime`] is
    /// internal).
    #[doc(hidden)]
    pub fn runtime(&self) -> Arc<dyn GrainRuntime> {
        self.inner.runtime()
    }

    /// The configuration the silo runs with.
    pub fn config(&self) -> &SiloConfig {
        &self.inner.config
    }

    /// The silo's address in the cluster (endpoint and epoch).
    pub fn address(&self) -> &SiloAddress {
        self.inner.me()
    }

    /// The address clients and peers connect to, if the silo listens.
    pub fn gateway_addr(&self) -> Option<SocketAddr> {
        self.gateway.as_ref().map(|g| g.local_addr)
    }

    /// The cluster as this silo currently sees it.
    pub fn cluster_view(&self) -> Arc<ClusterView> {
        self.inner.cluster.view()
    }

    /// Number of activations in the table now.
    pub fn activation_count(&self) -> usize {
        self.inner.table.len()
    }

    /// Whether `id` has an activation in this silo now (confirmed by the directory).
    pub fn is_active(&self, id: &GrainId) -> bool {
        self.inner.table.is_confirmed(id)
    }

    /// The grain ids active in this silo now (activations confirmed by the directory; a duplicate that lost
    /// the registration race never counts, and never runs a turn).
    pub fn active_grains(&self) -> Vec<GrainId> {
        self.inner.table.confirmed()
    }

    /// The silo's counters.
    pub fn metrics(&self) -> MetricsSnapshot {
        self.inner.metrics_snapshot()
    }

    /// The counters of this silo's reminder service: the reminders it holds, ticks delivered and missed.
    pub fn reminder_stats(&self) -> ReminderStats {
        self.inner.reminders.stats()
    }

    /// Asks every idle activation to passivate now, as the idle collector does on each tick.
    pub fn collect_idle_now(&self) {
        self.inner.signal_all(false);
    }

    /// Whether the silo has stopped serving (shut down, or declared dead by the cluster).
    pub fn is_stopped(&self) -> bool {
        self.inner.is_stopped()
    }

    /// Resolves when the silo stops serving on its own (declared dead by the cluster).
    pub fn stopped(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        self.inner.cluster.stopped()
    }

    /// Resolves when an operator has asked this silo to stop through the HTTP API (`POST /silo/shutdown`).
    /// Whoever owns the silo then calls [`Silo::shutdown`]; the silo binary (`cli::run`) does.
    pub fn shutdown_requested(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut requested = self.inner.shutdown_requested.subscribe();
        async move {
            let _ = requested.wait_for(|r| *r).await;
        }
    }

    /// Leaves the cluster gracefully, in the order that keeps one activation per grain:
    ///
    /// 1. refuse new calls with `ShuttingDown` (callers send them elsewhere), tell peers to place nothing
    ///    new here, and stop firing reminders (writing what they delivered);
    /// 2. let every activation finish its turn, run `on_deactivate` (grains flush state) and remove its
    ///    directory entry — calls still queued move to the grains' next activations, elsewhere;
    /// 3. past `grace`, stop what is left where it stands (no further turn runs);
    /// 4. announce ShuttingDown: peers take over this silo's directory ranges;
    /// 5. answer what is in flight on open connections, then mark itself Dead and stop.
    pub async fn shutdown(mut self, grace: Duration) {
        let inner = self.inner.clone();
        tracing::info!(silo = %inner.config.name, "silo shutting down");
        let deadline = Instant::now() + grace;
        let announced = !inner.is_stopped();
        inner.shutting_down.store(true, Ordering::Relaxed);
        if announced {
            inner.cluster.broadcast(SystemRequest::Draining { silo: inner.me().clone() });
        }
        // Reminders fire here no more (this silo takes no calls); what they delivered is written now, while the
        // lease holds. Their ranges move once the ShuttingDown status is out.
        inner.reminders.stop().await;
        inner.signal_all(true);
        while !inner.table.is_empty() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if !inner.table.is_empty() {
            tracing::warn!(
                remaining = inner.table.len(),
                "activations still running at the end of the grace period; stopping them"
            );
            inner.table.abort_all();
        }
        let status_timeout = inner.cluster.timings.connect_timeout * 5;
        if announced {
            inner.set_status_within(SiloStatus::ShuttingDown, status_timeout).await;
        }
        if let Some(gateway) = self.gateway.take() {
            gateway.stop(deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(100))).await;
        }
        if announced {
            inner.set_status_within(SiloStatus::Dead, status_timeout).await;
        }
        inner.cluster.stop(false);
        for task in self.tasks.drain(..) {
            task.abort();
        }
        tracing::info!(silo = %inner.config.name, "silo stopped");
    }
}
