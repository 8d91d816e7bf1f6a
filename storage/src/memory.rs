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
