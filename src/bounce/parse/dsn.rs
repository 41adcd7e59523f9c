//! RFC 3464 delivery status notifications: the `message/delivery-status`
//! part, one field group per recipient.
//!
//! Owns reading Final-Recipient / Original-Recipient, Action, Status,
//! Diagnostic-Code and Remote-MTA. When a report leaves the diagnostic out,
//! the human-readable notice is searched for the recipient's paragraph
//! ([`super::vendors::segment_for`]).

use super::{mime::Section, text, vendors, Ctx, Finding, Kind};
use crate::classify::{self, Class};

/// One per-recipient field group, as read.
#[derive(Debug, Default)]
struct Group {
    /// Final-Recipient, else Original-Recipient, without the `rfc822;` type.
    recipient: Option<String>,
    /// Action: failed, delayed, delivered, relayed, expanded.
    action: String,
    /// The Status field.
    status: Option<String>,
    /// Diagnostic-Code without its type.
    diagnostic: Option<String>,
    /// Remote-MTA without its type.
    remote_mta: Option<String>,
}

/// Reads the delivery-status parts of the mail; `None` when there are none
/// or they name no recipient.
pub(crate) fn parse(ctx: &Ctx<'_>) -> Option<(Kind, Vec<Finding>)> {
    let mut groups = Vec::new();
    for section in &ctx.mail.sections {
        if let Section::Status(body) = section {
            groups.extend(read_groups(body));
        }
    }
    if groups.is_empty() {
        // A broken MIME structure (wrong boundary) leaves the report inline
        // in the text: read the fields from where they start.
        groups = inline_groups(&ctx.mail.text());
    }
    if groups.is_empty() {
        return None;
    }
    let delayed = groups.iter().all(|g| g.action.starts_with("delay"));
    let findings = groups
        .into_iter()
        .map(|g| finding(ctx, g))
        .collect::<Vec<_>>();
    Some((super::kind_of(&findings, delayed), findings))
}

/// Per-recipient groups of one delivery-status body (the per-message group has no recipient).
fn read_groups(body: &str) -> Vec<Group> {
    let mut out = Vec::new();
    for fields in text::field_groups(body) {
        // Some MTAs (AOL) run recipients together without blank lines: a
        // second Final-Recipient (or Original-Recipient) opens a new group.
        let mut g = Group::default();
        let (mut has_final, mut original) = (false, None::<Option<String>>);
        for (name, value) in fields {
            let value = value.trim();
            let lower = name.to_ascii_lowercase();
            let repeats = (lower == "final-recipient" && has_final)
                || (lower == "original-recipient" && original.is_some());
            if repeats {
                push_group(&mut out, std::mem::take(&mut g), original.take().flatten());
                has_final = false;
            }
            match lower.as_str() {
                "final-recipient" => {
                    has_final = true;
                    g.recipient = text::first_address(text::strip_type(value));
                }
                "original-recipient" => {
                    original = Some(text::first_address(text::strip_type(value)))
                }
                "action" => g.action = value.to_ascii_lowercase(),
                "status" => g.status = text::status_codes(value).into_iter().next(),
                "diagnostic-code" => {
                    let d = text::strip_type(value);
                    if !d.is_empty() {
                        g.diagnostic = Some(d.to_string());
                    }
                }
                "remote-mta" => g.remote_mta = Some(text::strip_type(value).to_string()),
                _ => {}
            }
        }
        push_group(&mut out, g, original.flatten());
    }
    out
}

/// Keeps `g` when it names a recipient, falling back to Original-Recipient.
fn push_group(out: &mut Vec<Group>, mut g: Group, original: Option<String>) {
    if g.recipient.is_none() {
        g.recipient = original;
    }
    if g.recipient.is_some() {
        out.push(g);
    }
}

/// Field names that open a delivery-status block quoted inline.
const INLINE_STARTS: &[&str] = &["reporting-mta:", "final-recipient:", "original-recipient:"];

