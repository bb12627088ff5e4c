//! The async shell: wires source, analysis, sinks and commits together.
//!
//! ```text
//!  consumer thread (source.rs)            sink task (this file)
//!  poll → parse → batch ──Batch──▶ analyze (blocking pool) → packet
//!        ▲                                 → deliver packet + dead letters
//!        └──────────── Ack ──────────────── → append to metrics log
//!  commit (in batch order)
//! ```
//!
//! The shell only moves data and owns the lifecycle; every decision (what is
//! valid, when a batch closes, what a packet says) is made in the synchronous
//! core modules.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{mpsc as std_mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};
use chrono::Utc;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

use crate::analysis;
use crate::batch::{Batch, Batcher, Columns, Limits};
use crate::event::{ErrorKind, Requirements};
use crate::metrics_log::MetricsLog;
use crate::packet::{self, Packet};
use crate::privacy::Pseudonymizer;
use crate::settings::Settings;
use crate::sink::{OutRecord, Publisher};
use crate::source::{self, Ack, Driver};
use crate::telemetry::{self, Health};

/// Counters of one run, shared with whoever watches it.
#[derive(Debug, Default)]
pub struct Progress {
    /// Input messages consumed, valid or not.
    pub messages: AtomicU64,
    pub invalid: AtomicU64,
    invalid_by_kind: [AtomicU64; 5],
    pub packets: AtomicU64,
    pub packet_bytes: AtomicU64,
    /// Messages whose batch is delivered and committed.
    pub committed_messages: AtomicU64,
    /// Total consumer lag from the latest librdkafka statistics.
    pub lag: AtomicI64,
    /// When partitions were first assigned (the group join is over).
    pub first_assigned: std::sync::OnceLock<Instant>,
}

impl Progress {
    pub(crate) fn count_invalid(&self, kind: ErrorKind) {
        self.invalid.fetch_add(1, Ordering::Relaxed);
        self.invalid_by_kind[kind as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub fn invalid_by_kind(&self) -> Vec<(ErrorKind, u64)> {
        ErrorKind::ALL
            .iter()
            .map(|k| {
                (
                    *k,
                    self.invalid_by_kind[*k as usize].load(Ordering::Relaxed),
                )
            })
            .filter(|(_, n)| *n > 0)
            .collect()
    }
}

/// What a finished run did.
#[derive(Debug, Clone)]
pub struct RunSummary {
    pub messages: u64,
    pub valid: u64,
    pub invalid: u64,
    pub invalid_by_kind: Vec<(ErrorKind, u64)>,
    pub packets: u64,
    pub packet_bytes: u64,
    pub duration: Duration,
    /// Time from the first partition assignment to the end of the run.
    pub since_assignment: Option<Duration>,
}

impl RunSummary {
    /// Events per second of the whole run, group join included.
    pub fn events_per_second(&self) -> f64 {
        self.messages as f64 / self.duration.as_secs_f64().max(1e-9)
    }

    /// Events per second once partitions were assigned.
    pub fn events_per_second_assigned(&self) -> Option<f64> {
        self.since_assignment
            .map(|d| self.messages as f64 / d.as_secs_f64().max(1e-9))
    }
}

impl std::fmt::Display for RunSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "events in {}, valid {}, invalid {}, packets {}, duration {:.1}s, {:.0} events/s",
            self.messages,
            self.valid,
            self.invalid,
            self.packets,
            self.duration.as_secs_f64(),
            self.events_per_second()
        )
    }
}

type PacketHook = Arc<dyn Fn(&Packet) + Send + Sync>;

/// One pipeline run: build, optionally watch, then [`Pipeline::run`].
pub struct Pipeline {
    settings: Arc<Settings>,
    progress: Arc<Progress>,
    health: Arc<Health>,
    on_packet: Option<PacketHook>,
    log_progress: bool,
}

/// Runs the pipeline until `shutdown` is cancelled.
pub async fn run(settings: Settings, shutdown: CancellationToken) -> anyhow::Result<RunSummary> {
    Pipeline::new(settings).run(shutdown).await
}

impl Pipeline {
    pub fn new(settings: Settings) -> Pipeline {
        Pipeline {
            settings: Arc::new(settings),
            progress: Arc::default(),
            health: Arc::default(),
            on_packet: None,
            log_progress: false,
        }
    }

