//! `blast reconcile`: Postfix's log into the ledger's `mta_*` columns on both
//! backends; reading twice changes nothing; `--follow` across rotation,
//! stopped by SIGTERM; bad lines counted, never fatal. The run through a
//! real Postfix is in `mta.rs`.

use std::io::Write;
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::Duration;

use blast::db::Db;
use blast::reconcile::{Input, Summary};
use sqlx::Row;
use tokio_util::sync::CancellationToken;

use crate::util::{self, wait_until, Backend, World};

/// The ledger rows: (id, email, queue id). Row 2's domain is upper-case in
/// the ledger and lower-case in the log; row 8 never appears in the log.
const ROWS: &[(i64, &str, &str)] = &[
    (1, "a1@example.com", "4jhj0k5S8Bz2NP1"),
    (2, "b2@EXAMPLE.com", "4jhj0k5S8Bz2NP2"),
    (3, "c3@example.com", "4jhj0k5S8Bz2NP3"),
    (4, "d4@example.com", "4jhj0k5S8Bz2NP4"),
    (5, "e5@example.com", "4jhj0k5S8Bz2NP5"),
    (6, "f6@example.com", "A1B2C3D4E6"),
    (7, "g7@example.com", "A1B2C3D4E7"),
    (8, "h8@example.com", "A1B2C3D4E8"),
];

