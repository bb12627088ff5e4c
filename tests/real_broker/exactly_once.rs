//! Exactly once on Apache Kafka: with `delivery.guarantee = "exactly_once"`
//! each commit's packets, dead letters, window checkpoints and input
//! offsets are one Kafka transaction, under the transactional.id
//! `<kafka.group_id>.<kafka.instance_name>`, so that a restarted instance
//! fences what its predecessor left open. Read with `isolation.level =
//! read_committed`, the output holds every window once and the dead-letter
//! topic every late or invalid message once, whatever kill -9 left behind;
//! the metrics log holds every committed packet once; and a member that
//! was stopped while it held a transaction open, and resumed after its
//! partitions moved to another instance, publishes nothing a reader sees.
//! Windows are compared with the independent per-partition oracle of
//! `crate::common::windowed` (lateness) and naive counts
//! (`crate::common::reference`).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::Path;
use std::time::{Duration, Instant};

use login_metrics::core::packet::Packet;
use rand::{Rng, SeedableRng};
use serde_json::Value;

use crate::common::broker::Broker;
use crate::common::output::Read;
use crate::common::service::Service;
use crate::common::transactions::{read_isolated, wait_no_open_transaction, Isolation, Watermarks};
use crate::common::windowed::{
    assigned, describe, rfc3339_ms, timed_input, window_start, Checked, Feed, Timed, SIZE_MS,
};
use crate::common::*;

const READY: Duration = Duration::from_secs(60);
/// The bound of every wait for the service to finish something.
const DONE: Duration = Duration::from_secs(300);
const PARTITIONS: i32 = 6;
/// librdkafka's `transaction.timeout.ms`, the longest a transaction left
/// open by a vanished process holds back read_committed readers, and a
/// margin for the broker's sweep of timed-out transactions.
const OPEN_TRANSACTIONS_END: Duration = Duration::from_secs(120);

/// What the service is asked to deliver.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Guarantee {
    ExactlyOnce,
    /// The default: the same runs without `delivery.guarantee`. No test
    /// asks for it; it is there to see these tests fail (a window replayed
    /// after kill -9 is published again) by running them with it.
    #[allow(dead_code)]
    AtLeastOnce,
}

/// The topics of one test, named after it.
struct Topics {
    input: String,
    output: String,
    dlq: String,
    checkpoints: String,
}

impl Topics {
    fn of(test: &str) -> Topics {
        Topics {
            input: format!("{INPUT}-{test}"),
            output: format!("{OUTPUT}-{test}"),
            dlq: format!("{DLQ}-{test}"),
            checkpoints: format!("login-metrics-checkpoints-{test}"),
        }
    }

    /// The input with [`PARTITIONS`], the output and dead-letter topics
    /// with one each; the service creates its checkpoint topic.
    async fn create(&self, b: &Broker) {
        b.create_topic(&self.input, PARTITIONS).await;
        b.create_topic(&self.output, 1).await;
        b.create_topic(&self.dlq, 1).await;
    }
}

/// The service's environment: the defaults (window mode, default windows),
/// then only what a test must set — the broker, its topics, the group, the
/// instance's name (a restart under it takes the place of, and fences, its
/// predecessor) and the guarantee — then `extra` (`SECTION__KEY`, value).
/// The metrics log's path, the telemetry listener and the JSON log format
/// are set by [`Service::start`].
fn env(
    bootstrap: &str,
    t: &Topics,
    group: &str,
    instance: &str,
    guarantee: Guarantee,
    extra: &[(&str, &str)],
) -> Vec<(String, String)> {
    let mut vars: Vec<(&str, &str)> = vec![
        ("KAFKA__BOOTSTRAP_SERVERS", bootstrap),
        ("KAFKA__GROUP_ID", group),
        ("KAFKA__INSTANCE_NAME", instance),
        ("KAFKA__INPUT_TOPIC", &t.input),
        ("KAFKA__OUTPUT_TOPIC", &t.output),
        ("KAFKA__DLQ_TOPIC", &t.dlq),
        ("KAFKA__CHECKPOINT_TOPIC", &t.checkpoints),
    ];
    if guarantee == Guarantee::ExactlyOnce {
        vars.push(("DELIVERY__GUARANTEE", "exactly_once"));
    }
    vars.extend_from_slice(extra);
    vars.iter()
        .map(|(k, v)| (format!("LOGIN_METRICS__{k}"), v.to_string()))
        .collect()
}

/// The oracle of an input read whole: the windows with the messages (by
/// index in production order) on time for them, the late events by the
/// per-partition oracle, the invalid messages, and each partition's end.
struct Oracle {
    coords: Vec<(i32, i64)>,
    windows: BTreeMap<i64, Vec<usize>>,
    late: BTreeSet<(i32, i64)>,
    invalid: BTreeSet<(i32, i64)>,
    ends: Vec<i64>,
}

