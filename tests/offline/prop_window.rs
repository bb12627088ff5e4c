//! Property: window contents and lateness are a function of each partition's
//! own sequence. For random per-partition event sequences (out of order,
//! stragglers beyond grace, invalid messages), any interleaving of the
//! partitions, and a crash at any point followed by a restart from the
//! committed checkpoints, the windows emitted and the late events are the same.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use login_metrics::commit::checkpoint::{self, Checkpoint, Restore};
use login_metrics::core::event::{ErrorKind, Field, InvalidEvent, LoginEvent, FIELD_COUNT};
use login_metrics::core::grouping::window::{LatePolicy, WindowConfig, Windower};
use login_metrics::work::{Batch, WindowId, Work};
use proptest::prelude::*;

/// One message of a partition: `Some(ts_ms)` a valid event, `None` invalid.
type Seq = Vec<Option<i64>>;

fn cfg(hop_s: u64) -> WindowConfig {
    WindowConfig {
        size: Duration::from_secs(10),
        hop: Duration::from_secs(hop_s),
        grace: Duration::from_secs(3),
        idle: Duration::from_secs(3600),
        max_wait: Duration::from_secs(3600),
        max_events: usize::MAX,
        max_buffered: 50,
        max_dead_letters: 7,
        late: LatePolicy::DeadLetter,
    }
}

/// What a run emitted: each window's events (partition, offset), and the late events.
#[derive(Debug, Default)]
struct Emitted {
    windows: BTreeMap<WindowId, Vec<BTreeSet<String>>>,
    late: BTreeSet<(i32, i64)>,
    invalid: BTreeSet<(i32, i64)>,
}

impl Emitted {
    fn add(&mut self, work: &Work) {
        for b in &work.batches {
            self.windows
                .entry(b.window.unwrap())
                .or_default()
                .push(users(b));
        }
        for d in &work.dead_letters {
            let set = if d.kind == ErrorKind::Late {
                &mut self.late
            } else {
                &mut self.invalid
            };
            set.insert((d.partition, d.offset));
        }
    }
}

fn users(b: &Batch) -> BTreeSet<String> {
    b.columns
        .column(Field::UserId)
        .iter()
        .map(|u| u.unwrap().to_string())
        .collect()
}

/// Feeds the next message of partition `p` (if any); returns work that became ready.
fn feed_one(
    w: &mut Windower,
    seqs: &[Seq],
    next: &mut [i64],
    p: usize,
    t0: Instant,
) -> Option<Work> {
    let o = next[p];
    if o as usize >= seqs[p].len() {
        return None;
    }
    next[p] += 1;
    match seqs[p][o as usize] {
        Some(ts) => {
            let mut fields: [Option<Cow<str>>; FIELD_COUNT] = Default::default();
            fields[Field::UserId.index()] = Some(Cow::Owned(format!("{p}/{o}")));
            let ev = LoginEvent {
                fields,
                timestamp_ms: Some(ts),
            };
            w.push_event(p as i32, o, None, b"{}", &ev, t0);
        }
        None => w.push_invalid(
            p as i32,
            o,
            None,
            b"?",
            InvalidEvent {
                kind: ErrorKind::NotJson,
                reason: "x".into(),
            },
            t0,
        ),
    }
    w.take_work(t0, false)
}

/// Feeds `order` (partition indexes, consumed in turn from each partition's
/// sequence starting at `from`), then the rest partition by partition, and
/// returns every work, the last with the end-of-input windows closed by wait.
fn run(w: &mut Windower, seqs: &[Seq], from: &[i64], order: &[usize], t0: Instant) -> Vec<Work> {
    let mut next: Vec<i64> = from.to_vec();
    let mut works = Vec::new();
    for &p in order {
        works.extend(feed_one(w, seqs, &mut next, p, t0));
    }
    for p in 0..seqs.len() {
        while (next[p] as usize) < seqs[p].len() {
            works.extend(feed_one(w, seqs, &mut next, p, t0));
        }
    }
    let end = t0 + Duration::from_secs(3601);
    w.poll(end);
    works.extend(w.take_work(end, true));
    works
}

fn fresh(hop_s: u64, partitions: usize, t0: Instant) -> Windower {
    let mut w = Windower::new(cfg(hop_s), "user-login");
    for p in 0..partitions {
        w.assign(p as i32, None, None, t0);
    }
    w
}

fn sequences() -> impl Strategy<Value = Vec<Seq>> {
    // Event time drifts forward with jitter; some events far behind (late).
    // Forward steps smaller than the window, stragglers within and beyond
    // grace (3 s) and window size (10 s), invalid messages in between.
    let msg = prop_oneof![
        6 => (0i64..4_000).prop_map(Some),
        3 => (-16_000i64..0).prop_map(Some),
        1 => Just(None),
    ];
    prop::collection::vec(prop::collection::vec(msg, 1..60), 1..4).prop_map(|parts| {
        parts
            .into_iter()
            .map(|deltas| {
                let mut t = 1_000_000i64;
                deltas
                    .into_iter()
                    .map(|d| {
                        d.map(|d| {
                            if d > 0 {
                                t += d;
                                t
                            } else {
                                (t + d).max(0)
                            }
                        })
                    })
                    .collect()
            })
            .collect()
    })
}

