//! The configuration file: parsed once, validated completely, then handed to
//! the rest of the gateway as typed structs.
//!
//! Strictness is a security property here: a typo in a relay rule or a limit
//! that silently falls back to a default is how open relays happen. Every
//! struct denies unknown fields, and every error names the file, the line and
//! the field so an operator can fix it without guessing.

use std::collections::HashSet;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use policy::located::Located;
use policy::relay::Policy;
use serde::Deserialize;

/// A configuration problem, located as precisely as the YAML parser allows.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{file}: cannot read: {source}")]
    Read {
        file: String,
        source: std::io::Error,
    },
    /// With the line and column where they are known, and always the field
    /// (`.` for the document itself).
    #[error(transparent)]
    Invalid(Located),
    #[error("{message}")]
    Policy { message: String },
}

/// More threads than this is a typo, not a machine.
const MAX_THREADS: usize = 1024;

/// Top-level configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Our name in the greeting, EHLO reply and Received headers.
    #[serde(default = "default_hostname")]
    pub hostname: String,
    pub listeners: Vec<ListenerConfig>,
    /// Default certificate for listeners that offer TLS without their own.
    #[serde(default)]
    pub tls: Option<CertConfig>,
    pub backend: BackendConfig,
    #[serde(default)]
    pub smtp: SmtpConfig,
    #[serde(default)]
    pub limits: Limits,
    /// The relay policy inline (see `policy::relay` for the language); or
    /// `policy_file` for a file of its own, which is what hot reload
    /// watches. Parsed by `policy_source` (once, in [`Config::load`]), not
    /// here: the rules' errors must point at the section's own lines and
    /// fields. Read into a `Value` rather than skipped because that is what
    /// refuses a key given twice in the section, with this file's position.
    #[serde(default)]
    pub policy: Option<serde_norway::Value>,
    #[serde(default)]
    pub policy_file: Option<PathBuf>,
    /// Filled after parsing: where the policy text is.
    #[serde(skip)]
    pub policy_location: Option<crate::policy_source::PolicyLocation>,
    #[serde(default)]
    pub shutdown: ShutdownConfig,
    /// Authentication; without it AUTH is not offered at all.
    #[serde(default)]
    pub auth: Option<crate::auth::AuthConfig>,
    /// `/metrics`, `/healthz`, `/readyz`; without it no HTTP listener.
    #[serde(default)]
    pub metrics: Option<crate::http::MetricsConfig>,
    /// The audit log (default: JSON lines on stdout).
    #[serde(default)]
    pub audit: crate::audit::AuditConfig,
    /// Threads serving client connections, each with its own event loop
    /// (see [`crate::shards`]); default one per CPU the process may use.
    #[serde(default)]
    pub threads: Option<usize>,
}

fn default_hostname() -> String {
    "relayguard.localdomain".to_string()
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    pub name: String,
    pub address: SocketAddr,
    #[serde(default)]
    pub tls: TlsMode,
    /// Overrides the top-level `tls` certificate for this listener.
    #[serde(default)]
    pub certificate: Option<PathBuf>,
    #[serde(default)]
    pub key: Option<PathBuf>,
    /// AUTH (any mechanism) only after TLS: `530 5.7.0` before it. PLAIN
    /// and LOGIN, which send the password itself, are never offered or
    /// accepted without TLS whatever this says.
    #[serde(default = "default_true")]
    pub require_tls_for_auth: bool,
    /// Every connection starts with a PROXY protocol header (v1 or v2):
    /// the listener is behind HAProxy or a load balancer, and the address
    /// in the header is the client's for everything that follows.
    #[serde(default)]
    pub proxy_protocol: bool,
    /// The balancers: only peers in these networks may send the header.
    /// Required with `proxy_protocol`.
    #[serde(default)]
    pub trusted_proxies: crate::proxy_protocol::TrustedProxies,
}

