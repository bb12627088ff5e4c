//! Fetching in bulk: each input partition's messages are routed to a queue
//! of the service's own and taken from those queues thousands at a time.
//!
//! `BaseConsumer::poll` hands over one message per call, and every call pays
//! for an event object, a reference count, clock reads and the consumer
//! thread's bookkeeping around it: at a million messages a second that is
//! most of a core. librdkafka can hand over a whole array of messages at once
//! (`rd_kafka_consume_batch_queue`); this module wraps it so that no raw
//! pointer escapes. Messages are borrowed from a [`Fetched`], which gives
//! them back to librdkafka when it is dropped.
//!
//! Routing: when librdkafka starts fetching an assigned partition it forwards
//! the partition's queue to the consumer queue, unless the application has
//! routed it elsewhere; when it stops fetching (revocation) it clears the
//! route. So each partition is routed again on every assignment, before it is
//! assigned: [`Routes::route`] is called from the rebalance callback before
//! `assign`. Rebalances, errors and commit results stay on the consumer
//! queue, which `BaseConsumer::poll` must still serve every turn.
//!
//! One queue per partition: a partition can be left unread
//! ([`Routes::hold`]) without pausing it. Pausing makes librdkafka drop what
//! it had prefetched (and fetch and decompress it again after the resume);
//! a held partition's messages wait in its queue instead, and librdkafka
//! stops fetching it once that queue holds its prefetch limit
//! (`queued.min.messages`, `queued.max.messages.kbytes`, which apply per
//! queue when partitions have queues of their own). A fetch takes from the
//! partitions not held, in turn; it waits on a signal that librdkafka gives
//! when a queue receives messages while empty.
//!
//! What librdkafka guarantees stays true: messages of one partition come in
//! offset order; messages fetched before a revocation, a pause or a seek and
//! not yet handed over are discarded by librdkafka's version barriers (the
//! same as on the consumer queue), and the next fetch resumes after the last
//! message handed over.

use std::collections::BTreeMap;
use std::ffi::{c_void, CStr, CString};
use std::marker::PhantomData;
use std::ptr::NonNull;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use rdkafka::bindings as rd;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::KafkaError;
use rdkafka::TopicPartitionList;

/// How many messages one fetch takes at most. Large enough that per-call
/// costs vanish, small enough that a fetch is a few milliseconds of work.
pub const FETCH_MAX: usize = 4096;

/// A librdkafka queue handle, owned.
struct QueuePtr(NonNull<rd::rd_kafka_queue_t>);

// SAFETY: librdkafka queues are thread-safe; the handle is only a pointer.
unsafe impl Send for QueuePtr {}

impl Drop for QueuePtr {
    fn drop(&mut self) {
        // SAFETY: a handle this module created and owns; destroyed once.
        unsafe { rd::rd_kafka_queue_destroy(self.0.as_ptr()) };
    }
}

/// Set by librdkafka's threads when a partition queue receives messages
/// while empty; waited on by the fetch.
#[derive(Default)]
struct Signal {
    arrived: Mutex<bool>,
    cond: Condvar,
}

impl Signal {
    fn notify(&self) {
        *self.arrived.lock().unwrap_or_else(|e| e.into_inner()) = true;
        self.cond.notify_one();
    }

    /// Waits until notified or `timeout`; clears the notification.
    fn wait(&self, timeout: Duration) {
        let guard = self.arrived.lock().unwrap_or_else(|e| e.into_inner());
        let (mut arrived, _) = self
            .cond
            .wait_timeout_while(guard, timeout, |a| !*a)
            .unwrap_or_else(|e| e.into_inner());
        *arrived = false;
    }

    fn clear(&self) {
        *self.arrived.lock().unwrap_or_else(|e| e.into_inner()) = false;
    }
}

