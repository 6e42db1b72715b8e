//! The `listen.max_connections` slots, and closing an idle connection for
//! a client that waits for one.
//!
//! Owns:
//! - [`ConnectionSlots`]: the slots every listener of a set of workers
//!   shares, one held by each open connection.
//! - Asking the connection that has waited longest for a next request to
//!   close when a client waits and no slot is free, again every
//!   `RECLAIM_AGAIN`.
//! - Warning, at most every `RECLAIM_WARNING_EVERY`, that the proxy is
//!   full.
//!
//! Does not own: which connections answer the call, and how they close
//! (`listener`'s `Connection`).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures_util::FutureExt as _;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

/// How often a client waiting for a slot asks again for an idle
/// connection to be closed for it: a `Notify` keeps one request when no
/// connection is idle, so with several workers waiting one request may
/// stand for two, and the slot one request freed may go to another
/// worker's client.
pub(super) const RECLAIM_AGAIN: Duration = Duration::from_secs(1);

/// At most one warning per this long that the proxy is full and idle
/// connections are being closed for new clients, or cannot be (as
/// nginx's "worker_connections are not enough"); the rest are logged at
/// debug level.
const RECLAIM_WARNING_EVERY: Duration = Duration::from_secs(1);

/// The `listen.max_connections` slots that every listener of a set of
/// workers shares: each open connection holds one. When a client waits and
/// none is free, the connection that has waited longest for a next request
/// is closed to free one, as nginx reuses its idle keep-alive connections
/// when `worker_connections` run out; idle connections would otherwise
/// hold every slot for up to `listen.keepalive_timeout` while new clients
/// wait in the backlog.
#[derive(Debug)]
pub struct ConnectionSlots {
    permits: Arc<Semaphore>,
    /// Heard by the connections waiting for a next request (see
    /// `Connection::wait_for_request`, and HTTP/2 connections with no
    /// stream open, see `Connection::serve_h2`): tokio's `Notify` wakes
    /// the one that has waited longest.
    pub(super) reclaim: Notify,
    /// When the last warning that the proxy is full was logged.
    warned: Mutex<Option<Instant>>,
}

impl ConnectionSlots {
    #[must_use]
    pub fn new(max_connections: usize) -> ConnectionSlots {
        ConnectionSlots {
            permits: Arc::new(Semaphore::new(max_connections)),
            reclaim: Notify::new(),
            warned: Mutex::new(None),
        }
    }

    /// A slot for a connection just accepted. When none is free, the
    /// connection that has waited longest for a next request is closed
    /// for it (or, if none is idle, the next to become so), and the new
    /// one waits for its slot in hand, while the clients after it wait in
    /// the kernel's backlog: its worker accepts no more meanwhile.
    ///
    /// Taken after the accept, not before: a worker holding a slot while
    /// it waits to accept would keep that slot from the client another
    /// worker accepted.
    pub(super) async fn take(&self) -> OwnedSemaphorePermit {
        if let Ok(permit) = Arc::clone(&self.permits).try_acquire_owned() {
            return permit;
        }
        // One wait, so the client keeps its place in the semaphore's queue.
        let acquire = Arc::clone(&self.permits).acquire_owned();
        tokio::pin!(acquire);
        let permit = loop {
            self.reclaim.notify_one();
            tokio::select! {
                // A slot that came is taken, whatever else is due.
                biased;
                permit = &mut acquire => break permit.expect("the semaphore is never closed"),
                () = tokio::time::sleep(RECLAIM_AGAIN) => {
                    // Still none: what holds the slots cannot be closed
                    // for it (busy, tunnels), and the operator must hear
                    // that the proxy is full.
                    self.warn(
                        "listen.max_connections reached: a new client waits for a slot, and no idle connection can be closed for it",
                        None,
                    );
                }
            }
        };
        // A slot freed some other way first: no idle connection needs to
        // close for it after all.
        let _ = self.reclaim.notified().now_or_never();
        permit
    }

    /// Logs that the proxy is full (with the idle connection closed for
    /// a new client, if one is): a warning at most every
    /// [`RECLAIM_WARNING_EVERY`], the rest at debug level.
    pub(super) fn warn(&self, message: &str, closed: Option<SocketAddr>) {
        let now = Instant::now();
        let mut warned = self.warned.lock().unwrap_or_else(PoisonError::into_inner);
        if warned.is_none_or(|at| now.saturating_duration_since(at) >= RECLAIM_WARNING_EVERY) {
            *warned = Some(now);
            tracing::warn!(client.addr = ?closed, "{message}");
        } else {
            tracing::debug!(client.addr = ?closed, "{message}");
        }
    }
}
