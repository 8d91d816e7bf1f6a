//! Counters a silo keeps about itself, readable as a snapshot and in the Prometheus text format.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

/// Live counters, updated with relaxed atomics on the call path.
#[derive(Debug, Default)]
pub(crate) struct Metrics {
    pub(crate) calls: AtomicU64,
    pub(crate) call_errors: AtomicU64,
    pub(crate) activations: AtomicU64,
    pub(crate) activation_failures: AtomicU64,
    pub(crate) deactivations: AtomicU64,
}

/// A point-in-time copy of a silo's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MetricsSnapshot {
    /// Calls accepted for delivery since start.
    pub calls: u64,
    /// Calls refused before delivery (unknown type or method, cycles, shutdown).
    pub call_errors: u64,
    /// Activations built successfully since start.
    pub activations: u64,
    /// Activations that failed to build (state load or `on_activate`).
    pub activation_failures: u64,
    /// Activations ended since start.
    pub deactivations: u64,
    /// Activations in the table now.
    pub active: u64,
    /// Grain directory entries this silo owns now.
    pub directory_entries: u64,
}

impl Metrics {
    pub(crate) fn snapshot(&self, active: usize, directory_entries: usize) -> MetricsSnapshot {
        MetricsSnapshot {
            calls: self.calls.load(Ordering::Relaxed),
            call_errors: self.call_errors.load(Ordering::Relaxed),
            activations: self.activations.load(Ordering::Relaxed),
            activation_failures: self.activation_failures.load(Ordering::Relaxed),
            deactivations: self.deactivations.load(Ordering::Relaxed),
            active: active as u64,
            directory_entries: directory_entries as u64,
        }
    }
}

impl MetricsSnapshot {
    /// The snapshot in the Prometheus text exposition format.
    pub fn to_prometheus(&self) -> String {
        let mut out = String::new();
        for (name, kind, help, value) in [
            ("grains_calls_total", "counter", "Calls accepted for delivery.", self.calls),
            ("grains_call_errors_total", "counter", "Calls refused before delivery.", self.call_errors),
            ("grains_activations_total", "counter", "Activations built.", self.activations),
            (
                "grains_activation_failures_total",
                "counter",
                "Activations that failed to build.",
                self.activation_failures,
            ),
            ("grains_deactivations_total", "counter", "Activations ended.", self.deactivations),
            ("grains_activations_active", "gauge", "Activations in the table.", self.active),
            ("grains_directory_entries", "gauge", "Grain directory entries owned.", self.directory_entries),
        ] {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}");
        }
        out
    }
}
