//! The SMTP client toward the backend MTA.
//!
//! RelayGuard speaks SMTP to the backend itself rather than piping bytes,
//! so the backend only ever sees transactions the policy approved, in a
//! dialect it announced: no PIPELINING, SIZE or 8BITMIME unless its EHLO
//! offered them, HELO for servers that refuse EHLO.
//!
//! Connections are kept warm in a small pool. A reused connection always
//! starts its next transaction with RSET (pipelined with MAIL when the
//! backend allows), so nothing of one client's transaction can leak into
//! another's.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use crate::config::{BackendAddr, BackendConfig, BackendTimeouts, BackendTls, PoolConfig};
use crate::metrics::{BackendResult, Metrics};
use crate::smtp::reply::{Capabilities, Reply, ReplyParser};

/// Which step of the backend conversation failed; used in logs and as a
/// bounded metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    Connect,
    Greeting,
    Ehlo,
    StartTls,
    Rset,
    Mail,
    Rcpt,
    Data,
    Body,
    DataDone,
}

impl Stage {
    /// Every stage, in declaration order (`Stage as usize` indexes it).
    pub const ALL: [Stage; 10] = [
        Stage::Connect,
        Stage::Greeting,
        Stage::Ehlo,
        Stage::StartTls,
        Stage::Rset,
        Stage::Mail,
        Stage::Rcpt,
        Stage::Data,
        Stage::Body,
        Stage::DataDone,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Stage::Connect => "connect",
            Stage::Greeting => "greeting",
            Stage::Ehlo => "ehlo",
            Stage::StartTls => "starttls",
            Stage::Rset => "rset",
            Stage::Mail => "mail",
            Stage::Rcpt => "rcpt",
            Stage::Data => "data",
            Stage::Body => "body",
            Stage::DataDone => "data_done",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("no backend server reachable ({0})")]
    Unavailable(String),
    #[error("backend timed out at {stage}", stage = .0.label())]
    Timeout(Stage),
    #[error("backend connection failed at {stage}: {err}", stage = .0.label(), err = .1)]
    Io(Stage, std::io::Error),
    #[error("backend closed the connection at {stage}", stage = .0.label())]
    Closed(Stage),
    #[error("backend sent a malformed reply at {stage}: {msg}", stage = .0.label(), msg = .1)]
    Protocol(Stage, String),
    #[error("backend refused at {stage}: {code} {text}", stage = .0.label(), code = .1.code, text = .1.text())]
    Refused(Stage, Reply),
    #[error("backend TLS failed: {0}")]
    Tls(String),
}

impl BackendError {
    pub fn stage(&self) -> Stage {
        match self {
            BackendError::Unavailable(_) => Stage::Connect,
            BackendError::Tls(_) => Stage::StartTls,
            BackendError::Timeout(s)
            | BackendError::Io(s, _)
            | BackendError::Closed(s)
            | BackendError::Protocol(s, _)
            | BackendError::Refused(s, _) => *s,
        }
    }
}

/// A piece of the message on its way to the backend: what the session
/// assembled, with a run of the client's own bytes to go in at a place in
/// it (see [`DataReceiver::ingest_relay`]), so a large body is not copied
/// between the two sockets.
///
/// [`DataReceiver::ingest_relay`]: crate::smtp::data::DataReceiver::ingest_relay
#[derive(Debug, Clone, Copy)]
pub struct Wire<'a> {
    pub assembled: &'a [u8],
    /// Where in `assembled` the client's bytes go, and the bytes.
    pub passed: Option<(usize, &'a [u8])>,
}

impl<'a> Wire<'a> {
    /// Bytes the session assembled, nothing passed on.
    pub fn assembled(assembled: &'a [u8]) -> Self {
        Wire {
            assembled,
            passed: None,
        }
    }

    /// The bytes in the order they go out.
    pub fn slices(&self) -> [&'a [u8]; 3] {
        match self.passed {
            Some((at, passed)) => [&self.assembled[..at], passed, &self.assembled[at..]],
            None => [self.assembled, &[], &[]],
        }
    }
}

/// `write_all` for several slices: one system call for all of them where
/// the stream takes vectored writes (plain TCP and rustls both do).
async fn write_all_vectored<W: AsyncWrite + Unpin>(
    w: &mut W,
    slices: [&[u8]; 3],
) -> std::io::Result<()> {
    let mut io = slices.map(std::io::IoSlice::new);
    let mut left = &mut io[..];
    // Empty slices first out, so a write of zero means the peer is gone.
    std::io::IoSlice::advance_slices(&mut left, 0);
    while !left.is_empty() {
        let n = w.write_vectored(left).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        std::io::IoSlice::advance_slices(&mut left, n);
    }
    Ok(())
}

/// Plain or TLS stream to the backend.
enum Stream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
    /// Only while being upgraded to TLS.
    Closed,
}

