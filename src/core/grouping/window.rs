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
//! - **Wait** is for a stream that has gone quiet: when no partition has sent
//!   anything for `max_wait`, every open window closes. Silence is measured
//!   on the input, never as a window's age, and time in which the service
//!   held consumption back (delivery behind, alignment) is not silence, so on
//!   flowing traffic windows close by watermark and grace applies.
//!   **Count** bounds the valid events one window holds in memory: reaching
//!   it emits the window so far as a pane and the window goes on in the next
//!   pane.
//! - **Closures are positions.** A closure that a partition's own progress
//!   does not imply (by wait, or by the watermark while the partition was
//!   idle) makes that partition's later events for the closed windows late.
//!   It is recorded as a [`Closure`] at the partition's position, kept in its
//!   checkpoint, and stored *before* the packets it closes are delivered
//!   ([`Work::record_first`]): a replay applies it at the same offset and
//!   closes the same windows for the same reason, so an event is never
//!   counted in one run and late in its replay, and a `packet_id` never
//!   carries two contents. All of this state is per partition: a partition
//!   that moves to another instance brings its own, and never changes how
//!   the partitions already read there are judged.
//! - **Offsets.** The offset to commit for a partition is the lowest one that
//!   an open window still needs; every message below it is in an emitted
//!   window, a dead letter, or counted late. With it goes a checkpoint (the
//!   partition's progress *at that offset*, what was closed and emitted for
//!   it, and the closures decided after it), stored before the commit
//!   ([`crate::commit::checkpoint`]), so that a restart re-reads from the
//!   offset with exactly the state the original run had there and judges
//!   every event the same way.
//! - **Alignment.** When the open windows hold more than `max_buffered` valid
//!   events, partitions that run ahead of the watermark are paused until the
//!   slow ones catch up (the shell applies [`Flow`] changes to the consumer).
//!   The partition that holds the watermark is never paused, so it always
//!   moves.
//!
//! The core is synchronous and takes the current `Instant` as an argument, so
//! tests drive wall-clock time by hand.

use std::collections::btree_map::Entry;
use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::core::event::{ErrorKind, InvalidEvent, LoginEvent};
use crate::core::grouping::arrival::MAX_HELD_INVALID_BYTES;
use crate::work::{
    Batch, CloseReason, Columns, CommitPoint, InvalidMessage, SourceRange, WindowId, Work,
};
pub use crate::work::{Checkpoint, Closure, PaneMark};

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
    /// Windows ending at or before this were emitted with every event of
    /// this partition read before their closure.
    emitted: Option<i64>,
    /// Closures at positions of this partition, by offset: those before
    /// `pending` apply from here on; the others (restored from a checkpoint)
    /// apply once the partition has read every message below their offset.
    closures: Vec<Closure>,
    pending: usize,
    /// The greatest `through_ms` of closures dropped once a stored
    /// checkpoint covered them.
    floor: Option<i64>,
    /// Windows ending at or before this are closed for this partition here.
    closed: Option<i64>,
    /// Why `closed` last moved: a replayed closure closes its windows for
    /// the same reason as the original.
    closed_reason: CloseReason,
    /// Restored from a checkpoint ahead of the committed offset: messages
    /// below it are already delivered and are skipped as replayed.
    resume_at: Option<i64>,
    /// The next offset to read; `None` until a message is read or a checkpoint restored.
    next_offset: Option<i64>,
    /// Where reading starts when nothing was read: the restored checkpoint's
    /// offset or the committed offset.
    start: Option<i64>,
    /// The committed offset found at assignment.
    committed_at_assign: Option<i64>,
    last_message: Instant,
    idle: bool,
    paused: bool,
    /// Offsets of invalid and late messages not yet below every open pane.
    marks: VecDeque<(i64, Mark)>,
    /// The last checkpoint handed out for commit, to skip unchanged ones.
    committed: Option<Checkpoint>,
    /// The last checkpoint known to be stored (restored, or stored after a
    /// delivery): what a record made before delivery builds on.
    stored: Option<Checkpoint>,
    /// Closures were decided by wall clock since the last work.
    dirty: bool,
    /// The first offset this instance read or restored, for counting committed messages.
    base: Option<i64>,
    /// The dead letters of messages below this offset were handed out (by
    /// this run, or before a restart as its checkpoint says): not again.
    dead_letters_through: Option<i64>,
    /// Restored: windows whose panes went out before the restart.
    pane_marks: Vec<PaneMark>,
}

impl Part {
    fn new(partition: i32, now: Instant) -> Part {
        Part {
            partition,
            progress: None,
            emitted: None,
            closures: Vec::new(),
            pending: 0,
            floor: None,
            closed: None,
            closed_reason: CloseReason::Watermark,
            resume_at: None,
            next_offset: None,
            start: None,
            committed_at_assign: None,
            last_message: now,
            idle: false,
            paused: false,
            marks: VecDeque::new(),
            committed: None,
            stored: None,
            dirty: false,
            base: None,
            dead_letters_through: None,
            pane_marks: Vec::new(),
        }
    }

    fn active(&self) -> bool {
        !self.idle
    }

    /// Where the partition stands: every message below it is read.
    fn position(&self) -> Option<i64> {
        self.next_offset.or(self.start)
    }

    /// Applies the restored closures whose offset is at or below `offset`;
    /// whether `closed` moved.
    fn apply_closures(&mut self, offset: i64) -> bool {
        let mut moved = false;
        while let Some(c) = self.closures.get(self.pending) {
            if c.offset > offset {
                break;
            }
            if self.closed.is_none_or(|x| c.through_ms > x) {
                self.closed = Some(c.through_ms);
                self.closed_reason = c.reason;
                moved = true;
            }
            self.pending += 1;
        }
        moved
    }

