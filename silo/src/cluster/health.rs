//! This silo's own health, as its failure detector needs to know it.
//!
//! A probe that times out says "the peer did not answer in time" only if this silo was able to send the probe,
//! read the answer and run its timer on time. A silo whose runtime is starved (a CPU shared with other work,
//! a long run queue, a host that paused the process) sees every peer as late, and used to vote healthy peers
//! dead: two loaded silos of one machine could declare the third dead while it answered as fast as they did.
//! Orleans solves this with its local silo health monitor (a degraded silo does not count probe failures
//! against others); this is the same idea, measured the simplest way that cannot lie: a watchdog task that
//! sleeps a short, fixed interval and records how late it wakes. A late wake means every timer and every task
//! of this silo ran late by about as much, so probe timeouts seen in that window are this silo's doing.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use tokio::time::Instant;

use super::Cluster;

/// How late this silo's runtime has been running, read by the failure detector.
pub(crate) struct LocalHealth {
    /// The origin of the millisecond readings below.
    origin: Instant,
    /// How long the watchdog sleeps between wakes.
    interval: Duration,
    /// A wake later than this marks the silo degraded.
    tolerance: Duration,
    /// When (ms since `origin`) the watchdog should next wake.
    next_wake_ms: AtomicU64,
    /// When (ms since `origin`) the watchdog last woke late by more than `tolerance`; 0 if never.
    last_late_wake_ms: AtomicU64,
    /// How late that wake was (ms).
    last_lag_ms: AtomicU64,
}

impl LocalHealth {
    /// The health of a silo whose probes time out after `probe_timeout`: a lag of a quarter of it marks the
    /// silo degraded, watched every twentieth of it (at most every 100 ms).
    pub(crate) fn new(probe_timeout: Duration) -> Self {
        let interval = (probe_timeout / 20).clamp(Duration::from_millis(10), Duration::from_millis(100));
        let origin = Instant::now();
        Self {
            origin,
            interval,
            tolerance: probe_timeout / 4,
            next_wake_ms: AtomicU64::new(interval.as_millis() as u64),
            last_late_wake_ms: AtomicU64::new(0),
            last_lag_ms: AtomicU64::new(0),
        }
    }

    fn now_ms(&self) -> u64 {
        // Never 0, so that 0 can mean "never".
        (self.origin.elapsed().as_millis() as u64).max(1)
    }

    /// How late this silo ran at its worst since `since`, if later than the tolerance: its runtime is (or was)
    /// starved, and probes that timed out in that time prove nothing about the peers.
    pub(crate) fn degraded_since(&self, since: Instant) -> Option<Duration> {
        let since_ms = since.saturating_duration_since(self.origin).as_millis() as u64;
        self.degraded_between(since_ms, self.now_ms())
    }

    /// [`Self::degraded_since`] on the watchdog's millisecond clock.
    fn degraded_between(&self, since_ms: u64, now_ms: u64) -> Option<Duration> {
        // A watchdog that has not woken although it is due is itself the evidence.
        let overdue = now_ms.saturating_sub(self.next_wake_ms.load(Ordering::Acquire));
        let late_at = self.last_late_wake_ms.load(Ordering::Acquire);
        let recorded = if late_at != 0 && late_at >= since_ms { self.last_lag_ms.load(Ordering::Acquire) } else { 0 };
        let lag = Duration::from_millis(overdue.max(recorded));
        (lag > self.tolerance).then_some(lag)
    }

    /// Records one wake of the watchdog that was due at `due_ms`, happening at `now_ms`.
    fn woke(&self, due_ms: u64, now_ms: u64) {
        let lag = now_ms.saturating_sub(due_ms);
        if Duration::from_millis(lag) > self.tolerance {
            self.last_lag_ms.store(lag, Ordering::Release);
            self.last_late_wake_ms.store(now_ms, Ordering::Release);
            tracing::debug!(lag_ms = lag, "this silo's runtime is running late");
        }
        self.next_wake_ms.store(now_ms + self.interval.as_millis() as u64, Ordering::Release);
    }
}

/// The watchdog of `health`: wakes every interval and records how late it woke. Ends when the cluster is
/// dropped or stops.
pub(crate) async fn run_watchdog(cluster: Weak<Cluster>, health: Arc<LocalHealth>) {
    // The time between the silo's construction and its agent's start (joining, the first table read) is not lag.
    health.next_wake_ms.store(health.now_ms() + health.interval.as_millis() as u64, Ordering::Release);
    while cluster.upgrade().is_some_and(|c| !c.is_stopped()) {
        let due = health.next_wake_ms.load(Ordering::Acquire);
        tokio::time::sleep_until(health.origin + Duration::from_millis(due)).await;
        health.woke(due, health.now_ms());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_late_wake_marks_the_silo_degraded_for_the_windows_that_contain_it() {
        let health = LocalHealth::new(Duration::from_millis(500));
        assert_eq!(health.interval, Duration::from_millis(25));
        assert_eq!(health.degraded_between(1, 10), None, "a fresh silo is healthy");

        // The watchdog was due at 25 ms but had not run by 325 ms (a starved runtime).
        assert_eq!(health.degraded_between(1, 325), Some(Duration::from_millis(300)), "an overdue watchdog");
        health.woke(25, 325);
        assert_eq!(health.degraded_between(1, 330), Some(Duration::from_millis(300)), "the late wake is recorded");

        // A window that starts after the late wake does not see it, once the watchdog keeps time again.
        health.woke(350, 352);
        assert_eq!(health.degraded_between(340, 360), None);
    }

    #[test]
    fn a_lag_within_a_quarter_of_the_probe_timeout_is_tolerated() {
        let health = LocalHealth::new(Duration::from_millis(500));
        health.woke(25, 150);
        assert_eq!(health.degraded_between(1, 150), None, "125 ms late is a quarter of the probe timeout");
        health.woke(175, 301);
        assert_eq!(health.degraded_between(1, 301), Some(Duration::from_millis(126)));
    }
}
