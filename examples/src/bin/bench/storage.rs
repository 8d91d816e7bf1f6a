//! Grain state through the Postgres provider vs the same statements issued with raw sqlx.
//!
//! Each worker owns one key (one grain's state), so the figures are for N concurrent grains. The provider's
//! write is an etag-checked `UPDATE … RETURNING etag`; the baseline is a plain `UPDATE` of a JSONB row by
//! primary key, and a plain `SELECT` for reads, on the same server with the same pool size.

use std::sync::Arc;
use std::time::Duration;

use grains_storage::postgres::{self, PostgresOptions, PostgresStateStore};
use grains_storage::{GrainStateStore, StateKey};
use serde_json::json;
use sqlx::{Connection, PgConnection};
use tokio::sync::Mutex;

use crate::harness::{header, measure, row};

/// `url` with its database replaced by `database`.
fn with_database(url: &str, database: &str) -> String {
    let (base, query) = url.split_once('?').map_or((url, String::new()), |(b, q)| (b, format!("?{q}")));
    let start = base.find("://").map_or(0, |i| i + 3);
    let base = base[start..].find('/').map_or(base, |slash| &base[..start + slash]);
    format!("{base}/{database}{query}")
}

/// Runs `body` against a scratch database created for it on the server at `admin_url`, then drops it.
pub(crate) async fn scratch_database<F, Fut>(admin_url: &str, tag: &str, body: F) -> anyhow::Result<()>
where
    F: FnOnce(String) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let name = format!("grains_bench_{tag}_{}", std::process::id());
    let mut admin = PgConnection::connect(admin_url).await?;
    let drop_sql = format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)");
    sqlx::query(sqlx::AssertSqlSafe(drop_sql.clone())).execute(&mut admin).await?;
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}"))).execute(&mut admin).await?;
    let result = body(with_database(admin_url, &name)).await;
    sqlx::query(sqlx::AssertSqlSafe(drop_sql)).execute(&mut admin).await?;
    result
}

/// Measures provider writes and reads at 1 and 32 concurrent grains, beside raw sqlx.
pub(crate) async fn run(admin_url: &str, window: Duration) -> anyhow::Result<()> {
    scratch_database(admin_url, "storage", |url: String| async move { run_on(&url, window).await }).await
}

async fn run_on(url: &str, window: Duration) -> anyhow::Result<()> {
    let options = PostgresOptions { pool_size: 32, ..PostgresOptions::default() };
    let pool = postgres::connect(url, &options).await?;
    postgres::migrate(&pool).await?;
    sqlx::query("CREATE TABLE bench_raw (id BIGINT PRIMARY KEY, document JSONB NOT NULL)").execute(&pool).await?;
    let store = Arc::new(PostgresStateStore::new(pool.clone()));
    let document = json!({"items": {"apple": 3, "bread": 1}, "owner": "bench"});

    header("Grain state in Postgres (provider vs raw sqlx)", "raw sqlx");
    for grains in [1usize, 32] {
        // Seed one record per grain for both sides, and keep each grain's current etag.
        let mut etags = Vec::new();
        for i in 0..grains {
            let key = StateKey::new("Bench", i.to_string(), "state");
            let etag = match store.read(&key).await? {
                Some(stored) => stored.etag,
                None => store.write(&key, &document, None).await?,
            };
            etags.push(Arc::new(Mutex::new(Some(etag))));
            sqlx::query("INSERT INTO bench_raw (id, document) VALUES ($1, $2) ON CONFLICT DO NOTHING")
                .bind(i as i64)
                .bind(&document)
                .execute(&pool)
                .await?;
        }
        let (s, d, e) = (store.clone(), document.clone(), etags.clone());
        let writes = measure(grains, window, move |w| {
            let (store, document, etag) = (s.clone(), d.clone(), e[w].clone());
            async move {
                let key = StateKey::new("Bench", w.to_string(), "state");
                let mut etag = etag.lock().await;
                *etag = Some(store.write(&key, &document, etag.as_deref()).await?);
                Ok(())
            }
        })
        .await?;
        let (p, d) = (pool.clone(), document.clone());
        let raw_writes = measure(grains, window, move |w| {
            let (pool, document) = (p.clone(), d.clone());
            async move {
                sqlx::query("UPDATE bench_raw SET document = $2 WHERE id = $1")
                    .bind(w as i64)
                    .bind(&document)
                    .execute(&pool)
                    .await?;
                Ok(())
            }
        })
        .await?;
        row("state write", grains, writes, raw_writes);

        let s = store.clone();
        let reads = measure(grains, window, move |w| {
            let store = s.clone();
            async move {
                store.read(&StateKey::new("Bench", w.to_string(), "state")).await?;
                Ok(())
            }
        })
        .await?;
        let p = pool.clone();
        let raw_reads = measure(grains, window, move |w| {
            let pool = p.clone();
            async move {
                let _: Option<(serde_json::Value,)> = sqlx::query_as("SELECT document FROM bench_raw WHERE id = $1")
                    .bind(w as i64)
                    .fetch_optional(&pool)
                    .await?;
                Ok(())
            }
        })
        .await?;
        row("state read", grains, reads, raw_reads);
    }
    pool.close().await;
    Ok(())
}
