//! The Maildir format: listing what is left to read, info flags, moving a
//! message with `rename`, and delivering a new file the tmp → new way.
//!
//! This module owns file names and directory operations. It does not decide
//! what happens to a message (that is the caller's [`super::Disposition`]) and
//! never reads or changes a message's bytes except to copy them whole.
//!
//! Flags follow the Maildir spec (<https://cr.yp.to/proto/maildir.html>): a name
//! in `cur/` may end in `:2,` plus flag letters in ASCII order; `S` (seen) is
//! what marks a message as processed here.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use super::MailboxError;
use crate::clock;

/// The three subdirectories every Maildir has.
const SUBDIRS: [&str; 3] = ["tmp", "new", "cur"];

/// The subdirectory a message was found in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Sub {
    /// `new/`: delivered, never looked at.
    New,
    /// `cur/`: seen by a mail reader, but not flagged `S`.
    Cur,
}

impl Sub {
    /// The directory name.
    pub(super) fn as_str(self) -> &'static str {
        match self {
            Sub::New => "new",
            Sub::Cur => "cur",
        }
    }
}

/// A message file waiting to be read.
#[derive(Debug, Clone)]
pub(super) struct Entry {
    /// Where it is.
    pub(super) sub: Sub,
    /// Its file name.
    pub(super) name: String,
}

/// Fails unless `root` has `new/`, `cur/` and `tmp/`, naming what is missing.
pub(super) fn check(root: &Path) -> Result<(), MailboxError> {
    for sub in SUBDIRS {
        let dir = root.join(sub);
        if !dir.is_dir() {
            return Err(MailboxError::NotMaildir {
                path: root.to_path_buf(),
                missing: dir,
            });
        }
    }
    Ok(())
}

/// Creates `root` as a Maildir if it is not one yet. A Maildir++ folder
/// (`plusplus`) also gets the empty `maildirfolder` marker file.
pub(super) fn ensure(root: &Path, plusplus: bool) -> Result<(), MailboxError> {
    for sub in SUBDIRS {
        let dir = root.join(sub);
        fs::create_dir_all(&dir).map_err(|e| MailboxError::io(&dir, e))?;
    }
    if plusplus {
        let marker = root.join("maildirfolder");
        File::create(&marker).map_err(|e| MailboxError::io(&marker, e))?;
    }
    Ok(())
}

/// The messages still to process, sorted by name (roughly delivery order,
/// since names start with the delivery time), and how many in `cur/` were
/// skipped as already processed. Dotfiles are ignored; `tmp/` is never read.
pub(super) fn list(root: &Path) -> Result<(Vec<Entry>, usize), MailboxError> {
    let mut entries = Vec::new();
    let mut skipped = 0;
    for sub in [Sub::New, Sub::Cur] {
        let dir = root.join(sub.as_str());
        let read = fs::read_dir(&dir).map_err(|e| MailboxError::io(&dir, e))?;
        for item in read {
            let item = item.map_err(|e| MailboxError::io(&dir, e))?;
            // A name that is not UTF-8 was not written by a Maildir deliverer;
            // leaving it alone is safer than guessing.
            let Ok(name) = item.file_name().into_string() else {
                continue;
            };
            if name.starts_with('.') || !item.file_type().is_ok_and(|t| t.is_file()) {
                continue;
            }
            if sub == Sub::Cur && flags(&name).contains('S') {
                skipped += 1;
                continue;
            }
            entries.push(Entry { sub, name });
        }
    }
    entries.sort_by(|a, b| (base(&a.name), &a.name).cmp(&(base(&b.name), &b.name)));
    Ok((entries, skipped))
}

/// The unique part of a name, without `:2,` info.
fn base(name: &str) -> &str {
    name.split_once(':').map_or(name, |(b, _)| b)
}

/// The flag letters of a name (empty without `:2,` info).
fn flags(name: &str) -> &str {
    name.split_once(':')
        .and_then(|(_, info)| info.strip_prefix("2,"))
        .unwrap_or("")
}

/// The name a message gets in `cur/` once processed: its flags plus `S`,
/// without duplicates and in ASCII order as the spec asks.
pub(super) fn seen_name(name: &str) -> String {
    let mut letters: Vec<char> = flags(name).chars().chain(['S']).collect();
    letters.sort_unstable();
    letters.dedup();
    format!(
        "{}:2,{}",
        base(name),
        letters.into_iter().collect::<String>()
    )
}

