//! Test harness: a fresh database per test (SQLite file in a temp dir, or a new
//! PostgreSQL database on the server named by `BLAST_TEST_PG_URL`), a campaign
//! file writer, audience seeding, an in-process sink, the `blast` binary, and
//! bounded waits.

#![allow(dead_code)]

use std::collections::HashMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use blast::config::{Config, Overrides};
use blast::db::Db;
use blast::sink::{Faults, Received, Sink, SinkConfig};

/// Which database a test runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// One test's world: temp dir, database URL, campaign files.
pub struct World {
    pub dir: tempfile::TempDir,
    pub url: String,
    pub backend: Backend,
}

impl World {
    /// A fresh, migrated, empty database.
    pub async fn new(backend: Backend) -> World {
        let dir = tempfile::tempdir().unwrap();
        let url = match backend {
            Backend::Sqlite => format!("sqlite://{}", dir.path().join("blast.db").display()),
            Backend::Postgres => fresh_pg_database().await,
        };
        Db::connect(&url).await.unwrap().close().await;
        World { dir, url, backend }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub async fn db(&self) -> Db {
        Db::connect(&self.url).await.unwrap()
    }

    /// Inserts `n` subscribers with ids 1..=n: `user{i}@example.com`, with
    /// attributes first_name = `Name{i}` and token = `tok-{i}-{i*7}`.
    pub async fn seed(&self, n: i64) {
        let db = self.db().await;
        let cast = if self.backend == Backend::Postgres {
            "::jsonb"
        } else {
            ""
        };
        let mut i = 1;
        while i <= n {
            let end = (i + 499).min(n);
            let mut sql =
                String::from("INSERT INTO subscribers (id, email, attributes, created_at) VALUES ");
            for k in i..=end {
                if k > i {
                    sql.push(',');
                }
                sql.push_str(&format!(
                    "({k}, 'user{k}@example.com', '{{\"first_name\":\"Name{k}\",\"token\":\"tok-{k}-{}\"}}'{cast}, '2026-01-01T00:00:00.000Z')",
                    k * 7
                ));
            }
            sqlx::query(sqlx::AssertSqlSafe(sql))
                .execute(db.pool())
                .await
                .unwrap();
            i = end + 1;
        }
        db.close().await;
    }

    /// Runs one SQL statement.
    pub async fn exec(&self, sql: &str) {
        let db = self.db().await;
        sqlx::query(sqlx::AssertSqlSafe(sql.to_string()))
            .execute(db.pool())
            .await
            .unwrap();
        db.close().await;
    }

    /// Writes a campaign with the given templates and extra TOML, returns its path.
    pub fn campaign(
        &self,
        name: &str,
        subject: &str,
        text: &str,
        html: Option<&str>,
        extra: &str,
    ) -> PathBuf {
        std::fs::write(self.path(&format!("{name}.txt")), text).unwrap();
        let html_line = match html {
            Some(h) => {
                std::fs::write(self.path(&format!("{name}.html")), h).unwrap();
                format!("html = \"{name}.html\"\n")
            }
            None => String::new(),
        };
        // Every campaign needs [unsubscribe]; tests that test it bring their own.
        let unsubscribe = match extra.contains("[unsubscribe]") {
            true => "",
            false => "[unsubscribe]\nurl = \"https://lists.example.com/unsubscribe/{token}\"\n",
        };
        let toml = format!(
            "name = \"{name}\"\ndatabase = \"{url}\"\n[audience]\ntable = \"subscribers\"\n{unsubscribe}\
             [message]\nfrom = \"Test <news@example.com>\"\nsubject = \"{subject}\"\ntext = \"{name}.txt\"\n{html_line}{extra}",
            url = self.url
        );
        let p = self.path(&format!("{name}.toml"));
        std::fs::write(&p, toml).unwrap();
        p
    }

    /// Loads a campaign with overrides pointing at `sink`.
    pub fn config(&self, path: &Path, sink: Option<&Sink>, concurrency: usize) -> Config {
        let overrides = Overrides {
            smtp: sink
                .map(|s| vec![format!("smtp://{}", s.local_addr())])
                .unwrap_or_default(),
            concurrency: Some(blast::config::Concurrency::Fixed(concurrency)),
            ..Default::default()
        };
        Config::load(path, &overrides).unwrap()
    }
}

/// A sink on 127.0.0.1:0 that keeps messages.
pub async fn sink(faults: Faults) -> Sink {
    Sink::start(SinkConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        keep_messages: true,
        faults,
        ..Default::default()
    })
    .await
    .unwrap()
}

