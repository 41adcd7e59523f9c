//! An in-memory transport for tests: records every message it is given and
//! answers with outcomes scripted per address (default: sent). It can also
//! refuse to connect, lose sessions mid-transaction and take time per
//! message (on tokio's clock, so paused-time tests stay instant), to test
//! the runner's unreachable-relay, retry, backpressure and abort paths.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::{SessionError, Transport};
use crate::classify;
use crate::model::{Envelope, Outcome};

/// A message the stub received.
#[derive(Debug, Clone)]
pub struct Delivered {
    /// The envelope it came with.
    pub envelope: Envelope,
    /// The message bytes.
    pub message: Vec<u8>,
}

/// Shared state behind a [`Stub`].
#[derive(Debug, Default)]
struct Inner {
    delivered: Vec<Delivered>,
    scripted: HashMap<String, Outcome>,
    refuse_connect: bool,
    /// Sessions still to lose, and whether after the message data.
    lose: std::collections::VecDeque<bool>,
    latency: Duration,
    connections: u64,
}

/// The test double. Clones share state.
#[derive(Debug, Clone, Default)]
pub struct Stub {
    inner: Arc<Mutex<Inner>>,
}

impl Stub {
    /// A stub that accepts everything.
    pub fn new() -> Stub {
        Stub::default()
    }

    /// Answers `outcome` for `address` from now on.
    pub fn script(&self, address: &str, outcome: Outcome) {
        self.lock()
            .scripted
            .insert(address.to_ascii_lowercase(), outcome);
    }

    /// Makes every `connect` fail (or succeed again).
    pub fn refuse_connections(&self, refuse: bool) {
        self.lock().refuse_connect = refuse;
    }

    /// The next `n` sends lose their session instead of answering;
    /// `ambiguous`: lost after the message data (the MTA may have it).
    pub fn lose_sessions(&self, n: usize, ambiguous: bool) {
        self.lock().lose.extend(std::iter::repeat_n(ambiguous, n));
    }

    /// Every send takes `latency` before its answer (tokio time).
    pub fn set_latency(&self, latency: Duration) {
        self.lock().latency = latency;
    }

    /// Sessions opened so far.
    pub fn connections(&self) -> u64 {
        self.lock().connections
    }

    /// Everything delivered so far, in order.
    pub fn delivered(&self) -> Vec<Delivered> {
        self.lock().delivered.clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panicking test thread must not hide the state from the others.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A session on the stub; shares its state.
#[derive(Debug)]
pub struct StubSession {
    stub: Stub,
}

impl Transport for Stub {
    type Session = StubSession;

    async fn connect(&self, _slot: usize) -> Result<StubSession, SessionError> {
        let mut inner = self.lock();
        if inner.refuse_connect {
            return Err(SessionError {
                message: "stub: connection refused".into(),
                ambiguous: false,
                permanent: false,
            });
        }
        inner.connections += 1;
        Ok(StubSession { stub: self.clone() })
    }

    fn describe(&self, _slot: usize) -> String {
        "stub".into()
    }
}

impl super::Session for StubSession {
    async fn send(&mut self, envelope: &Envelope, message: &[u8]) -> Result<Outcome, SessionError> {
        let latency = self.stub.lock().latency;
        if !latency.is_zero() {
            tokio::time::sleep(latency).await;
        }
        let mut inner = self.stub.lock();
        if let Some(ambiguous) = inner.lose.pop_front() {
            return Err(SessionError {
                message: "stub: connection lost".into(),
                ambiguous,
                permanent: false,
            });
        }
        if let Some(o) = inner.scripted.get(&envelope.to.to_ascii_lowercase()) {
            return Ok(o.clone());
        }
        inner.delivered.push(Delivered {
            envelope: envelope.clone(),
            message: message.to_vec(),
        });
        let id = format!("STUB{}", inner.delivered.len());
        Ok(classify::outcome(classify::reply(
            250,
            &[&format!("2.0.0 Ok: queued as {id}")],
        )))
    }

    async fn close(self) {}
}
