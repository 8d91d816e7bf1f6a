//! Timers: a grain's own periodic callbacks, run as turns of its activation.
//!
//! [`GrainContext::register_timer`] schedules a callback that receives the grain (`&mut G`), first after
//! `due`, then every `period` after the previous tick's turn has ended. Each tick enters the activation's
//! mailbox like a call, so a timer turn never overlaps a method's turn (or another timer's), and the callback
//! needs no locks. A tick waits behind the calls queued before it; ticks do not pile up behind a slow turn,
//! since the next one is scheduled only when the last has run.
//!
//! Timers belong to one activation: they are not stored anywhere, and they end when it ends (passivation,
//! a panic, the silo stopping). Re-create them in `on_activate` if the grain always wants them. A timer tick
//! does not count as activity: a grain whose only work is its timers still passivates after its idle timeout,
//! unless the timer is told to keep it alive ([`TimerHandle::keep_grain_alive`]). For work that must happen
//! whether or not the grain is active, and survive crashes, use a reminder
//! ([`GrainContext::register_reminder`]).
//!
//! ```
//! use std::time::Duration;
//! use grains::prelude::*;
//!
//! #[grain]
//! pub struct Sensor {
//!     ctx: GrainContext,
//!     readings: u64,
//! }
//!
//! #[grain]
//! impl Sensor {
//!     /// Starts polling every second.
//!     pub async fn start(&mut self) -> Result<(), String> {
//!         let every = Duration::from_secs(1);
//!         self.ctx
//!             .register_timer(every, Some(every), |sensor: &mut Sensor| Box::pin(sensor.poll()))
//!             .map_err(|e| e.to_string())?;
//!         Ok(())
//!     }
//!
//!     async fn poll(&mut self) {
//!         self.readings += 1;
//!     }
//! }
//! ```

use std::any::Any;
use std::sync::{Arc, Weak};
use std::time::Duration;

use crate::context::GrainContext;
use crate::grain::GrainType;
use crate::runtime::BoxFuture;

#[doc(hidden)]
/// A timer callback with the grain's type erased: it receives the activation's grain as `&mut dyn Any`.
pub type TimerCallback = Box<dyn for<'a> FnMut(&'a mut dyn Any) -> BoxFuture<'a, ()> + Send>;

/// Why a timer could not be registered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TimerError {
    /// The context belongs to no activation that runs timers.
    #[error("this grain context has no activation to run timers in")]
    NoActivation,
    /// The activation has ended (or is ending): it runs no more turns.
    #[error("the activation has ended; its timers have stopped")]
    ActivationEnded,
    /// A periodic timer needs a period above zero.
    #[error("a timer's period must be above zero")]
    ZeroPeriod,
    /// The callback takes another grain type than the activation's.
    #[error("the timer callback takes a `{expected}` grain, but this activation is a `{actual}`")]
    WrongGrainType {
        /// The grain type the callback was written for.
        expected: &'static str,
        /// The activation's grain type.
        actual: String,
    },
}

#[doc(hidden)]
/// The activation's side of timers, implemented by the runtime that hosts the grain.
pub trait TimerHost: Send + Sync {
    /// Starts a timer: its ticks run `callback` as turns of this activation, first after `due`, then every
    /// `period` after the previous tick's turn (once, when `period` is `None`). Returns the timer's id.
    fn start(&self, due: Duration, period: Option<Duration>, callback: TimerCallback) -> Result<u64, TimerError>;

    /// Stops timer `timer`; a tick already queued does not run. Returns whether it was running.
    fn cancel(&self, timer: u64) -> bool;

    /// Whether timer `timer`'s ticks count as activity that keeps the grain from passivating.
    fn set_keep_alive(&self, timer: u64, keep_alive: bool);
}

/// A running timer. Dropping the handle does not stop the timer; [`cancel`](Self::cancel) does, and so does
/// the end of the activation.
pub struct TimerHandle {
    id: u64,
    host: Weak<dyn TimerHost>,
}

impl std::fmt::Debug for TimerHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TimerHandle").field("id", &self.id).finish_non_exhaustive()
    }
}

impl TimerHandle {
    /// The timer's id within its activation.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Stops the timer: no further tick runs, including one already queued. Returns whether it was running.
    pub fn cancel(&self) -> bool {
        self.host.upgrade().is_some_and(|host| host.cancel(self.id))
    }

    /// Makes the timer's ticks count as activity (`true`): the grain is not passivated while the timer runs.
    /// By default (`false`) a grain whose only work is its timers passivates after its idle timeout.
    pub fn keep_grain_alive(&self, keep_alive: bool) {
        if let Some(host) = self.host.upgrade() {
            host.set_keep_alive(self.id, keep_alive);
        }
    }
}

/// Gives a closure the higher-ranked signature of a [`TimerCallback`] (closure signatures are not inferred
/// through `Box::new`).
fn erased(callback: impl for<'a> FnMut(&'a mut dyn Any) -> BoxFuture<'a, ()> + Send + 'static) -> TimerCallback {
    Box::new(callback)
}

impl GrainContext {
    /// Runs `callback` on this grain as a turn of its activation after `due`, then every `period` after the
    /// previous tick's turn ended (or once, if `period` is `None`). See the [module docs](crate::timer).
    ///
    /// The callback gets the grain and returns its turn as a boxed future:
    /// `|cart: &mut Cart| Box::pin(cart.expire())`. It runs with no caller: calls it makes carry this grain
    /// in their chain, and no request metadata.
    pub fn register_timer<G, F>(
        &self,
        due: Duration,
        period: Option<Duration>,
        mut callback: F,
    ) -> Result<TimerHandle, TimerError>
    where
        G: GrainType,
        F: for<'a> FnMut(&'a mut G) -> BoxFuture<'a, ()> + Send + 'static,
    {
        if period == Some(Duration::ZERO) {
            return Err(TimerError::ZeroPeriod);
        }
        if self.id().grain_type() != G::TYPE_NAME {
            return Err(TimerError::WrongGrainType {
                expected: G::TYPE_NAME,
                actual: self.id().grain_type().to_owned(),
            });
        }
        let host = self.timer_host().ok_or(TimerError::NoActivation)?;
        let grain_type = G::TYPE_NAME;
        let callback = erased(move |grain: &mut dyn Any| match grain.downcast_mut::<G>() {
            Some(grain) => callback(grain),
            None => Box::pin(async move {
                tracing::error!(grain_type, "a timer tick reached an activation of another grain type; skipped");
            }),
        });
        let id = host.start(due, period, callback)?;
        Ok(TimerHandle { id, host: Arc::downgrade(host) })
    }
}
