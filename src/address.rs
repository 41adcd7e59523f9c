//! What an email address is to blast: one validity rule and one canonical
//! form, used by everything that compares addresses (import's duplicate
//! check, the audience's suppression check, `blast suppress`, bounce ingest,
//! `blast serve`, the ledger's suppressions, the circuit breaker) and by
//! render for the SMTP envelope.
//!
//! The rule: after trimming (and dropping one pair of enclosing `<>`), an
//! address is `local@domain` with no whitespace, control characters or angle
//! brackets; the local part is ASCII (a non-ASCII one needs SMTPUTF8, which
//! blast does not send) and valid for RFC 5321 as `lettre` checks it; the
//! domain is a host name that IDNA (UTS 46) maps to ASCII, or an IP literal;
//! the ASCII form is at most 254 octets. A domain without a dot
//! (`john@gmailcom`, `root@localhost`) is allowed: blast can send to it, so
//! it can suppress it; whether it exists is the MTA's call, and a bounce for
//! it suppresses it.
//!
//! The canonical form ([`Address::key`]): the local part in ASCII lower case
//! (the suppression list has always compared it case-insensitively) and the
//! domain in its lower-case ASCII (punycode) form, without a trailing dot.
//! `A@BÜCHER.example`, ` a@bücher.example` and `a@xn--bcher-kva.example` are
//! one person. This module does no I/O.

use std::fmt;

/// RFC 5321's limit on a forward path, in octets.
pub const MAX_LEN: usize = 254;

/// Why a string is not an address blast can send to.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Invalid(String);

impl Invalid {
    fn new(why: impl Into<String>) -> Invalid {
        Invalid(why.into())
    }
}

/// An address that passed the rule: its local part as written and its
/// domain in ASCII.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Address {
    /// The input, trimmed, without enclosing `<>`.
    written: String,
    /// The local part, case preserved.
    local: String,
    /// The domain, lower-case ASCII (punycode), no trailing dot.
    domain: String,
}

impl Address {
    /// Parses `raw` by the rule in the module docs.
    pub fn parse(raw: &str) -> Result<Address, Invalid> {
        let s = raw.trim();
        let s = match s.strip_prefix('<').and_then(|s| s.strip_suffix('>')) {
            Some(inner) => inner.trim(),
            None => s,
        };
        if s.is_empty() {
            return Err(Invalid::new("empty"));
        }
        if s.chars()
            .any(|c| c.is_whitespace() || c.is_control() || c == '<' || c == '>')
        {
            return Err(Invalid::new(
                "contains whitespace, a control character or an angle bracket",
            ));
        }
        let (local, domain) = s
            .rsplit_once('@')
            .ok_or_else(|| Invalid::new("expected user@domain"))?;
        if local.is_empty() {
            return Err(Invalid::new("nothing before the @"));
        }
        if !local.is_ascii() {
            return Err(Invalid::new(
                "non-ASCII part before the @ needs SMTPUTF8, which blast does not send",
            ));
        }
        let domain = ascii_domain(domain)?;
        if local.len() + 1 + domain.len() > MAX_LEN {
            return Err(Invalid::new(format!("longer than {MAX_LEN} bytes")));
        }
        lettre::Address::new(local, &domain).map_err(|e| {
            use lettre::address::AddressError as E;
            Invalid::new(match e {
                E::InvalidUser => "the part before @ is not valid".to_string(),
                E::InvalidDomain => "the domain is not valid".to_string(),
                // AddressError is non_exhaustive: later lettre versions may add kinds.
                other => other.to_string(),
            })
        })?;
        Ok(Address {
            written: s.to_string(),
            local: local.to_string(),
            domain,
        })
    }

    /// The canonical form: lower-case local part, ASCII domain. Two
    /// addresses are the same person exactly when their keys are equal.
    pub fn key(&self) -> String {
        format!("{}@{}", self.local.to_ascii_lowercase(), self.domain)
    }

    /// The form for the SMTP envelope: local part as written (a few servers
    /// still treat it case-sensitively), ASCII domain.
    pub fn envelope(&self) -> String {
        format!("{}@{}", self.local, self.domain)
    }

    /// The address as written: trimmed, without enclosing `<>`, the domain
    /// as given (what import stores, and templates show).
    pub fn written(&self) -> &str {
        &self.written
    }

    /// The domain, lower-case ASCII.
    pub fn domain(&self) -> &str {
        &self.domain
    }
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.local, self.domain)
    }
}