fn closed() -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::NotConnected, "backend stream closed")
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Closed => Poll::Ready(Err(closed())),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Closed => Poll::Ready(Err(closed())),
        }
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::Tls(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::Closed => Poll::Ready(Err(closed())),
        }
    }
    fn is_write_vectored(&self) -> bool {
        match self {
            Stream::Plain(s) => s.is_write_vectored(),
            Stream::Tls(s) => s.is_write_vectored(),
            Stream::Closed => false,
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s).poll_flush(cx),
            Stream::Closed => Poll::Ready(Err(closed())),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Closed => Poll::Ready(Err(closed())),
        }
    }
}

/// The envelope sender as forwarded: the path exactly as the client sent
/// it, plus the parameters the backend understands.
#[derive(Debug, Clone)]
pub struct MailArgs<'a> {
    /// Text between `<` and `>` (empty for the null sender).
    pub path: &'a str,
    pub size: Option<u64>,
    pub eight_bit: bool,
}

/// Replies to the first pipelined group of a transaction.
#[derive(Debug)]
pub struct Begun {
    pub mail: Reply,
    /// `None` when MAIL failed and RCPT was not sent (no pipelining).
    pub rcpt: Option<Reply>,
}

/// One connection to a backend MTA, greeted and ready for a transaction.
/// Boxed inside, so that a session keeping one between transactions (or
/// not) costs a pointer.
pub struct Connection(Box<ConnectionState>);

impl std::ops::Deref for Connection {
    type Target = ConnectionState;
    fn deref(&self) -> &ConnectionState {
        &self.0
    }
}

impl std::ops::DerefMut for Connection {
    fn deref_mut(&mut self) -> &mut ConnectionState {
        &mut self.0
    }
}

pub struct ConnectionState {
    stream: Stream,
    rbuf: BytesMut,
    parser: ReplyParser,
    caps: Capabilities,
    timeouts: BackendTimeouts,
    server: String,
    /// True when the next transaction needs no RSET first.
    clean: bool,
    /// Between the backend's 354 and its final reply: such a connection
    /// can never be reused, only closed (which aborts the message).
    in_data: bool,
    transactions: u32,
    /// Index of `server` in the backend's list, for its health.
    server_index: usize,
    observer: Arc<Observer>,
    /// A transaction began and its result is not counted yet.
    tx_open: bool,
    /// When DATA was sent and its reply is still to be read.
    data_sent: Option<Instant>,
    /// The message buffer of the session using this connection, kept here
    /// between messages so that a warm connection reuses it (bounded by
    /// the pool's size, unlike a buffer per client session).
    message_buffer: Vec<u8>,
}

/// Metrics and per-server health, shared by the backend and its
/// connections, so by every shard: what a delivered message touches here
/// is read-mostly (no lock, no label lookup), so shards do not take turns
/// at one cache line per message.
struct Observer {
    metrics: Arc<Metrics>,
    /// `host:port` of each configured server: the `server` label.
    labels: Vec<String>,
    health: Vec<Health>,
    /// `relayguard_backend_up` of each server.
    up_gauges: Vec<prometheus::IntGauge>,
    /// `relayguard_backend_stage_duration_seconds` by `Stage as usize`,
    /// then by shard.
    stage_timers: Vec<Vec<prometheus::Histogram>>,
    /// What `Health::checked` counts from.
    epoch: Instant,
}

/// What is known of one server: [`UNKNOWN`], [`UP`] or [`DOWN`], and when
/// that was last seen (milliseconds after [`Observer::epoch`], plus one; 0
/// for never).
#[derive(Debug)]
struct Health {
    state: AtomicU8,
    checked: AtomicU64,
}

const UNKNOWN: u8 = 0;
const UP: u8 = 1;
const DOWN: u8 = 2;

/// A server already known to be up is marked again by a delivered message
/// at most this often: enough for freshness (probes and readiness look back
/// seconds), and it keeps a store to shared memory off the per-message path.
const REFRESH_UP: Duration = Duration::from_millis(250);

impl Observer {
    fn new(metrics: Arc<Metrics>, servers: &[BackendAddr]) -> Observer {
        let labels: Vec<String> = servers.iter().map(|s| s.to_string()).collect();
        Observer {
            up_gauges: labels.iter().map(|l| metrics.backend_up_gauge(l)).collect(),
            stage_timers: Stage::ALL
                .iter()
                .map(|&s| match s {
                    // Not timed: the body is streamed as it arrives.
                    Stage::Body => Vec::new(),
                    s => metrics.backend_stage_histograms(s.label()),
                })
                .collect(),
            health: labels
                .iter()
                .map(|_| Health {
                    state: AtomicU8::new(UNKNOWN),
                    checked: AtomicU64::new(0),
                })
                .collect(),
            labels,
            metrics,
            epoch: Instant::now(),
        }
    }

    fn now(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64 + 1
    }

    /// Records that server `index` answered (or not) just now.
    fn mark(&self, index: usize, up: bool) {
        self.mark_at(index, up, self.now());
    }

