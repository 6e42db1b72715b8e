//! `cohort ctl`: the admin API from the command line.
//!
//! Owns: turning ctl subcommands into admin calls, refusing an admin URL
//! they would go elsewhere with (a port out of range, a query, a fragment,
//! user info), where the bearer token comes from, the call's deadline, telling the admin API's answer from any
//! other server's, printing the live state readably, and exiting non-zero
//! with the server's message (or the cause) on failure. Does not own the
//! API's behaviour (`admin`, `control`).

use std::borrow::Cow;
use std::env::VarError;
use std::error::Error;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use http::header::{AUTHORIZATION, CONTENT_TYPE};
use http::{HeaderValue, Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt as _, Full, LengthLimitError, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};

use crate::config::TOKEN_ENV;

/// A ctl call that failed, with what to tell the operator.
#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    #[error("the admin URL {url:?} (--admin, or else COHORT_ADMIN) {problem}")]
    BadUrl { url: String, problem: String },
    #[error(
        "the admin URL {0:?} (--admin, or else COHORT_ADMIN): https admin URLs are not supported; the admin listener speaks plain HTTP \
         (put a TLS terminator in front and give its plain side, or reach it through an SSH tunnel)"
    )]
    HttpsUrl(String),
    #[error(
        "the admin token holds a character that cannot be sent in an HTTP header (such as a newline, or a letter outside ASCII)"
    )]
    BadToken,
    #[error("cannot use the token file {}: {problem}", .path.display())]
    TokenFile { path: PathBuf, problem: String },
    #[error(
        "{TOKEN_ENV} and {TOKEN_FILE_ENV} are both set: unset one, or pass --token or --token-file"
    )]
    TwoTokens,
    #[error("cannot reach the admin API at {url}: {detail}")]
    Unreachable { url: String, detail: String },
    #[error("{status}: {message}")]
    Refused { status: StatusCode, message: String },
    #[error(
        "the reply from {url} ({status}) is not from a Cohort admin API (is --admin the admin address?)"
    )]
    NotAdmin { url: String, status: StatusCode },
    #[error("no answer from the admin API at {url} within {}", humantime::format_duration(*.timeout))]
    TimedOut { url: String, timeout: Duration },
}

/// One admin call: method, path and JSON body.
#[derive(Debug)]
pub struct Call {
    pub method: Method,
    pub path: &'static str,
    pub body: Option<Value>,
}

impl Call {
    #[must_use]
    pub fn status() -> Call {
        Call {
            method: Method::GET,
            path: "/admin/state",
            body: None,
        }
    }

    #[must_use]
    pub fn weight(weight: f64, force: bool) -> Call {
        Call {
            method: Method::PUT,
            path: "/admin/weight",
            body: Some(json!({"weight": weight, "force": force})),
        }
    }

    #[must_use]
    pub fn rollback(reason: Option<String>) -> Call {
        Call {
            method: Method::POST,
            path: "/admin/rollback",
            body: Some(reason_body(reason)),
        }
    }

    #[must_use]
    pub fn promote(force: bool) -> Call {
        Call {
            method: Method::POST,
            path: "/admin/promote",
            body: force.then(|| json!({"force": true})),
        }
    }

    #[must_use]
    pub fn canary(name: String, upstreams: Vec<String>, weight: Option<f64>, force: bool) -> Call {
        let mut body = json!({"name": name, "upstreams": upstreams});
        if let Some(weight) = weight {
            body["weight"] = json!(weight);
        }
        if force {
            body["force"] = json!(true);
        }
        Call {
            method: Method::PUT,
            path: "/admin/canary",
            body: Some(body),
        }
    }

    /// With no plan, the server starts its config's `[rollout]` plan.
    #[must_use]
    pub fn rollout_start(plan: Option<Value>) -> Call {
        Call {
            method: Method::POST,
            path: "/admin/rollout",
            body: plan,
        }
    }

    #[must_use]
    pub fn rollout_approve() -> Call {
        Call {
            method: Method::POST,
            path: "/admin/rollout/approve",
            body: None,
        }
    }

    #[must_use]
    pub fn rollout_abort(reason: Option<String>) -> Call {
        Call {
            method: Method::POST,
            path: "/admin/rollout/abort",
            body: Some(reason_body(reason)),
        }
    }
}