/// Renames `from` to `to`, refusing to replace an existing file.
pub(super) fn rename_new(from: &Path, to: &Path) -> Result<(), MailboxError> {
    // rename(2) would silently replace `to`; names are unique by construction,
    // so a clash means something odd is going on and must not cost a message.
    if to.exists() {
        return Err(MailboxError::io(
            to,
            io::Error::new(io::ErrorKind::AlreadyExists, "refusing to replace it"),
        ));
    }
    fs::rename(from, to).map_err(|e| MailboxError::io(from, e))
}

/// Moves the file `from` into the Maildir `dest` (subdirectory `sub`) under
/// `name`, returning its new path. A plain `rename` when possible; across
/// filesystems, or if `name` is taken there, the bytes are delivered as a new
/// file first and `from` is removed only after that is on disk.
pub(super) fn move_into(
    from: &Path,
    dest: &Path,
    sub: Sub,
    name: &str,
) -> Result<PathBuf, MailboxError> {
    let to = dest.join(sub.as_str()).join(name);
    if !to.exists() {
        match fs::rename(from, &to) {
            Ok(()) => return Ok(to),
            Err(e) if e.kind() == io::ErrorKind::CrossesDevices => {}
            Err(e) => return Err(MailboxError::io(from, e)),
        }
    }
    let bytes = fs::read(from).map_err(|e| MailboxError::io(from, e))?;
    let to = deliver(dest, sub, &bytes)?;
    fs::remove_file(from).map_err(|e| MailboxError::io(from, e))?;
    Ok(to)
}

/// Writes `bytes` as a new message in the Maildir `root`: a unique name in
/// `tmp/`, written and fsynced, then renamed into `sub` and the directory
/// fsynced. Returns the final path.
pub(super) fn deliver(root: &Path, sub: Sub, bytes: &[u8]) -> Result<PathBuf, MailboxError> {
    let name = unique_name();
    let tmp = root.join("tmp").join(&name);
    let write = || -> io::Result<()> {
        let mut file = File::options().write(true).create_new(true).open(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()
    };
    if let Err(e) = write() {
        let _ = fs::remove_file(&tmp);
        return Err(MailboxError::io(&tmp, e));
    }
    let to = root.join(sub.as_str()).join(&name);
    rename_new(&tmp, &to)?;
    sync_dir(&root.join(sub.as_str()))?;
    Ok(to)
}

/// Flushes a directory's entries (renames into or out of it) to disk.
pub(super) fn sync_dir(dir: &Path) -> Result<(), MailboxError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| MailboxError::io(dir, e))
}

/// A fresh name `<secs>.<pid>_<counter>.<host>`, unique on this host as long
/// as pids are not reused within a second.
fn unique_name() -> String {
    /// Messages delivered by this process so far.
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let secs = clock::now().unix_timestamp();
    format!("{secs}.{}_{n}.{}", std::process::id(), hostname())
}

/// This host's name, with `/` and `:` encoded as the Maildir spec asks.
fn hostname() -> String {
    fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "localhost".into())
        .replace('/', "\\057")
        .replace(':', "\\072")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seen_name_merges_and_sorts_flags() {
        assert_eq!(seen_name("123.4_5.host"), "123.4_5.host:2,S");
        assert_eq!(seen_name("123.4_5.host:2,"), "123.4_5.host:2,S");
        assert_eq!(seen_name("123.4_5.host:2,RF"), "123.4_5.host:2,FRS");
        assert_eq!(seen_name("123.4_5.host:2,ST"), "123.4_5.host:2,ST");
    }

    #[test]
    fn flags_ignore_unknown_info_versions() {
        assert_eq!(flags("a:2,FS"), "FS");
        assert_eq!(flags("a:1,S"), "");
        assert_eq!(flags("a"), "");
    }

    #[test]
    fn deliver_leaves_nothing_in_tmp_and_names_are_unique() {
        let dir = tempfile::tempdir().unwrap();
        ensure(dir.path(), false).unwrap();
        let a = deliver(dir.path(), Sub::New, b"one").unwrap();
        let b = deliver(dir.path(), Sub::New, b"two").unwrap();
        assert_ne!(a, b);
        assert_eq!(fs::read(&a).unwrap(), b"one");
        assert_eq!(fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
        assert!(!a.file_name().unwrap().to_str().unwrap().contains(':'));
    }
}
