//! Authentication: who is this client? (Never: may it relay? That is the
//! policy's separate question.)
//!
//! RelayGuard verifies every mechanism itself — NTLM through the sans-IO
//! server in `policy::ntlm`, PLAIN and LOGIN against the NT hash of the
//! password — against the configured identity source. The backend's
//! opinion is never asked. The outcome is a [`Principal`].

pub mod ad;
pub mod sasl;

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use serde::Deserialize;
use subtle::ConstantTimeEq;

use policy::clock::{Clock, SystemClock};
use policy::identity::{Account, CredentialStore, UsersFile};
use policy::ntlm::{ChannelBindingMode, NtlmConfig, NtlmError, ReplayCache, ServerHandshake};

/// `auth:` in the configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// Mechanisms offered, in EHLO order.
    #[serde(default = "default_mechanisms")]
    pub mechanisms: Vec<Mechanism>,
    pub ntlm: NtlmSettings,
    /// YAML file of accounts with NT hashes (see `relayguard hash-password`).
    /// Exactly one of `users_file` and `active_directory` is set.
    #[serde(default)]
    pub users_file: Option<PathBuf>,
    /// Pass-through verification with a domain controller through Samba's
    /// winbind (`ntlm_auth`), groups and addresses from LDAP.
    #[serde(default)]
    pub active_directory: Option<ad::AdConfig>,
    #[serde(default)]
    pub lockout: LockoutConfig,
}

fn default_mechanisms() -> Vec<Mechanism> {
    vec![Mechanism::Ntlm, Mechanism::Login, Mechanism::Plain]
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mechanism {
    Ntlm,
    Plain,
    Login,
}

impl Mechanism {
    pub fn name(self) -> &'static str {
        match self {
            Mechanism::Ntlm => "NTLM",
            Mechanism::Plain => "PLAIN",
            Mechanism::Login => "LOGIN",
        }
    }

    /// Mechanisms that send the password itself are only offered over TLS.
    pub fn sends_password(self) -> bool {
        !matches!(self, Mechanism::Ntlm)
    }
}

/// What the NTLM CHALLENGE publishes and what it accepts. Published names
/// come from here only, never from the backend, so a scanner such as
/// nmap's `smtp-ntlm-info` learns only what the operator chose.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NtlmSettings {
    pub netbios_domain: String,
    pub netbios_computer: String,
    pub dns_domain: String,
    pub dns_computer: String,
    #[serde(default)]
    pub dns_tree: Option<String>,
    #[serde(default = "yes")]
    pub send_version: bool,
    /// Accept NTLMv1/NTLMv1-ESS (crackable; logged as weak and counted).
    #[serde(default)]
    pub allow_ntlmv1: bool,
    /// Refuse NTLMv2 without a MIC (curl sends none; Windows SSPI does).
    #[serde(default)]
    pub require_mic: bool,
    #[serde(default = "default_window", with = "humantime_serde")]
    pub timestamp_window: Duration,
    #[serde(default)]
    pub channel_binding: ChannelBinding,
}

fn yes() -> bool {
    true
}

fn default_window() -> Duration {
    NtlmConfig::DEFAULT_TIMESTAMP_WINDOW
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChannelBinding {
    Off,
    #[default]
    WhenSupported,
    Required,
}

/// Brute-force protection.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LockoutConfig {
    /// Failed AUTH attempts from one client address (any account) before
    /// that address gets `454 4.7.0` for the rest of the lockout.
    pub max_failures_per_client: u32,
    /// Failed attempts for one account from one address before that
    /// account is refused from that address. Keyed by address too, so an
    /// attacker guessing from elsewhere cannot lock the real user out.
    pub max_failures_per_account: u32,
    /// How long failures are remembered (and a lockout lasts) after the
    /// last one.
    #[serde(with = "humantime_serde")]
    pub window: Duration,
    /// Added to every failed attempt, the same for every cause, so that
    /// guessing is slow and timing tells nothing.
    #[serde(with = "humantime_serde")]
    pub failure_delay: Duration,
}

impl Default for LockoutConfig {
    fn default() -> Self {
        LockoutConfig {
            max_failures_per_client: 10,
            max_failures_per_account: 5,
            window: Duration::from_secs(15 * 60),
            failure_delay: Duration::from_secs(1),
        }
    }
}

