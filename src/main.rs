//! The `cohort` binary: parse the command line, set up logging, run.

use std::process::ExitCode;

use clap::Parser as _;
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    // The access log is off unless RUST_LOG turns it on,
    // e.g. RUST_LOG=info,cohort::proxy::access=info.
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,cohort::proxy::access=off"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    cohort::cli::run(cohort::cli::Cli::parse())
}
