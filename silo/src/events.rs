//! Event sourcing on the silo: where `Journaled` grains keep their events, and projections that turn the
//! journal into read models.
//!
//! # The journal
//! A silo's [`EventStorage`] follows its `storage` setting, like grain state: in memory by default, in Postgres
//! with `storage = "postgres"` (fenced by the silo's membership row when membership is in the same database).
//! [`SiloBuilder::event_storage`] supplies one instead — e.g. one in-memory storage shared by several silos of
//! one process. Appends are also refused while the silo's membership lease is not valid, as state writes are.
//!
//! # Projections
//! A [`Projection`] consumes the events of a grain type or of a tag, in journal order, and updates a read
//! model. Register it on every silo with [`SiloBuilder::projection`]; one silo of the cluster runs it at a
//! time:
//!
//! - **Who runs it.** Each silo tries to claim the projection every second. With Postgres the claim is a
//!   session-level advisory lock on a connection of the runner's own, and every transaction of the runner goes
//!   through that connection, so only the lock holder can commit; the session ends (and the claim passes on)
//!   when the process dies, when the connection breaks, or after
//!   [`CLAIM_IDLE_TIMEOUT`](grains_storage::postgres::CLAIM_IDLE_TIMEOUT) if the process freezes. In memory
//!   the claim is a flag in the [`EventStorage`], shared by the silos that share it. A silo that loses its
//!   membership lease, or stops, gives its claims up.
//! - **Exactly-once effect.** The runner reads a batch of events after its offset and applies them in one
//!   transaction, through [`ReadModel::Postgres`]; the same transaction moves the offset (checked: it must
//!   still be where the batch started). Either both commit or neither, so after a crash the next runner
//!   resumes from the offset and every event's effect is in the read model exactly once. With the in-memory
//!   journal the read model is the projection's own memory ([`ReadModel::Memory`]): the runner applies one
//!   event at a time and moves the offset after each, and both live as long as the process.
//! - **Order.** Events come in position order, which is commit order (see `EventJournal`), so a projection sees
//!   each stream's events in sequence, and never an event behind its offset later.
//!
//! A failing `apply` rolls the batch back; the runner retries it from the committed offset with backoff (up to
//! 30 s), keeping its claim. A lost connection gives the claim up, and a silo claims it again.

use std::sync::{Arc, Weak};
use std::time::Duration;

use async_trait::async_trait;
#[cfg(feature = "postgres")]
use grains_storage::postgres::{PgConnection, PgPool, PostgresJournal, PostgresProjectionClaim};
use grains_storage::{
    EventJournal, EventSelector, MemoryJournal, MemoryProjectionClaim, MemoryProjectionStore, SiloAddress,
    StorageError, StoredEvent,
};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::Instrument;

use crate::builder::{Pool, SiloBuilder};
use crate::cluster::Cluster;
use crate::config::SiloConfig;
#[cfg(feature = "postgres")]
use crate::config::StorageKind;
use crate::silo::SiloInner;

/// How often a silo tries to claim a projection some other silo runs.
const CLAIM_RETRY: Duration = Duration::from_secs(1);

/// How often an idle runner checks that its claim's session is alive (well within the claim's idle timeout).
const KEEPALIVE: Duration = Duration::from_secs(2);

/// The longest backoff after a failing batch.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// Where a silo's event-sourced grains keep their events, and its projections their offsets.
#[derive(Clone)]
pub struct EventStorage {
    journal: Arc<dyn EventJournal>,
    offsets: Offsets,
}

#[derive(Clone)]
enum Offsets {
    Memory(Arc<MemoryProjectionStore>),
    #[cfg(feature = "postgres")]
    Postgres(PgPool),
}

impl std::fmt::Debug for EventStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let offsets = match self.offsets {
            Offsets::Memory(_) => "memory",
            #[cfg(feature = "postgres")]
            Offsets::Postgres(_) => "postgres",
        };
        f.debug_struct("EventStorage").field("journal", &self.journal.name()).field("offsets", &offsets).finish()
    }
}

impl EventStorage {
    /// An in-memory journal with in-memory projection offsets: what a silo uses by default. Clones share them.
    pub fn memory() -> Self {
        Self {
            journal: Arc::new(MemoryJournal::new()),
            offsets: Offsets::Memory(Arc::new(MemoryProjectionStore::new())),
        }
    }

