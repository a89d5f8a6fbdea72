//! `relayguard demo`: the whole gateway with an embedded configuration and
//! a built-in capture backend, so one command shows what RelayGuard does.
//!
//! The capture backend is a real SMTP server on a loopback port, reached
//! through the same backend client as a production MTA; it prints one line
//! per delivered message.

use std::net::SocketAddr;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::config::Config;
use crate::smtp::command::{self, Command, ReversePath};
use crate::smtp::data::{DataReceiver, DataStatus};
use crate::smtp::line::LineReader;
use crate::smtp::reply::{EnhancedCode as E, Reply};

/// The embedded configuration. `relayguard demo --print-config` prints it
/// as a starting point for a real one.
pub const DEMO_CONFIG: &str = r#"# RelayGuard demo configuration — a starting point for a real one.
# Our name in the greeting and in the Received header.
hostname: relayguard.demo.test

listeners:
  - name: smtp
    address: 127.0.0.1:2525
    # none | starttls | implicit
    tls: starttls
    # NTLM never sends the password, so the demo accepts it before
    # STARTTLS (Outlook's default). PLAIN and LOGIN need TLS regardless.
    require_tls_for_auth: false

# Certificate for the TLS listeners. The demo generates a self-signed pair
# at start; point these at your real PEM files.
tls:
  certificate: demo-cert.pem
  key: demo-key.pem

backend:
  # The legacy MTA(s), in order of preference. The demo replaces this with
  # its built-in capture backend.
  servers: ["127.0.0.1:25"]

auth:
  mechanisms: [ntlm, login, plain]
  # What the NTLM CHALLENGE publishes (nmap's smtp-ntlm-info shows this).
  ntlm:
    netbios_domain: DEMO
    netbios_computer: RELAYGUARD
    dns_domain: demo.test
    dns_computer: relayguard.demo.test
    allow_ntlmv1: false          # NTLMv2 only
    require_mic: false           # curl sends no MIC; Windows SSPI does
    channel_binding: when_supported
  # Accounts with NT hashes: `relayguard hash-password` makes them.
  users_file: demo-users.yaml
  lockout:
    max_failures_per_client: 10
    max_failures_per_account: 5
    window: 15m
    failure_delay: 1s

# Prometheus metrics, /healthz and /readyz (`--metrics ADDR` moves it).
metrics:
  address: 127.0.0.1:9100

# One JSON record per transaction decision, for a SIEM: `stdout` or
# `file` (with `path`). The demo keeps standard output for the capture
# backend's lines.
audit:
  sink: none

# Who may relay, as whom, from where, to where, how much: the separate
# authorization check that MS02-011 skipped. Reloaded when it changes.
policy_file: demo-policy.yaml
"#;

/// The demo's accounts: `DEMO\\alice` / `alice-pass` and `DEMO\\bob` /
/// `bob-pass` (hashes made with `relayguard hash-password`).
pub const DEMO_USERS: &str = r#"# RelayGuard demo accounts (passwords: alice-pass, bob-pass).
users:
  - user: alice
    domain: DEMO
    nt_hash: 406660820be8180b5d0f94dfd556cee1
    groups: [relay-senders]
    mail: [alice@example.test]
  - user: bob
    domain: DEMO
    nt_hash: 7719f979b983beee07c8487b647c1efd
    groups: [staff]
    mail: [bob@example.test]
"#;

/// Options of the `demo` subcommand.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    pub smtp: SocketAddr,
}

/// Builds the demo configuration: the embedded text with the capture
/// backend's address and a fresh self-signed certificate.
pub fn demo_config(
    opts: &DemoOptions,
    backend: SocketAddr,
    dir: &std::path::Path,
) -> anyhow::Result<Config> {
    let (cert, key) = crate::tls::self_signed("relayguard.demo.test")?;
    std::fs::write(dir.join("demo-cert.pem"), cert)?;
    std::fs::write(dir.join("demo-key.pem"), key)?;
    std::fs::write(dir.join("demo-users.yaml"), DEMO_USERS)?;
    std::fs::write(dir.join("demo-policy.yaml"), policy::relay::DEMO_POLICY)?;
    let mut config = Config::from_yaml(DEMO_CONFIG, "<embedded demo config>")?;
    config.listeners[0].address = opts.smtp;
    config.backend.servers = vec![backend.to_string().parse().map_err(anyhow::Error::msg)?];
    let policy_file = dir.join("demo-policy.yaml");
    config.policy_location = Some(crate::policy_source::PolicyLocation::File(
        policy_file.clone(),
    ));
    config.policy_file = Some(policy_file);
    if let Some(auth) = &mut config.auth {
        auth.users_file = Some(dir.join("demo-users.yaml"));
    }
    if let Some(tls) = &mut config.tls {
        tls.certificate = dir.join("demo-cert.pem");
        tls.key = dir.join("demo-key.pem");
    }
    Ok(config)
}

