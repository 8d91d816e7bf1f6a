//! The silo: hosts activations, routes every call by grain id, collects idle grains, serves its endpoint.
//!
//! Every call, from a grain, a client or a peer, goes one way: if the grain has an activation here, the call
//! goes into its mailbox (no lookup, no encoding). Otherwise [`SiloInner::route`] asks the cluster where the
//! grain lives — the routing cache, else the grain's directory owner, which places the grain if it lives
//! nowhere — and either activates it here or sends the call to the silo that holds it.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use bytes::Bytes;
use dashmap::DashMap;
use dashmap::mapref::entry::Entry;
use grains::runtime::{BoxFuture, Call, GrainRuntime, Payload, RequestMetadata};
use grains::{CallError, Grain, GrainId, GrainKey, GrainRef, GrainRegistration, Placement, RefCore};
use grains_storage::postgres::{self, PostgresMembershipTable, PostgresOptions};
use grains_storage::{
    GrainStateStore, MembershipTable, MemoryMembershipTable, MemoryStateStore, SiloAddress, SiloStatus,
};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::activation::{self, ActivationHandle, ActivationShared, ActivationStart, Invocation, Mail};
use crate::cluster::system::{Refusal, SystemRequest, SystemResponse};
use crate::cluster::{Backoff, Cluster, ClusterView, LocalActivations, Registration, membership};
use crate::config::{MembershipKind, SiloConfig, StorageKind};
use crate::filter::{CallFilter, CallFilters, CallInfo, CallerIdentity};
use crate::gateway::{self, GatewayHandle};
use crate::metrics::{Metrics, MetricsSnapshot};
use crate::peer_auth::{ClusterCredentials, PeerIdentity};
use crate::wire::{Envelope, Mode, WireGrainId};

/// Why a silo could not start.
#[derive(Debug, thiserror::Error)]
pub enum SiloError {
    /// The configuration is incomplete or inconsistent.
    #[error("configuration: {0}")]
    Config(String),
    /// The storage provider or membership table could not be reached or prepared.
    #[error("storage: {0}")]
    Storage(#[from] grains_storage::StorageError),
    /// The TLS settings (`tls_cert`, `tls_key`, `tls_ca`, `tls_client_ca`) cannot be used.
    #[error("tls: {0}")]
    Tls(#[from] crate::tls::TlsError),
    /// The silo could not bind its address.
    #[error("cannot bind {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        source: std::io::Error,
    },
}

/// The hasher of the silo's hot maps: fast, and seeded per process (keys come from the network).
pub(crate) type FastHash = foldhash::fast::RandomState;

/// How many "not here" answers a call follows before it gives up (bounded forwarding).
const MAX_NOT_HERE: usize = 8;

/// How many times a call is re-aimed at a mailbox that closed under it before routing it afresh.
const MAX_DELIVERY_ATTEMPTS: usize = 16;

pub(crate) struct SiloInner {
    pub(crate) config: SiloConfig,
    types: HashMap<&'static str, (&'static GrainRegistration, Duration), FastHash>,
    pub(crate) table: DashMap<GrainId, ActivationHandle, FastHash>,
    pub(crate) store: Arc<dyn GrainStateStore>,
    pub(crate) cluster: Arc<Cluster>,
    next_activation_id: AtomicU64,
    clock_origin: Instant,
    coarse_now_ms: AtomicU64,
    shutting_down: AtomicBool,
    stopped: watch::Sender<bool>,
    /// Set when an operator asks the silo to stop (`POST /silo/shutdown`); its owner carries it out.
    pub(crate) shutdown_requested: watch::Sender<bool>,
    pub(crate) metrics: Metrics,
    filters: CallFilters,
    this: Weak<SiloInner>,
}

fn wait_reply(
    waiter: oneshot::Receiver<Result<Payload, CallError>>,
    deadline: Instant,
) -> impl std::future::Future<Output = Result<Payload, CallError>> {
    let timeout = deadline.saturating_duration_since(Instant::now());
    async move {
        match tokio::time::timeout_at(deadline, waiter).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(CallError::Unavailable("the activation ended without replying".to_owned())),
            Err(_) => Err(CallError::Timeout(timeout)),
        }
    }
}