impl Oracle {
    fn of(input: &Timed) -> Oracle {
        let coords = input.coords();
        let late = input.oracle_late();
        let mut windows: BTreeMap<i64, Vec<usize>> = BTreeMap::new();
        let mut invalid = BTreeSet::new();
        let mut ends = vec![0i64; PARTITIONS as usize];
        for (i, (c, ts)) in coords.iter().zip(&input.ts).enumerate() {
            ends[c.0 as usize] = ends[c.0 as usize].max(c.1 + 1);
            match ts {
                None => {
                    invalid.insert(*c);
                }
                Some(t) if !late.contains(c) => {
                    windows.entry(window_start(*t)).or_default().push(i)
                }
                Some(_) => {}
            }
        }
        Oracle {
            coords,
            windows,
            late,
            invalid,
            ends,
        }
    }
}

fn sum(offsets: &[i64]) -> i64 {
    offsets.iter().map(|o| (*o).max(0)).sum()
}

/// What a reader with `read_committed` sees is exact: every packet once (no
/// `packet_id` twice, no window twice), exactly the oracle's windows, each
/// with the oracle's counts over the whole window, and every late or
/// invalid message once in the dead-letter topic. Returns the packets by id.
fn assert_exact(
    name: &str,
    topic: &str,
    output: &[Read],
    dead: &[Read],
    input: &Timed,
    oracle: &Oracle,
) -> BTreeMap<String, Packet> {
    // Each packet once.
    let mut by_id: BTreeMap<String, Vec<(i64, Packet)>> = BTreeMap::new();
    for r in output {
        let p: Packet = serde_json::from_slice(&r.payload).expect("packet JSON");
        assert_eq!(
            r.key.as_deref(),
            Some(p.packet_id.as_bytes()),
            "{name}: keyed by packet_id"
        );
        by_id
            .entry(p.packet_id.clone())
            .or_default()
            .push((r.offset, p));
    }
    let twice: Vec<String> = by_id
        .values()
        .filter(|copies| copies.len() > 1)
        .map(|copies| {
            format!(
                "{} at output offsets {:?}",
                describe(&copies[0].1),
                copies.iter().map(|(o, _)| *o).collect::<Vec<_>>()
            )
        })
        .collect();
    assert!(
        twice.is_empty(),
        "{name}: {} of {} packets are visible to read_committed more than once ({} records); the first: {:#?}",
        twice.len(),
        by_id.len(),
        output.len(),
        &twice[..twice.len().min(5)]
    );
    let packets: BTreeMap<String, Packet> = by_id
        .into_iter()
        .map(|(id, mut copies)| (id, copies.remove(0).1))
        .collect();

    // Each window once, and exactly the oracle's.
    let mut by_window: BTreeMap<i64, Vec<&Packet>> = BTreeMap::new();
    for p in packets.values() {
        by_window.entry(Checked::start_of(p)).or_default().push(p);
    }
    let split: Vec<String> = by_window
        .iter()
        .filter(|(_, ps)| ps.len() > 1)
        .map(|(w, ps)| {
            format!(
                "{w}: {:#?}",
                ps.iter().map(|p| describe(p)).collect::<Vec<_>>()
            )
        })
        .collect();
    assert!(
        split.is_empty(),
        "{name}: {} windows are published more than once (under several ids): {}",
        split.len(),
        split[..split.len().min(3)].join("\n")
    );
    let published: BTreeSet<i64> = by_window.keys().copied().collect();
    let want: BTreeSet<i64> = oracle.windows.keys().copied().collect();
    assert_eq!(
        published.len(),
        want.len(),
        "{name}: the windows published; missing {:?}, not the oracle's {:?}",
        want.difference(&published).take(10).collect::<Vec<_>>(),
        published.difference(&want).take(10).collect::<Vec<_>>()
    );
    assert_eq!(published, want, "{name}: the windows published");

    // Each window's packet is the whole window: its sources are its events'
    // offset ranges, its counts those of the events, invalid and late
    // messages within them, and its metrics a naive count of the events.
    let invalid_at: HashSet<(i32, i64)> = oracle.invalid.iter().copied().collect();
    let late_at: HashSet<(i32, i64)> = oracle.late.iter().copied().collect();
    for (start, ps) in &by_window {
        let p = ps[0];
        let events = &oracle.windows[start];
        assert_eq!(
            p.window.pane,
            Some(0),
            "{name}: {} is not split",
            describe(p)
        );
        assert_eq!(
            p.window.end.as_deref().map(rfc3339_ms),
            Some(start + SIZE_MS),
            "{name}: {} is a window of the default length",
            describe(p)
        );
        assert!(
            matches!(p.window.closed_by.as_str(), "watermark" | "wait"),
            "{name}: {}",
            describe(p)
        );
        let mut ranges: BTreeMap<i32, (i64, i64)> = BTreeMap::new();
        for i in events {
            let (part, o) = oracle.coords[*i];
            let r = ranges.entry(part).or_insert((o, o));
            r.0 = r.0.min(o);
            r.1 = r.1.max(o);
        }
        let sources: BTreeMap<i32, (i64, i64)> = p
            .sources
            .iter()
            .map(|s| (s.partition, (s.first_offset, s.last_offset)))
            .collect();
        assert!(
            p.sources.iter().all(|s| s.topic == topic),
            "{name}: {}",
            describe(p)
        );
        assert_eq!(sources, ranges, "{name}: the sources of window {start}");
        assert_eq!(
            p.events.valid,
            events.len() as u64,
            "{name}: valid events in window {start}"
        );
        let (mut invalid, mut late) = (0u64, 0u64);
        for (part, (a, b)) in &ranges {
            for o in *a..=*b {
                invalid += u64::from(invalid_at.contains(&(*part, o)));
                late += u64::from(late_at.contains(&(*part, o)));
            }
        }
        assert_eq!(
            p.events.invalid, invalid,
            "{name}: invalid in window {start}"
        );
        assert_eq!(p.events.late, Some(late), "{name}: late in window {start}");
    }
    let slices = default_slices();
    let jobs: Vec<(&Packet, &Vec<usize>)> = by_window
        .iter()
        .map(|(start, ps)| (ps[0], &oracle.windows[start]))
        .collect();
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get());
    std::thread::scope(|s| {
        for chunk in jobs.chunks(jobs.len().div_ceil(workers).max(1)) {
            let slices = &slices;
            s.spawn(move || {
                for (p, events) in chunk {
                    let values: Vec<Value> = events
                        .iter()
                        .map(|i| serde_json::from_slice(&input.inputs[*i].payload).unwrap())
                        .collect();
                    assert_eq!(p.metrics.len(), slices.len());
                    for (k, slice) in slices.iter().enumerate() {
                        let (groups, dups, mut rows) = naive_counts(&values, slice);
                        let m = &p.metrics[k];
                        assert_eq!(
                            (m.groups, m.duplicate_groups),
                            (groups, dups),
                            "{name}: {slice:?} in {}",
                            describe(p)
                        );
                        rows.truncate(100);
                        assert_eq!(
                            packet_rows(p, k),
                            rows,
                            "{name}: rows of {slice:?} in {}",
                            describe(p)
                        );
                    }
                }
            });
        }
    });
    let values: Vec<Value> = packets
        .values()
        .map(|p| serde_json::to_value(p).unwrap())
        .collect();
    assert_schema_valid(&values);

    // Every late or invalid message once in the dead-letter topic, with its
    // original bytes.
    let index: HashMap<(i32, i64), usize> = oracle
        .coords
        .iter()
        .enumerate()
        .map(|(i, c)| (*c, i))
        .collect();
    let mut letters: BTreeMap<(i32, i64), Vec<(i64, String)>> = BTreeMap::new();
    for d in dead {
        let c: (i32, i64) = (
            d.headers["source.partition"].parse().unwrap(),
            d.headers["source.offset"].parse().unwrap(),
        );
        let i = *index
            .get(&c)
            .unwrap_or_else(|| panic!("{name}: a dead letter of {c:?}, not in the input"));
        assert_eq!(
            d.payload, input.inputs[i].payload,
            "{name}: the dead letter of {c:?} carries the original bytes"
        );
        letters
            .entry(c)
            .or_default()
            .push((d.offset, d.headers["error.kind"].clone()));
    }
    let twice: Vec<_> = letters.iter().filter(|(_, ls)| ls.len() > 1).collect();
    assert!(
        twice.is_empty(),
        "{name}: {} messages are dead letters visible to read_committed more than once; the first: {:?}",
        twice.len(),
        &twice[..twice.len().min(5)]
    );
    let late: BTreeSet<(i32, i64)> = letters
        .iter()
        .filter(|(_, ls)| ls[0].1 == "late")
        .map(|(c, _)| *c)
        .collect();
    let invalid: BTreeSet<(i32, i64)> = letters
        .iter()
        .filter(|(_, ls)| ls[0].1 != "late")
        .map(|(c, _)| *c)
        .collect();
    assert!(!oracle.late.is_empty() && !oracle.invalid.is_empty());
    assert_eq!(
        invalid, oracle.invalid,
        "{name}: every invalid message is a dead letter, once"
    );
    assert_eq!(
        late, oracle.late,
        "{name}: every late event is a dead letter, once, and no on-time one"
    );
    packets
}

