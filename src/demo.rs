//! `demo` and `generate`: filling a topic with generated events, and the
//! self-contained demo on librdkafka's in-process mock cluster.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::IsTerminal;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};
use indicatif::{ProgressBar, ProgressStyle};
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::dashboard::Dashboard;
use crate::generator::{Generator, GeneratorConfig};
use crate::packet::Packet;
use crate::pipeline::{Pipeline, RunSummary};
use crate::settings::{BatchMode, Settings};

/// A progress display: a bar on a terminal, a plain line every few seconds otherwise.
pub struct Meter {
    bar: Option<ProgressBar>,
    label: &'static str,
    total: Option<u64>,
    done: u64,
    started: Instant,
    last_line: Instant,
}

impl Meter {
    pub fn new(label: &'static str, total: Option<u64>) -> Meter {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = match total {
                Some(n) => ProgressBar::new(n).with_style(
                    ProgressStyle::with_template(
                        "{msg:>10} [{bar:30}] {human_pos}/{human_len} {per_sec} eta {eta}",
                    )
                    .expect("valid template")
                    .progress_chars("=> "),
                ),
                None => ProgressBar::new_spinner().with_style(
                    ProgressStyle::with_template("{msg:>10} {spinner} {human_pos} {per_sec}")
                        .expect("valid template"),
                ),
            };
            bar.set_message(label);
            bar
        });
        Meter {
            bar,
            label,
            total,
            done: 0,
            started: Instant::now(),
            last_line: Instant::now(),
        }
    }

    pub fn set(&mut self, done: u64) {
        self.done = done;
        match &self.bar {
            Some(bar) => bar.set_position(done),
            None if self.last_line.elapsed() >= Duration::from_secs(5) => {
                self.last_line = Instant::now();
                eprintln!("{}", self.line());
            }
            None => {}
        }
    }

    fn line(&self) -> String {
        let rate = self.done as f64 / self.started.elapsed().as_secs_f64().max(1e-9);
        match self.total {
            Some(n) => format!("{}: {}/{} ({:.0}/s)", self.label, self.done, n, rate),
            None => format!("{}: {} ({:.0}/s)", self.label, self.done, rate),
        }
    }

    pub fn finish(self) {
        match self.bar {
            Some(bar) => bar.finish(),
            None => eprintln!("{}", self.line()),
        }
    }
}

/// Produces generated events into `topic`. `rate` 0 is as fast as possible;
/// `count` `None` runs until `stop`. Returns the number produced.
pub fn produce_generated(
    producer_config: &ClientConfig,
    topic: &str,
    gen: &mut Generator,
    count: Option<u64>,
    rate: u64,
    stop: &CancellationToken,
) -> anyhow::Result<u64> {
    produce_generated_to(producer_config, topic, None, gen, count, rate, stop)
}

/// [`produce_generated`], with every event written to `partition` when it is
/// given (otherwise the producer partitions by key).
pub fn produce_generated_to(
    producer_config: &ClientConfig,
    topic: &str,
    partition: Option<i32>,
    gen: &mut Generator,
    count: Option<u64>,
    rate: u64,
    stop: &CancellationToken,
) -> anyhow::Result<u64> {
    let producer: BaseProducer = producer_config
        .clone()
        .set("linger.ms", "20")
        .set("batch.num.messages", "10000")
        .create()
        .context("cannot create the producer")?;
    let mut meter = Meter::new("produced", count);
    let started = Instant::now();
    let mut produced = 0u64;
    while count.is_none_or(|n| produced < n) && !stop.is_cancelled() {
        if rate > 0 {
            let due = Duration::from_secs_f64(produced as f64 / rate as f64);
            if let Some(wait) = due.checked_sub(started.elapsed()) {
                std::thread::sleep(wait.min(Duration::from_millis(100)));
                continue;
            }
        }
        let m = gen.next_message();
        loop {
            let mut record = BaseRecord::<str, [u8]>::to(topic).payload(&m.payload);
            if let Some(k) = &m.key {
                record = record.key(k.as_str());
            }
            if let Some(p) = partition {
                record = record.partition(p);
            }
            match producer.send(record) {
                Ok(()) => break,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                    producer.poll(Duration::from_millis(50));
                }
                Err((e, _)) => return Err(anyhow!("cannot produce to {topic}: {e}")),
            }
        }
        produced += 1;
        if produced.is_multiple_of(1024) {
            producer.poll(Duration::ZERO);
            meter.set(produced);
        }
    }
    producer
        .flush(Duration::from_secs(60))
        .context("not every generated event was delivered")?;
    meter.set(produced);
    meter.finish();
    Ok(produced)
}

/// Creates `topic` with `partitions` partitions unless it exists.
pub async fn ensure_topic(bootstrap: &str, topic: &str, partitions: i32) -> anyhow::Result<()> {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    use rdkafka::client::DefaultClientContext;
    use rdkafka::types::RDKafkaErrorCode;
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()
        .context("cannot create the admin client")?;
    let results = admin
        .create_topics(
            &[NewTopic::new(topic, partitions, TopicReplication::Fixed(1))],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(30))),
        )
        .await
        .with_context(|| format!("cannot create {topic}"))?;
    for r in results {
        match r {
            Ok(_) => info!(topic, partitions, "topic created"),
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((t, e)) => return Err(anyhow!("cannot create {t}: {e}")),
        }
    }
    Ok(())
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
    let producer_config = crate::sink::producer_config(&settings.kafka);
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
    let (mode, max_wait) = (settings.batch.mode, settings.batch.max_wait);
    let mut pipeline = Pipeline::new(settings).on_packet(move |p| top_hook.lock().unwrap().add(p));
    if let Some(d) = dashboard {
        pipeline = d.watch(pipeline);
    }
    let progress = pipeline.progress();

    // Arrival mode stops once every produced event has been consumed (shutdown
    // closes the last batch, delivers and commits it). Window mode stops once
    // every offset is committed: the last windows close by batch.max_wait.
    let windows = mode == BatchMode::Window;
    if windows {
        info!(
            wait = %humantime::format_duration(max_wait),
            "the last windows close batch.max_wait after their first event"
        );
    }
    let shutdown = CancellationToken::new();
    let watcher = {
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let mut meter = Meter::new("processed", Some(produced));
            loop {
                let seen = progress.messages.load(Ordering::Relaxed);
                meter.set(seen);
                let done = if windows {
                    progress.committed_messages.load(Ordering::Relaxed) >= produced
                } else {
                    seen >= produced
                };
                if done || interrupt.is_cancelled() {
                    meter.finish();
                    shutdown.cancel();
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    let summary = pipeline.run(shutdown).await?;
    let _ = watcher.await;
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
