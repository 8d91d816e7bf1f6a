//! Fencing: a silo writes grain state only while it holds its membership lease.
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
use grains_storage::{ETag, GrainStateStore, StateKey, StorageError, StoredState};

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
        if self.cluster.lease.is_valid() {
            return Ok(());
        }
        self.cluster.refresh_now.notify_one();
        Err(StorageError::Fenced { silo: self.cluster.me.to_string() })
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
