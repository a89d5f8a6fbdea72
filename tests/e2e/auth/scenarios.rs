//! The authentication scenarios that must hold whatever the identity
//! source: each takes the source, starts its own gateway with it, and uses
//! the source's accounts ([`IdentitySource::alice`], `bob`, `unknown`,
//! `disabled`) and domain names. `auth.rs` runs every one against the
//! users file, `auth_ad.rs` against the Samba AD DC, under the same test
//! names.

use super::*;

/// `DOMAIN\user:password`, as curl's `-u` takes it.
fn curl_login(a: &Account) -> String {
    format!("{}\\{}:{}", a.domain, a.user, a.password)
}

/// `a` with another password.
fn with_password(a: Account, password: &'static str) -> Account {
    Account { password, ..a }
}

// ---------------------------------------------------------------- curl

pub(crate) fn curl_ntlm_is_delivered_as_esmtpa(src: IdentitySource) {
    let f = start_with(src, |c| c);
    let out = curl_ntlm(&f, &curl_login(&src.alice()), false);
    assert_success("curl", &out);
    let received = f.received(1, "curl");
    f.assert_authenticated(&received, "ESMTPA");
    let ev = f.gw.wait_for_event("authenticated", TIMEOUT, |_| true);
    assert_eq!(ev["user"], f.alice_display(), "{ev}");
    assert_eq!(ev["mechanism"], "NTLM", "{ev}");
    assert_eq!(ev["ntlm"], "ntlmv2", "curl must get NTLMv2: {ev}");
}

pub(crate) fn curl_ntlm_wrong_password_and_unknown_user_get_the_same_535(src: IdentitySource) {
    let f = start_with(src, |c| c);
    let wrong = with_password(src.alice(), "wrong-pass");
    for login in [curl_login(&wrong), curl_login(&src.unknown())] {
        let out = curl_ntlm(&f, &login, false);
        let text = output_text(&out);
        assert_eq!(out.status.code(), Some(67), "login denied: {text}");
        assert!(
            text.contains("< 535 5.7.3 Authentication unsuccessful\r\n")
                || text.contains("< 535 5.7.3 Authentication unsuccessful\n"),
            "{text}"
        );
    }
    f.assert_failures_logged(&["bad_credentials", "bad_credentials"]);
    barrier(&f.gw, &f.sink, 1);
}

pub(crate) fn curl_ntlm_over_starttls_is_delivered_as_esmtpsa(src: IdentitySource) {
    let f = start_with(src, |c| c);
    let out = curl_ntlm(&f, &curl_login(&src.alice()), true);
    assert_success("curl", &out);
    let received = f.received(1, "curl");
    f.assert_authenticated(&received, "ESMTPSA");
    assert!(
        received.contains("(using TLSv1.3 with cipher "),
        "{received}"
    );
}

// ---------------------------------------------------------------- swaks

pub(crate) fn swaks_ntlm_v1_is_refused_by_default(src: IdentitySource) {
    let f = start_with(src, |c| c);
    let args = swaks_ntlm(&src.alice());
    let out = swaks_auth(&f, &args.iter().map(String::as_str).collect::<Vec<_>>());
    let text = output_text(&out);
    assert!(!out.status.success(), "{text}");
    assert!(
        text.contains("535 5.7.3 Authentication unsuccessful"),
        "{text}"
    );
    f.assert_failure_logged("ntlmv1_refused");
    barrier(&f.gw, &f.sink, 1);
}

pub(crate) fn swaks_plain_and_login_over_starttls(src: IdentitySource) {
    let f = start_with(src, |c| c);
    let alice = src.alice();
    let netbios_login = format!("{}\\{}", src.netbios_domain(), alice.user);
    let dns_login = format!("{}@{}", alice.user, src.dns_domain());
    let plain = swaks_auth(
        &f,
        &[
            "-tls",
            "--auth",
            "PLAIN",
            "--auth-user",
            &netbios_login,
            "--auth-password",
            alice.password,
        ],
    );
    assert_success("swaks PLAIN", &plain);
    let login = swaks_auth(
        &f,
        &[
            "-tls",
            "--auth",
            "LOGIN",
            "--auth-user",
            &dns_login,
            "--auth-password",
            alice.password,
        ],
    );
    assert_success("swaks LOGIN", &login);
    let bad = swaks_auth(
        &f,
        &[
            "-tls",
            "--auth",
            "PLAIN",
            "--auth-user",
            alice.user,
            "--auth-password",
            "wrong-pass",
        ],
    );
    let text = output_text(&bad);
    assert!(!bad.status.success(), "{text}");
    assert!(
        text.contains("535 5.7.3 Authentication unsuccessful"),
        "{text}"
    );

    let msgs = f.sink.wait_for_messages(2, TIMEOUT);
    for m in &msgs {
        let received = m.first_received().unwrap();
        f.assert_authenticated(&received, "ESMTPSA");
    }
}

