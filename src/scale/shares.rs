//! Stage 1's output: a work's windows as shares for the shares topic.
//!
//! Each batch of a work is one partition's share of one window pane
//! ([`Share::from_batch`]); it goes to the shares partition its window is
//! routed to ([`merge::route`]). After the shares, the progress of every
//! partition the work commits goes to every shares partition: the producer
//! keeps each partition's records in order, and delivery sends the progress
//! only once the shares are acknowledged, so a merger that reads a
//! partition's progress has read the shares it covers. A share larger than
//! [`MAX_RECORD_BYTES`] goes in parts of consecutive rows.

use std::sync::Arc;

use crate::core::event::Field;
use crate::core::merge::{self, Record, Share};
use crate::sink::publisher::OutRecord;
use crate::work::Work;

/// The largest share record: well within the 1 MB that producers and
/// brokers take by default, so that no window can stop the stream.
pub const MAX_RECORD_BYTES: usize = 512 * 1024;

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
    /// The records of `work`'s shares, then of its progress, to be sent
    /// after them; the batches are taken from the work.
    pub fn records(&self, work: &mut Work) -> (Vec<OutRecord>, Vec<OutRecord>) {
        let mut out = Vec::with_capacity(work.batches.len());
        for batch in std::mem::take(&mut work.batches) {
            let window = batch.window;
            let Some(share) = Share::from_batch(batch) else {
                // Grouping per partition makes only windows of one partition.
                tracing::error!(?window, "a batch that is no share was not sent");
                continue;
            };
            let partition = merge::route(&share.window, self.hop_ms, self.partitions);
            for payload in self.encode(share) {
                out.push(self.record(partition, payload));
            }
        }
        let mut progress = Vec::new();
        for p in merge::progress_of(work) {
            let payload = Record::Progress(p).encode(&[]);
            for partition in 0..self.partitions {
                progress.push(self.record(partition, payload.clone()));
            }
        }
        (out, progress)
    }

    /// A share's records: one, or as many parts as it takes for each to fit
    /// [`MAX_RECORD_BYTES`] (a single row larger than that goes alone).
    fn encode(&self, share: Share) -> Vec<Vec<u8>> {
        let whole = Record::Share(Box::new(share.clone())).encode(&self.fields);
        if whole.len() <= MAX_RECORD_BYTES {
            return vec![whole];
        }
        let rows = share.columns.len();
        let mut n = whole.len().div_ceil(MAX_RECORD_BYTES) + 1;
        loop {
            let parts: Vec<Vec<u8>> = share
                .clone()
                .split(n)
                .into_iter()
                .map(|p| Record::Share(Box::new(p)).encode(&self.fields))
                .collect();
            if n >= rows || parts.iter().all(|p| p.len() <= MAX_RECORD_BYTES) {
                return parts;
            }
            n = (n * 2).min(rows);
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::event::{LoginEvent, FIELD_COUNT};
    use crate::core::merge::{MergeState, Merger, Progress};
    use crate::work::{Batch, CloseReason, Columns, CommitPoint, SourceRange, WindowId};
    use std::borrow::Cow;
    use std::time::Instant;

    #[test]
    fn a_share_beyond_the_record_limit_goes_in_parts_that_merge_back_whole() {
        // 3,000 events of 400-byte user ids: about 1.2 MB as one record.
        let ids: Vec<String> = (0..3_000).map(|i| format!("{i:0>400}")).collect();
        let events: Vec<LoginEvent> = ids
            .iter()
            .map(|id| {
                let mut fields: [Option<Cow<str>>; FIELD_COUNT] = Default::default();
                fields[Field::UserId.index()] = Some(Cow::Borrowed(id.as_str()));
                LoginEvent {
                    fields,
                    timestamp_ms: Some(0),
                }
            })
            .collect();
        let topic: Arc<str> = Arc::from("user-login");
        let batch = Batch {
            seq: 0,
            columns: Columns::from_events(&events),
            ts_min_ms: Some(0),
            ts_max_ms: Some(0),
            sources: vec![SourceRange {
                topic: topic.clone(),
                partition: 0,
                first_offset: 0,
                last_offset: 2_999,
            }],
            invalid: Vec::new(),
            invalid_by_kind: [0; 5],
            late: Some(0),
            window: Some(WindowId {
                start_ms: 0,
                end_ms: 10_000,
                pane: 0,
            }),
            closed_by: CloseReason::Watermark,
            opened_at: Instant::now(),
        };
        let checkpoint = crate::work::Checkpoint {
            emitted_ms: Some(10_000),
            ..Default::default()
        };
        let mut work = Work {
            seq: 0,
            batches: vec![batch],
            dead_letters: Vec::new(),
            commit: vec![CommitPoint {
                topic,
                partition: 0,
                offset: 3_000,
                checkpoint: Some(checkpoint),
            }],
            messages: 3_000,
            record_first: Vec::new(),
            assignment: 0,
        };
        let out = SharesOut {
            topic: Arc::from("g-shares"),
            partitions: 2,
            hop_ms: 10_000,
            fields: vec![Field::UserId],
        };
        let (shares, progress) = out.records(&mut work);
        assert!(shares.len() >= 3, "{} records", shares.len());
        assert!(shares.iter().all(|r| r.payload.len() <= MAX_RECORD_BYTES));
        assert!(
            shares.iter().all(|r| r.partition == Some(0)),
            "window 0 goes to partition 0"
        );
        assert_eq!(progress.len(), 2, "the progress to every shares partition");
        let mut m = Merger::new(1, &MergeState::default());
        for (i, r) in shares.iter().enumerate() {
            let Record::Share(s) = Record::decode(&r.payload).unwrap() else {
                panic!("a share")
            };
            m.add(*s, i as u64);
        }
        let Record::Progress(p) = Record::decode(&progress[0].payload).unwrap() else {
            panic!("progress")
        };
        assert_eq!(
            p,
            Progress {
                partition: 0,
                closed_ms: 10_000
            }
        );
        m.progress(p);
        let merged = m.complete(Instant::now());
        assert_eq!(merged.len(), 1);
        let got: Vec<&str> = merged[0]
            .columns
            .column(Field::UserId)
            .iter()
            .map(|v| v.unwrap())
            .collect();
        assert_eq!(got, ids.iter().map(String::as_str).collect::<Vec<_>>());
    }
}
