//! The abandoned-cart example: a cart left alone for its abandonment time is emptied by its reminder, even
//! though it passivated meanwhile; a cart still in use is not.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use grains_examples::AbandonableCart;
use grains_silo::{GrainTypeConfig, Silo, SiloConfig};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cart_left_alone_is_emptied_and_one_in_use_is_not() {
    grains_examples::link();
    // Carts passivate after 300 ms idle: the reminder must activate them again to empty them.
    let mut grain = BTreeMap::new();
    grain.insert("AbandonableCart".to_owned(), GrainTypeConfig { idle_timeout: Some(Duration::from_millis(300)) });
    let config = SiloConfig {
        gateway: false,
        collection_interval: Duration::from_millis(50),
        reminder_refresh_interval: Duration::from_secs(1),
        grain,
        ..SiloConfig::default()
    };
    let silo = Silo::builder().config(config).start().await.unwrap();
    let left = silo.grain::<AbandonableCart>("left-alone");
    let busy = silo.grain::<AbandonableCart>("in-use");
    for cart in [&left, &busy] {
        cart.abandon_after(3).await.unwrap().unwrap();
        cart.add("apple".into(), 2).await.unwrap().unwrap();
        assert!(cart.armed().await.unwrap().unwrap(), "the first item arms the reminder");
    }
    let started = Instant::now();
    // The busy cart changes every second; the other is left alone, and passivates.
    let mut passivated = false;
    while started.elapsed() < Duration::from_secs(6) {
        busy.add("bread".into(), 1).await.unwrap().unwrap();
        tokio::time::sleep(Duration::from_secs(1)).await;
        passivated |= !silo.is_active(left.id());
        if (Duration::from_millis(1_500)..Duration::from_millis(2_500)).contains(&started.elapsed()) {
            assert!(!left.items().await.unwrap().is_empty(), "not emptied before its time");
        }
    }
    assert!(passivated, "the abandoned cart passivated while it waited");
    assert!(left.items().await.unwrap().is_empty(), "abandoned for 3 s: emptied within 6 s");
    assert!(!left.armed().await.unwrap().unwrap(), "and its reminder disarmed");
    assert!(!busy.items().await.unwrap().is_empty(), "a cart in use keeps its items");
    assert_eq!(busy.checkout().await.unwrap().unwrap().len(), 2);
    assert!(!busy.armed().await.unwrap().unwrap(), "checkout disarms it");
    silo.shutdown(Duration::from_secs(5)).await;
}
