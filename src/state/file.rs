//! The state file: written atomically, read strictly.
//!
//! Owns: the on-disk form of [`SavedState`] at `state.path` and the atomic
//! replace (temp file in the same directory, fsync, rename, fsync the
//! directory), so a crash at any point leaves either the old file or the new
//! one, never a torn one; reading refuses a file that is not whole JSON or
//! fails [`super::LiveState::check`], a reset sets an unreadable file
//! aside instead of overwriting it, a start removes the temp files of
//! writes that a crash cut short and checks that it can write at all, a
//! `state.path` that is a link is written where it points (keeping the
//! file's permissions), and [`check`] finds for `cohort check` what a start
//! would refuse in the files `[state]` names. Does not own what the state
//! means.

use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Write as _};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use super::{SavedState, StateError, StateStore};
use crate::config::{Problem, StateConfig};

/// What a start would refuse in the files `[state]` names, each named by
/// its key, for `cohort check`: a path that is a directory, or under a
/// file, and a state file that cannot be read, is not valid, or whose
/// saved rollout `resumable` says cannot be resumed. Changes nothing on
/// disk.
#[must_use]
pub fn check(
    config: &StateConfig,
    resumable: impl Fn(&super::LiveState) -> Result<(), String>,
) -> Vec<Problem> {
    let mut problems = Vec::new();
    for (key, path) in [
        ("state.path", &config.path),
        ("state.audit_log", &config.audit_log),
    ] {
        let problem = |message: String| Problem {
            key: key.to_owned(),
            message,
        };
        if path.is_dir() {
            problems.push(problem(format!("{} is a directory", path.display())));
            continue;
        }
        // The nearest ancestor that exists must be a directory: the missing
        // ones are created at start, under it.
        if let Some(blocking) = path
            .ancestors()
            .skip(1)
            .filter(|dir| !dir.as_os_str().is_empty())
            .find(|dir| dir.symlink_metadata().is_ok())
            .filter(|dir| !dir.is_dir())
        {
            problems.push(problem(format!(
                "{} is not a directory",
                blocking.display()
            )));
        }
    }
    if !problems.is_empty() {
        return problems;
    }
    let unreadable = match FileStore::new(config.path.clone()).read() {
        Ok(None) => None,
        Ok(Some(saved)) => resumable(&saved.live)
            .err()
            .map(|message| StateError::Corrupt {
                path: config.path.display().to_string(),
                message,
            }),
        Err(error) => Some(error),
    };
    problems.extend(unreadable.map(|error| Problem {
        key: "state.path".to_owned(),
        message: error.to_string(),
    }));
    problems
}

/// A [`StateStore`] kept in one JSON file.
#[derive(Debug)]
pub struct FileStore {
    path: PathBuf,
    /// Serialises writers within this process; the generation check below
    /// then holds because the file has no other writer.
    lock: Mutex<()>,
}

impl FileStore {
    #[must_use]
    pub fn new(path: PathBuf) -> FileStore {
        FileStore {
            path,
            lock: Mutex::new(()),
        }
    }

    fn read(&self) -> Result<Option<SavedState>, StateError> {
        let text = match crate::files::read_text(&self.path, crate::files::Pipes::Refused) {
            Ok(text) => text,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(StateError::Read {
                    path: self.path.display().to_string(),
                    source,
                });
            }
        };
        let corrupt = |message: String| StateError::Corrupt {
            path: self.path.display().to_string(),
            message,
        };
        let saved: SavedState = serde_json::from_str(&text)
            .map_err(|error| corrupt(name_the_field(&text).unwrap_or_else(|| error.to_string())))?;
        saved.live.check().map_err(corrupt)?;
        Ok(Some(saved))
    }
}

impl StateStore for FileStore {
    fn load(&self) -> Result<Option<SavedState>, StateError> {
        self.remove_leftovers();
        self.read()
    }

    fn write(&self, expected: Option<u64>, state: &SavedState) -> Result<(), StateError> {
        let _guard = self
            .lock
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(expected) = expected {
            // An unreadable file is being replaced on purpose (re-seed): no check.
            if let Ok(Some(current)) = self.read()
                && current.live.generation != expected
            {
                return Err(StateError::Conflict {
                    expected,
                    found: current.live.generation,
                });
            }
        }
        let mut text = serde_json::to_vec_pretty(state).expect("the state serialises to JSON");
        text.push(b'\n');
        write_atomically(&self.path, &text).map_err(|source| StateError::Write {
            path: self.path.display().to_string(),
            source,
        })
    }

