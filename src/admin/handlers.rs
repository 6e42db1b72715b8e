//! One function per control-plane endpoint: parse the JSON, call `control`.
//!
//! Owns: the request bodies of SPEC section 3 (a JSON object each; unknown
//! or repeated fields, wrong types and bad JSON a 400 that names the field,
//! out-of-range values a 422, a body over 64 KiB a 413), and running each
//! change on the blocking pool: it may wait for the state lock and for the
//! disk, and must not hold up a runtime thread that `/health`, `/metrics`
//! and `GET /admin/state` are answered on. Does not own the effects.

use http::Request;
use http_body_util::{BodyExt as _, LengthLimitError, Limited};
use hyper::body::Incoming;
use serde::Deserialize;
use serde::de::DeserializeOwned;

use super::AdminError;
use std::sync::Arc;

use crate::control::{Control, ControlError, Explanation};
use crate::rollout::controller::Rollouts;
use crate::routing::Weight;
use crate::state::audit::Actor;
use crate::state::{LiveState, Source};

/// Admin bodies are small; a larger one is refused rather than buffered.
const MAX_BODY_BYTES: usize = 64 * 1024;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, expecting = "an object {\"weight\", \"force\"}")]
struct WeightBody {
    weight: f64,
    #[serde(default)]
    force: bool,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, expecting = "an object {\"reason\"}")]
struct RollbackBody {
    #[serde(default)]
    reason: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "an object {\"name\", \"upstreams\", \"weight\", \"force\"}"
)]
struct CanaryBody {
    name: String,
    upstreams: Vec<String>,
    #[serde(default)]
    weight: Option<f64>,
    /// Exposes again, above weight 0, the version that was rolled back.
    #[serde(default)]
    force: bool,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, expecting = "an object {\"force\"}")]
struct PromoteBody {
    /// Promotes a canary none of whose upstreams is healthy.
    #[serde(default)]
    force: bool,
}

/// Runs `change` on the blocking pool (see the module doc).
async fn off_the_runtime(
    control: &Arc<Control>,
    change: impl FnOnce(&Control) -> Result<LiveState, ControlError> + Send + 'static,
) -> Result<LiveState, AdminError> {
    let control = Arc::clone(control);
    tokio::task::spawn_blocking(move || change(&control))
        .await
        .map_err(|error| AdminError::Internal(format!("the change did not finish: {error}")))?
        .map_err(AdminError::from)
}

pub async fn weight(
    control: &Arc<Control>,
    req: Request<Incoming>,
) -> Result<LiveState, AdminError> {
    let body: WeightBody = read_json(req)
        .await?
        .ok_or_else(|| AdminError::BadRequest("a JSON body {\"weight\": N} is required".into()))?;
    let weight = Weight::from_percent(body.weight)
        .map_err(|m| AdminError::Unprocessable(format!("weight: {m}")))?;
    off_the_runtime(control, move |control| {
        control.set_weight(weight, body.force)
    })
    .await
}

pub async fn rollback(
    control: &Arc<Control>,
    req: Request<Incoming>,
) -> Result<LiveState, AdminError> {
    let body: RollbackBody = read_json(req).await?.unwrap_or_default();
    let reason = body.reason.map_or_else(
        || "rollback requested through the admin API".into(),
        kept_reason,
    );
    off_the_runtime(control, move |control| {
        control.rollback(&reason, Source::Api)
    })
    .await
}

/// The most characters of a given reason that are kept, `…` included.
const MAX_REASON_CHARS: usize = 1024;

/// `reason`, cut to [`MAX_REASON_CHARS`]: a rollback is never refused for
/// its reason, and a longer one would be stored whole in the state file,
/// the audit log and every answer that shows the state.
fn kept_reason(reason: String) -> String {
    if reason.chars().nth(MAX_REASON_CHARS).is_none() {
        return reason;
    }
    let mut kept: String = reason.chars().take(MAX_REASON_CHARS - 1).collect();
    kept.push('…');
    kept
}

pub async fn promote(
    control: &Arc<Control>,
    req: Request<Incoming>,
) -> Result<LiveState, AdminError> {
    let body: PromoteBody = read_json(req).await?.unwrap_or_default();
    off_the_runtime(control, move |control| {
        control.promote(body.force, Actor::Api)
    })
    .await
}

