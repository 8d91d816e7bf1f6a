//! A silo binary hosting the test grains, for tests that run silos as separate processes.

use std::process::ExitCode;

fn main() -> ExitCode {
    grains_tests::link();
    grains_silo::cli::run()
}