// ---------------------------------------------------------------- curl PLAIN

pub(crate) fn curl_plain_over_starttls(src: IdentitySource) {
    let f = start_with(src, |c| c);
    let alice = src.alice();
    let out = curl_plain(&f, &curl_login(&alice));
    assert_success("curl", &out);
    let bad = curl_plain(&f, &curl_login(&with_password(alice, "wrong-pass")));
    let text = output_text(&bad);
    assert_eq!(bad.status.code(), Some(67), "{text}");
    assert!(
        text.contains("< 535 5.7.3 Authentication unsuccessful"),
        "{text}"
    );
    let received = f.received(1, "curl");
    f.assert_authenticated(&received, "ESMTPSA");
    let ev = f.gw.wait_for_event("authenticated", TIMEOUT, |_| true);
    assert_eq!(ev["mechanism"], "PLAIN", "{ev}");
}

// ---------------------------------------------------------------- PLAIN / LOGIN on the raw client

pub(crate) fn plain_and_login_accept_every_login_form(src: IdentitySource) {
    let f = start_with(src, |c| c);
    let alice = src.alice();
    let forms = [
        format!("{}\\{}", src.netbios_domain(), alice.user),
        format!("{}@{}", alice.user, src.dns_domain()),
        alice.user.to_string(),
        format!("{}\\{}", src.netbios_domain(), alice.user.to_uppercase()),
    ];
    let mut total = 0;
    for (i, login) in forms.iter().enumerate() {
        let mut c = f.tls_client();
        send_plain(&mut c, login, alice.password).expect("235 2.7.0");
        probe(&mut c, &format!("plain{i}"));
        total += 1;
        f.assert_authenticated(&f.received(total, &format!("plain{i}")), "ESMTPSA");

        let mut c = f.tls_client();
        c.send("AUTH LOGIN").expect("334 VXNlcm5hbWU6");
        c.send(&ntlm::b64(login.as_bytes()))
            .expect("334 UGFzc3dvcmQ6");
        c.send(&ntlm::b64(alice.password.as_bytes()))
            .expect("235 2.7.0");
        probe(&mut c, &format!("login{i}"));
        total += 1;
        f.assert_authenticated(&f.received(total, &format!("login{i}")), "ESMTPSA");
    }
}

/// However the client spells the domain and the user, the principal
/// (Received header, logs, and so the audit trail) is the account's own
/// spelling.
pub(crate) fn every_spelling_of_an_account_is_the_same_principal(src: IdentitySource) {
    let f = start_with(src, |c| c);
    let alice = src.alice();
    let domain = src.netbios_domain().to_lowercase();
    let user = alice.user.to_uppercase();
    let mut c = f.tls_client();
    send_plain(&mut c, &format!("{domain}\\{user}"), alice.password).expect("235 2.7.0");
    probe(&mut c, "plain");
    f.assert_authenticated(&f.received(1, "plain"), "ESMTPSA");
    let mut c = f.client();
    let creds = ntlm::creds_for(&domain, &user, alice.password);
    ntlm::send_auth(&mut c, &creds, ClientOptions::default());
    c.expect("235 2.7.0");
    probe(&mut c, "ntlm");
    f.assert_authenticated(&f.received(2, "ntlm"), "ESMTPA");
    let names: Vec<_> =
        f.gw.log_events("authenticated")
            .iter()
            .map(|v| v["user"].clone())
            .collect();
    assert_eq!(names, [f.alice_display(), f.alice_display()]);
}

