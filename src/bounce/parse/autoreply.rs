//! RFC 3834 automatic replies: vacation and out-of-office notices.
//!
//! Owns recognising them by header (Auto-Submitted, X-Autoreply, Precedence)
//! or by subject. The replying address is the recipient; the finding is class
//! other, reason `vacation`. Bounces also carry `Auto-Submitted`, so this
//! runs only after the bounce recognisers said no.

use super::{text, Ctx, Finding, Kind};
use crate::classify::Class;

/// Subject beginnings that mark an automatic reply, lower-case.
const SUBJECT_PREFIXES: &[&str] = &[
    "auto:",
    "autoreply",
    "auto-reply",
    "auto reply",
    "automatic reply",
    "automatische antwort",
    "réponse automatique",
    "respuesta automática",
    "out of office",
    "out of the office",
    "away from",
    "vacation",
    "on vacation",
    "abwesenheit",
];

/// Subject words that mark an automatic reply anywhere in it, lower-case.
const SUBJECT_WORDS: &[&str] = &[
    "out of office",
    "away until",
    "auto-reply",
    "autoreply",
    "vacation",
];

/// Reads an automatic reply; `None` when the mail is not one.
pub(crate) fn parse(ctx: &Ctx<'_>) -> Option<(Kind, Vec<Finding>)> {
    if !is_autoreply(ctx) {
        return None;
    }
    let mail = ctx.mail;
    let recipient = mail
        .header("From")
        .or_else(|| mail.header("Reply-To"))
        .and_then(text::first_address);
    let line = text::one_line(ctx.notice);
    let finding = Finding {
        recipient,
        status: None,
        class: Class::Other,
        reason: "vacation".into(),
        feedback_type: None,
        diagnostic: (!line.is_empty()).then_some(line),
        remote_mta: None,
    };
    Some((Kind::AutoReply, vec![finding]))
}

/// True when headers or subject say the mail was sent automatically in reply.
fn is_autoreply(ctx: &Ctx<'_>) -> bool {
    let mail = ctx.mail;
    let auto = mail
        .header("Auto-Submitted")
        .is_some_and(|v| v.trim().to_ascii_lowercase().starts_with("auto-replied"));
    let flagged = [
        "X-Autoreply",
        "X-Autorespond",
        "X-Autoresponder",
        "X-Vacation",
    ]
    .iter()
    .any(|h| mail.header(h).is_some());
    let precedence = mail
        .header("Precedence")
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("auto_reply"));
    let subject = mail.subject.as_deref().unwrap_or("").trim().to_lowercase();
    let by_subject = SUBJECT_PREFIXES.iter().any(|p| subject.starts_with(p))
        || SUBJECT_WORDS.iter().any(|w| subject.contains(w));
    auto || flagged || precedence || by_subject
}
