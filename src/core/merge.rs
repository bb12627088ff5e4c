//! One window's answer from its parts: the merge of the shares that each
//! input partition sends of it, for a group whose instances split the
//! partitions (`docs/scaling.md`).
//!
//! The rules, written once:
//!
//! - **A share is a function of one partition's input.** It is what one
//!   input partition holds of one pane of one window: its valid events that
//!   were on time for that partition (only the fields the slices use), the
//!   offset range they span, the invalid and late messages counted with
//!   them, and why the partition closed it. Lateness and closures are judged
//!   per partition ([`crate::core::grouping::window`]), so whoever reads the
//!   partition, and after whatever restart, sends the same share.
//! - **Panes are chunks of each partition, in offset order.** A partition
//!   cuts its events of a window into chunks of `max_events`; pane `k` of the
//!   window is chunk `k` of every partition that has one. Arrival order
//!   across partitions, and so the number of instances and the assignment,
//!   decides nothing.
//! - **Progress follows the shares it covers.** A [`Progress`] record says
//!   that a partition has sent every share of the windows ending at or before
//!   `closed_ms`. Its sender writes it after those shares, to the same
//!   internal partition, with the same idempotent producer, so a reader that
//!   has it has read them.
//! - **A pane is merged once it is complete:** every input partition has
//!   sent its share of that pane or closed the window. Earlier panes of the
//!   window go first. The merged batch carries every share's offset range,
//!   so its `packet_id` ([`crate::core::packet::Identity::window_packet_id`])
//!   is the one a single instance reading all partitions gives.
//! - **A large share travels in parts.** A share is split by rows into parts
//!   small enough for one Kafka record each ([`Share::split`]); a share
//!   counts as sent once all its parts are held.
//! - **A share comes at least once.** A partition that moves or restarts
//!   sends again what its last commit did not cover; a share of a pane the
//!   merger holds or has merged is dropped as a duplicate, and one of a
//!   window that every partition has closed as a replay: such a window was
//!   merged the moment the last partition closed it.
//!
//! The merger is synchronous and knows nothing of Kafka: the shell hands it
//! decoded records with their positions in the internal topic, and takes
//! merged batches, the lowest position still needed (what it may commit),
//! and a [`MergeState`] to store with the commit.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use crate::core::event::{ErrorKind, Field, FIELD_COUNT};
use crate::work::{Batch, CloseReason, Columns, SourceRange, WindowId, Work};

/// One input partition's part of one pane of one window.
#[derive(Debug, Clone)]
pub struct Share {
    pub window: WindowId,
    /// Which part of the share this is, and of how many (0 of 1: whole).
    pub part: u32,
    pub parts: u32,
    pub source: SourceRange,
    pub ts_min_ms: Option<i64>,
    pub ts_max_ms: Option<i64>,
    /// Invalid messages counted with this share, by [`ErrorKind`] index.
    pub invalid_by_kind: [u64; ErrorKind::ALL.len()],
    /// Late events among the share's offsets.
    pub late: u64,
    /// [`CloseReason::Count`] for a chunk cut at `max_events`; otherwise why
    /// the partition closed the window.
    pub closed_by: CloseReason,
    pub columns: Columns,
}

impl Share {
    /// The share that a batch of one partition's windows is
    /// ([`crate::core::grouping::split`]); `None` for a batch of no window
    /// or of several partitions, which no share can be.
    pub fn from_batch(batch: Batch) -> Option<Share> {
        let window = batch.window?;
        let [source] = <[SourceRange; 1]>::try_from(batch.sources).ok()?;
        Some(Share {
            window,
            part: 0,
            parts: 1,
            source,
            ts_min_ms: batch.ts_min_ms,
            ts_max_ms: batch.ts_max_ms,
            invalid_by_kind: batch.invalid_by_kind,
            late: batch.late.unwrap_or(0),
            closed_by: batch.closed_by,
            columns: batch.columns,
        })
    }

    pub fn partition(&self) -> i32 {
        self.source.partition
    }

