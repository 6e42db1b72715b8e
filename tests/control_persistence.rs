//! State that survives, with the real binary: `cohort serve` killed and restarted.
//!
//! Owns: a weight change acknowledged by the admin API survives `kill -9`;
//! a restart with the same config keeps the live state; an edited
//! `[versions]` re-seeds (and the audit log says `reseed`); a corrupt state
//! file stops the start with a message naming the file; `--reset-state`
//! re-seeds, keeping the unreadable file beside the new one; a rollback the disk refused stays live and is saved once the
//! disk allows; an audit log that cannot be written stops the start, and
//! a port that cannot be bound stops it before the state is touched; a
//! restart does not start the configured plan again, but does start it for
//! a canary whose seed was saved and whose plan was not (a stop between the
//! two writes); a change saved but not logged (a stop between those two
//! writes) is told at the next start; a weight set at run time outlives an edit of `[versions]`
//! that leaves the canary and its weight alone; every audit line is JSON with time, action, before, after,
//! reason and source. Does not own: the restore rule's unit tests
//! (`state`), signals (`control_signals`).

mod support;

use std::net::SocketAddr;
use std::path::PathBuf;

use http::Method;
use serde_json::{Value, json};
use support::{
    AdminApi, Backend, CANARY, Http, Process, STABLE, audit_lines, config, eventually,
    eventually_async, key_on, predicted,
};

/// A config file for `cohort serve`, next to its state file and audit log.
struct Files {
    config: PathBuf,
    state: PathBuf,
    audit: PathBuf,
    text: String,
}

impl Files {
    fn new(text: String) -> Files {
        let parsed = cohort::config::Config::parse(&text, "test").expect("a valid test config");
        let state = parsed.state.path.clone();
        let config = state.with_file_name("cohort.toml");
        std::fs::write(&config, &text).expect("write the config");
        Files {
            config,
            state,
            audit: parsed.state.audit_log.clone(),
            text,
        }
    }

    fn rewrite(&mut self, from: &str, to: &str) {
        assert!(self.text.contains(from), "{from:?} not in\n{}", self.text);
        self.text = self.text.replacen(from, to, 1);
        std::fs::write(&self.config, &self.text).expect("rewrite the config");
    }

    /// Gives the version whose only upstream is `upstream` a second one: an
    /// edit of `[versions]` that renames nothing.
    fn add_upstream(&mut self, upstream: SocketAddr, another: SocketAddr) {
        self.rewrite(
            &format!("upstreams = [\"{upstream}\"]"),
            &format!("upstreams = [\"{upstream}\", \"{another}\"]"),
        );
    }

    fn audit(&self) -> Vec<Value> {
        let lines = audit_lines(&self.audit);
        for line in &lines {
            assert_audit_shape(line);
        }
        lines
    }

    /// Makes every state write of `process` fail, even as root: a directory
    /// where its temporary file goes. Returns it, to be removed.
    fn block_writes(&self, process: &Process) -> PathBuf {
        assert!(
            self.state.ends_with("state.json"),
            "{}",
            self.state.display()
        );
        let blocker = self
            .state
            .with_file_name(format!("state.json.tmp.{}", process.pid()));
        std::fs::create_dir(&blocker).expect("create the blocker");
        blocker
    }

    /// The state file, which must be whole JSON.
    fn saved(&self) -> Value {
        serde_json::from_slice(&std::fs::read(&self.state).expect("the state file"))
            .expect("the state file is whole JSON")
    }

    fn last_audit(&self) -> Value {
        self.audit().pop().expect("an audit line")
    }
}

/// An audit line has exactly the SPEC's fields, with an RFC 3339 time.
fn assert_audit_shape(line: &Value) {
    let object = line.as_object().expect("an audit line is a JSON object");
    let mut keys: Vec<&str> = object.keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(
        keys,
        ["action", "after", "before", "reason", "source", "time"],
        "{line}"
    );
    let time = line["time"].as_str().expect("a time string");
    humantime::parse_rfc3339(time).unwrap_or_else(|e| panic!("time {time:?}: {e}"));
    assert!(
        line["action"].is_string() && line["source"].is_string(),
        "{line}"
    );
    assert!(line["after"].is_object(), "{line}");
    assert!(
        line["before"].is_object() || line["before"].is_null(),
        "{line}"
    );
    assert!(
        line["reason"].is_string() || line["reason"].is_null(),
        "{line}"
    );
}

