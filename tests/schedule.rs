//! Scheduled campaigns: frozen specs, run-due, concurrent run-due, holds.

use std::future::pending;
use std::time::Duration;

use blast::commands::Control;
use blast::progress::Mode;
use blast::schedule::{self, Due};
use blast::sink::Faults;

use crate::util::{self, header, Backend, World};

fn at(s: &str) -> time::OffsetDateTime {
    time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).unwrap()
}

/// Past due: run-due sends it, with the templates as they were when it was
/// scheduled; not yet due: nothing happens.
#[tokio::test]
async fn run_due_sends_frozen_campaigns_when_due() {
    let w = World::new(Backend::Sqlite).await;
    w.seed(20).await;
    let sink = util::sink(Faults::default()).await;
    let due = w.campaign("due", "Version one {{ first_name }}", "x", None, "");
    let later = w.campaign("later", "Later", "x", None, "");
    for (path, when) in [
        (&due, "2026-01-01T00:00:00Z"),
        (&later, "2099-01-01T00:00:00Z"),
    ] {
        // The relay is part of the frozen file.
        let text = std::fs::read_to_string(path).unwrap()
            + &format!("[delivery]\nsmtp = \"smtp://{}\"\n", sink.local_addr());
        std::fs::write(
            path,
            text.replace("name = ", "max_delay = \"100000d\"\nname = "),
        )
        .unwrap();
        let cfg = w.config(path, None, 2);
        schedule::schedule(&cfg, path, at(when)).await.unwrap();
    }
    // Edits after scheduling change nothing.
    std::fs::write(
        &due,
        std::fs::read_to_string(&due)
            .unwrap()
            .replace("Version one", "Version two"),
    )
    .unwrap();

    let report = schedule::run_due(&w.url, None, Mode::Quiet, pending())
        .await
        .unwrap();
    assert_eq!(report.len(), 1, "{report:?}");
    assert!(
        matches!(&report[0], Due::Sent { campaign, summary } if campaign == "due" && summary.sent == 20),
        "{report:?}"
    );
    assert!(sink.received().iter().all(|r| header(&r.data, "Subject")
        .unwrap()
        .starts_with("Version one")));

    let db = w.db().await;
    let list = blast::ledger::list(&db).await.unwrap();
    let later_row = list.iter().find(|r| r.campaign == "later").unwrap();
    assert_eq!(later_row.state, "scheduled");
    assert_eq!(
        later_row.next_due.as_deref(),
        Some("2099-01-01T00:00:00.000Z")
    );
    assert_eq!(
        list.iter().find(|r| r.campaign == "due").unwrap().state,
        "finished"
    );

    // Nothing due any more.
    assert!(schedule::run_due(&w.url, None, Mode::Quiet, pending())
        .await
        .unwrap()
        .is_empty());
}

/// Two run-due started at the same moment send each recipient once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_run_due_never_double_sends() {
    let w = World::new(Backend::Sqlite).await;
    w.seed(1000).await;
    let sink = util::slow_sink(Duration::from_millis(1)).await;
    let path = w.campaign("race", "Hi", "x", None, "");
    let text = std::fs::read_to_string(&path).unwrap()
        + &format!("[delivery]\nsmtp = \"smtp://{}\"\n", sink.local_addr());
    std::fs::write(
        &path,
        text.replace("name = ", "max_delay = \"100000d\"\nname = "),
    )
    .unwrap();
    schedule::schedule(&w.config(&path, None, 2), &path, at("2026-01-01T00:00:00Z"))
        .await
        .unwrap();
    let (a, b) = tokio::join!(
        schedule::run_due(&w.url, None, Mode::Quiet, pending()),
        schedule::run_due(&w.url, None, Mode::Quiet, pending())
    );
    let (a, b) = (a.unwrap(), b.unwrap());
    let sent: u64 = a
        .iter()
        .chain(b.iter())
        .map(|d| {
            if let Due::Sent { summary, .. } = d {
                summary.sent
            } else {
                0
            }
        })
        .sum();
    assert_eq!(sent, 1000, "{a:?} {b:?}");
    let count = util::per_recipient(&sink.received());
    assert_eq!(count.len(), 1000);
    assert!(count.values().all(|&c| c == 1));
}