    /// The share in `n` parts of consecutive rows (at least one row each),
    /// each carrying the share's header.
    pub fn split(self, n: usize) -> Vec<Share> {
        let rows = self.columns.len();
        let n = n.clamp(1, rows.max(1));
        if n == 1 {
            return vec![self];
        }
        let per = rows.div_ceil(n);
        let parts = rows.div_ceil(per);
        (0..parts)
            .map(|i| Share {
                window: self.window,
                part: i as u32,
                parts: parts as u32,
                source: self.source.clone(),
                ts_min_ms: self.ts_min_ms,
                ts_max_ms: self.ts_max_ms,
                invalid_by_kind: self.invalid_by_kind,
                late: self.late,
                closed_by: self.closed_by,
                columns: self.columns.rows(i * per..((i + 1) * per).min(rows)),
            })
            .collect()
    }

    /// Whether `other` is this share sent again: same pane, offsets and
    /// counts. Shares are a function of the input, so a replay matches.
    fn same_as(&self, other: &Share) -> bool {
        self.window == other.window
            && self.part == other.part
            && self.parts == other.parts
            && self.source == other.source
            && self.columns.len() == other.columns.len()
            && self.ts_min_ms == other.ts_min_ms
            && self.ts_max_ms == other.ts_max_ms
            && self.invalid_by_kind == other.invalid_by_kind
            && self.late == other.late
            && self.closed_by == other.closed_by
    }
}

/// A partition has sent every share of the windows ending at or before
/// `closed_ms`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    pub partition: i32,
    pub closed_ms: i64,
}

/// The progress a work of one partition's windows reports once its shares
/// are sent: each partition's windows ending at or before its checkpoint's
/// emitted bound are all handed out, in this work or before.
pub fn progress_of(work: &Work) -> Vec<Progress> {
    work.commit
        .iter()
        .filter_map(|c| {
            let closed_ms = c.checkpoint.as_ref()?.emitted_ms?;
            Some(Progress {
                partition: c.partition,
                closed_ms,
            })
        })
        .collect()
}

/// What the merger made of a share.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Added {
    /// Held until its pane is complete.
    Held,
    /// A share it holds or has merged, sent again.
    Duplicate,
    /// A share of a window that every partition has closed and the merger
    /// no longer remembers: it merged it, so this is a replay.
    Replayed,
    /// A share under a pane it holds or merged with other offsets or counts:
    /// the sender's rules changed, or its input did. Dropped; the held or
    /// merged one stands, so a `packet_id` never carries two contents.
    Conflict,
}

/// The merger's position, stored with each commit of the internal topic:
/// what the records before the committed offset said.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct MergeState {
    /// Per input partition, [`Progress::closed_ms`].
    pub closed: Vec<Option<i64>>,
    /// Windows still open with panes merged: `(start_ms, end_ms, next pane)`.
    pub merged: Vec<(i64, i64, u32)>,
}

impl MergeState {
    /// The state as an offset commit's metadata: compact JSON (brokers take
    /// `offset.metadata.max.bytes`, 4096 by default).
    pub fn to_metadata(&self) -> String {
        serde_json::to_string(self).expect("a merge state serializes")
    }

    /// The state in a commit's metadata; `None` for none or another form.
    pub fn from_metadata(text: &str) -> Option<MergeState> {
        serde_json::from_str(text).ok()
    }
}

struct Open {
    /// By pane, input partition and part: the share's parts and positions.
    shares: BTreeMap<(u32, i32, u32), (Share, u64)>,
    next_pane: u32,
}

impl Open {
    /// Whether every part of partition `p`'s share of pane `k` is held.
    fn has(&self, k: u32, p: i32) -> bool {
        let mut held = self.shares.range((k, p, 0)..=(k, p, u32::MAX));
        match held.next() {
            Some((_, (first, _))) => 1 + held.count() == first.parts as usize,
            None => false,
        }
    }

    /// Whether some part of partition `p`'s share of pane `k` is held: then
    /// the pane waits for all of them, whatever the partition's progress.
    fn holds_part(&self, k: u32, p: i32) -> bool {
        self.shares
            .range((k, p, 0)..=(k, p, u32::MAX))
            .next()
            .is_some()
    }

    /// Whether any part of any share of pane `k` is held.
    fn any_of(&self, k: u32) -> bool {
        self.shares
            .range((k, i32::MIN, 0)..=(k, i32::MAX, u32::MAX))
            .next()
            .is_some()
    }
}