fn default_true() -> bool {
    true
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TlsMode {
    /// Plain SMTP, no TLS offered.
    #[default]
    None,
    /// Plain SMTP, STARTTLS offered when a certificate is configured.
    Starttls,
    /// TLS from the first byte (port 465, RFC 8314).
    Implicit,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertConfig {
    /// PEM file with the certificate chain, leaf first.
    pub certificate: PathBuf,
    /// PEM file with the private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// How often to look for a renewed certificate on disk; 0 disables.
    #[serde(default = "default_reload_interval", with = "humantime_serde")]
    pub reload_interval: Duration,
}

fn default_reload_interval() -> Duration {
    Duration::from_secs(60)
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendConfig {
    /// Backend MTAs in order of preference; the next is tried when one
    /// cannot be reached.
    pub servers: Vec<BackendAddr>,
    /// Name we send in EHLO/HELO to the backend (default: `hostname`).
    #[serde(default)]
    pub helo_name: Option<String>,
    #[serde(default)]
    pub tls: BackendTls,
    /// PEM file with the CA (or the self-signed certificate) the backend's
    /// certificate must chain to; without it the system roots are used.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Name to verify the backend certificate against (default: the host
    /// part of the server address).
    #[serde(default)]
    pub server_name: Option<String>,
    #[serde(default)]
    pub timeouts: BackendTimeouts,
    #[serde(default)]
    pub pool: PoolConfig,
}

/// A backend address, `host:port`; names are resolved at connect time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendAddr {
    pub host: String,
    pub port: u16,
}

impl fmt::Display for BackendAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

impl FromStr for BackendAddr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if let Ok(sa) = s.parse::<SocketAddr>() {
            return Ok(BackendAddr {
                host: sa.ip().to_string(),
                port: sa.port(),
            });
        }
        let (host, port) = s
            .rsplit_once(':')
            .ok_or_else(|| format!("`{s}` is not host:port"))?;
        let port: u16 = port
            .parse()
            .map_err(|_| format!("`{port}` is not a port number"))?;
        let valid_host = !host.is_empty()
            && host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
        if !valid_host || port == 0 {
            return Err(format!("`{s}` is not host:port"));
        }
        Ok(BackendAddr {
            host: host.to_string(),
            port,
        })
    }
}

impl<'de> Deserialize<'de> for BackendAddr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BackendTls {
    /// Plain SMTP to the backend (it is usually on a trusted segment).
    #[default]
    None,
    /// STARTTLS when the backend offers it, plain otherwise.
    Opportunistic,
    /// STARTTLS required, certificate verified; a backend without it is
    /// treated as down.
    Required,
}

/// Client-side timeouts toward the backend (RFC 5321 §4.5.3.2 values as
/// defaults).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BackendTimeouts {
    #[serde(with = "humantime_serde")]
    pub connect: Duration,
    #[serde(with = "humantime_serde")]
    pub greeting: Duration,
    /// EHLO, HELO, STARTTLS, RSET, MAIL and RCPT replies.
    #[serde(with = "humantime_serde")]
    pub command: Duration,
    #[serde(with = "humantime_serde")]
    pub data_init: Duration,
    /// Writing one block of message data.
    #[serde(with = "humantime_serde")]
    pub data_block: Duration,
    /// The reply to the final dot.
    #[serde(with = "humantime_serde")]
    pub data_done: Duration,
}

