//! Signed correlation: the installation's HMAC key, VERP signatures,
//! unsubscribe tokens, and the address patterns that carry them.
//!
//! A bounce or an unsubscribe can only suppress an address if it names a
//! campaign and recipient *and* carries a valid HMAC-SHA256 over them, so
//! nobody can unsubscribe or bounce someone else by guessing ids. The key
//! lives in the database (`blast_settings.hmac_key`), created on first use,
//! so every worker and `blast serve` sharing a database agree on it. This
//! module does not send, parse mail or answer HTTP.

use std::fmt;

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::db::Db;
use crate::error::{Error, Result};

/// Hex digits of a VERP signature (48 bits: short enough for a local part,
/// far beyond guessing by sending forged bounces).
pub const VERP_SIG_LEN: usize = 12;
/// Hex digits of an unsubscribe token's signature (80 bits: tokens are
/// public URLs and may be tried online).
pub const TOKEN_SIG_LEN: usize = 20;

/// The installation's signing key (32 random bytes). `Debug` hides it.
#[derive(Clone)]
pub struct Key {
    bytes: [u8; 32],
    /// HMAC-SHA256 with this key, its key schedule done once: every message
    /// signs twice (VERP and unsubscribe), and a clone of this state saves
    /// the two hash blocks of the key on each.
    keyed: Hmac<Sha256>,
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Key(..)")
    }
}

/// What a signature is for; a VERP signature is never a valid token and the
/// other way round.
#[derive(Debug, Clone, Copy)]
enum Purpose {
    Verp,
    Unsubscribe,
}

impl Key {
    /// A key from its 64-digit hex form.
    pub fn from_hex(hex: &str) -> Option<Key> {
        let bytes = decode_hex(hex.trim())?;
        Some(Key::new(bytes.try_into().ok()?))
    }

    /// A fresh random key.
    pub fn generate() -> Result<Key> {
        let mut bytes = [0u8; 32];
        getrandom::fill(&mut bytes).map_err(|e| Error::Internal(format!("random key: {e}")))?;
        Ok(Key::new(bytes))
    }

    fn new(bytes: [u8; 32]) -> Key {
        // The key is 32 bytes; HMAC accepts any length.
        let keyed = <Hmac<Sha256> as Mac>::new_from_slice(&bytes).expect("any key length");
        Key { bytes, keyed }
    }

    /// The database's key, if one was created (nothing is written).
    pub async fn existing(db: &Db) -> Result<Option<Key>> {
        let hex: Option<String> =
            sqlx::query_scalar("SELECT value FROM blast_settings WHERE key = 'hmac_key'")
                .fetch_optional(db.pool())
                .await?;
        hex.map(|h| {
            Key::from_hex(&h).ok_or_else(|| {
                Error::Internal("blast_settings.hmac_key is not 64 hex digits".into())
            })
        })
        .transpose()
    }

    /// The database's key, created on first use. Two processes racing to
    /// create it both end up with the one that was inserted first.
    pub async fn load(db: &Db) -> Result<Key> {
        let fresh = Key::generate()?;
        sqlx::query(
            "INSERT INTO blast_settings (key, value) VALUES ('hmac_key', $1) \
             ON CONFLICT (key) DO NOTHING",
        )
        .bind(encode_hex(&fresh.bytes))
        .execute(db.pool())
        .await?;
        let hex: String =
            sqlx::query_scalar("SELECT value FROM blast_settings WHERE key = 'hmac_key'")
                .fetch_one(db.pool())
                .await?;
        Key::from_hex(&hex)
            .ok_or_else(|| Error::Internal("blast_settings.hmac_key is not 64 hex digits".into()))
    }

