//! The one call path every grain call takes, and the seam between callers and runtimes.
//!
//! A typed reference (`CartRef`) turns a method call into a [`Call`] and hands it to a [`GrainRuntime`]: the
//! silo (for calls from grains, or from code running inside the silo process) or an external client (for calls
//! from another process). The runtime moves the call by [`GrainId`], method name and [`Payload`]; it knows
//! nothing about the grain's types.
//!
//! A payload starts out [`Payload::Local`]: the typed request, boxed (by a typed reference, in a cell the turn
//! puts the response back into, so that a local call allocates one box for both). A runtime that delivers it
//! inside the same process moves it as it is; one that sends it over the wire encodes it there
//! ([`LocalMessage::encode`]). Replies come back the same way, so a call between grains on one silo is never
//! serialized.
//!
//! # Request metadata
//!
//! A caller can attach string key/value pairs to its calls ([`RequestMetadata`], after Orleans'
//! `RequestContext`): a trace id, a tenant, the user a request is made for. They travel with the call — in the
//! [`Call`] in-process, in the envelope across the wire — and a grain serving the call reads them with
//! [`RequestMetadata::current`] (or [`GrainContext::request_metadata`](crate::GrainContext::request_metadata)).
//! Every call the grain makes while serving it carries them on, so they flow down the whole call chain.
//!
//! They live in a scope set around the future that serves the call (a task-local in effect), like the call
//! chain, rather than in the `GrainContext`: a context belongs to an activation, which serves many calls one
//! after another, while metadata belongs to one call; and a grain author should not have to pass them by hand
//! to each call it makes for them to flow on. As with the call chain, a task the grain spawns does not inherit
//! them (wrap its work in [`RequestMetadata::scope`]).

use std::any::Any;
use std::borrow::Cow;
use std::collections::BTreeMap;
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
    /// Whether this is a reply holding the grain method's own `Err` (see [`crate::grain::WireMessage::is_error`]).
    fn is_error(&self) -> bool {
        false
    }
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
///
/// Cheap to clone; the empty chain of a call from outside any grain holds nothing at all (not even a shared
/// reference count, which every core making such calls would otherwise write).
#[derive(Clone, Default, PartialEq, Eq)]
pub struct CallChain(Option<Arc<[GrainId]>>);

impl std::ops::Deref for CallChain {
    type Target = [GrainId];

    fn deref(&self) -> &[GrainId] {
        self.0.as_deref().unwrap_or_default()
    }
}

impl From<Vec<GrainId>> for CallChain {
    fn from(chain: Vec<GrainId>) -> Self {
        Self((!chain.is_empty()).then(|| chain.into()))
    }
}

impl fmt::Debug for CallChain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

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
    /// When the call was made: the clock reading its deadline was set from. A runtime takes it as "now" on
    /// the call's way in (a clock read costs as much as a quarter of a warm local call), so a `Call` is
    /// handed to a runtime as soon as it is made.
    pub issued: Instant,
    /// The grains whose turns are waiting on this call (empty for a call from outside any grain).
    pub chain: CallChain,
    /// The caller's request metadata, which flows on to the calls this one makes.
    pub metadata: RequestMetadata,
}

/// String key/value pairs that travel with a call and with every call made while serving it, after Orleans'
/// `RequestContext`: a trace id, a tenant, the user a request is made for. Cheap to clone; empty metadata costs
/// no allocation.
///
/// A caller attaches them with [`scope`](Self::scope); a grain serving the call reads them with
/// [`current`](Self::current) (or [`GrainContext::request_metadata`](crate::GrainContext::request_metadata)),
/// and every call it makes while serving the call carries them on, down the whole call chain. A task the grain
/// spawns does not inherit them: wrap its work in [`scope`](Self::scope).
#[derive(Clone, Default, PartialEq, Eq)]
pub struct RequestMetadata(Option<Arc<BTreeMap<String, String>>>);