/// `{"reason": ...}`, or `{}` without one.
fn reason_body(reason: Option<String>) -> Value {
    reason.map_or_else(|| json!({}), |reason| json!({"reason": reason}))
}

/// The variable that names a file holding the admin token.
const TOKEN_FILE_ENV: &str = "COHORT_ADMIN_TOKEN_FILE";

/// The longest answer read from the admin API: far more than its state,
/// with every guardrail's evaluation, ever takes.
const MOST_REPLY_BYTES: usize = 4 << 20;

/// The bearer token to send: `--token`, else the one in the file
/// `--token-file` names, else `COHORT_ADMIN_TOKEN` or the one in the file
/// `COHORT_ADMIN_TOKEN_FILE` names, but not both, since which was meant is
/// not clear. An empty variable counts as unset. `None` without any of them.
pub fn token(given: Option<String>, file: Option<PathBuf>) -> Result<Option<String>, CtlError> {
    if given.is_some() {
        return Ok(given);
    }
    if let Some(path) = file {
        return read_token_file(&path).map(Some);
    }
    let token = match std::env::var(TOKEN_ENV) {
        // Trimmed, as the server trims its own.
        Ok(token) => Some(token.trim().to_owned()).filter(|t| !t.is_empty()),
        Err(VarError::NotPresent) => None,
        // Not UTF-8, so not ASCII either: no header could carry it.
        Err(VarError::NotUnicode(_)) => return Err(CtlError::BadToken),
    };
    let file = std::env::var_os(TOKEN_FILE_ENV).filter(|path| !path.is_empty());
    match (token, file) {
        (Some(_), Some(_)) => Err(CtlError::TwoTokens),
        (Some(token), None) => Ok(Some(token)),
        (None, Some(path)) => read_token_file(Path::new(&path)).map(Some),
        (None, None) => Ok(None),
    }
}

/// The token in the file at `path`, read as the server reads `admin.token_file`.
fn read_token_file(path: &Path) -> Result<String, CtlError> {
    use crate::config::TokenFileError;
    use crate::files::Pipes;
    crate::config::read_token_file(path, Pipes::Read).map_err(|error| CtlError::TokenFile {
        path: path.to_owned(),
        problem: match error {
            TokenFileError::Unreadable(error) => error.to_string(),
            TokenFileError::Empty => "it holds no token".to_owned(),
            TokenFileError::Unsendable => CtlError::BadToken.to_string(),
        },
    })
}

/// Parses `--timeout`: a duration such as `"10s"`, longer than zero.
pub fn parse_timeout(text: &str) -> Result<Duration, String> {
    // clap names the option alone, even for a value from the environment.
    let from = "--timeout, or else COHORT_CTL_TIMEOUT";
    let timeout =
        crate::config::parse_duration(text).map_err(|error| format!("{error} ({from})"))?;
    if timeout.is_zero() {
        return Err(format!("a timeout must be longer than 0 ({from})"));
    }
    Ok(timeout)
}

