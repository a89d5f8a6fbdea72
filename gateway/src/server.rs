//! Listeners, connection admission and graceful shutdown.
//!
//! Everything is validated and every port bound before the first
//! connection is accepted, so a bad configuration never half-starts.
//!
//! A plain connection: accepted and admitted, greeted (by the accept loop
//! itself when nothing can make that wait), parked in the listener's
//! [`Idle`] parker until its client speaks, then a session task of its own.
//! With `greeting_delay` or the PROXY protocol a connection starts in a task
//! (`handle`) and is parked after its greeting too; an implicit-TLS one
//! keeps its task throughout.

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
use crate::idle::{Idle, Woke};
use crate::metrics::{ActiveConnection, ConnectionRefusal, Metrics, TlsFailure};
use crate::session::{replies, Conversation, Outcome, Session};
use crate::shards::Shards;
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
    /// The `220` greeting, written once: every plain connection sends it.
    greeting: Box<[u8]>,
}

impl Shared {
    /// What every session shares, from the parts the server (or a unit
    /// test) built: the connection limits, rates and greeting follow from
    /// the configuration.
    fn new(
        config: Arc<Config>,
        policy: Policy,
        backend: Arc<Backend>,
        auth: Option<Arc<crate::auth::Authenticator>>,
        metrics: Arc<Metrics>,
        audit: crate::audit::AuditLog,
        listener_certs: Vec<Arc<CertStore>>,
    ) -> Arc<Shared> {
        let limits = ConnectionLimits {
            total: Arc::new(Semaphore::new(config.limits.max_connections)),
            per_ip: Arc::new(Mutex::new(HashMap::new())),
            max_per_ip: config.limits.max_connections_per_ip,
        };
        let mut greeting = Vec::new();
        replies::greeting(&config.hostname).write_to(&mut greeting);
        Arc::new(Shared {
            greeting: greeting.into_boxed_slice(),
            listener_certs,
            rates: RateLimiter::with_capacity(
                100_000,
                policy.longest_window().unwrap_or(Duration::from_secs(3600)),
            ),
            policy: ArcSwap::from_pointee(policy),
            config,
            backend,
            auth,
            shutdown: CancellationToken::new(),
            metrics,
            audit,
            limits,
        })
    }

    /// The certificate stores of the TLS listeners (for reload).
    pub fn listener_certs(&self) -> &[Arc<CertStore>] {
        &self.listener_certs
    }
}

#[cfg(test)]
impl Shared {
    /// What [`Server::bind_with_policy`] shares with sessions, from
    /// configuration text, but with no port bound and no connection
    /// threads started: unit tests run a [`Session`] over an in-memory
    /// stream against it. Also returns the listeners a session may belong
    /// to. TLS listeners are refused because no acceptor is built here.
    pub(crate) fn for_tests(yaml: &str) -> (Arc<Shared>, Vec<Arc<ListenerInfo>>) {
        let config = Config::from_yaml(yaml, "test.yaml").expect("test configuration");
        let policy = crate::policy_source::load(&config).expect("test policy");
        let config = Arc::new(config);
        let metrics = Arc::new(Metrics::new());
        metrics.set_connection_limit(config.limits.max_connections);
        let audit =
            crate::audit::AuditLog::open(&config.audit, metrics.clone()).expect("audit sink");
        let backend = Backend::new(&config.backend, config.helo_name(), metrics.clone(), 1)
            .expect("backend client");
        let auth = config
            .auth
            .as_ref()
            .map(|a| crate::auth::Authenticator::new(a).expect("test auth"));
        for m in auth.iter().flat_map(|a| a.mechanisms()) {
            metrics.init_auth_mechanism(*m);
        }
        let listeners = config
            .listeners
            .iter()
            .map(|l| {
                assert_eq!(l.tls, TlsMode::None, "no TLS in Shared::for_tests");
                metrics.init_listener(&l.name, false);
                Arc::new(ListenerInfo {
                    name: l.name.clone(),
                    require_tls_for_auth: l.require_tls_for_auth,
                    mode: l.tls,
                    acceptor: None,
                    certs: None,
                    proxy: l.proxy_protocol.then(|| l.trusted_proxies.clone()),
                })
            })
            .collect();
        let shared = Shared::new(config, policy, backend, auth, metrics, audit, Vec::new());
        (shared, listeners)
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
    #[error("cannot start the connection threads: {0}")]
    Threads(std::io::Error),
}

/// Caps on concurrent connections, in total and per client address.
struct ConnectionLimits {
    total: Arc<Semaphore>,
    per_ip: Arc<Mutex<HashMap<IpAddr, usize>>>,
    max_per_ip: usize,
}

/// What an admitted connection holds until it closes: its place under the
/// connection limits and in the `connections active` gauge.
struct Held {
    _admission: Admission,
    _active: ActiveConnection,
}

/// A greeted connection waiting in its listener's parker for its client's
/// first command (see [`crate::idle`]).
struct Greeted {
    peer: SocketAddr,
    held: Held,
}

type Parker = Idle<Greeted>;

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
    /// Each listener's socket, one descriptor per shard.
    listeners: Vec<(Arc<ListenerInfo>, Vec<std::net::TcpListener>)>,
    shards: Shards,
    tracker: TaskTracker,
}

