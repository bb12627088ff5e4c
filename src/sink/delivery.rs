//! Delivery: from closed work to acknowledged output.
//!
//! For each [`Work`], in order: analyze every batch with Polars and build
//! its packet, and build the dead letters, pseudonymized when so configured
//! (all on the blocking pool, so the runtime never stalls), publish the
//! packets and dead letters and wait for every acknowledgement, append the
//! packets to the metrics log, then acknowledge the work to the consumer
//! thread, which commits its offsets ([`crate::commit::ledger::Ledger`]). A work that
//! cannot be delivered is reported with its reason and ends delivery: nothing
//! after it may be committed.
//!
//! Works that wait are delivered together: while one job runs, delivery takes
//! the works the consumer hands over next (up to [`MAX_HELD_EVENTS`]), and the
//! next job analyses all their batches at once ([`analysis::analyze_many`]),
//! publishes all their records, appends all their packets, then acknowledges
//! each work in order. A job has a fixed cost whatever its size; a backlog
//! of small windows pays it once per job instead of once per window. The
//! packets are the same either way.
//!
//! Every packet is made to fit the output topic before it is published
//! ([`packet::bounded`] within [`Limits::packet_bytes`]): a packet the
//! producer or the broker refused would be refused again at every restart,
//! since the same window gives the same packet.

use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::{mpsc as std_mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use chrono::Utc;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::core::analysis;
use crate::core::event::ErrorKind;
use crate::core::packet::{self, Identity, Packet};
use crate::core::privacy::{DeadLetters, Pseudonymizer};
use crate::scale::shares::SharesOut;
use crate::settings::Settings;
use crate::sink::metrics_log::MetricsLog;
use crate::sink::publisher::{Limits, OutRecord, Publisher};
use crate::telemetry::{self, Health, LogLimit, Progress};
use crate::work::{merge_points, Columns, CommitPoint, InvalidMessage, Logged, Outcome, Work};

pub use crate::work::Ack;

pub type PacketHook = Arc<dyn Fn(&Packet) + Send + Sync>;

/// `[delivery]`: what the output promises its readers.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeliverySettings {
    pub guarantee: Guarantee,
}

/// How often a window's packet may appear in the output topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Guarantee {
    /// Once or more: after a crash, work published and not yet committed is
    /// published again (window mode: the same packet under the same id).
    AtLeastOnce,
    /// Once, for `read_committed` readers: packets, dead letters,
    /// checkpoints and input offsets are committed in one Kafka transaction.
    ExactlyOnce,
}

/// The delivery stage's state.
pub struct Delivery {
    pub settings: Arc<Settings>,
    pub publisher: Arc<Publisher>,
    pub metrics_log: Option<Arc<Mutex<MetricsLog>>>,
    pub privacy: Pseudonymizer,
    pub identity: Identity,
    pub progress: Arc<Progress>,
    pub on_packet: Option<PacketHook>,
    pub health: Arc<Health>,
    /// Cancelled at shutdown: bounds the metrics log retries.
    pub shutdown: CancellationToken,
    pub log_errors: LogLimit,
    /// Exactly once: the outcome of each transaction acknowledged, from the
    /// commit path ([`crate::commit::ledger::Transactions`]). `None`: at
    /// least once.
    pub outcomes: Option<tokio::sync::Mutex<mpsc::UnboundedReceiver<Outcome>>>,
    /// Stage 1 of a merged group ([`crate::scale`]): each work's windows
    /// go to the shares topic as shares, not analysed into packets.
    pub shares: Option<SharesOut>,
}

/// The most valid events and dead letters delivery holds beyond the work
/// waiting in its channel: the batches of the job being analysed and the
/// works taken ahead for the next job. Analysis costs least per event at
/// about this many (`cargo bench --bench pipeline -- analysis`), and a work
/// this large is taken on its own, so large windows are held no more than
/// when each work was its own job.
pub const MAX_HELD_EVENTS: usize = 100_000;