/// The packets of a metrics log, in order; the log must not have rotated
/// (its size is far below `metrics_log.max_bytes`).
fn metrics_log(path: &Path) -> Vec<Packet> {
    for rotated in [".0", ".1.gz"] {
        let mut r = path.as_os_str().to_owned();
        r.push(rotated);
        assert!(
            !Path::new(&r).exists(),
            "{} rotated: the check reads one file",
            path.display()
        );
    }
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).expect("a packet line"))
        .collect()
}

/// The metrics log holds each committed packet exactly once, as published.
fn assert_logged_once(name: &str, logged: &[Packet], committed: &BTreeMap<String, Packet>) {
    let mut seen: BTreeMap<&str, usize> = BTreeMap::new();
    for p in logged {
        *seen.entry(&p.packet_id).or_default() += 1;
    }
    let twice: Vec<String> = logged
        .iter()
        .filter(|p| seen[p.packet_id.as_str()] > 1)
        .map(describe)
        .collect();
    assert!(
        twice.is_empty(),
        "{name}: {} lines of the metrics log repeat a packet: {:#?}",
        twice.len(),
        &twice[..twice.len().min(6)]
    );
    let ids: BTreeSet<&str> = seen.keys().copied().collect();
    let want: BTreeSet<&str> = committed.keys().map(String::as_str).collect();
    assert!(
        ids == want,
        "{name}: the metrics log holds {} packets, the output topic {} committed ones; logged but not committed: {:?}; committed but not logged: {:?}",
        ids.len(),
        want.len(),
        ids.difference(&want).take(10).collect::<Vec<_>>(),
        want.difference(&ids).take(10).collect::<Vec<_>>()
    );
    for p in logged {
        assert_eq!(
            p, &committed[&p.packet_id],
            "{name}: the metrics log's line is the packet published"
        );
    }
}

