//! `run`: the service against a real Kafka, with its web surface, until a
//! signal or an error that stops it.

use std::process::ExitCode;

use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::pipeline::Pipeline;
use crate::settings::Settings;
use crate::telemetry;
use crate::web::dashboard::Dashboard;
use crate::web::server;

pub async fn run(s: Settings, shutdown: CancellationToken) -> ExitCode {
    telemetry::init_logging(&s.log);
    info!(version = env!("CARGO_PKG_VERSION"), config = %s.redacted_summary(), "starting");
    let mut pipeline = Pipeline::new(s.clone()).log_progress(true);
    if let Some(addr) = s.telemetry.listen {
        let dashboard = Dashboard::new(&s);
        pipeline = dashboard.watch(pipeline);
        if let Some(warning) = Dashboard::exposure_warning(&s) {
            warn!("{warning}");
        }
        let routes = Some(dashboard.router());
        if let Err(e) = server::serve_with(addr, pipeline.health(), routes, shutdown.clone()).await
        {
            error!(error = %e, "telemetry.listen: cannot listen on {addr}");
            return ExitCode::from(2);
        }
    }
    match pipeline.run(shutdown).await {
        Ok(summary) => {
            info!(
                events = summary.messages,
                valid = summary.valid,
                invalid = summary.invalid,
                packets = summary.packets,
                duration_s = format!("{:.1}", summary.duration.as_secs_f64()),
                events_per_sec = summary.events_per_second().round() as u64,
                "stopped"
            );
            eprintln!("login-metrics: {summary}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            error!(error = format!("{e:#}"), "stopped with an error; uncommitted batches will be processed again on the next start");
            ExitCode::FAILURE
        }
    }
}
