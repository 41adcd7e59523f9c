//! `blast import`: loads a CSV file into the built-in `subscribers` table.
//!
//! This module owns CSV parsing (header rules, per-row validation, line
//! numbers) and the batched, streaming insert into `subscribers`. It does not
//! own the schema (see `schema/`), the connection pool ([`Db`]), printing or
//! exit codes (the CLI does that through the `on_error`/`on_progress`
//! callbacks), and it never sends mail.
//!
//! Parsing is pure and synchronous ([`parse_header`], [`parse_record`]) so it is
//! unit-tested with byte literals; [`import_from`] adds the database writes.
//!
//! Memory does not grow with the file: records are read one chunk of
//! `batch_size` at a time, and duplicates are found by the database's unique
//! index on `email_key` (`ON CONFLICT DO NOTHING ... RETURNING`) rather than
//! by a set of every address seen. The key is the address's canonical form
//! ([`crate::address`]), computed here in Rust, so "the same address" means
//! the same on both backends: case-insensitive, and an IDN domain equal to
//! its punycode form. With `upsert`, an existing row no longer tells "in the
//! table before" from "earlier in this file", so each import claims its keys
//! in a temporary table first.

use std::collections::{HashMap, HashSet, VecDeque};
use std::fmt;
use std::io::Read;
use std::path::Path;

use csv::ByteRecord;
use serde_json::{Map, Value};
use sqlx::{AnyConnection, AssertSqlSafe, Connection, Row};

use crate::address::Address;
use crate::clock;
use crate::db::{Backend, Db};
use crate::error::{Error, Result};

/// Columns the table stores itself; a CSV column with one of these names would
/// shadow them when templates see a subscriber.
const RESERVED: &[&str] = &["id", "created_at", "attributes", "email_key"];

/// Rows per transaction: short enough that a reader or a second writer is
/// never blocked for long, long enough that commits (fsyncs) don't dominate.
const COMMIT_EVERY: u64 = 10_000;

/// Upper bound for [`ImportOptions::batch_size`]: each row takes three bind
/// parameters, and SQLite allows 32,766 per statement (PostgreSQL 65,535).
const MAX_BATCH: usize = 10_000;

/// A record longer than this is almost certainly a quote left open that is
/// swallowing the rest of the file; stop instead of buffering it all.
const MAX_RECORD_BYTES: u64 = 1 << 20;

/// How an import treats addresses that are already in the table.
#[derive(Debug, Clone)]
pub struct ImportOptions {
    /// Replace the attributes of addresses already in the table (counted as
    /// `updated`) instead of reporting them as duplicates. An address repeated
    /// within the file is a duplicate either way. Defaults to `false`.
    pub upsert: bool,
    /// Rows per multi-row `INSERT`. Defaults to 500; clamped to 1..=10,000.
    pub batch_size: usize,
}

impl Default for ImportOptions {
    fn default() -> Self {
        ImportOptions {
            upsert: false,
            batch_size: 500,
        }
    }
}

/// Running totals of an import. Every data record ends up in exactly one of
/// `imported`, `updated`, `duplicates` or `invalid`, so they sum to `rows`.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct ImportReport {
    /// Data records read (the header is not counted).
    pub rows: u64,
    /// New subscribers inserted.
    pub imported: u64,
    /// Existing subscribers whose attributes were replaced (upsert only).
    pub updated: u64,
    /// Records skipped because the address was already in the table or
    /// earlier in the file.
    pub duplicates: u64,
    /// Records skipped for any other reason (see [`RowProblem`]).
    pub invalid: u64,
}

/// One skipped record: where it is, whose it is, and why it was skipped.
#[derive(Debug, Clone)]
pub struct RowError {
    /// 1-based physical line where the record starts; the header is line 1.
    pub line: u64,
    /// The address as written (trimmed), when the record had a readable one.
    pub email: Option<String>,
    /// Why the record was skipped.
    pub reason: RowProblem,
}

