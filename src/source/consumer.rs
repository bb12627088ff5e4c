//! The source: consuming `user-login` on one thread that owns the consumer.
//!
//! The thread polls, parses each message ([`crate::core::event`]), hands it to the
//! grouping of the configured mode — event-time windows ([`crate::core::grouping::window`])
//! or arrival batches ([`crate::core::grouping::arrival`]) — sends the resulting [`Work`] to
//! delivery (a bounded channel, so consumption overlaps the delivery of the
//! previous work), and commits each work once delivery acknowledges it
//! ([`crate::commit::ledger::Ledger`]).
//!
//! Keeping every consumer call on this thread is what makes revocation
//! simple: librdkafka calls the rebalance callback from inside `poll` on this
//! same thread. On revocation, arrival mode closes the open batch
//! (`closed_by = rebalance`); window mode hands over only its pending dead
//! letters and forgets its open windows, whose offsets were never committed.
//! Then every work in flight is delivered and committed before the partitions
//! are given up. On assignment, window mode restores each partition's
//! checkpoint from the checkpoint topic ([`crate::commit::checkpoint`]).

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::{mpsc as std_mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::{KafkaError, KafkaResult};
use rdkafka::message::{BorrowedMessage, Message as _};
use rdkafka::statistics::Statistics;
use rdkafka::TopicPartitionList;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::commit::checkpoint::{self, Checkpoint, CheckpointStore, Restore};
use crate::commit::ledger::{self as offsets, Ledger, Wait};
use crate::core::event::{self, Requirements};
use crate::core::grouping::{Flow, Grouping};
use crate::kafka;
use crate::settings::KafkaSettings;
use crate::source::fetch::{Fetch, FetchQueue, Fetched, Routes, FETCH_MAX};
use crate::source::range::Bound;
use crate::telemetry::{self, Health, LogLimit, Progress};
use crate::work::Ack;
use crate::work::{CloseReason, Message, Work};

/// Longest blocking poll, so shutdown and deadlines are seen promptly.
const MAX_POLL: Duration = Duration::from_millis(100);
/// How long reading the committed offsets may take on assignment, and how
/// long the checkpoint read may go without progress (it has no deadline).
const CHECKPOINT_TIMEOUT: Duration = Duration::from_secs(10);
/// Attempts at claiming assigned partitions' checkpoints before the run stops.
const CLAIM_ATTEMPTS: u32 = 3;
/// How often window gauges are refreshed.
const GAUGE_INTERVAL: Duration = Duration::from_millis(250);
/// How often the consumer offers held work again while delivery is behind.
const HELD_RETRY: Duration = Duration::from_millis(20);
/// The longest wait for messages while delivered work may be waiting for its commit.
const ACK_POLL: Duration = Duration::from_millis(10);
/// How long no message may arrive before the stream counts as stopped, and
/// delivered work is committed without waiting for the commit interval
/// (a moment between two fetch responses is not a stop).
const QUIET_AFTER: Duration = Duration::from_millis(50);
/// The longest single wait of shutdown or a revocation between heartbeats.
const WAIT_SLICE: Duration = Duration::from_secs(1);
/// How long the consumer waits for delivery to take closed work before it
/// pauses consumption. Delivery is usually just finishing the previous work:
/// pausing at once would make librdkafka drop its prefetched messages and
/// fetch them again, for every window of a backlog.
const HOLD_AFTER: Duration = Duration::from_secs(1);

/// The consumer's context: statistics, errors and rebalances.
pub struct SourceContext {
    driver: Mutex<Option<Driver>>,
    /// Where assigned partitions' messages are routed ([`crate::source::fetch`]).
    routes: Routes,
    health: Arc<Health>,
    progress: Arc<Progress>,
}

impl ClientContext for SourceContext {
    fn stats(&self, stats: Statistics) {
        for (name, topic) in &stats.topics {
            for (id, p) in &topic.partitions {
                // Partition -1 is librdkafka's internal unassigned partition.
                if *id < 0 || p.consumer_lag < 0 {
                    continue;
                }
                self.progress.set_lag(name, *id, p.consumer_lag);
            }
        }
        let up = stats.brokers.values().any(|b| b.state == "UP");
        self.health.set_brokers_up(up);
    }

    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        kafka::route_log("consumer", level, fac, message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        if matches!(
            error.rdkafka_error_code(),
            Some(rdkafka::types::RDKafkaErrorCode::AllBrokersDown)
        ) {
            self.health.set_brokers_up(false);
        }
        kafka::report_error("consumer", &error, reason);
    }
}

impl ConsumerContext for SourceContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            // Before `assign`: librdkafka routes a partition to the consumer
            // queue when it starts fetching it, unless it is routed already.
            let routed = self.routes.route(consumer, tpl);
            if routed < tpl.count() {
                warn!(
                    partitions = tpl.count(),
                    routed, "some assigned partitions are consumed one message at a time"
                );
            }
        }
        if let Rebalance::Revoke(tpl) = rebalance {
            info!(
                partitions = tpl.count(),
                "partitions revoked: flushing and committing"
            );
            if let Some(driver) = self.driver.lock().expect("driver lock").as_mut() {
                driver.on_revoke(consumer);
            }
            for e in tpl.elements() {
                // Served again, a held queue's prefetched messages are
                // dropped by librdkafka's version barrier instead of being
                // kept until the partition comes back, if ever.
                self.routes.release(e.topic(), e.partition());
                // After the revocation's last commit: another member reports it now.
                self.progress.forget_lag(e.topic(), e.partition());
            }
            self.health.set_assigned(0);
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(tpl) => {
                let parts: Vec<String> = tpl
                    .elements()
                    .iter()
                    .map(|e| format!("{}/{}", e.topic(), e.partition()))
                    .collect();
                info!(partitions = %parts.join(","), "partitions assigned");
                // librdkafka keeps a partition's pause across a rebalance: a
                // partition paused while delivery was behind, or by window
                // alignment, before it was revoked would stay silent.
                if let Err(e) = consumer.resume(tpl) {
                    warn!(error = %e, "cannot resume the assigned partitions");
                }
                if let Some(driver) = self.driver.lock().expect("driver lock").as_mut() {
                    driver.on_assign(consumer, tpl);
                }
                self.progress.first_assigned.get_or_init(Instant::now);
                let n = consumer
                    .assignment()
                    .map(|a| a.count())
                    .unwrap_or(tpl.count());
                self.health.set_assigned(n);
                if n > 0 {
                    // An assignment means the coordinator answered.
                    self.health.set_brokers_up(true);
                }
            }
            Rebalance::Error(e) => warn!(error = %e, "rebalance error"),
            Rebalance::Revoke(_) => {}
        }
    }
}

