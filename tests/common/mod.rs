//! Helpers shared by the integration tests, by role: known input
//! ([`input`]), reading back what the service wrote ([`output`]), the
//! independent oracle ([`reference`]), the pipeline in process
//! ([`in_process`]), the real binary as a subprocess ([`service`]), the
//! Apache Kafka broker ([`broker`]), HTTP ([`http`]), commit order from the
//! service's own log ([`order`]), window mode's input, oracle and checks
//! for the tests that run in both modes ([`windowed`]), topics written in
//! transactions read as committed or uncommitted ([`transactions`]), the
//! browser ([`browser`]) and the command line ([`cli`]). Each test binary
//! uses some of them.
#![allow(dead_code, unused_imports)]

pub mod broker;
pub mod browser;
pub mod cli;
pub mod http;
pub mod in_process;
pub mod input;
pub mod order;
pub mod output;
pub mod reference;
pub mod service;
pub mod transactions;
pub mod windowed;

pub use http::*;
pub use in_process::*;
pub use input::*;
pub use output::*;
pub use reference::*;
