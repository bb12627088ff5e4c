//! The window checkpoint topic against Apache Kafka: the topic the service
//! creates is compacted with segments small enough that what the log cleaner
//! has not reached stays small, so a read from the start costs what
//! compaction leaves rather than the topic's history; and a read on a later
//! assignment takes only the records written since the previous read.

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use login_metrics::commit::checkpoint::{self, Checkpoint, CheckpointStore};
use login_metrics::kafka::KafkaSettings;
use rdkafka::admin::{AdminClient, AdminOptions, ConfigSource, ResourceSpecifier};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use tokio_util::sync::CancellationToken;

use crate::common::broker::Broker;
use crate::common::{settings, INPUT};

/// How long a read may go without a record before it counts as stalled.
const STALL: Duration = Duration::from_secs(10);
const PARTITIONS: [i32; 4] = [0, 1, 2, 3];

/// The service's Kafka settings in window mode, with checkpoint values
/// stored as written (no compression), so that their size, and with it how
/// often a 1 MiB segment rolls, is what the test expects.
fn kafka(b: &Broker, dir: &Path) -> KafkaSettings {
    settings(
        &b.bootstrap,
        &dir.join("login-metrics.log"),
        &[("BATCH__MODE", "window"), ("KAFKA__COMPRESSION", "none")],
    )
    .kafka
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Creates the checkpoint topic as the service does at start.
fn ensure_topic(k: &KafkaSettings) {
    runtime()
        .block_on(checkpoint::ensure_topic(k, &CancellationToken::new()))
        .expect("the checkpoint topic is created");
}

/// Writes `n` checkpoints of the input topic, round robin over
/// `PARTITIONS`, with offsets from `base` up, `per_write` to a write (a
/// commit's worth); the last of each partition.
fn write_many(
    s: &CheckpointStore,
    n: i64,
    base: i64,
    per_write: usize,
) -> HashMap<i32, Checkpoint> {
    let items: Vec<(i32, Checkpoint)> = (0..n)
        .map(|i| {
            let c = Checkpoint {
                offset: base + i,
                ..Checkpoint::default()
            };
            (PARTITIONS[i as usize % PARTITIONS.len()], c)
        })
        .collect();
    for chunk in items.chunks(per_write) {
        s.write(INPUT, chunk).expect("checkpoints written");
    }
    items.into_iter().collect()
}

#[test]
fn the_service_creates_the_checkpoint_topic_compacted_with_small_segments() {
    let b = Broker::start();
    let dir = tempfile::tempdir().unwrap();
    let k = kafka(&b, dir.path());
    ensure_topic(&k);
    // A second start finds the topic and leaves it as it is.
    ensure_topic(&k);

    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", &b.bootstrap)
        .create()
        .unwrap();
    let described = runtime()
        .block_on(admin.describe_configs(
            &[ResourceSpecifier::Topic(&k.checkpoint_topic)],
            &AdminOptions::new().request_timeout(Some(Duration::from_secs(30))),
        ))
        .expect("describe configs");
    let config = described[0].as_ref().expect("the topic's configs");
    for (name, value) in [
        ("cleanup.policy", "compact"),
        ("segment.bytes", "1048576"),
        ("segment.ms", "600000"),
        ("max.compaction.lag.ms", "600000"),
        ("min.compaction.lag.ms", "0"),
        ("min.cleanable.dirty.ratio", "0.1"),
        ("delete.retention.ms", "86400000"),
    ] {
        let entry = config
            .get(name)
            .unwrap_or_else(|| panic!("{name} not described"));
        assert_eq!(entry.value.as_deref(), Some(value), "{name}");
        assert_eq!(
            entry.source,
            ConfigSource::DynamicTopic,
            "{name} is set on the topic, not inherited from the broker"
        );
    }
}

/// After many thousand checkpoints, a second assignment's read takes the
/// records written since the first, and no more: what it costs does not
/// grow with the topic's history.
#[test]
fn a_second_assignment_after_thousands_of_checkpoints_reads_only_those_written_since() {
    let b = Broker::start();
    let dir = tempfile::tempdir().unwrap();
    let k = kafka(&b, dir.path());
    ensure_topic(&k);
    let store = CheckpointStore::new(&k).unwrap();
    let mut latest = write_many(&store, 24_000, 0, 200);

    let first = store.read(INPUT, &PARTITIONS, STALL).unwrap();
    assert!(first.from_start);
    assert!(first.records > 0 && first.records <= 24_000);
    assert_eq!(first.checkpoints, latest);

    latest.extend(write_many(&store, 137, 1_000_000, 4));
    let second = store.read(INPUT, &PARTITIONS, STALL).unwrap();
    assert!(!second.from_start);
    // Compaction may have removed some of them already, never added any.
    assert!(
        second.records > 0 && second.records <= 137,
        "the second read took {} records, 137 were written since the first",
        second.records
    );
    assert_eq!(second.checkpoints, latest);

    let third = store.read(INPUT, &[2], STALL).unwrap();
    assert_eq!(third.records, 0, "nothing written since");
    assert_eq!(third.checkpoints, HashMap::from([(2, latest[&2].clone())]));

    // What a process that has read nothing yet finds is the same.
    let fresh = CheckpointStore::new(&k)
        .unwrap()
        .read(INPUT, &PARTITIONS, STALL)
        .unwrap();
    assert!(fresh.from_start);
    assert_eq!(fresh.checkpoints, latest);
}

/// Many thousand checkpoints fill several 1 MiB segments; once the cleaner
/// has passed (every 15 s, the broker's `log.cleaner.backoff.ms`), a read
/// from the start takes the active segment and one record per key, not
/// everything written.
#[test]
fn compaction_keeps_a_read_from_the_start_small_however_many_checkpoints_were_written() {
    const WRITTEN: i64 = 40_000;
    let b = Broker::start();
    let dir = tempfile::tempdir().unwrap();
    let k = kafka(&b, dir.path());
    ensure_topic(&k);
    let latest = write_many(&CheckpointStore::new(&k).unwrap(), WRITTEN, 0, 200);

    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let read = CheckpointStore::new(&k)
            .unwrap()
            .read(INPUT, &PARTITIONS, STALL)
            .unwrap();
        assert_eq!(read.checkpoints, latest);
        if read.records <= WRITTEN as u64 / 4 {
            eprintln!(
                "a read from the start took {} of {WRITTEN} records",
                read.records
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "a read from the start still takes {} of {WRITTEN} records",
            read.records
        );
        std::thread::sleep(Duration::from_secs(2));
    }
}

/// Two members of one group over time: A owns partition 0, loses it to B in a
/// rebalance it has not noticed yet, and writes one more checkpoint after B
/// took over. Whoever reads next (a restart, the next owner) gets B's.
#[test]
fn a_member_that_lost_its_partition_cannot_overwrite_the_new_owners_checkpoint() {
    let b = Broker::start();
    let dir = tempfile::tempdir().unwrap();
    let k = kafka(&b, dir.path());
    ensure_topic(&k);
    let at = |o: i64| Checkpoint {
        offset: o,
        previous: Some(o),
        ..Checkpoint::default()
    };
    let a = CheckpointStore::new(&k).unwrap();
    assert!(a.read_latest(INPUT, &[0], STALL).unwrap().is_empty());
    a.claim(INPUT, &[(0, at(0))]).unwrap();
    a.write(INPUT, &[(0, at(100))]).unwrap();

    let new_owner = CheckpointStore::new(&k).unwrap();
    let found = new_owner.read_latest(INPUT, &[0], STALL).unwrap();
    assert_eq!(found[&0], at(100));
    new_owner.claim(INPUT, &[(0, found[&0].clone())]).unwrap();
    new_owner.write(INPUT, &[(0, at(150))]).unwrap();

    // A, a zombie now, goes on as if it still owned the partition.
    a.write(INPUT, &[(0, at(120))]).unwrap();

    let next = CheckpointStore::new(&k).unwrap();
    assert_eq!(next.read_latest(INPUT, &[0], STALL).unwrap()[&0], at(150));
    // The new owner's own later read agrees.
    assert_eq!(
        new_owner.read_latest(INPUT, &[0], STALL).unwrap()[&0],
        at(150)
    );
}
