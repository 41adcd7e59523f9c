//! A campaign through a real Postfix (the tuned instance of
//! scripts/mta/postfix.sh, queue on tmpfs) relaying to the in-process sink:
//! every recipient arrives exactly once, and the ledger holds Postfix's queue
//! ids. Bounces and unsubscribe mails submitted to the same Postfix over SMTP
//! reach `blast bounce ingest` through its pipe transport (`--bounce-domain`).
//! `scripts/test.sh` runs as root on a machine with Debian's postfix package
//! (`.ci/run` installs it).

use std::collections::HashMap;
use std::future::pending;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use blast::db::Db;
use blast::progress::Mode;
use blast::sink::{Faults, Received, Sink, SinkConfig};

use crate::bounce::{dsn, unsubscribe_mail};
use crate::util::{self, header, ledger_rows, only_to, wait_until, Backend, World};

/// scripts/mta/postfix.sh in this checkout.
fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/mta/postfix.sh")
}

/// A running Postfix instance, stopped and removed on drop.
struct Postfix {
    dir: PathBuf,
    port: u16,
    /// The copy of blast its pipe runs, removed after the instance stops.
    _pipe_bin: Option<PipeBin>,
}

/// A copy of the blast binary that the pipe user can reach wherever the
/// repository is cloned (a 0700 home directory, a path with spaces: the
/// pipe runs as `nobody` and `master.cf` has no quoting): in a new
/// directory of the system temp folder, mode 0755. Removed on drop.
struct PipeBin {
    dir: tempfile::TempDir,
}

impl PipeBin {
    fn new() -> PipeBin {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::Builder::new()
            .prefix("blast-pipe-bin-")
            .tempdir_in("/tmp")
            .unwrap();
        let perm = |mode| std::fs::Permissions::from_mode(mode);
        std::fs::set_permissions(dir.path(), perm(0o755)).unwrap();
        let bin = dir.path().join("blast");
        std::fs::copy(env!("CARGO_BIN_EXE_blast"), &bin).unwrap();
        std::fs::set_permissions(&bin, perm(0o755)).unwrap();
        PipeBin { dir }
    }

    fn path(&self) -> PathBuf {
        self.dir.path().join("blast")
    }
}

impl Postfix {
    /// Relays all mail to 127.0.0.1:`relay_port`.
    fn start(relay_port: u16) -> Postfix {
        Postfix::start_with(relay_port, &[])
    }

    /// Like [`Postfix::start`], with more `postfix.sh start` options.
    fn start_with(relay_port: u16, extra: &[&str]) -> Postfix {
        Postfix::start_with_env(relay_port, extra, &[])
    }

    /// Like [`Postfix::start_with`], with environment variables for the script.
    fn start_with_env(relay_port: u16, extra: &[&str], env: &[(&str, &str)]) -> Postfix {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        // One directory per instance: the tests of this module run in parallel.
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = PathBuf::from(format!(
            "/dev/shm/blast-postfix-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let out = Command::new("bash")
            .arg(script())
            .args(["start", "--dir"])
            .arg(&dir)
            .args([
                "--port",
                &port.to_string(),
                "--relay",
                &format!("127.0.0.1:{relay_port}"),
            ])
            .args(extra)
            .envs(env.iter().copied())
            .output()
            .expect("bash");
        assert!(
            out.status.success(),
            "scripts/mta/postfix.sh start failed (is Debian's postfix installed? run as root):\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Postfix {
            dir,
            port,
            _pipe_bin: None,
        }
    }

    /// Like [`Postfix::start`], and mail to bounce.example.com and
    /// lists.example.com goes through the pipe transport to `blast bounce
    /// ingest --stdin` on `database`, run as `nobody`, quarantining into
    /// `quarantine`.
    fn start_piping_to_blast(relay_port: u16, database: &str, quarantine: &Path) -> Postfix {
        let bin = PipeBin::new();
        let mut postfix = Postfix::start_with(
            relay_port,
            &[
                "--bounce-domain",
                "bounce.example.com",
                "--bounce-domain",
                "lists.example.com",
                "--database",
                database,
                "--quarantine",
                quarantine.to_str().unwrap(),
                "--blast",
                bin.path().to_str().unwrap(),
                "--pipe-user",
                "nobody",
            ],
        );
        postfix._pipe_bin = Some(bin);
        postfix
    }

    /// Stops the instance, keeping its queue (a crash-free outage).
    fn stop_keep_queue(&self) {
        let out = Command::new("bash")
            .arg(script())
            .args(["stop", "--dir"])
            .arg(&self.dir)
            .output()
            .expect("bash");
        assert!(out.status.success(), "{out:?}");
    }

    /// Starts a stopped instance again on its port, with its queue.
    fn restart(&self, relay_port: u16) {
        self.reconfigure(relay_port, &[], &[]);
    }

    /// Starts the instance on its port with these options (a running one
    /// rewrites its configuration and reloads).
    fn reconfigure(&self, relay_port: u16, extra: &[&str], env: &[(&str, &str)]) {
        let out = Command::new("bash")
            .arg(script())
            .args(["start", "--dir"])
            .arg(&self.dir)
            .args([
                "--port",
                &self.port.to_string(),
                "--relay",
                &format!("127.0.0.1:{relay_port}"),
            ])
            .args(extra)
            .envs(env.iter().copied())
            .output()
            .expect("bash");
        assert!(out.status.success(), "{out:?}");
    }

    /// Messages in the queue (`postfix.sh queue-size`).
    fn queue_size(&self) -> u64 {
        let out = Command::new("bash")
            .arg(script())
            .args(["queue-size", "--dir"])
            .arg(&self.dir)
            .output()
            .expect("bash");
        assert!(out.status.success(), "{out:?}");
        String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
    }

    /// The instance's log.
    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("maillog")).unwrap_or_default()
    }
}

