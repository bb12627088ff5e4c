//! Window checkpoints: where each input partition stands, kept in a Kafka topic.
//!
//! In window mode a committed offset alone does not say how to go on from it
//! as the original run would have: lateness depends on the partition's
//! progress *before* the offset, and events after it may belong to windows
//! that were already emitted. A [`Checkpoint`] carries both. Before offsets
//! are committed, the consumer thread writes each partition's checkpoint to
//! `kafka.checkpoint_topic` and waits for the broker's acknowledgement
//! ([`CheckpointStore::write`]); on assignment it reads the topic back
//! ([`CheckpointStore::read_latest`]) and weighs what it found against the committed offset
//! ([`resolve`]).
//!
//! Why a topic rather than the offset commit's metadata field: not every
//! Kafka-protocol broker returns that metadata, and a topic is readable with
//! any client (`kcat -C -t login-metrics-checkpoints -K'\t'`). Records are
//! keyed by group, input topic, partition and the owner's epoch
//! ([`epoch_key`]), so a compacted topic keeps the latest checkpoint of each;
//! each assignment claims a new epoch ([`CheckpointStore::claim`]) and
//! readers take the highest, so a member that lost a partition without
//! knowing it cannot write over its new owner. The service creates the topic
//! compacted when it is missing, with segments small enough that the part
//! the cleaner has not reached yet stays small ([`TOPIC_CONFIG`]).
//!
//! What a read on assignment costs must not grow with uptime: the store keeps
//! what it has read (the latest checkpoint of each of its group's partitions,
//! and how far it read each partition of the checkpoint topic), so a later
//! assignment reads only the records written since. A read goes to the high
//! watermarks taken when it starts, however long that takes while it
//! progresses; only a read that stops progressing fails.
//!
//! The checkpoint is written *before* the commit. If the process dies in
//! between, the stored checkpoint is ahead of the committed offset; everything
//! below the checkpoint's offset is already delivered, so the next reader
//! skips those messages as replayed and goes on from the checkpoint.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, ResourceSpecifier, TopicReplication};
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
use crate::sink::publisher::OutRecord;
use crate::work::{CloseReason, Closure, Logged, PaneMark};

/// The record format's name, in every value.
pub const FORMAT_1: &str = "login-metrics/checkpoint/1";

/// The first and the longest pause between two looks for a checkpoint's
/// acknowledgement: a commit waits on it, and the broker usually answers
/// within milliseconds; the pause doubles up to the longest while it does not.
const ACK_WAIT_FIRST: Duration = Duration::from_micros(100);
const ACK_WAIT_MAX: Duration = Duration::from_millis(10);

/// The settings of the checkpoint topic the service creates. A read from the
/// start costs what the topic holds: one record per key once cleaned, plus
/// what the log cleaner has not reached yet. The cleaner never touches the
/// active segment, and Kafka's defaults let that grow to 1 GiB or a week of
/// writes, so these keep the uncleaned part to a few thousand records.
pub const TOPIC_CONFIG: [(&str, &str); 7] = [
    // One record per key is all a reader needs.
    ("cleanup.policy", "compact"),
    // The active segment rolls at 1 MiB (the least Kafka 4 accepts), a few
    // thousand checkpoints, whatever the write rate.
    ("segment.bytes", "1048576"),
    // ...and after 10 minutes at a slow rate (checked on the next write; Kafka
    // 5 accepts no less than a minute), so its records become cleanable too.
    ("segment.ms", "600000"),
    // A rolled segment is cleaned within 10 minutes even if the dirty ratio
    // is not reached; for a compacted topic Kafka also rolls the active
    // segment by this lag.
    ("max.compaction.lag.ms", "600000"),
    // Cleanable as soon as rolled: nothing reads a superseded checkpoint.
    ("min.compaction.lag.ms", "0"),
    // The cleaned part is one small record per key, so cleaning is cheap:
    // clean once a tenth of the log is superseded (the default waits for half).
    ("min.cleanable.dirty.ratio", "0.1"),
    // The service writes no tombstones, but an operator may, to drop a
    // partition's checkpoint. Kafka's default day made explicit, because the
    // in-process view relies on it: a reader that goes on from where it
    // stopped sees a tombstone only if it reads again within this time
    // (the view starts again from the beginning after `REREAD_AFTER`).
    ("delete.retention.ms", "86400000"),
];

/// How old the in-process view of the checkpoint topic may be before a read
/// starts again from the beginning instead of going on from where the last
/// one stopped: half of the topic's `delete.retention.ms`, so that no
/// tombstone written since can have been cleaned away unseen. A read from
/// the beginning costs what compaction leaves, not the topic's history.
const REREAD_AFTER: Duration = Duration::from_secs(12 * 3600);

/// How many times a read that stops progressing starts again (with a new
/// client, from where it got to) before the read fails.
const READ_ATTEMPTS: u32 = 3;

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
    /// Format 1: every window ending at or before this was closed and
    /// emitted (one value for all the partitions of an instance).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    closed_through_ms: Option<i64>,
    #[serde(default)]
    closed_ms: Option<i64>,
    #[serde(default)]
    emitted_ms: Option<i64>,
    #[serde(default)]
    closures: Vec<StoredClosure>,
    #[serde(default)]
    previous: Option<i64>,
    /// The owner's epoch (see [`epoch_key`]); 0 for records written before
    /// epochs.
    #[serde(default, skip_serializing_if = "is_zero")]
    epoch: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    dead_letters_through: Option<i64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    panes: Vec<StoredPane>,
}

#[derive(Debug, Serialize, Deserialize)]
struct StoredPane {
    start_ms: i64,
    next_pane: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    through: Option<i64>,
}

fn is_zero(e: &u64) -> bool {
    *e == 0
}

#[derive(Debug, Serialize, Deserialize)]
struct StoredClosure {
    offset: i64,
    through_ms: i64,
    reason: String,
}

