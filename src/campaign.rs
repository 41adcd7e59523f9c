//! The campaign runner, the only module that connects the pipeline:
//! `source → render → bounded channel → N injectors → ledger`. It depends on
//! the [`Source`], [`Transport`] and [`Ledger`] traits, not on SQL or SMTP, so
//! the whole pipeline runs in memory in tests. It owns the stop signal, the
//! rate limit and the counters the progress display reads.
//!
//! Stopping: when `stop` is cancelled the renderer stops fetching, each
//! injector finishes the SMTP transaction it is in and exits, and the ledger
//! flushes everything answered. Messages still in the channel were never
//! offered to the MTA and are not recorded, so the next run sends them.

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use serde::Serialize;
use tokio::sync::{mpsc, Mutex};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::adaptive::{Aimd, Gate, Mark};
use crate::clock;
use crate::config::{Concurrency, QueueProbe};
use crate::error::Result;
use crate::ledger::{self, Ledger, Record};
use crate::render::{Outgoing, Renderer};
use crate::source::{Recipient, Source};
use crate::suppress::Live;
use crate::transport::{Outcome, Session, SessionError, Transport};

/// Messages rendered ahead of the injectors, per injector, between
/// [`QUEUE_MIN`] and [`QUEUE_MAX`] in all. Bounded so that rendering waits
/// for the MTA instead of filling memory: 32 per injector kept 16 injectors
/// busy (16 per injector lost 15% of the rate); the cap keeps memory flat at
/// high concurrency (512 messages of 8 KB = 4 MB).
const QUEUE_PER_INJECTOR: usize = 32;
/// Smallest rendered-message queue.
const QUEUE_MIN: usize = 64;
/// Largest rendered-message queue.
const QUEUE_MAX: usize = 512;
/// Chunks of recipients waiting for a render worker.
const RENDER_QUEUE_CHUNKS: usize = 8;
/// An injector kept out of its relay's limit this long closes its connection.
const IDLE_CLOSE: Duration = Duration::from_secs(5);
/// How often the stall watchdog looks at outstanding transactions.
const WATCH_INTERVAL: Duration = Duration::from_millis(20);
/// Reconnect backoff bounds after a lost connection.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// How to run.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Transactions in flight: pinned, or found per relay.
    pub concurrency: Concurrency,
    /// The transport's relays, in its order, with their per-relay settings
    /// (weight, ceiling, rate).
    pub relays: Vec<crate::config::Relay>,
    /// Each relay's starting limit for `auto` (the last run's, if remembered).
    pub initial_limits: Vec<Option<usize>>,
    /// The MTA queue probe, if configured.
    pub queue_probe: Option<QueueProbe>,
    /// Max messages per second over all injectors; 0 = unlimited.
    pub rate: u32,
    /// Consecutive 5xx (over at least three domains) that trip the breaker;
    /// 0 = never.
    pub breaker_threshold: u32,
    /// The operator's second SIGINT: abandon transactions in flight (their
    /// messages are not recorded and go out again on the next run, so an
    /// MTA that had already accepted one sends it twice). The ledger still
    /// flushes everything answered.
    pub abort: CancellationToken,
    /// Addresses suppressed since the campaign started (unsubscribes and
    /// bounces arriving mid-campaign): injectors skip them.
    pub suppressions: Live,
}

/// Live counters, shared with the progress display.
#[derive(Debug)]
pub struct Stats {
    /// When the command started (for the time to the first message).
    pub started: Instant,
    /// Microseconds from `started` to the first outcome (0 = none yet).
    pub first_outcome_us: AtomicU64,
    /// SMTP transaction latency over all injectors.
    pub latency: Histogram,
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
    /// Messages sent again after a connection was lost between their data
    /// and the reply (the MTA may have them twice).
    pub possibly_duplicated: AtomicU64,
    /// Messages a relay answered with 4xx that went on to another relay.
    pub rerouted: AtomicU64,
    /// Pending recipients at start, once known (0 = unknown).
    pub total: AtomicU64,
    /// The MTA's queue at the last probe, and the most seen (with a probe).
    pub queue: AtomicU64,
    /// See `queue`.
    pub queue_max: AtomicU64,
    /// Each relay's name and concurrency gate, once the run has started.
    pub relays: std::sync::OnceLock<Vec<(String, Arc<Gate>)>>,
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

/// A latency histogram with power-of-two microsecond buckets (bucket `i`
/// holds durations in `[2^i, 2^(i+1))` us), lock-free to update.
#[derive(Debug, Default)]
pub struct Histogram {
    buckets: [AtomicU64; 26],
}

impl Histogram {
    /// Adds one sample.
    pub fn record(&self, d: Duration) {
        let us = d.as_micros().max(1) as u64;
        let i = (63 - us.leading_zeros() as usize).min(self.buckets.len() - 1);
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
    }

