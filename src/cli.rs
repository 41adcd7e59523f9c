//! Command-line syntax (clap derive). Raw input only: no I/O, no validation
//! beyond types; `config.rs` turns these into a validated `Config`.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// blast: personalized mass mail from SQL into your MTA, fast, without losing
/// or doubling a message.
#[derive(Debug, Parser)]
#[command(name = "blast", version, about, propagate_version = true)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Send a campaign (continues where a stopped run left off).
    Send(SendArgs),
    /// Print one recipient's fully rendered message.
    Preview(PreviewArgs),
    /// Connect to every relay as a send would (TLS, AUTH) and report what
    /// each offers; sends nothing.
    Check(CheckArgs),
    /// Show a campaign's counts per outcome.
    Status(StatusArgs),
    /// Load subscribers from a CSV file into the `subscribers` table.
    Import(ImportArgs),
    /// Run the built-in SMTP sink (for demos, tests and benchmarks).
    Sink(SinkArgs),
    /// Pause a campaign (a running sender stops within a second).
    Pause(ControlArgs),
    /// Clear a pause (or a hold) and, given a campaign file, send the rest.
    Resume(ResumeArgs),
    /// Cancel a campaign for good (a running sender stops within a second).
    Cancel(ControlArgs),
    /// Send only the deferred recipients whose next attempt is due.
    Retry(SendArgs),
    /// Store a campaign (file and templates) to be sent later by `run-due`.
    Schedule(ScheduleArgs),
    /// Send every stored campaign that is due, then exit (for cron/systemd).
    RunDue(RunDueArgs),
    /// Sum up a campaign's ledger: JSON, or a self-contained HTML page.
    Report(ReportArgs),
    /// Show campaigns with state, counts and next due time.
    List(ListArgs),
    /// Answer one-click unsubscribes (RFC 8058) over HTTP.
    Serve(ServeArgs),
    /// Manage the suppression list (addresses that get nothing more).
    Suppress {
        /// What to do.
        #[command(subcommand)]
        command: SuppressCommand,
    },
    /// Read the MTA's log (Postfix) into the ledger: each recipient's final
    /// delivery at the next hop; hard bounces suppress the address.
    Reconcile(ReconcileArgs),
    /// Read returned mail (bounces, complaints, auto-replies).
    Bounce {
        /// What to do with it.
        #[command(subcommand)]
        command: BounceCommand,
    },
}

/// `blast bounce ...`
#[derive(Debug, Subcommand)]
pub enum BounceCommand {
    /// Parse .eml files and print what each says (one line per file with --json).
    Parse(BounceParseArgs),
    /// Record bounces, complaints and unsubscribe mails from a Maildir, an mbox or stdin.
    Ingest(BounceIngestArgs),
}

/// `blast bounce ingest`
#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("input").required(true).args(["maildir", "mbox", "stdin"])))]
pub struct BounceIngestArgs {
    /// Read this Maildir: processed mail moves to cur/ marked seen.
    #[arg(long)]
    pub maildir: Option<PathBuf>,
    /// Read this mbox (not modified; rotate it first).
    #[arg(long)]
    pub mbox: Option<PathBuf>,
    /// Read one message from stdin (Postfix pipe transport or alias); needs --quarantine.
    #[arg(long, requires = "quarantine")]
    pub stdin: bool,
    /// Where unusable mail goes: a Maildir (default: the Maildir's .Quarantine
    /// folder; for --mbox, FILE.quarantine; --stdin needs it).
    #[arg(long)]
    pub quarantine: Option<PathBuf>,
    /// Envelope recipient given by the MTA, e.g. Postfix's ${original_recipient} (repeatable).
    #[arg(long)]
    pub recipient: Vec<String>,
    /// Soft bounces within --soft-window that suppress an address (0 = never).
    #[arg(long, default_value_t = 3)]
    pub soft_limit: u32,
    /// Window for --soft-limit (e.g. 14d, 72h).
    #[arg(long, default_value = "14d")]
    pub soft_window: String,
    /// Let bounces without a valid blast signature suppress too (campaigns sent without VERP).
    #[arg(long)]
    pub trust_unsigned: bool,
    /// Print the summary as JSON on stdout.
    #[arg(long)]
    pub json: bool,
    /// Database URL.
    #[arg(
        long,
        env = "BLAST_DATABASE",
        required_unless_present = "database_file"
    )]
    pub database: Option<String>,
    /// Read the database URL from this file (its first line), so that a
    /// password appears neither on the command line (`ps`) nor in the MTA's
    /// configuration. Postfix's pipe uses it.
    #[arg(long, value_name = "FILE", conflicts_with = "database")]
    pub database_file: Option<PathBuf>,
}

