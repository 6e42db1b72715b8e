//! Rollout plans as operators write them: TOML, or an agent release manifest.
//!
//! Owns: turning a plan file into the plan document (JSON in the shape of
//! the config's `[rollout]` table) that `POST /admin/rollout` takes and the
//! state file keeps: a TOML plan (bare, or under `[rollout]`), or a YAML
//! `kind: AgentRelease` manifest, whose `rollout:` section is mapped onto
//! the same keys (a manifest guardrail without its one bound, `min` or
//! `max`, is refused here, as the mapping cannot carry it; a stage is
//! mapped key by key, so validation judges it as it judges a TOML plan's,
//! and a problem is named back by the manifest's own key). Refuses an
//! `inf` or `nan` in either, which JSON would carry as no value at all.
//! Does not own validation (`config::rollout_from_json`, which a
//! manifest's mapped plan is put through here) or running the plan
//! (`controller`).

use serde::Deserialize;
use serde_json::{Map, Value, json};

use crate::config::{ConfigError, OnSuccess, RolloutConfig, Stage, rollout_from_json};

/// Why a plan file could not be read as a plan.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error("the plan cannot be read as TOML: {0}")]
    Toml(String),
    #[error("the AgentRelease manifest cannot be read: {0}")]
    Yaml(String),
    #[error("{0}")]
    Manifest(String),
}

/// Reads a plan file: YAML when it says `kind: AgentRelease`, else TOML.
pub fn document(text: &str) -> Result<Value, PlanError> {
    if text.lines().any(|l| l.trim_start().starts_with("kind:")) {
        from_manifest(text)
    } else {
        from_toml(text)
    }
}

fn from_toml(text: &str) -> Result<Value, PlanError> {
    let table: toml::Table =
        toml::from_str(text).map_err(|e| PlanError::Toml(e.to_string().trim_end().to_owned()))?;
    if let Some(key) = non_finite(&table, "") {
        return Err(PlanError::Toml(format!("{key}: must be a finite number")));
    }
    let value = serde_json::to_value(&table).map_err(|e| PlanError::Toml(e.to_string()))?;
    Ok(match value {
        Value::Object(mut map) if map.len() == 1 && map.contains_key("rollout") => {
            map.remove("rollout").unwrap_or_default()
        }
        other => other,
    })
}

/// The first key under `table` that holds `inf` or `nan`: JSON, which the
/// plan travels in, has neither, and would carry it as `null` (no bound).
fn non_finite(table: &toml::Table, prefix: &str) -> Option<String> {
    fn walk(value: &toml::Value, key: String) -> Option<String> {
        match value {
            toml::Value::Float(f) if !f.is_finite() => Some(key),
            toml::Value::Table(table) => non_finite(table, &key),
            toml::Value::Array(items) => items
                .iter()
                .enumerate()
                .find_map(|(i, item)| walk(item, format!("{key}[{i}]"))),
            _ => None,
        }
    }
    table.iter().find_map(|(name, value)| {
        let key = if prefix.is_empty() {
            name.clone()
        } else {
            format!("{prefix}.{name}")
        };
        walk(value, key)
    })
}

/// The parts of an AgentRelease manifest a rollout reads.
#[derive(Debug, Deserialize)]
struct Manifest {
    kind: String,
    rollout: Option<ManifestRollout>,
}

#[derive(Debug, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a mapping of rollout keys (stages, guardrails, ...)"
)]
struct ManifestRollout {
    stages: Vec<ManifestStage>,
    #[serde(default)]
    guardrails: Option<ManifestGuardrails>,
    interval: Option<String>,
    failure_limit: Option<u32>,
    min_requests: Option<u64>,
    inconclusive_limit: Option<u32>,
    on_success: Option<String>,
    webhooks: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ManifestStage {
    traffic: Option<f64>,
    duration: Option<String>,
    pause: Option<bool>,
}

/// Each guardrail takes the one bound that makes sense for it, so a floor
/// written as a ceiling (or no bound at all) is refused by its key rather
/// than dropped, which would leave the rollout unguarded.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ManifestGuardrails {
    #[serde(default, deserialize_with = "present")]
    task_success_rate: Option<Floor>,
    #[serde(default, deserialize_with = "present")]
    p95_latency_ms: Option<Ceiling>,
    #[serde(default, deserialize_with = "present")]
    token_spend_delta: Option<Ceiling>,
    #[serde(default, deserialize_with = "present")]
    eval_score: Option<Floor>,
    confidence: Option<f64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a lower bound such as { min: 0.9 }")]
struct Floor {
    min: f64,
}

#[derive(Debug, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "an upper bound such as { max: 8000 }"
)]
struct Ceiling {
    max: f64,
}

