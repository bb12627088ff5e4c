//! Window checkpoints: where each input partition stands, kept in a Kafka topic.
//!
//! In window mode a committed offset alone does not say how to go on from it
//! as the original run would have: lateness depends on the partition's
//! progress *before* the offset, and events after it may belong to windows
//! that were already emitted. A [`Checkpoint`] carries both. Before offsets
//! are committed, the consumer thread writes each partition's checkpoint to
//! `kafka.checkpoint_topic` and waits for the broker's acknowledgement
//! ([`CheckpointWriter`]); on assignment it reads the topic back
//! ([`read_latest`]) and weighs what it found against the committed offset
//! ([`resolve`]).
//!
//! Why a topic rather than the offset commit's metadata field: not every
//! Kafka-protocol broker returns that metadata, and a topic is readable with
//! any client (`kcat -C -t login-metrics-checkpoints -K'\t'`). Records are
//! keyed by group, input topic and partition, so a compacted topic keeps the
//! latest checkpoint of each; the service creates the topic compacted when it
//! is missing.
//!
//! The checkpoint is written *before* the commit. If the process dies in
//! between, the stored checkpoint is ahead of the committed offset; everything
//! below the checkpoint's offset is already delivered, so the next reader
//! skips those messages as replayed and goes on from the checkpoint.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message;
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext};
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::kafka::{self, KafkaContext};
use crate::settings::KafkaSettings;

/// The record format's name, in every value.
pub const FORMAT: &str = "login-metrics/checkpoint/1";

/// The first and the longest pause between two looks for a checkpoint's
/// acknowledgement: a commit waits on it, and the broker usually answers
/// within milliseconds; the pause doubles up to the longest while it does not.
const ACK_WAIT_FIRST: Duration = Duration::from_micros(100);
const ACK_WAIT_MAX: Duration = Duration::from_millis(10);

pub use crate::work::Checkpoint;

/// A checkpoint record's value, as stored in the topic.
#[derive(Debug, Serialize, Deserialize)]
struct Stored {
    format: String,
    group: String,
    topic: String,
    partition: i32,
    offset: i64,
    progress_ms: Option<i64>,
    closed_through_ms: Option<i64>,
}

/// The record key: one per group, input topic and partition, so that
/// compaction keeps the latest checkpoint of each.
pub fn key(group: &str, topic: &str, partition: i32) -> String {
    format!("{group}/{topic}/{partition}")
}

/// The record value (JSON).
pub fn value(group: &str, topic: &str, partition: i32, c: &Checkpoint) -> String {
    serde_json::to_string(&Stored {
        format: FORMAT.to_string(),
        group: group.to_string(),
        topic: topic.to_string(),
        partition,
        offset: c.offset,
        progress_ms: c.progress_ms,
        closed_through_ms: c.closed_through_ms,
    })
    .expect("a checkpoint serializes")
}

/// Parses a record value: its group, topic and partition, and the checkpoint;
/// `None` for anything else (another format, another program's record).
pub fn parse(value: &[u8]) -> Option<(String, String, i32, Checkpoint)> {
    let s: Stored = serde_json::from_slice(value).ok()?;
    if s.format != FORMAT {
        return None;
    }
    Some((
        s.group,
        s.topic,
        s.partition,
        Checkpoint {
            offset: s.offset,
            progress_ms: s.progress_ms,
            closed_through_ms: s.closed_through_ms,
        },
    ))
}

/// How to start reading a partition, given what was committed and stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Restore {
    /// No checkpoint: the partition starts without window state (a first run).
    Fresh,
    /// Go on from this checkpoint; messages below its offset are replayed.
    From(Checkpoint),
    /// The committed offset is past the stored checkpoint, so the checkpoint
    /// does not describe it (the group was committed by something else, or the
    /// checkpoint topic lost records): the partition starts without state.
    Stale { committed: i64, checkpoint: i64 },
}

