//! Windows per partition: the first stage of a group whose instances merge
//! their windows through Kafka (`docs/scaling.md`).
//!
//! Each assigned partition gets a [`Windower`] of its own, with the window
//! rules unchanged, so each partition's windows close by that partition's
//! own progress (or by its own closures, decided by position as before),
//! and their batches are the partition's *shares* of the windows
//! ([`crate::core::merge::Share`]): a function of the partition's input
//! alone. Panes split by `batch.max_events` are chunks of one partition in
//! offset order. The merge of the shares ([`crate::core::merge::Merger`])
//! then gives each window's answer, the same whoever reads which partition.
//!
//! Checkpoints, offsets and dead letters stay per partition, exactly as the
//! windower keeps them; this type routes each call to the partition's
//! windower and numbers the works it hands over.
//!
//! A partition's windows wait for no other partition here, so the wait rule
//! needs one addition: a partition that has gone quiet (nothing for
//! `max_wait`, no window open) *follows the group*. The merge stage reports
//! the furthest window end any partition of the group has closed, and the
//! quiet partition closes its windows through it too, as a closure recorded
//! at its position ([`Windower::follow`]); its later events for those
//! windows are late, exactly as after a wait. Without it, the windows after
//! a quiet partition's last event would wait for it for ever.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use crate::core::event::{InvalidEvent, LoginEvent};
use crate::core::grouping::window::{WindowConfig, Windower};
use crate::core::grouping::{Flow, Grouping, Stats};
use crate::work::{Checkpoint, CloseReason, CommitPoint, Message, Work};

pub struct Split {
    cfg: WindowConfig,
    topic: String,
    parts: BTreeMap<i32, Windower>,
    next_seq: u64,
    next_batch: u64,
    /// The furthest window end the group has closed ([`NO_BOUND`]: none
    /// known yet), set by the merge stage.
    group: Arc<AtomicI64>,
}

/// The group bound's value while nothing is known.
pub const NO_BOUND: i64 = i64::MIN;

impl Split {
    pub fn new(cfg: WindowConfig, topic: &str) -> Split {
        Split {
            cfg,
            topic: topic.to_string(),
            parts: BTreeMap::new(),
            next_seq: 0,
            next_batch: 0,
            group: Arc::new(AtomicI64::new(NO_BOUND)),
        }
    }

    /// Follows `group`, the furthest window end the group has closed.
    pub fn following(mut self, group: Arc<AtomicI64>) -> Split {
        self.group = group;
        self
    }

    /// The windower of `partition`, made (from nothing stored) for a message
    /// of a partition not assigned: the consumer assigns before it reads,
    /// so this is only a guard.
    fn part(&mut self, partition: i32, now: Instant) -> &mut Windower {
        let (cfg, topic) = (self.cfg, &self.topic);
        self.parts.entry(partition).or_insert_with(|| {
            let mut w = Windower::new(cfg, topic);
            w.assign(partition, None, None, now);
            w
        })
    }

    /// The works of every partition, numbered in one sequence.
    fn number(&mut self, works: Vec<Work>) -> Vec<Work> {
        works
            .into_iter()
            .map(|mut w| {
                w.seq = self.next_seq;
                self.next_seq += 1;
                for b in &mut w.batches {
                    b.seq = self.next_batch;
                    self.next_batch += 1;
                }
                w
            })
            .collect()
    }

    fn each(&mut self, mut f: impl FnMut(&mut Windower) -> Vec<Work>) -> Vec<Work> {
        let works: Vec<Work> = self.parts.values_mut().flat_map(&mut f).collect();
        self.number(works)
    }
}

impl Grouping for Split {
    fn room(&self) -> usize {
        self.parts
            .values()
            .map(Windower::room)
            .min()
            .unwrap_or(usize::MAX)
    }

    fn deadline(&self) -> Option<Instant> {
        self.parts.values().filter_map(Windower::deadline).min()
    }

    fn push_event(&mut self, m: &Message<'_>, event: &LoginEvent<'_>, now: Instant) {
        Grouping::push_event(self.part(m.partition, now), m, event, now);
    }

    fn push_invalid(&mut self, m: &Message<'_>, error: InvalidEvent, now: Instant) {
        Grouping::push_invalid(self.part(m.partition, now), m, error, now);
    }

    fn take_work(&mut self, now: Instant) -> Vec<Work> {
        let group = self.group.load(Ordering::Relaxed);
        self.each(|w| {
            if group != NO_BOUND {
                // A quiet partition only: the wall-clock rules go first.
                w.poll(now);
                if w.quiet(now) {
                    w.follow(group, now);
                }
            }
            Grouping::take_work(w, now)
        })
    }

    fn close(&mut self, reason: CloseReason, now: Instant) -> Vec<Work> {
        self.each(|w| Grouping::close(w, reason, now))
    }

    fn end_partition(&mut self, partition: i32, now: Instant) {
        Grouping::end_partition(self.part(partition, now), partition, now);
    }

    fn finish(&mut self, now: Instant) -> Vec<Work> {
        self.each(|w| Grouping::finish(w, now))
    }

    fn reset(&mut self) {
        self.parts.clear();
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
        let mut w = Windower::new(self.cfg, &self.topic);
        w.assign(partition, checkpoint, committed, now);
        self.parts.insert(partition, w);
    }

    fn take_flows(&mut self) -> Vec<Flow> {
        self.parts
            .values_mut()
            .flat_map(Windower::take_flows)
            .collect()
    }

    fn hold(&mut self, held: bool, now: Instant) {
        for w in self.parts.values_mut() {
            w.hold(held, now);
        }
    }

    fn stored(&mut self, points: &[CommitPoint]) {
        for w in self.parts.values_mut() {
            w.stored(points);
        }
    }

    fn paused(&self) -> Vec<i32> {
        self.parts.values().flat_map(Windower::paused).collect()
    }

    fn stats(&self) -> Stats {
        let mut s = Stats::default();
        for w in self.parts.values() {
            s.late += w.late_total();
            s.replayed += w.replayed_total();
            s.open_windows += w.open_windows();
            s.buffered += w.buffered();
        }
        s.watermark = self.parts.values().map(Windower::watermark).min().flatten();
        s
    }
}
