//! Templates → one finished message per recipient. Templates are compiled once
//! per campaign ([`Renderer::compile`]); [`Renderer::render`] is pure, sync and
//! cheap, with no database or network. Subscriber data is untrusted: it is only
//! ever a template *value* (never template source), HTML parts auto-escape it,
//! and every header value is flattened to one line before MIME encoding so a
//! CR/LF in a name can never start a new header.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use serde_json::{Map, Value};
use tera::{Context, Tera};

use crate::config::{address_part, MessageConfig, Unsubscribe};
use crate::error::{Error, Result};
use crate::model::{Envelope, Outgoing, Recipient};
use crate::sign::{Key, Pattern, Var};

mod mime;

pub use mime::quoted_printable;
use mime::Encoding;

const SUBJECT: &str = "message.subject";
const TO_NAME: &str = "message.to_name";
const ENVELOPE_FROM: &str = "delivery.envelope_from";

/// One recipient's rendered header templates and envelope, before MIME
/// encoding (the bodies are rendered straight into a reused buffer). Header
/// values are already flattened to one line.
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
    /// `Reply-To`: display name and ASCII address.
    reply_to: Option<(Option<String>, String)>,
    /// The campaign's name as `X-Blast-Campaign` carries it (one line).
    campaign_header: String,
    has_to_name: bool,
    /// The top-level names the templates read (`None`: not known, every
    /// column goes into the context). A recipient's other columns are not
    /// converted for Tera at all.
    needed: Option<std::collections::HashSet<String>>,
    /// Header templates that read only campaign variables, rendered once:
    /// template name → (value, the names it reads). A recipient with a
    /// column of one of those names gets the template rendered for them.
    fixed: HashMap<String, (String, Vec<String>)>,
    identity: Identity,
    key: Key,
    msgid_domain: String,
    verp: Option<Pattern>,
    /// The VERP pattern filled with the longest values it can take is an
    /// address that needs no normalizing: every recipient's is too (the
    /// values are digits, `-` and hex), so it is not parsed again per
    /// message.
    verp_checked: bool,
    unsubscribe: Unsubscribe,
    /// Every relay offers 8BITMIME: non-ASCII parts go as `8bit` (no
    /// encoding at all) when their lines allow it.
    eight_bit: AtomicBool,
    /// The last message's size: the next one's buffer is allocated once,
    /// at about the size it will need.
    size_hint: AtomicUsize,
}

