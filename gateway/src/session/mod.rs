//! One client SMTP session, as an explicit state machine.
//!
//! ```text
//!            EHLO/HELO            MAIL                 RCPT (≥1 accepted)
//!   Fresh ─────────────▶ Ready ─────────▶ Transaction ───────────────┐
//!     ▲                   ▲  ▲               │  RSET / EHLO          │ DATA → 354
//!     │ STARTTLS (TLS,    │  └───────────────┘                       ▼
//!     │ state discarded)  └────────────── final reply ◀──── body streamed to backend
//! ```
//!
//! Commands are parsed by [`crate::smtp`] (no I/O there); this module does
//! the I/O, asks the policy, talks to the backend, and decides replies. It
//! is generic over the stream so the same code runs over TCP, TLS, or an
//! in-memory pipe.
//!
//! Invariant: a client hears 250 for a message only after the backend
//! said 250 for it. Any doubt ends in a 4xx so the client retries.

pub mod received;
pub mod replies;
#[cfg(test)]
mod stream_tests;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::audit::{AuditDecision, AuditRecord};
use crate::auth::sasl::{self, Exchange, Progress};
use crate::auth::{AuthFailure, Mechanism, Principal};
use crate::backend::{BackendError, Connection, MailArgs, Wire};
use crate::config::{TlsMode, VrfyReply};
use crate::server::{ListenerInfo, Shared};
use crate::smtp::command::{self, Body, Command, MailParams, Path, ReversePath};
use crate::smtp::data::{DataReceiver, DataStatus, Passed};
use crate::smtp::line::{LineError, LineReader};
use crate::smtp::reply::{EnhancedCode as E, Reply};
use crate::tls::TlsInfo;
use policy::relay::{Context, Policy, RcptDecision, Refusal, SenderDecision};

/// RFC 4954 §4: AUTH lines may carry up to 12288 octets of SASL data.
const MAX_AUTH_LINE: usize = 12_288;
/// Flush replies once this much is queued even if the client keeps
/// pipelining, so a flood of commands cannot grow the buffer unbounded.
const MAX_PENDING_OUTPUT: usize = 16 * 1024;
const COMMAND_READ_CHUNK: usize = 1024;
const DATA_READ_CHUNK: usize = 16 * 1024;
/// A client streaming a large body faster than one block per read gets
/// larger reads, up to this: fewer system calls and wake-ups per megabyte,
/// and only sessions that actually stream pay for the memory.
const MAX_DATA_READ_CHUNK: usize = 128 * 1024;
/// How long a session waiting for input keeps its buffers before it gives
/// them back (see `read_more`).
const KEEP_BUFFERS: Duration = Duration::from_secs(1);

/// What outlives a STARTTLS: the identity of the session and its counters.
/// Everything learned from the client before TLS lives in [`Session`] and
/// is dropped with it.
pub struct Conversation {
    pub id: String,
    pub peer: SocketAddr,
    pub listener: Arc<ListenerInfo>,
    pub shared: Arc<Shared>,
    pub tls: Option<TlsInfo>,
    pub started: Instant,
    pub errors: u32,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub helo: Option<String>,
    /// Who authenticated (kept for the summary even after STARTTLS, which
    /// cannot happen after AUTH anyway: AUTH is refused until TLS, or TLS
    /// is refused once authenticated).
    pub auth: Option<String>,
    pub transactions: TransactionNotes,
    /// Why the session ended, for the summary line.
    pub end: &'static str,
}

impl Conversation {
    pub fn new(
        id: String,
        peer: SocketAddr,
        listener: Arc<ListenerInfo>,
        shared: Arc<Shared>,
    ) -> Self {
        Conversation {
            id,
            peer,
            listener,
            shared,
            tls: None,
            started: Instant::now(),
            errors: 0,
            bytes_in: 0,
            bytes_out: 0,
            helo: None,
            auth: None,
            transactions: TransactionNotes::default(),
            end: "closed",
        }
    }

    /// The one summary line per session.
    pub fn log_summary(&self) {
        let tls = self
            .tls
            .as_ref()
            .map(|t| format!("{} {}", t.version, t.cipher))
            .unwrap_or_else(|| "none".into());
        tracing::info!(
            session = %self.id,
            client = %self.peer,
            listener = %self.listener.name,
            tls = %tls,
            helo = self.helo.as_deref().unwrap_or("-"),
            auth = self.auth.as_deref().unwrap_or("none"),
            transactions = %self.transactions,
            bytes_in = self.bytes_in,
            bytes_out = self.bytes_out,
            duration_ms = self.started.elapsed().as_millis() as u64,
            end = self.end,
            "session closed"
        );
    }
}

/// The per-transaction notes of the session summary line. Bounded: a client
/// sending a million messages over one connection must not grow the
/// session's memory, so only the first few are kept and the rest counted.
/// Notes are not even formatted when the summary line is not logged.
#[derive(Debug, Default)]
pub struct TransactionNotes {
    kept: Vec<String>,
    omitted: u64,
}

impl TransactionNotes {
    const KEEP: usize = 16;

    pub fn push(&mut self, note: impl FnOnce() -> String) {
        if self.kept.len() < Self::KEEP && tracing::enabled!(tracing::Level::INFO) {
            self.kept.push(note());
        } else {
            self.omitted += 1;
        }
    }
}

impl std::fmt::Display for TransactionNotes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.kept.join(" | "))?;
        if self.omitted > 0 {
            write!(f, " | and {} more", self.omitted)?;
        }
        Ok(())
    }
}

/// How a session run ended.
pub enum Outcome<S> {
    Closed(Conversation),
    /// The client asked for TLS and nothing was pipelined after it: the
    /// caller performs the handshake and starts a fresh [`Session`].
    StartTls(S, Conversation),
}

/// An accepted MAIL FROM and what followed.
struct Transaction {
    from: ReversePath,
    params: MailParams,
    /// Fixed at MAIL: a policy reload never changes a transaction midway.
    policy: Arc<Policy>,
    /// The smallest message size limit of the rules that accepted a
    /// recipient (the global limit when none set one).
    size_limit: u64,
    /// Rules whose `messages` rate already counted this message.
    charged: std::collections::BTreeSet<String>,
    /// A recipient's decision asked for the header `From:` to be held to
    /// the sender binding too.
    check_header_from: bool,
    rcpt_attempts: usize,
    accepted: Vec<Path>,
    backend: Option<Connection>,
    /// The backend refused MAIL: every later RCPT gets this reply.
    mail_refused: Option<Reply>,
    refused: usize,
    /// Filled as the transaction goes; recorded when it is decided. None
    /// with `audit.sink: none` (nothing is built that nobody reads).
    audit: Option<AuditRecord>,
}

