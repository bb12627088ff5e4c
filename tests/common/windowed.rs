//! Window mode with the default window settings (windows of 10 s aligned to
//! the epoch, 5 s of grace) for the tests that run in both modes (faults,
//! kill -9, SIGTERM, several instances, rebalances): input whose event times
//! span many windows, the per-partition oracle of lateness, and the checks
//! of what runs published when kill -9, replays, rebalances and closures by
//! wall clock leave the exact set of windows open to timing. What holds
//! whatever the timing: every valid event is counted in exactly one distinct
//! packet or is a late dead letter, never both, never neither; a packet id
//! carries one content; every invalid message is a dead letter; and no
//! commit passes an event before a packet counting it was published
//! ([`WindowCommitOrder`]).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use login_metrics::core::packet::Packet;
use rand::{Rng, SeedableRng};
use rdkafka::config::ClientConfig;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use serde_json::Value;

use super::order::{logged, Logged};
#[allow(unused_imports)]
use super::*;

/// `batch.max_span`'s default: the window length.
pub const SIZE_MS: i64 = 10_000;
/// `batch.grace`'s default.
pub const GRACE_MS: i64 = 5_000;
/// Where generated event time starts: a window boundary.
pub const T0_MS: i64 = 1_700_000_000_000;
/// `kafka.checkpoint_topic`'s default.
pub const CHECKPOINTS: &str = "login-metrics-checkpoints";

/// The grouping a test runs the service in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Arrival,
    Window,
}

impl Mode {
    /// The settings the mode adds to a test's own (`SECTION__KEY`, value):
    /// the suites default to arrival mode, window mode keeps every other
    /// window default.
    pub fn env(self) -> Vec<(&'static str, &'static str)> {
        match self {
            Mode::Arrival => vec![],
            Mode::Window => vec![("BATCH__MODE", "window")],
        }
    }
}

/// Messages in production order, with each valid event's time.
#[derive(Clone)]
pub struct Timed {
    pub inputs: Vec<Input>,
    pub malformed: Vec<bool>,
    /// The event time of each valid message; `None` for an invalid one.
    pub ts: Vec<Option<i64>>,
}

/// [`generated_input`] with its timestamps rewritten as epoch milliseconds:
/// event time starts at [`T0_MS`] and advances `step_ms` per message (over
/// all partitions, spread round-robin), so `count` messages span
/// `count * step_ms` of event time, many windows. The generator's own
/// timestamps advance 1,500 events a second, a couple of windows for a
/// whole test's input, and most are whole seconds. One event in ten is a
/// straggler within grace; one in a hundred is far behind, late unless its
/// window is still open.
pub fn timed_input(seed: u64, users: usize, count: usize, partitions: i32, step_ms: f64) -> Timed {
    let (inputs, malformed) = generated_input(seed, users, count, partitions);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed ^ 0x7173_6564);
    let mut ts = Vec::with_capacity(count);
    let inputs = inputs
        .into_iter()
        .zip(&malformed)
        .enumerate()
        .map(|(i, (mut inp, bad))| {
            if *bad {
                ts.push(None);
                return inp;
            }
            let t = T0_MS + (i as f64 * step_ms) as i64;
            let t = match rng.gen_range(0..100) {
                0..=9 => t - rng.gen_range(0..4_000),
                10 => t - rng.gen_range(8_000..40_000),
                _ => t,
            };
            let mut v: Value = serde_json::from_slice(&inp.payload).expect("generated JSON");
            v["timestamp"] = Value::from(t);
            inp.payload = v.to_string().into_bytes();
            ts.push(Some(t));
            inp
        })
        .collect();
    Timed {
        inputs,
        malformed,
        ts,
    }
}

/// The start of the window holding event time `ts`.
pub fn window_start(ts: i64) -> i64 {
    ts.div_euclid(SIZE_MS) * SIZE_MS
}

