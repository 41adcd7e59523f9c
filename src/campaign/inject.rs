//! One SMTP injector: one connection, one transaction at a time, in four
//! steps per message: acquire a slot under its relay's limit, take a
//! message, send it, settle the answer. Slots ([`Permit`]) and messages
//! ([`InHand`]) are guards that give themselves back when dropped, so no
//! path out of a step (a stop, an abort, a lost connection) can leak a
//! slot or leave the end of the run waiting for a message nobody holds.

use std::sync::Arc;
use std::time::Duration;

use governor::DefaultDirectRateLimiter;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::work::{relay_bit, InHand, Job, Work, AMBIGUOUS_NOTE};
use super::{Breaker, Rate, Stats};
use crate::adaptive::{Gate, Mark, Permit};
use crate::clock;
use crate::model::{Outcome, Record};
use crate::suppress::Live;
use crate::transport::{Session, SessionError, Transport};
use crate::worker::Holdings;

/// An injector kept out of its relay's limit, or waiting for work, this long
/// closes its connection.
const IDLE_CLOSE: Duration = Duration::from_secs(5);
/// Reconnect backoff bounds after a lost connection.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// What an injector does after a step.
enum Flow {
    /// On to the next message.
    Next,
    /// The run is over for this injector.
    Stop,
}

/// How a send ended. (Returned once per message on the stack: boxing the
/// large variant would cost an allocation per message for nothing.)
#[allow(clippy::large_enum_variant)]
enum Sent<'w> {
    /// The server answered; with the next message if it was taken ahead
    /// (its envelope may be on the wire already: see [`Session::pending`]).
    Answered(Outcome, Option<InHand<'w>>),
    /// The session broke before an answer.
    Lost(SessionError),
    /// The operator's second SIGINT abandoned the transaction.
    Abandoned,
}

/// A message checked against the suppressions that arrived mid-run.
enum Unsuppressed<'w> {
    /// Still to be sent.
    Send(InHand<'w>),
    /// Suppressed meanwhile: the record that says so.
    Skip(Record),
}

/// One injector's connection and its reconnect backoff.
struct Conn<S> {
    session: Option<S>,
    backoff: Duration,
}

impl<S: Session> Conn<S> {
    /// Closes the session politely, if there is one.
    async fn close(&mut self) {
        if let Some(s) = self.session.take() {
            s.close().await;
        }
    }

    /// The message whose envelope was written ahead will not be sent on
    /// this session: the session goes (the server discards the
    /// transaction it was waiting to receive).
    fn drop_pending(&mut self) {
        if self.session.as_ref().is_some_and(|s| s.pending()) {
            self.session = None;
        }
    }
}

/// One SMTP injector: one connection, one transaction at a time.
pub(super) struct Injector<T: Transport> {
    /// Its number among all injectors (for per-injector stats).
    pub(super) slot: usize,
    /// Its number among its relay's injectors.
    pub(super) rank: usize,
    /// The relay it sends to.
    pub(super) relay: usize,
    /// That relay, as logs and the ledger name it.
    pub(super) relay_name: String,
    /// That relay's limit and circuit.
    pub(super) gate: Arc<Gate>,
    /// That relay's own rate limit, if any.
    pub(super) relay_limiter: Option<Arc<DefaultDirectRateLimiter>>,
    /// The campaign's rate limit (this worker's share).
    pub(super) rate: Arc<Rate>,
    /// The claims this worker holds, if it works by claims.
    pub(super) holdings: Option<Arc<Holdings>>,
    /// The transport.
    pub(super) transport: Arc<T>,
    /// Where messages come from.
    pub(super) work: Arc<Work>,
    /// Where outcomes go.
    pub(super) records: mpsc::Sender<Record>,
    /// The run's counters.
    pub(super) stats: Arc<Stats>,
    /// The campaign's circuit breaker.
    pub(super) breaker: Arc<Breaker>,
    /// Ambiguous losses of one message before it is given up.
    pub(super) ambiguous_tries: u32,
    /// Finish the transaction at hand, then stop.
    pub(super) stop: CancellationToken,
    /// Abandon the transaction at hand.
    pub(super) abort: CancellationToken,
    /// Addresses suppressed since the run started.
    pub(super) suppressions: Live,
}

