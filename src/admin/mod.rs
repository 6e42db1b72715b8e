//! The admin listener, separate from client traffic.
//!
//! Endpoints (SPEC section 3):
//! - `GET /health`: liveness; 200 while the process runs.
//! - `GET /ready`: readiness; 200 once the listeners are up and the state is
//!   loaded, 503 before that and while draining.
//! - `GET /metrics`: Prometheus text exposition (token only with `admin.metrics_auth`).
//! - `GET /admin/state` (with the health of every upstream, as in the
//!   reply to every change), `PUT /admin/weight`,
//!   `POST /admin/rollback`, `POST /admin/promote`, `PUT /admin/canary`,
//!   `PUT /admin/shadow`, `GET /admin/route?key=K`, `POST /admin/rollout`,
//!   `POST /admin/rollout/approve`, `POST /admin/rollout/abort`,
//!   `POST /admin/signals`: the control plane, behind
//!   `Authorization: Bearer <token>` when a token is configured.
//!
//! Owns: the admin accept loop (which runs through the proxy's drain, and
//! bounds what an admin client can hold: a head timeout, a lifetime per
//! connection, a cap on connections),
//! authentication (a 401 carries the `WWW-Authenticate: Bearer` challenge;
//! the token and `admin.metrics_auth` are replaced whole on a reload),
//! refusing `/admin/*` calls made by web pages (`refuse_web_pages`), the
//! endpoints and the one method each answers (`Endpoint`), `HEAD` answered
//! as `GET`, and the JSON
//! error shape. Does not own what the calls do
//! (`control`, via `handlers`).

mod handlers;

use std::convert::Infallible;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::header::{ALLOW, AUTHORIZATION, CONTENT_TYPE, HOST, ORIGIN, WWW_AUTHENTICATE};
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use metrics_exporter_prometheus::PrometheusHandle;
use sha2::Digest as _;
use subtle::ConstantTimeEq as _;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::control::{Control, ControlError};
use crate::health;
use crate::rollout::controller::Rollouts;
use crate::routing::Cohort;
use crate::state::LiveState;

/// What the admin endpoints read and drive.
#[derive(Debug)]
pub struct Admin {
    /// Set once the proxy is serving; cleared when it starts draining.
    pub ready: AtomicBool,
    metrics: PrometheusHandle,
    control: Arc<Control>,
    rollouts: Arc<Rollouts>,
    /// Who may call what; replaced whole when the config is reloaded.
    access: ArcSwap<Access>,
}

/// The bearer token `/admin/*` requires (`None` only on loopback), and
/// whether `/metrics` requires it too (`admin.metrics_auth`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Access {
    pub token: Option<String>,
    pub metrics_auth: bool,
}

type AdminResponse = Response<Full<Bytes>>;

/// Why an admin call failed, with the status SPEC section 3 gives it.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("{0}")]
    BadRequest(String),
    #[error("a valid \"Authorization: Bearer <token>\" header is required")]
    Unauthorized,
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{method} is not allowed here; use {allow}")]
    MethodNotAllowed { method: Method, allow: Method },
    #[error("{0}")]
    Conflict(String),
    #[error("the body is over the {} KiB limit of admin requests", .0 / 1024)]
    PayloadTooLarge(usize),
    #[error("{0}")]
    Unprocessable(String),
    #[error("{0}")]
    Internal(String),
}

