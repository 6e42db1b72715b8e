//! Reading the files an operator names: the config, a rollout plan, a
//! token, a PEM file, the state file.
//!
//! Owns: what such a file may be (a regular file, or a link to one; a pipe
//! only where a person waits for the read) and how large. Does not own what
//! is in them: each reader parses and names its own problems.

use std::path::Path;

/// The most a file an operator names (the config, a plan, a token, a PEM
/// file, the state file) may hold: far more than any of them needs.
pub const MOST_FILE_BYTES: u64 = 16 << 20;

/// Whether a file named to be read may be a pipe.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pipes {
    /// The files a config names, and the config `serve` reads: a pipe that
    /// no one writes to would hold up a start or a reload for good, and a
    /// reload would find it gone.
    Refused,
    /// `cohort ctl`'s files and the config `cohort check` reads, read once
    /// for a person who waits for the answer: `--token-file <(pass token)`.
    Read,
}

/// The bytes of the file at `path`: a regular file (or a link to one), or a
/// pipe if `pipes` allows, of at most [`MOST_FILE_BYTES`]. A device such as
/// `/dev/zero` would never end, and is refused, as is a directory, naming
/// what it is.
pub fn read_file(path: &Path, pipes: Pipes) -> std::io::Result<Vec<u8>> {
    use std::io::{Error, ErrorKind, Read as _};
    use std::os::unix::fs::FileTypeExt as _;
    // Checked before it is opened: opening a pipe for reading blocks.
    let kind = std::fs::metadata(path)?.file_type();
    let readable = kind.is_file() || (pipes == Pipes::Read && kind.is_fifo());
    if !readable {
        let what = if kind.is_dir() {
            "a directory"
        } else if kind.is_fifo() {
            "a pipe, which could hold the read up for good"
        } else {
            "not a regular file (a socket or a device)"
        };
        return Err(Error::new(ErrorKind::InvalidInput, what));
    }
    let mut bytes = Vec::new();
    std::fs::File::open(path)?
        .take(MOST_FILE_BYTES + 1)
        .read_to_end(&mut bytes)?;
    if bytes.len() as u64 > MOST_FILE_BYTES {
        return Err(Error::new(
            ErrorKind::InvalidData,
            format!("larger than {} MiB", MOST_FILE_BYTES >> 20),
        ));
    }
    Ok(bytes)
}

/// [`read_file`], as UTF-8 text.
pub fn read_text(path: &Path, pipes: Pipes) -> std::io::Result<String> {
    String::from_utf8(read_file(path, pipes)?)
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidData, "not UTF-8 text"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_that_would_never_end_or_block_the_read_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let refused = |path: &Path, pipes| read_file(path, pipes).unwrap_err().to_string();

        assert_eq!(refused(dir.path(), Pipes::Read), "a directory");
        let device = refused(Path::new("/dev/zero"), Pipes::Read);
        assert!(device.contains("a device"), "{device}");
        let big = dir.path().join("big.toml");
        std::fs::write(&big, vec![b'#'; MOST_FILE_BYTES as usize + 1]).unwrap();
        assert_eq!(refused(&big, Pipes::Refused), "larger than 16 MiB");

        let fifo = dir.path().join("fifo");
        let made = std::process::Command::new("mkfifo").arg(&fifo).status();
        assert!(made.is_ok_and(|status| status.success()), "mkfifo");
        let pipe = refused(&fifo, Pipes::Refused);
        assert!(pipe.contains("a pipe"), "{pipe}");
        // Allowed, a pipe is read to its end.
        let writer = std::thread::spawn({
            let fifo = fifo.clone();
            move || std::fs::write(fifo, "token\n").unwrap()
        });
        assert_eq!(read_text(&fifo, Pipes::Read).unwrap(), "token\n");
        writer.join().unwrap();
    }
}
