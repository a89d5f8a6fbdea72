//! Sessions run over in-memory streams with paused time.
//!
//! A real socket would make the clock jump while the kernel delivers bytes
//! (paused time advances whenever the runtime is idle), so the client here
//! is the other end of a `tokio::io::duplex` pipe and time moves only when
//! a test advances it, or when a test waits for a reply that only a timer
//! can produce. Timing assertions compare the paused clock with the
//! configured limit, so they hold to the millisecond on any machine.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, DuplexStream, ReadBuf};
use tokio::task::JoinHandle;
use tokio::time::{advance, Instant};

use super::{Conversation, Flow, Outcome, Reading, Session, State, Transport, KEEP_BUFFERS};
use crate::server::Shared;

const HOST: &str = "relayguard.test";
const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);
const MS: Duration = Duration::from_millis(1);

/// A configuration needing nothing outside the process: the backend is
/// never contacted by these tests (no RCPT), and the audit log is off
/// unless a test says otherwise. `extra` is appended as it is, right
/// after the `limits:` section (so it may add limits before other keys).
fn config(extra: &str) -> String {
    format!(
        "hostname: {HOST}\n\
         listeners:\n  - name: smtp\n    address: 127.0.0.1:2525\n\
         backend:\n  servers: [\"127.0.0.1:1\"]\n\
         policy:\n  local_domains: [example.test]\n\
         limits:\n  command_timeout: {}s\n\
         {extra}",
        COMMAND_TIMEOUT.as_secs()
    )
}

fn audit_off() -> &'static str {
    "audit:\n  sink: none\n"
}

fn conversation(shared: &Arc<Shared>, listener: &Arc<crate::server::ListenerInfo>) -> Conversation {
    let peer: SocketAddr = "192.0.2.7:40000".parse().expect("peer address");
    Conversation::new("test".into(), peer, listener.clone(), shared.clone())
}

/// A session over one end of an in-memory pipe and its first listener.
fn session<S: Transport>(
    yaml: &str,
    wrap: impl FnOnce(DuplexStream) -> S,
) -> (Session<S>, DuplexStream) {
    let (shared, listeners) = Shared::for_tests(yaml);
    let (client, server) = tokio::io::duplex(64 * 1024);
    let conv = conversation(&shared, &listeners[0]);
    (Session::new(wrap(server), conv), client)
}

/// The server end of a pipe that waits for input the way TCP's
/// `readable()` does: without taking it. `DuplexStream`'s own `Transport`
/// says "readable" at once, so an idle session over it always has a read
/// in flight and never reaches the buffer release in `read_more`; over
/// this one it does, as over TCP.
struct WaitingPipe {
    inner: Mutex<Peeked>,
}

/// The stream, and the byte taken from it to learn that input had come.
struct Peeked {
    io: DuplexStream,
    byte: Option<u8>,
}

impl WaitingPipe {
    fn new(io: DuplexStream) -> Self {
        WaitingPipe {
            inner: Mutex::new(Peeked { io, byte: None }),
        }
    }

    fn peeked(self: Pin<&mut Self>) -> &mut Peeked {
        self.get_mut()
            .inner
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
    }
}

impl Transport for WaitingPipe {
    fn wait_readable(&self) -> impl std::future::Future<Output = io::Result<()>> + Send {
        std::future::poll_fn(move |cx| {
            let mut p = self.inner.lock().unwrap_or_else(|p| p.into_inner());
            if p.byte.is_some() {
                return Poll::Ready(Ok(()));
            }
            let mut one = [0u8; 1];
            let mut buf = ReadBuf::new(&mut one);
            // End of input is "readable" too, as for TCP: the read that
            // follows returns 0.
            let r = Pin::new(&mut p.io).poll_read(cx, &mut buf);
            if r.is_ready() {
                p.byte = buf.filled().first().copied();
            }
            r
        })
    }
}

