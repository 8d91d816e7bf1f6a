//! A cart that empties itself once abandoned: a durable reminder.
//!
//! The cart arms one reminder, `abandoned`, when it gets its first item, and checks on each tick how long it
//! has been left alone: after `abandon_after` without a change it empties itself and disarms the reminder. The
//! reminder is stored with the cluster's reminders (not in memory), so this works though the cart passivates
//! after five idle minutes, and though the silo it lived on crashes: the silo owning the cart's ring range
//! activates it again for the tick.
//!
//! The reminder is registered once, not re-armed on every change (which would cost a write to the reminders
//! table per `add`): it ticks every quarter of `abandon_after` (at least every second), so a cart is emptied
//! between `abandon_after` and a quarter more after its last change.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use grains::prelude::*;

/// How long a cart may sit unchanged before it is emptied, unless set otherwise.
pub const DEFAULT_ABANDON_AFTER: Duration = Duration::from_secs(30 * 60);

/// The reminder's name.
const ABANDONED: &str = "abandoned";

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// What an abandonable cart stores.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct AbandonableCartState {
    /// Item name → quantity.
    pub items: BTreeMap<String, u32>,
    /// When the cart last changed (Unix ms).
    pub changed_at_ms: u64,
    /// How long it may sit unchanged, in seconds (0: [`DEFAULT_ABANDON_AFTER`]).
    pub abandon_after_secs: u64,
    /// Whether the `abandoned` reminder is registered.
    pub armed: bool,
}

impl AbandonableCartState {
    fn abandon_after(&self) -> Duration {
        match self.abandon_after_secs {
            0 => DEFAULT_ABANDON_AFTER,
            secs => Duration::from_secs(secs),
        }
    }
}

/// A shopping cart that empties itself when left alone for too long.
#[grain(idle_timeout = "5m")]
pub struct AbandonableCart {
    state: PersistentState<AbandonableCartState>,
    ctx: GrainContext,
}

#[grain]
impl AbandonableCart {
    /// Sets how long the cart may sit unchanged before it is emptied (at least one second).
    pub async fn abandon_after(&mut self, secs: u64) -> Result<(), String> {
        self.state.abandon_after_secs = secs.max(1);
        self.state.write().await.map_err(|e| e.to_string())
    }

    /// Adds `qty` of `item`; returns the new quantity. Arms the abandonment reminder with the first item.
    pub async fn add(&mut self, item: String, qty: u32) -> Result<u32, String> {
        if !self.state.armed {
            let period = (self.state.abandon_after() / 4).max(grains::reminder::MINIMUM_REMINDER_PERIOD);
            self.ctx.register_reminder(ABANDONED, period, period).await.map_err(|e| e.to_string())?;
            self.state.armed = true;
        }
        let n = {
            let n = self.state.items.entry(item).or_default();
            *n += qty;
            *n
        };
        self.state.changed_at_ms = now_ms();
        self.state.write().await.map_err(|e| e.to_string())?;
        Ok(n)
    }

    /// The cart's items and quantities.
    pub async fn items(&self) -> Vec<(String, u32)> {
        self.state.items.iter().map(|(k, v)| (k.clone(), *v)).collect()
    }

    /// Whether the abandonment reminder is registered (as the reminders table says).
    pub async fn armed(&self) -> Result<bool, String> {
        Ok(self.ctx.reminder(ABANDONED).await.map_err(|e| e.to_string())?.is_some())
    }

    /// Empties the cart at once (a checkout) and disarms the reminder.
    pub async fn checkout(&mut self) -> Result<Vec<(String, u32)>, String> {
        let items = self.items().await;
        self.empty().await.map_err(|e| e.to_string())?;
        Ok(items)
    }

    async fn empty(&mut self) -> Result<(), GrainError> {
        self.ctx.unregister_reminder(ABANDONED).await.map_err(|e| GrainError::failed(e.to_string()))?;
        let abandon_after_secs = self.state.abandon_after_secs;
        *self.state.get_mut() = AbandonableCartState { abandon_after_secs, ..Default::default() };
        self.state.write().await?;
        Ok(())
    }

    /// On each tick: empty the cart if it has sat unchanged for `abandon_after`.
    async fn on_reminder(&mut self, _tick: ReminderTick) -> Result<(), GrainError> {
        let idle = Duration::from_millis(now_ms().saturating_sub(self.state.changed_at_ms));
        if self.state.items.is_empty() || idle >= self.state.abandon_after() {
            tracing::info!(cart = %self.ctx.id().key(), ?idle, items = self.state.items.len(), "cart abandoned; emptying it");
            self.empty().await?;
        }
        Ok(())
    }
}
