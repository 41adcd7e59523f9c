//! Issue 12: several `blast send` processes (workers) share one campaign on
//! PostgreSQL through fenced claims. Every worker here is a real process
//! with its own sink (so the test knows who sent what), killed or stopped
//! with real signals.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use blast::sink::Sink;

use crate::util::{self, blast, Backend, World};

/// Worker processes, killed (after a SIGCONT) when the test ends however it ends.
struct Workers {
    children: Vec<(String, Child)>,
    logs: Vec<std::path::PathBuf>,
}

impl Workers {
    fn new() -> Workers {
        Workers {
            children: Vec::new(),
            logs: Vec::new(),
        }
    }

    /// Starts `blast send` as worker `name` into `sink`, with `env` added.
    fn start(&mut self, w: &World, path: &Path, name: &str, sink: &Sink, env: &[(&str, &str)]) {
        let log = w.path(&format!("{name}.log"));
        let mut cmd = blast();
        cmd.arg("send")
            .arg(path)
            .args(["--worker", name])
            .args(["--smtp", &format!("smtp://{}", sink.local_addr())])
            .args(["--concurrency", "2", "--progress", "plain"])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        for (k, v) in env {
            cmd.env(k, v);
        }
        self.children.push((name.to_string(), cmd.spawn().unwrap()));
        self.logs.push(log);
    }

    fn pid(&self, name: &str) -> String {
        let (_, c) = self.children.iter().find(|(n, _)| n == name).unwrap();
        c.id().to_string()
    }

    fn signal(&self, name: &str, sig: &str) {
        let ok = std::process::Command::new("kill")
            .args([sig, &self.pid(name)])
            .status()
            .unwrap();
        assert!(ok.success(), "kill {sig} {name}");
    }

    fn log(&self, name: &str) -> String {
        let i = self.children.iter().position(|(n, _)| n == name).unwrap();
        std::fs::read_to_string(&self.logs[i]).unwrap_or_default()
    }

