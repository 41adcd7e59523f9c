//! Reading the log: a file or stdin to its end, or a file followed as it
//! grows (`--follow`), like `tail -F` but losing no line at rotation.
//!
//! Runs on a blocking thread and hands lines over a bounded channel, so a
//! slow database slows the reading instead of filling memory. Following,
//! it polls every [`POLL`] at the end of the file and then looks at the
//! path: another file there (renamed away and created again) means the old
//! handle is read to its end first, then the new file from its start; a
//! file shorter than what was read (truncated in place) is read again from
//! its start. Bytes that are not UTF-8 are replaced, never fatal. This
//! module knows nothing of Postfix or the database.

use std::fs::File;
use std::io::{BufRead, BufReader, Seek, SeekFrom};
use std::path::Path;
use std::time::Duration;

use tokio::sync::mpsc::Sender;
use tokio_util::sync::CancellationToken;

use super::Input;
use crate::error::{Error, Result};

/// How often a followed file is looked at once everything in it is read.
pub const POLL: Duration = Duration::from_millis(200);
/// Lines per chunk handed over.
const CHUNK_LINES: usize = 1024;

/// What the reader hands over.
#[derive(Debug)]
pub enum Chunk {
    /// Complete lines, in order, without their line ends.
    Lines(Vec<String>),
    /// Everything written so far was read (following only).
    Idle,
}

/// Reads `input` into `tx`: to its end, or with `follow` (a file only)
/// until `stop`, then to the end of what is written. Returns early, without
/// error, when the receiver is gone.
pub fn read(
    input: Input,
    follow: bool,
    tx: &Sender<Chunk>,
    stop: &CancellationToken,
) -> Result<()> {
    match input {
        Input::Stdin => {
            let stdin = std::io::stdin();
            let mut lines = Lines::new(stdin.lock(), tx);
            lines.read_to_eof(Path::new("<stdin>"))?;
            lines.finish(true);
            Ok(())
        }
        Input::File(path) => {
            let file = File::open(&path).map_err(|e| Error::io(&path, e))?;
            if follow {
                return Followed::new(&path, file)?.run(&path, tx, stop);
            }
            let mut lines = Lines::new(BufReader::new(file), tx);
            lines.read_to_eof(&path)?;
            lines.finish(true);
            Ok(())
        }
    }
}

/// Lines out of one reader, batched into chunks.
struct Lines<'t, R> {
    reader: R,
    tx: &'t Sender<Chunk>,
    batch: Vec<String>,
    /// A last line without its line end (yet).
    partial: Vec<u8>,
    /// Bytes consumed from the reader.
    read: u64,
    /// The receiver is gone.
    closed: bool,
}

impl<'t, R: BufRead> Lines<'t, R> {
    /// Lines of `reader`, handed to `tx`.
    fn new(reader: R, tx: &'t Sender<Chunk>) -> Lines<'t, R> {
        Lines {
            reader,
            tx,
            batch: Vec::with_capacity(CHUNK_LINES),
            partial: Vec::new(),
            read: 0,
            closed: false,
        }
    }

    /// Reads to the current end; returns the bytes read. A last line
    /// without a line end is kept for later (the writer may be in the
    /// middle of it).
    fn read_to_eof(&mut self, path: &Path) -> Result<u64> {
        let mut got = 0;
        loop {
            let n = self
                .reader
                .read_until(b'\n', &mut self.partial)
                .map_err(|e| Error::io(path, e))?;
            if n == 0 {
                return Ok(got);
            }
            got += n as u64;
            self.read += n as u64;
            if self.partial.ends_with(b"\n") {
                let line = String::from_utf8_lossy(&self.partial).into_owned();
                self.partial.clear();
                self.push(line);
                if self.closed {
                    return Ok(got);
                }
            }
        }
    }

    /// Queues one line, handing over a full chunk.
    fn push(&mut self, mut line: String) {
        while line.ends_with(['\n', '\r']) {
            line.pop();
        }
        self.batch.push(line);
        if self.batch.len() >= CHUNK_LINES {
            self.send_lines();
        }
    }

    /// Hands over the lines queued.
    fn send_lines(&mut self) {
        if self.batch.is_empty() || self.closed {
            return;
        }
        let lines = std::mem::replace(&mut self.batch, Vec::with_capacity(CHUNK_LINES));
        self.closed = self.tx.blocking_send(Chunk::Lines(lines)).is_err();
    }

    /// Hands over everything, the last line without a line end too when
    /// `last` (the file is finished: rotated away, or the input ended).
    fn finish(&mut self, last: bool) {
        if last && !self.partial.is_empty() {
            let line = String::from_utf8_lossy(&self.partial).into_owned();
            self.partial.clear();
            self.push(line);
        }
        self.send_lines();
    }
}

/// A file followed by path: the open file and its identity.
struct Followed {
    file: File,
    id: (u64, u64),
}

impl Followed {
    /// Starts following `file`, opened from `path`.
    fn new(path: &Path, file: File) -> Result<Followed> {
        let id = identity(&file).map_err(|e| Error::io(path, e))?;
        Ok(Followed { file, id })
    }

