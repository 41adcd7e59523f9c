//! Where rendered messages go. One trait, [`Transport`], with three
//! implementations: [`smtp::Smtp`] (a real relay: blast's own pipelining
//! SMTP client, with lettre's types for addresses and AUTH mechanisms),
//! [`stub::Stub`] (in memory, scripted outcomes, for tests) and
//! [`file::FileTransport`] (`.eml` files, for `--dry-run`). Transports know
//! nothing of campaigns or SQL; they turn one envelope plus bytes into one
//! [`Outcome`]. What a reply means (sent, deferred or failed) is decided by
//! [`crate::classify`], the single place that maps replies to outcomes.

use std::fmt;
use std::future::Future;
use std::time::Duration;

pub mod file;
pub mod smtp;
pub mod stub;

use crate::model::{Envelope, Outcome};

/// The session could not carry the message: connection refused, dropped or
/// timed out. The message was not answered and goes back to be retried.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionError {
    /// What happened.
    pub message: String,
    /// True when the connection was lost after the message data was sent but
    /// before the reply: the MTA may have accepted it (a retry may duplicate).
    pub ambiguous: bool,
    /// A setting is wrong (no STARTTLS offered, an untrusted certificate,
    /// credentials refused): retrying will not help, the operator must act.
    pub permanent: bool,
}

impl fmt::Display for SessionError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)?;
        if self.ambiguous {
            f.write_str(" (after the message data: it may have been accepted)")?;
        }
        Ok(())
    }
}

impl std::error::Error for SessionError {}

/// A place messages can be sent to. Each injector opens its own session.
pub trait Transport: Send + Sync + 'static {
    /// One connection's worth of state.
    type Session: Session;

    /// Opens a session; `slot` is the injector number, used to spread
    /// injectors over several relays.
    fn connect(
        &self,
        slot: usize,
    ) -> impl Future<Output = Result<Self::Session, SessionError>> + Send;

    /// Short description for logs ("smtp://127.0.0.1:25").
    fn describe(&self, slot: usize) -> String;
}

/// An open connection that sends messages one envelope at a time.
pub trait Session: Send + 'static {
    /// Sends one message. `Ok` carries the server's verdict (sent, deferred or
    /// failed); `Err` means the session is broken and the message unanswered.
    fn send(
        &mut self,
        envelope: &Envelope,
        message: &[u8],
    ) -> impl Future<Output = Result<Outcome, SessionError>> + Send;

    /// Sends one message like [`Session::send`] and, when the session
    /// [`writes_ahead`](Session::writes_ahead), writes `next`'s envelope
    /// right behind it (RFC 2920 pipelining across transactions). After
    /// that ([`Session::pending`]), the next `send` must be for `next`; a
    /// caller that will not send it drops the session (the server then
    /// discards the transaction).
    fn send_then(
        &mut self,
        envelope: &Envelope,
        message: &[u8],
        next: Option<&Envelope>,
    ) -> impl Future<Output = Result<Outcome, SessionError>> + Send {
        let _ = next;
        self.send(envelope, message)
    }

    /// Whether [`Session::send_then`] writes the next envelope ahead (SMTP
    /// with PIPELINING and without CHUNKING; BDAT already sends a whole
    /// transaction in one write).
    fn writes_ahead(&self) -> bool {
        false
    }

    /// Whether an envelope was written ahead and awaits its message.
    fn pending(&self) -> bool {
        false
    }

    /// Whether the server takes 8bit message parts (8BITMIME); files and
    /// stubs take anything.
    fn eight_bit_mime(&self) -> bool {
        true
    }

    /// How long the last `send` waited on the server (zero if not measured).
    fn latency(&self) -> Duration {
        Duration::ZERO
    }

    /// Ends the session politely (QUIT).
    fn close(self) -> impl Future<Output = ()> + Send;
}