    fn mac(&self, purpose: Purpose, campaign: i64, recipient: i64) -> Hmac<Sha256> {
        use std::io::Write as _;
        let mut mac = self.keyed.clone();
        let tag = match purpose {
            Purpose::Verp => "blast-verp-v1",
            Purpose::Unsubscribe => "blast-unsubscribe-v1",
        };
        // "{tag}:{campaign}:{recipient}", formatted on the stack (at most
        // 20 + 2 * 20 + 2 bytes).
        let mut buf = [0u8; 64];
        let mut at = std::io::Cursor::new(&mut buf[..]);
        write!(at, "{tag}:{campaign}:{recipient}").expect("64 bytes are enough");
        let n = at.position() as usize;
        mac.update(&buf[..n]);
        mac
    }

    fn sig(&self, purpose: Purpose, campaign: i64, recipient: i64, len: usize) -> String {
        let full = self
            .mac(purpose, campaign, recipient)
            .finalize()
            .into_bytes();
        let mut hex = encode_hex(&full[..len.div_ceil(2)]);
        hex.truncate(len);
        hex
    }

    fn check(
        &self,
        purpose: Purpose,
        campaign: i64,
        recipient: i64,
        sig: &str,
        len: usize,
    ) -> bool {
        if sig.len() != len || !len.is_multiple_of(2) {
            return false;
        }
        let Some(bytes) = decode_hex(&sig.to_ascii_lowercase()) else {
            return false;
        };
        // Constant-time comparison of the leading bytes.
        self.mac(purpose, campaign, recipient)
            .verify_truncated_left(&bytes)
            .is_ok()
    }

    /// The signature in a VERP address and in `X-Blast-Sig`.
    pub fn verp_sig(&self, campaign: i64, recipient: i64) -> String {
        self.sig(Purpose::Verp, campaign, recipient, VERP_SIG_LEN)
    }

    /// Whether `sig` is the VERP signature of (`campaign`, `recipient`).
    pub fn check_verp(&self, campaign: i64, recipient: i64, sig: &str) -> bool {
        self.check(Purpose::Verp, campaign, recipient, sig, VERP_SIG_LEN)
    }

    /// The unsubscribe token of (`campaign`, `recipient`):
    /// `<campaign>-<recipient>-<signature>`, lower-case so it survives
    /// mail systems that fold the case of local parts.
    pub fn token(&self, campaign: i64, recipient: i64) -> String {
        let sig = self.sig(Purpose::Unsubscribe, campaign, recipient, TOKEN_SIG_LEN);
        format!("{campaign}-{recipient}-{sig}")
    }

    /// The (campaign, recipient) a token names, if its signature is valid.
    pub fn check_token(&self, token: &str) -> Option<(i64, i64)> {
        let mut it = token.trim().splitn(3, '-');
        let campaign = it.next()?.parse().ok()?;
        let recipient = it.next()?.parse().ok()?;
        let sig = it.next()?;
        self.check(
            Purpose::Unsubscribe,
            campaign,
            recipient,
            sig,
            TOKEN_SIG_LEN,
        )
        .then_some((campaign, recipient))
    }
}

/// Lower-case hex.
fn encode_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[usize::from(b >> 4)] as char);
        s.push(DIGITS[usize::from(b & 15)] as char);
    }
    s
}

fn decode_hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// A placeholder in an address or URL pattern.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Var {
    /// `{campaign}`: the campaign's ledger id.
    Campaign,
    /// `{recipient}`: the recipient's id.
    Recipient,
    /// `{sig}`: the VERP signature.
    Sig,
    /// `{token}`: an unsubscribe token.
    Token,
}

impl Var {
    fn name(self) -> &'static str {
        match self {
            Var::Campaign => "campaign",
            Var::Recipient => "recipient",
            Var::Sig => "sig",
            Var::Token => "token",
        }
    }

    fn accepts(self, c: u8) -> bool {
        match self {
            Var::Campaign | Var::Recipient => c.is_ascii_digit(),
            Var::Sig => c.is_ascii_hexdigit(),
            Var::Token => c.is_ascii_hexdigit() || c == b'-',
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Lit(String),
    Var(Var),
}

/// An address or URL with placeholders, such as
/// `bounces+{campaign}-{recipient}-{sig}@example.com`: filled when sending,
/// matched (case-insensitively) when a bounce or unsubscribe mail arrives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pattern {
    raw: String,
    segments: Vec<Segment>,
}

