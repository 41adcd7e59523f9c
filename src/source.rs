//! The audience: streams recipient rows in id order by keyset pagination
//! (`id > last AND id <= max_id ORDER BY id LIMIT batch`), skipping recipients
//! that already have a final outcome in the ledger, and marks suppressed
//! recipients. Read-only SQL; knows nothing of templates or SMTP. Memory is
//! one page, whatever the audience size.
//!
//! Suppression is checked in Rust, page by page: each recipient's address
//! is put in canonical form ([`crate::address`]) and the page's keys are
//! looked up in `blast_suppressions` in one query. SQL cannot compute the
//! canonical form (SQLite's `lower()` folds ASCII only, neither trims nor
//! knows IDNA), and an operator's audience query has no key column.

use std::future::Future;

use serde_json::{Map, Value};
use sqlx::any::AnyRow;
use sqlx::{AssertSqlSafe, Column, Row, TypeInfo, ValueRef};

use crate::config::Audience;
use crate::db::{Backend, Db};
use crate::error::{Error, Result};
use crate::model::{Recipient, FINAL_STATUSES_SQL};

/// Something that yields recipients page by page; an empty page means done.
pub trait Source: Send + 'static {
    /// The next page, in ascending id order.
    fn next_page(&mut self) -> impl Future<Output = Result<Vec<Recipient>>> + Send;
}

/// An audience in memory, served in pages, for tests and benchmarks.
#[derive(Debug, Clone)]
pub struct VecSource {
    rows: std::collections::VecDeque<Recipient>,
    page: usize,
    pace: std::time::Duration,
}

impl VecSource {
    /// `rows` in pages of `page` (at least 1).
    pub fn new(rows: Vec<Recipient>, page: usize) -> VecSource {
        VecSource {
            rows: rows.into(),
            page: page.max(1),
            pace: std::time::Duration::ZERO,
        }
    }

    /// Recipients `1..=n` at `user{i}@example.com`, with no variables.
    pub fn numbered(n: i64, page: usize) -> VecSource {
        let rows = (1..=n)
            .map(|i| Recipient::new(i, format!("user{i}@example.com"), Map::new()))
            .collect();
        VecSource::new(rows, page)
    }

    /// Each page takes `pace` to fetch (tokio time), like a slow database.
    pub fn paced(mut self, pace: std::time::Duration) -> VecSource {
        self.pace = pace;
        self
    }
}

impl Source for VecSource {
    async fn next_page(&mut self) -> Result<Vec<Recipient>> {
        if !self.pace.is_zero() {
            tokio::time::sleep(self.pace).await;
        }
        let n = self.page.min(self.rows.len());
        Ok(self.rows.drain(..n).collect())
    }
}

/// Reads the audience from SQL.
#[derive(Debug)]
pub struct SqlSource {
    db: Db,
    audience: Audience,
    page_sql: String,
    campaign_id: i64,
    last_id: i64,
    max_id: i64,
    batch: i64,
    remaining: Option<u64>,
}

impl SqlSource {
    /// A source for `audience`, limited to ids `<= max_id` (fixed when the
    /// campaign first started) and to recipients without a final outcome in
    /// campaign `campaign_id`. `limit` caps how many are yielded.
    pub fn new(
        db: Db,
        audience: &Audience,
        campaign_id: i64,
        max_id: i64,
        batch: usize,
        limit: Option<u64>,
    ) -> SqlSource {
        let page_sql = page_sql(db.backend(), audience, false);
        SqlSource {
            db,
            audience: audience.clone(),
            page_sql,
            campaign_id,
            last_id: i64::MIN,
            max_id,
            batch: batch as i64,
            remaining: limit,
        }
    }

