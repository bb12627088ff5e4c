//! The units that cross stages, below all of them: what the source hands to
//! grouping ([`Coord`]), what grouping hands to delivery ([`Work`] of
//! [`Batch`]es and [`InvalidMessage`]s), what delivery reports back ([`Ack`])
//! and what the commit path stores ([`CommitPoint`], [`Checkpoint`]).
//!
//! Plain data: no Kafka, tokio or HTTP type, so the pure core and every
//! stage can name them without depending on each other.

use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;

use crate::core::event::{ErrorKind, Field, LoginEvent, FIELD_COUNT};

/// Why a batch closed. The names appear in packets as `window.closed_by`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CloseReason {
    Count,
    Span,
    Wait,
    Shutdown,
    Rebalance,
    /// Window mode: every partition's progress passed the window's end.
    Watermark,
    /// A bounded run read its whole range: nothing more can arrive for the
    /// windows (or batch) still open.
    End,
}

impl CloseReason {
    pub const ALL: [CloseReason; 7] = [
        CloseReason::Count,
        CloseReason::Span,
        CloseReason::Wait,
        CloseReason::Shutdown,
        CloseReason::Rebalance,
        CloseReason::Watermark,
        CloseReason::End,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            CloseReason::Count => "count",
            CloseReason::Span => "span",
            CloseReason::Wait => "wait",
            CloseReason::Shutdown => "shutdown",
            CloseReason::Rebalance => "rebalance",
            CloseReason::Watermark => "watermark",
            CloseReason::End => "end",
        }
    }

    /// The reason named by [`CloseReason::as_str`].
    pub fn parse(s: &str) -> Option<CloseReason> {
        CloseReason::ALL.into_iter().find(|r| r.as_str() == s)
    }
}

/// A message as the source hands it to grouping: where it came from and
/// its bytes (an empty payload for a message without one).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Message<'a> {
    pub topic: &'a str,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<&'a [u8]>,
    pub payload: &'a [u8],
    /// The record's timestamp, when it has one.
    pub timestamp_ms: Option<i64>,
}

impl<'a> Message<'a> {
    pub fn coord(&self) -> Coord<'a> {
        Coord {
            topic: self.topic,
            partition: self.partition,
            offset: self.offset,
        }
    }
}

/// Where a message came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Coord<'a> {
    pub topic: &'a str,
    pub partition: i32,
    pub offset: i64,
}

/// The contiguous offset range a batch read from one partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceRange {
    pub topic: Arc<str>,
    pub partition: i32,
    pub first_offset: i64,
    pub last_offset: i64,
}

/// A message that is not a valid event, kept for the dead-letter topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidMessage {
    pub topic: Arc<str>,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub payload: Vec<u8>,
    pub kind: ErrorKind,
    pub reason: String,
}

/// One string column, stored as a single buffer plus spans: no allocation per value.
#[derive(Debug, Clone, Default)]
pub struct StrColumn {
    buf: String,
    spans: Vec<Option<(u32, u32)>>,
}

impl StrColumn {
    pub(crate) fn push(&mut self, value: Option<&str>) {
        self.spans.push(value.map(|v| {
            let start = self.buf.len() as u32;
            self.buf.push_str(v);
            (start, v.len() as u32)
        }));
    }

    pub fn len(&self) -> usize {
        self.spans.len()
    }

    pub fn is_empty(&self) -> bool {
        self.spans.is_empty()
    }

    pub fn get(&self, i: usize) -> Option<&str> {
        self.spans[i].map(|(s, l)| &self.buf[s as usize..(s + l) as usize])
    }

    pub fn iter(&self) -> impl ExactSizeIterator<Item = Option<&str>> + '_ {
        self.spans
            .iter()
            .map(|span| span.map(|(s, l)| &self.buf[s as usize..(s + l) as usize]))
    }

    pub(crate) fn clear(&mut self) {
        self.buf.clear();
        self.spans.clear();
    }

    /// Appends `other`'s values after this column's.
    pub fn append(&mut self, other: &StrColumn) {
        let base = self.buf.len() as u32;
        self.buf.push_str(&other.buf);
        self.spans.extend(
            other
                .spans
                .iter()
                .map(|s| s.map(|(start, len)| (base + start, len))),
        );
    }
}

/// The valid events of a batch, column by column.
#[derive(Debug, Clone, Default)]
pub struct Columns {
    pub strings: [StrColumn; FIELD_COUNT],
    pub timestamps_ms: Vec<Option<i64>>,
}

