//! Stage 2 of reading a campaign: one check per section of the file as
//! written ([`super::raw`]), each giving a validated piece of
//! [`super::Config`] or an [`Invalid`] naming the key. No check knows the
//! file's name: [`super::Config::parse`] adds it, and puts the pieces
//! together. Reads the template and CA files the campaign names; nothing
//! else.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use super::raw::{
    AudienceFile, BouncesFile, ConcurrencyFile, MessageFile, OneOrMany, RelayFile, RelayTable,
    UnsubscribeFile,
};
use super::relay::{from_domains, relay_from_table, serves};
use super::{
    address_part, expand_env, parse_duration, Audience, Concurrency, QueueProbe, Relay,
    RetryPolicy, TemplateSource, Unsubscribe, Workers, DEFAULT_BATCH_SIZE, DEFAULT_CLAIM_TIME,
    DEFAULT_MAX_DELAY, DEFAULT_QUEUE_TARGET, DEFAULT_SMTP_TIMEOUT, DEFAULT_WORKER_TTL,
};
use crate::sign::{Pattern, Var};

/// A value the campaign file got wrong: its dotted key and why.
#[derive(Debug)]
pub(super) struct Invalid {
    /// The dotted key, e.g. `delivery.concurrency` (or `--database`).
    pub(super) key: String,
    /// What is wrong with it.
    pub(super) message: String,
}

/// What every check returns.
pub(super) type Checked<T> = std::result::Result<T, Invalid>;

/// Shorthand for an [`Invalid`].
fn invalid(key: impl Into<String>, message: impl Into<String>) -> Invalid {
    Invalid {
        key: key.into(),
        message: message.into(),
    }
}

/// `name`: the campaign's id in the ledger, trimmed.
pub(super) fn name(raw: &str) -> Checked<String> {
    let name = raw.trim().to_string();
    if name.is_empty() || name.len() > 200 || name.chars().any(|c| c.is_control()) {
        return Err(invalid("name", "must be 1-200 printable characters"));
    }
    Ok(name)
}

/// `database`, or `--database` which wins; `${VARS}` expanded. Only the
/// file's URL is relative to the campaign file: `--database` is the
/// operator's, relative to where they are.
pub(super) fn database(
    cli: Option<&str>,
    file: Option<&str>,
    base: &Path,
    env: &dyn Fn(&str) -> Option<String>,
) -> Checked<String> {
    match (cli, file) {
        (Some(db), _) => expand_env(db, env).map_err(|m| invalid("--database", m)),
        (None, Some(db)) => {
            let db = expand_env(db, env).map_err(|m| invalid("database", m))?;
            Ok(resolve_sqlite_path(&db, base))
        }
        (None, None) => Err(invalid(
            "database",
            "missing: set `database = \"sqlite://blast.db\"` or pass --database",
        )),
    }
}

/// `[audience]`: who receives the campaign, and the keyset page size.
pub(super) fn audience(raw: AudienceFile) -> Checked<(Audience, usize)> {
    let audience = match (raw.table, raw.query) {
        (Some(t), None) => {
            if !is_sql_identifier(&t) {
                return Err(invalid(
                    "audience.table",
                    format!(
                        "{t:?} is not a table name (letters, digits, _ and one optional schema.)"
                    ),
                ));
            }
            Audience::Table {
                table: t,
                filter: raw.filter.filter(|f| !f.trim().is_empty()),
            }
        }
        (None, Some(q)) => {
            if raw.filter.is_some() {
                return Err(invalid(
                    "audience.where",
                    "only valid with `table`; put the condition in `query`",
                ));
            }
            let lower = q.trim_start().to_ascii_lowercase();
            if !(lower.starts_with("select") || lower.starts_with("with")) {
                return Err(invalid(
                    "audience.query",
                    "must be a SELECT (or WITH ... SELECT) statement",
                ));
            }
            Audience::Query(q)
        }
        (Some(_), Some(_)) => {
            return Err(invalid(
                "audience",
                "set either `table` or `query`, not both",
            ))
        }
        (None, None) => {
            return Err(invalid(
                "audience",
                "set `table = \"subscribers\"` or `query = \"SELECT id, email, ...\"`",
            ))
        }
    };
    let batch_size = raw.batch_size.unwrap_or(DEFAULT_BATCH_SIZE);
    if !(1..=100_000).contains(&batch_size) {
        return Err(invalid(
            "audience.batch_size",
            "must be between 1 and 100000",
        ));
    }
    Ok((audience, batch_size))
}

