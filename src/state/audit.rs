//! The audit log: one JSON line per change of the live state.
//!
//! Owns: appending `{time, action, before, after, reason, source}` lines to
//! `state.audit_log`, synced to disk before the change is acknowledged.
//! Does not own deciding what changed.

use std::fs::{File, OpenOptions};
use std::io::Write as _;
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
        let written = handle.write_all(&line).and_then(|()| handle.sync_data());
        if written.is_err() {
            *file = None;
        }
        written
    }
}

fn open_for_append(path: &Path) -> std::io::Result<File> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    OpenOptions::new().create(true).append(true).open(path)
}
