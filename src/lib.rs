//! blast: a mass-mail engine. It reads recipients from SQL, renders one
//! personalized message each from Tera templates, and injects them into a
//! local MTA over N parallel SMTP connections, recording every answer.
//!
//! # Layout
//! The modules follow the data flow:
//! `source → render → bounded channel → N injectors (transport) → ledger`.
//!
//! - [`address`]: the one validity rule and canonical form of an email address.
//! - [`model`]: the domain types every stage shares (recipient, envelope,
//!   outcome, record, status); no I/O.
//! - [`cli`]: clap types; no I/O.
//! - [`config`]: campaign file + env + flags → validated [`config::Config`].
//! - [`db`]: pools and migrations; the only code that sees connection URLs
//!   (`rekey` rewrites stored addresses to the canonical form once, on open).
//! - [`suppress`]: the suppression list and its live view for running campaigns.
//! - [`source`]: keyset-paginated audience rows; read-only SQL.
//! - [`render`]: compiled templates → finished messages; pure.
//! - [`transport`]: the `Transport` trait with SMTP, stub and file implementations.
//! - [`classify`]: what a server's reply or status code means (reason, hard/soft).
//! - [`ledger`]: the sole writer of delivery status.
//! - [`state`]: the campaign state machine; every transition a compare-and-set.
//! - [`worker`]: workers sharing a campaign by fenced claims of id ranges;
//!   pause/cancel from other processes.
//! - [`schedule`]: stored campaigns, `run-due` for cron.
//! - [`adaptive`]: per-relay AIMD concurrency limits on congestion marks.
//! - [`campaign`]: the runner that connects the pipeline.
//! - [`bounce`]: returned mail → which recipient failed and how.
//! - [`commands`]: each subcommand's orchestration, callable from tests.
//! - [`import`]: CSV → `subscribers`.
//! - [`progress`]: the operator's view.
//! - [`reconcile`]: the MTA's log → each recipient's final delivery at the
//!   next hop (`mta_*` columns); hard bounces suppress.
//! - [`report`]: the ledger summed up by SQL aggregates; `blast report`'s
//!   JSON and self-contained HTML page with inline SVG charts.
//! - [`serve`]: `blast serve`, the one-click unsubscribe endpoint.
//! - [`sign`]: the HMAC key, VERP signatures, unsubscribe tokens, address patterns.
//! - [`sink`]: a built-in SMTP server for demos, tests and benchmarks.
//! - [`tls`]: rustls configurations and plain-or-TLS connection halves.
//! - [`metrics`]: Prometheus metrics of runs and of `serve`; [`measure`]:
//!   the lock-free histogram stages record into.
//! - [`clock`], [`error`], [`stop`]: the time seam, the error type, the stop
//!   signal as a token.

#![forbid(unsafe_code)]
#![deny(unreachable_pub, rust_2018_idioms)]

pub mod adaptive;
pub mod address;
pub mod bounce;
pub mod campaign;
pub mod classify;
pub mod cli;
pub mod clock;
pub mod commands;
pub mod config;
pub mod db;
pub mod error;
pub mod import;
pub mod ledger;
pub mod measure;
pub mod metrics;
pub mod model;
pub mod progress;
pub mod reconcile;
mod rekey;
pub mod render;
pub mod report;
pub mod schedule;
pub mod serve;
pub mod sign;
pub mod sink;
pub mod source;
pub mod state;
pub mod stop;
pub mod suppress;
pub mod tls;
pub mod transport;
pub mod worker;

#[cfg(test)]
mod props;

pub use error::{Error, Result};
