//! The MIME writer: one message written once, front to back, into the
//! buffer the injector sends from. Header fields are folded and RFC 2047
//! encoded here, body parts get the lightest transfer encoding their bytes
//! allow (`7bit`, `8bit`, quoted-printable), and every encoder copies whole
//! runs of bytes that need no work, not one byte at a time. This module knows
//! nothing of templates or recipients: it writes what it is given.

use base64::Engine as _;
use memchr::memchr;

/// Lines of the header section are folded to stay under this length where
/// the text allows (RFC 5322 2.1.1's "SHOULD"); 998 is the hard limit.
const FOLD_AT: usize = 78;

/// UTF-8 bytes per RFC 2047 encoded word: 45 bytes are 60 base64 characters,
/// 72 with `=?utf-8?B?` and `?=`, within the 75 allowed.
const WORD_BYTES: usize = 45;

/// A body's transfer encoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Encoding {
    /// ASCII, lines of at most 998 octets: copied with CRLF line ends.
    SevenBit,
    /// UTF-8 as it is (RFC 6152), lines of at most 998 octets.
    EightBit,
    /// Anything else.
    QuotedPrintable,
}

impl Encoding {
    /// The lightest encoding for `text`; `eight_bit` when every relay takes
    /// 8BITMIME.
    pub(super) fn choose(text: &str, eight_bit: bool) -> Encoding {
        let ascii = text.is_ascii();
        match short_lines(text.as_bytes()) {
            true if ascii => Encoding::SevenBit,
            true if eight_bit => Encoding::EightBit,
            _ => Encoding::QuotedPrintable,
        }
    }

    /// The `Content-Transfer-Encoding` value.
    pub(super) fn name(self) -> &'static str {
        match self {
            Encoding::SevenBit => "7bit",
            Encoding::EightBit => "8bit",
            Encoding::QuotedPrintable => "quoted-printable",
        }
    }

    /// Appends `text` in this encoding to `out`, ending with CRLF.
    pub(super) fn write(self, text: &str, out: &mut Vec<u8>) {
        match self {
            Encoding::SevenBit | Encoding::EightBit => crlf_lines(text.as_bytes(), out),
            Encoding::QuotedPrintable => quoted_printable(text, out),
        }
        if !out.ends_with(b"\r\n") {
            out.extend_from_slice(b"\r\n");
        }
    }
}

/// Writes one text part: its header fields, a blank line, and `text` in
/// the lightest transfer encoding its bytes allow (`8bit` only when
/// `eight_bit`). Text without CR or NUL, the usual case, is copied with CRLF
/// line ends in the same pass that checks its line lengths; anything else
/// (or a line over 998 octets) goes through [`Encoding::choose`].
pub(super) fn text_part(
    out: &mut Vec<u8>,
    content_type: &str,
    text: &str,
    eight_bit: bool,
) -> Encoding {
    let ascii = text.is_ascii();
    if (ascii || eight_bit) && memchr::memchr2(0, b'\r', text.as_bytes()).is_none() {
        let encoding = match ascii {
            true => Encoding::SevenBit,
            false => Encoding::EightBit,
        };
        let mark = out.len();
        part_headers(out, content_type, encoding);
        out.extend_from_slice(b"\r\n");
        if crlf_short_lines(text.as_bytes(), out) {
            if !out.ends_with(b"\r\n") {
                out.extend_from_slice(b"\r\n");
            }
            return encoding;
        }
        out.truncate(mark);
    }
    let encoding = Encoding::choose(text, eight_bit);
    part_headers(out, content_type, encoding);
    out.extend_from_slice(b"\r\n");
    encoding.write(text, out);
    encoding
}

/// Copies `text` (no CR) with CRLF line ends; false, with `out` partly
/// written, as soon as a line exceeds 998 octets.
fn crlf_short_lines(text: &[u8], out: &mut Vec<u8>) -> bool {
    out.reserve(text.len() + text.len() / 16 + 2);
    let mut start = 0;
    for end in memchr::memchr_iter(b'\n', text) {
        if end - start > 998 {
            return false;
        }
        out.extend_from_slice(&text[start..end]);
        out.extend_from_slice(b"\r\n");
        start = end + 1;
    }
    if text.len() - start > 998 {
        return false;
    }
    out.extend_from_slice(&text[start..]);
    true
}