/// A message against a bounded run's range ([`Driver::in_range`]).
struct Admit {
    /// In the range: processed.
    admitted: bool,
    /// Its partition is read to the end with it.
    ends: bool,
}

/// The state of the consumer thread.
pub struct Driver {
    grouping: Box<dyn Grouping>,
    requirements: Requirements,
    max_future_ms: Option<i64>,
    /// The wall clock plus `events.max_future`, for records without a timestamp.
    wall_not_after: Option<i64>,
    to_delivery: Option<mpsc::Sender<Work>>,
    ledger: Ledger,
    /// Work closed and not yet taken by delivery, oldest first.
    ready: VecDeque<Work>,
    /// Whether consumption is paused because delivery is behind.
    held: bool,
    /// How long the revocation callback may wait for work in flight.
    revoke_within: Duration,
    /// Beaten while shutdown or a revocation waits for delivery.
    health: Option<Arc<Health>>,
    progress: Arc<Progress>,
    invalid_log: LogLimit,
    late_seen: u64,
    replayed_seen: u64,
    gauges_at: Instant,
    /// A bounded run's range: where each partition ends, what is read.
    bound: Option<Bound>,
    /// A partition with no committed offset starts at its end
    /// (`auto.offset.reset = latest`) rather than its beginning.
    start_at_end: bool,
    /// The assignment work is read under, raised at each revocation
    /// ([`Work::assignment`]).
    assignment: u64,
    /// How long reading the committed offsets and the checkpoints on
    /// assignment may wait: exactly once, a transaction a vanished member
    /// left open holds them back until the brokers abort it.
    stable_wait: Duration,
}

/// The time bounds of the consumer thread.
pub struct Bounds {
    /// `events.max_future`: how far ahead of the wall clock event time may be.
    pub max_future: Option<Duration>,
    /// How long the revocation callback may wait for work in flight.
    pub revoke_within: Duration,
}

impl Driver {
    pub fn new(
        grouping: Box<dyn Grouping>,
        requirements: Requirements,
        bounds: Bounds,
        to_delivery: mpsc::Sender<Work>,
        acks: std_mpsc::Receiver<Ack>,
        progress: Arc<Progress>,
        checkpoints: Option<CheckpointStore>,
    ) -> Driver {
        let Bounds {
            max_future,
            revoke_within,
        } = bounds;
        Driver {
            grouping,
            requirements,
            max_future_ms: max_future.map(|d| d.as_millis().min(i64::MAX as u128) as i64),
            wall_not_after: None,
            to_delivery: Some(to_delivery),
            ledger: Ledger::new(acks, progress.clone(), checkpoints),
            ready: VecDeque::new(),
            held: false,
            revoke_within,
            health: None,
            progress,
            invalid_log: LogLimit::new("invalid messages", 10, Duration::from_secs(60)),
            late_seen: 0,
            replayed_seen: 0,
            gauges_at: Instant::now(),
            bound: None,
            start_at_end: false,
            assignment: 0,
            stable_wait: CHECKPOINT_TIMEOUT,
        }
    }

