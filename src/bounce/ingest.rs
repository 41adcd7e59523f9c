//! `blast bounce ingest`: inbound mail → bounce events and suppressions.
//!
//! Each message is parsed ([`super::parse`]), then tied to a campaign and
//! recipient by, in order: an unsubscribe mailto address carrying a signed
//! token, the VERP address it was delivered to, or the signed `X-Blast-*`
//! headers of the returned original. Only a signed correlation may suppress
//! an address (a forged bounce must not unsubscribe anyone), unless the
//! operator passes `trust_unsigned` because their campaigns send without VERP.
//!
//! - hard bounce → suppressed at once;
//! - soft bounce → recorded; [`Policy::soft_limit`] signed ones (any, with
//!   `trust_unsigned`) within [`Policy::soft_window`] suppress;
//! - complaint (ARF) → suppressed at once;
//! - auto-reply, delay, delivery notice → recorded only;
//! - anything else (unparseable, a human mail, no recipient, or only
//!   recipients that are not addresses by [`crate::address`]'s rule) →
//!   quarantined.
//!
//! Addresses are compared and stored in their canonical form
//! ([`address::canonical`]).
//!
//! Events go to `blast_bounces`, once per (message, address, kind), so a
//! message ingested twice after a crash counts once. This module reads mail
//! stores only through [`super::mailbox`] and never sends.

use std::collections::HashMap;
use std::time::Duration;

use serde::Serialize;
use sha2::{Digest, Sha256};
use sqlx::AssertSqlSafe;
use time::OffsetDateTime;

use super::mailbox::{Disposition, Inbox, Summary as MailboxSummary};
use super::parse::{self, Finding, Kind, Report};
use crate::address;
use crate::classify::Class;
use crate::clock;
use crate::db::Db;
use crate::error::Result;
use crate::ledger;
use crate::sign::{Key, Pattern, Var};
use crate::suppress;

/// When soft bounces and unsigned mail suppress an address.
#[derive(Debug, Clone)]
pub struct Policy {
    /// Soft bounces within `soft_window` that suppress (0 = never). Default 3.
    pub soft_limit: u32,
    /// Default 14 days.
    pub soft_window: Duration,
    /// Let bounces and complaints without a valid signature suppress too.
    /// Default false: anyone can send a bounce-shaped mail.
    pub trust_unsigned: bool,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            soft_limit: 3,
            soft_window: Duration::from_secs(14 * 86_400),
            trust_unsigned: false,
        }
    }
}

/// What happened to one message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Events recorded (possibly none new, if seen before).
    Recorded(Vec<Event>),
    /// A mail to an unsubscribe address with a valid token.
    Unsubscribed {
        /// The address now suppressed.
        address: String,
    },
    /// Not usable: moved aside for a human, with the reason.
    Quarantine(String),
}

/// One recorded bounce, complaint, or notice about one address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Event {
    /// The address it is about (canonical form).
    pub address: String,
    /// `bounce`, `delay`, `complaint`, `autoreply` or `delivered`.
    pub kind: &'static str,
    /// `hard`, `soft` or `other`.
    pub class: &'static str,
    /// The parser's reason (userunknown, mailboxfull, feedback, ...).
    pub reason: String,
    /// Enhanced status code, if any.
    pub status: Option<String>,
    /// Campaign and recipient, when a signature proved them.
    pub campaign_id: Option<i64>,
    /// See `campaign_id`.
    pub recipient_id: Option<i64>,
    /// Why the address was suppressed by this event, if it was.
    pub suppressed: Option<String>,
    /// False when this message had already been ingested.
    pub new: bool,
}

/// A proven (campaign, recipient) and the address blast sent to.
#[derive(Debug, Clone)]
struct Correlation {
    campaign: i64,
    recipient: i64,
    address: String,
}

/// Ingests messages into one database; holds the key, the address patterns
/// campaigns were sent with, and a campaign-name cache.
pub struct Ingestor {
    db: Db,
    key: Key,
    verp: Vec<Pattern>,
    mailto: Vec<Pattern>,
    policy: Policy,
    extra_recipients: Vec<String>,
    campaigns: HashMap<String, Option<i64>>,
}

