//! Grains benchmarks, each printed beside a baseline measured in the same run, with the ratio.
//!
//! `cargo run --release -p grains-examples --bin bench -- [--quick] [--only SECTION]...`
//!
//! Sections: `local` (warm grain call in one silo vs a tokio mpsc + oneshot loop), `remote` (client → silo and
//! silo → silo vs raw tonic unary and raw TCP echo), `activations` (activation rate, memory per activation,
//! passivation rate vs a task + channel per entity), `storage` (grain state through the Postgres provider vs
//! raw sqlx), `cart` (stateful Grains cart vs a stateless read-modify-write handler on Postgres) and `journal`
//! (event-sourced recovery of 10,000 events with and without snapshots; group-committed journal appends vs raw
//! `INSERT`s). Postgres comes from
//! `DATABASE_URL` (default `postgres://postgres@127.0.0.1:5432/postgres`); the bench creates and drops a
//! scratch database of its own. Timings are printed, never asserted.

use std::time::Duration;

use clap::Parser;
mod activations;
mod cart;
mod harness;
mod journal;
mod local;
mod remote;
mod storage;

use harness::Section;

/// With the `mimalloc` feature (the default), the bench runs on the allocator a silo binary should pick (README,
/// "Benchmarks"); with `--no-default-features`, on the system's. The baselines share the bench's allocator.
#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
#[command(about = "Grains benchmarks with in-run baselines")]
struct Args {
    /// Short runs (a smoke test: finishes in well under a minute).
    #[arg(long)]
    quick: bool,
    /// Run only these sections (default: all).
    #[arg(long, value_enum)]
    only: Vec<Section>,
    /// Postgres admin URL for the storage section.
    #[arg(long, env = "DATABASE_URL", default_value = "postgres://postgres@127.0.0.1:5432/postgres")]
    database_url: String,
    /// Internal: run only the activations baseline for this many entities and print its figures (the
    /// activations section runs it in a child process, on a heap of its own).
    #[arg(long, hide = true)]
    activations_baseline: Option<usize>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Some(count) = args.activations_baseline {
        activations::baseline(count).await;
        return Ok(());
    }
    // As a silo binary does (`grains_silo::cli`): a subscriber is installed, so disabled spans cost what they
    // cost in production. Without one, `tracing`'s `log` fallback (which sqlx turns on) handles every span.
    grains_silo::cli::init_logging(&std::env::var("GRAINS_LOG").unwrap_or_else(|_| "warn".to_owned()));
    let window = if args.quick { Duration::from_millis(300) } else { Duration::from_secs(3) };
    let wants = |s: Section| args.only.is_empty() || args.only.contains(&s);
    println!(
        "# Grains benchmarks ({} mode, {} ms per measurement)",
        if args.quick { "quick" } else { "full" },
        window.as_millis()
    );
    println!("# machine: {} cores", std::thread::available_parallelism().map_or(0, |n| n.get()));
    if wants(Section::Local) {
        local::run(window).await?;
    }
    if wants(Section::Remote) {
        remote::run(window, if args.quick { 20 } else { 200 }).await?;
    }
    if wants(Section::Activations) {
        activations::run(if args.quick { 20_000 } else { 1_000_000 }).await?;
    }
    if wants(Section::Storage) {
        storage::run(&args.database_url, window).await?;
    }
    if wants(Section::Cart) {
        cart::run(&args.database_url, window).await?;
    }
    if wants(Section::Journal) {
        journal::run(&args.database_url, window, args.quick).await?;
    }
    Ok(())
}
