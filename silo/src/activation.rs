//! Activations: the in-memory instances of grains, running one call at a time.
//!
//! The activation table maps a [`GrainId`] to the mailbox of its activation. A call to a grain that is not in
//! the table claims the slot with the map's entry API and creates the activation in the same step, so
//! concurrent first calls all land in the one mailbox being built: a grain id has exactly one activation per
//! silo. Its first drain confirms with the grain's directory owner that it is the grain's one activation in
//! the cluster (a loser forwards its queued calls to the winner before loading anything), then builds the
//! grain (state loaded, `on_activate`) and drains its mailbox one call at a time: a turn runs to completion
//! before the next starts, and no lock is held across the grain's `.await`s.
//!
//! An idle activation has no task. What its drainer needs between runs (a [`Life`]) waits in its mailbox;
//! the mail that finds it there takes it and starts a drainer, which runs until the mailbox is empty and then
//! parks the life again (as Orleans schedules an activation's work on the thread pool only while it has
//! some). Most warm calls never queue at all: they run on their caller's task (`SiloInner::run_inline`). An
//! idle activation thus costs a few small structs, not a task, and a cold one's drainer hands its memory back
//! when it is done.
//!
//! Leaving the table is the reverse: the drainer runs `on_deactivate` while new calls still queue in the
//! mailbox, then removes its entry (only if it is still its own), closes the mailbox, and hands every call
//! still queued back to the silo, which activates the grain afresh for them. A call never falls between two
//! activations.

use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use futures_util::FutureExt;
use std::task::{Context, Poll};

use grains::__private::runtime::{BoxFuture, Call, CallChain, Payload, RequestMetadata, current_chain, run_in_turn};
use grains::__private::{ErasedGrain, GrainRegistration, TimerHost, TurnOutcome, TurnScope};
use grains::{CallError, GrainContext, GrainError, GrainId, StorageError};
use tokio::sync::oneshot;
use tokio::time::Instant;
use tracing::Instrument;

use crate::activation_table::ActivationTable;
use crate::cluster::{Cluster, Registration};
use crate::metrics::{Metrics, TypeStats};
use crate::timers::{ActivationTimers, TimerTick};

/// What an activation needs from the silo that hosts it: the one way from this module to the rest.
pub(crate) trait ActivationHost: Send + Sync + 'static {
    /// The cluster: the directory the activation registers with, and the membership lease it holds.
    fn cluster(&self) -> &Arc<Cluster>;
    /// The table the activation removes itself from when it ends.
    fn activations(&self) -> &ActivationTable;
    /// The context a grain of `id` runs with (its calls, its state store, its timers, reminders).
    fn context(&self, id: GrainId, timers: Arc<dyn TimerHost>) -> GrainContext;
    /// The silo's counters.
    fn metrics(&self) -> &Metrics;
    /// The coarse clock idleness is judged by (milliseconds since the silo started).
    fn now_ms(&self) -> u64;
    /// The same clock, shared, for turns run away from the host (see [`Built`]).
    fn coarse_clock(&self) -> &Arc<AtomicU64>;
    /// How long registration with the directory may take.
    fn call_timeout(&self) -> Duration;
    /// The routing cache's capacity (a losing duplicate remembers the winner).
    fn cache_capacity(&self) -> usize;
    /// Hands a call queued at a departed activation to the grain's next activation.
    fn redeliver(&self, id: GrainId, invocation: Invocation);
}

/// A call waiting in a mailbox.
pub(crate) struct Invocation {
    pub(crate) method: std::borrow::Cow<'static, str>,
    pub(crate) payload: Payload,
    pub(crate) deadline: Instant,
    pub(crate) chain: CallChain,
    pub(crate) metadata: RequestMetadata,
    pub(crate) reply: oneshot::Sender<Result<Payload, CallError>>,
}

impl Invocation {
    /// `call` as an invocation answered through `reply`, beside the grain it is for.
    pub(crate) fn of(call: Call, reply: oneshot::Sender<Result<Payload, CallError>>) -> (GrainId, Invocation) {
        let Call { target, method, payload, deadline, chain, metadata, .. } = call;
        (target, Invocation { method, payload, deadline, chain, metadata, reply })
    }
}

/// What a mailbox carries.
pub(crate) enum Mail {
    /// Run a call.
    Call(Invocation),
    /// The idle collector thinks this activation is idle (`force`: deactivate regardless, for shutdown).
    Deactivate {
        /// Deactivate even if not idle.
        force: bool,
    },
    /// Run a tick of one of the activation's timers.
    Timer(TimerTick),
}