impl Default for BackendTimeouts {
    fn default() -> Self {
        BackendTimeouts {
            connect: Duration::from_secs(10),
            greeting: Duration::from_secs(300),
            command: Duration::from_secs(300),
            data_init: Duration::from_secs(120),
            data_block: Duration::from_secs(180),
            data_done: Duration::from_secs(600),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PoolConfig {
    /// Idle backend connections kept warm for reuse; 0 disables reuse.
    pub max_idle: usize,
    /// An idle connection older than this is closed rather than reused.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Transactions per backend connection before it is retired.
    pub max_transactions: u32,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            max_idle: 32,
            idle_timeout: Duration::from_secs(30),
            max_transactions: 1000,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VrfyReply {
    /// `252 2.5.0` "cannot VRFY user, but will accept message".
    CannotVerify,
    /// `502 5.5.1` command not implemented.
    NotImplemented,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SmtpConfig {
    /// Wait this long before the greeting and refuse clients that talk
    /// first (a common spambot trait). 0 checks only what already arrived.
    #[serde(with = "humantime_serde")]
    pub greeting_delay: Duration,
    /// How VRFY and EXPN are answered; neither ever reveals a user.
    pub vrfy: VrfyReply,
    /// Lines that bare LF or bare CR in message data are handled by.
    pub bare_line_endings: BareLineEndings,
}

impl Default for SmtpConfig {
    fn default() -> Self {
        SmtpConfig {
            greeting_delay: Duration::ZERO,
            vrfy: VrfyReply::CannotVerify,
            bare_line_endings: BareLineEndings::Reject,
        }
    }
}

/// What to do with a message whose data contains a bare LF or CR.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BareLineEndings {
    /// Refuse the message (`550 5.6.0`): the SMTP smuggling defence.
    Reject,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Largest message accepted, in octets (advertised with SIZE).
    pub max_message_size: u64,
    pub max_recipients: usize,
    /// Longest line of message text, including CRLF (RFC 5321: 1000).
    pub max_line_length: usize,
    /// Longest command line, including CRLF (RFC 5321: 512). AUTH lines
    /// may be longer (RFC 4954: 12288) because they carry SASL data.
    pub max_command_length: usize,
    /// Commands that do not advance a transaction (NOOP, RSET, VRFY, HELP,
    /// EHLO, …) allowed before the next MAIL.
    pub max_junk_commands: u32,
    /// Protocol errors before the session is closed with 421.
    pub max_errors: u32,
    pub max_connections: usize,
    pub max_connections_per_ip: usize,
    /// Accept backlog of each listener (the kernel caps it at
    /// `net.core.somaxconn`): how large a burst of new connections can be
    /// queued while the gateway accepts.
    pub listen_backlog: u32,
    /// Time to wait for the next command (RFC 5321 §4.5.3.2: 5 minutes).
    #[serde(with = "humantime_serde")]
    pub command_timeout: Duration,
    /// Time to wait for the next block of message data.
    #[serde(with = "humantime_serde")]
    pub data_timeout: Duration,
    /// Time allowed for a TLS handshake.
    #[serde(with = "humantime_serde")]
    pub tls_handshake_timeout: Duration,
    /// Time allowed for the PROXY protocol header on `proxy_protocol`
    /// listeners.
    #[serde(with = "humantime_serde")]
    pub proxy_protocol_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_message_size: 36_700_160,
            max_recipients: 100,
            max_line_length: 1000,
            max_command_length: 512,
            max_junk_commands: 100,
            max_errors: 10,
            max_connections: 10_000,
            max_connections_per_ip: 50,
            listen_backlog: 4096,
            command_timeout: Duration::from_secs(300),
            data_timeout: Duration::from_secs(180),
            tls_handshake_timeout: Duration::from_secs(30),
            proxy_protocol_timeout: Duration::from_secs(10),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ShutdownConfig {
    /// How long in-flight transactions may run after SIGTERM.
    #[serde(with = "humantime_serde")]
    pub drain_timeout: Duration,
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        ShutdownConfig {
            drain_timeout: Duration::from_secs(30),
        }
    }
}

impl Config {
    /// Reads and validates a configuration file, and loads the relay policy
    /// it names (inline or `policy_file`). The policy is part of the
    /// configuration, so a bad one stops here; and the one loaded here is
    /// the one used, so the policy (and the users file it is checked
    /// against) is read and parsed once, not again by whoever asked.
    pub fn load(path: &Path) -> Result<(Config, Policy), ConfigError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            file: file.clone(),
            source,
        })?;
        let mut config = Config::from_yaml(&text, &file)?;
        config.resolve_paths(path.parent().unwrap_or(Path::new(".")));
        let policy = crate::policy_source::load(&config)
            .map_err(|message| ConfigError::Policy { message })?;
        Ok((config, policy))
    }

    /// Parses and validates configuration text; `origin` names it in errors.
    pub fn from_yaml(text: &str, origin: &str) -> Result<Config, ConfigError> {
        let de = serde_norway::Deserializer::from_str(text);
        let config: Config = serde_path_to_error::deserialize(de).map_err(|e| {
            let mut e = Located::from_yaml_error(origin, e);
            // A parse error has always shown a position, 0:0 when the parser
            // gave none.
            e.line = Some(e.line.unwrap_or(0));
            e.column = Some(e.column.unwrap_or(0));
            e.name_document = true;
            ConfigError::Invalid(e)
        })?;
        config.validate(text, origin)?;
        let mut config = config;
        config.policy_location = match (&config.policy_file, &config.policy) {
            (Some(path), None) => Some(crate::policy_source::PolicyLocation::File(path.clone())),
            (None, Some(_)) => {
                crate::policy_source::inline_section(text, "policy").map(|section| {
                    crate::policy_source::PolicyLocation::Inline {
                        origin: origin.to_string(),
                        section,
                    }
                })
            }
            (None, None) => None,
            (Some(_), Some(_)) => {
                return Err(located(
                    text,
                    origin,
                    "policy_file".into(),
                    "policy_file",
                    "set either `policy_file` or a `policy:` section, not both".into(),
                ))
            }
        };
        if config.policy_location.is_none() {
            return Err(ConfigError::Invalid(Located::new(
                origin,
                None,
                None,
                "policy",
                "a relay policy is required: `policy_file: FILE` or a `policy:` block section",
            )));
        }
        Ok(config)
    }

    /// Relative certificate paths are relative to the config file, so a
    /// config directory can be moved (or mounted) as a whole.
    fn resolve_paths(&mut self, base: &Path) {
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        if let Some(tls) = &mut self.tls {
            fix(&mut tls.certificate);
            fix(&mut tls.key);
        }
        for l in &mut self.listeners {
            if let Some(c) = &mut l.certificate {
                fix(c);
            }
            if let Some(k) = &mut l.key {
                fix(k);
            }
        }
        if let Some(ca) = &mut self.backend.ca_file {
            fix(ca);
        }
        if let Some(p) = &mut self.audit.path {
            fix(p);
        }
        if let Some(auth) = &mut self.auth {
            if let Some(u) = &mut auth.users_file {
                fix(u);
            }
        }
        if let Some(p) = &mut self.policy_file {
            fix(p);
            self.policy_location = Some(crate::policy_source::PolicyLocation::File(p.clone()));
        }
    }

    fn validate(&self, text: &str, origin: &str) -> Result<(), ConfigError> {
        let err = |field: String, needle: &str, message: String| {
            located(text, origin, field, needle, message)
        };
        if self.listeners.is_empty() {
            return Err(err(
                "listeners".into(),
                "listeners",
                "at least one listener is required".into(),
            ));
        }
        if let Some(Err((field, message))) = self.metrics.as_ref().map(|m| m.validate()) {
            let needle = field.rsplit('.').next().unwrap_or("metrics");
            return Err(err(field.into(), needle, message));
        }
        if let Err((field, message)) = self.audit.validate() {
            return Err(err(field.into(), "audit", message));
        }
        if let Some(n) = self.threads {
            if !(1..=MAX_THREADS).contains(&n) {
                return Err(err(
                    "threads".into(),
                    "threads",
                    format!("must be between 1 and {MAX_THREADS} (leave it out for one per CPU)"),
                ));
            }
        }
        let mut names = HashSet::new();
        let mut addrs = HashSet::new();
        for (i, l) in self.listeners.iter().enumerate() {
            if l.name.is_empty()
                || !l
                    .name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            {
                return Err(err(
                    format!("listeners[{i}].name"),
                    &l.name,
                    "a listener name is letters, digits, `-` and `_`".into(),
                ));
            }
            if !names.insert(&l.name) {
                return Err(err(
                    format!("listeners[{i}].name"),
                    &l.name,
                    format!("duplicate listener name `{}`", l.name),
                ));
            }
            if l.address.port() != 0 && !addrs.insert(l.address) {
                return Err(err(
                    format!("listeners[{i}].address"),
                    &l.address.to_string(),
                    format!("two listeners on {}", l.address),
                ));
            }
            if l.certificate.is_some() != l.key.is_some() {
                return Err(err(
                    format!("listeners[{i}].certificate"),
                    &l.name,
                    "`certificate` and `key` go together".into(),
                ));
            }
            if l.proxy_protocol && l.trusted_proxies.is_empty() {
                return Err(err(
                    format!("listeners[{i}].trusted_proxies"),
                    "proxy_protocol",
                    "`proxy_protocol` needs `trusted_proxies`: the networks of the load balancers that send the header".into(),
                ));
            }
            if !l.proxy_protocol && !l.trusted_proxies.is_empty() {
                return Err(err(
                    format!("listeners[{i}].trusted_proxies"),
                    "trusted_proxies",
                    "`trusted_proxies` without `proxy_protocol: true` has no effect".into(),
                ));
            }
            if l.tls != TlsMode::None && l.certificate.is_none() && self.tls.is_none() {
                return Err(err(
                    format!("listeners[{i}].tls"),
                    &l.name,
                    "TLS needs a certificate: set `certificate` and `key` here or a top-level `tls` section".into(),
                ));
            }
        }
        if self.backend.servers.is_empty() {
            return Err(err(
                "backend.servers".into(),
                "servers",
                "at least one backend server is required".into(),
            ));
        }
        if self.hostname.is_empty()
            || !self
                .hostname
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
        {
            return Err(err(
                "hostname".into(),
                "hostname",
                "hostname must be a DNS name".into(),
            ));
        }
        let l = &self.limits;
        let checks: [(&str, bool, &str); 8] = [
            (
                "max_message_size",
                l.max_message_size >= 1024,
                "must be at least 1024",
            ),
            (
                "max_recipients",
                l.max_recipients >= 1,
                "must be at least 1",
            ),
            (
                "max_line_length",
                (80..=1_000_000).contains(&l.max_line_length),
                "must be between 80 and 1000000",
            ),
            (
                "max_command_length",
                (512..=65_536).contains(&l.max_command_length),
                "must be between 512 (RFC 5321) and 65536",
            ),
            ("max_errors", l.max_errors >= 1, "must be at least 1"),
            (
                "max_connections",
                l.max_connections >= 1,
                "must be at least 1",
            ),
            (
                "max_connections_per_ip",
                l.max_connections_per_ip >= 1,
                "must be at least 1",
            ),
            (
                "command_timeout",
                !l.command_timeout.is_zero() && !l.data_timeout.is_zero(),
                "timeouts must not be zero",
            ),
        ];
        for (field, ok, message) in checks {
            if !ok {
                return Err(err(format!("limits.{field}"), field, message.into()));
            }
        }
        if let Some(auth) = &self.auth {
            if let Err(e) = auth.ntlm_config().validate() {
                return Err(err(
                    format!("auth.ntlm.{}", e.field),
                    e.field,
                    e.reason.to_string(),
                ));
            }
            if auth.users_file.is_some() == auth.active_directory.is_some() {
                return Err(err(
                    "auth".into(),
                    "auth:",
                    "set exactly one identity source: `users_file` or `active_directory`".into(),
                ));
            }
            if auth
                .active_directory
                .as_ref()
                .is_some_and(|ad| ad.ldap.is_none())
            {
                // Without LDAP, a DC that maps unknown users to Guest would
                // make every name "authenticated"; LDAP confirms the account.
                return Err(err(
                    "auth.active_directory.ldap".into(),
                    "active_directory",
                    "`ldap` is required: it confirms the account and gives its groups".into(),
                ));
            }
            let lockout = &auth.lockout;
            for (field, value) in [
                ("max_failures_per_client", lockout.max_failures_per_client),
                ("max_failures_per_account", lockout.max_failures_per_account),
            ] {
                if value == 0 {
                    return Err(err(
                        format!("auth.lockout.{field}"),
                        field,
                        "must be at least 1".into(),
                    ));
                }
            }
            if auth.mechanisms.is_empty() {
                return Err(err(
                    "auth.mechanisms".into(),
                    "mechanisms",
                    "at least one mechanism".into(),
                ));
            }
        }
        Ok(())
    }

    /// How many shards serve connections (`threads`, else one per CPU).
    pub fn shard_count(&self) -> usize {
        self.threads.unwrap_or_else(crate::shards::default_count)
    }

    pub fn helo_name(&self) -> &str {
        self.backend.helo_name.as_deref().unwrap_or(&self.hostname)
    }
}

/// Builds an error for a check that runs after parsing, when the YAML
/// parser's positions are gone: the line is that of the first occurrence of
/// `needle` in the text, which is where an operator would look.
fn located(text: &str, origin: &str, field: String, needle: &str, message: String) -> ConfigError {
    let hit = (!needle.is_empty())
        .then(|| {
            text.lines()
                .enumerate()
                .find_map(|(n, l)| l.find(needle).map(|c| (n + 1, c + 1)))
        })
        .flatten();
    let mut e = Located::new(
        origin,
        hit.map(|(line, _)| line),
        hit.map(|(_, column)| column),
        field,
        message,
    );
    e.name_document = true;
    ConfigError::Invalid(e)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = "listeners:\n  - name: smtp\n    address: 127.0.0.1:2525\nbackend:\n  servers: [\"127.0.0.1:25\"]\npolicy:\n  local_domains: [example.test]\n";

    #[test]
    fn minimal_config_gets_defaults() {
        let c = Config::from_yaml(MINIMAL, "t.yaml").unwrap();
        assert_eq!(c.listeners[0].tls, TlsMode::None);
        assert_eq!(c.limits.max_recipients, 100);
        assert_eq!(c.backend.servers[0].to_string(), "127.0.0.1:25");
    }

    #[test]
    fn threads_default_to_one_per_cpu_and_zero_is_refused_with_its_line() {
        let c = Config::from_yaml(MINIMAL, "t.yaml").unwrap();
        assert_eq!(c.shard_count(), crate::shards::default_count());
        let c = Config::from_yaml(&format!("threads: 3\n{MINIMAL}"), "t.yaml").unwrap();
        assert_eq!(c.shard_count(), 3);
        let e = Config::from_yaml(&format!("{MINIMAL}threads: 0\n"), "t.yaml")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("t.yaml:8:"), "{e}");
        assert!(e.contains("threads"), "{e}");
        assert!(e.contains("between 1 and 1024"), "{e}");
    }

