//! Built-in SMTP sink: a small, fast ESMTP receiver for tests, demos and
//! benchmarks, in the spirit of Postfix's `smtp-sink` and Mailpit.
//!
//! This module owns the receiving side only. The sink never relays mail and
//! never stores it anywhere except in memory (see [`Sink::received`]) and, when
//! configured, in a Maildir. It can inject faults (per-recipient rejections,
//! dropped connections, slow replies) so the sending side can be tested against
//! a misbehaving MTA without a real one.

pub mod load;

use std::collections::HashMap;
use std::future::Future;
use std::io::{self, Write as _};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use base64::Engine as _;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
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
    /// Keep message bodies in [`Received::data`]. Off by default because a
    /// million-message benchmark would otherwise hold every body in memory.
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
    /// Accepted envelope recipients, in RCPT order, without angle brackets.
    pub rcpt_to: Vec<String>,
    /// The message octets: dot-unstuffed for DATA (raw for BDAT), line
    /// endings as received, without the terminating `.\r\n`. Empty unless
    /// [`SinkConfig::keep_messages`] is set.
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

/// How a session's command loop ended without error.
enum End {
    /// QUIT, EOF or a deliberate drop.
    Closed,
    /// The client asked for STARTTLS and got 220: hand the socket over to
    /// the handshake.
    StartTls,
}

/// Why a session ended abnormally.
#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error("i/o error: {0}")]
    Io(#[from] io::Error),
    #[error("idle timeout")]
    IdleTimeout,
}

/// What the command loop does after a command.
enum Flow {
    Continue,
    /// Send pending replies, then close (QUIT, EOF).
    Close,
    /// Close at once without sending anything more (`drop_after`).
    Drop,
    /// Send pending replies, then the TLS handshake.
    StartTls,
}

/// Result of reading one command line.
enum Line {
    Complete,
    TooLong,
    Eof,
}

/// Position of the DATA scanner relative to the `CRLF.CRLF` terminator.
#[derive(Clone, Copy)]
enum DataState {
    /// At the start of a line (after CRLF, or at the start of the body).
    LineStart,
    /// A line started with `.`, which has been dropped (dot-unstuffing).
    Dot,
    /// A line started with `.\r`; an LF now ends the message.
    DotCr,
    /// Inside a line.
    Middle,
}

/// The current mail transaction (MAIL .. end of data).
#[derive(Default)]
struct Transaction {
    mail_from: Option<String>,
    rcpts: Vec<String>,
    /// RCPT commands tried, accepted or not, to tell "no RCPT" (503) from
    /// "all RCPTs refused" (554).
    rcpt_attempts: usize,
    /// A BDAT chunk was received and the message is not finished yet.
    bdat_active: bool,
    /// Body octets, only filled when they are needed (kept or Maildir).
    data: Vec<u8>,
    /// Body size so far, counted even when `data` is not filled.
    size: u64,
    too_big: bool,
}

impl Transaction {
    fn reset(&mut self) {
        self.mail_from = None;
        self.rcpts.clear();
        self.rcpt_attempts = 0;
        self.bdat_active = false;
        self.size = 0;
        self.too_big = false;
        self.data.clear();
        if self.data.capacity() > KEEP_BUFFER_CAPACITY {
            self.data = Vec::new();
        }
    }

    /// Accounts for body octets, storing them if wanted and within the limit.
    fn append(&mut self, bytes: &[u8], store: bool, max: u64) {
        self.size += bytes.len() as u64;
        if self.size > max {
            self.too_big = true;
        }
        if store && !self.too_big {
            self.data.extend_from_slice(bytes);
        }
    }
}

/// One SMTP connection.
struct Session {
    shared: Arc<Shared>,
    reader: BufReader<crate::tls::Reader>,
    writer: crate::tls::Writer,
    /// The greeting was sent (false only before the first command loop).
    banner_sent: bool,
    /// The user authenticated on this connection.
    authenticated: Option<String>,
    /// Replies not yet written: they are batched and only written when we
    /// are about to wait for input, which answers a pipelined batch of
    /// commands with one write.
    out: Vec<u8>,
    /// The current command line, reused to avoid an allocation per command.
    line: Vec<u8>,
    greeted: bool,
    tx: Transaction,
    /// Ends of message seen on this connection, for `drop_after`.
    messages_seen: u64,
}

impl Session {
    fn new(read: crate::tls::Reader, writer: crate::tls::Writer, shared: Arc<Shared>) -> Self {
        Self {
            shared,
            reader: BufReader::with_capacity(READ_BUFFER, read),
            writer,
            banner_sent: false,
            authenticated: None,
            out: Vec::with_capacity(1024),
            line: Vec::with_capacity(128),
            greeted: false,
            tx: Transaction::default(),
            messages_seen: 0,
        }
    }

    fn host(&self) -> &str {
        &self.shared.config.hostname
    }

    fn reply(&mut self, line: &str) {
        push_reply(&mut self.out, line);
    }

    /// Best-effort final reply before closing; errors are irrelevant because
    /// the connection is going away anyway.
    async fn goodbye(&mut self, line: &str) {
        self.out.clear();
        self.reply(line);
        let _ = timeout(GOODBYE_TIMEOUT, self.writer.write_all(&self.out)).await;
    }

    /// After `220 Ready to start TLS`: the handshake on the same socket, and
    /// a fresh session state (RFC 3207: the client must greet again).
    /// Input the client sent before the handshake is discarded.
    async fn upgrade(self) -> Result<Session, SessionError> {
        let Some(config) = self.shared.config.tls.clone() else {
            return Err(SessionError::Io(io::Error::other("no TLS configured")));
        };
        let tcp = crate::tls::reunite(self.reader.into_inner(), self.writer)
            .ok_or_else(|| io::Error::other("STARTTLS on a TLS connection"))?;
        let idle = self.shared.config.idle_timeout;
        let tls = timeout(idle, crate::tls::accept(config, tcp))
            .await
            .map_err(|_| SessionError::IdleTimeout)??;
        let (r, w) = crate::tls::split_tls(tls);
        let mut s = Session::new(r, w, self.shared);
        s.banner_sent = true;
        s.messages_seen = self.messages_seen;
        Ok(s)
    }

    fn is_tls(&self) -> bool {
        self.reader.get_ref().is_tls()
    }

    async fn run(&mut self) -> Result<End, SessionError> {
        let result = self.command_loop().await;
        if let Err(SessionError::IdleTimeout) = result {
            let notice = format!("421 4.4.2 {} Error: timeout exceeded", self.host());
            self.goodbye(&notice).await;
        }
        result
    }

