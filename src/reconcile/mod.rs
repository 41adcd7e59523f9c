//! `blast reconcile`: what the MTA finally did with each message blast
//! injected, read back from Postfix's log into the ledger's `mta_*` columns.
//!
//! The injection's `status` (the local MTA's answer) never changes; beside
//! it each recipient gets its final delivery at the next hop: `delivered`,
//! `bounced`, `expired`, or `deferred` while Postfix still retries. A final
//! outcome is never replaced by `deferred`; `expired` replaces only
//! `deferred`. A recipient is found by the queue id Postfix gave at
//! injection (`blast_deliveries.queue_id`) and its address (canonical form,
//! [`crate::address`]); lines about other mail are counted and ignored.
//!
//! A hard bounce ([`crate::classify::logged_bounce_suppresses`]) suppresses
//! the address as a signed bounce mail would (the queue id the ledger
//! recorded is the proof that blast sent it); soft bounces do not.
//!
//! - [`parse`]: one log line → an event; pure.
//! - [`tail`]: reads a file or stdin, and with `follow` keeps reading as the
//!   file grows and across rotation.
//! - [`store`]: looks up and updates ledger rows in batches of
//!   [`BATCH`] events, one transaction each.
//!
//! Memory is bounded by the batch: no state is kept per queue id between
//! batches (a `removed` record ends nothing that needs ending), so a log of
//! millions of deliveries needs no more than a short one. Reading the same
//! log again changes nothing. This module never sends.

pub mod parse;
mod store;
pub mod tail;

use std::path::PathBuf;

use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::address;
use crate::classify;
use crate::clock;
use crate::db::Db;
use crate::error::Result;

/// Events (delivery records and expiries) per database transaction.
pub const BATCH: usize = 1000;

/// A recipient's final delivery at the MTA, as `blast_deliveries.mta_status`
/// stores it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum MtaStatus {
    /// The next hop accepted it (`status=sent`).
    Delivered,
    /// Refused for good (`status=bounced`).
    Bounced,
    /// Postfix gave up retrying (`status=expired, returned to sender`).
    Expired,
    /// Still queued at the MTA, to be tried again.
    Deferred,
}

impl MtaStatus {
    /// The stored tag.
    pub fn as_str(self) -> &'static str {
        match self {
            MtaStatus::Delivered => "delivered",
            MtaStatus::Bounced => "bounced",
            MtaStatus::Expired => "expired",
            MtaStatus::Deferred => "deferred",
        }
    }

    /// The status a stored tag stands for.
    pub fn parse(s: &str) -> Option<MtaStatus> {
        Some(match s {
            "delivered" => MtaStatus::Delivered,
            "bounced" => MtaStatus::Bounced,
            "expired" => MtaStatus::Expired,
            "deferred" => MtaStatus::Deferred,
            _ => return None,
        })
    }

    /// Whether `self`, logged later, replaces `old`: a final outcome
    /// replaces anything but is never replaced by `deferred`, and `expired`
    /// (which ends only what was still queued) never replaces `delivered`
    /// or `bounced`.
    fn replaces(self, old: Option<MtaStatus>) -> bool {
        use MtaStatus::*;
        match (old, self) {
            (None | Some(Deferred), _) => true,
            (Some(_), Deferred) => false,
            (Some(Delivered | Bounced), Expired) => false,
            (Some(_), _) => true,
        }
    }
}

/// The `mta_*` columns of one ledger row.
#[derive(Debug, Clone, PartialEq)]
pub struct Mta {
    /// `mta_status`.
    pub status: MtaStatus,
    /// `mta_dsn`.
    pub dsn: Option<String>,
    /// `mta_reply`: the remote reply or the last reason.
    pub reply: Option<String>,
    /// `mta_relay`.
    pub relay: Option<String>,
    /// `mta_delay_secs`.
    pub delay: Option<f64>,
    /// `mta_at` (database timestamp form, UTC).
    pub at: Option<String>,
}

