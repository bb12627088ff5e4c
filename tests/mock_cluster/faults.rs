//! Fault injection: the real `login-metrics` binary against librdkafka's mock
//! cluster, which runs in the test process and listens on loopback, so the
//! test injects faults while the service runs: commit errors on the last
//! commit of the input, produce errors librdkafka retries by itself and ones
//! it gives up on, a broker down in the middle of a batch, a slow broker,
//! kill -9 while batches are in flight, a revocation while delivery is stuck,
//! and, in window mode, a delivery stall longer than `batch.max_wait`.
//!
//! Each fault runs in both modes: arrival mode, where every input offset is
//! in exactly one packet, and window mode with the default window settings
//! (`..._in_window_mode`), on input whose event times span many windows, so
//! that windows close by watermark while the input is read and by wait once
//! it ends: there every valid event is counted in exactly one distinct packet
//! or is a late dead letter, every packet id carries one content, and every
//! invalid message is a dead letter (`crate::common::windowed`). In both,
//! every run's own log proves that no offset was committed before the packets
//! covering it were acknowledged and in the metrics log
//! (`crate::common::order`, `WindowCommitOrder`).

use std::collections::BTreeSet;
use std::time::Duration;

use crate::common::order::*;
use crate::common::service::{base, logged_env, wait_committed_while_running, Service};
use crate::common::windowed::*;
use crate::common::*;
use login_metrics::commit::ledger::COMMIT_ATTEMPTS;
use login_metrics::core::packet::Packet;
use rdkafka::mocking::{MockCluster, MockCoordinator};
use rdkafka::producer::DefaultProducerContext;
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};

const READY: Duration = Duration::from_secs(60);
const DONE: Duration = Duration::from_secs(90);

type Cluster = MockCluster<'static, DefaultProducerContext>;

/// One broker: the input topic with `partitions`, the output, dead-letter
/// and checkpoint topics.
fn cluster(partitions: i32) -> Cluster {
    let c = MockCluster::new(1).expect("mock cluster");
    c.create_topic(INPUT, partitions, 1).unwrap();
    c.create_topic(OUTPUT, 1, 1).unwrap();
    c.create_topic(DLQ, 1, 1).unwrap();
    c.create_topic(CHECKPOINTS, 1, 1).unwrap();
    c
}

/// Two brokers: broker 1 leads the input and checkpoint topics and
/// coordinates `group`, broker 2 leads the output and dead-letter topics.
/// Taking broker 2 down stalls delivery, and only delivery.
fn split_cluster(partitions: i32, group: &str) -> Cluster {
    let c = MockCluster::new(2).expect("mock cluster");
    c.create_topic(INPUT, partitions, 1).unwrap();
    c.create_topic(OUTPUT, 1, 1).unwrap();
    c.create_topic(DLQ, 1, 1).unwrap();
    c.create_topic(CHECKPOINTS, 1, 1).unwrap();
    for p in 0..partitions {
        c.partition_leader(INPUT, p, Some(1)).unwrap();
    }
    c.partition_leader(OUTPUT, 0, Some(2)).unwrap();
    c.partition_leader(DLQ, 0, Some(2)).unwrap();
    c.partition_leader(CHECKPOINTS, 0, Some(1)).unwrap();
    c.coordinator(MockCoordinator::Group(group.to_string()), 1)
        .unwrap();
    c
}

/// A test's input: in arrival mode generated as it always was (no event
/// time is checked there, so none is kept); in window mode with event times
/// `step_ms` apart (see `timed_input`), so that it spans many windows of
/// fewer events than `batch.max_events` (a window split into panes by count
/// may split differently in a replay).
fn test_input(
    mode: Mode,
    seed: u64,
    users: usize,
    count: usize,
    partitions: i32,
    step_ms: f64,
) -> Timed {
    match mode {
        Mode::Arrival => {
            let (inputs, malformed) = generated_input(seed, users, count, partitions);
            Timed {
                ts: vec![None; inputs.len()],
                inputs,
                malformed,
            }
        }
        Mode::Window => timed_input(seed, users, count, partitions, step_ms),
    }
}

/// The mode's settings, then arrival mode's own (`arrival`, none in window
/// mode, which keeps the default window settings), then `both`.
fn mode_env<'a>(
    mode: Mode,
    arrival: &[(&'a str, &'a str)],
    both: &[(&'a str, &'a str)],
) -> Vec<(&'a str, &'a str)> {
    let mut e = mode.env();
    if mode == Mode::Arrival {
        e.extend_from_slice(arrival);
    }
    e.extend_from_slice(both);
    e
}

