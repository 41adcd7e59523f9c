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
use crate::ledger::{self, Ledger};
use crate::model::{Outcome, Outgoing, Recipient, Record};
use crate::render::Renderer;
use crate::source::Source;
use crate::suppress::Live;
use crate::transport::{Session, SessionError, Transport};

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
/// An injector kept out of its relay's limit, or waiting for work, this long
/// closes its connection.
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

mod breaker;
mod stats;
mod work;

pub use breaker::Breaker;
pub use stats::{
    Histogram, InjectorStats, InjectorSummary, LatencySummary, RelaySummary, Stats, Summary,
};
pub use work::AMBIGUOUS_NOTE;
use work::{relay_bit, Job, Work};

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
            // Waiting for work (the renderers behind, or the tail of the
            // run) also closes an idle session, before the relay's own
            // timeout can turn the next message into an ambiguous loss.
            // A message at hand needs no idle timer (the per-message path).
            let at_hand = match self.stop.is_cancelled() {
                false => self.work.try_next(self.relay),
                true => None,
            };
            let next = match at_hand {
                Some(job) => Some(job),
                None => self.wait_for_work(&mut session).await,
            };
            let Some(mut job) = next else {
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
                    if self.settings_failed(&relay, &e) {
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

    /// Waits for the next message; a session left idle meanwhile is closed.
    async fn wait_for_work(&self, session: &mut Option<T::Session>) -> Option<Job> {
        let next = self.work.next(self.relay, &self.stop);
        tokio::pin!(next);
        loop {
            tokio::select! {
                biased;
                job = &mut next => return job,
                _ = tokio::time::sleep(IDLE_CLOSE), if session.is_some() => {
                    if let Some(s) = session.take() {
                        s.close().await;
                    }
                }
            }
        }
    }

    /// A setting went wrong mid-run (a certificate, a password, STARTTLS
    /// gone): with no other relay to carry on, pauses the campaign for the
    /// operator (true) instead of retrying forever.
    fn settings_failed(&self, relay: &str, e: &SessionError) -> bool {
        if !e.permanent || self.work.other_relay_usable(relay_bit(self.relay)) {
            return false;
        }
        let why = e
            .message
            .strip_prefix(&format!("{relay}: "))
            .unwrap_or(&e.message);
        tracing::error!("{relay}: {why} (pausing the campaign)");
        self.breaker.trip(format!("{relay}: {why}"));
        self.stop.cancel();
        true
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