    /// Follows until `stop`.
    fn run(mut self, path: &Path, tx: &Sender<Chunk>, stop: &CancellationToken) -> Result<()> {
        let mut lines = Lines::new(BufReader::new(self.file), tx);
        let mut fresh = false;
        loop {
            fresh |= lines.read_to_eof(path)? > 0;
            lines.finish(false);
            if lines.closed {
                return Ok(());
            }
            if stop.is_cancelled() {
                lines.finish(true);
                return Ok(());
            }
            if fresh {
                fresh = false;
                if tx.blocking_send(Chunk::Idle).is_err() {
                    return Ok(());
                }
            }
            match std::fs::metadata(path) {
                Ok(m) if file_id(&m) != self.id => {
                    // Rotated: what the writer put in the old file before it
                    // moved on, then the new file from its start.
                    lines.read_to_eof(path)?;
                    lines.finish(true);
                    let file = File::open(path).map_err(|e| Error::io(path, e))?;
                    self.id = identity(&file).map_err(|e| Error::io(path, e))?;
                    lines = Lines::new(BufReader::new(file), tx);
                    tracing::info!("{}: a new file; reading it from its start", path.display());
                    continue;
                }
                Ok(m) if m.len() < lines.read => {
                    tracing::info!("{}: truncated; reading it from its start", path.display());
                    lines
                        .reader
                        .seek(SeekFrom::Start(0))
                        .map_err(|e| Error::io(path, e))?;
                    lines.read = 0;
                    lines.partial.clear();
                    continue;
                }
                // Unchanged, or renamed and not created again yet: the
                // writer may still add to the old file.
                _ => {}
            }
            std::thread::sleep(POLL);
        }
    }
}

/// The device and inode of an open file.
fn identity(file: &File) -> std::io::Result<(u64, u64)> {
    Ok(file_id(&file.metadata()?))
}

/// The device and inode in `m`.
#[cfg(unix)]
fn file_id(m: &std::fs::Metadata) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    (m.dev(), m.ino())
}

/// Elsewhere: no inode; a rotation shows only as a shorter file.
#[cfg(not(unix))]
fn file_id(_m: &std::fs::Metadata) -> (u64, u64) {
    (0, 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// Everything `read` hands over for `input`, as lines.
    fn collect(rx: &mut tokio::sync::mpsc::Receiver<Chunk>) -> Vec<String> {
        let mut out = Vec::new();
        while let Ok(c) = rx.try_recv() {
            if let Chunk::Lines(l) = c {
                out.extend(l);
            }
        }
        out
    }

    #[test]
    fn a_file_to_its_end_with_a_last_line_without_newline_and_bad_utf8() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("log");
        std::fs::write(&p, b"one\r\ntwo \xff\nthree").unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::channel(16);
        read(Input::File(p), false, &tx, &CancellationToken::new()).unwrap();
        assert_eq!(collect(&mut rx), ["one", "two \u{fffd}", "three"]);
    }

    #[test]
    fn following_reads_across_rename_and_truncation_and_stops() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("log");
        std::fs::write(&p, b"a1\na2\n").unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::channel(1024);
        let stop = CancellationToken::new();
        let reader = {
            let (p, stop) = (p.clone(), stop.clone());
            std::thread::spawn(move || read(Input::File(p), true, &tx, &stop))
        };
        let wait = || std::thread::sleep(POLL * 3);
        wait();
        // The writer still holds the old file after the rename.
        let mut old = std::fs::OpenOptions::new().append(true).open(&p).unwrap();
        std::fs::rename(&p, dir.path().join("log.1")).unwrap();
        old.write_all(b"a3\n").unwrap();
        std::fs::write(&p, b"b1\nb2\n").unwrap();
        wait();
        // Truncated in place (copytruncate), then written again.
        std::fs::write(&p, b"c1\n").unwrap();
        wait();
        std::fs::OpenOptions::new()
            .append(true)
            .open(&p)
            .unwrap()
            .write_all(b"c2\n")
            .unwrap();
        stop.cancel();
        reader.join().unwrap().unwrap();
        assert_eq!(collect(&mut rx), ["a1", "a2", "a3", "b1", "b2", "c1", "c2"]);
    }
}
