//! Listeners, connection admission and graceful shutdown.
//!
//! Everything is validated and every port bound before the first
//! connection is accepted, so a bad configuration never half-starts.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::backend::Backend;
use crate::config::{Config, TlsMode};
use crate::metrics::{ConnectionRefusal, Metrics, TlsFailure};
use crate::session::{replies, Conversation, Outcome, Session};
use crate::tls::{CertStore, TlsInfo};
use policy::relay::{Policy, RateLimiter};

/// State shared by every session.
pub struct Shared {
    pub config: Arc<Config>,
    pub policy: ArcSwap<Policy>,
    /// Rates and quotas across sessions (and across policy reloads).
    pub rates: RateLimiter,
    pub backend: Arc<Backend>,
    pub auth: Option<Arc<crate::auth::Authenticator>>,
    pub shutdown: CancellationToken,
    pub metrics: Arc<Metrics>,
    /// One JSON record per transaction decision (see [`crate::audit`]).
    pub audit: crate::audit::AuditLog,
    limits: ConnectionLimits,
    listener_certs: Vec<Arc<CertStore>>,
}

impl Shared {
    /// The certificate stores of the TLS listeners (for reload).
    pub fn listener_certs(&self) -> &[Arc<CertStore>] {
        &self.listener_certs
    }
}

/// One configured listener, with its TLS acceptor when it has a certificate.
pub struct ListenerInfo {
    pub name: String,
    pub require_tls_for_auth: bool,
    pub mode: TlsMode,
    pub acceptor: Option<TlsAcceptor>,
    pub certs: Option<Arc<CertStore>>,
    /// `proxy_protocol: true`: the peers that may send the header.
    pub proxy: Option<crate::proxy_protocol::TrustedProxies>,
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("listener `{name}`: cannot bind {addr}: {source}")]
    Bind {
        name: String,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("listener `{name}`: {source}")]
    Tls {
        name: String,
        source: crate::tls::TlsError,
    },
    #[error("backend: {0}")]
    BackendTls(crate::tls::TlsError),
    #[error("auth: {0}")]
    Auth(#[from] crate::auth::AuthSetupError),
    #[error("{0}")]
    Policy(String),
    #[error("audit log: {0}")]
    Audit(std::io::Error),
}

/// Caps on concurrent connections, in total and per client address.
struct ConnectionLimits {
    total: Arc<Semaphore>,
    per_ip: Arc<Mutex<HashMap<IpAddr, usize>>>,
    max_per_ip: usize,
}

/// Holds a connection's place in both limits until dropped.
struct Admission {
    _permit: OwnedSemaphorePermit,
    ip: IpAddr,
    per_ip: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

impl Drop for Admission {
    fn drop(&mut self) {
        let mut map = self.per_ip.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = map.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.ip);
            }
        }
    }
}

enum Refusal {
    Total,
    PerIp,
}

impl ConnectionLimits {
    fn admit(&self, ip: IpAddr) -> Result<Admission, Refusal> {
        self.admit_ip(self.admit_total()?, ip)
    }

    /// A place under `max_connections`, before the client's address is
    /// known (a PROXY header is still to be read).
    fn admit_total(&self) -> Result<OwnedSemaphorePermit, Refusal> {
        self.total
            .clone()
            .try_acquire_owned()
            .map_err(|_| Refusal::Total)
    }

    /// The per-address limit, for the client's real address.
    fn admit_ip(&self, permit: OwnedSemaphorePermit, ip: IpAddr) -> Result<Admission, Refusal> {
        let mut map = self.per_ip.lock().unwrap_or_else(|p| p.into_inner());
        let n = map.entry(ip).or_insert(0);
        if *n >= self.max_per_ip {
            return Err(Refusal::PerIp);
        }
        *n += 1;
        Ok(Admission {
            _permit: permit,
            ip,
            per_ip: self.per_ip.clone(),
        })
    }
}

/// A started gateway: bound listeners, ready to serve.
pub struct Server {
    pub shared: Arc<Shared>,
    listeners: Vec<(Arc<ListenerInfo>, TcpListener)>,
    tracker: TaskTracker,
}

