//! The event journal in Postgres: recovery time of an event-sourced grain with 10,000 events, with and without
//! snapshots (beside the raw `SELECT` of its events), and append throughput through the group-committing
//! journal beside one raw `INSERT` per append.

use std::sync::Arc;
use std::time::{Duration, Instant};

use grains::prelude::*;
use grains_silo::{Silo, SiloConfig, StorageKind};
use grains_storage::postgres::{self, PostgresJournal, PostgresOptions};
use grains_storage::{EventJournal, NewEvent, StateKey};
use serde_json::json;

use crate::harness::{header, measure, row};
use crate::storage::scratch_database;

/// Events per recovering grain.
const EVENTS: usize = 10_000;

/// A small state folded from many events: a balance, a count and the last few values.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub(crate) struct Tally {
    sum: i64,
    count: u64,
    recent: Vec<i64>,
}

/// The bench's event.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) enum TallyEvent {
    /// A value was added.
    Added {
        /// The value.
        value: i64,
        /// A note, so events have a realistic size (~100 bytes of JSON).
        note: String,
    },
}

impl EventSourced for Tally {
    type Event = TallyEvent;

    fn apply(&mut self, event: &TallyEvent) {
        let TallyEvent::Added { value, .. } = event;
        self.sum += value;
        self.count += 1;
        self.recent.push(*value);
        if self.recent.len() > 8 {
            self.recent.remove(0);
        }
    }
}

/// Recovers every event at activation.
#[grain(idle_timeout = "10m")]
pub(crate) struct BenchTally {
    #[journal(name = "tally")]
    tally: Journaled<Tally>,
    ctx: GrainContext,
}

#[grain]
impl BenchTally {
    /// Appends `n` events at once.
    pub(crate) async fn add_many(&mut self, n: u32) -> Result<u64, String> {
        let events = (0..n).map(|i| TallyEvent::Added { value: i64::from(i), note: note(i) });
        self.tally.persist_all(events).await.map_err(|e| e.to_string())
    }

    /// (snapshot seq, events replayed) of this activation.
    pub(crate) async fn recovery(&self) -> (Option<u64>, u64) {
        let r = self.tally.recovery();
        (r.snapshot, r.replayed)
    }

    /// Deactivates after this call.
    pub(crate) async fn deactivate(&self) {
        self.ctx.deactivate_on_idle();
    }
}

/// Recovers from a snapshot taken every 1,000 events.
#[grain(idle_timeout = "10m")]
pub(crate) struct BenchTallySnapshotted {
    #[journal(name = "tally", snapshot_every = 1000)]
    tally: Journaled<Tally>,
    ctx: GrainContext,
}

#[grain]
impl BenchTallySnapshotted {
    /// Appends `n` events at once.
    pub(crate) async fn add_many(&mut self, n: u32) -> Result<u64, String> {
        let events = (0..n).map(|i| TallyEvent::Added { value: i64::from(i), note: note(i) });
        self.tally.persist_all(events).await.map_err(|e| e.to_string())
    }

    /// (snapshot seq, events replayed) of this activation.
    pub(crate) async fn recovery(&self) -> (Option<u64>, u64) {
        let r = self.tally.recovery();
        (r.snapshot, r.replayed)
    }

    /// Deactivates after this call.
    pub(crate) async fn deactivate(&self) {
        self.ctx.deactivate_on_idle();
    }
}

fn note(i: u32) -> String {
    format!("item {i:05} added to the order by the bench, for a realistic payload")
}

pub(crate) async fn run(admin_url: &str, window: Duration, quick: bool) -> anyhow::Result<()> {
    scratch_database(admin_url, "journal", |url: String| async move { run_on(&url, window, quick).await }).await
}

async fn run_on(url: &str, window: Duration, quick: bool) -> anyhow::Result<()> {
    recovery(url, if quick { 2 } else { 5 }).await?;
    appends(url, window).await
}

fn millis(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort_unstable();
    samples[samples.len() / 2]
}

