//! A real Samba Active Directory domain controller on loopback, for the
//! `active_directory` identity source: NTLM pass-through through
//! `ntlm_auth`/winbindd, groups and addresses through LDAP.
//!
//! Provisioning takes a few seconds, so one DC serves every test of the
//! binary: [`SambaDc::shared`]. It is provisioned into a temporary
//! directory with only the `ldap` and `winbindd` services, and runs as
//! `samba -i` with a pipe as stdin: when the test process exits, however
//! it exits, the pipe closes and samba (and its winbindd) shut down.
//!
//! Two things are machine-wide and cannot be moved: LDAP on
//! 127.0.0.1:389 (Samba has no port setting) and winbindd's socket in
//! `/run/samba/winbindd` (ntlm_auth has it compiled in). A lock (an
//! abstract Unix socket, released by the kernel when its holder dies)
//! makes a second test process wait for the first one's DC to go.

use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::LazyLock;
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::tools::KillOnDrop;
use crate::{wait_until, write_file, Account};

/// One user of the test domain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DcUser {
    pub user: &'static str,
    pub password: &'static str,
    /// `mail`; empty for none.
    pub mail: &'static str,
    /// `proxyAddresses` values, prefixes included.
    pub proxy_addresses: &'static [&'static str],
    pub enabled: bool,
}

impl DcUser {
    /// As an account for the NTLM helpers (`ntlm::creds`).
    pub fn account(&self) -> Account {
        Account {
            domain: SambaDc::NETBIOS_DOMAIN,
            user: self.user,
            password: self.password,
        }
    }
}

/// A group of the test domain and its direct members (users or groups).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DcGroup {
    pub name: &'static str,
    pub members: &'static [&'static str],
}

/// A running domain controller. Stopped on drop (the shared one at exit).
pub struct SambaDc {
    dir: TempDir,
    smb_conf: PathBuf,
    child: KillOnDrop,
    /// samba exits when this closes.
    _stdin: ChildStdin,
    _lock: UnixListener,
}

static SHARED: LazyLock<SambaDc> = LazyLock::new(SambaDc::start);

/// Where the fixture's directories live; stale ones are removed at start.
const DIR_PREFIX: &str = "relayguard-samba-dc.";
/// The machine-wide lock (abstract socket name).
const LOCK_NAME: &[u8] = b"relayguard-e2e-samba-dc";
/// This process holds the lock: waiting for it would wait for ourselves.
static LOCK_HELD_HERE: AtomicBool = AtomicBool::new(false);
/// How long a second test process waits for the first one's DC.
const LOCK_WAIT: Duration = Duration::from_secs(600);
const START_TIMEOUT: Duration = Duration::from_secs(90);

impl SambaDc {
    pub const NETBIOS_DOMAIN: &'static str = "RGTEST";
    pub const DNS_DOMAIN: &'static str = "ad.relayguard.test";
    pub const REALM: &'static str = "AD.RELAYGUARD.TEST";
    pub const BASE_DN: &'static str = "DC=ad,DC=relayguard,DC=test";
    pub const LDAP_URL: &'static str = "ldap://127.0.0.1:389";
    /// ntlm_auth's compiled-in winbindd socket directory (Debian).
    pub const WINBINDD_SOCKET_DIR: &'static str = "/run/samba/winbindd";
    const ADMIN_PASSWORD: &'static str = "Admin-Pass-2024!";

