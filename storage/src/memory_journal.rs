//! The in-memory event journal and projection offsets: the embedded default for a single silo in development
//! and tests; everything lives as long as the process.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use async_trait::async_trait;

use crate::journal::sequence_conflict;
use crate::{EventJournal, EventSelector, NewEvent, Snapshot, StateKey, StorageError, StoredEvent};

/// An event journal held in memory: one ordered log, an index per stream, the latest snapshot per stream.
///
/// One lock guards the log, so appends are serialized and positions are handed out in commit order.
#[derive(Debug, Default)]
pub struct MemoryJournal {
    inner: Mutex<JournalInner>,
}

#[derive(Debug, Default)]
struct JournalInner {
    /// Every event, in position order; event `p` is at index `p - 1`.
    log: Vec<StoredEvent>,
    /// Per stream, the log indexes of its events in `seq` order (event `s` at index `s - 1`).
    streams: HashMap<StateKey, Vec<usize>>,
    snapshots: HashMap<StateKey, Snapshot>,
}

impl MemoryJournal {
    /// An empty journal.
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of events held, across all streams.
    pub fn len(&self) -> usize {
        self.lock().log.len()
    }

    /// Whether the journal holds no event.
    pub fn is_empty(&self) -> bool {
        self.lock().log.is_empty()
    }

    fn lock(&self) -> MutexGuard<'_, JournalInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

#[async_trait]
impl EventJournal for MemoryJournal {
    fn name(&self) -> &'static str {
        "memory"
    }

    async fn append(&self, stream: &StateKey, expected: u64, events: &[NewEvent]) -> Result<u64, StorageError> {
        if events.is_empty() {
            return Ok(expected);
        }
        let mut inner = self.lock();
        let JournalInner { log, streams, .. } = &mut *inner;
        let indexes = streams.entry(stream.clone()).or_default();
        let last = indexes.len() as u64;
        if last != expected {
            return Err(sequence_conflict(stream, expected, Some(last)));
        }
        let at = now_ms();
        for (i, event) in events.iter().enumerate() {
            indexes.push(log.len());
            log.push(StoredEvent {
                position: log.len() as u64 + 1,
                stream: stream.clone(),
                seq: expected + i as u64 + 1,
                event_type: event.event_type.clone(),
                payload: event.payload.clone(),
                tags: event.tags.clone(),
                recorded_at_ms: at,
            });
        }
        Ok(expected + events.len() as u64)
    }

    async fn read_stream(&self, stream: &StateKey, after: u64, limit: usize) -> Result<Vec<StoredEvent>, StorageError> {
        let inner = self.lock();
        let Some(indexes) = inner.streams.get(stream) else { return Ok(Vec::new()) };
        let from = usize::try_from(after).unwrap_or(usize::MAX).min(indexes.len());
        Ok(indexes[from..].iter().take(limit).map(|&i| inner.log[i].clone()).collect())
    }

    async fn read_all(
        &self,
        selector: &EventSelector,
        after: u64,
        limit: usize,
    ) -> Result<Vec<StoredEvent>, StorageError> {
        let inner = self.lock();
        let from = usize::try_from(after).unwrap_or(usize::MAX).min(inner.log.len());
        Ok(inner.log[from..].iter().filter(|e| selector.matches(e)).take(limit).cloned().collect())
    }

    async fn read_snapshot(&self, stream: &StateKey) -> Result<Option<Snapshot>, StorageError> {
        Ok(self.lock().snapshots.get(stream).cloned())
    }

    async fn save_snapshot(&self, stream: &StateKey, snapshot: &Snapshot) -> Result<(), StorageError> {
        let mut inner = self.lock();
        match inner.snapshots.get(stream) {
            Some(stored) if stored.seq >= snapshot.seq => {}
            _ => {
                inner.snapshots.insert(stream.clone(), snapshot.clone());
            }
        }
        Ok(())
    }
}

/// Projection offsets and claims held in memory, for projections over a [`MemoryJournal`].
///
/// A claim is the right to run one projection; at most one claim per name is held at a time among everyone
/// sharing this store (the silos of one process), and it is released when dropped. The offset of a
/// projection is the position of the last event whose effect it committed; it lives as long as the store.
#[derive(Debug, Default)]
pub struct MemoryProjectionStore {
    projections: Mutex<HashMap<String, ProjectionSlot>>,
}

#[derive(Debug, Default)]
struct ProjectionSlot {
    offset: u64,
    /// The id of the claim that holds it, if any.
    holder: Option<u64>,
    next_claim: u64,
}

impl MemoryProjectionStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, ProjectionSlot>> {
        self.projections.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Claims `projection` unless someone holds it.
    pub fn try_claim(self: &Arc<Self>, projection: &str) -> Option<MemoryProjectionClaim> {
        let mut projections = self.lock();
        let slot = projections.entry(projection.to_owned()).or_default();
        if slot.holder.is_some() {
            return None;
        }
        slot.next_claim += 1;
        slot.holder = Some(slot.next_claim);
        Some(MemoryProjectionClaim { store: self.clone(), projection: projection.to_owned(), id: slot.next_claim })
    }

    /// The committed offset of `projection` (0: nothing applied yet).
    pub fn offset(&self, projection: &str) -> u64 {
        self.lock().get(projection).map_or(0, |slot| slot.offset)
    }
}

/// The right to run one projection over a [`MemoryProjectionStore`]; released when dropped.
#[derive(Debug)]
pub struct MemoryProjectionClaim {
    store: Arc<MemoryProjectionStore>,
    projection: String,
    id: u64,
}

impl MemoryProjectionClaim {
    /// The projection's committed offset.
    pub fn offset(&self) -> u64 {
        self.store.offset(&self.projection)
    }

    /// Moves the offset from `from` to `to`; [`StorageError::Conflict`] when it is not at `from` (or this claim
    /// no longer holds the projection), and nothing moves.
    pub fn commit(&self, from: u64, to: u64) -> Result<(), StorageError> {
        let mut projections = self.store.lock();
        let slot = projections.entry(self.projection.clone()).or_default();
        if slot.holder != Some(self.id) || slot.offset != from {
            return Err(StorageError::Conflict {
                key: format!("projection {}", self.projection),
                expected: Some(from.to_string()),
                actual: Some(slot.offset.to_string()),
            });
        }
        slot.offset = to;
        Ok(())
    }
}

impl Drop for MemoryProjectionClaim {
    fn drop(&mut self) {
        let mut projections = self.store.lock();
        if let Some(slot) = projections.get_mut(&self.projection)
            && slot.holder == Some(self.id)
        {
            slot.holder = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_claim_per_projection_until_it_is_dropped() {
        let store = Arc::new(MemoryProjectionStore::new());
        let first = store.try_claim("p").expect("free");
        assert!(store.try_claim("p").is_none(), "held");
        assert!(store.try_claim("q").is_some(), "another projection is free");
        first.commit(0, 5).unwrap();
        assert!(first.commit(0, 6).is_err(), "the offset is at 5, not 0");
        drop(first);
        let second = store.try_claim("p").expect("released on drop");
        assert_eq!(second.offset(), 5);
    }
}
