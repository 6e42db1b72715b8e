//! The composition root: build everything from a [`Config`], run it, drain it.
//!
//! Owns: the process's open-files limit (raised to the hard one), the
//! order of start-up (TLS, listeners, metrics, the audit log,
//! then the state and the route table, the workers, readiness: a start
//! that cannot read its files or bind its addresses changes nothing) and
//! of shutdown (not ready, stop accepting and, in the same step, ask the
//! rollout to save and stop, drain, stop the admin listener, a last try at
//! saving a state the disk refused), what each OS signal does (SIGUSR1 on
//! a task of its own, so that a reload waiting on the disk never holds up
//! a rollback), and the thread layout:
//! `listen.workers` proxy workers, each a thread with its own single-threaded
//! runtime, listening socket (`SO_REUSEPORT` on one address when there are
//! several), `Proxy` and upstream connection pools, so a request never
//! crosses threads (its shadow copy may: the shadow's pooled client is one
//! for all workers); the admin listener, health checks and the rollout
//! controller run on the caller's runtime. A reload that changes `[listen]`
//! or `[upstream]` starts a new generation of workers on the same sockets
//! (all of them, however many workers there are now) and drains the old
//! one. Does not own any of the pieces it wires together.

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

use crate::admin::{self, Access, Admin};
use crate::config::{Config, ConfigError, ListenConfig, Problem, UpstreamConfig};
use crate::control::{Control, ControlError, on_disk};
use crate::files::Pipes;
use crate::proxy::Proxy;
use crate::proxy::listener;
use crate::proxy::slots::ConnectionSlots;
use crate::rollout::controller::Rollouts;
use crate::rollout::plan;
use crate::rollout::webhook::Webhooks;
use crate::signals::{Rollbacks, Signal, Signals};
use crate::state::audit::{Actor, AuditLog};
use crate::state::file::FileStore;
use crate::state::{self, Source, StateError, StateStore as _};
use crate::table::{Policy, Table};
use crate::tls::{self, ServerTls, TlsError};
use crate::upstream;

/// How many tasks a proxy worker polls between two looks at its sockets and
/// timers (tokio's `event_interval`; its default is 61). A proxy's tasks
/// each poll for a few microseconds and are all woken by those events, so
/// looking less often only saves `epoll_wait` calls: at saturation this
/// took about 2% off the CPU time per request, with the same p99
/// (`BENCHMARKS.md`). Below saturation the run queue empties first, and the
/// worker looks then.
const WORKER_EVENT_INTERVAL: u32 = 1000;

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
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// `admin.token_file`, or `COHORT_ADMIN_TOKEN`, holds no usable token.
    #[error("{0}")]
    AdminToken(Problem),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("cannot register signal handlers: {0}")]
    Signals(std::io::Error),
    #[error("cannot start proxy worker {index}: {source}")]
    Worker {
        index: usize,
        source: std::io::Error,
    },
    #[error(transparent)]
    State(#[from] StateError),
    #[error(
        "exiting with the live state unsaved ({0}); the next start will serve the state the file holds, from before that change"
    )]
    Unsaved(ControlError),
    #[error("cannot open the audit log {path} (state.audit_log): {source}")]
    AuditLog {
        path: String,
        source: std::io::Error,
    },
}

/// How to start besides the config.
#[derive(Debug, Clone, Copy, Default)]
pub struct StartOptions {
    /// Re-seed the live state from the config instead of the state file.
    pub reset_state: bool,
}

/// A running proxy: its listeners' addresses and the handles to stop it.
#[derive(Debug)]
pub struct Server {
    proxy_addr: SocketAddr,
    admin_addr: SocketAddr,
    control: Arc<Control>,
    rollouts: Arc<Rollouts>,
    admin: Arc<Admin>,
    tls: Option<Arc<ServerTls>>,
    shutdown: watch::Sender<bool>,
    /// The running generation of proxy workers; a reload that changes
    /// `[listen]` or `[upstream]` starts a new one and drains this one.
    generation: WorkerGeneration,
    /// One per proxy worker thread of every generation; each resolves (or
    /// errs, if the thread died) once that worker has drained.
    workers: Vec<oneshot::Receiver<()>>,
    upstream_tls: Arc<rustls::ClientConfig>,
    admin_task: JoinHandle<()>,
    /// What a reload cannot change, as the server started with it.
    restart_only: RestartOnly,
}