/// Whether `text` may travel unencoded (RFC 2045 2.7/2.8): no NUL, no CR
/// except before LF, and no line longer than 998 octets.
fn short_lines(text: &[u8]) -> bool {
    if memchr(0, text).is_some() {
        return false;
    }
    let mut rest = text;
    loop {
        let end = memchr(b'\n', rest).unwrap_or(rest.len());
        let line = &rest[..end];
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.len() > 998 || memchr(b'\r', line).is_some() {
            return false;
        }
        if end == rest.len() {
            return true;
        }
        rest = &rest[end + 1..];
    }
}

/// Copies `text` with every line end made CRLF, a line at a time.
fn crlf_lines(text: &[u8], out: &mut Vec<u8>) {
    let mut rest = text;
    while let Some(end) = memchr(b'\n', rest) {
        let line = &rest[..end];
        out.extend_from_slice(line.strip_suffix(b"\r").unwrap_or(line));
        out.extend_from_slice(b"\r\n");
        rest = &rest[end + 1..];
    }
    out.extend_from_slice(rest);
}

/// Bytes quoted-printable may carry as they are (RFC 2045 6.7 rule 2):
/// printable ASCII but `=`. Space and tab are literal too unless they end
/// a line, which the encoder checks.
const QP_LITERAL: [bool; 256] = {
    let mut t = [false; 256];
    let mut b = 33;
    while b <= 126 {
        t[b] = b != b'=' as usize;
        b += 1;
    }
    t[b' ' as usize] = true;
    t[b'\t' as usize] = true;
    t
};

/// RFC 2045 quoted-printable with CRLF line ends and encoded lines of at
/// most 76 characters (soft breaks `=` CRLF). Table-driven: each run of
/// literal bytes is copied whole, up to the room left on the line.
pub fn quoted_printable(text: &str, out: &mut Vec<u8>) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let bytes = text.as_bytes();
    out.reserve(bytes.len() + bytes.len() / 8);
    let mut line = 0;
    let mut i = 0;
    while i < bytes.len() {
        // The longest literal run from here, at most to the line's end and
        // to the room left (75 characters before a soft break).
        let room = 75 - line;
        let mut j = i;
        while j < bytes.len() && j - i < room && QP_LITERAL[bytes[j] as usize] {
            j += 1;
        }
        // Whitespace before a line end (or the end) must be encoded or it
        // may be stripped on the way: leave it for the slow path.
        while j > i && matches!(bytes[j - 1], b' ' | b'\t') && at_eol(bytes, j) {
            j -= 1;
        }
        if j > i {
            out.extend_from_slice(&bytes[i..j]);
            line += j - i;
            i = j;
            continue;
        }
        let b = bytes[i];
        let crlf = b == b'\r' && bytes.get(i + 1) == Some(&b'\n');
        if b == b'\n' || crlf {
            out.extend_from_slice(b"\r\n");
            line = 0;
            i += if crlf { 2 } else { 1 };
            continue;
        }
        let literal =
            QP_LITERAL[b as usize] && !(matches!(b, b' ' | b'\t') && at_eol(bytes, i + 1));
        let width = if literal { 1 } else { 3 };
        if line + width > 75 {
            out.extend_from_slice(b"=\r\n");
            line = 0;
            continue;
        }
        if literal {
            out.push(b);
        } else {
            out.extend_from_slice(&[b'=', HEX[(b >> 4) as usize], HEX[(b & 15) as usize]]);
        }
        line += width;
        i += 1;
    }
}

/// Whether position `i` of `bytes` is a line end (LF, CRLF) or the end.
fn at_eol(bytes: &[u8], i: usize) -> bool {
    match bytes.get(i) {
        None | Some(b'\n') => true,
        Some(b'\r') => bytes.get(i + 1) == Some(&b'\n'),
        _ => false,
    }
}

/// A header field being written: tracks the current line's length so
/// words fold before the line grows past [`FOLD_AT`].
struct Field<'o> {
    out: &'o mut Vec<u8>,
    line: usize,
}

