//! Relays off this host: STARTTLS and implicit TLS with certificate checks,
//! AUTH PLAIN and LOGIN with the password from the environment, and
//! `from_domains` routing. The sink plays the relay, with a certificate from
//! a CA made for the test.

use std::time::Duration;

use blast::config::{Config, Overrides, Relay, Tls};
use blast::model::{Envelope, Outcome};
use blast::sink::{Faults, Sink, SinkAuth, SinkConfig};
use blast::tls::Verify;
use blast::transport::smtp::Smtp;
use blast::transport::{Session, Transport};

use crate::util::{Backend, World};

/// A CA and a server certificate it signed for `localhost` and 127.0.0.1.
pub(crate) struct Pki {
    pub(crate) ca_pem: String,
    pub(crate) cert_pem: String,
    pub(crate) key_pem: String,
}

impl Pki {
    /// Writes `ca.pem`, `cert.pem` and `key.pem` into `dir`.
    pub(crate) fn write_to(&self, dir: &std::path::Path) {
        for (name, pem) in [
            ("ca.pem", &self.ca_pem),
            ("cert.pem", &self.cert_pem),
            ("key.pem", &self.key_pem),
        ] {
            std::fs::write(dir.join(name), pem).unwrap();
        }
    }
}

pub(crate) fn pki() -> Pki {
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, "blast test CA");
    let ca = rcgen::CertifiedIssuer::self_signed(ca, rcgen::KeyPair::generate().unwrap()).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let leaf = rcgen::CertificateParams::new(vec!["localhost".into(), "127.0.0.1".into()])
        .unwrap()
        .signed_by(&key, &ca)
        .unwrap();
    Pki {
        ca_pem: ca.pem(),
        cert_pem: leaf.pem(),
        key_pem: key.serialize_pem(),
    }
}

fn account(mechanisms: &[&str]) -> SinkAuth {
    SinkAuth {
        user: "newsletter".into(),
        password: "s3cret pass".into(),
        mechanisms: mechanisms.iter().map(|m| m.to_string()).collect(),
        login_prompts: ("Username:".into(), "Password:".into()),
    }
}

async fn tls_sink(pki: Option<&Pki>, implicit: bool, auth: Option<SinkAuth>) -> Sink {
    Sink::start(SinkConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        keep_messages: true,
        tls: pki.map(|p| blast::tls::server_config_pem(&p.cert_pem, &p.key_pem).unwrap()),
        implicit_tls: implicit,
        auth,
        faults: Faults::default(),
        ..Default::default()
    })
    .await
    .unwrap()
}

fn envelope(i: i64) -> Envelope {
    Envelope {
        recipient_id: i,
        from: "bounces@example.com".into(),
        to: format!("r{i}@example.net"),
        eight_bit: false,
    }
}

/// Loads a campaign file with `env` standing in for the environment.
fn load(path: &std::path::Path, env: &[(&str, &str)]) -> blast::Result<Config> {
    let text = std::fs::read_to_string(path).unwrap();
    let env: Vec<(String, String)> = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    Config::parse(
        &text,
        &path.display().to_string(),
        path.parent().unwrap(),
        &Overrides::default(),
        &move |k| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone()),
    )
}

/// A whole campaign through STARTTLS and AUTH PLAIN: the CA comes from
/// `ca_file`, the password from the relay's `password_env`, and every
/// message arrives encrypted and authenticated.
#[tokio::test]
async fn campaign_over_starttls_with_auth() {
    let pki = pki();
    let sink = tls_sink(Some(&pki), false, Some(account(&["PLAIN", "LOGIN"]))).await;
    let w = World::new(Backend::Sqlite).await;
    w.seed(30).await;
    std::fs::write(w.path("ca.pem"), &pki.ca_pem).unwrap();
    let extra = format!(
        "[delivery]\nconcurrency = 3\nsmtp = [{{ url = \"smtp://newsletter@127.0.0.1:{}\", tls = \"starttls\", ca_file = \"ca.pem\", password_env = \"RELAY_PW\" }}]\n",
        sink.local_addr().port()
    );
    let path = w.campaign("tls", "Hi", "Hello {{ first_name }}", None, &extra);
    let err = load(&path, &[]).unwrap_err().to_string();
    assert!(
        err.contains("RELAY_PW") && err.contains("newsletter"),
        "a user without a password is refused when the file is read: {err}"
    );
    let cfg = load(&path, &[("RELAY_PW", "s3cret pass")]).unwrap();
    assert_eq!(cfg.delivery.relays[0].tls, Tls::StartTls);
    assert!(
        !format!("{cfg:?}").contains("s3cret"),
        "the password never shows in Debug output"
    );
    let summary = blast::commands::send(&cfg, blast::progress::Mode::Quiet, std::future::pending())
        .await
        .unwrap();
    assert_eq!(summary.sent, 30, "{summary:?}");
    let received = sink.received();
    assert_eq!(received.len(), 30);
    for r in &received {
        assert!(r.tls, "{} arrived in clear", r.rcpt_to[0]);
        assert_eq!(r.auth.as_deref(), Some("newsletter"));
    }
}

