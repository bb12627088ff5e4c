//! Offset commits: the last step of a batch.
//!
//! A batch's offsets are committed only after its packet and dead letters are
//! acknowledged and its packet is in the metrics log; batches are committed
//! in the order they were closed. The committed offset of a partition is the
//! batch's last offset + 1 (the next message to read), invalid messages
//! included. A commit that fails is retried; one that still fails is logged
//! and left to the next batch's commit of the same partition, because the
//! data is already delivered: the only risk is a replay, never a loss.

use std::thread::sleep;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext};
use rdkafka::error::KafkaResult;
use rdkafka::{Offset, TopicPartitionList};
use tracing::warn;

use crate::batch::SourceRange;
use crate::telemetry;

/// The offsets to commit for a delivered batch: per partition, last + 1.
pub fn next_offsets(sources: &[SourceRange]) -> Vec<(&str, i32, i64)> {
    sources
        .iter()
        .map(|s| (&*s.topic, s.partition, s.last_offset + 1))
        .collect()
}

fn partition_list(sources: &[SourceRange]) -> KafkaResult<TopicPartitionList> {
    let mut tpl = TopicPartitionList::with_capacity(sources.len());
    for (topic, partition, offset) in next_offsets(sources) {
        tpl.add_partition_offset(topic, partition, Offset::Offset(offset))?;
    }
    Ok(tpl)
}

/// Commits synchronously, retrying up to `attempts` times. Returns whether it succeeded.
pub fn commit<C: ConsumerContext>(
    consumer: &BaseConsumer<C>,
    sources: &[SourceRange],
    attempts: u32,
) -> bool {
    let tpl = match partition_list(sources) {
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn commits_last_plus_one_per_partition() {
        let t: Arc<str> = Arc::from("user-login");
        let sources = vec![
            SourceRange {
                topic: t.clone(),
                partition: 0,
                first_offset: 0,
                last_offset: 9,
            },
            SourceRange {
                topic: t,
                partition: 2,
                first_offset: 40,
                last_offset: 40,
            },
        ];
        assert_eq!(
            next_offsets(&sources),
            vec![("user-login", 0, 10), ("user-login", 2, 41)]
        );
        let tpl = partition_list(&sources).unwrap();
        assert_eq!(tpl.count(), 2);
    }
}
