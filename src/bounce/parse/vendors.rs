//! Plain-text bounces: the notices MTAs write without a machine-readable
//! part (qmail, Exim, Postfix and Sendmail in old setups, Gmail, Yahoo,
//! Exchange 2003, DragonFly, GMX, mail.ru, ...), and the shared helpers that
//! cut a notice into per-recipient paragraphs.
//!
//! Owns recognising such a notice, separating it from the quoted original
//! message, and finding the failed addresses in it. The formats differ in
//! wording but share a shape: an address on a line of its own (or at the
//! head of a line), followed by what the remote server said. So one scanner
//! serves them all, with per-format marker tables instead of per-format code.

use super::{text, Ctx, Finding, Kind};
use crate::classify;

/// Lines (lower-case, trimmed) that start the quoted original message.
const ORIGINAL_MARKERS: &[&str] = &[
    "------ this is a copy of the message",
    "--- below this line is a copy of the message",
    "----- original message -----",
    "------ original message ------",
    "message headers follow",
    "----- unsent message follows -----",
    "----- message header follows -----",
    "------- returned message --------",
    "----- original message follows",
    "--- original message follows",
    "original message follows",
    "original message headers",
    "------ the header of original message",
    "the header of the original message",
    "-- the header and text of the original message follows",
    "----- this is a copy of the original message",
    "your message reads",
    "----- transcript of session follows -----\u{0}",
    "---- the original message headers ----",
    "----- the following is a copy of the message",
    "original message:",
    "original message header:",
    "content-type: message/rfc822",
    "content-type: text/rfc822-headers",
];

/// Splits decoded body text into the notice and the quoted original, if any.
pub(crate) fn split_original(body: &str) -> (&str, Option<&str>) {
    let mut offset = 0;
    for line in body.split_inclusive('\n') {
        let lower = line.trim().to_ascii_lowercase();
        let marker = !lower.is_empty()
            && ORIGINAL_MARKERS
                .iter()
                .any(|m| lower.starts_with(m) || (m.len() > 24 && lower.contains(m)));
        if marker {
            let after = &body[offset + line.len()..];
            return (
                &body[..offset],
                Some(after.trim_start_matches(['\r', '\n', ' '])),
            );
        }
        // Without a marker, a Received/Return-Path field at the left margin
        // after a blank line starts the returned header block.
        if (lower.starts_with("received: ") || lower.starts_with("return-path: "))
            && offset > 0
            && body[..offset].ends_with("\n\n")
        {
            return (&body[..offset], Some(&body[offset..]));
        }
        offset += line.len();
    }
    (body, None)
}

/// Sender names and local parts of the daemons that write bounces, lower-case.
const DAEMONS: &[&str] = &[
    "mailer-daemon",
    "mailer daemon",
    "postmaster",
    "mail delivery",
    "mail-daemon",
    "maildaemon",
    "mail administrator",
    "mail system",
    "mailmaster",
    "nobody@",
    "bounce",
    "daemon@",
    "mmdf",
];

/// Subject phrases of bounce notices, lower-case.
const SUBJECTS: &[&str] = &[
    "undeliver",
    "undelivered",
    "delivery status notification",
    "failure notice",
    "returned mail",
    "mail delivery failed",
    "delivery failure",
    "delivery failed",
    "could not be delivered",
    "nondeliverable",
    "non-delivery",
    "non remis",
    "mail system error",
    "could not send message",
    "delivery notification",
    "failed delivery",
    "unable to deliver",
    "returned to sender",
    "delivery problem",
    "mail failure",
    "message not delivered",
    "not delivered",
    "delivery report",
    "rejected",
    "warning: ",
    "delayed mail",
    "mail could not",
    "error sending",
    "message you sent",
    "unzustellbar",
    "notification",
    "returning to sender",
    "mail failed",
];

