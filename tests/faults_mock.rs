//! Fault injection with librdkafka's mock cluster: commit errors, produce
//! transport errors, a broker down for ten seconds in the middle of a batch,
//! and a slow broker. In every case the pipeline recovers on its own, loses
//! nothing, and never commits an offset before its packet is delivered.

mod common;

use std::time::Duration;

use common::*;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};

const T: Duration = Duration::from_secs(90);

fn cluster(partitions: i32) -> MockCluster<'static, DefaultProducerContext> {
    let c = MockCluster::new(1).expect("mock cluster");
    c.create_topic(INPUT, partitions, 1).unwrap();
    c.create_topic(OUTPUT, 1, 1).unwrap();
    c.create_topic(DLQ, 1, 1).unwrap();
    c
}

/// Every input offset is in exactly one delivered packet, and the counts are right.
fn assert_nothing_lost(bs: &str, input: &InputMap) {
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
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offset_commit_errors_are_retried() {
    use RDKafkaRespErr::*;
    let c = cluster(2);
    let bs = c.bootstrap_servers();
    let dir = tempfile::tempdir().unwrap();
    let (inputs, malformed) = generated_input(61, 2_000, 6_000, 2);
    let input = produce_input(&bs, &inputs, &malformed);
    c.request_errors(
        RDKafkaApiKey::OffsetCommit,
        &[
            RD_KAFKA_RESP_ERR_REBALANCE_IN_PROGRESS,
            RD_KAFKA_RESP_ERR_COORDINATOR_NOT_AVAILABLE,
            RD_KAFKA_RESP_ERR_REBALANCE_IN_PROGRESS,
            RD_KAFKA_RESP_ERR_COORDINATOR_NOT_AVAILABLE,
        ],
    );
    let run = start(settings(
        &bs,
        &dir.path().join("m.log"),
        &[("BATCH__MAX_EVENTS", "1000")],
    ));
    let watch = CommitWatch::start(&bs, "login-metrics", 2, run.packets.clone());
    run.consumed(inputs.len() as u64, T).await;
    run.stop().await.expect("the run recovers");
    watch.check();
    assert_eq!(committed(&bs, "login-metrics", 2), end_offsets(&input, 2));
    assert_nothing_lost(&bs, &input);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn produce_transport_errors_are_retried() {
    use RDKafkaRespErr::*;
    let c = cluster(1);
    let bs = c.bootstrap_servers();
    let dir = tempfile::tempdir().unwrap();
    let (inputs, malformed) = generated_input(62, 2_000, 4_000, 1);
    let input = produce_input(&bs, &inputs, &malformed);
    // Connections dropped and leaders lost mid-produce: librdkafka reconnects and resends.
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
    let run = start(settings(
        &bs,
        &dir.path().join("m.log"),
        &[("BATCH__MAX_EVENTS", "500")],
    ));
    let watch = CommitWatch::start(&bs, "login-metrics", 1, run.packets.clone());
    run.consumed(inputs.len() as u64, T).await;
    run.stop().await.expect("the run recovers");
    watch.check();
    assert_eq!(committed(&bs, "login-metrics", 1), end_offsets(&input, 1));
    assert_nothing_lost(&bs, &input);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_down_for_ten_seconds_mid_batch_loses_nothing() {
    let c = cluster(1);
    let bs = c.bootstrap_servers();
    let dir = tempfile::tempdir().unwrap();
    let (inputs, malformed) = generated_input(63, 2_000, 5_000, 1);
    let input = produce_input(&bs, &inputs, &malformed);
    // Two batches close by count; the third (1000 events) is open when the
    // broker goes down, closes by wait during the outage, and must be delivered after it.
    let run = start(settings(
        &bs,
        &dir.path().join("m.log"),
        &[
            ("BATCH__MAX_EVENTS", "2000"),
            ("BATCH__MAX_WAIT", "2s"),
            ("BATCH__MAX_SPAN", "1h"),
        ],
    ));
    let watch = CommitWatch::start(&bs, "login-metrics", 1, run.packets.clone());
    run.delivered(2, T).await;
    c.broker_down(1).unwrap();
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!(
        run.packets.lock().unwrap().len(),
        2,
        "nothing is delivered while the broker is down"
    );
    c.broker_up(1).unwrap();
    run.delivered(3, T).await;
    run.stop().await.expect("the run recovers");
    watch.check();
    let packets = read_packets(&bs);
    assert_eq!(packets.len(), 3);
    assert_eq!(packets[2].window.closed_by, "wait");
    assert_eq!(committed(&bs, "login-metrics", 1), end_offsets(&input, 1));
    assert_nothing_lost(&bs, &input);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_broker_only_slows_the_pipeline() {
    let c = cluster(2);
    let bs = c.bootstrap_servers();
    let dir = tempfile::tempdir().unwrap();
    let (inputs, malformed) = generated_input(64, 2_000, 4_000, 2);
    let input = produce_input(&bs, &inputs, &malformed);
    c.broker_round_trip_time(1, Duration::from_millis(300))
        .unwrap();
    let run = start(settings(
        &bs,
        &dir.path().join("m.log"),
        &[("BATCH__MAX_EVENTS", "800")],
    ));
    let watch = CommitWatch::start(&bs, "login-metrics", 2, run.packets.clone());
    run.consumed(inputs.len() as u64, T).await;
    run.stop().await.expect("the run completes");
    watch.check();
    c.broker_round_trip_time(1, Duration::ZERO).unwrap();
    assert_eq!(committed(&bs, "login-metrics", 2), end_offsets(&input, 2));
    assert_nothing_lost(&bs, &input);
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
    run.consumed(1_000, T).await;

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
    let deadline = std::time::Instant::now() + T;
    while run.progress.revocations_given_up.load(Ordering::Relaxed) == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the revocation did not give up the stuck work within {T:?}"
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
    let deadline = std::time::Instant::now() + T;
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
    wait_committed(&bs, "login-metrics", &end_offsets(&input, 2), T);
    run.stop().await.expect("the run completes");

    let packets = read_packets(&bs);
    let covered = verify_packets(&packets, &input, &default_slices(), 100);
    assert_eq!(
        covered.len(),
        input.len(),
        "every input offset is in a delivered packet"
    );
}
