//! The audit log: one JSON line per change of the live state.
//!
//! Owns: appending `{time, action, before, after, reason, source}` lines to
//! `state.audit_log`, synced to disk before the change is acknowledged,
//! keeping the file whole lines when a write fails part way (a full disk),
//! and holding the lines a failed write could not append until a later
//! append or [`AuditLog::retry`] gets them in, in order, into a fresh file
//! if the log was rotated away; reading back the state its last whole line
//! left (so a start can tell a change that was saved but never logged);
//! and the names of its actions and sources ([`Action`], [`Actor`]). Does
//! not own deciding what changed.

use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::Serialize;
use serde::de::DeserializeOwned;

use super::{Origin, Source, now_rfc3339};

/// An append-only JSON-lines file.
#[derive(Debug)]
pub struct AuditLog {
    path: PathBuf,
    writer: Mutex<Writer>,
}

/// The open file and the lines it has yet to take, under one lock so that
/// lines go in in the order they came.
#[derive(Debug)]
struct Writer {
    /// `None` after a failed write: opened again on the next, in case the
    /// file was moved or replaced.
    file: Option<File>,
    /// Whole lines not yet in the file, oldest first.
    pending: Vec<u8>,
}

/// The most the lines a failing disk keeps out of the log may hold in
/// memory. Past it the oldest are dropped, and said to be: a disk that
/// refuses for days must not take the process's memory with it.
const MAX_PENDING: usize = 16 * 1024 * 1024;

/// How far back from its end [`AuditLog::last_after`] looks for the last
/// whole line: a state with a rollout's every guardrail is a few KiB.
const LAST_LINE_WITHIN: u64 = 1024 * 1024;

/// One line of the audit log.
#[derive(Debug)]
pub struct Entry<'a, T: Serialize> {
    pub action: Action,
    pub before: Option<&'a T>,
    pub after: Option<&'a T>,
    pub reason: Option<&'a str>,
    pub source: Actor,
}

/// What a line records: its `action`, the names operators grep the log for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// How the live state was chosen on start.
    Start(Origin),
    Weight,
    Rollback,
    Promote,
    Canary,
    Shadow,
    /// A reload changed how users are placed (the salt in effect, the
    /// sticky keys) and nothing else of the live state.
    Routing,
    /// A reload changed `[versions]`: the live state was seeded anew.
    Reseed,
    RolloutStart,
    RolloutPause,
    RolloutApprove,
    RolloutStage,
    /// A rollout's progress saved as a shutdown suspends it, to resume at
    /// the next start.
    RolloutSuspend,
    /// A rollout's look that changed more than its own progress.
    RolloutEvaluation,
    RolloutEnd,
    RolloutDone,
}

impl Action {
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Start(origin) => origin.as_str(),
            Action::Weight => "weight",
            Action::Rollback => "rollback",
            Action::Promote => "promote",
            Action::Canary => "canary",
            Action::Shadow => "shadow",
            Action::Routing => "routing",
            Action::Reseed => "reseed",
            Action::RolloutStart => "rollout_start",
            Action::RolloutPause => "rollout_pause",
            Action::RolloutApprove => "rollout_approve",
            Action::RolloutStage => "rollout_stage",
            Action::RolloutSuspend => "rollout_suspend",
            Action::RolloutEvaluation => "rollout_evaluation",
            Action::RolloutEnd => "rollout_end",
            Action::RolloutDone => "rollout_done",
        }
    }
}

/// Who made a change: a line's `source`. Wider than a rollback's
/// [`Source`], since start-up and a rollout's own steps change the state
/// too.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Actor {
    Api,
    Signal,
    Guardrail,
    /// The process, choosing its live state on start (or starting the
    /// config's rollout).
    Start,
    /// A rollout, moving on by itself.
    Rollout,
}

impl Actor {
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Actor::Api => "api",
            Actor::Signal => "signal",
            Actor::Guardrail => "guardrail",
            Actor::Start => "start",
            Actor::Rollout => "rollout",
        }
    }
}

impl From<Source> for Actor {
    fn from(source: Source) -> Actor {
        match source {
            Source::Api => Actor::Api,
            Source::Signal => Actor::Signal,
            Source::Guardrail => Actor::Guardrail,
        }
    }
}

impl AuditLog {
    /// Opens (or creates) the log at `path` for appending, so that a log
    /// that cannot be written stops a start instead of losing its lines.
    pub fn open(path: PathBuf) -> std::io::Result<AuditLog> {
        let file = open_for_append(&path)?;
        Ok(AuditLog {
            path,
            writer: Mutex::new(Writer {
                file: Some(file),
                pending: Vec::new(),
            }),
        })
    }

