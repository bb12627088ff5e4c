//! Exactly once (`delivery.guarantee = "exactly_once"`) under faults of the
//! transaction protocol: the real `login-metrics` binary, in window mode
//! with the default window settings, against librdkafka's mock cluster,
//! which runs in the test process, so that errors are injected into the
//! requests of the service's transactional producer (the mock cluster's
//! request-error API) while it runs. A transaction whose commit fails is
//! aborted and its work is sent again in a new one, and so is one whose
//! records the broker refuses; the metrics log and the packet counters see
//! committed packets only. What a reader sees is compared with an
//! independent oracle: the per-partition lateness of
//! `crate::common::windowed` and naive counts (`crate::common::reference`).
//!
//! What librdkafka's mock cluster (librdkafka 2.12.1) does and does not do
//! with transactions, and how these tests go around it:
//!
//! - It speaks the protocol: InitProducerId, AddPartitionsToTxn,
//!   AddOffsetsToTxn, TxnOffsetCommit and EndTxn are answered (checking the
//!   coordinator and the producer id and epoch), and the request-error API
//!   fails any of them on demand.
//! - It keeps no transaction state: EndTxn writes no commit or abort marker,
//!   and a fetch reports the high watermark as the last stable offset and
//!   no aborted transaction, so a `read_committed` reader sees the records
//!   of aborted (and open) transactions like a `read_uncommitted` one. Each
//!   test reads both and asserts that they are the same records, so that
//!   this stays visible: a mock cluster that learns to filter makes it fail,
//!   and the test is then to be simplified.
//! - TxnOffsetCommit is answered but the offsets are not stored: the
//!   group's committed offsets stay unset. The tests follow the commits by
//!   the service's own `login_metrics_messages_committed_total` and its
//!   "transaction committed" lines.
//!
//! So a reader of the mock cluster sees, besides the committed
//! transactions, what the aborted attempts had sent. Each test makes the
//! faults hit the first transaction only, which is then redone before any
//! other begins, so that the records of its aborted attempts are at the
//! head of the output and dead-letter topics, before the committed copy of
//! the same transaction: the test finds them there, checks that each is an
//! exact copy of a record sent again in the redo, and removes them. What
//! remains is what a `read_committed` reader of a real broker would see;
//! it must hold every window's packet once, with the oracle's counts, and
//! every late or invalid message once. (`tests/real_broker/exactly_once.rs`
//! shows the filtering itself on Apache Kafka.)

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use login_metrics::core::packet::Packet;
use rdkafka::mocking::{MockCluster, MockCoordinator};
use rdkafka::producer::DefaultProducerContext;
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
use serde_json::Value;

use crate::common::output::Read;
use crate::common::service::{logged_env, Service};
use crate::common::transactions::{read_isolated, Isolation};
use crate::common::windowed::{
    describe, rfc3339_ms, timed_input, window_start, Checked, Timed, CHECKPOINTS, SIZE_MS,
};
use crate::common::*;

const READY: Duration = Duration::from_secs(60);
/// The bound of every wait for the service to finish something.
const DONE: Duration = Duration::from_secs(120);
const PARTITIONS: i32 = 2;
/// The metric of input messages whose transaction committed.
const COMMITTED: &str = "login_metrics_messages_committed_total";
const ABORTED: &str = "login_metrics_transactions_aborted_total";
/// Logged by the commit path when a transaction's commit failed and it
/// aborted it.
const LEDGER_ABORT: &str = "transaction not committed; aborting it";
/// Logged by delivery before it sends the work of an aborted transaction
/// again in a new one.
const REDONE: &str = "transaction not committed; sending its work again";

type Cluster = MockCluster<'static, DefaultProducerContext>;

/// Creates the input topic with [`PARTITIONS`] and the output, dead-letter
/// and checkpoint topics with one partition each, all led by `leader`.
fn topics(c: &Cluster, input_leader: i32, leader: i32) {
    c.create_topic(INPUT, PARTITIONS, 1).unwrap();
    for p in 0..PARTITIONS {
        c.partition_leader(INPUT, p, Some(input_leader)).unwrap();
    }
    for t in [OUTPUT, DLQ, CHECKPOINTS] {
        c.create_topic(t, 1, 1).unwrap();
        c.partition_leader(t, 0, Some(leader)).unwrap();
    }
}

