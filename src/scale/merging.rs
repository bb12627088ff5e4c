//! Stage 2: the thread that reads the shares topic, merges each window
//! ([`Merger`], one per shares partition), hands the merged batches to
//! delivery as work, and commits the shares topic's offsets once delivery
//! has acknowledged the packets.
//!
//! A commit of a shares partition is the lowest position its merger still
//! needs (the first share of a pane not merged yet), with the merger's
//! [`MergeState`] in the commit's metadata: the progress every input
//! partition had reported before that position and the panes already merged
//! of windows still open. Whoever reads the partition next (this instance
//! after a restart, another after a rebalance) resumes from both, so no
//! pane is lost, and a pane merged again after a crash is the same pane
//! under the same `packet_id`.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::{mpsc as std_mpsc, Arc};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::message::Message as _;
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::core::grouping::split::GroupView;
use crate::core::merge::{Added, MergeState, Merger, Record};
use crate::kafka::{self, KafkaContext, KafkaSettings};
use crate::telemetry::{self, LogLimit};
use crate::work::{Ack, CommitPoint, Work};

/// What the merge stage needs.
pub struct MergeStage {
    /// The service's Kafka settings; the stage joins its own group.
    pub kafka: KafkaSettings,
    pub topic: String,
    /// The input topic's partitions: every one of them closes each window.
    pub inputs: usize,
    pub to_delivery: mpsc::Sender<Work>,
    pub acks: std_mpsc::Receiver<Ack>,
    /// Where what the group has closed is published for stage 1
    /// ([`crate::core::grouping::split`]).
    pub group: Arc<GroupView>,
    pub shutdown: CancellationToken,
}

/// One shares partition read here.
struct Part {
    merger: Merger,
    /// The next offset to read.
    next: i64,
    /// The offset last committed.
    committed: i64,
}

/// A work handed to delivery: what to commit once it is acknowledged.
struct Pending {
    partition: i32,
    offset: i64,
    state: MergeState,
}

/// How long a stop waits for the packets already handed to delivery.
const DRAIN: Duration = Duration::from_secs(30);
/// How often positions that moved without a packet are committed.
const COMMIT_EVERY: Duration = Duration::from_secs(1);

/// The consumer of the merge stage: its own group and, for a named
/// instance, its own static member name, so that stage 1's membership is
/// never fenced by it.
fn consumer_settings(k: &KafkaSettings) -> KafkaSettings {
    let mut k = k.clone();
    k.group_id = super::merge_group(&k.group_id);
    if !k.instance_name.is_empty() {
        k.instance_name = format!("{}-merge", k.instance_name);
    }
    k
}

