//! `blast report`: one campaign's ledger summed up for people — totals,
//! sends per minute (per worker too when several sent it), outcomes by
//! destination domain, the commonest refusals, bounces, complaints and
//! unsubscribes per day, and what the MTA said later.
//!
//! Every figure is an aggregate computed by the database (`GROUP BY`), so a
//! report on millions of recipients reads a few hundred rows; the
//! aggregates run two at a time. The SQL is written once for SQLite and
//! PostgreSQL, but for the name of the function that finds the `@`.
//! [`html`] renders a [`Report`] as one self-contained page with [`svg`]
//! charts.

pub mod html;
pub mod svg;

use std::collections::BTreeMap;

use serde::Serialize;
use sqlx::Row;

use crate::db::{Backend, Db};
use crate::error::Result;
use crate::ledger::CampaignRow;

/// How many destination domains the report lists.
pub const TOP_DOMAINS: i64 = 20;
/// How many distinct refusals the report lists.
pub const TOP_REPLIES: i64 = 10;
/// How many workers' per-minute series the report keeps: the busiest.
pub const TOP_WORKERS: usize = 8;
/// Aggregates run at once (each holds one of the pool's connections).
const AT_ONCE: usize = 2;

/// A turn to run one aggregate (held until it is done).
type Turn<'a> = tokio::sync::SemaphorePermit<'a>;

/// The lower-cased part of `email` after its last `@`, evaluated for each
/// of a campaign's rows. The usual address with one `@` is cut at its first
/// one (`instr`, `strpos`); a quoted local part holding another `@` takes
/// the portable form: `rtrim(email, <email without '@'>)` strips from the
/// right every character but `@`, leaving the text up to the last `@`
/// (slow: it tests every character against a set; as the only form, the
/// domain table of a 10M-row ledger took 21 s instead of 11 s on SQLite).
fn domain_sql(backend: Backend) -> &'static str {
    match backend {
        Backend::Sqlite => {
            "lower(CASE WHEN instr(substr(email, instr(email, '@') + 1), '@') = 0 \
             THEN substr(email, instr(email, '@') + 1) \
             ELSE substr(email, length(rtrim(email, replace(email, '@', ''))) + 1) END)"
        }
        Backend::Postgres => {
            "lower(CASE WHEN strpos(substr(email, strpos(email, '@') + 1), '@') = 0 \
             THEN substr(email, strpos(email, '@') + 1) \
             ELSE substr(email, length(rtrim(email, replace(email, '@', ''))) + 1) END)"
        }
    }
}

/// Everything `blast report` shows.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Report {
    /// Campaign name.
    pub campaign: String,
    /// Run state.
    pub state: String,
    /// The figures at a glance.
    pub totals: Totals,
    /// Ledger rows written per minute (`YYYY-MM-DDTHH:MM`, UTC), in order.
    pub per_minute: Vec<Count>,
    /// How many distinct workers wrote the campaign's ledger rows (rows
    /// written before schema v8 name none and are not counted).
    pub workers: usize,
    /// When more than one worker wrote rows: each one's rows per minute,
    /// the busiest [`TOP_WORKERS`] first. Rows that name no worker (written
    /// before schema v8) are one more series, `worker` null, so the series
    /// of a campaign with at most [`TOP_WORKERS`] of them add up to
    /// `per_minute`. Empty when one worker (or none) wrote the rows.
    pub per_minute_by_worker: Vec<WorkerSeries>,
    /// How many series there were before the cap of [`TOP_WORKERS`].
    pub worker_series: usize,
    /// Outcomes by destination domain, the largest [`TOP_DOMAINS`] first.
    pub domains: Vec<DomainRow>,
    /// The commonest answers to recipients that were not sent, by how many
    /// recipients got them (at most [`TOP_REPLIES`]).
    pub replies: Vec<ReplyRow>,
    /// Bounces, complaints and unsubscribes per day, in order.
    pub per_day: Vec<DayRow>,
    /// The MTA's final word per recipient (`blast reconcile`), by status.
    pub mta: Vec<Count>,
    /// How long the MTA took to deliver (`mta_delay_secs`), in buckets.
    pub mta_delays: Vec<Count>,
}

