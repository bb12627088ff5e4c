//! The pipeline run inside the test process (`Pipeline::run`), started and
//! stopped by the test.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use login_metrics::core::event::Field;
use login_metrics::core::packet::Packet;
use login_metrics::settings::Settings;
use login_metrics::{Pipeline, RunSummary};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

#[allow(unused_imports)]
use super::*;

/// Runs the pipeline with `settings` until `messages` input messages are
/// consumed, stops it (shutdown flushes the open batch), and returns the run's
/// summary and the output topic's packets.
pub async fn run_to_end(settings: Settings, messages: u64) -> (RunSummary, Vec<Packet>) {
    let bootstrap = settings.kafka.bootstrap_servers.clone();
    let run = start(settings);
    run.consumed(messages, Duration::from_secs(60)).await;
    let summary = run.stop().await.expect("the run succeeds");
    (summary, read_packets(&bootstrap))
}

/// A pipeline run in the background, stopped by [`Running::stop`].
pub struct Running {
    pub shutdown: CancellationToken,
    pub progress: Arc<login_metrics::Progress>,
    pub packets: Arc<Mutex<Vec<Packet>>>,
    handle: tokio::task::JoinHandle<anyhow::Result<RunSummary>>,
}

pub fn start(settings: Settings) -> Running {
    let packets = Arc::new(Mutex::new(Vec::new()));
    let sink = packets.clone();
    let pipeline = Pipeline::new(settings).on_packet(move |p| sink.lock().unwrap().push(p.clone()));
    let progress = pipeline.progress();
    let shutdown = CancellationToken::new();
    let handle = tokio::spawn(pipeline.run(shutdown.clone()));
    Running {
        shutdown,
        progress,
        packets,
        handle,
    }
}

impl Running {
    /// Waits until `messages` input messages have been consumed.
    pub async fn consumed(&self, messages: u64, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let seen = self
                .progress
                .messages
                .load(std::sync::atomic::Ordering::Relaxed);
            if seen >= messages {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "only {seen} of {messages} messages consumed in {timeout:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until `n` packets have been delivered.
    pub async fn delivered(&self, n: usize, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.packets.lock().unwrap().len() < n {
            assert!(
                Instant::now() < deadline,
                "fewer than {n} packets in {timeout:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn stop(mut self) -> anyhow::Result<RunSummary> {
        self.shutdown.cancel();
        (&mut self.handle).await.expect("pipeline task")
    }

    /// Waits for the run to end by itself (a failure).
    pub async fn join(mut self, timeout: Duration) -> anyhow::Result<RunSummary> {
        tokio::time::timeout(timeout, &mut self.handle)
            .await
            .expect("the run ended in time")
            .expect("pipeline task")
    }
}

/// A test that fails stops its run, so that the runtime can shut down and
/// the failure is reported instead of waiting for the consumer thread forever.
impl Drop for Running {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}
