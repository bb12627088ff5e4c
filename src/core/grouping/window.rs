//! Event-time windows: what a packet covers, decided by the data alone.
//!
//! Every packet reports one window `[start, end)` of event time, aligned to
//! the Unix epoch, over all the partitions this instance reads. The rules,
//! written once:
//!
//! - **Lateness is judged per partition.** Each partition keeps its own
//!   *progress*: the largest event time among the valid events read from it so
//!   far. An event is late for a window when the window ends at or before the
//!   progress before it minus `grace`; with hopping windows it counts in each of
//!   its windows for which that does not hold, and is late only when it holds
//!   for all. Because progress depends on one partition's sequence alone, the
//!   judgement does not depend on how partitions interleave.
//! - **A window closes by watermark** when every active partition's progress
//!   minus grace has reached its end. The watermark is the least of those; a
//!   partition that has read nothing yet holds it back, and a partition silent
//!   for `idle` (wall clock) stops holding it. Closed by watermark, a window
//!   holds exactly the events that were on time for their own partition: the
//!   same set whatever the interleaving.
//! - **Wait** bounds how long a window stays open after its first event
//!   arrived, so a quiet stream reports; an event for a window closed by wait
//!   is late. **Count** bounds the valid events one window holds in memory:
//!   reaching it emits the window so far as a pane and the window goes on in
//!   the next pane.
//! - **Offsets.** The offset to commit for a partition is the lowest one that
//!   an open window still needs; every message below it is in an emitted
//!   window, a dead letter, or counted late. With it goes a checkpoint (the
//!   partition's progress *at that offset* and the watermark that closed
//!   windows so far), stored before the commit ([`crate::commit::checkpoint`]), so that a restart
//!   re-reads from the offset with exactly the progress the original run had
//!   there and judges every event the same way.
//! - **Alignment.** When the open windows hold more than `max_buffered` valid
//!   events, partitions that run ahead of the watermark are paused until the
//!   slow ones catch up (the shell applies [`Flow`] changes to the consumer).
//!   The partition that holds the watermark is never paused, so it always
//!   moves.
//!
//! The core is synchronous and takes the current `Instant` as an argument, so
//! tests drive wall-clock time by hand.

use std::collections::btree_map::Entry;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::core::event::{ErrorKind, InvalidEvent, LoginEvent};
use crate::core::grouping::arrival::MAX_HELD_INVALID_BYTES;
pub use crate::work::Checkpoint;
use crate::work::{
    Batch, CloseReason, Columns, CommitPoint, InvalidMessage, SourceRange, WindowId, Work,
};

/// What happens to late events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LatePolicy {
    /// Counted and sent to the dead-letter topic with `error.kind = late`.
    DeadLetter,
    /// Counted only.
    Drop,
}

/// The window rules' parameters.
#[derive(Debug, Clone, Copy)]
pub struct WindowConfig {
    /// Window length (`batch.max_span`).
    pub size: Duration,
    /// Distance between window starts; equal to `size` for tumbling windows.
    pub hop: Duration,
    pub grace: Duration,
    pub idle: Duration,
    pub max_wait: Duration,
    /// Valid events per pane.
    pub max_events: usize,
    /// Valid events held in open windows before partitions ahead are paused.
    pub max_buffered: usize,
    /// Dead letters held before they are handed to delivery on their own.
    pub max_dead_letters: usize,
    pub late: LatePolicy,
}

/// A pause or resume the shell applies to the consumer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    Pause(i32),
    Resume(i32),
}

/// Why an invalid or late message was set aside, for per-window counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mark {
    Invalid(ErrorKind),
    Late,
}

struct Part {
    partition: i32,
    progress: Option<i64>,
    /// Restored from a checkpoint: windows ending at or before this were
    /// emitted before the restart; their on-time events are already reported.
    replayed_through: Option<i64>,
    /// Restored from a checkpoint ahead of the committed offset: messages
    /// below it are already delivered and are skipped as replayed.
    resume_at: Option<i64>,
    /// The next offset to read; `None` until a message is read or a checkpoint restored.
    next_offset: Option<i64>,
    last_message: Instant,
    idle: bool,
    paused: bool,
    /// Offsets of invalid and late messages not yet below every open pane.
    marks: VecDeque<(i64, Mark)>,
    /// The last checkpoint handed out for commit, to skip unchanged ones.
    committed: Option<Checkpoint>,
    /// The first offset this instance read or restored, for counting committed messages.
    base: Option<i64>,
}

impl Part {
    fn new(partition: i32, now: Instant) -> Part {
        Part {
            partition,
            progress: None,
            replayed_through: None,
            resume_at: None,
            next_offset: None,
            last_message: now,
            idle: false,
            paused: false,
            marks: VecDeque::new(),
            committed: None,
            base: None,
        }
    }

    fn active(&self) -> bool {
        !self.idle
    }
}

/// A partition's share of a pane.
#[derive(Debug, Clone, Copy)]
struct PaneRange {
    partition: i32,
    first: i64,
    last: i64,
}

/// What an open window still needs from a partition: its first offset there,
/// and the partition's progress before it (the checkpoint to commit).
#[derive(Debug, Clone, Copy)]
struct Need {
    partition: i32,
    offset: i64,
    progress: Option<i64>,
}

struct OpenWindow {
    pane: u32,
    columns: Columns,
    ts_min: Option<i64>,
    ts_max: Option<i64>,
    ranges: Vec<PaneRange>,
    /// Across all panes: a restart recomputes the window whole.
    needs: Vec<Need>,
    opened_at: Instant,
}

/// How an event relates to one of its windows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    OnTime,
    /// Reported before a restart (the checkpoint says the window was emitted).
    Replayed,
    LateForPartition,
    LateClosed,
}