impl Drop for Postfix {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(script())
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
    util::wait_for(&sink, n as u64).await;
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

/// blast's STARTTLS client against Postfix's own TLS (OpenSSL): every
/// message crosses encrypted, with the certificate checked against a CA
/// from `ca_file`, and arrives once. Postfix's Received header, added on
/// the way in, says which TLS it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn campaign_over_starttls_into_postfix() {
    let n = 300;
    let w = World::new(Backend::Sqlite).await;
    w.seed(n).await;
    let pki = crate::relays::pki();
    pki.write_to(w.dir.path());
    let sink = util::sink(Faults::default()).await;
    let cert = w.path("cert.pem").display().to_string();
    let key = w.path("key.pem").display().to_string();
    let postfix = Postfix::start_with(
        sink.local_addr().port(),
        &["--tls-cert", &cert, "--tls-key", &key],
    );
    let path = w.campaign("tls", "Hi {{ first_name }}", "Token {{ token }}", None, "");
    let mut cfg = w.config(&path, None, 4);
    let relay = &mut cfg.delivery.relays[0];
    relay.port = postfix.port;
    relay.tls = blast::config::Tls::StartTls;
    relay.verify.ca_file = Some(w.path("ca.pem"));
    let s = match blast::commands::send(&cfg, Mode::Quiet, pending()).await {
        Ok(s) => s,
        Err(e) => panic!("{e}\nPostfix log:\n{}", postfix.log()),
    };
    assert_eq!((s.sent, s.failed, s.deferred), (n as u64, 0, 0), "{s:?}");
    util::wait_for(&sink, n as u64).await;
    let received = sink.received();
    let mut ids: Vec<i64> = received
        .iter()
        .map(|r| {
            let text = String::from_utf8_lossy(&r.data);
            assert!(
                text.contains("(using TLSv1."),
                "Postfix's Received header shows TLS:\n{}",
                &text[..text.len().min(600)]
            );
            header(&r.data, "X-Blast-Recipient")
                .unwrap()
                .parse()
                .unwrap()
        })
        .collect();
    ids.sort_unstable();
    assert_eq!(ids, (1..=n).collect::<Vec<_>>(), "each recipient once");
    drop(postfix);
}

