//! The one call path every grain call takes, and the seam between callers and runtimes.
//!
//! A typed reference (`CartRef`) turns a method call into a [`Call`] and hands it to a [`GrainRuntime`]: the
//! silo (for calls from grains, or from code running inside the silo process) or an external client (for calls
//! from another process). The runtime moves the call by [`GrainId`], method name and [`Payload`]; it knows
//! nothing about the grain's types.
//!
//! A payload starts out [`Payload::Local`]: the typed request, boxed. A runtime that delivers it inside the same
//! process moves it as it is; one that sends it over the wire encodes it there ([`LocalMessage::encode`]).
//! Replies come back the same way, so a call between grains on one silo is never serialized.

use std::any::Any;
use std::borrow::Cow;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::time::Instant;

use crate::codec::CodecError;
use crate::error::CallError;
use crate::id::GrainId;

/// A boxed, sendable future: what object-safe runtime methods return.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The default deadline of a call: 30 seconds.
pub const DEFAULT_CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// A typed message (a grain's request or response enum) that can be moved in-process or encoded for the wire.
pub trait LocalMessage: Any + Send {
    /// Encodes the message body in the payload codec (see [`crate::codec`]).
    fn encode(&self) -> Result<Vec<u8>, CodecError>;
    /// Unboxes into `Any` so the receiver can downcast to the concrete type.
    fn into_any(self: Box<Self>) -> Box<dyn Any + Send>;
}

/// The body of a request or a reply.
pub enum Payload {
    /// A typed value that has not left the process.
    Local(Box<dyn LocalMessage>),
    /// An encoded value (see [`crate::codec`]), as received from or sent to the wire.
    Encoded(Bytes),
}

impl Payload {
    /// The encoded form: encodes a local payload, passes an encoded one through.
    pub fn into_bytes(self) -> Result<Bytes, CodecError> {
        match self {
            Payload::Local(message) => message.encode().map(Bytes::from),
            Payload::Encoded(bytes) => Ok(bytes),
        }
    }
}

impl fmt::Debug for Payload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Payload::Local(_) => f.write_str("Payload::Local(..)"),
            Payload::Encoded(b) => write!(f, "Payload::Encoded({} bytes)", b.len()),
        }
    }
}

/// The grains a call descends from, outermost first. Used to refuse call cycles at once.
pub type CallChain = Arc<[GrainId]>;

/// One grain call on its way to a runtime.
#[derive(Debug)]
pub struct Call {
    /// The grain to call.
    pub target: GrainId,
    /// The method name, as written in the grain's impl block.
    pub method: Cow<'static, str>,
    /// The arguments.
    pub payload: Payload,
    /// When the caller stops waiting.
    pub deadline: Instant,
    /// The grains whose turns are waiting on this call (empty for a call from outside any grain).
    pub chain: CallChain,
}

/// Something that can carry grain calls: a silo, or an external client connected to one.
pub trait GrainRuntime: Send + Sync + 'static {
    /// Delivers `call` and resolves with the reply, an error, or [`CallError::Timeout`] at the call's deadline.
    fn invoke(&self, call: Call) -> BoxFuture<'static, Result<Payload, CallError>>;

    /// The deadline applied to calls that do not set their own.
    fn default_timeout(&self) -> Duration {
        DEFAULT_CALL_TIMEOUT
    }
}

/// The turn the current task is running: who is waiting on it, and which grain runs it.
struct Turn {
    parent: CallChain,
    grain: GrainId,
}

tokio::task_local! {
    static CURRENT_TURN: Turn;
}

/// Runs `fut` as a turn of `grain` called through `chain`, so calls it makes carry `chain` + `grain`.
///
/// The extended chain is only built when the turn actually makes a call.
pub fn run_in_turn<F: Future>(chain: CallChain, grain: GrainId, fut: F) -> impl Future<Output = F::Output> {
    CURRENT_TURN.scope(Turn { parent: chain, grain }, fut)
}

/// The call chain for a call made now: the running turn's chain plus its grain, or empty outside any turn.
pub fn current_chain() -> CallChain {
    CURRENT_TURN
        .try_with(|turn| {
            let mut chain = Vec::with_capacity(turn.parent.len() + 1);
            chain.extend(turn.parent.iter().cloned());
            chain.push(turn.grain.clone());
            CallChain::from(chain)
        })
        .unwrap_or_else(|_| empty_chain())
}

/// The chain of a call made outside any grain turn (shared, so it costs no allocation).
fn empty_chain() -> CallChain {
    static EMPTY: std::sync::OnceLock<CallChain> = std::sync::OnceLock::new();
    EMPTY.get_or_init(|| CallChain::from(Vec::new())).clone()
}
