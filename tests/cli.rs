//! The `cohort` binary, run as a process.
//!
//! Owns: `cohort check` (the shipped config is valid; a bad one exits 1 and
//! names every problem by its key, an admin listener on the proxy's port,
//! a reserved header name, a missing TLS file and a file the config names
//! that `serve` could not use included; a syntax error is one placed line),
//! `cohort route` (the SPEC reference vectors; an empty salt or key and a
//! weight out of range refused), `cohort serve` (answers on its port, exits
//! 0 on SIGTERM, logs without colour codes to a pipe, names the key of a TLS
//! file it cannot read; an admin token no header could carry refused at
//! start and on reload), the help of `serve` and `demo`, and `cohort demo`
//! (serves the README's first example and leaves no state behind, whether
//! it ran or could not start).
//! Does not own: the behaviour behind these commands, which the library
//! tests cover in depth.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use support::{AdminApi, Backend, Http, Process, STABLE, within};
use tokio::io::{AsyncBufReadExt as _, BufReader};

const COHORT: &str = env!("CARGO_BIN_EXE_cohort");

/// A scratch directory for one test, removed when dropped.
struct Scratch(tempfile::TempDir);

impl Scratch {
    fn new(name: &str) -> Scratch {
        let dir = tempfile::Builder::new()
            .prefix(&format!("cohort-cli-{name}-"))
            .tempdir()
            .expect("create a scratch directory");
        Scratch(dir)
    }

    fn path(&self) -> &Path {
        self.0.path()
    }

    fn write(&self, file: &str, text: &str) -> PathBuf {
        let path = self.path().join(file);
        std::fs::write(&path, text).expect("write a scratch file");
        path
    }
}

fn cohort(args: &[&str]) -> Output {
    Command::new(COHORT)
        .args(args)
        .output()
        .expect("run the cohort binary")
}