    /// The `q` quantile (0..=1) as the upper bound of its bucket; zero when empty.
    pub fn quantile(&self, q: f64) -> Duration {
        let counts: Vec<u64> = self
            .buckets
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .collect();
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return Duration::ZERO;
        }
        let rank = ((total as f64) * q).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, c) in counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return Duration::from_micros(1u64 << (i + 1));
            }
        }
        Duration::from_micros(1u64 << counts.len())
    }
}

impl Stats {
    /// Counters for `injectors` injectors, starting the clock now.
    pub fn new(injectors: usize) -> Stats {
        Stats {
            started: Instant::now(),
            first_outcome_us: AtomicU64::new(0),
            latency: Histogram::default(),
            injectors: (0..injectors).map(|_| InjectorStats::default()).collect(),
            sent: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            deferred: AtomicU64::new(0),
            retries: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
            possibly_duplicated: AtomicU64::new(0),
            rerouted: AtomicU64::new(0),
            total: AtomicU64::new(0),
            queue: AtomicU64::new(0),
            queue_max: AtomicU64::new(0),
            relays: std::sync::OnceLock::new(),
        }
    }

    /// Records one SMTP transaction by injector `slot`.
    fn transaction(&self, slot: usize, latency: Duration) {
        self.latency.record(latency);
        if let Some(i) = self.injectors.get(slot) {
            i.messages.fetch_add(1, Ordering::Relaxed);
            i.busy_us
                .fetch_add(latency.as_micros() as u64, Ordering::Relaxed);
        }
    }

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
    }
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
    /// Sent again after a connection was lost between their data and the
    /// reply: the MTA may have delivered them twice (noted in the ledger).
    pub possibly_duplicated: u64,
    /// Messages a relay answered with 4xx that another relay then took (a
    /// relay that defers fast does not get to defer the campaign).
    pub rerouted: u64,
    /// Why the circuit breaker paused the campaign, if it did.
    pub breaker: Option<String>,
    /// Recipients whose refusals the breaker attributes to the relay (to be
    /// sent again when the campaign resumes).
    #[serde(skip)]
    pub breaker_streak: Vec<(i64, String)>,
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
                    .map(|(relay, g)| {
                        let a = g.snapshot();
                        RelaySummary {
                            relay: relay.clone(),
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
        let ms = |q| self.latency.quantile(q).as_secs_f64() * 1000.0;
        LatencySummary {
            p50: ms(0.5),
            p90: ms(0.9),
            p99: ms(0.99),
        }
    }
}

impl Summary {
    /// True when every recipient of this run was accepted.
    pub fn all_accepted(&self) -> bool {
        self.failed == 0 && self.deferred == 0 && !self.interrupted && self.breaker.is_none()
    }
}

/// The per-campaign circuit breaker: when the relay refuses everything (it
/// wants AUTH, it denies relaying, or N refusals in a row across different
/// domains), the campaign pauses with the reason instead of burning the
/// list. Refusals that look like the relay's (auth, relay denied) are
/// recorded as deferred, and the streak that tripped the breaker is
/// requeued by the caller, so `blast resume` sends them again.
#[derive(Debug)]
pub struct Breaker {
    threshold: u32,
    state: std::sync::Mutex<BreakerState>,
}

#[derive(Debug, Default)]
struct BreakerState {
    streak: Vec<(i64, String)>,
    domains: std::collections::HashSet<String>,
    tripped: Option<String>,
}

impl Breaker {
    /// A breaker tripping after `threshold` refusals; 0 = never (relay
    /// refusals still trip it).
    pub fn new(threshold: u32) -> Breaker {
        Breaker {
            threshold,
            state: std::sync::Mutex::new(BreakerState::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BreakerState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Looks at one SMTP outcome; returns the outcome to record (a relay
    /// refusal becomes a deferral: it says nothing about the recipient).
    pub fn observe(&self, id: i64, email: &str, outcome: Outcome) -> Outcome {
        let mut st = self.lock();
        let reply = match &outcome {
            Outcome::Failed(r) if r.code.is_some() => r.clone(),
            _ => {
                // Anything accepted or deferred ends a streak of refusals.
                st.streak.clear();
                st.domains.clear();
                return outcome;
            }
        };
        st.streak.push((id, email.to_string()));
        if let Some((_, domain)) = email.rsplit_once('@') {
            st.domains.insert(domain.to_ascii_lowercase());
        }
        if relay_refusal(&reply) {
            st.tripped.get_or_insert_with(|| {
                format!(
                    "the relay refuses to take mail: {} {}",
                    reply.code.unwrap_or(0),
                    reply.text
                )
            });
            return Outcome::Deferred(reply);
        }
        if self.threshold > 0 && st.streak.len() as u32 >= self.threshold && st.domains.len() >= 3 {
            let reason = format!(
                "{} refusals in a row across {} domains, last: {} {}",
                st.streak.len(),
                st.domains.len(),
                reply.code.unwrap_or(0),
                reply.text
            );
            st.tripped.get_or_insert(reason);
        }
        outcome
    }

    /// Trips for a reason outside any recipient's reply (a relay that
    /// refuses blast's TLS or credentials mid-run).
    pub fn trip(&self, reason: String) {
        self.lock().tripped.get_or_insert(reason);
    }

    /// True once tripped.
    pub fn tripped(&self) -> bool {
        self.lock().tripped.is_some()
    }

    /// Why it tripped.
    pub fn reason(&self) -> Option<String> {
        self.lock().tripped.clone()
    }

    /// The refused recipients of the current streak, when tripped.
    pub fn streak(&self) -> Vec<(i64, String)> {
        let st = self.lock();
        if st.tripped.is_some() {
            st.streak.clone()
        } else {
            Vec::new()
        }
    }
}

/// A refusal that is about the relay or the session, not the recipient.
pub fn relay_refusal(reply: &crate::transport::Reply) -> bool {
    let text = reply.text.to_ascii_lowercase();
    matches!(reply.code, Some(530) | Some(535) | Some(538))
        || reply.enhanced.as_deref() == Some("5.7.0")
        || text.contains("relay access denied")
        || text.contains("relaying denied")
        || text.contains("relay not permitted")
        || text.contains("authentication required")
}

/// A rendered message on its way to an injector.
struct Job {
    out: Outgoing,
    attempts: u32,
    first_attempt_at: Option<String>,
    /// A connection was lost after this message's data was sent, before the
    /// reply: the MTA may have accepted it already.
    ambiguous: bool,
    /// Relays (bit `r` for relay `r`) that answered this message with a 4xx.
    deferred_by: u64,
}

/// Relay `r`'s bit in a [`Job::deferred_by`] mask (none past 64 relays).
fn relay_bit(r: usize) -> u64 {
    if r < 64 {
        1 << r
    } else {
        0
    }
}

/// Appended to the ledger's reply text of a message sent again after an
/// ambiguous loss.
pub const AMBIGUOUS_NOTE: &str =
    "[possibly duplicated: an earlier connection was lost after the message data]";

/// Where injectors get work: messages requeued after a failed session or
/// a relay's 4xx first, then freshly rendered ones. The queue is done when
/// the renderers are done, nothing is requeued, and no injector holds a
/// message that it might still requeue.
struct Work {
    fresh: Mutex<mpsc::Receiver<Job>>,
    /// Requeued messages. At most one per injector (each comes from an
    /// injector's hand), so the scan for one a relay may take is short.
    retry: std::sync::Mutex<std::collections::VecDeque<Job>>,
    /// Woken when a message is requeued.
    requeued: tokio::sync::Notify,
    /// Every relay's gate, to tell which relays are usable.
    gates: Vec<Arc<Gate>>,
    /// Injectors per relay (a relay with none cannot take a message).
    injectors: Vec<usize>,
    /// Messages rendered and not yet recorded: in the fresh channel, in an
    /// injector's hand or in the retry queue. Counted by the renderers
    /// before a message enters the channel and only decremented once it
    /// has an outcome, so moving between hand and queue never shows zero.
    outstanding: Arc<AtomicU64>,
    /// Messages in the retry queue.
    queued: AtomicU64,
    fresh_done: std::sync::atomic::AtomicBool,
    /// Cancelled once all work is done, for injectors waiting on their
    /// relay's limit rather than on work.
    done: CancellationToken,
}

impl Work {
    fn new(fresh: mpsc::Receiver<Job>, gates: Vec<Arc<Gate>>, injectors: Vec<usize>) -> Work {
        Work {
            fresh: Mutex::new(fresh),
            retry: std::sync::Mutex::new(std::collections::VecDeque::new()),
            requeued: tokio::sync::Notify::new(),
            gates,
            injectors,
            outstanding: Arc::new(AtomicU64::new(0)),
            queued: AtomicU64::new(0),
            fresh_done: std::sync::atomic::AtomicBool::new(false),
            done: CancellationToken::new(),
        }
    }

    fn retry_queue(&self) -> std::sync::MutexGuard<'_, std::collections::VecDeque<Job>> {
        self.retry.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A relay other than those in `mask` that can take a message now:
    /// it has injectors, its circuit is closed and its connections work.
    fn other_relay_usable(&self, mask: u64) -> bool {
        self.gates.iter().enumerate().any(|(r, g)| {
            r < 64
                && mask & (1 << r) == 0
                && self.injectors.get(r).is_some_and(|&n| n > 0)
                && !g.is_open()
                && !g.failing()
        })
    }

    /// A requeued message `relay` may send: one it did not defer, or one
    /// that no other usable relay is left to take.
    fn take_retry(&self, relay: usize) -> Option<Job> {
        let mut q = self.retry_queue();
        let bit = if relay < 64 { 1u64 << relay } else { 0 };
        let i = q
            .iter()
            .position(|j| j.deferred_by & bit == 0 || !self.other_relay_usable(j.deferred_by))?;
        let job = q.remove(i)?;
        self.queued.fetch_sub(1, Ordering::AcqRel);
        Some(job)
    }

    /// The next message for an injector of `relay`, or `None` when all work
    /// is done or `stop` is cancelled.
    async fn next(&self, relay: usize, stop: &CancellationToken) -> Option<Job> {
        loop {
            if stop.is_cancelled() {
                return None;
            }
            let fresh_done = self.fresh_done.load(Ordering::Acquire);
            if fresh_done && self.outstanding.load(Ordering::Acquire) == 0 {
                self.done.cancel();
                return None;
            }
            // Fast path, the common case while the renderers keep ahead: a
            // message at hand, taken without registering for wake-ups.
            if self.queued.load(Ordering::Acquire) > 0 {
                if let Some(job) = self.take_retry(relay) {
                    return Some(job);
                }
            }
            if !fresh_done {
                if let Ok(mut fresh) = self.fresh.try_lock() {
                    match fresh.try_recv() {
                        Ok(job) => return Some(job),
                        Err(mpsc::error::TryRecvError::Disconnected) => {
                            self.fresh_done.store(true, Ordering::Release);
                            continue;
                        }
                        Err(mpsc::error::TryRecvError::Empty) => {}
                    }
                }
            }
            // Registered before looking again, so a requeue in between
            // still wakes us.
            let requeued = self.requeued.notified();
            tokio::pin!(requeued);
            requeued.as_mut().enable();
            if let Some(job) = self.take_retry(relay) {
                return Some(job);
            }
            tokio::select! {
                biased;
                _ = stop.cancelled() => return None,
                _ = &mut requeued => {}
                job = async { self.fresh.lock().await.recv().await }, if !fresh_done => {
                    match job {
                        Some(job) => return Some(job),
                        None => self.fresh_done.store(true, Ordering::Release),
                    }
                }
                // Requeues may still come from injectors holding messages,
                // and a relay's circuit may open, freeing a deferred message
                // for the relays that deferred it.
                _ = tokio::time::sleep(Duration::from_millis(20)), if fresh_done || self.queued.load(Ordering::Acquire) > 0 => {}
            }
        }
    }

    /// The message taken by [`Work::next`] has an outcome (or was dropped at a stop).
    fn finished(&self) {
        self.outstanding.fetch_sub(1, Ordering::AcqRel);
    }

    /// Puts a message back for any injector (any relay) to send.
    fn requeue(&self, job: Job) {
        self.queued.fetch_add(1, Ordering::AcqRel);
        self.retry_queue().push_back(job);
        self.requeued.notify_waiters();
    }

    /// After `relay` answered `job` with a 4xx: requeues it for another
    /// relay that has not deferred it and whose circuit is closed (`None`),
    /// or gives it back when there is none (its 4xx is the outcome).
    fn defer_elsewhere(&self, mut job: Job, relay: usize) -> Option<Job> {
        if relay >= 64 {
            return Some(job);
        }
        job.deferred_by |= 1 << relay;
        if !self.other_relay_usable(job.deferred_by) {
            return Some(job);
        }
        self.requeue(job);
        None
    }
}

/// Runs the pipeline until the source is exhausted or `stop` is cancelled.
/// Errors are fatal (ledger or source failures); per-recipient problems are
/// outcomes. The caller has already checked the transport is reachable.
#[allow(clippy::too_many_arguments)]
pub async fn run<S, T, L>(
    name: &str,
    mut source: S,
    renderer: Arc<Renderer>,
    transport: Arc<T>,
    ledger: L,
    opts: &RunOptions,
    stats: Arc<Stats>,
    stop: CancellationToken,
) -> Result<Summary>
where
    S: Source,
    T: Transport,
    L: Ledger,
{
    let started = Instant::now();
    let relays = opts.relays.len().max(1);
    let relay_opts: Vec<crate::config::Relay> = if opts.relays.is_empty() {
        vec![crate::config::Relay::default()]
    } else {
        opts.relays.clone()
    };
    let per_relay = opts.concurrency.per_relay(&relay_opts);
    let injectors_n = per_relay.iter().sum::<usize>().max(1);
    let (job_tx, job_rx) =
        mpsc::channel::<Job>((injectors_n * QUEUE_PER_INJECTOR).clamp(QUEUE_MIN, QUEUE_MAX));
    // One gate per relay: the number of its transactions in flight.
    let now = tokio::time::Instant::now();
    // Only relays with injectors count as usable: a relay given none (a
    // fixed concurrency below the number of relays) cannot take over.
    let healthy = Arc::new(std::sync::atomic::AtomicUsize::new(
        per_relay.iter().filter(|&&n| n > 0).count(),
    ));
    let gates: Vec<Arc<Gate>> = (0..relays)
        .map(|r| {
            let aimd = match opts.concurrency {
                Concurrency::Fixed(_) => Aimd::fixed(per_relay[r], now),
                Concurrency::Auto { .. } => Aimd::adaptive(
                    opts.initial_limits.get(r).copied().flatten(),
                    per_relay[r],
                    now,
                ),
            };
            Arc::new(Gate::with_health(aimd, healthy.clone(), per_relay[r] > 0))
        })
        .collect();
    let _ = stats.relays.set(
        gates
            .iter()
            .enumerate()
            .map(|(r, g)| (transport.describe(r), g.clone()))
            .collect(),
    );
    // The stall watchdog: marks transactions that hang while they hang.
    let watchdog = {
        let gates = gates.clone();
        let done = CancellationToken::new();
        let d = done.clone();
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(WATCH_INTERVAL);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = d.cancelled() => return,
                    _ = tick.tick() => gates.iter().for_each(|g| g.watch()),
                }
            }
        });
        (done, task)
    };
    let probe = opts.queue_probe.clone().map(|p| {
        let (gates, stats, stop) = (gates.clone(), stats.clone(), watchdog.0.clone());
        tokio::spawn(probe_queue(p, gates, stats, stop))
    });
    let (rec_tx, rec_rx) = mpsc::channel::<Record>(ledger::FLUSH_ROWS);
    let work = Arc::new(Work::new(job_rx, gates.clone(), per_relay.clone()));
    let limiter =
        NonZeroU32::new(opts.rate).map(|r| Arc::new(RateLimiter::direct(Quota::per_second(r))));
    let breaker = Arc::new(Breaker::new(opts.breaker_threshold));

    // A ledger failure must stop sending: nothing may go out unrecorded.
    let ledger_task = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let r = ledger::write_loop(ledger, rec_rx).await;
            if r.is_err() {
                stop.cancel();
            }
            r
        })
    };

    let injectors = TaskTracker::new();
    // Per-relay rate limits (a provider's quota), beside the global one.
    let relay_limiters: Vec<Option<Arc<DefaultDirectRateLimiter>>> = relay_opts
        .iter()
        .map(|r| {
            r.rate
                .and_then(NonZeroU32::new)
                .map(|q| Arc::new(RateLimiter::direct(Quota::per_second(q))))
        })
        .collect();
    let plan: Vec<(usize, usize)> = per_relay
        .iter()
        .enumerate()
        .flat_map(|(r, n)| (0..*n).map(move |rank| (r, rank)))
        .collect();
    for (slot, &(relay, rank)) in plan.iter().enumerate() {
        let inj = Injector {
            slot,
            rank,
            relay,
            relay_limiter: relay_limiters[relay].clone(),
            gate: gates[relay].clone(),
            transport: transport.clone(),
            work: work.clone(),
            records: rec_tx.clone(),
            stats: stats.clone(),
            limiter: limiter.clone(),
            breaker: breaker.clone(),
            stop: stop.clone(),
            abort: opts.abort.clone(),
            suppressions: opts.suppressions.clone(),
        };
        injectors.spawn(inj.run());
    }
    injectors.close();

    // Render workers, one per core: the channel to the injectors is what
    // slows them down when the MTA is the bottleneck.
    let (chunk_tx, chunk_rx) = mpsc::channel::<Vec<Recipient>>(RENDER_QUEUE_CHUNKS);
    let chunk_rx = Arc::new(Mutex::new(chunk_rx));
    let renderers = TaskTracker::new();
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get());
    for _ in 0..workers {
        renderers.spawn(render_worker(
            chunk_rx.clone(),
            renderer.clone(),
            (job_tx.clone(), work.outstanding.clone()),
            rec_tx.clone(),
            stats.clone(),
            stop.clone(),
        ));
    }
    renderers.close();
    drop(job_tx);

    // The source is read here, slowed by `chunk_tx.send`.
    let produced = produce(&mut source, &chunk_tx, &stop).await;
    drop(chunk_tx);
    renderers.wait().await;
    injectors.wait().await;
    watchdog.0.cancel();
    let _ = watchdog.1.await;
    if let Some(p) = probe {
        let _ = p.await;
    }
    drop(rec_tx);
    let ledger_result = ledger_task.await.unwrap_or_else(|e| {
        Err(crate::error::Error::Audience(format!(
            "ledger task panicked: {e}"
        )))
    });
    // Report the first fatal error: a source failure, else a ledger failure.
    let exhausted = produced?;
    ledger_result?;

    let seconds = started.elapsed().as_secs_f64();
    let (sent, failed, deferred) = (
        stats.sent.load(Ordering::Relaxed),
        stats.failed.load(Ordering::Relaxed),
        stats.deferred.load(Ordering::Relaxed),
    );
    Ok(Summary {
        campaign: name.to_string(),
        sent,
        failed,
        deferred,
        retries: stats.retries.load(Ordering::Relaxed),
        suppressed: stats.suppressed.load(Ordering::Relaxed),
        possibly_duplicated: stats.possibly_duplicated.load(Ordering::Relaxed),
        rerouted: stats.rerouted.load(Ordering::Relaxed),
        breaker: breaker.reason(),
        breaker_streak: breaker.streak(),
        seconds,
        rate: if seconds > 0.0 {
            (sent + failed + deferred) as f64 / seconds
        } else {
            0.0
        },
        interrupted: !exhausted || stop.is_cancelled(),
        first_message_ms: stats.first_outcome_us.load(Ordering::Relaxed) as f64 / 1000.0,
        latency_ms: stats.latency_summary(),
        injectors: stats
            .injectors
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
            .collect(),
        relays: stats.relay_summaries(matches!(opts.concurrency, Concurrency::Auto { .. })),
        queue_max: opts
            .queue_probe
            .as_ref()
            .map(|_| stats.queue_max.load(Ordering::Relaxed)),
    })
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