/// Checks the run's commit order from a start with nothing committed; the
/// run must have committed more than once.
fn assert_commit_order(name: &str, svc: &Service, partitions: i32) {
    let (_, commits) =
        check_arrival_commit_order(name, &svc.stderr(), &base(&vec![0; partitions as usize]));
    assert!(commits > 1, "{name}: the commits are logged ({commits})");
}

/// The output topic's packets, each input offset in exactly one of them, no
/// packet id twice, the counts right.
fn assert_exactly_once(bs: &str, input: &InputMap) -> Vec<Packet> {
    let packets = read_packets(bs);
    let covered = verify_packets(&packets, input, &default_slices(), 100);
    assert_eq!(
        covered.len(),
        input.len(),
        "every input offset is in a delivered packet"
    );
    assert!(
        covered.values().all(|&n| n == 1),
        "no offset in two packets"
    );
    let mut ids: Vec<&str> = packets.iter().map(|p| p.packet_id.as_str()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), packets.len(), "no packet published twice");
    packets
}

/// What one run that started with nothing committed, was never killed and
/// read the whole input published and committed. Arrival mode: every input
/// offset in exactly one packet, no packet twice, the commits after the
/// packets. Window mode: `check_windows`, windows closed by watermark and
/// by wait, no packet twice, and the logged commits after the packets of
/// the windows they pass, up to the end. Returns the distinct packets.
fn assert_delivered_once(
    mode: Mode,
    name: &str,
    bs: &str,
    svc: &Service,
    input: &Timed,
    partitions: i32,
) -> Vec<Packet> {
    match mode {
        Mode::Arrival => {
            assert_commit_order(name, svc, partitions);
            assert_exactly_once(bs, &input.map())
        }
        Mode::Window => {
            let checked = check_windows(name, bs, OUTPUT, DLQ, input, &Expect::default());
            assert_closed_by_watermark_and_wait(name, &checked);
            assert_eq!(
                checked.copies,
                checked.packets.len(),
                "{name}: no packet published twice"
            );
            let (done, commits) = WindowCommitOrder::new(input, &checked.late).check(
                name,
                &svc.stderr(),
                &vec![0; partitions as usize],
            );
            assert!(commits > 1, "{name}: the commits are logged ({commits})");
            assert_eq!(
                done,
                end_offsets(&input.map(), partitions),
                "{name}: the logged commits reach the end"
            );
            checked.packets.into_values().collect()
        }
    }
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

/// Sends SIGTERM and expects a clean exit.
fn stop(svc: &mut Service) {
    svc.signal("TERM");
    assert_eq!(svc.wait_exit(DONE), Some(0), "{}", svc.stderr());
}

/// The last commit of a finite input fails, again and again, and nothing new
/// arrives: no later commit can carry its offsets, only the retry of the
/// failed one. The first part of the input is committed without faults; then
/// every OffsetCommit request fails for more attempts than three settles
/// make (REBALANCE_IN_PROGRESS: librdkafka does not retry it, so each error
/// is one failed attempt), and the last part is produced. Arrival mode: the
/// last part is one batch, closed by wait. Window mode: each part's last
/// windows close by wait; the last part starts a window of its own, and its
/// stragglers into the window closed by wait before it are late.
fn offset_commit_errors(mode: Mode) {
    let c = cluster(2);
    let bs = c.bootstrap_servers();
    let dir = tempfile::tempdir().unwrap();
    // Window mode: 20 ms of event time a message, six windows before the split.
    let input = test_input(mode, 61, 2_000, 3_300, 2, 20.0);
    let split = 3_000;
    produce(&bs, INPUT, &input.inputs[..split]);
    let first_ends = end_offsets(&input.prefix(split).map(), 2);
    let ends = end_offsets(&input.map(), 2);
    // Arrival mode: the last 300 messages are fewer than a count, one batch.
    let env = mode_env(
        mode,
        &[
            ("BATCH__MAX_EVENTS", "1000"),
            ("BATCH__MAX_WAIT", "3s"),
            ("BATCH__MAX_SPAN", "1h"),
        ],
        &[],
    );
    let mut svc = Service::start(dir.path(), "commits", &logged_env(&bs, "commits", &env));
    svc.wait_ready(READY);
    wait_committed_while_running(&bs, "commits", &first_ends, DONE, &mut [&mut svc]);

    let failures = 3 * COMMIT_ATTEMPTS as usize + 2;
    c.request_errors(
        RDKafkaApiKey::OffsetCommit,
        &vec![RDKafkaRespErr::RD_KAFKA_RESP_ERR_REBALANCE_IN_PROGRESS; failures],
    );
    produce(&bs, INPUT, &input.inputs[split..]);
    wait_committed_while_running(&bs, "commits", &ends, DONE, &mut [&mut svc]);
    assert_eq!(
        metric(&svc.metrics(), "login_metrics_offset_commit_failures_total"),
        Some(failures as f64),
        "every injected error failed one of the service's commit attempts"
    );
    stop(&mut svc);
    assert_delivered_once(mode, "commits", &bs, &svc, &input, 2);
}

#[test]
fn offset_commit_errors_are_retried() {
    offset_commit_errors(Mode::Arrival);
}

#[test]
fn offset_commit_errors_are_retried_in_window_mode() {
    offset_commit_errors(Mode::Window);
}

/// Connections dropped and leaders lost mid-produce: librdkafka reconnects and resends.
fn produce_transport_errors(mode: Mode) {
    use RDKafkaRespErr::*;
    let c = cluster(1);
    let bs = c.bootstrap_servers();
    let dir = tempfile::tempdir().unwrap();
    // Window mode: eight windows.
    let input = test_input(mode, 62, 2_000, 4_000, 1, 20.0);
    produce(&bs, INPUT, &input.inputs);
    c.request_errors(
        RDKafkaApiKey::Produce,
        &[
            RD_KAFKA_RESP_ERR__TRANSPORT,
            RD_KAFKA_RESP_ERR_NOT_LEADER_FOR_PARTITION,
            RD_KAFKA_RESP_ERR__TRANSPORT,
            RD_KAFKA_RESP_ERR_REQUEST_TIMED_OUT,
            RD_KAFKA_RESP_ERR__TRANSPORT,
        ],
    );
    let env = mode_env(mode, &[("BATCH__MAX_EVENTS", "500")], &[]);
    let mut svc = Service::start(dir.path(), "transport", &logged_env(&bs, "transport", &env));
    svc.wait_ready(READY);
    let ends = end_offsets(&input.map(), 1);
    wait_committed_while_running(&bs, "transport", &ends, DONE, &mut [&mut svc]);
    stop(&mut svc);
    assert_delivered_once(mode, "transport", &bs, &svc, &input, 1);
}

#[test]
fn produce_transport_errors_are_retried() {
    produce_transport_errors(Mode::Arrival);
}

#[test]
fn produce_transport_errors_are_retried_in_window_mode() {
    produce_transport_errors(Mode::Window);
}

/// librdkafka gives up on the batch's packet: every produce request fails
/// with a retriable error until `message.timeout.ms` (`kafka.delivery_timeout`,
/// 1 s here) has passed. Only the pipeline's own next attempt
/// (`kafka.delivery_attempts`) can deliver it, once the errors stop. In
/// window mode the first work holds the first windows closed by watermark.
///
/// Window mode claims each assigned partition's checkpoint (a write to the
/// checkpoint topic) before reading it, and the injected errors fail every
/// produce request, whichever client makes it. There the input's leader is a
/// second broker, down until the service has its partition and the errors
/// are injected: the claim is written before them, the packets during them.
/// The group starts from a committed offset, so that the assignment does not
/// ask the down broker where the partition starts.
fn librdkafka_gives_up(mode: Mode) {
    let c = match mode {
        Mode::Arrival => cluster(1),
        Mode::Window => {
            let c = MockCluster::new(2).expect("mock cluster");
            c.create_topic(INPUT, 1, 1).unwrap();
            c.partition_leader(INPUT, 0, Some(2)).unwrap();
            for t in [OUTPUT, DLQ, CHECKPOINTS] {
                c.create_topic(t, 1, 1).unwrap();
                c.partition_leader(t, 0, Some(1)).unwrap();
            }
            c.coordinator(MockCoordinator::Group("attempts".into()), 1)
                .unwrap();
            c
        }
    };
    let bs = c.bootstrap_servers();
    let dir = tempfile::tempdir().unwrap();
    // Window mode: six windows.
    let input = test_input(mode, 66, 1_000, 1_200, 1, 50.0);
    produce(&bs, INPUT, &input.inputs);
    let ends = end_offsets(&input.map(), 1);
    // Far more errors than librdkafka's retries can use up in one second.
    let inject = || {
        c.request_errors(
            RDKafkaApiKey::Produce,
            &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS; 2_000],
        )
    };
    match mode {
        Mode::Arrival => inject(),
        Mode::Window => {
            commit_input(&bs, "attempts", &[0]);
            c.broker_down(2).unwrap();
        }
    }
    let env = mode_env(
        mode,
        &[("BATCH__MAX_EVENTS", "500")],
        &[
            ("KAFKA__DELIVERY_TIMEOUT", "1s"),
            ("KAFKA__DELIVERY_ATTEMPTS", "5"),
        ],
    );
    let mut svc = Service::start(dir.path(), "attempts", &logged_env(&bs, "attempts", &env));
    svc.wait_ready(READY);
    if mode == Mode::Window {
        inject();
        c.broker_up(2).unwrap();
    }
    svc.wait_for("a delivery attempt failed", DONE, |s| {
        metric(&s.metrics(), "login_metrics_delivery_failures_total").is_some_and(|n| n >= 1.0)
    });
    assert_eq!(
        published_count(&svc.stderr()),
        0,
        "nothing was delivered while every produce failed"
    );
    c.clear_request_errors(RDKafkaApiKey::Produce);
    wait_committed_while_running(&bs, "attempts", &ends, DONE, &mut [&mut svc]);
    stop(&mut svc);
    let stderr = svc.stderr();
    assert!(
        stderr.contains("delivery failed; retrying"),
        "the pipeline retried the batch: {stderr}"
    );
    let packets = assert_delivered_once(mode, "attempts", &bs, &svc, &input, 1);
    assert_eq!(
        packets.len(),
        published_count(&stderr),
        "each batch is in the topic once"
    );
}

