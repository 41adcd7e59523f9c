//! Classification: what a remote server's words and status codes mean. The
//! one place that decides it, for the SMTP replies the transports read and
//! for the failures returned mail reports.
//!
//! Owns:
//! - reply parsing and the outcome mapping: [`reply`] builds a [`Reply`]
//!   (with its RFC 3463 [`enhanced_status`]), [`outcome`] maps it to
//!   sent / deferred / failed, [`queue_id`] finds the MTA's queue id;
//! - what a refusal is about: [`reply_reason`] (the same reason bounce
//!   parsing gives the same words), [`suppresses`] (a 5xx whose reason is
//!   hard: the ledger suppresses the address) and [`relay_refusal`] (the
//!   relay or the session, which the campaign breaker pauses on);
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

/// The reason a server's reply names, decided as bounce parsing decides it
/// for a returned mail's diagnostic: the reply's words first, its enhanced
/// status when they name nothing. A 2xx reply is `delivered` whatever it
/// says.
pub fn reply_reason(reply: &Reply) -> &'static str {
    match reply.code {
        Some(200..=299) => "delivered",
        _ => reason(&reply.text, reply.enhanced.as_deref()),
    }
}

/// A synchronous refusal that puts the address on the suppression list: a
/// 5xx whose [`reply_reason`] is of [`Class::Hard`] (user unknown, host
/// unknown, moved, not accepting mail), the class bounce ingest gives the
/// same words arriving later in a bounce (which may say more: the SMTP
/// command a transcript names, the notice around the reply). A refusal about
/// the relay ([`relay_refusal`]) says nothing of the address and never
/// suppresses.
pub fn suppresses(reply: &Reply) -> bool {
    matches!(reply.code, Some(500..=599))
        && class_of(reply_reason(reply)) == Class::Hard
        && !relay_refusal(reply)
}

/// Enhanced status codes that say the recipient's address is gone:
/// 5.1.0/5.1.1/5.1.3 (bad or unknown mailbox), 5.1.2 (no such host), 5.1.6
/// (moved), 5.1.10 (null MX), 5.2.1 (mailbox disabled). 5.1.7 and 5.1.8 are
/// about the sender and are not here.
pub fn hard_status(status: &str) -> bool {
    matches!(
        status,
        "5.1.0" | "5.1.1" | "5.1.2" | "5.1.3" | "5.1.6" | "5.1.10" | "5.2.1"
    )
}

/// Whether a bounce the MTA logged (`status=bounced`, its `dsn=` and the
/// remote reply or reason in `text`) puts the address on the suppression
/// list: a hard reason by the rule of [`suppresses`], or a
/// [`hard_status`] code whose words name no other, soft, reason. A refusal
/// about the relay ([`relay_refusal`]) never does.
pub fn logged_bounce_suppresses(dsn: Option<&str>, text: &str) -> bool {
    // "host mx[1.2.3.4] said: 550 5.1.1 ...": the remote's own code.
    let code = text
        .split_once(" said: ")
        .and_then(|(_, r)| r.get(..3))
        .and_then(|c| c.parse::<u16>().ok())
        .unwrap_or(550);
    let reply = Reply {
        code: Some(code),
        enhanced: dsn.map(str::to_string),
        text: text.to_string(),
    };
    if relay_refusal(&reply) || !(500..=599).contains(&code) {
        return false;
    }
    let soft_words =
        reason_from_text(text).is_some_and(|r| class_of(r) != Class::Hard && r != "suspend");
    class_of(reason(text, dsn)) == Class::Hard || (dsn.is_some_and(hard_status) && !soft_words)
}

#[cfg(test)]
mod tests;