impl Columns {
    pub fn push(&mut self, event: &LoginEvent<'_>) {
        for (col, value) in self.strings.iter_mut().zip(&event.fields) {
            col.push(value.as_deref());
        }
        self.timestamps_ms.push(event.timestamp_ms);
    }

    pub fn len(&self) -> usize {
        self.timestamps_ms.len()
    }

    pub fn is_empty(&self) -> bool {
        self.timestamps_ms.is_empty()
    }

    pub fn column(&self, field: Field) -> &StrColumn {
        &self.strings[field.index()]
    }

    /// `n` events whose every value is null and whose time is unknown: the
    /// frame a reader fills column by column.
    pub fn with_len(n: usize) -> Columns {
        let mut c = Columns::default();
        for col in c.strings.iter_mut() {
            col.spans = vec![None; n];
        }
        c.timestamps_ms = vec![None; n];
        c
    }

    /// The events at `rows`, as columns of their own.
    pub fn rows(&self, rows: std::ops::Range<usize>) -> Columns {
        let mut c = Columns::default();
        for (to, from) in c.strings.iter_mut().zip(&self.strings) {
            for i in rows.clone() {
                to.push(from.get(i));
            }
        }
        c.timestamps_ms = self.timestamps_ms[rows].to_vec();
        c
    }

    /// Appends `other`'s events after this batch's.
    pub fn append(&mut self, other: &Columns) {
        for (a, b) in self.strings.iter_mut().zip(&other.strings) {
            a.append(b);
        }
        self.timestamps_ms.extend_from_slice(&other.timestamps_ms);
    }

    /// Builds columns from events (tests, benches).
    pub fn from_events<'a>(events: impl IntoIterator<Item = &'a LoginEvent<'a>>) -> Columns {
        let mut c = Columns::default();
        for e in events {
            c.push(e);
        }
        c
    }
}

/// An event-time window `[start_ms, end_ms)` and the pane of it a packet reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct WindowId {
    pub start_ms: i64,
    pub end_ms: i64,
    /// 0, 1, ... when the window was split by `batch.max_events`.
    pub pane: u32,
}

/// The valid events of one packet: an arrival batch, or a window's pane.
#[derive(Debug, Clone)]
pub struct Batch {
    /// Position in this process's sequence of batches, from 0.
    pub seq: u64,
    pub columns: Columns,
    pub ts_min_ms: Option<i64>,
    pub ts_max_ms: Option<i64>,
    /// Ordered by topic, then partition.
    pub sources: Vec<SourceRange>,
    /// Arrival mode: the batch's invalid messages (its dead letters).
    pub invalid: Vec<InvalidMessage>,
    /// Invalid messages counted in the packet, by [`ErrorKind`] index.
    pub invalid_by_kind: [u64; ErrorKind::ALL.len()],
    /// Window mode: late events among the window's offsets.
    pub late: Option<u64>,
    /// Window mode: the window this batch reports.
    pub window: Option<WindowId>,
    pub closed_by: CloseReason,
    /// When the batch's first message arrived.
    pub opened_at: Instant,
}

/// An offset to commit once the work that carries it is delivered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommitPoint {
    pub topic: Arc<str>,
    pub partition: i32,
    /// The next offset to read.
    pub offset: i64,
    /// Window mode: the partition's checkpoint, stored before the commit.
    pub checkpoint: Option<Checkpoint>,
}

/// What the consumer side hands to delivery, in order: packets to build, dead
/// letters to send, and the offsets to commit when all of it is delivered.
#[derive(Debug, Clone)]
pub struct Work {
    pub seq: u64,
    pub batches: Vec<Batch>,
    pub dead_letters: Vec<InvalidMessage>,
    pub commit: Vec<CommitPoint>,
    /// Input messages the commit moves past.
    pub messages: u64,
    /// Window mode: checkpoints to store before the work is handed to
    /// delivery (offsets unchanged, closures decided by wall clock added),
    /// so that no packet of such a closure is published before a replay
    /// would decide it the same way.
    pub record_first: Vec<CommitPoint>,
    /// The consumer's assignment the work was read under, counted from 0
    /// and raised at each revocation: exactly once, a transaction never
    /// holds work of two assignments, so work given up at a revocation is
    /// aborted alone.
    pub assignment: u64,
}

impl Work {
    /// An arrival batch: one packet, its invalid messages as dead letters, and
    /// its last offset + 1 per partition to commit.
    pub fn from_arrival(mut batch: Batch) -> Work {
        let commit = batch
            .sources
            .iter()
            .map(|s| CommitPoint {
                topic: s.topic.clone(),
                partition: s.partition,
                offset: s.last_offset + 1,
                checkpoint: None,
            })
            .collect();
        let messages = batch.messages() as u64;
        let dead_letters = std::mem::take(&mut batch.invalid);
        Work {
            seq: batch.seq,
            batches: vec![batch],
            dead_letters,
            commit,
            messages,
            record_first: Vec::new(),
            assignment: 0,
        }
    }
}

