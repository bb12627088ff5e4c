//! Telemetry: logging set-up, Prometheus metrics, health and readiness.
//!
//! Metrics are recorded through the `metrics` facade everywhere in the
//! pipeline (a no-op until a recorder is installed) and exposed in Prometheus
//! text format by `metrics-exporter-prometheus` on the `telemetry.listen`
//! address, next to `/healthz` (the pipeline loop is alive) and `/readyz`
//! (connected to the brokers with partitions assigned). The live dashboard
//! ([`crate::dashboard`]) is merged onto the same listener by [`serve_with`].

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::error::KafkaError;
use rdkafka::types::RDKafkaErrorCode;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::event::ErrorKind;
use crate::settings::{LogFormat, LogSettings};

pub const MESSAGES: &str = "login_metrics_messages_consumed_total";
pub const EVENTS_VALID: &str = "login_metrics_events_valid_total";
pub const EVENTS_INVALID: &str = "login_metrics_events_invalid_total";
pub const DEAD_LETTERS: &str = "login_metrics_dead_letters_total";
pub const PACKETS: &str = "login_metrics_packets_published_total";
pub const PACKET_BYTES: &str = "login_metrics_packet_bytes_total";
pub const BATCHES: &str = "login_metrics_batches_total";
pub const BATCH_EVENTS: &str = "login_metrics_batch_events";
pub const ANALYSIS_SECONDS: &str = "login_metrics_batch_analysis_seconds";
pub const DELIVERY_SECONDS: &str = "login_metrics_delivery_seconds";
pub const DELIVERY_FAILURES: &str = "login_metrics_delivery_failures_total";
pub const COMMITS: &str = "login_metrics_offset_commits_total";
pub const COMMIT_FAILURES: &str = "login_metrics_offset_commit_failures_total";
pub const CHECKPOINT_FAILURES: &str = "login_metrics_checkpoint_write_failures_total";
pub const METRICS_LOG_FAILURES: &str = "login_metrics_metrics_log_failures_total";
pub const COMMITTED: &str = "login_metrics_messages_committed_total";
pub const CONSUMER_LAG: &str = "login_metrics_consumer_lag";
pub const UPTIME: &str = "login_metrics_uptime_seconds";
pub const BUILD_INFO: &str = "login_metrics_build_info";
pub const EVENTS_LATE: &str = "login_metrics_events_late_total";
pub const EVENTS_REPLAYED: &str = "login_metrics_events_replayed_total";
pub const WINDOWS_OPEN: &str = "login_metrics_windows_open";
pub const EVENTS_BUFFERED: &str = "login_metrics_window_events_buffered";
pub const PARTITIONS_PAUSED: &str = "login_metrics_partitions_paused";
pub const CONSUMPTION_HELD: &str = "login_metrics_consumption_held";
pub const KAFKA_ERRORS: &str = "login_metrics_kafka_errors_total";
pub const REVOCATIONS_GIVEN_UP: &str = "login_metrics_revocations_given_up_total";
pub const WATERMARK: &str = "login_metrics_watermark_seconds";

/// Counters of one run, shared with whoever watches it.
#[derive(Debug, Default)]
pub struct Progress {
    /// Input messages consumed, valid or not.
    pub messages: AtomicU64,
    pub invalid: AtomicU64,
    invalid_by_kind: [AtomicU64; ErrorKind::ALL.len()],
    /// Window mode: valid events whose windows had all closed.
    pub late: AtomicU64,
    pub packets: AtomicU64,
    pub packet_bytes: AtomicU64,
    /// Messages whose work is delivered and whose offsets are committed.
    pub committed_messages: AtomicU64,
    /// Window mode: windows open now.
    pub open_windows: AtomicU64,
    /// Total consumer lag from the latest librdkafka statistics.
    pub lag: AtomicI64,
    /// When partitions were first assigned (the group join is over).
    pub first_assigned: OnceLock<Instant>,
    /// Revocations that gave up work not delivered and committed in time.
    pub revocations_given_up: AtomicU64,
}