/// librdkafka's callback for a queue that received an element while empty.
unsafe extern "C" fn on_arrival(_: *mut rd::rd_kafka_t, opaque: *mut c_void) {
    // SAFETY: `opaque` is the `Signal` of the `Shared` that owns the queue;
    // the callback is disabled before that `Shared` is dropped.
    let signal = unsafe { &*(opaque as *const Signal) };
    signal.notify();
}

/// The queues of a live [`FetchQueue`].
struct Shared {
    /// Per (topic, partition): its queue, and whether it is held.
    queues: BTreeMap<(String, i32), (QueuePtr, bool)>,
    signal: Arc<Signal>,
}

impl Drop for Shared {
    fn drop(&mut self) {
        for (q, _) in self.queues.values() {
            // SAFETY: the queue is live; no callback runs after this returns.
            unsafe { rd::rd_kafka_queue_cb_event_enable(q.0.as_ptr(), None, std::ptr::null_mut()) };
        }
    }
}

/// Where the consumer context finds the partition queues to route partitions
/// to. Set while a [`FetchQueue`] lives, empty otherwise.
#[derive(Default)]
pub struct Routes {
    shared: Mutex<Option<Shared>>,
}

impl Routes {
    /// Routes the messages of `partitions` to queues of their own, if a
    /// [`FetchQueue`] lives. Returns how many partitions were routed; a
    /// partition that is not (no fetch queue, or librdkafka does not know
    /// it) is consumed through the consumer queue, whole, as
    /// `BaseConsumer::poll` messages.
    pub fn route<C: ConsumerContext>(
        &self,
        consumer: &BaseConsumer<C>,
        partitions: &TopicPartitionList,
    ) -> usize {
        let mut guard = self.shared.lock().expect("routes lock");
        let Some(shared) = guard.as_mut() else {
            return 0;
        };
        let rk = consumer.client().native_ptr();
        let mut routed = 0;
        for e in partitions.elements() {
            let Ok(topic) = CString::new(e.topic()) else {
                continue;
            };
            let key = (e.topic().to_string(), e.partition());
            if !shared.queues.contains_key(&key) {
                // SAFETY: a new queue on the live consumer's handle, whose
                // arrival callback gets the `Signal` kept alive by `shared`.
                let queue = unsafe {
                    let raw = rd::rd_kafka_queue_new(rk);
                    let q =
                        QueuePtr(NonNull::new(raw).expect("librdkafka allocates queues or aborts"));
                    rd::rd_kafka_queue_cb_event_enable(
                        q.0.as_ptr(),
                        Some(on_arrival),
                        Arc::as_ptr(&shared.signal) as *mut c_void,
                    );
                    q
                };
                shared.queues.insert(key.clone(), (queue, false));
            }
            let (queue, held) = shared.queues.get_mut(&key).expect("inserted");
            // A new assignment starts unheld: grouping starts it afresh.
            *held = false;
            // SAFETY: `rk` is the live consumer's handle; the partition queue
            // handle is destroyed right after forwarding (the forward holds
            // its own reference to the destination).
            unsafe {
                let pq = rd::rd_kafka_queue_get_partition(rk, topic.as_ptr(), e.partition());
                if pq.is_null() {
                    continue;
                }
                rd::rd_kafka_queue_forward(pq, queue.0.as_ptr());
                rd::rd_kafka_queue_destroy(pq);
            }
            routed += 1;
        }
        routed
    }

    /// Leaves a partition's messages in its queue until [`Routes::release`].
    /// Returns false for a partition without a queue of its own (consumed
    /// through the consumer queue), which only a pause can hold.
    pub fn hold(&self, topic: &str, partition: i32) -> bool {
        self.set_held(topic, partition, true)
    }

    /// Takes a held partition's messages again.
    pub fn release(&self, topic: &str, partition: i32) -> bool {
        self.set_held(topic, partition, false)
    }

