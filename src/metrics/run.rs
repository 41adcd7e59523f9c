//! The runs of this process as metric families, read from their
//! [`Stats`] at scrape time.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Unit;

use super::Label;
use crate::campaign::{RelayStats, Stats};
use crate::measure::Snapshot;

/// One run being exposed.
#[derive(Debug, Clone)]
pub(super) struct Run {
    pub(super) campaign: String,
    pub(super) worker: String,
    stats: Arc<Stats>,
    /// Unix time the run started.
    started: f64,
    /// False once the run is over.
    pub(super) active: Arc<AtomicBool>,
}

impl Run {
    pub(super) fn new(campaign: &str, worker: &str, stats: Arc<Stats>) -> Run {
        Run {
            campaign: campaign.to_string(),
            worker: worker.to_string(),
            stats,
            started: crate::clock::now().unix_timestamp_nanos() as f64 / 1e9,
            active: Arc::new(AtomicBool::new(true)),
        }
    }

    fn labels(&self) -> [(&'static str, Label<'_>); 2] {
        [
            ("campaign", Label(&self.campaign)),
            ("worker", Label(&self.worker)),
        ]
    }

    fn relay_labels<'a>(&'a self, relay: &'a str) -> [(&'static str, Label<'a>); 3] {
        [
            ("campaign", Label(&self.campaign)),
            ("worker", Label(&self.worker)),
            ("relay", Label(relay)),
        ]
    }

    fn relays(&self) -> &[RelayStats] {
        self.stats.relays.get().map_or(&[], |v| v.as_slice())
    }
}

/// Every run of this process.
#[derive(Debug)]
pub(super) struct Runs(pub(super) Vec<Run>);

/// Outcomes a relay answered (or caused), with the relay's counter.
type RelayCounter = fn(&RelayStats) -> &AtomicU64;

const RELAY_OUTCOMES: [(&str, RelayCounter); 7] = [
    ("sent", |r| &r.sent),
    ("deferred", |r| &r.deferred),
    ("failed", |r| &r.failed),
    ("suppressed", |r| &r.suppressed),
    ("rerouted", |r| &r.rerouted),
    ("possibly_duplicated", |r| &r.possibly_duplicated),
    ("possibly_delivered", |r| &r.possibly_delivered),
];

/// Outcomes no relay saw (relay label empty), each with its own counter:
/// derived as a total less the relays' shares, a scrape between the two
/// additions would read a counter going down.
type RunCounter = fn(&Stats) -> &AtomicU64;

const UNRELAYED_OUTCOMES: [(&str, RunCounter); 3] = [
    ("failed", |s| &s.unrelayed.failed),
    ("suppressed", |s| &s.unrelayed.suppressed),
    ("unrendered", |s| &s.unrendered),
];

fn load(c: &AtomicU64) -> u64 {
    c.load(Ordering::Relaxed)
}

/// A counter family, one sample per label set.
fn counters<L: EncodeLabelSet>(
    enc: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    samples: impl IntoIterator<Item = (L, u64)>,
) -> Result<(), std::fmt::Error> {
    let mut family = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (labels, v) in samples {
        family
            .encode_family(&labels)?
            .encode_counter::<NoLabelSet, _, u64>(&v, None)?;
    }
    Ok(())
}

/// A gauge family, one sample per label set.
fn gauges<L: EncodeLabelSet>(
    enc: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    samples: impl IntoIterator<Item = (L, f64)>,
) -> Result<(), std::fmt::Error> {
    let mut family = enc.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (labels, v) in samples {
        family.encode_family(&labels)?.encode_gauge(&v)?;
    }
    Ok(())
}