/// Why a record was skipped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RowProblem {
    /// The `email` field is empty.
    MissingEmail,
    /// The `email` field is not a usable address; the string says why.
    InvalidEmail(String),
    /// The record has a different number of fields than the header.
    WrongColumnCount {
        /// Fields in the header.
        expected: usize,
        /// Fields in this record.
        found: usize,
    },
    /// A field is not valid UTF-8.
    BadUtf8 {
        /// The header name of the offending column.
        column: String,
    },
    /// The address is already in the table or earlier in this file
    /// (case-insensitively).
    Duplicate,
    /// The CSV reader rejected the record. Rare: it is lenient about quotes,
    /// and a quote left open is caught as a whole-file error instead.
    Csv(String),
}

impl fmt::Display for RowProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RowProblem::MissingEmail => f.write_str("missing email"),
            RowProblem::InvalidEmail(why) => write!(f, "invalid email: {why}"),
            RowProblem::WrongColumnCount { expected, found } => {
                write!(f, "expected {expected} columns, found {found}")
            }
            RowProblem::BadUtf8 { column } => write!(f, "column {column:?} is not valid UTF-8"),
            RowProblem::Duplicate => f.write_str("duplicate address"),
            RowProblem::Csv(message) => write!(f, "malformed CSV: {message}"),
        }
    }
}

impl fmt::Display for RowError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}: ", self.line)?;
        // The address goes next to the words it qualifies; for other problems
        // it is an aid for finding the record, so it trails in parentheses.
        match (&self.reason, &self.email) {
            (RowProblem::InvalidEmail(why), Some(email)) => {
                write!(f, "invalid email {email:?}: {why}")
            }
            (RowProblem::Duplicate, Some(email)) => write!(f, "duplicate address {email:?}"),
            (reason, Some(email)) => write!(f, "{reason} (email {email:?})"),
            (reason, None) => write!(f, "{reason}"),
        }
    }
}

/// A validated header: column names and which one holds the address.
#[derive(Debug, Clone)]
pub struct Header {
    /// Trimmed names, in file order.
    columns: Vec<String>,
    /// Index of the `email` column in `columns`.
    email: usize,
}

impl Header {
    /// The column names, trimmed, in file order.
    pub fn columns(&self) -> &[String] {
        &self.columns
    }

    /// The index of the `email` column.
    pub fn email_column(&self) -> usize {
        self.email
    }
}

/// A record that passed validation and is ready to insert.
#[derive(Debug, Clone, PartialEq)]
pub struct NewSubscriber {
    /// 1-based line where the record starts.
    pub line: u64,
    /// The address, trimmed, case preserved.
    pub email: String,
    /// Its canonical form ([`crate::address::canonical`]), which duplicates share.
    pub key: String,
    /// Every other column: header name → field as written (may be `""`).
    pub attributes: Map<String, Value>,
}

