//! The command line: clap types and what each subcommand runs.
//!
//! Owns: the argument grammar of SPEC section 6, the runtime each command
//! runs on, and exit codes. Every command is a call into the library, so
//! `main` stays a one-liner.

use std::ffi::OsString;
use std::io::Write as _;
use std::os::unix::ffi::OsStrExt as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

use crate::config::{Config, ConfigError};
use crate::files::Pipes;
use crate::routing::{self, Weight};

#[derive(Debug, Parser)]
#[command(
    name = "cohort",
    version,
    about = "Sticky-routing canary reverse proxy"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the proxy.
    ///
    /// The admin API's bearer token comes from admin.token_file, else from
    /// the environment variable COHORT_ADMIN_TOKEN; without one the admin
    /// listener must be on loopback.
    ///
    /// Signals: SIGHUP reloads the config (and the TLS certificate and key),
    /// SIGUSR1 rolls the canary back, SIGTERM or SIGINT stops accepting and
    /// drains open requests for up to listen.drain_timeout.
    Serve {
        /// The config file (TOML) to run on.
        #[arg(long, default_value = "config/cohort.toml")]
        config: PathBuf,
        /// Re-seed the live state from the config instead of the state file.
        #[arg(long)]
        reset_state: bool,
    },
    /// Validate a config file and the files it names: prints `ok`, or every problem by its key.
    Check {
        /// The config file (TOML) to check.
        #[arg(long)]
        config: PathBuf,
    },
    /// Start two demo upstreams and the proxy in front of them with a 10% canary.
    ///
    /// Its ports are fixed, those of config/cohort.toml (built in): the
    /// proxy on 127.0.0.1:8080, the admin API on 127.0.0.1:9901, the stable
    /// upstream (v1) on 127.0.0.1:9001 and the canary's (v2) on
    /// 127.0.0.1:9002. Its state lives in a temporary directory, removed
    /// when it stops. Ctrl-C stops it.
    Demo,
    /// Print the bucket and cohort of each key.
    Route {
        /// The bucket salt (`routing.salt`, or the canary's name); not empty.
        #[arg(long)]
        salt: String,
        /// The canary weight in percent.
        #[arg(long)]
        weight: f64,
        /// The sticky keys to place, such as user ids: their bytes as
        /// given, UTF-8 or not, as a header's are.
        #[arg(required = true)]
        keys: Vec<OsString>,
    },
    /// Drive a running proxy through its admin API.
    Ctl {
        /// The admin API's base URL.
        #[arg(
            long,
            global = true,
            env = "COHORT_ADMIN",
            default_value = "http://127.0.0.1:9901"
        )]
        admin: String,
        // The two token options read their variables themselves
        // (`ctl::token`): an option given on the command line must win over
        // the other one's variable, which clap would count as a conflict.
        /// The admin bearer token [env: COHORT_ADMIN_TOKEN].
        #[arg(long, global = true)]
        token: Option<String>,
        /// A file holding the admin bearer token, such as the server's
        /// `admin.token_file`; surrounding whitespace is not part of it
        /// [env: COHORT_ADMIN_TOKEN_FILE].
        #[arg(long, global = true, value_name = "PATH", conflicts_with = "token")]
        token_file: Option<PathBuf>,
        /// How long to wait for the admin API's whole answer, such as "10s" or "500ms".
        #[arg(
            long,
            global = true,
            env = "COHORT_CTL_TIMEOUT",
            default_value = "10s",
            value_parser = crate::ctl::parse_timeout
        )]
        timeout: Duration,
        #[command(subcommand)]
        command: CtlCommand,
    },
}

#[derive(Debug, Subcommand)]
pub enum CtlCommand {
    /// Show the live state.
    Status,
    /// Set the canary's weight in percent.
    Weight {
        /// The canary's new weight in percent, 0 to 100 in 0.01 steps.
        weight: f64,
        /// Raise the weight of a rolled-back canary.
        #[arg(long)]
        force: bool,
    },
    /// Send everyone to stable now.
    Rollback {
        /// Why, recorded in the audit log and the state.
        #[arg(long)]
        reason: Option<String>,
    },
    /// Make the canary the stable version.
    Promote {
        /// Promote a canary none of whose upstreams has passed a health check.
        #[arg(long)]
        force: bool,
    },
    /// Install a new canary.
    Canary {
        /// The new version's name.
        #[arg(long)]
        name: String,
        /// The new version's upstream addresses, such as 10.0.0.7:8000:
        /// several after one --upstream, or repeat the option.
        #[arg(
            long = "upstream",
            value_name = "ADDR",
            required = true,
            num_args = 1..,
            action = clap::ArgAction::Append
        )]
        upstreams: Vec<String>,
        /// The new version's weight in percent (0 when not given).
        #[arg(long)]
        weight: Option<f64>,
        /// Expose again, above weight 0, the version that was rolled back.
        #[arg(long)]
        force: bool,
    },
    /// Start, approve or abort a progressive rollout.
    #[command(subcommand)]
    Rollout(RolloutCommand),
}

