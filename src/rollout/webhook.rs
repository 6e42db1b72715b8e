//! Rollout webhooks: a JSON event to each of a plan's URLs, with retries.
//!
//! Owns: delivering `{"event", "at", "state"}` on stage change, pause,
//! rollback and promotion, over `http://` or `https://` (trusting what
//! `https://` upstreams are trusted with). Delivery runs in its own task and
//! is never awaited, so a slow or failing webhook never delays a rollback.
//! Does not own: when an event happens (the rollout `controller`), or what
//! the state in it says (`state`).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http::header::CONTENT_TYPE;
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use metrics::Gauge;
use rustls::ClientConfig;

use crate::state::{LiveState, now_rfc3339};
use crate::upstream::connect::CountingConnector;

/// Attempts per event and URL.
const ATTEMPTS: u32 = 3;
/// Time allowed for one attempt.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(5);

/// The client that calls webhooks.
#[derive(Debug, Clone)]
pub struct Webhooks {
    client: Client<CountingConnector, Full<Bytes>>,
}

impl Webhooks {
    /// `tls` is the trust the `https://` upstreams have (`upstream.ca_file`
    /// or the system's roots).
    #[must_use]
    pub fn new(tls: Arc<ClientConfig>) -> Webhooks {
        let connector = CountingConnector::new(ATTEMPT_TIMEOUT, tls, Gauge::noop());
        Webhooks {
            client: Client::builder(TokioExecutor::new()).build(connector),
        }
    }

    /// Sends `event` with the live state to every one of `urls`, in the background.
    pub fn send(&self, urls: &[String], event: &'static str, state: &LiveState) {
        if urls.is_empty() {
            return;
        }
        let body = Bytes::from(
            serde_json::json!({"event": event, "at": now_rfc3339(), "state": state}).to_string(),
        );
        for url in urls {
            let (client, url, body) = (self.client.clone(), url.clone(), body.clone());
            tokio::spawn(async move {
                for attempt in 1..=ATTEMPTS {
                    let Err(error) = deliver(&client, &url, body.clone()).await else {
                        return;
                    };
                    if attempt == ATTEMPTS {
                        tracing::error!(%url, attempt, %error, event, "webhook delivery failed; giving up");
                        return;
                    }
                    tracing::warn!(%url, attempt, %error, event, "webhook delivery failed; retrying");
                    tokio::time::sleep(Duration::from_millis(500) * 2u32.pow(attempt - 1)).await;
                }
            });
        }
    }
}

async fn deliver(
    client: &Client<CountingConnector, Full<Bytes>>,
    url: &str,
    body: Bytes,
) -> Result<(), String> {
    let req = Request::post(url)
        .header(CONTENT_TYPE, "application/json")
        .body(Full::new(body))
        .map_err(|e| e.to_string())?;
    match tokio::time::timeout(ATTEMPT_TIMEOUT, client.request(req)).await {
        Ok(Ok(rsp)) if rsp.status().is_success() => Ok(()),
        Ok(Ok(rsp)) => Err(format!("status {}", rsp.status())),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("timed out".into()),
    }
}
