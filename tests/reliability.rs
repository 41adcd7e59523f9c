//! Issue 4: leases, crash safety under SIGKILL, retry schedule, suppression,
//! circuit breaker, pause/resume/cancel, MTA outages.

use std::collections::HashMap;
use std::future::pending;
use std::sync::Arc;
use std::time::{Duration, Instant};

use blast::commands::Control;
use blast::progress::Mode;
use blast::sink::{Faults, Sink, SinkConfig};
use blast::Error;

use crate::util::{self, blast, ledger_rows, Backend, World};

async fn scalar(w: &World, sql: &str) -> i64 {
    let db = w.db().await;
    let n: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_string()))
        .fetch_one(db.pool())
        .await
        .unwrap();
    db.close().await;
    n
}

/// Cron overlap: a second process with the same worker name (both default
/// to the host name) exits at once with exit code 0 and a clear message,
/// sending nothing, while the first runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_process_with_the_same_worker_name_exits_at_once() {
    let w = World::new(Backend::Sqlite).await;
    w.seed(400).await;
    let sink = Arc::new(util::slow_sink(Duration::from_millis(5)).await);
    let path = w.campaign("lease", "Hi", "x", None, "");
    let cfg = w.config(&path, Some(&sink), 2);
    let first = util::spawn_send(&cfg);
    util::wait_for(&sink, 20).await;
    let started = Instant::now();
    let out = blast()
        .arg("send")
        .arg(&path)
        .args(["--smtp", &format!("smtp://{}", sink.local_addr())])
        .args(["--progress", "none"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "exit {:?}: {stderr}", out.status);
    assert!(
        stderr.contains("already has a live worker") && stderr.contains("nothing to do"),
        "{stderr}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "it exited at once, not after the campaign"
    );
    // The library says the same with a typed error.
    let err = blast::commands::send(&cfg, Mode::Quiet, pending())
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Busy { .. }), "{err}");
    let s = first.await.unwrap().unwrap();
    assert_eq!(s.sent, 400);
    let got = util::per_recipient(&sink.received());
    assert_eq!(got.len(), 400);
    assert!(
        got.values().all(|&n| n == 1),
        "the second process sent nothing"
    );
}