    /// Records a closure decided here, now: it applies from the current
    /// position on.
    fn record(&mut self, through_ms: i64, reason: CloseReason) {
        self.closed = Some(through_ms);
        self.closed_reason = reason;
        let Some(offset) = self.position() else {
            return;
        };
        self.dirty = true;
        // Closures decided at one position: only the widest matters.
        if self.pending > 0 && self.closures[self.pending - 1].offset == offset {
            let c = &mut self.closures[self.pending - 1];
            if through_ms > c.through_ms {
                c.through_ms = through_ms;
                c.reason = reason;
            }
            return;
        }
        self.closures.insert(
            self.pending,
            Closure {
                offset,
                through_ms,
                reason,
            },
        );
        self.pending += 1;
    }

    /// The state at `offset` (at or below the position, with `progress_ms`
    /// the progress there): the closures at or below it folded into
    /// `closed_ms`, later ones kept unless the progress alone makes them moot.
    fn checkpoint_at(&self, offset: i64, progress_ms: Option<i64>, grace_ms: i64) -> Checkpoint {
        let mut closed = self.floor;
        let mut closures = Vec::new();
        let own = progress_ms.map(|p| p.saturating_sub(grace_ms));
        for c in &self.closures {
            if c.offset <= offset {
                closed = closed.max(Some(c.through_ms));
            } else if own.is_none_or(|o| c.through_ms > o) {
                closures.push(*c);
            }
        }
        Checkpoint {
            offset,
            progress_ms,
            closed_ms: closed,
            emitted_ms: self.emitted,
            closures,
            // The shell names what it committed since (see `Ledger`).
            previous: self.committed_at_assign,
            dead_letters_through: self.dead_letters_through,
            // Filled in by the windower, which has the windows.
            panes: Vec::new(),
        }
    }

    /// The restored pane mark of the window at `start`.
    fn pane_mark(&self, start: i64) -> Option<&PaneMark> {
        self.pane_marks.iter().find(|m| m.start_ms == start)
    }

    /// Whether the dead letter of the message at `offset` was handed out
    /// already (before a restart).
    fn dead_lettered(&self, offset: i64) -> bool {
        self.dead_letters_through.is_some_and(|t| offset < t)
    }