/// What one run read and did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Summary {
    /// Lines read.
    pub lines: u64,
    /// Lines that are not log lines, or delivery records cut short or garbled.
    pub malformed: u64,
    /// Delivery records and expiries of mail not in the ledger (another
    /// queue id, or another recipient of it).
    pub unrelated: u64,
    /// Ledger recipients logged as delivered.
    pub delivered: u64,
    /// ... as bounced.
    pub bounced: u64,
    /// ... as expired.
    pub expired: u64,
    /// ... as deferred.
    pub deferred: u64,
    /// Addresses newly suppressed by a hard bounce.
    pub suppressed: u64,
    /// Ledger rows whose `mta_*` columns changed (0 when the same log is
    /// read again).
    pub updated: u64,
}

/// One event of a batch, owned, waiting for its database round.
#[derive(Debug, Clone)]
enum Pending {
    /// A recipient's delivery record.
    Delivery {
        /// Postfix's queue id.
        queue_id: String,
        /// The recipient's canonical address.
        key: String,
        /// What to store.
        mta: Mta,
        /// A hard bounce: suppress the address.
        hard: bool,
    },
    /// qmgr's expiry of a queue file's remaining recipients.
    Expired {
        /// Postfix's queue id.
        queue_id: String,
        /// When (database timestamp form).
        at: Option<String>,
    },
}

impl Pending {
    /// The queue id it is about.
    fn queue_id(&self) -> &str {
        match self {
            Pending::Delivery { queue_id, .. } | Pending::Expired { queue_id, .. } => queue_id,
        }
    }
}

/// Reads log lines into the ledger, a batch at a time.
pub struct Reconciler {
    db: Db,
    pending: Vec<Pending>,
    summary: Summary,
}

impl Reconciler {
    /// A reconciler writing to `db`.
    pub fn new(db: Db) -> Reconciler {
        Reconciler {
            db,
            pending: Vec::with_capacity(BATCH),
            summary: Summary::default(),
        }
    }

    /// What was read and done so far (pending events not yet counted).
    pub fn summary(&self) -> &Summary {
        &self.summary
    }

    /// Reads one line; writes a batch when [`BATCH`] events are waiting.
    pub async fn line(&mut self, line: &str) -> Result<()> {
        self.summary.lines += 1;
        match parse::parse_line(line) {
            Err(_) => self.summary.malformed += 1,
            Ok(None) => {}
            Ok(Some(e)) => self.event(e),
        }
        if self.pending.len() >= BATCH {
            self.flush().await?;
        }
        Ok(())
    }

    /// Queues an event for the next batch.
    fn event(&mut self, e: parse::Event<'_>) {
        let at = e.at.resolve(clock::now()).map(clock::db_timestamp);
        let queue_id = e.queue_id.to_string();
        match e.record {
            parse::Record::Removed => {}
            parse::Record::Expired => self.pending.push(Pending::Expired { queue_id, at }),
            parse::Record::Delivery(d) => {
                // An address blast never sent to matches no row.
                let Ok(key) = address::canonical(d.recipient()) else {
                    self.summary.unrelated += 1;
                    return;
                };
                let status = match d.status {
                    parse::Status::Sent => MtaStatus::Delivered,
                    parse::Status::Bounced => MtaStatus::Bounced,
                    parse::Status::Deferred => MtaStatus::Deferred,
                };
                let hard = status == MtaStatus::Bounced
                    && classify::logged_bounce_suppresses(d.dsn, d.text);
                let mta = Mta {
                    status,
                    dsn: d.dsn.map(str::to_string),
                    reply: Some(d.text.to_string()).filter(|t| !t.is_empty()),
                    relay: d.relay.map(str::to_string),
                    delay: d.delay,
                    at,
                };
                self.pending.push(Pending::Delivery {
                    queue_id,
                    key,
                    mta,
                    hard,
                });
            }
        }
    }

    /// Writes the waiting events in one transaction.
    pub async fn flush(&mut self) -> Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        store::apply(&self.db, &self.pending, &mut self.summary).await?;
        self.pending.clear();
        Ok(())
    }

    /// Writes what is waiting and returns the summary.
    pub async fn finish(mut self) -> Result<Summary> {
        self.flush().await?;
        Ok(self.summary)
    }
}