/// Weighs the stored checkpoint against the committed offset. The checkpoint
/// is written before the commit, so a sound pair has `committed <=
/// checkpoint.offset`; a checkpoint ahead of the commit means the process
/// stopped between the two, and the checkpoint is the truth.
pub fn resolve(committed: Option<i64>, stored: Option<Checkpoint>) -> Restore {
    match (committed, stored) {
        (_, None) => Restore::Fresh,
        (Some(o), Some(c)) if o > c.offset => Restore::Stale {
            committed: o,
            checkpoint: c.offset,
        },
        (_, Some(c)) => Restore::From(c),
    }
}

/// Records the first failed delivery of a checkpoint write.
struct WriterContext {
    failure: Mutex<Option<String>>,
}

impl ClientContext for WriterContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        kafka::route_log("checkpoint writer", level, fac, message);
    }
    fn error(&self, error: KafkaError, reason: &str) {
        kafka::report_error("checkpoint writer", &error, reason);
    }
}

impl ProducerContext for WriterContext {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        if let Err((e, _)) = result {
            let mut f = self.failure.lock().expect("checkpoint failure lock");
            f.get_or_insert_with(|| e.to_string());
        }
    }
}

/// The checkpoint topic of one consumer group: writes checkpoints and waits
/// for the broker to acknowledge them, reads them back on assignment.
pub struct CheckpointStore {
    producer: BaseProducer<WriterContext>,
    reader: ClientConfig,
    topic: String,
    group: String,
    timeout: Duration,
}

impl CheckpointStore {
    /// A store using the service's producer and consumer settings (security
    /// included); writes are sent at once.
    pub fn new(k: &KafkaSettings) -> Result<CheckpointStore, KafkaError> {
        let producer = kafka::checkpoint_writer(k).create_with_context(WriterContext {
            failure: Mutex::new(None),
        })?;
        Ok(CheckpointStore {
            producer,
            reader: kafka::checkpoint_reader(k),
            topic: k.checkpoint_topic.clone(),
            group: k.group_id.clone(),
            timeout: k.delivery_timeout + Duration::from_secs(5),
        })
    }

    /// The latest stored checkpoint of each of `partitions` of `topic`.
    pub fn read_latest(
        &self,
        topic: &str,
        partitions: &[i32],
        timeout: Duration,
    ) -> Result<HashMap<i32, Checkpoint>, String> {
        read_latest(
            &self.reader,
            &self.topic,
            &self.group,
            topic,
            partitions,
            timeout,
        )
    }

    /// Writes one checkpoint per `(partition, checkpoint)` of `topic` and
    /// returns once the broker has acknowledged all of them.
    pub fn write(&self, topic: &str, items: &[(i32, Checkpoint)]) -> Result<(), String> {
        if items.is_empty() {
            return Ok(());
        }
        *self.context_failure() = None;
        for (partition, c) in items {
            let k = key(&self.group, topic, *partition);
            let v = value(&self.group, topic, *partition, c);
            let mut record = BaseRecord::to(&self.topic).key(&k).payload(&v);
            loop {
                match self.producer.send(record) {
                    Ok(()) => break,
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                        record = r;
                        self.producer.poll(Duration::from_millis(10));
                    }
                    Err((e, _)) => return Err(format!("cannot send a checkpoint: {e}")),
                }
            }
        }
        self.wait_acknowledged()?;
        match self.context_failure().take() {
            Some(e) => Err(format!("checkpoint not delivered: {e}")),
            None => Ok(()),
        }
    }

    /// Waits until every checkpoint sent is acknowledged (or failed), serving
    /// delivery reports as they come. `Producer::flush` would serve them in
    /// polls that each last until their full 100 ms have passed, so every
    /// commit would wait that long whatever the broker's latency; a poll
    /// with a shorter timeout spins through its last millisecond. So: look
    /// without waiting, and sleep between looks.
    fn wait_acknowledged(&self) -> Result<(), String> {
        let deadline = Instant::now() + self.timeout;
        let mut pause = ACK_WAIT_FIRST;
        loop {
            // Serves the delivery reports that arrived (their callback
            // records failures). A message stays counted in flight until its
            // report is served, so 0 means every report was.
            while self.producer.in_flight_count() > 0 && self.serve_one_report() {}
            if self.producer.in_flight_count() == 0 {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "checkpoints not acknowledged within {:?}",
                    self.timeout
                ));
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(ACK_WAIT_MAX);
        }
    }

    /// Serves at most one waiting event without blocking; whether the count
    /// in flight went down.
    fn serve_one_report(&self) -> bool {
        let before = self.producer.in_flight_count();
        self.producer.poll(Duration::ZERO);
        self.producer.in_flight_count() < before
    }

    fn context_failure(&self) -> std::sync::MutexGuard<'_, Option<String>> {
        self.producer
            .context()
            .failure
            .lock()
            .expect("checkpoint failure lock")
    }
}

