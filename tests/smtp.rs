//! The SMTP injector against the sink in each protocol mode: outcomes stay
//! with their own recipient and a refusal does not cost the connection.

use std::time::Duration;

use blast::config::Relay;
use blast::model::{Envelope, Outcome, Status};
use blast::sink::{Faults, Sink, SinkConfig};
use blast::transport::smtp::Smtp;
use blast::transport::{Session, Transport};

async fn sink(pipelining: bool, chunking: bool, faults: Faults) -> Sink {
    Sink::start(SinkConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        pipelining,
        chunking,
        keep_messages: true,
        faults,
        ..Default::default()
    })
    .await
    .unwrap()
}

fn transport(sink: &Sink) -> Smtp {
    let relay = Relay {
        host: "127.0.0.1".into(),
        port: sink.local_addr().port(),
        weight: 1,
        ..Default::default()
    };
    Smtp::new(vec![relay], "test.example".into(), Duration::from_secs(5)).expect("no TLS to set up")
}

fn envelope(i: i64) -> Envelope {
    Envelope {
        recipient_id: i,
        from: "b@example.com".into(),
        to: format!("r{i}@example.com"),
        eight_bit: false,
    }
}

/// One session, 30 messages, every third refused (550 or 451) in turn.
async fn mode(pipelining: bool, chunking: bool) {
    mode_ahead(pipelining, chunking, false).await;
}

/// [`mode`]; with `ahead`, each message is sent with the next one's
/// envelope (`send_then`), which a session with PIPELINING and no
/// CHUNKING writes right behind the data.
async fn mode_ahead(pipelining: bool, chunking: bool, ahead: bool) {
    let mut faults = Faults::default();
    for i in (0..30).step_by(3) {
        let (code, enh) = if i % 2 == 0 {
            (550, "5.1.1")
        } else {
            (451, "4.3.0")
        };
        faults.rcpt_replies.insert(
            format!("r{i}@example.com"),
            (code, enh.into(), format!("refused r{i}")),
        );
    }
    let sink = sink(pipelining, chunking, faults).await;
    let t = transport(&sink);
    let mut s = t.connect(0).await.unwrap();
    assert_eq!(s.capabilities().pipelining, pipelining);
    assert_eq!(s.capabilities().chunking, chunking);
    assert_eq!(s.writes_ahead(), pipelining && !chunking);
    for i in 0..30 {
        let env = envelope(i);
        let next = (ahead && i < 29).then(|| envelope(i + 1));
        // A leading dot and a bare "." line test dot-stuffing in DATA mode.
        let msg = format!("Subject: m{i}\r\n\r\n.hidden line\r\n.\r\nbody {i}\r\n");
        let outcome = s
            .send_then(&env, msg.as_bytes(), next.as_ref())
            .await
            .unwrap();
        // The next envelope is on the wire only after data that went
        // (a transaction refused at RCPT never reaches its data).
        assert_eq!(
            s.pending(),
            next.is_some() && s.writes_ahead() && i % 3 != 0,
            "{i}"
        );
        match (i % 3, i % 2) {
            (0, 0) => {
                assert_eq!(outcome.status(), Status::Failed, "{i}: {outcome:?}");
                assert_eq!(outcome.reply().code, Some(550));
                assert!(outcome.reply().text.contains(&format!("refused r{i}")));
            }
            (0, _) => {
                assert_eq!(outcome.status(), Status::Deferred, "{i}: {outcome:?}");
                assert_eq!(outcome.reply().enhanced.as_deref(), Some("4.3.0"));
            }
            _ => match &outcome {
                Outcome::Sent { queue_id, .. } => assert!(queue_id.is_some(), "{outcome:?}"),
                other => panic!("{i}: {other:?}"),
            },
        }
    }
    s.close().await;
    let received = sink.received();
    assert_eq!(received.len(), 20);
    for r in &received {
        let i: usize = r.rcpt_to[0]
            .trim_start_matches('r')
            .trim_end_matches("@example.com")
            .parse()
            .unwrap();
        assert_ne!(i % 3, 0, "a refused recipient was delivered");
        let expected = format!("Subject: m{i}\r\n\r\n.hidden line\r\n.\r\nbody {i}\r\n");
        assert_eq!(
            String::from_utf8_lossy(&r.data),
            expected,
            "content survives the mode"
        );
    }
    assert_eq!(sink.stats().connections, 1, "refusals keep the connection");
}

#[tokio::test]
async fn pipelining_and_chunking() {
    mode(true, true).await;
}

#[tokio::test]
async fn pipelining_with_data() {
    mode(true, false).await;
}

/// Issue 14: with the next envelope written behind each message's data
/// (one round trip per message), outcomes still stay with their own
/// recipient, refusals included, on one connection.
#[tokio::test]
async fn pipelining_with_data_and_envelopes_written_ahead() {
    mode_ahead(true, false, true).await;
}