/// Works taken from the channel while a job runs, for the next job.
#[derive(Default)]
struct Ahead {
    works: Vec<Work>,
    /// Their valid events and dead letters.
    events: usize,
    /// The channel closed: the consumer hands over nothing more.
    closed: bool,
}

impl Ahead {
    fn push(&mut self, work: Work) {
        self.events += held_events(&work);
        self.works.push(work);
    }

    fn take(&mut self) -> Vec<Work> {
        self.events = 0;
        std::mem::take(&mut self.works)
    }
}

/// What a work holds in memory, counted in events: its valid events and its
/// dead letters.
fn held_events(work: &Work) -> usize {
    work.batches.iter().map(|b| b.valid()).sum::<usize>() + work.dead_letters.len()
}

/// A work's packets and dead letters, built and ready to publish.
struct Built {
    /// Each packet with its JSON.
    packets: Vec<(Packet, String)>,
    /// Stage 1 of a merged group: the work's shares.
    internal: Vec<OutRecord>,
    /// Stage 1 of a merged group: the progress the work reports, sent once
    /// every share before it is acknowledged (a retried share must never
    /// land behind the progress that covers it).
    progress: Vec<OutRecord>,
    dead_letter_records: Vec<OutRecord>,
    dead_letters: Vec<InvalidMessage>,
    commit: Vec<CommitPoint>,
    messages: u64,
    /// The consumer's assignment the work was read under.
    assignment: u64,
}

/// The longest wait between two attempts to append to the metrics log.
const MAX_LOG_BACKOFF: Duration = Duration::from_secs(5);
/// How long the metrics log is still retried once shutdown was requested.
pub const LOG_RETRY_AT_SHUTDOWN: Duration = Duration::from_secs(10);

impl Delivery {
    /// Delivers work until the channel closes or a work fails.
    pub async fn run(self, mut works: mpsc::Receiver<Work>, acks: std_mpsc::Sender<Ack>) {
        let mut ahead = Ahead::default();
        loop {
            if ahead.works.is_empty() {
                match works.recv().await {
                    Some(work) => ahead.push(work),
                    None => return,
                }
            }
            let job = ahead.take();
            let delivered = match self.handle(job, &mut works, &mut ahead, &acks).await {
                Ok(delivered) => delivered,
                Err(e) => {
                    let reason = format!("{e:#}");
                    error!(error = %reason, "work not delivered; its offsets will not be committed");
                    let _ = acks.send(Ack::Failed(reason));
                    return;
                }
            };
            for ack in delivered {
                if acks.send(ack).is_err() {
                    return;
                }
            }
        }
    }

    /// Runs `step` of a job that holds `held` events in memory, meanwhile
    /// taking the works handed over next into `ahead`, as long as delivery
    /// holds fewer than [`MAX_HELD_EVENTS`]. What is not taken waits in the
    /// channel, and the consumer behind it, as before.
    async fn taking_ahead<T>(
        step: impl Future<Output = T>,
        held: usize,
        works: &mut mpsc::Receiver<Work>,
        ahead: &mut Ahead,
    ) -> T {
        tokio::pin!(step);
        loop {
            let room = !ahead.closed && held + ahead.events < MAX_HELD_EVENTS;
            tokio::select! {
                biased;
                out = &mut step => return out,
                work = works.recv(), if room => match work {
                    Some(work) => ahead.push(work),
                    None => ahead.closed = true,
                },
            }
        }
    }