impl<'o> Field<'o> {
    /// Starts `name: `.
    fn new(out: &'o mut Vec<u8>, name: &str) -> Field<'o> {
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(b": ");
        Field {
            line: name.len() + 2,
            out,
        }
    }

    /// Appends `word`, preceded by a space (folded into CRLF SP when the
    /// line would grow too long) unless it is the field's first word.
    fn word(&mut self, word: &[u8], first: bool) {
        if !first {
            if self.line + 1 + word.len() > FOLD_AT {
                self.out.extend_from_slice(b"\r\n");
                self.line = 0;
            }
            self.out.push(b' ');
            self.line += 1;
        }
        self.out.extend_from_slice(word);
        self.line += word.len();
    }

    /// Appends `text` as RFC 2047 `B` encoded words, each on its own folded
    /// line after the first; `first` as for [`Field::word`].
    fn encoded(&mut self, text: &str, mut first: bool) {
        let mut word = Vec::with_capacity(80);
        let mut rest = text;
        while !rest.is_empty() {
            // Never split a character across two words (RFC 2047 5).
            // Fill the current line when a useful part of a word fits on
            // it; otherwise a whole word goes on the next line.
            let room = FOLD_AT.saturating_sub(self.line + usize::from(!first) + 12) / 4 * 3;
            let max = if room >= 12 {
                room.min(WORD_BYTES)
            } else {
                WORD_BYTES
            };
            let mut cut = rest.len().min(max);
            while !rest.is_char_boundary(cut) {
                cut -= 1;
            }
            word.clear();
            word.extend_from_slice(b"=?utf-8?B?");
            let at = word.len();
            word.resize(at + base64_len(cut), 0);
            let n = base64::engine::general_purpose::STANDARD
                .encode_slice(&rest.as_bytes()[..cut], &mut word[at..])
                .unwrap_or_else(|_| unreachable!("the buffer is sized for the input"));
            word.truncate(at + n);
            word.extend_from_slice(b"?=");
            self.word(&word, first);
            first = false;
            rest = &rest[cut..];
        }
    }

    /// Ends the field.
    fn end(self) {
        self.out.extend_from_slice(b"\r\n");
    }
}

/// Base64 length of `n` bytes.
fn base64_len(n: usize) -> usize {
    n.div_ceil(3) * 4
}

/// Whether an unstructured value can go as it is: printable ASCII (and
/// spaces), no word too long to fold, nothing a reader would take for an
/// encoded word.
fn plain(value: &str) -> bool {
    value.bytes().all(|b| (b' '..=b'~').contains(&b))
        && !value.contains("=?")
        && value.split(' ').all(|w| w.len() <= 900)
}

/// `name: value` for unstructured text (Subject, X- fields): as it is,
/// folded at spaces, when it is plain ASCII; RFC 2047 encoded otherwise.
/// `value` must be one line already (see `render::one_line`).
pub(super) fn unstructured(out: &mut Vec<u8>, name: &str, value: &str) {
    let mut f = Field::new(out, name);
    if plain(value) {
        for (i, w) in value.split(' ').filter(|w| !w.is_empty()).enumerate() {
            f.word(w.as_bytes(), i == 0);
        }
    } else {
        f.encoded(value, true);
    }
    f.end();
}

/// `name: "Display Name" <addr>` (or `name: addr` without a name). A
/// non-ASCII name goes as encoded words. `addr` is an ASCII address.
pub(super) fn mailbox(out: &mut Vec<u8>, name: &str, display: Option<&str>, addr: &str) {
    let mut f = Field::new(out, name);
    let mut first = true;
    if let Some(display) = display.filter(|d| !d.is_empty()) {
        if plain(display) && display.len() < 200 {
            let mut quoted = Vec::with_capacity(display.len() + 4);
            quoted.push(b'"');
            for b in display.bytes() {
                if b == b'"' || b == b'\\' {
                    quoted.push(b'\\');
                }
                quoted.push(b);
            }
            quoted.push(b'"');
            f.word(&quoted, true);
        } else {
            f.encoded(display, true);
        }
        first = false;
    }
    let mut angle = Vec::with_capacity(addr.len() + 2);
    angle.push(b'<');
    angle.extend_from_slice(addr.as_bytes());
    angle.push(b'>');
    f.word(&angle, first);
    f.end();
}

/// `name: value` written exactly as given (a value blast made itself:
/// ids, signatures, Message-ID, dates). `value` must be one short line.
pub(super) fn raw(out: &mut Vec<u8>, name: &str, value: &str) {
    let f = Field::new(out, name);
    f.out.extend_from_slice(value.as_bytes());
    f.end();
}

/// `name: item, item, ...` with each item on its own folded line after
/// the first (List-Unsubscribe).
pub(super) fn list(out: &mut Vec<u8>, name: &str, items: &[&str]) {
    let f = Field::new(out, name);
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            f.out.extend_from_slice(b",\r\n ");
        }
        f.out.extend_from_slice(item.as_bytes());
    }
    f.end();
}

