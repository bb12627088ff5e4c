//! Exactly once: the metrics log after a crash.
//!
//! A transaction's packets are appended to the metrics log only once it is
//! committed, so a crash between the commit and the append leaves the log
//! without them, and nothing replays them: their offsets are committed.
//! Each transaction therefore carries a record of where its packets went
//! ([`checkpoint::logged_key`], in the checkpoint topic). At start, after
//! the transactional producer has fenced its predecessor (so that record is
//! final), [`recover`] reads it, and appends the packets the log does not
//! end with, read back from the output topic, in their order.

use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use tracing::{info, warn};

use crate::commit::checkpoint::CheckpointStore;
use crate::kafka::KafkaContext;
use crate::settings::KafkaSettings;
use crate::sink::metrics_log::MetricsLog;
use crate::work::Logged;

/// How much of the log's end is searched for the packets of the last
/// transaction: a transaction's packets are in the log's last lines.
const SEARCHED_BYTES: u64 = 16 * 1024 * 1024;
/// How long reading one packet back from the output topic may take.
const READ_BACK: Duration = Duration::from_secs(30);

/// Appends to `log` the packets of the last transaction recorded under
/// `key` that it does not end with; returns how many.
pub fn recover(
    k: &KafkaSettings,
    store: &CheckpointStore,
    key: &str,
    log: &mut MetricsLog,
    stall: Duration,
) -> anyhow::Result<usize> {
    let Some(logged) = store
        .read_logged(key, stall)
        .map_err(|e| anyhow!(e))
        .context("cannot read the record of the last committed packets")?
    else {
        return Ok(0);
    };
    let present = log
        .last_packet_ids(SEARCHED_BYTES)
        .context("cannot read the end of the metrics log")?;
    let missing: Vec<&Logged> = logged
        .iter()
        .filter(|p| !present.contains(&p.packet_id))
        .collect();
    if missing.is_empty() {
        return Ok(0);
    }
    warn!(
        packets = missing.len(),
        of = logged.len(),
        "the metrics log lacks packets of the last committed transaction (a crash between its commit and the append); reading them back from the output topic"
    );
    for p in &missing {
        let line = read_back(k, p)?;
        log.append(&line)
            .with_context(|| format!("cannot append packet {} to the metrics log", p.packet_id))?;
    }
    info!(packets = missing.len(), "metrics log recovered");
    Ok(missing.len())
}

/// The payload of the packet at `p`'s position in the output topic, as a
/// `read_committed` reader sees it.
fn read_back(k: &KafkaSettings, p: &Logged) -> anyhow::Result<String> {
    let mut config = crate::kafka::checkpoint_reader(k);
    config.set("enable.partition.eof", "false");
    let reader: BaseConsumer<KafkaContext> = config
        .create_with_context(KafkaContext("metrics log recovery"))
        .context("cannot create a reader of the output topic")?;
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(&k.output_topic, p.partition, Offset::Offset(p.offset))?;
    reader.assign(&tpl)?;
    let deadline = Instant::now() + READ_BACK;
    while Instant::now() < deadline {
        match reader.poll(Duration::from_millis(200)) {
            Some(Ok(m)) if m.offset() == p.offset => {
                let key = m.key().unwrap_or_default();
                if key != p.packet_id.as_bytes() {
                    bail!(
                        "{}:{}@{} holds another record than packet {} (the output topic was recreated?)",
                        k.output_topic,
                        p.partition,
                        p.offset,
                        p.packet_id
                    );
                }
                let payload = m.payload().unwrap_or_default();
                return Ok(String::from_utf8_lossy(payload).into_owned());
            }
            Some(Ok(m)) if m.offset() > p.offset => bail!(
                "packet {} is no longer at {}:{}@{} (deleted by retention?)",
                p.packet_id,
                k.output_topic,
                p.partition,
                p.offset
            ),
            Some(Ok(_)) | None => {}
            Some(Err(e)) => warn!(error = %e, "reading a packet back from the output topic"),
        }
    }
    bail!(
        "packet {} not read back from {}:{}@{} within {:?}",
        p.packet_id,
        k.output_topic,
        p.partition,
        p.offset,
        READ_BACK
    )
}
