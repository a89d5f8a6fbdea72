//! The `active_directory` identity source against a real Samba AD DC on
//! loopback ([`SambaDc::shared`]): NTLM pass-through through `ntlm_auth`
//! and winbindd, plain passwords, nested groups and addresses from LDAP,
//! and the helper pool recovering from dead and hung helpers.
//!
//! The NTLM messages come from policy's client and the gateway side is
//! policy's server split in two, exactly as the gateway runs it:
//! `begin_authenticate` → DC → `finish_external`.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use policy::clock::{Clock, ManualClock, SystemClock};
use policy::identity::Account;
use policy::ntlm::{
    Authenticated, ClientHandshake, ClientOptions, NtlmConfig, NtlmError, NtlmVersion,
    PendingAuthenticate, ReplayCache, ServerHandshake,
};
use relayguard::auth::ad::{ActiveDirectory, AdConfig, AdError};
use relayguard_e2e::ntlm::creds_for;
use relayguard_e2e::{DcUser, SambaDc};

const ALICE: DcUser = SambaDc::ALICE;
const BOB: DcUser = SambaDc::BOB;
const CAROL: DcUser = SambaDc::CAROL;
const DAVE: DcUser = SambaDc::DAVE;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

fn ad_config(dc: &SambaDc) -> AdConfig {
    let yaml = dc.ad_config_yaml();
    serde_norway::from_str(&yaml).unwrap_or_else(|e| panic!("{e}\n{yaml}"))
}

fn directory(dc: &SambaDc) -> Arc<ActiveDirectory> {
    ActiveDirectory::new(&ad_config(dc)).expect("valid AD configuration")
}

/// What the gateway publishes in its CHALLENGE: its own names, not the DC's.
fn gateway_ntlm() -> NtlmConfig {
    NtlmConfig::new(
        SambaDc::NETBIOS_DOMAIN,
        "RELAY01",
        SambaDc::DNS_DOMAIN,
        "relay01.ad.relayguard.test",
    )
}

fn clock() -> Arc<dyn Clock> {
    Arc::new(SystemClock)
}

/// NEGOTIATE, CHALLENGE and AUTHENTICATE between policy's client and a
/// gateway-side handshake; returns the AUTHENTICATE and the handshake
/// waiting for it.
fn exchange(
    mut server: ServerHandshake,
    domain: &str,
    user: &str,
    password: &str,
    opts: ClientOptions,
) -> (ServerHandshake, Vec<u8>) {
    let mut client = ClientHandshake::new(creds_for(domain, user, password), *b"e2e-chal", None)
        .with_options(opts);
    let t2 = server
        .challenge(&client.negotiate())
        .expect("CHALLENGE for our own NEGOTIATE");
    let t3 = client.authenticate(&t2).expect("client AUTHENTICATE");
    (server, t3)
}

fn pending(domain: &str, user: &str, password: &str) -> PendingAuthenticate {
    let server = ServerHandshake::new(&gateway_ntlm(), clock());
    let (server, t3) = exchange(server, domain, user, password, ClientOptions::default());
    server
        .begin_authenticate(&t3)
        .expect("passes the checks before the proof")
}

/// The DC's verdict on a pending AUTHENTICATE, asked as the gateway asks.
async fn ask_dc(ad: &ActiveDirectory, p: &PendingAuthenticate) -> Result<[u8; 16], AdError> {
    ad.verify_ntlm(
        p.user(),
        p.domain(),
        p.external_challenge(),
        p.lm_response(),
        p.nt_response(),
    )
    .await
}

/// The account the directory describes, as the gateway builds it.
async fn account(ad: &ActiveDirectory, user: &str) -> Account {
    let e = ad.entry(user).await.expect("user in the directory");
    Account {
        user: e.account_name.clone(),
        domain: SambaDc::NETBIOS_DOMAIN.into(),
        nt_hash: [0; 16],
        groups: e.groups.clone(),
        enabled: e.enabled,
        mail: e.addresses.clone(),
    }
}

/// The whole AD path for one AUTHENTICATE.
async fn authenticate(
    ad: &ActiveDirectory,
    p: PendingAuthenticate,
    replay: &ReplayCache,
) -> Result<Authenticated, String> {
    let key = ask_dc(ad, &p).await.map_err(|e| format!("DC: {e}"))?;
    let account = account(ad, p.user()).await;
    p.finish_external(account, key, replay, None)
        .map_err(|e| format!("post-checks: {e}"))
}