/// SIGKILL at 20 random moments, then runs until done: nobody is skipped and
/// duplicates stay within the stated window per kill (concurrency + two
/// ledger batches, see docs/reliability.md).
async fn sigkill(backend: Backend) {
    let n: usize = 3000;
    let concurrency = 4;
    let w = World::new(backend).await;
    w.seed(n as i64).await;
    let sink = util::slow_sink(Duration::from_millis(1)).await;
    let path = w.campaign("kill", "Hi {{ first_name }}", "{{ token }}", None, "");
    let smtp = format!("smtp://{}", sink.local_addr());
    let mut seed = std::process::id() as u64 ^ 0x9E37_79B9_7F4A_7C15;
    let mut kills = 0;
    for _ in 0..20 {
        if sink.stats().messages as usize >= n {
            break;
        }
        // xorshift: kill between 30 and 330 ms after the start.
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let after = Duration::from_millis(30 + seed % 300);
        let mut child = blast()
            .arg("send")
            .arg(&path)
            .args([
                "--smtp",
                &smtp,
                "--concurrency",
                &concurrency.to_string(),
                "--progress",
                "none",
            ])
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        tokio::time::sleep(after).await;
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        kills += 1;
    }
    // Then run to the end; the dead holders' leases are taken over at once.
    let out = tokio::task::spawn_blocking({
        let (path, smtp) = (path.clone(), smtp.clone());
        move || {
            blast()
                .arg("send")
                .arg(&path)
                .args(["--smtp", &smtp, "--progress", "none"])
                .output()
                .unwrap()
        }
    })
    .await
    .unwrap();
    util::assert_exit(&out, 0);

    let count = util::per_recipient(&sink.received());
    assert_eq!(
        count.len(),
        n,
        "every recipient received at least one message"
    );
    let duplicates: usize = count.values().map(|c| c - 1).sum();
    let window = concurrency + 2 * blast::ledger::FLUSH_ROWS;
    assert!(
        duplicates <= kills * window,
        "{duplicates} duplicates after {kills} kills (window {window})"
    );
    let db = w.db().await;
    let rows = ledger_rows(&db, "kill").await;
    assert_eq!(rows.len(), n);
    assert!(rows.iter().all(|r| r.1 == "sent"));
    eprintln!("sigkill {backend:?}: {kills} kills, {duplicates} duplicates");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_random_points_sqlite() {
    sigkill(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_random_points_postgres() {
    sigkill(Backend::Postgres).await;
}

/// 4xx: deferred on a schedule, each attempt recorded, given up after the
/// limit. 5.1.1: failed and suppressed; another campaign skips the address.
#[tokio::test]
async fn retry_schedule_attempts_and_suppression() {
    let w = World::new(Backend::Sqlite).await;
    w.seed(10).await;
    let mut faults = Faults::default();
    faults.rcpt_replies.insert(
        "user4@example.com".into(),
        (451, "4.3.0".into(), "Try again later".into()),
    );
    faults.rcpt_replies.insert(
        "user5@example.com".into(),
        (550, "5.1.1".into(), "No such user".into()),
    );
    let sink = util::sink(faults).await;
    let path = w.campaign(
        "sched",
        "Hi",
        "x",
        None,
        "[delivery]\nretry = [\"10m\", \"1h\"]\ngive_up_after = \"2d\"\n",
    );
    let cfg = w.config(&path, Some(&sink), 2);
    let s = blast::commands::send(&cfg, Mode::Quiet, pending())
        .await
        .unwrap();
    assert_eq!((s.sent, s.failed, s.deferred), (8, 1, 1));
    let next = scalar(&w, "SELECT COUNT(*) FROM blast_deliveries WHERE recipient_id = 4 AND next_attempt_at > first_attempt_at").await;
    assert_eq!(next, 1, "the deferral has a next attempt after the first");

    // Not due yet: an immediate re-run leaves it alone.
    let s = blast::commands::send(&cfg, Mode::Quiet, pending())
        .await
        .unwrap();
    assert_eq!((s.sent, s.failed, s.deferred), (0, 0, 0));

    // Due now: tried again, deferred again, two attempts recorded.
    w.exec("UPDATE blast_deliveries SET next_attempt_at = '2000-01-01T00:00:00.000Z' WHERE recipient_id = 4").await;
    let s = blast::commands::send(&cfg, Mode::Quiet, pending())
        .await
        .unwrap();
    assert_eq!(s.deferred, 1);
    assert_eq!(
        scalar(
            &w,
            "SELECT COUNT(*) FROM blast_attempts WHERE recipient_id = 4"
        )
        .await,
        2
    );
    assert_eq!(
        scalar(
            &w,
            "SELECT attempts FROM blast_deliveries WHERE recipient_id = 4"
        )
        .await,
        2
    );

    // First deferred three days ago: this attempt gives up.
    w.exec("UPDATE blast_deliveries SET next_attempt_at = NULL, first_attempt_at = '2000-01-01T00:00:00.000Z' WHERE recipient_id = 4").await;
    let s = blast::commands::send(&cfg, Mode::Quiet, pending())
        .await
        .unwrap();
    assert_eq!((s.deferred, s.failed), (1, 0), "the MTA said 4xx once more");
    let db = w.db().await;
    let rows = ledger_rows(&db, "sched").await;
    let r4 = rows.iter().find(|r| r.0 == 4).unwrap();
    assert_eq!(r4.1, "failed");
    assert!(
        r4.4.as_deref()
            .unwrap()
            .starts_with("gave up after 3 deferred attempts over 2d"),
        "{r4:?}"
    );

    // The hard bounce suppressed user5; a new campaign skips it.
    assert_eq!(scalar(&w, "SELECT COUNT(*) FROM blast_suppressions WHERE address = 'user5@example.com' AND source LIKE 'smtp:campaign=%'").await, 1);
    let before = sink.stats().recipients + sink.stats().rejected_rcpts;
    let path2 = w.campaign("sched2", "Hi", "x", None, "");
    let cfg2 = w.config(&path2, Some(&sink), 2);
    let s = blast::commands::send(&cfg2, Mode::Quiet, pending())
        .await
        .unwrap();
    assert_eq!((s.sent, s.suppressed), (8, 1), "{s:?}");
    assert_eq!(
        sink.stats().recipients + sink.stats().rejected_rcpts,
        before + 9,
        "no RCPT for the suppressed address"
    );
    let rows = ledger_rows(&db, "sched2").await;
    assert_eq!(rows.iter().find(|r| r.0 == 5).unwrap().1, "suppressed");
}

/// A relay that wants AUTH: the campaign pauses at once with the reason,
/// nobody is marked failed, and `resume` against a working relay finishes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn breaker_pauses_on_relay_refusal_and_resume_finishes() {
    let w = World::new(Backend::Sqlite).await;
    w.seed(200).await;
    let faults = Faults {
        mail_reply: Some((530, "5.7.0".into(), "Authentication required".into())),
        ..Default::default()
    };
    let bad = util::sink(faults).await;
    let path = w.campaign("breaker", "Hi", "x", None, "");
    let cfg = w.config(&path, Some(&bad), 4);
    let s = blast::commands::send(&cfg, Mode::Quiet, pending())
        .await
        .unwrap();
    assert!(
        s.breaker
            .as_deref()
            .unwrap_or_default()
            .contains("Authentication required"),
        "{s:?}"
    );
    assert_eq!(
        s.failed, 0,
        "relay refusals are not the recipients' failures"
    );
    assert!(s.sent == 0 && s.deferred <= 8, "stopped at once: {s:?}");
    let db = w.db().await;
    let status = blast::commands::status(&cfg).await.unwrap();
    assert_eq!(status.state, "paused");
    assert_eq!(
        scalar(
            &w,
            "SELECT COUNT(*) FROM blast_deliveries WHERE status = 'failed'"
        )
        .await,
        0
    );

    // A paused campaign is not sent until resumed.
    let good = util::sink(Faults::default()).await;
    let cfg = w.config(&path, Some(&good), 4);
    let err = blast::commands::send(&cfg, Mode::Quiet, pending())
        .await
        .unwrap_err();
    assert!(matches!(err, Error::NotSendable { .. }), "{err}");
    blast::commands::control(&w.url, "breaker", Control::Resume, None)
        .await
        .unwrap();
    let s = blast::commands::send(&cfg, Mode::Quiet, pending())
        .await
        .unwrap();
    assert_eq!(s.sent, 200, "{s:?}");
    assert_eq!(good.received().len(), 200);
    assert_eq!(
        ledger_rows(&db, "breaker")
            .await
            .iter()
            .filter(|r| r.1 == "sent")
            .count(),
        200
    );
}

/// Refusals in a row across several domains trip the breaker; the streak is
/// requeued, not burnt, and no address is suppressed for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn breaker_trips_on_a_streak_of_refusals() {
    let w = World::new(Backend::Sqlite).await;
    w.seed(300).await;
    w.exec("UPDATE subscribers SET email = 'user' || id || '@d' || (id % 5) || '.example'")
        .await;
    let faults = Faults {
        rcpt_contains: vec![("@".into(), 550, "5.1.1".into(), "Recipient rejected".into())],
        ..Default::default()
    };
    let sink = util::sink(faults).await;
    let path = w.campaign(
        "streak",
        "Hi",
        "x",
        None,
        "[delivery]\nbreaker_threshold = 10\n",
    );
    let cfg = w.config(&path, Some(&sink), 2);
    let s = blast::commands::send(&cfg, Mode::Quiet, pending())
        .await
        .unwrap();
    assert!(
        s.breaker
            .as_deref()
            .unwrap_or_default()
            .contains("in a row across 5 domains"),
        "{s:?}"
    );
    assert!(s.failed < 30, "stopped early: {s:?}");
    assert_eq!(
        scalar(
            &w,
            "SELECT COUNT(*) FROM blast_deliveries WHERE status = 'failed'"
        )
        .await,
        0,
        "streak requeued"
    );
    assert_eq!(
        scalar(&w, "SELECT COUNT(*) FROM blast_suppressions").await,
        0,
        "no suppression from the streak"
    );
    assert_eq!(blast::commands::status(&cfg).await.unwrap().state, "paused");
}

/// Issue 13: a relay that wrongly refuses 4 addresses in 5 as unknown (a
/// 250 between, so never a streak) trips the breaker on the rate; the
/// refused recipients are requeued and none of them stays suppressed.
/// An unsubscribe of one of them, from before the run, stays.
async fn breaker_trips_on_a_rate_of_unknown_users(backend: Backend) {
    let w = World::new(backend).await;
    w.seed(400).await;
    w.exec(
        "UPDATE subscribers SET email = 'gone' || id || '@d' || (id % 3) || '.example' \
         WHERE id % 5 <> 0",
    )
    .await;
    let db = w.db().await;
    blast::suppress::add(&db, "gone7@d1.example", "unsubscribe", "https:campaign=1")
        .await
        .unwrap();
    let faults = Faults {
        rcpt_contains: vec![("gone".into(), 550, "5.1.1".into(), "User unknown".into())],
        ..Default::default()
    };
    let sink = util::sink(faults).await;
    let path = w.campaign("rate", "Hi", "x", None, "");
    let cfg = w.config(&path, Some(&sink), 2);
    let s = blast::commands::send(&cfg, Mode::Quiet, pending())
        .await
        .unwrap();
    let reason = s.breaker.clone().unwrap_or_default();
    assert!(reason.contains("refused the address as unknown"), "{s:?}");
    assert!(s.failed >= 40 && s.failed < 200, "stopped early: {s:?}");
    let count = |sql: &'static str| scalar(&w, sql);
    assert_eq!(
        count("SELECT COUNT(*) FROM blast_deliveries WHERE status = 'failed'").await,
        0,
        "every refusal requeued"
    );
    assert_eq!(
        count("SELECT COUNT(*) FROM blast_deliveries WHERE status = 'deferred'").await,
        s.failed as i64,
    );
    let left: Vec<(String, String)> =
        sqlx::query_as("SELECT address, source FROM blast_suppressions")
            .fetch_all(db.pool())
            .await
            .unwrap();
    assert_eq!(
        left,
        [(
            "gone7@d1.example".to_string(),
            "https:campaign=1".to_string()
        )]
    );
    assert_eq!(blast::commands::status(&cfg).await.unwrap().state, "paused");
    db.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue13_breaker_trips_on_a_rate_of_unknown_users_sqlite() {
    breaker_trips_on_a_rate_of_unknown_users(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue13_breaker_trips_on_a_rate_of_unknown_users_postgres() {
    breaker_trips_on_a_rate_of_unknown_users(Backend::Postgres).await;
}

/// `blast pause` from another process stops a running sender within about a
/// second; `blast resume` continues; everyone gets exactly one message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_and_resume_across_processes() {
    let w = World::new(Backend::Sqlite).await;
    w.seed(3000).await;
    let sink = Arc::new(util::slow_sink(Duration::from_millis(2)).await);
    let path = w.campaign("pause", "Hi", "x", None, "");
    let cfg = w.config(&path, Some(&sink), 2);
    let run = util::spawn_send(&cfg);
    util::wait_for(&sink, 100).await;
    let out = blast().arg("pause").arg(&path).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let asked = Instant::now();
    let first = run.await.unwrap().unwrap();
    assert!(
        asked.elapsed() < Duration::from_millis(2500),
        "stopped within a second or so: {:?}",
        asked.elapsed()
    );
    assert!(first.interrupted && first.sent < 3000, "{first:?}");
    assert_eq!(blast::commands::status(&cfg).await.unwrap().state, "paused");

    // By name: clears the pause only; the next send continues.
    let out = blast()
        .args(["resume", "pause", "--database", &w.url])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let s = blast::commands::send(&cfg, Mode::Quiet, pending())
        .await
        .unwrap();
    assert_eq!(first.sent + s.sent, 3000, "{first:?} {s:?}");
    let count = util::per_recipient(&sink.received());
    assert_eq!(count.len(), 3000);
    assert!(count.values().all(|&c| c == 1));
}

/// `blast cancel` stops the sender and the campaign is never sent again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_is_final() {
    let w = World::new(Backend::Sqlite).await;
    w.seed(2000).await;
    let sink = Arc::new(util::slow_sink(Duration::from_millis(2)).await);
    let path = w.campaign("cancel", "Hi", "x", None, "");
    let cfg = w.config(&path, Some(&sink), 2);
    let run = util::spawn_send(&cfg);
    util::wait_for(&sink, 50).await;
    blast::commands::control(&w.url, "cancel", Control::Cancel, Some("wrong list"))
        .await
        .unwrap();
    let s = run.await.unwrap().unwrap();
    assert!(s.interrupted && s.sent < 2000);
    let err = blast::commands::send(&cfg, Mode::Quiet, pending())
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("cancelled") && err.to_string().contains("wrong list"),
        "{err}"
    );
    assert!(
        blast::commands::control(&w.url, "cancel", Control::Resume, None)
            .await
            .is_err()
    );
}

/// The MTA goes away mid-campaign and comes back: the campaign stalls,
/// reconnects with backoff, and finishes with everyone delivered once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mta_outage_stalls_then_finishes() {
    let w = World::new(Backend::Sqlite).await;
    w.seed(1500).await;
    let config = SinkConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        keep_messages: true,
        faults: Faults {
            latency: Some(Duration::from_millis(1)),
            ..Default::default()
        },
        ..Default::default()
    };
    let first = Sink::start(config.clone()).await.unwrap();
    let addr = first.local_addr();
    let path = w.campaign("outage", "Hi", "x", None, "");
    let cfg = w.config(&path, Some(&first), 4);
    let run = util::spawn_send(&cfg);
    util::wait_for(&first, 300).await;
    let mut seen: Vec<String> = Vec::new();
    let before = first.shutdown().await;
    // Down for three seconds (the backoff doubles from 0.1 s: several failed
    // reconnects), then back on the same port.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let second = Sink::start(SinkConfig {
        listen: addr,
        ..config
    })
    .await
    .unwrap();
    let s = run.await.unwrap().unwrap();
    assert!(s.retries >= 3, "the outage was seen: {s:?}");
    assert_eq!(s.sent, 1500, "{s:?}");
    seen.extend(before.iter().map(|r| r.rcpt_to[0].clone()));
    seen.extend(second.received().iter().map(|r| r.rcpt_to[0].clone()));
    let mut count: HashMap<String, usize> = HashMap::new();
    for r in seen {
        *count.entry(r).or_default() += 1;
    }
    assert_eq!(count.len(), 1500, "everyone delivered");
    assert!(
        count.values().all(|&c| c == 1),
        "nobody twice (no connection died after the data)"
    );
}

