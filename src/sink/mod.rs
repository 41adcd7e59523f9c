//! Built-in SMTP sink: a small, fast ESMTP receiver for tests, demos and
//! benchmarks, in the spirit of Postfix's `smtp-sink` and Mailpit.
//!
//! This module owns the receiving side only. The sink never relays mail and
//! never stores it anywhere except in memory (see [`Sink::received`]) and, when
//! configured, in a Maildir. It can inject faults (per-recipient rejections,
//! dropped connections, slow replies) so the sending side can be tested against
//! a misbehaving MTA without a real one.

pub mod load;
mod session;

use session::{End, Session};

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::time::{timeout, Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Longest command line accepted, in octets, not counting the CRLF.
/// RFC 5321 only guarantees 512; we are generous because a test sink should
/// not be the thing that fails, yet bounded so a client cannot exhaust memory.
pub const MAX_COMMAND_LINE: usize = 1000;

/// Recipients accepted per transaction; RFC 5321 requires at least 100.
const MAX_RECIPIENTS: usize = 1000;

/// Read buffer per connection: large enough that a pipelined batch of
/// commands or a typical message body arrives in one `read` call.
const READ_BUFFER: usize = 64 * 1024;

/// A per-connection body buffer bigger than this is freed after its message
/// instead of being reused, so one huge message does not pin memory forever.
const KEEP_BUFFER_CAPACITY: usize = 1024 * 1024;

/// How long a closing connection may take to receive its 421 notice; shutdown
/// must not hang on a client that stopped reading.
const GOODBYE_TIMEOUT: Duration = Duration::from_millis(500);

/// Interval between summary lines logged by [`serve`].
const SUMMARY_INTERVAL: Duration = Duration::from_secs(5);

/// Process-wide queue id counter, so ids are unique even across several
/// sinks running side by side in one test binary.
static NEXT_QUEUE_ID: AtomicU64 = AtomicU64::new(1);

/// Configuration of a [`Sink`].
#[derive(Clone, Debug)]
pub struct SinkConfig {
    /// Address to listen on; use port 0 to let the OS pick one (see
    /// [`Sink::local_addr`]).
    pub listen: SocketAddr,
    /// When set, every accepted message is also written into this Maildir
    /// (`tmp/`, then renamed into `new/`); `tmp`, `new` and `cur` are created
    /// on start.
    pub maildir: Option<PathBuf>,
    /// Advertise PIPELINING in the EHLO reply. Pipelined input is handled
    /// correctly either way.
    pub pipelining: bool,
    /// Advertise 8BITMIME (and SMTPUTF8, which requires it) and accept
    /// `BODY=8BITMIME`.
    pub eight_bit_mime: bool,
    /// Advertise CHUNKING and accept BDAT; when false BDAT gets 502.
    pub chunking: bool,
    /// Faults to inject.
    pub faults: Faults,
    /// Name used in the greeting and the EHLO/HELO replies.
    pub hostname: String,
    /// Keep every message (envelope and body) for [`Sink::received`]. Off
    /// by default: a 10M-message run keeps counters only, so its memory
    /// does not grow with the messages.
    pub keep_messages: bool,
    /// Largest message accepted, in octets (advertised as SIZE); larger
    /// messages get `552 5.3.4`.
    pub max_message_size: u64,
    /// A connection on which the client sends nothing (or reads nothing) for
    /// this long gets `421 4.4.2` and is closed.
    pub idle_timeout: Duration,
    /// Offer STARTTLS with this certificate (or, with `implicit_tls`, speak
    /// TLS from the first byte).
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// TLS from the first byte (port 465 style) instead of STARTTLS.
    pub implicit_tls: bool,
    /// Require AUTH before MAIL. With `tls` set, AUTH is only offered on
    /// an encrypted connection, as Postfix's `smtpd_tls_auth_only`.
    pub auth: Option<SinkAuth>,
}

/// The one account a sink accepts.
#[derive(Clone, Debug)]
pub struct SinkAuth {
    /// User name.
    pub user: String,
    /// Password.
    pub password: String,
    /// Mechanisms offered, e.g. `["PLAIN", "LOGIN"]`.
    pub mechanisms: Vec<String>,
    /// AUTH LOGIN's two prompts, before base64 (usually `Username:` and
    /// `Password:`; servers differ, and some send none).
    pub login_prompts: (String, String),
}

impl Default for SinkConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 2525)),
            maildir: None,
            pipelining: true,
            eight_bit_mime: true,
            chunking: true,
            faults: Faults::default(),
            hostname: "blast-sink".to_owned(),
            keep_messages: false,
            max_message_size: 50 * 1024 * 1024,
            idle_timeout: Duration::from_secs(300),
            tls: None,
            implicit_tls: false,
            auth: None,
        }
    }
}