impl Ingestor {
    /// Loads the signing key and the patterns of every campaign sent so far.
    pub async fn new(db: Db, policy: Policy) -> Result<Ingestor> {
        let key = Key::load(&db).await?;
        let (verp, mailto) = ledger::inbound_patterns(&db).await?;
        let parse_all = |raw: Vec<String>, vars: &[Var]| -> Vec<Pattern> {
            raw.iter()
                .filter_map(|p| Pattern::parse(p, vars).ok())
                .collect()
        };
        Ok(Ingestor {
            verp: parse_all(verp, &[Var::Campaign, Var::Recipient, Var::Sig]),
            mailto: parse_all(mailto, &[Var::Token]),
            db,
            key,
            policy,
            extra_recipients: Vec::new(),
            campaigns: HashMap::new(),
        })
    }

    /// Envelope recipients the MTA passed on the command line (Postfix
    /// `pipe`'s `${original_recipient}`), tried before the mail's headers.
    pub fn with_recipients(mut self, recipients: Vec<String>) -> Ingestor {
        self.extra_recipients = recipients;
        self
    }

    /// Ingests one message. `Err` only for database failures: the message
    /// should then be left where it is and tried again later.
    pub async fn ingest(&mut self, raw: &[u8], source: &str) -> Result<Verdict> {
        let report = match parse::parse(raw) {
            Ok(r) => r,
            Err(e) => return Ok(Verdict::Quarantine(e.to_string())),
        };
        let hash = message_hash(raw);
        let envelope: Vec<String> = self
            .extra_recipients
            .iter()
            .chain(report.envelope_to.iter())
            .filter_map(|a| address::canonical(a).ok())
            .collect();

        // An unsubscribe mail: the token in the address decides.
        if let Some(verdict) = self.unsubscribe(&envelope).await? {
            return Ok(verdict);
        }

        let correlation = match self.by_verp(&envelope).await? {
            Some(c) => Some(c),
            None => self.by_header(&report).await?,
        };
        match report.kind {
            Kind::NotBounce => {
                return Ok(Verdict::Quarantine(
                    "not a bounce, complaint, auto-reply or unsubscribe".into(),
                ))
            }
            _ if report.results.is_empty() && correlation.is_none() => {
                return Ok(Verdict::Quarantine(format!(
                    "{} names no recipient and carries no blast signature",
                    kind_name(report.kind)
                )))
            }
            _ => {}
        }
        let (findings, invalid) = attribute(&report, correlation.as_ref());
        if findings.iter().all(|(a, _)| a.is_empty()) {
            if let Some((raw, why)) = invalid.first() {
                return Ok(Verdict::Quarantine(format!(
                    "{} is about {raw:?}, which is not an email address ({why}), \
                     and carries no blast signature",
                    kind_name(report.kind)
                )));
            }
            return Ok(Verdict::Quarantine(format!(
                "{} names no recipient and carries no blast signature",
                kind_name(report.kind)
            )));
        }
        for (raw, why) in &invalid {
            tracing::warn!("{source}: skipped {raw:?}, not an email address ({why})");
        }
        let mut events = Vec::new();
        for (address, finding) in findings {
            if address.is_empty() {
                continue;
            }
            let signed = correlation.as_ref().filter(|c| c.address == address);
            let event = self
                .record(report.kind, &address, &finding, signed, source, &hash)
                .await?;
            events.push(event);
        }
        Ok(Verdict::Recorded(events))
    }

    /// A mail to the unsubscribe address: the signed token in it decides
    /// (`None` when no envelope recipient is an unsubscribe address).
    async fn unsubscribe(&self, envelope: &[String]) -> Result<Option<Verdict>> {
        for to in envelope {
            let Some(token) = capture_one(&self.mailto, to, Var::Token) else {
                continue;
            };
            let Some((campaign, recipient)) = self.key.check_token(&token) else {
                return Ok(Some(Verdict::Quarantine(format!(
                    "mail to unsubscribe address {to} with an invalid token"
                ))));
            };
            let Some(address) = ledger::recipient_address(&self.db, campaign, recipient).await?
            else {
                return Ok(Some(Verdict::Quarantine(format!(
                    "unsubscribe token for campaign {campaign}, recipient {recipient}, which blast never sent"
                ))));
            };
            let address = match address::canonical(&address) {
                Ok(key) => key,
                Err(why) => {
                    return Ok(Some(Verdict::Quarantine(format!(
                        "unsubscribe for {address:?}, which is not an email address ({why})"
                    ))))
                }
            };
            suppress::add(
                &self.db,
                &address,
                "unsubscribe",
                &format!("mailto:campaign={campaign}"),
            )
            .await?;
            return Ok(Some(Verdict::Unsubscribed { address }));
        }
        Ok(None)
    }

