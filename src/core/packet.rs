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
//!
//! A packet is published as one record, which the producer and the output
//! topic take only up to a size; [`bounded`] keeps its JSON within that size
//! whatever the input, so that no window can stop the stream. A packet that
//! fits is left as it is, byte for byte; one that does not has its long
//! values cut and, if that is not enough, rows left out at the end of its
//! largest duplicate lists, and says so (`truncated`, `values_truncated`,
//! `rows_truncated`). The cut depends on the packet and the size only, so a
//! replay of a window publishes the same bytes again.

use std::collections::BTreeMap;

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use crate::core::analysis::SliceReport;
use crate::core::event::{ErrorKind, Field};
use crate::core::privacy::Pseudonymizer;
use crate::work::{Batch, SourceRange, WindowId};

pub const SCHEMA_VERSION: u32 = 3;

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

    /// The same identity for packets made under `rules`: every setting
    /// besides the analysis's that changes what a packet holds (the window
    /// rules, the event requirements). A restart with other rules gives
    /// other ids, never other content under the same id.
    pub fn with_rules(mut self, rules: &str) -> Identity {
        self.prefix.push_str(rules);
        self.prefix.push('\n');
        self
    }

    /// The id of a window's pane over `sources`, the offset ranges of its
    /// events. The ranges pin the content even where the rules leave it to
    /// timing (a pane cut by count holds whatever arrived first): two
    /// packets with one id hold the same events.
    pub fn window_packet_id(&self, w: &WindowId, sources: &[SourceRange]) -> String {
        let mut ranges: Vec<(i32, i64, i64)> = sources
            .iter()
            .map(|s| (s.partition, s.first_offset, s.last_offset))
            .collect();
        ranges.sort_unstable();
        let mut h = Sha256::new();
        h.update(self.prefix.as_bytes());
        h.update(format!("{}/{}/{}", w.start_ms, w.end_ms, w.pane));
        h.update(format!("/r={ranges:?}"));
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
            Some(w) => identity.window_packet_id(w, &batch.sources),
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

/// The bytes of a reported value kept when a packet is cut to fit: a user
/// id, an IP address or a device id is far shorter; a value longer than
/// this is what made the packet too large.
pub const VALUE_MAX_BYTES: usize = 1024;

/// A packet made to fit a size, and its JSON.
#[derive(Debug, Clone)]
pub struct Bounded {
    /// The packet as published: values cut and rows left out when `cut` is
    /// set. Its [`Packet::to_json`] lacks the fields that say so; `json`
    /// has them.
    pub packet: Packet,
    /// What is published and logged.
    pub json: String,
    /// What was cut; `None` when the packet fit whole.
    pub cut: Option<Cut>,
}

/// What [`bounded`] cut from a packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cut {
    /// The size of the packet's JSON before the cut.
    pub original_bytes: usize,
    /// Values cut to [`VALUE_MAX_BYTES`], over all slices.
    pub values: u64,
    /// Duplicate rows left out to fit, over all slices.
    pub rows: u64,
    /// The JSON still exceeds the size: even without a duplicate row the
    /// packet does not fit (a size smaller than its window, counts and
    /// sources).
    pub over: bool,
}