/// A log in both timestamp forms (the `mta_at` checked come from RFC 3339
/// ones: a classic timestamp's year is the clock's) and two instance names: 1 delivered, 2 a
/// hard bounce, 3 a soft one, 4 deferred then delivered, 5 deferred twice,
/// 6 deferred then expired, 7 delivered then (out of order) deferred;
/// plus other mail, other programs and 3 malformed lines.
const LOG: &str = "\
Dec 05 21:58:14 vm postfix-blast/smtpd[1]: 4jhj0k5S8Bz2NP1: client=unknown[127.0.0.1]
Dec 05 21:58:14 vm postfix-blast/qmgr[2]: 4jhj0k5S8Bz2NP1: from=<news@example.com>, size=308, nrcpt=1 (queue active)
2026-12-05T21:58:14+00:00 vm postfix-blast/smtp[3]: 4jhj0k5S8Bz2NP1: to=<a1@example.com>, relay=mx.example.com[192.0.2.1]:25, delay=0.04, delays=0.01/0.02/0.01/0, dsn=2.0.0, status=sent (250 2.0.0 Ok: queued as 0000000001)
Dec 05 21:58:14 vm postfix-blast/qmgr[2]: 4jhj0k5S8Bz2NP1: removed
Dec 05 21:58:15 vm postfix-blast/smtp[3]: 4jhj0k5S8Bz2NP2: to=<b2@example.com>, relay=mx.example.com[192.0.2.1]:25, delay=0.03, delays=0/0.02/0.01/0, dsn=5.1.1, status=bounced (host mx.example.com[192.0.2.1] said: 550 5.1.1 <b2@example.com>: Recipient address rejected: User unknown (in reply to RCPT TO command))
Dec 05 21:58:15 vm postfix-blast/bounce[4]: 4jhj0k5S8Bz2NP2: sender non-delivery notification: 4jhj0k5hmJz2NPD
Dec 05 21:58:15 vm postfix-blast/qmgr[2]: 4jhj0k5S8Bz2NP2: removed
2026-12-05T21:58:16.000001+00:00 vm postfix-blast/smtp[3]: 4jhj0k5S8Bz2NP3: to=<c3@example.com>, relay=mx.example.com[192.0.2.1]:25, delay=1.5, delays=0/0/0/1.5, dsn=5.2.2, status=bounced (host mx.example.com[192.0.2.1] said: 552 5.2.2 Mailbox full (in reply to end of DATA command))
2026-12-05T21:58:16.5+00:00 vm postfix-blast/smtp[3]: 4jhj0k5S8Bz2NP4: to=<d4@example.com>, relay=mx.example.com[192.0.2.1]:25, delay=0.2, delays=0/0/0/0.2, dsn=4.3.0, status=deferred (host mx.example.com[192.0.2.1] said: 451 4.3.0 Try again later (in reply to RCPT TO command))
Dec  5 21:58:17 vm postfix-blast/smtp[3]: 4jhj0k5S8Bz2NP5: to=<e5@example.com>, relay=none, delay=30, delays=0/0/30/0, dsn=4.4.1, status=deferred (connect to mx.example.com[192.0.2.1]:25: Connection refused)
Dec  5 21:58:17 vm postfix-blast/smtp[3]: A1B2C3D4E6: to=<f6@example.com>, relay=none, delay=30, delays=0/0/30/0, dsn=4.4.1, status=deferred (connect to mx.example.com[192.0.2.1]:25: Connection timed out)
Dec  5 21:58:18 vm postfix-blast/smtp[3]: A1B2C3D4E7: to=<g7@example.com>, relay=mx.example.com[192.0.2.1]:25, delay=0.5, delays=0/0/0/0.5, dsn=2.0.0, status=sent (250 2.0.0 Ok (with (nested) parentheses))
this line is garbage
Dec  5 21:58:19 vm postfix-blast/smtp[3]: 4jhj0k5S8Bz2NP4: to=<d4@example.com>, relay=mx.example.com[192.0.2.1]:25, delay=300, delays=0/0/0/0.1, dsn=2.0.0, status=sent (250 2.0.0 Ok: queued as 0000000009)
Dec  5 21:58:19 vm postfix-blast/qmgr[2]: 4jhj0k5S8Bz2NP4: removed
Dec  5 21:58:20 vm postfix-other/smtp[5]: ZZZZZZ99999: to=<someone@else.example>, relay=mx.else.example[192.0.2.9]:25, delay=1, delays=0/0/0/1, dsn=2.0.0, status=sent (250 ok)
Dec  5 21:58:20 vm sshd[77]: Accepted publickey for root
Dec  5 21:58:21 vm postfix-blast/smtp[3]: 4jhj0k5S8Bz2NP5: to=<e5@example.com>, relay=mx.example.com[192.0.2.1]:25, delay=90, delays=0/0/0/1, dsn=4.2.0, status=deferred (host mx.example.com[192.0.2.1] said: 421 4.2.0 Greylisted (in reply to RCPT TO command))
Dec  5 21:58:21 vm postfix-blast/smtp[3]: A1B2C3D4E7: to=<g7@example.com>, relay=mx.example.com[192.0.2.1]:25, delay=1, delays=0/0/0/1, dsn=4.3.0, status=deferred (late and out of order)
Dec  5 21:58:21 vm postfix-blast/smtp[3]: A1B2C3D4E7: to=<other@example.com>, relay=mx.example.com[192.0.2.1]:25, delay=1, delays=0/0/0/1, dsn=2.0.0, status=sent (250 ok)
Dec  5 21:58:22 vm postfix-blast/smtp[3]: 4jhj0k5S8Bz2NP5: to=<e5@exa
Dec 45 21:58:22 vm postfix-blast/qmgr[2]: A1B2C3D4E6: removed
2026-12-06T21:58:22Z vm postfix-blast/qmgr[2]: A1B2C3D4E6: from=<news@example.com>, status=expired, returned to sender
Dec  6 21:58:22 vm postfix-blast/qmgr[2]: A1B2C3D4E6: removed
";

/// Creates campaign `rc` with [`ROWS`] as sent rows carrying their queue ids.
async fn ledger(w: &World) -> Db {
    let db = w.db().await;
    let c = blast::ledger::open_campaign(&db, "rc", async { Ok(8) })
        .await
        .unwrap();
    for (id, email, qid) in ROWS {
        sqlx::query(
            "INSERT INTO blast_deliveries (campaign_id, recipient_id, email, status, smtp_code, \
             reply, queue_id, updated_at) VALUES ($1, $2, $3, 'sent', 250, $4, $5, $6)",
        )
        .bind(c.id)
        .bind(id)
        .bind(email)
        .bind(format!("250 2.0.0 Ok: queued as {qid}"))
        .bind(qid)
        .bind("2026-12-05T21:58:14.000Z")
        .execute(db.pool())
        .await
        .unwrap();
    }
    db
}

