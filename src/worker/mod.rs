//! Who sends a campaign. Any number of workers (processes, usually one per
//! host, each feeding its own MTA) share one campaign: each joins under a
//! name (`--worker`, default the host name) in `blast_workers`, takes
//! ranges of recipient ids from `blast_claims` ([`claims`]), sends them,
//! and takes the next. A keeper task renews the worker and its claims every
//! sixth of the TTL, polls the campaign's state every second (so `blast
//! pause` or `cancel` stops every worker within one or two), gives back
//! claims it could not renew in time, and re-splits the campaign's rate
//! among the live workers.
//!
//! Guarantees, and what they rest on:
//! - a live worker name is held by one process: a second process with the
//!   same name exits at once (cron overlap);
//! - a worker that stops renewing for the TTL is dead: its claims go back
//!   to the pool and another worker finishes them;
//! - every grant carries a fencing token that only grows; the ledger writes
//!   a worker's records only while its token is the claim's current one
//!   (in the same statement), and never replaces a final status;
//! - all lease times are the database's clock ([`Db::now_ms_sql`]).

pub mod claims;
mod holdings;

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use sqlx::{AssertSqlSafe, Row};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::campaign::{share, Rate, Stats};
use crate::clock;
use crate::config::Workers;
use crate::db::Db;
use crate::error::{Error, Result};
use crate::state::State;
pub use claims::{ClaimSource, Claims, Next};
pub use holdings::{Claim, Holdings, Standing};

/// How often a worker checks for pause or cancel.
pub const POLL: Duration = Duration::from_secs(1);

/// Why a worker was stopped from outside the process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Interruption {
    /// `blast pause`, or the circuit breaker: state `paused`.
    Paused(String),
    /// `blast cancel`: state `cancelled`.
    Cancelled(String),
    /// Another process took this worker's name (this one had been silent
    /// past the TTL).
    LeaseLost(String),
}

/// This process's identity: `host/pid/nonce`.
pub fn process_id() -> String {
    format!(
        "{}/{}/{}",
        hostname(),
        std::process::id(),
        clock::now().unix_timestamp_nanos() % 1_000_000_007
    )
}

/// This host's name: the default worker name.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "localhost".into())
}

/// True when `process` names a process on this host that no longer runs.
fn is_dead_local(process: &str) -> bool {
    let mut parts = process.split('/');
    let (Some(host), Some(pid)) = (parts.next(), parts.next()) else {
        return false;
    };
    host == hostname()
        && pid.parse::<u32>().is_ok_and(|pid| {
            pid != std::process::id() && !std::path::Path::new(&format!("/proc/{pid}")).exists()
        })
}

/// A worker that joined a campaign.
#[derive(Debug)]
pub struct Worker {
    db: Db,
    campaign_id: i64,
    /// Its name among the campaign's workers.
    pub name: String,
    process: String,
    settings: Workers,
    /// The campaign's rate (split among live workers).
    campaign_rate: u32,
}