impl Transaction {
    /// A transaction that ends without DATA (RSET, EHLO, QUIT, STARTTLS,
    /// disconnect): recorded if any recipient was decided.
    fn audit_unfinished(self, shared: &Shared) {
        if self.rcpt_attempts == 0 {
            return;
        }
        let decision = if self.accepted.is_empty() && self.refused > 0 {
            AuditDecision::RelayDenied
        } else {
            AuditDecision::Abandoned
        };
        if let Some(audit) = self.audit {
            shared.audit.record(audit.decision(decision));
        }
    }

    fn sender(&self) -> &str {
        match &self.from {
            ReversePath::Null => "",
            ReversePath::Path(p) => &p.raw,
        }
    }
}

enum State {
    /// Connected; no EHLO/HELO yet (or discarded by STARTTLS).
    Fresh,
    /// Greeted, no transaction.
    Ready,
    Transaction(Box<Transaction>),
}

/// What a read is for, which sets its size and its timeout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reading {
    /// A command line: the whole line within `command_timeout`.
    Command,
    /// Message data, at most this many bytes: each block within
    /// `data_timeout` (RFC 5321 §4.5.3.2).
    Data(usize),
}

/// What the command loop does after a command.
enum Flow {
    Continue,
    Close,
    StartTls,
    Data,
}

pub struct Session<S> {
    io: S,
    conv: Conversation,
    rbuf: BytesMut,
    wbuf: Vec<u8>,
    lines: LineReader,
    state: State,
    esmtp: bool,
    junk: u32,
    /// Bytes of a refused BDAT chunk still to be thrown away.
    discard: u64,
    /// When the command line being received must be complete: set when
    /// its first byte is awaited, so a client dribbling a byte at a time
    /// cannot hold the session beyond `command_timeout`.
    line_deadline: Option<tokio::time::Instant>,
    /// Backend connection kept between this client's transactions.
    idle_backend: Option<Connection>,
    /// An AUTH exchange waiting for the client's next line.
    exchange: Option<Box<Exchange>>,
    principal: Option<Box<Principal>>,
}

/// A client connection the session can run over.
///
/// `wait_readable` lets an idle session wait for input without holding a
/// read buffer: with ten thousand idle clients, that buffer is most of the
/// memory a connection costs.
pub trait Transport: AsyncRead + AsyncWrite + Unpin + Send {
    fn wait_readable(&self) -> impl std::future::Future<Output = std::io::Result<()>> + Send {
        std::future::ready(Ok(()))
    }
}

impl Transport for tokio::net::TcpStream {
    fn wait_readable(&self) -> impl std::future::Future<Output = std::io::Result<()>> + Send {
        self.readable()
    }
}

/// TLS keeps its own record buffers; reading straight away costs nothing more.
impl<S: AsyncRead + AsyncWrite + Unpin + Send> Transport for tokio_rustls::server::TlsStream<S> {}

impl Transport for tokio::io::DuplexStream {}

impl<S: Transport> Session<S> {
    pub fn new(io: S, conv: Conversation) -> Self {
        Session {
            io,
            conv,
            rbuf: BytesMut::new(),
            wbuf: Vec::new(),
            lines: LineReader::new(MAX_AUTH_LINE),
            state: State::Fresh,
            esmtp: false,
            junk: 0,
            discard: 0,
            line_deadline: None,
            idle_backend: None,
            exchange: None,
            principal: None,
        }
    }

    fn shared(&self) -> &Shared {
        &self.conv.shared
    }

    fn reply(&mut self, r: Reply) {
        r.write_to(&mut self.wbuf);
    }

    async fn flush(&mut self) -> std::io::Result<()> {
        if self.wbuf.is_empty() {
            return Ok(());
        }
        self.conv.bytes_out += self.wbuf.len() as u64;
        let res = self.io.write_all(&self.wbuf).await;
        self.wbuf.clear();
        res?;
        self.io.flush().await
    }

    /// Sends the greeting, then runs the command loop.
    /// Not an `async fn`: the greeting is queued here and goes out with the
    /// first flush in `run`, so no outer future holds a second copy of the
    /// session.
    pub fn greet_and_run(mut self) -> impl std::future::Future<Output = Outcome<S>> {
        let host = self.shared().config.hostname.clone();
        self.reply(replies::greeting(&host));
        self.run()
    }

    fn close(mut self, why: &'static str) -> Outcome<S> {
        self.conv.end = why;
        self.release_backend();
        Outcome::Closed(self.conv)
    }

    fn release_backend(&mut self) {
        let tx_backend = match std::mem::replace(&mut self.state, State::Fresh) {
            State::Transaction(mut tx) => {
                let conn = tx.backend.take();
                tx.audit_unfinished(&self.conv.shared);
                conn
            }
            _ => None,
        };
        for conn in [tx_backend, self.idle_backend.take()].into_iter().flatten() {
            self.conv.shared.backend.release(conn);
        }
    }

    fn in_transaction(&self) -> bool {
        matches!(self.state, State::Transaction(_))
    }

