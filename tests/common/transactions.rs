//! Reading topics written in Kafka transactions (`delivery.guarantee =
//! "exactly_once"`) as their readers do: with `isolation.level =
//! read_committed`, which sees only committed transactions, or
//! `read_uncommitted`, which sees aborted ones too. [`super::read_all`]
//! stops at each partition's high watermark by the offset of the last
//! message it receives, and a transactional partition ends with a commit or
//! abort marker that no reader receives; these readers stop at the end of
//! each partition as the broker reports it to the client (partition EOF).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};

use super::output::Read;

/// What a reader of a transactional topic sees.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isolation {
    /// Messages of committed transactions (and non-transactional ones).
    ReadCommitted,
    /// Every message, those of aborted and open transactions included.
    ReadUncommitted,
}

impl Isolation {
    pub fn as_str(self) -> &'static str {
        match self {
            Isolation::ReadCommitted => "read_committed",
            Isolation::ReadUncommitted => "read_uncommitted",
        }
    }
}

fn client(bootstrap: &str, isolation: Isolation) -> BaseConsumer {
    ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", "test-transactional-reader")
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .set("isolation.level", isolation.as_str())
        .create()
        .expect("a test reader")
}

fn partitions(c: &BaseConsumer, topic: &str) -> Vec<i32> {
    let md = c
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .expect("metadata");
    let t = &md.topics()[0];
    assert!(t.error().is_none(), "{topic}: {:?}", t.error());
    t.partitions().iter().map(|p| p.id()).collect()
}

/// Every message of `topic` that a reader with `isolation` sees, all
/// partitions from the start to their end, with a consumer in no group.
pub fn read_isolated(bootstrap: &str, topic: &str, isolation: Isolation) -> Vec<Read> {
    let consumer = client(bootstrap, isolation);
    let parts = partitions(&consumer, topic);
    let mut tpl = TopicPartitionList::new();
    for &p in &parts {
        tpl.add_partition_offset(topic, p, Offset::Beginning)
            .unwrap();
    }
    consumer.assign(&tpl).expect("assign");
    let mut at_end: BTreeSet<i32> = BTreeSet::new();
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    while at_end.len() < parts.len() {
        assert!(
            Instant::now() < deadline,
            "timed out reading {topic} ({}): {} read, at the end of {at_end:?} of {parts:?}",
            isolation.as_str(),
            out.len()
        );
        match consumer.poll(Duration::from_millis(100)) {
            None => {}
            Some(Err(KafkaError::PartitionEOF(p))) => {
                at_end.insert(p);
            }
            Some(Err(e)) => panic!("reading {topic}: {e}"),
            Some(Ok(m)) => {
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
    }
    out
}

/// Where the two kinds of reader end on each partition of a topic: a
/// `read_uncommitted` reader at the high watermark, a `read_committed` one
/// at the last stable offset (the first offset of the oldest transaction
/// still open there, or the high watermark when none is). Keeps its two
/// clients, so that it can be asked often.
pub struct Watermarks {
    committed: BaseConsumer,
    uncommitted: BaseConsumer,
    partitions: std::cell::RefCell<HashMap<String, Vec<i32>>>,
}

impl Watermarks {
    pub fn new(bootstrap: &str) -> Watermarks {
        Watermarks {
            committed: client(bootstrap, Isolation::ReadCommitted),
            uncommitted: client(bootstrap, Isolation::ReadUncommitted),
            partitions: Default::default(),
        }
    }

    /// Per partition of `topic`: (last stable offset, high watermark).
    pub fn ends(&self, topic: &str) -> BTreeMap<i32, (i64, i64)> {
        let parts = self
            .partitions
            .borrow_mut()
            .entry(topic.to_string())
            .or_insert_with(|| partitions(&self.committed, topic))
            .clone();
        parts
            .into_iter()
            .map(|p| {
                let (_, stable) = self
                    .committed
                    .fetch_watermarks(topic, p, Duration::from_secs(10))
                    .expect("the last stable offset");
                let (_, high) = self
                    .uncommitted
                    .fetch_watermarks(topic, p, Duration::from_secs(10))
                    .expect("the high watermark");
                (p, (stable, high))
            })
            .collect()
    }

    /// The partitions of `topic` that hold a transaction still open, with
    /// records in it: their last stable offset is short of their high
    /// watermark.
    pub fn open_transactions(&self, topic: &str) -> Vec<i32> {
        self.ends(topic)
            .into_iter()
            .filter(|(_, (stable, high))| stable < high)
            .map(|(p, _)| p)
            .collect()
    }
}

/// Waits until no partition of `topics` holds an open transaction (one left
/// open by a process that vanished is aborted by the broker once the
/// producer's `transaction.timeout.ms` has passed).
pub fn wait_no_open_transaction(bootstrap: &str, topics: &[&str], timeout: Duration) {
    let w = Watermarks::new(bootstrap);
    let deadline = Instant::now() + timeout;
    loop {
        let open: Vec<(&str, Vec<i32>)> = topics
            .iter()
            .map(|t| (*t, w.open_transactions(t)))
            .filter(|(_, ps)| !ps.is_empty())
            .collect();
        if open.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "transactions still open after {timeout:?}: {open:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}
