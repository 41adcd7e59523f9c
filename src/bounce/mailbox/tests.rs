//! End-to-end tests of [`Inbox`] over real temporary Maildirs and mbox files.

use std::fs;

use super::*;

/// A fresh Maildir in a temp dir, with the given files written into it
/// (`"new/name"` → bytes).
fn maildir(files: &[(&str, &[u8])]) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("Maildir");
    for sub in ["new", "cur", "tmp"] {
        fs::create_dir_all(root.join(sub)).unwrap();
    }
    for (name, bytes) in files {
        fs::write(root.join(name), bytes).unwrap();
    }
    (tmp, root)
}

/// Names of the files in `dir`, sorted.
fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    v.sort();
    v
}

/// Reads every message, disposing of each with `decide`, and finishes.
fn run(
    mut inbox: Inbox,
    mut decide: impl FnMut(&Message) -> Disposition,
) -> (Vec<Message>, Summary) {
    let mut seen = Vec::new();
    while let Some(msg) = inbox.next_message() {
        let msg = msg.unwrap();
        inbox.dispose(&msg, decide(&msg)).unwrap();
        seen.push(msg);
    }
    (seen, inbox.finish().unwrap())
}

/// The ids of some messages.
fn ids(msgs: &[Message]) -> Vec<&str> {
    msgs.iter().map(|m| m.id.as_str()).collect()
}

#[test]
fn maildir_reads_new_and_unseen_cur_in_name_order() {
    let (_tmp, root) = maildir(&[
        ("new/200.1_0.h", b"second"),
        ("cur/100.1_0.h:2,F", b"first, flagged but not seen"),
        ("cur/050.1_0.h:2,RS", b"already processed"),
        ("new/.hidden", b"dotfile"),
        ("tmp/300.1_0.h", b"still being delivered"),
    ]);
    let inbox = Inbox::open(Source::Maildir(root.clone()), None).unwrap();
    let (msgs, summary) = run(inbox, |_| Disposition::Done);
    assert_eq!(ids(&msgs), ["100.1_0.h:2,F", "200.1_0.h"]);
    assert_eq!(msgs[0].bytes, b"first, flagged but not seen");
    assert_eq!(summary.done, 2);
    assert_eq!(summary.already_processed, 1);
    assert_eq!(summary.mbox_settled_bytes, None);
    // Done: renamed into cur/ with S added to the existing flags, sorted.
    assert_eq!(
        names(&root.join("cur")),
        ["050.1_0.h:2,RS", "100.1_0.h:2,FS", "200.1_0.h:2,S"]
    );
    assert_eq!(names(&root.join("new")), [".hidden"]);
    assert_eq!(names(&root.join("tmp")), ["300.1_0.h"]);
    assert_eq!(fs::read(root.join("cur/200.1_0.h:2,S")).unwrap(), b"second");

    // A second run finds nothing left to do.
    let inbox = Inbox::open(Source::Maildir(root.clone()), None).unwrap();
    let (msgs, summary) = run(inbox, |_| Disposition::Done);
    assert!(msgs.is_empty());
    assert_eq!(summary.already_processed, 3);
}

#[test]
fn maildir_quarantine_moves_the_file_unchanged_to_dot_quarantine() {
    let body: &[u8] = b"Subject: ???\r\n\r\nnot a DSN \xff\n";
    let (_tmp, root) = maildir(&[("new/1.2_3.h", body), ("cur/2.2_3.h:2,", b"ok")]);
    let inbox = Inbox::open(Source::Maildir(root.clone()), None).unwrap();
    let (_, summary) = run(inbox, |m| {
        if m.bytes == body {
            Disposition::Quarantine {
                reason: "no DSN part".into(),
            }
        } else {
            Disposition::Done
        }
    });
    let q = root.join(".Quarantine");
    assert_eq!(
        summary.quarantined,
        [Quarantined {
            id: "1.2_3.h".into(),
            reason: "no DSN part".into(),
            location: q.join("new/1.2_3.h"),
        }]
    );
    assert_eq!(fs::read(q.join("new/1.2_3.h")).unwrap(), body);
    assert!(q.join("cur").is_dir() && q.join("tmp").is_dir());
    assert!(q.join("maildirfolder").is_file(), "Maildir++ folder marker");
    assert!(names(&root.join("new")).is_empty());
    assert_eq!(names(&root.join("cur")), ["2.2_3.h:2,S"]);

    // The quarantine is a dotfile folder: the next run does not see it.
    let inbox = Inbox::open(Source::Maildir(root), None).unwrap();
    assert!(run(inbox, |_| Disposition::Done).0.is_empty());
}