impl Server {
    /// Loads the relay policy, certificates, builds the backend client and
    /// binds every listener. Nothing is accepted yet.
    pub async fn bind(config: Config) -> Result<Server, StartError> {
        let policy = crate::policy_source::load(&config).map_err(StartError::Policy)?;
        Server::bind_with_policy(config, policy).await
    }

    /// As [`Server::bind`], with the relay policy already loaded from
    /// `config` (by [`Config::load`]), so that it is not read again.
    pub async fn bind_with_policy(config: Config, policy: Policy) -> Result<Server, StartError> {
        let config = Arc::new(config);
        let metrics = Arc::new(Metrics::with_shards(config.shard_count()));
        metrics.set_connection_limit(config.limits.max_connections);
        let audit = crate::audit::AuditLog::open(&config.audit, metrics.clone())
            .map_err(StartError::Audit)?;
        let shards = Shards::start(config.shard_count()).map_err(StartError::Threads)?;
        let backend = Backend::new(
            &config.backend,
            config.helo_name(),
            metrics.clone(),
            shards.len(),
        )
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
            let tcp = bind_listener(l.address, config.limits.listen_backlog, shards.len())
                .map_err(|source| StartError::Bind {
                    name: l.name.clone(),
                    addr: l.address,
                    source,
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
        let listener_certs = listeners
            .iter()
            .filter_map(|(i, _)| i.certs.clone())
            .collect();
        let shared = Shared::new(
            config,
            policy,
            backend,
            auth,
            metrics,
            audit,
            listener_certs,
        );
        Ok(Server {
            shared,
            listeners,
            shards,
            tracker: TaskTracker::new(),
        })
    }

    /// The bound address of each listener, by name (useful with port 0).
    pub fn local_addrs(&self) -> Vec<(String, SocketAddr)> {
        self.listeners
            .iter()
            .filter_map(|(info, l)| Some((info.name.clone(), l.first()?.local_addr().ok()?)))
            .collect()
    }

    /// Serves until `shutdown` is cancelled, then drains: idle sessions are
    /// told 421 at once, transactions in flight may finish until the drain
    /// deadline.
    pub async fn run(self) {
        let Server {
            shared,
            listeners,
            shards,
            tracker,
        } = self;
        for (info, sockets) in listeners {
            for (shard, socket) in shards.handles().iter().zip(sockets) {
                let (shared, info, tracker2) = (shared.clone(), info.clone(), tracker.clone());
                tracker.spawn_on(
                    async move {
                        // Registered with the event loop of the shard it runs on.
                        match TcpListener::from_std(socket) {
                            Ok(listener) => accept_loop(shared, info, listener, tracker2).await,
                            Err(e) => {
                                tracing::error!(listener = %info.name, error = %e, "cannot listen")
                            }
                        }
                    },
                    shard,
                );
            }
        }
        for shard in shards.handles() {
            shard.spawn(shared.backend.clone().sweep_pool(shared.shutdown.clone()));
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
    let idle = Idle::start(
        shared.config.limits.command_timeout,
        shared.shutdown.clone(),
        &tracker,
        {
            let (shared, info, tracker) = (shared.clone(), info.clone(), tracker.clone());
            move |tcp, greeted, why| unparked(&shared, &info, &tracker, tcp, greeted, why)
        },
    );
    // Plain SMTP with no greeting delay: greeted right here (see `greet_at_once`).
    let plain_at_once = !(info.mode == TlsMode::Implicit && info.acceptor.is_some())
        && shared.config.smtp.greeting_delay.is_zero();
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
            let idle = idle.clone();
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
                        let held = Held {
                            _admission: admission,
                            _active: shared.metrics.connection_opened(&info.name),
                        };
                        handle(shared, info, idle, tcp, client, held).await;
                    }
                    Err(refusal) => refuse_admission(&shared, &info, tcp, client, refusal),
                }
            });
            continue;
        }
        match shared.limits.admit(peer.ip()) {
            Ok(admission) => {
                let held = Held {
                    _admission: admission,
                    _active: shared.metrics.connection_opened(&info.name),
                };
                if plain_at_once {
                    greet_at_once(&shared, &info, &idle, &tracker, (tcp, peer), held);
                } else {
                    tracker.spawn(handle(
                        shared.clone(),
                        info.clone(),
                        idle.clone(),
                        tcp,
                        peer,
                        held,
                    ));
                }
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
    if delay.is_zero() {
        return talked_already(tcp);
    }
    let mut probe = [0u8; 1];
    matches!(tokio::time::timeout(delay, tcp.peek(&mut probe)).await, Ok(Ok(n)) if n > 0)
}

/// Has the client sent something already? (What it sent is lost: it is
/// refused anyway.)
fn talked_already(tcp: &TcpStream) -> bool {
    matches!(tcp.try_read(&mut [0u8; 1]), Ok(n) if n > 0)
}

/// One client connection from accept to close, or until its greeting,
/// when the listener's parker takes it over. `held` (the connection's place
/// under the limits) is released when the connection closes, wherever.
async fn handle(
    shared: Arc<Shared>,
    info: Arc<ListenerInfo>,
    idle: Parker,
    tcp: TcpStream,
    peer: SocketAddr,
    held: Held,
) {
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
    greet_from(shared, info, idle, tcp, peer, held, 0).await;
}

/// A plain connection greeted without a task of its own, when nothing can
/// make it wait: no greeting delay (the early-talker check only looks at
/// what arrived), and the greeting fits in the new socket's buffer. A
/// silent client then goes straight to the parker. Otherwise a task
/// carries on where this stopped.
fn greet_at_once(
    shared: &Arc<Shared>,
    info: &Arc<ListenerInfo>,
    idle: &Parker,
    tracker: &TaskTracker,
    (tcp, peer): (TcpStream, SocketAddr),
    held: Held,
) {
    let (shared, info) = (shared.clone(), info.clone());
    if talked_already(&tcp) {
        let conv = Conversation::new(session_id(), peer, info, shared);
        tracker.spawn(async move {
            refuse_early_talker(tcp, conv).await;
            drop(held);
        });
        return;
    }
    // Would block or failed: the task tries again and finds out which.
    let sent = tcp.try_write(&shared.greeting).unwrap_or(0);
    let (tcp, held) = if sent == shared.greeting.len() {
        match idle.park(tcp, Greeted { peer, held }) {
            Ok(()) => return,
            Err((tcp, greeted)) => (tcp, greeted.held),
        }
    } else {
        (tcp, held)
    };
    tracker.spawn(greet_from(
        shared,
        info,
        idle.clone(),
        tcp,
        peer,
        held,
        sent,
    ));
}

/// Sends the greeting (from byte `from` on: the rest of it), then parks the
/// connection until its client speaks, or waits in this task when the
/// parker does not take it.
async fn greet_from(
    shared: Arc<Shared>,
    info: Arc<ListenerInfo>,
    idle: Parker,
    mut tcp: TcpStream,
    peer: SocketAddr,
    held: Held,
    from: usize,
) {
    if tcp.write_all(&shared.greeting[from..]).await.is_err() {
        closed_before_session(shared, info, peer, 0, "client_gone");
        return;
    }
    // A client that stays silent waits in the parker, not in a task: it
    // costs a slot there, not this future, a timer and a shutdown waiter.
    let Err((tcp, Greeted { peer, held })) = idle.park(tcp, Greeted { peer, held }) else {
        return;
    };
    // Not parked: the client spoke already, or shutdown began.
    match wait_for_input(&tcp, &shared).await {
        Ok(()) => converse(shared, info, tcp, peer, held).await,
        Err((reply, why)) => Box::pin(hang_up(shared, info, tcp, peer, held, reply, why)).await,
    }
}

/// Waits in this task until the client sends something (or closes), as the
/// parker would. Idle past `command_timeout`, or at shutdown, the reply to
/// send and the reason are returned.
async fn wait_for_input(
    tcp: &TcpStream,
    shared: &Shared,
) -> Result<(), (crate::smtp::reply::Reply, &'static str)> {
    let host = &shared.config.hostname;
    let timeout = shared.config.limits.command_timeout;
    tokio::select! {
        r = tokio::time::timeout(timeout, tcp.readable()) => match r {
            Ok(_) => Ok(()),
            Err(_) => Err((replies::timeout(host), "timeout")),
        },
        _ = shared.shutdown.cancelled() => Err((replies::shutting_down(host), "shutdown")),
    }
}

/// A connection comes back from the parker (on the parker's task, so
/// nothing here waits).
fn unparked(
    shared: &Arc<Shared>,
    info: &Arc<ListenerInfo>,
    tracker: &TaskTracker,
    tcp: TcpStream,
    greeted: Greeted,
    why: Woke,
) {
    let Greeted { peer, held } = greeted;
    let (shared, info) = (shared.clone(), info.clone());
    let host = &shared.config.hostname;
    let (reply, end) = match why {
        Woke::Input => {
            tracker.spawn(converse(shared, info, tcp, peer, held));
            return;
        }
        Woke::Closed => {
            // As a session that reads end-of-file first would end.
            let greeting = shared.greeting.len() as u64;
            closed_before_session(shared, info, peer, greeting, "client_gone");
            return;
        }
        Woke::TimedOut => (replies::timeout(host), "timeout"),
        Woke::Shutdown => (replies::shutting_down(host), "shutdown"),
    };
    tracker.spawn(hang_up(shared, info, tcp, peer, held, reply, end));
}

/// The session proper, once the greeted client has sent something.
async fn converse(
    shared: Arc<Shared>,
    info: Arc<ListenerInfo>,
    tcp: TcpStream,
    peer: SocketAddr,
    held: Held,
) {
    let mut conv = Conversation::new(session_id(), peer, info.clone(), shared.clone());
    conv.bytes_out += shared.greeting.len() as u64;
    match Box::pin(Session::new(tcp, conv).run()).await {
        Outcome::Closed(conv) => closed(&conv),
        Outcome::StartTls(tcp, conv) => match info.acceptor.clone() {
            Some(acceptor) => Box::pin(tls_session(acceptor, tcp, conv, false)).await,
            None => closed(&conv),
        },
    }
    drop(held);
}

/// Tells a greeted client that never spoke why it is closed (timeout or
/// shutdown), then counts the session.
async fn hang_up(
    shared: Arc<Shared>,
    info: Arc<ListenerInfo>,
    mut tcp: TcpStream,
    peer: SocketAddr,
    held: Held,
    reply: crate::smtp::reply::Reply,
    end: &'static str,
) {
    let mut out = Vec::new();
    reply.write_to(&mut out);
    let _ = tokio::time::timeout(Duration::from_secs(5), tcp.write_all(&out)).await;
    let sent = (shared.greeting.len() + out.len()) as u64;
    closed_before_session(shared, info, peer, sent, end);
    drop(held);
}

/// Counts a connection that ended before its client said anything, so
/// before any session: `bytes_out` is what it was sent.
fn closed_before_session(
    shared: Arc<Shared>,
    info: Arc<ListenerInfo>,
    peer: SocketAddr,
    bytes_out: u64,
    end: &'static str,
) {
    let mut conv = Conversation::new(session_id(), peer, info, shared);
    conv.bytes_out += bytes_out;
    conv.end = end;
    closed(&conv);
}

/// Binds a listener: one socket per shard, in one `SO_REUSEPORT` group,
/// so the kernel spreads new connections over the shards with no
/// wake-up of the others. First a plain bind of the address, to fail
/// as before when anything, another RelayGuard included, has the port:
/// a reuse-port group would otherwise let a second instance of the same
/// user join it and take half the connections without a word. Each socket
/// has an explicit accept backlog: a burst of connections beyond it is not
/// refused but silently lost (with SYN cookies the client believes it is
/// connected and waits for a greeting that never comes).
fn bind_listener(
    addr: SocketAddr,
    backlog: u32,
    shards: usize,
) -> std::io::Result<Vec<std::net::TcpListener>> {
    let socket = |reuse_port: bool| -> std::io::Result<tokio::net::TcpSocket> {
        let socket = if addr.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        socket.set_reuseaddr(true)?;
        if reuse_port {
            socket.set_reuseport(true)?;
        }
        Ok(socket)
    };
    let probe = socket(false)?;
    probe.bind(addr)?;
    if shards <= 1 {
        return Ok(vec![probe.listen(backlog)?.into_std()?]);
    }
    // Port 0: the port the kernel chose for the probe.
    let addr = probe.local_addr()?;
    drop(probe);
    (0..shards)
        .map(|_| {
            let s = socket(true)?;
            s.bind(addr)?;
            s.listen(backlog)?.into_std()
        })
        .collect()
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
