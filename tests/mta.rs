//! A campaign through a real Postfix (the tuned instance of
//! scripts/mta/postfix.sh, queue on tmpfs) relaying to the in-process sink:
//! every recipient arrives exactly once, and the ledger holds Postfix's queue
//! ids. `scripts/test.sh` runs as root on a machine with Debian's postfix
//! package (`.ci/run` installs it).

use std::collections::HashMap;
use std::future::pending;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use blast::progress::Mode;
use blast::sink::Faults;

use crate::util::{self, header, ledger_rows, Backend, World};

/// A running Postfix instance, stopped and removed on drop.
struct Postfix {
    dir: PathBuf,
    port: u16,
}

impl Postfix {
    fn start(relay_port: u16) -> Postfix {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/mta/postfix.sh");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let dir = PathBuf::from(format!(
            "/dev/shm/blast-postfix-test-{}",
            std::process::id()
        ));
        let out = Command::new("bash")
            .arg(&script)
            .args(["start", "--dir"])
            .arg(&dir)
            .args([
                "--port",
                &port.to_string(),
                "--relay",
                &format!("127.0.0.1:{relay_port}"),
            ])
            .output()
            .expect("bash");
        assert!(
            out.status.success(),
            "scripts/mta/postfix.sh start failed (is Debian's postfix installed? run as root):\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Postfix { dir, port }
    }
}

impl Drop for Postfix {
    fn drop(&mut self) {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/mta/postfix.sh");
        let _ = Command::new("bash")
            .arg(script)
            .args(["stop", "--purge", "--dir"])
            .arg(&self.dir)
            .status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn campaign_through_postfix_arrives_exactly_once() {
    let n = 2000;
    let w = World::new(Backend::Sqlite).await;
    w.seed(n).await;
    let sink = util::sink(Faults::default()).await;
    let postfix = Postfix::start(sink.local_addr().port());
    let path = w.campaign(
        "postfix",
        "Hi {{ first_name }}",
        "Token {{ token }}",
        Some("<p>{{ token }}</p>"),
        "",
    );
    let cfg = w.config(&path, None, 8);
    let mut cfg = cfg;
    cfg.delivery.relays[0].port = postfix.port;
    let s = blast::commands::send(&cfg, Mode::Quiet, pending())
        .await
        .unwrap();
    assert_eq!((s.sent, s.failed, s.deferred), (n as u64, 0, 0), "{s:?}");

    // Every ledger row has the queue id from Postfix's "250 2.0.0 Ok: queued as ID".
    let db = w.db().await;
    let rows = ledger_rows(&db, "postfix").await;
    assert_eq!(rows.len(), n as usize);
    for r in &rows {
        let qid = r.5.as_deref().unwrap_or_default();
        assert!(
            qid.len() >= 6 && qid.chars().all(|c| c.is_ascii_alphanumeric()),
            "{r:?}"
        );
        assert!(
            r.4.as_deref().unwrap_or_default().contains("queued as"),
            "{r:?}"
        );
    }

    // Postfix delivers everything to the sink, each recipient once.
    for _ in 0..600 {
        if sink.stats().messages >= n as u64 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut count: HashMap<String, u32> = HashMap::new();
    for r in sink.received() {
        for rcpt in &r.rcpt_to {
            *count.entry(rcpt.clone()).or_default() += 1;
        }
        let id: i64 = header(&r.data, "X-Blast-Recipient")
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(
            r.rcpt_to,
            vec![format!("user{id}@example.com")],
            "the message reached its own recipient"
        );
        assert!(String::from_utf8_lossy(&r.data).contains(&format!("tok-{id}-{}", id * 7)));
    }
    assert_eq!(count.len(), n as usize, "every recipient arrived");
    assert!(count.values().all(|&c| c == 1), "nobody twice");
    drop(postfix);
}