/// An activation's queue of calls: a deque behind a lock, and, while no drainer runs, the activation's
/// [`Life`].
///
/// Unlike a channel, an empty mailbox holds no buffer (a channel allocates its first block of slots up front),
/// so a million idle activations cost a million small structs, and a burst's buffer is given back once the
/// queue drains.
#[derive(Debug)]
pub(crate) struct Mailbox {
    queue: std::sync::Mutex<MailQueue>,
    /// How many mails are queued, kept beside the queue so that a caller about to run a turn inline can see
    /// whether any wait without taking the lock (one cache line fewer written per warm call).
    queued: AtomicUsize,
    /// The most calls it queues (`max_mailbox_length`); a call past it is answered `Overloaded` at once.
    limit: usize,
}

#[derive(Debug)]
struct MailQueue {
    items: std::collections::VecDeque<Mail>,
    closed: bool,
    /// The activation's life while no drainer runs (`None` while one does, and once the activation ended).
    /// Boxed: the mailbox sits beside the atomics every warm call reads, and stays small.
    parked: Option<Box<Life>>,
    /// The running drainer, stopped where it stands by a shutdown past its grace period.
    drainer: Option<tokio::task::AbortHandle>,
}

/// Who runs the drain that mail finds an idle activation in need of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Drainer {
    /// A task of its own, spawned by the sender.
    Spawned,
    /// The sender, handed a [`Drain`] to run: a caller, which runs it while it waits for its reply and leaves
    /// the rest to a task of its own once the reply comes (`routing::Beside`). It saves a task and two wake-ups
    /// per cold activation. A shutdown past its grace period cannot abort such a drain; it stops at its next
    /// turn (the activation is evicted).
    ///
    /// Not while a turn runs inline (on its caller's task, holding the turn lock): the drain could only wait
    /// for that turn, and a caller that stopped polling its call without dropping it would hold the activation's
    /// life meanwhile, stalling every call behind it. That drain is spawned.
    Sender,
}

/// A drain handed to its sender to run (see [`Drainer::Sender`]).
pub(crate) struct Drain {
    shared: Arc<ActivationShared>,
    life: Box<Life>,
}

impl Drain {
    /// Runs the drain: the activation's mail until its mailbox is empty or it leaves.
    pub(crate) async fn run(self) {
        drain(self.shared, self.life).await;
    }
}

/// What became of a drainer's attempt to park its activation's life.
enum Parked {
    /// Parked: the drainer ends, and the next mail starts another.
    Done,
    /// Mail arrived meanwhile: the drainer keeps the life and serves it.
    MailWaiting(Box<Life>),
}

impl std::fmt::Debug for Mail {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Mail::Call(call) => write!(f, "Call({})", call.method),
            Mail::Deactivate { force } => write!(f, "Deactivate {{ force: {force} }}"),
            Mail::Timer(tick) => write!(f, "Timer({})", tick.timer),
        }
    }
}

impl Mailbox {
    fn lock(&self) -> std::sync::MutexGuard<'_, MailQueue> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// An empty mailbox that queues at most `limit` calls, holding the activation's `life` until its first
    /// mail.
    pub(crate) fn new(limit: usize, life: Life) -> Self {
        let queue = MailQueue {
            items: std::collections::VecDeque::new(),
            closed: false,
            parked: Some(Box::new(life)),
            drainer: None,
        };
        Self { queue: std::sync::Mutex::new(queue), queued: AtomicUsize::new(0), limit }
    }

    /// The next mail if one is queued.
    pub(crate) fn try_recv(&self) -> Option<Mail> {
        let mut queue = self.lock();
        let mail = queue.items.pop_front();
        self.queued.store(queue.items.len(), Ordering::Release);
        mail
    }

    /// Takes everything queued, handing each call to `each` (the rest of the mail is for an activation that has
    /// ended, or never served).
    fn take_queued_calls(&self, mut each: impl FnMut(Invocation)) {
        while let Some(mail) = self.try_recv() {
            if let Mail::Call(call) = mail {
                each(call);
            }
        }
    }

    /// Parks `life` if no mail is queued: its drainer ends, and the next mail starts another. The queue's buffer
    /// goes back too, so an idle activation holds none (warm calls mostly run inline and never touch it).
    fn park(&self, life: Box<Life>) -> Parked {
        let mut queue = self.lock();
        if !queue.items.is_empty() {
            return Parked::MailWaiting(life);
        }
        if queue.items.capacity() > 0 {
            queue.items = std::collections::VecDeque::new();
        }
        queue.parked = Some(life);
        queue.drainer = None;
        Parked::Done
    }

    /// Refuses further mail; what is queued can still be taken.
    pub(crate) fn close(&self) {
        self.lock().closed = true;
    }

    /// How many calls wait in the mailbox.
    pub(crate) fn len(&self) -> usize {
        self.queued.load(Ordering::Acquire)
    }

    /// Whether the mailbox refuses mail.
    pub(crate) fn is_closed(&self) -> bool {
        self.lock().closed
    }
}

