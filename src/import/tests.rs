//! Unit tests of the CSV import: headers, records and addresses, line numbers,
//! and whole files into a SQLite database (good rows in, bad rows reported).

use std::io::Cursor;
use std::path::PathBuf;

use super::*;

/// A header record from string literals.
fn rec(fields: &[&[u8]]) -> ByteRecord {
    ByteRecord::from(fields.to_vec())
}

/// The header most tests use.
fn header() -> Header {
    parse_header("t.csv", &rec(&[b"email", b"name", b"city"])).unwrap()
}

/// The message of a whole-file error.
fn csv_message(err: Error) -> String {
    match err {
        Error::Csv { message, .. } => message,
        other => panic!("expected a CSV error, got {other:?}"),
    }
}

#[test]
fn header_needs_an_email_column() {
    let err = parse_header("t.csv", &rec(&[b"name", b"mail"])).unwrap_err();
    assert_eq!(
        err.to_string(),
        "t.csv: no email column in the header (found: name, mail); \
         name the address column \"email\""
    );
}

#[test]
fn header_email_is_matched_case_insensitively_after_trimming() {
    let h = parse_header("t.csv", &rec(&[b" Name ", b" EMail "])).unwrap();
    assert_eq!(h.columns(), ["Name", "EMail"]);
    assert_eq!(h.email_column(), 1);
}

#[test]
fn header_rejects_reserved_columns_and_suggests_a_rename() {
    for name in ["id", "created_at", "attributes", "ID"] {
        let header = rec(&[b"email", name.as_bytes()]);
        let message = csv_message(parse_header("t.csv", &header).unwrap_err());
        assert!(
            message.contains(&format!("column {name:?} is reserved")),
            "{message}"
        );
        assert!(
            message.contains(&format!("rename it, e.g. to \"csv_{name}\"")),
            "{message}"
        );
    }
}

#[test]
fn header_rejects_duplicate_and_empty_names() {
    let message =
        csv_message(parse_header("t.csv", &rec(&[b"email", b"name", b" name"])).unwrap_err());
    assert!(
        message.contains("\"name\" appears twice") && message.contains("2 and 3"),
        "{message}"
    );
    let message = csv_message(parse_header("t.csv", &rec(&[b"Email", b"email"])).unwrap_err());
    assert!(message.contains("two email columns"), "{message}");
    let message = csv_message(parse_header("t.csv", &rec(&[b"email", b""])).unwrap_err());
    assert!(message.contains("header column 2 has no name"), "{message}");
}

#[test]
fn header_rejects_bad_utf8() {
    let message = csv_message(parse_header("t.csv", &rec(&[b"email", b"n\xFFme"])).unwrap_err());
    assert!(
        message.contains("header column 2 is not valid UTF-8"),
        "{message}"
    );
}

#[test]
fn header_ignores_a_bom() {
    let h = parse_header("t.csv", &rec(&[b"\xEF\xBB\xBFemail", b"name"])).unwrap();
    assert_eq!(h.columns(), ["email", "name"]);
    assert_eq!(h.email_column(), 0);
}

#[test]
fn record_becomes_trimmed_email_and_string_attributes() {
    let row = parse_record(&header(), &rec(&[b" Ann@Example.com ", b" Ann ", b""]), 7).unwrap();
    assert_eq!(row.line, 7);
    assert_eq!(row.email, "Ann@Example.com");
    // Values are kept as written, including spaces and empty strings.
    assert_eq!(
        Value::Object(row.attributes),
        serde_json::json!({"name": " Ann ", "city": ""})
    );
}

#[test]
fn record_with_wrong_column_count_is_reported_with_its_address() {
    let err = parse_record(&header(), &rec(&[b"a@example.com", b"A", b"B", b"C"]), 4).unwrap_err();
    assert_eq!(
        err.reason,
        RowProblem::WrongColumnCount {
            expected: 3,
            found: 4
        }
    );
    assert_eq!(
        err.to_string(),
        "line 4: expected 3 columns, found 4 (email \"a@example.com\")"
    );
    let err = parse_record(&header(), &rec(&[b"a@example.com"]), 5).unwrap_err();
    assert_eq!(
        err.reason,
        RowProblem::WrongColumnCount {
            expected: 3,
            found: 1
        }
    );
}

