//! Reminders: durable, periodic wake-ups of a grain, kept in the cluster's reminders table.
//!
//! A grain registers a reminder by name with [`GrainContext::register_reminder`]: first due after `due`, then
//! every `period` (at least [`MINIMUM_REMINDER_PERIOD`], one second; `due` may lie any distance ahead). The
//! reminder is stored, and fired by whichever silo owns the grain's range of the consistent-hash ring, which
//! activates the grain if need be: a reminder outlives activations, silos and restarts of the whole cluster,
//! until the grain unregisters it. Each tick reaches the grain as a call of its `on_reminder` hook (a
//! [`ReminderTick`]), through the normal call path, so it lands on the grain's one activation and runs as a
//! turn of its own.
//!
//! Delivery is **at least once per period** while the reminder is registered: a tick counts as delivered when
//! `on_reminder` returns `Ok`. Ticks that fell due while nobody could deliver them (the owning silo crashed,
//! the grain kept failing) are not replayed one by one: the next delivered tick says how many were missed
//! ([`ReminderTick::missed`]). A tick whose delivery fails is retried with backoff, and logged, never dropped.
//! Around a failure or a change of membership a tick may be delivered twice: make `on_reminder` idempotent, or
//! compare [`ReminderTick::due`] with the last one handled.
//!
//! ```
//! use std::time::Duration;
//! use grains::prelude::*;
//!
//! #[derive(Default, Serialize, Deserialize)]
//! pub struct InvoiceState { reminders_sent: u64 }
//!
//! #[grain]
//! pub struct Invoice {
//!     ctx: GrainContext,
//!     state: PersistentState<InvoiceState>,
//! }
//!
//! #[grain]
//! impl Invoice {
//!     /// Nags daily, starting in a week.
//!     pub async fn issue(&mut self) -> Result<(), String> {
//!         let day = Duration::from_secs(86_400);
//!         self.ctx.register_reminder("nag", 7 * day, day).await.map_err(|e| e.to_string())?;
//!         Ok(())
//!     }
//!
//!     /// Stops the nagging.
//!     pub async fn paid(&mut self) -> Result<(), String> {
//!         self.ctx.unregister_reminder("nag").await.map_err(|e| e.to_string())?;
//!         Ok(())
//!     }
//!
//!     async fn on_reminder(&mut self, tick: ReminderTick) -> Result<(), GrainError> {
//!         self.state.reminders_sent += 1 + tick.missed;
//!         self.state.write().await?;
//!         Ok(())
//!     }
//! }
//! ```

use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use crate::StorageError;
use crate::codec::{self, CodecError};
use crate::context::GrainContext;
use crate::grain::WireMessage;
use crate::id::GrainId;
use crate::runtime::BoxFuture;

/// The shortest period a reminder may have: one second.
pub const MINIMUM_REMINDER_PERIOD: Duration = Duration::from_secs(1);

/// The longest name a reminder may have, in bytes.
pub const MAXIMUM_REMINDER_NAME: usize = 256;

#[doc(hidden)]
/// The method name a reminder tick is delivered under: reserved (no Rust method can be called that), and served
/// only to calls from within the cluster.
pub const REMINDER_METHOD: &str = "$reminder";

/// One firing of a reminder, as `on_reminder` receives it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct ReminderTick {
    /// The reminder's name.
    pub name: String,
    /// When this tick was due (on the reminder's grid: its first due time plus a whole number of periods).
    pub due: SystemTime,
    /// The reminder's period.
    pub period: Duration,
    /// How many earlier ticks fell due without being delivered (after a crash of the silo that fired the
    /// reminder, or while the grain kept failing), and are reported by this one instead.
    pub missed: u64,
}

impl ReminderTick {
    /// A tick of reminder `name` due at `due`, reporting `missed` ticks before it.
    pub fn new(name: impl Into<String>, due: SystemTime, period: Duration, missed: u64) -> Self {
        Self { name: name.into(), due, period, missed }
    }
}

impl WireMessage for ReminderTick {
    fn encode_body(&self) -> Result<Vec<u8>, CodecError> {
        codec::encode(self)
    }
}

#[doc(hidden)]
/// What a grain's `on_reminder` answered to a tick (the reply of a [`REMINDER_METHOD`] call).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReminderAck(pub Result<(), String>);

impl WireMessage for ReminderAck {
    fn encode_body(&self) -> Result<Vec<u8>, CodecError> {
        codec::encode(self)
    }
}

