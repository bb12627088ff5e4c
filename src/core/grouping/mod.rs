//! Grouping: how parsed messages become [`Work`] for delivery, behind one
//! small interface ([`Grouping`]) that the consumer thread drives the same
//! way whatever the mode: arrival batches ([`arrival`]) or event-time
//! windows ([`window`]).
//!
//! Every method takes the current `Instant`; nothing here reads a clock, so
//! tests drive time by hand.

pub mod arrival;
pub mod settings;
pub mod split;
pub mod window;

use std::time::Instant;

use crate::core::event::{InvalidEvent, LoginEvent};
use crate::work::{Batch, Checkpoint, CloseReason, CommitPoint, Message, Work};

pub use window::Flow;

/// What grouping has seen, for metrics and gauges.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Valid events whose windows had all closed, since the start.
    pub late: u64,
    /// Events re-read after a restart whose window was already emitted.
    pub replayed: u64,
    pub open_windows: usize,
    /// Valid events held in open windows.
    pub buffered: usize,
    /// The watermark, epoch milliseconds.
    pub watermark: Option<i64>,
}

/// The grouping rules of one mode.
pub trait Grouping: Send {
    /// How many messages may be taken before grouping must see them (the
    /// memory bound of open windows); `usize::MAX` for no bound.
    fn room(&self) -> usize;

    /// When the next wall-clock rule is due, if any is pending.
    fn deadline(&self) -> Option<Instant>;

    /// A valid event.
    fn push_event(&mut self, m: &Message<'_>, event: &LoginEvent<'_>, now: Instant);

    /// A message that is not a valid event: a dead letter.
    fn push_invalid(&mut self, m: &Message<'_>, error: InvalidEvent, now: Instant);

    /// Applies the wall-clock rules and hands over the work that is ready, in order.
    fn take_work(&mut self, now: Instant) -> Vec<Work>;

    /// Before a revocation or at shutdown: hands over what must not wait
    /// (an arrival batch closed for `reason`; a window's pending dead
    /// letters, never an open window, whose offsets stay uncommitted), in
    /// order, after any work not yet taken.
    fn close(&mut self, reason: CloseReason, now: Instant) -> Vec<Work>;

    /// A bounded run has read `partition` to the end of its range.
    fn end_partition(&mut self, partition: i32, now: Instant);

    /// A bounded run has read its whole range: closes everything still open
    /// (closed by [`CloseReason::End`]) and hands it over with the pending
    /// dead letters, after any work not yet taken.
    fn finish(&mut self, now: Instant) -> Vec<Work>;

    /// After a revocation: forgets every partition's state.
    fn reset(&mut self);

    /// Whether assigned partitions resume from stored checkpoints.
    fn uses_checkpoints(&self) -> bool;

    /// A newly assigned partition, from its checkpoint when there is one;
    /// `committed` is the group's committed offset.
    fn assign(
        &mut self,
        partition: i32,
        checkpoint: Option<Checkpoint>,
        committed: Option<i64>,
        now: Instant,
    );

    /// Partitions to pause or resume, to keep the memory bound.
    fn take_flows(&mut self) -> Vec<Flow>;

    /// Consumption is held back by the service (delivery behind), or let
    /// go: held time is not silence of the input.
    fn hold(&mut self, held: bool, now: Instant);

    /// These checkpoints are stored.
    fn stored(&mut self, points: &[CommitPoint]);

    /// Partitions grouping holds paused now.
    fn paused(&self) -> Vec<i32>;

    fn stats(&self) -> Stats;
}

/// Arrival batching behind [`Grouping`]: batches closed by messages wait here
/// for the next [`Grouping::take_work`].
pub struct Arrival {
    batcher: arrival::Batcher,
    closed: Vec<Batch>,
}

impl Arrival {
    pub fn new(limits: arrival::Limits) -> Arrival {
        Arrival {
            batcher: arrival::Batcher::new(limits),
            closed: Vec::new(),
        }
    }
}

impl Grouping for Arrival {
    fn room(&self) -> usize {
        usize::MAX
    }

