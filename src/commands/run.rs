//! `run`: the service against a real Kafka, with its web surface, until a
//! signal or an error that stops it, or, for a bounded run, until its range
//! is read (with a progress bar on a terminal, a line every few seconds
//! otherwise).

use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::commands::generate::Meter;
use crate::kafka::Membership;
use crate::pipeline::Pipeline;
use crate::settings::Settings;
use crate::source::range::Range;
use crate::telemetry;
use crate::telemetry::Progress;
use crate::web::dashboard::Dashboard;
use crate::web::server;

pub async fn run(s: Settings, range: Option<Range>, shutdown: CancellationToken) -> ExitCode {
    telemetry::init_logging(&s.log);
    // Resolved here, for the service alone: the demo and the tests' pipelines
    // join as dynamic members unless a name is configured.
    let mut s = s;
    let membership = Membership::of(&s.kafka, s.metrics_log.path.as_deref());
    s.kafka.instance_name = membership.instance_name().unwrap_or_default().to_string();
    info!(version = env!("CARGO_PKG_VERSION"), config = %s.redacted_summary(), "starting");
    info!(group = %s.kafka.group_id, instance = %s.kafka.instance_name, "{membership}");
    if range.is_some() && s.scale.merge {
        // The merge stage of a group outlives any one instance's range.
        error!("scale.merge: a bounded run (--from/--until) reads its range alone; run it without scale.merge");
        return ExitCode::from(2);
    }
    let mut pipeline = Pipeline::new(s.clone()).log_progress(range.is_none());
    let meter_stop = CancellationToken::new();
    if let Some(range) = range {
        pipeline = pipeline.bounded(range);
        tokio::spawn(show_progress(pipeline.progress(), meter_stop.clone()));
    }
    if let Some(addr) = s.telemetry.listen {
        let dashboard = Dashboard::new(&s);
        pipeline = match s.scale.merge {
            true => dashboard.watch_group(pipeline, &s.kafka, shutdown.clone()),
            false => dashboard.watch(pipeline),
        };
        if let Some(warning) = Dashboard::exposure_warning(&s) {
            warn!("{warning}");
        }
        let routes = Some(dashboard.router());
        if let Err(e) = server::serve_with(
            addr,
            pipeline.health(),
            routes,
            server::Limits::of(&s.telemetry),
            shutdown.clone(),
        )
        .await
        {
            error!(error = %e, "telemetry.listen: cannot listen on {addr}");
            return ExitCode::from(2);
        }
    }
    let outcome = pipeline.run(shutdown).await;
    meter_stop.cancel();
    match outcome {
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

/// A bounded run's progress: messages read of the range, rate, time left.
async fn show_progress(progress: Arc<Progress>, stop: CancellationToken) {
    let total = loop {
        let total = progress.range_total.load(Ordering::Relaxed);
        if total > 0 {
            break total;
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
        }
    };
    let mut meter = Meter::new("read", Some(total));
    loop {
        meter.set(progress.messages.load(Ordering::Relaxed).min(total));
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
    }
    meter.set(progress.messages.load(Ordering::Relaxed).min(total));
    meter.finish();
}