/// A guardrail written with no value at all (`p95_latency_ms:`) is refused
/// like one without its bound, not read as absent.
fn present<'de, D, T>(deserializer: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    T::deserialize(deserializer).map(Some)
}

fn from_manifest(text: &str) -> Result<Value, PlanError> {
    let manifest: Manifest =
        serde_yaml_ng::from_str(text).map_err(|e| PlanError::Yaml(e.to_string()))?;
    if manifest.kind != "AgentRelease" {
        return Err(PlanError::Manifest(format!(
            "kind: {:?} is not AgentRelease",
            manifest.kind
        )));
    }
    let rollout = manifest
        .rollout
        .ok_or_else(|| PlanError::Manifest("the manifest has no rollout: section".into()))?;
    // Each key written is carried over, renamed, and none made up: the
    // plan's validation then takes or refuses a manifest's stage as it does
    // a TOML plan's (a stage with both a pause and a weight is refused by
    // its index there, not read as the one or the other here).
    let stages: Vec<Value> = rollout
        .stages
        .into_iter()
        .map(|stage| {
            let mut keys = Map::new();
            let written = [
                ("weight", stage.traffic.map(Value::from)),
                ("duration", stage.duration.map(Value::from)),
                ("pause", stage.pause.map(Value::from)),
            ];
            for (key, value) in written {
                if let Some(value) = value {
                    keys.insert(key.into(), value);
                }
            }
            Value::Object(keys)
        })
        .collect();
    let g = rollout.guardrails.unwrap_or_default();
    let bounds = [
        (
            "task_success_rate.min",
            g.task_success_rate.as_ref().map(|b| b.min),
        ),
        (
            "p95_latency_ms.max",
            g.p95_latency_ms.as_ref().map(|b| b.max),
        ),
        (
            "token_spend_delta.max",
            g.token_spend_delta.as_ref().map(|b| b.max),
        ),
        ("eval_score.min", g.eval_score.as_ref().map(|b| b.min)),
        ("confidence", g.confidence),
    ];
    if let Some((key, _)) = bounds
        .iter()
        .find(|(_, bound)| bound.is_some_and(|b| !b.is_finite()))
    {
        return Err(PlanError::Manifest(format!(
            "rollout.guardrails.{key}: must be a finite number"
        )));
    }
    let mut guardrails = Map::new();
    let mut put = |key: &str, value: Option<f64>| {
        if let Some(v) = value {
            guardrails.insert(key.to_owned(), json!(v));
        }
    };
    put("success_rate_min", g.task_success_rate.map(|b| b.min));
    put("p95_latency_ms_max", g.p95_latency_ms.map(|b| b.max));
    // A spend delta of 0.15 allows the canary 15% more tokens per request;
    // one of -1 or less would allow none at all.
    if let Some(delta) = &g.token_spend_delta
        && delta.max <= -1.0
    {
        return Err(PlanError::Manifest(format!(
            "rollout.guardrails.token_spend_delta.max: {} must be above -1 (0.15 allows 15% more tokens per request than stable)",
            delta.max
        )));
    }
    put("tokens_ratio_max", g.token_spend_delta.map(|b| 1.0 + b.max));
    put("eval_score_min", g.eval_score.map(|b| b.min));
    put("confidence", g.confidence);
    let mut plan = Map::new();
    plan.insert("stages".into(), Value::Array(stages));
    plan.insert("guardrails".into(), Value::Object(guardrails));
    let optional = [
        ("interval", rollout.interval.map(Value::from)),
        ("failure_limit", rollout.failure_limit.map(Value::from)),
        ("min_requests", rollout.min_requests.map(Value::from)),
        (
            "inconclusive_limit",
            rollout.inconclusive_limit.map(Value::from),
        ),
        ("on_success", rollout.on_success.map(Value::from)),
        ("webhooks", rollout.webhooks.map(Value::from)),
    ];
    for (key, value) in optional {
        if let Some(value) = value {
            plan.insert(key.into(), value);
        }
    }
    // Checked here as well as where it is sent, so that a problem is named
    // as the manifest writes it.
    let plan = Value::Object(plan);
    if let Err(ConfigError::Invalid(problems)) = rollout_from_json(plan.clone()) {
        let named: Vec<String> = problems
            .iter()
            .map(|problem| {
                format!(
                    "{}: {}",
                    manifest_key(&problem.key),
                    problem.message.replace(
                        "{ weight, duration } or { pause = true }",
                        "{ traffic, duration } or { pause: true }"
                    )
                )
            })
            .collect();
        return Err(PlanError::Manifest(named.join("; ")));
    }
    Ok(plan)
}

