//! Counters a silo keeps about itself, readable as a snapshot and in the Prometheus text format.
//!
//! Beside the silo-wide counters, every grain method of every grain type linked into the binary has its own
//! call and error counters and a latency [`Histogram`], laid out once at start: recording a call is a few
//! relaxed atomic additions, with no lock and no allocation. Storage operations have latency histograms too.

use std::collections::HashMap;
use std::fmt::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use grains::__private::GrainRegistration;
use serde::{Deserialize, Serialize};

/// Live counters, updated with relaxed atomics on the call path.
#[derive(Debug)]
pub(crate) struct Metrics {
    /// Counted on every call, from every worker: sharded like the method counters.
    pub(crate) calls: ShardedCounter,
    pub(crate) call_errors: AtomicU64,
    /// Client calls this silo's gateway passed on to the silo holding the grain.
    pub(crate) gateway_forwards: AtomicU64,
    pub(crate) activations: AtomicU64,
    pub(crate) activation_failures: AtomicU64,
    pub(crate) deactivations: AtomicU64,
    /// Per grain type, per method: calls, errors, latency. Fixed at start (every type linked in).
    grain_types: HashMap<&'static str, Arc<TypeStats>, crate::maps::FastHash>,
    /// Latency of grain-state operations, shared with the silo's state store.
    pub(crate) storage: Arc<StorageStats>,
    /// When the silo started (for its uptime).
    pub(crate) started: std::time::Instant,
    /// The Postgres pool of the silo's storage and membership, if it uses one (for its usage).
    #[cfg(feature = "postgres")]
    pub(crate) pool: std::sync::OnceLock<grains_storage::postgres::PgPool>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            calls: ShardedCounter::default(),
            call_errors: AtomicU64::new(0),
            gateway_forwards: AtomicU64::new(0),
            activations: AtomicU64::new(0),
            activation_failures: AtomicU64::new(0),
            deactivations: AtomicU64::new(0),
            grain_types: GrainRegistration::all().map(|r| (r.type_name, Arc::new(TypeStats::new(r)))).collect(),
            storage: Arc::default(),
            started: std::time::Instant::now(),
            #[cfg(feature = "postgres")]
            pool: std::sync::OnceLock::new(),
        }
    }
}

/// How many buckets a [`Histogram`] has: four per power of two, from 1 ns to 2^36 ns (about 69 s).
pub(crate) const BUCKETS: usize = 140;

/// The largest value a histogram tells apart; larger values land in its last bucket.
const MAX_NANOS: u64 = (1 << 36) - 1;

/// A latency histogram of fixed, log-linear buckets (four per power of two: each bucket is at most a quarter
/// of its values wide), recorded with relaxed atomic additions.
#[derive(Debug)]
pub(crate) struct Histogram {
    buckets: [AtomicU64; BUCKETS],
    sum_nanos: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Self {
        Self { buckets: std::array::from_fn(|_| AtomicU64::new(0)), sum_nanos: AtomicU64::new(0) }
    }
}

/// The bucket of a value in nanoseconds.
pub(crate) fn bucket_of(nanos: u64) -> usize {
    let v = nanos.min(MAX_NANOS);
    if v < 4 {
        return v as usize;
    }
    let e = 63 - v.leading_zeros() as usize; // 2^e <= v < 2^(e+1), e >= 2
    let sub = ((v >> (e - 2)) & 3) as usize;
    4 * (e - 1) + sub
}

/// The first value (nanoseconds) past bucket `index`: its exclusive upper bound.
pub(crate) fn bucket_upper(index: usize) -> u64 {
    if index < 4 {
        return index as u64 + 1;
    }
    let e = index / 4 + 1;
    let sub = (index % 4) as u64;
    (5 + sub) << (e - 2)
}

impl Histogram {
    /// Records one value.
    pub(crate) fn record(&self, elapsed: Duration) {
        let nanos = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
        self.buckets[bucket_of(nanos)].fetch_add(1, Ordering::Relaxed);
        self.sum_nanos.fetch_add(nanos.min(MAX_NANOS), Ordering::Relaxed);
    }

    /// A copy of the counts, keeping only the buckets that hold any.
    pub(crate) fn snapshot(&self) -> HistogramSnapshot {
        let buckets: Vec<(u16, u64)> = self
            .buckets
            .iter()
            .enumerate()
            .filter_map(|(i, b)| Some((i as u16, b.load(Ordering::Relaxed))).filter(|(_, n)| *n > 0))
            .collect();
        let count = buckets.iter().map(|(_, n)| n).sum();
        HistogramSnapshot { count, sum_nanos: self.sum_nanos.load(Ordering::Relaxed), buckets }
    }
}