/// `[vars]`, as the JSON object templates see.
pub(super) fn vars(raw: &toml::Table) -> Checked<serde_json::Map<String, serde_json::Value>> {
    match serde_json::to_value(raw) {
        Ok(serde_json::Value::Object(m)) => Ok(m),
        _ => Err(invalid("vars", "must be a table")),
    }
}

/// The message's template files, read.
pub(super) struct Templates {
    /// `message.text`.
    pub(super) text: Option<TemplateSource>,
    /// `message.html`.
    pub(super) html: Option<TemplateSource>,
    /// Both as the campaign file names them, with their text: what
    /// `blast schedule` freezes (CA files are added by the relays).
    pub(super) files: Vec<(String, String)>,
}

/// Reads `message.text` and `message.html`, relative to the campaign file.
pub(super) fn templates(m: &MessageFile, base: &Path) -> Checked<Templates> {
    let text = read_template("message.text", m.text.as_deref(), base)?;
    let html = read_template("message.html", m.html.as_deref(), base)?;
    let files = [(&m.text, &text), (&m.html, &html)]
        .into_iter()
        .filter_map(|(p, t)| Some((p.as_ref()?.display().to_string(), t.as_ref()?.body.clone())))
        .collect();
    Ok(Templates { text, html, files })
}

/// One template file, if the key names one; errors name the full path,
/// which is where the operator has to look.
fn read_template(key: &str, path: Option<&Path>, base: &Path) -> Checked<Option<TemplateSource>> {
    let Some(p) = path else { return Ok(None) };
    let full = base.join(p);
    let body = std::fs::read_to_string(&full)
        .map_err(|e| invalid(key, format!("cannot read {}: {e}", full.display())))?;
    Ok(Some(TemplateSource {
        name: full.display().to_string(),
        body,
    }))
}

/// `send_at`: when a scheduled campaign is due.
pub(super) fn send_at(raw: Option<&str>) -> Checked<Option<OffsetDateTime>> {
    let Some(t) = raw else { return Ok(None) };
    OffsetDateTime::parse(t, &Rfc3339).map(Some).map_err(|e| {
        invalid(
            "send_at",
            format!("{t:?} is not an RFC 3339 time like 2026-12-01T09:00:00Z: {e}"),
        )
    })
}

/// `max_delay`: how late a scheduled campaign may still go out.
pub(super) fn max_delay(raw: Option<&str>) -> Checked<Duration> {
    match raw {
        Some(d) => parse_duration(d).map_err(|m| invalid("max_delay", m)),
        None => Ok(DEFAULT_MAX_DELAY),
    }
}

/// `[message]` has a body template and a subject.
pub(super) fn message(templates: &Templates, subject: &str) -> Checked<()> {
    if templates.text.is_none() && templates.html.is_none() {
        return Err(invalid(
            "message",
            "set `text` and/or `html` (template paths)",
        ));
    }
    if subject.trim().is_empty() {
        return Err(invalid("message.subject", "must not be empty"));
    }
    Ok(())
}

/// Headers blast writes itself; a campaign may not override them.
const RESERVED_HEADERS: &[&str] = &[
    "from",
    "to",
    "cc",
    "bcc",
    "subject",
    "date",
    "message-id",
    "reply-to",
    "mime-version",
    "content-type",
    "content-transfer-encoding",
    "return-path",
    "x-blast-campaign",
    "x-blast-recipient",
    "x-blast-sig",
    "list-unsubscribe",
    "list-unsubscribe-post",
];

/// `message.headers`: well-formed names, none that blast sets itself.
pub(super) fn headers(raw: BTreeMap<String, String>) -> Checked<Vec<(String, String)>> {
    let mut headers = Vec::new();
    for (h, v) in raw {
        if h.is_empty() || !h.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
            return Err(invalid(
                format!("message.headers.{h}"),
                "header names are letters, digits and '-'",
            ));
        }
        if RESERVED_HEADERS.contains(&h.to_ascii_lowercase().as_str()) {
            return Err(invalid(
                format!("message.headers.{h}"),
                "blast sets this header itself",
            ));
        }
        headers.push((h, v));
    }
    Ok(headers)
}