thread_local! {
    /// A render thread's reused buffers for the text and HTML templates'
    /// output, encoded from there into the message.
    static BODIES: RefCell<(Vec<u8>, Vec<u8>)> = const { RefCell::new((Vec::new(), Vec::new())) };
    /// The `Date:` value of the last second a message was built in.
    static DATE: RefCell<(i64, String)> = const { RefCell::new((i64::MIN, String::new())) };
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
        let needed = needed_names(&tera, message);
        let global = tera.global_context();
        for (k, v) in vars {
            global.insert(k.clone(), v);
        }
        global.insert("campaign", &identity.campaign);
        let fixed = match &needed {
            Some(_) => fixed_headers(&tera, &headers, message.to_name.is_some()),
            None => HashMap::new(),
        };

        let from_addr = address_part(&message.from).to_string();
        let from_addr = ascii_address(&from_addr).map_err(|reason| {
            Error::config(
                "<campaign>",
                "message.from",
                format!("{from_addr:?}: {reason}"),
            )
        })?;
        let from_name = display_name(&message.from);
        let reply_to = match &message.reply_to {
            Some(r) => {
                let addr = ascii_address(address_part(r)).map_err(|reason| {
                    Error::config("<campaign>", "message.reply_to", format!("{r:?}: {reason}"))
                })?;
                Some((display_name(r), addr))
            }
            None => None,
        };
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
            reply_to,
            campaign_header: one_line(&identity.campaign),
            has_to_name: message.to_name.is_some(),
            needed,
            fixed,
            key: identity.key.clone().unwrap_or_else(zero_key),
            identity,
            msgid_domain,
            verp_checked: message.verp.as_ref().is_some_and(verp_always_valid),
            verp: message.verp.clone(),
            unsubscribe: message.unsubscribe.clone(),
            eight_bit: AtomicBool::new(false),
            size_hint: AtomicUsize::new(4096),
        })
    }

    /// Lets non-ASCII text and HTML parts go as `8bit` (set when every
    /// relay offered 8BITMIME; the transport then says `BODY=8BITMIME`).
    /// Off by default: quoted-printable, which any server takes.
    pub fn allow_8bit(&self, on: bool) {
        self.eight_bit.store(on, Ordering::Relaxed);
    }

    /// Sets the ledger id (Message-IDs, VERP, tokens) and the signing key
    /// once the campaign row exists.
    pub fn set_campaign(&mut self, id: i64, key: Key) {
        self.identity.campaign_id = id;
        self.key = key;
    }

    /// Builds `recipient`'s message: the header templates
    /// ([`Renderer::render_parts`]), then the bodies into this thread's
    /// reused buffers, then the message, written once into a buffer of
    /// about its size: the one the injector sends from.
    pub fn render(
        &self,
        recipient: &Recipient,
        now: time::OffsetDateTime,
    ) -> std::result::Result<Outgoing, RenderError> {
        let (parts, ctx) = self.render_head(recipient)?;
        BODIES.with(|bodies| {
            let (text_buf, html_buf) = &mut *bodies.borrow_mut();
            let text = self.render_body(self.text.as_deref(), &ctx, recipient, text_buf)?;
            let html = self.render_body(self.html.as_deref(), &ctx, recipient, html_buf)?;
            self.build(recipient, parts, text, html, now)
        })
    }

    /// Runs the header templates for `recipient` (no bodies, no MIME).
    pub fn render_parts(&self, recipient: &Recipient) -> std::result::Result<Parts, RenderError> {
        self.render_head(recipient).map(|(parts, _)| parts)
    }

    /// Renders body template `name` (if the campaign has it) into `buf`.
    fn render_body<'b>(
        &self,
        name: Option<&str>,
        ctx: &Context,
        recipient: &Recipient,
        buf: &'b mut Vec<u8>,
    ) -> std::result::Result<Option<&'b str>, RenderError> {
        let Some(name) = name else {
            return Ok(None);
        };
        buf.clear();
        self.tera
            .render_to(name, ctx, &mut *buf)
            .map_err(|e| self.template_error(name, e, recipient))?;
        std::str::from_utf8(buf)
            .map(Some)
            .map_err(|_| RenderError::Mime(format!("template {name} rendered to invalid UTF-8")))
    }

    /// `recipient`'s template context: the names in `only` (every column
    /// when `None`), `id`, `email` and `unsubscribe_url`. The campaign's
    /// variables are Tera's global context.
    fn context(
        &self,
        recipient: &Recipient,
        unsubscribe_url: &str,
        only: Option<&std::collections::HashSet<String>>,
    ) -> Context {
        let needs = |name: &str| only.is_none_or(|n| n.contains(name));
        let mut ctx = Context::new();
        for (k, v) in &recipient.vars {
            if needs(k) {
                ctx.insert(k.clone(), v);
            }
        }
        ctx.insert("id", &recipient.id);
        if needs("email") {
            ctx.insert("email", &recipient.email);
        }
        if needs("unsubscribe_url") {
            ctx.insert("unsubscribe_url", unsubscribe_url);
        }
        ctx
    }

    /// Template `name`'s failure for `recipient`. Rendered again with every
    /// column when the context held only the names the templates read, so
    /// Tera's "available variables" lists all of the recipient's (rare: a
    /// missing variable fails every recipient alike).
    fn template_error(&self, name: &str, e: tera::Error, recipient: &Recipient) -> RenderError {
        let mut message = e.to_string();
        if self.needed.is_some() {
            let token = self.key.token(self.identity.campaign_id, recipient.id);
            let url = self.unsubscribe.url.fill(|_| token.clone());
            if let Err(e) = self.tera.render(name, &self.context(recipient, &url, None)) {
                message = e.to_string();
            }
        }
        RenderError::Template {
            template: name.to_string(),
            message,
        }
    }

    /// The header templates' output, and the context the bodies render in.
    fn render_head(
        &self,
        recipient: &Recipient,
    ) -> std::result::Result<(Parts, Context), RenderError> {
        if let Some(why) = &recipient.broken {
            return Err(RenderError::Row(why.clone()));
        }
        let rcpt =
            ascii_address(&recipient.email).map_err(|reason| RenderError::InvalidAddress {
                address: recipient.email.clone(),
                reason,
            })?;
        let campaign_id = self.identity.campaign_id;
        let token = self.key.token(campaign_id, recipient.id);
        let unsubscribe_url = self.unsubscribe.url.fill(|_| token.clone());
        let unsubscribe_mailto = self.unsubscribe.mailto.fill(|_| token.clone());
        let sig = self.key.verp_sig(campaign_id, recipient.id);
        let ctx = self.context(recipient, &unsubscribe_url, self.needed.as_ref());

        let render = |name: &str| match self.fixed.get(name) {
            Some((value, names)) if !names.iter().any(|n| recipient.vars.contains_key(n)) => {
                Ok(value.clone())
            }
            _ => self
                .tera
                .render(name, &ctx)
                .map_err(|e| self.template_error(name, e, recipient)),
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
        let envelope_from = match self.verp_checked {
            true => envelope_from,
            false => ascii_address(&envelope_from)
                .map_err(|_| RenderError::EnvelopeFrom(envelope_from))?,
        };
        let to_name = match self.has_to_name {
            true => Some(display_len(one_line(&render(TO_NAME)?))).filter(|n| !n.is_empty()),
            false => None,
        };
        let mut headers = Vec::with_capacity(self.headers.len());
        for (h, tpl) in &self.headers {
            headers.push((h.clone(), one_line(&render(tpl)?)));
        }
        let parts = Parts {
            rcpt,
            envelope_from,
            to_name,
            subject,
            headers,
            sig,
            unsubscribe_url,
            unsubscribe_mailto,
        };
        Ok((parts, ctx))
    }

    /// Writes the message: header fields, then the bodies (one part, or
    /// `multipart/alternative` with both), each in the lightest transfer
    /// encoding its bytes allow.
    fn build(
        &self,
        recipient: &Recipient,
        parts: Parts,
        text: Option<&str>,
        html: Option<&str>,
        now: time::OffsetDateTime,
    ) -> std::result::Result<Outgoing, RenderError> {
        let hint = self.size_hint.load(Ordering::Relaxed);
        let mut out = Vec::with_capacity(hint + hint / 8);
        mime::mailbox(&mut out, "From", self.from_name.as_deref(), &self.from_addr);
        mime::mailbox(&mut out, "To", parts.to_name.as_deref(), &parts.rcpt);
        mime::unstructured(&mut out, "Subject", &parts.subject);
        DATE.with(|date| {
            let (second, value) = &mut *date.borrow_mut();
            if *second != now.unix_timestamp() {
                *second = now.unix_timestamp();
                *value = now
                    .format(&time::format_description::well_known::Rfc2822)
                    .unwrap_or_default();
            }
            mime::raw(&mut out, "Date", value);
        });
        let message_id = format!(
            "<{}.{}.{}@{}>",
            self.identity.campaign_id,
            recipient.id,
            now.unix_timestamp(),
            self.msgid_domain
        );
        mime::raw(&mut out, "Message-ID", &message_id);
        mime::unstructured(&mut out, "X-Blast-Campaign", &self.campaign_header);
        mime::raw(&mut out, "X-Blast-Recipient", &recipient.id.to_string());
        mime::raw(&mut out, "X-Blast-Sig", &parts.sig);
        // RFC 2369 + RFC 8058: mailbox providers show an unsubscribe
        // button and POST to the URL with no further step.
        mime::list(
            &mut out,
            "List-Unsubscribe",
            &[
                &format!("<mailto:{}>", parts.unsubscribe_mailto),
                &format!("<{}>", parts.unsubscribe_url),
            ],
        );
        mime::raw(
            &mut out,
            "List-Unsubscribe-Post",
            "List-Unsubscribe=One-Click",
        );
        if let Some((name, addr)) = &self.reply_to {
            mime::mailbox(&mut out, "Reply-To", name.as_deref(), addr);
        }
        for (h, v) in &parts.headers {
            mime::unstructured(&mut out, h, v);
        }
        mime::raw(&mut out, "MIME-Version", "1.0");
        let eight_bit = self.eight_bit.load(Ordering::Relaxed);
        let mut any_8bit = false;
        match (text, html) {
            (Some(text), Some(html)) => {
                let boundary = mime::boundary(&parts.sig, &[text, html]);
                out.extend_from_slice(b"Content-Type: multipart/alternative;\r\n boundary=\"");
                out.extend_from_slice(boundary.as_bytes());
                out.extend_from_slice(b"\"\r\n\r\n");
                for (content_type, body) in [("text/plain", text), ("text/html", html)] {
                    out.extend_from_slice(b"--");
                    out.extend_from_slice(boundary.as_bytes());
                    out.extend_from_slice(b"\r\n");
                    any_8bit |= body_part(&mut out, content_type, body, eight_bit);
                }
                out.extend_from_slice(b"--");
                out.extend_from_slice(boundary.as_bytes());
                out.extend_from_slice(b"--\r\n");
            }
            (Some(text), None) => any_8bit = body_part(&mut out, "text/plain", text, eight_bit),
            (None, Some(html)) => any_8bit = body_part(&mut out, "text/html", html, eight_bit),
            (None, None) => any_8bit = body_part(&mut out, "text/plain", "", eight_bit),
        }
        self.size_hint.store(out.len(), Ordering::Relaxed);
        Ok(Outgoing {
            envelope: Envelope {
                recipient_id: recipient.id,
                from: parts.envelope_from,
                to: parts.rcpt,
                eight_bit: any_8bit,
            },
            email: recipient.email.clone(),
            bytes: out,
        })
    }
}