/// Sends `call` to the admin API at `admin` and returns the live state it
/// answers with, failing if the whole answer has not arrived within
/// `timeout`. Every call the admin API accepts answers with the state, so
/// a 2xx reply without one (an object with a numeric `generation`) came from
/// some other server, such as the proxy's upstreams, and is an error.
pub async fn send(
    admin: &str,
    token: Option<&str>,
    timeout: Duration,
    call: Call,
) -> Result<Value, CtlError> {
    let base = admin.trim_end_matches('/');
    // A scheme is case-insensitive (RFC 3986 section 3.1).
    let has_scheme = |scheme: &str| {
        base.get(..scheme.len())
            .is_some_and(|start| start.eq_ignore_ascii_case(scheme))
    };
    if has_scheme("https://") {
        return Err(CtlError::HttpsUrl(admin.to_owned()));
    }
    let bad_url = |problem: &str| CtlError::BadUrl {
        url: admin.to_owned(),
        problem: problem.to_owned(),
    };
    if !has_scheme("http://") {
        return Err(bad_url("is not a URL such as http://127.0.0.1:9901"));
    }
    // The call's path is appended to the URL: after a query or a fragment
    // it would be part of them, and user info would be sent nowhere.
    if base.contains(['?', '#', '@']) {
        return Err(bad_url(
            "has a query, a fragment or user info: give the admin listener's address alone, \
             such as http://127.0.0.1:9901 (the token goes in --token)",
        ));
    }
    let url = format!("{base}{}", call.path);
    let uri: Uri = url
        .parse()
        .map_err(|_| bad_url("is not a URL such as http://127.0.0.1:9901"))?;
    if let Some(authority) = uri.authority() {
        crate::config::check_url_port(authority)
            .map_err(|problem| bad_url(&format!("cannot be used: {problem}")))?;
    }
    let body = call
        .body
        .map_or_else(Bytes::new, |b| Bytes::from(b.to_string()));
    let mut req = Request::new(Full::new(body));
    *req.method_mut() = call.method;
    *req.uri_mut() = uri;
    req.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    if let Some(token) = token {
        // Refused as the server refuses such a token of its own: the admin
        // listener could never match it.
        if !crate::config::is_sendable_token(token) {
            return Err(CtlError::BadToken);
        }
        let mut value =
            HeaderValue::from_str(&format!("Bearer {token}")).map_err(|_| CtlError::BadToken)?;
        value.set_sensitive(true);
        req.headers_mut().insert(AUTHORIZATION, value);
    }
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let unreachable = |error: &dyn Error| CtlError::Unreachable {
        url: url.clone(),
        detail: causes(error),
    };
    let exchange = async {
        let rsp = client.request(req).await.map_err(|e| unreachable(&e))?;
        let status = rsp.status();
        // The admin API's answers are small: a longer one is another
        // server's, and is not read whole into memory.
        let body = Limited::new(rsp.into_body(), MOST_REPLY_BYTES)
            .collect()
            .await
            .map_err(|error| match error.downcast::<LengthLimitError>() {
                Ok(_) => CtlError::NotAdmin {
                    url: url.clone(),
                    status,
                },
                Err(error) => unreachable(&*error),
            })?;
        Ok((status, body.to_bytes()))
    };
    let (status, bytes) = tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| CtlError::TimedOut {
            url: url.clone(),
            timeout,
        })??;
    if status.is_success() {
        return match serde_json::from_slice::<Value>(&bytes) {
            Ok(state) if state["generation"].is_number() => Ok(state),
            _ => Err(CtlError::NotAdmin { url, status }),
        };
    }
    // The admin API refuses with `{"error": "..."}` and nothing else; a
    // proxy's own error (which names a version too), a bare status or a
    // page is another server's, whose message would read as the API's.
    match serde_json::from_slice::<Value>(&bytes) {
        Ok(Value::Object(refusal)) if refusal.len() == 1 => match refusal.get("error") {
            Some(Value::String(message)) => Err(CtlError::Refused {
                status,
                message: message.clone(),
            }),
            _ => Err(CtlError::NotAdmin { url, status }),
        },
        _ => Err(CtlError::NotAdmin { url, status }),
    }
}

/// `error` and its causes, outermost first, each after a colon: hyper's
/// own message ("client error (Connect)") says little without the operating
/// system's ("Connection refused") at the end of the chain.
fn causes(error: &dyn Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        // Some errors repeat their cause in their own message.
        if !text.ends_with(&cause_text) {
            let _ = write!(text, ": {cause_text}");
        }
        source = cause.source();
    }
    text
}

/// A rollout's phase, stage, weight and time: while it runs, what is left
/// of the stage (a stage past its time is held until the guardrails
/// decide); once it has ended, where it was, since the live weight may
/// differ (an abort leaves the canary at 0).
fn rollout_line(rollout: &Value) -> String {
    let phase = text(&rollout["phase"]);
    let stage = rollout["stage"].as_u64().unwrap_or(0);
    let stages = rollout["stages"].as_u64().unwrap_or(0);
    let stage = format!("{}/{stages}", (stage + 1).min(stages));
    let (weight, evaluations) = (&rollout["weight"], &rollout["evaluations"]);
    if !matches!(&*phase, "progressing" | "paused") {
        return format!(
            "{phase}  at stage {stage} (weight {weight}% then)  evaluations {evaluations}"
        );
    }
    let time_left = match rollout["time_left_ms"].as_u64() {
        None => "-".to_owned(),
        Some(0) => "0s (held until the guardrails decide)".to_owned(),
        Some(ms) => {
            humantime::format_duration(std::time::Duration::from_secs(ms / 1000)).to_string()
        }
    };
    format!(
        "{phase}  stage {stage}  weight {weight}%  time left {time_left}  evaluations {evaluations}"
    )
}

