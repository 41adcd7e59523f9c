//! The runner's live counters (read by the progress display) and the
//! end-of-run summary built from them.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::{Breaker, RunOptions};
use crate::adaptive::Gate;
use crate::config::Concurrency;
use crate::ledger::Flushes;
use crate::measure::Histogram;
use crate::model::Outcome;

/// Live counters, shared with the progress display.
#[derive(Debug)]
pub struct Stats {
    /// When the command started (for the time to the first message).
    pub started: Instant,
    /// Microseconds from `started` to the first outcome (0 = none yet).
    pub first_outcome_us: AtomicU64,
    /// SMTP transaction latency over all injectors.
    pub latency: Histogram,
    /// Time to build each message (templates and MIME), microseconds.
    pub render: Histogram,
    /// The ledger writer's batches: time to store, rows.
    pub flushes: Flushes,
    /// Per-injector counters, indexed by slot.
    pub injectors: Vec<InjectorStats>,
    /// Accepted by the MTA.
    pub sent: AtomicU64,
    /// Refused for good (5xx, bad address, render error).
    pub failed: AtomicU64,
    /// Temporarily refused (4xx).
    pub deferred: AtomicU64,
    /// Connections lost or refused mid-campaign (the message was retried).
    pub retries: AtomicU64,
    /// Recipients skipped because their address is suppressed.
    pub suppressed: AtomicU64,
    /// Recipients whose message could not be built.
    pub unrendered: AtomicU64,
    /// The distinct render errors, with how many recipients each failed
    /// (at most [`RENDER_ERRORS_KEPT`] kinds).
    render_errors: std::sync::Mutex<Vec<RenderErrorSummary>>,
    /// Messages sent again after a connection was lost between their data
    /// and the reply (the MTA may have them twice).
    pub possibly_duplicated: AtomicU64,
    /// Messages given up after every try lost its connection after the
    /// data (recorded failed, "possibly delivered").
    pub possibly_delivered: AtomicU64,
    /// Messages a relay answered with 4xx that went on to another relay.
    pub rerouted: AtomicU64,
    /// Pending recipients at start, once known (0 = unknown).
    pub total: AtomicU64,
    /// Whether `total` was counted (an empty audience counts 0).
    pub total_known: std::sync::atomic::AtomicBool,
    /// What no relay saw: suppressed when its page was read, an address
    /// that is none (failed). Unrendered recipients are all here too
    /// (`unrendered`).
    pub unrelayed: Unrelayed,
    /// The MTA's queue at the last probe, and the most seen (with a probe).
    pub queue: AtomicU64,
    /// See `queue`.
    pub queue_max: AtomicU64,
    /// Whether an MTA queue probe has reported (`queue` means something).
    pub queue_probed: std::sync::atomic::AtomicBool,
    /// Each relay's gate and counters, once the run has started.
    pub relays: std::sync::OnceLock<Vec<RelayStats>>,
    /// The whole campaign as the last heartbeat saw it, when several
    /// workers share it.
    pub campaign: std::sync::Mutex<Option<CampaignView>>,
}

/// The whole campaign, over all its live workers.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CampaignView {
    /// Live workers, this one included.
    pub workers: u64,
    /// Recipients left of `total` (pending when this worker started),
    /// counting what every worker sent since.
    pub left: u64,
    /// The live workers' rates, summed (msg/s).
    pub rate: f64,
    /// What the others had sent when this one first looked.
    baseline: u64,
}

/// Outcomes decided before any relay saw the message (each also counted
/// in the run's totals).
#[derive(Debug, Default)]
pub struct Unrelayed {
    /// Suppressed when its page was read.
    pub suppressed: AtomicU64,
    /// An address that is no address.
    pub failed: AtomicU64,
}

