//! Small text helpers shared by the bounce parsers: finding e-mail addresses
//! and RFC 3463 status codes in free text, unfolding header fields, and
//! squeezing server replies onto one bounded line.
//!
//! Everything here is pure and works on `&str`; no MIME knowledge.

/// Longest diagnostic kept on a finding, in characters.
pub(crate) const DIAGNOSTIC_MAX: usize = 500;

/// True for characters allowed in the local part of an address we extract.
///
/// Wider than the RFC 5322 atom set on purpose: bounces quote addresses with
/// encoded words (`=?utf-8?b?...?=@example.org`), which must survive intact.
fn is_local_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || ".!#$%&'*+/=?^_`{|}~-".contains(c)
}

/// True for characters allowed in the domain part of an address we extract.
fn is_domain_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '.' || c == '-'
}

/// Every address-looking token in `text`, in order, as written (not lower-cased).
///
/// A token needs a non-empty local part and a domain with at least one dot;
/// leading/trailing dots and quotes are trimmed.
pub(crate) fn addresses(text: &str) -> Vec<String> {
    let chars: Vec<(usize, char)> = text.char_indices().collect();
    let mut found = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        if chars[i].1 != '@' {
            i += 1;
            continue;
        }
        // Walk left over the local part and right over the domain.
        let mut start = i;
        while start > 0 && is_local_char(chars[start - 1].1) {
            start -= 1;
        }
        let mut end = i + 1;
        while end < chars.len() && is_domain_char(chars[end].1) {
            end += 1;
        }
        let from = chars[start].0;
        let to = chars.get(end).map_or(text.len(), |c| c.0);
        let token = &text[from..to];
        if let Some(addr) = clean_address(token) {
            found.push(addr);
        }
        i = end.max(i + 1);
    }
    found
}

/// Trims punctuation around an address token; `None` when it is not one.
fn clean_address(token: &str) -> Option<String> {
    let token = token.trim_matches(|c: char| c == '.' || c == '\'' || c == '`');
    let token = token.trim_start_matches(|c: char| "<(\"[{".contains(c));
    let (local, domain) = token.rsplit_once('@')?;
    let domain = domain.trim_end_matches(['.', '-']);
    if local.is_empty() || !domain.contains('.') || domain.starts_with('.') {
        return None;
    }
    // A last label of digits only is an IP address or a Message-ID fragment.
    let tld = domain.rsplit('.').next().unwrap_or("");
    if tld.is_empty() || tld.chars().all(|c| c.is_ascii_digit()) {
        return None;
    }
    Some(format!("{local}@{domain}"))
}

/// The first address in a header value such as `"Name" <a@b.c>` or `rfc822; a@b.c`.
pub(crate) fn first_address(value: &str) -> Option<String> {
    addresses(value).into_iter().next()
}

/// Every RFC 3463 enhanced status code (`5.1.1`, `4.7.650`) in `text`, in order.
///
/// Codes inside longer dotted numbers (IP addresses, versions) do not count.
pub(crate) fn status_codes(text: &str) -> Vec<String> {
    let b = text.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        let boundary_before = i == 0 || !(b[i - 1].is_ascii_alphanumeric() || b[i - 1] == b'.');
        if matches!(c, b'2' | b'4' | b'5') && boundary_before {
            if let Some(len) = status_len(&b[i..]) {
                out.push(text[i..i + len].to_string());
                i += len;
                continue;
            }
        }
        i += 1;
    }
    out
}

/// Length of a status code at the start of `b` (class.subject.detail), if any.
fn status_len(b: &[u8]) -> Option<usize> {
    // class '.' 1-3 digits '.' 1-3 digits, not followed by a digit or ".digit".
    if b.len() < 5 || b[1] != b'.' {
        return None;
    }
    let digits = |from: usize| b[from..].iter().take_while(|c| c.is_ascii_digit()).count();
    // Subjects are one digit in practice (0-7); longer ones are version numbers.
    let subject = digits(2);
    if subject != 1 || b.get(2 + subject) != Some(&b'.') {
        return None;
    }
    let detail_at = 3 + subject;
    let detail = digits(detail_at);
    if !(1..=3).contains(&detail) {
        return None;
    }
    let end = detail_at + detail;
    let next_is_digit = |k: usize| b.get(k).is_some_and(|c| c.is_ascii_digit());
    if b.get(end) == Some(&b'.') && next_is_digit(end + 1) {
        return None;
    }
    if b.get(end).is_some_and(|c| c.is_ascii_alphabetic()) {
        return None;
    }
    Some(end)
}