/// Validates the header record of `file` (the name is only used in messages).
///
/// Fails if a name is not UTF-8 or empty, a name repeats, a name is reserved
/// (`id`, `created_at`, `attributes`), or there is no `email` column (matched
/// case-insensitively). A UTF-8 BOM before the first name is ignored.
pub fn parse_header(file: &str, record: &ByteRecord) -> Result<Header> {
    let fail = |message: String| Error::Csv {
        file: file.to_string(),
        message,
    };
    let mut columns = Vec::with_capacity(record.len());
    // Name → 1-based column number, to point at both copies of a duplicate.
    let mut seen: HashMap<String, usize> = HashMap::new();
    let mut email = None;
    for (i, raw) in record.iter().enumerate() {
        let number = i + 1;
        // csv strips a BOM at the start of a stream, but not one handed to
        // us in a record built some other way.
        let raw = if i == 0 {
            raw.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(raw)
        } else {
            raw
        };
        let name = std::str::from_utf8(raw)
            .map_err(|_| {
                fail(format!(
                    "header column {number} is not valid UTF-8; save the file as UTF-8"
                ))
            })?
            .trim();
        if name.is_empty() {
            return Err(fail(format!(
                "header column {number} has no name; name it or remove the column"
            )));
        }
        if let Some(first) = seen.insert(name.to_string(), number) {
            return Err(fail(format!(
                "column {name:?} appears twice in the header (columns {first} and {number}); \
                 rename or remove one"
            )));
        }
        let lower = name.to_ascii_lowercase();
        if lower == "email" {
            if let Some(first) = email {
                return Err(fail(format!(
                    "two email columns in the header (columns {} and {number}); \
                     keep one and rename the other",
                    first + 1
                )));
            }
            email = Some(i);
        } else if RESERVED.contains(&lower.as_str()) {
            return Err(fail(format!(
                "column {name:?} is reserved (blast stores it itself); \
                 rename it, e.g. to \"csv_{name}\""
            )));
        }
        columns.push(name.to_string());
    }
    let Some(email) = email else {
        return Err(fail(format!(
            "no email column in the header (found: {}); name the address column \"email\"",
            columns.join(", ")
        )));
    };
    Ok(Header { columns, email })
}

/// Validates one data record starting at `line` against `header`.
///
/// Checks, in order: the field count, UTF-8 in every field, then the address
/// (non-empty, then blast's one rule: [`crate::address`]).
pub fn parse_record(
    header: &Header,
    record: &ByteRecord,
    line: u64,
) -> Result<NewSubscriber, RowError> {
    // The address, if readable, makes every report easier to act on.
    let email_hint = record
        .get(header.email)
        .and_then(|raw| std::str::from_utf8(raw).ok())
        .map(str::trim)
        .filter(|email| !email.is_empty())
        .map(str::to_string);
    let reject = |reason| RowError {
        line,
        email: email_hint.clone(),
        reason,
    };

    let (expected, found) = (header.columns.len(), record.len());
    if found != expected {
        return Err(reject(RowProblem::WrongColumnCount { expected, found }));
    }
    let mut email = "";
    let mut attributes = Map::new();
    for (i, (raw, name)) in record.iter().zip(&header.columns).enumerate() {
        let Ok(value) = std::str::from_utf8(raw) else {
            return Err(reject(RowProblem::BadUtf8 {
                column: name.clone(),
            }));
        };
        if i == header.email {
            email = value;
        } else {
            attributes.insert(name.clone(), Value::String(value.to_string()));
        }
    }
    let (email, key) = check_email(email).map_err(reject)?;
    Ok(NewSubscriber {
        line,
        email,
        key,
        attributes,
    })
}

/// Trims and validates an address, returning it with its case preserved,
/// and its canonical key.
fn check_email(raw: &str) -> Result<(String, String), RowProblem> {
    let email = raw.trim();
    if email.is_empty() {
        return Err(RowProblem::MissingEmail);
    }
    let address = Address::parse(email).map_err(|e| RowProblem::InvalidEmail(e.to_string()))?;
    Ok((address.written().to_string(), address.key()))
}

/// Opens `path` and calls [`import_from`], using the path in messages.
pub async fn import_file(
    db: &Db,
    path: &Path,
    opts: &ImportOptions,
    on_error: &mut (dyn FnMut(&RowError) + Send),
    on_progress: &mut (dyn FnMut(&ImportReport) + Send),
) -> Result<ImportReport> {
    let reader = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let file = path.display().to_string();
    import_from(db, &file, reader, opts, on_error, on_progress).await
}

