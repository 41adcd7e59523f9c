//! `campaign.toml` + environment + command-line overrides → a validated
//! [`Config`]. Pure: reads the campaign file and the template and CA files it names,
//! never opens a database or a socket. Secrets are expanded from `${VARS}` and
//! never printed: [`Config`]'s `Debug` redacts URLs.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::error::{Error, Result};
use crate::sign::{Pattern, Var};

mod raw;
mod relay;

use raw::{CampaignFile, ConcurrencyFile, OneOrMany, RelayFile, RelayTable, UnsubscribeFile};
use relay::{from_domains, relay_from_table, serves};
pub use relay::{Relay, Secret, Tls, SMTP_PASSWORD_ENV};

/// The number of SMTP transactions in flight per relay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Concurrency {
    /// Pinned: this many injectors over all relays (relay `i mod n`).
    Fixed(usize),
    /// Found per relay by [`crate::adaptive`], at most `max` each.
    Auto {
        /// Ceiling per relay.
        max: usize,
    },
}

impl Concurrency {
    /// Parses `auto`, `auto:MAX` or a number (1-1024).
    pub fn parse(s: &str) -> std::result::Result<Concurrency, String> {
        let s = s.trim();
        let bad = || format!("{s:?}: use \"auto\", \"auto:MAX\" or a number of connections 1-1024");
        let n = |t: &str| match t.parse::<usize>() {
            Ok(n) if (1..=1024).contains(&n) => Ok(n),
            _ => Err(bad()),
        };
        match s.strip_prefix("auto") {
            Some("") => Ok(Concurrency::Auto {
                max: crate::adaptive::DEFAULT_MAX,
            }),
            Some(rest) => Ok(Concurrency::Auto {
                max: n(rest.strip_prefix(':').ok_or_else(bad)?)?,
            }),
            None => Ok(Concurrency::Fixed(n(s)?)),
        }
    }

    /// Injectors for each of `relays`: a fixed number is split by weight
    /// (largest remainder first); `auto` gives each relay its ceiling
    /// (`max_concurrency`, else `max`).
    pub fn per_relay(&self, relays: &[Relay]) -> Vec<usize> {
        match *self {
            Concurrency::Auto { max } => relays
                .iter()
                .map(|r| r.max_concurrency.unwrap_or(max).max(1))
                .collect(),
            Concurrency::Fixed(n) => {
                let total: u64 = relays.iter().map(|r| u64::from(r.weight.max(1))).sum();
                let exact: Vec<f64> = relays
                    .iter()
                    .map(|r| n as f64 * f64::from(r.weight.max(1)) / total.max(1) as f64)
                    .collect();
                let mut out: Vec<usize> = exact.iter().map(|x| x.floor() as usize).collect();
                let mut order: Vec<usize> = (0..relays.len()).collect();
                order.sort_by(|a, b| {
                    (exact[*b] - exact[*b].floor()).total_cmp(&(exact[*a] - exact[*a].floor()))
                });
                let mut left = n.saturating_sub(out.iter().sum());
                for i in order.into_iter().cycle().take(relays.len() * 2) {
                    if left == 0 {
                        break;
                    }
                    out[i] += 1;
                    left -= 1;
                }
                out
            }
        }
    }
}

impl fmt::Display for Concurrency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Concurrency::Fixed(n) => write!(f, "{n}"),
            Concurrency::Auto { max } => write!(f, "auto:{max}"),
        }
    }
}

/// Default keyset page size when reading the audience.
pub const DEFAULT_BATCH_SIZE: usize = 1000;
/// Default SMTP command timeout.
pub const DEFAULT_SMTP_TIMEOUT: Duration = Duration::from_secs(60);

/// Command-line values that override the campaign file.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    /// `--database`
    pub database: Option<String>,
    /// `--smtp` (repeatable)
    pub smtp: Vec<String>,
    /// `--concurrency`
    pub concurrency: Option<Concurrency>,
    /// `--rate`
    pub rate: Option<u32>,
    /// `--limit`
    pub limit: Option<u64>,
    /// `--dry-run DIR`
    pub dry_run: Option<PathBuf>,
    /// `blast retry`: only deferred recipients that are due.
    pub retries_only: bool,
}

