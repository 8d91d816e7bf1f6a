//! The reminder service: fires the durable reminders of the grains whose ring ranges this silo owns.
//!
//! After Orleans' `LocalReminderService`, with the limits its users run into taken away:
//!
//! - **Ownership by ring range.** A reminder belongs to the silo owning its grain's hash on the same
//!   consistent-hash ring as the directory (the view's active silos). When the view changes, every silo drops
//!   the reminders it no longer owns and loads those of the ranges it gained: a new silo picks its ranges up,
//!   and a dead silo's ranges are picked up by its successors as soon as they see it gone.
//! - **Read by range and due time.** A silo holds in memory only the reminders due within its *horizon* (two
//!   refresh intervals), read with [`ReminderTable::read_due`] — an index seek on `(grain_hash, next_due)` in
//!   Postgres, never a scan of the table, and never one record per grain type. Every refresh interval (and
//!   at once on a view change) it reads again, which also catches what it was not told about. A reminder due
//!   in 60 days costs its owner nothing until it comes within the horizon; no timer is ever armed for longer
//!   than the horizon, so there is no limit on how far ahead a reminder may be due.
//! - **Registration** is written by the silo of the grain's activation (fenced by its membership lease, like
//!   its state), which then tells the range's owner (`ReminderChanged`); the owner reads the row and schedules
//!   it if due within its horizon.
//! - **Delivery** is a call of the grain's `on_reminder` through the normal call path: it lands on the grain's
//!   one activation anywhere in the cluster, activating it if need be, and runs as a turn. One delivery per
//!   reminder is in flight at a time; it carries the latest tick due, and the number of due ticks before it
//!   that were not delivered ([`ReminderTick::missed`]), so ticks are never replayed one by one, and every
//!   period is accounted for: delivered, or reported missed. A delivered tick moves the reminder's `next_due`
//!   to the tick after it; that progress is written in batches (`advance`), so a silo taking the reminder over
//!   after a crash fires at once what is overdue and reports the ticks in between as a count. Progress not yet
//!   written when a silo crashes makes its successor deliver a tick again (at least once).
//! - **Failures** (the call fails, or `on_reminder` returns an error) leave the tick undelivered: it is retried
//!   after a backoff doubling from one second up to a minute, logged each time, never dropped.

use std::borrow::Cow;
use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use grains::__private::runtime::{BoxFuture, Call, GrainRuntime, Payload, RequestMetadata, current_chain};
use grains::reminder::{
    MAXIMUM_REMINDER_NAME, MINIMUM_REMINDER_PERIOD, REMINDER_METHOD, Reminder, ReminderAck, ReminderError,
    ReminderRegistry, ReminderTick,
};
use grains::{GrainId, GrainKey};
use grains_storage::{ReminderEntry, ReminderProgress, ReminderRow, ReminderTable, RingRange, StorageError};
use tokio::sync::{Notify, Semaphore};
use tokio::time::Instant;
use tracing::Instrument;

use crate::cluster::system::{self, SystemRequest};
use crate::cluster::{Cluster, ClusterView, ring};
use crate::maps::FastHashMap;
use crate::metrics::Histogram;

/// The most deliveries one silo has in flight at once; the rest wait for a slot (late, not lost).
const MAX_DELIVERIES_IN_FLIGHT: usize = 1024;

/// The first retry of a failed delivery comes after this; each further one after twice the last.
const FIRST_RETRY: Duration = Duration::from_secs(1);

/// The longest wait between retries of a failing delivery.
const MAX_RETRY: Duration = Duration::from_secs(60);

/// How often delivered ticks are written to the table.
const PROGRESS_FLUSH_INTERVAL: Duration = Duration::from_millis(500);

/// Wall-clock Unix milliseconds (the simulation's clock under a simulator).
fn now_ms() -> i64 {
    crate::sim::unix_ms() as i64
}

fn to_system_time(unix_ms: i64) -> SystemTime {
    if unix_ms >= 0 {
        UNIX_EPOCH + Duration::from_millis(unix_ms as u64)
    } else {
        UNIX_EPOCH - Duration::from_millis(unix_ms.unsigned_abs())
    }
}