impl<T: Transport> Injector<T> {
    /// Sends messages until the work is done or the run stops.
    pub(super) async fn run(self) {
        let mut conn = Conn {
            session: None,
            backoff: BACKOFF_MIN,
        };
        // The next message, taken while the last one was sent.
        let mut ahead: Option<InHand<'_>> = None;
        loop {
            let (permit, hand) = match ahead.take() {
                // Sent on at once if the relay has room; otherwise it goes
                // back for any injector rather than wait in this hand.
                Some(hand) => match self.acquire_now() {
                    Some(permit) => (permit, hand),
                    None => {
                        conn.drop_pending();
                        hand.requeue();
                        continue;
                    }
                },
                None => {
                    let Some(permit) = self.acquire(&mut conn).await else {
                        break;
                    };
                    let Some(hand) = self.take(&mut conn).await else {
                        break;
                    };
                    (permit, hand)
                }
            };
            match self.deliver(&mut conn, permit, hand).await {
                (Flow::Stop, next) => {
                    if let Some(next) = next {
                        conn.drop_pending();
                        next.requeue();
                    }
                    break;
                }
                (Flow::Next, next) => ahead = next,
            }
        }
        // After an abort the session is mid-transaction: drop it, no QUIT.
        if !self.abort.is_cancelled() {
            conn.close().await;
        }
    }

    /// A slot under this relay's limit: a relay with room takes the next
    /// message, one that is congested or down does not. Kept out of the
    /// limit for a while, the injector frees the MTA's process.
    async fn acquire(&self, conn: &mut Conn<T::Session>) -> Option<Permit> {
        loop {
            tokio::select! {
                biased;
                _ = self.stop.cancelled() => return None,
                _ = self.work.done.cancelled() => return None,
                p = self.gate.acquire_ranked(self.rank) => return Some(p),
                _ = tokio::time::sleep(IDLE_CLOSE), if conn.session.is_some() => conn.close().await,
            }
        }
    }

    /// A slot at once, or `None` if the relay has no room now or the run
    /// is stopping.
    fn acquire_now(&self) -> Option<Permit> {
        if self.stop.is_cancelled() || self.work.done.is_cancelled() {
            return None;
        }
        self.gate.try_acquire_ranked(self.rank)
    }