#[test]
fn ntlmv2_through_the_dc_returns_the_key_the_mic_verifies_with() {
    let dc = SambaDc::shared();
    let ad = directory(dc);
    let rt = runtime();
    let replay = ReplayCache::for_config(&gateway_ntlm());
    // Windows-like: MIC and key exchange. The MIC only verifies with the
    // right SessionBaseKey, so this checks the DC's User-Session-Key.
    let ok = rt
        .block_on(authenticate(
            &ad,
            pending(SambaDc::NETBIOS_DOMAIN, ALICE.user, ALICE.password),
            &replay,
        ))
        .unwrap_or_else(|e| panic!("{e}\nsamba log:\n{}", dc.log()));
    assert_eq!(ok.version, NtlmVersion::V2);
    assert!(ok.mic_verified);
    assert_eq!(ok.account.user, "alice");
    assert_eq!(ok.account.groups, ["relay-senders"]);

    // curl-like: no MIC, no key exchange.
    let server = ServerHandshake::new(&gateway_ntlm(), clock());
    let curl = ClientOptions {
        mic: false,
        key_exchange: false,
        ..ClientOptions::default()
    };
    let (server, t3) = exchange(server, "RGTEST", ALICE.user, ALICE.password, curl);
    let p = server.begin_authenticate(&t3).unwrap();
    let ok = rt.block_on(authenticate(&ad, p, &replay)).unwrap();
    assert!(!ok.mic_verified);
}

#[test]
fn wrong_password_unknown_user_and_disabled_account_are_refused() {
    let dc = SambaDc::shared();
    let ad = directory(dc);
    let rt = runtime();
    let d = SambaDc::NETBIOS_DOMAIN;
    for (domain, user, password, want) in [
        (d, ALICE.user, "Wrong-Pass-2024!", AdError::BadCredentials),
        (d, "nobody", "Nobody-Pass-2024!", AdError::BadCredentials),
        (d, DAVE.user, "Wrong-Pass-2024!", AdError::BadCredentials),
        (d, DAVE.user, DAVE.password, AdError::AccountDisabled),
    ] {
        let p = pending(domain, user, password);
        assert_eq!(
            rt.block_on(ask_dc(&ad, &p)),
            Err(want.clone()),
            "{domain}\\{user}"
        );
        assert!(want.is_client_fault());
    }
}

#[test]
fn domain_and_user_spellings_the_dc_accepts() {
    let dc = SambaDc::shared();
    let ad = directory(dc);
    let rt = runtime();
    // The NTLMv2 proof covers the names as typed; the DC must accept the
    // spellings Windows clients send.
    for (domain, user) in [
        ("rgtest", "alice"),
        ("RGTEST", "ALICE"),
        ("", "alice"),
        (SambaDc::DNS_DOMAIN, "alice"),
        ("", "alice@ad.relayguard.test"),
    ] {
        let p = pending(domain, user, ALICE.password);
        assert!(
            rt.block_on(ask_dc(&ad, &p)).is_ok(),
            "{domain:?}\\{user:?} refused"
        );
    }
    // A domain the DC does not know is not a way in.
    let p = pending("OTHER", "alice", ALICE.password);
    assert_eq!(rt.block_on(ask_dc(&ad, &p)), Err(AdError::BadCredentials));
}

#[test]
fn a_replayed_authenticate_is_refused_on_the_ad_path() {
    let dc = SambaDc::shared();
    let ad = directory(dc);
    let rt = runtime();
    let replay = ReplayCache::for_config(&gateway_ntlm());
    // A gateway with a stuck RNG and a stopped clock sends byte-identical
    // CHALLENGEs, so a captured AUTHENTICATE passes every other check.
    let stopped: Arc<dyn Clock> = Arc::new(ManualClock::new(SystemTime::now()));
    let challenge = *b"fixedchl";
    let stuck = || ServerHandshake::with_challenge(&gateway_ntlm(), stopped.clone(), challenge);
    let (first, t3) = exchange(
        stuck(),
        "RGTEST",
        ALICE.user,
        ALICE.password,
        ClientOptions::default(),
    );
    let p = first.begin_authenticate(&t3).unwrap();
    rt.block_on(authenticate(&ad, p, &replay)).unwrap();

    // Replayed into a session with the same challenge: the DC keeps no
    // history and says yes; the gateway's replay cache says no.
    let mut again = stuck();
    let mut other = ClientHandshake::new(creds_for("RGTEST", "x", "y"), [0; 8], None);
    again.challenge(&other.negotiate()).unwrap();
    let p = again.begin_authenticate(&t3).unwrap();
    let key = rt
        .block_on(ask_dc(&ad, &p))
        .expect("the DC accepts it again");
    let account = rt.block_on(account(&ad, "alice"));
    assert_eq!(
        p.finish_external(account, key, &replay, None).unwrap_err(),
        NtlmError::Replay
    );

    // Replayed into a session with a fresh challenge: the DC refuses.
    let mut fresh = ServerHandshake::new(&gateway_ntlm(), clock());
    fresh.challenge(&other.negotiate()).unwrap();
    let p = fresh.begin_authenticate(&t3).unwrap();
    assert_eq!(rt.block_on(ask_dc(&ad, &p)), Err(AdError::BadCredentials));
}

