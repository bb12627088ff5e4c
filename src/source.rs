//! The source: consuming `user-login`, parsing, batching, committing.
//!
//! One thread owns the consumer. It polls, parses each message into the open
//! batch, hands closed batches to the sink task (a bounded channel, so
//! consumption overlaps the analysis and delivery of the previous batch), and
//! commits each batch once the sink reports it delivered. Keeping every
//! consumer call on this thread is what makes revocation simple: librdkafka
//! calls the rebalance callback from inside `poll` on this same thread, and
//! the callback closes the open batch (`closed_by = rebalance`), waits until
//! every batch in flight is delivered, and commits synchronously before the
//! partitions are given up.

use std::sync::atomic::Ordering;
use std::sync::{mpsc as std_mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::client::ClientContext;
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::{KafkaError, KafkaResult};
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::statistics::Statistics;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::batch::{Batch, Batcher, CloseReason, Coord, SourceRange};
use crate::commit;
use crate::event::{self, Requirements};
use crate::pipeline::Progress;
use crate::settings::KafkaSettings;
use crate::telemetry::{self, Health, LogLimit};

/// What the sink reports back for each batch, in batch order.
#[derive(Debug)]
pub enum Ack {
    /// Packet and dead letters acknowledged, packet in the metrics log.
    Delivered {
        sources: Vec<SourceRange>,
        messages: u64,
    },
    /// The batch could not be delivered; nothing more may be committed.
    Failed(String),
}

/// Commit attempts per batch; shutdown and revocation use the same.
const COMMIT_ATTEMPTS: u32 = 5;
/// Longest blocking poll, so shutdown and deadlines are seen promptly.
const MAX_POLL: Duration = Duration::from_millis(100);

/// Builds the librdkafka consumer configuration.
pub fn consumer_config(k: &KafkaSettings) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &k.bootstrap_servers)
        .set("group.id", &k.group_id)
        .set("client.id", "login-metrics")
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", &k.auto_offset_reset)
        .set("enable.partition.eof", "false")
        .set("statistics.interval.ms", "5000")
        // Larger fetches keep the consumer ahead of the analysis.
        .set("fetch.wait.max.ms", "100")
        .set("queued.min.messages", "200000")
        .set("fetch.queue.backoff.ms", "100");
    for (key, value) in &k.consumer {
        c.set(key, value);
    }
    c.set_log_level(RDKafkaLogLevel::Warning);
    c
}

/// The consumer's context: statistics, errors and rebalances.
pub struct SourceContext {
    driver: Mutex<Option<Driver>>,
    health: Arc<Health>,
    progress: Arc<Progress>,
    errors: LogLimit,
}

impl ClientContext for SourceContext {
    fn stats(&self, stats: Statistics) {
        let mut total_lag = 0i64;
        for (name, topic) in &stats.topics {
            for (id, p) in &topic.partitions {
                // Partition -1 is librdkafka's internal unassigned partition.
                if *id < 0 || p.consumer_lag < 0 {
                    continue;
                }
                total_lag += p.consumer_lag;
                metrics::gauge!(telemetry::CONSUMER_LAG, "topic" => name.clone(), "partition" => id.to_string())
                    .set(p.consumer_lag as f64);
            }
        }
        self.progress.lag.store(total_lag, Ordering::Relaxed);
        let up = stats.brokers.values().any(|b| b.state == "UP");
        self.health.set_brokers_up(up);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        if matches!(
            error.rdkafka_error_code(),
            Some(rdkafka::types::RDKafkaErrorCode::AllBrokersDown)
        ) {
            self.health.set_brokers_up(false);
        }
        if self.errors.allow() {
            warn!(error = %error, "kafka consumer: {reason} (librdkafka retries on its own)");
        }
    }
}

