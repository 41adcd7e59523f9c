//! How many SMTP transactions to keep in flight per relay: additive
//! increase, multiplicative decrease on congestion *marks*, one update per
//! window (in the spirit of TCP and Vector's adaptive request concurrency).
//!
//! Postfix pushes back with rare, long stalls (`in_flow_delay`, about 1 s)
//! and 4xx replies rather than a smooth rise in latency, so latency
//! gradients average the signal away. A mark is instead any of:
//! - a 4xx reply (421, 450, 451, 452...): never used as a latency sample;
//! - a connect failure, timeout or lost session;
//! - a transaction outstanding longer than the stall threshold (derived from
//!   the relay's recent minimum round trip), noticed while it is still
//!   outstanding, so blast backs off before the stall ends;
//! - optionally, the MTA's queue above a target (`postqueue -j`);
//! - a window whose mean round trip is more than [`LATENCY_FACTOR`] times the
//!   relay's minimum (and above [`LATENCY_FLOOR`]): the MTA's processes are
//!   queueing for CPU, and more connections only make it thrash (measured:
//!   Postfix on two cores relays a third less at 16 connections than at 4).
//!
//! At the end of each window: a mark halves the limit (and ends slow
//! start); otherwise, if the limit was actually reached, it grows (doubling
//! in slow start, +1 after). [`Aimd`] is the pure state machine (time passed
//! in, unit-tested); [`Gate`] wraps it for injectors. This module sends
//! nothing and knows no SMTP.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use tokio::sync::Notify;
use tokio::time::Instant;

/// Default ceiling for `concurrency = "auto"` (per relay).
pub const DEFAULT_MAX: usize = 64;
/// Shortest window between limit updates.
pub const WINDOW_MIN: Duration = Duration::from_millis(100);
/// Windows are at least this many minimum round trips long.
const WINDOW_RTTS: u32 = 4;
/// Multiplicative decrease on a window with a hard mark (4xx, connection,
/// stall, queue).
const DECREASE: f64 = 0.5;
/// Gentler decrease when the only mark is inflated latency: that signal
/// fires near the best limit, and halving a limit of 5 costs a third of the
/// rate (measured through Postfix).
const DECREASE_LATENCY: f64 = 0.8;
/// A transaction is a stall after this many minimum round trips...
const STALL_RTTS: u32 = 8;
/// ...but never less than this...
pub const STALL_MIN: Duration = Duration::from_millis(250);
/// ...and never more: Postfix's in-flow stall lasts up to 1 s, and it must
/// be seen while it lasts even after the relay's pace slowed for good (a
/// local MTA answers in milliseconds; a relay slower than this always
/// counts as congested).
pub const STALL_MAX: Duration = Duration::from_millis(750);
/// Before any round trip is measured.
const STALL_DEFAULT: Duration = STALL_MAX;
/// A window is congested when its mean round trip exceeds this many
/// minimum round trips...
pub const LATENCY_FACTOR: u32 = 5;
/// ...and this much (sub-millisecond jitter against a fast sink is no signal).
pub const LATENCY_FLOOR: Duration = Duration::from_millis(2);
/// Samples a window needs before its mean counts.
const LATENCY_SAMPLES: u32 = 3;
/// The minimum round trip is forgotten after this many windows, so a relay
/// that got slower for good is judged by its new pace.
const RTT_EPOCH_WINDOWS: u64 = 50;

/// Why a window was marked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mark {
    /// A 4xx reply.
    Deferred,
    /// Connect failure, timeout or lost session.
    Connection,
    /// A transaction outstanding past the stall threshold.
    Stall,
    /// The MTA's queue above its target.
    Queue,
    /// A window's mean round trip far above the minimum.
    Latency,
}

/// Marks seen, by kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Marks {
    /// 4xx replies.
    pub deferred: u64,
    /// Connect failures, timeouts, lost sessions.
    pub connection: u64,
    /// Stalled transactions.
    pub stall: u64,
    /// Queue above target.
    pub queue: u64,
    /// Windows with inflated round trips.
    pub latency: u64,
}

impl Marks {
    fn add(&mut self, m: Mark) {
        match m {
            Mark::Deferred => self.deferred += 1,
            Mark::Connection => self.connection += 1,
            Mark::Stall => self.stall += 1,
            Mark::Queue => self.queue += 1,
            Mark::Latency => self.latency += 1,
        }
    }

