//! Unit tests of the sink: the protocol as a client sees it, faults, limits.

use super::session::{parse_path, strip_prefix_ci};
use super::*;
use std::time::Instant as StdInstant;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
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
    // keep_messages is off: nothing is kept in memory, only counted.
    assert!(sink.received().is_empty());
    assert_eq!(sink.stats().messages, 1);
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
