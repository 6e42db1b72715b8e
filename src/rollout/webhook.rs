//! Rollout webhooks: a JSON event to each of a plan's URLs, in order, with
//! retries.
//!
//! Owns: delivering `{"id", "event", "at", "state"}` on stage change, pause,
//! rollback and promotion, over `http://` or `https://` (trusting what
//! `https://` upstreams are trusted with). Each URL has one queue, drained
//! by its own task: an event goes out once the one before it was answered
//! or given up, so a receiver hears a rollout's events in the order they
//! happened, retries included. Delivery is at least once (an attempt that
//! timed out may have arrived): the `id` tells a repeat. Nothing here is
//! awaited by the rollout, so a slow or failing webhook never delays a
//! rollback. User info in a URL (`https://bot:pw@host/...`) is sent as
//! HTTP Basic credentials, as curl and Go's HTTP client send it. Does not
//! own: when an event happens (the rollout
//! `controller`), or what the state in it says (`state`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use http::header::{AUTHORIZATION, CONTENT_TYPE};
use http::uri::{Authority, Uri};
use http::{HeaderValue, Request};
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use metrics::Gauge;
use rustls::ClientConfig;
use tokio::sync::mpsc;

use crate::state::{LiveState, now_rfc3339};
use crate::upstream::connect::CountingConnector;

/// Attempts per event and URL.
const ATTEMPTS: u32 = 3;
/// Time allowed for one attempt.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(5);

type WebhookClient = Client<CountingConnector, Full<Bytes>>;

/// One event on its way to a URL.
struct Event {
    name: &'static str,
    body: Bytes,
}

/// The client that calls webhooks, and the queue of each URL it has called.
#[derive(Debug, Clone)]
pub struct Webhooks {
    client: WebhookClient,
    queues: Arc<Mutex<HashMap<String, mpsc::UnboundedSender<Event>>>>,
}

impl Webhooks {
    /// `tls` is the trust the `https://` upstreams have (`upstream.ca_file`
    /// or the system's roots).
    #[must_use]
    pub fn new(tls: Arc<ClientConfig>) -> Webhooks {
        let connector = CountingConnector::new(ATTEMPT_TIMEOUT, tls, Gauge::noop());
        Webhooks {
            client: Client::builder(TokioExecutor::new()).build(connector),
            queues: Arc::default(),
        }
    }

    /// Queues `event` with the live state for every one of `urls`; returns
    /// at once.
    pub fn send(&self, urls: &[String], event: &'static str, state: &LiveState) {
        if urls.is_empty() {
            return;
        }
        let mut state = serde_json::to_value(state).unwrap_or_default();
        hide_secrets(&mut state);
        let body = Bytes::from(
            serde_json::json!({
                "id": crate::routing::key::fresh_id(),
                "event": event,
                "at": now_rfc3339(),
                "state": state,
            })
            .to_string(),
        );
        let mut queues = self.queues.lock().unwrap_or_else(PoisonError::into_inner);
        for url in urls {
            let event = Event {
                name: event,
                body: body.clone(),
            };
            let queue = queues.entry(url.clone()).or_insert_with(|| {
                let (queue, events) = mpsc::unbounded_channel();
                tokio::spawn(drain(self.client.clone(), url.clone(), events));
                queue
            });
            if let Err(mpsc::error::SendError(event)) = queue.send(event) {
                // Its task is gone (its runtime ended, in tests): a new one.
                let (fresh, events) = mpsc::unbounded_channel();
                tokio::spawn(drain(self.client.clone(), url.clone(), events));
                let _ = fresh.send(event);
                *queue = fresh;
            }
        }
    }
}

/// Delivers `url`'s events one after the other, each tried up to
/// [`ATTEMPTS`] times, until every sender of its queue is gone.
async fn drain(client: WebhookClient, url: String, mut events: mpsc::UnboundedReceiver<Event>) {
    let target = Target::parse(&url);
    while let Some(Event { name, body }) = events.recv().await {
        for attempt in 1..=ATTEMPTS {
            let delivered = match &target {
                Ok(target) => deliver(&client, target, body.clone()).await,
                Err(error) => Err(error.clone()),
            };
            let Err(error) = delivered else {
                break;
            };
            let url = shown(&url);
            if attempt == ATTEMPTS {
                tracing::error!(%url, attempt, %error, event = name, "webhook delivery failed; giving up");
                break;
            }
            tracing::warn!(%url, attempt, %error, event = name, "webhook delivery failed; retrying");
            tokio::time::sleep(Duration::from_millis(500) * 2u32.pow(attempt - 1)).await;
        }
    }
}