/// Stdout and stderr together, as an operator reads them in a terminal.
fn printed(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// `cohort check`, with no admin token in the environment: the config's own.
fn check(path: &Path) -> Output {
    Command::new(COHORT)
        .args(["check", "--config", path.to_str().expect("a UTF-8 path")])
        .env_remove("COHORT_ADMIN_TOKEN")
        .output()
        .expect("run the cohort binary")
}

#[test]
fn check_accepts_the_shipped_config() {
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/cohort.toml");
    let output = check(&shipped);
    assert!(output.status.success(), "{}", printed(&output));
    assert_eq!(String::from_utf8_lossy(&output.stdout).trim(), "ok");
}

const BAD_VALUES: &str = r#"
[listen]
drain_timeout = "soon"

[routing]
sticky_keys = ["header:x-user-id", "body:user"]

[versions.stable]
name = "v1"
upstreams = ["127.0.0.1:9001"]

[versions.canary]
name = "v2"
upstreams = ["127.0.0.1:9002"]
weight = 150
"#;

#[test]
fn check_names_every_bad_value_by_its_key() {
    let scratch = Scratch::new("bad-values");
    let output = check(&scratch.write("bad.toml", BAD_VALUES));
    assert_eq!(output.status.code(), Some(1), "{}", printed(&output));
    let text = printed(&output);
    assert!(
        text.lines()
            .any(|l| l == "versions.canary.weight: 150 is not within 0..=100"),
        "{text}"
    );
    assert!(
        text.lines()
            .any(|l| l.starts_with("listen.drain_timeout: ") && l.contains("soon")),
        "{text}"
    );
    assert!(
        text.lines()
            .any(|l| l.starts_with("routing.sticky_keys[1]: ") && l.contains("body:user")),
        "{text}"
    );
    assert!(!text.contains("\nok"), "{text}");
}

#[test]
fn check_names_an_unknown_key() {
    let scratch = Scratch::new("unknown-key");
    let text = "[routing]\ncolour = \"blue\"\n\n[versions.stable]\nname = \"v1\"\nupstreams = [\"127.0.0.1:9001\"]\n";
    let output = check(&scratch.write("unknown.toml", text));
    assert_eq!(output.status.code(), Some(1), "{}", printed(&output));
    assert!(printed(&output).contains("colour"), "{}", printed(&output));
}

#[test]
fn check_reports_an_unknown_key_together_with_bad_values() {
    let scratch = Scratch::new("everything-bad");
    let text = BAD_VALUES.replace("[routing]\n", "[routing]\ncolour = \"blue\"\n");
    let output = check(&scratch.write("bad.toml", &text));
    assert_eq!(output.status.code(), Some(1), "{}", printed(&output));
    let text = printed(&output);
    for needle in [
        "versions.canary.weight: 150 is not within 0..=100",
        "listen.drain_timeout: ",
        "routing.sticky_keys[1]: ",
        "routing.colour",
    ] {
        assert!(text.contains(needle), "{needle:?} missing from:\n{text}");
    }
}

/// `check` reads a config from a pipe (`--config <(envsubst < tmpl)`), as
/// a person waits for its answer; `serve` refuses one, which a reload
/// would read again and find gone.
#[test]
fn check_reads_a_config_from_a_pipe_and_serve_refuses_one() {
    let scratch = Scratch::new("pipe");
    let fifo = scratch.path().join("cohort.toml");
    let made = Command::new("mkfifo").arg(&fifo).status();
    assert!(made.is_ok_and(|status| status.success()), "mkfifo");
    let writer = std::thread::spawn({
        let fifo = fifo.clone();
        move || std::fs::write(fifo, STABLE_ONLY).expect("write the pipe")
    });
    let output = check(&fifo);
    writer.join().expect("the writer");
    assert!(output.status.success(), "{}", printed(&output));

    let output = cohort(&["serve", "--config", &fifo.display().to_string()]);
    assert_eq!(output.status.code(), Some(1), "{}", printed(&output));
    assert!(
        printed(&output).contains("a pipe, which could hold the read up for good"),
        "{}",
        printed(&output)
    );
}

#[test]
fn check_fails_on_a_missing_file() {
    let output = cohort(&["check", "--config", "no/such/cohort.toml"]);
    assert_eq!(output.status.code(), Some(1), "{}", printed(&output));
    assert!(printed(&output).contains("no/such/cohort.toml"));
}

#[test]
fn check_places_a_syntax_error_on_one_line() {
    let scratch = Scratch::new("syntax");
    let path = scratch.write(
        "broken.toml",
        "[versions.stable]\nname = \"v1\"\nname = \"v2\"\nupstreams = [\"127.0.0.1:9001\"]\n",
    );
    let output = check(&path);
    assert_eq!(output.status.code(), Some(1), "{}", printed(&output));
    assert_eq!(
        String::from_utf8_lossy(&output.stderr),
        format!(
            "cohort: {}: duplicate key: found `name` (line 3, column 1)\n",
            path.display()
        )
    );
}

const STABLE_ONLY: &str = "[versions.stable]\nname = \"v1\"\nupstreams = [\"127.0.0.1:9001\"]\n";

/// A self-signed certificate for `localhost` and its key, as PEM files in `scratch`.
fn write_pair(scratch: &Scratch) -> (PathBuf, PathBuf) {
    let key = rcgen::KeyPair::generate().expect("a key pair");
    let cert = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
        .expect("certificate parameters")
        .self_signed(&key)
        .expect("a self-signed certificate");
    (
        scratch.write("cert.pem", &cert.pem()),
        scratch.write("key.pem", &key.serialize_pem()),
    )
}

/// A config whose admin token, TLS pair and upstream CA are the files given.
fn with_files(token: &Path, cert: &Path, key: &Path, ca: &Path) -> String {
    format!(
        "[listen.tls]\ncert = {cert:?}\nkey = {key:?}\n\n[upstream]\nca_file = {ca:?}\n\n\
         [admin]\ntoken_file = {token:?}\n\n{STABLE_ONLY}"
    )
}

#[test]
fn check_reads_the_files_serve_would_read_and_names_each_by_its_key() {
    let scratch = Scratch::new("files");
    let (cert, key) = write_pair(&scratch);
    let token = scratch.write("admin.token", "s3cret\n");
    let good = scratch.write("good.toml", &with_files(&token, &cert, &key, &cert));
    let output = check(&good);
    assert!(output.status.success(), "{}", printed(&output));
    assert_eq!(String::from_utf8_lossy(&output.stdout).trim(), "ok");

    let missing = |name: &str| scratch.path().join(name);
    let (no_token, no_cert, no_key, no_ca) = (
        missing("no.token"),
        missing("no-cert.pem"),
        missing("no-key.pem"),
        missing("no-ca.pem"),
    );
    let output = check(&scratch.write(
        "missing.toml",
        &with_files(&no_token, &no_cert, &no_key, &no_ca),
    ));
    assert_eq!(output.status.code(), Some(1), "{}", printed(&output));
    let text = printed(&output);
    for (key, path) in [
        ("admin.token_file", &no_token),
        ("listen.tls.cert", &no_cert),
        ("listen.tls.key", &no_key),
        ("upstream.ca_file", &no_ca),
    ] {
        let start = format!("{key}: cannot read {}: ", path.display());
        assert!(
            text.lines().any(|l| l.starts_with(&start)),
            "{start:?} missing from:\n{text}"
        );
    }
    assert!(output.stdout.is_empty(), "{text}");

    // Files that are there but cannot serve: an empty token, a certificate
    // where the key should be, and a CA file with no certificate.
    let empty = scratch.write("empty.token", " \n");
    let output = check(&scratch.write("unusable.toml", &with_files(&empty, &cert, &cert, &token)));
    assert_eq!(output.status.code(), Some(1), "{}", printed(&output));
    let text = printed(&output);
    for start in [
        "admin.token_file: ",
        "listen.tls.key: ",
        "upstream.ca_file: ",
    ] {
        assert!(
            text.lines().any(|l| l.starts_with(start)),
            "{start:?} missing from:\n{text}"
        );
    }
}

#[test]
fn check_refuses_metrics_auth_without_a_token_to_ask_for() {
    let scratch = Scratch::new("metrics-auth");
    let text = format!("[admin]\nmetrics_auth = true\n\n{STABLE_ONLY}");
    let output = check(&scratch.write("auth.toml", &text));
    assert_eq!(output.status.code(), Some(1), "{}", printed(&output));
    assert!(
        printed(&output)
            .lines()
            .any(|l| l.starts_with("admin.metrics_auth: needs a token")),
        "{}",
        printed(&output)
    );
}

/// What a start would refuse in the files `[state]` names, `check` names
/// by its key: the two spelt as one file (the log's lines would land in
/// the state file), a path under a file or naming a directory, and a state
/// file that is not valid.
#[test]
fn check_refuses_the_state_files_a_start_would_refuse() {
    let scratch = Scratch::new("state-files");
    let dir = scratch.path().display().to_string();
    scratch.write("a-file", "not a directory");
    scratch.write("bad.json", "{bad");
    std::fs::create_dir(scratch.path().join("a-dir")).expect("a directory");
    for (path, audit_log, expected) in [
        (
            "s.json",
            "a-dir/../s.json",
            "state.audit_log: must differ from state.path",
        ),
        ("a-file/state.json", "audit.jsonl", "state.path: "),
        ("s.json", "a-file/logs/audit.jsonl", "state.audit_log: "),
        ("a-dir", "audit.jsonl", "state.path: "),
        ("bad.json", "audit.jsonl", "state.path: the state file"),
    ] {
        let text = format!(
            "[state]\npath = \"{dir}/{path}\"\naudit_log = \"{dir}/{audit_log}\"\n\n{STABLE_ONLY}"
        );
        let output = check(&scratch.write("state.toml", &text));
        let text = printed(&output);
        assert_eq!(output.status.code(), Some(1), "{path} {audit_log}: {text}");
        assert!(
            text.lines().any(|l| l.starts_with(expected)),
            "{path} {audit_log}: {text}"
        );
    }
    assert!(
        !scratch.path().join("s.json").exists(),
        "check wrote a state file"
    );

    // A state file that reads, but whose status says a rollout runs that
    // it does not hold: a start could not resume it.
    let text = format!(
        "[state]\npath = \"{dir}/seeded.json\"\naudit_log = \"{dir}/audit.jsonl\"\n\n{STABLE_ONLY}\n\
         [versions.canary]\nname = \"v2\"\nupstreams = [\"127.0.0.1:9002\"]\nweight = 10\n"
    );
    let config_path = scratch.write("seeded.toml", &text);
    let parsed = cohort::config::Config::parse(&text, "test").expect("a valid config");
    let store = cohort::state::file::FileStore::new(parsed.state.path.clone());
    cohort::state::restore(&store, &parsed.versions, None, false, false).expect("a seed");
    assert!(check(&config_path).status.success());
    let seeded = std::fs::read_to_string(&parsed.state.path).expect("the seed");
    let running = seeded.replacen("\"status\": \"steady\"", "\"status\": \"progressing\"", 1);
    assert_ne!(seeded, running);
    std::fs::write(&parsed.state.path, running).expect("edit the seed");
    let output = check(&config_path);
    let text = printed(&output);
    assert_eq!(output.status.code(), Some(1), "{text}");
    assert!(
        text.lines()
            .any(|l| l.starts_with("state.path: ") && l.contains("rollout: missing")),
        "{text}"
    );
}

#[test]
fn check_refuses_an_admin_listener_on_the_proxy_port() {
    let scratch = Scratch::new("same-port");
    for (listen, admin) in [
        ("127.0.0.1:18080", "127.0.0.1:18080"),
        ("0.0.0.0:18080", "127.0.0.1:18080"),
        ("127.0.0.1:18080", "[::]:18080"),
    ] {
        let text = format!(
            "[listen]\naddr = \"{listen}\"\n\n[admin]\naddr = \"{admin}\"\n\n{STABLE_ONLY}"
        );
        let output = check(&scratch.write("same.toml", &text));
        assert_eq!(output.status.code(), Some(1), "{}", printed(&output));
        let text = printed(&output);
        assert!(
            text.lines().any(|l| l.starts_with(&format!(
                "admin.addr: {admin} takes the port of listen.addr {listen}"
            ))),
            "{text}"
        );
    }
    // Port 0 picks a free port for each; other ports or addresses do not meet.
    for (listen, admin) in [
        ("127.0.0.1:0", "127.0.0.1:0"),
        ("127.0.0.1:18080", "127.0.0.1:18081"),
        ("127.0.0.2:18080", "127.0.0.1:18080"),
        ("0.0.0.0:18080", "[::1]:18080"),
    ] {
        let text = format!(
            "[listen]\naddr = \"{listen}\"\n\n[admin]\naddr = \"{admin}\"\n\n{STABLE_ONLY}"
        );
        let output = check(&scratch.write("apart.toml", &text));
        assert!(
            output.status.success(),
            "{listen} {admin}: {}",
            printed(&output)
        );
    }
}

#[tokio::test]
async fn serve_names_the_key_of_a_tls_file_it_cannot_read() {
    let scratch = Scratch::new("serve-tls");
    let missing = scratch.path().join("nonexist.pem");
    let (_, key) = write_pair(&scratch);
    let config = scratch.write(
        "cohort.toml",
        &format!(
            "[listen]\naddr = \"127.0.0.1:0\"\n\n[listen.tls]\ncert = {missing:?}\nkey = {key:?}\n\n\
             [admin]\naddr = \"127.0.0.1:0\"\n\n\
             [state]\npath = {:?}\naudit_log = {:?}\n\n{STABLE_ONLY}",
            scratch.path().join("state.json"),
            scratch.path().join("audit.jsonl"),
        ),
    );
    let output = within(
        "cohort serve to refuse the config",
        tokio::process::Command::new(COHORT)
            .args(["serve", "--config"])
            .arg(&config)
            .env("NO_COLOR", "1")
            // The token comes from the config under test, never from the environment.
            .env_remove("COHORT_ADMIN_TOKEN")
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("run cohort serve");
    assert_eq!(output.status.code(), Some(1), "{}", printed(&output));
    let text = printed(&output);
    assert!(
        text.contains(&format!(
            "cohort: listen.tls.cert: cannot read {}: ",
            missing.display()
        )),
        "{text}"
    );
}

#[test]
fn route_prints_bucket_and_cohort_per_key() {
    let output = cohort(&["route", "--salt", "v2", "--weight", "50", "alice", "bob"]);
    assert!(output.status.success(), "{}", printed(&output));
    let stdout = String::from_utf8_lossy(&output.stdout);
    let rows: Vec<Vec<&str>> = stdout
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(
        rows,
        [["alice", "4727", "canary"], ["bob", "9112", "stable"]],
        "{stdout}"
    );
}

/// Output that cannot be written fails the command, said on stderr, with
/// no panic; output nobody reads (a closed pipe: `| head`, `| true`) is the
/// reader's choice, and the command's work stands.
#[test]
fn output_that_cannot_be_written_fails_and_a_closed_pipe_does_not() {
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/cohort.toml");
    let shipped = shipped.to_str().expect("a UTF-8 path");
    let route = ["route", "--salt", "v2", "--weight", "50", "alice"];
    let check = ["check", "--config", shipped];
    for args in [&route[..], &check[..]] {
        let full = std::fs::File::create("/dev/full").expect("open /dev/full");
        let output = Command::new(COHORT)
            .args(args)
            .env_remove("COHORT_ADMIN_TOKEN")
            .stdout(full)
            .output()
            .expect("run the cohort binary");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(
            stderr.starts_with("cohort: cannot write the output"),
            "{args:?}: {stderr}"
        );

        let (reader, writer) = std::io::pipe().expect("a pipe");
        drop(reader);
        let output = Command::new(COHORT)
            .args(args)
            .env_remove("COHORT_ADMIN_TOKEN")
            .stdout(writer)
            .output()
            .expect("run the cohort binary");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(0), "{args:?}: {stderr}");
        assert!(stderr.is_empty(), "{args:?}: {stderr}");
    }
}

/// A key that is not UTF-8 is hashed as its bytes, as the proxy hashes a
/// header's (`x-user-id: ren\xE9`, `?user=ren%E9`).
#[test]
fn route_places_a_key_by_its_bytes_utf8_or_not() {
    use std::os::unix::ffi::OsStrExt as _;
    let key = std::ffi::OsStr::from_bytes(b"ren\xE9");
    let output = Command::new(COHORT)
        .args(["route", "--salt", "v2", "--weight", "50"])
        .arg(key)
        .output()
        .expect("run the cohort binary");
    assert!(output.status.success(), "{}", printed(&output));
    // SHA-256("v2:ren\xE9"): its first 8 bytes, big-endian, mod 10000.
    assert_eq!(output.stdout, b"ren\xE9\t9635\tstable\n");
}

#[test]
fn route_refuses_an_empty_key_which_the_proxy_would_not_route_by() {
    let output = cohort(&["route", "--salt", "v2", "--weight", "50", "alice", ""]);
    assert!(!output.status.success(), "{}", printed(&output));
    assert!(
        printed(&output).contains("key 2: an empty key is no key"),
        "{}",
        printed(&output)
    );
}

#[test]
fn route_refuses_a_weight_out_of_range() {
    let output = cohort(&["route", "--salt", "v2", "--weight", "150", "alice"]);
    assert!(!output.status.success(), "{}", printed(&output));
    assert!(
        printed(&output).contains("--weight"),
        "{}",
        printed(&output)
    );
}

#[test]
fn route_refuses_an_empty_salt_as_the_config_does() {
    let output = cohort(&["route", "--salt", "", "--weight", "50", "alice"]);
    assert_eq!(output.status.code(), Some(1), "{}", printed(&output));
    let text = printed(&output);
    assert!(
        text.starts_with("cohort: --salt: must not be empty") && output.stdout.is_empty(),
        "{text}"
    );
}

#[test]
fn check_refuses_the_shadow_marker_as_a_version_or_override_header() {
    let scratch = Scratch::new("shadow-marker");
    for key in ["version_header", "override_header"] {
        let text = format!("[routing]\n{key} = \"x-cohort-shadow\"\n\n{STABLE_ONLY}");
        let output = check(&scratch.write("marker.toml", &text));
        assert_eq!(output.status.code(), Some(1), "{}", printed(&output));
        let expected = format!(
            "routing.{key}: \"x-cohort-shadow\" is a header the proxy writes itself; choose another name"
        );
        assert!(
            printed(&output).lines().any(|l| l.starts_with(&expected)),
            "{expected:?} missing from:\n{}",
            printed(&output)
        );
    }
}

#[test]
fn check_names_a_missing_tls_file_by_its_key() {
    let scratch = Scratch::new("tls-missing");
    for (given, missing) in [("cert", "key"), ("key", "cert")] {
        let text = format!("[listen.tls]\n{given} = \"some.pem\"\n\n{STABLE_ONLY}");
        let output = check(&scratch.write("tls.toml", &text));
        assert_eq!(output.status.code(), Some(1), "{}", printed(&output));
        let text = printed(&output);
        assert!(
            text.lines()
                .any(|l| l.starts_with(&format!("listen.tls.{missing}: is required"))),
            "{text}"
        );
        assert!(!text.contains("missing field"), "{text}");
    }
}

/// A config whose admin token is the file at `token`, serving `backend`,
/// its state and audit log in `scratch`.
fn with_token_file(scratch: &Scratch, token: &Path, backend: std::net::SocketAddr) -> String {
    format!(
        "[listen]\naddr = \"127.0.0.1:0\"\nworkers = 1\n\n\
         [admin]\naddr = \"127.0.0.1:0\"\ntoken_file = {token:?}\n\n\
         [state]\npath = {:?}\naudit_log = {:?}\n\n\
         [versions.stable]\nname = \"{STABLE}\"\nupstreams = [\"{backend}\"]\n",
        scratch.path().join("state.json"),
        scratch.path().join("audit.jsonl"),
    )
}

/// A token of two lines could never be sent in an `Authorization` header:
/// `check`, `serve` and a reload refuse it, naming where it came from,
/// instead of answering every admin call 401.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_no_header_could_carry_is_refused_by_check_serve_and_reload() {
    let backend = Backend::start(STABLE).await;
    let scratch = Scratch::new("token-lines");
    let two_lines = scratch.write("two-lines.token", "first-line\nsecond-line\n");
    let config = scratch.write(
        "two-lines.toml",
        &with_token_file(&scratch, &two_lines, backend.addr),
    );
    let output = check(&config);
    assert_eq!(output.status.code(), Some(1), "{}", printed(&output));
    let start = format!(
        "admin.token_file: the token in {} holds a character that cannot be sent in an HTTP header",
        two_lines.display()
    );
    assert!(
        printed(&output).lines().any(|l| l.starts_with(&start)),
        "{start:?} missing from:\n{}",
        printed(&output)
    );

    let config_from_env = scratch.write("env.toml", STABLE_ONLY);
    let output = Command::new(COHORT)
        .args(["check", "--config"])
        .arg(&config_from_env)
        .env("COHORT_ADMIN_TOKEN", "first-line\nsecond-line")
        .output()
        .expect("run the cohort binary");
    assert_eq!(output.status.code(), Some(1), "{}", printed(&output));
    assert!(
        printed(&output).lines().any(|l| l
            .starts_with("COHORT_ADMIN_TOKEN: the token holds a character that cannot be sent")),
        "{}",
        printed(&output)
    );

    let refused = match Process::try_serve(&config, &[]).await {
        Ok(_) => panic!("cohort serve started with a token of two lines"),
        Err(refused) => refused,
    };
    assert_eq!(refused.code, Some(1), "{refused:?}");
    assert!(refused.log.contains(&start), "{refused:?}");

    // A reload that meets such a token keeps the old one, which still works.
    let good = scratch.write("good.token", "s3cret\n");
    let config = scratch.write(
        "reload.toml",
        &with_token_file(&scratch, &good, backend.addr),
    );
    let server = Process::serve(&config, &[]).await;
    let admin = AdminApi::with_token(server.admin, "s3cret");
    assert_eq!(admin.state().await["status"], "steady");
    std::fs::write(&good, "s3cret\nsecond-line\n").expect("rewrite the token file");
    server.signal("HUP");
    server
        .log_line(&["config reload refused", "admin.token_file"])
        .await;
    assert_eq!(admin.state().await["status"], "steady");
    assert_eq!(server.stop().await, Some(0));
}

