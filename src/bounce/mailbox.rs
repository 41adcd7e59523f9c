//! The input side of `blast bounce ingest`: delivers bounce and unsubscribe
//! messages one at a time from a Maildir, an mbox or stdin, and disposes of
//! each one as the caller says.
//!
//! This module owns reading the mail store and moving mail in it. It does not
//! parse messages, touch the database or choose exit codes: the caller reads a
//! [`Message`], decides, and reports back with [`Inbox::dispose`]. The rule is
//! that **a message is never lost**: nothing moves before the caller's
//! [`Disposition`], mail the caller cannot handle goes to a quarantine (never
//! deleted), and message bytes are never modified.
//!
//! # Sources
//! - **Maildir** ([`Source::Maildir`]): every file in `new/`, plus those in
//!   `cur/` not flagged `S` (seen), sorted by name (about delivery order).
//!   Dotfiles and `tmp/` are ignored. [`Disposition::Done`] renames the file to
//!   `cur/<name>:2,<flags>S`, so the next run skips it. Quarantine renames it
//!   unchanged into the quarantine Maildir (default `<maildir>/.Quarantine`, a
//!   Maildir++ folder that mail readers show). Run one ingest per Maildir at a
//!   time: two would read the same messages (a disposal then fails, nothing is
//!   lost, but both may have recorded it).
//! - **mbox** ([`Source::Mbox`]): streamed, one message in memory at a time, up
//!   to the file's length when it was opened. The mbox is **never rewritten**:
//!   done messages stay in it, so the operator rotates it (e.g. `mv` it aside
//!   for the MTA to start a fresh one, then ingest the old file) and deletes it
//!   when [`Summary::mbox_settled_bytes`] equals its length. Rotate first:
//!   a message the MTA was still appending at open time is cut short (its
//!   full copy stays in the file). Quarantined messages are appended to the
//!   quarantine mbox (default `<mbox>.quarantine`).
//! - **stdin** ([`Source::Stdin`], or [`Inbox::from_reader`]): one message, as
//!   Postfix `pipe` or an alias hands it over; a leading `From ` envelope line
//!   (`pipe` flag `F`) is stripped. Done and Retry move nothing; quarantine
//!   writes the message into the quarantine Maildir, and without one fails
//!   with [`MailboxError::NoQuarantine`]. On that error or a Retry the caller
//!   must exit with `EX_TEMPFAIL` (75) so the MTA keeps the message and tries
//!   again later.
//!
//! Durability: quarantine moves are fsynced at once. Done renames are fsynced
//! by [`Inbox::finish`]; after a crash before that, a message may come back
//! and be read again, so recording it must be idempotent.

mod maildir;
mod mbox;

use std::collections::{HashSet, VecDeque};
use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use maildir::{Entry, Sub};

/// Largest message accepted from any source, in bytes (50 MiB). Bounces are
/// small; anything bigger is refused with [`MailboxError::TooLarge`].
pub const MAX_MESSAGE_BYTES: usize = 50 * 1024 * 1024;

/// Where messages come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A Maildir (`new/`, `cur/`, `tmp/`).
    Maildir(PathBuf),
    /// An mbox file (mboxo or mboxrd).
    Mbox(PathBuf),
    /// One message on standard input.
    Stdin,
}

/// One message to handle. Only an [`Inbox`] makes these, and only the inbox
/// that made it can dispose of it.
#[derive(Debug)]
pub struct Message {
    /// Names the message in logs and the [`Summary`]: the Maildir file name,
    /// `mbox:<path>#<n> (line <l>)`, or `stdin`.
    pub id: String,
    /// The message as delivered: headers and body, never modified.
    pub bytes: Vec<u8>,
    /// The number of the inbox that made it.
    inbox: u64,
    /// Which message of that inbox it is.
    seq: u64,
    /// Where it lives, for the disposal.
    origin: Origin,
}

/// Where a [`Message`] lives.
#[derive(Debug)]
enum Origin {
    /// A file in the source Maildir.
    Maildir(Entry),
    /// A message in the source mbox, with its `From ` line if it had one.
    Mbox(Option<Vec<u8>>),
    /// The one message read from stdin.
    Stdin,
}