impl Worker {
    /// Joins campaign `campaign_id` (called `campaign`) as `name`. Refused
    /// with [`Error::Busy`] when a live process has that name, and with
    /// [`Error::WorkersFull`] when `max_workers` live workers are there.
    pub async fn join(
        db: &Db,
        campaign_id: i64,
        campaign: &str,
        name: &str,
        settings: &Workers,
        campaign_rate: u32,
    ) -> Result<Worker> {
        let process = process_id();
        let now = db.now_ms_sql();
        let holder: Option<(String, i64)> = sqlx::query(AssertSqlSafe(format!(
            "SELECT process, lease_until - {now} AS left_ms FROM blast_workers \
             WHERE campaign_id = $1 AND name = $2"
        )))
        .bind(campaign_id)
        .bind(name)
        .fetch_optional(db.pool())
        .await?
        .map(|r| Ok::<_, sqlx::Error>((r.try_get("process")?, r.try_get("left_ms")?)))
        .transpose()?;
        // A dead process of this host: its exact row may be replaced now.
        let stealable = holder
            .as_ref()
            .map(|(p, _)| p.as_str())
            .filter(|p| is_dead_local(p))
            .unwrap_or("");
        let max = settings.max_workers.map_or(0, i64::from);
        let joined = sqlx::query(AssertSqlSafe(format!(
            "INSERT INTO blast_workers (campaign_id, name, process, started_at, heartbeat_at, lease_until, sent, rate) \
             SELECT $1, $2, $3, {now}, {now}, {now} + $4, 0, 0 \
             WHERE $5 = 0 OR (SELECT COUNT(*) FROM blast_workers w WHERE w.campaign_id = $1 \
                 AND w.name <> $2 AND w.lease_until > {now}) < $5 \
             ON CONFLICT (campaign_id, name) DO UPDATE SET process = excluded.process, \
                 started_at = excluded.started_at, heartbeat_at = excluded.heartbeat_at, \
                 lease_until = excluded.lease_until, sent = 0, rate = 0 \
             WHERE blast_workers.lease_until < excluded.started_at OR blast_workers.process = $6"
        )))
        .bind(campaign_id)
        .bind(name)
        .bind(&process)
        .bind(settings.ttl.as_millis() as i64)
        .bind(max)
        .bind(stealable)
        .execute(db.pool())
        .await?
        .rows_affected();
        if joined == 0 {
            return Err(match holder {
                Some((p, left)) if left > 0 && p != stealable => Error::Busy {
                    campaign: campaign.to_string(),
                    worker: name.to_string(),
                    process: p,
                    seconds: (left as f64 / 1000.0).ceil() as u64,
                },
                _ => Error::WorkersFull {
                    campaign: campaign.to_string(),
                    max: settings.max_workers.unwrap_or(0),
                },
            });
        }
        // Claims a dead process of this name held go back to the pool: this
        // process starts from a clean hand.
        sqlx::query(
            "UPDATE blast_claims SET lease_until = 0 WHERE campaign_id = $1 AND worker = $2 AND done = 0",
        )
        .bind(campaign_id)
        .bind(name)
        .execute(db.pool())
        .await?;
        Ok(Worker {
            db: db.clone(),
            campaign_id,
            name: name.to_string(),
            process,
            settings: settings.clone(),
            campaign_rate,
        })
    }

    /// The campaign it works on.
    pub fn campaign_id(&self) -> i64 {
        self.campaign_id
    }

    /// Renews this worker's row with its counters; false when another
    /// process took the name.
    async fn heartbeat(&self, sent: u64, rate: f64) -> Result<bool> {
        let now = self.db.now_ms_sql();
        let n = sqlx::query(AssertSqlSafe(format!(
            "UPDATE blast_workers SET heartbeat_at = {now}, lease_until = {now} + $1, sent = $2, rate = $3 \
             WHERE campaign_id = $4 AND name = $5 AND process = $6"
        )))
        .bind(self.settings.ttl.as_millis() as i64)
        .bind(sent as i64)
        .bind(rate)
        .bind(self.campaign_id)
        .bind(&self.name)
        .bind(&self.process)
        .execute(self.db.pool())
        .await?
        .rows_affected();
        Ok(n == 1)
    }

    /// Live workers of the campaign (this one included), and what they
    /// have sent and how fast, summed.
    async fn campaign_view(&self) -> Result<(u64, u64, f64)> {
        let now = self.db.now_ms_sql();
        let row = sqlx::query(AssertSqlSafe(format!(
            "SELECT COUNT(*) AS n, CAST(COALESCE(SUM(sent), 0) AS BIGINT) AS sent, \
             CAST(COALESCE(SUM(rate), 0) AS DOUBLE PRECISION) AS rate \
             FROM blast_workers WHERE campaign_id = $1 AND lease_until > {now}"
        )))
        .bind(self.campaign_id)
        .fetch_one(self.db.pool())
        .await?;
        let n: i64 = row.try_get("n")?;
        let sent: i64 = row.try_get("sent")?;
        let rate: f64 = row.try_get("rate")?;
        Ok((n.max(0) as u64, sent.max(0) as u64, rate))
    }

