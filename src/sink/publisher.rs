//! Sinks: the output topic, the dead-letter topic and the metrics log.
//!
//! [`Publisher::deliver`] returns only when every record of a batch (its
//! packet and its dead letters) is acknowledged by the broker (acks=all, by an
//! idempotent producer). Records that fail are sent again with exponential
//! backoff; after `kafka.delivery_attempts` attempts the batch is reported
//! undeliverable, and the caller stops without committing it.
//!
//! A dead letter that fails for a reason that will not change on a retry (too
//! large for the producer or the broker, or rejected as an invalid record) is
//! *reduced* instead: its payload is cut to [`REDUCED_PAYLOAD_BYTES`] (less if
//! its topic takes less), headers record the original size, and it is sent
//! again. One oversized message in the input must never stop the stream.
//!
//! No record is sent larger than its topic takes ([`Limits`]): the smaller of
//! the producer's `message.max.bytes` and the topic's `max.message.bytes`,
//! read from the brokers by [`check_topics`] at start-up. Packets are cut to
//! fit before they get here ([`crate::core::packet::bounded`], within
//! [`Limits::packet_bytes`]); a dead letter over its topic's limit is reduced
//! before it is sent. A record refused for its size all the same (a batch of
//! several records the topic takes one by one) is sent again alone, once.
//!
//! With fields pseudonymized and `privacy.dead_letters = "pseudonymized"`, a
//! dead letter is built by [`OutRecord::pseudonymized_dead_letter`]: no raw
//! value of those fields reaches the dead-letter topic, in the payload or in
//! the key.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, OwnedResourceSpecifier, ResourceSpecifier};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::util::Timeout;
use tracing::{debug, info, warn};

use crate::core::privacy::Pseudonymizer;
use crate::kafka::KafkaContext;
use crate::settings::KafkaSettings;
use crate::telemetry;
use crate::work::InvalidMessage;

/// A record to publish, owned so that it can be sent again.
#[derive(Debug, Clone)]
pub struct OutRecord {
    pub topic: Arc<str>,
    pub key: Option<Vec<u8>>,
    pub payload: Arc<[u8]>,
    pub headers: Vec<(&'static str, Vec<u8>)>,
    /// A dead letter may be reduced when the broker will never take it whole.
    pub reducible: bool,
    /// The partition it goes to; `None`: the partitioner's choice by key.
    pub partition: Option<i32>,
}

/// The payload kept of a dead letter that is too large to deliver whole
/// (less when its topic takes less).
pub const REDUCED_PAYLOAD_BYTES: usize = 64 * 1024;

/// librdkafka's `message.max.bytes` when the configuration does not set it.
pub const PRODUCER_MAX_DEFAULT: usize = 1_000_000;

/// What a record takes beside its payload, key and headers in the sizes the
/// producer and the broker judge: the record's framing (at most 36 bytes,
/// librdkafka's `RD_KAFKAP_MESSAGE_V2_MAX_OVERHEAD`) and the header of the
/// batch that carries it (61 bytes), rounded up. Compression does not add to
/// it: librdkafka sends a batch uncompressed when compressing would make it
/// larger.
const RECORD_FRAMING: usize = 128;

/// A header's framing beside its name and value: two varint lengths.
const HEADER_FRAMING: usize = 10;

/// Room kept in the output limit beside a packet's JSON: its key (the
/// 32-character packet id), its `content-type` header and the framing, with
/// a margin.
pub const PACKET_HEADROOM: usize = 1024;

/// The smallest limit the service starts with: below it a packet's window,
/// counts and sources, or a dead letter's headers, may not fit at all.
pub const MIN_LIMIT: usize = 16 * 1024;

/// How long a publisher waits before it asks the brokers again for a
/// topic's `max.message.bytes` they could not tell.
const ASK_AGAIN: Duration = Duration::from_secs(60);

/// The largest record, in [`OutRecord::wire_size`], each topic is sent: the
/// smaller of the producer's `message.max.bytes` (librdkafka refuses a
/// larger record) and the topic's `max.message.bytes` (the broker refuses a
/// larger batch); the producer's alone while the topic's is not known.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub output: usize,
    pub dead_letters: usize,
}

impl Limits {
    /// The most bytes of JSON a packet may have: the output limit less
    /// [`PACKET_HEADROOM`].
    pub fn packet_bytes(&self) -> usize {
        self.output.saturating_sub(PACKET_HEADROOM)
    }
}

/// The producer's `message.max.bytes` as configured (`kafka.client` or
/// `kafka.producer`), or librdkafka's default.
pub fn producer_max(k: &KafkaSettings) -> usize {
    crate::kafka::producer(k)
        .get("message.max.bytes")
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(PRODUCER_MAX_DEFAULT)
}

/// What the brokers told of topics' `max.message.bytes` (`None`: they could
/// not tell) and when they were asked, by bootstrap servers and topic.
/// [`check_topics`] asks at start-up, beside the publisher, which takes the
/// answer from here rather than asking again.
static TOPIC_MAX: Mutex<Vec<Told>> = Mutex::new(Vec::new());

struct Told {
    servers: String,
    topic: String,
    bytes: Option<usize>,
    at: Instant,
}