/// The tuned Postfix does not parse MIME on the way in
/// (`disable_mime_input_processing`), and passes blast's 8bit parts
/// through as they are to a next hop that offers 8BITMIME; to one that does
/// not, its smtp client still converts them to quoted-printable, so nothing
/// 8-bit crosses that wire and the text decodes to what blast rendered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_bit_parts_reach_a_next_hop_without_8bitmime_converted() {
    let n = 3;
    let w = World::new(Backend::Sqlite).await;
    w.seed(n).await;
    let text = "Grüße aus Zürich, {{ first_name }}: ½ kg für 3 €";
    let path = w.campaign(
        "eightbit",
        "Hi {{ first_name }}",
        text,
        Some("<p>Grüße aus Zürich, {{ first_name }}</p>"),
        "",
    );
    for eight_bit_mime in [true, false] {
        let sink = Sink::start(SinkConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            keep_messages: true,
            eight_bit_mime,
            ..Default::default()
        })
        .await
        .unwrap();
        let postfix = Postfix::start(sink.local_addr().port());
        let mut cfg = w.config(&path, None, 2);
        cfg.delivery.relays[0].port = postfix.port;
        cfg.name = format!("eightbit-{eight_bit_mime}");
        let s = blast::commands::send(&cfg, Mode::Quiet, pending())
            .await
            .unwrap();
        assert_eq!((s.sent, s.failed, s.deferred), (n as u64, 0, 0), "{s:?}");
        util::wait_for(&sink, n as u64).await;
        for r in sink.received() {
            let raw = String::from_utf8_lossy(&r.data);
            let id: i64 = header(&r.data, "X-Blast-Recipient")
                .unwrap()
                .parse()
                .unwrap();
            let name = format!("Name{id}");
            let m = mail_parser::MessageParser::default()
                .parse(&r.data)
                .expect("a MIME message");
            let body = m.body_text(0).expect("a text part");
            assert!(
                body.contains(&format!("Grüße aus Zürich, {name}: ½ kg für 3 €")),
                "{body}"
            );
            let html = m.body_html(0).expect("an HTML part");
            assert!(html.contains("Grüße aus Zürich"), "{html}");
            if eight_bit_mime {
                assert!(r.eight_bit, "BODY=8BITMIME passed on");
                assert!(raw.contains("Content-Transfer-Encoding: 8bit"), "{raw}");
            } else {
                assert!(!r.eight_bit);
                assert!(r.data.iter().all(|b| b.is_ascii()), "7-bit only:\n{raw}");
                assert!(
                    raw.contains("Content-Transfer-Encoding: quoted-printable"),
                    "{raw}"
                );
            }
        }
        drop(postfix);
    }
}

/// AUTH against Postfix's own Cyrus SASL, over STARTTLS, as to a relay off
/// this host: PLAIN when offered, LOGIN when it is the only mechanism, and
/// a wrong password stops the campaign before any message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn campaign_with_auth_over_starttls_into_postfix() {
    let pki = crate::relays::pki();
    let w = World::new(Backend::Sqlite).await;
    w.seed(100).await;
    pki.write_to(w.dir.path());
    let sink = util::sink(Faults::default()).await;
    let (cert, key) = (
        w.path("cert.pem").display().to_string(),
        w.path("key.pem").display().to_string(),
    );
    let secret = [("BLAST_MTA_SASL_PASSWORD", "s3cret pw")];
    let tls = [
        "--tls-cert",
        &cert,
        "--tls-key",
        &key,
        "--sasl-user",
        "bulk",
    ];
    let postfix = Postfix::start_with_env(sink.local_addr().port(), &tls, &secret);
    let path = w.campaign("auth", "Hi", "Hello {{ first_name }}", None, "");
    let config = |password: &str| {
        let mut cfg = w.config(&path, None, 2);
        let relay = &mut cfg.delivery.relays[0];
        relay.port = postfix.port;
        relay.tls = blast::config::Tls::StartTls;
        relay.verify.ca_file = Some(w.path("ca.pem"));
        relay.user = Some("bulk".into());
        relay.password = Some(blast::config::Secret(password.into()));
        cfg
    };
    let err = blast::commands::send(&config("wrong"), Mode::Quiet, pending())
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("535"), "{err}");
    let s = blast::commands::send(&config("s3cret pw"), Mode::Quiet, pending())
        .await
        .unwrap_or_else(|e| panic!("{e}\nPostfix log:\n{}", postfix.log()));
    assert_eq!(s.sent, 100, "{s:?}");
    let log = postfix.log();
    assert!(
        log.contains("sasl_method=PLAIN, sasl_username=bulk@blast.invalid"),
        "{log}"
    );
    // Issue 13 part 8: with --sasl-user, relaying needs AUTH, even from
    // loopback.
    let refused = rcpt_reply(postfix.port, "someone@example.org");
    assert!(refused.starts_with("554"), "{refused}");
    // Only LOGIN offered: blast answers its challenges.
    let login = ["--sasl-mechs", "LOGIN"];
    let all: Vec<&str> = tls.iter().chain(login.iter()).copied().collect();
    postfix.reconfigure(sink.local_addr().port(), &all, &secret);
    let checks = blast::commands::check(&config("s3cret pw")).await.unwrap();
    assert!(checks[0].ok, "{checks:?}");
    assert!(
        checks[0].detail.contains("AUTH LOGIN accepted"),
        "{checks:?}"
    );
    assert!(checks[0].detail.contains("TLSv1_3"), "{checks:?}");
    util::wait_for(&sink, 100).await;
    assert_eq!(sink.stats().messages, 100);
}

