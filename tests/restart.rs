//! Issue 13: the ledger survives the database's bad minute. A real
//! PostgreSQL server restarts in the middle of a campaign; blast waits for
//! it (logged, bounded) and finishes the campaign without an operator.
//! A test binary of its own: restarting the server would break any other
//! test using it at that moment, and cargo runs test binaries one at a time.

mod util;

use std::future::pending;
use std::time::Duration;

use blast::progress::Mode;

use util::{ledger_rows, Backend, World};

/// Stops the cluster `scripts/pg.sh` started (fast shutdown: every
/// connection is cut, as in a failover or a package upgrade), leaves it
/// down for `down`, and starts it again.
fn restart_postgres(down: Duration) {
    pg_ctl("-m fast -w stop");
    std::thread::sleep(down);
    let opts = std::env::var("BLAST_TEST_PG_OPTS").expect("run under scripts/pg.sh");
    pg_ctl(&format!("-w -o \"{opts}\" start"));
}

/// Runs `pg_ctl ARGS` on the test cluster, as its owner.
fn pg_ctl(args: &str) {
    let var = |k: &str| std::env::var(k).unwrap_or_else(|_| panic!("{k}: run under scripts/pg.sh"));
    let cmd = format!(
        "'{}' -D '{}' -l '{}' {args}",
        var("BLAST_TEST_PG_CTL"),
        var("BLAST_TEST_PG_DATA"),
        var("BLAST_TEST_PG_LOG")
    );
    let status = match std::env::var("BLAST_TEST_PG_OWNER").unwrap_or_default() {
        owner if !owner.is_empty() => std::process::Command::new("su")
            .args([owner.as_str(), "-s", "/bin/sh", "-c", &cmd])
            .stdout(std::process::Stdio::null())
            .status(),
        _ => std::process::Command::new("sh")
            .args(["-c", &cmd])
            .stdout(std::process::Stdio::null())
            .status(),
    };
    assert!(status.unwrap().success(), "pg_ctl {args} failed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_restart_mid_campaign_skips_and_doubles_nobody() {
    // The retries are logged: show them with the test's output.
    let _ = tracing_subscriber::fmt()
        .with_env_filter("blast=info")
        .with_test_writer()
        .try_init();
    let n = 6000;
    let w = World::new(Backend::Postgres).await;
    w.seed(n).await;
    let sink = std::sync::Arc::new(util::slow_sink(Duration::from_millis(2)).await);
    let path = w.campaign("restart", "Hi {{ first_name }}", "{{ token }}", None, "");
    let cfg = w.config(&path, Some(&sink), 4);
    let send =
        tokio::spawn(async move { blast::commands::send(&cfg, Mode::Quiet, pending()).await });

    util::wait_for(&sink, 1500).await;
    let before = sink.received().len();
    // Down for longer than a connection attempt waits (5 s): the ledger,
    // the audience pages and the claims all see errors, not just a pause.
    tokio::task::spawn_blocking(|| restart_postgres(Duration::from_secs(8)))
        .await
        .unwrap();
    let summary = tokio::time::timeout(Duration::from_secs(120), send)
        .await
        .expect("the campaign finishes on its own")
        .unwrap()
        .expect("a restart is not fatal");
    assert!(before < n as usize, "restarted mid-campaign");
    assert!(!summary.interrupted, "{summary:?}");

    let count = util::per_recipient(&sink.received());
    assert_eq!(count.len(), n as usize, "nobody skipped");
    let doubled = count.values().filter(|&&c| c > 1).count();
    assert_eq!(
        doubled, 0,
        "nobody doubled: every answer was recorded once the server was back"
    );
    let db = w.db().await;
    let rows = ledger_rows(&db, "restart").await;
    assert_eq!(rows.len(), n as usize);
    assert!(rows.iter().all(|r| r.1 == "sent"));
    let state: String =
        sqlx::query_scalar("SELECT state FROM blast_campaigns WHERE name = 'restart'")
            .fetch_one(db.pool())
            .await
            .unwrap();
    assert_eq!(state, "finished");
}