#[test]
fn a_batch_librdkafka_gives_up_on_is_delivered_by_the_pipelines_next_attempt() {
    librdkafka_gives_up(Mode::Arrival);
}

#[test]
fn a_batch_librdkafka_gives_up_on_is_delivered_by_the_pipelines_next_attempt_in_window_mode() {
    librdkafka_gives_up(Mode::Window);
}

/// The only broker goes down for ten seconds once two packets are out.
/// Arrival mode: two batches close by count; the third (about 1000 events)
/// is open when the broker goes down, closes by wait during the outage, and
/// is delivered after it. Window mode: windows closed by watermark are in
/// delivery or waiting for it, later ones open, when the broker goes down;
/// nothing is delivered during the outage, and afterwards every window is,
/// the last ones closed by wait.
fn broker_down(mode: Mode) {
    let c = cluster(1);
    let bs = c.bootstrap_servers();
    let dir = tempfile::tempdir().unwrap();
    // Window mode: ten windows.
    let input = test_input(mode, 63, 2_000, 5_000, 1, 20.0);
    produce(&bs, INPUT, &input.inputs);
    let ends = end_offsets(&input.map(), 1);
    let env = mode_env(
        mode,
        &[
            ("BATCH__MAX_EVENTS", "2000"),
            ("BATCH__MAX_WAIT", "2s"),
            ("BATCH__MAX_SPAN", "1h"),
        ],
        &[
            // The member outlives the outage (its coordinator is down too).
            ("KAFKA__CONSUMER__SESSION_TIMEOUT_MS", "45000"),
            ("KAFKA__CONSUMER__MAX_POLL_INTERVAL_MS", "60000"),
        ],
    );
    let mut svc = Service::start(dir.path(), "down", &logged_env(&bs, "down", &env));
    svc.wait_ready(READY);
    svc.wait_for("two packets", DONE, |s| published_count(&s.stderr()) >= 2);
    c.broker_down(1).unwrap();
    // A packet acknowledged just before the broker went down may still be
    // on its way to the metrics log and its "published" line.
    std::thread::sleep(Duration::from_secs(1));
    let published = published_count(&svc.stderr());
    std::thread::sleep(Duration::from_secs(9));
    let during = match mode {
        Mode::Arrival => 2,
        Mode::Window => published,
    };
    assert_eq!(
        published_count(&svc.stderr()),
        during,
        "nothing is delivered while the broker is down"
    );
    c.broker_up(1).unwrap();
    wait_committed_while_running(&bs, "down", &ends, DONE, &mut [&mut svc]);
    stop(&mut svc);
    let packets = assert_delivered_once(mode, "down", &bs, &svc, &input, 1);
    if mode == Mode::Arrival {
        assert_eq!(packets.len(), 3);
        assert_eq!(packets[2].window.closed_by, "wait");
    }
}