/// What the brokers told of `topic`, and when; `None` if never asked.
fn told(servers: &str, topic: &str) -> Option<(Option<usize>, Instant)> {
    TOPIC_MAX
        .lock()
        .expect("topic limits lock")
        .iter()
        .find(|t| t.servers == servers && t.topic == topic)
        .map(|t| (t.bytes, t.at))
}

fn record(servers: &str, topic: &str, bytes: Option<usize>) {
    let mut all = TOPIC_MAX.lock().expect("topic limits lock");
    all.retain(|t| !(t.servers == servers && t.topic == topic));
    all.push(Told {
        servers: servers.to_string(),
        topic: topic.to_string(),
        bytes,
        at: Instant::now(),
    });
}

/// Reads `max.message.bytes` of `topics` from the brokers (DescribeConfigs),
/// blocking: for [`check_topics`] and the blocking pool. Topics the brokers
/// do not describe are left out.
///
/// The request names a broker too, which sends it to that broker rather than
/// to the controller (any broker describes topics): a cluster that names no
/// controller, as librdkafka's mock cluster, then answers at once that it
/// does not implement the request, instead of leaving it to time out.
fn read_topic_max(
    k: &KafkaSettings,
    topics: &[String],
    timeout: Duration,
) -> Result<Vec<(String, usize)>, KafkaError> {
    let admin: AdminClient<KafkaContext> =
        crate::kafka::admin(k).create_with_context(KafkaContext("admin"))?;
    let md = admin
        .inner()
        .fetch_metadata(topics.first().map(String::as_str), timeout)?;
    let Some(broker) = md.brokers().iter().map(|b| b.id()).min() else {
        return Ok(Vec::new());
    };
    let specs: Vec<ResourceSpecifier> = topics
        .iter()
        .map(|t| ResourceSpecifier::Topic(t.as_str()))
        .chain([ResourceSpecifier::Broker(broker)])
        .collect();
    let opts = AdminOptions::new().request_timeout(Some(timeout));
    let results = block_on(admin.describe_configs(&specs, &opts))?;
    let mut found = Vec::new();
    for r in results {
        let r = match r {
            Ok(r) => r,
            Err(code) => {
                debug!(error = %code, "a topic's configuration could not be read");
                continue;
            }
        };
        let OwnedResourceSpecifier::Topic(topic) = &r.specifier else {
            continue;
        };
        let bytes = r
            .get("max.message.bytes")
            .and_then(|e| e.value.as_deref())
            .and_then(|v| v.trim().parse().ok());
        if let Some(bytes) = bytes {
            found.push((topic.clone(), bytes));
        }
    }
    Ok(found)
}

/// Waits for an admin request from synchronous code (the topic check and
/// the blocking pool; librdkafka's own thread completes it).
fn block_on<F: Future>(f: F) -> F::Output {
    match tokio::runtime::Handle::try_current() {
        Ok(runtime) => runtime.block_on(f),
        Err(_) => tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("a current-thread runtime")
            .block_on(f),
    }
}

impl OutRecord {
    /// The dead letter of an invalid message: its original key and bytes, and
    /// headers that say what was wrong and where it came from.
    pub fn dead_letter(topic: &Arc<str>, m: &InvalidMessage) -> OutRecord {
        OutRecord {
            topic: topic.clone(),
            key: m.key.clone(),
            payload: Arc::from(m.payload.as_slice()),
            headers: dead_letter_headers(m),
            reducible: true,
            partition: None,
        }
    }

    /// The dead letter of an invalid message as it may leave the process
    /// when fields are pseudonymized: a JSON object payload with their values
    /// replaced by pseudonyms ([`Pseudonymizer::clean_payload`]); any other
    /// payload withheld (empty, `dead_letter.payload = withheld`, its size in
    /// `dead_letter.original_bytes`), since what it holds cannot be told. The
    /// key, which may be a user id or anything else the producer chose, is
    /// replaced by its pseudonym: dead letters of one key still share one,
    /// and it equals the pseudonym a field of the same value gets. The
    /// `error.*` and `source.*` headers are kept (reasons never quote a
    /// value), so the original can be read from the input topic by offset;
    /// `dead_letter.pseudonymized = true` says that nothing here is raw.
    pub fn pseudonymized_dead_letter(
        topic: &Arc<str>,
        m: &InvalidMessage,
        privacy: &Pseudonymizer,
    ) -> OutRecord {
        let mut headers = dead_letter_headers(m);
        headers.push(("dead_letter.pseudonymized", b"true".to_vec()));
        let payload = match privacy.clean_payload(&m.payload) {
            Some(cleaned) => Arc::from(cleaned),
            None => {
                headers.push(("dead_letter.payload", b"withheld".to_vec()));
                headers.push((
                    "dead_letter.original_bytes",
                    m.payload.len().to_string().into_bytes(),
                ));
                Arc::from(&[][..])
            }
        };
        OutRecord {
            topic: topic.clone(),
            key: m
                .key
                .as_deref()
                .map(|k| privacy.pseudonym_of_bytes(k).into_bytes()),
            payload,
            headers,
            reducible: true,
            partition: None,
        }
    }

    /// The record's size as the producer and the broker judge it, framing
    /// included, rounded up: what [`Limits`] bounds.
    pub fn wire_size(&self) -> usize {
        RECORD_FRAMING
            + self.payload.len()
            + self.key.as_ref().map_or(0, Vec::len)
            + self
                .headers
                .iter()
                .map(|(k, v)| k.len() + v.len() + HEADER_FRAMING)
                .sum::<usize>()
    }