/// What an activation's drainer, the table, the idle collector, timers and inline callers share.
#[derive(Debug)]
pub(crate) struct ActivationShared {
    /// The activation's queue of calls.
    pub(crate) mailbox: Mailbox,
    /// Milliseconds since the silo's clock origin at the end of the last turn; shared with the built grain,
    /// so that a turn run inline stamps it holding the turn lock alone.
    last_active_ms: Arc<AtomicU64>,
    /// How long this activation may idle.
    pub(crate) idle_timeout: Duration,
    /// Set once the directory has confirmed this activation as the grain's one activation; cleared once it
    /// has run its last turn (it is leaving: unregistering, then out of the table).
    confirmed: std::sync::atomic::AtomicBool,
    /// Set when the directory finds this activation a duplicate: it runs no further turn.
    evicted: std::sync::atomic::AtomicBool,
    /// The grain once built, locked by whoever runs a turn: the activation's drainer, or a caller running its
    /// call inline (`SiloInner::run_inline`). `None` before the grain is built and after it is gone.
    pub(crate) turn: Arc<tokio::sync::Mutex<Option<Built>>>,
}

/// The turn lock of an activation, held by a caller running its call inline.
pub(crate) type TurnGuard = tokio::sync::OwnedMutexGuard<Option<Built>>;

/// An idle activation claimed by a caller to run its call inline: its turn lock, holding the built grain and
/// what the turn's end may need (the idle stamp; the way to queue the activation's departure).
pub(crate) struct IdleClaim {
    pub(crate) guard: TurnGuard,
}

impl IdleClaim {
    /// The claimed activation's grain type.
    pub(crate) fn grain_type(&self) -> &'static GrainRegistration {
        match self.guard.as_ref() {
            Some(built) => built.grain_type,
            None => unreachable!("claimed with its grain built"),
        }
    }
}

/// A built grain and what its turns need, so that a caller running a turn inline needs nothing of the silo
/// (no reference count of it touched per call).
pub(crate) struct Built {
    /// The grain; out of here, inside its turn's future, while a turn runs (see [`Turn`]), and `None` for good
    /// once a turn has panicked.
    grain: Option<Box<dyn ErasedGrain>>,
    ctx: GrainContext,
    /// The activation's idle stamp (see [`ActivationShared::touch`]).
    last_active_ms: Arc<AtomicU64>,
    /// The activation, for a turn run inline that ends it (its departure is queued in its mailbox).
    shared: Weak<ActivationShared>,
    /// The activation's grain type.
    pub(crate) grain_type: &'static GrainRegistration,
    /// The grain type's per-method counters.
    stats: Option<Arc<TypeStats>>,
    /// The silo's coarse clock, for idleness.
    clock: Arc<AtomicU64>,
    /// The silo, named in exported spans.
    #[cfg(feature = "otlp")]
    silo: grains_storage::SiloAddress,
}

impl Built {
    /// The coarse clock's time (milliseconds since the silo started).
    pub(crate) fn now_ms(&self) -> u64 {
        self.clock.load(Ordering::Relaxed)
    }

    /// Stamps the activation active now (see [`ActivationShared::touch`]).
    pub(crate) fn touch(&self) {
        self.last_active_ms.store(self.now_ms(), Ordering::Relaxed);
    }

    /// The activation, while it still exists.
    pub(crate) fn activation(&self) -> Option<Arc<ActivationShared>> {
        self.shared.upgrade()
    }
}

impl std::fmt::Debug for Built {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Built").field("grain", &self.ctx.id()).finish()
    }
}

impl ActivationShared {
    pub(crate) fn new(mailbox: Mailbox, now_ms: u64, idle_timeout: Duration) -> Self {
        Self {
            mailbox,
            last_active_ms: Arc::new(AtomicU64::new(now_ms)),
            idle_timeout,
            confirmed: std::sync::atomic::AtomicBool::new(false),
            evicted: std::sync::atomic::AtomicBool::new(false),
            turn: Arc::new(tokio::sync::Mutex::new(None)),
        }
    }

    /// Queues `mail`, or hands it back if the mailbox is closed (see [`ActivationShared::deliver`]); a drain the
    /// mail finds needed runs on a task of its own.
    pub(crate) fn send(self: &Arc<Self>, mail: Mail) -> Result<(), Mail> {
        self.deliver(mail, Drainer::Spawned).map(|_| ())
    }