    /// The command loop: take every complete line in the buffer, answer it,
    /// flush the answers when the buffer runs dry (RFC 2920), read more.
    pub async fn run(mut self) -> Outcome<S> {
        loop {
            if self.discard > 0 {
                let n = self.discard.min(self.rbuf.len() as u64) as usize;
                self.rbuf.advance(n);
                self.discard -= n as u64;
            }
            while self.discard == 0 {
                let Some(line) = self.lines.next_line(&mut self.rbuf) else {
                    break;
                };
                self.line_deadline = None;
                let flow = match line {
                    // The large command futures (RCPT with its backend
                    // connect, AUTH, the SASL steps) are boxed where they
                    // are awaited, so an idle session does not carry their
                    // space, and the common commands allocate nothing.
                    Ok(line) if self.exchange.is_some() => Box::pin(self.sasl_line(&line)).await,
                    Ok(line) => self.command(&line).await,
                    Err(e) => {
                        self.exchange = None;
                        self.line_error(e)
                    }
                };
                match flow {
                    Flow::Continue => {}
                    Flow::Close => {
                        let _ = self.flush().await;
                        return self.close("quit_or_refused");
                    }
                    Flow::StartTls => {
                        if !self.rbuf.is_empty() {
                            // CVE-2011-0411 class: plaintext injected after
                            // STARTTLS would be run as if it came over TLS.
                            self.reply(replies::pipelined_after_starttls());
                            let _ = self.flush().await;
                            return self.close("starttls_injection");
                        }
                        self.reply(replies::ready_for_tls());
                        if self.flush().await.is_err() {
                            return self.close("client_gone");
                        }
                        self.release_backend();
                        return Outcome::StartTls(self.io, self.conv);
                    }
                    Flow::Data => {
                        if self.flush().await.is_err() {
                            return self.close("client_gone");
                        }
                        if let Err(why) = Box::pin(self.receive_data()).await {
                            return self.close(why);
                        }
                    }
                }
                if self.wbuf.len() >= MAX_PENDING_OUTPUT && self.flush().await.is_err() {
                    return self.close("client_gone");
                }
            }
            if self.flush().await.is_err() {
                return self.close("client_gone");
            }
            if !self.in_transaction() && self.shared().shutdown.is_cancelled() {
                let host = self.shared().config.hostname.clone();
                self.reply(replies::shutting_down(&host));
                let _ = self.flush().await;
                return self.close("shutdown");
            }
            match self.read_more(Reading::Command).await {
                Ok(()) => {}
                Err(why) => {
                    if why == "timeout" {
                        let host = self.shared().config.hostname.clone();
                        self.reply(replies::timeout(&host));
                        let _ = self.flush().await;
                    } else if why == "shutdown" {
                        let host = self.shared().config.hostname.clone();
                        self.reply(replies::shutting_down(&host));
                        let _ = self.flush().await;
                    }
                    return self.close(why);
                }
            }
        }
    }

