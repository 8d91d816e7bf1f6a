//! Activations: how fast a silo activates many distinct light grains, what an idle activation costs in memory,
//! and how fast the idle collector passivates them — beside one tokio task + channel per entity (the floor of
//! any actor-per-entity design) measured in the same run.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use grains_silo::{GrainTypeConfig, Silo, SiloConfig};
use tokio::sync::mpsc;

use crate::local::Echo;

/// Bytes the allocator has handed out and not had back (glibc's `mallinfo2().uordblks`): what live objects
/// hold, without the free holes between them that RSS also counts. `None` off glibc's malloc.
#[cfg(all(target_os = "linux", target_env = "gnu", not(feature = "mimalloc")))]
#[allow(unsafe_code)]
fn heap_in_use() -> Option<usize> {
    /// glibc's `struct mallinfo2`: ten `size_t` fields.
    #[repr(C)]
    struct MallInfo2 {
        fields: [usize; 10],
    }
    unsafe extern "C" {
        fn mallinfo2() -> MallInfo2;
    }
    // SAFETY: `mallinfo2` takes nothing and returns a plain struct by value (glibc 2.33 and later); the bench
    // uses the system allocator, whose statistics it reads.
    Some(unsafe { mallinfo2() }.fields[7])
}

#[cfg(not(all(target_os = "linux", target_env = "gnu", not(feature = "mimalloc"))))]
fn heap_in_use() -> Option<usize> {
    None
}

/// Resident set size of this process, in bytes.
fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1).and_then(|p| p.parse::<u64>().ok()))
        .map_or(0, |pages| pages * 4096)
}

/// Activates grains `0..count` from `concurrency` caller tasks, each calling the next grain not yet taken as
/// soon as its previous call is answered (a closed loop, like the other sections' callers): `concurrency` first
/// calls in flight at every moment, and no task spawned per call (the caller's task is the harness's, not the
/// grain's; until 2026-11-27 the bench spawned one per call, see BENCHMARKS.md).
async fn activate_all(silo: &Arc<Silo>, count: usize, concurrency: usize) -> anyhow::Result<()> {
    let next = Arc::new(AtomicUsize::new(0));
    let callers: Vec<_> = (0..concurrency)
        .map(|_| {
            let (silo, next) = (silo.clone(), next.clone());
            tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= count {
                        return anyhow::Ok(());
                    }
                    silo.grain::<Echo>(i as i64).bump(0).await?;
                }
            })
        })
        .collect();
    for caller in callers {
        caller.await??;
    }
    Ok(())
}

/// The baseline in a process of its own (this binary, `--activations-baseline COUNT`): how long it took, its
/// RSS delta per entity and its heap bytes in use per entity (negative where unknown).
async fn baseline_in_child(count: usize) -> anyhow::Result<(Duration, f64, f64)> {
    let output = tokio::process::Command::new(std::env::current_exe()?)
        .args(["--activations-baseline", &count.to_string()])
        .output()
        .await?;
    anyhow::ensure!(output.status.success(), "the baseline process failed: {output:?}");
    let text = String::from_utf8(output.stdout)?;
    let mut fields = text.split_whitespace();
    let mut next = || fields.next().ok_or_else(|| anyhow::anyhow!("the baseline process printed {text:?}"));
    let nanos: u64 = next()?.parse()?;
    let bytes: f64 = next()?.parse()?;
    let heap: f64 = next()?.parse()?;
    Ok((Duration::from_nanos(nanos), bytes, heap))
}

/// The baseline, run by the child process: one task and one channel per entity, each served once. Prints the
/// time taken in nanoseconds, the RSS delta per entity and the heap bytes in use per entity (-1 if unknown).
pub(crate) async fn baseline(count: usize) {
    let before = rss_bytes();
    let heap_before = heap_in_use();
    let started = Instant::now();
    let mut actors = Vec::with_capacity(count);
    for _ in 0..count {
        let (tx, mut rx) = mpsc::unbounded_channel::<u64>();
        tokio::spawn(async move { while rx.recv().await.is_some() {} });
        tx.send(0).ok();
        actors.push(tx);
    }
    tokio::task::yield_now().await;
    let time = started.elapsed();
    let bytes = rss_bytes().saturating_sub(before) as f64 / count as f64;
    let heap = heap_before.zip(heap_in_use()).map_or(-1.0, |(b, a)| a.saturating_sub(b) as f64 / count as f64);
    println!("{} {bytes} {heap}", time.as_nanos());
}

/// Activates `count` grains, measures memory, then passivates them all.
pub(crate) async fn run(count: usize) -> anyhow::Result<()> {
    let idle = Duration::from_secs(2);
    let mut config =
        SiloConfig { gateway: false, collection_interval: Duration::from_secs(3600), ..SiloConfig::default() };
    config.grain.insert("Echo".into(), GrainTypeConfig { idle_timeout: Some(idle) });
    let silo = Arc::new(Silo::builder().config(config).start().await?);

    // Each side on a heap of its own: the baseline runs in a child process. Measured in this process after the
    // baseline, grains' RSS delta hid in the memory the baseline had freed and the allocator kept (before
    // 2026-11-27 the bytes row read ~1.3 KB whatever grains held).
    let (baseline_time, baseline_bytes, baseline_heap) = baseline_in_child(count).await?;
    let before = rss_bytes();
    let heap_before = heap_in_use();
    let started = Instant::now();
    activate_all(&silo, count, 256).await?;
    let activation_time = started.elapsed();
    let bytes = rss_bytes().saturating_sub(before) as f64 / count as f64;
    let heap_bytes = heap_before.zip(heap_in_use()).map(|(b, a)| a.saturating_sub(b) as f64 / count as f64);
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
    if let Some(heap_bytes) = heap_bytes {
        println!(
            "| heap bytes per idle activation (in use: without the allocator's free holes) | {heap_bytes:.0} | \
             {baseline_heap:.0} | {:.2} |",
            heap_bytes / baseline_heap.max(1.0)
        );
    }
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
    if let Ok(silo) = Arc::try_unwrap(silo) {
        silo.shutdown(Duration::from_secs(30)).await;
    }
    Ok(())
}