/// What a reminder is known by: grain type, grain key (storage form), name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct ReminderKey {
    grain_type: String,
    grain_key: String,
    name: String,
}

impl ReminderKey {
    fn of(entry: &ReminderEntry) -> Self {
        Self { grain_type: entry.grain_type.clone(), grain_key: entry.grain_key.clone(), name: entry.name.clone() }
    }
}

impl std::fmt::Display for ReminderKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}#{}", self.grain_type, self.grain_key, self.name)
    }
}

/// A reminder this silo fires.
#[derive(Debug)]
struct Scheduled {
    row: ReminderRow,
    /// When to fire next: the next due tick, or the retry after a failure.
    fire_at_ms: i64,
    /// Failed deliveries since the last success.
    failures: u32,
    /// A delivery is on its way (the reminder is then not in the queue).
    in_flight: bool,
    /// The service's change counter when a registration last set this entry (see `Schedule::changes`).
    changed_at: u64,
}

/// The reminders this silo owns and holds (those due within its horizon), in fire order.
#[derive(Debug, Default)]
struct Schedule {
    held: FastHashMap<Arc<ReminderKey>, Scheduled>,
    /// `(fire at, reminder)` for every held reminder with no delivery in flight.
    queue: BTreeSet<(i64, Arc<ReminderKey>)>,
    /// The ring the held reminders were loaded under (0: none yet).
    ring_id: u64,
    /// The ranges of that ring this silo owns.
    ranges: Vec<RingRange>,
    /// Counts registrations seen (`changed`); a refresh leaves alone what changed after its read began.
    changes: u64,
    /// Reminders a registration changed or removed since the last refresh began, with the counter then.
    recent: FastHashMap<ReminderKey, u64>,
}

impl Schedule {
    fn owns(&self, hash: u32) -> bool {
        self.ranges.iter().any(|r| r.contains(hash))
    }

    fn insert(&mut self, key: Arc<ReminderKey>, scheduled: Scheduled) {
        self.remove(&key);
        if !scheduled.in_flight {
            self.queue.insert((scheduled.fire_at_ms, key.clone()));
        }
        self.held.insert(key, scheduled);
    }

    fn remove(&mut self, key: &ReminderKey) -> Option<Scheduled> {
        let (key, scheduled) = self.held.remove_entry(key)?;
        if !scheduled.in_flight {
            self.queue.remove(&(scheduled.fire_at_ms, key));
        }
        Some(scheduled)
    }

    /// Moves a held reminder to fire at `fire_at_ms` (it has no delivery in flight any more).
    fn reschedule(&mut self, key: &Arc<ReminderKey>, fire_at_ms: i64) {
        if let Some(scheduled) = self.held.get_mut(&**key) {
            if !scheduled.in_flight {
                self.queue.remove(&(scheduled.fire_at_ms, key.clone()));
            }
            scheduled.in_flight = false;
            scheduled.fire_at_ms = fire_at_ms;
            self.queue.insert((fire_at_ms, key.clone()));
        }
    }
}

/// The tick to deliver at `now_ms` for a reminder whose next undelivered tick is due at `next_due_ms`: the
/// latest tick due by now, and how many due ticks before it go undelivered (reported as missed).
fn tick_at(next_due_ms: i64, period_ms: i64, now_ms: i64) -> (i64, u64) {
    if now_ms <= next_due_ms {
        return (next_due_ms, 0);
    }
    let skipped = (now_ms - next_due_ms) / period_ms;
    (next_due_ms + skipped * period_ms, skipped as u64)
}

/// Counters of one silo's reminder service.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ReminderStats {
    /// Reminders this silo owns and holds now (those due within its horizon).
    pub held: usize,
    /// Ring ranges this silo owns.
    pub ranges: usize,
    /// Ticks delivered (their `on_reminder` returned `Ok`).
    pub delivered: u64,
    /// Deliveries that failed (each is retried).
    pub failed: u64,
    /// Missed ticks reported with delivered ones.
    pub missed: u64,
    /// Range reads (refreshes) done.
    pub refreshes: u64,
}

/// Settings of the reminder service.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ReminderSettings {
    /// How often the owned ranges are read again; the horizon is twice this.
    pub(crate) refresh_interval: Duration,
    /// The deadline of a delivery.
    pub(crate) call_timeout: Duration,
}

