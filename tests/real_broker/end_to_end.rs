//! The real `login-metrics` binary against a real Kafka-protocol broker
//! (Apache Kafka, a separate process on 127.0.0.1): end to end, kill -9, SIGTERM,
//! two instances in one group and a rebalance with a batch in flight. Input
//! and output are checked with an independent consumer, and every run's
//! commits against its own log (`crate::common::order`). The kill -9,
//! SIGTERM, two-instance and rebalance tests run in arrival mode and again
//! in window mode with the default window settings (`..._in_window_mode`),
//! checked as `crate::common::windowed` describes.

use std::collections::HashMap;
use std::time::Duration;

use crate::common::broker::Broker;
use crate::common::order::{check_arrival_commit_order, logged, published_count, Logged};
use crate::common::service::{base, logged_env, wait_committed_while_running, Service};
use crate::common::windowed::*;
use crate::common::*;
use login_metrics::core::packet::Packet;
use rand::{Rng, SeedableRng};

const READY: Duration = Duration::from_secs(60);
const DONE: Duration = Duration::from_secs(180);

async fn broker_with_topics(partitions: i32) -> Broker {
    let b = Broker::start();
    b.create_topic(INPUT, partitions).await;
    b.create_topic(OUTPUT, 1).await;
    b.create_topic(DLQ, 1).await;
    b
}

fn output_end(bootstrap: &str) -> i64 {
    read_all(bootstrap, OUTPUT)
        .iter()
        .map(|r| r.offset + 1)
        .max()
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn end_to_end_over_tcp_counts_match_a_naive_count_and_dead_letters_arrive_once() {
    let b = broker_with_topics(3).await;
    let dir = tempfile::tempdir().unwrap();
    let (inputs, malformed) = generated_input(21, 5_000, 30_000, 3);
    let input = produce_input(&b.bootstrap, &inputs, &malformed);
    let ends = end_offsets(&input, 3);

    let mut svc = Service::start(
        dir.path(),
        "e2e",
        &logged_env(
            &b.bootstrap,
            "e2e",
            &[("BATCH__MAX_EVENTS", "4000"), ("BATCH__MAX_SPAN", "1h")],
        ),
    );
    svc.wait_ready(READY);
    wait_committed(&b.bootstrap, "e2e", &ends, DONE);
    svc.signal("TERM");
    assert_eq!(svc.wait_exit(DONE), Some(0), "{}", svc.stderr());
    let (last, commits) = check_arrival_commit_order("e2e", &svc.stderr(), &base(&[0, 0, 0]));
    assert!(commits > 1, "the commits are logged");
    assert_eq!(
        (0..3).map(|p| last[&p]).collect::<Vec<_>>(),
        ends,
        "the logged commits reach the end"
    );

    let packets: Vec<Packet> = packets_with_offsets(&b.bootstrap)
        .into_iter()
        .map(|(_, p)| p)
        .collect();
    let covered = verify_packets(&packets, &input, &default_slices(), 100);
    assert_eq!(
        covered.len(),
        inputs.len(),
        "every input message is in a packet"
    );
    assert!(covered.values().all(|&n| n == 1), "and in only one");
    let valid_sum: u64 = packets.iter().map(|p| p.events.valid).sum();
    assert_eq!(valid_sum, malformed.iter().filter(|m| !**m).count() as u64);

    let dead = read_all(&b.bootstrap, DLQ);
    let mut expected: Vec<(i32, i64)> = input
        .iter()
        .filter(|(_, (bad, _))| *bad)
        .map(|(c, _)| *c)
        .collect();
    let mut got: Vec<(i32, i64)> = dead
        .iter()
        .map(|d| {
            let c = (
                d.headers["source.partition"].parse().unwrap(),
                d.headers["source.offset"].parse().unwrap(),
            );
            assert_eq!(
                d.payload, input[&c].1,
                "dead letter carries the original bytes"
            );
            assert_eq!(d.headers["source.topic"], INPUT);
            assert!(!d.headers["error.kind"].is_empty() && !d.headers["error.reason"].is_empty());
            c
        })
        .collect();
    expected.sort();
    got.sort();
    assert!(!expected.is_empty());
    assert_eq!(
        got, expected,
        "every invalid message is in the dead-letter topic exactly once"
    );

    let values: Vec<serde_json::Value> = packets
        .iter()
        .map(|p| serde_json::to_value(p).unwrap())
        .collect();
    assert_schema_valid(&values);
    assert_eq!(
        svc.logged_packets(),
        packets,
        "the log file holds the packets of the topic"
    );
}

/// A 1.5 MB message that is not JSON: the broker takes it, the service's
/// producer may send at most 1 MB. It is dead-lettered truncated, with its
/// original size, and the stream goes on: every offset is committed, the
/// process exits 0 and no packet is published twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_malformed_message_is_dead_lettered_truncated_and_the_stream_goes_on() {
    // The input topic takes the 1.5 MB message; the dead-letter topic keeps
    // the broker's default limit (1 MB), so the full dead letter is refused.
    let b = Broker::start();
    b.create_topic_with(INPUT, 1, &[("max.message.bytes", "4194304")])
        .await;
    b.create_topic(OUTPUT, 1).await;
    b.create_topic(DLQ, 1).await;
    let dir = tempfile::tempdir().unwrap();
    let (mut inputs, mut malformed) = generated_input(33, 100, 400, 1);
    inputs.insert(200, crate::common::input(0, vec![b'#'; 1_500_000]));
    malformed.insert(200, true);
    let input = produce_input(&b.bootstrap, &inputs, &malformed);
    let ends = end_offsets(&input, 1);
    let mut svc = Service::start(
        dir.path(),
        "big",
        &logged_env(&b.bootstrap, "big", &[("BATCH__MAX_EVENTS", "100")]),
    );
    svc.wait_ready(READY);
    wait_committed(&b.bootstrap, "big", &ends, DONE);
    svc.signal("TERM");
    assert_eq!(svc.wait_exit(DONE), Some(0), "{}", svc.stderr());
    check_arrival_commit_order("big", &svc.stderr(), &base(&[0]));

    let dead = read_all(&b.bootstrap, DLQ);
    let big: Vec<&Read> = dead
        .iter()
        .filter(|d| d.headers["source.offset"] == "200")
        .collect();
    assert_eq!(big.len(), 1, "the oversized message is dead-lettered once");
    let d = big[0];
    assert_eq!(
        d.payload,
        vec![b'#'; login_metrics::sink::publisher::REDUCED_PAYLOAD_BYTES]
    );
    assert_eq!(d.headers["dead_letter.original_bytes"], "1500000");
    assert_eq!(d.headers["dead_letter.truncated"], "true");
    assert_eq!(d.headers["error.kind"], "not_json");
    let packets = read_packets(&b.bootstrap);
    let mut ids: Vec<&str> = packets.iter().map(|p| p.packet_id.as_str()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), packets.len(), "no packet published twice");
    let valid: u64 = packets.iter().map(|p| p.events.valid).sum();
    assert_eq!(valid, malformed.iter().filter(|m| !**m).count() as u64);
}

