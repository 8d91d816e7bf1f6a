//! The silo: hosts activations, routes every call by grain id, collects idle grains, serves the gateway.
//!
//! Every call, from a grain or from a client, goes through [`SiloInner::deliver`]: look the grain id up in the
//! activation table, activate on a miss, enqueue in the mailbox. This is the single path that the cluster's
//! directory lookup extends.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use dashmap::DashMap;
use dashmap::mapref::entry::Entry;
use grains::runtime::{BoxFuture, Call, GrainRuntime, Payload};
use grains::{CallError, Grain, GrainId, GrainKey, GrainRef, GrainRegistration, RefCore};
use grains_storage::postgres::{self, PostgresOptions};
use grains_storage::{GrainStateStore, MemoryStateStore};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::activation::{self, ActivationHandle, ActivationShared, ActivationStart, Invocation, Mail};
use crate::config::{SiloConfig, StorageKind};
use crate::gateway::{self, GatewayHandle};
use crate::metrics::{Metrics, MetricsSnapshot};

/// Why a silo could not start.
#[derive(Debug, thiserror::Error)]
pub enum SiloError {
    /// The configuration is incomplete or inconsistent.
    #[error("configuration: {0}")]
    Config(String),
    /// The storage provider could not be reached or prepared.
    #[error("storage: {0}")]
    Storage(#[from] grains_storage::StorageError),
    /// The gateway could not bind its address.
    #[error("cannot bind the gateway to {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        source: std::io::Error,
    },
}

fn kept_closing(id: &GrainId) -> CallError {
    CallError::Unavailable(format!("{id}: activation kept closing under the call"))
}

/// How many times a call is re-aimed at a mailbox that closed under it before giving up.
const MAX_DELIVERY_ATTEMPTS: usize = 16;

pub(crate) struct SiloInner {
    pub(crate) config: SiloConfig,
    types: HashMap<&'static str, (&'static GrainRegistration, Duration)>,
    table: DashMap<GrainId, ActivationHandle>,
    pub(crate) store: Arc<dyn GrainStateStore>,
    next_activation_id: AtomicU64,
    clock_origin: Instant,
    shutting_down: AtomicBool,
    pub(crate) metrics: Metrics,
    this: Weak<SiloInner>,
}

impl SiloInner {
    /// This silo as the runtime that grain contexts and references call through.
    pub(crate) fn runtime(&self) -> Arc<dyn GrainRuntime> {
        self.runtime_inner()
    }

    /// Milliseconds since the silo started, for idle bookkeeping.
    pub(crate) fn now_ms(&self) -> u64 {
        self.clock_origin.elapsed().as_millis() as u64
    }