/// A point-in-time copy of a [`Histogram`]: sparse `(bucket, count)` pairs, ascending.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct HistogramSnapshot {
    pub(crate) count: u64,
    pub(crate) sum_nanos: u64,
    pub(crate) buckets: Vec<(u16, u64)>,
}

impl HistogramSnapshot {
    /// Adds `other`'s counts to these (histograms of the same method on several silos).
    pub(crate) fn merge(&mut self, other: &HistogramSnapshot) {
        let mut dense = [0u64; BUCKETS];
        for &(i, n) in self.buckets.iter().chain(&other.buckets) {
            if let Some(slot) = dense.get_mut(usize::from(i)) {
                *slot += n;
            }
        }
        self.buckets = dense.iter().enumerate().filter(|(_, n)| **n > 0).map(|(i, n)| (i as u16, *n)).collect();
        self.count += other.count;
        self.sum_nanos += other.sum_nanos;
    }

    /// The value below which a fraction `q` of the recorded values lie, in nanoseconds, interpolated within
    /// its bucket; `None` when nothing was recorded.
    pub(crate) fn quantile(&self, q: f64) -> Option<f64> {
        if self.count == 0 {
            return None;
        }
        let rank = (q.clamp(0.0, 1.0) * self.count as f64).max(1.0);
        let mut seen = 0u64;
        for &(i, n) in &self.buckets {
            let i = usize::from(i);
            if (seen + n) as f64 >= rank {
                let lower = if i == 0 { 0 } else { bucket_upper(i - 1) } as f64;
                let upper = bucket_upper(i) as f64;
                let within = (rank - seen as f64) / n as f64;
                return Some(lower + (upper - lower) * within);
            }
            seen += n;
        }
        self.buckets.last().map(|&(i, _)| bucket_upper(usize::from(i)) as f64)
    }

    /// The histogram in the Prometheus text format, as `name` with `labels` (`key="value",...` or empty):
    /// cumulative buckets at each power of two from 1.024 µs to 34 s, in seconds.
    pub(crate) fn write_prometheus(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        let mut cumulative = 0u64;
        let mut next = self.buckets.iter().peekable();
        for power in 10..=35u32 {
            let le = 1u64 << power;
            while let Some(&&(i, n)) = next.peek() {
                if bucket_upper(usize::from(i)) > le {
                    break;
                }
                cumulative += n;
                next.next();
            }
            let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{:e}\"}} {cumulative}", le as f64 / 1e9);
        }
        let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {}", self.count);
        let _ = writeln!(out, "{name}_sum{{{labels}}} {:e}", self.sum_nanos as f64 / 1e9);
        let _ = writeln!(out, "{name}_count{{{labels}}} {}", self.count);
    }
}

/// How many copies of a method's counters there are: each thread records into one (chosen once per thread),
/// so that the runtime's workers do not contend for the same cache lines on every call.
const SHARDS: usize = 4;

/// The shard of the calling thread.
fn shard_index() -> usize {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    thread_local! {
        static INDEX: usize = (NEXT.fetch_add(1, Ordering::Relaxed) % SHARDS as u64) as usize;
    }
    INDEX.with(|index| *index)
}

/// A counter every worker adds to, kept in [`SHARDS`] copies on cache lines of their own.
#[derive(Debug)]
pub(crate) struct ShardedCounter(Box<[PaddedCount]>);

#[derive(Debug, Default)]
#[repr(align(128))]
struct PaddedCount(AtomicU64);

impl Default for ShardedCounter {
    fn default() -> Self {
        Self((0..SHARDS).map(|_| PaddedCount::default()).collect())
    }
}

impl ShardedCounter {
    /// Adds one, on the calling thread's shard.
    pub(crate) fn increment(&self) {
        self.0[shard_index()].0.fetch_add(1, Ordering::Relaxed);
    }

    /// The total.
    pub(crate) fn sum(&self) -> u64 {
        self.0.iter().map(|c| c.0.load(Ordering::Relaxed)).sum()
    }
}

/// One shard of a method's counters, on cache lines of its own.
#[derive(Debug, Default)]
#[repr(align(128))]
struct MethodShard {
    /// One count per call (the calls are the histogram's count).
    latency: Histogram,
    errors: AtomicU64,
}

/// The counters of one grain method.
#[derive(Debug)]
pub(crate) struct MethodStats {
    pub(crate) name: &'static str,
    shards: Box<[MethodShard]>,
}

impl MethodStats {
    fn new(name: &'static str) -> Self {
        Self { name, shards: (0..SHARDS).map(|_| MethodShard::default()).collect() }
    }

