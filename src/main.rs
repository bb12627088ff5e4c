//! The `login-metrics` command: arguments, logging and signals over the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use login_metrics::dashboard::Dashboard;
use login_metrics::demo;
use login_metrics::generator::{Generator, GeneratorConfig};
use login_metrics::privacy::Pseudonymizer;
use login_metrics::settings::Settings;
use login_metrics::Pipeline;
use login_metrics::{tail, telemetry};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

#[derive(Parser)]
#[command(
    name = "login-metrics",
    version,
    about = "Counts repeated login combinations in a Kafka stream, batch by batch"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the service against Kafka.
    Run {
        /// A TOML file layered over the defaults.
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Run the whole pipeline on an in-process mock Kafka cluster and print a summary.
    Demo {
        /// Events to generate.
        #[arg(long, default_value_t = 200_000)]
        events: u64,
        /// Seed of the event generator.
        #[arg(long, default_value_t = 42)]
        seed: u64,
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Serve the dashboard with the demo's packets on telemetry.listen (or
        /// a free loopback port when it is empty), during the run and after
        /// it, until Ctrl-C.
        #[arg(long)]
        serve: bool,
    },
    /// Produce generated login events into the input topic of a real Kafka.
    Generate {
        /// Events per second; 0 is as fast as possible (event time then advances
        /// 50,000 events a second).
        #[arg(long, default_value_t = 1000)]
        rate: u64,
        /// Events to produce; without it, until interrupted.
        #[arg(long)]
        count: Option<u64>,
        /// Create the input topic with this many partitions if it does not exist.
        #[arg(long)]
        partitions: Option<i32>,
        /// Write every event to this partition instead of partitioning by key.
        #[arg(long)]
        partition: Option<i32>,
        /// Event time of the first event, epoch milliseconds (default: now), so
        /// that separate runs can produce the same events.
        #[arg(long)]
        start_ms: Option<i64>,
        /// Events per second of event time (default: the rate, or 50,000 when
        /// producing as fast as possible).
        #[arg(long)]
        event_rate: Option<u64>,
        #[arg(long, default_value_t = 42)]
        seed: u64,
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Serve librdkafka's mock Kafka cluster on loopback until SIGINT or
    /// SIGTERM: prints its bootstrap servers on the first line of stdout. For
    /// tests that kill the service while its broker keeps running.
    MockCluster {
        /// A topic to create, as NAME:PARTITIONS; repeatable.
        #[arg(long = "topic")]
        topics: Vec<String>,
    },
    /// Print the metrics log readably, rotated files first (publication order).
    Tail {
        /// The metrics log; by default the configured metrics_log.path.
        file: Option<PathBuf>,
        /// Then keep printing packets as they are appended, across rotations,
        /// until SIGINT or SIGTERM.
        #[arg(long, short)]
        follow: bool,
        /// Print the packets' JSON lines unchanged instead.
        #[arg(long)]
        json: bool,
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Print the effective configuration (secrets redacted) and exit.
    Config {
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Exit 0 when the service's /healthz answers (for container health checks).
    Health {
        #[arg(long, default_value = "http://127.0.0.1:9464/healthz")]
        url: String,
    },
    /// Print the pseudonym of each value with the configured privacy key.
    Pseudonym {
        #[arg(required = true)]
        values: Vec<String>,
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
}

fn load(config: Option<&PathBuf>) -> Result<Settings, ExitCode> {
    Settings::load(config.map(PathBuf::as_path)).map_err(|e| {
        eprintln!("login-metrics: {e}");
        ExitCode::from(2)
    })
}

/// Cancels the token on the first SIGINT or SIGTERM; a second one exits at once.
fn handle_signals(token: CancellationToken) {
    tokio::spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
        let mut seen = false;
        loop {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            if seen {
                eprintln!("login-metrics: second signal, exiting now");
                std::process::exit(130);
            }
            seen = true;
            warn!("signal received: closing the current batch, delivering and committing (again to exit at once)");
            token.cancel();
        }
    });
}

/// `demo --serve`: the dashboard on `telemetry.listen`, or on a free loopback
/// port when that is empty, until `stop`. Prints its address at once, so it
/// can be opened while the demo runs; returns it for the closing line.
async fn serve_demo_dashboard(
    s: &Settings,
    stop: CancellationToken,
) -> anyhow::Result<(Dashboard, String)> {
    use anyhow::Context;
    let dashboard = Dashboard::new(s);
    let addr = s
        .telemetry
        .listen
        .unwrap_or_else(|| std::net::SocketAddr::from(([127, 0, 0, 1], 0)));
    let bound = telemetry::serve_with(addr, dashboard.health(), Some(dashboard.router()), stop)
        .await
        .with_context(|| {
            format!("cannot serve the dashboard on {addr} (telemetry.listen; LOGIN_METRICS__TELEMETRY__LISTEN=127.0.0.1:0 picks a free port)")
        })?;
    if let Some(warning) = Dashboard::exposure_warning(s) {
        eprintln!("login-metrics demo: warning: {warning}");
    }
    let url = format!("http://{bound}/");
    println!("dashboard: {url}");
    Ok((dashboard, url))
}

#[tokio::main]
async fn main() -> ExitCode {
    match dispatch(Cli::parse()).await {
        Ok(code) | Err(code) => code,
    }
}

/// Runs one command; `Err` carries the exit code of a configuration error.
async fn dispatch(cli: Cli) -> Result<ExitCode, ExitCode> {
    Ok(match cli.command {
        Command::Config { config } => {
            print!("{}", load(config.as_ref())?.redacted_toml());
            ExitCode::SUCCESS
        }
        Command::Tail {
            file,
            follow,
            json,
            config,
        } => {
            let path = match file {
                Some(f) => f,
                None => match load(config.as_ref())?.metrics_log.path {
                    Some(p) => p,
                    None => {
                        eprintln!("login-metrics tail: metrics_log.path is empty (the metrics log is disabled); name the FILE to read");
                        return Ok(ExitCode::from(2));
                    }
                },
            };
            let stop = CancellationToken::new();
            if follow {
                handle_signals(stop.clone());
            }
            let options = tail::Options { json, follow };
            let result = tokio::task::spawn_blocking(move || {
                let mut out = std::io::BufWriter::new(std::io::stdout().lock());
                tail::tail(&path, options, &mut out, &mut std::io::stderr(), &stop)
            })
            .await;
            match result {
                Ok(Ok(())) => ExitCode::SUCCESS,
                Ok(Err(e)) => {
                    eprintln!("login-metrics tail: {e:#}");
                    ExitCode::FAILURE
                }
                Err(e) => {
                    eprintln!("login-metrics tail: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Health { url } => match telemetry::check_health(&url) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("login-metrics: unhealthy: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Pseudonym { values, config } => {
            let s = load(config.as_ref())?;
            if s.privacy.key.is_empty() {
                eprintln!("login-metrics: privacy.key: no key is configured (privacy.key or privacy.key_file)");
                return Ok(ExitCode::from(2));
            }
            let p = Pseudonymizer::new(&s.privacy.key, &[]);
            for v in values {
                println!("{}\t{v}", p.pseudonym(&v));
            }
            ExitCode::SUCCESS
        }
        Command::Run { config } => {
            let s = load(config.as_ref())?;
            telemetry::init_logging(&s.log);
            info!(version = env!("CARGO_PKG_VERSION"), config = %s.redacted_summary(), "starting");
            let shutdown = CancellationToken::new();
            handle_signals(shutdown.clone());
            let mut pipeline = Pipeline::new(s.clone()).log_progress(true);
            if let Some(addr) = s.telemetry.listen {
                let dashboard = Dashboard::new(&s);
                pipeline = dashboard.watch(pipeline);
                if let Some(warning) = Dashboard::exposure_warning(&s) {
                    warn!("{warning}");
                }
                let routes = Some(dashboard.router());
                if let Err(e) =
                    telemetry::serve_with(addr, pipeline.health(), routes, shutdown.clone()).await
                {
                    error!(error = %e, "telemetry.listen: cannot listen on {addr}");
                    return Ok(ExitCode::from(2));
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
        Command::Demo {
            events,
            seed,
            config,
            serve,
        } => {
            let s = load(config.as_ref())?;
            // The demo's report is the output (it counts the invalid messages too);
            // keep the logs to errors unless asked.
            let mut log = s.log.clone();
            if std::env::var_os("RUST_LOG").is_none() && log.level == "info" {
                log.level = "error".into();
            }
            telemetry::init_logging(&log);
            let interrupt = CancellationToken::new();
            handle_signals(interrupt.clone());
            let served = if serve {
                match serve_demo_dashboard(&s, interrupt.clone()).await {
                    Ok(served) => Some(served),
                    Err(e) => {
                        eprintln!("login-metrics demo: {e:#}");
                        return Ok(ExitCode::from(2));
                    }
                }
            } else {
                None
            };
            let dashboard = served.as_ref().map(|(d, _)| d);
            match demo::run_demo(s, events, seed, interrupt.clone(), dashboard).await {
                Ok(report) => {
                    println!("{report}");
                    if let Some((_, url)) = &served {
                        println!("dashboard: {url} (Ctrl-C to stop)");
                        interrupt.cancelled().await;
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("login-metrics demo: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::MockCluster { topics } => {
            let cluster = match rdkafka::mocking::MockCluster::new(1) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("login-metrics mock-cluster: {e}");
                    return Ok(ExitCode::FAILURE);
                }
            };
            for t in &topics {
                let created = t
                    .rsplit_once(':')
                    .and_then(|(name, n)| Some((name, n.parse::<i32>().ok()?)))
                    .map(|(name, n)| cluster.create_topic(name, n, 1));
                if !matches!(created, Some(Ok(()))) {
                    eprintln!(
                        "login-metrics mock-cluster: cannot create topic `{t}` (NAME:PARTITIONS)"
                    );
                    return Ok(ExitCode::from(2));
                }
            }
            println!("{}", cluster.bootstrap_servers());
            let stop = CancellationToken::new();
            handle_signals(stop.clone());
            stop.cancelled().await;
            ExitCode::SUCCESS
        }
        Command::Generate {
            rate,
            count,
            partitions,
            partition,
            start_ms,
            event_rate,
            seed,
            config,
        } => {
            let s = load(config.as_ref())?;
            telemetry::init_logging(&s.log);
            let stop = CancellationToken::new();
            handle_signals(stop.clone());
            let mut cfg = GeneratorConfig::new(seed);
            cfg.start_ms = start_ms.unwrap_or_else(|| chrono::Utc::now().timestamp_millis());
            // Event time advances with the production rate (as fast as possible:
            // 50,000 events a second) unless --event-rate sets it.
            cfg.events_per_sec = match (event_rate, rate) {
                (Some(r), _) => r.max(1) as f64,
                (None, 0) => 50_000.0,
                (None, r) => r as f64,
            };
            if let Some(n) = partitions {
                if let Err(e) =
                    demo::ensure_topic(&s.kafka.bootstrap_servers, &s.kafka.input_topic, n).await
                {
                    eprintln!("login-metrics generate: {e:#}");
                    return Ok(ExitCode::FAILURE);
                }
            }
            let producer = login_metrics::sink::producer_config(&s.kafka);
            let topic = s.kafka.input_topic.clone();
            info!(topic = %topic, partition, brokers = %s.kafka.bootstrap_servers, rate, "generating");
            let result = tokio::task::spawn_blocking(move || {
                let mut gen = Generator::new(cfg);
                demo::produce_generated_to(
                    &producer, &topic, partition, &mut gen, count, rate, &stop,
                )
            })
            .await;
            match result {
                Ok(Ok(n)) => {
                    eprintln!("login-metrics: produced {n} events");
                    ExitCode::SUCCESS
                }
                Ok(Err(e)) => {
                    eprintln!("login-metrics generate: {e:#}");
                    ExitCode::FAILURE
                }
                Err(e) => {
                    eprintln!("login-metrics generate: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    })
}
