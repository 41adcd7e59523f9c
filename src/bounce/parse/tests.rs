//! Whole-parser tests: the fixtures in `tests/fixtures/bounces/` against the
//! answers in its `expected.jsonl`, and the report fields around findings.

use super::*;

/// The fixture folder, found from the crate root so tests run from anywhere.
fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/bounces")
}

/// The class as `expected.jsonl` spells it.
fn class_name(c: Class) -> &'static str {
    match c {
        Class::Hard => "hard",
        Class::Soft => "soft",
        Class::Other => "other",
    }
}

#[test]
fn every_fixture_gives_the_expected_findings() {
    let expected =
        std::fs::read_to_string(fixtures().join("expected.jsonl")).expect("expected.jsonl");
    let mut failures = Vec::new();
    let mut checked = 0;
    for line in expected.lines().filter(|l| !l.trim().is_empty()) {
        let want: serde_json::Value = serde_json::from_str(line).expect("valid JSON line");
        let file = want["file"].as_str().expect("file");
        let report = match parse_file(&fixtures().join(file)) {
            Ok(r) => r,
            Err(e) => {
                failures.push(format!("{file}: {e}"));
                continue;
            }
        };
        let kind = serde_json::to_value(report.kind).expect("kind serializes");
        if kind != want["kind"] {
            failures.push(format!("{file}: kind {kind} != {}", want["kind"]));
        }
        let rows = want["results"].as_array().expect("results");
        if rows.len() != report.results.len() {
            failures.push(format!(
                "{file}: {} findings, expected {}",
                report.results.len(),
                rows.len()
            ));
        }
        for row in rows {
            let rcpt = row["recipient"].as_str();
            let found = report.results.iter().find(|f| match rcpt {
                Some(r) => f
                    .recipient
                    .as_deref()
                    .is_some_and(|g| g.eq_ignore_ascii_case(r)),
                None => true,
            });
            let Some(f) = found else {
                failures.push(format!("{file}: no finding for {rcpt:?}"));
                continue;
            };
            if class_name(f.class) != row["class"].as_str().unwrap_or("") {
                failures.push(format!(
                    "{file}: {rcpt:?} class {:?}, expected {}",
                    f.class, row["class"]
                ));
            }
            if f.status.as_deref() != row["status"].as_str() {
                failures.push(format!(
                    "{file}: {rcpt:?} status {:?}, expected {}",
                    f.status, row["status"]
                ));
            }
            checked += 1;
        }
    }
    assert!(
        checked >= 50,
        "only {checked} findings checked: fixtures missing?"
    );
    assert!(
        failures.is_empty(),
        "{} mismatches:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn bytes_that_are_not_mail_are_an_error() {
    assert!(matches!(
        parse(b"\x00\x01 binary junk"),
        Err(ParseError::NotAnEmail)
    ));
    assert!(matches!(
        parse(b"hello world\n"),
        Err(ParseError::NotAnEmail)
    ));
    let missing = parse_file(Path::new("/nonexistent/bounce.eml"));
    assert!(matches!(missing, Err(ParseError::Read { .. })));
}

#[test]
fn a_human_mail_is_not_a_bounce() {
    let raw = b"From: Bob <bob@example.com>\r\nTo: news@example.org\r\nSubject: Hello\r\n\r\nThe user unknown to me says hi.\r\n";
    let report = parse(raw).expect("a mail");
    assert_eq!(report.kind, Kind::NotBounce);
    assert!(report.results.is_empty());
    assert_eq!(report.from.as_deref(), Some("bob@example.com"));
    assert_eq!(report.envelope_to, vec!["news@example.org".to_string()]);
}

#[test]
fn report_carries_envelope_and_original_headers() {
    let report = parse_file(&fixtures().join("synthetic-dsn-two-recipients.eml")).expect("parses");
    assert_eq!(
        report.envelope_to,
        vec!["bounces+c42.r7@mail.example.org".to_string()]
    );
    assert!(report
        .original_headers
        .iter()
        .any(|(n, v)| n == "X-Blast-Recipient" && v == "r7"));
    assert_eq!(
        report.subject.as_deref(),
        Some("Undelivered Mail Returned to Sender")
    );
    assert_eq!(report.results[0].reason, "userunknown");
    assert_eq!(
        report.results[0].remote_mta.as_deref(),
        Some("mx.example.net")
    );
    assert_eq!(report.results[1].reason, "mailboxfull");
}

#[test]
fn qmail_text_bounce_splits_recipients() {
    let raw = b"From: MAILER-DAEMON@mx.example.org\nTo: news@example.org\nSubject: failure notice\n\n\
Hi. This is the qmail-send program at mx.example.org.\n\
I'm afraid I wasn't able to deliver your message to the following addresses.\n\n\
<a@example.net>:\n192.0.2.1 does not like recipient.\nRemote host said: 550 5.1.1 No such user\n\n\
<b@example.net>:\n192.0.2.1 does not like recipient.\nRemote host said: 552 5.2.2 Mailbox is full\n\n\
--- Below this line is a copy of the message.\n\nFrom: news@example.org\nTo: a@example.net\nX-Blast-Campaign: 9\n\nhi\n";
    let report = parse(raw).expect("a mail");
    assert_eq!(report.kind, Kind::Bounce);
    let got: Vec<_> = report
        .results
        .iter()
        .map(|f| {
            (
                f.recipient.clone().unwrap_or_default(),
                f.class,
                f.status.clone().unwrap_or_default(),
            )
        })
        .collect();
    assert_eq!(
        got,
        vec![
            ("a@example.net".into(), Class::Hard, "5.1.1".into()),
            ("b@example.net".into(), Class::Soft, "5.2.2".into()),
        ]
    );
    assert_eq!(
        report.original_headers[2],
        ("X-Blast-Campaign".into(), "9".into())
    );
}

/// A DSN (multipart/report) for `rcpt` with this status and diagnostic,
/// as Postfix writes one; written for these tests (and classify's).
pub(crate) fn synthetic_dsn(rcpt: &str, status: &str, diagnostic: &str) -> Vec<u8> {
    format!(
        "From: MAILER-DAEMON@relay.example.org\r\nTo: news@example.org\r\n\
Subject: Undelivered Mail Returned to Sender\r\nMIME-Version: 1.0\r\n\
Content-Type: multipart/report; report-type=delivery-status; boundary=\"b1\"\r\n\r\n\
--b1\r\nContent-Type: text/plain\r\n\r\nYour message could not be delivered.\r\n\r\n\
--b1\r\nContent-Type: message/delivery-status\r\n\r\nReporting-MTA: dns; relay.example.org\r\n\r\n\
Final-Recipient: rfc822; {rcpt}\r\nAction: failed\r\nStatus: {status}\r\n\
Diagnostic-Code: smtp; {diagnostic}\r\n\r\n--b1--\r\n"
    )
    .into_bytes()
}

/// `(recipient, class, reason)` of every finding.
fn findings(raw: &[u8]) -> Vec<(String, Class, String)> {
    parse(raw)
        .expect("a mail")
        .results
        .into_iter()
        .map(|f| (f.recipient.unwrap_or_default(), f.class, f.reason))
        .collect()
}

/// Issue 13 part 11: "no such user" and "no such domain" in a vendor's own
/// words, under a generic status, are hard.
#[test]
fn vendor_worded_unknown_users_and_domains_are_hard() {
    for diagnostic in [
        "550 Requested action not taken: addressee not found",
        "554 delivery error: dd This account has been closed - mx.example.net",
        "550 #5.1.0 Address rejected: nonexistent mailbox",
        "550 The e-mail address was not found in the recipient's e-mail system",
        "550 Unknown local-part \"zed\" in domain",
        "553 No such host exists for this address",
        "550 Domain name does not exist in our records",
    ] {
        let got = findings(&synthetic_dsn("zed@example.net", "5.0.0", diagnostic));
        assert_eq!(got.len(), 1, "{diagnostic}");
        assert_eq!(got[0].1, Class::Hard, "{diagnostic}: {got:?}");
    }
}

/// Issue 13 part 11: a mailbox that is full, suspended or on hold exists,
/// and may take mail again: soft, even under a 5.1.1 some servers send.
#[test]
fn full_suspended_or_held_mailboxes_are_soft() {
    for diagnostic in [
        "552 The recipient's mailbox has exceeded its storage allocation",
        "550 5.1.1 Mailbox on hold: the owner has not logged in",
        "550 This mailbox is frozen by the administrator",
        "550 Recipient account is locked",
        "550 Mailbox temporarily unavailable",
        "554 The account has been suspended",
    ] {
        let got = findings(&synthetic_dsn("zed@example.net", "5.1.1", diagnostic));
        assert_eq!(got[0].1, Class::Soft, "{diagnostic}: {got:?}");
    }
}

/// Issue 13 part 11: a domain that takes no mail (null MX, RFC 7505) is
/// hard, also in Google's "DNS Error" wording.
#[test]
fn null_mx_and_no_mail_domains_are_hard() {
    for (status, diagnostic) in [
        ("5.1.10", "550 5.1.10 DNS Error: the domain example.net doesn't receive email according to the administrator: returned NULL MX"),
        ("5.0.0", "556 Recipient domain does not accept mail"),
        ("5.0.0", "550 example.net: this domain accepts no mail"),
    ] {
        let got = findings(&synthetic_dsn("zed@example.net", status, diagnostic));
        assert_eq!(
            (got[0].1, got[0].2.as_str()),
            (Class::Hard, "notaccept"),
            "{diagnostic}"
        );
    }
}

/// Issue 13 part 11: an ARF report naming several recipients (one
/// `Original-Rcpt-To` each, or several in one field) gives one complaint
/// per recipient.
#[test]
fn arf_report_with_several_recipients_names_them_all() {
    let raw = b"From: feedback@isp.example\r\nTo: abuse@example.org\r\nSubject: Abuse report\r\n\
MIME-Version: 1.0\r\nContent-Type: multipart/report; report-type=feedback-report; boundary=\"f\"\r\n\r\n\
--f\r\nContent-Type: text/plain\r\n\r\nThree users marked this as spam.\r\n\r\n\
--f\r\nContent-Type: message/feedback-report\r\n\r\nFeedback-Type: abuse\r\nUser-Agent: Report/1.0\r\n\
Version: 1\r\nOriginal-Rcpt-To: <one@isp.example>\r\nOriginal-Rcpt-To: two@isp.example, three@isp.example\r\n\r\n\
--f\r\nContent-Type: text/rfc822-headers\r\n\r\nFrom: news@example.org\r\nTo: one@isp.example\r\n\r\n--f--\r\n";
    let got = findings(raw);
    let rcpts: Vec<&str> = got.iter().map(|g| g.0.as_str()).collect();
    assert_eq!(
        rcpts,
        ["one@isp.example", "two@isp.example", "three@isp.example"]
    );
    assert!(got.iter().all(|g| g.1 == Class::Other && g.2 == "feedback"));
}

/// Issue 13 part 11: plain-text notices of older MTAs name the recipient on
/// a line of their own; each is found, with its class.
#[test]
fn older_mta_plain_text_recipient_lines_are_found() {
    let cases: [(&str, &[u8], Class); 4] = [
        (
            "exim",
            b"From: Mail Delivery System <Mailer-Daemon@mx.example.org>\nTo: news@example.org\n\
Subject: Mail delivery failed: returning message to sender\n\n\
This message was created automatically by mail delivery software.\n\n\
A message that you sent could not be delivered to one or more of its\n\
recipients. This is a permanent error. The following address(es) failed:\n\n\
  zed@example.net\n    SMTP error from remote mail server after RCPT TO:<zed@example.net>:\n\
    host mx.example.net [192.0.2.7]: 550 No such mailbox here\n\n\
------ This is a copy of the message, including all the headers. ------\n\n\
From: news@example.org\nTo: zed@example.net\n\nhi\n",
            Class::Hard,
        ),
        (
            "qmail",
            b"From: MAILER-DAEMON@mx.example.org\nTo: news@example.org\nSubject: failure notice\n\n\
Hi. This is the qmail-send program at mx.example.org.\n\
I'm afraid I wasn't able to deliver your message to the following addresses.\n\
This is a permanent error; I've given up. Sorry it didn't work out.\n\n\
<zed@example.net>:\nSorry, no mailbox here by that name. (#5.1.1)\n\n\
--- Below this line is a copy of the message.\n\nFrom: news@example.org\nTo: zed@example.net\n\nhi\n",
            Class::Hard,
        ),
        (
            "domino",
            b"From: Postmaster@notes.example.net\nTo: news@example.org\n\
Subject: DELIVERY FAILURE: User zed (zed@example.net) not listed in Domino Directory\n\n\
Your message\n\n  Subject: Our news\n\nwas not delivered to:\n\n  zed@example.net\n\n\
because:\n\n  User zed (zed@example.net) not listed in Domino Directory\n",
            Class::Hard,
        ),
        (
            "dragonfly",
            b"From: MAILER-DAEMON@host.example.org\nTo: news@example.org\nSubject: Mail delivery failed\n\n\
This is the DragonFly Mail Agent v0.13 at host.example.org.\n\n\
There was an error delivering your mail to <zed@example.net>.\n\n\
mx.example.net [192.0.2.9] did not like our RCPT TO:\n\
552 5.2.2 Mailbox full\n\nOriginal message follows.\n\nFrom: news@example.org\n\nhi\n",
            Class::Soft,
        ),
    ];
    for (mta, raw, class) in cases {
        let got = findings(raw);
        assert_eq!(got.len(), 1, "{mta}: {got:?}");
        assert_eq!(got[0].0, "zed@example.net", "{mta}: {got:?}");
        assert_eq!(got[0].1, class, "{mta}: {got:?}");
    }
}
