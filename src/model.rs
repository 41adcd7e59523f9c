//! The domain model every stage shares: who gets a message ([`Recipient`]),
//! what goes to the MTA ([`Envelope`], [`Outgoing`]), what it answered
//! ([`Reply`], [`Outcome`]), and what the ledger stores ([`Record`],
//! [`Status`]). Plain data with no I/O: stages depend on this module, never
//! on each other (render does not import source or transport, the ledger
//! does not import transport).

use std::fmt;
use std::str::FromStr;

use serde_json::{Map, Value};

/// One row of the audience.
#[derive(Debug, Clone, PartialEq)]
pub struct Recipient {
    /// Unique, stable integer id (the ledger key).
    pub id: i64,
    /// Address as stored (validated at render time).
    pub email: String,
    /// Every other column, as template variables. JSON columns are nested
    /// values, and the keys of an `attributes` JSON object are lifted to the
    /// top level (a real column of the same name wins).
    pub vars: Map<String, Value>,
    /// Earlier attempts in this campaign (deferrals), 0 for a first send.
    pub attempts: u32,
    /// When this recipient was first deferred, if it was.
    pub first_attempt_at: Option<String>,
    /// Why the address is on the suppression list, if it is.
    pub suppressed: Option<String>,
    /// Why the row cannot be used as it is (a JSON column that does not
    /// parse): the recipient is recorded as unrendered with this reason.
    pub broken: Option<String>,
    /// The fencing token of the claim this recipient was read under, when
    /// the run sends from claims: its message may go out, and its outcome
    /// be stored, only while this worker still holds that very grant (a
    /// range taken back under a new token is a new grant).
    pub claim_token: Option<i64>,
}

impl Recipient {
    /// A recipient that has never been tried and is not suppressed.
    pub fn new(id: i64, email: impl Into<String>, vars: Map<String, Value>) -> Recipient {
        Recipient {
            id,
            email: email.into(),
            vars,
            attempts: 0,
            first_attempt_at: None,
            suppressed: None,
            broken: None,
            claim_token: None,
        }
    }
}

/// One recipient's SMTP envelope. blast always sends one recipient per
/// envelope so each address gets its own outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    /// The recipient's row id (used to name dry-run files and in logs).
    pub recipient_id: i64,
    /// `MAIL FROM` address (ASCII, validated): the bounce address.
    pub from: String,
    /// `RCPT TO` address (ASCII, validated).
    pub to: String,
    /// The message has an `8bit` part: `MAIL FROM` says `BODY=8BITMIME`
    /// (the renderer knows; nobody scans the message again to find out).
    pub eight_bit: bool,
}

/// A message ready for a transport.
#[derive(Debug, Clone)]
pub struct Outgoing {
    /// Envelope (bounce address and the one recipient).
    pub envelope: Envelope,
    /// The recipient's address as it appears in the audience (for the ledger).
    pub email: String,
    /// The complete RFC 5322 message.
    pub bytes: Vec<u8>,
}

/// What an SMTP server said, kept verbatim for the ledger.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Reply {
    /// Basic status code (250, 451, 550...); `None` when no server answered.
    pub code: Option<u16>,
    /// RFC 3463 enhanced status (`5.1.1`) when the reply carried one.
    pub enhanced: Option<String>,
    /// The reply text (lines joined with a space) or blast's own reason.
    pub text: String,
}

/// The result of handing one message to a transport.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Accepted by the MTA (2xx), with the queue id it gave, if any.
    Sent {
        /// The 2xx reply.
        reply: Reply,
        /// The MTA's queue id, parsed from the reply.
        queue_id: Option<String>,
    },
    /// Temporarily refused (4xx): try again later.
    Deferred(Reply),
    /// Permanently refused (5xx) or not sendable at all (bad address, render error).
    Failed(Reply),
}

impl Outcome {
    /// The ledger status this outcome stands for.
    pub fn status(&self) -> Status {
        match self {
            Outcome::Sent { .. } => Status::Sent,
            Outcome::Deferred(_) => Status::Deferred,
            Outcome::Failed(_) => Status::Failed,
        }
    }

    /// The reply behind the outcome.
    pub fn reply(&self) -> &Reply {
        match self {
            Outcome::Sent { reply, .. } | Outcome::Deferred(reply) | Outcome::Failed(reply) => {
                reply
            }
        }
    }

    /// Appends `note` to the reply text kept in the ledger.
    pub fn note(&mut self, note: &str) {
        let reply = match self {
            Outcome::Sent { reply, .. } | Outcome::Deferred(reply) | Outcome::Failed(reply) => {
                reply
            }
        };
        if !reply.text.is_empty() {
            reply.text.push(' ');
        }
        reply.text.push_str(note);
    }

    /// A failure decided by blast itself, with no SMTP round trip.
    pub fn local_failure(text: impl Into<String>) -> Outcome {
        Outcome::Failed(Reply {
            code: None,
            enhanced: None,
            text: text.into(),
        })
    }
}