    fn set_held(&self, topic: &str, partition: i32, held: bool) -> bool {
        let mut guard = self.shared.lock().expect("routes lock");
        let Some(shared) = guard.as_mut() else {
            return false;
        };
        match shared.queues.get_mut(&(topic.to_string(), partition)) {
            Some((_, h)) => {
                *h = held;
                if !held {
                    // Its messages may have waited all along: look at once.
                    shared.signal.notify();
                }
                true
            }
            None => false,
        }
    }
}

/// Takes messages from the partitions' queues. Lives no longer than the
/// consumer it was made from (`'c`).
pub struct FetchQueue<'c> {
    routes: &'c Routes,
    signal: Arc<Signal>,
    slots: Vec<*mut rd::rd_kafka_message_t>,
    /// Where the next fetch starts among the partitions, so that a full
    /// fetch from one partition does not starve the others.
    turn: usize,
    _consumer: PhantomData<&'c ()>,
}

impl<'c> FetchQueue<'c> {
    /// A new fetch for `consumer`, registered in `routes` (normally the
    /// consumer's own context) so that assignments route to its queues.
    pub fn new<C: ConsumerContext>(_consumer: &'c BaseConsumer<C>, routes: &'c Routes) -> Self {
        let signal = Arc::new(Signal::default());
        *routes.shared.lock().expect("routes lock") = Some(Shared {
            queues: BTreeMap::new(),
            signal: signal.clone(),
        });
        FetchQueue {
            routes,
            signal,
            slots: Vec::with_capacity(FETCH_MAX),
            turn: 0,
            _consumer: PhantomData,
        }
    }

    /// Takes up to `max` messages (at most [`FETCH_MAX`]) from the partitions
    /// not held, waiting at most `timeout` for some.
    pub fn fetch(&mut self, timeout: Duration, max: usize) -> Fetched<'_> {
        self.slots.clear();
        let max = max.clamp(1, FETCH_MAX);
        let deadline = Instant::now() + timeout;
        loop {
            // Cleared before looking, so an arrival after the look is not missed.
            self.signal.clear();
            self.take(max);
            if !self.slots.is_empty() || Instant::now() >= deadline {
                break;
            }
            self.signal
                .wait(deadline.saturating_duration_since(Instant::now()));
        }
        let mut messages = Vec::with_capacity(self.slots.len());
        let mut topic: (*mut rd::rd_kafka_topic_t, &str) = (std::ptr::null_mut(), "");
        for &m in &self.slots {
            // SAFETY: each entry is a live message until destroyed in
            // `Fetched::drop`, which the borrows handed out cannot outlive.
            let m = unsafe { &*m };
            if m.rkt != topic.0 {
                let name = unsafe { CStr::from_ptr(rd::rd_kafka_topic_name(m.rkt)) };
                topic = (m.rkt, name.to_str().unwrap_or(""));
            }
            let bytes = |ptr: *mut std::ffi::c_void, len: usize| -> Option<&[u8]> {
                (!ptr.is_null())
                    .then(|| unsafe { std::slice::from_raw_parts(ptr as *const u8, len) })
            };
            let error =
                (m.err != rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR).then_some(m.err);
            let mut kind = rd::rd_kafka_timestamp_type_t::RD_KAFKA_TIMESTAMP_NOT_AVAILABLE;
            // SAFETY: a live message, as above.
            let ts = unsafe { rd::rd_kafka_message_timestamp(m, &mut kind) };
            messages.push(Fetch {
                topic: topic.1,
                partition: m.partition,
                offset: m.offset,
                key: bytes(m.key, m.key_len),
                payload: bytes(m.payload, m.len).unwrap_or_default(),
                timestamp_ms: (ts >= 0).then_some(ts),
                error,
            });
        }
        Fetched {
            slots: &mut self.slots,
            messages,
        }
    }

    /// Appends to `slots` what the unheld partitions' queues hold now, up to
    /// `max` in all, one partition after the other from this fetch's turn.
    fn take(&mut self, max: usize) {
        let guard = self.routes.shared.lock().expect("routes lock");
        let Some(shared) = guard.as_ref() else {
            return;
        };
        let queues: Vec<&QueuePtr> = shared
            .queues
            .values()
            .filter(|(_, held)| !held)
            .map(|(q, _)| q)
            .collect();
        if queues.is_empty() {
            return;
        }
        self.turn = (self.turn + 1) % queues.len();
        for i in 0..queues.len() {
            let have = self.slots.len();
            if have >= max {
                break;
            }
            let q = queues[(self.turn + i) % queues.len()];
            // SAFETY: the array has room for FETCH_MAX pointers (max <=
            // FETCH_MAX); librdkafka writes `n` of them after the `have`
            // already there and hands their ownership to us.
            let n = unsafe {
                rd::rd_kafka_consume_batch_queue(
                    q.0.as_ptr(),
                    0,
                    self.slots.as_mut_ptr().add(have),
                    max - have,
                )
            };
            // SAFETY: librdkafka initialised the `n` entries after `have`
            // (-1, an invalid argument, yields nothing).
            unsafe {
                self.slots
                    .set_len(have + n.clamp(0, (max - have) as isize) as usize)
            };
        }
    }
}