    #[test]
    fn unknown_field_is_located() {
        let text = MINIMAL.replace("    address:", "    adress: x\n    address:");
        let e = Config::from_yaml(&text, "t.yaml").unwrap_err().to_string();
        assert!(e.starts_with("t.yaml:3:"), "{e}");
        assert!(e.contains("listeners[0]"), "{e}");
        assert!(e.contains("adress"), "{e}");
    }

    #[test]
    fn bad_enum_value_is_located() {
        let text = MINIMAL.replace("2525\n", "2525\n    tls: maybe\n");
        let e = Config::from_yaml(&text, "t.yaml").unwrap_err().to_string();
        assert!(e.starts_with("t.yaml:4:"), "{e}");
        assert!(e.contains("listeners[0].tls"), "{e}");
    }

    #[test]
    fn starttls_without_certificate_is_refused() {
        let text = MINIMAL.replace("2525\n", "2525\n    tls: starttls\n");
        let e = Config::from_yaml(&text, "t.yaml").unwrap_err().to_string();
        assert!(e.contains("listeners[0].tls"), "{e}");
        assert!(e.contains("certificate"), "{e}");
    }

    #[test]
    fn proxy_protocol_listener() {
        let text = MINIMAL.replace(
            "2525\n",
            "2525\n    proxy_protocol: true\n    trusted_proxies: [\"10.0.0.0/8\", \"192.0.2.10\"]\n",
        );
        let c = Config::from_yaml(&text, "t.yaml").unwrap();
        assert!(c.listeners[0].proxy_protocol);
        assert!(c.listeners[0]
            .trusted_proxies
            .contains("10.1.2.3".parse().unwrap()));
        assert_eq!(c.limits.proxy_protocol_timeout, Duration::from_secs(10));
    }

