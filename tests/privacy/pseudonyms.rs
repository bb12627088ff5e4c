//! Privacy: with `privacy.pseudonymize = [ip, device_id]`, no raw IP or
//! device id of the input appears in the output topic, the metrics log or the
//! process's logs, while the duplicate counts equal those of a run without it.
//! The same key gives the same pseudonyms across runs; another key other ones.

use std::collections::BTreeSet;
use std::io::Write;
use std::sync::Mutex;

use crate::common::*;
use login_metrics::core::event::Field;
use login_metrics::core::packet::Packet;
use login_metrics::core::privacy::Pseudonymizer;
use rdkafka::mocking::MockCluster;
use serde_json::Value;

static LOGS: Mutex<Vec<u8>> = Mutex::new(Vec::new());

struct Capture;
impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        LOGS.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

struct Outcome {
    packets: Vec<Packet>,
    topic_text: String,
    log_file: String,
}

async fn run_once(inputs: &[Input], malformed: &[bool], privacy: &[(&str, &str)]) -> Outcome {
    let c = MockCluster::new(1).unwrap();
    c.create_topic(INPUT, 1, 1).unwrap();
    c.create_topic(OUTPUT, 1, 1).unwrap();
    c.create_topic(DLQ, 1, 1).unwrap();
    let bs = c.bootstrap_servers();
    produce_input(&bs, inputs, malformed);
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("m.log");
    let mut overrides = vec![
        ("BATCH__MAX_EVENTS", "1500"),
        ("BATCH__MAX_SPAN", "1h"),
        ("ANALYSIS__TOP", "50"),
    ];
    overrides.extend_from_slice(privacy);
    let run = start(settings(&bs, &log, &overrides));
    run.consumed(inputs.len() as u64, std::time::Duration::from_secs(60))
        .await;
    run.stop().await.unwrap();
    let topic_text = read_all(&bs, OUTPUT)
        .iter()
        .map(|r| String::from_utf8(r.payload.clone()).unwrap())
        .collect::<Vec<_>>()
        .join("\n");
    Outcome {
        packets: read_packets(&bs),
        topic_text,
        log_file: std::fs::read_to_string(&log).unwrap(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pseudonymized_fields_never_leave_the_process_and_counts_stay_exact() {
    tracing_subscriber::fmt()
        .with_env_filter("info")
        .with_ansi(false)
        .with_writer(|| Capture)
        .init();
    let (inputs, malformed) = generated_input(81, 1_500, 6_000, 1);
    let mut raw: BTreeSet<String> = BTreeSet::new();
    for (inp, bad) in inputs.iter().zip(&malformed) {
        if !bad {
            let v: Value = serde_json::from_slice(&inp.payload).unwrap();
            for f in ["ip", "device_id"] {
                if let Some(s) = v.get(f).and_then(Value::as_str) {
                    raw.insert(s.to_string());
                }
            }
        }
    }
    assert!(raw.len() > 1000, "{} distinct raw values", raw.len());

    let plain = run_once(&inputs, &malformed, &[]).await;
    LOGS.lock().unwrap().clear();
    let key1 = [
        ("PRIVACY__PSEUDONYMIZE", "ip,device_id"),
        ("PRIVACY__KEY", "key-one"),
    ];
    let first = run_once(&inputs, &malformed, &key1).await;
    let logs = String::from_utf8(LOGS.lock().unwrap().clone()).unwrap();
    assert!(logs.contains("packet published"), "the run logged: {logs}");

    // The plain run is the control: the raw values are there without pseudonymization.
    assert!(raw.iter().any(|v| plain.topic_text.contains(v.as_str())));
    for v in &raw {
        assert!(
            !first.topic_text.contains(v.as_str()),
            "raw {v} in the output topic"
        );
        assert!(
            !first.log_file.contains(v.as_str()),
            "raw {v} in the metrics log"
        );
        assert!(!logs.contains(v.as_str()), "raw {v} in the process logs");
    }

    // Counts are identical; values are the keyed pseudonyms of the raw ones.
    let p = Pseudonymizer::new(b"key-one", &[Field::Ip, Field::DeviceId]);
    assert_eq!(plain.packets.len(), first.packets.len());
    for (a, b) in plain.packets.iter().zip(&first.packets) {
        assert_eq!(a.sources, b.sources);
        assert_eq!(a.events, b.events);
        for (ma, mb) in a.metrics.iter().zip(&b.metrics) {
            assert_eq!(
                (ma.groups, ma.duplicate_groups, ma.truncated),
                (mb.groups, mb.duplicate_groups, mb.truncated)
            );
            assert_eq!(ma.duplicates.len(), mb.duplicates.len());
            for (ra, rb) in ma.duplicates.iter().zip(&mb.duplicates) {
                assert_eq!(ra["count"], rb["count"]);
                for f in &ma.slice {
                    let expected = match (f.as_str(), &ra[f]) {
                        ("ip" | "device_id", Value::String(s)) => Value::String(p.pseudonym(s)),
                        (_, other) => other.clone(),
                    };
                    assert_eq!(rb[f], expected, "{f}");
                }
            }
        }
    }

    // Same key, same pseudonyms; another key, other pseudonyms.
    let again = run_once(&inputs, &malformed, &key1).await;
    let other = run_once(
        &inputs,
        &malformed,
        &[
            ("PRIVACY__PSEUDONYMIZE", "ip,device_id"),
            ("PRIVACY__KEY", "key-two"),
        ],
    )
    .await;
    let metrics = |o: &Outcome| {
        o.packets
            .iter()
            .map(|p| serde_json::to_value(&p.metrics).unwrap())
            .collect::<Vec<_>>()
    };
    assert_eq!(metrics(&first), metrics(&again));
    let ip_slice = first.packets[0]
        .metrics
        .iter()
        .position(|m| m.slice == ["ip"])
        .unwrap();
    let top_ip = |o: &Outcome| o.packets[0].metrics[ip_slice].duplicates[0]["ip"].clone();
    assert_ne!(top_ip(&first), top_ip(&other));
    assert_eq!(
        first.packets[0].metrics[ip_slice].duplicates[0]["count"],
        other.packets[0].metrics[ip_slice].duplicates[0]["count"]
    );
}
