//! `concurrency = "auto"` against the sink's load model, on paused tokio
//! time (deterministic, and a minute of modelled traffic takes a second):
//! throughput against the modelled delivery rate, queue bounds, recovery
//! after a step change, shares between relays, and an outage of one relay.

use std::sync::Arc;
use std::time::Duration;

use blast::campaign::{self, Pipeline, RunOptions, Stats, Summary};
use blast::config::{Concurrency, MessageConfig, Relay, TemplateSource, Unsubscribe};
use blast::ledger::MemoryLedger;
use blast::render::{Identity, Renderer};
use blast::sign::{Pattern, Var};
use blast::sink::load::{LoadConfig, LoadModel, Phase};
use blast::sink::{Faults, Sink, SinkConfig};
use blast::source::VecSource;
use blast::transport::smtp::Smtp;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

fn renderer() -> Arc<Renderer> {
    let message = MessageConfig {
        from: "News <news@example.com>".into(),
        reply_to: None,
        to_name: None,
        subject: "Hello {{ id }}".into(),
        text: Some(TemplateSource {
            name: "t.txt".into(),
            body: "Hello {{ email }}\n".into(),
        }),
        html: None,
        headers: Vec::new(),
        envelope_from: "bounces@example.com".into(),
        verp: None,
        unsubscribe: Unsubscribe {
            url: Pattern::parse("https://l.example.com/u/{token}", &[Var::Token]).unwrap(),
            mailto: Pattern::parse("u+{token}@example.com", &[Var::Token]).unwrap(),
        },
    };
    Arc::new(Renderer::compile(&message, &Default::default(), Identity::default()).unwrap())
}

/// One run's results.
struct Run {
    summary: Summary,
    /// Virtual seconds.
    seconds: f64,
    models: Vec<Arc<LoadModel>>,
    sinks: Vec<Vec<blast::sink::Received>>,
    /// Connections each relay accepted.
    connections: Vec<u64>,
    /// (virtual seconds, limit per relay, accepted per relay) every 100 ms.
    samples: Vec<(f64, Vec<usize>, Vec<u64>)>,
}

async fn run(models: Vec<LoadConfig>, n: i64, concurrency: Concurrency) -> Run {
    run_paced(models, n, concurrency, Duration::ZERO).await
}

/// [`run`], with the audience arriving 1000 recipients per `pace`.
async fn run_paced(
    models: Vec<LoadConfig>,
    n: i64,
    concurrency: Concurrency,
    pace: Duration,
) -> Run {
    let models: Vec<Arc<LoadModel>> = models
        .into_iter()
        .map(|m| Arc::new(LoadModel::new(m)))
        .collect();
    let mut sinks: Vec<Sink> = Vec::new();
    for m in &models {
        let s = Sink::start(SinkConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            keep_messages: true,
            faults: Faults {
                load: Some(m.clone()),
                ..Default::default()
            },
            ..Default::default()
        })
        .await
        .unwrap();
        sinks.push(s);
    }
    let relays: Vec<Relay> = sinks
        .iter()
        .map(|s| Relay {
            host: "127.0.0.1".into(),
            port: s.local_addr().port(),
            weight: 1,
            ..Default::default()
        })
        .collect();
    let transport = Arc::new(
        Smtp::new(relays.clone(), "localhost".into(), Duration::from_secs(30))
            .expect("no TLS to set up"),
    );
    let stats = Arc::new(Stats::new(concurrency.per_relay(&relays).iter().sum()));
    let opts = RunOptions {
        concurrency,
        relays: relays.clone(),
        initial_limits: Vec::new(),
        queue_probe: None,
        rate: blast::campaign::Rate::new(0),
        holdings: None,
        breaker_threshold: 0,
        render_pause: 0,
        ambiguous_tries: 3,
        breaker_rate: blast::campaign::RateRule::OFF,
        abort: CancellationToken::new(),
        suppressions: Default::default(),
    };
    let start = Instant::now();
    let samples = Arc::new(std::sync::Mutex::new(Vec::new()));
    let sampler = {
        let (stats, models, samples) = (stats.clone(), models.clone(), samples.clone());
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(100)).await;
                let limits = stats
                    .relays
                    .get()
                    .map(|r| r.iter().map(|r| r.gate.snapshot().limit()).collect())
                    .unwrap_or_default();
                let accepted = models.iter().map(|m| m.stats().accepted).collect();
                samples
                    .lock()
                    .unwrap()
                    .push((start.elapsed().as_secs_f64(), limits, accepted));
            }
        })
    };
    let pipeline = Pipeline {
        name: "model".into(),
        source: VecSource::numbered(n, 1000).paced(pace),
        renderer: renderer(),
        transport,
        ledger: MemoryLedger::new(),
        options: opts,
    };
    let summary = campaign::run(pipeline, stats, CancellationToken::new())
        .await
        .unwrap();
    let seconds = start.elapsed().as_secs_f64();
    sampler.abort();
    let samples = std::mem::take(&mut *samples.lock().unwrap());
    let mut received = Vec::new();
    let mut connections = Vec::new();
    for s in sinks {
        connections.push(s.stats().connections);
        received.push(s.shutdown().await);
    }
    Run {
        summary,
        seconds,
        models,
        sinks: received,
        connections,
        samples,
    }
}