    /// All marks.
    pub fn total(&self) -> u64 {
        self.deferred + self.connection + self.stall + self.queue + self.latency
    }
}

/// The limit's state machine. `adaptive: false` pins the limit (a number
/// in `concurrency`) but still counts marks for the operator.
#[derive(Debug, Clone)]
pub struct Aimd {
    limit: f64,
    max: usize,
    adaptive: bool,
    slow_start: bool,
    in_flight: usize,
    busy: usize,
    window_start: Instant,
    window_marks: u32,
    window_peak: usize,
    window_rtt_sum: Duration,
    window_rtt_n: u32,
    windows: u64,
    min_rtt: Option<Duration>,
    epoch_min_rtt: Option<Duration>,
    marks: Marks,
    peak_limit: usize,
}

impl Aimd {
    /// An adaptive limit starting at `initial` (slow start from 1 when
    /// `initial` is `None`; a remembered limit starts without slow start),
    /// never above `max`.
    pub fn adaptive(initial: Option<usize>, max: usize, now: Instant) -> Aimd {
        let max = max.max(1);
        let start = initial.unwrap_or(1).clamp(1, max);
        Aimd::build(start, max, true, initial.is_none(), now)
    }

    /// A fixed limit.
    pub fn fixed(limit: usize, now: Instant) -> Aimd {
        Aimd::build(limit.max(1), limit.max(1), false, false, now)
    }

    fn build(start: usize, max: usize, adaptive: bool, slow_start: bool, now: Instant) -> Aimd {
        Aimd {
            limit: start as f64,
            max,
            adaptive,
            slow_start,
            in_flight: 0,
            busy: 0,
            window_start: now,
            window_marks: 0,
            window_peak: 0,
            window_rtt_sum: Duration::ZERO,
            window_rtt_n: 0,
            windows: 0,
            min_rtt: None,
            epoch_min_rtt: None,
            marks: Marks::default(),
            peak_limit: start,
        }
    }

    /// Transactions allowed in flight now.
    pub fn limit(&self) -> usize {
        (self.limit.floor() as usize).clamp(1, self.max)
    }

    /// Transactions in flight.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Marks so far.
    pub fn marks(&self) -> Marks {
        self.marks
    }

    /// The highest limit reached.
    pub fn peak_limit(&self) -> usize {
        self.peak_limit
    }

    /// True while still in slow start.
    pub fn slow_start(&self) -> bool {
        self.slow_start
    }

    /// The recent minimum round trip, if measured.
    pub fn min_rtt(&self) -> Option<Duration> {
        self.min_rtt
    }

    /// Takes a slot if one is free.
    pub fn try_acquire(&mut self, now: Instant) -> bool {
        self.try_acquire_ranked(now, 0)
    }

    /// Takes a slot for the injector of `rank` (0-based within its relay)
    /// if one is free and `rank` is under the limit: with a limit of L only
    /// injectors 0..L run, so the same L connections carry the traffic
    /// instead of the work rotating over every open connection.
    pub fn try_acquire_ranked(&mut self, now: Instant, rank: usize) -> bool {
        self.tick(now);
        if rank < self.limit() && self.in_flight < self.limit() {
            self.in_flight += 1;
            true
        } else {
            false
        }
    }

    /// A slot's transaction starts. Only started transactions count toward
    /// "the limit was reached": a slot held while waiting for work is idle.
    pub fn begin(&mut self) {
        self.busy += 1;
        self.window_peak = self.window_peak.max(self.busy);
    }

    /// Gives a slot back unused (no transaction, no sample).
    pub fn cancel(&mut self) {
        self.in_flight = self.in_flight.saturating_sub(1);
    }

    /// Ends a started transaction and gives its slot back: it took `rtt` (a
    /// sample only when it was not marked) or was marked with `mark`.
    pub fn release(&mut self, now: Instant, rtt: Option<Duration>, mark: Option<Mark>) {
        self.in_flight = self.in_flight.saturating_sub(1);
        self.busy = self.busy.saturating_sub(1);
        match mark {
            Some(m) => self.mark(now, m),
            None => {
                if let Some(rtt) = rtt {
                    self.epoch_min_rtt = Some(self.epoch_min_rtt.map_or(rtt, |m| m.min(rtt)));
                    self.min_rtt = Some(self.min_rtt.map_or(rtt, |m| m.min(rtt)));
                    self.window_rtt_sum += rtt;
                    self.window_rtt_n += 1;
                }
                self.tick(now);
            }
        }
    }