/// One text part: its header fields, a blank line, and `text` in the
/// lightest transfer encoding its bytes allow (`8bit` only when
/// `eight_bit`: every relay offered 8BITMIME). Returns whether the part
/// went as `8bit`.
fn body_part(out: &mut Vec<u8>, content_type: &str, text: &str, eight_bit: bool) -> bool {
    mime::text_part(out, content_type, text, eight_bit) == Encoding::EightBit
}

/// Every top-level name `message`'s templates read, or `None` when that is
/// not certain: a template that dumps the whole context (`__tera_context`)
/// or defines a component (whose implicit parameters are looked up by
/// name in the caller's scope).
fn needed_names(tera: &Tera, message: &MessageConfig) -> Option<std::collections::HashSet<String>> {
    let mut sources = vec![message.subject.as_str(), message.envelope_from.as_str()];
    sources.extend(message.to_name.as_deref());
    sources.extend(
        message
            .text
            .iter()
            .chain(&message.html)
            .map(|t| t.body.as_str()),
    );
    sources.extend(message.headers.iter().map(|(_, v)| v.as_str()));
    let dynamic = |s: &&str| {
        s.contains("__tera_")
            || s.match_indices("component").any(|(i, _)| {
                let before = s[..i].trim_end_matches([' ', '\t', '\r', '\n', '-']);
                before.ends_with("{%")
            })
    };
    if sources.iter().any(dynamic) {
        return None;
    }
    let mut names = std::collections::HashSet::new();
    for name in tera.get_template_names() {
        names.extend(
            tera.get_template_variables(name)
                .ok()?
                .into_iter()
                .map(str::to_string),
        );
    }
    Some(names)
}

