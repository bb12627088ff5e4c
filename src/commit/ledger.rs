//! Offsets: what is committed, and when.
//!
//! The invariant this module keeps: an offset is committed only after every
//! message below it is accounted for by delivered work — its packet and dead
//! letters acknowledged by the broker and its packet in the metrics log — and
//! work is settled in the order it was handed to delivery. [`Ledger`] receives
//! delivery's acknowledgements in that order, merges their [`CommitPoint`]s
//! (the latest per partition wins) and commits them synchronously. A commit
//! that fails is kept and retried with backoff, merged with later ones; the
//! data is already delivered, so the only risk of a failed commit is a replay,
//! never a loss.
//!
//! In window mode each commit point carries the partition's checkpoint; the
//! ledger stores the checkpoints ([`crate::commit::checkpoint`]) and only then commits
//! the offsets, so a stored checkpoint is never behind the committed offset.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{mpsc as std_mpsc, Arc};
use std::thread::sleep;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext};
use rdkafka::error::KafkaResult;
use rdkafka::{Offset, TopicPartitionList};
use tracing::{debug, warn};

use crate::commit::checkpoint::{Checkpoint, CheckpointStore};
use crate::sink::publisher::{OutRecord, Publisher, TxnError};
use crate::telemetry::{self, Progress};
use crate::work::Ack;
use crate::work::{Closure, CommitPoint, Logged, Outcome};

/// The log target of commits; tests and docs filter on it, so it keeps the
/// name it had before the commit path had a folder of its own.
pub const LOG_TARGET: &str = "login_metrics::offsets";

/// Commit attempts per settle; shutdown and revocation use the same.
pub const COMMIT_ATTEMPTS: u32 = 5;
/// The wait before a failed commit is tried again while consuming goes on.
const RETRY_AFTER: Duration = Duration::from_secs(1);
/// The shortest time between two commits while the stream flows. A commit
/// (with window mode's checkpoint write before it) waits for the broker on
/// the consumer thread; a backlog of small windows or batches would otherwise
/// pay that round trip for each of them. Acknowledged work waits at most
/// this long for its commit (all of it is committed at once), and a crash
/// in between replays at most this much more.
const COMMIT_INTERVAL: Duration = Duration::from_millis(500);

/// The partition list of a commit.
pub fn partition_list(points: &[CommitPoint]) -> KafkaResult<TopicPartitionList> {
    let mut tpl = TopicPartitionList::with_capacity(points.len());
    for p in points {
        tpl.add_partition_offset(&p.topic, p.partition, Offset::Offset(p.offset))?;
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
            warn!(target: LOG_TARGET, error = %e, "cannot build the offset list to commit");
            return false;
        }
    };
    for attempt in 1..=attempts {
        match consumer.commit(&tpl, CommitMode::Sync) {
            Ok(()) => {
                metrics::counter!(telemetry::COMMITS).increment(1);
                if tracing::enabled!(target: LOG_TARGET, tracing::Level::DEBUG) {
                    let list: Vec<String> = points
                        .iter()
                        .map(|p| format!("{}:{}", p.partition, p.offset))
                        .collect();
                    debug!(target: LOG_TARGET, offsets = %list.join(","), "offsets committed");
                }
                return true;
            }
            Err(e) => {
                metrics::counter!(telemetry::COMMIT_FAILURES).increment(1);
                warn!(target: LOG_TARGET, attempt, of = attempts, error = %e, "offset commit failed");
                if attempt < attempts {
                    sleep(Duration::from_millis(100 << (attempt - 1).min(5)));
                }
            }
        }
    }
    false
}

/// The group's committed offset of each of `partitions` of `topic`, where there is one.
pub fn committed<C: ConsumerContext>(
    consumer: &BaseConsumer<C>,
    topic: &str,
    partitions: &[i32],
    timeout: Duration,
) -> KafkaResult<HashMap<i32, i64>> {
    let mut tpl = TopicPartitionList::new();
    for p in partitions {
        tpl.add_partition(topic, *p);
    }
    let committed = consumer.committed_offsets(tpl, timeout)?;
    Ok(partitions
        .iter()
        .filter_map(|p| match committed.find_partition(topic, *p)?.offset() {
            Offset::Offset(o) => Some((*p, o)),
            _ => None,
        })
        .collect())
}