/// A registered reminder, as listed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Reminder {
    /// Its name.
    pub name: String,
    /// Its first due time.
    pub first_due: SystemTime,
    /// Its period.
    pub period: Duration,
    /// When its next undelivered tick is due.
    pub next_due: SystemTime,
}

impl Reminder {
    /// A reminder named `name` with the given times.
    pub fn new(name: impl Into<String>, first_due: SystemTime, period: Duration, next_due: SystemTime) -> Self {
        Self { name: name.into(), first_due, period, next_due }
    }
}

/// Why a reminder operation failed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[non_exhaustive]
pub enum ReminderError {
    /// The period is below [`MINIMUM_REMINDER_PERIOD`].
    #[error("a reminder's period must be at least {minimum:?}, not {period:?}")]
    PeriodTooShort {
        /// The period asked for.
        period: Duration,
        /// The shortest allowed.
        minimum: Duration,
    },
    /// The first due time lies beyond what the table can hold (about 292 million years).
    #[error("a reminder's due time {due:?} from now is out of range")]
    DueOutOfRange {
        /// The delay asked for.
        due: Duration,
    },
    /// The name is empty or longer than [`MAXIMUM_REMINDER_NAME`] bytes.
    #[error("invalid reminder name {0:?}: 1 to 256 bytes")]
    InvalidName(String),
    /// The grain type has no `on_reminder` hook, so its reminders could never be delivered.
    #[error(
        "grain type `{grain_type}` has no `on_reminder`: add `async fn on_reminder(&mut self, tick: ReminderTick) -> Result<(), GrainError>` to its #[grain] impl"
    )]
    NotRemindable {
        /// The grain type.
        grain_type: String,
    },
    /// The reminders table failed (a silo whose membership lease has lapsed gets `Fenced`); nothing changed,
    /// or, for `Unavailable`, maybe did.
    #[error("reminders table: {0}")]
    Storage(#[from] StorageError),
    /// This context has no reminder service (it belongs to no silo activation).
    #[error("reminders are unavailable here: {0}")]
    Unavailable(String),
}

#[doc(hidden)]
/// The runtime's reminder service, as a grain context reaches it. Operations concern `grain`'s own reminders.
pub trait ReminderRegistry: Send + Sync {
    /// Registers (or replaces) reminder `name` of `grain`: first due after `due`, then every `period`.
    fn register(
        &self,
        grain: &GrainId,
        name: &str,
        due: Duration,
        period: Duration,
    ) -> BoxFuture<'static, Result<Reminder, ReminderError>>;

    /// Removes reminder `name` of `grain`; `Ok(false)` if it had none of that name.
    fn unregister(&self, grain: &GrainId, name: &str) -> BoxFuture<'static, Result<bool, ReminderError>>;

    /// Reminder `name` of `grain`, if registered.
    fn get(&self, grain: &GrainId, name: &str) -> BoxFuture<'static, Result<Option<Reminder>, ReminderError>>;

    /// Every reminder of `grain`, by name.
    fn list(&self, grain: &GrainId) -> BoxFuture<'static, Result<Vec<Reminder>, ReminderError>>;
}

impl GrainContext {
    fn reminder_registry(&self) -> Result<&std::sync::Arc<dyn ReminderRegistry>, ReminderError> {
        self.reminder_service().ok_or_else(|| ReminderError::Unavailable("this context belongs to no silo".to_owned()))
    }

    /// Registers reminder `name` of this grain, or replaces the one of that name: first due `due` from now,
    /// then every `period` (at least one second). Returns once it is stored. See the
    /// [module docs](crate::reminder); the grain type needs an `on_reminder` hook.
    pub async fn register_reminder(
        &self,
        name: &str,
        due: Duration,
        period: Duration,
    ) -> Result<Reminder, ReminderError> {
        self.reminder_registry()?.register(self.id(), name, due, period).await
    }

    /// Removes reminder `name` of this grain: no tick of it starts after this returns. `Ok(false)` if the grain
    /// had no reminder of that name.
    pub async fn unregister_reminder(&self, name: &str) -> Result<bool, ReminderError> {
        self.reminder_registry()?.unregister(self.id(), name).await
    }

    /// This grain's reminder `name`, with its next due time, if registered.
    pub async fn reminder(&self, name: &str) -> Result<Option<Reminder>, ReminderError> {
        self.reminder_registry()?.get(self.id(), name).await
    }

    /// This grain's reminders, by name.
    pub async fn reminders(&self) -> Result<Vec<Reminder>, ReminderError> {
        self.reminder_registry()?.list(self.id()).await
    }
}
