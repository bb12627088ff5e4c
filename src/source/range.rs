//! Bounded runs: the range of the input a run reads, fixed at its start
//! from offsets the broker gives, and how the consumer knows it has read it.
//!
//! - The end: `--until-end` takes each partition's high watermark at start
//!   (what the topic holds then); `--until TIME` the first offset whose
//!   record timestamp is at or after TIME (the broker's offsets-for-times).
//!   A partition created later has nothing in the range.
//! - The start: the group's committed offsets, as in any run; `--from TIME`
//!   first commits, for a group that has none, the first offset at or after
//!   TIME of each partition, so a fresh group reprocesses from there.
//! - A partition is read when a message at or past its end arrives (it is
//!   not processed) or when the consumer reaches the partition's end
//!   (librdkafka's partition EOF, which also covers an empty range and
//!   transaction markers just before the end). The run is over once every
//!   partition it was assigned is read.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use anyhow::{bail, Context};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::{Offset, TopicPartitionList};

use crate::kafka::{self, KafkaSettings};

/// Where a bounded run stops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Until {
    /// The end of each partition as the run starts.
    End,
    /// Records with a timestamp before this (epoch milliseconds).
    Time(i64),
}

/// The input range of a bounded run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Range {
    /// Start at the first record at or after this time (epoch milliseconds).
    pub from_ms: Option<i64>,
    pub until: Until,
}

/// Each partition's end (exclusive) and what of it is read.
#[derive(Debug, Clone, Default)]
pub struct Bound {
    end: BTreeMap<i32, i64>,
    assigned: BTreeSet<i32>,
    read: BTreeSet<i32>,
}

impl Bound {
    pub fn new(end: BTreeMap<i32, i64>) -> Bound {
        Bound {
            end,
            ..Bound::default()
        }
    }

    /// The end offset of `partition` (0 for one created after the start).
    pub fn end(&self, partition: i32) -> i64 {
        self.end.get(&partition).copied().unwrap_or(0)
    }

    /// Messages of the range from each partition's `start` on.
    pub fn remaining(&self, start: &BTreeMap<i32, i64>) -> u64 {
        self.end
            .iter()
            .map(|(p, e)| (e - start.get(p).copied().unwrap_or(0)).max(0) as u64)
            .sum()
    }

    /// Whether the message at `offset` is in the range. One at or past the
    /// end is not, and its partition is read; so is the partition of the
    /// range's last message.
    pub fn admits(&mut self, partition: i32, offset: i64) -> bool {
        let end = self.end(partition);
        if offset + 1 >= end {
            self.read.insert(partition);
        }
        offset < end
    }

    /// The consumer reached the partition's end: everything before it is read.
    pub fn reached_end(&mut self, partition: i32) {
        self.read.insert(partition);
    }

    /// Partitions assigned now; `position` is where each starts (its
    /// committed offset), when known. Returns those with nothing left to read.
    pub fn assign(&mut self, partitions: &[(i32, Option<i64>)]) -> Vec<i32> {
        let mut read = Vec::new();
        for &(p, position) in partitions {
            self.assigned.insert(p);
            if position.is_some_and(|o| o >= self.end(p)) && self.read.insert(p) {
                read.push(p);
            }
        }
        read
    }

    /// After a revocation: what is assigned next is read from its committed
    /// offset again, so nothing counts as read.
    pub fn revoke(&mut self) {
        self.assigned.clear();
        self.read.clear();
    }

    /// Whether the partition is read to its end.
    pub fn is_read(&self, partition: i32) -> bool {
        self.read.contains(&partition)
    }

    /// Every assigned partition is read to its end.
    pub fn complete(&self) -> bool {
        !self.assigned.is_empty() && self.assigned.iter().all(|p| self.read.contains(p))
    }
}

/// A consumer of the service's group that joins nothing: for offsets only.
fn client(k: &KafkaSettings) -> anyhow::Result<BaseConsumer> {
    kafka::consumer(k)
        .create()
        .context("cannot create a Kafka client to read the range's offsets")
}

fn partitions(c: &BaseConsumer, topic: &str, timeout: Duration) -> anyhow::Result<Vec<i32>> {
    let md = c
        .fetch_metadata(Some(topic), timeout)
        .with_context(|| format!("cannot read the partitions of {topic}"))?;
    let t = md
        .topics()
        .iter()
        .find(|t| t.name() == topic)
        .with_context(|| format!("{topic} is not in the broker's metadata"))?;
    if let Some(e) = t.error() {
        bail!("cannot read the partitions of {topic}: {e:?}");
    }
    let mut ps: Vec<i32> = t.partitions().iter().map(|p| p.id()).collect();
    ps.sort_unstable();
    Ok(ps)
}

/// The first offset at or after `time_ms` in each partition (the high
/// watermark where there is none).
fn offsets_at(
    c: &BaseConsumer,
    topic: &str,
    ps: &[i32],
    time_ms: i64,
    timeout: Duration,
) -> anyhow::Result<BTreeMap<i32, i64>> {
    let mut tpl = TopicPartitionList::new();
    for &p in ps {
        tpl.add_partition_offset(topic, p, Offset::Offset(time_ms))?;
    }
    let found = c
        .offsets_for_times(tpl, timeout)
        .with_context(|| format!("cannot look up the offsets of {topic} at {time_ms} ms"))?;
    let mut out = BTreeMap::new();
    for e in found.elements() {
        // A partition whose lookup failed (leader moving, for one) must not
        // read as "no record at or after the time": that would start a fresh
        // group at its end, or end the range past the time.
        if let Err(err) = e.error() {
            bail!(
                "cannot look up the offset of {topic}/{} at {time_ms} ms: {err}",
                e.partition()
            );
        }
        let offset = match e.offset() {
            Offset::Offset(o) => o,
            _ => c.fetch_watermarks(topic, e.partition(), timeout)?.1,
        };
        out.insert(e.partition(), offset);
    }
    Ok(out)
}

