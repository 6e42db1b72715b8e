//! The `cohort` binary: parse the command line, set up logging, run.

// The one exception, jemalloc's options below, says why it is sound.
#![deny(unsafe_code)]

use std::process::ExitCode;

use clap::Parser as _;

/// jemalloc rather than the system allocator: it keeps long-lived small
/// allocations apart from short-lived buffers and its background thread
/// returns freed pages to the kernel, so memory freed by idle connections
/// leaves the resident set (glibc's malloc kept it; see BENCHMARKS.md).
#[cfg(not(target_env = "msvc"))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options, read once as it starts, before `main`.
///
/// `tcache_nslots_small_min:128`: each thread keeps up to 128 freed blocks
/// of every small size for its next allocations (by default as few as 20 of
/// the larger sizes). hyper takes a fresh 8 KiB read buffer for each
/// exchange, on both sides, while the last one's bytes are still on their
/// way; with 20 slots, bursts of requests sent those buffers through
/// jemalloc's arena and page allocator every time, which cost about 3% of
/// the CPU per request at saturation. The idle memory per connection is
/// unchanged (`BENCHMARKS.md`).
/// `_RJEM_MALLOC_CONF` in the environment still overrides it.
//
// SAFETY: jemalloc (its symbols prefixed `_rjem_` by tikv-jemalloc-sys)
// declares `const char *malloc_conf` as a weak symbol, so this definition is
// the one it reads; nothing else in the program defines it. It reads it once,
// while initialising, as a NUL-terminated string. A `&'static [u8; N]` has
// the representation of a non-null `const char *`, and these bytes are
// immutable, live as long as the program and end in a NUL.
#[cfg(not(target_env = "msvc"))]
#[allow(unsafe_code)]
#[unsafe(export_name = "_rjem_malloc_conf")]
static JEMALLOC_OPTIONS: &[u8; 28] = b"tcache_nslots_small_min:128\0";

fn main() -> ExitCode {
    cohort::logging::install();
    let code = cohort::cli::run(cohort::cli::Cli::parse());
    cohort::logging::finish();
    code
}