    /// Reads more client input. While idle (no transaction) a shutdown
    /// interrupts the wait so the client can be told 421 at once.
    async fn read_more(&mut self, reading: Reading) -> Result<(), &'static str> {
        let (chunk, timeout) = match reading {
            Reading::Command => (
                COMMAND_READ_CHUNK,
                self.shared().config.limits.command_timeout,
            ),
            Reading::Data(chunk) => (chunk, self.shared().config.limits.data_timeout),
        };
        let idle = !self.in_transaction() && reading == Reading::Command;
        // Borrowed, not cloned: a token's clone and drop take its lock.
        let shutdown = &self.conv.shared.shutdown;
        // Message data: each block within `data_timeout` (RFC 5321
        // §4.5.3.2). Commands: the whole line within `command_timeout`.
        let now = tokio::time::Instant::now();
        let deadline = if let Reading::Data(_) = reading {
            now + timeout
        } else {
            if self.rbuf.is_empty() && !self.lines.is_discarding() {
                self.line_deadline = None;
            }
            *self.line_deadline.get_or_insert(now + timeout)
        };
        if self.rbuf.is_empty() {
            // A busy client's next command follows our reply within
            // moments, so the buffers are kept for a short while; a session
            // that stays quiet longer gives them back (they are allocated
            // again when input arrives), so idle sessions hold none.
            let io = &self.io;
            let readable = io.wait_readable();
            tokio::pin!(readable);
            let keep_until = (now + KEEP_BUFFERS).min(deadline);
            let sleep = tokio::time::sleep_until(keep_until);
            tokio::pin!(sleep);
            let mut released = false;
            loop {
                tokio::select! {
                    r = &mut readable => match r {
                        Ok(()) => break,
                        Err(_) => return Err("client_gone"),
                    },
                    _ = &mut sleep => {
                        if released || keep_until >= deadline {
                            return Err("timeout");
                        }
                        self.rbuf = BytesMut::new();
                        self.wbuf = Vec::new();
                        if let Some(conn) = self.idle_backend.as_mut() {
                            conn.free_buffer();
                        }
                        released = true;
                        sleep.as_mut().reset(deadline);
                    }
                    _ = shutdown.cancelled(), if idle => return Err("shutdown"),
                }
            }
        }
        self.rbuf.reserve(chunk);
        let read = tokio::time::timeout_at(deadline, self.io.read_buf(&mut self.rbuf));
        let n = tokio::select! {
            r = read => match r {
                Err(_) => return Err("timeout"),
                Ok(Err(_)) => return Err("client_gone"),
                Ok(Ok(0)) => return Err("client_gone"),
                Ok(Ok(n)) => n,
            },
            _ = shutdown.cancelled(), if idle => return Err("shutdown"),
        };
        self.conv.bytes_in += n as u64;
        Ok(())
    }

    /// Counts a protocol error; too many end the session.
    fn error(&mut self, r: Reply) -> Flow {
        self.conv.errors += 1;
        if self.conv.errors >= self.shared().config.limits.max_errors {
            self.reply(replies::too_many_errors());
            return Flow::Close;
        }
        self.reply(r);
        Flow::Continue
    }

    fn line_error(&mut self, e: LineError) -> Flow {
        let r = match e {
            LineError::TooLong => replies::line_too_long(),
            LineError::BareLf => replies::bare_lf(),
            LineError::Nul => replies::nul_in_command(),
        };
        self.error(r)
    }

    /// Counts a command that does not advance a transaction.
    fn junk(&mut self) -> bool {
        self.junk += 1;
        if self.junk > self.shared().config.limits.max_junk_commands {
            self.reply(replies::too_many_junk());
            return false;
        }
        true
    }

    async fn command(&mut self, line: &[u8]) -> Flow {
        let is_auth = line.len() >= 5 && line[..5].eq_ignore_ascii_case(b"AUTH ");
        if !is_auth && line.len() + 2 > self.shared().config.limits.max_command_length {
            return self.error(replies::line_too_long());
        }
        let cmd = match command::parse(line) {
            Ok(cmd) => cmd,
            Err(e) => {
                let in_mail = line.len() >= 4 && line[..4].eq_ignore_ascii_case(b"MAIL");
                return self.error(replies::command_error(&e, in_mail));
            }
        };
        if !self.in_transaction() && self.shared().shutdown.is_cancelled() && cmd != Command::Quit {
            let host = self.shared().config.hostname.clone();
            self.reply(replies::shutting_down(&host));
            return Flow::Close;
        }
        match cmd {
            Command::Ehlo(name) => self.hello(name, true).await,
            Command::Helo(name) => self.hello(name, false).await,
            Command::Mail { from, params } => {
                let from = match from {
                    ReversePath::Path(p) => ReversePath::Path(without_source_route(p)),
                    null => null,
                };
                self.mail(from, params)
            }
            Command::Rcpt { to } => Box::pin(self.rcpt(without_source_route(to))).await,
            Command::Data => self.data().await,
            Command::Bdat { size, .. } => {
                // RFC 3030 §4: a refused chunk is still consumed, so its
                // bytes are never read as commands.
                if size > self.shared().config.limits.max_message_size {
                    self.reply(replies::bdat_refused());
                    return Flow::Close;
                }
                self.discard = size;
                self.error(replies::bdat_refused())
            }
            Command::Rset => {
                if !self.junk() {
                    return Flow::Close;
                }
                self.end_transaction();
                self.reply(replies::ok());
                Flow::Continue
            }
            Command::Noop => {
                if !self.junk() {
                    return Flow::Close;
                }
                self.reply(replies::ok());
                Flow::Continue
            }
            Command::Quit => {
                let host = self.shared().config.hostname.clone();
                self.reply(replies::bye(&host));
                Flow::Close
            }
            Command::Help(_) => {
                if !self.junk() {
                    return Flow::Close;
                }
                self.reply(replies::help());
                Flow::Continue
            }
            Command::Vrfy(_) | Command::Expn(_) => {
                if !self.junk() {
                    return Flow::Close;
                }
                let r = match self.shared().config.smtp.vrfy {
                    VrfyReply::CannotVerify => replies::vrfy_cannot(),
                    VrfyReply::NotImplemented => replies::not_implemented(),
                };
                self.reply(r);
                Flow::Continue
            }
            Command::StartTls => {
                if self.conv.tls.is_some() {
                    self.error(replies::tls_already())
                } else if self.principal.is_some() {
                    // A plaintext AUTH cannot be carried into TLS: RFC 3207
                    // would discard it anyway, so refuse rather than surprise.
                    self.error(replies::starttls_after_auth())
                } else if !self.starttls_offered() {
                    self.error(replies::tls_unavailable())
                } else if self.in_transaction() {
                    self.error(replies::in_transaction())
                } else {
                    Flow::StartTls
                }
            }
            Command::Auth {
                mechanism,
                initial_response,
            } => Box::pin(self.auth(&mechanism, initial_response.as_deref())).await,
        }
    }

    /// Mechanisms offered now: none before TLS when the listener requires
    /// it, and never the password-sending ones without TLS.
    fn offered_mechanisms(&self) -> Vec<Mechanism> {
        let Some(auth) = &self.conv.shared.auth else {
            return Vec::new();
        };
        let tls = self.conv.tls.is_some();
        if !tls && self.conv.listener.require_tls_for_auth {
            return Vec::new();
        }
        auth.mechanisms()
            .iter()
            .copied()
            .filter(|m| tls || !m.sends_password())
            .collect()
    }

    /// The tls-server-end-point channel binding of this session (RFC 5929),
    /// of the certificate this session was shown (recorded at handshake).
    fn channel_binding(&self) -> Option<Vec<u8>> {
        self.conv.tls.as_ref()?.end_point.clone()
    }

    async fn auth(&mut self, mechanism: &str, initial: Option<&str>) -> Flow {
        let Some(auth) = self.conv.shared.auth.clone() else {
            return self.error(replies::not_implemented());
        };
        if self.principal.is_some() {
            return self.error(replies::already_authenticated());
        }
        if self.in_transaction() {
            return self.error(replies::in_transaction());
        }
        if matches!(self.state, State::Fresh) {
            return self.error(replies::need_helo());
        }
        let tls = self.conv.tls.is_some();
        if !tls && self.conv.listener.require_tls_for_auth {
            // Point to STARTTLS only where it exists.
            let r = if self.starttls_offered() {
                replies::starttls_first()
            } else {
                replies::auth_needs_tls_listener()
            };
            return self.error(r);
        }
        let Some(mech) = auth
            .mechanisms()
            .iter()
            .copied()
            .find(|m| m.name().eq_ignore_ascii_case(mechanism))
        else {
            return self.error(replies::unknown_mechanism());
        };
        if mech.sends_password() && !tls {
            return self.error(replies::encryption_required());
        }
        if auth.client_locked(self.conv.peer.ip()) {
            tracing::warn!(session = %self.conv.id, client = %self.conv.peer, "AUTH refused: client address locked out");
            self.conv
                .shared
                .metrics
                .auth_failed(mech, &AuthFailure::ClientLockedOut);
            auth.failed(self.conv.peer.ip(), None).await;
            self.reply(replies::auth_locked_out());
            return Flow::Continue;
        }
        let cb = self.channel_binding();
        let progress = sasl::start(&auth, mech, initial, self.conv.peer.ip(), cb.as_deref()).await;
        self.auth_progress(progress, mech).await
    }

    async fn sasl_line(&mut self, line: &[u8]) -> Flow {
        let Some(exchange) = self.exchange.take() else {
            return Flow::Continue;
        };
        let mech = exchange.mechanism();
        if line == b"*" {
            self.reply(replies::auth_cancelled());
            return Flow::Continue;
        }
        let Some(auth) = self.conv.shared.auth.clone() else {
            return Flow::Continue;
        };
        let Ok(text) = std::str::from_utf8(line) else {
            return self
                .auth_progress(
                    Progress::Finished(Err((AuthFailure::Malformed("not base64"), None))),
                    mech,
                )
                .await;
        };
        let cb = self.channel_binding();
        let progress = sasl::step(&auth, *exchange, text, self.conv.peer.ip(), cb.as_deref()).await;
        self.auth_progress(progress, mech).await
    }

    async fn auth_progress(&mut self, progress: Progress, mech: Mechanism) -> Flow {
        match progress {
            Progress::Continue(exchange, text) => {
                self.exchange = Some(Box::new(exchange));
                self.reply(Reply::multi(334, None, vec![text]));
                Flow::Continue
            }
            Progress::Finished(Ok(principal)) => {
                tracing::info!(
                    session = %self.conv.id,
                    client = %self.conv.peer,
                    user = %principal.display(),
                    mechanism = mech.name(),
                    ntlm = principal.detail.unwrap_or("-"),
                    "authenticated"
                );
                self.conv.shared.metrics.auth_succeeded(mech);
                self.conv.auth = Some(format!("{} ({})", principal.display(), mech.name()));
                self.principal = Some(Box::new(principal));
                self.reply(replies::auth_ok());
                Flow::Continue
            }
            Progress::Finished(Err((failure, claimed))) => {
                let who = claimed
                    .as_ref()
                    .map(|(d, u)| format!("{d}\\{u}"))
                    .unwrap_or_else(|| "-".into());
                tracing::warn!(
                    session = %self.conv.id,
                    client = %self.conv.peer,
                    user = %who,
                    mechanism = mech.name(),
                    reason = failure.label(),
                    "authentication failed"
                );
                self.conv.shared.metrics.auth_failed(mech, &failure);
                if let AuthFailure::Malformed(_) = failure {
                    return self.error(replies::auth_malformed());
                }
                if let AuthFailure::Temporary(_) = failure {
                    self.reply(replies::auth_temporary());
                    return Flow::Continue;
                }
                if let AuthFailure::ClientLockedOut = failure {
                    if let Some(auth) = self.conv.shared.auth.clone() {
                        auth.failed(self.conv.peer.ip(), None).await;
                    }
                    self.reply(replies::auth_locked_out());
                    return Flow::Continue;
                }
                if let Some(auth) = self.conv.shared.auth.clone() {
                    let account = claimed.as_ref().map(|(d, u)| (d.as_str(), u.as_str()));
                    auth.failed(self.conv.peer.ip(), account).await;
                }
                self.error(replies::auth_failed())
            }
        }
    }

    fn starttls_offered(&self) -> bool {
        self.conv.listener.mode == TlsMode::Starttls
            && self.conv.listener.acceptor.is_some()
            && self.conv.tls.is_none()
            && self.principal.is_none()
    }

    /// Ends the current transaction (RSET, EHLO). The backend connection is
    /// kept for the next one; its next transaction starts with RSET.
    fn end_transaction(&mut self) {
        if let State::Transaction(mut tx) = std::mem::replace(&mut self.state, State::Ready) {
            if let Some(conn) = tx.backend.take() {
                self.idle_backend = Some(conn);
            }
            tx.audit_unfinished(&self.conv.shared);
        }
    }

    async fn hello(&mut self, name: String, esmtp: bool) -> Flow {
        if matches!(self.state, State::Fresh) {
            self.state = State::Ready;
        } else {
            if !self.junk() {
                return Flow::Close;
            }
            self.end_transaction();
        }
        self.esmtp = esmtp;
        self.conv.helo = Some(name.chars().take(255).collect());
        let host = self.shared().config.hostname.clone();
        let client = self.conv.peer.ip().to_string();
        if !esmtp {
            self.reply(replies::helo_ok(&host, &client));
            return Flow::Continue;
        }
        let mut lines = vec![
            format!("{host} Hello {client}"),
            "PIPELINING".to_string(),
            format!("SIZE {}", self.shared().config.limits.max_message_size),
            "8BITMIME".to_string(),
            "ENHANCEDSTATUSCODES".to_string(),
        ];
        if self.starttls_offered() {
            lines.push("STARTTLS".to_string());
        }
        let mechanisms = self.offered_mechanisms();
        if !mechanisms.is_empty() && self.principal.is_none() {
            let names: Vec<&str> = mechanisms.iter().map(|m| m.name()).collect();
            lines.push(format!("AUTH {}", names.join(" ")));
        }
        self.reply(Reply::multi(250, None, lines));
        Flow::Continue
    }

    /// What the policy knows about this client.
    fn policy_context(&self) -> Context<'_> {
        Context {
            principal: self.principal.as_deref().map(|p| &p.relay),
            client_ip: self.conv.peer.ip(),
            listener: &self.conv.listener.name,
            tls: self.conv.tls.is_some(),
            declared_size: match &self.state {
                State::Transaction(tx) => tx.params.size,
                _ => None,
            },
        }
    }

    /// Logs and counts a policy refusal.
    fn policy_refusal(
        &mut self,
        stage: &'static str,
        rule: Option<&str>,
        reason: &'static str,
        from: &str,
        to: &str,
    ) {
        tracing::info!(
            session = %self.conv.id,
            client = %self.conv.peer,
            listener = %self.conv.listener.name,
            user = self.principal.as_ref().map(|p| p.display()).unwrap_or_else(|| "-".into()),
            from = %from,
            to = %to,
            stage,
            rule = rule.unwrap_or("-"),
            reason,
            "policy refused"
        );
        self.conv.shared.metrics.relay_decision(rule, reason);
    }

    fn mail(&mut self, from: ReversePath, params: MailParams) -> Flow {
        match self.state {
            State::Fresh => return self.error(replies::need_helo()),
            State::Transaction(_) => return self.error(replies::nested_mail()),
            State::Ready => {}
        }
        let max = self.shared().config.limits.max_message_size;
        if params.size.is_some_and(|s| s > max) {
            self.reply(replies::size_exceeded(max));
            return Flow::Continue;
        }
        let policy = self.shared().policy.load_full();
        let raw = match &from {
            ReversePath::Null => String::new(),
            ReversePath::Path(p) => p.raw.clone(),
        };
        let decision = policy.check_sender(
            &self.policy_context(),
            &raw,
            SystemTime::now(),
            &self.conv.shared.rates,
        );
        match &decision {
            SenderDecision::Accept => {}
            SenderDecision::Deny(Refusal { rule, reason, .. }) => {
                self.policy_refusal("mail", rule.as_deref(), reason, &raw, "-");
                let (code, e, text) = decision.reply();
                self.reply(Reply::new(code, E(e.0, e.1, e.2), text));
                return Flow::Continue;
            }
            SenderDecision::RateLimited { rule, .. } => {
                self.policy_refusal("mail", rule.as_deref(), "rate_limited", &raw, "-");
                self.conv
                    .shared
                    .metrics
                    .rate_limited("mail", rule.as_deref());
                let (code, e, text) = decision.reply();
                self.reply(Reply::new(code, E(e.0, e.1, e.2), text));
                return Flow::Continue;
            }
        }
        self.junk = 0;
        let audit = self.conv.shared.audit.enabled().then(|| {
            let audit =
                AuditRecord::transaction(&self.conv.id, self.conv.peer, &self.conv.listener.name)
                    .tls(self.conv.tls.as_ref())
                    .helo(self.conv.helo.as_deref())
                    .mail_from(&raw);
            match &self.principal {
                Some(p) => audit.principal(&p.display(), p.mechanism.name()),
                None => audit,
            }
        });
        self.state = State::Transaction(Box::new(Transaction {
            from,
            params,
            policy,
            size_limit: max,
            charged: Default::default(),
            check_header_from: false,
            rcpt_attempts: 0,
            accepted: Vec::new(),
            backend: None,
            mail_refused: None,
            refused: 0,
            audit,
        }));
        self.reply(replies::sender_ok());
        Flow::Continue
    }

    async fn rcpt(&mut self, to: Path) -> Flow {
        let max_rcpts = self.shared().config.limits.max_recipients;
        let (policy, from, accepted, mut charged) = match &mut self.state {
            State::Transaction(tx) => {
                if tx.rcpt_attempts >= max_rcpts {
                    self.reply(replies::too_many_recipients());
                    return Flow::Continue;
                }
                tx.rcpt_attempts += 1;
                (
                    tx.policy.clone(),
                    tx.sender().to_string(),
                    tx.accepted.len(),
                    std::mem::take(&mut tx.charged),
                )
            }
            State::Fresh => return self.error(replies::need_helo()),
            State::Ready => return self.error(replies::need_mail()),
        };
        let decision = policy.check_recipient_in_transaction(
            &self.policy_context(),
            &from,
            &to.raw,
            accepted,
            &mut charged,
            SystemTime::now(),
            &self.conv.shared.rates,
        );
        if let State::Transaction(tx) = &mut self.state {
            tx.charged = charged;
            if let Some(audit) = tx.audit.as_mut() {
                audit.add_recipient(&to.raw, decision.label(), decision.rule());
            }
        }
        let wants_header_check = matches!(
            decision,
            RcptDecision::AcceptLocal {
                check_header_from: true
            } | RcptDecision::AcceptRelay {
                check_header_from: true,
                ..
            }
        );
        let rule_limit = match &decision {
            RcptDecision::AcceptLocal { .. } => {
                self.conv.shared.metrics.relay_local();
                None
            }
            RcptDecision::AcceptRelay {
                rule,
                max_message_size,
                ..
            } => {
                tracing::debug!(session = %self.conv.id, to = %to.raw, rule = %rule, "relay allowed");
                self.conv
                    .shared
                    .metrics
                    .relay_decision(Some(rule), "allowed");
                *max_message_size
            }
            RcptDecision::Deny(Refusal { rule, reason, .. }) => {
                self.policy_refusal("rcpt", rule.as_deref(), reason, &from, &to.raw);
                if let State::Transaction(tx) = &mut self.state {
                    tx.refused += 1;
                }
                let (code, e, text) = decision.reply();
                self.reply(Reply::new(code, E(e.0, e.1, e.2), text));
                return Flow::Continue;
            }
            RcptDecision::RateLimited { rule, .. } => {
                self.policy_refusal("rcpt", rule.as_deref(), "rate_limited", &from, &to.raw);
                self.conv
                    .shared
                    .metrics
                    .rate_limited("rcpt", rule.as_deref());
                if let State::Transaction(tx) = &mut self.state {
                    tx.refused += 1;
                }
                let (code, e, text) = decision.reply();
                self.reply(Reply::new(code, E(e.0, e.1, e.2), text));
                return Flow::Continue;
            }
        };
        let State::Transaction(tx) = &mut self.state else {
            return Flow::Continue;
        };
        if let Some(limit) = rule_limit {
            tx.size_limit = tx.size_limit.min(limit);
        }
        tx.check_header_from |= wants_header_check;
        if let Some(refusal) = &tx.mail_refused {
            let r = replies::mirror(refusal, (1, 0));
            self.reply(r);
            return Flow::Continue;
        }
        let reply = match tx.backend.as_mut() {
            Some(conn) => conn.rcpt(&to.raw).await.map(Opened::Rcpt),
            None => {
                let idle = self.idle_backend.take();
                begin_backend(&self.conv.shared, idle, tx, &to.raw).await
            }
        };
        match reply {
            Ok(Opened::MailRefused(m)) => {
                tracing::warn!(session = %self.conv.id, reply = %m.text(), "backend refused MAIL FROM");
                let r = replies::mirror(&m, (1, 0));
                tx.mail_refused = Some(m);
                self.reply(r);
            }
            Ok(Opened::Rcpt(rcpt_reply)) => {
                if rcpt_reply.is_positive() {
                    tx.accepted.push(to);
                }
                let r = replies::mirror(&rcpt_reply, (1, 5));
                self.reply(r);
            }
            Err(e) => {
                tracing::warn!(session = %self.conv.id, error = %e, "backend unavailable for RCPT");
                // The connection (if any) is in an unknown state: drop it.
                tx.backend = None;
                self.reply(replies::backend_unavailable());
            }
        }
        Flow::Continue
    }

    async fn data(&mut self) -> Flow {
        let State::Transaction(tx) = &mut self.state else {
            let r = if matches!(self.state, State::Fresh) {
                replies::need_helo()
            } else {
                replies::need_mail()
            };
            return self.error(r);
        };
        if tx.rcpt_attempts == 0 {
            return self.error(replies::need_rcpt());
        }
        let Some(conn) = tx.backend.as_mut().filter(|_| !tx.accepted.is_empty()) else {
            self.reply(replies::no_valid_recipients());
            return Flow::Continue;
        };
        // The backend's answer to DATA is read when the body is about to go
        // out (see `receive_data`): the client hears 354 one round trip
        // sooner, and a refusal is still reported, after the final dot.
        match conn.data_start().await {
            Ok(()) => {
                self.reply(replies::start_data());
                Flow::Data
            }
            Err(e) => {
                tracing::warn!(session = %self.conv.id, error = %e, "backend failed at DATA");
                tx.backend = None;
                self.reply(replies::backend_unavailable());
                Flow::Continue
            }
        }
    }

    /// Counts and audits a transaction decided at the end of DATA.
    fn audit_final(
        &self,
        tx: &mut Transaction,
        size: u64,
        violation: Option<crate::smtp::data::DataViolation>,
        reply: &Reply,
        outcome: &str,
    ) {
        let metrics = &self.conv.shared.metrics;
        let decision = if let Some(v) = violation {
            metrics.message_refused(v);
            AuditDecision::Refused
        } else if reply.is_positive() {
            metrics.message_forwarded(size, tx.accepted.len());
            AuditDecision::Delivered
        } else if reply.is_transient() {
            AuditDecision::Deferred
        } else {
            AuditDecision::Rejected
        };
        let Some(record) = tx.audit.take() else {
            return;
        };
        let mut record = record.size(size).decision(decision);
        if let Some(v) = violation {
            record = record.reason(crate::metrics::violation_label(v));
        }
        if let Some(backend) = outcome.strip_prefix("backend=") {
            record.backend_reply = Some(backend.to_string());
        } else {
            record = record.reason(outcome);
        }
        self.conv.shared.audit.record(record);
    }

    /// Streams the message from the client to the backend as it arrives,
    /// then relays the backend's verdict. Returns Err when the client is
    /// gone (the backend transaction is then aborted by closing it without
    /// the final dot, so nothing half-received is ever delivered).
    async fn receive_data(&mut self) -> Result<(), &'static str> {
        let limits = self.conv.shared.config.limits.clone();
        let State::Transaction(mut tx) = std::mem::replace(&mut self.state, State::Ready) else {
            return Ok(());
        };
        let Some(mut conn) = tx.backend.take() else {
            return Ok(());
        };
        let started = Instant::now();
        let mut receiver = DataReceiver::new(limits.max_line_length, tx.size_limit);
        let authenticated = self.principal.as_ref().map(|p| p.display());
        let header = received::Trace {
            helo: self.conv.helo.as_deref().unwrap_or("unknown"),
            client: self.conv.peer.ip(),
            tls: self.conv.tls.as_ref(),
            authenticated: authenticated.as_deref(),
            esmtp: self.esmtp,
            host: &self.conv.shared.config.hostname,
            session_id: &self.conv.id,
            date: chrono::Local::now().fixed_offset(),
        }
        .header();
        // The trace header goes out with the first piece of the body, and
        // the last piece with the final dot: a small message costs the
        // backend connection one write.
        let mut backend_error: Option<BackendError> = None;
        // DATA was sent without waiting (see `data`): its reply is read
        // before the first write of the body (`go_ahead`).
        let mut chunk = DATA_READ_CHUNK;
        let mut data_refused: Option<Reply> = None;
        let mut out = conn.take_buffer();
        out.reserve(DATA_READ_CHUNK + header.len());
        out.extend_from_slice(header.as_bytes());
        drop(header);
        let mut header_from = tx
            .check_header_from
            .then(crate::smtp::header_from::HeaderFromScanner::new);
        // The last read's piece of the message: how much of the read buffer
        // it took, and the run of it relayed from there (not copied).
        let (consumed, passed) = loop {
            let before = out.len();
            // Room for all that was read and the final dot: the wire form
            // is at most the input and a dot held back from the previous
            // read, so neither the receiver nor `finish` grows (copies)
            // the buffer.
            out.reserve(self.rbuf.len() + 8);
            let (consumed, status, passed) = receiver.ingest_relay(&self.rbuf, &mut out);
            if let Some(scan) = header_from.as_mut() {
                // What this read added: a run is always passed after `before`.
                let [head, run, tail] = wire(&out, passed.as_ref(), &self.rbuf).slices();
                for piece in [&head[before..], run, tail] {
                    scan.push(piece);
                }
            }
            if status == DataStatus::Complete {
                break (consumed, passed);
            }
            // Nothing new (the body has not arrived yet): what is pending,
            // the trace header, waits for the first piece of the body.
            let fresh = out.len() > before || passed.is_some();
            // After a violation nothing is sent (the message is refused and
            // the backend's transaction dropped without the dot); after a
            // backend failure or refusal the client is read on, unanswered.
            let violated = receiver.violation().is_some();
            if fresh && !violated && backend_error.is_none() && data_refused.is_none() {
                if conn.awaiting_data_reply() {
                    go_ahead(&mut conn, &mut data_refused, &mut backend_error).await;
                }
                if backend_error.is_none() && data_refused.is_none() {
                    let piece = wire(&out, passed.as_ref(), &self.rbuf);
                    backend_error = conn.body(piece).await.err();
                }
            }
            self.rbuf.advance(consumed);
            if fresh || violated {
                out.clear();
            }
            let read_before = self.conv.bytes_in;
            if let Err(why) = self.read_more(Reading::Data(chunk)).await {
                // Dropping `conn` here closes the backend connection without
                // the terminating dot: the backend discards the partial message.
                tracing::warn!(session = %self.conv.id, reason = why, "client lost during DATA; backend transaction aborted");
                self.conv.transactions.push(|| {
                    format!(
                        "from=<{}> rcpts={} aborted=client_{}",
                        tx.sender(),
                        tx.accepted.len(),
                        why
                    )
                });
                if let Some(record) = tx.audit.take() {
                    let record = record
                        .decision(AuditDecision::Aborted)
                        .size(receiver.size())
                        .reason(&format!("client_{why}"));
                    self.conv.shared.audit.record(record);
                }
                return Err(why);
            }
            if self.conv.bytes_in - read_before >= chunk as u64 {
                // The read filled its block: the client streams faster than
                // one block per read.
                chunk = (chunk * 2).min(MAX_DATA_READ_CHUNK);
            }
        };
        let size = receiver.size();
        let spoofed = header_from.as_ref().and_then(|scan| {
            let ctx = self.policy_context();
            scan.addresses().into_iter().find_map(|addr| {
                match tx.policy.sender_allowed(&ctx, &addr) {
                    SenderDecision::Accept => None,
                    denied => Some((addr, denied)),
                }
            })
        });
        let clean = spoofed.is_none() && receiver.violation().is_none();
        if conn.awaiting_data_reply() && clean && backend_error.is_none() {
            go_ahead(&mut conn, &mut data_refused, &mut backend_error).await;
        }
        let (reply, outcome) = if let Some((addr, denied)) = spoofed {
            // The body went to the backend already; closing without the
            // final dot makes it throw the message away.
            drop(conn);
            self.policy_refusal("data", None, "header_from_mismatch", tx.sender(), &addr);
            let (code, e, _) = denied.reply();
            let who = self
                .principal
                .as_ref()
                .map(|p| p.display())
                .unwrap_or_default();
            (
                Reply::new(
                    code,
                    E(e.0, e.1, e.2),
                    format!("Header From: <{addr}> is not an address of {who}; message refused"),
                ),
                "refused=header_from".to_string(),
            )
        } else if let Some(v) = receiver.violation() {
            drop(conn);
            (
                replies::data_violation(v, tx.size_limit, limits.max_line_length),
                format!("refused={v:?}"),
            )
        } else if let Some(e) = backend_error {
            tracing::warn!(session = %self.conv.id, error = %e, "backend failed during DATA; message not delivered");
            drop(conn);
            (
                replies::backend_failed_in_data(),
                format!("backend_error={}", e.stage().label()),
            )
        } else if let Some(r) = data_refused {
            // Refused before any of the body was sent: the connection is
            // still in step and is kept (the next transaction starts with
            // RSET).
            conn.return_buffer(std::mem::take(&mut out));
            self.idle_backend = Some(conn);
            (
                replies::mirror(&r, (0, 0)),
                format!("backend={} {}", r.code, r.text()),
            )
        } else {
            let passed = wire(&[], passed.as_ref(), &self.rbuf).passed;
            match conn.finish(&mut out, passed).await {
                Ok(r) => {
                    let outcome = format!("backend={} {}", r.code, r.text());
                    let mirrored = replies::mirror(&r, (0, 0));
                    conn.return_buffer(std::mem::take(&mut out));
                    self.idle_backend = Some(conn);
                    (mirrored, outcome)
                }
                Err(e) => {
                    // The dot may or may not have been taken: say 4xx. A
                    // retry can duplicate, which is better than a loss.
                    tracing::warn!(session = %self.conv.id, error = %e, "backend failed after the final dot");
                    (
                        replies::backend_failed_in_data(),
                        format!("backend_error={}", e.stage().label()),
                    )
                }
            }
        };
        self.audit_final(&mut tx, size, receiver.violation(), &reply, &outcome);
        let rcpts: Vec<&str> = tx.accepted.iter().map(|p| p.raw.as_str()).collect();
        tracing::info!(
            session = %self.conv.id,
            client = %self.conv.peer,
            from = %tx.sender(),
            to = %rcpts.join(","),
            size,
            reply = reply.code,
            outcome = %outcome,
            duration_ms = started.elapsed().as_millis() as u64,
            "message"
        );
        self.conv.transactions.push(|| {
            format!(
                "from=<{}> to=<{}> refused={} size={} {}",
                tx.sender(),
                rcpts.join(">,<"),
                tx.refused,
                size,
                outcome
            )
        });
        tx.backend = None;
        // Only now: the last piece may have been relayed from the buffer.
        self.rbuf.advance(consumed);
        self.reply(reply);
        Ok(())
    }
}