/// Groups events into event-time windows and decides when each closes.
pub struct Windower {
    cfg: WindowConfig,
    size_ms: i64,
    hop_ms: i64,
    grace_ms: i64,
    topic: Arc<str>,
    /// Sorted by partition.
    parts: Vec<Part>,
    windows: BTreeMap<i64, OpenWindow>,
    /// Windows above `closed_through` already closed (by wait).
    closed_above: BTreeSet<i64>,
    /// Every window ending at or before this is closed.
    closed_through: Option<i64>,
    watermark: Option<i64>,
    /// Valid events held in open panes.
    buffered: usize,
    closed: Vec<Batch>,
    dead_letters: Vec<InvalidMessage>,
    /// Payload and key bytes of `dead_letters`.
    dead_letter_bytes: usize,
    /// Messages consumed since the last [`Work`] that no window holds.
    loose: u64,
    /// When the oldest message not yet handed to delivery arrived outside a window.
    loose_since: Option<Instant>,
    late_total: u64,
    replayed_total: u64,
    next_check: Option<Instant>,
    flows: Vec<Flow>,
    next_seq: u64,
    /// The latest `now` seen, for state changes made outside a call that carries one.
    now: Instant,
}

impl Windower {
    pub fn new(cfg: WindowConfig, topic: &str) -> Windower {
        let ms = |d: Duration| d.as_millis().min(i64::MAX as u128) as i64;
        let size_ms = ms(cfg.size).max(1);
        let hop_ms = ms(cfg.hop).clamp(1, size_ms);
        Windower {
            cfg,
            size_ms,
            hop_ms,
            grace_ms: ms(cfg.grace),
            topic: Arc::from(topic),
            parts: Vec::new(),
            windows: BTreeMap::new(),
            closed_above: BTreeSet::new(),
            closed_through: None,
            watermark: None,
            buffered: 0,
            closed: Vec::new(),
            dead_letters: Vec::new(),
            dead_letter_bytes: 0,
            loose: 0,
            loose_since: None,
            late_total: 0,
            replayed_total: 0,
            next_check: None,
            flows: Vec::new(),
            next_seq: 0,
            now: Instant::now(),
        }
    }

    /// The starts of the windows that contain `ts`, oldest first.
    pub fn window_starts(&self, ts: i64) -> impl Iterator<Item = i64> {
        let last = ts.div_euclid(self.hop_ms) * self.hop_ms;
        let n = self.size_ms / self.hop_ms;
        let hop = self.hop_ms;
        (0..n).rev().map(move |k| last - k * hop)
    }

    /// Open windows (panes in progress).
    pub fn open_windows(&self) -> usize {
        self.windows.len()
    }

    /// Valid events held in open windows.
    pub fn buffered(&self) -> usize {
        self.buffered
    }

    /// How many more messages may be read before the open windows could
    /// hold more than `batch.max_buffered` events (each event is buffered
    /// once per window it falls in); at least 1. Reading no more than this
    /// at a time lets alignment pause a partition as soon as the bound is
    /// passed, as if messages were read one by one.
    pub fn room(&self) -> usize {
        let per_event = (self.size_ms + self.hop_ms - 1) / self.hop_ms;
        (self.cfg.max_buffered.saturating_sub(self.buffered) / per_event.max(1) as usize).max(1)
    }

    /// Late events seen since start.
    pub fn late_total(&self) -> u64 {
        self.late_total
    }

    /// Events skipped because a checkpoint says their window was already emitted.
    pub fn replayed_total(&self) -> u64 {
        self.replayed_total
    }

    /// The current watermark: every active partition has progressed past it (grace included).
    pub fn watermark(&self) -> Option<i64> {
        self.watermark
    }

    /// Partitions currently paused by alignment.
    pub fn paused(&self) -> Vec<i32> {
        self.parts
            .iter()
            .filter(|p| p.paused)
            .map(|p| p.partition)
            .collect()
    }

    /// Starts tracking a newly assigned partition, from its stored checkpoint
    /// when there is one. `committed` is the group's committed offset: when it
    /// is behind the checkpoint (the process stopped between writing the
    /// checkpoint and committing), the messages in between are skipped and the
    /// checkpoint is committed again with the next work.
    pub fn assign(
        &mut self,
        partition: i32,
        checkpoint: Option<Checkpoint>,
        committed: Option<i64>,
        now: Instant,
    ) {
        let i = self.part_index(partition, now);
        let part = &mut self.parts[i];
        if let Some(c) = checkpoint {
            part.progress = c.progress_ms;
            part.replayed_through = c.closed_through_ms;
            part.resume_at = Some(c.offset);
            part.next_offset = Some(c.offset);
            part.base = Some(c.offset);
            part.committed = Some(c);
            if committed.is_none_or(|o| o < c.offset) {
                part.committed = None;
                self.loose(now);
            }
            if let Some(c) = c.closed_through_ms {
                self.closed_through = Some(self.closed_through.map_or(c, |t| t.max(c)));
            }
        }
        self.refresh_watermark();
        self.arm_at(now + self.cfg.idle);
    }

    /// Forgets every partition and open window: after revocation or at
    /// shutdown, once pending dead letters are handed over with
    /// [`Windower::take_work`]. Open windows are not emitted; their offsets were
    /// never committed, so whoever reads the partitions next computes them whole.
    pub fn reset(&mut self) {
        let seq = self.next_seq;
        *self = Windower::new(self.cfg, &self.topic);
        self.next_seq = seq;
    }

    /// A bounded run has read `partition` to the end of its range: nothing
    /// more comes from it, so it no longer holds the watermark (as an idle
    /// partition does, but at once and by position, not by wall clock).
    pub fn end_partition(&mut self, partition: i32, now: Instant) {
        self.now = now;
        let i = self.part_index(partition, now);
        let part = &mut self.parts[i];
        if part.idle {
            return;
        }
        part.idle = true;
        if part.paused {
            part.paused = false;
            self.flows.push(Flow::Resume(partition));
        }
        self.refresh_watermark();
        self.close_by_watermark();
        self.resume_holders();
    }

