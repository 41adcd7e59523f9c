//! The ledger: the only writer of delivery status. It never sends and never
//! renders. Runner events arrive as [`Record`]s over a bounded channel and
//! [`write_loop`] stores them in batches (every [`FLUSH_EVERY`] or
//! [`FLUSH_ROWS`] records, whichever comes first).
//!
//! # States and the guarantee
//! A recipient's row goes `queued → sending → sent | deferred | failed |
//! suppressed`. blast writes a row only once the MTA has answered (or blast
//! itself has refused the message: bad address, render error, suppressed
//! address), so rows are only ever `sent`, `deferred`, `failed` or
//! `suppressed`; `queued` and `sending` are reserved and, like a missing row,
//! mean "not done": a crash can never leave a row in `sending`. `sent`,
//! `failed` and `suppressed` are final; a `deferred` row is sent again once
//! its `next_attempt_at` has passed. Nothing is recorded at fetch time, so a
//! crash never makes blast skip a recipient. What a crash can do is re-send
//! the messages the MTA accepted whose outcome was not yet committed: at most
//! one per injector, plus the [`FLUSH_ROWS`] outcomes the input channel holds,
//! plus the batch being written: `concurrency + 2 × FLUSH_ROWS`, and at most
//! [`FLUSH_EVERY`] of accepted mail plus one write. docs/reliability.md states
//! this for operators; tests/reliability.rs kills blast with SIGKILL to check
//! it.
//!
//! # Suppression
//! A refusal that says the address is gone (a 5xx reply whose reason is
//! hard, decided by [`crate::classify::suppresses`], the classifier bounce
//! ingest uses too) puts the address on `blast_suppressions` with source
//! `smtp:campaign=N` ([`smtp_source`]), in the same transaction as the
//! outcome, so a tripped circuit breaker can undo exactly those
//! ([`requeue`]).

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use sqlx::{AssertSqlSafe, Row};
use tokio::sync::mpsc;

use crate::address;
use crate::classify;
use crate::clock;
use crate::config::RetryPolicy;
use crate::db::{Backend, Backoff, Db};
use crate::error::{Error, Result};
use crate::measure::Histogram;
use crate::model::{Outcome, Record, Reply, Status};
use crate::worker::claims;
use crate::worker::{Claim, Holdings};
use time::OffsetDateTime;

/// Flush at least this often.
pub const FLUSH_EVERY: Duration = Duration::from_millis(100);
/// ... or when this many records are waiting.
pub const FLUSH_ROWS: usize = 1000;
/// Rows per multi-row INSERT (up to 14 parameters each) inside a flush.
const ROWS_PER_STATEMENT: usize = 100;

/// Where records are stored.
pub trait Ledger: Send + 'static {
    /// Stores a batch atomically (all or nothing).
    fn record(&mut self, batch: &[Record]) -> impl Future<Output = Result<()>> + Send;
}

/// A campaign's row in `blast_campaigns`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CampaignRow {
    /// Ledger id.
    pub id: i64,
    /// Unique name.
    pub name: String,
    /// `running`, `stopped`, `finished`.
    pub state: String,
    /// Highest audience id included, fixed at the first run.
    pub max_recipient_id: i64,
    /// Why it is paused, held or cancelled.
    pub reason: Option<String>,
}

/// Finds campaign `name`, or creates it with `max_id` (computed by the caller
/// on first run only: `max_id` is awaited only when the row is new).
pub async fn open_campaign<F>(db: &Db, name: &str, max_id: F) -> Result<CampaignRow>
where
    F: Future<Output = Result<i64>>,
{
    if let Some(row) = find_campaign(db, name).await? {
        return Ok(row);
    }
    let max = max_id.await?;
    let now = clock::db_timestamp(clock::now());
    sqlx::query(
        "INSERT INTO blast_campaigns (name, state, max_recipient_id, created_at, updated_at) \
         VALUES ($1, 'new', $2, $3, $3) ON CONFLICT (name) DO NOTHING",
    )
    .bind(name)
    .bind(max)
    .bind(&now)
    .execute(db.pool())
    .await?;
    find_campaign(db, name)
        .await?
        .ok_or_else(|| Error::UnknownCampaign(name.to_string()))
}

/// Stores the VERP and unsubscribe-mailto patterns a campaign sends with, so
/// `blast bounce ingest` can decode addresses without the campaign file.
pub async fn set_inbound_patterns(
    db: &Db,
    campaign_id: i64,
    verp: Option<&str>,
    mailto: &str,
) -> Result<()> {
    sqlx::query("UPDATE blast_campaigns SET verp = $1, unsubscribe_mailto = $2 WHERE id = $3")
        .bind(verp)
        .bind(mailto)
        .bind(campaign_id)
        .execute(db.pool())
        .await?;
    Ok(())
}

/// The distinct (VERP, unsubscribe-mailto) patterns campaigns were sent with.
pub async fn inbound_patterns(db: &Db) -> Result<(Vec<String>, Vec<String>)> {
    let verp = sqlx::query_scalar(
        "SELECT DISTINCT verp FROM blast_campaigns WHERE verp IS NOT NULL ORDER BY verp",
    )
    .fetch_all(db.pool())
    .await?;
    let mailto = sqlx::query_scalar(
        "SELECT DISTINCT unsubscribe_mailto FROM blast_campaigns \
         WHERE unsubscribe_mailto IS NOT NULL ORDER BY unsubscribe_mailto",
    )
    .fetch_all(db.pool())
    .await?;
    Ok((verp, mailto))
}

/// The address campaign `campaign_id` sent to recipient `recipient_id`, from
/// the ledger (so a token resolves to exactly the address that got the mail).
pub async fn recipient_address(
    db: &Db,
    campaign_id: i64,
    recipient_id: i64,
) -> Result<Option<String>> {
    Ok(sqlx::query_scalar(
        "SELECT email FROM blast_deliveries WHERE campaign_id = $1 AND recipient_id = $2",
    )
    .bind(campaign_id)
    .bind(recipient_id)
    .fetch_optional(db.pool())
    .await?)
}

/// The adaptive limit each of `relays` ended its last run with, if known.
pub async fn relay_limits(db: &Db, relays: &[String]) -> Result<Vec<Option<usize>>> {
    let mut out = Vec::with_capacity(relays.len());
    for r in relays {
        let limit: Option<i64> =
            sqlx::query_scalar("SELECT last_limit FROM blast_relays WHERE relay = $1")
                .bind(r)
                .fetch_optional(db.pool())
                .await?;
        out.push(
            limit
                .and_then(|l| usize::try_from(l).ok())
                .filter(|l| *l > 0),
        );
    }
    Ok(out)
}