    /// The next message. One at hand needs no idle timer (the per-message
    /// path); waiting for one (the renderers behind, or the tail of the
    /// run) closes an idle session, before the relay's own timeout can turn
    /// the next message into an ambiguous loss.
    async fn take(&self, conn: &mut Conn<T::Session>) -> Option<InHand<'_>> {
        if self.stop.is_cancelled() {
            return None;
        }
        if let Some(hand) = self.work.try_next(self.relay) {
            return Some(hand);
        }
        let next = self.work.next(self.relay, &self.stop);
        tokio::pin!(next);
        loop {
            tokio::select! {
                biased;
                hand = &mut next => return hand,
                _ = tokio::time::sleep(IDLE_CLOSE), if conn.session.is_some() => conn.close().await,
            }
        }
    }

    /// One message from the hand to the ledger; with the next message if
    /// one was taken ahead.
    async fn deliver<'w>(
        &'w self,
        conn: &mut Conn<T::Session>,
        mut permit: Permit,
        hand: InHand<'w>,
    ) -> (Flow, Option<InHand<'w>>) {
        let hand = match self.unsuppressed(hand) {
            Unsuppressed::Send(hand) => hand,
            Unsuppressed::Skip(record) => {
                drop(permit);
                conn.drop_pending();
                return (self.record(record).await, None);
            }
        };
        if !self.pace().await {
            return (Flow::Stop, None);
        }
        // Checked last, just before the transaction: a worker that lost
        // its claim (stopped past its lease) sends nothing more from it.
        // The message is not recorded; whoever holds the claim sends it.
        if !self.claimed(hand.job()) {
            conn.drop_pending();
            return (Flow::Next, None);
        }
        permit.begin();
        match self.send(conn, &hand).await {
            Sent::Answered(outcome, next) => {
                conn.backoff = BACKOFF_MIN;
                let flow = self.settle(permit, hand, outcome).await;
                (flow, next)
            }
            Sent::Lost(e) => (self.lost(conn, permit, hand, e).await, None),
            Sent::Abandoned => (Flow::Stop, None),
        }
    }

    /// The next message, taken now so that its envelope can follow this
    /// message's data in the same write ([`Session::send_then`]): only
    /// when the session does that, no rate limit would hold it back, and
    /// one is ready without waiting. Its checks (suppressed meanwhile,
    /// claim still held) come as for any message, in [`Injector::deliver`];
    /// the rare one that fails them drops the session with its envelope.
    fn take_ahead(&self, session: &T::Session) -> Option<InHand<'_>> {
        if !session.writes_ahead()
            || self.rate.current().is_some()
            || self.relay_limiter.is_some()
            || self.stop.is_cancelled()
        {
            return None;
        }
        self.work.try_next(self.relay)
    }

    /// The message, unless its address was suppressed after its page was
    /// read (an unsubscribe takes effect while the campaign runs): then the
    /// record that says so.
    fn unsuppressed<'w>(&self, hand: InHand<'w>) -> Unsuppressed<'w> {
        let Some(why) = self.suppressions.get(&hand.job().out.email) else {
            return Unsuppressed::Send(hand);
        };
        self.stats
            .add_on(self.relay, &self.stats.suppressed, |r| &r.suppressed);
        let job = hand.finish();
        Unsuppressed::Skip(Record::suppressed(
            job.out.envelope.recipient_id,
            job.out.email,
            &why,
            job.attempts,
            job.first_attempt_at,
            job.claim_token,
        ))
    }

    /// Whether this worker may send `job` now: it still holds the grant the
    /// recipient was read under (always, when it works without claims).
    fn claimed(&self, job: &Job) -> bool {
        self.holdings
            .as_ref()
            .is_none_or(|h| h.may_send(job.out.envelope.recipient_id, job.claim_token))
    }

    /// Waits for the campaign's and the relay's rate limits; false when
    /// stopped meanwhile.
    async fn pace(&self) -> bool {
        let campaign = self.rate.current();
        for l in [&campaign, &self.relay_limiter].into_iter().flatten() {
            tokio::select! {
                biased;
                _ = self.stop.cancelled() => return false,
                _ = l.until_ready() => {}
            }
        }
        true
    }

    /// Sends the message, connecting first if needed, and the next one's
    /// envelope behind it when it can.
    async fn send<'w>(&'w self, conn: &mut Conn<T::Session>, hand: &InHand<'w>) -> Sent<'w> {
        let session = match conn.session.take() {
            Some(s) => s,
            None => match self.transport.connect(self.relay).await {
                Ok(s) => s,
                Err(e) => return Sent::Lost(e),
            },
        };
        let session = conn.session.insert(session);
        let job = hand.job();
        let next = self.take_ahead(session);
        let next_envelope = next.as_ref().map(|n| &n.job().out.envelope);
        tokio::select! {
            biased;
            _ = self.abort.cancelled() => Sent::Abandoned,
            r = session.send_then(&job.out.envelope, &job.out.bytes, next_envelope) => match r {
                Ok(outcome) => {
                    self.stats
                        .transaction(self.slot, self.relay, session.latency());
                    Sent::Answered(outcome, next)
                }
                Err(e) => {
                    // Unsent: back for any injector.
                    if let Some(next) = next {
                        next.requeue();
                    }
                    Sent::Lost(e)
                }
            },
        }
    }

    /// The session is gone and the message unanswered: back to the queue
    /// (another relay may take it), and this injector waits before its
    /// relay is tried again.
    async fn lost(
        &self,
        conn: &mut Conn<T::Session>,
        permit: Permit,
        mut hand: InHand<'_>,
        e: SessionError,
    ) -> Flow {
        conn.session = None;
        permit.release(Some(Mark::Connection));
        let job = hand.job_mut();
        job.ambiguous |= e.ambiguous;
        job.ambiguous_losses += u32::from(e.ambiguous);
        if job.ambiguous_losses >= self.ambiguous_tries {
            if let Flow::Stop = self.give_up_ambiguous(hand, &e).await {
                return Flow::Stop;
            }
        } else {
            hand.requeue();
        }
        if self.settings_failed(&e) || !self.wait_retry(&e, &mut conn.backoff).await {
            return Flow::Stop;
        }
        Flow::Next
    }

    /// Every try of this message lost its connection after the data: the
    /// MTA may hold it several times already. Recorded failed (final), with
    /// "possibly delivered" in the reply, rather than sent forever.
    async fn give_up_ambiguous(&self, hand: InHand<'_>, e: &SessionError) -> Flow {
        let job = hand.finish();
        self.stats
            .add_on(self.relay, &self.stats.possibly_delivered, |r| {
                &r.possibly_delivered
            });
        let outcome = Outcome::local_failure(format!(
            "possibly delivered: the connection was lost after the message data {} times; \
             not sent again (last: {})",
            job.ambiguous_losses, e.message
        ));
        tracing::warn!(
            "recipient {}: {}",
            job.out.envelope.recipient_id,
            outcome.reply().text
        );
        self.record_outcome(job, outcome).await
    }

    /// The server answered: the slot is released with its mark, a 4xx goes
    /// on to another relay if one can take it, anything else is recorded.
    async fn settle(&self, permit: Permit, hand: InHand<'_>, mut outcome: Outcome) -> Flow {
        // A 4xx is congestion (never a latency sample); 2xx and 5xx are samples.
        let deferred = matches!(&outcome, Outcome::Deferred(r) if r.code.is_some_and(|c| (400..500).contains(&c)));
        permit.release(deferred.then_some(Mark::Deferred));
        // A 4xx says "not now, not here": another relay that has not
        // deferred this message takes it at once, so a relay refusing
        // fast does not defer the campaign's recipients.
        let hand = match deferred {
            true => match hand.defer_elsewhere(self.relay) {
                None => {
                    self.stats
                        .add_on(self.relay, &self.stats.rerouted, |r| &r.rerouted);
                    return Flow::Next;
                }
                Some(hand) => hand,
            },
            false => hand,
        };
        let job = hand.finish();
        if job.ambiguous {
            // Lost after the message data once: the MTA may have it twice.
            self.stats
                .add_on(self.relay, &self.stats.possibly_duplicated, |r| {
                    &r.possibly_duplicated
                });
            outcome.note(AMBIGUOUS_NOTE);
        }
        let id = job.out.envelope.recipient_id;
        let outcome = self
            .breaker
            .observe(&self.relay_name, id, &job.out.email, outcome);
        if self.breaker.tripped() {
            self.stop.cancel();
        }
        self.record_outcome(job, outcome).await
    }

    /// Counts `job`'s outcome on this relay and hands it to the ledger.
    async fn record_outcome(&self, job: Job, outcome: Outcome) -> Flow {
        self.stats.count_on(self.relay, &outcome);
        self.record(Record {
            recipient_id: job.out.envelope.recipient_id,
            email: job.out.email,
            outcome,
            relay: Some(self.relay_name.clone()),
            attempts: job.attempts,
            first_attempt_at: job.first_attempt_at,
            skipped: None,
            claim_token: job.claim_token,
        })
        .await
    }

    /// Hands a record to the ledger; a ledger that is gone ends the run.
    async fn record(&self, record: Record) -> Flow {
        match self.records.send(record).await {
            Ok(()) => Flow::Next,
            Err(_) => Flow::Stop,
        }
    }

    /// A setting went wrong mid-run (a certificate, a password, STARTTLS
    /// gone): with no other relay to carry on, pauses the campaign for the
    /// operator (true) instead of retrying forever.
    fn settings_failed(&self, e: &SessionError) -> bool {
        if !e.permanent || self.work.other_relay_usable(relay_bit(self.relay)) {
            return false;
        }
        let relay = &self.relay_name;
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
    async fn wait_retry(&self, e: &SessionError, backoff: &mut Duration) -> bool {
        self.stats
            .add_on(self.relay, &self.stats.retries, |r| &r.retries);
        // Jitter keeps N injectors from reconnecting in lockstep.
        let jitter =
            Duration::from_millis((self.slot as u64 * 37 + clock::now().nanosecond() as u64) % 100);
        let wait = *backoff + jitter;
        tracing::warn!(
            "injector {}: {} unreachable ({e}), retrying in {:.1}s",
            self.slot,
            self.relay_name,
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