/// What the caller did with a message, and so what happens to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Disposition {
    /// Handled (recorded, or deliberately ignored): mark it processed.
    Done,
    /// Cannot be handled (unparseable, unknown kind): set it aside unchanged.
    Quarantine {
        /// Why, for the [`Summary`]; the message itself is not annotated.
        reason: String,
    },
    /// Not handled now but may be later (e.g. database down): leave it.
    Retry,
}

/// A message set aside, as listed in the [`Summary`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Quarantined {
    /// The message's [`Message::id`].
    pub id: String,
    /// The reason the caller gave.
    pub reason: String,
    /// Where it went: the file in the quarantine Maildir, or the quarantine mbox.
    pub location: PathBuf,
}

/// What a run did, from [`Inbox::finish`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Summary {
    /// Messages disposed of as [`Disposition::Done`].
    pub done: usize,
    /// Messages quarantined, in order, with reasons.
    pub quarantined: Vec<Quarantined>,
    /// Messages disposed of as [`Disposition::Retry`].
    pub retried: usize,
    /// Messages handed out but never disposed of (left where they were).
    pub undisposed: usize,
    /// Messages that could not be handed out ([`Inbox::next_message`] errors).
    pub unreadable: usize,
    /// Maildir messages in `cur/` skipped because already flagged seen.
    pub already_processed: usize,
    /// For an mbox: the length of the leading part of the file in which every
    /// message was done or quarantined. Equal to the file's length (as opened)
    /// when all of it was, and the file may be deleted. `None` for other sources.
    pub mbox_settled_bytes: Option<u64>,
}

/// Why an inbox could not be opened, read or updated.
#[derive(Debug, thiserror::Error)]
pub enum MailboxError {
    /// The path is not a Maildir; names the missing subdirectory.
    #[error("{}: not a Maildir ({} is missing or not a directory)", path.display(), missing.display())]
    NotMaildir {
        /// The supposed Maildir.
        path: PathBuf,
        /// The first of `tmp/`, `new/`, `cur/` that is missing.
        missing: PathBuf,
    },
    /// A file or directory could not be read, written or renamed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A message exceeds [`MAX_MESSAGE_BYTES`]; it is left where it is.
    #[error("{id}: message larger than {limit} bytes; left in place")]
    TooLarge {
        /// The message's id.
        id: String,
        /// The limit it exceeds.
        limit: usize,
    },
    /// A stdin message was to be quarantined but no quarantine was given.
    #[error("{id}: no quarantine directory to put it in; exit with EX_TEMPFAIL (75) so the MTA keeps it")]
    NoQuarantine {
        /// The message's id.
        id: String,
    },
    /// The message was already disposed of, or came from another inbox.
    #[error("{id}: not a message waiting for disposal in this inbox")]
    NotPending {
        /// The message's id.
        id: String,
    },
    /// The quarantine is the source itself, so quarantining would move nothing.
    #[error("{}: the quarantine cannot be the source itself", path.display())]
    QuarantineIsSource {
        /// The path given for both.
        path: PathBuf,
    },
}

impl MailboxError {
    /// Shorthand for a [`MailboxError::Io`] error.
    fn io(path: impl Into<PathBuf>, source: io::Error) -> Self {
        MailboxError::Io {
            path: path.into(),
            source,
        }
    }
}

/// A source opened for reading: hands out messages with
/// [`next_message`](Inbox::next_message) and takes them back with
/// [`dispose`](Inbox::dispose).
pub struct Inbox {
    /// Tells this inbox's messages from another's.
    id: u64,
    /// The source-specific state.
    kind: Kind,
    /// Sequence number for the next message handed out.
    next_seq: u64,
    /// Messages handed out and not yet disposed of.
    pending: HashSet<u64>,
    /// Counts so far.
    summary: Summary,
}