impl Progress {
    pub(crate) fn count_invalid(&self, kind: ErrorKind) {
        self.invalid.fetch_add(1, Ordering::Relaxed);
        if let Some(c) = self.invalid_by_kind.get(kind as usize) {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn invalid_by_kind(&self) -> Vec<(ErrorKind, u64)> {
        ErrorKind::ALL
            .iter()
            .map(|k| {
                (
                    *k,
                    self.invalid_by_kind[*k as usize].load(Ordering::Relaxed),
                )
            })
            .filter(|(_, n)| *n > 0)
            .collect()
    }
}

/// Installs the tracing subscriber. `RUST_LOG`, when set, overrides `log.level`.
pub fn init_logging(log: &LogSettings) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&log.level));
    // Colour codes only for a person at a terminal, never in a file or a
    // container's log.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    let _ = match log.format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Text => builder.with_target(false).try_init(),
    };
}

static RECORDER: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the process-wide Prometheus recorder (once) and returns its handle.
pub fn prometheus() -> PrometheusHandle {
    RECORDER
        .get_or_init(|| {
            let handle = PrometheusBuilder::new()
                .set_buckets(&[
                    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                    30.0,
                ])
                .expect("static buckets are valid")
                .set_buckets_for_metric(
                    Matcher::Full(BATCH_EVENTS.to_string()),
                    &[
                        1.0,
                        10.0,
                        100.0,
                        1_000.0,
                        5_000.0,
                        10_000.0,
                        50_000.0,
                        100_000.0,
                        1_000_000.0,
                    ],
                )
                .expect("static buckets are valid")
                .install_recorder()
                .expect("no other metrics recorder is installed");
            describe();
            metrics::gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
            handle
        })
        .clone()
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!(MESSAGES, "Input messages consumed, valid or not.");
    describe_counter!(EVENTS_VALID, "Valid login events consumed.");
    describe_counter!(EVENTS_INVALID, "Invalid messages, by error kind.");
    describe_counter!(DEAD_LETTERS, "Messages delivered to the dead-letter topic.");
    describe_counter!(PACKETS, "Metric packets delivered to the output topic.");
    describe_counter!(
        PACKET_BYTES,
        Unit::Bytes,
        "Bytes of delivered metric packets (uncompressed JSON)."
    );
    describe_counter!(BATCHES, "Batches closed, by closing reason.");
    describe_histogram!(BATCH_EVENTS, "Valid events per batch.");
    describe_histogram!(
        ANALYSIS_SECONDS,
        Unit::Seconds,
        "Polars analysis and packet encoding time per batch."
    );
    describe_histogram!(
        DELIVERY_SECONDS,
        Unit::Seconds,
        "Time from sending a batch's records to their acknowledgement."
    );
    describe_counter!(
        DELIVERY_FAILURES,
        "Records whose delivery attempt failed (each is retried)."
    );
    describe_counter!(COMMITS, "Successful offset commits.");
    describe_counter!(COMMIT_FAILURES, "Failed offset commit attempts.");
    describe_counter!(
        METRICS_LOG_FAILURES,
        "Failed appends to the metrics log (each is retried; the commit waits)."
    );
    describe_counter!(
        CHECKPOINT_FAILURES,
        "Failed window checkpoint writes (the commit waits and is retried)."
    );
    describe_counter!(
        COMMITTED,
        "Input messages whose batch is delivered and whose offsets are committed."
    );
    describe_gauge!(
        CONSUMER_LAG,
        "Messages behind the partition's high watermark (librdkafka statistics)."
    );
    describe_gauge!(UPTIME, Unit::Seconds, "Seconds since the process started.");
    describe_counter!(
        EVENTS_LATE,
        "Window mode: valid events whose windows had all closed (late)."
    );
    describe_counter!(
        EVENTS_REPLAYED,
        "Window mode: events re-read after a restart whose window was already emitted."
    );
    describe_gauge!(WINDOWS_OPEN, "Window mode: event-time windows open now.");
    describe_gauge!(
        EVENTS_BUFFERED,
        "Window mode: valid events held in open windows."
    );
    describe_gauge!(
        PARTITIONS_PAUSED,
        "Window mode: partitions paused because they run ahead of the slowest."
    );
    describe_counter!(
        KAFKA_ERRORS,
        "Errors librdkafka reported (it retries them on its own), by client; each kind is logged once a minute."
    );
    describe_counter!(
        REVOCATIONS_GIVEN_UP,
        "Revocations that gave up work not delivered and committed within half of max.poll.interval.ms (its partitions' next reader reads it again)."
    );
    describe_gauge!(
        CONSUMPTION_HELD,
        "1 while consumption is paused because delivery has not taken the last closed work."
    );
    describe_gauge!(
        WATERMARK,
        Unit::Seconds,
        "Window mode: the watermark (every active partition's event time minus grace), epoch seconds."
    );
    describe_gauge!(BUILD_INFO, "Always 1; the version label names the build.");
}