/// Remembers each relay's adaptive limit for the next run.
pub async fn save_relay_limits(db: &Db, limits: &[(String, usize)]) -> Result<()> {
    let now = clock::db_timestamp(clock::now());
    for (relay, limit) in limits {
        sqlx::query(
            "INSERT INTO blast_relays (relay, last_limit, updated_at) VALUES ($1, $2, $3) \
             ON CONFLICT (relay) DO UPDATE SET last_limit = excluded.last_limit, \
             updated_at = excluded.updated_at",
        )
        .bind(relay)
        .bind(*limit as i64)
        .bind(&now)
        .execute(db.pool())
        .await?;
    }
    Ok(())
}

/// The id of the campaign named `name`, if any.
pub async fn campaign_id(db: &Db, name: &str) -> Result<Option<i64>> {
    Ok(find_campaign(db, name).await?.map(|c| c.id))
}

/// Fixes a scheduled campaign's audience (`max_recipient_id` is -1 until its
/// first run).
pub async fn fix_max_id(db: &Db, campaign_id: i64, max_id: i64) -> Result<()> {
    sqlx::query(
        "UPDATE blast_campaigns SET max_recipient_id = $1 WHERE id = $2 AND max_recipient_id < 0",
    )
    .bind(max_id)
    .bind(campaign_id)
    .execute(db.pool())
    .await?;
    Ok(())
}

/// One line of `blast list`.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ListRow {
    /// Campaign name.
    pub campaign: String,
    /// State.
    pub state: String,
    /// Why (paused, held, cancelled).
    pub reason: Option<String>,
    /// Recipients sent.
    pub sent: i64,
    /// Recipients failed.
    pub failed: i64,
    /// Recipients deferred.
    pub deferred: i64,
    /// Recipients suppressed.
    pub suppressed: i64,
    /// When something is next due: the scheduled time, or the earliest retry.
    pub next_due: Option<String>,
    /// Live workers sending it now.
    pub workers: i64,
}

/// Every campaign in the database with its counts, newest first.
pub async fn list(db: &Db) -> Result<Vec<ListRow>> {
    let now = db.now_ms_sql();
    let rows = sqlx::query(AssertSqlSafe(format!(
        "SELECT c.name, c.state, c.reason, c.send_at, \
           (SELECT COUNT(*) FROM blast_workers w WHERE w.campaign_id = c.id AND w.lease_until > {now}) AS workers, \
           (SELECT COUNT(*) FROM blast_deliveries d WHERE d.campaign_id = c.id AND d.status = 'sent') AS sent, \
           (SELECT COUNT(*) FROM blast_deliveries d WHERE d.campaign_id = c.id AND d.status = 'failed') AS failed, \
           (SELECT COUNT(*) FROM blast_deliveries d WHERE d.campaign_id = c.id AND d.status = 'deferred') AS deferred, \
           (SELECT COUNT(*) FROM blast_deliveries d WHERE d.campaign_id = c.id AND d.status = 'suppressed') AS suppressed, \
           (SELECT MIN(d.next_attempt_at) FROM blast_deliveries d WHERE d.campaign_id = c.id AND d.status = 'deferred') AS retry_at \
         FROM blast_campaigns c ORDER BY c.id DESC"
    )))
    .fetch_all(db.pool())
    .await?;
    let mut out = Vec::with_capacity(rows.len());
    for r in rows {
        let state: String = r.try_get("state")?;
        let send_at: Option<String> = r.try_get("send_at")?;
        let retry_at: Option<String> = r.try_get("retry_at")?;
        out.push(ListRow {
            campaign: r.try_get("name")?,
            next_due: if state == "scheduled" {
                send_at
            } else {
                retry_at
            },
            state,
            reason: r.try_get("reason")?,
            sent: r.try_get("sent")?,
            failed: r.try_get("failed")?,
            deferred: r.try_get("deferred")?,
            suppressed: r.try_get("suppressed")?,
            workers: r.try_get("workers")?,
        });
    }
    Ok(out)
}

/// Looks a campaign up by name.
pub async fn find_campaign(db: &Db, name: &str) -> Result<Option<CampaignRow>> {
    let row = sqlx::query(
        "SELECT id, name, state, max_recipient_id, reason FROM blast_campaigns WHERE name = $1",
    )
    .bind(name)
    .fetch_optional(db.pool())
    .await?;
    Ok(match row {
        Some(r) => Some(CampaignRow {
            id: r.try_get("id")?,
            name: r.try_get("name")?,
            state: r.try_get("state")?,
            max_recipient_id: r.try_get("max_recipient_id")?,
            reason: r.try_get("reason")?,
        }),
        None => None,
    })
}

/// Counts per status for `blast status`.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct StatusCounts {
    /// Campaign name.
    pub campaign: String,
    /// Run state.
    pub state: String,
    /// Why it is paused, held or cancelled.
    pub reason: Option<String>,
    /// Recipients accepted by the MTA.
    pub sent: i64,
    /// Recipients refused for good.
    pub failed: i64,
    /// Recipients temporarily refused (sent again by the next run).
    pub deferred: i64,
    /// Recipients skipped because their address is suppressed.
    pub suppressed: i64,
    /// Recipients whose message could not be built (built again by the
    /// next pass).
    pub unrendered: i64,
    /// Audience rows (up to the campaign's max id) without a final outcome.
    pub pending: i64,
    /// Recipients with a hard bounce ingested after they were sent to.
    pub bounced_hard: i64,
    /// Recipients with a soft bounce ingested.
    pub bounced_soft: i64,
    /// Recipients who complained (ARF).
    pub complaints: i64,
    /// Recipients who unsubscribed through this campaign's link or mailto.
    pub unsubscribed: i64,
    /// The workers that sent it, live ones first (filled by `blast status`).
    pub workers: Vec<crate::worker::WorkerRow>,
    /// At the MTA, read back from its log by `blast reconcile`: delivered
    /// at the next hop.
    pub mta_delivered: i64,
    /// ... refused there for good.
    pub mta_bounced: i64,
    /// ... given up on after the MTA's queue lifetime.
    pub mta_expired: i64,
    /// ... still queued at the MTA (deferred).
    pub mta_deferred: i64,
}

impl StatusCounts {
    /// Whether `blast reconcile` has recorded anything for the campaign.
    pub fn reconciled(&self) -> bool {
        self.mta_delivered + self.mta_bounced + self.mta_expired + self.mta_deferred > 0
    }
}

