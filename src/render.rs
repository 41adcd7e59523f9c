//! Templates → one finished message per recipient. Templates are compiled once
//! per campaign ([`Renderer::compile`]); [`Renderer::render`] is pure, sync and
//! cheap, with no database or network. Subscriber data is untrusted: it is only
//! ever a template *value* (never template source), HTML parts auto-escape it,
//! and every header value is flattened to one line before MIME encoding so a
//! CR/LF in a name can never start a new header.

use std::borrow::Cow;

use mail_builder::headers::address::Address;
use mail_builder::headers::date::Date;
use mail_builder::headers::raw::Raw;
use mail_builder::headers::text::Text;
use mail_builder::mime::MimePart;
use mail_builder::MessageBuilder;
use serde_json::{Map, Value};
use tera::{Context, Tera};

use crate::config::{address_part, MessageConfig, Unsubscribe};
use crate::error::{Error, Result};
use crate::model::{Envelope, Outgoing, Recipient};
use crate::sign::{Key, Pattern, Var};

const SUBJECT: &str = "message.subject";
const TO_NAME: &str = "message.to_name";
const ENVELOPE_FROM: &str = "delivery.envelope_from";

/// One recipient's rendered templates, before MIME encoding. Header values
/// are already flattened to one line.
#[derive(Debug, Clone)]
pub struct Parts {
    /// Envelope recipient, ASCII form.
    pub rcpt: String,
    /// Envelope sender, ASCII form.
    pub envelope_from: String,
    /// Display name for `To:`, if any.
    pub to_name: Option<String>,
    /// Subject.
    pub subject: String,
    /// Extra headers.
    pub headers: Vec<(String, String)>,
    /// The HMAC over campaign and recipient (VERP and `X-Blast-Sig`).
    pub sig: String,
    /// The recipient's signed one-click unsubscribe URL.
    pub unsubscribe_url: String,
    /// The recipient's signed unsubscribe address.
    pub unsubscribe_mailto: String,
    /// Plain-text part.
    pub text: Option<String>,
    /// HTML part.
    pub html: Option<String>,
}

/// Why one recipient's message could not be built. Recorded as that
/// recipient's failure; the campaign continues.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RenderError {
    /// The recipient's address is unusable (no SMTP round trip is attempted).
    #[error("invalid address {address:?}: {reason}")]
    InvalidAddress {
        /// The address as found.
        address: String,
        /// Why it is rejected.
        reason: String,
    },
    /// A template failed for this recipient (e.g. a missing variable).
    #[error("template {template}: {message}")]
    Template {
        /// Which template.
        template: String,
        /// Tera's message.
        message: String,
    },
    /// The rendered envelope sender is not an address.
    #[error("envelope_from rendered to {0:?}, which is not an address")]
    EnvelopeFrom(String),
    /// The recipient's row cannot be used (e.g. a JSON column that does
    /// not parse).
    #[error("{0}")]
    Row(String),
    /// The MIME message could not be written: nothing is sent rather than
    /// an empty or truncated message.
    #[error("building the MIME message: {0}")]
    Mime(String),
}

/// Identity used to build stable Message-IDs.
#[derive(Debug, Clone, Default)]
pub struct Identity {
    /// Campaign name (for `X-Blast-Campaign`).
    pub campaign: String,
    /// The campaign's ledger id (0 in previews of a campaign never run).
    pub campaign_id: i64,
    /// The installation's signing key (VERP, `X-Blast-Sig`, unsubscribe
    /// tokens). `None` only in benches and unit tests, which sign with an
    /// all-zero key.
    pub key: Option<Key>,
}

/// A campaign's compiled templates and fixed headers.
pub struct Renderer {
    tera: Tera,
    text: Option<String>,
    html: Option<String>,
    headers: Vec<(String, String)>,
    from_name: Option<String>,
    from_addr: String,
    reply_to: Option<String>,
    has_to_name: bool,
    identity: Identity,
    key: Key,
    msgid_domain: String,
    verp: Option<Pattern>,
    unsubscribe: Unsubscribe,
    /// Every relay offers 8BITMIME: non-ASCII parts go as `8bit` (no
    /// encoding at all) when their lines allow it.
    eight_bit: std::sync::atomic::AtomicBool,
}