/// Reads the checkpoint topic `store` to its end and returns the latest
/// checkpoint of each of `partitions` of `topic` written by `group`.
fn read_latest(
    consumer: &ClientConfig,
    store: &str,
    group: &str,
    topic: &str,
    partitions: &[i32],
    timeout: Duration,
) -> Result<HashMap<i32, Checkpoint>, String> {
    let deadline = Instant::now() + timeout;
    let reader: BaseConsumer<KafkaContext> = consumer
        .create_with_context(KafkaContext("checkpoint reader"))
        .map_err(|e| format!("cannot create the checkpoint reader: {e}"))?;
    let md = reader
        .fetch_metadata(Some(store), timeout)
        .map_err(|e| format!("cannot read the metadata of {store}: {e}"))?;
    let Some(t) = md.topics().iter().find(|t| t.name() == store) else {
        return Err(format!("the checkpoint topic {store} does not exist"));
    };
    if let Some(e) = t.error() {
        return Err(format!(
            "the checkpoint topic {store}: {:?}",
            RDKafkaErrorCode::from(e)
        ));
    }
    let mut tpl = TopicPartitionList::new();
    let mut pending = Vec::new();
    for p in t.partitions() {
        let (lo, hi) = reader
            .fetch_watermarks(store, p.id(), remaining(deadline))
            .map_err(|e| format!("cannot read the offsets of {store}: {e}"))?;
        if hi > lo {
            tpl.add_partition_offset(store, p.id(), Offset::Beginning)
                .map_err(|e| e.to_string())?;
            pending.push(p.id());
        }
    }
    let mut found = HashMap::new();
    if pending.is_empty() {
        return Ok(found);
    }
    reader
        .assign(&tpl)
        .map_err(|e| format!("cannot read {store}: {e}"))?;
    // The end of each partition is where librdkafka reports EOF: a broker's
    // high watermark is not trusted to be exact.
    while !pending.is_empty() {
        if Instant::now() >= deadline {
            return Err(format!(
                "timed out reading the checkpoint topic {store} after {}",
                humantime::format_duration(timeout)
            ));
        }
        match reader.poll(remaining(deadline).min(Duration::from_millis(200))) {
            Some(Ok(m)) => {
                if let Some((g, t, partition, cp)) = m.payload().and_then(parse) {
                    if g == group && t == topic && partitions.contains(&partition) {
                        found.insert(partition, cp);
                    }
                }
            }
            Some(Err(KafkaError::PartitionEOF(p))) => pending.retain(|x| *x != p),
            Some(Err(e)) => return Err(format!("cannot read {store}: {e}")),
            None => {}
        }
    }
    Ok(found)
}

fn remaining(deadline: Instant) -> Duration {
    deadline.saturating_duration_since(Instant::now())
}