    /// Records a congestion mark (also for transactions still outstanding).
    pub fn mark(&mut self, now: Instant, mark: Mark) {
        self.marks.add(mark);
        self.window_marks += 1;
        self.tick(now);
    }

    /// How long a window lasts.
    pub fn window(&self) -> Duration {
        self.min_rtt
            .map_or(WINDOW_MIN, |r| (r * WINDOW_RTTS).max(WINDOW_MIN))
    }

    /// How long a transaction may be outstanding before it counts as a stall.
    pub fn stall_threshold(&self) -> Duration {
        self.min_rtt.map_or(STALL_DEFAULT, |r| {
            (r * STALL_RTTS).clamp(STALL_MIN, STALL_MAX)
        })
    }

    /// Closes the window if it is over: one limit update per window.
    /// Returns true when the limit grew (waiters may proceed).
    pub fn tick(&mut self, now: Instant) -> bool {
        if now.duration_since(self.window_start) < self.window() {
            return false;
        }
        let before = self.limit();
        let mut slow = false;
        if let (Some(min), true) = (self.min_rtt, self.window_rtt_n >= LATENCY_SAMPLES) {
            let mean = self.window_rtt_sum / self.window_rtt_n;
            if mean > (min * LATENCY_FACTOR).max(LATENCY_FLOOR) {
                self.marks.add(Mark::Latency);
                slow = true;
            }
        }
        if self.adaptive {
            if self.window_marks > 0 || slow {
                let factor = if self.window_marks > 0 {
                    DECREASE
                } else {
                    DECREASE_LATENCY
                };
                self.limit = (self.limit * factor).max(1.0);
                self.slow_start = false;
            } else if self.window_peak >= before {
                self.limit = if self.slow_start {
                    self.limit * 2.0
                } else {
                    self.limit + 1.0
                }
                .min(self.max as f64);
            }
        }
        self.windows += 1;
        if self.windows.is_multiple_of(RTT_EPOCH_WINDOWS) {
            // Forget old minima: keep this epoch's.
            self.min_rtt = self.epoch_min_rtt.or(self.min_rtt);
            self.epoch_min_rtt = None;
        }
        self.window_start = now;
        self.window_marks = 0;
        self.window_peak = self.busy;
        self.window_rtt_sum = Duration::ZERO;
        self.window_rtt_n = 0;
        self.peak_limit = self.peak_limit.max(self.limit());
        self.limit() > before
    }
}

/// A slot to run one transaction in, released when it drops: [`begin`]
/// it when the work is there, then end it with [`release`] and the
/// transaction's mark. Dropped unstarted (no work, a suppressed message, a
/// stop) it is given back unused; dropped started without a release (an
/// abandoned transaction) it ends without a sample or a mark. No path can
/// leak a slot of the relay's limit or leave a circuit half-open.
///
/// [`begin`]: Permit::begin
/// [`release`]: Permit::release
#[derive(Debug)]
#[must_use = "a permit dropped at once gives its slot back"]
pub struct Permit {
    gate: Arc<Gate>,
    id: u64,
    started: Option<Instant>,
    /// The one half-open probe of an open circuit.
    probe: bool,
    /// The transaction's result, set by [`Permit::release`].
    result: Option<Option<Mark>>,
}

impl Permit {
    /// The transaction starts now (the watchdog starts watching it).
    pub fn begin(&mut self) {
        let now = Instant::now();
        self.started = Some(now);
        self.gate
            .outstanding
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(self.id, (now, false));
        self.gate.lock().begin();
    }

    /// Ends the transaction: `mark` says why it counts as congestion, else
    /// its round trip is a sample. Releasing a permit that never began is
    /// the same as dropping it unused.
    pub fn release(mut self, mark: Option<Mark>) {
        self.result = Some(mark);
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        match (self.started, self.result) {
            (None, _) => self.gate.give_back(self.probe),
            (Some(started), Some(mark)) => self.gate.end(self.id, started, mark),
            (Some(_), None) => self.gate.abandon(self.id),
        }
    }
}

