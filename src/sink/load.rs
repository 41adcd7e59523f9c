//! A load model for the sink: it makes [`crate::sink`] behave like a busy
//! MTA so the adaptive concurrency can be tested deterministically (on
//! paused tokio time) and measured.
//!
//! - Each message takes `base + per_in_flight × (transactions in flight - 1)`
//!   before its reply: the MTA's CPU is shared.
//! - Accepted messages join a queue that drains at `delivery_rate` per second.
//! - Above `stall_queue` messages queued, arrivals are paced like Postfix's
//!   `in_flow_delay` token bucket: each waits for the next token (one per
//!   delivered message), but at most `stall` (1 s), after which it is
//!   accepted anyway and the queue grows.
//! - Above `full_queue`, messages get `452 4.3.1 Insufficient system storage`.
//! - Above `max_in_flight` concurrent transactions, `421 4.7.0` and the
//!   connection is closed.
//! - `phases` script a slowdown or an outage from a given time on.
//!
//! This module owns the model's arithmetic only; the sink applies it.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// What the model says about one message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Accept after waiting this long.
    Accept(Duration),
    /// Reply with this line (4xx) after waiting this long; the message is not queued.
    Refuse(Duration, String),
    /// Reply `421` and close the connection.
    Close(String),
}

/// A scripted change from a time on (relative to the model's start).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Phase {
    /// Service times multiplied by this and delivery rate divided by it.
    Slow(f64),
    /// Every message gets 421 and the connection closes.
    Outage,
    /// At most this many transactions in flight from now on (421 above).
    Cap(usize),
    /// Back to normal.
    Normal,
}

/// The model's parameters (see the module docs).
#[derive(Debug, Clone)]
pub struct LoadConfig {
    /// Service time of one message alone.
    pub base: Duration,
    /// Added per other transaction in flight.
    pub per_in_flight: Duration,
    /// Queue drain rate, messages per second (0 = the queue never grows).
    pub delivery_rate: f64,
    /// Queue depth from which arrivals wait for tokens.
    pub stall_queue: usize,
    /// The longest an arrival waits for a token (`in_flow_delay`).
    pub stall: Duration,
    /// Queue depth from which messages are refused with 452.
    pub full_queue: usize,
    /// Transactions in flight from which 421 closes the connection (0 = no limit).
    pub max_in_flight: usize,
    /// `(from, phase)`, in time order.
    pub phases: Vec<(Duration, Phase)>,
}

impl Default for LoadConfig {
    fn default() -> Self {
        LoadConfig {
            base: Duration::from_millis(2),
            per_in_flight: Duration::from_micros(100),
            delivery_rate: 0.0,
            stall_queue: usize::MAX,
            stall: Duration::from_secs(1),
            full_queue: usize::MAX,
            max_in_flight: 0,
            phases: Vec::new(),
        }
    }
}

#[derive(Debug)]
struct State {
    start: Instant,
    in_flight: usize,
    queue: f64,
    last_drain: Instant,
    max_queue: f64,
    accepted: u64,
    refused: u64,
    /// When the next in-flow token is due (paced at the delivery rate).
    next_token: Instant,
}

/// A model shared by every connection of one sink.
#[derive(Debug)]
pub struct LoadModel {
    config: LoadConfig,
    state: Mutex<State>,
}

/// The model's counters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LoadStats {
    /// Messages queued now.
    pub queue: f64,
    /// The deepest the queue got.
    pub max_queue: f64,
    /// Transactions in the model now.
    pub in_flight: usize,
    /// Messages accepted.
    pub accepted: u64,
    /// Messages refused (452/421).
    pub refused: u64,
}

