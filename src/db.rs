//! Database pools and schema migrations. This is the only module that sees a
//! connection URL; everything else gets a [`Db`]. Both SQLite (embedded default)
//! and PostgreSQL go through sqlx's `Any` driver so that queries that are the
//! same on both are written once; the few that differ ask [`Db::backend`].

use std::borrow::Cow;
use std::str::FromStr;

use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::migrate::{Migration, MigrationType, Migrator};
use sqlx::{AnyPool, AssertSqlSafe, Executor, SqlSafeStr};

use crate::error::{Error, Result};

/// Which SQL dialect a [`Db`] speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// SQLite, file or memory.
    Sqlite,
    /// PostgreSQL.
    Postgres,
}

/// A connection pool plus the dialect it speaks.
#[derive(Debug, Clone)]
pub struct Db {
    pool: AnyPool,
    backend: Backend,
}

/// Migrations embedded in the binary, so an installed `blast` needs no `schema/` folder.
const SQLITE_MIGRATIONS: &[(i64, &str, &str)] = &[
    (1, "init", include_str!("../schema/sqlite/0001_init.sql")),
    (
        2,
        "reliability",
        include_str!("../schema/sqlite/0002_reliability.sql"),
    ),
    (
        3,
        "inbound",
        include_str!("../schema/sqlite/0003_inbound.sql"),
    ),
    (
        4,
        "relays",
        include_str!("../schema/sqlite/0004_relays.sql"),
    ),
    (
        5,
        "workers",
        include_str!("../schema/sqlite/0005_workers.sql"),
    ),
    (
        6,
        "address keys",
        include_str!("../schema/sqlite/0006_address_keys.sql"),
    ),
    (
        7,
        "mta delivery",
        include_str!("../schema/sqlite/0007_mta_delivery.sql"),
    ),
    (
        8,
        "delivery worker",
        include_str!("../schema/sqlite/0008_delivery_worker.sql"),
    ),
];
/// The PostgreSQL twins of [`SQLITE_MIGRATIONS`]; versions must match.
const POSTGRES_MIGRATIONS: &[(i64, &str, &str)] = &[
    (1, "init", include_str!("../schema/postgres/0001_init.sql")),
    (
        2,
        "reliability",
        include_str!("../schema/postgres/0002_reliability.sql"),
    ),
    (
        3,
        "inbound",
        include_str!("../schema/postgres/0003_inbound.sql"),
    ),
    (
        4,
        "relays",
        include_str!("../schema/postgres/0004_relays.sql"),
    ),
    (
        5,
        "workers",
        include_str!("../schema/postgres/0005_workers.sql"),
    ),
    (
        6,
        "address keys",
        include_str!("../schema/postgres/0006_address_keys.sql"),
    ),
    (
        7,
        "mta delivery",
        include_str!("../schema/postgres/0007_mta_delivery.sql"),
    ),
    (
        8,
        "delivery worker",
        include_str!("../schema/postgres/0008_delivery_worker.sql"),
    ),
];

impl Db {
    /// Connects to `url` (`sqlite://path`, `postgres://...`) and applies pending
    /// migrations. A SQLite file is created if missing and put in WAL mode so
    /// readers (status, preview) never block the sender.
    pub async fn connect(url: &str) -> Result<Db> {
        Db::connect_with_stall(url, None).await
    }

    /// [`Db::connect`] for a sender on PostgreSQL: a session that sits in
    /// an open transaction for longer than `stall` (its process stopped or
    /// its host stalled mid-transaction) is ended by the server, so the
    /// row locks it held (the campaign row while it takes a grant, its
    /// claims while its ledger writes) do not hold every other worker up
    /// until it wakes. Pass the workers' lease TTL: a worker stalled that
    /// long has lost its claims anyway. Its next statement then fails as
    /// a dropped connection, which the callers retry on a new one.
    pub async fn connect_with_stall(url: &str, stall: Option<std::time::Duration>) -> Result<Db> {
        sqlx::any::install_default_drivers();
        let backend = backend_of(url)?;
        let url = match backend {
            // Create the file on first use, as an embedded default should.
            Backend::Sqlite if !url.contains("mode=") && !url.contains(":memory:") => {
                let sep = if url.contains('?') { '&' } else { '?' };
                format!("{url}{sep}mode=rwc")
            }
            _ => url.to_string(),
        };
        let options = AnyConnectOptions::from_str(&url)?;
        let synchronous = sqlite_synchronous()?;
        let pool = AnyPoolOptions::new()
            // A server that is down fails a step after 5 s (not sqlx's 30 s):
            // the callers that can wait ([`Backoff`]) retry it, logged, for
            // up to [`RETRY_FOR`]; the others fail fast with a clear error.
            .acquire_timeout(std::time::Duration::from_secs(5))
            // SQLite allows one writer at a time; a few connections let the
            // source read while the ledger writes.
            .max_connections(if backend == Backend::Sqlite { 4 } else { 8 })
            .after_connect(move |conn, _meta| {
                Box::pin(async move {
                    if backend == Backend::Sqlite {
                        let pragmas = format!(
                            "PRAGMA journal_mode=WAL; PRAGMA synchronous={synchronous}; \
                             PRAGMA busy_timeout=10000; PRAGMA foreign_keys=ON;"
                        );
                        conn.execute(AssertSqlSafe(pragmas)).await?;
                    } else {
                        // Plan the audience page with the actual key range each
                        // time: a generic plan for `id > $1 AND id <= $2` chose a
                        // full scan and sort, 1-2.6 s per page at 200K rows,
                        // against 2.5 ms for the custom plan.
                        conn.execute("SET plan_cache_mode = force_custom_plan")
                            .await?;
                        // JIT compiles a plan for seconds of work; blast's
                        // queries take milliseconds. The audience page's
                        // per-row ledger probe (source.rs) is costed high
                        // enough to trigger it: 130 ms of JIT per page of
                        // 1,000 that runs in 4 ms.
                        conn.execute("SET jit = off").await?;
                        if let Some(stall) = stall {
                            let ms = stall.as_millis().max(1);
                            conn.execute(AssertSqlSafe(format!(
                                "SET idle_in_transaction_session_timeout = {ms}"
                            )))
                            .await?;
                        }
                    }
                    Ok(())
                })
            })
            .connect_with(options)
            .await?;
        let db = Db { pool, backend };
        db.migrate().await?;
        crate::rekey::run(&db).await?;
        Ok(db)
    }