    /// The signed VERP address among the envelope recipients, if any.
    async fn by_verp(&self, envelope: &[String]) -> Result<Option<Correlation>> {
        for to in envelope {
            for p in &self.verp {
                let Some(vars) = p.capture(to) else { continue };
                let get = |v: Var| vars.iter().find(|(k, _)| *k == v).map(|(_, x)| x.as_str());
                let (Some(c), Some(r), Some(sig)) = (
                    get(Var::Campaign).and_then(|c| c.parse().ok()),
                    get(Var::Recipient).and_then(|r| r.parse().ok()),
                    get(Var::Sig),
                ) else {
                    continue;
                };
                if !self.key.check_verp(c, r, sig) {
                    tracing::warn!("{to}: VERP signature does not match; treated as unsigned");
                    continue;
                }
                let address = ledger::recipient_address(&self.db, c, r).await?;
                if let Some(address) = address.and_then(|a| address::canonical(&a).ok()) {
                    return Ok(Some(Correlation {
                        campaign: c,
                        recipient: r,
                        address,
                    }));
                }
            }
        }
        Ok(None)
    }

    /// The signed `X-Blast-Campaign`/`-Recipient`/`-Sig` headers of the
    /// returned original, if present and valid.
    async fn by_header(&mut self, report: &Report) -> Result<Option<Correlation>> {
        let get = |name: &str| {
            report
                .original_headers
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.trim().to_string())
        };
        let (Some(name), Some(rid), Some(sig)) = (
            get("X-Blast-Campaign"),
            get("X-Blast-Recipient").and_then(|r| r.parse::<i64>().ok()),
            get("X-Blast-Sig"),
        ) else {
            return Ok(None);
        };
        let campaign = match self.campaigns.get(&name) {
            Some(id) => *id,
            None => {
                let id = ledger::campaign_id(&self.db, &name).await?;
                self.campaigns.insert(name.clone(), id);
                id
            }
        };
        let Some(campaign) = campaign.filter(|c| self.key.check_verp(*c, rid, &sig)) else {
            tracing::warn!(
                "X-Blast headers of campaign {name:?} do not verify; treated as unsigned"
            );
            return Ok(None);
        };
        Ok(ledger::recipient_address(&self.db, campaign, rid)
            .await?
            .and_then(|a| address::canonical(&a).ok())
            .map(|address| Correlation {
                campaign,
                recipient: rid,
                address,
            }))
    }

    /// Stores one event and applies the suppression policy.
    async fn record(
        &self,
        kind: Kind,
        address: &str,
        f: &Finding,
        signed: Option<&Correlation>,
        source: &str,
        hash: &str,
    ) -> Result<Event> {
        let kind = match (kind, f.class) {
            // A complaint report may also carry auto-reply findings; the
            // mail's kind wins for what it is about.
            (Kind::Complaint, _) => "complaint",
            (k, _) => kind_name(k),
        };
        let class = f.class.as_str();
        let mut event = Event {
            address: address.to_string(),
            kind,
            class,
            reason: f.reason.clone(),
            status: f.status.clone(),
            campaign_id: signed.map(|c| c.campaign),
            recipient_id: signed.map(|c| c.recipient),
            suppressed: None,
            new: false,
        };
        let now = clock::now();
        event.new = self.insert(&event, f, source, hash, now).await?;
        if !event.new || (signed.is_none() && !self.policy.trust_unsigned) {
            return Ok(event);
        }
        if let Some(why) = self.suppression_reason(&event, f, now).await? {
            let source = format!("bounce:{source}");
            if suppress::add(&self.db, address, &why, &source).await? {
                event.suppressed = Some(why);
            }
        }
        Ok(event)
    }

    /// Stores `event`'s row; false when it is there already (the same
    /// message ingested again: one row per message, address and kind).
    async fn insert(
        &self,
        event: &Event,
        f: &Finding,
        source: &str,
        hash: &str,
        now: OffsetDateTime,
    ) -> Result<bool> {
        let inserted = sqlx::query(
            "INSERT INTO blast_bounces (campaign_id, recipient_id, address, kind, class, reason, \
             status, diagnostic, source, message_hash, received_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11) \
             ON CONFLICT (message_hash, address, kind) DO NOTHING",
        )
        .bind(event.campaign_id)
        .bind(event.recipient_id)
        .bind(&event.address)
        .bind(event.kind)
        .bind(event.class)
        .bind(&f.reason)
        .bind(&f.status)
        .bind(&f.diagnostic)
        .bind(source)
        .bind(hash)
        .bind(clock::db_timestamp(now))
        .execute(self.db.pool())
        .await?
        .rows_affected()
            > 0;
        Ok(inserted)
    }

    /// Why a new event suppresses its address, if it does: any complaint,
    /// a hard bounce, or the soft bounce that reaches the policy's limit
    /// within its window.
    async fn suppression_reason(
        &self,
        event: &Event,
        f: &Finding,
        now: OffsetDateTime,
    ) -> Result<Option<String>> {
        let status = f.status.as_deref().unwrap_or("-");
        Ok(match (event.kind, f.class) {
            ("complaint", _) => Some(format!(
                "complaint: {}",
                f.feedback_type.as_deref().unwrap_or("abuse")
            )),
            ("bounce", Class::Hard) => Some(hard_bounce_reason(status, &f.reason)),
            ("bounce", Class::Soft) if self.policy.soft_limit > 0 => {
                let since = now - self.policy.soft_window;
                // Only signed events count (they carry the campaign), as
                // only signed ones suppress: forged soft bounces must not
                // add up to a suppression.
                let signed = if self.policy.trust_unsigned {
                    ""
                } else {
                    " AND campaign_id IS NOT NULL"
                };
                let n: i64 = sqlx::query_scalar(AssertSqlSafe(format!(
                    "SELECT COUNT(*) FROM blast_bounces WHERE address = $1 AND kind = 'bounce' \
                     AND class = 'soft' AND received_at >= $2{signed}"
                )))
                .bind(&event.address)
                .bind(clock::db_timestamp(since))
                .fetch_one(self.db.pool())
                .await?;
                (n >= i64::from(self.policy.soft_limit)).then(|| {
                    format!(
                        "soft bounces: {n} within {} (last: {status} {})",
                        ledger::humanize(self.policy.soft_window),
                        f.reason
                    )
                })
            }
            _ => None,
        })
    }
}

