//! `[batch]`: how events are grouped into packets, and what the grouping
//! rules require of the keys.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::values::{Findings, MAX_INT};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchSettings {
    pub mode: BatchMode,
    pub max_events: usize,
    #[serde(with = "humantime_serde")]
    pub max_span: Duration,
    #[serde(with = "humantime_serde")]
    pub max_wait: Duration,
    /// Window mode: distance between window starts; `None` for tumbling windows.
    #[serde(with = "crate::values::optional_duration")]
    pub hop: Option<Duration>,
    #[serde(with = "humantime_serde")]
    pub grace: Duration,
    #[serde(with = "humantime_serde")]
    pub idle: Duration,
    pub late: LateSetting,
    pub max_buffered: usize,
}

crate::choice!(
    /// Event-time windows closed by watermark (the same input gives the same
    /// packets), or whatever arrived together, closed by count, span or wait.
    BatchMode { Window, Arrival }
);
crate::choice!(
    /// The fate of late events in window mode.
    LateSetting { Dlq, Drop }
);

impl BatchSettings {
    pub fn check(&self, f: &mut Findings) {
        f.bounded("batch.max_events", self.max_events as u64, 1, MAX_INT);
        f.bounded("batch.max_buffered", self.max_buffered as u64, 1, MAX_INT);
        f.positive("batch.max_wait", self.max_wait);
        f.positive("batch.idle", self.idle);
        if self.mode != BatchMode::Window {
            return;
        }
        if self.max_span < Duration::from_millis(1) {
            f.add("batch.max_span", "must be at least 1ms in window mode");
        } else if let Some(h) = self.hop {
            let (span, hop) = (self.max_span.as_millis(), h.as_millis());
            if hop == 0 || h > self.max_span || !span.is_multiple_of(hop) {
                let span = humantime::format_duration(self.max_span);
                f.add("batch.hop", format!("must divide batch.max_span ({span})"));
            }
        }
    }
}