impl Timed {
    /// The first `n` messages.
    pub fn prefix(&self, n: usize) -> Timed {
        Timed {
            inputs: self.inputs[..n].to_vec(),
            malformed: self.malformed[..n].to_vec(),
            ts: self.ts[..n].to_vec(),
        }
    }

    /// The map by coordinate, produced in order to an empty topic.
    pub fn map(&self) -> InputMap {
        input_map(&self.inputs, &self.malformed)
    }

    /// Each message's (partition, offset), in production order.
    pub fn coords(&self) -> Vec<(i32, i64)> {
        let mut next: HashMap<i32, i64> = HashMap::new();
        self.inputs
            .iter()
            .map(|m| {
                let o = next.entry(m.partition).or_insert(0);
                *o += 1;
                (m.partition, *o - 1)
            })
            .collect()
    }

    /// The event time of each valid event, by coordinate.
    pub fn times(&self) -> HashMap<(i32, i64), i64> {
        self.coords()
            .into_iter()
            .zip(&self.ts)
            .filter_map(|(c, t)| t.map(|t| (c, t)))
            .collect()
    }

    /// The oracle of lateness, per partition and independent of the code: an
    /// event is late when its window ends at or before the largest event time
    /// read before it from the same partition minus grace.
    pub fn oracle_late(&self) -> BTreeSet<(i32, i64)> {
        let mut progress: HashMap<i32, i64> = HashMap::new();
        let mut late = BTreeSet::new();
        for ((p, o), t) in self.coords().into_iter().zip(&self.ts) {
            let Some(t) = *t else { continue };
            if progress
                .get(&p)
                .is_some_and(|pr| window_start(t) + SIZE_MS <= pr - GRACE_MS)
            {
                late.insert((p, o));
            }
            let pr = progress.entry(p).or_insert(t);
            *pr = (*pr).max(t);
        }
        late
    }

    /// The watermark once everything is read: the least partition progress
    /// minus grace. Windows ending at or before it close by watermark.
    pub fn final_watermark(&self) -> i64 {
        let mut progress: HashMap<i32, i64> = HashMap::new();
        for (m, t) in self.inputs.iter().zip(&self.ts) {
            if let Some(t) = t {
                let pr = progress.entry(m.partition).or_insert(*t);
                *pr = (*pr).max(*t);
            }
        }
        progress.values().min().expect("valid events") - GRACE_MS
    }
}

/// How a run's output is judged beyond what always holds.
#[derive(Default)]
pub struct Expect {
    /// The late dead letters are exactly the oracle's: no closure by wall
    /// clock made an on-time event late.
    pub oracle_late: bool,
    /// Packets whose work was given up uncommitted at a revocation: what they
    /// counted is read and counted again by the partitions' next reader, so
    /// they are left out of "counted once" (their content is still checked).
    pub given_up: BTreeSet<String>,
}

/// What the runs of one group published, checked.
pub struct Checked {
    /// One packet per id.
    pub packets: BTreeMap<String, Packet>,
    /// Packets in the output topic, replays included.
    pub copies: usize,
    /// The events dead-lettered as late.
    pub late: BTreeSet<(i32, i64)>,
    /// Per packet id, the events it counts.
    pub counted: BTreeMap<String, BTreeSet<(i32, i64)>>,
}

impl Checked {
    /// How many distinct packets were closed for `reason`.
    pub fn closed_by(&self, reason: &str) -> usize {
        self.packets
            .values()
            .filter(|p| p.window.closed_by == reason)
            .count()
    }

    /// The window start of a packet, epoch milliseconds.
    pub fn start_of(p: &Packet) -> i64 {
        rfc3339_ms(p.window.start.as_deref().expect("a window packet"))
    }
}

/// A short description of a packet for failure messages.
pub fn describe(p: &Packet) -> String {
    format!(
        "{} (window {}, pane {:?}, closed by {}, valid {}, sources {:?})",
        p.packet_id,
        p.window.start.as_deref().unwrap_or("-"),
        p.window.pane,
        p.window.closed_by,
        p.events.valid,
        p.sources
            .iter()
            .map(|s| (s.partition, s.first_offset, s.last_offset))
            .collect::<Vec<_>>()
    )
}

