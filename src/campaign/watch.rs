//! The run's two background watchers of its relays: the stall watchdog,
//! which marks transactions that hang while they hang, and the optional MTA
//! queue probe, which marks every relay while the MTA's queue is above its
//! target. Both only mark gates; neither sends nor records anything.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::Stats;
use crate::adaptive::{Gate, Mark};
use crate::config::QueueProbe;

/// How often the stall watchdog looks at outstanding transactions.
const WATCH_INTERVAL: Duration = Duration::from_millis(20);

/// The running watchers; [`Watchers::stop`] ends them and waits.
pub(super) struct Watchers {
    done: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
}

impl Watchers {
    /// Starts the watchdog over `gates`, and the queue probe if configured.
    pub(super) fn start(
        gates: &[Arc<Gate>],
        probe: Option<QueueProbe>,
        stats: &Arc<Stats>,
    ) -> Watchers {
        let done = CancellationToken::new();
        let mut tasks = vec![tokio::spawn(watchdog(gates.to_vec(), done.clone()))];
        if let Some(p) = probe {
            tasks.push(tokio::spawn(probe_queue(
                p,
                gates.to_vec(),
                stats.clone(),
                done.clone(),
            )));
        }
        Watchers { done, tasks }
    }

    /// Ends the watchers (once no transaction is left to watch).
    pub(super) async fn stop(self) {
        self.done.cancel();
        for t in self.tasks {
            let _ = crate::error::joined("a relay watcher", t).await;
        }
    }
}

/// Every [`WATCH_INTERVAL`], lets each gate mark its stalled transactions
/// and close its window if due.
async fn watchdog(gates: Vec<Arc<Gate>>, done: CancellationToken) {
    let mut tick = tokio::time::interval(WATCH_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = done.cancelled() => return,
            _ = tick.tick() => gates.iter().for_each(|g| g.watch()),
        }
    }
}

/// Runs the queue probe at most once a second; above its target every relay
/// gets a congestion mark. A failing probe is logged once and retried.
async fn probe_queue(
    probe: QueueProbe,
    gates: Vec<Arc<Gate>>,
    stats: Arc<Stats>,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut warned = false;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let cmd = probe.command.clone();
        let out = tokio::task::spawn_blocking(move || {
            std::process::Command::new("sh")
                .arg("-c")
                .arg(&cmd)
                .output()
        })
        .await;
        let depth = match out {
            Ok(Ok(o)) if o.status.success() => queue_depth(&String::from_utf8_lossy(&o.stdout)),
            other => {
                if !warned {
                    warned = true;
                    tracing::warn!("queue probe {:?} failed: {other:?}", probe.command);
                }
                continue;
            }
        };
        stats.queue.store(depth, Ordering::Relaxed);
        stats.queue_probed.store(true, Ordering::Relaxed);
        stats.queue_max.fetch_max(depth, Ordering::Relaxed);
        if depth > probe.target {
            gates.iter().for_each(|g| g.mark(Mark::Queue));
        }
    }
}

/// A probe's output: a bare number, or one line per queued message.
pub fn queue_depth(out: &str) -> u64 {
    let t = out.trim();
    t.parse()
        .unwrap_or_else(|_| t.lines().filter(|l| !l.trim().is_empty()).count() as u64)
}
