//! Fencing: a silo writes grain state, appends events and writes reminders only while it holds its membership
//! lease.
//!
//! A silo that was frozen (SIGSTOP, a VM pause) or cut off from the membership table may have been declared
//! dead, and its grains re-activated elsewhere, without knowing it. Its lease (see `cluster::Lease`) runs out
//! no later than the moment peers start re-placing its grains, so a write it attempts afterwards — a turn that
//! was half-way through, an `on_deactivate` flush — is refused here instead of racing the new activation.
//! With state and membership in one Postgres database, the store itself also fences each write by the silo's
//! membership row (`PostgresStateStore::fenced`), which closes the gap between this check and the commit. The
//! etag check in storage remains the last line: it refuses a stale writer whatever happens.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use async_trait::async_trait;
use grains_storage::{
    ETag, EventJournal, EventSelector, GrainStateStore, NewEvent, ReminderEntry, ReminderProgress, ReminderRow,
    ReminderTable, RingRange, Snapshot, StateKey, StorageError, StoredEvent, StoredState,
};

use crate::cluster::Cluster;
use crate::metrics::{Histogram, StorageStats};

/// A state store that refuses writes while the silo's membership lease is not valid, and times every
/// operation into the silo's storage histograms.
pub(crate) struct FencedStore {
    inner: Arc<dyn GrainStateStore>,
    cluster: Arc<Cluster>,
    stats: Arc<StorageStats>,
}

/// Records the latency of one storage operation, and whether it failed.
async fn timed<T>(
    stats: &StorageStats,
    histogram: &Histogram,
    operation: impl std::future::Future<Output = Result<T, StorageError>>,
) -> Result<T, StorageError> {
    let started = std::time::Instant::now();
    let result = operation.await;
    histogram.record(started.elapsed());
    if result.is_err() {
        stats.failures.fetch_add(1, Ordering::Relaxed);
    }
    result
}

impl FencedStore {
    pub(crate) fn new(inner: Arc<dyn GrainStateStore>, cluster: Arc<Cluster>, stats: Arc<StorageStats>) -> Self {
        Self { inner, cluster, stats }
    }

    fn check(&self) -> Result<(), StorageError> {
        lease_held(&self.cluster)
    }
}

/// `Ok` while the silo holds its membership lease; `Fenced` (and a prompt re-read of membership) otherwise.
fn lease_held(cluster: &Cluster) -> Result<(), StorageError> {
    if cluster.lease.is_valid() {
        return Ok(());
    }
    cluster.refresh_now.notify_one();
    Err(StorageError::Fenced { silo: cluster.me.to_string() })
}

/// A reminders table that refuses writes (registrations, removals, recorded progress) while the silo's
/// membership lease is not valid: a silo that may have been declared dead neither registers reminders for
/// grains that live elsewhere now, nor moves the progress of reminders another silo fires now. With the
/// table and membership in one Postgres, `PostgresReminderTable::fenced` also fences each write by the
/// silo's membership row.
pub(crate) struct FencedReminderTable {
    inner: Arc<dyn ReminderTable>,
    cluster: Arc<Cluster>,
}

impl FencedReminderTable {
    pub(crate) fn new(inner: Arc<dyn ReminderTable>, cluster: Arc<Cluster>) -> Self {
        Self { inner, cluster }
    }
}

#[async_trait]
impl ReminderTable for FencedReminderTable {
    async fn read_grain(&self, grain_type: &str, grain_key: &str) -> Result<Vec<ReminderRow>, StorageError> {
        self.inner.read_grain(grain_type, grain_key).await
    }

    async fn read_row(
        &self,
        grain_type: &str,
        grain_key: &str,
        name: &str,
    ) -> Result<Option<ReminderRow>, StorageError> {
        self.inner.read_row(grain_type, grain_key, name).await
    }

    async fn read_range(&self, begin: u32, end: u32) -> Result<Vec<ReminderRow>, StorageError> {
        self.inner.read_range(begin, end).await
    }

    async fn read_due(&self, ranges: &[RingRange], due_by_ms: i64) -> Result<Vec<ReminderRow>, StorageError> {
        self.inner.read_due(ranges, due_by_ms).await
    }

    async fn upsert(&self, entry: &ReminderEntry) -> Result<ETag, StorageError> {
        lease_held(&self.cluster)?;
        self.inner.upsert(entry).await
    }

    async fn remove(&self, grain_type: &str, grain_key: &str, name: &str, etag: &str) -> Result<bool, StorageError> {
        lease_held(&self.cluster)?;
        self.inner.remove(grain_type, grain_key, name, etag).await
    }

    async fn advance(&self, progress: &[ReminderProgress]) -> Result<(), StorageError> {
        lease_held(&self.cluster)?;
        self.inner.advance(progress).await
    }
}

#[async_trait]
impl GrainStateStore for FencedStore {
    fn name(&self) -> &'static str {
        self.inner.name()
    }

    async fn read(&self, key: &StateKey) -> Result<Option<StoredState>, StorageError> {
        timed(&self.stats, &self.stats.read, self.inner.read(key)).await
    }

    async fn write(
        &self,
        key: &StateKey,
        document: &serde_json::Value,
        expected: Option<&str>,
    ) -> Result<ETag, StorageError> {
        self.check()?;
        timed(&self.stats, &self.stats.write, self.inner.write(key, document, expected)).await
    }

    async fn clear(&self, key: &StateKey, expected: Option<&str>) -> Result<(), StorageError> {
        self.check()?;
        timed(&self.stats, &self.stats.clear, self.inner.clear(key, expected)).await
    }
}

/// An event journal that refuses appends while the silo's membership lease is not valid (the journal's
/// counterpart of [`FencedStore`]; a Postgres journal in the membership's database is also fenced by the row).
pub(crate) struct FencedJournal {
    inner: Arc<dyn EventJournal>,
    cluster: Arc<Cluster>,
}

impl FencedJournal {
    pub(crate) fn new(inner: Arc<dyn EventJournal>, cluster: Arc<Cluster>) -> Self {
        Self { inner, cluster }
    }
}

#[async_trait]
impl EventJournal for FencedJournal {
    fn name(&self) -> &'static str {
        self.inner.name()
    }

    async fn append(&self, stream: &StateKey, expected: u64, events: &[NewEvent]) -> Result<u64, StorageError> {
        if !self.cluster.lease.is_valid() {
            self.cluster.refresh_now.notify_one();
            return Err(StorageError::Fenced { silo: self.cluster.me.to_string() });
        }
        self.inner.append(stream, expected, events).await
    }

    async fn read_stream(&self, stream: &StateKey, after: u64, limit: usize) -> Result<Vec<StoredEvent>, StorageError> {
        self.inner.read_stream(stream, after, limit).await
    }

    async fn read_all(
        &self,
        selector: &EventSelector,
        after: u64,
        limit: usize,
    ) -> Result<Vec<StoredEvent>, StorageError> {
        self.inner.read_all(selector, after, limit).await
    }

    async fn read_snapshot(&self, stream: &StateKey) -> Result<Option<Snapshot>, StorageError> {
        self.inner.read_snapshot(stream).await
    }

    async fn save_snapshot(&self, stream: &StateKey, snapshot: &Snapshot) -> Result<(), StorageError> {
        // A snapshot restates events already in the journal: harmless from any silo, so not fenced.
        self.inner.save_snapshot(stream, snapshot).await
    }
}
