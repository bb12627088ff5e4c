//! Reading back what the service wrote, with clients of the test's own: every
//! message of a topic, the packets, the group's committed offsets.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use login_metrics::core::event::Field;
use login_metrics::core::packet::Packet;
use login_metrics::settings::Settings;
use login_metrics::{Pipeline, RunSummary};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

#[allow(unused_imports)]
use super::*;

/// A message read back from a topic.
#[derive(Debug, Clone)]
pub struct Read {
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub payload: Vec<u8>,
    pub headers: HashMap<String, String>,
}

/// Reads every message currently in `topic` (all partitions, from the start),
/// with a consumer that belongs to no group.
pub fn read_all(bootstrap: &str, topic: &str) -> Vec<Read> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", "test-reader")
        .set("enable.auto.commit", "false")
        .create()
        .expect("test reader");
    let md = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .expect("metadata");
    let partitions: Vec<i32> = md.topics()[0].partitions().iter().map(|p| p.id()).collect();
    let mut tpl = TopicPartitionList::new();
    // Where each partition ends now; read until every one is reached (by
    // offset, not count: a compacted or transactional topic has gaps).
    let mut ends: HashMap<i32, i64> = HashMap::new();
    for &p in &partitions {
        let (lo, hi) = consumer
            .fetch_watermarks(topic, p, Duration::from_secs(10))
            .expect("watermarks");
        if hi > lo {
            ends.insert(p, hi);
        }
        tpl.add_partition_offset(topic, p, Offset::Beginning)
            .unwrap();
    }
    consumer.assign(&tpl).expect("assign");
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !ends.is_empty() {
        assert!(
            Instant::now() < deadline,
            "timed out reading {topic}: {} read, partitions {ends:?} not at their end",
            out.len()
        );
        if let Some(m) = consumer.poll(Duration::from_millis(100)) {
            let m = m.expect("read");
            if ends
                .get(&m.partition())
                .is_some_and(|end| m.offset() + 1 >= *end)
            {
                ends.remove(&m.partition());
            }
            let mut headers = HashMap::new();
            if let Some(h) = m.headers() {
                for hd in h.iter() {
                    headers.insert(
                        hd.key.to_string(),
                        String::from_utf8_lossy(hd.value.unwrap_or_default()).into_owned(),
                    );
                }
            }
            out.push(Read {
                partition: m.partition(),
                offset: m.offset(),
                key: m.key().map(<[u8]>::to_vec),
                payload: m.payload().unwrap_or_default().to_vec(),
                headers,
            });
        }
    }
    out
}

/// The packets of the output topic, in publication order.
pub fn read_packets(bootstrap: &str) -> Vec<Packet> {
    let mut reads = read_all(bootstrap, OUTPUT);
    reads.sort_by_key(|r| (r.partition, r.offset));
    reads
        .iter()
        .map(|r| {
            let p: Packet = serde_json::from_slice(&r.payload).expect("packet JSON");
            assert_eq!(
                r.key.as_deref(),
                Some(p.packet_id.as_bytes()),
                "keyed by packet_id"
            );
            p
        })
        .collect()
}

/// Committed offsets of `group` on `partitions` of the input topic (-1: none).
pub fn committed(bootstrap: &str, group: &str, partitions: i32) -> Vec<i64> {
    committed_on(bootstrap, group, INPUT, partitions)
}

/// Committed offsets of `group` on `partitions` of `topic` (-1: none).
pub fn committed_on(bootstrap: &str, group: &str, topic: &str, partitions: i32) -> Vec<i64> {
    let s = settings(
        bootstrap,
        Path::new("unused"),
        &[("KAFKA__GROUP_ID", group), ("KAFKA__INPUT_TOPIC", topic)],
    );
    // A new broker answers "not coordinator" or "loading" until the group
    // offsets topic is ready; only an error that outlasts that fails.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match login_metrics::source::consumer::committed_offsets(
            &s.kafka,
            partitions,
            Duration::from_secs(10),
        ) {
            Ok(offsets) => return offsets,
            Err(e) if Instant::now() < deadline => {
                eprintln!("committed offsets of {group}: {e}; asking again");
                std::thread::sleep(Duration::from_millis(200));
            }
            Err(e) => panic!("committed offsets of {group}: {e}"),
        }
    }
}

/// Waits until the group's committed offsets equal `expected`.
pub fn wait_committed(bootstrap: &str, group: &str, expected: &[i64], timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let now = committed(bootstrap, group, expected.len() as i32);
        if now == expected {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "committed offsets {now:?}, expected {expected:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The output topic's packets with their offsets in that topic, in order.
pub fn packets_with_offsets(bootstrap: &str) -> Vec<(i64, Packet)> {
    let mut reads = read_all(bootstrap, OUTPUT);
    reads.sort_by_key(|r| r.offset);
    reads
        .into_iter()
        .map(|r| {
            (
                r.offset,
                serde_json::from_slice(&r.payload).expect("packet"),
            )
        })
        .collect()
}

/// One killed run: the output offsets its packets took, and per input
/// partition the committed offset after the kill.
pub type KilledRun = (std::ops::Range<i64>, Vec<i64>);

/// After runs killed with kill -9 and a last run to the end: nothing is lost,
/// and every input offset is in exactly one committed packet. The other
/// copies come from killed runs and lie at or past the last commit before
/// that kill. Returns how many such replayed coverages there were.
pub fn assert_each_offset_committed_once(
    bootstrap: &str,
    input: &InputMap,
    runs: &[KilledRun],
) -> usize {
    let packets = packets_with_offsets(bootstrap);
    let plain: Vec<Packet> = packets.iter().map(|(_, p)| p.clone()).collect();
    let covered = verify_packets(&plain, input, &default_slices(), 100);
    assert_eq!(
        covered.len(),
        input.len(),
        "nothing lost: every input offset is in a delivered packet"
    );
    let mut committed_cover: HashMap<(i32, i64), usize> = HashMap::new();
    let mut replays = 0;
    for (out_offset, p) in &packets {
        let killed = runs.iter().find(|(range, _)| range.contains(out_offset));
        for s in &p.sources {
            for o in s.first_offset..=s.last_offset {
                match killed {
                    Some((_, after)) if o >= after[s.partition as usize] => replays += 1,
                    _ => *committed_cover.entry((s.partition, o)).or_default() += 1,
                }
            }
        }
    }
    for (coord, n) in &committed_cover {
        assert_eq!(*n, 1, "{coord:?} is covered by {n} committed packets");
    }
    assert_eq!(committed_cover.len(), input.len());
    eprintln!(
        "kill -9 x{}: {} packets, {replays} replayed event coverages",
        runs.len(),
        packets.len()
    );
    replays
}
