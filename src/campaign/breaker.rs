//! The campaign circuit breaker: a streak of refusals across domains, a
//! high rate of refusals that would suppress the address (5.1.x "user
//! unknown" and its kin) from one relay, or a refusal that is about the
//! relay, pauses the campaign. Whether a refusal is about the relay or the
//! address is [`classify`]'s call; the breaker owns only the counting, the
//! decision to pause, and the list of refusals to requeue.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Mutex, MutexGuard};

use time::OffsetDateTime;

use crate::address::Address;
use crate::classify;
use crate::clock;
use crate::model::Outcome;

/// Answers a relay must have given before its refusal rate is judged (or
/// the whole window, if smaller): a few refusals at the start of a run are
/// no rate.
pub(super) const MIN_ANSWERS: usize = 50;

/// The rate rule: trip when at least `rate` of the last `window` answers of
/// one relay refused the address in a way that suppresses it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateRule {
    /// Fraction of answers, 0 to 1; 0 turns the rule off. Defaults to 0.5.
    pub rate: f64,
    /// Answers per relay the rate is taken over. Defaults to 200.
    pub window: u32,
}

impl Default for RateRule {
    fn default() -> Self {
        RateRule {
            rate: 0.5,
            window: 200,
        }
    }
}

impl RateRule {
    /// The rule switched off.
    pub const OFF: RateRule = RateRule {
        rate: 0.0,
        window: 200,
    };
}

/// The per-campaign circuit breaker: when the relay refuses everything (it
/// wants AUTH, it denies relaying, or N refusals in a row across different
/// domains), or refuses most addresses as unknown (a relay that wrongly
/// rejects most but not all recipients), the campaign pauses with the
/// reason instead of burning the list and poisoning the suppression list.
/// Refusals that look like the relay's (auth, relay denied) are recorded as
/// deferred, and the refusals the trip covers (the streak, the tripping
/// relay's window, and any after the trip) are requeued by the caller,
/// their suppressions undone, so `blast resume` sends them again.
#[derive(Debug)]
pub struct Breaker {
    threshold: u32,
    rule: RateRule,
    state: Mutex<BreakerState>,
}

/// One answer in a relay's window.
#[derive(Debug)]
struct Answer {
    id: i64,
    /// The address, kept for a 5xx refusal only (what a trip requeues):
    /// an acceptance costs no allocation.
    refused: Option<String>,
    at: OffsetDateTime,
    /// A refusal that suppresses the address.
    suppresses: bool,
}

#[derive(Debug, Default)]
struct BreakerState {
    streak: Vec<(i64, String, OffsetDateTime)>,
    domains: HashSet<String>,
    /// The last answers of each relay, with how many of them suppress.
    windows: HashMap<String, (VecDeque<Answer>, usize)>,
    tripped: Option<String>,
    /// Refusals to requeue, once tripped.
    requeue: Vec<(i64, String, OffsetDateTime)>,
}

impl BreakerState {
    /// Trips for `reason` (the first reason stays) and takes the streak
    /// into the requeue list.
    fn trip(&mut self, reason: impl FnOnce() -> String) {
        if self.tripped.is_none() {
            self.tripped = Some(reason());
        }
        self.requeue.append(&mut self.streak);
    }
}