/// The service's `transactional.id`: the group and the instance's name.
fn transactional_id(group: &str) -> String {
    format!("{group}.{group}")
}

/// The service's environment: window mode with the default windows,
/// exactly once under a stable instance name, commits logged, then `extra`.
fn env(bs: &str, group: &str, extra: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut vars = vec![
        ("BATCH__MODE", "window"),
        ("DELIVERY__GUARANTEE", "exactly_once"),
        ("KAFKA__INSTANCE_NAME", group),
    ];
    vars.extend_from_slice(extra);
    logged_env(bs, group, &vars)
}

/// 6,000 messages on two partitions, 20 ms of event time apart (twelve
/// windows of 500 events, with stragglers, late events and invalid
/// messages), the first of them invalid: it is read before any window can
/// close, so the first transaction holds a dead letter besides its packets.
fn test_input(seed: u64) -> Timed {
    let mut input = timed_input(seed, 1_000, 6_000, PARTITIONS, 20.0);
    input.inputs[0].payload = b"{\"user_id\": \"u-1\", \"timestamp\": ".to_vec();
    input.malformed[0] = true;
    input.ts[0] = None;
    input
}

/// The oracle of an input read whole: each window's on-time events (by
/// index in production order), the late events by the per-partition
/// oracle, the invalid messages, and each partition's end.
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

    fn total(&self) -> i64 {
        self.ends.iter().sum()
    }
}

/// What identifies a record the service sent: its key, value and headers.
type Ident = (Option<Vec<u8>>, Vec<u8>, Vec<(String, String)>);

fn ident(r: &Read) -> Ident {
    let mut headers: Vec<(String, String)> = r
        .headers
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    headers.sort();
    (r.key.clone(), r.payload.clone(), headers)
}

/// Reads `topic` as a `read_committed` reader and as a `read_uncommitted`
/// one, asserts that the mock cluster gave both the same records (it does
/// not filter aborted transactions), and returns them in offset order.
fn read_topic(name: &str, bs: &str, topic: &str) -> Vec<Read> {
    let mut committed = read_isolated(bs, topic, Isolation::ReadCommitted);
    let mut all = read_isolated(bs, topic, Isolation::ReadUncommitted);
    committed.sort_by_key(|r| (r.partition, r.offset));
    all.sort_by_key(|r| (r.partition, r.offset));
    let positions =
        |rs: &[Read]| -> Vec<(i32, i64)> { rs.iter().map(|r| (r.partition, r.offset)).collect() };
    assert_eq!(
        positions(&committed),
        positions(&all),
        "{name}: librdkafka's mock cluster no longer shows aborted records to read_committed readers in {topic}: its EndTxn now writes markers (or fetches report aborted transactions); the records of aborted attempts need no longer be found and removed by this test"
    );
    assert!(
        committed
            .iter()
            .zip(&all)
            .all(|(a, b)| ident(a) == ident(b)),
        "{name}: {topic} read twice gave other records"
    );
    committed
}

/// The head of a topic written by a first transaction tried `attempts`
/// times, every attempt failing only after all its records were
/// acknowledged (a failed commit): it begins with `attempts` identical
/// copies of that transaction's records, in the order sent. Returns how
/// many records the aborted attempts hold (all copies but the last).
fn repeated_head(name: &str, topic: &str, records: &[Read], attempts: usize) -> usize {
    assert!(
        !records.is_empty(),
        "{name}: nothing in {topic}; the first transaction holds records of it"
    );
    let first = ident(&records[0]);
    let len = 1 + records[1..]
        .iter()
        .position(|r| ident(r) == first)
        .unwrap_or_else(|| {
            panic!(
                "{name}: the first record of {topic} (offset {}) is in it once: the first transaction's work was not sent again after its abort",
                records[0].offset
            )
        });
    assert!(
        records.len() >= attempts * len,
        "{name}: {topic} holds {} records, fewer than {attempts} copies of the first transaction's {len}",
        records.len()
    );
    for a in 1..attempts {
        for i in 0..len {
            assert!(
                ident(&records[a * len + i]) == ident(&records[i]),
                "{name}: in {topic}, attempt {} of the first transaction is not a copy of the first attempt: offset {} differs from offset {}",
                a + 1,
                records[a * len + i].offset,
                records[i].offset
            );
        }
    }
    eprintln!(
        "{name}: {topic} begins with {attempts} copies of the first transaction's {len} records"
    );
    (attempts - 1) * len
}