/// Counts per outcome for campaign `row`; `pending` comes from the caller.
pub async fn status_counts(db: &Db, row: &CampaignRow, pending: i64) -> Result<StatusCounts> {
    let rows = sqlx::query(
        "SELECT status, COUNT(*) AS n FROM blast_deliveries WHERE campaign_id = $1 GROUP BY status",
    )
    .bind(row.id)
    .fetch_all(db.pool())
    .await?;
    let mut c = StatusCounts {
        campaign: row.name.clone(),
        state: row.state.clone(),
        reason: row.reason.clone(),
        pending,
        ..Default::default()
    };
    for r in rows {
        let status: String = r.try_get("status")?;
        let n: i64 = r.try_get("n")?;
        match status.parse::<Status>() {
            Ok(Status::Sent) => c.sent += n,
            Ok(Status::Failed) => c.failed += n,
            Ok(Status::Deferred) => c.deferred += n,
            Ok(Status::Suppressed) => c.suppressed += n,
            Ok(Status::Unrendered) => c.unrendered += n,
            // Reserved tags (`queued`, `sending`) mean "not done": pending.
            Err(_) => {}
        }
    }
    // The next hop, as the MTA's log told `blast reconcile`.
    let rows = sqlx::query(
        "SELECT mta_status, COUNT(*) AS n FROM blast_deliveries \
         WHERE campaign_id = $1 AND mta_status IS NOT NULL GROUP BY mta_status",
    )
    .bind(row.id)
    .fetch_all(db.pool())
    .await?;
    for r in rows {
        let status: String = r.try_get("mta_status")?;
        let n: i64 = r.try_get("n")?;
        match crate::reconcile::MtaStatus::parse(&status) {
            Some(crate::reconcile::MtaStatus::Delivered) => c.mta_delivered += n,
            Some(crate::reconcile::MtaStatus::Bounced) => c.mta_bounced += n,
            Some(crate::reconcile::MtaStatus::Expired) => c.mta_expired += n,
            Some(crate::reconcile::MtaStatus::Deferred) => c.mta_deferred += n,
            None => {}
        }
    }
    // The inbound side: signed bounces and complaints, and unsubscribes.
    let rows = sqlx::query(
        "SELECT kind, class, COUNT(DISTINCT recipient_id) AS n FROM blast_bounces \
         WHERE campaign_id = $1 GROUP BY kind, class",
    )
    .bind(row.id)
    .fetch_all(db.pool())
    .await?;
    for r in rows {
        let (kind, class): (String, String) = (r.try_get("kind")?, r.try_get("class")?);
        let n: i64 = r.try_get("n")?;
        match (kind.as_str(), class.as_str()) {
            ("bounce", "hard") => c.bounced_hard += n,
            ("bounce", "soft") => c.bounced_soft += n,
            ("complaint", _) => c.complaints += n,
            _ => {}
        }
    }
    c.unsubscribed =
        sqlx::query_scalar("SELECT COUNT(*) FROM blast_suppressions WHERE source IN ($1, $2)")
            .bind(format!("https:campaign={}", row.id))
            .bind(format!("mailto:campaign={}", row.id))
            .fetch_one(db.pool())
            .await?;
    Ok(c)
}

/// The SQL ledger for one campaign.
#[derive(Debug, Clone)]
pub struct SqlLedger {
    db: Db,
    campaign_id: i64,
    retry: RetryPolicy,
    holdings: Option<Arc<Holdings>>,
    worker: Option<String>,
}

impl SqlLedger {
    /// A ledger writing into `blast_deliveries` for `campaign_id`, scheduling
    /// deferred recipients by `retry`.
    pub fn new(db: Db, campaign_id: i64, retry: RetryPolicy) -> SqlLedger {
        SqlLedger {
            db,
            campaign_id,
            retry,
            holdings: None,
            worker: None,
        }
    }

    /// Stores `name` (the worker's, [`Worker::name`](crate::worker::Worker))
    /// in the `worker` column of every row this ledger inserts or updates,
    /// so `blast report` can tell the workers' rates apart. Without it the
    /// column is left NULL.
    pub fn worker(mut self, name: &str) -> SqlLedger {
        self.worker = Some(name.to_string());
        self
    }

    /// Fences every write with the claims in `holdings`: a record is stored
    /// only while the claim it was sent under still carries the token it
    /// was granted with (checked in the same statement), and claims whose
    /// every recipient is recorded are marked done in the same transaction.
    pub fn fenced(mut self, holdings: Arc<Holdings>) -> SqlLedger {
        self.holdings = Some(holdings);
        self
    }

