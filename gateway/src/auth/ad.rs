//! Active Directory as the identity source: NTLM pass-through to a domain
//! controller through Samba winbind's `ntlm_auth`, and who the user is in
//! the directory (groups, addresses) from LDAP.
//!
//! ```text
//!  AUTH NTLM ─▶ ServerHandshake::begin_authenticate ─▶ PendingAuthenticate
//!                  │ (structure, anonymous, v1/LM policy, require_mic)
//!                  ▼
//!  verify_ntlm(user, domain, challenge, nt) ─▶ Pool ─▶ ntlm_auth ─▶ winbindd ─▶ DC
//!                  │ ◀── SessionBaseKey (User-Session-Key)
//!  entry(user) ─▶ LDAP (cached): groups (nested), mail, proxyAddresses
//!                  ▼
//!  PendingAuthenticate::finish_external(account, key) ─▶ target-info echo,
//!        timestamp, MIC, channel binding, replay ─▶ Authenticated
//! ```
//!
//! The gateway keeps its own challenge: the DC is only asked whether this
//! response answers that challenge for that user, and returns the session
//! key the MIC is checked with. The DC never sees the client's NEGOTIATE or
//! CHALLENGE, and the target info the client saw is the gateway's.
//!
//! `ntlm_auth --helper-protocol=ntlm-server-1` speaks `Key: value` lines
//! ending with a `.` line. A failed NTLM check answers with TWO `.` lines, a
//! failed plain-password check with one, and a request ntlm_auth dislikes
//! can get an `Error:` reply in the middle of a request. Rather than track
//! each quirk, every request is followed by an empty request (a bare `.`),
//! whose reply `Error: No username supplied!` + `.` marks the end of the real
//! answer whatever came before it. A helper that answers anything else is
//! killed and replaced.
//!
//! Passwords and NTLM responses go to the helper base64- or hex-encoded and
//! never into a log line or an error message.

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::fmt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use ldap3::{Ldap, LdapConnAsync, LdapConnSettings, LdapError, Scope, SearchEntry};
use serde::Deserialize;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};
use tokio::sync::Semaphore;
use tokio::time::Instant;

/// `active_directory:` in the configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdConfig {
    /// Samba's `ntlm_auth` (Debian package `winbind`). The gateway's user
    /// must be allowed on winbindd's privileged pipe (root, or the
    /// `winbindd_priv` group).
    #[serde(default = "default_ntlm_auth")]
    pub ntlm_auth: PathBuf,
    /// Passed as `--configfile`; without it ntlm_auth reads its compiled-in
    /// `/etc/samba/smb.conf`.
    #[serde(default)]
    pub samba_config: Option<PathBuf>,
    /// Where winbindd's socket (`pipe`) is, to tell "winbindd is down" from
    /// "wrong password" when a plain-password check fails without a reason,
    /// and for [`ActiveDirectory::ping`]. ntlm_auth itself always uses its
    /// compiled-in directory (`/run/samba/winbindd` on Debian): libwbclient
    /// honours no environment variable outside Samba's own test wrappers.
    #[serde(default = "default_winbind_socket_dir")]
    pub winbind_socket_dir: PathBuf,
    /// Long-lived helper processes; also the number of verifications that
    /// can be in flight at once.
    #[serde(default = "default_helpers")]
    pub helpers: usize,
    /// Limit for one verification or directory lookup, including the wait
    /// for a free helper. A helper that overruns it is killed and replaced.
    #[serde(default = "default_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// Group membership and addresses; without it [`ActiveDirectory::groups`]
    /// and [`ActiveDirectory::addresses`] are configuration errors.
    #[serde(default)]
    pub ldap: Option<LdapConfig>,
}

fn default_ntlm_auth() -> PathBuf {
    PathBuf::from("/usr/bin/ntlm_auth")
}

fn default_winbind_socket_dir() -> PathBuf {
    PathBuf::from("/run/samba/winbindd")
}

fn default_helpers() -> usize {
    4
}

fn default_timeout() -> Duration {
    Duration::from_secs(10)
}

/// `active_directory.ldap:` in the configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LdapConfig {
    /// `ldap://dc1.corp.example` or `ldaps://dc1.corp.example`. Certificates
    /// are checked against the system roots (`SSL_CERT_FILE` overrides).
    pub url: String,
    /// Upgrade an `ldap://` connection with StartTLS before binding.
    #[serde(default)]
    pub starttls: bool,
    /// A service account allowed to read users and groups, e.g.
    /// `CN=relayguard,CN=Users,DC=corp,DC=example`.
    pub bind_dn: String,
    /// File holding that account's password (one line). Read at every
    /// (re)connection, so a rotated password is picked up without restart.
    pub bind_password_file: PathBuf,
    /// Where users and groups are searched (subtree), e.g. `DC=corp,DC=example`.
    pub base_dn: String,
    /// How long a user's groups and addresses are remembered.
    #[serde(default = "default_cache_ttl", with = "humantime_serde")]
    pub cache_ttl: Duration,
}

fn default_cache_ttl() -> Duration {
    Duration::from_secs(5 * 60)
}

/// Why an Active Directory operation failed.
///
/// `BadCredentials`, `AccountDisabled` and `NoSuchUser` are the client's
/// doing (`535`, see [`AdError::is_client_fault`]); every other variant is
/// the backend's (`454 4.7.0`, temporary) or ours.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AdError {
    /// Unknown user, wrong password or malformed credentials: deliberately
    /// one error.
    #[error("bad credentials")]
    BadCredentials,
    /// The DC knows the account and refuses it for its state: disabled,
    /// locked out, expired, password expired, outside logon hours or
    /// workstations. Only reported once the password was right, except for
    /// lockout.
    #[error("account disabled or restricted")]
    AccountDisabled,
    /// The user is not in the directory (LDAP).
    #[error("no such user in the directory: {0}")]
    NoSuchUser(String),
    /// winbindd, the DC or LDAP cannot be reached or refuses the gateway.
    #[error("directory unavailable: {0}")]
    Unavailable(String),
    #[error("directory did not answer in time")]
    Timeout,
    /// ntlm_auth or the LDAP server answered something we do not understand.
    #[error("directory protocol error: {0}")]
    Protocol(String),
    #[error("active_directory.{0}")]
    Config(String),
}

impl AdError {
    /// A bounded label for metrics and logs.
    pub fn metric_label(&self) -> &'static str {
        match self {
            AdError::BadCredentials => "bad_credentials",
            AdError::AccountDisabled => "account_disabled",
            AdError::NoSuchUser(_) => "directory_no_such_user",
            AdError::Unavailable(_) => "directory_unavailable",
            AdError::Timeout => "directory_timeout",
            AdError::Protocol(_) => "directory_protocol_error",
            AdError::Config(_) => "directory_config",
        }
    }

    /// The client's attempt was refused (as opposed to: it could not be
    /// decided now, try again later).
    ///
    /// `NoSuchUser` counts as refused: after the DC accepted a response, a
    /// name the directory does not know is what a DC with the Guest
    /// account enabled produces for unknown users (it maps them to Guest
    /// and says yes). Refusing fails closed; a wrong `base_dn` shows up as
    /// every AD user refused with the label `directory_no_such_user`.
    pub fn is_client_fault(&self) -> bool {
        matches!(
            self,
            AdError::BadCredentials | AdError::AccountDisabled | AdError::NoSuchUser(_)
        )
    }
}

