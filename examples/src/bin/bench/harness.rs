//! The measuring harness shared by the benchmark sections: closed-loop workers, latency percentiles, CPU time
//! per call, tables.

use std::future::Future;
use std::time::{Duration, Instant};

/// A benchmark section.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Section {
    /// Warm local grain calls vs tokio channels.
    Local,
    /// Client → silo and silo → silo calls vs raw tonic and raw TCP.
    Remote,
    /// Activation rate, memory per activation, passivation rate.
    Activations,
    /// Grain state through the Postgres provider vs raw sqlx.
    Storage,
    /// The stateful cart vs a stateless handler on Postgres.
    Cart,
    /// Event-sourced recovery with and without snapshots; journal appends vs raw inserts.
    Journal,
}

/// What one measurement produced.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Stats {
    /// Completed operations per second.
    pub(crate) per_sec: f64,
    /// Median latency.
    pub(crate) p50: Duration,
    /// 99th percentile latency.
    pub(crate) p99: Duration,
    /// The whole process's CPU time (user + system, every thread: callers, silos and baselines alike) spent
    /// during the measurement, per completed operation. `None` where the process's CPU time cannot be read.
    pub(crate) cpu_per_op: Option<Duration>,
}

/// CPU time (user + system) the process's threads have used so far, in nanoseconds: the sum of each thread's
/// `/proc/self/task/*/schedstat` (Linux; `None` elsewhere). `/proc/self/stat` counts in 10 ms ticks, too coarse
/// for a few hundred calls; the runtime's worker threads live through every measurement, so none of the time
/// is lost with an exiting thread.
pub(crate) fn process_cpu_time() -> Option<Duration> {
    let mut total = 0u64;
    for task in std::fs::read_dir("/proc/self/task").ok()? {
        let Ok(schedstat) = std::fs::read_to_string(task.ok()?.path().join("schedstat")) else {
            continue; // the thread has just exited
        };
        total += schedstat.split_whitespace().next()?.parse::<u64>().ok()?;
    }
    Some(Duration::from_nanos(total))
}

/// CPU time per operation between two readings of [`process_cpu_time`].
pub(crate) fn cpu_per_op(before: Option<Duration>, after: Option<Duration>, ops: usize) -> Option<Duration> {
    let spent = after?.checked_sub(before?)?;
    (ops > 0).then(|| spent / ops as u32)
}

/// Runs `concurrency` closed-loop workers for `window`, each calling `op(worker)` back to back.
pub(crate) async fn measure<F, Fut>(concurrency: usize, window: Duration, op: F) -> anyhow::Result<Stats>
where
    F: Fn(usize) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = anyhow::Result<()>> + Send,
{
    let cpu_before = process_cpu_time();
    let started = Instant::now();
    let deadline = started + window;
    let workers: Vec<_> = (0..concurrency)
        .map(|worker| {
            let op = op.clone();
            tokio::spawn(async move {
                let mut latencies = Vec::with_capacity(4096);
                while Instant::now() < deadline {
                    let t = Instant::now();
                    op(worker).await?;
                    latencies.push(t.elapsed());
                }
                anyhow::Ok(latencies)
            })
        })
        .collect();
    let mut all = Vec::new();
    for worker in workers {
        all.extend(worker.await??);
    }
    let elapsed = started.elapsed();
    let cpu_per_op = cpu_per_op(cpu_before, process_cpu_time(), all.len());
    Ok(summarize(all, elapsed, cpu_per_op))
}

/// Runs `op` `times` times, one after the other (each a fresh start: a new connection, say).
pub(crate) async fn measure_sequential<F, Fut>(times: usize, op: F) -> anyhow::Result<Stats>
where
    F: Fn() -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    let cpu_before = process_cpu_time();
    let started = Instant::now();
    let mut all = Vec::with_capacity(times);
    for _ in 0..times {
        let t = Instant::now();
        op().await?;
        all.push(t.elapsed());
    }
    let elapsed = started.elapsed();
    let cpu_per_op = cpu_per_op(cpu_before, process_cpu_time(), all.len());
    Ok(summarize(all, elapsed, cpu_per_op))
}

fn summarize(mut all: Vec<Duration>, elapsed: Duration, cpu_per_op: Option<Duration>) -> Stats {
    all.sort_unstable();
    let pick = |q: f64| all.get(((all.len() as f64 * q) as usize).min(all.len().saturating_sub(1))).copied();
    Stats {
        per_sec: all.len() as f64 / elapsed.as_secs_f64(),
        p50: pick(0.50).unwrap_or_default(),
        p99: pick(0.99).unwrap_or_default(),
        cpu_per_op,
    }
}

/// Prints a table header for comparisons.
pub(crate) fn header(title: &str, baseline: &str) {
    println!();
    println!("## {title}");
    println!();
    println!("| measurement | callers | grains ops/s | p50 | p99 | {baseline} ops/s | p50 | p99 | ratio (ops/s) |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|");
}

/// Prints one comparison row.
pub(crate) fn row(name: &str, concurrency: usize, ours: Stats, baseline: Stats) {
    println!(
        "| {name} | {concurrency} | {:.0} | {} | {} | {:.0} | {} | {} | {:.2} |",
        ours.per_sec,
        micros(ours.p50),
        micros(ours.p99),
        baseline.per_sec,
        micros(baseline.p50),
        micros(baseline.p99),
        ours.per_sec / baseline.per_sec.max(f64::MIN_POSITIVE),
    );
}

/// Prints a table header for comparisons that show CPU time per call beside the latencies.
pub(crate) fn header_with_cpu(title: &str, baseline: &str) {
    println!();
    println!("## {title}");
    println!();
    println!(
        "| measurement | callers | grains ops/s | p50 | p99 | CPU/call | {baseline} ops/s | p50 | p99 | CPU/call | \
         ratio (ops/s) |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
}

/// Prints one comparison row with CPU time per call (process CPU time during the measurement ÷ calls).
pub(crate) fn row_with_cpu(name: &str, concurrency: usize, ours: Stats, baseline: Stats) {
    println!(
        "| {name} | {concurrency} | {:.0} | {} | {} | {} | {:.0} | {} | {} | {} | {:.2} |",
        ours.per_sec,
        micros(ours.p50),
        micros(ours.p99),
        cpu_micros(ours.cpu_per_op),
        baseline.per_sec,
        micros(baseline.p50),
        micros(baseline.p99),
        cpu_micros(baseline.cpu_per_op),
        ours.per_sec / baseline.per_sec.max(f64::MIN_POSITIVE),
    );
}

fn cpu_micros(d: Option<Duration>) -> String {
    d.map_or_else(|| "—".to_owned(), micros)
}

fn micros(d: Duration) -> String {
    format!("{:.1} µs", d.as_secs_f64() * 1e6)
}
