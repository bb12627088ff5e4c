//! The metric packet: one JSON object per window (or arrival batch).
//!
//! The shape is specified by `docs/packet.schema.json`. A window packet's
//! `packet_id` is derived from what the packet answers: the consumer group,
//! the input topic, the window, the pane, the partitions whose events it
//! counts and a fingerprint of the analysis settings (slices, top, privacy).
//! A replay carries the id of the original; two instances of a group that
//! each report their own partitions' share of a window get different ids.
//! An arrival packet's id is derived from the offset ranges it covers, so a
//! replay that closes at the same offsets carries the same id.
//!
//! Reading packets ignores fields this version does not know: adding a field
//! is a compatible change (`docs/packet.md`); `schema_version` moves only on a
//! breaking one.

use std::collections::BTreeMap;

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use crate::core::analysis::SliceReport;
use crate::core::event::{ErrorKind, Field};
use crate::core::privacy::Pseudonymizer;
use crate::work::{Batch, SourceRange, WindowId};

pub const SCHEMA_VERSION: u32 = 2;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
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
pub struct Window {
    /// Window mode: the window's start (RFC 3339 UTC, inclusive).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start: Option<String>,
    /// Window mode: the window's end (exclusive).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end: Option<String>,
    /// Window mode: which part of a window split by `batch.max_events` (0 when not split).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pane: Option<u32>,
    /// Smallest event time in the batch; null when it has no timestamped event.
    pub ts_min: Option<String>,
    pub ts_max: Option<String>,
    pub closed_by: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventCounts {
    pub valid: u64,
    pub invalid: u64,
    /// Invalid messages by error kind (only kinds that occurred).
    pub invalid_by_kind: BTreeMap<String, u64>,
    /// Window mode: late events among the window's offsets.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub late: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Source {
    pub topic: String,
    pub partition: i32,
    pub first_offset: i64,
    pub last_offset: i64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SliceMetrics {
    pub slice: Vec<String>,
    pub groups: u64,
    pub duplicate_groups: u64,
    pub truncated: bool,
    /// One object per duplicate group: the slice's fields, then `count`.
    pub duplicates: Vec<Map<String, Value>>,
}

/// What makes window packets of one deployment distinct: the consumer group,
/// the input topic and a fingerprint of the settings that shape a packet's
/// content (slices, top, pseudonymized fields and key).
#[derive(Debug, Clone)]
pub struct Identity {
    prefix: String,
}

impl Identity {
    pub fn new(
        group: &str,
        topic: &str,
        slices: &[Vec<Field>],
        top: usize,
        privacy: &Pseudonymizer,
    ) -> Identity {
        let mut fp = String::new();
        for s in slices {
            fp.push_str(&s.iter().map(|f| f.name()).collect::<Vec<_>>().join("+"));
            fp.push(',');
        }
        fp.push_str(&format!(";top={top};"));
        for f in Field::ALL {
            if privacy.applies_to(f) {
                fp.push_str(f.name());
                fp.push('+');
            }
        }
        if privacy.is_active() {
            // A keyed value, so the key itself cannot be recovered from ids.
            fp.push_str(&privacy.pseudonym("login-metrics/packet-id"));
        }
        Identity {
            prefix: format!("{group}\n{topic}\n{fp}\n"),
        }
    }

    /// The id of a window's pane over `partitions` (those with events in it).
    pub fn window_packet_id(&self, w: &WindowId, partitions: &[i32]) -> String {
        let mut partitions = partitions.to_vec();
        partitions.sort_unstable();
        partitions.dedup();
        let mut h = Sha256::new();
        h.update(self.prefix.as_bytes());
        h.update(format!("{}/{}/{}", w.start_ms, w.end_ms, w.pane));
        h.update(format!("/p={partitions:?}"));
        let mut id = hex::encode(h.finalize());
        id.truncate(32);
        id
    }
}

/// Deterministic id of the input an arrival packet covers: the first 32 hex
/// characters of SHA-256 over its offset ranges.
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
    identity: &Identity,
    emitted_at: DateTime<Utc>,
) -> Packet {
    let invalid_by_kind: BTreeMap<String, u64> = ErrorKind::ALL
        .iter()
        .filter(|k| batch.invalid_by_kind[**k as usize] > 0)
        .map(|k| (k.as_str().to_string(), batch.invalid_by_kind[*k as usize]))
        .collect();
    let invalid = invalid_by_kind.values().sum();
    Packet {
        schema_version: SCHEMA_VERSION,
        packet_id: match &batch.window {
            Some(w) => identity.window_packet_id(
                w,
                &batch
                    .sources
                    .iter()
                    .map(|s| s.partition)
                    .collect::<Vec<_>>(),
            ),
            None => packet_id(&batch.sources),
        },
        window: Window {
            start: batch.window.map(|w| rfc3339_millis(w.start_ms)),
            end: batch.window.map(|w| rfc3339_millis(w.end_ms)),
            pane: batch.window.map(|w| w.pane),
            ts_min: batch.ts_min_ms.map(rfc3339_millis),
            ts_max: batch.ts_max_ms.map(rfc3339_millis),
            closed_by: batch.closed_by.as_str().to_string(),
        },
        events: EventCounts {
            valid: batch.valid() as u64,
            invalid,
            invalid_by_kind,
            late: batch.late,
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
    fn a_window_id_depends_on_the_window_pane_partitions_and_settings() {
        let slices = vec![vec![Field::UserId, Field::Ip]];
        let off = Pseudonymizer::disabled();
        let id = Identity::new("g", "user-login", &slices, 10, &off);
        let w = |start_ms, pane| WindowId {
            start_ms,
            end_ms: start_ms + 10_000,
            pane,
        };
        let a = id.window_packet_id(&w(0, 0), &[2, 0, 1]);
        assert_eq!(a, id.window_packet_id(&w(0, 0), &[0, 1, 2]));
        assert_ne!(a, id.window_packet_id(&w(10_000, 0), &[0, 1, 2]));
        assert_ne!(a, id.window_packet_id(&w(0, 1), &[0, 1, 2]));
        // Another instance's share of the same window.
        assert_ne!(a, id.window_packet_id(&w(0, 0), &[0, 1]));
        let other = Identity::new("g", "user-login", &slices, 11, &off);
        assert_ne!(a, other.window_packet_id(&w(0, 0), &[0, 1, 2]));
    }

    #[test]
    fn timestamps_are_rfc3339_utc() {
        assert_eq!(
            rfc3339_millis(1_694_479_551_250),
            "2023-09-12T00:45:51.250Z"
        );
    }
}