/// Runs the merge stage until `shutdown`, then delivers and commits what it
/// has handed over. An error stops it (and the service): a record it cannot
/// read, or delivery failing.
pub fn run(stage: MergeStage) -> Result<(), String> {
    let MergeStage {
        kafka: k,
        topic,
        inputs,
        to_delivery,
        acks,
        group,
        shutdown,
    } = stage;
    let k = consumer_settings(&k);
    let mut config = kafka::member(&k);
    // A new merge group reads every share there is.
    config.set("auto.offset.reset", "earliest");
    let consumer: BaseConsumer<KafkaContext> = config
        .create_with_context(KafkaContext("merge consumer"))
        .map_err(|e| format!("cannot create the merge consumer: {e}"))?;
    consumer
        .subscribe(&[&topic])
        .map_err(|e| format!("cannot subscribe to {topic}: {e}"))?;
    info!(topic = %topic, group = %k.group_id, "merge stage started");

    let mut parts: BTreeMap<i32, Part> = BTreeMap::new();
    let mut pending: VecDeque<Pending> = VecDeque::new();
    let mut seq = 0u64;
    let mut checked = Instant::now();
    let errors = LogLimit::new("merge consumer errors", 5, Duration::from_secs(60));
    let to_delivery = Some(to_delivery);
    while !shutdown.is_cancelled() {
        answer_acks(&consumer, &topic, &acks, &mut pending, &mut parts, false)?;
        if checked.elapsed() >= COMMIT_EVERY {
            checked = Instant::now();
            forget_revoked(&consumer, &topic, &mut parts);
            commit_idle(&consumer, &topic, &pending, &mut parts);
            gauges(&parts);
        }
        let m = match consumer.poll(Duration::from_millis(100)) {
            None => continue,
            Some(Err(e)) => {
                if errors.allow() {
                    warn!(error = %e, "merge consumer error");
                }
                continue;
            }
            Some(Ok(m)) => m,
        };
        let s = m.partition();
        let offset = m.offset();
        let part = match parts.entry(s) {
            std::collections::btree_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::btree_map::Entry::Vacant(e) => {
                let state = restore(&consumer, &topic, s)?;
                info!(partition = s, offset, closed = ?state.closed, "merging a shares partition");
                e.insert(Part {
                    merger: Merger::new(inputs, &state),
                    next: offset,
                    committed: offset,
                })
            }
        };
        part.next = offset + 1;
        let record = Record::decode(m.payload().unwrap_or(&[])).map_err(|e| {
            format!("{topic} partition {s} offset {offset}: {e}; is an instance of another version writing to it?")
        })?;
        match record {
            Record::Share(share) => match part.merger.add(*share, offset as u64) {
                Added::Held => {}
                Added::Duplicate | Added::Replayed => {
                    metrics::counter!(telemetry::SHARES_REPLAYED).increment(1);
                }
                Added::Conflict => {
                    metrics::counter!(telemetry::SHARES_CONFLICTING).increment(1);
                    warn!(partition = s, offset, "a share sent again with other content was dropped: were the window settings of the group changed without a new kafka.group_id?");
                }
            },
            Record::Progress(p) => {
                part.merger.progress(p);
                // Every shares partition has every partition's progress:
                // the one read furthest knows most.
                if let Some(f) = part.merger.furthest() {
                    group.furthest.fetch_max(f, Ordering::Relaxed);
                }
                if let Some(w) = part.merger.watermark() {
                    group.slowest.fetch_max(w, Ordering::Relaxed);
                }
            }
        }
        let batches = part.merger.complete(Instant::now());
        if batches.is_empty() {
            continue;
        }
        let commit_at = part.merger.lowest_held().map_or(part.next, |h| h as i64);
        debug!(
            partition = s,
            windows = batches.len(),
            commit_at,
            "panes merged"
        );
        pending.push_back(Pending {
            partition: s,
            offset: commit_at,
            state: part.merger.state(),
        });
        let work = Work {
            seq,
            batches,
            dead_letters: Vec::new(),
            commit: vec![CommitPoint {
                topic: Arc::from(topic.as_str()),
                partition: s,
                offset: commit_at,
                checkpoint: None,
            }],
            messages: 0,
            record_first: Vec::new(),
            assignment: 0,
        };
        seq += 1;
        let tx = to_delivery.as_ref().expect("open until the stop");
        if tx.blocking_send(work).is_err() {
            return Err("delivery stopped".into());
        }
    }
    // The stop: what was handed over is delivered and committed.
    drop(to_delivery);
    let until = Instant::now() + DRAIN;
    while !pending.is_empty() && Instant::now() < until {
        answer_acks(&consumer, &topic, &acks, &mut pending, &mut parts, true)?;
    }
    commit_idle(&consumer, &topic, &pending, &mut parts);
    info!(left = pending.len(), "merge stage stopped");
    Ok(())
}

/// Commits the positions of acknowledged works, in order. `wait`: waits a
/// little for the next acknowledgement.
fn answer_acks(
    consumer: &BaseConsumer<KafkaContext>,
    topic: &str,
    acks: &std_mpsc::Receiver<Ack>,
    pending: &mut VecDeque<Pending>,
    parts: &mut BTreeMap<i32, Part>,
    wait: bool,
) -> Result<(), String> {
    loop {
        let ack = if wait {
            match acks.recv_timeout(Duration::from_millis(100)) {
                Ok(a) => a,
                Err(std_mpsc::RecvTimeoutError::Timeout) => return Ok(()),
                Err(std_mpsc::RecvTimeoutError::Disconnected) => {
                    pending.clear();
                    return Ok(());
                }
            }
        } else {
            match acks.try_recv() {
                Ok(a) => a,
                Err(_) => return Ok(()),
            }
        };
        match ack {
            Ack::Delivered { works, .. } => {
                for _ in 0..works {
                    let Some(p) = pending.pop_front() else { break };
                    if commit(consumer, topic, p.partition, p.offset, &p.state) {
                        if let Some(part) = parts.get_mut(&p.partition) {
                            part.committed = p.offset;
                        }
                    }
                }
            }
            Ack::Failed(reason) => return Err(format!("merged packets not delivered: {reason}")),
        }
        if wait {
            return Ok(());
        }
    }
}

