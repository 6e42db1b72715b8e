//! Upstream health: active checks, passive ejection and the readiness gate.
//!
//! Owns:
//! - [`Health`]: the health of each upstream of each version.
//! - [`run_checks`]: the background task that probes every upstream of the
//!   live table (the shadow's too).
//! - The rules of SPEC section 10:
//!   - an upstream is marked unhealthy after `unhealthy_threshold` failed
//!     probes, and healthy again after `healthy_threshold` good ones;
//!   - it is ejected for `eject_for` after `eject_after_errors` consecutive
//!     failed exchanges (no connection, a timeout, a reset) or 5xx answers
//!     on real traffic;
//!   - every canary (from the config or the state file on start, or
//!     installed at run time) starts unhealthy, so it gets no traffic until
//!     one of its upstreams passes a probe ([`probe_gated`] probes the one
//!     there on start before the proxy accepts, and [`run_checks`] every
//!     second until it passes); so does an upstream added to an open
//!     canary. A canary installed again under its own name keeps
//!     what was learnt of the upstreams it keeps (`table::Version::new`).
//! - The log line of each change of verdict, with why the probe failed.
//! - [`write_gauges`]: the `cohort_upstream_healthy` lines of a scrape.
//!
//! Does not own: choosing among upstreams (`table::Version::pick`), the
//! fallback to stable (`table::RouteTable::canary_may_fall_back`, and
//! `proxy` for a request that no canary upstream takes), or
//! logging an ejection (`proxy`, which knows the request's version).

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http::header::USER_AGENT;
use http_body_util::{BodyExt as _, Empty};

use crate::config::HealthConfig;
use crate::proxy::ProxyError;
use crate::table::{RouteTable, Table, Version};
use crate::upstream::{UpstreamAddr, UpstreamClient};

/// Milliseconds since the first call in this process: a cheap monotonic clock
/// that fits in an atomic.
#[must_use]
pub fn now_ms() -> u64 {
    u64::try_from(crate::clock::since_start().as_millis()).unwrap_or(u64::MAX)
}

/// The health of one upstream of one version. Updated with relaxed atomics:
/// each field is a hint for routing, and a request that reads a stale value
/// is at worst sent where the previous one was.
#[derive(Debug)]
pub struct Health {
    healthy: AtomicBool,
    good_probes: AtomicU32,
    bad_probes: AtomicU32,
    /// Consecutive failed exchanges or 5xx answers on real traffic.
    errors: AtomicU32,
    ejected_until_ms: AtomicU64,
    /// When the last active probe started (0: never). Kept rather than when
    /// the next is due, so a shorter `health.interval` applies at once.
    probed_at_ms: AtomicU64,
    /// Set for a canary's upstreams (however it was installed) until their
    /// first good probe, which alone opens them (the readiness gate).
    gated: AtomicBool,
    /// Set while a probe is out, so a slow upstream is never probed twice at once.
    probing: AtomicBool,
}

/// A change of an upstream's verdict by its probes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    /// Its first good probe: a gated upstream may take traffic.
    Opened,
    /// Healthy again after `healthy_threshold` good probes.
    Healthy,
    /// Out after `unhealthy_threshold` failed probes.
    Unhealthy,
    /// A gated upstream's first `unhealthy_threshold` probes all failed.
    NotOpened,
}

impl Verdict {
    /// Logs the change, with why the last probe failed (`cause`) when it
    /// did; an upstream going out is a warning.
    fn log(self, version: &str, upstream: &UpstreamAddr, cause: Option<&str>) {
        let cause = cause.unwrap_or("-");
        match self {
            Verdict::Opened => tracing::info!(
                version,
                %upstream,
                "upstream passed its first health probe; it takes traffic"
            ),
            Verdict::Healthy => {
                tracing::info!(version, %upstream, "upstream is healthy again");
            }
            Verdict::Unhealthy => {
                tracing::warn!(version, %upstream, cause, "upstream failed its health probes; it takes no traffic");
            }
            Verdict::NotOpened => tracing::warn!(
                version,
                %upstream,
                cause,
                "upstream has not passed a health probe yet; it takes no traffic until one passes"
            ),
        }
    }
}