    /// [`OutRecord::reduced`] to [`REDUCED_PAYLOAD_BYTES`], or less, so that
    /// the reduced record is at most `limit` bytes ([`OutRecord::wire_size`]).
    pub fn reduced_to_fit(&self, limit: usize) -> OutRecord {
        let mut r = self.reduced(REDUCED_PAYLOAD_BYTES);
        let over = r.wire_size().saturating_sub(limit);
        if over > 0 {
            let keep = r.payload.len().saturating_sub(over);
            r.payload = Arc::from(&r.payload[..keep]);
        }
        r
    }

    /// The same dead letter with its payload cut to `keep` bytes and headers
    /// that say so (`dead_letter.original_bytes`, `dead_letter.truncated`).
    /// The key is cut the same way: it can be as large as the payload.
    pub fn reduced(&self, keep: usize) -> OutRecord {
        let mut r = self.clone();
        r.payload = Arc::from(&self.payload[..self.payload.len().min(keep)]);
        if let Some(k) = &mut r.key {
            k.truncate(keep.min(1024));
        }
        r.headers.push((
            "dead_letter.original_bytes",
            self.payload.len().to_string().into_bytes(),
        ));
        r.headers.push(("dead_letter.truncated", b"true".to_vec()));
        r.reducible = false;
        r
    }
}

/// What was wrong with an invalid message and where it came from.
fn dead_letter_headers(m: &InvalidMessage) -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("error.kind", m.kind.as_str().as_bytes().to_vec()),
        ("error.reason", m.reason.as_bytes().to_vec()),
        ("source.topic", m.topic.as_bytes().to_vec()),
        ("source.partition", m.partition.to_string().into_bytes()),
        ("source.offset", m.offset.to_string().into_bytes()),
    ]
}

/// Whether a failed record would fail the same way however often it is sent.
fn permanent_for_its_content(e: &KafkaError) -> bool {
    matches!(
        e.rdkafka_error_code(),
        Some(
            RDKafkaErrorCode::MessageSizeTooLarge
                | RDKafkaErrorCode::MessageBatchTooLarge
                | RDKafkaErrorCode::InvalidRecord
                | RDKafkaErrorCode::InvalidMessageSize
        )
    )
}

/// Why a batch could not be delivered.
#[derive(Debug, thiserror::Error)]
pub enum DeliveryError {
    #[error("{failed} of {total} records still undelivered after {attempts} attempts: {last}")]
    Exhausted {
        failed: usize,
        total: usize,
        attempts: u32,
        last: KafkaError,
    },
    #[error("the producer hit a fatal error: {0}")]
    Fatal(String),
}

/// The producer's context: client errors and log lines go through
/// [`kafka::report_error`] and [`kafka::route_log`].
pub type SinkContext = KafkaContext;

pub struct Publisher {
    producer: FutureProducer<SinkContext>,
    attempts: u32,
    kafka: KafkaSettings,
    /// The producer's `message.max.bytes`.
    producer_max: usize,
}

impl Publisher {
    pub fn new(k: &KafkaSettings) -> Result<Publisher, KafkaError> {
        Self::with_config(k, crate::kafka::producer(k))
    }

    /// A transactional publisher (exactly once), with `transactional.id` =
    /// `id`: [`Publisher::init_transactions`] first, then every record in a
    /// transaction ([`Publisher::begin`], [`Publisher::commit`]).
    pub fn transactional(k: &KafkaSettings, id: &str) -> Result<Publisher, KafkaError> {
        Self::with_config(k, crate::kafka::transactional_producer(k, id))
    }

    fn with_config(
        k: &KafkaSettings,
        config: rdkafka::ClientConfig,
    ) -> Result<Publisher, KafkaError> {
        Ok(Publisher {
            producer: config.create_with_context(KafkaContext("producer"))?,
            attempts: k.delivery_attempts,
            kafka: k.clone(),
            producer_max: producer_max(k),
        })
    }

    /// The limits of the output and dead-letter topics. What [`check_topics`]
    /// read at start-up; a topic's limit the brokers did not tell (they were
    /// not reachable yet) is asked for here, at most once every
    /// [`ASK_AGAIN`], the producer's limit alone standing in meanwhile.
    pub async fn limits(&self) -> Limits {
        let k = &self.kafka;
        let servers = &k.bootstrap_servers;
        let topics: Vec<String> = [&k.output_topic, &k.dlq_topic]
            .into_iter()
            .filter(|t| !t.is_empty())
            .cloned()
            .collect();
        let ask: Vec<String> = topics
            .iter()
            .filter(|t| match told(servers, t) {
                Some((Some(_), _)) => false,
                Some((None, at)) => at.elapsed() >= ASK_AGAIN,
                None => true,
            })
            .cloned()
            .collect();
        if !ask.is_empty() {
            let k = self.kafka.clone();
            let read = tokio::task::spawn_blocking(move || {
                (read_topic_max(&k, &ask, Duration::from_secs(5)), ask)
            })
            .await;
            match read {
                Ok((Ok(found), ask)) => {
                    for topic in &ask {
                        let bytes = found.iter().find(|(t, _)| t == topic).map(|(_, b)| *b);
                        record(servers, topic, bytes);
                    }
                }
                Ok((Err(e), ask)) => {
                    unknown_limit(&e);
                    for topic in &ask {
                        record(servers, topic, None);
                    }
                }
                Err(e) => warn!(error = %e, "reading the topics' max.message.bytes panicked"),
            }
        }
        let limit = |topic: &str| match told(servers, topic) {
            Some((Some(bytes), _)) => bytes.min(self.producer_max),
            _ => self.producer_max,
        };
        Limits {
            output: limit(&k.output_topic),
            dead_letters: limit(&k.dlq_topic),
        }
    }