/// A Postfix-like MTA: 2 ms per message, +0.2 ms per other transaction,
/// delivering `rate` messages/s, stalling 1 s above 500 queued, full at 5000.
fn postfix_like(rate: f64) -> LoadConfig {
    LoadConfig {
        base: Duration::from_millis(2),
        per_in_flight: Duration::from_micros(200),
        delivery_rate: rate,
        stall_queue: 500,
        stall: Duration::from_secs(1),
        full_queue: 5000,
        ..Default::default()
    }
}

fn auto() -> Concurrency {
    Concurrency::Auto { max: 64 }
}

fn every_recipient_once(r: &Run, n: i64) {
    let mut seen = std::collections::HashSet::new();
    for m in r.sinks.iter().flatten() {
        assert!(seen.insert(m.rcpt_to[0].clone()), "{} twice", m.rcpt_to[0]);
    }
    assert_eq!(seen.len() as i64, n, "every recipient delivered");
}

#[tokio::test(start_paused = true)]
async fn auto_keeps_up_with_the_delivery_rate_and_bounds_the_queue() {
    let n = 30_000;
    let r = run(vec![postfix_like(2000.0)], n, auto()).await;
    let rate = n as f64 / r.seconds;
    let q = r.models[0].stats();
    eprintln!(
        "auto: {rate:.0} msg/s over {:.1}s, max queue {:.0}, refused {}, relays {:?}",
        r.seconds, q.max_queue, q.refused, r.summary.relays
    );
    assert_eq!(r.summary.sent, n as u64);
    every_recipient_once(&r, n);
    assert!(
        rate >= 0.95 * 2000.0,
        "{rate:.0} msg/s is under 95% of 2000"
    );
    assert!(q.max_queue < 2000.0, "queue bounded: {:.0}", q.max_queue);
    assert_eq!(q.refused, 0, "never filled the queue");
    assert!(r.summary.relays[0].adaptive);
}

#[tokio::test(start_paused = true)]
async fn the_limit_comes_down_when_delivery_collapses() {
    // At 3 s delivery drops 40-fold (to 50/s): arrivals now wait the whole
    // in-flow delay (1 s) and the queue would grow without end at 64
    // connections. Auto sees the stalls while they happen and backs off.
    let n = 9_000;
    let mut model = postfix_like(2000.0);
    model.phases = vec![(Duration::from_secs(3), Phase::Slow(40.0))];
    let r = run(vec![model], n, auto()).await;
    let q = r.models[0].stats();
    let limits_after: Vec<usize> = r
        .samples
        .iter()
        .filter(|s| s.0 >= 6.0)
        .map(|s| s.1[0])
        .collect();
    let max_after = limits_after.iter().copied().max().unwrap_or(0);
    eprintln!(
        "collapse: {:.1}s, max queue {:.0}, refused {}, limit after 3 s {max_after}, {:?}",
        r.seconds, q.max_queue, q.refused, r.summary.relays
    );
    every_recipient_once(&r, n);
    assert_eq!(q.refused, 0, "never filled the queue");
    // A stall is a wait past 8 minimum round trips (here the 750 ms cap):
    // at 50 tokens/s that is about 37 in flight. Within 30 windows (3 s)
    // the limit is below that and stays there, a sawtooth under the stall.
    assert!(
        max_after <= 40,
        "limit after the collapse: {limits_after:?}"
    );
    assert!(q.max_queue < 1000.0, "queue bounded: {:.0}", q.max_queue);
    let relay = &r.summary.relays[0];
    assert!(relay.marks.stall > 0, "{relay:?}");
}

