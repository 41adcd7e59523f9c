//! The crate's error type. Library code returns [`Result`]; only `main.rs`
//! converts to `anyhow` for printing. A failure that concerns one recipient is
//! not an [`Error`]: it is an [`Outcome`](crate::model::Outcome) recorded in
//! the ledger, and the campaign goes on.

use std::path::PathBuf;

/// Everything that can stop a blast command.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The campaign file or a flag is invalid; names the file and the key.
    #[error("{file}: {key}: {message}")]
    Config {
        /// The file the bad value came from (or `<command line>`).
        file: String,
        /// The dotted key, e.g. `delivery.concurrency`.
        key: String,
        /// What is wrong with it.
        message: String,
    },
    /// A template failed to compile; the message carries file, line and reason.
    #[error("template {name}: {message}")]
    Template {
        /// The template file (or `message.subject` for inline templates).
        name: String,
        /// Tera's report, including the line.
        message: String,
    },
    /// A file could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The database refused a query or could not be reached.
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
    /// The schema could not be brought up to date.
    #[error("database migration: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// The audience query does not return what blast needs.
    #[error("audience: {0}")]
    Audience(String),
    /// One recipient's message could not be built (`blast preview`; during a
    /// send this is an outcome recorded for that recipient, not an error).
    #[error("recipient {recipient}: {message}")]
    Render {
        /// The recipient's audience id.
        recipient: i64,
        /// What went wrong, naming the template and variable.
        message: String,
    },
    /// A scheduled campaign's stored copy of its file (written by `blast
    /// schedule`) cannot be read back.
    #[error("campaign {campaign:?}: its stored campaign file is unreadable: {message}")]
    StoredSpec {
        /// The campaign name.
        campaign: String,
        /// Why.
        message: String,
    },
    /// No SMTP relay could be reached when the campaign started.
    #[error("SMTP relay {relay} unreachable: {message}")]
    Unreachable {
        /// The relay URL.
        relay: String,
        /// The connection error.
        message: String,
    },
    /// A TLS configuration (trust store, CA file, certificate) is unusable.
    #[error("TLS: {0}")]
    Tls(#[from] crate::tls::TlsError),
    /// A live process already works on the campaign under this worker name
    /// (cron started a run while the last one still sends): nothing to do.
    #[error("campaign {campaign:?} already has a live worker named {worker:?} ({process}); nothing to do. If that process is gone, its name is free within {seconds}s (on this host at once); give another host's worker another --worker name")]
    Busy {
        /// The campaign name.
        campaign: String,
        /// The worker name.
        worker: String,
        /// The live process (`host/pid/nonce`).
        process: String,
        /// Seconds until its lease runs out unless renewed.
        seconds: u64,
    },
    /// The campaign has `max_workers` live workers already: nothing to do.
    #[error(
        "campaign {campaign:?} already has its {max} workers (delivery.max_workers); nothing to do"
    )]
    WorkersFull {
        /// The campaign name.
        campaign: String,
        /// `delivery.max_workers`.
        max: u32,
    },
    /// The campaign is paused, cancelled or held and cannot be sent as is.
    #[error("campaign {campaign:?} is {state}{}: {hint}", reason.as_deref().map(|r| format!(" ({r})")).unwrap_or_default())]
    NotSendable {
        /// The campaign name.
        campaign: String,
        /// Its state.
        state: String,
        /// Why, if recorded.
        reason: Option<String>,
        /// What the operator can do.
        hint: String,
    },
    /// A stop (SIGINT, SIGTERM) came before the run began sending.
    #[error("stopped {0}: nothing was sent; run the command again to continue")]
    Stopped(&'static str),
    /// A campaign name was not found in the ledger.
    #[error("no campaign named {0:?} in this database")]
    UnknownCampaign(String),
    /// Stored state that blast itself wrote is unusable (for example a
    /// damaged signing key), the OS could not provide randomness, or a task
    /// of blast's own panicked.
    #[error("internal: {0}")]
    Internal(String),
    /// A suppression-list or inbound-mail operation was given bad input.
    #[error("{0}")]
    Invalid(String),
    /// A mail store could not be read or updated.
    #[error(transparent)]
    Mailbox(#[from] crate::bounce::mailbox::MailboxError),
    /// A CSV file could not be read at all (not a per-row problem).
    #[error("{file}: {message}")]
    Csv {
        /// The CSV file.
        file: String,
        /// Why it cannot be imported.
        message: String,
    },
}

impl Error {
    /// Shorthand for a [`Error::Config`] error.
    pub fn config(
        file: impl Into<String>,
        key: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        Error::Config {
            file: file.into(),
            key: key.into(),
            message: message.into(),
        }
    }

    /// Shorthand for an [`Error::Io`] error.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    /// A database error that may go away by itself (the server restarting,
    /// a dropped connection, a lock, a serialization conflict): worth
    /// retrying for a while before giving up.
    pub fn is_transient(&self) -> bool {
        matches!(self, Error::Db(e) if transient_sqlx(e))
    }
}

/// Waits for background task `what`; a panic in it becomes an
/// [`Error::Internal`] (and is logged), never silently dropped. A task
/// cancelled on purpose is not an error.
pub async fn joined<T>(what: &str, task: tokio::task::JoinHandle<T>) -> Result<Option<T>> {
    match task.await {
        Ok(v) => Ok(Some(v)),
        Err(e) if e.is_cancelled() => Ok(None),
        Err(e) => {
            tracing::error!("{what} panicked: {e}");
            Err(Error::Internal(format!("{what} panicked: {e}")))
        }
    }
}

/// Whether a database error may go away by itself: connection and I/O
/// failures, a full pool, and the server's own "try again" codes.
pub fn transient_sqlx(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(db) => {
            let code = db.code().unwrap_or_default();
            // PostgreSQL: class 08 (connection exception), 57P01-57P03
            // (shutdown, crash shutdown, cannot connect now), 53300 (too
            // many connections), 40001/40P01 (serialization, deadlock),
            // 25P03/57P05 (the server ended a session idle too long, in a
            // transaction or not: a stalled sender's, see
            // Db::connect_with_stall).
            // SQLite: 5 BUSY, 6 LOCKED and their extended codes.
            code.starts_with("08")
                || matches!(
                    code.as_ref(),
                    "57P01" | "57P02" | "57P03" | "53300" | "40001" | "40P01" | "25P03" | "57P05"
                )
                || matches!(code.as_ref(), "5" | "6" | "261" | "262" | "517")
        }
        _ => false,
    }
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