    /// [`mark`](Self::mark) at `now` (from [`now`](Self::now)).
    fn mark_at(&self, index: usize, up: bool, now: u64) {
        let Some(h) = self.health.get(index) else {
            return;
        };
        let new = if up { UP } else { DOWN };
        if up
            && h.state.load(Ordering::Relaxed) == UP
            && now.saturating_sub(h.checked.load(Ordering::Relaxed)) < REFRESH_UP.as_millis() as u64
        {
            return;
        }
        h.checked.fetch_max(now, Ordering::Relaxed);
        // One caller sees each change, so each is logged once.
        let before = h.state.swap(new, Ordering::AcqRel);
        if before == new {
            return;
        }
        self.up_gauges[index].set(i64::from(up));
        if up {
            tracing::info!(backend = %self.labels[index], "backend server up")
        } else {
            tracing::warn!(backend = %self.labels[index], "backend server down")
        }
    }

    fn up_within(&self, index: usize, max_age: Duration) -> bool {
        self.up_within_at(index, max_age, self.now())
    }

    fn up_within_at(&self, index: usize, max_age: Duration, now: u64) -> bool {
        self.health.get(index).is_some_and(|h| {
            let checked = h.checked.load(Ordering::Relaxed);
            h.state.load(Ordering::Acquire) == UP
                && checked != 0
                && now.saturating_sub(checked) <= max_age.as_millis() as u64
        })
    }

    fn stage(&self, stage: Stage, started: Instant) {
        let timers = &self.stage_timers[stage as usize];
        if !timers.is_empty() {
            timers[crate::metrics::shard_of(timers)].observe(started.elapsed().as_secs_f64());
        }
    }
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("server", &self.server)
            .finish()
    }
}

async fn within<T>(
    limit: Duration,
    stage: Stage,
    fut: impl std::future::Future<Output = Result<T, BackendError>>,
) -> Result<T, BackendError> {
    // Most operations finish at the first poll (a write into an empty socket
    // buffer, a reply already read): the timer, a clock read and a timer
    // wheel entry, is set only when there is something to wait for.
    let mut fut = std::pin::pin!(fut);
    let first = std::future::poll_fn(|cx| Poll::Ready(fut.as_mut().poll(cx))).await;
    if let Poll::Ready(r) = first {
        return r;
    }
    tokio::time::timeout(limit, fut)
        .await
        .unwrap_or(Err(BackendError::Timeout(stage)))
}

/// A connection dropped between the backend's 354 and its final reply
/// was abandoned by the gateway: the backend discards the message.
impl Drop for Connection {
    fn drop(&mut self) {
        if self.in_data && self.tx_open {
            self.observer
                .metrics
                .backend_transaction(BackendResult::Aborted);
        }
    }
}

impl Connection {
    pub fn server(&self) -> &str {
        &self.server
    }

    /// Counts the transaction's result once.
    fn tx_result(&mut self, result: BackendResult) {
        if std::mem::take(&mut self.tx_open) {
            self.observer.metrics.backend_transaction(result);
        }
    }

    /// Counts an error in the middle of a transaction as its result.
    fn tx_check<T>(&mut self, r: Result<T, BackendError>) -> Result<T, BackendError> {
        if r.is_err() {
            self.tx_result(BackendResult::Failed);
        }
        r
    }

    /// Moves a plain connection's socket to the calling thread's event
    /// loop (another shard's pool held it). The SMTP state is untouched.
    fn rehome(mut self) -> std::io::Result<Connection> {
        match std::mem::replace(&mut self.stream, Stream::Closed) {
            Stream::Plain(tcp) => {
                let tcp = TcpStream::from_std(tcp.into_std()?)?;
                self.stream = Stream::Plain(tcp);
                Ok(self)
            }
            other => {
                self.stream = other;
                Err(std::io::Error::other("only a plain connection can move"))
            }
        }
    }

    pub fn capabilities(&self) -> &Capabilities {
        &self.caps
    }

    async fn read_reply(&mut self, stage: Stage, limit: Duration) -> Result<Reply, BackendError> {
        let ConnectionState {
            stream,
            rbuf,
            parser,
            ..
        } = &mut *self.0;
        within(limit, stage, async {
            loop {
                match parser.parse(rbuf) {
                    Ok(Some(reply)) => return Ok(reply),
                    Ok(None) => {}
                    Err(e) => return Err(BackendError::Protocol(stage, e.to_string())),
                }
                rbuf.reserve(4096);
                let n = stream
                    .read_buf(rbuf)
                    .await
                    .map_err(|e| BackendError::Io(stage, e))?;
                if n == 0 {
                    return Err(BackendError::Closed(stage));
                }
            }
        })
        .await
    }

    async fn send(
        &mut self,
        stage: Stage,
        bytes: &[u8],
        limit: Duration,
    ) -> Result<(), BackendError> {
        let stream = &mut self.stream;
        within(limit, stage, async {
            stream
                .write_all(bytes)
                .await
                .map_err(|e| BackendError::Io(stage, e))?;
            stream.flush().await.map_err(|e| BackendError::Io(stage, e))
        })
        .await
    }

    /// Like `send`, for a message piece that is in several slices: one
    /// write for all of them.
    async fn send_wire(
        &mut self,
        stage: Stage,
        wire: Wire<'_>,
        limit: Duration,
    ) -> Result<(), BackendError> {
        let stream = &mut self.stream;
        within(limit, stage, async {
            write_all_vectored(stream, wire.slices())
                .await
                .map_err(|e| BackendError::Io(stage, e))?;
            stream.flush().await.map_err(|e| BackendError::Io(stage, e))
        })
        .await
    }