/// Recipients per unit of render work: small enough that a render task
/// never holds a runtime worker for long (about 1 ms), large enough to keep
/// channel traffic low.
const RENDER_CHUNK: usize = 32;

/// Pages through the source and hands chunks of recipients to the render
/// workers. Returns Ok(true) when the source was exhausted.
async fn produce<S: Source>(
    source: &mut S,
    chunks: &mpsc::Sender<Vec<Recipient>>,
    stop: &CancellationToken,
) -> Result<bool> {
    loop {
        let page = tokio::select! {
            biased;
            _ = stop.cancelled() => return Ok(false),
            page = source.next_page() => page?,
        };
        if page.is_empty() {
            return Ok(true);
        }
        let mut page = page.into_iter().peekable();
        while page.peek().is_some() {
            let chunk: Vec<Recipient> = page.by_ref().take(RENDER_CHUNK).collect();
            tokio::select! {
                biased;
                _ = stop.cancelled() => return Ok(false),
                sent = chunks.send(chunk) => if sent.is_err() { return Ok(false) },
            }
        }
    }
}

/// A render worker: recipients in, finished messages out. Several run in
/// parallel so rendering and MIME building use every core. A recipient whose
/// message cannot be built is recorded as failed here.
async fn render_worker(
    chunks: Arc<Mutex<mpsc::Receiver<Vec<Recipient>>>>,
    renderer: Arc<Renderer>,
    (jobs, outstanding): (mpsc::Sender<Job>, Arc<AtomicU64>),
    records: mpsc::Sender<Record>,
    stats: Arc<Stats>,
    stop: CancellationToken,
) {
    loop {
        let chunk = tokio::select! {
            biased;
            _ = stop.cancelled() => return,
            chunk = async { chunks.lock().await.recv().await } => match chunk {
                Some(c) => c,
                None => return,
            },
        };
        let now = clock::now();
        for recipient in chunk {
            // A suppressed address gets nothing; the ledger says why.
            let failure = match &recipient.suppressed {
                Some(reason) => Err(format!("address is suppressed: {reason}")),
                None => renderer.render(&recipient, now).map_err(|e| e.to_string()),
            };
            match failure {
                Ok(out) => {
                    let job = Job {
                        out,
                        attempts: recipient.attempts,
                        first_attempt_at: recipient.first_attempt_at,
                        ambiguous: false,
                        deferred_by: 0,
                    };
                    // Counted outstanding before it can be taken (see `Work`).
                    tokio::select! {
                        biased;
                        _ = stop.cancelled() => return,
                        slot = jobs.reserve() => match slot {
                            Ok(slot) => {
                                outstanding.fetch_add(1, Ordering::AcqRel);
                                slot.send(job);
                            }
                            Err(_) => return,
                        },
                    }
                }
                Err(reason) => {
                    let suppressed = recipient.suppressed.is_some();
                    let outcome = Outcome::local_failure(reason);
                    if suppressed {
                        stats.suppressed.fetch_add(1, Ordering::Relaxed);
                    } else {
                        stats.count(&outcome);
                    }
                    let rec = Record {
                        recipient_id: recipient.id,
                        email: recipient.email,
                        outcome,
                        relay: None,
                        attempts: recipient.attempts,
                        first_attempt_at: recipient.first_attempt_at,
                        suppressed,
                    };
                    if records.send(rec).await.is_err() {
                        return;
                    }
                }
            }
        }
    }
}