/// `delivery.retry` and `delivery.give_up_after` over the defaults.
pub(super) fn retry(
    delays: Option<&[String]>,
    give_up_after: Option<&str>,
) -> Checked<RetryPolicy> {
    let mut retry = RetryPolicy::default();
    if let Some(list) = delays {
        retry.delays = list
            .iter()
            .map(|s| parse_duration(s))
            .collect::<std::result::Result<_, _>>()
            .map_err(|m| invalid("delivery.retry", m))?;
        if retry.delays.is_empty() {
            return Err(invalid(
                "delivery.retry",
                "needs at least one delay, e.g. [\"5m\"]",
            ));
        }
    }
    if let Some(g) = give_up_after {
        retry.give_up_after =
            parse_duration(g).map_err(|m| invalid("delivery.give_up_after", m))?;
    }
    Ok(retry)
}

/// `delivery.smtp` (replaced by `--smtp` when given): the relays that may
/// carry mail from `from`, validated. A relative `ca_file` is read and
/// added to `frozen`, like a template.
pub(super) fn relays(
    cli: &[String],
    file: Option<OneOrMany>,
    from: &str,
    base: &Path,
    env: &dyn Fn(&str) -> Option<String>,
    frozen: &mut Vec<(String, String)>,
) -> Checked<Vec<Relay>> {
    let from_domain = address_part(from)
        .rsplit_once('@')
        .map(|(_, d)| d.trim_end_matches('.').to_ascii_lowercase())
        .unwrap_or_default();
    let mut relays = Vec::new();
    let mut routed_away = 0;
    for t in relay_entries(cli, file) {
        // Routing first: a relay this campaign may not use is not
        // checked (its password or CA file may not be here at all).
        let domains = from_domains(t.from_domains.as_deref().unwrap_or_default())
            .map_err(|m| invalid("delivery.smtp", format!("{}: {m}", t.url)))?;
        if !serves(&domains, &from_domain) {
            routed_away += 1;
            continue;
        }
        let mut relay =
            relay_from_table(t, base, env, frozen).map_err(|m| invalid("delivery.smtp", m))?;
        relay.from_domains = domains;
        relays.push(relay);
    }
    if relays.is_empty() && routed_away > 0 {
        return Err(invalid(
            "delivery.smtp",
            format!(
                "none of the {routed_away} relays may send mail from {from_domain:?}: \
                 add it to a relay's from_domains, or add a relay without from_domains"
            ),
        ));
    }
    if relays.is_empty() {
        return Err(invalid("delivery.smtp", "needs at least one smtp:// URL"));
    }
    Ok(relays)
}

/// Every relay entry as a table: `--smtp` URLs replace the file's, and no
/// relay at all means the MTA on this host.
fn relay_entries(cli: &[String], file: Option<OneOrMany>) -> Vec<RelayTable> {
    let entries: Vec<RelayFile> = if !cli.is_empty() {
        cli.iter().cloned().map(RelayFile::Url).collect()
    } else {
        match file {
            Some(OneOrMany::One(s)) => vec![RelayFile::Url(s)],
            Some(OneOrMany::Many(v)) => v,
            None => vec![RelayFile::Url("smtp://127.0.0.1:25".to_string())],
        }
    };
    entries
        .into_iter()
        .map(|e| match e {
            RelayFile::Url(url) => RelayTable {
                url,
                ..Default::default()
            },
            RelayFile::Table(t) => t,
        })
        .collect()
}

/// `delivery.concurrency`, or `--concurrency` which wins; `auto` by default.
pub(super) fn concurrency(
    cli: Option<Concurrency>,
    file: Option<ConcurrencyFile>,
) -> Checked<Concurrency> {
    let parse = |s: &str| Concurrency::parse(s).map_err(|m| invalid("delivery.concurrency", m));
    match (cli, file) {
        (Some(c), _) => Ok(c),
        (None, Some(ConcurrencyFile::Number(n))) => parse(&n.to_string()),
        (None, Some(ConcurrencyFile::Text(t))) => parse(&t),
        (None, None) => Ok(Concurrency::Auto {
            max: crate::adaptive::DEFAULT_MAX,
        }),
    }
}

