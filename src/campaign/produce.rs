//! The front of the pipeline: pages of recipients from the source, cut into
//! chunks for the render workers, which turn each recipient into a message
//! for the injectors, or into a record of why it gets none (a suppressed
//! address, a message that cannot be built).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use time::OffsetDateTime;
use tokio::sync::{mpsc, Mutex};
use tokio_util::sync::CancellationToken;

use super::work::{Feed, Job};
use super::{Breaker, Stats};
use crate::clock;
use crate::db::Backoff;
use crate::error::Result;
use crate::model::{Outcome, Recipient, Record, Skipped};
use crate::render::{RenderError, Renderer};
use crate::source::Source;

/// Recipients per unit of render work: small enough that a render task
/// never holds a runtime worker for long (about 1 ms), large enough to keep
/// channel traffic low.
pub(super) const RENDER_CHUNK: usize = 32;

/// Chunks of recipients waiting for a render worker.
pub(super) const RENDER_QUEUE_CHUNKS: usize = 8;

/// The render workers' shared input.
pub(super) type Chunks = Arc<Mutex<mpsc::Receiver<Vec<Recipient>>>>;

/// Pages through the source and hands chunks of recipients to the render
/// workers. Returns Ok(true) when the source was exhausted.
pub(super) async fn produce<S: Source>(
    source: &mut S,
    chunks: &mpsc::Sender<Vec<Recipient>>,
    stop: &CancellationToken,
) -> Result<bool> {
    let mut backoff = Backoff::new("audience");
    loop {
        let page = tokio::select! {
            biased;
            _ = stop.cancelled() => return Ok(false),
            page = source.next_page() => page,
        };
        let page = match page {
            Ok(page) => {
                backoff.succeeded();
                page
            }
            // The database restarting: the same page is asked for again.
            Err(e) if backoff.retry(&e).await => continue,
            Err(e) => return Err(e),
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

/// A recipient after rendering.
enum Prepared {
    /// Its message, for the injectors.
    Send(Job),
    /// Why it gets none, for the ledger.
    Skip(Record),
}

/// What a render worker needs besides its input.
#[derive(Clone)]
pub(super) struct RenderWorker {
    /// The compiled templates.
    pub(super) renderer: Arc<Renderer>,
    /// Where messages go.
    pub(super) feed: Feed,
    /// Where recipients that get no message are recorded.
    pub(super) records: mpsc::Sender<Record>,
    /// The run's counters.
    pub(super) stats: Arc<Stats>,
    /// The run's stop signal.
    pub(super) stop: CancellationToken,
    /// Where a template mistake that fails recipient after recipient
    /// pauses the campaign.
    pub(super) breaker: Arc<Breaker>,
    /// The current run of identical render failures.
    pub(super) streak: Arc<RenderStreak>,
}

/// Render failures in a row with the same error: a template mistake (a
/// misspelled variable) fails every recipient alike, so after `threshold`
/// of them the campaign pauses instead of burning the list at render
/// speed. An error that names one row's data differs from row to row and
/// never trips it.
#[derive(Debug, Default)]
pub(super) struct RenderStreak {
    threshold: u32,
    /// A streak is running: lets [`RenderStreak::success`] skip the lock
    /// on the usual path (no failures), once per message.
    active: std::sync::atomic::AtomicBool,
    state: std::sync::Mutex<Option<(String, u32, i64)>>,
}

impl RenderStreak {
    /// A streak that trips after `threshold` identical failures; 0 = never.
    pub(super) fn new(threshold: u32) -> RenderStreak {
        RenderStreak {
            threshold,
            active: std::sync::atomic::AtomicBool::new(false),
            state: std::sync::Mutex::new(None),
        }
    }

    /// A message was built: the streak ends.
    fn success(&self) {
        if self.active.load(Ordering::Relaxed) {
            let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
            *st = None;
            self.active.store(false, Ordering::Relaxed);
        }
    }

    /// Recipient `id` failed with `error`; returns why to pause, once the
    /// same error has failed `threshold` recipients in a row.
    fn failure(&self, id: i64, error: &str) -> Option<String> {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        self.active.store(true, Ordering::Relaxed);
        match st.as_mut() {
            // Workers render in parallel: name the lowest id of the run.
            Some((e, n, first)) if e == error => {
                *n += 1;
                *first = (*first).min(id);
            }
            _ => *st = Some((error.to_string(), 1, id)),
        }
        let (error, n, first) = st.as_ref()?;
        (self.threshold > 0 && *n == self.threshold).then(|| {
            format!(
                "{n} recipients in a row failed to render, from recipient {first}: {error}; \
                 fix the campaign and `blast resume` builds them again"
            )
        })
    }
}

impl RenderWorker {
    /// Recipients in, finished messages out, until the input closes or the
    /// run stops. Several run in parallel so rendering and MIME building
    /// use every core.
    pub(super) async fn run(self, chunks: Chunks) {
        while let Some(chunk) = self.next_chunk(&chunks).await {
            // Rendering a chunk takes about half a millisecond of CPU: on
            // a blocking thread, not on a runtime worker, where it would
            // hold up every injector's reply behind it (at 4 connections
            // through Postfix, 4 ms a transaction, that was a tenth of
            // the rate).
            let worker = self.clone();
            let task = tokio::task::spawn_blocking(move || worker.prepare_chunk(chunk));
            // A panic is logged by `joined`; the run stops rather than
            // lose the chunk's recipients silently (the next pass has them).
            let Ok(Some((mut jobs, records))) = crate::error::joined("a render worker", task).await
            else {
                self.stop.cancel();
                return;
            };
            for record in records {
                if self.records.send(record).await.is_err() {
                    return;
                }
            }
            // The chunk's messages go to the injectors together: the
            // renderer waits for room for all of them at once, so it is
            // woken once per chunk, not once per message taken.
            if !self.feed.push_all(&mut jobs, &self.stop).await {
                return;
            }
        }
    }

    /// The next chunk, or `None` at a stop or once the producer is done.
    async fn next_chunk(&self, chunks: &Chunks) -> Option<Vec<Recipient>> {
        tokio::select! {
            biased;
            _ = self.stop.cancelled() => None,
            chunk = async { chunks.lock().await.recv().await } => chunk,
        }
    }

    /// A chunk's messages, and the records of those that get none.
    fn prepare_chunk(&self, chunk: Vec<Recipient>) -> (Vec<Job>, Vec<Record>) {
        let now = clock::now();
        let mut jobs = Vec::with_capacity(chunk.len());
        let mut records = Vec::new();
        for recipient in chunk {
            match self.prepare(recipient, now) {
                Prepared::Send(job) => jobs.push(job),
                Prepared::Skip(record) => records.push(record),
            }
        }
        (jobs, records)
    }

    /// A recipient's message, or the record of why it gets none: its
    /// address is suppressed, or its message cannot be built.
    fn prepare(&self, recipient: Recipient, now: OffsetDateTime) -> Prepared {
        if let Some(reason) = &recipient.suppressed {
            self.stats.suppressed_unrelayed();
            return Prepared::Skip(Record::suppressed(
                recipient.id,
                recipient.email,
                reason,
                recipient.attempts,
                recipient.first_attempt_at,
                recipient.claim_token,
            ));
        }
        let started = std::time::Instant::now();
        let rendered = self.renderer.render(&recipient, now);
        self.stats.render.record(started.elapsed());
        match rendered {
            Ok(out) => {
                self.streak.success();
                Prepared::Send(Job {
                    out,
                    attempts: recipient.attempts,
                    first_attempt_at: recipient.first_attempt_at,
                    ambiguous: false,
                    ambiguous_losses: 0,
                    deferred_by: 0,
                    claim_token: recipient.claim_token,
                })
            }
            // An address that is no address is a fact about the recipient,
            // like a 5xx: final.
            Err(e @ RenderError::InvalidAddress { .. }) => {
                let outcome = Outcome::local_failure(e.to_string());
                self.stats.count_unrelayed(&outcome);
                Prepared::Skip(Record {
                    recipient_id: recipient.id,
                    email: recipient.email,
                    outcome,
                    relay: None,
                    attempts: recipient.attempts,
                    first_attempt_at: recipient.first_attempt_at,
                    skipped: None,
                    claim_token: recipient.claim_token,
                })
            }
            Err(e) => Prepared::Skip(self.unrendered(recipient, &e)),
        }
    }

    /// The record of a recipient whose message could not be built: not
    /// final, so the next pass builds it again once the cause is fixed.
    fn unrendered(&self, recipient: Recipient, e: &RenderError) -> Record {
        let error = e.to_string();
        self.stats.unrendered(recipient.id, &error);
        if let Some(why) = self.streak.failure(recipient.id, &error) {
            tracing::error!("{why} (pausing the campaign)");
            self.breaker.trip(why);
            self.stop.cancel();
        }
        Record {
            recipient_id: recipient.id,
            outcome: Outcome::local_failure(format!("row {}: {error}", recipient.id)),
            email: recipient.email,
            relay: None,
            attempts: recipient.attempts,
            first_attempt_at: recipient.first_attempt_at,
            skipped: Some(Skipped::Unrendered),
            claim_token: recipient.claim_token,
        }
    }
}
