//! Who may send a campaign right now. A campaign is sent by at most one blast
//! process at a time: the sender takes a lease in `blast_campaigns`
//! (`lease_owner`, `lease_until`), a keeper task extends it every
//! [`HEARTBEAT`], and it is released at the end. A crashed sender's lease
//! expires after [`TTL`]; on the same host a lease whose process is gone is
//! taken over at once, so a re-run after a crash needs no cleanup.
//!
//! The keeper also polls the campaign's state every [`POLL`], so `blast
//! pause` or `blast cancel` in another process stops the sender within a
//! second.
//!
//! Scaling out later: several hosts sharing one campaign will keep this
//! campaign-level lease for control and add recipient-range claims
//! (`blast_claims(campaign_id, first_id, last_id, owner, lease_until)`,
//! claimed with `FOR UPDATE SKIP LOCKED` on PostgreSQL) that the source pages
//! through instead of the whole id range. Nothing here assumes one sender per
//! campaign beyond this module.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use sqlx::Row;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::clock;
use crate::db::Db;
use crate::error::{Error, Result};
use crate::state::State;

/// A lease not extended for this long is free for others.
pub const TTL: Duration = Duration::from_secs(30);
/// How often the holder extends its lease.
pub const HEARTBEAT: Duration = Duration::from_secs(5);
/// How often the holder checks for pause or cancel.
pub const POLL: Duration = Duration::from_secs(1);

/// Why a campaign run was stopped from outside the process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Interruption {
    /// `blast pause`, or the circuit breaker: state `paused`.
    Paused(String),
    /// `blast cancel`: state `cancelled`.
    Cancelled(String),
    /// Another process took the lease (ours had expired).
    LeaseLost(String),
}

/// The task keeping a lease; [`Keeper::finish`] ends it.
#[derive(Debug)]
pub struct Keeper {
    done: CancellationToken,
    task: JoinHandle<()>,
    why: Arc<Mutex<Option<Interruption>>>,
}

impl Keeper {
    /// Stops keeping the lease; returns why the run was stopped from
    /// outside, if it was.
    pub async fn finish(self) -> Option<Interruption> {
        self.done.cancel();
        let _ = self.task.await;
        let why = self.why.lock().unwrap_or_else(|p| p.into_inner()).take();
        why
    }
}

/// A held lease.
#[derive(Debug)]
pub struct Lease {
    db: Db,
    campaign_id: i64,
    owner: String,
}

/// This process's identity in `lease_owner`: `host/pid/nonce`.
pub fn owner_id() -> String {
    format!(
        "{}/{}/{}",
        hostname(),
        std::process::id(),
        clock::now().unix_timestamp_nanos() % 1_000_000_007
    )
}

/// This host's name, as lease owners begin with it.
pub(crate) fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "localhost".into())
}

/// True when `owner` names a process on this host that no longer runs.
fn is_dead_local_owner(owner: &str) -> bool {
    let mut parts = owner.split('/');
    let (Some(host), Some(pid)) = (parts.next(), parts.next()) else {
        return false;
    };
    host == hostname()
        && pid.parse::<u32>().is_ok_and(|pid| {
            pid != std::process::id() && !std::path::Path::new(&format!("/proc/{pid}")).exists()
        })
}

impl Lease {
    /// Takes the lease of `campaign_id` or explains who holds it.
    pub async fn acquire(db: &Db, campaign_id: i64, name: &str) -> Result<Lease> {
        let owner = owner_id();
        let now = clock::now();
        let row = sqlx::query("SELECT lease_owner, lease_until FROM blast_campaigns WHERE id = $1")
            .bind(campaign_id)
            .fetch_one(db.pool())
            .await?;
        let holder: Option<String> = row.try_get("lease_owner")?;
        let until: Option<String> = row.try_get("lease_until")?;
        // A dead process on this host: its exact owner string may be replaced.
        let stealable = holder
            .as_deref()
            .filter(|h| is_dead_local_owner(h))
            .unwrap_or("");
        let taken = sqlx::query(
            "UPDATE blast_campaigns SET lease_owner = $1, lease_until = $2, updated_at = $3 \
             WHERE id = $4 AND (lease_owner IS NULL OR lease_until < $3 OR lease_owner = $5)",
        )
        .bind(&owner)
        .bind(clock::db_timestamp(now + TTL))
        .bind(clock::db_timestamp(now))
        .bind(campaign_id)
        .bind(stealable)
        .execute(db.pool())
        .await?
        .rows_affected();
        if taken == 1 {
            return Ok(Lease {
                db: db.clone(),
                campaign_id,
                owner,
            });
        }
        Err(Error::Busy {
            campaign: name.to_string(),
            owner: holder.unwrap_or_default(),
            until: until.unwrap_or_default(),
        })
    }