async fn canary_weight(process: &Process) -> (f64, u64, Value) {
    let state = AdminApi::new(process.admin).state().await;
    let weight = state["canary"]["weight"].as_f64().expect("a canary weight");
    let generation = state["generation"].as_u64().expect("a generation");
    (weight, generation, state)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_acknowledged_change_survives_kill_9_and_a_restart() {
    let stable = Backend::start(STABLE).await;
    let canary = Backend::start(CANARY).await;
    let files = Files::new(config(&[stable.addr], Some((&[canary.addr], 10.0)), ""));

    let first = Process::serve(&files.config, &[]).await;
    assert_eq!(files.last_audit()["action"], "seed");
    let changed = AdminApi::new(first.admin).set_weight(37.5, false).await;
    let generation = changed["generation"].as_u64().expect("a generation");
    // Killed the moment the change is acknowledged: no chance to flush anything later.
    first.kill9().await;

    let second = Process::serve(&files.config, &[]).await;
    let (weight, restored_generation, state) = canary_weight(&second).await;
    assert_eq!((weight, restored_generation), (37.5, generation), "{state}");
    assert_eq!(state["status"], "steady", "{state}");
    // Traffic follows the restored weight, not the config's.
    let key = (0..10_000)
        .map(|i| format!("restored-{i}"))
        .find(|k| predicted(CANARY, 37.5, k) == CANARY && predicted(CANARY, 10.0, k) == STABLE)
        .expect("a key between 10% and 37.5%");
    let reply = Http::new(second.proxy)
        .get("/", &[("x-user-id", &key)])
        .await;
    assert_eq!(reply.version(), CANARY);
    second.log_line(&["restored the saved state"]).await;
    let last = files.last_audit();
    assert_eq!(
        (&last["action"], &last["source"]),
        (&"restore".into(), &"start".into()),
        "{last}"
    );

    // A clean restart with the same config keeps the live state too.
    assert_eq!(second.stop().await, Some(0));
    let third = Process::serve(&files.config, &[]).await;
    let (weight, again, state) = canary_weight(&third).await;
    assert_eq!((weight, again), (37.5, generation), "{state}");

    // The audit log holds the whole story, line by line.
    let actions: Vec<String> = files
        .audit()
        .iter()
        .map(|l| l["action"].as_str().expect("an action").to_owned())
        .collect();
    assert_eq!(actions, ["seed", "weight", "restore", "restore"]);
    let weight_line = &files.audit()[1];
    assert_eq!(
        weight_line["before"]["canary"]["weight"], 10.0,
        "{weight_line}"
    );
    assert_eq!(
        weight_line["after"]["canary"]["weight"], 37.5,
        "{weight_line}"
    );
    assert_eq!(weight_line["source"], "api", "{weight_line}");
    assert_eq!(third.stop().await, Some(0));
}

/// Kills `process` once it has set the canary's weight to `weight`, then
/// cuts that change's line from the audit log, as a stop between the
/// state file's write and the log's would leave it. Returns the change's
/// generation.
async fn set_weight_then_stop_before_its_audit_line(
    process: Process,
    files: &Files,
    weight: f64,
) -> u64 {
    let changed = AdminApi::new(process.admin).set_weight(weight, false).await;
    process.kill9().await;
    let text = std::fs::read_to_string(&files.audit).expect("read the log");
    let (kept, last) = text
        .trim_end()
        .rsplit_once('\n')
        .expect("a line before the weight's");
    assert!(last.contains("\"weight\""), "{text}");
    std::fs::write(&files.audit, format!("{kept}\n")).expect("cut the log");
    changed["generation"].as_u64().expect("a generation")
}

/// A change saved whose audit line never went in (the process stopped
/// between the two writes) is told at the next start: its `restore` line
/// names the gap and starts from the last state logged; a `reseed` line
/// names it too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_saved_but_not_logged_is_told_at_the_next_start() {
    let stable = Backend::start(STABLE).await;
    let canary = Backend::start(CANARY).await;
    let mut files = Files::new(config(&[stable.addr], Some((&[canary.addr], 10.0)), ""));

    let first = Process::serve(&files.config, &[]).await;
    let generation = set_weight_then_stop_before_its_audit_line(first, &files, 37.5).await;

    let second = Process::serve(&files.config, &[]).await;
    second
        .log_line(&["the state file has changes the audit log does not"])
        .await;
    let last = files.last_audit();
    assert_eq!(last["action"], "restore", "{last}");
    assert_eq!(last["before"]["generation"], generation - 1, "{last}");
    assert_eq!(last["before"]["canary"]["weight"], 10.0, "{last}");
    assert_eq!(last["after"]["generation"], generation, "{last}");
    assert_eq!(last["after"]["canary"]["weight"], 37.5, "{last}");
    let reason = last["reason"].as_str().expect("a reason");
    assert!(reason.contains("saved but not logged"), "{reason}");

    // Once the log has caught up, a restart says nothing more.
    assert_eq!(second.stop().await, Some(0));
    let third = Process::serve(&files.config, &[]).await;
    let last = files.last_audit();
    assert_eq!(last["before"], Value::Null, "{last}");
    assert_eq!(last["reason"], "restored the saved state", "{last}");

    // A gap before a start that re-seeds is named too.
    let generation = set_weight_then_stop_before_its_audit_line(third, &files, 20.0).await;
    files.rewrite(
        &format!("name = \"{CANARY}\""),
        &format!("name = \"{CANARY}-renamed\""),
    );
    let fourth = Process::serve(&files.config, &[]).await;
    let last = files.last_audit();
    assert_eq!(last["action"], "reseed", "{last}");
    assert_eq!(last["before"]["generation"], generation, "{last}");
    let reason = last["reason"].as_str().expect("a reason");
    assert!(reason.contains("saved but not logged"), "{reason}");
    assert_eq!(fourth.stop().await, Some(0));
}