#[test]
fn plain_passwords_through_the_dc() {
    let dc = SambaDc::shared();
    let ad = directory(dc);
    let rt = runtime();
    let d = SambaDc::NETBIOS_DOMAIN;
    let ok = [
        (d, ALICE.user, ALICE.password),
        ("", "alice", ALICE.password),
        ("", "alice@ad.relayguard.test", ALICE.password),
        ("", "RGTEST\\alice", ALICE.password),
        (SambaDc::DNS_DOMAIN, "alice", ALICE.password),
        (d, CAROL.user, CAROL.password),
    ];
    for (domain, user, password) in ok {
        assert_eq!(
            rt.block_on(ad.verify_password(user, domain, password)),
            Ok(()),
            "{domain:?}\\{user:?}"
        );
    }
    for (domain, user, password) in [
        (d, ALICE.user, "Wrong-Pass-2024!"),
        (d, ALICE.user, BOB.password),
        (d, "nobody", "Nobody-Pass-2024!"),
        // ntlm_auth gives no reason for a failed password check: a disabled
        // account is just refused.
        (d, DAVE.user, DAVE.password),
    ] {
        assert_eq!(
            rt.block_on(ad.verify_password(user, domain, password)),
            Err(AdError::BadCredentials),
            "{domain:?}\\{user:?}"
        );
    }
}

#[test]
fn groups_come_from_ldap_with_nested_membership() {
    let dc = SambaDc::shared();
    let ad = directory(dc);
    let rt = runtime();
    let groups = |u: &str| {
        rt.block_on(ad.groups(u))
            .unwrap_or_else(|e| panic!("{u}: {e}"))
    };
    assert_eq!(groups("alice"), ["relay-senders"]);
    assert_eq!(groups("carol"), ["helpdesk", "relay-senders"], "nested");
    assert!(groups("bob").is_empty());
    assert_eq!(groups("dave"), ["relay-senders"]);
    for spelling in ["ALICE", "RGTEST\\alice", "alice@ad.relayguard.test"] {
        assert_eq!(groups(spelling), ["relay-senders"], "{spelling}");
    }
    let dave = rt.block_on(ad.entry("dave")).unwrap();
    assert!(!dave.enabled);
    let alice = rt.block_on(ad.entry("Alice")).unwrap();
    assert!(alice.enabled);
    assert_eq!(alice.account_name, "alice");
    assert_eq!(alice.dn, format!("CN=alice,CN=Users,{}", SambaDc::BASE_DN));
    assert!(matches!(
        rt.block_on(ad.groups("nobody")),
        Err(AdError::NoSuchUser(_))
    ));
    // A filter injection attempt finds nobody.
    assert!(matches!(
        rt.block_on(ad.groups("*)(sAMAccountName=alice")),
        Err(AdError::NoSuchUser(_))
    ));
}

#[test]
fn addresses_are_mail_and_smtp_proxy_addresses() {
    let dc = SambaDc::shared();
    let ad = directory(dc);
    let rt = runtime();
    assert_eq!(
        rt.block_on(ad.addresses("alice")).unwrap(),
        ["alice@ad.relayguard.test", "alice.alias@ad.relayguard.test"]
    );
    assert_eq!(
        rt.block_on(ad.addresses("bob")).unwrap(),
        ["bob@ad.relayguard.test"]
    );
}

