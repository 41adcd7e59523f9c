//! Unit tests of the campaign file: defaults, errors naming their key,
//! relays, TLS, credentials and routing.

use super::relay::parse_relay;
use super::*;

const MINIMAL: &str = r#"
name = "t"
database = "sqlite://t.db"
[audience]
table = "subscribers"
[unsubscribe]
url = "https://lists.example.com/unsubscribe/{token}"
[message]
from = "News <news@example.com>"
subject = "Hi {{ name }}"
text = "t.txt"
"#;

fn parse(text: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<Config> {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("t.txt"), "Hello").unwrap();
    Config::parse(text, "c.toml", dir.path(), &Overrides::default(), env)
}

#[test]
fn minimal_file_gets_defaults() {
    let c = parse(MINIMAL, &|_| None).unwrap();
    assert_eq!(
        c.delivery.concurrency,
        Concurrency::Auto {
            max: crate::adaptive::DEFAULT_MAX
        }
    );
    assert_eq!(c.delivery.relays[0].to_string(), "smtp://127.0.0.1:25");
    assert_eq!(c.message.envelope_from, "news@example.com");
    assert!(c.database.ends_with("/t.db") && c.database.starts_with("sqlite:///"));
}

#[test]
fn env_vars_expand_and_missing_ones_are_named() {
    let text = MINIMAL.replace("sqlite://t.db", "postgres://u:${PW}@h/db");
    let c = parse(&text, &|k| (k == "PW").then(|| "s3cret".into())).unwrap();
    assert_eq!(c.database, "postgres://u:s3cret@h/db");
    assert!(
        !format!("{c:?}").contains("s3cret"),
        "Debug must hide secrets"
    );
    let e = parse(&text, &|_| None).unwrap_err().to_string();
    assert!(
        e.contains("c.toml") && e.contains("database") && e.contains("PW"),
        "{e}"
    );
}

#[test]
fn verp_and_unsubscribe_are_validated() {
    let c = parse(
        &format!("{MINIMAL}[bounces]\nverp = \"b+{{campaign}}-{{recipient}}-{{sig}}@bounce.example.com\"\n"),
        &|_| None,
    )
    .unwrap();
    assert_eq!(
        c.message.verp.unwrap().as_str(),
        "b+{campaign}-{recipient}-{sig}@bounce.example.com"
    );
    // The mailto defaults to the From domain.
    assert_eq!(
        c.message.unsubscribe.mailto.as_str(),
        "unsubscribe+{token}@example.com"
    );
    let bad = [
        (
            "verp = \"b+{campaign}-{recipient}@x.com\"",
            "bounces.verp",
            "{sig} is missing",
        ),
        (
            "verp = \"b+{campaign}-{recipient}-{sig}\"",
            "bounces.verp",
            "local@domain",
        ),
    ];
    for (line, key, want) in bad {
        let e = parse(&format!("{MINIMAL}[bounces]\n{line}\n"), &|_| None)
            .unwrap_err()
            .to_string();
        assert!(e.contains(key) && e.contains(want), "{line}: {e}");
    }
    let http = MINIMAL.replace("https://lists", "http://lists");
    let e = parse(&http, &|_| None).unwrap_err().to_string();
    assert!(
        e.contains("unsubscribe.url") && e.contains("https://"),
        "{e}"
    );
    let no_token = MINIMAL.replace("/{token}", "/");
    let e = parse(&no_token, &|_| None).unwrap_err().to_string();
    assert!(e.contains("{token} is missing"), "{e}");
    let missing = MINIMAL.replace(
        "[unsubscribe]\nurl = \"https://lists.example.com/unsubscribe/{token}\"\n",
        "",
    );
    let e = parse(&missing, &|_| None).unwrap_err().to_string();
    assert!(e.contains("unsubscribe") && e.contains("RFC 8058"), "{e}");
    let both = format!(
        "{MINIMAL}[delivery]\nenvelope_from = \"x@example.com\"\n[bounces]\nverp = \"b+{{campaign}}-{{recipient}}-{{sig}}@x.com\"\n"
    );
    let e = parse(&both, &|_| None).unwrap_err().to_string();
    assert!(e.contains("not both"), "{e}");
}

