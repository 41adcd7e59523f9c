//! `blast bounce ingest`: bounces, complaints and unsubscribe mails from a
//! Maildir, an mbox and stdin, tied to campaigns by VERP and signed headers,
//! with quarantine, soft-bounce scoring and suppression for later campaigns.

use std::path::Path;
use std::time::Duration;

use blast::bounce::ingest::{Ingestor, Policy, Verdict};
use blast::bounce::mailbox::{Inbox, Source};
use blast::db::Db;
use blast::sink::{Faults, Received};

use crate::util::{
    blast, header, only_to, sink, slow_sink, spawn_send, wait_for, wait_until, Backend, World,
};

const VERP: &str =
    "[bounces]\nverp = \"bounces+{campaign}-{recipient}-{sig}@bounce.example.com\"\n";

/// An RFC 3464 DSN as Postfix writes it, delivered to `to` (the VERP
/// address), about `failed`, returning the original's headers.
pub(crate) fn dsn(to: &str, failed: &str, status: &str, diag: &str, original: &[u8]) -> Vec<u8> {
    let head = String::from_utf8_lossy(original);
    let head = head.split("\r\n\r\n").next().unwrap_or("");
    format!(
        "Return-Path: <>\r\nDelivered-To: {to}\r\nFrom: MAILER-DAEMON@mx.example.net (Mail Delivery System)\r\n\
         To: {to}\r\nSubject: Undelivered Mail Returned to Sender\r\nAuto-Submitted: auto-replied\r\n\
         MIME-Version: 1.0\r\nContent-Type: multipart/report; report-type=delivery-status; boundary=\"B\"\r\n\r\n\
         --B\r\nContent-Type: text/plain\r\n\r\nI'm sorry to have to inform you that your message could not\r\n\
         be delivered to one or more recipients.\r\n\r\n<{failed}>: host mx.example.net said: {diag}\r\n\r\n\
         --B\r\nContent-Type: message/delivery-status\r\n\r\nReporting-MTA: dns; mx.example.net\r\n\r\n\
         Final-Recipient: rfc822; {failed}\r\nAction: failed\r\nStatus: {status}\r\n\
         Diagnostic-Code: smtp; {diag}\r\n\r\n\
         --B\r\nContent-Type: text/rfc822-headers\r\n\r\n{head}\r\n\r\n--B--\r\n"
    )
    .into_bytes()
}

/// An ARF abuse report about `original`, sent to the feedback address (no VERP).
fn arf(original: &[u8]) -> Vec<u8> {
    let orig = String::from_utf8_lossy(original);
    let head = orig.split("\r\n\r\n").next().unwrap_or("");
    format!(
        "From: fbl@mailbox.example.org\r\nTo: abuse@example.com\r\nSubject: complaint\r\n\
         MIME-Version: 1.0\r\nContent-Type: multipart/report; report-type=feedback-report; boundary=\"F\"\r\n\r\n\
         --F\r\nContent-Type: text/plain\r\n\r\nThis is an email abuse report.\r\n\r\n\
         --F\r\nContent-Type: message/feedback-report\r\n\r\nFeedback-Type: abuse\r\nUser-Agent: FBL/1.0\r\nVersion: 1\r\n\r\n\
         --F\r\nContent-Type: text/rfc822-headers\r\n\r\n{head}\r\n\r\n--F--\r\n"
    )
    .into_bytes()
}

/// A person's mail to the List-Unsubscribe mailto of `original`.
pub(crate) fn unsubscribe_mail(original: &[u8]) -> Vec<u8> {
    let lu = header(original, "List-Unsubscribe").unwrap();
    let mailto = lu
        .split(['<', '>'])
        .find_map(|p| p.strip_prefix("mailto:"))
        .unwrap()
        .to_string();
    format!(
        "From: someone@example.org\r\nTo: {mailto}\r\nSubject: unsubscribe\r\n\r\nPlease unsubscribe me.\r\n"
    )
    .into_bytes()
}

/// Sends campaign `name` to the seeded audience with VERP; returns what the sink got.
async fn sent(w: &World, name: &str) -> Vec<Received> {
    let s = sink(Faults::default()).await;
    let path = w.campaign(name, "Hi", "Hello {{ id }}\n", None, VERP);
    let cfg = w.config(&path, Some(&s), 2);
    spawn_send(&cfg).await.unwrap().unwrap();
    s.shutdown().await
}

fn write_maildir(dir: &Path, mails: &[(&str, Vec<u8>)]) {
    for sub in ["new", "cur", "tmp"] {
        std::fs::create_dir_all(dir.join(sub)).unwrap();
    }
    for (name, bytes) in mails {
        std::fs::write(dir.join("new").join(name), bytes).unwrap();
    }
}