    /// Queues `mail`, or hands it back if the mailbox is closed. A call that finds the mailbox full is
    /// answered [`CallError::Overloaded`] here (it counts as delivered: it must not be retried elsewhere).
    ///
    /// Mail that finds the activation idle (its life parked) starts a drain: on a task of its own
    /// ([`Drainer::Spawned`], on the current runtime; outside one, a value dropped after its runtime, the mail
    /// waits for the next sender that has one), or returned for the sender to run ([`Drainer::Sender`]).
    pub(crate) fn deliver(self: &Arc<Self>, mail: Mail, drainer: Drainer) -> Result<Option<Drain>, Mail> {
        let mut queue = self.mailbox.lock();
        if queue.closed {
            return Err(mail);
        }
        if queue.items.len() >= self.mailbox.limit
            && let Mail::Call(call) = mail
        {
            drop(queue);
            let full = format!("the grain's mailbox holds its limit of {} calls", self.mailbox.limit);
            let _ = call.reply.send(Err(CallError::Overloaded(full)));
            return Ok(None);
        }
        queue.items.push_back(mail);
        self.mailbox.queued.store(queue.items.len(), Ordering::Release);
        if queue.parked.is_none() {
            return Ok(None); // a drainer runs, and will find the mail
        }
        // A turn running inline holds the turn lock: a drain would only wait for it, and a sender does not wait
        // holding the activation's life (see `Drainer::Sender`).
        if matches!(drainer, Drainer::Sender) && self.turn.try_lock().is_ok() {
            return Ok(queue.parked.take().map(|life| Drain { shared: self.clone(), life }));
        }
        if let Ok(runtime) = tokio::runtime::Handle::try_current()
            && let Some(life) = queue.parked.take()
        {
            // Started under the lock, so the abort handle stored is this drainer's: it cannot park (that takes
            // the lock) before its handle is in place.
            let task = runtime.spawn(drain(self.clone(), life));
            queue.drainer = Some(task.abort_handle());
        }
        Ok(None)
    }

    /// Stops the running drainer, if any, where it stands (a shutdown past its grace period).
    pub(crate) fn abort_drainer(&self) {
        if let Some(drainer) = self.mailbox.lock().drainer.take() {
            drainer.abort();
        }
    }

    /// Marks the activation a duplicate: it leaves before its next turn, without `on_deactivate` (its state
    /// must not be flushed over the real activation's), and its queued calls go to the grain's one activation.
    pub(crate) fn evict(&self) {
        self.evicted.store(true, Ordering::Release);
    }

    pub(crate) fn is_evicted(&self) -> bool {
        self.evicted.load(Ordering::Acquire)
    }

    pub(crate) fn touch(&self, now_ms: u64) {
        self.last_active_ms.store(now_ms, Ordering::Relaxed);
    }

    /// Whether the directory has confirmed this activation and it may still run turns (a losing duplicate
    /// never is, and never runs a turn; a leaving activation is not any more).
    pub(crate) fn is_confirmed(&self) -> bool {
        self.confirmed.load(Ordering::Acquire)
    }

    /// The turn lock, if this activation can run a call on the caller's task right now: the directory confirmed
    /// it, it is not evicted, no turn is running and none is queued, and its grain is built and has not asked
    /// to leave. Calls queued earlier keep their place: a caller only runs inline at an activation with an
    /// empty mailbox.
    pub(crate) fn claim_idle(&self) -> Option<TurnGuard> {
        if !self.is_confirmed() || self.is_evicted() || self.mailbox.len() != 0 {
            return None;
        }
        let guard = self.turn.clone().try_lock_owned().ok()?;
        let built = guard.as_ref()?;
        (built.grain.is_some() && !built.ctx.deactivation_requested()).then_some(guard)
    }

    /// Whether the activation has been idle for its whole timeout at `now_ms`.
    pub(crate) fn is_idle(&self, now_ms: u64) -> bool {
        now_ms.saturating_sub(self.last_active_ms.load(Ordering::Relaxed)) >= self.idle_timeout.as_millis() as u64
    }
}

/// The activation table's entry for one grain.
#[derive(Debug)]
pub(crate) struct ActivationHandle {
    /// Unique per activation, so that a dying activation removes only its own entry.
    pub(crate) activation_id: u64,
    /// The activation's mailbox and state, shared with its task.
    pub(crate) shared: Arc<ActivationShared>,
    /// The directory registration the activation lives under.
    pub(crate) registration: Registration,
}

/// What an activation's drainer needs from one run to the next: parked in the mailbox while the activation
/// idles, owned by its drainer while one runs.
pub(crate) struct Life {
    pub(crate) host: Arc<dyn ActivationHost>,
    pub(crate) id: GrainId,
    pub(crate) activation_id: u64,
    pub(crate) grain_type: &'static GrainRegistration,
    pub(crate) registration: Registration,
    /// Set once the directory has confirmed the activation and its grain is built.
    serving: Option<Serving>,
}