/// Per-recipient groups of a delivery-status block found inside plain text.
fn inline_groups(body: &str) -> Vec<Group> {
    let mut start = None;
    let mut offset = 0;
    for line in body.split_inclusive('\n') {
        let lower = line.to_ascii_lowercase();
        if INLINE_STARTS.iter().any(|s| lower.starts_with(s)) {
            start = Some(offset);
            break;
        }
        offset += line.len();
    }
    let Some(start) = start else {
        return Vec::new();
    };
    // The block ends at the next MIME boundary or content header.
    let rest = &body[start..];
    let end = rest
        .find("\n--")
        .into_iter()
        .chain(rest.to_ascii_lowercase().find("\ncontent-type:"))
        .min()
        .unwrap_or(rest.len());
    read_groups(&rest[..end])
}

/// Turns one group into a finding, borrowing text from the notice when needed.
fn finding(ctx: &Ctx<'_>, g: Group) -> Finding {
    let recipient = g.recipient.clone();
    let delivered = ["delivered", "relayed", "expanded"].contains(&g.action.as_str())
        || g.status.as_deref().is_some_and(|s| s.starts_with('2'));
    // The notice's paragraph about this recipient often says more than a
    // bare status, and is the only text when Diagnostic-Code is missing.
    let notice = recipient
        .as_deref()
        .and_then(|r| vendors::segment_for(ctx.notice, r));
    let mut status = g.status.clone();
    if let Some(code) = g.diagnostic.as_deref().and_then(text::last_status) {
        status = Some(code);
    } else if status.as_deref().is_none_or(is_generic) {
        if let Some(code) = notice.as_deref().and_then(text::last_status) {
            status = Some(code);
        }
    }
    if delivered {
        return Finding {
            recipient,
            status,
            class: Class::Other,
            reason: "delivered".into(),
            feedback_type: None,
            diagnostic: g.diagnostic.as_deref().map(text::one_line),
            remote_mta: g.remote_mta,
        };
    }
    let diagnostic = g.diagnostic.clone().unwrap_or_default();
    let context = notice.clone().unwrap_or_default();
    let reason = match classify::reason_in(&diagnostic, &context, status.as_deref()) {
        "undefined" | "networkerror" if g.action.starts_with("delay") => "expired",
        r => r,
    };
    let shown = if diagnostic.is_empty() {
        notice.unwrap_or_default()
    } else {
        diagnostic
    };
    super::failure_with(recipient, status, reason, &shown, g.remote_mta)
}

/// True for status codes that say nothing beyond success/failure (`5.0.0`).
fn is_generic(status: &str) -> bool {
    status.ends_with(".0.0")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_skip_the_per_message_fields() {
        let body = "Reporting-MTA: dns; mx.example.org\n\nFinal-Recipient: rfc822; <a@example.com>\n\
Action: failed\nStatus: 5.0.0\nDiagnostic-Code: smtp; 550 5.1.1 <a@example.com>:\n  user unknown\n\n\
Original-Recipient: rfc822;b@example.com\nAction: delayed\nStatus: 4.4.7\nRemote-MTA: dns; mx.b\n";
        let groups = read_groups(body);
        assert_eq!(groups.len(), 2);
        assert_eq!(groups[0].recipient.as_deref(), Some("a@example.com"));
        assert_eq!(
            groups[0].diagnostic.as_deref(),
            Some("550 5.1.1 <a@example.com>: user unknown")
        );
        assert_eq!(groups[1].recipient.as_deref(), Some("b@example.com"));
        assert_eq!(groups[1].action, "delayed");
        assert_eq!(groups[1].remote_mta.as_deref(), Some("mx.b"));
        assert!(is_generic("5.0.0"));
        // Recipients run together without a blank line still split.
        let packed = read_groups("Final-Recipient: rfc822; a@x.example\nStatus: 5.2.2\nFinal-Recipient: rfc822; b@x.example\nStatus: 5.1.1\n");
        assert_eq!(packed.len(), 2);
        assert_eq!(packed[1].recipient.as_deref(), Some("b@x.example"));
        assert_eq!(packed[1].status.as_deref(), Some("5.1.1"));
        assert!(!is_generic("5.1.0"));
    }
}