/// An edit of a canary since promoted decides nothing: the next start
/// restores the state under its generation, and says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edit_of_versions_the_state_moved_past_restores_it() {
    let stable = Backend::start(STABLE).await;
    let canary = Backend::start(CANARY).await;
    let mut files = Files::new(config(&[stable.addr], Some((&[canary.addr], 10.0)), ""));

    let first = Process::serve(&files.config, &[]).await;
    AdminApi::new(first.admin).promote().await;
    let before = AdminApi::new(first.admin).state().await;
    assert_eq!(first.stop().await, Some(0));

    files.rewrite("weight = 10\n", "weight = 25\n");
    let second = Process::serve(&files.config, &[]).await;
    second.log_line(&["nothing re-seeded"]).await;
    let after = AdminApi::new(second.admin).state().await;
    assert_eq!(after, before);
    let last = files.last_audit();
    assert_eq!(last["action"], "restore", "{last}");
    assert_eq!(second.stop().await, Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edited_versions_section_reseeds_and_says_so() {
    let stable = Backend::start(STABLE).await;
    let canary = Backend::start(CANARY).await;
    let mut files = Files::new(config(&[stable.addr], Some((&[canary.addr], 10.0)), ""));

    let first = Process::serve(&files.config, &[]).await;
    let changed = AdminApi::new(first.admin).set_weight(60.0, false).await;
    let generation = changed["generation"].as_u64().expect("a generation");
    assert_eq!(first.stop().await, Some(0));

    files.rewrite("weight = 10\n", "weight = 25\n");
    let second = Process::serve(&files.config, &[]).await;
    let (weight, reseeded, state) = canary_weight(&second).await;
    assert_eq!(
        weight, 25.0,
        "the edited config is the newer intent: {state}"
    );
    assert_eq!(reseeded, generation + 1, "{state}");
    second.log_line(&["re-seeded", "[versions]"]).await;
    let last = files.last_audit();
    assert_eq!(last["action"], "reseed", "{last}");
    assert_eq!(last["source"], "start", "{last}");
    assert_eq!(last["before"]["canary"]["weight"], 60.0, "{last}");
    assert_eq!(last["after"]["canary"]["weight"], 25.0, "{last}");
    assert!(
        last["reason"]
            .as_str()
            .is_some_and(|r| r.contains("[versions]")),
        "{last}"
    );
    let key = key_on(CANARY, 25.0, CANARY, "reseeded");
    let reply = Http::new(second.proxy)
        .get("/", &[("x-user-id", &key)])
        .await;
    assert_eq!(reply.version(), CANARY);
    assert_eq!(second.stop().await, Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_state_file_stops_the_start_until_reset() {
    let stable = Backend::start(STABLE).await;
    let canary = Backend::start(CANARY).await;
    let files = Files::new(config(&[stable.addr], Some((&[canary.addr], 10.0)), ""));

    let first = Process::serve(&files.config, &[]).await;
    AdminApi::new(first.admin).set_weight(70.0, false).await;
    assert_eq!(first.stop().await, Some(0));

    let torn = b"{\"versions_digest\": \"abc\", \"generation\": 2, \"sta";
    std::fs::write(&files.state, torn).expect("corrupt the state file");
    let refused = Process::try_serve(&files.config, &[])
        .await
        .err()
        .expect("cohort serve refuses a corrupt state file");
    assert_ne!(refused.code, Some(0), "{refused:?}");
    assert!(refused.code.is_some(), "died by a signal: {refused:?}");
    let path = files.state.display().to_string();
    assert!(
        refused.log.contains(&path),
        "the file is not named: {refused:?}"
    );
    assert!(refused.log.contains("--reset-state"), "{refused:?}");
    assert!(!refused.log.contains("cohort is serving"), "{refused:?}");
    // Never a silent reset: the file is left for the operator.
    assert_eq!(std::fs::read(&files.state).expect("the state file"), torn);

    let reset = Process::serve(&files.config, &["--reset-state"]).await;
    let (weight, _, state) = canary_weight(&reset).await;
    assert_eq!(weight, 10.0, "re-seeded from the config: {state}");
    assert_eq!(state["status"], "steady", "{state}");
    let last = files.last_audit();
    assert_eq!(
        (&last["action"], &last["source"]),
        (&"reset".into(), &"start".into())
    );
    let saved = files.saved();
    assert_eq!(saved["canary"]["weight"], 10.0, "{saved}");
    // Nothing is lost: the unreadable file is kept beside the new one.
    let dir = files.state.parent().expect("a state directory");
    let kept: Vec<Vec<u8>> = std::fs::read_dir(dir)
        .expect("list the state directory")
        .filter_map(Result::ok)
        .filter(|entry| {
            entry
                .file_name()
                .to_string_lossy()
                .starts_with("state.json.unreadable-")
        })
        .map(|entry| std::fs::read(entry.path()).expect("read the kept file"))
        .collect();
    assert_eq!(kept, [torn.to_vec()]);

    // --reset-state over a good state file re-seeds it as well.
    let changed = AdminApi::new(reset.admin).set_weight(80.0, false).await;
    let generation = changed["generation"].as_u64().expect("a generation");
    assert_eq!(reset.stop().await, Some(0));
    let again = Process::serve(&files.config, &["--reset-state"]).await;
    let (weight, reset_generation, state) = canary_weight(&again).await;
    assert_eq!(weight, 10.0, "{state}");
    assert!(reset_generation > generation, "{state}");
    let last = files.last_audit();
    assert_eq!(last["action"], "reset", "{last}");
    assert_eq!(last["before"]["canary"]["weight"], 80.0, "{last}");
    assert_eq!(again.stop().await, Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollback_that_could_not_be_saved_is_saved_once_the_disk_allows() {
    let stable = Backend::start(STABLE).await;
    let canary = Backend::start(CANARY).await;
    let files = Files::new(config(&[stable.addr], Some((&[canary.addr], 10.0)), ""));
    let first = Process::serve(&files.config, &[]).await;
    let admin = AdminApi::new(first.admin);
    admin.set_weight(40.0, false).await;
    let saved = || files.saved();
    assert_eq!(saved()["status"], "steady");

    let blocker = files.block_writes(&first);

    let reply = admin
        .call(
            Method::POST,
            "/admin/rollback",
            json!({"reason": "disk full"}),
        )
        .await;
    assert_eq!(reply.status, 500, "{reply:?}");
    assert!(
        reply.json()["error"]
            .as_str()
            .is_some_and(|e| e.starts_with("rolled back, but the state could not be saved")),
        "{reply:?}"
    );
    // Live at once, though not on disk yet.
    let state = admin.state().await;
    assert_eq!(
        (&state["status"], &state["canary"]["weight"]),
        (&"rolled_back".into(), &0.0.into()),
        "{state}"
    );
    assert_eq!(saved()["status"], "steady");
    // Asked again, it is still not saved, and says so: automation that
    // retries until it succeeds goes on.
    let again = admin
        .call(Method::POST, "/admin/rollback", json!({"reason": "again"}))
        .await;
    assert_eq!(again.status, 500, "{again:?}");
    // No other change may overtake the unsaved one.
    let reply = admin
        .call(
            Method::PUT,
            "/admin/weight",
            json!({"weight": 5, "force": true}),
        )
        .await;
    assert_eq!(reply.status, 500, "{reply:?}");
    assert_eq!(admin.state().await["status"], "rolled_back");

    // Once the disk takes writes again, the rollback is saved without being asked.
    std::fs::remove_dir(&blocker).expect("remove the blocker");
    // The state file first, then its audit line.
    eventually(
        "the rollback to reach the state file and the audit log",
        || saved()["status"] == "rolled_back" && files.last_audit()["action"] == "rollback",
    )
    .await;
    let last = files.last_audit();
    assert_eq!(
        (&last["action"], &last["source"], &last["reason"]),
        (&"rollback".into(), &"api".into(), &"disk full".into()),
        "{last}"
    );

    // And a restart keeps it.
    first.kill9().await;
    let second = Process::serve(&files.config, &[]).await;
    let (weight, _, state) = canary_weight(&second).await;
    assert_eq!(weight, 0.0, "{state}");
    assert_eq!(state["status"], "rolled_back", "{state}");
    assert_eq!(second.stop().await, Some(0));
}

/// A SIGHUP whose `[shadow]` change the disk refuses applies nothing of
/// the reloaded config: not its routing salt either. The next SIGHUP, once
/// the disk allows, applies both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_whose_shadow_the_disk_refuses_applies_nothing() {
    let stable = Backend::start(STABLE).await;
    let canary = Backend::start(CANARY).await;
    let mirror = Backend::start("persist-mirror").await;
    let mut files = Files::new(config(
        &[stable.addr],
        Some((&[canary.addr], 10.0)),
        "[routing]\nsalt = \"before\"\n",
    ));
    let process = Process::serve(&files.config, &[]).await;
    let admin = AdminApi::new(process.admin);
    let salt = || async {
        let reply = admin
            .call(Method::GET, "/admin/route?key=k", Value::Null)
            .await;
        reply.json()["salt"].clone()
    };
    assert_eq!(salt().await, "before");

    files.rewrite("salt = \"before\"", "salt = \"after\"");
    files.text.push_str(&format!(
        "\n[shadow]\nname = \"persist-mirror\"\nupstreams = [\"{}\"]\npercent = 100\n",
        mirror.addr
    ));
    std::fs::write(&files.config, &files.text).expect("rewrite the config");
    let blocker = files.block_writes(&process);
    process.signal("HUP");
    process
        .log_line(&["config reload refused", "cannot write the state file"])
        .await;
    assert_eq!(salt().await, "before");
    assert_eq!(admin.state().await["shadow"], Value::Null);

    std::fs::remove_dir(&blocker).expect("remove the blocker");
    process.signal("HUP");
    eventually_async("the second reload to apply the salt", || async {
        salt().await == "after"
    })
    .await;
    assert_eq!(admin.state().await["shadow"]["name"], "persist-mirror");
    assert_eq!(saved_shadow(&files), "persist-mirror");
    assert_eq!(process.stop().await, Some(0));
}

fn saved_shadow(files: &Files) -> Value {
    files.saved()["shadow"]["name"].clone()
}

/// A rollout whose step the disk refuses ends, and its end is live at once
/// (so it no longer reads as running, refusing weight changes with nothing
/// left to abort) and saved once the disk allows; the approval that step
/// answered is refused, with why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollout_whose_step_the_disk_refuses_ends_at_once_and_is_saved_later() {
    let stable = Backend::start(STABLE).await;
    let canary = Backend::start(CANARY).await;
    let files = Files::new(config(&[stable.addr], Some((&[canary.addr], 10.0)), ""));
    let process = Process::serve(&files.config, &[]).await;
    let admin = AdminApi::new(process.admin);
    let plan =
        json!({"interval": "1s", "stages": [{"pause": true}, {"weight": 20, "duration": "10m"}]});
    let reply = admin.call(Method::POST, "/admin/rollout", plan).await;
    assert_eq!(reply.status, 200, "{reply:?}");
    eventually_async("the rollout to wait at its gate", || async {
        admin.state().await["status"] == "paused"
    })
    .await;

    let blocker = files.block_writes(&process);
    let reply = admin
        .call(Method::POST, "/admin/rollout/approve", json!({}))
        .await;
    assert_eq!(reply.status, 409, "{reply:?}");
    assert!(
        reply.json()["error"]
            .as_str()
            .is_some_and(|e| e.contains("before the approval took effect")
                && e.contains("could not be saved")),
        "{reply:?}"
    );
    let state = admin.state().await;
    assert_eq!(
        (
            &state["status"],
            &state["rollout"]["phase"],
            &state["canary"]["weight"]
        ),
        (&"steady".into(), &"superseded".into(), &10.0.into()),
        "{state}"
    );

    std::fs::remove_dir(&blocker).expect("remove the blocker");
    // The state file first, then its audit line.
    eventually(
        "the rollout's end to reach the state file and the audit log",
        || {
            let saved = files.saved();
            saved["status"] == "steady"
                && saved["rollout"]["phase"] == "superseded"
                && files.last_audit()["action"] == "rollout_end"
        },
    )
    .await;
    admin.set_weight(30.0, false).await;
    assert_eq!(process.stop().await, Some(0));
}

/// An abort the disk refuses rolls back at once with the rollout's end in
/// the same change, so both are live together and saved together.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abort_the_disk_refuses_ends_the_rollout_with_its_rollback() {
    let stable = Backend::start(STABLE).await;
    let canary = Backend::start(CANARY).await;
    let files = Files::new(config(&[stable.addr], Some((&[canary.addr], 10.0)), ""));
    let process = Process::serve(&files.config, &[]).await;
    let admin = AdminApi::new(process.admin);
    let plan = json!({"interval": "1s", "stages": [{"weight": 5, "duration": "10m"}]});
    let reply = admin.call(Method::POST, "/admin/rollout", plan).await;
    assert_eq!(reply.status, 200, "{reply:?}");

    let blocker = files.block_writes(&process);
    let reply = admin
        .call(
            Method::POST,
            "/admin/rollout/abort",
            json!({"reason": "bad"}),
        )
        .await;
    assert_eq!(reply.status, 500, "{reply:?}");
    let state = admin.state().await;
    assert_eq!(
        (&state["status"], &state["rollout"]["phase"]),
        (&"rolled_back".into(), &"aborted".into()),
        "{state}"
    );

    std::fs::remove_dir(&blocker).expect("remove the blocker");
    eventually(
        "the abort to reach the state file and the audit log",
        || files.saved()["status"] == "rolled_back" && files.last_audit()["action"] == "rollback",
    )
    .await;
    let last = files.last_audit();
    assert_eq!(last["after"]["rollout"]["phase"], "aborted", "{last}");
    assert_eq!(last["source"], "api", "{last}");
    assert_eq!(process.stop().await, Some(0));
}

/// A shutdown with a rollback the disk still refuses tries once more and,
/// failing, exits with an error: the next start would read the state from
/// before the rollback and serve the canary again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shutdown_with_an_unsaved_rollback_exits_with_an_error() {
    let stable = Backend::start(STABLE).await;
    let canary = Backend::start(CANARY).await;
    let files = Files::new(config(&[stable.addr], Some((&[canary.addr], 10.0)), ""));
    let process = Process::serve(&files.config, &[]).await;
    let admin = AdminApi::new(process.admin);
    files.block_writes(&process);
    let reply = admin
        .call(Method::POST, "/admin/rollback", json!({"reason": "bad"}))
        .await;
    assert_eq!(reply.status, 500, "{reply:?}");
    assert_eq!(process.stop().await, Some(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reseed_moves_no_user_of_the_same_canary() {
    let stable = Backend::start(STABLE).await;
    let other_stable = Backend::start(STABLE).await;
    let canary = Backend::start(CANARY).await;
    let plan = "[rollout]\ninterval = \"1h\"\nstages = [ { weight = 40, duration = \"1h\" } ]\n";
    let mut files = Files::new(config(&[stable.addr], Some((&[canary.addr], 10.0)), plan));

    // A running rollout of v2, at its stage's 40%.
    let first = Process::serve(&files.config, &[]).await;
    let (weight, _, state) = canary_weight(&first).await;
    assert_eq!((weight, &state["status"]), (40.0, &"progressing".into()));
    assert_eq!(first.stop().await, Some(0));

    // Another stable upstream: the rollout carries on where it was.
    files.add_upstream(stable.addr, other_stable.addr);
    let second = Process::serve(&files.config, &[]).await;
    let (weight, _, state) = canary_weight(&second).await;
    assert_eq!(weight, 40.0, "{state}");
    assert_eq!(state["status"], "progressing", "{state}");
    assert_eq!(state["rollout"]["phase"], "progressing", "{state}");
    assert_eq!(
        state["stable"]["upstreams"].as_array().map(Vec::len),
        Some(2)
    );
    assert_eq!(files.last_audit()["action"], "reseed");
    let key = key_on(CANARY, 40.0, CANARY, "kept");
    let reply = Http::new(second.proxy)
        .get("/", &[("x-user-id", &key)])
        .await;
    assert_eq!(reply.version(), CANARY);

    // Rolled back, then the config's weight edited: the latch holds.
    AdminApi::new(second.admin).rollback("bad answers").await;
    assert_eq!(second.stop().await, Some(0));
    files.rewrite("weight = 10\n", "weight = 20\n");
    let third = Process::serve(&files.config, &[]).await;
    let (weight, _, state) = canary_weight(&third).await;
    assert_eq!(weight, 0.0, "{state}");
    assert_eq!(state["status"], "rolled_back", "{state}");
    assert_eq!(state["last_rollback"]["reason"], "bad answers", "{state}");
    assert_eq!(third.stop().await, Some(0));

    // A new version in the config is a new canary: the config's plan starts
    // for it, and the last rollback stays on record.
    files.rewrite(&format!("name = \"{CANARY}\""), "name = \"v3\"");
    let fourth = Process::serve(&files.config, &[]).await;
    let (weight, _, state) = canary_weight(&fourth).await;
    assert_eq!(weight, 40.0, "{state}");
    assert_eq!(state["canary"]["name"], "v3", "{state}");
    assert_eq!(state["status"], "progressing", "{state}");
    assert_eq!(state["last_rollback"]["reason"], "bad answers", "{state}");
    assert_eq!(fourth.stop().await, Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_promotion_survives_an_edit_that_leaves_the_version_names_alone() {
    let stable = Backend::start(STABLE).await;
    let other_stable = Backend::start(STABLE).await;
    let canary = Backend::start(CANARY).await;
    let mut files = Files::new(config(&[stable.addr], Some((&[canary.addr], 10.0)), ""));
    let first = Process::serve(&files.config, &[]).await;
    AdminApi::new(first.admin).promote().await;
    assert_eq!(first.stop().await, Some(0));

    // Another upstream for the config's stable (v1, no longer live).
    files.add_upstream(stable.addr, other_stable.addr);
    let second = Process::serve(&files.config, &[]).await;
    let state = AdminApi::new(second.admin).state().await;
    // Of a version no longer live, the edit decides nothing: restored.
    assert_eq!(files.last_audit()["action"], "restore");
    assert_eq!(state["stable"]["name"], CANARY, "{state}");
    assert_eq!(state["canary"], Value::Null, "{state}");
    for user in ["ann", "bob", "cy", "dee"] {
        let reply = Http::new(second.proxy)
            .get("/", &[("x-user-id", user)])
            .await;
        assert_eq!(reply.version(), CANARY, "{user}");
    }
    assert_eq!(second.stop().await, Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_audit_log_that_cannot_be_written_stops_the_start_before_the_state_is_touched() {
    let stable = Backend::start(STABLE).await;
    let files = Files::new(config(&[stable.addr], None, ""));
    std::fs::create_dir(&files.audit).expect("a directory where the log goes");
    let refused = Process::try_serve(&files.config, &[])
        .await
        .err()
        .expect("cohort serve refuses an audit log it cannot write");
    assert_ne!(refused.code, Some(0), "{refused:?}");
    assert!(refused.log.contains("state.audit_log"), "{refused:?}");
    assert!(
        !files.state.exists(),
        "the state file was seeded: {refused:?}"
    );
}

/// A start that cannot bind changes nothing: a second process pointed at
/// the state of one still running (a quick restart while the old one
/// drains) must not re-seed the state file or log under it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_that_cannot_bind_leaves_the_state_and_log_alone() {
    let stable = Backend::start(STABLE).await;
    let canary = Backend::start(CANARY).await;
    let mut files = Files::new(config(&[stable.addr], Some((&[canary.addr], 10.0)), ""));
    let running = Process::serve(&files.config, &[]).await;
    let state = std::fs::read(&files.state).expect("the state file");
    let audit = std::fs::read(&files.audit).expect("the audit log");

    // An edited [versions] would re-seed; the taken admin port stops it first.
    files.rewrite("weight = 10\n", "weight = 25\n");
    files.rewrite(
        "[admin]\naddr = \"127.0.0.1:0\"",
        &format!("[admin]\naddr = \"{}\"", running.admin),
    );
    let refused = Process::try_serve(&files.config, &[])
        .await
        .err()
        .expect("cohort serve refuses a taken admin port");
    assert!(refused.log.contains("admin.addr"), "{refused:?}");
    assert_eq!(std::fs::read(&files.state).expect("state"), state);
    assert_eq!(std::fs::read(&files.audit).expect("audit"), audit);
    let (weight, _, now) = canary_weight(&running).await;
    assert_eq!(weight, 10.0, "{now}");
    AdminApi::new(running.admin).set_weight(30.0, false).await;
    assert_eq!(running.stop().await, Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_does_not_start_the_configured_plan_again() {
    let stable = Backend::start(STABLE).await;
    let canary = Backend::start(CANARY).await;
    let plan = "[rollout]\ninterval = \"100ms\"\non_success = \"hold\"\n\
                stages = [ { weight = 5, duration = \"300ms\" } ]\n";
    let files = Files::new(config(&[stable.addr], Some((&[canary.addr], 10.0)), plan));
    let first = Process::serve(&files.config, &[]).await;
    let admin = AdminApi::new(first.admin);
    support::eventually_async("the plan to finish, holding", || async {
        admin.state().await["rollout"]["phase"] == "held"
    })
    .await;
    // The operator then sets the weight by hand.
    admin.set_weight(30.0, false).await;
    assert_eq!(first.stop().await, Some(0));

    let second = Process::serve(&files.config, &[]).await;
    let (weight, _, state) = canary_weight(&second).await;
    assert_eq!(weight, 30.0, "{state}");
    assert_eq!(state["status"], "steady", "{state}");
    assert_eq!(state["rollout"]["phase"], "held", "{state}");
    assert_eq!(second.stop().await, Some(0));
}

/// A saved rollout that cannot be read, or that does not match the status
/// and the canary beside it, stops the start, by field: left as it was, it
/// would hold every weight change for a controller that never runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_saved_rollout_stops_the_start_by_field() {
    let stable = Backend::start(STABLE).await;
    let canary = Backend::start(CANARY).await;
    let plan = "[rollout]\ninterval = \"1h\"\nstages = [ { weight = 5, duration = \"1h\" } ]\n";
    let files = Files::new(config(&[stable.addr], Some((&[canary.addr], 10.0)), plan));
    let first = Process::serve(&files.config, &[]).await;
    let admin = AdminApi::new(first.admin);
    support::eventually_async("the configured rollout to run", || async {
        admin.state().await["rollout"]["phase"] == "progressing"
    })
    .await;
    assert_eq!(first.stop().await, Some(0));
    let saved = files.saved();

    let audit = std::fs::read(&files.audit).expect("the audit log");
    for (key, value, field) in [
        ("stage", json!("zero"), "rollout.stage"),
        ("stage", json!(7), "rollout.stage"),
        // Consistent with the status and the canary, or the rollout would
        // never run and yet refuse every weight change.
        ("canary", json!("v9"), "rollout.canary"),
        ("phase", json!("superseded"), "rollout.phase"),
    ] {
        let mut edited = saved.clone();
        edited["rollout"][key] = value;
        let edited = edited.to_string();
        std::fs::write(&files.state, &edited).expect("edit the state file");
        let refused = Process::try_serve(&files.config, &[])
            .await
            .err()
            .expect("cohort serve refuses the saved rollout");
        assert_ne!(refused.code, Some(0), "{refused:?}");
        assert!(refused.log.contains(field), "{refused:?}");
        assert!(refused.log.contains("--reset-state"), "{refused:?}");
        // A start that fails changes nothing.
        assert_eq!(
            std::fs::read(&files.state).expect("state"),
            edited.as_bytes()
        );
        assert_eq!(std::fs::read(&files.audit).expect("audit"), audit);
    }
}

/// An edit of `[versions]` that leaves the canary and its `weight` alone
/// (another stable upstream) keeps the weight the operator set since, and a
/// finished rollout's hold with it: the config's `weight` is where a new
/// canary starts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_weight_set_at_run_time_outlives_an_edit_elsewhere_in_versions() {
    let stable = Backend::start(STABLE).await;
    let other_stable = Backend::start(STABLE).await;
    let canary = Backend::start(CANARY).await;
    let mut files = Files::new(config(&[stable.addr], Some((&[canary.addr], 50.0)), ""));
    let first = Process::serve(&files.config, &[]).await;
    AdminApi::new(first.admin).set_weight(1.0, false).await;
    assert_eq!(first.stop().await, Some(0));

    files.add_upstream(stable.addr, other_stable.addr);
    let second = Process::serve(&files.config, &[]).await;
    let (weight, _, state) = canary_weight(&second).await;
    assert_eq!(weight, 1.0, "{state}");
    assert_eq!(
        state["stable"]["upstreams"].as_array().map(Vec::len),
        Some(2),
        "{state}"
    );
    assert_eq!(files.last_audit()["action"], "reseed");
    assert_eq!(second.stop().await, Some(0));
}

/// A start seeds the state, then starts the config's plan: two writes. A
/// process stopped between them leaves a seeded canary at the config's
/// weight with no rollout; the next start starts the plan, as the first
/// would have.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plan_whose_start_was_cut_short_starts_on_the_next_start() {
    let stable = Backend::start(STABLE).await;
    let canary = Backend::start(CANARY).await;
    let plan = "[rollout]\ninterval = \"1h\"\nstages = [ { weight = 5, duration = \"1h\" } ]\n";
    let files = Files::new(config(&[stable.addr], Some((&[canary.addr], 50.0)), plan));
    let parsed = cohort::config::Config::parse(&files.text, "test").expect("a valid config");
    // The seed's write, as a start makes it before the plan's.
    let store = cohort::state::file::FileStore::new(files.state.clone());
    let (seeded, _, _) = cohort::state::restore(&store, &parsed.versions, None, true, false)
        .expect("the seed is saved");
    assert_eq!(seeded.live.rollout, None);

    let process = Process::serve(&files.config, &[]).await;
    let (weight, _, state) = canary_weight(&process).await;
    assert_eq!(weight, 5.0, "{state}");
    assert_eq!(state["status"], "progressing", "{state}");
    assert_eq!(state["rollout"]["phase"], "progressing", "{state}");
    assert_eq!(process.stop().await, Some(0));
    let saved = files.saved();
    assert_eq!(saved.get("rollout_due"), None, "{saved}");

    // Started once: the next start resumes it rather than starting it again.
    let again = Process::serve(&files.config, &[]).await;
    let (_, _, state) = canary_weight(&again).await;
    assert_eq!(state["rollout"]["stage"], 0, "{state}");
    let starts = files
        .audit()
        .iter()
        .filter(|line| line["action"] == "rollout_start")
        .count();
    assert_eq!(starts, 1);
    assert_eq!(again.stop().await, Some(0));
}

/// A reload that changes the salt leaves the live state as it was, but
/// places every user anew: a change of the route table, which the audit
/// log records. A reload that changes nothing records nothing.
#[tokio::test]
async fn a_reload_that_changes_the_salt_is_in_the_audit_log() {
    let stable = Backend::start(STABLE).await;
    let canary = Backend::start(CANARY).await;
    let text = config(&[stable.addr], Some((&[canary.addr], 50.0)), "");
    let audit = cohort::config::Config::parse(&text, "test")
        .expect("a valid config")
        .state
        .audit_log;
    let server = support::start_cohort(&text).await;
    let lines = audit_lines(&audit).len();
    support::reload(&server, &text);
    assert_eq!(audit_lines(&audit).len(), lines, "an unchanged reload");

    let salted = text.replacen(
        "[versions.stable]",
        "[routing]\nsalt = \"pinned\"\n\n[versions.stable]",
        1,
    );
    let live = support::reload(&server, &salted);
    let logged = audit_lines(&audit);
    assert_eq!(logged.len(), lines + 1, "{logged:#?}");
    let last = logged.last().expect("a line");
    assert_audit_shape(last);
    assert_eq!(last["action"], "routing", "{last}");
    assert_eq!(last["source"], "signal", "{last}");
    // The salt was the canary's name, unset; both are named.
    let from_to = format!("the salt from {CANARY:?} to \"pinned\"");
    assert!(
        last["reason"]
            .as_str()
            .is_some_and(|r| r.contains(&from_to)),
        "{last}"
    );
    assert_eq!(last["after"]["generation"], live.generation, "{last}");
    server.shutdown().await;
}