pub(crate) fn plain_and_login_refuse_bad_credentials(src: IdentitySource) {
    let f = start_with(src, |c| c);
    let (alice, bob) = (src.alice(), src.bob());
    let mut c = f.tls_client();
    send_plain(&mut c, alice.user, "wrong-pass").expect("535 5.7.3 Authentication unsuccessful");
    send_plain(&mut c, src.unknown().user, alice.password)
        .expect("535 5.7.3 Authentication unsuccessful");
    // Acting for someone else (authzid) is never allowed.
    let proxy = ntlm::b64(format!("{}\0{}\0{}", bob.user, alice.user, alice.password).as_bytes());
    c.send(&format!("AUTH PLAIN {proxy}"))
        .expect("535 5.7.3 Authentication unsuccessful");
    c.send("AUTH LOGIN").expect("334 VXNlcm5hbWU6");
    c.send(&ntlm::b64(
        format!("{}\\{}", alice.domain, alice.user).as_bytes(),
    ))
    .expect("334 UGFzc3dvcmQ6");
    c.send(&ntlm::b64(b"wrong-pass"))
        .expect("535 5.7.3 Authentication unsuccessful");
    probe(&mut c, "probe");
    assert_unauthenticated(&f.received(1, "probe"));
}

// ---------------------------------------------------------------- AUTH NTLM framing

pub(crate) fn ntlm_with_the_negotiate_as_initial_response(src: IdentitySource) {
    let f = start_with(src, |c| c);
    let mut c = f.client();
    ntlm::send_auth_initial(&mut c, &ntlm::creds(&src.alice()), ClientOptions::default());
    c.expect("235 2.7.0");
    probe(&mut c, "initial");
    f.assert_authenticated(&f.received(1, "initial"), "ESMTPA");
}

// ---------------------------------------------------------------- impacket

pub(crate) fn impacket_ntlmv2_succeeds(src: IdentitySource) {
    let f = start_with(src, |c| c);
    let a = src.alice();
    let mut c = f.client();
    impacket::send_auth(&mut c, a.domain, a.user, a.password, impacket::Mode::NtlmV2);
    c.expect("235 2.7.0");
    probe(&mut c, "impacket");
    f.assert_authenticated(&f.received(1, "impacket"), "ESMTPA");
    let ev = f.gw.wait_for_event("authenticated", TIMEOUT, |_| true);
    assert_eq!(ev["ntlm"], "ntlmv2", "{ev}");
}

pub(crate) fn impacket_ntlmv1_is_refused(src: IdentitySource) {
    let f = start_with(src, |c| c);
    let a = src.alice();
    let mut c = f.client();
    impacket::send_auth(&mut c, a.domain, a.user, a.password, impacket::Mode::NtlmV1);
    c.expect("535 5.7.3 Authentication unsuccessful");
    f.assert_failure_logged("ntlmv1_refused");
    probe(&mut c, "probe");
    assert_unauthenticated(&f.received(1, "probe"));
}

pub(crate) fn impacket_anonymous_is_refused(src: IdentitySource) {
    let f = start_with(src, |c| c);
    let a = src.alice();
    // Empty user and password: empty NT response, one-byte LM response.
    let mut c = f.client();
    impacket::send_auth(&mut c, "", "", "", impacket::Mode::NtlmV2);
    c.expect("535 5.7.3 Authentication unsuccessful");
    probe(&mut c, "anon1");
    // A user name but no NT response.
    let mut c = f.client();
    impacket::send_auth(
        &mut c,
        a.domain,
        a.user,
        a.password,
        impacket::Mode::EmptyNtResponse,
    );
    c.expect("535 5.7.3 Authentication unsuccessful");
    probe(&mut c, "anon2");
    f.assert_failures_logged(&["anonymous_refused", "anonymous_refused"]);
    assert_unauthenticated(&f.received(2, "anon1"));
    assert_unauthenticated(&f.received(2, "anon2"));
}

pub(crate) fn impacket_replayed_authenticate_in_a_new_session_is_refused(src: IdentitySource) {
    let f = start_with(src, |c| c);
    let a = src.alice();
    let mut first = f.client();
    let captured = impacket::send_auth(
        &mut first,
        a.domain,
        a.user,
        a.password,
        impacket::Mode::NtlmV2,
    );
    first.expect("235 2.7.0");
    first.send("QUIT").expect("221");

    let mut c = f.client();
    let neg = impacket::negotiate(impacket::Mode::NtlmV2);
    ntlm::challenge(&mut c, &neg, false);
    c.send(&ntlm::b64(&captured))
        .expect("535 5.7.3 Authentication unsuccessful");
    // And as the answer to a NEGOTIATE sent as initial response.
    ntlm::challenge(&mut c, &neg, true);
    c.send(&ntlm::b64(&captured))
        .expect("535 5.7.3 Authentication unsuccessful");
    f.assert_failures_logged(&["bad_credentials", "bad_credentials"]);
    probe(&mut c, "replay");
    assert_unauthenticated(&f.received(1, "replay"));
}

