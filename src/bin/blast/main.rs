//! The `blast` binary: parse the command line, start logging, call `run`, map
//! the result to an exit code. The subcommand handlers (the CLI edge, the
//! only place anyhow is used) are in `campaigns.rs`, `inbound.rs` and
//! `tools.rs`; what they orchestrate lives in the library.
//!
//! Exit codes: 0 every recipient accepted, 1 some failed or were deferred (or
//! the run was interrupted), 2 fatal error.

use std::process::ExitCode;

use clap::Parser;

use blast::cli::{BounceCommand, Cli, Command};
use blast::commands::Control;
use blast::config::{Config, Overrides};
use blast::progress::Mode;

mod campaigns;
mod inbound;
mod tools;

use campaigns::{
    check, control, list, preview, report_page, resume, run_due, schedule, send, status,
};
use inbound::{bounce_ingest, bounce_parse, reconcile, serve, suppress};
use tools::{import, sink};

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
    let runtime = match runtime(&cli.command) {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("blast: cannot start the async runtime: {e}");
            return ExitCode::from(2);
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        // A run stopped before it began sending exits as any stopped run.
        Err(e) if matches!(e.downcast_ref(), Some(blast::error::Error::Stopped(_))) => {
            eprintln!("blast: {e:#}");
            ExitCode::from(1)
        }
        Err(e) => {
            eprintln!("blast: error: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// The async runtime for `command`. A send's runtime threads only wait on
/// sockets (templates render on blocking threads, SQLite runs on its own):
/// half the cores, at least one, and the other half stay with the render
/// threads and the MTA on the same host. Every runtime thread more is one
/// more thread parking in `epoll_wait` and waking per reply: on 2 cores,
/// two of them cost ~7% more CPU per message than one (docs/tuning.md).
/// `TOKIO_WORKER_THREADS` overrides it; the sink and `serve` keep one per
/// core.
fn runtime(command: &Command) -> std::io::Result<tokio::runtime::Runtime> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all();
    let sends = matches!(
        command,
        Command::Send(_) | Command::Retry(_) | Command::Resume(_) | Command::RunDue(_)
    );
    if sends && std::env::var_os("TOKIO_WORKER_THREADS").is_none() {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        builder.worker_threads((cores / 2).max(1));
    }
    builder.build()
}

/// Runs one subcommand; `Ok` carries the exit code for non-fatal endings.
async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Send(args) => send(args, false).await,
        Command::Preview(args) => preview(args).await,
        Command::Check(args) => check(args).await,
        Command::Status(args) => status(args).await,
        Command::Import(args) => import(args).await,
        Command::Sink(args) => sink(args).await,
        Command::Pause(args) => control(args, Control::Pause).await,
        Command::Cancel(args) => control(args, Control::Cancel).await,
        Command::Resume(args) => resume(args).await,
        Command::Retry(args) => send(args, true).await,
        Command::Schedule(args) => schedule(args).await,
        Command::RunDue(args) => run_due(args).await,
        Command::Report(args) => report_page(args).await,
        Command::List(args) => list(args).await,
        Command::Serve(args) => serve(args).await,
        Command::Suppress { command } => suppress(command).await,
        Command::Reconcile(args) => reconcile(args).await,
        Command::Bounce { command } => match command {
            BounceCommand::Parse(args) => bounce_parse(args),
            BounceCommand::Ingest(args) => bounce_ingest(args).await,
        },
    }
}

fn load(path: &std::path::Path, overrides: Overrides) -> anyhow::Result<Config> {
    Ok(Config::load(path, &overrides)?)
}

/// Tokens cancelled by the first and the second SIGINT/SIGTERM/SIGHUP.
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
        say("blast: second signal: abandoning transactions in flight (they will be sent again)");
        s.cancel();
    });
    (first, second)
}

/// Writes a line to stderr, ignoring a terminal that is gone.
fn say(line: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "{line}");
}

/// Resolves on the first SIGINT, SIGTERM or SIGHUP. A SIGHUP (the SSH
/// session dropped) stops the run like SIGTERM, with every answer flushed
/// to the ledger; the terminal is gone, so stdout and stderr go to
/// /dev/null from then on (a write to a hung-up terminal fails, and a
/// failed `eprintln!` would panic before the flush).
async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut term), Ok(mut hup)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::hangup()),
        ) else {
            let _ = ctrl_c.await;
            return;
        };
        tokio::select! {
            _ = ctrl_c => {},
            _ = term.recv() => {},
            _ = hup.recv() => {
                detach_from_terminal();
                return;
            },
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
    say("blast: stopping: finishing in-flight messages and flushing the ledger");
}

/// Points stdout and stderr at /dev/null (after SIGHUP).
#[cfg(unix)]
fn detach_from_terminal() {
    use std::os::fd::AsRawFd;
    tracing::warn!("SIGHUP: the terminal is gone; stopping the run");
    let Ok(null) = std::fs::OpenOptions::new().write(true).open("/dev/null") else {
        return;
    };
    for fd in [1, 2] {
        // SAFETY: dup2 on two valid descriptors; `null` outlives the call
        // and the duplicate is independent of it.
        unsafe {
            libc::dup2(null.as_raw_fd(), fd);
        }
    }
}

fn progress_mode(s: &str) -> Mode {
    match s {
        "plain" => Mode::Plain,
        "none" => Mode::Quiet,
        _ => Mode::Auto,
    }
}