/// A relay that greets only after `delay`: every connection to it goes to
/// `sink` once the delay has passed.
async fn slow_greeting(sink: &Sink, delay: Duration) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let target = sink.local_addr();
    tokio::spawn(async move {
        while let Ok((mut client, _)) = listener.accept().await {
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                if let Ok(mut server) = tokio::net::TcpStream::connect(target).await {
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                }
            });
        }
    });
    addr
}

/// Issue 12: a cancel given while `blast send` probes its relays is not
/// overwritten by the start of the run: nothing is sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_during_the_relay_probe_sends_nothing() {
    let w = World::new(Backend::Sqlite).await;
    w.seed(100).await;
    let sink = util::sink(Faults::default()).await;
    let relay = slow_greeting(&sink, Duration::from_secs(2)).await;
    let path = w.campaign("probe", "Hi", "x", None, "");
    let overrides = blast::config::Overrides {
        smtp: vec![format!("smtp://{relay}")],
        ..Default::default()
    };
    let cfg = blast::config::Config::load(&path, &overrides).unwrap();
    let run = util::spawn_send(&cfg);
    // The campaign row exists once the send has opened it (before the probe).
    util::wait_until("the campaign row", Duration::from_millis(10), || async {
        match blast::commands::control(&w.url, "probe", Control::Cancel, Some("oops")).await {
            Ok(row) => Ok(row),
            Err(e) => Err(e.to_string()),
        }
    })
    .await;
    let err = run.await.unwrap().unwrap_err();
    assert!(err.to_string().contains("cancelled"), "{err}");
    assert_eq!(sink.stats().messages, 0, "nothing sent after the cancel");
    assert_eq!(scalar(&w, "SELECT COUNT(*) FROM blast_deliveries").await, 0);
}
