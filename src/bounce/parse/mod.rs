//! Bounce parsing: the bytes of one returned mail → a [`Report`] saying which
//! recipients failed, how, and what the original message was.
//!
//! Owns recognising the formats (RFC 3464 delivery reports, RFC 5965 abuse
//! reports, RFC 3834 auto-replies, Amazon SES notifications and the plain-text
//! notices of Postfix, Sendmail, Exim, qmail, Exchange, Gmail, ...) and
//! finding each failed recipient's diagnostic text and status code. What
//! those words mean (reason, hard/soft/other) is [`crate::classify`]'s call,
//! the same one the ledger makes for a synchronous SMTP refusal. It does not
//! decide what to do about a bounce (suppress, retry, count); that is
//! ingestion's job.
//!
//! Layout: [`mime`] turns bytes into sections; [`dsn`], [`arf`], [`ses`],
//! [`autoreply`] and [`vendors`] each read one family of formats;
//! [`text`] holds the string helpers they share.
//!
//! Reading a file ([`parse_file`]) is kept apart from parsing bytes
//! ([`parse`]), which is pure and tested with byte literals.

mod arf;
mod autoreply;
mod dsn;
mod mime;
mod ses;
mod text;
mod vendors;

#[cfg(test)]
pub(crate) mod tests;

use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::classify::{self, Class};

/// What kind of mail this is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// At least one recipient failed for good.
    Bounce,
    /// Delivery is late but still being tried.
    Delay,
    /// An abuse or opt-out report (ARF, or a provider's complaint notice).
    Complaint,
    /// An automatic reply such as a vacation notice.
    #[serde(rename = "autoreply")]
    AutoReply,
    /// A positive delivery notification.
    Delivered,
    /// An ordinary mail: no findings.
    #[serde(rename = "notbounce")]
    NotBounce,
}

/// One recipient's outcome as the returned mail tells it.
#[derive(Debug, Clone, Serialize)]
pub struct Finding {
    /// The recipient address, as found, trimmed of `<>`.
    pub recipient: Option<String>,
    /// RFC 3463 status (`5.1.1`) when the mail carries one.
    pub status: Option<String>,
    /// Hard, soft or other.
    pub class: Class,
    /// Finer reason: userunknown, hostunknown, mailboxfull, blocked, expired, feedback, vacation, ...
    pub reason: String,
    /// ARF Feedback-Type (abuse, opt-out, ...), for complaints.
    pub feedback_type: Option<String>,
    /// The remote server's text, one line, at most 500 characters.
    pub diagnostic: Option<String>,
    /// The server that answered, when the mail names it.
    pub remote_mta: Option<String>,
}

impl std::fmt::Display for Finding {
    /// One readable line: `recipient class/reason status (feedback type): diagnostic`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let class = self.class.as_str();
        write!(
            f,
            "{} {class}/{} {}",
            self.recipient.as_deref().unwrap_or("-"),
            self.reason,
            self.status.as_deref().unwrap_or("-")
        )?;
        if let Some(t) = &self.feedback_type {
            write!(f, " ({t})")?;
        }
        if let Some(d) = &self.diagnostic {
            write!(f, ": {d}")?;
        }
        Ok(())
    }
}

/// Everything parsed from one returned mail.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// What kind of mail this is.
    pub kind: Kind,
    /// One entry per recipient the mail reports on; empty for [`Kind::NotBounce`].
    pub results: Vec<Finding>,
    /// Addresses this mail was delivered to (envelope): Delivered-To, X-Original-To, Envelope-To, X-Envelope-To, then To. Used to decode VERP bounce addresses and detect mail to an unsubscribe address.
    pub envelope_to: Vec<String>,
    /// Header fields of the returned original message (from message/rfc822, message/rfc822-headers / text/rfc822-headers, or headers quoted inline in the body), in order. Used to find X-Blast-* correlation headers.
    pub original_headers: Vec<(String, String)>,
    /// The address in this mail's From.
    pub from: Option<String>,
    /// This mail's Subject, decoded.
    pub subject: Option<String>,
}

/// Why a mail could not be parsed at all.
#[derive(Debug, thiserror::Error)]
pub enum ParseError {
    /// The bytes have no header section: not an e-mail.
    #[error("not an e-mail: no header section")]
    NotAnEmail,
    /// The file could not be read.
    #[error("cannot read {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
}

/// Reads the file at `path` and parses it with [`parse`].
pub fn parse_file(path: &Path) -> Result<Report, ParseError> {
    let raw = std::fs::read(path).map_err(|source| ParseError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse(&raw)
}

/// Header fields that name the envelope recipient, most specific first.
const ENVELOPE_HEADERS: &[&str] = &[
    "Delivered-To",
    "X-Original-To",
    "Envelope-To",
    "X-Envelope-To",
    "To",
];

/// What the format parsers get to look at.
pub(crate) struct Ctx<'a> {
    /// The parsed mail.
    pub(crate) mail: &'a mime::Mail,
    /// The human-readable notice, without the quoted original message.
    pub(crate) notice: &'a str,
    /// Header fields of the returned message.
    pub(crate) original: &'a [(String, String)],
    /// Addresses of people on the sending side (never a failed recipient).
    pub(crate) senders: Vec<String>,
}

