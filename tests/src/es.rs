//! Event-sourced test grains and a test projection.
//!
//! `Ledger` folds every value it is given into an order-sensitive state (the list itself and a rolling
//! digest), so a recovered state equals the original only if every event came back, once, in order.
//! `SnappedLedger` is the same with a snapshot every 7 events. `AppliedLog` is a projection whose read model
//! shows every event it applied, one row per application, so double or missing applications are visible.

use std::time::Duration;

use grains::prelude::*;
use grains::{Recovery, StorageError};
use grains_silo::{Projection, ProjectionError, ReadModel};
use grains_storage::{EventSelector, StoredEvent};

/// What a ledger holds: every value in order, and a digest of them.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LedgerState {
    /// The values, in the order they were added.
    pub values: Vec<i64>,
    /// An order-sensitive digest of the values.
    pub digest: u64,
}

/// What happens to a ledger.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum LedgerEvent {
    /// A value was added.
    Added(i64),
}

impl EventSourced for LedgerState {
    type Event = LedgerEvent;

    fn apply(&mut self, event: &LedgerEvent) {
        let LedgerEvent::Added(value) = event;
        self.values.push(*value);
        self.digest = self.digest.wrapping_mul(1_000_003).wrapping_add(*value as u64);
    }

    fn tags(_: &LedgerEvent) -> Vec<String> {
        vec!["ledger".to_owned()]
    }
}

/// What a ledger reports about itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LedgerView {
    /// The last confirmed sequence number.
    pub version: u64,
    /// The state.
    pub state: LedgerState,
    /// How this activation recovered (snapshot seq, events replayed).
    pub snapshot: Option<u64>,
    /// Events replayed at activation.
    pub replayed: u64,
}

fn view(journal: &Journaled<LedgerState>) -> LedgerView {
    let Recovery { snapshot, replayed } = journal.recovery();
    LedgerView { version: journal.version(), state: journal.state().clone(), snapshot, replayed }
}

/// An event-sourced ledger without snapshots.
#[grain(idle_timeout = "10m")]
pub struct Ledger {
    #[journal(name = "ledger")]
    journal: Journaled<LedgerState>,
    ctx: GrainContext,
}

#[grain]
impl Ledger {
    /// Appends one value; returns the new version.
    pub async fn add(&mut self, value: i64) -> Result<u64, StorageError> {
        self.journal.persist(LedgerEvent::Added(value)).await
    }

    /// Appends several values atomically; returns the new version.
    pub async fn add_all(&mut self, values: Vec<i64>) -> Result<u64, StorageError> {
        self.journal.persist_all(values.into_iter().map(LedgerEvent::Added)).await
    }

    /// Appends one value after sleeping `ms` (to line two activations up on one version).
    pub async fn add_after(&mut self, value: i64, ms: u64) -> Result<u64, StorageError> {
        tokio::time::sleep(Duration::from_millis(ms)).await;
        self.journal.persist(LedgerEvent::Added(value)).await
    }

    /// The state, version and recovery.
    pub async fn view(&self) -> LedgerView {
        view(&self.journal)
    }

    /// The state folded from the whole journal, ignoring snapshots.
    pub async fn full_replay(&self) -> Result<LedgerState, StorageError> {
        self.journal.replay_all().await
    }

    /// Deactivates after this call.
    pub async fn deactivate(&self) {
        self.ctx.deactivate_on_idle();
    }
}

/// An event-sourced ledger snapshotting every 7 events.
#[grain(idle_timeout = "10m")]
pub struct SnappedLedger {
    #[journal(name = "ledger", snapshot_every = 7)]
    journal: Journaled<LedgerState>,
    ctx: GrainContext,
}

#[grain]
impl SnappedLedger {
    /// Appends one value; returns the new version.
    pub async fn add(&mut self, value: i64) -> Result<u64, StorageError> {
        self.journal.persist(LedgerEvent::Added(value)).await
    }