    async fn command(&mut self, stage: Stage, line: &str) -> Result<Reply, BackendError> {
        let limit = self.timeouts.command;
        let started = Instant::now();
        self.send(stage, format!("{line}\r\n").as_bytes(), limit)
            .await?;
        let reply = self.read_reply(stage, limit).await?;
        self.observer.stage(stage, started);
        Ok(reply)
    }

    fn mail_line(&self, args: &MailArgs<'_>) -> String {
        let mut line = format!("MAIL FROM:<{}>", args.path);
        if let (Some(size), Some(_)) = (args.size, self.caps.size) {
            line.push_str(&format!(" SIZE={size}"));
        }
        if args.eight_bit && self.caps.eight_bit_mime {
            line.push_str(" BODY=8BITMIME");
        }
        line
    }

    /// Starts a transaction: RSET if the connection was used before, MAIL
    /// and the first RCPT, pipelined when the backend offers PIPELINING.
    pub async fn begin(&mut self, args: &MailArgs<'_>, rcpt: &str) -> Result<Begun, BackendError> {
        // A reused connection that fails here is replaced by the caller
        // and the transaction retried: count only a fresh one's failure.
        let reused = self.transactions > 0;
        self.tx_open = true;
        let r = self.begin_inner(args, rcpt).await;
        match &r {
            Ok(b) if !b.mail.is_positive() => {
                let result = if b.mail.is_transient() {
                    BackendResult::Deferred
                } else {
                    BackendResult::Rejected
                };
                self.tx_result(result);
            }
            Ok(_) => {}
            Err(_) if reused => self.tx_open = false,
            Err(_) => self.tx_result(BackendResult::Failed),
        }
        r
    }

    async fn begin_inner(
        &mut self,
        args: &MailArgs<'_>,
        rcpt: &str,
    ) -> Result<Begun, BackendError> {
        let need_rset = !self.clean;
        self.clean = false;
        self.transactions += 1;
        let mail = self.mail_line(args);
        let rcpt_line = format!("RCPT TO:<{rcpt}>");
        let limit = self.timeouts.command;
        if self.caps.pipelining {
            let mut batch = String::new();
            if need_rset {
                batch.push_str("RSET\r\n");
            }
            batch.push_str(&mail);
            batch.push_str("\r\n");
            batch.push_str(&rcpt_line);
            batch.push_str("\r\n");
            let started = Instant::now();
            self.send(Stage::Mail, batch.as_bytes(), limit).await?;
            if need_rset {
                let r = self.read_reply(Stage::Rset, limit).await?;
                self.observer.stage(Stage::Rset, started);
                if !r.is_positive() {
                    return Err(BackendError::Refused(Stage::Rset, r));
                }
            }
            let mail = self.read_reply(Stage::Mail, limit).await?;
            self.observer.stage(Stage::Mail, started);
            let rcpt = self.read_reply(Stage::Rcpt, limit).await?;
            self.observer.stage(Stage::Rcpt, started);
            Ok(Begun {
                mail,
                rcpt: Some(rcpt),
            })
        } else {
            if need_rset {
                let r = self.command(Stage::Rset, "RSET").await?;
                if !r.is_positive() {
                    return Err(BackendError::Refused(Stage::Rset, r));
                }
            }
            let mail = self.command(Stage::Mail, &mail).await?;
            if !mail.is_positive() {
                return Ok(Begun { mail, rcpt: None });
            }
            let rcpt = self.command(Stage::Rcpt, &rcpt_line).await?;
            Ok(Begun {
                mail,
                rcpt: Some(rcpt),
            })
        }
    }

    pub async fn rcpt(&mut self, path: &str) -> Result<Reply, BackendError> {
        let r = self
            .command(Stage::Rcpt, &format!("RCPT TO:<{path}>"))
            .await;
        self.tx_check(r)
    }

    /// Sends DATA and waits for the reply; the caller streams the body only
    /// after a 354.
    pub async fn data(&mut self) -> Result<Reply, BackendError> {
        self.data_start().await?;
        self.data_confirm().await
    }

    /// Sends DATA without waiting for the reply, so the client can be told
    /// 354 at once and the backend's round trip overlaps the client's.
    /// [`Connection::data_confirm`] must read the reply before anything
    /// else is written. From here on the connection cannot be reused
    /// unless the backend refuses DATA, and dropping it aborts the message.
    pub async fn data_start(&mut self) -> Result<(), BackendError> {
        let limit = self.timeouts.data_init;
        self.data_sent = Some(Instant::now());
        self.in_data = true;
        let r = self.send(Stage::Data, b"DATA\r\n", limit).await;
        self.tx_check(r)
    }

    /// DATA went out with [`Connection::data_start`] and its reply is still
    /// to be read with [`Connection::data_confirm`].
    pub fn awaiting_data_reply(&self) -> bool {
        self.data_sent.is_some()
    }