impl RequestMetadata {
    /// No metadata.
    pub fn new() -> Self {
        Self(None)
    }

    /// Metadata holding `map`'s pairs.
    pub fn from_map(map: BTreeMap<String, String>) -> Self {
        if map.is_empty() { Self(None) } else { Self(Some(Arc::new(map))) }
    }

    /// This metadata with `key` set to `value`.
    pub fn with(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        Arc::make_mut(self.0.get_or_insert_with(Default::default)).insert(key.into(), value.into());
        self
    }

    /// The value of `key`, if set.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0.as_ref()?.get(key).map(String::as_str)
    }

    /// Whether no pair is set.
    pub fn is_empty(&self) -> bool {
        self.0.is_none()
    }

    /// The pairs, ordered by key.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().flat_map(|map| map.iter().map(|(k, v)| (k.as_str(), v.as_str())))
    }

    /// The pairs as a map (for the wire).
    pub fn to_map(&self) -> BTreeMap<String, String> {
        self.0.as_deref().cloned().unwrap_or_default()
    }

    /// The metadata calls made now carry: that of the innermost [`scope`](Self::scope), else that of the call
    /// the running grain turn serves, else none.
    pub fn current() -> Self {
        with_context(|context| match (&context.metadata, &context.turn) {
            (Some(metadata), _) => metadata.clone(),
            (None, Some(turn)) => turn.metadata.clone(),
            (None, None) => Self::new(),
        })
        .unwrap_or_default()
    }

    /// Runs `fut` with this metadata on every call it makes (inside a grain turn too, in place of the turn's).
    pub fn scope<F: Future>(self, fut: F) -> impl Future<Output = F::Output> {
        let turn = with_context(|context| context.turn.clone()).flatten();
        scope(Context { turn, metadata: Some(self) }, fut)
    }
}

impl fmt::Debug for RequestMetadata {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

impl<K: Into<String>, V: Into<String>> FromIterator<(K, V)> for RequestMetadata {
    fn from_iter<I: IntoIterator<Item = (K, V)>>(pairs: I) -> Self {
        Self::from_map(pairs.into_iter().map(|(k, v)| (k.into(), v.into())).collect())
    }
}

/// Something that can carry grain calls: a silo, or an external client connected to one.
pub trait GrainRuntime: Send + Sync + 'static {
    /// Delivers `call` and resolves with the reply, an error, or [`CallError::Timeout`] at the call's deadline.
    ///
    /// A runtime may start the call before the returned future is first polled, and even finish it: a silo
    /// runs a call to an idle local activation at once, on the caller's task (see [`Invoked`]).
    fn invoke(&self, call: Call) -> Invoked;

    /// The deadline applied to calls that do not set their own.
    fn default_timeout(&self) -> Duration {
        DEFAULT_CALL_TIMEOUT
    }
}

/// The answer to a call handed to a [`GrainRuntime`]: already known (a turn run on the caller's task that
/// finished at once, a call refused before it was sent), or a future.
///
/// A call that is answered at once costs no allocation for its future: on a silo, a warm call to an idle
/// local activation usually is. Awaiting such an answer still counts against tokio's cooperative budget, so a
/// loop of them yields to the worker's other tasks as a loop over a channel would.
#[must_use = "a call's answer is only seen by awaiting it"]
pub struct Invoked(InvokedState);

enum InvokedState {
    Ready(Option<Result<Payload, CallError>>),
    Pending(BoxFuture<'static, Result<Payload, CallError>>),
}

impl Invoked {
    /// An answer known already.
    pub fn ready(answer: Result<Payload, CallError>) -> Self {
        Self(InvokedState::Ready(Some(answer)))
    }