/// Creates the checkpoint topic, compacted, when it does not exist. A topic
/// that exists is left as it is. A broker that cannot be reached yet is
/// waited for (a service started before Kafka), until `shutdown`.
pub async fn ensure_topic(k: &KafkaSettings, shutdown: &CancellationToken) -> anyhow::Result<()> {
    let admin: std::sync::Arc<AdminClient<KafkaContext>> = std::sync::Arc::new(
        kafka::admin(k)
            .create_with_context(KafkaContext("admin"))
            .context("cannot create the Kafka admin client")?,
    );
    let store = &k.checkpoint_topic;
    let mut wait = Duration::from_secs(1);
    let mut logged: Option<Instant> = None;
    let md = loop {
        let (client, topic) = (admin.clone(), store.clone());
        let fetched = tokio::task::spawn_blocking(move || {
            client
                .inner()
                .fetch_metadata(Some(&topic), Duration::from_secs(10))
        })
        .await
        .context("the metadata request panicked")?;
        match fetched {
            Ok(md) => break md,
            // Anything but an unreachable broker will not pass by waiting.
            Err(e)
                if !matches!(
                    e.rdkafka_error_code(),
                    Some(
                        RDKafkaErrorCode::BrokerTransportFailure
                            | RDKafkaErrorCode::AllBrokersDown
                            | RDKafkaErrorCode::OperationTimedOut
                            | RDKafkaErrorCode::RequestTimedOut
                            | RDKafkaErrorCode::BrokerNotAvailable
                    )
                ) =>
            {
                return Err(anyhow::Error::new(e).context(format!(
                    "cannot read the metadata of {store} (kafka.checkpoint_topic)"
                )));
            }
            Err(e) => {
                if logged.is_none_or(|t| t.elapsed() >= Duration::from_secs(60)) {
                    tracing::warn!(error = %e, topic = %store, "cannot read the checkpoint topic's metadata yet (kafka.checkpoint_topic); retrying until the broker answers");
                    logged = Some(Instant::now());
                }
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(wait) => {}
                }
                wait = (wait * 2).min(Duration::from_secs(10));
            }
        }
    };
    let exists = md
        .topics()
        .iter()
        .any(|t| t.name() == store && t.error().is_none() && !t.partitions().is_empty());
    if exists {
        return Ok(());
    }
    let topic =
        NewTopic::new(store, 1, TopicReplication::Fixed(-1)).set("cleanup.policy", "compact");
    let results = admin
        .create_topics(&[topic], &AdminOptions::new())
        .await
        .with_context(|| format!("cannot create {store} (kafka.checkpoint_topic)"))?;
    for r in results {
        match r {
            Ok(_) => tracing::info!(topic = %store, "checkpoint topic created (compacted)"),
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((_, e)) => {
                return Err(anyhow!(
                    "kafka.checkpoint_topic: cannot create {store}: {e}; create it (cleanup.policy=compact) or grant the service CreateTopics"
                ))
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_value_round_trips_and_foreign_values_are_ignored() {
        let c = Checkpoint {
            offset: 41,
            progress_ms: Some(1_700_000_000_000),
            closed_through_ms: None,
        };
        let v = value("g", "user-login", 2, &c);
        assert_eq!(
            parse(v.as_bytes()),
            Some(("g".into(), "user-login".into(), 2, c))
        );
        assert_eq!(key("g/x", "user-login", 2), "g/x/user-login/2");
        assert_eq!(parse(b"not json"), None);
        assert_eq!(parse(v.replace(FORMAT, "other/1").as_bytes()), None);
    }

    #[test]
    fn the_checkpoint_wins_over_an_older_commit_and_loses_to_a_newer_one() {
        let c = Checkpoint {
            offset: 100,
            progress_ms: Some(5),
            closed_through_ms: Some(0),
        };
        assert_eq!(resolve(None, None), Restore::Fresh);
        assert_eq!(resolve(Some(7), None), Restore::Fresh);
        assert_eq!(resolve(None, Some(c)), Restore::From(c));
        assert_eq!(resolve(Some(100), Some(c)), Restore::From(c));
        // Written, then the process died before the commit.
        assert_eq!(resolve(Some(60), Some(c)), Restore::From(c));
        assert_eq!(
            resolve(Some(101), Some(c)),
            Restore::Stale {
                committed: 101,
                checkpoint: 100
            }
        );
    }
}
