//! The one-time rewrite of stored addresses to their canonical form
//! ([`crate::address`]) that schema v6 needs and SQL cannot do (SQL knows no
//! IDNA): `subscribers.email_key` is filled in for rows written before v6,
//! and `blast_suppressions.address` is rewritten from the old form (trimmed,
//! lower-cased, Unicode domain) to the canonical one.
//!
//! Runs when a database is opened, in batches, until it has finished once
//! (`blast_settings.address_keys`); an interrupted run starts again and
//! skips what is done. Owns nothing else: the schema is in `schema/`.

use std::collections::HashSet;

use sqlx::{AssertSqlSafe, Row};

use crate::address;
use crate::db::Db;
use crate::error::{Error, Result};

/// One batch of subscribers, in primary-key order after `$1`. The order is
/// by `subscribers.id`: a bare `id` names the CAST in the select list, and
/// SQLite then sorted every row past `$1` for each batch (quadratic: 112 ms
/// per batch at the start of 1,000,000 rows, against 1 ms).
const PAGE: &str = "SELECT CAST(id AS BIGINT) AS id, email, email_key FROM subscribers \
                    WHERE id > $1 ORDER BY subscribers.id LIMIT $2";
/// Rows per batch (one transaction each).
const BATCH: i64 = 1000;
/// How often the backfill logs how far it is.
const PROGRESS_EVERY: std::time::Duration = std::time::Duration::from_secs(10);
/// Duplicates and invalid addresses named one by one in the log, at most.
const NAMED: u64 = 20;

/// Rewrites stored addresses once; a no-op (one query) afterwards.
pub(crate) async fn run(db: &Db) -> Result<()> {
    let done: Option<String> =
        sqlx::query_scalar("SELECT value FROM blast_settings WHERE key = 'address_keys'")
            .fetch_optional(db.pool())
            .await?;
    if done.is_some() {
        return Ok(());
    }
    subscribers(db).await?;
    suppressions(db).await?;
    sqlx::query(
        "INSERT INTO blast_settings (key, value) VALUES ('address_keys', 'done') \
         ON CONFLICT (key) DO NOTHING",
    )
    .execute(db.pool())
    .await?;
    Ok(())
}