    /// The limit of the topic `r` goes to.
    fn limit_of(&self, limits: &Limits, r: &OutRecord) -> usize {
        if *r.topic == *self.kafka.output_topic {
            limits.output
        } else {
            limits.dead_letters
        }
    }

    /// Delivers every record, retrying failures; returns when all are acknowledged.
    ///
    /// A dead letter over its topic's limit is reduced before it is sent. A
    /// record refused for its size ([`permanent_for_its_content`]) goes again
    /// at once, without counting as a failed attempt: alone, when it is
    /// within its limit (the broker judges a batch, which may hold several
    /// records that each fit), else, a dead letter not reduced yet, reduced
    /// and alone. Each happens once to a record; refused after that, it
    /// counts as failed like any other, so nothing is retried without end.
    pub async fn deliver(&self, records: &[OutRecord]) -> Result<(), DeliveryError> {
        let limits = self.limits().await;
        let mut pending: Vec<usize> = (0..records.len()).collect();
        let mut reduced: Vec<Option<OutRecord>> = records
            .iter()
            .map(|r| {
                let limit = self.limit_of(&limits, r);
                (r.reducible && r.wire_size() > limit).then(|| {
                    let cut = r.reduced_to_fit(limit);
                    warn!(
                        topic = %r.topic,
                        bytes = r.payload.len(),
                        limit,
                        "dead letter larger than its topic takes; sending it truncated to {} bytes",
                        cut.payload.len()
                    );
                    cut
                })
            })
            .collect();
        let mut alone = vec![false; records.len()];
        let mut attempt = 0;
        loop {
            attempt += 1;
            let started = Instant::now();
            let (solo, together): (Vec<usize>, Vec<usize>) =
                pending.iter().partition(|&&i| alone[i]);
            let mut futures = Vec::with_capacity(together.len());
            for &i in &together {
                let r = reduced[i].as_ref().unwrap_or(&records[i]);
                futures.push((i, self.enqueue(r).await));
            }
            let mut outcomes = Vec::with_capacity(pending.len());
            for (i, fut) in futures {
                outcomes.push((i, settle(fut).await));
            }
            // Each after the one before is acknowledged: a batch of its own.
            for &i in &solo {
                let r = reduced[i].as_ref().unwrap_or(&records[i]);
                let fut = self.enqueue(r).await;
                outcomes.push((i, settle(fut).await));
            }
            let mut failed = Vec::new();
            let mut again = Vec::new();
            let mut last_error = None;
            for (i, outcome) in outcomes {
                let Err(e) = outcome else { continue };
                let r = reduced[i].as_ref().unwrap_or(&records[i]);
                if permanent_for_its_content(&e) {
                    let limit = self.limit_of(&limits, r);
                    // A record within its limit was refused with others.
                    if !alone[i] && r.wire_size() <= limit {
                        warn!(
                            topic = %r.topic,
                            bytes = r.wire_size(),
                            error = %e,
                            "record refused for its size; sending it again in a batch of its own"
                        );
                        alone[i] = true;
                        again.push(i);
                        continue;
                    }
                    if r.reducible {
                        let cut = r.reduced_to_fit(limit);
                        warn!(
                            topic = %r.topic,
                            bytes = r.payload.len(),
                            error = %e,
                            "dead letter cannot be delivered whole; sending it truncated to {} bytes",
                            cut.payload.len()
                        );
                        reduced[i] = Some(cut);
                        alone[i] = true;
                        again.push(i);
                        continue;
                    }
                }
                failed.push(i);
                last_error = Some(e);
            }
            if !again.is_empty() && failed.is_empty() {
                // Not a failed attempt: the records go again at once, each
                // changed (reduced, or alone) and only once.
                attempt -= 1;
                pending = again;
                continue;
            }
            failed.extend(again);
            metrics::histogram!(telemetry::DELIVERY_SECONDS)
                .record(started.elapsed().as_secs_f64());
            if let Some(fatal) = self.producer.client().fatal_error() {
                return Err(DeliveryError::Fatal(format!("{:?}: {}", fatal.0, fatal.1)));
            }
            let Some(last) = last_error else {
                return Ok(());
            };
            metrics::counter!(telemetry::DELIVERY_FAILURES).increment(failed.len() as u64);
            if attempt >= self.attempts {
                return Err(DeliveryError::Exhausted {
                    failed: failed.len(),
                    total: records.len(),
                    attempts: attempt,
                    last,
                });
            }
            let backoff = backoff(attempt);
            warn!(
                attempt,
                of = self.attempts,
                failed = failed.len(),
                total = records.len(),
                error = %last,
                "delivery failed; retrying in {}",
                humantime::format_duration(backoff)
            );
            tokio::time::sleep(backoff).await;
            pending = failed;
        }
    }

