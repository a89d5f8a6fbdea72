//! A raw SMTP client for protocol edge cases: it sends exactly the bytes a
//! test gives it and reads replies one at a time, keeping a transcript for
//! failure messages.
//!
//! ```no_run
//! # use relayguard_e2e::{config, Client, Gateway, Sink};
//! # let sink = Sink::start(&[]);
//! # let gw = Gateway::start(&config(sink.addr(), &[]));
//! let mut c = Client::connect(gw.addr("smtp"));
//! c.expect("220");
//! c.ehlo("client.test").expect("250");
//! c.mail("a@b.test").expect("250 2.1.0");
//! c.rcpt("x@ext.test").expect("550 5.7.1");
//! ```

use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConnection, DigitallySignedStruct, SignatureScheme, StreamOwned};
use socket2::{Domain, Protocol, Socket, Type};

/// How long one reply may take to arrive.
const READ_TIMEOUT: Duration = Duration::from_secs(15);

/// One SMTP reply: its code and its text lines (without `250-`/`250 `).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub code: u16,
    /// The raw lines as received, without CRLF (`250-PIPELINING`, …).
    pub lines: Vec<String>,
}

impl Reply {
    /// The first line as received, e.g. `550 5.7.1 Relaying denied`.
    pub fn first(&self) -> &str {
        &self.lines[0]
    }

    /// Whether any line's text (after the code) equals `keyword`, as in
    /// an EHLO reply's extension list.
    pub fn has_line(&self, keyword: &str) -> bool {
        self.lines
            .iter()
            .any(|l| l.get(4..).is_some_and(|t| t.eq_ignore_ascii_case(keyword)))
    }
}

/// Test only: accepts any server certificate (but still checks the
/// handshake signatures). The gateway's certificates are self-signed.
#[derive(Debug)]
struct AcceptAnyCert(Arc<CryptoProvider>);

impl ServerCertVerifier for AcceptAnyCert {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

fn tls_config() -> Arc<rustls::ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAnyCert(provider)))
        .with_no_client_auth();
    Arc::new(config)
}

enum Stream {
    Plain(TcpStream),
    Tls(Box<StreamOwned<ClientConnection, TcpStream>>),
    /// Only while switching to TLS.
    Switching,
}

impl Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.read(buf),
            Stream::Tls(s) => s.read(buf),
            Stream::Switching => unreachable!(),
        }
    }

    fn write_all(&mut self, bytes: &[u8]) -> io::Result<()> {
        match self {
            Stream::Plain(s) => s.write_all(bytes),
            Stream::Tls(s) => s.write_all(bytes).and_then(|()| s.flush()),
            Stream::Switching => unreachable!(),
        }
    }

    fn tcp(&self) -> &TcpStream {
        match self {
            Stream::Plain(s) => s,
            Stream::Tls(s) => s.get_ref(),
            Stream::Switching => unreachable!(),
        }
    }
}

/// The message as sent after DATA: lines starting with `.` get another
/// one, a missing final CRLF is added, and `.` CRLF ends it. `body` should
/// use CRLF line ends.
pub fn dot_stuff(body: &str) -> String {
    let mut out = String::with_capacity(body.len() + 8);
    for line in body.split_inclusive("\r\n") {
        if line.starts_with('.') {
            out.push('.');
        }
        out.push_str(line);
    }
    if !out.is_empty() && !out.ends_with("\r\n") {
        out.push_str("\r\n");
    }
    out.push_str(".\r\n");
    out
}

pub struct Client {
    stream: Stream,
    buf: Vec<u8>,
    transcript: Vec<String>,
}

fn tls_handshake(
    tcp: TcpStream,
    server_name: &str,
) -> io::Result<StreamOwned<ClientConnection, TcpStream>> {
    let name = ServerName::try_from(server_name.to_string()).expect("valid TLS server name");
    let conn = ClientConnection::new(tls_config(), name).map_err(io::Error::other)?;
    let mut tls = StreamOwned::new(conn, tcp);
    while tls.conn.is_handshaking() {
        tls.conn.complete_io(&mut tls.sock)?;
    }
    Ok(tls)
}

