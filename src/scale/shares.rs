//! Stage 1's output: a work's windows as shares for the shares topic.
//!
//! Each batch of a work is one partition's share of one window pane
//! ([`Share::from_batch`]); it goes to the shares partition its window is
//! routed to ([`merge::route`]). After the shares, the progress of every
//! partition the work commits goes to every shares partition: the producer
//! keeps each partition's records in order, so a merger that reads a
//! partition's progress has read the shares it covers.

use std::sync::Arc;

use crate::core::event::Field;
use crate::core::merge::{self, Record, Share};
use crate::sink::publisher::OutRecord;
use crate::work::Work;

/// Where stage 1 sends shares.
#[derive(Debug, Clone)]
pub struct SharesOut {
    pub topic: Arc<str>,
    /// The shares topic's partitions.
    pub partitions: i32,
    /// Distance between window starts: consecutive windows go to
    /// consecutive partitions.
    pub hop_ms: i64,
    /// The fields the slices name: the only ones a share carries.
    pub fields: Vec<Field>,
}

impl SharesOut {
    /// The records of `work`'s batches and progress, in the order they must
    /// be written; the batches are taken from the work.
    pub fn records(&self, work: &mut Work) -> Vec<OutRecord> {
        let mut out = Vec::with_capacity(work.batches.len() + self.partitions as usize);
        for batch in std::mem::take(&mut work.batches) {
            let window = batch.window;
            let Some(share) = Share::from_batch(batch) else {
                // Grouping per partition makes only windows of one partition.
                tracing::error!(?window, "a batch that is no share was not sent");
                continue;
            };
            let partition = merge::route(&share.window, self.hop_ms, self.partitions);
            let payload = Record::Share(Box::new(share)).encode(&self.fields);
            out.push(self.record(partition, payload));
        }
        for progress in merge::progress_of(work) {
            let payload = Record::Progress(progress).encode(&[]);
            for partition in 0..self.partitions {
                out.push(self.record(partition, payload.clone()));
            }
        }
        out
    }

    fn record(&self, partition: i32, payload: Vec<u8>) -> OutRecord {
        OutRecord {
            topic: self.topic.clone(),
            key: None,
            payload: Arc::from(payload),
            headers: Vec::new(),
            reducible: false,
            partition: Some(partition),
        }
    }
}