/// The suppression reason of a hard bounce with enhanced status `status`
/// (`-` when none) and reason name `reason`: `hard bounce: 5.1.1
/// userunknown`. Bounce mail and `blast reconcile` write the same words.
pub fn hard_bounce_reason(status: &str, reason: &str) -> String {
    format!("hard bounce: {status} {reason}")
}

/// A recipient a mail names that is not an address: as written, and why.
type NotAnAddress = (String, address::Invalid);

/// The findings paired with the address each is about (canonical form;
/// empty when unknown), and the recipients named that are not addresses,
/// with why. A signed correlation names the address blast sent to: it
/// replaces the finding's recipient when that is missing, not an address,
/// or another address (forwarding), and it alone counts when the mail
/// reports nothing parseable.
fn attribute(
    report: &Report,
    corr: Option<&Correlation>,
) -> (Vec<(String, Finding)>, Vec<NotAnAddress>) {
    let mut invalid = Vec::new();
    let mut out: Vec<(String, Finding)> = report
        .results
        .iter()
        .map(|f| {
            let addr = match f.recipient.as_deref().map(address::canonical) {
                Some(Ok(key)) => key,
                Some(Err(why)) => {
                    invalid.push((f.recipient.clone().unwrap_or_default(), why));
                    String::new()
                }
                None => String::new(),
            };
            (addr, f.clone())
        })
        .collect();
    if let Some(c) = corr {
        if !out.iter().any(|(a, _)| *a == c.address) {
            let slot = match out.iter().position(|(a, _)| a.is_empty()) {
                Some(i) => Some(i),
                None if out.len() == 1 => Some(0),
                None => None,
            };
            match slot {
                Some(i) => out[i].0 = c.address.clone(),
                None => out.push((c.address.clone(), fallback_finding(report.kind))),
            }
        }
    }
    (out, invalid)
}

