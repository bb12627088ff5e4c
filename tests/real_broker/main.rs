//! Tests of the real binary against Apache Kafka over TCP, started by the
//! tests from the jars `scripts/install-kafka` fetches: end to end, kill -9,
//! SIGTERM, several instances, rebalances, windows, and a secured listener.

#[path = "../common/mod.rs"]
mod common;

mod end_to_end;
mod windows;