/// The merge of the windows routed to one internal partition.
pub struct Merger {
    closed: Vec<Option<i64>>,
    open: BTreeMap<(i64, i64), Open>,
    held_events: usize,
    seq: u64,
}

/// The internal partition a window's shares go to: consecutive windows
/// round-robin over the `partitions`, so the merge work spreads evenly.
pub fn route(window: &WindowId, hop_ms: i64, partitions: i32) -> i32 {
    window
        .start_ms
        .div_euclid(hop_ms.max(1))
        .rem_euclid(partitions as i64) as i32
}

impl Merger {
    /// A merger of the shares of `partitions` input partitions (numbered
    /// from 0), resumed at `state`.
    pub fn new(partitions: usize, state: &MergeState) -> Merger {
        let mut closed = state.closed.clone();
        closed.resize(partitions, None);
        let mut m = Merger {
            closed,
            open: BTreeMap::new(),
            held_events: 0,
            seq: 0,
        };
        for &(start, end, next) in &state.merged {
            m.open.insert(
                (start, end),
                Open {
                    shares: BTreeMap::new(),
                    next_pane: next,
                },
            );
        }
        m
    }

    /// Takes a share read at `position` of the internal partition.
    pub fn add(&mut self, share: Share, position: u64) -> Added {
        let key = (share.window.start_ms, share.window.end_ms);
        let p = share.partition();
        if p < 0 || p as usize >= self.closed.len() {
            return Added::Conflict;
        }
        if !self.open.contains_key(&key) && self.watermark().is_some_and(|w| key.1 <= w) {
            return Added::Replayed;
        }
        let open = self.open.entry(key).or_insert_with(|| Open {
            shares: BTreeMap::new(),
            next_pane: 0,
        });
        if share.window.pane < open.next_pane {
            return Added::Duplicate;
        }
        let key = (share.window.pane, p, share.part);
        let other_split = open
            .shares
            .range((key.0, p, 0)..=(key.0, p, u32::MAX))
            .any(|(_, (s, _))| s.parts != share.parts);
        match open.shares.get(&key) {
            Some((held, _)) if held.same_as(&share) => Added::Duplicate,
            Some(_) => Added::Conflict,
            None if other_split || share.part >= share.parts => Added::Conflict,
            None => {
                self.held_events += share.columns.len();
                open.shares.insert(key, (share, position));
                Added::Held
            }
        }
    }

    /// Takes a progress record. Progress only moves forward: a replayed
    /// record behind what is known changes nothing.
    pub fn progress(&mut self, progress: Progress) {
        let p = progress.partition;
        if p < 0 || p as usize >= self.closed.len() {
            return;
        }
        let i = p as usize;
        self.closed[i] = self.closed[i].max(Some(progress.closed_ms));
    }

    /// The panes that are complete, merged, in window order and pane order
    /// within a window.
    pub fn complete(&mut self, now: Instant) -> Vec<Batch> {
        let mut out = Vec::new();
        let mut done = Vec::new();
        for (&(start, end), open) in self.open.iter_mut() {
            let closed_all = |k: Option<u32>, open: &Open| {
                (0..self.closed.len()).all(|p| match k {
                    Some(k) if open.holds_part(k, p as i32) => open.has(k, p as i32),
                    _ => self.closed[p].is_some_and(|c| c >= end),
                })
            };
            loop {
                let k = open.next_pane;
                let any = open.shares.range((k, i32::MIN, 0)..).next().is_some();
                if !any {
                    if closed_all(None, open) {
                        done.push((start, end));
                    }
                    break;
                }
                if !open.any_of(k) || !closed_all(Some(k), open) {
                    break;
                }
                // Each partition's share whole: its parts in order.
                let mut parts: Vec<Share> = Vec::new();
                for p in 0..self.closed.len() as i32 {
                    let keys: Vec<(u32, i32, u32)> = open
                        .shares
                        .range((k, p, 0)..=(k, p, u32::MAX))
                        .map(|(key, _)| *key)
                        .collect();
                    let mut whole: Option<Share> = None;
                    for key in keys {
                        let (s, _) = open.shares.remove(&key).expect("listed");
                        match &mut whole {
                            None => whole = Some(s),
                            Some(w) => w.columns.append(&s.columns),
                        }
                    }
                    parts.extend(whole);
                }
                self.held_events -= parts.iter().map(|s| s.columns.len()).sum::<usize>();
                out.push(merged(parts, self.seq, now));
                self.seq += 1;
                open.next_pane += 1;
            }
        }
        for key in done {
            self.open.remove(&key);
        }
        out
    }