impl ConsumerContext for SourceContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            info!(
                partitions = tpl.count(),
                "partitions revoked: flushing and committing"
            );
            if let Some(driver) = self.driver.lock().expect("driver lock").as_mut() {
                driver.on_revoke(consumer);
            }
            self.health.set_assigned(0);
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(tpl) => {
                let parts: Vec<String> = tpl
                    .elements()
                    .iter()
                    .map(|e| format!("{}/{}", e.topic(), e.partition()))
                    .collect();
                info!(partitions = %parts.join(","), "partitions assigned");
                self.progress.first_assigned.get_or_init(Instant::now);
                let n = consumer
                    .assignment()
                    .map(|a| a.count())
                    .unwrap_or(tpl.count());
                self.health.set_assigned(n);
                if n > 0 {
                    // An assignment means the coordinator answered.
                    self.health.set_brokers_up(true);
                }
            }
            Rebalance::Error(e) => warn!(error = %e, "rebalance error"),
            Rebalance::Revoke(_) => {}
        }
    }
}

/// The state of the consumer thread.
pub struct Driver {
    batcher: Batcher,
    requirements: Requirements,
    to_sink: Option<mpsc::Sender<Batch>>,
    acks: std_mpsc::Receiver<Ack>,
    in_flight: usize,
    closed: Vec<Batch>,
    progress: Arc<Progress>,
    failure: Option<String>,
    invalid_log: LogLimit,
}

impl Driver {
    pub fn new(
        batcher: Batcher,
        requirements: Requirements,
        to_sink: mpsc::Sender<Batch>,
        acks: std_mpsc::Receiver<Ack>,
        progress: Arc<Progress>,
    ) -> Driver {
        Driver {
            batcher,
            requirements,
            to_sink: Some(to_sink),
            acks,
            in_flight: 0,
            closed: Vec::new(),
            progress,
            failure: None,
            invalid_log: LogLimit::new("invalid messages", 10, Duration::from_secs(60)),
        }
    }

    fn poll_timeout(&self, now: Instant) -> Duration {
        match self.batcher.deadline() {
            Some(d) => d.saturating_duration_since(now).min(MAX_POLL),
            None => MAX_POLL,
        }
    }

    fn on_message(&mut self, m: &BorrowedMessage<'_>, now: Instant) {
        let coord = Coord {
            topic: m.topic(),
            partition: m.partition(),
            offset: m.offset(),
        };
        let payload = m.payload().unwrap_or_default();
        self.progress.messages.fetch_add(1, Ordering::Relaxed);
        match event::parse(payload, &self.requirements) {
            Ok(ev) => self.batcher.push_event(coord, &ev, now, &mut self.closed),
            Err(err) => {
                self.progress.count_invalid(err.kind);
                if self.invalid_log.allow() {
                    warn!(
                        kind = %err.kind,
                        reason = %err.reason,
                        topic = coord.topic,
                        partition = coord.partition,
                        offset = coord.offset,
                        "invalid message sent to the dead-letter topic"
                    );
                }
                self.batcher
                    .push_invalid(coord, m.key(), payload, err, now, &mut self.closed);
            }
        }
    }

    /// Sends closed batches to the sink, in order.
    fn dispatch(&mut self) {
        for batch in self.closed.drain(..) {
            let Some(tx) = &self.to_sink else {
                break;
            };
            metrics::counter!(telemetry::BATCHES, "closed_by" => batch.closed_by.as_str())
                .increment(1);
            metrics::histogram!(telemetry::BATCH_EVENTS).record(batch.valid() as f64);
            debug!(
                seq = batch.seq,
                valid = batch.valid(),
                invalid = batch.invalid.len(),
                closed_by = batch.closed_by.as_str(),
                "batch closed"
            );
            if tx.blocking_send(batch).is_err() {
                self.failure
                    .get_or_insert_with(|| "the sink stopped unexpectedly".to_string());
                break;
            }
            self.in_flight += 1;
        }
        self.closed.clear();
    }

    /// Commits every batch the sink has acknowledged; with `wait`, waits for all in flight.
    fn settle<C: ConsumerContext>(&mut self, consumer: &BaseConsumer<C>, wait: bool) {
        while self.in_flight > 0 && self.failure.is_none() {
            let ack = if wait {
                match self.acks.recv() {
                    Ok(a) => a,
                    Err(_) => {
                        self.failure = Some("the sink stopped unexpectedly".into());
                        break;
                    }
                }
            } else {
                match self.acks.try_recv() {
                    Ok(a) => a,
                    Err(std_mpsc::TryRecvError::Empty) => break,
                    Err(std_mpsc::TryRecvError::Disconnected) => {
                        self.failure = Some("the sink stopped unexpectedly".into());
                        break;
                    }
                }
            };
            self.in_flight -= 1;
            match ack {
                Ack::Delivered { sources, messages } => {
                    if commit::commit(consumer, &sources, COMMIT_ATTEMPTS) {
                        self.progress
                            .committed_messages
                            .fetch_add(messages, Ordering::Relaxed);
                        metrics::counter!(telemetry::COMMITTED).increment(messages);
                    }
                }
                Ack::Failed(reason) => self.failure = Some(reason),
            }
        }
    }

