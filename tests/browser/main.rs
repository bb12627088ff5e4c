//! The dashboard in a real headless browser (Debian's Chromium), with the
//! service on Apache Kafka, and its listener under load.

#[path = "../common/mod.rs"]
mod common;

mod dashboard;
mod load;
