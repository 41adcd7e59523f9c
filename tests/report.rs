//! `blast report` on a campaign sent into the in-process sink: its numbers
//! are the ledger's, its page draws one data point per figure, and headless
//! Chromium renders that page with every chart intact and no script.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use blast::sink::Faults;

use crate::util::{self, blast, Backend, World};

/// Sends 30 recipients (user5 refused with a reply carrying markup), sets
/// three rows' `mta_*` columns, and returns the world and campaign file.
async fn sent_campaign() -> (World, PathBuf) {
    let w = World::new(Backend::Sqlite).await;
    w.seed(30).await;
    let mut faults = Faults::default();
    faults.rcpt_replies.insert(
        "user5@example.com".into(),
        (
            550,
            "5.1.1".into(),
            "<script>alert(1)</script> no such user".into(),
        ),
    );
    let sink = util::sink(faults).await;
    let path = w.campaign("rep", "Hi {{ first_name }}", "x", None, "");
    let smtp = format!("smtp://{}", sink.local_addr());
    let out = tokio::task::spawn_blocking({
        let path = path.clone();
        move || {
            blast()
                .arg("send")
                .arg(&path)
                .args(["--smtp", &smtp, "--json"])
                .output()
                .unwrap()
        }
    })
    .await
    .unwrap();
    util::assert_exit(&out, 1);
    w.exec("UPDATE blast_deliveries SET mta_status = 'delivered', mta_delay_secs = 2 WHERE recipient_id IN (1, 2)").await;
    w.exec("UPDATE blast_deliveries SET mta_status = 'deferred', mta_delay_secs = 700 WHERE recipient_id = 3").await;
    (w, path)
}

/// One number from the ledger.
async fn scalar(w: &World, sql: &str) -> i64 {
    let db = w.db().await;
    let n: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_string()))
        .fetch_one(db.pool())
        .await
        .unwrap();
    db.close().await;
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn report_json_matches_the_ledger_and_html_is_written() {
    let (w, path) = sent_campaign().await;
    let out = blast()
        .arg("report")
        .arg(&path)
        .arg("--json")
        .output()
        .unwrap();
    util::assert_exit(&out, 0);
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let t = &r["totals"];
    for status in ["sent", "failed", "deferred", "suppressed", "unrendered"] {
        let n = scalar(
            &w,
            &format!("SELECT COUNT(*) FROM blast_deliveries WHERE status = '{status}'"),
        )
        .await;
        assert_eq!(t[status].as_i64(), Some(n), "{status}");
    }
    assert_eq!(
        (t["sent"].as_i64(), t["failed"].as_i64()),
        (Some(29), Some(1))
    );
    assert_eq!(
        (t["audience"].as_i64(), t["pending"].as_i64()),
        (Some(30), Some(0))
    );
    let per_minute: i64 = r["per_minute"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["n"].as_i64().unwrap())
        .sum();
    assert_eq!(per_minute, 30);
    assert_eq!(r["domains"][0]["domain"], "example.com");
    assert_eq!(r["domains"][0]["total"], 30);
    assert_eq!(r["replies"][0]["code"], 550);
    assert_eq!(r["replies"][0]["recipients"], 1);
    assert!(r["replies"][0]["reply"]
        .as_str()
        .unwrap()
        .contains("<script>"));
    assert_eq!(r["mta"].as_array().unwrap().len(), 2);
    // One worker (the host's name) wrote every row: no per-worker series.
    let host = blast::worker::hostname().replace('\'', "''");
    let sql = format!("SELECT COUNT(*) FROM blast_deliveries WHERE worker = '{host}'");
    assert_eq!(scalar(&w, &sql).await, 30);
    assert_eq!(r["workers"], 1);
    assert_eq!(r["per_minute_by_worker"].as_array().map(Vec::len), Some(0));

    // By name with --database, the same figures (pending unknown).
    let out = blast()
        .args(["report", "rep", "--json", "--database", &w.url])
        .output()
        .unwrap();
    let by_name: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(by_name["totals"]["sent"], 29);
    assert!(by_name["totals"]["pending"].is_null());

    // status --by-domain: a header and one aligned row.
    let out = blast()
        .arg("status")
        .arg(&path)
        .arg("--by-domain")
        .output()
        .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2, "{text}");
    assert!(lines[0].starts_with("domain"), "{text}");
    assert_eq!(lines[0].len(), lines[1].len(), "{text}");
    assert!(
        lines[1].starts_with("example.com") && lines[1].ends_with("0"),
        "{text}"
    );

    // HTML into the current directory by default, its path printed.
    let out = blast()
        .arg("report")
        .arg(&path)
        .current_dir(w.dir.path())
        .output()
        .unwrap();
    util::assert_exit(&out, 0);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "rep-report.html"
    );
    let page = std::fs::read_to_string(w.path("rep-report.html")).unwrap();
    assert!(!page.contains("<script"), "a reply became markup");
    assert!(page.contains("&lt;script&gt;alert(1)&lt;/script&gt;"));
}