/// Submits `data` over SMTP to 127.0.0.1:`port` as a remote MTA would: one
/// envelope, `MAIL FROM:<from>` (empty for a bounce), dot-stuffed DATA.
/// Panics on any reply that is not a success.
fn submit(port: u16, from: &str, to: &str, data: &[u8]) {
    let (mut w, mut r) = connect(port);
    let mut expect = |class: u8, what: &str| {
        let line = reply(&mut r);
        assert_eq!(line.as_bytes()[0], class, "{what}: {line}");
    };
    expect(b'2', "greeting");
    let mut say = |cmd: String, class: u8| {
        w.write_all(cmd.as_bytes()).unwrap();
        expect(class, &cmd);
    };
    say("EHLO mx.example.net\r\n".into(), b'2');
    say(format!("MAIL FROM:<{from}>\r\n"), b'2');
    say(format!("RCPT TO:<{to}>\r\n"), b'2');
    say("DATA\r\n".into(), b'3');
    let mut body = Vec::new();
    for line in String::from_utf8_lossy(data).split_inclusive('\n') {
        if line.starts_with('.') {
            body.push(b'.');
        }
        body.extend_from_slice(line.as_bytes());
    }
    if !body.ends_with(b"\r\n") {
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(b".\r\n");
    say(String::from_utf8(body).unwrap(), b'2');
    say("QUIT\r\n".into(), b'2');
}

/// An SMTP connection to 127.0.0.1:`port`: its writing and reading halves.
fn connect(port: u16) -> (TcpStream, BufReader<TcpStream>) {
    let stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    (stream.try_clone().unwrap(), BufReader::new(stream))
}

/// The last line of one (possibly multi-line) reply: the line with a space
/// after the code.
fn reply(r: &mut impl BufRead) -> String {
    let mut line = String::new();
    loop {
        line.clear();
        r.read_line(&mut line).unwrap();
        if line.as_bytes().get(3) != Some(&b'-') {
            return line;
        }
    }
}

/// The reply to `RCPT TO:<to>` from 127.0.0.1:`port`, without AUTH.
fn rcpt_reply(port: u16, to: &str) -> String {
    let (mut w, mut r) = connect(port);
    reply(&mut r);
    let mut last = String::new();
    for cmd in [
        "EHLO client.example.net\r\n".to_string(),
        "MAIL FROM:<news@example.com>\r\n".to_string(),
        format!("RCPT TO:<{to}>\r\n"),
    ] {
        w.write_all(cmd.as_bytes()).unwrap();
        last = reply(&mut r);
    }
    let _ = w.write_all(b"QUIT\r\n");
    last
}

/// Files in a quarantine Maildir (new/ and cur/).
fn quarantined(dir: &Path) -> Vec<PathBuf> {
    ["new", "cur"]
        .iter()
        .filter_map(|sub| std::fs::read_dir(dir.join(sub)).ok())
        .flatten()
        .map(|e| e.unwrap().path())
        .collect()
}

/// The full loop: a VERP campaign goes out through Postfix; a hard bounce, an
/// unsubscribe mail and a garbage mail come back to Postfix over SMTP, and
/// its pipe transport hands each to `blast bounce ingest --stdin`, running as
/// `nobody` on the campaign's SQLite database.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bounces_and_unsubscribes_come_back_through_postfix() {
    let w = World::new(Backend::Sqlite).await;
    w.seed(3).await;
    give_to_nobody(&w);
    let sink = util::sink(Faults::default()).await;
    let quarantine = w.path("quarantine");
    let postfix = Postfix::start_piping_to_blast(sink.local_addr().port(), &w.url, &quarantine);
    let (m1, m2) = send_verp_campaign(&w, &postfix, &sink).await;

    let db = w.db().await;
    mail_back(postfix.port, &m1, &m2);
    wait_for_the_pipe(&db, &quarantine, &postfix).await;
    assert_user1_bounced_and_user2_unsubscribed(&db).await;
    assert_one_bounce_event_for_user1(&db).await;
    assert_garbage_quarantined(&quarantine);
    assert_all_three_piped_at_the_first_try(&postfix, &sink).await;
    db.close().await;
    drop(postfix);
}

/// Gives the world's directory, database included, to `nobody`, whom the
/// pipe's blast runs as. The test's own connections run as root; SQLite
/// gives the -wal and -shm files a root process creates to the database
/// file's owner, so they do not lock nobody out.
fn give_to_nobody(w: &World) {
    let chown = Command::new("chown")
        .args(["-R", "nobody:"])
        .arg(w.dir.path())
        .status()
        .unwrap();
    assert!(chown.success());
}

