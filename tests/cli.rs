//! The binary as an operator runs it.

use std::process::Command;

use blast::sink::Faults;

use crate::util::{self, blast, Backend, World};

/// Exit 0 when everyone was accepted, a JSON summary on stdout, and status counts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_status_and_exit_codes() {
    let w = World::new(Backend::Sqlite).await;
    w.seed(30).await;
    let mut faults = Faults::default();
    faults.rcpt_replies.insert(
        "user5@example.com".into(),
        (550, "5.1.1".into(), "No such user".into()),
    );
    let sink = util::sink(faults).await;
    let path = w.campaign("cli", "Hi {{ first_name }}", "x", None, "");
    let smtp = format!("smtp://{}", sink.local_addr());

    let out = tokio::task::spawn_blocking({
        let (path, smtp) = (path.clone(), smtp.clone());
        move || {
            blast()
                .arg("send")
                .arg(&path)
                .args(["--smtp", &smtp, "--limit", "4", "--json"])
                .output()
                .unwrap()
        }
    })
    .await
    .unwrap();
    util::assert_exit(&out, 0);
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["sent"], 4);

    // user5 is refused: exit code 1.
    let out = tokio::task::spawn_blocking({
        let (path, smtp) = (path.clone(), smtp.clone());
        move || {
            blast()
                .arg("send")
                .arg(&path)
                .args(["--smtp", &smtp, "--progress", "plain"])
                .output()
                .unwrap()
        }
    })
    .await
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("sent 25 failed 1"), "{stderr}");

    let out = blast()
        .arg("status")
        .arg(&path)
        .arg("--json")
        .output()
        .unwrap();
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (
            status["sent"].as_i64(),
            status["failed"].as_i64(),
            status["pending"].as_i64()
        ),
        (Some(29), Some(1), Some(0))
    );
    assert_eq!(status["state"], "finished");
}

/// Fatal errors exit 2 with a message naming the problem.
#[test]
fn fatal_errors_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("bad.toml");
    std::fs::write(&p, "name = \"x\"\ndatabase = \"sqlite://x.db\"\n[audience]\ntable = \"subscribers\"\n[unsubscribe]\nurl = \"https://l.example.com/u/{token}\"\n[message]\nfrom = \"a@b.c\"\nsubject = \"s\"\ntext = \"missing.txt\"\n").unwrap();
    let out = blast().arg("send").arg(&p).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("bad.toml") && stderr.contains("message.text"),
        "{stderr}"
    );
}

/// `blast preview --id` prints that recipient's message.
#[tokio::test]
async fn preview_prints_one_recipient() {
    let w = World::new(Backend::Sqlite).await;
    w.seed(5).await;
    let path = w.campaign("pv", "Hi {{ first_name }}", "Token {{ token }}", None, "");
    let out = blast()
        .arg("preview")
        .arg(&path)
        .args(["--id", "3"])
        .output()
        .unwrap();
    util::assert_exit(&out, 0);
    let msg = String::from_utf8_lossy(&out.stdout);
    assert!(
        msg.contains("Subject: Hi Name3")
            && msg.contains("Token tok-3-21")
            && msg.contains("user3@example.com"),
        "{msg}"
    );
    let out = blast()
        .arg("preview")
        .arg(&path)
        .args(["--id", "99"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("99"));
}

/// SIGTERM stops gracefully: in-flight transactions finish, every message the
/// sink accepted is in the ledger, the summary says the run was stopped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_flushes_the_ledger() {
    signal_flushes_the_ledger("-TERM").await;
}

/// Issue 13: SIGHUP (a dropped SSH session) is a graceful stop too, not a
/// kill with answers unrecorded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_flushes_the_ledger() {
    signal_flushes_the_ledger("-HUP").await;
}

