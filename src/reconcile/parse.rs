//! Postfix's log, one line at a time: which lines say what became of a
//! recipient. Pure: no I/O, no database, no clock (a classic syslog
//! timestamp has no year; [`Stamp::resolve`] takes "now" from the caller).
//!
//! Reads both the classic syslog form (`Dec  5 21:51:35 host
//! postfix/smtp[123]: ...`, also with a zero-padded day as Postfix's own
//! `maillog_file` writes it) and RFC 3339 timestamps (`2026-12-05T21:51:35.123456+00:00`,
//! rsyslog's high-precision format), under any `syslog_name`
//! (`postfix-blast/smtp`, multi-instance setups). What it recognizes:
//!
//! - a delivery agent's `QID: to=<..>, [orig_to=<..>,] relay=.., delay=..,
//!   dsn=X.Y.Z, status=sent|bounced|deferred (text)`;
//! - qmgr's `QID: from=<..>, status=expired, returned to sender`;
//! - qmgr's `QID: removed` (the queue file is gone: nothing more follows).
//!
//! Every other well-formed line is `Ok(None)`; a line that is not a log line
//! at all, or a delivery record cut short or garbled, is [`Malformed`].

use time::{Month, OffsetDateTime, PrimitiveDateTime};

/// Postfix programs that log a recipient's delivery status.
const DELIVERY_AGENTS: &[&str] = &[
    "smtp", "lmtp", "local", "virtual", "pipe", "error", "discard", "retry",
];
/// Other Postfix programs that log per queue id (nothing of ours but
/// qmgr's `expired` and `removed`).
const QUEUE_DAEMONS: &[&str] = &[
    "qmgr",
    "cleanup",
    "bounce",
    "smtpd",
    "pickup",
    "postsuper",
    "trivial-rewrite",
];

/// A line that could not be read as what it claims to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("malformed log line: {0}")]
pub struct Malformed(pub &'static str);

/// When a line was logged, as written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stamp {
    /// A full timestamp with its offset (RFC 3339).
    Full(OffsetDateTime),
    /// A classic syslog timestamp: month, day and time, no year, no zone.
    NoYear {
        /// Month of the year.
        month: Month,
        /// Day of the month.
        day: u8,
        /// Hour, minute, second.
        hms: (u8, u8, u8),
    },
}

impl Stamp {
    /// The instant, in UTC. A classic timestamp is read as UTC in the year
    /// of `now`, or the year before when that would put it more than a day
    /// after `now` (a December log read in January). `None` for a date
    /// that does not exist (29 February of a common year).
    pub fn resolve(self, now: OffsetDateTime) -> Option<OffsetDateTime> {
        match self {
            Stamp::Full(t) => Some(t.to_offset(time::UtcOffset::UTC)),
            Stamp::NoYear { month, day, hms } => {
                let at = |year| {
                    let date = time::Date::from_calendar_date(year, month, day).ok()?;
                    let time = time::Time::from_hms(hms.0, hms.1, hms.2).ok()?;
                    Some(PrimitiveDateTime::new(date, time).assume_utc())
                };
                match at(now.year()) {
                    Some(t) if t <= now + time::Duration::DAY => Some(t),
                    _ => at(now.year() - 1),
                }
            }
        }
    }
}

/// What a recipient's delivery attempt ended as, in Postfix's words.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// `status=sent`: the next hop took it.
    Sent,
    /// `status=bounced`: refused for good; a bounce goes to the sender.
    Bounced,
    /// `status=deferred` (or `SOFTBOUNCE`): tried again later.
    Deferred,
}

/// One `to=` record of a delivery agent.
#[derive(Debug, Clone, PartialEq)]
pub struct Delivery<'a> {
    /// The address as Postfix delivered to it (after any rewriting).
    pub to: &'a str,
    /// The address as it was given to Postfix, when rewriting changed it.
    pub orig_to: Option<&'a str>,
    /// `relay=`, the next hop (`none` when there was none).
    pub relay: Option<&'a str>,
    /// `delay=`, seconds from arrival to this attempt's end.
    pub delay: Option<f64>,
    /// `dsn=`, the RFC 3463 status.
    pub dsn: Option<&'a str>,
    /// What happened.
    pub status: Status,
    /// The parenthesized text after the status: the remote reply or the
    /// reason (without the parentheses; cut short if the line was).
    pub text: &'a str,
}