/// One recipient's outcome, on its way to the ledger.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    /// Audience row id.
    pub recipient_id: i64,
    /// Address as in the audience.
    pub email: String,
    /// What happened.
    pub outcome: Outcome,
    /// Which relay answered (None for local failures).
    pub relay: Option<String>,
    /// Earlier attempts (deferrals) of this recipient in this campaign.
    pub attempts: u32,
    /// When it was first deferred, if it was.
    pub first_attempt_at: Option<String>,
    /// Why nothing was sent although no server refused it, if so.
    pub skipped: Option<Skipped>,
    /// The fencing token of the claim the recipient was read under
    /// ([`Recipient::claim_token`]).
    pub claim_token: Option<i64>,
}

/// Why a recipient got no message without any server refusing it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Skipped {
    /// The address is on the suppression list. Final.
    Suppressed,
    /// Its message could not be built (a template error, a broken row).
    /// Not final: the next pass, after the fix, builds it again.
    Unrendered,
}

impl Record {
    /// The status the ledger stores it with (before retry scheduling, which
    /// may turn an old deferral into a failure).
    pub fn status(&self) -> Status {
        match self.skipped {
            Some(Skipped::Suppressed) => Status::Suppressed,
            Some(Skipped::Unrendered) => Status::Unrendered,
            None => self.outcome.status(),
        }
    }

    /// The record of a recipient skipped because `why` suppressed its
    /// address: nothing was sent, nothing went through a relay.
    pub fn suppressed(
        recipient_id: i64,
        email: String,
        why: &str,
        attempts: u32,
        first_attempt_at: Option<String>,
        claim_token: Option<i64>,
    ) -> Record {
        Record {
            recipient_id,
            email,
            outcome: Outcome::local_failure(format!("address is suppressed: {why}")),
            relay: None,
            attempts,
            first_attempt_at,
            skipped: Some(Skipped::Suppressed),
            claim_token,
        }
    }
}

/// A recipient's delivery status, as the ledger stores it (the fixed tags
/// in `blast_deliveries.status`, never `Debug` output).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Status {
    /// The MTA accepted the message. Final.
    Sent,
    /// Temporarily refused: sent again once its retry is due.
    Deferred,
    /// Refused for good, or not sendable. Final.
    Failed,
    /// The address is suppressed: nothing was sent. Final.
    Suppressed,
    /// The message could not be built (a template or data error): nothing
    /// was sent. Not final, but not retried by the retry schedule either:
    /// the next pass (`blast resume`, `blast send` again), after the fix,
    /// builds it again.
    Unrendered,
}

impl Status {
    /// Every status, in the order reports list them.
    pub const ALL: [Status; 5] = [
        Status::Sent,
        Status::Deferred,
        Status::Failed,
        Status::Suppressed,
        Status::Unrendered,
    ];

    /// The tag stored in the database.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Sent => "sent",
            Status::Deferred => "deferred",
            Status::Failed => "failed",
            Status::Suppressed => "suppressed",
            Status::Unrendered => "unrendered",
        }
    }

    /// A final status ends the recipient's campaign: never sent again.
    pub fn is_final(self) -> bool {
        match self {
            Status::Sent | Status::Failed | Status::Suppressed => true,
            Status::Deferred | Status::Unrendered => false,
        }
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A status tag that is none of [`Status`]'s.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown delivery status {0:?}")]
pub struct UnknownStatus(pub String);

impl FromStr for Status {
    type Err = UnknownStatus;

    fn from_str(s: &str) -> Result<Status, UnknownStatus> {
        Status::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| UnknownStatus(s.to_string()))
    }
}

/// The final statuses as a SQL list, for queries that skip recipients who
/// are done (a test checks it against [`Status::is_final`]).
pub const FINAL_STATUSES_SQL: &str = "'sent', 'failed', 'suppressed'";

#[cfg(test)]
mod tests {
    use super::{Outcome, Reply, Status, FINAL_STATUSES_SQL};

    #[test]
    fn status_tags_round_trip() {
        for s in Status::ALL {
            assert_eq!(s.as_str().parse::<Status>(), Ok(s));
        }
        assert!("queued".parse::<Status>().is_err());
        assert!("Sent".parse::<Status>().is_err());
    }

    #[test]
    fn final_statuses_are_the_ones_never_sent_again() {
        let finals: Vec<String> = Status::ALL
            .into_iter()
            .filter(|s| s.is_final())
            .map(|s| format!("'{s}'"))
            .collect();
        assert_eq!(FINAL_STATUSES_SQL, finals.join(", "));
        assert!(!Status::Deferred.is_final());
    }

    #[test]
    fn outcome_status_and_note() {
        let mut o = Outcome::Deferred(Reply {
            code: Some(451),
            enhanced: None,
            text: "try later".into(),
        });
        assert_eq!(o.status(), Status::Deferred);
        o.note("[x]");
        assert_eq!(o.reply().text, "try later [x]");
        let mut empty = Outcome::local_failure("");
        empty.note("[x]");
        assert_eq!(empty.reply().text, "[x]");
        assert_eq!(empty.status(), Status::Failed);
    }
}