/// Figures at a glance.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Totals {
    /// Ledger rows plus `pending` when known.
    pub audience: i64,
    /// Recipients without a final outcome, when the audience is known (a
    /// campaign file was given).
    pub pending: Option<i64>,
    /// Accepted by the MTA.
    pub sent: i64,
    /// Refused for good.
    pub failed: i64,
    /// Temporarily refused.
    pub deferred: i64,
    /// Skipped: address suppressed.
    pub suppressed: i64,
    /// Message could not be built.
    pub unrendered: i64,
    /// Recipients with a bounce ingested.
    pub bounced: i64,
    /// Recipients who complained.
    pub complained: i64,
    /// Addresses unsubscribed through this campaign.
    pub unsubscribed: i64,
    /// The first ledger write (RFC 3339).
    pub first_at: Option<String>,
    /// The last ledger write (RFC 3339).
    pub last_at: Option<String>,
    /// `last_at - first_at`, seconds.
    pub duration_secs: f64,
    /// Ledger rows per second over `duration_secs` (0 with a single instant).
    pub mean_rate: f64,
    /// The busiest minute's ledger rows.
    pub peak_per_minute: i64,
}

/// A label and how many.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct Count {
    /// What was counted.
    pub label: String,
    /// How many.
    pub n: i64,
}

/// One worker's ledger rows per minute.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct WorkerSeries {
    /// The worker's name (`--worker`, default the host name); null for rows
    /// that name no worker (written before schema v8).
    pub worker: Option<String>,
    /// Its rows in all.
    pub total: i64,
    /// Its rows in each minute of [`Report::per_minute`], same labels in
    /// the same order (0 in a minute it wrote nothing).
    pub points: Vec<Count>,
}

/// One destination domain.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct DomainRow {
    /// Lower-cased domain.
    pub domain: String,
    /// Ledger rows for it.
    pub total: i64,
    /// Sent.
    pub sent: i64,
    /// Deferred.
    pub deferred: i64,
    /// Failed.
    pub failed: i64,
    /// Recipients with a bounce ingested.
    pub bounced: i64,
}

/// One reply text and how many recipients got it.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct ReplyRow {
    /// SMTP code, when there was one.
    pub code: Option<i64>,
    /// The reply text.
    pub reply: String,
    /// Recipients.
    pub recipients: i64,
}

/// One day's inbound events.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct DayRow {
    /// `YYYY-MM-DD` (UTC).
    pub day: String,
    /// Bounces received.
    pub bounces: i64,
    /// Complaints received.
    pub complaints: i64,
    /// Unsubscribes.
    pub unsubscribes: i64,
}

/// Builds the report for campaign `row`; `pending` when the audience is known.
///
/// The aggregates are independent and run [`AT_ONCE`] at a time, each on
/// a connection of its own: on a large ledger each is a scan of the
/// campaign's rows, and two cores scan two at once (more would wait for
/// the pool's connections, and time out, while the long ones run).
pub async fn build(db: &Db, row: &CampaignRow, pending: Option<i64>) -> Result<Report> {
    let id = row.id;
    let turns = tokio::sync::Semaphore::new(AT_ONCE);
    let turn = || async { turns.acquire().await.expect("never closed") };
    let (mut t, minutes, (mta, mta_delays), domains, replies, per_day) = tokio::try_join!(
        async { totals(db, id, pending, turn().await).await },
        async { minutes(db, id, turn().await).await },
        async { mta(db, id, turn().await).await },
        async { domains(db, id, turn().await).await },
        async { replies(db, id, turn().await).await },
        async { per_day(db, id, turn().await).await },
    )?;
    let per_minute = per_minute(&minutes);
    t.peak_per_minute = per_minute.iter().map(|c| c.n).max().unwrap_or(0);
    let (workers, mut per_minute_by_worker) = by_worker(minutes, &per_minute);
    let worker_series = per_minute_by_worker.len();
    per_minute_by_worker.truncate(TOP_WORKERS);
    Ok(Report {
        campaign: row.name.clone(),
        state: row.state.clone(),
        totals: t,
        per_minute,
        workers,
        per_minute_by_worker,
        worker_series,
        domains,
        replies,
        per_day,
        mta,
        mta_delays,
    })
}

/// The domain table alone (`blast status --by-domain`): one aggregate,
/// not the whole report.
pub async fn domain_table(db: &Db, row: &CampaignRow) -> Result<Vec<DomainRow>> {
    let turns = tokio::sync::Semaphore::new(1);
    domains(db, row.id, turns.acquire().await.expect("never closed")).await
}