impl Server {
    /// Loads certificates, builds the backend client and binds every
    /// listener. Nothing is accepted yet.
    pub async fn bind(config: Config) -> Result<Server, StartError> {
        let config = Arc::new(config);
        let policy = crate::policy_source::load(&config).map_err(StartError::Policy)?;
        let metrics = Arc::new(Metrics::new());
        metrics.set_connection_limit(config.limits.max_connections);
        let audit = crate::audit::AuditLog::open(&config.audit, metrics.clone())
            .map_err(StartError::Audit)?;
        let backend = Backend::new(&config.backend, config.helo_name(), metrics.clone())
            .map_err(StartError::BackendTls)?;
        let auth = match &config.auth {
            Some(a) => {
                let auth = crate::auth::Authenticator::new(a)?;
                auth.spawn_watcher(Duration::from_secs(5));
                Some(auth)
            }
            None => None,
        };
        for m in auth.iter().flat_map(|a| a.mechanisms()) {
            metrics.init_auth_mechanism(*m);
        }
        let mut listeners = Vec::new();
        for l in &config.listeners {
            let certs = match (&l.certificate, &l.key, &config.tls) {
                (Some(c), Some(k), _) => Some((c.clone(), k.clone(), Duration::from_secs(60))),
                (_, _, Some(t)) if l.tls != TlsMode::None => {
                    Some((t.certificate.clone(), t.key.clone(), t.reload_interval))
                }
                _ => None,
            };
            let (acceptor, store) = match certs {
                Some((c, k, interval)) if l.tls != TlsMode::None => {
                    let store = CertStore::load(&c, &k).map_err(|source| StartError::Tls {
                        name: l.name.clone(),
                        source,
                    })?;
                    store.spawn_reloader(interval);
                    (
                        Some(TlsAcceptor::from(crate::tls::server_config(store.clone()))),
                        Some(store),
                    )
                }
                _ => (None, None),
            };
            metrics.init_listener(&l.name, acceptor.is_some());
            let tcp = bind_listener(l.address, config.limits.listen_backlog).map_err(|source| {
                StartError::Bind {
                    name: l.name.clone(),
                    addr: l.address,
                    source,
                }
            })?;
            listeners.push((
                Arc::new(ListenerInfo {
                    name: l.name.clone(),
                    require_tls_for_auth: l.require_tls_for_auth,
                    mode: l.tls,
                    acceptor,
                    certs: store,
                    proxy: l.proxy_protocol.then(|| l.trusted_proxies.clone()),
                }),
                tcp,
            ));
        }
        let limits = ConnectionLimits {
            total: Arc::new(Semaphore::new(config.limits.max_connections)),
            per_ip: Arc::new(Mutex::new(HashMap::new())),
            max_per_ip: config.limits.max_connections_per_ip,
        };
        let listener_certs = listeners
            .iter()
            .filter_map(|(i, _)| i.certs.clone())
            .collect();
        let shared = Arc::new(Shared {
            listener_certs,
            config,
            rates: RateLimiter::with_capacity(
                100_000,
                policy.longest_window().unwrap_or(Duration::from_secs(3600)),
            ),
            policy: ArcSwap::from_pointee(policy),
            backend,
            auth,
            shutdown: CancellationToken::new(),
            metrics,
            audit,
            limits,
        });
        Ok(Server {
            shared,
            listeners,
            tracker: TaskTracker::new(),
        })
    }

    /// The bound address of each listener, by name (useful with port 0).
    pub fn local_addrs(&self) -> Vec<(String, SocketAddr)> {
        self.listeners
            .iter()
            .filter_map(|(info, l)| Some((info.name.clone(), l.local_addr().ok()?)))
            .collect()
    }

    /// Serves until `shutdown` is cancelled, then drains: idle sessions are
    /// told 421 at once, transactions in flight may finish until the drain
    /// deadline.
    pub async fn run(self) {
        let Server {
            shared,
            listeners,
            tracker,
        } = self;
        for (info, listener) in listeners {
            let shared = shared.clone();
            let tracker2 = tracker.clone();
            tracker.spawn(accept_loop(shared, info, listener, tracker2));
        }
        shared.metrics.set_accepting(true);
        shared.shutdown.cancelled().await;
        shared.metrics.set_accepting(false);
        tracker.close();
        let drain = shared.config.shutdown.drain_timeout;
        tracing::info!(
            drain_seconds = drain.as_secs_f64(),
            "shutting down: no new connections, draining sessions"
        );
        if tokio::time::timeout(drain, tracker.wait()).await.is_err() {
            tracing::warn!(
                remaining = tracker.len(),
                "drain deadline reached; closing remaining sessions"
            );
        } else {
            tracing::info!("all sessions finished");
        }
    }
}