    /// The Postgres journal and projection offsets over `pool` (migrated with `grains_storage::postgres::migrate`).
    #[cfg(feature = "postgres")]
    pub fn postgres(pool: PgPool) -> Self {
        Self { journal: Arc::new(PostgresJournal::new(pool.clone())), offsets: Offsets::Postgres(pool) }
    }

    /// The Postgres journal over `pool`, its appends fenced by `silo`'s membership row in `cluster_id`.
    #[cfg(feature = "postgres")]
    fn postgres_fenced(pool: PgPool, cluster_id: &str, silo: SiloAddress) -> Self {
        Self {
            journal: Arc::new(PostgresJournal::fenced(pool.clone(), cluster_id, silo)),
            offsets: Offsets::Postgres(pool),
        }
    }

    /// The journal.
    pub fn journal(&self) -> &Arc<dyn EventJournal> {
        &self.journal
    }

    /// The committed offset of `projection`: the position of the last event whose effect is in its read model.
    pub async fn projection_offset(&self, projection: &str) -> Result<u64, StorageError> {
        match &self.offsets {
            Offsets::Memory(store) => Ok(store.offset(projection)),
            #[cfg(feature = "postgres")]
            Offsets::Postgres(pool) => grains_storage::postgres::projection_offset(pool, projection).await,
        }
    }

    async fn try_claim(&self, projection: &str) -> Result<Option<Claim>, StorageError> {
        match &self.offsets {
            Offsets::Memory(store) => Ok(store.try_claim(projection).map(Claim::Memory)),
            #[cfg(feature = "postgres")]
            Offsets::Postgres(pool) => {
                Ok(PostgresProjectionClaim::try_claim(pool, projection).await?.map(|c| Claim::Postgres(Box::new(c))))
            }
        }
    }
}

