//! Authentication fixtures: users files made with `relayguard
//! hash-password`, the `auth:` section of a test configuration, and the
//! demo accounts.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};

use crate::config::yaml_path;
use crate::{relayguard_bin, write_file, Config};

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
        self.set("auth.mechanisms", "[ntlm, login, plain]")
            .set("auth.ntlm.netbios_domain", NETBIOS_DOMAIN)
            .set("auth.ntlm.netbios_computer", NETBIOS_COMPUTER)
            .set("auth.ntlm.dns_domain", DNS_DOMAIN)
            .set("auth.ntlm.dns_computer", DNS_COMPUTER)
            .set("auth.users_file", &yaml_path(users_file))
            .set("auth.lockout.max_failures_per_client", "1000")
            .set("auth.lockout.max_failures_per_account", "1000")
            .set("auth.lockout.window", "15m")
            .set("auth.lockout.failure_delay", "0s")
            // These tests are about authentication: any sender may be used
            // once authenticated (sender binding is the policy tests' job).
            .set("policy.sender_binding.senders", "[\"*\"]")
    }
}
