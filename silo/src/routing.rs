//! Routing: how a call finds its grain's one activation.
//!
//! Every call, from a grain, a client or a peer, goes one way: if the grain has an activation here, the call
//! goes into its mailbox (no lookup, no encoding). Otherwise [`SiloInner::route`] asks the cluster where the
//! grain lives — the routing cache, else the grain's directory owner, which places the grain if it lives
//! nowhere — and either activates it here or sends the call to the silo that holds it. A call that meets a
//! moving grain ("not here", "shutting down", an unreachable owner) is routed again, within its deadline.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use grains::__private::runtime::{BoxFuture, Call, Invoked, Payload, run_outside_turn};
use grains::{CallError, GrainId};
use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::activation::{
    self, ActivationHandle, ActivationShared, Drain, Drainer, IdleClaim, Invocation, Life, Mail, Turn, TurnCall,
    TurnEnd, TurnGuard,
};
use crate::cluster::{Backoff, Registration};
use crate::silo::SiloInner;
use crate::wire::{Envelope, Mode, WireGrainId};

/// How many "not here" answers a call follows before it gives up (bounded forwarding).
const MAX_NOT_HERE: usize = 8;

/// Waits for the reply of a call queued at an activation, at most until `deadline`, running `beside` (the
/// call's routing, or the drain its delivery started) meanwhile.
pub(crate) fn wait_reply(
    waiter: oneshot::Receiver<Result<Payload, CallError>>,
    deadline: Instant,
    beside: Beside,
) -> impl std::future::Future<Output = Result<Payload, CallError>> {
    let timeout = deadline.saturating_duration_since(Instant::now());
    async move {
        let (mut beside, mut waiter) = (beside, waiter);
        let reply = std::future::poll_fn(|cx| {
            if beside.is_running() {
                // The work beside may answer this very call (a route run here ends by sending its reply, a
                // drain by running its turn). Its send must not wake this task while it runs: tokio reschedules
                // a task woken during its own poll as if it had yielded, and wakes a parked worker to steal it.
                // So the waiter waits on a waker that does nothing while `beside` runs, and on this task's
                // once it has.
                if let Poll::Ready(reply) = Pin::new(&mut waiter).poll(&mut Context::from_waker(Waker::noop())) {
                    return Poll::Ready(reply);
                }
                beside.poll(cx);
            }
            Pin::new(&mut waiter).poll(cx)
        });
        // Whatever of `beside` is left when this returns goes on on a task of its own (see `Beside`'s `Drop`).
        match tokio::time::timeout_at(deadline, reply).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(CallError::Unavailable("the activation ended without replying".to_owned())),
            Err(_) => Err(CallError::Timeout(timeout)),
        }
    }
}

/// Work a caller does for its own call while it waits for the reply, on its own task: routing the call (a
/// directory lookup, perhaps a call to another silo), and building and serving the activation its delivery
/// found idle. A cold call then costs no task and no wake-up besides its caller's.
///
/// - It runs outside any grain's turn, even when its caller is one: calls made by an `on_activate` it runs
///   carry no chain or metadata of the caller's, as on a task of its own.
/// - It is never cut short, and a caller never waits for other callers' turns: what is left of it when the
///   reply comes (a drain serving calls queued behind this one), or when its caller stops waiting (a timeout,
///   a `select!`), goes on on a task of its own.
pub(crate) struct Beside(Option<BoxFuture<'static, ()>>);

impl Beside {
    /// Nothing to do besides waiting.
    pub(crate) fn nothing() -> Self {
        Self(None)
    }

    /// `work`, run beside the wait.
    pub(crate) fn work(work: impl Future<Output = ()> + Send + 'static) -> Self {
        Self(Some(Box::pin(run_outside_turn(work))))
    }

    /// The drain a delivery started, if any.
    pub(crate) fn drain(drain: Option<Drain>) -> Self {
        drain.map_or_else(Self::nothing, |drain| Self::work(drain.run()))
    }

    /// Whether there is work left.
    fn is_running(&self) -> bool {
        self.0.is_some()
    }

    fn poll(&mut self, cx: &mut Context<'_>) {
        if let Some(work) = self.0.as_mut()
            && work.as_mut().poll(cx).is_ready()
        {
            self.0 = None;
        }
    }
}

impl Drop for Beside {
    fn drop(&mut self) {
        // Outside a runtime (the runtime itself shutting down) the work cannot go on; it goes with the runtime.
        if let Some(work) = self.0.take()
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            runtime.spawn(work);
        }
    }
}