/// The packet within `max_bytes` bytes of JSON.
///
/// A packet whose JSON fits is returned untouched. Otherwise every reported
/// value longer than [`VALUE_MAX_BYTES`] is cut ([`cut_value`]); if the
/// packet still does not fit, rows are left out, one at a time, from the end
/// of the slice whose remaining rows take the most bytes (the first such
/// slice on a tie), until it does. The JSON of a cut packet says so:
/// `"truncated": true` at the top level, and in every slice
/// `values_truncated` and `rows_truncated` (how many of its values were cut
/// and how many of its rows left out for the size), with the slice's own
/// `truncated` true when rows were left out. Nothing here depends on the
/// time or the order of work: the same packet and size give the same bytes.
pub fn bounded(packet: Packet, max_bytes: usize) -> Bounded {
    let json = packet.to_json();
    if json.len() <= max_bytes {
        return Bounded {
            packet,
            json,
            cut: None,
        };
    }
    let original_bytes = json.len();
    drop(json);
    let mut packet = packet;
    let mut values_cut = vec![0u64; packet.metrics.len()];
    for (m, cut) in packet.metrics.iter_mut().zip(&mut values_cut) {
        for row in &mut m.duplicates {
            for (key, value) in row.iter_mut() {
                if key == "count" {
                    continue;
                }
                if let Value::String(s) = value {
                    if s.len() > VALUE_MAX_BYTES {
                        *s = cut_value(s);
                        *cut += 1;
                    }
                }
            }
        }
    }
    let mut rows_cut = vec![0u64; packet.metrics.len()];
    let mut json = marked(&packet, &values_cut, &rows_cut);
    if json.len() > max_bytes {
        // Each row's bytes in the JSON; a row but the last of its list is
        // followed by a comma.
        let mut sizes: Vec<Vec<usize>> = packet
            .metrics
            .iter()
            .map(|m| {
                m.duplicates
                    .iter()
                    .map(|row| serde_json::to_string(row).expect("rows serialize").len())
                    .collect()
            })
            .collect();
        let mut remaining: Vec<usize> = sizes
            .iter()
            .map(|s| s.iter().sum::<usize>() + s.len().saturating_sub(1))
            .collect();
        // The counts of rows left out grow from `0` by up to 19 digits each.
        let slack = 19 * packet.metrics.len();
        let mut freed = 0usize;
        let mut excess = json.len() - max_bytes + slack;
        loop {
            while freed < excess {
                let Some(s) = largest(&remaining) else { break };
                let row = sizes[s].pop().expect("a slice with bytes has rows");
                let comma = usize::from(!sizes[s].is_empty());
                remaining[s] -= row + comma;
                freed += row + comma;
                rows_cut[s] += 1;
            }
            for (m, (sizes, &dropped)) in packet.metrics.iter_mut().zip(sizes.iter().zip(&rows_cut))
            {
                m.duplicates.truncate(sizes.len());
                if dropped > 0 {
                    m.truncated = true;
                }
            }
            json = marked(&packet, &values_cut, &rows_cut);
            if json.len() <= max_bytes || largest(&remaining).is_none() {
                break;
            }
            // The slack covers the counts' digits; this is for safety only.
            excess = freed + (json.len() - max_bytes);
        }
    }
    let cut = Cut {
        original_bytes,
        values: values_cut.iter().sum(),
        rows: rows_cut.iter().sum(),
        over: json.len() > max_bytes,
    };
    Bounded {
        packet,
        json,
        cut: Some(cut),
    }
}

/// The index of the slice whose remaining rows take the most bytes (the
/// first on a tie); `None` when no slice has a row left.
fn largest(remaining: &[usize]) -> Option<usize> {
    let mut best: Option<usize> = None;
    for (i, &r) in remaining.iter().enumerate() {
        if r > 0 && best.is_none_or(|b| r > remaining[b]) {
            best = Some(i);
        }
    }
    best
}

/// A long value cut: its first [`VALUE_MAX_BYTES`] bytes at most (ending on
/// a character boundary), then `…[N bytes]`, N being the length of the whole
/// value in bytes (UTF-8). Values of the same first kilobyte and length read
/// the same once cut; their rows stay apart, each with its own count.
pub fn cut_value(v: &str) -> String {
    let mut end = VALUE_MAX_BYTES.min(v.len());
    while !v.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…[{} bytes]", &v[..end], v.len())
}

