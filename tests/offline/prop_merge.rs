//! Property: a window's merged panes are a function of each partition's
//! shares alone. For random per-partition events, chunked into panes, sent
//! through one to three internal partitions in any interleaving, with
//! partitions replaying from earlier points (a move or a restart) and the
//! merger itself crashing and resuming from its last commit, every pane is
//! merged exactly once, with the content that an independent definition
//! gives; and a window's counts equal a naive count of all its events.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Instant;

use login_metrics::core::analysis::analyze;
use login_metrics::core::event::{Field, LoginEvent, FIELD_COUNT};
use login_metrics::core::merge::{route, Added, MergeState, Merger, Progress, Record, Share};
use login_metrics::work::{Batch, CloseReason, Columns, SourceRange, WindowId};
use proptest::prelude::*;

const SIZE: i64 = 10;
const TOPIC: &str = "user-login";
const FIELDS: [Field; 2] = [Field::UserId, Field::Ip];

/// One valid event of a partition: its window index, user and IP.
type Ev = (u8, u8, u8);

fn value(prefix: &str, v: u8) -> Option<String> {
    (v != 0).then(|| format!("{prefix}{v}"))
}

fn columns(events: &[Ev]) -> Columns {
    let owned: Vec<LoginEvent> = events
        .iter()
        .map(|&(w, u, ip)| {
            let mut fields: [Option<Cow<str>>; FIELD_COUNT] = Default::default();
            fields[Field::UserId.index()] = value("u", u).map(Cow::Owned);
            fields[Field::Ip.index()] = value("10.0.0.", ip).map(Cow::Owned);
            LoginEvent {
                fields,
                timestamp_ms: Some(w as i64 * SIZE),
            }
        })
        .collect();
    Columns::from_events(&owned)
}

/// A partition's records in the order its reader sends them: per window in
/// order, its chunks of `max` events (in offset order), each in up to
/// `split` parts, then, sometimes, its progress; the progress through the
/// last window at the end.
fn records(
    p: i32,
    events: &[Ev],
    max: usize,
    progress_after: &[bool],
    split: usize,
) -> Vec<Record> {
    let mut by_window: BTreeMap<u8, Vec<(i64, Ev)>> = BTreeMap::new();
    for (offset, e) in events.iter().enumerate() {
        by_window.entry(e.0).or_default().push((offset as i64, *e));
    }
    let mut out = Vec::new();
    for w in 0..WINDOWS {
        if let Some(evs) = by_window.get(&w) {
            for (k, chunk) in evs.chunks(max).enumerate() {
                let evs: Vec<Ev> = chunk.iter().map(|c| c.1).collect();
                let start = w as i64 * SIZE;
                let share = Share {
                    window: WindowId {
                        start_ms: start,
                        end_ms: start + SIZE,
                        pane: k as u32,
                    },
                    part: 0,
                    parts: 1,
                    source: SourceRange {
                        topic: Arc::from(TOPIC),
                        partition: p,
                        first_offset: chunk[0].0,
                        last_offset: chunk[chunk.len() - 1].0,
                    },
                    ts_min_ms: Some(start),
                    ts_max_ms: Some(start),
                    invalid_by_kind: [0, chunk.len() as u64 % 2, 0, 0, 0],
                    late: chunk[0].0 as u64 % 3,
                    closed_by: if chunk.len() == max {
                        CloseReason::Count
                    } else {
                        CloseReason::Watermark
                    },
                    columns: columns(&evs),
                };
                for part in share.split(split) {
                    out.push(Record::Share(Box::new(part)));
                }
            }
        }
        if progress_after[w as usize] || w == WINDOWS - 1 {
            out.push(Record::Progress(Progress {
                partition: p,
                closed_ms: (w as i64 + 1) * SIZE,
            }));
        }
    }
    out
}

const WINDOWS: u8 = 6;

/// What a merged pane holds, comparable: sources, users/IPs sorted, counts.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Pane {
    sources: Vec<(i32, i64, i64)>,
    rows: Vec<(Option<String>, Option<String>)>,
    invalid: [u64; 5],
    late: u64,
    closed_by: CloseReason,
}