/// The settings that take a restart: the admin listener's address, the
/// state paths, `listen.tls` (the certificate and key files themselves are
/// read again on SIGHUP) and `upstream.ca_file`.
#[derive(Debug, Clone, PartialEq)]
struct RestartOnly {
    admin_addr: SocketAddr,
    state_path: PathBuf,
    audit_log: PathBuf,
    tls: Option<(PathBuf, PathBuf, Vec<String>)>,
    ca_file: Option<PathBuf>,
}

impl RestartOnly {
    fn of(config: &Config) -> RestartOnly {
        RestartOnly {
            admin_addr: config.admin.addr,
            state_path: config.state.path.clone(),
            audit_log: config.state.audit_log.clone(),
            tls: config
                .listen
                .tls
                .as_ref()
                .map(|tls| (tls.cert.clone(), tls.key.clone(), tls.alpn.clone())),
            ca_file: config.upstream.ca_file.clone(),
        }
    }

    /// The config keys whose values differ between `self` and `other`.
    fn changed(&self, other: &RestartOnly) -> Vec<&'static str> {
        let mut keys = Vec::new();
        if self.admin_addr != other.admin_addr {
            keys.push("admin.addr");
        }
        if self.state_path != other.state_path {
            keys.push("state.path");
        }
        if self.audit_log != other.audit_log {
            keys.push("state.audit_log");
        }
        if self.tls != other.tls {
            keys.push("listen.tls");
        }
        if self.ca_file != other.ca_file {
            keys.push("upstream.ca_file");
        }
        keys
    }
}

/// A reload's new worker generation, its sockets bound but not yet serving.
#[derive(Debug)]
struct NextWorkers {
    config: Config,
    listeners: Vec<std::net::TcpListener>,
}

/// A set of proxy workers built from one `[listen]` and `[upstream]`.
#[derive(Debug)]
struct WorkerGeneration {
    listen: ListenConfig,
    upstream: UpstreamConfig,
    /// Duplicates of the workers' listening sockets, so that the next
    /// generation can take over the same sockets without a gap.
    listeners: Vec<std::net::TcpListener>,
    /// Tells this generation's workers to stop accepting and drain.
    stop: watch::Sender<bool>,
}

/// Binds the listeners, loads the state and starts serving; returns once
/// both accept connections.
pub async fn start(config: Config) -> Result<Server, ServeError> {
    start_with(config, StartOptions::default()).await
}

