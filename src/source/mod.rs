//! The source: the thread that owns the Kafka consumer ([`consumer`]), its
//! bulk fetching from per-partition queues ([`fetch`]), rebalance handling,
//! and the range of a bounded run ([`range`]).

pub mod consumer;
pub mod fetch;
pub mod range;