impl SiloInner {
    /// This silo as the runtime that grain contexts and references call through.
    pub(crate) fn runtime(&self) -> Arc<dyn GrainRuntime> {
        self.arc()
    }

    fn arc(&self) -> Arc<SiloInner> {
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
        *self.stopped.borrow()
    }

    /// Whether the silo refuses new work.
    pub(crate) fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::Relaxed)
    }

    /// The registration of a grain type hosted here.
    pub(crate) fn grain_type(&self, name: &str) -> Option<&'static GrainRegistration> {
        self.types.get(name).map(|(r, _)| *r)
    }

    fn placement(&self, id: &GrainId) -> Placement {
        self.grain_type(id.grain_type()).map_or(Placement::Random, |r| r.options.placement)
    }

    /// Removes the table entry of `id` if it still belongs to activation `activation_id`.
    pub(crate) fn remove_activation(&self, id: &GrainId, activation_id: u64) {
        self.table.remove_if(id, |_, h| h.activation_id == activation_id);
    }

    /// Refuses calls the silo cannot take, before any routing, and decodes an encoded call's arguments: a call
    /// to an unknown method or with undecodable arguments never costs an activation (or its storage read).
    fn check(&self, call: &mut Call) -> Result<(), CallError> {
        if self.is_shutting_down() {
            return Err(CallError::ShuttingDown);
        }
        if !self.cluster.lease.is_valid() {
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
        let Some(&(registration, _)) = self.types.get(call.target.grain_type()) else {
            return Err(CallError::UnknownGrainType(call.target.grain_type().to_owned()));
        };
        let payload = std::mem::replace(&mut call.payload, Payload::Encoded(Bytes::new()));
        call.payload = registration.decode_payload(&call.method, payload)?;
        Ok(())
    }

    /// Puts the call in the mailbox of `id`'s activation if it has one here; else hands the call back.
    fn try_local(&self, id: &GrainId, invocation: Invocation) -> Result<(), Invocation> {
        let mut mail = Mail::Call(invocation);
        for _ in 0..MAX_DELIVERY_ATTEMPTS {
            let Some(handle) = self.table.get(id) else { break };
            match handle.mailbox.send(mail) {
                Ok(()) => {
                    self.metrics.calls.fetch_add(1, Ordering::Relaxed);
                    return Ok(());
                }
                Err(back) => {
                    drop(handle);
                    // That activation closed its mailbox (it failed or is leaving); drop its stale entry.
                    self.table.remove_if(id, |_, h| h.mailbox.is_closed());
                    mail = back;
                }
            }
        }
        match mail {
            Mail::Call(invocation) => Err(invocation),
            Mail::Deactivate { .. } => unreachable!("only calls are delivered"),
        }
    }

    /// Delivers the call here, activating the grain if it has no activation here.
    fn deliver_here(&self, id: &GrainId, invocation: Invocation) -> Result<(), Invocation> {
        let mut invocation = invocation;
        for _ in 0..MAX_DELIVERY_ATTEMPTS {
            let mail = Mail::Call(invocation);
            let sent = match self.table.entry(id.clone()) {
                Entry::Occupied(slot) => slot.get().mailbox.send(mail),
                Entry::Vacant(slot) => {
                    let handle = self.spawn_activation(id);
                    let sent = handle.mailbox.send(mail);
                    slot.insert(handle);
                    sent
                }
            };
            match sent {
                Ok(()) => {
                    self.metrics.calls.fetch_add(1, Ordering::Relaxed);
                    return Ok(());
                }
                Err(Mail::Call(back)) => {
                    self.table.remove_if(id, |_, h| h.mailbox.is_closed());
                    invocation = back;
                }
                Err(Mail::Deactivate { .. }) => unreachable!("only calls are delivered"),
            }
        }
        Err(invocation)
    }

    /// Starts the activation task of `id`; the caller inserts the returned handle in the table.
    ///
    /// Every activation registers under a fresh id, never one an earlier activation used: the late unregister
    /// of an activation that just ended must not remove the entry of the one that follows it.
    fn spawn_activation(&self, id: &GrainId) -> ActivationHandle {
        let registration = Registration { silo: self.me().clone(), id: crate::cluster::placement::registration_id() };
        let (grain_type, idle_timeout) = match self.types.get(id.grain_type()) {
            Some(&entry) => entry,
            None => unreachable!("calls are checked for their grain type first"),
        };
        let mailbox = Arc::new(activation::Mailbox::with_limit(self.config.max_mailbox_length));
        let activation_id = self.next_activation_id.fetch_add(1, Ordering::Relaxed);
        let shared = Arc::new(ActivationShared::new(self.now_ms(), idle_timeout));
        let task = tokio::spawn(activation::run(ActivationStart {
            silo: self.arc(),
            id: id.clone(),
            activation_id,
            grain_type,
            registration: registration.clone(),
            mailbox: mailbox.clone(),
            shared: shared.clone(),
        }));
        ActivationHandle { activation_id, mailbox, shared, registration, task: task.abort_handle() }
    }

    /// Finds where `id` lives and delivers the call there; answers the caller through `invocation.reply`.
    pub(crate) async fn route(self: Arc<Self>, id: GrainId, invocation: Invocation) {
        let mut invocation = invocation;
        let mut backoff = Backoff::new(Duration::from_millis(500));
        let mut not_here = 0;
        let deadline = invocation.deadline;
        let fail = |invocation: Invocation, error: CallError| {
            let _ = invocation.reply.send(Err(error));
        };
        loop {
            if self.is_shutting_down() {
                return fail(invocation, CallError::ShuttingDown);
            }
            if Instant::now() >= deadline {
                return fail(invocation, CallError::Timeout(Duration::ZERO));
            }
            invocation = match self.try_local(&id, invocation) {
                Ok(()) => return,
                Err(back) => back,
            };
            if self.cluster.view().version == 0 {
                // Still joining: the first membership view is moments away; placing now could duplicate.
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
            let cached = self.cluster.cache.get(&id).map(|r| r.clone());
            let (registration, mode) = match cached {
                Some(registration) => (registration, Mode::Cached),
                None => match self.cluster.locate(&id, self.placement(&id), deadline).await {
                    Ok(registration) => {
                        // Local activations are found through the table; only remote locations are cached.
                        if &registration.silo != self.me() {
                            self.cluster.remember(id.clone(), registration.clone(), self.config.directory_cache_size);
                        }
                        (registration, Mode::Placed)
                    }
                    Err(CallError::SiloUnavailable(reason)) => {
                        // The directory owner is unreachable (it may be dying): nothing was placed by this
                        // attempt that a retry could duplicate, so wait for membership to catch up.
                        tracing::debug!(grain = %id, %reason, "directory owner unreachable; retrying");
                        backoff.wait(deadline).await;
                        continue;
                    }
                    Err(error) => return fail(invocation, error),
                },
            };
            if &registration.silo == self.me() {
                if mode == Mode::Cached {
                    self.cluster.cache.remove(&id); // cached here, but no activation: ask the directory
                    continue;
                }
                invocation = match self.deliver_here(&id, invocation) {
                    Ok(()) => return,
                    Err(back) => back,
                };
                continue;
            }
            // Remote: encode once; a later local delivery takes the encoded form as well.
            let payload = match std::mem::replace(&mut invocation.payload, Payload::Encoded(Bytes::new())).into_bytes()
            {
                Ok(bytes) => bytes,
                Err(e) => return fail(invocation, e.into()),
            };
            invocation.payload = Payload::Encoded(payload.clone());
            let conn = match self.cluster.peer(&registration.silo).await {
                Ok(conn) => conn,
                Err(error) => {
                    // Nothing was sent: safe to try again once membership or the directory has moved on.
                    tracing::debug!(grain = %id, silo = %registration.silo, %error, "peer unreachable; retrying");
                    self.cluster.cache.remove(&id);
                    backoff.wait(deadline).await;
                    continue;
                }
            };
            let envelope = Envelope {
                target: Some(WireGrainId::from(&id)),
                method: invocation.method.to_string(),
                payload,
                call_chain: invocation.chain.iter().map(WireGrainId::from).collect(),
                mode: mode as i32,
                registration: registration.id,
                metadata: invocation.metadata.to_map(),
                ..Default::default()
            };
            match conn.call(envelope, deadline).await {
                Ok(bytes) => {
                    let _ = invocation.reply.send(Ok(Payload::Encoded(bytes)));
                    return;
                }
                Err(CallError::NotHere(reason)) => {
                    self.cluster.cache.remove(&id);
                    not_here += 1;
                    if not_here >= MAX_NOT_HERE {
                        return fail(invocation, CallError::NotHere(reason));
                    }
                }
                Err(CallError::ShuttingDown) => {
                    // Refused before running: the grain is moving; route again shortly.
                    self.cluster.cache.remove(&id);
                    backoff.wait(deadline).await;
                }
                Err(error) => {
                    if matches!(error, CallError::SiloUnavailable(_)) {
                        self.cluster.cache.remove(&id);
                    }
                    return fail(invocation, error);
                }
            }
        }
    }

    /// Runs the call filters on a call entering the silo from `caller`.
    fn filter(&self, caller: &CallerIdentity, call: &Call) -> Result<(), CallError> {
        self.filters.check(&CallInfo { caller, grain: &call.target, method: &call.method, metadata: &call.metadata })
    }

    /// Serves a request that arrived on the silo's endpoint from `caller` (a client, or a peer).
    pub(crate) async fn serve_request(
        self: Arc<Self>,
        envelope: Envelope,
        caller: &CallerIdentity,
    ) -> Result<Bytes, CallError> {
        let target =
            envelope.target.as_ref().ok_or_else(|| CallError::Protocol("request without a target".to_owned()))?;
        if target.grain_type == crate::wire::SYSTEM_TYPE {
            let request: SystemRequest = grains::codec::decode_named(&envelope.payload)?;
            let response = self.serve_system(request).await?;
            return Ok(Bytes::from(grains::codec::encode_named(&response)?));
        }
        if self.is_shutting_down() {
            // Refused before running: the caller may safely send it elsewhere.
            return Err(CallError::ShuttingDown);
        }
        let registration = self
            .grain_type(&target.grain_type)
            .ok_or_else(|| CallError::UnknownGrainType(target.grain_type.clone()))?;
        let id = target.to_grain_id(Some(registration.type_name))?;
        let chain = envelope
            .call_chain
            .iter()
            .map(|id| id.to_grain_id(self.grain_type(&id.grain_type).map(|r| r.type_name)))
            .collect::<Result<Vec<_>, _>>()?;
        // A client-chosen deadline is capped: a call never holds resources past `max_call_timeout`.
        let deadline = envelope.deadline(self.config.call_timeout)?.min(Instant::now() + self.config.max_call_timeout);
        let mut call = Call {
            target: id,
            method: envelope.method.into(),
            payload: Payload::Encoded(envelope.payload),
            deadline,
            chain: chain.into(),
            metadata: RequestMetadata::from_map(envelope.metadata),
        };
        self.check(&mut call)?;
        let mode = Mode::try_from(envelope.mode).unwrap_or(Mode::Route);
        // A call enters the cluster routed; one delivered here by a peer was filtered where it entered.
        if mode == Mode::Route && !self.filters.is_empty() {
            self.filter(caller, &call)?;
        }
        let (reply, waiter) = oneshot::channel();
        let (id, invocation) = Invocation::of(call, reply);
        let deadline = invocation.deadline;
        match mode {
            Mode::Route => {
                if let Err(invocation) = self.try_local(&id, invocation) {
                    tokio::spawn(self.clone().route(id, invocation));
                }
            }
            Mode::Cached => {
                if self.try_local(&id, invocation).is_err() {
                    return Err(CallError::NotHere(format!("{id} is not active on {}", self.me())));
                }
            }
            Mode::Placed => {
                if self.deliver_here(&id, invocation).is_err() {
                    return Err(CallError::Unavailable(format!("{id}: activation kept closing under the call")));
                }
            }
        }
        let reply = wait_reply(waiter, deadline).await?;
        Ok(reply.into_bytes()?)
    }

    /// Answers a system request.
    async fn serve_system(&self, request: SystemRequest) -> Result<SystemResponse, CallError> {
        Ok(match request {
            SystemRequest::Ping => {
                SystemResponse::Pong { silo: self.me().clone(), activations: self.table.len() as u64 }
            }
            SystemRequest::Gateways => SystemResponse::Gateways(self.cluster.view().gateways()),
            SystemRequest::LookupOrPlace { grain, caller, placement, view } => {
                match self.cluster.local_lookup_or_place(&grain, &caller, placement, Some(&view)) {
                    Ok(registration) => SystemResponse::Placed(registration),
                    Err(refusal) => self.refused(refusal),
                }
            }
            SystemRequest::Register { entries, view } => SystemResponse::Registered(
                entries
                    .into_iter()
                    .map(|(grain, registration)| {
                        let decided = self.cluster.local_register(&grain, registration, Some(&view));
                        if decided == Err(Refusal::Behind) {
                            self.cluster.refresh_now.notify_one();
                        }
                        decided
                    })
                    .collect(),
            ),
            SystemRequest::Unregister { grain, registration } => {
                self.cluster.directory.unregister(&grain, &registration);
                SystemResponse::Done
            }
            SystemRequest::Recover { requester, view } => self.cluster.answer_recover(&requester, &view),
            SystemRequest::Evict { grain, registration } => {
                self.evict(&grain, &registration);
                SystemResponse::Done
            }
            SystemRequest::Draining { silo } => {
                self.cluster.mark_draining(silo);
                SystemResponse::Done
            }
            SystemRequest::MembershipChanged => {
                self.cluster.refresh_now.notify_one();
                SystemResponse::Done
            }
            SystemRequest::Activations => SystemResponse::Activations(self.active_grains()),
            SystemRequest::Table(op) => {
                let answer = crate::cluster::seed::serve(self.cluster.table.as_ref(), op)
                    .await
                    .map_err(|e| CallError::Unavailable(e.to_string()))?;
                SystemResponse::Table(answer)
            }
            SystemRequest::Stats => SystemResponse::Stats(Box::new(crate::stats::local(self))),
        })
    }

    /// A partition's refusal, as an answer; a partition behind its caller re-reads membership at once.
    fn refused(&self, refusal: Refusal) -> SystemResponse {
        if refusal == Refusal::Behind {
            self.cluster.refresh_now.notify_one();
        }
        SystemResponse::Refused(refusal)
    }

    /// The grains with a confirmed activation here.
    pub(crate) fn active_grains(&self) -> Vec<GrainId> {
        self.table.iter().filter(|e| e.shared.is_confirmed()).map(|e| e.key().clone()).collect()
    }

    /// The silo's counters now.
    pub(crate) fn metrics_snapshot(&self) -> MetricsSnapshot {
        self.metrics.snapshot(self.table.len(), self.cluster.directory.len())
    }

    /// Called by an activation that is gone: its directory entry goes too.
    pub(crate) async fn activation_ended(&self, id: &GrainId, registration: &Registration) {
        self.cluster.unregister(id.clone(), registration.clone()).await;
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
        let now = self.tick_clock();
        for entry in self.table.iter() {
            if force || entry.shared.is_idle(now) {
                let _ = entry.mailbox.send(Mail::Deactivate { force });
            }
        }
    }

    /// Adopts a new membership view, or stops if the cluster has declared this silo dead.
    pub(crate) fn apply_view(&self, view: ClusterView) {
        if view.status(self.me()) == Some(SiloStatus::Dead) && !self.is_stopped() {
            tracing::error!(silo = %self.me(), "this silo was declared dead by the cluster; it stops serving");
            self.terminate();
            return;
        }
        self.cluster.apply_view(view);
    }

    /// Stops the activation of `grain` registered as `registration` (a duplicate) before its next turn; its
    /// queued calls go to the grain's one activation.
    fn evict(&self, grain: &GrainId, registration: &Registration) {
        if let Some(handle) = self.table.get(grain).filter(|h| &h.registration == registration) {
            handle.shared.evict();
            let _ = handle.mailbox.send(Mail::Deactivate { force: true });
        }
    }

    /// Stops serving at once (declared dead): refuse calls, drop every activation.
    fn terminate(&self) {
        self.cluster.lease.revoke();
        self.shutting_down.store(true, Ordering::Relaxed);
        self.stopped.send_replace(true);
        // Its grains may live elsewhere by now: they leave without another turn or a final write.
        for entry in self.table.iter() {
            entry.shared.evict();
            let _ = entry.mailbox.send(Mail::Deactivate { force: true });
        }
    }
}

impl SiloInner {
    /// Writes this silo's status and tells the peers, giving up (with a warning) after `timeout`: a silo that
    /// cannot reach the membership table still stops.
    async fn set_status_within(self: &Arc<Self>, status: SiloStatus, timeout: Duration) {
        match tokio::time::timeout(timeout, membership::set_status(&self.cluster, status)).await {
            Ok(Ok(())) => self.cluster.broadcast_membership_changed(),
            Ok(Err(error)) => tracing::warn!(%error, ?status, "could not write the status"),
            Err(_) => tracing::warn!(?status, "could not write the status in time"),
        }
    }
}

impl LocalActivations for SiloInner {
    fn activations_where(&self, keep: &dyn Fn(&GrainId) -> bool) -> Vec<(GrainId, Registration)> {
        self.table
            .iter()
            .filter(|e| e.shared.is_confirmed() && keep(e.key()))
            .map(|e| (e.key().clone(), e.registration.clone()))
            .collect()
    }

    fn evict(&self, grain: &GrainId, registration: &Registration) {
        SiloInner::evict(self, grain, registration);
    }
}

impl GrainRuntime for SiloInner {
    fn invoke(&self, mut call: Call) -> BoxFuture<'static, Result<Payload, CallError>> {
        let encoded = matches!(call.payload, Payload::Encoded(_));
        if let Err(error) = self.check(&mut call) {
            self.metrics.call_errors.fetch_add(1, Ordering::Relaxed);
            return Box::pin(std::future::ready(Err(error)));
        }
        if !self.filters.is_empty() {
            // A call from a grain's turn names its caller last in its chain.
            let caller = call.chain.last().map_or(CallerIdentity::Local, |grain| CallerIdentity::Grain(grain.clone()));
            if let Err(error) = self.filter(&caller, &call) {
                self.metrics.call_errors.fetch_add(1, Ordering::Relaxed);
                return Box::pin(std::future::ready(Err(error)));
            }
        }
        let (reply, waiter) = oneshot::channel();
        let (id, invocation) = Invocation::of(call, reply);
        let deadline = invocation.deadline;
        if let Err(invocation) = self.try_local(&id, invocation) {
            tokio::spawn(self.arc().route(id, invocation));
        }
        if !encoded {
            return Box::pin(wait_reply(waiter, deadline));
        }
        // Its arguments were decoded on arrival; an encoded call is still answered with an encoded reply.
        Box::pin(async move { Ok(Payload::Encoded(wait_reply(waiter, deadline).await?.into_bytes()?)) })
    }

    fn default_timeout(&self) -> Duration {
        self.config.call_timeout
    }
}

