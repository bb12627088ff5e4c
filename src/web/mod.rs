//! The web surface on `telemetry.listen`: metrics, health and readiness
//! ([`server`]) and the live dashboard of recent packets ([`dashboard`]).

pub mod dashboard;
pub mod server;
