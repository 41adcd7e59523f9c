//! Where injectors get their next message: the retry queue (failed sessions,
//! 4xx answers sent on to another relay) first, then freshly rendered
//! messages; and when all the work is done.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, MutexGuard};
use std::time::Duration;

use tokio::sync::{mpsc, Mutex, Notify};
use tokio_util::sync::CancellationToken;

use crate::adaptive::Gate;
use crate::model::Outgoing;

/// A rendered message on its way to an injector.
pub(super) struct Job {
    pub(super) out: Outgoing,
    pub(super) attempts: u32,
    pub(super) first_attempt_at: Option<String>,
    /// A connection was lost after this message's data was sent, before the
    /// reply: the MTA may have accepted it already.
    pub(super) ambiguous: bool,
    /// How many times that happened: bounded by
    /// [`RunOptions::ambiguous_tries`](super::RunOptions::ambiguous_tries).
    pub(super) ambiguous_losses: u32,
    /// Relays (bit `r` for relay `r`) that answered this message with a 4xx.
    pub(super) deferred_by: u64,
    /// The fencing token of the claim the recipient was read under.
    pub(super) claim_token: Option<i64>,
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
    fresh: Mutex<mpsc::Receiver<Job>>,
    /// Requeued messages. At most one per injector (each comes from an
    /// injector's hand), so the scan for one a relay may take is short.
    retry: std::sync::Mutex<VecDeque<Job>>,
    /// Woken when a message is requeued.
    requeued: Notify,
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
    /// The fresh channel is closed and drained: the renderers are done.
    fresh_done: AtomicBool,
    /// Cancelled once all work is done, for injectors waiting on their
    /// relay's limit rather than on work.
    pub(super) done: CancellationToken,
}

impl Work {
    /// The work of a run with these relays' gates and injectors per relay,
    /// and the feed its renderers fill, holding up to `queue` messages.
    pub(super) fn new(gates: Vec<Arc<Gate>>, injectors: Vec<usize>, queue: usize) -> (Work, Feed) {
        let (tx, fresh) = mpsc::channel(queue);
        let work = Work {
            fresh: Mutex::new(fresh),
            retry: std::sync::Mutex::new(VecDeque::new()),
            requeued: Notify::new(),
            gates,
            injectors,
            outstanding: Arc::new(AtomicU64::new(0)),
            queued: AtomicU64::new(0),
            fresh_done: AtomicBool::new(false),
            done: CancellationToken::new(),
        };
        let feed = Feed {
            tx,
            outstanding: work.outstanding.clone(),
        };
        (work, feed)
    }

    fn retry_queue(&self) -> MutexGuard<'_, VecDeque<Job>> {
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
    fn take_retry(&self, relay: usize) -> Option<Job> {
        let mut q = self.retry_queue();
        let bit = relay_bit(relay);
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
    pub(super) fn try_next(&self, relay: usize) -> Option<InHand<'_>> {
        self.try_next_job(relay).map(|job| self.hand(job))
    }

    /// [`Work::try_next`] without the guard.
    fn try_next_job(&self, relay: usize) -> Option<Job> {
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
    pub(super) async fn next(&self, relay: usize, stop: &CancellationToken) -> Option<InHand<'_>> {
        let job = self.next_job(relay, stop).await?;
        Some(self.hand(job))
    }

    /// A job in an injector's hand, counted finished when the hand lets go.
    fn hand(&self, job: Job) -> InHand<'_> {
        InHand {
            work: self,
            job: Some(job),
        }
    }

    /// [`Work::next`] without the guard.
    async fn next_job(&self, relay: usize, stop: &CancellationToken) -> Option<Job> {
        loop {
            if stop.is_cancelled() {
                return None;
            }
            let fresh_done = self.fresh_done.load(Ordering::Acquire);
            if fresh_done && self.outstanding.load(Ordering::Acquire) == 0 {
                self.done.cancel();
                return None;
            }
            if let Some(job) = self.try_next_job(relay) {
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

    /// A message left an injector's hand with an outcome (or was dropped
    /// at a stop): it is no longer outstanding.
    fn finished(&self) {
        self.outstanding.fetch_sub(1, Ordering::AcqRel);
    }

    /// Puts a message back for any injector (any relay) to send; it stays
    /// outstanding.
    fn requeue(&self, job: Job) {
        self.queued.fetch_add(1, Ordering::AcqRel);
        self.retry_queue().push_back(job);
        self.requeued.notify_waiters();
    }
}

/// A message in an injector's hand. It leaves the hand in exactly one of
/// three ways: [`InHand::finish`] (it has an outcome), [`InHand::requeue`]
/// (unanswered, back to the queue) or [`InHand::defer_elsewhere`]; dropped
/// any other way (a stop, an abort) it counts as finished, so the end of
/// the run can never wait for a message nobody holds.
#[must_use = "a message dropped from the hand is never sent"]
pub(super) struct InHand<'w> {
    work: &'w Work,
    /// `Some` until one of the consuming methods takes it.
    job: Option<Job>,
}

impl InHand<'_> {
    /// The message.
    pub(super) fn job(&self) -> &Job {
        self.job
            .as_ref()
            .expect("a hand holds its job until consumed")
    }

    /// The message, to note what happened to it.
    pub(super) fn job_mut(&mut self) -> &mut Job {
        self.job
            .as_mut()
            .expect("a hand holds its job until consumed")
    }

    /// The message has an outcome: it leaves the work.
    pub(super) fn finish(mut self) -> Job {
        let job = self
            .job
            .take()
            .expect("a hand holds its job until consumed");
        self.work.finished();
        job
    }

    /// The message was not answered: back to the queue for any relay.
    pub(super) fn requeue(mut self) {
        if let Some(job) = self.job.take() {
            self.work.requeue(job);
        }
    }

    /// After `relay` answered with a 4xx: requeues the message for another
    /// relay that has not deferred it and whose circuit is closed (`None`),
    /// or keeps it in hand when there is none (its 4xx is the outcome).
    pub(super) fn defer_elsewhere(mut self, relay: usize) -> Option<Self> {
        let bit = relay_bit(relay);
        if bit == 0 {
            return Some(self);
        }
        let mask = {
            let job = self.job_mut();
            job.deferred_by |= bit;
            job.deferred_by
        };
        if !self.work.other_relay_usable(mask) {
            return Some(self);
        }
        self.requeue();
        None
    }
}