pub fn rfc3339_ms(s: &str) -> i64 {
    chrono::DateTime::parse_from_rfc3339(s)
        .expect("RFC 3339")
        .timestamp_millis()
}

/// A packet without its emission time: what a replay must repeat.
pub fn content(p: &Packet) -> Value {
    let mut v = serde_json::to_value(p).expect("packet JSON");
    v.as_object_mut().expect("an object").remove("emitted_at");
    v
}

/// Reads `output` and `dlq` and checks them against the input (see the
/// module's documentation for what always holds, [`Expect`] for the rest).
pub fn check_windows(
    name: &str,
    bootstrap: &str,
    output: &str,
    dlq: &str,
    input: &Timed,
    expect: &Expect,
) -> Checked {
    let coords = input.coords();
    let times = input.times();
    let payloads: HashMap<(i32, i64), &[u8]> = coords
        .iter()
        .zip(&input.inputs)
        .map(|(c, m)| (*c, m.payload.as_slice()))
        .collect();
    let invalid: BTreeSet<(i32, i64)> = coords
        .iter()
        .zip(&input.malformed)
        .filter(|(_, bad)| **bad)
        .map(|(c, _)| *c)
        .collect();

    // Dead letters: at least once each, with the original bytes.
    let mut late = BTreeSet::new();
    let mut dead_invalid = BTreeSet::new();
    for d in read_all(bootstrap, dlq) {
        let c: (i32, i64) = (
            d.headers["source.partition"].parse().unwrap(),
            d.headers["source.offset"].parse().unwrap(),
        );
        let payload = payloads
            .get(&c)
            .unwrap_or_else(|| panic!("{name}: a dead letter of {c:?}, not in the input"));
        assert_eq!(
            d.payload, *payload,
            "{name}: dead letter {c:?} carries the original bytes"
        );
        if d.headers["error.kind"] == "late" {
            assert!(
                times.contains_key(&c),
                "{name}: {c:?} is dead-lettered as late but is not a valid event"
            );
            late.insert(c);
        } else {
            assert!(
                invalid.contains(&c),
                "{name}: valid event {c:?} dead-lettered as {}: {}",
                d.headers["error.kind"],
                d.headers["error.reason"]
            );
            dead_invalid.insert(c);
        }
    }
    assert!(
        !invalid.is_empty(),
        "{name}: the input has invalid messages"
    );
    assert_eq!(
        dead_invalid, invalid,
        "{name}: every invalid message is a dead letter"
    );

    // Packets: one content per id.
    let mut packets: BTreeMap<String, Packet> = BTreeMap::new();
    let mut copies = 0;
    let mut values = Vec::new();
    for r in read_all(bootstrap, output) {
        let p: Packet = serde_json::from_slice(&r.payload).expect("packet JSON");
        assert_eq!(
            r.key.as_deref(),
            Some(p.packet_id.as_bytes()),
            "{name}: keyed by packet_id"
        );
        copies += 1;
        match packets.get(&p.packet_id) {
            Some(first) => assert_eq!(
                content(first),
                content(&p),
                "{name}: packet id {} carries two contents",
                p.packet_id
            ),
            None => {
                values.push(serde_json::to_value(&p).unwrap());
                packets.insert(p.packet_id.clone(), p);
            }
        }
    }
    assert_schema_valid(&values);

    // What each packet counts: the valid events of its window within its
    // offset ranges, less the late ones. Its counts must be a naive count of
    // exactly those; an event both counted and dead-lettered as late makes
    // its packet's count one more than this.
    let parsed: HashMap<(i32, i64), Value> = times
        .keys()
        .map(|c| (*c, serde_json::from_slice(payloads[c]).unwrap()))
        .collect();
    let slices = default_slices();
    let mut counted: BTreeMap<String, BTreeSet<(i32, i64)>> = BTreeMap::new();
    for (id, p) in &packets {
        let start = Checked::start_of(p);
        assert_eq!(
            p.window.end.as_deref().map(rfc3339_ms),
            Some(start + SIZE_MS),
            "{name}: {id} is a window of the default length"
        );
        let mut events = BTreeSet::new();
        let (mut invalid_in, mut late_in) = (0u64, 0u64);
        for s in &p.sources {
            assert_eq!(s.topic, INPUT);
            for o in s.first_offset..=s.last_offset {
                let c = (s.partition, o);
                if invalid.contains(&c) {
                    invalid_in += 1;
                }
                if late.contains(&c) {
                    late_in += 1;
                }
                if times
                    .get(&c)
                    .is_some_and(|t| window_start(*t) == start && !late.contains(&c))
                {
                    events.insert(c);
                }
            }
        }
        assert_eq!(
            p.events.valid,
            events.len() as u64,
            "{name}: valid count of {id} (window {start}, {:?}, closed by {}); one more than the window's on-time events in its ranges means an event was both counted and dead-lettered as late",
            p.sources, p.window.closed_by
        );
        assert_eq!(
            p.events.invalid, invalid_in,
            "{name}: invalid count of {id}"
        );
        if !expect.given_up.contains(id) {
            assert_eq!(p.events.late, Some(late_in), "{name}: late count of {id}");
        }
        let values: Vec<Value> = events.iter().map(|c| parsed[c].clone()).collect();
        assert_eq!(p.metrics.len(), slices.len());
        for (i, slice) in slices.iter().enumerate() {
            let (groups, dups, mut rows) = naive_counts(&values, slice);
            let m = &p.metrics[i];
            assert_eq!(
                (m.groups, m.duplicate_groups),
                (groups, dups),
                "{name}: {slice:?} in {id}"
            );
            rows.truncate(100);
            assert_eq!(packet_rows(p, i), rows, "{name}: rows of {slice:?} in {id}");
        }
        counted.insert(id.clone(), events);
    }

    // Each valid event: in exactly one distinct packet, or late.
    let mut by_event: HashMap<(i32, i64), Vec<&str>> = HashMap::new();
    for (id, events) in &counted {
        if expect.given_up.contains(id) {
            continue;
        }
        for c in events {
            by_event.entry(*c).or_default().push(id);
        }
    }
    let mut lost = Vec::new();
    for c in times.keys() {
        match (by_event.get(c).map_or(0, Vec::len), late.contains(c)) {
            (1, false) | (0, true) => {}
            (0, false) => lost.push(*c),
            (n, _) => {
                let which: Vec<String> = by_event[c]
                    .iter()
                    .map(|id| {
                        let p = &packets[*id];
                        format!(
                            "{id} (pane {:?}, closed by {}, valid {}, sources {:?})",
                            p.window.pane,
                            p.window.closed_by,
                            p.events.valid,
                            p.sources
                                .iter()
                                .map(|s| (s.partition, s.first_offset, s.last_offset))
                                .collect::<Vec<_>>()
                        )
                    })
                    .collect();
                panic!(
                    "{name}: event {c:?} (time {}, window {}) is counted in {n} distinct packets: {which:#?}",
                    times[c],
                    window_start(times[c])
                )
            }
        }
    }
    lost.sort();
    assert!(
        lost.is_empty(),
        "{name}: {} valid events neither counted nor late, the first {:?}",
        lost.len(),
        &lost[..lost.len().min(10)]
    );

    if expect.oracle_late {
        let want = input.oracle_late();
        let on_time_but_late: Vec<_> = late.difference(&want).collect();
        let late_but_counted: Vec<_> = want.difference(&late).collect();
        assert!(
            on_time_but_late.is_empty() && late_but_counted.is_empty(),
            "{name}: the late dead letters are not the oracle's: {} on time but dead-lettered as late, the first {:?}; {} late but not dead-lettered, the first {:?}",
            on_time_but_late.len(),
            &on_time_but_late[..on_time_but_late.len().min(10)],
            late_but_counted.len(),
            &late_but_counted[..late_but_counted.len().min(10)]
        );
    }
    eprintln!(
        "{name}: {} packets ({copies} copies; closed by watermark {}, wait {}), {} late, {} invalid",
        packets.len(),
        packets
            .values()
            .filter(|p| p.window.closed_by == "watermark")
            .count(),
        packets
            .values()
            .filter(|p| p.window.closed_by == "wait")
            .count(),
        late.len(),
        invalid.len()
    );
    Checked {
        packets,
        copies,
        late,
        counted,
    }
}