/// The state of each kind of source.
enum Kind {
    /// A Maildir being read.
    Maildir {
        /// The Maildir.
        root: PathBuf,
        /// Messages not yet handed out.
        queue: std::vec::IntoIter<Entry>,
        /// The quarantine Maildir.
        quarantine: PathBuf,
        /// Whether the quarantine is the default Maildir++ folder.
        plusplus: bool,
        /// Whether the quarantine's directories have been made.
        ready: bool,
        /// Whether any Done rename needs fsyncing at the end.
        renamed: bool,
    },
    /// An mbox being streamed.
    Mbox {
        /// The mbox.
        path: PathBuf,
        /// The reader; `None` after a read error ends the run.
        reader: Option<mbox::MboxReader<io::Take<io::BufReader<File>>>>,
        /// Where quarantined messages are appended.
        quarantine: mbox::MboxAppender,
        /// Tracks [`Summary::mbox_settled_bytes`].
        settled: Settled,
    },
    /// One message read from stdin.
    Single {
        /// The message until handed out.
        bytes: Option<Vec<u8>>,
        /// The quarantine Maildir, if any.
        quarantine: Option<PathBuf>,
    },
}

impl Inbox {
    /// Opens `source`. `quarantine` overrides where quarantined messages go:
    /// a Maildir for Maildir and stdin sources (created if needed), an mbox
    /// file for an mbox source. Reads all of stdin for [`Source::Stdin`].
    pub fn open(source: Source, quarantine: Option<PathBuf>) -> Result<Inbox, MailboxError> {
        let kind = match source {
            Source::Maildir(root) => {
                maildir::check(&root)?;
                let (entries, skipped) = maildir::list(&root)?;
                let plusplus = quarantine.is_none();
                let quarantine = quarantine.unwrap_or_else(|| root.join(".Quarantine"));
                refuse_same(&root, &quarantine)?;
                let mut inbox = Inbox::new(Kind::Maildir {
                    root,
                    queue: entries.into_iter(),
                    quarantine,
                    plusplus,
                    ready: false,
                    renamed: false,
                });
                inbox.summary.already_processed = skipped;
                return Ok(inbox);
            }
            Source::Mbox(path) => {
                let reader =
                    mbox::open(&path, MAX_MESSAGE_BYTES).map_err(|e| MailboxError::io(&path, e))?;
                let quarantine = quarantine.unwrap_or_else(|| {
                    let mut name = path.clone().into_os_string();
                    name.push(".quarantine");
                    name.into()
                });
                refuse_same(&path, &quarantine)?;
                Kind::Mbox {
                    path,
                    reader: Some(reader),
                    quarantine: mbox::MboxAppender::new(quarantine),
                    settled: Settled::default(),
                }
            }
            Source::Stdin => return Inbox::from_reader(io::stdin().lock(), quarantine),
        };
        Ok(Inbox::new(kind))
    }

    /// Like `open(Source::Stdin, quarantine)` but reads the one message from
    /// `reader`: at most [`MAX_MESSAGE_BYTES`], without a leading `From ` line.
    pub fn from_reader(
        reader: impl Read,
        quarantine: Option<PathBuf>,
    ) -> Result<Inbox, MailboxError> {
        let mut bytes = Vec::new();
        reader
            .take(MAX_MESSAGE_BYTES as u64 + 1)
            .read_to_end(&mut bytes)
            .map_err(|e| MailboxError::io("<stdin>", e))?;
        if bytes.len() > MAX_MESSAGE_BYTES {
            return Err(MailboxError::TooLarge {
                id: "stdin".into(),
                limit: MAX_MESSAGE_BYTES,
            });
        }
        if bytes.starts_with(b"From ") {
            let end = bytes
                .iter()
                .position(|&b| b == b'\n')
                .map_or(bytes.len(), |i| i + 1);
            bytes.drain(..end);
        }
        Ok(Inbox::new(Kind::Single {
            bytes: Some(bytes),
            quarantine,
        }))
    }

    /// An inbox with nothing handed out yet.
    fn new(kind: Kind) -> Inbox {
        /// Inboxes made by this process so far.
        static INBOXES: AtomicU64 = AtomicU64::new(0);
        let mbox = matches!(kind, Kind::Mbox { .. });
        Inbox {
            id: INBOXES.fetch_add(1, Ordering::Relaxed),
            kind,
            next_seq: 0,
            pending: HashSet::new(),
            summary: Summary {
                mbox_settled_bytes: mbox.then_some(0),
                ..Summary::default()
            },
        }
    }