/// Rows per minute (`YYYY-MM-DDTHH:MM`) and worker (None: written before
/// schema v8).
type Minutes = BTreeMap<Option<String>, BTreeMap<String, i64>>;

/// The campaign's rows by minute and worker: one scan, from which both the
/// total per minute and the workers' series come (so they always agree).
async fn minutes(db: &Db, id: i64, _turn: Turn<'_>) -> Result<Minutes> {
    let rows = sqlx::query(
        "SELECT substr(updated_at, 1, 16) AS label, worker, COUNT(*) AS n FROM blast_deliveries \
         WHERE campaign_id = $1 GROUP BY substr(updated_at, 1, 16), worker",
    )
    .bind(id)
    .fetch_all(db.pool())
    .await?;
    let mut minutes = Minutes::new();
    for r in rows {
        let worker: Option<String> = r.try_get("worker")?;
        let label: String = r.try_get("label")?;
        let n: i64 = r.try_get("n")?;
        *minutes.entry(worker).or_default().entry(label).or_default() += n;
    }
    Ok(minutes)
}

/// Rows per minute over every worker, in time order.
fn per_minute(minutes: &Minutes) -> Vec<Count> {
    let mut total: BTreeMap<&str, i64> = BTreeMap::new();
    for by_minute in minutes.values() {
        for (label, n) in by_minute {
            *total.entry(label).or_default() += n;
        }
    }
    total
        .into_iter()
        .map(|(label, n)| Count {
            label: label.to_string(),
            n,
        })
        .collect()
}

/// The `source` values of this campaign's unsubscribes (one-click, mail).
fn unsubscribe_sources(id: i64) -> (String, String) {
    (
        format!("https:campaign={id}"),
        format!("mailto:campaign={id}"),
    )
}

/// The numbers at a glance (all but the peak per minute).
async fn totals(db: &Db, id: i64, pending: Option<i64>, _turn: Turn<'_>) -> Result<Totals> {
    let pool = db.pool();
    let mut t = Totals {
        pending,
        ..Default::default()
    };

    let r = sqlx::query(
        "SELECT COUNT(*) AS n, \
         COUNT(CASE WHEN status = 'sent' THEN 1 END) AS sent, \
         COUNT(CASE WHEN status = 'failed' THEN 1 END) AS failed, \
         COUNT(CASE WHEN status = 'deferred' THEN 1 END) AS deferred, \
         COUNT(CASE WHEN status = 'suppressed' THEN 1 END) AS suppressed, \
         COUNT(CASE WHEN status = 'unrendered' THEN 1 END) AS unrendered, \
         MIN(updated_at) AS first_at, MAX(updated_at) AS last_at \
         FROM blast_deliveries WHERE campaign_id = $1",
    )
    .bind(id)
    .fetch_one(pool)
    .await?;
    let rows: i64 = r.try_get("n")?;
    t.sent = r.try_get("sent")?;
    t.failed = r.try_get("failed")?;
    t.deferred = r.try_get("deferred")?;
    t.suppressed = r.try_get("suppressed")?;
    t.unrendered = r.try_get("unrendered")?;
    t.first_at = r.try_get("first_at")?;
    t.last_at = r.try_get("last_at")?;
    t.audience = rows + pending.unwrap_or(0);
    if let (Some(a), Some(b)) = (&t.first_at, &t.last_at) {
        t.duration_secs = seconds_between(a, b).unwrap_or(0.0);
    }
    if t.duration_secs > 0.0 {
        t.mean_rate = rows as f64 / t.duration_secs;
    }

    let r = sqlx::query(
        "SELECT COUNT(DISTINCT CASE WHEN kind = 'bounce' THEN recipient_id END) AS bounced, \
         COUNT(DISTINCT CASE WHEN kind = 'complaint' THEN recipient_id END) AS complained \
         FROM blast_bounces WHERE campaign_id = $1",
    )
    .bind(id)
    .fetch_one(pool)
    .await?;
    t.bounced = r.try_get("bounced")?;
    t.complained = r.try_get("complained")?;
    let (https, mailto) = unsubscribe_sources(id);
    t.unsubscribed =
        sqlx::query_scalar("SELECT COUNT(*) FROM blast_suppressions WHERE source IN ($1, $2)")
            .bind(&https)
            .bind(&mailto)
            .fetch_one(pool)
            .await?;

    Ok(t)
}

