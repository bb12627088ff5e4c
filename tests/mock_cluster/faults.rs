//! Fault injection: the real `login-metrics` binary against librdkafka's mock
//! cluster, which runs in the test process and listens on loopback, so the
//! test injects faults while the service runs: commit errors on the last
//! commit of the input, produce errors librdkafka retries by itself and ones
//! it gives up on, a broker down in the middle of a batch, a slow broker, and
//! kill -9 while batches are in flight. In every case nothing is lost or counted twice, and every run's
//! own log proves that no offset was committed before the packets covering
//! it were acknowledged and in the metrics log (`crate::common::order`).

use std::time::Duration;

use crate::common::order::*;
use crate::common::service::{base, logged_env, wait_committed_while_running, Service};
use crate::common::*;
use login_metrics::commit::ledger::COMMIT_ATTEMPTS;
use login_metrics::core::packet::Packet;
use rdkafka::mocking::{MockCluster, MockCoordinator};
use rdkafka::producer::DefaultProducerContext;
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};

const READY: Duration = Duration::from_secs(60);
const DONE: Duration = Duration::from_secs(90);

type Cluster = MockCluster<'static, DefaultProducerContext>;

/// One broker: the input topic with `partitions`, the output and dead-letter topics.
fn cluster(partitions: i32) -> Cluster {
    let c = MockCluster::new(1).expect("mock cluster");
    c.create_topic(INPUT, partitions, 1).unwrap();
    c.create_topic(OUTPUT, 1, 1).unwrap();
    c.create_topic(DLQ, 1, 1).unwrap();
    c
}

/// Two brokers: broker 1 leads the input topic and coordinates `group`,
/// broker 2 leads the output and dead-letter topics. Taking broker 2 down
/// stalls delivery, and only delivery.
fn split_cluster(partitions: i32, group: &str) -> Cluster {
    let c = MockCluster::new(2).expect("mock cluster");
    c.create_topic(INPUT, partitions, 1).unwrap();
    c.create_topic(OUTPUT, 1, 1).unwrap();
    c.create_topic(DLQ, 1, 1).unwrap();
    for p in 0..partitions {
        c.partition_leader(INPUT, p, Some(1)).unwrap();
    }
    c.partition_leader(OUTPUT, 0, Some(2)).unwrap();
    c.partition_leader(DLQ, 0, Some(2)).unwrap();
    c.coordinator(MockCoordinator::Group(group.to_string()), 1)
        .unwrap();
    c
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
/// is one failed attempt), and the last part, one batch, is produced.
#[test]
fn offset_commit_errors_are_retried() {
    let c = cluster(2);
    let bs = c.bootstrap_servers();
    let dir = tempfile::tempdir().unwrap();
    let (inputs, malformed) = generated_input(61, 2_000, 3_300, 2);
    let split = 3_000;
    produce(&bs, INPUT, &inputs[..split]);
    let input = input_map(&inputs, &malformed);
    let first_ends = end_offsets(&input_map(&inputs[..split], &malformed[..split]), 2);
    let ends = end_offsets(&input, 2);
    // The last 300 messages are fewer than a count: one batch, closed by wait.
    let mut svc = Service::start(
        dir.path(),
        "commits",
        &logged_env(
            &bs,
            "commits",
            &[
                ("BATCH__MAX_EVENTS", "1000"),
                ("BATCH__MAX_WAIT", "3s"),
                ("BATCH__MAX_SPAN", "1h"),
            ],
        ),
    );
    svc.wait_ready(READY);
    wait_committed_while_running(&bs, "commits", &first_ends, DONE, &mut [&mut svc]);

    let failures = 3 * COMMIT_ATTEMPTS as usize + 2;
    c.request_errors(
        RDKafkaApiKey::OffsetCommit,
        &vec![RDKafkaRespErr::RD_KAFKA_RESP_ERR_REBALANCE_IN_PROGRESS; failures],
    );
    produce(&bs, INPUT, &inputs[split..]);
    wait_committed_while_running(&bs, "commits", &ends, DONE, &mut [&mut svc]);
    assert_eq!(
        metric(&svc.metrics(), "login_metrics_offset_commit_failures_total"),
        Some(failures as f64),
        "every injected error failed one of the service's commit attempts"
    );
    stop(&mut svc);
    assert_commit_order("commits", &svc, 2);
    assert_exactly_once(&bs, &input);
}

/// Connections dropped and leaders lost mid-produce: librdkafka reconnects and resends.
#[test]
fn produce_transport_errors_are_retried() {
    use RDKafkaRespErr::*;
    let c = cluster(1);
    let bs = c.bootstrap_servers();
    let dir = tempfile::tempdir().unwrap();
    let (inputs, malformed) = generated_input(62, 2_000, 4_000, 1);
    let input = produce_input(&bs, &inputs, &malformed);
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
    let mut svc = Service::start(
        dir.path(),
        "transport",
        &logged_env(&bs, "transport", &[("BATCH__MAX_EVENTS", "500")]),
    );
    svc.wait_ready(READY);
    let ends = end_offsets(&input, 1);
    wait_committed_while_running(&bs, "transport", &ends, DONE, &mut [&mut svc]);
    stop(&mut svc);
    assert_commit_order("transport", &svc, 1);
    assert_exactly_once(&bs, &input);
}

/// librdkafka gives up on the batch's packet: every produce request fails
/// with a retriable error until `message.timeout.ms` (`kafka.delivery_timeout`,
/// 1 s here) has passed. Only the pipeline's own next attempt
/// (`kafka.delivery_attempts`) can deliver it, once the errors stop.
#[test]
fn a_batch_librdkafka_gives_up_on_is_delivered_by_the_pipelines_next_attempt() {
    let c = cluster(1);
    let bs = c.bootstrap_servers();
    let dir = tempfile::tempdir().unwrap();
    let (inputs, malformed) = generated_input(66, 1_000, 1_200, 1);
    let input = produce_input(&bs, &inputs, &malformed);
    let ends = end_offsets(&input, 1);
    // Far more errors than librdkafka's retries can use up in one second.
    c.request_errors(
        RDKafkaApiKey::Produce,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS; 2_000],
    );
    let mut svc = Service::start(
        dir.path(),
        "attempts",
        &logged_env(
            &bs,
            "attempts",
            &[
                ("BATCH__MAX_EVENTS", "500"),
                ("KAFKA__DELIVERY_TIMEOUT", "1s"),
                ("KAFKA__DELIVERY_ATTEMPTS", "5"),
            ],
        ),
    );
    svc.wait_ready(READY);
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
    assert_commit_order("attempts", &svc, 1);
    let packets = assert_exactly_once(&bs, &input);
    assert_eq!(
        packets.len(),
        published_count(&stderr),
        "each batch is in the topic once"
    );
}