    async fn fetch(&mut self) -> Result<Vec<Recipient>> {
        let mut limit = self.batch;
        if let Some(r) = self.remaining {
            limit = limit.min(r as i64);
        }
        if limit <= 0 || self.last_id >= self.max_id {
            return Ok(Vec::new());
        }
        let rows = sqlx::query(AssertSqlSafe(self.page_sql.as_str()))
            .bind(self.last_id)
            .bind(self.max_id)
            .bind(self.campaign_id)
            .bind(limit)
            .bind(crate::clock::db_timestamp(crate::clock::now()))
            .fetch_all(self.db.pool())
            .await
            .map_err(audience_error)?;
        let mut page = rows
            .iter()
            .map(|r| decode(self.db.backend(), r))
            .collect::<Result<Vec<_>>>()?;
        // An audience query that JOINs can return an id twice: one message
        // per recipient id. The page is in id order, so copies are adjacent;
        // copies in later pages are past `last_id`.
        page.dedup_by_key(|r| r.id);
        mark_suppressed(&self.db, &mut page).await?;
        if let Some(last) = page.last() {
            self.last_id = last.id;
        }
        if let Some(r) = &mut self.remaining {
            *r -= page.len() as u64;
        }
        Ok(page)
    }
}

impl SqlSource {
    /// Pages through ids `after < id <= upto` next (a claim's range),
    /// within the campaign's fixed audience.
    pub fn set_range(&mut self, after: i64, upto: i64) {
        self.last_id = after;
        self.max_id = upto;
    }

    /// Whether `limit` recipients were yielded already.
    pub fn limit_reached(&self) -> bool {
        self.remaining == Some(0)
    }

    /// Only deferred recipients whose next attempt is due (`blast retry`).
    pub fn retries_only(mut self, only: bool) -> SqlSource {
        self.page_sql = page_sql(self.db.backend(), &self.audience, only);
        self
    }
}

impl Source for SqlSource {
    fn next_page(&mut self) -> impl Future<Output = Result<Vec<Recipient>>> + Send {
        self.fetch()
    }
}

/// The page query. PostgreSQL turns the whole row into JSON itself
/// (`to_jsonb`), which handles every column type; SQLite has five storage
/// classes, decoded one by one.
fn page_sql(backend: Backend, audience: &Audience, retries_only: bool) -> String {
    let inner = audience.select_sql();
    let cols = match backend {
        Backend::Postgres => {
            "a.id::bigint AS id, a.email::text AS email, to_jsonb(a)::text AS blast_row"
        }
        Backend::Sqlite => "a.*",
    };
    // A recipient is due unless it has a final outcome or is deferred with
    // its next attempt still in the future ($5 = now).
    match backend {
        // PostgreSQL must walk the audience in id order and probe the
        // ledger's primary key per row, stopping at the LIMIT. `OFFSET 0`
        // keeps each subquery a per-row probe: without it NOT EXISTS became
        // an anti join, and a LEFT JOIN LATERAL a merge join, that read (and
        // sorted) every ledger row of the campaign for each page (47 ms per
        // page at 100K rows, 1.2-2.6 s in an older plan, growing with the
        // ledger); a LATERAL with LIMIT 1 kept the probe but its filter was
        // estimated at one row, so the planner sorted the whole remaining
        // range for every page (1.3 s).
        Backend::Postgres => format!(
            "SELECT {cols}, \
             (SELECT CAST(d.attempts AS BIGINT) FROM blast_deliveries d \
               WHERE d.campaign_id = $3 AND d.recipient_id = a.id) AS blast_attempts, \
             (SELECT d.first_attempt_at FROM blast_deliveries d \
               WHERE d.campaign_id = $3 AND d.recipient_id = a.id) AS blast_first_attempt \
             FROM ({inner}) AS a \
             WHERE a.id > $1 AND a.id <= $2 \
             AND NOT EXISTS (SELECT 1 FROM blast_deliveries d WHERE d.campaign_id = $3 \
                 AND d.recipient_id = a.id \
                 AND (d.status IN ({FINAL_STATUSES_SQL}) OR (d.status = 'deferred' AND d.next_attempt_at > $5)) \
                 OFFSET 0) \
             {only} ORDER BY a.id LIMIT $4",
            only = if retries_only {
                "AND EXISTS (SELECT 1 FROM blast_deliveries r WHERE r.campaign_id = $3 \
                 AND r.recipient_id = a.id AND r.status = 'deferred' OFFSET 0)"
            } else {
                ""
            }
        ),
        // SQLite walks the audience's key and probes the ledger's primary key
        // for NOT EXISTS; the details are scalar subqueries, evaluated for
        // the returned rows only. When the ledger has no row at all in the
        // range still ahead (`touched`, not correlated: SQLite evaluates it
        // once per page), which is every page of a first pass, the three
        // probes per row are skipped (0.85 us of SQLite's time per row).
        Backend::Sqlite => format!(
            "SELECT {cols}, \
             CASE WHEN {touched} THEN (SELECT CAST(d.attempts AS BIGINT) FROM blast_deliveries d \
               WHERE d.campaign_id = $3 AND d.recipient_id = a.id) END AS blast_attempts, \
             CASE WHEN {touched} THEN (SELECT d.first_attempt_at FROM blast_deliveries d \
               WHERE d.campaign_id = $3 AND d.recipient_id = a.id) END AS blast_first_attempt \
             FROM ({inner}) AS a \
             WHERE a.id > $1 AND a.id <= $2 \
             AND (NOT {touched} OR NOT EXISTS (SELECT 1 FROM blast_deliveries d WHERE d.campaign_id = $3 \
                 AND d.recipient_id = a.id \
                 AND (d.status IN ({FINAL_STATUSES_SQL}) OR (d.status = 'deferred' AND d.next_attempt_at > $5)))) \
             {only_sqlite} ORDER BY a.id LIMIT $4",
            touched = "EXISTS (SELECT 1 FROM blast_deliveries t WHERE t.campaign_id = $3 \
                 AND t.recipient_id > $1 AND t.recipient_id <= $2)",
            only_sqlite = if retries_only {
                "AND EXISTS (SELECT 1 FROM blast_deliveries r WHERE r.campaign_id = $3 \
                 AND r.recipient_id = a.id AND r.status = 'deferred')"
            } else {
                ""
            }
        ),
    }
}

