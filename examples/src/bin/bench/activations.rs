//! Activations: how fast a silo activates many distinct light grains, what an idle activation costs in memory,
//! and how fast the idle collector passivates them — beside one tokio task + channel per entity (the floor of
//! any actor-per-entity design) measured in the same run.

use std::time::{Duration, Instant};

use grains_silo::{GrainTypeConfig, Silo, SiloConfig};
use tokio::sync::mpsc;

use crate::local::Echo;

/// Resident set size of this process, in bytes.
fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1).and_then(|p| p.parse::<u64>().ok()))
        .map_or(0, |pages| pages * 4096)
}

async fn activate_all(silo: &Silo, count: usize, concurrency: usize) -> anyhow::Result<()> {
    let mut next = 0usize;
    while next < count {
        let batch: Vec<_> = (next..(next + concurrency * 16).min(count))
            .map(|i| {
                let echo = silo.grain::<Echo>(i as i64);
                tokio::spawn(async move { echo.bump(0).await })
            })
            .collect();
        next += batch.len();
        for call in batch {
            call.await??;
        }
    }
    Ok(())
}

/// Activates `count` grains, measures memory, then passivates them all.
pub(crate) async fn run(count: usize) -> anyhow::Result<()> {
    let idle = Duration::from_secs(2);
    let mut config =
        SiloConfig { gateway: false, collection_interval: Duration::from_secs(3600), ..SiloConfig::default() };
    config.grain.insert("Echo".into(), GrainTypeConfig { idle_timeout: Some(idle) });
    let silo = Silo::builder().config(config).start().await?;

    // Baseline: one task and one channel per entity, each served once.
    let before = rss_bytes();
    let started = Instant::now();
    let mut actors = Vec::with_capacity(count);
    for _ in 0..count {
        let (tx, mut rx) = mpsc::unbounded_channel::<u64>();
        tokio::spawn(async move { while rx.recv().await.is_some() {} });
        tx.send(0).ok();
        actors.push(tx);
    }
    tokio::task::yield_now().await;
    let baseline_time = started.elapsed();
    let baseline_bytes = rss_bytes().saturating_sub(before) as f64 / count as f64;
    drop(actors);
    tokio::time::sleep(Duration::from_millis(200)).await;

    let before = rss_bytes();
    let started = Instant::now();
    activate_all(&silo, count, 256).await?;
    let activation_time = started.elapsed();
    let bytes = rss_bytes().saturating_sub(before) as f64 / count as f64;
    let active = silo.activation_count();

    tokio::time::sleep(idle + Duration::from_millis(100)).await;
    let started = Instant::now();
    silo.collect_idle_now();
    while silo.activation_count() > 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let passivation_time = started.elapsed();

    println!();
    println!("## Activations ({count} distinct light grains, one silo)");
    println!();
    println!("| measurement | grains | baseline: task + channel per entity | ratio |");
    println!("|---|---:|---:|---:|");
    println!(
        "| activations/s | {:.0} | {:.0} | {:.2} |",
        count as f64 / activation_time.as_secs_f64(),
        count as f64 / baseline_time.as_secs_f64(),
        baseline_time.as_secs_f64() / activation_time.as_secs_f64()
    );
    println!(
        "| bytes per idle activation (RSS delta / count) | {bytes:.0} | {baseline_bytes:.0} | {:.2} |",
        bytes / baseline_bytes.max(1.0)
    );
    println!(
        "| passivations/s (idle collector) | {:.0} | — | — |",
        count as f64 / passivation_time.as_secs_f64().max(f64::MIN_POSITIVE)
    );
    println!();
    println!(
        "{active} activations were live at the peak; {count} in {:.2} s; all passivated in {:.2} s.",
        activation_time.as_secs_f64(),
        passivation_time.as_secs_f64()
    );
    silo.shutdown(Duration::from_secs(30)).await;
    Ok(())
}
