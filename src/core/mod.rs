//! The pure core: every decision about the data, synchronous, with no Kafka,
//! tokio or HTTP type in it. Event parsing ([`event`]), grouping into
//! arrival batches or event-time windows ([`grouping`]), duplicate counting
//! with Polars ([`analysis`]), packet building ([`packet`]) and
//! pseudonymization ([`privacy`]).

pub mod analysis;
pub mod event;
pub mod grouping;
pub mod packet;
pub mod privacy;