/// Sends the "loop" campaign (VERP on bounce.example.com, a List-Unsubscribe
/// mailto on lists.example.com) to the three recipients through `postfix`,
/// waits until Postfix has relayed all three to `sink`, and returns what
/// user1 and user2 got.
async fn send_verp_campaign(w: &World, postfix: &Postfix, sink: &Sink) -> (Received, Received) {
    let path = w.campaign(
        "loop",
        "Hi",
        "Hello {{ id }}\n",
        None,
        "[bounces]\nverp = \"bounces+{campaign}-{recipient}-{sig}@bounce.example.com\"\n\
         [unsubscribe]\nurl = \"https://lists.example.com/u/{token}\"\n\
         mailto = \"unsubscribe+{token}@lists.example.com\"\n",
    );
    let mut cfg = w.config(&path, None, 2);
    cfg.delivery.relays[0].port = postfix.port;
    let s = blast::commands::send(&cfg, Mode::Quiet, pending())
        .await
        .unwrap();
    assert_eq!((s.sent, s.failed, s.deferred), (3, 0, 0), "{s:?}");
    util::wait_for(sink, 3).await;
    let got = sink.received();
    (
        only_to(&got, "user1@example.com"),
        only_to(&got, "user2@example.com"),
    )
}

/// What remote MTAs and people send back, over SMTP to Postfix on `port`: a
/// hard bounce to user1's VERP address (null sender), user2's mail to the
/// List-Unsubscribe mailto, and something nobody can use, to the bounce
/// domain.
fn mail_back(port: u16, m1: &Received, m2: &Received) {
    let mailto = header(&m2.data, "List-Unsubscribe")
        .unwrap()
        .split(['<', '>'])
        .find_map(|p| p.strip_prefix("mailto:").map(str::to_string))
        .unwrap();
    assert!(m1.mail_from.ends_with("@bounce.example.com"), "{m1:?}");
    assert!(mailto.ends_with("@lists.example.com"), "{mailto}");
    let bounce = dsn(
        &m1.mail_from,
        "user1@example.com",
        "5.1.1",
        "550 5.1.1 <user1@example.com>: Recipient address rejected: User unknown",
        &m1.data,
    );
    submit(port, "", &m1.mail_from, &bounce);
    submit(
        port,
        "user2@example.com",
        &mailto,
        &unsubscribe_mail(&m2.data),
    );
    submit(
        port,
        "",
        "bounces@bounce.example.com",
        b"%%% garbage 8c1e: no bounce, no signature %%%\r\n",
    );
}

/// Waits until the pipe has run blast on all three mails of [`mail_back`]:
/// user1 and user2 suppressed, something in the quarantine.
async fn wait_for_the_pipe(db: &Db, quarantine: &Path, postfix: &Postfix) {
    let what = "the pipe to run blast on all three";
    wait_until(what, Duration::from_millis(200), || async {
        let user1 = blast::suppress::reason(db, "user1@example.com")
            .await
            .unwrap();
        let user2 = blast::suppress::reason(db, "user2@example.com")
            .await
            .unwrap();
        match user1.is_some() && user2.is_some() && !quarantined(quarantine).is_empty() {
            true => Ok(()),
            false => Err(format!(
                "user1 {user1:?}, user2 {user2:?}, quarantine {:?}; log:\n{}",
                quarantined(quarantine),
                postfix.log()
            )),
        }
    })
    .await;
}

/// user1 is suppressed for the hard bounce, user2 for unsubscribing, user3
/// not at all.
async fn assert_user1_bounced_and_user2_unsubscribed(db: &Db) {
    let why = blast::suppress::reason(db, "user1@example.com")
        .await
        .unwrap()
        .unwrap();
    assert!(why.starts_with("hard bounce: 5.1.1"), "{why}");
    assert_eq!(
        blast::suppress::reason(db, "user2@example.com")
            .await
            .unwrap()
            .as_deref(),
        Some("unsubscribe")
    );
    assert_eq!(
        blast::suppress::reason(db, "user3@example.com")
            .await
            .unwrap(),
        None
    );
}

