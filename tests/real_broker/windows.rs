//! Window mode over TCP: the same input gives the same windows whatever the
//! timing. Runs on one input — default fetch settings and 16 KiB partition
//! fetches against the real test broker (Apache Kafka), and a run killed with
//! SIGKILL three times with windows in flight (librdkafka's mock cluster in
//! the test process, so delivery can be stalled) — are compared with an
//! oracle that computes windows and lateness per partition on its own,
//! independently of the code. The restarts of the killed run restore each
//! partition's window checkpoint from the checkpoint topic.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;
use std::time::Duration;

use crate::common::broker::Broker;
use crate::common::order::{published_count, Logged, COMMIT_LOG};
use crate::common::service::{service_env, Service};
use crate::common::*;
use login_metrics::core::packet::Packet;
use rand::{Rng, SeedableRng};
use serde_json::Value;

pub(crate) const READY: Duration = Duration::from_secs(60);
pub(crate) const DONE: Duration = Duration::from_secs(240);
pub(crate) const PARTITIONS: i32 = 3;
pub(crate) const SIZE_MS: i64 = 10_000;
pub(crate) const GRACE_MS: i64 = 5_000;

/// One input message: where it goes and, for a valid event, its event time.
pub(crate) struct Msg {
    pub(crate) partition: i32,
    pub(crate) payload: Vec<u8>,
    pub(crate) ts_ms: Option<i64>,
}

/// Generated events with rewritten timestamps: per partition a forward drift,
/// stragglers within grace and some far beyond it, and malformed messages.
fn input(seed: u64, per_partition: usize) -> Vec<Msg> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let (inputs, malformed) =
        generated_input(seed, 2_000, per_partition * PARTITIONS as usize, PARTITIONS);
    let start = (chrono::Utc::now().timestamp_millis() - 7_200_000) / SIZE_MS * SIZE_MS;
    let mut clock = [start; PARTITIONS as usize];
    inputs
        .into_iter()
        .zip(malformed)
        .map(|(inp, bad)| {
            if bad {
                return Msg {
                    partition: inp.partition,
                    payload: inp.payload,
                    ts_ms: None,
                };
            }
            let t = &mut clock[inp.partition as usize];
            *t += rng.gen_range(0..400);
            let ts = match rng.gen_range(0..100) {
                0..=9 => *t - rng.gen_range(0..4_500),
                10..=11 => *t - rng.gen_range(8_000..60_000),
                _ => *t,
            };
            let mut v: Value = serde_json::from_slice(&inp.payload).unwrap();
            v["timestamp"] = Value::from(ts);
            Msg {
                partition: inp.partition,
                payload: v.to_string().into_bytes(),
                ts_ms: Some(ts),
            }
        })
        .collect()
}

/// The oracle's answer: per window start, the (partition, offset) of its
/// events; the late events; per coordinate, the payload.
pub(crate) struct Expected {
    pub(crate) windows: BTreeMap<i64, BTreeSet<(i32, i64)>>,
    pub(crate) late: BTreeSet<(i32, i64)>,
    pub(crate) payloads: HashMap<(i32, i64), Vec<u8>>,
    pub(crate) ends: Vec<i64>,
}

pub(crate) fn oracle(msgs: &[Msg]) -> Expected {
    oracle_of(msgs, 0..msgs.len())
}

/// The oracle of a run that reads only `range` of the messages (in
/// production order): offsets count every message, windows and lateness
/// only those in the range, each partition starting without progress.
pub(crate) fn oracle_of(msgs: &[Msg], range: std::ops::Range<usize>) -> Expected {
    let mut next = vec![0i64; PARTITIONS as usize];
    let mut ends = vec![None; PARTITIONS as usize];
    let mut progress: Vec<Option<i64>> = vec![None; PARTITIONS as usize];
    let mut e = Expected {
        windows: BTreeMap::new(),
        late: BTreeSet::new(),
        payloads: HashMap::new(),
        ends: vec![],
    };
    for (i, m) in msgs.iter().enumerate() {
        let p = m.partition as usize;
        let offset = next[p];
        next[p] += 1;
        if i >= range.end && ends[p].is_none() {
            ends[p] = Some(offset);
        }
        if !range.contains(&i) {
            continue;
        }
        e.payloads.insert((m.partition, offset), m.payload.clone());
        let Some(ts) = m.ts_ms else { continue };
        let start = ts.div_euclid(SIZE_MS) * SIZE_MS;
        if progress[p].is_some_and(|pr| start + SIZE_MS <= pr - GRACE_MS) {
            e.late.insert((m.partition, offset));
        } else {
            e.windows
                .entry(start)
                .or_default()
                .insert((m.partition, offset));
        }
        progress[p] = Some(progress[p].map_or(ts, |pr| pr.max(ts)));
    }
    e.ends = next
        .iter()
        .zip(&ends)
        .map(|(n, end)| end.unwrap_or(*n))
        .collect();
    e
}