/// The format written; [`FORMAT_1`] is still read.
pub const FORMAT_2: &str = "login-metrics/checkpoint/2";

/// The record key: one per group, input topic and partition, so that
/// compaction keeps the latest checkpoint of each.
pub fn key(group: &str, topic: &str, partition: i32) -> String {
    format!("{group}/{topic}/{partition}")
}

/// The key of a checkpoint written under `epoch`. Each assignment of a
/// partition claims an epoch above every one its checkpoint topic holds, and
/// a reader takes the checkpoint of the highest epoch: a member that lost the
/// partition and does not know it yet (a zombie) writes under its old epoch,
/// beside the new owner's key rather than over it, and is not read.
/// Compaction keeps the latest record of each epoch; the owner deletes the
/// older epochs' keys once it has claimed its own.
pub fn epoch_key(group: &str, topic: &str, partition: i32, epoch: u64) -> String {
    if epoch == 0 {
        key(group, topic, partition)
    } else {
        // `#` is not allowed in a topic name, so no other key looks like this.
        format!("{}#{epoch}", key(group, topic, partition))
    }
}

/// The format of an instance's record of its last committed packets.
pub const LOGGED_FORMAT: &str = "login-metrics/logged/1";

fn logged_prefix(group: &str) -> String {
    format!("{group}/metrics-log/")
}

/// The key of the record, kept in the checkpoint topic, of the packets the
/// last transaction of the instance with `transactional_id` committed: what
/// its metrics log must end with (exactly once).
pub fn logged_key(group: &str, transactional_id: &str) -> String {
    format!("{}{transactional_id}", logged_prefix(group))
}

#[derive(Serialize, Deserialize)]
struct LoggedRecord {
    format: String,
    packets: Vec<LoggedPacket>,
}

#[derive(Serialize, Deserialize)]
struct LoggedPacket {
    packet_id: String,
    partition: i32,
    offset: i64,
}

/// The value of a record of committed packets.
pub fn logged_value(packets: &[Logged]) -> String {
    serde_json::to_string(&LoggedRecord {
        format: LOGGED_FORMAT.to_string(),
        packets: packets
            .iter()
            .map(|p| LoggedPacket {
                packet_id: p.packet_id.clone(),
                partition: p.partition,
                offset: p.offset,
            })
            .collect(),
    })
    .expect("a record of packets serializes")
}

/// Parses a record of committed packets; `None` for anything else.
pub fn parse_logged(value: &[u8]) -> Option<Vec<Logged>> {
    let r: LoggedRecord = serde_json::from_slice(value).ok()?;
    (r.format == LOGGED_FORMAT).then(|| {
        r.packets
            .into_iter()
            .map(|p| Logged {
                packet_id: p.packet_id,
                partition: p.partition,
                offset: p.offset,
            })
            .collect()
    })
}

/// The record value (JSON).
pub fn value(group: &str, topic: &str, partition: i32, c: &Checkpoint) -> String {
    value_at(group, topic, partition, 0, c)
}

/// The record value (JSON) of a checkpoint written under `epoch`.
pub fn value_at(group: &str, topic: &str, partition: i32, epoch: u64, c: &Checkpoint) -> String {
    serde_json::to_string(&Stored {
        format: FORMAT_2.to_string(),
        group: group.to_string(),
        topic: topic.to_string(),
        partition,
        offset: c.offset,
        progress_ms: c.progress_ms,
        closed_through_ms: None,
        closed_ms: c.closed_ms,
        emitted_ms: c.emitted_ms,
        closures: c
            .closures
            .iter()
            .map(|x| StoredClosure {
                offset: x.offset,
                through_ms: x.through_ms,
                reason: x.reason.as_str().to_string(),
            })
            .collect(),
        previous: c.previous,
        epoch,
        dead_letters_through: c.dead_letters_through,
        panes: c
            .panes
            .iter()
            .map(|m| StoredPane {
                start_ms: m.start_ms,
                next_pane: m.next_pane,
                through: m.through,
            })
            .collect(),
    })
    .expect("a checkpoint serializes")
}

/// Parses a record value: its group, topic and partition, and the checkpoint;
/// `None` for anything else (another format, another program's record).
pub fn parse(value: &[u8]) -> Option<(String, String, i32, Checkpoint)> {
    parse_at(value).map(|(g, t, p, _, c)| (g, t, p, c))
}

/// [`parse`], with the epoch the record was written under.
pub fn parse_at(value: &[u8]) -> Option<(String, String, i32, u64, Checkpoint)> {
    let s: Stored = serde_json::from_slice(value).ok()?;
    let epoch = s.epoch;
    let c = if s.format == FORMAT_2 {
        let mut closures = Vec::with_capacity(s.closures.len());
        for x in s.closures {
            closures.push(Closure {
                offset: x.offset,
                through_ms: x.through_ms,
                reason: CloseReason::parse(&x.reason)?,
            });
        }
        Checkpoint {
            offset: s.offset,
            progress_ms: s.progress_ms,
            closed_ms: s.closed_ms,
            emitted_ms: s.emitted_ms,
            closures,
            previous: s.previous,
            dead_letters_through: s.dead_letters_through,
            panes: s
                .panes
                .iter()
                .map(|m| PaneMark {
                    start_ms: m.start_ms,
                    next_pane: m.next_pane,
                    through: m.through,
                })
                .collect(),
        }
    } else if s.format == FORMAT_1 {
        // Format 1 knew only what was emitted: its windows' events re-read
        // are replayed, as that version did.
        Checkpoint {
            offset: s.offset,
            progress_ms: s.progress_ms,
            emitted_ms: s.closed_through_ms,
            ..Checkpoint::default()
        }
    } else {
        return None;
    };
    Some((s.group, s.topic, s.partition, epoch, c))
}