/// Headless Chromium loads the page: every chart has its data points, and
/// the DOM holds no script; a page of two workers has their lines and
/// legend, names as text. Screenshots land in the target directory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn report_renders_in_headless_chromium() {
    let chromium = ["chromium", "chromium-browser", "google-chrome"]
        .into_iter()
        .find(|c| {
            Command::new(c)
                .arg("--version")
                .output()
                .is_ok_and(|o| o.status.success())
        })
        .expect(
            "report test: Chromium is required (apt-get install -y chromium; .ci/run installs it)",
        );
    let (w, path) = sent_campaign().await;
    let html = w.path("page.html");
    let out = blast()
        .arg("report")
        .arg(&path)
        .arg("--html")
        .arg(&html)
        .output()
        .unwrap();
    util::assert_exit(&out, 0);
    let out = blast()
        .arg("report")
        .arg(&path)
        .arg("--json")
        .output()
        .unwrap();
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let expected = [
        ("per-minute", r["per_minute"].as_array().unwrap().len()),
        ("domains", 1),
        ("per-day", 0),
        ("mta", 2),
        ("mta-delays", 6),
    ];
    let url = format!("file://{}", html.display());
    let profile = tempfile::tempdir().unwrap();
    let dom = run_chromium(chromium, profile.path(), &["--dump-dom", &url]);
    assert!(!dom.contains("<script"), "the rendered page holds a script");
    assert!(
        dom.contains("&lt;script&gt;alert(1)&lt;/script&gt;"),
        "the reply is not shown as text"
    );
    for (chart, n) in expected {
        let start = dom
            .find(&format!("data-chart=\"{chart}\""))
            .unwrap_or_else(|| panic!("chart {chart} missing from the rendered DOM"));
        let end = start + dom[start..].find("</svg>").unwrap();
        assert_eq!(
            dom[start..end].matches("data-point=").count(),
            n,
            "chart {chart}"
        );
    }
    let shot = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .unwrap()
        .join("report-screenshot.png");
    screenshot(chromium, &url, &shot, "1280,2400");

    // Two workers (one named with markup) and rows naming none: the
    // per-minute chart keeps its bars and gains a line and a legend entry
    // per series, the names as text.
    let w = World::new(Backend::Sqlite).await;
    known_ledger(&w).await;
    let html = w.path("workers.html");
    let out = blast()
        .args(["report", "rep", "--database", &w.url, "--html"])
        .arg(&html)
        .output()
        .unwrap();
    util::assert_exit(&out, 0);
    let url = format!("file://{}", html.display());
    let profile = tempfile::tempdir().unwrap();
    let dom = run_chromium(chromium, profile.path(), &["--dump-dom", &url]);
    let start = dom.find("data-chart=\"per-minute\"").unwrap();
    let chart = &dom[start..start + dom[start..].find("<h2>").unwrap()];
    assert_eq!(chart.matches("data-point=").count(), 2);
    assert_eq!(chart.matches("<polyline data-series=").count(), 3);
    assert_eq!(chart.matches("<li data-worker=").count(), 3);
    assert!(chart.contains("b&lt;i&gt; (3)</li>"), "{chart}");
    assert!(!chart.contains("<i>"), "a worker name became markup");
    let shot = shot.with_file_name("report-workers-screenshot.png");
    screenshot(chromium, &url, &shot, "1280,1000");
}

