//! Integration tests: one binary, one `mod` per area. Every test gets its own
//! database and an in-process sink on 127.0.0.1:0.

mod util;

/// `concurrency = "auto"` against the sink's load model, on paused time.
mod adaptive;
/// Bad input: config, templates, broken rows, unreachable relays.
mod bad_input;
/// `blast bounce ingest` from Maildir, mbox and stdin; soft-bounce scoring.
mod bounce;
/// End-to-end campaigns against the built-in sink, on SQLite and PostgreSQL.
mod campaign;
/// The `blast` binary itself: exit codes, JSON summaries, preview, status.
mod cli;
/// One address, one identity: blanks, case and IDN forms (issue 13).
mod identity;
/// `blast import` on both backends, and imported columns in templates.
mod import;
/// VERP, List-Unsubscribe, `blast serve`, the suppression list, bounces.
mod inbound;
/// The SQL ledger driven directly on both backends: exact text, duplicates,
/// the worker that wrote each row.
mod ledger;
/// Prometheus metrics: scrapes parsed by Prometheus's own parser.
mod metrics;
/// Through a real, tuned Postfix.
mod mta;
/// `blast reconcile`: Postfix's log into the ledger, follow, rotation.
mod reconcile;
/// Relays off this host: STARTTLS, implicit TLS, AUTH, from_domains routing.
mod relays;
/// Leases, SIGKILL, retries, suppression, breaker, pause/resume/cancel, outages.
mod reliability;
/// `blast report`: JSON equal to the ledger, the HTML page in headless Chromium.
mod report;
/// Running a campaign again: stopped runs, deferred recipients.
mod resume;
/// Scheduled campaigns and run-due.
mod schedule;
/// The SMTP injector's protocol modes (PIPELINING, CHUNKING, lock-step).
mod smtp;
/// contrib/systemd: the units verify and run real blast commands.
mod systemd;
/// Several workers on one PostgreSQL campaign: claims, fencing, faults.
mod workers;