/// What the directory says about a user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirectoryEntry {
    pub dn: String,
    /// `sAMAccountName`, the canonical spelling.
    pub account_name: String,
    /// CNs of every group the user is a member of, nested membership
    /// included (the primary group, usually Domain Users, is not: AD does
    /// not list it in `member`). Sorted.
    pub groups: Vec<String>,
    /// `mail`, then the `smtp:`/`SMTP:` entries of `proxyAddresses`, without
    /// the prefix; each address once (compared ignoring case).
    pub addresses: Vec<String>,
    /// `userAccountControl` lacks ACCOUNTDISABLE.
    pub enabled: bool,
}

/// Longest NT response handed to the DC. Real NTLMv2 responses are a few
/// hundred bytes (the blob holds our target info, a timestamp and maybe a
/// channel binding and SPN).
const MAX_NT_RESPONSE: usize = 16 * 1024;
/// winbindd copies names and passwords into 256-byte fields and silently
/// truncates longer ones; refusing them keeps "password + junk" from
/// verifying as "password".
const MAX_FIELD_BYTES: usize = 255;

/// The identity source. Cheap to share (`Arc`); every method may be called
/// concurrently.
pub struct ActiveDirectory {
    pool: Pool,
    winbind_socket: PathBuf,
    timeout: Duration,
    directory: Option<Directory>,
}

impl fmt::Debug for ActiveDirectory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ActiveDirectory")
            .field("ntlm_auth", &self.pool.program)
            .field("helpers", &self.pool.size)
            .field("ldap", &self.directory.as_ref().map(|d| &d.cfg.url))
            .finish_non_exhaustive()
    }
}

impl AdConfig {
    /// Checks what can be checked without a runtime: paths exist, numbers
    /// make sense, the password file is readable.
    pub fn validate(&self) -> Result<(), AdError> {
        let cfg = |m: String| Err(AdError::Config(m));
        match std::fs::metadata(&self.ntlm_auth) {
            Ok(m) if m.is_file() => {}
            Ok(_) => {
                return cfg(format!(
                    "ntlm_auth: {} is not a file",
                    self.ntlm_auth.display()
                ))
            }
            Err(e) => {
                return cfg(format!(
                    "ntlm_auth: {}: {e} (Debian package `winbind`)",
                    self.ntlm_auth.display()
                ))
            }
        }
        if let Some(conf) = &self.samba_config {
            if let Err(e) = std::fs::metadata(conf) {
                return cfg(format!("samba_config: {}: {e}", conf.display()));
            }
        }
        if !(1..=64).contains(&self.helpers) {
            return cfg(format!("helpers: {} is not within 1..=64", self.helpers));
        }
        if self.timeout.is_zero() {
            return cfg("timeout: must be positive".into());
        }
        if let Some(l) = &self.ldap {
            if !(l.url.starts_with("ldap://") || l.url.starts_with("ldaps://")) {
                return cfg(format!("ldap.url: {:?} is not ldap:// or ldaps://", l.url));
            }
            if l.starttls && l.url.starts_with("ldaps://") {
                return cfg("ldap.starttls: only for ldap:// URLs".into());
            }
            for (field, v) in [("bind_dn", &l.bind_dn), ("base_dn", &l.base_dn)] {
                if v.trim().is_empty() {
                    return cfg(format!("ldap.{field}: must not be empty"));
                }
            }
            read_password_file(&l.bind_password_file)?;
            if l.cache_ttl.is_zero() {
                return cfg("ldap.cache_ttl: must be positive".into());
            }
        }
        Ok(())
    }
}

fn read_password_file(path: &Path) -> Result<String, AdError> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        AdError::Config(format!("ldap.bind_password_file: {}: {e}", path.display()))
    })?;
    let pw = text.trim_end_matches(['\r', '\n']).to_string();
    if pw.is_empty() {
        return Err(AdError::Config(format!(
            "ldap.bind_password_file: {} is empty",
            path.display()
        )));
    }
    Ok(pw)
}

impl ActiveDirectory {
    /// Validates `cfg`. Helpers start on first use (and whenever one died),
    /// so this needs no runtime and no running winbindd; use
    /// [`ActiveDirectory::ping`] for readiness.
    pub fn new(cfg: &AdConfig) -> Result<Arc<Self>, AdError> {
        cfg.validate()?;
        let mut args: Vec<OsString> = vec!["--helper-protocol=ntlm-server-1".into()];
        if let Some(conf) = &cfg.samba_config {
            let mut a = OsString::from("--configfile=");
            a.push(conf);
            args.push(a);
        }
        Ok(Arc::new(ActiveDirectory {
            pool: Pool {
                program: cfg.ntlm_auth.clone(),
                args,
                size: cfg.helpers,
                idle: Mutex::new(Vec::new()),
                slots: Semaphore::new(cfg.helpers),
                started: AtomicU64::new(0),
            },
            winbind_socket: cfg.winbind_socket_dir.join("pipe"),
            timeout: cfg.timeout,
            directory: cfg.ldap.as_ref().map(|l| Directory {
                cfg: l.clone(),
                timeout: cfg.timeout,
                conn: tokio::sync::Mutex::new(None),
                cache: moka::future::Cache::builder()
                    .max_capacity(100_000)
                    .time_to_live(l.cache_ttl)
                    .build(),
            }),
        }))
    }

    /// NTLM pass-through: asks the DC whether `nt` answers `challenge` for
    /// `domain\user` and returns the SessionBaseKey (for the MIC).
    ///
    /// Pass exactly what [`policy::ntlm::PendingAuthenticate`] holds: its
    /// `user()`, `domain()` (as the client sent them: the NTLMv2 proof
    /// covers that spelling; an empty domain means winbind's own),
    /// `external_challenge()`, `lm_response()` and `nt_response()`. The LM
    /// response is only forwarded with an NTLMv1 NT response (24 bytes):
    /// with NTLMv2 it adds nothing (Windows sends zeros there) and would
    /// only widen what the DC accepts.
    pub async fn verify_ntlm(
        &self,
        user: &str,
        domain: &str,
        challenge: [u8; 8],
        lm: &[u8],
        nt: &[u8],
    ) -> Result<[u8; 16], AdError> {
        if !acceptable_name(user, false) || !acceptable_name(domain, true) {
            return Err(AdError::BadCredentials);
        }
        if !(24..=MAX_NT_RESPONSE).contains(&nt.len()) {
            return Err(AdError::BadCredentials);
        }
        let request = Request::ntlm(user, domain, challenge, lm, nt);
        let answer = parse_answer(&self.pool.call(&request, self.timeout).await?)?;
        let result = match answer {
            Answer::Yes {
                user_session_key: Some(key),
            } => Ok(key),
            Answer::Yes {
                user_session_key: None,
            } => Err(AdError::Protocol(
                "the DC accepted the response but returned no User-Session-Key".into(),
            )),
            Answer::No { reason } => Err(classify_failure(reason.as_deref())),
        };
        match &result {
            Ok(_) => tracing::debug!(user, domain, "NTLM response verified by the DC"),
            Err(e) => tracing::debug!(user, domain, error = %e, "NTLM response refused"),
        }
        result
    }

