//! Silos as separate OS processes on 127.0.0.1, with membership and grain state in Postgres: kill -9 under
//! load, restart, graceful stop, a frozen (SIGSTOP) silo that must stop itself once declared dead, and a
//! client that must route around a frozen gateway.
//!
//! The figures are printed (run with `--nocapture` to see them); the assertions are about correctness —
//! acknowledged writes lost, duplicate activations — never about speed.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use grains::{CallError, GrainId};
use grains_silo::{Client, ClientConfig};
use grains_storage::postgres::PostgresMembershipTable;
use grains_storage::{MembershipTable, SiloStatus};
use grains_tests::Counter;
use grains_tests::pg::TestDatabase;

const KEYS: usize = 1000;

/// These tests each run three silo processes under load with fast failure detection; run side by side on a
/// small machine they would starve each other into false suspicions, so they take turns.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
const WORKERS: usize = 64;

/// A silo process, killed when dropped.
struct SiloProcess {
    child: Child,
    addr: String,
    log: Arc<Mutex<String>>,
}

impl SiloProcess {
    fn start(db: &TestDatabase, cluster: &str, port: u16) -> Self {
        Self::start_detecting(db, cluster, port, "fast")
    }

    /// A silo with the named failure-detection profile (`fast` or `production`).
    fn start_detecting(db: &TestDatabase, cluster: &str, port: u16, failure_detection: &str) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_grains-test-silo"))
            .args(["--port", &port.to_string(), "--storage", "postgres", "--membership", "postgres"])
            .args(["--database-url", db.url(), "--cluster-id", cluster, "--failure-detection", failure_detection])
            .args(["--log", "info", "--call-timeout", "5s"])
            .env("NO_COLOR", "1")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("the test silo binary starts");
        let log = Arc::new(Mutex::new(String::new()));
        let stderr = child.stderr.take().expect("piped stderr");
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let mut log = sink.lock().unwrap();
                log.push_str(&line);
                log.push('\n');
            }
        });
        let mut lines = BufReader::new(child.stdout.take().expect("piped stdout")).lines();
        let addr = loop {
            match lines.next() {
                Some(Ok(line)) => {
                    if let Some(addr) = line.strip_prefix("gateway listening on ") {
                        break addr.to_owned();
                    }
                }
                _ => panic!("silo exited before listening:\n{}", log.lock().unwrap()),
            }
        };
        std::thread::spawn(move || for _ in lines {});
        SiloProcess { child, addr, log }
    }

    fn port(&self) -> u16 {
        self.addr.rsplit(':').next().and_then(|p| p.parse().ok()).expect("a port")
    }

    fn signal(&self, signal: &str) {
        let status = Command::new("kill").args([signal, &self.child.id().to_string()]).status().unwrap();
        assert!(status.success(), "kill {signal}");
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }
}

impl Drop for SiloProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn membership(db: &TestDatabase, cluster: &str) -> PostgresMembershipTable {
    PostgresMembershipTable::new(db.pool().await, cluster)
}

/// Starts three silo processes of `cluster` and waits until all three are active.
async fn start_three(db: &TestDatabase, cluster: &str) -> (Vec<SiloProcess>, PostgresMembershipTable) {
    start_three_detecting(db, cluster, "fast").await
}

/// Starts three silo processes of `cluster` with the named failure-detection profile.
async fn start_three_detecting(
    db: &TestDatabase,
    cluster: &str,
    failure_detection: &str,
) -> (Vec<SiloProcess>, PostgresMembershipTable) {
    let silos = (0..3).map(|_| SiloProcess::start_detecting(db, cluster, 0, failure_detection)).collect();
    let table = membership(db, cluster).await;
    wait_for_active(&table, 3).await;
    (silos, table)
}

