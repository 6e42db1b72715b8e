//! `cohort demo`: two built-in upstreams and the proxy in front of them.
//!
//! Owns: the demo upstreams (they answer with their version's name, report a
//! token count, and stream server-sent events at `/events`) and the demo's
//! start-up on the embedded `config/cohort.toml`. Does not own the proxy.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::stream;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt as _, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::config::{Config, ConfigError};
use crate::serve::ServeError;
use crate::signals::{Signal, Signals};

/// The config the demo runs on: the commented example shipped in `config/`.
pub const CONFIG: &str = include_str!("../config/cohort.toml");

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("the built-in config is invalid: {0}")]
    Config(#[from] ConfigError),
    #[error("cannot start the demo upstream on {addr}: {source}")]
    Upstream {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Serve(#[from] ServeError),
    #[error("cannot create the demo's state directory: {0}")]
    StateDir(std::io::Error),
}

/// Runs the demo until Ctrl-C.
pub async fn run() -> Result<(), DemoError> {
    let mut config = Config::parse(CONFIG, "config/cohort.toml (built in)")?;
    // Keep the demo's state out of the working directory.
    let state_dir = fresh_state_dir().map_err(DemoError::StateDir)?;
    config.state.path = state_dir.join("state.json");
    config.state.audit_log = state_dir.join("audit.jsonl");
    // The demo shows the override header, which the example leaves off:
    // any client could send it.
    config.routing.override_header = Some(http::HeaderName::from_static("x-cohort"));
    let result = run_with(config).await;
    // Nothing of the demo outlives it, whether it ran or failed to start.
    let _ = std::fs::remove_dir_all(&state_dir);
    result
}

/// A new directory of the demo's own, readable by its user alone: the
/// demo starts afresh every time, never on a state a run before left
/// behind (after a `kill -9`) or someone else put in its way.
fn fresh_state_dir() -> std::io::Result<std::path::PathBuf> {
    use std::os::unix::fs::DirBuilderExt as _;
    let mut builder = std::fs::DirBuilder::new();
    builder.mode(0o700);
    loop {
        let name = format!(
            "cohort-demo-{}-{:08x}",
            std::process::id(),
            rand::random::<u32>()
        );
        let dir = std::env::temp_dir().join(name);
        match builder.create(&dir) {
            Ok(()) => return Ok(dir),
            Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(error) => return Err(error),
        }
    }
}

/// Starts the demo upstreams and the proxy from `config`, and runs them until Ctrl-C.
async fn run_with(config: Config) -> Result<(), DemoError> {
    let mut versions = vec![(config.versions.stable.clone(), 100)];
    versions.extend(
        config
            .versions
            .canary
            .as_ref()
            .map(|(v, _)| (v.clone(), 120)),
    );
    for (version, tokens) in versions {
        for upstream in &version.upstreams {
            let addr: SocketAddr =
                upstream
                    .authority
                    .as_str()
                    .parse()
                    .map_err(|_| DemoError::Upstream {
                        addr: SocketAddr::from(([127, 0, 0, 1], 0)),
                        source: std::io::Error::other("demo upstreams must be IP:port"),
                    })?;
            let listener = TcpListener::bind(addr)
                .await
                .map_err(|source| DemoError::Upstream { addr, source })?;
            tokio::spawn(serve_upstream(listener, version.name.clone(), tokens));
        }
    }

    let (mut signals, rollbacks) = Signals::register().map_err(ServeError::Signals)?;
    let server = crate::serve::start(config.clone()).await?;
    let rolling_back = tokio::spawn(crate::serve::roll_back_on_each(
        rollbacks,
        Arc::clone(server.control()),
    ));
    let proxy = server.proxy_addr();
    let admin = server.admin_addr();
    println!(
        "Cohort demo: stable {stable} and canary {canary} ({weight}% of users) behind http://{proxy}

Try:
  curl -si http://{proxy}/ -H 'x-user-id: alice'        # the same user always gets the same version
  for u in $(seq 1 20); do curl -s http://{proxy}/ -H \"x-user-id: user-$u\"; done
  curl -si http://{proxy}/                               # no key: a cohort_id cookie is set
  curl -si http://{proxy}/ -H 'x-cohort: canary'         # force the canary
  curl -sN http://{proxy}/events -H 'x-user-id: alice'  # server-sent events, one by one
  curl -s http://{admin}/metrics | grep cohort_requests_total

Ctrl-C stops it all.",
        stable = config.versions.stable.name,
        canary = config.versions.canary.as_ref().map_or("-", |(c, _)| c.name.as_str()),
        weight = config.versions.canary.as_ref().map_or(0.0, |(_, w)| w.percent()),
    );
    loop {
        match signals.recv().await {
            Signal::Shutdown => break,
            Signal::Reload => {
                tracing::info!("SIGHUP: the demo's config is built in; there is nothing to reload");
            }
        }
    }
    server.shutdown().await;
    // A rollback under way finishes before the state directory goes.
    rolling_back.abort();
    let _ = rolling_back.await;
    Ok(())
}

/// A demo upstream for version `name`: `/events` streams five server-sent
/// events, anything else answers with the version's name.
pub async fn serve_upstream(listener: TcpListener, name: String, tokens: u64) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let name = name.clone();
        let service = service_fn(move |req| {
            std::future::ready(Ok::<_, Infallible>(answer(&req, &name, tokens)))
        });
        tokio::spawn(async move {
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn answer(
    req: &Request<Incoming>,
    name: &str,
    tokens: u64,
) -> Response<BoxBody<Bytes, Infallible>> {
    let builder = Response::builder().header("x-tokens", tokens);
    let rsp = match req.uri().path() {
        "/events" => {
            let name = name.to_owned();
            let events = stream::unfold(1u32, move |n| {
                let name = name.clone();
                async move {
                    if n > 5 {
                        return None;
                    }
                    if n > 1 {
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                    let event = format!("id: {n}\ndata: event {n} from {name}\n\n");
                    Some((Ok::<_, Infallible>(Frame::data(Bytes::from(event))), n + 1))
                }
            });
            builder
                .header("content-type", "text/event-stream")
                .body(BoxBody::new(StreamBody::new(events)))
        }
        "/health" => builder.body(full("ok\n")),
        _ => builder
            .header("content-type", "text/plain")
            .body(full(format!("hello from {name}\n"))),
    };
    rsp.unwrap_or_else(|_| {
        let mut rsp = Response::new(full("error\n"));
        *rsp.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
        rsp
    })
}

fn full(text: impl Into<Bytes>) -> BoxBody<Bytes, Infallible> {
    http_body_util::Full::new(text.into()).boxed()
}
