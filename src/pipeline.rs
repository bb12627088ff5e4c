//! The async shell: wires source, delivery and offsets together.
//!
//! ```text
//!  consumer thread (source)                     delivery task (delivery)
//!  poll → parse → window/batch ──Work──▶ analyze (blocking pool) → packets
//!        ▲                                → publish packets + dead letters
//!        └──────────── Ack ───────────── → append to metrics log
//!  commit, in order (offsets)
//! ```
//!
//! The shell only moves data and owns the lifecycle; every decision (what is
//! valid, when a window closes, what a packet says, what may be committed) is
//! made in the synchronous core modules.

use std::sync::atomic::Ordering;
use std::sync::{mpsc as std_mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::commit::checkpoint::{self, CheckpointStore};
use crate::commit::ledger::Transactions;
use crate::commit::recovery;
use crate::core::event::{ErrorKind, Requirements};
use crate::core::grouping::arrival::Limits;
use crate::core::grouping::split::{GroupView, Split};
use crate::core::grouping::window::{LatePolicy, WindowConfig, Windower};
use crate::core::grouping::{Arrival, Grouping};
use crate::core::packet::{Identity, Packet};
use crate::core::privacy::Pseudonymizer;
use crate::kafka;
use crate::scale::{self, merging, merging::MergeStage, shares::SharesOut};
use crate::settings::{BatchMode, Guarantee, LateSetting, Settings};
use crate::sink::delivery::{Ack, Delivery, PacketHook};
use crate::sink::metrics_log::MetricsLog;
use crate::sink::publisher::{self as sink, Publisher};
use crate::source::consumer::{self as source, Bounds, Driver};
use crate::source::range::{self, Bound, Range};
pub use crate::telemetry::Progress;
use crate::telemetry::{Health, LogLimit};
use crate::work::Work;

/// What a finished run did.
#[derive(Debug, Clone)]
pub struct RunSummary {
    pub messages: u64,
    pub valid: u64,
    pub invalid: u64,
    pub invalid_by_kind: Vec<(ErrorKind, u64)>,
    /// Window mode: valid events whose windows had all closed.
    pub late: u64,
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

/// One pipeline run: build, optionally watch, then [`Pipeline::run`].
pub struct Pipeline {
    settings: Arc<Settings>,
    progress: Arc<Progress>,
    health: Arc<Health>,
    on_packet: Option<PacketHook>,
    log_progress: bool,
    range: Option<Range>,
}

impl Pipeline {
    pub fn new(settings: Settings) -> Pipeline {
        Pipeline {
            settings: Arc::new(settings),
            progress: Arc::default(),
            health: Arc::default(),
            on_packet: None,
            log_progress: false,
            range: None,
        }
    }

    /// Makes the run bounded: it reads `range` ([`crate::source::range`]),
    /// publishes every window (the last ones closed by `end`), commits and
    /// returns.
    pub fn bounded(mut self, range: Range) -> Pipeline {
        self.range = Some(range);
        self
    }

    pub fn progress(&self) -> Arc<Progress> {
        self.progress.clone()
    }

    pub fn health(&self) -> Arc<Health> {
        self.health.clone()
    }

    /// Calls `hook` with every delivered packet, after it is in the metrics log.
    /// Hooks added by several calls all run, in the order they were added, so
    /// the demo's report and the dashboard can both watch one run.
    pub fn on_packet(mut self, hook: impl Fn(&Packet) + Send + Sync + 'static) -> Pipeline {
        self.on_packet = Some(match self.on_packet.take() {
            Some(first) => Arc::new(move |p: &Packet| {
                first(p);
                hook(p);
            }),
            None => Arc::new(hook),
        });
        self
    }

    /// Reports this run's progress and health into counters created
    /// beforehand, so whoever serves them (the dashboard) can exist before
    /// the pipeline does.
    pub fn sharing(mut self, progress: Arc<Progress>, health: Arc<Health>) -> Pipeline {
        self.progress = progress;
        self.health = health;
        self
    }

    /// Logs a progress line every `telemetry.progress_interval`.
    pub fn log_progress(mut self, on: bool) -> Pipeline {
        self.log_progress = on;
        self
    }

    /// Runs the pipeline until `shutdown` is cancelled or work cannot be
    /// delivered: the entry point of `run`, `demo`, the tests and the benches.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<RunSummary> {
        let started = Instant::now();
        let s = self.settings.clone();
        let exactly_once = s.delivery.guarantee == Guarantee::ExactlyOnce;
        let transactional_id = exactly_once.then(|| {
            let (id, stable) = kafka::transactional_id(&s.kafka);
            if stable {
                info!(transactional_id = %id, "exactly once: transactional producer");
            } else {
                warn!(transactional_id = %id, "exactly once without kafka.instance_name: the transactional.id is new at each start, so a transaction left open by a killed process holds back read_committed readers until transaction.timeout.ms instead of being aborted at the next start");
            }
            id
        });
        let publisher = match &transactional_id {
            Some(id) => Publisher::transactional(&s.kafka, id),
            None => Publisher::new(&s.kafka),
        }
        .context("cannot create the Kafka producer")?;
        let publisher = Arc::new(publisher);
        let k = s.kafka.clone();
        tokio::task::spawn_blocking(move || sink::check_topics(&k, Duration::from_secs(10)))
            .await??;
        if exactly_once {
            // Fences a predecessor with this transactional.id and aborts
            // what it left open, before anything is read.
            let (p, stop) = (publisher.clone(), shutdown.clone());
            tokio::task::spawn_blocking(move || p.init_transactions(&stop))
                .await?
                .map_err(|e| anyhow!(e))?;
        }
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
            Pseudonymizer::new(s.privacy.key.expose().as_bytes(), &s.privacy.pseudonymize)
        };

        // Exactly once needs the checkpoint topic in arrival mode too: it
        // holds the record of each transaction's packets.
        let checkpoints = match (s.batch.mode, exactly_once) {
            (BatchMode::Window, _) | (_, true) => {
                checkpoint::ensure_topic(&s.kafka, &shutdown).await?;
                Some(
                    CheckpointStore::new(&s.kafka)
                        .context("cannot create the checkpoint producer")?,
                )
            }
            (BatchMode::Arrival, false) => None,
        };
        let transaction_timeout = kafka::transaction_timeout(&s.kafka);
        let logged_key = transactional_id
            .as_deref()
            .map(|id| checkpoint::logged_key(&s.kafka.group_id, id));
        let checkpoints = match (&logged_key, &metrics_log, checkpoints) {
            (Some(key), Some(log), Some(store)) => {
                let (k, key, log) = (s.kafka.clone(), key.clone(), log.clone());
                let stall = transaction_timeout + Duration::from_secs(10);
                let (store, recovered) = tokio::task::spawn_blocking(move || {
                    let mut log = log.lock().expect("metrics log lock");
                    let r = recovery::recover(&k, &store, &key, &mut log, stall);
                    (store, r)
                })
                .await?;
                if let Err(e) = recovered {
                    // The output topic has the packets; the log stays short of
                    // them rather than the service not starting.
                    error!(error = format!("{e:#}"), "the metrics log could not be recovered; it lacks the packets of the last transaction committed before the crash");
                }
                Some(store)
            }
            (_, _, store) => store,
        };

        // Merged windows (`scale.merge`): the shares topic, and the furthest
        // window end the group has closed, which the merge stage reports to
        // the partitions read here.
        let merge = match s.scale.merge {
            true => {
                let topic = s.scale.shares_topic(&s.kafka.group_id);
                let partitions = scale::ensure_shares_topic(&s.kafka, &topic).await?;
                let (k, input) = (s.kafka.clone(), s.kafka.input_topic.clone());
                let inputs =
                    tokio::task::spawn_blocking(move || scale::partitions(&k, &input)).await??;
                info!(shares_topic = %topic, partitions, input_partitions = inputs, "windows merged across the group's instances");
                Some((topic, partitions, inputs, Arc::new(GroupView::default())))
            }
            false => None,
        };

        // Capacity 1: the consumer fills the next work while delivery handles
        // this one, and waits rather than piling up work in memory.
        let (work_tx, work_rx) = mpsc::channel::<Work>(1);
        let (ack_tx, ack_rx) = std_mpsc::channel::<Ack>();
        let (fields, timestamp) = s.events.required();
        let grouping: Box<dyn Grouping> = match &merge {
            Some((_, _, _, group)) => Box::new(
                Split::new(window_config(&s), &s.kafka.input_topic).following(group.clone()),
            ),
            None => grouping(&s),
        };
        let driver = Driver::new(
            grouping,
            Requirements {
                fields,
                timestamp,
                not_after_ms: None,
            },
            Bounds {
                max_future: Some(s.events.max_future),
                revoke_within: revoke_within(&s.kafka),
            },
            work_tx,
            ack_rx,
            self.progress.clone(),
            checkpoints,
        );
        let (outcome_tx, outcome_rx) = mpsc::unbounded_channel();
        let driver = match &logged_key {
            Some(key) => driver.transactional(
                Transactions {
                    publisher: publisher.clone(),
                    outcomes: outcome_tx,
                    logged_key: key.clone(),
                },
                transaction_timeout,
            ),
            None => driver,
        };
        let driver = match self.range {
            Some(r) => driver.bounded(self.read_range(r).await?),
            None => driver,
        };

        let identity = Identity::new(
            &s.kafka.group_id,
            &s.kafka.input_topic,
            &s.analysis.slices,
            s.analysis.top,
            &privacy,
        )
        .with_rules(&s.packet_rules());
        let delivery = Delivery {
            settings: s.clone(),
            publisher,
            metrics_log,
            privacy,
            identity,
            progress: self.progress.clone(),
            on_packet: self.on_packet.clone(),
            health: self.health.clone(),
            shutdown: shutdown.clone(),
            log_errors: LogLimit::new("metrics log errors", 5, Duration::from_secs(60)),
            outcomes: exactly_once.then(|| tokio::sync::Mutex::new(outcome_rx)),
            shares: None,
        };
        let publisher = delivery.publisher.clone();
        let shutdown_merge = shutdown.child_token();
        // Merged: this delivery publishes the merge stage's packets, and one
        // more sends stage 1's shares.
        let (delivery_task, merge_task) = match &merge {
            None => (tokio::spawn(delivery.run(work_rx, ack_tx)), None),
            Some((topic, partitions, inputs, group)) => {
                let stage1 = Delivery {
                    settings: s.clone(),
                    publisher: publisher.clone(),
                    metrics_log: None,
                    privacy: delivery.privacy.clone(),
                    identity: delivery.identity.clone(),
                    progress: self.progress.clone(),
                    on_packet: None,
                    health: self.health.clone(),
                    shutdown: shutdown.clone(),
                    log_errors: LogLimit::new("metrics log errors", 5, Duration::from_secs(60)),
                    outcomes: None,
                    shares: Some(SharesOut {
                        topic: Arc::from(topic.as_str()),
                        partitions: *partitions,
                        hop_ms: window_config(&s).hop.as_millis().max(1) as i64,
                        fields: shares_fields(&s),
                    }),
                };
                let (merged_tx, merged_rx) = mpsc::channel::<Work>(1);
                let (merged_ack_tx, merged_ack_rx) = std_mpsc::channel::<Ack>();
                let merged = tokio::spawn(delivery.run(merged_rx, merged_ack_tx));
                let stage = MergeStage {
                    kafka: s.kafka.clone(),
                    topic: topic.clone(),
                    inputs: *inputs as usize,
                    to_delivery: merged_tx,
                    acks: merged_ack_rx,
                    group: group.clone(),
                    shutdown: shutdown_merge.clone(),
                };
                let stop_all = shutdown.clone();
                let merging = tokio::task::spawn_blocking(move || {
                    let outcome = merging::run(stage);
                    if let Err(e) = &outcome {
                        // The service stops with it rather than read on
                        // without publishing.
                        error!(error = %e, "the merge stage stopped");
                        stop_all.cancel();
                    }
                    outcome
                });
                (
                    tokio::spawn(stage1.run(work_rx, ack_tx)),
                    Some((merging, merged)),
                )
            }
        };

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
        let _ = delivery_task.await;
        if let Some((merging, merged)) = merge_task {
            // The merge stage stops with the consumer (shutdown) and delivers
            // what it handed over; it stops on its own on an error.
            shutdown_merge.cancel();
            let outcome = merging
                .await
                .map_err(|e| anyhow!("the merge thread panicked: {e}"))?;
            let _ = merged.await;
            outcome.map_err(|reason| anyhow!(reason))?;
        }
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
            late: p.late.load(Ordering::Relaxed),
            packets: p.packets.load(Ordering::Relaxed),
            packet_bytes: p.packet_bytes.load(Ordering::Relaxed),
            duration: started.elapsed(),
            since_assignment: p.first_assigned.get().map(Instant::elapsed),
        })
    }
}