/// Who receives the campaign.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Audience {
    /// `SELECT * FROM table [WHERE filter]`
    Table {
        /// Table name, validated as an identifier (optionally schema-qualified).
        table: String,
        /// Optional SQL condition, trusted operator input.
        filter: Option<String>,
    },
    /// Any SELECT returning `id` and `email`.
    Query(String),
}

impl Audience {
    /// The SELECT that yields every recipient row, before pagination.
    pub fn select_sql(&self) -> String {
        match self {
            Audience::Table {
                table,
                filter: None,
            } => format!("SELECT * FROM {table}"),
            Audience::Table {
                table,
                filter: Some(f),
            } => {
                format!("SELECT * FROM {table} WHERE ({f})")
            }
            Audience::Query(q) => q.trim().trim_end_matches(';').to_string(),
        }
    }
}

/// A template source: its text and where it came from (for error messages).
#[derive(Debug, Clone)]
pub struct TemplateSource {
    /// File path or config key, as shown in errors.
    pub name: String,
    /// The template text.
    pub body: String,
}

/// What each message looks like.
#[derive(Debug, Clone)]
pub struct MessageConfig {
    /// `From:` as written (`Name <addr>` or `addr`).
    pub from: String,
    /// Optional `Reply-To:`.
    pub reply_to: Option<String>,
    /// Optional template for the recipient's display name in `To:`.
    pub to_name: Option<String>,
    /// Subject template.
    pub subject: String,
    /// Plain-text part template.
    pub text: Option<TemplateSource>,
    /// HTML part template (auto-escaped).
    pub html: Option<TemplateSource>,
    /// Extra headers: name → value template.
    pub headers: Vec<(String, String)>,
    /// Envelope sender template (the bounce address), used when `verp` is unset.
    pub envelope_from: String,
    /// VERP envelope sender: `{campaign}`, `{recipient}` and `{sig}` filled
    /// per message, so a bounce names its recipient even when its text does not.
    pub verp: Option<Pattern>,
    /// `List-Unsubscribe` targets (RFC 2369/8058).
    pub unsubscribe: Unsubscribe,
}

/// Where recipients unsubscribe: both carry a signed `{token}`.
#[derive(Debug, Clone)]
pub struct Unsubscribe {
    /// `https://` one-click URL answered by `blast serve`.
    pub url: Pattern,
    /// Address whose mail `blast bounce ingest` treats as an unsubscribe.
    pub mailto: Pattern,
}

/// How messages leave.
#[derive(Debug, Clone)]
pub struct DeliveryConfig {
    /// Relays; injector `i` uses relay `i % len`.
    pub relays: Vec<Relay>,
    /// Transactions in flight: pinned, or found per relay (the default).
    pub concurrency: Concurrency,
    /// Max messages per second over all injectors; 0 = unlimited.
    pub rate: u32,
    /// Name sent in EHLO.
    pub helo: String,
    /// Per-command SMTP timeout.
    pub timeout: Duration,
    /// When deferred recipients are tried again.
    pub retry: RetryPolicy,
    /// Consecutive 5xx refusals (over at least three domains) that pause the
    /// campaign; 0 turns the breaker off.
    pub breaker_threshold: u32,
    /// Use BDAT when the relay offers CHUNKING (else DATA).
    pub chunking: bool,
    /// With `concurrency = "auto"` on the MTA's host: a command printing the
    /// MTA's queue (a number, or one line per message, as `postqueue -j`
    /// does), run at most once a second; above `queue_target` every relay
    /// gets a congestion mark.
    pub queue_probe: Option<QueueProbe>,
}

/// The schedule for deferred (4xx) recipients.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Wait before attempt 2, 3, ...; the last delay repeats.
    pub delays: Vec<Duration>,
    /// After this long since the first deferral, a deferred recipient fails.
    pub give_up_after: Duration,
}

