//! The runner in memory: a [`VecSource`], the [`Stub`] transport and a
//! [`MemoryLedger`] (or a ledger that can be held), on paused tokio time,
//! so each test runs in well under a second and none waits in real time.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Map, Value};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use super::{run, Pipeline, RunOptions, Stats, Summary, AMBIGUOUS_NOTE};
use crate::config::{Concurrency, MessageConfig, TemplateSource, Unsubscribe};
use crate::error::Result;
use crate::ledger::{Ledger, MemoryLedger, FLUSH_ROWS};
use crate::model::{Outcome, Recipient, Record, Reply, Status};
use crate::render::{Identity, Renderer};
use crate::sign::{Pattern, Var};
use crate::source::VecSource;
use crate::transport::stub::Stub;

/// Templates with this subject.
fn renderer(subject: &str) -> Arc<Renderer> {
    let message = MessageConfig {
        from: "News <news@example.com>".into(),
        reply_to: None,
        to_name: None,
        subject: subject.into(),
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

/// Options for `concurrency` fixed injectors on one relay.
fn options(concurrency: usize) -> RunOptions {
    RunOptions {
        concurrency: Concurrency::Fixed(concurrency),
        relays: Vec::new(),
        initial_limits: Vec::new(),
        queue_probe: None,
        rate: crate::campaign::Rate::new(0),
        holdings: None,
        render_pause: 5,
        ambiguous_tries: 3,
        breaker_threshold: 0,
        breaker_rate: crate::campaign::RateRule::OFF,
        abort: CancellationToken::new(),
        suppressions: Default::default(),
    }
}

/// Runs `source` through `stub` into `ledger` until done or `stop`.
async fn go<L: Ledger>(
    source: VecSource,
    stub: Stub,
    ledger: L,
    opts: RunOptions,
    stop: CancellationToken,
) -> Result<Summary> {
    let stats = Arc::new(Stats::new(opts.concurrency.per_relay(&[]).iter().sum()));
    let pipeline = Pipeline {
        name: "test".into(),
        source,
        renderer: renderer("Hello {{ id }}"),
        transport: Arc::new(stub),
        ledger,
        options: opts,
    };
    run(pipeline, stats, stop).await
}

/// The recipient ids the stub received, in order.
fn delivered_ids(stub: &Stub) -> Vec<i64> {
    stub.delivered()
        .iter()
        .map(|d| d.envelope.recipient_id)
        .collect()
}

/// The ids recorded with `status`, sorted.
fn recorded(ledger: &MemoryLedger, status: Status) -> Vec<i64> {
    let mut ids: Vec<i64> = ledger
        .records()
        .iter()
        .filter(|r| r.status() == status)
        .map(|r| r.recipient_id)
        .collect();
    ids.sort_unstable();
    ids
}

fn reply(code: u16, text: &str) -> Reply {
    Reply {
        code: Some(code),
        enhanced: None,
        text: text.into(),
    }
}

#[tokio::test(start_paused = true)]
async fn messages_go_out_once_each_and_each_is_recorded_once() {
    let (stub, ledger) = (Stub::new(), MemoryLedger::new());
    let s = go(
        VecSource::numbered(2500, 1000),
        stub.clone(),
        ledger.clone(),
        options(1),
        CancellationToken::new(),
    )
    .await
    .unwrap();
    // Render workers run in parallel on blocking threads, each on a chunk
    // in order; a chunk whose thread is descheduled goes out late, so the
    // order of chunks is not promised (resume and claims do not need it).
    let ids = delivered_ids(&stub);
    let mut sorted = ids.clone();
    sorted.sort_unstable();
    assert!(
        sorted == (1..=2500).collect::<Vec<_>>(),
        "each recipient sent once"
    );
    assert!(
        recorded(&ledger, Status::Sent) == sorted,
        "each sent one recorded"
    );
    assert_eq!(ledger.records().len(), 2500, "nobody recorded twice");
    assert_eq!(
        (s.sent, s.failed, s.deferred, s.interrupted),
        (2500, 0, 0, false)
    );
    assert!(s.all_accepted());
}

#[tokio::test(start_paused = true)]
async fn an_empty_audience_ends_at_once() {
    let (stub, ledger) = (Stub::new(), MemoryLedger::new());
    let s = go(
        VecSource::numbered(0, 1000),
        stub.clone(),
        ledger.clone(),
        options(8),
        CancellationToken::new(),
    )
    .await
    .unwrap();
    assert_eq!((s.sent, s.interrupted), (0, false));
    assert!(stub.delivered().is_empty() && ledger.records().is_empty());
}

/// A ledger whose writes wait for permits the test hands out.
#[derive(Clone)]
struct HeldLedger {
    gate: Arc<Semaphore>,
    inner: MemoryLedger,
    batches: Arc<Mutex<Vec<usize>>>,
}

impl Ledger for HeldLedger {
    async fn record(&mut self, batch: &[Record]) -> Result<()> {
        self.gate.acquire().await.expect("open").forget();
        self.batches.lock().unwrap().push(batch.len());
        self.inner.record(batch).await
    }
}

#[tokio::test(start_paused = true)]
async fn a_stalled_ledger_stops_the_injectors_within_a_bounded_window() {
    let stub = Stub::new();
    let ledger = HeldLedger {
        gate: Arc::new(Semaphore::new(0)),
        inner: MemoryLedger::new(),
        batches: Default::default(),
    };
    let task = tokio::spawn(go(
        VecSource::numbered(10_000, 1000),
        stub.clone(),
        ledger.clone(),
        options(4),
        CancellationToken::new(),
    ));
    tokio::time::sleep(Duration::from_secs(5)).await;
    let held = stub.delivered().len();
    // The channel to the ledger, the batch being written, and one record
    // per injector waiting to go in: nothing more goes out unrecorded.
    assert!(held > 0, "sending started");
    assert!(
        held <= 2 * FLUSH_ROWS + 4,
        "{held} sent with the ledger stalled"
    );
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert_eq!(stub.delivered().len(), held, "still stopped a minute later");
    ledger.gate.add_permits(1000);
    let s = task.await.unwrap().unwrap();
    assert_eq!(s.sent, 10_000);
    assert_eq!(ledger.inner.records().len(), 10_000);
    assert!(ledger
        .batches
        .lock()
        .unwrap()
        .iter()
        .all(|&n| n <= FLUSH_ROWS));
}

#[tokio::test(start_paused = true)]
async fn stop_finishes_transactions_in_flight_and_records_every_answer() {
    let (stub, ledger) = (Stub::new(), MemoryLedger::new());
    stub.set_latency(Duration::from_millis(10));
    let stop = CancellationToken::new();
    let task = tokio::spawn(go(
        VecSource::numbered(5000, 1000),
        stub.clone(),
        ledger.clone(),
        options(4),
        stop.clone(),
    ));
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.cancel();
    let s = task.await.unwrap().unwrap();
    assert!(s.interrupted);
    let mut sent = delivered_ids(&stub);
    sent.sort_unstable();
    assert!(!sent.is_empty() && sent.len() < 5000, "{} sent", sent.len());
    // Everything the MTA took is recorded; nothing else is.
    assert_eq!(recorded(&ledger, Status::Sent), sent);
    assert_eq!(ledger.records().len(), sent.len());
}

#[tokio::test(start_paused = true)]
async fn abort_abandons_transactions_in_flight_unrecorded() {
    let (stub, ledger) = (Stub::new(), MemoryLedger::new());
    stub.set_latency(Duration::from_secs(3600));
    let opts = options(4);
    let abort = opts.abort.clone();
    let stop = CancellationToken::new();
    let task = tokio::spawn(go(
        VecSource::numbered(100, 10),
        stub.clone(),
        ledger.clone(),
        opts,
        stop.clone(),
    ));
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.cancel();
    abort.cancel();
    let s = tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("an abort does not wait for the relay")
        .unwrap()
        .unwrap();
    assert!(s.interrupted);
    assert!(stub.delivered().is_empty());
    assert!(ledger.records().is_empty(), "no answer, no record");
}

#[tokio::test(start_paused = true)]
async fn lost_sessions_are_retried_and_an_ambiguous_loss_is_noted() {
    let (stub, ledger) = (Stub::new(), MemoryLedger::new());
    stub.lose_sessions(1, true);
    stub.lose_sessions(2, false);
    let s = go(
        VecSource::numbered(50, 10),
        stub.clone(),
        ledger.clone(),
        options(2),
        CancellationToken::new(),
    )
    .await
    .unwrap();
    assert_eq!((s.sent, s.retries, s.possibly_duplicated), (50, 3, 1));
    let mut ids = delivered_ids(&stub);
    ids.sort_unstable();
    assert_eq!(ids, (1..=50).collect::<Vec<_>>(), "each sent once");
    assert_eq!(
        stub.connections(),
        4,
        "one session, then a new one per loss"
    );
    let noted: Vec<Record> = ledger
        .records()
        .into_iter()
        .filter(|r| r.outcome.reply().text.contains(AMBIGUOUS_NOTE))
        .collect();
    assert_eq!(noted.len(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_streak_of_refusals_trips_the_breaker_and_stops_the_run() {
    let (stub, ledger) = (Stub::new(), MemoryLedger::new());
    // Three domains, so the streak is not one domain's.
    let rows = (1..=2000)
        .map(|i| Recipient::new(i, format!("user{i}@d{}.example", i % 3), Map::new()))
        .collect();
    for i in 1..=2000 {
        stub.script(
            &format!("user{i}@d{}.example", i % 3),
            Outcome::Failed(reply(550, "rejected")),
        );
    }
    let mut opts = options(1);
    opts.breaker_threshold = 20;
    let s = go(
        VecSource::new(rows, 100),
        stub.clone(),
        ledger.clone(),
        opts,
        CancellationToken::new(),
    )
    .await
    .unwrap();
    assert!(s
        .breaker
        .as_deref()
        .unwrap()
        .contains("20 refusals in a row"));
    assert_eq!(s.breaker_streak.len(), 20);
    assert!(s.interrupted);
    assert!(
        s.failed < 100,
        "the list was not burnt: {} failed",
        s.failed
    );
}

#[tokio::test(start_paused = true)]
async fn a_relay_refusal_trips_the_breaker_at_once_and_is_no_failure() {
    let (stub, ledger) = (Stub::new(), MemoryLedger::new());
    stub.script(
        "user3@example.com",
        Outcome::Failed(reply(530, "Authentication required")),
    );
    let s = go(
        VecSource::numbered(1000, 100),
        stub.clone(),
        ledger.clone(),
        options(1),
        CancellationToken::new(),
    )
    .await
    .unwrap();
    assert!(s.breaker.is_some());
    assert_eq!(
        s.failed, 0,
        "the relay's refusal says nothing of the recipient"
    );
    assert_eq!(recorded(&ledger, Status::Deferred), vec![3]);
    // 1 and 2 went before 3 (one injector, their chunk in order) and
    // nothing of that chunk after it; other chunks (ids past 32) may have
    // gone first, whichever render thread ran first.
    let sent = recorded(&ledger, Status::Sent);
    assert!(sent.starts_with(&[1, 2]), "{sent:?}");
    assert!(sent[2..].iter().all(|&id| id > 32), "{sent:?}");
}

#[tokio::test(start_paused = true)]
async fn a_render_error_is_that_recipients_and_the_rest_are_sent() {
    let (stub, ledger) = (Stub::new(), MemoryLedger::new());
    let rows = (1..=10)
        .map(|i| {
            let mut vars = Map::new();
            if i % 2 == 0 {
                vars.insert("name".into(), Value::String(format!("N{i}")));
            }
            Recipient::new(i, format!("user{i}@example.com"), vars)
        })
        .collect();
    let stats = Arc::new(Stats::new(2));
    let pipeline = Pipeline {
        name: "test".into(),
        source: VecSource::new(rows, 4),
        renderer: renderer("Hello {{ name }}"),
        transport: Arc::new(stub.clone()),
        ledger: ledger.clone(),
        options: options(2),
    };
    let s = run(pipeline, stats, CancellationToken::new())
        .await
        .unwrap();
    assert_eq!((s.sent, s.failed, s.unrendered), (5, 0, 5));
    assert!(s.breaker.is_none(), "interleaved with successes: no streak");
    assert_eq!(recorded(&ledger, Status::Unrendered), vec![1, 3, 5, 7, 9]);
    let failed = ledger.records().into_iter().find(|r| r.recipient_id == 1);
    let text = failed.unwrap().outcome.reply().text.clone();
    assert!(
        text.contains("name"),
        "the error names the variable: {text}"
    );
    let mut sent = delivered_ids(&stub);
    sent.sort_unstable();
    assert_eq!(sent, vec![2, 4, 6, 8, 10]);
}

#[tokio::test(start_paused = true)]
async fn suppressed_addresses_get_nothing_and_are_recorded_as_suppressed() {
    let (stub, ledger) = (Stub::new(), MemoryLedger::new());
    let opts = options(2);
    opts.suppressions
        .insert("USER4@example.com", "unsubscribed");
    let mut rows: Vec<Recipient> = (1..=6)
        .map(|i| Recipient::new(i, format!("user{i}@example.com"), Map::new()))
        .collect();
    rows[1].suppressed = Some("hard bounce".into());
    let s = go(
        VecSource::new(rows, 10),
        stub.clone(),
        ledger.clone(),
        opts,
        CancellationToken::new(),
    )
    .await
    .unwrap();
    assert_eq!((s.sent, s.suppressed), (4, 2));
    assert_eq!(recorded(&ledger, Status::Suppressed), vec![2, 4]);
    let mut sent = delivered_ids(&stub);
    sent.sort_unstable();
    assert_eq!(sent, vec![1, 3, 5, 6]);
}

#[tokio::test(start_paused = true)]
async fn a_relay_that_never_answers_stalls_without_losing_anyone() {
    let (stub, ledger) = (Stub::new(), MemoryLedger::new());
    stub.refuse_connections(true);
    let stop = CancellationToken::new();
    let task = tokio::spawn(go(
        VecSource::numbered(20, 10),
        stub.clone(),
        ledger.clone(),
        options(2),
        stop.clone(),
    ));
    tokio::time::sleep(Duration::from_secs(120)).await;
    assert!(
        ledger.records().is_empty(),
        "nothing answered, nothing recorded"
    );
    stub.refuse_connections(false);
    let s = task.await.unwrap().unwrap();
    assert_eq!(s.sent, 20);
    assert!(s.retries > 0);
    assert_eq!(
        recorded(&ledger, Status::Sent),
        (1..=20).collect::<Vec<_>>()
    );
}

/// Runs `source` with `subject` as the subject template.
async fn go_with_subject(
    source: VecSource,
    subject: &str,
    stub: Stub,
    ledger: MemoryLedger,
    opts: RunOptions,
) -> Summary {
    let stats = Arc::new(Stats::new(1));
    let pipeline = Pipeline {
        name: "test".into(),
        source,
        renderer: renderer(subject),
        transport: Arc::new(stub),
        ledger,
        options: opts,
    };
    run(pipeline, stats, CancellationToken::new())
        .await
        .unwrap()
}

#[tokio::test(start_paused = true)]
async fn a_template_mistake_pauses_the_campaign_and_fails_nobody_for_good() {
    let (stub, ledger) = (Stub::new(), MemoryLedger::new());
    let s = go_with_subject(
        VecSource::numbered(1000, 100),
        "Hi {{ frist_name }}",
        stub.clone(),
        ledger.clone(),
        options(2),
    )
    .await;
    let why = s.breaker.clone().expect("the campaign pauses");
    // Two render workers fail in parallel: the run is named from the
    // lowest id either had reached (chunk 1 or chunk 2) when it tripped.
    let from: i64 = why
        .split("from recipient ")
        .nth(1)
        .and_then(|r| r.split(':').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{why}"));
    assert!(
        why.contains("5 recipients in a row failed to render")
            && why.contains("frist_name")
            && (1..=33).contains(&from),
        "{why}"
    );
    assert!(stub.delivered().is_empty());
    assert!(
        s.unrendered >= 5 && s.unrendered < 1000,
        "stopped early: {s:?}"
    );
    assert_eq!(s.failed, 0, "a render error is never final");
    let records = ledger.records();
    assert!(records.iter().all(|r| r.status() == Status::Unrendered));
    assert!(!Status::Unrendered.is_final());
    for r in &records {
        let text = &r.outcome.reply().text;
        assert!(
            text.starts_with(&format!("row {}: template", r.recipient_id)),
            "{r:?}"
        );
    }
    assert_eq!(s.render_errors.len(), 1, "{:?}", s.render_errors);
    assert_eq!(s.render_errors[0].first_recipient, 1);
}

#[tokio::test(start_paused = true)]
async fn a_broken_row_is_recorded_for_itself_and_the_rest_go_out() {
    let (stub, ledger) = (Stub::new(), MemoryLedger::new());
    let mut rows: Vec<Recipient> = (1..=20)
        .map(|i| Recipient::new(i, format!("u{i}@example.com"), Map::new()))
        .collect();
    for i in [3usize, 4, 5, 6, 7, 8, 9] {
        // Different rows, different errors: never a streak.
        rows[i].broken = Some(format!("column `attributes` is not valid JSON: at {i}"));
    }
    let s = go_with_subject(
        VecSource::new(rows, 10),
        "Hello {{ id }}",
        stub.clone(),
        ledger.clone(),
        options(1),
    )
    .await;
    assert!(s.breaker.is_none(), "{s:?}");
    assert_eq!((s.sent, s.unrendered), (13, 7));
    assert_eq!(
        recorded(&ledger, Status::Unrendered),
        vec![4, 5, 6, 7, 8, 9, 10]
    );
    let r = ledger
        .records()
        .into_iter()
        .find(|r| r.recipient_id == 4)
        .unwrap();
    assert_eq!(
        r.outcome.reply().text,
        "row 4: column `attributes` is not valid JSON: at 3"
    );
}

#[tokio::test(start_paused = true)]
async fn a_message_lost_after_its_data_every_time_is_given_up_after_three_tries() {
    let (stub, ledger) = (Stub::new(), MemoryLedger::new());
    // A milter slower than the timeout: the first message's three tries
    // all lose the connection after the data.
    stub.lose_sessions(3, true);
    let s = go(
        VecSource::numbered(10, 10),
        stub.clone(),
        ledger.clone(),
        options(1),
        CancellationToken::new(),
    )
    .await
    .unwrap();
    assert_eq!((s.sent, s.failed, s.possibly_delivered), (9, 1, 1), "{s:?}");
    assert_eq!(recorded(&ledger, Status::Failed), vec![1]);
    let r = &ledger.records()[0];
    assert!(
        r.outcome.reply().text.starts_with(
            "possibly delivered: the connection was lost after the message data 3 times"
        ),
        "{r:?}"
    );
    assert_eq!(stub.connections(), 4, "three lost sessions, then one more");
}
