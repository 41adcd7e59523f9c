//! The `blast` binary: parse the command line, start logging, call `run`, map
//! the result to an exit code. No logic lives here.
//!
//! Exit codes: 0 every recipient accepted, 1 some failed or were deferred (or
//! the run was interrupted), 2 fatal error.

use std::process::ExitCode;

use anyhow::Context as _;
use clap::Parser;

use blast::cli::{
    BounceCommand, BounceParseArgs, Cli, Command, ControlArgs, ImportArgs, ListArgs, ResumeArgs,
    RunDueArgs, ScheduleArgs, SendArgs, SinkArgs,
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
        Command::Bounce { command } => match command {
            BounceCommand::Parse(args) => bounce_parse(args),
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
    let config = blast::sink::SinkConfig {
        listen: args.listen,
        maildir: args.maildir,
        pipelining: !args.no_pipelining,
        eight_bit_mime: !args.no_8bitmime,
        chunking: !args.no_chunking,
        faults,
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
