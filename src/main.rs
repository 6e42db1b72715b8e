//! The `cohort` binary: parse the command line, set up logging, run.

use std::process::ExitCode;

use clap::Parser as _;
use tracing_subscriber::EnvFilter;

/// jemalloc rather than the system allocator: it keeps long-lived small
/// allocations apart from short-lived buffers and its background thread
/// returns freed pages to the kernel, so memory freed by idle connections
/// leaves the resident set (glibc's malloc kept it; see BENCHMARKS.md).
#[cfg(not(target_env = "msvc"))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

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