    /// Waits for every worker to exit; returns their exit codes by name.
    async fn wait_all(&mut self) -> HashMap<String, Option<i32>> {
        let children = &mut self.children;
        util::wait_until("every worker to exit", Duration::from_millis(100), || {
            let done = children
                .iter_mut()
                .map(|(n, c)| (n.clone(), c.try_wait().unwrap()))
                .collect::<Vec<_>>();
            async move {
                match done.iter().all(|(_, s)| s.is_some()) {
                    true => Ok(done
                        .into_iter()
                        .map(|(n, s)| (n, s.and_then(|s| s.code())))
                        .collect()),
                    false => Err(format!("{done:?}")),
                }
            }
        })
        .await
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        for (_, c) in &mut self.children {
            // A child that already exited: nothing to resume, nothing to say.
            let _ = std::process::Command::new("kill")
                .args(["-CONT", &c.id().to_string()])
                .stderr(std::process::Stdio::null())
                .status();
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

async fn scalar(w: &World, sql: &str) -> i64 {
    let db = w.db().await;
    let n: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_string()))
        .fetch_one(db.pool())
        .await
        .unwrap();
    db.close().await;
    n
}

/// The claims a worker holds now: (first, last, token).
async fn claims_of(w: &World, worker: &str) -> Vec<(i64, i64, i64)> {
    let db = w.db().await;
    let rows: Vec<(i64, i64, i64)> = sqlx::query_as(
        "SELECT first_id, last_id, token FROM blast_claims WHERE worker = $1 AND done = 0",
    )
    .bind(worker)
    .fetch_all(db.pool())
    .await
    .unwrap();
    db.close().await;
    rows
}

/// Each claim's first id and the worker holding it now.
async fn holders(w: &World) -> Vec<(i64, Option<String>)> {
    let db = w.db().await;
    let rows = sqlx::query_as("SELECT first_id, worker FROM blast_claims")
        .fetch_all(db.pool())
        .await
        .unwrap();
    db.close().await;
    rows
}

fn ids(sink: &Sink) -> Vec<i64> {
    sink.received()
        .iter()
        .map(|r| {
            let a = &r.rcpt_to[0];
            a["user".len()..a.find('@').unwrap()].parse().unwrap()
        })
        .collect()
}

/// Three workers on 30,000 recipients; one SIGKILLed mid-run, another
/// SIGSTOPped past the TTL and continued. Everyone arrives, duplicates stay
/// within the per-fault window, no ledger row is written twice, and the
/// continued worker sends nothing from the ranges it lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_workers_survive_a_kill_and_a_stop() {
    let n = 30_000;
    let w = World::new(Backend::Postgres).await;
    w.seed(n).await;
    let path = w.campaign(
        "three",
        "Hi {{ first_name }}",
        "{{ token }}",
        None,
        "[delivery]\nworker_ttl = \"3s\"\nclaim_size = 1000\n",
    );
    let sinks = [
        util::slow_sink(Duration::from_millis(4)).await,
        util::slow_sink(Duration::from_millis(4)).await,
        util::slow_sink(Duration::from_millis(4)).await,
    ];
    let mut workers = Workers::new();
    for (name, sink) in ["a", "b", "c"].iter().zip(&sinks) {
        workers.start(&w, &path, name, sink, &[]);
    }
    let total = || sinks.iter().map(|s| s.stats().messages).sum::<u64>();
    util::wait_until("3,000 messages", Duration::from_millis(20), || {
        let t = total();
        async move { (t >= 3000).then_some(()).ok_or(format!("{t}")) }
    })
    .await;
    workers.signal("a", "-KILL");
    util::wait_until("9,000 messages", Duration::from_millis(20), || {
        let t = total();
        async move { (t >= 9000).then_some(()).ok_or(format!("{t}")) }
    })
    .await;
    workers.signal("b", "-STOP");
    let held = claims_of(&w, "b").await;
    assert!(!held.is_empty(), "b held claims when stopped");
    let b_before = sinks[1].stats().messages;
    // b is continued once worker c took over every range it held (their
    // leases ran out; c takes an orphan when it asks for its next range,
    // however busy the machine keeps it). Continued earlier, b would find
    // its own ranges still free and take them back under new tokens.
    util::wait_until(
        "c to take over b's ranges",
        Duration::from_millis(50),
        || async {
            let now = holders(&w).await;
            let left: Vec<_> = held
                .iter()
                .filter(|(f, _, _)| {
                    !now.iter()
                        .any(|(f2, w2)| f2 == f && w2.as_deref() == Some("c"))
                })
                .collect();
            left.is_empty()
                .then_some(())
                .ok_or(format!("not yet taken: {left:?}"))
        },
    )
    .await;
    workers.signal("b", "-CONT");
    let codes = workers.wait_all().await;
    assert_eq!(codes["b"], Some(0), "{}", workers.log("b"));
    assert_eq!(codes["c"], Some(0), "{}", workers.log("c"));

    // Everyone arrived; duplicates only within the stated window per fault
    // (concurrency + two ledger batches; docs/scale-out.md).
    let mut count: HashMap<i64, usize> = HashMap::new();
    for s in &sinks {
        for id in ids(s) {
            *count.entry(id).or_default() += 1;
        }
    }
    assert_eq!(count.len(), n as usize, "every recipient arrived");
    let twice = count.values().filter(|&&c| c > 1).count();
    assert!(twice <= 2 * (2 + 2 * 1000), "{twice} recipients twice");
    // No ledger row was written twice: every row is `sent` at its first write.
    assert_eq!(
        scalar(
            &w,
            "SELECT COUNT(*) FROM blast_deliveries WHERE status = 'sent' AND attempts = 1"
        )
        .await,
        n
    );
    assert_eq!(
        scalar(
            &w,
            "SELECT COUNT(*) FROM blast_campaigns WHERE state = 'finished'"
        )
        .await,
        1
    );
    // Every range b held when stopped went to c (waited for above), and
    // after it was continued b sent nothing from them beyond the
    // transactions it was in the middle of (one per connection).
    let after: Vec<i64> = ids(&sinks[1]).split_off(b_before as usize);
    let from_lost = after
        .iter()
        .filter(|id| held.iter().any(|(f, l, _)| (f..=l).contains(id)))
        .count();
    assert!(
        from_lost <= 2,
        "b sent {from_lost} messages from ranges it lost"
    );
    let log = workers.log("b");
    assert!(
        log.contains("sending nothing more"),
        "b says it stopped sending from lost ranges: {log}"
    );
}