    /// Makes every commit a transaction (exactly once): see
    /// [`offsets::Transactions`]. `transaction_timeout`: the producer's
    /// `transaction.timeout.ms`.
    pub fn transactional(
        mut self,
        t: offsets::Transactions,
        transaction_timeout: Duration,
    ) -> Driver {
        self.ledger.set_transactions(t);
        self.stable_wait = CHECKPOINT_TIMEOUT.max(transaction_timeout + CHECKPOINT_TIMEOUT);
        self
    }

    /// Tells grouping which checkpoints are stored, before it makes any
    /// more work: a record it writes ahead of delivery builds on them.
    fn forward_stored(&mut self) {
        let stored = self.ledger.take_stored();
        if !stored.is_empty() {
            self.grouping.stored(&stored);
        }
    }

    /// Makes this a bounded run: it reads up to `bound`'s ends, then closes
    /// everything, delivers, commits and stops ([`consume`] returns).
    pub fn bounded(mut self, bound: Bound) -> Driver {
        self.bound = Some(bound);
        self
    }

    /// A bounded run whose every assigned partition is read to its end.
    fn range_read(&self) -> bool {
        self.bound.as_ref().is_some_and(Bound::complete)
    }

    /// Whether a message is in a bounded run's range, and whether it is the
    /// one that reads its partition to the end (then [`Driver::end_of_range`]
    /// follows once the message itself is processed).
    fn in_range(&mut self, partition: i32, offset: i64) -> Admit {
        let Some(bound) = &mut self.bound else {
            return Admit {
                admitted: true,
                ends: false,
            };
        };
        let was_read = bound.is_read(partition);
        let admitted = bound.admits(partition, offset);
        Admit {
            admitted,
            ends: !was_read && bound.is_read(partition),
        }
    }

    fn end_of_range(&mut self, partition: i32, now: Instant) {
        debug!(partition, "read to the end of the range");
        self.grouping.end_partition(partition, now);
    }

    /// librdkafka's partition EOF: in a bounded run, the partition is read.
    fn on_partition_eof(&mut self, partition: i32, now: Instant) {
        if let Some(bound) = &mut self.bound {
            if !bound.is_read(partition) {
                bound.reached_end(partition);
                self.end_of_range(partition, now);
            }
        }
    }

    /// How many messages the next fetch may take: in window mode no more
    /// than fit under `batch.max_buffered`, so alignment pauses in time.
    fn fetch_max(&self) -> usize {
        self.grouping.room().min(FETCH_MAX)
    }

    fn poll_timeout(&self, now: Instant) -> Duration {
        match self.grouping.deadline() {
            Some(d) => d.saturating_duration_since(now).min(MAX_POLL),
            None => MAX_POLL,
        }
    }

    /// Refreshes the wall-clock bound on event time (`events.max_future`).
    fn refresh_clock(&mut self) {
        if let Some(ahead) = self.max_future_ms {
            self.wall_not_after = Some(chrono::Utc::now().timestamp_millis().saturating_add(ahead));
        }
    }

    /// A message from a partition consumed through the consumer queue.
    fn on_message(&mut self, m: &BorrowedMessage<'_>, now: Instant) {
        let admit = self.in_range(m.partition(), m.offset());
        if admit.admitted {
            let fetch = Fetch::new(
                m.topic(),
                m.partition(),
                m.offset(),
                m.key(),
                m.payload().unwrap_or_default(),
                m.timestamp().to_millis(),
            );
            self.progress.messages.fetch_add(1, Ordering::Relaxed);
            self.on_record(&fetch, now);
        }
        if admit.ends {
            self.end_of_range(m.partition(), now);
        }
    }

    /// One fetch's messages, in order.
    fn on_fetched(&mut self, fetched: &Fetched<'_>, now: Instant) {
        let mut messages = 0;
        for m in fetched.messages() {
            if m.is_partition_eof() {
                self.on_partition_eof(m.partition, now);
                continue;
            }
            if let Some(e) = m.error() {
                kafka::report_error("consumer", &e, "fetch");
                continue;
            }
            let admit = self.in_range(m.partition, m.offset);
            if admit.admitted {
                messages += 1;
                self.on_record(m, now);
            }
            // After the partition's last message is in its window: marked
            // read before, the partition would stop holding the watermark
            // and its own last event could find its window closed.
            if admit.ends {
                self.end_of_range(m.partition, now);
            }
        }
        self.progress
            .messages
            .fetch_add(messages, Ordering::Relaxed);
    }