/// Far overdue: held and reported, not sent; `resume` releases it.
#[tokio::test]
async fn overdue_campaigns_are_held() {
    let w = World::new(Backend::Sqlite).await;
    w.seed(5).await;
    let sink = util::sink(Faults::default()).await;
    let path = w.campaign("old", "Hi", "x", None, "");
    let text = std::fs::read_to_string(&path).unwrap()
        + &format!("[delivery]\nsmtp = \"smtp://{}\"\n", sink.local_addr());
    std::fs::write(
        &path,
        text.replace("name = ", "max_delay = \"1h\"\nname = "),
    )
    .unwrap();
    schedule::schedule(&w.config(&path, None, 1), &path, at("2020-01-01T00:00:00Z"))
        .await
        .unwrap();
    let report = schedule::run_due(&w.url, None, Mode::Quiet, pending())
        .await
        .unwrap();
    assert!(
        matches!(&report[..], [Due::Held { reason, .. }] if reason.contains("overdue")),
        "{report:?}"
    );
    assert_eq!(sink.stats().messages, 0);
    blast::commands::control(&w.url, "old", Control::Resume, None)
        .await
        .unwrap();
    let report = schedule::run_due(&w.url, None, Mode::Quiet, pending())
        .await
        .unwrap();
    assert!(
        matches!(&report[..], [Due::Sent { summary, .. }] if summary.sent == 5),
        "{report:?}"
    );
}