impl AsyncRead for WaitingPipe {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let p = self.peeked();
        let Some(byte) = p.byte.filter(|_| buf.remaining() > 0) else {
            return Pin::new(&mut p.io).poll_read(cx, buf);
        };
        p.byte = None;
        buf.put_slice(&[byte]);
        // The rest of what is there, as one TCP read would return it.
        match Pin::new(&mut p.io).poll_read(cx, buf) {
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            _ => Poll::Ready(Ok(())),
        }
    }
}

impl AsyncWrite for WaitingPipe {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, b: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.peeked().io).poll_write(cx, b)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.peeked().io).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.peeked().io).poll_shutdown(cx)
    }
}

/// Lets every task that can run do so, without moving the paused clock
/// (time only auto-advances when nothing is runnable, and a yielding task
/// is runnable).
async fn settle() {
    for _ in 0..32 {
        tokio::task::yield_now().await;
    }
}

/// One reply as the client heard it, all its lines.
#[derive(Debug)]
struct Heard(String);

impl Heard {
    /// Asserts the reply starts with `prefix` (code, enhanced code, text).
    #[track_caller]
    fn expect(&self, prefix: &str) -> &str {
        assert!(
            self.0.starts_with(prefix),
            "expected a reply starting {prefix:?}, heard {:?}",
            self.0
        );
        &self.0
    }
}

/// The client end of a session running in its own task.
struct Client<S> {
    io: DuplexStream,
    /// Read from the pipe, not yet taken as a reply.
    input: Vec<u8>,
    session: JoinHandle<Outcome<S>>,
}

impl<S: Transport + 'static> Client<S> {
    /// Starts a greeted session as the accept loop would, and hears the
    /// greeting.
    async fn greeted(yaml: &str, wrap: impl FnOnce(DuplexStream) -> S) -> Self {
        let (session, io) = session(yaml, wrap);
        let mut c = Client {
            io,
            input: Vec::new(),
            session: tokio::spawn(session.greet_and_run()),
        };
        c.reply()
            .await
            .expect(&format!("220 {HOST} ESMTP RelayGuard\r\n"));
        c
    }

    /// Writes `bytes` as they are (no CRLF added) and lets the session
    /// take them in.
    async fn write(&mut self, bytes: &str) {
        self.io
            .write_all(bytes.as_bytes())
            .await
            .expect("the session reads");
        settle().await;
    }

    /// Sends one command line and hears its reply.
    async fn send(&mut self, line: &str) -> Heard {
        self.write(&format!("{line}\r\n")).await;
        self.reply().await
    }

    /// The next whole reply (through its last line, `NNN text`). Waits
    /// for it, so with paused time the clock runs on to whatever timer
    /// the session is waiting for.
    async fn reply(&mut self) -> Heard {
        loop {
            if let Some(end) = reply_end(&self.input) {
                let rest = self.input.split_off(end);
                let reply = std::mem::replace(&mut self.input, rest);
                return Heard(String::from_utf8(reply).expect("replies are UTF-8"));
            }
            let n = self.io.read_buf(&mut self.input).await.expect("read");
            assert!(
                n > 0,
                "connection closed in the middle of a reply: {:?}",
                String::from_utf8_lossy(&self.input)
            );
        }
    }

    /// Asserts the session has said nothing more, without waiting (which
    /// would let the clock run).
    async fn assert_silent(&mut self) {
        settle().await;
        let mut buf = [0u8; 1024];
        let mut buf = ReadBuf::new(&mut buf);
        let polled =
            std::future::poll_fn(|cx| Poll::Ready(Pin::new(&mut self.io).poll_read(cx, &mut buf)))
                .await;
        assert!(
            polled.is_pending() && self.input.is_empty(),
            "expected silence, got {:?}{:?}",
            String::from_utf8_lossy(&self.input),
            String::from_utf8_lossy(buf.filled())
        );
    }

    /// Asserts the session closed the connection after its last reply, and
    /// returns why it ended (the summary line's `end`).
    async fn closed(mut self) -> &'static str {
        let mut rest = Vec::new();
        self.io
            .read_to_end(&mut rest)
            .await
            .expect("read to the end");
        self.input.extend_from_slice(&rest);
        assert!(
            self.input.is_empty(),
            "more after the last reply: {:?}",
            String::from_utf8_lossy(&self.input)
        );
        match self.session.await.expect("the session task") {
            Outcome::Closed(conv) => conv.end,
            Outcome::StartTls(..) => panic!("the session asked for TLS"),
        }
    }
}

