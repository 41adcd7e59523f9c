//! The database side of reconcile: one batch of events → the ledger rows
//! they are about (one query by queue id), the `mta_*` values each row ends
//! the batch with (in memory, in log order), then one UPDATE for the rows
//! that changed and one INSERT for the suppressions, in one transaction.
//! Both backends take the batch as one JSON parameter
//! ([`Db::json_rows_sql`]).

use std::collections::HashMap;

use serde::Serialize;
use sqlx::{AssertSqlSafe, Row};

use super::{Mta, MtaStatus, Pending, Summary};
use crate::address;
use crate::db::Db;
use crate::error::{Error, Result};

/// A ledger row a batch is about.
struct LedgerRow {
    campaign_id: i64,
    recipient_id: i64,
    /// Canonical address; `None` if the stored one is not an address.
    key: Option<String>,
    /// The `mta_*` columns as stored (`None`: never reconciled).
    stored: Option<Mta>,
    /// ... and as this batch leaves them.
    now: Option<Mta>,
    /// The suppression a hard bounce in this batch asks for: (address, reason, queue id).
    suppress: Option<(String, String, String)>,
}

/// One row of the UPDATE's JSON parameter.
#[derive(Serialize)]
struct Update<'a> {
    campaign_id: i64,
    recipient_id: i64,
    status: &'static str,
    dsn: Option<&'a str>,
    reply: Option<&'a str>,
    relay: Option<&'a str>,
    delay: Option<f64>,
    at: Option<&'a str>,
}

/// One row of the suppressions' JSON parameter.
#[derive(Serialize)]
struct Suppression<'a> {
    address: &'a str,
    reason: &'a str,
    source: String,
}

/// Applies `events` to the ledger and counts them into `summary`.
pub(super) async fn apply(db: &Db, events: &[Pending], summary: &mut Summary) -> Result<()> {
    let mut rows = lookup(db, events).await?;
    let mut by_queue_id: HashMap<String, Vec<usize>> = HashMap::new();
    for (i, (qid, _)) in rows.iter().enumerate() {
        by_queue_id.entry(qid.clone()).or_default().push(i);
    }
    for e in events {
        let matched: Vec<usize> = by_queue_id
            .get(e.queue_id())
            .map(|idx| match e {
                Pending::Delivery { key, .. } => idx
                    .iter()
                    .copied()
                    .filter(|&i| rows[i].1.key.as_deref() == Some(key.as_str()))
                    .collect(),
                Pending::Expired { .. } => idx.clone(),
            })
            .unwrap_or_default();
        if matched.is_empty() {
            summary.unrelated += 1;
            continue;
        }
        for i in matched {
            let row = &mut rows[i].1;
            match e {
                Pending::Delivery {
                    mta,
                    hard,
                    key,
                    queue_id,
                } => {
                    count(summary, mta.status);
                    if mta.status.replaces(row.now.as_ref().map(|m| m.status)) {
                        row.now = Some(mta.clone());
                    }
                    if *hard {
                        let status = mta.dsn.as_deref().unwrap_or("-");
                        let reason = crate::classify::reason(
                            mta.reply.as_deref().unwrap_or(""),
                            mta.dsn.as_deref(),
                        );
                        row.suppress = Some((
                            key.clone(),
                            crate::bounce::ingest::hard_bounce_reason(status, reason),
                            queue_id.clone(),
                        ));
                    }
                }
                Pending::Expired { at, .. } => {
                    let old = row.now.as_ref().map(|m| m.status);
                    if MtaStatus::Expired.replaces(old) {
                        count(summary, MtaStatus::Expired);
                        // The last deferral's reason says why it expired.
                        let mut m = row.now.clone().unwrap_or(Mta {
                            status: MtaStatus::Expired,
                            dsn: None,
                            reply: None,
                            relay: None,
                            delay: None,
                            at: None,
                        });
                        m.status = MtaStatus::Expired;
                        m.at = at.clone();
                        row.now = Some(m);
                    }
                }
            }
        }
    }
    write(db, &rows, summary).await
}

/// Counts one matched outcome.
fn count(summary: &mut Summary, status: MtaStatus) {
    match status {
        MtaStatus::Delivered => summary.delivered += 1,
        MtaStatus::Bounced => summary.bounced += 1,
        MtaStatus::Expired => summary.expired += 1,
        MtaStatus::Deferred => summary.deferred += 1,
    }
}

