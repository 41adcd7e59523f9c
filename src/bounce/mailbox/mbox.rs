//! The mbox format: a streaming reader that yields one message at a time, and
//! an appender for the quarantine mbox.
//!
//! This module owns the byte-level rules (what a `From ` separator is, mboxrd
//! escaping, line endings, the blank line between messages). It knows nothing
//! of dispositions, summaries or the caller; [`super::Inbox`] does.
//!
//! Reading accepts what Postfix `local`, mutt and friends write (mboxo and
//! mboxrd): a line is a separator only if it starts with `From ` *and* is the
//! first line of the file or follows a blank line, so an unescaped `From ` in
//! a body paragraph stays in the body. Lines matching `^>+From ` lose one `>`
//! (mboxrd). For an mboxo file this also turns an original `>From ` into
//! `From `, which is harmless for bounce parsing. Line endings (LF or CRLF)
//! are kept as found.

use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use time::macros::format_description;

use crate::clock;

/// One message cut out of an mbox, with where it came from.
#[derive(Debug)]
pub(super) struct RawMessage {
    /// The `From ` line that introduced it (line ending included), if any:
    /// content before the first separator has none.
    pub(super) separator: Option<Vec<u8>>,
    /// 1-based number of the message in the file.
    pub(super) number: u64,
    /// 1-based line number of its first line (the separator, if any).
    pub(super) line: u64,
    /// Byte offset just past the message (and its trailing blank line).
    pub(super) end: u64,
    /// The message, unescaped and without separator or trailing blank line;
    /// `None` if it was larger than the reader's limit (the bytes were skipped).
    pub(super) bytes: Option<Vec<u8>>,
}

/// Streams messages out of an mbox, holding one message in memory at a time.
pub(super) struct MboxReader<R> {
    /// The file, buffered.
    input: R,
    /// Lines read so far (so the next line has number `lines + 1`).
    lines: u64,
    /// Bytes read so far.
    offset: u64,
    /// A separator already read that starts the next message:
    /// (line bytes, line number, offset of the line).
    pending: Option<(Vec<u8>, u64, u64)>,
    /// Whether the first line of the file has been looked at.
    started: bool,
    /// Messages returned so far.
    count: u64,
    /// Largest message kept in memory, in bytes.
    limit: usize,
}

impl<R: BufRead> MboxReader<R> {
    /// A reader over `input` that refuses to buffer messages over `limit` bytes.
    pub(super) fn new(input: R, limit: usize) -> Self {
        MboxReader {
            input,
            lines: 0,
            offset: 0,
            pending: None,
            started: false,
            count: 0,
            limit,
        }
    }

    /// Reads one line (with its ending) into `buf`; false at end of input.
    fn read_line(&mut self, buf: &mut Vec<u8>) -> io::Result<bool> {
        buf.clear();
        let n = self.input.read_until(b'\n', buf)?;
        self.lines += 1;
        self.offset += n as u64;
        Ok(n > 0)
    }

    /// The next message, or `None` at end of input.
    pub(super) fn next_message(&mut self) -> io::Result<Option<RawMessage>> {
        loop {
            let mut line = Vec::new();
            // Where this message starts: a separator seen by the previous call,
            // the first line of the file, or nothing left.
            let (separator, first_line) = if let Some((sep, no, _)) = self.pending.take() {
                (Some(sep), no)
            } else if !self.started {
                self.started = true;
                if !self.read_line(&mut line)? {
                    return Ok(None);
                }
                if line.starts_with(b"From ") {
                    (Some(std::mem::take(&mut line)), self.lines)
                } else {
                    // Content before any separator is not dropped: it is
                    // returned as a message of its own (unless it is blank).
                    (None, self.lines)
                }
            } else {
                return Ok(None);
            };
            let mut body = Vec::new();
            let mut too_large = false;
            // Length of the last line pushed to `body` if it was blank.
            let mut last_blank: Option<usize> = None;
            if !line.is_empty() {
                push_line(&mut body, &line, &mut too_large, self.limit);
                last_blank = is_blank(&line).then_some(line.len());
            }
            loop {
                let start = self.offset;
                if !self.read_line(&mut line)? {
                    break;
                }
                if last_blank.is_some() && line.starts_with(b"From ") {
                    self.pending = Some((std::mem::take(&mut line), self.lines, start));
                    break;
                }
                push_line(&mut body, &line, &mut too_large, self.limit);
                last_blank = is_blank(&line).then_some(line.len());
            }
            // The blank line before a separator (or at the very end) belongs
            // to the mbox framing, not to the message.
            if let (Some(n), false) = (last_blank, too_large) {
                body.truncate(body.len() - n);
            }
            let end = self.pending.as_ref().map_or(self.offset, |p| p.2);
            if separator.is_none() && body.iter().all(u8::is_ascii_whitespace) && !too_large {
                continue;
            }
            self.count += 1;
            return Ok(Some(RawMessage {
                separator,
                number: self.count,
                line: first_line,
                end,
                bytes: (!too_large).then_some(body),
            }));
        }
    }
}

