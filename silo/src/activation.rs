//! Activations: the in-memory instances of grains, one task each, running one call at a time.
//!
//! The activation table maps a [`GrainId`] to the mailbox of its activation. A call to a grain that is not in
//! the table claims the slot with the map's entry API and spawns the activation task in the same step, so
//! concurrent first calls all land in the one mailbox being built: a grain id has exactly one activation per
//! silo. The task first confirms with the grain's directory owner that it is the grain's one activation in the
//! cluster (a loser forwards its queued calls to the winner before loading anything), then builds the grain
//! (state loaded, `on_activate`) and drains its mailbox one call at a time: a turn runs to completion before
//! the next starts, and no lock is held across the grain's `.await`s.
//!
//! Leaving the table is the reverse: the task runs `on_deactivate` while new calls still queue in its mailbox,
//! then removes its entry (only if it is still its own), closes the mailbox, and hands every call still queued
//! back to the silo, which activates the grain afresh for them. A call never falls between two activations.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
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

/// An activation's queue of calls: a deque behind a lock, and a wake-up for the activation task.
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
    arrived: tokio::sync::Notify,
    /// The most calls it queues (`max_mailbox_length`); a call past it is answered `Overloaded` at once.
    limit: usize,
}

#[derive(Debug, Default)]
struct MailQueue {
    items: std::collections::VecDeque<Mail>,
    closed: bool,
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

    /// An empty mailbox that queues at most `limit` calls.
    pub(crate) fn with_limit(limit: usize) -> Self {
        Self {
            queue: std::sync::Mutex::default(),
            queued: AtomicUsize::new(0),
            arrived: tokio::sync::Notify::new(),
            limit,
        }
    }

    /// Queues `mail`, or hands it back if the mailbox is closed. A call that finds the mailbox full is
    /// answered [`CallError::Overloaded`] here (it counts as delivered: it must not be retried elsewhere).
    pub(crate) fn send(&self, mail: Mail) -> Result<(), Mail> {
        {
            let mut queue = self.lock();
            if queue.closed {
                return Err(mail);
            }
            if queue.items.len() >= self.limit
                && let Mail::Call(call) = mail
            {
                drop(queue);
                let full = format!("the grain's mailbox holds its limit of {} calls", self.limit);
                let _ = call.reply.send(Err(CallError::Overloaded(full)));
                return Ok(());
            }
            queue.items.push_back(mail);
            self.queued.store(queue.items.len(), Ordering::Release);
        }
        self.arrived.notify_one();
        Ok(())
    }

    /// The next mail, waiting for one; `None` once the mailbox is closed and empty.
    pub(crate) async fn recv(&self) -> Option<Mail> {
        loop {
            {
                let mut queue = self.lock();
                if let Some(mail) = queue.items.pop_front() {
                    self.queued.store(queue.items.len(), Ordering::Release);
                    return Some(mail);
                }
                if queue.closed {
                    return None;
                }
                // Drained: the buffer goes back before the task waits, so an idle activation holds none (warm
                // calls mostly run inline and never touch the mailbox).
                if queue.items.capacity() > 0 {
                    queue.items = std::collections::VecDeque::new();
                }
            }
            // A notification sent between the check above and this wait is kept as a permit: none is lost.
            self.arrived.notified().await;
        }
    }

