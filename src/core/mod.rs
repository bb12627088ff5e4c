//! The pure core: every decision about the data, synchronous, with no Kafka,
//! tokio or HTTP type in it. Event parsing ([`event`]), grouping into
//! arrival batches or event-time windows ([`grouping`]), duplicate counting
//! with Polars ([`analysis`]), packet building ([`packet`]) and
//! pseudonymization ([`privacy`]); and the merge of each window's shares from
//! the partitions of a group's instances ([`merge`]).

pub mod analysis;
pub mod event;
pub mod grouping;
pub mod merge;
pub mod packet;
pub mod privacy;
