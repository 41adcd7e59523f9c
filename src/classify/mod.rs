//! Classification: what a remote server's words and status codes mean.
//!
//! Owns the reason tables ([`phrases`]) and the rules that turn a diagnostic
//! text and an RFC 3463 status code into a reason name and a [`Class`]
//! ([`reasons`]). Bounce parsing calls it for each failed recipient of a
//! returned mail. It knows nothing of mail formats, SMTP sessions or the
//! database: callers hand it the words of one reply.

mod phrases;
mod reasons;

use serde::Serialize;

pub use reasons::{class_of, reason, reason_from_status, reason_from_text, reason_in};

/// How bad a failure is for the address.
///
/// hard = address gone (user unknown, host unknown, moved, not accepting
/// mail); soft = every other failure (mailbox full, blocked, filtered, rate
/// limited, expired, policy, ...); other = complaints, auto-replies, delivery
/// notices.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Class {
    /// The address is gone; stop sending to it.
    Hard,
    /// A failure that may pass (full, blocked, expired, policy, ...).
    Soft,
    /// Not a failure: a complaint, an auto-reply, a delivery notice.
    Other,
}

impl Class {
    /// The class's name as reports and `blast_bounces.class` spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            Class::Hard => "hard",
            Class::Soft => "soft",
            Class::Other => "other",
        }
    }
}
