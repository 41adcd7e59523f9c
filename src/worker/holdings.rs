//! What this worker holds, in memory: its claims (id ranges with their
//! fencing tokens), how far each is sent and recorded, and until when each
//! may still be sent from by the local monotonic clock. No SQL here: the
//! source, the injectors, the ledger and the keeper share one
//! [`Holdings`], and only the keeper and the claims module talk to the
//! database about it.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// One claim: recipient ids `first..=last` under fencing token `token`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Claim {
    /// First id of the range.
    pub first: i64,
    /// Last id of the range.
    pub last: i64,
    /// The fencing token the range was granted with.
    pub token: i64,
}

/// Where a held claim is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Standing {
    /// Held and being sent from.
    Live,
    /// Every recipient yielded and recorded: the database marks it done.
    Complete,
    /// A message could not be sent in time (the claim's lease had run out
    /// locally): given back to the pool for whoever takes it next.
    Forfeit,
    /// Another worker holds it now.
    Lost,
}

#[derive(Debug)]
struct Held {
    claim: Claim,
    standing: Standing,
    /// Sending is safe until this instant (a heartbeat moves it on).
    valid_until: Instant,
    yielded: u64,
    recorded: u64,
    exhausted: bool,
}

/// This worker's claims. Every claim it was ever granted is kept (there
/// are a few thousand in a 10M campaign at most), so a late record can
/// still be fenced with the token it was sent under.
#[derive(Debug)]
pub struct Holdings {
    held: Mutex<Vec<Held>>,
    ttl: Duration,
}

impl Holdings {
    /// Holdings whose claims last `ttl` after each heartbeat.
    pub fn new(ttl: Duration) -> Holdings {
        Holdings {
            held: Mutex::new(Vec::new()),
            ttl,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Held>> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// How long before a claim's lease runs out this worker stops sending
    /// from it: a third of the TTL, so a transaction started just before
    /// ends before anyone else may take the range. A healthy worker renews
    /// every sixth of the TTL and never comes near it.
    fn margin(&self) -> Duration {
        self.ttl / 3
    }

    /// A claim granted at `asked` (the instant the grant was requested).
    pub fn add(&self, claim: Claim, asked: Instant) {
        self.lock().push(Held {
            claim,
            standing: Standing::Live,
            valid_until: asked + self.ttl,
            yielded: 0,
            recorded: 0,
            exhausted: false,
        });
    }

    /// The live claims, for the heartbeat.
    pub fn live(&self) -> Vec<Claim> {
        self.lock()
            .iter()
            .filter(|h| h.standing == Standing::Live)
            .map(|h| h.claim)
            .collect()
    }

    /// The heartbeat asked at `asked` renewed `claim`.
    pub fn renewed(&self, claim: Claim, asked: Instant) {
        if let Some(h) = self.find_mut(&mut self.lock(), claim) {
            h.valid_until = h.valid_until.max(asked + self.ttl);
        }
    }

    /// `claim` changed hands (or its campaign's pass was reset).
    pub fn lost(&self, claim: Claim) {
        if let Some(h) = self.find_mut(&mut self.lock(), claim) {
            h.standing = Standing::Lost;
        }
    }

    fn find_mut<'a>(&self, held: &'a mut [Held], claim: Claim) -> Option<&'a mut Held> {
        held.iter_mut().rev().find(|h| h.claim == claim)
    }

    /// Claims given back after a message from them could not be sent in
    /// time; the keeper releases them in the database.
    pub fn take_forfeited(&self) -> Vec<Claim> {
        let mut held = self.lock();
        let out = held
            .iter()
            .filter(|h| h.standing == Standing::Forfeit)
            .map(|h| h.claim)
            .collect();
        for h in held.iter_mut().filter(|h| h.standing == Standing::Forfeit) {
            h.standing = Standing::Lost;
        }
        out
    }

    /// Whether `claim` may still be paged through.
    pub fn is_live(&self, claim: Claim) -> bool {
        self.find_mut(&mut self.lock(), claim)
            .is_some_and(|h| h.standing == Standing::Live)
    }

    /// The source handed `n` recipients of `claim` to the pipeline.
    pub fn yielded(&self, claim: Claim, n: usize) {
        if let Some(h) = self.find_mut(&mut self.lock(), claim) {
            h.yielded += n as u64;
        }
    }

    /// The source paged past the end of `claim`. Returns it when it is
    /// complete already (everything yielded was recorded).
    pub fn exhausted(&self, claim: Claim) -> Option<Claim> {
        let mut held = self.lock();
        let h = self.find_mut(&mut held, claim)?;
        h.exhausted = true;
        Self::complete_if_done(h)
    }

    fn complete_if_done(h: &mut Held) -> Option<Claim> {
        if h.standing == Standing::Live && h.exhausted && h.recorded >= h.yielded {
            h.standing = Standing::Complete;
            return Some(h.claim);
        }
        None
    }

    /// The grant recipient `id` was read under: the claim carrying `token`
    /// (the recipient's [`claim_token`](crate::model::Recipient::claim_token))
    /// that covers `id`; without a token, the latest claim covering it.
    /// A range taken back after it was forfeited is a new grant: messages
    /// read under the old one still belong to the old one, which sends and
    /// records nothing more.
    fn grant(held: &mut [Held], id: i64, token: Option<i64>) -> Option<&mut Held> {
        held.iter_mut()
            .rev()
            .filter(|h| h.claim.first <= id && id <= h.claim.last)
            .find(|h| token.is_none_or(|t| h.claim.token == t))
    }

