//! Helpers shared by the integration tests: producing known input, reading
//! topics back with an independent consumer, naive reference counts, and the
//! packet schema.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use login_metrics::event::Field;
use login_metrics::packet::Packet;
use login_metrics::settings::Settings;
use login_metrics::{Pipeline, RunSummary};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

pub const INPUT: &str = "user-login";
pub const OUTPUT: &str = "login-metrics";
pub const DLQ: &str = "user-login-dlq";

/// Settings for a test run: the defaults, then `overrides` as
/// `LOGIN_METRICS__...` variables (the same layer operators use).
pub fn settings(bootstrap: &str, log: &Path, overrides: &[(&str, &str)]) -> Settings {
    let mut env = vec![
        (
            "LOGIN_METRICS__KAFKA__BOOTSTRAP_SERVERS".to_string(),
            bootstrap.to_string(),
        ),
        (
            "LOGIN_METRICS__METRICS_LOG__PATH".to_string(),
            log.display().to_string(),
        ),
        (
            "LOGIN_METRICS__TELEMETRY__LISTEN".to_string(),
            String::new(),
        ),
    ];
    for (k, v) in overrides {
        env.push((format!("LOGIN_METRICS__{k}"), v.to_string()));
    }
    Settings::load_with_env(None, env).expect("test settings are valid")
}

/// One input message placed on a known partition.
#[derive(Debug, Clone)]
pub struct Input {
    pub partition: i32,
    pub key: Option<String>,
    pub payload: Vec<u8>,
}

pub fn input(partition: i32, payload: impl Into<Vec<u8>>) -> Input {
    Input {
        partition,
        key: None,
        payload: payload.into(),
    }
}

/// Produces messages in order and waits for all of them; returns each one's offset.
pub fn produce(bootstrap: &str, topic: &str, messages: &[Input]) -> Vec<i64> {
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("enable.idempotence", "true")
        .set("linger.ms", "5")
        .create()
        .expect("test producer");
    for m in messages {
        let mut r = BaseRecord::<str, [u8]>::to(topic)
            .partition(m.partition)
            .payload(&m.payload);
        if let Some(k) = &m.key {
            r = r.key(k.as_str());
        }
        loop {
            match producer.send(r) {
                Ok(()) => break,
                Err((_, back)) => {
                    producer.poll(Duration::from_millis(20));
                    r = back;
                }
            }
        }
    }
    producer
        .flush(Duration::from_secs(30))
        .expect("test input delivered");
    // Offsets are assigned per partition in send order (idempotent producer).
    let mut next: HashMap<i32, i64> = HashMap::new();
    messages
        .iter()
        .map(|m| {
            let o = next.entry(m.partition).or_insert(0);
            *o += 1;
            *o - 1
        })
        .collect()
}

/// A message read back from a topic.
#[derive(Debug, Clone)]
pub struct Read {
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub payload: Vec<u8>,
    pub headers: HashMap<String, String>,
}

/// Reads every message currently in `topic` (all partitions, from the start),
/// with a consumer that belongs to no group.
pub fn read_all(bootstrap: &str, topic: &str) -> Vec<Read> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", "test-reader")
        .set("enable.auto.commit", "false")
        .create()
        .expect("test reader");
    let md = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .expect("metadata");
    let partitions: Vec<i32> = md.topics()[0].partitions().iter().map(|p| p.id()).collect();
    let mut tpl = TopicPartitionList::new();
    let mut remaining = 0i64;
    for &p in &partitions {
        let (lo, hi) = consumer
            .fetch_watermarks(topic, p, Duration::from_secs(10))
            .expect("watermarks");
        remaining += hi - lo;
        tpl.add_partition_offset(topic, p, Offset::Beginning)
            .unwrap();
    }
    consumer.assign(&tpl).expect("assign");
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while (out.len() as i64) < remaining {
        assert!(
            Instant::now() < deadline,
            "timed out reading {topic}: {} of {remaining}",
            out.len()
        );
        if let Some(m) = consumer.poll(Duration::from_millis(100)) {
            let m = m.expect("read");
            let mut headers = HashMap::new();
            if let Some(h) = m.headers() {
                for hd in h.iter() {
                    headers.insert(
                        hd.key.to_string(),
                        String::from_utf8_lossy(hd.value.unwrap_or_default()).into_owned(),
                    );
                }
            }
            out.push(Read {
                partition: m.partition(),
                offset: m.offset(),
                key: m.key().map(<[u8]>::to_vec),
                payload: m.payload().unwrap_or_default().to_vec(),
                headers,
            });
        }
    }
    out
}

/// The packets of the output topic, in publication order.
pub fn read_packets(bootstrap: &str) -> Vec<Packet> {
    let mut reads = read_all(bootstrap, OUTPUT);
    reads.sort_by_key(|r| (r.partition, r.offset));
    reads
        .iter()
        .map(|r| {
            let p: Packet = serde_json::from_slice(&r.payload).expect("packet JSON");
            assert_eq!(
                r.key.as_deref(),
                Some(p.packet_id.as_bytes()),
                "keyed by packet_id"
            );
            p
        })
        .collect()
}

