//! Dead letters under pseudonymization, on librdkafka's mock cluster: with
//! `privacy.pseudonymize = [ip, device_id]` a late valid event and a message
//! of the wrong type reach the dead-letter topic with those values (and the
//! key) pseudonymized, a message that is not JSON with its payload withheld,
//! and none of them carries a raw IP or device id; with
//! `privacy.dead_letters = "raw"` they carry the original bytes and key.

use std::collections::HashMap;
use std::time::Duration;

use crate::common::*;
use login_metrics::core::event::Field;
use login_metrics::core::privacy::Pseudonymizer;
use rdkafka::mocking::MockCluster;
use serde_json::{json, Value};

/// The raw personal data of the input below.
const RAW: [&str; 6] = [
    "203.0.113.7",
    "dev-1f2e",
    "203.0.113.9",
    "dev-9c8b",
    "198.51.100.7",
    "7351",
];

fn keyed(partition_key: &str, payload: impl Into<Vec<u8>>) -> Input {
    Input {
        key: Some(partition_key.to_string()),
        ..input(0, payload)
    }
}

/// One partition, in window mode: a window, an event 100 s later that closes
/// it, a late event for the closed window, a message that is not JSON, one
/// with a number where the device id belongs, and an event that closes the
/// second window (so that the dead letters go out with its packet). `t` is
/// in epoch seconds.
fn inputs(t: i64) -> Vec<Input> {
    let event = |user: &str, ip: &str, device: &str, ts: i64| {
        event_json(
            &[
                ("user_id", Some(user)),
                ("ip", Some(ip)),
                ("device_id", Some(device)),
            ],
            json!(ts),
        )
    };
    vec![
        keyed("u0", event("u0", "192.0.2.1", "dev-0000", t)),
        keyed("u0", event("u0", "192.0.2.1", "dev-0000", t + 100)),
        keyed("u1", event("u1", "203.0.113.7", "dev-1f2e", t)),
        keyed("u2", "ip=203.0.113.9 device_id=dev-9c8b: not JSON"),
        keyed(
            "u3",
            json!({"user_id": "u3", "ip": "198.51.100.7", "device_id": 7351, "timestamp": t + 100})
                .to_string(),
        ),
        keyed("u0", event("u0", "192.0.2.1", "dev-0000", t + 200)),
    ]
}

/// The dead letters of one run, by `error.kind`.
async fn dead_letters(inputs: &[Input], privacy: &[(&str, &str)]) -> HashMap<String, Read> {
    let c = MockCluster::new(1).unwrap();
    for topic in [INPUT, OUTPUT, DLQ] {
        c.create_topic(topic, 1, 1).unwrap();
    }
    let bs = c.bootstrap_servers();
    produce(&bs, INPUT, inputs);
    let dir = tempfile::tempdir().unwrap();
    let mut overrides = vec![("BATCH__MODE", "window")];
    overrides.extend_from_slice(privacy);
    let run = start(settings(&bs, &dir.path().join("m.log"), &overrides));
    // Two windows closed by watermark; the second one's work carries the dead letters.
    run.delivered(2, Duration::from_secs(60)).await;
    run.stop().await.unwrap();
    let read = read_all(&bs, DLQ);
    assert_eq!(read.len(), 3, "{read:?}");
    read.into_iter()
        .map(|r| (r.headers["error.kind"].clone(), r))
        .collect()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_carry_no_raw_value_unless_configured_raw() {
    let pseudonymize = [
        ("PRIVACY__PSEUDONYMIZE", "ip,device_id"),
        ("PRIVACY__KEY", "key-one"),
    ];
    let p = Pseudonymizer::new(b"key-one", &[Field::Ip, Field::DeviceId]);
    let input = inputs(chrono::Utc::now().timestamp() - 86_400);

    // The default: pseudonymized.
    let cleaned = dead_letters(&input, &pseudonymize).await;
    for (kind, r) in &cleaned {
        for raw in RAW {
            let (key, payload) = (text(r.key.as_deref().unwrap_or_default()), text(&r.payload));
            assert!(
                !payload.contains(raw),
                "raw {raw} in the {kind} dead letter: {payload}"
            );
            assert!(
                !key.contains(raw),
                "raw {raw} in the {kind} dead letter's key"
            );
        }
        assert_eq!(r.headers["dead_letter.pseudonymized"], "true", "{kind}");
        assert_eq!(r.headers["source.topic"], INPUT);
    }

    let late = &cleaned["late"];
    let mut expected: Value = serde_json::from_slice(&input[2].payload).unwrap();
    expected["ip"] = p.pseudonym("203.0.113.7").into();
    expected["device_id"] = p.pseudonym("dev-1f2e").into();
    assert_eq!(
        serde_json::from_slice::<Value>(&late.payload).unwrap(),
        expected
    );
    assert_eq!(late.key, Some(p.pseudonym("u1").into_bytes()));
    assert_eq!(late.headers["source.offset"], "2");
    assert!(!late.headers.contains_key("dead_letter.payload"));

    let wrong_type = &cleaned["wrong_type"];
    let v: Value = serde_json::from_slice(&wrong_type.payload).unwrap();
    assert_eq!(v["device_id"], p.pseudonym("7351"));
    assert_eq!(v["ip"], p.pseudonym("198.51.100.7"));
    assert_eq!(v["user_id"], "u3");

    let not_json = &cleaned["not_json"];
    assert!(not_json.payload.is_empty(), "{}", text(&not_json.payload));
    assert_eq!(not_json.headers["dead_letter.payload"], "withheld");
    assert_eq!(
        not_json.headers["dead_letter.original_bytes"],
        input[3].payload.len().to_string()
    );
    assert_eq!(not_json.headers["source.offset"], "3");
    assert_eq!(not_json.key, Some(p.pseudonym("u2").into_bytes()));

    // Raw: the original bytes and key, for reprocessing.
    let mut configured_raw = pseudonymize.to_vec();
    configured_raw.push(("PRIVACY__DEAD_LETTERS", "raw"));
    let raw = dead_letters(&input, &configured_raw).await;
    for (kind, offset) in [("late", 2), ("not_json", 3), ("wrong_type", 4)] {
        let r = &raw[kind];
        assert_eq!(text(&r.payload), text(&input[offset].payload), "{kind}");
        assert_eq!(
            r.key.as_deref(),
            input[offset].key.as_deref().map(str::as_bytes)
        );
        assert_eq!(r.headers["source.offset"], offset.to_string());
        assert!(
            r.headers.keys().all(|h| !h.starts_with("dead_letter.")),
            "{kind}: {:?}",
            r.headers
        );
    }
}