/// One SMTP injector: one connection, one transaction at a time.
struct Injector<T: Transport> {
    slot: usize,
    /// This injector's number among its relay's injectors.
    rank: usize,
    relay: usize,
    relay_limiter: Option<Arc<DefaultDirectRateLimiter>>,
    gate: Arc<Gate>,
    transport: Arc<T>,
    work: Arc<Work>,
    records: mpsc::Sender<Record>,
    stats: Arc<Stats>,
    limiter: Option<Arc<DefaultDirectRateLimiter>>,
    breaker: Arc<Breaker>,
    stop: CancellationToken,
    abort: CancellationToken,
    suppressions: Live,
}

impl<T: Transport> Injector<T> {
    async fn run(self) {
        let mut session: Option<T::Session> = None;
        let relay = self.transport.describe(self.relay);
        let mut backoff = BACKOFF_MIN;
        loop {
            // A slot under this relay's limit first, then work: a relay with
            // room takes the next message, one that is congested or down
            // does not.
            let mut permit = tokio::select! {
                biased;
                _ = self.stop.cancelled() => break,
                _ = self.work.done.cancelled() => break,
                p = self.gate.acquire_ranked(self.rank) => p,
                // Out of the limit for a while: free the MTA's process.
                _ = tokio::time::sleep(IDLE_CLOSE), if session.is_some() => {
                    if let Some(s) = session.take() {
                        s.close().await;
                    }
                    continue;
                }
            };
            let Some(mut job) = self.work.next(self.relay, &self.stop).await else {
                self.gate.cancel(permit);
                break;
            };
            // Suppressed after this recipient's page was read: skip it,
            // so an unsubscribe takes effect while the campaign runs.
            if let Some(why) = self.suppressions.get(&job.out.email) {
                self.stats.suppressed.fetch_add(1, Ordering::Relaxed);
                let rec = Record {
                    recipient_id: job.out.envelope.recipient_id,
                    email: job.out.email,
                    outcome: Outcome::local_failure(format!("address is suppressed: {why}")),
                    relay: None,
                    attempts: job.attempts,
                    first_attempt_at: job.first_attempt_at,
                    suppressed: true,
                };
                self.gate.cancel(permit);
                self.work.finished();
                if self.records.send(rec).await.is_err() {
                    break;
                }
                continue;
            }
            let mut stopped = false;
            for l in [&self.limiter, &self.relay_limiter].into_iter().flatten() {
                tokio::select! {
                    biased;
                    _ = self.stop.cancelled() => {
                        stopped = true;
                        break;
                    }
                    _ = l.until_ready() => {}
                }
            }
            if stopped {
                self.gate.cancel(permit);
                self.work.finished();
                break;
            }
            self.gate.begin(&mut permit);
            let sent = match session.as_mut() {
                Some(s) => Ok(s),
                None => self
                    .transport
                    .connect(self.relay)
                    .await
                    .map(|s| session.insert(s)),
            };
            let sent = match sent {
                Ok(s) => {
                    let r = tokio::select! {
                        biased;
                        _ = self.abort.cancelled() => None,
                        r = s.send(&job.out.envelope, &job.out.bytes) => Some(r),
                    };
                    match r {
                        Some(Ok(outcome)) => {
                            self.stats.transaction(self.slot, s.latency());
                            Ok(outcome)
                        }
                        Some(Err(e)) => Err(e),
                        // Abandoned by the operator's second SIGINT.
                        None => {
                            self.gate.cancel(permit);
                            self.work.finished();
                            break;
                        }
                    }
                }
                Err(e) => Err(e),
            };
            let mut outcome = match sent {
                Ok(outcome) => {
                    backoff = BACKOFF_MIN;
                    outcome
                }
                Err(e) => {
                    // The session is gone and the message unanswered: back to
                    // the queue (another relay may take it), and this
                    // injector waits before its relay is tried again.
                    session = None;
                    self.gate.release(permit, Some(Mark::Connection));
                    job.ambiguous |= e.ambiguous;
                    self.work.requeue(job);
                    // A setting went wrong mid-run (a certificate, a
                    // password): with no other relay to carry on, pause the
                    // campaign for the operator instead of retrying forever.
                    if e.permanent && !self.work.other_relay_usable(relay_bit(self.relay)) {
                        self.breaker.trip(format!("{relay}: {}", e.message));
                        self.stop.cancel();
                        break;
                    }
                    if !self.wait_retry(&relay, &e, &mut backoff).await {
                        break;
                    }
                    continue;
                }
            };
            // A 4xx is congestion (never a latency sample); 2xx and 5xx are samples.
            let mark = matches!(&outcome, Outcome::Deferred(r) if r.code.is_some_and(|c| (400..500).contains(&c)))
                .then_some(Mark::Deferred);
            self.gate.release(permit, mark);
            // A 4xx says "not now, not here": another relay that has not
            // deferred this message takes it at once, so a relay refusing
            // fast does not defer the campaign's recipients.
            let job = match mark {
                Some(_) => match self.work.defer_elsewhere(job, self.relay) {
                    None => {
                        self.stats.rerouted.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    Some(job) => job,
                },
                None => job,
            };
            if job.ambiguous {
                // Lost after the message data once: the MTA may have it twice.
                self.stats
                    .possibly_duplicated
                    .fetch_add(1, Ordering::Relaxed);
                outcome.note(AMBIGUOUS_NOTE);
            }
            let outcome =
                self.breaker
                    .observe(job.out.envelope.recipient_id, &job.out.email, outcome);
            if self.breaker.tripped() {
                self.stop.cancel();
            }
            self.stats.count(&outcome);
            let rec = Record {
                recipient_id: job.out.envelope.recipient_id,
                email: job.out.email,
                outcome,
                relay: Some(relay.clone()),
                attempts: job.attempts,
                first_attempt_at: job.first_attempt_at,
                suppressed: false,
            };
            self.work.finished();
            if self.records.send(rec).await.is_err() {
                break;
            }
        }
        // After an abort the session is mid-transaction: drop it, no QUIT.
        if let Some(s) = session.filter(|_| !self.abort.is_cancelled()) {
            s.close().await;
        }
    }

    /// Logs a lost connection and sleeps with capped exponential backoff and
    /// jitter. Returns false when stopped meanwhile.
    async fn wait_retry(&self, relay: &str, e: &SessionError, backoff: &mut Duration) -> bool {
        self.stats.retries.fetch_add(1, Ordering::Relaxed);
        // Jitter keeps N injectors from reconnecting in lockstep.
        let jitter =
            Duration::from_millis((self.slot as u64 * 37 + clock::now().nanosecond() as u64) % 100);
        let wait = *backoff + jitter;
        tracing::warn!(
            "injector {}: {relay} unreachable ({e}), retrying in {:.1}s",
            self.slot,
            wait.as_secs_f64()
        );
        *backoff = (*backoff * 2).min(BACKOFF_MAX);
        tokio::select! {
            biased;
            _ = self.stop.cancelled() => false,
            _ = tokio::time::sleep(wait) => true,
        }
    }
}