#[test]
fn relays_take_per_relay_settings_and_split_a_fixed_concurrency_by_weight() {
    let text = format!(
        "{MINIMAL}[delivery]\nconcurrency = 10\nsmtp = [\"smtp://a:25\", \
         {{ url = \"smtp://b:2525\", weight = 3, max_concurrency = 16, rate = 100 }}]\n"
    );
    let c = parse(&text, &|_| None).unwrap();
    let r = &c.delivery.relays;
    assert_eq!(
        (r[0].weight, r[0].max_concurrency, r[0].rate),
        (1, None, None)
    );
    assert_eq!(
        (r[1].port, r[1].weight, r[1].max_concurrency, r[1].rate),
        (2525, 3, Some(16), Some(100))
    );
    // 10 connections by weight 1:3 -> 2.5 / 7.5, remainders rounded.
    let split = c.delivery.concurrency.per_relay(r);
    assert_eq!(split.iter().sum::<usize>(), 10);
    assert!(split == vec![3, 7] || split == vec![2, 8], "{split:?}");
    // auto: each relay up to its own ceiling.
    assert_eq!(Concurrency::Auto { max: 64 }.per_relay(r), vec![64, 16]);
    assert_eq!(
        Concurrency::parse("auto:8").unwrap(),
        Concurrency::Auto { max: 8 }
    );
    assert!(Concurrency::parse("0").is_err());
    assert!(Concurrency::parse("automatic").is_err());
    let bad = text.replace("weight = 3", "weight = 0");
    let e = parse(&bad, &|_| None).unwrap_err().to_string();
    assert!(
        e.contains("delivery.smtp") && e.contains("at least 1"),
        "{e}"
    );
}

#[test]
fn unknown_keys_are_errors_naming_the_key() {
    let e = parse(
        &format!("{MINIMAL}\n[delivery]\nconcurrensy = 3\n"),
        &|_| None,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("concurrensy") && e.contains("c.toml"), "{e}");
}

#[test]
fn bad_values_name_their_key() {
    let cases = [
        (
            MINIMAL.replace("table = \"subscribers\"", "table = \"x; drop\""),
            "audience.table",
        ),
        (
            format!("{MINIMAL}\n[delivery]\nconcurrency = 0\n"),
            "delivery.concurrency",
        ),
        (
            format!("{MINIMAL}\n[delivery]\nsmtp = \"http://x\"\n"),
            "delivery.smtp",
        ),
        (
            format!("{MINIMAL}\n[message.headers]\nBcc = \"x\"\n")
                .replace("[message]\n", "[message]\n"),
            "message.headers.Bcc",
        ),
        (
            MINIMAL.replace("text = \"t.txt\"", "text = \"missing.txt\""),
            "message.text",
        ),
    ];
    for (text, key) in cases {
        let e = parse(&text, &|_| None).unwrap_err().to_string();
        assert!(e.contains(key), "expected {key} in {e}");
    }
}

#[test]
fn durations_and_retry_schedule() {
    assert_eq!(parse_duration("90s").unwrap(), Duration::from_secs(90));
    assert_eq!(parse_duration("2d").unwrap(), Duration::from_secs(172_800));
    assert!(parse_duration("5 parsecs").is_err());
    let c = parse(
        &format!("{MINIMAL}\n[delivery]\nretry = [\"1m\", \"10m\"]\ngive_up_after = \"1h\"\n"),
        &|_| None,
    )
    .unwrap();
    let r = &c.delivery.retry;
    assert_eq!(
        (r.delay_after(1), r.delay_after(2), r.delay_after(9)),
        (
            Duration::from_secs(60),
            Duration::from_secs(600),
            Duration::from_secs(600)
        )
    );
    assert_eq!(r.give_up_after, Duration::from_secs(3600));
    assert!(!c.delivery.chunking, "DATA by default");
    let c = parse(
        &format!("{MINIMAL}\n[delivery]\nchunking = true\n"),
        &|_| None,
    )
    .unwrap();
    assert!(c.delivery.chunking);
    let e = parse(
        &format!("{MINIMAL}\n[delivery]\nretry = [\"soon\"]\n"),
        &|_| None,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("delivery.retry"), "{e}");
}

#[test]
fn relays_parse() {
    assert_eq!(parse_relay("smtp://[::1]:2525").unwrap().port, 2525);
    let r = parse_relay("smtp://bob@mx.example.com:587").unwrap();
    assert_eq!(
        (r.host.as_str(), r.port, r.user.as_deref()),
        ("mx.example.com", 587, Some("bob"))
    );
    assert!(parse_relay("smtp://bob:pw@h").is_err());
}