#[test]
fn maildir_quarantine_into_a_given_maildir() {
    let (tmp, root) = maildir(&[("cur/9.9_9.h:2,F", b"bad")]);
    let q = tmp.path().join("quarantine");
    let inbox = Inbox::open(Source::Maildir(root), Some(q.clone())).unwrap();
    let (_, summary) = run(inbox, |_| Disposition::Quarantine { reason: "x".into() });
    assert_eq!(summary.quarantined[0].location, q.join("cur/9.9_9.h:2,F"));
    assert_eq!(fs::read(q.join("cur/9.9_9.h:2,F")).unwrap(), b"bad");
    assert!(!q.join("maildirfolder").exists());
}

#[test]
fn maildir_retry_and_undisposed_leave_the_file() {
    let (_tmp, root) = maildir(&[("new/1.1_1.h", b"a"), ("new/2.1_1.h", b"b")]);
    let mut inbox = Inbox::open(Source::Maildir(root.clone()), None).unwrap();
    let first = inbox.next_message().unwrap().unwrap();
    inbox.dispose(&first, Disposition::Retry).unwrap();
    let _second = inbox.next_message().unwrap().unwrap();
    assert!(inbox.next_message().is_none());
    let summary = inbox.finish().unwrap();
    assert_eq!(
        (summary.retried, summary.undisposed, summary.done),
        (1, 1, 0)
    );
    assert_eq!(names(&root.join("new")), ["1.1_1.h", "2.1_1.h"]);
    assert!(names(&root.join("cur")).is_empty());

    // Both come back next time.
    let inbox = Inbox::open(Source::Maildir(root), None).unwrap();
    assert_eq!(
        ids(&run(inbox, |_| Disposition::Done).0),
        ["1.1_1.h", "2.1_1.h"]
    );
}

#[test]
fn a_message_is_disposed_of_once_and_only_by_its_inbox() {
    let (_tmp, root) = maildir(&[("new/1.1_1.h", b"a")]);
    let mut inbox = Inbox::open(Source::Maildir(root.clone()), None).unwrap();
    let msg = inbox.next_message().unwrap().unwrap();
    let mut other = Inbox::open(Source::Maildir(root.clone()), None).unwrap();
    let err = other.dispose(&msg, Disposition::Done).unwrap_err();
    assert!(matches!(err, MailboxError::NotPending { .. }), "{err}");
    inbox.dispose(&msg, Disposition::Done).unwrap();
    let err = inbox.dispose(&msg, Disposition::Done).unwrap_err();
    assert!(matches!(err, MailboxError::NotPending { .. }), "{err}");
    assert_eq!(names(&root.join("cur")), ["1.1_1.h:2,S"]);
}

#[test]
fn maildir_missing_subdirectory_is_named() {
    let (_tmp, root) = maildir(&[]);
    fs::remove_dir(root.join("cur")).unwrap();
    let err = Inbox::open(Source::Maildir(root.clone()), None)
        .err()
        .unwrap();
    let text = err.to_string();
    assert!(
        text.contains(&root.join("cur").display().to_string()),
        "{text}"
    );
    assert!(text.contains("not a Maildir"), "{text}");
}

