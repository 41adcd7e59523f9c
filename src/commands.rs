//! Each subcommand's orchestration, as library functions so that tests drive
//! exactly what the binary does: build pools, transports and templates from a
//! validated [`Config`] (the third stage after CLI and config), then hand them
//! to the pipeline. Returns typed results; printing is `main.rs`'s job.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::campaign::{self, Pipeline, Rate, RunOptions, Stats, Summary};
use crate::config::{Concurrency, Config};
use crate::db::Db;
use crate::error::{Error, Result};
use crate::ledger::{self, Ledger, SqlLedger, StatusCounts};
use crate::metrics::{Endpoint, Metrics};
use crate::progress::{self, Progress};
use crate::render::{Identity, Renderer};
use crate::sign::Key;
use crate::source::{self, Source, SqlSource};
use crate::state::{self, Started, State, Transition};
use crate::suppress::{self, Live};
use crate::transport::file::FileTransport;
use crate::transport::smtp::Smtp;
use crate::transport::{Session, Transport};
use crate::worker::{self, claims, ClaimSource, Claims, Interruption, Worker};

/// How far before its start a run looks for new suppressions (clock skew
/// between the hosts that write them).
const SUPPRESSION_SKEW: std::time::Duration = std::time::Duration::from_secs(300);

/// `blast send`: runs the campaign until done or until `stop` resolves.
pub async fn send(
    cfg: &Config,
    mode: progress::Mode,
    stop: impl Future<Output = ()> + Send + 'static,
) -> Result<Summary> {
    send_with_abort(cfg, mode, stop, CancellationToken::new()).await
}

/// [`send`], plus `abort`: when cancelled after `stop`, transactions in
/// flight are abandoned instead of finished (the operator's second SIGINT).
/// With `delivery.metrics`, serves the run's metrics while it lasts.
pub async fn send_with_abort(
    cfg: &Config,
    mode: progress::Mode,
    stop: impl Future<Output = ()> + Send + 'static,
    abort: CancellationToken,
) -> Result<Summary> {
    send_observed(cfg, mode, stop, abort, None).await
}

/// [`send_with_abort`], exposing the run in `metrics` (run-due's); without
/// them, `delivery.metrics` gives the run an endpoint of its own. A dry
/// run and a real one take the same path; only the transport, the ledger
/// and the campaign's ownership differ.
pub async fn send_observed(
    cfg: &Config,
    mode: progress::Mode,
    stop: impl Future<Output = ()> + Send + 'static,
    abort: CancellationToken,
    metrics: Option<Arc<Metrics>>,
) -> Result<Summary> {
    // Templates first: a syntax error must abort before anything else happens.
    let renderer = compile(cfg)?;
    let (token, watcher) = crate::stop::token(stop);
    // Opening can take minutes, once (the schema-v6 address-key backfill
    // on a large audience): a stop ends it at once, the batch under way
    // rolls back, and the backfill resumes there on the next command.
    let opened = async {
        let db = tokio::select! {
            biased;
            _ = token.cancelled() => return Err(Error::Stopped("while opening the database")),
            db = Db::connect_with_stall(&cfg.database, Some(cfg.delivery.workers.ttl)) => db?,
        };
        match Prepared::open(cfg, &db, renderer, abort).await {
            Ok(p) => Ok((db, p)),
            Err(e) => {
                db.close().await;
                Err(e)
            }
        }
    };
    let (db, mut prepared) = match opened.await {
        Ok(opened) => opened,
        Err(e) => {
            token.cancel();
            let _ = crate::error::joined("the stop watcher", watcher).await;
            return Err(e);
        }
    };
    prepared.metrics = metrics;
    let run = Background::start(cfg, &db, &prepared, token, watcher);
    let result = match &cfg.dry_run {
        Some(dir) => {
            let endpoint = match own_endpoint(cfg, &mut prepared).await {
                Ok(e) => e,
                Err(e) => {
                    run.finish().await;
                    db.close().await;
                    return Err(e);
                }
            };
            let dir = dry_run_dir(cfg, dir);
            let transport = match cfg.render_only {
                true => FileTransport::discard(),
                false => FileTransport::new(dir.clone()).map_err(|e| Error::io(dir, e))?,
            };
            // Nothing is recorded: the summary counts every outcome and
            // keeps the render errors, in bounded memory.
            let r = prepared
                .execute(cfg, mode, transport, ledger::Discard, &run.token)
                .await;
            if let Some(e) = endpoint {
                e.stop().await;
            }
            r
        }
        None => send_live(cfg, &db, prepared, mode, &run.token).await,
    };
    run.finish().await;
    db.close().await;
    result
}