/// The head of a topic written by a first transaction whose first attempt
/// failed when the broker refused one of its produce requests: the records
/// of that attempt's other requests, if any, were appended all the same
/// (and, on a real broker, aborted), and so were those of any further
/// attempt that failed. They come before anything else that repeats:
/// returns how many records precede the last copy of every record sent
/// more than once, after checking that each of them is sent again later,
/// at most `attempts` times in all.
fn survivors_head(name: &str, topic: &str, records: &[Read], attempts: usize) -> usize {
    let mut seen: HashMap<Ident, Vec<usize>> = HashMap::new();
    for (i, r) in records.iter().enumerate() {
        seen.entry(ident(r)).or_default().push(i);
    }
    let head = seen
        .values()
        .filter(|at| at.len() > 1)
        .map(|at| at[at.len() - 2] + 1)
        .max()
        .unwrap_or(0);
    for (i, r) in records[..head].iter().enumerate() {
        let at = &seen[&ident(r)];
        assert!(
            at.len() <= attempts && at.last() != Some(&i),
            "{name}: {topic} offset {} is in it {} times (at indexes {at:?}), not as {} aborted attempts and their redo",
            r.offset,
            at.len(),
            attempts - 1
        );
    }
    eprintln!(
        "{name}: {topic} begins with {head} records of the aborted attempts, each sent again after them"
    );
    head
}

