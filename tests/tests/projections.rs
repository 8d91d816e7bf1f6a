//! Projections: one runner per cluster at a time, every event's effect in the read model exactly once, and a
//! runner killed mid-stream (silo shut down in-process, or the silo process killed) resumed by another silo
//! from the committed offset.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use grains_silo::StorageKind;
use grains_silo::{Client, EventStorage, FailureDetection, Projection, ProjectionError, ReadModel, Silo, SiloConfig};
use grains_storage::postgres::PgPool;
use grains_storage::{EventSelector, MembershipTable, MemoryMembershipTable, StoredEvent};
use grains_tests::es::{AppliedLog, Ledger};
use grains_tests::pg::TestDatabase;
use grains_tests::process::{SiloLauncher, SiloProcess};
use grains_tests::scaled;

/// A silo of an in-process cluster sharing `table`, listening on a free port.
fn member_config(name: &str) -> SiloConfig {
    SiloConfig {
        name: name.to_owned(),
        port: 0,
        gateway: true,
        failure_detection: FailureDetection::Fast,
        ..grains_tests::test_config()
    }
}

/// Waits until `done` holds, up to `limit` (scaled); panics with `what` otherwise.
async fn wait_until(limit: Duration, what: &str, mut done: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + scaled(limit);
    while !done().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// An in-memory read model that records which silo applied which event, and how many applies overlapped.
#[derive(Clone)]
struct Recorder {
    silo: String,
    log: Arc<Mutex<Vec<(String, u64, String)>>>,
    in_flight: Arc<AtomicUsize>,
    most_in_flight: Arc<AtomicUsize>,
}

#[async_trait::async_trait]
impl Projection for Recorder {
    fn name(&self) -> &str {
        "recorder"
    }

    fn selector(&self) -> EventSelector {
        EventSelector::Tag("ledger".into())
    }

    fn poll_interval(&self) -> Duration {
        Duration::from_millis(10)
    }

    async fn apply(&self, read_model: ReadModel<'_>, event: &StoredEvent) -> Result<(), ProjectionError> {
        let ReadModel::Memory = read_model else { return Err(ProjectionError::unsupported(&read_model)) };
        let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        self.most_in_flight.fetch_max(now, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(1)).await;
        self.log.lock().unwrap().push((event.stream.grain_key.clone(), event.seq, self.silo.clone()));
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
        Ok(())
    }
}

/// Checks that `log` holds each of `expected` (grain key → events) once, each stream in order.
fn assert_each_once_in_order(log: &[(String, u64, String)], expected: &BTreeMap<String, u64>) {
    let mut per_stream: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for (key, seq, _) in log {
        per_stream.entry(key.clone()).or_default().push(*seq);
    }
    for (key, &n) in expected {
        assert_eq!(per_stream.get(key), Some(&(1..=n).collect::<Vec<_>>()), "{key}: every event once, in order");
    }
    assert_eq!(per_stream.len(), expected.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_memory_projection_runs_on_one_silo_at_a_time_and_moves_when_that_silo_stops() {
    let table: Arc<dyn MembershipTable> = Arc::new(MemoryMembershipTable::new());
    let storage = EventStorage::memory();
    let log = Arc::new(Mutex::new(Vec::new()));
    let (in_flight, most) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let mut silos = Vec::new();
    for i in 0..3 {
        let recorder = Recorder {
            silo: format!("silo-{i}"),
            log: log.clone(),
            in_flight: in_flight.clone(),
            most_in_flight: most.clone(),
        };
        let silo = Silo::builder()
            .config(member_config(&format!("silo-{i}")))
            .membership_table(table.clone())
            .event_storage(storage.clone())
            .projection(recorder)
            .start()
            .await
            .expect("silo starts");
        silos.push(silo);
    }
    grains_tests::wait_for_active(&silos, 3).await;

    let mut expected = BTreeMap::new();
    for round in 0..10u64 {
        for key in 0..10 {
            silos[(key % 3) as usize].grain::<Ledger>(format!("m{key}")).add(round as i64).await.unwrap().unwrap();
            *expected.entry(format!("s:m{key}")).or_insert(0) += 1;
        }
    }
    wait_until(Duration::from_secs(10), "100 events projected", async || log.lock().unwrap().len() >= 100).await;
    let holder = log.lock().unwrap().last().unwrap().2.clone();
    assert!(log.lock().unwrap().iter().all(|(_, _, by)| *by == holder), "one silo ran it");

    // The holder stops; another silo claims the projection and resumes after the last event applied.
    let index = silos.iter().position(|s| s.config().name == holder).unwrap();
    silos.remove(index).shutdown(Duration::from_secs(5)).await;
    for round in 10..20u64 {
        for key in 0..10 {
            silos[(key % 2) as usize].grain::<Ledger>(format!("m{key}")).add(round as i64).await.unwrap().unwrap();
            *expected.entry(format!("s:m{key}")).or_insert(0) += 1;
        }
    }
    wait_until(Duration::from_secs(10), "200 events projected", async || log.lock().unwrap().len() >= 200).await;
    tokio::time::sleep(Duration::from_millis(200)).await; // anything applied twice would show by now
    let log = log.lock().unwrap().clone();
    assert_each_once_in_order(&log, &expected);
    let later: BTreeSet<_> = log[100..].iter().map(|(_, _, by)| by.clone()).collect();
    assert!(!later.contains(&holder) && later.len() == 1, "another single silo took over: {later:?}");
    assert_eq!(most.load(Ordering::SeqCst), 1, "never two applies at once");
    assert_eq!(storage.projection_offset("recorder").await.unwrap(), 200);
    for silo in silos {
        silo.shutdown(Duration::from_secs(5)).await;
    }
}

/// The test projection, plus a record of which silo committed each event and of every attempt to apply one
/// (committed or rolled back).
struct Labelled {
    inner: AppliedLog,
    silo: String,
    attempts: Arc<AtomicU64>,
}

#[async_trait::async_trait]
impl Projection for Labelled {
    fn name(&self) -> &str {
        self.inner.name()
    }

    fn selector(&self) -> EventSelector {
        self.inner.selector()
    }

    fn batch_size(&self) -> usize {
        self.inner.batch_size()
    }

    fn poll_interval(&self) -> Duration {
        self.inner.poll_interval()
    }

    async fn apply(&self, read_model: ReadModel<'_>, event: &StoredEvent) -> Result<(), ProjectionError> {
        let ReadModel::Postgres(conn) = read_model else { return Err(ProjectionError::unsupported(&read_model)) };
        self.attempts.fetch_add(1, Ordering::Relaxed);
        self.inner.apply(ReadModel::Postgres(&mut *conn), event).await?;
        sqlx::query("INSERT INTO applied_by VALUES ($1, $2)")
            .bind(event.position as i64)
            .bind(&self.silo)
            .execute(&mut *conn)
            .await
            .map_err(ProjectionError::read_model)?;
        Ok(())
    }
}

async fn create_read_model(pool: &PgPool) {
    sqlx::raw_sql(AppliedLog::SCHEMA).execute(pool).await.unwrap();
    sqlx::raw_sql("CREATE TABLE applied_by (position BIGINT NOT NULL, silo TEXT NOT NULL)")
        .execute(pool)
        .await
        .unwrap();
}

/// Appends to 10 ledgers through `call` from 10 tasks until `stop`; returns how many appends were
/// acknowledged. Failed calls (a silo going away) are left unknown: the check is against the journal.
fn spawn_writers<F, Fut>(call: F, stop: Arc<AtomicBool>) -> Vec<tokio::task::JoinHandle<u64>>
where
    F: Fn(usize, u64) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = bool> + Send,
{
    (0..10)
        .map(|key| {
            let (call, stop) = (call.clone(), stop.clone());
            tokio::spawn(async move {
                let mut acknowledged = 0;
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    if call(key, n).await {
                        acknowledged += 1;
                    } else {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
                acknowledged
            })
        })
        .collect()
}

/// Checks the read model against the journal: every tagged event applied exactly once, the totals agree, and
/// the offset is at the last event. Returns (events, silos that committed some).
async fn assert_exactly_once(pool: &PgPool, projection: &str) -> (i64, i64) {
    let (journal_events, journal_sum): (i64, i64) = sqlx::query_as(
        "SELECT count(*), coalesce(sum((payload->>'Added')::bigint), 0)::bigint FROM grains_journal WHERE 'ledger' = ANY(tags)",
    )
    .fetch_one(pool)
    .await
    .unwrap();
    let doubled: Vec<(i64, i64)> =
        sqlx::query_as("SELECT position, count(*) FROM applied_log GROUP BY position HAVING count(*) > 1")
            .fetch_all(pool)
            .await
            .unwrap();
    assert!(doubled.is_empty(), "events applied more than once: {doubled:?}");
    let missing: Vec<i64> = sqlx::query_scalar(
        "SELECT j.position FROM grains_journal j LEFT JOIN applied_log a ON a.position = j.position
         WHERE a.position IS NULL AND 'ledger' = ANY(j.tags)",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    assert!(missing.is_empty(), "events never applied: {missing:?}");
    let (events, sum): (i64, i64) =
        sqlx::query_as("SELECT events, sum FROM applied_total WHERE id = 1").fetch_one(pool).await.unwrap();
    assert_eq!((events, sum), (journal_events, journal_sum), "the running totals count each event once");
    let offset = grains_storage::postgres::projection_offset(pool, projection).await.unwrap();
    let last: i64 = sqlx::query_scalar("SELECT max(position) FROM grains_journal").fetch_one(pool).await.unwrap();
    assert_eq!(offset, last as u64);
    let silos: i64 =
        sqlx::query_scalar("SELECT count(DISTINCT silo) FROM applied_by").fetch_one(pool).await.unwrap_or(0);
    (events, silos)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_projection_whose_silos_stop_mid_stream_applies_every_event_exactly_once() {
    let db = TestDatabase::create().await;
    let pool = db.pool().await;
    create_read_model(&pool).await;
    let table: Arc<dyn MembershipTable> = Arc::new(MemoryMembershipTable::new());
    let attempts = Arc::new(AtomicU64::new(0));
    let start = |i: usize| {
        let config = SiloConfig {
            storage: StorageKind::Postgres,
            database_url: Some(db.url().to_owned()),
            ..member_config(&format!("silo-{i}"))
        };
        let projection = Labelled {
            inner: AppliedLog { name: "applied".into(), delay: Duration::from_millis(2) },
            silo: format!("silo-{i}"),
            attempts: attempts.clone(),
        };
        let builder = Silo::builder().config(config).membership_table(table.clone()).projection(projection);
        async move { builder.start().await.expect("silo starts") }
    };
    let mut silos = vec![start(0).await, start(1).await, start(2).await];
    grains_tests::wait_for_active(&silos, 3).await;

    let runtimes = Arc::new(Mutex::new(silos.iter().map(|s| s.runtime()).collect::<Vec<_>>()));
    let stop = Arc::new(AtomicBool::new(false));
    let writers = spawn_writers(
        {
            let runtimes = runtimes.clone();
            move |key, n| {
                let runtime = {
                    let runtimes = runtimes.lock().unwrap();
                    runtimes[(key + n as usize) % runtimes.len()].clone()
                };
                async move {
                    let id = grains::GrainId::new("Ledger", format!("w{key}"));
                    let ledger = <grains_tests::es::LedgerRef as grains::GrainRef>::from_core(
                        grains::__private::RefCore::new(id, runtime),
                    );
                    matches!(ledger.add(n as i64).await, Ok(Ok(_)))
                }
            }
        },
        stop.clone(),
    );

    // Stop the oldest silo and start a new one, four times, while events flow: whichever silo holds the
    // projection is stopped at some point, at an arbitrary place in its stream.
    for next in 3..7 {
        tokio::time::sleep(Duration::from_millis(600)).await;
        runtimes.lock().unwrap().remove(0);
        silos.remove(0).shutdown(Duration::from_secs(5)).await;
        let silo = start(next).await;
        runtimes.lock().unwrap().push(silo.runtime());
        silos.push(silo);
    }
    tokio::time::sleep(Duration::from_millis(600)).await;
    stop.store(true, Ordering::Relaxed);
    let mut acknowledged = 0;
    for writer in writers {
        acknowledged += writer.await.unwrap();
    }
    let last: i64 = sqlx::query_scalar("SELECT max(position) FROM grains_journal").fetch_one(&pool).await.unwrap();
    // Applying takes the read model's 2 ms per event and the writers made thousands: allow for that, and say
    // how far the projection got if it does not arrive (slow, or stuck).
    let deadline = Instant::now() + scaled(Duration::from_secs(30) + Duration::from_millis(4) * last as u32);
    loop {
        let offset = grains_storage::postgres::projection_offset(&pool, "applied").await.unwrap();
        if offset == last as u64 {
            break;
        }
        assert!(Instant::now() < deadline, "the projection stopped at {offset} of {last}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let (events, silos_that_committed) = assert_exactly_once(&pool, "applied").await;
    let attempts = attempts.load(Ordering::Relaxed);
    println!(
        "{events} events ({acknowledged} acknowledged), applied by {silos_that_committed} silos in turn; \
         {attempts} applies attempted, {} rolled back",
        attempts as i64 - events
    );
    assert!(events >= acknowledged as i64 && acknowledged > 100, "events flowed throughout");
    assert!(silos_that_committed >= 2, "the projection moved to another silo when its holder stopped");
    for silo in silos {
        silo.shutdown(Duration::from_secs(5)).await;
    }
    pool.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_projection_whose_silo_processes_are_killed_mid_stream_applies_every_event_exactly_once() {
    let db = TestDatabase::create().await;
    let pool = db.pool().await;
    create_read_model(&pool).await;
    sqlx::query("DROP TABLE applied_by").execute(&pool).await.unwrap(); // the binary runs plain AppliedLog
    let launch = || -> SiloProcess {
        SiloLauncher::new(env!("CARGO_BIN_EXE_grains-test-silo"))
            .args(["--port", "0", "--storage", "postgres", "--membership", "postgres", "--database-url", db.url()])
            .args(["--cluster-id", "projection-kill", "--failure-detection", "fast", "--log", "warn"])
            .env("GRAINS_TEST_PROJECTION", "applied")
            .env("GRAINS_TEST_PROJECTION_DELAY_MS", "2")
            .keep_log()
            .start()
    };
    let mut silos = vec![launch(), launch()];
    let clients = Arc::new(Mutex::new(Vec::new()));
    for silo in &silos {
        let client = Client::connect(silo.url()).await.expect("client connects");
        clients.lock().unwrap().push((silo.pid(), client));
    }
    let stop = Arc::new(AtomicBool::new(false));
    let writers = spawn_writers(
        {
            let clients = clients.clone();
            move |key, n| {
                let client = {
                    let clients = clients.lock().unwrap();
                    clients[(key + n as usize) % clients.len()].1.grain::<Ledger>(format!("p{key}"))
                };
                async move { matches!(client.with_timeout(Duration::from_secs(2)).add(n as i64).await, Ok(Ok(_))) }
            }
        },
        stop.clone(),
    );

    // Kill -9 the oldest silo and start a new one, three times, while events flow: both first silos die, so
    // whichever held the projection was killed in the middle of its stream.
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let mut victim = silos.remove(0);
        clients.lock().unwrap().retain(|(pid, _)| *pid != victim.pid());
        victim.signal("-KILL");
        assert!(victim.wait_exit(Duration::from_secs(10)).await.is_some());
        let silo = launch();
        let client = Client::connect(silo.url()).await.expect("client connects");
        clients.lock().unwrap().push((silo.pid(), client));
        silos.push(silo);
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop.store(true, Ordering::Relaxed);
    let mut acknowledged = 0;
    for writer in writers {
        acknowledged += writer.await.unwrap();
    }
    let last: i64 = sqlx::query_scalar("SELECT max(position) FROM grains_journal").fetch_one(&pool).await.unwrap();
    wait_until(Duration::from_secs(60), "the projection to catch up", async || {
        grains_storage::postgres::projection_offset(&pool, "applied").await.unwrap() == last as u64
    })
    .await;
    sqlx::query("CREATE TABLE applied_by (position BIGINT, silo TEXT)").execute(&pool).await.unwrap();
    let (events, _) = assert_exactly_once(&pool, "applied").await;
    println!("{events} events ({acknowledged} acknowledged) projected exactly once across 3 kill -9s");
    assert!(events >= acknowledged as i64 && acknowledged > 100, "events flowed throughout");
    drop(silos);
    pool.close().await;
}