/// With `delivery.metrics` and no metrics from the caller (run-due's): the
/// run's own endpoint, exposing it. A real send starts it once it has
/// joined the campaign, so a second process of the same worker name (cron
/// overlapping a long send) still exits with nothing to do instead of
/// failing on the port the first one holds.
async fn own_endpoint<S>(cfg: &Config, prepared: &mut Prepared<S>) -> Result<Option<Endpoint>> {
    let (None, Some(addr)) = (&prepared.metrics, cfg.delivery.metrics) else {
        return Ok(None);
    };
    let endpoint = Endpoint::start(addr, Metrics::new()).await?;
    prepared.metrics = Some(endpoint.metrics.clone());
    Ok(Some(endpoint))
}

/// The campaign's templates, compiled (signed later, once its id is known).
fn compile(cfg: &Config) -> Result<Renderer> {
    Renderer::compile(
        &cfg.message,
        &cfg.vars,
        Identity {
            campaign: cfg.name.clone(),
            campaign_id: 0,
            key: None,
        },
    )
}

/// Where a dry run writes its `.eml` files.
fn dry_run_dir(cfg: &Config, dir: &std::path::Path) -> PathBuf {
    if dir.as_os_str().is_empty() {
        PathBuf::from("blast-dry-run").join(sanitize(&cfg.name))
    } else {
        dir.to_path_buf()
    }
}

/// A campaign opened for a run: its ledger row, the signed templates, the
/// audience and the options to run by.
struct Prepared<S = SqlSource> {
    campaign: ledger::CampaignRow,
    renderer: Arc<Renderer>,
    source: S,
    opts: RunOptions,
    stats: Arc<Stats>,
    /// Where the run is exposed, if anywhere.
    metrics: Option<Arc<Metrics>>,
}

impl<S: Source> Prepared<S> {
    /// The same run reading its audience through `f(source)`.
    fn map_source<S2: Source>(self, f: impl FnOnce(S) -> S2) -> Prepared<S2> {
        Prepared {
            campaign: self.campaign,
            renderer: self.renderer,
            source: f(self.source),
            opts: self.opts,
            stats: self.stats,
            metrics: self.metrics,
        }
    }

    /// Runs the pipeline through `transport` into `ledger` with the
    /// progress display.
    async fn execute<T: Transport, L: Ledger>(
        self,
        cfg: &Config,
        mode: progress::Mode,
        transport: T,
        ledger: L,
        stop: &CancellationToken,
    ) -> Result<Summary> {
        let progress = Progress::start(&cfg.name, self.stats.clone(), mode);
        let _exposed = self
            .metrics
            .as_ref()
            .map(|m| m.track(&cfg.name, &cfg.worker, self.stats.clone()));
        let pipeline = Pipeline {
            name: cfg.name.clone(),
            source: self.source,
            renderer: self.renderer,
            transport: Arc::new(transport),
            ledger,
            options: self.opts,
        };
        let r = campaign::run(pipeline, self.stats, stop.clone()).await;
        progress.finish().await;
        r
    }
}

impl Prepared {
    /// Finds or creates the campaign (fixing a scheduled campaign's
    /// audience at its first run), signs the templates with its id and
    /// opens its audience.
    async fn open(
        cfg: &Config,
        db: &Db,
        mut renderer: Renderer,
        abort: CancellationToken,
    ) -> Result<Prepared> {
        let campaign = match cfg.dry_run {
            None => Self::campaign_row(db, cfg).await?,
            // A dry run writes nothing: it reads the campaign if it exists
            // (to show what its next run would send), else the audience as
            // it is now, and signs with the installation's key only if
            // there is one.
            Some(_) => Self::dry_campaign_row(db, cfg).await?,
        };
        let key = match cfg.dry_run {
            None => Key::load(db).await?,
            Some(_) => Key::existing(db).await?.map_or_else(Key::generate, Ok)?,
        };
        renderer.set_campaign(campaign.id, key);
        if cfg.dry_run.is_none() {
            ledger::set_inbound_patterns(
                db,
                campaign.id,
                cfg.message.verp.as_ref().map(|p| p.as_str()),
                cfg.message.unsubscribe.mailto.as_str(),
            )
            .await?;
        }
        let source = SqlSource::new(
            db.clone(),
            &cfg.audience,
            campaign.id,
            campaign.max_recipient_id,
            cfg.batch_size,
            cfg.limit,
        )
        .retries_only(cfg.retries_only);
        let injectors = cfg
            .delivery
            .concurrency
            .per_relay(&cfg.delivery.relays)
            .iter()
            .sum();
        Ok(Prepared {
            opts: run_options(cfg, db, abort).await?,
            campaign,
            renderer: Arc::new(renderer),
            source,
            stats: Arc::new(Stats::new(injectors)),
            metrics: None,
        })
    }