/// `bounces.verp`: a signed per-message envelope sender, which replaces
/// `delivery.envelope_from` (so both at once is an error).
pub(super) fn verp(raw: Option<BouncesFile>, envelope_from: bool) -> Checked<Option<Pattern>> {
    let Some(v) = raw.and_then(|b| b.verp) else {
        return Ok(None);
    };
    if envelope_from {
        return Err(invalid(
            "bounces.verp",
            "set either bounces.verp or delivery.envelope_from, not both",
        ));
    }
    let p = Pattern::parse(&v, &[Var::Campaign, Var::Recipient, Var::Sig])
        .map_err(|m| invalid("bounces.verp", m))?;
    check_address_pattern(&p).map_err(|m| invalid("bounces.verp", m))?;
    Ok(Some(p))
}

/// `delivery.queue_probe` and `delivery.queue_target`; a target alone is an
/// error, an empty command turns the probe off.
pub(super) fn queue_probe(
    command: Option<String>,
    target: Option<u64>,
) -> Checked<Option<QueueProbe>> {
    if target.is_some() && command.is_none() {
        return Err(invalid(
            "delivery.queue_target",
            "needs delivery.queue_probe (e.g. \"postqueue -j\")",
        ));
    }
    Ok(command
        .filter(|c| !c.trim().is_empty())
        .map(|command| QueueProbe {
            command,
            target: target.unwrap_or(DEFAULT_QUEUE_TARGET),
        }))
}

/// `delivery.metrics` (or `--metrics`, which wins): the address of the
/// Prometheus endpoint; empty turns it off.
pub(super) fn metrics(
    flag: Option<SocketAddr>,
    file: Option<String>,
) -> Checked<Option<SocketAddr>> {
    if flag.is_some() {
        return Ok(flag);
    }
    match file.as_deref().map(str::trim) {
        None | Some("") => Ok(None),
        Some(addr) => addr.parse().map(Some).map_err(|_| {
            invalid(
                "delivery.metrics",
                format!("{addr:?} is not an address to listen on (e.g. \"127.0.0.1:9464\")"),
            )
        }),
    }
}

/// `[unsubscribe]`: an `https://` URL and a mailto address, each with one
/// `{token}`. The mailto defaults to `unsubscribe+{token}@` the From domain.
pub(super) fn unsubscribe(raw: Option<UnsubscribeFile>, from: &str) -> Checked<Unsubscribe> {
    let raw = raw.ok_or_else(|| {
        invalid(
            "unsubscribe",
            "missing: every campaign message carries List-Unsubscribe (RFC 8058); add \
             [unsubscribe] with url = \"https://lists.example.com/unsubscribe/{token}\" \
             (answered by `blast serve`)",
        )
    })?;
    let url =
        Pattern::parse(raw.url.trim(), &[Var::Token]).map_err(|m| invalid("unsubscribe.url", m))?;
    let rest = url.as_str().strip_prefix("https://").unwrap_or_default();
    if rest.is_empty() || rest.starts_with('{') || url.as_str().contains(char::is_whitespace) {
        return Err(invalid(
            "unsubscribe.url",
            format!(
                "{:?} must be an https:// URL with a host (RFC 8058)",
                url.as_str()
            ),
        ));
    }
    let mailto = match raw.mailto {
        Some(m) => m.trim().trim_start_matches("mailto:").to_string(),
        None => {
            let domain = address_part(from)
                .rsplit_once('@')
                .map(|(_, d)| d)
                .unwrap_or("");
            format!("unsubscribe+{{token}}@{domain}")
        }
    };
    let mailto =
        Pattern::parse(&mailto, &[Var::Token]).map_err(|m| invalid("unsubscribe.mailto", m))?;
    check_address_pattern(&mailto).map_err(|m| invalid("unsubscribe.mailto", m))?;
    Ok(Unsubscribe { url, mailto })
}