    fn on_record(&mut self, f: &Fetch<'_>, now: Instant) {
        let m = Message {
            topic: f.topic,
            partition: f.partition,
            offset: f.offset,
            key: f.key,
            payload: f.payload,
            timestamp_ms: f.timestamp_ms,
        };
        // Measured from the record's own timestamp, the bound is part of the
        // data: a replay a day later rejects exactly what this run rejected.
        // Only a record without one falls back to the wall clock.
        self.requirements.not_after_ms = match (self.max_future_ms, f.timestamp_ms) {
            (Some(ahead), Some(t)) => Some(t.saturating_add(ahead)),
            (Some(_), None) => self.wall_not_after,
            (None, _) => None,
        };
        match event::parse(m.payload, &self.requirements) {
            Ok(ev) => self.grouping.push_event(&m, &ev, now),
            Err(err) => {
                self.progress.count_invalid(err.kind);
                if self.invalid_log.allow() {
                    warn!(
                        kind = %err.kind,
                        reason = %err.reason,
                        topic = m.topic,
                        partition = m.partition,
                        offset = m.offset,
                        "invalid message sent to the dead-letter topic"
                    );
                }
                self.grouping.push_invalid(&m, err, now);
            }
        }
    }

    /// Applies the wall-clock rules, collects the work that is ready,
    /// applies grouping's pause and resume changes to the consumer and
    /// brings the counters and gauges up to date.
    fn tick<C: ConsumerContext>(
        &mut self,
        consumer: &BaseConsumer<C>,
        routes: &Routes,
        now: Instant,
    ) {
        self.forward_stored();
        for work in self.grouping.take_work(now) {
            self.push_ready(work);
        }
        let flows = self.grouping.take_flows();
        if !flows.is_empty() {
            apply_flows(consumer, routes, &flows, self.held);
            metrics::gauge!(telemetry::PARTITIONS_PAUSED).set(self.grouping.paused().len() as f64);
        }
        let stats = self.grouping.stats();
        if stats.late > self.late_seen {
            let n = stats.late - self.late_seen;
            metrics::counter!(telemetry::EVENTS_LATE).increment(n);
            self.progress.late.fetch_add(n, Ordering::Relaxed);
            self.late_seen = stats.late;
        }
        if stats.replayed > self.replayed_seen {
            metrics::counter!(telemetry::EVENTS_REPLAYED)
                .increment(stats.replayed - self.replayed_seen);
            self.replayed_seen = stats.replayed;
        }
        // Gauges a few times a second, not once per message.
        if now >= self.gauges_at {
            self.gauges_at = now + GAUGE_INTERVAL;
            self.progress
                .open_windows
                .store(stats.open_windows as u64, Ordering::Relaxed);
            metrics::gauge!(telemetry::WINDOWS_OPEN).set(stats.open_windows as f64);
            metrics::gauge!(telemetry::EVENTS_BUFFERED).set(stats.buffered as f64);
            if let Some(wm) = stats.watermark {
                metrics::gauge!(telemetry::WATERMARK).set(wm as f64 / 1000.0);
            }
        }
    }

    /// Makes closed work ready for delivery. Closures decided by wall clock
    /// are stored first: once a packet they close may be published, a replay
    /// must decide them the same way.
    fn push_ready(&mut self, mut work: Work) {
        work.assignment = self.assignment;
        if self.ledger.failure().is_some() {
            // Nothing more goes out after a failure; the next start
            // replays this work.
            return;
        }
        if !work.record_first.is_empty() {
            if let Err(e) = self.ledger.record_first(&work.record_first) {
                metrics::counter!(telemetry::CHECKPOINT_FAILURES).increment(1);
                self.ledger.fail(format!(
                    "cannot store the window closures decided by wall clock before their packets: {e}"
                ));
                return;
            }
        }
        for batch in &work.batches {
            metrics::counter!(telemetry::BATCHES, "closed_by" => batch.closed_by.as_str())
                .increment(1);
            metrics::histogram!(telemetry::BATCH_EVENTS).record(batch.valid() as f64);
            debug!(
                seq = batch.seq,
                window = ?batch.window,
                valid = batch.valid(),
                closed_by = batch.closed_by.as_str(),
                "batch closed"
            );
        }
        self.ready.push_back(work);
    }