/// A worker whose clock runs 60 s ahead cannot take a live worker's claim:
/// claims are timed by the database's clock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_with_a_skewed_clock_cannot_take_a_live_claim() {
    let w = World::new(Backend::Postgres).await;
    w.seed(300).await;
    // One range for the whole audience; a TTL short enough that a skewed
    // clock would see it long expired.
    let path = w.campaign(
        "skew",
        "Hi",
        "x",
        None,
        "[delivery]\nworker_ttl = \"3s\"\nclaim_size = 100000\n",
    );
    let (sa, sb) = (
        util::slow_sink(Duration::from_millis(20)).await,
        util::slow_sink(Duration::from_millis(1)).await,
    );
    let mut workers = Workers::new();
    workers.start(&w, &path, "honest", &sa, &[]);
    util::wait_for(&sa, 20).await;
    workers.start(&w, &path, "skewed", &sb, &[("BLAST_CLOCK_SKEW_SECS", "60")]);
    let codes = workers.wait_all().await;
    assert_eq!(codes["skewed"], Some(0), "{}", workers.log("skewed"));
    assert_eq!(codes["honest"], Some(0), "{}", workers.log("honest"));
    assert_eq!(sb.stats().messages, 0, "{}", workers.log("skewed"));
    let got: HashSet<i64> = ids(&sa).into_iter().collect();
    assert_eq!((got.len(), sa.stats().messages), (300, 300));
}

/// `rate` is the campaign's: three workers with rate = 600 take about 10 s
/// for 6,000 messages in all, not 3.3 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rate_holds_across_workers() {
    let n = 6000;
    let w = World::new(Backend::Postgres).await;
    w.seed(n).await;
    let path = w.campaign(
        "rate",
        "Hi",
        "x",
        None,
        "[delivery]\nrate = 600\nclaim_size = 500\n",
    );
    let sinks = [
        util::sink(Default::default()).await,
        util::sink(Default::default()).await,
        util::sink(Default::default()).await,
    ];
    let started = Instant::now();
    let mut workers = Workers::new();
    for (name, sink) in ["r1", "r2", "r3"].iter().zip(&sinks) {
        workers.start(&w, &path, name, sink, &[]);
    }
    let codes = workers.wait_all().await;
    let took = started.elapsed();
    assert!(codes.values().all(|c| *c == Some(0)), "{codes:?}");
    let total: u64 = sinks.iter().map(|s| s.stats().messages).sum();
    assert_eq!(total, n as u64);
    assert!(
        sinks.iter().filter(|s| s.stats().messages > 0).count() >= 2,
        "the workers shared the campaign: {:?}",
        sinks.iter().map(|s| s.stats().messages).collect::<Vec<_>>()
    );
    assert!(
        took >= Duration::from_millis(8500),
        "6,000 messages at 600/s in all took only {took:?}"
    );
    // Each worker's ledger rows name it: as many as its sink received.
    let db = w.db().await;
    let rows: Vec<(Option<String>, i64)> = sqlx::query_as(
        "SELECT worker, COUNT(*) FROM blast_deliveries GROUP BY worker ORDER BY worker",
    )
    .fetch_all(db.pool())
    .await
    .unwrap();
    db.close().await;
    let expected: Vec<(Option<String>, i64)> = ["r1", "r2", "r3"]
        .iter()
        .zip(&sinks)
        .map(|(name, s)| (Some(name.to_string()), s.stats().messages as i64))
        .filter(|(_, n)| *n > 0)
        .collect();
    assert_eq!(rows, expected);
    // The report draws them: a series per worker, adding up to the total.
    let r = blast::commands::report(&w.url, "rate", None).await.unwrap();
    assert_eq!(r.workers, expected.len());
    let series: Vec<(Option<String>, i64)> = r
        .per_minute_by_worker
        .iter()
        .map(|s| (s.worker.clone(), s.total))
        .collect();
    let mut busiest = expected.clone();
    busiest.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    assert_eq!(series, busiest);
    for (i, m) in r.per_minute.iter().enumerate() {
        let sum: i64 = r.per_minute_by_worker.iter().map(|s| s.points[i].n).sum();
        assert_eq!(sum, m.n, "minute {}", m.label);
    }
}

