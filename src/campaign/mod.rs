//! The campaign runner, the only module that connects the pipeline:
//! `source → render → bounded channel → N injectors → ledger`. It depends on
//! the [`Source`], [`Transport`] and [`Ledger`] traits, not on SQL or SMTP, so
//! the whole pipeline runs in memory in tests (see `tests.rs` here). It owns
//! the stop signal, the rate limit and the counters the progress display
//! reads.
//!
//! - `produce`: source pages → chunks → render workers → the work feed.
//! - `work`: where injectors take messages (fresh, or requeued), and the
//!   guard that counts a message finished whatever path it leaves by.
//! - `inject`: one injector per connection: acquire, take, send, settle.
//! - `watch`: the stall watchdog and the MTA queue probe.
//! - `breaker`, `stats`: the campaign circuit breaker and the counters.
//!
//! Stopping: when `stop` is cancelled the renderers stop fetching, each
//! injector finishes the SMTP transaction it is in and exits, and the ledger
//! flushes everything answered. Messages still in the channel were never
//! offered to the MTA and are not recorded, so the next run sends them.

use std::num::NonZeroU32;
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::time::Instant;

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use tokio::sync::{mpsc, Mutex};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::adaptive::{Aimd, Gate};
use crate::config::{Concurrency, QueueProbe, Relay};
use crate::error::{Error, Result};
use crate::ledger::{self, Ledger};
use crate::model::{Recipient, Record};
use crate::render::Renderer;
use crate::source::Source;
use crate::suppress::Live;
use crate::transport::Transport;
use crate::worker::Holdings;

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

/// How to run.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Transactions in flight: pinned, or found per relay.
    pub concurrency: Concurrency,
    /// The transport's relays, in its order, with their per-relay settings
    /// (weight, ceiling, rate).
    pub relays: Vec<Relay>,
    /// Each relay's starting limit for `auto` (the last run's, if remembered).
    pub initial_limits: Vec<Option<usize>>,
    /// The MTA queue probe, if configured.
    pub queue_probe: Option<QueueProbe>,
    /// Max messages per second over all injectors (this worker's share of
    /// the campaign's rate, which may change while it runs).
    pub rate: Arc<Rate>,
    /// The claims this worker holds (several workers on one campaign): a
    /// message goes out only while its claim is held. None = no claims
    /// (a dry run, tests).
    pub holdings: Option<Arc<Holdings>>,
    /// Consecutive 5xx (over at least three domains) that trip the breaker;
    /// 0 = never.
    pub breaker_threshold: u32,
    /// Tries of one message whose connection is lost after its data (the
    /// MTA may have it): after this many, the recipient is recorded failed
    /// as "possibly delivered" instead of sent yet again (a milter slower
    /// than the timeout would make every try ambiguous, forever).
    pub ambiguous_tries: u32,
    /// Recipients in a row failing to render with the same error that
    /// pause the campaign; 0 = never (`blast check --render`).
    pub render_pause: u32,
    /// The breaker's rate rule: too many refusals of addresses as unknown
    /// from one relay.
    pub breaker_rate: RateRule,
    /// The operator's second SIGINT: abandon transactions in flight (their
    /// messages are not recorded and go out again on the next run, so an
    /// MTA that had already accepted one sends it twice). The ledger still
    /// flushes everything answered.
    pub abort: CancellationToken,
    /// Addresses suppressed since the campaign started (unsubscribes and
    /// bounces arriving mid-campaign): injectors skip them.
    pub suppressions: Live,
}

/// Everything one run connects: where recipients come from, how they
/// become messages, where messages go, where outcomes are kept, and the
/// limits to run by.
pub struct Pipeline<S, T, L> {
    /// The campaign's name (for the summary).
    pub name: String,
    /// The audience.
    pub source: S,
    /// The compiled templates.
    pub renderer: Arc<Renderer>,
    /// Where messages go.
    pub transport: Arc<T>,
    /// Where outcomes are kept.
    pub ledger: L,
    /// Concurrency, rate, breaker and relays.
    pub options: RunOptions,
}

mod breaker;
mod inject;
mod produce;
mod rate;
mod stats;
#[cfg(test)]
mod tests;
mod watch;
mod work;

pub use breaker::{Breaker, RateRule};
pub use rate::{share, Rate};
pub use stats::{
    InjectorStats, InjectorSummary, LatencySummary, RelayStats, RelaySummary, RenderErrorSummary,
    Stats, Summary,
};
pub use watch::queue_depth;
pub use work::AMBIGUOUS_NOTE;

use inject::Injector;
use produce::{produce, RenderStreak, RenderWorker, RENDER_QUEUE_CHUNKS};
use watch::Watchers;
use work::Work;

