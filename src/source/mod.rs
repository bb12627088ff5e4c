//! The source: the thread that owns the Kafka consumer ([`consumer`]), its
//! bulk fetching from per-partition queues ([`fetch`]), and rebalance
//! handling.

pub mod consumer;
pub mod fetch;