/// Merges `later` into `into`: a later point for the same partition replaces
/// the earlier one.
fn merge(into: &mut Vec<CommitPoint>, later: Vec<CommitPoint>) {
    crate::work::merge_points(into, later)
}

/// Work handed to delivery and not yet settled, in order, and the offsets
/// delivered but not yet committed.
pub struct Ledger {
    acks: std_mpsc::Receiver<Ack>,
    in_flight: usize,
    failure: Option<String>,
    progress: Arc<Progress>,
    checkpoints: Option<CheckpointStore>,
    /// Delivered, not yet committed: the latest point per partition.
    pending: Vec<CommitPoint>,
    pending_messages: u64,
    retry_at: Option<Instant>,
    /// When the next commit may be made without waiting (see [`COMMIT_INTERVAL`]).
    next_commit: Option<Instant>,
    /// Acknowledgements still to come for work abandoned at a revocation
    /// (see [`Ledger::abandon_in_flight`]): dropped when they arrive.
    abandoned: usize,
    /// The offsets this process committed, per partition: what a checkpoint
    /// written now names as the group's committed offset.
    committed: Vec<(Arc<str>, i32, i64)>,
    /// Points whose checkpoints were stored since [`Ledger::take_stored`].
    stored: Vec<CommitPoint>,
    carry: Carry,
    /// Exactly once: the transaction each acknowledgement stands for.
    transactions: Option<Transactions>,
    /// Exactly once: an acknowledged transaction waiting for its commit.
    awaiting: Option<Awaiting>,
}

/// Exactly once (`delivery.guarantee = "exactly_once"`): delivery sends a
/// work's packets and dead letters in an open transaction and acknowledges
/// it; the ledger adds the work's checkpoints and the record of its packets
/// ([`CheckpointStore::logged_record`]) to the same transaction, adds the
/// input offsets under the consumer's group generation, commits, and tells
/// delivery the [`Outcome`]. The ledger commits on the consumer thread
/// because the consumer is there: its group metadata, and revocations,
/// which run inside `poll` on this thread and so never in the middle of a
/// commit.
pub struct Transactions {
    pub publisher: Arc<Publisher>,
    pub outcomes: tokio::sync::mpsc::UnboundedSender<Outcome>,
    /// The key of this instance's record of its last committed packets.
    pub logged_key: String,
}

/// An acknowledged transaction, as the ledger takes it.
struct Awaiting {
    commit: Vec<CommitPoint>,
    messages: u64,
    works: usize,
    logged: Vec<Logged>,
}

/// How long [`Ledger::settle`] waits for work in flight.
#[derive(Clone, Copy, Debug)]
pub enum Wait {
    /// Takes only what is already acknowledged.
    No,
    /// Until every work in flight is acknowledged.
    All,
    /// For every work in flight, but no later than this.
    Until(Instant),
}

impl Ledger {
    /// `checkpoints`: window mode's checkpoint store, written before each commit.
    pub fn new(
        acks: std_mpsc::Receiver<Ack>,
        progress: Arc<Progress>,
        checkpoints: Option<CheckpointStore>,
    ) -> Ledger {
        Ledger {
            acks,
            in_flight: 0,
            failure: None,
            progress,
            checkpoints,
            pending: Vec::new(),
            pending_messages: 0,
            retry_at: None,
            next_commit: None,
            abandoned: 0,
            committed: Vec::new(),
            stored: Vec::new(),
            carry: Carry::default(),
            transactions: None,
            awaiting: None,
        }
    }

    /// Makes every commit a transaction's (exactly once); see [`Transactions`].
    pub fn set_transactions(&mut self, t: Transactions) {
        self.transactions = Some(t);
    }

    /// Whether commits are transactions (exactly once).
    pub fn transactional(&self) -> bool {
        self.transactions.is_some()
    }

    /// Window mode's checkpoint store.
    pub fn checkpoints(&self) -> Option<&CheckpointStore> {
        self.checkpoints.as_ref()
    }

    /// The points whose checkpoints were stored since the last call.
    pub fn take_stored(&mut self) -> Vec<CommitPoint> {
        std::mem::take(&mut self.stored)
    }