impl Renderer {
    /// Compiles every template of `message`; any syntax error aborts here,
    /// before the first message, naming the file and line.
    pub fn compile(
        message: &MessageConfig,
        vars: &Map<String, Value>,
        identity: Identity,
    ) -> Result<Renderer> {
        let mut tera = Tera::new();
        // A NULL column is "no value" to an operator: let `default` fill it.
        tera.register_filter("default", default_filter);
        // Autoescape exactly the HTML template (whatever its file suffix).
        let html_name = message.html.as_ref().map(|t| format!("{} (html)", t.name));
        tera.autoescape_on(html_name.clone().into_iter().collect::<Vec<_>>());
        tera.set_escape_fn(escape_html);
        let mut add = |name: &str, body: &str| {
            tera.add_raw_template(name, body)
                .map_err(|e| Error::Template {
                    name: name.to_string(),
                    message: e.to_string(),
                })
        };
        add(SUBJECT, &message.subject)?;
        add(ENVELOPE_FROM, &message.envelope_from)?;
        if let Some(t) = &message.to_name {
            add(TO_NAME, t)?;
        }
        let text = match &message.text {
            Some(t) => {
                add(&t.name, &t.body)?;
                Some(t.name.clone())
            }
            None => None,
        };
        if let (Some(t), Some(name)) = (&message.html, &html_name) {
            add(name, &t.body)?;
        }
        let mut headers = Vec::new();
        for (h, v) in &message.headers {
            let name = format!("message.headers.{h}");
            add(&name, v)?;
            headers.push((h.clone(), name));
        }
        let global = tera.global_context();
        for (k, v) in vars {
            global.insert(k.clone(), v);
        }
        global.insert("campaign", &identity.campaign);

        let from_addr = address_part(&message.from).to_string();
        let from_addr = ascii_address(&from_addr).map_err(|reason| {
            Error::config(
                "<campaign>",
                "message.from",
                format!("{from_addr:?}: {reason}"),
            )
        })?;
        let from_name = display_name(&message.from);
        let msgid_domain = from_addr
            .rsplit_once('@')
            .map(|(_, d)| d.to_string())
            .unwrap_or_default();
        Ok(Renderer {
            tera,
            text,
            html: html_name,
            headers,
            from_name,
            from_addr,
            reply_to: message.reply_to.clone(),
            has_to_name: message.to_name.is_some(),
            key: identity.key.clone().unwrap_or_else(zero_key),
            identity,
            msgid_domain,
            verp: message.verp.clone(),
            unsubscribe: message.unsubscribe.clone(),
            eight_bit: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Lets non-ASCII text and HTML parts go as `8bit` (set when every
    /// relay offered 8BITMIME; the transport then says `BODY=8BITMIME`).
    /// Off by default: quoted-printable, which any server takes.
    pub fn allow_8bit(&self, on: bool) {
        self.eight_bit
            .store(on, std::sync::atomic::Ordering::Relaxed);
    }

    /// Sets the ledger id (Message-IDs, VERP, tokens) and the signing key
    /// once the campaign row exists.
    pub fn set_campaign(&mut self, id: i64, key: Key) {
        self.identity.campaign_id = id;
        self.key = key;
    }

    /// Builds `recipient`'s message: [`Renderer::render_parts`] then
    /// [`Renderer::build`].
    pub fn render(
        &self,
        recipient: &Recipient,
        now: time::OffsetDateTime,
    ) -> std::result::Result<Outgoing, RenderError> {
        let parts = self.render_parts(recipient)?;
        self.build(recipient, parts, now)
    }

    /// Runs the templates for `recipient` (no MIME yet).
    pub fn render_parts(&self, recipient: &Recipient) -> std::result::Result<Parts, RenderError> {
        if let Some(why) = &recipient.broken {
            return Err(RenderError::Row(why.clone()));
        }
        let rcpt =
            ascii_address(&recipient.email).map_err(|reason| RenderError::InvalidAddress {
                address: recipient.email.clone(),
                reason,
            })?;
        let mut ctx = Context::new();
        for (k, v) in &recipient.vars {
            ctx.insert(k.clone(), v);
        }
        ctx.insert("id", &recipient.id);
        ctx.insert("email", &recipient.email);
        let campaign_id = self.identity.campaign_id;
        let token = self.key.token(campaign_id, recipient.id);
        let unsubscribe_url = self.unsubscribe.url.fill(|_| token.clone());
        let unsubscribe_mailto = self.unsubscribe.mailto.fill(|_| token.clone());
        let sig = self.key.verp_sig(campaign_id, recipient.id);
        ctx.insert("unsubscribe_url", &unsubscribe_url);

        let render = |name: &str| {
            self.tera
                .render(name, &ctx)
                .map_err(|e| RenderError::Template {
                    template: name.to_string(),
                    message: e.to_string(),
                })
        };
        let subject = one_line(&render(SUBJECT)?);
        let envelope_from = match &self.verp {
            Some(p) => p.fill(|v| match v {
                Var::Campaign => campaign_id.to_string(),
                Var::Recipient => recipient.id.to_string(),
                _ => sig.clone(),
            }),
            None => one_line(&render(ENVELOPE_FROM)?),
        };
        let envelope_from =
            ascii_address(&envelope_from).map_err(|_| RenderError::EnvelopeFrom(envelope_from))?;
        let to_name = match self.has_to_name {
            true => Some(display_len(one_line(&render(TO_NAME)?))).filter(|n| !n.is_empty()),
            false => None,
        };
        let mut headers = Vec::with_capacity(self.headers.len());
        for (h, tpl) in &self.headers {
            headers.push((h.clone(), one_line(&render(tpl)?)));
        }
        let text = self.text.as_deref().map(render).transpose()?;
        let html = self.html.as_deref().map(render).transpose()?;
        Ok(Parts {
            rcpt,
            envelope_from,
            to_name,
            subject,
            headers,
            sig,
            unsubscribe_url,
            unsubscribe_mailto,
            text,
            html,
        })
    }

    /// Builds the MIME message from rendered parts.
    pub fn build(
        &self,
        recipient: &Recipient,
        parts: Parts,
        now: time::OffsetDateTime,
    ) -> std::result::Result<Outgoing, RenderError> {
        let message_id = format!(
            "{}.{}.{}@{}",
            self.identity.campaign_id,
            recipient.id,
            now.unix_timestamp(),
            self.msgid_domain
        );
        let from = Address::new_address(
            self.from_name.as_deref().map(Cow::Borrowed),
            Cow::Borrowed(self.from_addr.as_str()),
        );
        let to = Address::new_address(
            parts.to_name.map(Cow::Owned),
            Cow::Borrowed(parts.rcpt.as_str()),
        );
        let mut b = MessageBuilder::new()
            .from(from)
            .to(to)
            .subject(parts.subject)
            .date(Date::new(now.unix_timestamp()))
            .message_id(message_id)
            .header(
                "X-Blast-Campaign",
                Text::new(self.identity.campaign.as_str()),
            )
            .header("X-Blast-Recipient", Text::new(recipient.id.to_string()))
            .header("X-Blast-Sig", Raw::new(parts.sig.as_str()))
            // RFC 2369 + RFC 8058: mailbox providers show an unsubscribe
            // button and POST to the URL with no further step.
            .header(
                "List-Unsubscribe",
                Raw::new(format!(
                    "<mailto:{}>, <{}>",
                    parts.unsubscribe_mailto, parts.unsubscribe_url
                )),
            )
            .header(
                "List-Unsubscribe-Post",
                Raw::new("List-Unsubscribe=One-Click"),
            );
        if let Some(r) = &self.reply_to {
            b = b.reply_to(Address::new_address(
                display_name(r).map(Cow::Owned),
                Cow::Borrowed(address_part(r)),
            ));
        }
        for (h, v) in parts.headers {
            b = b.header(h, Text::new(v));
        }
        let eight_bit = self.eight_bit.load(std::sync::atomic::Ordering::Relaxed);
        let text = parts
            .text
            .map(|t| body_part("text/plain", &t, eight_bit))
            .transpose()?;
        let html = parts
            .html
            .map(|h| body_part("text/html", &h, eight_bit))
            .transpose()?;
        b = match (text, html) {
            (Some(t), Some(h)) => b.body(MimePart::new("multipart/alternative", vec![t, h])),
            (Some(p), None) | (None, Some(p)) => b.body(p),
            (None, None) => b,
        };
        // Never an empty or truncated message: an error is the recipient's
        // (unrendered, built again by the next pass).
        let bytes = b
            .write_to_vec()
            .map_err(|e| RenderError::Mime(e.to_string()))?;
        if bytes.is_empty() {
            return Err(RenderError::Mime("the message came out empty".into()));
        }
        Ok(Outgoing {
            envelope: Envelope {
                recipient_id: recipient.id,
                from: parts.envelope_from,
                to: parts.rcpt,
            },
            email: recipient.email.clone(),
            bytes,
        })
    }
}

/// The key used before [`Renderer::set_campaign`] (benches, unit tests).
fn zero_key() -> Key {
    Key::from_hex(&"0".repeat(64)).unwrap_or_else(|| unreachable!("64 hex digits"))
}

/// A text part with its transfer encoding chosen and applied here: `7bit`
/// when the text is ASCII with lines of at most 998 octets (no encoding work
/// at all), quoted-printable otherwise. mail-builder would pick the same
/// encodings but encodes byte by byte through `io::Write`, which was a
/// quarter of blast's CPU per message.
fn body_part(
    content_type: &'static str,
    text: &str,
    eight_bit: bool,
) -> std::result::Result<MimePart<'static>, RenderError> {
    let mut out = Vec::with_capacity(text.len() + text.len() / 16 + 8);
    let encoding = if seven_bit(text, &mut out) {
        "7bit"
    } else if eight_bit && {
        out.clear();
        short_lines(text, &mut out)
    } {
        // RFC 6152: UTF-8 as it is, lines of at most 998 octets; Postfix
        // converts it for a next hop without 8BITMIME.
        "8bit"
    } else {
        out.clear();
        quoted_printable(text, &mut out);
        "quoted-printable"
    };
    // The text was UTF-8 and every encoding keeps it so; anything else is a
    // bug, and no message goes out with a part missing.
    let body = String::from_utf8(out)
        .map_err(|_| RenderError::Mime(format!("the {content_type} part is not UTF-8")))?;
    let content_type = mail_builder::headers::content_type::ContentType::new(content_type)
        .attribute("charset", "utf-8");
    Ok(MimePart::new(content_type, body).transfer_encoding(encoding))
}

/// Copies `text` with CRLF line ends if it can travel as `7bit` (RFC 2045:
/// ASCII, no NUL, no lone CR, lines of at most 998 octets); false otherwise.
fn seven_bit(text: &str, out: &mut Vec<u8>) -> bool {
    // Whole-text check first: vectorised in std.
    text.is_ascii() && short_lines(text, out)
}

/// Copies `text` with CRLF line ends if it can travel as `8bit` (RFC 6152:
/// no NUL, no lone CR, lines of at most 998 octets); false otherwise.
fn short_lines(text: &str, out: &mut Vec<u8>) -> bool {
    if text.contains('\0') {
        return false;
    }
    for line in text.split('\n') {
        let line = line.strip_suffix('\r').unwrap_or(line);
        if line.len() > 998 || line.contains('\r') {
            return false;
        }
        out.extend_from_slice(line.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    true
}

/// RFC 2045 quoted-printable with CRLF line ends and lines of at most 76
/// characters (soft breaks `=` CRLF).
pub fn quoted_printable(text: &str, out: &mut Vec<u8>) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let bytes = text.as_bytes();
    let mut line = 0;
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        let crlf = b == b'\r' && bytes.get(i + 1) == Some(&b'\n');
        if b == b'\n' || crlf {
            out.extend_from_slice(b"\r\n");
            line = 0;
            i += if crlf { 2 } else { 1 };
            continue;
        }
        // Whitespace before a line end must be encoded or it may be stripped.
        let at_eol = match bytes.get(i + 1) {
            None | Some(b'\n') => true,
            Some(b'\r') => bytes.get(i + 2) == Some(&b'\n'),
            _ => false,
        };
        let literal =
            ((b == b' ' || b == b'\t') && !at_eol) || ((33..=126).contains(&b) && b != b'=');
        let width = if literal { 1 } else { 3 };
        if line + width > 75 {
            out.extend_from_slice(b"=\r\n");
            line = 0;
        }
        if literal {
            out.push(b);
        } else {
            out.extend_from_slice(&[b'=', HEX[(b >> 4) as usize], HEX[(b & 15) as usize]]);
        }
        line += width;
        i += 1;
    }
}

/// HTML-escapes `input` into `out` as Tera's own escaper does (`&`, `<`,
/// `>`, `"` and `'`), but copies the runs between special characters
/// whole: Tera's writes every byte on its own through `dyn Write`, which
/// was 9% of blast's CPU per message (campaign-wide article summaries are
/// escaped again for every recipient).
fn escape_html(input: &str, out: &mut dyn std::io::Write) -> std::io::Result<()> {
    let bytes = input.as_bytes();
    let mut start = 0;
    for (i, b) in bytes.iter().enumerate() {
        let entity: &[u8] = match b {
            b'&' => b"&amp;",
            b'<' => b"&lt;",
            b'>' => b"&gt;",
            b'"' => b"&quot;",
            b'\'' => b"&#39;",
            _ => continue,
        };
        out.write_all(&bytes[start..i])?;
        out.write_all(entity)?;
        start = i + 1;
    }
    out.write_all(&bytes[start..])
}

/// Tera's `default`, but a null value (a NULL column) counts as missing too,
/// as it does for an operator writing `{{ city | default(value="") }}`.
fn default_filter(
    val: tera::Value,
    kwargs: tera::Kwargs,
    _: &tera::State<'_>,
) -> tera::TeraResult<tera::Value> {
    let fallback = kwargs.must_get::<tera::Value>("value")?;
    let boolean = kwargs.get::<bool>("boolean")?.unwrap_or_default();
    let missing = if boolean {
        !val.is_truthy()
    } else {
        matches!(
            val.kind(),
            tera::value::ValueKind::Undefined | tera::value::ValueKind::None
        )
    };
    Ok(if missing { fallback } else { val })
}

/// Flattens a rendered header value to one line: CR, LF, tabs and other
/// control characters become single spaces. This is what stops `"Bob\r\nBcc:
/// x"` in a subscriber's name from adding a header.
pub fn one_line(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut space = false;
    for c in s.trim().chars() {
        if c.is_control() || c.is_whitespace() {
            space = true;
        } else {
            if space && !out.is_empty() {
                out.push(' ');
            }
            space = false;
            out.push(c);
        }
    }
    out
}

/// Longest display name in `To:`, in characters. The address header is
/// written as one encoded word, which is not folded: a subscriber's name of
/// a thousand characters made a line longer than RFC 5322's 998 (found by
/// the property tests). 64 characters encode to at most about 800 bytes.
const MAX_DISPLAY_NAME: usize = 64;

/// `name` cut to [`MAX_DISPLAY_NAME`] characters.
fn display_len(name: String) -> String {
    match name.char_indices().nth(MAX_DISPLAY_NAME) {
        Some((at, _)) => name[..at].trim_end().to_string(),
        None => name,
    }
}

/// `"Name" <a@b>` → `Name`; `a@b` → None.
fn display_name(s: &str) -> Option<String> {
    let lt = s.rfind('<')?;
    let name = one_line(s[..lt].trim().trim_matches('"'));
    (!name.is_empty()).then_some(name)
}

/// Validates an address for the SMTP envelope by blast's one rule
/// ([`crate::address`]) and returns its ASCII form: IDN domains become
/// punycode (`bücher.example` → `xn--bcher-kva.example`). A non-ASCII local
/// part would need SMTPUTF8 and is refused.
pub fn ascii_address(s: &str) -> std::result::Result<String, String> {
    crate::address::Address::parse(s)
        .map(|a| a.envelope())
        .map_err(|e| e.to_string())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::config::TemplateSource;

    /// A message config with these templates, for tests (and crate::props).
    pub(crate) fn message(subject: &str, text: Option<&str>, html: Option<&str>) -> MessageConfig {
        MessageConfig {
            from: "Blast News <news@example.com>".into(),
            reply_to: None,
            to_name: Some("{{ name }}".into()),
            subject: subject.into(),
            text: text.map(|b| TemplateSource {
                name: "t.txt".into(),
                body: b.into(),
            }),
            html: html.map(|b| TemplateSource {
                name: "t.html".into(),
                body: b.into(),
            }),
            headers: vec![("X-Tag".into(), "tag-{{ id }}".into())],
            envelope_from: "bounces+{{ id }}@example.com".into(),
            verp: None,
            unsubscribe: Unsubscribe {
                url: Pattern::parse("https://lists.example.com/u/{token}", &[Var::Token]).unwrap(),
                mailto: Pattern::parse("unsubscribe+{token}@example.com", &[Var::Token]).unwrap(),
            },
        }
    }

    fn recipient(id: i64, email: &str, name: &str) -> Recipient {
        let mut vars = Map::new();
        vars.insert("name".into(), Value::String(name.into()));
        Recipient::new(id, email, vars)
    }

    /// Renders `r` with `m` for campaign 1 (all-zero key).
    pub(crate) fn render(
        m: &MessageConfig,
        r: &Recipient,
    ) -> std::result::Result<Outgoing, RenderError> {
        let vars = Map::new();
        Renderer::compile(
            m,
            &vars,
            Identity {
                campaign: "c".into(),
                campaign_id: 1,
                key: None,
            },
        )
        .unwrap()
        .render(r, crate::clock::now())
    }

    fn headers(bytes: &[u8]) -> String {
        let s = String::from_utf8_lossy(bytes);
        s.split("\r\n\r\n").next().unwrap().to_string()
    }

    #[test]
    fn hostile_names_cannot_add_headers() {
        let m = message("Hi {{ name }}", Some("Hello {{ name }}"), None);
        let r = recipient(
            7,
            "a@example.com",
            "Eve\r\nBcc: victim@example.com\r\n\r\nbody",
        );
        let out = render(&m, &r).unwrap();
        let h = headers(&out.bytes);
        for line in h.split("\r\n") {
            assert!(
                !line.to_ascii_lowercase().starts_with("bcc:"),
                "header injected: {h}"
            );
        }
        assert_eq!(out.envelope.to, "a@example.com");
        assert_eq!(out.envelope.from, "bounces+7@example.com");
        assert!(h.contains("X-Tag: tag-7"), "{h}");
    }

    #[test]
    fn template_syntax_in_data_is_printed_not_run() {
        let m = message("Hi", Some("Hello {{ name }}"), None);
        let out = render(&m, &recipient(1, "a@example.com", "{{ 7 * 6 }}{% raw %}")).unwrap();
        let msg = String::from_utf8_lossy(&out.bytes);
        // The body only: Date and Message-ID carry timestamps that may hold "42".
        let body = msg.split("\r\n\r\n").nth(1).unwrap_or_default();
        assert_eq!(body.trim_end(), "Hello {{ 7 * 6 }}{% raw %}", "{msg}");
    }

    #[test]
    fn html_escapes_and_both_parts_make_alternative() {
        let m = message("Hi", Some("Hi {{ name }}"), Some("<p>Hi {{ name }}</p>"));
        let out = render(&m, &recipient(1, "a@example.com", "<script>x</script>")).unwrap();
        let s = String::from_utf8_lossy(&out.bytes);
        assert!(s.contains("multipart/alternative"), "{s}");
        assert!(s.contains("&lt;script&gt;"), "{s}");
        assert!(!s.contains("<p>Hi <script>"), "{s}");
    }

    #[test]
    fn non_ascii_subjects_and_idn_domains() {
        let m = message("Grüße, {{ name }}", Some("x"), None);
        let out = render(&m, &recipient(1, "jose@bücher.example", "José")).unwrap();
        assert_eq!(out.envelope.to, "jose@xn--bcher-kva.example");
        let h = headers(&out.bytes);
        assert!(h.is_ascii(), "headers must be 7-bit: {h}");
        assert!(h.contains("Subject: =?utf-8?"), "{h}");
    }

    /// Renders with 8bit allowed (every relay offered 8BITMIME).
    fn render_8bit(m: &MessageConfig, r: &Recipient) -> Outgoing {
        let renderer = Renderer::compile(
            m,
            &Map::new(),
            Identity {
                campaign: "c".into(),
                campaign_id: 1,
                key: None,
            },
        )
        .unwrap();
        renderer.allow_8bit(true);
        renderer.render(r, crate::clock::now()).unwrap()
    }

    #[test]
    fn non_ascii_parts_go_8bit_when_every_relay_takes_it() {
        let m = message("Hi", Some("Grüße, {{ name }}"), Some("<p>Grüße</p>"));
        let out = render_8bit(&m, &recipient(1, "a@example.com", "José"));
        let s = String::from_utf8(out.bytes).unwrap();
        assert_eq!(
            s.matches("Content-Transfer-Encoding: 8bit").count(),
            2,
            "{s}"
        );
        assert!(s.contains("Grüße, José\r\n"), "{s}");
        assert!(!s.contains("quoted-printable"), "{s}");
        let h = headers(s.as_bytes());
        assert!(h.is_ascii(), "headers stay 7-bit: {h}");
        // Without 8BITMIME (the default): quoted-printable.
        let qp = render(&m, &recipient(1, "a@example.com", "José")).unwrap();
        let qp = String::from_utf8(qp.bytes).unwrap();
        assert!(
            qp.contains("quoted-printable") && !qp.contains("8bit"),
            "{qp}"
        );
    }

    #[test]
    fn an_8bit_part_with_a_999_octet_line_falls_back_to_quoted_printable() {
        let m = message("Hi", Some("{{ name }}"), None);
        let long = format!("é{}", "x".repeat(997)); // 999 octets
        let out = render_8bit(&m, &recipient(1, "a@example.com", &long));
        let s = String::from_utf8(out.bytes).unwrap();
        assert!(
            s.contains("Content-Transfer-Encoding: quoted-printable"),
            "{s}"
        );
        assert!(s.split("\r\n").all(|l| l.len() <= 998));
        let ok = format!("é{}", "x".repeat(996)); // 998 octets: 8bit
        let out = render_8bit(&m, &recipient(1, "a@example.com", &ok));
        let s = String::from_utf8(out.bytes).unwrap();
        assert!(s.contains("Content-Transfer-Encoding: 8bit"), "{s}");
    }

    #[test]
    fn missing_variable_is_a_per_recipient_error() {
        let m = message("Hi {{ nickname }}", Some("x"), None);
        let err = render(&m, &recipient(1, "a@example.com", "A")).unwrap_err();
        assert!(matches!(err, RenderError::Template { .. }), "{err}");
        assert!(err.to_string().contains("nickname"), "{err}");
    }

    /// Decodes quoted-printable (test helper).
    fn qp_decode(s: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut i = 0;
        while i < s.len() {
            match s[i] {
                b'=' if s.get(i + 1) == Some(&b'\r') => i += 3,
                b'=' => {
                    let hex = std::str::from_utf8(&s[i + 1..i + 3]).unwrap();
                    out.push(u8::from_str_radix(hex, 16).unwrap());
                    i += 3;
                }
                b => {
                    out.push(b);
                    i += 1;
                }
            }
        }
        out
    }

    #[test]
    fn quoted_printable_round_trips_with_short_lines() {
        let long = "Grüße aus München = 100% ".repeat(20);
        let inputs = [
            "plain\nline two \nend".to_string(),
            long.clone(),
            format!("{long}\r\n\ttab at end\t\n.dot line\n"),
            "trailing space ".into(),
            "é".repeat(60),
        ];
        for input in inputs {
            let mut out = Vec::new();
            quoted_printable(&input, &mut out);
            for line in out.split(|&b| b == b'\n') {
                assert!(
                    line.len() <= 77,
                    "line too long: {}",
                    String::from_utf8_lossy(line)
                );
                let line = line.strip_suffix(b"\r").unwrap_or(line);
                assert!(
                    !line.ends_with(b" ") && !line.ends_with(b"\t"),
                    "trailing whitespace"
                );
            }
            assert!(out.is_ascii());
            let expected = input.replace("\r\n", "\n").replace('\n', "\r\n");
            assert_eq!(String::from_utf8(qp_decode(&out)).unwrap(), expected);
        }
    }

    #[test]
    fn html_escaping_matches_teras_own() {
        for input in [
            "",
            "plain text",
            "<script>alert('x')</script> & \"q\"",
            "&&<<>>''\"\"",
            "Grüße <b>José</b>",
            "end&",
        ] {
            let mut ours = Vec::new();
            escape_html(input, &mut ours).unwrap();
            let mut teras = Vec::new();
            tera::escape_html(input, &mut teras).unwrap();
            assert_eq!(
                String::from_utf8(ours).unwrap(),
                String::from_utf8(teras).unwrap()
            );
        }
    }

    #[test]
    fn seven_bit_only_for_short_ascii_lines() {
        let mut out = Vec::new();
        assert!(seven_bit("a\nb\r\nc", &mut out));
        assert_eq!(out, b"a\r\nb\r\nc\r\n");
        assert!(!seven_bit("caf\u{e9}", &mut Vec::new()));
        assert!(!seven_bit(&"x".repeat(999), &mut Vec::new()));
        assert!(!seven_bit("lone\rcr", &mut Vec::new()));
    }

    #[test]
    fn bad_addresses_are_rejected_before_smtp() {
        for bad in [
            "",
            "no-at",
            "a b@example.com",
            "a@",
            "josé@example.com",
            "a@exa\r\nmple.com",
        ] {
            assert!(ascii_address(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn syntax_errors_name_template_and_line() {
        let m = message("Hi", Some("line one\n{% if %}\n"), None);
        let err = Renderer::compile(&m, &Map::new(), Identity::default())
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("t.txt") && err.contains('2'), "{err}");
    }
}
