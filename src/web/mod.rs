//! The web surface on `telemetry.listen`: metrics, health and readiness
//! ([`server`]) and the live dashboard of recent packets ([`dashboard`]),
//! which shows the whole group's packets when its instances merge windows
//! ([`group`]).

pub mod dashboard;
pub mod group;
pub mod server;
