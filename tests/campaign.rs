use std::collections::HashMap;
use std::future::pending;

use blast::progress::Mode;
use blast::sink::Faults;

use crate::util::{self, header, header_names, ledger_rows, Backend, World};

/// The full pipeline on `n` recipients: every recipient gets exactly one
/// message carrying its own values, and the ledger holds the sink's queue ids.
async fn ten_thousand(backend: Backend) {
    let n = 10_000;
    let w = World::new(backend).await;
    w.seed(n).await;
    let sink = util::sink(Faults::default()).await;
    let path = w.campaign(
        "big",
        "Hello {{ first_name }}",
        "Your token is {{ token }} (id {{ id }}, {{ email }}).",
        Some("<p>Hello {{ first_name }}, token {{ token }}</p>"),
        "[delivery]\nenvelope_from = \"bounces+{{ id }}@example.com\"\n",
    );
    let cfg = w.config(&path, Some(&sink), 8);
    let summary = blast::commands::send(&cfg, Mode::Quiet, pending())
        .await
        .unwrap();
    assert_eq!(
        (summary.sent, summary.failed, summary.deferred),
        (n as u64, 0, 0)
    );
    assert!(!summary.interrupted);

    let received = sink.received();
    assert_eq!(received.len(), n as usize, "one message per recipient");
    let mut seen: HashMap<String, usize> = HashMap::new();
    for r in &received {
        assert_eq!(r.rcpt_to.len(), 1, "one recipient per envelope");
        *seen.entry(r.rcpt_to[0].clone()).or_default() += 1;
        let id: i64 = header(&r.data, "X-Blast-Recipient")
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(r.rcpt_to[0], format!("user{id}@example.com"));
        assert_eq!(r.mail_from, format!("bounces+{id}@example.com"));
        assert_eq!(
            header(&r.data, "Subject").unwrap(),
            format!("Hello Name{id}")
        );
        let body = String::from_utf8_lossy(&r.data);
        assert!(
            body.contains(&format!("Your token is tok-{id}-{}", id * 7)),
            "{body}"
        );
        assert!(body.contains("multipart/alternative"));
    }
    assert_eq!(seen.len(), n as usize);
    assert!(seen.values().all(|&c| c == 1));

    let db = w.db().await;
    let rows = ledger_rows(&db, "big").await;
    assert_eq!(rows.len(), n as usize);
    let queue_ids: HashMap<String, String> = received
        .iter()
        .map(|r| (r.rcpt_to[0].clone(), r.queue_id.clone()))
        .collect();
    for (id, status, code, enhanced, _reply, qid) in rows {
        assert_eq!(status, "sent");
        assert_eq!(code, Some(250));
        assert_eq!(enhanced.as_deref(), Some("2.0.0"));
        assert_eq!(
            qid.as_ref(),
            queue_ids.get(&format!("user{id}@example.com"))
        );
    }
    sink.shutdown().await;
}