/// One relay's share of the counters (each also counted in the run's
/// totals), its latency and its gate (limit, in flight, circuit).
#[derive(Debug)]
pub struct RelayStats {
    /// `smtp://host:port`, as logs and the ledger name it.
    pub name: String,
    /// `name` without a user name (`smtp://user@host` is `smtp://host`),
    /// for labels others see: metrics.
    pub label: String,
    /// Its limit and circuit.
    pub gate: Arc<Gate>,
    /// Accepted.
    pub sent: AtomicU64,
    /// Refused for good (5xx, a message given up as possibly delivered).
    pub failed: AtomicU64,
    /// Temporarily refused, and no other relay took it.
    pub deferred: AtomicU64,
    /// Suppressed after the message was built (an unsubscribe mid-run).
    pub suppressed: AtomicU64,
    /// Answered 4xx here and handed to another relay.
    pub rerouted: AtomicU64,
    /// Sent here again after a connection lost after the data.
    pub possibly_duplicated: AtomicU64,
    /// Given up after every try lost the connection after the data.
    pub possibly_delivered: AtomicU64,
    /// Connections lost or refused.
    pub retries: AtomicU64,
    /// SMTP transaction time, microseconds.
    pub latency: Histogram,
}

impl RelayStats {
    /// Counters for relay `name` behind `gate`.
    pub fn new(name: String, gate: Arc<Gate>) -> RelayStats {
        RelayStats {
            label: without_user(&name),
            name,
            gate,
            sent: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            deferred: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
            rerouted: AtomicU64::new(0),
            possibly_duplicated: AtomicU64::new(0),
            possibly_delivered: AtomicU64::new(0),
            retries: AtomicU64::new(0),
            latency: Histogram::default(),
        }
    }

    /// The counter for `outcome`.
    fn outcome(&self, outcome: &Outcome) -> &AtomicU64 {
        match outcome {
            Outcome::Sent { .. } => &self.sent,
            Outcome::Deferred(_) => &self.deferred,
            Outcome::Failed(_) => &self.failed,
        }
    }
}

/// One injector's counters: what an operator needs to see whether adding
/// connections still adds throughput.
#[derive(Debug, Default)]
pub struct InjectorStats {
    /// Transactions completed.
    pub messages: AtomicU64,
    /// Total time spent waiting on the server, in microseconds.
    pub busy_us: AtomicU64,
}

impl Stats {
    /// Counters for `injectors` injectors, starting the clock now.
    pub fn new(injectors: usize) -> Stats {
        Stats {
            started: Instant::now(),
            first_outcome_us: AtomicU64::new(0),
            latency: Histogram::default(),
            render: Histogram::default(),
            flushes: Flushes::default(),
            injectors: (0..injectors).map(|_| InjectorStats::default()).collect(),
            sent: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            deferred: AtomicU64::new(0),
            retries: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
            unrendered: AtomicU64::new(0),
            render_errors: std::sync::Mutex::new(Vec::new()),
            possibly_duplicated: AtomicU64::new(0),
            possibly_delivered: AtomicU64::new(0),
            rerouted: AtomicU64::new(0),
            total: AtomicU64::new(0),
            total_known: std::sync::atomic::AtomicBool::new(false),
            unrelayed: Unrelayed::default(),
            queue: AtomicU64::new(0),
            queue_max: AtomicU64::new(0),
            queue_probed: std::sync::atomic::AtomicBool::new(false),
            relays: std::sync::OnceLock::new(),
            campaign: std::sync::Mutex::new(None),
        }
    }

    /// A heartbeat's view of the campaign: `workers` live ones that sent
    /// `sent` in all, at `rate` msg/s in all.
    pub fn set_campaign(&self, workers: u64, sent: u64, rate: f64) {
        let mine = self.sent.load(Ordering::Relaxed);
        let mut view = self.campaign.lock().unwrap_or_else(|p| p.into_inner());
        let baseline = view.map_or(sent.saturating_sub(mine), |v| v.baseline);
        let done = sent.saturating_sub(baseline);
        *view = Some(CampaignView {
            workers,
            left: self.total.load(Ordering::Relaxed).saturating_sub(done),
            rate,
            baseline,
        });
    }

    /// Recipient `id`'s message could not be built because of `error`.
    pub(super) fn unrendered(&self, id: i64, error: &str) {
        self.unrendered.fetch_add(1, Ordering::Relaxed);
        let mut kinds = self.render_errors.lock().unwrap_or_else(|p| p.into_inner());
        // Past the kinds kept, every new kind counts as one "other".
        let error = match kinds.len() < RENDER_ERRORS_KEPT {
            true => error,
            false => OTHER_RENDER_ERRORS,
        };
        match kinds.iter_mut().find(|k| k.error == error) {
            // Render workers run in parallel: the first recipient is the
            // lowest id, whichever worker got there first.
            Some(k) => {
                k.recipients += 1;
                k.first_recipient = k.first_recipient.min(id);
            }
            None => kinds.push(RenderErrorSummary {
                error: error.to_string(),
                recipients: 1,
                first_recipient: id,
            }),
        }
    }