/// A running silo. Dropping it does not stop it; call [`Silo::shutdown`].
pub struct Silo {
    inner: Arc<SiloInner>,
    tasks: Vec<JoinHandle<()>>,
    gateway: Option<GatewayHandle>,
}

impl std::fmt::Debug for Silo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Silo").field("name", &self.inner.config.name).field("address", self.inner.me()).finish()
    }
}

/// Configures and starts a [`Silo`].
pub struct SiloBuilder {
    config: SiloConfig,
    store: Option<Arc<dyn GrainStateStore>>,
    membership: Option<Arc<dyn MembershipTable>>,
    filters: CallFilters,
}

impl SiloBuilder {
    /// Adds an incoming call filter: it sees every call entering this silo — from clients, from its grains,
    /// from its process — and may refuse it (see [`crate::filter`]). Filters run in the order added.
    pub fn incoming_filter(
        mut self,
        filter: impl Fn(&CallInfo<'_>) -> Result<(), CallError> + Send + Sync + 'static,
    ) -> Self {
        self.filters.incoming.push(Arc::new(filter) as CallFilter);
        self
    }

    /// Adds an outgoing call filter: it sees every call a grain on this silo makes, before the incoming
    /// filters, and may refuse it (see [`crate::filter`]).
    pub fn outgoing_filter(
        mut self,
        filter: impl Fn(&CallInfo<'_>) -> Result<(), CallError> + Send + Sync + 'static,
    ) -> Self {
        self.filters.outgoing.push(Arc::new(filter) as CallFilter);
        self
    }

    /// Uses `config` instead of the defaults.
    pub fn config(mut self, config: SiloConfig) -> Self {
        self.config = config;
        self
    }

    /// Uses `store` for grain state instead of the provider named in the config.
    pub fn state_store(mut self, store: Arc<dyn GrainStateStore>) -> Self {
        self.store = Some(store);
        self
    }

    /// Uses `table` as the membership table instead of the one named in the config (e.g. one in-memory table
    /// shared by several silos in one process).
    pub fn membership_table(mut self, table: Arc<dyn MembershipTable>) -> Self {
        self.membership = Some(table);
        self
    }

    /// Starts the silo: binds its endpoint, joins the cluster, starts the idle collector and the membership
    /// agent.
    pub async fn start(self) -> Result<Silo, SiloError> {
        let config = self.config;
        config.check_exposure().map_err(SiloError::Config)?;
        crate::stats::start_trace_export(&config).map_err(SiloError::Config)?;
        let server_tls = crate::tls::server_config(&config)?;
        let peer_tls = crate::tls::peer_config(&config)?;
        let advertised_host = config.advertised_host().map_err(|e| SiloError::Config(e.to_string()))?;
        let pool = match (config.storage, config.membership) {
            (StorageKind::Postgres, _) | (_, MembershipKind::Postgres) => Some(open_pool(&config).await?),
            _ => None,
        };
        // State and membership in one Postgres: state writes are fenced by this silo's membership row.
        let fenced = self.membership.is_none() && config.membership == MembershipKind::Postgres;
        let types = GrainRegistration::all()
            .map(|r| (r.type_name, (r, config.idle_timeout_for(r.type_name, r.options.idle_timeout))))
            .collect::<HashMap<_, _, FastHash>>();

        let listener = if config.gateway {
            let addr = SocketAddr::new(config.host, config.port);
            let bound = match crate::sim::network() {
                Some(network) => network.bind(addr).await,
                None => tokio::net::TcpListener::bind(addr).await.map(crate::sim::TcpNetwork::listener),
            };
            Some(bound.map_err(|source| SiloError::Bind { addr, source })?)
        } else {
            None
        };
        let endpoint = match &listener {
            Some(l) => {
                let bound = l
                    .local_addr()
                    .map_err(|source| SiloError::Bind { addr: SocketAddr::new(config.host, config.port), source })?;
                SocketAddr::new(advertised_host, bound.port()).to_string()
            }
            None => format!("in-process-{}", std::process::id()),
        };
        let me = SiloAddress { endpoint, epoch: membership::now_ms() };
        let identity = PeerIdentity {
            credentials: ClusterCredentials {
                cluster_id: config.cluster_id.clone(),
                secret: config.cluster_secret.clone(),
            },
            endpoint: me.endpoint.clone(),
            tls: peer_tls,
        };
        let table: Arc<dyn MembershipTable> = match (self.membership, config.membership, &pool) {
            (Some(table), _, _) => table,
            (None, MembershipKind::Memory, _) if config.seed.is_some() => {
                Arc::new(crate::cluster::seed::SeedMembershipTable::new(
                    config.seed.clone().unwrap_or_default(),
                    identity.clone(),
                ))
            }
            (None, MembershipKind::Postgres, Some(pool)) => {
                Arc::new(PostgresMembershipTable::new(pool.clone(), config.cluster_id.clone()))
            }
            (None, _, _) => Arc::new(MemoryMembershipTable::new()),
        };
        let store: Arc<dyn GrainStateStore> = match (self.store, config.storage, &pool) {
            (Some(store), _, _) => store,
            (None, StorageKind::Postgres, Some(pool)) if fenced => {
                Arc::new(postgres::PostgresStateStore::fenced(pool.clone(), config.cluster_id.clone(), me.clone()))
            }
            (None, StorageKind::Postgres, Some(pool)) => Arc::new(postgres::PostgresStateStore::new(pool.clone())),
            (None, _, _) => Arc::new(MemoryStateStore::new()),
        };
        let cluster = Arc::new(Cluster::new(me.clone(), config.failure_detection.timings(), table, identity));
        let metrics = Metrics::default();
        let store: Arc<dyn GrainStateStore> =
            Arc::new(crate::fencing::FencedStore::new(store, cluster.clone(), metrics.storage.clone()));
        let inner = Arc::new_cyclic(|this| SiloInner {
            config,
            types,
            table: DashMap::with_hasher(FastHash::default()),
            store,
            cluster,
            next_activation_id: AtomicU64::new(1),
            clock_origin: Instant::now(),
            coarse_now_ms: AtomicU64::new(0),
            shutting_down: AtomicBool::new(false),
            stopped: watch::Sender::new(false),
            shutdown_requested: watch::Sender::new(false),
            metrics,
            filters: self.filters,
            this: this.clone(),
        });
        if let Some(pool) = &pool {
            let _ = inner.metrics.pool.set(pool.clone());
        }
        crate::stats::start_metrics_export(&inner).map_err(SiloError::Config)?;
        let host: Weak<dyn LocalActivations> = Arc::downgrade(&inner) as Weak<dyn LocalActivations>;
        inner.cluster.set_host(host);
        let mut names: Vec<_> = inner.types.keys().copied().collect();
        names.sort_unstable();
        tracing::info!(silo = %inner.config.name, address = %inner.me(), cluster = %inner.config.cluster_id, grain_types = ?names, "silo starting");
        tracing::info!(provider = inner.store.name(), membership = ?inner.config.membership, "storage");

        let gateway = match listener {
            Some(listener) => Some(gateway::start(inner.clone(), listener, server_tls).map_err(|source| {
                SiloError::Bind { addr: SocketAddr::new(inner.config.host, inner.config.port), source }
            })?),
            None => None,
        };
        let gateway_address = gateway.as_ref().map(|_| inner.me().endpoint.clone());
        membership::join(&inner.cluster, &inner.config.name, gateway_address).await?;
        membership::refresh_view(&inner).await;
        inner.cluster.broadcast_membership_changed();
        let tasks = vec![
            tokio::spawn(collect_idle(Arc::downgrade(&inner))),
            tokio::spawn(membership::run_agent(Arc::downgrade(&inner))),
        ];
        Ok(Silo { inner, tasks, gateway })
    }
}

/// Opens the Postgres pool the configuration names: connect with retries, then migrate.
async fn open_pool(config: &SiloConfig) -> Result<postgres::PgPool, SiloError> {
    let url = config.database_url.as_deref().ok_or_else(|| {
        SiloError::Config("postgres storage or membership needs database_url (or GRAINS_DATABASE_URL)".into())
    })?;
    let options =
        PostgresOptions { pool_size: config.database_pool_size, acquire_timeout: config.database_acquire_timeout };
    let pool = postgres::connect_with_retry(url, &options, config.database_start_timeout).await?;
    postgres::migrate(&pool).await?;
    Ok(pool)
}

/// Every `collection_interval`, asks idle activations to leave.
async fn collect_idle(silo: Weak<SiloInner>) {
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
    /// A builder with the default configuration (in-memory storage and membership, port 30000).
    pub fn builder() -> SiloBuilder {
        SiloBuilder { config: SiloConfig::default(), store: None, membership: None, filters: CallFilters::default() }
    }

    /// A typed reference to grain `key` of type `G`, calling through this silo.
    pub fn grain<G: Grain>(&self, key: impl Into<GrainKey>) -> G::Ref {
        G::Ref::from_core(RefCore::new(GrainId::new(G::TYPE_NAME, key), self.inner.runtime()))
    }

    /// This silo as a [`GrainRuntime`], for untyped calls.
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
        self.inner.table.get(id).is_some_and(|h| h.shared.is_confirmed())
    }

    /// The grain ids active in this silo now (activations confirmed by the directory; a duplicate that lost
    /// the registration race never counts, and never runs a turn).
    pub fn active_grains(&self) -> Vec<GrainId> {
        self.inner.active_grains()
    }

    /// The silo's counters.
    pub fn metrics(&self) -> MetricsSnapshot {
        self.inner.metrics_snapshot()
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
        let mut stopped = self.inner.stopped.subscribe();
        async move {
            let _ = stopped.wait_for(|s| *s).await;
        }
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
    /// 1. refuse new calls with `ShuttingDown` (callers send them elsewhere) and tell peers to place nothing
    ///    new here;
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
        inner.signal_all(true);
        while !inner.table.is_empty() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if !inner.table.is_empty() {
            tracing::warn!(
                remaining = inner.table.len(),
                "activations still running at the end of the grace period; stopping them"
            );
            inner.table.retain(|_, handle| {
                handle.shared.evict();
                handle.task.abort();
                false
            });
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
        inner.cluster.lease.revoke();
        inner.stopped.send_replace(true);
        for task in self.tasks.drain(..) {
            task.abort();
        }
        tracing::info!(silo = %inner.config.name, "silo stopped");
    }
}