#[test]
fn serve_and_demo_help_say_what_an_operator_must_know() {
    let output = cohort(&["serve", "--help"]);
    assert!(output.status.success(), "{}", printed(&output));
    let help = printed(&output);
    for needle in [
        "COHORT_ADMIN_TOKEN",
        "SIGHUP",
        "SIGUSR1",
        "SIGTERM",
        "SIGINT",
        "drain",
    ] {
        assert!(help.contains(needle), "{needle:?} missing from:\n{help}");
    }
    let output = cohort(&["demo", "--help"]);
    assert!(output.status.success(), "{}", printed(&output));
    let help = printed(&output);
    for port in [
        "127.0.0.1:8080",
        "127.0.0.1:9901",
        "127.0.0.1:9001",
        "127.0.0.1:9002",
    ] {
        assert!(help.contains(port), "{port} missing from:\n{help}");
    }
}

/// The `proxy.addr` the serve log announces, if `line` is that announcement.
fn announced_proxy_addr(line: &str) -> Option<std::net::SocketAddr> {
    announced_addr(line, "proxy.addr")
}

/// The address the serve log announces as `key`, if `line` announces it.
fn announced_addr(line: &str, key: &str) -> Option<std::net::SocketAddr> {
    let rest = &line[line.find(key)? + key.len()..];
    // Skip `=` and any colour codes up to the address itself.
    let start = rest.find(|c: char| c.is_ascii_digit())?;
    let addr: String = rest[start..]
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.' || *c == ':')
        .collect();
    addr.parse().ok()
}