    /// Hands one record to librdkafka, waiting while its queue is full.
    async fn enqueue(
        &self,
        r: &OutRecord,
    ) -> Result<rdkafka::producer::DeliveryFuture, KafkaError> {
        loop {
            let mut headers = OwnedHeaders::new_with_capacity(r.headers.len());
            for (k, v) in &r.headers {
                headers = headers.insert(Header {
                    key: k,
                    value: Some(v.as_slice()),
                });
            }
            let mut record = FutureRecord::<[u8], [u8]>::to(&r.topic)
                .payload(&r.payload[..])
                .headers(headers);
            if let Some(key) = &r.key {
                record = record.key(&key[..]);
            }
            if let Some(p) = r.partition {
                record = record.partition(p);
            }
            match self.producer.send_result(record) {
                Ok(fut) => return Ok(fut),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                Err((e, _)) => return Err(e),
            }
        }
    }

    /// Sends every record in the open transaction (exactly once) and waits
    /// for each one's acknowledgement: each record's position, or its error.
    /// Nothing is sent again here: a record that fails makes the transaction
    /// abortable, and the caller aborts it and sends it all again.
    pub async fn send_all(&self, records: &[OutRecord]) -> Vec<Result<(i32, i64), KafkaError>> {
        let mut futures = Vec::with_capacity(records.len());
        for r in records {
            futures.push(self.enqueue(r).await);
        }
        let mut out = Vec::with_capacity(records.len());
        for fut in futures {
            out.push(match fut {
                Ok(fut) => match fut.await {
                    Ok(Ok(delivered)) => Ok((delivered.partition, delivered.offset)),
                    Ok(Err((e, _))) => Err(e),
                    Err(_) => Err(KafkaError::Canceled),
                },
                Err(e) => Err(e),
            });
        }
        out
    }

    /// The records to send for `records` within the topics' limits: a dead
    /// letter over its topic's limit reduced, as [`Publisher::deliver`] does.
    pub async fn fitted(&self, records: &[OutRecord]) -> Vec<OutRecord> {
        let limits = self.limits().await;
        records
            .iter()
            .map(|r| {
                let limit = self.limit_of(&limits, r);
                if r.reducible && r.wire_size() > limit {
                    warn!(
                        topic = %r.topic,
                        bytes = r.payload.len(),
                        limit,
                        "dead letter larger than its topic takes; sending it truncated"
                    );
                    r.reduced_to_fit(limit)
                } else {
                    r.clone()
                }
            })
            .collect()
    }

    /// A record refused for its content (its size), reduced if it can be:
    /// what a new transaction sends instead.
    pub async fn refit(&self, r: &OutRecord, e: &KafkaError) -> Option<OutRecord> {
        if !(r.reducible && permanent_for_its_content(e)) {
            return None;
        }
        let limits = self.limits().await;
        let cut = r.reduced_to_fit(self.limit_of(&limits, r));
        warn!(topic = %r.topic, bytes = r.payload.len(), error = %e, "dead letter cannot be delivered whole; sending it truncated to {} bytes", cut.payload.len());
        Some(cut)
    }

    /// Registers the producer's `transactional.id` with the brokers: fences
    /// any earlier producer with the same id (a killed predecessor) and
    /// aborts the transaction it left open. Blocking; retried until it
    /// succeeds, a fatal error, or `shutdown`.
    pub fn init_transactions(
        &self,
        shutdown: &tokio_util::sync::CancellationToken,
    ) -> Result<(), String> {
        let mut attempt = 0u32;
        loop {
            match self.producer.init_transactions(Duration::from_secs(30)) {
                Ok(()) => return Ok(()),
                Err(e) => {
                    attempt += 1;
                    if let KafkaError::Transaction(r) = &e {
                        if r.is_fatal() {
                            return Err(format!("cannot start transactions: {e}"));
                        }
                    }
                    if shutdown.is_cancelled() {
                        return Err(format!("cannot start transactions before shutdown: {e}"));
                    }
                    warn!(error = %e, attempt, "cannot start transactions yet (the brokers, or the transaction coordinator, are not reachable); trying again");
                    std::thread::sleep(backoff(attempt));
                }
            }
        }
    }

    /// Begins a transaction (a local step; the brokers learn of it with the
    /// first record).
    pub fn begin(&self) -> Result<(), TxnError> {
        self.producer.begin_transaction().map_err(TxnError::of)
    }

    /// Aborts the open transaction: nothing sent in it becomes visible to
    /// `read_committed` readers. Blocking.
    pub fn abort(&self) -> Result<(), TxnError> {
        self.producer
            .abort_transaction(self.transaction_timeout())
            .map_err(TxnError::of)
    }

    /// Adds `offsets` to the open transaction as the consumer group's
    /// commit (under the group generation `group` names: a member that lost
    /// its partitions is refused), then commits the transaction. Retriable
    /// errors are retried; blocking.
    pub fn commit(
        &self,
        offsets: &rdkafka::TopicPartitionList,
        group: Option<&rdkafka::consumer::ConsumerGroupMetadata>,
    ) -> Result<(), TxnError> {
        let timeout = self.transaction_timeout();
        if offsets.count() > 0 {
            let Some(group) = group else {
                return Err(TxnError::Abortable(
                    "the consumer has no group metadata (not a member of the group)".into(),
                ));
            };
            retried(|| {
                self.producer
                    .send_offsets_to_transaction(offsets, group, timeout)
            })?;
        }
        retried(|| self.producer.commit_transaction(timeout))
    }

