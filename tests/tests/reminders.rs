//! Durable reminders in silos of one process: ticks on the reminder's grid, refused registrations, a reminder
//! 60 days ahead, retries of a failing grain with the missed ticks reported, ranges that move with
//! membership, and 10,000 reminders over three silos (the firing figures are printed: run with
//! `--nocapture`).

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use grains_silo::{Silo, SiloConfig, StorageKind};
use grains_tests::pg::TestDatabase;
use grains_tests::{
    BEACON_TICKS, Beacon, Remindful, SharedCluster, Ticker, reminder_ticks, scaled, start_silo, test_config,
    wait_for_active,
};

/// Polls `condition` every 20 ms until it holds or `limit` (scaled) passes; whether it held.
async fn eventually(limit: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + scaled(limit);
    while tokio::time::Instant::now() < deadline {
        if condition() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    condition()
}

fn unix_ms(at: SystemTime) -> i64 {
    at.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

fn delivered(key: &str) -> Vec<grains_tests::TickRecord> {
    reminder_ticks(key).into_iter().filter(|t| !t.refused).collect()
}

/// A config for reminder tests: reminders read again every second.
fn config() -> SiloConfig {
    SiloConfig { reminder_refresh_interval: Duration::from_secs(1), ..test_config() }
}

/// The silo's `/metrics` page, fetched over its port.
async fn scrape_metrics(silo: &Silo) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(silo.gateway_addr().expect("a gateway")).await.unwrap();
    stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: silo\r\nConnection: close\r\n\r\n").await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    response
}

/// The value of the sample line that starts with `prefix` (name and labels, then a space).
fn metric(text: &str, prefix: &str) -> u64 {
    let line = text.lines().find(|l| l.starts_with(prefix)).unwrap_or_else(|| panic!("no {prefix:?} in {text}"));
    line[prefix.len()..].trim().parse().unwrap_or_else(|_| panic!("not a count: {line}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reminder_fires_each_period_on_its_grid_and_stops_once_unregistered() {
    let silo = start_silo(SiloConfig { gateway: true, port: 0, ..config() }).await;
    let grain = silo.grain::<Remindful>("grid");
    let first_due = grain.remind("r".into(), 300, 1_000).await.unwrap().unwrap() as i64;
    assert!(eventually(Duration::from_secs(10), || delivered("grid").len() >= 3).await, "three ticks arrive");
    let ticks = delivered("grid");
    for (i, tick) in ticks.iter().enumerate() {
        assert_eq!(unix_ms(tick.due), first_due + 1_000 * i as i64, "tick {i} is due on the grid: {ticks:?}");
        assert_eq!(tick.missed, 0, "nothing was missed");
        let late = unix_ms(tick.at) - unix_ms(tick.due);
        assert!((0..1_000).contains(&late), "tick {i} arrived {late} ms after it was due");
    }
    let stored = grain.stored().await.unwrap();
    assert!(stored.ticks >= 3 && stored.missed == 0, "{stored:?}");
    let listed = grain.reminders().await.unwrap().unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!((listed[0].0.as_str(), listed[0].2), ("r", 1_000));
    // Operators see the ticks and how late they came on /metrics.
    let metrics = scrape_metrics(&silo).await;
    let delivered_ticks = metric(&metrics, "grains_reminder_ticks_delivered_total ");
    assert!(delivered_ticks >= 3, "{metrics}");
    assert_eq!(metric(&metrics, "grains_reminder_lag_seconds_count{} "), delivered_ticks, "one lag per tick");
    assert!(metric(&metrics, "grains_reminder_lag_seconds_bucket{le=\"+Inf\"} ") >= 3, "{metrics}");

    assert!(grain.forget("r".into()).await.unwrap().unwrap(), "it was registered");
    let unregistered_at = unix_ms(SystemTime::now());
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    let late: Vec<_> = delivered("grid").into_iter().filter(|t| unix_ms(t.due) > unregistered_at).collect();
    assert!(late.is_empty(), "no tick due after the reminder was unregistered: {late:?}");
    assert!(!grain.forget("r".into()).await.unwrap().unwrap(), "gone");
    assert!(grain.reminders().await.unwrap().unwrap().is_empty());
    silo.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registrations_below_a_second_or_without_on_reminder_are_refused() {
    let silo = start_silo(config()).await;
    let grain = silo.grain::<Remindful>("refused");
    let short = grain.remind("fast".into(), 0, 999).await.unwrap().unwrap_err();
    assert!(short.contains("at least 1s"), "{short}");
    let unnamed = grain.remind(String::new(), 0, 1_000).await.unwrap().unwrap_err();
    assert!(unnamed.contains("invalid reminder name"), "{unnamed}");
    let without_hook = silo.grain::<Ticker>("no-hook").try_reminder().await.unwrap().unwrap_err();
    assert!(without_hook.contains("no `on_reminder`"), "{without_hook}");
    assert!(grain.reminders().await.unwrap().unwrap().is_empty(), "nothing was stored");
    silo.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reminder_due_in_60_days_is_stored_and_listed_with_its_due_time() {
    let db = TestDatabase::create().await;
    let config = SiloConfig { storage: StorageKind::Postgres, database_url: Some(db.url().to_owned()), ..config() };
    let silo = Silo::builder().config(config).start().await.unwrap();
    let grain = silo.grain::<Remindful>("far");
    let sixty_days = 60 * 86_400_000;
    let before = unix_ms(SystemTime::now());
    let due = grain.remind("in-60-days".into(), sixty_days, 86_400_000).await.unwrap().unwrap() as i64;
    let after = unix_ms(SystemTime::now());
    assert!((before + sixty_days as i64..=after + sixty_days as i64).contains(&due), "due {due}");
    grain.remind("soon".into(), 60_000, 60_000).await.unwrap().unwrap();

    let listed = grain.reminders().await.unwrap().unwrap();
    let far = listed.iter().find(|(name, _, _)| name == "in-60-days").expect("listed");
    assert_eq!((far.1 as i64, far.2), (due, 86_400_000), "listed with its due time and period");
    let pool = db.pool().await;
    let (stored, period): (i64, i64) = sqlx::query_as(
        "SELECT (extract(epoch from next_due) * 1000)::bigint, period_ms FROM grains_reminders WHERE name = 'in-60-days'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!((stored, period), (due, 86_400_000), "stored with its due time");
    pool.close().await;
    // Its owner holds only what is due within its horizon (two refresh intervals): the one due in a minute
    // is not held either, nor armed on any timer.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(silo.reminder_stats().held, 0, "{:?}", silo.reminder_stats());
    grain.remind("now".into(), 0, 60_000).await.unwrap().unwrap();
    assert!(eventually(Duration::from_secs(5), || delivered("far").len() == 1).await, "a near one fires");
    silo.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silo_reads_the_postgres_table_through_its_index_never_scanning_it() {
    use grains_storage::ReminderTable;
    use grains_storage::postgres::PostgresReminderTable;

    let db = TestDatabase::create().await;
    let pool = db.pool().await;
    // 100,000 reminders over the ring, due over the next 100 days.
    sqlx::query(
        "INSERT INTO grains_reminders (grain_type, grain_key, name, grain_hash, start_at, period_ms, etag, next_due)
         SELECT 'Beacon', 'i:' || i, 'r', (i::bigint * 2654435761) % 4294967296,
                now() + i * interval '86 seconds', 60000, i, now() + i * interval '86 seconds'
         FROM generate_series(1, 100000) AS i",
    )
    .execute(&pool)
    .await
    .unwrap();
    sqlx::query("ANALYZE grains_reminders").execute(&pool).await.unwrap();
    pool.close().await;
    // The ranges one silo of three owns, as the reminder service computes them.
    let silos: Vec<grains_storage::SiloAddress> =
        (1..=3).map(|i| grains_storage::SiloAddress { endpoint: format!("127.0.0.1:{i}"), epoch: i }).collect();
    let ranges = grains_silo::__private::HashRing::new(&silos).ranges_of(&silos[0]);

    let scans = async || -> (i64, i64) {
        let pool = db.pool().await;
        let counts = sqlx::query_as(
            "SELECT coalesce(seq_scan, 0), coalesce(idx_scan, 0) FROM pg_stat_user_tables WHERE relname = 'grains_reminders'",
        )
        .fetch_one(&pool)
        .await
        .unwrap();
        pool.close().await;
        counts
    };
    let before = scans().await;
    let pool = db.pool().await;
    let table = PostgresReminderTable::new(pool.clone());
    let horizon = unix_ms(SystemTime::now()) + 60_000;
    let due = table.read_due(&ranges, horizon).await.unwrap();
    pool.close().await; // a backend's statistics are written when it exits
    let mut after = scans().await;
    for _ in 0..50 {
        if after.1 > before.1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        after = scans().await;
    }
    assert!(due.len() < 10, "only what is due within a minute: {}", due.len());
    assert!(after.1 > before.1, "the read went through the index: {before:?} -> {after:?}");
    assert_eq!(after.0, before.0, "and never scanned the table: {before:?} -> {after:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_grain_is_retried_with_backoff_and_then_told_how_many_ticks_it_missed() {
    let silo = start_silo(config()).await;
    let grain = silo.grain::<Remindful>("failing");
    grain.refuse(3).await.unwrap().unwrap();
    let first_due = grain.remind("r".into(), 0, 1_000).await.unwrap().unwrap() as i64;
    assert!(eventually(Duration::from_secs(20), || delivered("failing").len() >= 2).await, "delivered in the end");
    let ticks = reminder_ticks("failing");
    let refused: Vec<_> = ticks.iter().filter(|t| t.refused).collect();
    assert_eq!(refused.len(), 3, "three refusals: {ticks:?}");
    // Retries after 1 s, then 2 s: backoff, not a retry per period.
    let gaps: Vec<i64> = ticks.windows(2).take(3).map(|w| unix_ms(w[1].at) - unix_ms(w[0].at)).collect();
    assert!(gaps[0] >= 900 && gaps[1] >= 1_900 && gaps[2] >= 3_900, "backoff 1 s, 2 s, 4 s: {gaps:?}");
    let first = &delivered("failing")[0];
    let elapsed = (unix_ms(first.due) - first_due) / 1_000;
    assert!(first.missed >= 5, "the first delivered tick reports the ticks missed meanwhile: {first:?}");
    assert_eq!(first.missed as i64, elapsed, "every tick due before it, and none twice");
    let second = &delivered("failing")[1];
    assert_eq!((second.missed, unix_ms(second.due) - unix_ms(first.due)), (0, 1_000), "then on time again");
    assert!(silo.reminder_stats().failed >= 3);
    silo.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_cannot_forge_a_reminder_tick() {
    use grains_silo::wire::{Envelope, WireGrainId};
    let silo = start_silo(SiloConfig { gateway: true, port: 0, ..config() }).await;
    let mut outsider =
        grains_tests::raw_stream::RawEnvelopeStream::open(&format!("http://{}", silo.gateway_addr().unwrap())).await;
    let tick = grains::ReminderTick::new("forged", SystemTime::now(), Duration::from_secs(1), 0);
    let forged = Envelope {
        target: Some(WireGrainId::from(&grains::GrainId::new("Remindful", "forged"))),
        method: grains::reminder::REMINDER_METHOD.into(),
        payload: grains::codec::encode(&tick).unwrap().into(),
        ..Default::default()
    };
    let refused = outsider.call(forged).await;
    assert!(matches!(refused, Err(grains::CallError::PermissionDenied(_))), "{refused:?}");
    assert!(reminder_ticks("forged").is_empty(), "the grain never saw it");
    silo.shutdown(Duration::from_secs(5)).await;
}

/// Beacon ticks since `since`, by grain key: the due times delivered (ascending, duplicates kept).
fn beacon_dues(keys: std::ops::Range<i64>, since: SystemTime) -> HashMap<i64, Vec<i64>> {
    let mut dues: HashMap<i64, Vec<i64>> = HashMap::new();
    for (key, due, _) in BEACON_TICKS.lock().unwrap().iter() {
        if keys.contains(key) && *due >= since {
            dues.entry(*key).or_default().push(unix_ms(*due));
        }
    }
    for list in dues.values_mut() {
        list.sort_unstable();
    }
    dues
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reminder_ranges_move_with_membership() {
    let shared = SharedCluster::new();
    let adjust = |c: SiloConfig| SiloConfig { reminder_refresh_interval: Duration::from_secs(1), ..c };
    let mut silos = vec![shared.start_member(0, adjust).await, shared.start_member(1, adjust).await];
    wait_for_active(&silos, 2).await;
    let keys = 1_000..1_300i64;
    for key in keys.clone() {
        silos[0].grain::<Beacon>(key).arm(key as u64 % 1_000, 1_000).await.unwrap().unwrap();
    }
    let armed = SystemTime::now() + Duration::from_secs(1);
    tokio::time::sleep(Duration::from_secs(3)).await;

    silos.push(shared.start_member(2, adjust).await);
    wait_for_active(&silos, 3).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let newcomer = silos[2].reminder_stats();
    assert!(
        newcomer.ranges > 0 && newcomer.held > 0 && newcomer.delivered > 0,
        "the new silo fires its ranges: {newcomer:?}"
    );

    // A silo leaves: its ranges go to the others.
    let leaving = silos.remove(0);
    let left = leaving.reminder_stats();
    leaving.shutdown(Duration::from_secs(5)).await;
    wait_for_active(&silos, 2).await;
    let departed = SystemTime::now();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(left.delivered > 0, "the silo that left had fired its share: {left:?}");

    // Every beacon got every tick due since it was armed, through both changes (a tick may come twice
    // around a change; none is skipped, or at worst reported as missed).
    let dues = beacon_dues(keys.clone(), armed);
    let end = unix_ms(SystemTime::now()) - 1_500;
    let mut duplicates = 0;
    for key in keys.clone() {
        let list = dues.get(&key).unwrap_or_else(|| panic!("beacon {key} got no tick"));
        assert!(*list.last().unwrap() >= unix_ms(departed) + 1_000, "beacon {key} still ticks: {list:?}");
        for pair in list.windows(2) {
            assert!(pair[1] - pair[0] <= 1_000, "beacon {key} skipped a tick: {list:?}");
            duplicates += usize::from(pair[1] == pair[0]);
        }
        assert!(*list.last().unwrap() >= end, "beacon {key} is up to date: {list:?}");
    }
    println!(
        "ranges moved twice; {duplicates} ticks delivered twice around the changes (of {})",
        dues.values().map(Vec::len).sum::<usize>()
    );
    for silo in silos {
        silo.shutdown(Duration::from_secs(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ten_thousand_reminders_over_three_silos_each_fire_within_a_period_of_due() {
    const REMINDERS: i64 = 10_000;
    let period_ms: u64 = std::env::var("GRAINS_REMINDER_PERIOD_MS").ok().and_then(|p| p.parse().ok()).unwrap_or(5_000);
    let mut shared = SharedCluster::new();
    // GRAINS_REMINDER_TABLE=postgres keeps the reminders in Postgres (progress written there as ticks land).
    let in_postgres = std::env::var("GRAINS_REMINDER_TABLE").is_ok_and(|t| t == "postgres");
    let _database = if in_postgres {
        let db = TestDatabase::create().await;
        shared.reminders = std::sync::Arc::new(grains_storage::postgres::PostgresReminderTable::new(db.pool().await));
        Some(db)
    } else {
        None
    };
    let adjust = |c: SiloConfig| SiloConfig { reminder_refresh_interval: Duration::from_secs(2), ..c };
    let mut silos = Vec::new();
    for i in 0..3 {
        silos.push(shared.start_member(i, adjust).await);
    }
    wait_for_active(&silos, 3).await;
    let keys = 100_000..100_000 + REMINDERS;
    let registering = std::time::Instant::now();
    let mut arming = tokio::task::JoinSet::new();
    for (i, chunk) in keys.clone().collect::<Vec<_>>().chunks(REMINDERS as usize / 64).enumerate() {
        let reference = silos[i % 3].runtime();
        let chunk = chunk.to_vec();
        arming.spawn(async move {
            for key in chunk {
                // First due 2 s from now, spread over a period.
                let due = 2_000 + (key as u64 * 7_919) % period_ms;
                let beacon = grains::GrainRef::from_core(grains::__private::RefCore::new(
                    grains::GrainId::new("Beacon", key),
                    reference.clone(),
                ));
                let beacon: grains_tests::BeaconRef = beacon;
                // A registration may be repeated: a call that failed in flight (a loaded machine) is retried.
                let mut attempts = 0;
                while let Err(error) = beacon.arm(due, period_ms).await.map(Result::unwrap) {
                    attempts += 1;
                    assert!(attempts < 5, "arming beacon {key}: {error}");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        });
    }
    arming.join_all().await;
    let registered_in = registering.elapsed();
    let started = SystemTime::now();
    let periods = 3;
    let watch = Duration::from_millis(2_000 + periods * period_ms);
    tokio::time::sleep(watch).await;
    let ended = SystemTime::now();

    // Every tick due between the start and a period before the end must have arrived, within a period.
    let ticks: Vec<(i64, SystemTime, SystemTime)> = BEACON_TICKS
        .lock()
        .unwrap()
        .iter()
        .filter(|(k, due, _)| keys.contains(k) && *due >= started)
        .cloned()
        .collect();
    let mut by_key: HashMap<i64, Vec<i64>> = HashMap::new();
    let mut lateness: Vec<i64> = Vec::with_capacity(ticks.len());
    for (key, due, at) in &ticks {
        by_key.entry(*key).or_default().push(unix_ms(*due));
        lateness.push(unix_ms(*at) - unix_ms(*due));
    }
    // Each beacon's first tick is due at most 2 s + a period after its registration, so by then; from its
    // first tick on, one per period, up to a period before the end.
    let horizon = unix_ms(ended) - period_ms as i64;
    let first_by = unix_ms(started) + 2_000 + period_ms as i64;
    let mut missing = Vec::new();
    for key in keys.clone() {
        let dues = by_key.entry(key).or_default();
        dues.sort_unstable();
        dues.dedup();
        let Some(&first) = dues.first().filter(|first| **first <= first_by) else {
            missing.push((key, dues.first().copied().unwrap_or(-1)));
            continue;
        };
        let mut due = first;
        while due <= horizon {
            if dues.binary_search(&due).is_err() {
                missing.push((key, due));
            }
            due += period_ms as i64;
        }
    }
    lateness.sort_unstable();
    let percentile = |p: f64| lateness[((lateness.len() - 1) as f64 * p) as usize];
    let window = ended.duration_since(started).unwrap().as_secs_f64();
    let per_silo: Vec<String> = silos
        .iter()
        .map(|s| {
            let stats = s.reminder_stats();
            format!("{} held / {} delivered / {} failed", stats.held, stats.delivered, stats.failed)
        })
        .collect();
    println!(
        "{REMINDERS} reminders in {}, period {period_ms} ms, 3 silos: registered in {registered_in:?} ({:.0}/s); \
         {} ticks in {window:.1} s = {:.0} ticks/s; lateness p50 {} ms, p99 {} ms, max {} ms; per silo: {}",
        if in_postgres { "Postgres" } else { "memory" },
        REMINDERS as f64 / registered_in.as_secs_f64(),
        ticks.len(),
        ticks.len() as f64 / window,
        percentile(0.5),
        percentile(0.99),
        lateness.last().unwrap(),
        per_silo.join(", "),
    );
    assert!(missing.is_empty(), "{} ticks missing, e.g. {:?}", missing.len(), &missing[..missing.len().min(5)]);
    let late = lateness.iter().filter(|l| **l >= period_ms as i64).count();
    assert_eq!(late, 0, "every tick arrives within a period of its due time");
    let owners: BTreeMap<usize, usize> =
        silos.iter().enumerate().map(|(i, s)| (i, s.reminder_stats().delivered as usize)).collect();
    assert!(owners.values().all(|d| *d > 0), "every silo fires its share: {owners:?}");
    for silo in silos {
        silo.shutdown(Duration::from_secs(5)).await;
    }
}
