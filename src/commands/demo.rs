//! `demo`: the whole pipeline on librdkafka's in-process mock cluster, fed
//! with generated events, and a summary of what it found.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use rdkafka::mocking::MockCluster;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::commands::generate::{produce_generated, Meter};
use crate::commands::generator::{Generator, GeneratorConfig};
use crate::core::packet::Packet;
use crate::pipeline::{Pipeline, RunSummary};
use crate::settings::Settings;
use crate::source::range::{Range, Until};
use crate::telemetry;
use crate::web::dashboard::Dashboard;
use crate::web::server;

/// What `demo` was asked for.
#[derive(Debug, Clone, Copy)]
pub struct Args {
    pub events: u64,
    pub seed: u64,
    /// Serve the dashboard during the run and after it, until a signal.
    pub serve: bool,
}

/// `login-metrics demo`.
pub async fn run(s: Settings, args: Args, interrupt: CancellationToken) -> ExitCode {
    // The demo's report is the output (it counts the invalid messages too);
    // keep the logs to errors unless asked.
    let mut log = s.log.clone();
    if std::env::var_os("RUST_LOG").is_none() && log.level == "info" {
        log.level = "error".into();
    }
    telemetry::init_logging(&log);
    let served = if args.serve {
        match serve_demo_dashboard(&s, interrupt.clone()).await {
            Ok(served) => Some(served),
            Err(e) => {
                eprintln!("login-metrics demo: {e:#}");
                return ExitCode::from(2);
            }
        }
    } else {
        None
    };
    let dashboard = served.as_ref().map(|(d, _)| d);
    match run_demo(s, args.events, args.seed, interrupt.clone(), dashboard).await {
        Ok(report) => {
            println!("{report}");
            if let Some((_, url)) = &served {
                println!("dashboard: {url} (Ctrl-C to stop)");
                interrupt.cancelled().await;
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("login-metrics demo: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `demo --serve`: the dashboard on `telemetry.listen`, or on a free loopback
/// port when that is empty, until `stop`. Prints its address at once, so it
/// can be opened while the demo runs; returns it for the closing line.
async fn serve_demo_dashboard(
    s: &Settings,
    stop: CancellationToken,
) -> anyhow::Result<(Dashboard, String)> {
    use anyhow::Context;
    let dashboard = Dashboard::new(s);
    let addr = s
        .telemetry
        .listen
        .unwrap_or_else(|| std::net::SocketAddr::from(([127, 0, 0, 1], 0)));
    let bound = server::serve_with(
        addr,
        dashboard.health(),
        Some(dashboard.router()),
        server::Limits::of(&s.telemetry),
        stop,
    )
        .await
        .with_context(|| {
            format!("cannot serve the dashboard on {addr} (telemetry.listen; LOGIN_METRICS__TELEMETRY__LISTEN=127.0.0.1:0 picks a free port)")
        })?;
    if let Some(warning) = Dashboard::exposure_warning(s) {
        eprintln!("login-metrics demo: warning: {warning}");
    }
    let url = format!("http://{bound}/");
    println!("dashboard: {url}");
    Ok((dashboard, url))
}

/// The most repeated combinations of the whole run, per slice: each key's
/// counts summed over the packets that report it (one row per key).
#[derive(Debug, Default)]
struct TopRows {
    /// slice → values → summed count.
    slices: BTreeMap<Vec<String>, HashMap<Vec<String>, u64>>,
    dup_groups: BTreeMap<Vec<String>, u64>,
    windows: BTreeSet<String>,
}

const DEMO_TOP: usize = 3;

impl TopRows {
    fn add(&mut self, packet: &Packet) {
        if let Some(start) = &packet.window.start {
            self.windows.insert(start.clone());
        }
        for m in &packet.metrics {
            *self.dup_groups.entry(m.slice.clone()).or_default() += m.duplicate_groups;
            let rows = self.slices.entry(m.slice.clone()).or_default();
            for d in &m.duplicates {
                let count = d.get("count").and_then(|c| c.as_u64()).unwrap_or(0);
                let values = m
                    .slice
                    .iter()
                    .map(|f| match d.get(f) {
                        Some(serde_json::Value::String(s)) => s.clone(),
                        _ => "(null)".to_string(),
                    })
                    .collect();
                *rows.entry(values).or_default() += count;
            }
        }
    }

    /// The `DEMO_TOP` keys of a slice by summed count, then values.
    fn best(rows: &HashMap<Vec<String>, u64>) -> Vec<(u64, &Vec<String>)> {
        let mut v: Vec<(u64, &Vec<String>)> = rows.iter().map(|(k, n)| (*n, k)).collect();
        v.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(b.1)));
        v.truncate(DEMO_TOP);
        v
    }
}

/// What `demo` shows at the end.
pub struct DemoReport {
    pub produced: u64,
    pub summary: RunSummary,
    pub metrics_log: Option<String>,
    pub dlq_topic: String,
    top: TopRows,
}

impl std::fmt::Display for DemoReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = &self.summary;
        writeln!(f)?;
        writeln!(f, "login-metrics demo (in-process mock Kafka cluster)")?;
        writeln!(f, "  events produced   {}", self.produced)?;
        write!(
            f,
            "  events processed  {} in {:.2}s = {:.0} events/s",
            s.messages,
            s.duration.as_secs_f64(),
            s.events_per_second()
        )?;
        match (s.since_assignment, s.events_per_second_assigned()) {
            (Some(d), Some(rate)) => writeln!(
                f,
                " ({:.2}s after the consumer group join = {:.0} events/s)",
                d.as_secs_f64(),
                rate
            )?,
            _ => writeln!(f)?,
        }
        writeln!(f, "  valid             {}", s.valid)?;
        if !self.top.windows.is_empty() {
            writeln!(
                f,
                "  windows           {} ({} late events)",
                self.top.windows.len(),
                s.late
            )?;
        }
        let why: Vec<String> = s
            .invalid_by_kind
            .iter()
            .map(|(k, n)| format!("{k} {n}"))
            .collect();
        writeln!(f, "  invalid           {} ({})", s.invalid, why.join(", "))?;
        if !self.dlq_topic.is_empty() {
            writeln!(f, "  dead letters      {} to {}", s.invalid, self.dlq_topic)?;
        }
        writeln!(
            f,
            "  packets           {} ({} bytes of JSON)",
            s.packets, s.packet_bytes
        )?;
        if let Some(path) = &self.metrics_log {
            writeln!(f, "  metrics log       {path}")?;
        }
        writeln!(f)?;
        writeln!(
            f,
            "Most repeated combinations of the run, per slice (counts summed over packets):"
        )?;
        for (slice, rows) in &self.top.slices {
            let total = self.top.dup_groups.get(slice).copied().unwrap_or(0);
            writeln!(
                f,
                "  {}  ({} duplicate groups over all packets)",
                slice.join(" + "),
                total
            )?;
            let best = TopRows::best(rows);
            if best.is_empty() {
                writeln!(f, "      (none)")?;
            }
            for (count, values) in best {
                writeln!(f, "    {count:>6}  {}", values.join("  "))?;
            }
        }
        Ok(())
    }
}

/// Runs the demo: a mock cluster, `events` generated events, the pipeline
/// until every event is accounted for, and a report. With a `dashboard`, the
/// run reports into it (its packets, progress and state), so `demo --serve`
/// shows the demo's packets.
pub async fn run_demo(
    mut settings: Settings,
    events: u64,
    seed: u64,
    interrupt: CancellationToken,
    dashboard: Option<&Dashboard>,
) -> anyhow::Result<DemoReport> {
    let cluster = MockCluster::new(3).context("cannot start the mock cluster")?;
    let k = &settings.kafka;
    cluster
        .create_topic(&k.input_topic, 3, 1)
        .and_then(|_| cluster.create_topic(&k.output_topic, 1, 1))
        .context("cannot create the demo topics")?;
    cluster.create_topic(&k.checkpoint_topic, 1, 1)?;
    if !k.dlq_topic.is_empty() {
        cluster.create_topic(&k.dlq_topic, 1, 1)?;
    }
    settings.kafka.bootstrap_servers = cluster.bootstrap_servers();
    info!(brokers = %settings.kafka.bootstrap_servers, "mock cluster started");

    let mut cfg = GeneratorConfig::new(seed);
    // A busy service: 800 logins a second of event time, so a ten-second
    // window holds about 8,000 events (under batch.max_events).
    cfg.events_per_sec = 800.0;
    cfg.start_ms = chrono::Utc::now().timestamp_millis()
        - (events as f64 / cfg.events_per_sec * 1000.0) as i64;
    let mut generator = Generator::new(cfg);
    let producer_config = crate::kafka::producer(&settings.kafka);
    let produced = produce_generated(
        &producer_config,
        &settings.kafka.input_topic,
        &mut generator,
        Some(events),
        0,
        &interrupt,
    )?;

    let top = Arc::new(Mutex::new(TopRows::default()));
    let top_hook = top.clone();
    let metrics_log = settings
        .metrics_log
        .path
        .as_ref()
        .map(|p| p.display().to_string());
    let dlq_topic = settings.kafka.dlq_topic.clone();
    // A bounded run: it reads what was produced, closes the last windows
    // (closed by `end`) as soon as the input is read, commits and returns.
    let mut pipeline = Pipeline::new(settings)
        .bounded(Range {
            from_ms: None,
            until: Until::End,
        })
        .on_packet(move |p| top_hook.lock().unwrap().add(p));
    if let Some(d) = dashboard {
        pipeline = d.watch(pipeline);
    }
    let progress = pipeline.progress();

    let done = CancellationToken::new();
    let watcher = {
        let done = done.clone();
        tokio::spawn(async move {
            let mut meter = Meter::new("processed", Some(produced));
            loop {
                meter.set(progress.messages.load(Ordering::Relaxed));
                tokio::select! {
                    _ = done.cancelled() => break,
                    _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                }
            }
            meter.set(progress.messages.load(Ordering::Relaxed));
            meter.finish();
        })
    };
    // A signal stops the run early; otherwise it ends with its range.
    let summary = pipeline.run(interrupt.clone()).await;
    done.cancel();
    let _ = watcher.await;
    let summary = summary?;
    drop(cluster);
    let top = std::mem::take(&mut *top.lock().unwrap());
    Ok(DemoReport {
        produced,
        summary,
        metrics_log,
        dlq_topic,
        top,
    })
}
