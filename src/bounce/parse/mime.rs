//! The MIME layer: raw bytes → a flat list of [`Section`]s in document order.
//!
//! Owns every call into `mail-parser`. The parsers in the sibling modules see
//! only decoded text and field lists, so a change of MIME library stays here.

use mail_parser::{MessageParser, MimeHeaders, PartType};

use super::text;

/// One leaf of a bounce's MIME tree, decoded.
#[derive(Debug)]
pub(crate) enum Section {
    /// A human-readable part (text/plain, or text/html with tags removed).
    Text(String),
    /// A machine-readable delivery report (message/delivery-status).
    Status(String),
    /// An abuse report's machine part (message/feedback-report).
    Feedback(String),
    /// Header fields of the returned message (message/rfc822, *rfc822-headers).
    Original(Vec<(String, String)>),
}

/// A parsed mail: its own header fields and its sections.
#[derive(Debug)]
pub(crate) struct Mail {
    /// Top-level header fields, unfolded, in order.
    pub(crate) headers: Vec<(String, String)>,
    /// Decoded Subject.
    pub(crate) subject: Option<String>,
    /// The leaves of the MIME tree, in order.
    pub(crate) sections: Vec<Section>,
}

impl Mail {
    /// The first value of header `name` (case-insensitive).
    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Every value of header `name`, in order.
    pub(crate) fn headers_named<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.headers
            .iter()
            .filter(move |(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// All human-readable text, parts joined by blank lines.
    pub(crate) fn text(&self) -> String {
        let mut out = String::new();
        for s in &self.sections {
            if let Section::Text(t) = s {
                out.push_str(t);
                out.push_str("\n\n");
            }
        }
        out
    }
}

/// Header names at least one of which a real mail carries.
const MAIL_HEADERS: &[&str] = &[
    "from",
    "to",
    "subject",
    "date",
    "received",
    "message-id",
    "return-path",
    "content-type",
    "mime-version",
    "delivered-to",
];

/// Parses `raw` into a [`Mail`]; `None` when the bytes have no header section.
pub(crate) fn read(raw: &[u8]) -> Option<Mail> {
    let message = MessageParser::default().parse(raw)?;
    let headers = raw_headers(&message);
    let known = headers
        .iter()
        .any(|(n, _)| MAIL_HEADERS.iter().any(|k| n.eq_ignore_ascii_case(k)));
    if !known {
        return None;
    }
    let mut sections = Vec::new();
    collect(&message, &mut sections);
    Some(Mail {
        headers,
        subject: message.subject().map(str::to_string),
        sections,
    })
}

/// Unfolded top-level header fields of `message`, invalid UTF-8 replaced.
fn raw_headers(message: &mail_parser::Message<'_>) -> Vec<(String, String)> {
    let raw = &message.raw_message;
    let Some(root) = message.parts.first() else {
        return Vec::new();
    };
    root.headers
        .iter()
        .map(|h| {
            let bytes = raw
                .get(h.offset_start as usize..h.offset_end as usize)
                .unwrap_or_default();
            let value = String::from_utf8_lossy(bytes);
            (h.name.as_str().to_string(), text::one_line(&value))
        })
        .collect()
}

/// Appends the leaves of `message` to `out`, not descending into returned messages.
fn collect(message: &mail_parser::Message<'_>, out: &mut Vec<Section>) {
    for part in &message.parts {
        let (ctype, subtype) = part
            .content_type()
            .map(|c| {
                (
                    c.ctype().to_ascii_lowercase(),
                    c.subtype().unwrap_or("").to_ascii_lowercase(),
                )
            })
            .unwrap_or_else(|| ("text".into(), "plain".into()));
        match &part.body {
            PartType::Multipart(_) => {}
            PartType::Message(inner) => out.push(Section::Original(raw_headers(inner))),
            body => {
                let (bytes, is_text) = match body {
                    PartType::Text(t) | PartType::Html(t) => (t.as_bytes(), true),
                    PartType::Binary(b) | PartType::InlineBinary(b) => (b.as_ref(), false),
                    _ => continue,
                };
                match leaf(&ctype, &subtype, bytes) {
                    Some(s) => out.push(s),
                    // A multipart whose boundary never occurs is decoded as
                    // text: keep it, the report is in there somewhere.
                    None if is_text => {
                        out.push(Section::Text(String::from_utf8_lossy(bytes).into_owned()))
                    }
                    None => {}
                }
            }
        }
    }
}

/// Turns one decoded leaf into a section by its content type.
fn leaf(ctype: &str, subtype: &str, bytes: &[u8]) -> Option<Section> {
    let text = || String::from_utf8_lossy(bytes).into_owned();
    if subtype.contains("delivery-status") {
        return Some(Section::Status(text()));
    }
    if subtype == "feedback-report" {
        return Some(Section::Feedback(text()));
    }
    if subtype.contains("rfc822-headers") {
        return Some(Section::Original(text::fields(&text())));
    }
    match (ctype, subtype) {
        // An encoded message/rfc822 arrives as bytes: parse it on its own.
        ("message", "rfc822") | ("message", "global") => {
            let inner = MessageParser::default().parse_headers(bytes)?;
            Some(Section::Original(raw_headers(&inner)))
        }
        ("text", "html") => Some(Section::Text(strip_html(&text()))),
        ("text", _) => Some(Section::Text(text())),
        _ => None,
    }
}

/// Crude HTML → text: line breaks for block tags, other tags dropped, basic entities.
pub(crate) fn strip_html(html: &str) -> String {
    let mut out = String::with_capacity(html.len());
    let mut rest = html;
    while let Some(open) = rest.find('<') {
        out.push_str(&rest[..open]);
        let Some(close) = rest[open..].find('>') else {
            rest = &rest[open..];
            break;
        };
        let tag = rest[open + 1..open + close].to_ascii_lowercase();
        if [
            "br", "/p", "p", "/div", "/tr", "li", "/h1", "/h2", "/h3", "/td",
        ]
        .iter()
        .any(|t| {
            tag == *t || tag.starts_with(&format!("{t} ")) || tag.starts_with(&format!("{t}/"))
        }) {
            out.push('\n');
        }
        rest = &rest[open + close + 1..];
    }
    out.push_str(rest);
    out.replace("&nbsp;", " ")
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&amp;", "&")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_without_headers_are_not_mail() {
        assert!(read(b"just some words\nand more\n").is_none());
        assert!(read(b"").is_none());
    }

    #[test]
    fn flattens_a_report_into_sections() {
        let raw = b"From: MAILER-DAEMON@mx.example.org\r\nSubject: =?utf-8?q?Undelivered?=\r\n\
Content-Type: multipart/report; report-type=delivery-status; boundary=b\r\n\r\n\
--b\r\nContent-Type: text/plain\r\n\r\nIt failed.\r\n\
--b\r\nContent-Type: message/delivery-status\r\n\r\nReporting-MTA: dns; mx\r\n\r\nStatus: 5.1.1\r\n\
--b\r\nContent-Type: text/rfc822-headers\r\n\r\nTo: a@example.com\r\nX-Blast-Id: 7\r\n\
--b--\r\n";
        let mail = read(raw).expect("a mail");
        assert_eq!(mail.subject.as_deref(), Some("Undelivered"));
        assert_eq!(mail.header("from"), Some("MAILER-DAEMON@mx.example.org"));
        assert!(matches!(&mail.sections[0], Section::Text(t) if t.contains("It failed")));
        assert!(matches!(&mail.sections[1], Section::Status(s) if s.contains("Status: 5.1.1")));
        match &mail.sections[2] {
            Section::Original(h) => assert_eq!(h[1], ("X-Blast-Id".into(), "7".into())),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn html_is_reduced_to_text() {
        assert_eq!(
            strip_html("<p>a&nbsp;b</p><br/>c &lt;x&gt;"),
            "\na b\n\nc <x>"
        );
    }
}