    /// The registration of a grain type hosted here.
    pub(crate) fn grain_type(&self, name: &str) -> Option<&'static GrainRegistration> {
        self.types.get(name).map(|(r, _)| *r)
    }

    /// Removes the table entry of `id` if it still belongs to activation `activation_id`.
    pub(crate) fn remove_activation(&self, id: &GrainId, activation_id: u64) {
        self.table.remove_if(id, |_, h| h.activation_id == activation_id);
    }

    /// Checks a call and puts it in the mailbox of the grain's activation, activating the grain if needed.
    fn deliver(&self, call: Call, reply: oneshot::Sender<Result<Payload, CallError>>) -> Result<(), CallError> {
        if self.shutting_down.load(Ordering::Relaxed) {
            return Err(CallError::ShuttingDown);
        }
        if call.chain.contains(&call.target) {
            let chain = call.chain.iter().chain(std::iter::once(&call.target)).map(ToString::to_string).collect();
            return Err(CallError::Deadlock { chain });
        }
        let Some(&(registration, _)) = self.types.get(call.target.grain_type()) else {
            return Err(CallError::UnknownGrainType(call.target.grain_type().to_owned()));
        };
        if matches!(call.payload, Payload::Encoded(_)) && !registration.methods.contains(&&*call.method) {
            return Err(CallError::UnknownMethod {
                grain_type: call.target.grain_type().to_owned(),
                method: call.method.into_owned(),
            });
        }
        let invocation = Invocation {
            method: call.method,
            payload: call.payload,
            deadline: call.deadline,
            chain: call.chain,
            reply,
        };
        let id = call.target;
        self.enqueue(id.clone(), invocation).map_err(|_| kept_closing(&id))
    }

    /// Puts `invocation` in the mailbox of `id`'s activation, creating the activation on a miss.
    /// On failure (the grain's mailbox kept closing under the call) the invocation comes back, so its caller
    /// can still be answered.
    fn enqueue(&self, id: GrainId, invocation: Invocation) -> Result<(), Invocation> {
        let mut invocation = invocation;
        for _ in 0..MAX_DELIVERY_ATTEMPTS {
            let mail = Mail::Call(invocation);
            let sent = match self.table.get(&id) {
                Some(handle) => handle.mailbox.send(mail),
                None => match self.table.entry(id.clone()) {
                    Entry::Occupied(slot) => slot.get().mailbox.send(mail),
                    Entry::Vacant(slot) => {
                        let handle = self.spawn_activation(&id);
                        let sent = handle.mailbox.send(mail);
                        slot.insert(handle);
                        sent
                    }
                },
            };
            match sent {
                Ok(()) => {
                    self.metrics.calls.fetch_add(1, Ordering::Relaxed);
                    return Ok(());
                }
                Err(mpsc::error::SendError(Mail::Call(back))) => {
                    // That activation closed its mailbox (it failed or is leaving); drop its stale entry.
                    self.table.remove_if(&id, |_, h| h.mailbox.is_closed());
                    invocation = back;
                }
                Err(mpsc::error::SendError(Mail::Deactivate { .. })) => {
                    unreachable!("enqueue only sends calls")
                }
            }
        }
        Err(invocation)
    }

    /// Starts the activation task of `id`; the caller inserts the returned handle in the table.
    fn spawn_activation(&self, id: &GrainId) -> ActivationHandle {
        let (registration, idle_timeout) = match self.types.get(id.grain_type()) {
            Some(&entry) => entry,
            None => unreachable!("deliver checked the grain type"),
        };
        let (tx, rx) = mpsc::unbounded_channel();
        let activation_id = self.next_activation_id.fetch_add(1, Ordering::Relaxed);
        let shared = Arc::new(ActivationShared::new(self.now_ms(), idle_timeout));
        tokio::spawn(activation::run(ActivationStart {
            silo: self.runtime_inner(),
            id: id.clone(),
            activation_id,
            registration,
            mailbox: rx,
            shared: shared.clone(),
        }));
        ActivationHandle { activation_id, mailbox: tx, shared }
    }

    fn runtime_inner(&self) -> Arc<SiloInner> {
        match self.this.upgrade() {
            Some(me) => me,
            None => unreachable!("a silo's own methods run only while it is alive"),
        }
    }

    /// Hands a call queued at a departed activation to the grain's next activation.
    pub(crate) fn redeliver(&self, id: GrainId, invocation: Invocation) {
        if self.shutting_down.load(Ordering::Relaxed) {
            let _ = invocation.reply.send(Err(CallError::ShuttingDown));
            return;
        }
        if let Err(invocation) = self.enqueue(id.clone(), invocation) {
            let _ = invocation.reply.send(Err(kept_closing(&id)));
        }
    }

    /// Sends every activation a deactivation request (idle ones leave, busy ones stay unless `force`).
    fn signal_all(&self, force: bool) {
        let now = self.now_ms();
        for entry in self.table.iter() {
            if force || entry.shared.is_idle(now) {
                let _ = entry.mailbox.send(Mail::Deactivate { force });
            }
        }
    }
}

impl GrainRuntime for SiloInner {
    fn invoke(&self, call: Call) -> BoxFuture<'static, Result<Payload, CallError>> {
        let deadline = call.deadline;
        let timeout = deadline.saturating_duration_since(Instant::now());
        let (reply, waiter) = oneshot::channel();
        if let Err(error) = self.deliver(call, reply) {
            self.metrics.call_errors.fetch_add(1, Ordering::Relaxed);
            return Box::pin(std::future::ready(Err(error)));
        }
        Box::pin(async move {
            match tokio::time::timeout_at(deadline, waiter).await {
                Ok(Ok(result)) => result,
                Ok(Err(_)) => Err(CallError::Unavailable("the activation ended without replying".to_owned())),
                Err(_) => Err(CallError::Timeout(timeout)),
            }
        })
    }

    fn default_timeout(&self) -> Duration {
        self.config.call_timeout
    }
}

/// A running silo. Dropping it does not stop it; call [`Silo::shutdown`].
pub struct Silo {
    inner: Arc<SiloInner>,
    collector: JoinHandle<()>,
    gateway: Option<GatewayHandle>,
}

impl std::fmt::Debug for Silo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Silo").field("name", &self.inner.config.name).finish_non_exhaustive()
    }
}

/// Configures and starts a [`Silo`].
pub struct SiloBuilder {
    config: SiloConfig,
    store: Option<Arc<dyn GrainStateStore>>,
}

impl SiloBuilder {
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