/// Issue 14: into a server with PIPELINING and no CHUNKING (Postfix's
/// smtp-sink, many MTAs), each message's data carries the next envelope
/// behind it. Every recipient still gets exactly its own message, and a
/// recipient refused at RCPT (written ahead) gets its own failure, on
/// connections that refusals do not break.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envelopes_written_ahead_keep_every_outcome_with_its_recipient() {
    let n = 2_000;
    let refused = [5_i64, 6, 500, 1999];
    let w = World::new(Backend::Sqlite).await;
    w.seed(n).await;
    let mut faults = Faults::default();
    for id in refused {
        faults.rcpt_replies.insert(
            format!("user{id}@example.com"),
            (550, "5.1.1".into(), format!("no user {id}")),
        );
    }
    let sink = blast::sink::Sink::start(blast::sink::SinkConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        chunking: false,
        keep_messages: true,
        faults,
        ..Default::default()
    })
    .await
    .unwrap();
    let path = w.campaign(
        "ahead",
        "Hello {{ first_name }}",
        ".{{ id }} starts a line with a dot\n.\nand {{ email }}",
        None,
        "",
    );
    let cfg = w.config(&path, Some(&sink), 4);
    let summary = blast::commands::send(&cfg, Mode::Quiet, pending())
        .await
        .unwrap();
    let sent = n as u64 - refused.len() as u64;
    assert_eq!((summary.sent, summary.failed), (sent, refused.len() as u64));
    assert_eq!(summary.retries, 0, "no session was lost");
    let received = sink.received();
    assert_eq!(received.len() as u64, sent);
    let mut seen = std::collections::HashSet::new();
    for r in &received {
        let id: i64 = header(&r.data, "X-Blast-Recipient")
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(r.rcpt_to, [format!("user{id}@example.com")]);
        assert!(!refused.contains(&id), "{id} was refused");
        let body = String::from_utf8_lossy(&r.data);
        assert!(
            body.contains(&format!(
                "\r\n.{id} starts a line with a dot\r\n.\r\nand user{id}@"
            )),
            "{body}"
        );
        assert!(seen.insert(id), "{id} twice");
    }
    let db = w.db().await;
    for (id, status, code, _, reply, _) in ledger_rows(&db, "ahead").await {
        match refused.contains(&id) {
            true => {
                assert_eq!((status.as_str(), code), ("failed", Some(550)));
                assert!(reply.unwrap_or_default().contains(&format!("no user {id}")));
            }
            false => assert_eq!((status.as_str(), code), ("sent", Some(250)), "{id}"),
        }
    }
    sink.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_recipients_sqlite() {
    ten_thousand(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_recipients_postgres() {
    ten_thousand(Backend::Postgres).await;
}

/// JSON columns become nested objects; `[vars]` reach every template.
async fn columns_and_vars(backend: Backend) {
    let w = World::new(backend).await;
    let json_type = if backend == Backend::Postgres {
        "JSONB"
    } else {
        "TEXT"
    };
    w.exec(&format!(
        "CREATE TABLE members (id BIGINT PRIMARY KEY, email TEXT, city TEXT, score DOUBLE PRECISION, prefs_json {json_type})"
    ))
    .await;
    w.exec("INSERT INTO members VALUES (1, 'a@example.com', 'Oslo', 2.5, '{\"topics\": [\"rust\", \"smtp\"]}')").await;
    w.exec("INSERT INTO members VALUES (2, 'b@example.com', NULL, 1, '{\"topics\": []}')")
        .await;
    let sink = util::sink(Faults::default()).await;
    let path = w.campaign(
        "cols",
        "{{ week }}",
        "{{ city | default(value='nowhere') }} {{ score }} {% for t in prefs_json.topics %}[{{ t }}]{% endfor %} {% for a in articles %}{{ a.title }};{% endfor %}",
        None,
        "[vars]\nweek = \"w48\"\narticles = [{ title = \"One\" }, { title = \"Two\" }]\n",
    );
    std::fs::write(
        &path,
        std::fs::read_to_string(&path).unwrap().replace(
            "table = \"subscribers\"",
            "query = \"SELECT * FROM members\"",
        ),
    )
    .unwrap();
    let cfg = w.config(&path, Some(&sink), 2);
    let summary = blast::commands::send(&cfg, Mode::Quiet, pending())
        .await
        .unwrap();
    assert_eq!(summary.sent, 2, "{summary:?}");
    let mut bodies: Vec<(String, String)> = sink
        .received()
        .iter()
        .map(|r| {
            (
                r.rcpt_to[0].clone(),
                String::from_utf8_lossy(&r.data)
                    .split("\r\n\r\n")
                    .nth(1)
                    .unwrap()
                    .trim()
                    .to_string(),
            )
        })
        .collect();
    bodies.sort();
    assert_eq!(bodies[0].1, "Oslo 2.5 [rust][smtp] One;Two;");
    // A float column: SQLite keeps 1.0, PostgreSQL's JSON says 1.
    let score = if backend == Backend::Postgres {
        "1"
    } else {
        "1.0"
    };
    assert_eq!(bodies[1].1, format!("nowhere {score}  One;Two;"));
    assert_eq!(header(&sink.received()[0].data, "Subject").unwrap(), "w48");
    sink.shutdown().await;
}

#[tokio::test]
async fn columns_json_and_vars_sqlite() {
    columns_and_vars(Backend::Sqlite).await;
}

#[tokio::test]
async fn columns_json_and_vars_postgres() {
    columns_and_vars(Backend::Postgres).await;
}

/// Hostile subscriber data end to end: no injected header, no extra RCPT,
/// template syntax printed, HTML escaped, non-ASCII encoded.
#[tokio::test]
async fn hostile_subscriber_data_stays_data() {
    let w = World::new(Backend::Sqlite).await;
    let evil = [
        (1, "a@example.com", "Eve\r\nBcc: victim@example.com"),
        (2, "b@example.com", "{{ 7 * 6 }}{% include 'x' %}"),
        (3, "c@example.com", "<script>alert(1)</script>"),
        (4, "d@bücher.example", "Jürgen Größe"),
        (
            5,
            "e@example.com",
            "--boundary\r\nContent-Type: text/html\r\n\r\n<b>x</b>",
        ),
    ];
    for (id, email, name) in evil {
        let attrs = serde_json::json!({ "first_name": name })
            .to_string()
            .replace('\'', "''");
        w.exec(&format!("INSERT INTO subscribers (id, email, attributes, created_at) VALUES ({id}, '{email}', '{attrs}', 'x')")).await;
    }
    let sink = util::sink(Faults::default()).await;
    let path = w.campaign(
        "evil",
        "Hi {{ first_name }}",
        "Dear {{ first_name }},",
        Some("<p>Dear {{ first_name }}</p>"),
        "[message.headers]\nX-Name = \"{{ first_name }}\"\n",
    );
    std::fs::write(
        &path,
        std::fs::read_to_string(&path)
            .unwrap()
            .replace("[message]\n", "[message]\nto_name = \"{{ first_name }}\"\n"),
    )
    .unwrap();
    let cfg = w.config(&path, Some(&sink), 2);
    let summary = blast::commands::send(&cfg, Mode::Quiet, pending())
        .await
        .unwrap();
    assert_eq!(summary.sent, 5, "{summary:?}");
    let received = sink.received();
    assert_eq!(received.len(), 5);
    for r in &received {
        assert_eq!(r.rcpt_to.len(), 1);
        let names = header_names(&r.data);
        assert!(!names.iter().any(|h| h == "bcc"), "{names:?}");
        assert_eq!(
            names.iter().filter(|h| *h == "content-type").count(),
            1,
            "{names:?}"
        );
        let head = String::from_utf8_lossy(&r.data)
            .split("\r\n\r\n")
            .next()
            .unwrap()
            .to_string();
        assert!(head.is_ascii(), "headers must be 7-bit: {head}");
        let body = String::from_utf8_lossy(&r.data);
        let html = body
            .split("Content-Type: text/html")
            .nth(1)
            .expect("an HTML part");
        assert!(!html.contains("<script>"), "HTML must be escaped: {html}");
    }
    assert!(received
        .iter()
        .any(|r| r.rcpt_to[0] == "d@xn--bcher-kva.example"));
    let tpl = received
        .iter()
        .find(|r| r.rcpt_to[0] == "b@example.com")
        .unwrap();
    let tpl = String::from_utf8_lossy(&tpl.data);
    assert!(
        tpl.contains("Dear {{ 7 * 6 }}{% include 'x' %},"),
        "template syntax in data is printed: {tpl}"
    );
    let script = received
        .iter()
        .find(|r| r.rcpt_to[0] == "c@example.com")
        .unwrap();
    assert!(String::from_utf8_lossy(&script.data).contains("&lt;script&gt;"));
    sink.shutdown().await;
}

/// `--dry-run` writes one .eml per recipient and records nothing.
#[tokio::test]
async fn dry_run_writes_files_and_records_nothing() {
    let w = World::new(Backend::Sqlite).await;
    w.seed(20).await;
    let path = w.campaign("dry", "Hi {{ first_name }}", "x {{ token }}", None, "");
    let mut cfg = w.config(&path, None, 2);
    let out = w.path("out");
    cfg.dry_run = Some(out.clone());
    let summary = blast::commands::send(&cfg, Mode::Quiet, pending())
        .await
        .unwrap();
    assert_eq!(summary.sent, 20);
    let eml = std::fs::read_to_string(out.join("7.eml")).unwrap();
    assert!(
        eml.contains("Subject: Hi Name7") && eml.contains("tok-7-49"),
        "{eml}"
    );
    assert_eq!(std::fs::read_dir(&out).unwrap().count(), 20);
    let db = w.db().await;
    assert!(
        ledger_rows(&db, "dry").await.is_empty(),
        "dry-run must not mark anyone sent"
    );
}

/// Issue 12: an audience query that returns every id twice (a JOIN) sends
/// each recipient one message, within a page and across page boundaries,
/// and the ledger batch never fails on the copies.
async fn duplicate_ids(backend: Backend) {
    let n = 500;
    let w = World::new(backend).await;
    w.seed(n).await;
    let sink = util::sink(Faults::default()).await;
    let path = w.campaign("dups", "Hi {{ id }}", "Hello {{ email }}", None, "");
    let toml = std::fs::read_to_string(&path).unwrap().replace(
        "table = \"subscribers\"",
        "query = \"SELECT s.* FROM subscribers s JOIN (SELECT 1 AS k UNION ALL SELECT 2 AS k) twice ON 1 = 1\"\nbatch_size = 7",
    );
    std::fs::write(&path, toml).unwrap();
    let cfg = w.config(&path, Some(&sink), 4);
    let summary = blast::commands::send(&cfg, Mode::Quiet, pending())
        .await
        .unwrap();
    assert_eq!((summary.sent, summary.failed), (n as u64, 0), "{summary:?}");
    let per = util::per_recipient(&sink.received());
    assert_eq!(per.len(), n as usize);
    assert!(per.values().all(|&c| c == 1), "someone got two messages");
    let db = w.db().await;
    assert_eq!(ledger_rows(&db, "dups").await.len(), n as usize);
    db.close().await;
    sink.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_ids_are_sent_once_sqlite() {
    duplicate_ids(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_ids_are_sent_once_postgres() {
    duplicate_ids(Backend::Postgres).await;
}

/// Issue 13: a dry run leaves the database exactly as it found it: no
/// campaign row (so no audience fixed), no key; subscribers added after it
/// are part of the real send.
#[tokio::test]
async fn a_dry_run_leaves_the_database_as_it_found_it() {
    let w = World::new(Backend::Sqlite).await;
    w.seed(10).await;
    let snapshot = |w: &World| {
        let url = w.url.clone();
        async move {
            let db = blast::db::Db::connect(&url).await.unwrap();
            let mut out = Vec::new();
            for table in [
                "blast_campaigns",
                "blast_settings",
                "blast_deliveries",
                "blast_claims",
                "blast_workers",
                "blast_suppressions",
            ] {
                let n: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
                    "SELECT COUNT(*) FROM {table}"
                )))
                .fetch_one(db.pool())
                .await
                .unwrap();
                out.push((table, n));
            }
            db.close().await;
            out
        }
    };
    let before = snapshot(&w).await;
    let path = w.campaign("dry2", "Hi {{ first_name }}", "x", None, "");
    let mut cfg = w.config(&path, None, 2);
    cfg.dry_run = Some(w.path("out"));
    let s = blast::commands::send(&cfg, Mode::Quiet, pending())
        .await
        .unwrap();
    assert_eq!(s.sent, 10);
    assert_eq!(snapshot(&w).await, before, "a dry run writes nothing");

    // Ten more subscribers arrive; the real send includes them.
    w.exec(
        "INSERT INTO subscribers (id, email, attributes, created_at) \
         SELECT id + 10, 'late' || id || '@example.com', attributes, created_at FROM subscribers",
    )
    .await;
    let sink = util::sink(Faults::default()).await;
    let cfg = w.config(&path, Some(&sink), 2);
    let s = blast::commands::send(&cfg, Mode::Quiet, pending())
        .await
        .unwrap();
    assert_eq!(s.sent, 20, "{s:?}");
}

/// Issue 14: with a relay that offers 8BITMIME, non-ASCII parts go as
/// `8bit` (no encoding work) and arrive as written; a relay without it
/// gets quoted-printable.
#[tokio::test]
async fn non_ascii_parts_go_8bit_only_to_a_relay_that_takes_them() {
    for eight_bit in [true, false] {
        let w = World::new(Backend::Sqlite).await;
        w.seed(3).await;
        let sink = blast::sink::Sink::start(blast::sink::SinkConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            keep_messages: true,
            eight_bit_mime: eight_bit,
            ..Default::default()
        })
        .await
        .unwrap();
        let path = w.campaign(
            "utf8",
            "Grüße",
            "Grüße, {{ first_name }} – ça va?",
            None,
            "",
        );
        let cfg = w.config(&path, Some(&sink), 1);
        let s = blast::commands::send(&cfg, Mode::Quiet, pending())
            .await
            .unwrap();
        assert_eq!(s.sent, 3);
        let got = sink.received();
        let msg = String::from_utf8_lossy(&got[0].data).into_owned();
        // MAIL FROM says BODY=8BITMIME exactly when a part went as 8bit.
        assert!(got.iter().all(|m| m.eight_bit == eight_bit), "{got:?}");
        if eight_bit {
            assert!(msg.contains("Content-Transfer-Encoding: 8bit"), "{msg}");
            assert!(msg.contains("Grüße, Name"), "{msg}");
        } else {
            assert!(
                msg.contains("Content-Transfer-Encoding: quoted-printable"),
                "{msg}"
            );
            assert!(msg.is_ascii(), "{msg}");
        }
    }
}