    /// The campaign's row, created at its first run (which fixes its
    /// audience's highest id).
    async fn campaign_row(db: &Db, cfg: &Config) -> Result<ledger::CampaignRow> {
        let mut campaign =
            ledger::open_campaign(db, &cfg.name, source::max_id(db, &cfg.audience)).await?;
        if campaign.max_recipient_id < 0 {
            let max = source::max_id(db, &cfg.audience).await?;
            ledger::fix_max_id(db, campaign.id, max).await?;
            campaign.max_recipient_id = max;
        }
        Ok(campaign)
    }

    /// The campaign's row as it is, or one that exists only in memory
    /// (id 0: no ledger row matches it) for a campaign never run.
    async fn dry_campaign_row(db: &Db, cfg: &Config) -> Result<ledger::CampaignRow> {
        let found = ledger::find_campaign(db, &cfg.name).await?;
        let mut campaign = found.unwrap_or_else(|| ledger::CampaignRow {
            id: 0,
            name: cfg.name.clone(),
            state: "new".into(),
            max_recipient_id: -1,
            reason: None,
        });
        if campaign.max_recipient_id < 0 {
            campaign.max_recipient_id = source::max_id(db, &cfg.audience).await?;
        }
        Ok(campaign)
    }
}

/// The options a run of `cfg` goes by (each relay's remembered limit for
/// `auto`, read from `db`).
async fn run_options(cfg: &Config, db: &Db, abort: CancellationToken) -> Result<RunOptions> {
    let initial_limits = match cfg.delivery.concurrency {
        Concurrency::Auto { .. } if cfg.dry_run.is_none() => {
            let names: Vec<String> = cfg.delivery.relays.iter().map(|r| r.to_string()).collect();
            ledger::relay_limits(db, &names).await?
        }
        _ => Vec::new(),
    };
    Ok(RunOptions {
        concurrency: cfg.delivery.concurrency,
        relays: cfg.delivery.relays.clone(),
        initial_limits,
        queue_probe: cfg.delivery.queue_probe.clone(),
        rate: Rate::new(cfg.delivery.rate),
        holdings: None,
        breaker_threshold: cfg.delivery.breaker_threshold,
        render_pause: cfg.delivery.render_pause,
        ambiguous_tries: cfg.delivery.ambiguous_tries,
        breaker_rate: campaign::RateRule {
            rate: cfg.delivery.breaker_rate,
            window: cfg.delivery.breaker_window,
        },
        abort,
        suppressions: Live::default(),
    })
}

/// The tasks beside a run: the stop signal's watcher (its token), the
/// audience count for the progress display, and the watch for
/// suppressions arriving while the run sends.
struct Background {
    token: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    counter: tokio::task::JoinHandle<()>,
}

impl Background {
    /// Starts the tasks for `prepared`'s run of `cfg`.
    fn start(
        cfg: &Config,
        db: &Db,
        prepared: &Prepared,
        token: CancellationToken,
        watcher: tokio::task::JoinHandle<()>,
    ) -> Background {
        // Counting a large audience can take a while: do it beside the first sends.
        let counter = {
            let (db, audience, stats) = (db.clone(), cfg.audience.clone(), prepared.stats.clone());
            let (id, max) = (prepared.campaign.id, prepared.campaign.max_recipient_id);
            let limit = cfg.limit;
            tokio::spawn(async move {
                if let Ok(n) = source::pending_count(&db, &audience, id, max).await {
                    let n = n.max(0) as u64;
                    stats.set_total(limit.map_or(n, |l| l.min(n)));
                }
            })
        };
        // Watch for unsubscribes and bounces arriving while this run sends.
        let suppressions = tokio::spawn(suppress::watch(
            db.clone(),
            prepared.opts.suppressions.clone(),
            crate::clock::now() - SUPPRESSION_SKEW,
            token.clone(),
        ));
        Background {
            token,
            tasks: vec![watcher, suppressions],
            counter,
        }
    }