    /// In `relay-senders` directly; has `mail` and SMTP proxy addresses.
    pub const ALICE: DcUser = DcUser {
        user: "alice",
        password: "Alice-Pass-2024!",
        mail: "alice@ad.relayguard.test",
        proxy_addresses: &[
            "SMTP:alice@ad.relayguard.test",
            "smtp:alice.alias@ad.relayguard.test",
            "X400:c=US;a= ;p=RelayGuard;o=Test;s=alice;",
        ],
        enabled: true,
    };
    /// In no group.
    pub const BOB: DcUser = DcUser {
        user: "bob",
        password: "Bob-Pass-2024!",
        mail: "bob@ad.relayguard.test",
        proxy_addresses: &[],
        enabled: true,
    };
    /// In `helpdesk`, which is in `relay-senders`.
    pub const CAROL: DcUser = DcUser {
        user: "carol",
        password: "Carol-Pass-2024!",
        mail: "carol@ad.relayguard.test",
        proxy_addresses: &[],
        enabled: true,
    };
    /// Disabled; in `relay-senders` directly.
    pub const DAVE: DcUser = DcUser {
        user: "dave",
        password: "Dave-Pass-2024!",
        mail: "dave@ad.relayguard.test",
        proxy_addresses: &[],
        enabled: false,
    };
    /// The gateway's LDAP bind account.
    pub const SERVICE: DcUser = DcUser {
        user: "relayguard-svc",
        password: "Svc-Pass-2024!",
        mail: "",
        proxy_addresses: &[],
        enabled: true,
    };
    pub const USERS: &'static [DcUser] = &[
        Self::ALICE,
        Self::BOB,
        Self::CAROL,
        Self::DAVE,
        Self::SERVICE,
    ];
    pub const GROUPS: &'static [DcGroup] = &[
        DcGroup {
            name: "relay-senders",
            members: &["alice", "dave", "helpdesk"],
        },
        DcGroup {
            name: "helpdesk",
            members: &["carol"],
        },
    ];

    /// The DC every test of this process shares, started on first use.
    pub fn shared() -> &'static SambaDc {
        &SHARED
    }

    /// Provisions and starts a DC (several seconds). Prefer
    /// [`SambaDc::shared`]: only one can run per machine.
    pub fn start() -> SambaDc {
        let lock = take_machine_lock();
        remove_stale_dirs();
        let dir = tempfile::Builder::new()
            .prefix(DIR_PREFIX)
            .tempdir()
            .expect("tempdir for the Samba DC");
        let started = Instant::now();
        let smb_conf = provision(dir.path());
        let provisioned = started.elapsed();
        add_users_and_groups(dir.path(), &smb_conf);
        let populated = started.elapsed();
        std::fs::create_dir_all(Self::WINBINDD_SOCKET_DIR)
            .unwrap_or_else(|e| panic!("mkdir {}: {e}", Self::WINBINDD_SOCKET_DIR));
        write_file(
            &dir.path().join("ldap-bind-password"),
            format!("{}\n", Self::SERVICE.password),
        );

        // The previous holder's samba may still be on its way out.
        let ldap = SocketAddr::from(([127, 0, 0, 1], 389));
        let port_free = wait_until(Duration::from_secs(15), || {
            TcpStream::connect_timeout(&ldap, Duration::from_millis(200)).is_err()
        });
        assert!(
            port_free,
            "something else listens on 127.0.0.1:389; the test DC needs that port"
        );

        let log = dir.path().join("samba.log");
        let log_file = std::fs::File::create(&log).expect("create samba.log");
        let mut child = Command::new(sbin("samba"))
            // -i: foreground, own process group, exit when stdin closes.
            .args(["-i", "-M", "single", "--debug-stdout", "-d", "1", "-s"])
            .arg(&smb_conf)
            .current_dir(dir.path())
            .stdin(Stdio::piped())
            .stdout(log_file.try_clone().expect("dup log"))
            .stderr(log_file)
            .spawn()
            .map(KillOnDrop::new)
            .unwrap_or_else(|e| panic!("cannot run samba (Debian package samba-ad-dc): {e}"));
        let stdin = child.stdin.take().expect("piped stdin");
        let mut dc = SambaDc {
            dir,
            smb_conf,
            child,
            _stdin: stdin,
            _lock: lock,
        };
        dc.wait_ready();
        eprintln!(
            "samba DC ready in {:.1?} (provision {:.1?}, users {:.1?}) in {}",
            started.elapsed(),
            provisioned,
            populated - provisioned,
            dc.dir.path().display()
        );
        dc
    }

    /// Until LDAP answers and winbindd verifies alice's password.
    fn wait_ready(&mut self) {
        let ldap = SocketAddr::from(([127, 0, 0, 1], 389));
        let mut exited = None;
        let ready = wait_until(START_TIMEOUT, || {
            exited = self.child.try_wait().ok().flatten();
            exited.is_some()
                || (TcpStream::connect_timeout(&ldap, Duration::from_secs(1)).is_ok()
                    && self.ntlm_auth_password(&Self::ALICE))
        });
        if !ready || exited.is_some() {
            panic!(
                "Samba DC did not start ({}); its log:\n{}",
                exited.map_or_else(
                    || format!("not ready after {START_TIMEOUT:?}"),
                    |s| s.to_string()
                ),
                self.log()
            );
        }
    }

    /// `ntlm_auth --username --password` exits 0: winbindd is up and the
    /// domain answers.
    fn ntlm_auth_password(&self, user: &DcUser) -> bool {
        Command::new(bin("ntlm_auth"))
            .arg(format!("--configfile={}", self.smb_conf.display()))
            .arg(format!("--username={}", user.user))
            .arg(format!("--domain={}", Self::NETBIOS_DOMAIN))
            .arg(format!("--password={}", user.password))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    /// The DC's `smb.conf`, for `ntlm_auth --configfile`.
    pub fn smb_conf(&self) -> &Path {
        &self.smb_conf
    }

    /// The file holding [`SambaDc::SERVICE`]'s password.
    pub fn bind_password_file(&self) -> PathBuf {
        self.dir.path().join("ldap-bind-password")
    }

    pub fn bind_dn() -> String {
        format!("CN={},CN=Users,{}", Self::SERVICE.user, Self::BASE_DN)
    }

    /// The `active_directory` configuration section for this DC, as YAML
    /// (block style, unindented).
    pub fn ad_config_yaml(&self) -> String {
        format!(
            "ntlm_auth: {ntlm_auth}\n\
             samba_config: {conf}\n\
             winbind_socket_dir: {sock}\n\
             helpers: 2\n\
             timeout: 10s\n\
             ldap:\n  \
               url: {url}\n  \
               bind_dn: {bind_dn}\n  \
               bind_password_file: {pw}\n  \
               base_dn: {base}\n  \
               cache_ttl: 5m\n",
            ntlm_auth = bin("ntlm_auth").display(),
            conf = self.smb_conf.display(),
            sock = Self::WINBINDD_SOCKET_DIR,
            url = Self::LDAP_URL,
            bind_dn = Self::bind_dn(),
            pw = self.bind_password_file().display(),
            base = Self::BASE_DN,
        )
    }

    /// What samba logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("samba.log")).unwrap_or_default()
    }
}