impl Life {
    /// The life of a new activation, before its first drain (which confirms it and builds its grain).
    pub(crate) fn new(
        host: Arc<dyn ActivationHost>,
        id: GrainId,
        activation_id: u64,
        grain_type: &'static GrainRegistration,
        registration: Registration,
    ) -> Self {
        Life { host, id, activation_id, grain_type, registration, serving: None }
    }
}

impl std::fmt::Debug for Life {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Life")
            .field("id", &self.id)
            .field("activation_id", &self.activation_id)
            .field("serving", &self.serving.is_some())
            .finish_non_exhaustive()
    }
}

/// What a built activation's drains share: its timers and the context its grain was built with.
struct Serving {
    timers: Arc<ActivationTimers>,
    ctx: GrainContext,
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_owned()
    }
}

/// Builds the grain and runs `on_activate`; a panic in either counts as a failure.
async fn activate(life: &Life, ctx: &GrainContext) -> Result<Box<dyn ErasedGrain>, CallError> {
    let build = async {
        let mut grain = (life.grain_type.build)(ctx.clone()).await?;
        grain.on_activate(ctx).await?;
        Ok::<_, GrainError>(grain)
    };
    let grain = life.id.to_string();
    match AssertUnwindSafe(build).catch_unwind().await {
        Ok(Ok(built)) => Ok(built),
        Ok(Err(GrainError::State(StorageError::Unavailable(reason)))) => {
            Err(CallError::StorageUnavailable { grain, reason })
        }
        Ok(Err(e)) => Err(CallError::ActivationFailed { grain, reason: e.to_string() }),
        Err(panic) => {
            Err(CallError::ActivationFailed { grain, reason: format!("panicked: {}", panic_message(&*panic)) })
        }
    }
}

/// Confirms with the grain's directory owner that this activation is the grain's one activation (first
/// writer wins). A loser hands its queued calls to the winner before it has run a turn or loaded any state.
async fn confirm_registration(shared: &ActivationShared, life: &Life) -> bool {
    let host = &life.host;
    let deadline = tokio::time::Instant::now() + host.call_timeout();
    let outcome = host.cluster().register(&life.id, &life.registration, deadline).await;
    let error = match outcome {
        Ok(winner) if winner == life.registration => return true,
        Ok(winner) => {
            tracing::debug!(grain = %life.id, winner = %winner.silo, "lost the registration race; forwarding");
            host.activations().remove(&life.id, life.activation_id);
            shared.mailbox.close();
            host.cluster().remember(life.id.clone(), winner, host.cache_capacity());
            shared.mailbox.take_queued_calls(|call| host.redeliver(life.id.clone(), call));
            return false;
        }
        Err(error) => error,
    };
    tracing::warn!(grain = %life.id, %error, "activation not registered");
    host.activations().remove(&life.id, life.activation_id);
    shared.mailbox.close();
    shared.mailbox.take_queued_calls(|call| {
        let _ = call.reply.send(Err(error.clone()));
    });
    false
}

/// An activation's first drain, before any call: confirms it with the directory and builds its grain. `None`
/// when it never serves (a losing duplicate, an unregistered or failed activation): its calls have been
/// handed on or answered, and it is out of the table.
async fn begin(shared: &Arc<ActivationShared>, life: &Life) -> Option<Serving> {
    let host = &life.host;
    let id = &life.id;
    if !confirm_registration(shared, life).await {
        return None;
    }
    shared.confirmed.store(true, Ordering::Release);
    let timers = ActivationTimers::new(shared);
    let ctx = host.context(id.clone(), timers.clone());
    let grain = match activate(life, &ctx).await {
        Ok(grain) => grain,
        Err(error) => {
            timers.end();
            tracing::warn!(grain = %id, %error, "activation failed");
            host.metrics().activation_failures.fetch_add(1, Ordering::Relaxed);
            host.cluster().unregister(id.clone(), life.registration.clone()).await;
            host.activations().remove(id, life.activation_id);
            shared.mailbox.close();
            shared.mailbox.take_queued_calls(|call| {
                let _ = call.reply.send(Err(error.clone()));
            });
            return None;
        }
    };
    *shared.turn.lock().await = Some(Built {
        grain: Some(grain),
        ctx: ctx.clone(),
        last_active_ms: shared.last_active_ms.clone(),
        shared: Arc::downgrade(shared),
        grain_type: life.grain_type,
        stats: host.metrics().grain_type(life.grain_type.type_name).cloned(),
        clock: host.coarse_clock().clone(),
        #[cfg(feature = "otlp")]
        silo: host.cluster().me.clone(),
    });
    host.metrics().activations.fetch_add(1, Ordering::Relaxed);
    tracing::debug!(grain = %id, activation = life.activation_id, "activated");
    Some(Serving { timers, ctx })
}