    /// The lowest position of a share still held: the internal partition may
    /// be committed up to it, and up to the next position when none is held.
    pub fn lowest_held(&self) -> Option<u64> {
        self.open
            .values()
            .flat_map(|o| o.shares.values().map(|(_, pos)| *pos))
            .min()
    }

    /// Valid events in the shares held.
    pub fn held_events(&self) -> usize {
        self.held_events
    }

    /// Windows with shares held.
    pub fn held_windows(&self) -> usize {
        self.open.values().filter(|o| !o.shares.is_empty()).count()
    }

    /// The least closed bound over the input partitions: every window ending
    /// at or before it is merged. `None` while a partition has sent nothing.
    pub fn watermark(&self) -> Option<i64> {
        self.closed.iter().copied().min().flatten()
    }

    /// The furthest window end any input partition has closed: what a
    /// partition that has gone quiet follows
    /// ([`crate::core::grouping::split`]).
    pub fn furthest(&self) -> Option<i64> {
        self.closed.iter().copied().max().flatten()
    }

    /// What to store with a commit of the internal partition.
    pub fn state(&self) -> MergeState {
        let merged = self
            .open
            .iter()
            .filter(|(_, o)| o.next_pane > 0)
            .map(|(&(s, e), o)| (s, e, o.next_pane))
            .collect();
        MergeState {
            closed: self.closed.clone(),
            merged,
        }
    }
}

/// The rank of a final closing reason when partitions closed a window for
/// different ones: the least data-determined wins, whatever the order.
fn rank(r: CloseReason) -> u8 {
    match r {
        CloseReason::Watermark => 0,
        CloseReason::Span => 1,
        CloseReason::Wait => 2,
        CloseReason::End => 3,
        CloseReason::Shutdown => 4,
        CloseReason::Rebalance => 5,
        CloseReason::Count => 6,
    }
}

/// One pane from its shares, in partition order.
fn merged(parts: Vec<Share>, seq: u64, now: Instant) -> Batch {
    let window = parts[0].window;
    let mut columns = Columns::default();
    let mut invalid_by_kind = [0u64; ErrorKind::ALL.len()];
    let mut late = 0;
    let mut closed_by = parts[0].closed_by;
    for s in &parts {
        columns.append(&s.columns);
        for (a, b) in invalid_by_kind.iter_mut().zip(s.invalid_by_kind) {
            *a += b;
        }
        late += s.late;
        if rank(s.closed_by) > rank(closed_by) {
            closed_by = s.closed_by;
        }
    }
    Batch {
        seq,
        columns,
        ts_min_ms: parts.iter().filter_map(|s| s.ts_min_ms).min(),
        ts_max_ms: parts.iter().filter_map(|s| s.ts_max_ms).max(),
        sources: parts.iter().map(|s| s.source.clone()).collect(),
        invalid: Vec::new(),
        invalid_by_kind,
        late: Some(late),
        window: Some(window),
        closed_by,
        opened_at: now,
    }
}

/// A record of the internal topic.
#[derive(Debug, Clone)]
pub enum Record {
    Share(Box<Share>),
    Progress(Progress),
}

/// A record of the internal topic that this version cannot read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("internal record: {0}")]
pub struct DecodeError(String);

/// The first byte of every record: the format's version. A reader stops on
/// another one rather than guess.
const FORMAT: u8 = 1;
const SHARE: u8 = 1;
const PROGRESS: u8 = 2;