    /// PLAIN/LOGIN: checks a password with the DC (winbind's PAM-style
    /// logon). An empty `domain` lets winbind resolve `user` itself
    /// (`alice`, `alice@corp.example`, `CORP\alice`).
    ///
    /// ntlm_auth gives no reason when a password check fails, so a disabled
    /// account is `BadCredentials` here, and only a winbindd that is not
    /// running is told apart (`Unavailable`), by trying its socket.
    pub async fn verify_password(
        &self,
        user: &str,
        domain: &str,
        password: &str,
    ) -> Result<(), AdError> {
        if !acceptable_name(user, false)
            || !acceptable_name(domain, true)
            || password.is_empty()
            || password.len() > MAX_FIELD_BYTES
            || password.contains('\0')
        {
            return Err(AdError::BadCredentials);
        }
        let request = Request::password(user, domain, password);
        let answer = parse_answer(&self.pool.call(&request, self.timeout).await?)?;
        let result = match answer {
            Answer::Yes { .. } => Ok(()),
            Answer::No { reason: Some(r) } => Err(classify_failure(Some(&r))),
            Answer::No { reason: None } => match self.winbind_reachable().await {
                Ok(()) => Err(AdError::BadCredentials),
                Err(e) => Err(e),
            },
        };
        match &result {
            Ok(()) => tracing::debug!(user, domain, "password verified by the DC"),
            Err(e) => tracing::debug!(user, domain, error = %e, "password refused"),
        }
        result
    }

    /// The directory's view of `user` (`alice`, `alice@corp.example` or
    /// `CORP\alice`), cached for `ldap.cache_ttl`.
    pub async fn entry(&self, user: &str) -> Result<Arc<DirectoryEntry>, AdError> {
        let dir = self.directory.as_ref().ok_or_else(|| {
            AdError::Config("ldap: not configured; groups and addresses come from LDAP".into())
        })?;
        dir.entry(user).await
    }

    /// Group names (CN) `user` is a member of, nested groups included.
    pub async fn groups(&self, user: &str) -> Result<Vec<String>, AdError> {
        Ok(self.entry(user).await?.groups.clone())
    }

    /// `mail` and the SMTP `proxyAddresses` of `user`, for sender binding.
    pub async fn addresses(&self, user: &str) -> Result<Vec<String>, AdError> {
        Ok(self.entry(user).await?.addresses.clone())
    }

    /// Readiness: winbindd's socket answers, a helper runs and answers, and
    /// LDAP (when configured) binds and reads the root DSE. Asks the DC for
    /// no logon, so probes leave no failed-logon events in its audit log.
    pub async fn ping(&self) -> Result<(), AdError> {
        self.winbind_reachable().await?;
        let lines = self.pool.call(&Request::empty(), self.timeout).await?;
        if !lines.is_empty() {
            return Err(AdError::Protocol("empty request was answered".into()));
        }
        if let Some(dir) = &self.directory {
            dir.ping().await?;
        }
        Ok(())
    }

    /// Process ids of the helpers waiting for work. For diagnostics and
    /// tests; a busy helper is not listed.
    pub fn idle_helper_pids(&self) -> Vec<u32> {
        self.pool.idle_pids()
    }

    /// Helpers started so far (first starts and replacements).
    pub fn helpers_started(&self) -> u64 {
        self.pool.started.load(Ordering::Relaxed)
    }

    async fn winbind_reachable(&self) -> Result<(), AdError> {
        let connect = tokio::net::UnixStream::connect(&self.winbind_socket);
        match tokio::time::timeout(self.timeout, connect).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(AdError::Unavailable(format!(
                "winbindd socket {}: {e}",
                self.winbind_socket.display()
            ))),
            Err(_) => Err(AdError::Timeout),
        }
    }
}

/// A user or domain name we are willing to hand to winbind.
fn acceptable_name(s: &str, may_be_empty: bool) -> bool {
    (may_be_empty || !s.is_empty()) && s.len() <= MAX_FIELD_BYTES && !s.contains('\0')
}

// --- the ntlm-server-1 protocol (pure) ---------------------------------------

/// What ntlm_auth answers an empty request with; it ends every exchange.
const NO_USERNAME: &str = "Error: No username supplied!";

/// One request, including the trailing empty request. Holds secrets, so
/// its `Debug` shows nothing.
struct Request(String);

impl fmt::Debug for Request {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Request(<redacted>)")
    }
}

impl Request {
    /// Names and passwords go base64-encoded (`Key:: value`): no character
    /// in them can end a line or a request early.
    fn ntlm(user: &str, domain: &str, challenge: [u8; 8], lm: &[u8], nt: &[u8]) -> Self {
        let mut s = format!(
            "LANMAN-Challenge: {}\nNT-Response: {}\n",
            hex::encode(challenge),
            hex::encode(nt)
        );
        if nt.len() == 24 && lm.len() == 24 && lm.iter().any(|&b| b != 0) {
            s.push_str(&format!("LANMAN-Response: {}\n", hex::encode(lm)));
        }
        s.push_str(&format!("Username:: {}\n", B64.encode(user)));
        if !domain.is_empty() {
            s.push_str(&format!("NT-Domain:: {}\n", B64.encode(domain)));
        }
        s.push_str("Request-User-Session-Key: Yes\n.\n.\n");
        Request(s)
    }

    fn password(user: &str, domain: &str, password: &str) -> Self {
        let name = if domain.is_empty() {
            // ntlm_auth would otherwise join "(null)" and the user.
            format!("Full-Username:: {}\n", B64.encode(user))
        } else {
            format!(
                "Username:: {}\nNT-Domain:: {}\n",
                B64.encode(user),
                B64.encode(domain)
            )
        };
        Request(format!("{name}Password:: {}\n.\n.\n", B64.encode(password)))
    }

    /// Only the end marker: a liveness check that involves no logon.
    fn empty() -> Self {
        Request(".\n".into())
    }
}

/// The outcome of one request, as ntlm_auth reported it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Answer {
    Yes {
        user_session_key: Option<[u8; 16]>,
    },
    No {
        /// `Authentication-Error:`, the DC's reason (NTLM checks only).
        reason: Option<String>,
    },
}