/// One silo's reminder service.
pub(crate) struct ReminderService {
    cluster: Arc<Cluster>,
    table: Arc<dyn ReminderTable>,
    /// The grain types hosted here that handle reminders.
    remindable: FastHashMap<&'static str, ()>,
    settings: ReminderSettings,
    schedule: Mutex<Schedule>,
    /// Delivered ticks not yet written to the table.
    progress: Mutex<Vec<ReminderProgress>>,
    wake: Notify,
    deliveries: Semaphore,
    stopping: AtomicBool,
    delivered: AtomicU64,
    failed: AtomicU64,
    missed: AtomicU64,
    refreshes: AtomicU64,
    /// How late delivered ticks arrived: from the tick's due time to its acknowledgement.
    lag: Histogram,
    this: Weak<ReminderService>,
}

impl std::fmt::Debug for ReminderService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReminderService").field("stats", &self.stats()).finish_non_exhaustive()
    }
}

impl ReminderService {
    /// The service of the silo of `cluster`, over `table` (fenced by the silo's lease), for the grain types in
    /// `remindable`.
    pub(crate) fn new(
        cluster: Arc<Cluster>,
        table: Arc<dyn ReminderTable>,
        remindable: impl IntoIterator<Item = &'static str>,
        settings: ReminderSettings,
    ) -> Arc<Self> {
        Arc::new_cyclic(|this| Self {
            this: this.clone(),
            cluster,
            table,
            remindable: remindable.into_iter().map(|t| (t, ())).collect(),
            settings,
            schedule: Mutex::default(),
            progress: Mutex::default(),
            wake: Notify::new(),
            deliveries: Semaphore::new(MAX_DELIVERIES_IN_FLIGHT),
            stopping: AtomicBool::new(false),
            delivered: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            missed: AtomicU64::new(0),
            refreshes: AtomicU64::new(0),
            lag: Histogram::default(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Schedule> {
        self.schedule.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn arc(&self) -> Arc<Self> {
        match self.this.upgrade() {
            Some(me) => me,
            None => unreachable!("a service's own methods run only while it is alive"),
        }
    }

    /// The horizon: reminders due by then are held in memory.
    fn horizon_ms(&self, now_ms: i64) -> i64 {
        now_ms.saturating_add(2 * self.settings.refresh_interval.as_millis() as i64)
    }

    /// The service's counters now.
    pub(crate) fn stats(&self) -> ReminderStats {
        let schedule = self.lock();
        ReminderStats {
            held: schedule.held.len(),
            ranges: schedule.ranges.len(),
            delivered: self.delivered.load(Ordering::Relaxed),
            failed: self.failed.load(Ordering::Relaxed),
            missed: self.missed.load(Ordering::Relaxed),
            refreshes: self.refreshes.load(Ordering::Relaxed),
        }
    }

    /// Stops firing and writes the progress of delivered ticks (a graceful stop, while the lease holds).
    pub(crate) async fn stop(&self) {
        self.stopping.store(true, Ordering::Release);
        self.wake.notify_one();
        if let Err(error) = self.flush().await {
            tracing::warn!(%error, "reminder progress not written at stop; the next owner may deliver those ticks again");
        }
    }

    /// Writes the progress of delivered ticks; on failure keeps it for the next attempt.
    async fn flush(&self) -> Result<(), StorageError> {
        let mut pending = std::mem::take(&mut *self.progress.lock().unwrap_or_else(|e| e.into_inner()));
        if pending.is_empty() {
            return Ok(());
        }
        // Only the furthest progress of each reminder matters.
        pending.sort_by(|a, b| {
            (&a.grain_type, &a.grain_key, &a.name, &a.etag, std::cmp::Reverse(a.next_due_ms)).cmp(&(
                &b.grain_type,
                &b.grain_key,
                &b.name,
                &b.etag,
                std::cmp::Reverse(b.next_due_ms),
            ))
        });
        pending.dedup_by(|later, kept| {
            (&later.grain_type, &later.grain_key, &later.name, &later.etag)
                == (&kept.grain_type, &kept.grain_key, &kept.name, &kept.etag)
        });
        match self.table.advance(&pending).await {
            Ok(()) => Ok(()),
            Err(error) => {
                self.progress.lock().unwrap_or_else(|e| e.into_inner()).extend(pending);
                Err(error)
            }
        }
    }

    /// Reads the reminders due within the horizon in the ranges this silo owns under `view`, and reconciles
    /// the held ones with them: drops what it no longer owns or what was removed, adds what is new.
    async fn refresh(&self, view: &ClusterView) -> Result<(), StorageError> {
        // Progress first: a reminder advanced past the horizon is held no more, and must not be read back
        // at its old due time.
        self.flush().await?;
        let me = &self.cluster.me;
        let ranges = if view.ring.contains(me) { view.ring.ranges_of(me) } else { Vec::new() };
        let began = self.lock().changes;
        let now = now_ms();
        let horizon = self.horizon_ms(now);
        let rows = if ranges.is_empty() { Vec::new() } else { self.table.read_due(&ranges, horizon).await? };
        self.refreshes.fetch_add(1, Ordering::Relaxed);
        let mut schedule = self.lock();
        let gained = schedule.ring_id != view.ring_id;
        schedule.ring_id = view.ring_id;
        schedule.ranges = ranges;
        let mut fresh: FastHashMap<ReminderKey, ReminderRow> =
            rows.into_iter().map(|row| (ReminderKey::of(&row.entry), row)).collect();
        // What a registration set after this read began is newer than what the read saw.
        let recent = std::mem::take(&mut schedule.recent);
        let changed_since = |key: &ReminderKey| recent.get(key).is_some_and(|at| *at > began);
        let held: Vec<Arc<ReminderKey>> = schedule.held.keys().cloned().collect();
        let mut dropped = 0;
        for key in held {
            let Some(scheduled) = schedule.held.get(&*key) else { continue };
            let owned = schedule.owns(scheduled.row.entry.grain_hash);
            let newer = changed_since(&key) || scheduled.changed_at > began;
            match fresh.remove(&*key) {
                _ if !owned => {
                    schedule.remove(&key);
                    dropped += 1;
                }
                _ if newer => {}
                Some(row) if row.etag == scheduled.row.etag => {
                    // Progress this silo made and has not written yet is ahead of the table.
                    if row.next_due_ms > scheduled.row.next_due_ms
                        && let Some(s) = schedule.held.get_mut(&*key)
                    {
                        s.row.next_due_ms = row.next_due_ms;
                        if !s.in_flight && s.failures == 0 {
                            let due = row.next_due_ms;
                            schedule.reschedule(&key, due);
                        }
                    }
                }
                Some(row) => {
                    let fire_at_ms = row.next_due_ms;
                    schedule.insert(key, Scheduled { row, fire_at_ms, failures: 0, in_flight: false, changed_at: 0 });
                }
                None if scheduled.row.next_due_ms <= horizon => {
                    // Due within the horizon, yet not in the table: removed (or taken over and advanced).
                    schedule.remove(&key);
                    dropped += 1;
                }
                None => {}
            }
        }
        let mut added = 0;
        for (key, row) in fresh {
            if changed_since(&key) || !schedule.owns(row.entry.grain_hash) {
                continue;
            }
            let fire_at_ms = row.next_due_ms;
            schedule.insert(Arc::new(key), Scheduled { row, fire_at_ms, failures: 0, in_flight: false, changed_at: 0 });
            added += 1;
        }
        // Registrations after the read began are kept for the next refresh to judge.
        schedule.recent = recent.into_iter().filter(|(_, at)| *at > began).collect();
        if gained || added > 0 || dropped > 0 {
            tracing::debug!(
                ranges = schedule.ranges.len(),
                held = schedule.held.len(),
                added,
                dropped,
                "reminders loaded"
            );
        }
        drop(schedule);
        self.wake.notify_one();
        Ok(())
    }

    /// Whether this silo owns `hash` in the view it has now.
    fn owns_now(&self, hash: u32) -> bool {
        let view = self.cluster.view();
        view.version > 0 && view.ring.owner_of_hash(hash) == Some(&self.cluster.me)
    }

    /// Re-reads reminder `name` of `grain` after a registration or removal, and holds it if this silo owns it
    /// and it is due within the horizon (drops it otherwise).
    pub(crate) async fn changed(&self, grain: &GrainId, name: &str) -> Result<(), StorageError> {
        let hash = ring::grain_hash(grain);
        if !self.owns_now(hash) {
            return Ok(());
        }
        let key = ReminderKey {
            grain_type: grain.grain_type().to_owned(),
            grain_key: grain.key().storage_key(),
            name: name.to_owned(),
        };
        let row = self.table.read_row(&key.grain_type, &key.grain_key, &key.name).await?;
        let horizon = self.horizon_ms(now_ms());
        let mut schedule = self.lock();
        // A refresh that began before this read must not undo what it found.
        schedule.changes += 1;
        let change = schedule.changes;
        schedule.recent.insert(key.clone(), change);
        match row {
            Some(row) if row.next_due_ms <= horizon && self.owns_now(hash) => {
                let same = schedule.held.get(&key).is_some_and(|s| s.row.etag == row.etag);
                if !same {
                    let fire_at_ms = row.next_due_ms;
                    let scheduled = Scheduled { row, fire_at_ms, failures: 0, in_flight: false, changed_at: change };
                    schedule.insert(Arc::new(key), scheduled);
                }
            }
            _ => {
                schedule.remove(&key);
            }
        }
        drop(schedule);
        self.wake.notify_one();
        Ok(())
    }

    /// The service's counters and tick lag in the Prometheus text format.
    pub(crate) fn write_prometheus(&self, out: &mut String) {
        use std::fmt::Write as _;
        let stats = self.stats();
        for (name, kind, help, value) in [
            (
                "grains_reminders_held",
                "gauge",
                "Reminders this silo holds (due within its horizon).",
                stats.held as u64,
            ),
            ("grains_reminder_ranges", "gauge", "Reminder ring ranges this silo owns.", stats.ranges as u64),
            ("grains_reminder_ticks_delivered_total", "counter", "Reminder ticks delivered.", stats.delivered),
            (
                "grains_reminder_ticks_failed_total",
                "counter",
                "Reminder tick deliveries that failed (each is retried).",
                stats.failed,
            ),
            (
                "grains_reminder_ticks_missed_total",
                "counter",
                "Ticks reported missed with a delivered tick.",
                stats.missed,
            ),
        ] {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}");
        }
        let name = "grains_reminder_lag_seconds";
        let _ = writeln!(
            out,
            "# HELP {name} How late reminder ticks were delivered: from the due time to the grain's acknowledgement.\n# TYPE {name} histogram"
        );
        self.lag.snapshot().write_prometheus(out, name, "");
    }

    /// Starts the deliveries due now; returns when the next one is due.
    fn fire_due(self: &Arc<Self>, runtime: &Weak<dyn GrainRuntime>) -> Option<i64> {
        let now = now_ms();
        let mut schedule = self.lock();
        loop {
            let (fire_at, key) = match schedule.queue.first() {
                Some((fire_at, _)) if *fire_at > now => return Some(*fire_at),
                Some(first) => first.clone(),
                None => return None,
            };
            schedule.queue.remove(&(fire_at, key.clone()));
            let Some(scheduled) = schedule.held.get_mut(&*key) else { continue };
            scheduled.in_flight = true;
            let entry = &scheduled.row.entry;
            let (due_ms, missed) = tick_at(scheduled.row.next_due_ms, entry.period_ms, now);
            let delivery = Delivery {
                key: key.clone(),
                etag: scheduled.row.etag.clone(),
                period_ms: entry.period_ms,
                due_ms,
                missed,
                failures: scheduled.failures,
            };
            tokio::spawn(self.clone().deliver(runtime.clone(), delivery));
        }
    }

    /// Delivers one tick and records the outcome.
    async fn deliver(self: Arc<Self>, runtime: Weak<dyn GrainRuntime>, delivery: Delivery) {
        let span = tracing::debug_span!("reminder.tick", reminder = %delivery.key, due_ms = delivery.due_ms, missed = delivery.missed);
        let outcome = async {
            let _slot = self.deliveries.acquire().await;
            let Some(runtime) = runtime.upgrade() else { return Err("the silo is gone".to_owned()) };
            let key = GrainKey::from_storage_key(&delivery.key.grain_key)
                .ok_or_else(|| format!("the row's grain key {:?} is not a storage key", delivery.key.grain_key))?;
            let grain = GrainId::new(delivery.key.grain_type.clone(), key);
            let tick = ReminderTick::new(
                delivery.key.name.clone(),
                to_system_time(delivery.due_ms),
                Duration::from_millis(delivery.period_ms as u64),
                delivery.missed,
            );
            let issued = Instant::now();
            let call = Call {
                target: grain,
                method: Cow::Borrowed(REMINDER_METHOD),
                payload: Payload::Local(Box::new(tick)),
                deadline: issued + self.settings.call_timeout,
                issued,
                chain: current_chain(),
                metadata: RequestMetadata::new(),
            };
            let ack = match runtime.invoke(call).await.map_err(|e| e.to_string())? {
                Payload::Local(reply) => match reply.into_any().downcast::<ReminderAck>() {
                    Ok(ack) => *ack,
                    Err(_) => return Err("the reply to a reminder tick is not an acknowledgement".to_owned()),
                },
                Payload::Encoded(body) => grains::codec::decode::<ReminderAck>(&body).map_err(|e| e.to_string())?,
            };
            ack.0
        }
        .instrument(span)
        .await;
        self.delivered_or_failed(delivery, outcome);
    }

    fn delivered_or_failed(&self, delivery: Delivery, outcome: Result<(), String>) {
        let now = now_ms();
        match outcome {
            Ok(()) => {
                self.delivered.fetch_add(1, Ordering::Relaxed);
                self.missed.fetch_add(delivery.missed, Ordering::Relaxed);
                self.lag.record(Duration::from_millis(now.saturating_sub(delivery.due_ms).max(0) as u64));
                // The next undelivered tick is the one after this: ticks that fell due while this one was on its
                // way are delivered next, at once, as one tick reporting the others missed.
                let next_due = delivery.due_ms.saturating_add(delivery.period_ms);
                self.progress.lock().unwrap_or_else(|e| e.into_inner()).push(ReminderProgress {
                    grain_type: delivery.key.grain_type.clone(),
                    grain_key: delivery.key.grain_key.clone(),
                    name: delivery.key.name.clone(),
                    etag: delivery.etag.clone(),
                    next_due_ms: next_due,
                });
                let mut schedule = self.lock();
                let Some(scheduled) = schedule.held.get_mut(&*delivery.key).filter(|s| s.row.etag == delivery.etag)
                else {
                    return; // registered again, removed, or moved to another silo meanwhile
                };
                scheduled.failures = 0;
                scheduled.row.next_due_ms = scheduled.row.next_due_ms.max(next_due);
                let next_due = scheduled.row.next_due_ms;
                if next_due > self.horizon_ms(now) {
                    // Far ahead: a refresh reads it back when it comes near (its progress is written first).
                    schedule.remove(&delivery.key);
                } else {
                    schedule.reschedule(&delivery.key, next_due);
                }
            }
            Err(error) => {
                self.failed.fetch_add(1, Ordering::Relaxed);
                let failures = delivery.failures + 1;
                let retry_in = FIRST_RETRY.saturating_mul(1 << (failures - 1).min(16)).min(MAX_RETRY);
                tracing::warn!(reminder = %delivery.key, failures, ?retry_in, %error, "reminder tick not delivered; retrying");
                let mut schedule = self.lock();
                let Some(scheduled) = schedule.held.get_mut(&*delivery.key).filter(|s| s.row.etag == delivery.etag)
                else {
                    return;
                };
                scheduled.failures = failures;
                schedule.reschedule(&delivery.key, now.saturating_add(retry_in.as_millis() as i64));
            }
        }
        self.wake.notify_one();
    }

    /// Checks a registration's arguments; the first due time in Unix ms.
    fn check(&self, grain: &GrainId, name: &str, due: Duration, period: Duration) -> Result<i64, ReminderError> {
        if name.is_empty() || name.len() > MAXIMUM_REMINDER_NAME {
            return Err(ReminderError::InvalidName(name.to_owned()));
        }
        if period < MINIMUM_REMINDER_PERIOD {
            return Err(ReminderError::PeriodTooShort { period, minimum: MINIMUM_REMINDER_PERIOD });
        }
        if !self.remindable.contains_key(grain.grain_type()) {
            return Err(ReminderError::NotRemindable { grain_type: grain.grain_type().to_owned() });
        }
        i64::try_from(period.as_millis()).map_err(|_| ReminderError::DueOutOfRange { due: period })?;
        i64::try_from(due.as_millis())
            .ok()
            .and_then(|due_ms| now_ms().checked_add(due_ms))
            .ok_or(ReminderError::DueOutOfRange { due })
    }

    /// Tells the owner of `grain`'s range that its reminder `name` changed (best effort: the owner's next
    /// refresh finds it anyway).
    async fn notify_owner(&self, grain: &GrainId, name: &str) {
        let view = self.cluster.view();
        let owner = view.ring.owner(grain).cloned().unwrap_or_else(|| self.cluster.me.clone());
        if owner == self.cluster.me {
            if let Err(error) = self.changed(grain, name).await {
                tracing::debug!(%grain, name, %error, "reminder change not applied here; the next refresh will");
            }
            return;
        }
        let request = SystemRequest::ReminderChanged { grain: grain.clone(), name: name.to_owned() };
        let deadline = system::deadline_in(self.settings.call_timeout.min(Duration::from_secs(2)));
        if let Err(error) = self.cluster.system_call(&owner, &request, deadline).await {
            tracing::debug!(%grain, name, %owner, %error, "reminder owner not told; its next refresh will find the change");
        }
    }

    async fn register(
        self: Arc<Self>,
        grain: GrainId,
        name: String,
        due: Duration,
        period: Duration,
    ) -> Result<Reminder, ReminderError> {
        let start_at_ms = self.check(&grain, &name, due, period)?;
        let entry = ReminderEntry {
            grain_type: grain.grain_type().to_owned(),
            grain_key: grain.key().storage_key(),
            name: name.clone(),
            grain_hash: ring::grain_hash(&grain),
            start_at_ms,
            period_ms: period.as_millis() as i64,
        };
        self.table.upsert(&entry).await?;
        tracing::debug!(%grain, name, ?due, ?period, "reminder registered");
        self.notify_owner(&grain, &name).await;
        let first_due = to_system_time(start_at_ms);
        Ok(Reminder::new(name, first_due, period, first_due))
    }

    async fn unregister(self: Arc<Self>, grain: GrainId, name: String) -> Result<bool, ReminderError> {
        let (grain_type, grain_key) = (grain.grain_type().to_owned(), grain.key().storage_key());
        // A concurrent registration changes the etag: read again and retry, a few times.
        for _ in 0..5 {
            let Some(row) = self.table.read_row(&grain_type, &grain_key, &name).await? else { return Ok(false) };
            if self.table.remove(&grain_type, &grain_key, &name, &row.etag).await? {
                tracing::debug!(%grain, name, "reminder unregistered");
                self.notify_owner(&grain, &name).await;
                return Ok(true);
            }
        }
        Err(ReminderError::Storage(StorageError::Conflict {
            key: format!("{grain}#{name}"),
            expected: None,
            actual: None,
        }))
    }
}

/// One tick on its way.
#[derive(Debug)]
struct Delivery {
    key: Arc<ReminderKey>,
    etag: String,
    period_ms: i64,
    due_ms: i64,
    missed: u64,
    failures: u32,
}

fn listed(row: &ReminderRow) -> Reminder {
    Reminder::new(
        row.entry.name.clone(),
        to_system_time(row.entry.start_at_ms),
        Duration::from_millis(row.entry.period_ms.max(0) as u64),
        to_system_time(row.next_due_ms),
    )
}

impl ReminderRegistry for ReminderService {
    fn register(
        &self,
        grain: &GrainId,
        name: &str,
        due: Duration,
        period: Duration,
    ) -> BoxFuture<'static, Result<Reminder, ReminderError>> {
        Box::pin(self.arc().register(grain.clone(), name.to_owned(), due, period))
    }

    fn unregister(&self, grain: &GrainId, name: &str) -> BoxFuture<'static, Result<bool, ReminderError>> {
        Box::pin(self.arc().unregister(grain.clone(), name.to_owned()))
    }

    fn get(&self, grain: &GrainId, name: &str) -> BoxFuture<'static, Result<Option<Reminder>, ReminderError>> {
        let (table, grain_type, grain_key, name) =
            (self.table.clone(), grain.grain_type().to_owned(), grain.key().storage_key(), name.to_owned());
        Box::pin(async move { Ok(table.read_row(&grain_type, &grain_key, &name).await?.as_ref().map(listed)) })
    }

    fn list(&self, grain: &GrainId) -> BoxFuture<'static, Result<Vec<Reminder>, ReminderError>> {
        let (table, grain_type, grain_key) =
            (self.table.clone(), grain.grain_type().to_owned(), grain.key().storage_key());
        Box::pin(async move { Ok(table.read_grain(&grain_type, &grain_key).await?.iter().map(listed).collect()) })
    }
}

