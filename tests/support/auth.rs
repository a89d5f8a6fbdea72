//! Authentication fixtures: users files made with `relayguard
//! hash-password`, the `auth:` section of a test configuration, and the
//! demo accounts.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};

use crate::config::yaml_path;
use crate::{relayguard_bin, write_file, Config, SambaDc};

/// One account of a test users file, with its password in clear so the
/// test can log in; the file gets the NT hash.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Account {
    pub domain: &'static str,
    pub user: &'static str,
    pub password: &'static str,
}

/// The demo's accounts (`relayguard demo`): `DEMO\alice` / `alice-pass`.
pub const ALICE: Account = Account {
    domain: "DEMO",
    user: "alice",
    password: "alice-pass",
};

/// `DEMO\bob` / `bob-pass`.
pub const BOB: Account = Account {
    domain: "DEMO",
    user: "bob",
    password: "bob-pass",
};

/// Runs `relayguard hash-password` with `stdin` as its input.
pub fn run_hash_password(stdin: &[u8]) -> Output {
    let mut child = Command::new(relayguard_bin())
        .arg("hash-password")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn relayguard hash-password");
    child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(stdin)
        .expect("write the password");
    child.wait_with_output().expect("wait for hash-password")
}

/// The NT hash of `password` as `relayguard hash-password` prints it.
pub fn hash_password(password: &str) -> String {
    let out = run_hash_password(format!("{password}\n").as_bytes());
    assert!(
        out.status.success(),
        "relayguard hash-password failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .expect("hash-password prints ASCII")
        .trim()
        .to_string()
}

/// A users file (YAML) holding `accounts`, every one enabled.
pub fn users_yaml(accounts: &[Account]) -> String {
    let mut yaml = String::from("users:\n");
    for a in accounts {
        yaml.push_str(&format!(
            "  - user: {}\n    domain: {}\n    nt_hash: {}\n    groups: [relay-senders]\n",
            a.user,
            a.domain,
            hash_password(a.password)
        ));
    }
    yaml
}

/// Writes [`users_yaml`] to `path`.
pub fn write_users_file(path: &Path, accounts: &[Account]) {
    write_file(path, users_yaml(accounts));
}

/// What the test gateways publish in their NTLM CHALLENGE.
pub const NETBIOS_DOMAIN: &str = "DEMO";
pub const NETBIOS_COMPUTER: &str = "RELAYGUARD";
pub const DNS_DOMAIN: &str = "demo.test";
pub const DNS_COMPUTER: &str = "relayguard.demo.test";

impl Config {
    /// An `auth:` section: the DEMO names above, `users_file`, and a
    /// lockout that stays out of the way (no failure delay, thresholds no
    /// test reaches by accident). Override single keys with [`Config::set`],
    /// e.g. `.set("auth.lockout.max_failures_per_client", "3")`.
    pub fn auth(self, users_file: &Path) -> Config {
        self.auth_common(IdentitySource::UsersFile)
            .set("auth.users_file", &yaml_path(users_file))
    }

    /// An `auth:` section for `source`, as [`Config::auth`] makes it: for
    /// the users file, `dir/users.yaml` is written with alice and bob
    /// (enabled) and dave (disabled); for Active Directory the shared
    /// [`SambaDc`] is used (started on first use) and the CHALLENGE
    /// publishes names in its domain.
    pub fn auth_for(self, source: IdentitySource, dir: &Path) -> Config {
        match source {
            IdentitySource::UsersFile => {
                let path = dir.join("users.yaml");
                write_file(&path, source_users_yaml());
                self.auth(&path)
            }
            IdentitySource::ActiveDirectory => {
                let dc = SambaDc::shared();
                ad_settings(dc)
                    .iter()
                    .fold(self.auth_common(source), |c, (k, v)| c.set(k, v))
            }
        }
    }

    /// Everything in `auth:` but the identity source.
    fn auth_common(self, source: IdentitySource) -> Config {
        self.set("auth.mechanisms", "[ntlm, login, plain]")
            .set("auth.ntlm.netbios_domain", source.netbios_domain())
            .set("auth.ntlm.netbios_computer", NETBIOS_COMPUTER)
            .set("auth.ntlm.dns_domain", source.dns_domain())
            .set("auth.ntlm.dns_computer", source.dns_computer())
            .set("auth.lockout.max_failures_per_client", "1000")
            .set("auth.lockout.max_failures_per_account", "1000")
            .set("auth.lockout.window", "15m")
            .set("auth.lockout.failure_delay", "0s")
            // These tests are about authentication: any sender may be used
            // once authenticated (sender binding is the policy tests' job).
            .set("policy.sender_binding.senders", "[\"*\"]")
    }
}

/// Where a test gateway's accounts come from. The authentication
/// scenarios run against each (`tests/e2e/auth.rs`, `auth_ad.rs`), with
/// the accounts and names this gives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdentitySource {
    /// A users file: `DEMO\alice`, `DEMO\bob`, disabled `DEMO\dave`.
    UsersFile,
    /// The shared Samba AD DC ([`SambaDc::shared`]): `RGTEST\alice`,
    /// `RGTEST\bob`, disabled `RGTEST\dave`.
    ActiveDirectory,
}

