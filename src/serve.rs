//! The composition root: build everything from a [`Config`], run it, drain it.
//!
//! Owns: the order of start-up (metrics, route table, upstream client,
//! listeners, readiness) and of shutdown (not ready, stop accepting, drain,
//! stop the admin listener), and what each OS signal does. Does not own any
//! of the pieces it wires together.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::admin::{self, Admin};
use crate::config::Config;
use crate::proxy::{Proxy, listener};
use crate::signals::{Signal, Signals};
use crate::table::{RouteTable, Table};
use crate::upstream::{self, Protocol};

/// Why the proxy could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot listen on {addr} ({what}): {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(
        "admin.addr {0} is not a loopback address, so the admin API needs a token: set admin.token_file or COHORT_ADMIN_TOKEN"
    )]
    AdminExposed(SocketAddr),
    #[error("{0} is not supported by this build yet")]
    Unsupported(&'static str),
    #[error("cannot register signal handlers: {0}")]
    Signals(std::io::Error),
}

/// A running proxy: its listeners' addresses and the handles to stop it.
#[derive(Debug)]
pub struct Server {
    proxy_addr: SocketAddr,
    admin_addr: SocketAddr,
    table: Arc<Table>,
    admin: Arc<Admin>,
    shutdown: watch::Sender<bool>,
    proxy_task: JoinHandle<()>,
    admin_task: JoinHandle<()>,
}

/// Binds the listeners and starts serving; returns once both accept connections.
pub async fn start(config: Config) -> Result<Server, ServeError> {
    if config.listen.tls.is_some() {
        return Err(ServeError::Unsupported("listen.tls"));
    }
    let mut versions = std::iter::once(&config.versions.stable)
        .chain(config.versions.canary.as_ref().map(|(v, _)| v));
    if versions.any(|v| v.upstreams.iter().any(|u| u.protocol != Protocol::Http1)) {
        return Err(ServeError::Unsupported("an https:// or h2c:// upstream"));
    }
    if !config.admin.addr.ip().is_loopback()
        && config.admin.token_file.is_none()
        && std::env::var_os("COHORT_ADMIN_TOKEN").is_none()
    {
        return Err(ServeError::AdminExposed(config.admin.addr));
    }

    let metrics = crate::metrics::install();
    let route_table = RouteTable::from_config(&config);
    crate::metrics::record_table(route_table.weight().percent(), route_table.generation);
    let table = Arc::new(Table::new(route_table));
    let proxy = Arc::new(Proxy::new(
        Arc::clone(&table),
        upstream::client(&config.upstream),
        config.upstream.response_timeout,
        config.listen.tls.is_some(),
    ));

    let proxy_listener = bind("listen.addr", config.listen.addr).await?;
    let admin_listener = bind("admin.addr", config.admin.addr).await?;
    let proxy_addr = local_addr(&proxy_listener, "listen.addr", config.listen.addr)?;
    let admin_addr = local_addr(&admin_listener, "admin.addr", config.admin.addr)?;

    let (shutdown, _) = watch::channel(false);
    let admin = Arc::new(Admin::new(metrics));
    let listen = config.listen.clone();
    let proxy_task = tokio::spawn({
        let stop = stopped(&shutdown);
        async move { listener::serve(proxy_listener, proxy, &listen, stop).await }
    });
    let admin_task = tokio::spawn(admin::serve(
        admin_listener,
        Arc::clone(&admin),
        stopped(&shutdown),
    ));
    admin.ready.store(true, Ordering::Release);
    Ok(Server {
        proxy_addr,
        admin_addr,
        table,
        admin,
        shutdown,
        proxy_task,
        admin_task,
    })
}

/// `cohort serve`: runs until SIGTERM or SIGINT, then drains and returns.
pub async fn run(config: Config) -> Result<(), ServeError> {
    let mut signals = Signals::register().map_err(ServeError::Signals)?;
    let server = start(config).await?;
    tracing::info!(proxy.addr = %server.proxy_addr(), admin.addr = %server.admin_addr(), "cohort is serving");
    loop {
        match signals.recv().await {
            Signal::Shutdown => break,
            other => tracing::warn!(signal = ?other, "signal not handled by this build"),
        }
    }
    tracing::info!("shutting down");
    server.shutdown().await;
    Ok(())
}

impl Server {
    #[must_use]
    pub fn proxy_addr(&self) -> SocketAddr {
        self.proxy_addr
    }

    #[must_use]
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    /// The live route table.
    #[must_use]
    pub fn table(&self) -> &Arc<Table> {
        &self.table
    }

    /// Stops accepting, lets open requests finish (up to `listen.drain_timeout`),
    /// then stops the admin listener.
    pub async fn shutdown(self) {
        self.admin.ready.store(false, Ordering::Release);
        self.shutdown.send_replace(true);
        if let Err(error) = self.proxy_task.await {
            tracing::error!(%error, "proxy listener task failed");
        }
        self.admin_task.abort();
    }
}

async fn bind(what: &'static str, addr: SocketAddr) -> Result<TcpListener, ServeError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| ServeError::Bind { what, addr, source })
}

fn local_addr(
    listener: &TcpListener,
    what: &'static str,
    addr: SocketAddr,
) -> Result<SocketAddr, ServeError> {
    listener
        .local_addr()
        .map_err(|source| ServeError::Bind { what, addr, source })
}

/// A future that resolves once `shutdown` flips to `true`.
fn stopped(shutdown: &watch::Sender<bool>) -> impl Future<Output = ()> + Send + 'static {
    let mut rx = shutdown.subscribe();
    async move {
        // An error means the sender is gone, which is a stop as well.
        let _ = rx.wait_for(|stop| *stop).await;
    }
}
