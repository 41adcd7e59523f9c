//! `campaign.toml` + environment + command-line overrides → a validated
//! [`Config`]. Pure: reads the campaign file and the template and CA files it names,
//! never opens a database or a socket. Secrets are expanded from `${VARS}` and
//! never printed: [`Config`]'s `Debug` redacts URLs.
//!
//! Read in stages, as ripgrep reads its arguments: `raw.rs` is the file as
//! written (serde, no checks), `sections.rs` checks one section at a time,
//! and [`Config::parse`] puts the pieces together; `relay.rs` checks one
//! relay.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::error::{Error, Result};
use crate::sign::Pattern;

mod raw;
mod relay;
mod sections;

use raw::CampaignFile;
pub use relay::{Relay, Secret, Tls, SMTP_PASSWORD_ENV};
use sections::Checked;

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
    /// `--worker`: this process's worker name (default: the host name).
    pub worker: Option<String>,
    /// `--metrics ADDR`: serve Prometheus metrics while sending.
    pub metrics: Option<std::net::SocketAddr>,
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
    /// Recipients in a row failing to render with the same error (a
    /// template mistake) that pause the campaign; 0 = never.
    pub render_pause: u32,
    /// Tries of a message whose connection drops after its data before it
    /// is recorded failed, "possibly delivered".
    pub ambiguous_tries: u32,
    /// Fraction (0 to 1) of one relay's last `breaker_window` answers that,
    /// refusing the address as unknown (5.1.x and kin), pauses the campaign;
    /// 0 turns this rule off. Defaults to 0.5.
    pub breaker_rate: f64,
    /// Answers per relay `breaker_rate` is taken over. Defaults to 200.
    pub breaker_window: u32,
    /// Use BDAT when the relay offers CHUNKING (else DATA, the default).
    pub chunking: bool,
    /// With `concurrency = "auto"` on the MTA's host: a command printing the
    /// MTA's queue (a number, or one line per message, as `postqueue -j`
    /// does), run at most once a second; above `queue_target` every relay
    /// gets a congestion mark.
    pub queue_probe: Option<QueueProbe>,
    /// How workers share the campaign.
    pub workers: Workers,
    /// Where to serve Prometheus metrics while sending (`/metrics`);
    /// None = off.
    pub metrics: Option<std::net::SocketAddr>,
}

/// How several workers share one campaign (see `docs/scale-out.md`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Workers {
    /// At most this many live workers; None = no cap.
    pub max_workers: Option<u32>,
    /// Recipient ids per claim; None = sized to [`Workers::claim_time`] of
    /// this worker's measured rate.
    pub claim_size: Option<u64>,
    /// How long one claim should last at this worker's rate.
    pub claim_time: Duration,
    /// A worker (and its claims) not heard from for this long is dead.
    pub ttl: Duration,
}

impl Default for Workers {
    fn default() -> Self {
        Workers {
            max_workers: None,
            claim_size: None,
            claim_time: DEFAULT_CLAIM_TIME,
            ttl: DEFAULT_WORKER_TTL,
        }
    }
}

/// Default for `delivery.claim_time`.
pub const DEFAULT_CLAIM_TIME: Duration = Duration::from_secs(15);
/// Default for `delivery.worker_ttl`.
pub const DEFAULT_WORKER_TTL: Duration = Duration::from_secs(30);

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

