//! The event-sourcing examples on real silos: bank transfers across a three-silo cluster keep the total, and
//! the shopping carts' popular-items projection matches what the carts did.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use grains::GrainRef;
use grains_examples::bank::{AccountEvent, TransferState};
use grains_examples::shopping::Popularity;
use grains_examples::{Account, BankError, PopularItems, ShoppingCart, ShoppingError, Transfer, TransferRef};
use grains_silo::{EventStorage, FailureDetection, Silo, SiloConfig, StorageKind};
use grains_storage::postgres::PgPool;
use grains_storage::{MembershipTable, MemoryMembershipTable};
use grains_tests::pg::TestDatabase;
use grains_tests::scaled;
use rand::{Rng, SeedableRng};

fn link() {
    grains_examples::link();
}

/// Starts `n` in-process silos of one cluster (shared in-memory membership), each adjusted by `builder`.
async fn cluster(
    n: usize,
    config: impl Fn(usize) -> SiloConfig,
    builder: impl Fn(grains_silo::SiloBuilder) -> grains_silo::SiloBuilder,
) -> Vec<Silo> {
    link();
    let table: Arc<dyn MembershipTable> = Arc::new(MemoryMembershipTable::new());
    let mut silos = Vec::new();
    for i in 0..n {
        let config = SiloConfig {
            name: format!("silo-{i}"),
            port: 0,
            gateway: true,
            failure_detection: FailureDetection::Fast,
            ..config(i)
        };
        let silo = builder(Silo::builder().config(config).membership_table(table.clone()));
        // (`builder` may name another membership table.)
        silos.push(silo.start().await.expect("silo starts"));
    }
    grains_tests::wait_for_active(&silos, n).await;
    silos
}

fn postgres(db: &TestDatabase) -> impl Fn(usize) -> SiloConfig + '_ {
    |_| SiloConfig {
        storage: StorageKind::Postgres,
        database_url: Some(db.url().to_owned()),
        ..grains_tests::test_config()
    }
}