/// [`start`], with options.
pub async fn start_with(config: Config, options: StartOptions) -> Result<Server, ServeError> {
    let server_tls = config
        .listen
        .tls
        .as_ref()
        .map(ServerTls::load)
        .transpose()?
        .map(Arc::new);
    let upstream_tls = tls::client_config(config.upstream.ca_file.as_deref())?;
    let token = config.admin.token().map_err(ServeError::AdminToken)?;
    if token.is_none() && !config.admin.addr.ip().is_loopback() {
        return Err(ServeError::AdminExposed(config.admin.addr));
    }

    // Bound before the state is touched: a start that fails changes nothing
    // (a restart while the old process still holds a port must not rewrite
    // the state file under it). The admin address first: the proxy's may be
    // shared (`SO_REUSEPORT` with several workers), so a second process
    // would join it and take connections before failing on the admin one.
    let admin_listener = bind("admin.addr", config.admin.addr).await?;
    let proxy_listeners = bind_proxy(config.listen.addr, config.listen.workers)?;
    let proxy_addr = proxy_listeners[0]
        .local_addr()
        .map_err(|source| ServeError::Bind {
            what: "listen.addr",
            addr: config.listen.addr,
            source,
        })?;
    let admin_addr = admin_listener
        .local_addr()
        .map_err(|source| ServeError::Bind {
            what: "admin.addr",
            addr: config.admin.addr,
            source,
        })?;

    let metrics = crate::metrics::install();
    let (control, rollouts) = restore_control(&config, options, &upstream_tls)?;
    let (shutdown, _) = watch::channel(false);
    let admin = Arc::new(Admin::new(
        metrics,
        Arc::clone(&control),
        Arc::clone(&rollouts),
        Access {
            token,
            metrics_auth: config.admin.metrics_auth,
        },
    ));
    // The canary is gated until it passes a probe: probe it before the
    // first accept, so that a healthy one keeps its users through a
    // restart instead of lending them to stable for a moment.
    crate::health::probe_gated(control.table(), &config.health, &upstream_tls).await;
    let (generation, workers) = spawn_generation(
        proxy_listeners,
        &config,
        Arc::clone(control.table()),
        Arc::clone(&upstream_tls),
        server_tls.clone(),
        &shutdown,
    )?;
    tokio::spawn(crate::health::run_checks(
        Arc::clone(control.table()),
        Arc::clone(&upstream_tls),
        stopped(&shutdown),
    ));
    tokio::spawn(Arc::clone(&control).keep_saved(stopped(&shutdown)));
    let admin_task = tokio::spawn(admin::serve(admin_listener, Arc::clone(&admin)));
    admin.ready.store(true, Ordering::Release);
    Ok(Server {
        proxy_addr,
        admin_addr,
        control,
        rollouts,
        admin,
        tls: server_tls,
        shutdown,
        generation,
        workers,
        upstream_tls,
        admin_task,
        restart_only: RestartOnly::of(&config),
    })
}

/// Decides the live state (the state file's, or the config's; see
/// [`state::restore`]) and the control plane over it: the audit log, the
/// store, the config's shadow, and the rollout resumed or started.
fn restore_control(
    config: &Config,
    options: StartOptions,
    upstream_tls: &Arc<rustls::ClientConfig>,
) -> Result<(Arc<Control>, Arc<Rollouts>), ServeError> {
    // Before the state is touched: a start that cannot audit changes none.
    let audit =
        AuditLog::open(config.state.audit_log.clone()).map_err(|source| ServeError::AuditLog {
            path: config.state.audit_log.display().to_string(),
            source,
        })?;
    let store = FileStore::new(config.state.path.clone());
    store.check_writable()?;
    let unreadable = |message| StateError::Corrupt {
        path: config.state.path.display().to_string(),
        message,
    };
    // A saved rollout that cannot be resumed stops the start before the
    // state is written (a re-seed would carry it on).
    if !options.reset_state
        && let Some(saved) = store.load()?
    {
        crate::rollout::controller::check_saved(&saved.live).map_err(unreadable)?;
    }
    let (saved, origin, previous) = state::restore(
        &store,
        &config.versions,
        config.shadow.as_ref(),
        config.rollout.is_some(),
        options.reset_state,
    )?;
    let control = Arc::new(Control::new(
        saved,
        Arc::new(Policy::from_config(config)),
        Box::new(store),
        audit,
    ));
    control.record_start(origin, previous.as_ref().map(|p| &p.live));
    if let Err(error) = control.follow_config_shadow(config.shadow.as_ref(), Actor::Start) {
        tracing::error!(%error, "the config's [shadow] cannot be applied");
    }
    let rollouts = Rollouts::new(
        Arc::clone(&control),
        config.rollout.as_ref().map(plan::to_document),
        Webhooks::new(Arc::clone(upstream_tls)),
    );
    // A saved rollout carries on where it stopped; a canary fresh from the
    // config starts the config's plan, if any, as does one that a seed
    // installed just before the process stopped, before its plan started.
    let resumed = rollouts.resume().map_err(unreadable)?;
    if !resumed
        && config.rollout.is_some()
        && control.is_rollout_due()
        && let Err(error) = rollouts.start(None, Actor::Start)
    {
        tracing::error!(%error, "cannot start the configured rollout");
    }
    Ok((control, rollouts))
}

