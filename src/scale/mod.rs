//! Several instances, one answer: the two stages of a group whose
//! instances merge each window through Kafka (`docs/scaling.md`).
//!
//! ```text
//!  user-login ─▶ stage 1 (each instance, its input partitions)
//!                 parse → windows per partition ([`crate::core::grouping::split`])
//!                 → shares + progress ──▶ {group}-shares (partitioned by window)
//!                 → dead letters
//!               stage 2 (each instance, its shares partitions) [`merging`]
//!                 merge ([`crate::core::merge`]) → analysis → packet
//!                 ──▶ login-metrics, the metrics log, the dashboard
//! ```
//!
//! Stage 1 is the usual consumer thread and delivery with two changes: each
//! partition is windowed on its own, and delivery sends each closed window
//! of a partition as a *share* (its events projected to the slices' fields)
//! to the shares topic instead of a packet, followed by the partition's
//! progress. Input offsets are committed once those are acknowledged, as
//! before. Stage 2 reads the shares topic in a consumer group of its own
//! (`{kafka.group_id}-merge`), merges each window once every input
//! partition has closed it, and hands the merged batches to the usual
//! delivery; the shares topic's offsets are committed after the packets,
//! with the merger's state in the commit's metadata.

pub mod merging;
pub mod shares;

use std::time::Duration;

use anyhow::Context;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::consumer::Consumer;
use rdkafka::types::RDKafkaErrorCode;
use serde::{Deserialize, Serialize};

use crate::kafka::{self, KafkaContext, KafkaSettings};

/// `[scale]`: how the instances of a group share the work.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScaleSettings {
    /// Window mode: the instances of the group merge each window through
    /// the shares topic, so that any number of them publishes the packets
    /// one would.
    pub merge: bool,
    /// The internal topic of shares; empty: `{kafka.group_id}-shares`.
    pub shares_topic: String,
}

impl ScaleSettings {
    /// The shares topic of `group`.
    pub fn shares_topic(&self, group: &str) -> String {
        match self.shares_topic.as_str() {
            "" => format!("{group}-shares"),
            t => t.to_string(),
        }
    }
}

/// The consumer group of stage 2: the shares topic's partitions are shared
/// among the instances independently of the input's.
pub fn merge_group(group: &str) -> String {
    format!("{group}-merge")
}

/// The partitions of `topic`, once the broker answers.
pub fn partitions(k: &KafkaSettings, topic: &str) -> anyhow::Result<i32> {
    let client: rdkafka::consumer::BaseConsumer<KafkaContext> = kafka::consumer(k)
        .create_with_context(KafkaContext("admin"))
        .context("cannot create a Kafka client")?;
    let md = client
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .with_context(|| format!("cannot read the metadata of {topic}"))?;
    let n = md
        .topics()
        .iter()
        .find(|t| t.name() == topic && t.error().is_none())
        .map_or(0, |t| t.partitions().len());
    anyhow::ensure!(n > 0, "the topic {topic} does not exist");
    Ok(n as i32)
}

/// Creates the shares topic with as many partitions as the input topic when
/// it does not exist, and returns its partition count.
pub async fn ensure_shares_topic(k: &KafkaSettings, topic: &str) -> anyhow::Result<i32> {
    let (k2, input) = (k.clone(), k.input_topic.clone());
    let inputs = tokio::task::spawn_blocking(move || partitions(&k2, &input)).await??;
    let (k2, t) = (k.clone(), topic.to_string());
    if let Ok(n) = tokio::task::spawn_blocking(move || partitions(&k2, &t)).await? {
        return Ok(n);
    }
    let admin: AdminClient<KafkaContext> = kafka::admin(k)
        .create_with_context(KafkaContext("admin"))
        .context("cannot create the Kafka admin client")?;
    let new = NewTopic::new(topic, inputs, TopicReplication::Fixed(-1));
    let results = admin
        .create_topics(&[new], &AdminOptions::new())
        .await
        .with_context(|| format!("cannot create the shares topic {topic} (scale.shares_topic)"))?;
    for r in results {
        match r {
            Ok(_) => tracing::info!(topic, partitions = inputs, "shares topic created"),
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((_, e)) => {
                anyhow::bail!("cannot create the shares topic {topic} (scale.shares_topic): {e}")
            }
        }
    }
    // Creation is asynchronous on the broker: wait until its metadata shows it.
    for _ in 0..100 {
        let (k2, t) = (k.clone(), topic.to_string());
        if let Ok(n) = tokio::task::spawn_blocking(move || partitions(&k2, &t)).await? {
            return Ok(n);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    anyhow::bail!("the shares topic {topic} was created but does not show in the metadata")
}
