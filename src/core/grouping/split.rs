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
//!
//! **Alignment across the group.** A merger holds a window's shares until
//! every partition has closed it, so a partition far ahead of the slowest
//! one (another instance's, a backlog read faster) would fill it with
//! windows. A partition here whose closed windows run more than
//! [`LEAD_WINDOWS`] windows past the group's slowest partition is paused
//! until the slowest is within half of that: the merge stage holds at most
//! that many windows per partition ahead, however far apart the instances
//! are. The slowest partition is never paused, so the group always moves.

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
    group: Arc<GroupView>,
    /// Partitions paused for running ahead of the group.
    ahead: Vec<i32>,
    /// The service holds consumption back ([`Grouping::hold`]).
    held: bool,
    flows: Vec<Flow>,
}

/// A bound's value while nothing is known.
pub const NO_BOUND: i64 = i64::MIN;

/// How many windows a partition's closed windows may run past the group's
/// slowest partition before it is paused.
pub const LEAD_WINDOWS: i64 = 6;

/// What the merge stage knows of the whole group, for the partitions read
/// here: window ends, epoch milliseconds, [`NO_BOUND`] while unknown.
#[derive(Debug)]
pub struct GroupView {
    /// The furthest window end any input partition has closed.
    pub furthest: AtomicI64,
    /// The least window end every input partition has closed.
    pub slowest: AtomicI64,
}

impl Default for GroupView {
    fn default() -> GroupView {
        GroupView {
            furthest: AtomicI64::new(NO_BOUND),
            slowest: AtomicI64::new(NO_BOUND),
        }
    }
}

impl Split {
    pub fn new(cfg: WindowConfig, topic: &str) -> Split {
        Split {
            cfg,
            topic: topic.to_string(),
            parts: BTreeMap::new(),
            next_seq: 0,
            next_batch: 0,
            group: Arc::default(),
            ahead: Vec::new(),
            held: false,
            flows: Vec::new(),
        }
    }

    /// Follows `group`, what the merge stage knows of the group.
    pub fn following(mut self, group: Arc<GroupView>) -> Split {
        self.group = group;
        self
    }

    /// Pauses the partitions that run too far ahead of the group's slowest,
    /// and resumes those it has come close enough to.
    ///
    /// A paused partition's windower is held: the time it spends paused is
    /// not silence, so it never follows the group meanwhile (that would make
    /// its events late for a pause the service chose).
    fn align(&mut self, now: Instant) {
        let slowest = self.group.slowest.load(Ordering::Relaxed);
        if slowest == NO_BOUND {
            return;
        }
        let lead = LEAD_WINDOWS * self.cfg.size.as_millis().max(1) as i64;
        for (&p, w) in self.parts.iter_mut() {
            let closed = w.closed_through().unwrap_or(NO_BOUND);
            let paused = self.ahead.contains(&p);
            if !paused && closed > slowest.saturating_add(lead) {
                self.ahead.push(p);
                self.flows.push(Flow::Pause(p));
                w.hold(true, now);
            } else if paused && closed <= slowest.saturating_add(lead / 2) {
                self.ahead.retain(|q| *q != p);
                self.flows.push(Flow::Resume(p));
                w.hold(self.held, now);
            }
        }
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
        self.align(now);
        let group = self.group.furthest.load(Ordering::Relaxed);
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
        self.ahead.clear();
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
        let mut flows = std::mem::take(&mut self.flows);
        flows.extend(self.parts.values_mut().flat_map(Windower::take_flows));
        flows
    }

    fn hold(&mut self, held: bool, now: Instant) {
        self.held = held;
        for (p, w) in self.parts.iter_mut() {
            w.hold(held || self.ahead.contains(p), now);
        }
    }

    fn stored(&mut self, points: &[CommitPoint]) {
        for w in self.parts.values_mut() {
            w.stored(points);
        }
    }

    fn paused(&self) -> Vec<i32> {
        let mut paused: Vec<i32> = self.parts.values().flat_map(Windower::paused).collect();
        paused.extend(&self.ahead);
        paused.sort_unstable();
        paused.dedup();
        paused
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::event::{Field, FIELD_COUNT};
    use crate::core::grouping::window::LatePolicy;
    use std::borrow::Cow;
    use std::time::Duration;

    const S: i64 = 1_000;

    fn cfg() -> WindowConfig {
        WindowConfig {
            size: Duration::from_secs(10),
            hop: Duration::from_secs(10),
            grace: Duration::from_secs(0),
            idle: Duration::from_secs(3600),
            max_wait: Duration::from_secs(3600),
            max_events: usize::MAX,
            max_buffered: usize::MAX,
            max_dead_letters: usize::MAX,
            late: LatePolicy::DeadLetter,
        }
    }

    fn push(g: &mut Split, partition: i32, offset: i64, ts: i64, now: Instant) {
        let mut fields: [Option<Cow<str>>; FIELD_COUNT] = Default::default();
        fields[Field::UserId.index()] = Some(Cow::Borrowed("u"));
        let ev = LoginEvent {
            fields,
            timestamp_ms: Some(ts),
        };
        let m = Message {
            topic: "user-login",
            partition,
            offset,
            key: None,
            payload: b"{}",
            timestamp_ms: None,
        };
        g.push_event(&m, &ev, now);
    }

    #[test]
    fn a_partition_far_ahead_of_the_groups_slowest_pauses_until_it_comes_close() {
        let now = Instant::now();
        let view = Arc::new(GroupView::default());
        let mut g = Split::new(cfg(), "user-login").following(view.clone());
        g.assign(0, None, None, now);
        g.assign(1, None, None, now);
        // Partition 0 closes windows up to 100 s; partition 1 up to 20 s.
        push(&mut g, 0, 0, 0, now);
        push(&mut g, 0, 1, 100 * S, now);
        push(&mut g, 1, 0, 0, now);
        push(&mut g, 1, 1, 20 * S, now);
        g.take_work(now);
        assert!(g.take_flows().is_empty(), "nothing known of the group yet");
        // The group's slowest partition has closed windows up to 20 s: 0 is
        // eight windows past it, more than the lead; 1 is not.
        view.slowest.store(20 * S, Ordering::Relaxed);
        g.take_work(now);
        assert_eq!(g.take_flows(), [Flow::Pause(0)]);
        assert_eq!(g.paused(), [0]);
        // Paused, it is not silent: long after max_wait, with the group
        // further on, it closes nothing for its later events.
        view.furthest.store(500 * S, Ordering::Relaxed);
        let later = now + Duration::from_secs(7200);
        g.take_work(later);
        assert_eq!(g.parts[&0].closed_through(), Some(100 * S));
        // Within the lead but not half of it: still paused.
        // Partition 1, quiet and not held, did follow the group.
        assert_eq!(g.parts[&1].closed_through(), Some(500 * S));
        g.take_flows();
        view.slowest.store(60 * S, Ordering::Relaxed);
        g.take_work(later);
        assert!(!g.take_flows().contains(&Flow::Resume(0)));
        view.slowest.store(70 * S, Ordering::Relaxed);
        g.take_work(later);
        assert_eq!(g.take_flows(), [Flow::Resume(0)]);
        assert!(!g.paused().contains(&0));
    }
}
