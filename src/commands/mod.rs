//! The commands of the `login-metrics` binary, one module each; `main.rs`
//! parses arguments and calls them.

pub mod config;
pub mod demo;
pub mod generate;
pub mod generator;
pub mod health;
pub mod mock_cluster;
pub mod pseudonym;
pub mod run;
pub mod tail;