impl LoadModel {
    /// A model starting now.
    pub fn new(config: LoadConfig) -> LoadModel {
        let now = Instant::now();
        LoadModel {
            config,
            state: Mutex::new(State {
                start: now,
                in_flight: 0,
                queue: 0.0,
                last_drain: now,
                max_queue: 0.0,
                accepted: 0,
                refused: 0,
                next_token: now,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn phase(&self, st: &State, now: Instant) -> Phase {
        let t = now.duration_since(st.start);
        self.config
            .phases
            .iter()
            .rev()
            .find(|(from, _)| t >= *from)
            .map_or(Phase::Normal, |(_, p)| *p)
    }

    fn drain(&self, st: &mut State, now: Instant, factor: f64) {
        let rate = self.config.delivery_rate / factor;
        if rate > 0.0 {
            let dt = now.duration_since(st.last_drain).as_secs_f64();
            st.queue = (st.queue - rate * dt).max(0.0);
        }
        st.last_drain = now;
    }

    /// Drains the queue up to now at the current phase's rate.
    fn drain_now(&self, st: &mut State) {
        let now = Instant::now();
        let factor = match self.phase(st, now) {
            Phase::Slow(f) => f.max(1e-3),
            _ => 1.0,
        };
        self.drain(st, now, factor);
    }

    /// True while the scripted outage lasts (the sink refuses connections).
    pub fn outage(&self) -> bool {
        let st = self.lock();
        self.phase(&st, Instant::now()) == Phase::Outage
    }

    /// A message ends: what to do with it. Call [`LoadModel::done`] after
    /// the wait of an `Accept` or `Refuse`.
    pub fn admit(&self) -> Verdict {
        let now = Instant::now();
        let mut st = self.lock();
        let (factor, cap) = match self.phase(&st, now) {
            Phase::Outage => {
                st.refused += 1;
                return Verdict::Close("421 4.3.2 Service not available".into());
            }
            Phase::Slow(f) => (f.max(1e-3), self.config.max_in_flight),
            Phase::Cap(n) => (1.0, n),
            Phase::Normal => (1.0, self.config.max_in_flight),
        };
        self.drain(&mut st, now, factor);
        if cap > 0 && st.in_flight >= cap {
            st.refused += 1;
            return Verdict::Close("421 4.7.0 Too many concurrent transactions".into());
        }
        st.in_flight += 1;
        let service = (self.config.base + self.config.per_in_flight * (st.in_flight - 1) as u32)
            .mul_f64(factor);
        if st.queue >= self.config.full_queue as f64 {
            st.refused += 1;
            return Verdict::Refuse(service, "452 4.3.1 Insufficient system storage".into());
        }
        let rate = self.config.delivery_rate / factor;
        if st.queue >= self.config.stall_queue as f64 && rate > 0.0 {
            // Wait for the next token, at most `stall`.
            let token = st.next_token.max(now);
            let wait = token.duration_since(now).min(self.config.stall);
            st.next_token = token + Duration::from_secs_f64(1.0 / rate);
            return Verdict::Accept(service + wait);
        }
        st.next_token = now;
        Verdict::Accept(service)
    }

    /// The message of an `Accept`/`Refuse` verdict is answered; an accepted
    /// one joins the queue.
    pub fn done(&self, accepted: bool) {
        let mut st = self.lock();
        self.drain_now(&mut st);
        st.in_flight = st.in_flight.saturating_sub(1);
        if accepted {
            st.accepted += 1;
            if self.config.delivery_rate > 0.0 {
                st.queue += 1.0;
                st.max_queue = st.max_queue.max(st.queue);
            }
        }
    }

    /// Counters now.
    pub fn stats(&self) -> LoadStats {
        let mut st = self.lock();
        self.drain_now(&mut st);
        LoadStats {
            queue: st.queue,
            max_queue: st.max_queue,
            in_flight: st.in_flight,
            accepted: st.accepted,
            refused: st.refused,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn service_time_grows_with_load_and_the_queue_stalls_then_fills() {
        let m = LoadModel::new(LoadConfig {
            delivery_rate: 10.0,
            stall_queue: 2,
            full_queue: 4,
            ..Default::default()
        });
        assert_eq!(m.admit(), Verdict::Accept(Duration::from_millis(2)));
        assert_eq!(m.admit(), Verdict::Accept(Duration::from_micros(2100)));
        m.done(true);
        m.done(true);
        // Two queued: arrivals wait for tokens, one per 100 ms (10/s), at
        // most a second.
        assert_eq!(m.admit(), Verdict::Accept(Duration::from_millis(2)));
        assert_eq!(m.admit(), Verdict::Accept(Duration::from_micros(102_100)));
        m.done(true);
        m.done(true);
        // Queue 4 (above full at 3): refused.
        assert!(matches!(m.admit(), Verdict::Refuse(_, r) if r.starts_with("452")));
        m.done(false);
        // The queue drains at 10/s: after 400 ms it is empty again.
        tokio::time::advance(Duration::from_millis(400)).await;
        assert_eq!(m.stats().queue, 0.0);
        assert_eq!(m.stats().max_queue, 4.0);
    }

    #[tokio::test(start_paused = true)]
    async fn phases_slow_down_and_cut_off() {
        let m = LoadModel::new(LoadConfig {
            max_in_flight: 1,
            phases: vec![
                (Duration::from_secs(1), Phase::Slow(3.0)),
                (Duration::from_secs(2), Phase::Outage),
                (Duration::from_secs(3), Phase::Normal),
            ],
            ..Default::default()
        });
        assert_eq!(m.admit(), Verdict::Accept(Duration::from_millis(2)));
        assert!(matches!(m.admit(), Verdict::Close(r) if r.starts_with("421 4.7.0")));
        m.done(true);
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(m.admit(), Verdict::Accept(Duration::from_millis(6)));
        m.done(true);
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(m.outage());
        assert!(matches!(m.admit(), Verdict::Close(_)));
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(!m.outage());
    }
}
