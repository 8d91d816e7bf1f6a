//! Stateful vs stateless: the cart workload (add an item, then read the cart) on Grains with the Postgres
//! provider, beside a stateless handler that does read-modify-write in Postgres on every request — same server,
//! same pool size, same concurrency.
//!
//! The Grains cart writes its state through to Postgres on every `add` (one `UPDATE`) and answers `items`
//! from memory; the stateless handler pays `SELECT … FOR UPDATE` + `UPDATE` for the add and a `SELECT` for the
//! read, every time.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use grains_examples::Cart;
use grains_silo::{Silo, SiloConfig, StorageKind};
use sqlx::PgPool;

use crate::harness::{header, measure, row};
use crate::storage::scratch_database;

const CARTS: usize = 1000;

/// Runs both sides at 64 concurrent callers.
pub(crate) async fn run(admin_url: &str, window: Duration) -> anyhow::Result<()> {
    scratch_database(admin_url, "cart", |url: String| async move { run_on(&url, window).await }).await
}

async fn run_on(url: &str, window: Duration) -> anyhow::Result<()> {
    let config = SiloConfig {
        gateway: false,
        storage: StorageKind::Postgres,
        database_url: Some(url.to_owned()),
        database_pool_size: 32,
        ..SiloConfig::default()
    };
    let silo = Silo::builder().config(config).start().await?;
    let pool = grains_storage::postgres::connect(
        url,
        &grains_storage::postgres::PostgresOptions { pool_size: 32, ..Default::default() },
    )
    .await?;
    sqlx::query("CREATE TABLE stateless_carts (id TEXT PRIMARY KEY, document JSONB NOT NULL)").execute(&pool).await?;

    let callers = 64;
    let silo = Arc::new(silo);
    let s = silo.clone();
    let grains_stats = measure(callers, window, move |w| {
        let cart = s.grain::<Cart>(format!("cart-{}", w % CARTS));
        async move {
            cart.add("apple".into(), 1).await?.map_err(|e| anyhow::anyhow!(e))?;
            cart.items().await?;
            Ok(())
        }
    })
    .await?;
    let p = pool.clone();
    let stateless = measure(callers, window, move |w| {
        let pool = p.clone();
        async move {
            stateless_add(&pool, &format!("cart-{}", w % CARTS), "apple", 1).await?;
            let _: Option<(serde_json::Value,)> = sqlx::query_as("SELECT document FROM stateless_carts WHERE id = $1")
                .bind(format!("cart-{}", w % CARTS))
                .fetch_optional(&pool)
                .await?;
            Ok(())
        }
    })
    .await?;
    header("Stateful vs stateless: add an item, then read the cart (Postgres, 64 callers)", "stateless");
    row("cart add + read", callers, grains_stats, stateless);
    pool.close().await;
    if let Ok(silo) = Arc::try_unwrap(silo) {
        silo.shutdown(Duration::from_secs(10)).await;
    }
    Ok(())
}

/// The stateless handler: read-modify-write of the cart row in one transaction.
async fn stateless_add(pool: &PgPool, id: &str, item: &str, qty: u32) -> anyhow::Result<u32> {
    let mut tx = pool.begin().await?;
    let current: Option<(serde_json::Value,)> =
        sqlx::query_as("SELECT document FROM stateless_carts WHERE id = $1 FOR UPDATE")
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?;
    let mut items: BTreeMap<String, u32> = match current {
        Some((doc,)) => serde_json::from_value(doc["items"].clone()).unwrap_or_default(),
        None => BTreeMap::new(),
    };
    let n = items.entry(item.to_owned()).or_default();
    *n += qty;
    let n = *n;
    sqlx::query(
        "INSERT INTO stateless_carts (id, document) VALUES ($1, $2)
         ON CONFLICT (id) DO UPDATE SET document = EXCLUDED.document",
    )
    .bind(id)
    .bind(serde_json::json!({ "items": items }))
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(n)
}