    /// Each row's claim, when fenced; rows of ids never claimed are dropped
    /// (with a warning: it would be a bug).
    fn claims_of<'a>(&self, rows: Vec<Stored<'a>>) -> Vec<Stored<'a>> {
        let Some(h) = &self.holdings else {
            return rows;
        };
        rows.into_iter()
            .filter_map(
                |mut r| match h.claim_of(r.record.recipient_id, r.record.claim_token) {
                    Some(c) => {
                        r.claim = Some(c);
                        Some(r)
                    }
                    None => {
                        tracing::warn!(
                            "ledger: recipient {} is in no claim of this worker; not recorded",
                            r.record.recipient_id
                        );
                        None
                    }
                },
            )
            .collect()
    }

    async fn write(&mut self, batch: &[Record]) -> Result<()> {
        let now = clock::now();
        let stamp = clock::db_timestamp(now);
        let rows: Vec<Stored<'_>> = batch.iter().map(|r| stored(r, &self.retry, now)).collect();
        let rows = self.claims_of(rows);
        let mut tx = self.db.pool().begin().await?;
        match self.db.backend() {
            Backend::Sqlite => self.write_values(&mut tx, &rows, &stamp).await?,
            Backend::Postgres => {
                for round in rounds(&rows) {
                    self.write_json(&mut tx, &round, &stamp).await?;
                }
            }
        }
        if let Some(h) = &self.holdings {
            let done = h.recorded(
                rows.iter()
                    .map(|r| (r.record.recipient_id, r.record.claim_token)),
            );
            claims::complete(&mut tx, self.campaign_id, &done).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// SQLite: multi-row `VALUES` of [`ROWS_PER_STATEMENT`] rows with
    /// anonymous parameters (see [`insert_sql`] and [`deliveries_sql`]).
    async fn write_values(
        &self,
        tx: &mut sqlx::Transaction<'_, sqlx::Any>,
        rows: &[Stored<'_>],
        stamp: &str,
    ) -> Result<()> {
        for chunk in rows.chunks(ROWS_PER_STATEMENT) {
            let sql = deliveries_sql(chunk.len(), self.holdings.is_some());
            let mut q = sqlx::query(AssertSqlSafe(sql)).bind(self.worker.as_deref());
            for r in chunk {
                q = q
                    .bind(self.campaign_id)
                    .bind(r.record.recipient_id)
                    .bind(r.record.email.as_str())
                    .bind(r.status.as_str())
                    .bind(r.reply.code.map(i32::from))
                    .bind(r.reply.enhanced.as_deref())
                    .bind(r.text.as_str())
                    .bind(r.queue_id)
                    .bind(r.record.relay.as_deref())
                    .bind(stamp)
                    .bind(r.first_attempt_at.as_deref())
                    .bind(r.next_attempt_at.as_deref());
                if let Some(c) = r.claim {
                    q = q.bind(c.first).bind(c.token);
                }
            }
            q.execute(&mut **tx).await?;

            let history: Vec<&Stored<'_>> = chunk.iter().filter(|r| r.in_history()).collect();
            if !history.is_empty() {
                let sql = insert_sql(
                    Backend::Sqlite,
                    "INSERT INTO blast_attempts (campaign_id, recipient_id, status, smtp_code, \
                     enhanced_status, reply, queue_id, relay, at) VALUES ",
                    9,
                    history.len(),
                    "",
                );
                let mut q = sqlx::query(AssertSqlSafe(sql));
                for r in history {
                    q = q
                        .bind(self.campaign_id)
                        .bind(r.record.recipient_id)
                        .bind(r.status.as_str())
                        .bind(r.reply.code.map(i32::from))
                        .bind(r.reply.enhanced.as_deref())
                        .bind(r.text.as_str())
                        .bind(r.queue_id)
                        .bind(r.record.relay.as_deref())
                        .bind(stamp);
                }
                q.execute(&mut **tx).await?;
            }

            // Keyed by canonical form; an address blast could send to always
            // has one.
            let hard: Vec<(String, &Stored<'_>)> = chunk
                .iter()
                .filter(|r| r.suppress)
                .filter_map(|r| Some((address::canonical(&r.record.email).ok()?, r)))
                .collect();
            if !hard.is_empty() {
                let sql = insert_sql(
                    Backend::Sqlite,
                    "INSERT INTO blast_suppressions (address, reason, source, created_at) VALUES ",
                    4,
                    hard.len(),
                    " ON CONFLICT (address) DO NOTHING",
                );
                let mut q = sqlx::query(AssertSqlSafe(sql));
                for (key, r) in hard {
                    q = q
                        .bind(key)
                        .bind(r.text.as_str())
                        .bind(smtp_source(self.campaign_id))
                        .bind(stamp);
                }
                q.execute(&mut **tx).await?;
            }
        }
        Ok(())
    }

    /// PostgreSQL: one statement per table for the whole batch, its rows in
    /// one JSON text parameter unpacked by `json_to_recordset` (sqlx's `Any`
    /// driver binds no arrays). 1,000 rows of 12 parameters each in
    /// statements of 100 cost ten round trips and ten parses and plans per
    /// table; this is one of each. `rows` must not name a recipient twice
    /// (see [`rounds`]). The worker's name is the same for every row: one
    /// parameter of the statement, not a JSON key per row.
    async fn write_json(
        &self,
        tx: &mut sqlx::Transaction<'_, sqlx::Any>,
        rows: &[&Stored<'_>],
        stamp: &str,
    ) -> Result<()> {
        // Fenced, a row is stored only while its claim still carries the
        // token it was sent under, checked in this statement; the claim's
        // row is share-locked, so a worker taking it over waits for this
        // transaction instead of slipping between the check and the write.
        let fence = match self.holdings {
            Some(_) => {
                "EXISTS (SELECT 1 FROM blast_claims c WHERE c.campaign_id = $1 \
                 AND c.first_id = u.claim_first AND c.token = u.claim_token FOR SHARE)"
            }
            None => "true",
        };
        sqlx::query(AssertSqlSafe(format!(
            "INSERT INTO blast_deliveries ({COLUMNS}) \
             SELECT $1, u.recipient_id, u.email, u.status, u.smtp_code, u.enhanced_status, u.reply, \
             u.queue_id, u.relay, $2, u.first_attempt_at, u.next_attempt_at, $4 \
             FROM json_to_recordset($3::json) AS u({JSON_COLUMNS}) \
             WHERE {fence} {UPSERT}"
        )))
        .bind(self.campaign_id)
        .bind(stamp)
        .bind(to_json(
            &rows.iter().map(|r| JsonRow::from(*r)).collect::<Vec<_>>(),
        )?)
        .bind(self.worker.as_deref())
        .execute(&mut **tx)
        .await?;

        let history: Vec<JsonRow<'_>> = rows
            .iter()
            .filter(|r| r.in_history())
            .map(|r| JsonRow::from(*r))
            .collect();
        if !history.is_empty() {
            sqlx::query(AssertSqlSafe(format!(
                "INSERT INTO blast_attempts (campaign_id, recipient_id, status, smtp_code, \
                 enhanced_status, reply, queue_id, relay, at) \
                 SELECT $1, u.recipient_id, u.status, u.smtp_code, u.enhanced_status, u.reply, \
                 u.queue_id, u.relay, $2 \
                 FROM json_to_recordset($3::json) AS u({JSON_COLUMNS})"
            )))
            .bind(self.campaign_id)
            .bind(stamp)
            .bind(to_json(&history)?)
            .execute(&mut **tx)
            .await?;
        }

        let hard: Vec<Suppression<'_>> = rows
            .iter()
            .filter(|r| r.suppress)
            .filter_map(|r| {
                Some(Suppression {
                    address: address::canonical(&r.record.email).ok()?,
                    reason: &r.text,
                })
            })
            .collect();
        if !hard.is_empty() {
            sqlx::query(
                "INSERT INTO blast_suppressions (address, reason, source, created_at) \
                 SELECT u.address, u.reason, $3, $1 \
                 FROM json_to_recordset($2::json) AS u(address text, reason text) \
                 ON CONFLICT (address) DO NOTHING",
            )
            .bind(stamp)
            .bind(to_json(&hard)?)
            .bind(smtp_source(self.campaign_id))
            .execute(&mut **tx)
            .await?;
        }
        Ok(())
    }
}

/// Columns of `blast_deliveries` a record fills (`worker` is the ledger's,
/// the same for every row of a batch).
const COLUMNS: &str = "campaign_id, recipient_id, email, status, smtp_code, enhanced_status, \
     reply, queue_id, relay, updated_at, first_attempt_at, next_attempt_at, worker";

/// SQLite: the statement storing `rows` outcomes. Its first parameter is
/// the worker's name, once for all rows (a parameter per row made the write
/// ~10% slower, measured in a debug build); then 12 per row, the record's
/// columns. Fenced, each row also carries its claim's first id and token
/// and is stored only if that claim still has that token: one statement, no
/// read-then-write (SQLite has one writer at a time, so nothing slips
/// between the check and the write).
fn deliveries_sql(rows: usize, fenced: bool) -> String {
    let values = insert_sql(Backend::Sqlite, "", if fenced { 14 } else { 12 }, rows, "");
    let picked: Vec<String> = (1..=12).map(|i| format!("v.column{i}")).collect();
    // SQLite needs a WHERE before ON CONFLICT in an INSERT ... SELECT.
    let fence = match fenced {
        true => {
            "EXISTS (SELECT 1 FROM blast_claims c WHERE c.campaign_id = v.column1 \
             AND c.first_id = v.column13 AND c.token = v.column14)"
        }
        false => "true",
    };
    // Anonymous parameters are numbered in the order they appear: the
    // worker's `?` comes before the VALUES.
    format!(
        "INSERT INTO blast_deliveries ({COLUMNS}) SELECT {}, ? FROM (VALUES {values}) AS v \
         WHERE {fence} {UPSERT}",
        picked.join(", ")
    )
}

/// What an outcome does to an existing ledger row: the newest answer wins
/// unless the row is final already (`sent`, `failed`, `suppressed`: a late or
/// duplicate answer changes nothing); `attempts` counts every answer,
/// `first_attempt_at` keeps the first deferral and `worker` becomes the
/// worker that wrote the newest answer (the one `updated_at` dates).
const UPSERT: &str =
    "ON CONFLICT (campaign_id, recipient_id) DO UPDATE SET status = excluded.status, \
     smtp_code = excluded.smtp_code, enhanced_status = excluded.enhanced_status, \
     reply = excluded.reply, queue_id = excluded.queue_id, relay = excluded.relay, \
     attempts = blast_deliveries.attempts + 1, updated_at = excluded.updated_at, \
     first_attempt_at = COALESCE(blast_deliveries.first_attempt_at, excluded.first_attempt_at), \
     next_attempt_at = excluded.next_attempt_at, worker = excluded.worker \
     WHERE blast_deliveries.status NOT IN ('sent', 'failed', 'suppressed')";

/// The record type `json_to_recordset` reads [`JsonRow`]s as.
const JSON_COLUMNS: &str = "recipient_id bigint, email text, status text, smtp_code integer, \
     enhanced_status text, reply text, queue_id text, relay text, first_attempt_at text, \
     next_attempt_at text, claim_first bigint, claim_token bigint";

/// One outcome as a JSON object for `json_to_recordset` (keys are
/// [`JSON_COLUMNS`]).
#[derive(Serialize)]
struct JsonRow<'a> {
    recipient_id: i64,
    email: &'a str,
    status: &'static str,
    smtp_code: Option<u16>,
    enhanced_status: Option<&'a str>,
    reply: &'a str,
    queue_id: Option<&'a str>,
    relay: Option<&'a str>,
    first_attempt_at: Option<&'a str>,
    next_attempt_at: Option<&'a str>,
    claim_first: Option<i64>,
    claim_token: Option<i64>,
}

impl<'a> From<&'a Stored<'a>> for JsonRow<'a> {
    fn from(r: &'a Stored<'a>) -> JsonRow<'a> {
        JsonRow {
            recipient_id: r.record.recipient_id,
            email: &r.record.email,
            status: r.status.as_str(),
            smtp_code: r.reply.code,
            enhanced_status: r.reply.enhanced.as_deref(),
            reply: &r.text,
            queue_id: r.queue_id,
            relay: r.record.relay.as_deref(),
            first_attempt_at: r.first_attempt_at.as_deref(),
            next_attempt_at: r.next_attempt_at.as_deref(),
            claim_first: r.claim.map(|c| c.first),
            claim_token: r.claim.map(|c| c.token),
        }
    }
}

/// An address for `blast_suppressions` (canonical form), as JSON.
#[derive(Serialize)]
struct Suppression<'a> {
    address: String,
    reason: &'a str,
}

/// Rows as a JSON array for a `json_to_recordset` parameter.
fn to_json<T: Serialize>(rows: &[T]) -> Result<String> {
    // Plain structs of strings and numbers: serializing cannot fail.
    serde_json::to_string(rows).map_err(|e| Error::Internal(format!("ledger rows as JSON: {e}")))
}

/// Splits a batch so no statement names a recipient twice: PostgreSQL
/// refuses an `ON CONFLICT DO UPDATE` that would change one row twice, where
/// SQLite applies the rows one after another. Round k holds the k-th record
/// of each recipient, in batch order, so a later answer still lands after an
/// earlier one. Almost every batch is one round.
fn rounds<'b, 'a>(rows: &'b [Stored<'a>]) -> Vec<Vec<&'b Stored<'a>>> {
    let mut seen: std::collections::HashMap<i64, usize> =
        std::collections::HashMap::with_capacity(rows.len());
    let mut out: Vec<Vec<&Stored<'a>>> = Vec::new();
    for r in rows {
        let k = seen.entry(r.record.recipient_id).or_insert(0);
        if out.len() <= *k {
            out.push(Vec::new());
        }
        out[*k].push(r);
        *k += 1;
    }
    out
}

