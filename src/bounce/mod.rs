//! Bounces: mail that comes back after a campaign was sent.
//!
//! This module owns reading returned mail and saying what it means: which
//! recipient failed, how (hard, soft, or not a failure at all), and which
//! original message it answers. It does not touch the database, the ledger or
//! the suppression list; ingestion builds on [`parse::Report`].

pub mod parse;
