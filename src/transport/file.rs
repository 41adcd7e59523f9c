//! `--dry-run`: each message is written to `DIR/<recipient id>.eml` instead of
//! being sent, so an operator can inspect exactly what would leave.

use std::path::PathBuf;

use super::{SessionError, Transport};
use crate::model::{Envelope, Outcome, Reply};

/// Writes messages into a folder, or nowhere (`blast check --render`).
#[derive(Debug, Clone)]
pub struct FileTransport {
    dir: Option<PathBuf>,
}

impl FileTransport {
    /// Creates `dir` if needed.
    pub fn new(dir: PathBuf) -> std::io::Result<FileTransport> {
        std::fs::create_dir_all(&dir)?;
        Ok(FileTransport { dir: Some(dir) })
    }

    /// Takes every message and keeps none: rendering is the whole point.
    pub fn discard() -> FileTransport {
        FileTransport { dir: None }
    }
}

/// A "session" is just the folder.
#[derive(Debug)]
pub struct FileSession {
    dir: Option<PathBuf>,
}

impl Transport for FileTransport {
    type Session = FileSession;

    async fn connect(&self, _slot: usize) -> Result<FileSession, SessionError> {
        Ok(FileSession {
            dir: self.dir.clone(),
        })
    }

    fn describe(&self, _slot: usize) -> String {
        match &self.dir {
            Some(dir) => format!("file://{}", dir.display()),
            None => "discard".to_string(),
        }
    }
}

impl super::Session for FileSession {
    async fn send(&mut self, envelope: &Envelope, message: &[u8]) -> Result<Outcome, SessionError> {
        let Some(dir) = &self.dir else {
            return Ok(Outcome::Sent {
                reply: Reply {
                    code: None,
                    enhanced: None,
                    text: "rendered".into(),
                },
                queue_id: None,
            });
        };
        let path = dir.join(format!("{}.eml", envelope.recipient_id));
        // The envelope is not part of the message; keep it visible like an MTA would.
        let mut bytes = format!(
            "Return-Path: <{}>\r\nDelivered-To: {}\r\n",
            envelope.from, envelope.to
        )
        .into_bytes();
        bytes.extend_from_slice(message);
        tokio::fs::write(&path, bytes)
            .await
            .map_err(|e| SessionError {
                message: format!("{}: {e}", path.display()),
                ambiguous: false,
                permanent: false,
            })?;
        Ok(Outcome::Sent {
            reply: Reply {
                code: None,
                enhanced: None,
                text: format!("written to {}", path.display()),
            },
            queue_id: None,
        })
    }

    async fn close(self) {}
}