/// Raises the process's soft limit on open files to its hard limit, as Go
/// programs do at start and nginx's `worker_rlimit_nofile` is set for: the
/// usual soft default of 1024 would turn clients away with "Too many open
/// files" at about 500, each with a connection upstream, however high
/// `listen.max_connections` is. Warns when even the hard limit is short of
/// two descriptors per connection allowed and 64 for the rest (listeners,
/// files, health probes).
fn raise_open_files_limit(max_connections: usize) {
    // Asking for the most the hard limit allows; an unlimited hard limit
    // still caps it at the kernel's `nr_open` (2^20 by default).
    let limit = rlimit::increase_nofile_limit(u64::MAX)
        .or_else(|_| rlimit::increase_nofile_limit(1 << 20))
        .or_else(|_| rlimit::Resource::NOFILE.get().map(|(soft, _)| soft));
    let needed = 2 * max_connections as u64 + 64;
    match limit {
        Ok(limit) if limit < needed => tracing::warn!(
            open_files = limit,
            needed,
            listen.max_connections = max_connections,
            "the open files limit (ulimit -n, systemd's LimitNOFILE) is below what listen.max_connections needs \
             (two per connection, and 64 more); connections past it fail with \"Too many open files\""
        ),
        Ok(limit) => tracing::debug!(open_files = limit, "open files limit"),
        Err(error) => tracing::warn!(%error, "cannot read the open files limit"),
    }
}

/// `cohort serve`: runs until SIGTERM or SIGINT, then drains and returns
/// (at once on a second one). SIGUSR1 rolls back, during the drain too;
/// SIGHUP reloads the config at `path` and the TLS certificate.
pub async fn run(path: &Path, options: StartOptions) -> Result<(), ServeError> {
    // First of all, so that a signal sent while the process starts is
    // acted on once it serves rather than killing it (the default action).
    let (mut signals, rollbacks) = Signals::register().map_err(ServeError::Signals)?;
    let config = Config::load(path, Pipes::Refused)?;
    raise_open_files_limit(config.listen.max_connections);
    let mut server = start_with(config, options).await?;
    // Through the drain too: SIGUSR1 still rolls back meanwhile, and
    // `on_rollback = "close"` still cuts the canary's streams.
    let rolling_back = tokio::spawn(roll_back_on_each(rollbacks, Arc::clone(&server.control)));
    tracing::info!(proxy.addr = %server.proxy_addr(), admin.addr = %server.admin_addr(), "cohort is serving");
    loop {
        match signals.recv().await {
            Signal::Shutdown => break,
            // The certificate files are read again whether or not the config
            // changed, but not when the config was refused: one reload, one verdict.
            Signal::Reload => {
                if let Err(ReloadRefused(problems)) = reload_config(&mut server, path).await {
                    for problem in problems {
                        tracing::error!(
                            problem = problem.as_str(),
                            "config reload refused; the old one keeps running"
                        );
                    }
                    continue;
                }
                match server.reload_tls() {
                    Ok(true) => tracing::info!("TLS certificate reloaded"),
                    Ok(false) => {}
                    Err(error) => tracing::error!(
                        %error,
                        "TLS certificate reload refused; the old certificate keeps serving"
                    ),
                }
            }
        }
    }
    tracing::info!("shutting down");
    let control = Arc::clone(&server.control);
    let drained = server.shutdown();
    tokio::pin!(drained);
    // The drain may last as long as the longest stream: a second SIGTERM
    // or SIGINT stops waiting, as nginx's fast shutdown after a graceful
    // one.
    loop {
        tokio::select! {
            () = &mut drained => break,
            signal = signals.recv() => match signal {
                Signal::Reload => tracing::info!("SIGHUP ignored: shutting down"),
                Signal::Shutdown => {
                    tracing::warn!("stop signalled again: exiting without waiting for the drain");
                    break;
                }
            },
        }
    }
    // A rollback under way finishes first; none starts after.
    rolling_back.abort();
    let _ = rolling_back.await;
    // The next start reads the state file: a rollback it does not hold
    // would bring the canary back, so exiting without it is an error.
    control.save_before_exit().map_err(ServeError::Unsaved)
}

