//! Claims in the database: ranges of recipient ids handed to workers from
//! `blast_claims`. A grant takes a new fencing token from the campaign row
//! (`fence`, which only grows), then either takes over a range whose
//! holder stopped renewing it (`FOR UPDATE SKIP LOCKED` on PostgreSQL) or
//! cuts the next range off the keyset at the campaign's cursor
//! (`claimed_to`). Every time compared is the database's clock.
//!
//! [`ClaimSource`] pages through the ranges this worker holds; inside a
//! range, resumption is the ledger's: the page query skips recipients
//! with a final outcome.

use std::sync::Arc;
use std::time::{Duration, Instant};

use sqlx::{AssertSqlSafe, Row};

use super::holdings::{Claim, Holdings};
use crate::campaign::Stats;
use crate::config::Audience;
use crate::db::{Backend, Db};
use crate::error::Result;
use crate::model::Recipient;
use crate::source::{self, Source, SqlSource};

/// Smallest claim when sized by rate (also the first claim's size).
pub const MIN_CLAIM: u64 = 1_000;
/// Largest claim when sized by rate.
pub const MAX_CLAIM: u64 = 1_000_000;

/// What [`Claims::next`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// A range to send, now held.
    Range(Claim),
    /// Nothing free, but other workers hold unfinished ranges: ask again
    /// later (one of them may die).
    Wait,
    /// Every range is granted and every other one done.
    Done,
    /// The campaign is not running (paused, cancelled, finished).
    Stopped,
}

/// This worker's access to the campaign's claims.
#[derive(Debug)]
pub struct Claims {
    db: Db,
    audience: Audience,
    campaign_id: i64,
    worker: String,
    ttl: Duration,
    holdings: Arc<Holdings>,
}

impl Claims {
    /// Claims of `campaign_id` for worker `worker`, leased for `ttl`.
    pub fn new(
        db: Db,
        audience: Audience,
        campaign_id: i64,
        worker: &str,
        ttl: Duration,
    ) -> Claims {
        Claims {
            db,
            audience,
            campaign_id,
            worker: worker.to_string(),
            ttl,
            holdings: Arc::new(Holdings::new(ttl)),
        }
    }

    /// What this worker holds.
    pub fn holdings(&self) -> &Arc<Holdings> {
        &self.holdings
    }

    fn ttl_ms(&self) -> i64 {
        self.ttl.as_millis() as i64
    }

    /// Grants this worker its next range of about `size` recipients: a
    /// range another worker stopped renewing first, else the next new one.
    pub async fn next(&self, size: u64) -> Result<Next> {
        let asked = Instant::now();
        let mut tx = self.db.pool().begin().await?;
        // The new token; the campaign row stays locked to the commit, so
        // grants happen one at a time.
        let row = sqlx::query(
            "UPDATE blast_campaigns SET fence = fence + 1 WHERE id = $1 AND state = 'running' \
             RETURNING fence, claimed_to, max_recipient_id",
        )
        .bind(self.campaign_id)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = row else {
            return Ok(Next::Stopped);
        };
        let token: i64 = row.try_get("fence")?;
        let claimed_to: Option<i64> = row.try_get("claimed_to")?;
        let max: i64 = row.try_get("max_recipient_id")?;
        let after = claimed_to.unwrap_or(i64::MIN);
        let claim = match self.take_orphan(&mut tx, token).await? {
            Some(claim) => claim,
            None if after < max => self.grant_new(&mut tx, token, after, max, size).await?,
            None => {
                // Nothing to grant (the token is rolled back with the rest).
                let others: i64 = sqlx::query_scalar(
                    "SELECT COUNT(*) FROM blast_claims WHERE campaign_id = $1 AND done = 0 \
                     AND (worker IS NULL OR worker <> $2)",
                )
                .bind(self.campaign_id)
                .bind(&self.worker)
                .fetch_one(&mut *tx)
                .await?;
                return Ok(if others > 0 { Next::Wait } else { Next::Done });
            }
        };
        tx.commit().await?;
        self.holdings.add(claim, asked);
        Ok(Next::Range(claim))
    }

