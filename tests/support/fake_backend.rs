//! A tiny scripted backend MTA for failures smtp-sink cannot stage: one
//! recipient refused among several, a connection lost in the middle of the
//! message data.

use std::io::{BufRead, BufReader, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
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
}

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
}

impl FakeBackend {
    /// Starts on a free loopback port. `reject_rcpt` pairs a recipient
    /// address with the full reply line it gets (e.g. `("bob@example.test",
    /// "550 5.1.1 No such user")`); other recipients get `250 2.1.5`.
    pub fn start(reject_rcpt: &[(&str, &str)], data: DataBehaviour) -> FakeBackend {
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
        });
        let (rec, st) = (record.clone(), stop.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if st.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(conn) = conn else { continue };
                let (rec, script) = (rec.clone(), script.clone());
                std::thread::spawn(move || {
                    let _ = serve(conn, &script, &rec);
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
}

impl Drop for FakeBackend {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so it sees the flag.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
    }
}

fn serve(conn: TcpStream, script: &Script, record: &Mutex<Record>) -> std::io::Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(60)))?;
    let mut out = conn.try_clone()?;
    let mut input = BufReader::new(conn);
    out.write_all(b"220 fake.test ESMTP fake backend\r\n")?;
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
        let upper = text.to_ascii_uppercase();
        let verb = upper.split([' ', ':']).next().unwrap_or("");
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
                out.write_all(b"354 End data with <CR><LF>.<CR><LF>\r\n")?;
                match script.data {
                    DataBehaviour::CloseAfter(n) => {
                        let mut got = 0;
                        while got < n {
                            line.clear();
                            let k = input.read_until(b'\n', &mut line)?;
                            if k == 0 {
                                break;
                            }
                            got += k;
                            record.lock().unwrap().data_bytes += k;
                        }
                        let _ = out.shutdown(Shutdown::Both);
                        return Ok(());
                    }
                    DataBehaviour::Accept => {
                        let mut data = String::new();
                        loop {
                            line.clear();
                            if input.read_until(b'\n', &mut line)? == 0 {
                                return Ok(()); // aborted: nothing recorded
                            }
                            record.lock().unwrap().data_bytes += line.len();
                            if line == b".\r\n" {
                                break;
                            }
                            let l = String::from_utf8_lossy(&line);
                            data.push_str(l.strip_prefix('.').unwrap_or(&l));
                        }
                        record.lock().unwrap().messages.push(FakeMessage {
                            mail_from: std::mem::take(&mut from),
                            rcpt_to: std::mem::take(&mut rcpts),
                            data,
                        });
                        "250 2.0.0 Ok: queued".into()
                    }
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