#[test]
fn a_broker_down_for_ten_seconds_mid_batch_loses_nothing() {
    broker_down(Mode::Arrival);
}

#[test]
fn a_broker_down_for_ten_seconds_mid_batch_loses_nothing_in_window_mode() {
    broker_down(Mode::Window);
}

/// A broker that answers every request 300 ms late. Arrival mode: the only
/// broker. Window mode: the output's (broker 2 of a split cluster), so that
/// delivery is slow while reading, checkpoints and commits are not, and a
/// commit that did not wait for its delivery would overtake it.
fn slow_broker(mode: Mode) {
    let (c, slow) = match mode {
        Mode::Arrival => (cluster(2), 1),
        Mode::Window => (split_cluster(2, "slow"), 2),
    };
    let bs = c.bootstrap_servers();
    let dir = tempfile::tempdir().unwrap();
    // Window mode: eight windows.
    let input = test_input(mode, 64, 2_000, 4_000, 2, 20.0);
    produce(&bs, INPUT, &input.inputs);
    let ends = end_offsets(&input.map(), 2);
    c.broker_round_trip_time(slow, Duration::from_millis(300))
        .unwrap();
    let env = mode_env(mode, &[("BATCH__MAX_EVENTS", "800")], &[]);
    let mut svc = Service::start(dir.path(), "slow", &logged_env(&bs, "slow", &env));
    svc.wait_ready(READY);
    wait_committed_while_running(&bs, "slow", &ends, DONE, &mut [&mut svc]);
    stop(&mut svc);
    c.broker_round_trip_time(slow, Duration::ZERO).unwrap();
    assert_delivered_once(mode, "slow", &bs, &svc, &input, 2);
}