/// Faults the sink injects to simulate a misbehaving or busy MTA.
/// The default injects none.
#[derive(Clone, Debug, Default)]
pub struct Faults {
    /// RCPT address (matched case-insensitively against the whole address,
    /// without angle brackets) -> reply `(code, enhanced, text)` given to that
    /// RCPT, e.g. `(550, "5.1.1", "No such user")` or
    /// `(451, "4.3.0", "Try later")`. Codes >= 400 reject the recipient and
    /// count in [`SinkStats::rejected_rcpts`]; lower codes accept it with
    /// the given reply.
    pub rcpt_replies: HashMap<String, (u16, String, String)>,
    /// `(substring, code, enhanced, text)`: the reply for any RCPT address
    /// containing `substring` (case-insensitively), e.g. `"reject-"` -> 550.
    /// Checked after `rcpt_replies`; the first matching entry wins.
    pub rcpt_contains: Vec<(String, u16, String, String)>,
    /// `Some(n)`: on each connection, when the end of message number `n`
    /// arrives (the final `.` of DATA or the BDAT LAST chunk, counting from 1
    /// and including messages rejected for size), the sink sends any replies
    /// still owed for *earlier* commands, then closes the connection without
    /// replying. That message is not accepted: it is not counted, recorded
    /// nor written to the Maildir. So `n - 1` messages are accepted per
    /// connection; `Some(0)` behaves like `Some(1)`.
    pub drop_after: Option<u64>,
    /// Sleep this long after the end of a message before replying to it,
    /// simulating a slow MTA. Replies owed for earlier commands are sent
    /// before sleeping.
    pub latency: Option<Duration>,
    /// `(code, enhanced, text)` given as the reply to every MAIL FROM, e.g.
    /// `(530, "5.7.0", "Authentication required")`. A code >= 400 refuses the
    /// transaction; a lower code accepts it with this reply.
    pub mail_reply: Option<(u16, String, String)>,
    /// A busy-MTA model shared by all connections (service time growing
    /// with load, a draining queue, stalls, 452/421 past limits, scripted
    /// slowdowns and outages); see [`load`].
    pub load: Option<Arc<load::LoadModel>>,
}

/// Counters of a sink, as returned by [`Sink::stats`].
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct SinkStats {
    /// TCP connections accepted.
    pub connections: u64,
    /// Messages accepted (replied to with `250 ... queued as`).
    pub messages: u64,
    /// Deliveries accepted: the sum over accepted messages of their accepted
    /// recipients.
    pub recipients: u64,
    /// RCPT commands refused with a 4xx/5xx reply (faults and the
    /// too-many-recipients limit; not syntax or sequence errors).
    pub rejected_rcpts: u64,
    /// Octets of accepted messages (after dot-unstuffing, excluding the
    /// terminating `.`).
    pub bytes: u64,
}

/// One accepted message.
#[derive(Clone, Debug)]
pub struct Received {
    /// Envelope sender without angle brackets (empty for the null sender `<>`).
    pub mail_from: String,
    /// MAIL FROM said `BODY=8BITMIME`.
    pub eight_bit: bool,
    /// Accepted envelope recipients, in RCPT order, without angle brackets.
    pub rcpt_to: Vec<String>,
    /// The message octets: dot-unstuffed for DATA (raw for BDAT), line
    /// endings as received, without the terminating `.\r\n`. (Only kept
    /// with [`SinkConfig::keep_messages`].)
    pub data: Vec<u8>,
    /// The queue id given in the `250 2.0.0 Ok: queued as <id>` reply.
    pub queue_id: String,
    /// Whether the message came over TLS.
    pub tls: bool,
    /// The user the client authenticated as, if any.
    pub auth: Option<String>,
}