    /// Appends the lines to the metrics log, retrying a failed append with
    /// backoff for as long as it takes: the packets are already published, so
    /// giving up would mean publishing them again after a restart. The work's
    /// commit waits meanwhile; `/readyz` and
    /// `login_metrics_metrics_log_failures_total` say so. At shutdown the
    /// retries stop after [`LOG_RETRY_AT_SHUTDOWN`].
    async fn append_to_log(
        &self,
        log: &Arc<Mutex<MetricsLog>>,
        lines: Vec<String>,
    ) -> anyhow::Result<()> {
        let mut next = 0;
        let mut attempt = 0u32;
        let mut stopping_since: Option<Instant> = None;
        while next < lines.len() {
            let (log2, line) = (log.clone(), lines[next].clone());
            let result = tokio::task::spawn_blocking(move || {
                log2.lock().expect("metrics log lock").append(&line)
            })
            .await?;
            match result {
                Ok(()) => {
                    next += 1;
                    if attempt > 0 {
                        info!(attempts = attempt + 1, "metrics log written again");
                        self.health.set_log_ok(true);
                        attempt = 0;
                    }
                }
                Err(e) => {
                    attempt += 1;
                    metrics::counter!(telemetry::METRICS_LOG_FAILURES).increment(1);
                    self.health.set_log_ok(false);
                    if self.shutdown.is_cancelled() {
                        let since = *stopping_since.get_or_insert_with(Instant::now);
                        if since.elapsed() >= LOG_RETRY_AT_SHUTDOWN {
                            return Err(anyhow::Error::new(e).context(
                                "cannot append to the metrics log; stopping with the packet published but not logged or committed",
                            ));
                        }
                    }
                    let wait = Duration::from_millis(250u64 << attempt.min(7)).min(MAX_LOG_BACKOFF);
                    if self.log_errors.allow() {
                        warn!(error = %e, attempt, "cannot append to the metrics log; the commit waits; retrying in {}", humantime::format_duration(wait));
                    }
                    tokio::time::sleep(wait).await;
                }
            }
        }
        Ok(())
    }

    /// Delivers the works of one job: every packet and dead letter published
    /// and every packet in the metrics log before the first work is
    /// acknowledged. Returns each work's acknowledgement, in order.
    async fn handle(
        &self,
        job: Vec<Work>,
        works: &mut mpsc::Receiver<Work>,
        ahead: &mut Ahead,
        acks: &std_mpsc::Sender<Ack>,
    ) -> anyhow::Result<Vec<Ack>> {
        let held = job.iter().map(held_events).sum();
        let built = Self::taking_ahead(self.build(job), held, works, ahead).await?;
        // The batches' columns are freed once their packets are built.
        if self.outcomes.is_some() {
            Self::taking_ahead(self.publish_transactions(built, acks), 0, works, ahead).await?;
            return Ok(Vec::new());
        }
        Self::taking_ahead(self.publish(built), 0, works, ahead).await
    }