/// A record as stored: its final status and schedule worked out.
struct Stored<'a> {
    record: &'a Record,
    status: Status,
    reply: &'a Reply,
    text: String,
    queue_id: Option<&'a str>,
    first_attempt_at: Option<String>,
    next_attempt_at: Option<String>,
    suppress: bool,
    /// The claim it was sent under, when the ledger is fenced.
    claim: Option<Claim>,
}

impl Stored<'_> {
    /// Whether the answer also goes to `blast_attempts`: every answer of a
    /// recipient deferred at least once. A recipient answered at the first
    /// try has that one answer in `blast_deliveries`; writing it twice cost
    /// ~15% of the rate.
    fn in_history(&self) -> bool {
        self.record.attempts > 0 || matches!(self.record.outcome, Outcome::Deferred(_))
    }
}

/// Decides what a record means for the ledger: a deferral is scheduled by
/// `retry`, or turns into a failure once `give_up_after` has passed since the
/// first one; a 5xx whose reason is hard ([`classify::suppresses`]) also
/// suppresses the address.
fn stored<'a>(r: &'a Record, retry: &RetryPolicy, now: OffsetDateTime) -> Stored<'a> {
    let reply = r.outcome.reply();
    let mut out = Stored {
        record: r,
        status: r.status(),
        reply,
        text: reply.text.clone(),
        queue_id: None,
        first_attempt_at: None,
        next_attempt_at: None,
        suppress: false,
        claim: None,
    };
    if r.skipped.is_some() {
        return out;
    }
    match &r.outcome {
        Outcome::Sent { queue_id, .. } => out.queue_id = queue_id.as_deref(),
        Outcome::Failed(reply) => out.suppress = classify::suppresses(reply),
        Outcome::Deferred(reply) => {
            let first = r
                .first_attempt_at
                .as_deref()
                .and_then(clock::parse_db_timestamp)
                .unwrap_or(now);
            out.first_attempt_at = Some(clock::db_timestamp(first));
            if now - first >= retry.give_up_after {
                out.status = Status::Failed;
                out.text = format!(
                    "gave up after {} deferred attempts over {}: {}",
                    r.attempts + 1,
                    humanize(retry.give_up_after),
                    reply.text
                );
            } else {
                let wait = retry.delay_after(r.attempts + 1);
                out.next_attempt_at = Some(clock::db_timestamp(now + wait));
            }
        }
    }
    out
}