#[tokio::test(start_paused = true)]
async fn the_limit_converges_below_a_connection_cap_within_ten_windows() {
    // At 2 s the MTA starts refusing (421) beyond 8 transactions in flight.
    let n = 30_000;
    let mut model = postfix_like(0.0);
    model.phases = vec![(Duration::from_secs(2), Phase::Cap(8))];
    let r = run(vec![model], n, auto()).await;
    every_recipient_once(&r, n);
    let before = r
        .samples
        .iter()
        .filter(|s| s.0 < 2.0)
        .map(|s| s.1[0])
        .max()
        .unwrap();
    let after: Vec<usize> = r
        .samples
        .iter()
        .filter(|s| s.0 >= 3.0)
        .map(|s| s.1[0])
        .collect();
    eprintln!("cap: before {before}, after {after:?}");
    assert!(before > 8, "grew past the cap before it existed: {before}");
    assert!(
        !after.is_empty() && after.iter().all(|l| *l <= 9),
        "{after:?}"
    );
    let relay = &r.summary.relays[0];
    assert!(relay.marks.connection > 0, "{relay:?}");
}

#[tokio::test(start_paused = true)]
async fn two_relays_share_by_capacity() {
    let n = 30_000;
    let r = run(vec![postfix_like(3000.0), postfix_like(1000.0)], n, auto()).await;
    every_recipient_once(&r, n);
    let a = r.sinks[0].len() as f64 / n as f64;
    eprintln!("shares {a:.2}/{:.2} in {:.1}s", 1.0 - a, r.seconds);
    assert!(
        (0.65..=0.85).contains(&a),
        "relay A (3/4 of the capacity) got {a:.2}"
    );
    for m in &r.models {
        assert!(m.stats().max_queue < 2000.0);
    }
}

#[tokio::test(start_paused = true)]
async fn an_outage_moves_traffic_to_the_other_relay_and_back() {
    let n = 30_000;
    // 3000 msg/s in all, over two relays that could each take all of it.
    let mut b = postfix_like(0.0);
    b.phases = vec![
        (Duration::from_secs(3), Phase::Outage),
        (Duration::from_secs(6), Phase::Normal),
    ];
    let r = run_paced(
        vec![postfix_like(0.0), b],
        n,
        auto(),
        Duration::from_millis(333),
    )
    .await;
    every_recipient_once(&r, n);
    let at = |t: f64, i: usize| r.samples.iter().find(|s| s.0 >= t).map(|s| s.2[i]).unwrap();
    let (a_before, a_during) = (at(3.0, 0) - at(1.0, 0), at(5.5, 0) - at(3.5, 0));
    let b_during = at(5.5, 1) - at(3.5, 1);
    let b_after = at(9.0, 1) - at(7.0, 1);
    eprintln!("A {a_before} then {a_during}; B {b_during} during, {b_after} after");
    assert_eq!(b_during, 0, "nothing accepted by the relay that is down");
    assert!(
        a_during as f64 > 1.6 * a_before as f64,
        "A took over: {a_before} -> {a_during}"
    );
    assert!(r.summary.relays[1].marks.connection > 0);
    assert!(
        r.summary.relays[1].circuit_opened >= 1,
        "{:?}",
        r.summary.relays[1]
    );
    assert_eq!(r.summary.relays[0].circuit_opened, 0);
    assert!(b_after > 0, "traffic came back to B");
}

