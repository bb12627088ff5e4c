//! Arrival batching (`batch.mode = "arrival"`).
//!
//! An arrival batch is whatever arrived together. It closes
//! - **count**: when it holds `max_events` valid events, or as many invalid
//!   messages, or [`MAX_HELD_INVALID_BYTES`] of them (a flood of garbage must
//!   not grow memory without bound);
//! - **span**: when the next event would make its event-time span (largest
//!   minus smallest timestamp) exceed `max_span`; that event starts the next batch;
//! - **wait**: when `max_wait` of wall-clock time has passed since its first
//!   message, valid or not;
//! - **shutdown** / **rebalance**: when the shell says so.
//!
//! An empty batch is never emitted. Invalid messages belong to the batch in
//! whose offset range they arrived; a batch of invalid messages only is still
//! emitted, because its offsets must be committed and its dead letters sent.
//!
//! The batcher is synchronous and takes the current `Instant` as an argument,
//! so tests drive time by hand.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::core::event::{ErrorKind, LoginEvent};
use crate::work::{Batch, CloseReason, Columns, Coord, InvalidMessage, SourceRange};

/// The bytes of invalid messages one batch (or window mode, between two
/// hand-overs) holds before they are handed to delivery.
pub const MAX_HELD_INVALID_BYTES: usize = 64 << 20;

/// The closing thresholds.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_events: usize,
    pub max_span: Duration,
    pub max_wait: Duration,
}

struct Open {
    columns: Columns,
    ts_min_ms: Option<i64>,
    ts_max_ms: Option<i64>,
    /// One entry per partition read; few, so a linear search beats a map.
    sources: Vec<SourceRange>,
    invalid: Vec<InvalidMessage>,
    invalid_bytes: usize,
    opened_at: Instant,
}

/// Accumulates messages into batches according to [`Limits`].
pub struct Batcher {
    limits: Limits,
    max_span_ms: i64,
    open: Option<Open>,
    next_seq: u64,
    /// Interned topic names, so a source range does not allocate per message.
    topics: Vec<Arc<str>>,
}

impl Batcher {
    pub fn new(limits: Limits) -> Batcher {
        Batcher {
            limits,
            max_span_ms: limits.max_span.as_millis().min(i64::MAX as u128) as i64,
            open: None,
            next_seq: 0,
            topics: Vec::new(),
        }
    }

    /// The instant at which the open batch closes by wait, if one is open.
    pub fn deadline(&self) -> Option<Instant> {
        self.open
            .as_ref()
            .map(|o| o.opened_at + self.limits.max_wait)
    }

    /// Adds a valid event; batches it closes are appended to `closed`.
    pub fn push_event(
        &mut self,
        coord: Coord<'_>,
        event: &LoginEvent<'_>,
        now: Instant,
        closed: &mut Vec<Batch>,
    ) {
        closed.extend(self.poll_expired(now));
        if let (Some(ts), Some(open)) = (event.timestamp_ms, &self.open) {
            let lo = open.ts_min_ms.map_or(ts, |m| m.min(ts));
            let hi = open.ts_max_ms.map_or(ts, |m| m.max(ts));
            if hi - lo > self.max_span_ms && !open.columns.is_empty() {
                closed.extend(self.close(CloseReason::Span));
            }
        }
        self.open_at(now);
        self.track(coord);
        let open = self.open.as_mut().expect("opened above");
        open.columns.push(event);
        if let Some(ts) = event.timestamp_ms {
            open.ts_min_ms = Some(open.ts_min_ms.map_or(ts, |m| m.min(ts)));
            open.ts_max_ms = Some(open.ts_max_ms.map_or(ts, |m| m.max(ts)));
        }
        if open.columns.len() >= self.limits.max_events {
            closed.extend(self.close(CloseReason::Count));
        }
    }

    /// Adds an invalid message; a wait deadline that passed closes the open batch first.
    pub fn push_invalid(
        &mut self,
        coord: Coord<'_>,
        key: Option<&[u8]>,
        payload: &[u8],
        error: crate::core::event::InvalidEvent,
        now: Instant,
        closed: &mut Vec<Batch>,
    ) {
        closed.extend(self.poll_expired(now));
        self.open_at(now);
        let i = self.track(coord);
        let open = self.open.as_mut().expect("opened above");
        let topic = open.sources[i].topic.clone();
        open.invalid.push(InvalidMessage {
            topic,
            partition: coord.partition,
            offset: coord.offset,
            key: key.map(<[u8]>::to_vec),
            payload: payload.to_vec(),
            kind: error.kind,
            reason: error.reason,
        });
        open.invalid_bytes += payload.len() + key.map_or(0, <[u8]>::len);
        if open.invalid.len() >= self.limits.max_events
            || open.invalid_bytes >= MAX_HELD_INVALID_BYTES
        {
            closed.extend(self.close(CloseReason::Count));
        }
    }

    /// Closes the open batch if its wait deadline has passed.
    pub fn poll_expired(&mut self, now: Instant) -> Option<Batch> {
        match self.deadline() {
            Some(d) if now >= d => self.close(CloseReason::Wait),
            _ => None,
        }
    }