/// Where the first whole reply in `input` ends, if there is one.
fn reply_end(input: &[u8]) -> Option<usize> {
    let mut start = 0;
    while let Some(nl) = input[start..].windows(2).position(|w| w == b"\r\n") {
        let line = &input[start..start + nl];
        start += nl + 2;
        if line.get(3) != Some(&b'-') {
            return Some(start);
        }
    }
    None
}

fn plain(io: DuplexStream) -> DuplexStream {
    io
}

/// A client that says nothing after the greeting hears the 421 exactly at
/// `command_timeout`, then the connection closes.
async fn silent_client_times_out<S: Transport + 'static>(wrap: fn(DuplexStream) -> S) {
    let mut c = Client::greeted(&config(audit_off()), wrap).await;
    let waiting_since = Instant::now();
    advance(COMMAND_TIMEOUT - MS).await;
    c.assert_silent().await;
    advance(MS).await;
    c.reply().await.expect(&format!(
        "421 4.4.2 {HOST} Timeout waiting for input, closing connection\r\n"
    ));
    assert_eq!(waiting_since.elapsed(), COMMAND_TIMEOUT);
    assert_eq!(c.closed().await, "timeout");
}

#[tokio::test(start_paused = true)]
async fn silent_client_hears_421_at_command_timeout() {
    silent_client_times_out(plain).await;
}

/// Over a transport that waits for input without a read (TCP), the idle
/// session first gives back its buffers, and must still time out on time.
#[tokio::test(start_paused = true)]
async fn silent_client_hears_421_at_command_timeout_after_buffers_are_released() {
    silent_client_times_out(WaitingPipe::new).await;
}

/// `command_timeout` bounds a whole command line from its first byte: a
/// client sending a byte every third of it must not keep the session.
async fn dribbling_client_is_cut_off<S: Transport + 'static>(wrap: fn(DuplexStream) -> S) {
    let mut c = Client::greeted(&config(audit_off()), wrap).await;
    // The first byte of the next line comes with this one.
    c.write("NOOP\r\nN").await;
    c.reply().await.expect("250 2.0.0 Ok\r\n");
    let first_byte = Instant::now();
    for byte in ["O", "O"] {
        advance(COMMAND_TIMEOUT / 3).await;
        c.write(byte).await;
    }
    advance(COMMAND_TIMEOUT - first_byte.elapsed() - MS).await;
    c.assert_silent().await;
    advance(MS).await;
    c.reply().await.expect("421 4.4.2 ");
    assert_eq!(
        first_byte.elapsed(),
        COMMAND_TIMEOUT,
        "counted from the line's first byte, not from its last"
    );
    assert_eq!(c.closed().await, "timeout");
}

#[tokio::test(start_paused = true)]
async fn dribbling_client_is_cut_off_at_command_timeout_from_the_first_byte() {
    dribbling_client_is_cut_off(plain).await;
}

#[tokio::test(start_paused = true)]
async fn dribbling_client_is_cut_off_over_a_waiting_transport() {
    dribbling_client_is_cut_off(WaitingPipe::new).await;
}

/// Reads and answers one command the way `run` does.
async fn serve_one<S: Transport>(s: &mut Session<S>) {
    loop {
        if let Some(line) = s.lines.next_line(&mut s.rbuf) {
            s.line_deadline = None;
            let line = line.expect("a well-formed line");
            assert!(matches!(s.command(&line).await, Flow::Continue));
            s.flush().await.expect("the client reads");
            return;
        }
        s.read_more(Reading::Command).await.expect("input");
    }
}

