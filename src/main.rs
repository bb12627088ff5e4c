//! The `login-metrics` command: arguments, logging and signals over the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use login_metrics::commands::{self, demo, generate, tail};
use login_metrics::settings::Settings;
use login_metrics::source::range;
use tokio_util::sync::CancellationToken;

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
        /// Stop at the end of the input as it is now: publish every window,
        /// commit and exit 0.
        #[arg(long, conflicts_with = "until")]
        until_end: bool,
        /// Stop before the first record with a timestamp at or after TIME
        /// (RFC 3339 or epoch milliseconds), publish every window, commit,
        /// exit 0.
        #[arg(long, value_name = "TIME", value_parser = range::parse_time)]
        until: Option<i64>,
        /// Start at the first record at or after TIME, for a consumer group
        /// without committed offsets (reprocessing); with --until or
        /// --until-end (else it reads to the end).
        #[arg(long, value_name = "TIME", value_parser = range::parse_time)]
        from: Option<i64>,
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
    /// Without --url it asks the listener that telemetry.listen configures.
    Health {
        #[arg(long)]
        url: Option<String>,
        #[arg(long, short)]
        config: Option<PathBuf>,
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
            tracing::warn!("signal received: closing the current batch, delivering and committing (again to exit at once)");
            token.cancel();
        }
    });
}

#[tokio::main]
async fn main() -> ExitCode {
    match dispatch(Cli::parse()).await {
        Ok(code) | Err(code) => code,
    }
}

/// Runs one command; `Err` carries the exit code of a configuration error.
async fn dispatch(cli: Cli) -> Result<ExitCode, ExitCode> {
    let signals = || {
        let token = CancellationToken::new();
        handle_signals(token.clone());
        token
    };
    Ok(match cli.command {
        Command::Config { config } => commands::config::run(&load(config.as_ref())?),
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
            // Only a follower runs until a signal; a plain read ends by itself.
            let stop = if follow {
                signals()
            } else {
                CancellationToken::new()
            };
            tail::run(path, tail::Options { json, follow }, stop).await
        }
        Command::Health { url, config } => {
            let url = match url {
                Some(url) => url,
                None => match commands::health::url_of(load(config.as_ref())?.telemetry.listen) {
                    Ok(url) => url,
                    Err(e) => {
                        eprintln!("login-metrics health: {e}");
                        return Ok(ExitCode::from(2));
                    }
                },
            };
            commands::health::run(&url)
        }
        Command::Pseudonym { values, config } => {
            commands::pseudonym::run(&load(config.as_ref())?, &values)
        }
        Command::Run {
            config,
            until_end,
            until,
            from,
        } => {
            let range = match (until_end, until, from) {
                (false, None, None) => None,
                (_, Some(ms), _) => Some(range::Until::Time(ms)),
                (_, None, _) => Some(range::Until::End),
            }
            .map(|until| range::Range {
                from_ms: from,
                until,
            });
            commands::run::run(load(config.as_ref())?, range, signals()).await
        }
        Command::Demo {
            events,
            seed,
            config,
            serve,
        } => {
            let args = demo::Args {
                events,
                seed,
                serve,
            };
            demo::run(load(config.as_ref())?, args, signals()).await
        }
        Command::MockCluster { topics } => commands::mock_cluster::run(&topics, signals()).await,
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
            let args = generate::Args {
                rate,
                count,
                partitions,
                partition,
                start_ms,
                event_rate,
                seed,
            };
            generate::run(load(config.as_ref())?, args, signals()).await
        }
    })
}
