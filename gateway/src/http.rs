//! The operations endpoint: Prometheus metrics, liveness and readiness,
//! over HTTP/1.1 (hyper) on a listener of its own.
//!
//! | path       | answer |
//! |------------|--------|
//! | `/metrics` | every metric, Prometheus text format 0.0.4 |
//! | `/healthz` | `200 ok` while the process serves requests |
//! | `/readyz`  | `200 ready` when the SMTP listeners accept, the configuration and policy are loaded, and a backend server answered a recent check; `503` with the reason otherwise (so Kubernetes stops sending mail to a gateway whose backend is gone, or that is draining) |
//!
//! Anything else is `404`; methods other than GET and HEAD get `405`.
//! The endpoint has its own connection limit and timeouts, so a scraper
//! gone wrong cannot take anything from the SMTP side.
//!
//! Readiness is fed by a probe task started with [`serve`]: every
//! `probe_interval` it checks each backend server that did not answer a
//! real transaction in the meantime (see [`crate::backend::Backend::probe_all`]).

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{HeaderValue, ALLOW, CACHE_CONTROL, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::Deserialize;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::server::Shared;

/// `metrics:` in the configuration.
///
/// ```yaml
/// metrics:
///   address: 127.0.0.1:9100     # 0.0.0.0:9100 in a container
///   probe_interval: 5s          # backend check for /readyz
///   max_connections: 64
///   header_timeout: 5s          # to receive a request's headers
///   connection_timeout: 30s     # whole connection, keep-alive included
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    pub address: SocketAddr,
    #[serde(with = "humantime_serde")]
    pub probe_interval: Duration,
    pub max_connections: usize,
    #[serde(with = "humantime_serde")]
    pub header_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub connection_timeout: Duration,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            address: SocketAddr::from(([127, 0, 0, 1], 9100)),
            probe_interval: Duration::from_secs(5),
            max_connections: 64,
            header_timeout: Duration::from_secs(5),
            connection_timeout: Duration::from_secs(30),
        }
    }
}

impl MetricsConfig {
    /// Checks the values. The error is `(field, message)` for the
    /// configuration's located errors.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if self.probe_interval < Duration::from_millis(100) {
            return Err(("metrics.probe_interval", "must be at least 100ms".into()));
        }
        if self.max_connections == 0 {
            return Err(("metrics.max_connections", "must be at least 1".into()));
        }
        if self.header_timeout.is_zero() {
            return Err(("metrics.header_timeout", "must be more than 0".into()));
        }
        if self.connection_timeout < self.header_timeout {
            return Err((
                "metrics.connection_timeout",
                "must be at least metrics.header_timeout".into(),
            ));
        }
        Ok(())
    }
}

/// The listener name in logs: `{"message":"listening","listener":"metrics",…}`.
pub const LISTENER_NAME: &str = "metrics";

/// Binds the metrics listener and logs its address like the SMTP
/// listeners (`listening`, `listener = "metrics"`), so port 0 works.
pub async fn bind(config: &MetricsConfig) -> io::Result<TcpListener> {
    let listener = TcpListener::bind(config.address).await.map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("metrics listener: cannot bind {}: {e}", config.address),
        )
    })?;
    let address = listener.local_addr()?;
    tracing::info!(listener = LISTENER_NAME, address = %address, "listening");
    Ok(listener)
}

/// Serves `/metrics`, `/healthz` and `/readyz` on `listener` and runs the
/// backend probe, until `shutdown` is cancelled (then no new connection
/// is accepted; requests in flight finish within their timeout).
///
/// Readiness turns 503 as soon as `shared.shutdown` is cancelled, so pass
/// a separate token here if metrics should stay scrapable while the SMTP
/// side drains.
pub async fn serve(
    listener: TcpListener,
    shared: Arc<Shared>,
    config: MetricsConfig,
    shutdown: CancellationToken,
) {
    let probe = tokio::spawn(probe_loop(
        shared.clone(),
        config.probe_interval,
        shutdown.clone(),
    ));
    let limit = Arc::new(Semaphore::new(config.max_connections));
    let config = Arc::new(config);
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = shutdown.cancelled() => break,
        };
        let (tcp, _peer) = match accepted {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(listener = LISTENER_NAME, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            // Over the limit: close at once rather than queue.
            tracing::debug!(listener = LISTENER_NAME, "connection limit reached");
            drop(tcp);
            continue;
        };
        let shared = shared.clone();
        let config = config.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let svc_config = config.clone();
            let service = service_fn(move |req| {
                let resp = respond(&shared, &svc_config, &req);
                async move { Ok::<_, Infallible>(resp) }
            });
            let mut builder = http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(config.header_timeout)
                .max_buf_size(16 * 1024);
            let conn = builder.serve_connection(TokioIo::new(tcp), service);
            let mut conn = std::pin::pin!(conn);
            let deadline = tokio::time::sleep(config.connection_timeout);
            let mut deadline = std::pin::pin!(deadline);
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = deadline.as_mut() => {}
                _ = shutdown.cancelled() => {
                    // Finish the request in flight, then close.
                    conn.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(Duration::from_secs(1), conn).await;
                }
            }
            drop(permit);
        });
    }
    probe.abort();
}