    /// The backend's reply to the DATA sent by [`Connection::data_start`].
    pub async fn data_confirm(&mut self) -> Result<Reply, BackendError> {
        let limit = self.timeouts.data_init;
        let started = self.data_sent.take().unwrap_or_else(Instant::now);
        let r = self.read_reply(Stage::Data, limit).await;
        let reply = self.tx_check(r)?;
        self.observer.stage(Stage::Data, started);
        self.in_data = reply.code == 354;
        if !self.in_data {
            let result = if reply.is_transient() {
                BackendResult::Deferred
            } else {
                BackendResult::Rejected
            };
            self.tx_result(result);
        }
        Ok(reply)
    }

    /// Writes a piece of the message as it goes on the wire: dot-stuffed
    /// CRLF lines (the session's [`DataReceiver::ingest_relay`] output, or
    /// the gateway's own trace header).
    ///
    /// [`DataReceiver::ingest_relay`]: crate::smtp::data::DataReceiver::ingest_relay
    pub async fn body(&mut self, wire: Wire<'_>) -> Result<(), BackendError> {
        let limit = self.timeouts.data_block;
        let r = self.send_wire(Stage::Body, wire, limit).await;
        self.tx_check(r)
    }

    /// The buffer to assemble the message in (empty); give it back with
    /// [`Connection::return_buffer`].
    pub fn take_buffer(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.message_buffer)
    }

    /// Frees the message buffer (a session going idle keeps its connection
    /// but should not keep memory for a message that may never come).
    pub fn free_buffer(&mut self) {
        self.message_buffer = Vec::new();
    }

    /// Keeps `buffer` for the next message unless a huge one grew it. What
    /// a client streaming at full speed needs (a read of up to 128 KB and
    /// the trace header) is kept: allocating it again for each message cost
    /// page faults and copies in every 100 KB message.
    pub fn return_buffer(&mut self, mut buffer: Vec<u8>) {
        const KEEP: usize = 256 * 1024;
        buffer.clear();
        if buffer.capacity() <= KEEP {
            self.message_buffer = buffer;
        }
    }

    /// Sends the rest of the message (`tail` with the client's bytes
    /// `passed` in it, stuffed, empty or ending in CRLF) and the terminating
    /// dot in one write, and returns the backend's verdict. Only after this
    /// reply may the client hear success.
    pub async fn finish(
        &mut self,
        tail: &mut Vec<u8>,
        passed: Option<(usize, &[u8])>,
    ) -> Result<Reply, BackendError> {
        tail.extend_from_slice(b".\r\n");
        let end = Wire {
            assembled: tail,
            passed,
        };
        debug_assert!({
            let [a, b, c] = end.slices();
            let all = [a, b, c].concat();
            all == b".\r\n" || all.ends_with(b"\r\n.\r\n")
        });
        let limit = self.timeouts.data_done;
        let started = Instant::now();
        let r = async {
            self.send_wire(Stage::DataDone, end, limit).await?;
            self.read_reply(Stage::DataDone, limit).await
        }
        .await;
        let reply = self.tx_check(r)?;
        self.observer.stage(Stage::DataDone, started);
        self.in_data = false;
        self.tx_result(BackendResult::of_reply(&reply));
        if reply.is_positive() {
            // A delivered message is as good a health check as a probe.
            self.observer.mark(self.server_index, true);
        }
        // After the final reply the server has reset its transaction state
        // (RFC 5321 §4.1.1.4), whatever the outcome.
        self.clean = true;
        Ok(reply)
    }

    /// Aborts a transaction that has not reached DATA.
    pub async fn reset(&mut self) -> Result<(), BackendError> {
        // An abandoned transaction has no result to count.
        self.tx_open = false;
        let r = self.command(Stage::Rset, "RSET").await?;
        if r.is_positive() {
            self.clean = true;
            Ok(())
        } else {
            Err(BackendError::Refused(Stage::Rset, r))
        }
    }

    async fn quit(mut self) {
        let limit = Duration::from_secs(2);
        if self.send(Stage::Rset, b"QUIT\r\n", limit).await.is_ok() {
            let _ = self.read_reply(Stage::Rset, limit).await;
        }
    }
}

/// The largest message buffer a pooled connection keeps (see `release`).
const POOLED_BUFFER: usize = 64 * 1024;

/// The backend MTAs, in order of preference, and a pool of warm connections.
pub struct Backend {
    servers: Vec<BackendAddr>,
    helo: String,
    tls_mode: BackendTls,
    tls: Option<(TlsConnector, Option<String>)>,
    timeouts: BackendTimeouts,
    pool_config: PoolConfig,
    /// One pool per shard: a socket belongs to the event loop of the shard
    /// that opened it (see [`crate::shards`]).
    pools: Vec<Mutex<VecDeque<(Connection, Instant)>>>,
    /// `pool.max_idle` shared out between the shards.
    per_shard_max: usize,
    /// Connections in all pools (the idle gauge).
    pooled: AtomicUsize,
    observer: Arc<Observer>,
}

impl std::fmt::Debug for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Backend")
            .field("servers", &self.servers)
            .finish()
    }
}

