//! `relayguard-loadgen`: load that `smtp-source` cannot make.
//!
//! * `handshakes`: full AUTH NTLM exchanges (NEGOTIATE, CHALLENGE,
//!   AUTHENTICATE) through a gateway, each on its own connection, with the
//!   project's own NTLM client; optionally followed by messages
//!   (`--message` for one, `--messages N` for N on the same connection).
//! * `verify`: in-process NTLMv2 verifications against a users file, per
//!   core, without sockets — the cost of the check itself.
//!
//! Prints one line of `key=value` results, for the benchmark scripts.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use policy::clock::{Clock, SystemClock};
use policy::identity::UsersFile;
use policy::ntlm::{ClientCredentials, ClientHandshake, NtlmConfig, ReplayCache, ServerHandshake};

fn usage() -> ! {
    eprintln!(
        "usage: relayguard-loadgen handshakes ADDR USER DOMAIN PASSWORD CONNECTIONS PARALLEL [--message | --messages N] [--no-auth]\n       relayguard-loadgen verify SECONDS"
    );
    std::process::exit(2)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("handshakes") if args.len() >= 7 => handshakes(&args[1..]),
        Some("verify") if args.len() == 2 => verify(args[1].parse().unwrap_or_else(|_| usage())),
        _ => usage(),
    }
}

struct Conn {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl Conn {
    fn reply(&mut self) -> std::io::Result<String> {
        loop {
            let mut line = String::new();
            if self.reader.read_line(&mut line)? == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            if line.as_bytes().get(3) != Some(&b'-') {
                return Ok(line.trim_end().to_string());
            }
        }
    }

    fn cmd(&mut self, line: &str) -> std::io::Result<String> {
        self.writer.write_all(format!("{line}\r\n").as_bytes())?;
        self.reply()
    }
}

fn expect(reply: &str, code: &str) -> std::io::Result<()> {
    if reply.starts_with(code) {
        Ok(())
    } else {
        Err(std::io::Error::other(format!(
            "expected {code}, got {reply}"
        )))
    }
}

/// One connection: greeting, EHLO, AUTH NTLM in three steps, optionally a
/// message, QUIT. Returns the time the AUTH exchange took.
fn one_session(
    addr: SocketAddr,
    creds: Option<&ClientCredentials>,
    messages: usize,
    n: u64,
) -> std::io::Result<Duration> {
    let tcp = TcpStream::connect(addr)?;
    tcp.set_nodelay(true)?;
    tcp.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut c = Conn {
        reader: BufReader::new(tcp.try_clone()?),
        writer: tcp,
    };
    expect(&c.reply()?, "220")?;
    expect(&c.cmd("EHLO loadgen.test")?, "250")?;
    let started = Instant::now();
    if let Some(creds) = creds {
        auth_ntlm(&mut c, creds, n)?;
    }
    let elapsed = started.elapsed();
    for _ in 0..messages {
        expect(&c.cmd("MAIL FROM:<loadgen@example.test>")?, "250")?;
        expect(&c.cmd("RCPT TO:<rcpt@example.test>")?, "250")?;
        expect(&c.cmd("DATA")?, "354")?;
        c.writer
            .write_all(b"Subject: load\r\n\r\nhello from the load generator\r\n.\r\n")?;
        expect(&c.reply()?, "250")?;
    }
    let _ = c.cmd("QUIT");
    Ok(elapsed)
}

fn auth_ntlm(c: &mut Conn, creds: &ClientCredentials, n: u64) -> std::io::Result<()> {
    let mut hs = ClientHandshake::new(creds.clone(), n.to_le_bytes(), None);
    let negotiate = B64.encode(hs.negotiate());
    let r = c.cmd(&format!("AUTH NTLM {negotiate}"))?;
    expect(&r, "334 ")?;
    let challenge = B64
        .decode(&r[4..])
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    let authenticate = hs
        .authenticate(&challenge)
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    expect(&c.cmd(&B64.encode(authenticate))?, "235")
}

fn handshakes(args: &[String]) {
    let addr: SocketAddr = args[0].parse().unwrap_or_else(|_| usage());
    let creds = ClientCredentials {
        user: args[1].clone(),
        domain: args[2].clone(),
        password: args[3].clone(),
        workstation: "LOADGEN".into(),
    };
    let total: u64 = args[4].parse().unwrap_or_else(|_| usage());
    let parallel: u64 = args[5].parse().unwrap_or_else(|_| usage());
    let messages = match args.iter().position(|a| a == "--messages") {
        Some(i) => args
            .get(i + 1)
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| usage()),
        None => usize::from(args.iter().any(|a| a == "--message")),
    };
    let no_auth = args.iter().any(|a| a == "--no-auth");
    let next = Arc::new(AtomicU64::new(0));
    let failures = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let workers: Vec<_> = (0..parallel)
        .map(|_| {
            let (next, failures, creds) = (next.clone(), failures.clone(), creds.clone());
            std::thread::spawn(move || {
                let mut latencies = Vec::new();
                loop {
                    let n = next.fetch_add(1, Ordering::Relaxed);
                    if n >= total {
                        return latencies;
                    }
                    let creds = (!no_auth).then_some(&creds);
                    match one_session(addr, creds, messages, n) {
                        Ok(d) => latencies.push(d),
                        Err(e) => {
                            if failures.fetch_add(1, Ordering::Relaxed) < 3 {
                                eprintln!("session {n}: {e}");
                            }
                        }
                    }
                }
            })
        })
        .collect();
    let mut latencies: Vec<Duration> = workers
        .into_iter()
        .flat_map(|w| w.join().unwrap_or_default())
        .collect();
    let elapsed = started.elapsed().as_secs_f64();
    latencies.sort();
    let pct = |p: f64| {
        latencies
            .get(((latencies.len() as f64 * p) as usize).min(latencies.len().saturating_sub(1)))
            .map(|d| d.as_secs_f64() * 1e3)
            .unwrap_or(f64::NAN)
    };
    println!(
        "sessions={} failures={} seconds={:.3} per_second={:.1} auth_p50_ms={:.3} auth_p99_ms={:.3}",
        latencies.len(),
        failures.load(Ordering::Relaxed),
        elapsed,
        latencies.len() as f64 / elapsed,
        pct(0.5),
        pct(0.99)
    );
}