/// `2d`, `6h`, `30m`, `45s`: how durations are written in campaign files.
pub fn humanize(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        _ if s >= 86400 && s.is_multiple_of(86400) => format!("{}d", s / 86400),
        _ if s >= 3600 && s.is_multiple_of(3600) => format!("{}h", s / 3600),
        _ if s >= 60 && s.is_multiple_of(60) => format!("{}m", s / 60),
        _ => format!("{s}s"),
    }
}

/// `prefix (?,?,..),(..) suffix` with `rows` tuples of `cols` parameters.
/// Anonymous `?` on SQLite: sqlx looks up each parameter's name, and SQLite's
/// name lookup is a linear scan, so thousands of `$N` parameters in one
/// statement cost O(n^2) (64% of blast's CPU when measured).
fn insert_sql(backend: Backend, prefix: &str, cols: usize, rows: usize, suffix: &str) -> String {
    let mut sql = String::with_capacity(prefix.len() + suffix.len() + rows * cols * 5);
    sql.push_str(prefix);
    for i in 0..rows {
        sql.push_str(if i > 0 { ",(" } else { "(" });
        for c in 0..cols {
            if c > 0 {
                sql.push(',');
            }
            match backend {
                Backend::Sqlite => sql.push('?'),
                Backend::Postgres => sql.push_str(&format!("${}", i * cols + c + 1)),
            }
        }
        sql.push(')');
    }
    sql.push_str(suffix);
    sql
}

/// The `source` of the suppressions campaign `campaign_id`'s refusals add.
pub fn smtp_source(campaign_id: i64) -> String {
    format!("smtp:campaign={campaign_id}")
}

