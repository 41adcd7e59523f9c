//! The `blast` binary: parse the command line, start logging, call `run`, map
//! the result to an exit code. No logic lives here.
//!
//! Exit codes: 0 every recipient accepted, 1 some failed or were deferred (or
//! the run was interrupted), 2 fatal error.

use std::process::ExitCode;

use anyhow::Context as _;
use clap::Parser;

use blast::cli::{
    BounceCommand, BounceIngestArgs, BounceParseArgs, Cli, Command, ControlArgs, ImportArgs,
    ListArgs, ResumeArgs, RunDueArgs, ScheduleArgs, SendArgs, ServeArgs, SinkArgs, SuppressCommand,
};
use blast::commands::Control;
use blast::config::{Config, Overrides};
use blast::progress::Mode;

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("BLAST_LOG")
                .unwrap_or_else(|_| "warn,blast=info".into()),
        )
        .with_writer(std::io::stderr)
        .with_target(false)
        // Colour only on a terminal: cron mail and Postfix's log get plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("blast: cannot start the async runtime: {e}");
            return ExitCode::from(2);
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("blast: error: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// Runs one subcommand; `Ok` carries the exit code for non-fatal endings.
async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Send(args) => send(args, false).await,
        Command::Preview(args) => {
            let cfg = load(
                &args.campaign.campaign,
                Overrides {
                    database: args.campaign.database,
                    ..Default::default()
                },
            )?;
            let bytes = blast::commands::preview(&cfg, args.id).await?;
            use std::io::Write;
            std::io::stdout()
                .write_all(&bytes)
                .context("writing to stdout")?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Status(args) => {
            let cfg = load(
                &args.campaign.campaign,
                Overrides {
                    database: args.campaign.database,
                    ..Default::default()
                },
            )?;
            let c = blast::commands::status(&cfg).await?;
            if args.json {
                println!("{}", serde_json::to_string(&c)?);
            } else {
                println!(
                    "campaign {}: {}\n  sent        {}\n  failed      {}\n  deferred    {}\n  suppressed  {}\n  pending     {}",
                    c.campaign, c.state, c.sent, c.failed, c.deferred, c.suppressed, c.pending
                );
                println!(
                    "after sending:\n  hard bounces  {}\n  soft bounces  {}\n  complaints    {}\n  unsubscribed  {}",
                    c.bounced_hard, c.bounced_soft, c.complaints, c.unsubscribed
                );
                if let Some(reason) = &c.reason {
                    println!("  reason      {reason}");
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Import(args) => import(args).await,
        Command::Sink(args) => sink(args).await,
        Command::Pause(args) => control(args, Control::Pause).await,
        Command::Cancel(args) => control(args, Control::Cancel).await,
        Command::Resume(args) => resume(args).await,
        Command::Retry(args) => send(args, true).await,
        Command::Schedule(args) => schedule(args).await,
        Command::RunDue(args) => run_due(args).await,
        Command::List(args) => list(args).await,
        Command::Serve(args) => serve(args).await,
        Command::Suppress { command } => suppress(command).await,
        Command::Bounce { command } => match command {
            BounceCommand::Parse(args) => bounce_parse(args),
            BounceCommand::Ingest(args) => bounce_ingest(args).await,
        },
    }
}

fn load(path: &std::path::Path, overrides: Overrides) -> anyhow::Result<Config> {
    Ok(Config::load(path, &overrides)?)
}

async fn send(args: SendArgs, retries_only: bool) -> anyhow::Result<ExitCode> {
    let overrides = Overrides {
        database: args.campaign.database,
        smtp: args.smtp,
        concurrency: args.concurrency,
        rate: args.rate,
        limit: args.limit,
        dry_run: args.dry_run,
        retries_only,
    };
    let cfg = load(&args.campaign.campaign, overrides)?;
    let mode = progress_mode(&args.progress);
    // First SIGINT/SIGTERM: graceful stop. Second: abandon transactions in
    // flight (the ledger still flushes what was answered).
    let (first, second) = signals();
    let summary =
        blast::commands::send_with_abort(&cfg, mode, first.cancelled_owned(), second).await?;
    report(&summary, args.json)
}

/// Tokens cancelled by the first and the second SIGINT/SIGTERM.
fn signals() -> (
    tokio_util::sync::CancellationToken,
    tokio_util::sync::CancellationToken,
) {
    let first = tokio_util::sync::CancellationToken::new();
    let second = tokio_util::sync::CancellationToken::new();
    let (f, s) = (first.clone(), second.clone());
    tokio::spawn(async move {
        shutdown_signal().await;
        f.cancel();
        shutdown_signal().await;
        eprintln!(
            "blast: second signal: abandoning transactions in flight (they will be sent again)"
        );
        s.cancel();
    });
    (first, second)
}

/// Prints the end-of-run summary and picks the exit code.
fn report(summary: &blast::campaign::Summary, json: bool) -> anyhow::Result<ExitCode> {
    if json {
        println!("{}", serde_json::to_string(&summary)?);
    } else {
        eprintln!(
            "blast: {}: sent {} failed {} deferred {} suppressed {} in {:.1}s ({:.0} msg/s){}",
            summary.campaign,
            summary.sent,
            summary.failed,
            summary.deferred,
            summary.suppressed,
            summary.seconds,
            summary.rate,
            if summary.interrupted {
                " - stopped before the end; run again to continue"
            } else {
                ""
            }
        );
        for r in &summary.relays {
            let m = &r.marks;
            eprintln!(
                "blast: {}: {} limit {} (peak {}{}), marks: {} 4xx, {} connection, {} stall, {} queue; circuit opened {} times",
                summary.campaign,
                r.relay,
                r.limit,
                r.peak_limit,
                if r.adaptive { ", auto" } else { ", fixed" },
                m.deferred,
                m.connection,
                m.stall,
                m.queue,
                r.circuit_opened
            );
        }
        if summary.rerouted > 0 {
            eprintln!(
                "blast: {}: {} messages a relay answered with 4xx were sent on to another relay",
                summary.campaign, summary.rerouted
            );
        }
        if summary.possibly_duplicated > 0 {
            eprintln!(
                "blast: {}: {} messages were sent again after a connection was lost after their data: the MTA may have delivered them twice (noted in the ledger)",
                summary.campaign, summary.possibly_duplicated
            );
        }
        if let Some(reason) = &summary.breaker {
            eprintln!("blast: {}: PAUSED by the circuit breaker: {reason}; fix the relay, then `blast resume`", summary.campaign);
        }
    }
    Ok(if summary.all_accepted() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// Resolves on the first SIGINT or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
    eprintln!("blast: stopping: finishing in-flight messages and flushing the ledger");
}

async fn sink(args: SinkArgs) -> anyhow::Result<ExitCode> {
    let mut faults = blast::sink::Faults {
        drop_after: args.drop_after,
        latency: args.latency_ms.map(std::time::Duration::from_millis),
        ..Default::default()
    };
    for r in &args.reject {
        let (text, code) = r
            .rsplit_once('=')
            .context("--reject takes TEXT=CODE, e.g. unknown=550")?;
        let code: u16 = code
            .parse()
            .ok()
            .filter(|c| (400..600).contains(c))
            .context("--reject: CODE must be 4xx or 5xx")?;
        let (enhanced, reason) = if code >= 500 {
            (
                "5.1.1",
                "Recipient address rejected (blast sink fault injection)",
            )
        } else {
            ("4.3.0", "Try again later (blast sink fault injection)")
        };
        faults
            .rcpt_contains
            .push((text.to_string(), code, enhanced.into(), reason.into()));
    }
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => Some(blast::tls::server_config(cert, key)?),
        _ => None,
    };
    let auth = match args.auth_user {
        Some(user) => Some(blast::sink::SinkAuth {
            user,
            password: std::env::var("BLAST_SINK_PASSWORD")
                .context("--auth-user needs the password in BLAST_SINK_PASSWORD")?,
            mechanisms: vec!["PLAIN".into(), "LOGIN".into()],
            login_prompts: ("Username:".into(), "Password:".into()),
        }),
        None => None,
    };
    let config = blast::sink::SinkConfig {
        listen: args.listen,
        maildir: args.maildir,
        pipelining: !args.no_pipelining,
        eight_bit_mime: !args.no_8bitmime,
        chunking: !args.no_chunking,
        faults,
        tls,
        implicit_tls: args.implicit_tls,
        auth,
        ..Default::default()
    };
    let stats = blast::sink::serve(config, shutdown_signal())
        .await
        .with_context(|| format!("sink on {}", args.listen))?;
    eprintln!(
        "blast sink: {} connections, {} messages, {} recipients, {} refused",
        stats.connections, stats.messages, stats.recipients, stats.rejected_rcpts
    );
    Ok(ExitCode::SUCCESS)
}

async fn import(args: ImportArgs) -> anyhow::Result<ExitCode> {
    let db = blast::db::Db::connect(&args.database).await?;
    let opts = blast::import::ImportOptions {
        upsert: args.upsert,
        ..Default::default()
    };
    let mut on_error =
        |e: &blast::import::RowError| eprintln!("blast import: {}: {e}", args.csv.display());
    let mut on_progress = |r: &blast::import::ImportReport| {
        eprintln!(
            "blast import: {} rows read: {} imported, {} updated, {} duplicates, {} invalid",
            r.rows, r.imported, r.updated, r.duplicates, r.invalid
        )
    };
    let report =
        blast::import::import_file(&db, &args.csv, &opts, &mut on_error, &mut on_progress).await?;
    db.close().await;
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    }
    eprintln!(
        "blast import: {}: {} rows: {} imported, {} updated, {} skipped as duplicates, {} invalid",
        args.csv.display(),
        report.rows,
        report.imported,
        report.updated,
        report.duplicates,
        report.invalid
    );
    // Bad rows are reported, not fatal: exit 1 so scripts notice them.
    Ok(if report.invalid + report.duplicates == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// A campaign named by file (database and name from it) or by name.
fn campaign_ref(
    campaign: &str,
    database: Option<String>,
) -> anyhow::Result<(String, String, Option<Config>)> {
    let path = std::path::Path::new(campaign);
    if path.is_file() {
        let cfg = load(
            path,
            Overrides {
                database,
                ..Default::default()
            },
        )?;
        return Ok((cfg.database.clone(), cfg.name.clone(), Some(cfg)));
    }
    let db = database.context(format!(
        "{campaign:?} is not a campaign file; to name a campaign, also give --database (or BLAST_DATABASE)"
    ))?;
    Ok((db, campaign.to_string(), None))
}

async fn control(args: ControlArgs, action: Control) -> anyhow::Result<ExitCode> {
    let (db, name, _) = campaign_ref(&args.campaign, args.database)?;
    let row = blast::commands::control(&db, &name, action, args.reason.as_deref()).await?;
    eprintln!("blast: campaign {}: {}", row.name, row.state);
    Ok(ExitCode::SUCCESS)
}

async fn resume(args: ResumeArgs) -> anyhow::Result<ExitCode> {
    let (db, name, cfg) = campaign_ref(&args.campaign, args.database)?;
    let row = blast::commands::control(&db, &name, Control::Resume, None).await?;
    eprintln!("blast: campaign {}: {}", row.name, row.state);
    match cfg {
        Some(cfg) => {
            let summary = blast::commands::send(&cfg, Mode::Auto, shutdown_signal()).await?;
            report(&summary, args.json)
        }
        None => Ok(ExitCode::SUCCESS),
    }
}

fn progress_mode(s: &str) -> Mode {
    match s {
        "plain" => Mode::Plain,
        "none" => Mode::Quiet,
        _ => Mode::Auto,
    }
}

async fn schedule(args: ScheduleArgs) -> anyhow::Result<ExitCode> {
    let path = args.campaign.campaign;
    let cfg = load(
        &path,
        Overrides {
            database: args.campaign.database,
            ..Default::default()
        },
    )?;
    let at = match (&args.at, cfg.send_at) {
        (Some(at), _) => {
            time::OffsetDateTime::parse(at, &time::format_description::well_known::Rfc3339)
                .with_context(|| format!("--at {at:?}: use RFC 3339, e.g. 2026-12-01T09:00:00Z"))?
        }
        (None, Some(at)) => at,
        (None, None) => anyhow::bail!(
            "no time given: pass --at 2026-12-01T09:00:00Z or set send_at in {}",
            path.display()
        ),
    };
    let row = blast::schedule::schedule(&cfg, &path, at).await?;
    eprintln!(
        "blast: campaign {} scheduled for {} (frozen: later edits to its files do not change it); `blast run-due` sends it",
        row.name,
        blast::clock::db_timestamp(at)
    );
    Ok(ExitCode::SUCCESS)
}

async fn run_due(args: RunDueArgs) -> anyhow::Result<ExitCode> {
    let report = blast::schedule::run_due(
        &args.database,
        progress_mode(&args.progress),
        shutdown_signal(),
    )
    .await?;
    let mut code = ExitCode::SUCCESS;
    for due in &report {
        if args.json {
            println!("{}", serde_json::to_string(due)?);
        }
        match due {
            blast::schedule::Due::Sent { summary, .. } => {
                if report_line(summary) {
                    code = ExitCode::from(1);
                }
            }
            blast::schedule::Due::Held { campaign, reason } => {
                eprintln!("blast: {campaign}: HELD: {reason}");
                code = ExitCode::from(1);
            }
            blast::schedule::Due::Busy { campaign } => {
                eprintln!("blast: {campaign}: being sent by another process; skipped")
            }
            blast::schedule::Due::Failed { campaign, error } => {
                eprintln!("blast: {campaign}: error: {error}");
                code = ExitCode::from(2);
            }
        }
    }
    if report.is_empty() {
        eprintln!("blast: nothing is due");
    }
    Ok(code)
}

/// Prints a summary line; true when not every recipient was accepted.
fn report_line(summary: &blast::campaign::Summary) -> bool {
    eprintln!(
        "blast: {}: sent {} failed {} deferred {} suppressed {} in {:.1}s",
        summary.campaign,
        summary.sent,
        summary.failed,
        summary.deferred,
        summary.suppressed,
        summary.seconds
    );
    !summary.all_accepted()
}

async fn list(args: ListArgs) -> anyhow::Result<ExitCode> {
    let db = blast::db::Db::connect(&args.database).await?;
    let rows = blast::ledger::list(&db).await?;
    db.close().await;
    if args.json {
        println!("{}", serde_json::to_string(&rows)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:<28} {:<10} {:>9} {:>7} {:>8} {:>10}  {:<24} reason",
        "campaign", "state", "sent", "failed", "deferred", "suppressed", "next due"
    );
    for r in rows {
        println!(
            "{:<28} {:<10} {:>9} {:>7} {:>8} {:>10}  {:<24} {}",
            r.campaign,
            r.state,
            r.sent,
            r.failed,
            r.deferred,
            r.suppressed,
            r.next_due.unwrap_or_default(),
            r.reason.unwrap_or_default()
        );
    }
    Ok(ExitCode::SUCCESS)
}

async fn serve(args: ServeArgs) -> anyhow::Result<ExitCode> {
    let db = blast::db::Db::connect(&args.database).await?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    eprintln!(
        "blast serve: listening on http://{}",
        listener.local_addr()?
    );
    blast::serve::run(db.clone(), listener, shutdown_signal()).await?;
    db.close().await;
    Ok(ExitCode::SUCCESS)
}

async fn suppress(command: SuppressCommand) -> anyhow::Result<ExitCode> {
    use blast::suppress;
    match command {
        SuppressCommand::Add {
            addresses,
            reason,
            database,
        } => {
            let db = blast::db::Db::connect(&database).await?;
            for a in &addresses {
                let new = suppress::add(&db, a, &reason, "operator").await?;
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
        }
        SuppressCommand::Remove {
            addresses,
            database,
        } => {
            let db = blast::db::Db::connect(&database).await?;
            let mut missing = 0;
            for a in &addresses {
                let removed = suppress::remove(&db, a).await?;
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
            return Ok(if missing == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            });
        }
        SuppressCommand::List {
            filter,
            limit,
            json,
            database,
        } => {
            let db = blast::db::Db::connect(&database).await?;
            let rows = suppress::list(&db, filter.as_deref(), limit).await?;
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
        }
        SuppressCommand::Import {
            file,
            reason,
            json,
            database,
        } => {
            let db = blast::db::Db::connect(&database).await?;
            let source = format!("import:{}", file.display());
            let summary = if file.as_os_str() == "-" {
                suppress::import(&db, std::io::stdin().lock(), &reason, &source).await?
            } else {
                let f = std::fs::File::open(&file)
                    .with_context(|| format!("cannot open {}", file.display()))?;
                suppress::import(&db, std::io::BufReader::new(f), &reason, &source).await?
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
            if !summary.invalid.is_empty() {
                return Ok(ExitCode::from(1));
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `blast bounce parse`: one line per file; a bad file is reported and skipped (exit 1).
fn bounce_parse(args: BounceParseArgs) -> anyhow::Result<ExitCode> {
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
async fn bounce_ingest(args: BounceIngestArgs) -> anyhow::Result<ExitCode> {
    let stdin = args.stdin;
    match bounce_ingest_run(args).await {
        Err(e) if stdin => {
            eprintln!("blast bounce ingest: {e:#}; exiting 75 (EX_TEMPFAIL) so the MTA retries");
            Ok(ExitCode::from(75))
        }
        r => r,
    }
}

async fn bounce_ingest_run(args: BounceIngestArgs) -> anyhow::Result<ExitCode> {
    use blast::bounce::{ingest, mailbox};
    let soft_window = blast::config::parse_duration(&args.soft_window)
        .map_err(|m| anyhow::anyhow!("--soft-window: {m}"))?;
    let source = match (&args.maildir, &args.mbox) {
        (Some(d), _) => mailbox::Source::Maildir(d.clone()),
        (None, Some(m)) => mailbox::Source::Mbox(m.clone()),
        (None, None) => mailbox::Source::Stdin,
    };
    let inbox = mailbox::Inbox::open(source, args.quarantine.clone())?;
    let db = blast::db::Db::connect(&args.database).await?;
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