impl Default for RetryPolicy {
    /// 5 min, 30 min, 2 h, then every 6 h; give up after 2 days.
    fn default() -> Self {
        let m = |n: u64| Duration::from_secs(n * 60);
        RetryPolicy {
            delays: vec![m(5), m(30), m(120), m(360)],
            give_up_after: m(2 * 24 * 60),
        }
    }
}

impl RetryPolicy {
    /// The wait after a recipient's `attempts`-th deferral (1-based).
    pub fn delay_after(&self, attempts: u32) -> Duration {
        let i = (attempts.max(1) as usize - 1).min(self.delays.len().saturating_sub(1));
        self.delays.get(i).copied().unwrap_or_default()
    }
}

/// Default for `delivery.breaker_threshold`.
pub const DEFAULT_BREAKER_THRESHOLD: u32 = 25;

/// Parses `90s`, `5m`, `2h`, `2d` (a bare number is seconds).
pub fn parse_duration(s: &str) -> std::result::Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (n, unit) = s.split_at(split);
    let n: u64 = n
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 30s, 5m, 2h or 2d"))?;
    let secs = match unit.trim() {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        _ => return Err(format!("{s:?}: unknown unit (use s, m, h or d)")),
    };
    Ok(Duration::from_secs(n * secs))
}

/// A validated campaign, ready to build pools, transports and templates from.
#[derive(Clone)]
pub struct Config {
    /// Unique campaign id in the ledger.
    pub name: String,
    /// sqlx URL, secrets expanded.
    pub database: String,
    /// Who receives it.
    pub audience: Audience,
    /// Keyset page size.
    pub batch_size: usize,
    /// Campaign-wide template values.
    pub vars: serde_json::Map<String, serde_json::Value>,
    /// Message templates.
    pub message: MessageConfig,
    /// Delivery settings.
    pub delivery: DeliveryConfig,
    /// Send to the first N pending recipients only.
    pub limit: Option<u64>,
    /// Write `.eml` files here instead of sending.
    pub dry_run: Option<PathBuf>,
    /// Send only deferred recipients that are due (`blast retry`).
    pub retries_only: bool,
    /// When a scheduled campaign is due (`send_at`).
    pub send_at: Option<time::OffsetDateTime>,
    /// A scheduled campaign later than this is held for the operator.
    pub max_delay: Duration,
    /// The template files as written in the campaign file, with their text
    /// (what `blast schedule` freezes into the database).
    pub template_files: Vec<(String, String)>,
}

/// The MTA queue probe (see [`DeliveryConfig::queue_probe`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueProbe {
    /// Run with `sh -c`.
    pub command: String,
    /// Queue depth above which relays are marked congested.
    pub target: u64,
}

/// Default `queue_target`.
pub const DEFAULT_QUEUE_TARGET: u64 = 5000;

/// Default for `max_delay`.
pub const DEFAULT_MAX_DELAY: Duration = Duration::from_secs(6 * 3600);

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("name", &self.name)
            .field("database", &crate::db::redact(&self.database))
            .field("audience", &self.audience)
            .field("delivery", &self.delivery)
            .field("limit", &self.limit)
            .field("dry_run", &self.dry_run)
            .finish_non_exhaustive()
    }
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