/// Consecutive connection failures that open a relay's circuit.
pub const OPEN_AFTER_FAILURES: u32 = 3;
/// Consecutive 4xx replies that open a relay's circuit.
pub const OPEN_AFTER_DEFERRALS: u32 = 20;
/// First wait before a half-open probe; doubles per failed probe.
const REOPEN_MIN: Duration = Duration::from_secs(1);
/// Longest wait before a probe.
const REOPEN_MAX: Duration = Duration::from_secs(60);

/// A relay's circuit: closed (in use), open (skipped until `open_until`),
/// then half-open (one probe transaction decides).
#[derive(Debug, Default)]
struct Health {
    /// Counted in the gate's `healthy`: circuit closed, last connection fine.
    counted: bool,
    failures: u32,
    deferrals: u32,
    open_until: Option<Instant>,
    reopen: Duration,
    probing: bool,
    opened: u64,
}

/// One relay's limit shared by its injectors, its circuit breaker, plus the
/// outstanding transactions the stall watchdog looks at.
#[derive(Debug)]
pub struct Gate {
    aimd: Mutex<Aimd>,
    health: Mutex<Health>,
    /// Relays of this run that are in use and answering (circuit closed,
    /// no connection failing); a relay's circuit opens only while another
    /// one is.
    healthy: Arc<AtomicUsize>,
    /// Outstanding permits: start time, and whether already marked as a stall.
    outstanding: Mutex<HashMap<u64, (Instant, bool)>>,
    next_id: AtomicU64,
    changed: Notify,
}

impl Gate {
    /// A gate around `aimd`, for a run with this one relay.
    pub fn new(aimd: Aimd) -> Gate {
        Gate::with_health(aimd, Arc::new(AtomicUsize::new(1)), true)
    }

