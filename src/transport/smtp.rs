//! Injection into an SMTP relay through lettre's low-level
//! `AsyncSmtpConnection`. We drive the transaction ourselves instead of using
//! lettre's pooled transport because the pool stalls on loopback (Nagle's
//! algorithm against delayed ACK: 22 msg/s per connection here), sends a NOOP
//! before every reuse and drops the connection on any negative reply. Here a
//! 5xx on RCPT is an outcome for that recipient; an `RSET` keeps the session.

use std::error::Error as _;
use std::time::Duration;

use lettre::transport::smtp::authentication::{Credentials, Mechanism};
use lettre::transport::smtp::client::AsyncSmtpConnection;
use lettre::transport::smtp::extension::ClientId;
use lettre::transport::smtp::response::Response;
use tokio::net::TcpStream;

use super::{classify, Envelope, Outcome, SessionError, Transport};
use crate::config::Relay;

/// Sends through one or more SMTP relays; injector `slot` uses relay
/// `slot % relays.len()`.
#[derive(Debug, Clone)]
pub struct Smtp {
    relays: Vec<Relay>,
    helo: String,
    timeout: Duration,
    password: Option<String>,
}

impl Smtp {
    /// A transport for `relays`. `password` (from `BLAST_SMTP_PASSWORD`) is
    /// used for relays whose URL names a user.
    pub fn new(
        relays: Vec<Relay>,
        helo: String,
        timeout: Duration,
        password: Option<String>,
    ) -> Smtp {
        Smtp {
            relays,
            helo,
            timeout,
            password,
        }
    }

    fn relay(&self, slot: usize) -> &Relay {
        &self.relays[slot % self.relays.len()]
    }
}

/// One open SMTP connection.
pub struct SmtpSession {
    conn: AsyncSmtpConnection,
    timeout: Duration,
}

impl Transport for Smtp {
    type Session = SmtpSession;

    async fn connect(&self, slot: usize) -> Result<SmtpSession, SessionError> {
        let relay = self.relay(slot);
        let fail = |what: &str, e: &dyn std::fmt::Display| SessionError {
            message: format!("{relay}: {what}: {e}"),
            ambiguous: false,
        };
        let addr = (relay.host.as_str(), relay.port);
        let stream = tokio::time::timeout(self.timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| fail("connect", &"timed out"))?
            .map_err(|e| fail("connect", &e))?;
        // Without this, each command waits for the peer's delayed ACK.
        stream.set_nodelay(true).map_err(|e| fail("connect", &e))?;
        let hello = ClientId::Domain(self.helo.clone());
        let mut conn = tokio::time::timeout(
            self.timeout,
            AsyncSmtpConnection::connect_with_transport(Box::new(stream), &hello),
        )
        .await
        .map_err(|_| fail("greeting", &"timed out"))?
        .map_err(|e| fail("greeting", &lettre_text(&e)))?;
        if let Some(user) = &relay.user {
            let password = self.password.clone().ok_or_else(|| SessionError {
                message: format!("{relay}: a user is set but BLAST_SMTP_PASSWORD is not"),
                ambiguous: false,
            })?;
            let creds = Credentials::new(user.clone(), password);
            tokio::time::timeout(
                self.timeout,
                conn.auth(&[Mechanism::Plain, Mechanism::Login], &creds),
            )
            .await
            .map_err(|_| fail("AUTH", &"timed out"))?
            .map_err(|e| fail("AUTH", &lettre_text(&e)))?;
        }
        Ok(SmtpSession {
            conn,
            timeout: self.timeout,
        })
    }

    fn describe(&self, slot: usize) -> String {
        self.relay(slot).to_string()
    }
}

/// How one SMTP command ended.
enum Step {
    /// Positive reply.
    Ok(Response),
    /// Negative reply: the transaction is over for this recipient.
    Refused(Outcome),
}

impl SmtpSession {
    /// Sends a command (or the message data when `data` is set) and classifies
    /// the reply; `Err` when the connection failed.
    async fn step(&mut self, command: &str, data: Option<&[u8]>) -> Result<Step, SessionError> {
        let fut = async {
            match data {
                Some(bytes) => self.conn.message(bytes).await,
                None => self.conn.command(command).await,
            }
        };
        let result = tokio::time::timeout(self.timeout, fut)
            .await
            .map_err(|_| SessionError {
                message: format!("{} timed out after {:?}", command.trim_end(), self.timeout),
                ambiguous: data.is_some(),
            })?;
        match result {
            Ok(resp) => Ok(Step::Ok(resp)),
            Err(e) => match e.status() {
                Some(code) => {
                    let text = e.source().map(|s| s.to_string()).unwrap_or_default();
                    Ok(Step::Refused(classify::outcome(classify::reply(
                        code.into(),
                        &[&text],
                    ))))
                }
                None => Err(SessionError {
                    message: format!("{}: {}", command.trim_end(), lettre_text(&e)),
                    ambiguous: data.is_some(),
                }),
            },
        }
    }

    /// After a refused command, return the session to a clean state.
    async fn reset(&mut self) -> Result<(), SessionError> {
        match self.step("RSET\r\n", None).await? {
            Step::Ok(_) => Ok(()),
            Step::Refused(o) => Err(SessionError {
                message: format!("RSET refused: {}", o.reply().text),
                ambiguous: false,
            }),
        }
    }
}

impl super::Session for SmtpSession {
    async fn send(&mut self, envelope: &Envelope, message: &[u8]) -> Result<Outcome, SessionError> {
        let mail = format!("MAIL FROM:<{}>\r\n", envelope.from);
        let rcpt = format!("RCPT TO:<{}>\r\n", envelope.to);
        for cmd in [mail.as_str(), rcpt.as_str(), "DATA\r\n"] {
            if let Step::Refused(outcome) = self.step(cmd, None).await? {
                self.reset().await?;
                return Ok(outcome);
            }
        }
        match self.step("end of data", Some(message)).await? {
            Step::Ok(resp) => {
                let lines: Vec<&str> = resp.message().collect();
                Ok(classify::outcome(classify::reply(
                    resp.code().into(),
                    &lines,
                )))
            }
            // A refusal after the data ends the transaction; no RSET needed.
            Step::Refused(outcome) => Ok(outcome),
        }
    }

    async fn close(mut self) {
        let _ = tokio::time::timeout(Duration::from_secs(2), self.conn.quit()).await;
    }
}

/// lettre's error with its source text, e.g. "network error: Connection reset".
fn lettre_text(e: &lettre::transport::smtp::Error) -> String {
    e.to_string()
}