async fn signal_flushes_the_ledger(signal: &str) {
    let w = World::new(Backend::Sqlite).await;
    w.seed(2000).await;
    let sink = util::slow_sink(std::time::Duration::from_millis(2)).await;
    let path = w.campaign("term", "Hi", "x", None, "");
    let smtp = format!("smtp://{}", sink.local_addr());
    let child = blast()
        .arg("send")
        .arg(&path)
        .args(["--smtp", &smtp, "--concurrency", "4", "--progress", "plain"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    util::wait_for(&sink, 200).await;
    let out = util::stop_with(signal, child).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    if signal == "-TERM" {
        // After SIGHUP the terminal is gone: nothing more is printed.
        assert!(stderr.contains("stopped before the end"), "{stderr}");
    }
    let accepted = sink.stats().messages;
    assert!(accepted < 2000, "stopped early");
    let db = w.db().await;
    let rows = crate::util::ledger_rows(&db, "term").await;
    assert_eq!(
        rows.len() as u64,
        accepted,
        "every accepted message is recorded"
    );
}

/// SIGTERM during the one-time address-key backfill (schema v6) of a large
/// database stops `blast send` at once, before anything is sent, instead of
/// running the backfill to its end; the batch under way rolls back and the
/// next command goes on from there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_the_address_key_backfill_stops_at_once() {
    const N: i64 = 60_000;
    let w = World::new(Backend::Sqlite).await;
    w.seed(N).await;
    w.exec("DELETE FROM blast_settings WHERE key = 'address_keys'")
        .await;
    let sink = util::sink(Faults::default()).await;
    let path = w.campaign("rekey", "Hi", "x", None, "");
    let smtp = format!("smtp://{}", sink.local_addr());
    let log = w.path("stderr.log");
    let child = blast()
        .arg("send")
        .arg(&path)
        .args(["--smtp", &smtp, "--progress", "plain"])
        .env("BLAST_LOG", "info")
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    util::wait_until(
        "the backfill to start",
        std::time::Duration::from_millis(10),
        || async {
            let seen = std::fs::read_to_string(&log).unwrap_or_default();
            match seen.contains("filling in address keys") {
                true => Ok(()),
                false => Err(seen),
            }
        },
    )
    .await;
    let out = util::stop_with("-TERM", child).await;
    let stderr = std::fs::read_to_string(&log).unwrap();
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("stopped while opening the database: nothing was sent"),
        "{stderr}"
    );
    assert_eq!(sink.stats().messages, 0);
    // Read without blast's own open, which would run the backfill.
    let pool = sqlx::SqlitePool::connect(&w.url).await.unwrap();
    let (unkeyed, done): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT COUNT(*) FROM subscribers WHERE email_key IS NULL), \
                (SELECT COUNT(*) FROM blast_settings WHERE key = 'address_keys')",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    pool.close().await;
    assert!(unkeyed > 0, "the backfill ran to its end after SIGTERM");
    assert_eq!(done, 0);
    let campaigns: i64 = {
        let db = w.db().await; // finishes the backfill
        let n = sqlx::query_scalar("SELECT COUNT(*) FROM blast_campaigns")
            .fetch_one(db.pool())
            .await
            .unwrap();
        let unkeyed: i64 =
            sqlx::query_scalar("SELECT COUNT(*) FROM subscribers WHERE email_key IS NULL")
                .fetch_one(db.pool())
                .await
                .unwrap();
        assert_eq!(unkeyed, 0, "the next open finishes the backfill");
        db.close().await;
        n
    };
    assert_eq!(campaigns, 0, "stopped before the campaign was created");
}

/// A second SIGINT abandons transactions in flight instead of waiting for a
/// slow MTA, and the ledger is still flushed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_sigint_stops_faster() {
    let w = World::new(Backend::Sqlite).await;
    w.seed(200).await;
    let sink = util::slow_sink(std::time::Duration::from_secs(3)).await;
    let path = w.campaign("twice", "Hi", "x", None, "");
    let smtp = format!("smtp://{}", sink.local_addr());
    let child = blast()
        .arg("send")
        .arg(&path)
        .args(["--smtp", &smtp, "--concurrency", "4", "--progress", "none"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Let the first transactions reach the slow end of DATA.
    tokio::time::sleep(std::time::Duration::from_millis(700)).await;
    let pid = child.id().to_string();
    assert!(Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .unwrap()
        .success());
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    assert!(Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .unwrap()
        .success());
    let asked = std::time::Instant::now();
    let out = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap())
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        asked.elapsed() < std::time::Duration::from_millis(2000),
        "{:?} {stderr}",
        asked.elapsed()
    );
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("second signal"), "{stderr}");
    let db = w.db().await;
    let rows = crate::util::ledger_rows(&db, "twice").await;
    assert!(
        rows.is_empty(),
        "nothing was answered, nothing recorded: {rows:?}"
    );
}