const ACCOUNTS: usize = 10;
const INITIAL: i64 = 100_000;
const TRANSFERS: usize = 1000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_random_transfers_across_ten_accounts_on_three_silos_keep_the_total() {
    let db = TestDatabase::create().await;
    let table: Arc<dyn MembershipTable> = Arc::new(MemoryMembershipTable::new());
    let injected = Arc::new(AtomicUsize::new(0));
    let mut silos =
        cluster(3, postgres(&db), |b| b.membership_table(table.clone()).outgoing_filter(flaky_deposits(&injected)))
            .await;
    for a in 0..ACCOUNTS {
        let opened = silos[a % 3].grain::<Account>(format!("acct-{a}")).open(INITIAL).await.unwrap();
        assert_eq!(opened, Ok(INITIAL));
    }

    // 1000 transfers between random accounts of random amounts (some more than the balance), 25 at a time,
    // each through a random silo; a transfer whose step was unavailable is run again until it answers.
    let runtimes = Arc::new(std::sync::Mutex::new(silos.iter().map(|s| s.runtime()).collect::<Vec<_>>()));
    let next = Arc::new(AtomicUsize::new(0));
    let workers: Vec<_> = (0..25u64)
        .map(|w| {
            let (runtimes, next) = (runtimes.clone(), next.clone());
            tokio::spawn(async move {
                let mut rng = rand::rngs::SmallRng::seed_from_u64(w);
                let mut outcomes = Vec::new();
                loop {
                    let t = next.fetch_add(1, Ordering::Relaxed);
                    if t >= TRANSFERS {
                        return outcomes;
                    }
                    let from = rng.random_range(0..ACCOUNTS);
                    let to = (from + rng.random_range(1..ACCOUNTS)) % ACCOUNTS;
                    let amount = rng.random_range(1..=40_000);
                    let deadline = Instant::now() + scaled(Duration::from_secs(30));
                    let outcome = loop {
                        let runtime = {
                            let runtimes = runtimes.lock().unwrap();
                            runtimes[rng.random_range(0..runtimes.len())].clone()
                        };
                        let id = grains::GrainId::new("Transfer", format!("t-{t}"));
                        let transfer =
                            <TransferRef as GrainRef>::from_core(grains::__private::RefCore::new(id, runtime));
                        match transfer.run(format!("acct-{from}"), format!("acct-{to}"), amount).await {
                            Ok(Err(BankError::Unavailable(_))) | Err(_) if Instant::now() < deadline => {
                                tokio::time::sleep(Duration::from_millis(10)).await;
                            }
                            Ok(outcome) => break outcome,
                            Err(error) => panic!("transfer t-{t} never answered: {error}"),
                        }
                    };
                    outcomes.push((t, outcome));
                }
            })
        })
        .collect();

    // A third of the way through, one silo leaves (its grains move, calls in flight to it fail and are run
    // again) and another joins.
    while next.load(Ordering::Relaxed) < TRANSFERS / 3 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    runtimes.lock().unwrap().remove(0);
    silos.remove(0).shutdown(Duration::from_secs(5)).await;
    let joined = cluster_member(3, &db, &table, &injected).await;
    runtimes.lock().unwrap().push(joined.runtime());
    silos.push(joined);

    let mut completed = 0;
    let mut refused = 0;
    for worker in workers {
        for (t, outcome) in worker.await.unwrap() {
            match outcome {
                Ok(()) => completed += 1,
                Err(BankError::InsufficientFunds { .. }) => refused += 1,
                Err(other) => panic!("transfer t-{t}: unexpected {other:?}"),
            }
        }
    }
    let injected = injected.load(Ordering::Relaxed);
    println!("{completed} transfers completed, {refused} refused for insufficient funds, {injected} resumed");
    assert!(injected > 10, "transfers were interrupted between debit and credit");
    assert_eq!(completed + refused, TRANSFERS);
    assert!(completed > TRANSFERS / 2 && refused > 0, "{completed} completed, {refused} refused");

    let mut total = 0;
    for a in 0..ACCOUNTS {
        let balance = silos[a % 3].grain::<Account>(format!("acct-{a}")).balance().await.unwrap();
        assert!(balance >= 0, "acct-{a} went negative: {balance}");
        total += balance;
    }
    assert_eq!(total, INITIAL * ACCOUNTS as i64, "the total is what the accounts opened with");

    // Each completed transfer withdrew once and deposited once, each refused one moved nothing.
    let pool = db.pool().await;
    for t in 0..TRANSFERS {
        let state = silos[t % 3].grain::<Transfer>(format!("t-{t}")).state().await.unwrap();
        let (from, to) = match &state {
            TransferState::Completed { from, to, .. } => (Some(from.clone()), Some(to.clone())),
            TransferState::Failed { .. } => (None, None),
            other => panic!("t-{t} did not finish: {other:?}"),
        };
        let (withdrawn, deposited) = applications(&pool, &format!("t-{t}")).await;
        assert_eq!(withdrawn, from.into_iter().collect::<Vec<_>>(), "t-{t}: withdrawals");
        assert_eq!(deposited, to.into_iter().collect::<Vec<_>>(), "t-{t}: deposits");
    }
    // The statement of an account folds to its balance.
    let statement = silos[0].grain::<Account>("acct-0").statement().await.unwrap().unwrap();
    let folded: i64 = statement
        .iter()
        .map(|e| match e {
            AccountEvent::Opened { initial } => *initial,
            AccountEvent::Withdrawn { amount, .. } => -amount,
            AccountEvent::Deposited { amount, .. } => *amount,
        })
        .sum();
    assert_eq!(folded, silos[0].grain::<Account>("acct-0").balance().await.unwrap());

    // Steps run again (as after an unknown outcome) change nothing: the accounts apply each transfer once.
    for t in (0..TRANSFERS).step_by(20) {
        let state = silos[1].grain::<Transfer>(format!("t-{t}")).state().await.unwrap();
        if let TransferState::Completed { from, to, amount } = state {
            let transfer = silos[1].grain::<Transfer>(format!("t-{t}"));
            assert_eq!(transfer.run(from.clone(), to.clone(), amount).await.unwrap(), Ok(()));
            let (a, b) = (silos[2].grain::<Account>(from), silos[2].grain::<Account>(to));
            let before = (a.balance().await.unwrap(), b.balance().await.unwrap());
            assert_eq!(a.withdraw(format!("t-{t}"), amount).await.unwrap(), Ok(before.0));
            assert_eq!(b.deposit(format!("t-{t}"), amount).await.unwrap(), Ok(before.1));
        }
    }
    let mut total = 0;
    for a in 0..ACCOUNTS {
        total += silos[a % 3].grain::<Account>(format!("acct-{a}")).balance().await.unwrap();
    }
    assert_eq!(total, INITIAL * ACCOUNTS as i64, "the total after the retries");
    for silo in silos {
        silo.shutdown(Duration::from_secs(5)).await;
    }
    pool.close().await;
}