    /// Closes the open batch, if any, for the given reason.
    pub fn close(&mut self, reason: CloseReason) -> Option<Batch> {
        let mut open = self.open.take()?;
        let seq = self.next_seq;
        self.next_seq += 1;
        open.sources
            .sort_by(|a, b| (&a.topic, a.partition).cmp(&(&b.topic, b.partition)));
        let mut invalid_by_kind = [0; ErrorKind::ALL.len()];
        for m in &open.invalid {
            invalid_by_kind[m.kind as usize] += 1;
        }
        Some(Batch {
            seq,
            columns: open.columns,
            ts_min_ms: open.ts_min_ms,
            ts_max_ms: open.ts_max_ms,
            sources: open.sources,
            invalid: open.invalid,
            invalid_by_kind,
            late: None,
            window: None,
            closed_by: reason,
            opened_at: open.opened_at,
        })
    }

    fn open_at(&mut self, now: Instant) -> &mut Open {
        self.open.get_or_insert_with(|| Open {
            columns: Columns::default(),
            ts_min_ms: None,
            ts_max_ms: None,
            sources: Vec::new(),
            invalid: Vec::new(),
            invalid_bytes: 0,
            opened_at: now,
        })
    }

    /// Extends the open batch's range for the message's partition; returns
    /// the range's index in the open batch's sources.
    fn track(&mut self, c: Coord<'_>) -> usize {
        let open = self.open.as_mut().expect("a batch is open");
        if let Some(i) = open
            .sources
            .iter()
            .position(|r| r.partition == c.partition && *r.topic == *c.topic)
        {
            let r = &mut open.sources[i];
            r.first_offset = r.first_offset.min(c.offset);
            r.last_offset = r.last_offset.max(c.offset);
            return i;
        }
        let topic = match self.topics.iter().find(|t| ***t == *c.topic) {
            Some(t) => t.clone(),
            None => {
                let t: Arc<str> = Arc::from(c.topic);
                self.topics.push(t.clone());
                t
            }
        };
        open.sources.push(SourceRange {
            topic,
            partition: c.partition,
            first_offset: c.offset,
            last_offset: c.offset,
        });
        open.sources.len() - 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::event::{Field, InvalidEvent, FIELD_COUNT};
    use std::borrow::Cow;

    fn limits(max_events: usize, span_s: u64, wait_s: u64) -> Limits {
        Limits {
            max_events,
            max_span: Duration::from_secs(span_s),
            max_wait: Duration::from_secs(wait_s),
        }
    }

    fn ev(user: &str, ts_s: i64) -> LoginEvent<'_> {
        let mut fields: [Option<Cow<str>>; FIELD_COUNT] = Default::default();
        fields[Field::UserId.index()] = Some(Cow::Borrowed(user));
        LoginEvent {
            fields,
            timestamp_ms: Some(ts_s * 1000),
        }
    }