    /// A gate around `aimd` whose circuit may open while another relay
    /// sharing `healthy` is usable. `counted`: this relay is one of those
    /// counted in `healthy` at the start (false for a relay with no injector).
    pub fn with_health(aimd: Aimd, healthy: Arc<AtomicUsize>, counted: bool) -> Gate {
        Gate {
            aimd: Mutex::new(aimd),
            health: Mutex::new(Health {
                counted,
                reopen: REOPEN_MIN,
                ..Default::default()
            }),
            healthy,
            outstanding: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(0),
            changed: Notify::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Aimd> {
        self.aimd.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn health(&self) -> std::sync::MutexGuard<'_, Health> {
        self.health.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits for a free slot under the current limit, while the relay's
    /// circuit is closed (or for the one probe when it is half-open).
    pub async fn acquire(self: &Arc<Self>) -> Permit {
        self.acquire_ranked(0).await
    }

    /// [`Gate::acquire`] for the injector of `rank` within its relay: it
    /// runs only while `rank` is under the limit.
    pub async fn acquire_ranked(self: &Arc<Self>, rank: usize) -> Permit {
        loop {
            // Register interest before checking, so a release in between is not missed.
            let notified = self.changed.notified();
            let now = Instant::now();
            let mut probe = false;
            let wait = {
                let mut h = self.health();
                match h.open_until {
                    Some(t) if now < t => Some(t - now),
                    // Half-open: one probe at a time.
                    Some(_) if h.probing => Some(WINDOW_MIN),
                    Some(_) => {
                        if self.lock().try_acquire_ranked(now, rank) {
                            h.probing = true;
                            probe = true;
                            None
                        } else {
                            Some(WINDOW_MIN)
                        }
                    }
                    None if self.lock().try_acquire_ranked(now, rank) => None,
                    // The limit may also grow with time alone (a window closing).
                    None => Some(self.lock().window()),
                }
            };
            match wait {
                None => return self.permit(probe),
                Some(wait) => {
                    let _ = tokio::time::timeout(wait, notified).await;
                }
            }
        }
    }

    /// A slot for the injector of `rank` if one is free now and the
    /// relay's circuit is closed; never waits (a half-open circuit's probe
    /// goes through [`Gate::acquire_ranked`]).
    pub fn try_acquire_ranked(self: &Arc<Self>, rank: usize) -> Option<Permit> {
        let h = self.health();
        if h.open_until.is_some() || !self.lock().try_acquire_ranked(Instant::now(), rank) {
            return None;
        }
        drop(h);
        Some(self.permit(false))
    }

    /// A permit for a slot just taken.
    fn permit(self: &Arc<Self>, probe: bool) -> Permit {
        Permit {
            gate: self.clone(),
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            started: None,
            probe,
            result: None,
        }
    }

    /// Updates the circuit with one transaction's result.
    fn observe(&self, now: Instant, mark: Option<Mark>) {
        let mut h = self.health();
        let open = |h: &mut Health, reopen: Duration| {
            // Jitter keeps relays that failed together from probing together.
            let jitter = Duration::from_millis(u64::from(clock_jitter()) % 250);
            h.open_until = Some(now + reopen + jitter);
            h.probing = false;
        };
        match mark {
            Some(Mark::Connection | Mark::Deferred) if h.probing => {
                // The probe failed: stay open, wait twice as long.
                h.reopen = (h.reopen * 2).min(REOPEN_MAX);
                let r = h.reopen;
                open(&mut h, r);
            }
            Some(m @ (Mark::Connection | Mark::Deferred)) => {
                match m {
                    Mark::Connection => {
                        h.failures += 1;
                        // A relay whose connections fail carries nothing.
                        if std::mem::take(&mut h.counted) {
                            self.healthy.fetch_sub(1, Ordering::AcqRel);
                        }
                    }
                    _ => h.deferrals += 1,
                }
                let tripped =
                    h.failures >= OPEN_AFTER_FAILURES || h.deferrals >= OPEN_AFTER_DEFERRALS;
                // Open only while another relay is usable: the last one
                // (even one answering 4xx) is all there is.
                if tripped && h.open_until.is_none() {
                    let others = if h.counted {
                        // Leaves the count in the same step, so two relays
                        // cannot both open believing the other is there.
                        self.healthy
                            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                                (n > 1).then(|| n - 1)
                            })
                            .is_ok()
                    } else {
                        self.healthy.load(Ordering::Acquire) >= 1
                    };
                    if others {
                        h.counted = false;
                        h.opened += 1;
                        h.reopen = REOPEN_MIN;
                        open(&mut h, REOPEN_MIN);
                    }
                }
            }
            // A stall, queue or latency mark says "slower", not "broken".
            Some(Mark::Stall | Mark::Queue | Mark::Latency) => {}
            None => {
                h.open_until = None;
                if !std::mem::replace(&mut h.counted, true) {
                    self.healthy.fetch_add(1, Ordering::AcqRel);
                }
                h.probing = false;
                h.failures = 0;
                h.deferrals = 0;
                h.reopen = REOPEN_MIN;
            }
        }
    }

    /// True while the relay's circuit is open or half-open.
    pub fn is_open(&self) -> bool {
        self.health().open_until.is_some()
    }

    /// True while the relay's last connections failed (before its circuit
    /// opens, or when it is the last relay and cannot open).
    pub fn failing(&self) -> bool {
        self.health().failures > 0
    }

    /// How many times the relay's circuit opened.
    pub fn times_opened(&self) -> u64 {
        self.health().opened
    }

    /// Takes back a permit whose transaction never started.
    fn give_back(&self, probe: bool) {
        if probe {
            // The probe never ran (its message was suppressed, or the run
            // stopped): the next injector may probe instead.
            self.health().probing = false;
        }
        let was_full = {
            let mut a = self.lock();
            let full = a.in_flight() >= a.limit();
            a.cancel();
            full
        };
        if was_full || probe {
            self.changed.notify_waiters();
        }
    }

    /// Ends transaction `id`, started at `started`: `mark` says why it
    /// counts as congestion, else its round trip is a sample. A transaction
    /// already marked as a stall by the watchdog is not marked twice.
    fn end(&self, id: u64, started: Instant, mark: Option<Mark>) {
        let now = Instant::now();
        let stalled = self
            .outstanding
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id)
            .is_some_and(|(_, marked)| marked);
        let rtt = now.duration_since(started);
        self.observe(now, mark);
        let mark = mark.filter(|_| !stalled);
        // A stalled transaction's round trip is no sample of the relay's pace.
        let sample = (!stalled && mark.is_none()).then_some(rtt);
        // Wake waiters only when one of them may proceed: the limit grew,
        // or the relay was at its limit (after a decrease). Waking every
        // waiting injector on every release cost Postfix a quarter of its
        // rate on two cores (64 injectors woken ~1,000 times a second).
        let wake = {
            let mut a = self.lock();
            let before = a.limit();
            let full = a.in_flight() >= before;
            a.release(now, sample, mark);
            full || a.limit() > before
        };
        if wake {
            self.changed.notify_waiters();
        }
    }

