//! Aggregation on a small SQLite ledger whose every figure is known.

use super::*;

async fn exec(db: &Db, sql: &str) {
    sqlx::query(sqlx::AssertSqlSafe(sql.to_string()))
        .execute(db.pool())
        .await
        .unwrap();
}

#[tokio::test]
async fn aggregates_a_small_ledger() {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::connect(&format!("sqlite://{}", dir.path().join("r.db").display()))
        .await
        .unwrap();
    let c = crate::ledger::open_campaign(&db, "rep", async { Ok(9) })
        .await
        .unwrap();
    let other = crate::ledger::open_campaign(&db, "other", async { Ok(9) })
        .await
        .unwrap();
    // 8 rows over two minutes; domains: example.com x4 (one upper-case, one
    // with a quoted '@' in the local part), b.org x3, c.net x1.
    let rows = [
        (1, "a@example.com", "sent", None, "2026-12-05T10:00:01.000Z"),
        (2, "b@EXAMPLE.COM", "sent", None, "2026-12-05T10:00:30.000Z"),
        (
            3,
            "\"x@y\"@example.com",
            "failed",
            Some("550 5.1.1 <script>no</script>"),
            "2026-12-05T10:00:59.000Z",
        ),
        (
            4,
            "d@example.com",
            "deferred",
            Some("451 4.3.0 later"),
            "2026-12-05T10:01:00.000Z",
        ),
        (
            5,
            "e@b.org",
            "failed",
            Some("550 5.1.1 <script>no</script>"),
            "2026-12-05T10:01:10.000Z",
        ),
        (6, "f@b.org", "sent", None, "2026-12-05T10:01:20.000Z"),
        (7, "g@b.org", "suppressed", None, "2026-12-05T10:01:30.000Z"),
        (8, "h@c.net", "sent", None, "2026-12-05T10:01:41.000Z"),
    ];
    for (id, email, status, reply, at) in rows {
        let code = reply.map(|r| r[..3].parse::<i64>().unwrap());
        sqlx::query(
            "INSERT INTO blast_deliveries (campaign_id, recipient_id, email, status, smtp_code, reply, updated_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(c.id)
        .bind(id)
        .bind(email)
        .bind(status)
        .bind(code)
        .bind(reply)
        .bind(at)
        .execute(db.pool())
        .await
        .unwrap();
    }
    // Another campaign's row counts nowhere.
    exec(&db, &format!("INSERT INTO blast_deliveries (campaign_id, recipient_id, email, status, updated_at) VALUES ({}, 1, 'z@zzz.com', 'failed', '2026-12-05T10:00:00.000Z')", other.id)).await;
    exec(&db, &format!("INSERT INTO blast_bounces (campaign_id, recipient_id, address, kind, class, reason, source, message_hash, received_at) VALUES \
        ({id}, 1, 'a@example.com', 'bounce', 'hard', 'x', 's', 'h1', '2026-12-05T11:00:00.000Z'), \
        ({id}, 1, 'a@example.com', 'bounce', 'hard', 'x', 's', 'h2', '2026-12-06T11:00:00.000Z'), \
        ({id}, 6, 'f@b.org', 'complaint', 'complaint', 'x', 's', 'h3', '2026-12-06T12:00:00.000Z')", id = c.id)).await;
    exec(
        &db,
        &format!(
            "INSERT INTO blast_suppressions (address, reason, source, created_at) VALUES \
        ('h@c.net', 'unsubscribe', 'https:campaign={id}', '2026-12-07T09:00:00.000Z'), \
        ('q@c.net', 'unsubscribe', 'https:campaign=999', '2026-12-07T09:00:00.000Z')",
            id = c.id
        ),
    )
    .await;
    exec(&db, &format!("UPDATE blast_deliveries SET mta_status = 'delivered', mta_delay_secs = 0.5 WHERE campaign_id = {} AND recipient_id IN (1, 2)", c.id)).await;
    exec(&db, &format!("UPDATE blast_deliveries SET mta_status = 'bounced', mta_delay_secs = 75 WHERE campaign_id = {} AND recipient_id = 6", c.id)).await;

    let r = build(&db, &c, Some(1)).await.unwrap();
    let t = &r.totals;
    assert_eq!(
        (
            t.audience,
            t.sent,
            t.failed,
            t.deferred,
            t.suppressed,
            t.unrendered
        ),
        (9, 4, 2, 1, 1, 0)
    );
    assert_eq!((t.bounced, t.complained, t.unsubscribed), (1, 1, 1));
    assert_eq!(t.first_at.as_deref(), Some("2026-12-05T10:00:01.000Z"));
    assert_eq!(t.duration_secs, 100.0);
    assert!((t.mean_rate - 0.08).abs() < 1e-9);
    assert_eq!(t.peak_per_minute, 5);
    assert_eq!(
        r.per_minute,
        vec![
            Count {
                label: "2026-12-05T10:00".into(),
                n: 3
            },
            Count {
                label: "2026-12-05T10:01".into(),
                n: 5
            },
        ]
    );
    let d: Vec<_> = r
        .domains
        .iter()
        .map(|d| {
            (
                d.domain.as_str(),
                d.total,
                d.sent,
                d.deferred,
                d.failed,
                d.bounced,
            )
        })
        .collect();
    assert_eq!(
        d,
        vec![
            ("example.com", 4, 2, 1, 1, 1),
            ("b.org", 3, 1, 0, 1, 0),
            ("c.net", 1, 1, 0, 0, 0)
        ]
    );
    assert_eq!(r.replies.len(), 2);
    assert_eq!((r.replies[0].code, r.replies[0].recipients), (Some(550), 2));
    assert_eq!(r.replies[0].reply, "550 5.1.1 <script>no</script>");
    let days: Vec<_> = r
        .per_day
        .iter()
        .map(|d| (d.day.as_str(), d.bounces, d.complaints, d.unsubscribes))
        .collect();
    assert_eq!(
        days,
        vec![
            ("2026-12-05", 1, 0, 0),
            ("2026-12-06", 1, 1, 0),
            ("2026-12-07", 0, 0, 1)
        ]
    );
    assert_eq!(
        r.mta,
        vec![
            Count {
                label: "bounced".into(),
                n: 1
            },
            Count {
                label: "delivered".into(),
                n: 2
            }
        ]
    );
    let delays: Vec<i64> = r.mta_delays.iter().map(|c| c.n).collect();
    assert_eq!(delays, vec![2, 0, 0, 1, 0, 0]);

    // The page: one data-point per figure, and the reply shown as text.
    let page = html::render(&r);
    assert!(!page.contains("<script"), "a reply became markup");
    assert!(page.contains("550 5.1.1 &lt;script&gt;no&lt;/script&gt;"));
    for (chart, n) in html::chart_points(&r) {
        let start = page.find(&format!("data-chart=\"{chart}\"")).unwrap();
        let end = start + page[start..].find("</svg>").unwrap();
        assert_eq!(
            page[start..end].matches("data-point=").count(),
            n,
            "{chart}"
        );
    }
    db.close().await;
}

/// A ledger of campaign `name` in a fresh SQLite file: `(minute, worker,
/// rows)` at `2026-12-05T10:MM`, recipient ids counting up.
async fn ledger_by_worker(
    name: &str,
    rows: &[(u32, Option<&str>, i64)],
) -> (tempfile::TempDir, Db, CampaignRow) {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::connect(&format!("sqlite://{}", dir.path().join("w.db").display()))
        .await
        .unwrap();
    let c = crate::ledger::open_campaign(&db, name, async { Ok(1000) })
        .await
        .unwrap();
    let mut id = 0;
    for (minute, worker, n) in rows {
        for _ in 0..*n {
            id += 1;
            sqlx::query(
                "INSERT INTO blast_deliveries (campaign_id, recipient_id, email, status, updated_at, worker) \
                 VALUES ($1, $2, $3, 'sent', $4, $5)",
            )
            .bind(c.id)
            .bind(id)
            .bind(format!("u{id}@example.com"))
            .bind(format!("2026-12-05T10:{minute:02}:{:02}.000Z", id % 60))
            .bind(*worker)
            .execute(db.pool())
            .await
            .unwrap();
        }
    }
    (dir, db, c)
}

/// `(worker, total, per minute)` of each series.
fn series(r: &Report) -> Vec<(Option<&str>, i64, Vec<i64>)> {
    r.per_minute_by_worker
        .iter()
        .map(|s| {
            (
                s.worker.as_deref(),
                s.total,
                s.points.iter().map(|p| p.n).collect(),
            )
        })
        .collect()
}

/// The per-minute chart's markup, from its `<svg>` to the end of its legend.
fn per_minute_chart(page: &str) -> &str {
    let start = page.find("data-chart=\"per-minute\"").unwrap();
    let end = start + page[start..].find("<h2>").unwrap();
    &page[start..end]
}

#[tokio::test]
async fn two_workers_give_two_series_that_add_up_to_the_total() {
    let evil = "<script>alert(1)</script>";
    let (_dir, db, c) = ledger_by_worker(
        "two",
        &[
            (0, Some("w1"), 2),
            (0, Some(evil), 1),
            (1, Some("w1"), 3),
            (1, Some(evil), 1),
            // Written before schema v8: no worker.
            (1, None, 1),
            (3, Some(evil), 4),
        ],
    )
    .await;
    let r = build(&db, &c, None).await.unwrap();
    let minutes: Vec<(&str, i64)> = r
        .per_minute
        .iter()
        .map(|c| (c.label.as_str(), c.n))
        .collect();
    assert_eq!(
        minutes,
        [
            ("2026-12-05T10:00", 3),
            ("2026-12-05T10:01", 5),
            ("2026-12-05T10:03", 4)
        ]
    );
    assert_eq!((r.workers, r.worker_series), (2, 3));
    // Busiest first; the rows without a worker are a series of their own.
    assert_eq!(
        series(&r),
        [
            (Some(evil), 6, vec![1, 1, 4]),
            (Some("w1"), 5, vec![2, 3, 0]),
            (None, 1, vec![0, 1, 0]),
        ]
    );
    for (i, m) in r.per_minute.iter().enumerate() {
        let sum: i64 = r.per_minute_by_worker.iter().map(|s| s.points[i].n).sum();
        assert_eq!((m.label.as_str(), sum), (m.label.as_str(), m.n));
        for s in &r.per_minute_by_worker {
            assert_eq!(s.points[i].label, m.label);
        }
    }

    // The page: the bars are the total, a line and a legend entry per
    // series, every worker name escaped.
    let page = html::render(&r);
    assert!(!page.contains("<script"), "a worker name became markup");
    let chart = per_minute_chart(&page);
    assert_eq!(chart.matches("data-point=").count(), 3);
    assert_eq!(chart.matches("<polyline data-series=").count(), 3);
    assert_eq!(chart.matches("<li data-worker=").count(), 3);
    assert!(chart.contains("data-series=\"&lt;script&gt;alert(1)&lt;/script&gt;\""));
    assert!(chart.contains("&lt;script&gt;alert(1)&lt;/script&gt; (6)</li>"));
    assert!(chart.contains("(unknown: written before schema v8) (1)"));
    assert!(
        !chart.contains("busiest"),
        "all series drawn: no cap notice"
    );

    // JSON: the series by name, null for the unknown one.
    let json = serde_json::to_value(&r).unwrap();
    assert_eq!(json["per_minute_by_worker"][0]["worker"], evil);
    assert!(json["per_minute_by_worker"][2]["worker"].is_null());
    assert_eq!(json["per_minute_by_worker"][1]["points"][1]["n"], 3);
    db.close().await;
}

#[tokio::test]
async fn one_worker_gives_no_series_and_the_chart_stays_bars() {
    // One worker and rows from before schema v8: still one worker.
    let (_dir, db, c) = ledger_by_worker(
        "one",
        &[(0, Some("w1"), 2), (1, None, 1), (1, Some("w1"), 3)],
    )
    .await;
    let r = build(&db, &c, None).await.unwrap();
    assert_eq!((r.workers, r.worker_series), (1, 0));
    assert!(r.per_minute_by_worker.is_empty());
    let page = html::render(&r);
    let chart = per_minute_chart(&page);
    assert_eq!(chart.matches("data-point=").count(), 2);
    assert!(!chart.contains("polyline") && !chart.contains("legend"));
    db.close().await;
}

#[tokio::test]
async fn at_most_the_busiest_workers_are_drawn_and_the_page_says_so() {
    // Worker k writes k rows: w1 to w10.
    let names: Vec<String> = (1..=10).map(|k| format!("w{k:02}")).collect();
    let rows: Vec<(u32, Option<&str>, i64)> = names
        .iter()
        .enumerate()
        .map(|(k, n)| (k as u32 % 2, Some(n.as_str()), k as i64 + 1))
        .collect();
    let (_dir, db, c) = ledger_by_worker("many", &rows).await;
    let r = build(&db, &c, None).await.unwrap();
    assert_eq!((r.workers, r.worker_series), (10, 10));
    let kept: Vec<&str> = r
        .per_minute_by_worker
        .iter()
        .map(|s| s.worker.as_deref().unwrap())
        .collect();
    assert_eq!(
        kept,
        ["w10", "w09", "w08", "w07", "w06", "w05", "w04", "w03"]
    );
    assert_eq!(kept.len(), TOP_WORKERS);
    let page = html::render(&r);
    let chart = per_minute_chart(&page);
    assert_eq!(chart.matches("<polyline data-series=").count(), TOP_WORKERS);
    assert!(
        chart.contains("Lines for the 8 busiest of 10 workers"),
        "{chart}"
    );
    db.close().await;
}