/// Handle to a running sink. Dropping it without calling [`Sink::shutdown`]
/// still stops the sink, but does not wait for connections to close.
pub struct Sink {
    local_addr: SocketAddr,
    shared: Arc<Shared>,
    cancel: CancellationToken,
    tracker: TaskTracker,
}

impl Sink {
    /// Binds and starts serving in background tokio tasks; returns once
    /// listening. Fails if the address cannot be bound or the Maildir
    /// directories cannot be created.
    pub async fn start(config: SinkConfig) -> io::Result<Sink> {
        if let Some(dir) = &config.maildir {
            for sub in ["tmp", "new", "cur"] {
                tokio::fs::create_dir_all(dir.join(sub)).await?;
            }
        }
        let listener = TcpListener::bind(config.listen).await?;
        let local_addr = listener.local_addr()?;
        let tracker = TaskTracker::new();
        let shared = Arc::new(Shared::new(config, tracker.clone()));
        let cancel = CancellationToken::new();
        tracker.spawn(accept_loop(
            listener,
            Arc::clone(&shared),
            cancel.clone(),
            tracker.clone(),
        ));
        Ok(Sink {
            local_addr,
            shared,
            cancel,
            tracker,
        })
    }

    /// The address actually bound (resolves port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Snapshot of the counters.
    pub fn stats(&self) -> SinkStats {
        self.shared.stats()
    }

    /// All messages accepted so far, in the order they were accepted: one
    /// entry per message, listing its accepted recipients.
    pub fn received(&self) -> Vec<Received> {
        self.shared.received().clone()
    }

    /// Stops accepting, closes every connection (sending `421 4.3.2` to
    /// clients mid-session), waits for all tasks to end, and returns
    /// everything it accepted.
    pub async fn shutdown(self) -> Vec<Received> {
        self.cancel.cancel();
        self.tracker.close();
        self.tracker.wait().await;
        self.shared.received().clone()
    }
}

impl std::fmt::Debug for Sink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sink")
            .field("local_addr", &self.local_addr)
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        // Without this a forgotten handle would keep the port bound and the
        // tasks running for the rest of the process.
        self.cancel.cancel();
    }
}

/// For the CLI: runs a sink until `stop` resolves, logging a summary line via
/// `tracing::info!` every 5 s when the counts changed, then shuts it down and
/// returns the final counters.
pub async fn serve(config: SinkConfig, stop: impl Future<Output = ()>) -> io::Result<SinkStats> {
    let sink = Sink::start(config).await?;
    tracing::info!("blast-sink listening on {}", sink.local_addr());
    let mut ticker = tokio::time::interval_at(Instant::now() + SUMMARY_INTERVAL, SUMMARY_INTERVAL);
    // After a stall, one late line is enough; a burst of catch-up lines
    // would report meaningless rates.
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    tokio::pin!(stop);
    let mut last = sink.stats();
    let mut last_at = Instant::now();
    loop {
        tokio::select! {
            () = &mut stop => break,
            _ = ticker.tick() => {
                let now = sink.stats();
                if now.messages != last.messages || now.connections != last.connections {
                    let secs = last_at.elapsed().as_secs_f64().max(f64::EPSILON);
                    let rate = (now.messages - last.messages) as f64 / secs;
                    tracing::info!("{}, {rate:.0} msg/s", summary(&now));
                }
                last = now;
                last_at = Instant::now();
            }
        }
    }
    let shared = Arc::clone(&sink.shared);
    sink.shutdown().await;
    let stats = shared.stats();
    tracing::info!("blast-sink stopped: {}", summary(&stats));
    Ok(stats)
}

/// One human-readable line of counters for the log.
fn summary(s: &SinkStats) -> String {
    format!(
        "{} messages, {} recipients, {} rejected recipients, {} bytes, {} connections",
        s.messages, s.recipients, s.rejected_rcpts, s.bytes, s.connections
    )
}

/// A fault reply, pre-formatted once so the hot path only copies bytes.
#[derive(Debug)]
struct FaultReply {
    code: u16,
    line: String,
}

impl FaultReply {
    fn new(code: u16, enhanced: &str, text: &str) -> Self {
        let mut line = code.to_string();
        for part in [enhanced, text] {
            if !part.is_empty() {
                line.push(' ');
                line.push_str(part);
            }
        }
        // A stray CR or LF in configured text would break reply framing.
        let line = line.replace(['\r', '\n'], " ");
        Self { code, line }
    }
}