#[derive(Debug, Subcommand)]
pub enum RolloutCommand {
    /// Start a rollout from a plan: TOML, or an AgentRelease manifest (YAML);
    /// without one, the config's `[rollout]` plan.
    Start {
        /// The plan: a TOML file shaped like the config's `[rollout]` table,
        /// or an AgentRelease manifest (YAML, `kind: AgentRelease`).
        file: Option<PathBuf>,
    },
    /// Pass the approval gate of a paused rollout.
    Approve,
    /// Abort the rollout, which rolls the canary back.
    Abort {
        /// Why, recorded in the audit log and the state.
        #[arg(long)]
        reason: Option<String>,
    },
}

/// Runs a parsed command line to completion.
#[must_use]
pub fn run(cli: Cli) -> ExitCode {
    match cli.command {
        Command::Serve {
            config,
            reset_state,
        } => serve(&config, reset_state),
        Command::Check { config } => check(&config),
        Command::Demo => control_runtime()
            .and_then(|rt| rt.block_on(crate::demo::run()).map_err(|e| e.to_string()))
            .map_or_else(fail, |()| ExitCode::SUCCESS),
        Command::Route { salt, weight, keys } => route(&salt, weight, &keys),
        Command::Ctl {
            admin,
            token,
            token_file,
            timeout,
            command,
        } => match crate::ctl::token(token, token_file) {
            Ok(token) => ctl(&admin, token.as_deref(), timeout, command),
            Err(error) => fail(error.to_string()),
        },
    }
}

fn ctl(admin: &str, token: Option<&str>, timeout: Duration, command: CtlCommand) -> ExitCode {
    use crate::ctl::{Call, render_state, send};
    let call = match command {
        CtlCommand::Status => Call::status(),
        CtlCommand::Weight { weight, force } => match sendable_weight("<WEIGHT>", weight) {
            Ok(weight) => Call::weight(weight, force),
            Err(message) => return fail(message),
        },
        CtlCommand::Rollback { reason } => Call::rollback(reason),
        CtlCommand::Promote { force } => Call::promote(force),
        CtlCommand::Canary {
            name,
            upstreams,
            weight,
            force,
        } => match weight.map(|w| sendable_weight("--weight", w)).transpose() {
            Ok(weight) => Call::canary(name, upstreams, weight, force),
            Err(message) => return fail(message),
        },
        CtlCommand::Rollout(RolloutCommand::Start { file: None }) => Call::rollout_start(None),
        CtlCommand::Rollout(RolloutCommand::Start { file: Some(file) }) => {
            let text = match crate::files::read_text(&file, Pipes::Read) {
                Ok(text) => text,
                Err(error) => return fail(format!("cannot read {}: {error}", file.display())),
            };
            match crate::rollout::plan::document(&text) {
                Ok(plan) => Call::rollout_start(Some(plan)),
                Err(error) => return fail(format!("{}: {error}", file.display())),
            }
        }
        CtlCommand::Rollout(RolloutCommand::Approve) => Call::rollout_approve(),
        CtlCommand::Rollout(RolloutCommand::Abort { reason }) => Call::rollout_abort(reason),
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => return fail(format!("cannot start the runtime: {error}")),
    };
    match runtime.block_on(send(admin, token, timeout, call)) {
        Ok(state) => print_out(|out| out.write_all(render_state(&state).as_bytes())),
        Err(error) => fail(error.to_string()),
    }
}

fn serve(path: &std::path::Path, reset_state: bool) -> ExitCode {
    let options = crate::serve::StartOptions { reset_state };
    let result = control_runtime().and_then(|rt| {
        rt.block_on(crate::serve::run(path, options))
            .map_err(|e| e.to_string())
    });
    result.map_or_else(fail, |()| ExitCode::SUCCESS)
}