    /// Pauses every assigned partition while closed work waits for delivery
    /// (a slow broker or a retried metrics log), and resumes them when it is
    /// taken. The thread goes on polling meanwhile, so rebalances are served,
    /// `max.poll.interval.ms` is kept, `/healthz` stays alive, and memory does
    /// not grow with messages that could not be delivered anyway. Window
    /// mode's alignment pauses stay as they are.
    fn hold<C: ConsumerContext>(&mut self, consumer: &BaseConsumer<C>, routes: &Routes) {
        let behind = !self.ready.is_empty();
        if behind == self.held {
            return;
        }
        let Ok(assignment) = consumer.assignment() else {
            return;
        };
        // Partitions with queues of their own are held there (what
        // librdkafka prefetched stays); the others only a pause can hold.
        let mut tpl = TopicPartitionList::new();
        let paused = self.grouping.paused();
        for e in assignment.elements() {
            let aligned = paused.contains(&e.partition());
            if behind || !aligned {
                let routed = if behind {
                    routes.hold(e.topic(), e.partition())
                } else {
                    routes.release(e.topic(), e.partition())
                };
                if !routed {
                    tpl.add_partition(e.topic(), e.partition());
                }
            }
        }
        let result = if tpl.count() == 0 {
            Ok(())
        } else if behind {
            consumer.pause(&tpl)
        } else {
            consumer.resume(&tpl)
        };
        match result {
            Ok(()) => {
                self.held = behind;
                self.grouping.hold(behind, Instant::now());
                metrics::gauge!(telemetry::CONSUMPTION_HELD).set(if behind { 1.0 } else { 0.0 });
                if behind {
                    info!(
                        waiting = self.ready.len(),
                        "delivery is behind: consumption paused until it takes the next work"
                    );
                } else {
                    info!("delivery took the waiting work: consumption resumed");
                }
            }
            Err(e) => warn!(error = %e, pause = behind, "cannot change the partitions' flow"),
        }
    }

    /// Offers ready work to delivery, in order. What the channel cannot take
    /// by `until` (at once with `None`) stays ready (see [`Driver::hold`]).
    /// Returns whether nothing is left ready.
    fn dispatch(&mut self, until: Option<Instant>) -> bool {
        while let Some(work) = self.ready.pop_front() {
            if self.ledger.failure().is_some() {
                self.ready.clear();
                break;
            }
            let Some(tx) = &self.to_delivery else {
                self.ready.clear();
                break;
            };
            let taken = match tx.try_send(work) {
                Ok(()) => Ok(()),
                Err(mpsc::error::TrySendError::Closed(_)) => Err(None),
                Err(mpsc::error::TrySendError::Full(work)) => match until {
                    None => Err(Some(work)),
                    Some(t) => {
                        // Cancel-safe: a slot is reserved before the work
                        // moves, so a timeout leaves the work here.
                        let wait = t.saturating_duration_since(Instant::now());
                        let reserve = tokio::time::timeout(wait, tx.reserve());
                        match tokio::runtime::Handle::current().block_on(reserve) {
                            Ok(Ok(permit)) => {
                                permit.send(work);
                                Ok(())
                            }
                            Ok(Err(_)) => Err(None),
                            Err(_) => Err(Some(work)),
                        }
                    }
                },
            };
            match taken {
                Ok(()) => self.ledger.sent(),
                Err(Some(work)) => {
                    self.ready.push_front(work);
                    break;
                }
                Err(None) => {
                    self.ledger
                        .fail("delivery stopped before it took the next work");
                    self.ready.clear();
                    break;
                }
            }
        }
        self.ready.is_empty()
    }

    /// Hands over what must not wait (arrival mode: the open batch, closed
    /// for `reason`; window mode: pending dead letters, never an open window),
    /// then delivers and commits everything in flight — waiting for it as
    /// long as it takes, or, with `until`, no later than that. Returns whether
    /// everything was delivered and settled.
    fn drain<C: ConsumerContext>(
        &mut self,
        consumer: &BaseConsumer<C>,
        reason: CloseReason,
        now: Instant,
        until: Option<Instant>,
    ) -> bool {
        if self.ledger.failure().is_none() {
            self.forward_stored();
            for work in self.grouping.close(reason, now) {
                self.push_ready(work);
            }
        }
        // In slices of at most a second, beating the heart in between: the
        // loop is not turning, but it is correctly waiting.
        let slice = |end: Option<Instant>| {
            let next = Instant::now() + WAIT_SLICE;
            end.map_or(next, |e| e.min(next))
        };
        let passed = |end: Option<Instant>| end.is_some_and(|e| Instant::now() >= e);
        while self.ledger.failure().is_none() && !self.ready.is_empty() {
            self.beat();
            self.dispatch(Some(slice(until)));
            if passed(until) {
                break;
            }
        }
        while self.ledger.failure().is_none() {
            self.beat();
            self.ledger
                .settle(consumer, Wait::Until(slice(until)), false);
            if self.ledger.in_flight() == 0 || passed(until) {
                break;
            }
        }
        self.ready.is_empty() && self.ledger.in_flight() == 0
    }

    fn beat(&self) {
        if let Some(h) = &self.health {
            h.beat(Instant::now());
        }
    }

