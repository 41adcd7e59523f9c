//! The inbound side: `blast serve` (one-click unsubscribe), `blast suppress`,
//! `blast bounce parse|ingest` and `blast reconcile`.

use std::path::Path;
use std::process::ExitCode;

use anyhow::Context as _;
use blast::cli::{BounceIngestArgs, BounceParseArgs, ReconcileArgs, ServeArgs, SuppressCommand};

use super::shutdown_signal;

pub(crate) async fn serve(args: ServeArgs) -> anyhow::Result<ExitCode> {
    let db = blast::db::Db::connect(&args.database).await?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    eprintln!(
        "blast serve: listening on http://{}",
        listener.local_addr()?
    );
    let metrics = match args.metrics {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("metrics: cannot listen on {addr}"))?,
        ),
        None => None,
    };
    let opts = blast::serve::Options { metrics };
    blast::serve::run(db.clone(), listener, opts, shutdown_signal()).await?;
    db.close().await;
    Ok(ExitCode::SUCCESS)
}

/// `blast suppress add|remove|list|import`: one function per subcommand.
pub(crate) async fn suppress(command: SuppressCommand) -> anyhow::Result<ExitCode> {
    match command {
        SuppressCommand::Add {
            addresses,
            reason,
            database,
        } => suppress_add(&database, &addresses, &reason).await,
        SuppressCommand::Remove {
            addresses,
            database,
        } => suppress_remove(&database, &addresses).await,
        SuppressCommand::List {
            filter,
            limit,
            json,
            database,
        } => suppress_list(&database, filter.as_deref(), limit, json).await,
        SuppressCommand::Import {
            file,
            reason,
            json,
            database,
        } => suppress_import(&database, &file, &reason, json).await,
    }
}

/// `blast suppress add`: one line per address; always exit 0, since an
/// address already suppressed is where the operator wanted it.
async fn suppress_add(
    database: &str,
    addresses: &[String],
    reason: &str,
) -> anyhow::Result<ExitCode> {
    let db = blast::db::Db::connect(database).await?;
    for a in addresses {
        let new = blast::suppress::add(&db, a, reason, "operator").await?;
        eprintln!(
            "blast suppress: {a}: {}",
            if new {
                "suppressed"
            } else {
                "already suppressed"
            }
        );
    }
    db.close().await;
    Ok(ExitCode::SUCCESS)
}