/// How many workers wrote the campaign's rows, and, when more than one did,
/// every worker's rows per minute over the minutes of `per_minute`, busiest
/// first (then by name; rows naming no worker last among equals).
fn by_worker(minutes: Minutes, per_minute: &[Count]) -> (usize, Vec<WorkerSeries>) {
    // Ordered in Rust: SQLite sorts NULL first, PostgreSQL last.
    let workers = minutes.keys().filter(|w| w.is_some()).count();
    if workers < 2 {
        return (workers, Vec::new());
    }
    let mut series: Vec<WorkerSeries> = minutes
        .into_iter()
        .map(|(worker, by_minute)| WorkerSeries {
            worker,
            total: by_minute.values().sum(),
            points: per_minute
                .iter()
                .map(|m| Count {
                    label: m.label.clone(),
                    n: by_minute.get(&m.label).copied().unwrap_or(0),
                })
                .collect(),
        })
        .collect();
    series.sort_by(|a, b| {
        b.total
            .cmp(&a.total)
            .then_with(|| a.worker.is_none().cmp(&b.worker.is_none()))
            .then_with(|| a.worker.cmp(&b.worker))
    });
    (workers, series)
}

/// Outcomes by destination domain, the top [`TOP_DOMAINS`] by volume. The
/// bounced count comes from the bounces (few) joined to their rows, not
/// from a probe of the bounces for every row (10 million probes in a 10M
/// campaign).
async fn domains(db: &Db, id: i64, _turn: Turn<'_>) -> Result<Vec<DomainRow>> {
    let pool = db.pool();
    let domain = domain_sql(db.backend());
    let sql = format!(
        "SELECT {domain} AS domain, COUNT(*) AS n, \
         COUNT(CASE WHEN status = 'sent' THEN 1 END) AS sent, \
         COUNT(CASE WHEN status = 'deferred' THEN 1 END) AS deferred, \
         COUNT(CASE WHEN status = 'failed' THEN 1 END) AS failed \
         FROM blast_deliveries d WHERE campaign_id = $1 GROUP BY {domain} \
         ORDER BY COUNT(*) DESC, {domain} LIMIT {TOP_DOMAINS}"
    );
    let bounced_sql = format!(
        "SELECT {domain} AS domain, COUNT(DISTINCT d.recipient_id) AS n \
         FROM blast_bounces b JOIN blast_deliveries d \
           ON d.campaign_id = b.campaign_id AND d.recipient_id = b.recipient_id \
         WHERE b.campaign_id = $1 AND b.kind = 'bounce' GROUP BY {domain}"
    );
    let mut bounced = BTreeMap::new();
    for r in sqlx::query(sqlx::AssertSqlSafe(bounced_sql))
        .bind(id)
        .fetch_all(pool)
        .await?
    {
        bounced.insert(r.try_get::<String, _>("domain")?, r.try_get::<i64, _>("n")?);
    }
    let mut domains = Vec::new();
    for r in sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(id)
        .fetch_all(pool)
        .await?
    {
        let domain: String = r.try_get("domain")?;
        domains.push(DomainRow {
            bounced: bounced.get(&domain).copied().unwrap_or(0),
            domain,
            total: r.try_get("n")?,
            sent: r.try_get("sent")?,
            deferred: r.try_get("deferred")?,
            failed: r.try_get("failed")?,
        });
    }

    Ok(domains)
}

/// The commonest replies of recipients not sent, by recipients affected.
async fn replies(db: &Db, id: i64, _turn: Turn<'_>) -> Result<Vec<ReplyRow>> {
    let pool = db.pool();
    let sql = format!(
        "SELECT CAST(smtp_code AS BIGINT) AS code, reply, COUNT(*) AS n FROM blast_deliveries \
         WHERE campaign_id = $1 AND status <> 'sent' AND reply IS NOT NULL \
         GROUP BY smtp_code, reply ORDER BY COUNT(*) DESC, reply LIMIT {TOP_REPLIES}"
    );
    let mut replies = Vec::new();
    for r in sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(id)
        .fetch_all(pool)
        .await?
    {
        replies.push(ReplyRow {
            code: r.try_get("code")?,
            reply: r.try_get("reply")?,
            recipients: r.try_get("n")?,
        });
    }

    Ok(replies)
}