/// Counters shared by all connections; relaxed atomics suffice because each
/// counter is independent and only ever read as a snapshot.
#[derive(Default)]
struct Counters {
    connections: AtomicU64,
    messages: AtomicU64,
    recipients: AtomicU64,
    rejected_rcpts: AtomicU64,
    bytes: AtomicU64,
}

/// State shared between the accept loop, the sessions and the [`Sink`] handle.
struct Shared {
    config: SinkConfig,
    greeting: Vec<u8>,
    ehlo: Vec<u8>,
    /// The EHLO reply once TLS is on (no STARTTLS; AUTH when configured).
    ehlo_tls: Vec<u8>,
    helo: Vec<u8>,
    /// `Faults::rcpt_replies` with lowercased keys, for case-insensitive lookup.
    rcpt_exact: HashMap<String, FaultReply>,
    /// `Faults::rcpt_contains` with lowercased needles.
    rcpt_contains: Vec<(String, FaultReply)>,
    mail_reply: Option<FaultReply>,
    counters: Counters,
    received: Mutex<Vec<Received>>,
    /// Tracks Maildir writes on the blocking pool too, so that shutdown
    /// waits for a write whose connection was cancelled mid-way.
    tracker: TaskTracker,
}

impl Shared {
    fn new(config: SinkConfig, tracker: TaskTracker) -> Self {
        let host = &config.hostname;
        let greeting = format!("220 {host} ESMTP blast-sink\r\n").into_bytes();
        let helo = format!("250 {host}\r\n").into_bytes();
        let ehlo = ehlo_reply(&config, false);
        let ehlo_tls = ehlo_reply(&config, true);
        let faults = &config.faults;
        let rcpt_exact = faults
            .rcpt_replies
            .iter()
            .map(|(addr, (code, enh, text))| {
                (addr.to_lowercase(), FaultReply::new(*code, enh, text))
            })
            .collect();
        let rcpt_contains = faults
            .rcpt_contains
            .iter()
            .map(|(needle, code, enh, text)| {
                (needle.to_lowercase(), FaultReply::new(*code, enh, text))
            })
            .collect();
        let mail_reply = faults
            .mail_reply
            .as_ref()
            .map(|(code, enh, text)| FaultReply::new(*code, enh, text));
        Self {
            greeting,
            ehlo,
            ehlo_tls,
            helo,
            rcpt_exact,
            rcpt_contains,
            mail_reply,
            counters: Counters::default(),
            received: Mutex::new(Vec::new()),
            tracker,
            config,
        }
    }

    fn stats(&self) -> SinkStats {
        let c = &self.counters;
        SinkStats {
            connections: c.connections.load(Ordering::Relaxed),
            messages: c.messages.load(Ordering::Relaxed),
            recipients: c.recipients.load(Ordering::Relaxed),
            rejected_rcpts: c.rejected_rcpts.load(Ordering::Relaxed),
            bytes: c.bytes.load(Ordering::Relaxed),
        }
    }

    fn received(&self) -> MutexGuard<'_, Vec<Received>> {
        // A panic while holding the lock cannot leave the Vec half-updated
        // (push is all-or-nothing), so a poisoned lock is still usable.
        self.received.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The configured fault reply for a recipient, if any.
    fn rcpt_fault(&self, addr: &str) -> Option<&FaultReply> {
        if self.rcpt_exact.is_empty() && self.rcpt_contains.is_empty() {
            // The common benchmark case: skip the lowercase allocation.
            return None;
        }
        let lower = addr.to_lowercase();
        self.rcpt_exact.get(&lower).or_else(|| {
            self.rcpt_contains
                .iter()
                .find(|(needle, _)| lower.contains(needle.as_str()))
                .map(|(_, reply)| reply)
        })
    }
}