async fn read_reply(client: &mut DuplexStream) -> String {
    let mut input = Vec::new();
    while reply_end(&input) != Some(input.len()) {
        assert!(client.read_buf(&mut input).await.expect("read") > 0);
    }
    String::from_utf8(input).expect("UTF-8")
}

/// An idle session holds no buffers once `KEEP_BUFFERS` has passed (ten
/// thousand idle clients would otherwise hold ten thousand of each), keeps
/// them while a busy client is between commands, and serves the next
/// command as well without them.
#[tokio::test(start_paused = true)]
async fn idle_session_gives_back_its_buffers_and_still_serves() {
    let (mut s, mut client) = session(&config(audit_off()), WaitingPipe::new);
    client.write_all(b"EHLO client.test\r\n").await.unwrap();
    serve_one(&mut s).await;
    assert!(read_reply(&mut client).await.starts_with("250-"));
    assert!(s.rbuf.capacity() > 0 && s.wbuf.capacity() > 0);

    // Waits shorter than KEEP_BUFFERS keep both buffers.
    let wait = tokio::time::timeout(KEEP_BUFFERS - MS, s.read_more(Reading::Command)).await;
    assert!(wait.is_err(), "no input was sent");
    assert!(s.rbuf.capacity() > 0, "read buffer released too soon");
    assert!(s.wbuf.capacity() > 0, "write buffer released too soon");

    let wait = tokio::time::timeout(KEEP_BUFFERS + MS, s.read_more(Reading::Command)).await;
    assert!(wait.is_err(), "no input was sent");
    assert_eq!(s.rbuf.capacity(), 0, "read buffer kept while idle");
    assert_eq!(s.wbuf.capacity(), 0, "write buffer kept while idle");

    client.write_all(b"NOOP\r\n").await.unwrap();
    serve_one(&mut s).await;
    assert_eq!(read_reply(&mut client).await, "250 2.0.0 Ok\r\n");
}

/// Commands written in one piece (RFC 2920) are all answered, in order,
/// with no timer involved; here after an idle spell long enough that the
/// session has given back its buffers and reads into new ones.
#[tokio::test(start_paused = true)]
async fn pipelined_commands_are_answered_in_order() {
    let mut c = Client::greeted(&config(audit_off()), WaitingPipe::new).await;
    advance(KEEP_BUFFERS * 2).await;
    let before = Instant::now();
    c.write("EHLO client.test\r\nHELP\r\nVRFY bob\r\nNOOP\r\n")
        .await;
    let ehlo = c.reply().await;
    let ehlo = ehlo.expect(&format!("250-{HOST} Hello 192.0.2.7\r\n"));
    assert!(ehlo.contains("\r\n250-PIPELINING\r\n"), "{ehlo}");
    assert!(ehlo.ends_with("\r\n250 ENHANCEDSTATUSCODES\r\n"), "{ehlo}");
    c.reply().await.expect("214 2.0.0 Commands:");
    c.reply().await.expect("252 2.5.0 Cannot VRFY user");
    c.reply().await.expect("250 2.0.0 Ok\r\n");
    assert_eq!(before.elapsed(), Duration::ZERO);
    c.assert_silent().await;
}

/// MAIL starts a transaction, which clears the count of commands that go
/// nowhere; past `max_junk_commands` of them the session is closed.
#[tokio::test(start_paused = true)]
async fn mail_resets_the_junk_count_and_too_much_junk_closes() {
    // Right after `limits:`, which `config` writes last.
    let yaml = config(&format!("  max_junk_commands: 2\n{}", audit_off()));
    let mut c = Client::greeted(&yaml, plain).await;
    c.send("EHLO client.test").await.expect("250-");
    c.send("NOOP").await.expect("250 2.0.0 Ok");
    c.send("NOOP").await.expect("250 2.0.0 Ok");
    c.send("MAIL FROM:<alice@client.test>")
        .await
        .expect("250 2.1.0 Sender ok");
    c.send("RSET").await.expect("250 2.0.0 Ok");
    c.send("NOOP").await.expect("250 2.0.0 Ok");
    c.send("NOOP")
        .await
        .expect("421 4.7.0 Too many commands without a transaction, closing connection\r\n");
    assert_eq!(c.closed().await, "quit_or_refused");
}

