//! Property tests (issue 13): what reads bytes from the outside (the bounce
//! parser, the SMTP reply reader, the CSV importer) and what writes a
//! message from subscribers' data (the MIME renderer) never panic, and never
//! put a bare CR or LF into a header, on arbitrary bytes and Unicode.
//!
//! Owns the runner and case counts; the properties of private code live next
//! to it (`transport::smtp::tests`, `import::tests`) and are run from here
//! too. CI runs [`ci_cases`] of each (a few seconds in all); the long mode
//! is the same tests with more cases: `PROPTEST_CASES=100000 cargo test
//! --release --lib` (`scripts/bench.sh --props`).

use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use serde_json::{Map, Value};

use crate::model::Recipient;

/// Cases per property in CI: `PROPTEST_CASES`, else 2,000.
pub(crate) fn ci_cases() -> u32 {
    cases_from_env(2_000)
}

/// `PROPTEST_CASES` when set to a number, else `default`.
fn cases_from_env(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Runs `test` on `cases` values of `strategy`; panics with the smallest
/// failing value proptest finds.
pub(crate) fn check<S: Strategy>(
    cases: u32,
    strategy: S,
    test: impl Fn(S::Value) -> Result<(), TestCaseError>,
) {
    let mut runner = TestRunner::new(Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    });
    if let Err(e) = runner.run(&strategy, test) {
        panic!("{e}");
    }
}

/// Arbitrary bytes, up to 4 KiB.
pub(crate) fn bytes() -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(any::<u8>(), 0..4096)
}

/// Arbitrary Unicode text with the characters that break mail made likely:
/// CR, LF, NUL, tabs, quotes, `=?`, non-ASCII and long runs.
pub(crate) fn text() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        any::<String>(),
        Just("\r".to_string()),
        Just("\n".to_string()),
        Just("\r\n".to_string()),
        Just("\0".to_string()),
        Just("\t".to_string()),
        Just("=?utf-8?q?x?=".to_string()),
        Just("\"<>,;:".to_string()),
        Just("ü€😀\u{2028}".to_string()),
        "[a-z]{200,1200}",
    ];
    proptest::collection::vec(piece, 0..8).prop_map(|v| v.concat())
}

/// True when every CR in `s` is followed by LF and every LF follows a CR.
pub(crate) fn crlf_only(s: &[u8]) -> bool {
    s.iter().enumerate().all(|(i, &b)| match b {
        b'\r' => s.get(i + 1) == Some(&b'\n'),
        b'\n' => i > 0 && s[i - 1] == b'\r',
        _ => true,
    })
}

/// A delivery report around `middle`, so that arbitrary text reaches the
/// report parser and not just the "not a mail" check.
fn report_around(middle: &str) -> Vec<u8> {
    format!(
        "From: MAILER-DAEMON@mx.example.org\r\nSubject: Undelivered Mail\r\n\
         Content-Type: multipart/report; report-type=delivery-status; boundary=\"b\"\r\n\r\n\
         --b\r\nContent-Type: text/plain\r\n\r\n{middle}\r\n\
         --b\r\nContent-Type: message/delivery-status\r\n\r\nFinal-Recipient: rfc822; {middle}\r\n\
         Status: 5.1.1\r\nDiagnostic-Code: smtp; 550 {middle}\r\n\r\n--b--\r\n"
    )
    .into_bytes()
}

/// The bounce parser on `raw`: no panic, and nothing it reports (which
/// ingest stores and `--json` prints, one per line) holds a line break.
fn bounce_parser_on(raw: &[u8]) -> Result<(), TestCaseError> {
    let Ok(report) = crate::bounce::parse::parse(raw) else {
        return Ok(());
    };
    for f in &report.results {
        for field in [&f.recipient, &f.status, &f.diagnostic, &f.remote_mta] {
            let v = field.as_deref().unwrap_or("");
            prop_assert!(!v.contains(['\r', '\n']), "{f:?}");
        }
    }
    Ok(())
}

/// The bounce parser on arbitrary bytes and on reports with arbitrary text.
fn bounce_parser(cases: u32) {
    check(cases, bytes(), |raw| bounce_parser_on(&raw));
    check(cases, text(), |t| bounce_parser_on(&report_around(&t)));
}

