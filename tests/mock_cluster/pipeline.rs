//! The pipeline against librdkafka's in-process mock cluster: counts, closing
//! rules, dead letters, commits, restarts and produce failures. Every run goes
//! through the real consumer, producer and group protocol of librdkafka.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::common::*;
use login_metrics::core::event::ErrorKind;
use rdkafka::mocking::MockCluster;
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
use serde_json::{json, Value};

const T: Duration = Duration::from_secs(60);

fn cluster(partitions: i32) -> MockCluster<'static, rdkafka::producer::DefaultProducerContext> {
    let c = MockCluster::new(1).expect("mock cluster");
    c.create_topic(INPUT, partitions, 1).unwrap();
    c.create_topic(OUTPUT, 1, 1).unwrap();
    c.create_topic(DLQ, 1, 1).unwrap();
    c
}

fn valid_event(user: &str, ip: &str, ts_secs: i64) -> String {
    event_json(
        &[
            ("user_id", Some(user)),
            ("ip", Some(ip)),
            ("app_version", Some("2.3.0")),
            ("device_type", Some("android")),
            ("locale", Some("US")),
            ("device_id", Some("d-1")),
        ],
        json!(ts_secs),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn packet_counts_equal_a_naive_count_over_the_same_batches() {
    let c = cluster(3);
    let bs = c.bootstrap_servers();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("metrics.log");

    let (inputs, malformed) = generated_input(11, 3_000, 24_000, 3);
    let input = produce_input(&bs, &inputs, &malformed);
    let s = settings(
        &bs,
        &log,
        &[
            ("BATCH__MAX_EVENTS", "3000"),
            ("ANALYSIS__TOP", "25"),
            ("BATCH__MAX_SPAN", "1h"),
        ],
    );
    let (summary, packets) = run_to_end(s, inputs.len() as u64).await;
    assert_eq!(summary.messages, inputs.len() as u64);
    assert!(packets.len() >= 8, "{} packets", packets.len());
    let covered = verify_packets(&packets, &input, &default_slices(), 25);
    assert!(
        packets.iter().flat_map(|p| &p.metrics).any(|m| m.truncated),
        "the data exercises truncation"
    );
    assert_eq!(covered.len(), inputs.len(), "every input offset is covered");
    assert!(
        covered.values().all(|&n| n == 1),
        "no offset is covered twice"
    );

    // Every packet matches the schema, and the log file holds the same packets as the topic.
    let topic_values: Vec<Value> = packets
        .iter()
        .map(|p| serde_json::to_value(p).unwrap())
        .collect();
    assert_schema_valid(&topic_values);
    let log_values: Vec<Value> = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(log_values, topic_values);

    // Committed offsets are last + 1 of the emitted batches.
    let mut last: BTreeMap<i32, i64> = BTreeMap::new();
    for p in &packets {
        for s in &p.sources {
            let e = last.entry(s.partition).or_insert(-1);
            *e = (*e).max(s.last_offset);
        }
    }
    let expected: Vec<i64> = (0..3).map(|p| last[&p] + 1).collect();
    assert_eq!(committed(&bs, "login-metrics", 3), expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn count_closes_batches_at_max_events_and_shutdown_flushes_the_rest() {
    let c = cluster(1);
    let bs = c.bootstrap_servers();
    let dir = tempfile::tempdir().unwrap();
    let events: Vec<Input> = (0..250)
        .map(|i| {
            input(
                0,
                valid_event(&format!("u{}", i % 7), "10.0.0.1", 1_700_000_000),
            )
        })
        .collect();
    produce(&bs, INPUT, &events);
    let (_, packets) = run_to_end(
        settings(
            &bs,
            &dir.path().join("m.log"),
            &[("BATCH__MAX_EVENTS", "100")],
        ),
        250,
    )
    .await;
    let shape: Vec<(String, u64, i64, i64)> = packets
        .iter()
        .map(|p| {
            (
                p.window.closed_by.clone(),
                p.events.valid,
                p.sources[0].first_offset,
                p.sources[0].last_offset,
            )
        })
        .collect();
    assert_eq!(
        shape,
        vec![
            ("count".into(), 100, 0, 99),
            ("count".into(), 100, 100, 199),
            ("shutdown".into(), 50, 200, 249),
        ]
    );
    assert_eq!(committed(&bs, "login-metrics", 1), vec![250]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn span_closes_before_the_event_that_would_exceed_it() {
    let c = cluster(1);
    let bs = c.bootstrap_servers();
    let dir = tempfile::tempdir().unwrap();
    let base = 1_700_000_000;
    let events: Vec<Input> = [0, 5, 10, 11, 30]
        .iter()
        .map(|d| input(0, valid_event("u", "10.0.0.1", base + d)))
        .collect();
    produce(&bs, INPUT, &events);
    let (_, packets) = run_to_end(
        settings(
            &bs,
            &dir.path().join("m.log"),
            &[("BATCH__MAX_SPAN", "10s")],
        ),
        5,
    )
    .await;
    let shape: Vec<(String, u64, Option<String>, Option<String>)> = packets
        .iter()
        .map(|p| {
            (
                p.window.closed_by.clone(),
                p.events.valid,
                p.window.ts_min.clone(),
                p.window.ts_max.clone(),
            )
        })
        .collect();
    let t = |d: i64| {
        Some(login_metrics::core::packet::rfc3339_millis(
            (base + d) * 1000,
        ))
    };
    assert_eq!(
        shape,
        vec![
            ("span".into(), 3, t(0), t(10)),
            ("span".into(), 1, t(11), t(11)),
            ("shutdown".into(), 1, t(30), t(30)),
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_closes_a_quiet_batch_after_max_wait() {
    let c = cluster(1);
    let bs = c.bootstrap_servers();
    let dir = tempfile::tempdir().unwrap();
    let first: Vec<Input> = (0..5)
        .map(|_| input(0, valid_event("u", "ip", 1_700_000_000)))
        .collect();
    produce(&bs, INPUT, &first);
    let run = start(settings(
        &bs,
        &dir.path().join("m.log"),
        &[("BATCH__MAX_WAIT", "1s")],
    ));
    // No shutdown, no count, no span: only the wall clock can close this batch.
    run.delivered(1, T).await;
    {
        let packets = run.packets.lock().unwrap();
        assert_eq!(packets[0].window.closed_by, "wait");
        assert_eq!(packets[0].events.valid, 5);
    }
    let second: Vec<Input> = (0..3)
        .map(|_| input(0, valid_event("v", "ip", 1_700_000_001)))
        .collect();
    produce(&bs, INPUT, &second);
    run.consumed(8, T).await;
    run.stop().await.unwrap();
    let packets = read_packets(&bs);
    assert_eq!(packets.len(), 2);
    assert_eq!(packets[1].window.closed_by, "shutdown");
    assert_eq!(packets[1].events.valid, 3);
    assert_eq!(packets[1].sources[0].first_offset, 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_messages_of_every_kind_reach_the_dead_letter_topic() {
    let c = cluster(1);
    let bs = c.bootstrap_servers();
    let dir = tempfile::tempdir().unwrap();
    let cases: Vec<(Option<ErrorKind>, Vec<u8>, Option<&str>)> = vec![
        (
            None,
            valid_event("a", "1.1.1.1", 1_700_000_000).into_bytes(),
            None,
        ),
        (
            Some(ErrorKind::NotJson),
            b"user_id=a;ts=1".to_vec(),
            Some("k1"),
        ),
        (
            None,
            valid_event("a", "1.1.1.1", 1_700_000_001).into_bytes(),
            None,
        ),
        (Some(ErrorKind::NotObject), b"[\"a\", 1]".to_vec(), None),
        (
            Some(ErrorKind::MissingField),
            br#"{"ip":"1.1.1.1","timestamp":1700000000}"#.to_vec(),
            None,
        ),
        (
            None,
            valid_event("b", "2.2.2.2", 1_700_000_002).into_bytes(),
            None,
        ),
        (
            Some(ErrorKind::BadTimestamp),
            br#"{"user_id":"a","timestamp":"soon"}"#.to_vec(),
            None,
        ),
        (
            Some(ErrorKind::WrongType),
            br#"{"user_id":"a","ip":12,"timestamp":1}"#.to_vec(),
            None,
        ),
        (Some(ErrorKind::NotJson), Vec::new(), None),
        (
            None,
            valid_event("a", "1.1.1.1", 1_700_000_003).into_bytes(),
            Some("k2"),
        ),
    ];
    let inputs: Vec<Input> = cases
        .iter()
        .map(|(_, p, k)| Input {
            partition: 0,
            key: k.map(str::to_owned),
            payload: p.clone(),
        })
        .collect();
    produce(&bs, INPUT, &inputs);
    let (summary, packets) = run_to_end(
        settings(&bs, &dir.path().join("m.log"), &[]),
        cases.len() as u64,
    )
    .await;
    assert_eq!((summary.valid, summary.invalid), (4, 6));

    let dead = read_all(&bs, DLQ);
    let expected: Vec<(usize, ErrorKind)> = cases
        .iter()
        .enumerate()
        .filter_map(|(i, (k, _, _))| k.map(|k| (i, k)))
        .collect();
    assert_eq!(dead.len(), expected.len());
    for (d, (offset, kind)) in dead.iter().zip(&expected) {
        assert_eq!(d.payload, cases[*offset].1, "original bytes");
        assert_eq!(d.key.as_deref(), cases[*offset].2.map(str::as_bytes));
        assert_eq!(d.headers["error.kind"], kind.as_str());
        assert!(!d.headers["error.reason"].is_empty());
        assert_eq!(d.headers["source.topic"], INPUT);
        assert_eq!(d.headers["source.partition"], "0");
        assert_eq!(d.headers["source.offset"], offset.to_string());
    }

    assert_eq!(packets.len(), 1);
    let p = &packets[0];
    assert_eq!((p.events.valid, p.events.invalid), (4, 6));
    assert_eq!(p.events.invalid_by_kind["not_json"], 2);
    assert_eq!(p.events.invalid_by_kind["wrong_type"], 1);
    assert_eq!(
        (p.sources[0].first_offset, p.sources[0].last_offset),
        (0, 9)
    );
    // The valid events around the bad ones are counted: (a, 1.1.1.1) three times.
    let user_ip = p
        .metrics
        .iter()
        .position(|m| m.slice == ["user_id", "ip"])
        .unwrap();
    assert_eq!(
        packet_rows(p, user_ip),
        vec![(vec![Some("a".into()), Some("1.1.1.1".into())], 3)]
    );
    assert_eq!(committed(&bs, "login-metrics", 1), vec![10]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_reprocesses_nothing_committed_and_skips_nothing_uncommitted() {
    let c = cluster(2);
    let bs = c.bootstrap_servers();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("m.log");
    let overrides = [("BATCH__MAX_EVENTS", "50"), ("KAFKA__GROUP_ID", "restart")];
    let batch1: Vec<Input> = (0..120)
        .map(|i| input(i % 2, valid_event(&format!("u{i}"), "ip", 1_700_000_000)))
        .collect();
    produce(&bs, INPUT, &batch1);
    let (_, first) = run_to_end(settings(&bs, &log, &overrides), 120).await;
    assert_eq!(committed(&bs, "restart", 2), vec![60, 60]);

    let batch2: Vec<Input> = (0..40)
        .map(|i| input(i % 2, valid_event(&format!("w{i}"), "ip", 1_700_000_000)))
        .collect();
    produce(&bs, INPUT, &batch2);
    let (summary, all) = run_to_end(settings(&bs, &log, &overrides), 40).await;
    assert_eq!(summary.messages, 40, "nothing committed is read again");
    let second = &all[first.len()..];
    let mut covered: BTreeMap<i32, Vec<i64>> = BTreeMap::new();
    for p in second {
        for s in &p.sources {
            covered
                .entry(s.partition)
                .or_default()
                .extend(s.first_offset..=s.last_offset);
        }
    }
    for offsets in covered.values_mut() {
        offsets.sort();
    }
    let expected: Vec<i64> = (60..80).collect();
    assert_eq!(covered[&0], expected, "partition 0 resumes at the commit");
    assert_eq!(covered[&1], expected, "partition 1 resumes at the commit");
    assert_eq!(committed(&bs, "restart", 2), vec![80, 80]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_produce_is_retried_and_then_committed() {
    let c = cluster(1);
    let bs = c.bootstrap_servers();
    let dir = tempfile::tempdir().unwrap();
    let events: Vec<Input> = (0..50)
        .map(|i| input(0, valid_event(&format!("u{i}"), "ip", 1_700_000_000)))
        .collect();
    produce(&bs, INPUT, &events);
    // A permanent error on the first produce request: librdkafka gives up on
    // the message at once, so only the pipeline's own retry can deliver it.
    c.request_errors(
        RDKafkaApiKey::Produce,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_MSG_SIZE_TOO_LARGE],
    );
    let run = start(settings(
        &bs,
        &dir.path().join("m.log"),
        &[
            ("BATCH__MAX_EVENTS", "50"),
            ("KAFKA__DELIVERY_ATTEMPTS", "3"),
        ],
    ));
    run.delivered(1, T).await;
    run.stop().await.expect("the retry delivered the batch");
    let packets = read_packets(&bs);
    assert_eq!(packets.len(), 1, "the failed attempt left no packet behind");
    assert_eq!(packets[0].events.valid, 50);
    assert_eq!(committed(&bs, "login-metrics", 1), vec![50]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_undeliverable_batch_is_never_committed_and_is_processed_again() {
    let c = cluster(1);
    let bs = c.bootstrap_servers();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("m.log");
    let events: Vec<Input> = (0..50)
        .map(|i| input(0, valid_event(&format!("u{i}"), "ip", 1_700_000_000)))
        .collect();
    produce(&bs, INPUT, &events);
    c.request_errors(
        RDKafkaApiKey::Produce,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_MSG_SIZE_TOO_LARGE; 20],
    );
    let overrides = [
        ("BATCH__MAX_EVENTS", "50"),
        ("KAFKA__DELIVERY_ATTEMPTS", "2"),
    ];
    let run = start(settings(&bs, &log, &overrides));
    let err = run
        .join(T)
        .await
        .expect_err("the run stops on an undeliverable batch");
    assert!(format!("{err:#}").contains("undelivered"), "{err:#}");
    assert_eq!(
        committed(&bs, "login-metrics", 1),
        vec![-1],
        "nothing committed"
    );
    assert!(read_all(&bs, OUTPUT).is_empty());
    assert!(
        std::fs::read_to_string(&log).unwrap_or_default().is_empty(),
        "not in the log either"
    );

    c.clear_request_errors(RDKafkaApiKey::Produce);
    let run = start(settings(&bs, &log, &overrides));
    run.delivered(1, T).await;
    run.stop().await.unwrap();
    let packets = read_packets(&bs);
    assert_eq!(packets.len(), 1);
    assert_eq!(
        (
            packets[0].sources[0].first_offset,
            packets[0].sources[0].last_offset
        ),
        (0, 49)
    );
    assert_eq!(committed(&bs, "login-metrics", 1), vec![50]);
}

/// A packet of each mode as the service builds it, through its own grouping,
/// analysis and packet builder (no broker): an arrival batch closed by
/// shutdown, and a window closed by watermark; each with an invalid message.
fn built_packets() -> Vec<Value> {
    use login_metrics::core::analysis;
    use login_metrics::core::event::{self, Field, Requirements};
    use login_metrics::core::grouping::arrival::{Batcher, Limits};
    use login_metrics::core::grouping::window::{LatePolicy, WindowConfig, Windower};
    use login_metrics::core::packet::{self, Identity};
    use login_metrics::core::privacy::Pseudonymizer;
    use login_metrics::work::{Batch, CloseReason, Coord};
    use std::time::Instant;

    let required = Requirements {
        fields: vec![Field::UserId],
        timestamp: true,
        not_after_ms: None,
    };
    let slices = vec![vec![Field::Ip], vec![Field::UserId, Field::Ip]];
    let privacy = Pseudonymizer::disabled();
    let identity = Identity::new("login-metrics", INPUT, &slices, 10, &privacy);
    let now = Instant::now();
    // Ten events in [1_700_000_000 s, +10 s), an invalid message, then an
    // event 25 s later whose progress closes that window by watermark.
    let mut payloads: Vec<String> = (0..10)
        .map(|i| valid_event(&format!("u{}", i % 3), "10.0.0.1", 1_700_000_000 + i))
        .collect();
    payloads.insert(5, "not json".to_string());
    payloads.push(valid_event("u9", "10.0.0.2", 1_700_000_025));

    let mut batcher = Batcher::new(Limits {
        max_events: 1_000,
        max_span: Duration::from_secs(3600),
        max_wait: Duration::from_secs(3600),
    });
    let mut windower = Windower::new(
        WindowConfig {
            size: Duration::from_secs(10),
            hop: Duration::from_secs(10),
            grace: Duration::ZERO,
            idle: Duration::from_secs(3600),
            max_wait: Duration::from_secs(3600),
            max_events: 1_000,
            max_buffered: usize::MAX,
            max_dead_letters: usize::MAX,
            late: LatePolicy::DeadLetter,
        },
        INPUT,
    );
    windower.assign(0, None, None, now);
    let mut batches: Vec<Batch> = Vec::new();
    for (offset, payload) in payloads.iter().enumerate() {
        let offset = offset as i64;
        let coord = Coord {
            topic: INPUT,
            partition: 0,
            offset,
        };
        match event::parse(payload.as_bytes(), &required) {
            Ok(e) => {
                batcher.push_event(coord, &e, now, &mut batches);
                windower.push_event(0, offset, None, payload.as_bytes(), &e, now);
            }
            Err(e) => {
                batcher.push_invalid(
                    coord,
                    None,
                    payload.as_bytes(),
                    e.clone(),
                    now,
                    &mut batches,
                );
                windower.push_invalid(0, offset, None, payload.as_bytes(), e, now);
            }
        }
    }
    batches.extend(batcher.close(CloseReason::Shutdown));
    batches.extend(
        windower
            .take_work(now, false)
            .into_iter()
            .flat_map(|w| w.batches),
    );
    let packets: Vec<Value> = batches
        .iter()
        .map(|b| {
            let reports = analysis::analyze(&b.columns, &slices, 10).unwrap();
            let p = packet::build(b, &reports, &privacy, &identity, chrono::Utc::now());
            serde_json::to_value(p).unwrap()
        })
        .collect();
    let closed_by: Vec<&str> = packets
        .iter()
        .map(|p| p["window"]["closed_by"].as_str().unwrap())
        .collect();
    assert_eq!(
        closed_by,
        ["shutdown", "watermark"],
        "one packet of each mode"
    );
    packets
}

/// Readers that validate with docs/packet.schema.json keep reading packets of
/// a later version that adds fields (docs/packet.md): an added field, at any
/// level of the packet, still matches. What the schema requires stays required.
#[test]
fn a_packet_with_added_fields_still_matches_the_schema() {
    let mut refused = Vec::new();
    for packet in built_packets() {
        assert_schema_valid(std::slice::from_ref(&packet));
        let mode = packet["window"]["closed_by"].clone();
        for at in ["", "/window", "/events", "/sources/0", "/metrics/0"] {
            let mut p = packet.clone();
            p.pointer_mut(at)
                .and_then(Value::as_object_mut)
                .unwrap_or_else(|| panic!("{at} is an object"))
                .insert("added_later".into(), json!({"any": ["shape", 1, null]}));
            if let Err(e) = schema_errors(&p) {
                refused.push(format!("closed by {mode}, a field added at `{at}/`: {e}"));
            }
        }
        for (at, field) in [
            ("", "packet_id"),
            ("/window", "closed_by"),
            ("/events", "valid"),
            ("/sources/0", "last_offset"),
            ("/metrics/0", "duplicates"),
        ] {
            let mut p = packet.clone();
            p.pointer_mut(at)
                .and_then(Value::as_object_mut)
                .unwrap()
                .remove(field);
            assert!(
                schema_errors(&p).is_err(),
                "a packet without `{at}/{field}` still matches"
            );
        }
    }
    assert!(refused.is_empty(), "refused:\n{}", refused.join("\n"));
}