impl Delivery<'_> {
    /// The address blast injected: `orig_to` if Postfix rewrote it, else `to`.
    pub fn recipient(&self) -> &str {
        self.orig_to.unwrap_or(self.to)
    }
}

/// What a line says about one queue file.
#[derive(Debug, Clone, PartialEq)]
pub enum Record<'a> {
    /// A recipient's delivery attempt ended.
    Delivery(Delivery<'a>),
    /// qmgr gave up on the message's remaining recipients
    /// (`maximal_queue_lifetime`) and returned it to the sender.
    Expired,
    /// The queue file is gone: no more records for this queue id.
    Removed,
}

/// One line that concerns a queue file.
#[derive(Debug, Clone, PartialEq)]
pub struct Event<'a> {
    /// When it was logged.
    pub at: Stamp,
    /// The Postfix queue id (short hex or long form).
    pub queue_id: &'a str,
    /// What it says.
    pub record: Record<'a>,
}

/// Reads one log line (without its line end). `Ok(None)` for lines that say
/// nothing about a recipient's delivery: other programs, other Postfix
/// records, blank lines.
pub fn parse_line(line: &str) -> Result<Option<Event<'_>>, Malformed> {
    let line = line.trim_end_matches(['\r', '\n']);
    if line.trim().is_empty() {
        return Ok(None);
    }
    let (at, rest) = stamp(line)?;
    let rest = rest.trim_start_matches(' ');
    let (_host, rest) = rest.split_once(' ').ok_or(Malformed("no host"))?;
    let (program, message) = rest.split_once(": ").ok_or(Malformed("no program name"))?;
    // `syslog_name/daemon[pid]` (the pid may be missing).
    let program = program.split_once('[').map_or(program, |(p, _)| p);
    let Some((_syslog_name, daemon)) = program.rsplit_once('/') else {
        return Ok(None);
    };
    let delivery_agent = DELIVERY_AGENTS.contains(&daemon);
    if !delivery_agent && !QUEUE_DAEMONS.contains(&daemon) {
        return Ok(None);
    }
    let Some((queue_id, body)) = message.split_once(": ") else {
        return Ok(None);
    };
    if !is_queue_id(queue_id) {
        return Ok(None);
    }
    let record = if delivery_agent && body.starts_with("to=<") {
        match delivery(body)? {
            Some(d) => Record::Delivery(d),
            None => return Ok(None),
        }
    } else if daemon == "qmgr" && body == "removed" {
        Record::Removed
    } else if daemon == "qmgr" && body.starts_with("from=<") && body.contains(", status=expired") {
        Record::Expired
    } else {
        return Ok(None);
    };
    Ok(Some(Event {
        at,
        queue_id,
        record,
    }))
}

/// A Postfix queue id: 5 to 20 letters and digits (short ids are upper-case
/// hex, long ones mixed case), not a word Postfix logs in that place.
fn is_queue_id(s: &str) -> bool {
    (5..=20).contains(&s.len())
        && s.bytes().all(|b| b.is_ascii_alphanumeric())
        && !matches!(
            s,
            "NOQUEUE" | "warning" | "error" | "fatal" | "panic" | "statistics"
        )
}