    /// Delivers and commits what it can for the revoked partitions, within
    /// `revoke_within` (half of `max.poll.interval.ms`): the callback runs
    /// inside `poll`, and a member that does not return to `poll` in time is
    /// expelled from the group. What is not delivered and committed by then
    /// is given up: its offsets stay uncommitted, so whoever reads these
    /// partitions next reads it again.
    fn on_revoke<C: ConsumerContext>(&mut self, consumer: &BaseConsumer<C>) {
        let now = Instant::now();
        let in_flight = self.ledger.in_flight() + self.ready.len();
        info!(
            in_flight,
            "revoke: delivering and committing the work in flight before the partitions go"
        );
        if !self.drain(
            consumer,
            CloseReason::Rebalance,
            now,
            Some(now + self.revoke_within),
        ) {
            let unsent = self.ready.len();
            self.ready.clear();
            let abandoned = self.ledger.abandon_in_flight();
            self.progress
                .revocations_given_up
                .fetch_add(1, Ordering::Relaxed);
            metrics::counter!(telemetry::REVOCATIONS_GIVEN_UP).increment(1);
            warn!(
                waited = %humantime::format_duration(self.revoke_within),
                unsent,
                in_flight = abandoned,
                "revoked while delivery was behind: work not delivered and committed by now is given up; whoever reads these partitions next reads it again"
            );
        } else if in_flight > 0 {
            info!(
                works = in_flight,
                "revocation: work in flight delivered and committed"
            );
        }
        self.ledger.forget_uncommitted();
        self.assignment += 1;
        self.held = false;
        metrics::gauge!(telemetry::CONSUMPTION_HELD).set(0.0);
        self.grouping.reset();
        self.ledger.take_stored();
        if let Some(bound) = &mut self.bound {
            bound.revoke();
        }
        metrics::gauge!(telemetry::PARTITIONS_PAUSED).set(0.0);
    }

    /// Window mode: restores each assigned partition's checkpoint.
    fn on_assign<C: ConsumerContext>(
        &mut self,
        consumer: &BaseConsumer<C>,
        tpl: &TopicPartitionList,
    ) {
        let now = Instant::now();
        if !self.grouping.uses_checkpoints() {
            if let Some(bound) = &mut self.bound {
                let ps: Vec<(i32, Option<i64>)> = tpl
                    .elements()
                    .iter()
                    .map(|e| (e.partition(), None))
                    .collect();
                bound.assign(&ps);
            }
            return;
        }
        let mut by_topic: Vec<(String, Vec<i32>)> = Vec::new();
        for e in tpl.elements() {
            match by_topic.iter_mut().find(|(t, _)| t == e.topic()) {
                Some((_, ps)) => ps.push(e.partition()),
                None => by_topic.push((e.topic().to_string(), vec![e.partition()])),
            }
        }
        for (topic, partitions) in by_topic {
            let committed = offsets::committed(consumer, &topic, &partitions, self.stable_wait);
            let stored = match self.ledger.checkpoints() {
                Some(store) => store.read_latest(&topic, &partitions, self.stable_wait),
                None => Err("window mode has no checkpoint store".to_string()),
            };
            let (committed, stored) = match (committed, stored) {
                (Ok(c), Ok(s)) => (c, s),
                (Err(e), _) => {
                    // Without the checkpoints, lateness could be judged
                    // differently from the original run: stop rather than guess.
                    self.ledger
                        .fail(format!("cannot read the committed offsets of {topic}: {e}"));
                    return;
                }
                (_, Err(e)) => {
                    self.ledger.fail(format!(
                        "cannot read the window checkpoints of {topic}: {e}"
                    ));
                    return;
                }
            };
            let mut claims = Vec::new();
            for p in partitions {
                let committed = committed.get(&p).copied();
                // Where a partition with neither a commit nor a checkpoint
                // starts, so that closures decided before it sends anything
                // have a position to be recorded at.
                let start = match (committed, stored.contains_key(&p)) {
                    (None, false) => consumer
                        .fetch_watermarks(&topic, p, CHECKPOINT_TIMEOUT)
                        .ok()
                        .map(|(low, high)| if self.start_at_end { high } else { low }),
                    _ => committed,
                };
                let restore = checkpoint::resolve(committed, stored.get(&p).cloned());
                let cp = match restore {
                    Restore::From(c) => {
                        info!(topic = %topic, partition = p, offset = c.offset, committed = ?committed, progress_ms = ?c.progress_ms, closed_ms = ?c.closed_ms, emitted_ms = ?c.emitted_ms, closures = c.closures.len(), "window checkpoint restored");
                        Some(c)
                    }
                    Restore::Reset {
                        committed,
                        checkpoint,
                    } => {
                        warn!(topic = %topic, partition = p, committed, checkpoint, "the group's committed offset was moved (not by this service): reading from it without window state, as a reset asks");
                        None
                    }
                    Restore::Stale {
                        committed,
                        checkpoint,
                    } => {
                        warn!(topic = %topic, partition = p, committed, checkpoint, "the committed offset is past the stored window checkpoint; starting this partition without window state (windows at its start may be reported again, partly)");
                        None
                    }
                    Restore::Fresh => None,
                };
                // What reading starts from, claimed under a new epoch.
                let claim = cp.clone().or(start.map(|o| Checkpoint {
                    offset: o,
                    previous: committed,
                    ..Checkpoint::default()
                }));
                claims.extend(claim.map(|c| (p, c)));
                self.grouping.assign(p, cp, start, now);
                let read = self
                    .bound
                    .as_mut()
                    .map(|b| b.assign(&[(p, committed)]))
                    .unwrap_or_default();
                for p in read {
                    self.end_of_range(p, now);
                }
            }
            if let Some(store) = self.ledger.checkpoints() {
                // A few tries: this runs inside the rebalance callback, which
                // must return within the poll interval.
                let mut tries = 1;
                while let Err(e) = store.claim(&topic, &claims) {
                    if tries >= CLAIM_ATTEMPTS {
                        self.ledger.fail(format!(
                            "cannot claim the window checkpoints of {topic} ({tries} attempts): {e}"
                        ));
                        return;
                    }
                    warn!(topic = %topic, error = %e, attempt = tries, "claiming the window checkpoints failed; trying again");
                    tries += 1;
                    std::thread::sleep(Duration::from_secs(1));
                }
            }
        }
    }
}