/// `blast pause` stops every worker within a second or two, and the state
/// stays paused; `blast resume` and one more worker finish the campaign.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_stops_every_worker() {
    let n = 20_000;
    let w = World::new(Backend::Postgres).await;
    w.seed(n).await;
    let path = w.campaign("pause", "Hi", "x", None, "[delivery]\nclaim_size = 500\n");
    let sinks = [
        util::slow_sink(Duration::from_millis(5)).await,
        util::slow_sink(Duration::from_millis(5)).await,
    ];
    let mut workers = Workers::new();
    for (name, sink) in ["p1", "p2"].iter().zip(&sinks) {
        workers.start(&w, &path, name, sink, &[]);
    }
    let total = || sinks.iter().map(|s| s.stats().messages).sum::<u64>();
    util::wait_until("both workers sending", Duration::from_millis(20), || {
        let (a, b) = (sinks[0].stats().messages, sinks[1].stats().messages);
        async move {
            (a >= 100 && b >= 100)
                .then_some(())
                .ok_or(format!("{a} {b}"))
        }
    })
    .await;
    // The operator's view while both run: each worker, and their number.
    util::wait_until(
        "both workers in blast status",
        Duration::from_millis(200),
        || {
            let out = blast()
                .arg("status")
                .arg(&path)
                .arg("--json")
                .output()
                .unwrap();
            async move {
                let v: serde_json::Value =
                    serde_json::from_slice(&out.stdout).map_err(|e| e.to_string())?;
                let live: Vec<&str> = v["workers"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter(|w| w["alive"] == true && w["sent"].as_i64() > Some(0))
                    .filter_map(|w| w["name"].as_str())
                    .collect();
                (live == ["p1", "p2"]).then_some(()).ok_or(v.to_string())
            }
        },
    )
    .await;
    let out = blast()
        .args(["list", "--json", "--database", &w.url])
        .output()
        .unwrap();
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(list[0]["workers"], 2, "{list}");
    let out = blast()
        .args(["pause", "pause", "--database", &w.url])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let paused_at = Instant::now();
    let codes = workers.wait_all().await;
    assert!(
        paused_at.elapsed() < Duration::from_secs(4),
        "workers took {:?} to stop",
        paused_at.elapsed()
    );
    // Exit code 1: stopped before the end (README, exit codes).
    assert!(codes.values().all(|c| *c == Some(1)), "{codes:?}");
    let at_pause = total();
    assert!(at_pause < n as u64, "paused before the end");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(total(), at_pause, "nothing sent after the workers stopped");
    assert_eq!(
        scalar(
            &w,
            "SELECT COUNT(*) FROM blast_campaigns WHERE state = 'paused'"
        )
        .await,
        1
    );
    let out = blast()
        .args(["resume", "pause", "--database", &w.url])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let fast = util::sink(Default::default()).await;
    let mut more = Workers::new();
    more.start(&w, &path, "p1", &fast, &[]);
    let codes = more.wait_all().await;
    assert_eq!(codes["p1"], Some(0), "{}", more.log("p1"));
    let mut seen: HashSet<i64> = HashSet::new();
    for s in sinks.iter().chain([&fast]) {
        seen.extend(ids(s));
    }
    assert_eq!(
        seen.len(),
        n as usize,
        "everyone arrived once the campaign resumed"
    );
}

/// `max_workers` caps the workers: one more exits at once with exit code 0
/// and says why. On SQLite, which several local processes may share too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_workers_turns_one_more_away() {
    let w = World::new(Backend::Sqlite).await;
    w.seed(400).await;
    let path = w.campaign("cap", "Hi", "x", None, "[delivery]\nmax_workers = 1\n");
    let (first, second) = (
        util::slow_sink(Duration::from_millis(5)).await,
        util::sink(Default::default()).await,
    );
    let mut workers = Workers::new();
    workers.start(&w, &path, "one", &first, &[]);
    util::wait_for(&first, 20).await;
    workers.start(&w, &path, "two", &second, &[]);
    let codes = workers.wait_all().await;
    assert_eq!(codes["two"], Some(0), "{}", workers.log("two"));
    assert_eq!(codes["one"], Some(0), "{}", workers.log("one"));
    assert!(
        workers.log("two").contains("already has its 1 workers"),
        "{}",
        workers.log("two")
    );
    assert_eq!(second.stats().messages, 0);
    let got: HashSet<i64> = ids(&first).into_iter().collect();
    assert_eq!((got.len(), first.stats().messages), (400, 400));
}

