//! `serve`'s metrics: the unsubscribe requests this process answered, and
//! the database's inbound counts (bounces by kind and class, suppressed
//! addresses by reason and channel), which other processes (`bounce
//! ingest`, `reconcile`, every worker's refusals) add to as well.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, NoLabelSet};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use sqlx::Row;

use super::Label;
use crate::db::Db;
use crate::error::Result;

/// How `serve` answered one unsubscribe request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unsubscribe {
    /// `GET`: the confirmation page was shown (nothing changed).
    Page,
    /// `POST`: the address is now suppressed (or already was).
    Done,
    /// A forged, tampered or unknown token: 404.
    Invalid,
    /// The database did not answer: 503, the client retries.
    Unavailable,
}

impl Unsubscribe {
    fn label(self) -> &'static str {
        match self {
            Unsubscribe::Page => "page",
            Unsubscribe::Done => "unsubscribed",
            Unsubscribe::Invalid => "invalid",
            Unsubscribe::Unavailable => "unavailable",
        }
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    result: &'static str,
}

/// The unsubscribe requests this process answered, by result.
#[derive(Debug, Default)]
pub(super) struct Requests(Family<RequestLabels, Counter>);

impl Requests {
    pub(super) fn count(&self, u: Unsubscribe) {
        self.0
            .get_or_create(&RequestLabels { result: u.label() })
            .inc();
    }

    pub(super) fn register(&self, registry: &mut Registry) {
        registry.register(
            "blast_unsubscribe_requests",
            "One-click unsubscribe requests this `serve` answered, by result",
            self.0.clone(),
        );
    }
}

/// The inbound path's counts in the database at one moment.
#[derive(Debug, Clone, Default)]
pub struct InboundCounts {
    /// (kind, class, events): bounces, complaints, auto-replies ingested.
    pub bounces: Vec<(String, String, i64)>,
    /// (reason, channel, addresses) suppressed now.
    pub suppressed: Vec<(String, String, i64)>,
}

/// A suppression's reason, as a bounded label (the stored reason carries
/// the DSN and text).
const REASON_SQL: &str = "CASE \
     WHEN reason = 'unsubscribe' THEN 'unsubscribe' \
     WHEN reason LIKE 'complaint%' THEN 'complaint' \
     WHEN reason LIKE 'hard bounce%' THEN 'hard_bounce' \
     WHEN reason LIKE 'soft bounces%' THEN 'soft_bounces' \
     WHEN source LIKE 'smtp:%' THEN 'refused' \
     WHEN source = 'operator' THEN 'operator' \
     ELSE 'other' END";

/// The channel a suppression came by: the scheme of its source.
const CHANNEL_SQL: &str = "CASE \
     WHEN source LIKE 'https:%' THEN 'https' \
     WHEN source LIKE 'mailto:%' THEN 'mailto' \
     WHEN source LIKE 'bounce:%' THEN 'bounce' \
     WHEN source LIKE 'smtp:%' THEN 'smtp' \
     WHEN source LIKE 'maillog:%' THEN 'maillog' \
     WHEN source = 'operator' THEN 'operator' \
     ELSE 'other' END";

impl InboundCounts {
    /// Counts what the database holds now (two aggregate queries).
    pub async fn load(db: &Db) -> Result<InboundCounts> {
        let bounces = sqlx::query(
            "SELECT kind, class, COUNT(*) AS n FROM blast_bounces GROUP BY kind, class \
             ORDER BY kind, class",
        )
        .fetch_all(db.pool())
        .await?;
        let suppressed = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT r, c, COUNT(*) AS n FROM (SELECT {REASON_SQL} AS r, {CHANNEL_SQL} AS c \
             FROM blast_suppressions) s GROUP BY r, c ORDER BY r, c"
        )))
        .fetch_all(db.pool())
        .await?;
        let triple = |r: &sqlx::any::AnyRow, a: usize, b: usize| -> Result<(String, String, i64)> {
            Ok((r.try_get(a)?, r.try_get(b)?, r.try_get(2)?))
        };
        Ok(InboundCounts {
            bounces: bounces
                .iter()
                .map(|r| triple(r, 0, 1))
                .collect::<Result<_>>()?,
            suppressed: suppressed
                .iter()
                .map(|r| triple(r, 0, 1))
                .collect::<Result<_>>()?,
        })
    }
}

impl Collector for InboundCounts {
    fn encode(&self, mut enc: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let mut family = enc.encode_descriptor(
            "blast_bounces",
            "Bounces, complaints and auto-replies ingested (every process), by kind and class",
            None,
            MetricType::Counter,
        )?;
        for (kind, class, n) in &self.bounces {
            let labels = [("kind", Label(kind)), ("class", Label(class))];
            family
                .encode_family(&labels)?
                .encode_counter::<NoLabelSet, _, u64>(&(n.max(&0).unsigned_abs()), None)?;
        }
        let mut family = enc.encode_descriptor(
            "blast_suppressed_addresses",
            "Addresses suppressed now, by reason and the channel it came by (https and \
             mailto unsubscribes, bounce mail, smtp refusals, maillog reconciliation, operator)",
            None,
            MetricType::Gauge,
        )?;
        for (reason, channel, n) in &self.suppressed {
            let labels = [("reason", Label(reason)), ("channel", Label(channel))];
            family.encode_family(&labels)?.encode_gauge(n)?;
        }
        Ok(())
    }
}
