//! One address, one identity (issue 13, part 2): blanks, case and IDN forms
//! of one address are one person for suppression and for import's
//! duplicate check, on both backends.

use blast::import::{ImportOptions, RowProblem};
use blast::sink::{Faults, Received};

use crate::util::{blast, sink, spawn_send, Backend, World};

/// Sends campaign `name` to audience table `table`; returns what the sink
/// got and the summary's (sent, suppressed).
async fn send_to(w: &World, name: &str, table: &str) -> (Vec<Received>, (u64, u64)) {
    let s = sink(Faults::default()).await;
    let path = w.campaign(name, "Hi", "Hello\n", None, "");
    let toml = std::fs::read_to_string(&path)
        .unwrap()
        .replace("table = \"subscribers\"", &format!("table = \"{table}\""));
    std::fs::write(&path, toml).unwrap();
    let cfg = w.config(&path, Some(&s), 2);
    let summary = spawn_send(&cfg).await.unwrap().unwrap();
    (s.shutdown().await, (summary.sent, summary.suppressed))
}

/// `blast suppress add ADDRESS`, as an operator types it, last week: the
/// audience query must skip it (a running campaign also watches for
/// suppressions made since shortly before it started).
async fn suppress_cli(w: &World, address: &str) {
    let out = blast()
        .args(["suppress", "add", address, "--database", &w.url])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    w.exec("UPDATE blast_suppressions SET created_at = '2026-01-01T00:00:00.000Z'")
        .await;
}

/// A custom audience table whose address has a leading blank gets nothing
/// once the address is suppressed.
async fn padded_address_in_a_custom_table_is_suppressed(backend: Backend) {
    let w = World::new(backend).await;
    w.exec("CREATE TABLE people (id BIGINT PRIMARY KEY, email TEXT NOT NULL)")
        .await;
    w.exec("INSERT INTO people (id, email) VALUES (1, ' bob@x.com'), (2, 'carol@x.com')")
        .await;
    suppress_cli(&w, "bob@x.com").await;
    let (got, (sent, suppressed)) = send_to(&w, "padded", "people").await;
    let to: Vec<&str> = got.iter().map(|m| m.rcpt_to[0].as_str()).collect();
    assert_eq!(to, ["carol@x.com"]);
    assert_eq!((sent, suppressed), (1, 1));
}

#[tokio::test]
async fn issue13_padded_address_in_a_custom_table_is_suppressed_sqlite() {
    padded_address_in_a_custom_table_is_suppressed(Backend::Sqlite).await;
}

#[tokio::test]
async fn issue13_padded_address_in_a_custom_table_is_suppressed_postgres() {
    padded_address_in_a_custom_table_is_suppressed(Backend::Postgres).await;
}

/// Upper-case non-ASCII in the domain (SQLite's lower() folds ASCII only),
/// and the punycode form, are the address that was suppressed.
async fn idn_case_and_punycode_are_one_person(backend: Backend) {
    let w = World::new(backend).await;
    w.exec("CREATE TABLE people (id BIGINT PRIMARY KEY, email TEXT NOT NULL)")
        .await;
    w.exec(
        "INSERT INTO people (id, email) VALUES \
         (1, 'A@BÜCHER.example'), (2, 'b@xn--bcher-kva.example'), (3, 'c@bücher.example')",
    )
    .await;
    suppress_cli(&w, "a@bücher.example").await;
    suppress_cli(&w, "B@Bücher.Example").await;
    let (got, (sent, suppressed)) = send_to(&w, "idn", "people").await;
    let to: Vec<&str> = got.iter().map(|m| m.rcpt_to[0].as_str()).collect();
    assert_eq!(to, ["c@xn--bcher-kva.example"]);
    assert_eq!((sent, suppressed), (1, 2));
}

#[tokio::test]
async fn issue13_idn_case_and_punycode_are_one_person_sqlite() {
    idn_case_and_punycode_are_one_person(Backend::Sqlite).await;
}

#[tokio::test]
async fn issue13_idn_case_and_punycode_are_one_person_postgres() {
    idn_case_and_punycode_are_one_person(Backend::Postgres).await;
}