/// One worker and nobody else, stopped past its lease and continued: it
/// forfeits its claims and, nobody having taken them, takes the same ranges
/// back under new tokens. The messages it had queued under the old tokens
/// are not sent (the new grant reads those recipients again from the
/// ledger), so nobody gets two messages beyond the transactions open when
/// it stopped. With a rate limit the stale queue drains slowly, so it is
/// still there when the ranges are taken back (14 recipients got two
/// messages when the fence looked up the latest claim covering an id).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_takes_its_own_ranges_back_sends_nobody_twice() {
    let n = 2000;
    let w = World::new(Backend::Postgres).await;
    w.seed(n).await;
    let path = w.campaign(
        "solo",
        "Hi",
        "x",
        None,
        "[delivery]\nworker_ttl = \"3s\"\nclaim_size = 1000\nrate = 200\n",
    );
    let sink = util::sink(Default::default()).await;
    let mut workers = Workers::new();
    workers.start(&w, &path, "solo", &sink, &[]);
    util::wait_for(&sink, 300).await;
    workers.signal("solo", "-STOP");
    let held = claims_of(&w, "solo").await;
    assert!(!held.is_empty(), "it held claims when stopped");
    // Past the lease (3 s) and its margin.
    tokio::time::sleep(Duration::from_secs(5)).await;
    workers.signal("solo", "-CONT");
    let codes = workers.wait_all().await;
    let log = workers.log("solo");
    assert_eq!(codes["solo"], Some(0), "{log}");
    assert!(log.contains("sending nothing more"), "{log}");
    assert!(log.contains("took over"), "it took its ranges back: {log}");
    let mut count: HashMap<i64, usize> = HashMap::new();
    for id in ids(&sink) {
        *count.entry(id).or_default() += 1;
    }
    assert_eq!(count.len(), n as usize, "everyone arrived");
    let twice: Vec<_> = count.iter().filter(|(_, &c)| c > 1).collect();
    // At most the transactions open at the stop: concurrency 2.
    assert!(
        twice.len() <= 2,
        "{} recipients twice: {twice:?}",
        twice.len()
    );
    assert_eq!(
        scalar(
            &w,
            "SELECT COUNT(*) FROM blast_deliveries WHERE status = 'sent'"
        )
        .await,
        n
    );
}

/// A sender stopped in the middle of a transaction (its process stopped,
/// its host stalled) does not keep its row locks past the lease TTL: the
/// server ends its session, another worker locks the row, and the
/// stalled one's next statement fails as a dropped connection (retried
/// on a new one). Held on, its lock on the campaign row (taken for a
/// grant) would stop every grant, its lock on a claim (taken while its
/// ledger writes) would keep the claim from being taken over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_transaction_gives_up_its_locks_after_the_ttl() {
    let w = World::new(Backend::Postgres).await;
    let stalled = blast::db::Db::connect_with_stall(&w.url, Some(Duration::from_millis(500)))
        .await
        .unwrap();
    let other = w.db().await;
    sqlx::query(
        "INSERT INTO subscribers (id, email, created_at) VALUES (1, 'a@example.com', '2026-01-01')",
    )
    .execute(other.pool())
    .await
    .unwrap();
    let mut tx = stalled.pool().begin().await.unwrap();
    sqlx::query("SELECT id FROM subscribers WHERE id = 1 FOR UPDATE")
        .execute(&mut *tx)
        .await
        .unwrap();
    // Held now: another session cannot take the row.
    let lock = "SELECT id FROM subscribers WHERE id = 1 FOR UPDATE NOWAIT";
    let mut probe = other.pool().begin().await.unwrap();
    let err = sqlx::query(lock).execute(&mut *probe).await.unwrap_err();
    assert!(err.to_string().contains("could not obtain lock"), "{err}");
    probe.rollback().await.unwrap();
    // Stalled past the limit, the session is ended and the row is free.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut probe = other.pool().begin().await.unwrap();
    sqlx::query(lock).execute(&mut *probe).await.unwrap();
    probe.rollback().await.unwrap();
    let err = sqlx::query("SELECT 1")
        .execute(&mut *tx)
        .await
        .map_err(blast::Error::from)
        .unwrap_err();
    assert!(err.is_transient(), "{err:?}");
    drop(tx);
    // A plain connection has no such limit: the tests' own, held as long.
    let mut tx = other.pool().begin().await.unwrap();
    sqlx::query("SELECT id FROM subscribers WHERE id = 1 FOR UPDATE")
        .execute(&mut *tx)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    sqlx::query("SELECT 1").execute(&mut *tx).await.unwrap();
    tx.rollback().await.unwrap();
    stalled.close().await;
    other.close().await;
}