/// Two batches close by count; the third (about 1000 events) is open when
/// the broker goes down, closes by wait during the outage, and is delivered
/// after it.
#[test]
fn a_broker_down_for_ten_seconds_mid_batch_loses_nothing() {
    let c = cluster(1);
    let bs = c.bootstrap_servers();
    let dir = tempfile::tempdir().unwrap();
    let (inputs, malformed) = generated_input(63, 2_000, 5_000, 1);
    let input = produce_input(&bs, &inputs, &malformed);
    let ends = end_offsets(&input, 1);
    let mut svc = Service::start(
        dir.path(),
        "down",
        &logged_env(
            &bs,
            "down",
            &[
                ("BATCH__MAX_EVENTS", "2000"),
                ("BATCH__MAX_WAIT", "2s"),
                ("BATCH__MAX_SPAN", "1h"),
                // The member outlives the outage (its coordinator is down too).
                ("KAFKA__CONSUMER__SESSION_TIMEOUT_MS", "45000"),
                ("KAFKA__CONSUMER__MAX_POLL_INTERVAL_MS", "60000"),
            ],
        ),
    );
    svc.wait_ready(READY);
    svc.wait_for("two packets", DONE, |s| published_count(&s.stderr()) >= 2);
    c.broker_down(1).unwrap();
    std::thread::sleep(Duration::from_secs(10));
    assert_eq!(
        published_count(&svc.stderr()),
        2,
        "nothing is delivered while the broker is down"
    );
    c.broker_up(1).unwrap();
    wait_committed_while_running(&bs, "down", &ends, DONE, &mut [&mut svc]);
    stop(&mut svc);
    assert_commit_order("down", &svc, 1);
    let packets = assert_exactly_once(&bs, &input);
    assert_eq!(packets.len(), 3);
    assert_eq!(packets[2].window.closed_by, "wait");
}

#[test]
fn a_slow_broker_only_slows_the_pipeline() {
    let c = cluster(2);
    let bs = c.bootstrap_servers();
    let dir = tempfile::tempdir().unwrap();
    let (inputs, malformed) = generated_input(64, 2_000, 4_000, 2);
    let input = produce_input(&bs, &inputs, &malformed);
    let ends = end_offsets(&input, 2);
    c.broker_round_trip_time(1, Duration::from_millis(300))
        .unwrap();
    let mut svc = Service::start(
        dir.path(),
        "slow",
        &logged_env(&bs, "slow", &[("BATCH__MAX_EVENTS", "800")]),
    );
    svc.wait_ready(READY);
    wait_committed_while_running(&bs, "slow", &ends, DONE, &mut [&mut svc]);
    stop(&mut svc);
    c.broker_round_trip_time(1, Duration::ZERO).unwrap();
    assert_commit_order("slow", &svc, 2);
    assert_exactly_once(&bs, &input);
}

