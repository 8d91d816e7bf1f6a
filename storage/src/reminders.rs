//! The reminders table: durable, periodic wake-ups of grains that survive restarts.
//!
//! A reminder belongs to a grain and has a name; it fires first at `start_at_ms` and then every `period_ms`.
//! Rows carry the grain's ring hash, so that the silo owning a range of the consistent-hash ring can load
//! exactly the reminders it is responsible for. Updates and removals are etag-checked like grain state.

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::{ETag, StorageError};

/// A reminder as written by a grain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReminderEntry {
    /// The grain type.
    pub grain_type: String,
    /// The grain key in its storage form, tagged by shape (`s:alice`, `i:42`; see `GrainKey::storage_key` in
    /// the `grains` crate), so keys of different shapes never share a row.
    pub grain_key: String,
    /// The reminder's name, unique per grain.
    pub name: String,
    /// The grain id's hash on the consistent-hash ring.
    pub grain_hash: u32,
    /// First due time (Unix ms).
    pub start_at_ms: i64,
    /// Period in milliseconds.
    pub period_ms: i64,
}

/// A reminder as read, with its etag.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReminderRow {
    /// The reminder.
    pub entry: ReminderEntry,
    /// Its etag.
    pub etag: ETag,
}

/// Durable reminders.
#[async_trait]
pub trait ReminderTable: Send + Sync + 'static {
    /// Every reminder of one grain.
    async fn read_grain(&self, grain_type: &str, grain_key: &str) -> Result<Vec<ReminderRow>, StorageError>;

    /// One reminder.
    async fn read_row(
        &self,
        grain_type: &str,
        grain_key: &str,
        name: &str,
    ) -> Result<Option<ReminderRow>, StorageError>;

    /// Every reminder whose grain hash lies in the ring range `(begin, end]`; when `begin >= end` the range
    /// wraps around zero (and `begin == end` is the whole ring).
    async fn read_range(&self, begin: u32, end: u32) -> Result<Vec<ReminderRow>, StorageError>;

    /// Creates or replaces a reminder; returns its new etag.
    async fn upsert(&self, entry: &ReminderEntry) -> Result<ETag, StorageError>;

    /// Removes a reminder if its etag is `etag`; `Ok(false)` when it is absent or the etag differs.
    async fn remove(&self, grain_type: &str, grain_key: &str, name: &str, etag: &str) -> Result<bool, StorageError>;
}

/// Whether `hash` lies in the ring range `(begin, end]` (wrapping; `begin == end` is the whole ring).
pub fn in_ring_range(hash: u32, begin: u32, end: u32) -> bool {
    match begin.cmp(&end) {
        std::cmp::Ordering::Less => hash > begin && hash <= end,
        std::cmp::Ordering::Greater => hash > begin || hash <= end,
        std::cmp::Ordering::Equal => true,
    }
}
