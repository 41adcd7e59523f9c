//! Prometheus metrics: what a run, `run-due` or `serve` is doing, for a
//! dashboard beside the MTA's and the database's. Exposed in the
//! OpenMetrics text format by `prometheus-client` at `GET /metrics`
//! (`blast send --metrics ADDR`, `[delivery] metrics`, `run-due
//! --metrics`, and `blast serve`).
//!
//! Nothing here is on the send path: a scrape reads the runner's own
//! counters ([`crate::campaign::Stats`]: atomics the progress display
//! reads too) through a collector, so metrics cost the pipeline nothing it
//! did not already do. `serve`'s inbound figures are the database's, read
//! at scrape time (bounces and unsubscribes arrive through other processes
//! too), beside this process's own unsubscribe requests.
//!
//! - `run`: the collector of the runs in this process.
//! - `inbound`: `serve`'s counters and the database's inbound counts.
//!
//! Names follow Prometheus's conventions: `blast_` prefix, base units
//! (seconds), `_total` counters; the labels are `campaign`, `worker`,
//! `relay` (empty for recipients no relay saw) and `outcome`.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use prometheus_client::encoding::text::encode;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::campaign::Stats;
use crate::error::{Error, Result};

mod inbound;
mod run;

pub use inbound::{InboundCounts, Unsubscribe};
use run::{Run, Runs};

/// The content type of the OpenMetrics text format `prometheus-client`
/// writes (Prometheus asks for it and accepts it).
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// A label value, escaped as the text format requires (`\\`, `\"`,
/// `\n`): campaign and worker names and relay URLs are the operator's
/// text, and `prometheus-client` writes label values as they are. One
/// quote in a campaign's name would otherwise make Prometheus refuse the
/// whole scrape.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Label<'a>(pub(crate) &'a str);

impl prometheus_client::encoding::EncodeLabelValue for Label<'_> {
    fn encode(
        &self,
        encoder: &mut prometheus_client::encoding::LabelValueEncoder<'_>,
    ) -> Result<(), std::fmt::Error> {
        use std::fmt::Write as _;
        let mut rest = self.0;
        while let Some(at) = rest.find(['\\', '"', '\n']) {
            encoder.write_str(&rest[..at])?;
            encoder.write_str(match rest.as_bytes()[at] {
                b'\\' => "\\\\",
                b'"' => "\\\"",
                _ => "\\n",
            })?;
            rest = &rest[at + 1..];
        }
        encoder.write_str(rest)
    }
}

/// Everything this process exposes: its runs (one per campaign it sends,
/// kept after the run ends so the last figures stay readable) and, in
/// `serve`, the unsubscribe requests it answered.
#[derive(Debug, Default)]
pub struct Metrics {
    runs: Mutex<Vec<Run>>,
    unsubscribes: inbound::Requests,
}

/// A run being exposed; marks the run over when dropped (its counters
/// stay).
#[derive(Debug)]
pub struct Tracked(Arc<std::sync::atomic::AtomicBool>);

impl Drop for Tracked {
    fn drop(&mut self) {
        self.0.store(false, std::sync::atomic::Ordering::Relaxed);
    }
}

impl Metrics {
    /// An empty set.
    pub fn new() -> Arc<Metrics> {
        Arc::new(Metrics::default())
    }

    /// Exposes the run of `campaign` by `worker` counted in `stats` until
    /// the guard is dropped (its figures stay after, with
    /// `blast_run_active` 0). A later run of the same campaign and worker
    /// replaces it (its counters start again at zero, which Prometheus's
    /// `rate()` reads as a restart).
    pub fn track(&self, campaign: &str, worker: &str, stats: Arc<Stats>) -> Tracked {
        let run = Run::new(campaign, worker, stats);
        let guard = Tracked(run.active.clone());
        let mut runs = self.runs.lock().unwrap_or_else(|p| p.into_inner());
        runs.retain(|r| !(r.campaign == campaign && r.worker == worker));
        runs.push(run);
        guard
    }

    /// Counts one unsubscribe request `serve` answered.
    pub fn unsubscribe(&self, u: Unsubscribe) {
        self.unsubscribes.count(u);
    }

    /// The exposition: every run, this process's unsubscribe requests, and
    /// `inbound` (the database's counts) when given.
    pub fn encode(&self, inbound: Option<InboundCounts>) -> String {
        let mut registry = Registry::default();
        let runs = self.runs.lock().unwrap_or_else(|p| p.into_inner()).clone();
        registry.register_collector(Box::new(Runs(runs)));
        self.unsubscribes.register(&mut registry);
        if let Some(counts) = inbound {
            registry.register_collector(Box::new(counts));
        }
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &registry);
        out
    }
}

/// `GET /metrics` over `metrics` (and nothing else), for `send` and
/// `run-due`.
pub fn router(metrics: Arc<Metrics>) -> Router {
    Router::new()
        .route("/metrics", get(scrape))
        .with_state(metrics)
}

async fn scrape(State(metrics): State<Arc<Metrics>>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, CONTENT_TYPE)], metrics.encode(None))
}

/// The metrics endpoint of a `send` or `run-due`, until stopped.
#[derive(Debug)]
pub struct Endpoint {
    /// The address it listens on (the port the system chose for `:0`).
    pub addr: SocketAddr,
    /// What it serves.
    pub metrics: Arc<Metrics>,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl Endpoint {
    /// Listens on `addr` and serves `metrics`; an address in use is an
    /// error now, before the campaign starts.
    pub async fn start(addr: SocketAddr, metrics: Arc<Metrics>) -> Result<Endpoint> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|e| Error::Invalid(format!("metrics: cannot listen on {addr}: {e}")))?;
        let addr = listener.local_addr().unwrap_or(addr);
        let stop = CancellationToken::new();
        let task = {
            let (stop, served) = (stop.clone(), metrics.clone());
            tokio::spawn(async move {
                let served = axum::serve(listener, router(served))
                    .with_graceful_shutdown(async move { stop.cancelled().await })
                    .await;
                if let Err(e) = served {
                    tracing::warn!("metrics endpoint: {e}");
                }
            })
        };
        tracing::info!("metrics on http://{addr}/metrics");
        Ok(Endpoint {
            addr,
            metrics,
            stop,
            task,
        })
    }

    /// Stops listening (a scrape in flight is finished).
    pub async fn stop(self) {
        self.stop.cancel();
        let _ = crate::error::joined("the metrics endpoint", self.task).await;
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::Metrics;
    use crate::campaign::Stats;

    #[test]
    fn label_values_are_escaped_as_the_text_format_requires() {
        let m = Metrics::new();
        let _run = m.track("a\"b\\c\nd", "w", Arc::new(Stats::new(1)));
        let text = m.encode(None);
        assert!(
            text.contains(r#"blast_run_active{campaign="a\"b\\c\nd",worker="w"} 1"#),
            "{text}"
        );
    }
}