/// Imports CSV from `reader` into `subscribers`; `file` names it in messages.
///
/// Header problems fail with [`Error::Csv`] before the database is touched.
/// Each skipped record is passed to `on_error`, in line order. Rows are
/// written in batches of `opts.batch_size` and committed about every 10,000
/// records; `on_progress` gets the running totals after each commit.
///
/// If the import fails part-way (database error, unreadable input, a record
/// over 1 MiB), the commits made so far stay and the open one is rolled back;
/// re-running reports the rows already imported as duplicates.
pub async fn import_from<R: Read + Send>(
    db: &Db,
    file: &str,
    reader: R,
    opts: &ImportOptions,
    on_error: &mut (dyn FnMut(&RowError) + Send),
    on_progress: &mut (dyn FnMut(&ImportReport) + Send),
) -> Result<ImportReport> {
    let mut records = Records::open(file, reader)?;
    // One connection throughout: upsert keeps state in a temporary table.
    let mut conn = db.pool().acquire().await?;
    let mut import = Importer {
        file: file.to_string(),
        backend: db.backend(),
        upsert: opts.upsert,
        batch_size: opts.batch_size.clamp(1, MAX_BATCH),
        report: ImportReport::default(),
    };
    if import.upsert {
        create_seen_table(&mut conn).await?;
    }
    let result = import
        .run(&mut conn, &mut records, on_error, on_progress)
        .await;
    if import.upsert && drop_seen_table(&mut conn).await.is_err() {
        // Don't hand a connection with a stale temporary table back to the pool.
        conn.close_on_drop();
    }
    result.map(|()| import.report)
}

/// What the database did with one valid record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fate {
    /// Inserted as a new subscriber.
    Imported,
    /// An existing subscriber's attributes were replaced.
    Updated,
    /// Skipped: the address was already present.
    Duplicate,
}

/// The state of one import: settings plus running totals.
struct Importer {
    /// The file name, for messages.
    file: String,
    /// Which SQL dialect to write.
    backend: Backend,
    /// See [`ImportOptions::upsert`].
    upsert: bool,
    /// Rows per statement, already clamped.
    batch_size: usize,
    /// Totals so far, including the uncommitted transaction.
    report: ImportReport,
}

impl Importer {
    /// Reads and writes the whole file, one transaction per ~10,000 records.
    async fn run<R: Read>(
        &mut self,
        conn: &mut AnyConnection,
        records: &mut Records<R>,
        on_error: &mut (dyn FnMut(&RowError) + Send),
        on_progress: &mut (dyn FnMut(&ImportReport) + Send),
    ) -> Result<()> {
        let mut committed = 0;
        // Read before BEGIN so an empty file never opens a transaction.
        let mut chunk = self.read_chunk(records, committed)?;
        while !chunk.is_empty() {
            let mut tx = match self.backend {
                // Take the write lock up front. A deferred transaction that
                // reads first (upsert does) gets SQLITE_BUSY, without waiting,
                // if another connection writes before its first write.
                Backend::Sqlite => conn.begin_with("BEGIN IMMEDIATE").await?,
                Backend::Postgres => conn.begin().await?,
            };
            let mut in_tx = 0;
            while !chunk.is_empty() && in_tx < COMMIT_EVERY {
                in_tx += chunk.len() as u64;
                self.write_chunk(&mut tx, chunk, on_error).await?;
                chunk = self.read_chunk(records, committed)?;
            }
            tx.commit().await?;
            committed = self.report.rows;
            on_progress(&self.report);
        }
        Ok(())
    }

    /// Reads up to `batch_size` records; a fatal error says how far the
    /// import got, since commits before it are kept.
    fn read_chunk<R: Read>(&self, records: &mut Records<R>, committed: u64) -> Result<Chunk> {
        records.read_chunk(self.batch_size).map_err(|e| match e {
            Error::Csv { file, message } => Error::Csv {
                file,
                message: format!("{message} (import stopped; {committed} records were committed)"),
            },
            other => other,
        })
    }