#[test]
fn ping_checks_winbindd_a_helper_and_ldap() {
    let dc = SambaDc::shared();
    let rt = runtime();
    rt.block_on(directory(dc).ping())
        .unwrap_or_else(|e| panic!("{e}\nsamba log:\n{}", dc.log()));

    let dir = tempfile::tempdir().unwrap();
    let wrong = dir.path().join("wrong-password");
    std::fs::write(&wrong, "Not-The-Password-1!\n").unwrap();
    let mut cfg = ad_config(dc);
    if let Some(l) = cfg.ldap.as_mut() {
        l.bind_password_file = wrong;
    }
    let ad = ActiveDirectory::new(&cfg).unwrap();
    match rt.block_on(ad.ping()) {
        Err(AdError::Unavailable(m)) => assert!(m.contains("bind"), "{m}"),
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        rt.block_on(ad.groups("alice")),
        Err(AdError::Unavailable(_))
    ));
}

fn signal(pid: u32, sig: &str) {
    let status = std::process::Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .expect("run kill");
    assert!(status.success(), "kill {sig} {pid}");
}

fn only_idle_helper(ad: &ActiveDirectory) -> u32 {
    match ad.idle_helper_pids()[..] {
        [pid] => pid,
        ref other => panic!("one idle helper expected, got {other:?}"),
    }
}

#[test]
fn a_killed_helper_is_replaced() {
    let dc = SambaDc::shared();
    let mut cfg = ad_config(dc);
    cfg.helpers = 1;
    let ad = ActiveDirectory::new(&cfg).unwrap();
    let rt = runtime();
    let p = pending("RGTEST", ALICE.user, ALICE.password);
    rt.block_on(ask_dc(&ad, &p)).unwrap();
    let pid = only_idle_helper(&ad);
    signal(pid, "-KILL");
    let p = pending("RGTEST", ALICE.user, ALICE.password);
    assert!(rt.block_on(ask_dc(&ad, &p)).is_ok(), "the next call works");
    assert_eq!(ad.helpers_started(), 2);
    assert_ne!(only_idle_helper(&ad), pid);
    assert_eq!(
        rt.block_on(ad.verify_password("alice", "RGTEST", ALICE.password)),
        Ok(())
    );
}

#[test]
fn a_hung_helper_times_out_and_is_replaced() {
    let dc = SambaDc::shared();
    let mut cfg = ad_config(dc);
    cfg.helpers = 1;
    cfg.timeout = Duration::from_secs(1);
    let ad = ActiveDirectory::new(&cfg).unwrap();
    let rt = runtime();
    let p = pending("RGTEST", ALICE.user, ALICE.password);
    rt.block_on(ask_dc(&ad, &p)).unwrap();
    let pid = only_idle_helper(&ad);
    // A stopped process reads nothing and answers nothing: a hung helper.
    signal(pid, "-STOP");
    let started = Instant::now();
    let p = pending("RGTEST", ALICE.user, ALICE.password);
    assert_eq!(rt.block_on(ask_dc(&ad, &p)), Err(AdError::Timeout));
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
    assert!(ad.idle_helper_pids().is_empty(), "the hung helper is gone");
    // SIGKILL ends a stopped process too; wait until it is reaped or a zombie.
    let gone = relayguard_e2e::wait_until(Duration::from_secs(5), || {
        std::fs::read_to_string(format!("/proc/{pid}/stat")).map_or(true, |s| s.contains(") Z "))
    });
    assert!(gone, "helper {pid} still alive");
    let p = pending("RGTEST", ALICE.user, ALICE.password);
    assert!(rt.block_on(ask_dc(&ad, &p)).is_ok());
    assert_eq!(ad.helpers_started(), 2);
}

#[test]
fn concurrent_verifications_share_the_pool() {
    let dc = SambaDc::shared();
    let ad = directory(dc);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let results = rt.block_on(async {
        let mut tasks = Vec::new();
        for i in 0..12 {
            let ad = ad.clone();
            let (user, password) = match i % 3 {
                0 => (ALICE.user, ALICE.password),
                1 => (CAROL.user, CAROL.password),
                _ => (BOB.user, "Wrong-Pass-2024!"),
            };
            let p = pending("RGTEST", user, password);
            tasks.push(tokio::spawn(async move { (i, ask_dc(&ad, &p).await) }));
        }
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.unwrap());
        }
        out
    });
    for (i, r) in results {
        if i % 3 == 2 {
            assert_eq!(r, Err(AdError::BadCredentials), "#{i}");
        } else {
            assert!(r.is_ok(), "#{i}: {r:?}");
        }
    }
    assert!(
        ad.helpers_started() <= 2,
        "pool of 2: {}",
        ad.helpers_started()
    );
}