/// True for an empty line (`\n` or `\r\n`).
fn is_blank(line: &[u8]) -> bool {
    line == b"\n" || line == b"\r\n"
}

/// True if `line` matches `^>*From ` (a line that mboxrd escapes).
fn is_from_line(line: &[u8]) -> bool {
    let quotes = line.iter().take_while(|&&b| b == b'>').count();
    line[quotes..].starts_with(b"From ")
}

/// Appends one body line, un-escaping mboxrd quoting, unless over the limit.
fn push_line(body: &mut Vec<u8>, line: &[u8], too_large: &mut bool, limit: usize) {
    if *too_large {
        return;
    }
    let line = if line.starts_with(b">") && is_from_line(line) {
        &line[1..]
    } else {
        line
    };
    if body.len() + line.len() > limit {
        // Stop buffering but keep reading, to find the next separator.
        *too_large = true;
        body.clear();
        body.shrink_to_fit();
        return;
    }
    body.extend_from_slice(line);
}

/// Opens `path` for streaming, reading no further than its length right now:
/// mail the MTA appends while we read is left for the next run.
pub(super) fn open(
    path: &Path,
    limit: usize,
) -> io::Result<MboxReader<io::Take<io::BufReader<File>>>> {
    let file = File::open(path)?;
    let len = file.metadata()?.len();
    Ok(MboxReader::new(io::BufReader::new(file).take(len), limit))
}

/// Encodes `message` as one mbox entry: a separator line, the body with
/// mboxrd escaping, and the blank line that ends it.
///
/// `separator` is the original `From ` line when there is one; otherwise a
/// `From MAILER-DAEMON <date>` line is made. A message that does not end in a
/// newline gets one, since mbox cannot represent that (the only change a
/// round trip makes).
pub(super) fn encode(separator: Option<&[u8]>, message: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(message.len() + 100);
    match separator {
        Some(sep) => {
            out.extend_from_slice(sep);
            if !sep.ends_with(b"\n") {
                out.push(b'\n');
            }
        }
        None => {
            let date = clock::now()
                .format(format_description!(
                    "[weekday repr:short] [month repr:short] [day padding:space] [hour]:[minute]:[second] [year]"
                ))
                .unwrap_or_else(|_| "Thu Jan  1 00:00:00 1970".into());
            out.extend_from_slice(format!("From MAILER-DAEMON {date}\n").as_bytes());
        }
    }
    for line in message.split_inclusive(|&b| b == b'\n') {
        if is_from_line(line) {
            out.push(b'>');
        }
        out.extend_from_slice(line);
    }
    if !message.is_empty() && !message.ends_with(b"\n") {
        out.push(b'\n');
    }
    out.push(b'\n');
    out
}

/// An mbox that messages are appended to, one `write` and `fsync` each.
#[derive(Debug)]
pub(super) struct MboxAppender {
    /// Where the quarantine mbox lives.
    pub(super) path: PathBuf,
    /// Opened on first use, so that nothing is created if nothing is quarantined.
    file: Option<File>,
}

impl MboxAppender {
    /// An appender for `path`; the file is created on the first append.
    pub(super) fn new(path: PathBuf) -> Self {
        MboxAppender { path, file: None }
    }

    /// Appends one entry made by [`encode`] and flushes it to disk.
    pub(super) fn append(&mut self, entry: &[u8]) -> io::Result<()> {
        if self.file.is_none() {
            let mut file = OpenOptions::new()
                .create(true)
                .append(true)
                .read(true)
                .open(&self.path)?;
            let gap = missing_gap(&mut file)?;
            // An earlier append cut short (crash, full disk) would glue our
            // separator to its last line; a blank line restores the boundary.
            file.write_all(&b"\n\n"[..gap])?;
            self.file = Some(file);
        }
        let file = self.file.as_mut().expect("opened above");
        file.write_all(entry)?;
        file.sync_data()
    }
}