/// Commits `offset` of a shares partition with the merger's state.
fn commit(
    consumer: &BaseConsumer<KafkaContext>,
    topic: &str,
    partition: i32,
    offset: i64,
    state: &MergeState,
) -> bool {
    let mut tpl = TopicPartitionList::new();
    let mut elem = tpl.add_partition(topic, partition);
    if elem.set_offset(Offset::Offset(offset)).is_err() {
        return false;
    }
    elem.set_metadata(state.to_metadata());
    match consumer.commit(&tpl, CommitMode::Sync) {
        Ok(()) => {
            metrics::counter!(telemetry::COMMITS).increment(1);
            true
        }
        Err(e) => {
            // A partition that moved away: its next reader goes on from the
            // last commit, and merges the same panes again.
            metrics::counter!(telemetry::COMMIT_FAILURES).increment(1);
            warn!(partition, offset, error = %e, "shares offset commit failed");
            false
        }
    }
}

/// The state committed with the partition's offset; none: a fresh start
/// (nothing committed yet). A commit whose state cannot be read stops the
/// stage rather than start from nothing: windows merged in part would never
/// complete, and replayed shares would be merged a second time.
fn restore(
    consumer: &BaseConsumer<KafkaContext>,
    topic: &str,
    partition: i32,
) -> Result<MergeState, String> {
    let mut last = String::new();
    for attempt in 0..5u32 {
        if attempt > 0 {
            std::thread::sleep(Duration::from_millis(500 << attempt));
        }
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(topic, partition);
        match consumer.committed_offsets(tpl, Duration::from_secs(10)) {
            Ok(c) => {
                let Some(e) = c.find_partition(topic, partition) else {
                    return Ok(MergeState::default());
                };
                if !matches!(e.offset(), Offset::Offset(_)) {
                    return Ok(MergeState::default());
                }
                return MergeState::from_metadata(e.metadata()).ok_or_else(|| {
                    format!(
                        "{topic} partition {partition}: the merge state committed with offset {:?} cannot be read ({:?}); was the group's shares topic committed by another program?",
                        e.offset(),
                        e.metadata()
                    )
                });
            }
            Err(e) => {
                warn!(partition, attempt, error = %e, "cannot read the merge state committed yet");
                last = e.to_string();
            }
        }
    }
    Err(format!(
        "{topic} partition {partition}: cannot read the merge state committed: {last}"
    ))
}

/// Drops the mergers of partitions no longer assigned: their state is in
/// their last commit, for whoever reads them now.
fn forget_revoked(
    consumer: &BaseConsumer<KafkaContext>,
    topic: &str,
    parts: &mut BTreeMap<i32, Part>,
) {
    let Ok(assigned) = consumer.assignment() else {
        return;
    };
    let keep: Vec<i32> = assigned
        .elements_for_topic(topic)
        .iter()
        .map(|e| e.partition())
        .collect();
    parts.retain(|p, _| keep.contains(p));
}

/// Commits the partitions whose position moved with no work in flight.
fn commit_idle(
    consumer: &BaseConsumer<KafkaContext>,
    topic: &str,
    pending: &VecDeque<Pending>,
    parts: &mut BTreeMap<i32, Part>,
) {
    for (s, part) in parts.iter_mut() {
        if pending.iter().any(|p| p.partition == *s) {
            continue;
        }
        let at = part.merger.lowest_held().map_or(part.next, |h| h as i64);
        if at > part.committed && commit(consumer, topic, *s, at, &part.merger.state()) {
            part.committed = at;
        }
    }
}

fn gauges(parts: &BTreeMap<i32, Part>) {
    metrics::gauge!(telemetry::MERGE_PARTITIONS).set(parts.len() as f64);
    let held: usize = parts.values().map(|p| p.merger.held_events()).sum();
    metrics::gauge!(telemetry::MERGE_EVENTS_HELD).set(held as f64);
    let windows: usize = parts.values().map(|p| p.merger.held_windows()).sum();
    metrics::gauge!(telemetry::MERGE_WINDOWS_HELD).set(windows as f64);
    // How far the slowest input partition trails the furthest, in event time.
    let lag = parts
        .values()
        .filter_map(|p| Some(p.merger.furthest()? - p.merger.watermark()?))
        .max()
        .unwrap_or(0)
        .max(0);
    metrics::gauge!(telemetry::MERGE_LAG).set(lag as f64 / 1000.0);
}
