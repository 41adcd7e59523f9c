//! Stage 1 of reading a campaign: the file as written. These serde structs
//! only give the TOML a shape (unknown keys are refused here, so the error
//! names the key); every check of a value is in [`super::sections`], and
//! the typed result is [`super::Config`]. Like ripgrep's `LowArgs`.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Deserialize;

/// The campaign file as written (raw input, no I/O beyond reading it).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct CampaignFile {
    pub(super) name: String,
    pub(super) database: Option<String>,
    pub(super) send_at: Option<String>,
    pub(super) max_delay: Option<String>,
    pub(super) audience: AudienceFile,
    #[serde(default)]
    pub(super) vars: toml::Table,
    pub(super) message: MessageFile,
    pub(super) delivery: Option<DeliveryFile>,
    pub(super) bounces: Option<BouncesFile>,
    pub(super) unsubscribe: Option<UnsubscribeFile>,
}

/// `[audience]`: a table (and a condition) or a query.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct AudienceFile {
    pub(super) table: Option<String>,
    #[serde(rename = "where")]
    pub(super) filter: Option<String>,
    pub(super) query: Option<String>,
    pub(super) batch_size: Option<usize>,
}

/// `[message]`: headers and the template paths.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct MessageFile {
    pub(super) from: String,
    pub(super) reply_to: Option<String>,
    pub(super) to_name: Option<String>,
    pub(super) subject: String,
    pub(super) text: Option<PathBuf>,
    pub(super) html: Option<PathBuf>,
    #[serde(default)]
    pub(super) headers: BTreeMap<String, String>,
}

/// `[delivery]`: relays, limits and the retry schedule.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct DeliveryFile {
    pub(super) smtp: Option<OneOrMany>,
    pub(super) concurrency: Option<ConcurrencyFile>,
    pub(super) rate: Option<u32>,
    pub(super) envelope_from: Option<String>,
    pub(super) helo: Option<String>,
    pub(super) timeout_secs: Option<u64>,
    pub(super) retry: Option<Vec<String>>,
    pub(super) give_up_after: Option<String>,
    pub(super) breaker_threshold: Option<u32>,
    pub(super) render_pause: Option<u32>,
    pub(super) ambiguous_tries: Option<u32>,
    pub(super) breaker_rate: Option<f64>,
    pub(super) breaker_window: Option<u32>,
    pub(super) chunking: Option<bool>,
    pub(super) queue_probe: Option<String>,
    pub(super) queue_target: Option<u64>,
    pub(super) metrics: Option<String>,
    pub(super) max_workers: Option<u32>,
    pub(super) claim_size: Option<u64>,
    pub(super) claim_time: Option<String>,
    pub(super) worker_ttl: Option<String>,
}

/// `concurrency = 8` or `concurrency = "auto"`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(super) enum ConcurrencyFile {
    Number(i64),
    Text(String),
}

/// `smtp = "smtp://..."` or `smtp = ["smtp://...", { url = "smtp://...", ... }]`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(super) enum OneOrMany {
    One(String),
    Many(Vec<RelayFile>),
}

/// One relay: a URL, or a table with per-relay settings.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(super) enum RelayFile {
    Url(String),
    Table(RelayTable),
}

/// One relay's table in `delivery.smtp`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RelayTable {
    pub(super) url: String,
    pub(super) weight: Option<u32>,
    pub(super) max_concurrency: Option<usize>,
    pub(super) rate: Option<u32>,
    pub(super) tls: Option<String>,
    pub(super) ca_file: Option<PathBuf>,
    #[serde(default)]
    pub(super) danger_accept_invalid_certs: bool,
    pub(super) user: Option<String>,
    pub(super) password_env: Option<String>,
    pub(super) from_domains: Option<Vec<String>>,
}

/// `[bounces]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct BouncesFile {
    pub(super) verp: Option<String>,
}

/// `[unsubscribe]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct UnsubscribeFile {
    pub(super) url: String,
    pub(super) mailto: Option<String>,
}
