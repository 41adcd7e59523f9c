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
