//! One relay of `delivery.smtp`: its URL, TLS mode and certificate checks,
//! AUTH credentials from the environment, per-relay limits, and which From
//! domains it may carry.

use std::fmt;
use std::path::{Path, PathBuf};

use super::expand_env;
use super::raw::RelayTable;

/// A relay blast injects into.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Relay {
    /// `host:port` to connect to.
    pub host: String,
    /// TCP port.
    pub port: u16,
    /// How the connection is encrypted.
    pub tls: Tls,
    /// How the relay's certificate is checked.
    pub verify: crate::tls::Verify,
    /// Optional AUTH user (PLAIN or LOGIN, whichever the relay offers).
    pub user: Option<String>,
    /// The AUTH password, read from the environment variable `password_env`.
    pub password: Option<Secret>,
    /// Where the password comes from (for messages).
    pub password_env: String,
    /// Only campaigns whose From domain is listed use this relay; empty = all.
    pub from_domains: Vec<String>,
    /// Share of a fixed `concurrency` (default 1).
    pub weight: u32,
    /// Ceiling of this relay's adaptive limit (default: `auto:MAX`).
    pub max_concurrency: Option<usize>,
    /// Messages per second to this relay at most (a provider's quota).
    pub rate: Option<u32>,
}

impl fmt::Debug for Relay {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self}")
    }
}

impl fmt::Display for Relay {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = if self.tls == Tls::Implicit {
            "smtps"
        } else {
            "smtp"
        };
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        match &self.user {
            Some(u) => write!(f, "{scheme}://{u}@{host}:{}", self.port),
            None => write!(f, "{scheme}://{host}:{}", self.port),
        }
    }
}

impl Relay {
    /// Whether the relay is on this host (127.0.0.0/8, ::1 or `localhost`),
    /// where TLS protects nothing and costs throughput.
    pub fn is_loopback(&self) -> bool {
        self.host.eq_ignore_ascii_case("localhost")
            || self
                .host
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback())
    }
}

/// How a relay connection is encrypted (`tls = "none" | "starttls" | "tls"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Tls {
    /// Plain SMTP: the default on loopback only.
    #[default]
    None,
    /// STARTTLS is required (RFC 3207): the default for other relays. A relay
    /// that does not offer it is refused, never used in clear.
    StartTls,
    /// TLS from the first byte (RFC 8314, port 465): `smtps://` URLs.
    Implicit,
}

impl Tls {
    fn parse(s: &str) -> Result<Tls, String> {
        match s {
            "none" => Ok(Tls::None),
            "starttls" => Ok(Tls::StartTls),
            "tls" => Ok(Tls::Implicit),
            other => Err(format!(
                "{other:?}: expected \"none\", \"starttls\" or \"tls\""
            )),
        }
    }
}

/// A password: never printed, not even by `{:?}`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub String);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// Where relay passwords come from unless a relay names its own variable.
pub const SMTP_PASSWORD_ENV: &str = "BLAST_SMTP_PASSWORD";

/// One `delivery.smtp` entry, validated: URL, TLS, credentials, limits
/// (`from_domains` is the caller's: it routes before this validates).
/// A relative `ca_file` is read now and added to `frozen` (the files
/// `blast schedule` stores with the campaign), like a template.
pub(super) fn relay_from_table(
    t: RelayTable,
    base: &Path,
    env: &dyn Fn(&str) -> Option<String>,
    frozen: &mut Vec<(String, String)>,
) -> Result<Relay, String> {
    let url = expand_env(&t.url, env)?;
    let mut relay = parse_relay(&url)?;
    set_limits(&mut relay, t.weight, t.max_concurrency, t.rate)?;
    relay.tls = tls_mode(&relay, t.tls.as_deref())?;
    relay.verify = verify(
        &relay,
        t.ca_file,
        t.danger_accept_invalid_certs,
        base,
        frozen,
    )?;
    set_credentials(&mut relay, t.user, t.password_env, env)?;
    Ok(relay)
}

/// `weight`, `max_concurrency` and `rate`: each at least 1 when set.
fn set_limits(
    relay: &mut Relay,
    weight: Option<u32>,
    max_concurrency: Option<usize>,
    rate: Option<u32>,
) -> Result<(), String> {
    if weight == Some(0) || max_concurrency == Some(0) || rate == Some(0) {
        return Err(format!(
            "{relay}: weight, max_concurrency and rate must be at least 1"
        ));
    }
    relay.weight = weight.unwrap_or(1);
    relay.max_concurrency = max_concurrency.map(|m| m.min(1024));
    relay.rate = rate;
    Ok(())
}

/// The relay's encryption: `tls` as set, else what its URL and place imply.
fn tls_mode(relay: &Relay, tls: Option<&str>) -> Result<Tls, String> {
    match tls.map(Tls::parse).transpose()? {
        Some(mode) => {
            if relay.tls == Tls::Implicit && mode != Tls::Implicit {
                return Err(format!(
                    "{relay}: an smtps:// URL is implicit TLS; drop tls = {:?} or use smtp://",
                    tls.unwrap_or_default()
                ));
            }
            Ok(mode)
        }
        None if relay.tls == Tls::Implicit => Ok(Tls::Implicit),
        // STARTTLS is required off this host: mail and passwords do not
        // cross a network in clear unless the operator says so.
        None if relay.is_loopback() => Ok(Tls::None),
        None => Ok(Tls::StartTls),
    }
}