/// A listener with `require_tls_for_auth` and no TLS at all: AUTH is not
/// advertised, and the refusal says TLS is not to be had here (no point in
/// sending the client to a STARTTLS that does not exist). Without the
/// requirement, NTLM (which sends no password) is offered in plain text.
#[tokio::test(start_paused = true)]
async fn auth_on_a_plain_listener_that_requires_tls_is_refused_with_502() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let users = dir.path().join("users.yaml");
    std::fs::write(
        &users,
        "users:\n  - user: alice\n    domain: DEMO\n    nt_hash: 0123456789abcdef0123456789abcdef\n    groups: [relay-senders]\n",
    )
    .expect("write the users file");
    let auth = format!(
        "{}auth:\n  mechanisms: [ntlm]\n  users_file: \"{}\"\n  ntlm:\n    netbios_domain: DEMO\n    netbios_computer: RELAYGUARD\n    dns_domain: demo.test\n    dns_computer: relayguard.demo.test\n",
        audit_off(),
        users.display()
    );

    let mut c = Client::greeted(&config(&auth), plain).await;
    let ehlo = c.send("EHLO client.test").await;
    assert!(!ehlo.expect("250-").contains("AUTH"), "{ehlo:?}");
    c.send("AUTH NTLM")
        .await
        .expect("502 5.7.0 AUTH requires TLS, which this listener does not offer\r\n");

    let open = config(&auth).replace(
        "    address: 127.0.0.1:2525\n",
        "    address: 127.0.0.1:2525\n    require_tls_for_auth: false\n",
    );
    let mut c = Client::greeted(&open, plain).await;
    let ehlo = c.send("EHLO client.test").await;
    assert!(
        ehlo.expect("250-").ends_with("\r\n250 AUTH NTLM\r\n"),
        "{ehlo:?}"
    );
    c.send("AUTH NTLM").await.expect("334 NTLM supported\r\n");
}

/// Runs EHLO and MAIL FROM on a session and returns it in its transaction.
async fn after_mail_from(yaml: &str) -> Session<DuplexStream> {
    let (mut s, _client) = session(yaml, plain);
    assert!(matches!(
        s.command(b"EHLO client.test").await,
        Flow::Continue
    ));
    assert!(matches!(
        s.command(b"MAIL FROM:<alice@client.test>").await,
        Flow::Continue
    ));
    let said = String::from_utf8_lossy(&s.wbuf).into_owned();
    assert!(said.ends_with("\r\n250 2.1.0 Sender ok\r\n"), "{said}");
    s
}

/// With `audit.sink: none` nobody reads an audit record, so none is built.
#[tokio::test(start_paused = true)]
async fn no_audit_record_is_built_without_an_audit_sink() {
    let s = after_mail_from(&config(audit_off())).await;
    let State::Transaction(tx) = &s.state else {
        panic!("MAIL FROM was accepted, so a transaction is open");
    };
    assert!(tx.audit.is_none());
}

/// With a sink, the record is started at MAIL FROM with what is known then.
#[tokio::test(start_paused = true)]
async fn an_audit_record_is_started_at_mail_from_with_a_sink() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let path = dir.path().join("audit.jsonl");
    let audit = format!("audit:\n  sink: file\n  path: \"{}\"\n", path.display());
    let s = after_mail_from(&config(&audit)).await;
    let State::Transaction(tx) = &s.state else {
        panic!("MAIL FROM was accepted, so a transaction is open");
    };
    let record = tx.audit.as_ref().expect("an audit record");
    assert_eq!(record.mail_from.as_deref(), Some("alice@client.test"));
    assert_eq!(record.helo.as_deref(), Some("client.test"));
    assert_eq!(record.listener, "smtp");
}
