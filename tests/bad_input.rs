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

/// A render error and an invalid address fail that recipient only, with the
/// reason, and without an SMTP round trip.
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
    assert_eq!((s.sent, s.failed), (4, 2), "{s:?}");
    let db = w.db().await;
    let rows = ledger_rows(&db, "broken").await;
    let r2 = rows.iter().find(|r| r.0 == 2).unwrap();
    assert_eq!(r2.1, "failed");
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