/// Runs the drain a route's delivery started, if any: a route has nothing else to do (its caller waits on the
/// reply channel, running the route beside it), so a cold activation needs no task of its own. Boxed: a route
/// future stays small.
async fn run_drain(drain: Option<Drain>) {
    if let Some(drain) = drain {
        Box::pin(drain.run()).await;
    }
}

/// A turn run on its caller's task, holding the activation's turn lock until it ends. Dropped before its end
/// (its caller timed out or went away), it goes on to its end on a task of its own.
struct InlineTurn {
    state: Option<InlineState>,
    /// Already on a task of its own: if that task is dropped unfinished too (its runtime is shutting down), the
    /// turn ends there, with the runtime, instead of being handed on again.
    detached: bool,
}

struct InlineState {
    turn: Turn,
    guard: TurnGuard,
}

impl InlineTurn {
    /// Starts `call` as a turn of the claimed activation (nothing runs until it is polled).
    fn start(IdleClaim { mut guard }: IdleClaim, call: Call, started: Instant) -> Self {
        let Call { target: grain, method, payload, chain, metadata, .. } = call;
        let Some(built) = guard.as_mut() else { unreachable!("claimed with its grain built") };
        let turn = Turn::start(built, TurnCall { grain, method, payload, chain, metadata, started });
        Self { state: Some(InlineState { turn, guard }), detached: false }
    }
}

impl Future for InlineTurn {
    type Output = Result<Payload, CallError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let Some(state) = self.state.as_mut() else { panic!("an inline turn polled after its end") };
        let Some(built) = state.guard.as_mut() else { unreachable!("the turn lock holds the built grain") };
        let (end, result) = std::task::ready!(state.turn.poll_end(cx, built));
        built.touch();
        let InlineState { mut guard, .. } = self.state.take().expect("checked above");
        if !matches!(end, TurnEnd::Ran) {
            let shared = guard.as_ref().and_then(activation::Built::activation);
            if matches!(end, TurnEnd::Panicked) {
                *guard = None; // dropped without on_deactivate; its drainer makes the activation leave next
            }
            drop(guard);
            if let Some(shared) = shared {
                let _ = shared.send(Mail::Deactivate { force: true });
            }
        }
        Poll::Ready(result)
    }
}

impl Drop for InlineTurn {
    fn drop(&mut self) {
        let Some(state) = self.state.take() else { return };
        if state.turn.has_ended() || self.detached {
            return;
        }
        // Its caller stopped waiting mid-turn: the turn still runs to its end, its answer unread. Outside a
        // runtime (the runtime itself shutting down) it cannot, and the activation goes with the runtime.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(InlineTurn { state: Some(state), detached: true });
        }
    }
}

impl SiloInner {
    /// Puts the call in the mailbox of `id`'s activation if it has one here; else hands the call back. A drain
    /// the call starts is run by `drainer`.
    pub(crate) fn try_local(
        &self,
        id: &GrainId,
        invocation: Invocation,
        drainer: Drainer,
    ) -> Result<Option<Drain>, Invocation> {
        let drain = self.table.send(id, invocation, drainer)?;
        self.metrics.calls.increment();
        Ok(drain)
    }

    /// Runs `call` on the caller's task, at its grain's activation here, idle and claimed with
    /// [`ActivationTable::claim_idle`](crate::activation_table::ActivationTable::claim_idle): no mailbox, no
    /// drainer started, no reply channel. The turn holds the activation's turn lock, so it is
    /// still the only turn of the grain running; calls arriving meanwhile queue in the mailbox and run after it.
    ///
    /// The turn is polled once at once: most finish there, and their answer is ready before `invoke` returns
    /// (no future is boxed, no timer armed). A turn outliving the call's deadline, or whose caller stops
    /// waiting, is finished on a task of its own (a turn is never cut short) while the caller gets its timeout.
    pub(crate) fn run_inline(&self, claim: IdleClaim, call: Call, encoded: bool) -> Invoked {
        // The call was made a moment ago (see `admit`): its clock reading is the turn's start.
        let started = call.issued;
        let deadline = call.deadline;
        if started >= deadline {
            return Invoked::ready(Err(CallError::Timeout(Duration::ZERO)));
        }
        self.metrics.calls.increment();
        let mut turn = InlineTurn::start(claim, call, started);
        let answer = move |result: Result<Payload, CallError>| {
            if encoded { Ok(Payload::Encoded(result?.into_bytes()?)) } else { result }
        };
        // A waker that does nothing: if the turn is not done, the future below polls it again with its own.
        if let Poll::Ready(result) = Pin::new(&mut turn).poll(&mut Context::from_waker(Waker::noop())) {
            return Invoked::ready(answer(result));
        }
        Invoked::pending(async move {
            match tokio::time::timeout_at(deadline, &mut turn).await {
                Ok(result) => answer(result),
                // Dropping the turn hands it to a task of its own.
                Err(_) => Err(CallError::Timeout(deadline.saturating_duration_since(started))),
            }
        })
    }

