//! Classification: what a remote server's words and status codes mean. The
//! one place that decides it, for the SMTP replies the transports read and
//! for the failures returned mail reports.
//!
//! Owns:
//! - reply parsing and the outcome mapping: [`reply`] builds a [`Reply`]
//!   (with its RFC 3463 [`enhanced_status`]), [`outcome`] maps it to
//!   sent / deferred / failed, [`queue_id`] finds the MTA's queue id;
//! - what a refusal is about: [`relay_refusal`] (the relay or the session,
//!   which the campaign breaker pauses on);
//! - reasons: the phrase tables ([`phrases`]) and the rules that turn a
//!   diagnostic text and a status code into a reason name and a [`Class`]
//!   ([`reasons`]). Bounce parsing calls them for each failed recipient of a
//!   returned mail.
//!
//! It knows nothing of mail formats, SMTP sessions or the database: callers
//! hand it the words of one reply. The domain types ([`Reply`], [`Outcome`])
//! live in [`crate::model`].

mod phrases;
mod reasons;

use serde::Serialize;

use crate::model::{Outcome, Reply};

pub use reasons::{class_of, reason, reason_from_status, reason_from_text, reason_in};

/// How bad a failure is for the address.
///
/// hard = address gone (user unknown, host unknown, moved, not accepting
/// mail); soft = every other failure (mailbox full, blocked, filtered, rate
/// limited, expired, policy, ...); other = complaints, auto-replies, delivery
/// notices.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Class {
    /// The address is gone; stop sending to it.
    Hard,
    /// A failure that may pass (full, blocked, expired, policy, ...).
    Soft,
    /// Not a failure: a complaint, an auto-reply, a delivery notice.
    Other,
}

impl Class {
    /// The class's name as reports and `blast_bounces.class` spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            Class::Hard => "hard",
            Class::Soft => "soft",
            Class::Other => "other",
        }
    }
}

/// Builds a [`Reply`] from a basic code and the reply's text lines.
pub fn reply(code: u16, lines: &[&str]) -> Reply {
    let text = lines.join(" ");
    let enhanced = enhanced_status(&text).map(str::to_string);
    Reply {
        code: Some(code),
        enhanced,
        text,
    }
}

/// Maps a complete server reply to the message's outcome: 2xx sent, 4xx
/// deferred, anything else failed (a 3xx at the end of a transaction is a
/// protocol violation and must not count as delivered).
pub fn outcome(reply: Reply) -> Outcome {
    match reply.code {
        Some(200..=299) => {
            let queue_id = queue_id(&reply.text).map(str::to_string);
            Outcome::Sent { reply, queue_id }
        }
        Some(400..=499) => Outcome::Deferred(reply),
        _ => Outcome::Failed(reply),
    }
}

/// The RFC 3463 enhanced status code at the start of a reply text, if any
/// (`"2.0.0 Ok"` → `"2.0.0"`).
pub fn enhanced_status(text: &str) -> Option<&str> {
    let first = text.split_ascii_whitespace().next()?;
    let mut parts = first.split('.');
    let class = parts.next()?;
    let subject = parts.next()?;
    let detail = parts.next()?;
    let ok = matches!(class, "2" | "4" | "5")
        && (1..=3).contains(&subject.len())
        && (1..=3).contains(&detail.len())
        && subject
            .bytes()
            .chain(detail.bytes())
            .all(|b| b.is_ascii_digit())
        && parts.next().is_none();
    ok.then_some(first)
}

/// The queue id an MTA put in its 250 reply: Postfix and blast's sink say
/// `queued as ID`, Exim `id=ID`, Sendmail `ID Message accepted`.
pub fn queue_id(text: &str) -> Option<&str> {
    fn clean(s: &str) -> Option<&str> {
        let id = s.trim_matches(|c: char| !c.is_ascii_alphanumeric() && c != '-' && c != '.');
        let id = id.trim_end_matches('.');
        (!id.is_empty()).then_some(id)
    }
    if let Some(i) = text.find("queued as ") {
        return text[i + 10..]
            .split_ascii_whitespace()
            .next()
            .and_then(clean);
    }
    if let Some(i) = text.find("id=") {
        return text[i + 3..]
            .split_ascii_whitespace()
            .next()
            .and_then(clean);
    }
    if let Some(i) = text.find(" Message accepted") {
        // "2.0.0 4B3C2D1E Message accepted for delivery"
        return text[..i]
            .split_ascii_whitespace()
            .last()
            .and_then(clean)
            .filter(|id| enhanced_status(id).is_none());
    }
    None
}