async fn accept_loop(
    shared: Arc<Shared>,
    info: Arc<ListenerInfo>,
    listener: TcpListener,
    tracker: TaskTracker,
) {
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = shared.shutdown.cancelled() => return,
        };
        let (tcp, peer) = match accepted {
            Ok(x) => x,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(listener = %info.name, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        shared.metrics.connection_accepted(&info.name);
        if let Some(trusted) = &info.proxy {
            if !trusted.contains(peer.ip()) {
                // No SMTP reply: whoever this is did not come through the
                // balancer, and anything we say would be read as SMTP.
                shared
                    .metrics
                    .connection_refused(&info.name, ConnectionRefusal::ProxyUntrusted);
                tracing::warn!(listener = %info.name, client = %peer,
                    reason = ConnectionRefusal::ProxyUntrusted.label(), "connection refused");
                continue;
            }
            let permit = match shared.limits.admit_total() {
                Ok(p) => p,
                Err(refusal) => {
                    refuse_admission(&shared, &info, tcp, peer, refusal);
                    continue;
                }
            };
            let shared = shared.clone();
            let info = info.clone();
            tracker.spawn(async move {
                let mut tcp = tcp;
                let timeout = shared.config.limits.proxy_protocol_timeout;
                let client = match crate::proxy_protocol::read_proxy_header(&mut tcp, timeout).await
                {
                    // LOCAL / UNKNOWN (a balancer's health check): its own address.
                    Ok(header) => header.source.unwrap_or(peer),
                    Err(e) => {
                        shared
                            .metrics
                            .connection_refused(&info.name, ConnectionRefusal::ProxyHeader);
                        tracing::warn!(listener = %info.name, client = %peer,
                            reason = ConnectionRefusal::ProxyHeader.label(),
                            error = %e, detail = e.label(), "connection refused");
                        return;
                    }
                };
                match shared.limits.admit_ip(permit, client.ip()) {
                    Ok(admission) => {
                        let active = shared.metrics.connection_opened(&info.name);
                        handle(shared, info, tcp, client).await;
                        drop((admission, active));
                    }
                    Err(refusal) => refuse_admission(&shared, &info, tcp, client, refusal),
                }
            });
            continue;
        }
        match shared.limits.admit(peer.ip()) {
            Ok(admission) => {
                let active = shared.metrics.connection_opened(&info.name);
                let shared = shared.clone();
                let info = info.clone();
                tracker.spawn(async move {
                    handle(shared, info, tcp, peer).await;
                    drop((admission, active));
                });
            }
            Err(refusal) => refuse_admission(&shared, &info, tcp, peer, refusal),
        }
    }
}

/// Over `max_connections` or `max_connections_per_ip`: counted, logged,
/// told `421` (except on implicit TLS, where there is no SMTP yet).
fn refuse_admission(
    shared: &Shared,
    info: &ListenerInfo,
    tcp: TcpStream,
    peer: SocketAddr,
    refusal: Refusal,
) {
    let (reply, reason) = match refusal {
        Refusal::Total => (
            replies::too_many_connections(),
            ConnectionRefusal::MaxConnections,
        ),
        Refusal::PerIp => (
            replies::too_many_from_ip(),
            ConnectionRefusal::MaxConnectionsPerIp,
        ),
    };
    shared.metrics.connection_refused(&info.name, reason);
    let reason = reason.label();
    tracing::warn!(listener = %info.name, client = %peer, reason, "connection refused");
    if info.mode != TlsMode::Implicit {
        tokio::spawn(refuse(tcp, reply));
    }
}

async fn refuse(mut tcp: TcpStream, reply: crate::smtp::reply::Reply) {
    let mut out = Vec::new();
    reply.write_to(&mut out);
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        let _ = tcp.write_all(&out).await;
        let _ = tcp.shutdown().await;
    })
    .await;
}

fn session_id() -> String {
    use rand::Rng;
    const ALPHABET: &[u8] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";
    let mut rng = rand::thread_rng();
    (0..12)
        .map(|_| ALPHABET[rng.gen_range(0..32)] as char)
        .collect()
}

/// Is the client sending before it was greeted? Waits up to `delay` for
/// a byte (peeked, not consumed); with no delay only checks what arrived.
async fn talks_first(tcp: &TcpStream, delay: Duration) -> bool {
    let mut probe = [0u8; 1];
    if delay.is_zero() {
        return matches!(tcp.try_read(&mut probe), Ok(n) if n > 0);
    }
    matches!(tokio::time::timeout(delay, tcp.peek(&mut probe)).await, Ok(Ok(n)) if n > 0)
}

/// One client connection from accept to close. The conversation is built
/// where it is handed over, so this future never holds it beside the
/// session that owns it (an idle connection's memory is mostly this future).
async fn handle(shared: Arc<Shared>, info: Arc<ListenerInfo>, tcp: TcpStream, peer: SocketAddr) {
    let conv = || Conversation::new(session_id(), peer, info.clone(), shared.clone());
    if let (TlsMode::Implicit, Some(acceptor)) = (info.mode, &info.acceptor) {
        // Boxed here and below: TLS state is large, and the future of a
        // plain session should not reserve room for it.
        Box::pin(tls_session(acceptor.clone(), tcp, conv(), true)).await;
        return;
    }
    if talks_first(&tcp, shared.config.smtp.greeting_delay).await {
        Box::pin(refuse_early_talker(tcp, conv())).await;
        return;
    }
    // Greet, then wait for the client's first bytes before building the
    // session: a client that connects and stays silent costs only this
    // small future, not a session, buffers and all.
    let mut tcp = tcp;
    let greeted = greet_and_wait(&mut tcp, &shared).await;
    let mut conv = conv();
    match greeted {
        Ok(sent) => conv.bytes_out += sent,
        Err(why) => {
            conv.end = why;
            closed(&conv);
            return;
        }
    }
    match Box::pin(Session::new(tcp, conv).run()).await {
        Outcome::Closed(conv) => closed(&conv),
        Outcome::StartTls(tcp, conv) => match info.acceptor.clone() {
            Some(acceptor) => Box::pin(tls_session(acceptor, tcp, conv, false)).await,
            None => closed(&conv),
        },
    }
}