    pub fn progress(&self) -> Arc<Progress> {
        self.progress.clone()
    }

    pub fn health(&self) -> Arc<Health> {
        self.health.clone()
    }

    /// Calls `hook` with every delivered packet, after it is in the metrics log.
    pub fn on_packet(mut self, hook: impl Fn(&Packet) + Send + Sync + 'static) -> Pipeline {
        self.on_packet = Some(Arc::new(hook));
        self
    }

    /// Logs a progress line every `telemetry.progress_interval`.
    pub fn log_progress(mut self, on: bool) -> Pipeline {
        self.log_progress = on;
        self
    }

    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<RunSummary> {
        let started = Instant::now();
        let s = self.settings.clone();
        let publisher = Publisher::new(&s.kafka).context("cannot create the Kafka producer")?;
        let metrics_log = match &s.metrics_log.path {
            Some(path) => Some(Arc::new(Mutex::new(
                MetricsLog::open(path, s.metrics_log.max_bytes, s.metrics_log.keep)
                    .with_context(|| format!("cannot open the metrics log {}", path.display()))?,
            ))),
            None => None,
        };
        let privacy = if s.privacy.pseudonymize.is_empty() {
            Pseudonymizer::disabled()
        } else {
            Pseudonymizer::new(&s.privacy.key, &s.privacy.pseudonymize)
        };

        // Capacity 1: the consumer fills the next batch while the sink works on
        // this one, and waits rather than piling up batches in memory.
        let (batch_tx, batch_rx) = mpsc::channel::<Batch>(1);
        let (ack_tx, ack_rx) = std_mpsc::channel::<Ack>();
        let driver = Driver::new(
            Batcher::new(Limits {
                max_events: s.batch.max_events,
                max_span: s.batch.max_span,
                max_wait: s.batch.max_wait,
            }),
            Requirements {
                fields: s.events.required.clone(),
                timestamp: s.events.timestamp_required,
            },
            batch_tx,
            ack_rx,
            self.progress.clone(),
        );

        let sink = Sink {
            settings: s.clone(),
            publisher: Arc::new(publisher),
            metrics_log,
            privacy,
            progress: self.progress.clone(),
            on_packet: self.on_packet.clone(),
        };
        let publisher = sink.publisher.clone();
        let sink_task = tokio::spawn(sink.run(batch_rx, ack_tx));

        let progress_stop = CancellationToken::new();
        if self.log_progress {
            tokio::spawn(log_progress(
                self.progress.clone(),
                s.telemetry.progress_interval,
                progress_stop.clone(),
            ));
        }

        let (k, health, progress) = (s.kafka.clone(), self.health.clone(), self.progress.clone());
        let consumed = tokio::task::spawn_blocking(move || {
            source::consume(&k, driver, health, progress, shutdown)
        })
        .await
        .map_err(|e| anyhow!("the consumer thread panicked: {e}"))?;
        progress_stop.cancel();
        let _ = sink_task.await;
        let flush_publisher = publisher.clone();
        tokio::task::spawn_blocking(move || flush_publisher.flush(Duration::from_secs(10)))
            .await
            .ok();
        consumed.map_err(|reason| anyhow!(reason))?;

        let p = &self.progress;
        let invalid = p.invalid.load(Ordering::Relaxed);
        let messages = p.messages.load(Ordering::Relaxed);
        Ok(RunSummary {
            messages,
            valid: messages - invalid,
            invalid,
            invalid_by_kind: p.invalid_by_kind(),
            packets: p.packets.load(Ordering::Relaxed),
            packet_bytes: p.packet_bytes.load(Ordering::Relaxed),
            duration: started.elapsed(),
            since_assignment: p.first_assigned.get().map(Instant::elapsed),
        })
    }
}

async fn log_progress(progress: Arc<Progress>, every: Duration, stop: CancellationToken) {
    let mut tick = tokio::time::interval(every);
    tick.tick().await;
    let mut last = (Instant::now(), progress.messages.load(Ordering::Relaxed));
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let now = Instant::now();
        let messages = progress.messages.load(Ordering::Relaxed);
        let rate = (messages - last.1) as f64 / now.duration_since(last.0).as_secs_f64();
        info!(
            events = messages,
            events_per_sec = rate.round() as u64,
            packets = progress.packets.load(Ordering::Relaxed),
            invalid = progress.invalid.load(Ordering::Relaxed),
            lag = progress.lag.load(Ordering::Relaxed),
            "progress"
        );
        last = (now, messages);
    }
}

