//! Reasons: a remote server's words and status code → a reason name and a
//! [`Class`].
//!
//! Owns the rules over the phrase tables of [`super::phrases`] and the
//! status-code table. Text wins over the status code, because servers send
//! generic codes (`5.0.0`, `550 5.1.1` for a full mailbox) far more often
//! than misleading words.

use super::phrases::{TABLE, WEAK_USERUNKNOWN};
use super::Class;

/// Reasons that mean the address is gone for good.
const HARD_REASONS: &[&str] = &["userunknown", "hostunknown", "hasmoved", "notaccept"];

/// Reasons that are not failures at all.
const OTHER_REASONS: &[&str] = &["feedback", "vacation", "delivered"];

/// What the text says: a reason, and whether it came from a strong phrase.
fn text_reason(text: &str) -> Option<(&'static str, bool)> {
    let lower = text.to_lowercase();
    if let Some((reason, _)) = TABLE
        .iter()
        .find(|(_, phrases)| phrases.iter().any(|p| lower.contains(p)))
    {
        return Some((reason, true));
    }
    WEAK_USERUNKNOWN
        .iter()
        .any(|p| lower.contains(p))
        .then_some(("userunknown", false))
}

/// The reason named by `text` alone, if any phrase of the tables occurs in it.
pub fn reason_from_text(text: &str) -> Option<&'static str> {
    text_reason(text).map(|(r, _)| r)
}

/// True when `text` uses any of the table's phrases for `reason`, whatever
/// reason an earlier row of the table would give the whole text.
pub(crate) fn mentions(text: &str, reason: &str) -> bool {
    let lower = text.to_lowercase();
    TABLE
        .iter()
        .filter(|(r, _)| *r == reason)
        .any(|(_, phrases)| phrases.iter().any(|p| lower.contains(p)))
}

/// The reason an RFC 3463 status code stands for when the text says nothing.
pub fn reason_from_status(status: &str) -> &'static str {
    let mut parts = status.splitn(3, '.');
    let class = parts.next().unwrap_or("");
    let rest = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    match rest {
        ("1", "1") | ("1", "3") | ("1", "0") => "userunknown",
        ("1", "2") => "hostunknown",
        ("1", "6") => "hasmoved",
        ("1", "10") | ("7", "27") => "notaccept",
        ("1", "7") | ("1", "8") => "rejected",
        ("2", "1") => "suspend",
        ("2", "2") => "mailboxfull",
        ("2", "3") | ("3", "4") => "mesgtoobig",
        ("4", "7") => "expired",
        ("4", _) => "networkerror",
        ("7", "1") => "blocked",
        ("7", "25") => "requireptr",
        ("7", "23") | ("7", "24") | ("7", "26") | ("7", "509") | ("7", "515") => "authfailure",
        ("7", _) => "policyviolation",
        ("6", _) => "contenterror",
        ("3", _) => "systemerror",
        ("5", _) => "systemerror",
        _ if class == "2" => "delivered",
        _ => "undefined",
    }
}

/// The SMTP command a failure answered, when the text says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Command {
    /// MAIL FROM: the sender was refused.
    Mail,
    /// RCPT TO: the recipient was refused.
    Rcpt,
    /// DATA or end of data: the message was refused.
    Data,
}

/// Finds which SMTP command a failure answered, from the MTAs' usual wording.
fn command(text: &str) -> Option<Command> {
    let lower = text
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .to_lowercase();
    let table: &[(Command, &[&str])] = &[
        (
            Command::Data,
            &[
                "end of data",
                "in reply to data command",
                ">>> data",
                "smtp command data",
                "after data",
                "our data",
                "our final data",
                "for text command",
                "response to data",
            ],
        ),
        (
            Command::Rcpt,
            &[
                "rcpt to command",
                ">>> rcpt to",
                "after rcpt to",
                "our rcpt to",
                "rcpt to response",
            ],
        ),
        (
            Command::Mail,
            &[
                "mail from command",
                ">>> mail from",
                "after mail from",
                "our mail from",
            ],
        ),
    ];
    // The command mentioned first is the one that failed: transcripts end there.
    table
        .iter()
        .filter_map(|(c, phrases)| {
            phrases
                .iter()
                .filter_map(|p| lower.find(p))
                .min()
                .map(|at| (at, *c))
        })
        .min_by_key(|(at, _)| *at)
        .map(|(_, c)| c)
}