impl Drop for SambaDc {
    fn drop(&mut self) {
        // Now, before the lock is released below.
        self.child.kill_now();
        // The lock itself goes with `_lock`, after this.
        LOCK_HELD_HERE.store(false, Ordering::SeqCst);
    }
}

/// `/usr/sbin/NAME` if it exists, else NAME from PATH.
fn sbin(name: &str) -> PathBuf {
    let p = Path::new("/usr/sbin").join(name);
    if p.exists() {
        p
    } else {
        PathBuf::from(name)
    }
}

fn bin(name: &str) -> PathBuf {
    let p = Path::new("/usr/bin").join(name);
    if p.exists() {
        p
    } else {
        PathBuf::from(name)
    }
}

fn take_machine_lock() -> UnixListener {
    assert!(
        !LOCK_HELD_HERE.swap(true, Ordering::SeqCst),
        "this process already runs a Samba DC: use SambaDc::shared()"
    );
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(LOCK_NAME)
        .expect("abstract socket name");
    let deadline = Instant::now() + LOCK_WAIT;
    let mut told = false;
    loop {
        match UnixListener::bind_addr(&addr) {
            Ok(l) => return l,
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && Instant::now() < deadline => {
                if !told {
                    eprintln!("another test process runs the Samba DC; waiting for it to finish");
                    told = true;
                }
                std::thread::sleep(Duration::from_millis(250));
            }
            Err(e) => panic!("cannot take the Samba DC lock: {e}"),
        }
    }
}