/// A config of one worker, `listen_keys` (whole lines) in `[listen]`, the
/// admin API on loopback, the state in `scratch`, and `stable` as the only
/// version; written to `scratch`.
fn one_version_config(
    scratch: &Scratch,
    stable: std::net::SocketAddr,
    listen_keys: &str,
) -> PathBuf {
    let state = scratch.path().join("state.json");
    let audit = scratch.path().join("audit.jsonl");
    scratch.write(
        "cohort.toml",
        &format!(
            "[listen]\naddr = \"127.0.0.1:0\"\nworkers = 1\n{listen_keys}\n\n\
             [admin]\naddr = \"127.0.0.1:0\"\n\n\
             [state]\npath = {state:?}\naudit_log = {audit:?}\n\n\
             [versions.stable]\nname = \"{STABLE}\"\nupstreams = [\"{stable}\"]\n"
        ),
    )
}

/// `cohort serve --config <config>` run by `launcher` (a program and its
/// arguments before cohort's own; empty for none), its log filtered by
/// `filter`, the admin token only from the config under test, and killed
/// when dropped. Colour and where the output goes are the caller's.
fn serve_command(launcher: &[&str], config: &Path, filter: &str) -> tokio::process::Command {
    let mut command = match launcher {
        [] => tokio::process::Command::new(COHORT),
        [program, args @ ..] => {
            let mut command = tokio::process::Command::new(program);
            command.args(args).arg(COHORT);
            command
        }
    };
    command
        .args(["serve", "--config"])
        .arg(config)
        .env("RUST_LOG", filter)
        .env_remove("COHORT_ADMIN_TOKEN")
        .kill_on_drop(true);
    command
}