/// A piece of the message as the receiver left it: `out`, with the run
/// it passed on (if any) still in the read buffer `input`.
fn wire<'a>(out: &'a [u8], passed: Option<&Passed>, input: &'a [u8]) -> Wire<'a> {
    Wire {
        assembled: out,
        passed: passed.map(|p| (p.at, &input[p.range.clone()])),
    }
}

/// Reads the backend's answer to the DATA sent without waiting: a 354
/// lets the body go out; anything else is kept as the message's refusal,
/// a failure as its backend error.
async fn go_ahead(
    conn: &mut Connection,
    refused: &mut Option<Reply>,
    failed: &mut Option<BackendError>,
) {
    match conn.data_confirm().await {
        Ok(r) if r.code == 354 => {}
        Ok(r) => *refused = Some(r),
        Err(e) => *failed = Some(e),
    }
}

/// RFC 5321 §3.6.1 and appendix C: a source route (`<@a,@b:user@c>`) is
/// obsolete and must be ignored. The policy decides on the final mailbox,
/// and only that is forwarded, so a legacy backend that still honours
/// routes cannot be made to relay by one.
fn without_source_route(mut path: Path) -> Path {
    if !path.source_route.is_empty() {
        path.raw = path.mailbox.to_string();
        path.source_route.clear();
    }
    path
}

