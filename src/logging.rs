//! The process log: where `tracing`'s lines go.
//!
//! Owns: the subscriber (the default filter, colours only at a terminal)
//! and its writer, a thread of its own behind a queue of at most
//! [`QUEUED_LINES`] lines. A request or a shutdown that logs only queues
//! its line, so that a reader of stderr that stalls (a log driver that
//! falls behind, a pipe nobody drains) cannot stop either; once the queue
//! is full, lines are dropped and counted ([`dropped_lines`], exported as
//! `cohort_log_lines_dropped_total`), as Docker's `mode=non-blocking` does.
//! Does not own: what is logged, or the command line's own messages on
//! stdout and stderr, which [`finish`] keeps in order with the log.

use std::io::IsTerminal as _;
use std::sync::{Mutex, OnceLock, PoisonError};

use tracing_appender::non_blocking::{ErrorCounter, NonBlockingBuilder, WorkerGuard};
use tracing_subscriber::EnvFilter;

/// The most lines waiting for the writer: a few MiB, a burst of an
/// upstream's failures (a line each) at full load for a second or so.
pub const QUEUED_LINES: usize = 16_384;

/// The writer's guard, held until [`finish`], and its count of dropped lines.
static WRITER: OnceLock<(Mutex<Option<WorkerGuard>>, ErrorCounter)> = OnceLock::new();

/// Sends every `tracing` line of the process to stderr through the writer
/// thread. The access log is off unless `RUST_LOG` turns it on, e.g.
/// `RUST_LOG=info,cohort::proxy::access=info`. Once per process.
pub fn install() {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,cohort::proxy::access=off"));
    // Colours only for a person at a terminal: journald, `docker logs` and
    // log shippers get plain text (and `NO_COLOR` is honoured either way).
    let colour = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let (writer, guard) = NonBlockingBuilder::default()
        .lossy(true)
        .buffered_lines_limit(QUEUED_LINES)
        .thread_name("cohort-log")
        .finish(std::io::stderr());
    if WRITER
        .set((Mutex::new(Some(guard)), writer.error_counter()))
        .is_err()
    {
        return;
    }
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_ansi(colour)
        .init();
}

/// Writes out the lines still queued (waiting a second at most for a
/// stalled stderr), so that what the process prints next comes after
/// them. Lines logged afterwards are lost: called as the process ends.
pub fn finish() {
    if let Some((guard, _)) = WRITER.get() {
        drop(guard.lock().unwrap_or_else(PoisonError::into_inner).take());
    }
}

/// How many lines were dropped because the queue was full.
#[must_use]
pub fn dropped_lines() -> u64 {
    WRITER
        .get()
        .map_or(0, |(_, dropped)| dropped.dropped_lines() as u64)
}