    /// Ends transaction `id` with no result (abandoned by the operator's
    /// second SIGINT): frees its slot, teaches the limit and circuit nothing.
    fn abandon(&self, id: u64) {
        self.outstanding
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
        let was_full = {
            let mut a = self.lock();
            let full = a.in_flight() >= a.limit();
            a.release(Instant::now(), None, None);
            full
        };
        if was_full {
            self.changed.notify_waiters();
        }
    }

    /// Records a mark that belongs to no permit (a connect failure, the queue probe).
    pub fn mark(&self, mark: Mark) {
        self.lock().mark(Instant::now(), mark);
    }

    /// The watchdog's step: marks transactions outstanding past the stall
    /// threshold (once each) and closes the window if due.
    pub fn watch(&self) {
        let now = Instant::now();
        let threshold = self.lock().stall_threshold();
        let stalls = {
            let mut out = self.outstanding.lock().unwrap_or_else(|p| p.into_inner());
            let mut n = 0;
            for (started, marked) in out.values_mut() {
                if !*marked && now.duration_since(*started) >= threshold {
                    *marked = true;
                    n += 1;
                }
            }
            n
        };
        let grew = {
            let mut aimd = self.lock();
            for _ in 0..stalls {
                aimd.mark(now, Mark::Stall);
            }
            aimd.tick(now)
        };
        if grew {
            self.changed.notify_waiters();
        }
    }

    /// A copy of the state, for display.
    pub fn snapshot(&self) -> Aimd {
        self.lock().clone()
    }
}