    /// Records a call whose turn took `elapsed`; `failed` when it ended in a call error or the method's own
    /// `Err`.
    pub(crate) fn record(&self, elapsed: Duration, failed: bool) {
        let shard = &self.shards[shard_index()];
        if failed {
            shard.errors.fetch_add(1, Ordering::Relaxed);
        }
        shard.latency.record(elapsed);
    }

    fn calls(&self) -> u64 {
        self.shards.iter().flat_map(|s| s.latency.buckets.iter()).map(|b| b.load(Ordering::Relaxed)).sum()
    }

    fn errors(&self) -> u64 {
        self.shards.iter().map(|s| s.errors.load(Ordering::Relaxed)).sum()
    }

    fn latency(&self) -> HistogramSnapshot {
        let mut all = HistogramSnapshot::default();
        for shard in self.shards.iter() {
            all.merge(&shard.latency.snapshot());
        }
        all
    }
}

/// The counters of one grain type's methods.
#[derive(Debug)]
pub(crate) struct TypeStats {
    methods: Box<[MethodStats]>,
}

impl TypeStats {
    fn new(registration: &GrainRegistration) -> Self {
        let methods = registration.methods.iter().map(|&name| MethodStats::new(name)).collect();
        Self { methods }
    }

    /// The counters of `method` (a few string comparisons: grain types have few methods).
    pub(crate) fn method(&self, method: &str) -> Option<&MethodStats> {
        self.methods.iter().find(|m| m.name == method)
    }
}

/// Latency of the grain-state operations, as seen by the silo (fencing check included).
#[derive(Debug, Default)]
pub(crate) struct StorageStats {
    pub(crate) read: Histogram,
    pub(crate) write: Histogram,
    pub(crate) clear: Histogram,
    pub(crate) failures: AtomicU64,
}

/// One grain method's counters, copied.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct MethodSnapshot {
    pub(crate) grain_type: String,
    pub(crate) method: String,
    pub(crate) calls: u64,
    pub(crate) errors: u64,
    pub(crate) latency: HistogramSnapshot,
}

/// The storage counters, copied.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct StorageSnapshot {
    pub(crate) read: HistogramSnapshot,
    pub(crate) write: HistogramSnapshot,
    pub(crate) clear: HistogramSnapshot,
    pub(crate) failures: u64,
}

impl Metrics {
    /// The counters of grain type `name`, if it is linked into this binary.
    pub(crate) fn grain_type(&self, name: &str) -> Option<&Arc<TypeStats>> {
        self.grain_types.get(name)
    }

    /// Every method's counters, sorted by type and method; methods never called are left out.
    pub(crate) fn methods(&self) -> Vec<MethodSnapshot> {
        let mut all: Vec<MethodSnapshot> = self
            .grain_types
            .iter()
            .flat_map(|(grain_type, stats)| {
                stats.methods.iter().filter(|m| m.calls() > 0).map(|m| MethodSnapshot {
                    grain_type: (*grain_type).to_owned(),
                    method: m.name.to_owned(),
                    calls: m.calls(),
                    errors: m.errors(),
                    latency: m.latency(),
                })
            })
            .collect();
        all.sort_by(|a, b| (&a.grain_type, &a.method).cmp(&(&b.grain_type, &b.method)));
        all
    }

    /// The storage counters.
    pub(crate) fn storage(&self) -> StorageSnapshot {
        StorageSnapshot {
            read: self.storage.read.snapshot(),
            write: self.storage.write.snapshot(),
            clear: self.storage.clear.snapshot(),
            failures: self.storage.failures.load(Ordering::Relaxed),
        }
    }
}