/// Where a projection's `apply` writes its read model.
#[derive(Debug)]
#[non_exhaustive]
pub enum ReadModel<'a> {
    /// In-memory event storage: the read model is the projection's own memory. The runner applies one event
    /// at a time and moves the offset after each `Ok`; an `apply` that fails should change nothing.
    Memory,
    /// Postgres event storage: the transaction the batch's offset is committed in. Write the read model
    /// through this connection, and its effect commits exactly when the offset does.
    #[cfg(feature = "postgres")]
    Postgres(&'a mut PgConnection),
    /// Keeps the lifetime used without the `postgres` feature.
    #[cfg(not(feature = "postgres"))]
    #[doc(hidden)]
    __Unused(std::marker::PhantomData<&'a mut ()>, std::convert::Infallible),
}

/// Why a projection's `apply` failed. The runner rolls the batch back and retries it later.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProjectionError {
    /// The read model refused the change (a failed statement, a broken invariant).
    #[error("read model: {0}")]
    ReadModel(String),
    /// The projection does not support this kind of read model (e.g. a Postgres-only projection on a silo
    /// with in-memory storage).
    #[error("this projection cannot write a {0} read model")]
    UnsupportedReadModel(&'static str),
    /// Storage failed underneath.
    #[error(transparent)]
    Storage(#[from] StorageError),
}

impl ProjectionError {
    /// A read-model failure with `error`'s message (`.map_err(ProjectionError::read_model)`).
    pub fn read_model(error: impl std::fmt::Display) -> Self {
        ProjectionError::ReadModel(error.to_string())
    }

    /// The error for a read model of the wrong kind.
    pub fn unsupported(read_model: &ReadModel<'_>) -> Self {
        ProjectionError::UnsupportedReadModel(match read_model {
            ReadModel::Memory => "memory",
            #[cfg(feature = "postgres")]
            ReadModel::Postgres(_) => "postgres",
            #[cfg(not(feature = "postgres"))]
            ReadModel::__Unused(_, never) => match *never {},
        })
    }
}

/// Turns the journal into a read model: consumes the events `selector` picks, in journal order.
#[async_trait]
pub trait Projection: Send + Sync + 'static {
    /// The projection's name, unique in the cluster: it names the offset and the claim.
    fn name(&self) -> &str;

    /// Which events it consumes.
    fn selector(&self) -> EventSelector;

    /// Applies one event to the read model (see [`ReadModel`]).
    async fn apply(&self, read_model: ReadModel<'_>, event: &StoredEvent) -> Result<(), ProjectionError>;

    /// The most events applied in one transaction.
    fn batch_size(&self) -> usize {
        100
    }

    /// How long the runner waits before looking again when it has caught up.
    fn poll_interval(&self) -> Duration {
        Duration::from_millis(100)
    }
}

/// The event storage and projections a builder was given.
#[derive(Default)]
pub(crate) struct EventsSetup {
    storage: Option<EventStorage>,
    projections: Vec<Arc<dyn Projection>>,
}

impl SiloBuilder {
    /// Uses `storage` for event-sourced grains and projections instead of what the `storage` setting names
    /// (see [`crate::events`]).
    pub fn event_storage(mut self, storage: EventStorage) -> Self {
        self.events.storage = Some(storage);
        self
    }

    /// Runs `projection` on this silo whenever no other silo of the cluster runs it (see [`crate::events`]).
    pub fn projection(mut self, projection: impl Projection) -> Self {
        self.events.projections.push(Arc::new(projection));
        self
    }
}

/// The event storage a starting silo uses, and the projections it will run.
pub(crate) struct Events {
    storage: EventStorage,
    projections: Vec<Arc<dyn Projection>>,
}

impl EventsSetup {
    /// The event storage the silo uses: the one given, else Postgres with `storage = "postgres"` (fenced by
    /// this silo's row when `fenced`), else in memory.
    #[cfg_attr(not(feature = "postgres"), allow(unused_variables))]
    pub(crate) fn open(self, config: &SiloConfig, pool: Option<&Pool>, fenced: bool, me: &SiloAddress) -> Events {
        let storage = match (self.storage, config.storage, pool) {
            (Some(storage), _, _) => storage,
            #[cfg(feature = "postgres")]
            (None, StorageKind::Postgres, Some(pool)) if fenced => {
                EventStorage::postgres_fenced(pool.clone(), &config.cluster_id, me.clone())
            }
            #[cfg(feature = "postgres")]
            (None, StorageKind::Postgres, Some(pool)) => EventStorage::postgres(pool.clone()),
            (None, _, _) => EventStorage::memory(),
        };
        Events { storage, projections: self.projections }
    }
}

impl Events {
    /// The journal grains append to: refused while the silo's lease is not valid.
    pub(crate) fn journal_for_grains(&self, cluster: Arc<Cluster>) -> Arc<dyn EventJournal> {
        Arc::new(crate::fencing::FencedJournal::new(self.storage.journal.clone(), cluster))
    }

    /// Starts one runner per projection.
    pub(crate) fn spawn_projections(self, silo: &Arc<SiloInner>) -> Vec<JoinHandle<()>> {
        if !self.projections.is_empty() {
            tracing::info!(projections = self.projections.len(), journal = self.storage.journal.name(), "projections");
        }
        self.projections
            .into_iter()
            .map(|projection| {
                let span = tracing::info_span!("projection", name = %projection.name());
                tokio::spawn(run(projection, self.storage.clone(), Arc::downgrade(silo)).instrument(span))
            })
            .collect()
    }
}

/// A held claim.
enum Claim {
    Memory(MemoryProjectionClaim),
    #[cfg(feature = "postgres")]
    Postgres(Box<PostgresProjectionClaim>),
}

impl Claim {
    /// Checks that an idle claim still holds (a Postgres claim lives in a session that may have died).
    async fn keep_alive(&mut self) -> Result<(), StorageError> {
        match self {
            Claim::Memory(_) => Ok(()),
            #[cfg(feature = "postgres")]
            Claim::Postgres(claim) => claim.check().await,
        }
    }
}

/// Why a runner stopped driving its claim.
enum Stop {
    /// The silo stopped.
    Silo,
    /// The claim was lost or given up; claim again later.
    Claim(String),
}

/// Whether the silo still runs and holds its lease: `None` once it is gone or stopped.
fn silo_state(silo: &Weak<SiloInner>) -> Option<bool> {
    let silo = silo.upgrade()?;
    if silo.is_stopped() {
        return None;
    }
    Some(silo.cluster.lease.is_valid())
}

/// One projection on one silo: claim it when free, drive it while held, until the silo stops.
async fn run(projection: Arc<dyn Projection>, storage: EventStorage, silo: Weak<SiloInner>) {
    loop {
        match silo_state(&silo) {
            None => return,
            Some(false) => {} // no lease: claim nothing
            Some(true) => match storage.try_claim(projection.name()).await {
                Ok(Some(claim)) => {
                    tracing::info!("projection claimed");
                    match drive(&*projection, &storage, claim, &silo).await {
                        Stop::Silo => return,
                        Stop::Claim(reason) => tracing::warn!(%reason, "projection claim given up"),
                    }
                }
                Ok(None) => {}
                Err(error) => tracing::warn!(%error, "cannot claim the projection"),
            },
        }
        tokio::time::sleep(CLAIM_RETRY).await;
    }
}

/// Applies batches while the claim holds.
async fn drive(projection: &dyn Projection, storage: &EventStorage, mut claim: Claim, silo: &Weak<SiloInner>) -> Stop {
    let selector = projection.selector();
    let mut offset = match &mut claim {
        Claim::Memory(claim) => claim.offset(),
        #[cfg(feature = "postgres")]
        Claim::Postgres(claim) => match claim.offset().await {
            Ok(offset) => offset,
            Err(error) => return Stop::Claim(error.to_string()),
        },
    };
    let mut last_touch = Instant::now();
    let mut backoff = Duration::ZERO;
    loop {
        match silo_state(silo) {
            None => return Stop::Silo,
            Some(false) => return Stop::Claim("the silo's membership lease is not valid".to_owned()),
            Some(true) => {}
        }
        if !backoff.is_zero() {
            tokio::time::sleep(backoff).await;
        }
        let events = match storage.journal.read_all(&selector, offset, projection.batch_size().max(1)).await {
            Ok(events) => events,
            Err(error) => {
                tracing::warn!(%error, "cannot read the journal");
                backoff = next_backoff(backoff);
                continue;
            }
        };
        let Some(last) = events.last().map(|e| e.position) else {
            if last_touch.elapsed() >= KEEPALIVE {
                if let Err(error) = claim.keep_alive().await {
                    return Stop::Claim(error.to_string());
                }
                last_touch = Instant::now();
            }
            backoff = Duration::ZERO;
            tokio::time::sleep(projection.poll_interval()).await;
            continue;
        };
        let span = tracing::debug_span!("projection.batch", from = offset, to = last, events = events.len());
        let outcome = apply_batch(projection, &mut claim, offset, &events).instrument(span).await;
        match outcome {
            Ok(to) => {
                offset = to;
                last_touch = Instant::now();
                backoff = Duration::ZERO;
            }
            Err(BatchError::Apply { error, committed }) => {
                tracing::warn!(%error, offset = committed, "projection apply failed; retrying the batch");
                offset = committed;
                backoff = next_backoff(backoff);
            }
            Err(BatchError::Claim(error)) => return Stop::Claim(error.to_string()),
        }
    }
}

fn next_backoff(backoff: Duration) -> Duration {
    (backoff * 2).clamp(Duration::from_millis(100), MAX_BACKOFF)
}

enum BatchError {
    /// The projection failed; nothing after `committed` is in the read model.
    Apply { error: ProjectionError, committed: u64 },
    /// The claim's storage failed, or another runner moved the offset.
    Claim(StorageError),
}

/// Applies `events` after `offset`; returns the new offset.
async fn apply_batch(
    projection: &dyn Projection,
    claim: &mut Claim,
    offset: u64,
    events: &[StoredEvent],
) -> Result<u64, BatchError> {
    match claim {
        Claim::Memory(claim) => {
            let mut committed = offset;
            for event in events {
                if let Err(error) = projection.apply(ReadModel::Memory, event).await {
                    return Err(BatchError::Apply { error, committed });
                }
                claim.commit(committed, event.position).map_err(BatchError::Claim)?;
                committed = event.position;
            }
            Ok(committed)
        }
        #[cfg(feature = "postgres")]
        Claim::Postgres(claim) => {
            let mut unit = claim.begin().await.map_err(BatchError::Claim)?;
            for event in events {
                if let Err(error) = projection.apply(ReadModel::Postgres(unit.conn()), event).await {
                    return Err(BatchError::Apply { error, committed: offset }); // dropping `unit` rolls back
                }
            }
            let to = events.last().map_or(offset, |e| e.position);
            unit.commit(offset, to).await.map_err(BatchError::Claim)?;
            Ok(to)
        }
    }
}