/// Like [`sink`], taking `latency` over each message, so a campaign is still
/// running when the test acts on it.
pub async fn slow_sink(latency: Duration) -> Sink {
    sink(Faults {
        latency: Some(latency),
        ..Default::default()
    })
    .await
}

/// A running `blast serve` on 127.0.0.1:0.
pub struct Server {
    pub addr: std::net::SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<blast::Result<()>>,
}

impl Server {
    pub async fn start(db: Db) -> Server {
        Server::start_with(db, blast::serve::Options::default()).await
    }

    pub async fn start_with(db: Db, opts: blast::serve::Options) -> Server {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(blast::serve::run(db, listener, opts, async move {
            let _ = rx.await;
        }));
        Server {
            addr,
            stop: Some(tx),
            task,
        }
    }

    /// One HTTP/1.1 request; returns (status, body).
    pub async fn request(&self, method: &str, path: &str, body: &str) -> (u16, String) {
        let (status, _, body) = http(self.addr, method, path, body).await;
        (status, body)
    }

    pub async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        self.task.await.unwrap().unwrap();
    }
}

/// One HTTP/1.1 request to `addr`; returns (status, head, body).
pub async fn http(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    body: &str,
) -> (u16, String, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: lists.example.com\r\nConnection: close\r\n\
         Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out))
        .await
        .expect("server answers within 10 s")
        .unwrap();
    let text = String::from_utf8_lossy(&out).to_string();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    (status, head.to_string(), body.to_string())
}

/// The `blast` binary built for this test run, as an operator runs it.
pub fn blast() -> Command {
    Command::new(env!("CARGO_BIN_EXE_blast"))
}