/// A text part's own header fields.
pub(super) fn part_headers(out: &mut Vec<u8>, content_type: &str, encoding: Encoding) {
    out.extend_from_slice(b"Content-Type: ");
    out.extend_from_slice(content_type.as_bytes());
    out.extend_from_slice(b"; charset=\"utf-8\"\r\nContent-Transfer-Encoding: ");
    out.extend_from_slice(encoding.name().as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// A multipart boundary that occurs in none of `parts`. It starts with
/// `=_`, which quoted-printable output can never contain; for parts sent
/// as they are, each candidate is checked against the text, and another is
/// tried on the (vanishingly rare, or hostile) match.
pub(super) fn boundary(seed: &str, parts: &[&str]) -> String {
    // Every boundary starts with this: parts without it (nearly all) need
    // no search per candidate.
    static PREFIX: std::sync::OnceLock<memchr::memmem::Finder<'static>> =
        std::sync::OnceLock::new();
    let prefix = PREFIX.get_or_init(|| memchr::memmem::Finder::new("=_blast_"));
    if parts.iter().all(|p| prefix.find(p.as_bytes()).is_none()) {
        return format!("=_blast_{seed}_0");
    }
    let mut n = 0u32;
    loop {
        let b = format!("=_blast_{seed}_{n}");
        if parts
            .iter()
            .all(|p| memchr::memmem::find(p.as_bytes(), b.as_bytes()).is_none())
        {
            return b;
        }
        n += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Decodes quoted-printable (test helper).
    pub(crate) fn qp_decode(s: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut i = 0;
        while i < s.len() {
            match s[i] {
                b'=' if s.get(i + 1) == Some(&b'\r') => i += 3,
                b'=' => {
                    let hex = std::str::from_utf8(&s[i + 1..i + 3]).unwrap();
                    out.push(u8::from_str_radix(hex, 16).unwrap());
                    i += 3;
                }
                b => {
                    out.push(b);
                    i += 1;
                }
            }
        }
        out
    }

    /// The byte-at-a-time encoder the table-driven one replaced: the
    /// definition the fast one must match exactly.
    fn qp_slow(text: &str) -> Vec<u8> {
        const HEX: &[u8; 16] = b"0123456789ABCDEF";
        let bytes = text.as_bytes();
        let mut out = Vec::new();
        let mut line = 0;
        let mut i = 0;
        while i < bytes.len() {
            let b = bytes[i];
            let crlf = b == b'\r' && bytes.get(i + 1) == Some(&b'\n');
            if b == b'\n' || crlf {
                out.extend_from_slice(b"\r\n");
                line = 0;
                i += if crlf { 2 } else { 1 };
                continue;
            }
            let literal = ((b == b' ' || b == b'\t') && !at_eol(bytes, i + 1))
                || ((33..=126).contains(&b) && b != b'=');
            let width = if literal { 1 } else { 3 };
            if line + width > 75 {
                out.extend_from_slice(b"=\r\n");
                line = 0;
            }
            if literal {
                out.push(b);
            } else {
                out.extend_from_slice(&[b'=', HEX[(b >> 4) as usize], HEX[(b & 15) as usize]]);
            }
            line += width;
            i += 1;
        }
        out
    }

    #[test]
    fn quoted_printable_round_trips_with_short_lines() {
        let long = "Grüße aus München = 100% ".repeat(20);
        let inputs = [
            "plain\nline two \nend".to_string(),
            long.clone(),
            format!("{long}\r\n\ttab at end\t\n.dot line\n"),
            "trailing space ".into(),
            "é".repeat(60),
            "x".repeat(200),
            format!("{} \n", "y".repeat(74)),
        ];
        for input in inputs {
            let mut out = Vec::new();
            quoted_printable(&input, &mut out);
            assert_eq!(out, qp_slow(&input), "{input:?}");
            for line in out.split(|&b| b == b'\n') {
                assert!(
                    line.len() <= 77,
                    "line too long: {}",
                    String::from_utf8_lossy(line)
                );
                let line = line.strip_suffix(b"\r").unwrap_or(line);
                assert!(
                    !line.ends_with(b" ") && !line.ends_with(b"\t"),
                    "trailing whitespace"
                );
            }
            assert!(out.is_ascii());
            let expected = input.replace("\r\n", "\n").replace('\n', "\r\n");
            assert_eq!(String::from_utf8(qp_decode(&out)).unwrap(), expected);
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(crate::props::ci_cases()))]
        /// The table-driven encoder writes exactly what the byte-at-a-time
        /// definition writes, for any text.
        #[test]
        fn quoted_printable_matches_its_definition(
            text in "(?s)[ -~\t\r\n=éß\u{1F600}]{0,400}"
        ) {
            let mut out = Vec::new();
            quoted_printable(&text, &mut out);
            proptest::prop_assert_eq!(out, qp_slow(&text));
        }
    }

    #[test]
    fn encodings_are_the_lightest_the_text_allows() {
        assert_eq!(Encoding::choose("a\nb\r\nc", false), Encoding::SevenBit);
        assert_eq!(
            Encoding::choose("caf\u{e9}", false),
            Encoding::QuotedPrintable
        );
        assert_eq!(Encoding::choose("caf\u{e9}", true), Encoding::EightBit);
        assert_eq!(
            Encoding::choose(&"x".repeat(999), true),
            Encoding::QuotedPrintable
        );
        assert_eq!(
            Encoding::choose(&"x".repeat(998), false),
            Encoding::SevenBit
        );
        assert_eq!(
            Encoding::choose("lone\rcr", true),
            Encoding::QuotedPrintable
        );
        assert_eq!(Encoding::choose("nul\0", true), Encoding::QuotedPrintable);
        let mut out = Vec::new();
        Encoding::SevenBit.write("a\nb\r\nc", &mut out);
        assert_eq!(out, b"a\r\nb\r\nc\r\n");
    }

    #[test]
    fn headers_fold_and_encode() {
        let mut out = Vec::new();
        unstructured(&mut out, "Subject", &"word ".repeat(40));
        let s = String::from_utf8(out).unwrap();
        assert!(s.lines().count() > 1, "{s}");
        assert!(s.split("\r\n").all(|l| l.len() <= FOLD_AT), "{s}");
        assert_eq!(
            s.replace("\r\n", "").trim_end(),
            format!("Subject: {}", "word ".repeat(40).trim_end())
        );

        let mut out = Vec::new();
        unstructured(&mut out, "Subject", &"é".repeat(100));
        let s = String::from_utf8(out).unwrap();
        assert!(s.is_ascii() && s.starts_with("Subject: =?utf-8?B?"), "{s}");
        assert!(s.split("\r\n").all(|l| l.len() <= FOLD_AT), "{s}");

        // A literal "=?" would be read as an encoded word: it is encoded.
        let mut out = Vec::new();
        unstructured(&mut out, "Subject", "=?utf-8?B?QQ==?=");
        assert!(String::from_utf8(out)
            .unwrap()
            .starts_with("Subject: =?utf-8?B?PT9"));

        let mut out = Vec::new();
        mailbox(&mut out, "To", Some("Eve \"the\" \\ one"), "e@example.com");
        assert_eq!(out, b"To: \"Eve \\\"the\\\" \\\\ one\" <e@example.com>\r\n");
    }

    #[test]
    fn boundaries_avoid_the_text() {
        let b = boundary("abc", &["no boundary here"]);
        assert_eq!(b, "=_blast_abc_0");
        let b = boundary("abc", &["x", "hostile =_blast_abc_0 and =_blast_abc_1"]);
        assert_eq!(b, "=_blast_abc_2");
    }

    /// The one-pass writer gives what choosing, then writing, gives.
    #[test]
    fn text_part_matches_choose_then_write() {
        let long = "y".repeat(998);
        let longer = "z".repeat(999);
        let texts = [
            String::new(),
            "plain\nlines\n".into(),
            "no final newline".into(),
            "Grüße\nà bientôt".into(),
            format!("a\n{long}\nb"),
            format!("a\n{longer}\nb"),
            format!("é{longer}"),
            long.clone(),
            "crlf\r\nlines\r\n".into(),
            "bare\rcr".into(),
            "nul\0byte".into(),
            "\n\n.\n".into(),
        ];
        for text in &texts {
            for eight_bit in [false, true] {
                let mut fast = b"X".to_vec();
                let enc = text_part(&mut fast, "text/plain", text, eight_bit);
                let mut slow = b"X".to_vec();
                let want = Encoding::choose(text, eight_bit);
                part_headers(&mut slow, "text/plain", want);
                slow.extend_from_slice(b"\r\n");
                want.write(text, &mut slow);
                assert_eq!(enc, want, "{text:?} {eight_bit}");
                assert_eq!(fast, slow, "{text:?} {eight_bit}");
            }
        }
    }
}