    /// Analyses every batch of the job in one go and builds its packets, and
    /// builds the dead letters, pseudonymized when so configured (all on the
    /// blocking pool, so the runtime never stalls).
    async fn build(&self, job: Vec<Work>) -> anyhow::Result<Vec<Built>> {
        let limits: Limits = self.publisher.limits().await;
        let max_bytes = limits.packet_bytes();
        let analysed = Instant::now();
        let (settings, privacy, identity) = (
            self.settings.clone(),
            self.privacy.clone(),
            self.identity.clone(),
        );
        let dlq: Option<Arc<str>> = Some(self.settings.kafka.dlq_topic.as_str())
            .filter(|t| !t.is_empty())
            .map(Arc::from);
        let shares = self.shares.clone();
        let (built, batches) = tokio::task::spawn_blocking(move || {
            // Pseudonymizing a dead letter parses its payload: here, with the
            // analysis, rather than on the consumer thread or an async worker.
            let pseudonymized =
                settings.privacy.dead_letters == DeadLetters::Pseudonymized && privacy.is_active();
            let columns: Vec<&Columns> = job
                .iter()
                .filter(|_| shares.is_none())
                .flat_map(|w| w.batches.iter().map(|b| &b.columns))
                .collect();
            let batches = columns.len();
            let mut reports =
                analysis::analyze_many(&columns, &settings.analysis.slices, settings.analysis.top)?
                    .into_iter();
            let mut built = Vec::with_capacity(job.len());
            for mut work in job {
                let (internal, progress) = match &shares {
                    Some(out) => out.records(&mut work),
                    None => (Vec::new(), Vec::new()),
                };
                let Work {
                    batches,
                    dead_letters,
                    commit,
                    messages,
                    assignment,
                    ..
                } = work;
                let dead_letter_records: Vec<OutRecord> = match &dlq {
                    None => Vec::new(),
                    Some(dlq) if pseudonymized => dead_letters
                        .iter()
                        .map(|m| OutRecord::pseudonymized_dead_letter(dlq, m, &privacy))
                        .collect(),
                    Some(dlq) => dead_letters
                        .iter()
                        .map(|m| OutRecord::dead_letter(dlq, m))
                        .collect(),
                };
                let mut packets = Vec::with_capacity(batches.len());
                for mut batch in batches {
                    let reports = reports.next().expect("one list of reports per batch");
                    let packet = packet::build(&batch, &reports, &privacy, &identity, Utc::now());
                    let packet::Bounded { packet, json, cut } = packet::bounded(packet, max_bytes);
                    if let Some(cut) = cut {
                        if cut.over {
                            error!(
                                packet_id = %packet.packet_id,
                                bytes = json.len(),
                                max_bytes,
                                "packet larger than the output topic takes even without its duplicate rows; it will be refused (raise the output topic's max.message.bytes, and kafka.producer's message.max.bytes if it is the smaller)"
                            );
                        } else {
                            warn!(
                                packet_id = %packet.packet_id,
                                original_bytes = cut.original_bytes,
                                bytes = json.len(),
                                max_bytes,
                                values_cut = cut.values,
                                rows_left_out = cut.rows,
                                "packet larger than the output topic takes; long values cut and rows left out to fit (truncated = true)"
                            );
                        }
                    }
                    // The columns are the bulk of a batch; free them before delivery.
                    batch.columns = Columns::default();
                    packets.push((packet, json));
                }
                built.push(Built {
                    packets,
                    internal,
                    progress,
                    dead_letter_records,
                    dead_letters,
                    commit,
                    messages,
                    assignment,
                });
            }
            anyhow::Ok((built, batches))
        })
        .await??;
        // Per batch, its share of the job.
        if batches > 0 {
            let each = analysed.elapsed().as_secs_f64() / batches as f64;
            for _ in 0..batches {
                metrics::histogram!(telemetry::ANALYSIS_SECONDS).record(each);
            }
        }
        Ok(built)
    }

    /// The records of the works' packets and dead letters, in order, the
    /// packets' lines for the metrics log, and which records are packets.
    fn records(&self, built: &mut [Built]) -> (Vec<OutRecord>, Vec<String>, Vec<usize>) {
        let k = &self.settings.kafka;
        let output: Arc<str> = Arc::from(k.output_topic.as_str());
        let mut records = Vec::new();
        let mut lines = Vec::new();
        let mut packets = Vec::new();
        for work in built {
            records.append(&mut work.internal);
            for (packet, json) in &work.packets {
                packets.push(records.len());
                records.push(OutRecord {
                    topic: output.clone(),
                    key: Some(packet.packet_id.clone().into_bytes()),
                    payload: Arc::from(json.as_bytes()),
                    headers: vec![("content-type", b"application/json".to_vec())],
                    reducible: false,
                    partition: None,
                });
                lines.push(json.clone());
            }
            records.append(&mut work.dead_letter_records);
        }
        (records, lines, packets)
    }

    /// Names a job's records in an error: its first packet, or its dead letters.
    fn what(built: &[Built]) -> String {
        let packets: usize = built.iter().map(|w| w.packets.len()).sum();
        let dead_letters: usize = built.iter().map(|w| w.dead_letters.len()).sum();
        match built.iter().flat_map(|w| &w.packets).next() {
            Some((first, _)) if packets > 1 => {
                format!("packet {} and {} more", first.packet_id, packets - 1)
            }
            Some((first, _)) => format!("packet {}", first.packet_id),
            None if built.iter().any(|w| !w.internal.is_empty()) => {
                let shares: usize = built.iter().map(|w| w.internal.len()).sum();
                format!("{shares} share records and {dead_letters} dead letters")
            }
            None => format!("{dead_letters} dead letters"),
        }
    }