/// Rolls back at each SIGUSR1, for as long as the runtime runs: on a task
/// of its own, so that a reload waiting on the disk never holds it up.
pub(crate) async fn roll_back_on_each(mut rollbacks: Rollbacks, control: Arc<Control>) {
    loop {
        rollbacks.recv().await;
        rollback_on_signal(&control);
    }
}

/// What SIGUSR1 does: roll back, and say whether it did.
fn rollback_on_signal(control: &Control) {
    match on_disk(|| control.rollback_telling("SIGUSR1 received", Source::Signal)) {
        // Logged as every rollback is, with its source and reason.
        Ok((_, true)) => {}
        // No canary (a promotion may have come first), or one rolled back
        // already.
        Ok((state, false)) => match &state.canary {
            None => tracing::warn!(
                stable = %state.stable.name,
                "SIGUSR1: nothing to roll back: there is no canary"
            ),
            Some(canary) => tracing::info!(
                canary = %canary.name,
                "SIGUSR1: nothing to roll back: the canary is rolled back already"
            ),
        },
        Err(error) => tracing::error!(%error, "rollback by SIGUSR1 failed"),
    }
}

/// SIGHUP's config half: a config that fails to load or apply changes
/// nothing, and neither does one naming a file that cannot be read (the
/// token, the certificate and key, the CA). A new canary from the reloaded
/// config starts its `[rollout]` plan, as on a start.
async fn reload_config(server: &mut Server, path: &Path) -> Result<(), ReloadRefused> {
    let config = Config::load(path, Pipes::Refused)
        .map_err(|error| ReloadRefused(error.to_string().lines().map(str::to_owned).collect()))?;
    let problems = config.check_files();
    if !problems.is_empty() {
        return Err(ReloadRefused(
            problems.iter().map(ToString::to_string).collect(),
        ));
    }
    // Read again for use: a token file that went away since the check
    // refuses the reload, rather than turning auth off.
    let token = config.admin.token().map_err(ReloadRefused::one)?;
    let access = Access {
        token,
        metrics_auth: config.admin.metrics_auth,
    };
    if access.token.is_none() && !server.admin_addr.ip().is_loopback() {
        // The environment was read at start: only the file can bring one now.
        return Err(ReloadRefused::one(format!(
            "admin.token_file: the admin listener {} is not on loopback, so the admin API needs a token: set admin.token_file",
            server.admin_addr
        )));
    }
    // Before anything is applied: a new `listen.addr` that cannot be bound
    // refuses the whole reload.
    let next_workers = server
        .prepare_workers(&config)
        .map_err(ReloadRefused::one)?;
    let reloaded = on_disk(|| server.control.reload(&config)).map_err(ReloadRefused::one)?;
    let plan = config.rollout.as_ref().map(plan::to_document);
    let start_plan = plan.is_some() && reloaded.new_canary;
    server.rollouts.set_default_plan(plan);
    server.admin.set_access(access);
    for key in server.restart_only.changed(&RestartOnly::of(&config)) {
        tracing::warn!(key, "changed in the config, but applied only on a restart");
    }
    if start_plan {
        // In the background: the signal loop must stay free for a
        // SIGUSR1 rollback while the replaced rollout records its end.
        let rollouts = Arc::clone(&server.rollouts);
        tokio::spawn(async move {
            if let Err(error) = rollouts.start_configured().await {
                tracing::error!(%error, "cannot start the configured rollout");
            }
        });
    }
    match next_workers.map(|next| server.start_workers(next)) {
        Some(Ok(())) => tracing::info!(
            proxy.addr = %server.proxy_addr(),
            "proxy workers restarted with the reloaded [listen] and [upstream]; the previous ones drain"
        ),
        None => {}
        Some(Err(error)) => tracing::error!(
            %error,
            "the reloaded [listen] or [upstream] cannot be applied; the running workers keep serving"
        ),
    }
    Ok(())
}