impl Drop for InHand<'_> {
    fn drop(&mut self) {
        if self.job.take().is_some() {
            self.work.finished();
        }
    }
}

/// The renderers' end of the work: counts a message outstanding before it
/// enters the channel, so that moving between channel, hand and retry
/// queue never shows zero outstanding while work remains.
#[derive(Clone)]
pub(super) struct Feed {
    tx: mpsc::Sender<Job>,
    outstanding: Arc<AtomicU64>,
}

impl Feed {
    /// Hands `job` to the injectors, waiting for room. False when the run
    /// is stopping or the injectors are gone.
    #[cfg(test)]
    pub(super) async fn push(&self, job: Job, stop: &CancellationToken) -> bool {
        self.push_all(&mut vec![job], stop).await
    }

    /// Hands every job in `jobs` to the injectors (leaving `jobs` empty),
    /// waiting for room for as many as the channel holds at a time: one
    /// wake-up of the renderer per batch, not one per message taken. False
    /// when the run is stopping or the injectors are gone.
    pub(super) async fn push_all(&self, jobs: &mut Vec<Job>, stop: &CancellationToken) -> bool {
        while !jobs.is_empty() {
            let n = jobs.len().min(self.tx.max_capacity());
            let permits = tokio::select! {
                biased;
                _ = stop.cancelled() => return false,
                permits = self.tx.reserve_many(n) => match permits {
                    Ok(permits) => permits,
                    Err(_) => return false,
                },
            };
            self.outstanding.fetch_add(n as u64, Ordering::AcqRel);
            for (permit, job) in permits.zip(jobs.drain(..n)) {
                permit.send(job);
            }
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use tokio::time::Instant;
    use tokio_util::sync::CancellationToken;

    use super::{Job, Work};
    use crate::adaptive::{Aimd, Gate};
    use crate::model::{Envelope, Outgoing};

    fn job(id: i64) -> Job {
        Job {
            out: Outgoing {
                envelope: Envelope {
                    recipient_id: id,
                    from: "b@example.com".into(),
                    to: format!("u{id}@example.com"),
                    eight_bit: false,
                },
                email: format!("u{id}@example.com"),
                bytes: Vec::new(),
            },
            attempts: 0,
            first_attempt_at: None,
            ambiguous: false,
            ambiguous_losses: 0,
            deferred_by: 0,
            claim_token: None,
        }
    }

    fn work(relays: usize) -> (Arc<Work>, super::Feed) {
        let gates = (0..relays)
            .map(|_| Arc::new(Gate::new(Aimd::fixed(4, Instant::now()))))
            .collect();
        let (w, f) = Work::new(gates, vec![1; relays], 16);
        (Arc::new(w), f)
    }

    #[tokio::test(start_paused = true)]
    async fn the_work_is_done_only_when_no_hand_and_no_queue_holds_a_message() {
        let (work, feed) = work(1);
        let stop = CancellationToken::new();
        assert!(feed.push(job(1), &stop).await);
        assert!(feed.push(job(2), &stop).await);
        drop(feed);
        let a = work.try_next(0).expect("at hand");
        let b = work.next(0, &stop).await.expect("second");
        // One goes back unanswered; the other is dropped at a stop.
        a.requeue();
        drop(b);
        assert!(!work.done.is_cancelled());
        let a = work.next(0, &stop).await.expect("the requeued one");
        assert_eq!(a.job().out.envelope.recipient_id, 1);
        let finished = tokio::time::timeout(std::time::Duration::from_secs(5), work.next(0, &stop));
        tokio::pin!(finished);
        assert!(
            tokio::time::timeout(std::time::Duration::from_millis(200), &mut finished)
                .await
                .is_err(),
            "not done while a hand holds a message"
        );
        let _ = a.finish();
        assert!(finished.await.expect("done promptly").is_none());
        assert!(work.done.is_cancelled());
    }

    #[tokio::test(start_paused = true)]
    async fn a_deferred_message_goes_to_a_relay_that_did_not_defer_it() {
        let (work, feed) = work(2);
        let stop = CancellationToken::new();
        assert!(feed.push(job(7), &stop).await);
        let hand = work.try_next(0).unwrap();
        assert!(hand.defer_elsewhere(0).is_none(), "relay 1 can take it");
        assert!(work.try_next(0).is_none(), "relay 0 deferred it");
        let hand = work.try_next(1).expect("relay 1 takes it");
        // Deferred by both: the 4xx is its outcome.
        let hand = hand.defer_elsewhere(1).expect("nobody left to take it");
        assert_eq!(hand.job().deferred_by, 0b11);
        let _ = hand.finish();
    }

    #[tokio::test(start_paused = true)]
    async fn a_stop_ends_waiting_for_work() {
        let (work, _feed) = work(1);
        let stop = CancellationToken::new();
        let waiting = {
            let (work, stop) = (work.clone(), stop.clone());
            tokio::spawn(async move { work.next(0, &stop).await.is_none() })
        };
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        stop.cancel();
        assert!(waiting.await.unwrap());
        assert!(!work.done.is_cancelled(), "stopped, not done");
    }
}