/// The same campaign with a wrong password stops before any message: a
/// refused login is the operator's to fix, not a passing fault.
#[tokio::test]
async fn refused_credentials_stop_the_campaign_before_any_message() {
    let pki = pki();
    let sink = tls_sink(Some(&pki), false, Some(account(&["PLAIN"]))).await;
    let w = World::new(Backend::Sqlite).await;
    w.seed(5).await;
    std::fs::write(w.path("ca.pem"), &pki.ca_pem).unwrap();
    let extra = format!(
        "[delivery]\nconcurrency = 1\nsmtp = [{{ url = \"smtp://newsletter@127.0.0.1:{}\", tls = \"starttls\", ca_file = \"ca.pem\" }}]\n",
        sink.local_addr().port()
    );
    let path = w.campaign("badpw", "Hi", "Hello", None, &extra);
    let cfg = load(&path, &[("BLAST_SMTP_PASSWORD", "wrong")]).unwrap();
    let err = blast::commands::send(&cfg, blast::progress::Mode::Quiet, std::future::pending())
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("535") && err.contains("AUTH"), "{err}");
    assert_eq!(sink.stats().messages, 0);
}

/// A relay that must speak STARTTLS but does not offer it is never used in
/// clear; one whose certificate nobody vouches for is refused too. Both
/// stop the campaign at once, before a MAIL command, naming the fix.
#[tokio::test]
async fn no_starttls_or_untrusted_certificate_stops_before_any_message() {
    let pki = pki();
    let plain = tls_sink(None, false, None).await;
    let untrusted = tls_sink(Some(&pki), false, None).await;
    let w = World::new(Backend::Sqlite).await;
    w.seed(5).await;
    for (name, sink, expect) in [
        ("plain", &plain, "does not offer STARTTLS"),
        ("untrusted", &untrusted, "ca_file"),
    ] {
        let extra = format!(
            "[delivery]\nconcurrency = 1\nsmtp = [{{ url = \"smtp://127.0.0.1:{}\", tls = \"starttls\" }}]\n",
            sink.local_addr().port()
        );
        let path = w.campaign(name, "Hi", "Hello", None, &extra);
        let cfg = load(&path, &[]).unwrap();
        let err = blast::commands::send(&cfg, blast::progress::Mode::Quiet, std::future::pending())
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains(expect), "{name}: {err}");
        assert_eq!(sink.stats().messages, 0, "{name}");
        assert!(sink.received().is_empty(), "{name}");
    }
}

fn relay(sink: &Sink, tls: Tls, verify: Verify, user: bool) -> Relay {
    Relay {
        host: "127.0.0.1".into(),
        port: sink.local_addr().port(),
        tls,
        verify,
        user: user.then(|| "newsletter".to_string()),
        password: user.then(|| blast::config::Secret("s3cret pass".into())),
        password_env: "BLAST_SMTP_PASSWORD".into(),
        weight: 1,
        ..Default::default()
    }
}

async fn send_three(relay: Relay) -> Result<Vec<Outcome>, String> {
    let smtp = Smtp::new(vec![relay], "test.example".into(), Duration::from_secs(5))
        .map_err(|e| e.to_string())?;
    let mut s = smtp.connect(0).await.map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    for i in 0..3 {
        let msg = format!("Subject: {i}\r\n\r\n.dot line\r\nbody {i}\r\n");
        out.push(s.send(&envelope(i), msg.as_bytes()).await.unwrap());
    }
    s.close().await;
    Ok(out)
}