/// Why a SIGHUP changed nothing: each problem on a line of its own.
struct ReloadRefused(Vec<String>);

impl ReloadRefused {
    fn one(problem: impl std::fmt::Display) -> ReloadRefused {
        ReloadRefused(vec![problem.to_string()])
    }
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
        self.control.table()
    }

    /// The control plane, for changes made in-process.
    #[must_use]
    pub fn control(&self) -> &Arc<Control> {
        &self.control
    }

    /// Reads the listener's certificate and key files again (what SIGHUP
    /// does): new connections get the new pair, open ones keep theirs. A bad
    /// pair changes nothing and the error names the file. `Ok(false)` when
    /// the listener has no TLS.
    pub fn reload_tls(&self) -> Result<bool, TlsError> {
        match &self.tls {
            Some(tls) => tls.reload().map(|()| true),
            None => Ok(false),
        }
    }

    /// Applies a reloaded `[listen]` and `[upstream]`: when they differ from
    /// the running workers', starts a new generation of workers on the same
    /// listening sockets (or on new ones, when `listen.addr` changed), then
    /// tells the old generation to stop accepting and drain, so no connection
    /// is dropped and no accept is missed. Returns whether it did. TLS files
    /// and admin settings are not part of it, nor `upstream.response_timeout`
    /// (the route table's, applied at once) or `upstream.ca_file` (a
    /// restart's): neither is worth cutting long streams at the drain.
    pub fn reload_workers(&mut self, config: &Config) -> Result<bool, ServeError> {
        let Some(next) = self.prepare_workers(config)? else {
            return Ok(false);
        };
        self.start_workers(next)?;
        Ok(true)
    }

    /// The first half of [`Server::reload_workers`], which can fail for
    /// want of an address: `None` when the running workers serve `config`
    /// as they are, else the sockets a new generation would take. A reload
    /// binds before it changes anything, so that it is applied or refused
    /// whole.
    fn prepare_workers(&self, config: &Config) -> Result<Option<NextWorkers>, ServeError> {
        let current = &self.generation;
        // `listen.tls` takes a restart: the workers keep the running one,
        // and a file edited for that restart must not make every SIGHUP
        // till then start new workers.
        let mut config = config.clone();
        config.listen.tls.clone_from(&current.listen.tls);
        let pools = |u: &UpstreamConfig| (u.connect_timeout, u.idle_timeout, u.max_idle_per_host);
        if config.listen == current.listen && pools(&config.upstream) == pools(&current.upstream) {
            return Ok(None);
        }
        let listeners = if config.listen.addr == current.listen.addr {
            // Every socket goes on, however many workers there are now.
            current
                .listeners
                .iter()
                .map(std::net::TcpListener::try_clone)
                .collect::<std::io::Result<Vec<_>>>()
                .map_err(|source| ServeError::Bind {
                    what: "listen.addr",
                    addr: self.proxy_addr,
                    source,
                })?
        } else {
            bind_proxy(config.listen.addr, config.listen.workers)?
        };
        Ok(Some(NextWorkers { config, listeners }))
    }

    /// The second half of [`Server::reload_workers`]: the new generation
    /// starts and the old one drains.
    fn start_workers(&mut self, next: NextWorkers) -> Result<(), ServeError> {
        let (generation, workers) = spawn_generation(
            next.listeners,
            &next.config,
            Arc::clone(self.control.table()),
            Arc::clone(&self.upstream_tls),
            self.tls.clone(),
            &self.shutdown,
        )?;
        if let Some(listener) = generation.listeners.first()
            && let Ok(addr) = listener.local_addr()
        {
            self.proxy_addr = addr;
        }
        let previous = std::mem::replace(&mut self.generation, generation);
        previous.stop.send_replace(true);
        self.workers.extend(workers);
        Ok(())
    }

    /// Saves a running rollout's progress with the time spent in its stage
    /// and stops it (the next start resumes it), stops accepting, lets open
    /// requests finish (up to `listen.drain_timeout`), then stops the admin
    /// listener, which answers through the drain (`/ready` with 503).
    pub async fn shutdown(self) {
        // Before the proxy says it is not ready: no rollout starts in a
        // drain, which nothing would suspend.
        self.rollouts.shutting_down();
        self.admin.ready.store(false, Ordering::Release);
        self.shutdown.send_replace(true);
        // Asked at once (the command is sent before the first await), and
        // waited for: a rollout judging through the drain would count stage
        // time and judge a window that no longer fills, and might even
        // promote. The drain does not wait for it.
        self.rollouts.suspend().await;
        // The kept duplicates would hold the listening sockets open (and
        // the kernel would go on queueing connections) after the workers stop.
        drop(self.generation);
        for (index, done) in self.workers.into_iter().enumerate() {
            if done.await.is_err() {
                tracing::error!(worker = index, "proxy worker ended without draining");
            }
        }
        self.admin_task.abort();
    }
}

