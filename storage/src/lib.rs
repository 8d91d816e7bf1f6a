//! Storage providers for Grains.
//!
//! A grain's persistent state lives behind the small [`GrainStateStore`] trait: a keyed document with an
//! etag. Every write names the etag it expects to replace, and a store refuses a write whose etag does not
//! match with [`StorageError::Conflict`] — two activations of one grain (or a stale retry) can never silently
//! overwrite each other. The store knows nothing about grains beyond string keys; the `grains` crate maps a
//! grain id and a state name onto a [`StateKey`].
//!
//! Event-sourced grains keep an [`EventJournal`] instead: append-only streams of events with optimistic
//! sequence checks, snapshots, and one global order that projections consume (see [`journal`]).
//!
//! Beside grain state, the crate holds the two tables a cluster needs: the [`MembershipTable`] (who is in the
//! cluster; versioned compare-and-swap, the Orleans protocol's storage) and the [`ReminderTable`] (durable
//! periodic wake-ups).
//!
//! Providers:
//! - in-memory ([`MemoryStateStore`], [`MemoryJournal`], [`MemoryMembershipTable`], [`MemoryReminderTable`]): the embedded
//!   default for a single silo in development and for tests; everything lives as long as the process.
//! - Postgres ([`postgres`], feature `postgres`): grain state and events as JSONB rows readable with psql, the membership
//!   and reminder tables, and embedded migrations applied under an advisory lock.

pub mod journal;
mod membership;
mod memory;
mod memory_journal;
#[cfg(feature = "postgres")]
pub mod postgres;
mod reminders;
mod state;

pub use journal::{EventJournal, EventSelector, NewEvent, Snapshot, StoredEvent};
pub use membership::{
    MembershipEntry, MembershipRow, MembershipSnapshot, MembershipTable, SiloAddress, SiloStatus, Suspicion,
};
pub use memory::{MemoryMembershipTable, MemoryReminderTable, MemoryStateStore};
pub use memory_journal::{MemoryJournal, MemoryProjectionClaim, MemoryProjectionStore};
pub use reminders::{
    RING_BUCKET_SHIFT, ReminderEntry, ReminderProgress, ReminderRow, ReminderTable, RingRange, in_ring_range,
};
pub use state::{ETag, GrainStateStore, StateKey, StoredState};

/// Internals `grains-silo` reads (metrics plumbing); not part of the API, may change at any time.
#[doc(hidden)]
pub mod __private {
    /// The group-commit batch sizes of every Postgres state store in this process, for the silo's metrics.
    #[cfg(feature = "postgres")]
    pub use crate::postgres::state::batch_sizes;
}

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
    /// The store refused this record for what it holds, not for its state: e.g. Postgres cannot store a
    /// string with U+0000 in JSONB or in a key, or a key longer than its index allows. The operation was not
    /// applied, and retrying it unchanged fails the same way.
    #[error("storage rejected {key}: {reason}")]
    Rejected {
        /// The record that was refused.
        key: String,
        /// The store's reason.
        reason: String,
    },
    /// The write was refused because the membership table no longer shows the writing silo alive (its row is
    /// dead, or gone): another silo may own its grains now. Nothing was applied; this silo must stop writing.
    #[error("storage write fenced: silo {silo} is not alive in the membership table")]
    Fenced {
        /// The silo the store is fenced to.
        silo: String,
    },
    /// A stored document could not be (de)serialized.
    #[error("storage codec error: {0}")]
    Codec(String),
}