pub(crate) fn impacket_wrong_domain_is_refused(src: IdentitySource) {
    let f = start_with(src, |c| c);
    let a = src.alice();
    let mut c = f.client();
    impacket::send_auth(&mut c, "OTHER", a.user, a.password, impacket::Mode::NtlmV2);
    c.expect("535 5.7.3 Authentication unsuccessful");
    f.assert_failure_logged("bad_credentials");
    probe(&mut c, "probe");
    assert_unauthenticated(&f.received(1, "probe"));
    // Our DNS domain names the same domain.
    let mut c = f.client();
    impacket::send_auth(
        &mut c,
        src.dns_domain(),
        a.user,
        a.password,
        impacket::Mode::NtlmV2,
    );
    c.expect("235 2.7.0");
}

// ---------------------------------------------------------------- hostile NTLM clients (policy's client)

pub(crate) fn anonymous_lm_and_v1_responses_from_the_rust_client_are_refused(src: IdentitySource) {
    let f = start_with(src, |c| c);
    let cases = [
        (
            "anonymous",
            ClientOptions {
                mode: ClientMode::Anonymous,
                ..ClientOptions::default()
            },
            "anonymous_refused",
        ),
        (
            "anonflag",
            ClientOptions {
                anonymous_flag: true,
                ..ClientOptions::default()
            },
            "anonymous_refused",
        ),
        (
            "lmonly",
            ClientOptions {
                mode: ClientMode::LmOnly,
                ..ClientOptions::default()
            },
            "lm_refused",
        ),
        (
            "v1",
            ClientOptions {
                mode: ClientMode::NtlmV1,
                ..ClientOptions::default()
            },
            "ntlmv1_refused",
        ),
        (
            "v1ess",
            ClientOptions {
                mode: ClientMode::NtlmV1Ess,
                ..ClientOptions::default()
            },
            "ntlmv1_refused",
        ),
    ];
    for (tag, opts, reason) in cases.iter().cloned() {
        let mut c = f.client();
        ntlm::send_auth(&mut c, &ntlm::creds(&src.alice()), opts);
        c.expect("535 5.7.3 Authentication unsuccessful");
        f.assert_failure_logged(reason);
        probe(&mut c, tag);
    }
    for (tag, _, _) in &cases {
        assert_unauthenticated(&f.received(cases.len(), tag));
    }
}

pub(crate) fn missing_mic_is_refused_when_required(src: IdentitySource) {
    let f = start_with(src, |c| c.set("auth.ntlm.require_mic", "true"));
    let alice = ntlm::creds(&src.alice());
    let mut c = f.client();
    ntlm::send_auth(&mut c, &alice, no_mic());
    c.expect("535 5.7.3 Authentication unsuccessful");
    probe(&mut c, "nomic");
    let mut c = f.client();
    let flags_cleared = ClientOptions {
        edit_av_pairs: Some(clear_msv_av_flags),
        ..ClientOptions::default()
    };
    ntlm::send_auth(&mut c, &alice, flags_cleared);
    c.expect("535 5.7.3 Authentication unsuccessful");
    probe(&mut c, "flagless");
    f.assert_failures_logged(&["mic_required", "mic_required"]);
    assert_unauthenticated(&f.received(2, "nomic"));
    assert_unauthenticated(&f.received(2, "flagless"));
    // With its MIC, the same client gets in.
    let mut c = f.client();
    ntlm::send_auth(&mut c, &alice, ClientOptions::default());
    c.expect("235 2.7.0");
}

pub(crate) fn corrupted_mic_is_refused(src: IdentitySource) {
    let f = start_with(src, |c| c);
    let mut c = f.client();
    let opts = ClientOptions {
        corrupt_mic: true,
        ..ClientOptions::default()
    };
    ntlm::send_auth(&mut c, &ntlm::creds(&src.alice()), opts);
    c.expect("535 5.7.3 Authentication unsuccessful");
    f.assert_failure_logged("mic_invalid");
    probe(&mut c, "probe");
    assert_unauthenticated(&f.received(1, "probe"));
}