    /// Recipients answered so far (sent, failed, deferred, suppressed or
    /// not rendered).
    pub fn answered(&self) -> u64 {
        [
            &self.sent,
            &self.failed,
            &self.deferred,
            &self.suppressed,
            &self.unrendered,
        ]
        .iter()
        .map(|c| c.load(Ordering::Relaxed))
        .sum()
    }

    /// The campaign view, if several workers share the campaign.
    pub fn campaign_view(&self) -> Option<CampaignView> {
        let view = *self.campaign.lock().unwrap_or_else(|p| p.into_inner());
        view.filter(|v| v.workers > 1)
    }

    /// Relay `r`'s counters (none before the run has planned its relays).
    pub(super) fn relay(&self, r: usize) -> Option<&RelayStats> {
        self.relays.get().and_then(|v| v.get(r))
    }

    /// Adds one to the run's `total` and to relay `r`'s share of it.
    pub(super) fn add_on(
        &self,
        r: usize,
        total: &AtomicU64,
        share: impl Fn(&RelayStats) -> &AtomicU64,
    ) {
        total.fetch_add(1, Ordering::Relaxed);
        if let Some(relay) = self.relay(r) {
            share(relay).fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Records one SMTP transaction by injector `slot` on relay `r`.
    pub(super) fn transaction(&self, slot: usize, r: usize, latency: Duration) {
        self.latency.record(latency);
        if let Some(relay) = self.relay(r) {
            relay.latency.record(latency);
        }
        if let Some(i) = self.injectors.get(slot) {
            i.messages.fetch_add(1, Ordering::Relaxed);
            i.busy_us
                .fetch_add(latency.as_micros() as u64, Ordering::Relaxed);
        }
    }

    /// Counts `outcome`, answered by relay `r`.
    pub(super) fn count_on(&self, r: usize, outcome: &Outcome) {
        self.count(outcome);
        if let Some(relay) = self.relay(r) {
            relay.outcome(outcome).fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Counts `outcome` that no relay answered (an address that is no
    /// address).
    pub(super) fn count_unrelayed(&self, outcome: &Outcome) {
        self.count(outcome);
        if let Outcome::Failed(_) = outcome {
            self.unrelayed.failed.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// A recipient suppressed when its page was read.
    pub(super) fn suppressed_unrelayed(&self) {
        self.suppressed.fetch_add(1, Ordering::Relaxed);
        self.unrelayed.suppressed.fetch_add(1, Ordering::Relaxed);
    }

    /// Sets the pending recipients at start.
    pub fn set_total(&self, n: u64) {
        self.total.store(n, Ordering::Relaxed);
        self.total_known.store(true, Ordering::Relaxed);
    }

    /// Counts `outcome` in the run's totals.
    fn count(&self, outcome: &Outcome) {
        if self.first_outcome_us.load(Ordering::Relaxed) == 0 {
            let us = (self.started.elapsed().as_micros() as u64).max(1);
            let _ =
                self.first_outcome_us
                    .compare_exchange(0, us, Ordering::Relaxed, Ordering::Relaxed);
        }
        let c = match outcome {
            Outcome::Sent { .. } => &self.sent,
            Outcome::Deferred(_) => &self.deferred,
            Outcome::Failed(_) => &self.failed,
        };
        c.fetch_add(1, Ordering::Relaxed);
    }

    /// Recipients with an outcome so far.
    pub fn done(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
            + self.failed.load(Ordering::Relaxed)
            + self.deferred.load(Ordering::Relaxed)
            + self.suppressed.load(Ordering::Relaxed)
            + self.unrendered.load(Ordering::Relaxed)
    }
}

/// `url` without the user name of its authority (`smtp://bulk@mx:587` →
/// `smtp://mx:587`).
fn without_user(url: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, path) = rest.split_at(end);
    let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    match scheme {
        "" => format!("{host}{path}"),
        s => format!("{s}://{host}{path}"),
    }
}

/// Distinct render errors a summary lists (a per-row error differs from
/// row to row: memory stays bounded; the last kind counts the rest).
const RENDER_ERRORS_KEPT: usize = 20;

/// The kind that counts render errors past [`RENDER_ERRORS_KEPT`].
const OTHER_RENDER_ERRORS: &str = "(other render errors)";

/// One kind of render error in a run.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct RenderErrorSummary {
    /// The error.
    pub error: String,
    /// Recipients it failed.
    pub recipients: u64,
    /// The first recipient (row id) it failed.
    pub first_recipient: i64,
}

/// The end-of-run summary (printed, or as JSON with `--json`).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Summary {
    /// Campaign name.
    pub campaign: String,
    /// Accepted by the MTA in this run.
    pub sent: u64,
    /// Refused for good in this run.
    pub failed: u64,
    /// Temporarily refused in this run.
    pub deferred: u64,
    /// Connection-level retries.
    pub retries: u64,
    /// Skipped: address on the suppression list.
    pub suppressed: u64,
    /// Messages that could not be built (a template or data error): not
    /// final, built again by the next pass.
    pub unrendered: u64,
    /// The render errors behind `unrendered`, most frequent first.
    pub render_errors: Vec<RenderErrorSummary>,
    /// Sent again after a connection was lost between their data and the
    /// reply: the MTA may have delivered them twice (noted in the ledger).
    pub possibly_duplicated: u64,
    /// Recipients recorded failed after `ambiguous_tries` tries each lost
    /// the connection after the data: the MTA may have delivered them.
    pub possibly_delivered: u64,
    /// Messages a relay answered with 4xx that another relay then took (a
    /// relay that defers fast does not get to defer the campaign).
    pub rerouted: u64,
    /// Why the circuit breaker paused the campaign, if it did.
    pub breaker: Option<String>,
    /// Recipients whose refusals the breaker attributes to the relay (to be
    /// sent again when the campaign resumes).
    #[serde(skip)]
    pub breaker_streak: Vec<(i64, String)>,
    /// When the first of `breaker_streak` was answered: the suppressions
    /// those refusals caused were added after it.
    #[serde(skip)]
    pub breaker_since: Option<time::OffsetDateTime>,
    /// Wall time in seconds.
    pub seconds: f64,
    /// Messages with an outcome per second.
    pub rate: f64,
    /// True when the run was stopped before the audience was exhausted.
    pub interrupted: bool,
    /// Milliseconds from the start of the command to the first outcome.
    pub first_message_ms: f64,
    /// SMTP transaction latency quantiles in milliseconds (bucket upper bounds).
    pub latency_ms: LatencySummary,
    /// Per-injector transactions and mean latency.
    pub injectors: Vec<InjectorSummary>,
    /// Each relay's concurrency limit and the congestion marks it gave.
    pub relays: Vec<RelaySummary>,
    /// The largest MTA queue the probe saw (`None` without a probe).
    pub queue_max: Option<u64>,
}

/// One relay's concurrency at the end of a run.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct RelaySummary {
    /// `smtp://host:port`.
    pub relay: String,
    /// Whether the limit adapted (`auto`) or was pinned.
    pub adaptive: bool,
    /// Transactions allowed in flight at the end.
    pub limit: usize,
    /// The highest limit reached.
    pub peak_limit: usize,
    /// Congestion marks, by kind.
    pub marks: crate::adaptive::Marks,
    /// The relay's minimum round trip, milliseconds.
    pub min_rtt_ms: Option<f64>,
    /// How many times its circuit opened (connection failures or a burst of
    /// 4xx), sending its traffic to the other relays.
    pub circuit_opened: u64,
}

impl Stats {
    /// Each relay's limit and marks so far.
    pub fn relay_summaries(&self, adaptive: bool) -> Vec<RelaySummary> {
        self.relays
            .get()
            .map(|v| {
                v.iter()
                    .map(|r| {
                        let g = &r.gate;
                        let a = g.snapshot();
                        RelaySummary {
                            relay: r.name.clone(),
                            adaptive,
                            limit: a.limit(),
                            peak_limit: a.peak_limit(),
                            marks: a.marks(),
                            min_rtt_ms: a.min_rtt().map(|d| d.as_secs_f64() * 1000.0),
                            circuit_opened: g.times_opened(),
                        }
                    })
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// Latency quantiles, milliseconds.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct LatencySummary {
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
}

/// One injector's share of the work.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct InjectorSummary {
    /// Injector number.
    pub slot: usize,
    /// Transactions completed.
    pub messages: u64,
    /// Mean transaction latency, milliseconds.
    pub mean_ms: f64,
}

impl Stats {
    /// Latency quantiles so far.
    pub fn latency_summary(&self) -> LatencySummary {
        let ms = |q| self.latency.quantile_duration(q).as_secs_f64() * 1000.0;
        LatencySummary {
            p50: ms(0.5),
            p90: ms(0.9),
            p99: ms(0.99),
        }
    }
}

impl Stats {
    /// The end-of-run summary of campaign `name`, which ran for `elapsed`
    /// with `breaker` and `opts`; `interrupted` when stopped before the
    /// audience was exhausted.
    pub(super) fn summary(
        &self,
        name: &str,
        breaker: &Breaker,
        opts: &RunOptions,
        elapsed: Duration,
        interrupted: bool,
    ) -> Summary {
        let seconds = elapsed.as_secs_f64();
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let (sent, failed, deferred) = (load(&self.sent), load(&self.failed), load(&self.deferred));
        Summary {
            campaign: name.to_string(),
            sent,
            failed,
            deferred,
            retries: load(&self.retries),
            suppressed: load(&self.suppressed),
            unrendered: load(&self.unrendered),
            render_errors: {
                let mut kinds = self
                    .render_errors
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .clone();
                kinds.sort_by_key(|k| std::cmp::Reverse(k.recipients));
                kinds
            },
            possibly_duplicated: load(&self.possibly_duplicated),
            possibly_delivered: load(&self.possibly_delivered),
            rerouted: load(&self.rerouted),
            breaker: breaker.reason(),
            breaker_streak: breaker.streak(),
            breaker_since: breaker.since(),
            seconds,
            rate: if seconds > 0.0 {
                (sent + failed + deferred) as f64 / seconds
            } else {
                0.0
            },
            interrupted,
            first_message_ms: load(&self.first_outcome_us) as f64 / 1000.0,
            latency_ms: self.latency_summary(),
            injectors: self.injector_summaries(),
            relays: self.relay_summaries(matches!(opts.concurrency, Concurrency::Auto { .. })),
            queue_max: opts.queue_probe.as_ref().map(|_| load(&self.queue_max)),
        }
    }

    /// Each injector's transactions and mean latency so far.
    fn injector_summaries(&self) -> Vec<InjectorSummary> {
        self.injectors
            .iter()
            .enumerate()
            .map(|(slot, i)| {
                let n = i.messages.load(Ordering::Relaxed);
                let busy = i.busy_us.load(Ordering::Relaxed) as f64 / 1000.0;
                InjectorSummary {
                    slot,
                    messages: n,
                    mean_ms: if n > 0 { busy / n as f64 } else { 0.0 },
                }
            })
            .collect()
    }
}

impl Summary {
    /// True when every recipient of this run was accepted.
    pub fn all_accepted(&self) -> bool {
        self.failed == 0
            && self.deferred == 0
            && self.unrendered == 0
            && !self.interrupted
            && self.breaker.is_none()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use super::Stats;

    #[test]
    fn relay_labels_carry_no_user_name() {
        use super::without_user;
        assert_eq!(
            without_user("smtp://bulk@mx.example.net:587"),
            "smtp://mx.example.net:587"
        );
        assert_eq!(without_user("smtps://a@b@mx:465"), "smtps://mx:465");
        assert_eq!(without_user("smtp://127.0.0.1:25"), "smtp://127.0.0.1:25");
        assert_eq!(without_user("file:///tmp/x@y"), "file:///tmp/x@y");
    }

    #[test]
    fn the_campaign_view_counts_every_worker_from_this_ones_start() {
        let s = Stats::new(1);
        s.total.store(1000, Ordering::Relaxed);
        assert_eq!(s.campaign_view(), None, "not seen yet");
        // First look: the others had sent 300 before this worker counted 10.
        s.sent.store(10, Ordering::Relaxed);
        s.set_campaign(3, 310, 90.0);
        let v = s.campaign_view().unwrap();
        assert_eq!((v.workers, v.left, v.rate), (3, 990, 90.0));
        // Later: 400 more sent by all of them.
        s.set_campaign(3, 710, 120.0);
        assert_eq!(s.campaign_view().unwrap().left, 590);
        // Alone again: the single-worker display needs no campaign part.
        s.set_campaign(1, 800, 40.0);
        assert_eq!(s.campaign_view(), None);
    }
}