/// Interprets the lines before the end marker.
fn parse_answer(lines: &[String]) -> Result<Answer, AdError> {
    let mut authenticated = None;
    let mut key = None;
    let mut reason = None;
    for line in lines {
        let (name, value) = line.split_once(": ").unwrap_or((line.as_str(), ""));
        match name {
            "." if value.is_empty() => {}
            "Authenticated" => {
                authenticated = Some(match value {
                    "Yes" => true,
                    "No" => false,
                    _ => {
                        return Err(AdError::Protocol(
                            "Authenticated: neither Yes nor No".into(),
                        ))
                    }
                })
            }
            "User-Session-Key" => {
                let mut k = [0u8; 16];
                hex::decode_to_slice(value, &mut k).map_err(|_| {
                    AdError::Protocol("User-Session-Key is not 16 hex bytes".into())
                })?;
                key = Some(k);
            }
            "LANMAN-Session-Key" => {}
            "Authentication-Error" => reason = Some(value.to_string()),
            "Error" => return Err(AdError::Protocol(redact(line))),
            _ => {
                return Err(AdError::Protocol(format!(
                    "unexpected reply line starting {:?}",
                    redact(name)
                )))
            }
        }
    }
    match authenticated {
        Some(true) => Ok(Answer::Yes {
            user_session_key: key,
        }),
        Some(false) => Ok(Answer::No { reason }),
        None => Err(AdError::Protocol("no Authenticated line".into())),
    }
}

/// Shortens a line from ntlm_auth for an error message, blanking long hex
/// runs: its `Error:` lines can quote what we sent (an NTLM response).
fn redact(line: &str) -> String {
    let words: Vec<String> = line
        .split(' ')
        .map(|w| {
            if w.len() >= 16 && w.chars().all(|c| c.is_ascii_hexdigit()) {
                "<hex>".to_string()
            } else {
                w.to_string()
            }
        })
        .collect();
    let mut s = words.join(" ");
    if s.len() > 120 {
        let mut cut = 120;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
        s.push('…');
    }
    s
}

/// Maps winbindd's reason for a failed NTLM check. winbindd reports the
/// friendly text of the NT status (`get_friendly_nt_error_msg`), or the
/// status name (`NT_STATUS_…`) when there is none; both are matched.
/// Anything unrecognised is a refusal: failing closed.
fn classify_failure(reason: Option<&str>) -> AdError {
    let Some(reason) = reason else {
        return AdError::BadCredentials;
    };
    let r = reason.to_ascii_lowercase();
    const RESTRICTED: &[&str] = &[
        "account_disabled",
        "currently disabled",
        "locked_out",
        "automatically locked",
        "account_expired",
        "account has expired",
        "password_expired",
        "password has expired",
        "password_must_change",
        "must be changed",
        "invalid_logon_hours",
        "logon hours",
        "invalid_workstation",
        "source workstation",
        "account_restriction",
        "account restrictions",
    ];
    const UNAVAILABLE: &[&str] = &[
        "winbind",
        "no_logon_servers",
        "no logon servers",
        "domain_controller_not_found",
        "domain controller",
        "trusted_relationship",
        "trust relationship",
        "no_trust",
        "trust account",
        "netlogon",
        "io_timeout",
        "timed out",
        "timeout",
        "access_denied",
        "access denied",
        "connection",
        "unsuccessful",
        "insufficient_resources",
        "insufficient system resources",
        "no_memory",
        "internal_error",
        "pipe",
    ];
    if RESTRICTED.iter().any(|n| r.contains(n)) {
        AdError::AccountDisabled
    } else if UNAVAILABLE.iter().any(|n| r.contains(n)) {
        AdError::Unavailable(redact(reason))
    } else {
        if !(r.contains("does not exist")
            || r.contains("not correct")
            || r.contains("logon is invalid")
            || r.contains("wrong_password")
            || r.contains("no_such_user")
            || r.contains("logon_failure"))
        {
            tracing::debug!(
                reason = %redact(reason),
                "unrecognised ntlm_auth failure reason, treated as bad credentials"
            );
        }
        AdError::BadCredentials
    }
}

// --- the helper pool -----------------------------------------------------------

/// A running `ntlm_auth`, used by one request at a time.
struct Helper {
    // Held for kill-on-drop: dropping a helper kills the process.
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    pid: u32,
}

/// Why a round trip failed.
enum Fault {
    /// The process went away (EOF, broken pipe); `answered` says whether any
    /// reply line had arrived.
    Died {
        answered: bool,
        detail: String,
    },
    Protocol(String),
}

/// Longest reply line and most lines we accept from a helper.
const MAX_LINE: u64 = 4096;
const MAX_LINES: usize = 32;

impl Helper {
    async fn round_trip(&mut self, request: &Request) -> Result<Vec<String>, Fault> {
        let died = |answered, e: std::io::Error| Fault::Died {
            answered,
            detail: e.to_string(),
        };
        self.stdin
            .write_all(request.0.as_bytes())
            .await
            .map_err(|e| died(false, e))?;
        self.stdin.flush().await.map_err(|e| died(false, e))?;
        let mut lines = Vec::new();
        loop {
            let line = self.read_line(!lines.is_empty()).await?;
            if line == NO_USERNAME {
                let dot = self.read_line(true).await?;
                if dot != "." {
                    return Err(Fault::Protocol("end marker not followed by '.'".into()));
                }
                return Ok(lines);
            }
            if lines.len() == MAX_LINES {
                return Err(Fault::Protocol("reply too long".into()));
            }
            lines.push(line);
        }
    }

    async fn read_line(&mut self, answered: bool) -> Result<String, Fault> {
        let mut buf = Vec::new();
        let n = (&mut self.stdout)
            .take(MAX_LINE)
            .read_until(b'\n', &mut buf)
            .await
            .map_err(|e| Fault::Died {
                answered,
                detail: e.to_string(),
            })?;
        if n == 0 {
            return Err(Fault::Died {
                answered,
                detail: "ntlm_auth closed its output".into(),
            });
        }
        if buf.last() != Some(&b'\n') {
            return Err(Fault::Protocol("reply line too long".into()));
        }
        buf.pop();
        String::from_utf8(buf).map_err(|_| Fault::Protocol("reply is not UTF-8".into()))
    }
}

struct Pool {
    program: PathBuf,
    args: Vec<OsString>,
    size: usize,
    idle: Mutex<Vec<Helper>>,
    /// One permit per helper: at most `size` requests in flight.
    slots: Semaphore,
    started: AtomicU64,
}

impl Pool {
    /// Runs one request within `timeout` (waiting for a free helper
    /// included) and returns the reply lines before the end marker.
    async fn call(&self, request: &Request, timeout: Duration) -> Result<Vec<String>, AdError> {
        let deadline = Instant::now() + timeout;
        let _permit = tokio::time::timeout_at(deadline, self.slots.acquire())
            .await
            .map_err(|_| AdError::Timeout)?
            .map_err(|_| AdError::Unavailable("helper pool closed".into()))?;
        // A helper that died while idle is found out by the first request
        // that uses it; that request gets one fresh helper.
        let mut retried = false;
        loop {
            let (mut helper, reused) = match self.take_idle() {
                Some(h) => (h, true),
                None => (self.spawn()?, false),
            };
            match tokio::time::timeout_at(deadline, helper.round_trip(request)).await {
                Err(_) => {
                    tracing::warn!(
                        pid = helper.pid,
                        timeout = ?timeout,
                        "ntlm_auth helper did not answer in time; killing it"
                    );
                    let _ = helper.child.start_kill();
                    return Err(AdError::Timeout);
                }
                Ok(Ok(lines)) => {
                    self.put_idle(helper);
                    return Ok(lines);
                }
                Ok(Err(Fault::Died { answered, detail })) => {
                    let status = helper.child.try_wait().ok().flatten();
                    tracing::warn!(pid = helper.pid, ?status, %detail, "ntlm_auth helper died");
                    if reused && !answered && !retried {
                        retried = true;
                        continue;
                    }
                    return Err(AdError::Unavailable(format!(
                        "ntlm_auth exited ({})",
                        status.map_or_else(|| detail.clone(), |s| s.to_string())
                    )));
                }
                Ok(Err(Fault::Protocol(m))) => {
                    tracing::warn!(
                        pid = helper.pid,
                        error = %m,
                        "ntlm_auth helper out of step; killing it"
                    );
                    let _ = helper.child.start_kill();
                    return Err(AdError::Protocol(m));
                }
            }
        }
    }