/// Directories of DCs from earlier runs (a static is never dropped, so
/// its TempDir stays). Only the lock holder runs a DC, so all are stale.
fn remove_stale_dirs() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for e in entries.flatten() {
        if e.file_name().to_string_lossy().starts_with(DIR_PREFIX) {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// `samba-tool domain provision` into `dir/dc`, then an smb.conf of our
/// own that keeps every path inside `dir` and runs only what the tests
/// use. Returns its path.
fn provision(dir: &Path) -> PathBuf {
    let target = dir.join("dc");
    let out = Command::new(bin("samba-tool"))
        .args([
            "domain",
            "provision",
            "--server-role=dc",
            "--dns-backend=NONE",
        ])
        .arg(format!("--targetdir={}", target.display()))
        .arg(format!("--realm={}", SambaDc::REALM))
        .arg(format!("--domain={}", SambaDc::NETBIOS_DOMAIN))
        .arg(format!("--adminpass={}", SambaDc::ADMIN_PASSWORD))
        .args(["--host-name=DC1", "--host-ip=127.0.0.1"])
        .args([
            "--option=interfaces=lo",
            "--option=bind interfaces only=yes",
            // Without CAP_SYS_ADMIN there are no security.* xattrs for the
            // sysvol ACLs; keep them in a tdb instead.
            "--option=vfs objects=dfs_samba4 acl_xattr xattr_tdb",
        ])
        // Not /etc/samba/smb.conf: the samba package's file-server shares
        // and log paths must not leak into the DC.
        .args(["-s", "/dev/null"])
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run samba-tool (Debian packages samba, samba-ad-provision): {e}")
        });
    assert!(
        out.status.success(),
        "samba-tool domain provision failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let t = target.display();
    let conf = format!(
        "[global]
\tnetbios name = DC1
\trealm = {realm}
\tworkgroup = {domain}
\tserver role = active directory domain controller
\t# LDAP for groups and addresses, winbindd for ntlm_auth; no DNS, NetBIOS,
\t# replication, Kerberos or file serving.
\tserver services = ldap, winbindd
\tinterfaces = lo
\tbind interfaces only = yes
\ttls enabled = no
\t# Simple binds over plain LDAP, as the gateway's test config does.
\tldap server require strong auth = no
\tprivate dir = {t}/private
\tlock directory = {t}
\tstate directory = {t}/state
\tcache directory = {t}/cache
\tpid directory = {t}/run
\tncalrpc dir = {t}/run/ncalrpc
\tbinddns dir = {t}/bind-dns
\twinbindd socket directory = {sock}
\tlog file = {t}/log.%m
\tvfs objects = dfs_samba4 acl_xattr xattr_tdb
",
        realm = SambaDc::REALM,
        domain = SambaDc::NETBIOS_DOMAIN,
        sock = SambaDc::WINBINDD_SOCKET_DIR,
    );
    std::fs::create_dir_all(target.join("run")).expect("mkdir run");
    let path = target.join("etc").join("smb.conf");
    write_file(&path, conf);
    path
}

/// Creates the users and groups straight in `sam.ldb`, before samba
/// starts, in one Python process (each `samba-tool` call costs a second).
fn add_users_and_groups(dir: &Path, smb_conf: &Path) {
    const SCRIPT: &str = r#"
import json, sys
import ldb
from samba.auth import system_session
from samba.param import LoadParm
from samba.samdb import SamDB

spec = json.load(sys.stdin)
lp = LoadParm()
lp.load(sys.argv[1])
db = SamDB(url=sys.argv[2], session_info=system_session(), lp=lp)
base = str(db.domain_dn())
for u in spec["users"]:
    db.newuser(u["user"], u["password"], mailaddress=u["mail"] or None)
    if u["proxy_addresses"]:
        m = ldb.Message()
        m.dn = ldb.Dn(db, "CN=%s,CN=Users,%s" % (u["user"], base))
        m["proxyAddresses"] = ldb.MessageElement(
            u["proxy_addresses"], ldb.FLAG_MOD_ADD, "proxyAddresses")
        db.modify(m)
    if not u["enabled"]:
        db.disable_account("(sAMAccountName=%s)" % u["user"])
for g in spec["groups"]:
    db.newgroup(g["name"])
for g in spec["groups"]:
    db.add_remove_group_members(g["name"], g["members"], add_members_operation=True)
"#;
    let spec = serde_json::json!({
        "users": SambaDc::USERS.iter().map(|u| serde_json::json!({
            "user": u.user,
            "password": u.password,
            "mail": u.mail,
            "proxy_addresses": u.proxy_addresses,
            "enabled": u.enabled,
        })).collect::<Vec<_>>(),
        "groups": SambaDc::GROUPS.iter().map(|g| serde_json::json!({
            "name": g.name,
            "members": g.members,
        })).collect::<Vec<_>>(),
    });
    let sam = dir.join("dc").join("private").join("sam.ldb");
    // Debian's python3 has the samba bindings; a pyenv python3 on PATH
    // does not.
    let mut child = Command::new("/usr/bin/python3")
        .arg("-c")
        .arg(SCRIPT)
        .arg(smb_conf)
        .arg(&sam)
        .current_dir(dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run /usr/bin/python3 (Debian package python3-samba)");
    child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(spec.to_string().as_bytes())
        .expect("write the user list");
    let out = child.wait_with_output().expect("wait for python3");
    assert!(
        out.status.success(),
        "creating the test users failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