/// The live state as a few readable lines: each version with its
/// upstreams (marked when one cannot take traffic) and a warning when none
/// can, the shadow when one is installed, the rollout, and the last rollback.
#[must_use]
pub fn render_state(state: &Value) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "status      {}  (generation {})",
        text(&state["status"]),
        state["generation"]
    );
    let stable = &state["stable"];
    let _ = writeln!(
        out,
        "stable      {}  [{}]",
        text(&stable["name"]),
        upstream_list(stable)
    );
    if let Some(warning) = unavailable(stable, Role::Stable) {
        let _ = writeln!(out, "            {warning}");
    }
    match &state["canary"] {
        Value::Null => {
            let _ = writeln!(out, "canary      none");
        }
        canary => {
            let _ = writeln!(
                out,
                "canary      {}  [{}]  weight {}%",
                text(&canary["name"]),
                upstream_list(canary),
                canary["weight"]
            );
            if let Some(warning) = unavailable(canary, Role::Canary) {
                let _ = writeln!(out, "            {warning}");
            }
        }
    }
    if let shadow @ Value::Object(_) = &state["shadow"] {
        let _ = writeln!(
            out,
            "shadow      {}  [{}]  percent {}%",
            text(&shadow["name"]),
            upstream_list(shadow),
            shadow["percent"]
        );
        if let Some(warning) = unavailable(shadow, Role::Shadow) {
            let _ = writeln!(out, "            {warning}");
        }
    }
    if let rollout @ Value::Object(_) = &state["rollout"] {
        let _ = writeln!(out, "rollout     {}", rollout_line(rollout));
        if let Some(evaluations) = rollout["last_evaluation"]
            .as_array()
            .filter(|e| !e.is_empty())
        {
            let _ = writeln!(
                out,
                "            {:<20} {:>12} {:>12} {:>12}  verdict",
                "guardrail", "stable", "canary", "limit"
            );
            for e in evaluations {
                let number = |v: &Value| {
                    v.as_f64()
                        .map_or_else(|| "-".to_owned(), |v| format!("{v:.4}"))
                };
                let _ = writeln!(
                    out,
                    "            {:<20} {:>12} {:>12} {:>12}  {}",
                    text(&e["guardrail"]),
                    number(&e["stable"]),
                    number(&e["canary"]),
                    number(&e["limit"]),
                    text(&e["verdict"]),
                );
            }
        }
        if rollout["reason"].is_string() {
            let _ = writeln!(out, "            {}", text(&rollout["reason"]));
        }
    }
    if let Some(line) = rollback_line(state) {
        let _ = writeln!(out, "rollback    {line}");
    }
    out
}

/// The part a version plays, which decides where its traffic goes when
/// none of its upstreams is available.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Stable,
    Canary,
    Shadow,
}

/// One upstream's entry in the version's `health` list of `GET /admin/state`.
struct UpstreamHealth<'a> {
    upstream: Cow<'a, str>,
    healthy: bool,
    ejected: bool,
}

/// The version's `health` list; `None` when the state has none for it (a
/// server that reports no health, or a version that changed meanwhile).
fn health(version: &Value) -> Option<Vec<UpstreamHealth<'_>>> {
    let list = version["health"].as_array()?;
    Some(
        list.iter()
            .map(|entry| UpstreamHealth {
                upstream: text(&entry["upstream"]),
                healthy: entry["healthy"].as_bool().unwrap_or(false),
                ejected: entry["ejected"].as_bool().unwrap_or(false),
            })
            .collect(),
    )
}

