//! Campaign subcommands: send and retry, pause, cancel, resume, schedule,
//! run-due, list, and the end-of-run report with its exit code.

use std::process::ExitCode;

use anyhow::Context as _;
use blast::cli::{ControlArgs, ListArgs, ResumeArgs, RunDueArgs, ScheduleArgs, SendArgs};
use blast::commands::Control;
use blast::config::{Config, Overrides};
use blast::progress::Mode;

use super::{load, progress_mode, shutdown_signal, signals};

/// `blast check`: every relay, as a send would reach it; exit 0 when all
/// of them work, 2 otherwise.
pub(crate) async fn check(args: blast::cli::CheckArgs) -> anyhow::Result<ExitCode> {
    let mut cfg = load(
        &args.campaign,
        Overrides {
            smtp: args.smtp,
            database: args.database,
            ..Default::default()
        },
    )?;
    if args.render {
        // A dry run that keeps no message and never pauses: every
        // recipient is rendered and every error counted.
        cfg.dry_run = Some(std::path::PathBuf::new());
        cfg.render_only = true;
        cfg.delivery.render_pause = 0;
        let summary = blast::commands::send(&cfg, Mode::Auto, shutdown_signal()).await?;
        if args.json {
            println!("{}", serde_json::to_string(&summary)?);
        } else {
            eprintln!(
                "blast: {}: rendered {} messages, {} could not be built, {} invalid addresses, {} suppressed",
                summary.campaign, summary.sent, summary.unrendered, summary.failed, summary.suppressed
            );
            render_errors(&summary);
        }
        return Ok(match summary.unrendered + summary.failed {
            0 => ExitCode::SUCCESS,
            _ => ExitCode::from(1),
        });
    }
    let checks = blast::commands::check(&cfg).await?;
    for c in &checks {
        if args.json {
            println!("{}", serde_json::to_string(c)?);
        } else if c.ok {
            println!("{}: ok in {:.0} ms: {}", c.relay, c.ms, c.detail);
        } else {
            println!("{}: FAILED: {}", c.relay, c.detail);
        }
    }
    Ok(if checks.iter().all(|c| c.ok) {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(2)
    })
}

/// The campaign file with only `--database` overriding it.
fn load_campaign(args: blast::cli::CampaignArgs) -> anyhow::Result<Config> {
    load(
        &args.campaign,
        Overrides {
            database: args.database,
            ..Default::default()
        },
    )
}

/// `blast preview`: one recipient's message on stdout.
pub(crate) async fn preview(args: blast::cli::PreviewArgs) -> anyhow::Result<ExitCode> {
    let cfg = load_campaign(args.campaign)?;
    let bytes = blast::commands::preview(&cfg, args.id).await?;
    use std::io::Write;
    std::io::stdout()
        .write_all(&bytes)
        .context("writing to stdout")?;
    Ok(ExitCode::SUCCESS)
}