/// Runs the pipeline until the source is exhausted or `stop` is cancelled.
/// Errors are fatal (ledger or source failures); per-recipient problems are
/// outcomes. The caller has already checked the transport is reachable.
pub async fn run<S, T, L>(
    pipeline: Pipeline<S, T, L>,
    stats: Arc<Stats>,
    stop: CancellationToken,
) -> Result<Summary>
where
    S: Source,
    T: Transport,
    L: Ledger,
{
    let started = Instant::now();
    let Pipeline {
        name,
        mut source,
        renderer,
        transport,
        ledger,
        options: opts,
    } = pipeline;
    let relays = Relays::plan(&opts, &*transport, &stats);
    let watchers = Watchers::start(&relays.gates, opts.queue_probe.clone(), &stats);
    let queue = (relays.injectors() * QUEUE_PER_INJECTOR).clamp(QUEUE_MIN, QUEUE_MAX);
    let (work, feed) = Work::new(relays.gates.clone(), relays.per_relay.clone(), queue);
    let work = Arc::new(work);
    let breaker = Arc::new(Breaker::new(opts.breaker_threshold, opts.breaker_rate));
    let (rec_tx, rec_rx) = mpsc::channel::<Record>(ledger::FLUSH_ROWS);
    let ledger_task = spawn_ledger(ledger, rec_rx, stats.clone(), stop.clone());

    let injectors = TaskTracker::new();
    for inj in relays.injectors_for(&opts, &transport, &work, &rec_tx, &stats, &breaker, &stop) {
        injectors.spawn(inj.run());
    }
    injectors.close();

    // Render workers, one per core: the channel to the injectors is what
    // slows them down when the MTA is the bottleneck.
    let (chunk_tx, chunk_rx) = mpsc::channel::<Vec<Recipient>>(RENDER_QUEUE_CHUNKS);
    let chunk_rx = Arc::new(Mutex::new(chunk_rx));
    let renderers = TaskTracker::new();
    let worker = RenderWorker {
        renderer,
        feed,
        records: rec_tx.clone(),
        stats: stats.clone(),
        stop: stop.clone(),
        breaker: breaker.clone(),
        streak: Arc::new(RenderStreak::new(opts.render_pause)),
    };
    for _ in 0..std::thread::available_parallelism().map_or(2, |n| n.get()) {
        renderers.spawn(worker.clone().run(chunk_rx.clone()));
    }
    renderers.close();
    // The workers hold the only feeds now: the channel closes when they end.
    drop(worker);

    // The source is read here, slowed by `chunk_tx.send`.
    let produced = produce(&mut source, &chunk_tx, &stop).await;
    drop(chunk_tx);
    renderers.wait().await;
    injectors.wait().await;
    watchers.stop().await;
    drop(rec_tx);
    let ledger_result = ledger_task
        .await
        .unwrap_or_else(|e| Err(Error::Internal(format!("ledger task panicked: {e}"))));
    // Report the first fatal error: a source failure, else a ledger failure.
    let exhausted = produced?;
    ledger_result?;
    let interrupted = !exhausted || stop.is_cancelled();
    Ok(stats.summary(&name, &breaker, &opts, started.elapsed(), interrupted))
}

/// Drains outcomes into the ledger. A ledger failure stops sending:
/// nothing may go out unrecorded.
fn spawn_ledger<L: Ledger>(
    ledger: L,
    records: mpsc::Receiver<Record>,
    stats: Arc<Stats>,
    stop: CancellationToken,
) -> JoinHandle<Result<u64>> {
    tokio::spawn(async move {
        let r = ledger::write_loop(ledger, records, &stats.flushes).await;
        if r.is_err() {
            stop.cancel();
        }
        r
    })
}

/// The run's relays: each one's gate (limit and circuit), injectors and
/// rate limit.
struct Relays {
    /// One gate per relay: the number of its transactions in flight.
    gates: Vec<Arc<Gate>>,
    /// Injectors per relay.
    per_relay: Vec<usize>,
    /// Per-relay rate limits (a provider's quota), beside the global one.
    limiters: Vec<Option<Arc<DefaultDirectRateLimiter>>>,
}

impl Relays {
    /// Sizes and gates the relays of `opts` (one default relay when none is
    /// listed) and shows them to the progress display.
    fn plan<T: Transport>(opts: &RunOptions, transport: &T, stats: &Stats) -> Relays {
        let relay_opts: Vec<Relay> = if opts.relays.is_empty() {
            vec![Relay::default()]
        } else {
            opts.relays.clone()
        };
        let per_relay = opts.concurrency.per_relay(&relay_opts);
        let now = tokio::time::Instant::now();
        // Only relays with injectors count as usable: a relay given none (a
        // fixed concurrency below the number of relays) cannot take over.
        let healthy = Arc::new(AtomicUsize::new(
            per_relay.iter().filter(|&&n| n > 0).count(),
        ));
        let gates: Vec<Arc<Gate>> = (0..relay_opts.len())
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
                .map(|(r, g)| RelayStats::new(transport.describe(r), g.clone()))
                .collect(),
        );
        let limiters = relay_opts
            .iter()
            .map(|r| {
                r.rate
                    .and_then(NonZeroU32::new)
                    .map(|q| Arc::new(RateLimiter::direct(Quota::per_second(q))))
            })
            .collect();
        Relays {
            gates,
            per_relay,
            limiters,
        }
    }

    /// Injectors in all (at least one).
    fn injectors(&self) -> usize {
        self.per_relay.iter().sum::<usize>().max(1)
    }

    /// One injector per slot of every relay, numbered across relays.
    #[allow(clippy::too_many_arguments)]
    fn injectors_for<T: Transport>(
        &self,
        opts: &RunOptions,
        transport: &Arc<T>,
        work: &Arc<Work>,
        records: &mpsc::Sender<Record>,
        stats: &Arc<Stats>,
        breaker: &Arc<Breaker>,
        stop: &CancellationToken,
    ) -> Vec<Injector<T>> {
        let plan = self
            .per_relay
            .iter()
            .enumerate()
            .flat_map(|(r, n)| (0..*n).map(move |rank| (r, rank)));
        plan.enumerate()
            .map(|(slot, (relay, rank))| Injector {
                slot,
                rank,
                relay,
                relay_name: transport.describe(relay),
                gate: self.gates[relay].clone(),
                relay_limiter: self.limiters[relay].clone(),
                rate: opts.rate.clone(),
                holdings: opts.holdings.clone(),
                transport: transport.clone(),
                work: work.clone(),
                records: records.clone(),
                stats: stats.clone(),
                breaker: breaker.clone(),
                stop: stop.clone(),
                abort: opts.abort.clone(),
                ambiguous_tries: opts.ambiguous_tries.max(1),
                suppressions: opts.suppressions.clone(),
            })
            .collect()
    }
}
