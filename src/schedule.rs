//! Scheduled campaigns. `blast schedule` freezes a campaign (its file and its
//! templates) into the database with a due time, so later edits to the files
//! do not change what is sent. `blast run-due` (for cron or a systemd timer)
//! sends every campaign that is due, including due retries of stored
//! campaigns, and exits when nothing is due. It never sends a campaign twice:
//! each `run-due` joins as a worker (named after its host, or `--worker`),
//! so a second one on the same host finds its name taken and skips the
//! campaign, one on another host shares the campaign's ranges, and
//! recipient-level resumption means a late run finds nobody left. A campaign more than `max_delay` overdue is
//! held for the operator instead of going out late without anyone noticing.

use std::collections::HashSet;
use std::future::Future;
use std::path::Path;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use sqlx::any::AnyRow;
use sqlx::{AssertSqlSafe, Row};
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;

use crate::campaign::Summary;
use crate::clock;
use crate::config::{Config, Overrides, SMTP_PASSWORD_ENV};
use crate::db::Db;
use crate::error::{Error, Result};
use crate::ledger::{self, humanize, CampaignRow};
use crate::progress;
use crate::state::{self, Transition};

/// A campaign as frozen by `blast schedule`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Spec {
    /// The campaign file's name.
    pub file_name: String,
    /// Its text.
    pub campaign_toml: String,
    /// Template files as named in it, with their text.
    pub templates: Vec<(String, String)>,
}

/// What the host running `run-due` supplies to stored campaigns: the
/// settings that run commands or read secrets. A stored campaign is data
/// written by whoever can write the database; these come from the cron
/// host's own flags and environment (see `docs/security.md`).
#[derive(Debug, Clone)]
pub struct Host {
    /// `--queue-probe`: the MTA queue probe every stored campaign uses; a
    /// stored campaign's own `delivery.queue_probe` is ignored.
    pub queue_probe: Option<String>,
    /// `--password-env`: the environment variables a stored relay may take
    /// its AUTH password from. Defaults to [`SMTP_PASSWORD_ENV`] alone.
    pub password_envs: Vec<String>,
    /// `--metrics`: where every campaign's run is exposed; a stored
    /// campaign's own `delivery.metrics` is ignored (one endpoint per
    /// process).
    pub metrics: Option<Arc<crate::metrics::Metrics>>,
}

impl Default for Host {
    fn default() -> Self {
        Host {
            queue_probe: None,
            password_envs: vec![SMTP_PASSWORD_ENV.to_string()],
            metrics: None,
        }
    }
}

/// Files to write for a stored campaign: blast's name, the text.
type Frozen<'a> = Vec<(String, &'a str)>;

impl Spec {
    /// Writes the frozen files into `dir` under names blast chooses
    /// (`text.tera`, `html.tera`, `ca-N.pem`, never the names stored) and
    /// loads them as a campaign on `database` (the database the spec came
    /// from), with `host`'s settings for what runs commands or reads
    /// secrets.
    pub fn load(&self, dir: &Path, database: &str, host: &Host) -> Result<Config> {
        let stored = |message: String| Error::StoredSpec {
            campaign: self.file_name.clone(),
            message,
        };
        let (text, files) = self.confine(host).map_err(stored)?;
        for (name, body) in files {
            let path = dir.join(name);
            std::fs::write(&path, body).map_err(|e| Error::io(&path, e))?;
        }
        // Only the passwords the host allows are visible; `${VARS}` in the
        // stored file were refused by `confine`.
        let env = |k: &str| {
            host.password_envs
                .iter()
                .any(|n| n == k)
                .then(|| std::env::var(k).ok())
                .flatten()
        };
        Config::parse(
            &text,
            &format!("stored campaign {}", self.file_name),
            dir,
            &Overrides {
                database: Some(database.to_string()),
                ..Default::default()
            },
            &env,
        )
    }

