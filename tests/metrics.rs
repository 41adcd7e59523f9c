//! Prometheus metrics: a run's scrape, read by the Prometheus project's own
//! OpenMetrics parser, counts exactly what the run's summary and ledger
//! say; `blast send --metrics` and `run-due --metrics` serve it while they
//! send; `blast serve` counts unsubscribes and the database's bounces.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use blast::config::{Concurrency, Config, Overrides};
use blast::metrics::{Endpoint, Metrics, CONTENT_TYPE};
use blast::sink::Faults;
use tokio_util::sync::CancellationToken;

use crate::util::{self, blast, http, sink, slow_sink, wait_until, Backend, Server, World};

/// One sample of a scrape.
#[derive(Debug, Clone, serde::Deserialize)]
struct Sample {
    name: String,
    labels: HashMap<String, String>,
    value: f64,
}

/// The Python with `prometheus_client` (Debian's python3-prometheus-client,
/// which `.ci/run` installs): the system one first, as a pyenv or venv
/// `python3` on the PATH may not see Debian's packages.
fn python() -> &'static str {
    for p in ["/usr/bin/python3", "python3"] {
        let ok = Command::new(p)
            .args(["-c", "import prometheus_client"])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            return p;
        }
    }
    panic!(
        "no python3 with prometheus_client: install python3-prometheus-client \
         (.ci/run does) to check the metrics with Prometheus's own parser"
    );
}

/// `text` parsed by Prometheus's OpenMetrics parser; a malformed
/// exposition fails the test with the parser's message.
fn parse(text: &str) -> Vec<Sample> {
    use std::io::Write;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/openmetrics.py");
    let mut child = Command::new(python())
        .arg(script)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the OpenMetrics parser refused the scrape: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// `GET /metrics` on `addr`, parsed.
async fn scrape(addr: SocketAddr) -> Vec<Sample> {
    let (status, head, body) = http(addr, "GET", "/metrics", "").await;
    assert_eq!(status, 200, "{head}\n{body}");
    let ct = head
        .lines()
        .find_map(|l| l.strip_prefix("content-type: "))
        .expect("a content type");
    assert_eq!(ct, CONTENT_TYPE);
    parse(&body)
}

/// The sum of sample `name` over the samples whose labels include `with`.
fn sum(samples: &[Sample], name: &str, with: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|s| s.name == name)
        .filter(|s| {
            with.iter()
                .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(v))
        })
        .map(|s| s.value)
        .sum()
}

/// The distinct values of label `label` on sample `name`.
fn values_of(samples: &[Sample], name: &str, label: &str) -> Vec<String> {
    let mut v: Vec<String> = samples
        .iter()
        .filter(|s| s.name == name)
        .filter_map(|s| s.labels.get(label).cloned())
        .collect();
    v.sort();
    v.dedup();
    v
}

/// 60 subscribers plus a row without a first name (cannot render) and a
/// row whose address is no address; user3 suppressed before the run.
async fn audience(w: &World) {
    w.seed(60).await;
    let cast = if w.backend == Backend::Postgres {
        "::jsonb"
    } else {
        ""
    };
    w.exec(&format!(
        "INSERT INTO subscribers (id, email, attributes, created_at) VALUES \
         (61, 'user61@example.com', '{{}}'{cast}, '2026-01-01T00:00:00.000Z'), \
         (62, 'not an address', '{{\"first_name\":\"X\"}}'{cast}, '2026-01-01T00:00:00.000Z')"
    ))
    .await;
    let db = w.db().await;
    blast::suppress::add(&db, "user3@example.com", "operator", "operator")
        .await
        .unwrap();
    db.close().await;
}