/// In the users file of [`Config::auth_for`], disabled.
const DAVE: Account = Account {
    domain: "DEMO",
    user: "dave",
    password: "dave-pass",
};

impl IdentitySource {
    /// An enabled account; in `relay-senders`.
    pub fn alice(self) -> Account {
        match self {
            IdentitySource::UsersFile => ALICE,
            IdentitySource::ActiveDirectory => SambaDc::ALICE.account(),
        }
    }

    /// Another enabled account.
    pub fn bob(self) -> Account {
        match self {
            IdentitySource::UsersFile => BOB,
            IdentitySource::ActiveDirectory => SambaDc::BOB.account(),
        }
    }

    /// A disabled account, with its right password.
    pub fn disabled(self) -> Account {
        match self {
            IdentitySource::UsersFile => DAVE,
            IdentitySource::ActiveDirectory => SambaDc::DAVE.account(),
        }
    }

    /// A name the source does not know, with alice's password.
    pub fn unknown(self) -> Account {
        Account {
            user: "mallory",
            ..self.alice()
        }
    }

    /// The domain the CHALLENGE publishes; the accounts' domain.
    pub fn netbios_domain(self) -> &'static str {
        match self {
            IdentitySource::UsersFile => NETBIOS_DOMAIN,
            IdentitySource::ActiveDirectory => SambaDc::NETBIOS_DOMAIN,
        }
    }

    /// The DNS name of [`IdentitySource::netbios_domain`] (an alias of it
    /// in every login form).
    pub fn dns_domain(self) -> &'static str {
        match self {
            IdentitySource::UsersFile => DNS_DOMAIN,
            IdentitySource::ActiveDirectory => SambaDc::DNS_DOMAIN,
        }
    }

    pub fn dns_computer(self) -> &'static str {
        match self {
            IdentitySource::UsersFile => DNS_COMPUTER,
            IdentitySource::ActiveDirectory => "relayguard.ad.relayguard.test",
        }
    }
}

/// The users file of [`Config::auth_for`].
fn source_users_yaml() -> String {
    format!(
        "{}  - user: {}\n    domain: {}\n    nt_hash: {}\n    enabled: false\n",
        users_yaml(&[ALICE, BOB]),
        DAVE.user,
        DAVE.domain,
        hash_password(DAVE.password)
    )
}

/// [`SambaDc::ad_config_yaml`] as dotted `auth.active_directory.*` keys
/// for [`Config::set`], so that a test can still override one of them.
fn ad_settings(dc: &SambaDc) -> Vec<(String, String)> {
    let yaml = dc.ad_config_yaml();
    let value: serde_norway::Value =
        serde_norway::from_str(&yaml).unwrap_or_else(|e| panic!("{e}\n{yaml}"));
    let mut out = Vec::new();
    flatten("auth.active_directory", &value, &mut out);
    out
}

fn flatten(prefix: &str, value: &serde_norway::Value, out: &mut Vec<(String, String)>) {
    use serde_norway::Value;
    match value {
        Value::Mapping(m) => {
            for (k, v) in m {
                let k = k.as_str().expect("string keys");
                flatten(&format!("{prefix}.{k}"), v, out);
            }
        }
        // JSON strings are YAML double-quoted scalars.
        Value::String(s) => out.push((
            prefix.to_string(),
            serde_json::Value::from(s.as_str()).to_string(),
        )),
        other => out.push((
            prefix.to_string(),
            serde_norway::to_string(other)
                .expect("a YAML scalar")
                .trim()
                .to_string(),
        )),
    }
}