/// The status code a piece of server text speaks for: the last one in it.
///
/// Relays quote the upstream answer after their own summary ("5.1.0 - Unknown
/// address error 550-'5.2.2 Mailbox full'"), so the last code is the most
/// specific; the reference labels agree.
pub(crate) fn last_status(text: &str) -> Option<String> {
    status_codes(text).pop()
}

/// Collapses whitespace runs to one space and bounds the length.
pub(crate) fn one_line(text: &str) -> String {
    let mut out = String::with_capacity(text.len().min(DIAGNOSTIC_MAX));
    for word in text.split_whitespace() {
        if !out.is_empty() {
            out.push(' ');
        }
        out.push_str(word);
        if out.chars().count() >= DIAGNOSTIC_MAX {
            break;
        }
    }
    out.chars().take(DIAGNOSTIC_MAX).collect()
}

/// Header fields from a block of `Name: value` lines, unfolded, in order.
///
/// Stops at the first blank line. Lines that are neither a field nor a
/// continuation are skipped, so a slightly broken block still yields fields.
pub(crate) fn fields(block: &str) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = Vec::new();
    for line in block.lines() {
        if line.trim().is_empty() {
            if out.is_empty() {
                continue;
            }
            break;
        }
        if line.starts_with([' ', '\t']) {
            if let Some(last) = out.last_mut() {
                last.1.push(' ');
                last.1.push_str(line.trim());
            }
            continue;
        }
        if let Some((name, value)) = line.split_once(':') {
            if is_field_name(name) {
                out.push((name.to_string(), value.trim().to_string()));
            }
        }
    }
    out
}

/// True when `name` can be a header field name (printable, no spaces).
pub(crate) fn is_field_name(name: &str) -> bool {
    !name.is_empty() && name.len() < 80 && name.bytes().all(|c| c.is_ascii_graphic())
}

/// Splits a block of field groups (as in message/delivery-status) on blank lines.
pub(crate) fn field_groups(text: &str) -> Vec<Vec<(String, String)>> {
    let mut groups = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        if line.trim().is_empty() {
            if !current.is_empty() {
                groups.push(fields(&current));
                current.clear();
            }
        } else {
            current.push_str(line);
            current.push('\n');
        }
    }
    if !current.is_empty() {
        groups.push(fields(&current));
    }
    groups.retain(|g| !g.is_empty());
    groups
}

/// The value after a `type;` prefix, as in `rfc822; user@example.org` or `smtp; 550 ...`.
pub(crate) fn strip_type(value: &str) -> &str {
    match value.split_once(';') {
        Some((kind, rest)) if kind.len() < 20 && !kind.contains(' ') => rest.trim(),
        _ => value.trim(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_addresses_and_trims_brackets() {
        assert_eq!(
            addresses("<kijitora@example.jp>: host mx said: 550 x@y"),
            vec!["kijitora@example.jp"]
        );
        assert_eq!(
            addresses("rfc822; =?utf-8?b?8J+qipcfkig=?=@example.org."),
            vec!["=?utf-8?b?8J+qipcfkig=?=@example.org"]
        );
        assert!(addresses("id 1234@10.0.0.1 and no@tld").is_empty());
    }

    #[test]
    fn status_codes_skip_ip_addresses_and_longer_numbers() {
        assert_eq!(
            status_codes("remote host 192.0.2.32 said: 550 5.1.1 no (#5.5.0)"),
            vec!["5.1.1", "5.5.0"]
        );
        assert_eq!(
            status_codes("421 4.7.0 [TSS04] - 4.16.55.1; see"),
            vec!["4.7.0"]
        );
        assert_eq!(
            last_status("5.1.0 - Unknown 550-'5.2.2 <a@b.c>... Full'"),
            Some("5.2.2".into())
        );
        assert_eq!(status_codes("version 2.6.0a"), Vec::<String>::new());
        assert_eq!(status_codes("550 5.7.509 Access denied"), vec!["5.7.509"]);
    }

    #[test]
    fn fields_unfold_continuations() {
        let f = fields("Status: 5.1.1\nDiagnostic-Code: smtp; 550\n  user unknown\n\nX: y\n");
        assert_eq!(f.len(), 2);
        assert_eq!(f[1].1, "smtp; 550 user unknown");
        assert_eq!(field_groups("A: 1\n\n\nB: 2\nC: 3\n").len(), 2);
    }

    #[test]
    fn one_line_bounds_length() {
        assert_eq!(one_line("a\n   b\tc"), "a b c");
        assert_eq!(one_line(&"x ".repeat(1000)).chars().count(), DIAGNOSTIC_MAX);
        assert_eq!(strip_type("smtp; 550 no"), "550 no");
        assert_eq!(strip_type("550 no; really"), "550 no; really");
    }
}