#[test]
fn record_with_bad_utf8_names_the_column() {
    let err = parse_record(&header(), &rec(&[b"a@example.com", b"Caf\xE9", b"x"]), 3).unwrap_err();
    assert_eq!(
        err.reason,
        RowProblem::BadUtf8 {
            column: "name".into()
        }
    );
    assert_eq!(err.email.as_deref(), Some("a@example.com"));
    let err = parse_record(&header(), &rec(&[b"\xFF@example.com", b"x", b"y"]), 3).unwrap_err();
    assert_eq!(
        err.reason,
        RowProblem::BadUtf8 {
            column: "email".into()
        }
    );
    assert_eq!(err.email, None);
}

#[test]
fn record_without_email_is_missing_email() {
    let err = parse_record(&header(), &rec(&[b"  ", b"x", b"y"]), 2).unwrap_err();
    assert_eq!(err.reason, RowProblem::MissingEmail);
    assert_eq!(err.to_string(), "line 2: missing email");
}

#[test]
fn record_with_invalid_email_says_why() {
    let err = parse_record(&header(), &rec(&[b"foo@", b"x", b"y"]), 17).unwrap_err();
    assert_eq!(
        err.to_string(),
        "line 17: invalid email \"foo@\": the domain is not valid"
    );
    let long = format!("{}@example.com", "a".repeat(250));
    let cases: &[(&str, &str)] = &[
        ("foo", "expected user@domain"),
        ("a b@example.com", "whitespace"),
        ("a\u{7}b@example.com", "control character"),
        ("a..b@example.com", "before @"),
        (&long, "longer than 254 bytes"),
    ];
    for (email, why) in cases {
        let err = parse_record(&header(), &rec(&[email.as_bytes(), b"", b""]), 2).unwrap_err();
        match &err.reason {
            RowProblem::InvalidEmail(reason) => {
                assert!(reason.contains(why), "{email}: {reason}")
            }
            other => panic!("{email}: {other:?}"),
        }
    }
    // International domains are fine.
    assert!(parse_record(
        &header(),
        &rec(&["jose@bücher.example".as_bytes(), b"", b""]),
        2
    )
    .is_ok());
}

/// Parses a whole CSV from bytes without a database.
fn parse_all(bytes: &[u8]) -> Result<Vec<Result<NewSubscriber, RowError>>> {
    let mut records = Records::open("t.csv", Cursor::new(bytes.to_vec()))?;
    let mut all = Vec::new();
    loop {
        let chunk = records.read_chunk(2)?;
        if chunk.is_empty() {
            return Ok(all);
        }
        all.extend(chunk);
    }
}

#[test]
fn file_with_bom_reads_the_email_column() {
    let rows = parse_all(b"\xEF\xBB\xBFemail,name\na@example.com,A\n").unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].as_ref().unwrap().email, "a@example.com");
}

#[test]
fn empty_files_are_rejected() {
    for bytes in [&b""[..], b"\n\n", b"\xEF\xBB\xBF"] {
        let message = csv_message(parse_all(bytes).unwrap_err());
        assert!(message.contains("the file is empty"), "{message}");
    }
}

#[test]
fn line_numbers_are_where_records_start_whatever_the_line_ends() {
    let csv = "email,note\na@example.com,\"two\nlines\"\n\n\nb@example.com,x,y\nc@example.com,\n";
    for eol in ["\n", "\r\n", "\r"] {
        let rows = parse_all(csv.replace('\n', eol).as_bytes()).unwrap();
        let lines: Vec<u64> = rows
            .iter()
            .map(|r| r.as_ref().map_or_else(|e| e.line, |s| s.line))
            .collect();
        // Blank lines 4 and 5 are skipped, not counted as records.
        assert_eq!(lines, [2, 6, 7], "line end {eol:?}");
        let note = &rows[0].as_ref().unwrap().attributes["note"];
        assert_eq!(note, &format!("two{eol}lines"), "line end {eol:?}");
    }
}