/// Starts silo number `i` of the Postgres-backed cluster sharing `table`.
async fn cluster_member(
    i: usize,
    db: &TestDatabase,
    table: &Arc<dyn MembershipTable>,
    injected: &Arc<AtomicUsize>,
) -> Silo {
    let config = SiloConfig {
        name: format!("silo-{i}"),
        port: 0,
        gateway: true,
        failure_detection: FailureDetection::Fast,
        ..postgres(db)(i)
    };
    let builder = Silo::builder().config(config).membership_table(table.clone());
    builder.outgoing_filter(flaky_deposits(injected)).start().await.expect("silo starts")
}

/// An outgoing filter that fails every tenth deposit call a grain makes, before it runs: the transfer it
/// belongs to stops between its debit and its credit, and finishes when it is run again.
fn flaky_deposits(
    injected: &Arc<AtomicUsize>,
) -> impl Fn(&grains_silo::CallInfo<'_>) -> Result<(), grains::CallError> + Send + Sync + 'static {
    let (calls, injected) = (AtomicUsize::new(0), injected.clone());
    move |call| {
        if call.method == "deposit" && calls.fetch_add(1, Ordering::Relaxed) % 10 == 9 {
            injected.fetch_add(1, Ordering::Relaxed);
            return Err(grains::CallError::Unavailable("injected: the deposit call failed".into()));
        }
        Ok(())
    }
}

/// The accounts (storage keys) whose journal applied a withdrawal, and a deposit, of `transfer`.
async fn applications(pool: &PgPool, transfer: &str) -> (Vec<String>, Vec<String>) {
    let rows: Vec<(String, String)> = sqlx::query_as(
        "SELECT event_type, grain_key FROM grains_journal
         WHERE grain_type = 'Account' AND payload -> event_type ->> 'transfer' = $1 ORDER BY position",
    )
    .bind(transfer)
    .fetch_all(pool)
    .await
    .unwrap();
    let of = |kind: &str| {
        rows.iter()
            .filter(|(t, _)| t == kind)
            .map(|(_, k)| grains::GrainKey::from_storage_key(k).unwrap().to_string())
            .collect()
    };
    (of("Withdrawn"), of("Deposited"))
}

/// What the carts did, as the read model should show it.
#[derive(Default)]
struct Expected(BTreeMap<String, Popularity>);

impl Expected {
    fn change(&mut self, item: &str, in_carts: i64, purchased: i64) {
        let row = self.0.entry(item.to_owned()).or_default();
        row.in_carts += in_carts;
        row.purchased += purchased;
    }

    fn top(&self, n: usize) -> Vec<(String, Popularity)> {
        let mut rows: Vec<_> = self.0.iter().map(|(k, v)| (k.clone(), *v)).collect();
        rows.sort_by(|a, b| b.1.purchased.cmp(&a.1.purchased).then_with(|| a.0.cmp(&b.0)));
        rows.truncate(n);
        rows
    }
}

/// Shops with 20 carts through `silos`: random adds, removes and checkouts; returns what the read model
/// should hold.
async fn shop(silos: &[Silo]) -> Expected {
    let mut expected = Expected::default();
    let mut rng = rand::rngs::SmallRng::seed_from_u64(7);
    let items = ["apple", "bread", "cheese", "milk"];
    for step in 0..300 {
        let cart = silos[step % silos.len()].grain::<ShoppingCart>(format!("customer-{}", rng.random_range(0..20)));
        let item = items[rng.random_range(0..items.len())];
        match rng.random_range(0..10) {
            0..6 => match cart.add(item.to_owned(), rng.random_range(1..4)).await.unwrap() {
                Ok(_) | Err(ShoppingError::CheckedOut) => {}
                Err(other) => panic!("add: {other}"),
            },
            6..8 => {
                let held = cart.contents().await.unwrap().items.get(item).copied().unwrap_or(0);
                match cart.remove(item.to_owned(), 1).await.unwrap() {
                    Ok(_) => assert!(held >= 1),
                    Err(ShoppingError::NotInCart { .. }) => assert_eq!(held, 0),
                    Err(ShoppingError::CheckedOut) => {}
                    Err(other) => panic!("remove: {other}"),
                }
            }
            _ => match cart.checkout().await.unwrap() {
                Ok(_) | Err(ShoppingError::Empty | ShoppingError::CheckedOut) => {}
                Err(other) => panic!("checkout: {other}"),
            },
        }
    }
    // The expected read model, from what the carts' own histories say happened.
    for c in 0..20 {
        let history = silos[0].grain::<ShoppingCart>(format!("customer-{c}")).history().await.unwrap().unwrap();
        for (_, event) in history {
            match event {
                grains_examples::shopping::CartEvent::ItemAdded { item, qty } => {
                    expected.change(&item, i64::from(qty), 0)
                }
                grains_examples::shopping::CartEvent::ItemRemoved { item, qty } => {
                    expected.change(&item, -i64::from(qty), 0)
                }
                grains_examples::shopping::CartEvent::CheckedOut { items } => {
                    for (item, qty) in items {
                        expected.change(&item, -i64::from(qty), i64::from(qty));
                    }
                }
            }
        }
    }
    expected
}

async fn wait_for(limit: Duration, what: &str, mut done: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + scaled(limit);
    while !done().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_popular_items_table_matches_what_the_carts_did() {
    let db = TestDatabase::create().await;
    let silos = cluster(2, postgres(&db), |b| b.projection(PopularItems::new())).await;
    let expected = shop(&silos).await;
    let pool = db.pool().await;
    let last: i64 = sqlx::query_scalar("SELECT max(position) FROM grains_journal").fetch_one(&pool).await.unwrap();
    wait_for(Duration::from_secs(20), "the projection to catch up", async || {
        grains_storage::postgres::projection_offset(&pool, PopularItems::NAME).await.unwrap() == last as u64
    })
    .await;
    let table = PopularItems::top_in_postgres(&pool, 10).await.unwrap();
    assert_eq!(table, expected.top(10));
    assert!(table.iter().any(|(_, p)| p.purchased > 0) && table.iter().all(|(_, p)| p.in_carts >= 0));
    for silo in silos {
        silo.shutdown(Duration::from_secs(5)).await;
    }
    pool.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_in_memory_popular_items_match_what_the_carts_did() {
    let storage = EventStorage::memory();
    let popular = PopularItems::new();
    let silos =
        cluster(2, |_| grains_tests::test_config(), |b| b.event_storage(storage.clone()).projection(popular.clone()))
            .await;
    let expected = shop(&silos).await;
    let last =
        storage.journal().read_all(&grains_storage::EventSelector::Tag("shop".into()), 0, 100_000).await.unwrap();
    let last = last.last().map_or(0, |e| e.position);
    wait_for(Duration::from_secs(20), "the projection to catch up", async || {
        storage.projection_offset(PopularItems::NAME).await.unwrap() == last
    })
    .await;
    assert_eq!(popular.top(10), expected.top(10));
    let refused = silos[0].grain::<ShoppingCart>("customer-0").add("caviar".into(), 1).await.unwrap();
    assert!(matches!(refused, Err(ShoppingError::UnknownItem(_) | ShoppingError::CheckedOut)), "{refused:?}");
    for silo in silos {
        silo.shutdown(Duration::from_secs(5)).await;
    }
}