    /// Delivers the call here, activating the grain if it has no activation here. A drain the call starts is
    /// run by `drainer`.
    pub(crate) fn deliver_here(
        &self,
        id: &GrainId,
        invocation: Invocation,
        drainer: Drainer,
    ) -> Result<Option<Drain>, Invocation> {
        let drain = self.table.send_or_activate(id, invocation, drainer, || self.new_activation(id))?;
        self.metrics.calls.increment();
        Ok(drain)
    }

    /// Creates the activation of `id`, idle until the call about to be put in its mailbox starts its first
    /// drain; the table inserts the returned handle.
    ///
    /// Every activation registers under a fresh id, never one an earlier activation used: the late unregister
    /// of an activation that just ended must not remove the entry of the one that follows it.
    fn new_activation(&self, id: &GrainId) -> ActivationHandle {
        let registration = Registration { silo: self.me().clone(), id: crate::cluster::placement::registration_id() };
        let (grain_type, idle_timeout) = match self.types.get(id.grain_type()) {
            Some(&entry) => entry,
            None => unreachable!("calls are checked for their grain type first"),
        };
        let activation_id = self.table.next_activation_id();
        let life = Life::new(self.arc(), id.clone(), activation_id, grain_type, registration.clone());
        let mailbox = activation::Mailbox::new(self.config.max_mailbox_length, life);
        let shared = Arc::new(ActivationShared::new(mailbox, self.now_ms(), idle_timeout));
        ActivationHandle { activation_id, shared, registration }
    }