async fn wait_for_active(table: &PostgresMembershipTable, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let snapshot = table.read_all().await.unwrap();
        let active = snapshot.rows.iter().filter(|r| r.entry.status == SiloStatus::Active).count();
        if active == n {
            return;
        }
        assert!(Instant::now() < deadline, "{active} active silos, expected {n}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Closed-loop load: every worker increments its own keys round-robin and records what was acknowledged.
struct Load {
    acked: Arc<Vec<AtomicU64>>,
    last_ok_ms: Arc<Vec<AtomicU64>>,
    ok: Arc<AtomicU64>,
    errors: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
    workers: Vec<tokio::task::JoinHandle<()>>,
    epoch: Instant,
}

impl Load {
    fn start(client: &Client) -> Self {
        Self::start_on(client, (0..KEYS).map(|key| format!("k-{key}")).collect())
    }

    /// Load on the counters named `keys` (acknowledgements are indexed like `keys`).
    fn start_on(client: &Client, keys: Vec<String>) -> Self {
        let keys = Arc::new(keys);
        let acked: Arc<Vec<AtomicU64>> = Arc::new(keys.iter().map(|_| AtomicU64::new(0)).collect());
        let last_ok_ms: Arc<Vec<AtomicU64>> = Arc::new(keys.iter().map(|_| AtomicU64::new(0)).collect());
        let ok = Arc::new(AtomicU64::new(0));
        let errors = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let epoch = Instant::now();
        let workers = (0..WORKERS)
            .map(|w| {
                let (client, keys, acked, last_ok_ms, ok, errors, stop) = (
                    client.clone(),
                    keys.clone(),
                    acked.clone(),
                    last_ok_ms.clone(),
                    ok.clone(),
                    errors.clone(),
                    stop.clone(),
                );
                tokio::spawn(async move {
                    let mine: Vec<usize> = (w..keys.len()).step_by(WORKERS).collect();
                    let mut i = 0;
                    while !stop.load(Ordering::Relaxed) && !mine.is_empty() {
                        let key = mine[i % mine.len()];
                        i += 1;
                        match client.grain::<Counter>(keys[key].as_str()).increment().await {
                            Ok(Ok(value)) => {
                                acked[key].fetch_max(value, Ordering::Relaxed);
                                last_ok_ms[key].store(epoch.elapsed().as_millis() as u64 + 1, Ordering::Relaxed);
                                ok.fetch_add(1, Ordering::Relaxed);
                            }
                            Ok(Err(e)) => errors.lock().unwrap().push(format!("{}: state {e}", keys[key])),
                            Err(e) => {
                                errors.lock().unwrap().push(format!("{}: {e}", keys[key]));
                                tokio::time::sleep(Duration::from_millis(20)).await;
                            }
                        }
                    }
                })
            })
            .collect();
        Load { acked, last_ok_ms, ok, errors, stop, workers, epoch }
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    async fn wait_all_keys_ok_after(&self, since_ms: u64, within: Duration) -> u64 {
        let all_ok = self.all_keys_ok_after(since_ms, within).await;
        all_ok.unwrap_or_else(|| panic!("not every key answered again within {within:?}"))
    }

    /// When every key had been acknowledged after `since_ms`, if that happens `within` from now.
    async fn all_keys_ok_after(&self, since_ms: u64, within: Duration) -> Option<u64> {
        let deadline = Instant::now() + within;
        loop {
            if self.last_ok_ms.iter().all(|t| t.load(Ordering::Relaxed) > since_ms) {
                return Some(self.now_ms());
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn stop(self) -> (Vec<u64>, u64, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        for worker in self.workers {
            worker.await.unwrap();
        }
        let acked = self.acked.iter().map(|a| a.load(Ordering::Relaxed)).collect();
        let errors = self.errors.lock().unwrap().clone();
        (acked, self.ok.load(Ordering::Relaxed), errors)
    }
}

/// Acknowledged increments missing from Postgres: for each key, how far the stored counter is below the
/// highest value the grain acknowledged.
async fn lost_increments(db: &TestDatabase, acked: &[u64]) -> u64 {
    let stored = db.counter_values().await;
    acked
        .iter()
        .enumerate()
        .map(|(key, &acked)| acked.saturating_sub(stored.get(&format!("k-{key}")).copied().unwrap_or(0)))
        .sum()
}

/// Grain ids active on more than one of the live silos.
async fn duplicates(client: &Client, silos: &[&SiloProcess]) -> usize {
    let mut seen = std::collections::HashSet::<GrainId>::new();
    let mut duplicates = 0;
    for silo in silos {
        for id in client.active_grains(&silo.addr).await.unwrap() {
            if !seen.insert(id) {
                duplicates += 1;
            }
        }
    }
    duplicates
}

/// A client that may ask silos for their activations: it declares itself a member (the silos here run on
/// loopback without a cluster secret, so the declaration needs no proof).
fn client_config() -> ClientConfig {
    ClientConfig {
        call_timeout: Duration::from_secs(10),
        gateway_refresh_interval: Duration::from_millis(500),
        member: Some(grains_silo::ClusterCredentials::default()),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killing_one_of_three_silos_under_load_loses_no_acknowledged_write() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let db = TestDatabase::create().await;
    let cluster = "kill9";
    let (mut silos, table) = start_three(&db, cluster).await;
    let urls: Vec<String> = silos.iter().map(|s| format!("http://{}", s.addr)).collect();
    let client = Client::connect_cluster(&urls, client_config()).await.unwrap();
    let load = Load::start(&client);

    tokio::time::sleep(Duration::from_secs(3)).await;
    let before = load.ok.load(Ordering::Relaxed);
    let rate = before as f64 / load.epoch.elapsed().as_secs_f64();

    let victim = silos.remove(1);
    let victim_port = victim.port();
    let killed_at = load.now_ms();
    drop(victim); // SIGKILL
    let kill_instant = Instant::now();
    let dead_after = loop {
        let snapshot = table.read_all().await.unwrap();
        let dead = snapshot
            .rows
            .iter()
            .any(|r| r.entry.silo.endpoint.ends_with(&format!(":{victim_port}")) && r.entry.status == SiloStatus::Dead);
        if dead {
            break kill_instant.elapsed();
        }
        assert!(kill_instant.elapsed() < Duration::from_secs(30), "the killed silo was never declared dead");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let all_back_ms = load.wait_all_keys_ok_after(killed_at, Duration::from_secs(60)).await;
    let all_back_after = Duration::from_millis(all_back_ms - killed_at);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (acked, ok, errors) = load.stop().await;

    let lost = lost_increments(&db, &acked).await;
    let live: Vec<&SiloProcess> = silos.iter().collect();
    let duplicated = duplicates(&client, &live).await;
    println!(
        "kill -9 of 1 of 3 silos at {rate:.0} calls/s over {KEYS} keys: dead after {:.2} s, all keys back after \
         {:.2} s, {lost} acknowledged increments lost, {duplicated} duplicate activations, {ok} calls acknowledged, \
         {} failed",
        dead_after.as_secs_f64(),
        all_back_after.as_secs_f64(),
        errors.len()
    );
    assert_eq!(lost, 0, "acknowledged increments were lost");
    assert_eq!(duplicated, 0, "duplicate activations after convergence");
    for error in &errors {
        assert!(
            error.contains("silo unavailable") || error.contains("timed out") || error.contains("unavailable"),
            "only unknown-outcome errors are allowed around the kill: {error}"
        );
    }

    // The killed silo comes back on its port with a new epoch and receives new grains.
    let restarted = SiloProcess::start(&db, cluster, victim_port);
    wait_for_active(&table, 3).await;
    let snapshot = table.read_all().await.unwrap();
    let incarnations: Vec<_> =
        snapshot.rows.iter().filter(|r| r.entry.silo.endpoint.ends_with(&format!(":{victim_port}"))).collect();
    assert_eq!(incarnations.len(), 2, "old and new incarnation both recorded");
    assert!(incarnations.iter().any(|r| r.entry.status == SiloStatus::Active));
    let client = Client::connect_cluster(&urls, client_config()).await.unwrap();
    for i in 0..300 {
        client.grain::<Counter>(format!("fresh-{i}")).increment().await.unwrap().unwrap();
    }
    let on_restarted = client.active_grains(&restarted.addr).await.unwrap();
    assert!(
        on_restarted.iter().filter(|g| g.key().to_string().starts_with("fresh-")).count() > 30,
        "the restarted silo receives new grains"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_graceful_stop_under_load_shows_callers_no_errors() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let db = TestDatabase::create().await;
    let cluster = "graceful";
    let (silos, table) = start_three(&db, cluster).await;
    let urls: Vec<String> = silos.iter().map(|s| format!("http://{}", s.addr)).collect();
    let client = Client::connect_cluster(&urls, client_config()).await.unwrap();
    let load = Load::start(&client);
    tokio::time::sleep(Duration::from_secs(2)).await;

    let mut leaving = silos;
    let mut stopping = leaving.remove(2);
    stopping.signal("-TERM");
    let status = tokio::task::spawn_blocking(move || {
        let status = stopping.child.wait();
        (status, stopping)
    })
    .await
    .unwrap();
    assert!(status.0.unwrap().success(), "the silo stopped cleanly:\n{}", status.1.log());
    wait_for_active(&table, 2).await;
    let since = load.now_ms();
    load.wait_all_keys_ok_after(since, Duration::from_secs(30)).await;
    let (acked, ok, errors) = load.stop().await;
    println!("graceful stop of 1 of 3 silos under load: {ok} calls acknowledged, {} failed", errors.len());
    assert!(errors.is_empty(), "callers saw errors: {:?}", &errors[..errors.len().min(10)]);
    assert_eq!(lost_increments(&db, &acked).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_frozen_silo_declared_dead_stops_itself_when_it_wakes() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let db = TestDatabase::create().await;
    let cluster = "zombie";
    let (silos, table) = start_three(&db, cluster).await;
    let mut silos = silos;
    let mut frozen = silos.remove(0);
    let frozen_port = frozen.port();
    frozen.signal("-STOP");
    let started = Instant::now();
    loop {
        let snapshot = table.read_all().await.unwrap();
        if snapshot
            .rows
            .iter()
            .any(|r| r.entry.silo.endpoint.ends_with(&format!(":{frozen_port}")) && r.entry.status == SiloStatus::Dead)
        {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "the frozen silo was never declared dead");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!("frozen silo declared dead after {:.2} s", started.elapsed().as_secs_f64());
    frozen.signal("-CONT");
    let waited = Instant::now();
    let status = loop {
        if let Some(status) = frozen.child.try_wait().unwrap() {
            break status;
        }
        assert!(waited.elapsed() < Duration::from_secs(20), "the zombie did not stop itself:\n{}", frozen.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(!status.success(), "a silo declared dead exits with an error status");
    assert!(frozen.log().contains("declared dead"), "it says why:\n{}", frozen.log());
    // The rest of the cluster serves on.
    let urls: Vec<String> = silos.iter().map(|s| format!("http://{}", s.addr)).collect();
    let client = Client::connect_cluster(&urls, client_config()).await.unwrap();
    let result = client.grain::<Counter>("after-zombie").increment().await;
    assert!(matches!(result, Ok(Ok(1))), "{result:?}");
    let _ = CallError::ShuttingDown;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_client_routes_around_a_frozen_gateway() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let db = TestDatabase::create().await;
    // Production failure detection: the frozen silo stays Active in the table for the whole test, so only the
    // client's own judgement of its gateways can route around it.
    let (mut silos, table) = start_three_detecting(&db, "frozen-gateway", "production").await;
    let urls: Vec<String> = silos.iter().map(|s| format!("http://{}", s.addr)).collect();
    let client = Client::connect_cluster(&urls, client_config()).await.unwrap();
    for key in 0..KEYS {
        client.grain::<Counter>(format!("k-{key}")).increment().await.unwrap().unwrap();
    }
    let frozen = silos.remove(0);
    let frozen_port = format!(":{}", frozen.port());
    // The load runs on grains neither hosted nor looked up on the silo to be frozen: every call it makes can be
    // answered by the other two, if the client sends it to them.
    let hosted_there: std::collections::HashSet<GrainId> =
        client.active_grains(&frozen.addr).await.unwrap().into_iter().collect();
    let view = grains_silo::ClusterView::from_snapshot(&table.read_all().await.unwrap());
    let keys: Vec<String> = (0..KEYS)
        .map(|key| format!("k-{key}"))
        .filter(|key| {
            let id = GrainId::new(<Counter as grains::GrainType>::TYPE_NAME, key.as_str());
            let owner = view.ring.owner(&id).expect("three active silos");
            !hosted_there.contains(&id) && !owner.endpoint.ends_with(&frozen_port)
        })
        .collect();
    assert!(keys.len() > KEYS / 5, "only {} keys avoid the silo to be frozen", keys.len());
    let load = Load::start_on(&client, keys);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let warm = load.ok.load(Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let frozen_at = load.now_ms();
    let before = load.ok.load(Ordering::Relaxed) - warm;

    frozen.signal("-STOP");
    let ok = load.ok.clone();
    let three_seconds_later = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(3)).await;
        ok.load(Ordering::Relaxed)
    });
    // Every grain of the load answers again through the other gateways within a few seconds of the freeze
    // (calls stuck on the frozen gateway have a 10 s deadline: waiting them out would take longer).
    let all_back = load.all_keys_ok_after(frozen_at, Duration::from_secs(8)).await;
    let after = three_seconds_later.await.unwrap() - warm - before;
    frozen.signal("-CONT");
    let (_, ok, errors) = load.stop().await;
    println!(
        "frozen gateway: {:.0} calls/s in the 3 s before the freeze, {:.0} calls/s in the 3 s after it; every key \
         answered again: {}; {ok} calls acknowledged, {} failed",
        before as f64 / 3.0,
        after as f64 / 3.0,
        all_back.map_or("no".to_owned(), |at| format!("{:.2} s after the freeze", (at - frozen_at) as f64 / 1000.0)),
        errors.len()
    );
    assert!(all_back.is_some(), "the grains not on the frozen silo did not all answer within 8 s of the freeze");
    for error in &errors {
        assert!(
            error.contains("unavailable") || error.contains("timed out"),
            "only unknown-outcome errors are allowed around the freeze: {error}"
        );
    }
}

fn start_dev_silo(seed: Option<&str>) -> SiloProcess {
    let mut command = Command::new(env!("CARGO_BIN_EXE_grains-test-silo"));
    command.args(["--port", "0", "--failure-detection", "fast", "--log", "info"]);
    if let Some(seed) = seed {
        command.args(["--seed", seed]);
    }
    let mut child = command.env("NO_COLOR", "1").stdout(Stdio::piped()).stderr(Stdio::null()).spawn().unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let addr = loop {
        let line = lines.next().expect("the silo prints its address").unwrap();
        if let Some(addr) = line.strip_prefix("gateway listening on ") {
            break addr.to_owned();
        }
    };
    std::thread::spawn(move || for _ in lines {});
    SiloProcess { child, addr, log: Arc::new(Mutex::new(String::new())) }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_silos_joined_through_a_seed_form_a_cluster_a_client_spreads_over_and_survives_a_gateway_leaving() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let seed = start_dev_silo(None);
    let second = start_dev_silo(Some(&seed.addr));
    let mut third = start_dev_silo(Some(&seed.addr));

    // The client is given one gateway and learns the others from the cluster.
    let config = ClientConfig { gateway_refresh_interval: Duration::from_millis(200), ..client_config() };
    let client = Client::connect_cluster([format!("http://{}", third.addr)], config).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while client.gateways().len() < 3 {
        assert!(Instant::now() < deadline, "the client never learned all gateways: {:?}", client.gateways());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for i in 0..600 {
        client.grain::<Counter>(format!("seeded-{i}")).increment().await.unwrap().unwrap();
    }
    for silo in [&seed, &second, &third] {
        let here = client.active_grains(&silo.addr).await.unwrap().len();
        assert!(here > 60, "{} holds only {here} of 600 grains", silo.addr);
    }

    // The gateway the client started from leaves; calls go on through the others.
    third.signal("-TERM");
    let _ = tokio::task::spawn_blocking(move || third.child.wait()).await;
    for i in 0..200 {
        let result = client.grain::<Counter>(format!("after-{i}")).increment().await;
        assert!(matches!(result, Ok(Ok(1))), "call {i} after the gateway left: {result:?}");
    }
}