    /// The stored campaign file rewritten to name only the files blast
    /// writes, with `host`'s queue probe, and those files. Refuses a file
    /// the spec does not hold, a `password_env` the host does not allow and
    /// `${VARS}` in a relay URL.
    fn confine(&self, host: &Host) -> std::result::Result<(String, Frozen<'_>), String> {
        let mut table: toml::Table =
            toml::from_str(&self.campaign_toml).map_err(|e| e.to_string())?;
        let mut files = Vec::new();
        if let Some(m) = table.get_mut("message").and_then(|m| m.as_table_mut()) {
            for key in ["text", "html"] {
                if let Some(v) = m.get_mut(key) {
                    let ours = format!("{key}.tera");
                    files.push((ours.clone(), self.frozen(&format!("message.{key}"), v)?));
                    *v = toml::Value::String(ours);
                }
            }
        }
        let d = table
            .entry("delivery")
            .or_insert_with(|| toml::Value::Table(Default::default()));
        let d = d.as_table_mut().ok_or("delivery is not a table")?;
        d.remove("queue_probe");
        match &host.queue_probe {
            Some(probe) => {
                d.insert("queue_probe".into(), toml::Value::String(probe.clone()));
            }
            None => {
                d.remove("queue_target");
            }
        }
        let relays: Vec<&mut toml::Value> = match d.get_mut("smtp") {
            Some(toml::Value::Array(a)) => a.iter_mut().collect(),
            Some(v) => vec![v],
            None => vec![],
        };
        for (i, relay) in relays.into_iter().enumerate() {
            let url = match &*relay {
                toml::Value::Table(t) => t.get("url").and_then(|u| u.as_str()),
                v => v.as_str(),
            };
            if url.is_some_and(|u| u.contains("${")) {
                return Err(
                    "delivery.smtp: a stored campaign cannot read the environment \
                            (${...} in a relay URL)"
                        .into(),
                );
            }
            let toml::Value::Table(t) = relay else {
                continue;
            };
            if let Some(name) = t.get("password_env").and_then(|v| v.as_str()) {
                if !host.password_envs.iter().any(|n| n == name) {
                    return Err(format!(
                        "delivery.smtp: password_env {name:?} is not allowed on this host \
                         (run-due --password-env {name} allows it)"
                    ));
                }
            }
            if let Some(v) = t.get_mut("ca_file") {
                // An absolute CA file is the host's own (blast schedule
                // freezes only relative ones); it is read as certificates.
                if v.as_str().is_some_and(|p| Path::new(p).is_absolute()) {
                    continue;
                }
                let ours = format!("ca-{i}.pem");
                files.push((ours.clone(), self.frozen("delivery.smtp.ca_file", v)?));
                *v = toml::Value::String(ours);
            }
        }
        Ok((table.to_string(), files))
    }

    /// The frozen text of the file `name` (the value of `key`) names.
    fn frozen(&self, key: &str, name: &toml::Value) -> std::result::Result<&str, String> {
        let name = name
            .as_str()
            .ok_or_else(|| format!("{key} is not a file name"))?;
        self.templates
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, body)| body.as_str())
            .ok_or_else(|| format!("{key}: {name:?} is not among its frozen files"))
    }
}

/// Stores `cfg` (read from `path`) to be sent at `at`. Refuses a campaign
/// that has already started.
pub async fn schedule(cfg: &Config, path: &Path, at: OffsetDateTime) -> Result<CampaignRow> {
    let campaign_toml = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let file_name = path
        .file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_else(|| "campaign.toml".into());
    let spec = Spec {
        file_name,
        campaign_toml,
        templates: cfg.template_files.clone(),
    };
    let spec = serde_json::to_string(&spec).unwrap_or_default();
    let db = Db::connect(&cfg.database).await?;
    let now = clock::db_timestamp(clock::now());
    let n = sqlx::query(
        "INSERT INTO blast_campaigns (name, state, max_recipient_id, created_at, updated_at, send_at, spec) \
         VALUES ($1, 'scheduled', -1, $2, $2, $3, $4) \
         ON CONFLICT (name) DO UPDATE SET send_at = excluded.send_at, spec = excluded.spec, \
         state = 'scheduled', reason = NULL, updated_at = excluded.updated_at \
         WHERE blast_campaigns.state IN ('new', 'scheduled', 'held')",
    )
    .bind(&cfg.name)
    .bind(&now)
    .bind(clock::db_timestamp(at))
    .bind(spec)
    .execute(db.pool())
    .await?
    .rows_affected();
    let row = ledger::find_campaign(&db, &cfg.name)
        .await?
        .ok_or_else(|| Error::UnknownCampaign(cfg.name.clone()))?;
    db.close().await;
    if n == 0 {
        return Err(Error::NotSendable {
            campaign: cfg.name.clone(),
            state: row.state,
            reason: row.reason,
            hint: "it has already started; schedule a copy under a new name".into(),
        });
    }
    Ok(row)
}

/// What `run-due` did with one campaign.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Due {
    /// Sent (or continued); the run's summary.
    Sent {
        /// Campaign.
        campaign: String,
        /// Summary.
        summary: Box<Summary>,
    },
    /// Overdue by more than `max_delay`: held.
    Held {
        /// Campaign.
        campaign: String,
        /// Why.
        reason: String,
    },
    /// A live process of this worker name is sending it, or it has its
    /// `max_workers`.
    Busy {
        /// Campaign.
        campaign: String,
    },
    /// It could not be sent.
    Failed {
        /// Campaign.
        campaign: String,
        /// The error.
        error: String,
    },
}