/// Sessions that cannot write ahead (BDAT, lock step) ignore the next
/// envelope.
#[tokio::test]
async fn next_envelopes_are_ignored_where_they_cannot_be_written_ahead() {
    mode_ahead(true, true, true).await;
    mode_ahead(false, false, true).await;
}

/// An envelope written ahead whose message never follows: closing the
/// session delivers nothing (no empty message, no QUIT read as data), and
/// a send for another envelope is refused, unsent and not ambiguous.
#[tokio::test]
async fn an_envelope_written_ahead_is_never_delivered_without_its_message() {
    let sink = sink(true, false, Faults::default()).await;
    let t = transport(&sink);
    let msg = b"Subject: x\r\n\r\nx\r\n";
    let mut s = t.connect(0).await.unwrap();
    let o = s
        .send_then(&envelope(1), msg, Some(&envelope(2)))
        .await
        .unwrap();
    assert_eq!(o.status(), Status::Sent);
    assert!(s.pending());
    s.close().await;
    let mut s = t.connect(0).await.unwrap();
    s.send_then(&envelope(3), msg, Some(&envelope(4)))
        .await
        .unwrap();
    let err = s.send(&envelope(5), msg).await.unwrap_err();
    assert!(!err.ambiguous, "{err}");
    drop(s);
    // Time for the sink to act on both ends of session (a wrong close
    // would show up as a third message).
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(sink.stats().connections, 2);
    let got: Vec<String> = sink
        .received()
        .iter()
        .map(|r| r.rcpt_to[0].clone())
        .collect();
    assert_eq!(got, ["r1@example.com", "r3@example.com"]);
}

#[tokio::test]
async fn lock_step() {
    mode(false, false).await;
}

#[tokio::test]
async fn chunking_without_pipelining_is_lock_step() {
    mode(false, true).await;
}

/// A connection dropped after the data was sent is ambiguous: the message may
/// have been accepted.
#[tokio::test]
async fn drop_after_data_is_ambiguous() {
    let sink = sink(
        true,
        true,
        Faults {
            drop_after: Some(1),
            ..Default::default()
        },
    )
    .await;
    let t = transport(&sink);
    let mut s = t.connect(0).await.unwrap();
    let env = Envelope {
        recipient_id: 1,
        from: "b@example.com".into(),
        to: "x@example.com".into(),
        eight_bit: false,
    };
    let err = s.send(&env, b"Subject: x\r\n\r\nx\r\n").await.unwrap_err();
    assert!(err.ambiguous, "{err}");
}

/// A refused MAIL FROM (e.g. 530 authentication required) is the outcome.
#[tokio::test]
async fn refused_mail_from() {
    let faults = Faults {
        mail_reply: Some((530, "5.7.0".into(), "Authentication required".into())),
        ..Default::default()
    };
    let sink = sink(true, true, faults).await;
    let mut s = transport(&sink).connect(0).await.unwrap();
    let env = Envelope {
        recipient_id: 1,
        from: "b@example.com".into(),
        to: "x@example.com".into(),
        eight_bit: false,
    };
    let o = s.send(&env, b"Subject: x\r\n\r\nx\r\n").await.unwrap();
    assert_eq!((o.status(), o.reply().code), (Status::Failed, Some(530)));
}

/// Issue 14: a message made of lines that start with "." (and "..", and a
/// lone "."), arrives intact over DATA (stuffed and unstuffed) and over
/// BDAT (nothing to stuff).
async fn dot_lines(chunking: bool) {
    let sink = sink(true, chunking, Faults::default()).await;
    let t = transport(&sink);
    let mut s = t.connect(0).await.unwrap();
    let mut msg = String::from("Subject: dots\r\n\r\n");
    for i in 0..500 {
        msg.push_str(match i % 4 {
            0 => ".\r\n",
            1 => "..\r\n",
            2 => ".line with a dot\r\n",
            _ => "...three\r\n",
        });
    }
    let env = Envelope {
        recipient_id: 1,
        from: "b@example.com".into(),
        to: "r@example.com".into(),
        eight_bit: false,
    };
    let outcome = s.send(&env, msg.as_bytes()).await.unwrap();
    assert_eq!(outcome.status(), Status::Sent, "{outcome:?}");
    // No line starting with ".", no final CRLF: written as it is, with the
    // CRLF added before the end of data.
    let plain = "Subject: plain\r\n\r\nno dots. here\r\nlast line";
    let outcome = s.send(&env, plain.as_bytes()).await.unwrap();
    assert_eq!(outcome.status(), Status::Sent, "{outcome:?}");
    s.close().await;
    let got = sink.received();
    assert_eq!(got.len(), 2);
    assert_eq!(got[0].data, msg.as_bytes(), "content survives");
    let expected = match chunking {
        true => plain.to_string(),
        false => format!("{plain}\r\n"),
    };
    assert_eq!(String::from_utf8_lossy(&got[1].data), expected);
}

#[tokio::test]
async fn lines_of_dots_arrive_intact_over_data() {
    dot_lines(false).await;
}

#[tokio::test]
async fn lines_of_dots_arrive_intact_over_bdat() {
    dot_lines(true).await;
}