    async fn command_loop(&mut self) -> Result<End, SessionError> {
        if !self.banner_sent {
            self.banner_sent = true;
            if let Some(m) = &self.shared.config.faults.load {
                if m.outage() {
                    // A scripted outage: refuse the connection as a down MTA would.
                    self.reply("421 4.3.2 Service not available");
                    self.flush().await?;
                    return Ok(End::Closed);
                }
            }
            self.out.extend_from_slice(&self.shared.greeting);
        }
        loop {
            let flow = match self.read_line().await? {
                Line::Eof => Flow::Close,
                Line::TooLong => {
                    self.reply("500 5.5.2 Error: line too long");
                    Flow::Continue
                }
                Line::Complete => {
                    // Swap the line out so handlers can borrow it while
                    // also mutating the session; swapped back to keep the
                    // allocation.
                    let line = std::mem::take(&mut self.line);
                    let flow = self.command(trim_eol(&line)).await;
                    self.line = line;
                    flow?
                }
            };
            match flow {
                Flow::Continue => {}
                Flow::Close => {
                    self.flush().await?;
                    return Ok(End::Closed);
                }
                Flow::Drop => return Ok(End::Closed),
                Flow::StartTls => {
                    self.flush().await?;
                    return Ok(End::StartTls);
                }
            }
        }
    }

    /// Makes sure there is buffered input; `false` means EOF.
    async fn fill(&mut self) -> Result<bool, SessionError> {
        if !self.reader.buffer().is_empty() {
            return Ok(true);
        }
        // We are about to wait for the client, which may itself be waiting
        // for our replies: send them now or both sides would block.
        self.flush().await?;
        let idle = self.shared.config.idle_timeout;
        match timeout(idle, self.reader.fill_buf()).await {
            Ok(Ok(buf)) => Ok(!buf.is_empty()),
            Ok(Err(e)) => Err(e.into()),
            Err(_) => Err(SessionError::IdleTimeout),
        }
    }

    async fn flush(&mut self) -> Result<(), SessionError> {
        if self.out.is_empty() {
            return Ok(());
        }
        // A client that stops reading would otherwise hold the task forever.
        let idle = self.shared.config.idle_timeout;
        match timeout(idle, self.writer.write_all(&self.out)).await {
            Ok(r) => r?,
            Err(_) => return Err(SessionError::IdleTimeout),
        }
        self.out.clear();
        Ok(())
    }

    /// Reads one command line (through LF) into `self.line`, discarding the
    /// rest of an over-long line so the stream stays in sync.
    async fn read_line(&mut self) -> Result<Line, SessionError> {
        self.line.clear();
        let mut too_long = false;
        loop {
            if !self.fill().await? {
                return Ok(Line::Eof);
            }
            let buf = self.reader.buffer();
            let (take, done) = match buf.iter().position(|&b| b == b'\n') {
                Some(i) => (i + 1, true),
                None => (buf.len(), false),
            };
            if !too_long {
                if self.line.len() + take > MAX_COMMAND_LINE + 2 {
                    too_long = true;
                    self.line.clear();
                } else {
                    self.line.extend_from_slice(&buf[..take]);
                }
            }
            self.reader.consume(take);
            if done {
                return Ok(if too_long {
                    Line::TooLong
                } else {
                    Line::Complete
                });
            }
        }
    }

    async fn command(&mut self, line: &[u8]) -> Result<Flow, SessionError> {
        let (verb, arg) = match line.iter().position(|&b| b == b' ') {
            Some(i) => (&line[..i], &line[i + 1..]),
            None => (line, &line[line.len()..]),
        };
        // Uppercase the verb into a stack buffer: no allocation per command.
        let mut upper = [0u8; 8];
        let verb = match upper.get_mut(..verb.len()) {
            Some(dst) => {
                dst.copy_from_slice(verb);
                dst.make_ascii_uppercase();
                &*dst
            }
            None => b"",
        };
        let Ok(arg) = std::str::from_utf8(arg) else {
            self.reply("501 5.5.2 Syntax error: invalid UTF-8");
            return Ok(Flow::Continue);
        };
        match verb {
            b"EHLO" | b"HELO" => self.hello(verb == b"EHLO", arg),
            b"MAIL" => self.mail(arg),
            b"RCPT" => self.rcpt(arg),
            b"DATA" => return self.data().await,
            b"BDAT" => return self.bdat(arg).await,
            b"RSET" => {
                self.tx.reset();
                self.reply("250 2.0.0 Ok");
            }
            b"NOOP" => self.reply("250 2.0.0 Ok"),
            b"VRFY" => self.reply("252 2.0.0 Cannot VRFY user, but will accept message"),
            b"QUIT" => {
                self.reply("221 2.0.0 Bye");
                return Ok(Flow::Close);
            }
            b"STARTTLS" if self.shared.config.tls.is_some() && !self.shared.config.implicit_tls => {
                return Ok(self.starttls(arg));
            }
            b"AUTH" if self.shared.config.auth.is_some() => return self.auth(arg).await,
            b"EXPN" | b"HELP" | b"STARTTLS" | b"AUTH" | b"ETRN" | b"TURN" => {
                self.reply("502 5.5.1 Error: command not implemented");
            }
            _ => self.reply("500 5.5.2 Error: command not recognized"),
        }
        Ok(Flow::Continue)
    }

    fn hello(&mut self, extended: bool, arg: &str) {
        if arg.trim().is_empty() {
            self.reply("501 5.5.4 Syntax: EHLO hostname");
            return;
        }
        // RFC 5321 4.1.4: EHLO/HELO implies RSET.
        self.tx.reset();
        self.greeted = true;
        let shared = &self.shared;
        let reply = match (extended, self.is_tls()) {
            (false, _) => &shared.helo,
            (true, false) => &shared.ehlo,
            (true, true) => &shared.ehlo_tls,
        };
        self.out.extend_from_slice(reply);
    }

    fn starttls(&mut self, arg: &str) -> Flow {
        if self.is_tls() {
            self.reply("554 5.5.1 Error: TLS already active");
        } else if !arg.trim().is_empty() {
            self.reply("501 5.5.4 Syntax: STARTTLS");
        } else if self.tx.mail_from.is_some() {
            self.reply("503 5.5.1 Error: STARTTLS inside a mail transaction");
        } else {
            self.reply("220 2.0.0 Ready to start TLS");
            return Flow::StartTls;
        }
        Flow::Continue
    }