/// The reason for one failed recipient, from its text and status code.
///
/// Text wins, with two exceptions learnt from real bounces: "user unknown"
/// wording under a specific non-address status (`5.7.26 <a@b>: Recipient
/// address rejected: authentication failed`) follows the status; and
/// anything refused at MAIL FROM is about the sender. An unknown user
/// refused at DATA stays unknown: some servers only check recipients after
/// the data, and for a mass mailer mailing it again is worse than losing an
/// address a content filter misnamed.
pub fn reason(text: &str, status: Option<&str>) -> &'static str {
    reason_in(text, "", status)
}

/// Like [`reason`], for a server reply (`reply`) that comes with surrounding
/// text (`context`: the notice's paragraph, a session transcript). The reply's
/// words win; the context fills in when the reply names no reason, and says
/// which SMTP command failed.
pub fn reason_in(reply: &str, context: &str, status: Option<&str>) -> &'static str {
    let by_status = status.map(reason_from_status);
    let mut code = status.unwrap_or("").split('.').skip(1);
    let (subject, detail) = (code.next().unwrap_or(""), code.next().unwrap_or(""));
    let Some((by_text, strong)) = text_reason(reply).or_else(|| text_reason(context)) else {
        return by_status.unwrap_or("undefined");
    };
    let cmd = command(reply).or_else(|| command(context));
    if matches!(by_text, "userunknown" | "hostunknown") && cmd == Some(Command::Mail) {
        return "rejected";
    }
    if by_text == "userunknown" {
        // The code is more precise than the wording: moved, no such host, null MX,
        // or (for weak wording, or any wording under x.6/x.7) another cause.
        let precise = subject == "1" && ["2", "6", "10"].contains(&detail);
        let other_cause =
            ["6", "7"].contains(&subject) || (!strong && ["2", "3", "5"].contains(&subject));
        if precise || other_cause {
            return by_status.unwrap_or(by_text);
        }
    }
    by_text
}

/// The class a reason belongs to.
pub fn class_of(reason: &str) -> Class {
    if HARD_REASONS.contains(&reason) {
        Class::Hard
    } else if OTHER_REASONS.contains(&reason) {
        Class::Other
    } else {
        Class::Soft
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_table_and_classes() {
        assert_eq!(reason_from_status("5.1.1"), "userunknown");
        assert_eq!(reason_from_status("5.1.2"), "hostunknown");
        assert_eq!(reason_from_status("4.2.2"), "mailboxfull");
        assert_eq!(reason_from_status("5.7.26"), "authfailure");
        assert_eq!(reason_from_status("4.4.7"), "expired");
        assert_eq!(reason_from_status("2.1.5"), "delivered");
        assert_eq!(class_of("userunknown"), Class::Hard);
        assert_eq!(class_of("mailboxfull"), Class::Soft);
        assert_eq!(class_of("vacation"), Class::Other);
        // Whole replies are in classify's one table (src/classify/tests.rs);
        // here only the text lookup on its own.
        assert_eq!(
            reason_from_text("550 5.1.1 Mailbox full"),
            Some("mailboxfull")
        );
        assert_eq!(reason_from_text("250 ok"), None);
        // Text wins over a generic or misleading code.
        assert_eq!(
            reason("552 5.1.1 mailbox is full", Some("5.1.1")),
            "mailboxfull"
        );
        assert_eq!(reason("", Some("5.1.1")), "userunknown");
        assert_eq!(reason("", None), "undefined");
        // A status naming another cause beats generic "recipient rejected" wording.
        assert_eq!(
            reason(
                "550 5.7.26 <a@b.c>: Recipient address rejected",
                Some("5.7.26")
            ),
            "authfailure"
        );
        // Unknown user at DATA is unknown: hard for a mass mailer.
        let at_data = "550 Unknown user a@b.c (in reply to end of DATA command)";
        assert_eq!(reason(at_data, Some("5.0.0")), "userunknown");
        assert_eq!(reason(at_data, Some("5.1.1")), "userunknown");
        let at_mail =
            "SMTP error from remote mail server after MAIL FROM:<s@x.y>: 550 5.1.7 No such domain";
        assert_eq!(reason(at_mail, Some("5.1.7")), "rejected");
        assert_eq!(
            command(">>> RCPT To:<a@b> <<< 550 ... >>> DATA"),
            Some(Command::Rcpt)
        );
    }
}