    fn deadline(&self) -> Option<Instant> {
        self.batcher.deadline()
    }

    fn push_event(&mut self, m: &Message<'_>, event: &LoginEvent<'_>, now: Instant) {
        self.batcher
            .push_event(m.coord(), event, now, &mut self.closed);
    }

    fn push_invalid(&mut self, m: &Message<'_>, error: InvalidEvent, now: Instant) {
        self.batcher
            .push_invalid(m.coord(), m.key, m.payload, error, now, &mut self.closed);
    }

    fn take_work(&mut self, now: Instant) -> Vec<Work> {
        self.closed.extend(self.batcher.poll_expired(now));
        self.closed.drain(..).map(Work::from_arrival).collect()
    }

    fn close(&mut self, reason: CloseReason, _: Instant) -> Vec<Work> {
        self.closed.extend(self.batcher.close(reason));
        self.closed.drain(..).map(Work::from_arrival).collect()
    }

    fn end_partition(&mut self, _: i32, _: Instant) {}

    fn finish(&mut self, now: Instant) -> Vec<Work> {
        self.close(CloseReason::End, now)
    }

    fn reset(&mut self) {}

    fn uses_checkpoints(&self) -> bool {
        false
    }

    fn assign(&mut self, _: i32, _: Option<Checkpoint>, _: Option<i64>, _: Instant) {}

    fn take_flows(&mut self) -> Vec<Flow> {
        Vec::new()
    }

    fn hold(&mut self, _: bool, _: Instant) {}

    fn stored(&mut self, _: &[CommitPoint]) {}

    fn paused(&self) -> Vec<i32> {
        Vec::new()
    }

    fn stats(&self) -> Stats {
        Stats::default()
    }
}

impl Grouping for window::Windower {
    fn room(&self) -> usize {
        window::Windower::room(self)
    }

    fn deadline(&self) -> Option<Instant> {
        window::Windower::deadline(self)
    }

    fn push_event(&mut self, m: &Message<'_>, event: &LoginEvent<'_>, now: Instant) {
        window::Windower::push_record(
            self,
            m.partition,
            m.offset,
            m.key,
            m.payload,
            event,
            m.timestamp_ms,
            now,
        );
    }

    fn push_invalid(&mut self, m: &Message<'_>, error: InvalidEvent, now: Instant) {
        window::Windower::push_invalid(self, m.partition, m.offset, m.key, m.payload, error, now);
    }

    fn take_work(&mut self, now: Instant) -> Vec<Work> {
        self.poll(now);
        window::Windower::take_work(self, now, false)
            .into_iter()
            .collect()
    }

    fn close(&mut self, _: CloseReason, now: Instant) -> Vec<Work> {
        window::Windower::take_work(self, now, true)
            .into_iter()
            .collect()
    }

    fn end_partition(&mut self, partition: i32, now: Instant) {
        window::Windower::end_partition(self, partition, now)
    }

    fn finish(&mut self, now: Instant) -> Vec<Work> {
        window::Windower::finish(self, now).into_iter().collect()
    }

    fn reset(&mut self) {
        window::Windower::reset(self)
    }

    fn uses_checkpoints(&self) -> bool {
        true
    }

    fn assign(
        &mut self,
        partition: i32,
        checkpoint: Option<Checkpoint>,
        committed: Option<i64>,
        now: Instant,
    ) {
        window::Windower::assign(self, partition, checkpoint, committed, now)
    }

    fn take_flows(&mut self) -> Vec<Flow> {
        window::Windower::take_flows(self)
    }

    fn hold(&mut self, held: bool, now: Instant) {
        window::Windower::hold(self, held, now)
    }

    fn stored(&mut self, points: &[CommitPoint]) {
        window::Windower::stored(self, points)
    }

    fn paused(&self) -> Vec<i32> {
        window::Windower::paused(self)
    }

    fn stats(&self) -> Stats {
        Stats {
            late: self.late_total(),
            replayed: self.replayed_total(),
            open_windows: self.open_windows(),
            buffered: self.buffered(),
            watermark: self.watermark(),
        }
    }
}