/// The metrics log on a full disk (`/dev/full`): each packet is published
/// once, the commit waits while appends are retried (the failure counter and
/// `/readyz` say so), consumption is paused meanwhile while the consumer
/// thread goes on polling (so `/healthz` stays up however long the disk stays
/// full), and once the log can be written again the pipeline goes on by itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_under_the_metrics_log_delays_the_commit_and_never_duplicates_a_packet() {
    let b = broker_with_topics(1).await;
    let dir = tempfile::tempdir().unwrap();
    // Service::start puts the log at DIR/NAME.metrics.log.
    let log = dir.path().join("full.metrics.log");
    std::os::unix::fs::symlink("/dev/full", &log).unwrap();
    let (inputs, malformed) = generated_input(44, 100, 210_000, 1);
    let input = produce_input(&b.bootstrap, &inputs, &malformed);
    let ends = end_offsets(&input, 1);
    let mut svc = Service::start(
        dir.path(),
        "full",
        &logged_env(
            &b.bootstrap,
            "full",
            &[
                // Four batches close by count: one stuck in delivery, one
                // taken ahead by delivery (which holds up to 100,000 events
                // beside its job), one in the delivery channel, the rest held
                // by the consumer.
                ("BATCH__MAX_EVENTS", "50000"),
            ],
        ),
    );
    // Ten failed appends: the waits between them alone (0.5 s doubling to at
    // most 5 s) take 32.5 s, longer than the 30 s after which /healthz
    // reports a consumer loop that has stopped turning as dead.
    let deadline = std::time::Instant::now() + DONE;
    loop {
        let page = svc.http_get("/metrics").map(|(_, b)| b).unwrap_or_default();
        let failures = metric(&page, "login_metrics_metrics_log_failures_total").unwrap_or(0.0);
        if failures >= 10.0 {
            assert_eq!(
                metric(&page, "login_metrics_consumption_held"),
                Some(1.0),
                "consumption is paused while delivery is behind"
            );
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no failed append seen: {}",
            svc.stderr()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(svc.http_get("/readyz").map(|r| r.0), Some(503));
    assert_eq!(svc.http_get("/healthz").map(|r| r.0), Some(200));
    assert_eq!(
        committed(&b.bootstrap, "full", 1),
        vec![-1],
        "nothing is committed while its packet is not in the log"
    );
    let before = read_packets(&b.bootstrap);
    assert!(!before.is_empty(), "the packet is published meanwhile");

    // Room again: the next retry reopens the path as a regular file.
    std::fs::remove_file(&log).unwrap();
    wait_committed(&b.bootstrap, "full", &ends, DONE);
    assert_eq!(svc.http_get("/readyz").map(|r| r.0), Some(200));
    svc.signal("TERM");
    assert_eq!(svc.wait_exit(DONE), Some(0), "{}", svc.stderr());
    check_arrival_commit_order("full", &svc.stderr(), &base(&[0]));
    let packets = read_packets(&b.bootstrap);
    let mut ids: Vec<&str> = packets.iter().map(|p| p.packet_id.as_str()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), packets.len(), "no packet published twice");
    assert_eq!(
        svc.logged_packets(),
        packets,
        "the log holds every packet once"
    );
    let valid: u64 = packets.iter().map(|p| p.events.valid).sum();
    assert_eq!(valid, malformed.iter().filter(|m| !**m).count() as u64);
}