/// The header templates (subject, envelope sender, display name, extra
/// headers) that read no recipient data: none of `id`, `email` and
/// `unsubscribe_url`, and they render with the campaign's variables alone.
fn fixed_headers(
    tera: &Tera,
    headers: &[(String, String)],
    to_name: bool,
) -> HashMap<String, (String, Vec<String>)> {
    let mut names = vec![SUBJECT, ENVELOPE_FROM];
    if to_name {
        names.push(TO_NAME);
    }
    names.extend(headers.iter().map(|(_, tpl)| tpl.as_str()));
    let mut fixed = HashMap::new();
    for name in names {
        let Ok(reads) = tera.get_template_variables(name) else {
            continue;
        };
        if reads
            .iter()
            .any(|n| ["id", "email", "unsubscribe_url"].contains(n))
        {
            continue;
        }
        if let Ok(value) = tera.render(name, &Context::new()) {
            let reads = reads.into_iter().map(str::to_string).collect();
            fixed.insert(name.to_string(), (value, reads));
        }
    }
    fixed
}

/// Whether every address `verp` can produce is valid as it is: filled with
/// the longest values (an `i64::MIN` campaign and recipient, a signature of
/// full length) it parses, and parsing leaves it unchanged.
fn verp_always_valid(verp: &Pattern) -> bool {
    let longest = verp.fill(|v| match v {
        Var::Campaign | Var::Recipient => i64::MIN.to_string(),
        _ => zero_key().verp_sig(i64::MIN, i64::MIN),
    });
    ascii_address(&longest).is_ok_and(|a| a == longest)
}