#[test]
fn quarantine_cannot_be_the_source() {
    let (_tmp, root) = maildir(&[]);
    let err = Inbox::open(Source::Maildir(root.clone()), Some(root))
        .err()
        .unwrap();
    assert!(
        matches!(err, MailboxError::QuarantineIsSource { .. }),
        "{err}"
    );
}

/// Three messages: an escaped `>From ` body line, a CRLF one, and a plain one.
const MBOX: &[u8] = b"From MAILER-DAEMON Mon Jan  1 00:00:00 2024\n\
Subject: one\n\
\n\
>From the start\n\
>>From twice\n\
\n\
From bounce@x Mon Jan  1 00:00:01 2024\r\n\
Subject: two\r\n\
\r\n\
crlf body\r\n\
\r\n\
From a@x Mon Jan  1 00:00:02 2024\n\
Subject: three\n\
\n\
bye\n\
\n";

/// Writes `data` as an mbox file in a temp dir.
fn mbox_file(data: &[u8]) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("bounces");
    fs::write(&path, data).unwrap();
    (tmp, path)
}

#[test]
fn mbox_splits_unescapes_and_keeps_crlf() {
    let (_tmp, path) = mbox_file(MBOX);
    let inbox = Inbox::open(Source::Mbox(path.clone()), None).unwrap();
    let (msgs, summary) = run(inbox, |_| Disposition::Done);
    let bodies: Vec<&[u8]> = msgs.iter().map(|m| m.bytes.as_slice()).collect();
    assert_eq!(
        bodies,
        [
            &b"Subject: one\n\nFrom the start\n>From twice\n"[..],
            b"Subject: two\r\n\r\ncrlf body\r\n",
            b"Subject: three\n\nbye\n",
        ]
    );
    let p = path.display();
    assert_eq!(
        ids(&msgs),
        [
            format!("mbox:{p}#1 (line 1)"),
            format!("mbox:{p}#2 (line 7)"),
            format!("mbox:{p}#3 (line 12)"),
        ]
    );
    // Never rewritten; all of it settled.
    assert_eq!(fs::read(&path).unwrap(), MBOX);
    assert_eq!(summary.done, 3);
    assert_eq!(summary.mbox_settled_bytes, Some(MBOX.len() as u64));
    assert!(!path.with_extension("quarantine").exists());
}

#[test]
fn mbox_quarantine_appends_a_readable_mbox_and_retry_stops_the_settled_prefix() {
    let (_tmp, path) = mbox_file(MBOX);
    let inbox = Inbox::open(Source::Mbox(path.clone()), None).unwrap();
    let (msgs, summary) = run(inbox, |m| match m.bytes.starts_with(b"Subject: three") {
        true => Disposition::Retry,
        false => Disposition::Quarantine {
            reason: "bad".into(),
        },
    });
    let q = PathBuf::from(format!("{}.quarantine", path.display()));
    assert_eq!(summary.quarantined.len(), 2);
    assert!(summary.quarantined.iter().all(|x| x.location == q));
    assert_eq!(summary.retried, 1);
    // Settled up to the start of message three.
    let third = MBOX.windows(9).position(|w| w == b"From a@x ").unwrap();
    assert_eq!(summary.mbox_settled_bytes, Some(third as u64));
    assert_eq!(fs::read(&path).unwrap(), MBOX);

    // The quarantine mbox reads back as the same two messages, and a
    // quarantine of a quarantine adds to the end of it.
    let again = Inbox::open(Source::Mbox(q.clone()), Some(path.with_extension("q2"))).unwrap();
    let (back, _) = run(again, |_| Disposition::Done);
    assert_eq!(back.len(), 2);
    assert_eq!(back[0].bytes, msgs[0].bytes);
    assert_eq!(back[1].bytes, msgs[1].bytes);
    let qdata = fs::read(&q).unwrap();
    assert!(qdata.starts_with(b"From MAILER-DAEMON Mon Jan  1 00:00:00 2024\n"));
    assert!(
        qdata.windows(17).any(|w| w == b"\n>From the start\n"),
        "re-escaped"
    );
}