    /// The next mail if one is queued.
    pub(crate) fn try_recv(&self) -> Option<Mail> {
        let mut queue = self.lock();
        let mail = queue.items.pop_front();
        self.queued.store(queue.items.len(), Ordering::Release);
        mail
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

/// What the activation task, the table, the idle collector and inline callers share.
#[derive(Debug)]
pub(crate) struct ActivationShared {
    /// The activation's queue of calls.
    pub(crate) mailbox: Mailbox,
    /// Milliseconds since the silo's clock origin at the end of the last turn.
    last_active_ms: AtomicU64,
    /// How long this activation may idle.
    pub(crate) idle_timeout: Duration,
    /// Set once the directory has confirmed this activation as the grain's one activation; cleared once it
    /// has run its last turn (it is leaving: unregistering, then out of the table).
    confirmed: std::sync::atomic::AtomicBool,
    /// Set when the directory finds this activation a duplicate: it runs no further turn.
    evicted: std::sync::atomic::AtomicBool,
    /// The grain once built, locked by whoever runs a turn: the activation task, or a caller running its call
    /// inline (`SiloInner::run_inline`). `None` before the grain is built and after it is gone.
    pub(crate) turn: Arc<tokio::sync::Mutex<Option<Built>>>,
}

/// The turn lock of an activation, held by a caller running its call inline.
pub(crate) type TurnGuard = tokio::sync::OwnedMutexGuard<Option<Built>>;

/// An idle activation claimed by a caller to run its call inline: the turn lock, and what the turn's end may
/// need (the idle stamp; the mailbox, to queue the activation's departure).
pub(crate) struct IdleClaim {
    pub(crate) shared: Arc<ActivationShared>,
    pub(crate) guard: TurnGuard,
}

/// A built grain and what its turns need, so that a caller running a turn inline needs nothing of the silo
/// (no reference count of it touched per call).
pub(crate) struct Built {
    /// The grain; out of here, inside its turn's future, while a turn runs (see [`Turn`]), and `None` for good
    /// once a turn has panicked.
    grain: Option<Box<dyn ErasedGrain>>,
    ctx: GrainContext,
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
            last_active_ms: AtomicU64::new(now_ms),
            idle_timeout,
            confirmed: std::sync::atomic::AtomicBool::new(false),
            evicted: std::sync::atomic::AtomicBool::new(false),
            turn: Arc::new(tokio::sync::Mutex::new(None)),
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
    /// Stops the activation's task where it stands (a shutdown past its grace period).
    pub(crate) task: tokio::task::AbortHandle,
}

/// Everything the activation task starts with.
pub(crate) struct ActivationStart<H> {
    pub(crate) host: Arc<H>,
    pub(crate) id: GrainId,
    pub(crate) activation_id: u64,
    pub(crate) grain_type: &'static GrainRegistration,
    pub(crate) registration: Registration,
    pub(crate) shared: Arc<ActivationShared>,
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
async fn activate<H>(start: &ActivationStart<H>, ctx: &GrainContext) -> Result<Box<dyn ErasedGrain>, CallError> {
    let build = async {
        let mut grain = (start.grain_type.build)(ctx.clone()).await?;
        grain.on_activate(ctx).await?;
        Ok::<_, GrainError>(grain)
    };
    let grain = start.id.to_string();
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
async fn confirm_registration<H: ActivationHost>(start: &mut ActivationStart<H>) -> bool {
    let host = &start.host;
    let deadline = tokio::time::Instant::now() + host.call_timeout();
    let outcome = host.cluster().register(&start.id, &start.registration, deadline).await;
    let error = match outcome {
        Ok(winner) if winner == start.registration => return true,
        Ok(winner) => {
            tracing::debug!(grain = %start.id, winner = %winner.silo, "lost the registration race; forwarding");
            host.activations().remove(&start.id, start.activation_id);
            start.shared.mailbox.close();
            host.cluster().remember(start.id.clone(), winner, host.cache_capacity());
            while let Some(mail) = start.shared.mailbox.try_recv() {
                if let Mail::Call(call) = mail {
                    host.redeliver(start.id.clone(), call);
                }
            }
            return false;
        }
        Err(error) => error,
    };
    tracing::warn!(grain = %start.id, %error, "activation not registered");
    host.activations().remove(&start.id, start.activation_id);
    start.shared.mailbox.close();
    while let Some(mail) = start.shared.mailbox.try_recv() {
        if let Mail::Call(call) = mail {
            let _ = call.reply.send(Err(error.clone()));
        }
    }
    false
}

/// The life of one activation, from build to the hand-back of its last queued calls.
pub(crate) async fn run<H: ActivationHost>(mut start: ActivationStart<H>) {
    let host = start.host.clone();
    // The rare, large futures are boxed so the task stays small while it idles on its mailbox.
    if !Box::pin(confirm_registration(&mut start)).await {
        return;
    }
    let id = &start.id;
    start.shared.confirmed.store(true, Ordering::Release);
    let timers = ActivationTimers::new(&start.shared);
    let ctx = host.context(id.clone(), timers.clone());

    let grain = match Box::pin(activate(&start, &ctx)).await {
        Ok(grain) => grain,
        Err(error) => {
            timers.end();
            tracing::warn!(grain = %id, %error, "activation failed");
            host.metrics().activation_failures.fetch_add(1, Ordering::Relaxed);
            Box::pin(host.cluster().unregister(id.clone(), start.registration.clone())).await;
            host.activations().remove(id, start.activation_id);
            start.shared.mailbox.close();
            while let Some(mail) = start.shared.mailbox.try_recv() {
                if let Mail::Call(call) = mail {
                    let _ = call.reply.send(Err(error.clone()));
                }
            }
            return;
        }
    };
    *start.shared.turn.lock().await = Some(Built {
        grain: Some(grain),
        ctx: ctx.clone(),
        stats: host.metrics().grain_type(start.grain_type.type_name).cloned(),
        clock: host.coarse_clock().clone(),
        #[cfg(feature = "otlp")]
        silo: host.cluster().me.clone(),
    });
    host.metrics().activations.fetch_add(1, Ordering::Relaxed);
    tracing::debug!(grain = %id, activation = start.activation_id, "activated");

    let mut panicked = false;
    // Boxed: rare, and an idle activation's task would otherwise carry its size.
    let mut unrun: Option<Box<Invocation>> = None;
    while let Some(mail) = start.shared.mailbox.recv().await {
        match mail {
            Mail::Call(call) => {
                // Taken first: a caller may be running a turn inline, and what follows is judged after it.
                let mut turn = start.shared.turn.lock().await;
                if call.reply.is_closed() {
                    continue; // the caller gave up (its deadline passed): do not run a call nobody waits for
                }
                if start.shared.is_evicted() || !Box::pin(hold_lease(host.cluster(), call.deadline)).await {
                    if start.shared.is_evicted() || host.cluster().is_stopped() {
                        unrun = Some(Box::new(call)); // handed on below, with the rest of the mailbox
                        break;
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
                    unrun = Some(Box::new(call));
                    break;
                };
                let Invocation { method, payload, chain, metadata, reply, .. } = call;
                let request = TurnCall { method, payload, chain, metadata, started };
                let (end, result) = run_call(id, built, request).await;
                start.shared.touch(host.now_ms());
                let _ = reply.send(result);
                match end {
                    TurnEnd::Ran => {}
                    TurnEnd::Panicked => {
                        *turn = None;
                        panicked = true;
                        break;
                    }
                    TurnEnd::Deactivate => break,
                }
            }
            Mail::Deactivate { force } => {
                if force || start.shared.is_idle(host.now_ms()) {
                    break;
                }
            }
            Mail::Timer(tick) => {
                if start.shared.is_evicted() || host.cluster().is_stopped() {
                    break;
                }
                if !host.cluster().lease.is_valid() {
                    host.cluster().refresh_now.notify_one();
                    continue; // not sure it is still a member: no turn runs, and the timer ticks on
                }
                // Boxed: rarer than calls, its future would otherwise size every idle activation's task.
                match Box::pin(run_timer(&*host, id, &start.shared, &timers, tick)).await {
                    TimerEnd::Ran if ctx.deactivation_requested() => break,
                    TimerEnd::Ran => {}
                    TimerEnd::GrainGone => break,
                    TimerEnd::Panicked => {
                        panicked = true;
                        break;
                    }
                }
            }
        }
    }
    // Timers end with the activation: no tick runs from here on.
    timers.end();

    // A grain that panicked may hold broken state, and a duplicate's state is not the grain's: they are
    // dropped without their on_deactivate hook.
    let evicted = start.shared.is_evicted() || host.cluster().is_stopped();
    // Taking the grain out ends inline turns too: a caller finding `None` queues its call instead.
    let built = start.shared.turn.lock().await.take();
    if let Some(mut grain) = built.and_then(|built| built.grain).filter(|_| !panicked && !evicted) {
        match Box::pin(AssertUnwindSafe(grain.on_deactivate(&ctx)).catch_unwind()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(grain = %id, error = %e, "on_deactivate failed"),
            Err(panic) => tracing::warn!(grain = %id, message = %panic_message(&*panic), "on_deactivate panicked"),
        }
    }
    // No turn runs from here on: the activation no longer counts as this grain's (its unregistration may wait
    // on a remote directory, and the grain may be activated elsewhere as soon as it lands).
    start.shared.confirmed.store(false, Ordering::Release);
    Box::pin(host.cluster().unregister(id.clone(), start.registration.clone())).await;
    host.activations().remove(id, start.activation_id);
    start.shared.mailbox.close();
    host.metrics().deactivations.fetch_add(1, Ordering::Relaxed);
    tracing::debug!(grain = %id, activation = start.activation_id, evicted, "deactivated");
    if let Some(call) = unrun {
        host.redeliver(id.clone(), *call);
    }
    while let Some(mail) = start.shared.mailbox.try_recv() {
        if let Mail::Call(call) = mail {
            host.redeliver(id.clone(), call);
        }
    }
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
async fn run_timer<H: ActivationHost>(
    host: &H,
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
    pub(crate) method: std::borrow::Cow<'static, str>,
    pub(crate) payload: Payload,
    pub(crate) chain: CallChain,
    pub(crate) metadata: RequestMetadata,
    /// When the turn started (its latency is measured from here).
    pub(crate) started: Instant,
}

/// Runs `call` as one turn of `built`, on whichever task holds its turn lock; the caller has checked the
/// lease, eviction and the deadline. Returns how the turn ended and the call's answer.
pub(crate) async fn run_call(id: &GrainId, built: &mut Built, call: TurnCall) -> (TurnEnd, Result<Payload, CallError>) {
    let mut turn = Turn::start(id, built, call);
    std::future::poll_fn(|cx| turn.poll_end(cx, id, built)).await
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
    pub(crate) fn start(id: &GrainId, built: &mut Built, call: TurnCall) -> Turn {
        let TurnCall { method, payload, chain, metadata, started } = call;
        let span = tracing::debug_span!("grain.turn", grain = %id, method = %method);
        #[cfg(feature = "otlp")]
        let (metadata, trace) = crate::otlp::start(
            || format!("{}.{}", id.grain_type(), method),
            crate::otlp::Kind::Server,
            metadata,
            || vec![("grains.grain", id.to_string()), ("grains.silo", built.silo.to_string())],
        );
        let scope = TurnScope { chain, grain: id.clone(), metadata, span };
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
        id: &GrainId,
        built: &mut Built,
    ) -> Poll<(TurnEnd, Result<Payload, CallError>)> {
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
    fn size_of_return<A, F>(_: fn(A) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    #[test]
    fn an_idle_activation_task_stays_small() {
        // Tokio keeps a task's whole future for as long as the task lives, sized for its largest await: a
        // large future awaited inline on a rare path (unregistering, say, at 3.9 KiB) costs every idle
        // activation its size. Those are boxed; this keeps it so.
        let size = size_of_return(run::<crate::silo::SiloInner>);
        // Under 1 KiB, its task's allocation stays within what the allocator serves from its fast per-thread
        // cache (glibc's tcache: up to 1032 bytes) on most builds.
        assert!(size <= 1024, "the activation task's future takes {size} bytes");
    }
}
