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
//!    thread that owns the consumer, taking messages thousands at a time
//!    ([`fetch`]).
//! 2. [`event`]: parses each message without needless copies; a message that
//!    is not a valid event becomes an [`event::InvalidEvent`] with a kind and
//!    a reason, bound for the dead-letter topic.
//! 3. [`window`] (the default, `batch.mode = "window"`): groups valid events
//!    into event-time windows closed by watermark, so the same input gives the
//!    same packets whatever the timing; [`batch`] (`"arrival"`): batches of
//!    whatever arrived together, closed by count, span or wait. Both hand
//!    [`batch::Work`] to delivery.
//! 4. [`delivery`]: runs [`analysis`] (a Polars DataFrame, duplicate groups
//!    per slice), builds each [`packet`] (`docs/packet.schema.json`,
//!    pseudonymized through [`privacy`]), publishes packets and dead letters
//!    through [`sink`] (idempotent, acks=all, gzip) and appends packets to the
//!    [`metrics_log`].
//! 5. [`offsets`]: commits each work's offsets, in order, only after all of the
//!    above succeeded; in window mode after storing the partitions'
//!    [`checkpoint`]s. Nothing is lost; a replay carries the same packet ids.
//!
//! [`pipeline`] is the thin async shell that wires these together;
//! [`settings`] loads the layered configuration, [`telemetry`] serves
//! metrics and health, [`dashboard`] the live page of recent packets beside
//! them, [`tail`] reads the metrics log back for people, [`generator`] and
//! [`demo`] make realistic test data.
//!
//! Errors are classed where they arise: an invalid message is *skipped* (to
//! the dead-letter topic, counted, logged); a failed delivery or commit is
//! *retried* with backoff; an undeliverable batch or a bad configuration
//! *stops* the process with a non-zero exit and nothing of the failed batch
//! committed.

pub mod analysis;
pub mod batch;
pub mod checkpoint;
pub mod dashboard;
pub mod delivery;
pub mod demo;
pub mod event;
pub mod fetch;
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