impl Client {
    /// Connects over plain TCP. The greeting is not read: `expect("220")`.
    pub fn connect(addr: SocketAddr) -> Client {
        let tcp = TcpStream::connect_timeout(&addr, READ_TIMEOUT)
            .unwrap_or_else(|e| panic!("connect {addr}: {e}"));
        Client::over(tcp, addr)
    }

    /// Connects over plain TCP, returning the error instead of panicking
    /// (for a gateway that may have stopped listening).
    pub fn try_connect(addr: SocketAddr) -> io::Result<Client> {
        let tcp = TcpStream::connect_timeout(&addr, READ_TIMEOUT)?;
        Ok(Client::over(tcp, addr))
    }

    /// Connects from another loopback source address (e.g. `127.0.0.2`),
    /// to play a second client machine.
    pub fn connect_from(addr: SocketAddr, source: IpAddr) -> Client {
        let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))
            .expect("socket");
        socket
            .bind(&SocketAddr::new(source, 0).into())
            .unwrap_or_else(|e| panic!("bind {source}: {e}"));
        socket
            .connect_timeout(&addr.into(), READ_TIMEOUT)
            .unwrap_or_else(|e| panic!("connect {addr} from {source}: {e}"));
        let mut c = Client::over(socket.into(), addr);
        c.transcript.push(format!("(from {source})"));
        c
    }

    fn over(tcp: TcpStream, addr: SocketAddr) -> Client {
        tcp.set_read_timeout(Some(READ_TIMEOUT))
            .expect("set_read_timeout");
        tcp.set_nodelay(true).expect("nodelay");
        Client {
            stream: Stream::Plain(tcp),
            buf: Vec::new(),
            transcript: vec![format!("(connected to {addr})")],
        }
    }

    /// Connects, expects the 220 greeting and sends EHLO, expecting 250.
    pub fn greeted(addr: SocketAddr) -> Client {
        let mut c = Client::connect(addr);
        c.expect("220");
        c.ehlo("client.test").expect("250");
        c
    }

    /// Connects with TLS from the first byte (RFC 8314), accepting any
    /// certificate. The greeting is not read.
    pub fn implicit_tls(addr: SocketAddr, server_name: &str) -> Client {
        let mut c = Client::connect(addr);
        c.upgrade(server_name)
            .unwrap_or_else(|e| panic!("TLS handshake with {addr} failed: {e}"));
        c
    }

    fn upgrade(&mut self, server_name: &str) -> io::Result<()> {
        let Stream::Plain(tcp) = std::mem::replace(&mut self.stream, Stream::Switching) else {
            panic!("already TLS");
        };
        let tls = tls_handshake(tcp, server_name)?;
        let version = tls.conn.protocol_version();
        self.transcript
            .push(format!("(TLS established: {version:?})"));
        self.stream = Stream::Tls(Box::new(tls));
        Ok(())
    }

    /// Sends STARTTLS, expects 220 and performs the handshake; returns the
    /// negotiated version (e.g. `TLSv1_3`).
    pub fn starttls(&mut self, server_name: &str) -> String {
        self.send("STARTTLS").expect("220");
        if !self.buf.is_empty() {
            self.fail("data after the STARTTLS reply");
        }
        if let Err(e) = self.upgrade(server_name) {
            self.fail(&format!("TLS handshake failed: {e}"));
        }
        self.tls_version().expect("TLS version")
    }

    /// The negotiated TLS version, `None` on a plain connection.
    pub fn tls_version(&self) -> Option<String> {
        match &self.stream {
            Stream::Tls(s) => s.conn.protocol_version().map(|v| format!("{v:?}")),
            _ => None,
        }
    }

    /// Sends one command line (CRLF appended).
    pub fn send(&mut self, line: &str) -> &mut Client {
        self.transcript.push(format!("C: {line}"));
        let bytes = format!("{line}\r\n");
        self.write(bytes.as_bytes());
        self
    }

    /// Sends bytes exactly as given.
    pub fn send_raw(&mut self, bytes: &[u8]) -> &mut Client {
        let shown = String::from_utf8_lossy(&bytes[..bytes.len().min(300)]).into_owned();
        let more = if bytes.len() > 300 {
            format!("… ({} bytes)", bytes.len())
        } else {
            String::new()
        };
        self.transcript.push(format!("C(raw): {shown:?}{more}"));
        self.write(bytes);
        self
    }

    fn write(&mut self, bytes: &[u8]) {
        if let Err(e) = self.stream.write_all(bytes) {
            self.fail(&format!("write failed: {e}"));
        }
    }

    pub fn ehlo(&mut self, name: &str) -> &mut Client {
        self.send(&format!("EHLO {name}"))
    }

    pub fn mail(&mut self, from: &str) -> &mut Client {
        self.send(&format!("MAIL FROM:<{from}>"))
    }

    pub fn rcpt(&mut self, to: &str) -> &mut Client {
        self.send(&format!("RCPT TO:<{to}>"))
    }

    /// Sends DATA, expects 354, then sends `body` and the final dot (see
    /// [`dot_stuff`]). The final reply is left for the caller's `expect`.
    pub fn data_body(&mut self, body: &str) -> &mut Client {
        self.send("DATA").expect("354");
        self.transcript
            .push(format!("C: <{} bytes of message>", body.len()));
        self.write(dot_stuff(body).as_bytes());
        self
    }

    /// Reads one line (without CRLF); `Ok(None)` at end of stream.
    fn read_line(&mut self) -> io::Result<Option<String>> {
        loop {
            if let Some(end) = self.buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=end).collect();
                let text = String::from_utf8_lossy(&line);
                return Ok(Some(text.trim_end_matches(['\r', '\n']).to_string()));
            }
            let mut chunk = [0u8; 4096];
            match self.stream.read(&mut chunk) {
                Ok(0) => return Ok(None),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Reads one (possibly multi-line) reply; `Err` on timeout, end of
    /// stream or a malformed line.
    pub fn try_read_reply(&mut self) -> io::Result<Reply> {
        let mut lines = Vec::new();
        loop {
            let line = self
                .read_line()?
                .ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, "connection closed"))?;
            self.transcript.push(format!("S: {line}"));
            let code = line
                .get(..3)
                .and_then(|c| c.parse::<u16>().ok())
                .ok_or_else(|| {
                    io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("bad reply line {line:?}"),
                    )
                })?;
            let last = line.as_bytes().get(3) != Some(&b'-');
            lines.push(line);
            if last {
                return Ok(Reply { code, lines });
            }
        }
    }

    /// Reads one reply; panics with the transcript if there is none.
    pub fn read_reply(&mut self) -> Reply {
        match self.try_read_reply() {
            Ok(r) => r,
            Err(e) => self.fail(&format!("no reply: {e}")),
        }
    }

    /// Reads one reply and asserts its first line starts with `prefix`
    /// (e.g. `"550 5.7.1"`); panics with the whole transcript otherwise.
    pub fn expect(&mut self, prefix: &str) -> Reply {
        let r = self.read_reply();
        if !r.first().starts_with(prefix) {
            self.fail(&format!("expected a reply starting with {prefix:?}"));
        }
        r
    }

    /// Whether the server closed the connection: end of stream (or a
    /// reset) within a few seconds, with no more data before it.
    pub fn is_closed(&mut self) -> bool {
        if !self.buf.is_empty() {
            return false;
        }
        let tcp = self.stream.tcp().try_clone().expect("clone socket");
        tcp.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("set_read_timeout");
        let mut chunk = [0u8; 1024];
        let closed = match self.stream.read(&mut chunk) {
            Ok(0) => true,
            Ok(n) => {
                self.buf.extend_from_slice(&chunk[..n]);
                self.transcript.push(format!(
                    "S(unread): {:?}",
                    String::from_utf8_lossy(&chunk[..n])
                ));
                false
            }
            Err(e) => !matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ),
        };
        tcp.set_read_timeout(Some(READ_TIMEOUT))
            .expect("set_read_timeout");
        closed
    }

    /// A second handle on the plain TCP socket, to write from another
    /// thread (bypassing the transcript) while this client reads.
    pub fn try_clone_stream(&self) -> TcpStream {
        self.stream.tcp().try_clone().expect("clone socket")
    }

    /// The conversation so far, one line per command or reply line.
    pub fn transcript(&self) -> String {
        self.transcript.join("\n")
    }

    fn fail(&self, why: &str) -> ! {
        panic!("{why}\n--- SMTP transcript ---\n{}\n---", self.transcript())
    }
}
