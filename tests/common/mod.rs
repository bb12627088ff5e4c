//! Helpers shared by the integration tests: producing known input, reading
//! topics back with an independent consumer, naive reference counts, and the
//! packet schema.
#![allow(dead_code)]

pub mod broker;
pub mod browser;
pub mod cli;
pub mod order;

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

/// Settings for a test run: the defaults in arrival mode (the suites written
/// for arrival batches), then `overrides` as `LOGIN_METRICS__...` variables
/// (the same layer operators use); `("BATCH__MODE", "window")` selects windows.
pub fn settings(bootstrap: &str, log: &Path, overrides: &[(&str, &str)]) -> Settings {
    let mut env = vec![
        (
            "LOGIN_METRICS__BATCH__MODE".to_string(),
            "arrival".to_string(),
        ),
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
        // Brokers take larger messages than the service's producer may send.
        .set("message.max.bytes", "4000000")
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
    // Some brokers (tansu 0.6) report the high watermark as the last record
    // batch's base offset + 1, short of the real end; so read at least up to
    // the watermark, then on until the topic stays quiet.
    let mut last_message = Instant::now();
    while (out.len() as i64) < remaining || last_message.elapsed() < Duration::from_millis(1500) {
        assert!(
            Instant::now() < deadline,
            "timed out reading {topic}: {} of {remaining}",
            out.len()
        );
        if let Some(m) = consumer.poll(Duration::from_millis(100)) {
            last_message = Instant::now();
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

/// Runs the pipeline with `settings` until `messages` input messages are
/// consumed, stops it (shutdown flushes the open batch), and returns the run's
/// summary and the output topic's packets.
pub async fn run_to_end(settings: Settings, messages: u64) -> (RunSummary, Vec<Packet>) {
    let bootstrap = settings.kafka.bootstrap_servers.clone();
    let run = start(settings);
    run.consumed(messages, Duration::from_secs(60)).await;
    let summary = run.stop().await.expect("the run succeeds");
    (summary, read_packets(&bootstrap))
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

    pub async fn stop(mut self) -> anyhow::Result<RunSummary> {
        self.shutdown.cancel();
        (&mut self.handle).await.expect("pipeline task")
    }

    /// Waits for the run to end by itself (a failure).
    pub async fn join(mut self, timeout: Duration) -> anyhow::Result<RunSummary> {
        tokio::time::timeout(timeout, &mut self.handle)
            .await
            .expect("the run ended in time")
            .expect("pipeline task")
    }
}

/// A test that fails stops its run, so that the runtime can shut down and
/// the failure is reported instead of waiting for the consumer thread forever.
impl Drop for Running {
    fn drop(&mut self) {
        self.shutdown.cancel();
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
    let url = "https://login-metrics.dev/schema/packet/v2.json";
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

/// The input as produced: (partition, offset) → (generated to be invalid, payload).
pub type InputMap = HashMap<(i32, i64), (bool, Vec<u8>)>;

/// Checks every packet against the input it names: valid and invalid counts,
/// and per slice the groups, duplicate groups and rows of a naive count over
/// the same messages. Returns how often each input offset is covered.
pub fn verify_packets(
    packets: &[Packet],
    input: &InputMap,
    slices: &[Vec<String>],
    top: usize,
) -> HashMap<(i32, i64), usize> {
    let mut covered: HashMap<(i32, i64), usize> = HashMap::new();
    for p in packets {
        let mut valid = Vec::new();
        let mut invalid = 0;
        for src in &p.sources {
            assert_eq!(src.topic, INPUT);
            for off in src.first_offset..=src.last_offset {
                *covered.entry((src.partition, off)).or_default() += 1;
                let (bad, payload) = input.get(&(src.partition, off)).unwrap_or_else(|| {
                    panic!(
                        "packet {} names {}/{off}, not in the input",
                        p.packet_id, src.partition
                    )
                });
                if *bad {
                    invalid += 1;
                } else {
                    valid.push(serde_json::from_slice::<Value>(payload).unwrap());
                }
            }
        }
        assert_eq!(
            p.events.valid,
            valid.len() as u64,
            "valid count of {}",
            p.packet_id
        );
        assert_eq!(
            p.events.invalid, invalid,
            "invalid count of {}",
            p.packet_id
        );
        assert_eq!(p.metrics.len(), slices.len());
        for (i, slice) in slices.iter().enumerate() {
            let (groups, dup_groups, mut rows) = naive_counts(&valid, slice);
            let m = &p.metrics[i];
            assert_eq!(&m.slice, slice);
            assert_eq!(m.groups, groups, "groups of {slice:?} in {}", p.packet_id);
            assert_eq!(
                m.duplicate_groups, dup_groups,
                "duplicate groups of {slice:?} in {}",
                p.packet_id
            );
            rows.truncate(top);
            assert_eq!(
                packet_rows(p, i),
                rows,
                "rows of {slice:?} in {}",
                p.packet_id
            );
            assert_eq!(m.truncated, dup_groups > top as u64);
        }
    }
    covered
}

/// Generated input spread round-robin over `partitions`, and its map by coordinate.
pub fn generated_input(
    seed: u64,
    users: usize,
    count: usize,
    partitions: i32,
) -> (Vec<Input>, Vec<bool>) {
    let mut cfg = login_metrics::generator::GeneratorConfig::new(seed);
    cfg.users = users;
    cfg.malformed_rate = 0.003;
    let generated: Vec<_> = login_metrics::generator::Generator::new(cfg)
        .take(count)
        .collect();
    let inputs = generated
        .iter()
        .enumerate()
        .map(|(i, m)| Input {
            partition: (i as i32) % partitions,
            key: m.key.clone(),
            payload: m.payload.clone(),
        })
        .collect();
    (
        inputs,
        generated.iter().map(|m| m.malformed.is_some()).collect(),
    )
}

/// Produces `inputs` and returns the map by coordinate.
pub fn produce_input(bootstrap: &str, inputs: &[Input], malformed: &[bool]) -> InputMap {
    produce(bootstrap, INPUT, inputs);
    input_map(inputs, malformed)
}

/// The map by coordinate of `inputs` produced in order to an empty topic, in
/// one call or several.
pub fn input_map(inputs: &[Input], malformed: &[bool]) -> InputMap {
    let mut next: HashMap<i32, i64> = HashMap::new();
    let offsets: Vec<i64> = inputs
        .iter()
        .map(|m| {
            let o = next.entry(m.partition).or_insert(0);
            *o += 1;
            *o - 1
        })
        .collect();
    inputs
        .iter()
        .zip(&offsets)
        .zip(malformed)
        .map(|((inp, off), bad)| ((inp.partition, *off), (*bad, inp.payload.clone())))
        .collect()
}

/// The slices of the default configuration, as names.
pub fn default_slices() -> Vec<Vec<String>> {
    let s = Settings::load_with_env(None, Vec::<(String, String)>::new()).unwrap();
    s.analysis
        .slices
        .iter()
        .map(|sl| sl.iter().map(|f| f.name().to_string()).collect())
        .collect()
}

/// Waits until the group's committed offsets equal `expected`.
pub fn wait_committed(bootstrap: &str, group: &str, expected: &[i64], timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let now = committed(bootstrap, group, expected.len() as i32);
        if now == expected {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "committed offsets {now:?}, expected {expected:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The end offset of each input partition, as produced.
pub fn end_offsets(input: &InputMap, partitions: i32) -> Vec<i64> {
    (0..partitions)
        .map(|p| {
            input
                .keys()
                .filter(|(q, _)| *q == p)
                .map(|(_, o)| o + 1)
                .max()
                .unwrap_or(0)
        })
        .collect()
}

/// A plain HTTP/1.0 GET; (status, body), or None when nothing answers.
pub fn http_get(addr: &str, path: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|x| x.1.to_string())
        .unwrap_or_default();
    Some((status, body))
}

/// The value of an unlabelled metric in a Prometheus text page.
pub fn metric(page: &str, name: &str) -> Option<f64> {
    page.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// The sum of a metric's series in a Prometheus text page, whatever their
/// labels (0 when there is none).
pub fn metric_sum(page: &str, name: &str) -> f64 {
    page.lines()
        .filter_map(|l| {
            let rest = l.strip_prefix(name)?;
            let value = if rest.starts_with('{') {
                rest.rsplit_once(' ')?.1
            } else {
                rest.strip_prefix(' ')?
            };
            value.trim().parse::<f64>().ok()
        })
        .sum()
}

/// The output topic's packets with their offsets in that topic, in order.
pub fn packets_with_offsets(bootstrap: &str) -> Vec<(i64, Packet)> {
    let mut reads = read_all(bootstrap, OUTPUT);
    reads.sort_by_key(|r| r.offset);
    reads
        .into_iter()
        .map(|r| {
            (
                r.offset,
                serde_json::from_slice(&r.payload).expect("packet"),
            )
        })
        .collect()
}

/// One killed run: the output offsets its packets took, and per input
/// partition the committed offset after the kill.
pub type KilledRun = (std::ops::Range<i64>, Vec<i64>);

/// After runs killed with kill -9 and a last run to the end: nothing is lost,
/// and every input offset is in exactly one committed packet. The other
/// copies come from killed runs and lie at or past the last commit before
/// that kill. Returns how many such replayed coverages there were.
pub fn assert_each_offset_committed_once(
    bootstrap: &str,
    input: &InputMap,
    runs: &[KilledRun],
) -> usize {
    let packets = packets_with_offsets(bootstrap);
    let plain: Vec<Packet> = packets.iter().map(|(_, p)| p.clone()).collect();
    let covered = verify_packets(&plain, input, &default_slices(), 100);
    assert_eq!(
        covered.len(),
        input.len(),
        "nothing lost: every input offset is in a delivered packet"
    );
    let mut committed_cover: HashMap<(i32, i64), usize> = HashMap::new();
    let mut replays = 0;
    for (out_offset, p) in &packets {
        let killed = runs.iter().find(|(range, _)| range.contains(out_offset));
        for s in &p.sources {
            for o in s.first_offset..=s.last_offset {
                match killed {
                    Some((_, after)) if o >= after[s.partition as usize] => replays += 1,
                    _ => *committed_cover.entry((s.partition, o)).or_default() += 1,
                }
            }
        }
    }
    for (coord, n) in &committed_cover {
        assert_eq!(*n, 1, "{coord:?} is covered by {n} committed packets");
    }
    assert_eq!(committed_cover.len(), input.len());
    eprintln!(
        "kill -9 x{}: {} packets, {replays} replayed event coverages",
        runs.len(),
        packets.len()
    );
    replays
}