/// Implicit TLS (smtps://) with a relay offering only AUTH LOGIN: the
/// client answers LOGIN's challenges, and the content survives TLS.
#[tokio::test]
async fn implicit_tls_with_auth_login() {
    let pki = pki();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("ca.pem"), &pki.ca_pem).unwrap();
    let sink = tls_sink(Some(&pki), true, Some(account(&["LOGIN"]))).await;
    let verify = Verify {
        ca_file: Some(dir.path().join("ca.pem")),
        danger_accept_invalid_certs: false,
    };
    let outcomes = send_three(relay(&sink, Tls::Implicit, verify, true))
        .await
        .unwrap();
    assert!(outcomes.iter().all(|o| matches!(o, Outcome::Sent { .. })));
    let received = sink.received();
    assert_eq!(received.len(), 3);
    assert!(received
        .iter()
        .all(|r| r.tls && r.auth.as_deref() == Some("newsletter")));
    assert_eq!(
        String::from_utf8_lossy(&received[1].data),
        "Subject: 1\r\n\r\n.dot line\r\nbody 1\r\n"
    );
}

/// AUTH LOGIN against servers whose prompts lettre does not know (none at
/// all, or localized): blast answers by position, user then password.
#[tokio::test]
async fn auth_login_with_unusual_prompts() {
    for prompts in [("", ""), ("Benutzername:", "Passwort:")] {
        let mut login = account(&["LOGIN"]);
        login.login_prompts = (prompts.0.into(), prompts.1.into());
        let sink = tls_sink(None, false, Some(login)).await;
        let outcomes = send_three(relay(&sink, Tls::None, Verify::default(), true))
            .await
            .unwrap_or_else(|e| panic!("{prompts:?}: {e}"));
        assert!(outcomes.iter().all(|o| matches!(o, Outcome::Sent { .. })));
        assert!(sink
            .received()
            .iter()
            .all(|r| r.auth.as_deref() == Some("newsletter")));
    }
}

/// `danger_accept_invalid_certs` encrypts without checking who answers;
/// without it the same relay is refused. AUTH is offered only after
/// STARTTLS, as with Postfix's `smtpd_tls_auth_only`.
#[tokio::test]
async fn danger_accept_invalid_certs_is_the_only_way_past_an_unknown_ca() {
    let pki = pki();
    let sink = tls_sink(Some(&pki), false, Some(account(&["PLAIN"]))).await;
    let refused = send_three(relay(&sink, Tls::StartTls, Verify::default(), true))
        .await
        .unwrap_err();
    assert!(
        refused.contains("certificate") || refused.contains("CA"),
        "{refused}"
    );
    let danger = Verify {
        ca_file: None,
        danger_accept_invalid_certs: true,
    };
    let outcomes = send_three(relay(&sink, Tls::StartTls, danger, true))
        .await
        .unwrap();
    assert_eq!(outcomes.len(), 3);
    assert!(sink.received().iter().all(|r| r.tls));
    // In clear, this relay offers no AUTH at all: the login is refused
    // locally, and no password crosses the wire.
    let clear = send_three(relay(&sink, Tls::None, Verify::default(), true))
        .await
        .unwrap_err();
    assert!(clear.contains("neither AUTH PLAIN nor LOGIN"), "{clear}");
    assert_eq!(sink.stats().messages, 3);
}

/// `from_domains`: a campaign uses only the relays allowed to carry its
/// From domain (or a parent domain), and one no relay may carry is refused
/// when the file is read.
#[tokio::test]
async fn from_domains_routes_a_campaign_to_its_relays() {
    let for_other = crate::util::sink(Faults::default()).await;
    let for_us = crate::util::sink(Faults::default()).await;
    let open = crate::util::sink(Faults::default()).await;
    let w = World::new(Backend::Sqlite).await;
    w.seed(40).await;
    let relays = |with_open: bool| {
        let mut s = format!(
            "[delivery]\nconcurrency = 4\nsmtp = [\n  {{ url = \"smtp://{}\", from_domains = [\"other.org\"] }},\n  {{ url = \"smtp://{}\", from_domains = [\"EXAMPLE.com\"] }},\n",
            for_other.local_addr(),
            for_us.local_addr()
        );
        if with_open {
            s.push_str(&format!("  \"smtp://{}\",\n", open.local_addr()));
        }
        s.push_str("]\n");
        s
    };
    // From is news@example.com (see util::World::campaign).
    let path = w.campaign("routed", "Hi", "Hello", None, &relays(false));
    let cfg = load(&path, &[]).unwrap();
    assert_eq!(cfg.delivery.relays.len(), 1);
    let summary = blast::commands::send(&cfg, blast::progress::Mode::Quiet, std::future::pending())
        .await
        .unwrap();
    assert_eq!(summary.sent, 40);
    assert_eq!(for_us.stats().messages, 40);
    assert_eq!(for_other.stats().messages, 0);

    let path = w.campaign("routed_open", "Hi", "Hello", None, &relays(true));
    let cfg = load(&path, &[]).unwrap();
    let names: Vec<String> = cfg.delivery.relays.iter().map(|r| r.to_string()).collect();
    assert_eq!(names.len(), 2, "{names:?}");
    assert!(!names.contains(&format!("smtp://{}", for_other.local_addr())));

    let text = std::fs::read_to_string(&path)
        .unwrap()
        .replace("news@example.com", "news@elsewhere.net")
        .replace(&format!("  \"smtp://{}\",\n", open.local_addr()), "");
    std::fs::write(&path, text).unwrap();
    let err = load(&path, &[]).unwrap_err().to_string();
    assert!(
        err.contains("elsewhere.net") && err.contains("from_domains"),
        "{err}"
    );
}