    fn set_aside(&self) -> Result<String, StateError> {
        let aside = self.aside_path();
        fs::rename(&self.path, &aside).map_err(|source| StateError::Write {
            path: self.path.display().to_string(),
            source,
        })?;
        Ok(aside.display().to_string())
    }
}

impl FileStore {
    /// Whether a write could replace the state file: a temp file is made
    /// and removed where a write makes one. A start checks it, so that a
    /// proxy that could save no change (a read-only volume beneath a state
    /// file it can read) does not serve as if it could; its first rollback
    /// would not survive a restart.
    pub fn check_writable(&self) -> Result<(), StateError> {
        let error = |source| StateError::Write {
            path: self.path.display().to_string(),
            source,
        };
        let path = link_target(&self.path).map_err(error)?;
        let mut temp_name = path.file_name().unwrap_or_default().to_owned();
        temp_name.push(format!(".tmp.{}", std::process::id()));
        let temp = path.with_file_name(temp_name);
        if let Some(dir) = temp.parent().filter(|d| !d.as_os_str().is_empty()) {
            fs::create_dir_all(dir).map_err(error)?;
        }
        create_temp(&temp).map_err(error)?;
        let _ = fs::remove_file(&temp);
        Ok(())
    }

    /// Removes the temp files of writes that a crash stopped before their
    /// rename (`<path>.tmp.<pid>`, see [`write_atomically`]). One younger
    /// than [`LEFTOVER_AGE`] may be another process's write in progress,
    /// and is left alone.
    fn remove_leftovers(&self) {
        // Beside the file the path leads to, where writes are made.
        let Ok(path) = link_target(&self.path) else {
            return;
        };
        let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
            return;
        };
        let dir = if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        };
        let mut prefix = name.to_owned();
        prefix.push(".tmp.");
        let prefix = prefix.to_string_lossy().into_owned();
        let Ok(entries) = fs::read_dir(dir) else {
            return;
        };
        for entry in entries.filter_map(Result::ok) {
            let stale = entry
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|modified| modified.elapsed().ok())
                .is_some_and(|age| age > LEFTOVER_AGE);
            if stale && entry.file_name().to_string_lossy().starts_with(&prefix) {
                match fs::remove_file(entry.path()) {
                    Ok(()) => tracing::info!(
                        file = %entry.path().display(),
                        "removed a state file write that a crash left unfinished"
                    ),
                    Err(error) => tracing::warn!(
                        %error,
                        file = %entry.path().display(),
                        "cannot remove a state file write that a crash left unfinished"
                    ),
                }
            }
        }
    }

    /// `<path>.unreadable-<seconds since the epoch>`, beside the state file.
    fn aside_path(&self) -> PathBuf {
        let seconds = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let mut name = self.path.file_name().unwrap_or_default().to_owned();
        name.push(format!(".unreadable-{seconds}"));
        self.path.with_file_name(name)
    }
}

/// The field a state file's value is wrong in, and why, when its JSON is
/// whole: serde points such an error at the end of the object the live
/// state is flattened into, not at the field.
fn name_the_field(text: &str) -> Option<String> {
    let serde_json::Value::Object(mut document) = serde_json::from_str(text).ok()? else {
        return None;
    };
    document.remove("versions_digest");
    document.remove("shadow_digest");
    document.remove("config_stable");
    document.remove("config_canary");
    document.remove("rollout_due");
    let error = serde_path_to_error::deserialize::<_, super::LiveState>(serde_json::Value::Object(
        document,
    ))
    .err()?;
    let message = error.inner().to_string();
    // serde lists the live state's fields alone, as if they were all a file
    // could hold.
    if error.path().iter().count() == 1
        && let Some(unknown) = message
            .strip_prefix("unknown field ")
            .and_then(|rest| rest.split_once(", expected"))
            .map(|(field, _)| field)
    {
        return Some(format!(
            "{unknown} is not a field this build of Cohort writes (a newer one's file?)"
        ));
    }
    // The live state's fields are the file's own, at its top level.
    Some(crate::config::keyed("", error.path(), error.inner()))
}

/// How old a state file's temp file must be to count as left by a crash: a
/// write takes milliseconds from its creation to its rename.
const LEFTOVER_AGE: std::time::Duration = std::time::Duration::from_secs(60);