async fn suppressed(db: &Db, addr: &str) -> Option<String> {
    blast::suppress::reason(db, addr).await.unwrap()
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|d| {
            d.map(|e| e.unwrap().file_name().to_string_lossy().to_string())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

async fn ingest_maildir(backend: Backend) {
    let w = World::new(backend).await;
    w.seed(6).await;
    let got = sent(&w, "c1").await;
    let (m1, m2, m3, m4, m5) = (
        only_to(&got, "user1@example.com"),
        only_to(&got, "user2@example.com"),
        only_to(&got, "user3@example.com"),
        only_to(&got, "user4@example.com"),
        only_to(&got, "user5@example.com"),
    );
    // A forged bounce: right shape, wrong signature.
    let forged_to = m5.mail_from.replace(
        &m5.mail_from[m5.mail_from.len() - 27..m5.mail_from.len() - 25],
        "zz",
    );
    let maildir = w.path("Maildir");
    write_maildir(
        &maildir,
        &[
            // user1 forwards to an address that does not exist: VERP names user1.
            ("01.hard", dsn(&m1.mail_from, "old.user1@elsewhere.example", "5.1.1", "550 5.1.1 <old.user1@elsewhere.example>: Recipient address rejected: User unknown", &m1.data)),
            ("02.soft", dsn(&m2.mail_from, "user2@example.com", "4.2.2", "452 4.2.2 Mailbox full", &m2.data)),
            ("03.arf", arf(&m3.data)),
            ("04.unsub", unsubscribe_mail(&m4.data)),
            ("05.forged", dsn(&forged_to, "user5@example.com", "5.1.1", "550 5.1.1 User unknown", &b"Subject: x\r\n\r\n"[..])),
            ("06.garbage", b"\x00\x01 not a mail at all".to_vec()),
            ("07.human", b"From: a@example.org\r\nTo: bounces@bounce.example.com\r\nSubject: hello\r\n\r\nAre you there?\r\n".to_vec()),
        ],
    );
    let db = w.db().await;
    let ing = Ingestor::new(db.clone(), Policy::default()).await.unwrap();
    let inbox = Inbox::open(Source::Maildir(maildir.clone()), None).unwrap();
    let (summary, mailbox) = blast::bounce::ingest::run(ing, inbox, |_| {})
        .await
        .unwrap();
    assert_eq!(summary.messages, 7);
    assert_eq!(
        (
            summary.hard,
            summary.soft,
            summary.complaints,
            summary.unsubscribes
        ),
        (2, 1, 1, 1),
        "{summary:?}"
    );
    assert_eq!(summary.quarantined, 2, "{summary:?}");

    // Hard bounce via VERP: the subscribed address, not the forwarded one.
    let why = suppressed(&db, "user1@example.com").await.unwrap();
    assert!(why.starts_with("hard bounce: 5.1.1"), "{why}");
    assert_eq!(suppressed(&db, "old.user1@elsewhere.example").await, None);
    // One soft bounce suppresses nobody.
    assert_eq!(suppressed(&db, "user2@example.com").await, None);
    // The complaint came without VERP: the signed X-Blast headers name user3.
    assert_eq!(
        suppressed(&db, "user3@example.com").await.as_deref(),
        Some("complaint: abuse")
    );
    assert_eq!(
        suppressed(&db, "user4@example.com").await.as_deref(),
        Some("unsubscribe")
    );
    // The forged bounce is recorded but suppresses nobody.
    assert_eq!(suppressed(&db, "user5@example.com").await, None);
    assert_eq!(suppressed(&db, "user6@example.com").await, None);

    // Events are tied to campaign and recipient where signed.
    use sqlx::Row;
    let rows = sqlx::query(
        "SELECT address, kind, class, status, campaign_id, recipient_id FROM blast_bounces ORDER BY address",
    )
    .fetch_all(db.pool())
    .await
    .unwrap();
    let row = |addr: &str| rows.iter().find(|r| r.get::<String, _>(0) == addr).unwrap();
    let r1 = row("user1@example.com");
    assert_eq!(r1.get::<String, _>(1), "bounce");
    assert_eq!(r1.get::<Option<String>, _>(3).as_deref(), Some("5.1.1"));
    assert_eq!(r1.get::<Option<i64>, _>(5), Some(1));
    assert!(r1.get::<Option<i64>, _>(4).is_some());
    let r5 = row("user5@example.com");
    assert_eq!(r5.get::<Option<i64>, _>(4), None, "forged: no campaign");

    // `blast status` counts what came back, per campaign.
    let row = blast::ledger::find_campaign(&db, "c1")
        .await
        .unwrap()
        .unwrap();
    let c = blast::ledger::status_counts(&db, &row, 0).await.unwrap();
    assert_eq!(
        (c.bounced_hard, c.bounced_soft, c.complaints, c.unsubscribed),
        (1, 1, 1, 1),
        "{c:?}"
    );

    // Processed mail moved to cur/ (seen); unusable mail quarantined, bytes intact.
    assert!(names(&maildir.join("new")).is_empty());
    let cur = names(&maildir.join("cur"));
    assert_eq!(cur.len(), 5, "{cur:?}");
    assert!(cur.iter().all(|n| n.ends_with(":2,S")), "{cur:?}");
    let q = names(&maildir.join(".Quarantine/new"));
    let q2 = names(&maildir.join(".Quarantine/cur"));
    assert_eq!(q.len() + q2.len(), 2, "{q:?} {q2:?}");
    assert_eq!(mailbox.quarantined.len(), 2);
    let garbage = mailbox
        .quarantined
        .iter()
        .find(|x| x.id.starts_with("06"))
        .unwrap();
    assert!(
        garbage.reason.contains("not an e-mail"),
        "{}",
        garbage.reason
    );

    // A second run finds nothing new; re-ingesting the same bytes counts once.
    let ing = Ingestor::new(db.clone(), Policy::default()).await.unwrap();
    let inbox = Inbox::open(Source::Maildir(maildir.clone()), None).unwrap();
    let (again, _) = blast::bounce::ingest::run(ing, inbox, |_| {})
        .await
        .unwrap();
    assert_eq!(again.messages, 0);
    let mut ing = Ingestor::new(db.clone(), Policy::default()).await.unwrap();
    let bytes = dsn(
        &m2.mail_from,
        "user2@example.com",
        "4.2.2",
        "452 4.2.2 Mailbox full",
        &m2.data,
    );
    match ing.ingest(&bytes, "again").await.unwrap() {
        Verdict::Recorded(events) => assert!(events.iter().all(|e| !e.new), "{events:?}"),
        v => panic!("{v:?}"),
    }
}

#[tokio::test]
async fn ingest_maildir_sqlite() {
    ingest_maildir(Backend::Sqlite).await;
}

#[tokio::test]
async fn ingest_maildir_postgres() {
    ingest_maildir(Backend::Postgres).await;
}

#[tokio::test]
async fn soft_bounces_suppress_at_the_limit() {
    let w = World::new(Backend::Sqlite).await;
    w.seed(1).await;
    let got = sent(&w, "soft").await;
    let m = only_to(&got, "user1@example.com");
    let db = w.db().await;
    let mut ing = Ingestor::new(db.clone(), Policy::default()).await.unwrap();
    for i in 1..=3 {
        // Three distinct bounces (different diagnostics, so different bytes).
        let diag = format!("452 4.2.2 Mailbox full (try {i})");
        let v = ing
            .ingest(
                &dsn(&m.mail_from, "user1@example.com", "4.2.2", &diag, &m.data),
                &format!("m{i}"),
            )
            .await
            .unwrap();
        let Verdict::Recorded(events) = v else {
            panic!("{v:?}")
        };
        assert_eq!(events.len(), 1, "{events:?}");
        assert!(events[0].new, "{events:?}");
        assert_eq!(events[0].class, "soft");
        let now = suppressed(&db, "user1@example.com").await;
        match i {
            1 | 2 => assert_eq!(now, None, "after {i} soft bounces"),
            _ => assert!(
                now.unwrap().starts_with("soft bounces: 3 within 14d"),
                "third one suppresses"
            ),
        }
    }
}

#[tokio::test]
async fn ingest_mbox_and_stdin_through_the_binary() {
    let w = World::new(Backend::Sqlite).await;
    w.seed(3).await;
    let got = sent(&w, "cli").await;
    let m1 = only_to(&got, "user1@example.com");
    let m2 = only_to(&got, "user2@example.com");

    // mbox: a hard bounce and a garbage message, quarantined beside it.
    let mbox = w.path("bounces.mbox");
    let mut text = b"From MAILER-DAEMON Sun Nov 29 12:00:00 2026\n".to_vec();
    text.extend(dsn(
        &m1.mail_from,
        "user1@example.com",
        "5.1.1",
        "550 5.1.1 No such user",
        &m1.data,
    ));
    text.extend(b"\nFrom nobody Sun Nov 29 12:00:01 2026\nnot a header line at all\n\n");
    std::fs::write(&mbox, text).unwrap();
    let out = blast()
        .args(["bounce", "ingest", "--json", "--mbox"])
        .arg(&mbox)
        .args(["--database", &w.url])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["hard"], 1, "{summary}");
    assert_eq!(summary["quarantined"], 1, "{summary}");
    let quarantine = std::fs::read_to_string(w.path("bounces.mbox.quarantine")).unwrap();
    assert!(quarantine.contains("not a header line at all"));
    let db = w.db().await;
    assert!(suppressed(&db, "user1@example.com")
        .await
        .unwrap()
        .starts_with("hard bounce"));

    // stdin, as Postfix's pipe transport runs it.
    let run_stdin = |bytes: Vec<u8>, url: String| {
        let input = w.path("stdin.eml");
        std::fs::write(&input, bytes).unwrap();
        let out = blast()
            .args(["bounce", "ingest", "--stdin", "--quarantine"])
            .arg(w.path("stdin-quarantine"))
            .args(["--database", &url])
            .stdin(std::fs::File::open(&input).unwrap())
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let mut piped = b"From MAILER-DAEMON Sun Nov 29 12:00:00 2026\n".to_vec();
    piped.extend(dsn(
        &m2.mail_from,
        "user2@example.com",
        "5.1.1",
        "550 5.1.1 No such user",
        &m2.data,
    ));
    let (code, err) = run_stdin(piped.clone(), w.url.clone());
    assert_eq!(code, Some(0), "{err}");
    assert!(suppressed(&db, "user2@example.com")
        .await
        .unwrap()
        .starts_with("hard bounce"));
    // Garbage on stdin goes to the quarantine Maildir; the MTA sees success.
    let (code, err) = run_stdin(b"\x00garbage".to_vec(), w.url.clone());
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(names(&w.path("stdin-quarantine/new")).len(), 1);
    // Database down: exit 75 so Postfix keeps the mail and retries.
    let (code, err) = run_stdin(piped, "sqlite:///nonexistent-dir/blast.db".into());
    assert_eq!(code, Some(75), "{err}");
}

/// A hard bounce ingested while a campaign is still sending suppresses the
/// address for the next campaign.
#[tokio::test]
async fn hard_bounce_mid_campaign_suppresses_for_the_next_campaign() {
    let w = World::new(Backend::Sqlite).await;
    w.seed(100).await;
    let slow = slow_sink(Duration::from_millis(10)).await;
    let path = w.campaign("first", "Hi", "Hello {{ id }}\n", None, VERP);
    let cfg = w.config(&path, Some(&slow), 2);
    let run = spawn_send(&cfg);
    wait_for(&slow, 10).await;
    let early = slow.received();
    let m = &early[0];
    let victim = m.rcpt_to[0].clone();
    let db = w.db().await;
    // A real bounce comes after the ledger recorded the MTA's answer (within
    // 100 ms); wait for that row.
    let rid: i64 = header(&m.data, "X-Blast-Recipient")
        .unwrap()
        .parse()
        .unwrap();
    let campaign = blast::ledger::campaign_id(&db, "first")
        .await
        .unwrap()
        .unwrap();
    let what = format!("the ledger row of recipient {rid}");
    wait_until(&what, Duration::from_millis(20), || async {
        match blast::ledger::recipient_address(&db, campaign, rid)
            .await
            .unwrap()
        {
            Some(_) => Ok(()),
            None => Err("no row".to_string()),
        }
    })
    .await;
    let mut ing = Ingestor::new(db.clone(), Policy::default()).await.unwrap();
    let bytes = dsn(
        &m.mail_from,
        &victim,
        "5.1.1",
        "550 5.1.1 User unknown",
        &m.data,
    );
    let Verdict::Recorded(events) = ing.ingest(&bytes, "mid").await.unwrap() else {
        panic!("not recorded")
    };
    assert!(events[0].suppressed.is_some(), "{events:?}");
    assert!(!run.is_finished(), "the campaign was still sending");
    run.await.unwrap().unwrap();
    slow.shutdown().await;

    let next = sink(Faults::default()).await;
    let path = w.campaign("second", "Hi", "Hello {{ id }}\n", None, VERP);
    let summary = spawn_send(&w.config(&path, Some(&next), 2))
        .await
        .unwrap()
        .unwrap();
    let got = next.shutdown().await;
    assert_eq!(got.len(), 99);
    assert!(!got.iter().any(|m| m.rcpt_to[0] == victim));
    assert_eq!(summary.suppressed, 1);
}

/// Issue 13: a bounce about an address the suppression list used to refuse
/// (`john@gmailcom`, which blast sends to) ended the whole Maildir run; one
/// about something that is no address at all is quarantined. The rest of
/// the Maildir is processed either way.
#[tokio::test]
async fn issue13_a_bad_address_in_a_bounce_never_stops_the_run() {
    let w = World::new(Backend::Sqlite).await;
    w.exec(
        "INSERT INTO subscribers (id, email, attributes, created_at) VALUES \
         (1, 'john@gmailcom', '{}', '2026-01-01T00:00:00.000Z'), \
         (2, 'user2@example.com', '{}', '2026-01-01T00:00:00.000Z'), \
         (3, 'user3@example.com', '{}', '2026-01-01T00:00:00.000Z')",
    )
    .await;
    let got = sent(&w, "bad").await;
    let (m1, m2, m3) = (
        only_to(&got, "john@gmailcom"),
        only_to(&got, "user2@example.com"),
        only_to(&got, "user3@example.com"),
    );
    let hard =
        |m: &Received, to: &str| dsn(&m.mail_from, to, "5.1.1", "550 5.1.1 User unknown", &m.data);
    let maildir = w.path("Maildir");
    write_maildir(
        &maildir,
        &[
            ("01.john", hard(&m1, "john@gmailcom")),
            ("02.user2", hard(&m2, "user2@example.com")),
            (
                "03.noaddress",
                dsn(
                    "bounces@bounce.example.com",
                    "jo..hn@example.com",
                    "5.1.1",
                    "550 5.1.1 User unknown",
                    &b"Subject: x\r\n\r\n"[..],
                ),
            ),
            ("04.user3", hard(&m3, "user3@example.com")),
        ],
    );
    let db = w.db().await;
    let ing = Ingestor::new(db.clone(), Policy::default()).await.unwrap();
    let inbox = Inbox::open(Source::Maildir(maildir.clone()), None).unwrap();
    let (summary, mailbox) = blast::bounce::ingest::run(ing, inbox, |_| {})
        .await
        .unwrap();
    assert_eq!((summary.messages, summary.hard), (4, 3), "{summary:?}");
    assert_eq!(summary.quarantined, 1, "{summary:?}");
    assert!(
        mailbox.quarantined[0]
            .reason
            .contains("not an email address"),
        "{:?}",
        mailbox.quarantined
    );
    for a in ["john@gmailcom", "user2@example.com", "user3@example.com"] {
        let why = suppressed(&db, a).await;
        assert!(why.is_some_and(|w| w.starts_with("hard bounce")), "{a}");
    }
    assert_eq!(names(&maildir.join("cur")).len(), 3);
}

/// Issue 13: forged (unsigned) soft bounces do not count toward the soft
/// limit; only signed ones do, unless the operator trusts unsigned mail.
#[tokio::test]
async fn issue13_unsigned_soft_bounces_do_not_count() {
    let w = World::new(Backend::Sqlite).await;
    w.seed(1).await;
    let got = sent(&w, "soft-forged").await;
    let m = only_to(&got, "user1@example.com");
    let db = w.db().await;
    let soft = |to: &str, i: u32, original: &[u8]| {
        let diag = format!("452 4.2.2 Mailbox full (try {i})");
        dsn(to, "user1@example.com", "4.2.2", &diag, original)
    };
    let mut ing = Ingestor::new(db.clone(), Policy::default()).await.unwrap();
    // Two forged ones: no VERP, no signed headers.
    for i in 1..=2 {
        let raw = soft("bounces@bounce.example.com", i, b"Subject: x\r\n\r\n");
        ing.ingest(&raw, &format!("forged{i}")).await.unwrap();
    }
    // One signed one: 1 signed soft bounce of 3 is not the limit.
    ing.ingest(&soft(&m.mail_from, 3, &m.data), "signed3")
        .await
        .unwrap();
    assert_eq!(suppressed(&db, "user1@example.com").await, None);

    // Trusting unsigned mail, the same three count.
    let policy = Policy {
        trust_unsigned: true,
        ..Policy::default()
    };
    let mut ing = Ingestor::new(db.clone(), policy).await.unwrap();
    ing.ingest(
        &soft("bounces@bounce.example.com", 4, b"Subject: x\r\n\r\n"),
        "forged4",
    )
    .await
    .unwrap();
    let why = suppressed(&db, "user1@example.com").await.unwrap();
    assert!(why.starts_with("soft bounces: 4 within"), "{why}");
}