    /// Ends the tasks once the run is over; a task that panicked is
    /// logged as an error (the run's own result stands).
    async fn finish(self) {
        self.token.cancel();
        for t in self.tasks {
            let _ = crate::error::joined("a background task of the run", t).await;
        }
        self.counter.abort();
        let _ = crate::error::joined("the audience count", self.counter).await;
    }
}

/// A real send: the campaign must be sendable, this process joined as one
/// of its workers and a relay answering before the first message; it then
/// sends the ranges of ids it claims until none is left, and its state
/// says how the run ended.
async fn send_live(
    cfg: &Config,
    db: &Db,
    prepared: Prepared,
    mode: progress::Mode,
    stop: &CancellationToken,
) -> Result<Summary> {
    let transport = smtp_transport(cfg)?;
    sendable(&prepared.campaign)?;
    let campaign_id = prepared.campaign.id;
    let settings = &cfg.delivery.workers;
    let worker = Worker::join(
        db,
        campaign_id,
        &cfg.name,
        &cfg.worker,
        settings,
        cfg.delivery.rate,
    )
    .await?;
    let worker = Arc::new(worker);
    let mut prepared = prepared;
    let endpoint = match own_endpoint(cfg, &mut prepared).await {
        Ok(e) => e,
        Err(e) => {
            if let Err(e) = worker.leave().await {
                tracing::warn!("leaving the campaign: {e}");
            }
            return Err(e);
        }
    };
    let result = async {
        // Parts go 8bit (no encoding) only if every relay takes them.
        let eight_bit = probe(&transport, cfg.delivery.relays.len()).await?;
        prepared.renderer.allow_8bit(eight_bit);
        // Paused or cancelled while the relays were probed: send nothing.
        start(db, campaign_id, cfg, &worker).await?;
        let claims = Arc::new(Claims::new(
            db.clone(),
            cfg.audience.clone(),
            campaign_id,
            &worker.name,
            settings.ttl,
        ));
        let holdings = claims.holdings().clone();
        let stats = prepared.stats.clone();
        let mut prepared = prepared.map_source(|s| {
            ClaimSource::new(
                s,
                claims.clone(),
                stats.clone(),
                settings.claim_size,
                settings.claim_time,
                worker::POLL,
            )
        });
        prepared.opts.holdings = Some(holdings.clone());
        let others = worker.others_alive().await?;
        prepared
            .opts
            .rate
            .set(campaign::share(cfg.delivery.rate, others + 1));
        let keeper = worker.keep(
            claims.clone(),
            prepared.stats.clone(),
            prepared.opts.rate.clone(),
            stop.clone(),
        );
        let ledger = SqlLedger::new(db.clone(), campaign_id, cfg.delivery.retry.clone())
            .fenced(holdings.clone())
            .worker(&worker.name);
        let r = prepared.execute(cfg, mode, transport, ledger, stop).await;
        let why = keeper.finish().await;
        // Ranges not finished go back to the pool for the other workers.
        claims.release(&holdings.live()).await?;
        settle(db, cfg, &worker, r?, why).await
    }
    .await;
    // Leave even after an error, so the others need not wait out the TTL.
    if let Err(e) = worker.leave().await {
        tracing::warn!("leaving the campaign: {e}");
    }
    if let Some(e) = endpoint {
        e.stop().await;
    }
    result
}