impl Drop for FetchQueue<'_> {
    fn drop(&mut self) {
        // The queues and their callbacks go with `Shared`; the consumer
        // outlives `self` ('c); messages were all destroyed with their `Fetched`.
        *self.routes.shared.lock().expect("routes lock") = None;
    }
}

/// One fetch's messages, borrowed from librdkafka until this is dropped.
pub struct Fetched<'q> {
    slots: &'q mut Vec<*mut rd::rd_kafka_message_t>,
    messages: Vec<Fetch<'q>>,
}

impl Fetched<'_> {
    pub fn messages(&self) -> &[Fetch<'_>] {
        &self.messages
    }

    pub fn len(&self) -> usize {
        self.messages.len()
    }

    pub fn is_empty(&self) -> bool {
        self.messages.is_empty()
    }
}

impl Drop for Fetched<'_> {
    fn drop(&mut self) {
        self.messages.clear();
        for m in self.slots.drain(..) {
            // SAFETY: handed to us by rd_kafka_consume_batch_queue, destroyed once.
            unsafe { rd::rd_kafka_message_destroy(m) };
        }
    }
}

/// One fetched message.
#[derive(Debug, Clone, Copy)]
pub struct Fetch<'a> {
    pub topic: &'a str,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<&'a [u8]>,
    /// The payload, empty for a message without one.
    pub payload: &'a [u8],
    /// The record's timestamp (create or log-append time), when it has one.
    pub timestamp_ms: Option<i64>,
    error: Option<rd::rd_kafka_resp_err_t>,
}

impl<'a> Fetch<'a> {
    /// A message given over some other way (the consumer queue).
    pub fn new(
        topic: &'a str,
        partition: i32,
        offset: i64,
        key: Option<&'a [u8]>,
        payload: &'a [u8],
        timestamp_ms: Option<i64>,
    ) -> Self {
        Fetch {
            topic,
            partition,
            offset,
            key,
            payload,
            timestamp_ms,
            error: None,
        }
    }

    /// librdkafka's event that the consumer reached the partition's end
    /// (with `enable.partition.eof`); its offset is that end.
    pub fn is_partition_eof(&self) -> bool {
        self.error == Some(rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR__PARTITION_EOF)
    }

    /// A consumption error librdkafka reported in place of a message.
    pub fn error(&self) -> Option<KafkaError> {
        self.error.map(|e| KafkaError::MessageConsumption(e.into()))
    }
}

/// A consumer context that only routes assigned partitions to the fetch
/// queue, as the service's context does: for a bare consumer that reads with
/// [`FetchQueue`] (the consume-only ceiling, tests).
#[derive(Default)]
pub struct RoutingContext {
    pub routes: Routes,
}

impl rdkafka::ClientContext for RoutingContext {}

