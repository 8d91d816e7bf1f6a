//! Errors a caller and a grain author can match on.
//!
//! A grain call returns `Result<R, CallError>` where `R` is the grain method's own return type. A `CallError`
//! says the call machinery failed; whatever the grain returned, including its own `Err`, is inside `Ok`.
//!
//! A method returning `Result<T, E>` therefore gives its caller `Result<Result<T, E>, CallError>`. Two ways
//! through that keep "the call failed" apart from "the grain said no":
//! - [`CallResultExt::flatten_call`] turns it into `Result<T, GrainCallError<E>>`, one `?` away from `T`
//!   (and from `anyhow` or `Box<dyn Error>` when `E` implements `Display`);
//! - when the caller's own error type implements `From<CallError>` and `From<E>`, `.await??` does the same.
//!
//! Delivery is **at most once**: a call is never retried by the runtime after it may have reached the grain.
//! [`CallError::Timeout`] and [`CallError::Unavailable`] therefore mean
//! *unknown outcome*: the grain may or may not have run the call ([`CallError::may_have_run`] says which errors
//! leave that open). Make methods idempotent, or read state back, where that matters.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::codec::CodecError;

pub use grains_storage::StorageError;

/// Why a grain call failed (as opposed to the grain returning an error of its own).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[non_exhaustive]
pub enum CallError {
    /// No reply arrived before the call's deadline. The call may or may not have run.
    #[error("call timed out after {0:?}")]
    Timeout(Duration),
    /// The connection to the silo that was to run the call (a gateway, seen from a client, or the grain's silo,
    /// seen from another silo) could not be used or was lost while the call was in flight; the text names the
    /// peer. The call may or may not have run (at most once); if that silo died, the next call re-activates the
    /// grain elsewhere.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// The silo a call was sent to does not host the grain (a stale routing cache). The runtime retries
    /// through the directory; callers see this only when every retry was refused.
    #[error("grain not hosted here: {0}")]
    NotHere(String),
    /// No silo hosts a grain type of this name. A silo hosts the `#[grain]` types linked into its binary: a
    /// type defined in a library the silo's `main` names nothing from is dropped by the linker (call a function
    /// of that library from `main`, e.g. `my_grains::link()`).
    #[error(
        "unknown grain type `{0}`: no silo hosts it. A silo hosts the #[grain] types linked into its binary; if \
         `{0}` is defined in a library crate, make the silo's main call a function of that crate (e.g. \
         `my_grains::link()`) so that the linker keeps its registration"
    )]
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
    #[error("deadlock: {} would wait for itself (a grain runs one call at a time), so the call was refused", chain.join(" -> "))]
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

impl CallError {
    /// Whether the grain may have run the call (or part of it) despite this error, so that retrying it could
    /// run it twice: `true` when the outcome is unknown ([`Timeout`](Self::Timeout),
    /// [`Unavailable`](Self::Unavailable)), when the method ran and failed part-way ([`Panicked`](Self::Panicked)), and when the reply rather than the request may be
    /// what failed ([`Codec`](Self::Codec), [`PayloadTooLarge`](Self::PayloadTooLarge),
    /// [`Protocol`](Self::Protocol)); `false` when the runtime refused the call before the grain saw it.
    ///
    /// ```
    /// use std::time::Duration;
    /// use grains::CallError;
    ///
    /// assert!(CallError::Timeout(Duration::from_secs(30)).may_have_run());
    /// assert!(!CallError::Overloaded("mailbox full".into()).may_have_run());
    /// ```
    pub fn may_have_run(&self) -> bool {
        match self {
            CallError::Timeout(_)
            | CallError::Unavailable(_)
            | CallError::Panicked { .. }
            | CallError::Codec(_)
            | CallError::PayloadTooLarge { .. }
            | CallError::Protocol(_) => true,
            CallError::NotHere(_)
            | CallError::UnknownGrainType(_)
            | CallError::UnknownMethod { .. }
            | CallError::ActivationFailed { .. }
            | CallError::StorageUnavailable { .. }
            | CallError::Deadlock { .. }
            | CallError::ShuttingDown
            | CallError::PermissionDenied(_)
            | CallError::Overloaded(_) => false,
        }
    }
}

