//! One SMTP connection of the sink: the command loop, DATA and BDAT, STARTTLS
//! and AUTH, the fault replies, and the Maildir writes. The listener, the
//! shared counters and the configuration live in the parent module.

use std::io::{self, Write as _};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use base64::Engine as _;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::time::timeout;
use tokio_util::task::TaskTracker;

use super::{
    load, next_queue_id, Received, Shared, GOODBYE_TIMEOUT, KEEP_BUFFER_CAPACITY, MAX_COMMAND_LINE,
    MAX_RECIPIENTS, READ_BUFFER,
};

/// How a session's command loop ended without error.
pub(super) enum End {
    /// QUIT, EOF or a deliberate drop.
    Closed,
    /// The client asked for STARTTLS and got 220: hand the socket over to
    /// the handshake.
    StartTls,
}

/// Why a session ended abnormally.
#[derive(Debug, thiserror::Error)]
pub(super) enum SessionError {
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
    /// MAIL FROM said `BODY=8BITMIME`.
    eight_bit: bool,
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
        self.eight_bit = false;
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
pub(super) struct Session {
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
    pub(super) fn new(
        read: crate::tls::Reader,
        writer: crate::tls::Writer,
        shared: Arc<Shared>,
    ) -> Self {
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

    pub(super) fn host(&self) -> &str {
        &self.shared.config.hostname
    }

    fn reply(&mut self, line: &str) {
        push_reply(&mut self.out, line);
    }

    /// Best-effort final reply before closing, after any replies still owed
    /// (a message already recorded gets its 250, as from a real MTA);
    /// errors are irrelevant because the connection is going away anyway.
    pub(super) async fn goodbye(&mut self, line: &str) {
        self.reply(line);
        let (writer, out) = (&mut self.writer, &self.out);
        let bye = async {
            writer.write_all(out).await?;
            writer.flush().await
        };
        let _ = timeout(GOODBYE_TIMEOUT, bye).await;
    }

    /// After `220 Ready to start TLS`: the handshake on the same socket, and
    /// a fresh session state (RFC 3207: the client must greet again).
    /// Input the client sent before the handshake is discarded.
    pub(super) async fn upgrade(self) -> Result<Session, SessionError> {
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

    pub(super) async fn run(&mut self) -> Result<End, SessionError> {
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
        let (writer, out) = (&mut self.writer, &mut self.out);
        // What went out leaves `out` as it goes, so a goodbye after an
        // interrupted write sends only what is still owed, never twice.
        let write = async {
            while !out.is_empty() {
                let n = writer.write(out).await?;
                if n == 0 {
                    return Err(io::Error::from(io::ErrorKind::WriteZero));
                }
                out.drain(..n);
            }
            // TLS keeps records in its buffer until flushed.
            writer.flush().await
        };
        match timeout(idle, write).await {
            Ok(r) => r?,
            Err(_) => return Err(SessionError::IdleTimeout),
        }
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
        if let Some(refusal) = self.auth_refusal() {
            self.reply(refusal);
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
        let credentials = if mechanism == "PLAIN" {
            self.auth_plain(initial).await?
        } else {
            self.auth_login(initial, &account.login_prompts).await?
        };
        let Some((user, password)) = credentials else {
            return Ok(Flow::Continue);
        };
        if user == account.user && password == account.password {
            self.authenticated = Some(user);
            self.reply("235 2.7.0 Authentication successful");
        } else {
            self.reply("535 5.7.8 Error: authentication failed: bad credentials");
        }
        Ok(Flow::Continue)
    }

    /// The reply refusing AUTH at this point of the session, if it must be:
    /// before EHLO, in clear when TLS is on offer, a second time, or inside
    /// a mail transaction.
    fn auth_refusal(&self) -> Option<&'static str> {
        if !self.greeted {
            Some("503 5.5.1 Error: send HELO/EHLO first")
        } else if self.shared.config.tls.is_some() && !self.is_tls() {
            Some("538 5.7.11 Encryption required for requested authentication mechanism")
        } else if self.authenticated.is_some() {
            Some("503 5.5.1 Error: already authenticated")
        } else if self.tx.mail_from.is_some() {
            Some("503 5.5.1 Error: MAIL transaction in progress")
        } else {
            None
        }
    }

    /// AUTH PLAIN: the initial response, or one empty 334 challenge for it.
    /// `None` when the client cancelled (already answered).
    async fn auth_plain(
        &mut self,
        initial: Option<String>,
    ) -> Result<Option<(String, String)>, SessionError> {
        let response = match initial {
            Some(r) => r,
            None => match self.challenge("").await? {
                Some(r) => r,
                None => return Ok(None),
            },
        };
        let decoded = decode_base64(&response).unwrap_or_default();
        let mut parts = decoded.split('\0');
        let _authzid = parts.next();
        Ok(Some((
            parts.next().unwrap_or("").to_string(),
            parts.next().unwrap_or("").to_string(),
        )))
    }

    /// AUTH LOGIN: the user (initial response or the first prompt), then
    /// the password (the second prompt). `None` when the client cancelled
    /// (already answered).
    async fn auth_login(
        &mut self,
        initial: Option<String>,
        prompts: &(String, String),
    ) -> Result<Option<(String, String)>, SessionError> {
        let b64 = base64::engine::general_purpose::STANDARD;
        let user = match initial {
            Some(r) => r,
            None => match self.challenge(&b64.encode(&prompts.0)).await? {
                Some(r) => r,
                None => return Ok(None),
            },
        };
        let Some(password) = self.challenge(&b64.encode(&prompts.1)).await? else {
            return Ok(None);
        };
        Ok(Some((
            decode_base64(&user).unwrap_or_default(),
            decode_base64(&password).unwrap_or_default(),
        )))
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
        let mut body_8bit = false;
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
                let eight_bit = body.eq_ignore_ascii_case("8BITMIME");
                if !(body.eq_ignore_ascii_case("7BIT") || (config.eight_bit_mime && eight_bit)) {
                    return self.reply("555 5.5.4 Unsupported option: BODY");
                }
                body_8bit = eight_bit;
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
        self.tx.eight_bit = body_8bit;
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
        // A clone, so the configuration can be read while the session changes.
        let shared = Arc::clone(&self.shared);
        if let Some(flow) = self.before_accept(&shared).await? {
            return Ok(flow);
        }
        self.accept(&shared).await
    }

    /// What may hold or refuse a finished message before it is accepted, in
    /// this order: `drop_after`, the size limit, `latency`, the load model.
    /// `Some(flow)` ends the message there, its reply (if any) queued.
    async fn before_accept(&mut self, shared: &Shared) -> Result<Option<Flow>, SessionError> {
        let faults = &shared.config.faults;
        if let Some(limit) = faults.drop_after {
            if self.messages_seen >= limit {
                // Replies to earlier commands were due already; only this
                // message's reply is withheld.
                self.flush().await?;
                return Ok(Some(Flow::Drop));
            }
        }
        if self.tx.too_big {
            self.tx.reset();
            self.reply("552 5.3.4 Error: message file too big");
            return Ok(Some(Flow::Continue));
        }
        if let Some(delay) = faults.latency {
            self.flush().await?;
            tokio::time::sleep(delay).await;
        }
        match &faults.load {
            Some(model) => self.admit(model).await,
            None => Ok(None),
        }
    }

    /// Asks the load model whether to take the message, and waits as long
    /// as it says; `Some(flow)` when it refused the message.
    async fn admit(&mut self, model: &load::LoadModel) -> Result<Option<Flow>, SessionError> {
        match model.admit() {
            load::Verdict::Accept(wait) => {
                self.flush().await?;
                tokio::time::sleep(wait).await;
                model.done(true);
                Ok(None)
            }
            load::Verdict::Refuse(wait, line) => {
                self.flush().await?;
                tokio::time::sleep(wait).await;
                model.done(false);
                self.tx.reset();
                self.reply(&line);
                Ok(Some(Flow::Continue))
            }
            load::Verdict::Close(line) => {
                self.tx.reset();
                self.reply(&line);
                Ok(Some(Flow::Close))
            }
        }
    }

    /// Accepts the message: the Maildir (a failed write is a 451), the
    /// counters, the 250 and the [`Received`] record.
    async fn accept(&mut self, shared: &Shared) -> Result<Flow, SessionError> {
        let config = &shared.config;
        let queue_id = next_queue_id();
        let mail_from = self.tx.mail_from.take().unwrap_or_default();
        let eight_bit = std::mem::take(&mut self.tx.eight_bit);
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
        self.reply(&format!("250 2.0.0 Ok: queued as {queue_id}"));
        if config.keep_messages {
            let tls = self.is_tls();
            let auth = self.authenticated.clone();
            shared.received().push(Received {
                mail_from,
                eight_bit,
                rcpt_to,
                data,
                queue_id,
                tls,
                auth,
            });
        } else {
            // Nothing is kept (memory stays flat over a 10M run): hand the
            // buffer back to the transaction for reuse.
            self.tx.data = data;
        }
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

/// Base64 to UTF-8 text; `None` for either kind of garbage (the caller
/// treats it as a wrong credential).
fn decode_base64(s: &str) -> Option<String> {
    base64::engine::general_purpose::STANDARD
        .decode(s.trim())
        .ok()
        .and_then(|b| String::from_utf8(b).ok())
}

/// Strips the line terminator (CRLF, or a bare LF from sloppy clients).
fn trim_eol(line: &[u8]) -> &[u8] {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    line.strip_suffix(b"\r").unwrap_or(line)
}

/// `s` without `prefix`, compared ASCII case-insensitively.
pub(super) fn strip_prefix_ci<'a>(s: &'a str, prefix: &str) -> Option<&'a str> {
    let head = s.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix)
        .then(|| &s[prefix.len()..])
}

/// Splits `<address> params` into the address (without brackets) and the
/// parameter string. A missing `<...>` is tolerated, as many MTAs do.
pub(super) fn parse_path(s: &str) -> Option<(&str, &str)> {
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
