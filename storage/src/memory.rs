//! The in-memory provider: the embedded default for a single silo in development and tests.

use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;
use dashmap::DashMap;
use dashmap::mapref::entry::Entry;

use crate::{ETag, GrainStateStore, StateKey, StorageError, StoredState};

/// Grain state held in a concurrent map; lost when the process exits.
///
/// Etags are drawn from one counter, so an etag is never reused within a store, even after `clear`.
#[derive(Debug, Default)]
pub struct MemoryStateStore {
    records: DashMap<StateKey, StoredState>,
    next_etag: AtomicU64,
}

impl MemoryStateStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of records held.
    pub fn len(&self) -> usize {
        self.records.len()
    }

    /// Whether the store holds no record.
    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    fn fresh_etag(&self) -> ETag {
        (self.next_etag.fetch_add(1, Ordering::Relaxed) + 1).to_string()
    }
}

fn conflict(key: &StateKey, expected: Option<&str>, actual: Option<&StoredState>) -> StorageError {
    StorageError::Conflict {
        key: key.to_string(),
        expected: expected.map(str::to_owned),
        actual: actual.map(|s| s.etag.clone()),
    }
}

#[async_trait]
impl GrainStateStore for MemoryStateStore {
    fn name(&self) -> &'static str {
        "memory"
    }

    async fn read(&self, key: &StateKey) -> Result<Option<StoredState>, StorageError> {
        Ok(self.records.get(key).map(|r| r.value().clone()))
    }

    async fn write(
        &self,
        key: &StateKey,
        document: &serde_json::Value,
        expected: Option<&str>,
    ) -> Result<ETag, StorageError> {
        match self.records.entry(key.clone()) {
            Entry::Occupied(mut slot) => {
                if expected != Some(slot.get().etag.as_str()) {
                    return Err(conflict(key, expected, Some(slot.get())));
                }
                let etag = self.fresh_etag();
                slot.insert(StoredState { document: document.clone(), etag: etag.clone() });
                Ok(etag)
            }
            Entry::Vacant(slot) => {
                if expected.is_some() {
                    return Err(conflict(key, expected, None));
                }
                let etag = self.fresh_etag();
                slot.insert(StoredState { document: document.clone(), etag: etag.clone() });
                Ok(etag)
            }
        }
    }

    async fn clear(&self, key: &StateKey, expected: Option<&str>) -> Result<(), StorageError> {
        match self.records.entry(key.clone()) {
            Entry::Occupied(slot) => {
                if expected != Some(slot.get().etag.as_str()) {
                    return Err(conflict(key, expected, Some(slot.get())));
                }
                slot.remove();
                Ok(())
            }
            // Clearing what is not there with no expectation is a no-op; expecting a record that is gone is a conflict.
            Entry::Vacant(_) if expected.is_none() => Ok(()),
            Entry::Vacant(_) => Err(conflict(key, expected, None)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn key() -> StateKey {
        StateKey::new("Cart", "alice", "state")
    }

    #[tokio::test]
    async fn stale_etag_is_refused_and_changes_nothing() {
        let store = MemoryStateStore::new();
        let first = store.write(&key(), &json!({"n": 1}), None).await.unwrap();
        let second = store.write(&key(), &json!({"n": 2}), Some(&first)).await.unwrap();
        let stale = store.write(&key(), &json!({"n": 3}), Some(&first)).await;
        assert!(matches!(stale, Err(StorageError::Conflict { .. })));
        let now = store.read(&key()).await.unwrap().unwrap();
        assert_eq!(now.document, json!({"n": 2}));
        assert_eq!(now.etag, second);
    }

    #[tokio::test]
    async fn first_write_with_an_expected_etag_is_a_conflict() {
        let store = MemoryStateStore::new();
        let res = store.write(&key(), &json!(1), Some("7")).await;
        assert!(matches!(res, Err(StorageError::Conflict { .. })));
        assert!(store.is_empty());
    }

    #[tokio::test]
    async fn clear_is_etag_checked() {
        let store = MemoryStateStore::new();
        let etag = store.write(&key(), &json!(1), None).await.unwrap();
        assert!(store.clear(&key(), Some("bogus")).await.is_err());
        store.clear(&key(), Some(&etag)).await.unwrap();
        assert_eq!(store.read(&key()).await.unwrap(), None);
    }
}

/// The in-memory membership table: for a single-silo development cluster, and for tests.
#[derive(Debug, Default)]
pub struct MemoryMembershipTable {
    table: std::sync::Mutex<(i64, Vec<crate::MembershipRow>)>,
    next_etag: AtomicU64,
}

impl MemoryMembershipTable {
    /// An empty table at version 0.
    pub fn new() -> Self {
        Self::default()
    }

    fn fresh_etag(&self) -> ETag {
        (self.next_etag.fetch_add(1, Ordering::Relaxed) + 1).to_string()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (i64, Vec<crate::MembershipRow>)> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[async_trait]
impl crate::MembershipTable for MemoryMembershipTable {
    async fn read_all(&self) -> Result<crate::MembershipSnapshot, StorageError> {
        let table = self.lock();
        Ok(crate::MembershipSnapshot { version: table.0, rows: table.1.clone() })
    }

    async fn insert_row(&self, entry: &crate::MembershipEntry, expected_version: i64) -> Result<bool, StorageError> {
        let mut table = self.lock();
        if table.0 != expected_version || table.1.iter().any(|r| r.entry.silo == entry.silo) {
            return Ok(false);
        }
        let etag = self.fresh_etag();
        table.0 += 1;
        table.1.push(crate::MembershipRow { entry: entry.clone(), etag });
        Ok(true)
    }

    async fn update_row(
        &self,
        entry: &crate::MembershipEntry,
        etag: &str,
        expected_version: i64,
    ) -> Result<bool, StorageError> {
        let mut table = self.lock();
        if table.0 != expected_version {
            return Ok(false);
        }
        let fresh = self.fresh_etag();
        let Some(row) = table.1.iter_mut().find(|r| r.entry.silo == entry.silo && r.etag == etag) else {
            return Ok(false);
        };
        *row = crate::MembershipRow { entry: entry.clone(), etag: fresh };
        table.0 += 1;
        Ok(true)
    }

    async fn heartbeat(&self, silo: &crate::SiloAddress, at_ms: i64) -> Result<(), StorageError> {
        let mut table = self.lock();
        if let Some(row) = table.1.iter_mut().find(|r| &r.entry.silo == silo) {
            row.entry.heartbeat_at_ms = at_ms;
        }
        Ok(())
    }

    async fn delete_all(&self) -> Result<(), StorageError> {
        *self.lock() = (0, Vec::new());
        Ok(())
    }
}

/// The in-memory reminders table: rows by key, and an index by `(ring bucket, next due time)` (see
/// [`RING_BUCKET_SHIFT`](crate::RING_BUCKET_SHIFT)), so that a silo's read of its due reminders visits only
/// what is due in the buckets of its ranges, as the Postgres index does.
#[derive(Debug, Default)]
pub struct MemoryReminderTable {
    inner: std::sync::Mutex<MemoryReminders>,
    next_etag: AtomicU64,
}

/// A reminder's key: grain type, grain key, name.
type ReminderKey = (String, String, String);

#[derive(Debug, Default)]
struct MemoryReminders {
    rows: std::collections::HashMap<ReminderKey, crate::ReminderRow>,
    by_bucket_and_due: std::collections::BTreeSet<(u32, i64, ReminderKey)>,
}

fn bucket(hash: u32) -> u32 {
    hash >> crate::RING_BUCKET_SHIFT
}

impl MemoryReminders {
    fn insert(&mut self, key: ReminderKey, row: crate::ReminderRow) {
        self.remove(&key);
        self.by_bucket_and_due.insert((bucket(row.entry.grain_hash), row.next_due_ms, key.clone()));
        self.rows.insert(key, row);
    }

    fn remove(&mut self, key: &ReminderKey) -> Option<crate::ReminderRow> {
        let row = self.rows.remove(key)?;
        self.by_bucket_and_due.remove(&(bucket(row.entry.grain_hash), row.next_due_ms, key.clone()));
        Some(row)
    }
}

impl MemoryReminderTable {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, MemoryReminders> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn reminder_key(grain_type: &str, grain_key: &str, name: &str) -> ReminderKey {
    (grain_type.to_owned(), grain_key.to_owned(), name.to_owned())
}

#[async_trait]
impl crate::ReminderTable for MemoryReminderTable {
    async fn read_grain(&self, grain_type: &str, grain_key: &str) -> Result<Vec<crate::ReminderRow>, StorageError> {
        let mut rows: Vec<_> = self
            .lock()
            .rows
            .iter()
            .filter(|(k, _)| k.0 == grain_type && k.1 == grain_key)
            .map(|(_, row)| row.clone())
            .collect();
        rows.sort_by(|a, b| a.entry.name.cmp(&b.entry.name));
        Ok(rows)
    }

    async fn read_row(
        &self,
        grain_type: &str,
        grain_key: &str,
        name: &str,
    ) -> Result<Option<crate::ReminderRow>, StorageError> {
        Ok(self.lock().rows.get(&reminder_key(grain_type, grain_key, name)).cloned())
    }

    async fn read_range(&self, begin: u32, end: u32) -> Result<Vec<crate::ReminderRow>, StorageError> {
        let mut rows: Vec<_> = self
            .lock()
            .rows
            .values()
            .filter(|r| crate::in_ring_range(r.entry.grain_hash, begin, end))
            .cloned()
            .collect();
        rows.sort_by(|a, b| {
            (&a.entry.grain_type, &a.entry.grain_key, &a.entry.name).cmp(&(
                &b.entry.grain_type,
                &b.entry.grain_key,
                &b.entry.name,
            ))
        });
        Ok(rows)
    }

    async fn read_due(
        &self,
        ranges: &[crate::RingRange],
        due_by_ms: i64,
    ) -> Result<Vec<crate::ReminderRow>, StorageError> {
        let inner = self.lock();
        let mut rows = Vec::new();
        let mut seen = std::collections::HashSet::new(); // ranges that overlap would name a row twice
        let lowest = || (String::new(), String::new(), String::new());
        for (bucket, low, high) in ranges.iter().flat_map(crate::RingRange::bucket_intervals) {
            // One seek per bucket, up to the due time: rows further ahead are not visited.
            let end = match due_by_ms.checked_add(1) {
                Some(after) => (bucket, after, lowest()),
                None => (bucket + 1, i64::MIN, lowest()),
            };
            let due = inner.by_bucket_and_due.range((bucket, i64::MIN, lowest())..end);
            for (_, _, key) in due {
                if let Some(row) = inner.rows.get(key)
                    && (low..=high).contains(&row.entry.grain_hash)
                    && seen.insert(key)
                {
                    rows.push(row.clone());
                }
            }
        }
        rows.sort_by_key(|r| r.next_due_ms);
        Ok(rows)
    }

    async fn upsert(&self, entry: &crate::ReminderEntry) -> Result<ETag, StorageError> {
        let etag = (self.next_etag.fetch_add(1, Ordering::Relaxed) + 1).to_string();
        let key = reminder_key(&entry.grain_type, &entry.grain_key, &entry.name);
        let row = crate::ReminderRow { entry: entry.clone(), etag: etag.clone(), next_due_ms: entry.start_at_ms };
        self.lock().insert(key, row);
        Ok(etag)
    }

    async fn remove(&self, grain_type: &str, grain_key: &str, name: &str, etag: &str) -> Result<bool, StorageError> {
        let key = reminder_key(grain_type, grain_key, name);
        let mut inner = self.lock();
        if inner.rows.get(&key).is_none_or(|row| row.etag != etag) {
            return Ok(false);
        }
        Ok(inner.remove(&key).is_some())
    }

    async fn advance(&self, progress: &[crate::ReminderProgress]) -> Result<(), StorageError> {
        let mut inner = self.lock();
        for step in progress {
            let key = reminder_key(&step.grain_type, &step.grain_key, &step.name);
            let Some(row) = inner.rows.get(&key) else { continue };
            if row.etag != step.etag || row.next_due_ms >= step.next_due_ms {
                continue;
            }
            let row = crate::ReminderRow { next_due_ms: step.next_due_ms, ..row.clone() };
            inner.insert(key, row);
        }
        Ok(())
    }
}
