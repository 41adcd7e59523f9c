//! The suppression list: addresses that get nothing more (hard bounces,
//! complaints, unsubscribes, operator entries), one row per address in
//! `blast_suppressions` (address, reason, source, time), the address in its
//! canonical form ([`address::canonical`]): whatever form an address is
//! suppressed or looked up in, `A@BÜCHER.example` or `a@xn--bcher-kva.example`,
//! it is one row. Anything blast can send to, it can suppress: both go by the
//! one rule in [`crate::address`].
//!
//! Senders consult it twice: the audience query skips suppressed addresses
//! page by page, and a running campaign watches for addresses suppressed
//! after it started ([`Live`], refreshed every [`WATCH_INTERVAL`]) so that an
//! unsubscribe takes effect while a long campaign is still sending. This
//! module never sends mail and never parses bounces.

use std::collections::HashMap;
use std::io::BufRead;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use sqlx::Row;
use tokio_util::sync::CancellationToken;

use crate::address;
use crate::clock;
use crate::db::Db;
use crate::error::{Error, Result};

/// How often a running campaign looks for new suppressions.
pub const WATCH_INTERVAL: Duration = Duration::from_millis(500);
/// At most this many mid-campaign suppressions are held in memory; past it
/// (a bulk import during a send) the rest are honoured by the audience query
/// page by page, so memory stays bounded.
pub const LIVE_MAX: usize = 100_000;
/// Rows per INSERT when importing.
const IMPORT_BATCH: usize = 500;

/// One suppression-list row.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Entry {
    /// The address, canonical form.
    pub address: String,
    /// Why: `unsubscribe`, `hard bounce: 5.1.1 ...`, `complaint: abuse`, ...
    pub reason: String,
    /// Where it came from: `operator`, `https`, `mailto`, `bounce:<message>`, `import:<file>`.
    pub source: String,
    /// When (RFC 3339 UTC).
    pub created_at: String,
}

/// Suppresses `address`. Returns false if it already was (the first reason
/// is kept: it says why the address first stopped getting mail).
/// Fails with [`Error::Invalid`] when `address` is not an address.
pub async fn add(db: &Db, address: &str, reason: &str, source: &str) -> Result<bool> {
    let address = address::canonical(address).map_err(|why| {
        Error::Invalid(format!(
            "{:?} is not an email address: {why}",
            address.trim()
        ))
    })?;
    let done = sqlx::query(
        "INSERT INTO blast_suppressions (address, reason, source, created_at) \
         VALUES ($1, $2, $3, $4) ON CONFLICT (address) DO NOTHING",
    )
    .bind(&address)
    .bind(reason)
    .bind(source)
    .bind(clock::db_timestamp(clock::now()))
    .execute(db.pool())
    .await?;
    Ok(done.rows_affected() > 0)
}

/// Lifts the suppression of `address`. Returns false if it was not suppressed.
/// A row that is not an address (written before the rule) is removed by its
/// text as stored.
pub async fn remove(db: &Db, address: &str) -> Result<bool> {
    let key = address::canonical(address).unwrap_or_else(|_| address.trim().to_string());
    let done = sqlx::query("DELETE FROM blast_suppressions WHERE address = $1")
        .bind(key)
        .execute(db.pool())
        .await?;
    Ok(done.rows_affected() > 0)
}

/// The reason `address` is suppressed, if it is.
pub async fn reason(db: &Db, address: &str) -> Result<Option<String>> {
    let Ok(key) = address::canonical(address) else {
        return Ok(None);
    };
    Ok(
        sqlx::query_scalar("SELECT reason FROM blast_suppressions WHERE address = $1")
            .bind(key)
            .fetch_optional(db.pool())
            .await?,
    )
}

/// The reasons the addresses with canonical forms `keys` are suppressed, as
/// (key, reason) pairs, in one query: what the audience checks each page
/// against.
pub async fn reasons(db: &Db, keys: &[String]) -> Result<Vec<(String, String)>> {
    if keys.is_empty() {
        return Ok(Vec::new());
    }
    let sql = format!(
        "SELECT s.address, s.reason FROM blast_suppressions s \
         WHERE s.address IN (SELECT k.key FROM {} AS k)",
        db.json_rows_sql(1, &[("key", "text")])
    );
    let keys: Vec<serde_json::Value> = keys
        .iter()
        .map(|k| serde_json::json!({ "key": k }))
        .collect();
    let keys = serde_json::to_string(&keys)
        .map_err(|e| Error::Internal(format!("suppression keys as JSON: {e}")))?;
    let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(keys)
        .fetch_all(db.pool())
        .await?;
    rows.iter()
        .map(|r| Ok((r.try_get("address")?, r.try_get("reason")?)))
        .collect()
}

/// Suppressions in address order, optionally only those whose reason or
/// source starts with `filter`, at most `limit`.
pub async fn list(db: &Db, filter: Option<&str>, limit: Option<u64>) -> Result<Vec<Entry>> {
    let pattern = format!("{}%", filter.unwrap_or("").replace(['%', '_'], ""));
    let limit = limit.map_or(i64::MAX, |l| l.min(i64::MAX as u64) as i64);
    let rows = sqlx::query(
        "SELECT address, reason, source, created_at FROM blast_suppressions \
         WHERE reason LIKE $1 OR source LIKE $1 ORDER BY address LIMIT $2",
    )
    .bind(pattern)
    .bind(limit)
    .fetch_all(db.pool())
    .await?;
    rows.iter()
        .map(|r| {
            Ok(Entry {
                address: r.try_get("address")?,
                reason: r.try_get("reason")?,
                source: r.try_get("source")?,
                created_at: r.try_get("created_at")?,
            })
        })
        .collect()
}