impl Pipeline {
    /// The range's end offsets, after committing its start for `--from`; the
    /// messages it holds from the group's committed offsets on go to
    /// [`Progress::range_total`] for progress displays.
    async fn read_range(&self, r: Range) -> anyhow::Result<Bound> {
        const TIMEOUT: Duration = Duration::from_secs(30);
        let k = self.settings.kafka.clone();
        let (bound, total) =
            tokio::task::spawn_blocking(move || -> anyhow::Result<(Bound, u64)> {
                if let Some(ms) = r.from_ms {
                    range::start_at(&k, ms, TIMEOUT)?;
                }
                let end = range::end_offsets(&k, r.until, TIMEOUT)?;
                let start = range::committed(&k, TIMEOUT)?;
                let bound = Bound::new(end);
                let total = bound.remaining(&start);
                Ok((bound, total))
            })
            .await??;
        info!(
            messages = total,
            "bounded run: reading the range, then stopping"
        );
        self.progress.range_total.store(total, Ordering::Relaxed);
        Ok(bound)
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

/// The grouping of the configured mode.
fn grouping(s: &Settings) -> Box<dyn Grouping> {
    let b = &s.batch;
    match b.mode {
        BatchMode::Arrival => Box::new(Arrival::new(Limits {
            max_events: b.max_events,
            max_span: b.max_span,
            max_wait: b.max_wait,
        })),
        BatchMode::Window => Box::new(Windower::new(window_config(s), &s.kafka.input_topic)),
    }
}

/// The window rules of `[batch]`.
fn window_config(s: &Settings) -> WindowConfig {
    let b = &s.batch;
    WindowConfig {
        size: b.max_span,
        hop: b.hop.unwrap_or(b.max_span),
        grace: b.grace,
        idle: b.idle,
        max_wait: b.max_wait,
        max_events: b.max_events,
        max_buffered: b.max_buffered,
        max_dead_letters: b.max_events,
        late: match b.late {
            LateSetting::Dlq => LatePolicy::DeadLetter,
            LateSetting::Drop => LatePolicy::Drop,
        },
    }
}

/// The fields a share carries: those the slices name.
fn shares_fields(s: &Settings) -> Vec<crate::core::event::Field> {
    let mut fields: Vec<_> = s.analysis.slices.iter().flatten().copied().collect();
    fields.sort_unstable_by_key(|f| f.index());
    fields.dedup();
    fields
}

/// How long the revocation callback may wait for work in flight: half of the
/// consumer's `max.poll.interval.ms` (librdkafka's default 300000), so the
/// member returns to `poll` before the group expels it.
fn revoke_within(k: &crate::settings::KafkaSettings) -> Duration {
    let ms = k
        .consumer
        .get("max.poll.interval.ms")
        .and_then(|v| v.trim().parse::<u64>().ok())
        .unwrap_or(300_000);
    Duration::from_millis(ms / 2)
}