fn interleaving(seqs: &[Seq], picks: &[usize]) -> Vec<usize> {
    let mut left: Vec<usize> = seqs.iter().map(Vec::len).collect();
    let mut order = Vec::new();
    for &x in picks {
        let live: Vec<usize> = (0..seqs.len()).filter(|p| left[*p] > 0).collect();
        if live.is_empty() {
            break;
        }
        let p = live[x % live.len()];
        left[p] -= 1;
        order.push(p);
    }
    order
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(500))]

    #[test]
    fn windows_and_lateness_do_not_depend_on_interleaving_or_restarts(
        seqs in sequences(),
        hop_s in prop_oneof![Just(10u64), Just(5u64)],
        picks_a in prop::collection::vec(0usize..8, 0..250),
        picks_b in prop::collection::vec(0usize..8, 0..250),
        picks_c in prop::collection::vec(0usize..8, 0..250),
        crash_at in 0usize..250,
        lost in 0usize..3,
        uncommitted in 0usize..3,
    ) {
        let t0 = Instant::now();
        let n = seqs.len();
        let zero = vec![0i64; n];

        // Reference: one interleaving, no crash.
        let mut reference = Emitted::default();
        let order_a = interleaving(&seqs, &picks_a);
        for w in run(&mut fresh(hop_s, n, t0), &seqs, &zero, &order_a, t0) {
            reference.add(&w);
        }
        for ws in reference.windows.values() {
            prop_assert_eq!(ws.len(), 1, "a window is emitted once in one run");
        }

        // Another interleaving gives the same windows and late events.
        let mut other = Emitted::default();
        let order_b = interleaving(&seqs, &picks_b);
        for w in run(&mut fresh(hop_s, n, t0), &seqs, &zero, &order_b, t0) {
            other.add(&w);
        }
        prop_assert_eq!(&other.windows, &reference.windows);
        prop_assert_eq!(&other.late, &reference.late);

        // A crash after `crash_at` messages of a third interleaving; the last
        // `lost` works were published but nothing of them stored; before
        // those, the last `uncommitted` had their checkpoints stored but the
        // process died before committing their offsets.
        let order_c = interleaving(&seqs, &picks_c);
        let cut = crash_at.min(order_c.len());
        let mut first = fresh(hop_s, n, t0);
        let mut works = Vec::new();
        let mut next = vec![0i64; n];
        for &p in &order_c[..cut] {
            works.extend(feed_one(&mut first, &seqs, &mut next, p, t0));
        }
        let mut crashed = Emitted::default();
        for w in &works {
            crashed.add(w);
        }
        let stored = works.len().saturating_sub(lost);
        let committed = stored.saturating_sub(uncommitted);
        let mut checkpoints: BTreeMap<i32, Checkpoint> = BTreeMap::new();
        let mut offsets: BTreeMap<i32, i64> = BTreeMap::new();
        for (i, w) in works[..stored].iter().enumerate() {
            for c in &w.commit {
                checkpoints.insert(c.partition, c.checkpoint.unwrap());
                if i < committed {
                    offsets.insert(c.partition, c.offset);
                }
            }
        }
        let mut second = Windower::new(cfg(hop_s), "user-login");
        let from: Vec<i64> = (0..n)
            .map(|p| {
                let p = p as i32;
                let committed = offsets.get(&p).copied();
                let restore = checkpoint::resolve(committed, checkpoints.get(&p).copied());
                let cp = match restore {
                    Restore::From(c) => Some(c),
                    Restore::Fresh => None,
                    Restore::Stale { .. } => panic!("a checkpoint is stored before its commit"),
                };
                second.assign(p, cp, committed, t0);
                // The consumer reads on from the committed offset.
                committed.unwrap_or(0)
            })
            .collect();
        for w in run(&mut second, &seqs, &from, &order_b, t0) {
            crashed.add(&w);
        }
        for (id, contents) in &crashed.windows {
            let expected = reference.windows.get(id);
            prop_assert!(expected.is_some(), "window {:?} not in the reference run", id);
            for c in contents {
                prop_assert_eq!(c, &expected.unwrap()[0], "window {:?} replayed with other content", id);
            }
        }
        prop_assert_eq!(
            crashed.windows.keys().collect::<Vec<_>>(),
            reference.windows.keys().collect::<Vec<_>>()
        );
        prop_assert_eq!(&crashed.late, &reference.late, "late events");
        prop_assert_eq!(&crashed.invalid, &reference.invalid, "invalid messages");
    }
}