/// Sends every due stored campaign once, then returns what it did.
/// `worker` names this process among each campaign's workers (default:
/// the host name).
pub async fn run_due(
    database: &str,
    worker: Option<&str>,
    mode: progress::Mode,
    stop: impl Future<Output = ()> + Send + 'static,
) -> Result<Vec<Due>> {
    run_due_on(database, worker, &Host::default(), mode, stop).await
}

/// [`run_due`] with `host`'s queue probe and allowed password variables.
pub async fn run_due_on(
    database: &str,
    worker: Option<&str>,
    host: &Host,
    mode: progress::Mode,
    stop: impl Future<Output = ()> + Send + 'static,
) -> Result<Vec<Due>> {
    let worker = worker.map_or_else(crate::worker::hostname, |w| w.trim().to_string());
    let db = Db::connect(database).await?;
    let (stop, watcher) = crate::stop::token(stop);
    let mut done = HashSet::new();
    let mut report = Vec::new();
    loop {
        let now = clock::now();
        let Some((name, row)) = next_due(&db, now, &worker, &done).await? else {
            break;
        };
        done.insert(name.clone());
        if stop.is_cancelled() {
            break;
        }
        report.push(run_one(&db, database, &worker, host, mode, &stop, now, name, &row).await?);
    }
    watcher.abort();
    db.close().await;
    Ok(report)
}

/// The first campaign due at `now` that this run has not taken yet, with
/// its row. Due: scheduled for `now` or earlier; finished with deferred
/// recipients whose retry time has come; or left unfinished by a run that
/// ended early: `stopped` (SIGTERM during a reboot) or still `running` with
/// live worker of this name (SIGKILL, OOM; or one another host's workers
/// are sending, which this one joins). A live worker of this name on this
/// host is left to [`crate::worker::Worker::join`], which knows whether its
/// process is gone. Asked again after every campaign, since sending one
/// takes time and others fall due.
async fn next_due(
    db: &Db,
    now: OffsetDateTime,
    worker: &str,
    done: &HashSet<String>,
) -> Result<Option<(String, AnyRow)>> {
    let db_now = db.now_ms_sql();
    let due = sqlx::query(AssertSqlSafe(format!(
        "SELECT c.name, c.state, c.send_at, c.spec FROM blast_campaigns c \
         WHERE c.spec IS NOT NULL AND ( \
           (c.state IN ('scheduled', 'ready') AND c.send_at <= $1) OR \
           c.state = 'stopped' OR \
           (c.state = 'running' AND NOT EXISTS (SELECT 1 FROM blast_workers w \
              WHERE w.campaign_id = c.id AND w.name = $3 AND w.lease_until > {db_now} \
              AND w.process NOT LIKE $2)) OR \
           (c.state IN ('finished', 'stopped') AND EXISTS (SELECT 1 FROM blast_deliveries d \
              WHERE d.campaign_id = c.id AND d.status = 'deferred' \
              AND (d.next_attempt_at IS NULL OR d.next_attempt_at <= $1)))) \
         ORDER BY c.send_at, c.id"
    )))
    .bind(clock::db_timestamp(now))
    .bind(format!("{}/%", crate::worker::hostname()))
    .bind(worker)
    .fetch_all(db.pool())
    .await?;
    Ok(due.into_iter().find_map(|r| {
        let name: String = r.try_get("name").ok()?;
        (!done.contains(&name)).then_some((name, r))
    }))
}

/// Sends one due campaign from its frozen spec, or holds it if it is more
/// than `max_delay` late. A campaign that fails is reported, not fatal;
/// `Err` (a database failure, an unreadable spec) ends the run.
#[allow(clippy::too_many_arguments)]
async fn run_one(
    db: &Db,
    database: &str,
    worker: &str,
    host: &Host,
    mode: progress::Mode,
    stop: &CancellationToken,
    now: OffsetDateTime,
    name: String,
    row: &AnyRow,
) -> Result<Due> {
    let state: String = row.try_get("state")?;
    let send_at: Option<String> = row.try_get("send_at")?;
    let spec: String = row.try_get("spec")?;
    let spec: Spec = serde_json::from_str(&spec).map_err(|e| Error::StoredSpec {
        campaign: name.clone(),
        message: e.to_string(),
    })?;
    // Kept until the send is over: the relays' CA files are read from it
    // when the transport is built, after loading.
    let dir = tempfile_dir()?;
    let cfg = match spec.load(dir.path(), database, host) {
        Ok(mut c) => {
            c.worker = worker.to_string();
            c.delivery.metrics = None;
            c
        }
        Err(e) => {
            return Ok(Due::Failed {
                campaign: name,
                error: e.to_string(),
            })
        }
    };
    let late = send_at
        .as_deref()
        .and_then(clock::parse_db_timestamp)
        .map(|t| now - t);
    if let Some(late) = late.filter(|l| state == "scheduled" && *l > cfg.max_delay) {
        return hold(db, name, late, cfg.max_delay).await;
    }
    let token = stop.clone();
    Ok(
        match crate::commands::send_observed(
            &cfg,
            mode,
            async move { token.cancelled().await },
            CancellationToken::new(),
            host.metrics.clone(),
        )
        .await
        {
            Ok(summary) => Due::Sent {
                campaign: name,
                summary: Box::new(summary),
            },
            Err(Error::Busy { .. } | Error::WorkersFull { .. }) => Due::Busy { campaign: name },
            Err(e) => Due::Failed {
                campaign: name,
                error: e.to_string(),
            },
        },
    )
}

