//! `blast serve`: the HTTP side of the inbound path. It answers RFC 8058
//! one-click unsubscribes (`POST /unsubscribe/{token}`: no confirmation
//! step, idempotent, 200), shows a small confirmation page with a button for
//! people who open the link in a browser (`GET`, which changes nothing, so
//! link scanners cannot unsubscribe anyone), and a health check.
//!
//! A token is valid only with its HMAC (see [`crate::sign`]); a forged or
//! tampered one gets 404 and changes nothing. No answer depends on whether
//! the address is still subscribed. This module does not send mail or read
//! bounces.
//!
//! `GET /metrics` ([`crate::metrics`]) counts the requests answered and the
//! database's inbound figures (bounces by class, suppressions by reason,
//! read at most every 10 s); with [`Options::metrics`] it moves to a
//! listener of its own, so the public one serves unsubscribes only.

use std::future::Future;
use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use tokio::net::TcpListener;

use crate::db::Db;
use crate::error::{Error, Result};
use crate::ledger;
use crate::metrics::{InboundCounts, Metrics, Unsubscribe, CONTENT_TYPE};
use crate::sign::Key;
use crate::suppress;

/// What every handler needs.
#[derive(Debug)]
struct AppState {
    db: Db,
    key: Key,
    metrics: Arc<Metrics>,
    /// The database's inbound counts and when they were read: scrapes
    /// share one reading for [`COUNTS_FOR`], and one at a time reads, so
    /// requests to `/metrics` (on the public listener, anyone's) cannot
    /// take the pool's connections from unsubscribes.
    counts: tokio::sync::Mutex<Option<(std::time::Instant, InboundCounts)>>,
}

/// How long one reading of the inbound counts serves scrapes.
const COUNTS_FOR: std::time::Duration = std::time::Duration::from_secs(10);

/// How to serve.
#[derive(Debug, Default)]
pub struct Options {
    /// A listener of its own for `/metrics` (then not on the public one).
    pub metrics: Option<TcpListener>,
}

/// The service's routes over `db` signed with `key`, counting into
/// `metrics`; with `with_metrics`, `/metrics` too.
fn router(app: Arc<AppState>, with_metrics: bool) -> Router {
    let r = Router::new()
        .route("/healthz", get(health))
        .route("/unsubscribe/{token}", get(confirm_page).post(unsubscribe));
    let r = match with_metrics {
        true => r.route("/metrics", get(metrics)),
        false => r,
    };
    r.with_state(app)
}

/// Serves on `listener` until `stop` resolves, then finishes requests in
/// flight.
pub async fn run(
    db: Db,
    listener: TcpListener,
    opts: Options,
    stop: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let key = Key::load(&db).await?;
    let app = Arc::new(AppState {
        db,
        key,
        metrics: Metrics::new(),
        counts: tokio::sync::Mutex::new(None),
    });
    let addr = |l: &TcpListener| l.local_addr().map_or("?".into(), |a| a.to_string());
    tracing::info!("blast serve: listening on {}", addr(&listener));
    let (stop, watcher) = crate::stop::token(stop);
    let side = opts.metrics.map(|l| {
        tracing::info!("blast serve: metrics on http://{}/metrics", addr(&l));
        let (app, stop) = (app.clone(), stop.clone());
        tokio::spawn(async move {
            axum::serve(
                l,
                Router::new()
                    .route("/metrics", get(metrics))
                    .with_state(app),
            )
            .with_graceful_shutdown(async move { stop.cancelled().await })
            .await
        })
    });
    let public = router(app, side.is_none());
    let served = {
        let stop = stop.clone();
        axum::serve(listener, public)
            .with_graceful_shutdown(async move { stop.cancelled().await })
            .await
    };
    // The public listener ended (a stop, or an error): so does the other.
    stop.cancel();
    let _ = watcher.await;
    if let Some(task) = side {
        if let Ok(Err(e)) = task.await {
            tracing::warn!("metrics listener: {e}");
        }
    }
    served.map_err(|e| Error::Invalid(format!("HTTP server: {e}")))
}

/// The inbound counts, read again when the last reading is older than
/// [`COUNTS_FOR`] (one reader at a time; the others wait and share it).
async fn inbound_counts(app: &AppState) -> Result<InboundCounts> {
    let mut cached = app.counts.lock().await;
    if let Some((at, counts)) = &*cached {
        if at.elapsed() < COUNTS_FOR {
            return Ok(counts.clone());
        }
    }
    let counts = InboundCounts::load(&app.db).await?;
    *cached = Some((std::time::Instant::now(), counts.clone()));
    Ok(counts)
}

