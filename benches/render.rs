//! Per-message CPU of the render path on the example newsletter (about 8 KB:
//! subject, text and HTML with eight articles): templates alone, MIME
//! building alone, and both. Run with `cargo bench --bench render`.

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

/// Templates only: subject, headers, text and HTML.
#[divan::bench]
fn templates(b: divan::Bencher<'_, '_>) {
    let (r, rcpt) = setup();
    b.bench_local(|| r.render_parts(divan::black_box(&rcpt)).expect("renders"));
}

/// MIME building only, from already rendered parts.
#[divan::bench]
fn mime(b: divan::Bencher<'_, '_>) {
    let (r, rcpt) = setup();
    let parts = r.render_parts(&rcpt).expect("renders");
    let now = blast::clock::now();
    b.with_inputs(|| parts.clone())
        .bench_local_values(|p| r.build(&rcpt, p, now).unwrap());
}

/// The whole per-message path, as the runner calls it.
#[divan::bench]
fn message(b: divan::Bencher<'_, '_>) {
    let (r, rcpt) = setup();
    let now = blast::clock::now();
    let size = r.render(&rcpt, now).expect("renders").bytes.len();
    eprintln!("message size: {size} bytes");
    b.bench_local(|| r.render(divan::black_box(&rcpt), now).expect("renders"));
}