    /// The pool, for modules that run their own queries.
    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }

    /// The dialect.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// The database's clock, milliseconds since the epoch, as an SQL
    /// expression. Leases and claims are timed by it and never by a
    /// worker's own clock, so a host whose clock is off can neither steal a
    /// live claim nor keep a dead one.
    pub fn now_ms_sql(&self) -> &'static str {
        match self.backend {
            Backend::Postgres => "CAST(EXTRACT(EPOCH FROM clock_timestamp()) * 1000 AS BIGINT)",
            Backend::Sqlite => "CAST((julianday('now') - 2440587.5) * 86400000.0 AS INTEGER)",
        }
    }

    /// A subquery yielding, as rows, the JSON array of objects bound as
    /// parameter `$param`, one column per `(name, PostgreSQL type)`. sqlx's
    /// `Any` driver binds no arrays; one text parameter carries a batch on
    /// both backends.
    pub fn json_rows_sql(&self, param: usize, columns: &[(&str, &str)]) -> String {
        match self.backend {
            Backend::Postgres => {
                let cols: Vec<String> = columns.iter().map(|(n, t)| format!("{n} {t}")).collect();
                format!(
                    "(SELECT * FROM json_to_recordset(${param}::json) AS x({}))",
                    cols.join(", ")
                )
            }
            Backend::Sqlite => {
                let cols: Vec<String> = columns
                    .iter()
                    .map(|(n, _)| format!("json_extract(value, '$.{n}') AS {n}"))
                    .collect();
                format!("(SELECT {} FROM json_each(${param}))", cols.join(", "))
            }
        }
    }

    /// Applies the embedded migrations for this backend.
    async fn migrate(&self) -> Result<()> {
        let source = match self.backend {
            Backend::Sqlite => SQLITE_MIGRATIONS,
            Backend::Postgres => POSTGRES_MIGRATIONS,
        };
        let migrations = source
            .iter()
            .map(|&(version, description, sql)| {
                Migration::new(
                    version,
                    Cow::Borrowed(description),
                    MigrationType::Simple,
                    AssertSqlSafe(sql).into_sql_str(),
                    false,
                )
            })
            .collect();
        let mut migrator = Migrator::with_migrations(migrations);
        migrator.dangerous_set_table_name("blast_schema_migrations");
        migrator.run(&self.pool).await?;
        Ok(())
    }

    /// Closes the pool, waiting for connections to be returned.
    pub async fn close(&self) {
        self.pool.close().await;
    }
}

/// Tells the dialect from the URL scheme, with a clear error for anything else.
fn backend_of(url: &str) -> Result<Backend> {
    if url.starts_with("sqlite:") {
        Ok(Backend::Sqlite)
    } else if url.starts_with("postgres:") || url.starts_with("postgresql:") {
        Ok(Backend::Postgres)
    } else {
        Err(Error::config(
            "<database>",
            "database",
            format!(
                "unsupported URL {:?}: use sqlite://FILE or postgres://USER@HOST/DB",
                redact(url)
            ),
        ))
    }
}

