//! The group's packets for the dashboard (`scale.merge`): each instance
//! publishes the windows it merged, so its own hook sees only those. A
//! reader of the output topic, in no consumer group and committing nothing,
//! feeds every packet the group publishes into the dashboard instead,
//! starting with the last ones the dashboard keeps.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message as _;
use rdkafka::{Offset, TopicPartitionList};
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::core::packet::Packet;
use crate::kafka::{self, KafkaContext, KafkaSettings};
use crate::telemetry::LogLimit;
use crate::web::dashboard::PacketStore;

/// Reads the output topic into `store` until `stop`, on the calling thread.
/// A packet published again (at least once) is shown once.
pub fn follow(k: &KafkaSettings, store: Arc<PacketStore>, last: usize, stop: CancellationToken) {
    let mut c = kafka::consumer(k);
    // Assigned, never subscribed: the group id only names the client.
    c.set("group.id", format!("{}-dashboard", k.group_id))
        .set("isolation.level", "read_committed");
    let consumer: BaseConsumer<KafkaContext> =
        match c.create_with_context(KafkaContext("dashboard reader")) {
            Ok(c) => c,
            Err(e) => {
                warn!(error = %e, "the dashboard cannot read the group's packets");
                return;
            }
        };
    let topic = k.output_topic.as_str();
    let errors = LogLimit::new("dashboard reader errors", 5, Duration::from_secs(60));
    let partitions = loop {
        match consumer.fetch_metadata(Some(topic), Duration::from_secs(10)) {
            Ok(md) => {
                let n = md.topics().first().map_or(0, |t| t.partitions().len());
                if n > 0 {
                    break n as i32;
                }
            }
            Err(e) if errors.allow() => {
                warn!(error = %e, "the dashboard cannot read the output topic's metadata yet")
            }
            Err(_) => {}
        }
        if stop.is_cancelled() {
            return;
        }
        std::thread::sleep(Duration::from_secs(1));
    };
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        let _ = tpl.add_partition_offset(topic, p, Offset::OffsetTail(last as i64));
    }
    if let Err(e) = consumer.assign(&tpl) {
        warn!(error = %e, "the dashboard cannot read the output topic");
        return;
    }
    let mut seen: HashSet<String> = HashSet::new();
    let mut order: VecDeque<String> = VecDeque::new();
    while !stop.is_cancelled() {
        let m = match consumer.poll(Duration::from_millis(200)) {
            None => continue,
            Some(Err(e)) => {
                if errors.allow() {
                    warn!(error = %e, "dashboard reader error");
                }
                continue;
            }
            Some(Ok(m)) => m,
        };
        let Some(packet) = m
            .payload()
            .and_then(|p| serde_json::from_slice::<Packet>(p).ok())
        else {
            continue;
        };
        if !seen.insert(packet.packet_id.clone()) {
            continue;
        }
        order.push_back(packet.packet_id.clone());
        if order.len() > 4 * last.max(1) {
            if let Some(old) = order.pop_front() {
                seen.remove(&old);
            }
        }
        store.push(&packet);
    }
}