impl Record {
    /// The record's bytes. A share holds the columns of `fields` only: the
    /// merge counts the slices, which name no other field.
    pub fn encode(&self, fields: &[Field]) -> Vec<u8> {
        let mut w = Vec::new();
        w.push(FORMAT);
        match self {
            Record::Progress(p) => {
                w.push(PROGRESS);
                put_i64(&mut w, p.partition as i64);
                put_i64(&mut w, p.closed_ms);
            }
            Record::Share(s) => {
                w.push(SHARE);
                put_i64(&mut w, s.window.start_ms);
                put_i64(&mut w, s.window.end_ms);
                put_u64(&mut w, s.window.pane as u64);
                put_u64(&mut w, s.part as u64);
                put_u64(&mut w, s.parts as u64);
                put_str(&mut w, &s.source.topic);
                put_i64(&mut w, s.source.partition as i64);
                put_i64(&mut w, s.source.first_offset);
                put_i64(&mut w, s.source.last_offset);
                put_opt(&mut w, s.ts_min_ms);
                put_opt(&mut w, s.ts_max_ms);
                for n in s.invalid_by_kind {
                    put_u64(&mut w, n);
                }
                put_u64(&mut w, s.late);
                w.push(rank(s.closed_by));
                let mask = fields.iter().fold(0u8, |m, f| m | 1 << f.index());
                w.push(mask);
                let n = s.columns.len();
                put_u64(&mut w, n as u64);
                for f in Field::ALL.iter().filter(|f| mask & 1 << f.index() != 0) {
                    for v in s.columns.column(*f).iter() {
                        match v {
                            None => put_u64(&mut w, 0),
                            Some(v) => {
                                put_u64(&mut w, v.len() as u64 + 1);
                                w.extend_from_slice(v.as_bytes());
                            }
                        }
                    }
                }
            }
        }
        w
    }

    pub fn decode(bytes: &[u8]) -> Result<Record, DecodeError> {
        let mut r = Reader { bytes, at: 0 };
        let format = r.byte()?;
        if format != FORMAT {
            return Err(DecodeError(format!(
                "format {format}, this version reads format {FORMAT}"
            )));
        }
        match r.byte()? {
            PROGRESS => Ok(Record::Progress(Progress {
                partition: r.i32()?,
                closed_ms: r.i64()?,
            })),
            SHARE => {
                let window = WindowId {
                    start_ms: r.i64()?,
                    end_ms: r.i64()?,
                    pane: u32::try_from(r.u64()?).map_err(|_| r.bad("pane"))?,
                };
                let part = u32::try_from(r.u64()?).map_err(|_| r.bad("part"))?;
                let parts = u32::try_from(r.u64()?).map_err(|_| r.bad("parts"))?;
                if part >= parts {
                    return Err(r.bad("part"));
                }
                let topic: Arc<str> = Arc::from(r.str()?);
                let source = SourceRange {
                    topic,
                    partition: r.i32()?,
                    first_offset: r.i64()?,
                    last_offset: r.i64()?,
                };
                let ts_min_ms = r.opt()?;
                let ts_max_ms = r.opt()?;
                let mut invalid_by_kind = [0u64; ErrorKind::ALL.len()];
                for n in invalid_by_kind.iter_mut() {
                    *n = r.u64()?;
                }
                let late = r.u64()?;
                let reason = r.byte()?;
                let closed_by = CloseReason::ALL
                    .into_iter()
                    .find(|c| rank(*c) == reason)
                    .ok_or_else(|| r.bad("closing reason"))?;
                let mask = r.byte()?;
                if mask >> FIELD_COUNT != 0 {
                    return Err(r.bad("field set"));
                }
                let n = usize::try_from(r.u64()?).map_err(|_| r.bad("event count"))?;
                // Every value takes at least a byte: a count beyond the
                // record is damage, not a reason to allocate.
                if n > bytes.len() {
                    return Err(r.bad("event count"));
                }
                let mut columns = Columns::with_len(n);
                for f in Field::ALL.iter().filter(|f| mask & 1 << f.index() != 0) {
                    let col = &mut columns.strings[f.index()];
                    col.clear();
                    for _ in 0..n {
                        match r.u64()? {
                            0 => col.push(None),
                            len => {
                                let v = r.take((len - 1) as usize)?;
                                let v = std::str::from_utf8(v).map_err(|_| r.bad("value"))?;
                                col.push(Some(v));
                            }
                        }
                    }
                }
                if r.at != bytes.len() {
                    return Err(r.bad("length"));
                }
                Ok(Record::Share(Box::new(Share {
                    window,
                    part,
                    parts,
                    source,
                    ts_min_ms,
                    ts_max_ms,
                    invalid_by_kind,
                    late,
                    closed_by,
                    columns,
                })))
            }
            kind => Err(DecodeError(format!("unknown record kind {kind}"))),
        }
    }
}