impl Breaker {
    /// A breaker tripping after `threshold` refusals in a row (0 = never)
    /// or by `rule`; relay refusals always trip it.
    pub fn new(threshold: u32, rule: RateRule) -> Breaker {
        Breaker {
            threshold,
            rule,
            state: Mutex::new(BreakerState::default()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, BreakerState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Looks at one SMTP outcome from `relay`; returns the outcome to
    /// record (a relay refusal becomes a deferral: it says nothing about the
    /// recipient).
    pub fn observe(&self, relay: &str, id: i64, email: &str, outcome: Outcome) -> Outcome {
        let mut st = self.lock();
        let at = clock::now();
        // An answer from the relay: an acceptance, or a reply with a code
        // (not a connection lost, not blast's own refusal).
        if matches!(outcome, Outcome::Sent { .. }) || outcome.reply().code.is_some() {
            self.count(&mut st, relay, id, email, &outcome, at);
        }
        let reply = match &outcome {
            Outcome::Failed(r) if r.code.is_some() => r.clone(),
            _ => {
                // Anything accepted or deferred ends a streak of refusals.
                st.streak.clear();
                st.domains.clear();
                return outcome;
            }
        };
        if st.tripped.is_some() {
            // After the trip every refusal is suspect: requeue it too.
            st.requeue.push((id, email.to_string(), at));
        } else {
            st.streak.push((id, email.to_string(), at));
        }
        let domain = Address::parse(email).map(|a| a.domain().to_string());
        if let Ok(domain) = domain {
            st.domains.insert(domain);
        }
        if classify::relay_refusal(&reply) {
            st.trip(|| {
                format!(
                    "the relay refuses to take mail: {} {}",
                    reply.code.unwrap_or(0),
                    reply.text
                )
            });
            return Outcome::Deferred(reply);
        }
        if self.threshold > 0 && st.streak.len() as u32 >= self.threshold && st.domains.len() >= 3 {
            let (n, domains) = (st.streak.len(), st.domains.len());
            st.trip(|| {
                format!(
                    "{n} refusals in a row across {domains} domains, last: {} {}",
                    reply.code.unwrap_or(0),
                    reply.text
                )
            });
        }
        outcome
    }

    /// Adds an answer to `relay`'s window and trips on the rate rule.
    fn count(
        &self,
        st: &mut BreakerState,
        relay: &str,
        id: i64,
        email: &str,
        outcome: &Outcome,
        at: OffsetDateTime,
    ) {
        if self.rule.rate <= 0.0 || self.rule.window == 0 {
            return;
        }
        let window = self.rule.window as usize;
        if !st.windows.contains_key(relay) {
            st.windows.insert(relay.to_string(), Default::default());
        }
        let Some((answers, suppressing)) = st.windows.get_mut(relay) else {
            return;
        };
        let refused = matches!(outcome, Outcome::Failed(_));
        let suppresses = refused && classify::suppresses(outcome.reply());
        answers.push_back(Answer {
            id,
            refused: refused.then(|| email.to_string()),
            at,
            suppresses,
        });
        *suppressing += usize::from(suppresses);
        if answers.len() > window {
            if let Some(old) = answers.pop_front() {
                *suppressing -= usize::from(old.suppresses);
            }
        }
        let n = answers.len();
        if st.tripped.is_some()
            || n < window.min(MIN_ANSWERS)
            || (*suppressing as f64) < self.rule.rate * n as f64
        {
            return;
        }
        let refused: Vec<(i64, String, OffsetDateTime)> = answers
            .iter()
            .filter_map(|a| a.refused.clone().map(|email| (a.id, email, a.at)))
            .collect();
        let reason = format!(
            "{} of the last {n} answers from {relay} refused the address as unknown \
             (last: {} {}); a relay refusing that many is more likely wrong than the list",
            *suppressing,
            outcome.reply().code.unwrap_or(0),
            outcome.reply().text
        );
        st.trip(|| reason);
        // This answer is the last one; `observe` adds it to the requeue
        // list itself.
        st.requeue
            .extend(refused.into_iter().filter(|(i, _, _)| *i != id));
    }

    /// Trips for a reason outside any recipient's reply (a relay that
    /// refuses blast's TLS or credentials mid-run).
    pub fn trip(&self, reason: String) {
        self.lock().trip(|| reason);
    }

    /// True once tripped.
    pub fn tripped(&self) -> bool {
        self.lock().tripped.is_some()
    }

    /// Why it tripped.
    pub fn reason(&self) -> Option<String> {
        self.lock().tripped.clone()
    }

    /// The refused recipients to requeue, when tripped: the streak that
    /// tripped it, the tripping relay's window, and every refusal since.
    pub fn streak(&self) -> Vec<(i64, String)> {
        let st = self.lock();
        if st.tripped.is_none() {
            return Vec::new();
        }
        let mut seen = HashSet::new();
        st.requeue
            .iter()
            .chain(st.streak.iter())
            .filter(|(id, _, _)| seen.insert(*id))
            .map(|(id, email, _)| (*id, email.clone()))
            .collect()
    }

    /// When the first of [`Breaker::streak`]'s refusals was answered: the
    /// suppressions they caused were added after it.
    pub fn since(&self) -> Option<OffsetDateTime> {
        let st = self.lock();
        st.tripped.as_ref()?;
        st.requeue
            .iter()
            .chain(st.streak.iter())
            .map(|(_, _, at)| *at)
            .min()
    }
}

#[cfg(test)]
mod tests {
    use super::{Breaker, RateRule};
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
        let b = Breaker::new(5, RateRule::OFF);
        for i in 0..4 {
            b.observe("r", i, &format!("u@d{}.example", i % 3), failed(550, "no"));
        }
        assert!(!b.tripped());
        b.observe("r", 4, "u@d1.example", failed(550, "no"));
        assert!(b.tripped());
        assert_eq!(b.streak().len(), 5);
        assert!(b
            .reason()
            .unwrap()
            .contains("5 refusals in a row across 3 domains"));
    }

    #[test]
    fn one_domain_refusing_or_an_acceptance_between_does_not() {
        let b = Breaker::new(3, RateRule::OFF);
        for i in 0..10 {
            b.observe("r", i, "u@one.example", failed(550, "no"));
        }
        assert!(
            !b.tripped(),
            "one domain refusing is that domain's business"
        );
        let b = Breaker::new(3, RateRule::OFF);
        b.observe("r", 1, "u@a.example", failed(550, "no"));
        b.observe("r", 2, "u@b.example", failed(550, "no"));
        b.observe("r", 3, "u@c.example", sent());
        b.observe("r", 4, "u@d.example", failed(550, "no"));
        assert!(!b.tripped());
        assert!(b.streak().is_empty(), "no streak reported until tripped");
    }

    #[test]
    fn a_relay_refusal_trips_at_once_and_becomes_a_deferral() {
        let b = Breaker::new(0, RateRule::OFF);
        let o = b.observe(
            "r",
            1,
            "u@a.example",
            failed(530, "5.7.0 Authentication required"),
        );
        assert_eq!(o.status(), Status::Deferred);
        assert!(b.tripped());
        assert!(relay_refusal(o.reply()));
        // Local failures (no SMTP code) are not the relay's.
        let b = Breaker::new(1, RateRule::OFF);
        b.observe("r", 1, "u@a.example", Outcome::local_failure("bad address"));
        assert!(!b.tripped());
    }

    fn unknown() -> Outcome {
        Outcome::Failed(Reply {
            code: Some(550),
            enhanced: Some("5.1.1".into()),
            text: "5.1.1 User unknown".into(),
        })
    }

    #[test]
    fn a_relay_refusing_most_addresses_as_unknown_trips_on_the_rate() {
        // 4 of 5 refused, a 250 between: never a streak of 25.
        let b = Breaker::new(25, RateRule::default());
        let mut refused = 0;
        for i in 0..super::MIN_ANSWERS as i64 - 1 {
            let o = if i % 5 == 4 { sent() } else { unknown() };
            refused += i64::from(i % 5 != 4);
            b.observe("smtp://a", i, &format!("u{i}@d{}.example", i % 3), o);
        }
        assert!(
            !b.tripped(),
            "not judged before {} answers",
            super::MIN_ANSWERS
        );
        b.observe("smtp://a", 100, "u@d.example", unknown());
        assert!(b.tripped());
        let reason = b.reason().unwrap();
        assert!(
            reason.contains("from smtp://a refused the address"),
            "{reason}"
        );
        // Every refusal in the window is to be requeued, and later ones too.
        b.observe("smtp://a", 101, "v@d.example", unknown());
        b.observe("smtp://a", 102, "w@d.example", sent());
        let ids: Vec<i64> = b.streak().iter().map(|(id, _)| *id).collect();
        assert_eq!(ids.len() as i64, refused + 2, "{ids:?}");
        assert!(ids.contains(&100) && ids.contains(&101) && !ids.contains(&102));
        assert!(b.since().is_some());
    }

    #[test]
    fn the_rate_is_per_relay_and_ignores_other_refusals() {
        let b = Breaker::new(
            0,
            RateRule {
                rate: 0.5,
                window: 10,
            },
        );
        for i in 0..40 {
            // A healthy relay's unknown users and another relay's
            // spam refusals (not about the address) do not add up.
            let (relay, o) = match i % 6 {
                0 => ("smtp://a", unknown()),
                1 | 2 => ("smtp://a", sent()),
                3 => ("smtp://b", failed(554, "5.7.1 spam")),
                _ => ("smtp://b", sent()),
            };
            b.observe(relay, i, "u@x.example", o);
        }
        assert!(!b.tripped());
    }
}