/// The manifest's name for a key of the plan it maps onto: under
/// `rollout:`, and in the manifest's words.
fn manifest_key(plan_key: &str) -> String {
    const RENAMED: [(&str, &str); 3] = [
        (
            "guardrails.success_rate_min",
            "guardrails.task_success_rate.min",
        ),
        (
            "guardrails.p95_latency_ms_max",
            "guardrails.p95_latency_ms.max",
        ),
        ("guardrails.eval_score_min", "guardrails.eval_score.min"),
    ];
    let named = match RENAMED.iter().find(|(plan, _)| *plan == plan_key) {
        Some((_, named)) => (*named).to_owned(),
        None => match plan_key.strip_suffix(".weight") {
            Some(stage) if stage.starts_with("stages[") => format!("{stage}.traffic"),
            _ => plan_key.to_owned(),
        },
    };
    format!("rollout.{named}")
}

/// The plan document of a validated plan (the inverse of
/// `config::rollout_from_json`), for the `[rollout]` table of the config.
#[must_use]
pub fn to_document(plan: &RolloutConfig) -> Value {
    let duration = |d: std::time::Duration| humantime::format_duration(d).to_string();
    let stages: Vec<Value> = plan
        .stages
        .iter()
        .map(|stage| match stage {
            Stage::Pause => json!({"pause": true}),
            Stage::Weight {
                weight,
                duration: d,
            } => json!({"weight": weight.percent(), "duration": duration(*d)}),
        })
        .collect();
    let g = &plan.guardrails;
    let mut guardrails = Map::new();
    let limits = [
        ("success_rate_min", g.success_rate_min),
        ("success_rate_drop_max", g.success_rate_drop_max),
        ("p95_latency_ratio_max", g.p95_latency_ratio_max),
        ("p95_latency_ms_max", g.p95_latency_ms_max),
        ("tokens_ratio_max", g.tokens_ratio_max),
        ("eval_score_min", g.eval_score_min),
        ("confidence", Some(g.confidence)),
    ];
    for (key, value) in limits {
        if let Some(v) = value {
            guardrails.insert(key.into(), json!(v));
        }
    }
    json!({
        "interval": duration(plan.interval),
        "failure_limit": plan.failure_limit,
        "min_requests": plan.min_requests,
        "inconclusive_limit": plan.inconclusive_limit,
        "on_success": match plan.on_success { OnSuccess::Promote => "promote", OnSuccess::Hold => "hold" },
        "stages": stages,
        "guardrails": guardrails,
        "webhooks": plan.webhooks,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::rollout_from_json;

    #[test]
    fn toml_plans_bare_or_under_rollout() {
        let bare = "interval = \"1s\"\nstages = [ { weight = 1, duration = \"30m\" }, { pause = true } ]\n";
        let wrapped = format!("[rollout]\n{bare}");
        for text in [bare, wrapped.as_str()] {
            let plan = rollout_from_json(document(text).unwrap()).unwrap();
            assert_eq!(plan.stages.len(), 2);
        }
    }

    #[test]
    fn agent_release_manifest_maps_onto_the_plan() {
        let text = r#"
apiVersion: cohort/v1
kind: AgentRelease
metadata:
  name: support-agent
rollout:
  stages:
    - { traffic: 1, duration: 30m }
    - { pause: true }
    - { traffic: 50, duration: 2h }
  guardrails:
    task_success_rate: { min: 0.97 }
    p95_latency_ms: { max: 8000 }
    token_spend_delta: { max: 0.15 }
    eval_score: { min: 0.9 }
  inconclusive_limit: 4
  webhooks: ["https://hooks.example/release"]
"#;
        let plan = rollout_from_json(document(text).unwrap()).unwrap();
        assert_eq!(plan.inconclusive_limit, 4);
        assert_eq!(plan.webhooks, ["https://hooks.example/release"]);
        assert_eq!(rollout_from_json(to_document(&plan)).unwrap(), plan);
        assert_eq!(plan.stages.len(), 3);
        assert_eq!(plan.guardrails.success_rate_min, Some(0.97));
        assert_eq!(plan.guardrails.p95_latency_ms_max, Some(8000.0));
        assert!((plan.guardrails.tokens_ratio_max.unwrap() - 1.15).abs() < 1e-9);
        assert_eq!(plan.guardrails.eval_score_min, Some(0.9));
        assert!(document("kind: Deployment\n").is_err());
    }

    #[test]
    fn a_manifest_stage_with_traffic_and_a_pause_is_refused_by_its_index() {
        let manifest = |stage: &str| {
            format!(
                "kind: AgentRelease\nrollout:\n  stages:\n    - {{ traffic: 1, duration: 30m }}\n    - {stage}\n"
            )
        };
        for stage in [
            "{ traffic: 10, duration: 1m, pause: true }",
            "{ traffic: 10, pause: true }",
            "{ duration: 1m, pause: true }",
        ] {
            match document(&manifest(stage)) {
                Err(error) => assert!(
                    error.to_string().contains(
                        "rollout.stages[1]: must be either { traffic, duration } or { pause: true }"
                    ),
                    "{stage}: {error}"
                ),
                Ok(plan) => panic!("{stage} was taken as {plan}"),
            }
        }
        // A pause alone, and traffic with `pause: false`, are still taken.
        for (stage, expected) in [
            ("{ pause: true }", Stage::Pause),
            (
                "{ traffic: 10, duration: 1m, pause: false }",
                Stage::Weight {
                    weight: crate::routing::Weight::from_percent(10.0).expect("a weight"),
                    duration: std::time::Duration::from_secs(60),
                },
            ),
        ] {
            let plan = rollout_from_json(document(&manifest(stage)).unwrap()).unwrap();
            assert_eq!(plan.stages[1], expected, "{stage}");
        }
    }

    #[test]
    fn a_manifest_value_out_of_range_is_named_as_the_manifest_writes_it() {
        let manifest = "kind: AgentRelease\nrollout:\n  stages: [ { traffic: 500, duration: 1m } ]\n  \
                        guardrails:\n    task_success_rate: { min: 1.5 }\n    p95_latency_ms: { max: 0 }\n";
        let error = document(manifest).unwrap_err().to_string();
        for key in [
            "rollout.stages[0].traffic: ",
            "rollout.guardrails.task_success_rate.min: ",
            "rollout.guardrails.p95_latency_ms.max: ",
        ] {
            assert!(error.contains(key), "{key} in {error}");
        }
    }

    #[test]
    fn an_infinite_bound_is_refused_not_carried_as_no_bound() {
        let toml = "stages = [ { weight = 1, duration = \"1m\" } ]\n\
                    [guardrails]\ntokens_ratio_max = inf\n";
        let error = document(toml).unwrap_err().to_string();
        assert!(
            error.contains("guardrails.tokens_ratio_max: must be a finite number"),
            "{error}"
        );
        let manifest = "kind: AgentRelease\nrollout:\n  stages: [ { traffic: 1, duration: 1m } ]\n  \
                        guardrails:\n    p95_latency_ms: { max: .inf }\n";
        let error = document(manifest).unwrap_err().to_string();
        assert!(
            error.contains("rollout.guardrails.p95_latency_ms.max: must be a finite number"),
            "{error}"
        );
    }

    #[test]
    fn a_spend_delta_that_would_allow_no_tokens_is_refused_by_its_own_key() {
        let text = "kind: AgentRelease\nrollout:\n  stages: [ { traffic: 1, duration: 1m } ]\n  \
                    guardrails:\n    token_spend_delta: { max: -2 }\n";
        let error = document(text).unwrap_err().to_string();
        assert!(
            error.contains("rollout.guardrails.token_spend_delta.max: -2 must be above -1"),
            "{error}"
        );
    }

    #[test]
    fn a_guardrail_without_its_own_bound_is_refused_by_its_key() {
        let manifest = |guardrail: &str| {
            format!(
                "kind: AgentRelease\nrollout:\n  stages:\n    - {{ traffic: 1, duration: 30m }}\n  \
                 guardrails:\n    task_success_rate: {{ min: 0.97 }}\n    {guardrail}\n"
            )
        };
        let refused = |guardrail: &str| match document(&manifest(guardrail)) {
            Err(error) => error.to_string(),
            Ok(plan) => panic!("{guardrail:?} was taken as {plan}"),
        };
        // A bound on the wrong side.
        let error = refused("p95_latency_ms: { min: 100 }");
        assert!(
            error
                .contains("rollout.guardrails.p95_latency_ms: unknown field `min`, expected `max`"),
            "{error}"
        );
        assert!(error.contains("line 7"), "{error}");
        let error = refused("eval_score: { max: 0.2 }");
        assert!(
            error.contains("rollout.guardrails.eval_score: unknown field `max`, expected `min`"),
            "{error}"
        );
        // Both sides, no bound, no value.
        let error = refused("token_spend_delta: { min: 0, max: 0.15 }");
        assert!(
            error.contains("rollout.guardrails.token_spend_delta: unknown field `min`"),
            "{error}"
        );
        let error = refused("p95_latency_ms: {}");
        assert!(
            error.contains("rollout.guardrails.p95_latency_ms: missing field `max`"),
            "{error}"
        );
        let error = refused("eval_score:");
        assert!(
            error.contains("rollout.guardrails.eval_score: missing field `min`"),
            "{error}"
        );
        let error = refused("eval_score: 0.9");
        assert!(
            error.contains(
                "rollout.guardrails.eval_score: invalid type: floating point `0.9`, \
                 expected a lower bound such as { min: 0.9 }"
            ),
            "{error}"
        );
        // The right bound is still taken.
        let plan = rollout_from_json(document(&manifest("eval_score: { min: 0.8 }")).unwrap());
        assert_eq!(plan.unwrap().guardrails.eval_score_min, Some(0.8));
    }

    #[test]
    fn a_toml_plans_guardrail_with_the_wrong_bound_is_refused_by_its_key() {
        let plan = |guardrails: &str| {
            format!(
                "stages = [ {{ weight = 1, duration = \"30m\" }} ]\n[guardrails]\n{guardrails}\n"
            )
        };
        for (guardrails, key) in [
            ("p95_latency_ms_min = 100", "guardrails.p95_latency_ms_min"),
            ("eval_score_max = 0.2", "guardrails.eval_score_max"),
            (
                "p95_latency_ms = { min = 100 }",
                "guardrails.p95_latency_ms",
            ),
        ] {
            match rollout_from_json(document(&plan(guardrails)).unwrap()) {
                Err(error) => assert!(
                    error
                        .to_string()
                        .contains(&format!("{key}: is not a known key")),
                    "{guardrails}: {error}"
                ),
                Ok(plan) => panic!("{guardrails:?} was taken as {plan:?}"),
            }
        }
    }

    #[test]
    fn shipped_examples_are_valid_plans() {
        for text in [
            include_str!("../../config/rollout.toml"),
            include_str!("../../config/agent-release.yaml"),
        ] {
            let plan = rollout_from_json(document(text).unwrap()).unwrap();
            assert_eq!(plan.stages.len(), 5);
        }
    }
}