/// A histogram family; `scale` turns a bucket bound into the unit (1e-6
/// for microseconds as seconds), and buckets below `from` are merged into
/// it (Prometheus's buckets are cumulative, so nothing is lost).
fn histograms<L: EncodeLabelSet>(
    enc: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    scale: f64,
    from: usize,
    samples: impl IntoIterator<Item = (L, Snapshot)>,
) -> Result<(), std::fmt::Error> {
    let mut family = enc.encode_descriptor(name, help, unit, MetricType::Histogram)?;
    for (labels, s) in samples {
        let below: u64 = s.buckets.iter().take(from).map(|b| b.1).sum();
        let buckets: Vec<(f64, u64)> = s
            .buckets
            .iter()
            .enumerate()
            .skip(from)
            .map(|(i, (bound, n))| {
                let n = if i == from { n + below } else { *n };
                (bound.map_or(f64::MAX, |b| b as f64 * scale), n)
            })
            .collect();
        family
            .encode_family(&labels)?
            .encode_histogram::<NoLabelSet>(s.sum as f64 * scale, s.count, &buckets, None)?;
    }
    Ok(())
}

/// Seconds histograms start at 8 us (rendering one message takes ~20 us).
const SECONDS_FROM: usize = 3;

impl Collector for Runs {
    fn encode(&self, mut enc: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let runs = &self.0;
        self.messages(&mut enc)?;
        counters(
            &mut enc,
            "blast_connection_retries",
            "SMTP connections lost or refused; the message went to the queue again",
            runs.iter().flat_map(|run| {
                run.relays()
                    .iter()
                    .map(move |r| (run.relay_labels(&r.label), load(&r.retries)))
            }),
        )?;
        histograms(
            &mut enc,
            "blast_smtp_transaction",
            "Time of one SMTP transaction (MAIL to the reply after the data)",
            Some(&Unit::Seconds),
            1e-6,
            SECONDS_FROM,
            runs.iter().flat_map(|run| {
                run.relays()
                    .iter()
                    .map(move |r| (run.relay_labels(&r.label), r.latency.snapshot()))
            }),
        )?;
        self.relays(&mut enc)?;
        histograms(
            &mut enc,
            "blast_render",
            "Time to build one message: templates and MIME",
            Some(&Unit::Seconds),
            1e-6,
            SECONDS_FROM,
            runs.iter()
                .map(|run| (run.labels(), run.stats.render.snapshot())),
        )?;
        histograms(
            &mut enc,
            "blast_ledger_flush",
            "Time to store one batch of outcomes in the ledger, retries included",
            Some(&Unit::Seconds),
            1e-6,
            SECONDS_FROM,
            runs.iter()
                .map(|run| (run.labels(), run.stats.flushes.time.snapshot())),
        )?;
        histograms(
            &mut enc,
            "blast_ledger_batch_rows",
            "Outcomes stored per ledger batch",
            None,
            1.0,
            0,
            runs.iter()
                .map(|run| (run.labels(), run.stats.flushes.rows.snapshot())),
        )?;
        self.progress(&mut enc)
    }
}

impl Runs {
    /// `blast_messages_total`: every recipient's outcome by relay; what no
    /// relay saw has an empty relay.
    fn messages(&self, enc: &mut DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let mut samples = Vec::new();
        for run in &self.0 {
            for r in run.relays() {
                for (outcome, counter) in RELAY_OUTCOMES {
                    samples.push((relay_outcome(run, &r.label, outcome), load(counter(r))));
                }
            }
            for (outcome, counter) in UNRELAYED_OUTCOMES {
                samples.push((relay_outcome(run, "", outcome), load(counter(&run.stats))));
            }
        }
        counters(
            enc,
            "blast_messages",
            "Recipients by outcome: sent (the MTA took it), deferred (4xx, no relay took it), \
             failed (5xx, bad address, given up), suppressed, unrendered (template or data \
             error), rerouted (4xx here, sent on by another relay), possibly_duplicated \
             (sent again after a connection lost after the data), possibly_delivered \
             (given up after every try was lost that way)",
            samples,
        )
    }