/// The version's upstreams, each one that cannot take traffic marked
/// with why: `127.0.0.1:9002 (not healthy), 127.0.0.1:9003`.
fn upstream_list(version: &Value) -> String {
    let health = health(version).unwrap_or_default();
    let Some(upstreams) = version["upstreams"].as_array() else {
        return String::new();
    };
    upstreams
        .iter()
        .filter_map(Value::as_str)
        .map(
            |upstream| match health.iter().find(|h| h.upstream == upstream) {
                Some(h) if !h.healthy => format!("{upstream} (not healthy)"),
                Some(h) if h.ejected => format!("{upstream} (ejected)"),
                _ => upstream.to_owned(),
            },
        )
        .collect::<Vec<_>>()
        .join(", ")
}

/// A warning when no upstream of `version` is available (healthy and not
/// ejected), saying what becomes of its traffic: a canary's cohort goes
/// to stable or gets 503s (none for a canary at weight 0, which has no
/// cohort); stable and the shadow still try upstreams that pass their
/// checks but are ejected, and without one have none to try.
fn unavailable(version: &Value, role: Role) -> Option<String> {
    let health = health(version)?;
    if health.is_empty() || health.iter().any(|h| h.healthy && !h.ejected) {
        return None;
    }
    let name = text(&version["name"]);
    let some_healthy = health.iter().any(|h| h.healthy);
    let fate = match role {
        // At weight 0 (a rollback) it has no cohort to fail.
        Role::Canary if version["weight"].as_f64() == Some(0.0) => return None,
        Role::Canary => {
            "its cohort is served by stable (always before its first good probe), \
             or gets 503s (health.canary_unavailable)"
        }
        Role::Stable | Role::Shadow if some_healthy => "the ejected ones are tried anyway",
        Role::Stable => "its requests get 503s",
        Role::Shadow => "no copies are sent",
    };
    Some(format!("no upstream of {name} is available: {fate}"))
}

/// The last rollback, said so that it is not taken for one of the live
/// canary when it is not. The state does not name the version a rollback
/// applied to, but while the status is `rolled_back` it is the live canary
/// (a new canary, or a forced weight, ends that status); otherwise the
/// rollback is history, shown with its time.
fn rollback_line(state: &Value) -> Option<String> {
    let rollback = state["last_rollback"].as_object()?;
    let field = |name: &str| rollback.get(name).map_or(Cow::Borrowed("-"), text);
    let (at, source, reason) = (field("at"), field("source"), field("reason"));
    let canary = &state["canary"];
    if state["status"] == "rolled_back" && canary.is_object() {
        Some(format!(
            "{} rolled back at {at} by {source}: {reason}",
            text(&canary["name"])
        ))
    } else {
        Some(format!(
            "none in effect (the last one was at {at}, by {source}: {reason})"
        ))
    }
}

/// A string field as printed to a terminal: `-` when absent, and each
/// control character escaped (`\n`, `\u{1b}`), so that a reason given by
/// one caller cannot forge lines, or send escape sequences, to whoever
/// reads `ctl status`.
fn text(value: &Value) -> Cow<'_, str> {
    let Some(text) = value.as_str() else {
        return Cow::Borrowed("-");
    };
    if !text.chars().any(char::is_control) {
        return Cow::Borrowed(text);
    }
    let mut escaped = String::with_capacity(text.len());
    for c in text.chars() {
        if c.is_control() {
            escaped.extend(c.escape_debug());
        } else {
            escaped.push(c);
        }
    }
    Cow::Owned(escaped)
}

#[cfg(test)]
mod tests {
    use super::{Role, render_state, rollout_line, unavailable};

    #[test]
    fn a_rollout_line_says_when_a_stage_is_held_and_where_an_ended_one_was() {
        let rollout = |phase: &str, time_left_ms: serde_json::Value| {
            serde_json::json!({"phase": phase, "stage": 1, "stages": 4, "weight": 50.0,
                "time_left_ms": time_left_ms, "evaluations": 7})
        };
        assert_eq!(
            rollout_line(&rollout("progressing", 90_000.into())),
            "progressing  stage 2/4  weight 50.0%  time left 1m 30s  evaluations 7"
        );
        assert_eq!(
            rollout_line(&rollout("progressing", 0.into())),
            "progressing  stage 2/4  weight 50.0%  time left 0s (held until the guardrails decide)  evaluations 7"
        );
        assert_eq!(
            rollout_line(&rollout("paused", serde_json::Value::Null)),
            "paused  stage 2/4  weight 50.0%  time left -  evaluations 7"
        );
        assert_eq!(
            rollout_line(&rollout("aborted", 0.into())),
            "aborted  at stage 2/4 (weight 50.0% then)  evaluations 7"
        );
    }

