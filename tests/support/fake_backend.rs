//! A tiny scripted backend MTA for failures smtp-sink cannot stage: one
//! recipient refused among several, a connection lost in the middle of the
//! message data, a server that stalls, babbles or hangs up (see [`Fault`]),
//! and a rotation of DATA failures for the fault-injection runs
//! ([`DataBehaviour::Rotate`]).

use std::io::{BufRead, BufReader, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// What the fake backend does after answering DATA with 354.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataBehaviour {
    /// Read the message up to the final dot and answer `250 2.0.0`.
    Accept,
    /// Read this many bytes of message data, then close the connection
    /// without a reply.
    CloseAfter(usize),
    /// Read the whole message up to the final dot, store it (see
    /// [`FakeBackend::unacknowledged`]), then close without a reply: the
    /// gateway cannot know whether the message was taken.
    CloseAfterDot,
    /// Read the whole message, then never answer the final dot.
    StallAfterDot,
    /// Read the whole message, then answer the final dot with bytes that
    /// are not an SMTP reply. Nothing is stored.
    GarbageAfterDot,
    /// Answer DATA itself with this reply line (e.g. `452 4.3.1 Full`)
    /// instead of 354: no message data is expected.
    RefuseData(&'static str),
    /// A different fate for each DATA, in turn (counted across
    /// connections): accept; close after a rotating number of data bytes;
    /// close after the whole message but before its final dot; store the
    /// message and close without a reply ([`DataBehaviour::CloseAfterDot`]);
    /// accept.
    Rotate,
}

/// How the fake backend misbehaves outside the message data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// A well-behaved server.
    None,
    /// Accept the connection and close it at once, before any greeting.
    CloseAtOnce,
    /// Greet with this reply line (e.g. `554 5.3.2 No service`).
    Greeting(&'static str),
    /// Never answer this command verb (`RCPT`, `MAIL`, …); keep reading
    /// until the gateway hangs up.
    StallAt(&'static str),
    /// Answer this command verb — or `GREETING` for the greeting — with
    /// bytes that are not an SMTP reply.
    GarbageAt(&'static str),
}

/// What a fake backend sends where a reply belongs in [`Fault::GarbageAt`].
pub const GARBAGE: &[u8] = b"\x00\xff\xfeHTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n";

/// A message the fake backend acknowledged with 250.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FakeMessage {
    pub mail_from: String,
    pub rcpt_to: Vec<String>,
    /// Dot-unstuffed, CRLF line ends as received.
    pub data: String,
}

#[derive(Debug, Default)]
struct Record {
    messages: Vec<FakeMessage>,
    /// Every command line received, across connections.
    commands: Vec<String>,
    /// Bytes of message data received, for DATA that never completed too.
    data_bytes: usize,
    /// Messages taken in full but never answered ([`DataBehaviour::CloseAfterDot`]).
    unacknowledged: Vec<FakeMessage>,
    /// Per connection, in accept order: its command lines, with `<dot>`
    /// for message data ended by the final dot and `<data aborted>` for
    /// data that was not.
    connections: Vec<Vec<String>>,
}

/// Stops accepting when dropped.
pub struct FakeBackend {
    addr: SocketAddr,
    record: Arc<Mutex<Record>>,
    stop: Arc<AtomicBool>,
}

struct Script {
    reject_rcpt: Vec<(String, String)>,
    data: DataBehaviour,
    fault: Fault,
    /// DATA commands so far, for [`DataBehaviour::Rotate`].
    datas: AtomicUsize,
}

impl FakeBackend {
    /// Starts on a free loopback port. `reject_rcpt` pairs a recipient
    /// address with the full reply line it gets (e.g. `("bob@example.test",
    /// "550 5.1.1 No such user")`); other recipients get `250 2.1.5`.
    pub fn start(reject_rcpt: &[(&str, &str)], data: DataBehaviour) -> FakeBackend {
        FakeBackend::spawn(reject_rcpt, data, Fault::None)
    }

    /// Starts a backend that misbehaves as `fault` says, and handles
    /// message data as `data` says.
    pub fn faulty(fault: Fault, data: DataBehaviour) -> FakeBackend {
        FakeBackend::spawn(&[], data, fault)
    }

    fn spawn(reject_rcpt: &[(&str, &str)], data: DataBehaviour, fault: Fault) -> FakeBackend {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind fake backend");
        let addr = listener.local_addr().expect("local_addr");
        let record = Arc::new(Mutex::new(Record::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let script = Arc::new(Script {
            reject_rcpt: reject_rcpt
                .iter()
                .map(|(a, r)| (a.to_string(), r.to_string()))
                .collect(),
            data,
            fault,
            datas: AtomicUsize::new(0),
        });
        let (rec, st) = (record.clone(), stop.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if st.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(conn) = conn else { continue };
                let (rec, script) = (rec.clone(), script.clone());
                let index = {
                    let mut r = rec.lock().unwrap();
                    r.connections.push(Vec::new());
                    r.connections.len() - 1
                };
                std::thread::spawn(move || {
                    let _ = serve(conn, &script, &rec, index);
                });
            }
        });
        FakeBackend { addr, record, stop }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Messages acknowledged with 250 so far.
    pub fn messages(&self) -> Vec<FakeMessage> {
        self.record.lock().unwrap().messages.clone()
    }

    /// Command lines received so far.
    pub fn commands(&self) -> Vec<String> {
        self.record.lock().unwrap().commands.clone()
    }

    /// Bytes of message data received so far (complete or not).
    pub fn data_bytes(&self) -> usize {
        self.record.lock().unwrap().data_bytes
    }

    /// Messages taken in full but never answered: the gateway had to say
    /// 4xx, so the client retries and the backend may hold them twice.
    pub fn unacknowledged(&self) -> Vec<FakeMessage> {
        self.record.lock().unwrap().unacknowledged.clone()
    }

    /// Every connection's command lines, in accept order, with `<dot>`
    /// after complete message data and `<data aborted>` after data that
    /// ended without the final dot.
    pub fn connections(&self) -> Vec<Vec<String>> {
        self.record.lock().unwrap().connections.clone()
    }

    /// How many connections were accepted.
    pub fn connection_count(&self) -> usize {
        self.record.lock().unwrap().connections.len()
    }
}

impl Drop for FakeBackend {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so it sees the flag.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
    }
}

/// Reads message data up to the final dot; `None` if the connection
/// ended first. Dot-unstuffed, CRLF line ends as received.
fn read_message(
    input: &mut BufReader<TcpStream>,
    record: &Mutex<Record>,
) -> std::io::Result<Option<String>> {
    let mut data = String::new();
    let mut line = Vec::new();
    loop {
        line.clear();
        if input.read_until(b'\n', &mut line)? == 0 {
            return Ok(None);
        }
        record.lock().unwrap().data_bytes += line.len();
        if line == b".\r\n" {
            return Ok(Some(data));
        }
        let l = String::from_utf8_lossy(&line);
        data.push_str(l.strip_prefix('.').unwrap_or(&l));
    }
}

/// Reads until the gateway hangs up (or a minute passes), answering nothing.
fn drain(input: &mut BufReader<TcpStream>) {
    let mut sink = Vec::new();
    let _ = std::io::Read::read_to_end(input, &mut sink);
}

fn serve(
    conn: TcpStream,
    script: &Script,
    record: &Mutex<Record>,
    index: usize,
) -> std::io::Result<()> {
    let log = |entry: &str| record.lock().unwrap().connections[index].push(entry.to_string());
    if script.fault == Fault::CloseAtOnce {
        let _ = conn.shutdown(Shutdown::Both);
        return Ok(());
    }
    conn.set_read_timeout(Some(Duration::from_secs(60)))?;
    // Replies go out at once, not after a delayed ACK (Nagle).
    conn.set_nodelay(true)?;
    let mut out = conn.try_clone()?;
    let mut input = BufReader::new(conn);
    match script.fault {
        Fault::Greeting(line) => out.write_all(format!("{line}\r\n").as_bytes())?,
        Fault::GarbageAt("GREETING") => out.write_all(GARBAGE)?,
        _ => out.write_all(b"220 fake.test ESMTP fake backend\r\n")?,
    }
    let mut from = String::new();
    let mut rcpts: Vec<String> = Vec::new();
    let mut line = Vec::new();
    loop {
        line.clear();
        if input.read_until(b'\n', &mut line)? == 0 {
            return Ok(());
        }
        let text = String::from_utf8_lossy(&line).trim_end().to_string();
        record.lock().unwrap().commands.push(text.clone());
        log(&text);
        let upper = text.to_ascii_uppercase();
        let verb = upper.split([' ', ':']).next().unwrap_or("");
        match script.fault {
            Fault::StallAt(v) if v == verb => {
                drain(&mut input);
                return Ok(());
            }
            Fault::GarbageAt(v) if v == verb => {
                out.write_all(GARBAGE)?;
                continue;
            }
            _ => {}
        }
        let reply: String = match verb {
            "EHLO" => {
                "250-fake.test\r\n250-PIPELINING\r\n250-8BITMIME\r\n250 ENHANCEDSTATUSCODES".into()
            }
            "HELO" => "250 fake.test".into(),
            "MAIL" => {
                from = between_angles(&text);
                rcpts.clear();
                "250 2.1.0 Ok".into()
            }
            "RCPT" => {
                let to = between_angles(&text);
                match script.reject_rcpt.iter().find(|(a, _)| *a == to) {
                    Some((_, r)) => r.clone(),
                    None => {
                        rcpts.push(to);
                        "250 2.1.5 Ok".into()
                    }
                }
            }
            "DATA" => {
                if let DataBehaviour::RefuseData(reply) = script.data {
                    out.write_all(format!("{reply}\r\n").as_bytes())?;
                    continue;
                }
                out.write_all(b"354 End data with <CR><LF>.<CR><LF>\r\n")?;
                let behaviour = match script.data {
                    DataBehaviour::Rotate => {
                        let t = script.datas.fetch_add(1, Ordering::SeqCst);
                        match t % 5 {
                            1 => DataBehaviour::CloseAfter(1 + (t * 389) % 3000),
                            // Everything but the final dot: CloseAfter
                            // with more than any message.
                            2 => DataBehaviour::CloseAfter(usize::MAX),
                            3 => DataBehaviour::CloseAfterDot,
                            _ => DataBehaviour::Accept,
                        }
                    }
                    b => b,
                };
                let message = |data| FakeMessage {
                    mail_from: from.clone(),
                    rcpt_to: rcpts.clone(),
                    data,
                };
                match behaviour {
                    DataBehaviour::CloseAfter(n) => {
                        let mut got = 0;
                        while got < n {
                            line.clear();
                            let k = input.read_until(b'\n', &mut line)?;
                            // Never take the final dot.
                            if k == 0 || line == b".\r\n" {
                                break;
                            }
                            got += k;
                            record.lock().unwrap().data_bytes += k;
                        }
                        log("<data aborted>");
                        let _ = out.shutdown(Shutdown::Both);
                        return Ok(());
                    }
                    DataBehaviour::Accept => {
                        let Some(data) = read_message(&mut input, record)? else {
                            log("<data aborted>");
                            return Ok(()); // aborted: nothing recorded
                        };
                        log("<dot>");
                        record.lock().unwrap().messages.push(message(data));
                        from.clear();
                        rcpts.clear();
                        "250 2.0.0 Ok: queued".into()
                    }
                    DataBehaviour::CloseAfterDot => {
                        if let Some(data) = read_message(&mut input, record)? {
                            log("<dot>");
                            record.lock().unwrap().unacknowledged.push(message(data));
                        } else {
                            log("<data aborted>");
                        }
                        let _ = out.shutdown(Shutdown::Both);
                        return Ok(());
                    }
                    DataBehaviour::StallAfterDot => {
                        if read_message(&mut input, record)?.is_some() {
                            log("<dot>");
                            drain(&mut input);
                        }
                        return Ok(());
                    }
                    DataBehaviour::GarbageAfterDot => {
                        if read_message(&mut input, record)?.is_none() {
                            return Ok(());
                        }
                        log("<dot>");
                        out.write_all(GARBAGE)?;
                        continue;
                    }
                    DataBehaviour::Rotate => unreachable!("resolved above"),
                    DataBehaviour::RefuseData(_) => unreachable!("answered above"),
                }
            }
            "RSET" => {
                from.clear();
                rcpts.clear();
                "250 2.0.0 Ok".into()
            }
            "NOOP" => "250 2.0.0 Ok".into(),
            "QUIT" => {
                out.write_all(b"221 2.0.0 Bye\r\n")?;
                return Ok(());
            }
            _ => "502 5.5.2 Error: command not recognized".into(),
        };
        out.write_all(format!("{reply}\r\n").as_bytes())?;
    }
}

fn between_angles(line: &str) -> String {
    line.split_once('<')
        .and_then(|(_, r)| r.split_once('>'))
        .map(|(a, _)| a.to_string())
        .unwrap_or_default()
}
