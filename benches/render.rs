//! Per-message CPU of the render path on the example newsletter (about 11
//! KB: subject, text and HTML with eight articles): the header templates,
//! the whole message, and the byte encoders (MB/s). Run with `cargo bench
//! --bench render`.

use std::path::Path;

use blast::config::{Config, Overrides};
use blast::model::Recipient;
use blast::render::{Identity, Renderer};

fn main() {
    divan::main();
}

fn setup() -> (Renderer, Recipient) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("templates/newsletter/campaign.toml");
    let cfg = Config::load(&path, &Overrides::default()).expect("example campaign");
    let identity = Identity {
        campaign: cfg.name.clone(),
        campaign_id: 1,
        key: None,
    };
    let renderer = Renderer::compile(&cfg.message, &cfg.vars, identity).expect("templates compile");
    let vars = serde_json::json!({
        "first_name": "Jürgen", "last_name": "Müller", "city": "München", "plan": "pro",
        "created_at": "2026-01-01T00:00:00.000Z",
    });
    let recipient = Recipient::new(
        424242,
        "juergen.mueller424242@example.com",
        vars.as_object().cloned().unwrap_or_default(),
    );
    (renderer, recipient)
}

/// The header templates only (subject, display name, custom headers, the
/// signed unsubscribe links and VERP address).
#[divan::bench]
fn header_templates(b: divan::Bencher<'_, '_>) {
    let (r, rcpt) = setup();
    b.bench_local(|| r.render_parts(divan::black_box(&rcpt)).expect("renders"));
}

/// The whole per-message path, as the runner calls it: templates, bodies
/// and the MIME writer, into one buffer.
#[divan::bench]
fn message(b: divan::Bencher<'_, '_>) {
    let (r, rcpt) = setup();
    let now = blast::clock::now();
    let size = r.render(&rcpt, now).expect("renders").bytes.len();
    eprintln!("message size: {size} bytes");
    b.counter(divan::counter::BytesCount::new(size))
        .bench_local(|| r.render(divan::black_box(&rcpt), now).expect("renders"));
}

/// The whole per-message path for a row as the bench audience holds it
/// (`scripts/bench.sh`): ASCII names, the `attributes` JSON object (its keys
/// lifted to the top level, as the source does) and two columns the
/// templates never read; every relay offers 8BITMIME.
#[divan::bench]
fn message_ascii_row(b: divan::Bencher<'_, '_>) {
    let (r, _) = setup();
    r.allow_8bit(true);
    let attributes = serde_json::json!({
        "first_name": "Name424242", "last_name": "Doe", "city": "Oslo", "plan": "pro",
    });
    let mut vars = attributes.as_object().cloned().unwrap_or_default();
    vars.insert("attributes".into(), attributes);
    vars.insert("created_at".into(), "2026-01-01T00:00:00.000Z".into());
    vars.insert("email_key".into(), "user424242@example.com".into());
    let rcpt = Recipient::new(424242, "user424242@example.com", vars);
    let now = blast::clock::now();
    let size = r.render(&rcpt, now).expect("renders").bytes.len();
    b.counter(divan::counter::BytesCount::new(size))
        .bench_local(|| r.render(divan::black_box(&rcpt), now).expect("renders"));
}

/// Text for the encoders: the example newsletter's text part, personalized
/// in German (non-ASCII, so quoted-printable has work to do), 64 KiB.
fn sample_text() -> String {
    let (r, rcpt) = setup();
    let message = r.render(&rcpt, blast::clock::now()).expect("renders");
    let text = String::from_utf8_lossy(&message.bytes).replace("Hello", "Grüße, Jürgen");
    text.repeat(65536 / text.len() + 1)
}

/// The quoted-printable encoder (for parts that cannot go 7bit or 8bit).
#[divan::bench]
fn quoted_printable(b: divan::Bencher<'_, '_>) {
    let text = sample_text();
    let mut out = Vec::with_capacity(text.len() * 2);
    b.counter(divan::counter::BytesCount::of_str(&text))
        .bench_local(|| {
            out.clear();
            blast::render::quoted_printable(divan::black_box(&text), &mut out);
        });
}

/// Dot-stuffing of DATA content (RFC 5321 4.5.2), on a message where one
/// line in twenty starts with ".".
#[divan::bench]
fn dot_stuffing(b: divan::Bencher<'_, '_>) {
    let text = sample_text()
        .split("\r\n")
        .enumerate()
        .map(|(i, l)| {
            if i % 20 == 0 {
                format!(".{l}")
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\r\n");
    let mut out = Vec::with_capacity(text.len() * 2);
    b.counter(divan::counter::BytesCount::of_str(&text))
        .bench_local(|| {
            out.clear();
            blast::transport::smtp::dot_stuff(divan::black_box(text.as_bytes()), &mut out);
        });
}
