//! The classifier's table: one server reply per row and everything blast
//! decides from it, checked against both the reply path (transports, ledger,
//! breaker) and the returned-mail path (bounce parsing of a DSN carrying the
//! same words).

use super::{outcome, queue_id, relay_refusal, reply, reply_reason, suppresses, Class};
use crate::bounce::parse;
use crate::model::Outcome;

use Class::{Hard, Other, Soft};

/// `(code, enhanced, text)` → `(status, reason, class, relay refusal, suppress)`.
type Row = (
    u16,
    Option<&'static str>,
    &'static str,
    &'static str,
    &'static str,
    Class,
    bool,
    bool,
);

#[rustfmt::skip]
const TABLE: &[Row] = &[
    // Accepted: sent, whatever the words.
    (250, Some("2.0.0"), "Ok: queued as 4F1A2B3C4D", "sent", "delivered", Other, false, false),
    (250, None, "OK id=1uXyZa-000ABC-7Q", "sent", "delivered", Other, false, false),
    (250, Some("2.0.0"), "5AT9x1Qp012345 Message accepted for delivery", "sent", "delivered", Other, false, false),
    (250, None, "Ok", "sent", "delivered", Other, false, false),
    // Temporary: deferred, never suppressed, even when the words say hard.
    (451, Some("4.3.0"), "Try again later", "deferred", "systemerror", Soft, false, false),
    (421, Some("4.7.0"), "Too many connections, slow down", "deferred", "toomanyconn", Soft, false, false),
    (452, Some("4.5.3"), "Too many recipients", "deferred", "systemerror", Soft, false, false),
    (450, Some("4.1.1"), "User unknown (try later)", "deferred", "userunknown", Hard, false, false),
    (451, None, "retry timeout exceeded", "deferred", "expired", Soft, false, false),
    // The address is gone: suppressed.
    (550, Some("5.1.1"), "<x@y>: Recipient address rejected: User unknown", "failed", "userunknown", Hard, false, true),
    (550, None, "user unknown", "failed", "userunknown", Hard, false, true),
    (550, Some("5.0.0"), "User unknown", "failed", "userunknown", Hard, false, true),
    (550, None, "Recipient not found", "failed", "userunknown", Hard, false, true),
    (550, None, "Requested action not taken: mailbox unavailable", "failed", "userunknown", Hard, false, true),
    (553, Some("5.1.3"), "Bad recipient address syntax", "failed", "userunknown", Hard, false, true),
    (550, Some("5.1.0"), "Address rejected", "failed", "userunknown", Hard, false, true),
    (550, Some("5.1.10"), "Null MX", "failed", "notaccept", Hard, false, true),
    (556, Some("5.1.10"), "Recipient address has null MX", "failed", "notaccept", Hard, false, true),
    (550, Some("5.1.6"), "user has moved to a new address", "failed", "hasmoved", Hard, false, true),
    (550, None, "Host or domain name not found. Name service error for name=b.example type=A", "failed", "hostunknown", Hard, false, true),
    // Refused for another cause: failed, not suppressed. Text wins over x.1.1.
    (550, Some("5.1.1"), "mailbox full", "failed", "mailboxfull", Soft, false, false),
    (552, Some("5.2.2"), "Mailbox full", "failed", "mailboxfull", Soft, false, false),
    (552, Some("5.2.2"), "over quota", "failed", "mailboxfull", Soft, false, false),
    (550, Some("5.2.1"), "The email account that you tried to reach is disabled", "failed", "suspend", Soft, false, false),
    (553, Some("5.1.8"), "<s@x.y>... Domain of sender address s@x.y does not exist", "failed", "rejected", Soft, false, false),
    (550, Some("5.7.1"), "Message rejected due to local policy", "failed", "policyviolation", Soft, false, false),
    (550, Some("5.7.1"), "<a@b.c>: Recipient address rejected: Access denied", "failed", "blocked", Soft, false, false),
    (554, Some("5.7.1"), "Service unavailable; Client host [192.0.2.1] blocked using zen.spamhaus.org", "failed", "blocked", Soft, false, false),
    (550, Some("5.7.26"), "Unauthenticated email from example.jp is not accepted due to domain's DMARC policy", "failed", "authfailure", Soft, false, false),
    (354, None, "End data with <CR><LF>.<CR><LF>", "failed", "undefined", Soft, false, false),
    (550, None, "5.1.1.1 not an enhanced code", "failed", "undefined", Soft, false, false),
    // About the relay or the session: the breaker pauses, nobody is suppressed.
    (554, Some("5.7.1"), "<a@b.c>: Relay access denied", "failed", "norelaying", Soft, true, false),
    (550, None, "relay not permitted", "failed", "norelaying", Soft, true, false),
    (550, Some("5.7.1"), "Unable to relay for a@b.c", "failed", "norelaying", Soft, true, false),
    (530, Some("5.7.0"), "Authentication required", "failed", "securityerror", Soft, true, false),
    (535, Some("5.7.8"), "Error: authentication failed: bad credentials", "failed", "policyviolation", Soft, true, false),
];

