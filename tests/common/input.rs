//! Known input: test settings, messages placed on known partitions, generated
//! login events with malformed ones among them, and what was produced where.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use login_metrics::core::event::Field;
use login_metrics::core::packet::Packet;
use login_metrics::settings::Settings;
use login_metrics::{Pipeline, RunSummary};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

#[allow(unused_imports)]
use super::*;

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
    produce_at(bootstrap, topic, messages, None)
}

/// [`produce`], with each message's record timestamp (epoch milliseconds)
/// when `timestamps` is given, else the producer's clock.
pub fn produce_at(
    bootstrap: &str,
    topic: &str,
    messages: &[Input],
    timestamps: Option<&[i64]>,
) -> Vec<i64> {
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("enable.idempotence", "true")
        .set("linger.ms", "5")
        // Brokers take larger messages than the service's producer may send.
        .set("message.max.bytes", "4000000")
        .create()
        .expect("test producer");
    for (i, m) in messages.iter().enumerate() {
        let mut r = BaseRecord::<str, [u8]>::to(topic)
            .partition(m.partition)
            .payload(&m.payload);
        if let Some(k) = &m.key {
            r = r.key(k.as_str());
        }
        if let Some(ts) = timestamps {
            r = r.timestamp(ts[i]);
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

pub fn all_fields() -> Vec<&'static str> {
    Field::ALL.iter().map(|f| f.name()).collect()
}

/// The input as produced: (partition, offset) → (generated to be invalid, payload).
pub type InputMap = HashMap<(i32, i64), (bool, Vec<u8>)>;

/// Generated input spread round-robin over `partitions`, and its map by coordinate.
pub fn generated_input(
    seed: u64,
    users: usize,
    count: usize,
    partitions: i32,
) -> (Vec<Input>, Vec<bool>) {
    let mut cfg = login_metrics::commands::generator::GeneratorConfig::new(seed);
    cfg.users = users;
    cfg.malformed_rate = 0.003;
    let generated: Vec<_> = login_metrics::commands::generator::Generator::new(cfg)
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
