//! RFC 5965 abuse reports (ARF) and the complaint notices of providers that
//! predate or skip it (Hotmail's JMRP, Apple Mail's unsubscribe mail).
//!
//! Owns the Feedback-Type and finding the complaining recipient. Every
//! finding is class other, reason `feedback`.

use super::{mime::Section, text, Ctx, Finding, Kind};
use crate::classify::Class;

/// Reads a complaint; `None` when the mail is not one.
pub(crate) fn parse(ctx: &Ctx<'_>) -> Option<(Kind, Vec<Finding>)> {
    let report = ctx.mail.sections.iter().find_map(|s| match s {
        Section::Feedback(body) => Some(text::fields(body)),
        _ => None,
    });
    let (feedback_type, recipients) = match report {
        Some(fields) => {
            let kind = fields
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case("Feedback-Type"))
                .map(|(_, v)| v.trim().to_ascii_lowercase());
            (
                kind.unwrap_or_else(|| "abuse".into()),
                reported_recipients(&fields, ctx),
            )
        }
        None => {
            let (kind, recipient) = legacy(ctx)?;
            (kind, vec![recipient])
        }
    };
    let findings = recipients
        .into_iter()
        .map(|recipient| Finding {
            recipient,
            status: None,
            class: Class::Other,
            reason: "feedback".into(),
            feedback_type: Some(feedback_type.clone()),
            diagnostic: None,
            remote_mta: None,
        })
        .collect();
    Some((Kind::Complaint, findings))
}

/// Every complaining recipient a report names: all its `Original-Rcpt-To`
/// fields (RFC 5965 allows one per recipient, and some reporters list
/// several addresses in one), else its `Removal-Recipient`s, else the
/// returned message's recipient. One `None` when none is named.
fn reported_recipients(fields: &[(String, String)], ctx: &Ctx<'_>) -> Vec<Option<String>> {
    let all = |name: &str| -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for (_, v) in fields.iter().filter(|(n, _)| n.eq_ignore_ascii_case(name)) {
            for a in text::addresses(v) {
                if !out.iter().any(|o| o.eq_ignore_ascii_case(&a)) {
                    out.push(a);
                }
            }
        }
        out
    };
    let mut found = all("Original-Rcpt-To");
    if found.is_empty() {
        found = all("Removal-Recipient");
    }
    if found.is_empty() {
        return vec![original_recipient(ctx)];
    }
    found.into_iter().map(Some).collect()
}

/// The recipient named by the returned message: a provider's recipient header, else its To.
fn original_recipient(ctx: &Ctx<'_>) -> Option<String> {
    ctx.original
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case("X-HmXmrOriginalRecipient"))
        .and_then(|(_, v)| text::first_address(v))
        .or_else(|| ctx.original_to())
}

/// Complaints without a feedback-report part: `(feedback type, recipient)`.
fn legacy(ctx: &Ctx<'_>) -> Option<(String, Option<String>)> {
    let mail = ctx.mail;
    // Apple Mail's one-click unsubscribe: the complainer is the sender.
    if mail
        .header("X-Apple-Unsubscribe")
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("true"))
    {
        let from = mail.header("From").and_then(text::first_address);
        return Some(("opt-out".into(), from));
    }
    // Hotmail/Outlook.com JMRP: the reported message, with its recipient header.
    let subject = mail.subject.as_deref().unwrap_or("").to_ascii_lowercase();
    let jmrp = ctx
        .original
        .iter()
        .any(|(n, _)| n.eq_ignore_ascii_case("X-HmXmrOriginalRecipient"));
    if jmrp || subject.starts_with("complaint about message from") {
        return Some(("abuse".into(), original_recipient(ctx)));
    }
    None
}