/// Where `path` leads: itself, or the file its links point to (which need
/// not exist yet).
fn link_target(path: &Path) -> std::io::Result<std::path::PathBuf> {
    let mut path = path.to_owned();
    // As many links as the kernel follows.
    for _ in 0..40 {
        if !fs::symlink_metadata(&path).is_ok_and(|m| m.file_type().is_symlink()) {
            return Ok(path);
        }
        let target = fs::read_link(&path)?;
        path = match path.parent() {
            Some(dir) if target.is_relative() => dir.join(target),
            _ => target,
        };
    }
    Err(std::io::Error::other("too many levels of links"))
}

/// Creates the temp file `temp` anew, for this write alone. An entry
/// already there (a crash's leftover, or a link planted in a directory
/// others may write to, for the write to land on a file of their choosing
/// and the rename to make the state file their link) is removed, never
/// followed or truncated.
fn create_temp(temp: &Path) -> std::io::Result<File> {
    let create = || OpenOptions::new().write(true).create_new(true).open(temp);
    match create() {
        Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => {
            fs::remove_file(temp)?;
            create()
        }
        created => created,
    }
}

/// Replaces `path` with `contents` so that readers and crashes see the old
/// file or the new one, whole. An error means the old file is in place.
/// A `path` that is a link is written where it points, as it is read
/// there (replaced, the link would leave its target behind, on the volume
/// the operator meant the state to live on); the file keeps its
/// permissions (an operator's `chmod 600` stays).
pub fn write_atomically(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    let path = &link_target(path)?;
    let kept_permissions = fs::metadata(path).ok().map(|m| m.permissions());
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    fs::create_dir_all(dir)?;
    let file_name = path
        .file_name()
        .ok_or_else(|| std::io::Error::other("the state path names no file"))?;
    let mut temp_name = file_name.to_owned();
    temp_name.push(format!(".tmp.{}", std::process::id()));
    let temp = dir.join(temp_name);
    let result = (|| {
        let mut file = create_temp(&temp)?;
        if let Some(permissions) = kept_permissions {
            file.set_permissions(permissions)?;
        }
        file.write_all(contents)?;
        file.sync_all()?;
        fs::rename(&temp, path)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&temp);
        return result;
    }
    // The rename is durable only once the directory entry is. Failing
    // that, the new file is still the one every reader sees, so the write
    // stands: reporting it failed would leave the caller believing the old
    // one is in place. Only a power loss before the next flush could bring
    // the old one back.
    if let Err(error) = File::open(dir).and_then(|dir| dir.sync_all()) {
        tracing::warn!(%error, dir = %dir.display(), "cannot flush the directory after replacing a file");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;

    #[test]
    fn a_linked_file_is_written_where_it_points_and_keeps_its_permissions() {
        let dir = tempfile::tempdir().unwrap();
        let volume = dir.path().join("volume");
        fs::create_dir(&volume).unwrap();
        let target = volume.join("state.json");
        fs::write(&target, "old").unwrap();
        fs::set_permissions(&target, fs::Permissions::from_mode(0o600)).unwrap();
        let link = dir.path().join("state.json");
        std::os::unix::fs::symlink("volume/state.json", &link).unwrap();

        write_atomically(&link, b"new").unwrap();
        assert!(
            fs::symlink_metadata(&link)
                .unwrap()
                .file_type()
                .is_symlink()
        );
        assert_eq!(fs::read_to_string(&target).unwrap(), "new");
        let mode = fs::metadata(&target).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);

        // A link to a file not there yet: the file is made where it points.
        fs::remove_file(&target).unwrap();
        write_atomically(&link, b"fresh").unwrap();
        assert_eq!(fs::read_to_string(&target).unwrap(), "fresh");
    }

    #[test]
    fn a_link_planted_at_the_temp_name_is_neither_followed_nor_kept() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        fs::write(&victim, "someone else's").unwrap();
        let path = dir.path().join("state.json");
        fs::write(&path, "old").unwrap();
        let temp = dir
            .path()
            .join(format!("state.json.tmp.{}", std::process::id()));
        std::os::unix::fs::symlink(&victim, &temp).unwrap();

        let store = FileStore::new(path.clone());
        store.check_writable().unwrap();
        assert_eq!(fs::read_to_string(&victim).unwrap(), "someone else's");

        std::os::unix::fs::symlink(&victim, &temp).unwrap();
        write_atomically(&path, b"new").unwrap();
        assert_eq!(fs::read_to_string(&victim).unwrap(), "someone else's");
        assert!(fs::symlink_metadata(&path).unwrap().file_type().is_file());
        assert_eq!(fs::read_to_string(&path).unwrap(), "new");
    }
}