    fn take_idle(&self) -> Option<Helper> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        while let Some(mut h) = idle.pop() {
            match h.child.try_wait() {
                Ok(None) => return Some(h),
                status => {
                    tracing::warn!(
                        pid = h.pid,
                        ?status,
                        "idle ntlm_auth helper had exited; replacing it"
                    )
                }
            }
        }
        None
    }

    fn put_idle(&self, helper: Helper) {
        self.idle
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(helper);
    }

    fn idle_pids(&self) -> Vec<u32> {
        let idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        idle.iter().map(|h| h.pid).collect()
    }

    fn spawn(&self) -> Result<Helper, AdError> {
        let mut child = Command::new(&self.program)
            .args(&self.args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| {
                AdError::Unavailable(format!("cannot start {}: {e}", self.program.display()))
            })?;
        let pid = child.id().unwrap_or(0);
        let (Some(stdin), Some(stdout), Some(stderr)) =
            (child.stdin.take(), child.stdout.take(), child.stderr.take())
        else {
            return Err(AdError::Unavailable("ntlm_auth without pipes".into()));
        };
        // ntlm_auth's diagnostics (it cannot reach winbindd, …) go to the
        // log. They never contain request data.
        tokio::spawn(async move {
            let mut lines = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                tracing::warn!(pid, message = %redact(&line), "ntlm_auth");
            }
        });
        self.started.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(pid, "ntlm_auth helper started");
        Ok(Helper {
            child,
            stdin,
            stdout: BufReader::new(stdout),
            pid,
        })
    }
}

// --- LDAP ----------------------------------------------------------------------

/// `LDAP_MATCHING_RULE_IN_CHAIN`: AD walks nested membership server-side.
const IN_CHAIN: &str = "1.2.840.113556.1.4.1941";
/// `userAccountControl` ACCOUNTDISABLE.
const UF_ACCOUNTDISABLE: u32 = 0x2;

struct Directory {
    cfg: LdapConfig,
    timeout: Duration,
    /// One bound connection, multiplexed; replaced when it breaks.
    conn: tokio::sync::Mutex<Option<Ldap>>,
    cache: moka::future::Cache<String, Arc<DirectoryEntry>>,
}

/// `CORP\alice` → `alice`; `alice@corp.example` stays (it is matched
/// against `userPrincipalName`).
fn directory_name(user: &str) -> &str {
    user.rsplit_once('\\').map_or(user, |(_, u)| u)
}

fn attr<'a>(e: &'a SearchEntry, name: &str) -> &'a [String] {
    e.attrs
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map_or(&[], |(_, v)| v.as_slice())
}

/// `mail` first, then SMTP proxy addresses, each once.
fn collect_addresses(mail: &[String], proxy: &[String]) -> Vec<String> {
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    let smtp = proxy.iter().filter_map(|p| {
        let (kind, addr) = p.split_once(':')?;
        kind.eq_ignore_ascii_case("smtp").then_some(addr)
    });
    for a in mail.iter().map(String::as_str).chain(smtp) {
        let a = a.trim();
        if !a.is_empty() && seen.insert(a.to_ascii_lowercase()) {
            out.push(a.to_string());
        }
    }
    out
}

fn ldap_unavailable(what: &str, e: &LdapError) -> AdError {
    match e {
        LdapError::Timeout { .. } => AdError::Timeout,
        _ => AdError::Unavailable(format!("LDAP {what}: {e}")),
    }
}

/// Errors that mean the connection is gone rather than the request refused.
fn connection_broken(e: &LdapError) -> bool {
    matches!(
        e,
        LdapError::Io { .. }
            | LdapError::OpSend { .. }
            | LdapError::ResultRecv { .. }
            | LdapError::IdScrubSend { .. }
            | LdapError::EndOfStream
    )
}

impl Directory {
    async fn entry(&self, user: &str) -> Result<Arc<DirectoryEntry>, AdError> {
        let name = directory_name(user);
        if !acceptable_name(name, false) {
            return Err(AdError::NoSuchUser(user.to_string()));
        }
        self.cache
            .try_get_with(name.to_lowercase(), self.fetch(name))
            .await
            .map_err(|e| (*e).clone())
    }

    async fn fetch(&self, name: &str) -> Result<Arc<DirectoryEntry>, AdError> {
        let escaped = ldap3::ldap_escape(name);
        let filter = format!(
            "(&(objectCategory=person)(objectClass=user)(|(sAMAccountName={escaped})(userPrincipalName={escaped})))"
        );
        let attrs = [
            "sAMAccountName",
            "mail",
            "proxyAddresses",
            "userAccountControl",
        ];
        let users = self.search(&filter, &attrs).await?;
        let user = match users.as_slice() {
            [] => return Err(AdError::NoSuchUser(name.to_string())),
            [one] => one,
            _ => {
                return Err(AdError::Protocol(format!(
                    "{} directory entries match user {name:?}",
                    users.len()
                )))
            }
        };
        let filter = format!(
            "(&(objectClass=group)(member:{IN_CHAIN}:={}))",
            ldap3::ldap_escape(user.dn.as_str())
        );
        let mut groups: Vec<String> = self
            .search(&filter, &["cn"])
            .await?
            .iter()
            .filter_map(|g| attr(g, "cn").first().cloned())
            .collect();
        groups.sort();
        groups.dedup();
        let uac: u32 = attr(user, "userAccountControl")
            .first()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        Ok(Arc::new(DirectoryEntry {
            dn: user.dn.clone(),
            account_name: attr(user, "sAMAccountName")
                .first()
                .cloned()
                .unwrap_or_else(|| name.to_string()),
            groups,
            addresses: collect_addresses(attr(user, "mail"), attr(user, "proxyAddresses")),
            enabled: uac & UF_ACCOUNTDISABLE == 0,
        }))
    }