/// `GET /metrics`: the requests answered and the database's inbound counts.
async fn metrics(State(app): State<Arc<AppState>>) -> Response {
    match inbound_counts(&app).await {
        Ok(counts) => (
            [(header::CONTENT_TYPE, CONTENT_TYPE)],
            app.metrics.encode(Some(counts)),
        )
            .into_response(),
        Err(e) => {
            tracing::warn!("metrics: {e}");
            (StatusCode::SERVICE_UNAVAILABLE, "database unavailable\n").into_response()
        }
    }
}

/// 200 when the database answers, 503 otherwise (for load balancers).
async fn health(State(app): State<Arc<AppState>>) -> Response {
    match sqlx::query("SELECT 1").execute(app.db.pool()).await {
        Ok(_) => (StatusCode::OK, "ok\n").into_response(),
        Err(e) => {
            tracing::warn!("health check: {e}");
            (StatusCode::SERVICE_UNAVAILABLE, "database unavailable\n").into_response()
        }
    }
}

/// What a token resolves to.
enum Resolved {
    /// A valid token for an address blast sent to.
    Address { campaign: i64, address: String },
    /// Forged, tampered, or for a message blast never sent.
    Invalid,
}

async fn resolve(app: &AppState, token: &str) -> Result<Resolved> {
    let Some((campaign, recipient)) = app.key.check_token(token) else {
        return Ok(Resolved::Invalid);
    };
    Ok(
        match ledger::recipient_address(&app.db, campaign, recipient).await? {
            Some(address) => Resolved::Address { campaign, address },
            None => Resolved::Invalid,
        },
    )
}

/// `GET`: a page with one button that POSTs back to the same URL.
async fn confirm_page(State(app): State<Arc<AppState>>, Path(token): Path<String>) -> Response {
    let resolved = resolve(&app, &token).await;
    app.metrics.unsubscribe(match &resolved {
        Ok(Resolved::Address { .. }) => Unsubscribe::Page,
        Ok(Resolved::Invalid) => Unsubscribe::Invalid,
        Err(_) => Unsubscribe::Unavailable,
    });
    match resolved {
        Ok(Resolved::Address { .. }) => page(
            StatusCode::OK,
            "Unsubscribe",
            // The form posts to the page's own URL; nothing user-controlled is echoed.
            "<p>Stop receiving these emails?</p>\
             <form method=\"post\"><input type=\"hidden\" name=\"List-Unsubscribe\" value=\"One-Click\">\
             <button type=\"submit\">Unsubscribe</button></form>",
        ),
        Ok(Resolved::Invalid) => invalid(),
        Err(e) => unavailable(e),
    }
}

/// `POST`: the RFC 8058 one-click unsubscribe, also what the page's button
/// sends. Idempotent: a repeated request gets the same 200.
async fn unsubscribe(State(app): State<Arc<AppState>>, Path(token): Path<String>) -> Response {
    let (campaign, address) = match resolve(&app, &token).await {
        Ok(Resolved::Address { campaign, address }) => (campaign, address),
        Ok(Resolved::Invalid) => {
            app.metrics.unsubscribe(Unsubscribe::Invalid);
            return invalid();
        }
        Err(e) => {
            app.metrics.unsubscribe(Unsubscribe::Unavailable);
            return unavailable(e);
        }
    };
    let source = format!("https:campaign={campaign}");
    let added = suppress::add(&app.db, &address, "unsubscribe", &source).await;
    app.metrics.unsubscribe(match added {
        Ok(_) => Unsubscribe::Done,
        Err(_) => Unsubscribe::Unavailable,
    });
    match added {
        Ok(new) => {
            if new {
                tracing::info!("unsubscribed {address} (campaign {campaign}, https)");
            }
            page(
                StatusCode::OK,
                "Unsubscribed",
                "<p>You are unsubscribed and will receive no more of these emails.</p>",
            )
        }
        Err(e) => unavailable(e),
    }
}

fn invalid() -> Response {
    page(
        StatusCode::NOT_FOUND,
        "Link not valid",
        "<p>This unsubscribe link is not valid. Please use the link from the email itself.</p>",
    )
}

/// A database failure: 503 so the mailbox provider retries the POST later.
fn unavailable(e: Error) -> Response {
    tracing::warn!("unsubscribe: {e}");
    page(
        StatusCode::SERVICE_UNAVAILABLE,
        "Try again later",
        "<p>We could not process this right now. Please try again in a few minutes.</p>",
    )
}

/// A minimal HTML page; `body` is fixed markup, never request data.
fn page(status: StatusCode, title: &str, body: &str) -> Response {
    let html = format!(
        "<!doctype html><html><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width\">\
         <meta name=\"robots\" content=\"noindex\"><title>{title}</title></head>\
         <body style=\"font-family:sans-serif;max-width:32em;margin:3em auto\">\
         <h1>{title}</h1>{body}</body></html>"
    );
    (status, [(header::CACHE_CONTROL, "no-store")], Html(html)).into_response()
}
