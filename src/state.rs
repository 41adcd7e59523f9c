//! A campaign's run state and every transition between states, in one
//! place. Each transition is a compare-and-set in SQL (`UPDATE .. WHERE id =
//! $id AND state IN (allowed)`), so a `pause` or `cancel` given at any
//! moment (while the relays are probed, between pages, during the final
//! flush) is never overwritten by a sender that read the state earlier.

use std::fmt;
use std::str::FromStr;

use sqlx::AssertSqlSafe;

use crate::clock;
use crate::db::Db;
use crate::error::Result;

/// Where a campaign is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum State {
    /// Created by a first `blast send`, not started yet.
    New,
    /// Stored by `blast schedule`, waiting for its time.
    Scheduled,
    /// Resumed by the operator: `run-due` or `send` may start it.
    Ready,
    /// A sender holds its lease and sends.
    Running,
    /// Stopped by the operator or the circuit breaker until `blast resume`.
    Paused,
    /// A scheduled campaign found too late: waits for `blast resume`.
    Held,
    /// A run was interrupted (SIGTERM, SIGINT) with recipients left.
    Stopped,
    /// Every recipient had its turn (deferred ones may still be due).
    Finished,
    /// Cancelled by the operator: never sent again.
    Cancelled,
}

impl State {
    /// Every state.
    pub const ALL: [State; 9] = [
        State::New,
        State::Scheduled,
        State::Ready,
        State::Running,
        State::Paused,
        State::Held,
        State::Stopped,
        State::Finished,
        State::Cancelled,
    ];

    /// The tag stored in `blast_campaigns.state`.
    pub fn as_str(self) -> &'static str {
        match self {
            State::New => "new",
            State::Scheduled => "scheduled",
            State::Ready => "ready",
            State::Running => "running",
            State::Paused => "paused",
            State::Held => "held",
            State::Stopped => "stopped",
            State::Finished => "finished",
            State::Cancelled => "cancelled",
        }
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A state tag that is none of [`State`]'s.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown campaign state {0:?}")]
pub struct UnknownState(pub String);

impl FromStr for State {
    type Err = UnknownState;

    fn from_str(s: &str) -> Result<State, UnknownState> {
        State::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| UnknownState(s.to_string()))
    }
}

/// A change of state, with the states it may start from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    /// A worker starts a new pass over the audience.
    Start,
    /// A worker joins the pass under way (or recovers one whose workers
    /// all died).
    Join,
    /// The run ended with every recipient handled.
    Finish,
    /// The run was interrupted with recipients left.
    Stop,
    /// The circuit breaker (or a setting gone wrong) paused the run.
    Trip,
    /// `blast pause`.
    Pause,
    /// `blast resume`.
    Resume,
    /// `blast cancel`.
    Cancel,
    /// `run-due` found a scheduled campaign too late.
    Hold,
}

impl Transition {
    /// The state it leads to.
    pub fn to(self) -> State {
        match self {
            Transition::Start | Transition::Join => State::Running,
            Transition::Finish => State::Finished,
            Transition::Stop => State::Stopped,
            Transition::Trip | Transition::Pause => State::Paused,
            Transition::Resume => State::Ready,
            Transition::Cancel => State::Cancelled,
            Transition::Hold => State::Held,
        }
    }

    /// The states it may start from. A sender's own transitions (finish,
    /// stop, trip) only leave `running`: anything else means an operator
    /// acted meanwhile, and the operator wins.
    pub fn from(self) -> &'static [State] {
        use State::*;
        match self {
            Transition::Start => &[New, Scheduled, Ready, Stopped, Finished],
            Transition::Join => &[Running],
            Transition::Finish | Transition::Stop | Transition::Trip => &[Running],
            Transition::Pause => &[New, Scheduled, Ready, Running, Paused, Held, Stopped],
            Transition::Resume => &[Paused, Held],
            Transition::Cancel => &[New, Scheduled, Ready, Running, Paused, Held, Stopped],
            Transition::Hold => &[Scheduled],
        }
    }
}

/// Applies `t` to campaign `campaign_id` with `reason`, if its state is one
/// `t` may start from, in one statement. True when it was applied.
pub async fn apply(db: &Db, campaign_id: i64, t: Transition, reason: Option<&str>) -> Result<bool> {
    let mut conn = db.pool().acquire().await?;
    apply_on(&mut conn, campaign_id, t, reason, "").await
}