/// Asserts that windows closed on flowing traffic (by watermark) and at the
/// end of the input (by wait, after `batch.max_wait` of silence).
pub fn assert_closed_by_watermark_and_wait(name: &str, checked: &Checked) {
    assert!(
        checked.closed_by("watermark") > 0 && checked.closed_by("wait") > 0,
        "{name}: windows close by watermark during the run and by wait at its end: {:?}",
        checked
            .packets
            .values()
            .map(|p| p.window.closed_by.as_str())
            .collect::<Vec<_>>()
    );
}

/// Window mode's commit order, over the processes of one group: read in the
/// order each process wrote them, every "offsets committed" line passes only
/// events that are late or counted in a packet whose "packet published" line
/// (window start and offset ranges) came before it, in this process's log or
/// an earlier-checked one's. A partition a process takes over starts at the
/// committed offset it restored ("window checkpoint restored"): what lies
/// below was committed, and checked, where it was read.
pub struct WindowCommitOrder {
    window_of: HashMap<(i32, i64), i64>,
    published: HashMap<(i64, i32), Vec<(i64, i64)>>,
}

impl WindowCommitOrder {
    /// `late`: the events dead-lettered as late, which no packet needs.
    pub fn new(input: &Timed, late: &BTreeSet<(i32, i64)>) -> WindowCommitOrder {
        WindowCommitOrder {
            window_of: input
                .times()
                .into_iter()
                .filter(|(c, _)| !late.contains(c))
                .map(|(c, t)| (c, window_start(t)))
                .collect(),
            published: HashMap::new(),
        }
    }