    /// Takes over the first range whose holder stopped renewing it (or gave
    /// it back), under `token`.
    async fn take_orphan(
        &self,
        tx: &mut sqlx::Transaction<'_, sqlx::Any>,
        token: i64,
    ) -> Result<Option<Claim>> {
        let now = self.db.now_ms_sql();
        let skip_locked = match self.db.backend() {
            Backend::Postgres => " FOR UPDATE SKIP LOCKED",
            Backend::Sqlite => "",
        };
        let orphan = sqlx::query(AssertSqlSafe(format!(
            "UPDATE blast_claims SET worker = $1, token = $2, lease_until = {now} + $3 \
             WHERE campaign_id = $4 AND first_id = (SELECT first_id FROM blast_claims \
               WHERE campaign_id = $4 AND done = 0 AND lease_until < {now} \
               ORDER BY first_id LIMIT 1{skip_locked}) \
             RETURNING first_id, last_id"
        )))
        .bind(&self.worker)
        .bind(token)
        .bind(self.ttl_ms())
        .bind(self.campaign_id)
        .fetch_optional(&mut **tx)
        .await?;
        let Some(r) = orphan else {
            return Ok(None);
        };
        let claim = Claim {
            first: r.try_get("first_id")?,
            last: r.try_get("last_id")?,
            token,
        };
        tracing::info!(
            "worker {}: took over ids {}..={} (token {token}) from a worker that stopped renewing them",
            self.worker,
            claim.first,
            claim.last
        );
        Ok(Some(claim))
    }

    /// A new range after `after` (up to `max`), of about `size` recipients
    /// and at most a guided share of what is left, under `token`.
    async fn grant_new(
        &self,
        tx: &mut sqlx::Transaction<'_, sqlx::Any>,
        token: i64,
        after: i64,
        max: i64,
        size: u64,
    ) -> Result<Claim> {
        let now = self.db.now_ms_sql();
        let live: i64 = sqlx::query_scalar(AssertSqlSafe(format!(
            "SELECT COUNT(*) FROM blast_workers WHERE campaign_id = $1 AND lease_until > {now}"
        )))
        .bind(self.campaign_id)
        .fetch_one(&mut **tx)
        .await?;
        let last = match source::nth_id(&self.db, &self.audience, after, max, 1).await? {
            Some(first) => source::nth_id(&self.db, &self.audience, after, max, size)
                .await?
                .unwrap_or(max)
                .min(guided_end(first, max, live)),
            None => max,
        };
        let claim = Claim {
            first: after + 1,
            last,
            token,
        };
        sqlx::query(AssertSqlSafe(format!(
            "INSERT INTO blast_claims (campaign_id, first_id, last_id, worker, token, lease_until, done) \
             VALUES ($1, $2, $3, $4, $5, {now} + $6, 0)"
        )))
        .bind(self.campaign_id)
        .bind(claim.first)
        .bind(claim.last)
        .bind(&self.worker)
        .bind(token)
        .bind(self.ttl_ms())
        .execute(&mut **tx)
        .await?;
        sqlx::query("UPDATE blast_campaigns SET claimed_to = $1 WHERE id = $2")
            .bind(last)
            .bind(self.campaign_id)
            .execute(&mut **tx)
            .await?;
        Ok(claim)
    }

    /// Renews this worker's live claims; the ones another worker took
    /// meanwhile are marked lost (and logged).
    pub async fn renew(&self) -> Result<()> {
        let now = self.db.now_ms_sql();
        let sql = format!(
            "UPDATE blast_claims SET lease_until = {now} + $1 \
             WHERE campaign_id = $2 AND first_id = $3 AND token = $4 AND done = 0"
        );
        for claim in self.holdings.live() {
            let asked = Instant::now();
            let n = sqlx::query(AssertSqlSafe(sql.as_str()))
                .bind(self.ttl_ms())
                .bind(self.campaign_id)
                .bind(claim.first)
                .bind(claim.token)
                .execute(self.db.pool())
                .await?
                .rows_affected();
            if n == 1 {
                self.holdings.renewed(claim, asked);
                continue;
            }
            // Done meanwhile (by the ledger) is not a loss.
            if self.holdings.is_live(claim) {
                tracing::warn!(
                    "worker {}: ids {}..={} (token {}) were taken over by another worker; \
                     sending nothing more from them",
                    self.worker,
                    claim.first,
                    claim.last,
                    claim.token
                );
                self.holdings.lost(claim);
            }
        }
        Ok(())
    }