/// The ledger rows of the batch's queue ids, with their queue id.
async fn lookup(db: &Db, events: &[Pending]) -> Result<Vec<(String, LedgerRow)>> {
    let mut ids: Vec<&str> = events.iter().map(Pending::queue_id).collect();
    ids.sort_unstable();
    ids.dedup();
    let ids: Vec<serde_json::Value> = ids
        .iter()
        .map(|q| serde_json::json!({ "queue_id": q }))
        .collect();
    let sql = format!(
        "SELECT d.campaign_id, d.recipient_id, d.email, d.queue_id, d.mta_status, d.mta_dsn, \
         d.mta_reply, d.mta_relay, d.mta_delay_secs, d.mta_at FROM blast_deliveries d \
         WHERE d.queue_id IN (SELECT k.queue_id FROM {} AS k)",
        db.json_rows_sql(1, &[("queue_id", "text")])
    );
    let found = sqlx::query(AssertSqlSafe(sql))
        .bind(to_json(&ids)?)
        .fetch_all(db.pool())
        .await?;
    let mut out = Vec::with_capacity(found.len());
    for r in found {
        let email: String = r.try_get("email")?;
        let status: Option<String> = r.try_get("mta_status")?;
        let stored = match status.as_deref().map(MtaStatus::parse) {
            None => None,
            Some(Some(status)) => Some(Mta {
                status,
                dsn: r.try_get("mta_dsn")?,
                reply: r.try_get("mta_reply")?,
                relay: r.try_get("mta_relay")?,
                delay: r.try_get("mta_delay_secs")?,
                at: r.try_get("mta_at")?,
            }),
            // Written by something else: the log's word replaces it.
            Some(None) => None,
        };
        out.push((
            r.try_get("queue_id")?,
            LedgerRow {
                campaign_id: r.try_get("campaign_id")?,
                recipient_id: r.try_get("recipient_id")?,
                key: address::canonical(&email).ok(),
                now: stored.clone(),
                stored,
                suppress: None,
            },
        ));
    }
    Ok(out)
}

/// Stores the rows whose `mta_*` values changed and the suppressions, in
/// one transaction.
async fn write(db: &Db, rows: &[(String, LedgerRow)], summary: &mut Summary) -> Result<()> {
    let updates: Vec<Update<'_>> = rows
        .iter()
        .filter(|(_, r)| r.now != r.stored)
        .filter_map(|(_, r)| {
            let m = r.now.as_ref()?;
            Some(Update {
                campaign_id: r.campaign_id,
                recipient_id: r.recipient_id,
                status: m.status.as_str(),
                dsn: m.dsn.as_deref(),
                reply: m.reply.as_deref(),
                relay: m.relay.as_deref(),
                delay: m.delay,
                at: m.at.as_deref(),
            })
        })
        .collect();
    let suppressions: Vec<Suppression<'_>> = rows
        .iter()
        .filter_map(|(_, r)| r.suppress.as_ref())
        .map(|(address, reason, queue_id)| Suppression {
            address,
            reason,
            source: format!("maillog:{queue_id}"),
        })
        .collect();
    if updates.is_empty() && suppressions.is_empty() {
        return Ok(());
    }
    let mut tx = db.pool().begin().await?;
    if !updates.is_empty() {
        let sql = format!(
            "UPDATE blast_deliveries SET mta_status = u.status, mta_dsn = u.dsn, \
             mta_reply = u.reply, mta_relay = u.relay, mta_delay_secs = u.delay, mta_at = u.at \
             FROM {} AS u \
             WHERE blast_deliveries.campaign_id = u.campaign_id \
             AND blast_deliveries.recipient_id = u.recipient_id",
            db.json_rows_sql(
                1,
                &[
                    ("campaign_id", "bigint"),
                    ("recipient_id", "bigint"),
                    ("status", "text"),
                    ("dsn", "text"),
                    ("reply", "text"),
                    ("relay", "text"),
                    ("delay", "double precision"),
                    ("at", "text"),
                ],
            )
        );
        summary.updated += sqlx::query(AssertSqlSafe(sql))
            .bind(to_json(&updates)?)
            .execute(&mut *tx)
            .await?
            .rows_affected();
    }
    if !suppressions.is_empty() {
        let sql = format!(
            "INSERT INTO blast_suppressions (address, reason, source, created_at) \
             SELECT s.address, s.reason, s.source, $2 FROM {} AS s WHERE true \
             ON CONFLICT (address) DO NOTHING",
            db.json_rows_sql(
                1,
                &[("address", "text"), ("reason", "text"), ("source", "text")]
            )
        );
        summary.suppressed += sqlx::query(AssertSqlSafe(sql))
            .bind(to_json(&suppressions)?)
            .bind(crate::clock::db_timestamp(crate::clock::now()))
            .execute(&mut *tx)
            .await?
            .rows_affected();
    }
    tx.commit().await?;
    Ok(())
}

/// Rows as a JSON array for a JSON-rows parameter.
fn to_json<T: Serialize>(rows: &[T]) -> Result<String> {
    serde_json::to_string(rows).map_err(|e| Error::Internal(format!("reconcile rows as JSON: {e}")))
}