/// Replaces the webhook URLs of a live state's running plan with what the
/// log shows of them ([`shown`]), for every view of the state but the state
/// file: the admin API, the audit log, and the events sent to webhooks.
pub fn hide_secrets(state: &mut serde_json::Value) {
    if let Some(hooks) = state
        .pointer_mut("/rollout/plan/webhooks")
        .and_then(serde_json::Value::as_array_mut)
    {
        for hook in hooks {
            if let Some(url) = hook.as_str() {
                *hook = shown(url).into();
            }
        }
    }
}

/// `url` as the log shows it: its scheme, host and port, with `…` for any
/// user info, path and query. A webhook's path and query are often its
/// secret (a chat service's incoming webhook is a token in its path), and
/// logs travel further than the config.
pub fn shown(url: &str) -> String {
    let Ok(uri) = url.parse::<http::Uri>() else {
        return "(not a valid URL)".to_owned();
    };
    // The host and port as written, whether or not the port can be used;
    // user info marked as hidden, as a path is, so that a URL copied from
    // what is shown is refused rather than called without its credentials.
    let authority = uri.authority().map_or("", |a| a.as_str());
    let (user_info, host_and_port) = match authority.rsplit_once('@') {
        Some((_, host_and_port)) => ("…@", host_and_port),
        None => ("", authority),
    };
    let scheme = uri.scheme_str().unwrap_or("http");
    let mut shown = format!("{scheme}://{user_info}{host_and_port}");
    if uri.path_and_query().is_some_and(|p| p.as_str() != "/") {
        shown.push_str("/…");
    }
    shown
}

/// Where a URL's events go: the URL without its user info, and that user
/// info as an `Authorization` header.
struct Target {
    uri: Uri,
    authorization: Option<HeaderValue>,
}

impl Target {
    fn parse(url: &str) -> Result<Target, String> {
        let invalid = || "not a valid URL".to_owned();
        let mut parts = url.parse::<Uri>().map_err(|_| invalid())?.into_parts();
        let Some((user_info, host)) = parts
            .authority
            .as_ref()
            .and_then(|authority| authority.as_str().rsplit_once('@'))
        else {
            return Ok(Target {
                uri: Uri::from_parts(parts).map_err(|_| invalid())?,
                authorization: None,
            });
        };
        // RFC 7617: the user and the password, percent-decoded, joined by
        // the first colon; a user alone has an empty password, as curl and
        // Go send it.
        let mut decoded = percent_encoding::percent_decode_str(user_info).collect::<Vec<u8>>();
        if !user_info.contains(':') {
            decoded.push(b':');
        }
        let credentials = base64::engine::general_purpose::STANDARD.encode(decoded);
        let mut authorization =
            HeaderValue::try_from(format!("Basic {credentials}")).map_err(|_| invalid())?;
        authorization.set_sensitive(true);
        parts.authority = Some(host.parse::<Authority>().map_err(|_| invalid())?);
        Ok(Target {
            uri: Uri::from_parts(parts).map_err(|_| invalid())?,
            authorization: Some(authorization),
        })
    }
}

