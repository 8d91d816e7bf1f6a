//! Grain timers on the silo side: each activation's timers, ticking into its mailbox.
//!
//! A timer is a task that sleeps until the tick is due, puts a [`TimerTick`] into the activation's mailbox and
//! waits for that tick's turn to end before it sleeps a period: ticks are turns like calls (never overlapping
//! one), and they never pile up behind a slow turn. The callbacks live here, keyed by timer id; the activation
//! takes one out for the tick's turn and puts it back after. When the activation ends, [`ActivationTimers::end`]
//! stops every ticker, and ticks still queued are dropped with the rest of the mailbox.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use grains::timer::{TimerCallback, TimerError, TimerHost};
use tokio::sync::oneshot;
use tokio::task::AbortHandle;

use crate::activation::{ActivationShared, Mail};
use crate::maps::FastHashMap;

/// A timer's tick, waiting in the mailbox. Dropping it (its turn ran, or it never will) lets the ticker go on.
#[derive(Debug)]
pub(crate) struct TimerTick {
    /// Which timer.
    pub(crate) timer: u64,
    /// Dropped when the tick's turn has ended.
    _ran: oneshot::Sender<()>,
}

/// One timer of an activation.
struct Slot {
    /// `None` while the callback runs in a turn.
    callback: Option<TimerCallback>,
    /// Whether its ticks count as activity.
    keep_alive: bool,
    /// A one-shot timer is gone after its tick.
    periodic: bool,
    ticker: AbortHandle,
}

/// The timers of one activation.
pub(crate) struct ActivationTimers {
    activation: Weak<ActivationShared>,
    slots: Mutex<FastHashMap<u64, Slot>>,
    next_id: AtomicU64,
    ended: AtomicBool,
}

impl std::fmt::Debug for ActivationTimers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ActivationTimers").field("timers", &self.lock().len()).finish_non_exhaustive()
    }
}

impl ActivationTimers {
    /// The timers of the activation `shared` belongs to (none yet).
    pub(crate) fn new(shared: &Arc<ActivationShared>) -> Arc<Self> {
        Arc::new(Self {
            activation: Arc::downgrade(shared),
            slots: Mutex::default(),
            next_id: AtomicU64::new(1),
            ended: AtomicBool::new(false),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, FastHashMap<u64, Slot>> {
        self.slots.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The callback of `timer` for its tick's turn, and whether the tick counts as activity; `None` when the
    /// timer was cancelled (its tick was queued before).
    pub(crate) fn take(&self, timer: u64) -> Option<(TimerCallback, bool)> {
        let mut slots = self.lock();
        let slot = slots.get_mut(&timer)?;
        let callback = slot.callback.take()?;
        Some((callback, slot.keep_alive))
    }

    /// Returns `timer`'s callback after its turn: a periodic timer keeps it for its next tick; a one-shot timer,
    /// or one cancelled during the turn, is gone.
    pub(crate) fn put_back(&self, timer: u64, callback: TimerCallback) {
        let mut slots = self.lock();
        match slots.get_mut(&timer) {
            Some(slot) if slot.periodic => slot.callback = Some(callback),
            Some(_) => {
                slots.remove(&timer);
            }
            None => {}
        }
    }

    /// Stops every timer for good: the activation is ending.
    pub(crate) fn end(&self) {
        self.ended.store(true, Ordering::Release);
        for (_, slot) in self.lock().drain() {
            slot.ticker.abort();
        }
    }
}

impl TimerHost for ActivationTimers {
    fn start(&self, due: Duration, period: Option<Duration>, callback: TimerCallback) -> Result<u64, TimerError> {
        if period == Some(Duration::ZERO) {
            return Err(TimerError::ZeroPeriod);
        }
        let mut slots = self.lock();
        // Checked under the lock `end` drains: no timer starts after the activation's timers have ended.
        if self.ended.load(Ordering::Acquire) || self.activation.upgrade().is_none_or(|a| a.mailbox.is_closed()) {
            return Err(TimerError::ActivationEnded);
        }
        let timer = self.next_id.fetch_add(1, Ordering::Relaxed);
        let ticker = tokio::spawn(tick(self.activation.clone(), timer, due, period)).abort_handle();
        slots.insert(timer, Slot { callback: Some(callback), keep_alive: false, periodic: period.is_some(), ticker });
        Ok(timer)
    }

    fn cancel(&self, timer: u64) -> bool {
        match self.lock().remove(&timer) {
            Some(slot) => {
                slot.ticker.abort();
                true
            }
            None => false,
        }
    }

    fn set_keep_alive(&self, timer: u64, keep_alive: bool) {
        if let Some(slot) = self.lock().get_mut(&timer) {
            slot.keep_alive = keep_alive;
        }
    }
}

/// The ticker of one timer: after `due`, a tick into the mailbox; then, once that tick's turn has ended, every
/// `period`. Ends when the mailbox closes (the activation ended), or after one tick without a period.
async fn tick(activation: Weak<ActivationShared>, timer: u64, due: Duration, period: Option<Duration>) {
    tokio::time::sleep(due).await;
    loop {
        let (ran, turn_ended) = oneshot::channel();
        let Some(live) = activation.upgrade() else { return };
        if live.send(Mail::Timer(TimerTick { timer, _ran: ran })).is_err() {
            return;
        }
        drop(live);
        let _ = turn_ended.await; // the turn ran, or the tick was dropped unrun
        let Some(period) = period else { return };
        tokio::time::sleep(period).await;
    }
}