/// How the relay's certificate is checked (`relay.tls` is already set). A
/// relative `ca_file` is read into `frozen`.
fn verify(
    relay: &Relay,
    ca_file: Option<PathBuf>,
    danger_accept_invalid_certs: bool,
    base: &Path,
    frozen: &mut Vec<(String, String)>,
) -> Result<crate::tls::Verify, String> {
    if let Some(p) = ca_file.as_ref().filter(|p| p.is_relative()) {
        let full = base.join(p);
        let pem = std::fs::read_to_string(&full)
            .map_err(|e| format!("{relay}: ca_file: cannot read {}: {e}", full.display()))?;
        let name = p.display().to_string();
        if !frozen.iter().any(|(n, _)| *n == name) {
            frozen.push((name, pem));
        }
    }
    let verify = crate::tls::Verify {
        ca_file: ca_file.map(|p| base.join(p)),
        danger_accept_invalid_certs,
    };
    if verify.ca_file.is_some() && danger_accept_invalid_certs {
        return Err(format!(
            "{relay}: ca_file and danger_accept_invalid_certs exclude each other"
        ));
    }
    if relay.tls == Tls::None && (verify.ca_file.is_some() || danger_accept_invalid_certs) {
        return Err(format!(
            "{relay}: ca_file and danger_accept_invalid_certs need tls = \"starttls\" or \"tls\""
        ));
    }
    Ok(verify)
}

/// The AUTH user (in the URL or `user =`, not both) and its password from
/// the environment; never over a connection in clear off this host.
fn set_credentials(
    relay: &mut Relay,
    user: Option<String>,
    password_env: Option<String>,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<(), String> {
    if let Some(u) = user {
        if relay.user.is_some() {
            return Err(format!(
                "{relay}: user is set both in the URL and as user ="
            ));
        }
        relay.user = Some(u);
    }
    if password_env.is_some() && relay.user.is_none() {
        return Err(format!(
            "{relay}: password_env is set but no user (user = \"...\" or smtp://user@host)"
        ));
    }
    relay.password_env = password_env.unwrap_or_else(|| SMTP_PASSWORD_ENV.to_string());
    let Some(user) = &relay.user else {
        return Ok(());
    };
    if user.is_empty() || user.contains(['\r', '\n']) {
        return Err(format!("{relay}: bad user name"));
    }
    if relay.tls == Tls::None && !relay.is_loopback() {
        return Err(format!(
            "{relay}: AUTH over an unencrypted connection would send the password in clear; \
             remove tls = \"none\""
        ));
    }
    let password = env(&relay.password_env).filter(|p| !p.is_empty());
    let Some(password) = password else {
        return Err(format!(
            "{relay}: user {user:?} is set but the environment variable {} is not",
            relay.password_env
        ));
    };
    relay.password = Some(Secret(password));
    Ok(())
}

/// `from_domains` normalized: lower case, no trailing dot.
pub(super) fn from_domains(list: &[String]) -> Result<Vec<String>, String> {
    let list: Vec<String> = list
        .iter()
        .map(|d| d.trim().trim_end_matches('.').to_ascii_lowercase())
        .collect();
    match list.iter().find(|d| d.is_empty() || d.contains(['@', ' '])) {
        Some(bad) => Err(format!("from_domains: {bad:?} is not a domain")),
        None => Ok(list),
    }
}

/// Whether a relay limited to `domains` (empty = any) may send mail from
/// `domain`: the domain itself or a subdomain of a listed one.
pub(super) fn serves(domains: &[String], domain: &str) -> bool {
    domains.is_empty()
        || domains.iter().any(|d| {
            domain == d
                || domain
                    .strip_suffix(d.as_str())
                    .is_some_and(|rest| rest.ends_with('.'))
        })
}

/// Parses `smtp://[user@]host[:port]` or `smtps://...` (implicit TLS, port 465).
pub(super) fn parse_relay(url: &str) -> Result<Relay, String> {
    let (rest, tls, default_port) = if let Some(r) = url.strip_prefix("smtp://") {
        (r, Tls::None, "25")
    } else if let Some(r) = url.strip_prefix("smtps://") {
        (r, Tls::Implicit, "465")
    } else {
        return Err(format!(
            "{url:?}: relays are smtp://host:port or smtps://host:port"
        ));
    };
    let rest = rest.trim_end_matches('/');
    let (user, hostport) = match rest.rsplit_once('@') {
        Some((u, h)) => {
            if u.contains(':') {
                return Err(format!(
                    "put no password in the URL: set {SMTP_PASSWORD_ENV} (or the relay's password_env)"
                ));
            }
            (Some(u.to_string()), h)
        }
        None => (None, rest),
    };
    let (host, port) = if let Some(h) = hostport.strip_prefix('[') {
        // [ipv6]:port
        let (h, p) = h
            .split_once(']')
            .ok_or_else(|| format!("{url:?}: bad IPv6 literal"))?;
        (h.to_string(), p.strip_prefix(':').unwrap_or(default_port))
    } else {
        match hostport.rsplit_once(':') {
            Some((h, p)) => (h.to_string(), p),
            None => (hostport.to_string(), default_port),
        }
    };
    if host.is_empty() {
        return Err(format!("{url:?}: missing host"));
    }
    let port = port
        .parse::<u16>()
        .map_err(|_| format!("{url:?}: bad port {port:?}"))?;
    Ok(Relay {
        host,
        port,
        tls,
        user,
        weight: 1,
        password_env: SMTP_PASSWORD_ENV.to_string(),
        ..Default::default()
    })
}
