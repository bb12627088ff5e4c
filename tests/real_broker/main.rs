//! Tests of the real binary against Apache Kafka over TCP, started by the
//! tests from the jars `scripts/install-kafka` fetches: end to end, kill -9,
//! SIGTERM, several instances, rebalances, restarts under static group
//! membership, windows, the checkpoint topic, packets and dead letters
//! larger than their topics take, a secured listener, scaling down in
//! window mode, exactly once (transactions) under kill -9 and against a
//! resumed zombie, and windows merged across a group's instances.

#[path = "../common/mod.rs"]
mod common;

mod checkpoints;
mod end_to_end;
mod exactly_once;
mod live;
mod merged;
mod oversize;
mod restart;
mod scale;
mod windows;
