//! A demo client: connects to a silo's gateway from a separate process and calls the example grains.
//!
//! `grains-demo-client [URL]` (default `http://127.0.0.1:30000`).

use grains::{CallResultExt, GrainCallError};
use grains_examples::{Cart, CartError, Hello};
use grains_silo::Client;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let url = std::env::args().nth(1).unwrap_or_else(|| "http://127.0.0.1:30000".to_owned());
    println!("connecting to {url}");
    let client = Client::connect(url).await?;

    let hello = client.grain::<Hello>("world");
    for from in ["alice", "bob"] {
        println!("Hello/world.greet({from:?}) -> {:?}", hello.greet(from.to_owned()).await?);
    }

    let cart = client.grain::<Cart>("alice");
    // `flatten_call()?`: fails on a failed call and on the grain's own error alike, reporting which.
    println!("Cart/alice.add(apple, 2)  -> {}", cart.add("apple".into(), 2).await.flatten_call()?);
    println!("Cart/alice.add(bread, 1)  -> {}", cart.add("bread".into(), 1).await.flatten_call()?);
    println!("Cart/alice.add(apple, 3)  -> {}", cart.add("apple".into(), 3).await.flatten_call()?);
    // The grain saying no is a value to match, apart from the call failing.
    match cart.add("caviar".into(), 1).await.flatten_call() {
        Err(GrainCallError::Grain(refused @ CartError::UnknownItem(_))) => {
            println!("Cart/alice.add(caviar, 1) -> refused: {refused}");
        }
        other => anyhow::bail!("caviar is not in the catalog, yet adding it gave {other:?}"),
    }
    println!("Cart/alice.items()        -> {:?}", cart.items().await?);
    println!("Cart/alice.total()        -> {} cents", cart.total().await.flatten_call()?);

    // Many grains at once, all over the one multiplexed connection.
    let calls = (0..100).map(|i| {
        let cart = client.grain::<Cart>(i64::from(i));
        async move { cart.add("milk".into(), 1).await }
    });
    let results = futures_join_all(calls).await;
    let ok = results.iter().filter(|r| matches!(r, Ok(Ok(1)))).count();
    println!("100 carts keyed 0..99 each added one milk: {ok} succeeded");
    Ok(())
}

/// Runs the futures concurrently on the runtime and collects their outputs in order.
async fn futures_join_all<F>(futures: impl Iterator<Item = F>) -> Vec<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    let handles: Vec<_> = futures.map(tokio::spawn).collect();
    let mut out = Vec::with_capacity(handles.len());
    for handle in handles {
        match handle.await {
            Ok(v) => out.push(v),
            Err(e) => panic!("demo task failed: {e}"),
        }
    }
    out
}