    /// Other live workers on the campaign.
    pub async fn others_alive(&self) -> Result<u64> {
        let now = self.db.now_ms_sql();
        let n: i64 = sqlx::query_scalar(AssertSqlSafe(format!(
            "SELECT COUNT(*) FROM blast_workers WHERE campaign_id = $1 AND name <> $2 \
             AND lease_until > {now}"
        )))
        .bind(self.campaign_id)
        .bind(&self.name)
        .fetch_one(self.db.pool())
        .await?;
        Ok(n.max(0) as u64)
    }

    /// Leaves the campaign: this worker is dead at once (its claims were
    /// given back or finished), so others need not wait out the TTL.
    pub async fn leave(&self) -> Result<()> {
        sqlx::query(
            "UPDATE blast_workers SET lease_until = 0 WHERE campaign_id = $1 AND name = $2 AND process = $3",
        )
        .bind(self.campaign_id)
        .bind(&self.name)
        .bind(&self.process)
        .execute(self.db.pool())
        .await?;
        Ok(())
    }

    /// Renews the worker and its claims, watches for pause and cancel, and
    /// keeps the rate share and the campaign-wide progress current until
    /// the returned [`Keeper`] is finished. When the campaign is paused or
    /// cancelled from outside (or the worker's name was taken) it records
    /// why and cancels `stop`.
    pub fn keep(
        self: &Arc<Self>,
        claims: Arc<Claims>,
        stats: Arc<Stats>,
        rate: Arc<Rate>,
        stop: CancellationToken,
    ) -> Keeper {
        let done = CancellationToken::new();
        let why = Arc::new(Mutex::new(None));
        let task = {
            let (worker, done, why) = (self.clone(), done.clone(), why.clone());
            let keep = Keep {
                claims,
                stats,
                rate,
            };
            tokio::spawn(async move {
                if let Some(i) = worker.watch(&keep, done).await {
                    *why.lock().unwrap_or_else(|p| p.into_inner()) = Some(i);
                    stop.cancel();
                }
            })
        };
        Keeper { done, task, why }
    }

    /// The keeper's loop: returns why the run must stop, if it must.
    async fn watch(&self, keep: &Keep, done: CancellationToken) -> Option<Interruption> {
        let heartbeat = self.settings.ttl / 6;
        let mut last_beat = Instant::now();
        loop {
            tokio::select! {
                _ = done.cancelled() => return None,
                _ = tokio::time::sleep(POLL) => {}
            }
            match self.poll(keep).await {
                Ok(Some(i)) => return Some(i),
                Ok(None) => {}
                // A transient database error must not stop sending; the
                // claims have TTL / POLL chances to recover.
                Err(e) => tracing::warn!("worker {}: {e}", self.name),
            }
            if last_beat.elapsed() < heartbeat {
                continue;
            }
            last_beat = Instant::now();
            match self.beat(keep).await {
                Ok(Some(i)) => return Some(i),
                Ok(None) => {}
                Err(e) => tracing::warn!("worker {}: heartbeat: {e}", self.name),
            }
        }
    }

    /// Every heartbeat: renew, re-split the rate, refresh the campaign view.
    async fn beat(&self, keep: &Keep) -> Result<Option<Interruption>> {
        let sent = keep.stats.sent.load(Ordering::Relaxed);
        let secs = keep.stats.started.elapsed().as_secs_f64().max(0.001);
        if !self.heartbeat(sent, sent as f64 / secs).await? {
            return Ok(Some(Interruption::LeaseLost(format!(
                "worker {}: another process took this worker's name (this one was silent \
                 for longer than the TTL); stopping",
                self.name
            ))));
        }
        keep.claims.renew().await?;
        Ok(None)
    }

    /// Every poll: the campaign's state, claims to give back, the rate
    /// share (a worker that joins or leaves re-splits it within a second)
    /// and the campaign-wide progress.
    async fn poll(&self, keep: &Keep) -> Result<Option<Interruption>> {
        let forfeited = keep.claims.holdings().take_forfeited();
        if !forfeited.is_empty() {
            keep.claims.release(&forfeited).await?;
        }
        let (workers, all_sent, all_rate) = self.campaign_view().await?;
        keep.rate.set(share(self.campaign_rate, workers));
        keep.stats.set_campaign(workers, all_sent, all_rate);
        let row = sqlx::query("SELECT state, reason FROM blast_campaigns WHERE id = $1")
            .bind(self.campaign_id)
            .fetch_one(self.db.pool())
            .await?;
        let state: String = row.try_get("state")?;
        let reason: Option<String> = row.try_get("reason")?;
        let reason = reason.unwrap_or_default();
        Ok(match state.parse::<State>() {
            Ok(State::Paused) => Some(Interruption::Paused(reason)),
            Ok(State::Cancelled) => Some(Interruption::Cancelled(reason)),
            _ => None,
        })
    }
}