/// Why a call to a grain method returning `Result<T, E>` gave no `T`: the call failed, or the grain said no.
/// What [`CallResultExt::flatten_call`] returns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GrainCallError<E> {
    /// The call itself failed; the grain may not have seen it (see [`CallError::may_have_run`]).
    Call(CallError),
    /// The grain ran the call and returned its own error.
    Grain(E),
}

impl<E> GrainCallError<E> {
    /// The grain's own error, if that is what this is.
    pub fn grain_error(&self) -> Option<&E> {
        match self {
            GrainCallError::Grain(e) => Some(e),
            GrainCallError::Call(_) => None,
        }
    }

    /// The call's failure, if that is what this is.
    pub fn call_error(&self) -> Option<&CallError> {
        match self {
            GrainCallError::Call(e) => Some(e),
            GrainCallError::Grain(_) => None,
        }
    }

    /// Whether the grain may have run the call: always for its own error, else see
    /// [`CallError::may_have_run`].
    pub fn may_have_run(&self) -> bool {
        match self {
            GrainCallError::Call(e) => e.may_have_run(),
            GrainCallError::Grain(_) => true,
        }
    }
}

impl<E: fmt::Display> fmt::Display for GrainCallError<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GrainCallError::Call(e) => write!(f, "the call failed: {e}"),
            GrainCallError::Grain(e) => write!(f, "the grain returned an error: {e}"),
        }
    }
}

impl<E: fmt::Debug + fmt::Display> std::error::Error for GrainCallError<E> {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            GrainCallError::Call(e) => Some(e),
            GrainCallError::Grain(_) => None,
        }
    }
}

impl<E> From<CallError> for GrainCallError<E> {
    fn from(e: CallError) -> Self {
        GrainCallError::Call(e)
    }
}

/// Flattens what a call to a grain method returning `Result<T, E>` gives: `Result<Result<T, E>, CallError>`.
///
/// ```
/// use grains::{CallError, CallResultExt, GrainCallError};
///
/// let refused: Result<Result<u32, String>, CallError> = Ok(Err("no such item".into()));
/// assert_eq!(refused.flatten_call(), Err(GrainCallError::Grain("no such item".to_owned())));
///
/// let answered: Result<Result<u32, String>, CallError> = Ok(Ok(2));
/// assert_eq!(answered.flatten_call(), Ok(2));
/// ```
///
/// With a reference: `let n = cart.add("apple".into(), 2).await.flatten_call()?;` in a function returning
/// `anyhow::Result<_>` or `Result<_, GrainCallError<CartError>>`.
pub trait CallResultExt<T, E> {
    /// `Ok(Ok(t))` becomes `Ok(t)`, `Ok(Err(e))` becomes [`GrainCallError::Grain`], `Err(c)` becomes
    /// [`GrainCallError::Call`].
    fn flatten_call(self) -> Result<T, GrainCallError<E>>;
}

impl<T, E> CallResultExt<T, E> for Result<Result<T, E>, CallError> {
    fn flatten_call(self) -> Result<T, GrainCallError<E>> {
        match self {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => Err(GrainCallError::Grain(e)),
            Err(e) => Err(GrainCallError::Call(e)),
        }
    }
}

impl From<CodecError> for CallError {
    fn from(e: CodecError) -> Self {
        CallError::Codec(e.0)
    }
}

/// No application service of the type a grain asked for (see [`GrainContext::service`](crate::GrainContext::service)).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("no service of type `{type_name}` was given to this silo: register one with `SiloBuilder::service`")]
pub struct MissingService {
    /// The type asked for, as `std::any::type_name` spells it.
    pub type_name: &'static str,
}

/// An error raised by a grain's lifecycle hooks or its activation (state load).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GrainError {
    /// A persistent state operation failed.
    #[error(transparent)]
    State(#[from] StorageError),
    /// An application service the grain needs was not given to the silo.
    #[error(transparent)]
    MissingService(#[from] MissingService),
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
