//! The campaign circuit breaker: a streak of refusals across domains, or a
//! refusal that is about the relay, pauses the campaign. Whether a refusal is
//! about the relay is [`classify::relay_refusal`]'s call; the breaker owns
//! only the counting and the decision to pause.

use std::collections::HashSet;
use std::sync::{Mutex, MutexGuard};

use crate::classify;
use crate::model::Outcome;

/// The per-campaign circuit breaker: when the relay refuses everything (it
/// wants AUTH, it denies relaying, or N refusals in a row across different
/// domains), the campaign pauses with the reason instead of burning the
/// list. Refusals that look like the relay's (auth, relay denied) are
/// recorded as deferred, and the streak that tripped the breaker is
/// requeued by the caller, so `blast resume` sends them again.
#[derive(Debug)]
pub struct Breaker {
    threshold: u32,
    state: Mutex<BreakerState>,
}

#[derive(Debug, Default)]
struct BreakerState {
    streak: Vec<(i64, String)>,
    domains: HashSet<String>,
    tripped: Option<String>,
}

impl Breaker {
    /// A breaker tripping after `threshold` refusals; 0 = never (relay
    /// refusals still trip it).
    pub fn new(threshold: u32) -> Breaker {
        Breaker {
            threshold,
            state: Mutex::new(BreakerState::default()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, BreakerState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Looks at one SMTP outcome; returns the outcome to record (a relay
    /// refusal becomes a deferral: it says nothing about the recipient).
    pub fn observe(&self, id: i64, email: &str, outcome: Outcome) -> Outcome {
        let mut st = self.lock();
        let reply = match &outcome {
            Outcome::Failed(r) if r.code.is_some() => r.clone(),
            _ => {
                // Anything accepted or deferred ends a streak of refusals.
                st.streak.clear();
                st.domains.clear();
                return outcome;
            }
        };
        st.streak.push((id, email.to_string()));
        if let Some((_, domain)) = email.rsplit_once('@') {
            st.domains.insert(domain.to_ascii_lowercase());
        }
        if classify::relay_refusal(&reply) {
            st.tripped.get_or_insert_with(|| {
                format!(
                    "the relay refuses to take mail: {} {}",
                    reply.code.unwrap_or(0),
                    reply.text
                )
            });
            return Outcome::Deferred(reply);
        }
        if self.threshold > 0 && st.streak.len() as u32 >= self.threshold && st.domains.len() >= 3 {
            let reason = format!(
                "{} refusals in a row across {} domains, last: {} {}",
                st.streak.len(),
                st.domains.len(),
                reply.code.unwrap_or(0),
                reply.text
            );
            st.tripped.get_or_insert(reason);
        }
        outcome
    }

    /// Trips for a reason outside any recipient's reply (a relay that
    /// refuses blast's TLS or credentials mid-run).
    pub fn trip(&self, reason: String) {
        self.lock().tripped.get_or_insert(reason);
    }

    /// True once tripped.
    pub fn tripped(&self) -> bool {
        self.lock().tripped.is_some()
    }

    /// Why it tripped.
    pub fn reason(&self) -> Option<String> {
        self.lock().tripped.clone()
    }

    /// The refused recipients of the current streak, when tripped.
    pub fn streak(&self) -> Vec<(i64, String)> {
        let st = self.lock();
        if st.tripped.is_some() {
            st.streak.clone()
        } else {
            Vec::new()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Breaker;
    use crate::classify::relay_refusal;
    use crate::model::{Outcome, Reply, Status};

    fn failed(code: u16, text: &str) -> Outcome {
        Outcome::Failed(Reply {
            code: Some(code),
            enhanced: None,
            text: text.into(),
        })
    }

    fn sent() -> Outcome {
        Outcome::Sent {
            reply: Reply::default(),
            queue_id: None,
        }
    }

    #[test]
    fn a_streak_across_three_domains_trips_it() {
        let b = Breaker::new(5);
        for i in 0..4 {
            b.observe(i, &format!("u@d{}.example", i % 3), failed(550, "no"));
        }
        assert!(!b.tripped());
        b.observe(4, "u@d1.example", failed(550, "no"));
        assert!(b.tripped());
        assert_eq!(b.streak().len(), 5);
        assert!(b
            .reason()
            .unwrap()
            .contains("5 refusals in a row across 3 domains"));
    }

    #[test]
    fn one_domain_refusing_or_an_acceptance_between_does_not() {
        let b = Breaker::new(3);
        for i in 0..10 {
            b.observe(i, "u@one.example", failed(550, "no"));
        }
        assert!(
            !b.tripped(),
            "one domain refusing is that domain's business"
        );
        let b = Breaker::new(3);
        b.observe(1, "u@a.example", failed(550, "no"));
        b.observe(2, "u@b.example", failed(550, "no"));
        b.observe(3, "u@c.example", sent());
        b.observe(4, "u@d.example", failed(550, "no"));
        assert!(!b.tripped());
        assert!(b.streak().is_empty(), "no streak reported until tripped");
    }

    #[test]
    fn a_relay_refusal_trips_at_once_and_becomes_a_deferral() {
        let b = Breaker::new(0);
        let o = b.observe(
            1,
            "u@a.example",
            failed(530, "5.7.0 Authentication required"),
        );
        assert_eq!(o.status(), Status::Deferred);
        assert!(b.tripped());
        assert!(relay_refusal(o.reply()));
        // Local failures (no SMTP code) are not the relay's.
        let b = Breaker::new(1);
        b.observe(1, "u@a.example", Outcome::local_failure("bad address"));
        assert!(!b.tripped());
    }
}