async fn bind(what: &'static str, addr: SocketAddr) -> Result<TcpListener, ServeError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| ServeError::Bind { what, addr, source })
}

/// The proxy's listening sockets, one per worker, all on `addr`: the first
/// is bound as configured (port 0 picks a port), the rest to its address.
/// With more than one, each carries `SO_REUSEPORT` and the kernel spreads
/// new connections over them; a single listener does not set it, so it can
/// never silently share its port with a leftover process.
fn bind_proxy(addr: SocketAddr, workers: usize) -> Result<Vec<std::net::TcpListener>, ServeError> {
    let error = |source| ServeError::Bind {
        what: "listen.addr",
        addr,
        source,
    };
    let reuse_port = workers > 1;
    let first = bind_one(addr, reuse_port).map_err(error)?;
    let bound = first.local_addr().map_err(error)?;
    let mut listeners = vec![first];
    for _ in 1..workers {
        listeners.push(bind_one(bound, reuse_port).map_err(error)?);
    }
    Ok(listeners)
}

/// Binds one listening socket with the options `TcpListener::bind` uses
/// (`SO_REUSEADDR`, a backlog of 1024), detached from the current runtime so
/// that a worker can register it with its own.
fn bind_one(addr: SocketAddr, reuse_port: bool) -> std::io::Result<std::net::TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    if reuse_port {
        socket.set_reuseport(true)?;
    }
    socket.bind(addr)?;
    socket.listen(1024)?.into_std()
}

/// Starts `config.listen.workers` proxy workers on `sockets`, built from
/// `config`'s `[listen]` and `[upstream]`; they stop on `shutdown` or on the
/// generation's own stop. Each worker has a socket of its own while there
/// are enough (workers added by a reload share one); with more sockets than
/// workers (fewer workers after a reload), a worker serves several, so no
/// socket closes with connections queued on it.
fn spawn_generation(
    sockets: Vec<std::net::TcpListener>,
    config: &Config,
    table: Arc<Table>,
    upstream_tls: Arc<rustls::ClientConfig>,
    server_tls: Option<Arc<ServerTls>>,
    shutdown: &watch::Sender<bool>,
) -> Result<(WorkerGeneration, Vec<oneshot::Receiver<()>>), ServeError> {
    let (stop, _) = watch::channel(false);
    let shared = Arc::new(WorkerShared {
        table,
        listen: config.listen.clone(),
        upstream: config.upstream.clone(),
        upstream_tls,
        server_tls,
        slots: Arc::new(ConnectionSlots::new(config.listen.max_connections)),
    });
    let count = config.listen.workers.max(1);
    let mut workers = Vec::with_capacity(count);
    for index in 0..count {
        let error = |source| ServeError::Worker { index, source };
        // Every `count`-th socket from its own index on; a worker past the
        // last socket shares one.
        let own: Vec<usize> = if index < sockets.len() {
            (index..sockets.len()).step_by(count).collect()
        } else {
            vec![index % sockets.len()]
        };
        let own = own
            .into_iter()
            .map(|socket| sockets[socket].try_clone())
            .collect::<std::io::Result<Vec<_>>>()
            .map_err(error)?;
        let (global, own_stop) = (stopped(shutdown), stopped(&stop));
        let either = async move {
            tokio::select! {
                () = global => {}
                () = own_stop => {}
            }
        };
        workers.push(spawn_worker(index, own, Arc::clone(&shared), either).map_err(error)?);
    }
    let generation = WorkerGeneration {
        listen: config.listen.clone(),
        upstream: config.upstream.clone(),
        listeners: sockets,
        stop,
    };
    Ok((generation, workers))
}