/// What the keeper looks after besides the worker row.
struct Keep {
    claims: Arc<Claims>,
    stats: Arc<Stats>,
    rate: Arc<Rate>,
}

/// The task keeping a worker alive; [`Keeper::finish`] ends it.
#[derive(Debug)]
pub struct Keeper {
    done: CancellationToken,
    task: JoinHandle<()>,
    why: Arc<Mutex<Option<Interruption>>>,
}

impl Keeper {
    /// Stops keeping the worker; returns why the run was stopped from
    /// outside, if it was.
    pub async fn finish(self) -> Option<Interruption> {
        self.done.cancel();
        if crate::error::joined("the worker's keeper", self.task)
            .await
            .is_err()
        {
            // Without its keeper the claims were not renewed: stop as if lost.
            return Some(Interruption::LeaseLost(
                "the worker's keeper panicked; its claims may have expired".into(),
            ));
        }
        let why = self.why.lock().unwrap_or_else(|p| p.into_inner()).take();
        why
    }
}

/// One worker as `blast status` shows it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct WorkerRow {
    /// Its name.
    pub name: String,
    /// The process (`host/pid/nonce`).
    pub process: String,
    /// Whether it renewed within the TTL.
    pub alive: bool,
    /// Claims it holds now.
    pub claims: i64,
    /// Messages it sent in its current (or last) run.
    pub sent: i64,
    /// Its mean rate over that run, msg/s.
    pub rate: f64,
    /// Seconds since its last heartbeat (by the database's clock).
    pub heartbeat_age: f64,
}

/// The campaign's workers, live ones first.
pub async fn list(db: &Db, campaign_id: i64) -> Result<Vec<WorkerRow>> {
    let now = db.now_ms_sql();
    let rows = sqlx::query(AssertSqlSafe(format!(
        "SELECT w.name, w.process, CAST(w.sent AS BIGINT) AS sent, \
         CAST(w.rate AS DOUBLE PRECISION) AS rate, \
         CAST({now} - w.heartbeat_at AS BIGINT) AS age_ms, \
         CAST(CASE WHEN w.lease_until > {now} THEN 1 ELSE 0 END AS BIGINT) AS alive, \
         (SELECT COUNT(*) FROM blast_claims c WHERE c.campaign_id = w.campaign_id \
            AND c.worker = w.name AND c.done = 0 AND c.lease_until > {now}) AS claims \
         FROM blast_workers w WHERE w.campaign_id = $1 ORDER BY alive DESC, w.name"
    )))
    .bind(campaign_id)
    .fetch_all(db.pool())
    .await?;
    rows.iter()
        .map(|r| {
            let age: i64 = r.try_get("age_ms")?;
            let alive: i64 = r.try_get("alive")?;
            Ok(WorkerRow {
                name: r.try_get("name")?,
                process: r.try_get("process")?,
                alive: alive == 1,
                claims: r.try_get("claims")?,
                sent: r.try_get("sent")?,
                rate: r.try_get("rate")?,
                heartbeat_age: age.max(0) as f64 / 1000.0,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dead_local_processes_are_recognised() {
        // PID 0 never has a /proc entry, our own pid always has.
        let me = format!("{}/{}/1", hostname(), std::process::id());
        assert!(!is_dead_local(&me));
        let dead = format!("{}/{}/1", hostname(), u32::MAX - 7);
        assert!(is_dead_local(&dead));
        assert!(!is_dead_local(&format!("other-host/{}/1", u32::MAX - 7)));
        assert!(!is_dead_local("garbage"));
    }
}
