//! Configuration: TOML text -> raw serde structs -> `validate()` -> [`Config`].
//!
//! Owns: the whole schema of SPEC section 7 (every table, including those for
//! rollouts, TLS, health and shadow traffic, so a config written for them is
//! never rejected), the defaults, and the problems a config can have, each
//! named by its dotted key, including a file it names that cannot be used
//! ([`Config::check_files`]) and the admin token read from one
//! ([`AdminConfig::token`]). Does not own: what the values do at run time.
//!
//! Parsing happens in two steps. Serde rejects unknown keys and wrong types;
//! `validate` then checks every value and reports *all* problems at once, so
//! `cohort check` can list every mistake in one run.

use std::collections::HashSet;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::HeaderName;
use serde::Deserialize;

use crate::files::{Pipes, read_text};
use crate::routing::{KeySource, Weight};
use crate::shadow::SHADOW_PROTOCOL;
use crate::tls::{ServerTls, TlsError};
use crate::upstream::{Protocol, UpstreamAddr};

/// A validated configuration: every value typed and in range.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: ListenConfig,
    pub upstream: UpstreamConfig,
    pub routing: RoutingConfig,
    pub versions: VersionsConfig,
    pub admin: AdminConfig,
    pub state: StateConfig,
    pub metrics: MetricsConfig,
    pub rollout: Option<RolloutConfig>,
    pub health: HealthConfig,
    pub shadow: Option<ShadowConfig>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ListenConfig {
    pub addr: SocketAddr,
    /// Worker threads; `0` in the file means one per core and is resolved here.
    pub workers: usize,
    pub drain_timeout: Duration,
    pub header_read_timeout: Duration,
    /// How long an idle keep-alive client connection is kept open.
    pub keepalive_timeout: Duration,
    /// How long a client may take nothing of what is being written to it.
    pub send_timeout: Duration,
    /// How long an upgraded connection (a WebSocket) may carry no byte
    /// either way before it is closed.
    pub tunnel_idle_timeout: Duration,
    pub max_connections: usize,
    pub tls: Option<TlsConfig>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct TlsConfig {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub alpn: Vec<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct UpstreamConfig {
    pub connect_timeout: Duration,
    /// Time to the upstream's response headers; a streaming body is not cut.
    pub response_timeout: Duration,
    /// How long a response body may go without a byte from its upstream
    /// before it is cut; `None`: never.
    pub stream_idle_timeout: Option<Duration>,
    pub idle_timeout: Duration,
    pub max_idle_per_host: usize,
    pub ca_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fallback {
    /// Draw a random id, route by it and hand it to the client as a cookie.
    Cookie,
    /// The peer's IP address is the key.
    ClientIp,
    /// Keyless requests go to stable.
    Stable,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnRollback {
    /// Open streams and upgraded connections on the canary run on.
    Drain,
    /// They are closed at once.
    Close,
}

#[derive(Debug, Clone)]
pub struct RoutingConfig {
    pub salt: Option<String>,
    pub sticky_keys: Vec<KeySource>,
    pub fallback: Fallback,
    pub cookie_name: String,
    pub cookie_max_age: Duration,
    pub version_header: HeaderName,
    pub override_header: Option<HeaderName>,
    pub on_rollback: OnRollback,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct VersionConfig {
    pub name: String,
    pub upstreams: Vec<UpstreamAddr>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct VersionsConfig {
    pub stable: VersionConfig,
    pub canary: Option<(VersionConfig, Weight)>,
}

#[derive(Debug, Clone)]
pub struct AdminConfig {
    pub addr: SocketAddr,
    pub token_file: Option<PathBuf>,
    pub metrics_auth: bool,
}

#[derive(Debug, Clone)]
pub struct StateConfig {
    pub path: PathBuf,
    pub audit_log: PathBuf,
}

#[derive(Debug, Clone, Default)]
pub struct MetricsConfig {
    pub tokens_header: Option<HeaderName>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Stage {
    Weight { weight: Weight, duration: Duration },
    Pause,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnSuccess {
    Promote,
    Hold,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RolloutConfig {
    pub interval: Duration,
    pub failure_limit: u32,
    pub min_requests: u64,
    /// Evaluations in a row without enough data before a stage counts it as a failure.
    pub inconclusive_limit: u32,
    pub on_success: OnSuccess,
    pub stages: Vec<Stage>,
    pub guardrails: Guardrails,
    pub webhooks: Vec<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Guardrails {
    pub success_rate_min: Option<f64>,
    pub success_rate_drop_max: Option<f64>,
    pub p95_latency_ratio_max: Option<f64>,
    pub p95_latency_ms_max: Option<f64>,
    pub tokens_ratio_max: Option<f64>,
    pub eval_score_min: Option<f64>,
    pub confidence: f64,
}

impl Guardrails {
    /// Whether no guardrail is set: such a plan moves on by time alone.
    #[must_use]
    pub fn are_none(&self) -> bool {
        [
            self.success_rate_min,
            self.success_rate_drop_max,
            self.p95_latency_ratio_max,
            self.p95_latency_ms_max,
            self.tokens_ratio_max,
            self.eval_score_min,
        ]
        .iter()
        .all(Option::is_none)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CanaryUnavailable {
    Stable,
    Error,
}

#[derive(Debug, Clone)]
pub struct HealthConfig {
    pub path: String,
    pub interval: Duration,
    pub timeout: Duration,
    pub healthy_threshold: u32,
    pub unhealthy_threshold: u32,
    pub eject_after_errors: u32,
    pub eject_for: Duration,
    pub canary_unavailable: CanaryUnavailable,
}

#[derive(Debug, Clone)]
pub struct ShadowConfig {
    pub name: String,
    pub upstreams: Vec<UpstreamAddr>,
    pub percent: Weight,
    pub max_body: u64,
    pub methods: Vec<http::Method>,
}

/// Why a configuration could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Syntax { path: String, message: String },
    #[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"))]
    Invalid(Vec<Problem>),
}

/// One invalid value, named by its dotted key (`versions.canary.weight`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub key: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.key, self.message)
    }
}

// === impl Config ===

impl Config {
    /// Reads and validates the file at `path`; a pipe only if `pipes`
    /// allows (`cohort check --config <(envsubst < cohort.toml.in)` is read
    /// once, for a person waiting; `serve` reads it again on SIGHUP).
    pub fn load(path: &Path, pipes: Pipes) -> Result<Config, ConfigError> {
        let text = read_text(path, pipes).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Config::parse(&text, &path.display().to_string())
    }

    /// Parses and validates TOML text; `origin` names it in syntax errors.
    pub fn parse(text: &str, origin: &str) -> Result<Config, ConfigError> {
        // One line, placed like a value of the wrong type, so that the
        // reload log and `cohort check` print the same text:
        // `duplicate key: found `name` (line 3, column 1)`.
        let syntax = |e: toml::de::Error| {
            let found = e
                .span()
                .and_then(|span| text.get(span))
                .filter(|found| !found.is_empty() && found.len() <= 64 && !found.contains('\n'))
                .map(|found| format!(": found `{found}`"))
                .unwrap_or_default();
            ConfigError::Syntax {
                path: origin.to_owned(),
                message: format!("{}{found}{}", e.message().trim_end(), place(text, e.span())),
            }
        };
        let document = toml::de::Deserializer::parse(text).map_err(syntax)?;
        // Unknown keys are collected, not fatal at once, so that they are
        // reported by their full path together with every other problem.
        let mut unknown = Vec::new();
        let mut note_unknown = |path: serde_ignored::Path<'_>| unknown.push(dotted_key(&path));
        let document = serde_ignored::Deserializer::new(document, &mut note_unknown);
        let raw: raw::Config =
            serde_path_to_error::deserialize(document).map_err(|error| ConfigError::Syntax {
                path: origin.to_owned(),
                message: keyed_toml_error(text, &error),
            })?;
        raw.validate(unknown).map_err(ConfigError::Invalid)
    }

    /// Reads every file the config names, as `serve` does as it starts (the
    /// admin token, the listener's certificate and key, the upstream CA
    /// file), and returns every one it cannot use, named by its key.
    /// [`Config::load`] reads only the config itself; `cohort check` runs both.
    #[must_use]
    pub fn check_files(&self) -> Vec<Problem> {
        let from_tls = |error: TlsError| Problem {
            key: error.key.to_owned(),
            message: error.kind.to_string(),
        };
        let mut problems: Vec<Problem> = self.admin.token().err().into_iter().collect();
        if let Some(tls) = &self.listen.tls {
            problems.extend(ServerTls::check(tls).into_iter().map(from_tls));
        }
        if let Some(ca_file) = &self.upstream.ca_file
            && let Err(error) = crate::tls::client_config(Some(ca_file))
        {
            problems.push(from_tls(error));
        }
        problems
    }
}

impl AdminConfig {
    /// The admin API's bearer token: the contents of `admin.token_file`,
    /// else `COHORT_ADMIN_TOKEN`, else none (then the listener is on
    /// loopback, which `validate` checks). Surrounding whitespace is not
    /// part of it. A file that cannot be read, an empty token, or one that
    /// no `Authorization` header could carry (every admin call would then be
    /// refused) is a problem named by where the token comes from.
    pub fn token(&self) -> Result<Option<String>, Problem> {
        if let Some(path) = &self.token_file {
            return read_token_file(path, Pipes::Refused)
                .map(Some)
                .map_err(|error| Problem {
                    key: "admin.token_file".to_owned(),
                    message: match error {
                        TokenFileError::Unreadable(error) => {
                            format!("cannot read {}: {error}", path.display())
                        }
                        TokenFileError::Empty => format!("{} holds no token", path.display()),
                        TokenFileError::Unsendable => {
                            format!("the token in {} {UNSENDABLE_TOKEN}", path.display())
                        }
                    },
                });
        }
        let problem = |message: String| Problem {
            key: TOKEN_ENV.to_owned(),
            message,
        };
        match std::env::var(TOKEN_ENV) {
            Ok(token) if token.trim().is_empty() => Err(problem("is set but empty".to_owned())),
            Ok(token) if !is_sendable_token(token.trim()) => {
                Err(problem(format!("the token {UNSENDABLE_TOKEN}")))
            }
            Ok(token) => Ok(Some(token.trim().to_owned())),
            // Set, so meant as the token, but no header could carry it.
            Err(std::env::VarError::NotUnicode(_)) => {
                Err(problem(format!("the token {UNSENDABLE_TOKEN}")))
            }
            Err(std::env::VarError::NotPresent) => Ok(None),
        }
    }
}

/// The variable that holds the admin token, for the server as for `cohort ctl`.
pub const TOKEN_ENV: &str = "COHORT_ADMIN_TOKEN";

/// Why a token is refused that [`is_sendable_token`] refuses.
const UNSENDABLE_TOKEN: &str = "holds a character that cannot be sent in an HTTP header \
     (such as a newline, or a letter outside ASCII), so every admin call would be refused";

/// Whether `token` can travel in an `Authorization: Bearer` header and be
/// read back by the admin listener: printable ASCII, spaces and tabs. A
/// newline (a token file of two lines) could not be sent at all, and the
/// admin listener reads the header as ASCII, so any other byte could never
/// match.
#[must_use]
pub fn is_sendable_token(token: &str) -> bool {
    token
        .bytes()
        .all(|b| b == b'\t' || (b' '..=b'~').contains(&b))
}

/// Why a token file gave no token.
#[derive(Debug)]
pub enum TokenFileError {
    Unreadable(std::io::Error),
    /// It holds nothing but whitespace.
    Empty,
    /// The token holds a character no header could carry ([`is_sendable_token`]).
    Unsendable,
}

/// The bearer token in the file at `path`, read alike by the server
/// (`admin.token_file`) and `cohort ctl` (`--token-file`): surrounding
/// whitespace is not part of it, and a file that holds nothing else, or
/// a token that could not be sent, is an error. Each caller words the
/// error for its own user.
pub fn read_token_file(path: &Path, pipes: Pipes) -> Result<String, TokenFileError> {
    let text = read_text(path, pipes).map_err(TokenFileError::Unreadable)?;
    let token = text.trim();
    if token.is_empty() {
        return Err(TokenFileError::Empty);
    }
    if !is_sendable_token(token) {
        return Err(TokenFileError::Unsendable);
    }
    Ok(token.to_owned())
}

/// Whether two listeners on `a` and `b` would take the same port: the same
/// fixed port on the same address, or on any address when one of them is
/// the wildcard (`[::]` takes IPv4 too, `0.0.0.0` only IPv4).
fn shares_port(a: SocketAddr, b: SocketAddr) -> bool {
    let covers = |wild: SocketAddr, other: SocketAddr| {
        wild.ip().is_unspecified() && (wild.is_ipv6() || other.is_ipv4())
    };
    a.port() != 0 && a.port() == b.port() && (a.ip() == b.ip() || covers(a, b) || covers(b, a))
}

/// A value of the wrong type, named by its key and placed in the text:
/// `listen.workers: invalid type: string "one", expected usize (line 3, column 11)`.
fn keyed_toml_error(text: &str, error: &serde_path_to_error::Error<toml::de::Error>) -> String {
    let inner = error.inner();
    let place = place(text, inner.span());
    keyed("", error.path(), format!("{}{place}", inner.message()))
}

/// ` (line 3, column 11)`: where `span` starts in `text`; empty without a span.
fn place(text: &str, span: Option<std::ops::Range<usize>>) -> String {
    span.and_then(|span| text.get(..span.start))
        .map(|before| {
            let line_start = before.rfind('\n').map_or(0, |i| i + 1);
            let line = before.matches('\n').count() + 1;
            let column = before[line_start..].chars().count() + 1;
            format!(" (line {line}, column {column})")
        })
        .unwrap_or_default()
}

/// Whether `a` and `b` name one file however each is spelt (`s.json` and
/// `./s.json`, a relative and an absolute path, a linked directory, `..`):
/// compared after resolving each against the working directory, through
/// the links of the part that exists, and by name in the part that does not
/// exist yet.
fn names_one_file(a: &Path, b: &Path) -> bool {
    fn resolved(path: &Path) -> PathBuf {
        use std::path::Component;
        let absolute = std::path::absolute(path).unwrap_or_else(|_| path.to_owned());
        let parts: Vec<Component<'_>> = absolute.components().collect();
        // The longest leading part that exists (the root, at least).
        let (mut out, rest) = (0..=parts.len())
            .rev()
            .find_map(|i| {
                let existing: PathBuf = parts[..i].iter().collect();
                existing.canonicalize().ok().map(|real| (real, &parts[i..]))
            })
            .unwrap_or_else(|| (PathBuf::new(), &parts[..]));
        for part in rest {
            match part {
                Component::ParentDir => {
                    out.pop();
                }
                Component::CurDir => {}
                other => out.push(other),
            }
        }
        out
    }
    a == b || resolved(a) == resolved(b)
}

/// `message` prefixed with the key that `path` names under `prefix`
/// (`listen.workers: ...`, `rollout.failure_limit: ...`), or with `prefix`
/// alone when it is about the whole document. An unknown field is named by
/// the message itself, so that message is prefixed with the object the
/// field is in (`stages[1]`), not with the field's own name a second time.
pub(crate) fn keyed(
    prefix: &str,
    path: &serde_path_to_error::Path,
    message: impl fmt::Display,
) -> String {
    use serde_path_to_error::Segment;
    let message = message.to_string();
    // A place the parser could not name (`?`, as in `{bad`) says nothing.
    let mut segments: Vec<&Segment> = path
        .iter()
        .filter(|segment| !matches!(segment, Segment::Unknown))
        .collect();
    if message.starts_with("unknown field") {
        segments.pop();
    }
    let mut key = prefix.to_owned();
    for segment in segments {
        if !key.is_empty() && !matches!(segment, Segment::Seq { .. }) {
            key.push('.');
        }
        key.push_str(&segment.to_string());
    }
    if key.is_empty() {
        message
    } else {
        format!("{key}: {message}")
    }
}

/// Parses a duration written as `"250ms"`, `"30s"` or `"2h"`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let not_a_duration = |why: &dyn std::fmt::Display| {
        format!("{text:?} is not a duration such as \"250ms\", \"30s\" or \"2h\" ({why})")
    };
    // humantime reads "3 0s" as 30 seconds. A number may stand apart from
    // its unit ("30 s"), but not from another number, nor end the text.
    let parts: Vec<&str> = text.split_whitespace().collect();
    let ends_in_digit = |part: &str| part.ends_with(|c: char| c.is_ascii_digit());
    let starts_with_digit = |part: &str| part.starts_with(|c: char| c.is_ascii_digit());
    let number_alone = parts.last().is_some_and(|last| ends_in_digit(last))
        || parts
            .windows(2)
            .any(|pair| ends_in_digit(pair[0]) && starts_with_digit(pair[1]));
    if number_alone {
        return Err(not_a_duration(&"a number without a unit"));
    }
    let duration = humantime::parse_duration(text.trim()).map_err(|e| not_a_duration(&e))?;
    if duration > MAX_DURATION {
        return Err(format!(
            "{text:?} is longer than the 100 years a duration may be"
        ));
    }
    Ok(duration)
}

/// The longest duration any setting takes: far beyond a sensible one, and
/// short enough that adding it to a clock reading cannot overflow.
/// (A year of 365.25 days, as the duration syntax counts one.)
const MAX_DURATION: Duration = Duration::from_secs(100 * 31_557_600);

/// The shortest `rollout.interval`: each look writes the state file, and a
/// window's 60 slots of less would judge a fraction of a second. Refuses
/// `"30ms"` written for `"30s"`.
pub const MIN_ROLLOUT_INTERVAL: Duration = Duration::from_millis(100);

/// Parses a byte size written as `"512"`, `"64KiB"`, `"1MiB"`, `"1MB"` or `"2GiB"`.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let trimmed = text.trim();
    let split = trimmed
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(trimmed.len());
    let (digits, unit) = trimmed.split_at(split);
    let multiplier: u64 = match unit.trim() {
        "" | "B" => 1,
        "KB" => 1_000,
        "KiB" => 1 << 10,
        "MB" => 1_000_000,
        "MiB" => 1 << 20,
        "GB" => 1_000_000_000,
        "GiB" => 1 << 30,
        _ => {
            return Err(format!(
                "{text:?} is not a size such as \"64KiB\" or \"1MiB\""
            ));
        }
    };
    digits
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(multiplier))
        .ok_or_else(|| format!("{text:?} is not a size such as \"64KiB\" or \"1MiB\""))
}

/// The serde mirror of the file: every key optional, unknown keys refused.
mod raw {
    use super::*;

    #[derive(Debug, Default, Deserialize)]
    #[serde(expecting = "a table")]
    pub struct Config {
        #[serde(default)]
        listen: Listen,
        #[serde(default)]
        upstream: Upstream,
        #[serde(default)]
        routing: Routing,
        versions: Option<Versions>,
        #[serde(default)]
        admin: Admin,
        #[serde(default)]
        state: State,
        #[serde(default)]
        metrics: Metrics,
        rollout: Option<Rollout>,
        #[serde(default)]
        health: Health,
        shadow: Option<Shadow>,
    }

    #[derive(Debug, Default, Deserialize)]
    #[serde(expecting = "a table")]
    struct Listen {
        addr: Option<String>,
        workers: Option<usize>,
        drain_timeout: Option<String>,
        header_read_timeout: Option<String>,
        keepalive_timeout: Option<String>,
        send_timeout: Option<String>,
        tunnel_idle_timeout: Option<String>,
        max_connections: Option<usize>,
        tls: Option<Tls>,
    }

    /// `cert` and `key` are required, but optional here, so that a missing
    /// one is reported by its key with every other problem, as a missing
    /// `versions.stable.name` is, not as serde's "missing field".
    #[derive(Debug, Deserialize)]
    #[serde(expecting = "a table")]
    struct Tls {
        cert: Option<PathBuf>,
        key: Option<PathBuf>,
        alpn: Option<Vec<String>>,
    }

    #[derive(Debug, Default, Deserialize)]
    #[serde(expecting = "a table")]
    struct Upstream {
        connect_timeout: Option<String>,
        response_timeout: Option<String>,
        stream_idle_timeout: Option<String>,
        idle_timeout: Option<String>,
        max_idle_per_host: Option<usize>,
        ca_file: Option<PathBuf>,
    }

    #[derive(Debug, Default, Deserialize)]
    #[serde(expecting = "a table")]
    struct Routing {
        salt: Option<String>,
        sticky_keys: Option<Vec<String>>,
        fallback: Option<String>,
        cookie_name: Option<String>,
        cookie_max_age: Option<String>,
        version_header: Option<String>,
        override_header: Option<String>,
        on_rollback: Option<String>,
    }

    #[derive(Debug, Deserialize)]
    #[serde(expecting = "a table")]
    struct Versions {
        stable: Option<Version>,
        canary: Option<Version>,
    }

    #[derive(Debug, Deserialize)]
    #[serde(expecting = "a table")]
    struct Version {
        name: Option<String>,
        upstreams: Option<Vec<String>>,
        weight: Option<f64>,
    }

    #[derive(Debug, Default, Deserialize)]
    #[serde(expecting = "a table")]
    struct Admin {
        addr: Option<String>,
        token_file: Option<PathBuf>,
        metrics_auth: Option<bool>,
    }

    #[derive(Debug, Default, Deserialize)]
    #[serde(expecting = "a table")]
    struct State {
        path: Option<PathBuf>,
        audit_log: Option<PathBuf>,
    }

    #[derive(Debug, Default, Deserialize)]
    #[serde(expecting = "a table")]
    struct Metrics {
        tokens_header: Option<String>,
    }

    #[derive(Debug, Default, Deserialize)]
    #[serde(expecting = "a table (an object in JSON)")]
    pub struct Rollout {
        pub interval: Option<String>,
        pub failure_limit: Option<u32>,
        pub min_requests: Option<u64>,
        pub inconclusive_limit: Option<u32>,
        pub on_success: Option<String>,
        pub stages: Option<Vec<StageEntry>>,
        pub guardrails: Option<GuardrailLimits>,
        pub webhooks: Option<Vec<String>>,
    }

    #[derive(Debug, Deserialize)]
    #[serde(expecting = "a table (an object in JSON)")]
    pub struct StageEntry {
        pub weight: Option<f64>,
        pub duration: Option<String>,
        pub pause: Option<bool>,
    }

    #[derive(Debug, Default, Deserialize)]
    #[serde(expecting = "a table (an object in JSON)")]
    pub struct GuardrailLimits {
        pub success_rate_min: Option<f64>,
        pub success_rate_drop_max: Option<f64>,
        pub p95_latency_ratio_max: Option<f64>,
        pub p95_latency_ms_max: Option<f64>,
        pub tokens_ratio_max: Option<f64>,
        pub eval_score_min: Option<f64>,
        pub confidence: Option<f64>,
    }

    #[derive(Debug, Default, Deserialize)]
    #[serde(expecting = "a table")]
    struct Health {
        path: Option<String>,
        interval: Option<String>,
        timeout: Option<String>,
        healthy_threshold: Option<u32>,
        unhealthy_threshold: Option<u32>,
        eject_after_errors: Option<u32>,
        eject_for: Option<String>,
        canary_unavailable: Option<String>,
    }

    #[derive(Debug, Deserialize)]
    #[serde(expecting = "a table")]
    struct Shadow {
        name: Option<String>,
        upstreams: Option<Vec<String>>,
        percent: Option<f64>,
        max_body: Option<String>,
        methods: Option<Vec<String>>,
    }

    /// Collects problems while values are converted, so all are reported at once.
    #[derive(Default)]
    pub(super) struct Checker {
        pub problems: Vec<Problem>,
    }

    impl Checker {
        pub fn problem(&mut self, key: &str, message: impl Into<String>) {
            self.problems.push(Problem {
                key: key.to_owned(),
                message: message.into(),
            });
        }

        /// Converts `value` with `parse`, or records the problem and yields `default`.
        fn value<T, R>(
            &mut self,
            key: &str,
            value: Option<R>,
            default: T,
            parse: impl FnOnce(R) -> Result<T, String>,
        ) -> T {
            match value.map(parse) {
                None => default,
                Some(Ok(v)) => v,
                Some(Err(message)) => {
                    self.problem(key, message);
                    default
                }
            }
        }

        fn duration(&mut self, key: &str, value: Option<String>, default: Duration) -> Duration {
            self.value(key, value, default, |s| parse_duration(&s))
        }

        fn positive_duration(
            &mut self,
            key: &str,
            value: Option<String>,
            default: Duration,
        ) -> Duration {
            self.value(key, value, default, |s| {
                parse_duration(&s).and_then(|d| {
                    if d.is_zero() {
                        Err(format!("{s:?} must be longer than zero"))
                    } else {
                        Ok(d)
                    }
                })
            })
        }

        fn header(&mut self, key: &str, value: Option<String>) -> Option<HeaderName> {
            self.value(key, value, None, |s| {
                HeaderName::from_bytes(s.as_bytes())
                    .map(Some)
                    .map_err(|_| format!("{s:?} is not a valid header name"))
            })
        }

        /// A header the proxy sets or reads as its own: not one of HTTP's
        /// ([`HTTP_HEADERS`]) nor one the proxy writes for other reasons
        /// ([`PROXY_HEADERS`]).
        fn own_header(&mut self, key: &str, value: Option<String>) -> Option<HeaderName> {
            let name = self.header(key, value)?;
            let whose = if HTTP_HEADERS.contains(&name.as_str()) {
                "the proxy must leave to HTTP"
            } else if PROXY_HEADERS.contains(&name.as_str()) {
                "the proxy writes itself"
            } else {
                return Some(name);
            };
            let example = if key.ends_with("override_header") {
                "x-cohort"
            } else {
                "x-agent-version"
            };
            self.problem(
                key,
                format!("{name:?} is a header {whose}; choose another name, such as {example:?}"),
            );
            None
        }

        fn socket_addr(&mut self, key: &str, value: Option<String>, default: &str) -> SocketAddr {
            let default = default.parse().expect("default addresses are valid");
            self.value(key, value, default, |s| {
                s.parse()
                    .map_err(|_| format!("{s:?} is not an address such as \"127.0.0.1:8080\""))
            })
        }

        fn weight(&mut self, key: &str, value: Option<f64>) -> Option<Weight> {
            self.value(key, value, None, |w| Weight::from_percent(w).map(Some))
        }

        fn fraction(&mut self, key: &str, value: Option<f64>) -> Option<f64> {
            self.value(key, value, None, |v| {
                if (0.0..=1.0).contains(&v) {
                    Ok(Some(v))
                } else {
                    Err(format!("{v} is not within 0.0..=1.0"))
                }
            })
        }

        fn positive(&mut self, key: &str, value: Option<f64>) -> Option<f64> {
            self.value(key, value, None, |v| {
                if v.is_finite() && v > 0.0 {
                    Ok(Some(v))
                } else {
                    Err(format!("{v} must be a number above 0"))
                }
            })
        }

        fn at_least_one<N: PartialOrd + From<u8>>(
            &mut self,
            key: &str,
            value: Option<N>,
            default: N,
        ) -> N {
            self.value(key, value, default, |n| {
                if n >= N::from(1) {
                    Ok(n)
                } else {
                    Err("must be at least 1".to_owned())
                }
            })
        }

        /// A version's upstreams; `for_shadow`, `host:port` only, since
        /// copies go out over plain HTTP/1.1 (as `PUT /admin/shadow` checks too).
        fn upstreams(
            &mut self,
            key: &str,
            value: Option<Vec<String>>,
            for_shadow: bool,
        ) -> Vec<UpstreamAddr> {
            let Some(list) = value else {
                self.problem(key, "is required: a list such as [\"127.0.0.1:9001\"]");
                return Vec::new();
            };
            if list.is_empty() {
                self.problem(key, "must name at least one upstream");
            }
            // By address, as the admin API and the state file compare
            // them: a host's name is the same in any case.
            let mut seen = HashSet::new();
            let mut parsed = Vec::with_capacity(list.len());
            for (i, text) in list.iter().enumerate() {
                match UpstreamAddr::parse(text) {
                    Ok(addr) if !seen.insert(addr.clone()) => {
                        self.problem(&format!("{key}[{i}]"), format!("{text:?} is listed twice"))
                    }
                    Ok(addr) => {
                        if addr.protocol != Protocol::Http1 && for_shadow {
                            self.problem(&format!("{key}[{i}]"), SHADOW_PROTOCOL);
                        }
                        parsed.push(addr);
                    }
                    Err(message) => self.problem(&format!("{key}[{i}]"), message),
                }
            }
            parsed
        }

        /// A path that must be given, or the problem `key: is required`.
        fn required_path(
            &mut self,
            key: &str,
            value: Option<PathBuf>,
            what: &str,
        ) -> Option<PathBuf> {
            if value.is_none() {
                self.problem(key, format!("is required: the path of {what}"));
            }
            value
        }

        fn version_name(&mut self, key: &str, value: Option<String>) -> String {
            match value {
                None => {
                    self.problem(key, "is required");
                    String::new()
                }
                Some(name) => {
                    if let Err(message) = check_version_name(&name) {
                        self.problem(key, message);
                    }
                    name
                }
            }
        }
    }

    impl Config {
        pub fn validate(self, unknown: Vec<String>) -> Result<super::Config, Vec<Problem>> {
            let mut c = Checker::default();
            for key in unknown {
                c.problem(&key, "is not a known key");
            }

            let listen = validate_listen(&mut c, self.listen);
            let upstream = validate_upstream(&mut c, self.upstream);
            let routing = validate_routing(&mut c, self.routing);
            let versions = match self.versions {
                None => {
                    c.problem("versions.stable", "is required");
                    None
                }
                Some(v) => validate_versions(&mut c, v),
            };

            let admin = validate_admin(&mut c, self.admin, listen.addr);
            let state = validate_state(&mut c, self.state);
            let metrics = MetricsConfig {
                tokens_header: c.header("metrics.tokens_header", self.metrics.tokens_header),
            };
            if metrics.tokens_header.as_ref() == Some(&routing.version_header) {
                c.problem(
                    "metrics.tokens_header",
                    "must differ from routing.version_header, which the proxy sets itself on responses",
                );
            }
            let rollout = self.rollout.map(|r| validate_rollout(&mut c, "rollout", r));
            let health = validate_health(&mut c, self.health);
            let shadow = self
                .shadow
                .map(|s| validate_shadow(&mut c, s, versions.as_ref()));

            match versions {
                Some(versions) if c.problems.is_empty() => Ok(super::Config {
                    listen,
                    upstream,
                    routing,
                    versions,
                    admin,
                    state,
                    metrics,
                    rollout,
                    health,
                    shadow,
                }),
                _ => Err(c.problems),
            }
        }
    }

    fn validate_listen(c: &mut Checker, listen: Listen) -> ListenConfig {
        ListenConfig {
            addr: c.socket_addr("listen.addr", listen.addr, "0.0.0.0:8080"),
            workers: match listen.workers {
                None | Some(0) => std::thread::available_parallelism().map_or(1, |n| n.get()),
                Some(n) if n > MAX_WORKERS => {
                    c.problem(
                        "listen.workers",
                        format!("{n} is more than {MAX_WORKERS} threads; 0 is one per core"),
                    );
                    1
                }
                Some(n) => n,
            },
            drain_timeout: c.duration(
                "listen.drain_timeout",
                listen.drain_timeout,
                Duration::from_secs(30),
            ),
            header_read_timeout: c.positive_duration(
                "listen.header_read_timeout",
                listen.header_read_timeout,
                Duration::from_secs(10),
            ),
            // nginx's `keepalive_timeout` default.
            keepalive_timeout: c.positive_duration(
                "listen.keepalive_timeout",
                listen.keepalive_timeout,
                Duration::from_secs(75),
            ),
            // nginx's `send_timeout` default.
            send_timeout: c.positive_duration(
                "listen.send_timeout",
                listen.send_timeout,
                Duration::from_secs(60),
            ),
            // HAProxy's usual `timeout tunnel` for WebSockets; nginx
            // cuts one quiet for `proxy_read_timeout`, 60 s by default,
            // which closes an agent's socket between two turns.
            tunnel_idle_timeout: c.positive_duration(
                "listen.tunnel_idle_timeout",
                listen.tunnel_idle_timeout,
                Duration::from_secs(3600),
            ),
            max_connections: c.value(
                "listen.max_connections",
                listen.max_connections,
                10_000,
                |n| {
                    // The most a tokio semaphore holds; more would panic at start.
                    let most = tokio::sync::Semaphore::MAX_PERMITS;
                    if n == 0 {
                        Err("must be at least 1".into())
                    } else if n > most {
                        Err(format!("must be at most {most}"))
                    } else {
                        Ok(n)
                    }
                },
            ),
            tls: listen.tls.and_then(|tls| {
                let alpn = c.value(
                    "listen.tls.alpn",
                    tls.alpn,
                    vec!["h2".into(), "http/1.1".into()],
                    |list| match list.iter().find(|p| *p != "h2" && *p != "http/1.1") {
                        Some(p) => Err(format!("{p:?} is not one of \"h2\", \"http/1.1\"")),
                        None => Ok(list),
                    },
                );
                let cert = c.required_path("listen.tls.cert", tls.cert, "a PEM certificate chain");
                let key = c.required_path("listen.tls.key", tls.key, "a PEM private key");
                Some(TlsConfig {
                    cert: cert?,
                    key: key?,
                    alpn,
                })
            }),
        }
    }

    fn validate_upstream(c: &mut Checker, upstream: Upstream) -> UpstreamConfig {
        UpstreamConfig {
            connect_timeout: c.positive_duration(
                "upstream.connect_timeout",
                upstream.connect_timeout,
                Duration::from_secs(5),
            ),
            response_timeout: c.positive_duration(
                "upstream.response_timeout",
                upstream.response_timeout,
                Duration::from_secs(60),
            ),
            // "0s" turns it off.
            stream_idle_timeout: Some(c.duration(
                "upstream.stream_idle_timeout",
                upstream.stream_idle_timeout,
                Duration::from_secs(3600),
            ))
            .filter(|limit| !limit.is_zero()),
            idle_timeout: c.positive_duration(
                "upstream.idle_timeout",
                upstream.idle_timeout,
                Duration::from_secs(90),
            ),
            max_idle_per_host: upstream.max_idle_per_host.unwrap_or(256),
            ca_file: upstream.ca_file,
        }
    }

    fn validate_routing(c: &mut Checker, r: Routing) -> RoutingConfig {
        let routing = RoutingConfig {
            // An empty salt would be taken as one, not as "unset".
            salt: c.value("routing.salt", r.salt, None, |s| {
                if s.is_empty() {
                    Err("must not be empty; leave it out to salt with the canary's name".into())
                } else {
                    Ok(Some(s))
                }
            }),
            sticky_keys: match r.sticky_keys {
                None => vec![KeySource::Header(HeaderName::from_static("x-user-id"))],
                Some(list) => list
                    .iter()
                    .enumerate()
                    .filter_map(|(i, s)| match KeySource::parse(s) {
                        Ok(source) => Some(source),
                        Err(message) => {
                            c.problem(&format!("routing.sticky_keys[{i}]"), message);
                            None
                        }
                    })
                    .collect(),
            },
            fallback: c.value(
                "routing.fallback",
                r.fallback,
                Fallback::Cookie,
                |s| match s.as_str() {
                    "cookie" => Ok(Fallback::Cookie),
                    "client_ip" => Ok(Fallback::ClientIp),
                    "stable" => Ok(Fallback::Stable),
                    _ => Err(format!(
                        "{s:?} is not one of \"cookie\", \"client_ip\", \"stable\""
                    )),
                },
            ),
            cookie_name: c.value(
                "routing.cookie_name",
                r.cookie_name,
                "cohort_id".to_owned(),
                |s| {
                    if crate::routing::key::is_cookie_name(&s) {
                        Ok(s)
                    } else {
                        Err(format!("{s:?} is not a valid cookie name"))
                    }
                },
            ),
            // `Max-Age` counts whole seconds, and zero makes a browser
            // drop the cookie at once: a keyless user would draw a new
            // cohort on every request.
            cookie_max_age: c.value(
                "routing.cookie_max_age",
                r.cookie_max_age,
                Duration::from_secs(30 * 24 * 3600),
                |s| {
                    parse_duration(&s).and_then(|d| {
                        if d < Duration::from_secs(1) {
                            Err(format!(
                                "{s:?} must be at least 1s (Max-Age counts whole seconds)"
                            ))
                        } else {
                            Ok(d)
                        }
                    })
                },
            ),
            version_header: c
                .own_header("routing.version_header", r.version_header)
                .unwrap_or(HeaderName::from_static("x-agent-version")),
            override_header: c.own_header("routing.override_header", r.override_header),
            on_rollback: c.value(
                "routing.on_rollback",
                r.on_rollback,
                OnRollback::Drain,
                |s| match s.as_str() {
                    "drain" => Ok(OnRollback::Drain),
                    "close" => Ok(OnRollback::Close),
                    _ => Err(format!("{s:?} is not one of \"drain\", \"close\"")),
                },
            ),
        };

        if routing.override_header.as_ref() == Some(&routing.version_header) {
            c.problem(
                "routing.override_header",
                "must differ from routing.version_header, which the proxy sets itself",
            );
        }
        let read_for_keys = |header: &HeaderName| {
            routing
                .sticky_keys
                .iter()
                .any(|source| matches!(source, KeySource::Header(name) if name == header))
        };
        // A user whose key is "canary" would be forced onto it.
        if let Some(header) = routing
            .override_header
            .as_ref()
            .filter(|h| read_for_keys(h))
        {
            c.problem(
                "routing.override_header",
                format!(
                    "{:?} is a header routing.sticky_keys reads the user's key from; a user whose key is \"canary\" or \"stable\" would be forced there",
                    header.as_str()
                ),
            );
        }
        // The proxy writes the version over the client's value on the
        // upstream request: the user's key would never reach the agent.
        if read_for_keys(&routing.version_header) {
            c.problem(
                "routing.version_header",
                format!(
                    "{:?} is a header routing.sticky_keys reads the user's key from; the proxy would overwrite it with the version's name",
                    routing.version_header.as_str()
                ),
            );
        }
        routing
    }

    /// `[admin]`, with the rules that read the environment: the token may come from it.
    fn validate_admin(c: &mut Checker, raw: Admin, listen_addr: SocketAddr) -> AdminConfig {
        let admin = AdminConfig {
            addr: c.socket_addr("admin.addr", raw.addr, "127.0.0.1:9901"),
            token_file: raw.token_file,
            metrics_auth: raw.metrics_auth.unwrap_or(false),
        };
        if shares_port(admin.addr, listen_addr) {
            c.problem(
                "admin.addr",
                format!(
                    "{} takes the port of listen.addr {listen_addr}; the admin listener needs one of its own",
                    admin.addr
                ),
            );
        }
        // The rules that read the environment: the token may come from it.
        let no_token = admin.token_file.is_none() && std::env::var_os(TOKEN_ENV).is_none();
        if admin.metrics_auth && no_token {
            c.problem(
                "admin.metrics_auth",
                "needs a token to ask for: set admin.token_file or COHORT_ADMIN_TOKEN",
            );
        }
        if !admin.addr.ip().is_loopback() && no_token {
            c.problem(
                "admin.addr",
                format!(
                    "{} is not a loopback address, so the admin API needs a token: set admin.token_file or COHORT_ADMIN_TOKEN",
                    admin.addr
                ),
            );
        }
        admin
    }

    fn validate_state(c: &mut Checker, raw: State) -> StateConfig {
        let state = StateConfig {
            path: raw
                .path
                .unwrap_or_else(|| PathBuf::from("cohort-state.json")),
            audit_log: raw
                .audit_log
                .unwrap_or_else(|| PathBuf::from("cohort-audit.jsonl")),
        };

        for (key, path) in [
            ("state.path", &state.path),
            ("state.audit_log", &state.audit_log),
        ] {
            if path.file_name().is_none() {
                c.problem(
                    key,
                    format!("{:?} names no file", path.display().to_string()),
                );
            }
        }
        if names_one_file(&state.path, &state.audit_log) {
            c.problem(
                "state.audit_log",
                "must differ from state.path: the state file is rewritten whole, the log appended to",
            );
        }
        state
    }

    fn validate_health(c: &mut Checker, h: Health) -> HealthConfig {
        HealthConfig {
            path: c.value("health.path", h.path, "/health".to_owned(), |p| {
                if !p.starts_with('/') {
                    Err(format!("{p:?} is not a path starting with '/'"))
                } else if p.parse::<http::uri::PathAndQuery>().is_err() {
                    Err(format!(
                        "{p:?} is not a valid request path (spaces and other \
                         characters outside a URI must be percent-encoded)"
                    ))
                } else {
                    Ok(p)
                }
            }),
            interval: c.positive_duration("health.interval", h.interval, Duration::from_secs(5)),
            timeout: c.positive_duration("health.timeout", h.timeout, Duration::from_secs(1)),
            healthy_threshold: c.at_least_one("health.healthy_threshold", h.healthy_threshold, 2),
            unhealthy_threshold: c.at_least_one(
                "health.unhealthy_threshold",
                h.unhealthy_threshold,
                3,
            ),
            eject_after_errors: c.at_least_one(
                "health.eject_after_errors",
                h.eject_after_errors,
                5,
            ),
            eject_for: c.positive_duration(
                "health.eject_for",
                h.eject_for,
                Duration::from_secs(30),
            ),
            canary_unavailable: c.value(
                "health.canary_unavailable",
                h.canary_unavailable,
                CanaryUnavailable::Stable,
                |s| match s.as_str() {
                    "stable" => Ok(CanaryUnavailable::Stable),
                    "error" => Ok(CanaryUnavailable::Error),
                    _ => Err(format!("{s:?} is not one of \"stable\", \"error\"")),
                },
            ),
        }
    }

    fn validate_shadow(
        c: &mut Checker,
        s: Shadow,
        versions: Option<&VersionsConfig>,
    ) -> ShadowConfig {
        let shadow = ShadowConfig {
            name: c.version_name("shadow.name", s.name),
            upstreams: c.upstreams("shadow.upstreams", s.upstreams, true),
            // Required: a shadow with no share would mirror nothing,
            // silently.
            percent: match s.percent {
                None => {
                    c.problem(
                        "shadow.percent",
                        "is required: the share of requests to mirror, 0 to 100",
                    );
                    Weight::ZERO
                }
                percent => c.weight("shadow.percent", percent).unwrap_or(Weight::ZERO),
            },
            max_body: c.value("shadow.max_body", s.max_body, 1 << 20, |s| parse_size(&s)),
            methods: s.methods.map_or_else(
                || vec![http::Method::GET, http::Method::HEAD],
                |list| {
                    if list.is_empty() {
                        c.problem(
                            "shadow.methods",
                            "is empty: name at least one method, or remove [shadow]",
                        );
                    }
                    list.iter()
                        .enumerate()
                        .filter_map(|(i, m)| {
                            match http::Method::from_bytes(m.to_ascii_uppercase().as_bytes()) {
                                Ok(method) => Some(method),
                                Err(_) => {
                                    c.problem(
                                        &format!("shadow.methods[{i}]"),
                                        format!("{m:?} is not an HTTP method"),
                                    );
                                    None
                                }
                            }
                        })
                        .collect()
                },
            ),
        };

        if let Some(versions) = versions {
            let mut names = vec![&versions.stable.name];
            names.extend(versions.canary.as_ref().map(|(c, _)| &c.name));
            if names.contains(&&shadow.name) {
                c.problem(
                    "shadow.name",
                    format!("{:?} is already a version's name", shadow.name),
                );
            }
        }
        shadow
    }

    fn validate_versions(c: &mut Checker, v: Versions) -> Option<VersionsConfig> {
        let stable = match v.stable {
            None => {
                c.problem("versions.stable", "is required");
                None
            }
            Some(s) => {
                if s.weight.is_some() {
                    c.problem(
                        "versions.stable.weight",
                        "is not allowed: stable takes whatever the canary does not",
                    );
                }
                Some(VersionConfig {
                    name: c.version_name("versions.stable.name", s.name),
                    upstreams: c.upstreams("versions.stable.upstreams", s.upstreams, false),
                })
            }
        };
        let canary = v.canary.map(|s| {
            let version = VersionConfig {
                name: c.version_name("versions.canary.name", s.name),
                upstreams: c.upstreams("versions.canary.upstreams", s.upstreams, false),
            };
            let weight = c
                .weight("versions.canary.weight", s.weight)
                .unwrap_or(Weight::ZERO);
            (version, weight)
        });
        if let (Some(stable), Some((canary, _))) = (&stable, &canary)
            && stable.name == canary.name
            && !stable.name.is_empty()
        {
            c.problem(
                "versions.canary.name",
                format!("{:?} is also the stable version's name", canary.name),
            );
        }
        stable.map(|stable| VersionsConfig { stable, canary })
    }

    /// Validates a rollout plan; `prefix` is the key it sits under in the document.
    /// `[rollout]`, its keys named under `prefix` (none for a plan document).
    pub(super) fn validate_rollout(c: &mut Checker, prefix: &str, r: Rollout) -> RolloutConfig {
        let key = |k: &str| {
            if prefix.is_empty() {
                k.to_owned()
            } else {
                format!("{prefix}.{k}")
            }
        };
        let stages = match r.stages {
            None => {
                c.problem(
                    &key("stages"),
                    "is required: a list of { weight, duration } or { pause = true }",
                );
                Vec::new()
            }
            Some(list) => {
                if list.is_empty() {
                    c.problem(&key("stages"), "must hold at least one stage");
                }
                list.into_iter()
                    .enumerate()
                    .filter_map(|(i, s)| {
                        let k = format!("{}[{i}]", key("stages"));
                        match (s.pause, s.weight, s.duration) {
                            (Some(true), None, None) => Some(Stage::Pause),
                            (None | Some(false), Some(w), Some(d)) => {
                                let weight = c.weight(&format!("{k}.weight"), Some(w))?;
                                let duration =
                                    c.value(&format!("{k}.duration"), Some(d), None, |d| {
                                        parse_duration(&d).map(Some)
                                    })?;
                                Some(Stage::Weight { weight, duration })
                            }
                            _ => {
                                c.problem(
                                    &k,
                                    "must be either { weight, duration } or { pause = true }",
                                );
                                None
                            }
                        }
                    })
                    .collect()
            }
        };
        let g = r.guardrails.unwrap_or_default();
        let guardrails = Guardrails {
            success_rate_min: c.fraction(&key("guardrails.success_rate_min"), g.success_rate_min),
            success_rate_drop_max: c.fraction(
                &key("guardrails.success_rate_drop_max"),
                g.success_rate_drop_max,
            ),
            p95_latency_ratio_max: c.positive(
                &key("guardrails.p95_latency_ratio_max"),
                g.p95_latency_ratio_max,
            ),
            p95_latency_ms_max: c
                .positive(&key("guardrails.p95_latency_ms_max"), g.p95_latency_ms_max),
            tokens_ratio_max: c.positive(&key("guardrails.tokens_ratio_max"), g.tokens_ratio_max),
            eval_score_min: c.fraction(&key("guardrails.eval_score_min"), g.eval_score_min),
            confidence: c.value(&key("guardrails.confidence"), g.confidence, 0.95, |v| {
                if v > 0.5 && v < 1.0 {
                    Ok(v)
                } else {
                    Err(format!("{v} is not within 0.5..1.0 (exclusive)"))
                }
            }),
        };
        RolloutConfig {
            interval: c.value(&key("interval"), r.interval, Duration::from_secs(30), |s| {
                parse_duration(&s).and_then(|d| {
                    if d < MIN_ROLLOUT_INTERVAL {
                        Err(format!(
                            "{s:?} is shorter than {MIN_ROLLOUT_INTERVAL:?}: every look is saved to the state file"
                        ))
                    } else {
                        Ok(d)
                    }
                })
            }),
            failure_limit: c.at_least_one(&key("failure_limit"), r.failure_limit, 2),
            // A guardrail judged on no requests is judged on noise.
            min_requests: c.at_least_one(&key("min_requests"), r.min_requests, 200),
            inconclusive_limit: c.at_least_one(
                &key("inconclusive_limit"),
                r.inconclusive_limit,
                20,
            ),
            on_success: c.value(
                &key("on_success"),
                r.on_success,
                OnSuccess::Promote,
                |s| match s.as_str() {
                    "promote" => Ok(OnSuccess::Promote),
                    "hold" => Ok(OnSuccess::Hold),
                    _ => Err(format!("{s:?} is not one of \"promote\", \"hold\"")),
                },
            ),
            stages,
            guardrails,
            webhooks: {
                let urls = r.webhooks.unwrap_or_default();
                for (i, url) in urls.iter().enumerate() {
                    if let Err(message) = check_webhook_url(url) {
                        c.problem(&format!("{}[{i}]", key("webhooks")), message);
                    }
                }
                urls
            },
        }
    }
}

/// Validates a rollout plan given as JSON in the shape of the `[rollout]`
/// table (the admin API's `POST /admin/rollout` body). Problems name keys
/// as the document has them (`stages[0].weight`), not under `rollout.`.
///
/// A wrong type or an unknown key is a [`ConfigError::Syntax`]: the document
/// is malformed (SPEC section 3: 400). A value out of range is a
/// [`ConfigError::Invalid`] (422).
pub fn rollout_from_json(value: serde_json::Value) -> Result<RolloutConfig, ConfigError> {
    rollout_from_document(value)
}

/// The plan of a running rollout, as the state file keeps it: read as
/// [`rollout_from_json`] reads a new one, but so that a state an earlier
/// build saved still starts: an `interval` shorter than
/// [`MIN_ROLLOUT_INTERVAL`] is read as the floor, and a webhook this build
/// would refuse (earlier ones sent the events of one whose port is not a
/// `u16` to port 80) is left out (the rollout's resume says so).
pub fn saved_rollout_from_json(mut value: serde_json::Value) -> Result<RolloutConfig, ConfigError> {
    if let Some(webhooks) = value
        .get_mut("webhooks")
        .and_then(serde_json::Value::as_array_mut)
    {
        webhooks.retain(|url| {
            url.as_str()
                .is_none_or(|url| check_webhook_url(url).is_ok())
        });
    }
    if let Some(interval) = value.get_mut("interval")
        && interval
            .as_str()
            .and_then(|text| parse_duration(text).ok())
            .is_some_and(|d| d < MIN_ROLLOUT_INTERVAL)
    {
        *interval = format!("{}ms", MIN_ROLLOUT_INTERVAL.as_millis()).into();
    }
    rollout_from_document(value)
}

fn rollout_from_document(value: serde_json::Value) -> Result<RolloutConfig, ConfigError> {
    let syntax = |message: String| ConfigError::Syntax {
        path: "rollout plan".to_owned(),
        message,
    };
    let mut unknown = Vec::new();
    let mut note_unknown = |path: serde_ignored::Path<'_>| {
        unknown.push(format!("{}: is not a known key", dotted_key(&path)));
    };
    let value = serde_ignored::Deserializer::new(value, &mut note_unknown);
    let plan: raw::Rollout = serde_path_to_error::deserialize(value)
        .map_err(|error| syntax(keyed("", error.path(), error.inner())))?;
    // Unlike a config file's, a plan's unknown keys are not listed with the
    // values out of range: the admin API answers them with another status.
    if !unknown.is_empty() {
        return Err(syntax(unknown.join("; ")));
    }
    let mut c = raw::Checker::default();
    let plan = raw::validate_rollout(&mut c, "", plan);
    if c.problems.is_empty() {
        Ok(plan)
    } else {
        Err(ConfigError::Invalid(c.problems))
    }
}

/// The key serde_ignored reports, spelt as problems name keys
/// (`guardrails.bogus`, `stages[0].bogus`): its own spelling marks every step
/// into an `Option` with a `?` (`guardrails.?.bogus`).
fn dotted_key(path: &serde_ignored::Path<'_>) -> String {
    use serde_ignored::Path;
    match path {
        Path::Root => String::new(),
        Path::Seq { parent, index } => format!("{}[{index}]", dotted_key(parent)),
        Path::Map { parent, key } => match dotted_key(parent) {
            parent if parent.is_empty() => key.clone(),
            parent => format!("{parent}.{key}"),
        },
        Path::Some { parent }
        | Path::NewtypeStruct { parent }
        | Path::NewtypeVariant { parent } => dotted_key(parent),
    }
}

/// The most proxy worker threads a config may ask for: a thread each, so a
/// typo must not start a hundred thousand.
const MAX_WORKERS: usize = 1024;

/// Headers that frame a message, are hop-by-hop, or carry credentials and
/// cookies: HTTP's own. A version or override header of one of these names
/// would break the messages it is set on.
const HTTP_HEADERS: [&str; 16] = [
    "host",
    "content-length",
    "transfer-encoding",
    "content-type",
    "content-encoding",
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "upgrade",
    "proxy-authenticate",
    "proxy-authorization",
    "cookie",
    "set-cookie",
    "authorization",
];

/// Headers the proxy writes itself: `x-forwarded-*` on every upstream
/// request, and the shadow marker on mirrored copies (which it strips from
/// clients' requests, so that none can pass for a copy). A version header
/// of one of these names would be overwritten, or would make every real
/// request look like a copy, which upstreams may answer without side
/// effects; an override header would be read from a value the proxy means
/// for something else.
const PROXY_HEADERS: [&str; 4] = [
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
    "x-cohort-shadow",
];

/// A webhook is called with a POST over `http://` or `https://`, with any
/// user info in its URL sent as HTTP Basic authentication.
fn check_webhook_url(url: &str) -> Result<(), String> {
    // `http::Uri` takes bytes outside ASCII, which a URL holds only
    // percent-encoded (RFC 3986): among them the `…` of a webhook as
    // `GET /admin/state` shows it, its path hidden.
    if !url.is_ascii() {
        return Err(format!(
            "{url:?} is not a URL: characters outside ASCII are percent-encoded in one \
             (the admin API and the logs show a webhook's path as \"…\": give the whole URL)"
        ));
    }
    let uri: http::Uri = url
        .parse()
        .map_err(|_| format!("{url:?} is not a URL such as \"https://hooks.example/cohort\""))?;
    let scheme_ok = matches!(uri.scheme_str(), Some("http" | "https"));
    let Some(authority) = uri.authority().filter(|_| scheme_ok) else {
        return Err(format!(
            "{url:?} is not an http:// or https:// URL with a host"
        ));
    };
    check_url_port(authority).map_err(|problem| format!("{url:?}: {problem}"))
}

/// Whether the port a URL names, if it names one, can be connected to.
/// `http::Uri` takes any digits after the host for a port, and a client
/// connects to the scheme's default port when they are not a `u16`: a typo
/// would send the request, and its credentials, to another service.
pub fn check_url_port(authority: &http::uri::Authority) -> Result<(), String> {
    let host_and_port = authority.as_str().rsplit('@').next().unwrap_or_default();
    let Some((_, port)) = host_and_port
        .rsplit_once(':')
        // The colons of an IPv6 address in brackets, with no port after it.
        .filter(|(_, port)| !port.contains(']'))
    else {
        return Ok(());
    };
    if !port.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("the port {port:?} is not a number"));
    }
    match port.parse::<u16>() {
        Ok(0) => Err("port 0 cannot be connected to".to_owned()),
        Ok(_) => Ok(()),
        // An empty port is the scheme's default (RFC 3986 section 3.2.3).
        Err(_) if port.is_empty() => Ok(()),
        Err(_) => Err(format!("port {port} is out of range (1 to 65535)")),
    }
}

/// A version name is a header value and a metrics label: keep it short and printable.
pub fn check_version_name(name: &str) -> Result<(), String> {
    let printable = name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"-_.:+@".contains(&b));
    if name.is_empty() || name.len() > 128 || !printable {
        // A name far too long is shown by its start.
        let shown: String = name.chars().take(128).collect();
        let more = if shown.len() < name.len() { "…" } else { "" };
        Err(format!(
            "{shown:?}{more} is not a version name: 1 to 128 characters of ASCII letters, digits and -_.:+@"
        ))
    } else {
        Ok(())
    }
}

/// A config of a stable `v1` (127.0.0.1:9001) and a canary `v2`
/// (127.0.0.1:9002) at `canary_weight` percent, for unit tests.
#[cfg(test)]
pub(crate) fn two_versions(canary_weight: u32) -> Config {
    let text = format!(
        r#"
        [versions.stable]
        name = "v1"
        upstreams = ["127.0.0.1:9001"]
        [versions.canary]
        name = "v2"
        upstreams = ["127.0.0.1:9002"]
        weight = {canary_weight}
        "#
    );
    Config::parse(&text, "test").expect("a valid test config")
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
        [versions.stable]
        name = "v1"
        upstreams = ["127.0.0.1:9001"]
    "#;

    /// A URL's port is a `u16` other than 0, or none: `http::Uri` reads
    /// any digits, and a client would go to the default port instead.
    #[test]
    fn a_url_port_that_cannot_be_connected_to_is_refused() {
        let check = |authority: &str| check_url_port(&authority.parse().unwrap());
        for good in [
            "h",
            "h:80",
            "h:",
            "[::1]",
            "[::1]:65535",
            "bot:pw@h",
            "bot:pw@h:8080",
        ] {
            assert_eq!(check(good), Ok(()), "{good}");
        }
        for (bad, problem) in [
            ("h:99999", "port 99999 is out of range (1 to 65535)"),
            ("bot:pw@h:70000", "port 70000 is out of range (1 to 65535)"),
            ("[::1]:0", "port 0 cannot be connected to"),
            ("h:0", "port 0 cannot be connected to"),
        ] {
            assert_eq!(check(bad), Err(problem.to_owned()), "{bad}");
        }
    }

    /// A section given as a value is named as a table, not by the type
    /// that reads it.
    #[test]
    fn a_section_that_is_not_a_table_is_named_as_one() {
        for text in ["versions = 5", "listen = \"x\"\n"] {
            let error = Config::parse(text, "test")
                .expect_err("refused")
                .to_string();
            assert!(
                error.contains("expected a table") && !error.contains("struct"),
                "{error}"
            );
        }
    }

    /// Paths relative to the working directory name the same file as
    /// their absolute spelling; the one file may not be both.
    #[test]
    fn one_file_spelt_two_ways_is_one_file() {
        let here = std::env::current_dir().expect("a working directory");
        for (a, b) in [
            ("s.json", "./s.json"),
            ("s.json", "src/../s.json"),
            ("no-such/s.json", "no-such/x/../s.json"),
            ("s.json", here.join("s.json").to_str().expect("UTF-8")),
        ] {
            assert!(names_one_file(Path::new(a), Path::new(b)), "{a} {b}");
        }
        assert!(!names_one_file(
            Path::new("s.json"),
            Path::new("src/s.json")
        ));
    }

    fn problems(text: &str) -> Vec<String> {
        match Config::parse(text, "test") {
            Err(ConfigError::Invalid(problems)) => problems.iter().map(|p| p.to_string()).collect(),
            other => panic!("expected problems, got {other:?}"),
        }
    }

    /// As the admin API and the state file compare them: a host's name
    /// is the same in any case, so the state file a config seeds is one a
    /// restart reads.
    #[test]
    fn an_upstream_listed_twice_in_two_cases_is_listed_twice() {
        let text = r#"
            [versions.stable]
            name = "v1"
            upstreams = ["localhost:9001", "LOCALHOST:9001"]
        "#;
        assert_eq!(
            problems(text),
            ["versions.stable.upstreams[1]: \"LOCALHOST:9001\" is listed twice"]
        );
    }

    #[test]
    fn minimal_config_takes_defaults() {
        let config = Config::parse(MINIMAL, "test").unwrap();
        assert_eq!(config.listen.addr, "0.0.0.0:8080".parse().unwrap());
        assert_eq!(config.routing.cookie_name, "cohort_id");
        assert_eq!(config.routing.version_header, "x-agent-version");
        assert_eq!(config.routing.fallback, Fallback::Cookie);
        assert!(config.versions.canary.is_none());
        assert_eq!(config.admin.addr, "127.0.0.1:9901".parse().unwrap());
        assert_eq!(
            config.upstream.stream_idle_timeout,
            Some(Duration::from_secs(3600))
        );
        let off = format!("{MINIMAL}\n[upstream]\nstream_idle_timeout = \"0s\"\n");
        let off = Config::parse(&off, "test").unwrap();
        assert_eq!(off.upstream.stream_idle_timeout, None);
    }

    #[test]
    fn every_problem_is_named_by_its_key() {
        let found = problems(
            r#"
            [listen]
            drain_timeout = "soon"
            [routing]
            sticky_keys = ["header:x-user", "body:user"]
            [versions.stable]
            name = "v1"
            upstreams = ["127.0.0.1:9001"]
            [versions.canary]
            name = "v2"
            upstreams = ["nohost"]
            weight = 150
            "#,
        );
        let keys: Vec<&str> = found.iter().map(|p| p.split(':').next().unwrap()).collect();
        assert_eq!(
            keys,
            [
                "listen.drain_timeout",
                "routing.sticky_keys[1]",
                "versions.canary.upstreams[0]",
                "versions.canary.weight"
            ],
            "{found:?}"
        );
        assert!(found.contains(&"versions.canary.weight: 150 is not within 0..=100".to_owned()));
    }

    #[test]
    fn a_shadow_upstream_must_be_plain_http() {
        let found = problems(&format!(
            "{MINIMAL}\n[shadow]\nname = \"v3\"\nupstreams = [\"127.0.0.1:9003\", \"https://eval:443\"]\npercent = 10\n"
        ));
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(found[0].starts_with("shadow.upstreams[1]: "), "{found:?}");
        // Named by its place in the list, past one that is not an address.
        let found = problems(&format!(
            "{MINIMAL}\n[shadow]\nname = \"v3\"\nupstreams = [\"nowhere\", \"https://eval:443\"]\npercent = 10\n"
        ));
        assert_eq!(found.len(), 2, "{found:?}");
        assert!(found[0].starts_with("shadow.upstreams[0]: "), "{found:?}");
        assert_eq!(found[1], format!("shadow.upstreams[1]: {SHADOW_PROTOCOL}"));
    }

    #[test]
    fn settings_that_would_break_messages_or_the_start_are_refused_by_key() {
        let cases = [
            (
                "[routing]\nversion_header = \"content-length\"\n",
                "routing.version_header: ",
            ),
            (
                "[routing]\nversion_header = \"Connection\"\n",
                "routing.version_header: ",
            ),
            (
                "[routing]\noverride_header = \"host\"\n",
                "routing.override_header: ",
            ),
            (
                "[routing]\noverride_header = \"x-agent-version\"\n",
                "routing.override_header: must differ",
            ),
            (
                "[routing]\ncookie_max_age = \"0s\"\n",
                "routing.cookie_max_age: ",
            ),
            (
                "[routing]\nsalt = \"\"\n",
                "routing.salt: must not be empty",
            ),
            (
                "[health]\npath = \"health\"\n",
                "health.path: \"health\" is not a path starting with '/'",
            ),
            (
                "[health]\npath = \"/a b\"\n",
                "health.path: \"/a b\" is not a valid request path",
            ),
            (
                "[routing]\noverride_header = \"cookie\"\n",
                "routing.override_header: \"cookie\" is a header the proxy must leave to HTTP; choose another name, such as \"x-cohort\"",
            ),
            (
                "[routing]\nsticky_keys = [\"cookie:a;b\"]\n",
                "routing.sticky_keys[0]: \"cookie:a;b\": \"a;b\" is not a valid cookie name",
            ),
            (
                "[routing]\ncookie_max_age = \"500ms\"\n",
                "routing.cookie_max_age: \"500ms\" must be at least 1s",
            ),
            ("[listen]\nworkers = 100000\n", "listen.workers: "),
            (
                "[listen]\nmax_connections = 3000000000000000000\n",
                "listen.max_connections: must be at most",
            ),
            ("[state]\npath = \"\"\n", "state.path: "),
            (
                "[state]\npath = \"s.json\"\naudit_log = \"s.json\"\n",
                "state.audit_log: must differ",
            ),
            (
                "[rollout]\nmin_requests = 0\nstages = [ { weight = 1, duration = \"1m\" } ]\n",
                "rollout.min_requests: ",
            ),
            (
                "[rollout]\nwebhooks = [\"hooks.example/x\"]\nstages = [ { weight = 1, duration = \"1m\" } ]\n",
                "rollout.webhooks[0]: ",
            ),
            (
                "[rollout]\nwebhooks = [\"http://127.0.0.1:99999/x\"]\nstages = [ { weight = 1, duration = \"1m\" } ]\n",
                "rollout.webhooks[0]: \"http://127.0.0.1:99999/x\": port 99999 is out of range",
            ),
            (
                "[rollout]\nwebhooks = [\"http://127.0.0.1:9/…\"]\nstages = [ { weight = 1, duration = \"1m\" } ]\n",
                "rollout.webhooks[0]: \"http://127.0.0.1:9/…\" is not a URL: characters outside ASCII",
            ),
        ];
        for (section, expected) in cases {
            let found = problems(&format!("{MINIMAL}\n{section}"));
            assert!(
                found.len() == 1 && found[0].starts_with(expected),
                "{section}: {found:?}"
            );
        }
    }

    #[test]
    fn names_http_or_the_proxy_keep_for_themselves_are_refused_for_both_header_keys() {
        let reserved = [
            // Written by the proxy on every upstream request, or on shadow copies.
            "x-forwarded-for",
            "x-forwarded-proto",
            "x-forwarded-host",
            "x-cohort-shadow",
            // Hop-by-hop (RFC 9110 section 7.6.1, and the obsolete two).
            "connection",
            "keep-alive",
            "proxy-connection",
            "te",
            "transfer-encoding",
            "upgrade",
            "proxy-authenticate",
            "proxy-authorization",
            "trailer",
        ];
        for name in reserved {
            for key in ["version_header", "override_header"] {
                // Header names are case-insensitive, so the check is too.
                let written = name.to_ascii_uppercase();
                let found = problems(&format!("{MINIMAL}\n[routing]\n{key} = {written:?}\n"));
                let expected = format!("routing.{key}: {name:?} is a header the proxy ");
                assert!(
                    found.len() == 1 && found[0].starts_with(&expected),
                    "{key} = {written:?}: {found:?}"
                );
            }
        }
        assert!(PROXY_HEADERS.contains(&crate::shadow::X_COHORT_SHADOW.as_str()));
        let found = problems(&format!(
            "{MINIMAL}\n[routing]\nversion_header = \"x-release\"\noverride_header = \"X-Release\"\n"
        ));
        assert_eq!(
            found,
            [
                "routing.override_header: must differ from routing.version_header, which the proxy sets itself"
            ]
        );
        let found = problems(&format!(
            "{MINIMAL}\n[routing]\noverride_header = \"X-User-Id\"\n"
        ));
        assert_eq!(
            found,
            [
                "routing.override_header: \"x-user-id\" is a header routing.sticky_keys reads the user's key from; a user whose key is \"canary\" or \"stable\" would be forced there"
            ]
        );
        // Nor may the version header be one the user's key is read from,
        // nor the one responses report tokens in.
        let found = problems(&format!(
            "{MINIMAL}\n[routing]\nversion_header = \"x-user-id\"\n"
        ));
        assert_eq!(
            found,
            [
                "routing.version_header: \"x-user-id\" is a header routing.sticky_keys reads the user's key from; the proxy would overwrite it with the version's name"
            ]
        );
        let found = problems(&format!(
            "{MINIMAL}\n[routing]\nversion_header = \"x-v\"\nsticky_keys = [\"cookie:uid\", \"header:X-V\"]\n"
        ));
        assert_eq!(found.len(), 1, "{found:?}");
        let found = problems(&format!(
            "{MINIMAL}\n[metrics]\ntokens_header = \"X-Agent-Version\"\n"
        ));
        assert_eq!(
            found,
            [
                "metrics.tokens_header: must differ from routing.version_header, which the proxy sets itself on responses"
            ]
        );
    }

    #[test]
    fn a_missing_field_of_a_nested_table_is_named_by_its_full_key() {
        let cases = [
            (
                "[listen.tls]\ncert = \"c.pem\"\n",
                &["listen.tls.key: is required"][..],
            ),
            (
                "[listen.tls]\nkey = \"k.pem\"\n",
                &["listen.tls.cert: is required"],
            ),
            (
                "[listen.tls]\nalpn = [\"h3\"]\n",
                &[
                    "listen.tls.alpn: ",
                    "listen.tls.cert: is required",
                    "listen.tls.key: is required",
                ],
            ),
            (
                "[shadow]\npercent = 5\n",
                &["shadow.name: is required", "shadow.upstreams: is required"],
            ),
            // A shadow that would mirror nothing, silently.
            (
                "[shadow]\nname = \"s\"\nupstreams = [\"127.0.0.1:9003\"]\n",
                &["shadow.percent: is required"],
            ),
            (
                "[shadow]\nname = \"s\"\nupstreams = [\"127.0.0.1:9003\"]\npercent = 5\nmethods = []\n",
                &["shadow.methods: is empty"],
            ),
            (
                "[rollout]\ninterval = \"1m\"\n",
                &["rollout.stages: is required"],
            ),
            (
                "[rollout.guardrails]\nconfidence = 0.9\n",
                &["rollout.stages: is required"],
            ),
        ];
        for (section, expected) in cases {
            // Reported with the file's other problems, not instead of them.
            let found = problems(&format!(
                "{MINIMAL}\n[upstream]\nconnect_timeout = \"soon\"\n{section}"
            ));
            let mut found: Vec<&str> = found
                .iter()
                .map(String::as_str)
                .filter(|p| !p.starts_with("upstream.connect_timeout: "))
                .collect();
            found.sort_unstable();
            assert_eq!(found.len(), expected.len(), "{section}: {found:?}");
            for (problem, start) in found.iter().zip(expected) {
                assert!(problem.starts_with(start), "{section}: {found:?}");
            }
        }
        // Every key of [health] has a default.
        assert!(Config::parse(&format!("{MINIMAL}\n[health]\n"), "test").is_ok());
    }

    #[test]
    fn a_token_no_header_could_carry_is_refused_by_where_it_comes_from() {
        let dir = tempfile::tempdir().expect("a scratch directory");
        let admin = |text: &str| {
            let path = dir.path().join("admin.token");
            std::fs::write(&path, text).expect("write the token file");
            AdminConfig {
                addr: "127.0.0.1:9901".parse().expect("an address"),
                token_file: Some(path),
                metrics_auth: false,
            }
        };
        for text in ["first\nsecond\n", "to\rken", "t\u{f6}ken", "tok\u{7f}en"] {
            let problem = admin(text).token().expect_err(text);
            assert_eq!(problem.key, "admin.token_file", "{text:?}");
            assert!(
                problem.message.contains("cannot be sent in an HTTP header"),
                "{text:?}: {problem}"
            );
        }
        // Surrounding whitespace is not part of it; inner spaces and tabs may be.
        for (text, token) in [("\n s3cret \n", "s3cret"), ("a b\tc\n", "a b\tc")] {
            assert_eq!(admin(text).token().expect(text).as_deref(), Some(token));
        }
    }

    #[test]
    fn unknown_keys_are_refused_by_their_full_path() {
        let err = Config::parse(&format!("{MINIMAL}\n[listen]\nport = 80\n"), "test").unwrap_err();
        assert_eq!(err.to_string(), "listen.port: is not a known key");
        // Keys under optional tables, and in arrays of tables, are spelt the same way.
        let found = problems(&format!(
            "{MINIMAL}\n[versions.canary]\nname = \"v2\"\nupstreams = [\"127.0.0.1:9002\"]\ncolour = 1\n\
             [listen.tls]\ncert = \"c.pem\"\nkey = \"k.pem\"\nciphers = 1\n\
             [[rollout.stages]]\nweight = 1\nduration = \"1s\"\npace = 2\n"
        ));
        assert_eq!(
            found,
            [
                "listen.tls.ciphers: is not a known key",
                "rollout.stages[0].pace: is not a known key",
                "versions.canary.colour: is not a known key",
            ]
        );
    }

    #[test]
    fn a_value_of_the_wrong_type_is_named_by_its_key_and_place() {
        let text = format!("{MINIMAL}\n[listen]\nworkers = \"one\"\n");
        let err = Config::parse(&text, "test.toml").unwrap_err();
        let line = text
            .lines()
            .position(|l| l.starts_with("workers"))
            .expect("the line")
            + 1;
        assert_eq!(
            err.to_string(),
            format!(
                "test.toml: listen.workers: invalid type: string \"one\", expected usize \
                 (line {line}, column 11)"
            )
        );
        let err = Config::parse(
            "[versions.stable]\nname = \"v1\"\nupstreams = [\"127.0.0.1:9001\", 7]\n",
            "test.toml",
        )
        .unwrap_err();
        assert!(
            err.to_string()
                .starts_with("test.toml: versions.stable.upstreams[1]: invalid type: integer `7`"),
            "{err}"
        );
    }

    #[test]
    fn a_plans_unknown_keys_and_wrong_types_are_syntax_and_its_ranges_invalid() {
        let syntax = |plan: serde_json::Value| match rollout_from_json(plan) {
            Err(ConfigError::Syntax { message, .. }) => message,
            other => panic!("expected a syntax error, got {other:?}"),
        };
        let stage = serde_json::json!({"weight": 10, "duration": "1s"});
        assert_eq!(
            syntax(serde_json::json!({
                "stages": [{"weight": 10, "duration": "1s", "pace": 2}],
                "guardrails": {"succes_rate_min": 0.9},
            })),
            "guardrails.succes_rate_min: is not a known key; \
             stages[0].pace: is not a known key"
        );
        assert_eq!(
            syntax(serde_json::json!({"stages": [stage], "failure_limit": "two"})),
            "failure_limit: invalid type: string \"two\", expected u32"
        );
        match rollout_from_json(serde_json::json!({"stages": [{"weight": -5, "duration": "1s"}]})) {
            Err(ConfigError::Invalid(problems)) => {
                assert_eq!(problems.len(), 1, "{problems:?}");
                assert_eq!(problems[0].key, "stages[0].weight");
            }
            other => panic!("expected a problem, got {other:?}"),
        }
        // `"30ms"` for `"30s"`: a look, and a write of the state file, 33 times a second.
        match rollout_from_json(serde_json::json!({"stages": [stage], "interval": "30ms"})) {
            Err(ConfigError::Invalid(problems)) => {
                assert_eq!(problems.len(), 1, "{problems:?}");
                assert_eq!(problems[0].key, "interval");
                assert!(
                    problems[0].message.contains("shorter than 100ms"),
                    "{problems:?}"
                );
            }
            other => panic!("expected a problem, got {other:?}"),
        }
        let plan = rollout_from_json(serde_json::json!({"stages": [stage], "interval": "100ms"}));
        assert_eq!(plan.unwrap().interval, MIN_ROLLOUT_INTERVAL);
        // One that an earlier build saved running still starts, at the floor.
        let saved =
            saved_rollout_from_json(serde_json::json!({"stages": [stage], "interval": "20ms"}));
        assert_eq!(saved.unwrap().interval, MIN_ROLLOUT_INTERVAL);
    }

    /// A running plan an earlier build saved with a webhook port out of
    /// range still starts, without that webhook; a new plan is refused.
    #[test]
    fn a_saved_plan_keeps_only_the_webhooks_that_can_be_called() {
        let stage = serde_json::json!({"weight": 1, "duration": "1m"});
        let hooks = ["http://127.0.0.1:99999/hook", "http://127.0.0.1:9000/hook"];
        let plan = serde_json::json!({"stages": [stage], "webhooks": hooks});
        assert!(rollout_from_json(plan.clone()).is_err());
        let saved = saved_rollout_from_json(plan).unwrap();
        assert_eq!(saved.webhooks, ["http://127.0.0.1:9000/hook"]);
    }

    #[test]
    fn later_sections_are_accepted() {
        let text = format!(
            r#"{MINIMAL}
            [listen.tls]
            cert = "c.pem"
            key = "k.pem"
            [rollout]
            interval = "30s"
            stages = [ {{ weight = 1, duration = "30m" }}, {{ pause = true }} ]
            [rollout.guardrails]
            success_rate_min = 0.97
            [health]
            canary_unavailable = "error"
            [shadow]
            name = "v3-shadow"
            upstreams = ["127.0.0.1:9003"]
            percent = 10
            max_body = "1MiB"
            "#
        );
        let config = Config::parse(&text, "test").unwrap();
        let rollout = config.rollout.unwrap();
        assert_eq!(rollout.stages.len(), 2);
        assert_eq!(config.shadow.unwrap().max_body, 1 << 20);
    }

    #[test]
    fn sizes_and_durations() {
        assert_eq!(parse_size("64KiB"), Ok(65536));
        assert!(parse_size("lots").is_err());
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        assert!(parse_duration("100y").is_ok());
        assert!(parse_duration("101y").unwrap_err().contains("longer than"));
        assert_eq!(parse_duration("1h 30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("30 s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("1h 30 m"), Ok(Duration::from_secs(5400)));
        for without_unit in ["3 0s", "30", "1h 30"] {
            let error = parse_duration(without_unit).unwrap_err();
            assert!(error.contains("without a unit"), "{without_unit}: {error}");
        }
    }

    #[test]
    fn a_key_names_where_the_problem_is_and_an_unknown_field_once() {
        #[derive(Debug, Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Step {
            #[allow(dead_code)]
            weight: u32,
        }
        #[derive(Debug, Deserialize)]
        struct Plan {
            #[allow(dead_code)]
            steps: Vec<Step>,
        }
        let message = |json: &str| {
            let mut json = serde_json::Deserializer::from_str(json);
            let error = serde_path_to_error::deserialize::<_, Plan>(&mut json).unwrap_err();
            keyed("plan", error.path(), error.inner())
        };
        assert!(
            message(r#"{"steps": [{"weight": 1}, {"weight": "x"}]}"#)
                .starts_with("plan.steps[1].weight: invalid type"),
        );
        assert!(
            message(r#"{"steps": [{"weight": 1, "wait": 2}]}"#)
                .starts_with("plan.steps[0]: unknown field `wait`"),
        );
        assert!(message(r#"{"steps": 1}"#).starts_with("plan.steps: invalid type"));
    }

    #[test]
    fn a_version_name_far_too_long_is_shown_by_its_start() {
        let message = check_version_name(&"x".repeat(5000)).unwrap_err();
        let start = format!("{:?}…", "x".repeat(128));
        assert!(message.starts_with(&start), "{message}");
        assert!(message.len() < 300, "{message}");
        // One of an allowed length is shown whole, its bad character too.
        let name = format!("{} {}", "x".repeat(100), "x".repeat(27));
        let message = check_version_name(&name).unwrap_err();
        assert!(message.contains(&name), "{message}");
        let message = check_version_name("v 1").unwrap_err();
        assert!(message.starts_with("\"v 1\" is not"), "{message}");
    }

    #[test]
    fn a_json_error_at_no_nameable_place_is_not_keyed_with_a_question_mark() {
        let mut json = serde_json::Deserializer::from_str("{bad");
        let error = serde_path_to_error::deserialize::<_, std::collections::BTreeMap<String, u32>>(
            &mut json,
        )
        .unwrap_err();
        let message = keyed("", error.path(), error.inner());
        assert!(message.starts_with("key must be a string"), "{message}");
    }
}