impl Pattern {
    /// Parses `raw`, which must contain each of `required` exactly once and
    /// no other placeholder. The error says what is wrong.
    pub fn parse(raw: &str, required: &[Var]) -> std::result::Result<Pattern, String> {
        let mut segments = Vec::new();
        let mut rest = raw;
        while let Some(open) = rest.find('{') {
            if open > 0 {
                segments.push(Segment::Lit(rest[..open].to_string()));
            }
            let close = rest[open..]
                .find('}')
                .ok_or_else(|| format!("unclosed '{{' in {raw:?}"))?;
            let name = &rest[open + 1..open + close];
            let var = required
                .iter()
                .copied()
                .find(|v| v.name() == name)
                .ok_or_else(|| {
                    let known: Vec<String> = required
                        .iter()
                        .map(|v| format!("{{{}}}", v.name()))
                        .collect();
                    format!(
                        "unknown placeholder {{{name}}} (allowed: {})",
                        known.join(" ")
                    )
                })?;
            if segments.contains(&Segment::Var(var)) {
                return Err(format!("{{{name}}} appears twice"));
            }
            if matches!(segments.last(), Some(Segment::Var(_))) {
                return Err(format!(
                    "{{{name}}} must be separated from the placeholder before it"
                ));
            }
            segments.push(Segment::Var(var));
            rest = &rest[open + close + 1..];
        }
        if !rest.is_empty() {
            segments.push(Segment::Lit(rest.to_string()));
        }
        for v in required {
            if !segments.contains(&Segment::Var(*v)) {
                return Err(format!("{{{}}} is missing", v.name()));
            }
        }
        Ok(Pattern {
            raw: raw.to_string(),
            segments,
        })
    }

    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        &self.raw
    }

    /// The pattern with each placeholder replaced by `value(var)`.
    pub fn fill(&self, value: impl Fn(Var) -> String) -> String {
        let mut out = String::with_capacity(self.raw.len() + 16);
        for s in &self.segments {
            match s {
                Segment::Lit(l) => out.push_str(l),
                Segment::Var(v) => out.push_str(&value(*v)),
            }
        }
        out
    }

    /// The placeholder values if `text` has this pattern's shape
    /// (literal parts compared ignoring ASCII case).
    pub fn capture(&self, text: &str) -> Option<Vec<(Var, String)>> {
        let mut out = Vec::new();
        capture(&self.segments, text.as_bytes(), &mut out).then_some(out)
    }
}