/// One row: (id, status, mta_status, mta_dsn, mta_reply, mta_relay, mta_delay_secs, mta_at).
type MtaRow = (
    i64,
    String,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<f64>,
    Option<String>,
);

/// Every ledger row's status and `mta_*` columns, by recipient id.
async fn mta_rows(db: &Db) -> Vec<MtaRow> {
    let rows = sqlx::query(
        "SELECT recipient_id, status, mta_status, mta_dsn, mta_reply, mta_relay, \
         mta_delay_secs, mta_at FROM blast_deliveries ORDER BY recipient_id",
    )
    .fetch_all(db.pool())
    .await
    .unwrap();
    rows.iter()
        .map(|r| {
            (
                r.get(0),
                r.get(1),
                r.get(2),
                r.get(3),
                r.get(4),
                r.get(5),
                r.get(6),
                r.get(7),
            )
        })
        .collect()
}

/// The suppression list: (address, reason, source).
async fn suppressions(db: &Db) -> Vec<(String, String, String)> {
    sqlx::query("SELECT address, reason, source FROM blast_suppressions ORDER BY address")
        .fetch_all(db.pool())
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect()
}

/// `blast reconcile` of `path` to its end, through the library.
async fn reconcile(db: &Db, path: &Path) -> Summary {
    blast::reconcile::run(
        db.clone(),
        Input::File(path.to_path_buf()),
        false,
        CancellationToken::new(),
        |_| {},
    )
    .await
    .unwrap()
}

/// What [`LOG`] must leave in the ledger.
fn check_reconciled(rows: &[MtaRow]) {
    let status: Vec<(i64, &str, Option<&str>)> = rows
        .iter()
        .map(|r| (r.0, r.1.as_str(), r.2.as_deref()))
        .collect();
    assert_eq!(
        status,
        [
            (1, "sent", Some("delivered")),
            (2, "sent", Some("bounced")),
            (3, "sent", Some("bounced")),
            (4, "sent", Some("delivered")),
            (5, "sent", Some("deferred")),
            (6, "sent", Some("expired")),
            (7, "sent", Some("delivered")),
            (8, "sent", None),
        ],
        "{rows:#?}"
    );
    let r = &rows[0];
    assert_eq!(r.3.as_deref(), Some("2.0.0"));
    assert_eq!(r.4.as_deref(), Some("250 2.0.0 Ok: queued as 0000000001"));
    assert_eq!(r.5.as_deref(), Some("mx.example.com[192.0.2.1]:25"));
    assert_eq!(r.6, Some(0.04));
    assert_eq!(r.7.as_deref(), Some("2026-12-05T21:58:14.000Z"));
    assert_eq!(rows[1].3.as_deref(), Some("5.1.1"));
    assert!(rows[1]
        .4
        .as_deref()
        .unwrap()
        .contains("User unknown (in reply to RCPT TO command"));
    // The later delivery replaced the deferral.
    assert_eq!(
        rows[3].4.as_deref(),
        Some("250 2.0.0 Ok: queued as 0000000009")
    );
    assert_eq!(rows[3].6, Some(300.0));
    // Still queued: the last reason.
    assert_eq!(rows[4].3.as_deref(), Some("4.2.0"));
    assert!(rows[4].4.as_deref().unwrap().contains("Greylisted"));
    // Expired: when, and the last deferral's reason.
    assert_eq!(rows[5].7.as_deref(), Some("2026-12-06T21:58:22.000Z"));
    assert_eq!(
        rows[5].4.as_deref(),
        Some("connect to mx.example.com[192.0.2.1]:25: Connection timed out")
    );
    // Nested parentheses kept; the late deferral did not replace the delivery.
    assert_eq!(
        rows[6].4.as_deref(),
        Some("250 2.0.0 Ok (with (nested) parentheses)")
    );
    assert_eq!(rows[6].3.as_deref(), Some("2.0.0"));
    assert!(rows[7].2.is_none() && rows[7].4.is_none());
}