    /// The next message, `None` when there are no more. An error concerns one
    /// message (left where it is) and the caller may keep calling, except
    /// after an mbox read error, which ends the run.
    pub fn next_message(&mut self) -> Option<Result<Message, MailboxError>> {
        let seq = self.next_seq;
        let item = match &mut self.kind {
            Kind::Maildir { root, queue, .. } => {
                let entry = queue.next()?;
                read_maildir(root, entry)
            }
            Kind::Mbox {
                path,
                reader,
                settled,
                ..
            } => {
                let raw = match reader.as_mut()?.next_message() {
                    Ok(raw) => raw?,
                    Err(e) => {
                        *reader = None;
                        settled.barrier();
                        return Some(Err(MailboxError::io(path.as_path(), e)));
                    }
                };
                let id = format!("mbox:{}#{} (line {})", path.display(), raw.number, raw.line);
                match raw.bytes {
                    Some(bytes) => {
                        settled.push(seq, raw.end);
                        Ok((id, bytes, Origin::Mbox(raw.separator)))
                    }
                    None => {
                        settled.barrier();
                        Err(MailboxError::TooLarge {
                            id,
                            limit: MAX_MESSAGE_BYTES,
                        })
                    }
                }
            }
            Kind::Single { bytes, .. } => Ok(("stdin".to_string(), bytes.take()?, Origin::Stdin)),
        };
        Some(match item {
            Ok((id, bytes, origin)) => {
                self.next_seq += 1;
                self.pending.insert(seq);
                Ok(Message {
                    id,
                    bytes,
                    inbox: self.id,
                    seq,
                    origin,
                })
            }
            Err(e) => {
                self.summary.unreadable += 1;
                Err(e)
            }
        })
    }

    /// Carries out the caller's decision about `msg`. On error the message is
    /// still where it was and still waiting for disposal.
    pub fn dispose(&mut self, msg: &Message, disposition: Disposition) -> Result<(), MailboxError> {
        if msg.inbox != self.id || !self.pending.remove(&msg.seq) {
            return Err(MailboxError::NotPending { id: msg.id.clone() });
        }
        let result = match disposition {
            Disposition::Done => self.mark_done(msg).map(|()| self.summary.done += 1),
            Disposition::Quarantine { reason } => self.quarantine(msg).map(|location| {
                self.summary.quarantined.push(Quarantined {
                    id: msg.id.clone(),
                    reason,
                    location,
                })
            }),
            Disposition::Retry => {
                if let Kind::Mbox { settled, .. } = &mut self.kind {
                    settled.stop();
                }
                self.summary.retried += 1;
                Ok(())
            }
        };
        if result.is_err() {
            self.pending.insert(msg.seq);
        }
        result
    }

    /// Marks a message processed (only a Maildir changes).
    fn mark_done(&mut self, msg: &Message) -> Result<(), MailboxError> {
        match (&mut self.kind, &msg.origin) {
            (Kind::Maildir { root, renamed, .. }, Origin::Maildir(entry)) => {
                let from = root.join(entry.sub.as_str()).join(&entry.name);
                let to = root.join("cur").join(maildir::seen_name(&entry.name));
                maildir::rename_new(&from, &to)?;
                *renamed = true;
            }
            (Kind::Mbox { settled, .. }, _) => settled.settle(msg.seq),
            _ => {}
        }
        Ok(())
    }