/// With the queue probe, a queue above its target is a congestion mark.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_queue_probe_marks_congestion() {
    let w = crate::util::World::new(crate::util::Backend::Sqlite).await;
    w.seed(600).await;
    let sink = crate::util::slow_sink(Duration::from_millis(50)).await;
    let depth = w.path("queue-depth");
    std::fs::write(&depth, "9000\n").unwrap();
    let extra = format!(
        "[delivery]\nqueue_probe = \"cat {}\"\nqueue_target = 5000\n",
        depth.display()
    );
    let path = w.campaign("probe", "Hi", "x", None, &extra);
    let mut cfg = w.config(&path, Some(&sink), 1);
    cfg.delivery.concurrency = auto();
    let summary = crate::util::spawn_send(&cfg).await.unwrap().unwrap();
    assert_eq!(summary.sent, 600);
    assert_eq!(summary.queue_max, Some(9000));
    let relay = &summary.relays[0];
    // A mark a second, each halving the limit: it never gets near the ceiling.
    assert!(relay.marks.queue >= 2, "{relay:?}");
    assert!(relay.peak_limit <= 32, "held down by the queue: {relay:?}");
    assert_eq!(blast::campaign::queue_depth("12\n"), 12);
    assert_eq!(blast::campaign::queue_depth("{}\n{}\n{}\n"), 3);
}

/// Per-relay settings: a fixed concurrency split 3:1 by weight, and a
/// relay with a rate quota that is kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_weights_and_rates() {
    let w = crate::util::World::new(crate::util::Backend::Sqlite).await;
    w.seed(2000).await;
    let (a, b, c) = (
        crate::util::sink(Faults::default()).await,
        crate::util::sink(Faults::default()).await,
        crate::util::sink(Faults::default()).await,
    );
    let extra = format!(
        "[delivery]\nconcurrency = 8\nsmtp = [\"smtp://{}\", {{ url = \"smtp://{}\", weight = 3 }}, \
         {{ url = \"smtp://{}\", rate = 50 }}]\n",
        a.local_addr(),
        b.local_addr(),
        c.local_addr()
    );
    let path = w.campaign("weights", "Hi", "x", None, &extra);
    let cfg = blast::config::Config::load(&path, &Default::default()).unwrap();
    assert_eq!(
        cfg.delivery.concurrency.per_relay(&cfg.delivery.relays),
        vec![2, 5, 1]
    );
    let started = std::time::Instant::now();
    let summary = crate::util::spawn_send(&cfg).await.unwrap().unwrap();
    let secs = started.elapsed().as_secs_f64();
    assert_eq!(summary.sent, 2000);
    let (na, nb, nc) = (a.stats().messages, b.stats().messages, c.stats().messages);
    eprintln!("weights: {na}/{nb}/{nc} in {secs:.2}s");
    assert_eq!(na + nb + nc, 2000);
    // The rate-limited relay got at most its quota (plus the first second's burst).
    assert!((nc as f64) <= 50.0 * secs + 60.0, "{nc} in {secs:.2}s");
    // 5 injectors against 2 (weights 3:1 of 8 connections, largest
    // remainder): about 2.5 times the messages at the same sink speed.
    let ratio = nb as f64 / na as f64;
    assert!((1.6..=3.6).contains(&ratio), "5 vs 2 injectors: {ratio:.2}");
}

/// A session left idle while the injectors wait for work (the audience
/// arrives a page every 10 s) is closed after 5 s and opened again for the
/// next page, before the relay's own idle timeout could make the next
/// message an ambiguous loss.
#[tokio::test(start_paused = true)]
async fn sessions_idle_between_pages_are_closed() {
    let n = 3000;
    let r = run_paced(
        vec![postfix_like(0.0)],
        n,
        Concurrency::Fixed(2),
        Duration::from_secs(10),
    )
    .await;
    every_recipient_once(&r, n);
    assert_eq!(r.summary.possibly_duplicated, 0);
    // Two sessions per page, three pages.
    assert_eq!(r.connections, vec![6], "{:?}", r.summary.relays);
}