    /// RFC 4954 AUTH PLAIN and LOGIN against the one configured account.
    async fn auth(&mut self, arg: &str) -> Result<Flow, SessionError> {
        let Some(account) = self.shared.config.auth.clone() else {
            self.reply("502 5.5.1 Error: command not implemented");
            return Ok(Flow::Continue);
        };
        if !self.greeted {
            self.reply("503 5.5.1 Error: send HELO/EHLO first");
            return Ok(Flow::Continue);
        }
        if self.shared.config.tls.is_some() && !self.is_tls() {
            self.reply("538 5.7.11 Encryption required for requested authentication mechanism");
            return Ok(Flow::Continue);
        }
        if self.authenticated.is_some() {
            self.reply("503 5.5.1 Error: already authenticated");
            return Ok(Flow::Continue);
        }
        if self.tx.mail_from.is_some() {
            self.reply("503 5.5.1 Error: MAIL transaction in progress");
            return Ok(Flow::Continue);
        }
        let mut words = arg.split_ascii_whitespace();
        let mechanism = words.next().unwrap_or("").to_ascii_uppercase();
        let initial = words.next().map(str::to_string);
        if !account
            .mechanisms
            .iter()
            .any(|m| m.eq_ignore_ascii_case(&mechanism))
        {
            self.reply("535 5.7.8 Error: authentication failed: unsupported mechanism");
            return Ok(Flow::Continue);
        }
        let b64 = base64::engine::general_purpose::STANDARD;
        let decode = |s: &str| {
            b64.decode(s.trim())
                .ok()
                .and_then(|b| String::from_utf8(b).ok())
        };
        let (user, password) = if mechanism == "PLAIN" {
            let response = match initial {
                Some(r) => r,
                None => match self.challenge("").await? {
                    Some(r) => r,
                    None => return Ok(Flow::Continue),
                },
            };
            let decoded = decode(&response).unwrap_or_default();
            let mut parts = decoded.split('\0');
            let _authzid = parts.next();
            (
                parts.next().unwrap_or("").to_string(),
                parts.next().unwrap_or("").to_string(),
            )
        } else {
            let user = match initial {
                Some(r) => r,
                None => match self
                    .challenge(&b64.encode(&account.login_prompts.0))
                    .await?
                {
                    Some(r) => r,
                    None => return Ok(Flow::Continue),
                },
            };
            let Some(password) = self
                .challenge(&b64.encode(&account.login_prompts.1))
                .await?
            else {
                return Ok(Flow::Continue);
            };
            (
                decode(&user).unwrap_or_default(),
                decode(&password).unwrap_or_default(),
            )
        };
        if user == account.user && password == account.password {
            self.authenticated = Some(user);
            self.reply("235 2.7.0 Authentication successful");
        } else {
            self.reply("535 5.7.8 Error: authentication failed: bad credentials");
        }
        Ok(Flow::Continue)
    }