    /// How long one transactional call may block.
    fn transaction_timeout(&self) -> Duration {
        crate::kafka::transaction_timeout(&self.kafka)
    }

    /// Waits for everything queued to be delivered (shutdown).
    pub fn flush(&self, timeout: Duration) {
        if let Err(e) = self.producer.flush(Timeout::After(timeout)) {
            warn!(error = %e, "producer flush did not complete");
        }
    }
}

/// Why a transaction could not be committed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TxnError {
    /// The transaction must be aborted; a new one may succeed.
    #[error("{0}")]
    Abortable(String),
    /// The producer cannot go on (fenced by a newer instance with its
    /// transactional.id, say): the process must stop.
    #[error("{0}")]
    Fatal(String),
}

impl TxnError {
    fn of(e: KafkaError) -> TxnError {
        match &e {
            KafkaError::Transaction(r) if r.is_fatal() => TxnError::Fatal(e.to_string()),
            _ => TxnError::Abortable(e.to_string()),
        }
    }
}

/// Runs a transactional call again while it fails with a retriable error
/// (a timeout, a coordinator moving), a few times.
fn retried(mut call: impl FnMut() -> Result<(), KafkaError>) -> Result<(), TxnError> {
    let mut attempt = 0u32;
    loop {
        match call() {
            Ok(()) => return Ok(()),
            Err(KafkaError::Transaction(r)) if r.is_retriable() && attempt < 5 => {
                attempt += 1;
                warn!(error = %r, attempt, "transactional call failed; retrying");
                std::thread::sleep(backoff(attempt));
            }
            Err(e) => return Err(TxnError::of(e)),
        }
    }
}

/// A delivery's outcome.
async fn settle(
    fut: Result<rdkafka::producer::DeliveryFuture, KafkaError>,
) -> Result<(), KafkaError> {
    match fut {
        Ok(fut) => match fut.await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err((e, _))) => Err(e),
            Err(_) => Err(KafkaError::Canceled),
        },
        Err(e) => Err(e),
    }
}

/// Says that a topic's limit could not be read: quietly when the brokers do
/// not implement the request (librdkafka's mock cluster), since the producer's
/// limit then stands in for good.
fn unknown_limit(e: &KafkaError) {
    let code = match e {
        KafkaError::AdminOp(code) => Some(*code),
        e => e.rdkafka_error_code(),
    };
    if matches!(
        code,
        Some(RDKafkaErrorCode::UnsupportedFeature | RDKafkaErrorCode::UnsupportedVersion)
    ) {
        debug!(error = %e, "the brokers do not tell topics' max.message.bytes; packets are kept within the producer's message.max.bytes");
    } else {
        warn!(error = %e, "cannot read the topics' max.message.bytes yet; packets are kept within the producer's message.max.bytes meanwhile");
    }
}

