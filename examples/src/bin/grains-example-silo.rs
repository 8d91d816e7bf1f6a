//! An example silo binary: hosts the example grains (`Hello`, `Cart`, `Catalog`).
//!
//! A silo binary is `main` plus one call; every `#[grain]` type linked into the binary is hosted.
//! Try `cargo run -p grains-examples --bin grains-example-silo -- --help`.

use std::process::ExitCode;

fn main() -> ExitCode {
    grains_examples::link();
    grains_silo::cli::run()
}