/// What a signed mail with no parseable finding still tells.
fn fallback_finding(kind: Kind) -> Finding {
    let (class, reason) = match kind {
        Kind::Complaint => (Class::Other, "feedback"),
        Kind::AutoReply => (Class::Other, "vacation"),
        Kind::Delivered => (Class::Other, "delivered"),
        Kind::Delay => (Class::Soft, "expired"),
        _ => (Class::Soft, "undefined"),
    };
    Finding {
        recipient: None,
        status: None,
        class,
        reason: reason.into(),
        feedback_type: None,
        diagnostic: None,
        remote_mta: None,
    }
}

fn kind_name(k: Kind) -> &'static str {
    match k {
        Kind::Bounce => "bounce",
        Kind::Delay => "delay",
        Kind::Complaint => "complaint",
        Kind::AutoReply => "autoreply",
        Kind::Delivered => "delivered",
        Kind::NotBounce => "notbounce",
    }
}

/// The first pattern in `patterns` that `text` matches, and its `var`.
fn capture_one(patterns: &[Pattern], text: &str, var: Var) -> Option<String> {
    patterns.iter().find_map(|p| {
        p.capture(text)?
            .into_iter()
            .find(|(v, _)| *v == var)
            .map(|(_, x)| x)
    })
}

/// A stable id for a message's bytes (32 hex digits of SHA-256).
fn message_hash(raw: &[u8]) -> String {
    let digest = Sha256::digest(raw);
    digest[..16].iter().map(|b| format!("{b:02x}")).collect()
}

/// Counts of one `blast bounce ingest` run.
#[derive(Debug, Default, Clone, Serialize)]
pub struct IngestSummary {
    /// Messages read.
    pub messages: u64,
    /// Hard bounces recorded.
    pub hard: u64,
    /// Soft bounces recorded.
    pub soft: u64,
    /// Complaints recorded.
    pub complaints: u64,
    /// Auto-replies, delays and delivery notices recorded.
    pub notices: u64,
    /// Unsubscribe mails.
    pub unsubscribes: u64,
    /// Addresses newly suppressed (unsubscribes included).
    pub suppressed: u64,
    /// Events seen before (the same message ingested again).
    pub duplicates: u64,
    /// Messages moved to quarantine.
    pub quarantined: u64,
    /// Messages that could not be read (left in place).
    pub unreadable: u64,
}

impl IngestSummary {
    fn add(&mut self, v: &Verdict) {
        self.messages += 1;
        match v {
            Verdict::Recorded(events) => {
                for e in events {
                    if !e.new {
                        self.duplicates += 1;
                        continue;
                    }
                    match (e.kind, e.class) {
                        ("complaint", _) => self.complaints += 1,
                        ("bounce", "hard") => self.hard += 1,
                        ("bounce", "soft") => self.soft += 1,
                        _ => self.notices += 1,
                    }
                    self.suppressed += u64::from(e.suppressed.is_some());
                }
            }
            Verdict::Unsubscribed { .. } => {
                self.unsubscribes += 1;
                self.suppressed += 1;
            }
            Verdict::Quarantine(_) => self.quarantined += 1,
        }
    }
}

/// Ingests every message of `inbox`: done ones are marked processed,
/// unusable ones quarantined. A database error stops the run and leaves the
/// current and remaining messages where they are. `progress` is called after
/// each message.
pub async fn run(
    mut ingestor: Ingestor,
    mut inbox: Inbox,
    mut progress: impl FnMut(&IngestSummary),
) -> Result<(IngestSummary, MailboxSummary)> {
    let mut summary = IngestSummary::default();
    while let Some(next) = inbox.next_message() {
        let msg = match next {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!("{e}");
                summary.unreadable += 1;
                continue;
            }
        };
        let verdict = match ingestor.ingest(&msg.bytes, &msg.id).await {
            Ok(v) => v,
            Err(e) => {
                inbox.dispose(&msg, Disposition::Retry)?;
                return Err(e);
            }
        };
        summary.add(&verdict);
        let disposition = match &verdict {
            Verdict::Quarantine(reason) => {
                tracing::warn!("{}: quarantined: {reason}", msg.id);
                Disposition::Quarantine {
                    reason: reason.clone(),
                }
            }
            _ => Disposition::Done,
        };
        inbox.dispose(&msg, disposition)?;
        progress(&summary);
    }
    let mailbox = inbox.finish()?;
    Ok((summary, mailbox))
}
