//! The HTTP listener on `telemetry.listen`: `/metrics` (Prometheus text),
//! `/healthz`, `/readyz`, and the live dashboard's routes
//! ([`crate::web::dashboard`]) merged onto the same listener.
//!
//! The listener runs on a thread and runtime of its own, at a lower
//! scheduling priority than the pipeline: thousands of open pages waking at
//! once for a new packet, or a flood of connections, are served with what
//! the pipeline leaves, never on the runtime that delivers packets.
//! Connections are bounded ([`Limits::max_connections`]; one more is answered
//! 503 and closed), a request's headers must arrive within
//! [`Limits::header_timeout`] (which also closes connections idle between
//! requests), and a connection lives at most [`MAX_CONNECTION_AGE`].

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::telemetry::{self, prometheus, Health, UPTIME};

/// A connection older than this is closed once its current response is sent
/// (a page reconnects at once); one whose response does not drain within
/// [`CLOSE_GRACE`] after that is dropped. Bounds what a client that never
/// reads its response can hold.
pub const MAX_CONNECTION_AGE: Duration = Duration::from_secs(300);
const CLOSE_GRACE: Duration = Duration::from_secs(35);

/// What one listener accepts.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Connections served at once; more are answered 503 and closed.
    pub max_connections: usize,
    /// Time a client has to send a request's headers, counted from the
    /// connection (or the previous response) on.
    pub header_timeout: Duration,
}

impl Limits {
    pub fn of(settings: &telemetry::TelemetrySettings) -> Limits {
        Limits {
            max_connections: settings.max_connections,
            header_timeout: settings.header_timeout,
        }
    }
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_connections: 4096,
            header_timeout: Duration::from_secs(10),
        }
    }
}

#[derive(Clone)]
struct AppState {
    health: Arc<Health>,
    prometheus: PrometheusHandle,
    started: Instant,
}

/// Serves `/metrics`, `/healthz` and `/readyz` until `shutdown` is cancelled.
/// Returns the bound address (useful with port 0).
pub async fn serve(
    addr: SocketAddr,
    health: Arc<Health>,
    shutdown: CancellationToken,
) -> std::io::Result<SocketAddr> {
    serve_with(addr, health, None, Limits::default(), shutdown).await
}

/// As [`serve`], with the routes of `dashboard` (see [`crate::web::dashboard`])
/// on the same listener. The telemetry routes stay open whatever the
/// dashboard's access rule: scrapers and health checks carry no token.
pub async fn serve_with(
    addr: SocketAddr,
    health: Arc<Health>,
    dashboard: Option<Router>,
    limits: Limits,
    shutdown: CancellationToken,
) -> std::io::Result<SocketAddr> {
    let state = AppState {
        health,
        prometheus: prometheus(),
        started: Instant::now(),
    };
    let app = Router::new()
        .route("/metrics", get(metrics_page))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(state);
    let with_dashboard = dashboard.is_some();
    let app = match dashboard {
        Some(routes) => app.merge(routes),
        None => app,
    };
    // Bound here, so that a taken port is this call's error.
    let listener = std::net::TcpListener::bind(addr)?;
    listener.set_nonblocking(true)?;
    let bound = listener.local_addr()?;
    let limits = Limits {
        max_connections: within_file_limit(limits.max_connections),
        ..limits
    };
    if with_dashboard {
        info!(address = %bound, max_connections = limits.max_connections, "serving the dashboard at /, /metrics, /healthz and /readyz");
    } else {
        info!(address = %bound, max_connections = limits.max_connections, "serving /metrics, /healthz and /readyz");
    }
    std::thread::Builder::new()
        .name("http".into())
        .spawn(move || {
            lower_priority();
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime for the HTTP listener");
            runtime.block_on(async move {
                match tokio::net::TcpListener::from_std(listener) {
                    Ok(listener) => accept_loop(listener, app, limits, shutdown).await,
                    Err(e) => warn!(error = %e, "the HTTP listener cannot start"),
                }
            });
        })?;
    Ok(bound)
}

