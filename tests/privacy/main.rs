//! Privacy, on librdkafka's mock cluster, in a process of its own: the test
//! installs a process-wide log subscriber and reads what the service logged,
//! which no other pipeline run may add to.

#[path = "../common/mod.rs"]
mod common;

mod pseudonyms;