/// Backtracking matcher: a placeholder takes the shortest run of accepted
/// characters after which the rest of the pattern matches.
fn capture(segments: &[Segment], text: &[u8], out: &mut Vec<(Var, String)>) -> bool {
    match segments.split_first() {
        None => text.is_empty(),
        Some((Segment::Lit(l), rest)) => {
            let l = l.as_bytes();
            text.len() >= l.len()
                && text[..l.len()].eq_ignore_ascii_case(l)
                && capture(rest, &text[l.len()..], out)
        }
        Some((Segment::Var(v), rest)) => {
            let run = text.iter().take_while(|c| v.accepts(**c)).count();
            for end in 1..=run {
                let mark = out.len();
                out.push((
                    *v,
                    String::from_utf8_lossy(&text[..end]).to_ascii_lowercase(),
                ));
                if capture(rest, &text[end..], out) {
                    return true;
                }
                out.truncate(mark);
            }
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> Key {
        Key::from_hex(&"ab".repeat(32)).unwrap()
    }

    #[test]
    fn signatures_are_hmac_sha256_of_the_purpose_campaign_and_recipient() {
        // Known answers from Python: hmac.new(bytes(range(32)),
        // b"blast-verp-v1:7:42", sha256).hexdigest()[:12], and the same
        // with b"blast-unsubscribe-v1:7:42" to 20 digits.
        let k = Key::from_hex("000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f")
            .unwrap();
        assert_eq!(k.verp_sig(7, 42), "02fff08aabe6");
        assert_eq!(k.token(7, 42), "7-42-a64e846713977ea5eac7");
        // The widest ids fit the formatting buffer.
        let sig = k.verp_sig(i64::MIN, i64::MIN);
        assert!(k.check_verp(i64::MIN, i64::MIN, &sig));
    }

    #[test]
    fn verp_signature_round_trips_and_rejects_tampering() {
        let k = key();
        let sig = k.verp_sig(12, 345);
        assert_eq!(sig.len(), VERP_SIG_LEN);
        assert!(k.check_verp(12, 345, &sig));
        assert!(k.check_verp(12, 345, &sig.to_ascii_uppercase()));
        assert!(!k.check_verp(12, 346, &sig), "other recipient");
        assert!(!k.check_verp(13, 345, &sig), "other campaign");
        assert!(!k.check_verp(12, 345, &sig[..10]), "truncated");
        let other = Key::from_hex(&"cd".repeat(32)).unwrap();
        assert!(!other.check_verp(12, 345, &sig), "other key");
    }

    #[test]
    fn tokens_are_not_verp_signatures() {
        let k = key();
        let token = k.token(7, 99);
        assert_eq!(k.check_token(&token), Some((7, 99)));
        let sig = token.rsplit('-').next().unwrap();
        assert!(!k.check_verp(7, 99, &sig[..VERP_SIG_LEN]));
        let verp = k.verp_sig(7, 99);
        assert_eq!(k.check_token(&format!("7-99-{verp}")), None);
        assert_eq!(k.check_token(&format!("7-98-{sig}")), None);
        assert_eq!(k.check_token("7-99"), None);
        assert_eq!(k.check_token("garbage"), None);
    }

    #[test]
    fn patterns_fill_and_capture() {
        let p = Pattern::parse(
            "bounces+{campaign}-{recipient}-{sig}@Example.com",
            &[Var::Campaign, Var::Recipient, Var::Sig],
        )
        .unwrap();
        let filled = p.fill(|v| match v {
            Var::Campaign => "12".into(),
            Var::Recipient => "345".into(),
            _ => "00aa11bb22cc".into(),
        });
        assert_eq!(filled, "bounces+12-345-00aa11bb22cc@Example.com");
        let got = p
            .capture("BOUNCES+12-345-00AA11BB22CC@example.COM")
            .unwrap();
        assert_eq!(
            got,
            vec![
                (Var::Campaign, "12".to_string()),
                (Var::Recipient, "345".to_string()),
                (Var::Sig, "00aa11bb22cc".to_string())
            ]
        );
        assert!(p
            .capture("bounces+12-345-00aa11bb22cc@example.org")
            .is_none());
        assert!(p.capture("bounces+x-345-00aa@example.com").is_none());
        // A token contains dashes; backtracking still finds the literal after it.
        let t = Pattern::parse("u-{token}-x@example.com", &[Var::Token]).unwrap();
        assert_eq!(
            t.capture("u-1-2-abc-x@example.com").unwrap(),
            vec![(Var::Token, "1-2-abc".to_string())]
        );
    }

    #[test]
    fn pattern_errors_name_the_problem() {
        let all = [Var::Campaign, Var::Recipient, Var::Sig];
        let e = Pattern::parse("b+{campaign}-{recipient}@x", &all).unwrap_err();
        assert!(e.contains("{sig} is missing"), "{e}");
        let e = Pattern::parse("b+{campaign}-{id}-{sig}@x", &all).unwrap_err();
        assert!(e.contains("unknown placeholder {id}"), "{e}");
        let e = Pattern::parse("b+{campaign}{recipient}-{sig}@x", &all).unwrap_err();
        assert!(e.contains("separated"), "{e}");
        let e = Pattern::parse("b+{campaign", &all).unwrap_err();
        assert!(e.contains("unclosed"), "{e}");
    }
}