/// `blast bounce parse`
#[derive(Debug, Args)]
pub struct BounceParseArgs {
    /// The mail files (one message each, raw RFC 5322).
    #[arg(required = true)]
    pub files: Vec<PathBuf>,
    /// Print one JSON object per file on stdout.
    #[arg(long)]
    pub json: bool,
}

/// `blast reconcile`
#[derive(Debug, Args)]
pub struct ReconcileArgs {
    /// Postfix's log: a file (syslog's mail.log, or Postfix's own
    /// maillog_file), or `-` for stdin.
    #[arg(long, value_name = "FILE|-")]
    pub maillog: PathBuf,
    /// Keep reading as the file grows and across rotation, until
    /// SIGINT/SIGTERM.
    #[arg(long)]
    pub follow: bool,
    /// Print the summary as JSON on stdout.
    #[arg(long)]
    pub json: bool,
    /// Database URL.
    #[arg(long, env = "BLAST_DATABASE")]
    pub database: String,
}

/// `blast serve`
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Address to listen on (put a TLS-terminating proxy in front).
    #[arg(long, default_value = "127.0.0.1:8025")]
    pub listen: SocketAddr,
    /// Serve `/metrics` on this address instead of on `--listen` (keep the
    /// figures off the public listener).
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<SocketAddr>,
    /// Database URL.
    #[arg(long, env = "BLAST_DATABASE")]
    pub database: String,
}

/// `blast suppress ...`
#[derive(Debug, Subcommand)]
pub enum SuppressCommand {
    /// Suppress addresses.
    Add {
        /// The addresses.
        #[arg(required = true)]
        addresses: Vec<String>,
        /// Why (shown by `list`).
        #[arg(long, default_value = "operator")]
        reason: String,
        /// Database URL.
        #[arg(long, env = "BLAST_DATABASE")]
        database: String,
    },
    /// Lift the suppression of addresses.
    Remove {
        /// The addresses.
        #[arg(required = true)]
        addresses: Vec<String>,
        /// Database URL.
        #[arg(long, env = "BLAST_DATABASE")]
        database: String,
    },
    /// List suppressed addresses.
    List {
        /// Only entries whose reason or source starts with this.
        #[arg(long)]
        filter: Option<String>,
        /// At most this many.
        #[arg(long)]
        limit: Option<u64>,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
        /// Database URL.
        #[arg(long, env = "BLAST_DATABASE")]
        database: String,
    },
    /// Suppress every address in a file (one per line, or a CSV's first column; `-` for stdin).
    Import {
        /// The file.
        file: PathBuf,
        /// Why (shown by `list`).
        #[arg(long, default_value = "imported")]
        reason: String,
        /// Print the summary as JSON on stdout.
        #[arg(long)]
        json: bool,
        /// Database URL.
        #[arg(long, env = "BLAST_DATABASE")]
        database: String,
    },
}

/// `blast schedule`
#[derive(Debug, Args)]
pub struct ScheduleArgs {
    #[command(flatten)]
    pub campaign: CampaignArgs,
    /// When to send (RFC 3339, e.g. 2026-12-01T09:00:00Z); default: `send_at` in the file.
    #[arg(long)]
    pub at: Option<String>,
}