/// Recovery of a grain with 10,000 events: the first call after deactivation, timed, per key; medians.
async fn recovery(url: &str, keys: usize) -> anyhow::Result<()> {
    let config = SiloConfig {
        gateway: false,
        storage: StorageKind::Postgres,
        database_url: Some(url.to_owned()),
        ..SiloConfig::default()
    };
    let silo = Silo::builder().config(config).start().await?;
    for k in 0..keys {
        let (plain, snapped) = (silo.grain::<BenchTally>(k as i64), silo.grain::<BenchTallySnapshotted>(k as i64));
        // 25 appends of 400: snapshots (every 1,000 or more) land at 1,200, 2,400, ..., 9,600.
        for _ in 0..EVENTS / 400 {
            plain.add_many(400).await?.map_err(anyhow::Error::msg)?;
            snapped.add_many(400).await?.map_err(anyhow::Error::msg)?;
        }
    }
    let pool = postgres::connect(url, &PostgresOptions::default()).await?;
    let (mut full, mut from_snapshot, mut raw) = (Vec::new(), Vec::new(), Vec::new());
    let (mut full_stats, mut snapshot_stats) = ((None, 0), (None, 0));
    for k in 0..keys {
        let plain = silo.grain::<BenchTally>(k as i64);
        plain.deactivate().await?;
        let t = Instant::now();
        full_stats = plain.recovery().await?;
        full.push(t.elapsed());

        let snapped = silo.grain::<BenchTallySnapshotted>(k as i64);
        snapped.deactivate().await?;
        let t = Instant::now();
        snapshot_stats = snapped.recovery().await?;
        from_snapshot.push(t.elapsed());

        // The floor: the same 10,000 rows read with one raw SELECT, decoded to JSON, no fold.
        let t = Instant::now();
        let rows: Vec<(serde_json::Value,)> = sqlx::query_as(
            "SELECT payload FROM grains_journal WHERE grain_type = 'BenchTally' AND grain_key = $1 AND stream = 'tally'
             ORDER BY seq",
        )
        .bind(grains::GrainKey::Int(k as i64).storage_key())
        .fetch_all(&pool)
        .await?;
        raw.push(t.elapsed());
        anyhow::ensure!(rows.len() == EVENTS, "{} rows", rows.len());
    }
    println!();
    println!("## Event-sourced grain recovery, {EVENTS} events in Postgres (median of {keys} grains)");
    println!();
    println!("| recovery | first call after deactivation | snapshot used | events replayed |");
    println!("|---|---:|---:|---:|");
    println!("| full replay | {} | {:?} | {} |", millis(median(full)), full_stats.0, full_stats.1);
    println!(
        "| snapshot every 1,000 | {} | {:?} | {} |",
        millis(median(from_snapshot)),
        snapshot_stats.0,
        snapshot_stats.1
    );
    println!("| raw SELECT of the {EVENTS} payloads (no grain, no fold) | {} | | |", millis(median(raw)));
    silo.shutdown(Duration::from_secs(5)).await;
    pool.close().await;
    Ok(())
}

/// Appends of one event to distinct streams, through the journal and as raw inserts.
async fn appends(url: &str, window: Duration) -> anyhow::Result<()> {
    let options = PostgresOptions { pool_size: 32, ..PostgresOptions::default() };
    let pool = postgres::connect(url, &options).await?;
    sqlx::query(
        "CREATE TABLE bench_events (stream TEXT NOT NULL, seq BIGINT NOT NULL, payload JSONB NOT NULL,
                                    PRIMARY KEY (stream, seq))",
    )
    .execute(&pool)
    .await?;
    let journal = Arc::new(PostgresJournal::new(pool.clone()));
    header("Journal appends, one event each to its own stream (group commit vs raw sqlx INSERT)", "raw INSERT");
    for (round, writers) in [1usize, 16, 64].into_iter().enumerate() {
        let seqs: Arc<Vec<std::sync::atomic::AtomicU64>> =
            Arc::new((0..writers).map(|_| std::sync::atomic::AtomicU64::new(0)).collect());
        let (j, s) = (journal.clone(), seqs.clone());
        let ours = measure(writers, window, move |w| {
            let (journal, seqs) = (j.clone(), s.clone());
            async move {
                let stream = StateKey::new("BenchAppend", format!("s:{round}-{w}"), "events");
                let expected = seqs[w].load(std::sync::atomic::Ordering::Relaxed);
                let event =
                    NewEvent { event_type: "Added".into(), payload: json!({"Added": {"value": w}}), tags: vec![] };
                let last = journal.append(&stream, expected, &[event]).await?;
                seqs[w].store(last, std::sync::atomic::Ordering::Relaxed);
                Ok(())
            }
        })
        .await?;
        let seqs: Arc<Vec<std::sync::atomic::AtomicU64>> =
            Arc::new((0..writers).map(|_| std::sync::atomic::AtomicU64::new(0)).collect());
        let (p, s) = (pool.clone(), seqs.clone());
        let raw = measure(writers, window, move |w| {
            let (pool, seqs) = (p.clone(), s.clone());
            async move {
                let seq = seqs[w].fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
                sqlx::query("INSERT INTO bench_events (stream, seq, payload) VALUES ($1, $2, $3)")
                    .bind(format!("{round}-{w}"))
                    .bind(seq as i64)
                    .bind(json!({"Added": {"value": w}}))
                    .execute(&pool)
                    .await?;
                Ok(())
            }
        })
        .await?;
        row("append 1 event", writers, ours, raw);
    }
    pool.close().await;
    Ok(())
}