async fn twice_changes_nothing(backend: Backend) {
    let w = World::new(backend).await;
    let db = ledger(&w).await;
    // An older suppression of the same address keeps its reason.
    blast::suppress::add(&db, "zz@example.com", "operator", "operator")
        .await
        .unwrap();
    let log = w.path("maillog");
    std::fs::write(&log, LOG).unwrap();
    let first = reconcile(&db, &log).await;
    let lines = LOG.lines().count() as u64;
    assert_eq!(
        first,
        Summary {
            lines,
            malformed: 3,
            // ZZZ's delivery and g7's queue mate other@example.com.
            unrelated: 2,
            delivered: 3,
            bounced: 2,
            expired: 1,
            deferred: 5,
            suppressed: 1,
            updated: 7,
        }
    );
    let rows = mta_rows(&db).await;
    check_reconciled(&rows);
    let supp = suppressions(&db).await;
    assert_eq!(
        supp,
        [
            (
                "b2@example.com".to_string(),
                "hard bounce: 5.1.1 userunknown".to_string(),
                "maillog:4jhj0k5S8Bz2NP2".to_string()
            ),
            (
                "zz@example.com".to_string(),
                "operator".to_string(),
                "operator".to_string()
            ),
        ]
    );

    // Again: every row and the suppression list as they were.
    let second = reconcile(&db, &log).await;
    assert_eq!(
        second,
        Summary {
            suppressed: 0,
            updated: 0,
            ..first
        }
    );
    assert_eq!(mta_rows(&db).await, rows);
    assert_eq!(suppressions(&db).await, supp);

    // `blast status` counts what the MTA did, beside what it answered.
    let c = blast::ledger::find_campaign(&db, "rc")
        .await
        .unwrap()
        .unwrap();
    let counts = blast::ledger::status_counts(&db, &c, 0).await.unwrap();
    assert_eq!(
        (
            counts.sent,
            counts.mta_delivered,
            counts.mta_bounced,
            counts.mta_expired,
            counts.mta_deferred
        ),
        (8, 3, 2, 1, 1)
    );
    db.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconcile_twice_changes_nothing_sqlite() {
    twice_changes_nothing(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconcile_twice_changes_nothing_postgres() {
    twice_changes_nothing(Backend::Postgres).await;
}

/// A log split into several batches ([`blast::reconcile::BATCH`] events
/// each): a deferral in one batch, the delivery in a later one, the other
/// way round for another recipient; bad lines in between count, and the
/// binary exits 0 with the summary as JSON.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_lines_are_counted_not_fatal_across_batches() {
    let w = World::new(Backend::Sqlite).await;
    let db = ledger(&w).await;
    let mut log = String::new();
    log.push_str("Dec  5 21:00:00 vm postfix/smtp[3]: A1B2C3D4E7: to=<g7@example.com>, relay=x[192.0.2.1]:25, delay=1, delays=0/0/0/1, dsn=2.0.0, status=sent (250 ok)\n");
    log.push_str("Dec  5 21:00:00 vm postfix/smtp[3]: A1B2C3D4E8: to=<h8@example.com>, relay=x[192.0.2.1]:25, delay=1, delays=0/0/0/1, dsn=4.4.1, status=deferred (timeout)\n");
    for i in 0..2500 {
        // Other mail, and garbage of every kind.
        log.push_str(&format!("Dec  5 21:00:01 vm postfix/smtp[3]: B{i:09}: to=<x{i}@else.example>, relay=x[192.0.2.1]:25, delay=1, delays=0/0/0/1, dsn=2.0.0, status=sent (250 ok)\n"));
        log.push_str(
            [
                "\u{0}\u{1}",
                "Dec  5 21:00:01 vm postfix/smtp[3]: B00000001: to=<x",
                "Dec",
            ][i % 3],
        );
        log.push('\n');
    }
    log.push_str("Dec  5 22:00:00 vm postfix/smtp[3]: A1B2C3D4E7: to=<g7@example.com>, relay=x[192.0.2.1]:25, delay=1, delays=0/0/0/1, dsn=4.4.1, status=deferred (late)\n");
    log.push_str("Dec  5 22:00:00 vm postfix/smtp[3]: A1B2C3D4E8: to=<H8@Example.com>, relay=x[192.0.2.1]:25, delay=2, delays=0/0/0/1, dsn=2.0.0, status=sent (250 at last)\n");
    let path = w.path("maillog");
    std::fs::write(&path, &log).unwrap();
    let out = util::blast()
        .args(["reconcile", "--json", "--database", &w.url, "--maillog"])
        .arg(&path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    let s: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(s["lines"], 5004, "{s}");
    assert_eq!(s["malformed"], 2500, "{s}");
    assert_eq!(s["unrelated"], 2500, "{s}");
    assert_eq!(
        (&s["delivered"], &s["deferred"]),
        (&2.into(), &2.into()),
        "{s}"
    );
    assert!(stderr.contains("2500 malformed"), "{stderr}");
    let rows = mta_rows(&db).await;
    assert_eq!(rows[6].2.as_deref(), Some("delivered"));
    assert_eq!(rows[6].4.as_deref(), Some("250 ok"));
    assert_eq!(rows[7].2.as_deref(), Some("delivered"));
    assert_eq!(rows[7].4.as_deref(), Some("250 at last"));
    // From stdin too, with the same result.
    let mut child = util::blast()
        .args([
            "reconcile",
            "--json",
            "--database",
            &w.url,
            "--maillog",
            "-",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(log.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0));
    let again: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(again["updated"], 0, "{again}");
    assert_eq!(again["lines"], 5004, "{again}");
    assert_eq!(mta_rows(&db).await, rows);
    db.close().await;
}

/// A child process killed when the test ends, whatever way it ends.
struct Reaped(Option<Child>);

impl Drop for Reaped {
    fn drop(&mut self) {
        if let Some(c) = self.0.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

async fn follow_across_rotation(backend: Backend) {
    let w = World::new(backend).await;
    let db = ledger(&w).await;
    let lines: Vec<&str> = LOG.lines().collect();
    let (before, after) = lines.split_at(11);
    let path = w.path("maillog");
    let mut file = std::fs::File::create(&path).unwrap();
    // The writer's last line before the rename is not finished yet.
    for l in &before[..10] {
        writeln!(file, "{l}").unwrap();
    }
    write!(file, "{}", &before[10][..40]).unwrap();
    file.flush().unwrap();
    let child = util::blast()
        .args([
            "reconcile",
            "--follow",
            "--json",
            "--database",
            &w.url,
            "--maillog",
        ])
        .arg(&path)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut child = Reaped(Some(child));
    let pid = child.0.as_ref().unwrap().id();
    let status = |id: i64| {
        let db = db.clone();
        async move {
            let s: Option<String> = sqlx::query_scalar(
                "SELECT mta_status FROM blast_deliveries WHERE recipient_id = $1",
            )
            .bind(id)
            .fetch_one(db.pool())
            .await
            .unwrap();
            s
        }
    };
    // Recipient 3's line is the 8th: read and written while following.
    wait_until(
        "recipient 3 reconciled",
        Duration::from_millis(50),
        || async {
            match status(3).await {
                Some(s) => Ok(s),
                None => Err("not yet".to_string()),
            }
        },
    )
    .await;
    // Rotation: renamed away, the writer finishes its line in the old file,
    // then a new file gets the rest.
    std::fs::rename(&path, w.path("maillog.1")).unwrap();
    writeln!(file, "{}", &before[10][40..]).unwrap();
    drop(file);
    std::fs::write(&path, after.join("\n") + "\n").unwrap();
    wait_until("recipient 6 expired", Duration::from_millis(50), || async {
        match status(6).await.as_deref() {
            Some("expired") => Ok(()),
            s => Err(format!("{s:?}")),
        }
    })
    .await;
    let kill = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let out = {
        let c = child.0.take().unwrap();
        tokio::task::spawn_blocking(move || c.wait_with_output().unwrap())
            .await
            .unwrap()
    };
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    let s: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(s["lines"], LOG.lines().count(), "{s}");
    assert_eq!(s["malformed"], 3, "{s}");
    check_reconciled(&mta_rows(&db).await);
    assert_eq!(suppressions(&db).await.len(), 1);
    db.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconcile_follows_across_rotation_until_sigterm_sqlite() {
    follow_across_rotation(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconcile_follows_across_rotation_until_sigterm_postgres() {
    follow_across_rotation(Backend::Postgres).await;
}