/// What [`import`] did.
#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ImportSummary {
    /// Addresses newly suppressed.
    pub added: u64,
    /// Addresses that were already suppressed.
    pub already: u64,
    /// Lines that are not addresses, as "line N: why".
    pub invalid: Vec<String>,
}

/// One address per line (a CSV's first column also works: anything after
/// the first `,`, `;` or tab is ignored). Blank lines, `#` comments and a
/// header line (`email`/`address`) are skipped; bad lines are reported by
/// number and the rest is imported.
pub async fn import(
    db: &Db,
    input: impl BufRead,
    reason: &str,
    source: &str,
) -> Result<ImportSummary> {
    let mut summary = ImportSummary::default();
    let mut batch: Vec<String> = Vec::with_capacity(IMPORT_BATCH);
    for (n, line) in input.lines().enumerate() {
        let line = line.map_err(|e| Error::Invalid(format!("line {}: {e}", n + 1)))?;
        let first = line.split([',', ';', '\t']).next().unwrap_or("");
        let first = first.trim().trim_matches('"').trim();
        if first.is_empty() || first.starts_with('#') {
            continue;
        }
        if n == 0 && (first.eq_ignore_ascii_case("email") || first.eq_ignore_ascii_case("address"))
        {
            continue;
        }
        match address::canonical(first) {
            Ok(key) => batch.push(key),
            Err(why) => summary.invalid.push(format!(
                "line {}: {first:?} is not an email address: {why}",
                n + 1
            )),
        }
        if batch.len() == IMPORT_BATCH {
            insert_batch(db, &mut batch, reason, source, &mut summary).await?;
        }
    }
    insert_batch(db, &mut batch, reason, source, &mut summary).await?;
    Ok(summary)
}

async fn insert_batch(
    db: &Db,
    batch: &mut Vec<String>,
    reason: &str,
    source: &str,
    summary: &mut ImportSummary,
) -> Result<()> {
    batch.sort();
    batch.dedup();
    if batch.is_empty() {
        return Ok(());
    }
    let stamp = clock::db_timestamp(clock::now());
    let mut q = sqlx::QueryBuilder::<sqlx::Any>::new(
        "INSERT INTO blast_suppressions (address, reason, source, created_at) ",
    );
    q.push_values(batch.iter(), |mut b, a| {
        b.push_bind(a.clone())
            .push_bind(reason.to_string())
            .push_bind(source.to_string())
            .push_bind(stamp.clone());
    });
    q.push(" ON CONFLICT (address) DO NOTHING");
    let added = q.build().execute(db.pool()).await?.rows_affected();
    summary.added += added;
    summary.already += batch.len() as u64 - added;
    batch.clear();
    Ok(())
}

/// Addresses suppressed while a campaign runs, shared by its injectors.
/// Cheap to clone; `get` is a read lock on a usually empty map.
#[derive(Debug, Clone, Default)]
pub struct Live {
    inner: Arc<RwLock<HashMap<String, String>>>,
}

impl Live {
    /// The reason `address` was suppressed since the watch started, if it was.
    pub fn get(&self, address: &str) -> Option<String> {
        let map = self.inner.read().unwrap_or_else(|e| e.into_inner());
        if map.is_empty() {
            return None;
        }
        map.get(&address::canonical(address).ok()?).cloned()
    }

    /// Records a suppression (the watch does this; tests may too). A row
    /// that is not an address matches nobody and is left out.
    pub fn insert(&self, address: &str, reason: &str) {
        let Ok(key) = address::canonical(address) else {
            return;
        };
        let mut map = self.inner.write().unwrap_or_else(|e| e.into_inner());
        map.insert(key, reason.to_string());
    }

    /// How many addresses were suppressed since the watch started.
    pub fn len(&self) -> usize {
        self.inner.read().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// True when nothing was suppressed since the watch started.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Polls `blast_suppressions` for rows created from `since` on and adds them
/// to `live`, until `stop`. `since` should lie a little before the campaign
/// started: hosts' clocks differ, and seeing a row twice is harmless.
pub async fn watch(db: Db, live: Live, since: time::OffsetDateTime, stop: CancellationToken) {
    let mut since = clock::db_timestamp(since);
    let mut full = false;
    let mut tick = tokio::time::interval(WATCH_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            biased;
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let rows = sqlx::query(
            "SELECT address, reason, created_at FROM blast_suppressions \
             WHERE created_at >= $1 ORDER BY created_at",
        )
        .bind(&since)
        .fetch_all(db.pool())
        .await;
        match rows {
            Ok(rows) => {
                for r in rows {
                    if live.len() >= LIVE_MAX {
                        if !full {
                            full = true;
                            tracing::warn!(
                                "over {LIVE_MAX} addresses suppressed since this run started; \
                                 further ones take effect from the next page of recipients"
                            );
                        }
                        break;
                    }
                    let (a, why, at) = match (
                        r.try_get::<String, _>("address"),
                        r.try_get::<String, _>("reason"),
                        r.try_get::<String, _>("created_at"),
                    ) {
                        (Ok(a), Ok(why), Ok(at)) => (a, why, at),
                        // Never skipped in silence: the page lookup still
                        // guards the send, but the operator must know.
                        (a, why, at) => {
                            tracing::error!(
                                "suppression watch: a row of blast_suppressions does not \
                                 decode (address {a:?}, reason {why:?}, created_at {at:?})"
                            );
                            continue;
                        }
                    };
                    live.insert(&a, &why);
                    if at > since {
                        since = at;
                    }
                }
            }
            // The page query still skips suppressed addresses; keep trying.
            Err(e) => tracing::warn!("suppression watch: {e}"),
        }
    }
}
