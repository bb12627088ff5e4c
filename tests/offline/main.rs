//! Tests that need no external broker: the command line, the compose
//! files, the Dockerfile, the layout of the crate, the metrics log reader, property tests of
//! the pure core (counting, timestamps, windows, the merge of shares), and the telemetry of one
//! run on librdkafka's in-process mock cluster.

#[path = "../common/mod.rs"]
mod common;

mod cli;
mod compose;
mod dockerfile;
mod layout;
mod monitoring;
mod prop_analysis;
mod prop_merge;
mod prop_timestamp;
mod prop_window;
mod tail;
// The only pipeline run inside this process: the Prometheus recorder is
// process-wide, so the counts it checks are its own run's.
mod telemetry;