#[test]
fn a_slow_broker_only_slows_the_pipeline() {
    slow_broker(Mode::Arrival);
}

#[test]
fn a_slow_broker_only_slows_the_pipeline_in_window_mode() {
    slow_broker(Mode::Window);
}

/// kill -9 with work in flight, three times. Each run first commits
/// something; then delivery stalls (the output's broker goes down) while the
/// consumer goes on closing batches (window mode: windows, by watermark),
/// and the process is killed with closed batches not delivered and input
/// not committed, both asserted: the batches it had closed (its /metrics,
/// read before the kill) outnumber the packets it logged as published, and
/// the committed offsets, read from the broker after the kill, are short of
/// the input's end. After the restarts, arrival mode: every input offset is
/// in exactly one committed packet; every other copy comes from a killed run
/// and lies at or past its last commit (docs/guarantees.md, 2). Window mode:
/// a window published again carries its id and content, and over distinct
/// ids every valid event is counted once or is late; every logged commit,
/// across the runs, follows the packets of the windows it passes.
///
/// In window mode delivery takes up to `MAX_HELD_EVENTS` events of closed
/// windows ahead of the one it publishes, so a consumer finds the whole
/// preloaded input read and nearly all its windows delivered before the
/// broker goes down. There the input arrives in four parts (each
/// partition's messages in order): the first before the first run, each
/// next one once the output's broker is down, so that the windows it closes
/// are in flight when the process is killed. The second run's metrics log
/// is a full disk instead: its windows are published, never acknowledged
/// for their commit, and published again by the next run, under the same
/// ids with the same content (asserted).
fn kill_9_with_work_in_flight(mode: Mode) {
    let group = "crashy";
    let c = split_cluster(3, group);
    let bs = c.bootstrap_servers();
    let dir = tempfile::tempdir().unwrap();
    // Window mode: 24 windows of 2,500 events, six to a part.
    let input = test_input(mode, 35, 5_000, 60_000, 3, 4.0);
    let mut parts = match mode {
        Mode::Arrival => input.inputs.chunks(input.inputs.len()),
        Mode::Window => input.inputs.chunks(input.inputs.len() / 4),
    };
    produce(&bs, INPUT, parts.next().unwrap());
    let ends = end_offsets(&input.map(), 3);
    // Each run is the same instance started again: under one name it takes
    // its partitions back at once. Under a new name it would share the group
    // with its killed self until that session times out, read only some
    // partitions meanwhile, and then go through a rebalance, whose commits
    // the mock cluster refuses (REBALANCE_IN_PROGRESS), so that work it had
    // delivered is published again uncommitted. In window mode, besides, the
    // windows the killed run had published whole, uncommitted, would be
    // published again split by partition, under other ids (a window's id
    // names the partitions it counts).
    let env = mode_env(
        mode,
        &[("BATCH__MAX_EVENTS", "1000"), ("BATCH__MAX_SPAN", "1h")],
        &[("KAFKA__INSTANCE_NAME", group)],
    );
    let e = logged_env(&bs, group, &env);
    // Per killed run: the output offsets it published at and the commits it left.
    let mut runs: Vec<KilledRun> = Vec::new();
    // Per run: its name, its log and what was committed when it started.
    let mut logs: Vec<(String, String, Vec<i64>)> = Vec::new();
    let mut out_start = 0;
    for i in 0..3 {
        let name = format!("crash{i}");
        let full_disk = mode == Mode::Window && i == 1;
        if full_disk {
            // Service::start puts the log at DIR/NAME.metrics.log.
            let log = dir.path().join(format!("{name}.metrics.log"));
            std::os::unix::fs::symlink("/dev/full", log).unwrap();
        }
        let before = committed(&bs, group, 3);
        let mut svc = Service::start(dir.path(), &name, &e);
        if full_disk {
            // Not ready, ever: /readyz answers 503 once an append has failed.
            produce(&bs, INPUT, parts.next().unwrap());
        } else {
            svc.wait_ready(READY);
            svc.wait_for("a commit of this run", DONE, |_| {
                committed(&bs, group, 3) != before
            });
            c.broker_down(2).unwrap();
            if let Some(part) = parts.next() {
                produce(&bs, INPUT, part);
            }
        }
        let mut closed = 0.0;
        svc.wait_for("two closed batches not delivered", DONE, |s| {
            let page = s.metrics();
            closed = metric_sum(&page, "login_metrics_batches_total");
            closed >= published_count(&s.stderr()) as f64 + 2.0
                && (!full_disk
                    || metric(&page, "login_metrics_metrics_log_failures_total")
                        .is_some_and(|n| n >= 1.0))
        });
        svc.signal("KILL");
        assert_eq!(
            svc.wait_exit(Duration::from_secs(10)),
            None,
            "killed by the signal"
        );
        if !full_disk {
            c.broker_up(2).unwrap();
        }
        let after = committed(&bs, group, 3);
        let published = published_count(&svc.stderr());
        assert!(
            (published as f64) < closed,
            "{name}: killed with a closed batch in flight ({closed} closed, {published} published)"
        );
        assert!(
            after.iter().sum::<i64>() < ends.iter().sum::<i64>(),
            "{name}: killed with input not committed: {after:?} of {ends:?}"
        );
        if mode == Mode::Arrival {
            check_arrival_commit_order(&name, &svc.stderr(), &base(&before));
        }
        let out_end = read_all(&bs, OUTPUT)
            .iter()
            .map(|r| r.offset + 1)
            .max()
            .unwrap_or(0);
        eprintln!("{name}: {closed} batches closed, {published} published; committed {before:?} -> {after:?}; output {out_start}..{out_end}");
        runs.push((out_start..out_end, after));
        logs.push((name, svc.stderr(), before));
        out_start = out_end;
    }
    let before = committed(&bs, group, 3);
    let mut last = Service::start(dir.path(), "final", &e);
    last.wait_ready(READY);
    wait_committed_while_running(&bs, group, &ends, DONE, &mut [&mut last]);
    stop(&mut last);
    match mode {
        Mode::Arrival => {
            check_arrival_commit_order("final", &last.stderr(), &base(&before));
            assert_each_offset_committed_once(&bs, &input.map(), &runs);
        }
        Mode::Window => {
            logs.push(("final".into(), last.stderr(), before));
            let checked = check_windows(group, &bs, OUTPUT, DLQ, &input, &Expect::default());
            assert_closed_by_watermark_and_wait(group, &checked);
            assert!(
                checked.copies > checked.packets.len(),
                "the windows published on a full disk were published again"
            );
            let mut order = WindowCommitOrder::new(&input, &checked.late);
            let mut done = Vec::new();
            for (name, stderr, before) in &logs {
                done = order.check(name, stderr, before).0;
            }
            assert_eq!(done, ends, "the logged commits reach the end");
        }
    }
}