/// The sink refuses MAIL before AUTH when it requires a login, so the
/// tests above prove the client logged in rather than that nobody asked.
#[tokio::test]
async fn sink_requires_auth_before_mail() {
    let sink = tls_sink(None, false, Some(account(&["PLAIN"]))).await;
    let smtp = Smtp::new(
        vec![relay(&sink, Tls::None, Verify::default(), false)],
        "test.example".into(),
        Duration::from_secs(5),
    )
    .unwrap();
    let mut s = smtp.connect(0).await.unwrap();
    let o = s
        .send(&envelope(1), b"Subject: x\r\n\r\nx\r\n")
        .await
        .unwrap();
    assert_eq!(o.reply().code, Some(530), "{o:?}");
    s.close().await;
    assert_eq!(sink.stats().messages, 0);
}

/// A relay that answers 4xx to everything does not defer the campaign:
/// each message it refuses goes on to a relay that has not refused it, and
/// only a message every relay deferred is recorded as deferred.
#[tokio::test]
async fn a_relay_answering_4xx_hands_its_messages_to_another() {
    let busy = || Faults {
        mail_reply: Some((451, "4.3.2".into(), "System busy".into())),
        ..Default::default()
    };
    let good = crate::util::sink(Faults::default()).await;
    let refusing = crate::util::sink(busy()).await;
    let also_refusing = crate::util::sink(busy()).await;
    let w = World::new(Backend::Sqlite).await;
    w.seed(200).await;
    let two = |a: &Sink, b: &Sink| {
        format!(
            "[delivery]\nconcurrency = 8\nsmtp = [\"smtp://{}\", \"smtp://{}\"]\n",
            a.local_addr(),
            b.local_addr()
        )
    };
    let path = w.campaign("reroute", "Hi", "Hello", None, &two(&refusing, &good));
    let cfg = load(&path, &[]).unwrap();
    let s = blast::commands::send(&cfg, blast::progress::Mode::Quiet, std::future::pending())
        .await
        .unwrap();
    assert_eq!((s.sent, s.deferred, s.failed), (200, 0, 0), "{s:?}");
    assert!(s.rerouted > 0, "{s:?}");
    assert_eq!(good.stats().messages, 200);
    let mut ids: Vec<String> = good
        .received()
        .iter()
        .map(|r| r.rcpt_to[0].clone())
        .collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 200, "each recipient once");

    // Both relays defer: each message is tried on both, then recorded as
    // deferred (to be retried on the retry schedule), never looping.
    let w = World::new(Backend::Sqlite).await;
    w.seed(50).await;
    let path = w.campaign("both", "Hi", "Hello", None, &two(&refusing, &also_refusing));
    let cfg = load(&path, &[]).unwrap();
    let s = blast::commands::send(&cfg, blast::progress::Mode::Quiet, std::future::pending())
        .await
        .unwrap();
    assert_eq!((s.sent, s.deferred), (0, 50), "{s:?}");
    assert!(s.rerouted <= 50, "{s:?}");
    let db = w.db().await;
    let rows = crate::util::ledger_rows(&db, "both").await;
    assert_eq!(rows.len(), 50);
    assert!(
        rows.iter().all(|r| r.1 == "deferred" && r.2 == Some(451)),
        "{:?}",
        &rows[..3]
    );
}