/// NTLMv2 verifications per second on one core: the client's messages are
/// made beforehand, so only the server's work is timed.
fn verify(seconds: f64) {
    let users = UsersFile::parse(
        "users:\n  - user: alice\n    domain: DEMO\n    nt_hash: 406660820be8180b5d0f94dfd556cee1\n",
        "<bench>",
    )
    .expect("users file");
    let config = NtlmConfig::new("DEMO", "RELAYGUARD", "demo.test", "relayguard.demo.test");
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let creds = ClientCredentials {
        user: "alice".into(),
        domain: "DEMO".into(),
        password: "alice-pass".into(),
        workstation: "BENCH".into(),
    };
    // Prepared exchanges: (server handshake after CHALLENGE, AUTHENTICATE).
    let batch = 2000u64;
    let prepare = |base: u64| -> Vec<(ServerHandshake, Vec<u8>)> {
        (0..batch)
            .map(|i| {
                let mut server = ServerHandshake::new(&config, clock.clone());
                let mut client =
                    ClientHandshake::new(creds.clone(), (base + i).to_le_bytes(), None);
                let challenge = server.challenge(&client.negotiate()).expect("challenge");
                let auth = client.authenticate(&challenge).expect("authenticate");
                (server, auth)
            })
            .collect()
    };
    let replay = ReplayCache::new(Duration::from_secs(600), 10_000_000);
    let mut done = 0u64;
    let mut busy = Duration::ZERO;
    let mut base = 0;
    while busy.as_secs_f64() < seconds {
        let work = prepare(base);
        base += batch;
        let started = Instant::now();
        for (server, auth) in work {
            server
                .authenticate(&auth, &users, &replay, None)
                .expect("verification succeeds");
            done += 1;
        }
        busy += started.elapsed();
    }
    println!(
        "verifications={done} seconds={:.3} per_second_per_core={:.0}",
        busy.as_secs_f64(),
        done as f64 / busy.as_secs_f64()
    );
}
