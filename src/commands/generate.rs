//! `generate`: realistic login events ([`crate::commands::generator`])
//! produced into the input topic of a real Kafka, at a rate or as fast as
//! possible, with a progress display.

use std::io::IsTerminal;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};
use indicatif::{ProgressBar, ProgressStyle};
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::commands::generator::{Generator, GeneratorConfig};
use crate::kafka;
use crate::settings::{KafkaSettings, Settings};
use crate::telemetry;

/// What `generate` was asked for.
#[derive(Debug, Clone)]
pub struct Args {
    pub rate: u64,
    pub count: Option<u64>,
    pub partitions: Option<i32>,
    pub partition: Option<i32>,
    pub start_ms: Option<i64>,
    pub event_rate: Option<u64>,
    pub seed: u64,
}

/// `login-metrics generate`.
pub async fn run(s: Settings, args: Args, stop: CancellationToken) -> ExitCode {
    telemetry::init_logging(&s.log);
    let mut cfg = GeneratorConfig::new(args.seed);
    cfg.start_ms = args
        .start_ms
        .unwrap_or_else(|| chrono::Utc::now().timestamp_millis());
    // Event time advances with the production rate (as fast as possible:
    // 50,000 events a second) unless --event-rate sets it.
    cfg.events_per_sec = match (args.event_rate, args.rate) {
        (Some(r), _) => r.max(1) as f64,
        (None, 0) => 50_000.0,
        (None, r) => r as f64,
    };
    if let Some(n) = args.partitions {
        if let Err(e) = ensure_input_topic(&s.kafka, n).await {
            eprintln!("login-metrics generate: {e:#}");
            return ExitCode::FAILURE;
        }
    }
    let producer = kafka::producer(&s.kafka);
    let topic = s.kafka.input_topic.clone();
    let (rate, count, partition) = (args.rate, args.count, args.partition);
    info!(topic = %topic, partition, brokers = %s.kafka.bootstrap_servers, rate, "generating");
    let result = tokio::task::spawn_blocking(move || {
        let mut gen = Generator::new(cfg);
        produce_generated_to(&producer, &topic, partition, &mut gen, count, rate, &stop)
    })
    .await;
    match result {
        Ok(Ok(n)) => {
            eprintln!("login-metrics: produced {n} events");
            ExitCode::SUCCESS
        }
        Ok(Err(e)) => {
            eprintln!("login-metrics generate: {e:#}");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("login-metrics generate: {e}");
            ExitCode::FAILURE
        }
    }
}

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
            Some(n) if rate > 0.0 && self.done < n => format!(
                "{}: {}/{} ({:.0}/s, about {} left)",
                self.label,
                self.done,
                n,
                rate,
                humantime::format_duration(Duration::from_secs(
                    ((n - self.done) as f64 / rate) as u64
                ))
            ),
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

/// Creates the input topic with `partitions` partitions unless it exists.
pub async fn ensure_input_topic(k: &KafkaSettings, partitions: i32) -> anyhow::Result<()> {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    use rdkafka::client::DefaultClientContext;
    let topic = k.input_topic.as_str();
    let admin: AdminClient<DefaultClientContext> = kafka::admin(k)
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
