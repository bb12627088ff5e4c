//! The HTTP listener on `telemetry.listen`: `/metrics` (Prometheus text),
//! `/healthz`, `/readyz`, and the live dashboard's routes
//! ([`crate::web::dashboard`]) merged onto the same listener.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::telemetry::{prometheus, Health, UPTIME};

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
    serve_with(addr, health, None, shutdown).await
}

/// As [`serve`], with the routes of `dashboard` (see [`crate::web::dashboard`])
/// on the same listener. The telemetry routes stay open whatever the
/// dashboard's access rule: scrapers and health checks carry no token.
pub async fn serve_with(
    addr: SocketAddr,
    health: Arc<Health>,
    dashboard: Option<Router>,
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
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    if with_dashboard {
        info!(address = %bound, "serving the dashboard at /, /metrics, /healthz and /readyz");
    } else {
        info!(address = %bound, "serving /metrics, /healthz and /readyz");
    }
    tokio::spawn(async move {
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await;
    });
    Ok(bound)
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
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n").map_err(|e| e.to_string())?;
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