    /// An answer still to come from `future`.
    pub fn pending(future: impl Future<Output = Result<Payload, CallError>> + Send + 'static) -> Self {
        Self(InvokedState::Pending(Box::pin(future)))
    }
}

impl Future for Invoked {
    type Output = Result<Payload, CallError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<Self::Output> {
        match &mut self.0 {
            InvokedState::Ready(answer) => {
                // An answer ready at once spends the task's cooperative budget, as tokio's own channels do: a
                // task calling warm grains in a loop still yields to the other tasks of its worker now and then.
                let coop = std::task::ready!(tokio::task::coop::poll_proceed(cx));
                coop.made_progress();
                std::task::Poll::Ready(answer.take().expect("`Invoked` polled after completion"))
            }
            InvokedState::Pending(future) => future.as_mut().poll(cx),
        }
    }
}

impl fmt::Debug for Invoked {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            InvokedState::Ready(answer) => f.debug_tuple("Invoked::Ready").field(answer).finish(),
            InvokedState::Pending(_) => f.write_str("Invoked::Pending(..)"),
        }
    }
}

/// The turn the current task is running: who is waiting on it, which grain runs it, and the metadata of the
/// call it serves.
#[derive(Clone)]
struct Turn {
    parent: CallChain,
    grain: GrainId,
    metadata: RequestMetadata,
}

/// What calls made now carry, as the innermost scope of the current task set it: the turn they are made from
/// (`None` outside any, or inside [`run_outside_turn`]), and metadata a [`RequestMetadata::scope`] put in place
/// of the turn's. One scope for both, so that each scope replaces the whole context: a turn run inside a
/// caller's metadata scope (on its caller's task) carries its own call's metadata, not the caller's scope.
struct Context {
    turn: Option<Turn>,
    metadata: Option<RequestMetadata>,
}

scoped_tls::scoped_thread_local! {
    /// The innermost context of the future being polled on this thread. A pointer, set for the length of each
    /// poll of a [`Scoped`] future: entering a scope costs two stores, whatever the context holds (a task-local
    /// that moved the context in and out on every poll took 5% of a warm local call's instructions).
    static CONTEXT: Context
}

pin_project_lite::pin_project! {
    /// `fut`, polled with `context` as the current one: what a task-local scope is, with the context left in
    /// place and only a pointer to it swapped on each poll. Unlike tokio's, the scope is not set while `fut` is
    /// dropped: the futures it wraps (turns, a silo's work on a caller's task) are run to their end, not dropped
    /// half-way, but for the runtime's own shutdown.
    struct Scoped<F> {
        context: Context,
        #[pin]
        fut: F,
    }
}

impl<F: Future> Future for Scoped<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<F::Output> {
        let this = self.project();
        CONTEXT.set(this.context, || this.fut.poll(cx))
    }
}