/// `blast run-due`
#[derive(Debug, Args)]
pub struct RunDueArgs {
    /// Database URL.
    #[arg(long, env = "BLAST_DATABASE")]
    pub database: String,
    /// This process's name among each campaign's workers (default: the
    /// host name). A second process with a live name skips the campaign.
    #[arg(long, env = "BLAST_WORKER")]
    pub worker: Option<String>,
    /// The MTA queue probe for every stored campaign (e.g. "postqueue -j"),
    /// run with `sh -c`. A stored campaign's own `queue_probe` is ignored:
    /// commands come from this host, not from the database.
    #[arg(long, env = "BLAST_QUEUE_PROBE", value_name = "COMMAND")]
    pub queue_probe: Option<String>,
    /// An environment variable a stored relay may name as its
    /// `password_env` (repeatable); BLAST_SMTP_PASSWORD always may.
    #[arg(long = "password-env", value_name = "VAR")]
    pub password_env: Vec<String>,
    /// Serve Prometheus metrics of every campaign it sends at
    /// http://ADDR/metrics (e.g. 127.0.0.1:9464).
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<SocketAddr>,
    /// Print one JSON object per campaign on stdout.
    #[arg(long)]
    pub json: bool,
    /// Progress display: auto, plain, none.
    #[arg(long, default_value = "auto", value_parser = ["auto", "plain", "none"])]
    pub progress: String,
}

/// `blast list`
#[derive(Debug, Args)]
pub struct ListArgs {
    /// Database URL.
    #[arg(long, env = "BLAST_DATABASE")]
    pub database: String,
    /// Print as JSON.
    #[arg(long)]
    pub json: bool,
}

/// `blast pause|cancel`
#[derive(Debug, Args)]
pub struct ControlArgs {
    /// A campaign file, or a campaign name (then --database is needed).
    pub campaign: String,
    /// Database URL (default: the campaign file's).
    #[arg(long, env = "BLAST_DATABASE")]
    pub database: Option<String>,
    /// Why (shown by `blast status`).
    #[arg(long)]
    pub reason: Option<String>,
}

/// `blast resume`
#[derive(Debug, Args)]
pub struct ResumeArgs {
    /// A campaign file (resumed and sent), or a campaign name (resumed only).
    pub campaign: String,
    /// Database URL (default: the campaign file's).
    #[arg(long, env = "BLAST_DATABASE")]
    pub database: Option<String>,
    /// Print the summary as one JSON object on stdout.
    #[arg(long)]
    pub json: bool,
}

/// Overrides shared by commands that read a campaign file.
#[derive(Debug, Args)]
pub struct CampaignArgs {
    /// The campaign file.
    pub campaign: PathBuf,
    /// Database URL, overriding `database` in the file.
    #[arg(long, env = "BLAST_DATABASE")]
    pub database: Option<String>,
}

/// `blast send`
#[derive(Debug, Args)]
pub struct SendArgs {
    #[command(flatten)]
    pub campaign: CampaignArgs,
    /// SMTP relay URL(s), overriding `delivery.smtp` (repeat for several).
    #[arg(long)]
    pub smtp: Vec<String>,
    /// Transactions in flight per relay: `auto` (find it), `auto:MAX`, or a
    /// number of connections over all relays.
    #[arg(long, value_parser = crate::config::Concurrency::parse)]
    pub concurrency: Option<crate::config::Concurrency>,
    /// Max messages per second (0 = unlimited).
    #[arg(long)]
    pub rate: Option<u32>,
    /// Send to the first N pending recipients only.
    #[arg(long)]
    pub limit: Option<u64>,
    /// This process's name among the campaign's workers (default: the host
    /// name). Workers with different names share a running campaign; a
    /// second process with a live name exits at once with nothing to do.
    #[arg(long, env = "BLAST_WORKER")]
    pub worker: Option<String>,
    /// Render and write .eml files into DIR instead of sending (default
    /// `./blast-dry-run/<campaign>`); records nothing in the ledger.
    #[arg(long, value_name = "DIR", num_args = 0..=1, default_missing_value = "")]
    pub dry_run: Option<PathBuf>,
    /// Serve Prometheus metrics at http://ADDR/metrics while sending
    /// (e.g. 127.0.0.1:9464), overriding `delivery.metrics`.
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<SocketAddr>,
    /// Print the summary as one JSON object on stdout.
    #[arg(long)]
    pub json: bool,
    /// Progress display: auto (bar on a terminal, lines otherwise), plain, none.
    #[arg(long, default_value = "auto", value_parser = ["auto", "plain", "none"])]
    pub progress: String,
}