    /// Gives claims back to the pool at once (a forfeited claim, or all
    /// live ones when this worker stops early).
    pub async fn release(&self, claims: &[Claim]) -> Result<()> {
        for c in claims {
            sqlx::query(
                "UPDATE blast_claims SET lease_until = 0 \
                 WHERE campaign_id = $1 AND first_id = $2 AND token = $3 AND done = 0",
            )
            .bind(self.campaign_id)
            .bind(c.first)
            .bind(c.token)
            .execute(self.db.pool())
            .await?;
            self.holdings.lost(*c);
        }
        Ok(())
    }

    /// Marks a claim with nothing left in it done.
    pub async fn complete(&self, claim: Claim) -> Result<()> {
        let mut conn = self.db.pool().acquire().await?;
        complete(&mut conn, self.campaign_id, &[claim]).await
    }
}

/// Marks `claims` done, each only under its own token (a claim that
/// changed hands stays the new holder's): `done = 2` when nobody in its
/// range is left to retry (every ledger row final), else 1. A new pass
/// skips the prefix of the id range that passes finished with `done = 2`.
pub async fn complete(
    conn: &mut sqlx::AnyConnection,
    campaign_id: i64,
    claims: &[Claim],
) -> Result<()> {
    for c in claims {
        sqlx::query(
            "UPDATE blast_claims SET done = CASE WHEN EXISTS (SELECT 1 FROM blast_deliveries d \
               WHERE d.campaign_id = $1 AND d.status IN ('deferred', 'queued', 'sending') \
               AND d.recipient_id BETWEEN $2 AND $4) THEN 1 ELSE 2 END \
             WHERE campaign_id = $1 AND first_id = $2 AND token = $3",
        )
        .bind(campaign_id)
        .bind(c.first)
        .bind(c.token)
        .bind(c.last)
        .execute(&mut *conn)
        .await?;
    }
    Ok(())
}

/// The last id of a claim starting at id `first` when `live` workers share
/// what is left up to `max`: at most half of a fair share of the id range
/// (guided self-scheduling), so the last claims get small and the workers
/// finish together instead of one sending a large last claim alone; never
/// under [`MIN_CLAIM`] / 10 ids.
fn guided_end(first: i64, max: i64, live: i64) -> i64 {
    let span = max.saturating_sub(first).max(0);
    let share = span / (2 * live.max(1));
    first.saturating_add(share.max(MIN_CLAIM as i64 / 10 - 1))
}

/// The end of the id prefix whose every recipient is final, after the last
/// pass: `final_to` so far, extended by that pass's claims completed with
/// nothing to retry (`done = 2`) that follow it without a gap. Called as
/// a new pass starts, in its transaction, before the claims are cleared.
pub async fn final_prefix(conn: &mut sqlx::AnyConnection, campaign_id: i64) -> Result<Option<i64>> {
    let row = sqlx::query("SELECT final_to, claimed_to FROM blast_campaigns WHERE id = $1")
        .bind(campaign_id)
        .fetch_one(&mut *conn)
        .await?;
    let mut end: Option<i64> = row.try_get("final_to")?;
    let rows = sqlx::query(
        "SELECT first_id, last_id, done FROM blast_claims WHERE campaign_id = $1 ORDER BY first_id",
    )
    .bind(campaign_id)
    .fetch_all(&mut *conn)
    .await?;
    for r in rows {
        let (first, last, done): (i64, i64, i32) = (
            r.try_get("first_id")?,
            r.try_get("last_id")?,
            r.try_get("done")?,
        );
        let next = end.map_or(i64::MIN + 1, |e| e.saturating_add(1));
        if first != next || done != 2 {
            break;
        }
        end = Some(last);
    }
    Ok(end)
}

/// Whether every recipient of the campaign's pass is in a claim marked done.
pub async fn all_done(db: &Db, campaign_id: i64) -> Result<bool> {
    let open: i64 =
        sqlx::query_scalar("SELECT COUNT(*) FROM blast_claims WHERE campaign_id = $1 AND done = 0")
            .bind(campaign_id)
            .fetch_one(db.pool())
            .await?;
    let row = sqlx::query("SELECT claimed_to, max_recipient_id FROM blast_campaigns WHERE id = $1")
        .bind(campaign_id)
        .fetch_one(db.pool())
        .await?;
    let claimed_to: Option<i64> = row.try_get("claimed_to")?;
    let max: i64 = row.try_get("max_recipient_id")?;
    Ok(open == 0 && claimed_to.is_some_and(|c| c >= max))
}