impl ConsumerContext for RoutingContext {
    fn pre_rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        rebalance: &rdkafka::consumer::Rebalance<'_>,
    ) {
        if let rdkafka::consumer::Rebalance::Assign(tpl) = rebalance {
            self.routes.route(consumer, tpl);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::config::ClientConfig;
    use rdkafka::mocking::MockCluster;
    use rdkafka::producer::{BaseProducer, BaseRecord, Producer};

    type Ctx = RoutingContext;

    /// How many turns (of at most 100 ms) a read may take before the test
    /// fails: a lost route leaves the messages unread, never misread.
    const TURNS: usize = 600;

    /// Reads until every partition has `per_partition` messages; returns each
    /// partition's offsets in the order read, how many messages came through
    /// `poll` instead, and the largest fetch.
    fn read_all(
        consumer: &BaseConsumer<Ctx>,
        fetch: &mut FetchQueue<'_>,
        per_partition: usize,
    ) -> (Vec<Vec<i64>>, usize, usize) {
        let mut seen = vec![Vec::new(); 2];
        let (mut polled, mut largest) = (0, 0);
        for _ in 0..TURNS {
            if seen.iter().all(|s| s.len() >= per_partition) {
                break;
            }
            if let Some(Ok(_)) = consumer.poll(Duration::ZERO) {
                polled += 1;
            }
            let fetched = fetch.fetch(Duration::from_millis(100), FETCH_MAX);
            largest = largest.max(fetched.len());
            for m in fetched.messages() {
                assert!(m.error().is_none());
                assert_eq!(m.topic, "t");
                assert_eq!(
                    m.payload,
                    format!("{}/{}", m.partition, m.offset).as_bytes()
                );
                seen[m.partition as usize].push(m.offset);
            }
        }
        (seen, polled, largest)
    }

    /// Routes like [`RoutingContext`] and keeps the messages librdkafka
    /// received from the broker per partition (its statistics).
    #[derive(Default)]
    struct Counting {
        routes: Routes,
        received: Mutex<BTreeMap<i32, i64>>,
    }

    impl rdkafka::ClientContext for Counting {
        fn stats(&self, stats: rdkafka::Statistics) {
            let mut received = self.received.lock().unwrap();
            for t in stats.topics.values() {
                for (p, s) in &t.partitions {
                    if *p >= 0 {
                        received.insert(*p, s.rxmsgs as i64);
                    }
                }
            }
        }
    }

    impl ConsumerContext for Counting {
        fn pre_rebalance(
            &self,
            consumer: &BaseConsumer<Self>,
            rebalance: &rdkafka::consumer::Rebalance<'_>,
        ) {
            if let rdkafka::consumer::Rebalance::Assign(tpl) = rebalance {
                self.routes.route(consumer, tpl);
            }
        }
    }

    /// A held partition is not read while the others are, and after its
    /// release it is read on in order, from what librdkafka had already
    /// received: nothing is fetched from the broker twice (a pause would
    /// drop the prefetched messages and fetch them again).
    #[test]
    fn a_held_partition_waits_in_its_queue_and_is_not_fetched_again() {
        const N: i64 = 5000;
        let cluster = MockCluster::new(1).unwrap();
        cluster.create_topic("t", 2, 1).unwrap();
        let producer: BaseProducer = ClientConfig::new()
            .set("bootstrap.servers", cluster.bootstrap_servers())
            .create()
            .unwrap();
        for p in 0..2 {
            for o in 0..N {
                let payload = format!("{p}/{o}");
                producer
                    .send(BaseRecord::<(), _>::to("t").partition(p).payload(&payload))
                    .unwrap();
            }
        }
        producer.flush(Duration::from_secs(30)).unwrap();
        let consumer: BaseConsumer<Counting> = ClientConfig::new()
            .set("bootstrap.servers", cluster.bootstrap_servers())
            .set("group.id", "hold-test")
            .set("auto.offset.reset", "earliest")
            .set("enable.auto.commit", "false")
            .set("statistics.interval.ms", "1000")
            .create_with_context(Counting::default())
            .unwrap();
        let routes = &consumer.context().routes;
        let mut fetch = FetchQueue::new(&consumer, routes);
        consumer.subscribe(&["t"]).unwrap();
        let mut seen = vec![Vec::new(); 2];
        let read = |fetch: &mut FetchQueue<'_>, seen: &mut Vec<Vec<i64>>| {
            consumer.poll(Duration::ZERO);
            for m in fetch.fetch(Duration::from_millis(100), 100).messages() {
                seen[m.partition as usize].push(m.offset);
            }
        };
        let mut turns = 0;
        while seen[0].is_empty() {
            read(&mut fetch, &mut seen);
            turns += 1;
            assert!(turns < TURNS, "partition 0 never read");
        }
        assert!(routes.hold("t", 0));
        let held_at = seen[0].len();
        while (seen[1].len() as i64) < N {
            read(&mut fetch, &mut seen);
            turns += 1;
            assert!(turns < 2 * TURNS, "partition 1 not read to its end");
        }
        assert_eq!(seen[0].len(), held_at, "a held partition is not read");
        assert!(routes.release("t", 0));
        while (seen[0].len() as i64) < N {
            read(&mut fetch, &mut seen);
            turns += 1;
            assert!(
                turns < 3 * TURNS,
                "partition 0 not read to its end after its release"
            );
        }
        let expected: Vec<i64> = (0..N).collect();
        assert_eq!(seen[0], expected, "every offset once, in order");
        assert_eq!(seen[1], expected);
        // The statistics after the last fetch: what came from the broker.
        let mut received = BTreeMap::new();
        for _ in 0..TURNS {
            consumer.poll(Duration::from_millis(50));
            received = consumer.context().received.lock().unwrap().clone();
            if received.values().all(|r| *r >= N) && received.len() == 2 {
                break;
            }
        }
        assert_eq!(
            received,
            BTreeMap::from([(0, N), (1, N)]),
            "each message fetched once"
        );
    }

    #[test]
    fn assigned_partitions_are_fetched_in_bulk_in_order_and_again_after_reassignment() {
        let cluster = MockCluster::new(1).unwrap();
        cluster.create_topic("t", 2, 1).unwrap();
        let producer: BaseProducer = ClientConfig::new()
            .set("bootstrap.servers", cluster.bootstrap_servers())
            .create()
            .unwrap();
        for p in 0..2 {
            for o in 0..1000 {
                let payload = format!("{p}/{o}");
                producer
                    .send(BaseRecord::<(), _>::to("t").partition(p).payload(&payload))
                    .unwrap();
            }
        }
        producer.flush(Duration::from_secs(30)).unwrap();
        let consumer: BaseConsumer<Ctx> = ClientConfig::new()
            .set("bootstrap.servers", cluster.bootstrap_servers())
            .set("group.id", "fetch-test")
            .set("auto.offset.reset", "earliest")
            .set("enable.auto.commit", "false")
            .create_with_context(Ctx::default())
            .unwrap();
        let mut fetch = FetchQueue::new(&consumer, &consumer.context().routes);
        let expected: Vec<i64> = (0..1000).collect();
        for round in 0..2 {
            consumer.subscribe(&["t"]).unwrap();
            let (seen, polled, largest) = read_all(&consumer, &mut fetch, 1000);
            for s in &seen {
                assert_eq!(s, &expected, "round {round}: every offset once, in order");
            }
            assert_eq!(
                polled, 0,
                "round {round}: no message outside the fetch queue"
            );
            assert!(largest > 1, "round {round}: fetched one message at a time");
            // Giving the partitions up clears librdkafka's route; the next
            // assignment (nothing was committed: from the start) routes again.
            consumer.unsubscribe();
            for _ in 0..TURNS {
                consumer.poll(Duration::from_millis(100));
                if consumer.assignment().unwrap().count() == 0 {
                    break;
                }
            }
        }
    }
}
