//! Delivery: from closed work to acknowledged output.
//!
//! For each [`Work`], in order: analyze every batch with Polars (on the
//! blocking pool, so the runtime never stalls), build its packet, publish the
//! packets and dead letters and wait for every acknowledgement, append the
//! packets to the metrics log, then acknowledge the work to the consumer
//! thread, which commits its offsets ([`crate::commit::ledger::Ledger`]). A work that
//! cannot be delivered is reported with its reason and ends delivery: nothing
//! after it may be committed.

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
use crate::core::privacy::Pseudonymizer;
use crate::settings::Settings;
use crate::sink::metrics_log::MetricsLog;
use crate::sink::publisher::{OutRecord, Publisher};
use crate::telemetry::{self, Health, LogLimit, Progress};
use crate::work::{Columns, Work};

pub use crate::work::Ack;

pub type PacketHook = Arc<dyn Fn(&Packet) + Send + Sync>;

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
}

/// The longest wait between two attempts to append to the metrics log.
const MAX_LOG_BACKOFF: Duration = Duration::from_secs(5);
/// How long the metrics log is still retried once shutdown was requested.
pub const LOG_RETRY_AT_SHUTDOWN: Duration = Duration::from_secs(10);

impl Delivery {
    /// Delivers work until the channel closes or a work fails.
    pub async fn run(self, mut works: mpsc::Receiver<Work>, acks: std_mpsc::Sender<Ack>) {
        while let Some(work) = works.recv().await {
            let ack = match self.handle(work).await {
                Ok(ack) => ack,
                Err(e) => {
                    let reason = format!("{e:#}");
                    error!(error = %reason, "work not delivered; its offsets will not be committed");
                    let _ = acks.send(Ack::Failed(reason));
                    return;
                }
            };
            if acks.send(ack).is_err() {
                return;
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

    async fn handle(&self, work: Work) -> anyhow::Result<Ack> {
        let Work {
            batches,
            dead_letters,
            commit,
            messages,
            ..
        } = work;
        let analysed = Instant::now();
        let (settings, privacy, identity) = (
            self.settings.clone(),
            self.privacy.clone(),
            self.identity.clone(),
        );
        let built: Vec<(Packet, String, Option<i64>)> = tokio::task::spawn_blocking(move || {
            let mut out = Vec::with_capacity(batches.len());
            for mut batch in batches {
                let reports = analysis::analyze(
                    &batch.columns,
                    &settings.analysis.slices,
                    settings.analysis.top,
                )?;
                let packet = packet::build(&batch, &reports, &privacy, &identity, Utc::now());
                let json = packet.to_json();
                // The columns are the bulk of a batch; free them before delivery.
                batch.columns = Columns::default();
                let ts_max = batch.ts_max_ms;
                out.push((packet, json, ts_max));
            }
            anyhow::Ok(out)
        })
        .await??;
        if !built.is_empty() {
            metrics::histogram!(telemetry::ANALYSIS_SECONDS)
                .record(analysed.elapsed().as_secs_f64());
        }

        let k = &self.settings.kafka;
        let mut records = Vec::with_capacity(built.len() + dead_letters.len());
        let output: Arc<str> = Arc::from(k.output_topic.as_str());
        for (packet, json, _) in &built {
            records.push(OutRecord {
                topic: output.clone(),
                key: Some(packet.packet_id.clone().into_bytes()),
                payload: Arc::from(json.as_bytes()),
                headers: vec![("content-type", b"application/json".to_vec())],
                reducible: false,
            });
        }
        if !k.dlq_topic.is_empty() {
            let dlq: Arc<str> = Arc::from(k.dlq_topic.as_str());
            records.extend(dead_letters.iter().map(|m| OutRecord::dead_letter(&dlq, m)));
        }
        if !records.is_empty() {
            let what = built
                .first()
                .map(|(p, _, _)| format!("packet {}", p.packet_id))
                .unwrap_or_else(|| format!("{} dead letters", dead_letters.len()));
            self.publisher.deliver(&records).await.context(what)?;
        }

        if let (Some(log), false) = (&self.metrics_log, built.is_empty()) {
            let lines: Vec<String> = built.iter().map(|(_, json, _)| json.clone()).collect();
            self.append_to_log(log, lines).await?;
        }

        metrics::counter!(telemetry::MESSAGES).increment(messages);
        // Late events are counted where they are judged, on the consumer thread.
        for m in dead_letters.iter().filter(|m| m.kind != ErrorKind::Late) {
            metrics::counter!(telemetry::EVENTS_INVALID, "kind" => m.kind.as_str()).increment(1);
        }
        if !k.dlq_topic.is_empty() {
            metrics::counter!(telemetry::DEAD_LETTERS).increment(dead_letters.len() as u64);
        }
        for (packet, json, _) in &built {
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
        Ok(Ack::Delivered { commit, messages })
    }
}