    /// Appends several values atomically; returns the new version.
    pub async fn add_all(&mut self, values: Vec<i64>) -> Result<u64, StorageError> {
        self.journal.persist_all(values.into_iter().map(LedgerEvent::Added)).await
    }

    /// The state, version and recovery.
    pub async fn view(&self) -> LedgerView {
        view(&self.journal)
    }

    /// The state folded from the whole journal, ignoring snapshots.
    pub async fn full_replay(&self) -> Result<LedgerState, StorageError> {
        self.journal.replay_all().await
    }

    /// Deactivates after this call.
    pub async fn deactivate(&self) {
        self.ctx.deactivate_on_idle();
    }
}

/// A projection of every `ledger`-tagged event into `applied_log (position, grain_key, seq, value)` — one row
/// per application, no uniqueness, so an event applied twice shows as two rows — and a running total in
/// `applied_total`. Each event may take `delay` to apply (to widen the window a crash can hit).
#[derive(Debug, Clone)]
pub struct AppliedLog {
    /// The projection's name.
    pub name: String,
    /// Time spent per event, inside the transaction.
    pub delay: Duration,
}

impl AppliedLog {
    /// The read model's tables.
    pub const SCHEMA: &'static str = "CREATE TABLE IF NOT EXISTS applied_log (
            position BIGINT NOT NULL, grain_key TEXT NOT NULL, seq BIGINT NOT NULL, value BIGINT NOT NULL);
        CREATE TABLE IF NOT EXISTS applied_total (id INT PRIMARY KEY, events BIGINT NOT NULL, sum BIGINT NOT NULL);
        INSERT INTO applied_total VALUES (1, 0, 0) ON CONFLICT DO NOTHING;";
}

#[async_trait::async_trait]
impl Projection for AppliedLog {
    fn name(&self) -> &str {
        &self.name
    }

    fn selector(&self) -> EventSelector {
        EventSelector::Tag("ledger".into())
    }

    fn batch_size(&self) -> usize {
        20
    }

    fn poll_interval(&self) -> Duration {
        Duration::from_millis(20)
    }

    async fn apply(&self, read_model: ReadModel<'_>, event: &StoredEvent) -> Result<(), ProjectionError> {
        let ReadModel::Postgres(conn) = read_model else { return Err(ProjectionError::unsupported(&read_model)) };
        let LedgerEvent::Added(value) =
            serde_json::from_value(event.payload.clone()).map_err(ProjectionError::read_model)?;
        if !self.delay.is_zero() {
            tokio::time::sleep(self.delay).await;
        }
        sqlx::query("INSERT INTO applied_log VALUES ($1, $2, $3, $4)")
            .bind(event.position as i64)
            .bind(&event.stream.grain_key)
            .bind(event.seq as i64)
            .bind(value)
            .execute(&mut *conn)
            .await
            .map_err(ProjectionError::read_model)?;
        sqlx::query("UPDATE applied_total SET events = events + 1, sum = sum + $1 WHERE id = 1")
            .bind(value)
            .execute(&mut *conn)
            .await
            .map_err(ProjectionError::read_model)?;
        Ok(())
    }
}

/// What the test silo binary adds to its builder: with `GRAINS_TEST_PROJECTION=<name>` in its environment, an
/// [`AppliedLog`] projection of that name, each event taking `GRAINS_TEST_PROJECTION_DELAY_MS` (default 0).
pub fn test_silo_setup(builder: grains_silo::SiloBuilder, _: &grains_silo::SiloConfig) -> grains_silo::SiloBuilder {
    let Ok(name) = std::env::var("GRAINS_TEST_PROJECTION") else { return builder };
    let delay = std::env::var("GRAINS_TEST_PROJECTION_DELAY_MS").ok().and_then(|ms| ms.parse().ok()).unwrap_or(0);
    builder.projection(AppliedLog { name, delay: Duration::from_millis(delay) })
}