/// The end offset of every partition of the input topic for `until`.
pub fn end_offsets(
    k: &KafkaSettings,
    until: Until,
    timeout: Duration,
) -> anyhow::Result<BTreeMap<i32, i64>> {
    let c = client(k)?;
    let topic = &k.input_topic;
    let ps = partitions(&c, topic, timeout)?;
    match until {
        Until::End => ps
            .iter()
            .map(|&p| {
                let (_, high) = c
                    .fetch_watermarks(topic, p, timeout)
                    .with_context(|| format!("cannot read the end of {topic}/{p}"))?;
                Ok((p, high))
            })
            .collect(),
        Until::Time(ms) => offsets_at(&c, topic, &ps, ms, timeout),
    }
}

/// The group's committed offsets of the input topic, where it has some.
pub fn committed(k: &KafkaSettings, timeout: Duration) -> anyhow::Result<BTreeMap<i32, i64>> {
    let c = client(k)?;
    let topic = &k.input_topic;
    let ps = partitions(&c, topic, timeout)?;
    let mut tpl = TopicPartitionList::new();
    for &p in &ps {
        tpl.add_partition(topic, p);
    }
    let committed = c
        .committed_offsets(tpl, timeout)
        .with_context(|| format!("cannot read the committed offsets of {}", k.group_id))?;
    Ok(committed
        .elements()
        .iter()
        .filter_map(|e| match e.offset() {
            Offset::Offset(o) => Some((e.partition(), o)),
            _ => None,
        })
        .collect())
}

/// Makes the group start at `from_ms`: commits the first offset at or after
/// it of every partition. Refused for a group that has committed offsets
/// (reprocessing takes a group of its own; an operator moves an existing
/// group with `kafka-consumer-groups --reset-offsets`).
pub fn start_at(k: &KafkaSettings, from_ms: i64, timeout: Duration) -> anyhow::Result<()> {
    let existing = committed(k, timeout)?;
    if !existing.is_empty() {
        bail!(
            "--from: the consumer group {} already has committed offsets on {}; run the range with a group of its own (kafka.group_id, LOGIN_METRICS__KAFKA__GROUP_ID)",
            k.group_id,
            k.input_topic
        );
    }
    let c = client(k)?;
    let topic = &k.input_topic;
    let ps = partitions(&c, topic, timeout)?;
    let start = offsets_at(&c, topic, &ps, from_ms, timeout)?;
    let mut tpl = TopicPartitionList::new();
    for (p, o) in &start {
        tpl.add_partition_offset(topic, *p, Offset::Offset(*o))?;
    }
    c.commit(&tpl, CommitMode::Sync)
        .with_context(|| format!("cannot commit the start of the range for {}", k.group_id))
}

/// Reads a time given on the command line: RFC 3339, or epoch milliseconds.
pub fn parse_time(s: &str) -> Result<i64, String> {
    let s = s.trim();
    if let Ok(ms) = s.parse::<i64>() {
        return Ok(ms);
    }
    chrono::DateTime::parse_from_rfc3339(s)
        .map(|t| t.timestamp_millis())
        .map_err(|e| {
            format!(
                "`{s}` is not an RFC 3339 time (2026-12-01T00:00:00Z) or epoch milliseconds: {e}"
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_partition_is_read_at_its_last_message_or_the_first_past_it() {
        let mut b = Bound::new(BTreeMap::from([(0, 3), (1, 5), (2, 0)]));
        assert_eq!(
            b.assign(&[(0, Some(1)), (1, None), (2, None)]),
            Vec::<i32>::new()
        );
        assert!(b.admits(0, 1));
        assert!(!b.is_read(0));
        assert!(b.admits(0, 2));
        assert!(b.is_read(0), "offset 2 is the last before 3");
        assert!(!b.admits(1, 7), "past the end");
        assert!(b.is_read(1));
        assert!(!b.complete(), "partition 2 is not read yet");
        assert!(
            !b.admits(2, 0),
            "a partition empty at the start has nothing in range"
        );
        assert!(b.complete());
        assert!(
            !b.admits(9, 0),
            "a partition created later has nothing in range"
        );
    }

    #[test]
    fn a_partition_whose_start_is_at_its_end_is_read_at_assignment() {
        let mut b = Bound::new(BTreeMap::from([(0, 3), (1, 5)]));
        assert_eq!(b.assign(&[(0, Some(3)), (1, Some(2))]), vec![0]);
        assert!(!b.complete());
        b.reached_end(1);
        assert!(b.complete());
        b.revoke();
        assert!(!b.complete(), "nothing assigned: not over");
    }

    #[test]
    fn times_are_rfc_3339_or_epoch_milliseconds() {
        assert_eq!(parse_time("1700000000000"), Ok(1_700_000_000_000));
        assert_eq!(parse_time("2023-11-14T22:13:20Z"), Ok(1_700_000_000_000));
        assert_eq!(
            parse_time("2023-11-14T23:13:20+01:00"),
            Ok(1_700_000_000_000)
        );
        assert!(parse_time("yesterday").unwrap_err().contains("RFC 3339"));
    }
}