/// Puts the campaign in `running` for `worker`: a new pass, or joining the
/// one under way; refused when an operator stopped it meanwhile.
async fn start(db: &Db, campaign_id: i64, cfg: &Config, worker: &Worker) -> Result<()> {
    match state::start(db, campaign_id).await? {
        Started::NewPass => tracing::info!("worker {}: starting {:?}", worker.name, cfg.name),
        Started::Joined => tracing::info!(
            "worker {}: joining {:?}, which is running",
            worker.name,
            cfg.name
        ),
        Started::Refused => {
            let now = ledger::find_campaign(db, &cfg.name)
                .await?
                .ok_or_else(|| Error::UnknownCampaign(cfg.name.clone()))?;
            sendable(&now)?;
            return Err(Error::Internal(format!(
                "campaign {:?} could not start from state {}",
                cfg.name, now.state
            )));
        }
    }
    Ok(())
}

/// The SMTP transport for `cfg`'s relays.
fn smtp_transport(cfg: &Config) -> Result<Smtp> {
    let mut transport = Smtp::new(
        cfg.delivery.relays.clone(),
        cfg.delivery.helo.clone(),
        cfg.delivery.timeout,
    )?;
    transport.extensions.chunking = cfg.delivery.chunking;
    Ok(transport)
}

/// After a real run: remembers the relays' limits for the next one, and
/// records the campaign's state (paused by the breaker, stopped, finished;
/// a pause or cancel from outside stays as it is).
async fn settle(
    db: &Db,
    cfg: &Config,
    worker: &Worker,
    mut summary: Summary,
    why: Option<Interruption>,
) -> Result<Summary> {
    let campaign_id = worker.campaign_id();
    // The next run starts from where this one ended.
    let limits: Vec<(String, usize)> = summary
        .relays
        .iter()
        .filter(|r| r.adaptive)
        .map(|r| (r.relay.clone(), r.limit))
        .collect();
    if let Err(e) = ledger::save_relay_limits(db, &limits).await {
        tracing::warn!("remembering relay limits: {e}");
    }
    match (&summary.breaker, why) {
        (Some(reason), _) => {
            let since = summary.breaker_since.unwrap_or_else(crate::clock::now);
            ledger::requeue(db, campaign_id, &summary.breaker_streak, since).await?;
            let why = format!("circuit breaker: {reason}");
            state::apply(db, campaign_id, Transition::Trip, Some(&why)).await?;
        }
        // Paused or cancelled from outside: that state stays.
        (None, Some(Interruption::Paused(_) | Interruption::Cancelled(_))) => {}
        (None, Some(Interruption::LeaseLost(m))) => {
            summary.interrupted = true;
            tracing::warn!("{m}");
        }
        // Only from `running`: a pause or cancel that arrived after the
        // keeper's last look stays.
        (None, None) => {
            if let Some(end) = run_end(db, cfg, worker, &summary).await? {
                state::apply(db, campaign_id, end, None).await?;
            }
        }
    }
    Ok(summary)
}

/// How a worker's run ends the campaign: finished by whichever worker
/// finds every range done; stopped by the last live worker interrupted;
/// otherwise the campaign runs on with the others.
async fn run_end(
    db: &Db,
    cfg: &Config,
    worker: &Worker,
    summary: &Summary,
) -> Result<Option<Transition>> {
    if summary.interrupted {
        return Ok(match worker.others_alive().await? {
            0 => Some(Transition::Stop),
            n => {
                tracing::info!(
                    "worker {}: stopped; {n} other workers go on with the campaign",
                    worker.name
                );
                None
            }
        });
    }
    // `--limit` sends a part and ends the run as before.
    if cfg.limit.is_some() || claims::all_done(db, worker.campaign_id()).await? {
        return Ok(Some(Transition::Finish));
    }
    tracing::info!(
        "worker {}: no range left for this worker; the others finish the campaign",
        worker.name
    );
    Ok(None)
}

/// Refuses campaigns an operator stopped (paused, cancelled, held).
fn sendable(c: &ledger::CampaignRow) -> Result<()> {
    let hint = match c.state.parse::<State>() {
        Ok(State::Paused) => "`blast resume` continues it",
        Ok(State::Held) => "it was overdue; `blast resume` sends it anyway",
        Ok(State::Cancelled) => "a cancelled campaign is not sent again; use a new name",
        _ => return Ok(()),
    };
    Err(Error::NotSendable {
        campaign: c.name.clone(),
        state: c.state.clone(),
        reason: c.reason.clone(),
        hint: hint.into(),
    })
}

