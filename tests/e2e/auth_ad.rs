//! Authentication end to end with Active Directory as the identity
//! source: the real binary verifying NTLM through `ntlm_auth` and the
//! shared Samba AD DC ([`SambaDc::shared`], started once per test binary),
//! accounts and groups from its LDAP.
//!
//! First the scenarios every identity source must pass (the same list as
//! in `auth.rs`), then what only a directory does: apply its own NTLM
//! policy, and be unreachable. The shared DC cannot be stopped without
//! failing every other AD test, so an unreachable directory is a gateway
//! of its own whose LDAP URL, winbindd or `ntlm_auth` is unusable while
//! the DC runs on.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use relayguard_e2e::ntlm::{self, ClientMode, ClientOptions};
use relayguard_e2e::IdentitySource::ActiveDirectory;
use relayguard_e2e::{closed_port, write_file, SambaDc, TIMEOUT};

use crate::auth::{
    assert_unauthenticated, probe, scenarios, send_plain, start_with, wrong_ntlm, Fixture,
};

// ---------------------------------------------------------------- every identity source

#[test]
fn curl_ntlm_is_delivered_as_esmtpa() {
    scenarios::curl_ntlm_is_delivered_as_esmtpa(ActiveDirectory);
}

#[test]
fn curl_ntlm_wrong_password_and_unknown_user_get_the_same_535() {
    scenarios::curl_ntlm_wrong_password_and_unknown_user_get_the_same_535(ActiveDirectory);
}

#[test]
fn curl_ntlm_over_starttls_is_delivered_as_esmtpsa() {
    scenarios::curl_ntlm_over_starttls_is_delivered_as_esmtpsa(ActiveDirectory);
}

#[test]
fn swaks_ntlm_v1_is_refused_by_default() {
    scenarios::swaks_ntlm_v1_is_refused_by_default(ActiveDirectory);
}

#[test]
fn swaks_plain_and_login_over_starttls() {
    scenarios::swaks_plain_and_login_over_starttls(ActiveDirectory);
}

#[test]
fn curl_plain_over_starttls() {
    scenarios::curl_plain_over_starttls(ActiveDirectory);
}

#[test]
fn plain_and_login_accept_every_login_form() {
    scenarios::plain_and_login_accept_every_login_form(ActiveDirectory);
}

#[test]
fn every_spelling_of_an_account_is_the_same_principal() {
    scenarios::every_spelling_of_an_account_is_the_same_principal(ActiveDirectory);
}

#[test]
fn plain_and_login_refuse_bad_credentials() {
    scenarios::plain_and_login_refuse_bad_credentials(ActiveDirectory);
}

#[test]
fn ntlm_with_the_negotiate_as_initial_response() {
    scenarios::ntlm_with_the_negotiate_as_initial_response(ActiveDirectory);
}

#[test]
fn impacket_ntlmv2_succeeds() {
    scenarios::impacket_ntlmv2_succeeds(ActiveDirectory);
}

#[test]
fn impacket_ntlmv1_is_refused() {
    scenarios::impacket_ntlmv1_is_refused(ActiveDirectory);
}

#[test]
fn impacket_anonymous_is_refused() {
    scenarios::impacket_anonymous_is_refused(ActiveDirectory);
}

#[test]
fn impacket_replayed_authenticate_in_a_new_session_is_refused() {
    scenarios::impacket_replayed_authenticate_in_a_new_session_is_refused(ActiveDirectory);
}

#[test]
fn impacket_wrong_domain_is_refused() {
    scenarios::impacket_wrong_domain_is_refused(ActiveDirectory);
}

#[test]
fn anonymous_lm_and_v1_responses_from_the_rust_client_are_refused() {
    scenarios::anonymous_lm_and_v1_responses_from_the_rust_client_are_refused(ActiveDirectory);
}

#[test]
fn missing_mic_is_refused_when_required() {
    scenarios::missing_mic_is_refused_when_required(ActiveDirectory);
}

#[test]
fn corrupted_mic_is_refused() {
    scenarios::corrupted_mic_is_refused(ActiveDirectory);
}

#[test]
fn msv_av_flags_altered_in_transit_are_refused() {
    scenarios::msv_av_flags_altered_in_transit_are_refused(ActiveDirectory);
}

#[test]
fn tampered_av_pairs_are_refused() {
    scenarios::tampered_av_pairs_are_refused(ActiveDirectory);
}

#[test]
fn stale_ntlmv2_timestamp_is_refused() {
    scenarios::stale_ntlmv2_timestamp_is_refused(ActiveDirectory);
}

#[test]
fn channel_binding_is_checked_over_implicit_tls_and_starttls() {
    scenarios::channel_binding_is_checked_over_implicit_tls_and_starttls(ActiveDirectory);
}

#[test]
fn channel_binding_required_refuses_clients_without_one() {
    scenarios::channel_binding_required_refuses_clients_without_one(ActiveDirectory);
}