/// Sends the greeting and waits until the client sends something (or
/// closes). Idle past `command_timeout`, or at shutdown, the client is
/// told 421 here, as a session would tell it.
async fn greet_and_wait(tcp: &mut TcpStream, shared: &Shared) -> Result<u64, &'static str> {
    let host = &shared.config.hostname;
    let mut out = Vec::new();
    replies::greeting(host).write_to(&mut out);
    if tcp.write_all(&out).await.is_err() {
        return Err("client_gone");
    }
    let sent = out.len() as u64;
    drop(out);
    let timeout = shared.config.limits.command_timeout;
    let waited = tokio::select! {
        r = tokio::time::timeout(timeout, tcp.readable()) => match r {
            Ok(Ok(())) => return Ok(sent),
            Ok(Err(_)) => return Err("client_gone"),
            Err(_) => (replies::timeout(host), "timeout"),
        },
        _ = shared.shutdown.cancelled() => (replies::shutting_down(host), "shutdown"),
    };
    let (reply, why) = waited;
    let mut out = Vec::new();
    reply.write_to(&mut out);
    let _ = tokio::time::timeout(Duration::from_secs(5), tcp.write_all(&out)).await;
    Err(why)
}

/// Binds with an explicit accept backlog. A burst of connections beyond the
/// backlog is not refused but silently lost: with SYN cookies the client
/// believes it is connected and waits for a greeting that never comes.
fn bind_listener(addr: SocketAddr, backlog: u32) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(backlog)
}

/// The end of a session: its summary line and its count.
fn closed(conv: &Conversation) {
    conv.log_summary();
    conv.shared.metrics.session_closed(
        &conv.listener.name,
        crate::metrics::tls_label(conv.tls.as_ref()),
        conv.end,
    );
}

async fn refuse_early_talker(mut tcp: TcpStream, mut conv: Conversation) {
    tracing::warn!(session = %conv.id, client = %conv.peer, "early talker refused");
    conv.shared.metrics.early_talker(&conv.listener.name);
    let mut out = Vec::new();
    replies::early_talker().write_to(&mut out);
    let _ = tokio::time::timeout(Duration::from_secs(5), tcp.write_all(&out)).await;
    conv.end = "early_talker";
    closed(&conv);
}

/// Handshake, then a session inside TLS. After STARTTLS there is no new
/// greeting (RFC 3207): the client starts again with EHLO.
async fn tls_session(
    acceptor: TlsAcceptor,
    tcp: TcpStream,
    mut conv: Conversation,
    implicit: bool,
) {
    let handshake_timeout = conv.shared.config.limits.tls_handshake_timeout;
    match tokio::time::timeout(handshake_timeout, acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => {
            conv.tls = TlsInfo::from_connection(tls.get_ref().1).map(|mut info| {
                info.end_point = conv
                    .listener
                    .certs
                    .as_ref()
                    .and_then(|c| policy::ntlm::tls_server_end_point(&c.leaf()));
                info
            });
            let session = Session::new(tls, conv);
            let outcome = if implicit {
                session.greet_and_run().await
            } else {
                session.run().await
            };
            finish(outcome);
        }
        Ok(Err(e)) => {
            conv.end = "tls_handshake_failed";
            tracing::info!(session = %conv.id, client = %conv.peer, error = %e, "TLS handshake failed");
            let m = &conv.shared.metrics;
            m.tls_handshake_failed(&conv.listener.name, TlsFailure::Error);
            closed(&conv);
        }
        Err(_) => {
            conv.end = "tls_handshake_timeout";
            tracing::info!(session = %conv.id, client = %conv.peer, "TLS handshake timed out");
            let m = &conv.shared.metrics;
            m.tls_handshake_failed(&conv.listener.name, TlsFailure::Timeout);
            closed(&conv);
        }
    }
}

fn finish<S>(outcome: Outcome<S>) {
    match outcome {
        Outcome::Closed(conv) | Outcome::StartTls(_, conv) => closed(&conv),
    }
}