/// Builds the multi-line EHLO reply once per sink, for a plain or an
/// encrypted connection.
fn ehlo_reply(config: &SinkConfig, tls: bool) -> Vec<u8> {
    let mut lines = vec![config.hostname.clone()];
    if config.tls.is_some() && !tls {
        lines.push("STARTTLS".to_owned());
    }
    if let Some(auth) = &config.auth {
        if tls || config.tls.is_none() {
            lines.push(format!("AUTH {}", auth.mechanisms.join(" ")));
        }
    }
    if config.pipelining {
        lines.push("PIPELINING".to_owned());
    }
    lines.push(format!("SIZE {}", config.max_message_size));
    if config.eight_bit_mime {
        lines.push("8BITMIME".to_owned());
    }
    if config.chunking {
        lines.push("CHUNKING".to_owned());
    }
    lines.push("ENHANCEDSTATUSCODES".to_owned());
    if config.eight_bit_mime {
        // RFC 6531 makes 8BITMIME a prerequisite of SMTPUTF8.
        lines.push("SMTPUTF8".to_owned());
    }
    let last = lines.len() - 1;
    let mut out = String::new();
    for (i, line) in lines.iter().enumerate() {
        let sep = if i == last { ' ' } else { '-' };
        out.push_str(&format!("250{sep}{line}\r\n"));
    }
    out.into_bytes()
}

fn next_queue_id() -> String {
    format!("{:010X}", NEXT_QUEUE_ID.fetch_add(1, Ordering::Relaxed))
}

async fn accept_loop(
    listener: TcpListener,
    shared: Arc<Shared>,
    cancel: CancellationToken,
    tracker: TaskTracker,
) {
    loop {
        let accepted = tokio::select! {
            () = cancel.cancelled() => break,
            r = listener.accept() => r,
        };
        match accepted {
            Ok((stream, peer)) => {
                shared.counters.connections.fetch_add(1, Ordering::Relaxed);
                // Replies are small writes; Nagle plus delayed ACKs would add
                // tens of milliseconds to every round trip.
                if let Err(e) = stream.set_nodelay(true) {
                    tracing::debug!("sink: TCP_NODELAY failed for {peer}: {e}");
                }
                tracker.spawn(handle_connection(
                    stream,
                    peer,
                    Arc::clone(&shared),
                    cancel.clone(),
                ));
            }
            Err(e) => {
                // Errors such as EMFILE persist until something closes;
                // back off briefly instead of spinning on them.
                tracing::warn!("sink: accept failed: {e}");
                tokio::select! {
                    () = cancel.cancelled() => break,
                    () = tokio::time::sleep(Duration::from_millis(50)) => {}
                }
            }
        }
    }
}

async fn handle_connection(
    stream: TcpStream,
    peer: SocketAddr,
    shared: Arc<Shared>,
    cancel: CancellationToken,
) {
    let mut session = match (&shared.config.tls, shared.config.implicit_tls) {
        (Some(config), true) => {
            let idle = shared.config.idle_timeout;
            let handshake = timeout(idle, crate::tls::accept(config.clone(), stream));
            let accepted = tokio::select! {
                r = handshake => r,
                () = cancel.cancelled() => return,
            };
            match accepted {
                Ok(Ok(tls)) => {
                    let (r, w) = crate::tls::split_tls(tls);
                    Session::new(r, w, shared)
                }
                Ok(Err(e)) => return tracing::debug!("sink: TLS from {peer} failed: {e}"),
                Err(_) => return tracing::debug!("sink: TLS from {peer} timed out"),
            }
        }
        _ => {
            let (r, w) = crate::tls::split_tcp(stream);
            Session::new(r, w, shared)
        }
    };
    loop {
        // The select ends (dropping the run future and its borrow of
        // `session`) before we decide what to do, so the shutdown path can
        // still write.
        let outcome = tokio::select! {
            r = session.run() => Some(r),
            () = cancel.cancelled() => None,
        };
        match outcome {
            Some(Ok(End::Closed)) => break,
            Some(Ok(End::StartTls)) => {
                let upgraded = tokio::select! {
                    r = session.upgrade() => r,
                    () = cancel.cancelled() => break,
                };
                match upgraded {
                    Ok(s) => session = s,
                    Err(e) => {
                        tracing::debug!("sink: STARTTLS from {peer} failed: {e}");
                        break;
                    }
                }
            }
            Some(Err(e)) => {
                tracing::debug!("sink: connection from {peer} ended: {e}");
                break;
            }
            None => {
                let notice = format!("421 4.3.2 {} Service shutting down", session.host());
                session.goodbye(&notice).await;
                break;
            }
        }
    }
}

#[cfg(test)]
mod tests;