    /// Checks one process's log; `from` is what was committed when it
    /// started (-1: nothing). Returns its last committed offsets (or `from`)
    /// and how many commits it logged.
    pub fn check(&mut self, name: &str, stderr: &str, from: &[i64]) -> (Vec<i64>, usize) {
        let mut done: Vec<i64> = from.iter().map(|o| (*o).max(0)).collect();
        let mut commits = 0;
        for line in stderr.lines() {
            for l in logged(line) {
                match l {
                    Logged::Published {
                        window_start,
                        sources,
                    } => {
                        let w = window_start.expect("a window packet");
                        for (p, a, b) in sources {
                            self.published.entry((w, p)).or_default().push((a, b));
                        }
                    }
                    Logged::Committed(offsets) => {
                        commits += 1;
                        for (p, o) in offsets {
                            let d = &mut done[p as usize];
                            for off in *d..o {
                                let Some(w) = self.window_of.get(&(p, off)) else {
                                    continue;
                                };
                                let covered = self.published.get(&(*w, p)).is_some_and(|rs| {
                                    rs.iter().any(|(a, b)| (*a..=*b).contains(&off))
                                });
                                assert!(
                                    covered,
                                    "{name}: committed {p}:{o} before a packet of window {w} counting offset {off} was published"
                                );
                            }
                            *d = (*d).max(o);
                        }
                    }
                    Logged::Revoked { .. } => {}
                }
            }
            if let Some((p, committed)) = restored(line) {
                done[p as usize] = done[p as usize].max(committed);
            }
        }
        (done, commits)
    }
}