/// [`apply`] on `conn`, also setting `extra` (`, column = value`).
async fn apply_on(
    conn: &mut sqlx::AnyConnection,
    campaign_id: i64,
    t: Transition,
    reason: Option<&str>,
    extra: &str,
) -> Result<bool> {
    let from: Vec<String> = t
        .from()
        .iter()
        .map(|s| format!("'{}'", s.as_str()))
        .collect();
    let sql = format!(
        "UPDATE blast_campaigns SET state = $1, reason = $2, updated_at = $3{extra} \
         WHERE id = $4 AND state IN ({})",
        from.join(", ")
    );
    let done = sqlx::query(AssertSqlSafe(sql))
        .bind(t.to().as_str())
        .bind(reason)
        .bind(clock::db_timestamp(clock::now()))
        .bind(campaign_id)
        .execute(&mut *conn)
        .await?;
    Ok(done.rows_affected() > 0)
}

/// How a worker got into a running campaign.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Started {
    /// It started a new pass: the claims start over from the first id.
    NewPass,
    /// It joined the pass under way.
    Joined,
    /// The campaign may not run (paused, held, cancelled meanwhile).
    Refused,
}

/// Puts campaign `campaign_id` in `running` for a worker: a new pass from
/// any state a run may start from (clearing the last pass's claims in the
/// same transaction), else joining the pass under way.
pub async fn start(db: &Db, campaign_id: i64) -> Result<Started> {
    let mut tx = db.pool().begin().await?;
    if apply_on(&mut tx, campaign_id, Transition::Start, None, "").await? {
        // The new pass starts after what earlier passes finished for good.
        let done = crate::worker::claims::final_prefix(&mut tx, campaign_id).await?;
        sqlx::query("UPDATE blast_campaigns SET final_to = $1, claimed_to = $1 WHERE id = $2")
            .bind(done)
            .bind(campaign_id)
            .execute(&mut *tx)
            .await?;
        sqlx::query("DELETE FROM blast_claims WHERE campaign_id = $1")
            .bind(campaign_id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        return Ok(Started::NewPass);
    }
    let joined = apply_on(&mut tx, campaign_id, Transition::Join, None, "").await?;
    tx.commit().await?;
    Ok(if joined {
        Started::Joined
    } else {
        Started::Refused
    })
}

#[cfg(test)]
mod tests {
    use super::{apply, State, Transition};
    use crate::db::Db;

    #[test]
    fn tags_round_trip() {
        for s in State::ALL {
            assert_eq!(s.as_str().parse::<State>(), Ok(s));
        }
        assert!("Running".parse::<State>().is_err());
    }

    #[test]
    fn nothing_leaves_cancelled_and_a_sender_only_leaves_running() {
        for t in [
            Transition::Start,
            Transition::Join,
            Transition::Finish,
            Transition::Stop,
            Transition::Trip,
            Transition::Pause,
            Transition::Resume,
            Transition::Cancel,
            Transition::Hold,
        ] {
            assert!(!t.from().contains(&State::Cancelled), "{t:?}");
        }
        for t in [Transition::Finish, Transition::Stop, Transition::Trip] {
            assert_eq!(t.from(), &[State::Running]);
        }
        assert!(!Transition::Start.from().contains(&State::Paused));
        assert!(!Transition::Start.from().contains(&State::Running));
        assert!(!Transition::Start.from().contains(&State::Held));
    }

    async fn state(db: &Db, id: i64) -> State {
        let s: String = sqlx::query_scalar("SELECT state FROM blast_campaigns WHERE id = $1")
            .bind(id)
            .fetch_one(db.pool())
            .await
            .unwrap();
        s.parse().unwrap()
    }

    #[tokio::test]
    async fn a_pause_given_before_the_final_write_stays() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("s.db").display());
        let db = Db::connect(&url).await.unwrap();
        let c = crate::ledger::open_campaign(&db, "c", async { Ok(1) })
            .await
            .unwrap();
        assert!(apply(&db, c.id, Transition::Start, None).await.unwrap());
        // The operator pauses after the sender's last look at the state...
        assert!(apply(&db, c.id, Transition::Pause, Some("op"))
            .await
            .unwrap());
        // ... and the sender's end of run does not overwrite it.
        assert!(!apply(&db, c.id, Transition::Finish, None).await.unwrap());
        assert!(!apply(&db, c.id, Transition::Start, None).await.unwrap());
        assert_eq!(state(&db, c.id).await, State::Paused);
        assert!(apply(&db, c.id, Transition::Cancel, None).await.unwrap());
        assert!(!apply(&db, c.id, Transition::Resume, None).await.unwrap());
        assert_eq!(state(&db, c.id).await, State::Cancelled);
        db.close().await;
    }
}