/// `blast status`: a campaign's counts, as text or JSON.
pub(crate) async fn status(args: blast::cli::StatusArgs) -> anyhow::Result<ExitCode> {
    let cfg = load_campaign(args.campaign)?;
    if args.by_domain {
        let domains = blast::commands::domains(&cfg.database, &cfg.name).await?;
        if args.json {
            println!("{}", serde_json::to_string(&domains)?);
        } else {
            print!("{}", domain_table(&domains));
        }
        return Ok(ExitCode::SUCCESS);
    }
    let c = blast::commands::status(&cfg).await?;
    if args.json {
        println!("{}", serde_json::to_string(&c)?);
    } else {
        println!(
                "campaign {}: {}\n  sent        {}\n  failed      {}\n  deferred    {}\n  suppressed  {}\n  unrendered  {}\n  pending     {}",
                c.campaign, c.state, c.sent, c.failed, c.deferred, c.suppressed, c.unrendered, c.pending
            );
        println!(
                "after sending:\n  hard bounces  {}\n  soft bounces  {}\n  complaints    {}\n  unsubscribed  {}",
                c.bounced_hard, c.bounced_soft, c.complaints, c.unsubscribed
            );
        if c.reconciled() {
            println!(
                "at the MTA (blast reconcile):\n  delivered     {}\n  bounced       {}\n  expired       {}\n  still queued  {}",
                c.mta_delivered, c.mta_bounced, c.mta_expired, c.mta_deferred
            );
        }
        if let Some(reason) = &c.reason {
            println!("  reason      {reason}");
        }
        if !c.workers.is_empty() {
            println!(
                "workers:\n  {:<20} {:<6} {:>6} {:>10} {:>9} {:>10}  process",
                "name", "alive", "claims", "sent", "msg/s", "heartbeat"
            );
        }
        for w in &c.workers {
            println!(
                "  {:<20} {:<6} {:>6} {:>10} {:>9.0} {:>9.1}s  {}",
                w.name,
                if w.alive { "yes" } else { "no" },
                w.claims,
                w.sent,
                w.rate,
                w.heartbeat_age,
                w.process
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub(crate) async fn send(args: SendArgs, retries_only: bool) -> anyhow::Result<ExitCode> {
    let overrides = Overrides {
        database: args.campaign.database,
        smtp: args.smtp,
        concurrency: args.concurrency,
        rate: args.rate,
        limit: args.limit,
        dry_run: args.dry_run,
        retries_only,
        worker: args.worker,
        metrics: args.metrics,
    };
    let cfg = load(&args.campaign.campaign, overrides)?;
    let mode = progress_mode(&args.progress);
    // First SIGINT/SIGTERM: graceful stop. Second: abandon transactions in
    // flight (the ledger still flushes what was answered).
    let (first, second) = signals();
    let summary =
        match blast::commands::send_with_abort(&cfg, mode, first.cancelled_owned(), second).await {
            Ok(s) => s,
            // Cron started this run while another of the same name still
            // sends, or the campaign has all the workers it may: not an error.
            Err(
                e @ (blast::error::Error::Busy { .. } | blast::error::Error::WorkersFull { .. }),
            ) => {
                eprintln!("blast: {e}");
                return Ok(ExitCode::SUCCESS);
            }
            Err(e) => return Err(e.into()),
        };
    report(&summary, args.json)
}

/// Prints the end-of-run summary and picks the exit code.
pub(crate) fn report(summary: &blast::campaign::Summary, json: bool) -> anyhow::Result<ExitCode> {
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
        render_errors(summary);
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
        if summary.possibly_delivered > 0 {
            eprintln!(
                "blast: {}: {} recipients were given up after every try lost the connection after the message data (failed, \"possibly delivered\"): check the MTA's timeout and milters",
                summary.campaign, summary.possibly_delivered
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

/// A campaign named by file (database and name from it) or by name.
pub(crate) fn campaign_ref(
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

pub(crate) async fn control(args: ControlArgs, action: Control) -> anyhow::Result<ExitCode> {
    let (db, name, _) = campaign_ref(&args.campaign, args.database)?;
    let row = blast::commands::control(&db, &name, action, args.reason.as_deref()).await?;
    eprintln!("blast: campaign {}: {}", row.name, row.state);
    Ok(ExitCode::SUCCESS)
}

pub(crate) async fn resume(args: ResumeArgs) -> anyhow::Result<ExitCode> {
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

pub(crate) async fn schedule(args: ScheduleArgs) -> anyhow::Result<ExitCode> {
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

pub(crate) async fn run_due(args: RunDueArgs) -> anyhow::Result<ExitCode> {
    let mut host = blast::schedule::Host {
        queue_probe: args.queue_probe.filter(|p| !p.trim().is_empty()),
        ..Default::default()
    };
    host.password_envs.extend(args.password_env);
    // Two run-due processes may overlap (cron): the second finds every
    // campaign busy and exits; it must not fail on the port the first holds.
    let endpoint = match args.metrics {
        Some(addr) => {
            match blast::metrics::Endpoint::start(addr, blast::metrics::Metrics::new()).await {
                Ok(e) => Some(e),
                Err(e) => {
                    eprintln!(
                        "blast: {e}; going on without metrics (another run-due serving them?)"
                    );
                    None
                }
            }
        }
        None => None,
    };
    host.metrics = endpoint.as_ref().map(|e| e.metrics.clone());
    let report = blast::schedule::run_due_on(
        &args.database,
        args.worker.as_deref(),
        &host,
        progress_mode(&args.progress),
        shutdown_signal(),
    )
    .await;
    if let Some(e) = endpoint {
        e.stop().await;
    }
    let report = report?;
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
                eprintln!("blast: {campaign}: a live worker of this name sends it, or it has its max_workers; skipped")
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

/// Prints the render errors of a run, most frequent first: the operator's
/// list of what to fix before `blast resume` builds those messages again.
fn render_errors(summary: &blast::campaign::Summary) {
    if summary.unrendered == 0 {
        return;
    }
    eprintln!(
        "blast: {}: {} messages could not be built (not sent; the next run builds them again):",
        summary.campaign, summary.unrendered
    );
    for k in &summary.render_errors {
        eprintln!(
            "blast:   {} recipients, first row {}: {}",
            k.recipients, k.first_recipient, k.error
        );
    }
}

/// Prints a summary line; true when not every recipient was accepted.
pub(crate) fn report_line(summary: &blast::campaign::Summary) -> bool {
    eprintln!(
        "blast: {}: sent {} failed {} deferred {} suppressed {} in {:.1}s",
        summary.campaign,
        summary.sent,
        summary.failed,
        summary.deferred,
        summary.suppressed,
        summary.seconds
    );
    render_errors(summary);
    !summary.all_accepted()
}

pub(crate) async fn list(args: ListArgs) -> anyhow::Result<ExitCode> {
    let db = blast::db::Db::connect(&args.database).await?;
    let rows = blast::ledger::list(&db).await?;
    db.close().await;
    if args.json {
        println!("{}", serde_json::to_string(&rows)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:<28} {:<10} {:>7} {:>9} {:>7} {:>8} {:>10}  {:<24} reason",
        "campaign", "state", "workers", "sent", "failed", "deferred", "suppressed", "next due"
    );
    for r in rows {
        println!(
            "{:<28} {:<10} {:>7} {:>9} {:>7} {:>8} {:>10}  {:<24} {}",
            r.campaign,
            r.state,
            r.workers,
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

/// The domain table of `blast status --by-domain`, columns aligned to the
/// widest domain.
fn domain_table(rows: &[blast::report::DomainRow]) -> String {
    let w = rows
        .iter()
        .map(|d| d.domain.chars().count())
        .max()
        .unwrap_or(0)
        .max(6);
    let mut s = format!(
        "{:<w$}  {:>9} {:>9} {:>9} {:>9} {:>9}\n",
        "domain", "total", "sent", "deferred", "failed", "bounced"
    );
    for d in rows {
        s.push_str(&format!(
            "{:<w$}  {:>9} {:>9} {:>9} {:>9} {:>9}\n",
            d.domain, d.total, d.sent, d.deferred, d.failed, d.bounced
        ));
    }
    s
}

/// `blast report`: the report as JSON on stdout, or an HTML page written to
/// a file whose path is printed.
pub(crate) async fn report_page(args: blast::cli::ReportArgs) -> anyhow::Result<ExitCode> {
    let (db, name, cfg) = campaign_ref(&args.campaign, args.database)?;
    let r = blast::commands::report(&db, &name, cfg.as_ref()).await?;
    if args.json {
        println!("{}", serde_json::to_string(&r)?);
        return Ok(ExitCode::SUCCESS);
    }
    let path = args.html.unwrap_or_else(|| {
        let safe: String = name
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        std::path::PathBuf::from(format!("{safe}-report.html"))
    });
    std::fs::write(&path, blast::report::html::render(&r))
        .with_context(|| format!("writing {}", path.display()))?;
    println!("{}", path.display());
    Ok(ExitCode::SUCCESS)
}