/// `blast suppress remove`: exit 1 when an address was not suppressed, so
/// a script notices a typo.
async fn suppress_remove(database: &str, addresses: &[String]) -> anyhow::Result<ExitCode> {
    let db = blast::db::Db::connect(database).await?;
    let mut missing = 0;
    for a in addresses {
        let removed = blast::suppress::remove(&db, a).await?;
        missing += usize::from(!removed);
        eprintln!(
            "blast suppress: {a}: {}",
            if removed {
                "removed"
            } else {
                "was not suppressed"
            }
        );
    }
    db.close().await;
    Ok(if missing == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// `blast suppress list`: tab-separated lines, or one JSON object a line.
async fn suppress_list(
    database: &str,
    filter: Option<&str>,
    limit: Option<u64>,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let db = blast::db::Db::connect(database).await?;
    let rows = blast::suppress::list(&db, filter, limit).await?;
    db.close().await;
    for r in rows {
        if json {
            println!("{}", serde_json::to_string(&r)?);
        } else {
            println!(
                "{}\t{}\t{}\t{}",
                r.address, r.reason, r.source, r.created_at
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `blast suppress import FILE` (`-` for stdin): bad lines are reported and
/// exit 1, the good ones are imported anyway.
async fn suppress_import(
    database: &str,
    file: &Path,
    reason: &str,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let db = blast::db::Db::connect(database).await?;
    let source = format!("import:{}", file.display());
    let summary = if file.as_os_str() == "-" {
        blast::suppress::import(&db, std::io::stdin().lock(), reason, &source).await?
    } else {
        let f =
            std::fs::File::open(file).with_context(|| format!("cannot open {}", file.display()))?;
        blast::suppress::import(&db, std::io::BufReader::new(f), reason, &source).await?
    };
    db.close().await;
    for bad in &summary.invalid {
        eprintln!("blast suppress import: {}: {bad}", file.display());
    }
    if json {
        println!("{}", serde_json::to_string(&summary)?);
    }
    eprintln!(
        "blast suppress import: {}: {} suppressed, {} already suppressed, {} invalid",
        file.display(),
        summary.added,
        summary.already,
        summary.invalid.len()
    );
    Ok(if summary.invalid.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// `blast bounce parse`: one line per file; a bad file is reported and skipped (exit 1).
pub(crate) fn bounce_parse(args: BounceParseArgs) -> anyhow::Result<ExitCode> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let mut failed = false;
    for path in &args.files {
        let file = path.display().to_string();
        let result = blast::bounce::parse::parse_file(path);
        match (&result, args.json) {
            (Ok(r), true) => writeln!(
                out,
                "{}",
                serde_json::json!({"file": file, "kind": r.kind, "results": r.results})
            )?,
            (Ok(r), false) => {
                if r.results.is_empty() {
                    writeln!(out, "{file}: {:?}", r.kind)?;
                }
                for f in &r.results {
                    writeln!(out, "{file}: {:?} {f}", r.kind)?;
                }
            }
            (Err(e), true) => writeln!(
                out,
                "{}",
                serde_json::json!({"file": file, "error": e.to_string()})
            )?,
            (Err(e), false) => writeln!(out, "{file}: error: {e}")?,
        }
        failed |= result.is_err();
    }
    Ok(if failed {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

/// `blast bounce ingest`. Reading stdin (from an MTA), any failure exits 75
/// (EX_TEMPFAIL) so the MTA keeps the message and tries again later.
pub(crate) async fn bounce_ingest(args: BounceIngestArgs) -> anyhow::Result<ExitCode> {
    let stdin = args.stdin;
    match bounce_ingest_run(args).await {
        Err(e) if stdin => {
            eprintln!("blast bounce ingest: {e:#}; exiting 75 (EX_TEMPFAIL) so the MTA retries");
            Ok(ExitCode::from(75))
        }
        r => r,
    }
}

/// The database URL in `file`: its first line, trimmed.
fn database_from_file(file: &Path) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(file)
        .with_context(|| format!("--database-file {}", file.display()))?;
    let url = text.lines().next().unwrap_or_default().trim().to_string();
    anyhow::ensure!(
        !url.is_empty(),
        "--database-file {}: the file is empty",
        file.display()
    );
    Ok(url)
}

pub(crate) async fn bounce_ingest_run(args: BounceIngestArgs) -> anyhow::Result<ExitCode> {
    use blast::bounce::{ingest, mailbox};
    let soft_window = blast::config::parse_duration(&args.soft_window)
        .map_err(|m| anyhow::anyhow!("--soft-window: {m}"))?;
    let source = match (&args.maildir, &args.mbox) {
        (Some(d), _) => mailbox::Source::Maildir(d.clone()),
        (None, Some(m)) => mailbox::Source::Mbox(m.clone()),
        (None, None) => mailbox::Source::Stdin,
    };
    let inbox = mailbox::Inbox::open(source, args.quarantine.clone())?;
    let database = match (&args.database, &args.database_file) {
        (_, Some(file)) => database_from_file(file)?,
        (Some(url), None) => url.clone(),
        (None, None) => anyhow::bail!("give --database URL or --database-file FILE"),
    };
    let db = blast::db::Db::connect(&database).await?;
    let policy = ingest::Policy {
        soft_limit: args.soft_limit,
        soft_window,
        trust_unsigned: args.trust_unsigned,
    };
    let ingestor = ingest::Ingestor::new(db.clone(), policy)
        .await?
        .with_recipients(args.recipient.clone());
    let line = |s: &ingest::IngestSummary| {
        format!(
            "{} messages: {} hard, {} soft, {} complaints, {} notices, {} unsubscribes, \
             {} suppressed, {} quarantined, {} seen before",
            s.messages,
            s.hard,
            s.soft,
            s.complaints,
            s.notices,
            s.unsubscribes,
            s.suppressed,
            s.quarantined,
            s.duplicates
        )
    };
    // A plain line every 2 s: readable on a terminal and in cron mail alike.
    let mut last = std::time::Instant::now();
    let result = ingest::run(ingestor, inbox, |s| {
        if last.elapsed() >= std::time::Duration::from_secs(2) {
            last = std::time::Instant::now();
            eprintln!("blast bounce ingest: {}", line(s));
        }
    })
    .await;
    db.close().await;
    let (summary, mailbox) = result?;
    for q in &mailbox.quarantined {
        eprintln!(
            "blast bounce ingest: quarantined {} ({}) -> {}",
            q.id,
            q.reason,
            q.location.display()
        );
    }
    if args.json {
        println!("{}", serde_json::to_string(&summary)?);
    }
    eprintln!("blast bounce ingest: {}", line(&summary));
    Ok(if summary.unreadable == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// `blast reconcile`: a plain progress line every 10 s on stderr while it
/// reads (terminal, cron mail and journal alike), the summary at the end
/// (JSON on stdout with --json). Exit 0 whatever the log held: malformed
/// and unrelated lines are counted, not fatal.
pub(crate) async fn reconcile(args: ReconcileArgs) -> anyhow::Result<ExitCode> {
    use blast::reconcile::{self, Input, Summary};
    let input = if args.maillog.as_os_str() == "-" {
        anyhow::ensure!(!args.follow, "--follow needs a file, not stdin");
        Input::Stdin
    } else {
        Input::File(args.maillog.clone())
    };
    let db = blast::db::Db::connect(&args.database).await?;
    let stop = tokio_util::sync::CancellationToken::new();
    tokio::spawn({
        let stop = stop.clone();
        async move {
            shutdown_signal().await;
            stop.cancel();
        }
    });
    let line = |s: &Summary| {
        format!(
            "{} lines, {} malformed, {} unrelated; {} delivered, {} bounced, {} expired, \
             {} deferred; {} suppressed, {} rows updated",
            s.lines,
            s.malformed,
            s.unrelated,
            s.delivered,
            s.bounced,
            s.expired,
            s.deferred,
            s.suppressed,
            s.updated
        )
    };
    let mut last = std::time::Instant::now();
    let result = reconcile::run(db.clone(), input, args.follow, stop, |s| {
        if last.elapsed() >= std::time::Duration::from_secs(10) {
            last = std::time::Instant::now();
            super::say(&format!("blast reconcile: {}", line(s)));
        }
    })
    .await;
    db.close().await;
    let summary = result.with_context(|| format!("reconciling {}", args.maillog.display()))?;
    if args.json {
        println!("{}", serde_json::to_string(&summary)?);
    }
    super::say(&format!("blast reconcile: {}", line(&summary)));
    Ok(ExitCode::SUCCESS)
}