/// After the circuit breaker tripped: the refusals it covers were the
/// relay's, not the recipients'. They become deferred (due at once) and lose
/// the suppressions they caused: those of this campaign's refusals
/// ([`smtp_source`]) added from `since` on. An unsubscribe, a bounce or an
/// older suppression of the same address stays.
pub async fn requeue(
    db: &Db,
    campaign_id: i64,
    recipients: &[(i64, String)],
    since: OffsetDateTime,
) -> Result<()> {
    let mut tx = db.pool().begin().await?;
    // Final rows become deferred again: the next pass must walk them.
    sqlx::query("UPDATE blast_campaigns SET final_to = NULL WHERE id = $1")
        .bind(campaign_id)
        .execute(&mut *tx)
        .await?;
    let (source, since) = (smtp_source(campaign_id), clock::db_timestamp(since));
    for (id, email) in recipients {
        sqlx::query(
            "UPDATE blast_deliveries SET status = 'deferred', next_attempt_at = NULL \
             WHERE campaign_id = $1 AND recipient_id = $2 AND status IN ('failed', 'deferred')",
        )
        .bind(campaign_id)
        .bind(id)
        .execute(&mut *tx)
        .await?;
        let Ok(key) = address::canonical(email) else {
            continue;
        };
        sqlx::query(
            "DELETE FROM blast_suppressions WHERE address = $1 AND source = $2 \
             AND created_at >= $3",
        )
        .bind(key)
        .bind(&source)
        .bind(&since)
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    Ok(())
}

impl Ledger for SqlLedger {
    fn record(&mut self, batch: &[Record]) -> impl Future<Output = Result<()>> + Send {
        self.write(batch)
    }
}

/// A ledger that keeps nothing, for `--dry-run` and `blast check --render`
/// (which must leave the database as they found it; the run's summary
/// counts the outcomes).
#[derive(Debug, Clone, Copy, Default)]
pub struct Discard;

impl Ledger for Discard {
    async fn record(&mut self, _batch: &[Record]) -> Result<()> {
        Ok(())
    }
}

/// An in-memory ledger that keeps every record, for tests.
#[derive(Debug, Clone, Default)]
pub struct MemoryLedger {
    records: Arc<Mutex<Vec<Record>>>,
}

impl MemoryLedger {
    /// An empty ledger.
    pub fn new() -> MemoryLedger {
        MemoryLedger::default()
    }

    /// Everything recorded so far.
    pub fn records(&self) -> Vec<Record> {
        self.records
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

impl Ledger for MemoryLedger {
    async fn record(&mut self, batch: &[Record]) -> Result<()> {
        self.records
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend_from_slice(batch);
        Ok(())
    }
}

/// How soon [`write_loop`] first looks for more records after a batch's
/// first, and the shortest wait between two looks.
const DRAIN_EVERY: Duration = Duration::from_millis(5);

/// When to look for records next, at `now`, with `len` in the batch whose
/// first came at `start`: half the time the batch would take to fill at
/// the rate seen so far, at least [`DRAIN_EVERY`], never past its write
/// at `start` + [`FLUSH_EVERY`]. At 500
/// messages a second that is one look at 5 ms and the write at 100 ms;
/// at 20,000 a look every few milliseconds as the batch nears full. What
/// arrives meanwhile fills at most half the channel (it holds a batch), so
/// a rate that doubles meanwhile still does not hold up the senders.
fn next_look(
    start: tokio::time::Instant,
    now: tokio::time::Instant,
    len: usize,
) -> tokio::time::Instant {
    let elapsed = now - start;
    let wait = if elapsed < DRAIN_EVERY || len == 0 {
        DRAIN_EVERY
    } else {
        let per_row = elapsed / len as u32;
        (per_row * FLUSH_ROWS.saturating_sub(len) as u32 / 2).max(DRAIN_EVERY)
    };
    (start + FLUSH_EVERY).min(now + wait)
}

/// Moves the records waiting in `rx` into `batch`, up to [`FLUSH_ROWS`];
/// true when every sender is gone and nothing is left.
fn drain(rx: &mut mpsc::Receiver<Record>, batch: &mut Vec<Record>) -> bool {
    while batch.len() < FLUSH_ROWS {
        match rx.try_recv() {
            Ok(r) => batch.push(r),
            Err(mpsc::error::TryRecvError::Empty) => return false,
            Err(mpsc::error::TryRecvError::Disconnected) => return true,
        }
    }
    false
}

/// The ledger writer's own measures: how long each batch took to store
/// (retries included) and how many rows it had.
#[derive(Debug, Default)]
pub struct Flushes {
    /// Time to store a batch, microseconds.
    pub time: Histogram,
    /// Rows per batch.
    pub rows: Histogram<FLUSH_ROW_BUCKETS>,
}

/// Buckets of [`Flushes::rows`]: up to 1024, then the rest.
pub const FLUSH_ROW_BUCKETS: usize = 12;

/// Drains `rx` into `ledger` in batches until every sender is gone: a batch
/// is written when [`FLUSH_ROWS`] records are waiting or [`FLUSH_EVERY`] after
/// its first record, whichever comes first. A transient error is retried
/// for up to [`db::RETRY_FOR`](crate::db::RETRY_FOR). Returns the first
/// lasting write error
/// (after which the runner stops the campaign: it must not send what it
/// cannot record). Each batch's time and size go into `flushes`.
pub async fn write_loop<L: Ledger>(
    mut ledger: L,
    mut rx: mpsc::Receiver<Record>,
    flushes: &Flushes,
) -> Result<u64> {
    let mut batch = Vec::with_capacity(FLUSH_ROWS);
    let mut written = 0u64;
    while let Some(first) = rx.recv().await {
        batch.push(first);
        let start = tokio::time::Instant::now();
        let deadline = start + FLUSH_EVERY;
        // Collects by looking now and then rather than waiting on the
        // channel: a receiver waiting on it is woken (and a timer set) for
        // every record, which at 20,000 messages a second was a wake-up
        // per message. Looking every 5 ms was 200 wake-ups a second at any
        // rate (about 2% of a core on a VM at 500 messages a second); the
        // looks now follow the rate (`next_look`). A full batch is written
        // at once.
        loop {
            let closed = drain(&mut rx, &mut batch);
            let now = tokio::time::Instant::now();
            if closed || batch.len() >= FLUSH_ROWS || now >= deadline {
                break;
            }
            tokio::time::sleep_until(next_look(start, now, batch.len())).await;
        }
        // A database that restarts or drops the connection is waited for
        // (the batch is kept, sending waits on the full channel).
        let mut backoff = Backoff::new("ledger");
        let started = std::time::Instant::now();
        loop {
            match ledger.record(&batch).await {
                Ok(()) => break,
                Err(e) if backoff.retry(&e).await => continue,
                Err(e) => return Err(e),
            }
        }
        backoff.succeeded();
        flushes.time.record(started.elapsed());
        flushes.rows.observe(batch.len() as u64);
        written += batch.len() as u64;
        batch.clear();
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use tokio::sync::mpsc;

    use super::{
        insert_sql, next_look, stored, write_loop, Flushes, Ledger, DRAIN_EVERY, FLUSH_EVERY,
        FLUSH_ROWS,
    };
    use crate::config::RetryPolicy;
    use crate::db::Backend;
    use crate::error::{Error, Result};
    use crate::model::{Outcome, Record, Reply, Status};

    fn record(id: i64, outcome: Outcome) -> Record {
        Record {
            recipient_id: id,
            email: format!("u{id}@example.com"),
            outcome,
            relay: Some("smtp://127.0.0.1:25".into()),
            attempts: 0,
            first_attempt_at: None,
            skipped: None,
            claim_token: None,
        }
    }

    fn reply(code: u16, enhanced: Option<&str>, text: &str) -> Reply {
        Reply {
            code: Some(code),
            enhanced: enhanced.map(str::to_string),
            text: text.into(),
        }
    }

    /// Remembers each batch's size and when it was written.
    #[derive(Clone, Default)]
    struct Batches(Arc<Mutex<Vec<(usize, tokio::time::Instant)>>>);

    impl Ledger for Batches {
        async fn record(&mut self, batch: &[Record]) -> Result<()> {
            self.0
                .lock()
                .unwrap()
                .push((batch.len(), tokio::time::Instant::now()));
            Ok(())
        }
    }

    #[tokio::test(start_paused = true)]
    async fn batches_are_flushed_when_full_or_after_flush_every() {
        let batches = Batches::default();
        let (tx, rx) = mpsc::channel(FLUSH_ROWS);
        let flushes = Arc::new(Flushes::default());
        let writer = {
            let (batches, flushes) = (batches.clone(), flushes.clone());
            tokio::spawn(async move { write_loop(batches, rx, &flushes).await })
        };
        let start = tokio::time::Instant::now();
        for i in 0..2500 {
            tx.send(record(i, Outcome::local_failure("x")))
                .await
                .unwrap();
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        tx.send(record(9999, Outcome::local_failure("x")))
            .await
            .unwrap();
        drop(tx);
        assert_eq!(writer.await.unwrap().unwrap(), 2501);
        let got = batches.0.lock().unwrap().clone();
        let sizes: Vec<usize> = got.iter().map(|b| b.0).collect();
        assert_eq!(sizes, vec![1000, 1000, 500, 1]);
        // Each batch measured: its rows (the sum, the buckets) and a time.
        let rows = flushes.rows.snapshot();
        assert_eq!((rows.count, rows.sum), (4, 2501));
        let le = |bound| rows.buckets.iter().find(|b| b.0 == Some(bound)).unwrap().1;
        assert_eq!((le(1), le(512), le(1024)), (1, 1, 2));
        assert_eq!(flushes.time.snapshot().count, 4);
        // The partial batch waited FLUSH_EVERY for more after its first
        // record (which came within a poll of the previous write), no longer.
        let waited = got[2].1 - got[1].1;
        assert!(
            waited >= FLUSH_EVERY && waited <= FLUSH_EVERY + DRAIN_EVERY,
            "{waited:?}"
        );
        // The last one was written once its sender closed (seen at the
        // next poll), without waiting FLUSH_EVERY.
        let last = got[3].1 - start;
        assert!(
            last >= Duration::from_secs(1) && last <= Duration::from_secs(1) + 2 * DRAIN_EVERY,
            "{last:?}"
        );
    }

    #[test]
    fn the_writer_looks_for_records_as_often_as_the_rate_needs() {
        let ms = Duration::from_millis;
        let start = tokio::time::Instant::now();
        let deadline = start + FLUSH_EVERY;
        // Just after the batch's first record: a first look 5 ms later.
        assert_eq!(next_look(start, start, 1), start + DRAIN_EVERY);
        // 500 messages a second: 3 rows in 6 ms, the batch would take 2 s
        // to fill; the next look is the write at the deadline.
        assert_eq!(next_look(start, start + ms(6), 3), deadline);
        // 20,000 a second: 100 rows in 5 ms, full in 45 ms more; look
        // again halfway.
        let now = start + ms(5);
        assert_eq!(
            next_look(start, now, 100),
            now + Duration::from_micros(22_500)
        );
        // Nearly full: never more often than every DRAIN_EVERY.
        let now = start + ms(40);
        assert_eq!(next_look(start, now, 990), now + DRAIN_EVERY);
        // Never past the deadline.
        assert_eq!(next_look(start, start + ms(98), 2), deadline);
    }

    /// Fails its first `fail` writes with `error()`, then keeps batches.
    struct Flaky {
        fail: u32,
        error: fn() -> Error,
        kept: Arc<Mutex<usize>>,
    }

    impl Ledger for Flaky {
        async fn record(&mut self, batch: &[Record]) -> Result<()> {
            if self.fail > 0 {
                self.fail -= 1;
                return Err((self.error)());
            }
            *self.kept.lock().unwrap() += batch.len();
            Ok(())
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_database_that_restarts_is_waited_for_and_nothing_is_lost() {
        let kept = Arc::new(Mutex::new(0));
        let flaky = Flaky {
            fail: 6,
            error: || Error::Db(sqlx::Error::PoolTimedOut),
            kept: kept.clone(),
        };
        let (tx, rx) = mpsc::channel(FLUSH_ROWS);
        let writer = tokio::spawn(async move { write_loop(flaky, rx, &Flushes::default()).await });
        for i in 0..10 {
            tx.send(record(i, Outcome::local_failure("x")))
                .await
                .unwrap();
        }
        drop(tx);
        let start = tokio::time::Instant::now();
        assert_eq!(writer.await.unwrap().unwrap(), 10);
        assert_eq!(*kept.lock().unwrap(), 10);
        // 0.1 + 0.2 + 0.4 + 0.8 + 1.6 + 3.2 s of backoff.
        assert!(start.elapsed() >= Duration::from_millis(6300));
    }

    #[tokio::test(start_paused = true)]
    async fn a_database_down_for_longer_than_the_retry_window_stops_the_run() {
        let kept = Arc::new(Mutex::new(0));
        let flaky = Flaky {
            fail: u32::MAX,
            error: || Error::Db(sqlx::Error::PoolTimedOut),
            kept: kept.clone(),
        };
        let (tx, rx) = mpsc::channel(FLUSH_ROWS);
        let writer = tokio::spawn(async move { write_loop(flaky, rx, &Flushes::default()).await });
        tx.send(record(1, Outcome::local_failure("x")))
            .await
            .unwrap();
        drop(tx);
        let start = tokio::time::Instant::now();
        assert!(writer.await.unwrap().is_err());
        let waited = start.elapsed();
        assert!(
            waited >= Duration::from_secs(55) && waited <= crate::db::RETRY_FOR,
            "{waited:?}"
        );
        // A lasting error (not transient) fails at once.
        let flaky = Flaky {
            fail: 1,
            error: || Error::Audience("no such column".into()),
            kept,
        };
        let (tx, rx) = mpsc::channel(FLUSH_ROWS);
        let writer = tokio::spawn(async move { write_loop(flaky, rx, &Flushes::default()).await });
        tx.send(record(1, Outcome::local_failure("x")))
            .await
            .unwrap();
        drop(tx);
        let start = tokio::time::Instant::now();
        assert!(writer.await.unwrap().is_err());
        assert!(start.elapsed() < Duration::from_secs(1));
    }

    #[test]
    fn insert_sql_numbers_postgres_parameters_and_uses_anonymous_ones_on_sqlite() {
        let pg = insert_sql(
            Backend::Postgres,
            "INSERT INTO t (a, b) VALUES ",
            2,
            3,
            " ON CONFLICT DO NOTHING",
        );
        assert_eq!(
            pg,
            "INSERT INTO t (a, b) VALUES ($1,$2),($3,$4),($5,$6) ON CONFLICT DO NOTHING"
        );
        let lite = insert_sql(Backend::Sqlite, "INSERT INTO t (a, b) VALUES ", 2, 2, "");
        assert_eq!(lite, "INSERT INTO t (a, b) VALUES (?,?),(?,?)");
    }

    #[test]
    fn stored_decides_status_schedule_and_suppression() {
        let retry = RetryPolicy::default();
        let now = crate::clock::now();
        let sent = record(
            1,
            Outcome::Sent {
                reply: reply(250, Some("2.0.0"), "Ok: queued as ABC"),
                queue_id: Some("ABC".into()),
            },
        );
        let s = stored(&sent, &retry, now);
        assert_eq!(
            (s.status, s.queue_id, s.suppress),
            (Status::Sent, Some("ABC"), false)
        );

        let deferred = record(2, Outcome::Deferred(reply(451, None, "try later")));
        let s = stored(&deferred, &retry, now);
        assert_eq!(s.status, Status::Deferred);
        let due = s
            .next_attempt_at
            .as_deref()
            .and_then(crate::clock::parse_db_timestamp);
        // Stored timestamps drop sub-second precision.
        let wait = due.map(|d| (d - now).whole_seconds());
        assert!(
            matches!(wait, Some(299..=300)),
            "first retry after 5 min: {wait:?}"
        );

        let mut old = deferred.clone();
        old.attempts = 7;
        old.first_attempt_at = Some(crate::clock::db_timestamp(now - retry.give_up_after));
        let s = stored(&old, &retry, now);
        assert_eq!(s.status, Status::Failed, "given up after give_up_after");
        assert!(
            s.text
                .starts_with("gave up after 8 deferred attempts over 2d"),
            "{}",
            s.text
        );

        let gone = record(
            3,
            Outcome::Failed(reply(550, Some("5.1.1"), "5.1.1 user unknown")),
        );
        assert!(
            stored(&gone, &retry, now).suppress,
            "a hard bounce suppresses"
        );
        let policy = record(4, Outcome::Failed(reply(554, Some("5.7.1"), "5.7.1 spam")));
        assert!(
            !stored(&policy, &retry, now).suppress,
            "a policy block does not"
        );

        let mut skipped = record(5, Outcome::local_failure("address is suppressed: x"));
        skipped.skipped = Some(crate::model::Skipped::Suppressed);
        assert_eq!(stored(&skipped, &retry, now).status, Status::Suppressed);
    }

    #[tokio::test]
    async fn a_final_status_is_never_replaced_by_a_later_write() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("l.db").display());
        let db = crate::db::Db::connect(&url).await.unwrap();
        let c = super::open_campaign(&db, "c", async { Ok(10) })
            .await
            .unwrap();
        let mut ledger = super::SqlLedger::new(db.clone(), c.id, RetryPolicy::default());
        let sent = record(
            1,
            Outcome::Sent {
                reply: reply(250, None, "Ok: queued as A1"),
                queue_id: Some("A1".into()),
            },
        );
        ledger.record(&[sent]).await.unwrap();
        // A late answer for the same recipient (a worker that lost its
        // claim, a duplicate): deferred, then failed.
        let late = [
            record(1, Outcome::Deferred(reply(451, None, "later"))),
            record(1, Outcome::Failed(reply(550, None, "no"))),
        ];
        for r in late {
            ledger.record(&[r]).await.unwrap();
        }
        let (status, queue_id): (String, Option<String>) = sqlx::query_as(
            "SELECT status, queue_id FROM blast_deliveries WHERE campaign_id = $1 AND recipient_id = 1",
        )
        .bind(c.id)
        .fetch_one(db.pool())
        .await
        .unwrap();
        assert_eq!((status.as_str(), queue_id.as_deref()), ("sent", Some("A1")));
        db.close().await;
    }
}