pin_project_lite::pin_project! {
    /// `fut` in `span` (see [`in_span`]).
    #[project = InSpanProj]
    pub(crate) enum InSpan<F> {
        Bare { #[pin] fut: F },
        Traced { #[pin] fut: tracing::instrument::Instrumented<F> },
    }
}

/// `fut`, entered in `span` on every poll as [`Instrument`](tracing::Instrument) does, unless no subscriber
/// wants the span: then `fut` runs bare, with no span to enter, leave and drop on each poll (measured: a warm
/// local call's turn, instrumented with its disabled span, spent 1.5% of the call's instructions on it).
pub(crate) fn in_span<F: Future>(fut: F, span: tracing::Span) -> InSpan<F> {
    if span.is_disabled() {
        InSpan::Bare { fut }
    } else {
        InSpan::Traced { fut: tracing::Instrument::instrument(fut, span) }
    }
}

impl<F: Future> Future for InSpan<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<F::Output> {
        match self.project() {
            InSpanProj::Bare { fut } => fut.poll(cx),
            InSpanProj::Traced { fut } => fut.poll(cx),
        }
    }
}

/// Runs `fut` with `context` as the current one, as a task-local scope would.
fn scope<F: Future>(context: Context, fut: F) -> Scoped<F> {
    Scoped { context, fut }
}

/// `f` of the current context, if a scope set one.
fn with_context<R>(f: impl FnOnce(&Context) -> R) -> Option<R> {
    CONTEXT.is_set().then(|| CONTEXT.with(f))
}

/// Runs `fut` as a turn of `grain` called through `chain` with `metadata`, so calls it makes carry
/// `chain` + `grain`, and `metadata`.
///
/// The extended chain is only built when the turn actually makes a call.
pub fn run_in_turn<F: Future>(
    chain: CallChain,
    grain: GrainId,
    metadata: RequestMetadata,
    fut: F,
) -> impl Future<Output = F::Output> {
    scope(Context { turn: Some(Turn { parent: chain, grain, metadata }), metadata: None }, fut)
}

/// Runs `fut` outside any grain's turn, even when the task polling it runs one: calls it makes carry no chain
/// and no metadata. For the silo's own work done on a caller's task (routing the call, building the activation
/// the call starts and serving its mailbox), which belongs to no turn of the caller.
pub fn run_outside_turn<F: Future>(fut: F) -> impl Future<Output = F::Output> {
    scope(Context { turn: None, metadata: None }, fut)
}

/// The call chain for a call made now: the running turn's chain plus its grain, or empty outside any turn.
pub fn current_chain() -> CallChain {
    with_context(|context| {
        context.turn.as_ref().map(|turn| {
            let mut chain = Vec::with_capacity(turn.parent.len() + 1);
            chain.extend(turn.parent.iter().cloned());
            chain.push(turn.grain.clone());
            CallChain::from(chain)
        })
    })
    .flatten()
    .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn calls_carry_the_innermost_scope_then_the_turns_metadata_then_none() {
        assert!(RequestMetadata::current().is_empty());
        let served = RequestMetadata::new().with("trace", "from-caller");
        let turn = run_in_turn(CallChain::default(), GrainId::new("A", "a"), served.clone(), async {
            assert_eq!(RequestMetadata::current(), served, "a turn's calls carry its call's metadata");
            let narrowed = RequestMetadata::current().with("step", "2");
            narrowed
                .scope(async {
                    let current = RequestMetadata::current();
                    assert_eq!((current.get("trace"), current.get("step")), (Some("from-caller"), Some("2")));
                })
                .await;
        });
        turn.await;
        assert_eq!(RequestMetadata::new().with("k", "v").iter().collect::<Vec<_>>(), [("k", "v")]);
        assert!(RequestMetadata::from_map(BTreeMap::new()).is_empty());
    }

    #[tokio::test]
    async fn work_outside_a_turn_carries_neither_its_chain_nor_its_metadata() {
        let served = RequestMetadata::new().with("trace", "from-caller");
        let turn = run_in_turn(CallChain::default(), GrainId::new("A", "a"), served.clone(), async {
            assert_eq!(current_chain().len(), 1);
            let (chain, metadata) = run_outside_turn(async { (current_chain(), RequestMetadata::current()) }).await;
            assert!(chain.is_empty(), "silo work on a turn's task is no call of that turn");
            assert!(metadata.is_empty());
            assert_eq!(current_chain().len(), 1, "the turn's own scope is back after it");
        });
        turn.await;
    }

    #[tokio::test]
    async fn a_turn_run_inside_a_callers_metadata_scope_carries_its_own_calls_metadata() {
        // An inline turn runs on its caller's task, inside whatever scope the caller set: the turn's calls still
        // carry the metadata of the call it serves (which the silo extends, with its trace context say).
        let served = RequestMetadata::new().with("traceparent", "the turn's");
        let callers = RequestMetadata::new().with("traceparent", "the caller's");
        let seen = callers
            .scope(run_in_turn(CallChain::default(), GrainId::new("A", "a"), served.clone(), async {
                (RequestMetadata::current(), current_chain().len())
            }))
            .await;
        assert_eq!(seen, (served, 1));
    }
}