impl Batch {
    pub fn valid(&self) -> usize {
        self.columns.len()
    }

    /// Messages covered by the batch, valid and invalid.
    pub fn messages(&self) -> usize {
        self.columns.len() + self.invalid.len()
    }
}

/// A partition's position: the offset to read next and the state needed to
/// judge the messages from there on as the original run did.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Checkpoint {
    pub offset: i64,
    /// The partition's progress before `offset`.
    pub progress_ms: Option<i64>,
    /// Windows ending at or before this are closed for this partition's
    /// messages from `offset` on: an event of such a window that is not late
    /// for the partition's own progress is late because its window closed.
    pub closed_ms: Option<i64>,
    /// Windows ending at or before this were emitted with every event of this
    /// partition read before their closure: re-read, those events are replayed.
    pub emitted_ms: Option<i64>,
    /// Closures decided after `offset` (by wall clock: the input silent, a
    /// partition idle), at the positions where they were decided, so that a
    /// replay decides them again at the same place.
    pub closures: Vec<Closure>,
    /// The offset the group had committed when this checkpoint was written:
    /// a committed offset below it was set by someone else (an operator's
    /// reset), and is honoured.
    pub previous: Option<i64>,
    /// The dead letters of the invalid and late messages below this offset
    /// were handed out with the work this checkpoint commits: a replay
    /// counts those messages again but does not send them again.
    pub dead_letters_through: Option<i64>,
    /// Windows open when the checkpoint was taken whose panes (split by
    /// `batch.max_events`) went out with the work it commits: a replay
    /// leaves the events in them out and numbers the next pane after them.
    pub panes: Vec<PaneMark>,
}

/// A window that had emitted panes: the next pane's number, and the last
/// offset of the partition's events in the panes emitted (none: the
/// partition had no event in them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PaneMark {
    pub start_ms: i64,
    pub next_pane: u32,
    pub through: Option<i64>,
}

/// Windows ending at or before `through_ms` closed once the partition had
/// read every message below `offset`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Closure {
    pub offset: i64,
    pub through_ms: i64,
    pub reason: CloseReason,
}

/// Merges `later` into `into`: a later point for the same partition replaces
/// the earlier one (it is further on, and its checkpoint is newer).
pub fn merge_points(into: &mut Vec<CommitPoint>, later: Vec<CommitPoint>) {
    for p in later {
        match into
            .iter_mut()
            .find(|q| q.partition == p.partition && q.topic == p.topic)
        {
            Some(q) => *q = p,
            None => into.push(p),
        }
    }
}

/// What delivery reports back, in order: at least once, one per work;
/// exactly once, one per transaction, which holds one or more works.
#[derive(Debug)]
pub enum Ack {
    /// At least once: packets and dead letters acknowledged, packets in the
    /// metrics log. Exactly once: packets and dead letters sent in the open
    /// transaction and acknowledged; the commit path adds the checkpoints
    /// and offsets, commits it and answers with an [`Outcome`].
    Delivered {
        commit: Vec<CommitPoint>,
        messages: u64,
        /// How many works this acknowledges.
        works: usize,
        /// Exactly once: where each packet of the transaction went, for the
        /// record of what the metrics log must hold ([`Logged`]).
        logged: Vec<Logged>,
    },
    /// The work could not be delivered; nothing more may be committed.
    Failed(String),
}

impl Ack {
    /// The acknowledgement of one work delivered at least once.
    pub fn delivered(commit: Vec<CommitPoint>, messages: u64) -> Ack {
        Ack::Delivered {
            commit,
            messages,
            works: 1,
            logged: Vec::new(),
        }
    }
}

/// A packet in the output topic: its id and position.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Logged {
    pub packet_id: String,
    pub partition: i32,
    pub offset: i64,
}

/// What became of a transaction delivery acknowledged (exactly once).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Committed with its offsets: its packets are visible; append them to
    /// the metrics log and count them.
    Committed,
    /// Aborted for a reason that may pass (the broker, a timeout): nothing
    /// of it is visible; send it again in a new transaction.
    Aborted(String),
    /// Aborted because its partitions were revoked: nothing of it is
    /// visible, and whoever owns them now redoes it. Drop it.
    Abandoned,
    /// The commit path stopped; nothing more will be committed.
    Stopped(String),
}