/// The timestamp at the start of `line` and what follows it.
fn stamp(line: &str) -> Result<(Stamp, &str), Malformed> {
    let first = line.split(' ').next().unwrap_or("");
    if first.len() >= 19 && first.as_bytes()[4] == b'-' {
        let t = OffsetDateTime::parse(first, &time::format_description::well_known::Rfc3339)
            .map_err(|_| Malformed("bad RFC 3339 timestamp"))?;
        return Ok((Stamp::Full(t), &line[first.len()..]));
    }
    // "Dec  5 21:51:35" or "Dec 05 21:51:35".
    let month = match line.get(..4) {
        Some(m) if m.ends_with(' ') => month(&m[..3]).ok_or(Malformed("no timestamp"))?,
        _ => return Err(Malformed("no timestamp")),
    };
    let rest = line[4..].trim_start_matches(' ');
    let (day, rest) = rest.split_once(' ').ok_or(Malformed("no time"))?;
    let day: u8 = day.parse().map_err(|_| Malformed("bad day"))?;
    let (hms, rest) = rest
        .split_once(' ')
        .ok_or(Malformed("nothing after the time"))?;
    let mut parts = hms.splitn(3, ':').map(|p| p.parse::<u8>());
    let (Some(Ok(h)), Some(Ok(m)), Some(Ok(s))) = (parts.next(), parts.next(), parts.next()) else {
        return Err(Malformed("bad time"));
    };
    if !(1..=31).contains(&day) || h > 23 || m > 59 || s > 60 {
        return Err(Malformed("bad date or time"));
    }
    Ok((
        Stamp::NoYear {
            month,
            day,
            hms: (h, m, s.min(59)),
        },
        rest,
    ))
}

/// A syslog month abbreviation.
fn month(s: &str) -> Option<Month> {
    use Month::*;
    Some(match s {
        "Jan" => January,
        "Feb" => February,
        "Mar" => March,
        "Apr" => April,
        "May" => May,
        "Jun" => June,
        "Jul" => July,
        "Aug" => August,
        "Sep" => September,
        "Oct" => October,
        "Nov" => November,
        "Dec" => December,
        _ => return None,
    })
}

/// A delivery agent's record after the queue id: `to=<..>, key=value, ...,
/// status=WORD (text)`; `None` for an address verification probe.
fn delivery(body: &str) -> Result<Option<Delivery<'_>>, Malformed> {
    let (to, rest) = address(&body[3..]).ok_or(Malformed("to=<..> not closed"))?;
    // The fields before status= hold no ", status=" (addresses are in <>,
    // the rest are numbers and host names); the text after it may hold anything.
    let (fields, status) = rest
        .split_once("status=")
        .ok_or(Malformed("delivery record without status="))?;
    let mut d = Delivery {
        to,
        orig_to: None,
        relay: None,
        delay: None,
        dsn: None,
        status: Status::Sent,
        text: "",
    };
    let mut fields = fields;
    while let Some((key, value)) = fields.trim_start_matches([',', ' ']).split_once('=') {
        let key = key.trim();
        if value.starts_with('<') {
            let (addr, after) = address(value).ok_or(Malformed("<address> not closed"))?;
            if key == "orig_to" {
                d.orig_to = Some(addr);
            }
            fields = after;
            continue;
        }
        let (value, after) = value.split_once(',').unwrap_or((value, ""));
        let value = value.trim();
        match key {
            "relay" => d.relay = Some(value),
            "delay" => d.delay = value.parse().ok(),
            "dsn" => d.dsn = Some(value).filter(|v| dsn_shaped(v)),
            _ => {}
        }
        fields = after;
    }
    let (word, text) = status.split_once(' ').unwrap_or((status, ""));
    d.status = match word.trim_end_matches(',') {
        "sent" => Status::Sent,
        "bounced" => Status::Bounced,
        "deferred" | "SOFTBOUNCE" => Status::Deferred,
        // Address verification probes (sendmail -bv, verify(8)) deliver nothing.
        "deliverable" | "undeliverable" => return Ok(None),
        _ => return Err(Malformed("unknown status")),
    };
    // "(250 2.0.0 Ok: queued as ABC)": the outer parentheses; the text may
    // hold more of them, and a line cut short may lose the closing one.
    let text = text.trim();
    let text = text.strip_prefix('(').unwrap_or(text);
    d.text = text.strip_suffix(')').unwrap_or(text);
    Ok(Some(d))
}