/// The operator's path for a relay off this host, with both ends as
/// processes: `blast sink` offering STARTTLS and requiring AUTH, and
/// `blast send` trusting its CA through `ca_file` with the password from
/// the environment. Without the password, `blast send` exits 2 naming the
/// variable.
#[test]
fn send_over_starttls_with_auth_between_two_processes() {
    let dir = tempfile::tempdir().unwrap();
    let pki = crate::relays::pki();
    pki.write_to(dir.path());
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let sink = blast()
        .args([
            "sink",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--tls-cert",
        ])
        .arg(dir.path().join("cert.pem"))
        .arg("--tls-key")
        .arg(dir.path().join("key.pem"))
        .args(["--auth-user", "bulk"])
        .env("BLAST_SINK_PASSWORD", "pw 1")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let started = std::time::Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(started.elapsed().as_secs() < 10, "blast sink did not start");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let rt = tokio::runtime::Runtime::new().unwrap();
    let w = rt.block_on(World::new(Backend::Sqlite));
    rt.block_on(w.seed(12));
    std::fs::copy(dir.path().join("ca.pem"), w.path("ca.pem")).unwrap();
    let extra = format!(
        "[delivery]\nconcurrency = 2\nsmtp = [{{ url = \"smtp://bulk@127.0.0.1:{port}\", tls = \"starttls\", ca_file = \"ca.pem\", password_env = \"RELAY_PW\" }}]\n"
    );
    let path = w.campaign("cli-tls", "Hi", "Hello {{ first_name }}", None, &extra);
    let out = blast()
        .arg("send")
        .arg(&path)
        .arg("--json")
        .env_remove("RELAY_PW")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("RELAY_PW"), "{stderr}");
    // `blast check` reaches the relay as a send would, and sends nothing.
    let out = blast()
        .arg("check")
        .arg(&path)
        .env("RELAY_PW", "pw 1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains(": ok in ")
            && stdout.contains("TLSv1_3")
            && stdout.contains("AUTH PLAIN accepted")
            && stdout.contains("PIPELINING"),
        "{stdout}"
    );
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let closed_url = format!("smtp://{}", closed.local_addr().unwrap());
    drop(closed);
    let out = blast()
        .arg("check")
        .arg(&path)
        .args(["--smtp", &closed_url, "--json"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let line: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(line["ok"], false, "{line}");
    assert!(
        line["detail"].as_str().unwrap().contains("connect"),
        "{line}"
    );
    let out = blast()
        .arg("send")
        .arg(&path)
        .arg("--json")
        .env("RELAY_PW", "pw 1")
        .output()
        .unwrap();
    util::assert_exit(&out, 0);
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["sent"], 12);
    // SIGTERM: the sink prints its count on the way out.
    let _ = Command::new("kill").arg(sink.id().to_string()).status();
    let sink_out = sink.wait_with_output().unwrap();
    let log = String::from_utf8_lossy(&sink_out.stderr);
    assert!(log.contains("12 messages"), "{log}");
}

/// Issue 13: `blast check --render` renders every recipient, sends and
/// records nothing, and lists the errors with the first row each hit.
#[tokio::test]
async fn check_render_lists_render_errors_and_records_nothing() {
    let w = World::new(Backend::Sqlite).await;
    w.seed(30).await;
    // Ten rows lack the variable the subject uses.
    w.exec("UPDATE subscribers SET attributes = '{}' WHERE id > 20")
        .await;
    let path = w.campaign("render", "Hi {{ first_name }}", "x", None, "");
    let out = util::blast()
        .args(["check", "--render", "--json"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let s: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(s["sent"], 20, "{s}");
    assert_eq!(
        s["unrendered"], 10,
        "every recipient rendered, no pause: {s}"
    );
    assert!(s["breaker"].is_null(), "{s}");
    let errors = s["render_errors"].as_array().unwrap();
    assert_eq!(errors.len(), 1, "{s}");
    assert_eq!(errors[0]["first_recipient"], 21);
    assert_eq!(errors[0]["recipients"], 10);
    assert!(errors[0]["error"].as_str().unwrap().contains("first_name"));
    let db = w.db().await;
    let campaigns: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM blast_campaigns")
        .fetch_one(db.pool())
        .await
        .unwrap();
    assert_eq!(campaigns, 0, "nothing recorded");
}