impl Config {
    /// Reads `path`, applies `overrides` and environment, and validates.
    pub fn load(path: &Path, overrides: &Overrides) -> Result<Config> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let base = path.parent().unwrap_or(Path::new("."));
        Self::parse(&text, &path.display().to_string(), base, overrides, &|k| {
            std::env::var(k).ok()
        })
    }

    /// Parses campaign text; `base` resolves relative template and SQLite paths,
    /// `env` looks up `${VARS}`. Pure apart from reading template files.
    pub fn parse(
        text: &str,
        file: &str,
        base: &Path,
        overrides: &Overrides,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config> {
        // toml's error already names the key and line; we add the file.
        let raw: CampaignFile =
            toml::from_str(text).map_err(|e| Error::config(file, "campaign", e.to_string()))?;
        let err = |key: &str, msg: String| Error::config(file, key, msg);

        let name = raw.name.trim().to_string();
        if name.is_empty() || name.len() > 200 || name.chars().any(|c| c.is_control()) {
            return Err(err("name", "must be 1-200 printable characters".into()));
        }

        let database = match (&overrides.database, &raw.database) {
            (Some(db), _) => expand_env(db, &|k| env(k)).map_err(|m| err("--database", m))?,
            (None, Some(db)) => {
                let db = expand_env(db, &|k| env(k)).map_err(|m| err("database", m))?;
                resolve_sqlite_path(&db, base)
            }
            (None, None) => {
                return Err(err(
                    "database",
                    "missing: set `database = \"sqlite://blast.db\"` or pass --database".into(),
                ))
            }
        };

        let audience = match (raw.audience.table, raw.audience.query) {
            (Some(t), None) => {
                if !is_sql_identifier(&t) {
                    return Err(err("audience.table", format!("{t:?} is not a table name (letters, digits, _ and one optional schema.)")));
                }
                Audience::Table {
                    table: t,
                    filter: raw.audience.filter.filter(|f| !f.trim().is_empty()),
                }
            }
            (None, Some(q)) => {
                if raw.audience.filter.is_some() {
                    return Err(err(
                        "audience.where",
                        "only valid with `table`; put the condition in `query`".into(),
                    ));
                }
                let lower = q.trim_start().to_ascii_lowercase();
                if !(lower.starts_with("select") || lower.starts_with("with")) {
                    return Err(err(
                        "audience.query",
                        "must be a SELECT (or WITH ... SELECT) statement".into(),
                    ));
                }
                Audience::Query(q)
            }
            (Some(_), Some(_)) => {
                return Err(err(
                    "audience",
                    "set either `table` or `query`, not both".into(),
                ))
            }
            (None, None) => {
                return Err(err(
                    "audience",
                    "set `table = \"subscribers\"` or `query = \"SELECT id, email, ...\"`".into(),
                ))
            }
        };
        let batch_size = raw.audience.batch_size.unwrap_or(DEFAULT_BATCH_SIZE);
        if !(1..=100_000).contains(&batch_size) {
            return Err(err(
                "audience.batch_size",
                "must be between 1 and 100000".into(),
            ));
        }

        let vars = match serde_json::to_value(&raw.vars) {
            Ok(serde_json::Value::Object(m)) => m,
            _ => return Err(err("vars", "must be a table".into())),
        };

        let m = raw.message;
        let read_template = |key: &str, p: &Option<PathBuf>| -> Result<Option<TemplateSource>> {
            let Some(p) = p else { return Ok(None) };
            let full = base.join(p);
            let body = std::fs::read_to_string(&full)
                .map_err(|e| err(key, format!("cannot read {}: {e}", full.display())))?;
            Ok(Some(TemplateSource {
                name: full.display().to_string(),
                body,
            }))
        };
        let text_t = read_template("message.text", &m.text)?;
        let html_t = read_template("message.html", &m.html)?;
        let mut template_files: Vec<(String, String)> = [(&m.text, &text_t), (&m.html, &html_t)]
            .into_iter()
            .filter_map(|(p, t)| {
                Some((p.as_ref()?.display().to_string(), t.as_ref()?.body.clone()))
            })
            .collect();
        let send_at = match &raw.send_at {
            Some(t) => Some(
                time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339)
                    .map_err(|e| {
                        err(
                            "send_at",
                            format!("{t:?} is not an RFC 3339 time like 2026-12-01T09:00:00Z: {e}"),
                        )
                    })?,
            ),
            None => None,
        };
        let max_delay = match &raw.max_delay {
            Some(d) => parse_duration(d).map_err(|m| err("max_delay", m))?,
            None => DEFAULT_MAX_DELAY,
        };
        if text_t.is_none() && html_t.is_none() {
            return Err(err(
                "message",
                "set `text` and/or `html` (template paths)".into(),
            ));
        }
        if m.subject.trim().is_empty() {
            return Err(err("message.subject", "must not be empty".into()));
        }
        let mut headers = Vec::new();
        for (h, v) in m.headers {
            if h.is_empty() || !h.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
                return Err(err(
                    &format!("message.headers.{h}"),
                    "header names are letters, digits and '-'".into(),
                ));
            }
            if RESERVED_HEADERS.contains(&h.to_ascii_lowercase().as_str()) {
                return Err(err(
                    &format!("message.headers.{h}"),
                    "blast sets this header itself".into(),
                ));
            }
            headers.push((h, v));
        }

        let d = raw.delivery.unwrap_or_default();
        let mut retry = RetryPolicy::default();
        if let Some(list) = &d.retry {
            retry.delays = list
                .iter()
                .map(|s| parse_duration(s))
                .collect::<std::result::Result<_, _>>()
                .map_err(|m| err("delivery.retry", m))?;
            if retry.delays.is_empty() {
                return Err(err(
                    "delivery.retry",
                    "needs at least one delay, e.g. [\"5m\"]".into(),
                ));
            }
        }
        if let Some(g) = &d.give_up_after {
            retry.give_up_after =
                parse_duration(g).map_err(|m| err("delivery.give_up_after", m))?;
        }
        let entries: Vec<RelayFile> = if !overrides.smtp.is_empty() {
            overrides.smtp.iter().cloned().map(RelayFile::Url).collect()
        } else {
            match d.smtp {
                Some(OneOrMany::One(s)) => vec![RelayFile::Url(s)],
                Some(OneOrMany::Many(v)) => v,
                None => vec![RelayFile::Url("smtp://127.0.0.1:25".to_string())],
            }
        };
        let from_domain = address_part(&m.from)
            .rsplit_once('@')
            .map(|(_, d)| d.trim_end_matches('.').to_ascii_lowercase())
            .unwrap_or_default();
        let mut relays = Vec::new();
        let mut routed_away = 0;
        for e in entries {
            let t = match e {
                RelayFile::Url(url) => RelayTable {
                    url,
                    ..Default::default()
                },
                RelayFile::Table(t) => t,
            };
            // Routing first: a relay this campaign may not use is not
            // checked (its password or CA file may not be here at all).
            let domains = from_domains(t.from_domains.as_deref().unwrap_or_default())
                .map_err(|m| err("delivery.smtp", format!("{}: {m}", t.url)))?;
            if !serves(&domains, &from_domain) {
                routed_away += 1;
                continue;
            }
            let mut relay = relay_from_table(t, base, env, &mut template_files)
                .map_err(|m| err("delivery.smtp", m))?;
            relay.from_domains = domains;
            relays.push(relay);
        }
        if relays.is_empty() && routed_away > 0 {
            return Err(err(
                "delivery.smtp",
                format!(
                    "none of the {routed_away} relays may send mail from {from_domain:?}: \
                     add it to a relay's from_domains, or add a relay without from_domains"
                ),
            ));
        }
        if relays.is_empty() {
            return Err(err(
                "delivery.smtp",
                "needs at least one smtp:// URL".into(),
            ));
        }
        let concurrency = match (overrides.concurrency, d.concurrency) {
            (Some(c), _) => c,
            (None, Some(ConcurrencyFile::Number(n))) => {
                Concurrency::parse(&n.to_string()).map_err(|m| err("delivery.concurrency", m))?
            }
            (None, Some(ConcurrencyFile::Text(t))) => {
                Concurrency::parse(&t).map_err(|m| err("delivery.concurrency", m))?
            }
            (None, None) => Concurrency::Auto {
                max: crate::adaptive::DEFAULT_MAX,
            },
        };
        let verp = match raw.bounces.and_then(|b| b.verp) {
            Some(v) => {
                if d.envelope_from.is_some() {
                    return Err(err(
                        "bounces.verp",
                        "set either bounces.verp or delivery.envelope_from, not both".into(),
                    ));
                }
                let p = Pattern::parse(&v, &[Var::Campaign, Var::Recipient, Var::Sig])
                    .map_err(|m| err("bounces.verp", m))?;
                check_address_pattern(&p).map_err(|m| err("bounces.verp", m))?;
                Some(p)
            }
            None => None,
        };
        if d.queue_target.is_some() && d.queue_probe.is_none() {
            return Err(err(
                "delivery.queue_target",
                "needs delivery.queue_probe (e.g. \"postqueue -j\")".into(),
            ));
        }
        let envelope_from = d.envelope_from.unwrap_or_else(|| {
            // Default bounce address: the From address itself.
            address_part(&m.from).to_string()
        });
        let unsubscribe =
            parse_unsubscribe(raw.unsubscribe, &m.from).map_err(|(k, m)| err(k, m))?;
        let helo = d.helo.unwrap_or_else(|| "localhost".to_string());
        let timeout = d
            .timeout_secs
            .map(Duration::from_secs)
            .unwrap_or(DEFAULT_SMTP_TIMEOUT);
        if timeout.is_zero() {
            return Err(err("delivery.timeout_secs", "must be at least 1".into()));
        }

        Ok(Config {
            name,
            database,
            audience,
            batch_size,
            vars,
            message: MessageConfig {
                from: m.from,
                reply_to: m.reply_to,
                to_name: m.to_name,
                subject: m.subject,
                text: text_t,
                html: html_t,
                headers,
                envelope_from,
                verp,
                unsubscribe,
            },
            delivery: DeliveryConfig {
                relays,
                concurrency,
                rate: overrides.rate.or(d.rate).unwrap_or(0),
                helo,
                timeout,
                retry,
                breaker_threshold: d.breaker_threshold.unwrap_or(DEFAULT_BREAKER_THRESHOLD),
                chunking: d.chunking.unwrap_or(true),
                queue_probe: d
                    .queue_probe
                    .filter(|c| !c.trim().is_empty())
                    .map(|command| QueueProbe {
                        command,
                        target: d.queue_target.unwrap_or(DEFAULT_QUEUE_TARGET),
                    }),
            },
            limit: overrides.limit,
            dry_run: overrides.dry_run.clone(),
            retries_only: overrides.retries_only,
            send_at,
            max_delay,
            template_files,
        })
    }
}