pub(crate) fn produce_msgs(bootstrap: &str, topic: &str, msgs: &[Msg]) {
    let inputs: Vec<Input> = msgs
        .iter()
        .map(|m| input_of(m.partition, m.payload.clone()))
        .collect();
    produce(bootstrap, topic, &inputs);
}

fn input_of(partition: i32, payload: Vec<u8>) -> Input {
    crate::common::input(partition, payload)
}

/// What one run published: packets by window start (every copy, in topic
/// order), and the dead letters' coordinates by error kind.
pub(crate) struct Published {
    pub(crate) packets: BTreeMap<i64, Vec<Packet>>,
    pub(crate) dead: Vec<(String, i32, i64)>,
}

pub(crate) fn published(bootstrap: &str, output: &str, dlq: &str) -> Published {
    let mut reads = read_all(bootstrap, output);
    reads.sort_by_key(|r| r.offset);
    let mut packets: BTreeMap<i64, Vec<Packet>> = BTreeMap::new();
    for r in reads {
        let p: Packet = serde_json::from_slice(&r.payload).expect("packet");
        let start =
            chrono::DateTime::parse_from_rfc3339(p.window.start.as_deref().expect("window mode"))
                .unwrap()
                .timestamp_millis();
        packets.entry(start).or_default().push(p);
    }
    let dead = read_all(bootstrap, dlq)
        .into_iter()
        .map(|d| {
            (
                d.headers["error.kind"].clone(),
                d.headers["source.partition"].parse().unwrap(),
                d.headers["source.offset"].parse().unwrap(),
            )
        })
        .collect();
    Published { packets, dead }
}

/// A packet without what legitimately differs between runs of different
/// groups or at different times: the id and the emission time.
pub(crate) fn content(p: &Packet) -> Value {
    let mut v = serde_json::to_value(p).unwrap();
    v.as_object_mut().unwrap().remove("packet_id");
    v.as_object_mut().unwrap().remove("emitted_at");
    v
}

/// Checks one run against the oracle; returns each window's content.
pub(crate) fn check_run(name: &str, run: &Published, expected: &Expected) -> BTreeMap<i64, Value> {
    let slices = default_slices();
    let starts: Vec<i64> = run.packets.keys().copied().collect();
    let want: Vec<i64> = expected.windows.keys().copied().collect();
    assert_eq!(starts, want, "{name}: the windows published");
    let mut out = BTreeMap::new();
    for (start, copies) in &run.packets {
        let first = &copies[0];
        for c in copies {
            assert_eq!(c.packet_id, first.packet_id, "{name}: one id per window");
            assert_eq!(
                content(c),
                content(first),
                "{name}: a replayed packet carries the same content"
            );
        }
        assert_eq!(first.window.pane, Some(0));
        assert!(
            matches!(
                first.window.closed_by.as_str(),
                "watermark" | "wait" | "end"
            ),
            "{name}: {}",
            first.window.closed_by
        );
        let events: Vec<Value> = expected.windows[start]
            .iter()
            .map(|c| serde_json::from_slice(&expected.payloads[c]).unwrap())
            .collect();
        assert_eq!(
            first.events.valid,
            events.len() as u64,
            "{name}: valid in window {start}"
        );
        for (i, slice) in slices.iter().enumerate() {
            let (groups, dup_groups, mut rows) = naive_counts(&events, slice);
            let m = &first.metrics[i];
            assert_eq!(
                (m.groups, m.duplicate_groups),
                (groups, dup_groups),
                "{name}: {slice:?} in {start}"
            );
            rows.truncate(100);
            assert_eq!(
                packet_rows(first, i),
                rows,
                "{name}: rows of {slice:?} in {start}"
            );
        }
        // The sources are the offset ranges of the window's own events.
        for s in &first.sources {
            let offs: Vec<i64> = expected.windows[start]
                .iter()
                .filter(|(p, _)| *p == s.partition)
                .map(|(_, o)| *o)
                .collect();
            assert_eq!(
                (s.first_offset, s.last_offset),
                (*offs.first().unwrap(), *offs.last().unwrap()),
                "{name}: sources of {start}"
            );
        }
        out.insert(*start, content(first));
    }
    let values: Vec<Value> = run
        .packets
        .values()
        .flatten()
        .map(|p| serde_json::to_value(p).unwrap())
        .collect();
    assert_schema_valid(&values);

    let late: BTreeSet<(i32, i64)> = run
        .dead
        .iter()
        .filter(|(k, _, _)| k == "late")
        .map(|(_, p, o)| (*p, *o))
        .collect();
    assert!(!expected.late.is_empty());
    assert_eq!(
        late, expected.late,
        "{name}: every late event is a dead letter, and no on-time one"
    );
    out
}