    /// Appends `entry` with the current time and syncs it, after any lines
    /// an earlier failure left pending. On an error the line is pending
    /// too, for the next append or [`AuditLog::retry`].
    pub fn append<T: Serialize>(&self, entry: &Entry<'_, T>) -> std::io::Result<()> {
        let mut line = serde_json::to_vec(&serde_json::json!({
            "time": now_rfc3339(),
            "action": entry.action.as_str(),
            "before": entry.before,
            "after": entry.after,
            "reason": entry.reason,
            "source": entry.source.as_str(),
        }))
        .expect("audit entries serialise to JSON");
        line.push(b'\n');
        let mut writer = self.lock();
        writer.keep(&line, MAX_PENDING);
        writer.write_pending(&self.path)
    }

    /// Writes the lines a failed append left pending, if any: `Ok(0)` when
    /// there were none, else how many bytes went in.
    pub fn retry(&self) -> std::io::Result<usize> {
        let mut writer = self.lock();
        if writer.pending.is_empty() {
            return Ok(0);
        }
        let bytes = writer.pending.len();
        writer.write_pending(&self.path).map(|()| bytes)
    }

    /// The `after` of the log's last whole line: `None` when the log is
    /// empty (new, or rotated away), when that line does not parse as a
    /// `T` (an older format), or when it cannot be read. A line torn by a
    /// crash is passed over for the whole one before it.
    pub fn last_after<T: DeserializeOwned>(&self) -> Option<T> {
        let _writer = self.lock();
        let file = File::open(&self.path).ok()?;
        let len = file.metadata().ok()?.len();
        let start = len.saturating_sub(LAST_LINE_WITHIN);
        let mut tail = vec![0; usize::try_from(len - start).ok()?];
        file.read_exact_at(&mut tail, start).ok()?;
        // What follows the last newline is a torn line, or nothing.
        let whole = &tail[..tail.iter().rposition(|&b| b == b'\n')?];
        let last = whole.rsplit(|&b| b == b'\n').next()?;
        #[derive(serde::Deserialize)]
        struct Line<T> {
            after: Option<T>,
        }
        serde_json::from_slice::<Line<T>>(last).ok()?.after
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Writer> {
        self.writer
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl Writer {
    /// Queues `line` behind the pending ones, dropping the oldest whole
    /// lines past `limit` bytes.
    fn keep(&mut self, line: &[u8], limit: usize) {
        self.pending.extend_from_slice(line);
        if self.pending.len() > limit {
            let excess = self.pending.len() - limit;
            // Cut after a newline, so what stays is whole lines.
            // (`excess` is at least 1: `pending` is over the limit.)
            let cut = self.pending[excess - 1..]
                .iter()
                .position(|&b| b == b'\n')
                .map_or(self.pending.len(), |at| excess + at);
            self.pending.drain(..cut);
            tracing::error!(
                bytes = cut,
                "audit lines dropped: the log has refused them too long"
            );
        }
    }

    fn write_pending(&mut self, path: &Path) -> std::io::Result<()> {
        // A log moved or removed since it was opened (logrotate's `create`
        // mode) is followed by a fresh file at `path`, as nginx's reopen
        // and Python's `WatchedFileHandler` do: lines must not go on into
        // the rotated file, or into one that no longer has a name.
        if self.file.as_ref().is_some_and(|file| !is_at(file, path)) {
            self.file = None;
        }
        if self.file.is_none() {
            self.file = Some(open_for_append(path)?);
        }
        let handle = self.file.as_mut().expect("opened above");
        let start = handle.metadata()?.len();
        // A line torn by a crash, or by a failure whose cut below failed
        // too, is ended rather than continued.
        let mut torn = false;
        if start > 0 {
            let mut last = [0u8];
            handle.read_exact_at(&mut last, start - 1)?;
            torn = last[0] != b'\n';
        }
        let written = (if torn {
            handle.write_all(b"\n")
        } else {
            Ok(())
        })
        .and_then(|()| handle.write_all(&self.pending))
        .and_then(|()| handle.sync_data());
        match written {
            Ok(()) => self.pending.clear(),
            Err(_) => {
                // A full disk may take part of a line: cut it off, so that
                // the log stays JSON lines.
                let _ = handle.set_len(start);
                self.file = None;
            }
        }
        written
    }
}

/// Whether `file` is still the one that `path` names.
fn is_at(file: &File, path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt as _;
    match (file.metadata(), std::fs::metadata(path)) {
        (Ok(open), Ok(named)) => open.dev() == named.dev() && open.ino() == named.ino(),
        _ => false,
    }
}

fn open_for_append(path: &Path) -> std::io::Result<File> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    // Read too: an append looks at the last byte first.
    OpenOptions::new()
        .create(true)
        .read(true)
        .append(true)
        .open(path)
}

#[cfg(test)]
mod tests {
    use super::{Action, Actor, AuditLog, Entry};

    fn entry(action: Action) -> Entry<'static, u8> {
        Entry {
            action,
            before: None,
            after: None,
            reason: None,
            source: Actor::Api,
        }
    }

    #[test]
    fn past_the_limit_the_oldest_whole_lines_go() {
        let mut writer = super::Writer {
            file: None,
            pending: Vec::new(),
        };
        for line in [&b"aaa\n"[..], b"bbb\n", b"ccc\n"] {
            writer.keep(line, 8);
        }
        assert_eq!(writer.pending, b"bbb\nccc\n");
        writer.keep(b"dddddd\n", 8);
        assert_eq!(writer.pending, b"dddddd\n");
    }

    /// The lines a full disk refused are appended, in order, once it takes
    /// them again: by the next append, or by a retry.
    #[test]
    fn lines_a_full_disk_refused_go_in_once_it_takes_them() {
        let dir = tempfile::tempdir().expect("a scratch directory");
        let path = dir.path().join("audit.jsonl");
        std::os::unix::fs::symlink("/dev/full", &path).expect("a log on a full device");
        let log = AuditLog::open(path.clone()).expect("open the log");
        assert!(
            log.append(&entry(Action::Weight)).is_err(),
            "/dev/full took a line"
        );
        assert!(log.append(&entry(Action::Rollback)).is_err());
        assert!(log.retry().is_err());

        // The disk has room again.
        std::fs::remove_file(&path).expect("remove the link");
        let held = log.retry().expect("the held lines go in");
        assert!(held > 0);
        assert_eq!(log.retry().expect("nothing left"), 0);
        log.append(&entry(Action::Promote)).expect("append");
        let text = std::fs::read_to_string(&path).expect("read the log");
        let actions: Vec<String> = text
            .lines()
            .map(|line| {
                let line: serde_json::Value = serde_json::from_str(line).expect("a JSON line");
                line["action"].as_str().expect("an action").to_owned()
            })
            .collect();
        assert_eq!(actions, ["weight", "rollback", "promote"], "{text}");
    }

    /// A log rotated by renaming it (logrotate's `create` mode) or removed
    /// gets the next lines in a fresh file under its name.
    #[test]
    fn a_rotated_or_removed_log_is_followed_by_a_fresh_file() {
        let dir = tempfile::tempdir().expect("a scratch directory");
        let path = dir.path().join("audit.jsonl");
        let rotated = dir.path().join("audit.jsonl.1");
        let log = AuditLog::open(path.clone()).expect("open the log");
        let actions = |path: &std::path::Path| -> Vec<String> {
            std::fs::read_to_string(path)
                .expect("read a log")
                .lines()
                .map(|line| {
                    let line: serde_json::Value = serde_json::from_str(line).expect("a JSON line");
                    line["action"].as_str().expect("an action").to_owned()
                })
                .collect()
        };
        log.append(&entry(Action::Weight)).expect("append");
        std::fs::rename(&path, &rotated).expect("rotate the log");
        log.append(&entry(Action::Rollback))
            .expect("append after the rotation");
        assert_eq!(actions(&rotated), ["weight"]);
        assert_eq!(actions(&path), ["rollback"]);

        std::fs::remove_file(&path).expect("remove the log");
        log.append(&entry(Action::Promote))
            .expect("append after the removal");
        assert_eq!(actions(&path), ["promote"]);
    }

    /// The state a start compares its own with: the last whole line's,
    /// passing over one a crash tore.
    #[test]
    fn the_last_whole_lines_after_is_read_back() {
        let dir = tempfile::tempdir().expect("a scratch directory");
        let path = dir.path().join("audit.jsonl");
        let log = AuditLog::open(path.clone()).expect("open the log");
        assert_eq!(log.last_after::<u8>(), None, "an empty log");
        for after in [1u8, 2] {
            log.append(&Entry {
                after: Some(&after),
                ..entry(Action::Weight)
            })
            .expect("append");
        }
        assert_eq!(log.last_after::<u8>(), Some(2));
        let mut torn = std::fs::read(&path).expect("read the log");
        torn.extend_from_slice(b"{\"time\": \"20");
        std::fs::write(&path, torn).expect("tear the log");
        assert_eq!(
            log.last_after::<u8>(),
            Some(2),
            "the torn line is passed over"
        );
        assert_eq!(log.last_after::<String>(), None, "another format");
    }

    #[test]
    fn a_torn_last_line_is_ended_before_the_next() {
        let dir = tempfile::tempdir().expect("a scratch directory");
        let path = dir.path().join("audit.jsonl");
        std::fs::write(
            &path,
            b"{\"time\": \"2026-01-01T00:00:00Z\"}\n{\"time\": \"20",
        )
        .expect("a torn log");
        let log = AuditLog::open(path.clone()).expect("open the log");
        log.append(&entry(Action::Weight)).expect("append");
        log.append(&entry(Action::Weight)).expect("append again");
        let text = std::fs::read_to_string(&path).expect("read the log");
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 4, "{text}");
        assert_eq!(lines[1], "{\"time\": \"20");
        for line in [lines[0], lines[2], lines[3]] {
            serde_json::from_str::<serde_json::Value>(line).expect("a whole JSON line");
        }
        assert!(text.ends_with('\n'));
    }
}
