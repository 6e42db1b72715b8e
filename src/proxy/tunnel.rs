//! The byte tunnel of an upgraded connection (a WebSocket), from the `101` on.
//!
//! Owns: pairing the client's and the upstream's upgraded sockets and
//! piping bytes both ways, holding the version's in-flight gauge, and
//! ending at a close rollback. Does not own: agreeing to the upgrade
//! (`Proxy::handle`), or cutting a tunnel idle or unread (`listener`).

use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;

use super::body::InFlight;

/// The byte tunnel of an upgraded connection, from the `101` on.
///
/// Run by the client connection's task (see `listener`) once hyper has
/// sent the `101` and handed the socket over, so that the tunnel keeps the
/// connection's place in the listener's drain and in
/// `listen.max_connections`, as any other open connection does.
#[derive(Debug)]
pub struct Tunnel {
    client: OnUpgrade,
    upstream: OnUpgrade,
    /// The version's in-flight gauge, held until both sides are done.
    in_flight: InFlight,
}

impl Tunnel {
    #[must_use]
    pub fn new(client: OnUpgrade, upstream: OnUpgrade, in_flight: InFlight) -> Tunnel {
        Tunnel {
            client,
            upstream,
            in_flight,
        }
    }

    /// Pipes bytes both ways until either side closes, or until the
    /// version's streams are ordered closed (`on_rollback = "close"`).
    /// The listener that runs it cuts it when idle or unread.
    pub async fn run(self) {
        let Tunnel {
            client,
            upstream,
            in_flight,
        } = self;
        let (client, upstream) = match tokio::try_join!(client, upstream) {
            Ok(pair) => pair,
            Err(error) => {
                tracing::debug!(%error, "upgrade failed");
                return;
            }
        };
        let mut client = TokioIo::new(client);
        let mut upstream = TokioIo::new(upstream);
        tokio::select! {
            result = tokio::io::copy_bidirectional(&mut client, &mut upstream) => {
                if let Err(error) = result {
                    tracing::debug!(%error, "upgraded connection ended");
                }
            }
            () = in_flight.closed() => tracing::debug!("upgraded connection closed by rollback"),
        }
        drop(in_flight);
    }
}