/// The canonical form of `raw` ([`Address::key`]), or why it is not an
/// address. Idempotent: the key of a key is itself.
pub fn canonical(raw: &str) -> Result<String, Invalid> {
    Address::parse(raw).map(|a| a.key())
}

/// `domain` in lower-case ASCII: an IP literal as it is, a host name through
/// IDNA, one trailing dot (the root) dropped.
fn ascii_domain(domain: &str) -> Result<String, Invalid> {
    if domain.starts_with('[') {
        return Ok(domain.to_ascii_lowercase());
    }
    let domain = domain.strip_suffix('.').unwrap_or(domain);
    if domain.is_empty() {
        return Err(Invalid::new("the domain is not valid"));
    }
    let ascii = idna::domain_to_ascii(domain)
        .map_err(|_| Invalid::new(format!("the domain {domain:?} is not a valid host name")))?;
    // UTS 46 maps a few inputs to forms it would map again (a label that
    // decodes to something else); keep only fixed points, so the key of a
    // key is itself.
    if ascii != domain && idna::domain_to_ascii(&ascii).ok().as_deref() != Some(ascii.as_str()) {
        return Err(Invalid::new(format!(
            "the domain {domain:?} has no stable ASCII form"
        )));
    }
    if ascii.ends_with('.') || ascii.is_empty() {
        return Err(Invalid::new("the domain is not valid"));
    }
    Ok(ascii)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_person_one_key() {
        let same = [
            "a@xn--bcher-kva.example",
            "A@BÜCHER.example",
            " a@bücher.example ",
            "<a@Bücher.Example>",
            "a@bücher.example.",
        ];
        for s in same {
            assert_eq!(canonical(s).unwrap(), "a@xn--bcher-kva.example", "{s:?}");
        }
        assert_eq!(canonical(" Bob@X.com").unwrap(), "bob@x.com");
        let a = Address::parse("John.Doe@Example.COM").unwrap();
        assert_eq!(a.envelope(), "John.Doe@example.com");
        assert_eq!(a.key(), "john.doe@example.com");
        assert_eq!(a.domain(), "example.com");
    }

    #[test]
    fn the_rule() {
        for ok in [
            "john@gmailcom",
            "root@localhost",
            "a+tag@example.com",
            "u@[192.0.2.1]",
        ] {
            assert!(Address::parse(ok).is_ok(), "{ok:?} refused");
        }
        for bad in [
            "",
            "   ",
            "no-at-sign",
            "@example.com",
            "a@",
            "a@.",
            "a b@example.com",
            "a@exa mple.com",
            "a\r\n@example.com",
            "ü@example.com",
            "a@-bad-.example",
            "a@b@",
            "<a@example.com",
        ] {
            assert!(Address::parse(bad).is_err(), "{bad:?} accepted");
        }
        let long = format!("{}@example.com", "a".repeat(250));
        assert!(Address::parse(&long).is_err());
    }

    mod properties {
        use super::super::*;
        use proptest::prelude::*;

        /// Strings that look like addresses often enough to reach IDNA:
        /// arbitrary Unicode around an `@`, upper case and punycode included.
        fn addressish() -> impl Strategy<Value = String> {
            prop_oneof![
                any::<String>(),
                (any::<String>(), any::<String>()).prop_map(|(l, d)| format!("{l}@{d}")),
                ("[a-zA-Z0-9.+_-]{1,12}", "\\PC{1,12}", "[a-zA-Z.-]{0,6}")
                    .prop_map(|(l, d, t)| format!(" {l}@{d}.{t} ")),
                ("[a-zA-Z0-9]{1,8}", "[a-z0-9-]{0,10}")
                    .prop_map(|(l, d)| format!("{l}@xn--{d}.example")),
            ]
        }

        /// The canonicaliser never panics, a key is its own key, and
        /// nothing it returns can split a header or an SMTP command.
        fn check(raw: &str) -> Result<(), TestCaseError> {
            if let Ok(key) = canonical(raw) {
                prop_assert!(!key.contains(['\r', '\n']), "{key:?}");
                prop_assert_eq!(canonical(&key), Ok(key.clone()), "from {:?}", raw);
                let a = Address::parse(raw).unwrap();
                prop_assert!(!a.envelope().contains(['\r', '\n']));
                prop_assert_eq!(canonical(&a.envelope()), Ok(key));
            }
            Ok(())
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(crate::props::ci_cases()))]
            #[test]
            fn canonical_is_total_idempotent_and_single_line(raw in addressish()) {
                check(&raw)?;
            }
        }
    }
}