    /// Publishes the job's packets and dead letters, work by work in order,
    /// waits for every acknowledgement, appends the packets to the metrics
    /// log, then reports each work delivered.
    async fn publish(&self, mut built: Vec<Built>) -> anyhow::Result<Vec<Ack>> {
        let (records, lines, _) = self.records(&mut built);
        if !records.is_empty() {
            let what = Self::what(&built);
            self.publisher.deliver(&records).await.context(what)?;
        }
        let progress: Vec<OutRecord> = built
            .iter_mut()
            .flat_map(|w| std::mem::take(&mut w.progress))
            .collect();
        if !progress.is_empty() {
            self.publisher
                .deliver(&progress)
                .await
                .context("the progress records of the shares sent")?;
        }

        if let (Some(log), false) = (&self.metrics_log, lines.is_empty()) {
            self.append_to_log(log, lines).await?;
        }

        let mut acks = Vec::with_capacity(built.len());
        for work in built {
            self.delivered(&work);
            acks.push(Ack::delivered(work.commit, work.messages));
        }
        Ok(acks)
    }

    /// Exactly once: publishes the job in transactions, one per run of
    /// works read under one assignment, so that work given up at a
    /// revocation is aborted without the work read after it.
    async fn publish_transactions(
        &self,
        mut built: Vec<Built>,
        acks: &std_mpsc::Sender<Ack>,
    ) -> anyhow::Result<()> {
        while !built.is_empty() {
            let assignment = built[0].assignment;
            let n = built
                .iter()
                .take_while(|b| b.assignment == assignment)
                .count();
            let rest = built.split_off(n);
            self.transaction(built, acks).await?;
            built = rest;
        }
        Ok(())
    }