/// One upstream's health as reported in `GET /admin/state`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Report {
    pub upstream: String,
    pub healthy: bool,
    pub ejected: bool,
}

impl Health {
    /// `healthy` is the starting verdict: true for the stable version and
    /// the shadow, false for a canary (the readiness gate).
    #[must_use]
    pub fn new(healthy: bool) -> Health {
        Health {
            healthy: AtomicBool::new(healthy),
            good_probes: AtomicU32::new(0),
            bad_probes: AtomicU32::new(0),
            errors: AtomicU32::new(0),
            ejected_until_ms: AtomicU64::new(0),
            probed_at_ms: AtomicU64::new(0),
            gated: AtomicBool::new(!healthy),
            probing: AtomicBool::new(false),
        }
    }

    /// Whether requests may go to this upstream now. Every request asks, so
    /// the clock is read only while an ejection is recorded, and one found
    /// over is cleared (unless a new one replaced it meanwhile).
    #[must_use]
    pub fn is_available(&self) -> bool {
        if !self.healthy.load(Ordering::Relaxed) {
            return false;
        }
        let until = self.ejected_until_ms.load(Ordering::Relaxed);
        if until == 0 {
            return true;
        }
        let over = until <= now_ms();
        if over {
            // Fails harmlessly if a new ejection was recorded meanwhile.
            let _ = self.ejected_until_ms.compare_exchange(
                until,
                0,
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
        }
        over
    }

    /// Whether the active checks pass, ejected or not.
    #[must_use]
    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// Whether the upstream has yet to pass its first probe (the readiness gate).
    #[must_use]
    pub fn is_gated(&self) -> bool {
        self.gated.load(Ordering::Relaxed)
    }

    /// Whether the upstream waits at the readiness gate without a probe
    /// answered yet: nothing is known of it.
    #[must_use]
    pub fn is_unprobed(&self) -> bool {
        self.is_gated()
            && self.good_probes.load(Ordering::Relaxed) == 0
            && self.bad_probes.load(Ordering::Relaxed) == 0
    }

    /// Counts the outcome of a real request: consecutive failures eject.
    /// True when this one ejected the upstream, which was not ejected
    /// already, so the caller can say so once.
    pub fn record_outcome(&self, ok: bool, config: &HealthConfig) -> bool {
        if ok {
            if self.errors.load(Ordering::Relaxed) != 0 {
                self.errors.store(0, Ordering::Relaxed);
            }
            return false;
        }
        if self.errors.fetch_add(1, Ordering::Relaxed) + 1 < config.eject_after_errors {
            return false;
        }
        self.errors.store(0, Ordering::Relaxed);
        let now = now_ms();
        let until =
            now.saturating_add(u64::try_from(config.eject_for.as_millis()).unwrap_or(u64::MAX));
        self.ejected_until_ms.swap(until, Ordering::Relaxed) <= now
    }

    /// Counts the outcome of an active probe; says whether it changed the
    /// verdict, for the log.
    fn record_probe(&self, ok: bool, config: &HealthConfig) -> Option<Verdict> {
        if ok {
            self.bad_probes.store(0, Ordering::Relaxed);
            let good = self.good_probes.fetch_add(1, Ordering::Relaxed) + 1;
            // A gated upstream opens on its first good probe; a failed one needs the threshold.
            let opened = self.gated.swap(false, Ordering::Relaxed);
            let threshold = if opened { 1 } else { config.healthy_threshold };
            if good >= threshold && !self.healthy.swap(true, Ordering::Relaxed) {
                // Back in service (a restarted pod, say) with a clean
                // slate: errors from before its outage do not count
                // towards ejecting it now, as Envoy's outlier detection
                // forgets them when a host returns.
                self.ejected_until_ms.store(0, Ordering::Relaxed);
                self.errors.store(0, Ordering::Relaxed);
                return Some(if opened {
                    Verdict::Opened
                } else {
                    Verdict::Healthy
                });
            }
        } else {
            self.good_probes.store(0, Ordering::Relaxed);
            let bad = self.bad_probes.fetch_add(1, Ordering::Relaxed) + 1;
            if bad >= config.unhealthy_threshold && self.healthy.swap(false, Ordering::Relaxed) {
                return Some(Verdict::Unhealthy);
            }
            // Said once, when the threshold is reached, not at every probe.
            if bad == config.unhealthy_threshold && self.gated.load(Ordering::Relaxed) {
                return Some(Verdict::NotOpened);
            }
        }
        None
    }

    #[must_use]
    pub fn report(&self, upstream: String) -> Report {
        Report {
            upstream,
            healthy: self.healthy.load(Ordering::Relaxed),
            ejected: self.ejected_until_ms.load(Ordering::Relaxed) > now_ms(),
        }
    }
}

/// Appends `cohort_upstream_healthy` to a Prometheus text exposition: one
/// series per upstream of each version in `table`, 1 when it may take
/// traffic (it passes its health checks and is not ejected), else 0.
///
/// Read from the table at scrape time rather than recorded, so the series
/// of an upstream or a version that leaves the table (a replaced canary, the
/// stable version before a promotion, a removed shadow) leave the scrape
/// with it. A recorded gauge would stay at its last value until a restart,
/// and a canary replaced after a rollback usually leaves a 0 behind: an
/// alert that never clears.
pub fn write_gauges(table: &RouteTable, out: &mut String) {
    let name = crate::metrics::UPSTREAM_HEALTHY;
    if !out.is_empty() && !out.ends_with('\n') {
        out.push('\n');
    }
    out.push_str(&format!(
        "# HELP {name} 1 when the upstream passes its health checks and is not ejected, else 0.\n\
         # TYPE {name} gauge\n"
    ));
    // A series appears once even if two cohorts carry the same version name.
    let mut written: Vec<(&str, String)> = Vec::new();
    for version in table.versions() {
        for (upstream, health) in version.upstreams.iter().zip(&version.health) {
            let upstream = upstream.to_string();
            if written
                .iter()
                .any(|(v, u)| *v == version.name && *u == upstream)
            {
                continue;
            }
            out.push_str(&format!(
                "{name}{{version=\"{}\",upstream=\"{}\"}} {}\n",
                label_value(&version.name),
                label_value(&upstream),
                u8::from(health.is_available())
            ));
            written.push((&version.name, upstream));
        }
    }
}

/// A label value escaped for the text exposition format.
fn label_value(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

type ProbeClient = UpstreamClient<Empty<Bytes>>;

/// Probes every upstream of the live table until `shutdown` resolves. New
/// versions are probed at once; the others every `health.interval`, and an
/// upstream held back until its first good probe every second at least. The
/// `[health]` settings are the live table's, so a reloaded config applies
/// from the next probe on.
pub async fn run_checks(
    table: std::sync::Arc<Table>,
    tls: std::sync::Arc<rustls::ClientConfig>,
    shutdown: impl Future<Output = ()>,
) {
    // Probes speak to each upstream the way requests do (HTTP/1.1, h2c or
    // TLS), and connect within the probe timeout: a new one makes a new client.
    let mut timeout = table.snapshot().policy.health.timeout;
    let mut client: ProbeClient =
        crate::upstream::probe_client(timeout, std::sync::Arc::clone(&tls));
    tokio::pin!(shutdown);
    loop {
        let snapshot = table.snapshot();
        let config = &snapshot.policy.health;
        if config.timeout != timeout {
            timeout = config.timeout;
            client = crate::upstream::probe_client(timeout, std::sync::Arc::clone(&tls));
        }
        for version in snapshot.versions() {
            probe_due(&client, version, config);
        }
        // Short enough that a new canary is probed promptly, long enough to cost nothing.
        let tick = config.interval.min(Duration::from_millis(200));
        tokio::select! {
            () = tokio::time::sleep(tick) => {}
            () = &mut shutdown => return,
        }
    }
}

/// Probes the gated upstreams of the live table's canary once, all at
/// once, within `config.timeout`: a gated upstream that answers is open
/// when this returns.
pub async fn probe_gated(
    table: &Table,
    config: &HealthConfig,
    tls: &std::sync::Arc<rustls::ClientConfig>,
) {
    let snapshot = table.snapshot();
    let Some(canary) = &snapshot.canary else {
        return;
    };
    let version = &canary.version;
    let client: ProbeClient =
        crate::upstream::probe_client(config.timeout, std::sync::Arc::clone(tls));
    let probes = version
        .upstreams
        .iter()
        .zip(version.health.iter())
        .filter(|(_, health)| health.gated.load(Ordering::Relaxed))
        .map(|(upstream, health)| {
            let uri = probe_uri(upstream, config);
            let client = &client;
            async move {
                let Some(probed) = probe(client, upstream, &uri, config.timeout).await else {
                    return;
                };
                if let Some(verdict) = health.record_probe(probed.is_ok(), config) {
                    verdict.log(&version.name, upstream, probed.err().as_deref());
                }
            }
        });
    futures_util::future::join_all(probes).await;
}

/// The most an upstream held back until its first good probe waits for
/// the next one (`health.interval`, if that is shorter): it takes no
/// traffic until then, so a canary whose container comes up just after a
/// probe is not kept from its cohort for a whole interval, as Envoy's
/// `unhealthy_interval` allows.
const GATED_INTERVAL: Duration = Duration::from_secs(1);

/// Starts a probe of each upstream of `version` whose turn has come.
fn probe_due(client: &ProbeClient, version: &std::sync::Arc<Version>, config: &HealthConfig) {
    let now = now_ms();
    for (index, upstream) in version.upstreams.iter().enumerate() {
        let health = &version.health[index];
        let interval = if health.gated.load(Ordering::Relaxed) {
            config.interval.min(GATED_INTERVAL)
        } else {
            config.interval
        };
        let interval = u64::try_from(interval.as_millis()).unwrap_or(u64::MAX);
        let probed_at = health.probed_at_ms.load(Ordering::Relaxed);
        let too_soon = probed_at != 0 && now < probed_at.saturating_add(interval);
        if too_soon || health.probing.swap(true, Ordering::Relaxed) {
            continue;
        }
        health.probed_at_ms.store(now.max(1), Ordering::Relaxed);
        let uri = probe_uri(upstream, config);
        let (client, upstream, version, config) = (
            client.clone(),
            upstream.clone(),
            std::sync::Arc::clone(version),
            config.clone(),
        );
        tokio::spawn(async move {
            let probed = probe(&client, &upstream, &uri, config.timeout).await;
            let health = &version.health[index];
            if let Some(probed) = probed
                && let Some(verdict) = health.record_probe(probed.is_ok(), &config)
            {
                verdict.log(&version.name, &upstream, probed.err().as_deref());
            }
            health.probing.store(false, Ordering::Relaxed);
        });
    }
}

/// What a probe of `upstream` asks for.
fn probe_uri(upstream: &UpstreamAddr, config: &HealthConfig) -> String {
    format!(
        "{}://{}{}",
        upstream.scheme(),
        upstream.authority,
        config.path
    )
}

/// One probe: any HTTP answer below 500 within the timeout is healthy, so an
/// upstream without a health endpoint (404) still counts as up. A failure
/// says why, for the log: an operator sees a TLS name mismatch or a refused
/// connection there, not only that the probe failed. `None` when the proxy
/// could not send it for want of its own descriptors or memory: no verdict
/// on the upstream either way.
async fn probe(
    client: &ProbeClient,
    upstream: &UpstreamAddr,
    uri: &str,
    timeout: Duration,
) -> Option<Result<(), String>> {
    let req = match Request::get(uri)
        .header(USER_AGENT, "cohort-health-check")
        .body(Empty::new())
    {
        Ok(req) => req,
        Err(error) => return Some(Err(format!("cannot build the probe request: {error}"))),
    };
    let deadline = tokio::time::Instant::now() + timeout;
    let rsp = match tokio::time::timeout_at(deadline, client.request(upstream, req)).await {
        Ok(Ok(rsp)) => rsp,
        Ok(Err(failed)) => {
            return match ProxyError::from_upstream(&failed.error) {
                // The proxy's own shortage says nothing of the upstream.
                error @ ProxyError::OutOfResources(_) => {
                    tracing::warn!(%upstream, %error, "health probe not sent");
                    None
                }
                error => Some(Err(error.to_string())),
            };
        }
        Err(_) => return Some(Err(format!("no answer within {timeout:?}"))),
    };
    let status = rsp.status();
    // Read the (small) answer to the end within the same time, so the
    // connection is reused by the next probe; the verdict is the status's.
    let mut body = http_body_util::Limited::new(rsp.into_body(), PROBE_BODY_LIMIT);
    let _ = tokio::time::timeout_at(deadline, async {
        while let Some(Ok(_)) = body.frame().await {}
    })
    .await;
    if status.as_u16() >= 500 {
        return Some(Err(format!("answered {status}")));
    }
    Some(Ok(()))
}

/// How much of a health answer is read; the rest is left unread.
const PROBE_BODY_LIMIT: usize = 64 * 1024;

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;
    use std::time::Duration;

    use super::{Health, label_value};
    use crate::config::{CanaryUnavailable, HealthConfig};

    fn ejecting(after_errors: u32, eject_for: Duration) -> HealthConfig {
        HealthConfig {
            path: "/health".to_owned(),
            interval: Duration::from_secs(5),
            timeout: Duration::from_secs(1),
            healthy_threshold: 2,
            unhealthy_threshold: 3,
            eject_after_errors: after_errors,
            eject_for,
            canary_unavailable: CanaryUnavailable::Stable,
        }
    }

    #[test]
    fn consecutive_errors_eject_once_until_the_ejection_is_over() {
        let config = ejecting(2, Duration::from_secs(3600));
        let health = Health::new(true);
        assert!(health.is_available());
        assert!(
            !health.record_outcome(false, &config),
            "one error is not enough"
        );
        assert!(health.record_outcome(false, &config), "the second ejects");
        assert!(!health.is_available());
        assert!(health.is_healthy(), "ejection is not a failed health check");
        // Ejected already: not said again.
        health.record_outcome(false, &config);
        assert!(!health.record_outcome(false, &config));
        assert!(!health.is_available());
    }

    /// Real requests that failed before an upstream's outage do not count
    /// towards ejecting it once the probes bring it back.
    #[test]
    fn an_upstream_back_from_an_outage_starts_a_fresh_error_count() {
        let config = ejecting(5, Duration::from_secs(3600));
        let health = Health::new(true);
        for _ in 0..4 {
            assert!(!health.record_outcome(false, &config));
        }
        for _ in 0..config.unhealthy_threshold {
            health.record_probe(false, &config);
        }
        assert!(!health.is_healthy());
        for _ in 0..config.healthy_threshold {
            health.record_probe(true, &config);
        }
        assert!(health.is_healthy());
        for error in 1..5 {
            assert!(
                !health.record_outcome(false, &config),
                "ejected at error {error} of 5 after its return"
            );
        }
        assert!(health.record_outcome(false, &config), "the fifth ejects");
    }

    #[test]
    fn an_ejection_found_over_is_cleared() {
        let health = Health::new(true);
        // An ejection that ended at the clock's first millisecond.
        health.ejected_until_ms.store(1, Ordering::Relaxed);
        while super::now_ms() < 1 {
            std::hint::spin_loop();
        }
        assert!(health.is_available());
        assert_eq!(
            health.ejected_until_ms.load(Ordering::Relaxed),
            0,
            "cleared, so later looks read no clock"
        );
        assert!(!health.report(String::new()).ejected);
        // A new ejection is said again.
        assert!(health.record_outcome(false, &ejecting(1, Duration::from_secs(3600))));
        assert!(!health.is_available());
    }

    #[test]
    fn label_values_are_escaped_for_the_text_format() {
        assert_eq!(label_value("127.0.0.1:9001"), "127.0.0.1:9001");
        assert_eq!(label_value(r#"a"b\c"#), r#"a\"b\\c"#);
        assert_eq!(label_value("a\nb"), r"a\nb");
    }
}