/// Records a `read_uncommitted` reader sees and a `read_committed` one does
/// not: those of aborted transactions (once none is open).
fn aborted(all: &[Read], visible: &[Read]) -> Vec<(i32, i64)> {
    let seen: HashSet<(i32, i64)> = visible.iter().map(|r| (r.partition, r.offset)).collect();
    all.iter()
        .map(|r| (r.partition, r.offset))
        .filter(|c| !seen.contains(c))
        .collect()
}

fn committed_of(bootstrap: &str, group: &str, t: &Topics) -> Vec<i64> {
    committed_on(bootstrap, group, &t.input, PARTITIONS)
}

/// The seed of the kill schedule (printed with the schedule).
const KILL_SEED: u64 = 20_261_204;

/// The acceptance test's run, for either guarantee: 1,000,000 messages
/// whose event times span 400 windows of 2,500 events, with stragglers,
/// late events and invalid messages ([`timed_input`]), preloaded on six
/// partitions; five runs killed with SIGKILL at seeded random points (each
/// a random delay after the group's commits passed a random point of the
/// input, so every run processes some of it; with transactions, two of
/// them at the next moment after that the process holds a transaction open
/// with records in it), then one to the end.
async fn killed_five_times(guarantee: Guarantee) {
    let started = Instant::now();
    let test = match guarantee {
        Guarantee::ExactlyOnce => "eo",
        Guarantee::AtLeastOnce => "alo",
    };
    let t = Topics::of(test);
    let group = format!("{test}-group");
    let b = Broker::start();
    t.create(&b).await;
    let dir = tempfile::tempdir().unwrap();
    let input = timed_input(1_000_003, 50_000, 1_000_000, PARTITIONS, 4.0);
    let oracle = Oracle::of(&input);
    produce(&b.bootstrap, &t.input, &input.inputs);
    eprintln!(
        "{test}: {} messages produced ({} windows, {} late, {} invalid) after {:.1}s",
        input.inputs.len(),
        oracle.windows.len(),
        oracle.late.len(),
        oracle.invalid.len(),
        started.elapsed().as_secs_f64()
    );
    let e = env(&b.bootstrap, &t, &group, test, guarantee, &[]);
    let total = sum(&oracle.ends);

    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(KILL_SEED);
    eprintln!("{test}: kill schedule seed {KILL_SEED}");
    let w = Watermarks::new(&b.bootstrap);
    let mut killed_inside = 0;
    for i in 0..5 {
        let before = committed_of(&b.bootstrap, &group, &t);
        // A point in the i-th fifth of 5 %..85 % of the input, at least 2 %
        // past what is committed, and a delay after it.
        let (lo, hi) = (0.05 + 0.16 * i as f64, 0.05 + 0.16 * (i + 1) as f64);
        let target = (total as f64 * rng.gen_range(lo..hi)) as i64;
        let target = target.max(sum(&before) + total / 50);
        let delay = Duration::from_millis(rng.gen_range(0..800));
        // Runs 1 and 3, with transactions, are then killed inside one: at
        // the next moment the process holds a transaction open with
        // packets or dead letters in it (stopped there first, and checked).
        let inside = guarantee == Guarantee::ExactlyOnce && i % 2 == 1;
        let run = Instant::now();
        // The same name each time: the same metrics log, and the same instance.
        let mut svc = Service::start(dir.path(), test, &e);
        svc.wait_for(
            &format!("run {i}: {target} messages committed"),
            DONE,
            |_| sum(&committed_of(&b.bootstrap, &group, &t)) >= target,
        );
        std::thread::sleep(delay);
        let caught = inside && stop_holding_a_transaction(&mut svc, &w, &[&t.output, &t.dlq]);
        killed_inside += usize::from(caught);
        svc.signal("KILL");
        assert_eq!(
            svc.wait_exit(Duration::from_secs(10)),
            None,
            "run {i}: killed by the signal"
        );
        let after = committed_of(&b.bootstrap, &group, &t);
        assert!(
            sum(&after) < total,
            "run {i}: killed before the input was done: committed {after:?}"
        );
        eprintln!(
            "{test}: run {i}: killed {} ms after {target} messages were committed{} ({:.1}s after its start); committed {} -> {}; the metrics log holds {} lines",
            delay.as_millis(),
            if caught { ", inside an open transaction" } else { "" },
            run.elapsed().as_secs_f64(),
            sum(&before),
            sum(&after),
            svc.logged_packets().len()
        );
    }
    let mut last = Service::start(dir.path(), test, &e);
    last.wait_for("the whole input committed", DONE, |_| {
        committed_of(&b.bootstrap, &group, &t) == oracle.ends
    });
    last.signal("TERM");
    assert_eq!(last.wait_exit(DONE), Some(0), "{}", last.stderr_tail(40));
    eprintln!(
        "{test}: the last run committed the input; {:.1}s since the test's start",
        started.elapsed().as_secs_f64()
    );

    wait_no_open_transaction(&b.bootstrap, &[&t.output, &t.dlq], OPEN_TRANSACTIONS_END);
    let output = read_isolated(&b.bootstrap, &t.output, Isolation::ReadCommitted);
    let dead = read_isolated(&b.bootstrap, &t.dlq, Isolation::ReadCommitted);
    let all_output = read_isolated(&b.bootstrap, &t.output, Isolation::ReadUncommitted);
    let all_dead = read_isolated(&b.bootstrap, &t.dlq, Isolation::ReadUncommitted);
    let (aborted_output, aborted_dead) = (
        aborted(&all_output, &output).len(),
        aborted(&all_dead, &dead).len(),
    );
    eprintln!(
        "{test}: read_committed sees {} packets and {} dead letters; read_uncommitted {} and {}: {aborted_output} packets and {aborted_dead} dead letters of aborted transactions",
        output.len(),
        dead.len(),
        all_output.len(),
        all_dead.len(),
    );
    // A transaction a kill left open with records in it is aborted: by the
    // restart's fencing, or by the broker when it times out.
    assert!(
        killed_inside == 0 || aborted_output + aborted_dead > 0,
        "{test}: {killed_inside} runs were killed inside an open transaction, and no record of an aborted one is in the topics"
    );
    let committed = assert_exact(test, &t.input, &output, &dead, &input, &oracle);
    let logged = metrics_log(&last.log_path);
    assert_logged_once(test, &logged, &committed);
    eprintln!(
        "{test}: {} windows published once each, {} dead letters once each, the metrics log holds each packet once; {:.1}s",
        committed.len(),
        dead.len(),
        started.elapsed().as_secs_f64()
    );
}