/// What every proxy worker builds its own `Proxy` from.
struct WorkerShared {
    table: Arc<Table>,
    listen: crate::config::ListenConfig,
    upstream: crate::config::UpstreamConfig,
    upstream_tls: Arc<rustls::ClientConfig>,
    server_tls: Option<Arc<ServerTls>>,
    slots: Arc<ConnectionSlots>,
}

/// Starts proxy worker `index`: a thread running a single-threaded runtime
/// that serves `listeners` with its own `Proxy` and upstream pools until
/// `stop`, then drains. The receiver resolves once it has drained.
fn spawn_worker(
    index: usize,
    listeners: Vec<std::net::TcpListener>,
    shared: Arc<WorkerShared>,
    stop: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<oneshot::Receiver<()>> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .event_interval(WORKER_EVENT_INTERVAL)
        .enable_all()
        .build()?;
    let (done, drained) = oneshot::channel();
    std::thread::Builder::new()
        .name(format!("cohort-proxy-{index}"))
        .spawn(move || {
            runtime.block_on(async move {
                let listeners = match listeners
                    .into_iter()
                    .map(TcpListener::from_std)
                    .collect::<std::io::Result<Vec<_>>>()
                {
                    Ok(listeners) => listeners,
                    Err(error) => {
                        tracing::error!(worker = index, %error, "cannot register the listener");
                        return;
                    }
                };
                let proxy = Arc::new(Proxy::new(
                    Arc::clone(&shared.table),
                    upstream::client(&shared.upstream, Arc::clone(&shared.upstream_tls)),
                    shared.server_tls.is_some(),
                ));
                listener::serve(
                    listeners,
                    proxy,
                    &shared.listen,
                    shared.server_tls.clone(),
                    Arc::clone(&shared.slots),
                    stop,
                )
                .await;
            });
            // Whatever outlived the drain timeout (requests, streams, tunnels)
            // and idle upstream connections end with the runtime.
            drop(runtime);
            let _ = done.send(());
        })?;
    Ok(drained)
}

/// A future that resolves once `shutdown` flips to `true`.
fn stopped(shutdown: &watch::Sender<bool>) -> impl Future<Output = ()> + Send + 'static {
    let mut rx = shutdown.subscribe();
    async move {
        // An error means the sender is gone, which is a stop as well.
        let _ = rx.wait_for(|stop| *stop).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reload_names_each_restart_only_key_it_changes() {
        let config = |audit_log: &str| {
            let text = format!(
                "[versions.stable]\nname = \"v1\"\nupstreams = [\"127.0.0.1:9001\"]\n\
                 [state]\naudit_log = \"{audit_log}\"\n"
            );
            RestartOnly::of(&Config::parse(&text, "test").expect("a valid config"))
        };
        let running = config("a.jsonl");
        assert_eq!(running.changed(&config("a.jsonl")), Vec::<&str>::new());
        assert_eq!(running.changed(&config("b.jsonl")), ["state.audit_log"]);
    }
}