/// A URL with its passwords replaced by `***`, for messages and logs: the
/// one in the user info (`scheme://user:password@host`) and any
/// `password=` query parameter (`?password=...`, as libpq accepts).
pub fn redact(url: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let mut out = match base.split_once("://") {
        Some((scheme, rest)) => match rest.rsplit_once('@') {
            Some((userinfo, host)) => match userinfo.split_once(':') {
                Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
                None => base.to_string(),
            },
            None => base.to_string(),
        },
        None => base.to_string(),
    };
    if let Some(q) = query {
        let params: Vec<String> = q
            .split('&')
            .map(|p| match p.split_once('=') {
                Some((k, _)) if k.eq_ignore_ascii_case("password") => format!("{k}=***"),
                _ => p.to_string(),
            })
            .collect();
        out.push('?');
        out.push_str(&params.join("&"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_passwords() {
        assert_eq!(redact("postgres://u:secret@h/db"), "postgres://u:***@h/db");
        assert_eq!(redact("sqlite://x.db"), "sqlite://x.db");
        assert_eq!(
            redact("postgres://u@h/db?sslmode=require&password=s3cret&x=1"),
            "postgres://u@h/db?sslmode=require&password=***&x=1"
        );
        assert_eq!(
            redact("postgres://u:a@b@h/db?PASSWORD=p"),
            "postgres://u:***@h/db?PASSWORD=***"
        );
        assert_eq!(redact("sqlite:///x.db?mode=rwc"), "sqlite:///x.db?mode=rwc");
    }

    #[test]
    fn rejects_unknown_schemes() {
        let err = backend_of("mysql://x").unwrap_err().to_string();
        assert!(err.contains("unsupported URL"), "{err}");
    }

    #[tokio::test]
    async fn migrates_a_fresh_sqlite_file_twice() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("t.db").display());
        let db = Db::connect(&url).await.unwrap();
        db.close().await;
        // Re-running migrations on an up-to-date database is a no-op.
        let db = Db::connect(&url).await.unwrap();
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM blast_campaigns")
            .fetch_one(db.pool())
            .await
            .unwrap();
        assert_eq!(n, 0);
    }
}

/// SQLite's `synchronous` setting: `FULL` unless `BLAST_SQLITE_SYNCHRONOUS`
/// says `normal`. With `FULL` (WAL) every committed ledger batch survives a
/// power loss; with `NORMAL` the batches of the last moments before it may
/// be lost (the database stays consistent), and their recipients are sent
/// again. See docs/reliability.md for what each costs.
fn sqlite_synchronous() -> Result<&'static str> {
    match std::env::var("BLAST_SQLITE_SYNCHRONOUS")
        .unwrap_or_default()
        .to_ascii_lowercase()
        .as_str()
    {
        "" | "full" => Ok("FULL"),
        "normal" => Ok("NORMAL"),
        other => Err(Error::config(
            "<environment>",
            "BLAST_SQLITE_SYNCHRONOUS",
            format!("{other:?}: use full or normal"),
        )),
    }
}

/// How long a transient database error is retried before it is fatal.
pub const RETRY_FOR: std::time::Duration = std::time::Duration::from_secs(60);

/// Retries of one database step after transient errors (a restarting
/// server, a dropped connection): 0.1 s doubling to 5 s, for at most
/// [`RETRY_FOR`], each logged. Sending waits meanwhile (the ledger's
/// channel is bounded), and nothing is sent twice for it: a batch that
/// committed before its answer was lost is written again as the same rows.
#[derive(Debug)]
pub struct Backoff {
    what: &'static str,
    started: Option<tokio::time::Instant>,
    wait: std::time::Duration,
    limit: std::time::Duration,
}

impl Backoff {
    /// Retries of `what` (named in the log).
    pub fn new(what: &'static str) -> Backoff {
        Backoff::with_limit(what, RETRY_FOR)
    }

    /// Retries for at most `limit`.
    pub fn with_limit(what: &'static str, limit: std::time::Duration) -> Backoff {
        Backoff {
            what,
            started: None,
            wait: std::time::Duration::from_millis(100),
            limit,
        }
    }

    /// After `e`: waits and returns true if the step should be tried
    /// again; false if `e` is not transient or the time is up.
    pub async fn retry(&mut self, e: &Error) -> bool {
        let now = tokio::time::Instant::now();
        let started = *self.started.get_or_insert(now);
        if !e.is_transient() || now + self.wait > started + self.limit {
            if self.started.is_some() && e.is_transient() {
                tracing::error!(
                    "{}: the database is still failing after {:.0?}: {e}",
                    self.what,
                    now - started
                );
            }
            return false;
        }
        tracing::warn!(
            "{}: {e}; retrying in {:.1?} (for up to {:?})",
            self.what,
            self.wait,
            self.limit
        );
        tokio::time::sleep(self.wait).await;
        self.wait = (self.wait * 2).min(std::time::Duration::from_secs(5));
        true
    }

    /// The step succeeded: logs the recovery if there were retries.
    pub fn succeeded(&mut self) {
        if let Some(started) = self.started.take() {
            tracing::info!(
                "{}: the database answers again after {:.1?}",
                self.what,
                started.elapsed()
            );
            self.wait = std::time::Duration::from_millis(100);
        }
    }
}