pub(crate) fn wait_committed_on(bootstrap: &str, group: &str, topic: &str, ends: &[i64]) {
    let deadline = std::time::Instant::now() + DONE;
    loop {
        let now = committed_on(bootstrap, group, topic, PARTITIONS);
        if now == ends {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{group}: committed {now:?}, expected {ends:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

pub(crate) fn window_env(
    bootstrap: &str,
    group: &str,
    topic: &str,
    extra: &[(&str, &str)],
) -> Vec<(String, String)> {
    let mut e = service_env(bootstrap, group);
    let mut vars = vec![
        ("BATCH__MODE", "window"),
        ("KAFKA__INPUT_TOPIC", topic),
        COMMIT_LOG,
    ];
    let out = format!("{OUTPUT}-{group}");
    let dlq = format!("{DLQ}-{group}");
    vars.push(("KAFKA__OUTPUT_TOPIC", &out));
    vars.push(("KAFKA__DLQ_TOPIC", &dlq));
    vars.extend_from_slice(extra);
    e.extend(
        vars.iter()
            .map(|(k, v)| (format!("LOGIN_METRICS__{k}"), v.to_string())),
    );
    e
}

/// Commits never pass an event whose window was not yet published: read in
/// the order each process wrote them, every "offsets committed" line covers
/// only events whose window has a "packet published" line before it, in this
/// process's log or an earlier run's of the same group (or that are late or
/// invalid).
pub(crate) struct CommitOrder {
    window_of: HashMap<(i32, i64), i64>,
    published: BTreeSet<i64>,
}

impl CommitOrder {
    pub(crate) fn new(expected: &Expected) -> CommitOrder {
        CommitOrder {
            window_of: expected
                .windows
                .iter()
                .flat_map(|(s, cs)| cs.iter().map(move |c| (*c, *s)))
                .collect(),
            published: BTreeSet::new(),
        }
    }

    /// Checks one process's log; `from` is what was committed when it
    /// started. Returns what it had committed at the end, and how many commits.
    pub(crate) fn check(&mut self, name: &str, stderr: &str, from: &[i64]) -> (Vec<i64>, usize) {
        let mut commits = 0;
        let mut done: Vec<i64> = from.iter().map(|o| (*o).max(0)).collect();
        for l in crate::common::order::logged(stderr) {
            match l {
                Logged::Published { window_start, .. } => {
                    self.published.insert(window_start.expect("window mode"));
                }
                Logged::Committed(offsets) => {
                    commits += 1;
                    for (p, o) in offsets {
                        for off in done[p as usize]..o {
                            if let Some(w) = self.window_of.get(&(p, off)) {
                                assert!(
                                    self.published.contains(w),
                                    "{name}: committed {p}:{o} before window {w} of offset {off} was published"
                                );
                            }
                        }
                        done[p as usize] = done[p as usize].max(o);
                    }
                }
                Logged::Revoked { .. } => {}
            }
        }
        (done, commits)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_input_gives_the_same_windows_whatever_the_fetch_size() {
    let b = Broker::start();
    b.create_topic(INPUT, PARTITIONS).await;
    for g in ["a", "b"] {
        b.create_topic(&format!("{OUTPUT}-{g}"), 1).await;
        b.create_topic(&format!("{DLQ}-{g}"), 1).await;
    }
    let dir = tempfile::tempdir().unwrap();
    let msgs = input(77, 4_000);
    let expected = oracle(&msgs);
    produce_msgs(&b.bootstrap, INPUT, &msgs);

    // Run A: default settings. Run B: 16 KiB partition fetches. Both read
    // the whole preloaded topic; their last windows close by wait.
    let mut contents = Vec::new();
    for (group, extra) in [
        ("a", vec![]),
        (
            "b",
            vec![("KAFKA__CONSUMER__MAX_PARTITION_FETCH_BYTES", "16384")],
        ),
    ] {
        let mut svc = Service::start(
            dir.path(),
            group,
            &window_env(&b.bootstrap, group, INPUT, &extra),
        );
        svc.wait_ready(READY);
        wait_committed_on(&b.bootstrap, group, INPUT, &expected.ends);
        svc.signal("TERM");
        assert_eq!(svc.wait_exit(DONE), Some(0), "{}", svc.stderr());
        let run = published(
            &b.bootstrap,
            &format!("{OUTPUT}-{group}"),
            &format!("{DLQ}-{group}"),
        );
        contents.push(check_run(group, &run, &expected));
        let (done, commits) =
            CommitOrder::new(&expected).check(group, &svc.stderr(), &[0; PARTITIONS as usize]);
        assert!(commits > 1, "{group}: the commits are logged");
        assert_eq!(
            done, expected.ends,
            "{group}: the logged commits reach the end"
        );
        assert_eq!(
            svc.logged_packets(),
            run.packets.values().flatten().cloned().collect::<Vec<_>>()
        );
    }
    assert_eq!(contents[0], contents[1], "default fetch vs 16 KiB fetches");
}

/// kill -9 with windows in flight, three times, on librdkafka's mock cluster
/// in the test process: broker 1 leads the input and the checkpoint topic and
/// coordinates the group, broker 2 leads the output and dead-letter topics.
/// Each run first commits something; then broker 2 goes down, so no packet
/// can be acknowledged while the consumer goes on closing windows (and could
/// store checkpoints and commit, were commits not tied to delivery); the
/// process is killed once it has logged a failed delivery attempt. Asserted
/// from what it left: after its last failed delivery attempt it published
/// nothing (a work was in flight at the kill), and the committed offsets,
/// read from the broker, are short of the input's end. The restarts give
/// exactly the oracle's windows, each under the id the oracle's window and
/// partitions give, however often it was published.
#[test]
fn kill_9_with_windows_in_flight_gives_the_oracles_windows() {
    use login_metrics::core::packet::Identity;
    use login_metrics::core::privacy::Pseudonymizer;
    use login_metrics::work::{SourceRange, WindowId};
    use rdkafka::mocking::{MockCluster, MockCoordinator};

    let group = "k";
    let (out, dlq, store) = (
        format!("{OUTPUT}-{group}"),
        format!("{DLQ}-{group}"),
        "login-metrics-checkpoints",
    );
    let c = MockCluster::new(2).expect("mock cluster");
    c.create_topic(INPUT, PARTITIONS, 1).unwrap();
    for p in 0..PARTITIONS {
        c.partition_leader(INPUT, p, Some(1)).unwrap();
    }
    for (t, leader) in [(out.as_str(), 2), (dlq.as_str(), 2), (store, 1)] {
        c.create_topic(t, 1, 1).unwrap();
        c.partition_leader(t, 0, Some(leader)).unwrap();
    }
    c.coordinator(MockCoordinator::Group(group.to_string()), 1)
        .unwrap();
    let bs = c.bootstrap_servers();
    let dir = tempfile::tempdir().unwrap();
    let msgs = input(77, 4_000);
    let expected = oracle(&msgs);
    // The input arrives in four parts (each partition's messages in order):
    // the first before the first run, each next one once the output's broker
    // is down, so that the windows it closes are in flight when the process
    // is killed, however fast the work before it was delivered.
    let part = msgs.len().div_ceil(4);
    let mut parts = msgs.chunks(part);
    produce_msgs(&bs, INPUT, parts.next().unwrap());
    let e = window_env(
        &bs,
        group,
        INPUT,
        &[
            ("KAFKA__DELIVERY_TIMEOUT", "2s"),
            ("KAFKA__DELIVERY_ATTEMPTS", "100"),
            // Each run is the same instance started again: under one name it
            // takes its partitions back at once rather than sharing the
            // group with its killed self until that session times out.
            ("KAFKA__INSTANCE_NAME", group),
        ],
    );

    let mut order = CommitOrder::new(&expected);
    let total: i64 = expected.ends.iter().sum();
    for i in 0..3 {
        let name = format!("k{i}");
        let before = committed_on(&bs, group, INPUT, PARTITIONS);
        let mut svc = Service::start(dir.path(), &name, &e);
        svc.wait_ready(READY);
        svc.wait_for("a commit of this run", DONE, |_| {
            committed_on(&bs, group, INPUT, PARTITIONS) != before
        });
        c.broker_down(2).unwrap();
        produce_msgs(&bs, INPUT, parts.next().unwrap());
        svc.wait_for("a failed delivery attempt", DONE, |s| {
            s.stderr().contains("delivery failed; retrying")
        });
        svc.signal("KILL");
        assert_eq!(
            svc.wait_exit(Duration::from_secs(10)),
            None,
            "killed by the signal"
        );
        c.broker_up(2).unwrap();
        let after = committed_on(&bs, group, INPUT, PARTITIONS);
        let stderr = svc.stderr();
        let failed_at = stderr.rfind("delivery failed; retrying").unwrap();
        assert_eq!(
            published_count(&stderr[failed_at..]),
            0,
            "{name}: the work whose delivery failed was still in flight at the kill"
        );
        assert!(
            after.iter().sum::<i64>() < total,
            "{name}: killed with input not committed: {after:?} of {:?}",
            expected.ends
        );
        let (_, commits) = order.check(&name, &stderr, &before);
        assert!(commits > 0, "{name}: committed before the kill");
        eprintln!(
            "{name}: committed {before:?} -> {after:?}; {} packets published",
            published_count(&stderr)
        );
    }
    let before = committed_on(&bs, group, INPUT, PARTITIONS);
    let mut last = Service::start(dir.path(), "k-final", &e);
    last.wait_ready(READY);
    wait_committed_on(&bs, group, INPUT, &expected.ends);
    last.signal("TERM");
    assert_eq!(last.wait_exit(DONE), Some(0), "{}", last.stderr());
    let (done, _) = order.check("k-final", &last.stderr(), &before);
    assert_eq!(done, expected.ends, "the logged commits reach the end");
    assert!(
        last.stderr().contains("window checkpoint restored"),
        "the restart restored checkpoints: {}",
        last.stderr()
    );

    let run = published(&bs, &out, &dlq);
    check_run(group, &run, &expected);
    let s = settings(&bs, Path::new("unused"), &[("BATCH__MODE", "window")]);
    let identity = Identity::new(
        group,
        INPUT,
        &s.analysis.slices,
        s.analysis.top,
        &Pseudonymizer::disabled(),
    )
    .with_rules(&s.packet_rules());
    let mut copies = 0;
    for (start, packets) in &run.packets {
        // The window's own events' offset ranges, from the oracle.
        let mut sources: Vec<SourceRange> = Vec::new();
        for (p, o) in &expected.windows[start] {
            match sources.iter_mut().find(|s| s.partition == *p) {
                Some(s) => {
                    s.first_offset = s.first_offset.min(*o);
                    s.last_offset = s.last_offset.max(*o);
                }
                None => sources.push(SourceRange {
                    topic: INPUT.into(),
                    partition: *p,
                    first_offset: *o,
                    last_offset: *o,
                }),
            }
        }
        let id = identity.window_packet_id(
            &WindowId {
                start_ms: *start,
                end_ms: start + SIZE_MS,
                pane: 0,
            },
            &sources,
        );
        for p in packets {
            assert_eq!(p.packet_id, id, "the id of window {start}");
        }
        copies += packets.len();
    }
    eprintln!(
        "kill -9 x3: {} windows, {copies} packets published",
        run.packets.len()
    );
}

/// A maximally skewed backlog: partition 0's events are all in the topic
/// before any of the others'. Its windows pile up until alignment pauses it
/// (`login_metrics_partitions_paused`); only then are partitions 1 and 2
/// produced. The windows are the oracle's, as in the interleaved runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_skewed_backlog_pauses_the_partition_ahead_and_gives_the_same_windows() {
    let b = Broker::start();
    let topic = "user-login-s";
    b.create_topic(topic, PARTITIONS).await;
    b.create_topic(&format!("{OUTPUT}-s"), 1).await;
    b.create_topic(&format!("{DLQ}-s"), 1).await;
    let dir = tempfile::tempdir().unwrap();
    let msgs = input(78, 1_500);
    let expected = oracle(&msgs);
    let (ahead, behind): (Vec<Msg>, Vec<Msg>) = msgs.into_iter().partition(|m| m.partition == 0);
    produce_msgs(&b.bootstrap, topic, &ahead);

    // Silent partitions keep holding the watermark (idle 10 min), and no
    // window closes by wait while partition 0 is paused.
    let e = window_env(
        &b.bootstrap,
        "s",
        topic,
        &[
            ("BATCH__MAX_BUFFERED", "300"),
            ("BATCH__IDLE", "10m"),
            ("BATCH__MAX_WAIT", "30s"),
        ],
    );
    let mut svc = Service::start(dir.path(), "s", &e);
    svc.wait_ready(READY);
    let deadline = std::time::Instant::now() + DONE;
    loop {
        let page = svc
            .http_get("/metrics")
            .map(|(_, body)| body)
            .unwrap_or_default();
        if metric(&page, "login_metrics_partitions_paused").is_some_and(|v| v >= 1.0) {
            let buffered = metric(&page, "login_metrics_window_events_buffered").unwrap();
            assert!(
                buffered <= 301.0,
                "buffered {buffered} with the bound at 300"
            );
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "partition 0 was never paused: {}",
            svc.stderr()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let committed = committed_on(&b.bootstrap, "s", topic, PARTITIONS);
    assert!(
        committed.iter().all(|o| *o <= 0),
        "no window can close while partitions 1 and 2 have nothing: committed {committed:?}"
    );
    produce_msgs(&b.bootstrap, topic, &behind);
    wait_committed_on(&b.bootstrap, "s", topic, &expected.ends);
    svc.signal("TERM");
    assert_eq!(svc.wait_exit(DONE), Some(0), "{}", svc.stderr());
    let run = published(&b.bootstrap, &format!("{OUTPUT}-s"), &format!("{DLQ}-s"));
    check_run("s", &run, &expected);
    let (done, _) =
        CommitOrder::new(&expected).check("s", &svc.stderr(), &[0; PARTITIONS as usize]);
    assert_eq!(done, expected.ends, "the logged commits reach the end");
}

/// A secured cluster: Apache Kafka with a TLS listener (a CA and a broker
/// certificate the test makes) and SCRAM-SHA-512. The security properties
/// are given once, in `kafka.client`, and must reach every client the
/// service makes: the consumer, the producer, the admin client, and the
/// checkpoint writer and reader of window mode. The windows equal the
/// oracle's, and the commits follow the packets. A wrong password or an
/// untrusted certificate stops the start (exit 1) with a message naming the
/// setting, instead of retrying in silence.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_sasl_ssl_with_scram_the_windows_are_the_oracles_and_refusals_name_the_setting() {
    let b = Broker::start_secured();
    let s = b.secured.as_ref().expect("a secured listener");
    let group = "secured";
    b.create_topic(INPUT, PARTITIONS).await;
    b.create_topic(&format!("{OUTPUT}-{group}"), 1).await;
    b.create_topic(&format!("{DLQ}-{group}"), 1).await;
    let dir = tempfile::tempdir().unwrap();
    let ca = s.ca.display().to_string();
    let env = |password: &str, ca: &str| {
        window_env(
            &s.bootstrap,
            group,
            INPUT,
            &[
                ("KAFKA__CLIENT__SECURITY_PROTOCOL", "SASL_SSL"),
                ("KAFKA__CLIENT__SASL_MECHANISM", "SCRAM-SHA-512"),
                ("KAFKA__CLIENT__SASL_USERNAME", &s.user),
                ("KAFKA__CLIENT__SASL_PASSWORD", password),
                ("KAFKA__CLIENT__SSL_CA_LOCATION", ca),
            ],
        )
    };
    // The bound of a wait for the process to end, not a measurement.
    let refused_within = Duration::from_secs(60);

    let mut wrong = Service::start(dir.path(), "wrong-password", &env("not-the-password", &ca));
    let code = wrong.wait_exit(refused_within);
    let log = wrong.stderr();
    assert_eq!(code, Some(1), "a refused password stops the start:\n{log}");
    assert!(
        log.contains("kafka.client.sasl.password"),
        "the message names the setting:\n{log}"
    );

    let other = dir.path().join("other-ca");
    let made = std::process::Command::new(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/kafka-certs"),
    )
    .arg(&other)
    .stdout(std::process::Stdio::null())
    .status()
    .unwrap();
    assert!(made.success(), "scripts/kafka-certs makes a second CA");
    let untrusted = other.join("ca.pem").display().to_string();
    let mut distrust = Service::start(dir.path(), "untrusted", &env(&s.password, &untrusted));
    let code = distrust.wait_exit(refused_within);
    let log = distrust.stderr();
    assert_eq!(
        code,
        Some(1),
        "an untrusted certificate stops the start:\n{log}"
    );
    assert!(
        log.contains("kafka.client.ssl.ca.location"),
        "the message names the setting:\n{log}"
    );
    assert!(
        committed_on(&b.bootstrap, group, INPUT, PARTITIONS)
            .iter()
            .all(|o| *o < 0),
        "the refused starts committed nothing"
    );

    let msgs = input(91, 2_000);
    let expected = oracle(&msgs);
    produce_msgs(&b.bootstrap, INPUT, &msgs);
    let mut svc = Service::start(dir.path(), group, &env(&s.password, &ca));
    svc.wait_ready(READY);
    wait_committed_on(&b.bootstrap, group, INPUT, &expected.ends);
    svc.signal("TERM");
    assert_eq!(svc.wait_exit(DONE), Some(0), "{}", svc.stderr());
    let run = published(
        &b.bootstrap,
        &format!("{OUTPUT}-{group}"),
        &format!("{DLQ}-{group}"),
    );
    check_run(group, &run, &expected);
    let (done, commits) =
        CommitOrder::new(&expected).check(group, &svc.stderr(), &[0; PARTITIONS as usize]);
    assert!(commits > 1, "the commits are logged");
    assert_eq!(done, expected.ends, "the logged commits reach the end");
    let checkpoints = read_all(&b.bootstrap, "login-metrics-checkpoints");
    assert!(
        checkpoints
            .iter()
            .any(|r| String::from_utf8_lossy(&r.payload).contains(group)),
        "the checkpoint writer wrote over the secured listener"
    );
}

/// kill -9 at seeded random points on Apache Kafka, in window mode with the
/// default settings otherwise: five runs killed while they read, publish and
/// commit, then one to the end. Every window equals the oracle's, every copy
/// of a window has one id and one content, every late event is a dead
/// letter, and every logged commit, across the runs, follows the packets of
/// the windows it passes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_at_random_points_gives_the_oracles_windows() {
    let b = Broker::start();
    let group = "killed";
    b.create_topic(INPUT, PARTITIONS).await;
    b.create_topic(&format!("{OUTPUT}-{group}"), 1).await;
    b.create_topic(&format!("{DLQ}-{group}"), 1).await;
    let dir = tempfile::tempdir().unwrap();
    let msgs = input(55, 6_000);
    let expected = oracle(&msgs);
    produce_msgs(&b.bootstrap, INPUT, &msgs);
    // One instance started again after each kill (see the test above).
    let env = window_env(
        &b.bootstrap,
        group,
        INPUT,
        &[("KAFKA__INSTANCE_NAME", group)],
    );
    let mut order = CommitOrder::new(&expected);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(20261203);
    for i in 0..5 {
        let before = committed_on(&b.bootstrap, group, INPUT, PARTITIONS);
        let mut svc = Service::start(dir.path(), &format!("killed{i}"), &env);
        svc.wait_ready(READY);
        let ms = rng.gen_range(100..3_000);
        std::thread::sleep(Duration::from_millis(ms));
        svc.signal("KILL");
        assert_eq!(svc.wait_exit(Duration::from_secs(10)), None, "killed");
        let (done, _) = order.check(&format!("killed{i}"), &svc.stderr(), &before);
        eprintln!("run {i}: killed after {ms} ms; committed {done:?}");
    }
    let before = committed_on(&b.bootstrap, group, INPUT, PARTITIONS);
    let mut last = Service::start(dir.path(), "last", &env);
    last.wait_ready(READY);
    wait_committed_on(&b.bootstrap, group, INPUT, &expected.ends);
    last.signal("TERM");
    assert_eq!(last.wait_exit(DONE), Some(0), "{}", last.stderr());
    let (done, _) = order.check("last", &last.stderr(), &before);
    assert_eq!(done, expected.ends, "the logged commits reach the end");
    let run = published(
        &b.bootstrap,
        &format!("{OUTPUT}-{group}"),
        &format!("{DLQ}-{group}"),
    );
    check_run(group, &run, &expected);
}

/// Bounded runs on a preloaded topic whose record timestamps are one
/// millisecond apart in production order, each after its event's time. `run --until-end` exits 0 by
/// itself with exactly the oracle's windows (the last ones closed by `end`),
/// and each window a continuous run closes by watermark is the same packet
/// content in both. `run --from --until` with a fresh group reads messages
/// 1,500 to 4,499 of production order and gives the windows of an oracle of
/// just those messages; the windows it shares with the whole run (same
/// events, same late events among their offsets, closed by watermark in
/// both) are the same content.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bounded_runs_end_by_themselves_with_the_oracles_windows() {
    let b = Broker::start();
    b.create_topic(INPUT, PARTITIONS).await;
    for g in ["whole", "live", "range"] {
        b.create_topic(&format!("{OUTPUT}-{g}"), 1).await;
        b.create_topic(&format!("{DLQ}-{g}"), 1).await;
    }
    let dir = tempfile::tempdir().unwrap();
    let msgs = input(91, 2_000);
    // Stamped as a producer would: after each event happened (the events
    // are hours old), one millisecond apart in production order.
    let t0: i64 = chrono::Utc::now().timestamp_millis();
    assert!(msgs.iter().all(|m| m.ts_ms.is_none_or(|ts| ts < t0)));
    let stamps: Vec<i64> = (0..msgs.len() as i64).map(|i| t0 + i).collect();
    let inputs: Vec<Input> = msgs
        .iter()
        .map(|m| input_of(m.partition, m.payload.clone()))
        .collect();
    produce_at(&b.bootstrap, INPUT, &inputs, Some(&stamps));
    let expected = oracle(&msgs);

    let bounded = |group: &str, args: &[&str], expected: &Expected| {
        let mut svc = Service::start_with(
            dir.path(),
            group,
            &window_env(&b.bootstrap, group, INPUT, &[]),
            args,
        );
        assert_eq!(svc.wait_exit(DONE), Some(0), "{group}: {}", svc.stderr());
        assert_eq!(
            committed_on(&b.bootstrap, group, INPUT, PARTITIONS),
            expected.ends,
            "{group}: committed to the end of the range"
        );
        let run = published(
            &b.bootstrap,
            &format!("{OUTPUT}-{group}"),
            &format!("{DLQ}-{group}"),
        );
        assert!(
            run.packets
                .values()
                .flatten()
                .any(|p| p.window.closed_by == "end"),
            "{group}: the last windows close with the range"
        );
        let contents = check_run(group, &run, expected);
        let (done, _) =
            CommitOrder::new(expected).check(group, &svc.stderr(), &[0; PARTITIONS as usize]);
        assert_eq!(
            done, expected.ends,
            "{group}: the logged commits reach the end"
        );
        contents
    };
    let whole = bounded("whole", &["--until-end"], &expected);

    let mut live = Service::start(
        dir.path(),
        "live",
        &window_env(&b.bootstrap, "live", INPUT, &[]),
    );
    live.wait_ready(READY);
    wait_committed_on(&b.bootstrap, "live", INPUT, &expected.ends);
    live.signal("TERM");
    assert_eq!(live.wait_exit(DONE), Some(0), "{}", live.stderr());
    let continuous = check_run(
        "live",
        &published(
            &b.bootstrap,
            &format!("{OUTPUT}-live"),
            &format!("{DLQ}-live"),
        ),
        &expected,
    );
    let by_watermark = |c: &Value| c["window"]["closed_by"] == "watermark";
    let mut shared = 0;
    for (start, c) in &whole {
        if by_watermark(c) && continuous.get(start).is_some_and(by_watermark) {
            assert_eq!(
                Some(c),
                continuous.get(start),
                "window {start}: bounded vs continuous"
            );
            shared += 1;
        }
    }
    assert!(shared > 10, "{shared} windows compared");

    let (lo, hi) = (1_500usize, 4_500usize);
    let in_range = oracle_of(&msgs, lo..hi);
    let from = (t0 + lo as i64).to_string();
    let until = (t0 + hi as i64).to_string();
    let range = bounded("range", &["--from", &from, "--until", &until], &in_range);
    let late_between = |e: &Expected, events: &BTreeSet<(i32, i64)>| -> BTreeSet<(i32, i64)> {
        e.late
            .iter()
            .filter(|(p, o)| {
                let offs: Vec<i64> = events
                    .iter()
                    .filter(|(q, _)| q == p)
                    .map(|(_, o)| *o)
                    .collect();
                offs.first().is_some_and(|f| o >= f) && offs.last().is_some_and(|l| o <= l)
            })
            .copied()
            .collect()
    };
    let mut shared = 0;
    for (start, c) in &range {
        let (Some(a), Some(b)) = (in_range.windows.get(start), expected.windows.get(start)) else {
            continue;
        };
        if a == b
            && late_between(&in_range, a) == late_between(&expected, b)
            && by_watermark(c)
            && whole.get(start).is_some_and(by_watermark)
        {
            assert_eq!(Some(c), whole.get(start), "window {start}: range vs whole");
            shared += 1;
        }
    }
    assert!(
        shared > 5,
        "{shared} windows of the range compared with the whole run"
    );
}