/// Reads `log` line by line until `found` makes something of a line;
/// fails the test if the log ends first, or after the deadline.
async fn read_log_until<R, T>(
    log: &mut tokio::io::Lines<R>,
    what: &str,
    mut found: impl FnMut(&str) -> Option<T>,
) -> T
where
    R: tokio::io::AsyncBufRead + Unpin,
{
    within(what, async {
        loop {
            let line = log
                .next_line()
                .await
                .expect("read the log")
                .unwrap_or_else(|| panic!("cohort serve exited before {what}"));
            if let Some(found) = found(&line) {
                return found;
            }
        }
    })
    .await
}

/// Sends `child` SIGTERM and checks that it exits 0, its log (read by
/// `drain`) ending with it.
async fn exits_0_on_sigterm(child: tokio::process::Child, drain: tokio::task::JoinHandle<()>) {
    sigterm_exits_0(child).await;
    let _ = within("the log to end", drain).await;
}

/// Sends `child` SIGTERM and checks that it exits 0.
async fn sigterm_exits_0(mut child: tokio::process::Child) {
    let pid = child.id().expect("the child is running").to_string();
    let kill = Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("run kill");
    assert!(kill.success());
    let status = within("cohort serve to exit after SIGTERM", child.wait())
        .await
        .expect("wait for cohort serve");
    assert_eq!(status.code(), Some(0), "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_answers_on_its_port_and_exits_0_on_sigterm() {
    let backend = Backend::start(STABLE).await;
    let scratch = Scratch::new("serve");
    let config = one_version_config(&scratch, backend.addr, "drain_timeout = \"5s\"");

    let mut child = serve_command(&[], &config, "info")
        .current_dir(&scratch.0)
        // Colour is decided by the log's destination, a pipe here.
        .env_remove("NO_COLOR")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start cohort serve");
    let mut log = BufReader::new(child.stderr.take().expect("piped stderr")).lines();

    let proxy = read_log_until(&mut log, "it announced its address", |line| {
        assert!(
            !line.contains('\u{1b}'),
            "a colour code in a piped log: {line:?}"
        );
        announced_proxy_addr(line)
    })
    .await;
    // Keep draining the log so the child never blocks on a full pipe.
    let drain = tokio::spawn(async move { while let Ok(Some(_)) = log.next_line().await {} });

    let reply = Http::new(proxy).get("/", &[("x-user-id", "alice")]).await;
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(reply.version(), STABLE);
    assert_eq!(reply.backend(), STABLE);

    exits_0_on_sigterm(child, drain).await;
}

/// `cohort demo` binds fixed ports (the README's), so its two cases run in
/// one test, one after the other; SIGUSR1 rolls its canary back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_serves_on_its_ports_and_leaves_nothing_behind() {
    // The demo's own directories: `cohort-demo-<pid>-<random>`.
    let state_dirs = |pid: u32| -> Vec<PathBuf> {
        let prefix = format!("cohort-demo-{pid}-");
        std::fs::read_dir(std::env::temp_dir())
            .expect("read the temporary directory")
            .filter_map(Result::ok)
            .filter(|entry| entry.file_name().to_string_lossy().starts_with(&prefix))
            .map(|entry| entry.path())
            .collect()
    };

    let mut child = tokio::process::Command::new(COHORT)
        .arg("demo")
        .env_remove("COHORT_ADMIN_TOKEN")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("start cohort demo");
    let pid = child.id().expect("the demo is running");
    let mut out = BufReader::new(child.stdout.take().expect("piped stdout")).lines();
    within("the demo to announce itself", async {
        loop {
            let line = out
                .next_line()
                .await
                .expect("read the demo's output")
                .expect("cohort demo exited before it announced itself");
            if line.starts_with("Cohort demo:") {
                return;
            }
        }
    })
    .await;
    let made = state_dirs(pid);
    assert_eq!(made.len(), 1, "{made:?}");
    let mode = std::fs::metadata(&made[0])
        .expect("its state directory")
        .permissions();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
        0o700,
        "the demo's state is its user's alone"
    );
    // The README's first curl line: alice always gets the same version.
    let proxy = "127.0.0.1:8080".parse().expect("an address");
    let first = Http::new(proxy).get("/", &[("x-user-id", "alice")]).await;
    assert_eq!(first.status, 200, "{first:?}");
    for _ in 0..5 {
        let again = Http::new(proxy).get("/", &[("x-user-id", "alice")]).await;
        assert_eq!(again.version(), first.version());
    }
    // The override line it prints forces the canary.
    let forced = Http::new(proxy).get("/", &[("x-cohort", "canary")]).await;
    assert_eq!(forced.version(), "v2", "{forced:?}");
    // SIGUSR1 rolls the demo's canary back, as it does `cohort serve`'s.
    let kill = Command::new("kill")
        .args(["-USR1", &pid.to_string()])
        .status()
        .expect("run kill");
    assert!(kill.success());
    let admin = "127.0.0.1:9901".parse().expect("an address");
    support::eventually_async("the demo's canary to be rolled back", || async {
        Http::new(admin).get("/admin/state", &[]).await.json()["status"] == "rolled_back"
    })
    .await;
    sigterm_exits_0(child).await;
    assert!(state_dirs(pid).is_empty(), "the demo left its state behind");

    // With a port taken, it says which, exits 1, and still leaves nothing.
    let taken = std::net::TcpListener::bind("127.0.0.1:9001").expect("take the stable port");
    let refusing = tokio::process::Command::new(COHORT)
        .arg("demo")
        .env_remove("COHORT_ADMIN_TOKEN")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start cohort demo again");
    let pid = refusing.id().expect("the demo is running");
    let failed = within("the demo to refuse", refusing.wait_with_output())
        .await
        .expect("wait for the demo");
    drop(taken);
    assert_eq!(failed.status.code(), Some(1), "{failed:?}");
    assert!(
        String::from_utf8_lossy(&failed.stderr).contains("127.0.0.1:9001"),
        "{failed:?}"
    );
    assert!(
        state_dirs(pid).is_empty(),
        "a failed demo left its state behind"
    );
}

