//! Errors a caller and a grain author can match on.
//!
//! A grain call returns `Result<R, CallError>` where `R` is the grain method's own return type. A `CallError`
//! says the call machinery failed; whatever the grain returned, including its own `Err`, is inside `Ok`.
//!
//! Delivery is **at most once**: a call is never retried by the runtime after it may have reached the grain.
//! [`CallError::Timeout`] and [`CallError::Unavailable`] therefore mean *unknown outcome*: the grain may or may
//! not have run the call. Make methods idempotent, or read state back, where that matters.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::codec::CodecError;

pub use grains_storage::StorageError;

/// Errors of persistent state operations (`read`, `write`, `clear`).
pub type StateError = StorageError;

/// Why a grain call failed (as opposed to the grain returning an error of its own).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[non_exhaustive]
pub enum CallError {
    /// No reply arrived before the call's deadline. The call may or may not have run.
    #[error("call timed out after {0:?}")]
    Timeout(Duration),
    /// The runtime could not reach the grain's silo, or lost the connection while the call was in flight.
    /// The call may or may not have run.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// The silo holding the grain died or could not be reached while the call was in flight or being sent.
    /// The call may or may not have run (at most once); the next call re-activates the grain elsewhere.
    #[error("silo unavailable: {0}")]
    SiloUnavailable(String),
    /// The silo a call was sent to does not host the grain (a stale routing cache). The runtime retries
    /// through the directory; callers see this only when every retry was refused.
    #[error("grain not hosted here: {0}")]
    NotHere(String),
    /// No silo hosts a grain type of this name.
    #[error("unknown grain type `{0}`")]
    UnknownGrainType(String),
    /// The grain type has no method of this name.
    #[error("grain type `{grain_type}` has no method `{method}`")]
    UnknownMethod {
        /// The grain type named by the call.
        grain_type: String,
        /// The method named by the call.
        method: String,
    },
    /// Arguments or the return value could not be encoded or decoded.
    #[error("codec error: {0}")]
    Codec(String),
    /// A frame or payload exceeded the size limit; nothing was delivered.
    #[error("payload of {size} bytes exceeds the limit of {limit} bytes")]
    PayloadTooLarge {
        /// Size of the offending payload in bytes.
        size: u64,
        /// The configured limit in bytes.
        limit: u64,
    },
    /// The grain could not be activated: its state failed to load or `on_activate` returned an error.
    /// No activation was left behind; the next call tries again.
    #[error("activation of {grain} failed: {reason}")]
    ActivationFailed {
        /// The grain id, in text form.
        grain: String,
        /// What went wrong.
        reason: String,
    },
    /// The grain's storage could not be reached while activating it; the call did not run. Retry later.
    #[error("storage unavailable while activating {grain}: {reason}")]
    StorageUnavailable {
        /// The grain id, in text form.
        grain: String,
        /// What the storage provider said.
        reason: String,
    },
    /// The grain method panicked. The activation was dropped; the next call activates the grain afresh
    /// from storage.
    #[error("{grain}.{method} panicked: {message}")]
    Panicked {
        /// The grain id, in text form.
        grain: String,
        /// The method that panicked.
        method: String,
        /// The panic message.
        message: String,
    },
    /// The call would wait on itself: the target grain is already waiting, higher up the same call chain,
    /// for this call to finish (A → B → A on non-reentrant grains). Refused at once instead of hanging.
    #[error("call cycle refused: {}", chain.join(" -> "))]
    Deadlock {
        /// The chain of grain ids, outermost first, ending with the target that closed the cycle.
        chain: Vec<String>,
    },
    /// The frame was malformed or did not follow the protocol.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The silo is shutting down and accepts no new calls.
    #[error("silo is shutting down")]
    ShuttingDown,
    /// The connection may not make this call: the cluster's system calls are served only to its silos (on a
    /// connection that proved membership at set-up), and a connection whose proof was wrong is refused. Nothing
    /// was run or changed.
    #[error("permission denied: {0}")]
    PermissionDenied(String),
    /// The silo refused the call at once because a limit was reached (a full mailbox, too many calls on one
    /// connection). The call did not run; retry later, more slowly.
    #[error("overloaded: {0}")]
    Overloaded(String),
}

impl From<CodecError> for CallError {
    fn from(e: CodecError) -> Self {
        CallError::Codec(e.0)
    }
}

/// An error raised by a grain's lifecycle hooks or its activation (state load).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GrainError {
    /// A persistent state operation failed.
    #[error(transparent)]
    State(#[from] StateError),
    /// The grain refused to activate or deactivate cleanly, for a reason of its own.
    #[error("{0}")]
    Failed(String),
}

impl GrainError {
    /// A grain-defined failure with a message.
    pub fn failed(message: impl Into<String>) -> Self {
        GrainError::Failed(message.into())
    }
}