    #[test]
    fn proxy_protocol_needs_trusted_proxies_and_vice_versa() {
        let text = MINIMAL.replace("2525\n", "2525\n    proxy_protocol: true\n");
        let e = Config::from_yaml(&text, "t.yaml").unwrap_err().to_string();
        assert!(e.contains("listeners[0].trusted_proxies"), "{e}");
        let text = MINIMAL.replace("2525\n", "2525\n    trusted_proxies: [\"10.0.0.0/8\"]\n");
        let e = Config::from_yaml(&text, "t.yaml").unwrap_err().to_string();
        assert!(e.contains("without `proxy_protocol: true`"), "{e}");
        let text = MINIMAL.replace(
            "2525\n",
            "2525\n    proxy_protocol: true\n    trusted_proxies: [\"10.0.0.7/8\"]\n",
        );
        let e = Config::from_yaml(&text, "t.yaml").unwrap_err().to_string();
        assert!(
            e.contains("listeners[0].trusted_proxies") && e.contains("host bits"),
            "{e}"
        );
    }

    #[test]
    fn duplicate_listener_names_are_refused() {
        let text = MINIMAL.replace(
            "backend:",
            "  - name: smtp\n    address: 127.0.0.1:2526\nbackend:",
        );
        let e = Config::from_yaml(&text, "t.yaml").unwrap_err().to_string();
        assert!(e.contains("listeners[1].name"), "{e}");
        assert!(e.contains("duplicate"), "{e}");
    }