/// A delivery report for one recipient whose remote server gave `line`
/// (after `code`) and `status`, as Postfix writes it.
fn dsn(code: u16, status: &str, line: &str) -> Vec<u8> {
    crate::bounce::parse::tests::synthetic_dsn("a@example.org", status, &format!("{code} {line}"))
}

#[test]
fn one_table_for_replies_and_bounces() {
    for &(code, enhanced, text, status, reason, class, relay, suppress) in TABLE {
        let line = match enhanced {
            Some(e) => format!("{e} {text}"),
            None => text.to_string(),
        };
        let at = format!("{code} {line}");
        let r = reply(code, &[&line]);
        assert_eq!(r.enhanced.as_deref(), enhanced, "{at}: enhanced");
        assert_eq!(outcome(r.clone()).status().as_str(), status, "{at}: status");
        assert_eq!(reply_reason(&r), reason, "{at}: reason");
        assert_eq!(super::class_of(reason), class, "{at}: class");
        assert_eq!(relay_refusal(&r), relay, "{at}: relay refusal");
        assert_eq!(suppresses(&r), suppress, "{at}: suppress");
        // The same words arriving later in a bounce get the same answer.
        if (400..=599).contains(&code) {
            let status = enhanced.map_or(format!("{}.0.0", code / 100), str::to_string);
            let report = parse::parse(&dsn(code, &status, &line)).expect("parses");
            let f = &report.results[0];
            assert_eq!(
                (f.reason.as_str(), f.class),
                (reason, class),
                "{at}: as a bounce"
            );
        }
    }
}

#[test]
fn queue_ids_parse() {
    let table: &[(&str, Option<&str>)] = &[
        ("2.0.0 Ok: queued as 4F1A2B3C4D", Some("4F1A2B3C4D")),
        ("OK id=1uXyZa-000ABC-7Q", Some("1uXyZa-000ABC-7Q")),
        (
            "2.0.0 5AT9x1Qp012345 Message accepted for delivery",
            Some("5AT9x1Qp012345"),
        ),
        ("Ok", None),
    ];
    for &(text, want) in table {
        assert_eq!(queue_id(text), want, "{text}");
        let got = match outcome(reply(250, &[text])) {
            Outcome::Sent { queue_id, .. } => queue_id,
            o => panic!("{text}: {o:?}"),
        };
        assert_eq!(got.as_deref(), want, "{text}");
    }
}

#[test]
fn multi_line_replies_are_joined() {
    let r = reply(550, &["5.7.1 Message rejected", "see https://example.com"]);
    assert_eq!(r.text, "5.7.1 Message rejected see https://example.com");
    assert_eq!(r.enhanced.as_deref(), Some("5.7.1"));
}
