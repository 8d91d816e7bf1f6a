//! The event-journal contract shared by every provider: append-only streams of events with optimistic
//! sequence checks, snapshots, and one global order for projections.
//!
//! A **stream** is the journal of one event-sourced part of one grain, named by a [`StateKey`] (grain type,
//! grain key in its shape-tagged storage form, and the journal's name within the grain). Its events are
//! numbered `1, 2, 3, …` by `seq`. An append names the `seq` of the last event its writer has seen: the store
//! appends only if that is still the stream's last, so two activations appending at one sequence never both
//! land — the second gets [`StorageError::Conflict`] and appends nothing.
//!
//! Every event also gets a **position** in the journal as a whole. Positions grow in commit order: once a
//! reader has seen position `p`, no event with a smaller position can appear later. That is what lets a
//! projection keep a single number as its offset and still see every event exactly once, in order.

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::{StateKey, StorageError};

/// An event to append: its payload and what projections select it by.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NewEvent {
    /// A name for the kind of event (e.g. `ItemAdded`), stored beside the payload for operators and readers.
    pub event_type: String,
    /// The event as a JSON document (JSONB in Postgres).
    pub payload: serde_json::Value,
    /// Tags a projection can select the event by, across grain types.
    pub tags: Vec<String>,
}

/// An event as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredEvent {
    /// The event's place in the whole journal (from 1, growing in commit order).
    pub position: u64,
    /// The stream it belongs to.
    pub stream: StateKey,
    /// Its number within the stream (from 1, without gaps).
    pub seq: u64,
    /// The kind of event.
    pub event_type: String,
    /// The event.
    pub payload: serde_json::Value,
    /// Its tags.
    pub tags: Vec<String>,
    /// When the store recorded it (Unix milliseconds, the store's clock).
    pub recorded_at_ms: i64,
}

/// The folded state of a stream up to and including event `seq`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    /// The last event folded into the document.
    pub seq: u64,
    /// The state as a JSON document.
    pub document: serde_json::Value,
}

/// Which events a projection consumes.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum EventSelector {
    /// Every event of every grain of this type.
    GrainType(String),
    /// Every event carrying this tag, whatever its grain type.
    Tag(String),
}

impl EventSelector {
    /// Whether `event` is one this selector selects.
    pub fn matches(&self, event: &StoredEvent) -> bool {
        match self {
            EventSelector::GrainType(grain_type) => &event.stream.grain_type == grain_type,
            EventSelector::Tag(tag) => event.tags.iter().any(|t| t == tag),
        }
    }
}

/// Append-only event streams with optimistic sequence checks, snapshots, and one global order.
///
/// Contract, for every provider:
/// - `append(stream, expected, events)` appends `events` as `expected + 1 ..= expected + n`, all or none, only
///   when the stream's last `seq` is `expected` (0: the stream is empty); it returns the new last `seq`. Any
///   other last `seq` is [`StorageError::Conflict`] (with `expected` and `actual` set) and appends nothing.
///   An empty `events` appends nothing and returns `expected` unchecked.
/// - Positions are unique and grow in commit order: a reader that has seen position `p` never later sees an
///   event with a position below `p` appear. Within one append they follow `seq`.
/// - `read_stream(stream, after, limit)` returns the stream's events with `seq > after`, in `seq` order, at
///   most `limit`.
/// - `read_all(selector, after, limit)` returns the selected events with `position > after`, in position
///   order, at most `limit`.
/// - `save_snapshot` keeps the snapshot with the highest `seq` per stream (an older one is ignored);
///   `read_snapshot` returns it.
/// - An error other than `Conflict` means the append may or may not have been applied: a retry at the same
///   `expected` is safe (it conflicts if the first went in).
#[async_trait]
pub trait EventJournal: Send + Sync + 'static {
    /// A short name for logs (e.g. `memory`, `postgres`).
    fn name(&self) -> &'static str;

    /// Appends `events` to `stream` if its last `seq` is `expected`; returns the new last `seq`.
    async fn append(&self, stream: &StateKey, expected: u64, events: &[NewEvent]) -> Result<u64, StorageError>;

    /// The events of `stream` after `seq` `after`, in order, at most `limit`.
    async fn read_stream(&self, stream: &StateKey, after: u64, limit: usize) -> Result<Vec<StoredEvent>, StorageError>;

    /// The selected events after position `after`, in position order, at most `limit`.
    async fn read_all(
        &self,
        selector: &EventSelector,
        after: u64,
        limit: usize,
    ) -> Result<Vec<StoredEvent>, StorageError>;

    /// The latest snapshot of `stream`, if any.
    async fn read_snapshot(&self, stream: &StateKey) -> Result<Option<Snapshot>, StorageError>;

    /// Stores `snapshot` for `stream` unless one with a higher or equal `seq` is stored.
    async fn save_snapshot(&self, stream: &StateKey, snapshot: &Snapshot) -> Result<(), StorageError>;
}

/// The conflict an append at `expected` meets when the stream ends at `actual`.
pub(crate) fn sequence_conflict(stream: &StateKey, expected: u64, actual: Option<u64>) -> StorageError {
    StorageError::Conflict {
        key: stream.to_string(),
        expected: Some(expected.to_string()),
        actual: actual.map(|a| a.to_string()),
    }
}