/// blast_bounces holds one event, the hard bounce, tied to user1 in the
/// "loop" campaign (from the VERP address).
async fn assert_one_bounce_event_for_user1(db: &Db) {
    use sqlx::Row;
    let rows = sqlx::query(
        "SELECT address, kind, class, status, campaign_id, recipient_id FROM blast_bounces",
    )
    .fetch_all(db.pool())
    .await
    .unwrap();
    assert_eq!(rows.len(), 1, "one event: the bounce");
    let campaign = blast::ledger::campaign_id(db, "loop")
        .await
        .unwrap()
        .unwrap();
    let r = &rows[0];
    assert_eq!(r.get::<String, _>(0), "user1@example.com");
    assert_eq!(r.get::<String, _>(1), "bounce");
    assert_eq!(r.get::<String, _>(2), "hard");
    assert_eq!(r.get::<Option<String>, _>(3).as_deref(), Some("5.1.1"));
    assert_eq!(r.get::<Option<i64>, _>(4), Some(campaign));
    assert_eq!(r.get::<Option<i64>, _>(5), Some(1));
}

/// The garbage is in the quarantine Maildir, with the pipe's R and O
/// headers on top: the null sender, and where it was sent. (pipe writes
/// LF line ends.)
fn assert_garbage_quarantined(quarantine: &Path) {
    let files = quarantined(quarantine);
    assert_eq!(files.len(), 1, "{files:?}");
    let q = std::fs::read_to_string(&files[0]).unwrap();
    let top: Vec<&str> = q.lines().take(2).collect();
    assert_eq!(
        top,
        [
            "Return-Path: <>",
            "X-Original-To: bounces@bounce.example.com"
        ],
        "{q}"
    );
    assert!(q.contains("garbage 8c1e"), "{q}");
}

/// Postfix delivered all three to blast at the first try (no exit 75),
/// relayed nothing of them to the sink (which has only the campaign's
/// three), and holds nothing.
async fn assert_all_three_piped_at_the_first_try(postfix: &Postfix, sink: &Sink) {
    wait_until(
        "Postfix's queue to empty",
        Duration::from_millis(100),
        || async {
            match postfix.queue_size() {
                0 => Ok(()),
                q => Err(format!("{q} queued; log:\n{}", postfix.log())),
            }
        },
    )
    .await;
    let log = postfix.log();
    let piped: Vec<&str> = log.lines().filter(|l| l.contains("relay=blast")).collect();
    assert_eq!(piped.len(), 3, "{log}");
    assert!(
        piped
            .iter()
            .all(|l| l.contains("status=sent (delivered via blast service")),
        "{log}"
    );
    assert!(!log.contains("status=deferred"), "{log}");
    assert_eq!(
        sink.stats().messages,
        3,
        "bounce mail went to the pipe only"
    );
}