/// Body phrases that only bounce notices use, lower-case.
const BODY_MARKERS: &[&str] = &[
    "this is the qmail-send program",
    "could not be delivered to one or more",
    "the following address(es) failed",
    "delivery to the following recipient",
    "delivery has failed to these recipients",
    "permanent fatal errors",
    "i'm afraid i wasn't able to deliver",
    "this is the mail system at host",
    "was not delivered to",
    "there was an error delivering your mail",
    "your message could not be delivered",
    "message could not be delivered",
    "unable to deliver your message",
    "could not deliver",
    "could not be delivered to",
    "failed addresses follow",
    "did not reach the following recipient",
];

/// True when the mail looks like a delivery failure notice.
pub(crate) fn is_bounce(ctx: &Ctx<'_>) -> bool {
    let mail = ctx.mail;
    let from = mail.header("From").unwrap_or("").to_ascii_lowercase();
    let subject = mail.subject.as_deref().unwrap_or("").to_lowercase();
    let notice = ctx.notice.to_lowercase();
    let null_sender = mail
        .header("Return-Path")
        .is_some_and(|v| v.trim() == "<>" || v.trim().is_empty());
    let by_from = DAEMONS.iter().any(|d| from.contains(d));
    let by_subject = SUBJECTS.iter().any(|s| subject.contains(s));
    let by_body = BODY_MARKERS.iter().any(|m| notice.contains(m));
    by_body
        || (by_from && (by_subject || null_sender || !ctx.original.is_empty()))
        || (by_subject && null_sender)
}

/// Phrases of delay warnings (delivery is still being tried), lower-case.
const DELAY_MARKERS: &[&str] = &[
    "warning message only",
    "has been delayed",
    "delivery delayed",
    "will be retried",
    "will continue to try",
    "still trying",
    "(delay)",
    "delayed mail",
];

/// Findings of a plain-text bounce.
pub(crate) fn parse(ctx: &Ctx<'_>) -> (Kind, Vec<Finding>) {
    let subject = ctx.mail.subject.as_deref().unwrap_or("").to_lowercase();
    let lower = ctx.notice.to_lowercase();
    let delayed = DELAY_MARKERS
        .iter()
        .any(|m| lower.contains(m) || subject.contains(m));
    let mut hits = scan(ctx);
    if hits.is_empty() {
        hits.push((ctx.original_to(), ctx.notice.to_string()));
    }
    let whole = ctx.notice;
    let findings: Vec<Finding> = hits
        .into_iter()
        .map(|(rcpt, seg)| {
            let status = text::last_status(&seg).or_else(|| text::last_status(whole));
            let mut f = super::failure(rcpt, &seg, status.clone());
            if classify::reason_from_text(&seg).is_none() {
                // The paragraph may be just the address; the notice as a whole speaks.
                let reason = match classify::reason_from_text(whole) {
                    Some(r) => r,
                    None if delayed => "expired",
                    None => classify::reason("", status.as_deref()),
                };
                f.reason = reason.into();
                f.class = classify::class_of(reason);
            }
            f
        })
        .collect();
    (super::kind_of(&findings, delayed), findings)
}

/// Header-like lines of the notice that name people, not failed recipients.
const SKIP_LINE_PREFIXES: &[&str] = &[
    "from:",
    "reply-to:",
    "return-path:",
    "sender:",
    "message-id:",
    "received:",
    "in-reply-to:",
    "references:",
    "date:",
    "x-",
    "envelope-from",
];

/// Candidate failed recipients with their paragraph, in order of appearance.
fn scan(ctx: &Ctx<'_>) -> Vec<(Option<String>, String)> {
    let lines: Vec<&str> = ctx.notice.lines().collect();
    // Address found on each line, after dropping the sending side.
    let per_line: Vec<Vec<String>> = lines
        .iter()
        .map(|line| {
            let lower = line.trim_start().to_ascii_lowercase();
            if SKIP_LINE_PREFIXES.iter().any(|p| lower.starts_with(p)) {
                return Vec::new();
            }
            let addrs = text::addresses(line);
            // An address heading its line ("<a@b>:", "a@b ... User unknown")
            // is a recipient even when it also appears on the sending side.
            let head = addrs.first().filter(|a| heads(line, a)).cloned();
            addrs
                .into_iter()
                .filter(|a| Some(a) == head.as_ref() || (!ctx.is_sender(a) && !is_daemon(a)))
                .collect()
        })
        .collect();
    let mut order: Vec<String> = Vec::new();
    for addrs in &per_line {
        for a in addrs {
            if !order.iter().any(|o| o.eq_ignore_ascii_case(a)) {
                order.push(a.clone());
            }
        }
    }
    order
        .into_iter()
        .map(|addr| {
            let seg = segment(&lines, &per_line, &addr);
            (Some(addr), seg)
        })
        .collect()
}