/// Bounces, complaints and unsubscribes per day.
async fn per_day(db: &Db, id: i64, _turn: Turn<'_>) -> Result<Vec<DayRow>> {
    let pool = db.pool();
    let (https, mailto) = unsubscribe_sources(id);
    let mut days: BTreeMap<String, DayRow> = BTreeMap::new();
    for r in sqlx::query(
        "SELECT substr(received_at, 1, 10) AS day, kind, COUNT(*) AS n FROM blast_bounces \
         WHERE campaign_id = $1 AND kind IN ('bounce', 'complaint') \
         GROUP BY substr(received_at, 1, 10), kind",
    )
    .bind(id)
    .fetch_all(pool)
    .await?
    {
        let day: String = r.try_get("day")?;
        let kind: String = r.try_get("kind")?;
        let n: i64 = r.try_get("n")?;
        let e = days.entry(day.clone()).or_insert_with(|| DayRow {
            day,
            ..Default::default()
        });
        match kind.as_str() {
            "bounce" => e.bounces += n,
            _ => e.complaints += n,
        }
    }
    for r in sqlx::query(
        "SELECT substr(created_at, 1, 10) AS day, COUNT(*) AS n FROM blast_suppressions \
         WHERE source IN ($1, $2) GROUP BY substr(created_at, 1, 10)",
    )
    .bind(&https)
    .bind(&mailto)
    .fetch_all(pool)
    .await?
    {
        let day: String = r.try_get("day")?;
        let n: i64 = r.try_get("n")?;
        days.entry(day.clone())
            .or_insert_with(|| DayRow {
                day,
                ..Default::default()
            })
            .unsubscribes += n;
    }

    Ok(days.into_values().collect())
}

/// What the MTA did (rows by `mta_status`) and the histogram of
/// `mta_delay_secs` over [`DELAY_BUCKETS`] (empty when nothing was
/// reconciled), from one scan.
async fn mta(db: &Db, id: i64, _turn: Turn<'_>) -> Result<(Vec<Count>, Vec<Count>)> {
    let rows = sqlx::query(
        "SELECT mta_status AS label, COUNT(*) AS n, \
         COUNT(CASE WHEN mta_delay_secs < 1 THEN 1 END) AS b0, \
         COUNT(CASE WHEN mta_delay_secs >= 1 AND mta_delay_secs < 10 THEN 1 END) AS b1, \
         COUNT(CASE WHEN mta_delay_secs >= 10 AND mta_delay_secs < 60 THEN 1 END) AS b2, \
         COUNT(CASE WHEN mta_delay_secs >= 60 AND mta_delay_secs < 600 THEN 1 END) AS b3, \
         COUNT(CASE WHEN mta_delay_secs >= 600 AND mta_delay_secs < 3600 THEN 1 END) AS b4, \
         COUNT(CASE WHEN mta_delay_secs >= 3600 THEN 1 END) AS b5 \
         FROM blast_deliveries WHERE campaign_id = $1 AND mta_status IS NOT NULL \
         GROUP BY mta_status ORDER BY mta_status",
    )
    .bind(id)
    .fetch_all(db.pool())
    .await?;
    let mut statuses = Vec::new();
    let mut delays = vec![0i64; DELAY_BUCKETS.len()];
    for r in &rows {
        statuses.push(Count {
            label: r.try_get("label")?,
            n: r.try_get("n")?,
        });
        for (i, d) in delays.iter_mut().enumerate() {
            *d += r.try_get::<i64, _>(format!("b{i}").as_str())?;
        }
    }
    let delays = match rows.is_empty() {
        true => Vec::new(),
        false => DELAY_BUCKETS
            .iter()
            .zip(delays)
            .map(|(label, n)| Count {
                label: (*label).to_string(),
                n,
            })
            .collect(),
    };
    Ok((statuses, delays))
}

/// The labels of the `mta_delay_secs` histogram's buckets.
pub const DELAY_BUCKETS: [&str; 6] = ["<1s", "1-10s", "10-60s", "1-10min", "10-60min", ">=1h"];

/// Seconds from RFC 3339 `a` to `b`.
fn seconds_between(a: &str, b: &str) -> Option<f64> {
    use time::format_description::well_known::Rfc3339;
    let a = time::OffsetDateTime::parse(a, &Rfc3339).ok()?;
    let b = time::OffsetDateTime::parse(b, &Rfc3339).ok()?;
    Some((b - a).as_seconds_f64())
}

#[cfg(test)]
mod tests;