/// A "window checkpoint restored" line: the partition and the committed
/// offset found with it.
fn restored(line: &str) -> Option<(i32, i64)> {
    let v: Value = serde_json::from_str(line).ok()?;
    if v["message"] != "window checkpoint restored" {
        return None;
    }
    let p = v["partition"].as_i64()? as i32;
    let committed = v["committed"]
        .as_str()?
        .strip_prefix("Some(")?
        .strip_suffix(')')?
        .parse()
        .ok()?;
    Some((p, committed))
}

/// The partitions a process's log says were last assigned to it.
pub fn assigned(stderr: &str) -> Vec<i32> {
    let mut last = Vec::new();
    for line in stderr.lines() {
        let Ok(v) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        if v["message"] == "partitions assigned" {
            last = v["partitions"]
                .as_str()
                .unwrap_or_default()
                .split(',')
                .filter_map(|s| s.rsplit_once('/')?.1.parse().ok())
                .collect();
        }
    }
    last
}

/// The partitions `packets` count events of.
pub fn partitions_of(packets: &[Packet]) -> BTreeSet<i32> {
    packets
        .iter()
        .flat_map(|p| p.sources.iter().map(|s| s.partition))
        .collect()
}

/// Input produced in the background, in order, at a steady rate, the way a
/// live stream arrives: the service never finds it all in the topic at once.
pub struct Feed {
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicUsize>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl Feed {
    /// Starts producing `inputs` to `topic`, `per_second` messages a second,
    /// until they are all sent or [`Feed::stop`].
    pub fn start(bootstrap: &str, topic: &str, inputs: Vec<Input>, per_second: f64) -> Feed {
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicUsize::new(0));
        let (bootstrap, topic) = (bootstrap.to_string(), topic.to_string());
        let handle = {
            let (stop, sent) = (stop.clone(), sent.clone());
            std::thread::spawn(move || {
                let producer: BaseProducer = ClientConfig::new()
                    .set("bootstrap.servers", &bootstrap)
                    .set("enable.idempotence", "true")
                    .set("linger.ms", "5")
                    // librdkafka's mock cluster keeps 5 MB of each partition's
                    // log as it was produced; compressed, it keeps more messages.
                    .set("compression.type", "lz4")
                    .create()
                    .expect("feed producer");
                let started = Instant::now();
                let mut n = 0;
                while n < inputs.len() && !stop.load(Ordering::Relaxed) {
                    let due =
                        ((started.elapsed().as_secs_f64() * per_second) as usize).min(inputs.len());
                    while n < due {
                        let m = &inputs[n];
                        let mut r = BaseRecord::<str, [u8]>::to(&topic)
                            .partition(m.partition)
                            .payload(&m.payload);
                        if let Some(k) = &m.key {
                            r = r.key(k.as_str());
                        }
                        loop {
                            match producer.send(r) {
                                Ok(()) => break,
                                Err((_, back)) => {
                                    producer.poll(Duration::from_millis(20));
                                    r = back;
                                }
                            }
                        }
                        n += 1;
                        sent.store(n, Ordering::Relaxed);
                    }
                    producer.poll(Duration::from_millis(20));
                }
                producer
                    .flush(Duration::from_secs(60))
                    .expect("the feed's input delivered");
            })
        };
        Feed {
            stop,
            sent,
            handle: Some(handle),
        }
    }

    /// Messages handed to the producer so far.
    pub fn sent(&self) -> usize {
        self.sent.load(Ordering::Relaxed)
    }

    /// Stops producing and waits until every message handed to the producer
    /// is acknowledged; returns how many there were (the first ones of the
    /// input, in order).
    pub fn stop(self) -> usize {
        self.stop.store(true, Ordering::Relaxed);
        self.finish()
    }

    /// Waits until every message is produced and acknowledged; returns how many.
    pub fn finish(mut self) -> usize {
        self.handle
            .take()
            .expect("running")
            .join()
            .expect("the feed's thread");
        self.sent()
    }
}

impl Drop for Feed {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}