/// Import: the punycode and Unicode forms of one address are a duplicate,
/// whether in one file or across imports, with upsert or without; and a
/// suppression of either form covers both.
async fn import_punycode_and_unicode_are_duplicates(backend: Backend) {
    let w = World::new(backend).await;
    let db = w.db().await;
    for upsert in [false, true] {
        let csv = "email,name\na@xn--bcher-kva.example,P\nA@BÜCHER.example,U\n";
        let mut errors = Vec::new();
        let opts = ImportOptions {
            upsert,
            ..Default::default()
        };
        let report = blast::import::import_from(
            &db,
            "t.csv",
            csv.as_bytes(),
            &opts,
            &mut |e| errors.push((e.line, e.reason.clone())),
            &mut |_| {},
        )
        .await
        .unwrap();
        let (imported, updated) = if upsert { (0, 1) } else { (1, 0) };
        assert_eq!(
            (report.imported, report.updated, report.duplicates),
            (imported, updated, 1),
            "upsert {upsert}: {report:?}"
        );
        assert_eq!(errors, [(3, RowProblem::Duplicate)], "upsert {upsert}");
    }
    let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM subscribers")
        .fetch_one(db.pool())
        .await
        .unwrap();
    assert_eq!(n, 1);
    blast::suppress::add(&db, "a@bücher.example", "operator", "operator")
        .await
        .unwrap();
    assert!(blast::suppress::reason(&db, "a@xn--bcher-kva.example")
        .await
        .unwrap()
        .is_some());
    db.close().await;
}

#[tokio::test]
async fn issue13_import_punycode_and_unicode_are_duplicates_sqlite() {
    import_punycode_and_unicode_are_duplicates(Backend::Sqlite).await;
}

#[tokio::test]
async fn issue13_import_punycode_and_unicode_are_duplicates_postgres() {
    import_punycode_and_unicode_are_duplicates(Backend::Postgres).await;
}

/// A database from before schema v6: opening it fills `email_key` (the
/// first of two rows with one address keeps it) and rewrites suppressions
/// to the canonical form, once.
async fn old_rows_get_keys_on_open(backend: Backend) {
    let w = World::new(backend).await;
    let at = "'{}', '2026-01-01T00:00:00.000Z'";
    w.exec(&format!(
        "INSERT INTO subscribers (id, email, attributes, created_at) VALUES \
         (1, 'A@BÜCHER.example', {at}), (2, 'a@xn--bcher-kva.example', {at}), \
         (3, 'not an address', {at}), (4, ' Bob@X.com', {at})"
    ))
    .await;
    w.exec(
        "INSERT INTO blast_suppressions (address, reason, source, created_at) VALUES \
         ('c@bücher.example', 'old form', 'operator', '2026-01-01T00:00:00.000Z'), \
         ('c@xn--bcher-kva.example', 'canonical', 'operator', '2026-01-01T00:00:00.000Z'), \
         ('d@bücher.example', 'moved', 'operator', '2026-01-01T00:00:00.000Z')",
    )
    .await;
    w.exec("DELETE FROM blast_settings WHERE key = 'address_keys'")
        .await;
    let db = w.db().await;
    let keys: Vec<(i64, Option<String>)> =
        sqlx::query_as("SELECT CAST(id AS BIGINT), email_key FROM subscribers ORDER BY id")
            .fetch_all(db.pool())
            .await
            .unwrap();
    assert_eq!(
        keys,
        [
            (1, Some("a@xn--bcher-kva.example".into())),
            (2, None),
            (3, None),
            (4, Some("bob@x.com".into())),
        ]
    );
    let rows: Vec<(String, String)> =
        sqlx::query_as("SELECT address, reason FROM blast_suppressions ORDER BY address")
            .fetch_all(db.pool())
            .await
            .unwrap();
    assert_eq!(
        rows,
        [
            ("c@xn--bcher-kva.example".into(), "canonical".into()),
            ("d@xn--bcher-kva.example".into(), "moved".into()),
        ]
    );
    db.close().await;
}

#[tokio::test]
async fn old_rows_get_keys_on_open_sqlite() {
    old_rows_get_keys_on_open(Backend::Sqlite).await;
}

#[tokio::test]
async fn old_rows_get_keys_on_open_postgres() {
    old_rows_get_keys_on_open(Backend::Postgres).await;
}
