use std::future::pending;

use blast::config::{Config, Overrides};
use blast::progress::Mode;
use blast::sink::Faults;
use blast::Error;

use crate::util::{self, ledger_rows, Backend, World};

/// A template syntax error aborts before the first message, naming file and line.
#[tokio::test]
async fn template_syntax_error_aborts_before_sending() {
    let w = World::new(Backend::Sqlite).await;
    w.seed(5).await;
    let sink = util::sink(Faults::default()).await;
    let path = w.campaign("syntax", "Hi", "line one\nline two {% for %}\n", None, "");
    let cfg = w.config(&path, Some(&sink), 1);
    let err = blast::commands::send(&cfg, Mode::Quiet, pending())
        .await
        .unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, Error::Template { .. }), "{msg}");
    assert!(msg.contains("syntax.txt") && msg.contains('2'), "{msg}");
    assert_eq!(sink.stats().messages, 0);
}

/// A render error and an invalid address concern that recipient only, with
/// the reason, and without an SMTP round trip: the address fails for good,
/// the message that could not be built is built again by the next run.
#[tokio::test]
async fn broken_rows_fail_alone() {
    let w = World::new(Backend::Sqlite).await;
    w.seed(6).await;
    // Row 2 lacks first_name; row 4 has an unusable address.
    w.exec("UPDATE subscribers SET attributes = '{}' WHERE id = 2")
        .await;
    w.exec("UPDATE subscribers SET email = 'not-an-address' WHERE id = 4")
        .await;
    let sink = util::sink(Faults::default()).await;
    let path = w.campaign("broken", "Hi {{ first_name }}", "x", None, "");
    let cfg = w.config(&path, Some(&sink), 2);
    let s = blast::commands::send(&cfg, Mode::Quiet, pending())
        .await
        .unwrap();
    assert_eq!((s.sent, s.failed, s.unrendered), (4, 1, 1), "{s:?}");
    let db = w.db().await;
    let rows = ledger_rows(&db, "broken").await;
    let r2 = rows.iter().find(|r| r.0 == 2).unwrap();
    assert_eq!(r2.1, "unrendered");
    assert!(r2.4.as_deref().unwrap().contains("first_name"), "{r2:?}");
    let r4 = rows.iter().find(|r| r.0 == 4).unwrap();
    assert_eq!((r4.1.as_str(), r4.2), ("failed", None));
    assert!(
        r4.4.as_deref().unwrap().contains("not-an-address"),
        "{r4:?}"
    );
    assert_eq!(sink.stats().recipients, 4, "no RCPT for broken rows");
}

/// An unreachable relay at start is one clear fatal error; nothing recorded.
#[tokio::test]
async fn unreachable_relay_is_fatal_and_records_nothing() {
    let w = World::new(Backend::Sqlite).await;
    w.seed(3).await;
    // Bind then drop a listener: the port is closed.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let path = w.campaign("down", "Hi", "x", None, "");
    let cfg = Config::load(
        &path,
        &Overrides {
            smtp: vec![format!("smtp://127.0.0.1:{port}")],
            ..Default::default()
        },
    )
    .unwrap();
    let err = blast::commands::send(&cfg, Mode::Quiet, pending())
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Unreachable { .. }), "{err}");
    assert!(err.to_string().contains(&port.to_string()), "{err}");
    let db = w.db().await;
    assert!(ledger_rows(&db, "down").await.is_empty());
}

/// Audience problems are named as such.
#[tokio::test]
async fn audience_without_email_column_is_explained() {
    let w = World::new(Backend::Sqlite).await;
    w.exec("CREATE TABLE people (id INTEGER PRIMARY KEY, mail TEXT)")
        .await;
    w.exec("INSERT INTO people VALUES (1, 'a@example.com')")
        .await;
    let sink = util::sink(Faults::default()).await;
    let path = w.campaign("noemail", "Hi", "x", None, "");
    std::fs::write(
        &path,
        std::fs::read_to_string(&path)
            .unwrap()
            .replace("table = \"subscribers\"", "table = \"people\""),
    )
    .unwrap();
    let cfg = w.config(&path, Some(&sink), 1);
    let err = blast::commands::send(&cfg, Mode::Quiet, pending())
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("email"), "{err}");
    assert_eq!(sink.stats().messages, 0);
}