/// `delivery.max_workers`, `claim_size`, `claim_time`, `worker_ttl`: how
/// workers share a campaign.
pub(super) fn workers(
    max_workers: Option<u32>,
    claim_size: Option<u64>,
    claim_time: Option<&str>,
    ttl: Option<&str>,
) -> Checked<Workers> {
    let duration = |key: &str, raw: Option<&str>, default: Duration| match raw {
        Some(d) => match parse_duration(d) {
            Ok(d) if d.is_zero() => Err(invalid(key, "must be at least 1s")),
            Ok(d) => Ok(d),
            Err(m) => Err(invalid(key, m)),
        },
        None => Ok(default),
    };
    if max_workers == Some(0) {
        return Err(invalid("delivery.max_workers", "must be at least 1"));
    }
    if claim_size == Some(0) {
        return Err(invalid("delivery.claim_size", "must be at least 1"));
    }
    let ttl = duration("delivery.worker_ttl", ttl, DEFAULT_WORKER_TTL)?;
    if ttl < Duration::from_secs(3) {
        return Err(invalid(
            "delivery.worker_ttl",
            "must be at least 3s (a worker heartbeats every sixth of it)",
        ));
    }
    Ok(Workers {
        max_workers,
        claim_size,
        claim_time: duration("delivery.claim_time", claim_time, DEFAULT_CLAIM_TIME)?,
        ttl,
    })
}

/// `--worker`: a name for this process among the campaign's workers
/// (default: the host name).
pub(super) fn worker(raw: Option<&str>) -> Checked<String> {
    let name = match raw {
        Some(n) => n.trim().to_string(),
        None => crate::worker::hostname(),
    };
    if name.is_empty() || name.len() > 200 || name.chars().any(|c| c.is_control()) {
        return Err(invalid("--worker", "must be 1 to 200 printable characters"));
    }
    Ok(name)
}

/// `delivery.timeout_secs`: the per-command SMTP timeout.
pub(super) fn timeout(secs: Option<u64>) -> Checked<Duration> {
    let timeout = secs
        .map(Duration::from_secs)
        .unwrap_or(DEFAULT_SMTP_TIMEOUT);
    if timeout.is_zero() {
        return Err(invalid("delivery.timeout_secs", "must be at least 1"));
    }
    Ok(timeout)
}

/// `delivery.breaker_rate` (0 to 1, default 0.5) and `breaker_window` (at
/// least 1, default 200).
pub(super) fn breaker_rate(rate: Option<f64>, window: Option<u32>) -> Checked<(f64, u32)> {
    let rate = rate.unwrap_or(0.5);
    if !(0.0..=1.0).contains(&rate) {
        return Err(invalid(
            "delivery.breaker_rate",
            "must be between 0 (off) and 1",
        ));
    }
    let window = window.unwrap_or(200);
    if window == 0 {
        return Err(invalid("delivery.breaker_window", "must be at least 1"));
    }
    Ok((rate, window))
}

/// An address pattern must fill to `local@domain` with placeholders in the
/// local part only.
fn check_address_pattern(p: &Pattern) -> std::result::Result<(), String> {
    let raw = p.as_str();
    match raw.rsplit_once('@') {
        Some((local, domain))
            if !local.is_empty()
                && !domain.is_empty()
                && !domain.contains('{')
                && raw.is_ascii()
                && !raw.contains(|c: char| c.is_whitespace() || "<>,;\"".contains(c)) =>
        {
            Ok(())
        }
        _ => Err(format!(
            "{raw:?} must be an ASCII address local@domain with the placeholders in the local part"
        )),
    }
}

/// Makes a relative `sqlite://file` relative to the campaign file, so cron jobs
/// started from another directory open the same database.
fn resolve_sqlite_path(url: &str, base: &Path) -> String {
    let Some(rest) = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))
    else {
        return url.to_string();
    };
    if rest.starts_with('/') || rest.starts_with(":memory:") || rest.is_empty() {
        return url.to_string();
    }
    format!("sqlite://{}", base.join(rest).display())
}

/// `name` or `schema.name`, letters, digits and `_` only.
fn is_sql_identifier(s: &str) -> bool {
    let parts: Vec<&str> = s.split('.').collect();
    parts.len() <= 2
        && parts.iter().all(|p| {
            !p.is_empty()
                && p.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
                && !p.as_bytes()[0].is_ascii_digit()
        })
}
