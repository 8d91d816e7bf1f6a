//! The measuring harness shared by the benchmark sections: closed-loop workers, latency percentiles, tables.

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
}

/// Runs `concurrency` closed-loop workers for `window`, each calling `op(worker)` back to back.
pub(crate) async fn measure<F, Fut>(concurrency: usize, window: Duration, op: F) -> anyhow::Result<Stats>
where
    F: Fn(usize) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = anyhow::Result<()>> + Send,
{
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
    all.sort_unstable();
    let pick = |q: f64| all.get(((all.len() as f64 * q) as usize).min(all.len().saturating_sub(1))).copied();
    Ok(Stats {
        per_sec: all.len() as f64 / elapsed.as_secs_f64(),
        p50: pick(0.50).unwrap_or_default(),
        p99: pick(0.99).unwrap_or_default(),
    })
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

fn micros(d: Duration) -> String {
    format!("{:.1} µs", d.as_secs_f64() * 1e6)
}
