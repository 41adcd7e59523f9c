//! The inbound paths: VERP and List-Unsubscribe on sent mail, `blast serve`
//! over a real loopback socket, the suppression list, and suppressions that
//! arrive while a campaign is sending.

use std::time::Duration;

use blast::db::Db;
use blast::sign::Key;
use blast::sink::Faults;

use crate::util::{self, header, sink, slow_sink, spawn_send, wait_for, Backend, Server, World};

const VERP: &str =
    "[bounces]\nverp = \"bounces+{campaign}-{recipient}-{sig}@bounce.example.com\"\n";

/// The token in a message's List-Unsubscribe URL.
fn token_of(msg: &[u8]) -> String {
    let lu = header(msg, "List-Unsubscribe").expect("List-Unsubscribe");
    let url = lu
        .split(['<', '>'])
        .find(|p| p.starts_with("https://"))
        .expect("an https URL");
    url.rsplit('/').next().unwrap().to_string()
}

async fn suppression(db: &Db, address: &str) -> Option<String> {
    blast::suppress::reason(db, address).await.unwrap()
}

async fn run_campaign(w: &World, name: &str, n: i64, extra: &str) -> Vec<blast::sink::Received> {
    let s = sink(Faults::default()).await;
    let path = w.campaign(
        name,
        "Hi",
        "Hello {{ id }}\n{{ unsubscribe_url }}\n",
        None,
        extra,
    );
    let cfg = w.config(&path, Some(&s), 4);
    let summary = spawn_send(&cfg).await.unwrap().unwrap();
    assert_eq!(summary.sent, n as u64);
    s.shutdown().await
}

#[tokio::test]
async fn messages_carry_verp_signature_and_one_click_unsubscribe() {
    let w = World::new(Backend::Sqlite).await;
    w.seed(5).await;
    let got = run_campaign(&w, "verp", 5, VERP).await;
    let db = w.db().await;
    let key = Key::load(&db).await.unwrap();
    let campaign = blast::ledger::campaign_id(&db, "verp")
        .await
        .unwrap()
        .unwrap();
    let pattern = blast::sign::Pattern::parse(
        "bounces+{campaign}-{recipient}-{sig}@bounce.example.com",
        &[
            blast::sign::Var::Campaign,
            blast::sign::Var::Recipient,
            blast::sign::Var::Sig,
        ],
    )
    .unwrap();
    for m in &got {
        let rid: i64 = header(&m.data, "X-Blast-Recipient")
            .unwrap()
            .parse()
            .unwrap();
        // The envelope sender decodes to this campaign and recipient, signed.
        let vars = pattern.capture(&m.mail_from).expect("VERP envelope sender");
        assert_eq!(vars[0].1, campaign.to_string());
        assert_eq!(vars[1].1, rid.to_string());
        assert!(key.check_verp(campaign, rid, &vars[2].1));
        assert_eq!(header(&m.data, "X-Blast-Sig").unwrap(), vars[2].1);
        // RFC 8058: a mailto and an https URL, plus the One-Click marker.
        let lu = header(&m.data, "List-Unsubscribe").unwrap();
        let token = token_of(&m.data);
        assert_eq!(key.check_token(&token), Some((campaign, rid)));
        assert!(
            lu.contains(&format!("<mailto:unsubscribe+{token}@example.com>")),
            "{lu}"
        );
        assert_eq!(
            header(&m.data, "List-Unsubscribe-Post").unwrap(),
            "List-Unsubscribe=One-Click"
        );
        // The template variable is the same URL.
        let body = String::from_utf8_lossy(&m.data);
        assert!(body.contains(&format!("https://lists.example.com/unsubscribe/{token}")));
    }
}

#[tokio::test]
async fn serve_one_click_is_idempotent_and_refuses_forged_tokens() {
    let w = World::new(Backend::Sqlite).await;
    w.seed(3).await;
    let got = run_campaign(&w, "serve", 3, "").await;
    let db = w.db().await;
    let server = Server::start(db.clone()).await;
    let (status, body) = server.request("GET", "/healthz", "").await;
    assert_eq!((status, body.as_str()), (200, "ok\n"));

    let m = got
        .iter()
        .find(|m| m.rcpt_to[0] == "user2@example.com")
        .unwrap();
    let token = token_of(&m.data);
    let path = format!("/unsubscribe/{token}");

    // GET shows a confirmation page and changes nothing (link scanners).
    let (status, body) = server.request("GET", &path, "").await;
    assert_eq!(status, 200);
    assert!(body.contains("<form method=\"post\""), "{body}");
    assert_eq!(suppression(&db, "user2@example.com").await, None);

    // Forged and tampered tokens: 404, nothing changes, no hint about the address.
    let last = token.chars().last().unwrap();
    let flipped = if last == '0' { '1' } else { '0' };
    let tampered = format!("{}{flipped}", &token[..token.len() - 1]);
    let other_recipient = token.replacen("-2-", "-3-", 1);
    for bad in [
        tampered.as_str(),
        other_recipient.as_str(),
        "1-2-zz",
        "nonsense",
    ] {
        let (status, body) = server
            .request(
                "POST",
                &format!("/unsubscribe/{bad}"),
                "List-Unsubscribe=One-Click",
            )
            .await;
        assert_eq!(status, 404, "{bad}");
        assert!(!body.contains("user"), "{body}");
    }
    assert_eq!(suppression(&db, "user2@example.com").await, None);
    assert_eq!(suppression(&db, "user3@example.com").await, None);

    // The one-click POST: 200, suppressed; again: the same 200.
    for _ in 0..2 {
        let (status, body) = server
            .request("POST", &path, "List-Unsubscribe=One-Click")
            .await;
        assert_eq!(status, 200);
        assert!(body.contains("You are unsubscribed"), "{body}");
    }
    assert_eq!(
        suppression(&db, "user2@example.com").await.as_deref(),
        Some("unsubscribe")
    );
    assert_eq!(suppression(&db, "user1@example.com").await, None);
    server.stop().await;
}