/// The renderer with arbitrary Unicode in a subscriber's attributes, used
/// in the subject, display name, a custom header and both bodies: no panic;
/// the header section has only CRLF line ends; no line is over 998 bytes.
fn renderer(cases: u32) {
    let mut m = crate::render::tests::message(
        "Hi {{ name }} {{ city }}",
        Some("Hello {{ name }}\n{{ city }}"),
        Some("<p>{{ name }}</p>{{ city }}"),
    );
    m.headers = vec![("X-City".into(), "{{ city }} {{ name }}".into())];
    check(cases, (text(), text()), |(name, city)| {
        let mut vars = Map::new();
        vars.insert("name".into(), Value::String(name));
        vars.insert("city".into(), Value::String(city));
        let r = Recipient::new(7, "someone@example.com", vars);
        let Ok(out) = crate::render::tests::render(&m, &r) else {
            return Ok(());
        };
        let end = out
            .bytes
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .unwrap_or(out.bytes.len());
        let head = &out.bytes[..end];
        prop_assert!(crlf_only(head), "{}", String::from_utf8_lossy(head));
        for line in out.bytes.split(|&b| b == b'\n') {
            prop_assert!(line.len() <= 999, "a line of {} bytes", line.len());
        }
        Ok(())
    });
}

/// blast's own MIME writer, read back by a parser none of us wrote
/// (mail-parser): the subject, the `To:` display name, the custom header
/// and both bodies decode to exactly what the templates produced, with the
/// subscriber's data in them, in every transfer encoding (7bit, 8bit,
/// quoted-printable).
fn mime_round_trip(cases: u32) {
    use mail_parser::MessageParser;
    let mut m = crate::render::tests::message(
        "Hi {{ name }}",
        Some("Hello {{ name }}\n{{ city }}"),
        Some("<p>{{ name }}</p>{{ city }}"),
    );
    m.headers = vec![("X-City".into(), "{{ city }}".into())];
    let lines = |s: &str| s.replace("\r\n", "\n").trim_end_matches('\n').to_string();
    check(
        cases,
        (text(), text(), any::<bool>()),
        |(name, city, eight_bit)| {
            let mut vars = Map::new();
            vars.insert("name".into(), Value::String(name.clone()));
            vars.insert("city".into(), Value::String(city.clone()));
            let r = Recipient::new(7, "someone@example.com", vars);
            let Ok(out) = crate::render::tests::render_with(&m, &r, eight_bit) else {
                return Ok(());
            };
            let msg = MessageParser::default()
                .with_minimal_headers()
                .with_address_headers()
                .header_text(mail_parser::HeaderName::Subject)
                .header_text(mail_parser::HeaderName::Other("X-City".into()))
                .parse(&out.bytes)
                .ok_or_else(|| TestCaseError::fail("mail-parser cannot read the message"))?;
            let one = crate::render::one_line;
            prop_assert_eq!(msg.subject().unwrap_or(""), one(&format!("Hi {name}")));
            let display = msg.to().and_then(|a| a.first()).and_then(|a| a.name());
            let want = crate::render::tests::display(&name);
            prop_assert_eq!(
                display.map(|d| d.to_string()),
                want.filter(|w| !w.is_empty())
            );
            let header = msg.header("X-City").and_then(|h| h.as_text()).unwrap_or("");
            prop_assert_eq!(header.trim(), one(&city));
            let text = msg.body_text(0).unwrap_or_default();
            prop_assert_eq!(lines(&text), lines(&format!("Hello {name}\n{city}")));
            let mut html = Vec::new();
            tera::escape_html(&name, &mut html).unwrap_or_default();
            let mut html_city = Vec::new();
            tera::escape_html(&city, &mut html_city).unwrap_or_default();
            let want_html = format!(
                "<p>{}</p>{}",
                String::from_utf8_lossy(&html),
                String::from_utf8_lossy(&html_city)
            );
            prop_assert_eq!(
                lines(&msg.body_html(0).unwrap_or_default()),
                lines(&want_html)
            );
            Ok(())
        },
    );
}

#[test]
fn the_mime_writer_round_trips_through_another_parser() {
    mime_round_trip(ci_cases());
}

#[test]
fn bounce_parser_never_panics_nor_breaks_lines() {
    bounce_parser(ci_cases());
}

#[test]
fn rendered_headers_have_crlf_only_and_short_lines() {
    renderer(ci_cases());
}
