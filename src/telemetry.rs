//! Telemetry: logging set-up, metric names, run counters, health and readiness.
//!
//! Metrics are recorded through the `metrics` facade everywhere in the
//! pipeline (a no-op until a recorder is installed); the Prometheus recorder
//! installed here is rendered by the web surface ([`crate::web::server`]) on
//! `telemetry.listen`, next to `/healthz` (the pipeline loop is alive) and
//! `/readyz` (connected to the brokers with partitions assigned). Nothing here
//! speaks Kafka or HTTP.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::core::event::ErrorKind;
use serde::{Deserialize, Serialize};

use crate::values::{Findings, Secret};

/// `[log]`: how the process logs.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogSettings {
    pub format: LogFormat,
    /// A tracing filter: a level or directives.
    pub level: String,
}

crate::choice!(LogFormat { Text, Json });

/// `[telemetry]`: the HTTP listener and the progress line.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TelemetrySettings {
    /// `None` when the HTTP listener is disabled.
    #[serde(with = "crate::values::optional")]
    pub listen: Option<std::net::SocketAddr>,
    #[serde(with = "humantime_serde")]
    pub progress_interval: Duration,
    /// Bearer token the dashboard (`/`, `/api/*`) requires; empty leaves it open.
    pub token: Secret,
    /// Without a token: the `Host` names (besides IP addresses) the dashboard
    /// answers; `*` for any.
    pub allowed_hosts: Vec<String>,
    /// Connections the listener serves at once.
    pub max_connections: usize,
    /// Time a client has to send a request's headers (and the longest idle
    /// time of a kept-alive connection).
    #[serde(with = "humantime_serde")]
    pub header_timeout: Duration,
}

impl LogSettings {
    pub fn check(&self, f: &mut Findings) {
        let level = &self.level;
        if level.trim().is_empty() || tracing_subscriber::EnvFilter::try_new(level).is_err() {
            f.add(
                "log.level",
                format!("`{level}` is not a level (error, warn, info, debug, trace) or filter"),
            );
        }
    }
}

impl TelemetrySettings {
    pub fn check(&self, f: &mut Findings) {
        f.positive("telemetry.progress_interval", self.progress_interval);
        f.positive("telemetry.header_timeout", self.header_timeout);
        if self.max_connections == 0 {
            f.add("telemetry.max_connections", "must be at least 1");
        }
        for host in &self.allowed_hosts {
            let h = host.trim();
            if h.is_empty()
                || (h != "*"
                    && !h
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.'))
            {
                f.add(
                    "telemetry.allowed_hosts",
                    format!("`{host}` is not a host name (letters, digits, `-` and `.`), or `*`"),
                );
            }
        }
        // Never echo the token: it is a secret.
        let token = self.token.expose();
        if token.chars().any(|c| c.is_whitespace() || c.is_control()) {
            f.add(
                "telemetry.token",
                "must not contain spaces or control characters (it travels in an Authorization header)",
            );
        }
    }
}

pub const MESSAGES: &str = "login_metrics_messages_consumed_total";
pub const HTTP_CONNECTIONS: &str = "login_metrics_http_connections";
pub const HTTP_REFUSED: &str = "login_metrics_http_connections_refused_total";
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
pub const TRANSACTION_SECONDS: &str = "login_metrics_transaction_commit_seconds";
pub const TRANSACTIONS_ABORTED: &str = "login_metrics_transactions_aborted_total";
pub const MERGE_PARTITIONS: &str = "login_metrics_merge_partitions";
pub const MERGE_EVENTS_HELD: &str = "login_metrics_merge_events_held";
pub const MERGE_WINDOWS_HELD: &str = "login_metrics_merge_windows_held";
pub const MERGE_LAG: &str = "login_metrics_merge_lag_seconds";
pub const SHARES_REPLAYED: &str = "login_metrics_shares_replayed_total";
pub const SHARES_CONFLICTING: &str = "login_metrics_shares_conflicting_total";

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
    /// Total consumer lag: the sum of [`Progress::set_lag`]'s partitions.
    pub lag: AtomicI64,
    /// Each partition's lag, from librdkafka's statistics and after each
    /// commit (statistics come every few seconds; a commit to the end must
    /// read 0 at once, and stay 0 after the run).
    lags: std::sync::Mutex<std::collections::BTreeMap<(String, i32), i64>>,
    /// When partitions were first assigned (the group join is over).
    pub first_assigned: OnceLock<Instant>,
    /// Revocations that gave up work not delivered and committed in time.
    pub revocations_given_up: AtomicU64,
    /// A bounded run: the messages of its range from the committed offsets
    /// on (0 for a run without end).
    pub range_total: AtomicU64,
}