/// Config errors name the file and the key.
#[test]
fn config_errors_name_file_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("c.toml");
    std::fs::write(&p, "name = \"x\"\ndatabase = \"sqlite://x.db\"\n[audience]\ntable = \"subscribers\"\n[unsubscribe]\nurl = \"https://l.example.com/u/{token}\"\n[message]\nfrom = \"a@b.c\"\nsubject = \"s\"\n").unwrap();
    let err = Config::load(&p, &Overrides::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("c.toml") && err.contains("message"), "{err}");
    std::fs::write(&p, "name = \"x\"\n[audience]\ntable = 3\n").unwrap();
    let err = Config::load(&p, &Overrides::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("c.toml") && err.contains("table"), "{err}");
}

/// Issue 13: a misspelled variable fails every recipient alike. The
/// campaign pauses after a few with the error and the first recipient,
/// nobody is marked failed, and once the template is fixed `blast resume`
/// (a control, then a send) mails everyone exactly once.
#[tokio::test]
async fn a_template_mistake_pauses_and_resume_sends_everyone_after_the_fix() {
    let w = World::new(Backend::Sqlite).await;
    w.seed(300).await;
    let sink = util::sink(Faults::default()).await;
    let path = w.campaign("typo", "Hi {{ frist_name }}", "x", None, "");
    let cfg = w.config(&path, Some(&sink), 2);
    let s = blast::commands::send(&cfg, Mode::Quiet, pending())
        .await
        .unwrap();
    assert!(s.breaker.is_some(), "{s:?}");
    assert_eq!((s.sent, s.failed), (0, 0), "{s:?}");
    assert!(s.unrendered >= 5, "{s:?}");
    let status = blast::commands::status(&cfg).await.unwrap();
    assert_eq!(status.state, "paused", "{status:?}");
    let reason = status.reason.clone().unwrap_or_default();
    // Two render workers fail in parallel (chunks 1-32 and 33-64): the run
    // is named from the lowest id either had reached.
    let from: i64 = reason
        .split("from recipient ")
        .nth(1)
        .and_then(|r| r.split(':').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{reason}"));
    assert!(
        reason.contains("frist_name") && (1..=33).contains(&from),
        "{reason}"
    );
    assert_eq!(status.failed, 0);
    assert_eq!(sink.received().len(), 0, "nothing went out");

    // The operator fixes the subject and resumes.
    let path = w.campaign("typo", "Hi {{ first_name }}", "x", None, "");
    let cfg = w.config(&path, Some(&sink), 2);
    blast::commands::control(&w.url, "typo", blast::commands::Control::Resume, None)
        .await
        .unwrap();
    let s = blast::commands::send(&cfg, Mode::Quiet, pending())
        .await
        .unwrap();
    assert_eq!((s.sent, s.unrendered, s.failed), (300, 0, 0), "{s:?}");
    let count = util::per_recipient(&sink.received());
    assert_eq!(count.len(), 300);
    assert!(count.values().all(|&c| c == 1));
    let status = blast::commands::status(&cfg).await.unwrap();
    assert_eq!((status.state.as_str(), status.sent), ("finished", 300));
}

/// Issue 13: an `attributes` column whose text is not JSON fails that
/// recipient with the reason, instead of sending it with its variables
/// silently missing; the other rows go out.
#[tokio::test]
async fn attributes_that_do_not_parse_are_that_recipients_error() {
    let w = World::new(Backend::Sqlite).await;
    w.seed(4).await;
    w.exec("UPDATE subscribers SET attributes = '{\"first_name\": \"Ann\"' WHERE id = 3")
        .await;
    let sink = util::sink(Faults::default()).await;
    let path = w.campaign("json", "Hi {{ id }}", "x", None, "");
    let cfg = w.config(&path, Some(&sink), 1);
    let s = blast::commands::send(&cfg, Mode::Quiet, pending())
        .await
        .unwrap();
    assert_eq!((s.sent, s.unrendered), (3, 1), "{s:?}");
    let db = w.db().await;
    let rows = ledger_rows(&db, "json").await;
    let r3 = rows.iter().find(|r| r.0 == 3).unwrap();
    assert_eq!(r3.1, "unrendered");
    let why = r3.4.as_deref().unwrap();
    assert!(
        why.starts_with("row 3: column `attributes` is not valid JSON"),
        "{why}"
    );
}
