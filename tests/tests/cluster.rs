//! Several silos in one process forming a cluster: placement across silos, cross-silo calls, exactly one
//! activation per grain under concurrent first calls from every silo.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use grains::{CallError, GrainId, GrainRef};
use grains_silo::{Client, ClientConfig, Silo, SiloConfig};
use grains_storage::{MembershipTable, SiloStatus};
use grains_tests::{Counter, LIFECYCLE, Peer, scaled, start_cluster, test_config};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ten_thousand_grains_spread_over_three_silos_and_call_each_other_across_them() {
    let silos = start_cluster(3).await;
    let urls: Vec<String> = silos.iter().map(|s| format!("http://{}", s.gateway_addr().unwrap())).collect();
    // 10,000 calls in flight at once keep the gateways busy; on a machine short of CPU a pong can take longer
    // than the default liveness timeout (1 s), which is about frozen gateways, not this test.
    let config = ClientConfig { gateway_liveness_timeout: scaled(Duration::from_secs(5)), ..ClientConfig::default() };
    let client = Client::connect_cluster(&urls, config).await.unwrap();
    assert_eq!(client.gateways().len(), 3, "the client learned every gateway");

    let calls: Vec<_> = (0..10_000i64)
        .map(|i| {
            let peer = client.grain::<Peer>(format!("spread-{i}"));
            tokio::spawn(async move { peer.name().await })
        })
        .collect();
    for (i, call) in calls.into_iter().enumerate() {
        assert_eq!(call.await.unwrap().unwrap(), format!("spread-{i}"));
    }
    let mut all = HashSet::new();
    for silo in &silos {
        let here: Vec<GrainId> =
            silo.active_grains().into_iter().filter(|g| g.key().to_string().starts_with("spread-")).collect();
        let share = here.len() as f64 / 10_000.0;
        assert!(share >= 0.20, "{} holds {:.1} % of the grains", silo.address(), share * 100.0);
        for id in here {
            assert!(all.insert(id.clone()), "{id} is active on two silos");
        }
    }
    assert_eq!(all.len(), 10_000);

    // Grain-to-grain calls between grains that live on different silos.
    let located: HashMap<GrainId, usize> =
        silos.iter().enumerate().flat_map(|(i, s)| s.active_grains().into_iter().map(move |g| (g, i))).collect();
    let mut crossed = 0;
    for i in 0..200i64 {
        let (a, b) = (format!("spread-{i}"), format!("spread-{}", i + 5000));
        if located[&GrainId::new("Peer", a.as_str())] != located[&GrainId::new("Peer", b.as_str())] {
            crossed += 1;
        }
        assert_eq!(client.grain::<Peer>(a.as_str()).ask_name(b.clone()).await.unwrap().unwrap(), b);
    }
    assert!(crossed > 50, "only {crossed} of the calls crossed silos");
    for silo in silos {
        silo.shutdown(Duration::from_secs(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_first_calls_from_every_silo_build_exactly_one_activation_per_grain() {
    let silos = start_cluster(3).await;
    let keys: Vec<String> = (0..500).map(|i| format!("cold-{i}")).collect();
    let mut calls = Vec::new();
    for silo in &silos {
        for key in &keys {
            let counter = silo.grain::<Counter>(key.as_str());
            calls.push(tokio::spawn(async move { counter.increment().await }));
        }
    }
    for call in calls {
        call.await.unwrap().unwrap().unwrap();
    }
    let mut seen = HashSet::new();
    for silo in &silos {
        for id in silo.active_grains() {
            if id.key().to_string().starts_with("cold-") {
                assert!(seen.insert(id.clone()), "{id} is active on two silos");
            }
        }
    }
    assert_eq!(seen.len(), 500);
    for key in &keys {
        assert_eq!(LIFECYCLE.activations(key), 1, "{key} was activated more than once");
        assert_eq!(silos[0].grain::<Counter>(key.as_str()).get().await.unwrap(), 3, "{key}: one count per silo");
    }
    for silo in silos {
        silo.shutdown(Duration::from_secs(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_grain_moves_to_a_live_silo_when_its_silo_leaves_and_keeps_its_state() {
    let mut silos = start_cluster(3).await;
    let key = "mover";
    let first = silos[0].grain::<Counter>(key);
    assert_eq!(first.increment().await.unwrap().unwrap(), 1);
    let holder = silos.iter().position(|s| s.is_active(&GrainId::new("Counter", key))).expect("someone holds it");
    let leaving = silos.remove(holder);
    leaving.shutdown(Duration::from_secs(10)).await;
    grains_tests::wait_for_active(&silos, 2).await;
    let survivor = silos[0].grain::<Counter>(key);
    assert_eq!(survivor.increment().await.unwrap().unwrap(), 2, "re-activated elsewhere from storage");
    let holders = silos.iter().filter(|s| s.is_active(&GrainId::new("Counter", key))).count();
    assert_eq!(holders, 1);
    for silo in silos {
        silo.shutdown(Duration::from_secs(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_calls_the_silo_holding_a_grain_directly_and_follows_it_when_it_moves() {
    let silos = start_cluster(2).await;
    let client = Client::connect(format!("http://{}", silos[0].gateway_addr().unwrap())).await.unwrap();
    assert_eq!(client.gateways().len(), 2, "the client learned both gateways");
    let forwards = || silos.iter().map(|s| s.metrics().gateway_forwards).sum::<u64>();
    let keys: Vec<String> = (0..20).map(|i| format!("direct-{i}")).collect();
    for key in &keys {
        assert_eq!(client.grain::<Peer>(key.as_str()).name().await.unwrap(), *key);
    }
    let held_by =
        |silo: &Silo| silo.active_grains().iter().filter(|g| g.key().to_string().starts_with("direct-")).count();
    assert!(held_by(&silos[0]) > 0 && held_by(&silos[1]) > 0, "both silos hold some of the grains");
    let warmed = forwards();
    for _ in 0..10 {
        for key in &keys {
            assert_eq!(client.grain::<Peer>(key.as_str()).name().await.unwrap(), *key);
        }
    }
    assert_eq!(forwards(), warmed, "after a grain's first call, its calls go straight to the silo holding it");

    // The grain moves (deactivated until its next activation lands on the other silo): the client's first call
    // goes to where it was, which forwards it and says where the grain is now; the calls after it go there.
    let key = keys[0].as_str();
    let id = GrainId::new("Peer", key);
    let grain = client.grain::<Peer>(key);
    let first = silos.iter().position(|s| s.is_active(&id)).expect("someone holds it");
    let mut moved = false;
    for _ in 0..100 {
        let holder = silos.iter().position(|s| s.is_active(&id)).expect("someone holds it");
        grain.deactivate().await.unwrap();
        let gone = tokio::time::Instant::now() + scaled(Duration::from_secs(5));
        while silos[holder].is_active(&id) {
            assert!(tokio::time::Instant::now() < gone, "{id} never deactivated");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(grain.name().await.unwrap(), key, "a call to a grain that left the silo it was known on");
        if !silos[first].is_active(&id) {
            moved = true;
            break;
        }
    }
    assert!(moved, "{id} was placed on the same silo 100 times in a row");
    let settled = forwards();
    for _ in 0..10 {
        assert_eq!(grain.name().await.unwrap(), key);
    }
    assert_eq!(forwards(), settled, "the client follows a grain that moved");
    for silo in silos {
        silo.shutdown(Duration::from_secs(10)).await;
    }
}

#[tokio::test]
async fn a_call_cycle_across_silos_is_refused() {
    let silos = start_cluster(2).await;
    let result = silos[0].grain::<Peer>("x-a").call_peer("x-b".into()).await.unwrap();
    assert!(matches!(result, Err(CallError::Deadlock { .. })), "{result:?}");
    for silo in silos {
        silo.shutdown(Duration::from_secs(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn placement_strategies_put_activations_where_they_say() {
    let silos = start_cluster(3).await;
    // prefer_local: every grain lands on the silo that first called it.
    for (i, silo) in silos.iter().enumerate() {
        for k in 0..50 {
            silo.grain::<grains_tests::Sticky>(format!("sticky-{i}-{k}")).touch().await.unwrap();
        }
        let here =
            silo.active_grains().iter().filter(|g| g.key().to_string().starts_with(&format!("sticky-{i}-"))).count();
        assert_eq!(here, 50, "silo {i} holds all the grains it placed");
    }
    // hash: the same grain id lands on the same silo whichever silo calls first.
    for k in 0..60 {
        silos[k % 3].grain::<grains_tests::Hashed>(k as i64).touch().await.unwrap();
    }
    let view = silos[0].cluster_view();
    for k in 0..60i64 {
        let id = GrainId::new("Hashed", k);
        let holder = silos.iter().position(|s| s.is_active(&id)).unwrap();
        let hash = grains_silo::__private::grain_hash(&id);
        let expected = &view.active()[(u64::from(hash) % view.active().len() as u64) as usize];
        assert_eq!(silos[holder].address(), expected, "{id} placed by its hash");
    }
    for silo in silos {
        silo.shutdown(Duration::from_secs(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn grains_churning_through_activation_and_passivation_keep_one_activation_and_every_acknowledged_write() {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    // Counters passivate 60 ms after their last call, so calls keep re-activating them, from all three silos.
    let silos = Arc::new(
        grains_tests::start_cluster_with(3, |mut config| {
            config.collection_interval = Duration::from_millis(20);
            config.grain.insert(
                "Counter".into(),
                grains_silo::GrainTypeConfig { idle_timeout: Some(Duration::from_millis(60)) },
            );
            config
        })
        .await,
    );
    const KEYS: usize = 40;
    let acked: Arc<Vec<AtomicU64>> = Arc::new((0..KEYS).map(|_| AtomicU64::new(0)).collect());
    let stop = Arc::new(AtomicBool::new(false));
    let workers: Vec<_> = (0..24)
        .map(|w| {
            let (silos, acked, stop) = (silos.clone(), acked.clone(), stop.clone());
            tokio::spawn(async move {
                let mut i = w;
                while !stop.load(Ordering::Relaxed) {
                    let key = i % KEYS;
                    i += 7;
                    let counter = silos[i % 3].grain::<Counter>(format!("churn-{key}"));
                    let value = counter.increment().await.unwrap().unwrap();
                    acked[key].fetch_max(value, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis((i % 5) as u64 * 20)).await;
                }
            })
        })
        .collect();
    // Meanwhile, no grain may ever be active on two silos at once: neither in the silos' tables (an activation
    // counts there from its confirmation until its last turn) nor by the grains' own hooks, which record
    // every overlap however short.
    let started = std::time::Instant::now();
    while started.elapsed() < Duration::from_secs(3) {
        let mut seen = HashSet::new();
        for silo in silos.iter() {
            for id in silo.active_grains() {
                assert!(seen.insert(id.clone()), "{id} active on two silos");
            }
        }
        for key in 0..KEYS {
            let key = format!("churn-{key}");
            assert!(LIFECYCLE.most_alive_at_once(&key) <= 1, "{key}: two activations alive at once");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for worker in workers {
        worker.await.unwrap();
    }
    for key in 0..KEYS {
        let stored = silos[0].grain::<Counter>(format!("churn-{key}")).get().await.unwrap();
        assert_eq!(
            stored,
            acked[key].load(Ordering::Relaxed),
            "churn-{key}: the last acknowledged value is what a fresh activation reads"
        );
    }
    assert!(LIFECYCLE.activations("churn-0") > 2, "the grains really churned");
    if let Ok(silos) = Arc::try_unwrap(silos) {
        for silo in silos {
            silo.shutdown(Duration::from_secs(10)).await;
        }
    }
}

/// A silo joins a two-silo cluster while 2,000 grains are under load from both: directory ranges move to the
/// newcomer, and yet no grain ever gets a second activation, no write conflicts, and every acknowledged increment
/// is in storage. Checked during the load (the lifecycle log records how many activations of a key were ever
/// alive at once), not only after things settle.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_silo_joining_under_load_never_makes_a_second_activation() {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    const KEYS: usize = 2000;
    let key = |k: usize| format!("join-{k}");
    let cluster = grains_tests::SharedCluster::new();
    let mut silos = Vec::new();
    for i in 0..2 {
        silos.push(cluster.start_member(i, |c| c).await);
    }
    grains_tests::wait_for_active(&silos, 2).await;
    let silos = Arc::new(silos);
    // Warm every grain first, so the join moves directory entries of live activations.
    for k in 0..KEYS {
        silos[k % 2].grain::<Counter>(key(k)).increment().await.unwrap().unwrap();
    }
    let acked: Arc<Vec<AtomicU64>> = Arc::new((0..KEYS).map(|_| AtomicU64::new(1)).collect());
    let failures = Arc::new(Mutex::new(Vec::new()));
    let stop = Arc::new(AtomicBool::new(false));
    // Callers through every silo, the newcomer too once it is up (it has no routing cache: it asks the directory).
    let runtimes = Arc::new(std::sync::RwLock::new(silos.iter().map(|s| s.runtime()).collect::<Vec<_>>()));
    let workers: Vec<_> = (0..16)
        .map(|w| {
            let (runtimes, acked, stop, failures) = (runtimes.clone(), acked.clone(), stop.clone(), failures.clone());
            tokio::spawn(async move {
                let mut k = w * 131;
                let mut turn = w;
                while !stop.load(Ordering::Relaxed) {
                    k = (k + 17) % KEYS;
                    turn += 1;
                    let runtime = {
                        let runtimes = runtimes.read().unwrap();
                        runtimes[turn % runtimes.len()].clone()
                    };
                    let counter = <Counter as grains::Grain>::Ref::from_core(grains::__private::RefCore::new(
                        GrainId::new("Counter", key(k)),
                        runtime,
                    ));
                    match counter.increment().await {
                        Ok(Ok(_)) => {
                            acked[k].fetch_add(1, Ordering::Relaxed);
                        }
                        other => failures.lock().unwrap().push(format!("{}: {other:?}", key(k))),
                    }
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let newcomer = cluster.start_member(2, |c| c).await;
    runtimes.write().unwrap().push(newcomer.runtime());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while silos.iter().chain([&newcomer]).any(|s| s.cluster_view().active().len() != 3) {
        assert!(tokio::time::Instant::now() < deadline, "the cluster did not converge on 3 active silos");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    for worker in workers {
        worker.await.unwrap();
    }
    let duplicated: Vec<String> =
        (0..KEYS).map(key).filter(|k| LIFECYCLE.most_alive_at_once(k) > 1 || LIFECYCLE.activations(k) > 1).collect();
    let failures = failures.lock().unwrap().clone();
    assert!(
        duplicated.is_empty(),
        "{} grains got a second activation, e.g. {:?}",
        duplicated.len(),
        &duplicated[..duplicated.len().min(5)]
    );
    assert!(failures.is_empty(), "{} calls failed, e.g. {:?}", failures.len(), &failures[..failures.len().min(5)]);
    for k in 0..KEYS {
        let stored = silos[0].grain::<Counter>(key(k)).get().await.unwrap();
        assert_eq!(stored, acked[k].load(Ordering::Relaxed), "{}: stored value vs acknowledged increments", key(k));
    }
    newcomer.shutdown(Duration::from_secs(10)).await;
    if let Ok(silos) = Arc::try_unwrap(silos) {
        for silo in silos {
            silo.shutdown(Duration::from_secs(10)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn of_two_silos_that_cannot_reach_each_other_but_share_the_table_exactly_one_survives() {
    // Each advertises 127.0.0.2 but listens on 127.0.0.1 only: every probe between them is refused, while both
    // read and write the one membership table.
    // Started together, they miss their probes of each other in step and suspect each other at the same moment.
    let table: Arc<dyn MembershipTable> = Arc::new(grains_storage::MemoryMembershipTable::new());
    let start = |i: usize| {
        let config = SiloConfig {
            name: format!("cut-off-{i}"),
            port: 0,
            gateway: true,
            advertise_host: Some("127.0.0.2".parse().unwrap()),
            failure_detection: grains_silo::FailureDetection::Fast,
            ..test_config()
        };
        Silo::builder().config(config).membership_table(table.clone()).start()
    };
    let (first, second) = tokio::join!(start(0), start(1));
    let silos = [first.unwrap(), second.unwrap()];
    let started = std::time::Instant::now();
    while !silos.iter().any(Silo::is_stopped) {
        assert!(started.elapsed() < Duration::from_secs(20), "neither silo was declared dead");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Long enough for the loser to have voted many times over, were it allowed to.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let stopped: Vec<bool> = silos.iter().map(Silo::is_stopped).collect();
    let snapshot = table.read_all().await.unwrap();
    let statuses: Vec<SiloStatus> =
        silos.iter().map(|s| snapshot.row(s.address()).map(|r| r.entry.status).unwrap()).collect();
    assert_eq!(stopped.iter().filter(|s| **s).count(), 1, "exactly one silo stopped: {stopped:?}, {statuses:?}");
    for (stopped, status) in stopped.iter().zip(&statuses) {
        let expected = if *stopped { SiloStatus::Dead } else { SiloStatus::Active };
        assert_eq!(*status, expected, "the survivor is active, the other dead: {statuses:?}");
    }
    for silo in silos {
        silo.shutdown(Duration::from_secs(5)).await;
    }
}