/// Checks the backend every `interval` until `shutdown`.
async fn probe_loop(shared: Arc<Shared>, interval: Duration, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            _ = shared.backend.probe_all(interval) => {}
            _ = shutdown.cancelled() => return,
        }
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = shutdown.cancelled() => return,
        }
    }
}

/// Why the gateway is not ready, or `Ok`.
pub fn readiness(shared: &Shared, config: &MetricsConfig) -> Result<(), &'static str> {
    if shared.shutdown.is_cancelled() {
        return Err("shutting down");
    }
    if !shared.metrics.is_accepting() {
        return Err("listeners not accepting yet");
    }
    // Three probe rounds, plus one slow connect, without a good answer.
    let max_age = config.probe_interval * 3 + shared.backend.connect_timeout();
    if !shared.backend.reachable(max_age) {
        return Err("no backend server reachable");
    }
    Ok(())
}

fn text(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(body.into()));
    *resp.status_mut() = status;
    let headers = resp.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

const PLAIN: &str = "text/plain; charset=utf-8";

/// The whole routing table.
fn respond<B>(shared: &Shared, config: &MetricsConfig, req: &Request<B>) -> Response<Full<Bytes>> {
    let resp = match (req.method(), req.uri().path()) {
        (&Method::GET | &Method::HEAD, "/metrics") => text(
            StatusCode::OK,
            crate::metrics::CONTENT_TYPE,
            shared.metrics.render(),
        ),
        (&Method::GET | &Method::HEAD, "/healthz") => text(StatusCode::OK, PLAIN, "ok\n"),
        (&Method::GET | &Method::HEAD, "/readyz") => match readiness(shared, config) {
            Ok(()) => text(StatusCode::OK, PLAIN, "ready\n"),
            Err(why) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                PLAIN,
                format!("not ready: {why}\n"),
            ),
        },
        (_, "/metrics" | "/healthz" | "/readyz") => {
            let mut r = text(
                StatusCode::METHOD_NOT_ALLOWED,
                PLAIN,
                "method not allowed\n",
            );
            r.headers_mut()
                .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
            r
        }
        _ => text(StatusCode::NOT_FOUND, PLAIN, "not found\n"),
    };
    if req.method() == Method::HEAD {
        let (parts, _) = resp.into_parts();
        return Response::from_parts(parts, Full::new(Bytes::new()));
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    /// A backend that greets, answers EHLO and QUIT, and can be stopped.
    async fn fake_backend(listener: TcpListener, stop: CancellationToken) {
        loop {
            let (mut s, _) = tokio::select! {
                r = listener.accept() => match r { Ok(x) => x, Err(_) => return },
                _ = stop.cancelled() => return,
            };
            tokio::spawn(async move {
                let _ = s.write_all(b"220 fake ESMTP\r\n").await;
                let mut buf = vec![0u8; 1024];
                loop {
                    let n = match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => n,
                    };
                    let line = String::from_utf8_lossy(&buf[..n]).to_ascii_uppercase();
                    if line.starts_with("QUIT") {
                        let _ = s.write_all(b"221 bye\r\n").await;
                        return;
                    }
                    let _ = s.write_all(b"250 fake\r\n").await;
                }
            });
        }
    }

    async fn get(addr: SocketAddr, method: &str, path: &str) -> (u16, String) {
        let mut s = TcpStream::connect(addr).await.unwrap();
        let req = format!("{method} {path} HTTP/1.0\r\nHost: x\r\n\r\n");
        s.write_all(req.as_bytes()).await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        let status = out
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let body = out.split_once("\r\n\r\n").map(|(_, b)| b.to_string());
        (status, body.unwrap_or_default())
    }

    struct Setup {
        http: SocketAddr,
        shared: Arc<Shared>,
        stop_backend: CancellationToken,
        backend_addr: SocketAddr,
        stop_http: CancellationToken,
    }

    async fn setup() -> Setup {
        let backend = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let backend_addr = backend.local_addr().unwrap();
        let stop_backend = CancellationToken::new();
        tokio::spawn(fake_backend(backend, stop_backend.clone()));
        let yaml = format!(
            "listeners:\n  - name: smtp\n    address: 127.0.0.1:0\n\
             backend:\n  servers: [\"{backend_addr}\"]\n  timeouts:\n    connect: 1s\n\
             policy:\n  local_domains: [example.test]\n"
        );
        let config = crate::config::Config::from_yaml(&yaml, "test.yaml").unwrap();
        let server = crate::server::Server::bind(config).await.unwrap();
        let shared = server.shared.clone();
        tokio::spawn(server.run());
        let mconfig = MetricsConfig {
            address: "127.0.0.1:0".parse().unwrap(),
            probe_interval: Duration::from_millis(100),
            max_connections: 4,
            header_timeout: Duration::from_millis(500),
            connection_timeout: Duration::from_secs(2),
        };
        let listener = bind(&mconfig).await.unwrap();
        let http = listener.local_addr().unwrap();
        let stop_http = CancellationToken::new();
        tokio::spawn(serve(listener, shared.clone(), mconfig, stop_http.clone()));
        Setup {
            http,
            shared,
            stop_backend,
            backend_addr,
            stop_http,
        }
    }

    async fn wait_status(addr: SocketAddr, path: &str, want: u16) -> String {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let (status, body) = get(addr, "GET", path).await;
            if status == want {
                return body;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{path}: still {status} {body:?}, want {want}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test]
    async fn routes_methods_and_readiness() {
        let s = setup().await;
        assert_eq!(get(s.http, "GET", "/healthz").await, (200, "ok\n".into()));
        let (status, body) = get(s.http, "GET", "/metrics").await;
        assert_eq!(status, 200);
        assert!(body.contains("relayguard_build_info{version="), "{body}");
        assert!(body.contains("relayguard_connections_accepted_total{listener=\"smtp\"} 0"));
        assert_eq!(get(s.http, "GET", "/nope").await.0, 404);
        assert_eq!(get(s.http, "POST", "/metrics").await.0, 405);
        assert_eq!(get(s.http, "DELETE", "/readyz").await.0, 405);
        assert_eq!(get(s.http, "HEAD", "/metrics").await, (200, String::new()));

        // The probe finds the backend: ready.
        assert_eq!(wait_status(s.http, "/readyz", 200).await, "ready\n");
        let (_, metrics) = get(s.http, "GET", "/metrics").await;
        let up = format!("relayguard_backend_up{{server=\"{}\"}} 1", s.backend_addr);
        assert!(metrics.contains(&up), "{metrics}");

        // The backend goes away: not ready, and it says why.
        s.stop_backend.cancel();
        let why = wait_status(s.http, "/readyz", 503).await;
        assert_eq!(why, "not ready: no backend server reachable\n");

        // A backend on the same address again: ready again.
        let again = TcpListener::bind(s.backend_addr).await.unwrap();
        tokio::spawn(fake_backend(again, CancellationToken::new()));
        wait_status(s.http, "/readyz", 200).await;

        // Shutdown: not ready at once, liveness unaffected.
        s.shared.shutdown.cancel();
        assert_eq!(
            get(s.http, "GET", "/readyz").await,
            (503, "not ready: shutting down\n".into())
        );
        assert_eq!(get(s.http, "GET", "/healthz").await.0, 200);
        s.stop_http.cancel();
    }

    #[tokio::test]
    async fn slow_headers_time_out_and_the_limit_holds() {
        let s = setup().await;
        // Four silent connections take every slot …
        let mut idle = Vec::new();
        for _ in 0..4 {
            idle.push(TcpStream::connect(s.http).await.unwrap());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        // … so a fifth is closed without an answer …
        let mut fifth = TcpStream::connect(s.http).await.unwrap();
        let _ = fifth.write_all(b"GET /healthz HTTP/1.0\r\n\r\n").await;
        let mut out = Vec::new();
        let _ = fifth.read_to_end(&mut out).await;
        assert!(out.is_empty(), "{}", String::from_utf8_lossy(&out));
        // … until the header timeout closes the silent ones.
        for mut c in idle {
            let mut out = Vec::new();
            let r = tokio::time::timeout(Duration::from_secs(5), c.read_to_end(&mut out)).await;
            assert!(r.is_ok(), "a silent connection was not closed");
        }
        assert_eq!(wait_status(s.http, "/healthz", 200).await, "ok\n");
    }

    #[test]
    fn config_defaults_and_validation() {
        let c: MetricsConfig = serde_norway::from_str("{}").unwrap();
        assert_eq!(c, MetricsConfig::default());
        assert_eq!(c.address.to_string(), "127.0.0.1:9100");
        let c: MetricsConfig =
            serde_norway::from_str("address: 0.0.0.0:9100\nprobe_interval: 1s\n").unwrap();
        assert_eq!(c.probe_interval, Duration::from_secs(1));
        c.validate().unwrap();
        assert!(serde_norway::from_str::<MetricsConfig>("adress: 0.0.0.0:1\n").is_err());
        let c: MetricsConfig = serde_norway::from_str("max_connections: 0\n").unwrap();
        assert_eq!(c.validate().unwrap_err().0, "metrics.max_connections");
    }
}