#[test]
fn mbox_without_trailing_newline_and_body_from_lines() {
    let data = b"From a date\nSubject: one\n\nline\nFrom inside a paragraph\n\nFrom b date\nSubject: two\n\nno newline at end";
    let (_tmp, path) = mbox_file(data);
    let inbox = Inbox::open(Source::Mbox(path), None).unwrap();
    let (msgs, summary) = run(inbox, |_| Disposition::Done);
    assert_eq!(msgs.len(), 2);
    assert_eq!(
        msgs[0].bytes,
        b"Subject: one\n\nline\nFrom inside a paragraph\n"
    );
    assert_eq!(msgs[1].bytes, b"Subject: two\n\nno newline at end");
    assert_eq!(summary.mbox_settled_bytes, Some(data.len() as u64));
}

#[test]
fn empty_mbox_has_no_messages() {
    let (_tmp, path) = mbox_file(b"");
    let inbox = Inbox::open(Source::Mbox(path), None).unwrap();
    let (msgs, summary) = run(inbox, |_| Disposition::Done);
    assert!(msgs.is_empty());
    assert_eq!(summary.mbox_settled_bytes, Some(0));
}

#[test]
fn stdin_strips_the_envelope_line() {
    let input: &[u8] =
        b"From bounce@example.com Mon Jan  1 00:00:00 2024\nSubject: x\n\nFrom here\n";
    let inbox = Inbox::from_reader(input, None).unwrap();
    let (msgs, summary) = run(inbox, |_| Disposition::Done);
    assert_eq!(ids(&msgs), ["stdin"]);
    assert_eq!(msgs[0].bytes, b"Subject: x\n\nFrom here\n");
    assert_eq!(summary.done, 1);

    let inbox = Inbox::from_reader(&b"Subject: y\n\n"[..], None).unwrap();
    assert_eq!(
        run(inbox, |_| Disposition::Done).0[0].bytes,
        b"Subject: y\n\n"
    );
}

#[test]
fn stdin_quarantine_needs_a_directory() {
    let mut inbox = Inbox::from_reader(&b"Subject: ?\n\n"[..], None).unwrap();
    let msg = inbox.next_message().unwrap().unwrap();
    let bad = Disposition::Quarantine { reason: "r".into() };
    let err = inbox.dispose(&msg, bad.clone()).unwrap_err();
    assert!(matches!(err, MailboxError::NoQuarantine { .. }), "{err}");
    assert!(err.to_string().contains("75"), "{err}");
    // Still waiting: the caller must tempfail so the MTA keeps it.
    assert_eq!(inbox.finish().unwrap().undisposed, 1);

    let tmp = tempfile::tempdir().unwrap();
    let q = tmp.path().join("q");
    let mut inbox = Inbox::from_reader(&b"Subject: ?\n\n"[..], Some(q.clone())).unwrap();
    let msg = inbox.next_message().unwrap().unwrap();
    inbox.dispose(&msg, bad).unwrap();
    assert!(inbox.next_message().is_none());
    let summary = inbox.finish().unwrap();
    let location = &summary.quarantined[0].location;
    assert_eq!(location.parent().unwrap(), q.join("new"));
    assert_eq!(fs::read(location).unwrap(), b"Subject: ?\n\n");
    assert!(names(&q.join("tmp")).is_empty());
}

#[test]
fn stdin_over_the_limit_is_refused() {
    let input = io::repeat(b'x').take(MAX_MESSAGE_BYTES as u64 + 1);
    let err = Inbox::from_reader(input, None).err().unwrap();
    assert!(
        matches!(err, MailboxError::TooLarge { ref id, .. } if id == "stdin"),
        "{err}"
    );
    // Exactly at the limit is fine.
    let input = io::repeat(b'x').take(MAX_MESSAGE_BYTES as u64);
    let mut inbox = Inbox::from_reader(input, None).unwrap();
    assert_eq!(
        inbox.next_message().unwrap().unwrap().bytes.len(),
        MAX_MESSAGE_BYTES
    );
}