    /// Sends a 334 challenge and reads the client's line; `None` when the
    /// client cancelled with `*` (already answered) or sent a bad line.
    async fn challenge(&mut self, text: &str) -> Result<Option<String>, SessionError> {
        self.reply(&format!("334 {text}"));
        match self.read_line().await? {
            Line::Complete => {}
            Line::Eof => return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into()),
            Line::TooLong => {
                self.reply("500 5.5.2 Error: line too long");
                return Ok(None);
            }
        }
        let line = String::from_utf8_lossy(trim_eol(&self.line)).into_owned();
        if line == "*" {
            self.reply("501 5.7.0 Authentication aborted");
            return Ok(None);
        }
        Ok(Some(line))
    }

    fn mail(&mut self, arg: &str) {
        if !self.greeted {
            return self.reply("503 5.5.1 Error: send HELO/EHLO first");
        }
        if self.tx.mail_from.is_some() {
            return self.reply("503 5.5.1 Error: nested MAIL command");
        }
        if self.shared.config.auth.is_some() && self.authenticated.is_none() {
            return self.reply("530 5.7.0 Authentication required");
        }
        let Some(rest) = strip_prefix_ci(arg, "FROM:") else {
            return self.reply("501 5.5.4 Syntax: MAIL FROM:<address>");
        };
        let Some((addr, params)) = parse_path(rest) else {
            return self.reply("501 5.1.7 Bad sender address syntax");
        };
        let config = &self.shared.config;
        for param in params.split_ascii_whitespace() {
            if let Some(size) = strip_prefix_ci(param, "SIZE=") {
                match size.parse::<u64>() {
                    Ok(n) if n > config.max_message_size => {
                        return self.reply("552 5.3.4 Message size exceeds fixed limit");
                    }
                    Ok(_) => {}
                    Err(_) => return self.reply("501 5.5.4 Bad SIZE syntax"),
                }
            } else if let Some(body) = strip_prefix_ci(param, "BODY=") {
                let ok = body.eq_ignore_ascii_case("7BIT")
                    || (config.eight_bit_mime && body.eq_ignore_ascii_case("8BITMIME"));
                if !ok {
                    return self.reply("555 5.5.4 Unsupported option: BODY");
                }
            }
            // Other parameters (SMTPUTF8, RET, ENVID, ...) are accepted and
            // ignored: a sink has nothing to do with them.
        }
        match &self.shared.mail_reply {
            Some(fault) => {
                push_reply(&mut self.out, &fault.line);
                if fault.code >= 400 {
                    return;
                }
            }
            None => self.reply("250 2.1.0 Ok"),
        }
        self.tx.mail_from = Some(addr.to_owned());
    }

    fn rcpt(&mut self, arg: &str) {
        if self.tx.mail_from.is_none() {
            return self.reply("503 5.5.1 Error: need MAIL command");
        }
        if self.tx.bdat_active {
            return self.reply("503 5.5.1 Error: RCPT after BDAT");
        }
        let Some(rest) = strip_prefix_ci(arg, "TO:") else {
            return self.reply("501 5.5.4 Syntax: RCPT TO:<address>");
        };
        let addr = match parse_path(rest) {
            Some((addr, _params)) if !addr.is_empty() => addr,
            _ => return self.reply("501 5.1.3 Bad recipient address syntax"),
        };
        self.tx.rcpt_attempts += 1;
        let shared = &self.shared;
        let rejected = &shared.counters.rejected_rcpts;
        if self.tx.rcpts.len() >= MAX_RECIPIENTS {
            rejected.fetch_add(1, Ordering::Relaxed);
            return push_reply(&mut self.out, "452 4.5.3 Error: too many recipients");
        }
        match shared.rcpt_fault(addr) {
            Some(fault) => {
                push_reply(&mut self.out, &fault.line);
                if fault.code >= 400 {
                    rejected.fetch_add(1, Ordering::Relaxed);
                    return;
                }
            }
            None => push_reply(&mut self.out, "250 2.1.5 Ok"),
        }
        self.tx.rcpts.push(addr.to_owned());
    }

    /// The sequence check shared by DATA and BDAT; `Some(reply)` refuses.
    fn transaction_error(&self) -> Option<&'static str> {
        if self.tx.mail_from.is_none() {
            Some("503 5.5.1 Error: need MAIL command")
        } else if self.tx.rcpt_attempts == 0 {
            Some("503 5.5.1 Error: need RCPT command")
        } else if self.tx.rcpts.is_empty() {
            Some("554 5.5.1 Error: no valid recipients")
        } else {
            None
        }
    }

    /// Whether body octets must be kept in memory for this message.
    fn store_body(&self) -> bool {
        let config = &self.shared.config;
        config.keep_messages || config.maildir.is_some()
    }

    async fn data(&mut self) -> Result<Flow, SessionError> {
        if let Some(err) = self.transaction_error() {
            self.reply(err);
            return Ok(Flow::Continue);
        }
        if self.tx.bdat_active {
            self.reply("503 5.5.1 Error: DATA during BDAT transfer");
            return Ok(Flow::Continue);
        }
        self.reply("354 End data with <CR><LF>.<CR><LF>");
        if !self.read_data(self.store_body()).await? {
            // EOF mid-message: the client gave up; nothing to accept.
            return Ok(Flow::Drop);
        }
        self.end_of_message().await
    }

    /// Reads a DATA body through `CRLF.CRLF`, dot-unstuffing it. Works on the
    /// reader's buffer directly, copying whole runs of bytes, instead of
    /// allocating per line. Returns `false` on EOF before the terminator.
    async fn read_data(&mut self, store: bool) -> Result<bool, SessionError> {
        let max = self.shared.config.max_message_size;
        let mut state = DataState::LineStart;
        // Whether the last octet appended was CR: only CRLF (not a bare LF)
        // starts a new line, so a bare-LF "\n.\n" cannot end the message.
        let mut prev_cr = false;
        loop {
            if !self.fill().await? {
                return Ok(false);
            }
            let buf = self.reader.buffer();
            let tx = &mut self.tx;
            let mut i = 0;
            let mut done = false;
            while i < buf.len() && !done {
                match state {
                    DataState::LineStart => {
                        if buf[i] == b'.' {
                            state = DataState::Dot;
                            prev_cr = false;
                            i += 1;
                        } else {
                            state = DataState::Middle;
                        }
                    }
                    DataState::Dot => {
                        if buf[i] == b'\r' {
                            state = DataState::DotCr;
                            i += 1;
                        } else {
                            state = DataState::Middle;
                        }
                    }
                    DataState::DotCr => {
                        if buf[i] == b'\n' {
                            i += 1;
                            done = true;
                        } else {
                            // ".\r" then something else: an ordinary line
                            // whose stuffed dot was removed; keep the CR.
                            tx.append(b"\r", store, max);
                            prev_cr = true;
                            state = DataState::Middle;
                        }
                    }
                    DataState::Middle => {
                        let rest = &buf[i..];
                        match rest.iter().position(|&b| b == b'\n') {
                            Some(j) => {
                                let crlf = if j > 0 { rest[j - 1] == b'\r' } else { prev_cr };
                                tx.append(&rest[..=j], store, max);
                                prev_cr = false;
                                if crlf {
                                    state = DataState::LineStart;
                                }
                                i += j + 1;
                            }
                            None => {
                                tx.append(rest, store, max);
                                prev_cr = rest.last() == Some(&b'\r');
                                i = buf.len();
                            }
                        }
                    }
                }
            }
            self.reader.consume(i);
            if done {
                return Ok(true);
            }
        }
    }

    async fn bdat(&mut self, arg: &str) -> Result<Flow, SessionError> {
        if !self.shared.config.chunking {
            self.reply("502 5.5.1 Error: command not implemented");
            return Ok(Flow::Continue);
        }
        let mut words = arg.split_ascii_whitespace();
        let size = words.next().and_then(|w| w.parse::<u64>().ok());
        let last = match words.next() {
            None => Some(false),
            Some(w) if w.eq_ignore_ascii_case("LAST") => Some(true),
            Some(_) => None,
        };
        let (Some(size), Some(last), None) = (size, last, words.next()) else {
            // Without a valid size we cannot know where the chunk ends, so
            // the following octets will be read as commands; nothing better
            // is possible.
            self.reply("501 5.5.4 Syntax: BDAT size [LAST]");
            return Ok(Flow::Continue);
        };
        // The chunk follows the command unconditionally (RFC 3030), so it
        // is read even when the command is refused, to stay in sync.
        let error = self.transaction_error();
        let store = self.store_body();
        if !self.read_chunk(size, error.is_none(), store).await? {
            return Ok(Flow::Drop);
        }
        if let Some(err) = error {
            self.reply(err);
            if last {
                self.tx.reset();
            }
            return Ok(Flow::Continue);
        }
        self.tx.bdat_active = true;
        if !last {
            if self.tx.too_big {
                self.reply("552 5.3.4 Error: message file too big");
            } else {
                self.reply(&format!("250 2.0.0 Ok: {size} octets received"));
            }
            return Ok(Flow::Continue);
        }
        self.end_of_message().await
    }

    /// Consumes exactly `size` octets of a BDAT chunk, adding them to the
    /// message only if `accept` (a refused chunk is read and discarded).
    async fn read_chunk(
        &mut self,
        size: u64,
        accept: bool,
        store: bool,
    ) -> Result<bool, SessionError> {
        let max = self.shared.config.max_message_size;
        let mut left = size;
        while left > 0 {
            if !self.fill().await? {
                return Ok(false);
            }
            let buf = self.reader.buffer();
            let take = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
            if accept {
                self.tx.append(&buf[..take], store, max);
            }
            self.reader.consume(take);
            left -= take as u64;
        }
        Ok(true)
    }

    /// Handles the end of a message (final `.` or BDAT LAST): faults, size
    /// limit, Maildir, accounting and the final reply.
    async fn end_of_message(&mut self) -> Result<Flow, SessionError> {
        self.messages_seen += 1;
        let shared = Arc::clone(&self.shared);
        let config = &shared.config;
        if let Some(limit) = config.faults.drop_after {
            if self.messages_seen >= limit {
                // Replies to earlier commands were due already; only this
                // message's reply is withheld.
                self.flush().await?;
                return Ok(Flow::Drop);
            }
        }
        if self.tx.too_big {
            self.tx.reset();
            self.reply("552 5.3.4 Error: message file too big");
            return Ok(Flow::Continue);
        }
        if let Some(delay) = config.faults.latency {
            self.flush().await?;
            tokio::time::sleep(delay).await;
        }
        if let Some(model) = &config.faults.load {
            match model.admit() {
                load::Verdict::Accept(wait) => {
                    self.flush().await?;
                    tokio::time::sleep(wait).await;
                    model.done(true);
                }
                load::Verdict::Refuse(wait, line) => {
                    self.flush().await?;
                    tokio::time::sleep(wait).await;
                    model.done(false);
                    self.tx.reset();
                    self.reply(&line);
                    return Ok(Flow::Continue);
                }
                load::Verdict::Close(line) => {
                    self.tx.reset();
                    self.reply(&line);
                    return Ok(Flow::Close);
                }
            }
        }
        let queue_id = next_queue_id();
        let mail_from = self.tx.mail_from.take().unwrap_or_default();
        let rcpt_to = std::mem::take(&mut self.tx.rcpts);
        let size = self.tx.size;
        let mut data = std::mem::take(&mut self.tx.data);
        if let Some(dir) = &config.maildir {
            let write = write_maildir(&shared.tracker, dir.clone(), &queue_id, &mail_from, data);
            match write.await {
                Ok(back) => data = back,
                Err(e) => {
                    tracing::warn!("sink: maildir write failed: {e}");
                    self.tx.reset();
                    self.reply("451 4.3.0 Error: queue file write error");
                    return Ok(Flow::Continue);
                }
            }
        }
        let c = &shared.counters;
        c.messages.fetch_add(1, Ordering::Relaxed);
        c.recipients
            .fetch_add(rcpt_to.len() as u64, Ordering::Relaxed);
        c.bytes.fetch_add(size, Ordering::Relaxed);
        let data = if config.keep_messages {
            data
        } else {
            // Hand the buffer back to the transaction for reuse.
            self.tx.data = data;
            Vec::new()
        };
        self.reply(&format!("250 2.0.0 Ok: queued as {queue_id}"));
        let tls = self.is_tls();
        let auth = self.authenticated.clone();
        shared.received().push(Received {
            mail_from,
            rcpt_to,
            data,
            queue_id,
            tls,
            auth,
        });
        self.tx.reset();
        Ok(Flow::Continue)
    }
}