/// Rerouting never waits for a relay that cannot take the message: one with
/// no injector (fixed concurrency below the number of relays) or one whose
/// connections fail. The campaign ends, every message deferred, none lost.
#[tokio::test]
async fn rerouting_ends_when_no_other_relay_can_take_the_message() {
    let refusing = crate::util::sink(Faults {
        mail_reply: Some((451, "4.3.2".into(), "System busy".into())),
        ..Default::default()
    })
    .await;
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let closed_port = closed.local_addr().unwrap().port();
    drop(closed);
    for (name, concurrency, other) in [
        // One injector for two relays: the second gets none.
        (
            "no_injector",
            1,
            format!(
                "smtp://{}",
                crate::util::sink(Faults::default()).await.local_addr()
            ),
        ),
        // The second relay refuses connections.
        ("down", 4, format!("smtp://127.0.0.1:{closed_port}")),
    ] {
        let w = World::new(Backend::Sqlite).await;
        w.seed(30).await;
        let extra = format!(
            "[delivery]\nconcurrency = {concurrency}\nsmtp = [\"smtp://{}\", \"{other}\"]\n",
            refusing.local_addr()
        );
        let path = w.campaign(name, "Hi", "Hello", None, &extra);
        let cfg = load(&path, &[]).unwrap();
        let send =
            blast::commands::send(&cfg, blast::progress::Mode::Quiet, std::future::pending());
        let s = tokio::time::timeout(Duration::from_secs(60), send)
            .await
            .unwrap_or_else(|_| panic!("{name}: the campaign hung"))
            .unwrap();
        assert_eq!((s.sent, s.deferred), (0, 30), "{name}: {s:?}");
        let db = w.db().await;
        assert_eq!(
            crate::util::ledger_rows(&db, name).await.len(),
            30,
            "{name}"
        );
    }
}

/// A relay that stops offering STARTTLS in the middle of a campaign (here:
/// replaced by one in clear on the same port) is never used in clear: with
/// no other relay, the campaign pauses with the reason, and after `resume`
/// against a relay with TLS again every recipient is sent exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starttls_gone_mid_run_pauses_the_campaign() {
    let pki = pki();
    let w = World::new(Backend::Sqlite).await;
    w.seed(300).await;
    std::fs::write(w.path("ca.pem"), &pki.ca_pem).unwrap();
    let slow = |tls: bool| SinkConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        keep_messages: true,
        tls: tls.then(|| blast::tls::server_config_pem(&pki.cert_pem, &pki.key_pem).unwrap()),
        faults: Faults {
            latency: Some(Duration::from_millis(5)),
            ..Default::default()
        },
        ..Default::default()
    };
    let first = Sink::start(slow(true)).await.unwrap();
    let addr = first.local_addr();
    let extra = format!(
        "[delivery]\nconcurrency = 2\nsmtp = [{{ url = \"smtp://{addr}\", tls = \"starttls\", ca_file = \"ca.pem\" }}]\n"
    );
    let path = w.campaign("gone", "Hi", "Hello", None, &extra);
    let cfg = load(&path, &[]).unwrap();
    let run = crate::util::spawn_send(&cfg);
    crate::util::wait_for(&first, 50).await;
    let before = first.shutdown().await;
    // The same address, in clear.
    let clear = Sink::start(SinkConfig {
        listen: addr,
        ..slow(false)
    })
    .await
    .unwrap();
    let s_first = tokio::time::timeout(Duration::from_secs(60), run)
        .await
        .expect("the campaign stopped")
        .unwrap()
        .unwrap();
    assert!(
        s_first
            .breaker
            .as_deref()
            .unwrap_or_default()
            .contains("STARTTLS"),
        "{s_first:?}"
    );
    assert!(clear.received().is_empty(), "nothing went out in clear");
    assert_eq!(clear.stats().messages, 0);
    assert_eq!(blast::commands::status(&cfg).await.unwrap().state, "paused");
    clear.shutdown().await;

    let again = Sink::start(SinkConfig {
        listen: addr,
        ..slow(true)
    })
    .await
    .unwrap();
    blast::commands::control(&w.url, "gone", blast::commands::Control::Resume, None)
        .await
        .unwrap();
    let s = blast::commands::send(&cfg, blast::progress::Mode::Quiet, std::future::pending())
        .await
        .unwrap();
    assert_eq!(s.breaker, None, "{s:?}");
    let mut ids: Vec<String> = before
        .iter()
        .chain(again.received().iter())
        .map(|r| r.rcpt_to[0].clone())
        .collect();
    let total = ids.len();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 300, "every recipient");
    assert!(
        total - 300 <= s_first.possibly_duplicated as usize,
        "twice only when reported: {total} arrivals, {s_first:?}"
    );
    assert!(again.received().iter().all(|r| r.tls));
}