/// Where the log comes from.
#[derive(Debug, Clone)]
pub enum Input {
    /// A file (with `follow`, followed across rotation).
    File(PathBuf),
    /// Standard input, read to its end.
    Stdin,
}

/// Reconciles `input` into `db`: to its end, or with `follow` until `stop`
/// (then to the end of what is written, so a stop loses no line already
/// logged). `progress` is called after each batch is written.
pub async fn run(
    db: Db,
    input: Input,
    follow: bool,
    stop: CancellationToken,
    mut progress: impl FnMut(&Summary),
) -> Result<Summary> {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<tail::Chunk>(4);
    let reader = {
        let stop = stop.clone();
        tokio::task::spawn_blocking(move || tail::read(input, follow, &tx, &stop))
    };
    let mut r = Reconciler::new(db);
    let mut result: Result<()> = Ok(());
    while let Some(chunk) = rx.recv().await {
        let step = async {
            match chunk {
                tail::Chunk::Lines(lines) => {
                    for l in &lines {
                        r.line(l).await?;
                    }
                }
                // Nothing more for now: bring the ledger up to date.
                tail::Chunk::Idle => r.flush().await?,
            }
            Ok(())
        };
        if let Err(e) = step.await {
            result = Err(e);
            break;
        }
        progress(r.summary());
    }
    // The reader stops when the channel closes (on a database error) or at
    // the end of its input.
    drop(rx);
    stop.cancel();
    let read = crate::error::joined("the log reader", reader).await;
    result?;
    if let Some(read) = read? {
        read?;
    }
    r.finish().await
}

#[cfg(test)]
mod tests {
    use super::MtaStatus::{self, *};
    use crate::classify::logged_bounce_suppresses;

    #[test]
    fn a_final_outcome_is_never_replaced_by_deferred() {
        let table: &[(Option<MtaStatus>, MtaStatus, bool)] = &[
            (None, Deferred, true),
            (Some(Deferred), Deferred, true),
            (Some(Deferred), Delivered, true),
            (Some(Deferred), Expired, true),
            (Some(Delivered), Deferred, false),
            (Some(Bounced), Deferred, false),
            (Some(Expired), Deferred, false),
            (Some(Delivered), Expired, false),
            (Some(Bounced), Expired, false),
            (Some(Expired), Expired, true),
            (Some(Delivered), Delivered, true),
        ];
        for &(old, new, want) in table {
            assert_eq!(new.replaces(old), want, "{new:?} over {old:?}");
        }
        for s in [Delivered, Bounced, Expired, Deferred] {
            assert_eq!(MtaStatus::parse(s.as_str()), Some(s));
        }
    }

    #[test]
    fn which_logged_bounces_suppress() {
        let said = |t: &str| format!("host mx[1.2.3.4] said: {t} (in reply to RCPT TO command)");
        let table = [
            // The sink's scripted refusal, and plain unknown users.
            (Some("5.1.1"), said("550 5.1.1 Recipient address rejected (blast sink fault injection)"), true),
            (Some("5.1.1"), said("550 5.1.1 <a@b.example>: User unknown"), true),
            (Some("5.2.1"), said("550 5.2.1 The email account that you tried to reach is disabled"), true),
            (Some("5.1.10"), said("556 5.1.10 Recipient address has null MX"), true),
            (Some("5.1.2"), "Host or domain name not found. Name service error for name=x.invalid type=A: Host not found".to_string(), true),
            // Soft words win over a generic code; relay and sender problems never suppress.
            (Some("5.1.1"), said("550 5.1.1 Mailbox full"), false),
            (Some("5.2.2"), said("552 5.2.2 Mailbox full"), false),
            (Some("5.7.1"), said("554 5.7.1 <a@b.example>: Relay access denied"), false),
            (Some("5.1.8"), said("553 5.1.8 Sender address rejected: Domain not found"), false),
            (Some("5.7.1"), said("550 5.7.1 Message rejected as spam"), false),
            (Some("4.2.2"), said("452 4.2.2 Mailbox full"), false),
        ];
        for (dsn, text, want) in table {
            assert_eq!(logged_bounce_suppresses(dsn, &text), want, "{dsn:?} {text}");
        }
    }
}