/// The audience as this worker's claims cut it: pages of one claimed range
/// after another, until the campaign has no range left for it.
#[derive(Debug)]
pub struct ClaimSource {
    inner: SqlSource,
    claims: Arc<Claims>,
    current: Option<Claim>,
    /// Fixed claim size, or None to size by rate.
    fixed: Option<u64>,
    claim_time: Duration,
    /// When the first claim was granted, and the run's outcomes then.
    started: Option<(Instant, u64)>,
    last_size: u64,
    stats: Arc<Stats>,
    poll: Duration,
}

impl ClaimSource {
    /// Pages `inner` (whose range is set per claim) through `claims`;
    /// `stats` are the run's counters, whose outcomes size the claims.
    pub fn new(
        inner: SqlSource,
        claims: Arc<Claims>,
        stats: Arc<Stats>,
        fixed: Option<u64>,
        claim_time: Duration,
        poll: Duration,
    ) -> ClaimSource {
        ClaimSource {
            inner,
            claims,
            current: None,
            fixed,
            claim_time,
            started: None,
            last_size: MIN_CLAIM,
            stats,
            poll,
        }
    }

    /// The next claim's size: fixed, or `claim_time` at the rate this
    /// worker has answered recipients since its first claim (counted over
    /// at least a second), growing at most twofold per claim. Counting
    /// recipients handed to the pipeline instead would take the first
    /// burst that fills the render queue for the rate, and the first
    /// worker would claim the whole audience.
    fn size(&mut self) -> u64 {
        if let Some(n) = self.fixed {
            return n;
        }
        let Some((started, at_start)) = self.started else {
            return MIN_CLAIM;
        };
        let secs = started.elapsed().as_secs_f64().max(1.0);
        let rate = self.stats.answered().saturating_sub(at_start) as f64 / secs;
        let size = ((rate * self.claim_time.as_secs_f64()) as u64)
            .clamp(MIN_CLAIM, MAX_CLAIM)
            .min(self.last_size.saturating_mul(2));
        self.last_size = size;
        size
    }

    async fn page(&mut self) -> Result<Vec<Recipient>> {
        loop {
            if let Some(c) = self.current {
                if self.claims.holdings.is_live(c) {
                    let mut page = self.inner.next_page().await?;
                    if !page.is_empty() {
                        self.claims.holdings.yielded(c, page.len());
                        // Each recipient carries its grant: if this range
                        // is forfeited and taken back under a new token,
                        // messages of the old grant still queued are not
                        // sent and their records not counted to the new one.
                        for r in &mut page {
                            r.claim_token = Some(c.token);
                        }
                        return Ok(page);
                    }
                    if self.inner.limit_reached() {
                        return Ok(page);
                    }
                    if let Some(done) = self.claims.holdings.exhausted(c) {
                        self.claims.complete(done).await?;
                    }
                }
                self.current = None;
            }
            if self.inner.limit_reached() {
                return Ok(Vec::new());
            }
            let size = self.size();
            match self.claims.next(size).await? {
                Next::Range(c) => {
                    let answered = self.stats.answered();
                    self.started
                        .get_or_insert_with(|| (Instant::now(), answered));
                    self.inner.set_range(c.first - 1, c.last);
                    self.current = Some(c);
                }
                Next::Wait => tokio::time::sleep(self.poll).await,
                Next::Done | Next::Stopped => return Ok(Vec::new()),
            }
        }
    }
}

impl Source for ClaimSource {
    fn next_page(&mut self) -> impl std::future::Future<Output = Result<Vec<Recipient>>> + Send {
        self.page()
    }
}

#[cfg(test)]
mod tests {
    use super::guided_end;

    #[test]
    fn claims_shrink_as_the_audience_runs_out() {
        // 3 workers, 30,000 ids left: at most 5,000 per claim.
        assert_eq!(guided_end(1, 30_001, 3), 5_001);
        // Near the end, never under 100 ids.
        assert_eq!(guided_end(29_950, 30_000, 3), 30_049);
        assert_eq!(guided_end(1, 30_001, 0), 15_001);
        assert_eq!(guided_end(i64::MAX - 5, i64::MAX, 1), i64::MAX);
    }
}