/// The key used before [`Renderer::set_campaign`] (benches, unit tests).
fn zero_key() -> Key {
    Key::from_hex(&"0".repeat(64)).unwrap_or_else(|| unreachable!("64 hex digits"))
}

/// HTML-escapes `input` into `out` as Tera's own escaper does (`&`, `<`,
/// `>`, `"` and `'`), but copies the runs between special characters
/// whole: Tera's writes every byte on its own through `dyn Write`, which
/// was 9% of blast's CPU per message (campaign-wide article summaries are
/// escaped again for every recipient).
fn escape_html(input: &str, out: &mut dyn std::io::Write) -> std::io::Result<()> {
    let bytes = input.as_bytes();
    // The next `&`, `<` or `>`, and the next quote, each found by a
    // vectorized search and searched for again only once it is passed: text
    // without special characters (most of it) costs two scans.
    let end = bytes.len();
    let find_angle =
        |from: usize| memchr::memchr3(b'&', b'<', b'>', &bytes[from..]).map_or(end, |i| from + i);
    let find_quote =
        |from: usize| memchr::memchr2(b'"', b'\'', &bytes[from..]).map_or(end, |i| from + i);
    let (mut angle, mut quote) = (find_angle(0), find_quote(0));
    let mut start = 0;
    while angle.min(quote) < end {
        let i = angle.min(quote);
        let entity: &[u8] = match bytes[i] {
            b'&' => b"&amp;",
            b'<' => b"&lt;",
            b'>' => b"&gt;",
            b'"' => b"&quot;",
            _ => b"&#39;",
        };
        out.write_all(&bytes[start..i])?;
        out.write_all(entity)?;
        start = i + 1;
        if i == angle {
            angle = find_angle(start);
        } else {
            quote = find_quote(start);
        }
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
        render_with(m, r, false)
    }

    /// [`render`], with 8bit parts allowed or not.
    pub(crate) fn render_with(
        m: &MessageConfig,
        r: &Recipient,
        eight_bit: bool,
    ) -> std::result::Result<Outgoing, RenderError> {
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
        renderer.allow_8bit(eight_bit);
        renderer.render(r, crate::clock::now())
    }

    /// The `To:` display name blast writes for a rendered `name`.
    pub(crate) fn display(name: &str) -> Option<String> {
        Some(display_len(one_line(name)))
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
        render_with(m, r, true).unwrap()
    }

    #[test]
    fn non_ascii_parts_go_8bit_when_every_relay_takes_it() {
        let m = message("Hi", Some("Grüße, {{ name }}"), Some("<p>Grüße</p>"));
        let out = render_8bit(&m, &recipient(1, "a@example.com", "José"));
        assert!(out.envelope.eight_bit, "MAIL FROM must say BODY=8BITMIME");
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
        assert!(!qp.envelope.eight_bit);
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
        assert!(!out.envelope.eight_bit);
        let s = String::from_utf8(out.bytes).unwrap();
        assert!(
            s.contains("Content-Transfer-Encoding: quoted-printable"),
            "{s}"
        );
        assert!(s.split("\r\n").all(|l| l.len() <= 998));
        let ok = format!("é{}", "x".repeat(996)); // 998 octets: 8bit
        let out = render_8bit(&m, &recipient(1, "a@example.com", &ok));
        assert!(out.envelope.eight_bit);
        let s = String::from_utf8(out.bytes).unwrap();
        assert!(s.contains("Content-Transfer-Encoding: 8bit"), "{s}");
        // An ASCII message is 7bit even where 8bit is allowed.
        let ascii = render_8bit(&m, &recipient(1, "a@example.com", "plain"));
        assert!(!ascii.envelope.eight_bit);
    }

    #[test]
    fn verp_addresses_are_checked_once_when_every_fill_is_valid() {
        let verp = |raw: &str| Pattern::parse(raw, &[Var::Campaign, Var::Recipient, Var::Sig]);
        let ok = verp("bounces+{campaign}-{recipient}-{sig}@example.com").unwrap();
        assert!(verp_always_valid(&ok));
        // 34 + two ids + a signature: too long a local part for the largest
        // ids (64 octets at most), fine for small ones. Checked per message.
        let long =
            verp("bounces-of-the-weekly-newsletter-x+{campaign}-{recipient}-{sig}@example.com")
                .unwrap();
        assert!(!verp_always_valid(&long));
        let mut m = message("Hi", Some("x"), None);
        m.verp = Some(long);
        let out = render(&m, &recipient(7, "a@example.com", "A")).unwrap();
        assert!(out
            .envelope
            .from
            .starts_with("bounces-of-the-weekly-newsletter-x+1-7-"));
        let err = render(&m, &recipient(i64::MIN, "a@example.com", "A")).unwrap_err();
        assert!(matches!(err, RenderError::EnvelopeFrom(_)), "{err}");
        // A quoted local part is rewritten by parsing: checked per message.
        let quoted = verp("\"b {recipient}\"+{campaign}-{sig}@example.com").unwrap();
        assert!(!verp_always_valid(&quoted));
    }

    #[test]
    fn only_the_names_templates_read_enter_the_context_and_output_is_the_same() {
        let body = "{% set greeting = nick | default(value=first) %}{{ greeting }} \
            {% for first in items %}[{{ first }}]{% endfor %}{{ first }} \
            {% if city %}{{ city | upper }}{% endif %}{{ prefs.color }} {{ email }} \
            {{ unsubscribe_url }} {{ id }}";
        let mut m = message(
            "Hi {{ first }}",
            Some(body),
            Some("<p>{{ first }} {{ prefs.color }}</p>"),
        );
        m.to_name = Some("{{ first }}".into());
        m.headers
            .push(("X-City".into(), "{{ city | default(value='') }}".into()));
        let mut vars = Map::new();
        for (k, v) in [
            ("first", serde_json::json!("Ann")),
            ("nick", serde_json::json!(null)),
            ("city", serde_json::json!("Oslo")),
            ("prefs", serde_json::json!({"color": "red"})),
            ("items", serde_json::json!([1, 2])),
            ("unused", serde_json::json!("never read")),
            (
                "attributes",
                serde_json::json!({"first": "Ann", "unused": 1}),
            ),
        ] {
            vars.insert(k.into(), v);
        }
        let r = Recipient::new(9, "ann@example.com", vars);
        let ident = || Identity {
            campaign: "c".into(),
            campaign_id: 1,
            key: None,
        };
        let pruned = Renderer::compile(&m, &Map::new(), ident()).unwrap();
        let needed = pruned.needed.as_ref().expect("every name is known");
        assert!(needed.contains("first") && needed.contains("prefs") && needed.contains("city"));
        assert!(
            !needed.contains("unused") && !needed.contains("attributes"),
            "{needed:?}"
        );
        let mut full = Renderer::compile(&m, &Map::new(), ident()).unwrap();
        full.needed = None;
        let now = crate::clock::now();
        let (a, b) = (
            pruned.render(&r, now).unwrap(),
            full.render(&r, now).unwrap(),
        );
        assert_eq!(
            String::from_utf8(a.bytes).unwrap(),
            String::from_utf8(b.bytes).unwrap()
        );
        // A template that dumps the context, or defines a component, gets
        // every column.
        for dynamic in [
            "{{ __tera_context }}",
            "{%- component X() %}x{% endcomponent X %}",
        ] {
            let m = message("Hi", Some(dynamic), None);
            let r = Renderer::compile(&m, &Map::new(), ident()).unwrap();
            assert!(r.needed.is_none(), "{dynamic}");
        }
        let m = message("Hi", Some("{{ __tera_context }}"), None);
        let out = render(&m, &recipient(1, "a@example.com", "A")).unwrap();
        assert!(String::from_utf8_lossy(&out.bytes).contains("name"));
    }

    #[test]
    fn header_templates_of_campaign_variables_render_once_unless_a_column_shadows_them() {
        let mut m = message("Issue {{ issue }}", Some("x"), None);
        m.headers = vec![
            ("X-Issue".into(), "{{ issue }}".into()),
            ("X-Id".into(), "{{ id }}".into()),
            ("X-Nick".into(), "{{ nick | default(value='none') }}".into()),
        ];
        let mut vars = Map::new();
        vars.insert("issue".into(), Value::from(48));
        let ident = Identity {
            campaign: "c".into(),
            campaign_id: 1,
            key: None,
        };
        let r = Renderer::compile(&m, &vars, ident).unwrap();
        let mut fixed: Vec<&str> = r.fixed.keys().map(String::as_str).collect();
        fixed.sort();
        assert_eq!(
            fixed,
            [
                "message.headers.X-Issue",
                "message.headers.X-Nick",
                SUBJECT, // the envelope sender reads `id` here
            ]
        );
        let plain = r.render_parts(&recipient(5, "a@example.com", "A")).unwrap();
        assert_eq!(plain.subject, "Issue 48");
        assert_eq!(plain.headers[0].1, "48");
        assert_eq!(plain.headers[1].1, "5");
        assert_eq!(plain.headers[2].1, "none");
        // A recipient's own `issue` and `nick` columns win, as in Tera.
        let mut own = recipient(6, "b@example.com", "B");
        own.vars.insert("issue".into(), Value::from(7));
        own.vars.insert("nick".into(), Value::from("Bee"));
        let p = r.render_parts(&own).unwrap();
        assert_eq!(p.subject, "Issue 7");
        assert_eq!(p.headers[0].1, "7");
        assert_eq!(p.headers[2].1, "Bee");
    }

    #[test]
    fn missing_variable_is_a_per_recipient_error() {
        let m = message("Hi {{ nickname }}", Some("x"), None);
        let err = render(&m, &recipient(1, "a@example.com", "A")).unwrap_err();
        assert!(matches!(err, RenderError::Template { .. }), "{err}");
        assert!(err.to_string().contains("nickname"), "{err}");
        // Tera's list of what is available names every column, not only
        // those the templates read.
        let mut r = recipient(1, "a@example.com", "A");
        r.vars.insert("nick_name".into(), Value::String("x".into()));
        let err = render(&m, &r).unwrap_err();
        assert!(err.to_string().contains("nick_name"), "{err}");
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
            "'quoted' at both ends'",
            "a < b && c > d, \"e\" isn't f",
            ">",
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