    fn at(offset: i64) -> Coord<'static> {
        Coord {
            topic: "user-login",
            partition: 0,
            offset,
        }
    }

    #[test]
    fn count_closes_at_exactly_max_events() {
        let t0 = Instant::now();
        let mut b = Batcher::new(limits(3, 100, 100));
        let mut out = Vec::new();
        for i in 0..7 {
            b.push_event(at(i), &ev("u", 1000), t0, &mut out);
        }
        assert_eq!(out.len(), 2);
        assert!(out
            .iter()
            .all(|b| b.valid() == 3 && b.closed_by == CloseReason::Count));
        assert_eq!(out[0].sources[0].first_offset, 0);
        assert_eq!(out[0].sources[0].last_offset, 2);
        assert_eq!(out[1].sources[0].first_offset, 3);
        assert_eq!((out[0].seq, out[1].seq), (0, 1));
        let rest = b.close(CloseReason::Shutdown).unwrap();
        assert_eq!(rest.valid(), 1);
        assert_eq!(rest.closed_by, CloseReason::Shutdown);
        assert!(b.close(CloseReason::Shutdown).is_none(), "no empty batch");
    }

    #[test]
    fn span_closes_before_the_event_that_would_exceed_it() {
        let t0 = Instant::now();
        let mut b = Batcher::new(limits(100, 10, 100));
        let mut out = Vec::new();
        b.push_event(at(0), &ev("a", 1000), t0, &mut out);
        b.push_event(at(1), &ev("b", 1010), t0, &mut out); // span 10s: allowed
        b.push_event(at(2), &ev("c", 1005), t0, &mut out); // inside
        assert!(out.is_empty());
        b.push_event(at(3), &ev("d", 999), t0, &mut out); // span would be 11s
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].closed_by, CloseReason::Span);
        assert_eq!(out[0].valid(), 3);
        assert_eq!(out[0].ts_min_ms, Some(1_000_000));
        assert_eq!(out[0].ts_max_ms, Some(1_010_000));
        let next = b.close(CloseReason::Shutdown).unwrap();
        assert_eq!(
            next.sources[0].first_offset, 3,
            "the event starts the next batch"
        );
        assert_eq!(next.ts_min_ms, Some(999_000));
    }

    #[test]
    fn wait_closes_after_max_wait_since_the_first_message() {
        let t0 = Instant::now();
        let mut b = Batcher::new(limits(100, 100, 10));
        let mut out = Vec::new();
        assert_eq!(b.deadline(), None);
        b.push_event(at(0), &ev("a", 1), t0, &mut out);
        b.push_event(at(1), &ev("a", 1), t0 + Duration::from_secs(9), &mut out);
        assert_eq!(b.deadline(), Some(t0 + Duration::from_secs(10)));
        assert!(b.poll_expired(t0 + Duration::from_millis(9999)).is_none());
        let closed = b.poll_expired(t0 + Duration::from_secs(10)).unwrap();
        assert_eq!(closed.closed_by, CloseReason::Wait);
        assert_eq!(closed.valid(), 2);
        assert!(b.poll_expired(t0 + Duration::from_secs(100)).is_none());
    }

    #[test]
    fn a_late_message_closes_the_expired_batch_and_starts_the_next() {
        let t0 = Instant::now();
        let mut b = Batcher::new(limits(100, 100, 10));
        let mut out = Vec::new();
        b.push_event(at(0), &ev("a", 1), t0, &mut out);
        b.push_event(at(1), &ev("a", 1), t0 + Duration::from_secs(11), &mut out);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].closed_by, CloseReason::Wait);
        assert_eq!(out[0].valid(), 1);
        assert_eq!(b.deadline(), Some(t0 + Duration::from_secs(21)));
    }

    #[test]
    fn invalid_messages_join_the_open_batch_and_its_ranges() {
        let t0 = Instant::now();
        let mut b = Batcher::new(limits(3, 100, 100));
        let mut out = Vec::new();
        let bad = || InvalidEvent {
            kind: ErrorKind::NotJson,
            reason: "x".into(),
        };
        b.push_invalid(at(0), None, b"??", bad(), t0, &mut out);
        b.push_event(at(1), &ev("a", 1), t0, &mut out);
        b.push_invalid(at(2), Some(b"k"), b"!!", bad(), t0, &mut out);
        b.push_event(at(3), &ev("a", 1), t0, &mut out);
        b.push_event(at(4), &ev("a", 1), t0, &mut out);
        assert_eq!(out.len(), 1);
        let batch = &out[0];
        assert_eq!(
            (batch.valid(), batch.invalid.len(), batch.messages()),
            (3, 2, 5)
        );
        assert_eq!(batch.sources[0].first_offset, 0);
        assert_eq!(batch.sources[0].last_offset, 4);
        assert_eq!(batch.invalid[1].key.as_deref(), Some(&b"k"[..]));
        // A batch of invalid messages alone is still emitted: its offsets need committing.
        b.push_invalid(at(5), None, b"??", bad(), t0, &mut out);
        let only_invalid = b.close(CloseReason::Shutdown).unwrap();
        assert_eq!((only_invalid.valid(), only_invalid.invalid.len()), (0, 1));
    }

    #[test]
    fn a_flood_of_invalid_messages_closes_the_batch_by_count_and_by_bytes() {
        let t0 = Instant::now();
        let bad = || InvalidEvent {
            kind: ErrorKind::NotJson,
            reason: "x".into(),
        };
        let mut b = Batcher::new(limits(3, 100, 100));
        let mut out = Vec::new();
        for i in 0..7 {
            b.push_invalid(at(i), None, b"??", bad(), t0, &mut out);
        }
        let sizes: Vec<_> = out.iter().map(|b| b.invalid.len()).collect();
        assert_eq!(sizes, vec![3, 3]);
        assert!(out.iter().all(|b| b.closed_by == CloseReason::Count));

        let mut b = Batcher::new(limits(1_000_000, 100, 100));
        let mut out = Vec::new();
        let big = vec![b'#'; MAX_HELD_INVALID_BYTES / 4];
        for i in 0..9 {
            b.push_invalid(at(i), None, &big, bad(), t0, &mut out);
        }
        let sizes: Vec<_> = out.iter().map(|b| b.invalid.len()).collect();
        assert_eq!(sizes, vec![4, 4]);
    }

    #[test]
    fn ranges_are_kept_per_partition() {
        let t0 = Instant::now();
        let mut b = Batcher::new(limits(100, 100, 100));
        let mut out = Vec::new();
        for (p, o) in [(2, 10), (0, 5), (2, 11), (0, 6), (1, 0)] {
            let c = Coord {
                topic: "user-login",
                partition: p,
                offset: o,
            };
            b.push_event(c, &ev("a", 1), t0, &mut out);
        }
        let batch = b.close(CloseReason::Rebalance).unwrap();
        let ranges: Vec<_> = batch
            .sources
            .iter()
            .map(|s| (s.partition, s.first_offset, s.last_offset))
            .collect();
        assert_eq!(ranges, vec![(0, 5, 6), (1, 0, 0), (2, 10, 11)]);
    }
}