/// The acceptance test: a million messages on six partitions, the service
/// killed with SIGKILL five times at seeded random points while it
/// processes and started again each time under its name, then run to the
/// end. With read_committed, every window's packet is in the output topic
/// once (no `packet_id` twice, no window twice) with the oracle's counts of
/// the whole window, every late or invalid message is in the dead-letter
/// topic once, and the metrics log holds each committed packet once. How
/// many records of aborted transactions a read_uncommitted reader sees is
/// printed; there is at least one when a run was killed inside an open
/// transaction (caught open, the usual case; how many depends on where the
/// kills land).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exactly_once_survives_five_kills_with_each_window_published_once() {
    killed_five_times(Guarantee::ExactlyOnce).await;
}

/// The state of a process ('T': stopped), from /proc.
fn process_state(svc: &Service) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", svc.child.id())).ok()?;
    stat.rsplit_once(')')?.1.trim_start().chars().next()
}

fn wait_stopped(svc: &Service) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while process_state(svc) != Some('T') {
        assert!(Instant::now() < deadline, "the process did not stop");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Stops `svc` with SIGSTOP at a moment it holds a transaction open with
/// records in one of `topics` (visible to read_uncommitted, not to
/// read_committed). A transaction whose commit was on its way when the
/// signal landed ends by itself; then the process is let go (SIGCONT) and
/// caught again. Returns whether a transaction was caught open; after a
/// minute without one, the process is stopped mid-stream all the same.
fn stop_holding_a_transaction(svc: &mut Service, w: &Watermarks, topics: &[&str]) -> bool {
    let open = || topics.iter().any(|t| !w.open_transactions(t).is_empty());
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut tries = 0;
    while Instant::now() < deadline {
        svc.assert_running();
        if !open() {
            continue;
        }
        svc.signal("STOP");
        wait_stopped(svc);
        tries += 1;
        // A commit already on its way lands within this.
        std::thread::sleep(Duration::from_millis(500));
        if open() {
            eprintln!("stopped holding an open transaction (try {tries})");
            return true;
        }
        svc.signal("CONT");
    }
    svc.signal("STOP");
    wait_stopped(svc);
    eprintln!("no open transaction caught in {tries} tries: stopped mid-stream");
    false
}

/// How many times the process's log says partitions were assigned to it.
fn assignments(stderr: &str) -> usize {
    stderr
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["message"] == "partitions assigned")
        .count()
}

