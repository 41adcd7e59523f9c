use std::future::pending;
use std::time::Duration;

use blast::progress::Mode;
use blast::sink::Faults;

use crate::util::{self, ledger_rows, Backend, World};

/// A run stopped mid-campaign (the operator's SIGINT) and run again sends to
/// everyone exactly once: nothing skipped, nothing doubled.
async fn stop_then_resume(backend: Backend) {
    let n = 3000;
    let w = World::new(backend).await;
    w.seed(n).await;
    let sink = std::sync::Arc::new(util::slow_sink(Duration::from_millis(1)).await);
    let path = w.campaign("resume", "Hi {{ first_name }}", "{{ token }}", None, "");
    let cfg = w.config(&path, Some(&sink), 4);

    // Stop once the sink has taken about a third of the audience.
    let watch = sink.clone();
    let stop = async move { util::wait_for(&watch, (n / 3) as u64).await };
    let first = blast::commands::send(&cfg, Mode::Quiet, stop)
        .await
        .unwrap();
    assert!(first.interrupted, "{first:?}");
    assert!(first.sent < n as u64, "{first:?}");
    let after_first = sink.received().len();
    assert_eq!(
        after_first as u64, first.sent,
        "every accepted message is recorded at stop"
    );

    let second = blast::commands::send(&cfg, Mode::Quiet, pending())
        .await
        .unwrap();
    assert!(!second.interrupted);
    assert_eq!(first.sent + second.sent, n as u64, "{first:?} {second:?}");

    let count = util::per_recipient(&sink.received());
    assert_eq!(count.len(), n as usize, "nobody skipped");
    assert!(count.values().all(|&c| c == 1), "nobody doubled");
    let db = w.db().await;
    assert_eq!(ledger_rows(&db, "resume").await.len(), n as usize);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_then_resume_sqlite() {
    stop_then_resume(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_then_resume_postgres() {
    stop_then_resume(Backend::Postgres).await;
}

/// `--limit` sends the first N; the next run continues with the rest.
#[tokio::test]
async fn limit_then_continue() {
    let w = World::new(Backend::Sqlite).await;
    w.seed(50).await;
    let sink = util::sink(Faults::default()).await;
    let path = w.campaign("limit", "Hi", "x", None, "");
    let mut cfg = w.config(&path, Some(&sink), 3);
    cfg.limit = Some(20);
    let first = blast::commands::send(&cfg, Mode::Quiet, pending())
        .await
        .unwrap();
    assert_eq!(first.sent, 20);
    let mut ids: Vec<String> = sink
        .received()
        .iter()
        .map(|r| r.rcpt_to[0].clone())
        .collect();
    ids.sort();
    let mut expected: Vec<String> = (1..=20).map(|i| format!("user{i}@example.com")).collect();
    expected.sort();
    assert_eq!(ids, expected, "the first N by id");
    cfg.limit = None;
    let second = blast::commands::send(&cfg, Mode::Quiet, pending())
        .await
        .unwrap();
    assert_eq!(second.sent, 30);
    assert_eq!(sink.received().len(), 50);
}

/// Recipients added after a campaign started are not part of it.
#[tokio::test]
async fn audience_is_fixed_at_first_start() {
    let w = World::new(Backend::Sqlite).await;
    w.seed(10).await;
    let sink = util::sink(Faults::default()).await;
    let path = w.campaign("fixed", "Hi", "x", None, "");
    let mut cfg = w.config(&path, Some(&sink), 1);
    cfg.limit = Some(5);
    blast::commands::send(&cfg, Mode::Quiet, pending())
        .await
        .unwrap();
    w.exec("INSERT INTO subscribers (id, email, attributes, created_at) VALUES (11, 'late@example.com', '{}', 'x')").await;
    cfg.limit = None;
    let s = blast::commands::send(&cfg, Mode::Quiet, pending())
        .await
        .unwrap();
    assert_eq!(s.sent, 5);
    assert!(!sink
        .received()
        .iter()
        .any(|r| r.rcpt_to[0] == "late@example.com"));
}

/// 5xx is final, 4xx is retried by the next run once due; the reply is kept.
#[tokio::test]
async fn refusals_are_recorded_and_deferred_are_retried() {
    let w = World::new(Backend::Sqlite).await;
    w.seed(10).await;
    let mut faults = Faults::default();
    faults.rcpt_replies.insert(
        "user3@example.com".into(),
        (550, "5.1.1".into(), "No such user".into()),
    );
    faults.rcpt_replies.insert(
        "user4@example.com".into(),
        (451, "4.3.0".into(), "Try again later".into()),
    );
    let sink = util::sink(faults).await;
    // Retry deferred recipients at once (the default waits 5 minutes).
    let path = w.campaign("refuse", "Hi", "x", None, "[delivery]\nretry = [\"0s\"]\n");
    let cfg = w.config(&path, Some(&sink), 2);
    let s = blast::commands::send(&cfg, Mode::Quiet, pending())
        .await
        .unwrap();
    assert_eq!((s.sent, s.failed, s.deferred), (8, 1, 1));
    let db = w.db().await;
    let rows = ledger_rows(&db, "refuse").await;
    let r3 = rows.iter().find(|r| r.0 == 3).unwrap();
    assert_eq!(
        (r3.1.as_str(), r3.2, r3.3.as_deref()),
        ("failed", Some(550), Some("5.1.1"))
    );
    assert!(r3.4.as_deref().unwrap().contains("No such user"));
    let r4 = rows.iter().find(|r| r.0 == 4).unwrap();
    assert_eq!((r4.1.as_str(), r4.2), ("deferred", Some(451)));

    // The next run offers only the deferred recipient again.
    let before = sink.stats().recipients + sink.stats().rejected_rcpts;
    let s2 = blast::commands::send(&cfg, Mode::Quiet, pending())
        .await
        .unwrap();
    assert_eq!((s2.sent, s2.failed, s2.deferred), (0, 0, 1));
    assert_eq!(
        sink.stats().recipients + sink.stats().rejected_rcpts,
        before + 1
    );
}

/// A connection dropped mid-campaign is reconnected and the message retried;
/// everyone is delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_connections_are_retried() {
    let w = World::new(Backend::Sqlite).await;
    w.seed(200).await;
    let sink = util::sink(Faults {
        drop_after: Some(25),
        ..Default::default()
    })
    .await;
    let path = w.campaign("drops", "Hi", "x", None, "");
    let cfg = w.config(&path, Some(&sink), 2);
    let s = blast::commands::send(&cfg, Mode::Quiet, pending())
        .await
        .unwrap();
    assert_eq!(s.sent, 200, "{s:?}");
    assert!(s.retries > 0, "{s:?}");
    let mut rcpts: Vec<String> = sink
        .received()
        .iter()
        .map(|r| r.rcpt_to[0].clone())
        .collect();
    let n = rcpts.len();
    rcpts.sort();
    rcpts.dedup();
    assert_eq!(rcpts.len(), 200);
    assert_eq!(n, 200, "the sink accepted nobody twice");
    // Each drop came after the message data: the retried message is counted
    // and noted in the ledger as possibly duplicated (once, even when the
    // same message was dropped twice).
    assert!(
        s.possibly_duplicated >= 1 && s.possibly_duplicated <= s.retries,
        "{s:?}"
    );
    let db = w.db().await;
    let noted = util::ledger_rows(&db, "drops")
        .await
        .into_iter()
        .filter(|r| {
            r.4.as_deref()
                .is_some_and(|t| t.contains("possibly duplicated"))
        })
        .count();
    assert_eq!(noted as u64, s.possibly_duplicated);
}

async fn scalar(w: &World, sql: &str) -> Option<i64> {
    let db = w.db().await;
    let v: Option<i64> = sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_string()))
        .fetch_one(db.pool())
        .await
        .unwrap();
    db.close().await;
    v
}