/// How to start reading a partition, given what was committed and stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Restore {
    /// No checkpoint: the partition starts without window state (a first run).
    Fresh,
    /// Go on from this checkpoint; messages below its offset are replayed.
    From(Checkpoint),
    /// The committed offset is past the stored checkpoint, so the checkpoint
    /// does not describe it (the group was committed by something else, or the
    /// checkpoint topic lost records): the partition starts without state.
    Stale { committed: i64, checkpoint: i64 },
    /// The committed offset is behind the one the group had when the
    /// checkpoint was written: someone reset it on purpose (`kafka-consumer-groups --reset-offsets`, to rebuild the
    /// output). Reading starts there, without window state.
    Reset { committed: i64, checkpoint: i64 },
}

/// Weighs the stored checkpoint against the committed offset. The checkpoint
/// is written before the commit, so a sound pair has the committed offset
/// between the one committed when the checkpoint was written and the
/// checkpoint's own (the process stopped between the write and the commit,
/// or a commit was applied but its answer lost: the checkpoint is the truth,
/// and what lies between was delivered). A committed offset below that was
/// set by someone else and is honoured; one past the checkpoint means the
/// checkpoint does not describe it.
pub fn resolve(committed: Option<i64>, stored: Option<Checkpoint>) -> Restore {
    match (committed, stored) {
        (_, None) => Restore::Fresh,
        (Some(o), Some(c)) if o > c.offset => Restore::Stale {
            committed: o,
            checkpoint: c.offset,
        },
        (Some(o), Some(c)) if c.previous.is_some_and(|p| o < p) => Restore::Reset {
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
    /// What the reads so far found; a read goes on from it.
    view: Mutex<View>,
    /// The epoch this process writes each claimed partition's checkpoints
    /// under (see [`epoch_key`]).
    epochs: Mutex<HashMap<(String, i32), u64>>,
}

/// What one read of the checkpoint topic found and what it cost.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Read {
    /// The latest stored checkpoint of each partition asked for that has one.
    pub checkpoints: HashMap<i32, Checkpoint>,
    /// How many records this read took from the checkpoint topic (every
    /// group's): the records written since the previous read, or, when it
    /// started from the beginning, what the topic holds.
    pub records: u64,
    /// Whether it started from the beginning of the topic (the first read,
    /// an old view, or a topic that no longer matches the view).
    pub from_start: bool,
}

/// The checkpoint topic as this process has read it: the latest checkpoint
/// of each input partition of its group, and per partition of the
/// checkpoint topic the offset to read next. A prefix of each partition's
/// log is always applied whole, in order, so a read that stopped half-way
/// leaves a view a later read can go on from.
#[derive(Debug, Default)]
struct View {
    /// Per input topic and partition, the latest checkpoint of each epoch
    /// whose key holds one.
    latest: HashMap<(String, i32), BTreeMap<u64, Checkpoint>>,
    /// Per input topic and partition, the highest epoch seen in a key.
    top: HashMap<(String, i32), u64>,
    next: HashMap<i32, i64>,
    /// When the last read that went to the end started (see `REREAD_AFTER`).
    synced: Option<Instant>,
    /// Exactly once: each instance's record of the packets its last
    /// transaction committed ([`logged_key`]), by key.
    logged: HashMap<Vec<u8>, Vec<u8>>,
}

impl View {
    /// Forgets everything: the next read starts from the beginning.
    fn reset(&mut self) {
        *self = View::default();
    }

    /// Whether a read at `now` must start from the beginning.
    fn stale(&self, now: Instant) -> bool {
        self.synced
            .is_none_or(|t| now.saturating_duration_since(t) >= REREAD_AFTER)
    }

    /// Where to read `partition` of the checkpoint topic from, given its low
    /// and high watermarks: `None` from the beginning. `Err` when the view
    /// cannot go on: the partition holds fewer records than were read (the
    /// topic was deleted and created again) or lost records not read yet.
    fn start(&self, partition: i32, low: i64, high: i64) -> Result<Option<i64>, ()> {
        match self.next.get(&partition) {
            None => Ok(None),
            Some(&n) if n > high || n < low => Err(()),
            Some(&n) => Ok(Some(n)),
        }
    }

    /// Applies one record of the checkpoint topic, read in order.
    fn apply(
        &mut self,
        group: &str,
        partition: i32,
        offset: i64,
        record_key: Option<&[u8]>,
        payload: Option<&[u8]>,
    ) {
        if let Some(k) = record_key.filter(|k| k.starts_with(logged_prefix(group).as_bytes())) {
            match payload {
                Some(v) => drop(self.logged.insert(k.to_vec(), v.to_vec())),
                None => drop(self.logged.remove(k)),
            }
        }
        match payload {
            Some(v) => {
                if let Some((g, t, p, e, c)) = parse_at(v) {
                    if g == group {
                        let top = self.top.entry((t.clone(), p)).or_insert(0);
                        *top = (*top).max(e);
                        self.latest.entry((t, p)).or_default().insert(e, c);
                    }
                }
            }
            // A tombstone drops the checkpoint its key names, as compaction
            // will, so the view says what a reader from the start would find.
            None => {
                if let Some(k) = record_key {
                    for ((t, p), epochs) in self.latest.iter_mut() {
                        epochs.retain(|e, _| epoch_key(group, t, *p, *e).as_bytes() != k);
                    }
                    self.latest.retain(|_, epochs| !epochs.is_empty());
                }
            }
        }
        let next = self.next.entry(partition).or_insert(0);
        *next = (*next).max(offset + 1);
    }

    /// Records that `partition` was read to `end` (its end when read).
    fn reached(&mut self, partition: i32, end: i64) {
        let next = self.next.entry(partition).or_insert(0);
        *next = (*next).max(end);
    }

    /// The latest checkpoints of `partitions` of `topic`: each one's of
    /// the highest epoch.
    fn latest(&self, topic: &str, partitions: &[i32]) -> HashMap<i32, Checkpoint> {
        partitions
            .iter()
            .filter_map(|&p| {
                self.latest
                    .get(&(topic.to_string(), p))
                    .and_then(|epochs| epochs.last_key_value())
                    .map(|(_, c)| (p, c.clone()))
            })
            .collect()
    }
}

/// Why one attempt at reading the checkpoint topic stopped.
enum ReadError {
    /// Another attempt may succeed: nothing came for too long, or the
    /// client reported an error.
    Retry(String),
    /// No attempt will succeed.
    Fatal(String),
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
            view: Mutex::new(View::default()),
            epochs: Mutex::new(HashMap::new()),
        })
    }

    /// Takes over `items` (partition, the checkpoint reading starts from)
    /// of `topic` after an assignment and a [`Self::read`]: writes each
    /// under an epoch above every one read for it, then deletes the keys of
    /// the older epochs. From then on a member that still writes this
    /// partition under an older epoch writes where no reader looks.
    pub fn claim(&self, topic: &str, items: &[(i32, Checkpoint)]) -> Result<(), String> {
        if items.is_empty() {
            return Ok(());
        }
        let (claims, older) = {
            let view = self.view.lock().expect("checkpoint view lock");
            let mut epochs = self.epochs.lock().expect("checkpoint epochs lock");
            let mut claims = Vec::new();
            let mut older = Vec::new();
            for (p, c) in items {
                let k = (topic.to_string(), *p);
                let seen = view.top.get(&k).copied().unwrap_or(0);
                let mine = epochs.get(&k).copied().unwrap_or(0);
                let e = seen.max(mine) + 1;
                epochs.insert(k.clone(), e);
                claims.push((*p, e, c.clone()));
                if let Some(held) = view.latest.get(&k) {
                    older.extend(held.keys().map(|o| epoch_key(&self.group, topic, *p, *o)));
                }
            }
            (claims, older)
        };
        *self.context_failure() = None;
        for (p, e, c) in &claims {
            let k = epoch_key(&self.group, topic, *p, *e);
            let v = value_at(&self.group, topic, *p, *e, c);
            self.send(BaseRecord::to(&self.topic).key(&k).payload(&v))?;
        }
        self.wait_acknowledged()?;
        if let Some(e) = self.context_failure().take() {
            return Err(format!("checkpoint claim not delivered: {e}"));
        }
        for k in &older {
            self.send(BaseRecord::<String, [u8]>::to(&self.topic).key(k))?;
        }
        self.wait_acknowledged()?;
        match self.context_failure().take() {
            Some(e) => Err(format!("old checkpoint epochs not deleted: {e}")),
            None => Ok(()),
        }
    }

    /// The records of one checkpoint per `(partition, checkpoint)` of
    /// `topic`, under this process's epochs, for a transaction to carry
    /// (exactly once) instead of [`Self::write`].
    pub fn records(&self, topic: &str, items: &[(i32, Checkpoint)]) -> Vec<OutRecord> {
        let to: std::sync::Arc<str> = std::sync::Arc::from(self.topic.as_str());
        items
            .iter()
            .map(|(partition, c)| {
                let e = self.epoch(topic, *partition);
                OutRecord {
                    topic: to.clone(),
                    key: Some(epoch_key(&self.group, topic, *partition, e).into_bytes()),
                    payload: std::sync::Arc::from(
                        value_at(&self.group, topic, *partition, e, c).into_bytes(),
                    ),
                    headers: Vec::new(),
                    reducible: false,
                    partition: None,
                }
            })
            .collect()
    }

    /// The record, under `key` ([`logged_key`]), of the packets a
    /// transaction commits, for that transaction to carry.
    pub fn logged_record(&self, key: &str, packets: &[Logged]) -> OutRecord {
        OutRecord {
            topic: std::sync::Arc::from(self.topic.as_str()),
            key: Some(key.as_bytes().to_vec()),
            payload: std::sync::Arc::from(logged_value(packets).into_bytes()),
            headers: Vec::new(),
            reducible: false,
            partition: None,
        }
    }

    /// Reads the checkpoint topic to its end ([`Self::read`]) and returns
    /// the last committed record of packets under `key`, if any.
    pub fn read_logged(&self, key: &str, stall: Duration) -> Result<Option<Vec<Logged>>, String> {
        self.read("", &[], stall)?;
        let view = self.view.lock().expect("checkpoint view lock");
        Ok(view
            .logged
            .get(key.as_bytes())
            .and_then(|v| parse_logged(v)))
    }

    /// The epoch this process writes `partition` of `topic` under.
    fn epoch(&self, topic: &str, partition: i32) -> u64 {
        self.epochs
            .lock()
            .expect("checkpoint epochs lock")
            .get(&(topic.to_string(), partition))
            .copied()
            .unwrap_or(0)
    }

    fn send<K: rdkafka::message::ToBytes + ?Sized, P: rdkafka::message::ToBytes + ?Sized>(
        &self,
        mut record: BaseRecord<'_, K, P>,
    ) -> Result<(), String> {
        loop {
            match self.producer.send(record) {
                Ok(()) => return Ok(()),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                    record = r;
                    self.producer.poll(Duration::from_millis(10));
                }
                Err((e, _)) => return Err(format!("cannot send a checkpoint: {e}")),
            }
        }
    }

    /// The latest stored checkpoint of each of `partitions` of `topic`. The
    /// read fails when it makes no progress for `stall` (see [`Self::read`]).
    pub fn read_latest(
        &self,
        topic: &str,
        partitions: &[i32],
        stall: Duration,
    ) -> Result<HashMap<i32, Checkpoint>, String> {
        self.read(topic, partitions, stall).map(|r| r.checkpoints)
    }

    /// Reads the checkpoint topic to the high watermarks it has when the
    /// read starts, going on from where the previous read stopped, and
    /// returns the latest checkpoint of each of `partitions` of `topic`.
    /// There is no deadline on the whole read: it takes as long as the
    /// records take to arrive. One that gets no record and no answer for
    /// `stall` starts again from where it got to, and fails after
    /// `READ_ATTEMPTS` such attempts.
    pub fn read(&self, topic: &str, partitions: &[i32], stall: Duration) -> Result<Read, String> {
        let mut view = self.view.lock().expect("checkpoint view lock");
        let started = Instant::now();
        let mut from_start = view.stale(started);
        if from_start {
            view.reset();
        }
        let mut records = 0;
        let mut attempt = 1;
        loop {
            match self.read_once(&mut view, stall, &mut records, &mut from_start) {
                Ok(()) => break,
                Err(ReadError::Fatal(e)) => return Err(e),
                Err(ReadError::Retry(e)) if attempt >= READ_ATTEMPTS => {
                    return Err(format!(
                        "{e} ({attempt} attempts; the read got {records} records)"
                    ))
                }
                Err(ReadError::Retry(e)) => {
                    tracing::warn!(error = %e, topic = %self.topic, attempt, of = READ_ATTEMPTS, records, "the checkpoint read stopped progressing; reading on from where it got to");
                    attempt += 1;
                }
            }
        }
        view.synced = Some(started);
        tracing::debug!(topic = %self.topic, records, from_start, elapsed = ?started.elapsed(), "checkpoint topic read");
        Ok(Read {
            checkpoints: view.latest(topic, partitions),
            records,
            from_start,
        })
    }

    /// One attempt: reads each partition of the checkpoint topic from the
    /// view's position to the high watermark taken now, applying records to
    /// `view` as they come and counting them in `records`.
    fn read_once(
        &self,
        view: &mut View,
        stall: Duration,
        records: &mut u64,
        from_start: &mut bool,
    ) -> Result<(), ReadError> {
        let store = &self.topic;
        let reader: BaseConsumer<KafkaContext> = self
            .reader
            .create_with_context(KafkaContext("checkpoint reader"))
            .map_err(|e| ReadError::Fatal(format!("cannot create the checkpoint reader: {e}")))?;
        let md = reader
            .fetch_metadata(Some(store), stall)
            .map_err(|e| ReadError::Retry(format!("cannot read the metadata of {store}: {e}")))?;
        let Some(t) = md.topics().iter().find(|t| t.name() == store) else {
            return Err(ReadError::Fatal(format!(
                "the checkpoint topic {store} does not exist"
            )));
        };
        if let Some(e) = t.error() {
            let code = RDKafkaErrorCode::from(e);
            let message = format!("the checkpoint topic {store}: {code:?}");
            return Err(match code {
                RDKafkaErrorCode::UnknownTopicOrPartition => ReadError::Fatal(message),
                _ => ReadError::Retry(message),
            });
        }
        let mut marks = Vec::new();
        for p in t.partitions() {
            let (low, high) = reader.fetch_watermarks(store, p.id(), stall).map_err(|e| {
                ReadError::Retry(format!("cannot read the offsets of {store}: {e}"))
            })?;
            marks.push((p.id(), low, high));
        }
        if marks
            .iter()
            .any(|&(p, low, high)| view.start(p, low, high).is_err())
        {
            tracing::info!(topic = %store, "the checkpoint topic no longer holds what was read from it (deleted and created again, or records deleted); reading it again from the beginning");
            view.reset();
            *from_start = true;
        }
        let mut tpl = TopicPartitionList::new();
        // Per partition still to read, the high watermark to read it to.
        let mut ends = HashMap::new();
        for (p, low, high) in marks {
            let start = view.start(p, low, high).unwrap_or(None);
            if start.unwrap_or(low) < high {
                let offset = start.map_or(Offset::Beginning, Offset::Offset);
                tpl.add_partition_offset(store, p, offset)
                    .map_err(|e| ReadError::Fatal(e.to_string()))?;
                ends.insert(p, high);
            }
        }
        if ends.is_empty() {
            return Ok(());
        }
        reader
            .assign(&tpl)
            .map_err(|e| ReadError::Retry(format!("cannot read {store}: {e}")))?;
        let mut progressed = Instant::now();
        // librdkafka goes on after the errors it reports (a connection
        // lost, a leader moved): they count only if nothing comes after.
        let mut last_error = None;
        while !ends.is_empty() {
            let quiet = progressed.elapsed();
            if quiet >= stall {
                return Err(ReadError::Retry(format!(
                    "reading the checkpoint topic {store} made no progress for {}, {} partitions short of their end{}",
                    humantime::format_duration(stall),
                    ends.len(),
                    last_error.map(|e| format!(" (last error: {e})")).unwrap_or_default()
                )));
            }
            match reader.poll(stall.saturating_sub(quiet).min(Duration::from_millis(200))) {
                Some(Ok(m)) => {
                    progressed = Instant::now();
                    *records += 1;
                    let (p, offset) = (m.partition(), m.offset());
                    view.apply(&self.group, p, offset, m.key(), m.payload());
                    if ends.get(&p).is_some_and(|&end| offset + 1 >= end) {
                        ends.remove(&p);
                    }
                }
                // The end of what the partition holds now, at or past the
                // watermark taken: compaction may have removed the records
                // just below it, so no record need reach it.
                Some(Err(KafkaError::PartitionEOF(p))) => {
                    progressed = Instant::now();
                    if let Some(end) = ends.remove(&p) {
                        // The reader is read_committed: its end is the last
                        // stable offset, below a transaction still open. The
                        // next read goes on from there, not from `end`, so a
                        // transaction committed later is read then.
                        let at = reader
                            .position()
                            .ok()
                            .and_then(|tpl| {
                                tpl.find_partition(store, p)
                                    .and_then(|e| e.offset().to_raw())
                            })
                            .filter(|&o| o >= 0)
                            .map_or(end, |o| o.min(end));
                        view.reached(p, at);
                    }
                }
                Some(Err(e)) => last_error = Some(e),
                None => {}
            }
        }
        Ok(())
    }

    /// Writes one checkpoint per `(partition, checkpoint)` of `topic` and
    /// returns once the broker has acknowledged all of them.
    pub fn write(&self, topic: &str, items: &[(i32, Checkpoint)]) -> Result<(), String> {
        if items.is_empty() {
            return Ok(());
        }
        *self.context_failure() = None;
        for (partition, c) in items {
            let e = self.epoch(topic, *partition);
            let k = epoch_key(&self.group, topic, *partition, e);
            let v = value_at(&self.group, topic, *partition, e, c);
            self.send(BaseRecord::to(&self.topic).key(&k).payload(&v))?;
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

/// Creates the checkpoint topic, compacted, with [`TOPIC_CONFIG`], when it
/// does not exist. A topic that exists is left as it is (with a warning when
/// its settings let it grow uncompacted). A broker that cannot be reached yet is
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
        // In the background: a broker that does not answer (librdkafka's
        // mock cluster, say) must not hold up the start.
        let store = store.clone();
        tokio::spawn(async move { advise(&admin, &store).await });
        return Ok(());
    }
    let mut config: &[(&str, &str)] = &TOPIC_CONFIG;
    'create: loop {
        let topic = config.iter().fold(
            NewTopic::new(store, 1, TopicReplication::Fixed(-1)),
            |t, (name, value)| t.set(name, value),
        );
        let results = admin
            .create_topics(&[topic], &AdminOptions::new())
            .await
            .with_context(|| format!("cannot create {store} (kafka.checkpoint_topic)"))?;
        for r in results {
            match r {
                Ok(_) => {
                    tracing::info!(topic = %store, config = ?config, "checkpoint topic created (compacted)")
                }
                Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                // A broker (or its creation policy) that refuses one of the
                // segment settings: compaction alone still keeps one record
                // per key, only the uncleaned part is then the broker's to
                // bound.
                Err((_, e @ (RDKafkaErrorCode::InvalidConfig | RDKafkaErrorCode::PolicyViolation)))
                    if config.len() > 1 =>
                {
                    tracing::warn!(topic = %store, error = %e, "the broker refused the checkpoint topic's segment settings; creating it with cleanup.policy=compact alone (set segment.bytes on it so that reading it stays quick)");
                    config = &TOPIC_CONFIG[..1];
                    continue 'create;
                }
                Err((_, e)) => {
                    return Err(anyhow!(
                        "kafka.checkpoint_topic: cannot create {store}: {e}; create it (cleanup.policy=compact) or grant the service CreateTopics"
                    ))
                }
            }
        }
        return Ok(());
    }
}

