//! Grain timers: ticks are turns of the activation (never overlapping a method's turn), they end with the
//! activation, and they keep a grain from passivating only when asked.

use std::collections::BTreeMap;
use std::time::Duration;

use grains_silo::{GrainTypeConfig, SiloConfig};
use grains_tests::{LIFECYCLE, TURNS, Ticker, scaled, start_silo, test_config, timer_ticks};

/// Polls `condition` every 10 ms until it holds or `limit` (scaled) passes; whether it held.
async fn eventually(limit: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + scaled(limit);
    while tokio::time::Instant::now() < deadline {
        if condition() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    condition()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn timer_turns_never_overlap_method_turns() {
    let silo = start_silo(test_config()).await;
    let ticker = silo.grain::<Ticker>("overlap");
    ticker.start(2, false).await.unwrap().unwrap();
    // Four callers keep the mailbox full of method turns while the timer ticks every 2 ms; every turn yields
    // to the runtime half-way, so a timer tick run beside a method turn would find the grain busy.
    let callers = (0..4).map(|_| {
        let ticker = ticker.clone();
        tokio::spawn(async move {
            for _ in 0..25 {
                ticker.work(4).await.unwrap();
            }
        })
    });
    for caller in callers {
        caller.await.unwrap();
    }
    let (ticks, overlaps) = ticker.counts().await.unwrap();
    assert_eq!(overlaps, 0, "a turn started while another was running");
    let mut turns = TURNS.lock().unwrap().get("overlap").cloned().unwrap_or_default();
    turns.sort_by_key(|t| t.began);
    for pair in turns.windows(2) {
        assert!(pair[1].began >= pair[0].ended, "{:?} overlaps {:?}", pair[1], pair[0]);
    }
    let methods = turns.iter().filter(|t| t.kind == "method").count();
    assert_eq!(methods, 100);
    assert!(ticks >= 5, "the timer ticked between the calls: {ticks} ticks");
    let interleaved = turns.windows(3).any(|w| w[0].kind == "method" && w[1].kind == "timer" && w[2].kind == "method");
    assert!(interleaved, "timer turns ran between queued method turns, not only after them");
    silo.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timer_ends_with_its_activation() {
    let silo = start_silo(test_config()).await;
    let ticker = silo.grain::<Ticker>("ends");
    ticker.start(10, false).await.unwrap().unwrap();
    assert!(eventually(Duration::from_secs(5), || timer_ticks("ends") >= 3).await, "the timer ticks");
    ticker.leave().await.unwrap();
    assert!(eventually(Duration::from_secs(5), || LIFECYCLE.deactivations("ends") == 1).await);
    let after_leaving = timer_ticks("ends");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(timer_ticks("ends"), after_leaving, "no tick after the activation ended");
    let (ticks, _) = ticker.counts().await.unwrap();
    assert_eq!(ticks, 0, "the next activation starts without the timer");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(timer_ticks("ends"), after_leaving, "and it does not come back");
    silo.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timers_keep_a_grain_from_passivating_only_when_asked() {
    let mut grain = BTreeMap::new();
    grain.insert("Ticker".to_owned(), GrainTypeConfig { idle_timeout: Some(Duration::from_millis(300)) });
    let silo = start_silo(SiloConfig { grain, ..test_config() }).await;
    silo.grain::<Ticker>("idle-ticking").start(30, false).await.unwrap().unwrap();
    silo.grain::<Ticker>("kept-alive").start(30, true).await.unwrap().unwrap();
    assert!(
        eventually(Duration::from_secs(5), || LIFECYCLE.deactivations("idle-ticking") == 1).await,
        "a grain whose only activity is its timer passivates after its idle timeout"
    );
    let after = timer_ticks("idle-ticking");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(timer_ticks("idle-ticking"), after, "its timer ended with it");
    let before = timer_ticks("kept-alive");
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(LIFECYCLE.deactivations("kept-alive"), 0, "a keep-alive timer keeps it active");
    assert!(timer_ticks("kept-alive") > before, "and ticking");
    silo.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_one_shot_timer_fires_once_and_a_cancelled_one_stops() {
    let silo = start_silo(test_config()).await;
    let once = silo.grain::<Ticker>("once");
    once.start_once(20).await.unwrap().unwrap();
    assert!(eventually(Duration::from_secs(5), || timer_ticks("once") == 1).await);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(timer_ticks("once"), 1, "a one-shot timer fires once");

    let cancelled = silo.grain::<Ticker>("cancelled");
    cancelled.start(10, false).await.unwrap().unwrap();
    assert!(eventually(Duration::from_secs(5), || timer_ticks("cancelled") >= 2).await);
    assert!(cancelled.stop().await.unwrap(), "it was running");
    let after = timer_ticks("cancelled");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(timer_ticks("cancelled"), after, "no tick after cancel");
    assert!(!cancelled.stop().await.unwrap(), "cancelled already");
    silo.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_timer_ends_the_activation_and_a_callback_of_another_type_is_refused() {
    let silo = start_silo(test_config()).await;
    let ticker = silo.grain::<Ticker>("panics");
    ticker.start_panicking(10).await.unwrap().unwrap();
    let id = ticker.id().clone();
    assert!(eventually(Duration::from_secs(5), || !silo.is_active(&id)).await, "the activation is dropped");
    assert_eq!(LIFECYCLE.deactivations("panics"), 0, "dropped without on_deactivate, as after a method panic");
    ticker.counts().await.unwrap();
    assert_eq!(LIFECYCLE.activations("panics"), 2, "the next call activates it afresh");

    let refused = silo.grain::<Ticker>("wrong-type").start_for_another_type().await.unwrap().unwrap_err();
    assert!(refused.contains("Counter") && refused.contains("Ticker"), "{refused}");
    silo.shutdown(Duration::from_secs(5)).await;
}