async fn deliver(client: &WebhookClient, target: &Target, body: Bytes) -> Result<(), String> {
    let mut req = Request::post(target.uri.clone())
        .header(CONTENT_TYPE, "application/json")
        .body(Full::new(body))
        .map_err(|e| e.to_string())?;
    if let Some(authorization) = &target.authorization {
        req.headers_mut()
            .insert(AUTHORIZATION, authorization.clone());
    }
    match tokio::time::timeout(ATTEMPT_TIMEOUT, client.request(req)).await {
        Ok(Ok(rsp)) if rsp.status().is_success() => Ok(()),
        Ok(Ok(rsp)) => Err(format!("status {}", rsp.status())),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("timed out".into()),
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use http_body_util::BodyExt as _;
    use hyper::body::Incoming;
    use hyper::service::service_fn;
    use hyper_util::rt::TokioIo;

    use super::*;

    #[test]
    fn a_url_is_logged_without_its_path_query_or_user() {
        let secret = "https://bot:pw@hooks.example.com/services/T0/B0/s3cret?token=x";
        assert_eq!(shown(secret), "https://…@hooks.example.com/…");
        assert_eq!(shown("http://bot:pw@h:1/"), "http://…@h:1");
        assert_eq!(shown("http://127.0.0.1:9000/"), "http://127.0.0.1:9000");
        assert_eq!(shown("http://[::1]:9000/hook"), "http://[::1]:9000/…");
        // A port that cannot be used, as written: it is not port 80.
        assert_eq!(shown("http://u:p@h:99999/x"), "http://…@h:99999/…");
    }

    /// A call a receiver got: its event, whether it was answered 2xx, and
    /// its `Authorization` and `Host` headers.
    #[derive(Debug, PartialEq)]
    struct Call {
        event: String,
        answered: bool,
        authorization: Option<String>,
        host: String,
    }

    /// A receiver that answers the first call it gets 500 and records
    /// every call, in the order they came.
    async fn failing_once() -> (SocketAddr, Arc<Mutex<Vec<Call>>>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let calls: Arc<Mutex<Vec<Call>>> = Arc::default();
        let seen = Arc::clone(&calls);
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let seen = Arc::clone(&seen);
                let service = service_fn(move |req: Request<Incoming>| {
                    let seen = Arc::clone(&seen);
                    async move {
                        let header = |name| {
                            req.headers()
                                .get(name)
                                .map(|v: &HeaderValue| v.to_str().unwrap().to_owned())
                        };
                        let authorization = header(AUTHORIZATION);
                        let host = header(http::header::HOST).unwrap_or_default();
                        let body = req.into_body().collect().await?.to_bytes();
                        let event: serde_json::Value = serde_json::from_slice(&body).unwrap();
                        let mut seen = seen.lock().unwrap();
                        let answered = !seen.is_empty();
                        seen.push(Call {
                            event: event["event"].as_str().unwrap().to_owned(),
                            answered,
                            authorization,
                            host,
                        });
                        let mut rsp = http::Response::new(Full::new(Bytes::new()));
                        if !answered {
                            *rsp.status_mut() = http::StatusCode::INTERNAL_SERVER_ERROR;
                        }
                        Ok::<_, hyper::Error>(rsp)
                    }
                });
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service),
                );
            }
        });
        (addr, calls)
    }

    #[tokio::test]
    async fn a_url_hears_its_events_in_order_retries_included() {
        let (addr, calls) = failing_once().await;
        let webhooks = Webhooks::new(crate::tls::client_config(None).unwrap());
        let config = crate::config::two_versions(10);
        let state = LiveState::seed(&config.versions, None, 1);
        let urls = [format!("http://{addr}/hook")];
        webhooks.send(&urls, "stage", &state);
        webhooks.send(&urls, "rollback", &state);

        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while calls.lock().unwrap().len() < 3 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // The stage's first attempt failed: it was sent again before the rollback.
        let calls: Vec<_> = calls
            .lock()
            .unwrap()
            .iter()
            .map(|call| (call.event.clone(), call.answered))
            .collect();
        assert_eq!(
            calls,
            [
                ("stage".to_owned(), false),
                ("stage".to_owned(), true),
                ("rollback".to_owned(), true),
            ]
        );
    }

    /// `http://user:password@host/` is sent to `host` with the user info as
    /// Basic credentials (RFC 7617), percent-decoded, and not in `Host`.
    #[tokio::test]
    async fn user_info_in_a_url_is_sent_as_basic_credentials() {
        let (addr, calls) = failing_once().await;
        let webhooks = Webhooks::new(crate::tls::client_config(None).unwrap());
        let config = crate::config::two_versions(10);
        let state = LiveState::seed(&config.versions, None, 1);
        webhooks.send(&[format!("http://bot:p%40ss@{addr}/hook")], "stage", &state);

        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while calls.lock().unwrap().len() < 2 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let calls = calls.lock().unwrap();
        let call = calls.last().expect("the webhook was called");
        // base64("bot:p@ss")
        assert_eq!(call.authorization.as_deref(), Some("Basic Ym90OnBAc3M="));
        assert_eq!(call.host, addr.to_string());
    }

    /// Basic credentials are always `user:password`, an empty password
    /// included (RFC 7617), and the URL they leave has no user info.
    #[test]
    fn user_info_without_a_password_gets_an_empty_one() {
        for (url, credentials) in [
            ("http://bot:pw@h:1/x", "Basic Ym90OnB3"), // bot:pw
            ("http://bot:@h:1/x", "Basic Ym90Og=="),   // bot:
            ("http://bot@h:1/x", "Basic Ym90Og=="),    // bot:
            ("http://@h:1/x", "Basic Og=="),           // :
            ("http://[::1]:1/x", ""),
        ] {
            let target = Target::parse(url).unwrap();
            let sent = target.authorization.as_ref().map(|v| v.to_str().unwrap());
            assert_eq!(sent.unwrap_or_default(), credentials, "{url}");
            assert!(!target.uri.to_string().contains('@'), "{url}");
        }
    }
}