/// kill -9 with work in flight, three times. Each run first commits
/// something; then delivery stalls (the output's broker goes down) while the
/// consumer goes on closing batches, and the process is killed with closed
/// batches not delivered and input not committed, both asserted: the batches
/// it had closed (its /metrics, read before the kill) outnumber the packets
/// it logged as published, and the committed offsets, read from the broker
/// after the kill, are short of the input's end. After the restarts every
/// input offset is in exactly one committed packet; every other copy comes
/// from a killed run and lies at or past its last commit (docs/guarantees.md,
/// 2).
#[test]
fn kill_9_with_batches_in_flight_loses_nothing() {
    let group = "crashy";
    let c = split_cluster(3, group);
    let bs = c.bootstrap_servers();
    let dir = tempfile::tempdir().unwrap();
    let (inputs, malformed) = generated_input(35, 5_000, 60_000, 3);
    let input = produce_input(&bs, &inputs, &malformed);
    let ends = end_offsets(&input, 3);
    let e = logged_env(
        &bs,
        group,
        &[("BATCH__MAX_EVENTS", "1000"), ("BATCH__MAX_SPAN", "1h")],
    );
    // Per killed run: the output offsets it published at and the commits it left.
    let mut runs: Vec<KilledRun> = Vec::new();
    let mut out_start = 0;
    for i in 0..3 {
        let name = format!("crash{i}");
        let before = committed(&bs, group, 3);
        let mut svc = Service::start(dir.path(), &name, &e);
        svc.wait_ready(READY);
        svc.wait_for("a commit of this run", DONE, |_| {
            committed(&bs, group, 3) != before
        });
        c.broker_down(2).unwrap();
        let mut closed = 0.0;
        svc.wait_for("two closed batches not delivered", DONE, |s| {
            closed = metric_sum(&s.metrics(), "login_metrics_batches_total");
            closed >= published_count(&s.stderr()) as f64 + 2.0
        });
        svc.signal("KILL");
        assert_eq!(
            svc.wait_exit(Duration::from_secs(10)),
            None,
            "killed by the signal"
        );
        c.broker_up(2).unwrap();
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
        check_arrival_commit_order(&name, &svc.stderr(), &base(&before));
        let out_end = read_all(&bs, OUTPUT)
            .iter()
            .map(|r| r.offset + 1)
            .max()
            .unwrap_or(0);
        eprintln!("{name}: {closed} batches closed, {published} published; committed {before:?} -> {after:?}; output {out_start}..{out_end}");
        runs.push((out_start..out_end, after));
        out_start = out_end;
    }
    let before = committed(&bs, group, 3);
    let mut last = Service::start(dir.path(), "final", &e);
    last.wait_ready(READY);
    wait_committed_while_running(&bs, group, &ends, DONE, &mut [&mut last]);
    stop(&mut last);
    check_arrival_commit_order("final", &last.stderr(), &base(&before));

    assert_each_offset_committed_once(&bs, &input, &runs);
}

/// A revocation while delivery cannot finish — the metrics log's disk is
/// full, so the packet in flight is never settled — returns from the
/// rebalance callback within half of `max.poll.interval.ms`, giving that work
/// up uncommitted, instead of waiting for the disk (and being expelled from
/// the group). Once the disk has room, the partitions' next reader reads the
/// given-up work again: nothing is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_while_delivery_is_stuck_gives_up_in_time_and_loses_nothing() {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    let c = cluster(2);
    let bs = c.bootstrap_servers();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("m.log");
    std::os::unix::fs::symlink("/dev/full", &log).unwrap();
    let (inputs, malformed) = generated_input(65, 1_000, 3_000, 2);
    let input = produce_input(&bs, &inputs, &malformed);
    let run = start(settings(
        &bs,
        &log,
        &[
            ("BATCH__MAX_EVENTS", "500"),
            // Revocations may wait 5 s for work in flight.
            ("KAFKA__CONSUMER__MAX_POLL_INTERVAL_MS", "10000"),
            ("KAFKA__CONSUMER__SESSION_TIMEOUT_MS", "6000"),
        ],
    ));
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
    // partition stays uncommitted.
    std::fs::remove_file(&log).unwrap();
    let ends = end_offsets(&input, 2);
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
    wait_committed(&bs, "login-metrics", &end_offsets(&input, 2), DONE);
    run.stop().await.expect("the run completes");

    let packets = read_packets(&bs);
    let covered = verify_packets(&packets, &input, &default_slices(), 100);
    assert_eq!(
        covered.len(),
        input.len(),
        "every input offset is in a delivered packet"
    );
}