/// The zombie run, for either guarantee. Instance A reads a stream
/// produced live (2,000 messages a second, a window of event time closing
/// every 1.25 s) with a 6 s session and a 10 s transaction timeout; it is
/// stopped with SIGSTOP while it holds a transaction open. Instance B, of
/// the same group under another name (so another transactional.id, which
/// does not fence A's), takes every partition once A's session has timed
/// out and processes the whole input, its last windows closed by wait,
/// while A stays stopped (the broker aborts A's transaction when it times
/// out). Then A is let go (SIGCONT) with the windows it held open and work
/// it had not committed, until it stops or rejoins the group, and is
/// stopped with SIGTERM if it runs still.
async fn zombie(guarantee: Guarantee) {
    let started = Instant::now();
    let test = match guarantee {
        Guarantee::ExactlyOnce => "zombie",
        Guarantee::AtLeastOnce => "zombie-alo",
    };
    let t = Topics::of(test);
    let group = test;
    let b = Broker::start();
    t.create(&b).await;
    let dir = tempfile::tempdir().unwrap();
    let all = timed_input(83, 5_000, 240_000, PARTITIONS, 4.0);
    let e = |instance: &str| {
        env(
            &b.bootstrap,
            &t,
            group,
            instance,
            guarantee,
            &[
                ("KAFKA__CONSUMER__SESSION_TIMEOUT_MS", "6000"),
                ("KAFKA__CONSUMER__HEARTBEAT_INTERVAL_MS", "500"),
                ("KAFKA__PRODUCER__TRANSACTION_TIMEOUT_MS", "10000"),
                ("KAFKA__DELIVERY_TIMEOUT", "5s"),
                ("TELEMETRY__PROGRESS_INTERVAL", "1s"),
            ],
        )
    };
    let mut a = Service::start(dir.path(), "a", &e(&format!("{test}-a")));
    a.wait_ready(READY);
    let feed = Feed::start(&b.bootstrap, &t.input, all.inputs.clone(), 2_000.0);
    a.wait_for("a publishes and commits", DONE, |s| {
        s.logged_packets().len() >= 3 && sum(&committed_of(&b.bootstrap, group, &t)) > 0
    });
    let w = Watermarks::new(&b.bootstrap);
    let caught = stop_holding_a_transaction(&mut a, &w, &[&t.output, &t.dlq]);
    let at_stop = committed_of(&b.bootstrap, group, &t);
    let a_logged = a.logged_packets().len();
    eprintln!(
        "{test}: a stopped {:.1}s after the start, holding an open transaction: {caught}; committed {at_stop:?}; {a_logged} packets in a's metrics log",
        started.elapsed().as_secs_f64()
    );

    let mut other = Service::start(dir.path(), "b", &e(&format!("{test}-b")));
    other.wait_for("b holds every partition and commits past a", DONE, |s| {
        assigned(&s.stderr()).len() == PARTITIONS as usize && {
            let now = committed_of(&b.bootstrap, group, &t);
            now.iter()
                .zip(&at_stop)
                .all(|(n, a)| *n >= (*a).max(0) + 1_000)
        }
    });
    let n = feed.stop();
    let input = all.prefix(n);
    let oracle = Oracle::of(&input);
    other.wait_for("b commits the whole input", DONE, |_| {
        committed_of(&b.bootstrap, group, &t) == oracle.ends
    });
    eprintln!(
        "{test}: b committed all {n} messages {:.1}s after the start",
        started.elapsed().as_secs_f64()
    );

    // A resumes: whatever it sends from now on lies past these marks.
    let marks: BTreeMap<(String, i32), i64> = [&t.output, &t.dlq]
        .iter()
        .flat_map(|topic| {
            w.ends(topic)
                .into_iter()
                .map(|(p, (_, high))| (((*topic).clone(), p), high))
        })
        .collect();
    let before = assignments(&a.stderr());
    a.signal("CONT");
    let deadline = Instant::now() + DONE;
    let noticed = loop {
        if let Some(status) = a.child.try_wait().expect("try_wait") {
            break format!("it stopped by itself ({status})");
        }
        if assignments(&a.stderr()) > before {
            break "it rejoined the group".to_string();
        }
        other.assert_running();
        assert!(
            Instant::now() < deadline,
            "a, resumed, neither stopped nor rejoined the group in {DONE:?}: {}",
            a.stderr_tail(30)
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let a_code = match a.child.try_wait().expect("try_wait") {
        Some(status) => status.code(),
        None => {
            a.signal("TERM");
            a.wait_exit(DONE)
        }
    };
    eprintln!(
        "{test}: a resumed: {noticed}; it exited with {a_code:?}; its last lines:\n{}",
        a.stderr_tail(12)
    );
    other.assert_running();
    assert_eq!(
        committed_of(&b.bootstrap, group, &t),
        oracle.ends,
        "the committed offsets stay at the end of the input"
    );
    other.signal("TERM");
    assert_eq!(other.wait_exit(DONE), Some(0), "{}", other.stderr_tail(40));

    wait_no_open_transaction(&b.bootstrap, &[&t.output, &t.dlq], OPEN_TRANSACTIONS_END);
    let output = read_isolated(&b.bootstrap, &t.output, Isolation::ReadCommitted);
    let dead = read_isolated(&b.bootstrap, &t.dlq, Isolation::ReadCommitted);
    let all_output = read_isolated(&b.bootstrap, &t.output, Isolation::ReadUncommitted);
    let all_dead = read_isolated(&b.bootstrap, &t.dlq, Isolation::ReadUncommitted);
    // What was sent after A resumed (B had nothing left to send): none of
    // it is visible.
    let after = |topic: &String, all: &[Read]| -> Vec<(i32, i64)> {
        all.iter()
            .filter(|r| r.offset >= marks[&(topic.clone(), r.partition)])
            .map(|r| (r.partition, r.offset))
            .collect()
    };
    let sent_out = after(&t.output, &all_output);
    let sent_dead = after(&t.dlq, &all_dead);
    eprintln!(
        "{test}: after a resumed, {} packets and {} dead letters were sent; read_uncommitted sees {} and {} records of aborted transactions in all",
        sent_out.len(),
        sent_dead.len(),
        aborted(&all_output, &output).len(),
        aborted(&all_dead, &dead).len()
    );
    for (what, sent, visible) in [
        ("packets", &sent_out, &output),
        ("dead letters", &sent_dead, &dead),
    ] {
        let seen: HashSet<(i32, i64)> = visible.iter().map(|r| (r.partition, r.offset)).collect();
        let leaked: Vec<_> = sent.iter().filter(|c| seen.contains(c)).collect();
        assert!(
            leaked.is_empty(),
            "{test}: {} {what} sent after a resumed are visible to read_committed: {:?}",
            leaked.len(),
            &leaked[..leaked.len().min(10)]
        );
    }
    let committed = assert_exact(test, &t.input, &output, &dead, &input, &oracle);
    // Each committed packet in the metrics log of the instance that
    // committed it, once: A's holds nothing it did not commit.
    let (la, lb) = (metrics_log(&a.log_path), metrics_log(&other.log_path));
    eprintln!(
        "{test}: {} windows; a's metrics log holds {} packets ({a_logged} when it was stopped), b's {}",
        committed.len(),
        la.len(),
        lb.len()
    );
    let a_ids: BTreeSet<&str> = la.iter().map(|p| p.packet_id.as_str()).collect();
    let stray: Vec<&&str> = a_ids
        .iter()
        .filter(|id| !committed.contains_key(**id))
        .collect();
    assert!(
        stray.is_empty(),
        "{test}: a's metrics log holds packets that are not committed: {stray:?}"
    );
    let both: Vec<Packet> = la.into_iter().chain(lb).collect();
    assert_logged_once(test, &both, &committed);
    eprintln!("{test}: done in {:.1}s", started.elapsed().as_secs_f64());
}

/// A zombie: instance A, stopped with SIGSTOP while it holds a transaction
/// open, loses its partitions to instance B of the same group once its
/// session times out; B processes everything; then A is resumed with its
/// stale state. With read_committed the output is exact (each window once,
/// the oracle's counts, each late or invalid message once), nothing sent
/// after A resumed is visible, and each committed packet is in exactly one
/// instance's metrics log, once (A's holds nothing uncommitted).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zombie_resumed_after_its_partitions_moved_publishes_nothing_visible() {
    zombie(Guarantee::ExactlyOnce).await;
}

/// The packets of the last transaction that committed some, as the record
/// under `{group}/metrics-log/{transactional.id}` in the checkpoint topic
/// names them (the last committed one under that key).
fn last_logged(bootstrap: &str, t: &Topics, group: &str, instance: &str) -> Vec<String> {
    let key = format!("{group}/metrics-log/{group}.{instance}");
    let record = read_isolated(bootstrap, &t.checkpoints, Isolation::ReadCommitted)
        .into_iter()
        .filter(|r| r.key.as_deref() == Some(key.as_bytes()))
        .max_by_key(|r| (r.partition, r.offset))
        .unwrap_or_else(|| panic!("no record under {key} in {}", t.checkpoints));
    let v: Value = serde_json::from_slice(&record.payload).expect("a JSON record");
    v["packets"]
        .as_array()
        .expect("its packets")
        .iter()
        .map(|p| p["packet_id"].as_str().unwrap().to_string())
        .collect()
}

/// A crash after a transaction committed and before its packets reached
/// the metrics log: the run is taken to the end of its input and stopped,
/// then its metrics log is cut back to before the last transaction's
/// packets (those the checkpoint topic's record names, at least one),
/// leaving a torn half of the first of them, as a process killed in the
/// middle of that append leaves it. The offsets are committed, so nothing
/// is replayed: only the recovery at start, which reads the record and the
/// packets it names back from the output topic, can put them back. After a
/// restart the metrics log holds every committed packet once, as
/// published, in the order they were committed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_between_commit_and_append_is_recovered_into_the_metrics_log() {
    let test = "eo-append";
    let t = Topics::of(test);
    let group = format!("{test}-group");
    let b = Broker::start();
    t.create(&b).await;
    let dir = tempfile::tempdir().unwrap();
    let input = timed_input(1_000_005, 2_000, 30_000, PARTITIONS, 4.0);
    let oracle = Oracle::of(&input);
    produce(&b.bootstrap, &t.input, &input.inputs);
    let e = env(&b.bootstrap, &t, &group, test, Guarantee::ExactlyOnce, &[]);

    let mut svc = Service::start(dir.path(), test, &e);
    svc.wait_for("the whole input committed", DONE, |_| {
        committed_of(&b.bootstrap, &group, &t) == oracle.ends
    });
    svc.signal("TERM");
    assert_eq!(svc.wait_exit(DONE), Some(0), "{}", svc.stderr_tail(40));
    wait_no_open_transaction(&b.bootstrap, &[&t.output, &t.dlq], OPEN_TRANSACTIONS_END);
    let output = read_isolated(&b.bootstrap, &t.output, Isolation::ReadCommitted);
    let dead = read_isolated(&b.bootstrap, &t.dlq, Isolation::ReadCommitted);
    let committed = assert_exact(test, &t.input, &output, &dead, &input, &oracle);
    let complete = metrics_log(&svc.log_path);
    assert_logged_once(test, &complete, &committed);

    // The log ends with the last transaction's packets; cut them off, the
    // first of them torn in the middle.
    let last = last_logged(&b.bootstrap, &t, &group, test);
    assert!(!last.is_empty(), "{test}: a record names no packet");
    let tail: Vec<String> = complete[complete.len() - last.len()..]
        .iter()
        .map(|p| p.packet_id.clone())
        .collect();
    assert_eq!(
        tail, last,
        "{test}: the metrics log ends with the last transaction's packets"
    );
    let text = std::fs::read_to_string(&svc.log_path).unwrap();
    let lines: Vec<&str> = text.split_inclusive('\n').collect();
    let kept = lines.len() - last.len();
    let mut cut: String = lines[..kept].concat();
    let first = lines[kept];
    cut.push_str(&first[..first.len() / 2]);
    std::fs::write(&svc.log_path, &cut).unwrap();
    eprintln!(
        "{test}: {} packets committed; the metrics log cut back to {kept} lines and half of the next, without the last transaction's {} packets",
        committed.len(),
        last.len()
    );

    let mut again = Service::start(dir.path(), test, &e);
    again.wait_ready(READY);
    again.signal("TERM");
    assert_eq!(again.wait_exit(DONE), Some(0), "{}", again.stderr_tail(40));
    let recovered = metrics_log(&again.log_path);
    assert_logged_once(test, &recovered, &committed);
    assert_eq!(
        recovered, complete,
        "{test}: the recovered metrics log is the one written before the crash"
    );
    assert_eq!(
        committed_of(&b.bootstrap, &group, &t),
        oracle.ends,
        "{test}: nothing more committed"
    );
}