/// Writes one message into the Maildir (`tmp/` then rename into `new/`, so
/// readers never see a partial file) on the blocking pool, handing the body
/// buffer back for reuse.
async fn write_maildir(
    tracker: &TaskTracker,
    dir: PathBuf,
    queue_id: &str,
    mail_from: &str,
    data: Vec<u8>,
) -> io::Result<Vec<u8>> {
    let secs = crate::clock::now().unix_timestamp();
    // Time, pid and queue id make the name unique across restarts and across
    // several sinks sharing a directory, as Maildir requires.
    let name = format!("{secs}.P{}Q{queue_id}.blast-sink", std::process::id());
    let header = format!("Return-Path: <{mail_from}>\r\n");
    tracker
        .spawn_blocking(move || {
            let tmp = dir.join("tmp").join(&name);
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&tmp)?;
            file.write_all(header.as_bytes())?;
            file.write_all(&data)?;
            // No fsync: this is a test and benchmark sink, and a sync per
            // message would make the disk, not the sender, the bottleneck.
            drop(file);
            std::fs::rename(&tmp, dir.join("new").join(&name))?;
            Ok(data)
        })
        .await
        .map_err(io::Error::other)?
}

/// Appends one reply line. A free function so callers can hold a borrow of
/// `Session::shared` (e.g. a fault reply) while writing to `Session::out`.
fn push_reply(out: &mut Vec<u8>, line: &str) {
    out.extend_from_slice(line.as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// Strips the line terminator (CRLF, or a bare LF from sloppy clients).
fn trim_eol(line: &[u8]) -> &[u8] {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    line.strip_suffix(b"\r").unwrap_or(line)
}

/// `s` without `prefix`, compared ASCII case-insensitively.
fn strip_prefix_ci<'a>(s: &'a str, prefix: &str) -> Option<&'a str> {
    let head = s.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix)
        .then(|| &s[prefix.len()..])
}

