//! What the operator sees while a campaign runs: an indicatif bar on a
//! terminal, a plain log line every few seconds otherwise (cron, systemd).
//! It only reads the runner's [`Stats`]; it is not on the send path.

use std::io::IsTerminal;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::campaign::Stats;

/// Interval between plain progress lines when not on a terminal.
pub const PLAIN_EVERY: Duration = Duration::from_secs(5);

/// How to show progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// A bar if stderr is a terminal, plain lines otherwise.
    Auto,
    /// Plain lines.
    Plain,
    /// Nothing (tests, `--json` without a terminal still gets the summary).
    Quiet,
}

/// A running progress display.
pub struct Progress {
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl Progress {
    /// Starts showing `stats` for campaign `name`.
    pub fn start(name: &str, stats: Arc<Stats>, mode: Mode) -> Progress {
        let stop = CancellationToken::new();
        let bar = mode == Mode::Auto && std::io::stderr().is_terminal();
        let task = match mode {
            Mode::Quiet => tokio::spawn(async {}),
            _ if bar => tokio::spawn(show_bar(name.to_string(), stats, stop.clone())),
            _ => tokio::spawn(show_lines(name.to_string(), stats, stop.clone())),
        };
        Progress { stop, task }
    }

    /// Stops the display (the bar is cleared; the caller prints the summary).
    pub async fn finish(self) {
        self.stop.cancel();
        let _ = crate::error::joined("the progress display", self.task).await;
    }
}

/// Each relay's limit and marks: `limit 12 marks 3` for one relay,
/// `limits 12/8 marks 3/0` for several.
fn limits(stats: &Stats) -> String {
    let Some(relays) = stats.relays.get() else {
        return String::new();
    };
    let snaps: Vec<_> = relays.iter().map(|r| r.gate.snapshot()).collect();
    let join = |f: &dyn Fn(&crate::adaptive::Aimd) -> String| {
        snaps.iter().map(f).collect::<Vec<_>>().join("/")
    };
    let mut out = format!(
        "limit{} {} marks {}",
        if snaps.len() > 1 { "s" } else { "" },
        join(&|a| a.limit().to_string()),
        join(&|a| a.marks().total().to_string())
    );
    let queue = stats.queue_max.load(Ordering::Relaxed);
    if queue > 0 {
        out.push_str(&format!(
            " mta_queue {}",
            stats.queue.load(Ordering::Relaxed)
        ));
    }
    out
}

/// The whole campaign when several workers share it: `campaign: 3
/// workers, 12000 left at 4500/s, eta 3s` (empty for a lone worker).
fn campaign(stats: &Stats, sep: char) -> String {
    let Some(v) = stats.campaign_view() else {
        return String::new();
    };
    let eta = if v.rate > 0.0 {
        format!("{}s", (v.left as f64 / v.rate).round())
    } else {
        "?".into()
    };
    match sep {
        '=' => format!(
            " campaign_workers={} campaign_left={} campaign_rate={:.0}/s campaign_eta={eta}",
            v.workers, v.left, v.rate
        ),
        _ => format!(
            " | campaign: {} workers, {} left at {:.0}/s, eta {eta}",
            v.workers, v.left, v.rate
        ),
    }
}

/// One status line's numbers.
fn counts(stats: &Stats) -> (u64, u64, u64, u64) {
    (
        stats.sent.load(Ordering::Relaxed),
        stats.failed.load(Ordering::Relaxed),
        stats.deferred.load(Ordering::Relaxed),
        stats.retries.load(Ordering::Relaxed),
    )
}

async fn show_bar(name: String, stats: Arc<Stats>, stop: CancellationToken) {
    let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr_with_hz(5));
    let style = ProgressStyle::with_template(
        "{prefix} [{elapsed_precise}] {wide_bar:.cyan/blue} {pos}/{len} {per_sec} ETA {eta} {msg}",
    )
    .unwrap_or_else(|_| ProgressStyle::default_bar());
    bar.set_style(style.progress_chars("=> "));
    bar.set_prefix(name);
    loop {
        let total = stats.total.load(Ordering::Relaxed);
        if total > 0 && bar.length() != Some(total) {
            bar.set_length(total);
        }
        let (sent, failed, deferred, retries) = counts(&stats);
        bar.set_position(sent + failed + deferred);
        let lat = stats.latency_summary();
        let mut msg = format!(
            "sent {sent} failed {failed} deferred {deferred} smtp p50 {:.1}ms p99 {:.1}ms {}",
            lat.p50,
            lat.p99,
            limits(&stats)
        );
        if retries > 0 {
            msg.push_str(&format!(" reconnects {retries}"));
        }
        msg.push_str(&campaign(&stats, ' '));
        bar.set_message(msg);
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
    }
    bar.finish_and_clear();
}

async fn show_lines(name: String, stats: Arc<Stats>, stop: CancellationToken) {
    let start = Instant::now();
    let mut last = (Instant::now(), 0u64);
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tokio::time::sleep(PLAIN_EVERY) => {}
        }
        let (sent, failed, deferred, retries) = counts(&stats);
        let done = sent + failed + deferred;
        let rate = (done - last.1) as f64 / last.0.elapsed().as_secs_f64().max(1e-9);
        last = (Instant::now(), done);
        let total = stats.total.load(Ordering::Relaxed);
        let eta = if total > done && rate > 0.0 {
            format!(" eta {}s", ((total - done) as f64 / rate).round())
        } else {
            String::new()
        };
        let lat = stats.latency_summary();
        eprintln!(
            "blast: {name}: {done}/{total} sent={sent} failed={failed} deferred={deferred} reconnects={retries} rate={rate:.0}/s smtp_p50={:.1}ms smtp_p99={:.1}ms {} elapsed={}s{eta}{}",
            lat.p50,
            lat.p99,
            limits(&stats).replacen(' ', "=", 1).replace(" marks ", " marks="),
            start.elapsed().as_secs(),
            campaign(&stats, '=')
        );
    }
}