#[test]
fn client_address_is_locked_out_after_max_failures() {
    scenarios::client_address_is_locked_out_after_max_failures(ActiveDirectory);
}

#[test]
fn exchange_opened_before_a_client_lockout_is_refused_after_it() {
    scenarios::exchange_opened_before_a_client_lockout_is_refused_after_it(ActiveDirectory);
}

#[test]
fn account_is_locked_out_per_address_after_max_failures() {
    scenarios::account_is_locked_out_per_address_after_max_failures(ActiveDirectory);
}

#[test]
fn account_lockout_covers_every_spelling_of_the_domain() {
    scenarios::account_lockout_covers_every_spelling_of_the_domain(ActiveDirectory);
}

#[test]
fn failure_delay_is_the_same_for_wrong_password_and_unknown_user() {
    scenarios::failure_delay_is_the_same_for_wrong_password_and_unknown_user(ActiveDirectory);
}

#[test]
fn disabled_account_is_refused_with_the_same_535() {
    scenarios::disabled_account_is_refused_with_the_same_535(ActiveDirectory);
}

// ---------------------------------------------------------------- only with a directory

/// What a client gets when the directory cannot decide.
const TEMPORARY: &str = "454 4.7.0 Temporary authentication failure, try again later";

#[test]
fn ntlmv1_allowed_by_the_gateway_is_still_up_to_the_dc() {
    // `allow_ntlmv1` lets NTLMv1 past the gateway's own checks; a DC with
    // Samba's default `ntlm auth = ntlmv2-only` (Windows: LmCompatibilityLevel 5)
    // still refuses it.
    let f = start_with(ActiveDirectory, |c| c.set("auth.ntlm.allow_ntlmv1", "true"));
    let alice = ActiveDirectory.alice();
    let mut c = f.client();
    let v1 = ClientOptions {
        mode: ClientMode::NtlmV1Ess,
        ..ClientOptions::default()
    };
    ntlm::send_auth(&mut c, &ntlm::creds(&alice), v1);
    c.expect("535 5.7.3 Authentication unsuccessful");
    probe(&mut c, "v1");
    assert_unauthenticated(&f.received(1, "v1"));
    f.assert_failures_logged(&["bad_credentials"]);
}

/// Quotes a path for YAML.
fn yaml_path(p: &Path) -> String {
    format!("{:?}", p.display().to_string())
}