/// `cohort check`: the config's values, then the files it names, as
/// `serve` would meet them at start.
fn check(path: &std::path::Path) -> ExitCode {
    let problems = match Config::load(path, Pipes::Read) {
        Ok(config) => {
            let mut problems = config.check_files();
            problems.extend(crate::state::file::check(
                &config.state,
                crate::rollout::controller::check_saved,
            ));
            problems
        }
        Err(ConfigError::Invalid(problems)) => problems,
        Err(error) => return fail(error.to_string()),
    };
    if problems.is_empty() {
        return print_out(|out| out.write_all(b"ok\n"));
    }
    for problem in problems {
        eprintln!("{problem}");
    }
    ExitCode::FAILURE
}

/// `weight` as ctl sends it, or why not, naming the argument `arg`: JSON
/// has no NaN or infinity (serde would send `null`, which the server takes
/// for a missing weight). A finite value out of range is the server's to
/// refuse, with its own message.
fn sendable_weight(arg: &str, weight: f64) -> Result<f64, String> {
    if weight.is_finite() {
        Ok(weight)
    } else {
        Err(format!("{arg}: {weight} is not within 0..=100"))
    }
}

fn route(salt: &str, weight: f64, keys: &[OsString]) -> ExitCode {
    // The config refuses an empty `routing.salt`, so no proxy draws buckets with one.
    if salt.is_empty() {
        return fail(
            "--salt: must not be empty, as routing.salt must not be; \
             without routing.salt the salt is the canary's name"
                .to_owned(),
        );
    }
    let weight = match Weight::from_percent(weight) {
        Ok(weight) => weight,
        Err(message) => return fail(format!("--weight: {message}")),
    };
    // The proxy takes an empty value for no key at all.
    if let Some(empty) = keys.iter().position(|key| key.is_empty()) {
        return fail(format!(
            "key {}: an empty key is no key; such a request follows routing.fallback",
            empty + 1
        ));
    }
    print_out(|out| {
        for key in keys {
            let key = key.as_bytes();
            let placement = routing::place(salt.as_bytes(), weight, key);
            let line = format!("\t{}\t{}\n", placement.bucket, placement.cohort.as_str());
            out.write_all(key)?;
            out.write_all(line.as_bytes())?;
        }
        Ok(())
    })
}

/// Writes a command's output with `write` to standard output, flushed. A
/// closed pipe (`| head`, `| true`) is the reader's choice, not a failure
/// of the command, whose work is done; any other error (a full disk) is a
/// failure, said on standard error. (`println!` would panic on either.)
fn print_out(
    write: impl FnOnce(&mut std::io::StdoutLock<'static>) -> std::io::Result<()>,
) -> ExitCode {
    let mut out = std::io::stdout().lock();
    match write(&mut out).and_then(|()| out.flush()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) if error.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(error) => fail(format!("cannot write the output: {error}")),
    }
}

/// The runtime `serve` and `demo` run on. The proxy workers run on
/// threads of their own (`serve::start`); this one carries the admin
/// listener, health checks, the rollout controller and signals (and the
/// demo's upstreams), which need little. It has two threads all the same,
/// so that one busy with a rollout's look leaves the other to answer.
/// Writes of the state file run off them (`control::on_disk`, and the
/// blocking pool for admin changes): a disk that stalls must not stall
/// `/health`, `/metrics` and the health probes with it.
fn control_runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("cohort-control")
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))
}

fn fail(message: String) -> ExitCode {
    // After the log's last lines, which say what led here.
    crate::logging::last_words(&format!("cohort: {message}"));
    ExitCode::FAILURE
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory as _;

    use super::Cli;

    /// Every argument of every command, flags and positionals alike, says
    /// what it is in `--help`.
    #[test]
    fn every_argument_of_every_command_is_described() {
        fn undescribed(command: &clap::Command, path: &str, found: &mut Vec<String>) {
            for arg in command.get_arguments() {
                let builtin = matches!(arg.get_id().as_str(), "help" | "version");
                if !builtin && arg.get_help().is_none() && arg.get_long_help().is_none() {
                    found.push(format!("{path} {}", arg.get_id()));
                }
            }
            for sub in command.get_subcommands() {
                undescribed(sub, &format!("{path} {}", sub.get_name()), found);
            }
        }
        let mut command = Cli::command();
        command.build();
        let mut found = Vec::new();
        undescribed(&command, "cohort", &mut found);
        assert!(
            found.is_empty(),
            "arguments without a description: {found:?}"
        );
    }
}