    /// A bounded run has read its whole range: every open window closes
    /// (closed by [`CloseReason::End`]), oldest first, and everything is
    /// handed over with the offsets to commit. Windows ending at or before
    /// the last one closed count as closed for whatever reads on.
    pub fn finish(&mut self, now: Instant) -> Option<Work> {
        self.now = now;
        let starts: Vec<i64> = self.windows.keys().copied().collect();
        for start in starts {
            self.close_window(start, CloseReason::End);
            let end = start + self.size_ms;
            self.closed_through = Some(self.closed_through.map_or(end, |c| c.max(end)));
        }
        if let Some(work) = self.take_work(now, true) {
            return Some(work);
        }
        // Nothing to publish, but the last offsets read (replayed or skipped
        // messages) are still to be committed.
        let (commit, messages) = self.checkpoints();
        if commit.is_empty() {
            return None;
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        Some(Work {
            seq,
            batches: Vec::new(),
            dead_letters: Vec::new(),
            commit,
            messages,
        })
    }

    /// Adds a valid event read at `offset` of `partition`.
    #[allow(clippy::too_many_arguments)]
    pub fn push_event(
        &mut self,
        partition: i32,
        offset: i64,
        key: Option<&[u8]>,
        payload: &[u8],
        event: &LoginEvent<'_>,
        now: Instant,
    ) {
        let i = self.part_index(partition, now);
        if self.skip_replayed(i, offset, now) {
            return;
        }
        let Some(ts) = event.timestamp_ms else {
            // Settings require a timestamp in window mode; defend anyway.
            self.push_invalid(
                partition,
                offset,
                key,
                payload,
                InvalidEvent {
                    kind: ErrorKind::MissingField,
                    reason: "window mode needs the `timestamp` field".into(),
                },
                now,
            );
            return;
        };
        self.now = now;
        let prev = self.parts[i].progress;
        self.touch(i, offset, now);

        let (mut on_time, mut replayed, mut closed_late) = (0u32, false, false);
        let size = self.size_ms;
        for start in self.window_starts(ts) {
            match self.verdict(i, prev, start) {
                Verdict::OnTime => {
                    on_time += 1;
                    self.add_to_window(start, partition, offset, prev, event, ts, now);
                }
                Verdict::Replayed => replayed = true,
                Verdict::LateClosed => closed_late = true,
                Verdict::LateForPartition => {}
            }
        }
        if on_time == 0 {
            if replayed {
                self.replayed_total += 1;
                self.loose(now);
            } else {
                let last_end = ts.div_euclid(self.hop_ms) * self.hop_ms + size;
                let reason = if closed_late {
                    format!("late: its window ending at {last_end} ms was already closed")
                } else {
                    format!(
                        "late: its window ending at {last_end} ms ended at or before the partition's progress minus batch.grace"
                    )
                };
                self.late(i, offset, key, payload, reason, now);
            }
        }

        let part = &mut self.parts[i];
        if prev.is_none_or(|p| ts > p) {
            part.progress = Some(ts);
            self.refresh_watermark();
            self.close_by_watermark();
        }
        if self.buffered > self.cfg.max_buffered {
            self.align();
        }
    }

    /// Adds a message that is not a valid event: a dead letter, and counted in
    /// the windows whose offset range it falls in.
    pub fn push_invalid(
        &mut self,
        partition: i32,
        offset: i64,
        key: Option<&[u8]>,
        payload: &[u8],
        error: InvalidEvent,
        now: Instant,
    ) {
        let i = self.part_index(partition, now);
        if self.skip_replayed(i, offset, now) {
            return;
        }
        self.now = now;
        self.touch(i, offset, now);
        self.parts[i]
            .marks
            .push_back((offset, Mark::Invalid(error.kind)));
        self.dead_letter_bytes += payload.len() + key.map_or(0, <[u8]>::len);
        self.dead_letters.push(InvalidMessage {
            topic: self.topic.clone(),
            partition,
            offset,
            key: key.map(<[u8]>::to_vec),
            payload: payload.to_vec(),
            kind: error.kind,
            reason: error.reason,
        });
        self.loose(now);
    }

    /// Applies the wall-clock rules: windows open longer than `max_wait` close,
    /// partitions silent for `idle` stop holding the watermark.
    pub fn poll(&mut self, now: Instant) {
        if self.next_check.is_none_or(|t| now < t) {
            return;
        }
        self.now = now;
        self.next_check = None;
        let mut idle_changed = false;
        for part in &mut self.parts {
            if !part.idle && !part.paused {
                let silent_until = part.last_message + self.cfg.idle;
                if now >= silent_until {
                    part.idle = true;
                    idle_changed = true;
                } else {
                    self.next_check = Some(
                        self.next_check
                            .map_or(silent_until, |t| t.min(silent_until)),
                    );
                }
            }
        }
        if idle_changed {
            self.refresh_watermark();
            self.close_by_watermark();
            self.resume_holders();
        }
        let expired: Vec<i64> = self
            .windows
            .iter()
            .filter(|(_, w)| now >= w.opened_at + self.cfg.max_wait)
            .map(|(s, _)| *s)
            .collect();
        for start in expired {
            self.close_window(start, CloseReason::Wait);
            self.closed_above.insert(start);
        }
        if let Some(first) = self.windows.values().map(|w| w.opened_at).min() {
            self.arm_at(first + self.cfg.max_wait);
        }
        if let Some(t) = self.loose_since {
            self.arm_at(t + self.cfg.max_wait);
        }
    }

    /// The earliest instant at which [`Windower::poll`] has something to do.
    pub fn deadline(&self) -> Option<Instant> {
        self.next_check
    }

    /// Pause and resume changes for the consumer, oldest first.
    pub fn take_flows(&mut self) -> Vec<Flow> {
        std::mem::take(&mut self.flows)
    }

    /// Hands over what is ready for delivery: the windows closed since the
    /// last call, pending dead letters, and the offsets to commit once both are
    /// delivered. Without `force`, dead letters alone wait until there are
    /// `max_dead_letters` of them or the oldest has waited `max_wait`.
    pub fn take_work(&mut self, now: Instant, force: bool) -> Option<Work> {
        let due = !self.closed.is_empty()
            || self.dead_letters.len() >= self.cfg.max_dead_letters
            || self.dead_letter_bytes >= MAX_HELD_INVALID_BYTES
            || self
                .loose_since
                .is_some_and(|t| now >= t + self.cfg.max_wait)
            || (force && self.loose > 0);
        if !due {
            return None;
        }
        let (commit, messages) = self.checkpoints();
        let batches = std::mem::take(&mut self.closed);
        self.loose = 0;
        self.loose_since = None;
        self.prune_marks();
        let seq = self.next_seq;
        self.next_seq += 1;
        Some(Work {
            seq,
            batches,
            dead_letters: {
                self.dead_letter_bytes = 0;
                std::mem::take(&mut self.dead_letters)
            },
            commit,
            messages,
        })
    }

    fn verdict(&self, i: usize, prev: Option<i64>, start: i64) -> Verdict {
        let end = start + self.size_ms;
        if prev.is_some_and(|p| end <= p - self.grace_ms) {
            Verdict::LateForPartition
        } else if self.parts[i].replayed_through.is_some_and(|r| end <= r) {
            Verdict::Replayed
        } else if self.closed_through.is_some_and(|c| end <= c)
            || self.closed_above.contains(&start)
        {
            Verdict::LateClosed
        } else {
            Verdict::OnTime
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn add_to_window(
        &mut self,
        start: i64,
        partition: i32,
        offset: i64,
        prev: Option<i64>,
        event: &LoginEvent<'_>,
        ts: i64,
        now: Instant,
    ) {
        let w = match self.windows.entry(start) {
            Entry::Occupied(e) => e.into_mut(),
            Entry::Vacant(e) => {
                let deadline = now + self.cfg.max_wait;
                self.next_check = Some(self.next_check.map_or(deadline, |t| t.min(deadline)));
                e.insert(OpenWindow {
                    pane: 0,
                    columns: Columns::default(),
                    ts_min: None,
                    ts_max: None,
                    ranges: Vec::new(),
                    needs: Vec::new(),
                    opened_at: now,
                })
            }
        };
        w.columns.push(event);
        w.ts_min = Some(w.ts_min.map_or(ts, |m| m.min(ts)));
        w.ts_max = Some(w.ts_max.map_or(ts, |m| m.max(ts)));
        match w.ranges.iter_mut().find(|r| r.partition == partition) {
            Some(r) => r.last = offset,
            None => w.ranges.push(PaneRange {
                partition,
                first: offset,
                last: offset,
            }),
        }
        if !w.needs.iter().any(|n| n.partition == partition) {
            w.needs.push(Need {
                partition,
                offset,
                progress: prev,
            });
        }
        self.buffered += 1;
        if w.columns.len() >= self.cfg.max_events {
            self.emit_pane(start, CloseReason::Count);
        }
    }

    fn late(
        &mut self,
        i: usize,
        offset: i64,
        key: Option<&[u8]>,
        payload: &[u8],
        reason: String,
        now: Instant,
    ) {
        self.late_total += 1;
        let part = &mut self.parts[i];
        part.marks.push_back((offset, Mark::Late));
        if self.cfg.late == LatePolicy::DeadLetter {
            self.dead_letter_bytes += payload.len() + key.map_or(0, <[u8]>::len);
            self.dead_letters.push(InvalidMessage {
                topic: self.topic.clone(),
                partition: part.partition,
                offset,
                key: key.map(<[u8]>::to_vec),
                payload: payload.to_vec(),
                kind: ErrorKind::Late,
                reason,
            });
        }
        self.loose(now);
    }

    /// Records that a message was read from partition `i`; a silent partition
    /// that speaks again holds the watermark again.
    /// A message below a restored checkpoint's offset: already delivered.
    fn skip_replayed(&mut self, i: usize, offset: i64, now: Instant) -> bool {
        let part = &mut self.parts[i];
        if part.resume_at.is_some_and(|r| offset < r) {
            part.last_message = now;
            self.replayed_total += 1;
            true
        } else {
            false
        }
    }

    fn touch(&mut self, i: usize, offset: i64, now: Instant) {
        let part = &mut self.parts[i];
        if part.next_offset.is_none() {
            part.base = Some(offset);
        }
        part.next_offset = Some(offset + 1);
        part.last_message = now;
        if part.idle {
            part.idle = false;
            self.refresh_watermark();
            self.arm_at(now + self.cfg.idle);
        }
    }

    fn loose(&mut self, now: Instant) {
        self.loose += 1;
        if self.loose_since.is_none() {
            self.loose_since = Some(now);
            self.arm_at(now + self.cfg.max_wait);
        }
    }

    fn arm_at(&mut self, at: Instant) {
        self.next_check = Some(self.next_check.map_or(at, |t| t.min(at)));
    }

    /// Emits the current pane of a window; the window stays open.
    fn emit_pane(&mut self, start: i64, reason: CloseReason) {
        let Some(w) = self.windows.get_mut(&start) else {
            return;
        };
        let pane = w.pane;
        w.pane += 1;
        let columns = std::mem::take(&mut w.columns);
        let ranges = std::mem::take(&mut w.ranges);
        let (ts_min, ts_max) = (w.ts_min.take(), w.ts_max.take());
        let opened_at = w.opened_at;
        self.buffered -= columns.len();
        self.push_batch(
            start, pane, columns, ts_min, ts_max, ranges, reason, opened_at,
        );
    }

    /// Closes a window for good, emitting its last pane. A window whose last
    /// pane is empty (everything went out in panes closed by count) emits nothing more.
    fn close_window(&mut self, start: i64, reason: CloseReason) {
        let Some(w) = self.windows.remove(&start) else {
            return;
        };
        self.buffered -= w.columns.len();
        if !w.columns.is_empty() {
            self.push_batch(
                start,
                w.pane,
                w.columns,
                w.ts_min,
                w.ts_max,
                w.ranges,
                reason,
                w.opened_at,
            );
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn push_batch(
        &mut self,
        start: i64,
        pane: u32,
        columns: Columns,
        ts_min: Option<i64>,
        ts_max: Option<i64>,
        mut ranges: Vec<PaneRange>,
        reason: CloseReason,
        opened_at: Instant,
    ) {
        ranges.sort_by_key(|r| r.partition);
        let mut invalid_by_kind = [0u64; ErrorKind::ALL.len()];
        let mut late = 0;
        for r in &ranges {
            if let Ok(i) = self
                .parts
                .binary_search_by_key(&r.partition, |p| p.partition)
            {
                let marks = &self.parts[i].marks;
                let lo = marks.partition_point(|(o, _)| *o < r.first);
                let hi = marks.partition_point(|(o, _)| *o <= r.last);
                for (_, m) in marks.range(lo..hi) {
                    match m {
                        Mark::Invalid(k) => invalid_by_kind[*k as usize] += 1,
                        Mark::Late => late += 1,
                    }
                }
            }
        }
        let sources = ranges
            .iter()
            .map(|r| SourceRange {
                topic: self.topic.clone(),
                partition: r.partition,
                first_offset: r.first,
                last_offset: r.last,
            })
            .collect();
        self.closed.push(Batch {
            seq: 0,
            columns,
            ts_min_ms: ts_min,
            ts_max_ms: ts_max,
            sources,
            invalid: Vec::new(),
            invalid_by_kind,
            late: Some(late),
            window: Some(WindowId {
                start_ms: start,
                end_ms: start + self.size_ms,
                pane,
            }),
            closed_by: reason,
            opened_at,
        });
    }

    /// Recomputes the watermark: the least of `progress - grace` over active
    /// partitions; none while an active partition has read nothing.
    fn refresh_watermark(&mut self) {
        let mut wm: Option<i64> = None;
        let mut any = false;
        for p in self.parts.iter().filter(|p| p.active()) {
            any = true;
            match p.progress {
                None => {
                    wm = None;
                    break;
                }
                Some(pr) => {
                    let v = pr.saturating_sub(self.grace_ms);
                    wm = Some(wm.map_or(v, |w| w.min(v)));
                }
            }
        }
        self.watermark = if any { wm } else { None };
    }

    fn close_by_watermark(&mut self) {
        let Some(wm) = self.watermark else {
            return;
        };
        if self.closed_through.is_some_and(|c| c >= wm) {
            return;
        }
        while let Some((&start, _)) = self.windows.first_key_value() {
            if start + self.size_ms > wm {
                break;
            }
            self.close_window(start, CloseReason::Watermark);
        }
        self.closed_through = Some(wm);
        let size = self.size_ms;
        self.closed_above.retain(|s| s + size > wm);
        self.resume_holders();
    }

    /// Pauses the partitions that run ahead of the watermark by more than a
    /// window while the open windows hold too much.
    ///
    /// The window of slack is the hysteresis: a resumed partition only pauses
    /// again once it is a whole window ahead. Without it, partitions that are
    /// nearly level (an ordinary interleaved stream whose open windows simply
    /// hold more than the bound) take turns holding the watermark and are
    /// paused and resumed on almost every event, which stalls the consumer
    /// while saving no memory: such a partition's windows are needed anyway.
    fn align(&mut self) {
        let wm = self.watermark;
        let slack = self.size_ms;
        for p in &mut self.parts {
            if p.paused || p.idle {
                continue;
            }
            let ahead = match (p.progress, wm) {
                (Some(pr), Some(w)) => pr.saturating_sub(self.grace_ms) > w.saturating_add(slack),
                (Some(_), None) => true,
                (None, _) => false,
            };
            if ahead {
                p.paused = true;
                self.flows.push(Flow::Pause(p.partition));
            }
        }
    }

    /// Resumes paused partitions once memory is back under half the bound, or
    /// when a paused partition is the one holding the watermark.
    fn resume_holders(&mut self) {
        let low = self.buffered <= self.cfg.max_buffered / 2;
        let wm = self.watermark;
        for p in &mut self.parts {
            if !p.paused {
                continue;
            }
            let holds = match (p.progress, wm) {
                (Some(pr), Some(w)) => pr.saturating_sub(self.grace_ms) <= w,
                _ => false,
            };
            // With no watermark, a paused partition holds it only when no
            // unpaused active partition is left to move it.
            if low || holds {
                p.paused = false;
                // Paused time is not silence.
                p.last_message = self.now;
                self.flows.push(Flow::Resume(p.partition));
            }
        }
        if wm.is_none() && !self.parts.iter().any(|p| p.active() && !p.paused) {
            for p in self.parts.iter_mut().filter(|p| p.paused) {
                p.paused = false;
                p.last_message = self.now;
                self.flows.push(Flow::Resume(p.partition));
            }
        }
    }

    /// Per partition, the lowest offset an open window needs (or the next to
    /// read), with the progress there; only those that changed since last time.
    /// Also returns how many input messages the new checkpoints move past.
    fn checkpoints(&mut self) -> (Vec<CommitPoint>, u64) {
        let mut out = Vec::new();
        let mut messages = 0;
        for i in 0..self.parts.len() {
            let partition = self.parts[i].partition;
            let Some(next) = self.parts[i].next_offset else {
                continue;
            };
            let mut cp = Checkpoint {
                offset: next,
                progress_ms: self.parts[i].progress,
                closed_through_ms: self.closed_through,
            };
            for w in self.windows.values() {
                for n in &w.needs {
                    if n.partition == partition && n.offset < cp.offset {
                        cp.offset = n.offset;
                        cp.progress_ms = n.progress;
                    }
                }
            }
            let part = &mut self.parts[i];
            if part.committed != Some(cp) {
                let from = part
                    .committed
                    .map(|c| c.offset)
                    .or(part.base)
                    .unwrap_or(cp.offset);
                messages += (cp.offset - from).max(0) as u64;
                part.committed = Some(cp);
                out.push(CommitPoint {
                    topic: self.topic.clone(),
                    partition,
                    offset: cp.offset,
                    checkpoint: Some(cp),
                });
            }
        }
        (out, messages)
    }

    /// Drops marks no open or future pane can contain.
    fn prune_marks(&mut self) {
        for part in &mut self.parts {
            let mut floor = part.next_offset.unwrap_or(i64::MAX);
            for w in self.windows.values() {
                for r in &w.ranges {
                    if r.partition == part.partition {
                        floor = floor.min(r.first);
                    }
                }
            }
            while part.marks.front().is_some_and(|(o, _)| *o < floor) {
                part.marks.pop_front();
            }
        }
    }

    fn part_index(&mut self, partition: i32, now: Instant) -> usize {
        match self.parts.binary_search_by_key(&partition, |p| p.partition) {
            Ok(i) => i,
            Err(i) => {
                self.parts.insert(i, Part::new(partition, now));
                self.refresh_watermark();
                self.arm_at(now + self.cfg.idle);
                i
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::event::{Field, FIELD_COUNT};
    use std::borrow::Cow;

    const S: i64 = 1000;

    fn cfg() -> WindowConfig {
        WindowConfig {
            size: Duration::from_secs(10),
            hop: Duration::from_secs(10),
            grace: Duration::from_secs(5),
            idle: Duration::from_secs(30),
            max_wait: Duration::from_secs(60),
            max_events: 100,
            max_buffered: 1_000_000,
            max_dead_letters: 1000,
            late: LatePolicy::DeadLetter,
        }
    }

    fn ev(user: &str, ts_ms: i64) -> LoginEvent<'_> {
        let mut fields: [Option<Cow<str>>; FIELD_COUNT] = Default::default();
        fields[Field::UserId.index()] = Some(Cow::Borrowed(user));
        LoginEvent {
            fields,
            timestamp_ms: Some(ts_ms),
        }
    }

    struct Feed {
        w: Windower,
        t0: Instant,
        next: BTreeMap<i32, i64>,
        works: Vec<Work>,
    }

    impl Feed {
        fn new(cfg: WindowConfig, partitions: &[i32]) -> Feed {
            let t0 = Instant::now();
            let mut w = Windower::new(cfg, "user-login");
            for p in partitions {
                w.assign(*p, None, None, t0);
            }
            Feed {
                w,
                t0,
                next: BTreeMap::new(),
                works: Vec::new(),
            }
        }
        fn at(&self, secs: u64) -> Instant {
            self.t0 + Duration::from_secs(secs)
        }
        /// A valid event at `ts_ms` on `partition`, read at `t` seconds.
        fn event(&mut self, partition: i32, ts_ms: i64, t: u64) -> i64 {
            let o = *self.next.entry(partition).or_insert(0);
            self.next.insert(partition, o + 1);
            let user = format!("p{partition}o{o}");
            let now = self.at(t);
            self.w
                .push_event(partition, o, None, b"{}", &ev(&user, ts_ms), now);
            self.collect(now);
            o
        }
        fn invalid(&mut self, partition: i32, t: u64) -> i64 {
            let o = *self.next.entry(partition).or_insert(0);
            self.next.insert(partition, o + 1);
            let now = self.at(t);
            let err = InvalidEvent {
                kind: ErrorKind::NotJson,
                reason: "x".into(),
            };
            self.w.push_invalid(partition, o, None, b"?", err, now);
            self.collect(now);
            o
        }
        fn tick(&mut self, t: u64) {
            let now = self.at(t);
            self.w.poll(now);
            self.collect(now);
        }
        fn collect(&mut self, now: Instant) {
            if let Some(work) = self.w.take_work(now, false) {
                self.works.push(work);
            }
        }
        fn batches(&self) -> Vec<&Batch> {
            self.works.iter().flat_map(|w| &w.batches).collect()
        }
        fn users(b: &Batch) -> Vec<String> {
            b.columns
                .column(Field::UserId)
                .iter()
                .map(|u| u.unwrap().to_string())
                .collect()
        }
    }

    /// A bounded run: a partition read to its end stops holding the
    /// watermark at once (no idle wait), and finishing closes every open
    /// window by `end` and commits the last offsets read.
    #[test]
    fn a_read_partition_frees_the_watermark_and_finishing_closes_the_rest() {
        let mut f = Feed::new(cfg(), &[0, 1]);
        f.event(0, S, 0);
        f.event(1, 2 * S, 0);
        f.event(0, 31 * S, 0);
        assert!(
            f.batches().is_empty(),
            "partition 1 holds the watermark at 2 s"
        );
        f.w.end_partition(1, f.at(0));
        f.collect(f.at(0));
        let closed: Vec<_> = f
            .batches()
            .iter()
            .map(|b| (b.window.unwrap().start_ms, b.closed_by))
            .collect();
        assert_eq!(closed, vec![(0, CloseReason::Watermark)]);
        let last =
            f.w.finish(f.at(0))
                .expect("the last window and the offsets");
        let closed: Vec<_> = last
            .batches
            .iter()
            .map(|b| (b.window.unwrap().start_ms, b.closed_by))
            .collect();
        assert_eq!(closed, vec![(30 * S, CloseReason::End)]);
        let commit: Vec<(i32, i64)> = last
            .commit
            .iter()
            .map(|c| (c.partition, c.offset))
            .collect();
        assert_eq!(commit, vec![(0, 2), (1, 1)]);
        assert_eq!(f.w.open_windows(), 0);
        assert!(f.w.finish(f.at(0)).is_none(), "nothing left");
    }

    #[test]
    fn windows_are_aligned_to_the_epoch_and_hop_multiplies_them() {
        let w = Windower::new(cfg(), "t");
        assert_eq!(w.window_starts(12_345).collect::<Vec<_>>(), vec![10_000]);
        assert_eq!(w.window_starts(-1).collect::<Vec<_>>(), vec![-10_000]);
        let mut c = cfg();
        c.hop = Duration::from_secs(5);
        let w = Windower::new(c, "t");
        assert_eq!(
            w.window_starts(12_345).collect::<Vec<_>>(),
            vec![5_000, 10_000]
        );
        assert_eq!(
            w.window_starts(10_000).collect::<Vec<_>>(),
            vec![5_000, 10_000]
        );
    }

    #[test]
    fn a_window_closes_by_watermark_only_when_every_partition_passed_its_end() {
        let mut f = Feed::new(cfg(), &[0, 1]);
        f.event(0, S, 0);
        f.event(0, 2 * S, 0);
        f.event(0, 16 * S, 0); // p0 progress 16s - grace 5s = 11s > 10s
        assert!(
            f.batches().is_empty(),
            "p1 has read nothing: it holds the window"
        );
        f.event(1, 3 * S, 0);
        assert!(f.batches().is_empty());
        assert_eq!(f.w.watermark(), Some(-2 * S));
        f.event(1, 14_999, 0); // 9.999s: not yet
        assert!(f.batches().is_empty());
        f.event(1, 15 * S, 0); // 10s: the end is reached
        let b = f.batches();
        assert_eq!(b.len(), 1);
        assert_eq!(b[0].closed_by, CloseReason::Watermark);
        assert_eq!(
            b[0].window,
            Some(WindowId {
                start_ms: 0,
                end_ms: 10 * S,
                pane: 0
            })
        );
        assert_eq!(Feed::users(b[0]), vec!["p0o0", "p0o1", "p1o0"]);
        let ranges: Vec<_> = b[0]
            .sources
            .iter()
            .map(|s| (s.partition, s.first_offset, s.last_offset))
            .collect();
        assert_eq!(ranges, vec![(0, 0, 1), (1, 0, 0)]);
    }

    #[test]
    fn grace_admits_stragglers_and_later_ones_are_late_dead_letters() {
        let mut f = Feed::new(cfg(), &[0]);
        f.event(0, 20 * S, 0); // window [20,30)
        f.event(0, 14 * S, 0); // [10,20) ends 20 > 20 - 5: on time
        f.invalid(0, 0);
        f.event(0, 9_999, 0); // [0,10) ends 10 <= 15: late
        f.event(0, 40 * S, 0); // closes [10,20) and [20,30)
        let b = f.batches();
        assert_eq!(b.len(), 2);
        assert_eq!(Feed::users(b[0]), vec!["p0o1"]);
        assert_eq!(Feed::users(b[1]), vec!["p0o0"]);
        let late: Vec<_> = f
            .works
            .iter()
            .flat_map(|w| &w.dead_letters)
            .map(|d| (d.offset, d.kind))
            .collect();
        assert_eq!(late, vec![(2, ErrorKind::NotJson), (3, ErrorKind::Late)]);
        assert_eq!(f.w.late_total(), 1);
        // [20,30) read offsets 0..0 only; [10,20) offset 1 only: the invalid
        // (2) and the late (3) event lie in neither range.
        assert_eq!(b[0].late, Some(0));

        // A window whose range spans them counts them.
        let mut f = Feed::new(cfg(), &[0]);
        f.event(0, 20 * S, 0);
        f.invalid(0, 0);
        f.event(0, S, 0); // late
        f.event(0, 21 * S, 0);
        f.event(0, 40 * S, 0);
        let b = f.batches();
        assert_eq!(b.len(), 1);
        assert_eq!((b[0].late, b[0].invalid_by_kind[0]), (Some(1), 1));
    }

    #[test]
    fn late_events_are_only_counted_with_late_drop() {
        let mut c = cfg();
        c.late = LatePolicy::Drop;
        let mut f = Feed::new(c, &[0]);
        f.event(0, 30 * S, 0);
        f.event(0, S, 0);
        f.tick(61);
        assert_eq!(f.w.late_total(), 1);
        assert!(f.works.iter().all(|w| w.dead_letters.is_empty()));
    }

    #[test]
    fn a_silent_partition_stops_holding_windows_after_idle() {
        let mut f = Feed::new(cfg(), &[0, 1]);
        f.event(1, S, 0);
        f.event(0, 2 * S, 5);
        f.event(0, 30 * S, 10);
        assert!(f.batches().is_empty(), "p1 holds [0,10)");
        f.tick(29);
        assert!(f.batches().is_empty(), "p1 silent for 29s only");
        f.tick(30);
        let b = f.batches();
        assert_eq!(b.len(), 1);
        assert_eq!(b[0].closed_by, CloseReason::Watermark);
        // p1 speaks again: it holds the watermark again, and its event for the
        // closed window is late.
        f.event(1, 3 * S, 31);
        assert_eq!(f.w.late_total(), 1);
        assert_eq!(f.w.watermark(), Some(-2 * S));
    }

    #[test]
    fn wait_closes_a_window_after_max_wait_and_makes_its_stragglers_late() {
        let mut f = Feed::new(cfg(), &[0]);
        f.event(0, S, 0);
        assert_eq!(f.w.deadline(), Some(f.at(30)), "idle is checked first");
        f.tick(30);
        f.event(0, 2 * S, 31);
        f.tick(59);
        assert!(f.batches().is_empty());
        f.tick(60);
        let b = f.batches();
        assert_eq!(b.len(), 1);
        assert_eq!(b[0].closed_by, CloseReason::Wait);
        assert_eq!(b[0].valid(), 2);
        f.event(0, 3 * S, 61);
        assert_eq!(f.w.late_total(), 1, "its window closed by wait");
        assert_eq!(f.w.open_windows(), 0);
    }

    #[test]
    fn count_splits_a_window_into_panes() {
        let mut c = cfg();
        c.max_events = 2;
        let mut f = Feed::new(c, &[0]);
        for ts in [1, 2, 3, 4, 5] {
            f.event(0, ts * S, 0);
        }
        f.event(0, 20 * S, 0);
        let b = f.batches();
        let panes: Vec<_> = b
            .iter()
            .map(|b| (b.window.unwrap().pane, b.valid(), b.closed_by))
            .collect();
        assert_eq!(
            panes,
            vec![
                (0, 2, CloseReason::Count),
                (1, 2, CloseReason::Count),
                (2, 1, CloseReason::Watermark)
            ]
        );
    }

    #[test]
    fn the_commit_is_the_lowest_offset_an_open_window_needs_with_its_progress() {
        let mut f = Feed::new(cfg(), &[0]);
        f.event(0, S, 0); // o0 in [0,10)
        f.event(0, 12 * S, 0); // o1 in [10,20)
        f.invalid(0, 0); // o2
        f.event(0, 16 * S, 0); // o3: closes [0,10)
        let work = f.works.last().unwrap();
        assert_eq!(work.batches.len(), 1);
        let cp = work.commit[0].checkpoint.unwrap();
        assert_eq!(cp.offset, work.commit[0].offset);
        // [10,20) still needs o1; the progress before o1 was 1s.
        assert_eq!(
            cp,
            Checkpoint {
                offset: 1,
                progress_ms: Some(S),
                closed_through_ms: Some(11 * S)
            }
        );
        assert_eq!(work.messages, 1);
        // Closing [10,20) opens [40,50), which needs o4 itself.
        f.event(0, 40 * S, 0);
        let last = f.works.last().unwrap();
        assert_eq!(last.commit[0].offset, 4);
        assert_eq!(last.messages, 3);
        // Nothing open: the commit is the next offset to read.
        f.tick(60);
        let last = f.works.last().unwrap();
        assert_eq!(last.batches[0].closed_by, CloseReason::Wait);
        assert_eq!(last.commit[0].offset, 5);
    }

    #[test]
    fn a_restart_from_a_checkpoint_judges_events_as_the_original_run() {
        // o0 1s; o1 12s; o2 16s closes [0,10) while [10,20) needs o1; o3 14s
        // is on time (20 > 16 - 5); o4 3s is late; o5 30s closes [10,20).
        let seq = [1, 12, 16, 14, 3, 30];
        let mut a = Feed::new(cfg(), &[0]);
        for ts in seq {
            a.event(0, ts * S, 0);
        }
        let first = &a.works[0];
        assert_eq!(first.batches.len(), 1);
        let c = &first.commit[0];
        let cp = c.checkpoint.unwrap();
        assert_eq!((c.offset, cp.offset, cp.progress_ms), (1, 1, Some(S)));

        // A restart reads from o1 with the progress the original had there.
        let mut b = Feed::new(cfg(), &[]);
        b.w.assign(0, Some(cp), Some(cp.offset), b.t0);
        b.next.insert(0, 1);
        for ts in &seq[1..] {
            b.event(0, ts * S, 0);
        }
        let ids = |f: &Feed| -> Vec<(WindowId, Vec<String>)> {
            f.batches()
                .iter()
                .map(|b| (b.window.unwrap(), Feed::users(b)))
                .collect()
        };
        assert_eq!(ids(&a)[1..], ids(&b)[..]);
        assert_eq!(ids(&b)[0].1, vec!["p0o1", "p0o2", "p0o3"]);
        assert_eq!((a.w.late_total(), b.w.late_total()), (1, 1));
    }

    #[test]
    fn a_window_emitted_before_a_restart_is_not_emitted_again() {
        let cp = Checkpoint {
            offset: 0,
            progress_ms: None,
            closed_through_ms: Some(10 * S),
        };
        let mut f = Feed::new(cfg(), &[]);
        f.w.assign(0, Some(cp), Some(0), f.t0);
        f.event(0, 5 * S, 0); // [0,10) was emitted before the restart
        f.event(0, 12 * S, 0);
        f.event(0, 30 * S, 0);
        let starts: Vec<_> = f
            .batches()
            .iter()
            .map(|b| b.window.unwrap().start_ms)
            .collect();
        assert_eq!(starts, vec![10 * S]);
        assert_eq!(f.w.replayed_total(), 1);
        assert_eq!(f.w.late_total(), 0);
    }

    #[test]
    fn partitions_running_ahead_are_paused_and_resumed_when_the_slow_one_catches_up() {
        let mut c = cfg();
        c.max_buffered = 4;
        let mut f = Feed::new(c, &[0, 1]);
        f.event(1, S, 0);
        for ts in [1, 11, 21, 31, 41] {
            f.event(0, ts * S, 0);
        }
        assert_eq!(f.w.take_flows(), vec![Flow::Pause(0)]);
        assert_eq!(f.w.paused(), vec![0]);
        // The slow partition is never paused; as it moves, windows close.
        for ts in [12, 22, 32, 42] {
            f.event(1, ts * S, 0);
        }
        assert_eq!(f.w.take_flows(), vec![Flow::Resume(0)]);
        assert!(f.w.paused().is_empty());
    }

    #[test]
    fn partitions_less_than_a_window_apart_are_never_paused() {
        // Open windows hold far more than the bound, but the partitions take
        // turns holding the watermark within one window of each other:
        // pausing them would only stall the stream.
        let mut c = cfg();
        c.max_buffered = 4;
        let mut f = Feed::new(c, &[0, 1]);
        for ms in (0..200).map(|i| i * 400) {
            f.event(0, S + ms, 0);
            f.event(1, S + ms + 200, 0);
        }
        assert!(f.w.take_flows().is_empty());
        assert!(!f.batches().is_empty());
    }

    #[test]
    fn held_dead_letters_are_handed_over_at_the_byte_bound() {
        let mut f = Feed::new(cfg(), &[0]);
        let big = vec![b'#'; MAX_HELD_INVALID_BYTES / 4];
        for o in 0..9 {
            let err = InvalidEvent {
                kind: ErrorKind::NotJson,
                reason: "x".into(),
            };
            f.w.push_invalid(0, o, None, &big, err, f.t0);
            f.collect(f.t0);
        }
        let sizes: Vec<_> = f.works.iter().map(|w| w.dead_letters.len()).collect();
        assert_eq!(sizes, vec![4, 4]);
    }

    #[test]
    fn messages_below_a_checkpoint_ahead_of_the_commit_are_skipped_and_it_is_committed_again() {
        // Checkpoint at o3 stored, the process died before committing it: the
        // group's committed offset is still 1.
        let cp = Checkpoint {
            offset: 3,
            progress_ms: Some(12 * S),
            closed_through_ms: Some(10 * S),
        };
        let mut f = Feed::new(cfg(), &[]);
        f.w.assign(0, Some(cp), Some(1), f.t0);
        f.next.insert(0, 1);
        f.event(0, 12 * S, 0); // o1: already in a delivered window
        f.invalid(0, 0); // o2: already dead-lettered
        assert_eq!(f.w.replayed_total(), 2);
        assert!(f
            .w
            .take_work(f.t0, true)
            .is_some_and(|w| w.dead_letters.is_empty()
                && w.commit
                    .iter()
                    .any(|c| c.offset == 3 && c.checkpoint == Some(cp))));
        f.event(0, 14 * S, 0); // o3: judged with the checkpoint's progress
        f.event(0, 30 * S, 0);
        let users: Vec<_> = f.batches().iter().flat_map(|b| Feed::users(b)).collect();
        assert_eq!(users, vec!["p0o3"]);
    }
}