/// An executable shell script `name` in `dir`.
fn script(dir: &Path, name: &str, body: &str) -> PathBuf {
    let path = dir.join(name);
    write_file(&path, format!("#!/bin/sh\n{body}\n"));
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

/// Right credentials by NTLM, then by PLAIN after STARTTLS: both get
/// [`TEMPORARY`], the session goes on and stays unauthenticated.
fn assert_right_password_is_temporary(f: &Fixture) {
    let alice = ActiveDirectory.alice();
    let mut c = f.client();
    ntlm::send_auth(&mut c, &ntlm::creds(&alice), ClientOptions::default());
    c.expect(TEMPORARY);
    c.send("NOOP").expect("250");
    probe(&mut c, "ntlm");
    let mut c = f.tls_client();
    send_plain(&mut c, alice.user, alice.password).expect(TEMPORARY);
    probe(&mut c, "plain");
    assert_unauthenticated(&f.received(2, "ntlm"));
    assert_unauthenticated(&f.received(2, "plain"));
    let logs = f.gw.logs().join("\n");
    assert!(
        !logs.contains(alice.password),
        "a password in the logs:\n{logs}"
    );
}

#[test]
fn ldap_unreachable_is_a_temporary_failure_and_not_the_clients() {
    let ldap = format!("\"ldap://{}\"", closed_port());
    let f = start_with(ActiveDirectory, |c| {
        c.set("auth.active_directory.ldap.url", &ldap)
            .set("auth.lockout.max_failures_per_client", "2")
    });
    // The DC accepts alice's response, but whether her account is enabled
    // and what groups she is in cannot be looked up.
    assert_right_password_is_temporary(&f);
    // A wrong password is still refused: the DC says no before LDAP is asked.
    let mut c = f.client();
    wrong_ntlm(&mut c, &ActiveDirectory.alice());
    // Temporary failures do not count against the client: two failures
    // are allowed, and after two temporary ones and a wrong password this
    // address is not locked out.
    ntlm::send_auth(
        &mut c,
        &ntlm::creds(&ActiveDirectory.alice()),
        ClientOptions::default(),
    );
    c.expect(TEMPORARY);
    f.assert_failures_logged(&[
        "directory_unavailable",
        "directory_unavailable",
        "bad_credentials",
        "directory_unavailable",
    ]);
    f.gw.wait_for_event("identity source unavailable", TIMEOUT, |v| {
        v["level"] == "ERROR"
    });
}

/// Whether this process may make a mount namespace (root, or
/// CAP_SYS_ADMIN): `unshare --mount` works.
fn mount_namespaces_work() -> bool {
    Command::new("unshare")
        .args(["--mount", "--propagation", "private", "true"])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

#[test]
fn winbindd_unreachable_is_a_temporary_failure() {
    if !mount_namespaces_work() {
        eprintln!("skipped: `unshare --mount` is not permitted here");
        return;
    }
    // The real ntlm_auth, in a mount namespace of its own where
    // winbindd's socket directory (compiled in: it cannot be configured)
    // is an empty tmpfs: what ntlm_auth meets when winbindd or the DC is
    // stopped. Private propagation keeps the mount away from the DC and
    // every other test.
    let dir = tempfile::tempdir().unwrap();
    let wrapper = script(
        dir.path(),
        "ntlm_auth",
        &format!(
            "exec unshare --mount --propagation private sh -c \
             'mount -t tmpfs -o size=64k no-winbindd {sock} && exec /usr/bin/ntlm_auth \"$@\"' \
             ntlm_auth \"$@\"",
            sock = SambaDc::WINBINDD_SOCKET_DIR
        ),
    );
    // The gateway's own look at winbindd's socket finds nothing either.
    let no_winbindd = dir.path().join("winbindd");
    std::fs::create_dir(&no_winbindd).unwrap();
    let f = start_with(ActiveDirectory, |c| {
        c.set("auth.active_directory.ntlm_auth", &yaml_path(&wrapper))
            .set(
                "auth.active_directory.winbind_socket_dir",
                &yaml_path(&no_winbindd),
            )
    });
    assert_right_password_is_temporary(&f);
    // Nobody can tell a wrong password now: also temporary.
    let mut c = f.client();
    let wrong = ntlm::creds_for(SambaDc::NETBIOS_DOMAIN, "alice", "wrong-pass");
    ntlm::send_auth(&mut c, &wrong, ClientOptions::default());
    c.expect(TEMPORARY);
    f.assert_failures_logged(&[
        "directory_unavailable",
        "directory_unavailable",
        "directory_unavailable",
    ]);
}

#[test]
fn broken_or_hung_ntlm_auth_is_a_temporary_failure() {
    let dir = tempfile::tempdir().unwrap();
    let not_executable = dir.path().join("not-executable");
    write_file(&not_executable, "#!/bin/sh\n");
    let cases = [
        // The configured file is no program.
        (not_executable, "10s", "directory_unavailable"),
        // A helper that exits at once.
        (
            script(dir.path(), "exits", "exit 1"),
            "10s",
            "directory_unavailable",
        ),
        // A helper that never answers.
        (
            script(dir.path(), "hangs", "exec sleep 30"),
            "1s",
            "directory_timeout",
        ),
    ];
    for (helper, timeout, label) in cases {
        let f = start_with(ActiveDirectory, |c| {
            c.set("auth.active_directory.ntlm_auth", &yaml_path(&helper))
                .set("auth.active_directory.timeout", timeout)
        });
        assert_right_password_is_temporary(&f);
        f.assert_failures_logged(&[label, label]);
    }
}

// ---------------------------------------------------------------- benchmark

/// The latency the directory adds to an AUTH NTLM, against the users file,
/// in the same run (interleaved). Not a timed test: it prints the medians
/// for BENCHMARKS.md and asserts only that every exchange succeeded.
/// `cargo test -p relayguard-e2e --test e2e -- --ignored --nocapture ad_latency`
#[test]
#[ignore = "benchmark: run by hand"]
fn ad_latency_against_the_users_file() {
    use relayguard_e2e::IdentitySource::UsersFile;
    use std::time::Instant;
    let sources = [UsersFile, ActiveDirectory];
    let fixtures: Vec<Fixture> = sources.iter().map(|s| start_with(*s, |c| c)).collect();
    let mut samples: Vec<Vec<f64>> = vec![Vec::new(); sources.len()];
    for _ in 0..200 {
        for (i, (src, f)) in sources.iter().zip(&fixtures).enumerate() {
            let mut c = f.client();
            let creds = ntlm::creds(&src.alice());
            let started = Instant::now();
            ntlm::send_auth(&mut c, &creds, ClientOptions::default());
            c.expect("235 2.7.0");
            samples[i].push(started.elapsed().as_secs_f64() * 1e3);
            c.send("QUIT").expect("221");
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        (v[v.len() / 2], v[v.len() * 99 / 100])
    };
    let (users_p50, users_p99) = median(&mut samples[0]);
    let (ad_p50, ad_p99) = median(&mut samples[1]);
    println!(
        "AUTH NTLM exchange, 200 each, interleaved: users file p50 {users_p50:.2} ms p99 {users_p99:.2} ms; \
         Active Directory p50 {ad_p50:.2} ms p99 {ad_p99:.2} ms; added by the directory (p50) {:.2} ms",
        ad_p50 - users_p50
    );
}