/// The sink task's state.
struct Sink {
    settings: Arc<Settings>,
    publisher: Arc<Publisher>,
    metrics_log: Option<Arc<Mutex<MetricsLog>>>,
    privacy: Pseudonymizer,
    progress: Arc<Progress>,
    on_packet: Option<PacketHook>,
}

impl Sink {
    async fn run(self, mut batches: mpsc::Receiver<Batch>, acks: std_mpsc::Sender<Ack>) {
        while let Some(batch) = batches.recv().await {
            let ack = match self.handle(batch).await {
                Ok(ack) => ack,
                Err(e) => {
                    error!(
                        error = format!("{e:#}"),
                        "batch not delivered; its offsets will not be committed"
                    );
                    let _ = acks.send(Ack::Failed(format!("{e:#}")));
                    return;
                }
            };
            if acks.send(ack).is_err() {
                return;
            }
        }
    }

    async fn handle(&self, batch: Batch) -> anyhow::Result<Ack> {
        let analysed = Instant::now();
        let (settings, privacy) = (self.settings.clone(), self.privacy.clone());
        let (packet, json, batch) = tokio::task::spawn_blocking(move || {
            let mut batch = batch;
            let reports = analysis::analyze(
                &batch.columns,
                &settings.analysis.slices,
                settings.analysis.top,
            )?;
            let packet = packet::build(&batch, &reports, &privacy, Utc::now());
            let json = packet.to_json();
            // The columns are the bulk of a batch; free them before delivery.
            batch.columns = Columns::default();
            anyhow::Ok((packet, json, batch))
        })
        .await??;
        metrics::histogram!(telemetry::ANALYSIS_SECONDS).record(analysed.elapsed().as_secs_f64());

        let k = &self.settings.kafka;
        let mut records = Vec::with_capacity(1 + batch.invalid.len());
        records.push(OutRecord {
            topic: Arc::from(k.output_topic.as_str()),
            key: Some(packet.packet_id.clone().into_bytes()),
            payload: Arc::from(json.as_bytes()),
            headers: vec![("content-type", b"application/json".to_vec())],
        });
        if !k.dlq_topic.is_empty() {
            let dlq: Arc<str> = Arc::from(k.dlq_topic.as_str());
            records.extend(
                batch
                    .invalid
                    .iter()
                    .map(|m| OutRecord::dead_letter(&dlq, m)),
            );
        }
        self.publisher
            .deliver(&records)
            .await
            .with_context(|| format!("packet {}", packet.packet_id))?;

        if let Some(log) = &self.metrics_log {
            let log = log.clone();
            let line = json.clone();
            tokio::task::spawn_blocking(move || {
                log.lock().expect("metrics log lock").append(&line)
            })
            .await?
            .context("cannot append to the metrics log")?;
        }

        let valid = packet.events.valid;
        let invalid = batch.invalid.len() as u64;
        metrics::counter!(telemetry::MESSAGES).increment(valid + invalid);
        metrics::counter!(telemetry::EVENTS_VALID).increment(valid);
        for m in &batch.invalid {
            metrics::counter!(telemetry::EVENTS_INVALID, "kind" => m.kind.as_str()).increment(1);
        }
        if !k.dlq_topic.is_empty() {
            metrics::counter!(telemetry::DEAD_LETTERS).increment(invalid);
        }
        metrics::counter!(telemetry::PACKETS).increment(1);
        metrics::counter!(telemetry::PACKET_BYTES).increment(json.len() as u64);
        self.progress.packets.fetch_add(1, Ordering::Relaxed);
        self.progress
            .packet_bytes
            .fetch_add(json.len() as u64, Ordering::Relaxed);
        info!(
            packet_id = %packet.packet_id,
            valid,
            invalid,
            bytes = json.len(),
            closed_by = %packet.window.closed_by,
            "packet published"
        );
        if let Some(hook) = &self.on_packet {
            hook(&packet);
        }
        Ok(Ack::Delivered {
            sources: batch.sources,
            messages: valid + invalid,
        })
    }
}
