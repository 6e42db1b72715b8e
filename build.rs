//! Build script: the commit `cohort_build_info` reports.
//!
//! Owns: setting `COHORT_GIT_COMMIT` at compile time, from the environment
//! when the builder sets it (a container build without `.git`), else from
//! `git rev-parse --short HEAD`, else leaving it unset (reported as
//! "unknown"). Never fails the build: git and a repository are optional.

use std::path::Path;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=COHORT_GIT_COMMIT");
    if std::env::var_os("COHORT_GIT_COMMIT").is_some() {
        // Already in the environment, where `option_env!` reads it.
        return;
    }
    let Some(commit) = git(&["rev-parse", "--short", "HEAD"]) else {
        return;
    };
    println!("cargo:rustc-env=COHORT_GIT_COMMIT={commit}");

    // Rebuild when HEAD moves: a commit, a checkout, or packed refs changing.
    if let Some(git_dir) = git(&["rev-parse", "--git-dir"]) {
        watch(&Path::new(&git_dir).join("HEAD"));
    }
    if let (Some(common), Some(head_ref)) = (
        git(&["rev-parse", "--git-common-dir"]),
        git(&["symbolic-ref", "-q", "HEAD"]),
    ) {
        watch(&Path::new(&common).join(head_ref));
        watch(&Path::new(&common).join("packed-refs"));
    }
}

/// Runs git and returns its trimmed output, or `None` if it is absent or fails.
fn git(args: &[&str]) -> Option<String> {
    let output = Command::new("git").args(args).output().ok()?;
    if !output.status.success() {
        return None;
    }
    let text = String::from_utf8(output.stdout).ok()?.trim().to_owned();
    (!text.is_empty()).then_some(text)
}

/// Asks cargo to rerun this script when `path` changes; a path that does not
/// exist would make it rerun on every build, so those are skipped.
fn watch(path: &Path) {
    if path.exists() {
        println!("cargo:rerun-if-changed={}", path.display());
    }
}
