//! The admin listener, separate from client traffic.
//!
//! Endpoints:
//! - `GET /health`: liveness; 200 while the process runs.
//! - `GET /ready`: readiness; 200 once the listeners are up and the state is
//!   loaded, 503 before that and while draining.
//! - `GET /metrics`: Prometheus text exposition.
//!
//! Owns: the admin accept loop and the one `match` on (method, path). Does
//! not own: what the metrics are (`metrics`).

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use http::header::CONTENT_TYPE;
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;

/// What the admin endpoints read.
#[derive(Debug)]
pub struct Admin {
    /// Set once the proxy is serving; cleared when it starts draining.
    pub ready: AtomicBool,
    pub metrics: PrometheusHandle,
}

type AdminResponse = Response<Full<Bytes>>;

impl Admin {
    #[must_use]
    pub fn new(metrics: PrometheusHandle) -> Admin {
        Admin {
            ready: AtomicBool::new(false),
            metrics,
        }
    }

    async fn handle(&self, req: Request<Incoming>) -> AdminResponse {
        match (req.method(), req.uri().path()) {
            (&Method::GET, "/health") => json(StatusCode::OK, &serde_json::json!({"status": "ok"})),
            (&Method::GET, "/ready") => {
                if self.ready.load(Ordering::Acquire) {
                    json(StatusCode::OK, &serde_json::json!({"status": "ready"}))
                } else {
                    error(StatusCode::SERVICE_UNAVAILABLE, "not ready")
                }
            }
            (&Method::GET, "/metrics") => {
                let mut rsp = Response::new(Full::from(self.metrics.render()));
                rsp.headers_mut().insert(
                    CONTENT_TYPE,
                    HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
                );
                rsp
            }
            (_, "/health" | "/ready" | "/metrics") => {
                error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed")
            }
            (_, path) => error(
                StatusCode::NOT_FOUND,
                &format!("no admin endpoint at {path}"),
            ),
        }
    }
}

/// Serves the admin endpoints until `shutdown` resolves.
pub async fn serve(listener: TcpListener, admin: Arc<Admin>, shutdown: impl Future<Output = ()>) {
    let builder = hyper::server::conn::http1::Builder::new();
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    tracing::warn!(%error, "admin accept failed");
                    continue;
                }
            },
            () = &mut shutdown => return,
        };
        let admin = Arc::clone(&admin);
        let service = service_fn(move |req| {
            let admin = Arc::clone(&admin);
            async move { Ok::<_, Infallible>(admin.handle(req).await) }
        });
        let connection = builder.serve_connection(TokioIo::new(stream), service);
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%error, client.addr = %peer, "admin connection ended with an error");
            }
        });
    }
}

fn json(status: StatusCode, value: &serde_json::Value) -> AdminResponse {
    let mut rsp = Response::new(Full::from(value.to_string()));
    *rsp.status_mut() = status;
    rsp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    rsp
}

fn error(status: StatusCode, message: &str) -> AdminResponse {
    json(status, &serde_json::json!({ "error": message }))
}
