//! Tests against librdkafka's mock cluster: the pipeline in process, and
//! fault injection with the real binary (the cluster runs in the test
//! process and listens on loopback, so faults are injected while the service
//! runs).

#[path = "../common/mod.rs"]
mod common;

mod exactly_once;
mod faults;
mod pipeline;