#[test]
fn an_unclosed_quote_stops_the_import_instead_of_eating_memory() {
    let mut bytes = b"email,note\na@example.com,ok\nb@example.com,\"open\n".to_vec();
    for _ in 0..40_000 {
        bytes.extend_from_slice(b"c@example.com,this line is inside the quote\n");
    }
    let message = csv_message(parse_all(&bytes).unwrap_err());
    assert!(
        message.starts_with("line 3: a record starting here is longer than 1 MiB"),
        "{message}"
    );
}

// ---- With a database ----

/// A migrated SQLite database in a fresh temporary directory.
async fn fresh_db() -> (tempfile::TempDir, Db) {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::connect(&format!("sqlite://{}", dir.path().join("t.db").display()))
        .await
        .unwrap();
    (dir, db)
}

/// What an import reported: the result, each row error, each progress call.
struct Run {
    report: ImportReport,
    errors: Vec<RowError>,
    progress: Vec<ImportReport>,
}

/// Imports `bytes` with `opts`, collecting everything the callbacks saw.
async fn import_bytes(db: &Db, bytes: &[u8], opts: &ImportOptions) -> Result<Run> {
    let (mut errors, mut progress) = (Vec::new(), Vec::new());
    let report = import_from(
        db,
        "t.csv",
        Cursor::new(bytes.to_vec()),
        opts,
        &mut |e: &RowError| errors.push(e.clone()),
        &mut |r: &ImportReport| progress.push(r.clone()),
    )
    .await?;
    Ok(Run {
        report,
        errors,
        progress,
    })
}

/// The fixture with good, bad and duplicate rows.
fn mixed_fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/csv/subscribers_mixed.csv")
}

/// Imports the mixed fixture through `import_file`.
async fn import_fixture(db: &Db, opts: &ImportOptions) -> Run {
    let (mut errors, mut progress) = (Vec::new(), Vec::new());
    let report = import_file(
        db,
        &mixed_fixture(),
        opts,
        &mut |e: &RowError| errors.push(e.clone()),
        &mut |r: &ImportReport| progress.push(r.clone()),
    )
    .await
    .unwrap();
    Run {
        report,
        errors,
        progress,
    }
}

/// `(line, email, problem)` of each error, for one-line assertions.
fn summary(errors: &[RowError]) -> Vec<(u64, Option<&str>, RowProblem)> {
    errors
        .iter()
        .map(|e| (e.line, e.email.as_deref(), e.reason.clone()))
        .collect()
}

/// The attributes stored for `email`, parsed.
async fn attributes(db: &Db, email: &str) -> Value {
    let text: String = sqlx::query_scalar("SELECT attributes FROM subscribers WHERE email = $1")
        .bind(email)
        .fetch_one(db.pool())
        .await
        .unwrap();
    serde_json::from_str(&text).unwrap()
}

/// Addresses in the table, in insertion order.
async fn emails(db: &Db) -> Vec<String> {
    sqlx::query_scalar("SELECT email FROM subscribers ORDER BY id")
        .fetch_all(db.pool())
        .await
        .unwrap()
}

/// `ImportReport` as a tuple: rows, imported, updated, duplicates, invalid.
fn counts(r: &ImportReport) -> (u64, u64, u64, u64, u64) {
    (r.rows, r.imported, r.updated, r.duplicates, r.invalid)
}

