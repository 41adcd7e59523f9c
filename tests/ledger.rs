use blast::config::RetryPolicy;
use blast::ledger::{self, Ledger, SqlLedger};
use blast::model::{Outcome, Record, Reply};
use sqlx::Row;

use crate::util::{Backend, World};

/// Text that breaks naive quoting or JSON building: quotes, backslashes
/// (also ones that look like escapes), control characters, non-ASCII, things
/// that look like SQL, JSON or parameters. (NUL is not here: PostgreSQL text
/// cannot hold it.)
const AWKWARD: &[&str] = &[
    "it's \"quoted\" ''",
    r"back\slash \\ \n \u0041 \",
    "tab\tnewline\nreturn\r\u{1}\u{1f}\u{7f}",
    "ünïcödé ✉ 日本語 🚀 \u{2028}\u{feff}",
    r#"{"a": [1, 2]}, null, '; DROP TABLE blast_deliveries; --"#,
    "$1 $3::json ? :name",
    "",
];

fn record(id: i64, outcome: Outcome, text: &str) -> Record {
    Record {
        recipient_id: id,
        email: format!("{text}@Example.com"),
        outcome,
        relay: Some(format!("smtp://{text}")),
        attempts: 0,
        first_attempt_at: None,
        skipped: None,
        claim_token: None,
    }
}

fn reply(code: u16, enhanced: &str, text: &str) -> Reply {
    Reply {
        code: Some(code),
        enhanced: Some(enhanced.to_string()),
        text: text.to_string(),
    }
}

/// Every text column of a batch comes back byte for byte: in
/// `blast_deliveries`, in `blast_attempts` (a deferral) and in
/// `blast_suppressions` (a hard bounce, address in canonical form).
async fn awkward_text_round_trips(backend: Backend) {
    let w = World::new(backend).await;
    let db = w.db().await;
    let c = ledger::open_campaign(&db, "awkward", async { Ok(1000) })
        .await
        .unwrap();
    let mut batch = Vec::new();
    for (i, t) in AWKWARD.iter().enumerate() {
        let id = i as i64 + 1;
        let sent = Outcome::Sent {
            reply: reply(250, t, t),
            queue_id: Some(t.to_string()),
        };
        batch.push(record(id, sent, t));
        let deferred = Outcome::Deferred(reply(451, t, t));
        batch.push(record(100 + id, deferred, t));
    }
    let gone = Outcome::Failed(reply(
        550,
        "5.1.1",
        "5.1.1 user unknown: it's \"gone\" \\ ✉",
    ));
    // An address blast can send to, but awkward: quote, braces, `$1`,
    // blanks around it, an upper-case IDN domain.
    let mut awkward_address = record(200, gone, "");
    awkward_address.email = " O'Brien+{x}$1@ÜNÏCODE.Example ".into();
    batch.push(awkward_address);
    let mut l = SqlLedger::new(db.clone(), c.id, RetryPolicy::default());
    l.record(&batch).await.unwrap();

    let rows = sqlx::query(
        "SELECT recipient_id, email, status, smtp_code, enhanced_status, reply, queue_id, relay \
         FROM blast_deliveries WHERE campaign_id = $1 ORDER BY recipient_id",
    )
    .bind(c.id)
    .fetch_all(db.pool())
    .await
    .unwrap();
    assert_eq!(rows.len(), batch.len());
    let mut expected = batch.clone();
    expected.sort_by_key(|r| r.recipient_id);
    for (row, want) in rows.iter().zip(&expected) {
        let r = want.outcome.reply();
        let got: (
            i64,
            String,
            String,
            Option<i32>,
            Option<String>,
            Option<String>,
        ) = (
            row.get("recipient_id"),
            row.get("email"),
            row.get("status"),
            row.get("smtp_code"),
            row.get("enhanced_status"),
            row.get("reply"),
        );
        assert_eq!(
            got,
            (
                want.recipient_id,
                want.email.clone(),
                want.status().as_str().to_string(),
                r.code.map(i32::from),
                r.enhanced.clone(),
                Some(r.text.clone()),
            )
        );
        let queue_id = match &want.outcome {
            Outcome::Sent { queue_id, .. } => queue_id.clone(),
            _ => None,
        };
        assert_eq!(row.get::<Option<String>, _>("queue_id"), queue_id);
        assert_eq!(row.get::<Option<String>, _>("relay"), want.relay);
    }

    // The deferrals' history, same text.
    let replies: Vec<(i64, String, String)> = sqlx::query_as(
        "SELECT recipient_id, reply, relay FROM blast_attempts WHERE campaign_id = $1 \
         ORDER BY recipient_id",
    )
    .bind(c.id)
    .fetch_all(db.pool())
    .await
    .unwrap();
    let want: Vec<(i64, String, String)> = AWKWARD
        .iter()
        .enumerate()
        .map(|(i, t)| (101 + i as i64, t.to_string(), format!("smtp://{t}")))
        .collect();
    assert_eq!(replies, want);

    let suppressed: Vec<(String, String)> =
        sqlx::query_as("SELECT address, reason FROM blast_suppressions")
            .fetch_all(db.pool())
            .await
            .unwrap();
    assert_eq!(
        suppressed,
        [(
            "o'brien+{x}$1@xn--ncode-cta3g.example".to_string(),
            "5.1.1 user unknown: it's \"gone\" \\ ✉".to_string()
        )]
    );
    db.close().await;
}

#[tokio::test]
async fn awkward_text_round_trips_sqlite() {
    awkward_text_round_trips(Backend::Sqlite).await;
}

#[tokio::test]
async fn awkward_text_round_trips_postgres() {
    awkward_text_round_trips(Backend::Postgres).await;
}