/// The service's loop: loads the owned ranges (at once when the view changes, and every refresh interval),
/// fires what is due, and writes progress. Ends when the silo stops.
pub(crate) async fn run(service: Arc<ReminderService>, runtime: Weak<dyn GrainRuntime>) {
    let cluster = service.cluster.clone();
    let mut views = cluster.watch_view();
    let stopped = cluster.stopped();
    tokio::pin!(stopped);
    let interval = service.settings.refresh_interval;
    let mut next_refresh = Instant::now();
    let mut next_flush = Instant::now() + PROGRESS_FLUSH_INTERVAL;
    let mut refresh_backoff = Duration::from_millis(100);
    loop {
        if cluster.is_stopped() || service.stopping.load(Ordering::Acquire) {
            return;
        }
        let view = views.borrow_and_update().clone();
        let loaded = service.lock().ring_id;
        if view.version > 0 && (view.ring_id != loaded || Instant::now() >= next_refresh) {
            match service.refresh(&view).await {
                Ok(()) => {
                    next_refresh = Instant::now() + interval;
                    refresh_backoff = Duration::from_millis(100);
                }
                Err(error) => {
                    tracing::warn!(%error, retry_in = ?refresh_backoff, "reminder ranges not read");
                    next_refresh = Instant::now() + refresh_backoff;
                    refresh_backoff = (refresh_backoff * 2).min(interval);
                }
            }
        }
        if Instant::now() >= next_flush {
            if let Err(error) = service.flush().await {
                tracing::warn!(%error, "reminder progress not written; retrying");
            }
            next_flush = Instant::now() + PROGRESS_FLUSH_INTERVAL;
        }
        // A silo that cannot confirm its membership fires nothing: another may own its ranges by now.
        let next_fire = if cluster.lease.is_valid() {
            service.fire_due(&runtime)
        } else {
            cluster.refresh_now.notify_one();
            Some(now_ms() + 50)
        };
        let mut wake_at = next_refresh.min(next_flush);
        if let Some(at) = next_fire {
            let wait = Duration::from_millis((at - now_ms()).max(0) as u64);
            wake_at = wake_at.min(Instant::now() + wait);
        }
        let woken = service.wake.notified();
        tokio::select! {
            biased; // no random branch order: a simulated run repeats exactly
            () = &mut stopped => return,
            changed = views.changed() => {
                if changed.is_err() {
                    return;
                }
            }
            () = woken => {}
            () = tokio::time::sleep_until(wake_at) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tick_delivered_is_the_latest_due_and_the_earlier_ones_are_counted_missed() {
        assert_eq!(tick_at(10_000, 1_000, 9_000), (10_000, 0), "not yet due: the next tick, nothing missed");
        assert_eq!(tick_at(10_000, 1_000, 10_000), (10_000, 0));
        assert_eq!(tick_at(10_000, 1_000, 10_999), (10_000, 0), "late within its period: nothing missed");
        assert_eq!(tick_at(10_000, 1_000, 13_500), (13_000, 3), "ticks at 10, 11 and 12 s were missed");
    }

    #[test]
    fn times_before_the_epoch_convert() {
        assert_eq!(to_system_time(-1_000), UNIX_EPOCH - Duration::from_secs(1));
        assert_eq!(to_system_time(1_500), UNIX_EPOCH + Duration::from_millis(1_500));
    }
}