    /// Starts the silo: the idle collector and, if configured, the client gateway.
    pub async fn start(self) -> Result<Silo, SiloError> {
        let config = self.config;
        let store = match self.store {
            Some(store) => store,
            None => open_state_store(&config).await?,
        };
        let types = GrainRegistration::all()
            .map(|r| (r.type_name, (r, config.idle_timeout_for(r.type_name, r.options.idle_timeout))))
            .collect::<HashMap<_, _>>();
        let inner = Arc::new_cyclic(|this| SiloInner {
            config,
            types,
            table: DashMap::new(),
            store,
            next_activation_id: AtomicU64::new(1),
            clock_origin: Instant::now(),
            shutting_down: AtomicBool::new(false),
            metrics: Metrics::default(),
            this: this.clone(),
        });
        let mut names: Vec<_> = inner.types.keys().copied().collect();
        names.sort_unstable();
        tracing::info!(silo = %inner.config.name, storage = inner.store.name(), grain_types = ?names, "silo starting");
        tracing::info!(provider = inner.store.name(), "grain state storage provider");

        let collector = tokio::spawn(collect_idle(Arc::downgrade(&inner)));
        let gateway = if inner.config.gateway {
            let addr = SocketAddr::new(inner.config.host, inner.config.gateway_port);
            Some(gateway::start(inner.clone(), addr).await.map_err(|source| SiloError::Bind { addr, source })?)
        } else {
            None
        };
        Ok(Silo { inner, collector, gateway })
    }
}

/// Opens the storage provider the configuration names (Postgres: connect with retries, then migrate).
async fn open_state_store(config: &SiloConfig) -> Result<Arc<dyn GrainStateStore>, SiloError> {
    match config.storage {
        StorageKind::Memory => Ok(Arc::new(MemoryStateStore::new())),
        StorageKind::Postgres => {
            let url = config.database_url.as_deref().ok_or_else(|| {
                SiloError::Config("storage = \"postgres\" needs database_url (or GRAINS_DATABASE_URL)".into())
            })?;
            let options = PostgresOptions {
                pool_size: config.database_pool_size,
                acquire_timeout: config.database_acquire_timeout,
            };
            let pool = postgres::connect_with_retry(url, &options, config.database_start_timeout).await?;
            postgres::migrate(&pool).await?;
            Ok(Arc::new(postgres::PostgresStateStore::new(pool)))
        }
    }
}

/// Every `collection_interval`, asks idle activations to leave.
async fn collect_idle(silo: Weak<SiloInner>) {
    let Some(interval) = silo.upgrade().map(|s| s.config.collection_interval) else { return };
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let Some(silo) = silo.upgrade() else { return };
        if silo.shutting_down.load(Ordering::Relaxed) {
            return;
        }
        silo.signal_all(false);
    }
}

impl Silo {
    /// A builder with the default configuration (in-memory storage, gateway on 127.0.0.1:30000).
    pub fn builder() -> SiloBuilder {
        SiloBuilder { config: SiloConfig::default(), store: None }
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

    /// The address the client gateway listens on, if it runs.
    pub fn gateway_addr(&self) -> Option<SocketAddr> {
        self.gateway.as_ref().map(|g| g.local_addr)
    }

    /// Number of activations in the table now.
    pub fn activation_count(&self) -> usize {
        self.inner.table.len()
    }

    /// Whether `id` has an activation in this silo now.
    pub fn is_active(&self, id: &GrainId) -> bool {
        self.inner.table.contains_key(id)
    }

    /// The silo's counters.
    pub fn metrics(&self) -> MetricsSnapshot {
        self.inner.metrics.snapshot(self.inner.table.len())
    }

    /// Asks every idle activation to passivate now, as the idle collector does on each tick.
    pub fn collect_idle_now(&self) {
        self.inner.signal_all(false);
    }

    /// Stops the silo: refuses new calls, stops the gateway, deactivates every grain (running
    /// `on_deactivate`, so grains can flush state) and waits up to `grace` for them to finish.
    pub async fn shutdown(self, grace: Duration) {
        tracing::info!(silo = %self.inner.config.name, "silo shutting down");
        let deadline = Instant::now() + grace;
        if let Some(gateway) = self.gateway {
            gateway.stop(grace).await;
        }
        self.inner.shutting_down.store(true, Ordering::Relaxed);
        self.collector.abort();
        self.inner.signal_all(true);
        while !self.inner.table.is_empty() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if !self.inner.table.is_empty() {
            tracing::warn!(
                remaining = self.inner.table.len(),
                "activations still running at the end of the grace period"
            );
            self.inner.table.clear();
        }
        tracing::info!(silo = %self.inner.config.name, "silo stopped");
    }
}