/// How many newlines must be written so that the file ends in a blank line
/// (or is empty), making the next `From ` line a separator.
fn missing_gap(file: &mut File) -> io::Result<usize> {
    let len = file.metadata()?.len();
    if len == 0 {
        return Ok(0);
    }
    let tail_len = len.min(2);
    file.seek(SeekFrom::Start(len - tail_len))?;
    let mut tail = [0u8; 2];
    let tail = &mut tail[..tail_len as usize];
    file.read_exact(tail)?;
    Ok(match tail {
        [b'\n', b'\n'] => 0,
        [.., b'\n'] => 1,
        _ => 2,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// All messages of an in-memory mbox, as (separator, bytes) pairs.
    fn read_all(data: &[u8], limit: usize) -> Vec<RawMessage> {
        let mut reader = MboxReader::new(data, limit);
        let mut out = Vec::new();
        while let Some(m) = reader.next_message().unwrap() {
            out.push(m);
        }
        out
    }

    #[test]
    fn from_line_inside_a_paragraph_is_not_a_boundary() {
        let data = b"From a@x Mon Jan  1 00:00:00 2024\nSubject: one\n\nHello\nFrom here on, body\n\nFrom b@x Mon Jan  1 00:00:01 2024\nSubject: two\n\nBye\n";
        let msgs = read_all(data, 1 << 20);
        assert_eq!(msgs.len(), 2);
        assert_eq!(
            msgs[0].bytes.as_deref().unwrap(),
            b"Subject: one\n\nHello\nFrom here on, body\n"
        );
        assert_eq!(msgs[1].bytes.as_deref().unwrap(), b"Subject: two\n\nBye\n");
        assert_eq!((msgs[1].number, msgs[1].line), (2, 7));
        assert_eq!(msgs[1].end, data.len() as u64);
        let second = data.windows(9).position(|w| w == b"\nFrom b@x").unwrap() + 1;
        assert_eq!(msgs[0].end, second as u64);
    }

    #[test]
    fn content_before_the_first_separator_is_a_message_not_dropped() {
        let msgs = read_all(b"Subject: stray\n\nx\n\nFrom a@x date\nS: y\n", 1 << 20);
        assert_eq!(msgs.len(), 2);
        assert!(msgs[0].separator.is_none());
        assert_eq!(msgs[0].bytes.as_deref().unwrap(), b"Subject: stray\n\nx\n");
        // Leading blank lines alone are not a message.
        let msgs = read_all(b"\n\nFrom a@x date\nS: y\n", 1 << 20);
        assert_eq!(msgs.len(), 1);
        assert_eq!(msgs[0].line, 3);
    }

    #[test]
    fn oversized_message_is_skipped_and_the_next_one_found() {
        let data = b"From a date\nSubject: big big big big\n\nFrom b date\nS: ok\n";
        let msgs = read_all(data, 10);
        assert_eq!(msgs.len(), 2);
        assert!(msgs[0].bytes.is_none());
        assert_eq!(msgs[1].bytes.as_deref().unwrap(), b"S: ok\n");
    }

    #[test]
    fn encode_escapes_from_lines_and_terminates() {
        let entry = encode(Some(b"From a@x date\n"), b"S: x\n\nFrom me\n>From you\nend");
        assert_eq!(
            entry,
            b"From a@x date\nS: x\n\n>From me\n>>From you\nend\n\n".to_vec()
        );
        let made = encode(None, b"S: x\n");
        assert!(made.starts_with(b"From MAILER-DAEMON "), "{made:?}");
        assert!(made.ends_with(b"\nS: x\n\n"));
    }

    #[test]
    fn appender_repairs_a_file_cut_short() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("q");
        std::fs::write(&path, b"From a date\nS: cut").unwrap();
        let mut q = MboxAppender::new(path.clone());
        q.append(&encode(Some(b"From b date\n"), b"S: whole\n"))
            .unwrap();
        let data = std::fs::read(&path).unwrap();
        let msgs = read_all(&data, 1 << 20);
        assert_eq!(msgs.len(), 2);
        assert_eq!(msgs[1].bytes.as_deref().unwrap(), b"S: whole\n");
    }
}