    /// Extends the lease; false if another process has taken it.
    async fn extend(&self) -> Result<bool> {
        let n = sqlx::query(
            "UPDATE blast_campaigns SET lease_until = $1 WHERE id = $2 AND lease_owner = $3",
        )
        .bind(clock::db_timestamp(clock::now() + TTL))
        .bind(self.campaign_id)
        .bind(&self.owner)
        .execute(self.db.pool())
        .await?
        .rows_affected();
        Ok(n == 1)
    }

    /// Keeps the lease alive and watches for pause/cancel until the
    /// returned [`Keeper`] is finished. When the campaign is paused or
    /// cancelled from outside (or the lease is lost) it records why and
    /// cancels `stop`.
    pub fn keep(self: &Arc<Self>, stop: CancellationToken) -> Keeper {
        let lease = self.clone();
        let done = CancellationToken::new();
        let why = Arc::new(Mutex::new(None));
        let task = {
            let (done, why) = (done.clone(), why.clone());
            tokio::spawn(async move {
                if let Some(i) = lease.watch(done).await {
                    *why.lock().unwrap_or_else(|p| p.into_inner()) = Some(i);
                    stop.cancel();
                }
            })
        };
        Keeper { done, task, why }
    }

    /// Polls every [`POLL`] and extends every [`HEARTBEAT`] until `done`;
    /// returns why the run must stop, if it must.
    async fn watch(&self, done: CancellationToken) -> Option<Interruption> {
        let mut since_extend = Duration::ZERO;
        loop {
            tokio::select! {
                _ = done.cancelled() => return None,
                _ = tokio::time::sleep(POLL) => {}
            }
            since_extend += POLL;
            let interruption = match self.poll().await {
                Ok(i) => i,
                Err(e) => {
                    // A transient database error must not stop sending;
                    // the lease has TTL / POLL chances to recover.
                    tracing::warn!("lease keeper: {e}");
                    None
                }
            };
            if interruption.is_some() {
                return interruption;
            }
            if since_extend < HEARTBEAT {
                continue;
            }
            since_extend = Duration::ZERO;
            match self.extend().await {
                Ok(false) => {
                    return Some(Interruption::LeaseLost(
                        "another process took over the campaign's lease".into(),
                    ))
                }
                Ok(true) => {}
                Err(e) => tracing::warn!("lease keeper: {e}"),
            }
        }
    }

    /// Reads the campaign's state: paused or cancelled from outside?
    async fn poll(&self) -> Result<Option<Interruption>> {
        let row = sqlx::query("SELECT state, reason FROM blast_campaigns WHERE id = $1")
            .bind(self.campaign_id)
            .fetch_one(self.db.pool())
            .await?;
        let state: String = row.try_get("state")?;
        let reason: Option<String> = row.try_get("reason")?;
        let reason = reason.unwrap_or_default();
        Ok(match state.parse::<State>() {
            Ok(State::Paused) => Some(Interruption::Paused(reason)),
            Ok(State::Cancelled) => Some(Interruption::Cancelled(reason)),
            _ => None,
        })
    }

    /// Gives the lease up (the campaign's state is the caller's business).
    pub async fn release(&self) -> Result<()> {
        sqlx::query("UPDATE blast_campaigns SET lease_owner = NULL, lease_until = NULL WHERE id = $1 AND lease_owner = $2")
            .bind(self.campaign_id)
            .bind(&self.owner)
            .execute(self.db.pool())
            .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dead_local_owners_are_recognised() {
        // PID 0 never has a /proc entry, our own pid always has.
        let me = format!("{}/{}/1", hostname(), std::process::id());
        assert!(!is_dead_local_owner(&me));
        let dead = format!("{}/{}/1", hostname(), u32::MAX - 7);
        assert!(is_dead_local_owner(&dead));
        assert!(!is_dead_local_owner(&format!(
            "other-host/{}/1",
            u32::MAX - 7
        )));
        assert!(!is_dead_local_owner("garbage"));
    }
}