pub async fn canary(
    control: &Arc<Control>,
    req: Request<Incoming>,
) -> Result<LiveState, AdminError> {
    let body: CanaryBody = read_json(req).await?.ok_or_else(|| {
        AdminError::BadRequest(
            "a JSON body {\"name\", \"upstreams\", \"weight\"} is required".into(),
        )
    })?;
    let weight = match body.weight {
        None => Weight::ZERO,
        Some(w) => Weight::from_percent(w)
            .map_err(|m| AdminError::Unprocessable(format!("weight: {m}")))?,
    };
    off_the_runtime(control, move |control| {
        control.install_canary(&body.name, &body.upstreams, weight, body.force)
    })
    .await
}

#[derive(Debug, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "an object {\"name\", \"upstreams\", \"percent\"}"
)]
struct ShadowBody {
    name: String,
    upstreams: Vec<String>,
    percent: f64,
}

/// `PUT /admin/shadow`: `{"name", "upstreams", "percent"}` installs or changes it, `null` removes it.
pub async fn shadow(
    control: &Arc<Control>,
    req: Request<Incoming>,
) -> Result<LiveState, AdminError> {
    let body: Option<ShadowBody> = read_json(req).await?.ok_or_else(|| {
        AdminError::BadRequest(
            "a JSON body {\"name\", \"upstreams\", \"percent\"}, or null to remove the shadow, is required"
                .into(),
        )
    })?;
    let Some(body) = body else {
        return off_the_runtime(control, |control| control.set_shadow(None)).await;
    };
    let percent = Weight::from_percent(body.percent)
        .map_err(|m| AdminError::Unprocessable(format!("percent: {m}")))?;
    off_the_runtime(control, move |control| {
        control.set_shadow(Some((&body.name, &body.upstreams, percent)))
    })
    .await
}

pub fn route(control: &Control, req: &Request<Incoming>) -> Result<Explanation, AdminError> {
    // Decoded as the proxy decodes a `query:` key, to bytes.
    let key = req
        .uri()
        .query()
        .and_then(|query| crate::routing::key::query_value(query, "key"))
        .filter(|key| !key.is_empty())
        .ok_or_else(|| {
            AdminError::BadRequest("the query parameter key is required: /admin/route?key=K".into())
        })?;
    Ok(control.explain(&key))
}

/// `POST /admin/rollout/approve`: no body, or an empty object.
pub async fn rollout_approve(
    rollouts: &Rollouts,
    req: Request<Incoming>,
) -> Result<LiveState, AdminError> {
    let _: Option<Empty> = read_json(req).await?;
    Ok(rollouts.approve().await?)
}

/// `POST /admin/rollout/abort`: `{"reason"}` is optional, as for a rollback.
pub async fn rollout_abort(
    rollouts: &Rollouts,
    req: Request<Incoming>,
) -> Result<LiveState, AdminError> {
    let body: RollbackBody = read_json(req).await?.unwrap_or_default();
    let reason = body.reason.map(kept_reason);
    Ok(rollouts.abort(reason.as_deref()).await?)
}

/// `POST /admin/rollout`: the body is a plan document, or empty for the config's plan.
pub async fn rollout_start(
    rollouts: &Arc<Rollouts>,
    req: Request<Incoming>,
) -> Result<LiveState, AdminError> {
    let plan: Option<PlanDocument> = read_json(req).await?;
    Ok(rollouts.start(plan.map(|plan| plan.0), Actor::Api)?)
}

/// A plan document: any JSON object, kept as a value (the controller reads
/// and stores it), but with a field given twice refused, as in the other
/// bodies, rather than taken at its last value as `serde_json::Value` does.
struct PlanDocument(serde_json::Value);

impl<'de> Deserialize<'de> for PlanDocument {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(PlanVisitor).map(PlanDocument)
    }
}

struct PlanVisitor;

impl<'de> serde::de::Visitor<'de> for PlanVisitor {
    type Value = serde_json::Value;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Self::Value, E> {
        Ok(v.into())
    }

    fn visit_i64<E>(self, v: i64) -> Result<Self::Value, E> {
        Ok(v.into())
    }

    fn visit_u64<E>(self, v: u64) -> Result<Self::Value, E> {
        Ok(v.into())
    }

    fn visit_f64<E>(self, v: f64) -> Result<Self::Value, E> {
        Ok(v.into())
    }

    fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
        Ok(v.into())
    }

    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(serde_json::Value::Null)
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut items = Vec::new();
        while let Some(PlanDocument(item)) = seq.next_element()? {
            items.push(item);
        }
        Ok(items.into())
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut object = serde_json::Map::new();
        while let Some(key) = map.next_key::<String>()? {
            if object.contains_key(&key) {
                return Err(serde::de::Error::custom(format_args!(
                    "duplicate field `{key}`"
                )));
            }
            let PlanDocument(value) = map.next_value()?;
            object.insert(key, value);
        }
        Ok(object.into())
    }
}

#[derive(Debug, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "an object {\"version\", \"eval_score\"}"
)]
struct SignalBody {
    version: String,
    eval_score: f64,
}

/// `POST /admin/signals`: an outside judgement of a version.
pub async fn signals(
    rollouts: &Rollouts,
    req: Request<Incoming>,
) -> Result<serde_json::Value, AdminError> {
    let body: SignalBody = read_json(req).await?.ok_or_else(|| {
        AdminError::BadRequest("a JSON body {\"version\", \"eval_score\"} is required".into())
    })?;
    rollouts.record_eval_score(&body.version, body.eval_score)?;
    Ok(serde_json::json!({"version": body.version, "eval_score": body.eval_score}))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, expecting = "an empty object")]
struct Empty {}

/// Reads a JSON body; `None` when the body is empty.
async fn read_json<T: DeserializeOwned>(req: Request<Incoming>) -> Result<Option<T>, AdminError> {
    let bytes = Limited::new(req.into_body(), MAX_BODY_BYTES)
        .collect()
        .await
        .map_err(|e| {
            if e.is::<LengthLimitError>() {
                AdminError::PayloadTooLarge(MAX_BODY_BYTES)
            } else {
                AdminError::BadRequest(format!("cannot read the body: {e}"))
            }
        })?
        .to_bytes();
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    // serde would take an array for an object, its fields in order. (Read
    // from the bytes, not through a `Value`, which would keep the last of
    // a repeated field instead of refusing it.)
    let first = bytes.iter().find(|b| !b.is_ascii_whitespace());
    if !matches!(first, Some(b'{' | b'n')) {
        return Err(AdminError::BadRequest(
            "invalid JSON body: expected a JSON object".into(),
        ));
    }
    let mut json = serde_json::Deserializer::from_slice(&bytes);
    let value = serde_path_to_error::deserialize(&mut json).map_err(|error| {
        let message = crate::config::keyed("", error.path(), error.inner());
        AdminError::BadRequest(format!("invalid JSON body: {message}"))
    })?;
    json.end()
        .map_err(|e| AdminError::BadRequest(format!("invalid JSON body: {e}")))?;
    Ok(Some(value))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reason_is_kept_to_its_first_characters() {
        assert_eq!(kept_reason("bad prompt".into()), "bad prompt");
        let exact = "é".repeat(MAX_REASON_CHARS);
        assert_eq!(kept_reason(exact.clone()), exact);
        let cut = kept_reason("é".repeat(MAX_REASON_CHARS + 1));
        assert_eq!(cut, format!("{}…", "é".repeat(MAX_REASON_CHARS - 1)));
        assert_eq!(cut.chars().count(), MAX_REASON_CHARS);
    }

    fn plan(json: &str) -> Result<serde_json::Value, String> {
        let mut json = serde_json::Deserializer::from_str(json);
        serde_path_to_error::deserialize(&mut json)
            .map(|PlanDocument(value)| value)
            .map_err(|e| crate::config::keyed("", e.path(), e.inner()))
    }

    #[test]
    fn a_plan_document_is_read_whole_and_a_field_given_twice_is_named() {
        let text = r#"{"stages": [{"weight": 5, "duration": "1h"}, {"pause": true}],
                       "guardrails": {"success_rate_min": 0.99, "p95_latency_ratio_max": 1.5},
                       "min_requests": 100, "webhooks": [], "interval": null}"#;
        let expected: serde_json::Value = serde_json::from_str(text).unwrap();
        assert_eq!(plan(text).unwrap(), expected);

        let error = plan(r#"{"guardrails": {"success_rate_min": 0.99, "success_rate_min": 0.1}}"#)
            .unwrap_err();
        assert!(
            error.starts_with("guardrails: duplicate field `success_rate_min`"),
            "{error}"
        );
        let error = plan(r#"{"stages": [{"weight": 5, "weight": 50}]}"#).unwrap_err();
        assert!(
            error.starts_with("stages[0]: duplicate field `weight`"),
            "{error}"
        );
    }
}