    /// Writes the valid records of `chunk`, then reports every skipped record
    /// of the chunk in line order and updates the totals.
    async fn write_chunk(
        &mut self,
        conn: &mut AnyConnection,
        chunk: Chunk,
        on_error: &mut (dyn FnMut(&RowError) + Send),
    ) -> Result<()> {
        self.report.rows += chunk.len() as u64;
        // `None` marks where a valid record sits, so errors can be merged
        // back in line order once the database has judged the valid ones.
        let mut slots = Vec::with_capacity(chunk.len());
        let mut valid = Vec::with_capacity(chunk.len());
        for parsed in chunk {
            match parsed {
                Ok(row) => {
                    valid.push(row);
                    slots.push(None);
                }
                Err(err) => slots.push(Some(err)),
            }
        }
        let fates = if valid.is_empty() {
            Vec::new()
        } else if self.upsert {
            self.upsert_rows(conn, &valid).await?
        } else {
            self.insert_rows(conn, &valid).await?
        };
        let mut judged = valid.into_iter().zip(fates);
        for slot in slots {
            if let Some(err) = slot {
                self.report.invalid += 1;
                on_error(&err);
            } else if let Some((row, fate)) = judged.next() {
                match fate {
                    Fate::Imported => self.report.imported += 1,
                    Fate::Updated => self.report.updated += 1,
                    Fate::Duplicate => {
                        self.report.duplicates += 1;
                        on_error(&RowError {
                            line: row.line,
                            email: Some(row.email),
                            reason: RowProblem::Duplicate,
                        });
                    }
                }
            }
        }
        Ok(())
    }

    /// Inserts `rows`, skipping addresses already present (in the table or
    /// earlier in the batch).
    async fn insert_rows(
        &self,
        conn: &mut AnyConnection,
        rows: &[NewSubscriber],
    ) -> Result<Vec<Fate>> {
        let sql = self.insert_sql(rows.len(), "ON CONFLICT DO NOTHING RETURNING email_key");
        let inserted = self
            .bind_subscribers(sqlx::query(AssertSqlSafe(sql)), rows.iter())?
            .persistent(rows.len() == self.batch_size)
            .fetch_all(&mut *conn)
            .await?;
        let inserted = strings(&inserted, 0)?;
        Ok(first_occurrences(rows, &inserted)
            .into_iter()
            .map(|new| if new { Fate::Imported } else { Fate::Duplicate })
            .collect())
    }

    /// Inserts `rows`, replacing the attributes of addresses already in the
    /// table, unless this import has already written that address.
    async fn upsert_rows(
        &self,
        conn: &mut AnyConnection,
        rows: &[NewSubscriber],
    ) -> Result<Vec<Fate>> {
        // 1. Claim each key for this import.
        let mut sql = String::from("INSERT INTO blast_import_seen (key) VALUES ");
        for i in 0..rows.len() {
            sql.push_str(&format!("{}(${})", sep(i), i + 1));
        }
        sql.push_str(" ON CONFLICT DO NOTHING RETURNING key");
        let mut claim = sqlx::query(AssertSqlSafe(sql));
        for row in rows {
            claim = claim.bind(row.key.as_str());
        }
        let claimed = claim
            .persistent(rows.len() == self.batch_size)
            .fetch_all(&mut *conn)
            .await?;
        let mut claimed: HashSet<String> = strings(&claimed, 0)?.into_iter().collect();
        // A key is returned at most once, and taking it out on first use
        // gives it to the first record with it; the records left over lost
        // the claim: duplicates within the file.
        let mut fates = vec![Fate::Duplicate; rows.len()];
        let mut fresh = Vec::new();
        for (i, row) in rows.iter().enumerate() {
            if claimed.remove(row.key.as_str()) {
                fresh.push((i, row, row.key.as_str()));
            }
        }
        if fresh.is_empty() {
            return Ok(fates);
        }

        // 2. Which of the claimed addresses exist already: those are updates.
        let mut sql = String::from("SELECT email_key FROM subscribers WHERE email_key IN (");
        for i in 0..fresh.len() {
            sql.push_str(&format!("{}${}", sep(i), i + 1));
        }
        sql.push(')');
        let mut lookup = sqlx::query(AssertSqlSafe(sql));
        for (_, _, key) in &fresh {
            lookup = lookup.bind(*key);
        }
        let full = fresh.len() == self.batch_size;
        let existing = strings(&lookup.persistent(full).fetch_all(&mut *conn).await?, 0)?;
        let existing: HashSet<&str> = existing.iter().map(String::as_str).collect();

        // 3. Write them all. The claims guarantee no two rows of this
        //    statement hit the same subscriber, which PostgreSQL requires.
        let sql = self.insert_sql(
            fresh.len(),
            "ON CONFLICT (email_key) DO UPDATE SET attributes = excluded.attributes",
        );
        let fresh_rows = fresh.iter().map(|(_, row, _)| *row);
        self.bind_subscribers(sqlx::query(AssertSqlSafe(sql)), fresh_rows)?
            .persistent(full)
            .execute(&mut *conn)
            .await?;
        for (i, _, key) in fresh {
            fates[i] = if existing.contains(key) {
                Fate::Updated
            } else {
                Fate::Imported
            };
        }
        Ok(fates)
    }