/// The JSON of a cut packet: the packet's own, with `"truncated": true`
/// before `metrics`, and `values_truncated` and `rows_truncated` after each
/// slice's `truncated`. Key order is that of the packet's fields (the JSON
/// map keeps insertion order), so an untouched packet and a cut one differ
/// only where they must.
fn marked(packet: &Packet, values_cut: &[u64], rows_cut: &[u64]) -> String {
    let mut v = serde_json::to_value(packet).expect("packets serialize");
    let obj = v.as_object_mut().expect("a packet is an object");
    let at = obj
        .keys()
        .position(|k| k == "metrics")
        .expect("packets have metrics");
    obj.shift_insert(at, "truncated".to_string(), Value::Bool(true));
    let metrics = obj
        .get_mut("metrics")
        .and_then(Value::as_array_mut)
        .expect("metrics is an array");
    for ((m, &values), &rows) in metrics.iter_mut().zip(values_cut).zip(rows_cut) {
        let m = m.as_object_mut().expect("a slice is an object");
        let at = m
            .keys()
            .position(|k| k == "truncated")
            .expect("slices have truncated")
            + 1;
        m.shift_insert(at, "values_truncated".to_string(), Value::from(values));
        m.shift_insert(at + 1, "rows_truncated".to_string(), Value::from(rows));
    }
    serde_json::to_string(&v).expect("packets serialize")
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
    fn a_window_id_depends_on_the_window_pane_ranges_and_settings() {
        let slices = vec![vec![Field::UserId, Field::Ip]];
        let off = Pseudonymizer::disabled();
        let id = Identity::new("g", "user-login", &slices, 10, &off).with_rules("grace=5s");
        let w = |start_ms, pane| WindowId {
            start_ms,
            end_ms: start_ms + 10_000,
            pane,
        };
        let all = [range(2, 0, 3), range(0, 4, 9), range(1, 0, 0)];
        let a = id.window_packet_id(&w(0, 0), &all);
        assert_eq!(
            a,
            id.window_packet_id(&w(0, 0), &[range(0, 4, 9), range(1, 0, 0), range(2, 0, 3)])
        );
        assert_ne!(a, id.window_packet_id(&w(10_000, 0), &all));
        assert_ne!(a, id.window_packet_id(&w(0, 1), &all));
        // Another instance's share of the same window.
        assert_ne!(a, id.window_packet_id(&w(0, 0), &all[..2]));
        // The same window cut elsewhere (a pane closed by count).
        assert_ne!(
            a,
            id.window_packet_id(&w(0, 0), &[range(2, 0, 3), range(0, 4, 8), range(1, 0, 0)])
        );
        let other = Identity::new("g", "user-login", &slices, 11, &off).with_rules("grace=5s");
        assert_ne!(a, other.window_packet_id(&w(0, 0), &all));
        let regraced = Identity::new("g", "user-login", &slices, 10, &off).with_rules("grace=6s");
        assert_ne!(a, regraced.window_packet_id(&w(0, 0), &all));
    }

    /// Duplicate rows: the values in field order, and the count.
    type Rows = Vec<(Vec<String>, u64)>;

    /// A window packet with one slice per entry of `slices`: its field
    /// names and its duplicate rows.
    fn packet_of(slices: &[(&[&str], Rows)]) -> Packet {
        Packet {
            schema_version: SCHEMA_VERSION,
            packet_id: "0123456789abcdef0123456789abcdef".into(),
            window: Window {
                start: Some(rfc3339_millis(1_700_000_000_000)),
                end: Some(rfc3339_millis(1_700_000_010_000)),
                pane: Some(0),
                ts_min: Some(rfc3339_millis(1_700_000_000_001)),
                ts_max: Some(rfc3339_millis(1_700_000_009_999)),
                closed_by: "wait".into(),
            },
            events: EventCounts {
                valid: 2,
                invalid: 0,
                invalid_by_kind: BTreeMap::new(),
                late: Some(0),
            },
            sources: vec![Source {
                topic: "user-login".into(),
                partition: 0,
                first_offset: 0,
                last_offset: 1,
            }],
            metrics: slices
                .iter()
                .map(|(fields, rows)| SliceMetrics {
                    slice: fields.iter().map(|f| f.to_string()).collect(),
                    groups: rows.len() as u64 + 1,
                    duplicate_groups: rows.len() as u64,
                    truncated: false,
                    duplicates: rows
                        .iter()
                        .map(|(values, count)| {
                            let mut row: Map<String, Value> = fields
                                .iter()
                                .zip(values)
                                .map(|(f, v)| (f.to_string(), Value::String(v.clone())))
                                .collect();
                            row.insert("count".into(), Value::from(*count));
                            row
                        })
                        .collect(),
                })
                .collect(),
            emitted_at: rfc3339_millis(1_700_000_020_000),
        }
    }

    /// The output limit with the producer's default `message.max.bytes`.
    const DEFAULT_MAX: usize =
        crate::sink::publisher::PRODUCER_MAX_DEFAULT - crate::sink::publisher::PACKET_HEADROOM;

    #[test]
    fn a_packet_that_fits_is_untouched_byte_for_byte() {
        let p = packet_of(&[
            (
                &["user_id", "ip"],
                vec![(vec!["u1".into(), "10.0.0.1".into()], 3)],
            ),
            (&["ip"], vec![(vec!["10.0.0.1".into()], 3)]),
        ]);
        let b = bounded(p.clone(), DEFAULT_MAX);
        assert_eq!(b.json, p.to_json());
        assert_eq!(b.packet, p);
        assert!(b.cut.is_none());
        // Exactly at the limit is within it.
        let exact = p.to_json().len();
        assert_eq!(bounded(p.clone(), exact).json, p.to_json());
        assert!(bounded(p, exact - 1).cut.is_some());
    }

    #[test]
    fn two_600_kb_values_are_cut_under_the_limit_and_the_packet_says_so() {
        let big = "u".repeat(600_000);
        let p = packet_of(&[
            (&["ip"], vec![(vec!["10.0.0.1".into()], 2)]),
            (
                &["user_id", "ip"],
                vec![(vec![big.clone(), "10.0.0.1".into()], 2)],
            ),
            (
                &["user_id", "device_id"],
                vec![(vec![big.clone(), "593-47-5928".into()], 2)],
            ),
        ]);
        assert!(p.to_json().len() > 1_200_000);
        let b = bounded(p.clone(), DEFAULT_MAX);
        assert!(b.json.len() <= DEFAULT_MAX, "{} bytes", b.json.len());
        assert!(b.json.len() < 4_000, "only the long values were cut");
        let cut = b.cut.clone().expect("cut");
        assert_eq!((cut.values, cut.rows, cut.over), (2, 0, false));
        assert_eq!(cut.original_bytes, p.to_json().len());

        let v: Value = serde_json::from_str(&b.json).unwrap();
        assert_eq!(v["truncated"], true);
        let expected = format!("{}…[600000 bytes]", "u".repeat(VALUE_MAX_BYTES));
        for (i, values_cut) in [(0, 0), (1, 1), (2, 1)] {
            let m = &v["metrics"][i];
            assert_eq!(m["values_truncated"], values_cut, "slice {i}");
            assert_eq!(m["rows_truncated"], 0, "slice {i}");
            assert_eq!(m["truncated"], false, "no row was left out of slice {i}");
            assert_eq!(m["duplicates"][0]["count"], 2);
        }
        assert_eq!(
            v["metrics"][1]["duplicates"][0]["user_id"],
            expected.as_str()
        );
        assert_eq!(v["metrics"][1]["duplicates"][0]["ip"], "10.0.0.1");
        assert_eq!(
            v["metrics"][2]["duplicates"][0]["user_id"],
            expected.as_str()
        );
        // The fields that say so sit where a reader of the text finds them.
        let keys: Vec<&str> = v.as_object().unwrap().keys().map(|k| k.as_str()).collect();
        assert_eq!(
            keys,
            [
                "schema_version",
                "packet_id",
                "window",
                "events",
                "sources",
                "truncated",
                "metrics",
                "emitted_at"
            ]
        );
        let slice_keys: Vec<&str> = v["metrics"][1]
            .as_object()
            .unwrap()
            .keys()
            .map(|k| k.as_str())
            .collect();
        assert_eq!(
            slice_keys,
            [
                "slice",
                "groups",
                "duplicate_groups",
                "truncated",
                "values_truncated",
                "rows_truncated",
                "duplicates"
            ]
        );
        // Readers of this version read it as the packet returned.
        assert_eq!(serde_json::from_str::<Packet>(&b.json).unwrap(), b.packet);
        // The same packet and limit give the same bytes.
        assert_eq!(bounded(p, DEFAULT_MAX).json, b.json);
    }

    #[test]
    fn rows_are_left_out_from_the_end_of_the_largest_slice_until_it_fits() {
        let rows = |n: usize, width: usize| -> Rows {
            (0..n)
                .map(|i| (vec![format!("{i:0width$}")], 100 - i as u64))
                .collect()
        };
        let p = packet_of(&[
            (&["ip"], rows(20, 500)),
            (&["device_id"], rows(100, 900)),
            (&["locale"], rows(3, 2)),
        ]);
        let max = 15_000;
        let b = bounded(p.clone(), max);
        assert!(b.json.len() <= max, "{} bytes", b.json.len());
        let v: Value = serde_json::from_str(&b.json).unwrap();
        assert_eq!(v["truncated"], true);
        let kept: Vec<usize> = b
            .packet
            .metrics
            .iter()
            .map(|m| m.duplicates.len())
            .collect();
        for (i, m) in b.packet.metrics.iter().enumerate() {
            let original = &p.metrics[i].duplicates;
            assert_eq!(
                &m.duplicates[..],
                &original[..m.duplicates.len()],
                "slice {i} keeps the head of its list"
            );
            let left_out = (original.len() - m.duplicates.len()) as u64;
            assert_eq!(v["metrics"][i]["rows_truncated"], left_out, "slice {i}");
            assert_eq!(v["metrics"][i]["values_truncated"], 0, "slice {i}");
            assert_eq!(m.truncated, left_out > 0, "slice {i}");
            assert_eq!(v["metrics"][i]["truncated"], left_out > 0, "slice {i}");
        }
        // The widest rows went first; the small slice keeps every row, and
        // the two large ones end up with about as many bytes each.
        let row_bytes: Vec<usize> = p
            .metrics
            .iter()
            .map(|m| serde_json::to_string(&m.duplicates[0]).unwrap().len() + 1)
            .collect();
        assert_eq!(kept[2], 3);
        assert!(kept[0] < 20 && kept[1] < 100, "{kept:?}");
        let bytes = |i: usize| kept[i] * row_bytes[i];
        assert!(
            bytes(0).abs_diff(bytes(1)) <= row_bytes[1],
            "{kept:?} of {row_bytes:?}"
        );
        // No more was left out than needed: within two rows of the limit.
        assert!(
            b.json.len() + 2 * row_bytes[1] > max,
            "{} bytes",
            b.json.len()
        );
        assert_eq!(bounded(p, max).json, b.json, "deterministic");
    }

    #[test]
    fn a_value_is_cut_on_a_character_boundary() {
        let v = "é".repeat(VALUE_MAX_BYTES);
        let cut = cut_value(&v);
        let head = "é".repeat(VALUE_MAX_BYTES / 2);
        assert_eq!(cut, format!("{head}…[{} bytes]", 2 * VALUE_MAX_BYTES));
        let odd = format!("a{v}");
        assert_eq!(
            cut_value(&odd),
            format!(
                "a{}…[{} bytes]",
                "é".repeat(VALUE_MAX_BYTES / 2 - 1),
                odd.len()
            )
        );
    }

    #[test]
    fn timestamps_are_rfc3339_utc() {
        assert_eq!(
            rfc3339_millis(1_694_479_551_250),
            "2023-09-12T00:45:51.250Z"
        );
    }
}
