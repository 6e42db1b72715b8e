//! OS signals as typed events for the serve loop.
//!
//! Owns: the mapping of SIGTERM and SIGINT to [`Signal::Shutdown`] and
//! SIGHUP to [`Signal::Reload`], and SIGUSR1's own stream,
//! [`Rollbacks`], kept apart so that a rollback is never queued behind a
//! reload. Does not own what each one does (`serve`).

use tokio::signal::unix::{SignalKind, signal};

/// What an operator asked for by signal, in the serve loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// Stop accepting, drain, exit.
    Shutdown,
    /// Reload the config file.
    Reload,
}

/// The process's signal streams, registered once.
#[derive(Debug)]
pub struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

/// SIGUSR1, which asks for a rollback (source `signal`).
#[derive(Debug)]
pub struct Rollbacks(tokio::signal::unix::Signal);

impl Signals {
    /// Registers the handlers; from now on these signals no longer kill the
    /// process. SIGUSR1 comes as a stream of its own, for a task of its
    /// own: a reload may wait on the disk, and a rollback must not wait
    /// with it.
    pub fn register() -> std::io::Result<(Signals, Rollbacks)> {
        let signals = Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            hup: signal(SignalKind::hangup())?,
        };
        Ok((signals, Rollbacks(signal(SignalKind::user_defined1())?)))
    }

    /// The next signal received.
    pub async fn recv(&mut self) -> Signal {
        tokio::select! {
            _ = self.term.recv() => Signal::Shutdown,
            _ = self.int.recv() => Signal::Shutdown,
            _ = self.hup.recv() => Signal::Reload,
        }
    }
}

impl Rollbacks {
    /// Waits for the next SIGUSR1.
    pub async fn recv(&mut self) {
        // The stream ends only with the runtime.
        let _ = self.0.recv().await;
    }
}