    /// Stores checkpoints that must be durable before a work is handed to
    /// delivery (closures decided by wall clock); nothing is committed.
    pub fn record_first(&mut self, points: &[CommitPoint]) -> Result<(), String> {
        let Some(writer) = &self.checkpoints else {
            return Ok(());
        };
        let mut points = self.carry.records(points);
        self.name_committed(&mut points);
        for (topic, items) in by_topic(&points) {
            writer.write(topic, &items)?;
        }
        self.carry.written(&points);
        self.stored.extend(points);
        Ok(())
    }

    /// Sets each checkpoint's `previous` to the offset this process last
    /// committed for its partition, when it committed one.
    fn name_committed(&self, points: &mut [CommitPoint]) {
        for p in points {
            let Some(c) = &mut p.checkpoint else { continue };
            if let Some((_, _, o)) = self
                .committed
                .iter()
                .find(|(t, q, _)| *q == p.partition && *t == p.topic)
            {
                c.previous = Some(*o);
            }
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

    /// Whether delivered offsets are still waiting for their commit.
    pub fn uncommitted(&self) -> bool {
        !self.pending.is_empty()
    }

    /// Gives up the delivered but uncommitted offsets, after their partitions
    /// were revoked: whoever reads them next replays from the last commit.
    pub fn forget_uncommitted(&mut self) {
        if !self.pending.is_empty() {
            warn!(
                target: LOG_TARGET, partitions = self.pending.len(),
                "revoked with delivered offsets not committed; their work will be replayed"
            );
        }
        self.pending.clear();
        self.pending_messages = 0;
        self.retry_at = None;
        // Whoever owns the partitions next may commit them.
        self.committed.clear();
        self.stored.clear();
        self.carry = Carry::default();
    }

    /// Gives up waiting for the work in flight after a revocation that could
    /// not wait any longer: its acknowledgements are dropped when they come,
    /// so nothing is committed for partitions this consumer no longer owns.
    /// Whoever reads them next reads that work again. Returns how many works
    /// were abandoned.
    pub fn abandon_in_flight(&mut self) -> usize {
        let n = self.in_flight;
        self.abandoned += n;
        self.in_flight = 0;
        n
    }

    /// Takes what delivery has acknowledged (waiting as `wait` says), then
    /// stores the checkpoints and commits. A failed commit is retried at a
    /// later call, no sooner than [`RETRY_AFTER`] unless waiting; while the
    /// stream flows (`flowing`: the last fetch brought messages), commits are
    /// at least [`COMMIT_INTERVAL`] apart. Once it stops, what was delivered
    /// is committed at once: nothing would share the round trip anyway.
    pub fn settle<C: ConsumerContext>(
        &mut self,
        consumer: &BaseConsumer<C>,
        wait: Wait,
        flowing: bool,
    ) {
        let waiting = !matches!(wait, Wait::No);
        if self.transactions.is_some() {
            // Each acknowledgement is a transaction, committed as it comes:
            // delivery waits for its outcome before it sends anything more.
            loop {
                self.take_acks(wait);
                match self.awaiting.take() {
                    Some(a) => self.commit_transaction(consumer, a),
                    None => break,
                }
                if self.failure.is_some() {
                    break;
                }
            }
            return;
        }
        self.take_acks(wait);
        // Work delivered before a failure is still committed: acks arrive in order.
        let now = Instant::now();
        if !self.commit_due(now, waiting, flowing) {
            return;
        }
        self.next_commit = Some(now + COMMIT_INTERVAL);
        if self.store_and_commit(consumer) {
            let pending = std::mem::take(&mut self.pending);
            self.committed_now(consumer, &pending, self.pending_messages);
            self.pending_messages = 0;
            self.retry_at = None;
        } else {
            self.retry_at = Some(Instant::now() + RETRY_AFTER);
        }
    }

    /// Whether `pending` is to be committed now (see [`Ledger::settle`]).
    fn commit_due(&self, now: Instant, waiting: bool, flowing: bool) -> bool {
        if self.pending.is_empty() {
            return false;
        }
        if waiting {
            return true;
        }
        let backing_off = self.retry_at.is_some_and(|t| now < t);
        let spaced = flowing && self.next_commit.is_some_and(|t| now < t);
        !backing_off && !spaced
    }

    /// Takes delivery's acknowledgements into `pending`, waiting as `wait`
    /// says; those of abandoned work are dropped.
    fn take_acks(&mut self, wait: Wait) {
        let stopped = "delivery stopped without reporting why";
        while (self.in_flight > 0 || self.abandoned > 0) && self.failure.is_none() {
            // Abandoned work's acknowledgements come first (acks are in
            // order); they are waited for only on the way to later ones.
            let wait = if self.in_flight == 0 { Wait::No } else { wait };
            let ack = match wait {
                Wait::All => match self.acks.recv() {
                    Ok(a) => a,
                    Err(_) => {
                        self.fail(stopped);
                        break;
                    }
                },
                Wait::No => match self.acks.try_recv() {
                    Ok(a) => a,
                    Err(std_mpsc::TryRecvError::Empty) => break,
                    Err(std_mpsc::TryRecvError::Disconnected) => {
                        self.fail(stopped);
                        break;
                    }
                },
                Wait::Until(t) => {
                    match self
                        .acks
                        .recv_timeout(t.saturating_duration_since(Instant::now()))
                    {
                        Ok(a) => a,
                        Err(std_mpsc::RecvTimeoutError::Timeout) => break,
                        Err(std_mpsc::RecvTimeoutError::Disconnected) => {
                            self.fail(stopped);
                            break;
                        }
                    }
                }
            };
            if self.abandoned > 0 {
                match ack {
                    Ack::Delivered { works, .. } => {
                        self.abandoned = self.abandoned.saturating_sub(works);
                        // Its transaction holds the revoked partitions' work:
                        // aborted, whoever owns them now redoes it.
                        self.abort_abandoned();
                    }
                    // Delivery stops after a failure: nothing later will be
                    // delivered, so the run must stop with the reason.
                    Ack::Failed(reason) => {
                        self.abandoned -= 1;
                        self.fail(reason);
                    }
                }
                continue;
            }
            match ack {
                Ack::Delivered {
                    commit,
                    messages,
                    works,
                    logged,
                } => {
                    self.in_flight = self.in_flight.saturating_sub(works);
                    if self.transactions.is_some() {
                        self.awaiting = Some(Awaiting {
                            commit,
                            messages,
                            works,
                            logged,
                        });
                        break;
                    }
                    merge(&mut self.pending, commit);
                    self.pending_messages += messages;
                }
                Ack::Failed(reason) => {
                    self.in_flight = self.in_flight.saturating_sub(1);
                    self.fail(reason)
                }
            }
        }
    }

    /// Exactly once: aborts the transaction of work given up at a
    /// revocation, and tells delivery to drop it.
    fn abort_abandoned(&mut self) {
        let Some(t) = &self.transactions else { return };
        match t.publisher.abort() {
            Ok(()) => {
                metrics::counter!(telemetry::TRANSACTIONS_ABORTED).increment(1);
                warn!(target: LOG_TARGET, "the transaction of work given up at a revocation is aborted; whoever owns its partitions now redoes it");
                let _ = t.outcomes.send(Outcome::Abandoned);
            }
            Err(e) => {
                let reason =
                    format!("cannot abort the transaction of work given up at a revocation: {e}");
                let _ = t.outcomes.send(Outcome::Stopped(reason.clone()));
                self.fail(reason);
            }
        }
    }

    /// Exactly once: adds the work's checkpoints, the record of its packets
    /// and its offsets to the open transaction, commits it, and tells
    /// delivery the outcome. An abortable failure aborts the transaction and
    /// asks delivery to send the work again in a new one.
    fn commit_transaction<C: ConsumerContext>(&mut self, consumer: &BaseConsumer<C>, a: Awaiting) {
        let Awaiting {
            mut commit,
            messages,
            works,
            logged,
        } = a;
        self.carry.commits(&mut commit);
        self.name_committed(&mut commit);
        let Some(t) = self.transactions.take() else {
            return;
        };
        self.transaction_of(consumer, &t, commit, messages, works, logged);
        self.transactions = Some(t);
    }

    fn transaction_of<C: ConsumerContext>(
        &mut self,
        consumer: &BaseConsumer<C>,
        t: &Transactions,
        commit: Vec<CommitPoint>,
        messages: u64,
        works: usize,
        logged: Vec<Logged>,
    ) {
        let mut records: Vec<OutRecord> = Vec::new();
        if let Some(store) = &self.checkpoints {
            for (topic, items) in by_topic(&commit) {
                records.extend(store.records(topic, &items));
            }
            if !logged.is_empty() {
                records.push(store.logged_record(&t.logged_key, &logged));
            }
        }
        let started = Instant::now();
        let result = (|| -> Result<(), TxnError> {
            if !records.is_empty() {
                let sent =
                    tokio::runtime::Handle::current().block_on(t.publisher.send_all(&records));
                if let Some(Err(e)) = sent.into_iter().find(Result::is_err) {
                    metrics::counter!(telemetry::CHECKPOINT_FAILURES).increment(1);
                    return Err(TxnError::Abortable(format!(
                        "checkpoint not delivered: {e}"
                    )));
                }
            }
            let tpl = partition_list(&commit)
                .map_err(|e| TxnError::Abortable(format!("cannot build the offset list: {e}")))?;
            t.publisher.commit(&tpl, consumer.group_metadata().as_ref())
        })();
        match result {
            Ok(()) => {
                metrics::counter!(telemetry::COMMITS).increment(1);
                metrics::histogram!(telemetry::TRANSACTION_SECONDS)
                    .record(started.elapsed().as_secs_f64());
                if tracing::enabled!(target: LOG_TARGET, tracing::Level::DEBUG) {
                    let list: Vec<String> = commit
                        .iter()
                        .map(|p| format!("{}:{}", p.partition, p.offset))
                        .collect();
                    debug!(target: LOG_TARGET, offsets = %list.join(","), packets = logged.len(), "transaction committed");
                }
                self.carry.written(&commit);
                self.stored.extend(commit.iter().cloned());
                self.committed_now(consumer, &commit, messages);
                let _ = t.outcomes.send(Outcome::Committed);
            }
            Err(TxnError::Abortable(reason)) => {
                metrics::counter!(telemetry::COMMIT_FAILURES).increment(1);
                warn!(target: LOG_TARGET, error = %reason, "transaction not committed; aborting it, its work is sent again");
                match t.publisher.abort() {
                    Ok(()) => {
                        metrics::counter!(telemetry::TRANSACTIONS_ABORTED).increment(1);
                        self.in_flight += works;
                        let _ = t.outcomes.send(Outcome::Aborted(reason));
                    }
                    Err(e) => {
                        let reason =
                            format!("cannot abort a transaction that failed ({reason}): {e}");
                        let _ = t.outcomes.send(Outcome::Stopped(reason.clone()));
                        self.fail(reason);
                    }
                }
            }
            Err(TxnError::Fatal(reason)) => {
                let reason = format!("the transactional producer cannot go on: {reason}");
                let _ = t.outcomes.send(Outcome::Stopped(reason.clone()));
                self.fail(reason);
            }
        }
    }

    /// Notes offsets committed: this process's commits, the lag of each
    /// partition committed, the committed messages.
    fn committed_now<C: ConsumerContext>(
        &mut self,
        consumer: &BaseConsumer<C>,
        points: &[CommitPoint],
        messages: u64,
    ) {
        for p in points {
            match self
                .committed
                .iter_mut()
                .find(|(t, q, _)| *q == p.partition && *t == p.topic)
            {
                Some(c) => c.2 = p.offset,
                None => self
                    .committed
                    .push((p.topic.clone(), p.partition, p.offset)),
            }
            // The lag of a partition committed to its end is 0 now, not at
            // the next statistics (or never, after the last commit of a run).
            if let Some(high) =
                crate::kafka::cached_high_watermark(consumer.client(), &p.topic, p.partition)
            {
                self.progress
                    .set_lag(&p.topic, p.partition, high - p.offset);
            }
        }
        self.progress
            .committed_messages
            .fetch_add(messages, Ordering::Relaxed);
        metrics::counter!(telemetry::COMMITTED).increment(messages);
    }

    fn store_and_commit<C: ConsumerContext>(&mut self, consumer: &BaseConsumer<C>) -> bool {
        let mut pending = std::mem::take(&mut self.pending);
        self.carry.commits(&mut pending);
        self.name_committed(&mut pending);
        self.pending = pending;
        if let Some(writer) = &self.checkpoints {
            for (topic, items) in by_topic(&self.pending) {
                if let Err(e) = writer.write(topic, &items) {
                    metrics::counter!(telemetry::CHECKPOINT_FAILURES).increment(1);
                    warn!(target: LOG_TARGET, error = %e, "checkpoint write failed; the commit waits and is retried");
                    return false;
                }
            }
            self.carry.written(&self.pending);
            self.stored.extend(self.pending.iter().cloned());
        }
        commit(consumer, &self.pending, COMMIT_ATTEMPTS)
    }
}

/// What this process wrote to the checkpoint topic, per partition: the last
/// checkpoint, and the closures stored ahead of delivery that later writes
/// must carry. Work is delivered, and its commit checkpoint written, after
/// later work's records (`record_first`) may have been: that checkpoint,
/// computed before their closures were decided, must not hide them.
#[derive(Debug, Default)]
pub struct Carry {
    last: Vec<(Arc<str>, i32, Checkpoint)>,
    recorded: Vec<(Arc<str>, i32, Vec<Closure>)>,
}

impl Carry {
    /// The records to store ahead of a work's delivery: each built on the
    /// last checkpoint written for its partition when that is further on,
    /// with every closure recorded and not yet covered.
    pub fn records(&mut self, points: &[CommitPoint]) -> Vec<CommitPoint> {
        let mut points = points.to_vec();
        for p in &mut points {
            let last = find(&self.last, p).map(|(_, _, l)| l.clone());
            let Some(c) = &mut p.checkpoint else { continue };
            let closures = c.closures.clone();
            if let Some(last) = last {
                if last.offset > c.offset {
                    let closed = c.closed_ms;
                    *c = last;
                    c.closed_ms = c.closed_ms.max(closed);
                    p.offset = c.offset;
                }
            }
            match self
                .recorded
                .iter_mut()
                .find(|(t, q, _)| *q == p.partition && *t == p.topic)
            {
                Some((_, _, r)) => r.extend(closures),
                None => self.recorded.push((p.topic.clone(), p.partition, closures)),
            }
        }
        self.commits(&mut points);
        points
    }

    /// Adds to each checkpoint the closures recorded for its partition.
    pub fn commits(&self, points: &mut [CommitPoint]) {
        for p in points {
            if let Some((_, _, r)) = find(&self.recorded, p) {
                let r = r.clone();
                if let Some(c) = &mut p.checkpoint {
                    fold(c, &r);
                }
            }
        }
    }

    /// Notes what was written: closures at or below a written offset are in
    /// its `closed_ms` from then on.
    pub fn written(&mut self, points: &[CommitPoint]) {
        for p in points {
            let Some(c) = &p.checkpoint else { continue };
            match self
                .last
                .iter_mut()
                .find(|(t, q, _)| *q == p.partition && *t == p.topic)
            {
                Some((_, _, l)) => *l = c.clone(),
                None => self.last.push((p.topic.clone(), p.partition, c.clone())),
            }
            if let Some((_, _, r)) = self
                .recorded
                .iter_mut()
                .find(|(t, q, _)| *q == p.partition && *t == p.topic)
            {
                r.retain(|x| x.offset > c.offset);
            }
        }
    }
}

fn find<'a, T>(items: &'a [(Arc<str>, i32, T)], p: &CommitPoint) -> Option<&'a (Arc<str>, i32, T)> {
    items
        .iter()
        .find(|(t, q, _)| *q == p.partition && *t == p.topic)
}