fn pane_of(b: &Batch) -> Pane {
    let u = b.columns.column(Field::UserId);
    let ip = b.columns.column(Field::Ip);
    let mut rows: Vec<_> = (0..b.valid())
        .map(|i| (u.get(i).map(str::to_string), ip.get(i).map(str::to_string)))
        .collect();
    rows.sort();
    Pane {
        sources: b
            .sources
            .iter()
            .map(|s| (s.partition, s.first_offset, s.last_offset))
            .collect(),
        rows,
        invalid: b.invalid_by_kind,
        late: b.late.unwrap(),
        closed_by: b.closed_by,
    }
}

/// The oracle: pane `k` of a window is chunk `k` of every partition that has
/// one, by definition, computed from the events directly.
fn expected(parts: &[Vec<Ev>], max: usize) -> BTreeMap<(u8, u32), Pane> {
    let mut out: BTreeMap<(u8, u32), Pane> = BTreeMap::new();
    for (p, events) in parts.iter().enumerate() {
        for w in 0..WINDOWS {
            let evs: Vec<(i64, Ev)> = events
                .iter()
                .enumerate()
                .filter(|(_, e)| e.0 == w)
                .map(|(o, e)| (o as i64, *e))
                .collect();
            for (k, chunk) in evs.chunks(max).enumerate() {
                let pane = out.entry((w, k as u32)).or_insert(Pane {
                    sources: Vec::new(),
                    rows: Vec::new(),
                    invalid: [0; 5],
                    late: 0,
                    closed_by: CloseReason::Watermark,
                });
                pane.sources
                    .push((p as i32, chunk[0].0, chunk[chunk.len() - 1].0));
                for (_, (_, u, ip)) in chunk {
                    pane.rows.push((value("u", *u), value("10.0.0.", *ip)));
                }
                pane.invalid[1] += chunk.len() as u64 % 2;
                pane.late += chunk[0].0 as u64 % 3;
                if chunk.len() == max {
                    pane.closed_by = CloseReason::Count;
                }
            }
        }
    }
    for pane in out.values_mut() {
        pane.rows.sort();
    }
    out
}

/// One internal partition's records, in the order they were written: the
/// input partitions' records interleaved as `order` picks, each partition
/// going back to an earlier record where `replays` says (a move or a
/// restart sends again what was not committed).
fn internal(
    own: &[Vec<(Record, usize)>],
    order: &[usize],
    replays: &[(usize, usize, usize)],
) -> Vec<Record> {
    let mut at = vec![0usize; own.len()];
    let mut out = Vec::new();
    let mut step = 0;
    loop {
        let live: Vec<usize> = (0..own.len()).filter(|p| at[*p] < own[*p].len()).collect();
        if live.is_empty() {
            return out;
        }
        let p = live[order[step % order.len()] % live.len()];
        out.push(own[p][at[p]].0.clone());
        at[p] += 1;
        for &(when, who, back) in replays {
            if when == step && who % own.len() == p {
                at[p] = at[p].saturating_sub(back % 4);
            }
        }
        step += 1;
    }
}