impl Ctx<'_> {
    /// True when `addr` belongs to the sending side, not a failed recipient.
    pub(crate) fn is_sender(&self, addr: &str) -> bool {
        self.senders.iter().any(|s| s.eq_ignore_ascii_case(addr))
    }

    /// The first address in the original message's `To`, if it was returned.
    pub(crate) fn original_to(&self) -> Option<String> {
        self.original
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case("to"))
            .find_map(|(_, v)| text::first_address(v))
    }
}

/// Parses one returned mail. A plain human mail gives [`Kind::NotBounce`]
/// with no results; only bytes that are not a mail at all are an error.
pub fn parse(raw: &[u8]) -> Result<Report, ParseError> {
    let mail = mime::read(raw).ok_or(ParseError::NotAnEmail)?;
    let body = mail.text();
    let (notice, inline_original) = vendors::split_original(&body);
    let mut original: Vec<(String, String)> = mail
        .sections
        .iter()
        .find_map(|s| match s {
            mime::Section::Original(h) if !h.is_empty() => Some(h.clone()),
            _ => None,
        })
        .unwrap_or_default();
    if original.is_empty() {
        original = inline_original.map(text::fields).unwrap_or_default();
    }
    let mut envelope_to = Vec::new();
    for name in ENVELOPE_HEADERS {
        for value in mail.headers_named(name) {
            for addr in text::addresses(value) {
                if !envelope_to
                    .iter()
                    .any(|a: &String| a.eq_ignore_ascii_case(&addr))
                {
                    envelope_to.push(addr);
                }
            }
        }
    }
    let from = mail.header("From").and_then(text::first_address);
    let ctx = Ctx {
        mail: &mail,
        notice,
        original: &original,
        senders: senders(&mail, &original, &envelope_to),
    };
    let (kind, results) = recognise(&ctx);
    Ok(Report {
        kind,
        results,
        envelope_to,
        original_headers: original.clone(),
        from,
        subject: mail.subject.clone(),
    })
}

/// Addresses on the sending side: this mail's To and envelope, the original's From.
fn senders(mail: &mime::Mail, original: &[(String, String)], envelope: &[String]) -> Vec<String> {
    let mut out: Vec<String> = envelope.to_vec();
    for (name, value) in original {
        if ["from", "return-path", "sender", "reply-to"]
            .iter()
            .any(|n| name.eq_ignore_ascii_case(n))
        {
            out.extend(text::addresses(value));
        }
    }
    for name in ["From", "Return-Path", "Reply-To"] {
        if let Some(v) = mail.header(name) {
            out.extend(text::addresses(v));
        }
    }
    out
}

/// Tries each format family in turn, most structured first.
fn recognise(ctx: &Ctx<'_>) -> (Kind, Vec<Finding>) {
    if let Some(found) = arf::parse(ctx) {
        return found;
    }
    if let Some(found) = ses::parse(ctx) {
        return found;
    }
    if let Some(found) = dsn::parse(ctx) {
        return found;
    }
    if vendors::is_bounce(ctx) {
        return vendors::parse(ctx);
    }
    if let Some(found) = autoreply::parse(ctx) {
        return found;
    }
    (Kind::NotBounce, Vec::new())
}

/// The kind of a report from its findings: any failure makes it a bounce.
pub(crate) fn kind_of(results: &[Finding], delayed: bool) -> Kind {
    if results.iter().any(|f| f.class != Class::Other) {
        if delayed {
            Kind::Delay
        } else {
            Kind::Bounce
        }
    } else if results.iter().any(|f| f.reason == "delivered") {
        Kind::Delivered
    } else {
        Kind::Bounce
    }
}

/// Builds a failure finding from a recipient and the text about it.
pub(crate) fn failure(
    recipient: Option<String>,
    diagnostic: &str,
    status: Option<String>,
) -> Finding {
    let reason = classify::reason(diagnostic, status.as_deref());
    failure_with(recipient, status, reason, diagnostic, None)
}

/// A failure finding whose reason is already decided; `diagnostic` is
/// flattened to one line.
pub(crate) fn failure_with(
    recipient: Option<String>,
    status: Option<String>,
    reason: &str,
    diagnostic: &str,
    remote_mta: Option<String>,
) -> Finding {
    let line = text::one_line(diagnostic);
    Finding {
        recipient,
        status,
        class: classify::class_of(reason),
        reason: reason.to_string(),
        feedback_type: None,
        diagnostic: (!line.is_empty()).then_some(line),
        remote_mta,
    }
}
