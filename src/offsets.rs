//! Offsets: what is committed, and when.
//!
//! The invariant this module keeps: an offset is committed only after every
//! message below it is accounted for by delivered work — its packet and dead
//! letters acknowledged by the broker and its packet in the metrics log — and
//! work is settled in the order it was handed to delivery. [`Ledger`] receives
//! delivery's acknowledgements in that order and commits each work's
//! [`CommitPoint`]s synchronously. A commit that fails is retried; one that
//! still fails is logged and left to the next commit of the same partition,
//! because the data is already delivered: the only risk is a replay, never a
//! loss.
//!
//! In window mode each commit carries the partition's checkpoint in its
//! metadata ([`crate::window::Checkpoint`]); [`committed_checkpoints`] reads
//! it back when partitions are assigned.

use std::sync::atomic::Ordering;
use std::sync::{mpsc as std_mpsc, Arc};
use std::thread::sleep;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext};
use rdkafka::error::KafkaResult;
use rdkafka::{Offset, TopicPartitionList};
use tracing::{debug, warn};

use crate::batch::CommitPoint;
use crate::delivery::Ack;
use crate::telemetry::{self, Progress};
use crate::window::Checkpoint;

/// Commit attempts per work; shutdown and revocation use the same.
pub const COMMIT_ATTEMPTS: u32 = 5;

/// The partition list of a commit, metadata included.
pub fn partition_list(points: &[CommitPoint]) -> KafkaResult<TopicPartitionList> {
    let mut tpl = TopicPartitionList::with_capacity(points.len());
    for p in points {
        let mut e = tpl.add_partition(&p.topic, p.partition);
        e.set_offset(Offset::Offset(p.offset))?;
        if let Some(m) = &p.metadata {
            e.set_metadata(m.as_str());
        }
    }
    Ok(tpl)
}

/// Commits synchronously, retrying up to `attempts` times. Returns whether it succeeded.
pub fn commit<C: ConsumerContext>(
    consumer: &BaseConsumer<C>,
    points: &[CommitPoint],
    attempts: u32,
) -> bool {
    if points.is_empty() {
        return true;
    }
    let tpl = match partition_list(points) {
        Ok(tpl) => tpl,
        Err(e) => {
            warn!(error = %e, "cannot build the offset list to commit");
            return false;
        }
    };
    for attempt in 1..=attempts {
        match consumer.commit(&tpl, CommitMode::Sync) {
            Ok(()) => {
                metrics::counter!(telemetry::COMMITS).increment(1);
                if tracing::enabled!(tracing::Level::DEBUG) {
                    let list: Vec<String> = points
                        .iter()
                        .map(|p| format!("{}:{}", p.partition, p.offset))
                        .collect();
                    debug!(offsets = %list.join(","), "offsets committed");
                }
                return true;
            }
            Err(e) => {
                metrics::counter!(telemetry::COMMIT_FAILURES).increment(1);
                warn!(attempt, of = attempts, error = %e, "offset commit failed");
                if attempt < attempts {
                    sleep(Duration::from_millis(100 << (attempt - 1).min(5)));
                }
            }
        }
    }
    false
}

/// The committed position of each of `partitions` of `topic`: the offset and
/// the window checkpoint in its metadata, when there is one.
pub fn committed_checkpoints<C: ConsumerContext>(
    consumer: &BaseConsumer<C>,
    topic: &str,
    partitions: &[i32],
    timeout: Duration,
) -> KafkaResult<Vec<(i32, Option<Checkpoint>)>> {
    let mut tpl = TopicPartitionList::new();
    for p in partitions {
        tpl.add_partition(topic, *p);
    }
    let committed = consumer.committed_offsets(tpl, timeout)?;
    Ok(partitions
        .iter()
        .map(|p| {
            let cp = committed
                .find_partition(topic, *p)
                .and_then(|e| match e.offset() {
                    Offset::Offset(o) => Checkpoint::from_metadata(o, e.metadata()),
                    _ => None,
                });
            (*p, cp)
        })
        .collect())
}

/// Work handed to delivery and not yet settled, in order.
pub struct Ledger {
    acks: std_mpsc::Receiver<Ack>,
    in_flight: usize,
    failure: Option<String>,
    progress: Arc<Progress>,
}

impl Ledger {
    pub fn new(acks: std_mpsc::Receiver<Ack>, progress: Arc<Progress>) -> Ledger {
        Ledger {
            acks,
            in_flight: 0,
            failure: None,
            progress,
        }
    }

    /// Records that one more work was handed to delivery.
    pub fn sent(&mut self) {
        self.in_flight += 1;
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// The first failure: nothing may be committed after it.
    pub fn failure(&self) -> Option<&str> {
        self.failure.as_deref()
    }

    /// Notes a failure found outside delivery; the first one is kept.
    pub fn fail(&mut self, reason: impl Into<String>) {
        self.failure.get_or_insert_with(|| reason.into());
    }

    /// Commits every work delivery has acknowledged; with `wait`, waits for
    /// all in flight.
    pub fn settle<C: ConsumerContext>(&mut self, consumer: &BaseConsumer<C>, wait: bool) {
        while self.in_flight > 0 && self.failure.is_none() {
            let ack = if wait {
                match self.acks.recv() {
                    Ok(a) => a,
                    Err(_) => {
                        self.fail("delivery stopped without reporting why");
                        break;
                    }
                }
            } else {
                match self.acks.try_recv() {
                    Ok(a) => a,
                    Err(std_mpsc::TryRecvError::Empty) => break,
                    Err(std_mpsc::TryRecvError::Disconnected) => {
                        self.fail("delivery stopped without reporting why");
                        break;
                    }
                }
            };
            self.in_flight -= 1;
            match ack {
                Ack::Delivered { commit, messages } => {
                    if self::commit(consumer, &commit, COMMIT_ATTEMPTS) {
                        self.progress
                            .committed_messages
                            .fetch_add(messages, Ordering::Relaxed);
                        metrics::counter!(telemetry::COMMITTED).increment(messages);
                    }
                }
                Ack::Failed(reason) => self.fail(reason),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_commit_list_carries_offsets_and_metadata() {
        let t: Arc<str> = Arc::from("user-login");
        let points = vec![
            CommitPoint {
                topic: t.clone(),
                partition: 0,
                offset: 10,
                metadata: None,
            },
            CommitPoint {
                topic: t,
                partition: 2,
                offset: 41,
                metadata: Some("login-metrics/window/1 p=5 c=-".into()),
            },
        ];
        let tpl = partition_list(&points).unwrap();
        assert_eq!(tpl.count(), 2);
        let e = tpl.find_partition("user-login", 2).unwrap();
        assert_eq!(e.offset(), Offset::Offset(41));
        assert_eq!(e.metadata(), "login-metrics/window/1 p=5 c=-");
        assert_eq!(
            tpl.find_partition("user-login", 0).unwrap().offset(),
            Offset::Offset(10)
        );
    }
}
