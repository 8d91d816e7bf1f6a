//! The grain-state storage contract shared by every provider.

use std::fmt;

use async_trait::async_trait;

use crate::StorageError;

/// An opaque version tag of a stored record; it changes on every successful write.
pub type ETag = String;

/// Where one piece of grain state is stored: grain type, grain key, and the state's name within the grain.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
pub struct StateKey {
    /// The grain type name (e.g. `Cart`).
    pub grain_type: String,
    /// The grain key in its storage form, tagged by shape (`s:alice`, `i:42`; see `GrainKey::storage_key` in
    /// the `grains` crate), so keys of different shapes never share a record.
    pub grain_key: String,
    /// The state's name within the grain (a grain may hold several persistent states).
    pub state_name: String,
}

impl StateKey {
    /// Builds a key from its three parts.
    pub fn new(grain_type: impl Into<String>, grain_key: impl Into<String>, state_name: impl Into<String>) -> Self {
        Self { grain_type: grain_type.into(), grain_key: grain_key.into(), state_name: state_name.into() }
    }
}

impl fmt::Display for StateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}#{}", self.grain_type, self.grain_key, self.state_name)
    }
}

/// A stored document and its etag.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredState {
    /// The state as a JSON document (stored as JSONB by the Postgres provider, readable with psql).
    pub document: serde_json::Value,
    /// The record's current etag.
    pub etag: ETag,
}

/// Keyed JSON documents with optimistic concurrency.
///
/// Contract, for every provider:
/// - `read` of a key never written (or cleared) returns `Ok(None)`.
/// - `write` with `expected = None` succeeds only when no record exists; with `Some(etag)` only when the
///   record's etag equals it. Any mismatch is [`StorageError::Conflict`] and changes nothing.
/// - `clear` is etag-checked the same way and removes the record.
/// - An error other than `Conflict` means the operation may not have been applied; a returned etag means it
///   was committed.
#[async_trait]
pub trait GrainStateStore: Send + Sync + 'static {
    /// A short name for logs (e.g. `memory`, `postgres`).
    fn name(&self) -> &'static str;

    /// Reads the record at `key`.
    async fn read(&self, key: &StateKey) -> Result<Option<StoredState>, StorageError>;

    /// Writes `document` at `key` if the stored etag is `expected`; returns the new etag.
    async fn write(
        &self,
        key: &StateKey,
        document: &serde_json::Value,
        expected: Option<&str>,
    ) -> Result<ETag, StorageError>;

    /// Removes the record at `key` if the stored etag is `expected`.
    async fn clear(&self, key: &StateKey, expected: Option<&str>) -> Result<(), StorageError>;
}
