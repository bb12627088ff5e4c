//! `health`: exit 0 when the service's `/healthz` answers (container health
//! checks need no curl).

use std::process::ExitCode;

use crate::web::server;

pub fn run(url: &str) -> ExitCode {
    match server::check_health(url) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("login-metrics: unhealthy: {e}");
            ExitCode::FAILURE
        }
    }
}