/// The highest id in the audience (0 when empty): fixed at campaign start so
/// rows added later are not part of this campaign.
pub async fn max_id(db: &Db, audience: &Audience) -> Result<i64> {
    let sql = format!(
        "SELECT CAST(MAX(id) AS BIGINT) FROM ({}) AS a",
        audience.select_sql()
    );
    let max: Option<i64> = sqlx::query_scalar(AssertSqlSafe(sql))
        .fetch_one(db.pool())
        .await
        .map_err(audience_error)?;
    Ok(max.unwrap_or(0))
}

/// The `n`-th audience id (1-based) after `after`, at most `upto`: where a
/// claim of `n` recipients ends. None when fewer are left.
pub async fn nth_id(
    db: &Db,
    audience: &Audience,
    after: i64,
    upto: i64,
    n: u64,
) -> Result<Option<i64>> {
    let sql = format!(
        "SELECT CAST(a.id AS BIGINT) FROM ({}) AS a WHERE a.id > $1 AND a.id <= $2 \
         ORDER BY a.id LIMIT 1 OFFSET $3",
        audience.select_sql()
    );
    sqlx::query_scalar(AssertSqlSafe(sql))
        .bind(after)
        .bind(upto)
        .bind(n.saturating_sub(1).min(i64::MAX as u64) as i64)
        .fetch_optional(db.pool())
        .await
        .map_err(audience_error)
}