    /// `INSERT INTO subscribers ... VALUES` for `n` rows, then `tail`.
    /// `$1` is the shared `created_at`; row `i` binds `$3i+2` (email),
    /// `$3i+3` (its key) and `$3i+4` (attributes).
    fn insert_sql(&self, n: usize, tail: &str) -> String {
        // The Any driver sends text; PostgreSQL needs it cast to the column's type.
        let cast = match self.backend {
            Backend::Sqlite => "",
            Backend::Postgres => "::jsonb",
        };
        let mut sql = String::from(
            "INSERT INTO subscribers (email, email_key, attributes, created_at) VALUES ",
        );
        for i in 0..n {
            let p = 3 * i + 2;
            sql.push_str(&format!(
                "{}(${p}, ${}, ${}{cast}, $1)",
                sep(i),
                p + 1,
                p + 2
            ));
        }
        sql.push(' ');
        sql.push_str(tail);
        sql
    }

    /// Binds the parameters [`Importer::insert_sql`] expects.
    fn bind_subscribers<'q>(
        &self,
        mut query: sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments>,
        rows: impl Iterator<Item = &'q NewSubscriber>,
    ) -> Result<sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments>> {
        query = query.bind(clock::db_timestamp(clock::now()));
        for row in rows {
            let attributes = serde_json::to_string(&row.attributes).map_err(|e| Error::Csv {
                file: self.file.clone(),
                message: format!("line {}: cannot encode attributes: {e}", row.line),
            })?;
            query = query
                .bind(row.email.as_str())
                .bind(row.key.as_str())
                .bind(attributes);
        }
        Ok(query)
    }
}

/// `", "` before every item but the first of a SQL list.
fn sep(i: usize) -> &'static str {
    if i == 0 {
        ""
    } else {
        ", "
    }
}

/// Column `index` of every row, as text.
fn strings(rows: &[sqlx::any::AnyRow], index: usize) -> Result<Vec<String>> {
    Ok(rows
        .iter()
        .map(|row| row.try_get::<String, _>(index))
        .collect::<Result<_, _>>()?)
}

/// For each row, whether it is the one the database accepted: `accepted`
/// holds the keys it returned. Rows are written in order, so when one key
/// appears twice in a batch the first row with it is the one that went in.
fn first_occurrences(rows: &[NewSubscriber], accepted: &[String]) -> Vec<bool> {
    let mut left: HashMap<&str, usize> = HashMap::new();
    for key in accepted {
        *left.entry(key.as_str()).or_default() += 1;
    }
    rows.iter()
        .map(|row| match left.get_mut(row.key.as_str()) {
            Some(n) if *n > 0 => {
                *n -= 1;
                true
            }
            _ => false,
        })
        .collect()
}

