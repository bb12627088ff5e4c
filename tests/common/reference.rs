//! The independent oracle: naive duplicate counts with a HashMap, and the
//! checks of packets against them and against `docs/packet.schema.json`.

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

/// docs/packet.schema.json, compiled.
fn packet_schema() -> (boon::Schemas, boon::SchemaIndex) {
    let schema: Value =
        serde_json::from_str(include_str!("../../docs/packet.schema.json")).unwrap();
    let url = "https://login-metrics.dev/schema/packet/v3.json";
    let mut compiler = boon::Compiler::new();
    compiler.add_resource(url, schema).unwrap();
    let mut schemas = boon::Schemas::new();
    let idx = compiler
        .compile(url, &mut schemas)
        .expect("schema compiles");
    (schemas, idx)
}

/// Validates one packet against docs/packet.schema.json: the validator's
/// report when it does not match.
pub fn schema_errors(packet: &Value) -> Result<(), String> {
    let (schemas, idx) = packet_schema();
    schemas.validate(packet, idx).map_err(|e| format!("{e:#}"))
}

/// Validates packets against docs/packet.schema.json.
pub fn assert_schema_valid(packets: &[Value]) {
    let (schemas, idx) = packet_schema();
    for p in packets {
        if let Err(e) = schemas.validate(p, idx) {
            panic!("packet does not match docs/packet.schema.json: {e:#}\n{p}");
        }
    }
}

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