/// `<addr>` at the start of `s`, and what follows the `>`.
fn address(s: &str) -> Option<(&str, &str)> {
    let s = s.strip_prefix('<')?;
    // A quoted local part may hold '>'; the address ends at the last '>'
    // before the next field separator.
    let end = s.find(">,").or_else(|| s.rfind('>'))?;
    Some((&s[..end], &s[end + 1..]))
}

/// `X.Y.Z` with a class digit and 1-3 digits each after.
fn dsn_shaped(s: &str) -> bool {
    let mut parts = s.split('.');
    let ok = |p: Option<&str>, max: usize| {
        p.is_some_and(|p| (1..=max).contains(&p.len()) && p.bytes().all(|b| b.is_ascii_digit()))
    };
    ok(parts.next(), 1) && ok(parts.next(), 3) && ok(parts.next(), 3) && parts.next().is_none()
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    fn parse(b: &[u8]) -> Result<Option<Event<'_>>, Malformed> {
        parse_line(std::str::from_utf8(b).unwrap())
    }

    fn delivery_of<'a>(e: &'a Event<'a>) -> &'a Delivery<'a> {
        match &e.record {
            Record::Delivery(d) => d,
            r => panic!("not a delivery: {r:?}"),
        }
    }

    #[test]
    fn classic_syslog_sent_line() {
        let e = parse(b"Dec  5 21:51:35 host postfix/smtp[123]: 4XyZ1234: to=<a@b.example>, relay=mx.b.example[1.2.3.4]:25, delay=1.2, delays=0.1/0/0.5/0.6, dsn=2.0.0, status=sent (250 2.0.0 Ok: queued as ABC)")
            .unwrap()
            .unwrap();
        assert_eq!(e.queue_id, "4XyZ1234");
        assert_eq!(
            e.at,
            Stamp::NoYear {
                month: Month::December,
                day: 5,
                hms: (21, 51, 35)
            }
        );
        let d = delivery_of(&e);
        assert_eq!(d.to, "a@b.example");
        assert_eq!(d.recipient(), "a@b.example");
        assert_eq!(d.relay, Some("mx.b.example[1.2.3.4]:25"));
        assert_eq!(d.delay, Some(1.2));
        assert_eq!(d.dsn, Some("2.0.0"));
        assert_eq!(d.status, Status::Sent);
        assert_eq!(d.text, "250 2.0.0 Ok: queued as ABC");
    }

    #[test]
    fn postfix_maillog_file_line_with_zero_padded_day_and_instance_name() {
        // What scripts/mta/postfix.sh's Postfix 3.7 writes to its maillog_file.
        let e = parse(b"Dec 05 21:58:14 vm postfix-blast/smtp[22576]: 4jhj0k5TKbz2NP3: to=<bad1@example.com>, relay=127.0.0.1[127.0.0.1]:27001, delay=0.03, delays=0/0.02/0.01/0, dsn=5.1.1, status=bounced (host 127.0.0.1[127.0.0.1] said: 550 5.1.1 Recipient address rejected (blast sink fault injection) (in reply to RCPT TO command))")
            .unwrap()
            .unwrap();
        assert_eq!(e.queue_id, "4jhj0k5TKbz2NP3");
        let d = delivery_of(&e);
        assert_eq!(d.status, Status::Bounced);
        assert_eq!(d.dsn, Some("5.1.1"));
        // Parentheses inside the reply stay; only the outer pair goes.
        assert_eq!(
            d.text,
            "host 127.0.0.1[127.0.0.1] said: 550 5.1.1 Recipient address rejected \
             (blast sink fault injection) (in reply to RCPT TO command)"
        );
        let now = datetime!(2026-12-06 00:00 UTC);
        assert_eq!(e.at.resolve(now), Some(datetime!(2026-12-05 21:58:14 UTC)));
    }

    #[test]
    fn rfc3339_timestamps() {
        let e = parse(b"2026-12-05T21:51:35.123456+01:00 host postfix/lmtp[9]: ABCDEF123: to=<x@y.example>, relay=lmtp.example[10.0.0.1]:24, delay=0.5, delays=0/0/0/0.5, dsn=4.2.2, status=deferred (host said: 452 4.2.2 Mailbox full)")
            .unwrap()
            .unwrap();
        assert_eq!(
            e.at.resolve(datetime!(2030-01-01 0:00 UTC)),
            Some(datetime!(2026-12-05 20:51:35.123456 UTC))
        );
        let d = delivery_of(&e);
        assert_eq!(d.status, Status::Deferred);
        assert_eq!(d.text, "host said: 452 4.2.2 Mailbox full");
        assert!(matches!(
            parse(b"2026-13-05T21:51:35Z host postfix/smtp[1]: ABCDEF1: removed"),
            Err(Malformed(_))
        ));
    }

    #[test]
    fn a_december_line_read_in_january_is_last_year() {
        let s = Stamp::NoYear {
            month: Month::December,
            day: 31,
            hms: (23, 59, 0),
        };
        assert_eq!(
            s.resolve(datetime!(2027-01-01 0:05 UTC)),
            Some(datetime!(2026-12-31 23:59 UTC))
        );
    }

    #[test]
    fn orig_to_is_the_injected_recipient() {
        let e = parse(b"Dec  5 21:51:35 h postfix/local[7]: ABCDE12345: to=<root@h.example>, orig_to=<Postmaster@H.example>, relay=local, delay=0.01, delays=0/0/0/0, dsn=2.0.0, status=sent (delivered to mailbox)")
            .unwrap()
            .unwrap();
        let d = delivery_of(&e);
        assert_eq!(d.to, "root@h.example");
        assert_eq!(d.recipient(), "Postmaster@H.example");
        assert_eq!(d.relay, Some("local"));
    }

    #[test]
    fn qmgr_expired_and_removed() {
        let e = parse(b"Dec  5 21:51:35 host postfix-out/qmgr[55]: 4XyZ12345: from=<news@example.com>, status=expired, returned to sender")
            .unwrap()
            .unwrap();
        assert_eq!((e.queue_id, e.record), ("4XyZ12345", Record::Expired));
        let e = parse(b"Dec  5 21:51:35 host postfix/qmgr[55]: 4XyZ12345: removed")
            .unwrap()
            .unwrap();
        assert_eq!(e.record, Record::Removed);
        // The queue-active record is not an outcome.
        assert_eq!(
            parse(b"Dec  5 21:51:35 host postfix/qmgr[55]: 4XyZ12345: from=<a@b.example>, size=308, nrcpt=1 (queue active)"),
            Ok(None)
        );
    }

    #[test]
    fn other_postfix_records_and_programs_are_not_outcomes() {
        for line in [
            &b"Dec  5 21:51:35 host postfix/smtpd[1]: 4XyZ12345: client=unknown[127.0.0.1]"[..],
            b"Dec  5 21:51:35 host postfix/cleanup[1]: 4XyZ12345: message-id=<x@y>",
            b"Dec  5 21:51:35 host postfix/bounce[1]: 4XyZ12345: sender non-delivery notification: 4XyZ99999",
            b"Dec  5 21:51:35 host postfix/smtpd[1]: connect from unknown[127.0.0.1]",
            b"Dec  5 21:51:35 host postfix/smtpd[1]: NOQUEUE: reject: RCPT from x: 554 5.7.1 <a@b>: Relay access denied",
            b"Dec  5 21:51:35 host postfix/smtp[1]: warning: no MX host for example.invalid",
            // Unknown daemons and other programs, even with a to= record.
            b"Dec  5 21:51:35 host postfix/anvil[1]: statistics: max connection rate 1/60s",
            b"Dec  5 21:51:35 host postfix/frobnicate[1]: 4XyZ12345: to=<a@b.example>, status=sent (ok)",
            b"Dec  5 21:51:35 host sshd[99]: Accepted publickey for root",
            b"Dec  5 21:51:35 host kernel: something happened",
            b"",
            b"   ",
        ] {
            assert_eq!(parse(line), Ok(None), "{}", String::from_utf8_lossy(line));
        }
    }

    #[test]
    fn garbage_and_truncated_lines_are_malformed() {
        for line in [
            &b"garbage"[..],
            b"\x00\x01binary",
            b"Foo  5 21:51:35 host postfix/smtp[1]: ABCDEF1: removed",
            b"Dec 45 21:51:35 host postfix/smtp[1]: ABCDEF1: removed",
            b"Dec  5 21:51",
            b"Dec  5 21:51:35",
            b"Dec  5 21:51:35 host",
            // Cut inside the record: no status, unclosed address, cut status word.
            b"Dec  5 21:51:35 host postfix/smtp[1]: ABCDEF1: to=<a@b.example>, relay=mx[1.2.3.4]:25, del",
            b"Dec  5 21:51:35 host postfix/smtp[1]: ABCDEF1: to=<a@b.exa",
            b"Dec  5 21:51:35 host postfix/smtp[1]: ABCDEF1: to=<a@b.example>, relay=x, dsn=2.0.0, status=se",
        ] {
            assert!(
                matches!(parse(line), Err(Malformed(_))),
                "{}",
                String::from_utf8_lossy(line)
            );
        }
    }

    #[test]
    fn a_reply_cut_short_keeps_what_is_there() {
        let e = parse(b"Dec  5 21:51:35 host postfix/smtp[1]: ABCDEF1: to=<a@b.example>, relay=x[1.2.3.4]:25, delay=3, delays=0/0/0/3, dsn=4.4.2, status=deferred (conversation with x[1.2.3.4] timed out while")
            .unwrap()
            .unwrap();
        let d = delivery_of(&e);
        assert_eq!(d.status, Status::Deferred);
        assert_eq!(d.text, "conversation with x[1.2.3.4] timed out while");
        assert_eq!(d.delay, Some(3.0));
    }

    #[test]
    fn status_text_with_status_words_and_commas_inside() {
        let e = parse(b"Dec  5 21:51:35 host postfix/smtp[1]: ABCDEF1: to=<\"odd,name\"@b.example>, relay=x[1.2.3.4]:25, delay=1, delays=0/0/0/1, dsn=5.7.1, status=bounced (host x said: 550 5.7.1 status=sent, (not really), see https://x.example/(a))")
            .unwrap()
            .unwrap();
        let d = delivery_of(&e);
        assert_eq!(d.to, "\"odd,name\"@b.example");
        assert_eq!(d.status, Status::Bounced);
        assert_eq!(
            d.text,
            "host x said: 550 5.7.1 status=sent, (not really), see https://x.example/(a)"
        );
    }

    #[test]
    fn soft_bounce_mode_is_deferred_and_verify_probes_are_not_outcomes() {
        let e = parse(b"Dec  5 21:51:35 h postfix/smtp[1]: ABCDEF1: to=<a@b.example>, relay=x, delay=1, dsn=5.1.1, status=SOFTBOUNCE (host x said: 550 5.1.1 unknown)")
            .unwrap()
            .unwrap();
        assert_eq!(delivery_of(&e).status, Status::Deferred);
        assert_eq!(parse(b"Dec  5 21:51:35 h postfix/smtp[1]: ABCDEF1: to=<a@b.example>, relay=x, delay=1, dsn=2.0.0, status=deliverable (250 ok)"), Ok(None));
    }

    #[test]
    fn a_bad_dsn_is_left_out() {
        let e = parse(b"Dec  5 21:51:35 h postfix/error[1]: ABCDEF1: to=<a@b.example>, relay=none, delay=1, dsn=5.x.1, status=bounced (mail for b.example loops back to myself)")
            .unwrap()
            .unwrap();
        let d = delivery_of(&e);
        assert_eq!((d.dsn, d.relay), (None, Some("none")));
    }
}