/// How a drain of the mailbox ended.
enum Drained {
    /// The mailbox is empty: the activation idles.
    Empty,
    /// The activation leaves.
    Leave {
        /// A turn panicked: the grain is dropped without `on_deactivate`.
        panicked: bool,
        /// A call taken from the mailbox but not run, handed on with the rest of the mailbox.
        unrun: Option<Box<Invocation>>,
    },
}

/// Drains the mailbox of an activation that mail found idle, on a task of its own, until it is empty (the
/// activation's life is parked again and the task ends) or the activation leaves.
pub(crate) async fn drain(shared: Arc<ActivationShared>, mut life: Box<Life>) {
    // The large futures are boxed so that a drain's task stays small.
    if life.serving.is_none() {
        match Box::pin(begin(&shared, &life)).await {
            Some(serving) => life.serving = Some(serving),
            None => return,
        }
    }
    loop {
        let Some(serving) = life.serving.as_ref() else { unreachable!("set above") };
        // Boxed, as the rare paths are: a burst's turns need their room only while the burst lasts.
        match Box::pin(serve(&shared, &life, serving)).await {
            Drained::Empty => match shared.mailbox.park(life) {
                Parked::Done => return,
                Parked::MailWaiting(back) => life = back,
            },
            Drained::Leave { panicked, unrun } => {
                return Box::pin(leave(&shared, &life, serving, panicked, unrun)).await;
            }
        }
    }
}

/// Runs the activation's queued mail, one turn at a time, until the mailbox is empty or the activation leaves.
async fn serve(shared: &ActivationShared, life: &Life, serving: &Serving) -> Drained {
    let (host, id) = (&*life.host, &life.id);
    while let Some(mail) = shared.mailbox.try_recv() {
        match mail {
            Mail::Call(call) => {
                // Taken first: a caller may be running a turn inline, and what follows is judged after it.
                let mut turn = shared.turn.lock().await;
                if call.reply.is_closed() {
                    continue; // the caller gave up (its deadline passed): do not run a call nobody waits for
                }
                if shared.is_evicted() || !Box::pin(hold_lease(host.cluster(), call.deadline)).await {
                    if shared.is_evicted() || host.cluster().is_stopped() {
                        // Handed on below, with the rest of the mailbox.
                        return Drained::Leave { panicked: false, unrun: Some(Box::new(call)) };
                    }
                    let _ = call.reply.send(Err(CallError::Timeout(Duration::ZERO)));
                    continue;
                }
                // The turn's start: also the clock read its latency is measured from.
                let started = Instant::now();
                if started >= call.deadline {
                    // Nobody will use the answer; a queue of stale calls must not cost a turn each.
                    let _ = call.reply.send(Err(CallError::Timeout(Duration::ZERO)));
                    continue;
                }
                let Some(built) = turn.as_mut().filter(|built| built.grain.is_some()) else {
                    // The grain is gone: a turn run inline panicked, and a forced deactivation is queued.
                    return Drained::Leave { panicked: false, unrun: Some(Box::new(call)) };
                };
                let Invocation { method, payload, chain, metadata, reply, .. } = call;
                let request = TurnCall { grain: id.clone(), method, payload, chain, metadata, started };
                let (end, result) = run_call(built, request).await;
                shared.touch(host.now_ms());
                let _ = reply.send(result);
                match end {
                    TurnEnd::Ran => {}
                    TurnEnd::Panicked => {
                        *turn = None;
                        return Drained::Leave { panicked: true, unrun: None };
                    }
                    TurnEnd::Deactivate => return Drained::Leave { panicked: false, unrun: None },
                }
            }
            Mail::Deactivate { force } => {
                if force || shared.is_idle(host.now_ms()) {
                    return Drained::Leave { panicked: false, unrun: None };
                }
            }
            Mail::Timer(tick) => {
                if shared.is_evicted() || host.cluster().is_stopped() {
                    return Drained::Leave { panicked: false, unrun: None };
                }
                if !host.cluster().lease.is_valid() {
                    host.cluster().refresh_now.notify_one();
                    continue; // not sure it is still a member: no turn runs, and the timer ticks on
                }
                // Boxed: rarer than calls, its future would otherwise size every drain's task.
                match Box::pin(run_timer(host, id, shared, &serving.timers, tick)).await {
                    TimerEnd::Ran if serving.ctx.deactivation_requested() => {
                        return Drained::Leave { panicked: false, unrun: None };
                    }
                    TimerEnd::Ran => {}
                    TimerEnd::GrainGone => return Drained::Leave { panicked: false, unrun: None },
                    TimerEnd::Panicked => return Drained::Leave { panicked: true, unrun: None },
                }
            }
        }
    }
    Drained::Empty
}

