//! Where injectors get their next message: the retry queue (failed sessions,
//! 4xx answers sent on to another relay) first, then freshly rendered
//! messages; and when all the work is done.

use super::*;

/// A rendered message on its way to an injector.
pub(super) struct Job {
    pub(super) out: Outgoing,
    pub(super) attempts: u32,
    pub(super) first_attempt_at: Option<String>,
    /// A connection was lost after this message's data was sent, before the
    /// reply: the MTA may have accepted it already.
    pub(super) ambiguous: bool,
    /// Relays (bit `r` for relay `r`) that answered this message with a 4xx.
    pub(super) deferred_by: u64,
}

/// Relay `r`'s bit in a [`Job::deferred_by`] mask (none past 64 relays).
pub(super) fn relay_bit(r: usize) -> u64 {
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
pub(super) struct Work {
    pub(super) fresh: Mutex<mpsc::Receiver<Job>>,
    /// Requeued messages. At most one per injector (each comes from an
    /// injector's hand), so the scan for one a relay may take is short.
    pub(super) retry: std::sync::Mutex<std::collections::VecDeque<Job>>,
    /// Woken when a message is requeued.
    pub(super) requeued: tokio::sync::Notify,
    /// Every relay's gate, to tell which relays are usable.
    pub(super) gates: Vec<Arc<Gate>>,
    /// Injectors per relay (a relay with none cannot take a message).
    pub(super) injectors: Vec<usize>,
    /// Messages rendered and not yet recorded: in the fresh channel, in an
    /// injector's hand or in the retry queue. Counted by the renderers
    /// before a message enters the channel and only decremented once it
    /// has an outcome, so moving between hand and queue never shows zero.
    pub(super) outstanding: Arc<AtomicU64>,
    /// Messages in the retry queue.
    pub(super) queued: AtomicU64,
    pub(super) fresh_done: std::sync::atomic::AtomicBool,
    /// Cancelled once all work is done, for injectors waiting on their
    /// relay's limit rather than on work.
    pub(super) done: CancellationToken,
}

impl Work {
    pub(super) fn new(
        fresh: mpsc::Receiver<Job>,
        gates: Vec<Arc<Gate>>,
        injectors: Vec<usize>,
    ) -> Work {
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

    pub(super) fn retry_queue(&self) -> std::sync::MutexGuard<'_, std::collections::VecDeque<Job>> {
        self.retry.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A relay other than those in `mask` that can take a message now:
    /// it has injectors, its circuit is closed and its connections work.
    pub(super) fn other_relay_usable(&self, mask: u64) -> bool {
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
    pub(super) fn take_retry(&self, relay: usize) -> Option<Job> {
        let mut q = self.retry_queue();
        let bit = if relay < 64 { 1u64 << relay } else { 0 };
        let i = q
            .iter()
            .position(|j| j.deferred_by & bit == 0 || !self.other_relay_usable(j.deferred_by))?;
        let job = q.remove(i)?;
        self.queued.fetch_sub(1, Ordering::AcqRel);
        Some(job)
    }

    /// A message at hand, taken without waiting or registering for
    /// wake-ups: the common case while the renderers keep ahead. `None`
    /// when there is none right now (see [`Work::next`] to wait).
    pub(super) fn try_next(&self, relay: usize) -> Option<Job> {
        if self.queued.load(Ordering::Acquire) > 0 {
            if let Some(job) = self.take_retry(relay) {
                return Some(job);
            }
        }
        if self.fresh_done.load(Ordering::Acquire) {
            return None;
        }
        let mut fresh = self.fresh.try_lock().ok()?;
        match fresh.try_recv() {
            Ok(job) => Some(job),
            Err(mpsc::error::TryRecvError::Disconnected) => {
                self.fresh_done.store(true, Ordering::Release);
                None
            }
            Err(mpsc::error::TryRecvError::Empty) => None,
        }
    }

    /// The next message for an injector of `relay`, or `None` when all work
    /// is done or `stop` is cancelled.
    pub(super) async fn next(&self, relay: usize, stop: &CancellationToken) -> Option<Job> {
        loop {
            if stop.is_cancelled() {
                return None;
            }
            let fresh_done = self.fresh_done.load(Ordering::Acquire);
            if fresh_done && self.outstanding.load(Ordering::Acquire) == 0 {
                self.done.cancel();
                return None;
            }
            if let Some(job) = self.try_next(relay) {
                return Some(job);
            }
            if self.fresh_done.load(Ordering::Acquire) != fresh_done {
                continue;
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
    pub(super) fn finished(&self) {
        self.outstanding.fetch_sub(1, Ordering::AcqRel);
    }

    /// Puts a message back for any injector (any relay) to send.
    pub(super) fn requeue(&self, job: Job) {
        self.queued.fetch_add(1, Ordering::AcqRel);
        self.retry_queue().push_back(job);
        self.requeued.notify_waiters();
    }

    /// After `relay` answered `job` with a 4xx: requeues it for another
    /// relay that has not deferred it and whose circuit is closed (`None`),
    /// or gives it back when there is none (its 4xx is the outcome).
    pub(super) fn defer_elsewhere(&self, mut job: Job, relay: usize) -> Option<Job> {
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