#[tokio::test]
async fn mixed_fixture_imports_good_rows_and_reports_bad_ones_by_line() {
    // Batch sizes that split duplicates across batches and within one.
    for batch_size in [1, 4, 500] {
        let (_dir, db) = fresh_db().await;
        let run = import_fixture(
            &db,
            &ImportOptions {
                upsert: false,
                batch_size,
            },
        )
        .await;
        assert_eq!(counts(&run.report), (13, 7, 0, 2, 4), "batch {batch_size}");
        let invalid = |why: &str| RowProblem::InvalidEmail(why.into());
        assert_eq!(
            summary(&run.errors),
            [
                (5, None, RowProblem::MissingEmail),
                (6, Some("not-an-email"), invalid("expected user@domain")),
                (
                    9,
                    Some("extra@example.com"),
                    RowProblem::WrongColumnCount {
                        expected: 3,
                        found: 4
                    }
                ),
                (10, Some("ALICE@Example.com"), RowProblem::Duplicate),
                (13, Some("foo@"), invalid("the domain is not valid")),
                (15, Some("carol@example.net"), RowProblem::Duplicate),
            ],
            "batch {batch_size}"
        );
        assert_eq!(
            emails(&db).await,
            [
                "alice@example.com",
                "zoe@example.org",
                "jose@bücher.example",
                "carol@example.net",
                "dave@example.com",
                "erin@example.com",
                "frank@example.com",
            ]
        );
        assert_eq!(
            attributes(&db, "carol@example.net").await,
            serde_json::json!({"name": "Carol, the \"Great\"", "city": "Line one\nline two"})
        );
        assert_eq!(
            attributes(&db, "zoe@example.org").await,
            serde_json::json!({"name": "Zoë Ångström", "city": "Zürich"})
        );
        assert_eq!(
            attributes(&db, "dave@example.com").await,
            serde_json::json!({"name": "Dave", "city": ""})
        );
        // Few rows: one commit, one progress report, equal to the result.
        assert_eq!(run.progress.len(), 1);
        assert_eq!(counts(&run.progress[0]), counts(&run.report));
        let created: String = sqlx::query_scalar("SELECT created_at FROM subscribers LIMIT 1")
            .fetch_one(db.pool())
            .await
            .unwrap();
        assert!(created.ends_with('Z') && created.len() == 24, "{created}");
    }
}

#[tokio::test]
async fn reimporting_reports_every_good_row_as_duplicate() {
    let (_dir, db) = fresh_db().await;
    import_fixture(&db, &ImportOptions::default()).await;
    let run = import_fixture(&db, &ImportOptions::default()).await;
    assert_eq!(counts(&run.report), (13, 0, 0, 9, 4));
    let duplicates = run
        .errors
        .iter()
        .filter(|e| e.reason == RowProblem::Duplicate)
        .map(|e| e.line);
    assert_eq!(
        duplicates.collect::<Vec<_>>(),
        [2, 3, 4, 7, 10, 11, 12, 14, 15]
    );
    assert_eq!(emails(&db).await.len(), 7);
}

#[tokio::test]
async fn upsert_replaces_attributes_but_a_repeat_in_the_file_is_a_duplicate() {
    let csv = "email,name,city\n\
               Alice@example.com,Alice Updated,Hamburg\n\
               new@example.com,New,Graz\n\
               NEW@example.com,New Again,Graz\n\
               zoe@example.org,Zoë,Wien\n\
               ZOE@example.org,Zoe again,Linz\n";
    for batch_size in [1, 2, 500] {
        let (_dir, db) = fresh_db().await;
        import_fixture(&db, &ImportOptions::default()).await;
        let opts = ImportOptions {
            upsert: true,
            batch_size,
        };
        let run = import_bytes(&db, csv.as_bytes(), &opts).await.unwrap();
        assert_eq!(counts(&run.report), (5, 1, 2, 2, 0), "batch {batch_size}");
        assert_eq!(
            summary(&run.errors),
            [
                (4, Some("NEW@example.com"), RowProblem::Duplicate),
                (6, Some("ZOE@example.org"), RowProblem::Duplicate)
            ]
        );
        // The stored address keeps its case; only the attributes change.
        assert_eq!(
            attributes(&db, "alice@example.com").await,
            serde_json::json!({"name": "Alice Updated", "city": "Hamburg"})
        );
        assert_eq!(
            attributes(&db, "zoe@example.org").await,
            serde_json::json!({"name": "Zoë", "city": "Wien"})
        );
        assert_eq!(
            attributes(&db, "new@example.com").await,
            serde_json::json!({"name": "New", "city": "Graz"})
        );
        assert_eq!(emails(&db).await.len(), 8);
        // The claims table is gone, and a second upsert starts afresh.
        let run = import_bytes(&db, csv.as_bytes(), &opts).await.unwrap();
        assert_eq!(counts(&run.report), (5, 0, 3, 2, 0), "batch {batch_size}");
    }
}