/// Checks every relay answers before the campaign starts, so an unreachable
/// MTA is one clear fatal error rather than N injectors retrying. One relay
/// out of several being down is only a warning. Returns whether every relay
/// that answered offered 8BITMIME.
async fn probe<T: Transport>(transport: &T, relays: usize) -> Result<bool> {
    let mut first_error = None;
    let mut ok = 0;
    let mut eight_bit = true;
    for slot in 0..relays {
        match transport.connect(slot).await {
            Ok(s) => {
                eight_bit &= s.eight_bit_mime();
                s.close().await;
                ok += 1;
            }
            // A relay that can never be used as configured (no STARTTLS,
            // an untrusted certificate, refused credentials) stops the
            // campaign even when others answer: the operator must fix it.
            Err(e) if e.permanent => {
                return Err(Error::Unreachable {
                    relay: transport.describe(slot),
                    message: e.message,
                })
            }
            Err(e) => {
                tracing::warn!("{}", e);
                first_error.get_or_insert((transport.describe(slot), e.message));
            }
        }
    }
    match first_error {
        Some((relay, message)) if ok == 0 => Err(Error::Unreachable { relay, message }),
        _ => Ok(eight_bit),
    }
}

/// What `blast check` found out about one relay.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RelayCheck {
    /// The relay, as in logs.
    pub relay: String,
    /// Connected, encrypted and logged in as configured.
    pub ok: bool,
    /// What it offers (TLS, AUTH, extensions), or why it failed.
    pub detail: String,
    /// Time to a usable session, milliseconds.
    pub ms: f64,
    /// Whether the failure is a setting to fix rather than a passing fault.
    pub permanent: bool,
}

/// `blast check`: opens one session to every relay exactly as `blast send`
/// would (TLS, certificate check, AUTH), reports what each offers and
/// closes it. Sends nothing and touches no database.
pub async fn check(cfg: &Config) -> Result<Vec<RelayCheck>> {
    let transport = Smtp::new(
        cfg.delivery.relays.clone(),
        cfg.delivery.helo.clone(),
        cfg.delivery.timeout,
    )?;
    let mut out = Vec::new();
    for slot in 0..cfg.delivery.relays.len() {
        let started = std::time::Instant::now();
        let relay = transport.describe(slot);
        match transport.connect(slot).await {
            Ok(s) => {
                let ms = started.elapsed().as_secs_f64() * 1000.0;
                let c = s.capabilities();
                let mut parts = vec![match s.tls() {
                    Some(t) => t.to_string(),
                    None => "no TLS".to_string(),
                }];
                if let Some(m) = s.auth_mechanism() {
                    parts.push(format!("AUTH {m} accepted"));
                }
                let mut ext: Vec<String> = Vec::new();
                if c.pipelining {
                    ext.push("PIPELINING".into());
                }
                if c.chunking {
                    ext.push("CHUNKING".into());
                }
                if c.size > 0 {
                    ext.push(format!("SIZE {}", c.size));
                }
                if !ext.is_empty() {
                    parts.push(ext.join(" "));
                }
                s.close().await;
                out.push(RelayCheck {
                    relay,
                    ok: true,
                    detail: parts.join(", "),
                    ms,
                    permanent: false,
                });
            }
            Err(e) => out.push(RelayCheck {
                ok: false,
                detail: e
                    .message
                    .strip_prefix(&format!("{relay}: "))
                    .unwrap_or(&e.message)
                    .to_string(),
                relay,
                ms: started.elapsed().as_secs_f64() * 1000.0,
                permanent: e.permanent,
            }),
        }
    }
    Ok(out)
}

/// `blast preview`: one recipient's complete message.
pub async fn preview(cfg: &Config, id: Option<i64>) -> Result<Vec<u8>> {
    let mut renderer = Renderer::compile(
        &cfg.message,
        &cfg.vars,
        Identity {
            campaign: cfg.name.clone(),
            campaign_id: 0,
            key: None,
        },
    )?;
    let db = Db::connect(&cfg.database).await?;
    // Sign as the campaign will (id 0 until its first run), so the
    // preview's unsubscribe link can be tried against `blast serve`.
    let campaign_id = ledger::find_campaign(&db, &cfg.name)
        .await?
        .map_or(0, |c| c.id);
    renderer.set_campaign(campaign_id, Key::load(&db).await?);
    let recipient = source::fetch_one(&db, &cfg.audience, id).await?;
    db.close().await;
    let recipient = recipient.ok_or_else(|| match id {
        Some(id) => Error::Audience(format!("no recipient with id {id} in the audience")),
        None => Error::Audience("the audience is empty".into()),
    })?;
    let out = renderer
        .render(&recipient, crate::clock::now())
        .map_err(|e| Error::Render {
            recipient: recipient.id,
            message: e.to_string(),
        })?;
    let mut bytes = format!("Return-Path: <{}>\r\n", out.envelope.from).into_bytes();
    bytes.extend_from_slice(&out.bytes);
    Ok(bytes)
}