    /// Each relay's concurrency, transactions in flight and circuit, from
    /// one snapshot of its gate per scrape.
    fn relays(&self, enc: &mut DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        struct Gate<'a> {
            labels: [(&'static str, Label<'a>); 3],
            in_flight: f64,
            limit: f64,
            open: f64,
            opened: u64,
            marks: crate::adaptive::Marks,
        }
        let gates: Vec<Gate<'_>> = self
            .0
            .iter()
            .flat_map(|run| {
                run.relays().iter().map(move |r| {
                    let a = r.gate.snapshot();
                    Gate {
                        labels: run.relay_labels(&r.label),
                        in_flight: a.in_flight() as f64,
                        limit: a.limit() as f64,
                        open: f64::from(u8::from(r.gate.is_open())),
                        opened: r.gate.times_opened(),
                        marks: a.marks(),
                    }
                })
            })
            .collect();
        gauges(
            enc,
            "blast_relay_in_flight",
            "SMTP transactions in flight on the relay",
            gates.iter().map(|g| (g.labels, g.in_flight)),
        )?;
        gauges(
            enc,
            "blast_relay_concurrency_limit",
            "Transactions the relay may have in flight (adaptive, or pinned by `concurrency`)",
            gates.iter().map(|g| (g.labels, g.limit)),
        )?;
        gauges(
            enc,
            "blast_relay_circuit_open",
            "1 while the relay's circuit is open (it gets no messages until a probe succeeds)",
            gates.iter().map(|g| (g.labels, g.open)),
        )?;
        counters(
            enc,
            "blast_relay_circuit_opened",
            "Times the relay's circuit opened (connection failures or a burst of 4xx)",
            gates.iter().map(|g| (g.labels, g.opened)),
        )?;
        let mut marks = Vec::new();
        for g in &gates {
            let m = g.marks;
            for (kind, n) in [
                ("deferred", m.deferred),
                ("connection", m.connection),
                ("stall", m.stall),
                ("queue", m.queue),
                ("latency", m.latency),
            ] {
                let [c, w, r] = g.labels;
                marks.push(([c, w, r, ("kind", Label(kind))], n));
            }
        }
        counters(
            enc,
            "blast_relay_congestion_marks",
            "Congestion marks that lowered the relay's limit, by kind",
            marks,
        )
    }

    /// Where each run stands: pending recipients, workers, the MTA's queue.
    fn progress(&self, enc: &mut DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let runs = &self.0;
        gauges(
            enc,
            "blast_recipients_pending",
            "Recipients of the campaign not yet answered (over every worker when several \
             share it; from this worker's start when alone); absent while the audience is \
             still being counted",
            runs.iter()
                .filter_map(|run| pending(&run.stats).map(|n| (run.labels(), n as f64))),
        )?;
        gauges(
            enc,
            "blast_campaign_workers",
            "Live workers sending the campaign, this one included",
            runs.iter().map(|run| {
                let n = run.stats.campaign_view().map_or(1, |v| v.workers);
                (run.labels(), n as f64)
            }),
        )?;
        gauges(
            enc,
            "blast_mta_queue_messages",
            "Messages in the MTA's queue at the last probe (only with `queue_probe`)",
            runs.iter()
                .filter(|run| run.stats.queue_probed.load(Ordering::Relaxed))
                .map(|run| (run.labels(), load(&run.stats.queue) as f64)),
        )?;
        gauges(
            enc,
            "blast_run_start_time_seconds",
            "When the run started, Unix time",
            runs.iter().map(|run| (run.labels(), run.started)),
        )?;
        gauges(
            enc,
            "blast_run_active",
            "1 while the run sends, 0 once it ended (its figures stay)",
            runs.iter().map(|run| {
                let active = run.active.load(Ordering::Relaxed);
                (run.labels(), f64::from(u8::from(active)))
            }),
        )
    }
}

fn relay_outcome<'a>(
    run: &'a Run,
    relay: &'a str,
    outcome: &'a str,
) -> [(&'static str, Label<'a>); 4] {
    let [c, w, r] = run.relay_labels(relay);
    [c, w, r, ("outcome", Label(outcome))]
}

/// Recipients not yet answered: the campaign's when several workers share
/// it, else this run's total less what it answered; None while the
/// audience is still being counted (a large one takes a while), rather
/// than a 0 a dashboard would read as done.
fn pending(stats: &Stats) -> Option<u64> {
    match stats.campaign_view() {
        Some(v) => Some(v.left),
        None => stats
            .total_known
            .load(Ordering::Relaxed)
            .then(|| load(&stats.total).saturating_sub(stats.done())),
    }
}