/// Fills `email_key` for rows that have none. A row whose address is not
/// valid, or is the same address as an earlier row (the unique index allows
/// one), keeps NULL and is named in the log: import can no longer tell it
/// apart, and the operator should delete the copy.
async fn subscribers(db: &Db) -> Result<()> {
    let (mut after, mut invalid, mut duplicates) = (i64::MIN, 0u64, 0u64);
    let update = format!(
        "UPDATE subscribers SET email_key = u.key FROM {} AS u WHERE subscribers.id = u.id",
        db.json_rows_sql(1, &[("id", "bigint"), ("key", "text")])
    );
    let taken = format!(
        "SELECT s.email_key FROM subscribers s JOIN {} AS u ON s.email_key = u.key",
        db.json_rows_sql(1, &[("key", "text")])
    );
    // Minutes on millions of rows: say so, then every PROGRESS_EVERY, so a
    // first command on a big database is not silent.
    let started = std::time::Instant::now();
    let mut reported = started;
    let mut walked = 0u64;
    let mut announced = false;
    loop {
        if reported.elapsed() >= PROGRESS_EVERY {
            reported = std::time::Instant::now();
            tracing::info!(
                "filling in address keys (schema v6, once): {walked} subscribers done in {} s",
                started.elapsed().as_secs()
            );
        }
        // Walk the primary key and skip keyed rows here: with `email_key IS
        // NULL` in SQL, SQLite read the NULLs through the email_key index and
        // sorted all of them for every batch (quadratic: minutes at 2M rows).
        let rows = sqlx::query(PAGE)
            .bind(after)
            .bind(BATCH)
            .fetch_all(db.pool())
            .await?;
        let Some(last) = rows.last() else { break };
        after = last.try_get("id")?;
        walked += rows.len() as u64;
        let mut keyed: Vec<(i64, String, String)> = Vec::with_capacity(rows.len());
        for r in &rows {
            if r.try_get::<Option<String>, _>("email_key")?.is_some() {
                continue;
            }
            let (id, email): (i64, String) = (r.try_get("id")?, r.try_get("email")?);
            match address::canonical(&email) {
                Ok(key) => keyed.push((id, email, key)),
                Err(why) => {
                    invalid += 1;
                    if invalid <= NAMED {
                        tracing::warn!("subscriber {id}: {email:?} is not an address ({why})");
                    }
                }
            }
        }
        if !keyed.is_empty() && !announced {
            announced = true;
            tracing::info!(
                "filling in address keys (schema v6, once; about 15 s per million \
                 subscribers): a stop is safe, the next command goes on from there"
            );
        }
        let keys: Vec<serde_json::Value> = keyed
            .iter()
            .map(|(_, _, k)| serde_json::json!({ "key": k }))
            .collect();
        let mut tx = db.pool().begin().await?;
        let mut seen: HashSet<String> = sqlx::query_scalar(AssertSqlSafe(taken.as_str()))
            .bind(json(&keys)?)
            .fetch_all(&mut *tx)
            .await?
            .into_iter()
            .collect();
        let mut fill = Vec::with_capacity(keyed.len());
        for (id, email, key) in keyed {
            if seen.insert(key.clone()) {
                fill.push(serde_json::json!({ "id": id, "key": key }));
            } else {
                duplicates += 1;
                if duplicates <= NAMED {
                    tracing::warn!(
                        "subscriber {id}: {email:?} is the same address as an earlier row \
                         ({key}); delete one of them"
                    );
                }
            }
        }
        if !fill.is_empty() {
            sqlx::query(AssertSqlSafe(update.as_str()))
                .bind(json(&fill)?)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
    }
    if invalid + duplicates > 0 {
        tracing::warn!(
            "subscribers: {invalid} invalid addresses and {duplicates} duplicates kept no \
             email_key (see above)"
        );
    }
    Ok(())
}

/// Rewrites suppressed addresses to their canonical form. Where both forms
/// were suppressed, the canonical row (with its reason) stays and the other
/// goes. Rows that are not addresses stay as they are: they match nobody.
async fn suppressions(db: &Db) -> Result<()> {
    let mut after = String::new();
    loop {
        let rows: Vec<String> = sqlx::query_scalar(
            "SELECT address FROM blast_suppressions WHERE address > $1 ORDER BY address LIMIT $2",
        )
        .bind(&after)
        .bind(BATCH)
        .fetch_all(db.pool())
        .await?;
        let Some(last) = rows.last() else { break };
        after = last.clone();
        let moves: Vec<(String, String)> = rows
            .into_iter()
            .filter_map(|a| match address::canonical(&a) {
                Ok(key) if key != a => Some((a, key)),
                _ => None,
            })
            .collect();
        if moves.is_empty() {
            continue;
        }
        let mut tx = db.pool().begin().await?;
        for (old, key) in moves {
            let moved = sqlx::query(
                "UPDATE blast_suppressions SET address = $1 WHERE address = $2 \
                 AND NOT EXISTS (SELECT 1 FROM blast_suppressions WHERE address = $1)",
            )
            .bind(&key)
            .bind(&old)
            .execute(&mut *tx)
            .await?;
            if moved.rows_affected() == 0 {
                sqlx::query("DELETE FROM blast_suppressions WHERE address = $1")
                    .bind(&old)
                    .execute(&mut *tx)
                    .await?;
            }
        }
        tx.commit().await?;
    }
    Ok(())
}

/// Rows as a JSON array for [`Db::json_rows_sql`].
fn json(rows: &[serde_json::Value]) -> Result<String> {
    serde_json::to_string(rows).map_err(|e| Error::Internal(format!("address keys as JSON: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each batch reads its rows from the primary key, without sorting
    /// what is left of the table.
    #[tokio::test]
    async fn a_batch_walks_the_primary_key_without_a_sort() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("t.db").display());
        let db = Db::connect(&url).await.unwrap();
        let plan: Vec<String> = sqlx::query(AssertSqlSafe(format!("EXPLAIN QUERY PLAN {PAGE}")))
            .bind(0i64)
            .bind(BATCH)
            .fetch_all(db.pool())
            .await
            .unwrap()
            .iter()
            .map(|r| r.try_get::<String, _>("detail").unwrap())
            .collect();
        db.close().await;
        assert!(plan.iter().any(|d| d.contains("PRIMARY KEY")), "{plan:?}");
        assert!(!plan.iter().any(|d| d.contains("TEMP B-TREE")), "{plan:?}");
    }
}