    /// The claim a record of recipient `id`, read under `token`, belongs
    /// to. None for an id this worker never claimed under that token.
    pub fn claim_of(&self, id: i64, token: Option<i64>) -> Option<Claim> {
        Self::grant(&mut self.lock(), id, token).map(|h| h.claim)
    }

    /// The ledger wrote records for these `(id, token)` pairs. Returns the
    /// claims that became complete (for the same transaction to mark done).
    pub fn recorded(&self, ids: impl IntoIterator<Item = (i64, Option<i64>)>) -> Vec<Claim> {
        let mut held = self.lock();
        let mut done = Vec::new();
        for (id, token) in ids {
            let Some(h) = Self::grant(&mut held, id, token) else {
                continue;
            };
            h.recorded += 1;
            done.extend(Self::complete_if_done(h));
        }
        done
    }

    /// Whether a message for recipient `id`, read under `token`, may go
    /// out now: that grant is live and its lease has more than the margin
    /// left by the local monotonic clock. When not, the claim is forfeited:
    /// nothing more is sent from it and it goes back to the pool.
    pub fn may_send(&self, id: i64, token: Option<i64>) -> bool {
        let now = Instant::now();
        let margin = self.margin();
        let mut held = self.lock();
        let Some(h) = Self::grant(&mut held, id, token) else {
            return false;
        };
        match h.standing {
            Standing::Live if h.valid_until > now + margin => true,
            Standing::Live => {
                tracing::warn!(
                    "claim {}..={} (token {}): its lease ran out before it could be renewed \
                     (was this process stopped?); sending nothing more from it",
                    h.claim.first,
                    h.claim.last,
                    h.claim.token
                );
                h.standing = Standing::Forfeit;
                false
            }
            // Complete claims have nothing left to send; the rest are gone.
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claim(first: i64, last: i64, token: i64) -> Claim {
        Claim { first, last, token }
    }

    #[test]
    fn a_claim_completes_when_exhausted_and_everything_is_recorded() {
        let h = Holdings::new(Duration::from_secs(30));
        let c = claim(1, 100, 7);
        h.add(c, Instant::now());
        h.yielded(c, 3);
        assert!(h.recorded([(1, Some(7)), (2, Some(7))]).is_empty());
        assert_eq!(h.exhausted(c), None, "one record still missing");
        assert_eq!(h.recorded([(3, Some(7))]), vec![c]);
        assert!(!h.is_live(c));
        // An empty claim is complete as soon as the source passes it.
        let e = claim(101, 200, 8);
        h.add(e, Instant::now());
        assert_eq!(h.exhausted(e), Some(e));
    }

    #[test]
    fn records_belong_to_the_latest_claim_covering_them() {
        let h = Holdings::new(Duration::from_secs(30));
        h.add(claim(1, 10, 1), Instant::now());
        h.lost(claim(1, 10, 1));
        h.add(claim(1, 10, 5), Instant::now());
        assert_eq!(h.claim_of(4, None), Some(claim(1, 10, 5)));
        assert_eq!(h.claim_of(4, Some(5)), Some(claim(1, 10, 5)));
        assert_eq!(h.claim_of(4, Some(1)), Some(claim(1, 10, 1)));
        assert_eq!(h.claim_of(4, Some(9)), None, "never granted with token 9");
        assert_eq!(h.claim_of(11, None), None);
        assert_eq!(h.live(), vec![claim(1, 10, 5)]);
    }

    #[test]
    fn a_claim_whose_lease_ran_out_locally_is_forfeited_once() {
        let h = Holdings::new(Duration::from_secs(3));
        let c = claim(1, 10, 1);
        h.add(c, Instant::now());
        assert!(h.may_send(5, Some(1)));
        assert!(!h.may_send(11, Some(1)), "never claimed");
        // Granted long ago: the lease has less than the margin left.
        let d = claim(20, 30, 2);
        h.add(d, Instant::now() - Duration::from_secs(2));
        assert!(!h.may_send(25, Some(2)));
        assert!(!h.may_send(26, Some(2)));
        assert_eq!(h.take_forfeited(), vec![d]);
        assert!(h.take_forfeited().is_empty());
        assert!(h.may_send(5, Some(1)), "the other claim is untouched");
        // A lost claim sends nothing.
        h.lost(c);
        assert!(!h.may_send(5, Some(1)));
    }

    #[test]
    fn a_range_taken_back_is_a_new_grant() {
        // Stopped past its lease: the first message it tries forfeits the
        // claim; the keeper gives it back and the source takes it again
        // under a new token, while messages read under the old one are
        // still queued.
        let h = Holdings::new(Duration::from_secs(3));
        let old = claim(1, 100, 4);
        h.add(old, Instant::now() - Duration::from_secs(10));
        h.yielded(old, 100);
        assert!(!h.may_send(1, Some(4)));
        assert_eq!(h.take_forfeited(), vec![old]);
        let new = claim(1, 100, 9);
        h.add(new, Instant::now());
        // The queued messages of the old grant stay unsent although the
        // same ids are live again under the new token.
        assert!(!h.may_send(2, Some(4)), "a message of the old grant");
        assert!(h.may_send(2, Some(9)));
        // Records of the old grant do not count toward the new one: the new
        // grant completes only when its own recipients are recorded.
        h.yielded(new, 2);
        assert!(h.recorded([(1, Some(4)), (2, Some(4))]).is_empty());
        assert_eq!(
            h.exhausted(new),
            None,
            "nothing of the new grant recorded yet"
        );
        assert_eq!(h.recorded([(1, Some(9)), (2, Some(9))]), vec![new]);
    }
}