/// One batch holding two answers for the same recipient (deferred, then
/// sent) ends as if they had been written one after the other: sent, two
/// attempts, the first deferral's time kept; a later failure changes nothing.
async fn one_recipient_twice_in_a_batch(backend: Backend) {
    let w = World::new(backend).await;
    let db = w.db().await;
    let c = ledger::open_campaign(&db, "twice", async { Ok(10) })
        .await
        .unwrap();
    let mut l = SqlLedger::new(db.clone(), c.id, RetryPolicy::default());
    let mut sent = record(
        1,
        Outcome::Sent {
            reply: reply(250, "2.0.0", "Ok: queued as A"),
            queue_id: Some("A".into()),
        },
        "u1",
    );
    sent.attempts = 1;
    let other = record(2, Outcome::Deferred(reply(451, "4.3.0", "later")), "u2");
    let deferred = record(1, Outcome::Deferred(reply(451, "4.3.0", "later")), "u1");
    l.record(&[deferred, other, sent]).await.unwrap();
    let late = record(
        1,
        Outcome::Failed(reply(550, "5.1.1", "no such user")),
        "u1",
    );
    l.record(&[late]).await.unwrap();

    let (status, attempts, first, queue_id): (String, i32, Option<String>, Option<String>) =
        sqlx::query_as(
            "SELECT status, attempts, first_attempt_at, queue_id FROM blast_deliveries \
             WHERE campaign_id = $1 AND recipient_id = 1",
        )
        .bind(c.id)
        .fetch_one(db.pool())
        .await
        .unwrap();
    assert_eq!((status.as_str(), attempts), ("sent", 2));
    assert!(first.is_some(), "the deferral's time is kept");
    assert_eq!(queue_id.as_deref(), Some("A"));
    let history: Vec<(i64, String)> = sqlx::query_as(
        "SELECT recipient_id, status FROM blast_attempts WHERE campaign_id = $1 \
         ORDER BY recipient_id, status",
    )
    .bind(c.id)
    .fetch_all(db.pool())
    .await
    .unwrap();
    let history: Vec<(i64, &str)> = history.iter().map(|(i, s)| (*i, s.as_str())).collect();
    assert_eq!(history, [(1, "deferred"), (1, "sent"), (2, "deferred")]);
    // The late failure left the row alone; its hard bounce still
    // suppresses the address, as it always has.
    let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM blast_suppressions")
        .fetch_one(db.pool())
        .await
        .unwrap();
    assert_eq!(n, 1, "a hard bounce still suppresses (as before)");
    db.close().await;
}

#[tokio::test]
async fn one_recipient_twice_in_a_batch_sqlite() {
    one_recipient_twice_in_a_batch(Backend::Sqlite).await;
}

#[tokio::test]
async fn one_recipient_twice_in_a_batch_postgres() {
    one_recipient_twice_in_a_batch(Backend::Postgres).await;
}

/// Every row the ledger inserts or updates names the worker that wrote it
/// (schema v8): a deferral answered later by another worker becomes that
/// worker's; a late answer to a final row, and the breaker's requeue, leave
/// the row's worker as it was; a ledger built without a worker leaves it NULL.
async fn rows_carry_their_worker(backend: Backend) {
    let w = World::new(backend).await;
    let db = w.db().await;
    let c = ledger::open_campaign(&db, "workers", async { Ok(10) })
        .await
        .unwrap();
    let retry = RetryPolicy::default();
    // A name that breaks naive quoting: it is bound, never spliced in.
    let b_name = "b'; DROP TABLE blast_deliveries; -- $4 ?";
    let mut a = SqlLedger::new(db.clone(), c.id, retry.clone()).worker("a");
    let mut b = SqlLedger::new(db.clone(), c.id, retry.clone()).worker(b_name);
    let mut nameless = SqlLedger::new(db.clone(), c.id, retry);
    let sent = |id: i64| {
        record(
            id,
            Outcome::Sent {
                reply: reply(250, "2.0.0", "Ok"),
                queue_id: None,
            },
            &format!("u{id}"),
        )
    };
    let deferred = |id: i64| {
        record(
            id,
            Outcome::Deferred(reply(451, "4.3.0", "later")),
            &format!("u{id}"),
        )
    };
    let failed = |id: i64| {
        record(
            id,
            Outcome::Failed(reply(550, "5.1.1", "5.1.1 user unknown")),
            &format!("u{id}"),
        )
    };
    a.record(&[sent(1), deferred(2), failed(3)]).await.unwrap();
    b.record(&[sent(2), failed(1)]).await.unwrap();
    nameless.record(&[sent(4)]).await.unwrap();
    let since = blast::clock::now() - std::time::Duration::from_secs(60);
    ledger::requeue(&db, c.id, &[(3, "u3@Example.com".into())], since)
        .await
        .unwrap();

    let rows: Vec<(i64, String, Option<String>)> = sqlx::query_as(
        "SELECT recipient_id, status, worker FROM blast_deliveries WHERE campaign_id = $1 \
         ORDER BY recipient_id",
    )
    .bind(c.id)
    .fetch_all(db.pool())
    .await
    .unwrap();
    let rows: Vec<(i64, &str, Option<&str>)> = rows
        .iter()
        .map(|(i, s, w)| (*i, s.as_str(), w.as_deref()))
        .collect();
    assert_eq!(
        rows,
        [
            (1, "sent", Some("a")),
            (2, "sent", Some(b_name)),
            (3, "deferred", Some("a")),
            (4, "sent", None),
        ]
    );
    db.close().await;
}

#[tokio::test]
async fn rows_carry_their_worker_sqlite() {
    rows_carry_their_worker(Backend::Sqlite).await;
}

#[tokio::test]
async fn rows_carry_their_worker_postgres() {
    rows_carry_their_worker(Backend::Postgres).await;
}