/// A few bits of noise for jitter (no RNG needed for that).
fn clock_jitter() -> u32 {
    crate::clock::now().nanosecond()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(start: Instant, ms: u64) -> Instant {
        start + Duration::from_millis(ms)
    }

    /// Runs windows where the sender keeps the limit full and every
    /// transaction takes `rtt`; `marked(window)` says whether that window
    /// sees a mark. Returns the limit after each window.
    fn drive(
        a: &mut Aimd,
        start: Instant,
        windows: u64,
        marked: impl Fn(u64) -> bool,
    ) -> Vec<usize> {
        let mut out = Vec::new();
        let w = 100;
        for i in 0..windows {
            let t = at(start, i * w + 1);
            let n = a.limit();
            for _ in 0..n {
                assert!(a.try_acquire(t));
                a.begin();
            }
            assert!(!a.try_acquire(t), "limit {n} enforced");
            for _ in 0..n {
                a.release(t, Some(Duration::from_millis(1)), None);
            }
            if marked(i) {
                a.mark(t, Mark::Deferred);
            }
            a.tick(at(start, (i + 1) * w + 1));
            out.push(a.limit());
        }
        out
    }

    #[test]
    fn slow_start_doubles_until_the_first_mark_then_halves_and_adds_one() {
        let t0 = Instant::now();
        let mut a = Aimd::adaptive(None, 64, t0);
        assert_eq!(a.limit(), 1);
        let limits = drive(&mut a, t0, 9, |w| w == 5);
        // 1→2→4→8→16→32, the mark in window 5 halves to 16, then +1 per window.
        assert_eq!(limits, vec![2, 4, 8, 16, 32, 16, 17, 18, 19]);
        assert!(!a.slow_start());
        assert_eq!(a.marks().deferred, 1);
        assert_eq!(a.peak_limit(), 32);
    }

    #[test]
    fn grows_only_when_the_limit_was_reached() {
        let t0 = Instant::now();
        let mut a = Aimd::adaptive(Some(10), 64, t0);
        // Only 3 in flight in each window: no reason to grow.
        for i in 0..5 {
            let t = at(t0, i * 100 + 1);
            for _ in 0..3 {
                assert!(a.try_acquire(t));
                a.begin();
            }
            for _ in 0..3 {
                a.release(t, Some(Duration::from_millis(1)), None);
            }
            a.tick(at(t0, (i + 1) * 100 + 1));
        }
        assert_eq!(a.limit(), 10);
    }

    #[test]
    fn never_below_one_never_above_max_and_fixed_stays_fixed() {
        let t0 = Instant::now();
        let mut a = Aimd::adaptive(Some(4), 6, t0);
        let limits = drive(&mut a, t0, 6, |w| w < 4);
        assert_eq!(limits, vec![2, 1, 1, 1, 2, 3]);
        let limits = drive(&mut a, at(t0, 600), 6, |_| false);
        assert_eq!(*limits.last().unwrap(), 6, "capped at max");
        let mut f = Aimd::fixed(8, t0);
        let limits = drive(&mut f, t0, 3, |_| true);
        assert_eq!(limits, vec![8, 8, 8]);
        assert_eq!(f.marks().deferred, 3, "marks are still counted");
    }

    #[test]
    fn window_and_stall_threshold_follow_the_minimum_round_trip() {
        let t0 = Instant::now();
        let mut a = Aimd::adaptive(None, 64, t0);
        assert_eq!(a.stall_threshold(), STALL_DEFAULT);
        assert!(a.try_acquire(t0));
        a.begin();
        a.release(t0, Some(Duration::from_millis(40)), None);
        assert_eq!(a.window(), Duration::from_millis(160));
        assert_eq!(a.stall_threshold(), Duration::from_millis(320));
        assert!(a.try_acquire(t0));
        a.begin();
        a.release(t0, Some(Duration::from_millis(2)), None);
        assert_eq!(a.window(), WINDOW_MIN);
        assert_eq!(a.stall_threshold(), STALL_MIN);
        // A marked transaction is no sample.
        assert!(a.try_acquire(t0));
        a.begin();
        a.release(t0, None, Some(Mark::Deferred));
        assert_eq!(a.min_rtt(), Some(Duration::from_millis(2)));
    }

    #[tokio::test(start_paused = true)]
    async fn the_watchdog_marks_a_stall_while_it_is_outstanding() {
        let gate = Arc::new(Gate::new(Aimd::adaptive(Some(8), 64, Instant::now())));
        let mut p = gate.acquire().await;
        p.begin();
        tokio::time::advance(Duration::from_millis(500)).await;
        gate.watch();
        assert_eq!(gate.snapshot().marks().stall, 0, "under the 750 ms default");
        tokio::time::advance(Duration::from_millis(300)).await;
        gate.watch();
        let s = gate.snapshot();
        assert_eq!(s.marks().stall, 1, "marked before it ended");
        assert_eq!(s.limit(), 4, "halved at once");
        // Ending it later marks nothing more.
        p.release(Some(Mark::Connection));
        assert_eq!(gate.snapshot().marks().total(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn acquire_waits_for_a_release() {
        let gate = std::sync::Arc::new(Gate::new(Aimd::fixed(1, Instant::now())));
        let p = gate.acquire().await;
        let g = gate.clone();
        let waiter = tokio::spawn(async move { g.acquire().await });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiter.is_finished());
        drop(p);
        let q = tokio::time::timeout(Duration::from_secs(1), waiter)
            .await
            .expect("woken")
            .unwrap();
        assert_eq!(gate.snapshot().in_flight(), 1);
        drop(q);
        assert_eq!(gate.snapshot().in_flight(), 0);
    }

    async fn fail(gate: &Arc<Gate>, mark: Mark) {
        let mut p = gate.acquire().await;
        p.begin();
        p.release(Some(mark));
    }

    #[tokio::test(start_paused = true)]
    async fn the_circuit_opens_probes_once_and_closes_but_never_for_the_last_relay() {
        let healthy = Arc::new(AtomicUsize::new(2));
        let now = Instant::now();
        let a = Arc::new(Gate::with_health(
            Aimd::fixed(4, now),
            healthy.clone(),
            true,
        ));
        let b = Arc::new(Gate::with_health(
            Aimd::fixed(4, now),
            healthy.clone(),
            true,
        ));
        for _ in 0..OPEN_AFTER_FAILURES {
            fail(&a, Mark::Connection).await;
        }
        assert!(a.is_open());
        assert_eq!(healthy.load(Ordering::Acquire), 1);
        // B is now the last usable relay: its failures do not open it.
        for _ in 0..OPEN_AFTER_FAILURES * 2 {
            fail(&b, Mark::Connection).await;
        }
        assert!(!b.is_open(), "the last healthy relay stays in use");
        assert_eq!(healthy.load(Ordering::Acquire), 0, "B's connections fail");
        // A is skipped until its reopen time, then lets exactly one probe through.
        let t = Instant::now();
        let mut probe = a.acquire().await;
        assert!(t.elapsed() >= REOPEN_MIN, "waited {:?}", t.elapsed());
        let second = tokio::time::timeout(Duration::from_millis(500), a.acquire()).await;
        assert!(second.is_err(), "one probe at a time");
        // The probe fails: open again, twice as long.
        probe.begin();
        probe.release(Some(Mark::Connection));
        let t = Instant::now();
        let mut probe = a.acquire().await;
        assert!(t.elapsed() >= REOPEN_MIN * 2, "waited {:?}", t.elapsed());
        // It succeeds: closed, usable again by everyone.
        probe.begin();
        probe.release(None);
        assert!(!a.is_open());
        assert_eq!(healthy.load(Ordering::Acquire), 1);
        let mut p = b.acquire().await;
        p.begin();
        p.release(None);
        assert_eq!(healthy.load(Ordering::Acquire), 2, "B answers again");
        assert_eq!(a.times_opened(), 1);
        let _p1 = a.acquire().await;
        let _p2 = a.acquire().await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_probe_that_never_ran_lets_the_next_one_probe() {
        let healthy = Arc::new(AtomicUsize::new(2));
        let now = Instant::now();
        let a = Arc::new(Gate::with_health(
            Aimd::fixed(4, now),
            healthy.clone(),
            true,
        ));
        let _b = Arc::new(Gate::with_health(
            Aimd::fixed(4, now),
            healthy.clone(),
            true,
        ));
        for _ in 0..OPEN_AFTER_FAILURES {
            fail(&a, Mark::Connection).await;
        }
        assert!(a.is_open());
        // The probe's message turns out to be suppressed: cancelled unsent.
        drop(a.acquire().await);
        let next = tokio::time::timeout(Duration::from_secs(5), a.acquire()).await;
        assert!(next.is_ok(), "the relay stays half-open for good");
    }

    #[tokio::test(start_paused = true)]
    async fn every_way_a_permit_ends_gives_its_slot_back() {
        let gate = Arc::new(Gate::new(Aimd::fixed(2, Instant::now())));
        // Unused, released, abandoned mid-transaction, and released unstarted.
        drop(gate.acquire().await);
        let mut p = gate.acquire().await;
        p.begin();
        p.release(None);
        let mut p = gate.acquire().await;
        p.begin();
        drop(p);
        gate.acquire().await.release(Some(Mark::Deferred));
        let s = gate.snapshot();
        assert_eq!(s.in_flight(), 0);
        assert_eq!(
            s.marks().total(),
            0,
            "an abandoned or unstarted permit marks nothing"
        );
        assert!(
            gate.outstanding.lock().unwrap().is_empty(),
            "nothing left to watch"
        );
        // Both slots are free again.
        let _a = gate.acquire().await;
        let b = tokio::time::timeout(Duration::from_secs(1), gate.acquire()).await;
        assert!(b.is_ok());
    }

    #[test]
    fn a_window_of_inflated_round_trips_is_a_mark() {
        let t0 = Instant::now();
        let mut a = Aimd::adaptive(Some(16), 64, t0);
        let run = |a: &mut Aimd, t: Instant, rtt_ms: u64| {
            let n = a.limit();
            for _ in 0..n {
                assert!(a.try_acquire(t));
                a.begin();
            }
            for _ in 0..n {
                a.release(t, Some(Duration::from_millis(rtt_ms)), None);
            }
        };
        // 3 ms round trips: the minimum, no mark, the limit grows.
        run(&mut a, at(t0, 1), 3);
        a.tick(at(t0, 101));
        assert_eq!((a.limit(), a.marks().latency), (17, 0));
        // 30 ms, ten times the minimum: marked, down by a fifth (17 -> 13.6).
        run(&mut a, at(t0, 102), 30);
        a.tick(at(t0, 202));
        assert_eq!((a.limit(), a.marks().latency), (13, 1));
        // 15 ms (five times): not marked.
        run(&mut a, at(t0, 203), 15);
        a.tick(at(t0, 303));
        assert_eq!(a.marks().latency, 1);
    }

    #[test]
    fn idle_slots_do_not_count_as_reaching_the_limit() {
        let t0 = Instant::now();
        let mut a = Aimd::adaptive(Some(4), 64, t0);
        for _ in 0..4 {
            assert!(a.try_acquire(t0));
        }
        a.begin();
        a.tick(at(t0, 150));
        assert_eq!(a.limit(), 4, "one of four busy: no growth");
    }
}