/// Stops at start-up when the brokers refuse the service's credentials or
/// certificates, or when the output or dead-letter topic does not exist,
/// naming the setting, rather than retrying in silence or failing when the
/// first packet is sent. A broker that cannot be reached yet is no reason to
/// stop (librdkafka keeps trying, and the health endpoints say so): the
/// check is then skipped.
///
/// It reads the topics' `max.message.bytes` too, for the publisher's
/// [`Limits`], and stops when the producer's or a topic's limit is below
/// [`MIN_LIMIT`].
pub fn check_topics(k: &KafkaSettings, timeout: Duration) -> anyhow::Result<()> {
    use anyhow::bail;
    let producer_max = producer_max(k);
    if producer_max < MIN_LIMIT {
        bail!(
            "kafka.producer.message.max.bytes: {producer_max} bytes leaves no room for a packet; set at least {MIN_LIMIT}"
        );
    }
    let mut c = crate::kafka::producer(k);
    // Asking must not create the topic on a broker that auto-creates.
    c.set("allow.auto.create.topics", "false");
    let probe: rdkafka::producer::BaseProducer<KafkaContext> =
        c.create_with_context(KafkaContext("topic check"))?;
    let deadline = Instant::now() + timeout;
    loop {
        let answered = probe
            .client()
            .fetch_metadata(None, Duration::from_millis(500));
        // The service's producer polls in the background: its error
        // callback is where librdkafka reports a refusal.
        if let Some(refused) = crate::kafka::refused() {
            bail!("{refused}");
        }
        match answered {
            Ok(_) => break,
            Err(e) if Instant::now() >= deadline => {
                warn!(error = %e, "cannot reach the brokers yet to check the topics; going on");
                return Ok(());
            }
            Err(_) => {}
        }
    }
    for (key, topic) in [
        ("kafka.output_topic", &k.output_topic),
        ("kafka.dlq_topic", &k.dlq_topic),
    ] {
        if topic.is_empty() {
            continue;
        }
        let md = match probe.client().fetch_metadata(Some(topic), timeout) {
            Ok(md) => md,
            Err(e) => {
                warn!(error = %e, topic = %topic, "cannot check that {key} exists yet; going on");
                return Ok(());
            }
        };
        let Some(t) = md.topics().iter().find(|t| t.name() == topic) else {
            bail!("{key}: the brokers did not describe topic `{topic}`");
        };
        match t.error().map(RDKafkaErrorCode::from) {
            None if !t.partitions().is_empty() => {}
            Some(RDKafkaErrorCode::UnknownTopicOrPartition) | None => {
                let hint = if key == "kafka.dlq_topic" {
                    " (or set kafka.dlq_topic = \"\" to count invalid messages without forwarding them)"
                } else {
                    ""
                };
                bail!(
                    "{key}: topic `{topic}` does not exist on {}; create it{hint}",
                    k.bootstrap_servers
                )
            }
            Some(e) => bail!("{key}: topic `{topic}` cannot be used: {e}"),
        }
    }
    let topics: Vec<String> = [&k.output_topic, &k.dlq_topic]
        .into_iter()
        .filter(|t| !t.is_empty())
        .cloned()
        .collect();
    match read_topic_max(k, &topics, timeout) {
        Ok(found) => {
            for topic in topics
                .iter()
                .filter(|t| !found.iter().any(|(f, _)| f == *t))
            {
                record(&k.bootstrap_servers, topic, None);
                warn!(topic = %topic, "the brokers did not tell the topic's max.message.bytes; its records are kept within the producer's message.max.bytes");
            }
            for (topic, bytes) in found {
                let key = if topic == k.output_topic {
                    "kafka.output_topic"
                } else {
                    "kafka.dlq_topic"
                };
                if bytes < MIN_LIMIT {
                    bail!(
                        "{key}: topic `{topic}` takes records of at most {bytes} bytes (its max.message.bytes); set it to at least {MIN_LIMIT}"
                    );
                }
                record(&k.bootstrap_servers, &topic, Some(bytes));
                info!(
                    topic = %topic,
                    max_message_bytes = bytes,
                    producer_max,
                    "records to {topic} are kept within {} bytes",
                    bytes.min(producer_max)
                );
            }
        }
        Err(e) => {
            unknown_limit(&e);
            for topic in &topics {
                record(&k.bootstrap_servers, topic, None);
            }
        }
    }
    Ok(())
}