/// Adds `closures` to `c`: those at or below its offset as what is closed
/// there, the others as closures still to come, each once.
fn fold(c: &mut Checkpoint, closures: &[Closure]) {
    for x in closures {
        if x.offset <= c.offset {
            c.closed_ms = c.closed_ms.max(Some(x.through_ms));
        } else if !c.closures.contains(x) {
            c.closures.push(*x);
        }
    }
    c.closures.sort_by_key(|x| x.offset);
}

/// The checkpoints of `points`, by topic.
fn by_topic(points: &[CommitPoint]) -> Vec<(&str, Vec<(i32, Checkpoint)>)> {
    let mut out: Vec<(&str, Vec<(i32, Checkpoint)>)> = Vec::new();
    for p in points {
        let Some(c) = &p.checkpoint else { continue };
        match out.iter_mut().find(|(t, _)| *t == &*p.topic) {
            Some((_, items)) => items.push((p.partition, c.clone())),
            None => out.push((&p.topic, vec![(p.partition, c.clone())])),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn point(partition: i32, offset: i64) -> CommitPoint {
        CommitPoint {
            topic: Arc::from("user-login"),
            partition,
            offset,
            checkpoint: None,
        }
    }

    #[test]
    fn a_commit_list_carries_each_partitions_offset() {
        let tpl = partition_list(&[point(0, 10), point(2, 41)]).unwrap();
        assert_eq!(tpl.count(), 2);
        let e = tpl.find_partition("user-login", 2).unwrap();
        assert_eq!(e.offset(), Offset::Offset(41));
        assert_eq!(
            tpl.find_partition("user-login", 0).unwrap().offset(),
            Offset::Offset(10)
        );
    }

    fn delivered(points: Vec<CommitPoint>) -> Ack {
        Ack::delivered(points, 1)
    }

    #[test]
    fn acknowledgements_of_abandoned_work_are_never_committed() {
        let (tx, rx) = std_mpsc::channel();
        let mut ledger = Ledger::new(rx, Arc::new(Progress::default()), None);
        ledger.sent();
        ledger.sent();
        assert_eq!(ledger.abandon_in_flight(), 2);
        // After the revocation: new work for the partition still owned.
        ledger.sent();
        tx.send(delivered(vec![point(0, 10), point(1, 10)]))
            .unwrap();
        tx.send(delivered(vec![point(1, 20)])).unwrap();
        tx.send(delivered(vec![point(0, 15)])).unwrap();
        ledger.take_acks(Wait::Until(Instant::now() + Duration::from_secs(5)));
        assert_eq!(ledger.pending, vec![point(0, 15)]);
        assert_eq!(ledger.in_flight(), 0);
        assert!(ledger.failure().is_none());
    }

    #[test]
    fn a_failure_of_abandoned_work_still_stops_the_run() {
        let (tx, rx) = std_mpsc::channel();
        let mut ledger = Ledger::new(rx, Arc::new(Progress::default()), None);
        ledger.sent();
        ledger.abandon_in_flight();
        tx.send(Ack::Failed("the broker refused it".into()))
            .unwrap();
        ledger.take_acks(Wait::No);
        assert_eq!(ledger.failure(), Some("the broker refused it"));
    }

    #[test]
    fn waiting_until_a_deadline_takes_what_arrived_and_returns() {
        let (tx, rx) = std_mpsc::channel();
        let mut ledger = Ledger::new(rx, Arc::new(Progress::default()), None);
        ledger.sent();
        ledger.sent();
        tx.send(delivered(vec![point(0, 3)])).unwrap();
        ledger.take_acks(Wait::Until(Instant::now() + Duration::from_millis(50)));
        assert_eq!(ledger.pending, vec![point(0, 3)]);
        assert_eq!(ledger.in_flight(), 1, "the second is still in flight");
    }

    #[test]
    fn commits_are_spaced_while_the_stream_flows_and_made_at_once_when_it_stops() {
        let (_tx, rx) = std_mpsc::channel();
        let mut ledger = Ledger::new(rx, Arc::new(Progress::default()), None);
        let now = Instant::now();
        assert!(!ledger.commit_due(now, false, false), "nothing to commit");
        ledger.pending = vec![point(0, 3)];
        assert!(ledger.commit_due(now, false, true), "no commit yet");
        ledger.next_commit = Some(now + COMMIT_INTERVAL);
        assert!(!ledger.commit_due(now, false, true), "spaced while flowing");
        assert!(
            ledger.commit_due(now, false, false),
            "at once when the stream stopped"
        );
        assert!(ledger.commit_due(now, true, true), "at once when waiting");
        assert!(ledger.commit_due(now + COMMIT_INTERVAL, false, true));
        ledger.retry_at = Some(now + RETRY_AFTER);
        assert!(
            !ledger.commit_due(now, false, false),
            "a failed commit backs off even when the stream stopped"
        );
        assert!(ledger.commit_due(now, true, true), "unless waiting");
    }

    #[test]
    fn later_points_replace_earlier_ones_of_the_same_partition() {
        let mut pending = vec![point(0, 10), point(1, 5)];
        merge(&mut pending, vec![point(1, 9), point(2, 3)]);
        merge(&mut pending, vec![point(0, 12)]);
        assert_eq!(pending, vec![point(0, 12), point(1, 9), point(2, 3)]);
    }
}