    #[test]
    fn a_version_without_an_available_upstream_is_said_to_be_so() {
        let up = |upstream: &str, healthy: bool, ejected: bool| serde_json::json!({"upstream": upstream, "healthy": healthy, "ejected": ejected});
        let state = serde_json::json!({
            "generation": 4, "status": "steady",
            "stable": {"name": "v1", "upstreams": ["a:1", "b:1"],
                "health": [up("a:1", true, true), up("b:1", false, false)]},
            "canary": {"name": "v2", "upstreams": ["c:1"], "weight": 30.0,
                "health": [up("c:1", true, true)]},
            "shadow": {"name": "v9", "upstreams": ["d:1"], "percent": 10.0,
                "health": [up("d:1", false, false)]},
            "last_rollback": null, "rollout": null,
        });
        assert_eq!(
            render_state(&state),
            "status      steady  (generation 4)\n\
             stable      v1  [a:1 (ejected), b:1 (not healthy)]\n\
             \x20           no upstream of v1 is available: the ejected ones are tried anyway\n\
             canary      v2  [c:1 (ejected)]  weight 30.0%\n\
             \x20           no upstream of v2 is available: its cohort is served by stable (always before its first good probe), or gets 503s (health.canary_unavailable)\n\
             shadow      v9  [d:1 (not healthy)]  percent 10.0%\n\
             \x20           no upstream of v9 is available: no copies are sent\n"
        );
    }

    #[test]
    fn a_reason_cannot_forge_a_line_or_reach_the_terminal() {
        let state = serde_json::json!({
            "generation": 9, "status": "rolled_back",
            "stable": {"name": "v1", "upstreams": ["a:1"]},
            "canary": {"name": "v3", "upstreams": ["c:1"], "weight": 0.0},
            "last_rollback": {"at": "2026-04-19T10:00:00Z", "source": "api",
                "reason": "x\nstatus      steady\u{1b}[31mred"},
            "shadow": null, "rollout": null,
        });
        let shown = render_state(&state);
        assert!(!shown.contains('\u{1b}'), "{shown}");
        assert_eq!(shown.lines().filter(|l| l.starts_with("status")).count(), 1);
        assert!(
            shown.contains(r"api: x\nstatus      steady\u{1b}[31mred"),
            "{shown}"
        );
    }

    #[test]
    fn a_canary_at_weight_zero_has_no_cohort_to_warn_about() {
        let canary = serde_json::json!({"name": "v2", "upstreams": ["c:1"], "weight": 0.0,
            "health": [{"upstream": "c:1", "healthy": false, "ejected": false}]});
        assert_eq!(unavailable(&canary, Role::Canary), None);
        let mut open = canary.clone();
        open["weight"] = 10.0.into();
        assert!(unavailable(&open, Role::Canary).is_some());
    }

    #[test]
    fn a_rollback_is_tied_to_the_canary_only_while_it_is_in_effect() {
        let state = |status: &str| {
            serde_json::json!({
                "generation": 9, "status": status,
                "stable": {"name": "v1", "upstreams": ["a:1"]},
                "canary": {"name": "v3", "upstreams": ["c:1"], "weight": 0.0},
                "last_rollback": {"at": "2026-04-19T10:00:00Z", "reason": "p95", "source": "api"},
                "shadow": null, "rollout": null,
            })
        };
        let rollback = |status: &str| {
            render_state(&state(status))
                .lines()
                .find(|l| l.starts_with("rollback"))
                .map(str::to_owned)
        };
        assert_eq!(
            rollback("rolled_back").as_deref(),
            Some("rollback    v3 rolled back at 2026-04-19T10:00:00Z by api: p95")
        );
        assert_eq!(
            rollback("steady").as_deref(),
            Some(
                "rollback    none in effect (the last one was at 2026-04-19T10:00:00Z, by api: p95)"
            )
        );
    }
}
