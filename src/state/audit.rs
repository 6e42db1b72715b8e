//! The audit log: one JSON line per change of the live state.
//!
//! Owns: appending `{time, action, before, after, reason, source}` lines to
//! `state.audit_log`, synced to disk before the change is acknowledged, and
//! keeping the file whole lines when a write fails part way (a full disk).
//! Does not own deciding what changed.

use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::Serialize;

use super::now_rfc3339;

/// An append-only JSON-lines file.
#[derive(Debug)]
pub struct AuditLog {
    path: PathBuf,
    file: Mutex<Option<File>>,
}

/// One line of the audit log.
#[derive(Debug, Serialize)]
pub struct Entry<'a, T: Serialize> {
    pub action: &'a str,
    pub before: Option<&'a T>,
    pub after: Option<&'a T>,
    pub reason: Option<&'a str>,
    pub source: &'a str,
}

impl AuditLog {
    /// Opens (or creates) the log at `path` for appending, so that a log
    /// that cannot be written stops a start instead of losing its lines.
    pub fn open(path: PathBuf) -> std::io::Result<AuditLog> {
        let file = open_for_append(&path)?;
        Ok(AuditLog {
            path,
            file: Mutex::new(Some(file)),
        })
    }

    /// Appends `entry` with the current time and syncs it.
    pub fn append<T: Serialize>(&self, entry: &Entry<'_, T>) -> std::io::Result<()> {
        let mut line = serde_json::to_vec(&serde_json::json!({
            "time": now_rfc3339(),
            "action": entry.action,
            "before": entry.before,
            "after": entry.after,
            "reason": entry.reason,
            "source": entry.source,
        }))
        .expect("audit entries serialise to JSON");
        line.push(b'\n');
        let mut file = self
            .file
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        // Opened again after a failure, in case the file was moved or replaced.
        if file.is_none() {
            *file = Some(open_for_append(&self.path)?);
        }
        let handle = file.as_mut().expect("opened above");
        let start = handle.metadata()?.len();
        // A line torn by a crash, or by a failure whose cut below failed
        // too, is ended rather than continued.
        if start > 0 {
            let mut last = [0u8];
            handle.read_exact_at(&mut last, start - 1)?;
            if last[0] != b'\n' {
                line.insert(0, b'\n');
            }
        }
        let written = handle.write_all(&line).and_then(|()| handle.sync_data());
        if written.is_err() {
            // A full disk may take part of a line: cut it off, so that the
            // log stays JSON lines.
            let _ = handle.set_len(start);
            *file = None;
        }
        written
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
    use super::{AuditLog, Entry};

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
        let entry = Entry::<u8> {
            action: "weight",
            before: None,
            after: None,
            reason: None,
            source: "api",
        };
        log.append(&entry).expect("append");
        log.append(&entry).expect("append again");
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
