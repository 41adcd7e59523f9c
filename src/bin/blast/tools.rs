//! Tools around campaigns: `blast sink` (a test MTA) and `blast import` (CSV).

use std::process::ExitCode;

use anyhow::Context as _;
use blast::cli::{ImportArgs, SinkArgs};

use super::shutdown_signal;

pub(crate) async fn sink(args: SinkArgs) -> anyhow::Result<ExitCode> {
    let mut faults = blast::sink::Faults {
        drop_after: args.drop_after,
        latency: args.latency_ms.map(std::time::Duration::from_millis),
        load: args.capacity.filter(|&n| n > 0).map(|n| {
            // Every message costs 1/N s of a server shared by all its
            // transactions: n in flight take n/N s each, N a second in all.
            let share = std::time::Duration::from_secs_f64(1.0 / f64::from(n));
            std::sync::Arc::new(blast::sink::load::LoadModel::new(
                blast::sink::load::LoadConfig {
                    base: share,
                    per_in_flight: share,
                    ..Default::default()
                },
            ))
        }),
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

pub(crate) async fn import(args: ImportArgs) -> anyhow::Result<ExitCode> {
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
