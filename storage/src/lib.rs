//! Storage providers for Grains.
//!
//! A grain's persistent state lives behind the small [`GrainStateStore`] trait: a keyed document with an
//! etag. Every write names the etag it expects to replace, and a store refuses a write whose etag does not
//! match with [`StorageError::Conflict`] — two activations of one grain (or a stale retry) can never silently
//! overwrite each other. The store knows nothing about grains beyond string keys; the `grains` crate maps a
//! grain id and a state name onto a [`StateKey`].
//!
//! Providers:
//! - [`MemoryStateStore`]: the embedded default, for development and tests; state lives as long as the process.

mod memory;
mod state;

pub use memory::MemoryStateStore;
pub use state::{ETag, GrainStateStore, StateKey, StoredState};

/// Why a storage operation failed.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize, thiserror::Error)]
pub enum StorageError {
    /// The etag named by the writer is not the one in the store: another writer got there first.
    #[error("etag conflict on {key}: expected {expected:?}, store has {actual:?}")]
    Conflict {
        /// The record whose etag did not match.
        key: String,
        /// The etag the writer expected (`None`: it expected no record).
        expected: Option<String>,
        /// The etag the store holds, when the provider knows it (`None`: no record, or unknown).
        actual: Option<String>,
    },
    /// The store cannot be reached or refused to serve; the operation was not applied.
    #[error("storage unavailable: {0}")]
    Unavailable(String),
    /// A stored document could not be (de)serialized.
    #[error("storage codec error: {0}")]
    Codec(String),
}
