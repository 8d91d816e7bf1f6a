//! An example silo binary: hosts the example grains (`Hello`, `Cart`, `Catalog`, `ShoppingCart`, `Account`,
//! `Transfer`) and runs the `PopularItems` projection (a `popular_items` table with `--storage postgres`).
//!
//! A silo binary is `main` plus one call; every `#[grain]` type linked into the binary is hosted.
//! Try `cargo run -p grains-examples --bin grains-example-silo -- --help`.

use std::process::ExitCode;

/// With the `mimalloc` feature (the default), the silo runs on mimalloc: under glibc's malloc, buffers freed on
/// another worker thread than the one that allocated them make the threads contend for arena locks, which halves
/// remote-call throughput in some runs (see BENCHMARKS.md, "Cross-silo calls").
#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    grains_examples::link();
    grains_silo::cli::run_customized(grains_examples::silo_setup)
}
