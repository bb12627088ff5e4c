//! # login-metrics
//!
//! A Kafka stream processor that reports, window by window, which
//! combinations of login attributes repeat: the same user from the same IP,
//! the same user on the same device, the same app version in the same
//! locale, and any other slice configured.
//!
//! The folders follow the data, in the order it meets them:
//!
//! 1. [`source`]: the thread that owns the consumer of `user-login`, with
//!    manual offset management, taking messages thousands at a time from
//!    per-partition queues ([`source::fetch`]) and handling rebalances.
//! 2. [`core`], the pure, synchronous core (no Kafka, tokio or HTTP type):
//!    [`core::event`] parses each message (an invalid one becomes a dead
//!    letter with a kind and a reason); [`core::grouping`] groups valid
//!    events into event-time windows closed by watermark (the default) or
//!    arrival batches, behind one interface; [`core::analysis`] counts
//!    duplicate groups per slice with Polars; [`core::packet`] builds each
//!    packet (`docs/packet.schema.json`), pseudonymized through
//!    [`core::privacy`].
//! 3. [`sink`]: the delivery stage runs the analysis off the async workers,
//!    publishes packets and dead letters ([`sink::publisher`]: idempotent,
//!    acks=all, gzip) and appends packets to the metrics log
//!    ([`sink::metrics_log`]).
//! 4. [`commit`]: the ledger commits each work's offsets, in order, only
//!    after all of the above succeeded; in window mode after storing the
//!    partitions' checkpoints. Nothing is lost; a replay carries the same
//!    packet ids.
//!
//! 5. [`scale`], when a group's instances merge their windows: stage 1 sends
//!    each partition's share of a window to the shares topic instead of a
//!    packet; stage 2 merges the shares of each window and hands the
//!    result to delivery.
//!
//! Below the stages: [`work`], the units that cross them; [`settings`], the
//! reader of the layered configuration, whose sections live with what they
//! configure; [`values`], the forms of configuration values they share; [`kafka`], every librdkafka client configuration;
//! [`telemetry`], metrics, counters and health. Above them: [`pipeline`],
//! the thin async shell that wires the stages together; [`web`], the
//! metrics, health and dashboard listener; [`commands`], one module per
//! subcommand of the binary.
//!
//! Errors are classed where they arise: an invalid message is *skipped* (to
//! the dead-letter topic, counted, logged); a failed delivery or commit is
//! *retried* with backoff; an undeliverable batch or a bad configuration
//! *stops* the process with a non-zero exit and nothing of the failed batch
//! committed.

pub mod settings;
pub mod telemetry;
pub mod values;
pub mod work;

pub mod commit;
pub mod core;
pub mod scale;
pub mod sink;
pub mod source;

pub mod commands;
pub mod kafka;
pub mod pipeline;
pub mod web;

pub use pipeline::{Pipeline, Progress, RunSummary};
pub use settings::Settings;