/// Applies alignment's pause and resume changes: a partition with a queue of
/// its own is held there, unread, with what librdkafka prefetched kept; any
/// other is paused. While consumption is `held` for delivery, resumes wait
/// for [`Driver::hold`] to release it.
fn apply_flows<C: ConsumerContext>(
    consumer: &BaseConsumer<C>,
    routes: &Routes,
    flows: &[Flow],
    held: bool,
) {
    let Some(topic) = consumer
        .assignment()
        .ok()
        .and_then(|a| a.elements().first().map(|e| e.topic().to_string()))
    else {
        return;
    };
    for f in flows {
        let mut tpl = TopicPartitionList::new();
        let (p, pause) = match *f {
            Flow::Pause(p) => (p, true),
            Flow::Resume(p) => (p, false),
        };
        if held && !pause {
            continue;
        }
        let routed = if pause {
            routes.hold(&topic, p)
        } else {
            routes.release(&topic, p)
        };
        if routed {
            debug!(
                partition = p,
                pause, "partition held or released in its queue"
            );
            continue;
        }
        tpl.add_partition(&topic, p);
        let result = if pause {
            consumer.pause(&tpl)
        } else {
            consumer.resume(&tpl)
        };
        match result {
            Ok(()) => debug!(partition = p, pause, "partition flow changed"),
            Err(e) => warn!(partition = p, pause, error = %e, "cannot change a partition's flow"),
        }
    }
}