/// A dead-letter topic that does not exist is reported at start-up, naming
/// the key, not discovered at the first invalid message; nothing is created.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_dead_letter_topic_stops_the_start_naming_the_key() {
    let b = broker_with_topics(1).await;
    let dir = tempfile::tempdir().unwrap();
    let mut svc = Service::start(
        dir.path(),
        "nodlq",
        &logged_env(
            &b.bootstrap,
            "nodlq",
            &[("KAFKA__DLQ_TOPIC", "no-such-dlq")],
        ),
    );
    assert_eq!(svc.wait_exit(DONE), Some(1), "{}", svc.stderr());
    let stderr = svc.stderr();
    assert!(
        stderr.contains("kafka.dlq_topic: topic `no-such-dlq` does not exist"),
        "{stderr}"
    );
    // Checking did not create it: a second start is refused the same way.
    let mut again = Service::start(
        dir.path(),
        "nodlq2",
        &logged_env(
            &b.bootstrap,
            "nodlq2",
            &[("KAFKA__DLQ_TOPIC", "no-such-dlq")],
        ),
    );
    assert_eq!(again.wait_exit(DONE), Some(1), "{}", again.stderr());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_at_random_points_loses_nothing() {
    let b = broker_with_topics(3).await;
    let dir = tempfile::tempdir().unwrap();
    let (inputs, malformed) = generated_input(33, 20_000, 60_000, 3);
    let input = produce_input(&b.bootstrap, &inputs, &malformed);
    let ends = end_offsets(&input, 3);
    let e = logged_env(
        &b.bootstrap,
        "crashy",
        &[("BATCH__MAX_EVENTS", "1500"), ("BATCH__MAX_SPAN", "1h")],
    );

    let seed = 20261121u64;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    // Per killed run: the output offsets it published at and the commits it left.
    let mut runs: Vec<KilledRun> = Vec::new();
    let mut out_start = 0;
    for i in 0..6 {
        let before = committed(&b.bootstrap, "crashy", 3);
        let svc = Service::start(dir.path(), &format!("crash{i}"), &e);
        svc.wait_ready(READY);
        let ms = rng.gen_range(200..2_500);
        std::thread::sleep(Duration::from_millis(ms));
        let mut svc = svc;
        svc.signal("KILL");
        assert_eq!(
            svc.wait_exit(Duration::from_secs(10)),
            None,
            "killed by the signal"
        );
        std::thread::sleep(Duration::from_millis(300));
        let committed_after = committed(&b.bootstrap, "crashy", 3);
        check_arrival_commit_order(&format!("crash{i}"), &svc.stderr(), &base(&before));
        let out_end = output_end(&b.bootstrap);
        eprintln!("run {i}: killed after {ms} ms; committed {committed_after:?}; output {out_start}..{out_end}");
        runs.push((out_start..out_end, committed_after));
        out_start = out_end;
    }
    let before = committed(&b.bootstrap, "crashy", 3);
    let mut last = Service::start(dir.path(), "final", &e);
    last.wait_ready(READY);
    wait_committed(&b.bootstrap, "crashy", &ends, DONE);
    last.signal("TERM");
    assert_eq!(last.wait_exit(DONE), Some(0), "{}", last.stderr());
    check_arrival_commit_order("final", &last.stderr(), &base(&before));

    assert_each_offset_committed_once(&b.bootstrap, &input, &runs);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_mid_run_flushes_commits_exits_zero_and_a_restart_reprocesses_nothing() {
    let b = broker_with_topics(3).await;
    let dir = tempfile::tempdir().unwrap();
    // The second half of the input is produced only after the first run has
    // stopped, so the restart has work left however fast the first run reads.
    let (inputs, malformed) = generated_input(44, 10_000, 60_000, 3);
    let half = inputs.len() / 2;
    produce(&b.bootstrap, INPUT, &inputs[..half]);
    let input = input_map(&inputs, &malformed);
    let ends = end_offsets(&input, 3);
    // Only shutdown can close a batch in this run: no count, span or wait is reachable.
    let e = logged_env(
        &b.bootstrap,
        "term",
        &[
            ("BATCH__MAX_EVENTS", "1000000"),
            ("BATCH__MAX_SPAN", "100d"),
            ("BATCH__MAX_WAIT", "1h"),
        ],
    );
    let mut first = Service::start(dir.path(), "first", &e);
    first.wait_ready(READY);
    // However fast the machine: the signal comes once the first half is read.
    first.wait_for("the first half consumed", DONE, |s| {
        s.consumed() == Some(half as u64)
    });
    first.signal("TERM");
    assert_eq!(first.wait_exit(DONE), Some(0), "{}", first.stderr());
    let stderr = first.stderr();
    assert!(
        stderr.contains("\"message\":\"stopped\""),
        "a run summary is logged: {stderr}"
    );
    let one = first.logged_packets();
    assert_eq!(one.len(), 1, "one packet, closed at shutdown");
    assert_eq!(one[0].window.closed_by, "shutdown");
    let mut after_first = vec![0i64; 3];
    for s in &one[0].sources {
        after_first[s.partition as usize] = s.last_offset + 1;
    }
    assert_eq!(
        committed(&b.bootstrap, "term", 3),
        after_first,
        "offsets committed at shutdown"
    );
    assert_eq!(
        after_first,
        end_offsets(&input_map(&inputs[..half], &malformed[..half]), 3),
        "the shutdown packet is the whole first half"
    );
    check_arrival_commit_order("first", &stderr, &base(&[0, 0, 0]));

    assert_ne!(after_first, ends, "the first run stopped mid-input");
    produce(&b.bootstrap, INPUT, &inputs[half..]);
    let mut second = Service::start(dir.path(), "second", &logged_env(&b.bootstrap, "term", &[]));
    // Ready means the signal handler is installed and partitions are assigned.
    second.wait_ready(READY);
    wait_committed(&b.bootstrap, "term", &ends, DONE);
    second.signal("TERM");
    assert_eq!(second.wait_exit(DONE), Some(0));
    check_arrival_commit_order("second", &second.stderr(), &base(&after_first));
    for p in second.logged_packets() {
        for s in &p.sources {
            assert!(
                s.first_offset >= after_first[s.partition as usize],
                "the restart reprocessed {s:?} (committed {after_first:?})"
            );
        }
    }
    let plain: Vec<Packet> = packets_with_offsets(&b.bootstrap)
        .into_iter()
        .map(|(_, p)| p)
        .collect();
    let covered = verify_packets(&plain, &input, &default_slices(), 100);
    assert_eq!(covered.len(), inputs.len());
    assert!(covered.values().all(|&n| n == 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_in_one_group_share_the_partitions() {
    let b = broker_with_topics(3).await;
    let dir = tempfile::tempdir().unwrap();
    let e = logged_env(
        &b.bootstrap,
        "pair",
        &[("BATCH__MAX_EVENTS", "1000"), ("BATCH__MAX_WAIT", "1s")],
    );
    let mut a = Service::start(dir.path(), "a", &e);
    a.wait_ready(READY);
    let mut c = Service::start(dir.path(), "c", &e);
    c.wait_ready(READY);
    // Both members hold partitions now; the rebalance that let the second in is over.
    a.wait_ready(READY);

    let (inputs, malformed) = generated_input(55, 10_000, 30_000, 3);
    let input = produce_input(&b.bootstrap, &inputs, &malformed);
    let ends = end_offsets(&input, 3);
    wait_committed(&b.bootstrap, "pair", &ends, DONE);
    a.signal("TERM");
    c.signal("TERM");
    assert_eq!(a.wait_exit(DONE), Some(0), "{}", a.stderr());
    assert_eq!(c.wait_exit(DONE), Some(0), "{}", c.stderr());
    check_arrival_commit_order("a", &a.stderr(), &base(&[0, 0, 0]));
    check_arrival_commit_order("c", &c.stderr(), &base(&[0, 0, 0]));

    let (pa, pc) = (a.logged_packets(), c.logged_packets());
    let parts = |ps: &[Packet]| {
        let mut v: Vec<i32> = ps
            .iter()
            .flat_map(|p| p.sources.iter().map(|s| s.partition))
            .collect();
        v.sort();
        v.dedup();
        v
    };
    let (parts_a, parts_c) = (parts(&pa), parts(&pc));
    assert!(
        !parts_a.is_empty() && !parts_c.is_empty(),
        "both instances worked: {parts_a:?} {parts_c:?}"
    );
    assert!(
        parts_a.iter().all(|p| !parts_c.contains(p)),
        "each partition has one owner: {parts_a:?} {parts_c:?}"
    );

    let plain: Vec<Packet> = packets_with_offsets(&b.bootstrap)
        .into_iter()
        .map(|(_, p)| p)
        .collect();
    let covered = verify_packets(&plain, &input, &default_slices(), 100);
    assert_eq!(covered.len(), inputs.len(), "no event lost");
    assert!(covered.values().all(|&n| n == 1), "no event counted twice");
}

/// Instance `a` reads the first part of the input alone: one batch closes by
/// count and is published, but its metrics log is a full disk (`/dev/full`),
/// so the batch stays in flight (not acknowledged for its commit); the rest
/// stays in the open batch. Instance `c` joins the group, and the rebalance
/// revokes `a`'s partitions while that batch is in flight (`a` logs how much
/// work was in flight). Once the disk has room, `a` delivers the batch in
/// flight and the open batch, closed by the rebalance, and commits, before
/// the partitions go. Then the rest of the input is shared by both; every
/// input offset is in exactly one packet of the two, every invalid message in
/// exactly one dead letter.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebalance_with_a_batch_in_flight_delivers_it_and_closes_the_open_batch() {
    let b = broker_with_topics(3).await;
    let group = "rebalance";
    let dir = tempfile::tempdir().unwrap();
    let (first, first_bad) = generated_input(65, 3_000, 1_500, 3);
    // The second part: valid events only, 1000 per partition, so whichever
    // instance reads a partition closes its batches by count and commits all.
    let (more, more_bad) = generated_input(67, 3_000, 3_100, 3);
    let second: Vec<Input> = more
        .into_iter()
        .zip(more_bad)
        .filter(|(_, bad)| !bad)
        .map(|(m, _)| m)
        .take(3_000)
        .enumerate()
        .map(|(i, mut m)| {
            m.partition = (i % 3) as i32;
            m
        })
        .collect();
    assert_eq!(second.len(), 3_000);
    produce(&b.bootstrap, INPUT, &first);
    let first_input = input_map(&first, &first_bad);
    let all: Vec<Input> = first.iter().chain(&second).cloned().collect();
    let all_bad: Vec<bool> = first_bad
        .iter()
        .copied()
        .chain(std::iter::repeat_n(false, second.len()))
        .collect();
    let input = input_map(&all, &all_bad);
    let ends = end_offsets(&input, 3);
    // Service::start puts the log at DIR/NAME.metrics.log.
    let log_a = dir.path().join("a.metrics.log");
    std::os::unix::fs::symlink("/dev/full", &log_a).unwrap();
    let e = logged_env(
        &b.bootstrap,
        group,
        &[
            ("BATCH__MAX_EVENTS", "1000"),
            ("BATCH__MAX_SPAN", "1h"),
            ("BATCH__MAX_WAIT", "1h"),
        ],
    );
    let mut a = Service::start(dir.path(), "a", &e);
    a.wait_ready(READY);
    a.wait_for(
        "a consumed the first part and cannot log its packet",
        DONE,
        |s| {
            s.consumed() == Some(first.len() as u64)
                && metric(&s.metrics(), "login_metrics_metrics_log_failures_total")
                    .is_some_and(|n| n >= 1.0)
        },
    );
    assert_eq!(
        metric_sum(&a.metrics(), "login_metrics_batches_total"),
        1.0,
        "one batch closed by count, the rest open"
    );

    let mut c = Service::start(dir.path(), "c", &e);
    a.wait_for("a's partitions revoked", DONE, |s| {
        logged(&s.stderr())
            .iter()
            .any(|l| matches!(l, Logged::Revoked { .. }))
    });
    let revoked: Vec<u64> = logged(&a.stderr())
        .iter()
        .filter_map(|l| match l {
            Logged::Revoked { in_flight } => Some(*in_flight),
            _ => None,
        })
        .collect();
    assert_eq!(
        revoked[0], 1,
        "the batch closed by count was in flight at the revocation"
    );
    assert_eq!(
        published_count(&a.stderr()),
        0,
        "no packet was acknowledged and logged yet"
    );
    // Room again: the next retry reopens the path as a regular file.
    std::fs::remove_file(&log_a).unwrap();
    c.wait_ready(READY);
    a.wait_ready(READY);
    let stderr = a.stderr();
    assert!(
        !stderr.contains("revoked with delivered offsets not committed"),
        "the revocation's commit failed: {stderr}"
    );
    // a is assigned again only once the revocation has returned.
    assert_eq!(
        published_count(&stderr),
        2,
        "the revocation delivered the batch in flight and the open batch: {stderr}"
    );
    produce(&b.bootstrap, INPUT, &second);
    wait_committed_while_running(&b.bootstrap, group, &ends, DONE, &mut [&mut a, &mut c]);
    a.signal("TERM");
    c.signal("TERM");
    assert_eq!(a.wait_exit(DONE), Some(0), "{}", a.stderr());
    assert_eq!(c.wait_exit(DONE), Some(0), "{}", c.stderr());

    // a's first packets: the batch in flight, then the open batch closed by
    // the rebalance; together they are the first part, each offset once.
    let pa = a.logged_packets();
    assert!(pa.len() >= 2, "{pa:?}");
    assert_eq!(pa[0].window.closed_by, "count");
    assert_eq!(pa[1].window.closed_by, "rebalance");
    let mut covered: Vec<(i32, i64)> = pa[..2]
        .iter()
        .flat_map(|p| &p.sources)
        .flat_map(|s| (s.first_offset..=s.last_offset).map(move |o| (s.partition, o)))
        .collect();
    covered.sort();
    let mut want: Vec<(i32, i64)> = first_input.keys().copied().collect();
    want.sort();
    assert_eq!(covered, want, "the two packets cover the first part once");

    let (parts_a, _) = check_arrival_commit_order("a", &a.stderr(), &base(&[0, 0, 0]));
    assert_eq!(parts_a.len(), 3, "a committed on every partition");
    let (parts_c, _) = check_arrival_commit_order("c", &c.stderr(), &HashMap::new());
    assert!(!parts_c.is_empty(), "c worked and committed");

    let packets = read_packets(&b.bootstrap);
    let covered = verify_packets(&packets, &input, &default_slices(), 100);
    assert_eq!(covered.len(), input.len(), "no event lost");
    assert!(covered.values().all(|&n| n == 1), "no event counted twice");
    let mut dead: Vec<(i32, i64)> = read_all(&b.bootstrap, DLQ)
        .iter()
        .map(|d| {
            (
                d.headers["source.partition"].parse().unwrap(),
                d.headers["source.offset"].parse().unwrap(),
            )
        })
        .collect();
    dead.sort();
    let mut invalid: Vec<(i32, i64)> = input
        .iter()
        .filter(|(_, (bad, _))| *bad)
        .map(|(c, _)| *c)
        .collect();
    invalid.sort();
    assert!(!invalid.is_empty());
    assert_eq!(
        dead, invalid,
        "every invalid message is a dead letter exactly once"
    );
}

/// [`kill_9_at_random_points_loses_nothing`] in window mode with the default
/// window settings: 60,000 messages whose event times span 24 windows of
/// 2,500 events, six runs killed with SIGKILL at seeded random points, then
/// one to the end. A run reads a preloaded topic whole within a second, so
/// the input is produced while the runs come and go, 2,500 messages a
/// second (a window of event time a second), and every kill finds windows
/// open, closing and in delivery. Over distinct packet ids every valid event
/// is counted once or is a late dead letter; a window published again
/// carries its id and content; windows close by watermark as the input is
/// read and the last ones by wait; every logged commit, across the runs,
/// follows the packets of the windows it passes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_at_random_points_loses_nothing_in_window_mode() {
    let b = broker_with_topics(3).await;
    let dir = tempfile::tempdir().unwrap();
    let input = timed_input(33, 20_000, 60_000, 3, 4.0);
    let ends = end_offsets(&input.map(), 3);
    let feed = Feed::start(&b.bootstrap, INPUT, input.inputs.clone(), 2_500.0);
    // One instance started again after each kill, under one name (see
    // `kill_9_with_windows_in_flight_loses_nothing_in_window_mode` in the
    // mock-cluster suite).
    let mut env = Mode::Window.env();
    env.push(("KAFKA__INSTANCE_NAME", "crashy"));
    let e = logged_env(&b.bootstrap, "crashy", &env);

    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(20261121);
    let mut logs: Vec<(String, String, Vec<i64>)> = Vec::new();
    for i in 0..6 {
        let name = format!("crash{i}");
        let before = committed(&b.bootstrap, "crashy", 3);
        let mut svc = Service::start(dir.path(), &name, &e);
        svc.wait_ready(READY);
        let ms = rng.gen_range(200..2_500);
        std::thread::sleep(Duration::from_millis(ms));
        svc.signal("KILL");
        assert_eq!(
            svc.wait_exit(Duration::from_secs(10)),
            None,
            "killed by the signal"
        );
        eprintln!(
            "run {i}: killed after {ms} ms; committed {before:?} -> {:?}; {} packets published",
            committed(&b.bootstrap, "crashy", 3),
            published_count(&svc.stderr())
        );
        logs.push((name, svc.stderr(), before));
    }
    assert_eq!(
        feed.finish(),
        input.inputs.len(),
        "the whole input produced"
    );
    let before = committed(&b.bootstrap, "crashy", 3);
    let mut last = Service::start(dir.path(), "final", &e);
    last.wait_ready(READY);
    wait_committed(&b.bootstrap, "crashy", &ends, DONE);
    last.signal("TERM");
    assert_eq!(last.wait_exit(DONE), Some(0), "{}", last.stderr());
    logs.push(("final".into(), last.stderr(), before));

    let checked = check_windows(
        "crashy",
        &b.bootstrap,
        OUTPUT,
        DLQ,
        &input,
        &Expect::default(),
    );
    assert_closed_by_watermark_and_wait("crashy", &checked);
    let mut order = WindowCommitOrder::new(&input, &checked.late);
    let mut done = Vec::new();
    for (name, stderr, before) in &logs {
        done = order.check(name, stderr, before).0;
    }
    assert_eq!(done, ends, "the logged commits reach the end");
}

/// [`sigterm_mid_run_flushes_commits_exits_zero_and_a_restart_reprocesses_nothing`]
/// in window mode: SIGTERM once the first half of the input (twelve windows
/// of event time) is read. The windows already closed by watermark are
/// delivered and committed and the process exits 0; the windows still open
/// are not published, and their offsets stay uncommitted. The restart, with
/// the second half produced, publishes them whole and no window of the first
/// run again (its checkpoint says they were emitted): no packet id and no
/// window in both runs, and over both every valid event is counted once or
/// is a late dead letter.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_mid_run_flushes_commits_exits_zero_and_a_restart_reprocesses_nothing_in_window_mode(
) {
    let b = broker_with_topics(3).await;
    let dir = tempfile::tempdir().unwrap();
    let input = timed_input(44, 10_000, 60_000, 3, 4.0);
    let half = input.inputs.len() / 2;
    produce(&b.bootstrap, INPUT, &input.inputs[..half]);
    let half_ends = end_offsets(&input.prefix(half).map(), 3);
    let ends = end_offsets(&input.map(), 3);
    let e = logged_env(&b.bootstrap, "term", &Mode::Window.env());
    let mut first = Service::start(dir.path(), "first", &e);
    first.wait_ready(READY);
    first.wait_for("the first half consumed", DONE, |s| {
        s.consumed() == Some(half as u64)
    });
    first.signal("TERM");
    assert_eq!(first.wait_exit(DONE), Some(0), "{}", first.stderr());
    let stderr = first.stderr();
    assert!(
        stderr.contains("\"message\":\"stopped\""),
        "a run summary is logged: {stderr}"
    );
    let one = first.logged_packets();
    assert!(!one.is_empty(), "windows closed before the signal");
    for p in &one {
        assert_eq!(
            p.window.closed_by, "watermark",
            "only windows closed by watermark before the signal are published"
        );
    }
    let after_first = committed(&b.bootstrap, "term", 3);
    assert!(
        after_first
            .iter()
            .zip(&half_ends)
            .all(|(c, e)| *c > 0 && c <= e)
            && after_first != half_ends,
        "the closed windows are committed, the open ones are not: {after_first:?} of {half_ends:?}"
    );

    produce(&b.bootstrap, INPUT, &input.inputs[half..]);
    let mut second = Service::start(dir.path(), "second", &e);
    second.wait_ready(READY);
    wait_committed(&b.bootstrap, "term", &ends, DONE);
    second.signal("TERM");
    assert_eq!(second.wait_exit(DONE), Some(0), "{}", second.stderr());
    let two = second.logged_packets();
    let windows = |ps: &[Packet]| -> std::collections::BTreeSet<(i64, Option<u32>)> {
        ps.iter()
            .map(|p| (Checked::start_of(p), p.window.pane))
            .collect()
    };
    let both: Vec<_> = windows(&one)
        .intersection(&windows(&two))
        .copied()
        .collect();
    assert!(
        both.is_empty(),
        "the restart published windows of the first run again: {both:?}"
    );

    let checked = check_windows(
        "term",
        &b.bootstrap,
        OUTPUT,
        DLQ,
        &input,
        &Expect::default(),
    );
    assert_closed_by_watermark_and_wait("term", &checked);
    assert_eq!(
        checked.copies,
        checked.packets.len(),
        "no packet published twice"
    );
    let mut order = WindowCommitOrder::new(&input, &checked.late);
    let (done, _) = order.check("first", &stderr, &[0, 0, 0]);
    assert_eq!(done, after_first, "the first run's logged commits");
    let (done, _) = order.check("second", &second.stderr(), &after_first);
    assert_eq!(done, ends, "the logged commits reach the end");
}

/// [`two_instances_in_one_group_share_the_partitions`] in window mode: each
/// instance reports the windows of its own partitions, so a window appears
/// at most once per instance, each packet naming only its instance's
/// partitions; over distinct packet ids every valid event is counted once or
/// is a late dead letter.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_in_one_group_share_the_partitions_in_window_mode() {
    let b = broker_with_topics(3).await;
    let dir = tempfile::tempdir().unwrap();
    let e = logged_env(&b.bootstrap, "pair", &Mode::Window.env());
    let mut a = Service::start(dir.path(), "a", &e);
    a.wait_ready(READY);
    let mut c = Service::start(dir.path(), "c", &e);
    c.wait_ready(READY);
    // Both members hold partitions now; the rebalance that let the second in is over.
    a.wait_ready(READY);

    // 24 windows of 1,250 events.
    let input = timed_input(55, 10_000, 30_000, 3, 8.0);
    produce(&b.bootstrap, INPUT, &input.inputs);
    let ends = end_offsets(&input.map(), 3);
    wait_committed_while_running(&b.bootstrap, "pair", &ends, DONE, &mut [&mut a, &mut c]);
    a.signal("TERM");
    c.signal("TERM");
    assert_eq!(a.wait_exit(DONE), Some(0), "{}", a.stderr());
    assert_eq!(c.wait_exit(DONE), Some(0), "{}", c.stderr());

    let (pa, pc) = (a.logged_packets(), c.logged_packets());
    let (parts_a, parts_c) = (partitions_of(&pa), partitions_of(&pc));
    assert!(
        !parts_a.is_empty() && !parts_c.is_empty(),
        "both instances worked: {parts_a:?} {parts_c:?}"
    );
    assert!(
        parts_a.is_disjoint(&parts_c),
        "each partition has one owner: {parts_a:?} {parts_c:?}"
    );
    for (name, ps) in [("a", &pa), ("c", &pc)] {
        let mut seen = std::collections::BTreeSet::new();
        for p in ps {
            assert!(
                seen.insert((Checked::start_of(p), p.window.pane)),
                "{name} reported window {} twice",
                Checked::start_of(p)
            );
        }
    }

    let checked = check_windows(
        "pair",
        &b.bootstrap,
        OUTPUT,
        DLQ,
        &input,
        &Expect::default(),
    );
    assert_closed_by_watermark_and_wait("pair", &checked);
    assert_eq!(
        checked.copies,
        checked.packets.len(),
        "no packet published twice"
    );
    let shared = pa
        .iter()
        .filter(|p| pc.iter().any(|q| q.window.start == p.window.start))
        .count();
    assert!(shared > 0, "some windows are reported by both instances");
    let mut order = WindowCommitOrder::new(&input, &checked.late);
    for (name, svc) in [("a", &a), ("c", &c)] {
        let (_, commits) = order.check(name, &svc.stderr(), &[0, 0, 0]);
        assert!(commits > 0, "{name} committed");
    }
}