/// Starts the capture backend on a loopback port and returns its address.
pub async fn start_capture_backend() -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let _ = tcp.set_nodelay(true);
            tokio::spawn(async move {
                let _ = capture_session(tcp).await;
            });
        }
    });
    Ok(addr)
}

fn r(code: u16, e: E, text: &str, out: &mut Vec<u8>) {
    Reply::new(code, e, text).write_to(out);
}

async fn capture_session(mut tcp: TcpStream) -> std::io::Result<()> {
    let mut rbuf = BytesMut::with_capacity(4096);
    let mut out = Vec::new();
    Reply::multi(
        220,
        None,
        vec!["capture.demo.test ESMTP RelayGuard demo capture backend".into()],
    )
    .write_to(&mut out);
    tcp.write_all(&out).await?;
    out.clear();
    let mut lines = LineReader::new(4096);
    let mut from: Option<String> = None;
    let mut rcpts: Vec<String> = Vec::new();
    loop {
        while let Some(line) = lines.next_line(&mut rbuf) {
            let Ok(line) = line else {
                r(500, E(5, 5, 2), "Bad line", &mut out);
                continue;
            };
            match command::parse(&line) {
                Ok(Command::Ehlo(_)) => Reply::multi(
                    250,
                    None,
                    vec![
                        "capture.demo.test".into(),
                        "PIPELINING".into(),
                        "SIZE 104857600".into(),
                        "8BITMIME".into(),
                        "ENHANCEDSTATUSCODES".into(),
                    ],
                )
                .write_to(&mut out),
                Ok(Command::Helo(_)) => r(250, E(2, 0, 0), "capture.demo.test", &mut out),
                Ok(Command::Mail { from: f, .. }) => {
                    from = Some(match f {
                        ReversePath::Null => String::new(),
                        ReversePath::Path(p) => p.raw,
                    });
                    rcpts.clear();
                    r(250, E(2, 1, 0), "Ok", &mut out);
                }
                Ok(Command::Rcpt { to }) if from.is_some() => {
                    rcpts.push(to.raw);
                    r(250, E(2, 1, 5), "Ok", &mut out);
                }
                Ok(Command::Data) if !rcpts.is_empty() => {
                    r(354, E(2, 0, 0), "Go ahead", &mut out);
                    tcp.write_all(&out).await?;
                    out.clear();
                    let mut rx = DataReceiver::new(1_000_000, 104_857_600);
                    let mut sink = Vec::new();
                    loop {
                        let (n, status) = rx.ingest(&rbuf, &mut sink);
                        rbuf.advance(n);
                        sink.clear();
                        if status == DataStatus::Complete {
                            break;
                        }
                        if tcp.read_buf(&mut rbuf).await? == 0 {
                            return Ok(());
                        }
                    }
                    println!(
                        "delivered: from=<{}> to=<{}> size={}",
                        from.take().unwrap_or_default(),
                        rcpts.join(">,<"),
                        rx.size()
                    );
                    rcpts.clear();
                    r(250, E(2, 0, 0), "Ok: captured", &mut out);
                }
                Ok(Command::Rset) => {
                    from = None;
                    rcpts.clear();
                    r(250, E(2, 0, 0), "Ok", &mut out);
                }
                Ok(Command::Noop) => r(250, E(2, 0, 0), "Ok", &mut out),
                Ok(Command::Quit) => {
                    r(221, E(2, 0, 0), "Bye", &mut out);
                    tcp.write_all(&out).await?;
                    return Ok(());
                }
                Ok(_) => r(503, E(5, 5, 1), "Bad sequence of commands", &mut out),
                Err(_) => r(500, E(5, 5, 1), "Command unrecognized", &mut out),
            }
        }
        if !out.is_empty() {
            tcp.write_all(&out).await?;
            out.clear();
        }
        if tcp.read_buf(&mut rbuf).await? == 0 {
            return Ok(());
        }
    }
}
