//! Fetching in bulk: the input partitions' messages are routed to a queue of
//! the service's own and taken from it thousands at a time.
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
//! What librdkafka guarantees stays true: messages of one partition come in
//! offset order; messages fetched before a revocation, a pause or a seek and
//! not yet handed over are discarded by librdkafka's version barriers (the
//! same as on the consumer queue), and the next fetch resumes after the last
//! message handed over.

use std::ffi::{CStr, CString};
use std::marker::PhantomData;
use std::ptr::NonNull;
use std::sync::Mutex;
use std::time::Duration;

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

/// Where the consumer context finds the fetch queue to route partitions to.
/// Set while a [`FetchQueue`] lives, empty otherwise.
#[derive(Default)]
pub struct Routes {
    queue: Mutex<Option<QueuePtr>>,
}

impl Routes {
    /// Routes the messages of `partitions` to the fetch queue, if one lives.
    /// Returns how many partitions were routed; a partition that is not
    /// (no fetch queue, or librdkafka does not know it) is consumed through
    /// the consumer queue, whole, as `BaseConsumer::poll` messages.
    pub fn route<C: ConsumerContext>(
        &self,
        consumer: &BaseConsumer<C>,
        partitions: &TopicPartitionList,
    ) -> usize {
        let guard = self.queue.lock().expect("routes lock");
        let Some(queue) = guard.as_ref() else {
            return 0;
        };
        let rk = consumer.client().native_ptr();
        let mut routed = 0;
        for e in partitions.elements() {
            let Ok(topic) = CString::new(e.topic()) else {
                continue;
            };
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
}

/// The queue the input partitions are routed to. Lives no longer than the
/// consumer it was made from (`'c`).
pub struct FetchQueue<'c> {
    routes: &'c Routes,
    queue: NonNull<rd::rd_kafka_queue_t>,
    slots: Vec<*mut rd::rd_kafka_message_t>,
    _consumer: PhantomData<&'c ()>,
}

impl<'c> FetchQueue<'c> {
    /// A new queue for `consumer`, registered in `routes` (normally the
    /// consumer's own context) so that assignments route to it.
    pub fn new<C: ConsumerContext>(consumer: &'c BaseConsumer<C>, routes: &'c Routes) -> Self {
        // SAFETY: a new queue on the live consumer's handle.
        let raw = unsafe { rd::rd_kafka_queue_new(consumer.client().native_ptr()) };
        let queue = NonNull::new(raw).expect("librdkafka allocates queues or aborts");
        *routes.queue.lock().expect("routes lock") = Some(QueuePtr(queue));
        FetchQueue {
            routes,
            queue,
            slots: Vec::with_capacity(FETCH_MAX),
            _consumer: PhantomData,
        }
    }

    /// Takes up to `max` messages (at most [`FETCH_MAX`]), waiting at most
    /// `timeout` for them (returning sooner only when the batch is full).
    pub fn fetch(&mut self, timeout: Duration, max: usize) -> Fetched<'_> {
        self.slots.clear();
        let max = max.clamp(1, FETCH_MAX);
        let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: the array has room for FETCH_MAX pointers; librdkafka
        // writes `n` of them and hands their ownership to us.
        let n = unsafe {
            rd::rd_kafka_consume_batch_queue(self.queue.as_ptr(), ms, self.slots.as_mut_ptr(), max)
        };
        // SAFETY: librdkafka initialised the first `n` entries (n <= max <=
        // FETCH_MAX, the capacity); -1 (an invalid argument) yields nothing.
        unsafe { self.slots.set_len(n.clamp(0, max as isize) as usize) };
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
            messages.push(Fetch {
                topic: topic.1,
                partition: m.partition,
                offset: m.offset,
                key: bytes(m.key, m.key_len),
                payload: bytes(m.payload, m.len).unwrap_or_default(),
                error,
            });
        }
        Fetched {
            slots: &mut self.slots,
            messages,
        }
    }
}

impl Drop for FetchQueue<'_> {
    fn drop(&mut self) {
        *self.routes.queue.lock().expect("routes lock") = None;
        // SAFETY: the consumer outlives `self` ('c); messages were all
        // destroyed with their `Fetched`.
        unsafe { rd::rd_kafka_queue_destroy(self.queue.as_ptr()) };
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
    ) -> Self {
        Fetch {
            topic,
            partition,
            offset,
            key,
            payload,
            error: None,
        }
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
