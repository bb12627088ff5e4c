//! # login-metrics
//!
//! A Kafka stream processor that reports, batch by batch, which combinations
//! of login attributes repeat: the same user from the same IP, the same user
//! on the same device, the same app version in the same locale, and any other
//! slice configured.
//!
//! Data meets the components in this order:
//!
//! 1. [`source`]: consumes `user-login` with manual offset management, on one
//!    thread that owns the consumer.
//! 2. [`event`]: parses each message without needless copies; a message that
//!    is not a valid event becomes an [`event::InvalidEvent`] with a kind and
//!    a reason, bound for the dead-letter topic.
//! 3. [`batch`]: accumulates events into batches closed by count, event-time
//!    span, wall-clock wait, shutdown or rebalance.
//! 4. [`analysis`]: loads a batch into a Polars DataFrame and counts duplicate
//!    groups per slice.
//! 5. [`packet`]: builds the metric packet (`docs/packet.schema.json`),
//!    pseudonymizing personal fields through [`privacy`].
//! 6. [`sink`] and [`metrics_log`]: publish the packet and the dead letters
//!    (idempotent, acks=all, gzip) and append the packet to the local log.
//! 7. [`commit`]: commits the batch's offsets, in batch order, only after all
//!    of the above succeeded: at least once, nothing lost.
//!
//! [`pipeline`] is the thin async shell that wires these together;
//! [`settings`] loads the layered configuration, [`telemetry`] serves
//! metrics and health, [`generator`] and [`demo`] make realistic test data,
//! [`tail`] reads the metrics log back for people.
//!
//! Errors are classed where they arise: an invalid message is *skipped* (to
//! the dead-letter topic, counted, logged); a failed delivery or commit is
//! *retried* with backoff; an undeliverable batch or a bad configuration
//! *stops* the process with a non-zero exit and nothing of the failed batch
//! committed.

pub mod analysis;
pub mod batch;
pub mod delivery;
pub mod demo;
pub mod event;
pub mod generator;
pub mod metrics_log;
pub mod offsets;
pub mod packet;
pub mod pipeline;
pub mod privacy;
pub mod settings;
pub mod sink;
pub mod source;
pub mod tail;
pub mod telemetry;
pub mod window;

pub use pipeline::{run, Pipeline, Progress, RunSummary};
pub use settings::Settings;
