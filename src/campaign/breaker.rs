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
