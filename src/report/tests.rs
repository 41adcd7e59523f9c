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
