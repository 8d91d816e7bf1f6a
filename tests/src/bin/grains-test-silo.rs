//! A silo binary hosting the test grains, for tests that run silos as separate processes.
//!
//! `GRAINS_TEST_PROJECTION=<name>` also runs the test projection `AppliedLog` (see `grains_tests::es`).

use std::process::ExitCode;

fn main() -> ExitCode {
    grains_tests::link();
    grains_silo::cli::run_customized(grains_tests::es::test_silo_setup)
}