#[tokio::test]
async fn bad_utf8_skips_the_row_not_the_file() {
    let (dir, db) = fresh_db().await;
    let path = dir.path().join("latin1.csv");
    std::fs::write(
        &path,
        b"email,name\nok@example.com,Good\nbad@example.com,Caf\xE9\n\xFF@example.com,X\nlast@example.com,Last\n",
    )
    .unwrap();
    let mut errors = Vec::new();
    let report = import_file(
        &db,
        &path,
        &ImportOptions::default(),
        &mut |e| errors.push(e.clone()),
        &mut |_| {},
    )
    .await
    .unwrap();
    assert_eq!(counts(&report), (4, 2, 0, 0, 2));
    assert_eq!(
        summary(&errors),
        [
            (
                3,
                Some("bad@example.com"),
                RowProblem::BadUtf8 {
                    column: "name".into()
                }
            ),
            (
                4,
                None,
                RowProblem::BadUtf8 {
                    column: "email".into()
                }
            ),
        ]
    );
    assert_eq!(
        errors[0].to_string(),
        "line 3: column \"name\" is not valid UTF-8 (email \"bad@example.com\")"
    );
}

#[tokio::test]
async fn header_errors_import_nothing() {
    let (dir, db) = fresh_db().await;
    let path = dir.path().join("bad.csv");
    std::fs::write(&path, b"email,id\na@example.com,1\n").unwrap();
    let err = import_file(
        &db,
        &path,
        &ImportOptions::default(),
        &mut |_| {},
        &mut |_| {},
    )
    .await
    .unwrap_err();
    let message = err.to_string();
    assert!(
        message.starts_with(&format!("{}: column \"id\" is reserved", path.display())),
        "{message}"
    );
    std::fs::write(&path, b"").unwrap();
    assert!(import_file(
        &db,
        &path,
        &ImportOptions::default(),
        &mut |_| {},
        &mut |_| {}
    )
    .await
    .is_err());
    assert!(emails(&db).await.is_empty());
    // A missing file is an I/O error naming the path.
    let err = import_file(
        &db,
        &dir.path().join("nope.csv"),
        &ImportOptions::default(),
        &mut |_| {},
        &mut |_| {},
    )
    .await
    .unwrap_err();
    assert!(matches!(err, Error::Io { .. }), "{err:?}");
}

#[tokio::test]
async fn large_files_commit_in_steps_and_report_progress_after_each() {
    let (_dir, db) = fresh_db().await;
    let mut csv = String::from("email,n\n");
    for i in 0..21_000 {
        csv.push_str(&format!("user{i}@example.com,{i}\n"));
    }
    // One repeat far from its original: found through the table, not memory.
    csv.push_str("USER7@example.com,again\n");
    let run = import_bytes(&db, csv.as_bytes(), &ImportOptions::default())
        .await
        .unwrap();
    assert_eq!(counts(&run.report), (21_001, 21_000, 0, 1, 0));
    let committed: Vec<u64> = run.progress.iter().map(|r| r.rows).collect();
    assert_eq!(committed, [10_000, 20_000, 21_001]);
    assert_eq!(
        summary(&run.errors),
        [(21_002, Some("USER7@example.com"), RowProblem::Duplicate)]
    );
}

#[test]
fn import_futures_are_send() {
    /// Compiles only for `Send` values.
    fn assert_send<T: Send>(_: &T) {}
    let db: Option<Db> = None;
    if let Some(db) = &db {
        let opts = ImportOptions::default();
        let (mut on_error, mut on_progress) = (|_: &RowError| {}, |_: &ImportReport| {});
        assert_send(&import_file(
            db,
            Path::new("x"),
            &opts,
            &mut on_error,
            &mut on_progress,
        ));
    }
}

/// The CSV importer's reader on arbitrary bytes, and on files with a valid
/// header and arbitrary rows (issue 13): no panic, and an address it
/// accepts has no line break or other control character.
pub(crate) fn csv_importer(cases: u32) {
    let on = |bytes: &[u8]| {
        if let Ok(rows) = parse_all(bytes) {
            for row in rows.into_iter().flatten() {
                proptest::prop_assert!(!row.email.chars().any(char::is_control), "{row:?}");
            }
        }
        Ok(())
    };
    crate::props::check(cases, crate::props::bytes(), |raw| on(&raw));
    crate::props::check(cases, crate::props::text(), |t| {
        on(format!("email,name\n{t}\n\"{t}\",x\n").as_bytes())
    });
}

#[test]
fn csv_importer_never_panics_nor_accepts_line_breaks() {
    csv_importer(crate::props::ci_cases());
}
