//! The metric packet: one JSON object per batch.
//!
//! The shape is specified by `docs/packet.schema.json`. A packet names the
//! offset ranges it covers (`sources`), and its `packet_id` is derived from
//! those ranges alone, so a replay of the same input after a crash carries the
//! same id and a reader can deduplicate or recompute it.

use std::collections::BTreeMap;

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use crate::analysis::SliceReport;
use crate::batch::{Batch, SourceRange};
use crate::privacy::Pseudonymizer;

pub const SCHEMA_VERSION: u32 = 1;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Packet {
    pub schema_version: u32,
    pub packet_id: String,
    pub window: Window,
    pub events: EventCounts,
    pub sources: Vec<Source>,
    pub metrics: Vec<SliceMetrics>,
    pub emitted_at: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Window {
    /// Smallest event time in the batch; null when it has no timestamped event.
    pub ts_min: Option<String>,
    pub ts_max: Option<String>,
    pub closed_by: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventCounts {
    pub valid: u64,
    pub invalid: u64,
    /// Invalid messages by error kind (only kinds that occurred).
    pub invalid_by_kind: BTreeMap<String, u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Source {
    pub topic: String,
    pub partition: i32,
    pub first_offset: i64,
    pub last_offset: i64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SliceMetrics {
    pub slice: Vec<String>,
    pub groups: u64,
    pub duplicate_groups: u64,
    pub truncated: bool,
    /// One object per duplicate group: the slice's fields, then `count`.
    pub duplicates: Vec<Map<String, Value>>,
}

/// Deterministic id of the input a packet covers: the first 32 hex characters
/// of SHA-256 over its offset ranges.
pub fn packet_id(sources: &[SourceRange]) -> String {
    let mut h = Sha256::new();
    for s in sources {
        h.update(format!(
            "{}/{}/{}-{};",
            s.topic, s.partition, s.first_offset, s.last_offset
        ));
    }
    let mut id = hex::encode(h.finalize());
    id.truncate(32);
    id
}

pub fn rfc3339_millis(ms: i64) -> String {
    DateTime::<Utc>::from_timestamp_millis(ms)
        .expect("timestamps are range-checked by the parser")
        .to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// Builds the packet of a batch from its analysis.
pub fn build(
    batch: &Batch,
    reports: &[SliceReport],
    privacy: &Pseudonymizer,
    emitted_at: DateTime<Utc>,
) -> Packet {
    let mut invalid_by_kind = BTreeMap::new();
    for m in &batch.invalid {
        *invalid_by_kind
            .entry(m.kind.as_str().to_string())
            .or_insert(0) += 1;
    }
    Packet {
        schema_version: SCHEMA_VERSION,
        packet_id: packet_id(&batch.sources),
        window: Window {
            ts_min: batch.ts_min_ms.map(rfc3339_millis),
            ts_max: batch.ts_max_ms.map(rfc3339_millis),
            closed_by: batch.closed_by.as_str().to_string(),
        },
        events: EventCounts {
            valid: batch.valid() as u64,
            invalid: batch.invalid.len() as u64,
            invalid_by_kind,
        },
        sources: batch
            .sources
            .iter()
            .map(|s| Source {
                topic: s.topic.to_string(),
                partition: s.partition,
                first_offset: s.first_offset,
                last_offset: s.last_offset,
            })
            .collect(),
        metrics: reports.iter().map(|r| slice_metrics(r, privacy)).collect(),
        emitted_at: emitted_at.to_rfc3339_opts(SecondsFormat::Millis, true),
    }
}

fn slice_metrics(report: &SliceReport, privacy: &Pseudonymizer) -> SliceMetrics {
    let duplicates = report
        .duplicates
        .iter()
        .map(|row| {
            let mut obj = Map::with_capacity(report.fields.len() + 1);
            for (field, value) in report.fields.iter().zip(&row.values) {
                let v = match value {
                    Some(s) => Value::String(privacy.outward(*field, s).into_owned()),
                    None => Value::Null,
                };
                obj.insert(field.name().to_string(), v);
            }
            obj.insert("count".to_string(), Value::from(row.count));
            obj
        })
        .collect();
    SliceMetrics {
        slice: report.fields.iter().map(|f| f.name().to_string()).collect(),
        groups: report.groups,
        duplicate_groups: report.duplicate_groups,
        truncated: report.truncated(),
        duplicates,
    }
}

impl Packet {
    /// The packet as one line of JSON (no newline).
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("packets serialize")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn range(p: i32, first: i64, last: i64) -> SourceRange {
        SourceRange {
            topic: Arc::from("user-login"),
            partition: p,
            first_offset: first,
            last_offset: last,
        }
    }

    #[test]
    fn packet_id_depends_on_the_ranges_only() {
        let a = packet_id(&[range(0, 0, 9), range(1, 5, 7)]);
        assert_eq!(a.len(), 32);
        assert_eq!(a, packet_id(&[range(0, 0, 9), range(1, 5, 7)]));
        assert_ne!(a, packet_id(&[range(0, 0, 9), range(1, 5, 8)]));
        assert_ne!(a, packet_id(&[range(0, 0, 9)]));
    }

    #[test]
    fn timestamps_are_rfc3339_utc() {
        assert_eq!(
            rfc3339_millis(1_694_479_551_250),
            "2023-09-12T00:45:51.250Z"
        );
    }
}