impl Progress {
    /// Records a partition's consumer lag: its gauge and the total.
    pub fn set_lag(&self, topic: &str, partition: i32, lag: i64) {
        let lag = lag.max(0);
        metrics::gauge!(CONSUMER_LAG, "topic" => topic.to_string(), "partition" => partition.to_string())
            .set(lag as f64);
        let mut lags = self.lags.lock().unwrap_or_else(|e| e.into_inner());
        lags.insert((topic.to_string(), partition), lag);
        self.lag.store(lags.values().sum(), Ordering::Relaxed);
    }

    /// Forgets a partition this process no longer reads (its gauge reads 0:
    /// another instance reports it now).
    pub fn forget_lag(&self, topic: &str, partition: i32) {
        metrics::gauge!(CONSUMER_LAG, "topic" => topic.to_string(), "partition" => partition.to_string())
            .set(0.0);
        let mut lags = self.lags.lock().unwrap_or_else(|e| e.into_inner());
        lags.remove(&(topic.to_string(), partition));
        self.lag.store(lags.values().sum(), Ordering::Relaxed);
    }

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
            initialise();
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
    describe_histogram!(
        TRANSACTION_SECONDS,
        Unit::Seconds,
        "Exactly once: time to add a transaction's checkpoints and offsets and commit it."
    );
    describe_counter!(
        TRANSACTIONS_ABORTED,
        "Exactly once: transactions aborted (a failure, or work given up at a revocation); their work is redone."
    );
    describe_gauge!(
        MERGE_PARTITIONS,
        "scale.merge: shares partitions this instance merges (its share of the group's windows)."
    );
    describe_gauge!(
        MERGE_EVENTS_HELD,
        "scale.merge: valid events held in shares of windows not yet closed by every input partition."
    );
    describe_gauge!(
        MERGE_WINDOWS_HELD,
        "scale.merge: windows with shares held, waiting for the other input partitions."
    );
    describe_gauge!(
        MERGE_LAG,
        Unit::Seconds,
        "scale.merge: how far the slowest input partition trails the furthest, in event time, over the shares partitions merged here."
    );
    describe_counter!(
        SHARES_REPLAYED,
        "scale.merge: shares read again (an input partition moved or restarted) and dropped."
    );
    describe_counter!(
        SHARES_CONFLICTING,
        "scale.merge: shares sent again with other content and dropped (the group's window settings changed)."
    );
    describe_gauge!(BUILD_INFO, "Always 1; the version label names the build.");
}

/// Registers the counters and gauges at their starting values, so that every
/// series exists from the first scrape: `rate()` and `increase()` see a
/// failure's first increment, and a rule on a rare event (a failed delivery, a
/// failed append to the metrics log, a late event) has a series to watch
/// before it ever happens. Labelled series start for every label value known
/// in advance (each parser error kind); the consumer lag's partitions are
/// known only once assigned. The watermark is NaN (unknown) until the first
/// one, and stays so in arrival mode, which has none.
fn initialise() {
    for name in [
        MESSAGES,
        EVENTS_VALID,
        DEAD_LETTERS,
        PACKETS,
        PACKET_BYTES,
        DELIVERY_FAILURES,
        COMMITS,
        COMMIT_FAILURES,
        CHECKPOINT_FAILURES,
        METRICS_LOG_FAILURES,
        COMMITTED,
        EVENTS_LATE,
        EVENTS_REPLAYED,
        REVOCATIONS_GIVEN_UP,
        TRANSACTIONS_ABORTED,
        SHARES_REPLAYED,
        SHARES_CONFLICTING,
    ] {
        metrics::counter!(name).increment(0);
    }
    for kind in ErrorKind::ALL {
        metrics::counter!(EVENTS_INVALID, "kind" => kind.as_str()).increment(0);
    }
    for name in [
        WINDOWS_OPEN,
        EVENTS_BUFFERED,
        PARTITIONS_PAUSED,
        CONSUMPTION_HELD,
        UPTIME,
        MERGE_PARTITIONS,
        MERGE_EVENTS_HELD,
        MERGE_WINDOWS_HELD,
        MERGE_LAG,
    ] {
        metrics::gauge!(name).set(0.0);
    }
    metrics::gauge!(WATERMARK).set(f64::NAN);
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