/// The backend's answer to a transaction's first recipient.
enum Opened {
    /// MAIL FROM was refused; the transaction cannot go on at the backend.
    MailRefused(Reply),
    Rcpt(Reply),
}

/// Opens the backend side of a transaction at its first accepted
/// recipient, so transactions that only collect refusals never reach the
/// backend. A reused connection that turns out dead is replaced once.
async fn begin_backend(
    shared: &Shared,
    idle: Option<Connection>,
    tx: &mut Transaction,
    rcpt: &str,
) -> Result<Opened, BackendError> {
    let args = MailArgs {
        path: match &tx.from {
            ReversePath::Null => "",
            ReversePath::Path(p) => &p.raw,
        },
        size: tx.params.size,
        eight_bit: tx.params.body == Some(Body::EightBitMime),
    };
    // Connecting (TCP, greeting, EHLO, maybe TLS) is a future of some 4 KB,
    // needed only when no warm connection is at hand: boxed, so that every
    // RCPT does not carry (and allocate) its space.
    let (mut conn, reused) = match idle {
        Some(c) => (c, true),
        None => match shared.backend.take_idle() {
            Some(c) => (c, true),
            None => (Box::pin(shared.backend.connect_any()).await?, false),
        },
    };
    let begun = match conn.begin(&args, rcpt).await {
        Ok(b) => b,
        Err(e) if reused => {
            tracing::debug!(error = %e, "reused backend connection failed; opening a new one");
            conn = Box::pin(shared.backend.connect_any()).await?;
            conn.begin(&args, rcpt).await?
        }
        Err(e) => return Err(e),
    };
    if !begun.mail.is_positive() {
        let _ = conn.reset().await;
        shared.backend.release(conn);
        return Ok(Opened::MailRefused(begun.mail));
    }
    let rcpt_reply = begun.rcpt.ok_or_else(|| {
        BackendError::Protocol(crate::backend::Stage::Rcpt, "no RCPT reply".into())
    })?;
    tx.backend = Some(conn);
    Ok(Opened::Rcpt(rcpt_reply))
}

#[cfg(test)]
mod tests {
    use super::TransactionNotes;

    #[test]
    fn transaction_notes_stay_bounded() {
        // Notes are only kept when the summary line is logged at all.
        let _log = tracing::subscriber::set_default(
            tracing_subscriber::fmt()
                .with_max_level(tracing::Level::INFO)
                .with_writer(std::io::sink)
                .finish(),
        );
        let mut notes = TransactionNotes::default();
        for i in 0..10_000 {
            notes.push(|| format!("m{i}"));
        }
        assert_eq!(notes.kept.len(), TransactionNotes::KEEP);
        assert_eq!(notes.omitted, 10_000 - TransactionNotes::KEEP as u64);
        let line = notes.to_string();
        assert!(line.starts_with("m0 | m1 | "), "{line}");
        assert!(line.ends_with(" | and 9984 more"), "{line}");
    }
}