/// `cohort serve` raises its soft limit on open files to the hard one, as
/// Go programs do, and says when even that is short of
/// `listen.max_connections`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_raises_its_open_files_limit_and_warns_when_it_is_short() {
    let backend = Backend::start(STABLE).await;
    let scratch = Scratch::new("nofile");
    let config = one_version_config(&scratch, backend.addr, "max_connections = 5000");
    // Started with a soft limit of 256 under a hard one of 4096: short of
    // two descriptors for each of 5000 connections.
    let mut child = serve_command(&["prlimit", "--nofile=256:4096"], &config, "info")
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start cohort serve under prlimit");
    let mut log = BufReader::new(child.stderr.take().expect("piped stderr")).lines();
    let warning = read_log_until(&mut log, "the open files warning", |line| {
        line.contains("open files limit").then(|| line.to_owned())
    })
    .await;
    assert!(warning.contains("open_files=4096"), "{warning}");
    assert!(warning.contains("needed=10064"), "{warning}");
    assert!(warning.contains("max_connections=5000"), "{warning}");
    let drain = tokio::spawn(async move { while let Ok(Some(_)) = log.next_line().await {} });

    // prlimit runs cohort in its own process: its limits are cohort's.
    let pid = child.id().expect("the child is running");
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).expect("the limits");
    let open_files = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .expect("a line for open files");
    let values: Vec<&str> = open_files.split_whitespace().collect();
    assert_eq!(values[3..5], ["4096", "4096"], "{open_files}");
    exits_0_on_sigterm(child, drain).await;
}