/// 1s, 2s, 4s, ... capped at 30s.
pub fn backoff(attempt: u32) -> Duration {
    Duration::from_secs(1u64 << attempt.saturating_sub(1).min(5)).min(Duration::from_secs(30))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::event::ErrorKind;

    #[test]
    fn a_dead_letter_reduced_for_a_small_topic_fits_it() {
        let m = InvalidMessage {
            topic: Arc::from("user-login"),
            partition: 0,
            offset: 7,
            key: Some(vec![b'k'; 5_000]),
            payload: vec![b'x'; 1_500_000],
            kind: ErrorKind::NotJson,
            reason: "not JSON".into(),
        };
        let whole = OutRecord::dead_letter(&Arc::from("dlq"), &m);
        for limit in [MIN_LIMIT, 20_000, 65_000] {
            let r = whole.reduced_to_fit(limit);
            assert!(r.wire_size() <= limit, "{} > {limit}", r.wire_size());
            assert!(r.payload.len() > limit - 2_000, "no more cut than needed");
            assert_eq!(&r.payload[..], &whole.payload[..r.payload.len()]);
            assert!(!r.reducible);
        }
        // What librdkafka counts against message.max.bytes, and more.
        let framing = 36;
        let headers: usize = whole
            .headers
            .iter()
            .map(|(k, v)| k.len() + v.len() + 2)
            .sum();
        assert!(whole.wire_size() >= framing + 61 + 1_500_000 + 5_000 + headers);
    }

    #[test]
    fn limits_take_the_smaller_and_leave_room_for_a_packets_key_and_headers() {
        let s = crate::settings::Settings::load_with_env(
            None,
            [(
                "LOGIN_METRICS__KAFKA__PRODUCER__MESSAGE_MAX_BYTES".to_string(),
                "2000000".to_string(),
            )],
        )
        .unwrap();
        assert_eq!(producer_max(&s.kafka), 2_000_000);
        let defaults =
            crate::settings::Settings::load_with_env(None, Vec::<(String, String)>::new()).unwrap();
        assert_eq!(producer_max(&defaults.kafka), PRODUCER_MAX_DEFAULT);
        let limits = Limits {
            output: 1_000_000,
            dead_letters: 1_000_000,
        };
        assert_eq!(limits.packet_bytes(), 1_000_000 - PACKET_HEADROOM);
        let packet = OutRecord {
            topic: Arc::from("login-metrics"),
            key: Some(vec![b'0'; 32]),
            payload: Arc::from(vec![b'{'; limits.packet_bytes()]),
            headers: vec![("content-type", b"application/json".to_vec())],
            reducible: false,
            partition: None,
        };
        assert!(packet.wire_size() <= limits.output);
    }

    #[test]
    fn backoff_doubles_and_caps() {
        let b: Vec<u64> = (1..=8).map(|a| backoff(a).as_secs()).collect();
        assert_eq!(b, vec![1, 2, 4, 8, 16, 30, 30, 30]);
    }

    #[test]
    fn dead_letters_carry_reason_and_coordinates() {
        let m = InvalidMessage {
            topic: Arc::from("user-login"),
            partition: 2,
            offset: 41,
            key: Some(b"k".to_vec()),
            payload: b"{oops".to_vec(),
            kind: ErrorKind::NotJson,
            reason: "not JSON: EOF".into(),
        };
        let r = OutRecord::dead_letter(&Arc::from("dlq"), &m);
        assert_eq!(&*r.topic, "dlq");
        assert_eq!(&r.payload[..], b"{oops");
        let h: Vec<(&str, String)> = r
            .headers
            .iter()
            .map(|(k, v)| (*k, String::from_utf8(v.clone()).unwrap()))
            .collect();
        assert_eq!(
            h,
            vec![
                ("error.kind", "not_json".into()),
                ("error.reason", "not JSON: EOF".into()),
                ("source.topic", "user-login".into()),
                ("source.partition", "2".into()),
                ("source.offset", "41".into()),
            ]
        );
    }

    fn headers(r: &OutRecord) -> Vec<(&'static str, String)> {
        r.headers
            .iter()
            .map(|(k, v)| (*k, String::from_utf8(v.clone()).unwrap()))
            .collect()
    }

    #[test]
    fn a_pseudonymized_dead_letter_carries_no_raw_value() {
        use crate::core::event::Field;
        let privacy = Pseudonymizer::new(b"k", &[Field::Ip, Field::DeviceId]);
        let late = InvalidMessage {
            topic: Arc::from("user-login"),
            partition: 1,
            offset: 9,
            key: Some(b"u1".to_vec()),
            payload: br#"{"user_id":"u1","ip":"10.0.0.1","device_id":"593-47-5928","timestamp":1}"#
                .to_vec(),
            kind: ErrorKind::Late,
            reason: "late".into(),
        };
        let r = OutRecord::pseudonymized_dead_letter(&Arc::from("dlq"), &late, &privacy);
        assert_eq!(
            String::from_utf8(r.payload.to_vec()).unwrap(),
            format!(
                r#"{{"user_id":"u1","ip":"{}","device_id":"{}","timestamp":1}}"#,
                privacy.pseudonym("10.0.0.1"),
                privacy.pseudonym("593-47-5928")
            )
        );
        assert_eq!(r.key, Some(privacy.pseudonym("u1").into_bytes()));
        let raw = headers(&OutRecord::dead_letter(&Arc::from("dlq"), &late));
        assert_eq!(
            headers(&r),
            [raw, vec![("dead_letter.pseudonymized", "true".into())]].concat()
        );

        let not_json = InvalidMessage {
            payload: b"ip=10.0.0.1 device=593-47-5928".to_vec(),
            kind: ErrorKind::NotJson,
            reason: "not JSON".into(),
            ..late
        };
        let r = OutRecord::pseudonymized_dead_letter(&Arc::from("dlq"), &not_json, &privacy);
        assert!(r.payload.is_empty());
        assert_eq!(r.key, Some(privacy.pseudonym("u1").into_bytes()));
        let h = headers(&r);
        assert_eq!(
            &h[..5],
            &headers(&OutRecord::dead_letter(&Arc::from("dlq"), &not_json))[..]
        );
        assert_eq!(
            &h[5..],
            [
                ("dead_letter.pseudonymized", "true".to_string()),
                ("dead_letter.payload", "withheld".into()),
                ("dead_letter.original_bytes", "30".into()),
            ]
        );
    }

    #[test]
    fn a_reduced_dead_letter_keeps_its_coordinates_and_says_what_was_cut() {
        let m = InvalidMessage {
            topic: Arc::from("user-login"),
            partition: 0,
            offset: 7,
            key: None,
            payload: vec![b'x'; 1_500_000],
            kind: ErrorKind::NotJson,
            reason: "not JSON".into(),
        };
        let r = OutRecord::dead_letter(&Arc::from("dlq"), &m).reduced(REDUCED_PAYLOAD_BYTES);
        assert_eq!(r.payload.len(), REDUCED_PAYLOAD_BYTES);
        assert!(!r.reducible, "reduced once only");
        let h = |k: &str| {
            r.headers
                .iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| String::from_utf8(v.clone()).unwrap())
        };
        assert_eq!(h("source.offset").as_deref(), Some("7"));
        assert_eq!(h("error.kind").as_deref(), Some("not_json"));
        assert_eq!(h("dead_letter.original_bytes").as_deref(), Some("1500000"));
        assert_eq!(h("dead_letter.truncated").as_deref(), Some("true"));
        assert!(r.wire_size() < PRODUCER_MAX_DEFAULT);
        assert_eq!(
            OutRecord::dead_letter(&Arc::from("dlq"), &m)
                .reduced_to_fit(PRODUCER_MAX_DEFAULT)
                .payload
                .len(),
            REDUCED_PAYLOAD_BYTES,
            "a topic that takes more keeps the usual cut"
        );
        assert!(permanent_for_its_content(&KafkaError::MessageProduction(
            RDKafkaErrorCode::MessageSizeTooLarge
        )));
        assert!(!permanent_for_its_content(&KafkaError::MessageProduction(
            RDKafkaErrorCode::BrokerTransportFailure
        )));
    }
}