pub(crate) fn msv_av_flags_altered_in_transit_are_refused(src: IdentitySource) {
    let f = start_with(src, |c| c);
    let mut c = f.client();
    // A relay strips "MIC present" so the MIC would go unchecked.
    ntlm::send_auth_tampered(
        &mut c,
        &ntlm::creds(&src.alice()),
        ClientOptions::default(),
        |mut m| {
            let at = ntlm::blob_av_pair(&m, av_id::FLAGS).expect("MsvAvFlags in the blob");
            assert_eq!(&m[at.clone()], &2u32.to_le_bytes());
            m[at].copy_from_slice(&0u32.to_le_bytes());
            m
        },
    );
    c.expect("535 5.7.3 Authentication unsuccessful");
    f.assert_failure_logged("bad_credentials");
    probe(&mut c, "probe");
    assert_unauthenticated(&f.received(1, "probe"));
}

pub(crate) fn tampered_av_pairs_are_refused(src: IdentitySource) {
    let f = start_with(src, |c| c);
    let alice = ntlm::creds(&src.alice());
    // The client answers target info other than what we sent.
    for (i, edit) in [rename_server as fn(&mut Vec<AvPair>), drop_timestamp]
        .into_iter()
        .enumerate()
    {
        let mut c = f.client();
        let opts = ClientOptions {
            edit_av_pairs: Some(edit),
            ..ClientOptions::default()
        };
        ntlm::send_auth(&mut c, &alice, opts);
        c.expect("535 5.7.3 Authentication unsuccessful");
        probe(&mut c, &format!("edited{i}"));
    }
    // Target info changed in transit, after the client's proof.
    let mut c = f.client();
    ntlm::send_auth_tampered(&mut c, &alice, ClientOptions::default(), |mut m| {
        let at = ntlm::blob_av_pair(&m, av_id::DNS_COMPUTER_NAME).expect("DNS name");
        m[at.start] ^= 0x20;
        m
    });
    c.expect("535 5.7.3 Authentication unsuccessful");
    probe(&mut c, "transit");
    f.assert_failures_logged(&[
        "target_info_mismatch",
        "target_info_mismatch",
        "bad_credentials",
    ]);
    for tag in ["edited0", "edited1", "transit"] {
        assert_unauthenticated(&f.received(3, tag));
    }
}

pub(crate) fn stale_ntlmv2_timestamp_is_refused(src: IdentitySource) {
    let f = start_with(src, |c| c);
    let alice = ntlm::creds(&src.alice());
    // A client using its own clock (as curl does), an hour behind.
    let mut c = f.client();
    let mut hs = ntlm::ClientHandshake::new(
        alice.clone(),
        *b"e2e-cc08",
        Some(filetime_ago(Duration::from_secs(3600))),
    );
    let chal = ntlm::challenge(&mut c, &hs.negotiate(), false);
    c.send(&ntlm::b64(&hs.authenticate(&chal).unwrap()))
        .expect("535 5.7.3 Authentication unsuccessful");
    f.assert_failure_logged("timestamp_out_of_window");
    probe(&mut c, "stale");
    assert_unauthenticated(&f.received(1, "stale"));
    // The same client with a clock in step gets in.
    let mut c = f.client();
    let mut hs =
        ntlm::ClientHandshake::new(alice, *b"e2e-cc09", Some(filetime_ago(Duration::ZERO)));
    let chal = ntlm::challenge(&mut c, &hs.negotiate(), false);
    c.send(&ntlm::b64(&hs.authenticate(&chal).unwrap()))
        .expect("235 2.7.0");
}

// ---------------------------------------------------------------- channel binding

pub(crate) fn channel_binding_is_checked_over_implicit_tls_and_starttls(src: IdentitySource) {
    let f = start_with(src, |c| c);
    let alice = ntlm::creds(&src.alice());
    let ours = policy::ntlm::tls_server_end_point(&f.cert_der).expect("end point");
    let theirs = other_end_point();
    for (i, tls) in ["smtps", "starttls"].into_iter().enumerate() {
        let connect = || match tls {
            "smtps" => f.smtps_client(),
            _ => f.tls_client(),
        };
        let mut c = connect();
        ntlm::send_auth(&mut c, &alice, bound_to(ours.clone()));
        c.expect("235 2.7.0");
        probe(&mut c, &format!("bound{i}"));

        let mut c = connect();
        ntlm::send_auth(&mut c, &alice, bound_to(theirs.clone()));
        c.expect("535 5.7.3 Authentication unsuccessful");
        probe(&mut c, &format!("mitm{i}"));
    }
    // A binding to a TLS session, presented outside TLS.
    let mut c = f.client();
    ntlm::send_auth(&mut c, &alice, bound_to(ours));
    c.expect("535 5.7.3 Authentication unsuccessful");
    probe(&mut c, "plain");
    f.assert_failures_logged(&[
        "channel_binding_mismatch",
        "channel_binding_mismatch",
        "channel_binding_mismatch",
    ]);
    for tag in ["bound0", "bound1"] {
        f.assert_authenticated(&f.received(5, tag), "ESMTPSA");
    }
    for tag in ["mitm0", "mitm1"] {
        let received = f.received(5, tag);
        assert_unauthenticated(&received);
        assert!(received.contains(" with ESMTPS id "), "{received}");
    }
    assert_unauthenticated(&f.received(5, "plain"));
}

