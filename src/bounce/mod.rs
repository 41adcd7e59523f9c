//! Bounces and the rest of the inbound mail path: mail that comes back after
//! a campaign was sent, complaints, and mails to the unsubscribe address.
//!
//! - [`parse`] reads returned mail and says what it means: which recipient
//!   failed, how (hard, soft, or not a failure at all), and which original
//!   message it answers. Pure; no database.
//! - [`mailbox`] gets messages out of a Maildir, an mbox or stdin and
//!   disposes of them (done, quarantined, retried) without ever losing one.
//! - [`ingest`] ties the two to the ledger: bounce events, suppressions,
//!   unsubscribes.

pub mod ingest;
pub mod mailbox;
pub mod parse;