impl Backend {
    pub fn new(
        config: &BackendConfig,
        helo: &str,
        metrics: Arc<Metrics>,
        shards: usize,
    ) -> Result<Arc<Backend>, crate::tls::TlsError> {
        let shards = shards.max(1);
        let tls = match config.tls {
            BackendTls::None => None,
            _ => Some((
                TlsConnector::from(crate::tls::backend_client_config(
                    config.ca_file.as_deref(),
                )?),
                config.server_name.clone(),
            )),
        };
        Ok(Arc::new(Backend {
            servers: config.servers.clone(),
            helo: helo.to_string(),
            tls_mode: config.tls,
            tls,
            timeouts: config.timeouts.clone(),
            pool_config: config.pool.clone(),
            pools: (0..shards).map(|_| Mutex::new(VecDeque::new())).collect(),
            per_shard_max: config.pool.max_idle.div_ceil(shards),
            pooled: AtomicUsize::new(0),
            observer: Arc::new(Observer::new(metrics, &config.servers)),
        }))
    }

    /// A connection ready for a transaction: a warm one from the pool if
    /// there is one, else a new one to the first server that answers.
    pub async fn checkout(&self) -> Result<Connection, BackendError> {
        if let Some(conn) = self.take_idle() {
            return Ok(conn);
        }
        self.connect_any().await
    }

    /// A warm connection: from this shard's pool, else one moved here
    /// from another shard's (its socket re-registered with this shard's
    /// event loop), so that a shard never connects while another holds
    /// idle connections.
    pub fn take_idle(&self) -> Option<Connection> {
        let here = self.shard();
        if let Some(conn) = self.with_pool(here, |pool| self.pop_fresh(pool, false)) {
            return Some(conn);
        }
        for other in (0..self.pools.len()).filter(|&i| i != here) {
            while let Some(conn) = self.with_pool(other, |pool| self.pop_fresh(pool, true)) {
                match conn.rehome() {
                    Ok(conn) => return Some(conn),
                    Err(e) => tracing::debug!(error = %e, "pooled backend connection not moved"),
                }
            }
        }
        None
    }

    /// The newest connection not idle for `idle_timeout` yet (older ones
    /// are dropped). `movable`: only a plain one (a TLS stream cannot be
    /// taken apart to move its socket, so it stays for its own shard).
    fn pop_fresh(
        &self,
        pool: &mut VecDeque<(Connection, Instant)>,
        movable: bool,
    ) -> Option<Connection> {
        while let Some((conn, since)) = pool.pop_back() {
            if since.elapsed() >= self.pool_config.idle_timeout {
                continue;
            }
            if movable && !matches!(conn.stream, Stream::Plain(_)) {
                pool.push_back((conn, since));
                return None;
            }
            return Some(conn);
        }
        None
    }

    /// The pool of the calling thread's shard (see [`crate::shards`]).
    fn shard(&self) -> usize {
        crate::shards::current() % self.pools.len()
    }

    /// Runs `f` on pool `index` and keeps the idle gauge (the sum over
    /// all pools) in step.
    fn with_pool<R>(
        &self,
        index: usize,
        f: impl FnOnce(&mut VecDeque<(Connection, Instant)>) -> R,
    ) -> R {
        let mut pool = self.pools[index].lock().unwrap_or_else(|p| p.into_inner());
        let before = pool.len();
        let r = f(&mut pool);
        let after = pool.len();
        let total = if after >= before {
            self.pooled.fetch_add(after - before, Ordering::Relaxed) + (after - before)
        } else {
            self.pooled.fetch_sub(before - after, Ordering::Relaxed) - (before - after)
        };
        drop(pool);
        self.observer.metrics.backend_pool_idle(total);
        r
    }

    /// Returns a connection for reuse by any client. It is marked so that
    /// its next transaction starts with RSET. A connection in the middle of
    /// DATA is closed instead: closing is the only way to abort a message.
    pub fn release(&self, mut conn: Connection) {
        if conn.in_data {
            return;
        }
        if self.pool_config.max_idle == 0 || conn.transactions >= self.pool_config.max_transactions
        {
            tokio::spawn(conn.quit());
            return;
        }
        conn.clean = false;
        // A session streaming large messages keeps a large buffer while it
        // keeps the connection; the pool keeps at most a small one, so
        // idle connections do not hold 256 KB each.
        if conn.message_buffer.capacity() > POOLED_BUFFER {
            conn.free_buffer();
        }
        let now = Instant::now();
        let (expired, oldest) = self.with_pool(self.shard(), |pool| {
            // Drop connections the backend has probably timed out already.
            let expired = self.pop_expired(pool, now);
            let oldest = (pool.len() >= self.per_shard_max)
                .then(|| pool.pop_front())
                .flatten();
            pool.push_back((conn, now));
            (expired, oldest)
        });
        drop((expired, oldest));
    }

    /// Takes the connections idle for `idle_timeout` or longer off the
    /// front of the pool (the oldest are at the front).
    fn pop_expired(
        &self,
        pool: &mut VecDeque<(Connection, Instant)>,
        now: Instant,
    ) -> Vec<Connection> {
        let mut expired = Vec::new();
        while pool
            .front()
            .is_some_and(|(_, since)| now.duration_since(*since) >= self.pool_config.idle_timeout)
        {
            expired.extend(pool.pop_front().map(|(conn, _)| conn));
        }
        expired
    }

