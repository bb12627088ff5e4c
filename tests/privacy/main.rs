//! Privacy, on librdkafka's mock cluster, in a process of its own: the test
//! of pseudonyms installs a process-wide log subscriber and reads what the
//! service logged, which no pipeline run of another binary may add to (the
//! dead-letter runs here log no field value).

#[path = "../common/mod.rs"]
mod common;

mod dead_letters;
mod pseudonyms;