/// Unsigned LEB128.
fn put_u64(w: &mut Vec<u8>, mut v: u64) {
    loop {
        let b = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            w.push(b);
            return;
        }
        w.push(b | 0x80);
    }
}

/// Zigzag, then LEB128: small negative numbers stay short.
fn put_i64(w: &mut Vec<u8>, v: i64) {
    put_u64(w, ((v << 1) ^ (v >> 63)) as u64);
}

fn put_opt(w: &mut Vec<u8>, v: Option<i64>) {
    match v {
        None => w.push(0),
        Some(v) => {
            w.push(1);
            put_i64(w, v);
        }
    }
}

fn put_str(w: &mut Vec<u8>, s: &str) {
    put_u64(w, s.len() as u64);
    w.extend_from_slice(s.as_bytes());
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn bad(&self, what: &str) -> DecodeError {
        DecodeError(format!("bad {what} at byte {}", self.at))
    }

    fn byte(&mut self) -> Result<u8, DecodeError> {
        let b = *self.bytes.get(self.at).ok_or_else(|| self.bad("end"))?;
        self.at += 1;
        Ok(b)
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        let end = self.at.checked_add(n).filter(|e| *e <= self.bytes.len());
        let end = end.ok_or_else(|| self.bad("length"))?;
        let s = &self.bytes[self.at..end];
        self.at = end;
        Ok(s)
    }

    fn u64(&mut self) -> Result<u64, DecodeError> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.byte()?;
            v |= ((b & 0x7f) as u64) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(self.bad("number"))
    }

    fn i64(&mut self) -> Result<i64, DecodeError> {
        let u = self.u64()?;
        Ok(((u >> 1) as i64) ^ -((u & 1) as i64))
    }

    fn i32(&mut self) -> Result<i32, DecodeError> {
        let v = self.i64()?;
        i32::try_from(v).map_err(|_| self.bad("partition"))
    }

    fn opt(&mut self) -> Result<Option<i64>, DecodeError> {
        match self.byte()? {
            0 => Ok(None),
            1 => Ok(Some(self.i64()?)),
            _ => Err(self.bad("optional number")),
        }
    }

    fn str(&mut self) -> Result<&'a str, DecodeError> {
        let n = usize::try_from(self.u64()?).map_err(|_| self.bad("length"))?;
        let s = self.take(n)?;
        std::str::from_utf8(s).map_err(|_| self.bad("text"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::event::{LoginEvent, FIELD_COUNT};
    use std::borrow::Cow;

    const TOPIC: &str = "user-login";

    fn cols(users: &[&str]) -> Columns {
        let events: Vec<LoginEvent> = users
            .iter()
            .map(|u| {
                let mut fields: [Option<Cow<str>>; FIELD_COUNT] = Default::default();
                fields[Field::UserId.index()] = Some(Cow::Borrowed(*u));
                LoginEvent {
                    fields,
                    timestamp_ms: Some(0),
                }
            })
            .collect();
        Columns::from_events(&events)
    }

    fn share(start: i64, pane: u32, p: i32, first: i64, users: &[&str]) -> Share {
        Share {
            window: WindowId {
                start_ms: start,
                end_ms: start + 10,
                pane,
            },
            part: 0,
            parts: 1,
            source: SourceRange {
                topic: Arc::from(TOPIC),
                partition: p,
                first_offset: first,
                last_offset: first + users.len() as i64 - 1,
            },
            ts_min_ms: Some(start),
            ts_max_ms: Some(start + 9),
            invalid_by_kind: [0; ErrorKind::ALL.len()],
            late: 0,
            closed_by: CloseReason::Watermark,
            columns: cols(users),
        }
    }

    fn progress(p: i32, closed_ms: i64) -> Progress {
        Progress {
            partition: p,
            closed_ms,
        }
    }

    fn users(b: &Batch) -> Vec<String> {
        b.columns
            .column(Field::UserId)
            .iter()
            .map(|v| v.unwrap_or("-").to_string())
            .collect()
    }

    #[test]
    fn a_pane_waits_for_every_partition_then_merges_in_partition_order() {
        let now = Instant::now();
        let mut m = Merger::new(2, &MergeState::default());
        assert_eq!(m.add(share(0, 0, 1, 5, &["b", "c"]), 0), Added::Held);
        assert!(m.complete(now).is_empty(), "partition 0 has said nothing");
        m.progress(progress(1, 10));
        assert!(m.complete(now).is_empty(), "partition 0 has said nothing");
        assert_eq!(m.add(share(0, 0, 0, 7, &["a"]), 1), Added::Held);
        let b = m.complete(now);
        assert_eq!(b.len(), 1);
        assert_eq!(users(&b[0]), ["a", "b", "c"]);
        assert_eq!(
            b[0].sources
                .iter()
                .map(|s| (s.partition, s.first_offset, s.last_offset))
                .collect::<Vec<_>>(),
            [(0, 7, 7), (1, 5, 6)]
        );
        assert_eq!((b[0].ts_min_ms, b[0].ts_max_ms), (Some(0), Some(9)));
        assert_eq!(m.lowest_held(), None);
        // The window is not finished until partition 0 closes it: it may
        // still send a chunk of pane 1.
        assert_eq!(m.held_windows(), 0);
        m.progress(progress(0, 10));
        assert!(m.complete(now).is_empty());
        assert_eq!(m.state().merged, []);
        assert_eq!(m.watermark(), Some(10));
    }

    #[test]
    fn a_partition_without_events_in_the_window_completes_it_by_progress() {
        let now = Instant::now();
        let mut m = Merger::new(3, &MergeState::default());
        m.add(share(10, 0, 2, 0, &["x"]), 4);
        m.progress(progress(0, 30));
        m.progress(progress(2, 20));
        assert!(m.complete(now).is_empty(), "partition 1 holds the window");
        assert_eq!(m.watermark(), None);
        assert_eq!(m.lowest_held(), Some(4));
        m.progress(progress(1, 20));
        let b = m.complete(now);
        assert_eq!(b.len(), 1);
        assert_eq!(users(&b[0]), ["x"]);
        assert_eq!(m.watermark(), Some(20));
    }

    #[test]
    fn panes_are_chunks_of_each_partition_and_merge_in_order() {
        let now = Instant::now();
        let mut m = Merger::new(2, &MergeState::default());
        let mut p0_1 = share(0, 1, 0, 2, &["c"]);
        let mut p0_0 = share(0, 0, 0, 0, &["a", "b"]);
        p0_0.closed_by = CloseReason::Count;
        p0_1.closed_by = CloseReason::Watermark;
        // Pane 1 arrives first: it waits for pane 0.
        m.add(p0_1, 0);
        m.progress(progress(0, 10));
        m.progress(progress(1, 10));
        assert!(
            m.complete(now).is_empty(),
            "pane 0 of partition 0 is missing"
        );
        m.add(p0_0, 1);
        let b = m.complete(now);
        let seen: Vec<(u32, Vec<String>, CloseReason)> = b
            .iter()
            .map(|b| (b.window.unwrap().pane, users(b), b.closed_by))
            .collect();
        assert_eq!(
            seen,
            [
                (
                    0,
                    vec!["a".to_string(), "b".to_string()],
                    CloseReason::Count
                ),
                (1, vec!["c".to_string()], CloseReason::Watermark)
            ]
        );
    }

    #[test]
    fn a_share_sent_again_is_dropped_and_a_different_one_is_a_conflict() {
        let now = Instant::now();
        let mut m = Merger::new(1, &MergeState::default());
        assert_eq!(m.add(share(0, 0, 0, 0, &["a"]), 0), Added::Held);
        assert_eq!(m.add(share(0, 0, 0, 0, &["a"]), 1), Added::Duplicate);
        assert_eq!(m.add(share(0, 0, 0, 3, &["a"]), 2), Added::Conflict);
        m.progress(progress(0, 10));
        assert_eq!(m.complete(now).len(), 1);
        // Every partition has closed the window: a later share of it is a
        // replay, recognized without remembering the window.
        assert_eq!(m.state().merged, []);
        assert_eq!(m.add(share(0, 0, 0, 0, &["a"]), 3), Added::Replayed);
        assert!(m.complete(now).is_empty());
    }

    #[test]
    fn a_resumed_merger_merges_no_pane_twice() {
        let now = Instant::now();
        let mut m = Merger::new(2, &MergeState::default());
        m.add(share(0, 0, 0, 0, &["a", "b"]), 0);
        m.add(share(0, 0, 1, 0, &["c", "d"]), 1);
        m.add(share(10, 0, 0, 2, &["e"]), 2);
        m.progress(progress(0, 10));
        m.progress(progress(1, 10));
        assert_eq!(m.complete(now).len(), 1);
        let state = m.state();
        assert_eq!(state.merged, []);
        assert_eq!(state.closed, [Some(10), Some(10)]);
        // Resumed from the commit at position 2, the lowest held: the
        // records from there on are read again.
        assert_eq!(m.lowest_held(), Some(2));
        let mut r = Merger::new(2, &state);
        assert_eq!(r.add(share(0, 0, 1, 0, &["c", "d"]), 1), Added::Replayed);
        assert_eq!(r.add(share(10, 0, 0, 2, &["e"]), 2), Added::Held);
        r.progress(progress(0, 20));
        r.progress(progress(1, 20));
        let b = r.complete(now);
        assert_eq!(b.len(), 1);
        assert_eq!(b[0].window.unwrap().start_ms, 10);
    }

    #[test]
    fn a_share_in_parts_counts_once_every_part_is_held() {
        let now = Instant::now();
        let mut m = Merger::new(1, &MergeState::default());
        let parts = share(0, 0, 0, 0, &["a", "b", "c"]).split(2);
        assert_eq!(parts.len(), 2);
        assert_eq!(m.add(parts[1].clone(), 1), Added::Held);
        assert_eq!(m.add(parts[1].clone(), 2), Added::Duplicate);
        m.progress(progress(0, 10));
        assert!(m.complete(now).is_empty(), "part 0 is missing");
        assert_eq!(m.add(parts[0].clone(), 3), Added::Held);
        let b = m.complete(now);
        assert_eq!(users(&b[0]), ["a", "b", "c"]);
        assert_eq!(m.held_events(), 0);
        // A share split otherwise than one held is refused, never mixed.
        let mut m = Merger::new(1, &MergeState::default());
        m.add(share(0, 0, 0, 0, &["a", "b", "c"]).split(3)[0].clone(), 0);
        let other = share(0, 0, 0, 0, &["a", "b", "c"]).split(2);
        assert_eq!(m.add(other[1].clone(), 1), Added::Conflict);
    }

    #[test]
    fn records_read_back_as_written() {
        let mut s = share(-20, 3, 5, 1_000_000_000_000, &["ü", "", "a b"]);
        s.columns.strings[Field::Ip.index()] = {
            let c = cols(&["1.2.3.4", "x", "y"]);
            c.strings[Field::UserId.index()].clone()
        };
        s.invalid_by_kind[2] = 7;
        s.late = 3;
        s.ts_min_ms = None;
        s.closed_by = CloseReason::Wait;
        let bytes = Record::Share(Box::new(s.clone())).encode(&[Field::UserId, Field::Ip]);
        let Record::Share(back) = Record::decode(&bytes).unwrap() else {
            panic!("a share")
        };
        assert!(back.same_as(&s));
        for f in [Field::UserId, Field::Ip] {
            assert_eq!(
                back.columns.column(f).iter().collect::<Vec<_>>(),
                s.columns.column(f).iter().collect::<Vec<_>>()
            );
        }
        // Fields no slice names are not carried.
        assert!(back
            .columns
            .column(Field::Locale)
            .iter()
            .all(|v| v.is_none()));
        let p = Progress {
            partition: 2,
            closed_ms: -5,
        };
        let Record::Progress(q) = Record::decode(&Record::Progress(p).encode(&[])).unwrap() else {
            panic!("progress")
        };
        assert_eq!(p, q);
        // Damage is refused, never read as something else.
        for cut in 0..bytes.len() {
            assert!(Record::decode(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        let mut other = bytes.clone();
        other[0] = 9;
        assert!(Record::decode(&other).unwrap_err().0.contains("format 9"));
    }

    #[test]
    fn consecutive_windows_round_robin_over_the_internal_partitions() {
        let w = |s| WindowId {
            start_ms: s,
            end_ms: s + 10,
            pane: 0,
        };
        let routed: Vec<i32> = (-2..4).map(|i| route(&w(i * 10), 10, 3)).collect();
        assert_eq!(routed, [1, 2, 0, 1, 2, 0]);
    }
}