/// `blast check`
#[derive(Debug, Args)]
pub struct CheckArgs {
    /// The campaign file.
    pub campaign: PathBuf,
    /// Render every recipient's message instead of checking the relays:
    /// nothing is sent or recorded; prints how many failed and why (exit 1
    /// if any did).
    #[arg(long)]
    pub render: bool,
    /// The database URL, overriding the campaign's.
    #[arg(long, env = "BLAST_DATABASE")]
    pub database: Option<String>,
    /// SMTP relay URL(s), overriding `delivery.smtp` (repeat for several).
    #[arg(long)]
    pub smtp: Vec<String>,
    /// Print one JSON object per relay.
    #[arg(long)]
    pub json: bool,
}

/// `blast preview`
#[derive(Debug, Args)]
pub struct PreviewArgs {
    #[command(flatten)]
    pub campaign: CampaignArgs,
    /// The recipient id (default: the first recipient of the audience).
    #[arg(long)]
    pub id: Option<i64>,
}

/// `blast status`
#[derive(Debug, Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub campaign: CampaignArgs,
    /// Print as JSON.
    #[arg(long)]
    pub json: bool,
    /// Show outcomes by destination domain (the 20 largest) instead.
    #[arg(long)]
    pub by_domain: bool,
}

/// `blast report`
#[derive(Debug, Args)]
pub struct ReportArgs {
    /// A campaign file, or a campaign name (then --database is needed).
    pub campaign: String,
    /// Database URL (default: the campaign file's).
    #[arg(long, env = "BLAST_DATABASE")]
    pub database: Option<String>,
    /// Where to write the HTML page (default: `<campaign>-report.html` here).
    #[arg(long)]
    pub html: Option<PathBuf>,
    /// Print the report as one JSON object on stdout instead.
    #[arg(long, conflicts_with = "html")]
    pub json: bool,
}

/// `blast import`
#[derive(Debug, Args)]
pub struct ImportArgs {
    /// The CSV file (header row required, with an `email` column).
    pub csv: PathBuf,
    /// Database URL.
    #[arg(long, env = "BLAST_DATABASE")]
    pub database: String,
    /// Replace the attributes of addresses already in the table.
    #[arg(long)]
    pub upsert: bool,
    /// Print the summary as JSON on stdout.
    #[arg(long)]
    pub json: bool,
}

/// `blast sink`
#[derive(Debug, Args)]
pub struct SinkArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:2525")]
    pub listen: SocketAddr,
    /// Write every accepted message into this Maildir.
    #[arg(long)]
    pub maildir: Option<PathBuf>,
    /// Do not advertise PIPELINING.
    #[arg(long)]
    pub no_pipelining: bool,
    /// Do not advertise 8BITMIME.
    #[arg(long)]
    pub no_8bitmime: bool,
    /// Do not advertise CHUNKING (BDAT).
    #[arg(long)]
    pub no_chunking: bool,
    /// Refuse RCPTs containing TEXT with CODE: `TEXT=550` or `TEXT=451` (repeatable).
    #[arg(long, value_name = "TEXT=CODE")]
    pub reject: Vec<String>,
    /// Fault: close each connection when its Nth message ends, without
    /// answering it (the client cannot know whether it was accepted).
    #[arg(long)]
    pub drop_after: Option<u64>,
    /// Wait this many milliseconds before answering each message.
    #[arg(long)]
    pub latency_ms: Option<u64>,
    /// Take at most N messages a second in all, however many connections
    /// send (an MTA whose CPU or disk is the limit): each message waits
    /// its share of the time. For scale-out benchmarks.
    #[arg(long, value_name = "N")]
    pub capacity: Option<u32>,
    /// Offer STARTTLS with this PEM certificate chain (needs --tls-key).
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The PEM private key of --tls-cert.
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Speak TLS from the first byte (smtps://) instead of offering STARTTLS.
    #[arg(long, requires = "tls_cert")]
    pub implicit_tls: bool,
    /// Require AUTH (PLAIN or LOGIN) as this user; the password is read from
    /// BLAST_SINK_PASSWORD.
    #[arg(long)]
    pub auth_user: Option<String>,
}