/// Escapes a Prometheus label value.
fn label(value: &str) -> String {
    value.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// The per-method, storage and mailbox metrics in the Prometheus text format (after [`MetricsSnapshot`]'s).
pub(crate) fn detailed_prometheus(
    methods: &[MethodSnapshot],
    storage: &StorageSnapshot,
    activations_by_type: &std::collections::BTreeMap<String, u64>,
    mailboxes: (u64, u64),
) -> String {
    let mut out = String::new();
    type Family = (&'static str, &'static str, fn(&MethodSnapshot) -> u64);
    let families: [Family; 2] = [
        ("grains_grain_calls_total", "Calls run by grain type and method.", |m| m.calls),
        ("grains_grain_errors_total", "Calls that ended in a call error or the method's own Err.", |m| m.errors),
    ];
    for (name, help, value) in families {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
        for m in methods {
            let _ = writeln!(
                out,
                "{name}{{grain_type=\"{}\",method=\"{}\"}} {}",
                label(&m.grain_type),
                label(&m.method),
                value(m)
            );
        }
    }
    let name = "grains_grain_call_duration_seconds";
    let _ = writeln!(
        out,
        "# HELP {name} Time a call's turn took, from its start to its reply (not counting time queued in the mailbox).\n# TYPE {name} histogram"
    );
    for m in methods {
        let labels = format!("grain_type=\"{}\",method=\"{}\"", label(&m.grain_type), label(&m.method));
        m.latency.write_prometheus(&mut out, name, &labels);
    }
    let name = "grains_storage_duration_seconds";
    let _ = writeln!(out, "# HELP {name} Latency of grain-state operations.\n# TYPE {name} histogram");
    for (op, histogram) in [("read", &storage.read), ("write", &storage.write), ("clear", &storage.clear)] {
        histogram.write_prometheus(&mut out, name, &format!("op=\"{op}\""));
    }
    let name = "grains_storage_failures_total";
    let _ = writeln!(
        out,
        "# HELP {name} Grain-state operations that failed.\n# TYPE {name} counter\n{name} {}",
        storage.failures
    );
    let name = "grains_activations_by_type";
    let _ = writeln!(out, "# HELP {name} Activations in the table, by grain type.\n# TYPE {name} gauge");
    for (grain_type, count) in activations_by_type {
        let _ = writeln!(out, "{name}{{grain_type=\"{}\"}} {count}", label(grain_type));
    }
    let (queued, longest) = mailboxes;
    for (name, help, value) in [
        ("grains_mailbox_queued", "Calls waiting in mailboxes, all activations.", queued),
        ("grains_mailbox_longest", "Calls waiting in the longest mailbox.", longest),
    ] {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}");
    }
    out
}

/// A point-in-time copy of a silo's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MetricsSnapshot {
    /// Calls accepted for delivery since start.
    pub calls: u64,
    /// Calls refused before delivery (unknown type or method, cycles, shutdown).
    pub call_errors: u64,
    /// Client calls this silo's gateway passed on to another silo, the one holding the grain (the client then
    /// learns where the grain lives and calls that silo directly; a steady count means clients keep missing).
    pub gateway_forwards: u64,
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
            calls: self.calls.sum(),
            call_errors: self.call_errors.load(Ordering::Relaxed),
            gateway_forwards: self.gateway_forwards.load(Ordering::Relaxed),
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
            (
                "grains_gateway_forwards_total",
                "counter",
                "Client calls passed on to the silo holding the grain.",
                self.gateway_forwards,
            ),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_value_lands_in_the_bucket_whose_bounds_hold_it() {
        for v in (0..5000u64).chain([1 << 20, (1 << 20) + 1, 123_456_789, MAX_NANOS]) {
            let i = bucket_of(v);
            let lower = if i == 0 { 0 } else { bucket_upper(i - 1) };
            assert!(lower <= v && v < bucket_upper(i), "{v} in bucket {i} [{lower}, {})", bucket_upper(i));
        }
        assert_eq!(bucket_of(u64::MAX), BUCKETS - 1);
        for i in 4..BUCKETS {
            let (lower, upper) = (bucket_upper(i - 1), bucket_upper(i));
            assert!((upper - lower) * 4 <= lower, "bucket {i} is at most a quarter of its values wide");
        }
    }

    #[test]
    fn quantiles_are_read_from_the_buckets_within_a_quarter() {
        let h = Histogram::default();
        for micros in 1..=1000u64 {
            h.record(Duration::from_micros(micros));
        }
        let s = h.snapshot();
        assert_eq!(s.count, 1000);
        for (q, want) in [(0.5, 500_000.0), (0.99, 990_000.0)] {
            let got = s.quantile(q).unwrap();
            assert!((got - want).abs() / want < 0.25, "q{q}: {got} vs {want}");
        }
        let mut merged = s.clone();
        merged.merge(&s);
        assert_eq!(merged.count, 2000);
        assert!((merged.quantile(0.5).unwrap() - s.quantile(0.5).unwrap()).abs() < 1.0);
        assert_eq!(HistogramSnapshot::default().quantile(0.5), None);
    }

    #[test]
    fn prometheus_buckets_are_cumulative_and_end_at_the_count() {
        let h = Histogram::default();
        h.record(Duration::from_micros(3));
        h.record(Duration::from_millis(3));
        let mut out = String::new();
        h.snapshot().write_prometheus(&mut out, "x", "m=\"a\"");
        assert!(out.contains("x_bucket{m=\"a\",le=\"4.096e-6\"} 1"), "{out}");
        assert!(out.contains("x_bucket{m=\"a\",le=\"4.194304e-3\"} 2"), "{out}");
        assert!(out.contains("x_bucket{m=\"a\",le=\"+Inf\"} 2") && out.contains("x_count{m=\"a\"} 2"), "{out}");
    }
}