/// Creates the per-import set of addresses written, for upsert. It lives in
/// the database (temporary, this connection only) so memory stays flat.
async fn create_seen_table(conn: &mut AnyConnection) -> Result<()> {
    drop_seen_table(conn).await?;
    sqlx::query("CREATE TEMPORARY TABLE blast_import_seen (key TEXT PRIMARY KEY)")
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// Drops the table made by [`create_seen_table`], if any. Both dialects look
/// in the temporary schema first, so this never touches a real table.
async fn drop_seen_table(conn: &mut AnyConnection) -> Result<()> {
    sqlx::query("DROP TABLE IF EXISTS blast_import_seen")
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// Records parsed from one chunk of the file, in line order.
type Chunk = Vec<Result<NewSubscriber, RowError>>;

/// A CSV stream positioned after a valid header.
struct Records<R> {
    /// The file name, for messages.
    file: String,
    /// The reader, over input that remembers the current record's bytes.
    csv: csv::Reader<Window<R>>,
    /// The validated header.
    header: Header,
    /// Reused for every record, so reading allocates only for long records.
    record: ByteRecord,
}

impl<R: Read> Records<R> {
    /// Reads and validates the header.
    fn open(file: &str, reader: R) -> Result<Self> {
        let window = Window {
            inner: reader,
            bytes: VecDeque::new(),
            start: 0,
            line: 1,
            after_cr: false,
            tripped: false,
        };
        let csv = csv::ReaderBuilder::new()
            // We read the header ourselves and report ragged rows ourselves.
            .has_headers(false)
            .flexible(true)
            .from_reader(window);
        let mut records = Records {
            file: file.to_string(),
            csv,
            header: Header {
                columns: Vec::new(),
                email: 0,
            },
            record: ByteRecord::new(),
        };
        match records.read_raw() {
            Ok(Some(_)) => {}
            Ok(None) => {
                return Err(records
                    .fatal("the file is empty; expected a header row with an email column".into()))
            }
            Err((line, RowOrFatal::Row(message) | RowOrFatal::Fatal(message))) => {
                return Err(records.fatal(format!("line {line}: {message}")))
            }
        }
        records.header = parse_header(file, &records.record)?;
        Ok(records)
    }

    /// Reads up to `n` records; an empty chunk means end of file.
    fn read_chunk(&mut self, n: usize) -> Result<Chunk> {
        let mut chunk = Vec::with_capacity(n);
        while chunk.len() < n {
            match self.next()? {
                Some(parsed) => chunk.push(parsed),
                None => break,
            }
        }
        Ok(chunk)
    }

    /// The next record, parsed, or `None` at end of file.
    fn next(&mut self) -> Result<Option<Result<NewSubscriber, RowError>>> {
        let before = self.csv.position().byte();
        match self.read_raw() {
            Ok(None) => Ok(None),
            Ok(Some(line)) => Ok(Some(parse_record(&self.header, &self.record, line))),
            // Skip a record the reader rejects, but only if it moved past
            // it; otherwise the next read would fail the same way forever.
            Err((line, RowOrFatal::Row(message))) if self.csv.position().byte() > before => {
                let reason = RowProblem::Csv(message);
                Ok(Some(Err(RowError {
                    line,
                    email: None,
                    reason,
                })))
            }
            Err((line, RowOrFatal::Row(message) | RowOrFatal::Fatal(message))) => {
                Err(self.fatal(format!("line {line}: {message}")))
            }
        }
    }

    /// Reads the next raw record into `self.record` and returns the line it
    /// starts on, or `None` at end of file. Errors carry the line too.
    fn read_raw(&mut self) -> Result<Option<u64>, (u64, RowOrFatal)> {
        let before = self.csv.position().byte();
        self.csv.get_mut().forget_before(before);
        let read = self.csv.read_byte_record(&mut self.record);
        // Not the reader's own record position: that points just past the
        // previous record, a line early after a CRLF or a blank line, and it
        // counts LFs only, so a file with CR line ends would be all line 1.
        let line = self.csv.get_ref().record_line();
        match read {
            Ok(found) => Ok(found.then_some(line)),
            Err(_) if self.csv.get_ref().tripped => Err((
                line,
                RowOrFatal::Fatal(format!(
                    "a record starting here is longer than {} MiB; is a quote (\") left open?",
                    MAX_RECORD_BYTES >> 20
                )),
            )),
            Err(e) => match e.kind() {
                csv::ErrorKind::Io(io) => {
                    Err((line, RowOrFatal::Fatal(format!("cannot read: {io}"))))
                }
                _ => Err((line, RowOrFatal::Row(e.to_string()))),
            },
        }
    }

    /// A whole-file error for this file.
    fn fatal(&self, message: String) -> Error {
        Error::Csv {
            file: self.file.clone(),
            message,
        }
    }
}

/// Whether a CSV read error can be skipped or ends the import.
enum RowOrFatal {
    /// The reader rejected one record and can go on.
    Row(String),
    /// Input can no longer be read.
    Fatal(String),
}

/// The input, keeping the bytes from the start of the current record, so
/// [`Records`] can tell on which line the record really starts. It also
/// fails once a record passes [`MAX_RECORD_BYTES`], so an unbalanced quote
/// cannot make the CSV reader buffer the rest of a 10-million-row file.
struct Window<R> {
    /// The real input.
    inner: R,
    /// Bytes read from `inner`, from stream offset `start` on: the current
    /// record plus the CSV reader's read-ahead (8 KiB).
    bytes: VecDeque<u8>,
    /// Stream offset of `bytes[0]`.
    start: u64,
    /// Line number of `bytes[0]`. CR, LF and CRLF each end a line, as they
    /// each end a record for the CSV reader.
    line: u64,
    /// Whether the byte before `bytes[0]` is a CR, so a following LF is the
    /// second half of a CRLF rather than another line.
    after_cr: bool,
    /// Set when the cap was hit, to tell this apart from a real I/O error.
    tripped: bool,
}

impl<R> Window<R> {
    /// Drops the bytes before stream offset `offset`, which the CSV reader
    /// has finished with, counting the lines they end.
    fn forget_before(&mut self, offset: u64) {
        let n = usize::try_from(offset.saturating_sub(self.start))
            .unwrap_or(usize::MAX)
            .min(self.bytes.len());
        for b in self.bytes.drain(..n) {
            self.line += line_ends(b, self.after_cr);
            self.after_cr = b == b'\r';
        }
        self.start += n as u64;
    }

    /// The line of the first byte that is not CR or LF: where the record read
    /// since [`Window::forget_before`] starts, as the CSV reader skips blank
    /// lines (and the LF of a CRLF) before a record.
    fn record_line(&self) -> u64 {
        let (mut line, mut after_cr) = (self.line, self.after_cr);
        for &b in self.bytes.iter().take_while(|&&b| b == b'\r' || b == b'\n') {
            line += line_ends(b, after_cr);
            after_cr = b == b'\r';
        }
        line
    }
}

/// 1 if byte `b` ends a line, given whether the byte before it was a CR.
fn line_ends(b: u8, after_cr: bool) -> u64 {
    u64::from(b == b'\r' || (b == b'\n' && !after_cr))
}

impl<R: Read> Read for Window<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.bytes.len() as u64 > MAX_RECORD_BYTES {
            self.tripped = true;
            return Err(std::io::Error::other("record too long"));
        }
        let n = self.inner.read(buf)?;
        self.bytes.extend(&buf[..n]);
        Ok(n)
    }
}

#[cfg(test)]
pub(crate) mod tests;