pub(crate) fn channel_binding_required_refuses_clients_without_one(src: IdentitySource) {
    let f = start_with(src, |c| c.set("auth.ntlm.channel_binding", "required"));
    let alice = ntlm::creds(&src.alice());
    let ours = policy::ntlm::tls_server_end_point(&f.cert_der).expect("end point");
    let mut c = f.smtps_client();
    ntlm::send_auth(&mut c, &alice, ClientOptions::default());
    c.expect("535 5.7.3 Authentication unsuccessful");
    f.assert_failure_logged("channel_binding_required");
    probe(&mut c, "unbound");
    // Outside TLS there is nothing to bind to.
    let mut c = f.client();
    ntlm::send_auth(&mut c, &alice, ClientOptions::default());
    c.expect("535 5.7.3 Authentication unsuccessful");
    probe(&mut c, "plain");
    assert_unauthenticated(&f.received(2, "unbound"));
    assert_unauthenticated(&f.received(2, "plain"));

    let mut c = f.smtps_client();
    ntlm::send_auth(&mut c, &alice, bound_to(ours));
    c.expect("235 2.7.0");
}

// ---------------------------------------------------------------- brute-force protection

pub(crate) fn client_address_is_locked_out_after_max_failures(src: IdentitySource) {
    let f = start_with(src, |c| c.set("auth.lockout.max_failures_per_client", "3"));
    let (alice, bob) = (src.alice(), src.bob());
    let mut c = f.client();
    wrong_ntlm(&mut c, &alice);
    wrong_ntlm(&mut c, &bob);
    let mut c = f.client();
    wrong_ntlm(&mut c, &alice);
    // The 4th AUTH from this address, with the right password.
    let mut c = f.client();
    c.send("AUTH NTLM")
        .expect("454 4.7.0 Too many authentication failures, try again later");
    c.send("NOOP").expect("250");
    let mut c = f.tls_client();
    send_plain(&mut c, alice.user, alice.password).expect("454 4.7.0");
    probe(&mut c, "locked");
    assert_unauthenticated(&f.received(1, "locked"));
    // Another client machine is not affected.
    let mut c = Client::connect_from(f.smtp(), OTHER_CLIENT);
    c.expect("220");
    c.ehlo("client.test").expect("250");
    ntlm::send_auth(&mut c, &ntlm::creds(&alice), ClientOptions::default());
    c.expect("235 2.7.0");
}

pub(crate) fn exchange_opened_before_a_client_lockout_is_refused_after_it(src: IdentitySource) {
    let f = start_with(src, |c| c.set("auth.lockout.max_failures_per_client", "3"));
    let alice = src.alice();
    // An attacker keeps one exchange waiting at the CHALLENGE…
    let mut waiting = f.client();
    let mut hs = ntlm::ClientHandshake::new(ntlm::creds(&alice), *b"e2e-cc07", None);
    let chal = ntlm::challenge(&mut waiting, &hs.negotiate(), false);
    // …guesses until the address is locked out…
    let mut c = f.client();
    for _ in 0..3 {
        wrong_ntlm(&mut c, &alice);
    }
    let mut c = f.client();
    c.send("AUTH NTLM").expect("454 4.7.0");
    // …then answers the waiting CHALLENGE: one guess more than allowed.
    waiting.send(&ntlm::b64(&hs.authenticate(&chal).unwrap()));
    let r = waiting.read_reply();
    assert!(
        matches!(r.code, 454 | 535),
        "a locked-out address must not authenticate:\n{}",
        waiting.transcript()
    );
}