/// Warns when a checkpoint topic that already exists (created by an older
/// version or by hand) lets its uncleaned part grow, which every read from
/// the start pays for. Its settings are the operator's: they are named, not
/// changed. A broker that does not describe them (no permission, say) is
/// left alone.
async fn advise(admin: &AdminClient<KafkaContext>, store: &str) {
    let opts = AdminOptions::new().request_timeout(Some(Duration::from_secs(10)));
    let described = admin
        .describe_configs(&[ResourceSpecifier::Topic(store)], &opts)
        .await;
    let resource = match described.as_ref().map(|r| r.first()) {
        Ok(Some(Ok(resource))) => resource,
        other => {
            tracing::debug!(topic = %store, result = ?other.map(|_| ()), "cannot describe the checkpoint topic's settings");
            return;
        }
    };
    let changes = shortfall(|name| resource.get(name).and_then(|e| e.value.clone()));
    if !changes.is_empty() {
        tracing::warn!(
            topic = %store,
            "the checkpoint topic keeps a large uncompacted part, which every start reads; change its settings: kafka-configs.sh --bootstrap-server ... --alter --entity-type topics --entity-name {store} --add-config {}",
            changes.join(",")
        );
    }
}

/// The settings of an existing checkpoint topic to change, as
/// `name=value`, given each setting's value by name: compaction, and a
/// segment size that bounds the active segment (which the cleaner never
/// reaches) to far less than Kafka's default 1 GiB.
fn shortfall(config: impl Fn(&str) -> Option<String>) -> Vec<String> {
    let mut changes = Vec::new();
    let compacted =
        config("cleanup.policy").is_some_and(|p| p.split(',').any(|p| p.trim() == "compact"));
    if !compacted {
        changes.push("cleanup.policy=compact".to_string());
    }
    let ours: u64 = TOPIC_CONFIG
        .iter()
        .find(|(name, _)| *name == "segment.bytes")
        .and_then(|(_, v)| v.parse().ok())
        .expect("TOPIC_CONFIG sets segment.bytes");
    let segment = config("segment.bytes").and_then(|v| v.parse::<u64>().ok());
    if segment.is_some_and(|b| b > 16 * ours) {
        changes.push(format!("segment.bytes={ours}"));
    }
    changes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_value_round_trips_and_foreign_values_are_ignored() {
        let c = Checkpoint {
            offset: 41,
            progress_ms: Some(1_700_000_000_000),
            closed_ms: Some(1_699_999_990_000),
            emitted_ms: Some(1_699_999_995_000),
            closures: vec![Closure {
                offset: 45,
                through_ms: 1_700_000_000_000,
                reason: CloseReason::Wait,
            }],
            previous: Some(30),
            dead_letters_through: Some(52),
            panes: vec![PaneMark {
                start_ms: 1_699_999_990_000,
                next_pane: 2,
                through: Some(50),
            }],
        };
        let v = value("g", "user-login", 2, &c);
        assert_eq!(
            parse(v.as_bytes()),
            Some(("g".into(), "user-login".into(), 2, c))
        );
        assert_eq!(key("g/x", "user-login", 2), "g/x/user-login/2");
        assert_eq!(parse(b"not json"), None);
        assert_eq!(parse(v.replace(FORMAT_2, "other/1").as_bytes()), None);
        assert_eq!(parse(v.replace("\"wait\"", "\"soon\"").as_bytes()), None);
    }

    #[test]
    fn a_format_1_checkpoint_reads_as_what_it_said_was_emitted() {
        let v = r#"{"format":"login-metrics/checkpoint/1","group":"g","topic":"t","partition":0,"offset":9,"progress_ms":50,"closed_through_ms":40}"#;
        let (_, _, _, c) = parse(v.as_bytes()).unwrap();
        assert_eq!(
            c,
            Checkpoint {
                offset: 9,
                progress_ms: Some(50),
                emitted_ms: Some(40),
                ..Checkpoint::default()
            }
        );
    }

    #[test]
    fn the_checkpoint_wins_over_an_older_commit_and_loses_to_a_newer_one() {
        let c = Checkpoint {
            offset: 100,
            progress_ms: Some(5),
            emitted_ms: Some(0),
            previous: Some(60),
            ..Checkpoint::default()
        };
        let from = || Restore::From(c.clone());
        assert_eq!(resolve(None, None), Restore::Fresh);
        assert_eq!(resolve(Some(7), None), Restore::Fresh);
        assert_eq!(resolve(None, Some(c.clone())), from());
        assert_eq!(resolve(Some(100), Some(c.clone())), from());
        // Written, then the process died before the commit.
        assert_eq!(resolve(Some(60), Some(c.clone())), from());
        assert_eq!(
            resolve(Some(101), Some(c.clone())),
            Restore::Stale {
                committed: 101,
                checkpoint: 100
            }
        );
        // A commit applied whose answer was lost, then the process stopped.
        assert_eq!(resolve(Some(80), Some(c.clone())), from());
        // An operator moved the group back.
        for o in [0, 59] {
            assert_eq!(
                resolve(Some(o), Some(c.clone())),
                Restore::Reset {
                    committed: o,
                    checkpoint: 100
                }
            );
        }
    }

    #[test]
    fn a_checkpoint_under_an_older_epoch_is_not_read_over_the_new_owners() {
        let mut v = View::default();
        let at = |o: i64| Checkpoint {
            offset: o,
            ..Checkpoint::default()
        };
        let mut n = 0;
        let mut put = |v: &mut View, e: u64, c: Option<&Checkpoint>| {
            let k = epoch_key("g", "t", 0, e);
            let payload = c.map(|c| value_at("g", "t", 0, e, c));
            v.apply(
                "g",
                0,
                n,
                Some(k.as_bytes()),
                payload.as_deref().map(str::as_bytes),
            );
            n += 1;
        };
        put(&mut v, 1, Some(&at(10)));
        put(&mut v, 1, Some(&at(20)));
        assert_eq!(v.latest("t", &[0])[&0], at(20));
        // The new owner claims epoch 2 and deletes epoch 1's key.
        put(&mut v, 2, Some(&at(20)));
        put(&mut v, 1, None);
        put(&mut v, 2, Some(&at(30)));
        // The old owner, not yet told, writes on under epoch 1.
        put(&mut v, 1, Some(&at(25)));
        assert_eq!(v.latest("t", &[0])[&0], at(30));
        assert_eq!(v.top[&("t".to_string(), 0)], 2);
        assert_eq!(epoch_key("g", "t", 0, 0), key("g", "t", 0));
        assert_ne!(epoch_key("g", "t", 1, 2), epoch_key("g", "t", 12, 0));
    }
}