/// Holds a campaign `late` by more than `max_delay`, with a reason that
/// tells the operator how to send it anyway.
async fn hold(
    db: &Db,
    name: String,
    late: time::Duration,
    max_delay: std::time::Duration,
) -> Result<Due> {
    let reason = format!(
        "overdue by {} (max_delay {}); `blast resume {name} --database ...` sends it anyway",
        humanize(std::time::Duration::from_secs(
            late.whole_seconds().max(0) as u64
        )),
        humanize(max_delay)
    );
    if let Some(c) = ledger::find_campaign(db, &name).await? {
        state::apply(db, c.id, Transition::Hold, Some(&reason)).await?;
    }
    tracing::warn!("campaign {name}: held: {reason}");
    Ok(Due::Held {
        campaign: name,
        reason,
    })
}

/// A private temporary folder for a spec's files, removed on drop.
fn tempfile_dir() -> Result<TempDir> {
    let base = std::env::temp_dir().join(format!(
        "blast-spec-{}-{}",
        std::process::id(),
        clock::now().unix_timestamp_nanos()
    ));
    std::fs::create_dir_all(&base).map_err(|e| Error::io(&base, e))?;
    Ok(TempDir(base))
}

/// Removes its folder on drop.
struct TempDir(std::path::PathBuf);

impl TempDir {
    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(toml: &str, files: &[(&str, &str)]) -> Spec {
        Spec {
            file_name: "c.toml".into(),
            campaign_toml: toml.into(),
            templates: files
                .iter()
                .map(|(n, b)| (n.to_string(), b.to_string()))
                .collect(),
        }
    }

    #[test]
    fn files_get_names_blast_chooses() {
        let s = spec(
            "[message]\ntext = \"/etc/x.txt\"\nhtml = \"../../h.html\"\n\
             [delivery]\nsmtp = [{ url = \"smtp://r:587\", ca_file = \"../ca.pem\" }, \
             { url = \"smtp://q:587\", ca_file = \"/etc/ssl/ca.pem\" }]\n",
            &[
                ("/etc/x.txt", "T"),
                ("../../h.html", "H"),
                ("../ca.pem", "C"),
            ],
        );
        let (text, files) = s.confine(&Host::default()).unwrap();
        let names: Vec<_> = files.iter().map(|(n, b)| (n.as_str(), *b)).collect();
        assert_eq!(
            names,
            [("text.tera", "T"), ("html.tera", "H"), ("ca-0.pem", "C")]
        );
        assert!(!text.contains("../"), "{text}");
        assert!(
            text.contains("/etc/ssl/ca.pem"),
            "the host's own CA file stays"
        );
    }

    #[test]
    fn a_file_not_frozen_is_refused() {
        let s = spec("[message]\ntext = \"/etc/shadow\"\n", &[]);
        let e = s.confine(&Host::default()).unwrap_err();
        assert!(e.contains("not among its frozen files"), "{e}");
    }

    #[test]
    fn the_queue_probe_is_the_hosts() {
        let s = spec(
            "[delivery]\nqueue_probe = \"rm -rf /\"\nqueue_target = 10\n",
            &[],
        );
        let (text, _) = s.confine(&Host::default()).unwrap();
        assert!(!text.contains("queue_probe") && !text.contains("queue_target"));
        let host = Host {
            queue_probe: Some("postqueue -j".into()),
            ..Default::default()
        };
        let (text, _) = s.confine(&host).unwrap();
        assert!(text.contains("postqueue -j") && !text.contains("rm -rf"));
        assert!(text.contains("queue_target = 10"));
    }

    #[test]
    fn secrets_need_the_hosts_consent() {
        let s = spec(
            "[delivery]\nsmtp = [{ url = \"smtp://r:587\", user = \"u\", password_env = \"AWS_SECRET\" }]\n",
            &[],
        );
        assert!(s.confine(&Host::default()).is_err());
        let host = Host {
            password_envs: vec!["AWS_SECRET".into()],
            ..Default::default()
        };
        assert!(s.confine(&host).is_ok());
        let s = spec("[delivery]\nsmtp = \"smtp://${HOME}.evil.example\"\n", &[]);
        assert!(s
            .confine(&Host::default())
            .unwrap_err()
            .contains("environment"));
    }
}