    fn close_and_settle<C: ConsumerContext>(
        &mut self,
        consumer: &BaseConsumer<C>,
        reason: CloseReason,
    ) {
        if self.failure.is_none() {
            self.closed.extend(self.batcher.close(reason));
            self.dispatch();
        }
        self.settle(consumer, true);
    }

    fn on_revoke<C: ConsumerContext>(&mut self, consumer: &BaseConsumer<C>) {
        self.close_and_settle(consumer, CloseReason::Rebalance);
    }
}

/// Runs the consumer loop on the current (blocking) thread until `shutdown`
/// or a delivery failure. At shutdown the open batch is closed, delivered and
/// committed before this returns.
pub fn consume(
    k: &KafkaSettings,
    driver: Driver,
    health: Arc<Health>,
    progress: Arc<Progress>,
    shutdown: CancellationToken,
) -> Result<(), String> {
    let context = SourceContext {
        driver: Mutex::new(Some(driver)),
        health: health.clone(),
        progress,
        errors: LogLimit::new("kafka consumer errors", 5, Duration::from_secs(60)),
    };
    let consumer: BaseConsumer<SourceContext> = consumer_config(k)
        .create_with_context(context)
        .map_err(|e| format!("cannot create the Kafka consumer: {e}"))?;
    consumer
        .subscribe(&[&k.input_topic])
        .map_err(|e| format!("cannot subscribe to {}: {e}", k.input_topic))?;
    info!(topic = %k.input_topic, group = %k.group_id, "consuming");

    // One clock read per turn: the loop runs once per message.
    let mut timeout = MAX_POLL;
    while !shutdown.is_cancelled() {
        let polled = consumer.poll(timeout);
        let now = Instant::now();
        health.beat(now);
        let mut guard = lock(&consumer);
        let Some(driver) = guard.as_mut() else {
            break;
        };
        match polled {
            Some(Ok(m)) => driver.on_message(&m, now),
            Some(Err(e)) if consumer.context().errors.allow() => {
                warn!(error = %e, "consumer error (librdkafka retries on its own)");
            }
            Some(Err(_)) | None => {}
        }
        driver.closed.extend(driver.batcher.poll_expired(now));
        driver.dispatch();
        driver.settle(&consumer, false);
        if let Some(reason) = &driver.failure {
            error!(reason = %reason, "stopping: a batch could not be delivered and is not committed");
            break;
        }
        timeout = driver.poll_timeout(now);
    }

    let mut driver = lock(&consumer).take().expect("driver present until here");
    driver.close_and_settle(&consumer, CloseReason::Shutdown);
    driver.to_sink = None;
    health.stopped();
    match driver.failure {
        Some(reason) => Err(reason),
        None => {
            info!("all batches delivered and committed");
            Ok(())
        }
    }
}

fn lock(consumer: &BaseConsumer<SourceContext>) -> std::sync::MutexGuard<'_, Option<Driver>> {
    consumer.context().driver.lock().expect("driver lock")
}

/// The group's committed offsets on partitions `0..partitions` of the input
/// topic (-1 where nothing is committed), for tests and tools.
pub fn committed_offsets(
    k: &KafkaSettings,
    partitions: i32,
    timeout: Duration,
) -> KafkaResult<Vec<i64>> {
    let consumer: BaseConsumer = consumer_config(k).create()?;
    let mut tpl = rdkafka::TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition(&k.input_topic, p);
    }
    let committed = consumer.committed_offsets(tpl, timeout)?;
    Ok((0..partitions)
        .map(|p| {
            match committed
                .find_partition(&k.input_topic, p)
                .map(|e| e.offset())
            {
                Some(rdkafka::Offset::Offset(o)) => o,
                _ => -1,
            }
        })
        .collect())
}