impl AdminError {
    fn status(&self) -> StatusCode {
        match self {
            AdminError::BadRequest(_) => StatusCode::BAD_REQUEST,
            AdminError::Unauthorized => StatusCode::UNAUTHORIZED,
            AdminError::Forbidden(_) => StatusCode::FORBIDDEN,
            AdminError::NotFound(_) => StatusCode::NOT_FOUND,
            AdminError::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            AdminError::Conflict(_) => StatusCode::CONFLICT,
            AdminError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            AdminError::Unprocessable(_) => StatusCode::UNPROCESSABLE_ENTITY,
            AdminError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl From<ControlError> for AdminError {
    fn from(error: ControlError) -> AdminError {
        match error {
            ControlError::BadRequest(m) => AdminError::BadRequest(m),
            ControlError::Conflict(m) => AdminError::Conflict(m),
            ControlError::Invalid(m) => AdminError::Unprocessable(m),
            ControlError::Persist(e) => AdminError::Internal(e.to_string()),
            unsaved @ ControlError::Unsaved { .. } => AdminError::Internal(unsaved.to_string()),
        }
    }
}

impl Admin {
    #[must_use]
    pub fn new(
        metrics: PrometheusHandle,
        control: Arc<Control>,
        rollouts: Arc<Rollouts>,
        access: Access,
    ) -> Admin {
        Admin {
            ready: AtomicBool::new(false),
            metrics,
            control,
            rollouts,
            access: ArcSwap::from_pointee(access),
        }
    }

    /// Applies a reloaded token and `admin.metrics_auth` to the next call.
    pub fn set_access(&self, access: Access) {
        self.access.store(Arc::new(access));
    }

    async fn handle(&self, req: Request<Incoming>) -> AdminResponse {
        let result = self.dispatch(req).await;
        result.unwrap_or_else(|error| {
            let mut rsp = json(
                error.status(),
                &serde_json::json!({ "error": error.to_string() }),
            );
            match error {
                AdminError::MethodNotAllowed { allow, .. } => {
                    // A standard method's name is a valid header value.
                    if let Ok(allow) = HeaderValue::from_str(allow.as_str()) {
                        rsp.headers_mut().insert(ALLOW, allow);
                    }
                }
                // The challenge names the scheme to answer with (RFC 6750 section 3).
                AdminError::Unauthorized => {
                    rsp.headers_mut()
                        .insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
                }
                _ => {}
            }
            rsp
        })
    }

    async fn dispatch(&self, req: Request<Incoming>) -> Result<AdminResponse, AdminError> {
        let path = req.uri().path().to_owned();
        // HEAD is answered as GET without the body (hyper leaves it out),
        // for uptime checkers and `curl -I`.
        let sent = req.method().clone();
        let method = match &sent {
            &Method::HEAD => Method::GET,
            method => method.clone(),
        };
        {
            // Not held across an await: the guard is for this check only.
            let access = self.access.load();
            let needs_token =
                path.starts_with("/admin/") || (path == "/metrics" && access.metrics_auth);
            if needs_token {
                authorize(access.token.as_deref(), &req)?;
            }
            if path.starts_with("/admin/") {
                refuse_web_pages(access.token.is_none(), &req)?;
            }
        }
        let endpoint = Endpoint::at(&path)
            .ok_or_else(|| AdminError::NotFound(format!("no admin endpoint at {path}")))?;
        if method != endpoint.method() {
            return Err(AdminError::MethodNotAllowed {
                method: sent,
                allow: endpoint.method(),
            });
        }
        let ok = |value: serde_json::Value| Ok(json(StatusCode::OK, &value));
        // A change answers with the state it made, shown as `GET /admin/state` shows it.
        let changed = |live: LiveState| ok(self.control.with_health(&live));
        match endpoint {
            Endpoint::Health => ok(serde_json::json!({"status": "ok"})),
            Endpoint::Ready => {
                if self.ready.load(Ordering::Acquire) {
                    ok(serde_json::json!({"status": "ready"}))
                } else {
                    Ok(json(
                        StatusCode::SERVICE_UNAVAILABLE,
                        &serde_json::json!({"error": "not ready"}),
                    ))
                }
            }
            Endpoint::Metrics => {
                crate::metrics::record_log_lines_dropped(crate::logging::dropped_lines());
                let table = self.control.table();
                let mut text =
                    crate::metrics::retain_live_series(&self.metrics.render(), |v, c| {
                        Cohort::from_label(c).is_some_and(|c| table.held_lately(v, c))
                    });
                health::write_gauges(&table.snapshot(), &mut text);
                let mut rsp = Response::new(Full::from(text));
                rsp.headers_mut().insert(
                    CONTENT_TYPE,
                    HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
                );
                Ok(rsp)
            }
            Endpoint::State => ok(self.rollouts.state_with_health()),
            Endpoint::Weight => changed(handlers::weight(&self.control, req).await?),
            Endpoint::Rollback => changed(handlers::rollback(&self.control, req).await?),
            Endpoint::Promote => changed(handlers::promote(&self.control, req).await?),
            Endpoint::Canary => changed(handlers::canary(&self.control, req).await?),
            Endpoint::Shadow => changed(handlers::shadow(&self.control, req).await?),
            Endpoint::Route => ok(to_json(&handlers::route(&self.control, &req)?)),
            Endpoint::RolloutStart => changed(handlers::rollout_start(&self.rollouts, req).await?),
            Endpoint::RolloutApprove => {
                changed(handlers::rollout_approve(&self.rollouts, req).await?)
            }
            Endpoint::RolloutAbort => changed(handlers::rollout_abort(&self.rollouts, req).await?),
            Endpoint::Signals => ok(to_json(&handlers::signals(&self.rollouts, req).await?)),
        }
    }
}

/// Checks `req`'s bearer token against `expected` in constant time, its
/// length included; no
/// token configured means the listener is on loopback (enforced at start
/// and on reload) and open.
fn authorize<B>(expected: Option<&str>, req: &Request<B>) -> Result<(), AdminError> {
    let Some(expected) = expected else {
        return Ok(());
    };
    let presented = req
        .headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(bearer_credentials)
        .ok_or(AdminError::Unauthorized)?;
    // Digests compared, of one length whatever the token's: comparing the
    // tokens themselves would answer sooner for a token of another length,
    // which tells the token's length.
    let digest = |token: &str| sha2::Sha256::digest(token.as_bytes());
    if bool::from(
        digest(presented.trim())
            .as_slice()
            .ct_eq(digest(expected).as_slice()),
    ) {
        Ok(())
    } else {
        Err(AdminError::Unauthorized)
    }
}

/// Refuses an `/admin/*` call that a web browser made for a page. The
/// admin API is for programs (`cohort ctl`, curl, automation), and a page
/// the operator happens to open must not roll back, promote or install a
/// canary through it (cross-site request forgery): browsers mark what a
/// page sends with `Origin` or `Sec-Fetch-Site` (`none` is the operator
/// typing the address). Without a token (`tokenless`: on loopback only),
/// the `Host` must be `localhost` or an IP address: a page whose own name
/// an attacker points at 127.0.0.1 (DNS rebinding) sends that name.
fn refuse_web_pages<B>(tokenless: bool, req: &Request<B>) -> Result<(), AdminError> {
    let headers = req.headers();
    let from_a_page = headers.contains_key(ORIGIN)
        || headers
            .get("sec-fetch-site")
            .is_some_and(|site| site.as_bytes() != b"none");
    if from_a_page {
        return Err(AdminError::Forbidden(
            "the admin API takes no calls from web pages (the request has an Origin or Sec-Fetch-Site header)".into(),
        ));
    }
    if tokenless
        && let Some(host) = headers.get(HOST)
        && !is_address_or_localhost(host.as_bytes())
    {
        return Err(AdminError::Forbidden(format!(
            "Host {:?} does not name this machine: without a token (admin.token_file or COHORT_ADMIN_TOKEN), the admin API answers only to localhost or an IP address",
            String::from_utf8_lossy(host.as_bytes())
        )));
    }
    Ok(())
}

/// Whether a `Host` value is `localhost` or an IP address (with or without
/// a port): not a domain name, which whoever owns it can point at 127.0.0.1.
fn is_address_or_localhost(host: &[u8]) -> bool {
    let Ok(host) = std::str::from_utf8(host) else {
        return false;
    };
    let is_port = |port: &str| port.bytes().all(|b| b.is_ascii_digit());
    if let Some(bracketed) = host.strip_prefix('[') {
        return bracketed.split_once(']').is_some_and(|(ip, rest)| {
            ip.parse::<Ipv6Addr>().is_ok()
                && (rest.is_empty() || rest.strip_prefix(':').is_some_and(is_port))
        });
    }
    let name = match host.rsplit_once(':') {
        Some((name, port)) if is_port(port) => name,
        _ => host,
    };
    name.eq_ignore_ascii_case("localhost") || name.parse::<Ipv4Addr>().is_ok()
}

/// The credentials of an `Authorization: Bearer ...` value. The scheme's
/// name is case-insensitive (RFC 9110 section 11.1): curl users write
/// `bearer` as often as `Bearer`.
fn bearer_credentials(value: &str) -> Option<&str> {
    let (scheme, credentials) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then_some(credentials)
}

/// How long an admin client has to send a request head. The admin
/// listener may face a network (with a token), so a client that connects
/// and says nothing must not hold a connection.
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);

/// How long an admin connection is kept open. Admin calls are short and
/// Prometheus scrapes open a connection per scrape or reuse one for a
/// while; closing each connection after this (once its current request is
/// answered) bounds what a slow or idle client can hold, bodies included.
const CONNECTION_LIFETIME: Duration = Duration::from_secs(60);

/// How long a request in progress at [`CONNECTION_LIFETIME`] may still take.
const LAST_REQUEST_GRACE: Duration = Duration::from_secs(10);

/// Admin connections open at once. A client past it waits in the kernel's
/// backlog; the cap keeps clients of the admin port from using up the file
/// descriptors the proxy shares.
const MAX_CONNECTIONS: usize = 256;

/// Serves the admin endpoints for as long as the task runs. It runs
/// through the proxy's drain, so that `/ready` can say 503, `/metrics` can
/// be scraped and a rollback can still be ordered; the server stops it
/// once the drain is over.
pub async fn serve(listener: TcpListener, admin: Arc<Admin>) {
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(HEAD_TIMEOUT);
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let permit = Arc::clone(&permits)
            .acquire_owned()
            .await
            .expect("the semaphore is never closed");
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                // Usually out of file descriptors: back off instead of spinning.
                tracing::warn!(%error, "admin accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let admin = Arc::clone(&admin);
        let service = service_fn(move |req| {
            let admin = Arc::clone(&admin);
            async move { Ok::<_, Infallible>(admin.handle(req).await) }
        });
        let connection = builder.serve_connection(TokioIo::new(stream), service);
        tokio::spawn(async move {
            let _permit = permit;
            tokio::pin!(connection);
            let ended = tokio::select! {
                ended = connection.as_mut() => Some(ended),
                () = tokio::time::sleep(CONNECTION_LIFETIME) => None,
            };
            let ended = match ended {
                Some(ended) => ended,
                None => {
                    connection.as_mut().graceful_shutdown();
                    match tokio::time::timeout(LAST_REQUEST_GRACE, connection).await {
                        Ok(ended) => ended,
                        Err(_) => {
                            tracing::debug!(client.addr = %peer, "admin connection dropped: its last request took too long");
                            return;
                        }
                    }
                }
            };
            if let Err(error) = ended {
                tracing::debug!(%error, client.addr = %peer, "admin connection ended with an error");
            }
        });
    }
}

/// The admin listener's endpoints (SPEC section 3), each answering one method.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Endpoint {
    Health,
    Ready,
    Metrics,
    State,
    Weight,
    Rollback,
    Promote,
    Canary,
    Shadow,
    Route,
    RolloutStart,
    RolloutApprove,
    RolloutAbort,
    Signals,
}

impl Endpoint {
    fn at(path: &str) -> Option<Endpoint> {
        Some(match path {
            "/health" => Endpoint::Health,
            "/ready" => Endpoint::Ready,
            "/metrics" => Endpoint::Metrics,
            "/admin/state" => Endpoint::State,
            "/admin/weight" => Endpoint::Weight,
            "/admin/rollback" => Endpoint::Rollback,
            "/admin/promote" => Endpoint::Promote,
            "/admin/canary" => Endpoint::Canary,
            "/admin/shadow" => Endpoint::Shadow,
            "/admin/route" => Endpoint::Route,
            "/admin/rollout" => Endpoint::RolloutStart,
            "/admin/rollout/approve" => Endpoint::RolloutApprove,
            "/admin/rollout/abort" => Endpoint::RolloutAbort,
            "/admin/signals" => Endpoint::Signals,
            _ => return None,
        })
    }