/// True when `addr` opens `line` the way recipient headings do: `<a@b>` or `a@b:`.
fn heads(line: &str, addr: &str) -> bool {
    let rest = line.trim_start_matches(|c: char| c.is_whitespace() || "\"'(*-".contains(c));
    let bracketed = rest
        .strip_prefix('<')
        .and_then(|r| r.get(..addr.len()))
        .is_some_and(|head| head.eq_ignore_ascii_case(addr));
    let colon = rest
        .get(..addr.len())
        .is_some_and(|head| head.eq_ignore_ascii_case(addr))
        && rest[addr.len()..].trim_start().starts_with(':');
    bracketed || colon
}

/// True for addresses of bounce daemons, which are never the failed recipient.
fn is_daemon(addr: &str) -> bool {
    let local = addr.split('@').next().unwrap_or("").to_ascii_lowercase();
    ["mailer-daemon", "mail-daemon", "maildaemon"].contains(&local.as_str())
}

/// Lines a paragraph may span after the line naming its recipient.
const SEGMENT_LINES: usize = 25;

/// The text about `addr`: from each line naming it up to the next line naming
/// another candidate, joined.
fn segment(lines: &[&str], per_line: &[Vec<String>], addr: &str) -> String {
    let mut out = String::new();
    let mut i = 0;
    while i < lines.len() {
        if !per_line[i].iter().any(|a| a.eq_ignore_ascii_case(addr)) {
            i += 1;
            continue;
        }
        out.push_str(lines[i]);
        out.push('\n');
        let mut j = i + 1;
        while j < lines.len() && j <= i + SEGMENT_LINES {
            let other = per_line[j].iter().any(|a| !a.eq_ignore_ascii_case(addr));
            if other || per_line[j].iter().any(|a| a.eq_ignore_ascii_case(addr)) {
                break;
            }
            out.push_str(lines[j]);
            out.push('\n');
            j += 1;
        }
        i = j;
    }
    out
}

/// The notice's paragraph about `recipient`, for reports whose machine part lacks a diagnostic.
pub(crate) fn segment_for(notice: &str, recipient: &str) -> Option<String> {
    let lines: Vec<&str> = notice.lines().collect();
    let per_line: Vec<Vec<String>> = lines.iter().map(|l| text::addresses(l)).collect();
    let seg = segment(&lines, &per_line, recipient);
    (!seg.trim().is_empty()).then_some(seg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_at_a_marker_or_a_header_block() {
        let (notice, original) = split_original(
            "Sorry.\n\n<a@b.example>:\n550 no\n\n--- Below this line is a copy of the message.\n\nTo: a@b.example\n",
        );
        assert!(notice.ends_with("550 no\n\n"));
        assert_eq!(original, Some("To: a@b.example\n"));
        let (notice, original) = split_original("Failed.\n\nReceived: from x\nTo: y@z.example\n");
        assert_eq!(notice, "Failed.\n\n");
        assert!(original.is_some_and(|o| o.starts_with("Received:")));
    }

    #[test]
    fn segments_stop_at_the_next_recipient() {
        let notice = "<a@x.example>:\n550 user unknown\n<b@x.example>:\n552 mailbox full\n";
        assert_eq!(
            segment_for(notice, "a@x.example").as_deref(),
            Some("<a@x.example>:\n550 user unknown\n")
        );
        assert_eq!(
            segment_for(notice, "b@x.example").as_deref(),
            Some("<b@x.example>:\n552 mailbox full\n")
        );
        assert!(is_daemon("MAILER-DAEMON@x.example"));
    }
}