/// Committed offsets of `group` on `partitions` of the input topic (-1: none).
pub fn committed(bootstrap: &str, group: &str, partitions: i32) -> Vec<i64> {
    let s = settings(
        bootstrap,
        Path::new("unused"),
        &[("KAFKA__GROUP_ID", group)],
    );
    login_metrics::source::committed_offsets(&s.kafka, partitions, Duration::from_secs(10))
        .expect("committed offsets")
}

/// A pipeline run in the background, stopped by [`Running::stop`].
pub struct Running {
    pub shutdown: CancellationToken,
    pub progress: Arc<login_metrics::Progress>,
    pub packets: Arc<Mutex<Vec<Packet>>>,
    handle: tokio::task::JoinHandle<anyhow::Result<RunSummary>>,
}

pub fn start(settings: Settings) -> Running {
    let packets = Arc::new(Mutex::new(Vec::new()));
    let sink = packets.clone();
    let pipeline = Pipeline::new(settings).on_packet(move |p| sink.lock().unwrap().push(p.clone()));
    let progress = pipeline.progress();
    let shutdown = CancellationToken::new();
    let handle = tokio::spawn(pipeline.run(shutdown.clone()));
    Running {
        shutdown,
        progress,
        packets,
        handle,
    }
}

impl Running {
    /// Waits until `messages` input messages have been consumed.
    pub async fn consumed(&self, messages: u64, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let seen = self
                .progress
                .messages
                .load(std::sync::atomic::Ordering::Relaxed);
            if seen >= messages {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "only {seen} of {messages} messages consumed in {timeout:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until `n` packets have been delivered.
    pub async fn delivered(&self, n: usize, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.packets.lock().unwrap().len() < n {
            assert!(
                Instant::now() < deadline,
                "fewer than {n} packets in {timeout:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn stop(self) -> anyhow::Result<RunSummary> {
        self.shutdown.cancel();
        self.handle.await.expect("pipeline task")
    }

    /// Waits for the run to end by itself (a failure).
    pub async fn join(self, timeout: Duration) -> anyhow::Result<RunSummary> {
        tokio::time::timeout(timeout, self.handle)
            .await
            .expect("the run ended in time")
            .expect("pipeline task")
    }
}

/// A login event as JSON, with the fields given.
pub fn event_json(fields: &[(&str, Option<&str>)], ts: Value) -> String {
    let mut obj = serde_json::Map::new();
    for (k, v) in fields {
        obj.insert(
            k.to_string(),
            v.map_or(Value::Null, |s| Value::String(s.into())),
        );
    }
    obj.insert("timestamp".into(), ts);
    Value::Object(obj).to_string()
}

/// Duplicate rows: the group's values and its count.
pub type Rows = Vec<(Vec<Option<String>>, u64)>;

/// The naive reference count: groups keys with a HashMap. Returns
/// (groups, duplicate_groups, duplicate rows ordered by count descending,
/// then values ascending with nulls last).
pub fn naive_report(keys: impl IntoIterator<Item = Vec<Option<String>>>) -> (u64, u64, Rows) {
    let mut counts: HashMap<Vec<Option<String>>, u64> = HashMap::new();
    for key in keys {
        *counts.entry(key).or_default() += 1;
    }
    let groups = counts.len() as u64;
    let mut dups: Rows = counts.into_iter().filter(|(_, n)| *n >= 2).collect();
    // Option orders None first; the report puts nulls last.
    let order = |v: &Vec<Option<String>>| {
        v.iter()
            .map(|x| (x.is_none(), x.clone()))
            .collect::<Vec<_>>()
    };
    dups.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| order(&a.0).cmp(&order(&b.0))));
    (groups, dups.len() as u64, dups)
}

/// [`naive_report`] over independently parsed events (serde_json::Value).
pub fn naive_counts(events: &[Value], slice: &[String]) -> (u64, u64, Rows) {
    naive_report(events.iter().map(|e| {
        slice
            .iter()
            .map(|f| e.get(f).and_then(Value::as_str).map(str::to_owned))
            .collect()
    }))
}

/// The packet's rows of one slice as (values, count).
pub fn packet_rows(p: &Packet, slice_index: usize) -> Rows {
    let m = &p.metrics[slice_index];
    m.duplicates
        .iter()
        .map(|row| {
            let values = m
                .slice
                .iter()
                .map(|f| row.get(f).and_then(Value::as_str).map(str::to_owned))
                .collect();
            (values, row["count"].as_u64().unwrap())
        })
        .collect()
}

/// Validates packets against docs/packet.schema.json.
pub fn assert_schema_valid(packets: &[Value]) {
    let schema: Value =
        serde_json::from_str(include_str!("../../docs/packet.schema.json")).unwrap();
    let url = "https://login-metrics.dev/schema/packet/v1.json";
    let mut compiler = boon::Compiler::new();
    compiler.add_resource(url, schema).unwrap();
    let mut schemas = boon::Schemas::new();
    let idx = compiler
        .compile(url, &mut schemas)
        .expect("schema compiles");
    for p in packets {
        if let Err(e) = schemas.validate(p, idx) {
            panic!("packet does not match docs/packet.schema.json: {e:#}\n{p}");
        }
    }
}

pub fn all_fields() -> Vec<&'static str> {
    Field::ALL.iter().map(|f| f.name()).collect()
}