    /// A subtree search under `base_dn`, referrals dropped. Retries once on
    /// a fresh connection when the kept one turns out broken (AD closes
    /// idle connections after 15 minutes).
    async fn search(&self, filter: &str, attrs: &[&str]) -> Result<Vec<SearchEntry>, AdError> {
        let mut retried = false;
        loop {
            let (mut ldap, fresh) = self.connection().await?;
            let result = ldap
                .with_timeout(self.timeout)
                .search(&self.cfg.base_dn, Scope::Subtree, filter, attrs.to_vec())
                .await
                .and_then(|r| r.success());
            match result {
                Ok((entries, _)) => {
                    return Ok(entries
                        .into_iter()
                        .filter(|e| !e.is_ref() && !e.is_intermediate())
                        .map(SearchEntry::construct)
                        .collect())
                }
                Err(e) if connection_broken(&e) => {
                    *self.conn.lock().await = None;
                    if fresh || retried {
                        return Err(ldap_unavailable("search", &e));
                    }
                    retried = true;
                }
                Err(e @ LdapError::Timeout { .. }) => {
                    *self.conn.lock().await = None;
                    return Err(ldap_unavailable("search", &e));
                }
                Err(e) => return Err(AdError::Protocol(format!("LDAP search: {e}"))),
            }
        }
    }

    async fn ping(&self) -> Result<(), AdError> {
        let (mut ldap, _) = self.connection().await?;
        let r = ldap
            .with_timeout(self.timeout)
            .search(
                "",
                Scope::Base,
                "(objectClass=*)",
                vec!["defaultNamingContext"],
            )
            .await
            .and_then(|r| r.success());
        if let Err(e) = r {
            *self.conn.lock().await = None;
            return Err(ldap_unavailable("root DSE", &e));
        }
        Ok(())
    }

    /// The kept connection, or a new bound one (`true`).
    async fn connection(&self) -> Result<(Ldap, bool), AdError> {
        let mut kept = self.conn.lock().await;
        if let Some(ldap) = kept.as_mut() {
            if !ldap.is_closed() {
                return Ok((ldap.clone(), false));
            }
        }
        let ldap = tokio::time::timeout(self.timeout, self.connect())
            .await
            .map_err(|_| AdError::Timeout)??;
        *kept = Some(ldap.clone());
        Ok((ldap, true))
    }

    async fn connect(&self) -> Result<Ldap, AdError> {
        let settings = LdapConnSettings::new()
            .set_conn_timeout(self.timeout)
            .set_starttls(self.cfg.starttls);
        let (conn, mut ldap) = LdapConnAsync::with_settings(settings, &self.cfg.url)
            .await
            .map_err(|e| ldap_unavailable(&format!("connect to {}", self.cfg.url), &e))?;
        let url = self.cfg.url.clone();
        tokio::spawn(async move {
            if let Err(e) = conn.drive().await {
                tracing::warn!(url = %url, error = %e, "LDAP connection ended");
            }
        });
        let password = read_password_file(&self.cfg.bind_password_file)?;
        ldap.with_timeout(self.timeout)
            .simple_bind(&self.cfg.bind_dn, &password)
            .await
            .and_then(|r| r.success())
            .map_err(|e| ldap_unavailable(&format!("bind as {}", self.cfg.bind_dn), &e))?;
        tracing::debug!(url = %self.cfg.url, bind_dn = %self.cfg.bind_dn, "LDAP connected");
        Ok(ldap)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(s: &str) -> Vec<String> {
        s.lines().map(str::to_string).collect()
    }

    #[test]
    fn answers_table() {
        let k: [u8; 16] = std::array::from_fn(|i| i as u8);
        let cases: Vec<(&str, Result<Answer, &str>)> = vec![
            (
                "Authenticated: Yes\nUser-Session-Key: 000102030405060708090a0b0c0d0e0f\n.",
                Ok(Answer::Yes {
                    user_session_key: Some(k),
                }),
            ),
            ("Authenticated: Yes\n.", Ok(Answer::Yes { user_session_key: None })),
            (
                "Authenticated: Yes\nLANMAN-Session-Key: 0011223344556677\nUser-Session-Key: 000102030405060708090a0b0c0d0e0f\n.",
                Ok(Answer::Yes {
                    user_session_key: Some(k),
                }),
            ),
            // NTLM failure: two dots.
            (
                "Authenticated: No\nAuthentication-Error: The specified account does not exist.\n.\n.",
                Ok(Answer::No {
                    reason: Some("The specified account does not exist.".into()),
                }),
            ),
            // Password failure: one dot, no reason.
            ("Authenticated: No\n.", Ok(Answer::No { reason: None })),
            ("Authenticated: Maybe\n.", Err("directory_protocol_error")),
            ("User-Session-Key: 0011\nAuthenticated: Yes\n.", Err("directory_protocol_error")),
            ("Error: Unknown request Bogus\n.", Err("directory_protocol_error")),
            ("Surprise: yes\n.", Err("directory_protocol_error")),
            (".", Err("directory_protocol_error")),
        ];
        for (reply, want) in cases {
            let got = parse_answer(&lines(reply));
            match want {
                Ok(a) => assert_eq!(got, Ok(a), "{reply:?}"),
                Err(label) => assert_eq!(got.unwrap_err().metric_label(), label, "{reply:?}"),
            }
        }
    }

    #[test]
    fn failure_reasons_table() {
        use AdError::*;
        let cases: &[(&str, AdError)] = &[
            ("When trying to update a password, this return status indicates that the value provided as the current password is not correct.", BadCredentials),
            ("The specified account does not exist.", BadCredentials),
            ("The attempted logon is invalid. This is either due to a bad username or authentication information.", BadCredentials),
            ("NT_STATUS_WRONG_PASSWORD", BadCredentials),
            ("something new", BadCredentials),
            ("The referenced account is currently disabled and cannot be logged on to.", AccountDisabled),
            ("The user account has been automatically locked because too many invalid logon attempts or password change attempts have been requested.", AccountDisabled),
            ("The user's account has expired.", AccountDisabled),
            ("NT_STATUS_PASSWORD_MUST_CHANGE", AccountDisabled),
            ("NT_STATUS_INVALID_LOGON_HOURS", AccountDisabled),
        ];
        for (reason, want) in cases {
            assert_eq!(&classify_failure(Some(reason)), want, "{reason}");
        }
        for reason in [
            "Reading winbind reply failed!",
            "winbind client error",
            "There are currently no logon servers available to service the logon request.",
            "NT_STATUS_NO_LOGON_SERVERS",
            "The logon request failed because the trust relationship between this workstation and the primary domain failed.",
            "{Access Denied} A process has requested access to an object but has not been granted those access rights.",
            "NT_STATUS_IO_TIMEOUT",
        ] {
            assert_eq!(
                classify_failure(Some(reason)).metric_label(),
                "directory_unavailable",
                "{reason}"
            );
        }
        assert_eq!(classify_failure(None), BadCredentials);
    }

    #[test]
    fn requests_encode_everything_that_could_break_a_line() {
        let r = Request::ntlm("al\nice", "CO: RP", *b"12345678", &[0; 24], &[0xab; 40]);
        assert_eq!(
            r.0,
            format!(
                "LANMAN-Challenge: 3132333435363738\nNT-Response: {}\nUsername:: {}\nNT-Domain:: {}\n\
                 Request-User-Session-Key: Yes\n.\n.\n",
                "ab".repeat(40),
                B64.encode("al\nice"),
                B64.encode("CO: RP")
            )
        );
        // An NTLMv1 response carries its LM response; an empty domain is
        // left to winbind.
        let r = Request::ntlm("bob", "", *b"12345678", &[7; 24], &[1; 24]);
        assert!(r
            .0
            .contains(&format!("LANMAN-Response: {}\n", "07".repeat(24))));
        assert!(!r.0.contains("NT-Domain"));
        let r = Request::password("alice", "CORP", "p: w\n.\n");
        assert_eq!(
            r.0,
            format!(
                "Username:: {}\nNT-Domain:: {}\nPassword:: {}\n.\n.\n",
                B64.encode("alice"),
                B64.encode("CORP"),
                B64.encode("p: w\n.\n")
            )
        );
        assert!(Request::password("alice@corp.example", "", "x")
            .0
            .starts_with(&format!(
                "Full-Username:: {}\n",
                B64.encode("alice@corp.example")
            )));
        assert_eq!(format!("{r:?}"), "Request(<redacted>)");
    }

    #[test]
    fn redact_blanks_hex_and_shortens() {
        let hex = "ab".repeat(100);
        let r = redact(&format!("Error: hex decode of {hex} failed! (got 3 bytes)"));
        assert_eq!(r, "Error: hex decode of <hex> failed! (got 3 bytes)");
        assert!(redact(&"word ".repeat(100)).chars().count() <= 121);
    }

    #[test]
    fn addresses_are_mail_then_smtp_proxies_once() {
        let mail = vec!["Alice@corp.example".to_string()];
        let proxy: Vec<String> = [
            "SMTP:alice@corp.example",
            "smtp:a.l@corp.example",
            "X400:c=US;a= ;p=Corp",
            "sip:alice@corp.example",
            "smtp:A.L@corp.example",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        assert_eq!(
            collect_addresses(&mail, &proxy),
            ["Alice@corp.example", "a.l@corp.example"]
        );
        assert_eq!(collect_addresses(&[], &[]), Vec::<String>::new());
    }

    #[test]
    fn directory_names() {
        assert_eq!(directory_name("CORP\\alice"), "alice");
        assert_eq!(directory_name("alice@corp.example"), "alice@corp.example");
        assert_eq!(directory_name("alice"), "alice");
    }

    #[test]
    fn config_defaults_and_strictness() {
        let c: AdConfig = serde_norway::from_str("{}").unwrap();
        assert_eq!(c.ntlm_auth, PathBuf::from("/usr/bin/ntlm_auth"));
        assert_eq!(c.winbind_socket_dir, PathBuf::from("/run/samba/winbindd"));
        assert_eq!(c.helpers, 4);
        assert_eq!(c.timeout, Duration::from_secs(10));
        assert!(c.ldap.is_none());
        let e = serde_norway::from_str::<AdConfig>("helpers: 2\nhelper: 3\n").unwrap_err();
        assert!(e.to_string().contains("unknown field `helper`"), "{e}");
        let l: LdapConfig = serde_norway::from_str(
            "url: ldap://dc\nbind_dn: CN=x\nbind_password_file: /p\nbase_dn: DC=x\n",
        )
        .unwrap();
        assert_eq!(l.cache_ttl, Duration::from_secs(300));
        assert!(!l.starttls);
    }

    // --- the pool, against scripted helpers ------------------------------------

    /// A stand-in for ntlm_auth: a shell script speaking the helper
    /// protocol. User `hang` never gets an answer, `die` kills the helper
    /// mid-request, `quit` is accepted and then the helper exits (it dies
    /// while idle), `bad` is refused with the two-dot NTLM failure, `plain`
    /// is refused with the one-dot password failure, anyone else is
    /// accepted with session key 00..0f.
    const FAKE_HELPER: &str = r#"#!/bin/sh
user=""
quit=""
while IFS= read -r line; do
  case "$line" in
    "Username:: "*) user=$(printf %s "${line#Username:: }" | base64 -d) ;;
    .)
      case "$user" in
        "") printf 'Error: No username supplied!\n.\n'; [ -z "$quit" ] || exit 0 ;;
        quit) quit=1; printf 'Authenticated: Yes\nUser-Session-Key: 000102030405060708090a0b0c0d0e0f\n.\n' ;;
        hang) exec sleep 60 ;;
        die) exit 3 ;;
        bad) printf 'Authenticated: No\nAuthentication-Error: The specified account does not exist.\n.\n.\n' ;;
        plain) printf 'Authenticated: No\n.\n' ;;
        *) printf 'Authenticated: Yes\nUser-Session-Key: 000102030405060708090a0b0c0d0e0f\n.\n' ;;
      esac
      user="" ;;
  esac