/// `blast status`: counts per outcome plus recipients still pending.
pub async fn status(cfg: &Config) -> Result<StatusCounts> {
    let db = Db::connect(&cfg.database).await?;
    let row = ledger::find_campaign(&db, &cfg.name)
        .await?
        .ok_or_else(|| Error::UnknownCampaign(cfg.name.clone()))?;
    let pending = source::pending_count(&db, &cfg.audience, row.id, row.max_recipient_id).await?;
    let mut counts = ledger::status_counts(&db, &row, pending).await?;
    counts.workers = worker::list(&db, row.id).await?;
    db.close().await;
    Ok(counts)
}

/// `blast report`: campaign `name`'s ledger summed up. With the campaign's
/// `cfg` the audience's pending recipients are counted too.
pub async fn report(
    database: &str,
    name: &str,
    cfg: Option<&Config>,
) -> Result<crate::report::Report> {
    let db = Db::connect(database).await?;
    let row = ledger::find_campaign(&db, name)
        .await?
        .ok_or_else(|| Error::UnknownCampaign(name.to_string()))?;
    let pending = match cfg {
        Some(cfg) => {
            Some(source::pending_count(&db, &cfg.audience, row.id, row.max_recipient_id).await?)
        }
        None => None,
    };
    let report = crate::report::build(&db, &row, pending).await;
    db.close().await;
    report
}

/// `blast status --by-domain`: campaign `name`'s outcomes by destination
/// domain, the largest first.
pub async fn domains(database: &str, name: &str) -> Result<Vec<crate::report::DomainRow>> {
    let db = Db::connect(database).await?;
    let row = ledger::find_campaign(&db, name)
        .await?
        .ok_or_else(|| Error::UnknownCampaign(name.to_string()))?;
    let domains = crate::report::domain_table(&db, &row).await;
    db.close().await;
    domains
}

/// What `blast pause|resume|cancel` do to a campaign.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    /// State `paused`.
    Pause,
    /// From `paused` or `held` back to `ready`.
    Resume,
    /// State `cancelled` (final).
    Cancel,
}

/// Changes a campaign's state in the database; a sender running anywhere
/// notices within [`crate::lease::POLL`]. Returns the campaign as it is now.
pub async fn control(
    database: &str,
    name: &str,
    action: Control,
    reason: Option<&str>,
) -> Result<ledger::CampaignRow> {
    let db = Db::connect(database).await?;
    let row = ledger::find_campaign(&db, name)
        .await?
        .ok_or_else(|| Error::UnknownCampaign(name.to_string()))?;
    let refuse = |hint: &str| Error::NotSendable {
        campaign: name.to_string(),
        state: row.state.clone(),
        reason: row.reason.clone(),
        hint: hint.to_string(),
    };
    let (transition, default) = match action {
        Control::Pause => (Transition::Pause, Some("paused by the operator")),
        Control::Cancel => (Transition::Cancel, Some("cancelled by the operator")),
        Control::Resume => (Transition::Resume, None),
    };
    if !state::apply(&db, row.id, transition, reason.or(default)).await? {
        match (action, row.state.as_str()) {
            (_, "cancelled") => return Err(refuse("it cannot be changed any more")),
            (Control::Pause | Control::Cancel, "finished") => {
                return Err(refuse("there is nothing left to stop"))
            }
            // Nothing to resume: it is not paused or held.
            (Control::Resume, _) => {}
            _ => return Err(refuse("its state changed meanwhile; look again")),
        }
    }
    let row = ledger::find_campaign(&db, name)
        .await?
        .ok_or_else(|| Error::UnknownCampaign(name.to_string()))?;
    db.close().await;
    Ok(row)
}

/// A campaign name as a safe folder name.
fn sanitize(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}