    #[test]
    fn backend_address_forms() {
        assert!("mx.example.test:25".parse::<BackendAddr>().is_ok());
        assert!("[::1]:25".parse::<BackendAddr>().is_ok());
        assert!("mx.example.test".parse::<BackendAddr>().is_err());
        assert!("bad host:25".parse::<BackendAddr>().is_err());
    }

    #[test]
    fn durations_are_human() {
        let text = format!("{MINIMAL}limits:\n  command_timeout: 2m\n");
        let c = Config::from_yaml(&text, "t.yaml").unwrap();
        assert_eq!(c.limits.command_timeout, Duration::from_secs(120));
    }

    #[test]
    fn bad_local_domain_is_refused_with_its_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.yaml");
        let text = MINIMAL.replace(
            "local_domains: [example.test]",
            "local_domains: [\"exa mple.test\"]",
        );
        std::fs::write(&path, text).unwrap();
        let e = Config::load(&path).unwrap_err().to_string();
        assert!(e.contains("policy.local_domains[0]"), "{e}");
        assert!(e.contains("c.yaml:7:"), "{e}");
    }

    #[test]
    fn a_policy_is_required() {
        let text = MINIMAL.replace("policy:\n  local_domains: [example.test]\n", "");
        let e = Config::from_yaml(&text, "t.yaml").unwrap_err().to_string();
        assert!(e.contains("relay policy is required"), "{e}");
    }
}