/// A stderr that nobody reads (a stalled log driver, a full pipe) holds up
/// neither requests nor a shutdown: lines past the log's queue are dropped
/// and counted. Here stdout and stderr are one pipe, as under systemd.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_reader_that_stalls_holds_up_no_request_and_no_shutdown() {
    let backend = Backend::start(STABLE).await;
    let scratch = Scratch::new("stalled-log");
    let config = one_version_config(&scratch, backend.addr, "");
    // A line per request: more than the pipe and the queue hold.
    let filter = "info,cohort::proxy::access=info";
    let mut child = serve_command(&["sh", "-c", "exec \"$@\" 2>&1", "sh"], &config, filter)
        .env("NO_COLOR", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start cohort serve");
    let mut log = BufReader::new(child.stdout.take().expect("piped output")).lines();
    let (proxy, admin) = read_log_until(&mut log, "it announced its addresses", |line| {
        Some((
            announced_proxy_addr(line)?,
            announced_addr(line, "admin.addr")?,
        ))
    })
    .await;
    // From here on nobody reads the log; its pipe stays open.

    let requests = cohort::logging::QUEUED_LINES + 4_000;
    let clients = 8;
    let sent: Vec<_> = (0..clients)
        .map(|client| {
            tokio::spawn(async move {
                let http = Http::new(proxy);
                for n in 0..requests / clients {
                    let key = format!("user-{client}-{n}");
                    let reply = http.get("/", &[("x-user-id", &key)]).await;
                    assert_eq!(reply.status, 200, "{reply:?}");
                }
            })
        })
        .collect();
    for client in sent {
        client.await.expect("every request answered");
    }
    let metrics = AdminApi::new(admin)
        .raw(http::Method::GET, "/metrics", "")
        .await;
    let metrics = String::from_utf8_lossy(&metrics.body);
    let dropped = metrics
        .lines()
        .find_map(|line| line.strip_prefix("cohort_log_lines_dropped_total "))
        .and_then(|count| count.trim().parse::<f64>().ok())
        .unwrap_or_else(|| panic!("no count of dropped lines in:\n{metrics}"));
    assert!(dropped > 0.0, "{dropped}");

    sigterm_exits_0(child).await;
    drop(log);
}