    /// Sets a message aside unchanged; returns where it went.
    fn quarantine(&mut self, msg: &Message) -> Result<PathBuf, MailboxError> {
        match (&mut self.kind, &msg.origin) {
            (
                Kind::Maildir {
                    root,
                    quarantine,
                    plusplus,
                    ready,
                    ..
                },
                Origin::Maildir(entry),
            ) => {
                if !*ready {
                    maildir::ensure(quarantine, *plusplus)?;
                    *ready = true;
                }
                let from_dir = root.join(entry.sub.as_str());
                let to = maildir::move_into(
                    &from_dir.join(&entry.name),
                    quarantine,
                    entry.sub,
                    &entry.name,
                )?;
                maildir::sync_dir(to.parent().unwrap_or(quarantine))?;
                maildir::sync_dir(&from_dir)?;
                Ok(to)
            }
            (
                Kind::Mbox {
                    quarantine,
                    settled,
                    ..
                },
                Origin::Mbox(separator),
            ) => {
                let entry = mbox::encode(separator.as_deref(), &msg.bytes);
                quarantine
                    .append(&entry)
                    .map_err(|e| MailboxError::io(&quarantine.path, e))?;
                settled.settle(msg.seq);
                Ok(quarantine.path.clone())
            }
            (Kind::Single { quarantine, .. }, _) => {
                let Some(dir) = quarantine else {
                    return Err(MailboxError::NoQuarantine { id: msg.id.clone() });
                };
                maildir::ensure(dir, false)?;
                maildir::deliver(dir, Sub::New, &msg.bytes)
            }
            _ => unreachable!("a message's origin always matches its inbox's kind"),
        }
    }

    /// Ends the run: flushes Done renames to disk and returns the counts.
    pub fn finish(mut self) -> Result<Summary, MailboxError> {
        match &self.kind {
            Kind::Maildir {
                root,
                renamed: true,
                ..
            } => {
                maildir::sync_dir(&root.join("new"))?;
                maildir::sync_dir(&root.join("cur"))?;
            }
            Kind::Mbox { settled, .. } => self.summary.mbox_settled_bytes = Some(settled.offset),
            _ => {}
        }
        self.summary.undisposed = self.pending.len();
        Ok(self.summary)
    }
}

/// Reads one Maildir file into (id, bytes, origin), refusing oversized ones.
fn read_maildir(root: &Path, entry: Entry) -> Result<(String, Vec<u8>, Origin), MailboxError> {
    let path = root.join(entry.sub.as_str()).join(&entry.name);
    let len = std::fs::metadata(&path)
        .map_err(|e| MailboxError::io(&path, e))?
        .len();
    if len > MAX_MESSAGE_BYTES as u64 {
        return Err(MailboxError::TooLarge {
            id: entry.name,
            limit: MAX_MESSAGE_BYTES,
        });
    }
    let bytes = std::fs::read(&path).map_err(|e| MailboxError::io(&path, e))?;
    Ok((entry.name.clone(), bytes, Origin::Maildir(entry)))
}

/// Fails if `quarantine` names the same file or directory as `source`.
fn refuse_same(source: &Path, quarantine: &Path) -> Result<(), MailboxError> {
    let same = match (source.canonicalize(), quarantine.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        // A quarantine that does not exist yet is not the source.
        _ => false,
    };
    if same {
        return Err(MailboxError::QuarantineIsSource {
            path: quarantine.to_path_buf(),
        });
    }
    Ok(())
}

/// Tracks how far into an mbox every message has been settled (done or
/// quarantined), when dispositions may arrive out of order.
#[derive(Debug, Default)]
struct Settled {
    /// End of the settled prefix.
    offset: u64,
    /// Set once a message will stay unsettled (retry, too large, read error):
    /// nothing after it can join the prefix, so later messages are not tracked.
    stopped: bool,
    /// Messages past `offset`, in order: (seq, end offset, settled).
    queue: VecDeque<(u64, u64, bool)>,
}

impl Settled {
    /// Records a message handed out, ending at byte `end`.
    fn push(&mut self, seq: u64, end: u64) {
        if !self.stopped {
            self.queue.push_back((seq, end, false));
        }
    }

    /// Marks a message settled and advances the prefix as far as it can.
    fn settle(&mut self, seq: u64) {
        if let Some(item) = self.queue.iter_mut().find(|item| item.0 == seq) {
            item.2 = true;
        }
        while let Some(&(_, end, true)) = self.queue.front() {
            self.offset = end;
            self.queue.pop_front();
        }
    }

    /// Stops tracking: a message already handed out stays unsettled (retry).
    fn stop(&mut self) {
        self.stopped = true;
    }

    /// Stops tracking at a message that was never handed out (too large, or
    /// unreadable): the prefix cannot grow past it.
    fn barrier(&mut self) {
        if !self.stopped {
            self.queue.push_back((u64::MAX, u64::MAX, false));
        }
        self.stop();
    }
}

#[cfg(test)]
mod tests;