async fn accept_loop(
    listener: tokio::net::TcpListener,
    app: Router,
    limits: Limits,
    shutdown: CancellationToken,
) {
    let open = Arc::new(AtomicUsize::new(0));
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_buf_size(64 * 1024);
    let builder = Arc::new(builder);
    loop {
        let stream = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors, mostly: wait for some to close.
                    warn!(error = %e, "the HTTP listener cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        if open.load(Ordering::Relaxed) >= limits.max_connections {
            metrics::counter!(telemetry::HTTP_REFUSED).increment(1);
            // Best effort: the request is not read, the socket is closed.
            let _ = stream.try_write(
                b"HTTP/1.1 503 Service Unavailable\r\nconnection: close\r\ncontent-length: 24\r\n\r\ntoo many connections now",
            );
            continue;
        }
        let _ = stream.set_nodelay(true);
        open.fetch_add(1, Ordering::Relaxed);
        metrics::gauge!(telemetry::HTTP_CONNECTIONS).increment(1.0);
        let guard = OpenConnection(open.clone());
        let service = TowerToHyperService::new(app.clone());
        let builder = builder.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let _guard = guard;
            let conn = builder.serve_connection(TokioIo::new(stream), service);
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => return,
                _ = tokio::time::sleep(MAX_CONNECTION_AGE) => {}
                _ = shutdown.cancelled() => {}
            }
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(CLOSE_GRACE, conn).await;
        });
    }
}

struct OpenConnection(Arc<AtomicUsize>);

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
        metrics::gauge!(telemetry::HTTP_CONNECTIONS).decrement(1.0);
    }
}

/// The HTTP thread yields to the pipeline's threads when both want the CPU.
fn lower_priority() {
    // SAFETY: setpriority on this thread's own id; no memory is shared.
    unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        libc::setpriority(libc::PRIO_PROCESS, tid, 10);
    }
}

/// Connections need file descriptors, which the Kafka clients need too: the
/// soft limit is raised to the hard one, and the connection limit kept
/// below what remains after a reserve for the rest of the process.
fn within_file_limit(wanted: usize) -> usize {
    const RESERVE: usize = 512;
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: get/setrlimit with a valid pointer to a local struct.
    let available = unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return wanted;
        }
        if limit.rlim_cur < limit.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: limit.rlim_max,
                rlim_max: limit.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                limit.rlim_cur = limit.rlim_max;
            }
        }
        usize::try_from(limit.rlim_cur).unwrap_or(usize::MAX)
    };
    let allowed = available.saturating_sub(RESERVE).max(16);
    if wanted > allowed {
        warn!(
            "telemetry.max_connections is {wanted}, but the file descriptor limit ({available}) leaves room for {allowed}; serving at most {allowed}"
        );
        allowed
    } else {
        wanted
    }
}

async fn metrics_page(State(s): State<AppState>) -> String {
    metrics::gauge!(UPTIME).set(s.started.elapsed().as_secs_f64());
    s.prometheus.render()
}

async fn healthz(State(s): State<AppState>) -> (StatusCode, &'static str) {
    if s.health.is_alive() {
        (StatusCode::OK, "ok\n")
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "pipeline loop is not running\n",
        )
    }
}

async fn readyz(State(s): State<AppState>) -> (StatusCode, &'static str) {
    if s.health.is_ready() {
        (StatusCode::OK, "ready\n")
    } else if !s.health.is_alive() {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "pipeline loop is not running\n",
        )
    } else if !s.health.log_ok() {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "metrics log cannot be written; retrying\n",
        )
    } else if s.health.assigned() == 0 {
        (StatusCode::SERVICE_UNAVAILABLE, "no partitions assigned\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "brokers not connected\n")
    }
}

/// `login-metrics health`: exits 0 when `/healthz` answers 200. A plain
/// HTTP/1.0 request, so container images need no curl.
pub fn check_health(url: &str) -> Result<(), String> {
    use std::io::{Read, Write};
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| format!("{url}: only http:// URLs are supported"))?;
    let (host, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/healthz"),
    };
    let addr = std::net::ToSocketAddrs::to_socket_addrs(host)
        .map_err(|e| format!("{host}: {e}"))?
        .next()
        .ok_or_else(|| format!("{host}: no address"))?;
    let mut stream = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(3))
        .map_err(|e| format!("{addr}: {e}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(3))).ok();
    // One write: a listener may answer and close after the first segment.
    let request = format!("GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n");
    stream
        .write_all(request.as_bytes())
        .map_err(|e| e.to_string())?;
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .map_err(|e| e.to_string())?;
    let status = response.lines().next().unwrap_or_default();
    if status.split_whitespace().nth(1) == Some("200") {
        Ok(())
    } else {
        Err(format!("{url}: {status}"))
    }
}
