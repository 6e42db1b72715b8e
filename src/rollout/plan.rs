//! Rollout plans as operators write them: TOML, or an agent release manifest.
//!
//! Owns: turning a plan file into the plan document (JSON in the shape of
//! the config's `[rollout]` table) that `POST /admin/rollout` takes and the
//! state file keeps: a TOML plan (bare, or under `[rollout]`), or a YAML
//! `kind: AgentRelease` manifest, whose `rollout:` section is mapped onto
//! the same keys. Does not own validation (`config::rollout_from_json`) or
//! running the plan (`controller`).

use serde::Deserialize;
use serde_json::{Map, Value, json};

use crate::config::{OnSuccess, RolloutConfig, Stage};

/// Why a plan file could not be read as a plan.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error("not a TOML plan: {0}")]
    Toml(String),
    #[error("not an AgentRelease manifest: {0}")]
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
    let value = serde_json::to_value(&table).map_err(|e| PlanError::Toml(e.to_string()))?;
    Ok(match value {
        Value::Object(mut map) if map.len() == 1 && map.contains_key("rollout") => {
            map.remove("rollout").unwrap_or_default()
        }
        other => other,
    })
}

/// The parts of an AgentRelease manifest a rollout reads.
#[derive(Debug, Deserialize)]
struct Manifest {
    kind: String,
    rollout: Option<ManifestRollout>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ManifestRollout {
    stages: Vec<ManifestStage>,
    #[serde(default)]
    guardrails: Option<ManifestGuardrails>,
    interval: Option<String>,
    failure_limit: Option<u32>,
    min_requests: Option<u64>,
    on_success: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ManifestStage {
    traffic: Option<f64>,
    duration: Option<String>,
    pause: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ManifestGuardrails {
    task_success_rate: Option<Bound>,
    p95_latency_ms: Option<Bound>,
    token_spend_delta: Option<Bound>,
    eval_score: Option<Bound>,
    confidence: Option<f64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Bound {
    min: Option<f64>,
    max: Option<f64>,
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
    let stages: Vec<Value> = rollout
        .stages
        .into_iter()
        .map(|s| match s {
            ManifestStage {
                pause: Some(true), ..
            } => json!({"pause": true}),
            ManifestStage {
                traffic, duration, ..
            } => json!({"weight": traffic, "duration": duration}),
        })
        .collect();
    let g = rollout.guardrails.unwrap_or_default();
    let mut guardrails = Map::new();
    let mut put = |key: &str, value: Option<f64>| {
        if let Some(v) = value {
            guardrails.insert(key.to_owned(), json!(v));
        }
    };
    put("success_rate_min", g.task_success_rate.and_then(|b| b.min));
    put("p95_latency_ms_max", g.p95_latency_ms.and_then(|b| b.max));
    // A spend delta of 0.15 allows the canary 15% more tokens per request.
    put(
        "tokens_ratio_max",
        g.token_spend_delta.and_then(|b| b.max).map(|d| 1.0 + d),
    );
    put("eval_score_min", g.eval_score.and_then(|b| b.min));
    put("confidence", g.confidence);
    let mut plan = Map::new();
    plan.insert("stages".into(), Value::Array(stages));
    plan.insert("guardrails".into(), Value::Object(guardrails));
    let optional = [
        ("interval", rollout.interval.map(Value::from)),
        ("failure_limit", rollout.failure_limit.map(Value::from)),
        ("min_requests", rollout.min_requests.map(Value::from)),
        ("on_success", rollout.on_success.map(Value::from)),
    ];
    for (key, value) in optional {
        if let Some(value) = value {
            plan.insert(key.into(), value);
        }
    }
    Ok(Value::Object(plan))
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
"#;
        let plan = rollout_from_json(document(text).unwrap()).unwrap();
        assert_eq!(rollout_from_json(to_document(&plan)).unwrap(), plan);
        assert_eq!(plan.stages.len(), 3);
        assert_eq!(plan.guardrails.success_rate_min, Some(0.97));
        assert_eq!(plan.guardrails.p95_latency_ms_max, Some(8000.0));
        assert!((plan.guardrails.tokens_ratio_max.unwrap() - 1.15).abs() < 1e-9);
        assert_eq!(plan.guardrails.eval_score_min, Some(0.9));
        assert!(document("kind: Deployment\n").is_err());
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