    /// Closes (with QUIT) the pooled connections of the calling shard idle
    /// for `idle_timeout`. `take_idle` and `release` skip such connections
    /// too, but only when traffic calls them: without this, a quiet gateway
    /// would keep its idle connections open for as long as the backend
    /// tolerates them.
    pub fn expire_idle(&self) {
        let expired = self.with_pool(self.shard(), |pool| self.pop_expired(pool, Instant::now()));
        for conn in expired {
            tokio::spawn(conn.quit());
        }
    }

    /// Runs [`Backend::expire_idle`] every half `idle_timeout` (at least
    /// every second) until `shutdown`.
    pub async fn sweep_pool(self: Arc<Self>, shutdown: tokio_util::sync::CancellationToken) {
        let every = (self.pool_config.idle_timeout / 2).max(Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = tokio::time::sleep(every) => self.expire_idle(),
                _ = shutdown.cancelled() => return,
            }
        }
    }

    /// Connects to the servers in order; the first that greets wins.
    /// For a transaction: when none answers, the transaction is counted
    /// as `unavailable`.
    pub async fn connect_any(&self) -> Result<Connection, BackendError> {
        let r = self.first_answering().await;
        if r.is_err() {
            self.observer
                .metrics
                .backend_transaction(BackendResult::Unavailable);
        }
        r
    }

    async fn first_answering(&self) -> Result<Connection, BackendError> {
        let mut failures = Vec::new();
        for (index, server) in self.servers.iter().enumerate() {
            match self.connect(index).await {
                Ok(conn) => return Ok(conn),
                Err(e) => {
                    tracing::warn!(backend = %server, error = %e, "backend server unusable, trying the next");
                    failures.push(format!("{server}: {e}"));
                }
            }
        }
        Err(BackendError::Unavailable(failures.join("; ")))
    }

    /// Checks that some backend answers with a 220 greeting (for readiness).
    pub async fn probe(&self) -> Result<String, BackendError> {
        let conn = self.first_answering().await?;
        let server = conn.server.clone();
        conn.quit().await;
        Ok(server)
    }

    /// Checks every server (greeting, EHLO, STARTTLS when configured,
    /// QUIT) and records each one's health in `relayguard_backend_up`.
    /// A server that answered within `fresh` (a real transaction, or the
    /// previous probe) is not asked again. Returns how many are up.
    pub async fn probe_all(&self, fresh: Duration) -> usize {
        let mut up = 0;
        for (index, server) in self.servers.iter().enumerate() {
            if self.observer.up_within(index, fresh) {
                up += 1;
                continue;
            }
            match self.connect(index).await {
                Ok(conn) => {
                    conn.quit().await;
                    up += 1;
                }
                Err(e) => tracing::debug!(backend = %server, error = %e, "backend probe failed"),
            }
        }
        up
    }

    /// Did some server answer (a probe or a real connection) within
    /// `max_age`, and was it up then? For `/readyz`.
    pub fn reachable(&self, max_age: Duration) -> bool {
        (0..self.servers.len()).any(|i| self.observer.up_within(i, max_age))
    }

    /// The connect timeout (a probe of a dead server can take this long).
    pub fn connect_timeout(&self) -> Duration {
        self.timeouts.connect
    }

    /// Connects to server `index` and records its health.
    async fn connect(&self, index: usize) -> Result<Connection, BackendError> {
        let r = self.connect_to(index).await;
        self.observer.mark(index, r.is_ok());
        r
    }

    async fn connect_to(&self, index: usize) -> Result<Connection, BackendError> {
        let server = &self.servers[index];
        let t = &self.timeouts;
        let started = Instant::now();
        let tcp = within(t.connect, Stage::Connect, async {
            TcpStream::connect((server.host.as_str(), server.port))
                .await
                .map_err(|e| BackendError::Io(Stage::Connect, e))
        })
        .await?;
        self.observer.stage(Stage::Connect, started);
        let _ = tcp.set_nodelay(true);
        let mut conn = Connection(Box::new(ConnectionState {
            stream: Stream::Plain(tcp),
            rbuf: BytesMut::with_capacity(1024),
            parser: ReplyParser::new(false),
            caps: Capabilities::default(),
            timeouts: t.clone(),
            server: server.to_string(),
            clean: true,
            in_data: false,
            transactions: 0,
            server_index: index,
            observer: self.observer.clone(),
            tx_open: false,
            data_sent: None,
            message_buffer: Vec::new(),
        }));
        let started = Instant::now();
        let greeting = conn.read_reply(Stage::Greeting, t.greeting).await?;
        self.observer.stage(Stage::Greeting, started);
        if greeting.code != 220 {
            return Err(BackendError::Refused(Stage::Greeting, greeting));
        }
        self.hello(&mut conn).await?;
        if self.tls_mode != BackendTls::None {
            if conn.caps.starttls {
                conn = self.starttls(conn, server).await?;
            } else if self.tls_mode == BackendTls::Required {
                return Err(BackendError::Tls(format!(
                    "{server} does not offer STARTTLS and backend.tls is `required`"
                )));
            }
        }
        Ok(conn)
    }

    /// EHLO, or HELO for a server that does not know EHLO.
    async fn hello(&self, conn: &mut Connection) -> Result<(), BackendError> {
        let ehlo = conn
            .command(Stage::Ehlo, &format!("EHLO {}", self.helo))
            .await?;
        if ehlo.is_positive() {
            conn.caps = Capabilities::from_ehlo(&ehlo);
            let enhanced = conn.caps.enhanced_status_codes;
            conn.parser.set_enhanced(enhanced);
            return Ok(());
        }
        if ehlo.is_transient() && ehlo.code == 421 {
            return Err(BackendError::Refused(Stage::Ehlo, ehlo));
        }
        let helo = conn
            .command(Stage::Ehlo, &format!("HELO {}", self.helo))
            .await?;
        if !helo.is_positive() {
            return Err(BackendError::Refused(Stage::Ehlo, helo));
        }
        conn.caps = Capabilities::default();
        conn.parser.set_enhanced(false);
        Ok(())
    }

    async fn starttls(
        &self,
        mut conn: Connection,
        server: &BackendAddr,
    ) -> Result<Connection, BackendError> {
        let Some((connector, name)) = &self.tls else {
            return Ok(conn);
        };
        let reply = conn.command(Stage::StartTls, "STARTTLS").await?;
        if reply.code != 220 {
            return Err(BackendError::Refused(Stage::StartTls, reply));
        }
        if !conn.rbuf.is_empty() {
            return Err(BackendError::Protocol(
                Stage::StartTls,
                "data after the STARTTLS reply".into(),
            ));
        }
        let name = name.clone().unwrap_or_else(|| server.host.clone());
        let server_name = ServerName::try_from(name.clone())
            .map_err(|_| BackendError::Tls(format!("`{name}` is not a valid TLS server name")))?;
        let plain = std::mem::replace(&mut conn.stream, Stream::Closed);
        let Stream::Plain(tcp) = plain else {
            return Err(BackendError::Tls("STARTTLS on a TLS connection".into()));
        };
        let tls = within(self.timeouts.command, Stage::StartTls, async {
            connector
                .connect(server_name, tcp)
                .await
                .map_err(|e| BackendError::Tls(e.to_string()))
        })
        .await?;
        conn.stream = Stream::Tls(Box::new(tls));
        // RFC 3207: forget everything learned before TLS and ask again.
        conn.caps = Capabilities::default();
        self.hello(&mut conn).await?;
        Ok(conn)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn observer() -> (Arc<Metrics>, Observer) {
        let metrics = Arc::new(Metrics::new());
        let servers: Vec<BackendAddr> = ["127.0.0.1:25", "127.0.0.1:26"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        (metrics.clone(), Observer::new(metrics, &servers))
    }

    fn up_gauge(metrics: &Metrics, server: &str) -> i64 {
        metrics.backend_up_gauge(server).get()
    }

    #[test]
    fn health_follows_the_last_answer_of_each_server() {
        let (metrics, o) = observer();
        let fresh = Duration::from_secs(60);
        assert!(!o.up_within(0, fresh), "unknown is not up");
        assert_eq!(up_gauge(&metrics, "127.0.0.1:25"), 0);

        o.mark(0, true);
        assert!(o.up_within(0, fresh));
        assert!(!o.up_within(1, fresh), "servers are apart");
        assert_eq!(up_gauge(&metrics, "127.0.0.1:25"), 1);

        // Down right after up is never held back by the refresh interval,
        // nor is up right after down.
        o.mark(0, false);
        assert!(!o.up_within(0, fresh));
        assert_eq!(up_gauge(&metrics, "127.0.0.1:25"), 0);
        o.mark(0, true);
        assert!(o.up_within(0, fresh));
        assert_eq!(up_gauge(&metrics, "127.0.0.1:25"), 1);

        o.mark(7, true); // not a configured server: ignored
    }

    #[test]
    fn a_busy_server_stays_fresh_without_a_store_per_message() {
        let (_metrics, o) = observer();
        let every = REFRESH_UP.as_millis() as u64;
        o.mark_at(0, true, 1000);
        // Deliveries within REFRESH_UP write nothing...
        for t in 1000..1000 + every {
            o.mark_at(0, true, t);
        }
        assert_eq!(o.health[0].checked.load(Ordering::Relaxed), 1000);
        assert!(o.up_within_at(0, Duration::from_secs(1), 1000 + every));
        // ...the first after it refreshes the time.
        o.mark_at(0, true, 1000 + every);
        assert_eq!(o.health[0].checked.load(Ordering::Relaxed), 1000 + every);
        assert!(!o.up_within_at(0, Duration::from_secs(1), 2001 + every));
        // A refusal is recorded at once, whatever the interval.
        o.mark_at(0, false, 1001 + every);
        assert!(!o.up_within_at(0, Duration::from_secs(1), 1001 + every));
    }
}
