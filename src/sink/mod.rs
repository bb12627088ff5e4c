//! The sinks: the delivery stage ([`delivery`]) that analyses closed work and
//! hands its packets and dead letters to the Kafka publisher ([`publisher`])
//! and its packets to the local metrics log ([`metrics_log`]).

pub mod delivery;
pub mod metrics_log;
pub mod publisher;