/// Runs the consumer loop on the current (blocking) thread until `shutdown`
/// or a delivery failure. At shutdown, arrival mode delivers and commits its
/// open batch; window mode delivers what is pending and leaves open windows
/// uncommitted.
pub fn consume(
    k: &KafkaSettings,
    driver: Driver,
    health: Arc<Health>,
    progress: Arc<Progress>,
    shutdown: CancellationToken,
) -> Result<(), String> {
    let mut driver = driver;
    driver.health = Some(health.clone());
    driver.start_at_end = k.auto_offset_reset == crate::settings::OffsetReset::Latest;
    let mut config = crate::kafka::member(k);
    if driver.bound.is_some() {
        // The end of a partition is how a bounded run knows an empty range,
        // or one that ends in transaction markers, is read.
        config.set("enable.partition.eof", "true");
    }
    let context = SourceContext {
        driver: Mutex::new(Some(driver)),
        routes: Routes::default(),
        health: health.clone(),
        progress,
    };
    let consumer: BaseConsumer<SourceContext> = config
        .create_with_context(context)
        .map_err(|e| format!("cannot create the Kafka consumer: {e}"))?;
    consumer
        .subscribe(&[&k.input_topic])
        .map_err(|e| format!("cannot subscribe to {}: {e}", k.input_topic))?;
    info!(topic = %k.input_topic, group = %k.group_id, "consuming");

    // Dropped before the consumer (declared after it).
    let mut fetch = FetchQueue::new(&consumer, &consumer.context().routes);
    // One clock read per turn.
    let mut timeout = MAX_POLL;
    let mut clock_at = Instant::now();
    let mut last_arrival = clock_at;
    if let Some(d) = lock(&consumer).as_mut() {
        d.refresh_clock();
    }
    while !shutdown.is_cancelled() {
        if let Some(reason) = kafka::fatal(consumer.client()) {
            // Fenced, say: this member's partitions belong to another now, so
            // nothing in flight may be committed and nothing is waited for.
            error!(reason = %reason, "stopping: the consumer cannot go on");
            drop(lock(&consumer).take());
            health.stopped();
            return Err(reason);
        }
        // Rebalances, errors and commit results, and the messages of any
        // partition that could not be routed to `fetch`.
        let polled = consumer.poll(Duration::ZERO);
        let mut arrived = matches!(polled, Some(Ok(_)));
        let wait = if polled.is_some() {
            Duration::ZERO
        } else {
            timeout
        };
        let max = lock(&consumer)
            .as_ref()
            .map_or(FETCH_MAX, Driver::fetch_max);
        let fetched = fetch.fetch(wait, max);
        arrived |= !fetched.is_empty();
        let now = Instant::now();
        health.beat(now);
        let mut guard = lock(&consumer);
        let Some(driver) = guard.as_mut() else {
            break;
        };
        if now.duration_since(clock_at) >= Duration::from_secs(1) {
            driver.refresh_clock();
            clock_at = now;
        }
        // Errors were already reported through the context's error callback.
        match &polled {
            Some(Ok(m)) => driver.on_message(m, now),
            Some(Err(KafkaError::PartitionEOF(p))) => driver.on_partition_eof(*p, now),
            _ => {}
        }
        if !fetched.is_empty() {
            driver.on_fetched(&fetched, now);
        }
        drop(fetched);
        driver.tick(&consumer, &consumer.context().routes, now);
        // Already held: offer the work again without waiting, and go on
        // polling. Otherwise wait a little for delivery to take it.
        let wait = (!driver.held).then(|| now + HOLD_AFTER);
        driver.dispatch(wait);
        driver.hold(&consumer, &consumer.context().routes);
        if arrived {
            last_arrival = now;
        }
        // Held for delivery, the stream still flows: what delivery takes
        // meanwhile is committed in the usual intervals.
        let flowing = driver.held || now.duration_since(last_arrival) < QUIET_AFTER;
        driver.ledger.settle(&consumer, Wait::No, flowing);
        if let Some(reason) = driver.ledger.failure() {
            error!(reason = %reason, "stopping: work could not be delivered and is not committed");
            break;
        }
        timeout = driver.poll_timeout(now);
        if driver.held {
            timeout = timeout.min(HELD_RETRY);
        }
        if driver.ledger.in_flight() > 0 || driver.ledger.uncommitted() {
            // Acknowledgements arrive on a channel the fetch cannot wait on:
            // look again soon, so a quiet stream commits its last work
            // promptly.
            timeout = timeout.min(ACK_POLL);
        }
        if driver.range_read() {
            info!("the range is read: closing every window, delivering and committing");
            break;
        }
    }

    let mut driver = lock(&consumer).take().expect("driver present until here");
    let now = Instant::now();
    if driver.range_read() && driver.ledger.failure().is_none() {
        driver.forward_stored();
        for work in driver.grouping.finish(now) {
            driver.push_ready(work);
        }
    }
    driver.drain(&consumer, CloseReason::Shutdown, now, None);
    driver.to_delivery = None;
    // Nothing stays open or buffered in this process after the run; the
    // scrape of a process kept alive (demo --serve) must say so.
    driver.progress.open_windows.store(0, Ordering::Relaxed);
    metrics::gauge!(telemetry::WINDOWS_OPEN).set(0.0);
    metrics::gauge!(telemetry::EVENTS_BUFFERED).set(0.0);
    metrics::gauge!(telemetry::PARTITIONS_PAUSED).set(0.0);
    health.stopped();
    match driver.ledger.failure() {
        Some(reason) => Err(reason.to_string()),
        None if driver.ledger.uncommitted() => Err(
            "delivered work could not be committed; the next start replays it (with the same packet ids in window mode)"
                .to_string(),
        ),
        None => {
            info!("all work delivered and committed");
            Ok(())
        }
    }
}

fn lock(consumer: &BaseConsumer<SourceContext>) -> std::sync::MutexGuard<'_, Option<Driver>> {
    consumer.context().driver.lock().expect("driver lock")
}

/// The group's committed offsets on partitions `0..partitions` of the input
/// topic (-1 where nothing is committed), for tests and tools.
pub fn committed_offsets(
    k: &KafkaSettings,
    partitions: i32,
    timeout: Duration,
) -> KafkaResult<Vec<i64>> {
    let consumer: BaseConsumer = crate::kafka::consumer(k).create()?;
    let mut tpl = rdkafka::TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition(&k.input_topic, p);
    }
    let committed = consumer.committed_offsets(tpl, timeout)?;
    Ok((0..partitions)
        .map(|p| {
            match committed
                .find_partition(&k.input_topic, p)
                .map(|e| e.offset())
            {
                Some(rdkafka::Offset::Offset(o)) => o,
                _ => -1,
            }
        })
        .collect())
}