/// How many recipients are still pending (for the progress bar's ETA).
pub async fn pending_count(
    db: &Db,
    audience: &Audience,
    campaign_id: i64,
    max_id: i64,
) -> Result<i64> {
    // Ids up to `final_to` are all final: no need to count through them.
    let final_to: Option<i64> =
        sqlx::query_scalar("SELECT final_to FROM blast_campaigns WHERE id = $1")
            .bind(campaign_id)
            .fetch_optional(db.pool())
            .await?
            .flatten();
    // On PostgreSQL `OFFSET 0` keeps the probe per row (see `page_sql`):
    // as an anti join it hashed every ledger row of the campaign, 2.5-9 s
    // with 5M rows behind `final_to`.
    let probe_end = match db.backend() {
        Backend::Postgres => " OFFSET 0",
        Backend::Sqlite => "",
    };
    let sql = format!(
        "SELECT COUNT(*) FROM ({}) AS a WHERE a.id <= $1 AND a.id > $3 AND NOT EXISTS \
         (SELECT 1 FROM blast_deliveries d WHERE d.campaign_id = $2 AND d.recipient_id = a.id \
          AND d.status IN ({FINAL_STATUSES_SQL}){probe_end})",
        audience.select_sql()
    );
    let n: i64 = sqlx::query_scalar(AssertSqlSafe(sql))
        .bind(max_id)
        .bind(campaign_id)
        .bind(final_to.unwrap_or(i64::MIN))
        .fetch_one(db.pool())
        .await
        .map_err(audience_error)?;
    Ok(n)
}

/// One recipient by id, for `blast preview --id` (the first one when `id` is None).
pub async fn fetch_one(db: &Db, audience: &Audience, id: Option<i64>) -> Result<Option<Recipient>> {
    let sql = page_sql(db.backend(), audience, false);
    let (after, upto) = match id {
        Some(id) => (id - 1, id),
        None => (i64::MIN, i64::MAX),
    };
    // Campaign id -1 never exists, so the ledger filter passes everyone.
    let row = sqlx::query(AssertSqlSafe(sql))
        .bind(after)
        .bind(upto)
        .bind(-1_i64)
        .bind(1_i64)
        .bind(crate::clock::db_timestamp(crate::clock::now()))
        .fetch_optional(db.pool())
        .await
        .map_err(audience_error)?;
    let mut page: Vec<Recipient> = row
        .map(|r| decode(db.backend(), &r))
        .transpose()?
        .into_iter()
        .collect();
    mark_suppressed(db, &mut page).await?;
    Ok(page.pop())
}

/// Sets `suppressed` on the recipients of `page` whose address is on the
/// suppression list, in one query for the page. An address that is not one
/// matches nobody (render refuses it).
async fn mark_suppressed(db: &Db, page: &mut [Recipient]) -> Result<()> {
    let keys: Vec<Option<String>> = page
        .iter()
        .map(|r| crate::address::canonical(&r.email).ok())
        .collect();
    let lookup: Vec<String> = keys.iter().flatten().cloned().collect();
    let found: std::collections::HashMap<String, String> = crate::suppress::reasons(db, &lookup)
        .await?
        .into_iter()
        .collect();
    if found.is_empty() {
        return Ok(());
    }
    for (r, key) in page.iter_mut().zip(keys) {
        if let Some(why) = key.and_then(|k| found.get(&k)) {
            r.suppressed = Some(why.clone());
        }
    }
    Ok(())
}

/// SQL errors in the audience query are the operator's query's fault: say so.
fn audience_error(e: sqlx::Error) -> Error {
    match e {
        // The server restarting is not the query's fault: retried.
        e if crate::error::transient_sqlx(&e) => Error::Db(e),
        sqlx::Error::Database(db) => Error::Audience(format!("the audience query failed: {db}")),
        other => Error::Db(other),
    }
}