/// [`a_rebalance_with_a_batch_in_flight_delivers_it_and_closes_the_open_batch`]
/// in window mode. Instance `a` reads the first part of the input alone (30 s
/// of event time): the first windows close by watermark and are published,
/// but its metrics log is a full disk (`/dev/full`), so that work stays in
/// flight; the last window stays open. Instance `c` joins the group, and the
/// rebalance revokes `a`'s partitions while that work is in flight (`a`
/// logs how much). Once the disk has room, `a` delivers the work in flight
/// and commits before the partitions go; the open window is not published
/// (nothing closes by `rebalance` in window mode) and is computed whole by
/// the partitions' next readers. Then the rest of the input is shared by
/// both: over distinct packet ids every valid event is counted once or is a
/// late dead letter, every invalid message is a dead letter.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebalance_with_a_batch_in_flight_delivers_it_in_window_mode() {
    let b = broker_with_topics(3).await;
    let group = "rebalance";
    let dir = tempfile::tempdir().unwrap();
    let input = timed_input(65, 3_000, 4_500, 3, 20.0);
    let first = 1_500;
    produce(&b.bootstrap, INPUT, &input.inputs[..first]);
    let ends = end_offsets(&input.map(), 3);
    // Service::start puts the log at DIR/NAME.metrics.log.
    let log_a = dir.path().join("a.metrics.log");
    std::os::unix::fs::symlink("/dev/full", &log_a).unwrap();
    let e = logged_env(&b.bootstrap, group, &Mode::Window.env());
    let mut a = Service::start(dir.path(), "a", &e);
    // Not `wait_ready`: `a` may read the whole first part and find its
    // metrics log full before the first readiness probe, and a service
    // whose delivery is stuck does not report ready.
    a.wait_for(
        "a consumed the first part and cannot log its packet",
        DONE,
        |s| {
            s.consumed() == Some(first as u64)
                && metric(&s.metrics(), "login_metrics_metrics_log_failures_total")
                    .is_some_and(|n| n >= 1.0)
        },
    );

    let mut c = Service::start(dir.path(), "c", &e);
    a.wait_for("a's partitions revoked", DONE, |s| {
        logged(&s.stderr())
            .iter()
            .any(|l| matches!(l, Logged::Revoked { .. }))
    });
    let revoked: Vec<u64> = logged(&a.stderr())
        .iter()
        .filter_map(|l| match l {
            Logged::Revoked { in_flight } => Some(*in_flight),
            _ => None,
        })
        .collect();
    assert!(
        revoked[0] >= 1,
        "the windows closed by watermark were in flight at the revocation"
    );
    assert_eq!(
        published_count(&a.stderr()),
        0,
        "no packet was acknowledged and logged yet"
    );
    // Room again: the next retry reopens the path as a regular file.
    std::fs::remove_file(&log_a).unwrap();
    c.wait_ready(READY);
    a.wait_ready(READY);
    let stderr = a.stderr();
    assert!(
        !stderr.contains("revoked with delivered offsets not committed")
            && !stderr.contains("revoked while delivery was behind"),
        "the revocation's delivery or commit failed: {stderr}"
    );
    // a is assigned again only once the revocation has returned.
    let closed = metric_sum(&a.metrics(), "login_metrics_batches_total");
    assert!(
        closed >= 1.0 && published_count(&stderr) as f64 == closed,
        "the revocation delivered every window closed before it ({closed} closed): {stderr}"
    );
    produce(&b.bootstrap, INPUT, &input.inputs[first..]);
    wait_committed_while_running(&b.bootstrap, group, &ends, DONE, &mut [&mut a, &mut c]);
    a.signal("TERM");
    c.signal("TERM");
    assert_eq!(a.wait_exit(DONE), Some(0), "{}", a.stderr());
    assert_eq!(c.wait_exit(DONE), Some(0), "{}", c.stderr());

    for p in a.logged_packets().iter().chain(&c.logged_packets()) {
        assert_ne!(
            p.window.closed_by, "rebalance",
            "an open window was published"
        );
    }
    let checked = check_windows(group, &b.bootstrap, OUTPUT, DLQ, &input, &Expect::default());
    assert_closed_by_watermark_and_wait(group, &checked);
    let mut order = WindowCommitOrder::new(&input, &checked.late);
    let (_, commits) = order.check("a", &a.stderr(), &[0, 0, 0]);
    let first_commit = logged(&a.stderr())
        .into_iter()
        .find_map(|l| match l {
            Logged::Committed(offsets) => Some(offsets),
            _ => None,
        })
        .expect("a committed");
    assert_eq!(
        first_commit.len(),
        3,
        "a committed the delivered windows on every partition before they went: {first_commit:?}"
    );
    assert!(commits > 0);
    let (_, commits) = order.check("c", &c.stderr(), &[0, 0, 0]);
    assert!(commits > 0, "c worked and committed");
}
