//! OS signals as typed events for the serve loop.
//!
//! Owns: the mapping of SIGTERM and SIGINT to [`Signal::Shutdown`], SIGUSR1
//! to [`Signal::Rollback`] and SIGHUP to [`Signal::Reload`]. Does not own
//! what each one does (`serve`).

use tokio::signal::unix::{SignalKind, signal};

/// What an operator asked for by signal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// Stop accepting, drain, exit.
    Shutdown,
    /// Roll the canary back (source `signal`).
    Rollback,
    /// Reload the config file.
    Reload,
}

/// The process's signal streams, registered once.
#[derive(Debug)]
pub struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    usr1: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    /// Registers the handlers; from now on these signals no longer kill the process.
    pub fn register() -> std::io::Result<Signals> {
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            usr1: signal(SignalKind::user_defined1())?,
            hup: signal(SignalKind::hangup())?,
        })
    }

    /// The next signal received.
    pub async fn recv(&mut self) -> Signal {
        tokio::select! {
            _ = self.term.recv() => Signal::Shutdown,
            _ = self.int.recv() => Signal::Shutdown,
            _ = self.usr1.recv() => Signal::Rollback,
            _ = self.hup.recv() => Signal::Reload,
        }
    }
}