/// Sends `signal` (`-TERM`, `-HUP`, ...) to `child` and waits for it to exit.
pub async fn stop_with(signal: &str, child: std::process::Child) -> std::process::Output {
    let kill = Command::new("kill")
        .args([signal, &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    tokio::task::spawn_blocking(move || child.wait_with_output().unwrap())
        .await
        .unwrap()
}

/// The PostgreSQL server for tests. Required: `scripts/test.sh` starts one.
/// Asserts that a finished `blast` exited with `code`, showing its stderr
/// if not.
pub fn assert_exit(out: &std::process::Output, code: i32) {
    assert_eq!(
        out.status.code(),
        Some(code),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

pub fn pg_url() -> String {
    std::env::var("BLAST_TEST_PG_URL").expect(
        "BLAST_TEST_PG_URL is not set: run the suite with scripts/test.sh, which starts a throwaway PostgreSQL",
    )
}

/// Creates a uniquely named database and returns its URL.
async fn fresh_pg_database() -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let base = pg_url();
    let name = format!(
        "blast_t_{}_{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    );
    let admin = Db::connect(&base).await.unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(admin.pool())
        .await
        .unwrap();
    admin.close().await;
    match base.rsplit_once('/') {
        Some((server, _)) => format!("{server}/{name}"),
        None => panic!("BLAST_TEST_PG_URL must end in /database"),
    }
}

/// The value of header `name` in a raw message (first occurrence, unfolded).
pub fn header(msg: &[u8], name: &str) -> Option<String> {
    let text = String::from_utf8_lossy(msg);
    let head = text.split("\r\n\r\n").next().unwrap_or("");
    let mut lines = head.split("\r\n").peekable();
    while let Some(line) = lines.next() {
        if let Some((h, v)) = line.split_once(':') {
            if h.eq_ignore_ascii_case(name) {
                let mut v = v.trim().to_string();
                while let Some(next) = lines.peek() {
                    if next.starts_with(' ') || next.starts_with('\t') {
                        v.push(' ');
                        v.push_str(next.trim());
                        lines.next();
                    } else {
                        break;
                    }
                }
                return Some(v);
            }
        }
    }
    None
}

/// The first message in `got` whose envelope has exactly one recipient,
/// `addr`; panics if there is none. One RCPT per envelope is what blast
/// sends (a VERP sender names one recipient) and what Postfix relays of it,
/// so a message that reached `addr` together with others does not match.
pub fn only_to(got: &[Received], addr: &str) -> Received {
    got.iter()
        .find(|m| m.rcpt_to == [addr])
        .unwrap_or_else(|| {
            let envelopes: Vec<&[String]> = got.iter().map(|m| &m.rcpt_to[..]).collect();
            panic!("{addr} was sent nothing on its own; envelopes: {envelopes:?}")
        })
        .clone()
}

/// How many messages each recipient got, keyed by each envelope's first
/// RCPT (blast sends one per envelope).
pub fn per_recipient(got: &[Received]) -> HashMap<String, usize> {
    let mut count: HashMap<String, usize> = HashMap::new();
    for r in got {
        *count.entry(r.rcpt_to[0].clone()).or_default() += 1;
    }
    count
}

/// All header names of a raw message, lower-cased.
pub fn header_names(msg: &[u8]) -> Vec<String> {
    let text = String::from_utf8_lossy(msg);
    let head = text.split("\r\n\r\n").next().unwrap_or("").to_string();
    head.split("\r\n")
        .filter(|l| !l.starts_with(' ') && !l.starts_with('\t'))
        .filter_map(|l| l.split_once(':').map(|(h, _)| h.to_ascii_lowercase()))
        .collect()
}

/// Ledger rows of a campaign: (recipient_id, status, smtp_code, enhanced, reply, queue_id).
pub async fn ledger_rows(
    db: &Db,
    campaign: &str,
) -> Vec<(
    i64,
    String,
    Option<i32>,
    Option<String>,
    Option<String>,
    Option<String>,
)> {
    use sqlx::Row;
    let rows = sqlx::query(
        "SELECT d.recipient_id, d.status, d.smtp_code, d.enhanced_status, d.reply, d.queue_id \
         FROM blast_deliveries d JOIN blast_campaigns c ON c.id = d.campaign_id \
         WHERE c.name = $1 ORDER BY d.recipient_id",
    )
    .bind(campaign)
    .fetch_all(db.pool())
    .await
    .unwrap();
    rows.iter()
        .map(|r| {
            (
                r.get::<i64, _>(0),
                r.get::<String, _>(1),
                r.get::<Option<i32>, _>(2),
                r.get::<Option<String>, _>(3),
                r.get::<Option<String>, _>(4),
                r.get::<Option<String>, _>(5),
            )
        })
        .collect()
}

/// Runs `blast send` for `cfg` in a task (as another process would).
pub fn spawn_send(
    cfg: &Config,
) -> tokio::task::JoinHandle<blast::Result<blast::campaign::Summary>> {
    let cfg = cfg.clone();
    tokio::spawn(async move {
        blast::commands::send(&cfg, blast::progress::Mode::Quiet, std::future::pending()).await
    })
}

/// How long [`wait_until`] waits before the test fails: tens of seconds, so a
/// slow or busy CI machine passes, while a regression fails with a message
/// instead of hanging the suite.
pub const PATIENCE: Duration = Duration::from_secs(60);

/// Calls `check` every `every` until it gives `Ok`, and returns that value.
/// While not ready `check` gives `Err` with what it saw; after [`PATIENCE`]
/// (wall-clock time, also under paused tokio time) the test fails with
/// `what` it was waiting for and the last thing seen.
pub async fn wait_until<T, F, Fut>(what: &str, every: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let deadline = Instant::now() + PATIENCE;
    loop {
        match check().await {
            Ok(v) => return v,
            Err(seen) => assert!(
                Instant::now() < deadline,
                "waited {} s for {what}; last seen: {seen}",
                PATIENCE.as_secs()
            ),
        }
        tokio::time::sleep(every).await;
    }
}

/// Waits until `sink` has accepted at least `n` messages; the test fails
/// after [`PATIENCE`].
pub async fn wait_for(sink: &Sink, n: u64) {
    let what = format!("the sink to accept {n} messages");
    wait_until(&what, Duration::from_millis(2), || async move {
        match sink.stats().messages {
            m if m >= n => Ok(()),
            m => Err(format!("{m} accepted")),
        }
    })
    .await
}
