//! Rollout webhooks: a JSON event to each configured URL, with retries.
//!
//! Owns: delivering `{"event", "at", "state"}` on stage change, pause,
//! rollback and promotion. Delivery runs in its own task and is never
//! awaited, so a slow or failing webhook never delays a rollback.

use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http::header::CONTENT_TYPE;
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use crate::state::{LiveState, now_rfc3339};

/// Attempts per event and URL.
const ATTEMPTS: u32 = 3;
/// Time allowed for one attempt.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(5);

/// The configured webhook URLs and the client that calls them.
#[derive(Debug, Clone)]
pub struct Webhooks {
    urls: Vec<String>,
    client: Client<HttpConnector, Full<Bytes>>,
}

impl Webhooks {
    #[must_use]
    pub fn new(urls: Vec<String>) -> Webhooks {
        Webhooks {
            urls,
            client: Client::builder(TokioExecutor::new()).build_http(),
        }
    }

    /// Sends `event` with the live state to every URL, in the background.
    pub fn send(&self, event: &'static str, state: &LiveState) {
        if self.urls.is_empty() {
            return;
        }
        let body = Bytes::from(
            serde_json::json!({"event": event, "at": now_rfc3339(), "state": state}).to_string(),
        );
        for url in &self.urls {
            let (client, url, body) = (self.client.clone(), url.clone(), body.clone());
            tokio::spawn(async move {
                for attempt in 1..=ATTEMPTS {
                    match deliver(&client, &url, body.clone()).await {
                        Ok(()) => return,
                        Err(error) => {
                            tracing::warn!(%url, attempt, %error, event, "webhook delivery failed")
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(500) * 2u32.pow(attempt - 1)).await;
                }
            });
        }
    }
}

async fn deliver(
    client: &Client<HttpConnector, Full<Bytes>>,
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