/// Issue 12: a reboot (SIGTERM) or a crash (SIGKILL) in the middle of
/// `blast run-due` leaves the campaign `stopped` or `running`; the next
/// `run-due` finishes it, and nobody is skipped.
async fn run_due_interrupted_then_finished(signal: &str, left_in: &str) {
    let n = 1500;
    let w = World::new(Backend::Sqlite).await;
    w.seed(n).await;
    let sink = util::slow_sink(Duration::from_millis(2)).await;
    let path = w.campaign("reboot", "Hi", "x", None, "");
    let text = std::fs::read_to_string(&path).unwrap()
        + &format!(
            "[delivery]\nsmtp = \"smtp://{}\"\nconcurrency = 4\n",
            sink.local_addr()
        );
    std::fs::write(
        &path,
        text.replace("name = ", "max_delay = \"100000d\"\nname = "),
    )
    .unwrap();
    schedule::schedule(&w.config(&path, None, 4), &path, at("2026-01-01T00:00:00Z"))
        .await
        .unwrap();
    let child = util::blast()
        .args(["run-due", "--database", &w.url, "--progress", "none"])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    util::wait_for(&sink, 200).await;
    crate::util::stop_with(signal, child).await;
    let first = sink.stats().messages;
    assert!(
        first < n as u64,
        "interrupted before the end ({first} sent)"
    );
    let db = w.db().await;
    let state: String =
        sqlx::query_scalar("SELECT state FROM blast_campaigns WHERE name = 'reboot'")
            .fetch_one(db.pool())
            .await
            .unwrap();
    assert_eq!(state, left_in);

    let report = schedule::run_due(&w.url, None, Mode::Quiet, pending())
        .await
        .unwrap();
    assert!(
        matches!(report.as_slice(), [Due::Sent { summary, .. }] if !summary.interrupted),
        "{report:?}"
    );
    let count = util::per_recipient(&sink.received());
    assert_eq!(count.len(), n as usize, "nobody skipped");
    // Only messages the killed run had not recorded can go out twice: at
    // most one per injector plus the ledger's unflushed window.
    let twice = count.values().filter(|&&c| c > 1).count();
    assert!(
        twice <= 4 + 2 * blast::ledger::FLUSH_ROWS,
        "{twice} sent twice"
    );
    if signal == "-TERM" {
        assert_eq!(twice, 0, "a SIGTERM flushes the ledger before exiting");
    }
    let state: String =
        sqlx::query_scalar("SELECT state FROM blast_campaigns WHERE name = 'reboot'")
            .fetch_one(db.pool())
            .await
            .unwrap();
    assert_eq!(state, "finished");
    db.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_due_finishes_a_campaign_stopped_by_sigterm() {
    run_due_interrupted_then_finished("-TERM", "stopped").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_due_finishes_a_campaign_left_running_by_sigkill() {
    run_due_interrupted_then_finished("-KILL", "running").await;
}

/// A sink that accepts AUTH as `ann` / `stolen-secret` over loopback.
async fn auth_sink() -> blast::sink::Sink {
    blast::sink::Sink::start(blast::sink::SinkConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        keep_messages: true,
        auth: Some(blast::sink::SinkAuth {
            user: "ann".into(),
            password: "stolen-secret".into(),
            mechanisms: vec!["PLAIN".into()],
            login_prompts: ("Username:".into(), "Password:".into()),
        }),
        ..Default::default()
    })
    .await
    .unwrap()
}

/// Schedules a harmless campaign named `name`, then overwrites its stored
/// spec as someone with write access to the database could: `toml` is the
/// stored campaign file, `files` its frozen files.
async fn plant_spec(w: &World, name: &str, toml: &str, files: &[(&str, &str)]) {
    let path = w.campaign(name, "Hi", "x", None, "");
    schedule::schedule(&w.config(&path, None, 1), &path, at("2026-01-01T00:00:00Z"))
        .await
        .unwrap();
    let spec = schedule::Spec {
        file_name: "campaign.toml".into(),
        campaign_toml: toml.to_string(),
        templates: files
            .iter()
            .map(|(n, b)| (n.to_string(), b.to_string()))
            .collect(),
    };
    let db = w.db().await;
    sqlx::query("UPDATE blast_campaigns SET spec = $1 WHERE name = $2")
        .bind(serde_json::to_string(&spec).unwrap())
        .bind(name)
        .execute(db.pool())
        .await
        .unwrap();
    db.close().await;
}

/// A stored campaign file for `name` sending `text` through `relay`.
fn stored_toml(w: &World, name: &str, text: &str, delivery: &str) -> String {
    format!(
        "name = \"{name}\"\ndatabase = \"{url}\"\nmax_delay = \"100000d\"\n[audience]\ntable = \"subscribers\"\n\
         [unsubscribe]\nurl = \"https://lists.example.com/unsubscribe/{{token}}\"\n\
         [message]\nfrom = \"Test <news@example.com>\"\nsubject = \"Hi\"\ntext = {text:?}\n\
         [delivery]\n{delivery}\n",
        url = w.url
    )
}

/// A unique path in the system temp folder, removed first.
fn tmp_victim(tag: &str) -> std::path::PathBuf {
    let p = std::env::temp_dir().join(format!("blast-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_file(&p);
    p
}

/// Issue 13 part 7: a stored template named by an absolute path is
/// written under a name blast chooses, never over the operator's file.
#[tokio::test]
async fn stored_absolute_template_name_does_not_overwrite_that_file() {
    let w = World::new(Backend::Sqlite).await;
    w.seed(3).await;
    let sink = util::sink(Faults::default()).await;
    let live = w.path("live-template.txt");
    std::fs::write(&live, "the operator's live template").unwrap();
    let name = live.display().to_string();
    let relay = format!("smtp = \"smtp://{}\"", sink.local_addr());
    plant_spec(
        &w,
        "abs",
        &stored_toml(&w, "abs", &name, &relay),
        &[(&name, "planted")],
    )
    .await;
    let report = schedule::run_due(&w.url, None, Mode::Quiet, pending())
        .await
        .unwrap();
    assert_eq!(
        std::fs::read_to_string(&live).unwrap(),
        "the operator's live template"
    );
    // The stored text is still what is sent: it is data.
    assert!(
        matches!(&report[0], Due::Sent { summary, .. } if summary.sent == 3),
        "{report:?}"
    );
    assert!(sink
        .received()
        .iter()
        .all(|r| String::from_utf8_lossy(&r.data).contains("planted")));
}

/// Issue 13 part 7: a stored template named `../x` writes nothing outside
/// run-due's temporary folder.
#[tokio::test]
async fn stored_dotdot_template_name_writes_nothing_outside() {
    let w = World::new(Backend::Sqlite).await;
    w.seed(2).await;
    let sink = util::sink(Faults::default()).await;
    let victim = tmp_victim("dotdot-escape");
    let name = format!("../{}", victim.file_name().unwrap().to_string_lossy());
    let relay = format!("smtp = \"smtp://{}\"", sink.local_addr());
    plant_spec(
        &w,
        "dotdot",
        &stored_toml(&w, "dotdot", &name, &relay),
        &[(&name, "escaped")],
    )
    .await;
    let report = schedule::run_due(&w.url, None, Mode::Quiet, pending())
        .await
        .unwrap();
    let escaped = victim.exists();
    let _ = std::fs::remove_file(&victim);
    assert!(!escaped, "run-due wrote {}", victim.display());
    assert!(
        matches!(&report[0], Due::Sent { summary, .. } if summary.sent == 2),
        "{report:?}"
    );
}

/// Issue 13 part 7: a stored `queue_probe` is a command from the database:
/// run-due ignores it (only its own `--queue-probe` runs).
#[tokio::test]
async fn stored_queue_probe_is_not_run() {
    let w = World::new(Backend::Sqlite).await;
    w.seed(2).await;
    let sink = util::sink(Faults::default()).await;
    let pwned = tmp_victim("pwned");
    let delivery = format!(
        "smtp = \"smtp://{}\"\nconcurrency = \"auto\"\nqueue_probe = \"touch '{}'; echo 0\"",
        sink.local_addr(),
        pwned.display()
    );
    plant_spec(
        &w,
        "probe",
        &stored_toml(&w, "probe", "body.txt", &delivery),
        &[("body.txt", "x")],
    )
    .await;
    let report = schedule::run_due(&w.url, None, Mode::Quiet, pending())
        .await
        .unwrap();
    let ran = pwned.exists();
    let _ = std::fs::remove_file(&pwned);
    assert!(!ran, "the stored queue_probe ran");
    assert!(
        matches!(&report[0], Due::Sent { summary, .. } if summary.sent == 2),
        "{report:?}"
    );
}

/// Issue 13 part 7: a stored relay's `password_env` names a variable of
/// the cron host's environment; run-due does not read it unless the host
/// allows that name (`--password-env`), and sends nothing.
#[tokio::test]
async fn stored_password_env_is_not_read() {
    let w = World::new(Backend::Sqlite).await;
    w.seed(2).await;
    let sink = auth_sink().await;
    std::env::set_var("BLAST_TEST_STOLEN_SECRET", "stolen-secret");
    let delivery = format!(
        "smtp = [{{ url = \"smtp://{}\", user = \"ann\", password_env = \"BLAST_TEST_STOLEN_SECRET\" }}]",
        sink.local_addr()
    );
    plant_spec(
        &w,
        "pw",
        &stored_toml(&w, "pw", "body.txt", &delivery),
        &[("body.txt", "x")],
    )
    .await;
    let report = schedule::run_due(&w.url, None, Mode::Quiet, pending())
        .await
        .unwrap();
    assert!(sink.received().is_empty(), "sent with the stolen password");
    assert!(
        matches!(&report[0], Due::Failed { error, .. } if error.contains("BLAST_TEST_STOLEN_SECRET")),
        "{report:?}"
    );
}
