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
//! *reduced* instead: its payload is cut to [`REDUCED_PAYLOAD_BYTES`], headers
//! record the original size, and it is sent again. One oversized message in
//! the input must never stop the stream.
//!
//! With fields pseudonymized and `privacy.dead_letters = "pseudonymized"`, a
//! dead letter is built by [`OutRecord::pseudonymized_dead_letter`]: no raw
//! value of those fields reaches the dead-letter topic, in the payload or in
//! the key.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::util::Timeout;
use tracing::warn;

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
}

/// The payload kept of a dead letter that is too large to deliver whole.
pub const REDUCED_PAYLOAD_BYTES: usize = 64 * 1024;

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
        }
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
}

impl Publisher {
    pub fn new(k: &KafkaSettings) -> Result<Publisher, KafkaError> {
        Ok(Publisher {
            producer: crate::kafka::producer(k).create_with_context(KafkaContext("producer"))?,
            attempts: k.delivery_attempts,
        })
    }

    /// Delivers every record, retrying failures; returns when all are acknowledged.
    pub async fn deliver(&self, records: &[OutRecord]) -> Result<(), DeliveryError> {
        let mut pending: Vec<usize> = (0..records.len()).collect();
        let mut reduced: Vec<Option<OutRecord>> = vec![None; records.len()];
        let mut attempt = 0;
        loop {
            attempt += 1;
            let started = Instant::now();
            let mut futures = Vec::with_capacity(pending.len());
            for &i in &pending {
                let r = reduced[i].as_ref().unwrap_or(&records[i]);
                futures.push((i, self.enqueue(r).await));
            }
            let mut failed = Vec::new();
            let mut reduce = Vec::new();
            let mut last_error = None;
            for (i, fut) in futures {
                let outcome = match fut {
                    Ok(fut) => match fut.await {
                        Ok(Ok(_)) => Ok(()),
                        Ok(Err((e, _))) => Err(e),
                        Err(_) => Err(KafkaError::Canceled),
                    },
                    Err(e) => Err(e),
                };
                if let Err(e) = outcome {
                    let r = reduced[i].as_ref().unwrap_or(&records[i]);
                    if r.reducible && permanent_for_its_content(&e) {
                        warn!(
                            topic = %r.topic,
                            bytes = r.payload.len(),
                            error = %e,
                            "dead letter cannot be delivered whole; sending it truncated to {REDUCED_PAYLOAD_BYTES} bytes"
                        );
                        reduced[i] = Some(r.reduced(REDUCED_PAYLOAD_BYTES));
                        reduce.push(i);
                        continue;
                    }
                    failed.push(i);
                    last_error = Some(e);
                }
            }
            if !reduce.is_empty() && failed.is_empty() {
                // Not a failed attempt: the reduced records go again at once.
                attempt -= 1;
                pending = reduce;
                continue;
            }
            failed.extend(reduce);
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
            match self.producer.send_result(record) {
                Ok(fut) => return Ok(fut),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                Err((e, _)) => return Err(e),
            }
        }
    }

    /// Waits for everything queued to be delivered (shutdown).
    pub fn flush(&self, timeout: Duration) {
        if let Err(e) = self.producer.flush(Timeout::After(timeout)) {
            warn!(error = %e, "producer flush did not complete");
        }
    }
}

/// Stops at start-up when the brokers refuse the service's credentials or
/// certificates, or when the output or dead-letter topic does not exist,
/// naming the setting, rather than retrying in silence or failing when the
/// first packet is sent. A broker that cannot be reached yet is no reason to
/// stop (librdkafka keeps trying, and the health endpoints say so): the
/// check is then skipped.
pub fn check_topics(k: &KafkaSettings, timeout: Duration) -> anyhow::Result<()> {
    use anyhow::bail;
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
    Ok(())
}

/// 1s, 2s, 4s, ... capped at 30s.
fn backoff(attempt: u32) -> Duration {
    Duration::from_secs(1u64 << attempt.saturating_sub(1).min(5)).min(Duration::from_secs(30))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::event::ErrorKind;

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
        assert!(permanent_for_its_content(&KafkaError::MessageProduction(
            RDKafkaErrorCode::MessageSizeTooLarge
        )));
        assert!(!permanent_for_its_content(&KafkaError::MessageProduction(
            RDKafkaErrorCode::BrokerTransportFailure
        )));
    }
}