/// Two tuned Postfix instances as two relays; one is stopped mid-campaign
/// and started again. Every recipient is delivered exactly once (duplicates
/// only for messages reported as possibly duplicated), the survivor takes
/// the traffic during the outage, and the other gets traffic again after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_postfix_relays_survive_one_going_down() {
    let n = 16000;
    let w = World::new(Backend::Sqlite).await;
    w.seed(n).await;
    let sink = util::sink(Faults::default()).await;
    let a = Postfix::start(sink.local_addr().port());
    let b = Postfix::start(sink.local_addr().port());
    let extra = format!(
        "[delivery]\nconcurrency = \"auto:8\"\nsmtp = [\"smtp://127.0.0.1:{}\", \"smtp://127.0.0.1:{}\"]\n",
        a.port, b.port
    );
    let path = w.campaign("two", "Hi", "Token {{ token }}", None, &extra);
    let cfg = blast::config::Config::load(&path, &Default::default()).unwrap();
    let run = util::spawn_send(&cfg);
    let db = w.db().await;
    let count = |relay_port: u16, from: String, to: String| {
        let db = db.clone();
        async move {
            let n: i64 = sqlx::query_scalar(
                "SELECT COUNT(*) FROM blast_deliveries WHERE relay = $1 AND updated_at >= $2 AND updated_at < $3",
            )
            .bind(format!("smtp://127.0.0.1:{relay_port}"))
            .bind(from)
            .bind(to)
            .fetch_one(db.pool())
            .await
            .unwrap();
            n
        }
    };
    let stamp = || blast::clock::db_timestamp(blast::clock::now());
    // Let both relays work, then take B down for 2 s.
    let what = "the campaign to record 600 deliveries";
    wait_until(what, Duration::from_millis(50), || async {
        match ledger_rows(&db, "two").await.len() {
            r if r >= 600 => Ok(()),
            r => Err(format!("{r} recorded")),
        }
    })
    .await;
    let t_stop = stamp();
    tokio::task::block_in_place(|| b.stop_keep_queue());
    let t_down = stamp();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let t_up = stamp();
    tokio::task::block_in_place(|| b.restart(sink.local_addr().port()));
    let summary = run.await.unwrap().unwrap();
    let t_end = stamp();
    assert_eq!(summary.sent, n as u64, "{summary:?}");

    // Both queues drain to the sink.
    for _ in 0..600 {
        if sink.stats().messages >= n as u64 && a.queue_size() == 0 && b.queue_size() == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Per recipient, the distinct Postfix queue ids it came through: two ids
    // mean blast submitted it twice. (One id seen twice is Postfix
    // delivering again after its own smtp client was stopped mid-delivery:
    // the MTA's at-least-once, invisible to blast.)
    let mut per: HashMap<String, std::collections::HashSet<String>> = HashMap::new();
    for r in sink.received() {
        let text = String::from_utf8_lossy(&r.data);
        let qid = text
            .lines()
            .find_map(|l| {
                l.trim()
                    .strip_prefix("id ")
                    .or_else(|| l.split(" id ").nth(1))
            })
            .and_then(|rest| rest.split([';', ' ']).next())
            .unwrap_or_default()
            .to_string();
        assert!(
            qid.len() >= 6,
            "no Postfix queue id in {:?}",
            &text[..text.len().min(300)]
        );
        per.entry(r.rcpt_to[0].clone()).or_default().insert(qid);
    }
    assert_eq!(per.len(), n as usize, "every recipient arrived");
    let twice = per.values().filter(|ids| ids.len() > 1).count() as u64;
    assert!(
        twice <= summary.possibly_duplicated,
        "{twice} submitted twice, {} reported possibly duplicated",
        summary.possibly_duplicated
    );

    let (a_before, b_before) = (
        count(a.port, "0".into(), t_stop.clone()).await,
        count(b.port, "0".into(), t_stop.clone()).await,
    );
    let (a_down, b_down) = (
        count(a.port, t_stop.clone(), t_up.clone()).await,
        count(b.port, t_down.clone(), t_up.clone()).await,
    );
    let b_after = count(b.port, t_up.clone(), t_end.clone()).await;
    eprintln!(
        "before: A {a_before} B {b_before}; down ({t_stop} - {t_down} - {t_up}): A {a_down} B {b_down}; after (to {t_end}): B {b_after}; {:?}",
        summary.relays
    );
    assert!(a_before > 0 && b_before > 0, "both relays took traffic");
    assert_eq!(b_down, 0, "nothing recorded through B while it was down");
    assert!(a_down > 0, "A carried the campaign during B's outage");
    assert!(b_after > 0, "B took traffic again after it came back");
    assert!(summary.relays[1].marks.connection > 0);
}