    /// Exactly once: sends the works' packets and dead letters in a new
    /// transaction and acknowledges it to the commit path, which adds the
    /// checkpoints and offsets and commits it. Only a committed transaction's
    /// packets go to the metrics log, the hooks and the counters. A
    /// transaction that fails is aborted, never left open (it would hold
    /// back every `read_committed` reader until the brokers time it out),
    /// and sent again, up to `kafka.delivery_attempts` times.
    async fn transaction(
        &self,
        mut built: Vec<Built>,
        acks: &std_mpsc::Sender<Ack>,
    ) -> anyhow::Result<()> {
        let Some(outcomes) = &self.outcomes else {
            anyhow::bail!("exactly once without a commit path");
        };
        let mut outcomes = outcomes.lock().await;
        let what = Self::what(&built);
        let (records, lines, packet_records) = self.records(&mut built);
        let mut records = self.publisher.fitted(&records).await;
        let mut commit = Vec::new();
        for w in &built {
            merge_points(&mut commit, w.commit.clone());
        }
        let messages: u64 = built.iter().map(|w| w.messages).sum();
        let attempts = self.settings.kafka.delivery_attempts;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let publisher = self.publisher.clone();
            tokio::task::spawn_blocking(move || publisher.begin())
                .await?
                .map_err(|e| anyhow::anyhow!("cannot begin a transaction: {e}"))?;
            let started = Instant::now();
            let sent = self.publisher.send_all(&records).await;
            metrics::histogram!(telemetry::DELIVERY_SECONDS)
                .record(started.elapsed().as_secs_f64());
            let mut failure = None;
            for (i, result) in sent.iter().enumerate() {
                if let Err(e) = result {
                    metrics::counter!(telemetry::DELIVERY_FAILURES).increment(1);
                    if let Some(cut) = self.publisher.refit(&records[i], e).await {
                        records[i] = cut;
                    }
                    failure.get_or_insert_with(|| e.to_string());
                }
            }
            let reason = match failure {
                Some(reason) => {
                    self.abort().await.context(what.clone())?;
                    format!("{reason} (the transaction is aborted)")
                }
                None => {
                    let logged = packet_records
                        .iter()
                        .zip(&lines)
                        .map(|(&i, _)| {
                            let (partition, offset) =
                                *sent[i].as_ref().expect("every record delivered");
                            Logged {
                                packet_id: String::from_utf8_lossy(
                                    records[i].key.as_deref().unwrap_or_default(),
                                )
                                .into_owned(),
                                partition,
                                offset,
                            }
                        })
                        .collect();
                    let ack = Ack::Delivered {
                        commit: commit.clone(),
                        messages,
                        works: built.len(),
                        logged,
                    };
                    if acks.send(ack).is_err() {
                        self.abort().await?;
                        anyhow::bail!("the consumer stopped before the transaction was committed; it is aborted");
                    }
                    match outcomes.recv().await {
                        Some(Outcome::Committed) => break,
                        Some(Outcome::Abandoned) => return Ok(()),
                        Some(Outcome::Aborted(reason)) => reason,
                        Some(Outcome::Stopped(reason)) => anyhow::bail!(reason),
                        None => {
                            self.abort().await?;
                            anyhow::bail!("the consumer stopped before the transaction was committed; it is aborted");
                        }
                    }
                }
            };
            if attempt >= attempts {
                return Err(anyhow::anyhow!(
                    "transaction not committed after {attempt} attempts: {reason}"
                ))
                .context(what);
            }
            let wait = crate::sink::publisher::backoff(attempt);
            warn!(attempt, of = attempts, error = %reason, "transaction not committed; sending its work again in a new one in {}", humantime::format_duration(wait));
            tokio::time::sleep(wait).await;
        }
        drop(outcomes);
        if let (Some(log), false) = (&self.metrics_log, lines.is_empty()) {
            self.append_to_log(log, lines).await?;
        }
        for work in &built {
            self.delivered(work);
        }
        Ok(())
    }

    /// Aborts the open transaction, on the blocking pool.
    async fn abort(&self) -> anyhow::Result<()> {
        let publisher = self.publisher.clone();
        tokio::task::spawn_blocking(move || publisher.abort())
            .await?
            .map_err(|e| anyhow::anyhow!("cannot abort the transaction: {e}"))
    }

    /// Counts and logs a delivered work.
    fn delivered(&self, work: &Built) {
        let k = &self.settings.kafka;
        metrics::counter!(telemetry::MESSAGES).increment(work.messages);
        // Late events are counted where they are judged, on the consumer thread.
        for m in work
            .dead_letters
            .iter()
            .filter(|m| m.kind != ErrorKind::Late)
        {
            metrics::counter!(telemetry::EVENTS_INVALID, "kind" => m.kind.as_str()).increment(1);
        }
        if !k.dlq_topic.is_empty() {
            metrics::counter!(telemetry::DEAD_LETTERS).increment(work.dead_letters.len() as u64);
        }
        for (packet, json) in &work.packets {
            metrics::counter!(telemetry::EVENTS_VALID).increment(packet.events.valid);
            metrics::counter!(telemetry::PACKETS).increment(1);
            metrics::counter!(telemetry::PACKET_BYTES).increment(json.len() as u64);
            self.progress.packets.fetch_add(1, Ordering::Relaxed);
            self.progress
                .packet_bytes
                .fetch_add(json.len() as u64, Ordering::Relaxed);
            // Logged once the packet is acknowledged and in the metrics log,
            // before the work is acknowledged for its commit; `sources`
            // names the offsets it covers.
            let sources: Vec<String> = packet
                .sources
                .iter()
                .map(|s| format!("{}:{}-{}", s.partition, s.first_offset, s.last_offset))
                .collect();
            info!(
                packet_id = %packet.packet_id,
                window_start = packet.window.start.as_deref().unwrap_or("-"),
                sources = %sources.join(","),
                valid = packet.events.valid,
                invalid = packet.events.invalid,
                late = packet.events.late.unwrap_or(0),
                bytes = json.len(),
                closed_by = %packet.window.closed_by,
                "packet published"
            );
            if let Some(hook) = &self.on_packet {
                hook(packet);
            }
        }
    }
}