fn relays_of(smtp: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<Vec<Relay>> {
    let text = format!("{MINIMAL}[delivery]\nsmtp = {smtp}\n");
    parse(&text, env).map(|c| c.delivery.relays)
}

#[test]
fn tls_defaults_follow_where_the_relay_is() {
    let none = &|_: &str| None;
    let r = relays_of(
        r#"["smtp://127.0.0.1:25", "smtp://[::1]:2525", "smtp://localhost", "smtp://mx.example.com:587", "smtps://mx.example.com", { url = "smtp://10.0.0.5", tls = "none" }, { url = "smtp://mx.example.com:465", tls = "tls" }]"#,
        none,
    )
    .unwrap();
    let got: Vec<(Tls, u16)> = r.iter().map(|r| (r.tls, r.port)).collect();
    assert_eq!(
        got,
        vec![
            (Tls::None, 25),
            (Tls::None, 2525),
            (Tls::None, 25),
            (Tls::StartTls, 587),
            (Tls::Implicit, 465),
            (Tls::None, 25),
            (Tls::Implicit, 465),
        ]
    );
    assert_eq!(r[4].to_string(), "smtps://mx.example.com:465");
    let e = relays_of(r#"[{ url = "smtp://h", tls = "yes" }]"#, none)
        .unwrap_err()
        .to_string();
    assert!(e.contains("delivery.smtp") && e.contains("\"yes\""), "{e}");
    let e = relays_of(r#"[{ url = "smtps://h", tls = "starttls" }]"#, none)
        .unwrap_err()
        .to_string();
    assert!(e.contains("implicit TLS"), "{e}");
    let e = relays_of(
        r#"[{ url = "smtp://127.0.0.1", tls = "none", ca_file = "/etc/ssl/ca.pem" }]"#,
        none,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("ca_file") && e.contains("starttls"), "{e}");
    let e = relays_of(
        r#"[{ url = "smtp://mx.example.com", ca_file = "missing.pem" }]"#,
        none,
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("missing.pem") && e.contains("cannot read"),
        "{e}"
    );
}

#[test]
fn a_relative_ca_file_is_frozen_with_the_templates() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("t.txt"), "Hello").unwrap();
    std::fs::write(dir.path().join("ca.pem"), "PEM TEXT").unwrap();
    let text = format!(
        "{MINIMAL}[delivery]\nsmtp = [{{ url = \"smtp://mx.example.com\", ca_file = \"ca.pem\" }}]\n"
    );
    let c = Config::parse(&text, "c.toml", dir.path(), &Overrides::default(), &|_| {
        None
    })
    .unwrap();
    assert!(c
        .template_files
        .contains(&("ca.pem".to_string(), "PEM TEXT".to_string())));
    assert_eq!(
        c.delivery.relays[0].verify.ca_file.as_deref(),
        Some(dir.path().join("ca.pem").as_path())
    );
}

#[test]
fn credentials_come_from_the_environment_and_never_cross_in_clear() {
    let env = &|k: &str| match k {
        "BLAST_SMTP_PASSWORD" => Some("default-pw".to_string()),
        "RELAY2_PW" => Some("second-pw".to_string()),
        _ => None,
    };
    let r = relays_of(
        r#"["smtp://bob@mx.example.com:587", { url = "smtp://mx2.example.com", user = "ann", password_env = "RELAY2_PW" }]"#,
        env,
    )
    .unwrap();
    assert_eq!(r[0].password, Some(Secret("default-pw".into())));
    assert_eq!(r[1].user.as_deref(), Some("ann"));
    assert_eq!(r[1].password, Some(Secret("second-pw".into())));
    assert!(!format!("{r:?}").contains("-pw"), "{r:?}");
    let e = relays_of(
        r#"[{ url = "smtp://bob@mx.example.com", tls = "none" }]"#,
        env,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("in clear"), "{e}");
    let e = relays_of(r#"["smtp://bob@mx.example.com"]"#, &|_| None)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("BLAST_SMTP_PASSWORD") && e.contains("bob"),
        "{e}"
    );
    // On loopback, AUTH without TLS is allowed (a local submission port).
    assert!(relays_of(r#"["smtp://bob@127.0.0.1:587"]"#, env).is_ok());
}

#[test]
fn from_domains_keep_the_relays_for_the_from_domain() {
    let none = &|_: &str| None;
    let smtp = r#"[{ url = "smtp://127.0.0.1:1", from_domains = ["example.com"] }, { url = "smtp://127.0.0.1:2", from_domains = ["other.org"] }, "smtp://127.0.0.1:3"]"#;
    let ports = |text: &str| -> Vec<u16> {
        parse(&format!("{text}[delivery]\nsmtp = {smtp}\n"), none)
            .unwrap()
            .delivery
            .relays
            .iter()
            .map(|r| r.port)
            .collect()
    };
    assert_eq!(ports(MINIMAL), vec![1, 3]);
    // A subdomain of a listed domain matches; a look-alike does not.
    assert_eq!(
        ports(&MINIMAL.replace("news@example.com", "news@mail.example.com")),
        vec![1, 3]
    );
    assert_eq!(
        ports(&MINIMAL.replace("news@example.com", "news@badexample.com")),
        vec![3]
    );
    let e = relays_of(
        r#"[{ url = "smtp://127.0.0.1:1", from_domains = ["other.org"] }]"#,
        none,
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("\"example.com\"") && e.contains("from_domains"),
        "{e}"
    );
}