/// A new pass starts after the prefix of ids that earlier passes finished
/// for good (every recipient final), so a resume does not step over
/// millions of finished rows; a recipient still to retry stops the prefix
/// at its claim, and is sent by the next pass.
async fn new_pass_skips_the_finished_prefix(backend: Backend) {
    let w = World::new(backend).await;
    w.seed(3000).await;
    let path = w.campaign("prefix", "Hi", "x", None, "[delivery]\nclaim_size = 500\n");
    let later = Faults {
        rcpt_contains: vec![("user1700@".into(), 451, "4.3.0".into(), "try later".into())],
        ..Default::default()
    };
    let sink = util::sink(later).await;
    let s = blast::commands::send(&w.config(&path, Some(&sink), 2), Mode::Quiet, pending())
        .await
        .unwrap();
    assert_eq!((s.sent, s.deferred), (2999, 1));
    // Its retry is due now.
    w.exec("UPDATE blast_deliveries SET next_attempt_at = '2000-01-01T00:00:00.000Z' WHERE status = 'deferred'")
        .await;
    let ok = util::sink(Faults::default()).await;
    let s = blast::commands::send(&w.config(&path, Some(&ok), 2), Mode::Quiet, pending())
        .await
        .unwrap();
    assert_eq!(s.sent, 1);
    assert_eq!(ok.received()[0].rcpt_to, ["user1700@example.com"]);
    // The first pass finished ids up to 1500 for good; 1501..=2000 held
    // the deferred recipient, so the second pass claimed from 1501 on.
    assert_eq!(
        scalar(&w, "SELECT final_to FROM blast_campaigns").await,
        Some(1500)
    );
    assert_eq!(
        scalar(&w, "SELECT MIN(first_id) FROM blast_claims").await,
        Some(1501)
    );
    // Now everything is final: a third pass claims nothing and sends nothing.
    let s = blast::commands::send(&w.config(&path, Some(&ok), 2), Mode::Quiet, pending())
        .await
        .unwrap();
    assert_eq!((s.sent, ok.received().len()), (0, 1));
    assert_eq!(
        scalar(&w, "SELECT final_to FROM blast_campaigns").await,
        Some(3000)
    );
    assert_eq!(
        scalar(&w, "SELECT COUNT(*) FROM blast_claims").await,
        Some(0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_pass_skips_the_finished_prefix_sqlite() {
    new_pass_skips_the_finished_prefix(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_pass_skips_the_finished_prefix_postgres() {
    new_pass_skips_the_finished_prefix(Backend::Postgres).await;
}
