//! The process log: where `tracing`'s lines go.
//!
//! Owns: the subscriber (the default filter, colours only at a terminal)
//! and its writer, a thread of its own behind a queue of at most
//! [`QUEUED_LINES`] lines. A request or a shutdown that logs only queues
//! its line, so that a reader of stderr that stalls (a log driver that
//! falls behind, a pipe nobody drains) cannot stop either; once the queue
//! is full, lines are dropped and counted ([`dropped_lines`], exported as
//! `cohort_log_lines_dropped_total`), as Docker's `mode=non-blocking` does.
//! `tracing-appender` has such a writer, but on exit with a full queue
//! (which is when stderr has stalled) its guard prints to stdout, and can
//! block there; this one writes only to stderr, from its thread, and an
//! exit waits for it a bounded time.
//! Does not own: what is logged, or the command line's output on stdout.

use std::io::{IsTerminal as _, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tracing_subscriber::EnvFilter;

/// The most lines waiting for the writer: a few MiB, a burst of an
/// upstream's failures (a line each) at full load for a second or so.
pub const QUEUED_LINES: usize = 16_384;

/// How long [`finish`] waits for the lines queued before it to be written.
const FINISH_WAIT: Duration = Duration::from_secs(1);

/// The writer's end of the queue, once [`install`] has made it.
static QUEUE: OnceLock<Queue> = OnceLock::new();

/// What the writer thread is sent.
enum Message {
    Line(Vec<u8>),
    /// Answered once every line queued before it is written.
    Written(SyncSender<()>),
}

/// The `io::Write` that `tracing` formats each line into: one write per
/// line, queued whole or dropped whole.
#[derive(Clone)]
struct Queue {
    sender: SyncSender<Message>,
    dropped: Arc<AtomicU64>,
}

impl Queue {
    fn send(&self, line: &[u8]) {
        if self.sender.try_send(Message::Line(line.to_vec())).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl Write for Queue {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.send(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Sends every `tracing` line of the process to stderr through the writer
/// thread. The access log is off unless `RUST_LOG` turns it on, e.g.
/// `RUST_LOG=info,cohort::proxy::access=info`. Once per process.
pub fn install() {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,cohort::proxy::access=off"));
    // Colours only for a person at a terminal: journald, `docker logs` and
    // log shippers get plain text (and `NO_COLOR` is honoured either way).
    let colour = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let subscriber = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(colour);
    let (sender, queued) = sync_channel(QUEUED_LINES);
    let writer = std::thread::Builder::new()
        .name("cohort-log".into())
        .spawn(move || write_out(&queued));
    let queue = Queue {
        sender,
        dropped: Arc::default(),
    };
    match writer {
        Ok(_) if QUEUE.set(queue.clone()).is_ok() => {
            subscriber.with_writer(move || queue.clone()).init();
        }
        Ok(_) => {}
        // Written where it is logged, then, as with no queue at all.
        Err(error) => {
            subscriber.with_writer(std::io::stderr).init();
            tracing::warn!(%error, "cannot start the log's writer thread");
        }
    }
}

/// The writer thread: every line to stderr, in order, until the process ends.
fn write_out(queued: &Receiver<Message>) {
    for message in queued {
        match message {
            // Nowhere to say that stderr refused a line.
            Message::Line(line) => drop(std::io::stderr().write_all(&line)),
            Message::Written(written) => drop(written.send(())),
        }
    }
}

/// Waits, for a second at most, until the lines logged so far (and the
/// [`last_words`]) are written: a stalled stderr may take none. Called as
/// the process ends.
pub fn finish() {
    let Some(queue) = QUEUE.get() else {
        return;
    };
    let (written, done) = sync_channel(1);
    if queue.sender.try_send(Message::Written(written)).is_ok() {
        let _ = done.recv_timeout(FINISH_WAIT);
    }
}

/// The process's last words on stderr (`cohort: <why it failed>`): after the
/// log's lines and, like them, written by its thread, which [`finish`]
/// waits for.
pub fn last_words(message: &str) {
    match QUEUE.get() {
        Some(queue) => queue.send(format!("{message}\n").as_bytes()),
        None => eprintln!("{message}"),
    }
}

/// How many lines were dropped because the queue was full.
#[must_use]
pub fn dropped_lines() -> u64 {
    QUEUE
        .get()
        .map_or(0, |queue| queue.dropped.load(Ordering::Relaxed))
}