done
"#;

    struct Fake {
        dir: tempfile::TempDir,
        ad: Arc<ActiveDirectory>,
        _winbind: Option<std::os::unix::net::UnixListener>,
    }

    fn fake(helpers: usize, timeout: Duration, winbind_up: bool) -> Fake {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("ntlm_auth");
        std::fs::write(&script, FAKE_HELPER).unwrap();
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        let winbind = winbind_up
            .then(|| std::os::unix::net::UnixListener::bind(dir.path().join("pipe")).unwrap());
        let cfg = AdConfig {
            ntlm_auth: script,
            samba_config: None,
            winbind_socket_dir: dir.path().to_path_buf(),
            helpers,
            timeout,
            ldap: None,
        };
        Fake {
            ad: ActiveDirectory::new(&cfg).unwrap(),
            dir,
            _winbind: winbind,
        }
    }

    const KEY: [u8; 16] = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15];

    async fn ntlm(ad: &ActiveDirectory, user: &str) -> Result<[u8; 16], AdError> {
        ad.verify_ntlm(user, "CORP", [1; 8], &[0; 24], &[2; 48])
            .await
    }

    #[tokio::test]
    async fn helpers_are_reused_and_failures_keep_them_in_step() {
        let f = fake(2, Duration::from_secs(10), true);
        assert_eq!(ntlm(&f.ad, "alice").await, Ok(KEY));
        let pid = f.ad.idle_helper_pids();
        assert_eq!(pid.len(), 1);
        // The two-dot failure must not leave a dot behind for the next one.
        assert_eq!(ntlm(&f.ad, "bad").await, Err(AdError::BadCredentials));
        assert_eq!(ntlm(&f.ad, "alice").await, Ok(KEY));
        assert_eq!(
            f.ad.verify_password("plain", "CORP", "pw").await,
            Err(AdError::BadCredentials)
        );
        assert_eq!(f.ad.verify_password("alice", "CORP", "pw").await, Ok(()));
        assert_eq!(f.ad.idle_helper_pids(), pid, "one helper did all of it");
        assert_eq!(f.ad.helpers_started(), 1);
        f.ad.ping().await.unwrap();
    }

    #[tokio::test]
    async fn a_hung_helper_is_killed_and_replaced() {
        let f = fake(1, Duration::from_millis(300), true);
        assert_eq!(ntlm(&f.ad, "alice").await, Ok(KEY));
        let [pid] = f.ad.idle_helper_pids()[..] else {
            panic!("one idle helper expected")
        };
        let started = std::time::Instant::now();
        assert_eq!(ntlm(&f.ad, "hang").await, Err(AdError::Timeout));
        assert!(started.elapsed() < Duration::from_secs(5));
        assert!(f.ad.idle_helper_pids().is_empty());
        assert_eq!(ntlm(&f.ad, "alice").await, Ok(KEY));
        let [new_pid] = f.ad.idle_helper_pids()[..] else {
            panic!("one idle helper expected")
        };
        assert_ne!(new_pid, pid);
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists()
                || std::fs::read_to_string(format!("/proc/{pid}/stat"))
                    .is_ok_and(|s| s.contains(") Z")),
            "timed-out helper {pid} still running"
        );
    }

    #[tokio::test]
    async fn waiting_for_a_busy_pool_counts_against_the_timeout() {
        // One helper, two hung requests: the second waits for the helper
        // and then for its answer, but never longer than its own timeout.
        let f = fake(1, Duration::from_millis(500), true);
        let started = std::time::Instant::now();
        let (a, b) = tokio::join!(ntlm(&f.ad, "hang"), ntlm(&f.ad, "hang"));
        assert_eq!((a, b), (Err(AdError::Timeout), Err(AdError::Timeout)));
        // Waiting in turn would take two timeouts.
        assert!(
            started.elapsed() < Duration::from_millis(900),
            "{:?}",
            started.elapsed()
        );
    }

    #[tokio::test]
    async fn a_helper_dying_mid_request_is_unavailable_and_replaced() {
        let f = fake(1, Duration::from_secs(10), true);
        assert!(matches!(
            ntlm(&f.ad, "die").await,
            Err(AdError::Unavailable(_))
        ));
        assert_eq!(ntlm(&f.ad, "alice").await, Ok(KEY));
        assert_eq!(f.ad.helpers_started(), 2);
    }

    #[tokio::test]
    async fn a_helper_that_died_while_idle_is_replaced_transparently() {
        let f = fake(1, Duration::from_secs(10), true);
        assert_eq!(ntlm(&f.ad, "quit").await, Ok(KEY));
        // Whether the exit is already visible (replaced at once) or not
        // (found out by a failed write or read, then retried), the next
        // request just works.
        assert_eq!(ntlm(&f.ad, "alice").await, Ok(KEY));
        assert_eq!(f.ad.helpers_started(), 2);
        assert_eq!(ntlm(&f.ad, "alice").await, Ok(KEY));
        assert_eq!(f.ad.helpers_started(), 2);
    }

    #[tokio::test]
    async fn password_failure_without_winbindd_is_unavailable() {
        let f = fake(1, Duration::from_secs(10), false);
        assert!(matches!(
            f.ad.verify_password("plain", "CORP", "pw").await,
            Err(AdError::Unavailable(_))
        ));
        assert!(matches!(f.ad.ping().await, Err(AdError::Unavailable(_))));
        drop(f.dir);
    }

    #[tokio::test]
    async fn credentials_winbind_would_truncate_are_refused_unasked() {
        let f = fake(1, Duration::from_secs(10), true);
        let long = "x".repeat(256);
        for (user, domain, pw) in [
            ("alice", "CORP", long.as_str()),
            ("alice", "CORP", "pass\0word"),
            ("alice", "CORP", ""),
            (long.as_str(), "CORP", "pw"),
            ("al\0ice", "CORP", "pw"),
            ("", "CORP", "pw"),
        ] {
            assert_eq!(
                f.ad.verify_password(user, domain, pw).await,
                Err(AdError::BadCredentials)
            );
        }
        assert_eq!(
            f.ad.verify_ntlm("alice", "CORP", [0; 8], &[], &[0; 23])
                .await,
            Err(AdError::BadCredentials)
        );
        assert_eq!(f.ad.helpers_started(), 0, "nothing reached a helper");
    }

    #[test]
    fn who_is_at_fault() {
        for e in [
            AdError::BadCredentials,
            AdError::AccountDisabled,
            AdError::NoSuchUser("x".into()),
        ] {
            assert!(e.is_client_fault(), "{e}");
        }
        for e in [
            AdError::Unavailable("x".into()),
            AdError::Timeout,
            AdError::Protocol("x".into()),
            AdError::Config("x".into()),
        ] {
            assert!(!e.is_client_fault(), "{e}");
        }
    }

    #[test]
    fn futures_can_be_spawned() {
        // Sessions run on tokio::spawn: every future must be Send.
        fn send<T: Send>(_: &T) {}
        let f = fake(1, Duration::from_secs(1), true);
        let ad = &f.ad;
        send(&ad.verify_ntlm("u", "d", [0; 8], &[], &[0; 24]));
        send(&ad.verify_password("u", "d", "p"));
        send(&ad.entry("u"));
        send(&ad.groups("u"));
        send(&ad.addresses("u"));
        send(&ad.ping());
        fn shared<T: Send + Sync>() {}
        shared::<ActiveDirectory>();
    }

    #[test]
    fn validation_names_the_field() {
        let dir = tempfile::tempdir().unwrap();
        let base = AdConfig {
            ntlm_auth: PathBuf::from("/bin/sh"),
            samba_config: None,
            winbind_socket_dir: default_winbind_socket_dir(),
            helpers: 4,
            timeout: Duration::from_secs(1),
            ldap: None,
        };
        base.validate().unwrap();
        let pw = dir.path().join("pw");
        std::fs::write(&pw, "secret\n").unwrap();
        let ldap = LdapConfig {
            url: "ldap://dc".into(),
            starttls: false,
            bind_dn: "CN=x".into(),
            bind_password_file: pw.clone(),
            base_dn: "DC=x".into(),
            cache_ttl: Duration::from_secs(1),
        };
        assert_eq!(read_password_file(&pw).unwrap(), "secret");
        let cases: Vec<(AdConfig, &str)> = vec![
            (
                AdConfig {
                    ntlm_auth: "/nonexistent/ntlm_auth".into(),
                    ..base.clone()
                },
                "ntlm_auth:",
            ),
            (
                AdConfig {
                    samba_config: Some("/nonexistent/smb.conf".into()),
                    ..base.clone()
                },
                "samba_config:",
            ),
            (
                AdConfig {
                    helpers: 0,
                    ..base.clone()
                },
                "helpers:",
            ),
            (
                AdConfig {
                    timeout: Duration::ZERO,
                    ..base.clone()
                },
                "timeout:",
            ),
            (
                AdConfig {
                    ldap: Some(LdapConfig {
                        url: "http://dc".into(),
                        ..ldap.clone()
                    }),
                    ..base.clone()
                },
                "ldap.url:",
            ),
            (
                AdConfig {
                    ldap: Some(LdapConfig {
                        bind_password_file: dir.path().join("missing"),
                        ..ldap.clone()
                    }),
                    ..base.clone()
                },
                "ldap.bind_password_file:",
            ),
            (
                AdConfig {
                    ldap: Some(LdapConfig {
                        base_dn: " ".into(),
                        ..ldap.clone()
                    }),
                    ..base.clone()
                },
                "ldap.base_dn:",
            ),
        ];
        for (cfg, field) in cases {
            let e = cfg.validate().unwrap_err();
            assert!(
                matches!(&e, AdError::Config(m) if m.starts_with(field)),
                "{field}: {e}"
            );
            assert!(e.to_string().starts_with("active_directory."));
        }
    }
}