    /// Finds where `id` lives and delivers the call there; answers the caller through `invocation.reply`.
    pub(crate) async fn route(self: Arc<Self>, id: GrainId, invocation: Invocation) {
        let mut invocation = invocation;
        let mut backoff = Backoff::new(Duration::from_millis(500));
        let mut not_here = 0;
        let deadline = invocation.deadline;
        let fail = |invocation: Invocation, error: CallError| {
            let _ = invocation.reply.send(Err(error));
        };
        loop {
            if self.is_shutting_down() {
                return fail(invocation, CallError::ShuttingDown);
            }
            if Instant::now() >= deadline {
                return fail(invocation, CallError::Timeout(Duration::ZERO));
            }
            invocation = match self.try_local(&id, invocation, Drainer::Sender) {
                Ok(drain) => return run_drain(drain).await,
                Err(back) => back,
            };
            if self.cluster.view().version == 0 {
                // Still joining: the first membership view is moments away; placing now could duplicate.
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
            let cached = self.cluster.cache.get(&id).map(|r| r.clone());
            let (registration, mode) = match cached {
                Some(registration) => (registration, Mode::Cached),
                // Cold and large (a directory round trip): boxed, so a route's future stays small.
                None => match Box::pin(self.cluster.locate(&id, self.placement(&id), deadline)).await {
                    Ok(registration) => {
                        // Local activations are found through the table; only remote locations are cached.
                        if &registration.silo != self.me() {
                            self.cluster.remember(id.clone(), registration.clone(), self.config.directory_cache_size);
                        }
                        (registration, Mode::Placed)
                    }
                    Err(CallError::Unavailable(reason)) => {
                        // The directory owner is unreachable (it may be dying): nothing was placed by this
                        // attempt that a retry could duplicate, so wait for membership to catch up.
                        tracing::debug!(grain = %id, %reason, "directory owner unreachable; retrying");
                        backoff.wait(deadline).await;
                        continue;
                    }
                    Err(error) => return fail(invocation, error),
                },
            };
            if &registration.silo == self.me() {
                if mode == Mode::Cached {
                    self.cluster.cache.remove(&id); // cached here, but no activation: ask the directory
                    continue;
                }
                invocation = match self.deliver_here(&id, invocation, Drainer::Sender) {
                    Ok(drain) => return run_drain(drain).await,
                    Err(back) => back,
                };
                continue;
            }
            // Remote: encode once; a later local delivery takes the encoded form as well.
            let payload = match std::mem::replace(&mut invocation.payload, Payload::Encoded(Bytes::new())).into_bytes()
            {
                Ok(bytes) => bytes,
                Err(e) => return fail(invocation, e.into()),
            };
            invocation.payload = Payload::Encoded(payload.clone());
            let conn = match self.cluster.peer(&registration.silo).await {
                Ok(conn) => conn,
                Err(error) => {
                    // Nothing was sent: safe to try again once membership or the directory has moved on.
                    tracing::debug!(grain = %id, silo = %registration.silo, %error, "peer unreachable; retrying");
                    self.cluster.cache.remove(&id);
                    backoff.wait(deadline).await;
                    continue;
                }
            };
            let mut envelope = Envelope {
                target: Some(WireGrainId::from(&id)),
                method: invocation.method.to_string(),
                payload,
                call_chain: invocation.chain.iter().map(WireGrainId::from).collect(),
                mode: mode as i32,
                registration: registration.id,
                metadata: invocation.metadata.to_map(),
                ..Default::default()
            };
            // `call_located`, not its wrapper `call`: the envelope stays here, lent to the call (1312 bytes in
            // all, where holding it in the call's future as well took 1584).
            match conn.call_located(&mut envelope, deadline).await {
                Ok(reply) => {
                    let _ = invocation.reply.send(Ok(Payload::Encoded(reply.payload)));
                    return;
                }
                Err(CallError::NotHere(reason)) => {
                    self.cluster.cache.remove(&id);
                    not_here += 1;
                    if not_here >= MAX_NOT_HERE {
                        return fail(invocation, CallError::NotHere(reason));
                    }
                }
                Err(CallError::ShuttingDown) => {
                    // Refused before running: the grain is moving; route again shortly.
                    self.cluster.cache.remove(&id);
                    backoff.wait(deadline).await;
                }
                Err(error) => {
                    if matches!(error, CallError::Unavailable(_)) {
                        self.cluster.cache.remove(&id);
                    }
                    return fail(invocation, error);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn size_of_return<A, B, C, F>(_: fn(A, B, C) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    /// A waker that counts its wakes.
    struct CountingWaker(std::sync::atomic::AtomicUsize);

    impl std::task::Wake for CountingWaker {
        fn wake(self: Arc<Self>) {
            self.wake_by_ref();
        }

        fn wake_by_ref(self: &Arc<Self>) {
            self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }

    #[tokio::test]
    async fn work_beside_a_wait_that_answers_it_does_not_wake_the_waiting_task() {
        // A route run beside its caller's wait ends by sending the reply: a wake of the caller's own task while
        // it runs makes tokio reschedule it as a yield and wake a parked worker, once per call.
        let (reply, waiter) = oneshot::channel();
        let (go, gate) = oneshot::channel::<()>();
        let beside = Beside::work(async move {
            let _ = gate.await;
            let _ = reply.send(Ok(Payload::Encoded(Bytes::from_static(b"done"))));
        });
        let mut wait = std::pin::pin!(wait_reply(waiter, Instant::now() + Duration::from_secs(5), beside));
        let counter = Arc::new(CountingWaker(std::sync::atomic::AtomicUsize::new(0)));
        let waker = Waker::from(counter.clone());
        let mut cx = Context::from_waker(&waker);
        assert!(wait.as_mut().poll(&mut cx).is_pending(), "the work beside waits for its gate");
        go.send(()).expect("the gate is awaited");
        let woken_by_gate = counter.0.load(std::sync::atomic::Ordering::Relaxed);
        assert_eq!(woken_by_gate, 1, "the gate wakes the waiting task");
        match wait.as_mut().poll(&mut cx) {
            Poll::Ready(Ok(Payload::Encoded(body))) => assert_eq!(&body[..], b"done"),
            other => panic!("the reply sent beside is the call's: {:?}", other.map(|r| r.map(|_| ()))),
        }
        let woken = counter.0.load(std::sync::atomic::Ordering::Relaxed) - woken_by_gate;
        assert_eq!(woken, 0, "the reply sent during the task's own poll woke it {woken} time(s)");
    }

    #[test]
    fn a_route_stays_small() {
        // Every first call to a grain not active here routes: its caller boxes the route's future, sized for its
        // largest await, beside its wait, so it is allocated and freed once per activation.
        let size = size_of_return(SiloInner::route);
        assert!(size <= 1536, "a route's future takes {size} bytes");
    }
}