async fn scrape_after_a_run_counts_what_its_summary_says(backend: Backend) {
    let w = World::new(backend).await;
    audience(&w).await;
    // Two relays: both refuse user5 for good and defer user9; the first
    // also defers user7 (which the second then takes).
    let mut faults = Faults::default();
    let reply = |c: u16, e: &str| (c, e.to_string(), "no".to_string());
    faults
        .rcpt_replies
        .insert("user5@example.com".into(), reply(550, "5.1.1"));
    faults
        .rcpt_replies
        .insert("user7@example.com".into(), reply(451, "4.3.0"));
    faults
        .rcpt_replies
        .insert("user9@example.com".into(), reply(451, "4.3.0"));
    let a = sink(faults).await;
    let mut faults = Faults::default();
    faults
        .rcpt_replies
        .insert("user5@example.com".into(), reply(550, "5.1.1"));
    faults
        .rcpt_replies
        .insert("user9@example.com".into(), reply(451, "4.3.0"));
    let b = sink(faults).await;
    let path = w.campaign(
        "met",
        "Hi {{ first_name }}",
        "Hello {{ first_name }}",
        None,
        "",
    );
    let mut cfg = Config::load(
        &path,
        &Overrides {
            smtp: vec![
                format!("smtp://{}", a.local_addr()),
                format!("smtp://{}", b.local_addr()),
            ],
            concurrency: Some(Concurrency::Fixed(4)),
            ..Default::default()
        },
    )
    .unwrap();
    // The operator's text in labels: escaped, so the scrape still parses
    // and the parser gives back the name as it was.
    cfg.worker = "cron \"nightly\" \\ b".to_string();
    let metrics = Metrics::new();
    let summary = blast::commands::send_observed(
        &cfg,
        blast::progress::Mode::Quiet,
        std::future::pending(),
        CancellationToken::new(),
        Some(metrics.clone()),
    )
    .await
    .unwrap();
    assert_eq!(
        (summary.sent, summary.failed, summary.deferred),
        (57, 2, 1),
        "{summary:?}"
    );
    assert_eq!((summary.suppressed, summary.unrendered), (1, 1));

    let endpoint = Endpoint::start("127.0.0.1:0".parse().unwrap(), metrics)
        .await
        .unwrap();
    let s = scrape(endpoint.addr).await;
    endpoint.stop().await;

    let run = [("campaign", "met"), ("worker", cfg.worker.as_str())];
    let outcome = |o: &str| {
        let mut with = run.to_vec();
        with.push(("outcome", o));
        sum(&s, "blast_messages_total", &with) as u64
    };
    for (name, want) in [
        ("sent", summary.sent),
        ("failed", summary.failed),
        ("deferred", summary.deferred),
        ("suppressed", summary.suppressed),
        ("unrendered", summary.unrendered),
        ("rerouted", summary.rerouted),
        ("possibly_duplicated", summary.possibly_duplicated),
        ("possibly_delivered", summary.possibly_delivered),
    ] {
        assert_eq!(
            outcome(name),
            want,
            "blast_messages_total{{outcome={name:?}}}"
        );
    }
    assert!(summary.rerouted >= 1, "user9 went on to the other relay");
    // Each relay's series, plus "" for what no relay saw (the address that
    // is none, the unrendered row, the suppression read with the page).
    let relays: Vec<String> = summary.relays.iter().map(|r| r.relay.clone()).collect();
    let mut want = relays.clone();
    want.push(String::new());
    want.sort();
    assert_eq!(values_of(&s, "blast_messages_total", "relay"), want);
    let on = |relay: &str, o: &str| {
        sum(
            &s,
            "blast_messages_total",
            &[("relay", relay), ("outcome", o)],
        ) as u64
    };
    assert_eq!(on("", "failed"), 1, "the address that is none");
    assert_eq!(
        on(&relays[0], "failed") + on(&relays[1], "failed"),
        1,
        "user5"
    );
    assert_eq!(
        on(&relays[0], "sent") + on(&relays[1], "sent"),
        summary.sent
    );
    // Sink counts agree with each relay's sent.
    assert_eq!(on(&relays[0], "sent"), a.stats().messages);
    assert_eq!(on(&relays[1], "sent"), b.stats().messages);

    // Transactions: one per answer from a relay.
    let transactions: u64 = summary.injectors.iter().map(|i| i.messages).sum();
    assert_eq!(
        sum(&s, "blast_smtp_transaction_seconds_count", &run) as u64,
        transactions
    );
    assert_eq!(
        sum(
            &s,
            "blast_smtp_transaction_seconds_bucket",
            &[("le", "+Inf")]
        ) as u64,
        transactions
    );
    // Rendered: everyone but the suppressed (its page said so) = 61.
    assert_eq!(sum(&s, "blast_render_seconds_count", &run), 61.0);
    // Every recipient's record went through the ledger's batches.
    let db = w.db().await;
    let rows: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM blast_deliveries")
        .fetch_one(db.pool())
        .await
        .unwrap();
    db.close().await;
    assert_eq!(rows, 62);
    assert_eq!(sum(&s, "blast_ledger_batch_rows_sum", &run), 62.0);
    assert!(sum(&s, "blast_ledger_flush_seconds_count", &run) >= 1.0);
    // Over, nothing pending, two injectors' limits per relay.
    assert_eq!(sum(&s, "blast_run_active", &run), 0.0);
    assert_eq!(sum(&s, "blast_recipients_pending", &run), 0.0);
    for r in &relays {
        assert_eq!(
            sum(&s, "blast_relay_concurrency_limit", &[("relay", r)]),
            2.0
        );
        assert_eq!(sum(&s, "blast_relay_in_flight", &[("relay", r)]), 0.0);
        assert_eq!(sum(&s, "blast_relay_circuit_open", &[("relay", r)]), 0.0);
    }
    assert_eq!(
        sum(
            &s,
            "blast_relay_congestion_marks_total",
            &[("kind", "deferred")]
        ) as u64,
        summary.relays.iter().map(|r| r.marks.deferred).sum::<u64>()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scrape_after_a_run_counts_what_its_summary_says_sqlite() {
    scrape_after_a_run_counts_what_its_summary_says(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scrape_after_a_run_counts_what_its_summary_says_postgres() {
    scrape_after_a_run_counts_what_its_summary_says(Backend::Postgres).await;
}

/// A port free a moment ago.
fn free_port() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

/// Runs `cmd` (a blast serving metrics at `addr`), scrapes it mid-run,
/// runs `during` (if any) while it still runs, and returns that scrape,
/// its output once it succeeded, and `during`'s output.
async fn scraped_while_running(
    mut cmd: Command,
    addr: SocketAddr,
    during: Option<Command>,
) -> (Vec<Sample>, Output, Option<Output>) {
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let s = scrape_mid_run(addr).await;
    let during = match during {
        Some(mut c) => Some(
            tokio::task::spawn_blocking(move || c.output().unwrap())
                .await
                .unwrap(),
        ),
        None => None,
    };
    let out = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap())
        .await
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    (s, out, during)
}

/// Scrapes `addr` until a run shows `sent` messages in flight (while the
/// binary sends), and returns that scrape.
async fn scrape_mid_run(addr: SocketAddr) -> Vec<Sample> {
    wait_until(
        "a scrape of a run under way",
        Duration::from_millis(100),
        || async move {
            if let Err(e) = tokio::net::TcpStream::connect(addr).await {
                return Err(format!("not listening yet: {e}"));
            }
            let s = scrape(addr).await;
            let sent = sum(&s, "blast_messages_total", &[("outcome", "sent")]);
            match sent >= 1.0 && sum(&s, "blast_run_active", &[]) == 1.0 {
                true => Ok(s),
                false => Err(format!("{sent} sent")),
            }
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_serves_metrics_while_it_sends() {
    let w = World::new(Backend::Sqlite).await;
    w.seed(40).await;
    let sink = slow_sink(Duration::from_millis(50)).await;
    let path = w.campaign("live", "Hi", "x", None, "");
    let addr = free_port();
    let smtp = format!("smtp://{}", sink.local_addr());
    let mut cmd = blast();
    cmd.arg("send")
        .arg(&path)
        .args([
            "--smtp",
            &smtp,
            "--concurrency",
            "1",
            "--json",
            "--progress",
            "none",
        ])
        .args(["--metrics", &addr.to_string()]);
    // Cron starting the same send again while this one runs.
    let mut again = blast();
    again
        .arg("send")
        .arg(&path)
        .args(["--smtp", &smtp, "--metrics", &addr.to_string()]);
    let (s, out, again) = scraped_while_running(cmd, addr, Some(again)).await;
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let sent_mid = sum(&s, "blast_messages_total", &[("outcome", "sent")]);
    assert!(sent_mid >= 1.0 && sent_mid < summary["sent"].as_f64().unwrap());
    assert_eq!(summary["sent"], 40);
    // Mid-run: 40 minus what was answered is pending; one connection.
    let pending = sum(&s, "blast_recipients_pending", &[("campaign", "live")]);
    assert!(pending > 0.0 && pending <= 40.0 - sent_mid, "{pending}");
    assert_eq!(sum(&s, "blast_relay_concurrency_limit", &[]), 1.0);
    // The second send had nothing to do: exit 0, not a failure on the port
    // the first one holds. The endpoint closes with the run.
    let again = again.unwrap();
    let err = String::from_utf8_lossy(&again.stderr);
    assert_eq!(again.status.code(), Some(0), "{err}");
    assert!(err.contains("nothing to do"), "{err}");
    assert!(std::net::TcpStream::connect(addr).is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_metrics_address_in_use_stops_the_send_before_it_starts() {
    let w = World::new(Backend::Sqlite).await;
    w.seed(3).await;
    let sink = sink(Faults::default()).await;
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let path = w.campaign(
        "taken",
        "Hi",
        "x",
        None,
        "[delivery]\nmetrics = \"nonsense\"\n",
    );
    let smtp = format!("smtp://{}", sink.local_addr());
    // A bad address in the file is named.
    let out = blast()
        .arg("send")
        .arg(&path)
        .args(["--smtp", &smtp])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("delivery.metrics") && err.contains("nonsense"),
        "{err}"
    );
    // `--metrics` wins over the file; an address in use stops the send.
    let out = blast()
        .arg("send")
        .arg(&path)
        .args(["--smtp", &smtp, "--metrics", &addr])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(0), "{err}");
    assert!(
        err.contains(&format!("metrics: cannot listen on {addr}")),
        "{err}"
    );
    assert_eq!(sink.stats().messages, 0, "nothing sent");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_due_serves_metrics_of_the_campaign_it_sends() {
    let w = World::new(Backend::Sqlite).await;
    w.seed(30).await;
    let sink = slow_sink(Duration::from_millis(50)).await;
    let extra = format!(
        "[delivery]\nsmtp = \"smtp://{}\"\nconcurrency = 1\n",
        sink.local_addr()
    );
    let path = w.campaign("due", "Hi", "x", None, &extra);
    let out = blast()
        .arg("schedule")
        .arg(&path)
        .args(["--at", &blast::clock::db_timestamp(blast::clock::now())])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let addr = free_port();
    let mut cmd = blast();
    cmd.args([
        "run-due",
        "--database",
        &w.url,
        "--progress",
        "none",
        "--json",
    ])
    .args(["--metrics", &addr.to_string(), "--worker", "cron-a"]);
    let (s, out, _) = scraped_while_running(cmd, addr, None).await;
    assert_eq!(
        values_of(&s, "blast_messages_total", "campaign"),
        vec!["due".to_string()]
    );
    assert_eq!(
        values_of(&s, "blast_messages_total", "worker"),
        vec!["cron-a".to_string()]
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("\"sent\":30"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_counts_unsubscribes_and_the_databases_bounces() {
    let w = World::new(Backend::Sqlite).await;
    w.seed(3).await;
    let sink = sink(Faults::default()).await;
    let path = w.campaign("srv", "Hi", "x", None, "");
    let summary = blast::commands::send(
        &w.config(&path, Some(&sink), 1),
        blast::progress::Mode::Quiet,
        std::future::pending(),
    )
    .await
    .unwrap();
    assert_eq!(summary.sent, 3);
    let tokens: Vec<String> = sink
        .received()
        .iter()
        .map(|m| {
            let lu = util::header(&m.data, "List-Unsubscribe").unwrap();
            let url = lu
                .split(['<', '>'])
                .find(|p| p.starts_with("https://"))
                .unwrap();
            url.rsplit('/').next().unwrap().to_string()
        })
        .collect();
    w.exec(
        "INSERT INTO blast_bounces (campaign_id, recipient_id, address, kind, class, reason, \
         source, message_hash, received_at) VALUES \
         (1, 2, 'user2@example.com', 'bounce', 'hard', 'x', 'maildir', 'h1', '2026-01-01T00:00:00.000Z'), \
         (1, 3, 'user3@example.com', 'bounce', 'soft', 'x', 'maildir', 'h2', '2026-01-01T00:00:00.000Z'), \
         (1, 3, 'user3@example.com', 'bounce', 'soft', 'x', 'maildir', 'h3', '2026-01-01T00:00:00.000Z')",
    )
    .await;
    let db = w.db().await;
    blast::suppress::add(&db, "user2@example.com", "hard bounce: 5.1.1 x", "bounce:1")
        .await
        .unwrap();

    // /metrics on its own listener: not on the public one.
    let side = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let side_addr = side.local_addr().unwrap();
    let server = Server::start_with(
        db.clone(),
        blast::serve::Options {
            metrics: Some(side),
        },
    )
    .await;
    let (status, _) = server
        .request("POST", &format!("/unsubscribe/{}", tokens[0]), "")
        .await;
    assert_eq!(status, 200);
    let (status, _) = server
        .request("POST", &format!("/unsubscribe/{}", tokens[0]), "")
        .await;
    assert_eq!(status, 200, "idempotent");
    let (status, _) = server
        .request("GET", &format!("/unsubscribe/{}", tokens[1]), "")
        .await;
    assert_eq!(status, 200);
    let (status, _) = server
        .request("POST", "/unsubscribe/forged-token", "")
        .await;
    assert_eq!(status, 404);
    assert_eq!(server.request("GET", "/metrics", "").await.0, 404);
    let s = scrape(side_addr).await;
    server.stop().await;
    db.close().await;

    let requests = |r: &str| sum(&s, "blast_unsubscribe_requests_total", &[("result", r)]);
    assert_eq!(requests("unsubscribed"), 2.0);
    assert_eq!(requests("page"), 1.0);
    assert_eq!(requests("invalid"), 1.0);
    let bounces = |class: &str| {
        sum(
            &s,
            "blast_bounces_total",
            &[("kind", "bounce"), ("class", class)],
        )
    };
    assert_eq!((bounces("hard"), bounces("soft")), (1.0, 2.0));
    let suppressed = |reason: &str, channel: &str| {
        sum(
            &s,
            "blast_suppressed_addresses",
            &[("reason", reason), ("channel", channel)],
        )
    };
    assert_eq!(suppressed("unsubscribe", "https"), 1.0);
    assert_eq!(suppressed("hard_bounce", "bounce"), 1.0);

    // Without its own listener, /metrics is on the public one.
    let server = Server::start(w.db().await).await;
    let s = scrape(server.addr).await;
    server.stop().await;
    assert_eq!(sum(&s, "blast_suppressed_addresses", &[]), 2.0);
}

/// The metric names (with their `_total`, `_bucket`... suffixes) in `s`.
fn names(s: &[Sample]) -> std::collections::BTreeSet<String> {
    s.iter().map(|s| s.name.clone()).collect()
}

/// Every `blast_...` name in a PromQL expression.
fn metric_names_in(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = expr;
    while let Some(at) = rest.find("blast_") {
        let name: String = rest[at..]
            .chars()
            .take_while(|c| c.is_ascii_lowercase() || *c == '_')
            .collect();
        rest = &rest[at + name.len()..];
        out.push(name);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_grafana_dashboard_asks_only_for_series_blast_exposes() {
    // A run with a queue probe (so the MTA's queue is exposed)...
    let w = World::new(Backend::Sqlite).await;
    w.seed(20).await;
    let sink = slow_sink(Duration::from_millis(20)).await;
    let path = w.campaign(
        "dash",
        "Hi",
        "x",
        None,
        "[delivery]\nqueue_probe = \"echo 3\"\n",
    );
    let metrics = Metrics::new();
    let summary = blast::commands::send_observed(
        &w.config(&path, Some(&sink), 1),
        blast::progress::Mode::Quiet,
        std::future::pending(),
        CancellationToken::new(),
        Some(metrics.clone()),
    )
    .await
    .unwrap();
    assert_eq!(summary.sent, 20);
    let run = parse(&metrics.encode(None));
    assert_eq!(sum(&run, "blast_mta_queue_messages", &[]), 3.0);
    // ...and serve's view of a database with a bounce and a suppression.
    w.exec(
        "INSERT INTO blast_bounces (address, kind, class, reason, source, message_hash, \
         received_at) VALUES ('user2@example.com', 'bounce', 'hard', 'x', 'maildir', 'h1', \
         '2026-01-01T00:00:00.000Z')",
    )
    .await;
    let db = w.db().await;
    blast::suppress::add(&db, "user4@example.com", "operator", "operator")
        .await
        .unwrap();
    let server = Server::start(db).await;
    let (status, _) = server.request("POST", "/unsubscribe/forged", "").await;
    assert_eq!(status, 404);
    let inbound = scrape(server.addr).await;
    server.stop().await;
    let exposed: std::collections::BTreeSet<String> =
        names(&run).into_iter().chain(names(&inbound)).collect();

    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/contrib/grafana/blast.json");
    let dash: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let panels = dash["panels"].as_array().unwrap();
    let mut ids = std::collections::BTreeSet::new();
    let mut asked = std::collections::BTreeSet::new();
    for p in panels {
        assert!(
            ids.insert(p["id"].as_u64().unwrap()),
            "panel ids are unique"
        );
        let g = &p["gridPos"];
        assert!(
            g["x"].as_u64().unwrap() + g["w"].as_u64().unwrap() <= 24,
            "{p}"
        );
        if p["type"] == "row" {
            continue;
        }
        assert_eq!(p["datasource"]["uid"], "${DS_PROMETHEUS}", "{}", p["title"]);
        let targets = p["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "{}", p["title"]);
        for t in targets {
            let expr = t["expr"].as_str().unwrap();
            let found = metric_names_in(expr);
            assert!(!found.is_empty(), "{expr}");
            for name in found {
                assert!(
                    exposed.contains(&name),
                    "panel {}: {name} is not exposed; blast exposes {exposed:?}",
                    p["title"]
                );
                asked.insert(name);
            }
        }
    }
    // Every family blast exposes has a panel.
    let families = |n: &String| {
        ["_bucket", "_sum", "_count"]
            .iter()
            .fold(n.clone(), |n, s| {
                n.strip_suffix(s).map_or(n.clone(), str::to_string)
            })
    };
    let shown: std::collections::BTreeSet<String> = asked.iter().map(families).collect();
    let missing: Vec<String> = exposed
        .iter()
        .map(families)
        .filter(|f| !shown.contains(f))
        .filter(|f| f != "blast_run_start_time_seconds")
        .collect();
    assert!(missing.is_empty(), "no panel shows {missing:?}");
}