pub(crate) fn account_is_locked_out_per_address_after_max_failures(src: IdentitySource) {
    let f = start_with(src, |c| c.set("auth.lockout.max_failures_per_account", "2"));
    let (alice, bob) = (src.alice(), src.bob());
    let mut c = f.client();
    wrong_ntlm(&mut c, &alice);
    wrong_ntlm(&mut c, &alice);
    // Now even the right password is refused for alice from here…
    let mut c = f.client();
    ntlm::send_auth(&mut c, &ntlm::creds(&alice), ClientOptions::default());
    c.expect("535 5.7.3 Authentication unsuccessful");
    f.assert_failure_logged("locked_out");
    probe(&mut c, "locked");
    let mut c = f.tls_client();
    let login = format!("{}\\{}", alice.domain, alice.user);
    send_plain(&mut c, &login, alice.password).expect("535 5.7.3");
    // …but not for bob from here, nor for alice from elsewhere.
    let mut c = f.client();
    ntlm::send_auth(&mut c, &ntlm::creds(&bob), ClientOptions::default());
    c.expect("235 2.7.0");
    let mut c = Client::connect_from(f.smtp(), OTHER_CLIENT);
    c.expect("220");
    c.ehlo("client.test").expect("250");
    ntlm::send_auth(&mut c, &ntlm::creds(&alice), ClientOptions::default());
    c.expect("235 2.7.0");
    assert_unauthenticated(&f.received(1, "locked"));
}

pub(crate) fn account_lockout_covers_every_spelling_of_the_domain(src: IdentitySource) {
    let f = start_with(src, |c| c.set("auth.lockout.max_failures_per_account", "2"));
    let alice = src.alice();
    let mut c = f.client();
    wrong_ntlm(&mut c, &alice);
    wrong_ntlm(&mut c, &alice);
    // The same account, named by our DNS domain: still locked out.
    let mut c = f.client();
    let creds = ntlm::creds_for(src.dns_domain(), alice.user, alice.password);
    ntlm::send_auth(&mut c, &creds, ClientOptions::default());
    c.expect("535 5.7.3 Authentication unsuccessful");
    f.assert_failure_logged("locked_out");
}

pub(crate) fn failure_delay_is_the_same_for_wrong_password_and_unknown_user(src: IdentitySource) {
    let f = start_with(src, |c| c.set("auth.lockout.failure_delay", "300ms"));
    let floor = Duration::from_millis(250);
    let (alice, unknown) = (src.alice(), src.unknown());
    let mut c = f.client();
    let wrong = timed(&mut c, "535 5.7.3", |c| {
        let creds = ntlm::creds_for(alice.domain, alice.user, "wrong-pass");
        ntlm::send_auth(c, &creds, ClientOptions::default());
    });
    let unknown_ntlm = timed(&mut c, "535 5.7.3", |c| {
        ntlm::send_auth(c, &ntlm::creds(&unknown), ClientOptions::default());
    });
    let mut t = f.tls_client();
    let plain_wrong = timed(&mut t, "535 5.7.3", |t| {
        send_plain(t, alice.user, "wrong-pass");
    });
    let plain_unknown = timed(&mut t, "535 5.7.3", |t| {
        send_plain(t, unknown.user, unknown.password);
    });
    for (what, d) in [
        ("NTLM wrong password", wrong),
        ("NTLM unknown user", unknown_ntlm),
        ("PLAIN wrong password", plain_wrong),
        ("PLAIN unknown user", plain_unknown),
    ] {
        assert!(d >= floor, "{what} answered after {d:?}, before the delay");
    }
    probe(&mut c, "probe");
    assert_unauthenticated(&f.received(1, "probe"));
}

// ---------------------------------------------------------------- accounts

pub(crate) fn disabled_account_is_refused_with_the_same_535(src: IdentitySource) {
    let f = start_with(src, |c| c);
    let dave = src.disabled();
    let mut c = f.client();
    ntlm::send_auth(&mut c, &ntlm::creds(&dave), ClientOptions::default());
    c.expect("535 5.7.3 Authentication unsuccessful");
    f.assert_failure_logged("account_disabled");
    probe(&mut c, "ntlm");
    let mut c = f.tls_client();
    send_plain(&mut c, dave.user, dave.password).expect("535 5.7.3 Authentication unsuccessful");
    probe(&mut c, "plain");
    assert_unauthenticated(&f.received(2, "ntlm"));
    assert_unauthenticated(&f.received(2, "plain"));
}
