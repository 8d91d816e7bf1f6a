//! The single-silo runtime: activation, turns, passivation, state, deadlines, failures, call cycles.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use grains::{CallError, GrainId, GrainKey, RequestMetadata, StorageError, Uuid};
use grains_silo::GrainTypeConfig;
use grains_storage::{GrainStateStore, MemoryStateStore};
use grains_tests::{Counter, LIFECYCLE, Peer, SlowStart, start_silo, start_silo_with_store, test_config};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_thousand_concurrent_first_calls_build_exactly_one_activation() {
    let silo = start_silo(test_config()).await;
    let key = "one-activation";
    let calls: Vec<_> = (0..1000)
        .map(|_| {
            let counter = silo.grain::<Counter>(key);
            tokio::spawn(async move { counter.increment().await })
        })
        .collect();
    let mut values = Vec::new();
    for call in calls {
        values.push(call.await.unwrap().unwrap().unwrap());
    }
    values.sort_unstable();
    assert_eq!(values, (1..=1000).collect::<Vec<u64>>(), "every call ran exactly once, one after another");
    assert_eq!(LIFECYCLE.activations(key), 1);
    assert_eq!(silo.metrics().activations, 1);
    assert_eq!(silo.activation_count(), 1);
    silo.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn turns_of_one_grain_never_overlap() {
    let silo = start_silo(test_config()).await;
    let counter = silo.grain::<Counter>("no-overlap");
    let calls: Vec<_> = (0..200)
        .map(|_| {
            let counter = counter.clone();
            tokio::spawn(async move { counter.increment_slowly(1).await })
        })
        .collect();
    for call in calls {
        call.await.unwrap().unwrap().unwrap();
    }
    // Each turn read, slept, then wrote value + 1: any overlap would have lost increments.
    assert_eq!(counter.get().await.unwrap(), 200);
    silo.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn an_idle_grain_is_passivated_and_its_state_reloads_on_the_next_call() {
    let mut config = test_config();
    config.grain.insert("Counter".into(), GrainTypeConfig { idle_timeout: Some(Duration::from_millis(200)) });
    let silo = start_silo(config).await;
    let key = "passivate-me";
    let counter = silo.grain::<Counter>(key);
    assert_eq!(counter.increment().await.unwrap().unwrap(), 1);
    assert_eq!(counter.increment().await.unwrap().unwrap(), 2);
    let id = GrainId::new("Counter", key);
    assert!(silo.is_active(&id));

    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while silo.is_active(&id) {
        assert!(tokio::time::Instant::now() < deadline, "the idle collector never passivated the grain");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(LIFECYCLE.deactivations(key), 1, "on_deactivate ran once");
    assert_eq!(silo.activation_count(), 0, "the activation's memory is released from the table");

    assert_eq!(counter.get().await.unwrap(), 2, "the new activation reloaded the stored state");
    assert_eq!(LIFECYCLE.activations(key), 2);
    silo.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn a_busy_grain_is_not_passivated() {
    let mut config = test_config();
    config.grain.insert("Counter".into(), GrainTypeConfig { idle_timeout: Some(Duration::from_millis(100)) });
    let silo = start_silo(config).await;
    let counter = silo.grain::<Counter>("busy");
    // One turn that lasts well beyond the idle timeout, with the collector ticking throughout.
    counter.sleep(400).await.unwrap();
    assert_eq!(LIFECYCLE.deactivations("busy"), 0, "not deactivated in the middle of a turn");
    silo.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn a_write_with_a_stale_etag_is_refused_and_the_loser_deactivates() {
    let store = Arc::new(MemoryStateStore::new());
    let silo = start_silo_with_store(test_config(), store.clone()).await;
    let key = "etag-race";
    let counter = silo.grain::<Counter>(key);
    assert_eq!(counter.increment().await.unwrap().unwrap(), 1);
    let etag = counter.etag().await.unwrap().expect("a stored version");

    // Another writer (a duplicate activation elsewhere, an operator) replaces the record.
    let state_key = GrainId::new("Counter", key).state_key("state");
    store.write(&state_key, &serde_json::json!({"value": 100}), Some(&etag)).await.unwrap();

    let refused = counter.increment().await.unwrap();
    assert!(matches!(refused, Err(StorageError::Conflict { .. })), "got {refused:?}");
    let stored = store.read(&state_key).await.unwrap().unwrap();
    assert_eq!(stored.document, serde_json::json!({"value": 100}), "the other writer's state was not overwritten");

    // The refused activation left; the next call reloads the winner's state.
    assert_eq!(counter.increment().await.unwrap().unwrap(), 101);
    assert_eq!(LIFECYCLE.activations(key), 2);
    silo.shutdown(Duration::from_secs(5)).await;
}

/// Pairs of keys of one grain type whose text forms are equal or look alike, but which name different grains.
fn look_alike_keys() -> Vec<(GrainKey, GrainKey)> {
    let uuid = Uuid::from_u128(0x5);
    vec![
        (GrainKey::Int(5), GrainKey::from("5")),
        (GrainKey::from((1, "x")), GrainKey::from("1+x")),
        (GrainKey::Uuid(uuid), GrainKey::from(uuid.to_string())),
        (GrainKey::from((1, "2+x")), GrainKey::from((12, "x"))),
    ]
}

#[tokio::test]
async fn grains_whose_keys_differ_only_in_shape_keep_separate_state() {
    let silo = start_silo(test_config()).await;
    for (a, b) in look_alike_keys() {
        let (first, second) = (silo.grain::<Counter>(a.clone()), silo.grain::<Counter>(b.clone()));
        assert_eq!(first.increment().await.unwrap().unwrap(), 1);
        assert_eq!(first.increment().await.unwrap().unwrap(), 2);
        assert_eq!(second.increment().await.unwrap().unwrap(), 1, "{b:?} must not read the state of {a:?}");
        assert_eq!(first.increment().await.unwrap().unwrap(), 3, "{a:?} must not see a write of {b:?}");
    }
    silo.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn a_call_past_its_deadline_ends_in_timeout() {
    let silo = start_silo(test_config()).await;
    let counter = silo.grain::<Counter>("slow").with_timeout(Duration::from_millis(100));
    let started = std::time::Instant::now();
    let result = counter.sleep(2_000).await;
    assert!(matches!(result, Err(CallError::Timeout(_))), "got {result:?}");
    assert!(started.elapsed() < Duration::from_secs(1), "the caller was released at its deadline");
    silo.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_warm_call_to_an_idle_activation_runs_on_the_callers_task_and_a_busy_one_queues() {
    let silo = start_silo(test_config()).await;
    let counter = silo.grain::<Counter>("inline");
    counter.increment().await.unwrap().unwrap(); // activated (its first turn runs on the activation's drainer)
    let here = format!("{:?}", tokio::task::try_id());
    assert_eq!(counter.task().await.unwrap(), here, "an idle activation's turn runs on the caller's task");
    // While one caller's turn runs, another's call queues and runs on the activation's drainer, after it.
    let slow = tokio::spawn({
        let counter = counter.clone();
        async move { counter.increment_slowly(300).await }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let other = counter.task().await.unwrap();
    assert_ne!(other, here);
    assert_eq!(slow.await.unwrap().unwrap().unwrap(), 2);
    silo.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_activation_holds_no_task() {
    let silo = start_silo(test_config()).await;
    let alive = || tokio::runtime::Handle::current().metrics().num_alive_tasks();
    let before = alive();
    let counters: Vec<_> = (0..500).map(|i| silo.grain::<Counter>(format!("taskless-{i}"))).collect();
    for counter in &counters {
        counter.increment().await.unwrap().unwrap();
    }
    assert_eq!(silo.activation_count(), 500);
    // A drain's task ends once its mailbox is empty; wait for the last ones to end.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while alive() > before + 10 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(alive() <= before + 10, "500 idle activations hold {} tasks", alive() - before);
    // They serve on, with their state.
    for counter in &counters {
        assert_eq!(counter.increment().await.unwrap().unwrap(), 2);
    }
    // Shutdown's deactivation is mail too: it starts a drain of each, and each leaves.
    silo.shutdown(Duration::from_secs(5)).await;
    for i in 0..500 {
        assert_eq!(LIFECYCLE.deactivations(&format!("taskless-{i}")), 1, "taskless-{i} ran on_deactivate once");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_turn_run_inline_is_finished_after_its_caller_times_out() {
    let silo = start_silo(test_config()).await;
    let counter = silo.grain::<Counter>("inline-timeout");
    counter.increment().await.unwrap().unwrap();
    // The caller gives up at 100 ms; the turn it started is not cut short: its write lands.
    let result = counter.with_timeout(Duration::from_millis(100)).increment_slowly(400).await;
    assert!(matches!(result, Err(CallError::Timeout(_))), "got {result:?}");
    assert_eq!(counter.get().await.unwrap(), 2, "the timed-out turn ran to its end, before the next one");
    assert_eq!(counter.increment().await.unwrap().unwrap(), 3);
    silo.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_turn_run_inline_is_finished_after_its_caller_drops_the_call() {
    let silo = start_silo(test_config()).await;
    let counter = silo.grain::<Counter>("inline-dropped");
    counter.increment().await.unwrap().unwrap();
    // The caller stops polling mid-turn (a `select!`, an outer timeout, a dropped request): the turn it was
    // running on its own task is not cut short between its read and its write, and the grain serves on.
    let abandoned = tokio::time::timeout(Duration::from_millis(100), counter.increment_slowly(400)).await;
    assert!(abandoned.is_err(), "the outer timeout fired first: {abandoned:?}");
    assert_eq!(counter.get().await.unwrap(), 2, "the abandoned turn ran to its end, before the next one");
    assert_eq!(counter.increment().await.unwrap().unwrap(), 3);
    assert_eq!(silo.activation_count(), 1, "the grain kept its activation");
    silo.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn a_cold_call_dropped_mid_activation_still_activates_the_grain() {
    // A cold call's caller routes it and builds the activation on its own task. Dropped while `on_activate`
    // runs (an outer timeout here), that work goes on on a task of its own: the activation is built once, and
    // serves the next call.
    let silo = start_silo(test_config()).await;
    let key = "400-dropped-mid-activation";
    let grain = silo.grain::<SlowStart>(key);
    let abandoned = tokio::time::timeout(Duration::from_millis(100), grain.ping()).await;
    assert!(abandoned.is_err(), "the outer timeout fired first: {abandoned:?}");
    let next = tokio::time::timeout(Duration::from_secs(10), grain.ping()).await;
    assert_eq!(next.expect("the next call was answered").unwrap(), key);
    assert_eq!(LIFECYCLE.activations(key), 1, "the abandoned activation was finished, not built again");
    assert_eq!(silo.activation_count(), 1);
    silo.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cold_callers_answer_does_not_wait_for_the_calls_queued_behind_it() {
    // The first caller builds the activation and serves the mailbox on its own task; calls that queue behind
    // its own meanwhile are not its to wait for: it returns with its answer, and they are served elsewhere.
    let silo = start_silo(test_config()).await;
    let grain = silo.grain::<SlowStart>("300-first-caller");
    let first = tokio::spawn({
        let grain = grain.clone();
        async move {
            let started = std::time::Instant::now();
            grain.ping().await.unwrap();
            started.elapsed()
        }
    });
    tokio::time::sleep(Duration::from_millis(100)).await; // `on_activate` is still running
    let behind: Vec<_> = (0..3)
        .map(|_| {
            let grain = grain.clone();
            tokio::spawn(async move { grain.sleep(2_000).await })
        })
        .collect();
    let first = first.await.unwrap();
    assert!(first < Duration::from_millis(1_900), "the first caller waited {first:?} for the calls behind it");
    for call in behind {
        call.await.unwrap().unwrap();
    }
    silo.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn an_activation_built_on_a_calling_grains_task_sees_none_of_its_metadata() {
    // The caller of a cold grain builds it on its own task, here a grain's turn: `on_activate` still runs as
    // on a task of its own, outside the caller's turn (its calls carry neither that turn's chain nor metadata).
    let silo = start_silo(test_config()).await;
    let caller = silo.grain::<SlowStart>("0-metadata-caller");
    caller.ping().await.unwrap();
    let seen = RequestMetadata::new()
        .with("tenant", "caller's")
        .scope(caller.ask_metadata_on_activate("0-metadata-callee".into()))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(seen, Vec::<(String, String)>::new());
    silo.shutdown(Duration::from_secs(5)).await;
}

#[test]
fn a_runtime_dropped_mid_turn_drops_the_turn_it_ran_inline() {
    // The turn's caller is dropped with the runtime; the turn cannot go on to a task of its own there (a task
    // spawned on a runtime shutting down is dropped at once) and must end with it, not be handed on forever.
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let silo = runtime.block_on(async {
        let silo = start_silo(test_config()).await;
        let counter = silo.grain::<Counter>("dropped-with-its-runtime");
        counter.increment().await.unwrap().unwrap();
        tokio::spawn(async move { counter.increment_slowly(60_000).await });
        tokio::time::sleep(Duration::from_millis(100)).await;
        silo
    });
    drop(runtime);
    drop(silo);
}

#[tokio::test]
async fn a_loop_of_warm_calls_yields_to_the_other_tasks_of_its_thread() {
    // One thread: a task calling an idle local grain in a loop runs each turn itself, and each answer is ready
    // at once. Like a loop over a tokio channel, it must still give the thread up now and then.
    let silo = start_silo(test_config()).await;
    let counter = silo.grain::<Counter>("cooperative");
    counter.increment().await.unwrap().unwrap();
    let other_ran = Arc::new(AtomicBool::new(false));
    tokio::spawn({
        let other_ran = other_ran.clone();
        async move { other_ran.store(true, Ordering::Relaxed) }
    });
    let mut calls_before_it_ran = None;
    for call in 0..10_000 {
        assert_eq!(counter.get().await.unwrap(), 1);
        if other_ran.load(Ordering::Relaxed) {
            calls_before_it_ran = Some(call);
            break;
        }
    }
    assert!(calls_before_it_ran.is_some_and(|calls| calls < 1_000), "ran after {calls_before_it_ran:?} calls");
    silo.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn the_silo_default_deadline_applies_to_calls_without_their_own() {
    let config = grains_silo::SiloConfig { call_timeout: Duration::from_millis(100), ..test_config() };
    let silo = start_silo(config).await;
    let result = silo.grain::<Counter>("default-deadline").sleep(2_000).await;
    assert!(matches!(result, Err(CallError::Timeout(_))), "got {result:?}");
    silo.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_method_fails_its_caller_and_deactivates_only_that_grain() {
    let silo = start_silo(test_config()).await;
    let victim = silo.grain::<Counter>("panics");
    let bystander = silo.grain::<Counter>("bystander");
    assert_eq!(victim.increment().await.unwrap().unwrap(), 1);
    assert_eq!(bystander.increment().await.unwrap().unwrap(), 1);

    let result = victim.explode().await;
    match result {
        Err(CallError::Panicked { method, message, .. }) => {
            assert_eq!(method, "explode");
            assert!(message.contains("on purpose"), "{message}");
        }
        other => panic!("expected a panic error, got {other:?}"),
    }
    assert_eq!(bystander.increment().await.unwrap().unwrap(), 2, "other grains keep serving");
    assert_eq!(victim.get().await.unwrap(), 1, "the grain re-activated from its stored state");
    assert_eq!(LIFECYCLE.activations("panics"), 2);
    assert_eq!(LIFECYCLE.deactivations("panics"), 0, "on_deactivate does not run on a panicked grain");
    silo.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn a_call_cycle_is_refused_at_once_instead_of_hanging() {
    let silo = start_silo(test_config()).await;
    let a = silo.grain::<Peer>("cycle-a");
    let started = std::time::Instant::now();
    let result = a.call_peer("cycle-b".into()).await.unwrap();
    match result {
        Err(CallError::Deadlock { chain }) => {
            assert_eq!(chain, vec!["Peer/cycle-a", "Peer/cycle-b", "Peer/cycle-a"]);
        }
        other => panic!("expected a deadlock error, got {other:?}"),
    }
    assert!(started.elapsed() < Duration::from_secs(5), "refused, not timed out");
    // Both grains are still healthy.
    assert_eq!(a.ask_name("cycle-b".into()).await.unwrap().unwrap(), "cycle-b");
    silo.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn a_failed_activation_returns_a_typed_error_and_leaves_nothing_behind() {
    let silo = start_silo(test_config()).await;
    let broken = silo.grain::<Peer>("fail-1");
    for attempt in 1..=2 {
        match broken.name().await {
            Err(CallError::ActivationFailed { grain, reason }) => {
                assert_eq!(grain, "Peer/fail-1");
                assert!(reason.contains("refuses"), "{reason}");
            }
            other => panic!("expected an activation failure, got {other:?}"),
        }
        assert!(!silo.is_active(&GrainId::new("Peer", "fail-1")));
        assert_eq!(LIFECYCLE.activations("fail-1"), attempt, "each call tries a fresh activation");
    }
    assert_eq!(silo.metrics().activation_failures, 2);
    silo.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn deactivate_on_idle_ends_the_activation_after_the_turn() {
    let silo = start_silo(test_config()).await;
    let peer = silo.grain::<Peer>("leaves");
    peer.deactivate().await.unwrap();
    let id = GrainId::new("Peer", "leaves");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while silo.is_active(&id) {
        assert!(tokio::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(LIFECYCLE.deactivations("leaves"), 1);
    assert_eq!(peer.name().await.unwrap(), "leaves", "the next call re-activates it");
    silo.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn grains_call_grains_with_every_key_shape() {
    let silo = start_silo(test_config()).await;
    let a = silo.grain::<Peer>("caller");
    assert_eq!(a.ask_name("callee".into()).await.unwrap().unwrap(), "callee");
    let uuid = grains::Uuid::from_u128(0x1234);
    for (key, text) in [
        (grains::GrainKey::from(7i64), "7".to_owned()),
        (uuid.into(), uuid.to_string()),
        ((3, "eu").into(), "3+eu".to_owned()),
    ] {
        assert_eq!(silo.grain::<Peer>(key).name().await.unwrap(), text);
    }
    silo.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn shutdown_deactivates_every_grain_and_refuses_new_calls() {
    let silo = start_silo(test_config()).await;
    for i in 0..10 {
        silo.grain::<Counter>(format!("shutdown-{i}")).increment().await.unwrap().unwrap();
    }
    let late = silo.grain::<Counter>("shutdown-late");
    silo.shutdown(Duration::from_secs(5)).await;
    for i in 0..10 {
        assert_eq!(LIFECYCLE.deactivations(&format!("shutdown-{i}")), 1);
    }
    assert!(matches!(late.get().await, Err(CallError::ShuttingDown)));
}

/// A span's name, and the name of the span it was opened in.
type OpenedIn = (&'static str, Option<&'static str>);

/// Records the `grain.*` spans opened, each with the span it was opened in.
#[derive(Clone, Default)]
struct GrainSpans(Arc<std::sync::Mutex<Vec<OpenedIn>>>);

impl<S> tracing_subscriber::Layer<S> for GrainSpans
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    fn on_new_span(
        &self,
        attrs: &tracing::span::Attributes<'_>,
        _id: &tracing::span::Id,
        ctx: tracing_subscriber::layer::Context<'_, S>,
    ) {
        let name = attrs.metadata().name();
        if name.starts_with("grain.") {
            let parent = ctx.lookup_current().map(|span| span.name());
            self.0.lock().unwrap().push((name, parent));
        }
    }
}

#[tokio::test]
async fn a_warm_grain_to_grain_call_is_traced_turn_inside_call_when_a_subscriber_wants_the_spans() {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    // Spans nobody wants are skipped on the warm path (no span entered per poll): one that is wanted must still
    // enclose what runs inside it, on the caller's task, turn inside call inside turn inside call.
    let spans = GrainSpans::default();
    let _subscriber = tracing_subscriber::registry().with(spans.clone()).set_default();
    let silo = start_silo(test_config()).await;
    let (asker, asked) = (silo.grain::<Peer>("asker"), silo.grain::<Peer>("asked"));
    assert_eq!(asked.name().await.unwrap(), "asked");
    assert_eq!(asker.name().await.unwrap(), "asker");
    spans.0.lock().unwrap().clear();

    assert_eq!(asker.ask_name("asked".to_owned()).await.unwrap().unwrap(), "asked");
    let seen = std::mem::take(&mut *spans.0.lock().unwrap());
    assert_eq!(
        seen,
        [
            ("grain.call", None),
            ("grain.turn", Some("grain.call")),
            ("grain.call", Some("grain.turn")),
            ("grain.turn", Some("grain.call")),
        ]
    );
    silo.shutdown(Duration::from_secs(5)).await;
}