/// The activation's departure: its timers end, its grain runs `on_deactivate` (unless it panicked or is a
/// duplicate), it unregisters and leaves the table, and the calls still queued go to the grain's next
/// activation.
async fn leave(
    shared: &ActivationShared,
    life: &Life,
    serving: &Serving,
    panicked: bool,
    unrun: Option<Box<Invocation>>,
) {
    let (host, id) = (&*life.host, &life.id);
    // Timers end with the activation: no tick runs from here on.
    serving.timers.end();

    // A grain that panicked may hold broken state, and a duplicate's state is not the grain's: they are
    // dropped without their on_deactivate hook.
    let evicted = shared.is_evicted() || host.cluster().is_stopped();
    // Taking the grain out ends inline turns too: a caller finding `None` queues its call instead.
    let built = shared.turn.lock().await.take();
    if let Some(mut grain) = built.and_then(|built| built.grain).filter(|_| !panicked && !evicted) {
        match AssertUnwindSafe(grain.on_deactivate(&serving.ctx)).catch_unwind().await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(grain = %id, error = %e, "on_deactivate failed"),
            Err(panic) => tracing::warn!(grain = %id, message = %panic_message(&*panic), "on_deactivate panicked"),
        }
    }
    // No turn runs from here on: the activation no longer counts as this grain's (its unregistration may wait
    // on a remote directory, and the grain may be activated elsewhere as soon as it lands).
    shared.confirmed.store(false, Ordering::Release);
    host.cluster().unregister(id.clone(), life.registration.clone()).await;
    host.activations().remove(id, life.activation_id);
    shared.mailbox.close();
    host.metrics().deactivations.fetch_add(1, Ordering::Relaxed);
    tracing::debug!(grain = %id, activation = life.activation_id, evicted, "deactivated");
    if let Some(call) = unrun {
        host.redeliver(id.clone(), *call);
    }
    shared.mailbox.take_queued_calls(|call| host.redeliver(id.clone(), call));
}

/// How a timer's turn ended.
enum TimerEnd {
    /// It ran (or its timer was gone): the activation serves on.
    Ran,
    /// The grain is gone (a turn run inline panicked): the activation leaves.
    GrainGone,
    /// The callback panicked: the grain was dropped, and the activation leaves.
    Panicked,
}

/// Runs one tick of a timer as a turn of the activation.
async fn run_timer(
    host: &dyn ActivationHost,
    id: &GrainId,
    shared: &ActivationShared,
    timers: &ActivationTimers,
    tick: TimerTick,
) -> TimerEnd {
    let Some((mut callback, keep_alive)) = timers.take(tick.timer) else { return TimerEnd::Ran };
    let mut slot = shared.turn.lock().await;
    let Some(grain) = slot.as_mut().and_then(|built| built.grain.as_mut()) else { return TimerEnd::GrainGone };
    let span = tracing::debug_span!("grain.timer", grain = %id, timer = tick.timer);
    let turn = run_in_turn(current_chain(), id.clone(), RequestMetadata::new(), callback(grain.as_any_mut()));
    let outcome = AssertUnwindSafe(turn.instrument(span)).catch_unwind().await;
    timers.put_back(tick.timer, callback);
    drop(tick); // its ticker goes on
    if keep_alive {
        shared.touch(host.now_ms());
    }
    if let Err(panic) = outcome {
        let message = panic_message(&*panic);
        tracing::error!(grain = %id, %message, "grain timer panicked; deactivating");
        *slot = None;
        return TimerEnd::Panicked;
    }
    TimerEnd::Ran
}

/// How a turn ended, for whoever ran it.
pub(crate) enum TurnEnd {
    /// Normally: the activation serves on.
    Ran,
    /// The method panicked: the grain may hold broken state and must be dropped without `on_deactivate`.
    Panicked,
    /// The grain asked to be deactivated (`deactivate_on_idle`).
    Deactivate,
}

/// One call as a turn runs it.
pub(crate) struct TurnCall {
    /// The grain called.
    pub(crate) grain: GrainId,
    pub(crate) method: std::borrow::Cow<'static, str>,
    pub(crate) payload: Payload,
    pub(crate) chain: CallChain,
    pub(crate) metadata: RequestMetadata,
    /// When the turn started (its latency is measured from here).
    pub(crate) started: Instant,
}

/// Runs `call` as one turn of `built`, on whichever task holds its turn lock; the caller has checked the
/// lease, eviction and the deadline. Returns how the turn ended and the call's answer.
pub(crate) async fn run_call(built: &mut Built, call: TurnCall) -> (TurnEnd, Result<Payload, CallError>) {
    let mut turn = Turn::start(built, call);
    std::future::poll_fn(|cx| turn.poll_end(cx, built)).await
}