impl AuthConfig {
    pub fn ntlm_config(&self) -> NtlmConfig {
        let n = &self.ntlm;
        let mut c = NtlmConfig::new(
            &n.netbios_domain,
            &n.netbios_computer,
            &n.dns_domain,
            &n.dns_computer,
        );
        c.dns_tree = n.dns_tree.clone();
        c.send_version = n.send_version;
        c.allow_ntlmv1 = n.allow_ntlmv1;
        c.require_mic = n.require_mic;
        c.timestamp_window = n.timestamp_window;
        c.channel_binding = match n.channel_binding {
            ChannelBinding::Off => ChannelBindingMode::Off,
            ChannelBinding::WhenSupported => ChannelBindingMode::WhenSupported,
            ChannelBinding::Required => ChannelBindingMode::Required,
        };
        c
    }
}

/// Who the client proved to be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// Who, with groups and own addresses, as the relay policy sees it.
    pub relay: policy::relay::Principal,
    pub mechanism: Mechanism,
    /// NTLM version, for logs (`v2`, or `v1` when allowed and weak).
    pub detail: Option<&'static str>,
}

impl Principal {
    fn from_account(a: Account, mechanism: Mechanism, detail: Option<&'static str>) -> Self {
        let relay = policy::relay::Principal {
            user: a.user,
            domain: a.domain,
            groups: a.groups,
            mechanism: match mechanism {
                Mechanism::Ntlm => policy::relay::Mechanism::Ntlm,
                Mechanism::Plain => policy::relay::Mechanism::Plain,
                Mechanism::Login => policy::relay::Mechanism::Login,
            },
            addresses: a.mail,
        };
        Principal {
            relay,
            mechanism,
            detail,
        }
    }

    /// `DOMAIN\user`, as Windows writes it.
    pub fn display(&self) -> String {
        self.relay.to_string()
    }
}

