//! What a process did, in the order it did it, read from its own JSON log
//! (stderr, one writer, so the lines are in the order they were written):
//! each packet acknowledged by Kafka and appended to the metrics log
//! ("packet published", with the offsets it covers), each commit ("offsets
//! committed", logged at debug by `login_metrics::offsets`), each revocation.
//!
//! A run whose order is checked must log `login_metrics::offsets` at debug:
//! add [`COMMIT_LOG`] to its environment.

use std::collections::{BTreeSet, HashMap};

use serde_json::Value;

/// The log level that makes a run log its commits.
pub const COMMIT_LOG: (&str, &str) = ("LOG__LEVEL", "info,login_metrics::offsets=debug");

/// One line of interest of a process's log.
#[derive(Debug, Clone, PartialEq)]
pub enum Logged {
    /// A packet acknowledged and in the metrics log: window mode's window
    /// start (ms), and the (partition, first, last) offset ranges it covers.
    Published {
        window_start: Option<i64>,
        sources: Vec<(i32, i64, i64)>,
    },
    /// Offsets committed: (partition, next offset to read).
    Committed(Vec<(i32, i64)>),
    /// A revocation began, with this much work handed to delivery and not yet settled.
    Revoked { in_flight: u64 },
}

/// The lines of interest of a JSON log, in order. Lines that are not JSON
/// (a line torn by kill -9, librdkafka's own output) are skipped.
pub fn logged(stderr: &str) -> Vec<Logged> {
    let mut out = Vec::new();
    for line in stderr.lines() {
        let Ok(v) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        match v["message"].as_str() {
            Some("packet published") => {
                let window_start = v["window_start"].as_str().filter(|s| *s != "-").map(|s| {
                    chrono::DateTime::parse_from_rfc3339(s)
                        .unwrap()
                        .timestamp_millis()
                });
                let sources = v["sources"]
                    .as_str()
                    .expect("the published line names its sources")
                    .split(',')
                    .filter(|s| !s.is_empty())
                    .map(|s| {
                        let (p, range) = s.split_once(':').unwrap();
                        let (a, b) = range.split_once('-').unwrap();
                        (p.parse().unwrap(), a.parse().unwrap(), b.parse().unwrap())
                    })
                    .collect();
                out.push(Logged::Published {
                    window_start,
                    sources,
                });
            }
            Some("offsets committed") => {
                let offsets = v["offsets"]
                    .as_str()
                    .unwrap()
                    .split(',')
                    .map(|pair| {
                        let (p, o) = pair.split_once(':').unwrap();
                        (p.parse().unwrap(), o.parse().unwrap())
                    })
                    .collect();
                out.push(Logged::Committed(offsets));
            }
            Some(m) if m.starts_with("revoke: ") => out.push(Logged::Revoked {
                in_flight: v["in_flight"].as_u64().unwrap(),
            }),
            _ => {}
        }
    }
    out
}

/// How many packets a process logged as published.
pub fn published_count(stderr: &str) -> usize {
    logged(stderr)
        .iter()
        .filter(|l| matches!(l, Logged::Published { .. }))
        .count()
}

/// Arrival mode, one process: every commit is preceded, in the process's own
/// log, by published packets that cover every offset it commits. On each
/// partition the covered range starts at `base` (the committed offset the
/// process started from), or, for a partition without one, at the lowest
/// offset the process published there before the commit (a partition it took
/// over from another instance). Returns the last committed offset of each
/// partition and the number of commits checked.
pub fn check_arrival_commit_order(
    name: &str,
    stderr: &str,
    base: &HashMap<i32, i64>,
) -> (HashMap<i32, i64>, usize) {
    let mut covered: HashMap<i32, BTreeSet<i64>> = HashMap::new();
    // Per partition: every offset below this one is known to be covered.
    let mut proven: HashMap<i32, i64> = HashMap::new();
    let mut last: HashMap<i32, i64> = HashMap::new();
    let mut commits = 0;
    for (line, l) in logged(stderr).into_iter().enumerate() {
        match l {
            Logged::Published { sources, .. } => {
                for (p, a, b) in sources {
                    covered.entry(p).or_default().extend(a..=b);
                }
            }
            Logged::Committed(offsets) => {
                commits += 1;
                for (p, o) in offsets {
                    let set = covered.entry(p).or_default();
                    let from = match (proven.get(&p), base.get(&p)) {
                        (Some(x), _) => *x,
                        (None, Some(b)) => (*b).max(0),
                        (None, None) => *set.first().unwrap_or_else(|| {
                            panic!("{name}: commit {p}:{o} (log entry {line}) before any packet of partition {p}")
                        }),
                    };
                    if let Some(missing) = (from..o).find(|x| !set.contains(x)) {
                        panic!(
                            "{name}: committed {p}:{o} (log entry {line}) before a packet covering offset {missing} was published"
                        );
                    }
                    proven.insert(p, from.max(o));
                    last.insert(p, o);
                }
            }
            Logged::Revoked { .. } => {}
        }
    }
    (last, commits)
}