/// Lets a burst of log lines through per window and counts the rest, so a
/// broker outage or a flood of bad input is reported without flooding the log.
#[derive(Debug)]
pub struct LogLimit {
    what: &'static str,
    burst: u32,
    window: Duration,
    state: std::sync::Mutex<(Instant, u32, u64)>,
}

impl LogLimit {
    pub fn new(what: &'static str, burst: u32, window: Duration) -> LogLimit {
        LogLimit {
            what,
            burst,
            window,
            state: std::sync::Mutex::new((Instant::now(), 0, 0)),
        }
    }

    /// Whether the next line may be logged; at the turn of a window, logs how many were not.
    pub fn allow(&self) -> bool {
        let mut st = self.state.lock().expect("log limit lock");
        let (start, logged, suppressed) = &mut *st;
        if start.elapsed() >= self.window {
            if *suppressed > 0 {
                tracing::warn!(
                    suppressed = *suppressed,
                    "{} not logged individually in the last {}",
                    self.what,
                    humantime::format_duration(self.window)
                );
            }
            *start = Instant::now();
            *logged = 0;
            *suppressed = 0;
        }
        if *logged < self.burst {
            *logged += 1;
            true
        } else {
            *suppressed += 1;
            false
        }
    }
}

/// Liveness and readiness, updated by the pipeline.
#[derive(Debug)]
pub struct Health {
    started: Instant,
    /// Milliseconds since `started` of the consumer loop's last turn.
    heartbeat_ms: AtomicI64,
    assigned_partitions: AtomicU64,
    brokers_up: AtomicBool,
    loop_running: AtomicBool,
    /// False while appends to the metrics log fail and are retried.
    log_ok: AtomicBool,
    /// Whether the loop ever turned, to tell "starting" from "stopped".
    ever_ran: AtomicBool,
}

/// The loop counts as stalled when it has not turned for this long.
const STALL: Duration = Duration::from_secs(30);

impl Default for Health {
    fn default() -> Self {
        Health {
            started: Instant::now(),
            heartbeat_ms: AtomicI64::new(0),
            assigned_partitions: AtomicU64::new(0),
            brokers_up: AtomicBool::new(false),
            loop_running: AtomicBool::new(false),
            log_ok: AtomicBool::new(true),
            ever_ran: AtomicBool::new(false),
        }
    }
}

impl Health {
    /// Records a turn of the pipeline loop at `now`.
    pub fn beat(&self, now: Instant) {
        self.loop_running.store(true, Ordering::Relaxed);
        self.ever_ran.store(true, Ordering::Relaxed);
        self.heartbeat_ms.store(
            now.saturating_duration_since(self.started).as_millis() as i64,
            Ordering::Relaxed,
        );
    }

    pub fn stopped(&self) {
        self.loop_running.store(false, Ordering::Relaxed);
    }

    pub fn set_assigned(&self, n: usize) {
        self.assigned_partitions.store(n as u64, Ordering::Relaxed);
    }

    pub fn set_brokers_up(&self, up: bool) {
        self.brokers_up.store(up, Ordering::Relaxed);
    }

    pub fn set_log_ok(&self, ok: bool) {
        self.log_ok.store(ok, Ordering::Relaxed);
    }

    pub fn log_ok(&self) -> bool {
        self.log_ok.load(Ordering::Relaxed)
    }

    pub fn assigned(&self) -> u64 {
        self.assigned_partitions.load(Ordering::Relaxed)
    }

    /// Whether the consumer reaches the brokers (librdkafka statistics).
    pub fn brokers_up(&self) -> bool {
        self.brokers_up.load(Ordering::Relaxed)
    }

    /// Whether the pipeline loop has turned at least once in this process.
    pub fn has_run(&self) -> bool {
        self.ever_ran.load(Ordering::Relaxed)
    }

    pub fn is_alive(&self) -> bool {
        let last = self.heartbeat_ms.load(Ordering::Relaxed);
        let now = self.started.elapsed().as_millis() as i64;
        // The loop turns even while it waits for delivery (a slow broker, a
        // retried metrics log): it pauses consumption and keeps polling. A
        // loop that has not turned for STALL is stuck.
        self.loop_running.load(Ordering::Relaxed) && now - last < STALL.as_millis() as i64
    }