/// A refusal that is about the relay or the session, not the recipient: a
/// session code (530 authentication required, 535 credentials refused, 538
/// encryption required), enhanced status 5.7.0, any of the table's
/// `norelaying` phrases ("relay access denied", "unable to relay", ...), or
/// "authentication required". The campaign breaker pauses on it and records
/// the recipient as deferred. The rest of the `securityerror` wording
/// (certificates, "security policy") is left out: a relay also says it about
/// one message.
pub fn relay_refusal(reply: &Reply) -> bool {
    matches!(reply.code, Some(530 | 535 | 538))
        || reply.enhanced.as_deref() == Some("5.7.0")
        || reasons::mentions(&reply.text, "norelaying")
        || reply
            .text
            .to_ascii_lowercase()
            .contains("authentication required")
}

/// A permanent refusal that says the address itself is gone (RFC 3463
/// 5.1.x: bad mailbox, bad domain, moved; or the usual wording without an
/// enhanced code). Such an address is suppressed at once.
pub fn is_hard_bounce(reply: &Reply) -> bool {
    if !matches!(reply.code, Some(500..=599)) {
        return false;
    }
    if let Some(e) = &reply.enhanced {
        return e.starts_with("5.1.") && e != "5.1.0";
    }
    let text = reply.text.to_ascii_lowercase();
    [
        "user unknown",
        "unknown user",
        "no such user",
        "does not exist",
        "mailbox unavailable",
        "invalid recipient",
        "no mailbox",
    ]
    .iter()
    .any(|p| text.contains(p))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_classify() {
        /// (code, text, status, enhanced, queue id)
        type Row<'a> = (u16, &'a str, &'a str, Option<&'a str>, Option<&'a str>);
        let table: &[Row<'_>] = &[
            (
                250,
                "2.0.0 Ok: queued as 4F1A2B3C4D",
                "sent",
                Some("2.0.0"),
                Some("4F1A2B3C4D"),
            ),
            (
                250,
                "OK id=1uXyZa-000ABC-7Q",
                "sent",
                None,
                Some("1uXyZa-000ABC-7Q"),
            ),
            (
                250,
                "2.0.0 5AT9x1Qp012345 Message accepted for delivery",
                "sent",
                Some("2.0.0"),
                Some("5AT9x1Qp012345"),
            ),
            (250, "Ok", "sent", None, None),
            (
                451,
                "4.3.0 Try again later",
                "deferred",
                Some("4.3.0"),
                None,
            ),
            (
                421,
                "4.7.0 Too many connections, slow down",
                "deferred",
                Some("4.7.0"),
                None,
            ),
            (
                452,
                "4.5.3 Too many recipients",
                "deferred",
                Some("4.5.3"),
                None,
            ),
            (
                550,
                "5.1.1 <x@y>: Recipient address rejected: User unknown",
                "failed",
                Some("5.1.1"),
                None,
            ),
            (
                554,
                "5.7.1 Relay access denied",
                "failed",
                Some("5.7.1"),
                None,
            ),
            (354, "End data with <CR><LF>.<CR><LF>", "failed", None, None),
            (550, "5.1.1.1 not an enhanced code", "failed", None, None),
        ];
        for &(code, text, status, enh, qid) in table {
            let o = outcome(reply(code, &[text]));
            assert_eq!(o.status().as_str(), status, "{code} {text}");
            assert_eq!(o.reply().enhanced.as_deref(), enh, "{code} {text}");
            let got_qid = match &o {
                Outcome::Sent { queue_id, .. } => queue_id.as_deref(),
                _ => None,
            };
            assert_eq!(got_qid, qid, "{code} {text}");
        }
    }

    #[test]
    fn hard_bounces() {
        let table: &[(u16, &str, bool)] = &[
            (
                550,
                "5.1.1 <a@b>: Recipient address rejected: User unknown",
                true,
            ),
            (550, "5.1.10 Null MX", true),
            (553, "5.1.3 Bad recipient address syntax", true),
            (550, "Requested action not taken: mailbox unavailable", true),
            (550, "5.7.1 Relay access denied", false),
            (552, "5.2.2 Mailbox full", false),
            (450, "4.1.1 User unknown (try later)", false),
            (550, "5.1.0 Address rejected", false),
        ];
        for &(code, text, hard) in table {
            assert_eq!(is_hard_bounce(&reply(code, &[text])), hard, "{code} {text}");
        }
    }

    #[test]
    fn multi_line_replies_are_joined() {
        let r = reply(550, &["5.7.1 Message rejected", "see https://example.com"]);
        assert_eq!(r.text, "5.7.1 Message rejected see https://example.com");
        assert_eq!(r.enhanced.as_deref(), Some("5.7.1"));
    }
}