/// Has Chromium screenshot `url` into `shot` (a fresh file) at `size`
/// ("width,height") and checks that it wrote a PNG.
fn screenshot(chromium: &str, url: &str, shot: &Path, size: &str) {
    let _ = std::fs::remove_file(shot);
    let profile = tempfile::tempdir().unwrap();
    run_chromium(
        chromium,
        profile.path(),
        &[
            &format!("--screenshot={}", shot.display()),
            &format!("--window-size={size}"),
            url,
        ],
    );
    let png = std::fs::read(shot).expect("chromium wrote no screenshot");
    assert!(png.starts_with(b"\x89PNG"), "the screenshot is not a PNG");
}

/// Runs headless Chromium in its own process group with `args`, returns its
/// stdout; kills the whole group afterwards (and after 60 s) so no helper
/// process outlives the test.
fn run_chromium(bin: &str, profile: &Path, args: &[&str]) -> String {
    use std::os::unix::process::CommandExt;
    let child = Command::new(bin)
        .args(["--headless=new", "--no-sandbox", "--disable-gpu"])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .process_group(0)
        .spawn()
        .unwrap_or_else(|e| panic!("report test: cannot start {bin}: {e}"));
    let pgid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let out = rx.recv_timeout(Duration::from_secs(60));
    let _ = Command::new("kill")
        .args(["-KILL", "--", &format!("-{pgid}")])
        .output();
    let out = out
        .unwrap_or_else(|_| panic!("{bin} did not finish within 60 s"))
        .unwrap();
    assert!(
        out.status.success(),
        "{bin} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Writes the same small ledger (three domains, two minutes, refusals,
/// bounces, a complaint, an unsubscribe, MTA outcomes, two workers and a
/// row from before schema v8 that names none) into `w`'s database as
/// campaign `rep`.
async fn known_ledger(w: &World) {
    let db = w.db().await;
    let c = blast::ledger::open_campaign(&db, "rep", async { Ok(9) })
        .await
        .unwrap();
    db.close().await;
    let id = c.id;
    w.exec(&format!(
        "INSERT INTO blast_deliveries (campaign_id, recipient_id, email, status, smtp_code, reply, updated_at) VALUES \
         ({id}, 1, 'a@example.com', 'sent', 250, '250 ok', '2026-12-05T10:00:01.000Z'), \
         ({id}, 2, 'b@EXAMPLE.COM', 'sent', 250, '250 ok', '2026-12-05T10:00:30.000Z'), \
         ({id}, 3, '\"x@y\"@example.com', 'failed', 550, '550 5.1.1 <b>no</b>', '2026-12-05T10:00:59.000Z'), \
         ({id}, 4, 'd@example.com', 'deferred', 451, '451 4.3.0 later', '2026-12-05T10:01:00.000Z'), \
         ({id}, 5, 'e@b.org', 'failed', 550, '550 5.1.1 <b>no</b>', '2026-12-05T10:01:10.000Z'), \
         ({id}, 6, 'f@b.org', 'sent', 250, '250 ok', '2026-12-05T10:01:20.000Z'), \
         ({id}, 7, 'g@b.org', 'suppressed', NULL, NULL, '2026-12-05T10:01:30.000Z'), \
         ({id}, 8, 'h@c.net', 'sent', 250, '250 ok', '2026-12-05T10:01:41.000Z')"
    ))
    .await;
    w.exec(&format!(
        "INSERT INTO blast_bounces (campaign_id, recipient_id, address, kind, class, reason, source, message_hash, received_at) VALUES \
         ({id}, 1, 'a@example.com', 'bounce', 'hard', 'x', 's', 'h1', '2026-12-05T11:00:00.000Z'), \
         ({id}, 1, 'a@example.com', 'bounce', 'hard', 'x', 's', 'h2', '2026-12-06T11:00:00.000Z'), \
         ({id}, 6, 'f@b.org', 'complaint', 'complaint', 'x', 's', 'h3', '2026-12-06T12:00:00.000Z')"
    ))
    .await;
    w.exec(&format!(
        "INSERT INTO blast_suppressions (address, reason, source, created_at) VALUES \
         ('h@c.net', 'unsubscribe', 'https:campaign={id}', '2026-12-07T09:00:00.000Z')"
    ))
    .await;
    w.exec(&format!("UPDATE blast_deliveries SET mta_status = 'delivered', mta_delay_secs = 0.5 WHERE campaign_id = {id} AND recipient_id IN (1, 2)")).await;
    w.exec(&format!("UPDATE blast_deliveries SET mta_status = 'expired', mta_delay_secs = 4000 WHERE campaign_id = {id} AND recipient_id = 6")).await;
    w.exec(&format!("UPDATE blast_deliveries SET worker = 'a' WHERE campaign_id = {id} AND recipient_id IN (1, 2, 4, 5)")).await;
    w.exec(&format!("UPDATE blast_deliveries SET worker = 'b<i>' WHERE campaign_id = {id} AND recipient_id IN (3, 6, 7)")).await;
}

/// The report's SQL is one text for both backends: the same ledger gives
/// the same report on SQLite and PostgreSQL, and its figures are the known ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_report_on_sqlite_and_postgres() {
    let mut reports = Vec::new();
    for backend in [Backend::Sqlite, Backend::Postgres] {
        let w = World::new(backend).await;
        known_ledger(&w).await;
        reports.push(blast::commands::report(&w.url, "rep", None).await.unwrap());
    }
    let r = &reports[0];
    assert_eq!(reports[0], reports[1]);
    let t = &r.totals;
    assert_eq!(
        (t.audience, t.sent, t.failed, t.deferred, t.suppressed),
        (8, 4, 2, 1, 1)
    );
    assert_eq!(
        (t.bounced, t.complained, t.unsubscribed, t.peak_per_minute),
        (1, 1, 1, 5)
    );
    assert_eq!(t.duration_secs, 100.0);
    let d: Vec<_> = r
        .domains
        .iter()
        .map(|d| (d.domain.as_str(), d.total, d.bounced))
        .collect();
    assert_eq!(
        d,
        vec![("example.com", 4, 1), ("b.org", 3, 0), ("c.net", 1, 0)]
    );
    assert_eq!((r.replies[0].code, r.replies[0].recipients), (Some(550), 2));
    assert_eq!(r.per_day.len(), 3);
    let delays: Vec<i64> = r.mta_delays.iter().map(|c| c.n).collect();
    assert_eq!(delays, vec![2, 0, 0, 0, 0, 1]);
    // Two workers: a series each plus one for the row naming none (in the
    // same order on both backends, though they sort NULL differently),
    // adding up to the total minute by minute.
    let per_minute: Vec<i64> = r.per_minute.iter().map(|c| c.n).collect();
    assert_eq!(per_minute, [3, 5]);
    assert_eq!((r.workers, r.worker_series), (2, 3));
    let series: Vec<(Option<&str>, Vec<i64>)> = r
        .per_minute_by_worker
        .iter()
        .map(|s| (s.worker.as_deref(), s.points.iter().map(|p| p.n).collect()))
        .collect();
    assert_eq!(
        series,
        [
            (Some("a"), vec![2, 2]),
            (Some("b<i>"), vec![1, 2]),
            (None, vec![0, 1])
        ]
    );
    for (i, total) in per_minute.iter().enumerate() {
        let sum: i64 = r.per_minute_by_worker.iter().map(|s| s.points[i].n).sum();
        assert_eq!(sum, *total, "minute {i}");
    }
}