/// What a `read_committed` reader sees is exact: every packet once (no
/// `packet_id` twice, no window twice), exactly the oracle's windows, each
/// with the oracle's counts over the whole window, and every late or
/// invalid message once in the dead-letter topic. Returns the packets by id.
fn assert_exact(
    name: &str,
    output: &[Read],
    dead: &[Read],
    input: &Timed,
    oracle: &Oracle,
) -> BTreeMap<String, Packet> {
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
        "{name}: {} of {} packets are committed more than once: {:#?}",
        twice.len(),
        by_id.len(),
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
    for (w, ps) in &by_window {
        assert!(
            ps.len() == 1,
            "{name}: window {w} is committed under {} ids: {:#?}",
            ps.len(),
            ps.iter().map(|p| describe(p)).collect::<Vec<_>>()
        );
    }
    let published: BTreeSet<i64> = by_window.keys().copied().collect();
    let want: BTreeSet<i64> = oracle.windows.keys().copied().collect();
    assert_eq!(
        published,
        want,
        "{name}: the windows committed; missing {:?}, not the oracle's {:?}",
        want.difference(&published).collect::<Vec<_>>(),
        published.difference(&want).collect::<Vec<_>>()
    );

    // Each window's packet is the whole window: its sources are its events'
    // offset ranges, its counts those of the events and of the invalid and
    // late messages within them, its metrics a naive count of the events.
    let slices = default_slices();
    for (start, ps) in &by_window {
        let p = ps[0];
        let events = &oracle.windows[start];
        assert_eq!(p.window.pane, Some(0), "{name}: {} is split", describe(p));
        assert_eq!(
            p.window.end.as_deref().map(rfc3339_ms),
            Some(start + SIZE_MS),
            "{name}: {}",
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
        assert!(p.sources.iter().all(|s| s.topic == INPUT));
        assert_eq!(sources, ranges, "{name}: the sources of window {start}");
        assert_eq!(
            p.events.valid,
            events.len() as u64,
            "{name}: valid events in window {start}"
        );
        let (mut invalid, mut late) = (0u64, 0u64);
        for (part, (a, b)) in &ranges {
            for o in *a..=*b {
                invalid += u64::from(oracle.invalid.contains(&(*part, o)));
                late += u64::from(oracle.late.contains(&(*part, o)));
            }
        }
        assert_eq!(
            p.events.invalid, invalid,
            "{name}: invalid in window {start}"
        );
        assert_eq!(p.events.late, Some(late), "{name}: late in window {start}");
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
        "{name}: {} messages are dead letters committed more than once: {:?}",
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

/// The JSON lines of a process's log whose message starts with `prefix`.
fn log_lines(stderr: &str, prefix: &str) -> Vec<Value> {
    stderr
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["message"].as_str().is_some_and(|m| m.starts_with(prefix)))
        .collect()
}

/// The input offsets of the service's last "transaction committed" line.
fn last_transaction_offsets(stderr: &str) -> Vec<i64> {
    let lines = log_lines(stderr, "transaction committed");
    let last = lines.last().expect("the transactions are logged");
    let mut ends = vec![-1; PARTITIONS as usize];
    for pair in last["offsets"].as_str().unwrap().split(',') {
        let (p, o) = pair.split_once(':').unwrap();
        ends[p.parse::<usize>().unwrap()] = o.parse().unwrap();
    }
    ends
}

/// Waits until the service has committed every input message in a
/// transaction, reads its metrics, stops it with SIGTERM (exit 0) and
/// returns the metrics page read before.
fn finish(name: &str, svc: &mut Service, oracle: &Oracle) -> String {
    let total = oracle.total() as f64;
    svc.wait_for("every input message committed", DONE, |s| {
        metric(&s.metrics(), COMMITTED).is_some_and(|n| n >= total)
    });
    let page = svc.metrics();
    assert_eq!(metric(&page, COMMITTED), Some(total), "{name}: {COMMITTED}");
    svc.signal("TERM");
    assert_eq!(svc.wait_exit(DONE), Some(0), "{}", svc.stderr_tail(40));
    page
}

/// What holds after every run, once the records of the aborted attempts
/// (`output_head`, `dead_head` records at the head of each topic) are left
/// out: the rest is exact ([`assert_exact`]); the metrics log and the
/// "packet published" lines hold each committed packet once; the last
/// transaction committed the input to its end.
fn assert_committed(
    name: &str,
    svc: &Service,
    output: &[Read],
    dead: &[Read],
    input: &Timed,
    oracle: &Oracle,
) {
    let committed = assert_exact(name, output, dead, input, oracle);
    let logged = svc.logged_packets();
    let mut seen: BTreeMap<&str, usize> = BTreeMap::new();
    for p in &logged {
        *seen.entry(&p.packet_id).or_default() += 1;
        assert_eq!(
            Some(p),
            committed.get(&p.packet_id),
            "{name}: the metrics log holds {}, not as committed",
            describe(p)
        );
    }
    let repeated: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        repeated.is_empty(),
        "{name}: the metrics log repeats packets: {repeated:?}"
    );
    assert_eq!(
        seen.len(),
        committed.len(),
        "{name}: the metrics log holds every committed packet"
    );
    let stderr = svc.stderr();
    let published: BTreeSet<String> = log_lines(&stderr, "packet published")
        .iter()
        .map(|v| v["packet_id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        log_lines(&stderr, "packet published").len(),
        committed.len(),
        "{name}: one \"packet published\" line per committed packet"
    );
    assert_eq!(
        published,
        committed.keys().cloned().collect::<BTreeSet<_>>(),
        "{name}: the packets logged as published are the committed ones"
    );
    assert_eq!(
        last_transaction_offsets(&stderr),
        oracle.ends,
        "{name}: the last transaction commits the input to its end"
    );
    eprintln!(
        "{name}: {} windows committed once each, {} dead letters once each; the metrics log holds each once",
        committed.len(),
        dead.len()
    );
}

/// The first transaction's commit fails three times, each time in another
/// step of the commit path, with errors librdkafka does not retry and that
/// make the transaction abortable: the offsets' AddOffsetsToTxn is refused
/// (GROUP_AUTHORIZATION_FAILED), then their TxnOffsetCommit
/// (ILLEGAL_GENERATION), then the EndTxn that commits (NOT_ENOUGH_REPLICAS,
/// after a COORDINATOR_NOT_AVAILABLE that librdkafka retries by itself and
/// that aborts nothing). Only the service's transactional producer sends
/// these requests, and the mock cluster fails them in the order they come,
/// so the errors fall on the first transaction's attempts whatever the
/// timing; each abort's own EndTxn is let through. The service aborts each
/// attempt, sends the work again in a new transaction, and commits it the
/// fourth time (`kafka.delivery_attempts` is 5).
///
/// Shown: three aborts (`login_metrics_transactions_aborted_total`, and
/// three times both "transaction not committed" lines: the commit path
/// aborting, delivery sending again); the output and dead-letter topics
/// begin with four identical copies of the first transaction's records
/// (it holds packets and a dead letter), the three aborted attempts and
/// the committed one, in the order sent; without the aborted attempts
/// (which a read_committed reader of a real broker does not see; see the
/// module's documentation), every window's packet is there once with the
/// oracle's counts and every late or invalid message once; the metrics log
/// and the "packet published" lines hold each committed packet once.
#[test]
fn a_failed_transaction_commit_is_aborted_and_redone_with_nothing_visible_twice() {
    use RDKafkaRespErr::*;
    let name = "commit";
    let c = MockCluster::new(1).expect("mock cluster");
    topics(&c, 1, 1);
    let bs = c.bootstrap_servers();
    let dir = tempfile::tempdir().unwrap();
    let input = test_input(91);
    let oracle = Oracle::of(&input);
    produce(&bs, INPUT, &input.inputs);

    let aborts = 3;
    c.request_errors(
        RDKafkaApiKey::AddOffsetsToTxn,
        &[RD_KAFKA_RESP_ERR_GROUP_AUTHORIZATION_FAILED],
    );
    c.request_errors(
        RDKafkaApiKey::TxnOffsetCommit,
        &[RD_KAFKA_RESP_ERR_ILLEGAL_GENERATION],
    );
    // EndTxn: the first attempt's abort, the second's abort, the third
    // attempt's commit (retried by librdkafka, then refused), its abort;
    // the fourth attempt's commit goes through.
    c.request_errors(
        RDKafkaApiKey::EndTxn,
        &[
            RD_KAFKA_RESP_ERR_NO_ERROR,
            RD_KAFKA_RESP_ERR_NO_ERROR,
            RD_KAFKA_RESP_ERR_COORDINATOR_NOT_AVAILABLE,
            RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS,
            RD_KAFKA_RESP_ERR_NO_ERROR,
        ],
    );

    let mut svc = Service::start(dir.path(), name, &env(&bs, name, &[]));
    svc.wait_ready(READY);
    let page = finish(name, &mut svc, &oracle);
    let stderr = svc.stderr();
    assert_eq!(
        metric(&page, ABORTED),
        Some(aborts as f64),
        "{name}: every injected failure aborted one transaction"
    );
    let ledger = log_lines(&stderr, LEDGER_ABORT);
    let redone = log_lines(&stderr, REDONE);
    assert_eq!(
        (ledger.len(), redone.len()),
        (aborts, aborts),
        "{name}: each abort logged by the commit path and by delivery: {ledger:#?} {redone:#?}"
    );
    eprintln!(
        "{name}: aborted because {:?}",
        ledger
            .iter()
            .map(|v| v["error"].as_str().unwrap_or_default().to_string())
            .collect::<Vec<_>>()
    );

    let output = read_topic(name, &bs, OUTPUT);
    let dead = read_topic(name, &bs, DLQ);
    let out_head = repeated_head(name, OUTPUT, &output, aborts + 1);
    let dead_head = repeated_head(name, DLQ, &dead, aborts + 1);
    assert_committed(
        name,
        &svc,
        &output[out_head..],
        &dead[dead_head..],
        &input,
        &oracle,
    );
}

/// Commits `offsets` of the input topic for `group`, from outside the group.
fn commit_input(bs: &str, group: &str, offsets: &[i64]) {
    use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", bs)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .create()
        .expect("committer");
    let mut tpl = rdkafka::TopicPartitionList::new();
    for (p, o) in offsets.iter().enumerate() {
        tpl.add_partition_offset(INPUT, p as i32, rdkafka::Offset::Offset(*o))
            .unwrap();
    }
    consumer
        .commit(&tpl, CommitMode::Sync)
        .expect("offsets committed");
}

/// The broker refuses a produce request of the first transaction
/// (TOPIC_AUTHORIZATION_FAILED, which librdkafka does not retry and which
/// makes a transaction abortable). The error is injected once the service
/// is ready and before it can read anything: the input's leader is a second
/// broker, down until then (the group starts from committed offsets, so
/// that the assignment does not ask it where the partitions start), and
/// the checkpoint claims of the assignment are written by then. So the
/// first produce request after it is the first transaction's, whatever the
/// timing. That transaction holds packets and a dead letter, sent in
/// requests of their own (one per partition): one is refused, the others
/// are appended all the same. Delivery aborts the transaction and sends
/// its work again in a new one (librdkafka may fail that one too, for the
/// sequence numbers the refused request skipped: it is aborted in turn),
/// until one commits.
///
/// Shown: the first abort logged by delivery with the refusal; the records
/// of the aborted attempts that the mock cluster appended are at the head
/// of the output and dead-letter topics, each one sent again later, and at
/// least one of them is there; without them (what a read_committed
/// reader of a real broker sees) every window's packet is there once with
/// the oracle's counts and every late or invalid message once; the metrics
/// log and the "packet published" lines hold each committed packet once.
#[test]
fn a_refused_produce_request_aborts_the_transaction_and_its_work_is_redone_exactly() {
    let name = "produce";
    let c = MockCluster::new(2).expect("mock cluster");
    topics(&c, 2, 1);
    c.coordinator(MockCoordinator::Group(name.into()), 1)
        .unwrap();
    c.coordinator(MockCoordinator::Transaction(transactional_id(name)), 1)
        .unwrap();
    let bs = c.bootstrap_servers();
    let dir = tempfile::tempdir().unwrap();
    let input = test_input(92);
    let oracle = Oracle::of(&input);
    produce(&bs, INPUT, &input.inputs);
    commit_input(&bs, name, &[0; PARTITIONS as usize]);
    c.broker_down(2).unwrap();

    let mut svc = Service::start(dir.path(), name, &env(&bs, name, &[]));
    svc.wait_ready(READY);
    c.request_errors(
        RDKafkaApiKey::Produce,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED],
    );
    c.broker_up(2).unwrap();
    let page = finish(name, &mut svc, &oracle);
    let stderr = svc.stderr();
    let redone = log_lines(&stderr, REDONE);
    // The first attempt is aborted for the refusal. librdkafka may find the
    // next one failing too (the refused request's sequence numbers were
    // skipped: OUT_OF_ORDER_SEQUENCE_NUMBER, which needs the epoch bump of
    // one more abort); every attempt is aborted and sent again all the same.
    assert!(
        (1..=3).contains(&redone.len()),
        "{name}: the first transaction aborted and sent again, at most three times: {redone:#?}"
    );
    let reason = redone[0]["error"].as_str().unwrap_or_default();
    assert!(
        reason.contains("(the transaction is aborted)") && reason.contains("uthoriz"),
        "{name}: delivery aborted the transaction for the refused request: {reason}"
    );
    assert_eq!(
        log_lines(&stderr, LEDGER_ABORT).len(),
        0,
        "{name}: every commit that was tried succeeded"
    );
    assert!(
        metric(&page, "login_metrics_delivery_failures_total").is_some_and(|n| n >= 1.0),
        "{name}: the refused records are counted as failed deliveries"
    );
    eprintln!("{name}: aborted because {reason}");

    let output = read_topic(name, &bs, OUTPUT);
    let dead = read_topic(name, &bs, DLQ);
    let out_head = survivors_head(name, OUTPUT, &output, redone.len() + 1);
    let dead_head = survivors_head(name, DLQ, &dead, redone.len() + 1);
    assert!(
        out_head + dead_head > 0,
        "{name}: the aborted attempt's other requests were appended, and are found"
    );
    assert_committed(
        name,
        &svc,
        &output[out_head..],
        &dead[dead_head..],
        &input,
        &oracle,
    );
}