/// A row → [`Recipient`].
fn decode(backend: Backend, row: &AnyRow) -> Result<Recipient> {
    let id: i64 = row
        .try_get("id")
        .map_err(|e| Error::Audience(format!("column `id` must be an integer: {e}")))?;
    let mut vars = Map::new();
    let mut email = None;
    let mut broken = None;
    match backend {
        Backend::Postgres => {
            email = row
                .try_get::<Option<String>, _>("email")
                .map_err(|e| Error::Audience(format!("column `email`: {e}")))?;
            let json: String = row.try_get("blast_row")?;
            match serde_json::from_str(&json) {
                Ok(Value::Object(m)) => vars = m,
                Ok(_) => broken = Some("the row is not a JSON object".to_string()),
                Err(e) => broken = Some(format!("the row's JSON does not parse: {e}")),
            }
            vars.remove("id");
            vars.remove("email");
        }
        Backend::Sqlite => {
            let mut has_email = false;
            for (i, col) in row.columns().iter().enumerate() {
                match col.name() {
                    "id" | "blast_attempts" | "blast_first_attempt" => {}
                    "email" => {
                        has_email = true;
                        email = sqlite_value(row, i)?.as_str().map(str::to_string);
                    }
                    name => {
                        vars.insert(name.to_string(), sqlite_value(row, i)?);
                    }
                }
            }
            if !has_email {
                return Err(Error::Audience("the audience has no `email` column".into()));
            }
        }
    }
    if let Err(why) = parse_json_columns(&mut vars) {
        broken.get_or_insert(why);
    }
    lift_attributes(&mut vars);
    let attempts: Option<i64> = row.try_get("blast_attempts")?;
    Ok(Recipient {
        id,
        email: email.unwrap_or_default(),
        vars,
        attempts: attempts.unwrap_or(0).max(0) as u32,
        first_attempt_at: row.try_get("blast_first_attempt")?,
        suppressed: None,
        broken,
        claim_token: None,
    })
}

/// Parses the JSON columns (`attributes`, `*_json`) that arrive as text
/// (SQLite has no JSON type; a custom PostgreSQL table may use `text`).
/// Text that does not parse is an error naming the column: the recipient
/// must not be sent with its variables silently missing.
fn parse_json_columns(vars: &mut Map<String, Value>) -> std::result::Result<(), String> {
    for (name, value) in vars.iter_mut() {
        if name != "attributes" && !name.ends_with("_json") {
            continue;
        }
        let Value::String(text) = value else {
            continue;
        };
        // An empty text column holds no attributes.
        if text.trim().is_empty() {
            *value = Value::Null;
            continue;
        }
        let parsed = serde_json::from_str::<Value>(text)
            .map_err(|e| format!("column `{name}` is not valid JSON: {e}"))?;
        if name == "attributes" && !parsed.is_object() {
            return Err(format!("column `{name}` is not a JSON object"));
        }
        *value = parsed;
    }
    Ok(())
}

/// Decodes one SQLite value by its storage class (JSON columns stay text
/// here; [`parse_json_columns`] parses them).
fn sqlite_value(row: &AnyRow, i: usize) -> Result<Value> {
    let raw = row.try_get_raw(i)?;
    if raw.is_null() {
        return Ok(Value::Null);
    }
    // Compared without case and without allocating: this runs for every
    // column of every recipient.
    let info = raw.type_info();
    let kind = info.name();
    let is = |names: &[&str]| names.iter().any(|n| kind.eq_ignore_ascii_case(n));
    Ok(match () {
        _ if is(&["BOOLEAN"]) => Value::Bool(row.try_get(i)?),
        _ if is(&["SMALLINT", "INTEGER", "BIGINT"]) => Value::from(row.try_get::<i64, _>(i)?),
        _ if is(&["REAL", "DOUBLE"]) => Value::from(row.try_get::<f64, _>(i)?),
        _ if is(&["BLOB"]) => {
            Value::String(String::from_utf8_lossy(&row.try_get::<Vec<u8>, _>(i)?).into_owned())
        }
        _ => {
            let s: String = row.try_get(i)?;
            // JSON columns are parsed (and checked) in `parse_json_columns`.
            Value::String(s)
        }
    })
}

/// Lifts the keys of an `attributes` object to the top level so templates say
/// `{{ first_name }}`, not `{{ attributes.first_name }}`.
fn lift_attributes(vars: &mut Map<String, Value>) {
    if let Some(Value::Object(attrs)) = vars.get("attributes").cloned() {
        for (k, v) in attrs {
            vars.entry(k).or_insert(v);
        }
    }
}