/// One turn under way. Its grain is out of its [`Built`], owned by the turn's future, until the turn ends
/// and [`Turn::poll_end`] puts it back: so the turn borrows nothing, lives in one allocation, and can be moved
/// while it runs (to a task of its own, when an inline caller stops waiting).
pub(crate) struct Turn {
    /// `None` when the grain was already gone (a turn panicked before): the turn ends at once, as a panic.
    future: Option<BoxFuture<'static, TurnOutcome>>,
    /// When the turn started (its latency is measured from here).
    started: Instant,
    #[cfg(feature = "otlp")]
    trace: Option<crate::otlp::ActiveSpan>,
}

impl Turn {
    /// Starts `call` as a turn of `built`'s grain (nothing runs until it is polled).
    pub(crate) fn start(built: &mut Built, call: TurnCall) -> Turn {
        let TurnCall { grain: id, method, payload, chain, metadata, started } = call;
        let span = tracing::debug_span!("grain.turn", grain = %id, method = %method);
        #[cfg(feature = "otlp")]
        let (metadata, trace) = crate::otlp::start(
            || format!("{}.{}", id.grain_type(), method),
            crate::otlp::Kind::Server,
            metadata,
            || vec![("grains.grain", id.to_string()), ("grains.silo", built.silo.to_string())],
        );
        let scope = TurnScope { chain, grain: id, metadata, span };
        let future = built.grain.take().map(|grain| grain.run_turn(method, payload, scope));
        Turn {
            future,
            started,
            #[cfg(feature = "otlp")]
            trace,
        }
    }

    /// Polls the turn; once it has ended, puts its grain back into `built` (the one it started from), records
    /// its latency, and says how it ended.
    pub(crate) fn poll_end(
        &mut self,
        cx: &mut Context<'_>,
        built: &mut Built,
    ) -> Poll<(TurnEnd, Result<Payload, CallError>)> {
        let id = built.ctx.id();
        let Some(future) = self.future.as_mut() else {
            let error = CallError::Unavailable(format!("the activation of {id} lost its grain to a panic"));
            return Poll::Ready((TurnEnd::Panicked, Err(error)));
        };
        let TurnOutcome { grain, method, result } = std::task::ready!(future.as_mut().poll(cx));
        self.future = None;
        built.grain = grain;
        let method_stats = built.stats.as_ref().and_then(|s| s.method(&method));
        #[cfg(feature = "otlp")]
        let trace = self.trace.take();
        match result {
            Ok(result) => {
                let failed = match &result {
                    Ok(Payload::Local(reply)) => reply.is_error(),
                    Ok(Payload::Encoded(_)) => false,
                    Err(_) => true,
                };
                if let Some(method_stats) = method_stats {
                    method_stats.record(self.started.elapsed(), failed);
                }
                #[cfg(feature = "otlp")]
                if let Some(trace) = trace {
                    trace.end(match &result {
                        Err(error) => Some(error.to_string()),
                        Ok(_) => failed.then(|| "the method returned its error".to_owned()),
                    });
                }
                let end = if built.ctx.deactivation_requested() { TurnEnd::Deactivate } else { TurnEnd::Ran };
                Poll::Ready((end, result))
            }
            Err(panic) => {
                if let Some(method_stats) = method_stats {
                    method_stats.record(self.started.elapsed(), true);
                }
                let message = panic_message(&*panic);
                #[cfg(feature = "otlp")]
                if let Some(trace) = trace {
                    trace.end(Some(format!("panicked: {message}")));
                }
                tracing::error!(grain = %id, method = %method, %message, "grain method panicked; deactivating");
                let error = CallError::Panicked { grain: id.to_string(), method: method.into_owned(), message };
                Poll::Ready((TurnEnd::Panicked, Err(error)))
            }
        }
    }

    /// Whether the turn has ended (and given its grain back).
    pub(crate) fn has_ended(&self) -> bool {
        self.future.is_none()
    }
}

/// Waits until the silo holds its membership lease (at once, normally), at most until `deadline`. A silo
/// that lost its lease — frozen, or cut off from the membership table — runs no turn until it has confirmed
/// that it is still a member; if it was declared dead meanwhile, it stops and this returns false.
async fn hold_lease(cluster: &Cluster, deadline: Instant) -> bool {
    while !cluster.lease.is_valid() {
        if cluster.is_stopped() || Instant::now() >= deadline {
            return false;
        }
        cluster.refresh_now.notify_one();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The size of what `f` returns, without calling it.
    fn size_of_return<A, B, F>(_: fn(A, B) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    #[test]
    fn a_drain_task_stays_small() {
        // A drain is a task of its own, allocated for every burst of queued mail (and one per activation when
        // the idle collector or a shutdown passivates many at once), sized for its largest await: the large
        // futures it awaits (its first drain's registration and build, a burst's turns, the departure) are
        // boxed; this keeps them so. (With the turns inline it took 1032 bytes under the workspace's features.)
        let size = size_of_return(drain);
        assert!(size <= 512, "a drain's future takes {size} bytes");
    }
}