    /// The least event time this partition may still add to a window: its
    /// progress minus grace, or what closures closed for it, whichever is more.
    fn bound(&self, grace_ms: i64) -> Option<i64> {
        let own = self.progress.map(|p| p.saturating_sub(grace_ms));
        own.max(self.closed)
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
    /// Per partition, the last offset of its events in the panes emitted.
    emitted_through: Vec<(i32, i64)>,
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
    /// Every window ending at or before this was closed by this instance.
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
    /// When the last message of any partition was read, or consumption was
    /// last let go after the service held it: the input is silent from here.
    last_input: Instant,
    /// Consumption is held back by the service (delivery behind): no
    /// silence is counted meanwhile.
    held: bool,
    late_total: u64,
    replayed_total: u64,
    next_check: Option<Instant>,
    flows: Vec<Flow>,
    next_seq: u64,
    /// The latest `now` seen, for state changes made outside a call that carries one.
    now: Instant,
    /// A closure by [`Windower::follow`] moved the partitions' checkpoints
    /// while closing no window: the next work carries them.
    followed: bool,
}

impl Windower {
    pub fn new(cfg: WindowConfig, topic: &str) -> Windower {
        let ms = |d: Duration| d.as_millis().min(i64::MAX as u128) as i64;
        let size_ms = ms(cfg.size).max(1);
        let hop_ms = ms(cfg.hop).clamp(1, size_ms);
        let now = Instant::now();
        Windower {
            cfg,
            size_ms,
            hop_ms,
            grace_ms: ms(cfg.grace),
            topic: Arc::from(topic),
            parts: Vec::new(),
            windows: BTreeMap::new(),
            closed_through: None,
            watermark: None,
            buffered: 0,
            closed: Vec::new(),
            dead_letters: Vec::new(),
            dead_letter_bytes: 0,
            loose: 0,
            loose_since: None,
            last_input: now,
            held: false,
            late_total: 0,
            replayed_total: 0,
            next_check: None,
            flows: Vec::new(),
            next_seq: 0,
            now,
            followed: false,
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
    ///
    /// The checkpoint's state is this partition's alone: closures another
    /// instance decided for it apply to its messages, never to the other
    /// partitions read here.
    pub fn assign(
        &mut self,
        partition: i32,
        checkpoint: Option<Checkpoint>,
        committed: Option<i64>,
        now: Instant,
    ) {
        let i = self.part_index(partition, now);
        let part = &mut self.parts[i];
        part.committed_at_assign = committed;
        part.start = committed;
        if let Some(c) = checkpoint {
            part.progress = c.progress_ms;
            part.emitted = c.emitted_ms;
            part.floor = c.closed_ms;
            part.closed = c.closed_ms;
            part.closures = c
                .closures
                .iter()
                .filter(|x| x.offset > c.offset)
                .copied()
                .collect();
            part.closures.sort_by_key(|x| x.offset);
            part.pending = 0;
            part.apply_closures(c.offset);
            part.resume_at = Some(c.offset);
            part.next_offset = Some(c.offset);
            part.start = Some(c.offset);
            part.base = Some(c.offset);
            part.dead_letters_through = c.dead_letters_through;
            part.pane_marks = c.panes.clone();
            part.committed = Some(c.clone());
            part.stored = Some(c.clone());
            if committed.is_none_or(|o| o < c.offset) {
                part.committed = None;
                self.loose(now);
            }
        }
        self.last_input = now;
        self.refresh_watermark();
        self.close_by_watermark();
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

    /// Consumption is held back by the service itself (delivery is behind)
    /// or let go again. Held time is not silence: when it is let go, the
    /// input and every partition count as having just spoken.
    pub fn hold(&mut self, held: bool, now: Instant) {
        if held == self.held {
            return;
        }
        self.held = held;
        self.now = now;
        if !held {
            self.last_input = now;
            for p in &mut self.parts {
                p.last_message = now;
            }
            self.arm_at(now + self.cfg.max_wait.min(self.cfg.idle));
        }
    }

    /// The checkpoints in `points` are stored: closures at or below their
    /// offsets are in them and need not be kept here any more.
    pub fn stored(&mut self, points: &[CommitPoint]) {
        for point in points {
            let Some(c) = &point.checkpoint else { continue };
            let Ok(i) = self
                .parts
                .binary_search_by_key(&point.partition, |p| p.partition)
            else {
                continue;
            };
            let part = &mut self.parts[i];
            let keep = part.closures.partition_point(|x| x.offset <= c.offset);
            let keep = keep.min(part.pending);
            for x in part.closures.drain(..keep) {
                part.floor = part.floor.max(Some(x.through_ms));
            }
            part.pending -= keep;
            part.stored = Some(c.clone());
        }
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
        if let Some((&last, _)) = self.windows.last_key_value() {
            self.close_through(last + self.size_ms, CloseReason::End);
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
            record_first: Vec::new(),
            assignment: 0,
        })
    }

    /// Adds a valid event read at `offset` of `partition`.
    pub fn push_event(
        &mut self,
        partition: i32,
        offset: i64,
        key: Option<&[u8]>,
        payload: &[u8],
        event: &LoginEvent<'_>,
        now: Instant,
    ) {
        self.push_record(partition, offset, key, payload, event, None, now)
    }

    /// Adds a valid event read at `offset` of `partition` from a record
    /// stamped `record_ms` (its Kafka timestamp). The event counts in the
    /// windows of its own time; when it is ahead of its partition's progress
    /// by more than grace, it moves the progress no further than the
    /// record's timestamp: one event from a client whose clock is far ahead
    /// cannot make the events after it late.
    #[allow(clippy::too_many_arguments)]
    pub fn push_record(
        &mut self,
        partition: i32,
        offset: i64,
        key: Option<&[u8]>,
        payload: &[u8],
        event: &LoginEvent<'_>,
        record_ms: Option<i64>,
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
        self.arrive(i, offset);
        let prev = self.parts[i].progress;
        self.touch(i, offset, now);

        let (mut on_time, mut replayed, mut closed_late) = (0u32, false, false);
        let size = self.size_ms;
        for start in self.window_starts(ts) {
            match self.verdict(i, prev, start, offset) {
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
        let moved = part.apply_closures(offset + 1);
        // A jump ahead of the partition's progress by more than grace goes
        // no further than the record's own timestamp: a clock far ahead is
        // one event's error, while a partition that resumes after a pause
        // is stamped as late as its events. Small steps move freely, so
        // event time may run ahead of the records' (synthetic input
        // produced at once) without holding the partition back.
        let reach = match (prev, record_ms) {
            (Some(p), Some(r)) if ts > p.saturating_add(self.grace_ms) => ts.min(r.max(p)),
            _ => ts,
        };
        if prev.is_none_or(|p| reach > p) {
            part.progress = Some(reach);
        }
        if moved || prev != self.parts[i].progress {
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
        self.arrive(i, offset);
        self.touch(i, offset, now);
        self.parts[i]
            .marks
            .push_back((offset, Mark::Invalid(error.kind)));
        // One sent before a restart is counted in its windows, not sent again.
        if !self.parts[i].dead_lettered(offset) {
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
        }
        self.loose(now);
        if self.parts[i].apply_closures(offset + 1) {
            self.refresh_watermark();
            self.close_by_watermark();
        }
    }

    /// Applies the wall-clock rules, which look at the input, never at a
    /// window's age: when no partition has sent anything for `max_wait`
    /// (time the service held consumption back not counted) every open
    /// window closes; a partition silent for `idle` while others speak stops
    /// holding the watermark. Each such closure is recorded at every
    /// partition's position, so a replay decides it at the same place.
    pub fn poll(&mut self, now: Instant) {
        if self.next_check.is_none_or(|t| now < t) {
            return;
        }
        self.now = now;
        self.next_check = None;
        if self.held {
            // Re-armed when consumption is let go.
            return;
        }
        let mut idle_changed = false;
        for part in &mut self.parts {
            // A partition short of a recorded closure has messages still to
            // read (the closure was decided after them): not idle.
            let replaying = part.pending < part.closures.len();
            if !part.idle && !part.paused && !replaying {
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
        // A replay short of a recorded closure knows more messages exist:
        // that is not silence.
        let replaying = self.parts.iter().any(|p| p.pending < p.closures.len());
        if !self.windows.is_empty() && !replaying {
            let silent_until = self.last_input + self.cfg.max_wait;
            if now < silent_until {
                self.arm_at(silent_until);
            } else if self.parts.iter().any(|p| p.paused) {
                // Alignment holds partitions back on purpose, so the input
                // is not silent yet; but the partitions it waits for have
                // nothing to send. Let the held ones go: they either speak,
                // or fall silent too and the windows close a wait later.
                for p in self.parts.iter_mut().filter(|p| p.paused) {
                    p.paused = false;
                    p.last_message = now;
                    self.flows.push(Flow::Resume(p.partition));
                }
                self.last_input = now;
                self.arm_at(now + self.cfg.max_wait);
            } else {
                let last = *self.windows.last_key_value().expect("not empty").0;
                self.close_through(last + self.size_ms, CloseReason::Wait);
            }
        }
        if let Some(t) = self.loose_since {
            self.arm_at(t + self.cfg.max_wait);
        }
    }

    /// The earliest instant at which [`Windower::poll`] has something to do.
    pub fn deadline(&self) -> Option<Instant> {
        self.next_check
    }

    /// Windows ending at or before this are closed here.
    pub fn closed_through(&self) -> Option<i64> {
        self.closed_through
    }

    /// Whether the input has gone quiet here: no window open, nothing read
    /// for `max_wait` (held time aside), no recorded closure still to reach.
    pub fn quiet(&self, now: Instant) -> bool {
        self.windows.is_empty()
            && !self.held
            && now >= self.last_input + self.cfg.max_wait
            && self.parts.iter().all(|p| p.pending >= p.closures.len())
    }

    /// Closes the windows ending at or before `through` (a window end) for
    /// every partition read here, as the wait rule does, and records the
    /// closure at each partition's position: a partition that has gone
    /// quiet follows the windows its group has closed without it, so that
    /// they need not wait for it ([`crate::core::grouping::split`]).
    /// Nothing happens before the partitions have a position, or when they
    /// are closed that far already.
    pub fn follow(&mut self, through: i64, now: Instant) {
        self.now = now;
        if self.closed_through.is_some_and(|c| c >= through)
            || self.parts.iter().any(|p| p.position().is_none())
        {
            return;
        }
        self.close_through(through, CloseReason::Wait);
        self.followed = true;
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
            || self.followed
            || self.dead_letters.len() >= self.cfg.max_dead_letters
            || self.dead_letter_bytes >= MAX_HELD_INVALID_BYTES
            || self
                .loose_since
                .is_some_and(|t| now >= t + self.cfg.max_wait)
            || (force && self.loose > 0);
        if !due {
            return None;
        }
        let record_first = self.records();
        // Every dead letter of a message read so far goes out with this
        // work: its partitions' checkpoints say so (the others need not
        // change for it).
        for part in &mut self.parts {
            let sends = self
                .dead_letters
                .iter()
                .any(|d| d.partition == part.partition);
            if let (true, Some(next)) = (sends, part.next_offset) {
                part.dead_letters_through = part.dead_letters_through.max(Some(next));
            }
        }
        let (commit, messages) = self.checkpoints();
        let batches = std::mem::take(&mut self.closed);
        self.followed = false;
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
            record_first,
            assignment: 0,
        })
    }

    fn verdict(&self, i: usize, prev: Option<i64>, start: i64, offset: i64) -> Verdict {
        let end = start + self.size_ms;
        let part = &self.parts[i];
        let in_emitted_pane = || {
            part.pane_mark(start)
                .and_then(|m| m.through)
                .is_some_and(|t| offset <= t)
        };
        if prev.is_some_and(|p| end <= p - self.grace_ms) {
            Verdict::LateForPartition
        } else if part.closed.is_some_and(|c| end <= c) {
            Verdict::LateClosed
        } else if part.emitted.is_some_and(|e| end <= e) || in_emitted_pane() {
            Verdict::Replayed
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
                let deadline = self.last_input + self.cfg.max_wait;
                self.next_check = Some(self.next_check.map_or(deadline, |t| t.min(deadline)));
                // A window whose panes went out before a restart goes on
                // with the next pane.
                let marks = self
                    .parts
                    .iter()
                    .filter_map(|p| Some((p.partition, p.pane_mark(start)?)));
                let mut pane = 0;
                let mut emitted_through = Vec::new();
                for (partition, m) in marks {
                    pane = pane.max(m.next_pane);
                    emitted_through.extend(m.through.map(|t| (partition, t)));
                }
                e.insert(OpenWindow {
                    pane,
                    columns: Columns::default(),
                    ts_min: None,
                    ts_max: None,
                    ranges: Vec::new(),
                    needs: Vec::new(),
                    opened_at: now,
                    emitted_through,
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
        if self.cfg.late == LatePolicy::DeadLetter && !part.dead_lettered(offset) {
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

    /// A message below a restored checkpoint's offset: already delivered.
    fn skip_replayed(&mut self, i: usize, offset: i64, now: Instant) -> bool {
        let part = &mut self.parts[i];
        if part.resume_at.is_some_and(|r| offset < r) {
            part.last_message = now;
            self.last_input = now;
            self.replayed_total += 1;
            true
        } else {
            false
        }
    }

    /// Before the message at `offset` is judged: closures recorded at or
    /// below it apply to it.
    fn arrive(&mut self, i: usize, offset: i64) {
        if self.parts[i].apply_closures(offset) {
            self.refresh_watermark();
            self.close_by_watermark();
        }
    }

    /// Records that a message was read from partition `i`; a silent partition
    /// that speaks again holds the watermark again.
    fn touch(&mut self, i: usize, offset: i64, now: Instant) {
        self.last_input = now;
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
        for r in &ranges {
            match w
                .emitted_through
                .iter_mut()
                .find(|(p, _)| *p == r.partition)
            {
                Some((_, t)) => *t = (*t).max(r.last),
                None => w.emitted_through.push((r.partition, r.last)),
            }
        }
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

    /// Recomputes the watermark: the least partition bound (progress minus
    /// grace, or what closures closed for it) over active partitions; none
    /// while an active partition has neither.
    fn refresh_watermark(&mut self) {
        let mut wm: Option<i64> = None;
        let mut any = false;
        for p in self.parts.iter().filter(|p| p.active()) {
            any = true;
            match p.bound(self.grace_ms) {
                None => {
                    wm = None;
                    break;
                }
                Some(v) => wm = Some(wm.map_or(v, |w| w.min(v))),
            }
        }
        self.watermark = if any { wm } else { None };
    }

    /// Closes the windows the watermark has passed. Closed because every
    /// active partition's progress passed them, they close by `watermark`;
    /// when a partition only holds them no longer because a recorded closure
    /// says so (a replay), they close for that closure's reason.
    fn close_by_watermark(&mut self) {
        let Some(wm) = self.watermark else {
            self.resume_holders();
            return;
        };
        let through = wm.div_euclid(self.hop_ms) * self.hop_ms;
        let first_open = self
            .windows
            .first_key_value()
            .map(|(s, _)| s + self.size_ms);
        let advances = self.closed_through.is_none_or(|c| through > c);
        if !advances && first_open.is_none_or(|e| e > through) {
            // Whoever holds the watermark now must not stay paused.
            self.resume_holders();
            return;
        }
        let own = |p: &Part| p.progress.map(|x| x.saturating_sub(self.grace_ms));
        let reason = self
            .parts
            .iter()
            .filter(|p| p.active() && own(p).is_none_or(|o| o < through))
            .map(|p| p.closed_reason)
            .next()
            .unwrap_or(CloseReason::Watermark);
        self.close_through(through, reason);
    }

    /// Closes every window ending at or before `through` for `reason`. For
    /// each partition whose own progress does not already make those windows
    /// late, the closure is recorded at its position (see [`Part::record`]).
    fn close_through(&mut self, through: i64, reason: CloseReason) {
        while let Some((&start, _)) = self.windows.first_key_value() {
            if start + self.size_ms > through {
                break;
            }
            self.close_window(start, reason);
        }
        self.closed_through = self.closed_through.max(Some(through));
        let grace = self.grace_ms;
        let size = self.size_ms;
        for part in &mut self.parts {
            part.pane_marks.retain(|m| m.start_ms + size > through);
            part.emitted = part.emitted.max(Some(through));
            let own = part.progress.map(|p| p.saturating_sub(grace));
            if own.is_none_or(|o| o < through) && part.closed.is_none_or(|c| c < through) {
                part.record(through, reason);
            }
        }
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
        self.resume_holders();
    }

    /// Resumes paused partitions once memory is back under half the bound, or
    /// when a paused partition is the one holding the watermark.
    fn resume_holders(&mut self) {
        let low = self.buffered <= self.cfg.max_buffered / 2;
        let wm = self.watermark;
        let mut resumed = false;
        for p in &mut self.parts {
            if !p.paused {
                continue;
            }
            let holds = match (p.progress, wm) {
                (Some(pr), Some(w)) => pr.saturating_sub(self.grace_ms) <= w,
                _ => false,
            };
            if low || holds {
                p.paused = false;
                // Paused time is not silence.
                p.last_message = self.now;
                resumed = true;
                self.flows.push(Flow::Resume(p.partition));
            }
        }
        // Every partition still speaking is paused: the ones that held them
        // back have gone quiet, and only the paused ones can move on.
        if !self.parts.iter().any(|p| p.active() && !p.paused) {
            for p in self.parts.iter_mut().filter(|p| p.paused) {
                p.paused = false;
                p.last_message = self.now;
                resumed = true;
                self.flows.push(Flow::Resume(p.partition));
            }
        }
        if resumed {
            self.last_input = self.now;
            self.arm_at(self.now + self.cfg.idle.min(self.cfg.max_wait));
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
            let (mut offset, mut progress) = (next, self.parts[i].progress);
            for w in self.windows.values() {
                for n in &w.needs {
                    if n.partition == partition && n.offset < offset {
                        offset = n.offset;
                        progress = n.progress;
                    }
                }
            }
            let mut cp = self.parts[i].checkpoint_at(offset, progress, self.grace_ms);
            cp.panes = self.pane_marks(i);
            let part = &mut self.parts[i];
            if part.committed.as_ref() != Some(&cp) {
                let from = part
                    .committed
                    .as_ref()
                    .map(|c| c.offset)
                    .or(part.base)
                    .unwrap_or(cp.offset);
                messages += (cp.offset - from).max(0) as u64;
                part.committed = Some(cp.clone());
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

    /// The panes partition `i` has had emitted of the windows still open,
    /// and the restored marks of windows not yet opened again.
    fn pane_marks(&self, i: usize) -> Vec<PaneMark> {
        let part = &self.parts[i];
        let mut marks: Vec<PaneMark> = self
            .windows
            .iter()
            .filter(|(_, w)| w.pane > 0)
            .map(|(&start, w)| PaneMark {
                start_ms: start,
                next_pane: w.pane,
                through: w
                    .emitted_through
                    .iter()
                    .find(|(p, _)| *p == part.partition)
                    .map(|(_, t)| *t),
            })
            .collect();
        for m in &part.pane_marks {
            if !self.windows.contains_key(&m.start_ms) {
                marks.push(*m);
            }
        }
        marks.sort_by_key(|m| m.start_ms);
        marks
    }

    /// The records to store before the next work is delivered: for each
    /// partition with closures decided by wall clock since the last work, its
    /// last stored state (or the state it started from) with every closure
    /// decided after it. Delivered or not, a replay from there decides the
    /// same closures at the same positions.
    fn records(&mut self) -> Vec<CommitPoint> {
        let mut out = Vec::new();
        for part in &mut self.parts {
            if !std::mem::take(&mut part.dirty) {
                continue;
            }
            let (offset, progress, emitted) = match &part.stored {
                Some(s) => (s.offset, s.progress_ms, s.emitted_ms),
                None => match part.start.or(part.base) {
                    Some(o) => (o, None, None),
                    None => continue,
                },
            };
            let mut cp = part.checkpoint_at(offset, progress, self.grace_ms);
            cp.emitted_ms = emitted;
            // What went out is what the stored state says, not what is
            // about to: this record is stored before its work is delivered.
            cp.dead_letters_through = part.stored.as_ref().and_then(|s| s.dead_letters_through);
            cp.panes = part
                .stored
                .as_ref()
                .map(|s| s.panes.clone())
                .unwrap_or_default();
            if let Some(s) = &part.stored {
                cp.closed_ms = cp.closed_ms.max(s.closed_ms);
            }
            out.push(CommitPoint {
                topic: self.topic.clone(),
                partition: part.partition,
                offset,
                checkpoint: Some(cp),
            });
        }
        out
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
        // p1 speaks again: it holds the watermark again, no lower than what
        // was closed while it was idle, and its event for the closed window
        // is late.
        f.event(1, 3 * S, 31);
        assert_eq!(f.w.late_total(), 1);
        assert_eq!(f.w.watermark(), Some(20 * S));
    }

    #[test]
    fn wait_closes_the_windows_once_the_input_is_silent_and_makes_stragglers_late() {
        let mut f = Feed::new(cfg(), &[0]);
        f.event(0, S, 0);
        assert_eq!(f.w.deadline(), Some(f.at(30)), "idle is checked first");
        f.tick(30);
        // The input speaks again at 31: silence counts from there.
        f.event(0, 2 * S, 31);
        f.tick(60);
        f.tick(90);
        assert!(f.batches().is_empty());
        f.tick(91);
        let b = f.batches();
        assert_eq!(b.len(), 1);
        assert_eq!(b[0].closed_by, CloseReason::Wait);
        assert_eq!(b[0].valid(), 2);
        f.event(0, 3 * S, 92);
        assert_eq!(f.w.late_total(), 1, "its window closed by wait");
        assert_eq!(f.w.open_windows(), 0);
    }

    #[test]
    fn a_window_stays_open_past_max_wait_while_the_input_flows() {
        let mut f = Feed::new(cfg(), &[0]);
        // Events keep coming, each inside the grace of the first window's
        // end: the window is older than max_wait (60s) long before the
        // watermark passes it, and that alone never closes it.
        for t in (0..200).step_by(5) {
            f.event(0, S + (t as i64) * 10, t);
            f.tick(t);
        }
        assert!(f.batches().is_empty(), "{:?}", f.batches());
        assert_eq!(f.w.late_total(), 0);
        f.event(0, 16 * S, 200);
        let b = f.batches();
        assert_eq!(b.len(), 1);
        assert_eq!(b[0].closed_by, CloseReason::Watermark);
        assert_eq!(b[0].valid(), 40);
    }

    #[test]
    fn time_held_back_by_the_service_is_not_silence() {
        let mut f = Feed::new(cfg(), &[0, 1]);
        f.event(0, S, 0);
        f.event(1, S, 0);
        // Delivery falls behind at 10 and catches up at 500.
        f.w.hold(true, f.at(10));
        f.tick(100);
        f.tick(499);
        assert!(f.batches().is_empty());
        assert_eq!(f.w.watermark(), Some(-4 * S), "no partition went idle");
        f.w.hold(false, f.at(500));
        f.tick(559);
        assert!(f.batches().is_empty());
        f.tick(560);
        assert_eq!(f.batches().len(), 1);
        assert_eq!(f.batches()[0].closed_by, CloseReason::Wait);
    }

    fn contents(f: &Feed) -> Vec<(WindowId, Vec<String>, CloseReason)> {
        f.batches()
            .iter()
            .map(|b| (b.window.unwrap(), Feed::users(b), b.closed_by))
            .collect()
    }

    /// The checkpoints a replay starts from: the last stored for each
    /// partition, here the records made before the closures were delivered.
    fn records(f: &Feed) -> BTreeMap<i32, Checkpoint> {
        f.works
            .iter()
            .flat_map(|w| &w.record_first)
            .map(|c| (c.partition, c.checkpoint.clone().unwrap()))
            .collect()
    }

    #[test]
    fn a_closure_by_wait_is_decided_again_at_the_same_positions_in_a_replay() {
        let mut a = Feed::new(cfg(), &[0, 1]);
        a.event(0, S, 0);
        a.event(1, 2 * S, 0);
        a.tick(60);
        a.event(0, 3 * S, 61); // late: its window closed by wait
        assert_eq!(a.w.late_total(), 1);
        let stored = records(&a);
        assert_eq!(stored.len(), 2, "both partitions' closures recorded first");
        assert_eq!(
            stored[&0].closures,
            vec![Closure {
                offset: 1,
                through_ms: 10 * S,
                reason: CloseReason::Wait
            }]
        );
        assert!(a.works[0].record_first.len() == 2 && a.works[0].batches.len() == 1);

        // The process died before the packet was delivered, or after: a
        // replay reads a backlog, in another order, with no silence at all.
        let mut b = Feed::new(cfg(), &[]);
        for (p, c) in &stored {
            b.w.assign(*p, Some(c.clone()), Some(c.offset), b.t0);
        }
        b.event(0, S, 0);
        b.event(0, 3 * S, 0);
        b.event(1, 2 * S, 0);
        assert_eq!(contents(&a), contents(&b));
        assert_eq!(b.w.late_total(), 1);
    }

    #[test]
    fn a_closure_while_a_partition_was_idle_is_decided_again_in_a_replay() {
        let mut a = Feed::new(cfg(), &[0, 1]);
        a.event(1, S, 0);
        a.event(0, 2 * S, 0);
        a.event(0, 30 * S, 10);
        a.tick(30); // p1 idle: [0,10) closes without it
        a.event(1, 3 * S, 31); // late for p1
        assert_eq!(a.w.late_total(), 1);
        let stored = records(&a);
        assert_eq!(stored.keys().copied().collect::<Vec<_>>(), vec![1]);

        let mut b = Feed::new(cfg(), &[]);
        b.w.assign(0, None, Some(0), b.t0);
        b.w.assign(1, Some(stored[&1].clone()), Some(0), b.t0);
        b.event(1, S, 0);
        b.event(1, 3 * S, 0);
        b.event(0, 2 * S, 0);
        b.event(0, 30 * S, 0);
        assert_eq!(contents(&a), contents(&b));
        assert_eq!(b.w.late_total(), 1);

        // Restarted after the commit, the idle partition's late event is
        // late again: dead-lettered, never taken for replayed.
        let last = a.works.last().unwrap();
        let p1 = last.commit.iter().find(|c| c.partition == 1).unwrap();
        let mut c = Feed::new(cfg(), &[]);
        let cp = p1.checkpoint.clone().unwrap();
        assert_eq!(cp.offset, 1);
        c.w.assign(1, Some(cp), Some(1), c.t0);
        c.next.insert(1, 1);
        c.event(1, 3 * S, 0);
        assert_eq!((c.w.late_total(), c.w.replayed_total()), (1, 0));
    }

    #[test]
    fn an_event_from_a_clock_far_ahead_makes_no_other_event_late() {
        let mut f = Feed::new(cfg(), &[0]);
        let record = |w: &mut Windower, o: i64, ts: i64, rec: i64, t: Instant| {
            let user = format!("p0o{o}");
            w.push_record(0, o, None, b"{}", &ev(&user, ts), Some(rec), t);
        };
        let t = f.t0;
        record(&mut f.w, 0, 100 * S, 100 * S, t);
        // Stamped 101s by its producer, claiming 50 minutes later.
        record(&mut f.w, 1, 3100 * S, 101 * S, t);
        record(&mut f.w, 2, 102 * S, 102 * S, t);
        record(&mut f.w, 3, 120 * S, 120 * S, t);
        f.collect(t);
        assert_eq!(f.w.late_total(), 0);
        let b = f.batches();
        assert_eq!(b.len(), 1);
        assert_eq!(Feed::users(b[0]), vec!["p0o0", "p0o2"]);
        // Its own window waits for event time to get there.
        assert_eq!(f.w.open_windows(), 2);
    }

    #[test]
    fn event_time_running_ahead_of_its_records_in_small_steps_is_not_held_back() {
        // Synthetic input produced at once: every record stamped 0, event
        // time running from 100s on.
        let mut c = cfg();
        c.max_events = 10_000;
        let mut f = Feed::new(c, &[0]);
        for o in 0..3000 {
            let user = format!("p0o{o}");
            f.w.push_record(
                0,
                o,
                None,
                b"{}",
                &ev(&user, 100 * S + o * 10),
                Some(0),
                f.t0,
            );
        }
        f.collect(f.t0);
        let closed: Vec<_> = f
            .batches()
            .iter()
            .filter(|b| b.closed_by == CloseReason::Watermark)
            .map(|b| b.window.unwrap().start_ms)
            .collect();
        assert_eq!(closed, vec![100 * S, 110 * S]);
    }

    #[test]
    fn a_partition_that_has_sent_nothing_keeps_what_was_closed_without_it() {
        // Partition 1 starts at offset 0 (its committed offset, or where an
        // empty partition's reading starts) and sends nothing for a while.
        let mut a = Feed::new(cfg(), &[]);
        a.w.assign(0, None, Some(0), a.t0);
        a.w.assign(1, None, Some(0), a.t0);
        a.event(0, S, 0);
        a.event(0, 30 * S, 10);
        a.tick(30); // p1 idle: [0,10) closes without it
        let stored = records(&a);
        assert_eq!(
            (stored[&1].offset, stored[&1].closed_ms),
            (0, Some(20 * S)),
            "closed for it from where it starts"
        );
        a.event(1, 5 * S, 31);
        assert_eq!(a.w.late_total(), 1);
        // A replay from what was stored judges its first event the same.
        let mut b = Feed::new(cfg(), &[]);
        b.w.assign(0, None, Some(0), b.t0);
        b.w.assign(1, Some(stored[&1].clone()), Some(0), b.t0);
        b.event(1, 5 * S, 0);
        b.event(0, S, 0);
        b.event(0, 30 * S, 0);
        assert_eq!(b.w.late_total(), 1);
        assert_eq!(contents(&a), contents(&b));
    }

    #[test]
    fn a_partition_moved_here_keeps_its_own_lateness() {
        // This instance's own partition is far ahead; the partition it is
        // given is behind, with a checkpoint from the instance that read it.
        let mut f = Feed::new(cfg(), &[0]);
        for ts in [10, 50, 100] {
            f.event(0, ts * S, 0);
        }
        let before = f.batches().len();
        let cp = Checkpoint {
            offset: 5,
            progress_ms: Some(20 * S),
            emitted_ms: Some(10 * S),
            ..Checkpoint::default()
        };
        f.w.assign(1, Some(cp), Some(5), f.t0);
        f.next.insert(1, 5);
        f.event(1, 22 * S, 0); // on time for p1
        f.event(1, 40 * S, 0);
        assert_eq!(f.w.late_total(), 0);
        let b = f.batches();
        assert_eq!(b.len(), before + 1);
        assert_eq!(Feed::users(b[before]), vec!["p1o5"]);
        assert_eq!(b[before].window.unwrap().start_ms, 20 * S);
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
        let cp = work.commit[0].checkpoint.clone().unwrap();
        assert_eq!(cp.offset, work.commit[0].offset);
        // [10,20) still needs o1; the progress before o1 was 1s. [0,10) was
        // emitted; the partition's own progress closed it, so nothing more
        // is closed for it than that.
        assert_eq!(
            cp,
            Checkpoint {
                offset: 1,
                progress_ms: Some(S),
                emitted_ms: Some(10 * S),
                // o2's dead letter went out with this work.
                dead_letters_through: Some(4),
                ..Checkpoint::default()
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
        let cp = c.checkpoint.clone().unwrap();
        assert_eq!((c.offset, cp.offset, cp.progress_ms), (1, 1, Some(S)));

        // A restart reads from o1 with the progress the original had there.
        let mut b = Feed::new(cfg(), &[]);
        b.w.assign(0, Some(cp.clone()), Some(cp.offset), b.t0);
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
            emitted_ms: Some(10 * S),
            ..Checkpoint::default()
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
    fn held_partitions_are_let_go_when_the_ones_awaited_have_nothing_to_send() {
        let mut c = cfg();
        c.max_buffered = 4;
        c.idle = Duration::from_secs(3600);
        let mut f = Feed::new(c, &[0, 1]);
        for ts in [1, 11, 21, 31, 41] {
            f.event(0, ts * S, 0);
        }
        assert_eq!(f.w.take_flows(), vec![Flow::Pause(0)]);
        // Partition 1 never speaks: holding partition 0 back is not
        // silence, but after max_wait of it partition 0 goes on.
        f.tick(59);
        assert!(f.w.take_flows().is_empty());
        f.tick(60);
        assert_eq!(f.w.take_flows(), vec![Flow::Resume(0)]);
        assert!(f.batches().is_empty());
        // Nothing comes from it either: the windows close a wait later.
        f.tick(120);
        assert_eq!(f.batches().len(), 5);
        assert!(f.batches().iter().all(|b| b.closed_by == CloseReason::Wait));
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
            emitted_ms: Some(10 * S),
            previous: Some(1),
            ..Checkpoint::default()
        };
        let mut f = Feed::new(cfg(), &[]);
        f.w.assign(0, Some(cp.clone()), Some(1), f.t0);
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
                    .any(|c| c.offset == 3 && c.checkpoint.as_ref() == Some(&cp))));
        f.event(0, 14 * S, 0); // o3: judged with the checkpoint's progress
        f.event(0, 30 * S, 0);
        let users: Vec<_> = f.batches().iter().flat_map(|b| Feed::users(b)).collect();
        assert_eq!(users, vec!["p0o3"]);
    }

    /// The run that restarts from `cp` (committed with it) and reads
    /// partition 0 from its offset.
    fn restarted(cfg: WindowConfig, cp: &Checkpoint) -> Feed {
        let mut f = Feed::new(cfg, &[]);
        f.w.assign(0, Some(cp.clone()), Some(cp.offset), f.t0);
        f.next.insert(0, cp.offset);
        f
    }

    /// A dead letter handed out while its window is still open, so below no
    /// committed offset: the checkpoint committed with it says so, and the
    /// replay after a crash counts the message in its window again without
    /// sending it again (exactly once, nothing is sent twice).
    #[test]
    fn a_replay_counts_a_dead_letter_already_sent_without_sending_it_again() {
        let mut c = cfg();
        c.max_dead_letters = 1;
        let mut f = Feed::new(c, &[0]);
        f.event(0, S, 0); // o0, [0,10) stays open
        f.invalid(0, 0); // o1: handed out at once
        let sent: Vec<i64> = f
            .works
            .iter()
            .flat_map(|w| &w.dead_letters)
            .map(|d| d.offset)
            .collect();
        assert_eq!(sent, vec![1]);
        let cp = f.works.last().unwrap().commit[0]
            .checkpoint
            .clone()
            .unwrap();
        assert_eq!((cp.offset, cp.dead_letters_through), (0, Some(2)));

        let mut r = restarted(c, &cp);
        r.event(0, S, 0); // o0 again
        r.invalid(0, 0); // o1 again
        r.event(0, 2 * S, 0); // o2, [0,10) again: o1 lies in its range
        r.event(0, 20 * S, 0); // o3 closes [0,10)
        assert!(r.works.iter().all(|w| w.dead_letters.is_empty()));
        let b = r.batches();
        assert_eq!(b.len(), 1);
        assert_eq!(b[0].invalid_by_kind[ErrorKind::NotJson as usize], 1);
        assert_eq!(Feed::users(b[0]), vec!["p0o0", "p0o2"]);
    }

    /// Panes of a window still open go out before its offsets can be
    /// committed; the checkpoint committed with them names them, so a
    /// replay leaves their events out and goes on with the next pane: the
    /// panes of the two runs together are the panes of one run.
    #[test]
    fn a_replay_goes_on_after_the_panes_already_emitted() {
        let mut c = cfg();
        c.max_events = 2;
        let mut f = Feed::new(c, &[0]);
        for ts in [1, 2, 3, 4, 5] {
            f.event(0, ts * S, 0); // o0..o4 in [0,10): panes 0 and 1 go out
        }
        let panes: Vec<_> = f.batches().iter().map(|b| b.window.unwrap().pane).collect();
        assert_eq!(panes, vec![0, 1]);
        let cp = f.works.last().unwrap().commit[0]
            .checkpoint
            .clone()
            .unwrap();
        assert_eq!(cp.offset, 0, "the open window still needs o0");
        assert_eq!(
            cp.panes,
            vec![PaneMark {
                start_ms: 0,
                next_pane: 2,
                through: Some(3)
            }]
        );

        let mut r = restarted(c, &cp);
        for ts in [1, 2, 3, 4, 5] {
            r.event(0, ts * S, 0);
        }
        r.event(0, 20 * S, 0); // o5 closes [0,10)
        let b = r.batches();
        let got: Vec<_> = b
            .iter()
            .map(|b| (b.window.unwrap().pane, Feed::users(b)))
            .collect();
        assert_eq!(got, vec![(2, vec!["p0o4".to_string()])]);
        assert_eq!(b[0].sources[0].first_offset, 4);
        assert!(r.works.last().unwrap().commit[0]
            .checkpoint
            .as_ref()
            .is_some_and(|c| c.panes.is_empty()));
    }
}