/// Why an AUTH failed; the session turns it into a reply, the label goes
/// to logs (and metrics).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthFailure {
    /// The client's bytes were not a valid exchange: `501 5.5.2`.
    #[error("malformed: {0}")]
    Malformed(&'static str),
    /// A well-formed attempt that failed: `535 5.7.3`, one text for all.
    #[error("{0}")]
    Refused(&'static str),
    /// Too many failures for this account from this address: `535`.
    #[error("locked out")]
    LockedOut,
    /// Too many failures from this address: `454 4.7.0`.
    #[error("client address locked out")]
    ClientLockedOut,
    /// The identity source could not decide (directory down, timeout):
    /// `454 4.7.0`, the client retries; never counted against it.
    #[error("temporary failure: {0}")]
    Temporary(&'static str),
}

impl AuthFailure {
    pub fn label(&self) -> &'static str {
        match self {
            AuthFailure::Malformed(_) => "malformed",
            AuthFailure::Refused(l) => l,
            AuthFailure::LockedOut => "locked_out",
            AuthFailure::ClientLockedOut => "client_locked_out",
            AuthFailure::Temporary(l) => l,
        }
    }
}

impl From<NtlmError> for AuthFailure {
    fn from(e: NtlmError) -> Self {
        match e {
            NtlmError::Malformed(m) => AuthFailure::Malformed(m),
            NtlmError::UnexpectedMessage => AuthFailure::Malformed("NTLM message out of sequence"),
            other => AuthFailure::Refused(other.metric_label()),
        }
    }
}

/// A directory answer as an AUTH outcome: the client's fault is a refusal
/// like any other, the directory's is a temporary failure.
fn directory_failure(e: &ad::AdError) -> AuthFailure {
    if e.is_client_fault() {
        AuthFailure::Refused(e.metric_label())
    } else {
        tracing::error!(error = %e, "identity source unavailable");
        AuthFailure::Temporary(e.metric_label())
    }
}

/// The users file in force, reloaded when it changes on disk.
struct UsersSource {
    path: PathBuf,
    current: ArcSwap<UsersFile>,
    loaded_at: ArcSwap<Option<std::time::SystemTime>>,
}

fn mtime(path: &Path) -> Option<std::time::SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

/// Where accounts come from.
enum Source {
    Users(UsersSource),
    Directory(Arc<ad::ActiveDirectory>),
}

/// Verifies credentials and keeps the brute-force counters.
pub struct Authenticator {
    config: AuthConfig,
    ntlm: NtlmConfig,
    clock: Arc<dyn Clock>,
    replay: ReplayCache,
    source: Source,
    client_failures: moka::sync::Cache<IpAddr, u32>,
    account_failures: moka::sync::Cache<(String, IpAddr), u32>,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator")
            .field("users_file", &self.config.users_file)
            .finish()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AuthSetupError {
    #[error(transparent)]
    Identity(#[from] policy::identity::IdentityError),
    #[error("auth.ntlm.{field}: {reason}")]
    Ntlm {
        field: &'static str,
        reason: &'static str,
    },
    #[error(transparent)]
    Directory(ad::AdError),
    #[error("auth: set exactly one of `users_file` and `active_directory`")]
    NoSource,
}

impl Authenticator {
    pub fn new(config: &AuthConfig) -> Result<Arc<Self>, AuthSetupError> {
        let ntlm = config.ntlm_config();
        ntlm.validate().map_err(|e| AuthSetupError::Ntlm {
            field: e.field,
            reason: e.reason,
        })?;
        let source = match (&config.users_file, &config.active_directory) {
            (Some(path), None) => Source::Users(UsersSource {
                current: ArcSwap::from_pointee(UsersFile::load(path)?),
                loaded_at: ArcSwap::from_pointee(mtime(path)),
                path: path.clone(),
            }),
            (None, Some(ad)) => {
                Source::Directory(ad::ActiveDirectory::new(ad).map_err(AuthSetupError::Directory)?)
            }
            _ => return Err(AuthSetupError::NoSource),
        };
        let window = config.lockout.window.max(Duration::from_secs(1));
        Ok(Arc::new(Authenticator {
            replay: ReplayCache::for_config(&ntlm),
            ntlm,
            clock: Arc::new(SystemClock),
            source,
            client_failures: moka::sync::Cache::builder()
                .max_capacity(100_000)
                .time_to_live(window)
                .build(),
            account_failures: moka::sync::Cache::builder()
                .max_capacity(100_000)
                .time_to_live(window)
                .build(),
            config: config.clone(),
        }))
    }

    pub fn mechanisms(&self) -> &[Mechanism] {
        &self.config.mechanisms
    }

    /// Reloads the users file if it changed; a broken file is refused and
    /// the accounts in force stay.
    pub fn reload_users(&self, force: bool) -> Result<bool, policy::identity::IdentityError> {
        let Source::Users(users) = &self.source else {
            return Ok(false);
        };
        let m = mtime(&users.path);
        if !force && m == **users.loaded_at.load() {
            return Ok(false);
        }
        let file = UsersFile::load(&users.path)?;
        users.current.store(Arc::new(file));
        users.loaded_at.store(Arc::new(m));
        Ok(true)
    }

    /// The users file in force (for `check` and the policy's name checks).
    pub fn users_file(&self) -> Option<Arc<UsersFile>> {
        match &self.source {
            Source::Users(u) => Some(u.current.load_full()),
            Source::Directory(_) => None,
        }
    }

    /// The directory, when that is the identity source (readiness probes).
    pub fn directory(&self) -> Option<&Arc<ad::ActiveDirectory>> {
        match &self.source {
            Source::Directory(d) => Some(d),
            Source::Users(_) => None,
        }
    }

    /// Polls the users file for changes.
    pub fn spawn_watcher(self: &Arc<Self>, every: Duration) {
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.tick().await;
            loop {
                tick.tick().await;
                let Some(auth) = weak.upgrade() else { return };
                match auth.reload_users(false) {
                    Ok(true) => {
                        tracing::info!("users file reloaded")
                    }
                    Ok(false) => {}
                    Err(e) => {
                        tracing::error!(error = %e, "users file reload refused; the previous accounts stay")
                    }
                }
            }
        });
    }

    /// A fresh NTLM exchange with its own random challenge.
    pub fn ntlm_handshake(&self) -> ServerHandshake {
        ServerHandshake::new(&self.ntlm, self.clock.clone())
    }

    /// Is this client address locked out of AUTH altogether?
    pub fn client_locked(&self, ip: IpAddr) -> bool {
        self.client_failures.get(&ip).unwrap_or(0) >= self.config.lockout.max_failures_per_client
    }

    fn account_key(domain: &str, user: &str, ip: IpAddr) -> (String, IpAddr) {
        (
            format!("{}\\{}", domain.to_lowercase(), user.to_lowercase()),
            ip,
        )
    }

    fn account_locked(&self, domain: &str, user: &str, ip: IpAddr) -> bool {
        self.account_failures
            .get(&Self::account_key(domain, user, ip))
            .unwrap_or(0)
            >= self.config.lockout.max_failures_per_account
    }

    /// Counts a failure and waits the configured delay.
    pub async fn failed(&self, ip: IpAddr, account: Option<(&str, &str)>) {
        // Atomic increments: parallel failures from one address all count.
        self.client_failures
            .entry(ip)
            .and_upsert_with(|e| e.map(|e| e.into_value() + 1).unwrap_or(1));
        if let Some((domain, user)) = account {
            let key = Self::account_key(domain, user, ip);
            self.account_failures
                .entry(key)
                .and_upsert_with(|e| e.map(|e| e.into_value() + 1).unwrap_or(1));
        }
        if !self.config.lockout.failure_delay.is_zero() {
            tokio::time::sleep(self.config.lockout.failure_delay).await;
        }
    }

    /// Verifies an NTLM AUTHENTICATE message.
    pub async fn verify_ntlm(
        &self,
        handshake: ServerHandshake,
        message: &[u8],
        ip: IpAddr,
        channel_binding: Option<&[u8]>,
    ) -> Result<Principal, (AuthFailure, Option<(String, String)>)> {
        let claimed = self.claimed_identity(message);
        // Re-checked here: an exchange opened before the address was locked
        // out must not get its guess verified after.
        if self.client_locked(ip) {
            return Err((AuthFailure::ClientLockedOut, claimed));
        }
        if let Some((domain, user)) = &claimed {
            if self.account_locked(domain, user, ip) {
                return Err((AuthFailure::LockedOut, claimed));
            }
        }
        let pending = match handshake.begin_authenticate(message) {
            Ok(p) => p,
            Err(e) => return Err((e.into(), claimed)),
        };
        let verified = match &self.source {
            Source::Users(users) => {
                let users = users.current.load();
                pending.verify_local(users.as_ref(), &self.replay, channel_binding)
            }
            Source::Directory(dir) => {
                let key = dir
                    .verify_ntlm(
                        pending.user(),
                        pending.domain(),
                        pending.external_challenge(),
                        pending.lm_response(),
                        pending.nt_response(),
                    )
                    .await;
                let key = match key {
                    Ok(k) => k,
                    Err(e) => return Err((directory_failure(&e), claimed)),
                };
                let account = match self
                    .directory_account(dir, pending.user(), pending.domain())
                    .await
                {
                    Ok(a) => a,
                    Err(e) => return Err((directory_failure(&e), claimed)),
                };
                pending.finish_external(account, key, &self.replay, channel_binding)
            }
        };
        match verified {
            Ok(ok) => {
                let weak = match ok.version {
                    policy::ntlm::NtlmVersion::V2 => None,
                    v => Some(v.as_str()),
                };
                if let Some(v) = weak {
                    tracing::warn!(user = %ok.account.user, version = v, "weak NTLMv1 authentication accepted (allow_ntlmv1)");
                }
                let detail = Some(ok.version.as_str());
                Ok(Principal::from_account(ok.account, Mechanism::Ntlm, detail))
            }
            Err(e) => Err((e.into(), claimed)),
        }
    }

    /// Who the directory says `user` is. Without LDAP the account has no
    /// groups or addresses (rules can then only name users).
    async fn directory_account(
        &self,
        dir: &ad::ActiveDirectory,
        user: &str,
        domain: &str,
    ) -> Result<Account, ad::AdError> {
        let ours = domain.is_empty()
            || domain.eq_ignore_ascii_case(&self.ntlm.dns_domain)
            || domain.eq_ignore_ascii_case(&self.ntlm.netbios_domain);
        if !ours {
            // A trusted domain's user would be looked up in our LDAP by
            // name alone and get our namesake's groups: refuse instead.
            return Err(ad::AdError::NoSuchUser(format!("{domain}\\{user}")));
        }
        let domain = self.ntlm.netbios_domain.clone();
        let (name, groups, mail, enabled) = match dir.entry(user).await {
            Ok(e) => (
                e.account_name.clone(),
                e.groups.clone(),
                e.addresses.clone(),
                e.enabled,
            ),
            // No LDAP configured: the DC's word on the password is all we have.
            Err(ad::AdError::Config(_)) => (user.to_string(), Vec::new(), Vec::new(), true),
            Err(e) => return Err(e),
        };
        Ok(Account {
            user: name,
            domain,
            nt_hash: [0; 16],
            groups,
            enabled,
            mail,
        })
    }

    /// Verifies a password (PLAIN, LOGIN) against the identity source.
    /// With a users file, unknown users are checked against a dummy hash so
    /// the work, and so the timing, is the same.
    pub async fn verify_password(
        &self,
        login: &str,
        password: &str,
        mechanism: Mechanism,
        ip: IpAddr,
    ) -> Result<Principal, (AuthFailure, Option<(String, String)>)> {
        let (domain, user) = self.split_login(login);
        let claimed = Some((domain.clone(), user.clone()));
        if user.is_empty() || password.is_empty() {
            return Err((AuthFailure::Refused("anonymous_refused"), claimed));
        }
        if self.client_locked(ip) {
            return Err((AuthFailure::ClientLockedOut, claimed));
        }
        if self.account_locked(&domain, &user, ip) {
            return Err((AuthFailure::LockedOut, claimed));
        }
        let users = match &self.source {
            Source::Users(u) => u.current.load_full(),
            Source::Directory(dir) => {
                if let Err(e) = dir.verify_password(&user, &domain, password).await {
                    return Err((directory_failure(&e), claimed));
                }
                return match self.directory_account(dir, &user, &domain).await {
                    Ok(a) if a.enabled => Ok(Principal::from_account(a, mechanism, None)),
                    Ok(_) => Err((AuthFailure::Refused("account_disabled"), claimed)),
                    Err(e) => Err((directory_failure(&e), claimed)),
                };
            }
        };
        let account = users.lookup(&domain, &user);
        let expected = account.as_ref().map(|a| a.nt_hash).unwrap_or([0x5a; 16]);
        let given = policy::identity::nt_hash(password);
        let matches = bool::from(given.ct_eq(&expected));
        match account {
            Some(a) if matches && a.enabled => Ok(Principal::from_account(a, mechanism, None)),
            Some(a) if matches && !a.enabled => {
                Err((AuthFailure::Refused("account_disabled"), claimed))
            }
            _ => Err((AuthFailure::Refused("bad_credentials"), claimed)),
        }
    }

    /// The domain and user an AUTHENTICATE names, for the lockout counters
    /// (before and whatever the verification says).
    fn claimed_identity(&self, message: &[u8]) -> Option<(String, String)> {
        use policy::ntlm::message::{decode_string, AuthenticateMessage};
        let m = AuthenticateMessage::parse(message).ok()?;
        let unicode = m.flags & 0x0000_0001 != 0;
        let user = decode_string(m.user, unicode).ok()?;
        let domain = decode_string(m.domain, unicode).ok()?;
        if user.is_empty() {
            return None;
        }
        let login = if domain.is_empty() {
            user
        } else {
            format!("{domain}\\{user}")
        };
        Some(self.split_login(&login))
    }

    /// `DOMAIN\user`, `user@domain` or `user` (our NetBIOS domain).
    /// Our DNS domain is an alias of our NetBIOS domain in every form, so
    /// the lockout counts one account however its domain is spelled.
    fn split_login(&self, login: &str) -> (String, String) {
        let ours = &self.ntlm.netbios_domain;
        let canonical = |d: &str| {
            if d.is_empty() || d.eq_ignore_ascii_case(&self.ntlm.dns_domain) {
                ours.clone()
            } else {
                d.to_string()
            }
        };
        if let Some((d, u)) = login.split_once('\\') {
            return (canonical(d), u.to_string());
        }
        if let Some((u, d)) = login.rsplit_once('@') {
            return (canonical(d), u.to_string());
        }
        (ours.clone(), login.to_string())
    }
}