    /// The one method it answers (and names in the `Allow` header of a 405).
    fn method(self) -> Method {
        match self {
            Endpoint::Health
            | Endpoint::Ready
            | Endpoint::Metrics
            | Endpoint::State
            | Endpoint::Route => Method::GET,
            Endpoint::Weight | Endpoint::Canary | Endpoint::Shadow => Method::PUT,
            Endpoint::Rollback
            | Endpoint::Promote
            | Endpoint::RolloutStart
            | Endpoint::RolloutApprove
            | Endpoint::RolloutAbort
            | Endpoint::Signals => Method::POST,
        }
    }
}

fn to_json<T: serde::Serialize>(value: &T) -> serde_json::Value {
    serde_json::to_value(value).expect("admin responses serialise to JSON")
}

fn json(status: StatusCode, value: &serde_json::Value) -> AdminResponse {
    let mut rsp = Response::new(Full::from(value.to_string()));
    *rsp.status_mut() = status;
    rsp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    rsp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_host_is_an_address_or_localhost_or_refused() {
        for host in [
            "localhost",
            "LOCALHOST:9901",
            "127.0.0.1",
            "127.0.0.1:9901",
            "[::1]",
            "[::1]:9901",
        ] {
            assert!(is_address_or_localhost(host.as_bytes()), "{host}");
        }
        for host in [
            "evil.example",
            "evil.example:9901",
            "localhost.evil.example",
            "127.0.0.1.nip.io",
            "[::1",
            "[::1]evil.example",
            "",
        ] {
            assert!(!is_address_or_localhost(host.as_bytes()), "{host}");
        }
    }
}