/// Splits `<address> params` into the address (without brackets) and the
/// parameter string. A missing `<...>` is tolerated, as many MTAs do.
fn parse_path(s: &str) -> Option<(&str, &str)> {
    let s = s.trim_start();
    if let Some(inner) = s.strip_prefix('<') {
        let end = inner.find('>')?;
        let addr = &inner[..end];
        // Drop an obsolete source route ("@a,@b:user@c"), RFC 5321 4.1.2.
        let addr = match addr.strip_prefix('@') {
            Some(route) => route.split_once(':').map_or(addr, |(_, a)| a),
            None => addr,
        };
        Some((addr, &inner[end + 1..]))
    } else {
        let (addr, params) = s.split_once(' ').unwrap_or((s, ""));
        (!addr.is_empty() && !addr.contains(['<', '>'])).then_some((addr, params))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant as StdInstant;
    use tokio::io::AsyncReadExt;
    use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

    /// Generous bound for a single read in tests, so a bug hangs no longer.
    const READ_TIMEOUT: Duration = Duration::from_secs(5);

    fn config() -> SinkConfig {
        SinkConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            keep_messages: true,
            ..SinkConfig::default()
        }
    }

    struct Client {
        reader: BufReader<OwnedReadHalf>,
        writer: OwnedWriteHalf,
    }

    impl Client {
        async fn connect(addr: SocketAddr) -> (Client, String) {
            let stream = TcpStream::connect(addr).await.expect("connect");
            // Small writes must reach the sink as separate segments for the
            // split-terminator test to exercise what it claims.
            stream.set_nodelay(true).expect("nodelay");
            let (r, w) = stream.into_split();
            let mut client = Client {
                reader: BufReader::new(r),
                writer: w,
            };
            let greeting = client.read_reply().await;
            (client, greeting)
        }

        /// Connects and sends EHLO, returning the EHLO reply.
        async fn ehlo(addr: SocketAddr) -> (Client, String) {
            let (mut c, _) = Client::connect(addr).await;
            let reply = c.cmd("EHLO client.test").await;
            (c, reply)
        }

        async fn send(&mut self, bytes: &[u8]) {
            self.writer.write_all(bytes).await.expect("write");
        }

        /// Reads one (possibly multi-line) reply; panics on EOF.
        async fn read_reply(&mut self) -> String {
            let mut reply = String::new();
            loop {
                let mut line = String::new();
                let n = timeout(READ_TIMEOUT, self.reader.read_line(&mut line))
                    .await
                    .expect("reply timed out")
                    .expect("read");
                assert!(n > 0, "EOF while waiting for a reply; got {reply:?}");
                reply.push_str(&line);
                if line.as_bytes().get(3) == Some(&b' ') {
                    return reply;
                }
            }
        }

        async fn cmd(&mut self, line: &str) -> String {
            self.send(format!("{line}\r\n").as_bytes()).await;
            self.read_reply().await
        }

        /// True when the server closed the connection (EOF or reset) with
        /// no further output.
        async fn closed(&mut self) -> bool {
            let mut buf = [0u8; 64];
            match timeout(READ_TIMEOUT, self.reader.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => true,
                Ok(Ok(_)) | Err(_) => false,
            }
        }
    }

    fn code(reply: &str) -> &str {
        &reply[..3]
    }

    #[tokio::test]
    async fn full_transaction_with_dot_unstuffing() {
        let sink = Sink::start(config()).await.expect("start");
        let (mut c, greeting) = Client::connect(sink.local_addr()).await;
        assert_eq!(greeting, "220 blast-sink ESMTP blast-sink\r\n");
        let ehlo = c.cmd("EHLO client.test").await;
        assert!(ehlo.starts_with("250-blast-sink\r\n"), "{ehlo}");
        assert_eq!(
            code(
                &c.cmd("MAIL FROM:<a@example.org> BODY=8BITMIME SIZE=100")
                    .await
            ),
            "250"
        );
        assert_eq!(code(&c.cmd("RCPT TO:<b@example.net>").await), "250");
        assert!(c.cmd("DATA").await.starts_with("354 "));
        c.send(b"Subject: hi\r\n\r\n..leading dot\r\n..\r\n\r\nlast\r\n.\r\n")
            .await;
        let done = c.read_reply().await;
        let id = done
            .strip_prefix("250 2.0.0 Ok: queued as ")
            .and_then(|s| s.strip_suffix("\r\n"))
            .expect("queued reply");
        assert!(!id.is_empty());
        assert!(id
            .chars()
            .all(|ch| ch.is_ascii_digit() || ch.is_ascii_uppercase()));
        assert!(c.cmd("QUIT").await.starts_with("221 "));
        assert!(c.closed().await);

        let got = sink.received();
        assert_eq!(got.len(), 1);
        let body = b"Subject: hi\r\n\r\n.leading dot\r\n.\r\n\r\nlast\r\n";
        assert_eq!(got[0].data, body);
        assert_eq!(got[0].mail_from, "a@example.org");
        assert_eq!(got[0].rcpt_to, ["b@example.net"]);
        assert_eq!(got[0].queue_id, id);
        let stats = sink.stats();
        assert_eq!(
            (
                stats.connections,
                stats.messages,
                stats.recipients,
                stats.bytes
            ),
            (1, 1, 1, body.len() as u64)
        );
        sink.shutdown().await;
    }

    #[tokio::test]
    async fn empty_body_and_terminator_split_across_writes() {
        let sink = Sink::start(config()).await.expect("start");
        let (mut c, _) = Client::ehlo(sink.local_addr()).await;
        c.cmd("MAIL FROM:<>").await;
        c.cmd("RCPT TO:<x@y>").await;
        c.cmd("DATA").await;
        // The terminator arrives in pieces; the sink must not end early or
        // miss it. Sleeps make the pieces separate reads.
        c.send(b"a\r\n.").await;
        tokio::time::sleep(Duration::from_millis(20)).await;
        c.send(b"\r").await;
        tokio::time::sleep(Duration::from_millis(20)).await;
        c.send(b"\n").await;
        assert_eq!(code(&c.read_reply().await), "250");
        c.cmd("MAIL FROM:<>").await;
        c.cmd("RCPT TO:<x@y>").await;
        c.cmd("DATA").await;
        // Bare-LF ".\n" is not a terminator; only CRLF.CRLF is.
        c.send(b"p\n.\nq\r\n.\r\n").await;
        assert_eq!(code(&c.read_reply().await), "250");
        let got = sink.received();
        assert_eq!(got[0].data, b"a\r\n");
        assert_eq!(got[0].mail_from, "");
        assert_eq!(got[1].data, b"p\n.\nq\r\n");
        sink.shutdown().await;
    }

    #[tokio::test]
    async fn pipelined_commands_get_replies_in_order() {
        let sink = Sink::start(config()).await.expect("start");
        let (mut c, ehlo) = Client::ehlo(sink.local_addr()).await;
        assert!(ehlo.contains("250-PIPELINING\r\n"), "{ehlo}");
        c.send(b"MAIL FROM:<a@x>\r\nRCPT TO:<b@y>\r\nRCPT TO:<c@y>\r\nDATA\r\n")
            .await;
        assert!(c.read_reply().await.starts_with("250 2.1.0"));
        assert!(c.read_reply().await.starts_with("250 2.1.5"));
        assert!(c.read_reply().await.starts_with("250 2.1.5"));
        assert!(c.read_reply().await.starts_with("354 "));
        // Body, then a second pipelined group in the same write.
        c.send(b"body\r\n.\r\nRSET\r\nNOOP\r\nMAIL FROM:<d@x>\r\nRCPT TO:<e@y>\r\nQUIT\r\n")
            .await;
        assert!(c.read_reply().await.starts_with("250 2.0.0 Ok: queued as "));
        for _ in 0..4 {
            assert_eq!(code(&c.read_reply().await), "250");
        }
        assert!(c.read_reply().await.starts_with("221 "));
        assert!(c.closed().await);
        let got = sink.received();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].rcpt_to, ["b@y", "c@y"]);
        assert_eq!(got[0].data, b"body\r\n");
        assert_eq!(sink.stats().recipients, 2);
        sink.shutdown().await;
    }

    #[tokio::test]
    async fn rcpt_faults_reject_some_and_deliver_the_rest() {
        let mut cfg = config();
        cfg.faults.rcpt_replies.insert(
            "Nobody@Example.org".into(),
            (550, "5.1.1".into(), "No such user".into()),
        );
        cfg.faults
            .rcpt_contains
            .push(("later-".into(), 451, "4.3.0".into(), "Try later".into()));
        let sink = Sink::start(cfg).await.expect("start");
        let (mut c, _) = Client::ehlo(sink.local_addr()).await;
        c.cmd("MAIL FROM:<a@x>").await;
        assert_eq!(
            c.cmd("RCPT TO:<nobody@EXAMPLE.org>").await,
            "550 5.1.1 No such user\r\n"
        );
        assert_eq!(
            c.cmd("RCPT TO:<try-LATER-1@x>").await,
            "451 4.3.0 Try later\r\n"
        );
        assert_eq!(code(&c.cmd("RCPT TO:<ok@x>").await), "250");
        c.cmd("DATA").await;
        c.send(b"hello\r\n.\r\n").await;
        assert_eq!(code(&c.read_reply().await), "250");

        // With every recipient refused, DATA is refused too.
        c.cmd("MAIL FROM:<a@x>").await;
        assert_eq!(code(&c.cmd("RCPT TO:<later-2@x>").await), "451");
        assert_eq!(
            c.cmd("DATA").await,
            "554 5.5.1 Error: no valid recipients\r\n"
        );
        assert_eq!(code(&c.cmd("RSET").await), "250");

        let got = sink.received();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].rcpt_to, ["ok@x"]);
        let stats = sink.stats();
        assert_eq!(
            (stats.rejected_rcpts, stats.recipients, stats.messages),
            (3, 1, 1)
        );
        sink.shutdown().await;
    }

    #[tokio::test]
    async fn bdat_chunks_are_raw_and_pipelined() {
        let sink = Sink::start(config()).await.expect("start");
        let (mut c, ehlo) = Client::ehlo(sink.local_addr()).await;
        assert!(ehlo.contains("CHUNKING"), "{ehlo}");
        // BDAT content is not dot-stuffed, so ".\r\n" is plain data here.
        c.send(b"MAIL FROM:<a@x>\r\nRCPT TO:<b@y>\r\nBDAT 7\r\nab\r\n.\r\nBDAT 4 LAST\r\ncd\r\n")
            .await;
        assert_eq!(code(&c.read_reply().await), "250");
        assert_eq!(code(&c.read_reply().await), "250");
        assert_eq!(c.read_reply().await, "250 2.0.0 Ok: 7 octets received\r\n");
        assert!(c.read_reply().await.starts_with("250 2.0.0 Ok: queued as "));
        // BDAT without MAIL is refused, but its octets are still consumed
        // rather than parsed as commands.
        c.send(b"BDAT 3 LAST\r\nxyzNOOP\r\n").await;
        assert_eq!(code(&c.read_reply().await), "503");
        assert_eq!(code(&c.read_reply().await), "250");
        // An empty final chunk completes a message on its own.
        c.send(b"MAIL FROM:<a@x>\r\nRCPT TO:<b@y>\r\nBDAT 0 LAST\r\n")
            .await;
        c.read_reply().await;
        c.read_reply().await;
        assert_eq!(code(&c.read_reply().await), "250");
        let got = sink.received();
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].data, b"ab\r\n.\r\ncd\r\n");
        assert!(got[1].data.is_empty());
        sink.shutdown().await;
    }

    #[tokio::test]
    async fn chunking_disabled_rejects_bdat() {
        let sink = Sink::start(SinkConfig {
            chunking: false,
            ..config()
        })
        .await
        .expect("start");
        let (mut c, ehlo) = Client::ehlo(sink.local_addr()).await;
        assert!(!ehlo.contains("CHUNKING"), "{ehlo}");
        assert!(ehlo.contains("PIPELINING"), "{ehlo}");
        c.cmd("MAIL FROM:<a@x>").await;
        c.cmd("RCPT TO:<b@y>").await;
        assert_eq!(code(&c.cmd("BDAT 0 LAST").await), "502");
        assert!(sink.received().is_empty());
        sink.shutdown().await;
    }

    #[tokio::test]
    async fn extensions_follow_config() {
        let sink = Sink::start(SinkConfig {
            pipelining: false,
            eight_bit_mime: false,
            hostname: "mx.test".into(),
            ..config()
        })
        .await
        .expect("start");
        let (mut c, greeting) = Client::connect(sink.local_addr()).await;
        assert_eq!(greeting, "220 mx.test ESMTP blast-sink\r\n");
        let ehlo = c.cmd("EHLO client.test").await;
        assert!(ehlo.starts_with("250-mx.test\r\n"), "{ehlo}");
        assert!(!ehlo.contains("PIPELINING"), "{ehlo}");
        assert!(!ehlo.contains("8BITMIME"), "{ehlo}");
        assert!(!ehlo.contains("SMTPUTF8"), "{ehlo}");
        assert!(ehlo.contains("250-CHUNKING\r\n"), "{ehlo}");
        assert!(ehlo.ends_with("250 ENHANCEDSTATUSCODES\r\n"), "{ehlo}");
        assert_eq!(code(&c.cmd("MAIL FROM:<a@x> BODY=8BITMIME").await), "555");
        assert_eq!(c.cmd("HELO client.test").await, "250 mx.test\r\n");
        sink.shutdown().await;
    }

    #[tokio::test]
    async fn sequence_and_syntax_errors() {
        let sink = Sink::start(SinkConfig {
            max_message_size: 10,
            ..config()
        })
        .await
        .expect("start");
        let (mut c, _) = Client::connect(sink.local_addr()).await;
        assert_eq!(code(&c.cmd("MAIL FROM:<a@x>").await), "503");
        assert_eq!(code(&c.cmd("HELO").await), "501");
        assert_eq!(code(&c.cmd("helo client").await), "250");
        assert_eq!(code(&c.cmd("RCPT TO:<b@y>").await), "503");
        assert_eq!(code(&c.cmd("DATA").await), "503");
        assert_eq!(code(&c.cmd("FROB").await), "500");
        assert_eq!(code(&c.cmd("EXPN list").await), "502");
        assert_eq!(c.cmd("VRFY someone").await.get(..4), Some("252 "));
        assert_eq!(
            code(&c.cmd(&format!("NOOP {}", "x".repeat(2000))).await),
            "500"
        );
        assert_eq!(code(&c.cmd("mail from:<a@x> SIZE=11").await), "552");
        assert_eq!(code(&c.cmd("mail from:<a@x>").await), "250");
        assert_eq!(code(&c.cmd("MAIL FROM:<a@x>").await), "503");
        assert_eq!(code(&c.cmd("DATA").await), "503");
        assert_eq!(code(&c.cmd("RCPT TO:<>").await), "501");
        assert_eq!(code(&c.cmd("rcpt to:<b@y>").await), "250");
        c.cmd("DATA").await;
        c.send(b"0123456789abc\r\n.\r\n").await;
        assert_eq!(code(&c.read_reply().await), "552");
        // The transaction is over after the 552; the session is not.
        assert_eq!(code(&c.cmd("RCPT TO:<b@y>").await), "503");
        assert_eq!(code(&c.cmd("NOOP").await), "250");
        assert_eq!(sink.stats().messages, 0);
        sink.shutdown().await;
    }

    #[tokio::test]
    async fn mail_reply_fault_refuses_transactions() {
        let mut cfg = config();
        cfg.faults.mail_reply = Some((530, "5.7.0".into(), "Authentication required".into()));
        let sink = Sink::start(cfg).await.expect("start");
        let (mut c, _) = Client::ehlo(sink.local_addr()).await;
        assert_eq!(
            c.cmd("MAIL FROM:<a@x>").await,
            "530 5.7.0 Authentication required\r\n"
        );
        assert_eq!(code(&c.cmd("RCPT TO:<b@y>").await), "503");
        sink.shutdown().await;
    }

    #[tokio::test]
    async fn drop_after_closes_without_replying() {
        let mut cfg = config();
        cfg.faults.drop_after = Some(2);
        let sink = Sink::start(cfg).await.expect("start");
        let (mut c, _) = Client::ehlo(sink.local_addr()).await;
        c.send(b"MAIL FROM:<a@x>\r\nRCPT TO:<b@y>\r\nBDAT 2 LAST\r\nm1")
            .await;
        for _ in 0..3 {
            assert_eq!(code(&c.read_reply().await), "250");
        }
        c.cmd("MAIL FROM:<a@x>").await;
        c.cmd("RCPT TO:<b@y>").await;
        c.cmd("DATA").await;
        c.send(b"m2\r\n.\r\n").await;
        assert!(c.closed().await, "connection should be dropped");
        let got = sink.received();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].data, b"m1");
        assert_eq!(sink.stats().messages, 1);
        // The count is per connection: a new one accepts again.
        let (mut c, _) = Client::ehlo(sink.local_addr()).await;
        c.send(b"MAIL FROM:<a@x>\r\nRCPT TO:<b@y>\r\nBDAT 2 LAST\r\nm3")
            .await;
        for _ in 0..3 {
            assert_eq!(code(&c.read_reply().await), "250");
        }
        sink.shutdown().await;
    }

    #[tokio::test]
    async fn maildir_gets_one_file_per_message() {
        let dir = tempfile::tempdir().expect("tempdir");
        let maildir = dir.path().join("Maildir");
        let sink = Sink::start(SinkConfig {
            maildir: Some(maildir.clone()),
            keep_messages: false,
            ..config()
        })
        .await
        .expect("start");
        let (mut c, _) = Client::ehlo(sink.local_addr()).await;
        c.cmd("MAIL FROM:<a@x>").await;
        c.cmd("RCPT TO:<b@y>").await;
        c.cmd("DATA").await;
        c.send(b"Subject: s\r\n\r\n..body\r\n.\r\n").await;
        let reply = c.read_reply().await;
        let id = reply
            .trim_end()
            .rsplit(' ')
            .next()
            .expect("queue id")
            .to_owned();

        let mut names = Vec::new();
        let mut entries = std::fs::read_dir(maildir.join("new")).expect("new/");
        while let Some(Ok(entry)) = entries.next() {
            names.push(entry.path());
        }
        assert_eq!(names.len(), 1);
        let name = names[0].file_name().and_then(|n| n.to_str()).expect("name");
        assert!(name.ends_with(&format!("Q{id}.blast-sink")), "{name}");
        let content = std::fs::read(&names[0]).expect("read message");
        let body = b"Subject: s\r\n\r\n.body\r\n";
        assert_eq!(content, [&b"Return-Path: <a@x>\r\n"[..], body].concat());
        assert_eq!(
            std::fs::read_dir(maildir.join("tmp"))
                .expect("tmp/")
                .count(),
            0
        );
        assert!(maildir.join("cur").is_dir());
        // keep_messages is off: the envelope is recorded, the body is not.
        let got = sink.received();
        assert_eq!(got[0].rcpt_to, ["b@y"]);
        assert!(got[0].data.is_empty());
        assert_eq!(sink.stats().bytes, body.len() as u64);
        sink.shutdown().await;
    }

    #[tokio::test]
    async fn latency_delays_the_final_reply() {
        let mut cfg = config();
        let latency = Duration::from_millis(200);
        cfg.faults.latency = Some(latency);
        let sink = Sink::start(cfg).await.expect("start");
        let (mut c, _) = Client::ehlo(sink.local_addr()).await;
        let started = StdInstant::now();
        assert_eq!(code(&c.cmd("MAIL FROM:<a@x>").await), "250");
        c.cmd("RCPT TO:<b@y>").await;
        c.cmd("DATA").await;
        // Only the end of data is delayed, not the other commands.
        assert!(started.elapsed() < latency);
        let started = StdInstant::now();
        c.send(b"x\r\n.\r\n").await;
        assert_eq!(code(&c.read_reply().await), "250");
        assert!(started.elapsed() >= latency);
        sink.shutdown().await;
    }

    #[tokio::test]
    async fn idle_timeout_sends_421() {
        let sink = Sink::start(SinkConfig {
            idle_timeout: Duration::from_millis(100),
            ..config()
        })
        .await
        .expect("start");
        let (mut c, _) = Client::connect(sink.local_addr()).await;
        assert!(c.read_reply().await.starts_with("421 4.4.2 "));
        assert!(c.closed().await);
        sink.shutdown().await;
    }

    #[tokio::test]
    async fn shutdown_closes_open_connections() {
        let sink = Sink::start(config()).await.expect("start");
        let addr = sink.local_addr();
        let (mut c, _) = Client::ehlo(addr).await;
        timeout(READ_TIMEOUT, sink.shutdown())
            .await
            .expect("shutdown hung");
        assert!(c.read_reply().await.starts_with("421 4.3.2 "));
        assert!(c.closed().await);
        assert!(TcpStream::connect(addr).await.is_err(), "still listening");
    }

    #[tokio::test]
    async fn serve_runs_until_stopped() {
        let stats = serve(config(), async {}).await.expect("serve");
        assert_eq!(stats.connections, 0);
        // A bind failure is reported, not swallowed.
        let taken = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let busy = SinkConfig {
            listen: taken.local_addr().expect("addr"),
            ..config()
        };
        assert!(serve(busy, async {}).await.is_err());
    }

    #[test]
    fn path_parsing() {
        assert_eq!(parse_path("<a@b> SIZE=1"), Some(("a@b", " SIZE=1")));
        assert_eq!(parse_path(" <>"), Some(("", "")));
        assert_eq!(parse_path("<@r1,@r2:u@d>"), Some(("u@d", "")));
        assert_eq!(parse_path("u@d BODY=7BIT"), Some(("u@d", "BODY=7BIT")));
        assert_eq!(parse_path("<a@b"), None);
        assert_eq!(strip_prefix_ci("from:<x>", "FROM:"), Some("<x>"));
        assert_eq!(strip_prefix_ci("fr", "FROM:"), None);
    }
}