#[test]
fn kill_9_with_batches_in_flight_loses_nothing() {
    kill_9_with_work_in_flight(Mode::Arrival);
}

#[test]
fn kill_9_with_windows_in_flight_loses_nothing_in_window_mode() {
    kill_9_with_work_in_flight(Mode::Window);
}

/// A revocation while delivery cannot finish — the metrics log's disk is
/// full, so the packet in flight is never settled — returns from the
/// rebalance callback within half of `max.poll.interval.ms`, giving that work
/// up uncommitted, instead of waiting for the disk (and being expelled from
/// the group). Once the disk has room, the partitions' next reader reads the
/// given-up work again: nothing is lost. In window mode the work in flight
/// holds the first windows closed by watermark; the packets it published
/// before it was given up count the events that their next readers count
/// again (with one partition each, under other ids), so they are left out
/// of "counted once".
async fn revocation_while_delivery_is_stuck(mode: Mode) {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    let c = cluster(2);
    let bs = c.bootstrap_servers();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("m.log");
    std::os::unix::fs::symlink("/dev/full", &log).unwrap();
    // Window mode: six windows; the first closes by watermark before a
    // thousand messages are read.
    let input = test_input(mode, 65, 1_000, 3_000, 2, 20.0);
    produce(&bs, INPUT, &input.inputs);
    let env = mode_env(
        mode,
        &[("BATCH__MAX_EVENTS", "500")],
        &[
            // Revocations may wait 5 s for work in flight.
            ("KAFKA__CONSUMER__MAX_POLL_INTERVAL_MS", "10000"),
            ("KAFKA__CONSUMER__SESSION_TIMEOUT_MS", "6000"),
        ],
    );
    let run = start(settings(&bs, &log, &env));
    // The first packet is published and its log append fails: delivery is stuck.
    run.consumed(1_000, DONE).await;

    // A second member joins the group: the service's partitions are revoked.
    let stop = Arc::new(AtomicBool::new(false));
    let member = {
        let (bs, stop) = (bs.clone(), stop.clone());
        std::thread::spawn(move || {
            let consumer: BaseConsumer = rdkafka::ClientConfig::new()
                .set("bootstrap.servers", &bs)
                .set("group.id", "login-metrics")
                .set("enable.auto.commit", "false")
                .set("session.timeout.ms", "6000")
                .create()
                .unwrap();
            consumer.subscribe(&[INPUT]).unwrap();
            while !stop.load(Ordering::Relaxed) {
                let _ = consumer.poll(Duration::from_millis(50));
            }
            consumer.unsubscribe();
        })
    };
    let deadline = std::time::Instant::now() + DONE;
    while run.progress.revocations_given_up.load(Ordering::Relaxed) == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the revocation did not give up the stuck work within {DONE:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        committed(&bs, "login-metrics", 2),
        vec![-1, -1],
        "nothing given up is committed"
    );

    // Room again while the second member still holds one partition: the
    // given-up work (batches from both partitions) is delivered now, but its
    // acknowledgements must not commit anything. The service, still in the
    // group, reads its own partition again and commits it; the member's
    // partition stays uncommitted. What the output holds now was published
    // by the given-up work: delivery is stuck on it, and nothing after it
    // is published before it.
    let given_up_end = read_all(&bs, OUTPUT)
        .iter()
        .map(|r| r.offset + 1)
        .max()
        .unwrap_or(0);
    std::fs::remove_file(&log).unwrap();
    let ends = end_offsets(&input.map(), 2);
    let deadline = std::time::Instant::now() + DONE;
    let own = loop {
        let now = committed(&bs, "login-metrics", 2);
        if let Some(p) = (0..2).find(|&p| now[p] == ends[p]) {
            break p;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the service did not commit a partition of its own: {now:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(
        committed(&bs, "login-metrics", 2)[1 - own],
        -1,
        "nothing is committed for the partition the service gave up"
    );

    // The second member leaves: the service reads everything.
    stop.store(true, Ordering::Relaxed);
    member.join().unwrap();
    wait_committed(&bs, "login-metrics", &ends, DONE);
    run.stop().await.expect("the run completes");

    match mode {
        Mode::Arrival => {
            let packets = read_packets(&bs);
            let covered = verify_packets(&packets, &input.map(), &default_slices(), 100);
            assert_eq!(
                covered.len(),
                input.map().len(),
                "every input offset is in a delivered packet"
            );
        }
        Mode::Window => {
            let (mut before, mut after) = (BTreeSet::new(), BTreeSet::new());
            for r in read_all(&bs, OUTPUT) {
                let id = String::from_utf8(r.key.expect("keyed")).unwrap();
                if r.offset < given_up_end {
                    before.insert(id);
                } else {
                    after.insert(id);
                }
            }
            let given_up: BTreeSet<String> = before.difference(&after).cloned().collect();
            assert!(
                !given_up.is_empty(),
                "the given-up work had published packets: {before:?}"
            );
            let checked = check_windows(
                "revoked",
                &bs,
                OUTPUT,
                DLQ,
                &input,
                &Expect {
                    given_up,
                    ..Expect::default()
                },
            );
            assert_closed_by_watermark_and_wait("revoked", &checked);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_while_delivery_is_stuck_gives_up_in_time_and_loses_nothing() {
    revocation_while_delivery_is_stuck(Mode::Arrival).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_while_delivery_is_stuck_gives_up_in_time_and_loses_nothing_in_window_mode() {
    revocation_while_delivery_is_stuck(Mode::Window).await;
}

/// Window mode: delivery stalls for longer than `batch.max_wait` while the
/// input flows. The input is produced at 400 messages a second, its event
/// time 12.5 ms a message, five times as fast as the clock (a window of 800
/// events closes about every two seconds). The output's broker goes down;
/// delivery takes closed windows ahead of the stuck one up to
/// `MAX_HELD_EVENTS` events, so a burst of 120,000 messages follows, and
/// only once delivery can take no more does the service hold consumption
/// back (`login_metrics_consumption_held`). The stall then lasts twice
/// `max_wait` more (4 s here, so that the test stays short) while the input
/// goes on at its pace: long enough for a wait closure, were held time
/// counted as silence. Then the broker comes back and the input produced
/// meanwhile is read. No on-time event is dead-lettered as late (the late
/// dead letters are exactly the per-partition oracle's), and every window
/// the watermark passes by the end closed by watermark; only the last ones,
/// after the input stopped, by wait.
#[test]
fn a_delivery_stall_longer_than_max_wait_makes_no_event_late_in_window_mode() {
    let group = "stall";
    let c = split_cluster(3, group);
    let bs = c.bootstrap_servers();
    let dir = tempfile::tempdir().unwrap();
    let burst = 120_000;
    let all = timed_input(71, 3_000, 160_000, 3, 12.5);
    let max_wait = Duration::from_secs(4);
    let mut svc = Service::start(
        dir.path(),
        group,
        &logged_env(
            &bs,
            group,
            &[("BATCH__MODE", "window"), ("BATCH__MAX_WAIT", "4s")],
        ),
    );
    svc.wait_ready(READY);
    let feed = Feed::start(&bs, INPUT, all.inputs.clone(), 400.0);
    svc.wait_for("a commit on every partition", DONE, |_| {
        committed(&bs, group, 3).iter().all(|o| *o > 0)
    });
    c.broker_down(2).unwrap();
    let mut sent = feed.stop();
    sent += Feed::start(
        &bs,
        INPUT,
        all.inputs[sent..sent + burst].to_vec(),
        50_000.0,
    )
    .finish();
    let feed = Feed::start(&bs, INPUT, all.inputs[sent..].to_vec(), 400.0);
    svc.wait_for(
        "consumption held back while delivery is stalled",
        DONE,
        |s| metric(&s.metrics(), "login_metrics_consumption_held") == Some(1.0),
    );
    std::thread::sleep(max_wait * 2);
    assert_eq!(
        metric(&svc.metrics(), "login_metrics_consumption_held"),
        Some(1.0),
        "consumption was held back all along"
    );
    c.broker_up(2).unwrap();
    let stalled = sent + feed.sent();
    svc.wait_for("the input produced during the stall read", DONE, |s| {
        s.consumed().is_some_and(|n| n as usize >= stalled + 1_000)
    });
    let n = sent + feed.stop();
    let input = all.prefix(n);
    let ends = end_offsets(&input.map(), 3);
    wait_committed_while_running(&bs, group, &ends, DONE, &mut [&mut svc]);
    stop(&mut svc);

    let checked = check_windows(
        group,
        &bs,
        OUTPUT,
        DLQ,
        &input,
        &Expect {
            oracle_late: true,
            ..Expect::default()
        },
    );
    let watermark = input.final_watermark();
    for p in checked.packets.values() {
        let end = Checked::start_of(p) + SIZE_MS;
        let want = if end <= watermark {
            "watermark"
        } else {
            "wait"
        };
        assert_eq!(
            p.window.closed_by,
            want,
            "window {} (the final watermark {watermark})",
            Checked::start_of(p)
        );
    }
    assert_closed_by_watermark_and_wait(group, &checked);
    let (done, _) =
        WindowCommitOrder::new(&input, &checked.late).check(group, &svc.stderr(), &[0, 0, 0]);
    assert_eq!(done, ends, "the logged commits reach the end");
    eprintln!("{group}: {n} messages, {stalled} produced by the end of the stall");
}