fn partitions() -> impl Strategy<Value = Vec<Vec<Ev>>> {
    proptest::collection::vec(
        proptest::collection::vec((0..WINDOWS, 0u8..5, 0u8..4), 0..30),
        1..=4,
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    #[test]
    fn every_pane_is_merged_once_whatever_the_routing_interleaving_and_crashes(
        parts in partitions(),
        max in prop_oneof![Just(usize::MAX), 1usize..6],
        internals in 1i32..=3,
        progress_after in proptest::collection::vec(any::<bool>(), WINDOWS as usize),
        order in proptest::collection::vec(0usize..8, 1..40),
        replays in proptest::collection::vec((0usize..120, 0usize..4, 1usize..4), 0..4),
        crashes in proptest::collection::vec(0usize..150, 0..3),
        commit_every in 1usize..7,
        split in 1usize..4,
    ) {
        let now = Instant::now();
        let n = parts.len();
        let want = expected(&parts, max);
        // Crashes after that many records read, in order.
        let mut crashes = crashes;
        crashes.retain(|c| *c > 0);
        crashes.sort_unstable();
        crashes.dedup();
        let mut merged: BTreeMap<(u8, u32), Vec<Pane>> = BTreeMap::new();
        for s in 0..internals {
            // Each input partition's records bound for this internal
            // partition: its shares of the windows routed here, and all of
            // its progress.
            let own: Vec<Vec<(Record, usize)>> = parts
                .iter()
                .enumerate()
                .map(|(p, events)| {
                    records(p as i32, events, max, &progress_after, split)
                        .into_iter()
                        .enumerate()
                        .filter(|(_, r)| match r {
                            Record::Share(sh) => route(&sh.window, SIZE, internals) == s,
                            Record::Progress(_) => true,
                        })
                        .map(|(i, r)| (r, i))
                        .collect()
                })
                .collect();
            let log = internal(&own, &order, &replays);
            // The merger reads the log through encoding, commits every few
            // records (its state and the lowest position it still needs),
            // and crashes where `crashes` says: what it merged after its
            // last commit is discarded (its transaction never committed) and
            // it resumes from that commit.
            let mut m = Merger::new(n, &MergeState::default());
            let mut committed: (usize, MergeState) = (0, MergeState::default());
            let mut pending: Vec<Batch> = Vec::new();
            let mut crashed = 0;
            let mut pos = 0;
            let mut reads = 0;
            while pos < log.len() {
                let bytes = log[pos].encode(&FIELDS);
                match Record::decode(&bytes).unwrap() {
                    Record::Share(sh) => {
                        let added = m.add(*sh, pos as u64);
                        prop_assert_ne!(added, Added::Conflict);
                    }
                    Record::Progress(p) => m.progress(p),
                }
                pending.extend(m.complete(now));
                pos += 1;
                reads += 1;
                if crashed < crashes.len() && reads == crashes[crashed] {
                    crashed += 1;
                    pending.clear();
                    m = Merger::new(n, &committed.1);
                    pos = committed.0;
                    continue;
                }
                if pos % commit_every == 0 || pos == log.len() {
                    for b in pending.drain(..) {
                        let w = b.window.unwrap();
                        merged
                            .entry(((w.start_ms / SIZE) as u8, w.pane))
                            .or_default()
                            .push(pane_of(&b));
                    }
                    committed = (m.lowest_held().map_or(pos, |h| h as usize), m.state());
                }
            }
            prop_assert_eq!(m.held_events(), 0, "everything merged in the end");
        }
        let got: BTreeMap<(u8, u32), Pane> = merged
            .iter()
            .map(|(k, v)| {
                assert_eq!(v.len(), 1, "pane {k:?} merged {} times: {v:?}", v.len());
                (*k, v[0].clone())
            })
            .collect();
        prop_assert_eq!(got, want);
    }

    /// A window's panes together hold exactly its events, and a window that
    /// is not split counts as a naive count over all its events says.
    #[test]
    fn a_merged_window_counts_as_its_whole_input(parts in partitions(), internals in 1i32..=3) {
        let now = Instant::now();
        let n = parts.len();
        let mut windows: BTreeMap<u8, Vec<Batch>> = BTreeMap::new();
        for s in 0..internals {
            let mut m = Merger::new(n, &MergeState::default());
            for (p, events) in parts.iter().enumerate().rev() {
                for r in records(p as i32, events, usize::MAX, &[false; WINDOWS as usize], 2) {
                    match r {
                        Record::Share(sh) if route(&sh.window, SIZE, internals) == s => {
                            m.add(*sh, 0);
                        }
                        Record::Share(_) => {}
                        Record::Progress(pr) => m.progress(pr),
                    }
                    for b in m.complete(now) {
                        windows
                            .entry((b.window.unwrap().start_ms / SIZE) as u8)
                            .or_default()
                            .push(b);
                    }
                }
            }
        }
        for w in 0..WINDOWS {
            let all: Vec<Ev> = parts.iter().flatten().filter(|e| e.0 == w).copied().collect();
            let got = windows.remove(&w).unwrap_or_default();
            if all.is_empty() {
                prop_assert!(got.is_empty());
                continue;
            }
            prop_assert_eq!(got.len(), 1);
            let mut naive: HashMap<(u8, u8), u64> = HashMap::new();
            for e in &all {
                *naive.entry((e.1, e.2)).or_default() += 1;
            }
            let slices = vec![FIELDS.to_vec()];
            let report = &analyze(&got[0].columns, &slices, 100).unwrap()[0];
            prop_assert_eq!(report.groups, naive.len() as u64);
            prop_assert_eq!(
                report.duplicate_groups,
                naive.values().filter(|c| **c > 1).count() as u64
            );
            let mut rows: Vec<u64> = report.duplicates.iter().map(|r| r.count).collect();
            let mut want: Vec<u64> = naive.values().copied().filter(|c| *c > 1).collect();
            rows.sort_unstable();
            want.sort_unstable();
            prop_assert_eq!(rows, want);
            prop_assert_eq!(got[0].valid(), all.len());
        }
    }
}