    pub fn is_ready(&self) -> bool {
        self.is_alive()
            && self.brokers_up.load(Ordering::Relaxed)
            && self.assigned() > 0
            && self.log_ok()
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
    serve_with(addr, health, None, shutdown).await
}

/// As [`serve`], with the routes of `dashboard` (see [`crate::dashboard`])
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

/// Kinds of Kafka client error logged in the last [`KAFKA_REPEAT`], with how
/// many repeats were kept at DEBUG since.
static KAFKA_LOGGED: std::sync::Mutex<Vec<(String, Instant, u64)>> =
    std::sync::Mutex::new(Vec::new());
/// How often one kind of Kafka client error is logged at WARN.
const KAFKA_REPEAT: Duration = Duration::from_secs(60);

/// Reports an error librdkafka gives a client's error callback.
///
/// librdkafka retries these on its own, and one broker failure reaches every
/// client of the process (consumer, producer, checkpoint store), each more
/// than once: a refused connection, then "all brokers are down". So each
/// kind of error is one WARN line a minute for the whole process, the rest
/// DEBUG, and every report counts in [`KAFKA_ERRORS`].
pub fn kafka_error(client: &'static str, error: &KafkaError, reason: &str) {
    metrics::counter!(KAFKA_ERRORS, "client" => client).increment(1);
    let code = error.rdkafka_error_code();
    // Always follows a failure of its own, which is the line that says why.
    if matches!(code, Some(RDKafkaErrorCode::AllBrokersDown)) {
        tracing::debug!(client, error = %error, "kafka {client}: {reason}");
        return;
    }
    let kind = code.map_or_else(|| error.to_string(), |c| format!("{c:?}"));
    let now = Instant::now();
    let repeats = {
        let mut logged = KAFKA_LOGGED.lock().expect("kafka log lock");
        match logged.iter_mut().find(|(k, _, _)| *k == kind) {
            Some((_, at, n)) if now.duration_since(*at) < KAFKA_REPEAT => {
                *n += 1;
                None
            }
            Some((_, at, n)) => {
                *at = now;
                Some(std::mem::take(n))
            }
            None => {
                logged.push((kind, now, 0));
                Some(0)
            }
        }
    };
    match repeats {
        Some(repeats) => tracing::warn!(
            client,
            error = %error,
            repeats,
            "kafka {client}: {reason} (librdkafka retries on its own)"
        ),
        None => tracing::debug!(client, error = %error, "kafka {client}: {reason}"),
    }
}

/// Routes librdkafka's own log lines. Its connection failures (facilities
/// `FAIL` and `ERROR`) also reach [`kafka_error`], which logs them once; so
/// they stay at DEBUG here. Nothing librdkafka logs is fatal to the service
/// (it retries), so nothing is above WARN.
pub fn kafka_log(client: &'static str, level: RDKafkaLogLevel, fac: &str, message: &str) {
    use RDKafkaLogLevel::*;
    match level {
        Emerg | Alert | Critical | Error if fac == "FAIL" || fac == "ERROR" => {
            tracing::debug!(target: "librdkafka", client, "{fac}: {message}")
        }
        Emerg | Alert | Critical | Error | Warning => {
            tracing::warn!(target: "librdkafka", client, "{fac}: {message}")
        }
        Notice | Info => tracing::info!(target: "librdkafka", client, "{fac}: {message}"),
        Debug => tracing::debug!(target: "librdkafka", client, "{fac}: {message}"),
    }
}

/// The context of a Kafka client with nothing else to do: its errors and log
/// lines go through [`kafka_error`] and [`kafka_log`].
pub struct KafkaContext(pub &'static str);

impl rdkafka::client::ClientContext for KafkaContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        kafka_log(self.0, level, fac, message);
    }
    fn error(&self, error: KafkaError, reason: &str) {
        kafka_error(self.0, &error, reason);
    }
}

impl rdkafka::consumer::ConsumerContext for KafkaContext {}

impl rdkafka::producer::ProducerContext for KafkaContext {
    type DeliveryOpaque = ();
    fn delivery(&self, _: &rdkafka::producer::DeliveryResult<'_>, _: ()) {}
}