/// Default for `delivery.render_pause`: small, because a template mistake
/// fails every recipient alike at render speed.
pub const DEFAULT_RENDER_PAUSE: u32 = 5;

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
    /// With `dry_run`: render every recipient and keep no message
    /// (`blast check --render`).
    pub render_only: bool,
    /// Send only deferred recipients that are due (`blast retry`).
    pub retries_only: bool,
    /// This process's name among the campaign's workers.
    pub worker: String,
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
            .field("render_only", &self.render_only)
            .finish_non_exhaustive()
    }
}

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
    ///
    /// In stages, as ripgrep parses its arguments: the TOML as written
    /// (`raw.rs`, no checks), then one check per section (`sections.rs`),
    /// then the pieces put together.
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
        Config::from_raw(raw, base, overrides, env)
            .map_err(|e| Error::config(file, e.key, e.message))
    }

    /// Checks each section of `raw` and builds the [`Config`]. The checks
    /// run in the order the file has always been checked in, so a file with
    /// several mistakes still reports the same one first; that is why the
    /// message and delivery checks interleave.
    fn from_raw(
        raw: CampaignFile,
        base: &Path,
        overrides: &Overrides,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Checked<Config> {
        let name = sections::name(&raw.name)?;
        let database = sections::database(
            overrides.database.as_deref(),
            raw.database.as_deref(),
            base,
            env,
        )?;
        let (audience, batch_size) = sections::audience(raw.audience)?;
        let vars = sections::vars(&raw.vars)?;
        let m = raw.message;
        let templates = sections::templates(&m, base)?;
        let send_at = sections::send_at(raw.send_at.as_deref())?;
        let max_delay = sections::max_delay(raw.max_delay.as_deref())?;
        sections::message(&templates, &m.subject)?;
        let headers = sections::headers(m.headers)?;
        let d = raw.delivery.unwrap_or_default();
        let retry = sections::retry(d.retry.as_deref(), d.give_up_after.as_deref())?;
        let mut template_files = templates.files;
        let relays = sections::relays(
            &overrides.smtp,
            d.smtp,
            &m.from,
            base,
            env,
            &mut template_files,
        )?;
        let concurrency = sections::concurrency(overrides.concurrency, d.concurrency)?;
        let verp = sections::verp(raw.bounces, d.envelope_from.is_some())?;
        let queue_probe = sections::queue_probe(d.queue_probe, d.queue_target)?;
        let metrics = sections::metrics(overrides.metrics, d.metrics)?;
        // Default bounce address: the From address itself.
        let envelope_from = d
            .envelope_from
            .unwrap_or_else(|| address_part(&m.from).to_string());
        let unsubscribe = sections::unsubscribe(raw.unsubscribe, &m.from)?;
        let timeout = sections::timeout(d.timeout_secs)?;
        let workers = sections::workers(
            d.max_workers,
            d.claim_size,
            d.claim_time.as_deref(),
            d.worker_ttl.as_deref(),
        )?;
        let worker = sections::worker(overrides.worker.as_deref())?;
        let (breaker_rate, breaker_window) =
            sections::breaker_rate(d.breaker_rate, d.breaker_window)?;
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
                text: templates.text,
                html: templates.html,
                headers,
                envelope_from,
                verp,
                unsubscribe,
            },
            delivery: DeliveryConfig {
                relays,
                concurrency,
                rate: overrides.rate.or(d.rate).unwrap_or(0),
                helo: d.helo.unwrap_or_else(|| "localhost".to_string()),
                timeout,
                retry,
                breaker_threshold: d.breaker_threshold.unwrap_or(DEFAULT_BREAKER_THRESHOLD),
                render_pause: d.render_pause.unwrap_or(DEFAULT_RENDER_PAUSE),
                ambiguous_tries: d.ambiguous_tries.unwrap_or(3).max(1),
                breaker_rate,
                breaker_window,
                // DATA with the next envelope written ahead is one round
                // trip per message too, and cheaper for Postfix.
                chunking: d.chunking.unwrap_or(false),
                queue_probe,
                workers,
                metrics,
            },
            limit: overrides.limit,
            dry_run: overrides.dry_run.clone(),
            render_only: false,
            retries_only: overrides.retries_only,
            worker,
            send_at,
            max_delay,
            template_files,
        })
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

/// `Name <a@b>` → `a@b`; a bare address is returned as is.
pub fn address_part(s: &str) -> &str {
    match (s.rfind('<'), s.rfind('>')) {
        (Some(a), Some(b)) if a < b => s[a + 1..b].trim(),
        _ => s.trim(),
    }
}

#[cfg(test)]
mod tests;