/// Issue 13 part 8: a local user can create the instance directory under
/// the world-writable /dev/shm before root runs the script, with a
/// `main.cf` that looks like the script's and links to what root would then
/// chown and chmod. `start` refuses, and what the links point at keeps its
/// owner and mode; so does a root-owned directory with a planted link.
#[test]
fn postfix_script_refuses_planted_directories_and_links() {
    use std::os::unix::fs::{lchown, symlink, MetadataExt, PermissionsExt};
    let nobody: u32 = String::from_utf8(
        Command::new("id")
            .args(["-u", "nobody"])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap()
    .trim()
    .parse()
    .unwrap();
    // Stands in for /etc: root's, mode 0750.
    let victim = tempfile::tempdir().unwrap();
    std::fs::set_permissions(victim.path(), std::fs::Permissions::from_mode(0o750)).unwrap();
    let dir = PathBuf::from(format!(
        "/dev/shm/blast-postfix-planted-{}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    let start = |dir: &Path| {
        Command::new("bash")
            .arg(script())
            .args(["start", "--dir"])
            .arg(dir)
            .args(["--port", "2599", "--discard"])
            .output()
            .unwrap()
    };
    let plant = |owner: u32| {
        std::fs::create_dir_all(dir.join("etc")).unwrap();
        std::fs::write(
            dir.join("etc/main.cf"),
            "# Written by blast scripts/mta/postfix.sh\n",
        )
        .unwrap();
        for link in ["spool", "data"] {
            let _ = std::fs::remove_file(dir.join(link));
            symlink(victim.path(), dir.join(link)).unwrap();
        }
        for p in ["", "etc", "etc/main.cf", "spool", "data"] {
            lchown(dir.join(p), Some(owner), Some(owner)).unwrap();
        }
    };
    let unchanged = || {
        let m = std::fs::metadata(victim.path()).unwrap();
        (m.uid(), m.gid(), m.mode() & 0o7777) == (0, 0, 0o750)
    };
    let mut outcomes = Vec::new();
    for owner in [nobody, 0] {
        plant(owner);
        let out = start(&dir);
        outcomes.push((
            owner,
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
            unchanged(),
        ));
    }
    let _ = std::fs::remove_dir_all(&dir);
    for (owner, ok, stderr, unchanged) in outcomes {
        assert!(!ok, "owner {owner}: start succeeded");
        assert!(unchanged, "owner {owner}: the link's target changed");
        let why = if owner == 0 {
            "symbolic link"
        } else {
            "refusing a directory this script did not create"
        };
        assert!(stderr.contains(why), "owner {owner}: {stderr}");
    }
}

/// Issue 15: `blast reconcile` against the log of a real Postfix. The sink
/// behind it refuses two recipients with 550 5.1.1 and defers two with 451:
/// after reconcile each recipient's MTA outcome is what the sink did, the
/// refused are suppressed, the injection's own status stays `sent`, and a
/// second run changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconcile_reads_what_postfix_did_with_each_recipient() {
    let n = 20;
    let w = World::new(Backend::Sqlite).await;
    w.seed(n).await;
    let refuse = |who: &str, code, enh: &str, text: &str| {
        (format!("{who}@"), code, enh.to_string(), text.to_string())
    };
    let sink = util::sink(Faults {
        rcpt_contains: vec![
            refuse("user3", 550, "5.1.1", "No such user"),
            refuse("user7", 550, "5.1.1", "No such user"),
            refuse("user5", 451, "4.3.0", "Try again later"),
            refuse("user9", 451, "4.3.0", "Try again later"),
        ],
        ..Faults::default()
    })
    .await;
    let postfix = Postfix::start(sink.local_addr().port());
    let path = w.campaign("reconcile", "Hi", "x", None, "");
    let mut cfg = w.config(&path, None, 4);
    cfg.delivery.relays[0].port = postfix.port;
    let s = blast::commands::send(&cfg, Mode::Quiet, pending())
        .await
        .unwrap();
    assert_eq!(s.sent, n as u64, "Postfix takes every message: {s:?}");

    // Wait for Postfix to try every recipient at the sink.
    let log = postfix.dir.join("maillog");
    wait_until(
        "Postfix to log every recipient's try",
        Duration::from_millis(200),
        || {
            let text = postfix.log();
            async move {
                let tried = text
                    .lines()
                    .filter(|l| {
                        l.contains("status=sent")
                            || l.contains("status=bounced")
                            || l.contains("status=deferred")
                    })
                    .filter(|l| l.contains("to=<user"))
                    .count();
                match tried >= n as usize {
                    true => Ok(()),
                    false => Err(format!("{tried} logged")),
                }
            }
        },
    )
    .await;

    let run = || {
        let out = util::blast()
            .args(["reconcile", "--json", "--database", &w.url, "--maillog"])
            .arg(&log)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    let first = run();
    assert_eq!(first["bounced"], 2, "{first}");
    assert_eq!(first["suppressed"], 2, "{first}");

    let db = w.db().await;
    let rows: Vec<(i64, String, Option<String>, Option<String>)> = sqlx::query_as(
        "SELECT recipient_id, status, mta_status, mta_dsn FROM blast_deliveries ORDER BY recipient_id",
    )
    .fetch_all(db.pool())
    .await
    .unwrap();
    assert_eq!(rows.len(), n as usize);
    for (id, status, mta, dsn) in &rows {
        assert_eq!(status, "sent", "the injection's status never changes");
        let (want, want_dsn) = match id {
            3 | 7 => ("bounced", "5.1.1"),
            5 | 9 => ("deferred", "4.3.0"),
            _ => ("delivered", "2.0.0"),
        };
        assert_eq!(mta.as_deref(), Some(want), "recipient {id}");
        assert_eq!(dsn.as_deref(), Some(want_dsn), "recipient {id}");
    }
    let suppressed: Vec<String> =
        sqlx::query_scalar("SELECT address FROM blast_suppressions ORDER BY address")
            .fetch_all(db.pool())
            .await
            .unwrap();
    assert_eq!(suppressed, vec!["user3@example.com", "user7@example.com"]);

    // Reading the same log again changes nothing.
    let second = run();
    assert_eq!(
        (&second["updated"], &second["suppressed"]),
        (&0.into(), &0.into()),
        "{second}"
    );
    let again: Vec<(i64, String, Option<String>, Option<String>)> = sqlx::query_as(
        "SELECT recipient_id, status, mta_status, mta_dsn FROM blast_deliveries ORDER BY recipient_id",
    )
    .fetch_all(db.pool())
    .await
    .unwrap();
    assert_eq!(again, rows);
    drop(postfix);
}