/// Validates `[unsubscribe]`: an `https://` URL and a mailto address, each
/// with one `{token}`. The mailto defaults to `unsubscribe+{token}@` the
/// From domain. Errors are (key, message).
fn parse_unsubscribe(
    raw: Option<UnsubscribeFile>,
    from: &str,
) -> std::result::Result<Unsubscribe, (&'static str, String)> {
    let raw = raw.ok_or((
        "unsubscribe",
        "missing: every campaign message carries List-Unsubscribe (RFC 8058); add \
         [unsubscribe] with url = \"https://lists.example.com/unsubscribe/{token}\" \
         (answered by `blast serve`)"
            .to_string(),
    ))?;
    let url = Pattern::parse(raw.url.trim(), &[Var::Token]).map_err(|m| ("unsubscribe.url", m))?;
    let rest = url.as_str().strip_prefix("https://").unwrap_or_default();
    if rest.is_empty() || rest.starts_with('{') || url.as_str().contains(char::is_whitespace) {
        return Err((
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
    let mailto = Pattern::parse(&mailto, &[Var::Token]).map_err(|m| ("unsubscribe.mailto", m))?;
    check_address_pattern(&mailto).map_err(|m| ("unsubscribe.mailto", m))?;
    Ok(Unsubscribe { url, mailto })
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

/// Expands `${NAME}` from `env`; a missing variable is an error naming it.
pub fn expand_env(
    s: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> std::result::Result<String, String> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after
            .find('}')
            .ok_or_else(|| format!("unterminated ${{ in {:?}", crate::db::redact(s)))?;
        let name = &after[..end];
        let value = env(name).ok_or_else(|| format!("environment variable {name} is not set"))?;
        out.push_str(&value);
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
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

/// `Name <a@b>` → `a@b`; a bare address is returned as is.
pub fn address_part(s: &str) -> &str {
    match (s.rfind('<'), s.rfind('>')) {
        (Some(a), Some(b)) if a < b => s[a + 1..b].trim(),
        _ => s.trim(),
    }
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

#[cfg(test)]
mod tests;
