use std::future::pending;
use std::path::Path;

use blast::import::{import_file, ImportOptions, RowError};
use blast::progress::Mode;
use blast::sink::Faults;

use crate::util::{self, blast, header, Backend, World};

fn fixture() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/csv/subscribers_mixed.csv")
}

/// The mixed CSV on a real database: bad rows reported by line, good rows
/// imported, and their columns reach the templates by name.
async fn import_then_send(backend: Backend) {
    let w = World::new(backend).await;
    let db = w.db().await;
    let mut errors: Vec<RowError> = Vec::new();
    let report = import_file(
        &db,
        &fixture(),
        &ImportOptions::default(),
        &mut |e| errors.push(e.clone()),
        &mut |_| {},
    )
    .await
    .unwrap();
    assert_eq!(
        (
            report.rows,
            report.imported,
            report.duplicates,
            report.invalid
        ),
        (13, 7, 2, 4),
        "{report:?}"
    );
    let lines: Vec<u64> = errors.iter().map(|e| e.line).collect();
    assert_eq!(lines, vec![5, 6, 9, 10, 13, 15]);
    db.close().await;

    let sink = util::sink(Faults::default()).await;
    let path = w.campaign(
        "imported",
        "Hi {{ name }} from {{ city | default(value='?') }}",
        "x",
        None,
        "",
    );
    let cfg = w.config(&path, Some(&sink), 2);
    let s = blast::commands::send(&cfg, Mode::Quiet, pending())
        .await
        .unwrap();
    assert_eq!(s.sent, 7, "{s:?}");
    let subjects: Vec<String> = sink
        .received()
        .iter()
        .map(|r| header(&r.data, "Subject").unwrap())
        .collect();
    assert!(
        subjects.contains(&"Hi Alice from Berlin".to_string()),
        "{subjects:?}"
    );
    assert!(
        subjects.iter().any(|s| s.starts_with("=?utf-8?")),
        "non-ASCII subjects are encoded: {subjects:?}"
    );
    assert!(sink
        .received()
        .iter()
        .any(|r| r.rcpt_to[0] == "jose@xn--bcher-kva.example"));
}

#[tokio::test]
async fn import_then_send_sqlite() {
    import_then_send(Backend::Sqlite).await;
}

#[tokio::test]
async fn import_then_send_postgres() {
    import_then_send(Backend::Postgres).await;
}

/// `blast import` from the command line: errors on stderr with line numbers,
/// the summary, exit code 1 because rows were skipped.
#[test]
fn import_command_reports_bad_rows() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("i.db").display());
    let out = blast()
        .args([
            "import",
            fixture().to_str().unwrap(),
            "--database",
            &url,
            "--json",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("line 6: invalid email \"not-an-email\""),
        "{stderr}"
    );
    assert!(
        stderr.contains("line 9:") && stderr.contains("columns"),
        "{stderr}"
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["imported"], 7);
}