#[cfg(test)]
mod read_tests {
    use super::*;
    use crate::settings::Settings;
    use rdkafka::mocking::MockCluster;
    use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};

    const STALL: Duration = Duration::from_secs(10);
    const INPUT: &str = "user-login";

    fn cp(offset: i64) -> Checkpoint {
        Checkpoint {
            offset,
            ..Checkpoint::default()
        }
    }

    fn store(bootstrap: &str, topic: &str) -> CheckpointStore {
        let env = [
            ("LOGIN_METRICS__KAFKA__BOOTSTRAP_SERVERS", bootstrap),
            ("LOGIN_METRICS__KAFKA__CHECKPOINT_TOPIC", topic),
        ]
        .map(|(k, v)| (k.to_string(), v.to_string()));
        let s = Settings::load_with_env(None, env).unwrap();
        CheckpointStore::new(&s.kafka).unwrap()
    }

    /// Writes `n` checkpoints of `INPUT`, round robin over `partitions`, with
    /// offsets from `base` up, `per_write` to a write; the last of each
    /// partition.
    fn write_many(
        s: &CheckpointStore,
        n: i64,
        partitions: i32,
        base: i64,
        per_write: usize,
    ) -> HashMap<i32, Checkpoint> {
        let items: Vec<(i32, Checkpoint)> = (0..n)
            .map(|i| ((i % partitions as i64) as i32, cp(base + i)))
            .collect();
        for chunk in items.chunks(per_write) {
            s.write(INPUT, chunk).unwrap();
        }
        items.into_iter().collect()
    }

    #[test]
    fn the_view_goes_on_from_where_it_stopped_and_starts_again_when_the_topic_lost_records() {
        let mut v = View::default();
        let k1 = key("g", INPUT, 1);
        let rec = |g: &str, p: i32, o: i64| value(g, INPUT, p, &cp(o));
        assert_eq!(v.start(0, 0, 10), Ok(None), "nothing read: from the start");
        v.apply(
            "g",
            0,
            0,
            Some(k1.as_bytes()),
            Some(rec("g", 1, 5).as_bytes()),
        );
        v.apply("g", 0, 1, None, Some(rec("other", 2, 7).as_bytes()));
        v.apply(
            "g",
            0,
            2,
            Some(k1.as_bytes()),
            Some(rec("g", 1, 9).as_bytes()),
        );
        v.apply(
            "g",
            0,
            3,
            Some(k1.as_bytes()),
            Some(&b"not a checkpoint"[..]),
        );
        assert_eq!(v.latest(INPUT, &[1, 2]), HashMap::from([(1, cp(9))]));
        assert_eq!(v.latest("other-topic", &[1]), HashMap::new());
        assert_eq!(v.start(0, 0, 10), Ok(Some(4)));
        assert_eq!(v.start(0, 4, 10), Ok(Some(4)), "only read records deleted");
        assert_eq!(v.start(1, 0, 10), Ok(None), "a partition never read");
        assert!(v.start(0, 5, 10).is_err(), "records not read yet deleted");
        assert!(
            v.start(0, 0, 3).is_err(),
            "fewer records than read: a new topic"
        );
        // The end reached past a gap compaction left.
        v.reached(0, 8);
        assert_eq!(v.start(0, 0, 8), Ok(Some(8)));
        v.apply("g", 0, 8, Some(k1.as_bytes()), None);
        assert_eq!(
            v.latest(INPUT, &[1]),
            HashMap::new(),
            "a tombstone drops it"
        );
        assert_eq!(v.start(0, 0, 9), Ok(Some(9)));

        let now = Instant::now();
        assert!(v.stale(now), "never read to the end");
        v.synced = Some(now);
        assert!(!v.stale(now + Duration::from_secs(3600)));
        assert!(v.stale(now + REREAD_AFTER));
        v.reset();
        assert_eq!(v.start(0, 0, 9), Ok(None));
        assert!(v.stale(now));
    }

    #[test]
    fn an_existing_topic_is_named_for_what_lets_it_grow() {
        let of = |pairs: &'static [(&'static str, &'static str)]| {
            move |name: &str| {
                pairs
                    .iter()
                    .find(|(n, _)| *n == name)
                    .map(|(_, v)| v.to_string())
            }
        };
        assert!(shortfall(of(&TOPIC_CONFIG)).is_empty());
        assert!(shortfall(of(&[
            ("cleanup.policy", "compact,delete"),
            ("segment.bytes", "8388608")
        ]))
        .is_empty());
        assert_eq!(
            shortfall(of(&[
                ("cleanup.policy", "compact"),
                ("segment.bytes", "1073741824")
            ])),
            ["segment.bytes=1048576"]
        );
        assert_eq!(
            shortfall(of(&[("cleanup.policy", "delete")])),
            ["cleanup.policy=compact"]
        );
    }

    /// Many thousand checkpoints, then a few more: the second read takes the
    /// few, and says what a reader from the start finds.
    #[test]
    fn a_later_read_takes_only_the_records_written_since() {
        let cluster = MockCluster::new(1).unwrap();
        cluster.create_topic("checkpoints", 1, 1).unwrap();
        let a = store(&cluster.bootstrap_servers(), "checkpoints");
        let all = [0, 1, 2, 3];
        let mut latest = write_many(&a, 5_000, 4, 0, 250);

        let first = a.read(INPUT, &all, STALL).unwrap();
        assert!(first.from_start);
        assert_eq!(first.records, 5_000);
        assert_eq!(first.checkpoints, latest);

        latest.extend(write_many(&a, 37, 4, 10_000, 10));
        let second = a.read(INPUT, &all, STALL).unwrap();
        assert!(!second.from_start);
        assert_eq!(second.records, 37, "only the records written since");
        assert_eq!(second.checkpoints, latest);

        let third = a.read(INPUT, &[2], STALL).unwrap();
        assert_eq!(third.records, 0);
        assert_eq!(third.checkpoints, HashMap::from([(2, latest[&2].clone())]));

        // Another process has read nothing yet: it reads everything, and
        // finds the same.
        let b = store(&cluster.bootstrap_servers(), "checkpoints");
        let fresh = b.read(INPUT, &all, STALL).unwrap();
        assert!(fresh.from_start);
        assert_eq!(fresh.records, 5_037);
        assert_eq!(fresh.checkpoints, latest);
    }

    /// A read over a slow link lasts several times its stall limit and
    /// succeeds, as it never stops progressing; with the broker gone, or
    /// its fetches failing, it fails after a few stalls, and the next read
    /// goes on from where the last one got to.
    #[test]
    fn a_slow_read_is_not_cut_while_it_progresses_and_a_stalled_one_fails() {
        let cluster = MockCluster::new(1).unwrap();
        cluster.create_topic("checkpoints", 1, 1).unwrap();
        let mut a = store(&cluster.bootstrap_servers(), "checkpoints");
        // One record a batch, and fetches of a few batches (the mock
        // cluster answers with one): a round trip every few records.
        write_many(&a, 30, 2, 0, 1);
        a.reader.set("max.partition.fetch.bytes", "4096");
        cluster
            .broker_round_trip_time(1, Duration::from_millis(200))
            .unwrap();
        let stall = Duration::from_millis(1_500);
        let started = Instant::now();
        let slow = a.read(INPUT, &[0, 1], stall).unwrap();
        let took = started.elapsed();
        assert_eq!(slow.records, 30);
        assert!(took > 2 * stall, "the read took {took:?}: not slow enough");

        cluster.broker_round_trip_time(1, Duration::ZERO).unwrap();
        let latest = write_many(&a, 10, 2, 1_000, 10);
        cluster.broker_down(1).unwrap();
        let started = Instant::now();
        let e = a
            .read(INPUT, &[0, 1], Duration::from_millis(500))
            .unwrap_err();
        assert!(e.contains("3 attempts"), "{e}");
        assert!(started.elapsed() < Duration::from_secs(10), "{e}");

        cluster.broker_up(1).unwrap();
        // The broker answers, but every fetch fails: the read gets as far
        // as its fetch and no further.
        cluster.request_errors(
            RDKafkaApiKey::Fetch,
            &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_LEADER_FOR_PARTITION; 40],
        );
        let started = Instant::now();
        let e = a
            .read(INPUT, &[0, 1], Duration::from_millis(500))
            .unwrap_err();
        assert!(e.contains("made no progress"), "{e}");
        assert!(started.elapsed() < Duration::from_secs(10), "{e}");

        cluster.clear_request_errors(RDKafkaApiKey::Fetch);
        let r = a.read(INPUT, &[0, 1], STALL).unwrap();
        assert!(!r.from_start);
        assert_eq!(r.records, 10);
        assert_eq!(r.checkpoints, latest);
    }
}