/// Someone who got last week's issue unsubscribes while this week's is
/// sending: this week's campaign sends them nothing.
async fn unsubscribe_during_campaign(backend: Backend) {
    let w = World::new(backend).await;
    w.seed(200).await;
    let last_week = run_campaign(&w, "week-1", 200, "").await;
    let token_of_rcpt = |addr: &str| {
        let m = last_week.iter().find(|m| m.rcpt_to[0] == addr).unwrap();
        token_of(&m.data)
    };
    let db = w.db().await;
    let server = Server::start(db.clone()).await;

    // This week's campaign goes slowly: 2 injectors, 20 ms per message.
    let slow = slow_sink(Duration::from_millis(20)).await;
    let path = w.campaign("week-2", "Hi", "Hello {{ id }}\n", None, "");
    let mut cfg = w.config(&path, Some(&slow), 2);
    cfg.batch_size = 20;
    let run = spawn_send(&cfg);
    wait_for(&slow, 30).await;
    for addr in ["user150@example.com", "user199@example.com"] {
        let (status, _) = server
            .request(
                "POST",
                &format!("/unsubscribe/{}", token_of_rcpt(addr)),
                "List-Unsubscribe=One-Click",
            )
            .await;
        assert_eq!(status, 200);
    }
    let summary = run.await.unwrap().unwrap();
    let got = slow.shutdown().await;
    assert_eq!(got.len(), 198, "everyone but the two who unsubscribed");
    for addr in ["user150@example.com", "user199@example.com"] {
        assert!(
            !got.iter().any(|m| m.rcpt_to[0] == addr),
            "{addr} unsubscribed mid-campaign but was sent to"
        );
    }
    assert_eq!(summary.suppressed, 2);
    let rows = util::ledger_rows(&db, "week-2").await;
    for id in [150, 199] {
        let row = rows.iter().find(|r| r.0 == id).unwrap();
        assert_eq!(row.1, "suppressed", "recipient {id}");
    }
    server.stop().await;
}

#[tokio::test]
async fn unsubscribe_during_campaign_sqlite() {
    unsubscribe_during_campaign(Backend::Sqlite).await;
}

#[tokio::test]
async fn unsubscribe_during_campaign_postgres() {
    unsubscribe_during_campaign(Backend::Postgres).await;
}

#[tokio::test]
async fn suppress_commands_add_remove_list_import() {
    let w = World::new(Backend::Sqlite).await;
    let db = w.db().await;
    use blast::suppress;
    assert!(
        suppress::add(&db, " Alice@Example.COM ", "operator", "operator")
            .await
            .unwrap()
    );
    assert!(
        !suppress::add(&db, "alice@example.com", "again", "operator")
            .await
            .unwrap()
    );
    assert!(suppress::add(&db, "not an address", "x", "operator")
        .await
        .is_err());
    let input = "email\nbob@example.com\n\n# comment\ncarol@example.com,Carol\nbroken-line\nalice@example.com\n";
    let s = suppress::import(&db, input.as_bytes(), "imported", "import:test")
        .await
        .unwrap();
    assert_eq!((s.added, s.already), (2, 1));
    assert_eq!(s.invalid.len(), 1);
    assert!(s.invalid[0].starts_with("line 6:"), "{:?}", s.invalid);
    let all = suppress::list(&db, None, None).await.unwrap();
    let addrs: Vec<&str> = all.iter().map(|e| e.address.as_str()).collect();
    assert_eq!(
        addrs,
        ["alice@example.com", "bob@example.com", "carol@example.com"]
    );
    assert_eq!(all[0].reason, "operator", "the first reason is kept");
    let imported = suppress::list(&db, Some("import"), None).await.unwrap();
    assert_eq!(imported.len(), 2);
    assert!(suppress::remove(&db, "BOB@example.com").await.unwrap());
    assert!(!suppress::remove(&db, "bob@example.com").await.unwrap());
    assert_eq!(suppress::list(&db, None, None).await.unwrap().len(), 2);
}

/// Issue 13: what blast sends to, it can suppress. `john@gmailcom` (no dot
/// in the domain) passes import and render, so the one-click unsubscribe
/// and `blast suppress` take it too (they answered 503 and "not an email
/// address" before).
#[tokio::test]
async fn issue13_a_dotless_domain_can_be_imported_sent_and_unsubscribed() {
    let w = World::new(Backend::Sqlite).await;
    let db = w.db().await;
    let csv = "email\njohn@gmailcom\n";
    let report = blast::import::import_from(
        &db,
        "t.csv",
        csv.as_bytes(),
        &Default::default(),
        &mut |e| panic!("{e}"),
        &mut |_| {},
    )
    .await
    .unwrap();
    assert_eq!(report.imported, 1);
    let got = run_campaign(&w, "dotless", 1, "").await;
    let server = Server::start(db.clone()).await;
    let path = format!("/unsubscribe/{}", token_of(&got[0].data));
    let (status, body) = server
        .request("POST", &path, "List-Unsubscribe=One-Click")
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        suppression(&db, "John@GmailCom").await.as_deref(),
        Some("unsubscribe")
    );
    server.stop().await;
    assert!(!blast::suppress::add(&db, "john@gmailcom", "x", "operator")
        .await
        .unwrap());
}
