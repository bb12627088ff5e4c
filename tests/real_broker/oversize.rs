//! Input that would make a packet or a dead letter larger than the output
//! topic takes. Such a window gives the same packet at every replay, so a
//! refused packet would stop the service at every restart; instead the packet
//! is cut to fit (long values cut, rows left out) and says so, the process
//! goes on, and the input offsets are committed past the events.

use std::time::Duration;

use crate::common::broker::Broker;
use crate::common::service::{logged_env, wait_committed_while_running, Service};
use crate::common::*;
use login_metrics::core::packet::{Packet, VALUE_MAX_BYTES};
use login_metrics::sink::publisher::{PACKET_HEADROOM, PRODUCER_MAX_DEFAULT};
use rand::{Rng, SeedableRng};
use serde_json::Value;

const READY: Duration = Duration::from_secs(60);
const DONE: Duration = Duration::from_secs(180);

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

fn event(user: &str, ip: &str, device: &str, ts: i64) -> Vec<u8> {
    event_json(
        &[
            ("user_id", Some(user)),
            ("ip", Some(ip)),
            ("device_id", Some(device)),
            ("app_version", Some("2.3.0")),
            ("locale", Some("US")),
            ("device_type", Some("android")),
        ],
        Value::from(ts),
    )
    .into_bytes()
}

/// The one packet of the output topic `topic`: its JSON as published, read
/// as a value and as a packet.
fn the_packet(bootstrap: &str, topic: &str) -> (String, Value, Packet) {
    let out = read_all(bootstrap, topic);
    assert_eq!(out.len(), 1, "one window, one packet");
    let json = String::from_utf8(out[0].payload.clone()).unwrap();
    let value: Value = serde_json::from_str(&json).unwrap();
    let packet: Packet = serde_json::from_str(&json).unwrap();
    assert_eq!(out[0].key.as_deref(), Some(packet.packet_id.as_bytes()));
    (json, value, packet)
}

fn slice<'a>(packet: &'a Value, fields: &[&str]) -> &'a Value {
    packet["metrics"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["slice"] == serde_json::json!(fields))
        .unwrap_or_else(|| panic!("no slice {fields:?}"))
}

/// Two events of one window share a 600 KB `user_id`: the window's packet
/// would hold it twice (slices user_id+ip and user_id+device_id), 1.2 MB,
/// more than the producer sends (`message.max.bytes`, 1,000,000 by default).
/// With the default window settings the packet is published cut to fit and
/// marked, the process keeps running and the offsets are committed past the
/// two events.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_600_kb_user_id_twice_in_a_window_is_published_cut_and_the_stream_goes_on() {
    let b = Broker::start();
    b.create_topic(INPUT, 1).await;
    b.create_topic(OUTPUT, 1).await;
    b.create_topic(DLQ, 1).await;
    let big = "u".repeat(600_000);
    let ts = now_ms();
    produce(
        &b.bootstrap,
        INPUT,
        &[
            input(0, event(&big, "10.0.0.1", "593-47-5928", ts)),
            input(0, event(&big, "10.0.0.1", "593-47-5928", ts + 1)),
        ],
    );
    let dir = tempfile::tempdir().unwrap();
    let mut svc = Service::start(
        dir.path(),
        "oversize",
        &logged_env(&b.bootstrap, "oversize", &[("BATCH__MODE", "window")]),
    );
    svc.wait_ready(READY);
    // The window closes by its wall-clock wait (batch.max_wait, 10 s).
    wait_committed_while_running(&b.bootstrap, "oversize", &[2], DONE, &mut [&mut svc]);

    let (json, v, packet) = the_packet(&b.bootstrap, OUTPUT);
    assert!(
        json.len() <= PRODUCER_MAX_DEFAULT - PACKET_HEADROOM,
        "{} bytes",
        json.len()
    );
    assert_eq!(v["truncated"], true, "{json}");
    assert_eq!(v["events"]["valid"], 2);
    let cut = format!("{}…[600000 bytes]", "u".repeat(VALUE_MAX_BYTES));
    for (fields, other, value) in [
        (["user_id", "ip"], "ip", "10.0.0.1"),
        (["user_id", "device_id"], "device_id", "593-47-5928"),
    ] {
        let m = slice(&v, &fields);
        assert_eq!(m["values_truncated"], 1, "{fields:?}");
        assert_eq!(m["rows_truncated"], 0, "{fields:?}");
        assert_eq!(m["duplicate_groups"], 1);
        assert_eq!(m["duplicates"][0]["user_id"], cut.as_str());
        assert_eq!(m["duplicates"][0][other], value);
        assert_eq!(m["duplicates"][0]["count"], 2);
    }
    // The other slices are whole.
    let ip = slice(&v, &["ip"]);
    assert_eq!(ip["values_truncated"], 0);
    assert_eq!(ip["duplicates"][0]["ip"], "10.0.0.1");
    assert_schema_valid(std::slice::from_ref(&v));
    // The metrics log holds the same bytes.
    let logged = std::fs::read_to_string(&svc.log_path).unwrap();
    assert_eq!(logged.lines().collect::<Vec<_>>(), [json.as_str()]);
    assert_eq!(svc.logged_packets(), [packet]);

    svc.assert_running();
    svc.signal("TERM");
    assert_eq!(svc.wait_exit(DONE), Some(0), "{}", svc.stderr_tail(40));
}

/// An output topic and a dead-letter topic that take less than the producer
/// sends (`max.message.bytes` 60,000 and 20,000), read from the broker at
/// start-up: a window with more long duplicate rows than fit has rows left
/// out at the end of its largest lists, and a 100 KB message that is not
/// JSON is dead-lettered cut to what its topic takes (less than the usual
/// 64 KiB). The values are random, so that compression does not bring the
/// records under the topics' limits by chance. The process keeps running and
/// commits past everything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_topics_own_limits_bound_packets_and_dead_letters() {
    const OUT_MAX: usize = 60_000;
    const DLQ_MAX: usize = 20_000;
    let b = Broker::start();
    b.create_topic(INPUT, 1).await;
    b.create_topic_with(OUTPUT, 1, &[("max.message.bytes", &OUT_MAX.to_string())])
        .await;
    b.create_topic_with(DLQ, 1, &[("max.message.bytes", &DLQ_MAX.to_string())])
        .await;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut random = |n: usize| -> String {
        (0..n)
            .map(|_| ALPHABET[rng.gen_range(0..ALPHABET.len())] as char)
            .collect()
    };
    let ts = now_ms();
    // 150 long IP values, each twice: 150 duplicate groups in `ip` and in
    // `user_id+ip`, of which analysis.top (100) are reported, about 52 KB each.
    let ips: Vec<String> = (0..150).map(|_| random(500)).collect();
    let mut msgs = Vec::new();
    for (i, ip) in ips.iter().enumerate() {
        for j in 0..2 {
            let user = format!("user-{i:03}");
            msgs.push(input(0, event(&user, ip, &format!("d-{i}-{j}"), ts)));
        }
    }
    let not_json = format!("#{}", random(99_999)).into_bytes();
    msgs.push(input(0, not_json.clone()));
    produce(&b.bootstrap, INPUT, &msgs);
    let end = msgs.len() as i64;

    let dir = tempfile::tempdir().unwrap();
    let mut svc = Service::start(
        dir.path(),
        "limits",
        &logged_env(&b.bootstrap, "limits", &[("BATCH__MODE", "window")]),
    );
    svc.wait_ready(READY);
    wait_committed_while_running(&b.bootstrap, "limits", &[end], DONE, &mut [&mut svc]);

    let (json, v, _) = the_packet(&b.bootstrap, OUTPUT);
    assert!(
        json.len() <= OUT_MAX - PACKET_HEADROOM,
        "{} bytes",
        json.len()
    );
    assert_eq!(v["truncated"], true);
    assert_eq!(v["events"]["valid"], 300);
    for fields in [&["ip"][..], &["user_id", "ip"]] {
        let m = slice(&v, fields);
        let kept = m["duplicates"].as_array().unwrap().len() as u64;
        assert_eq!(m["duplicate_groups"], 150);
        assert_eq!(m["truncated"], true);
        assert_eq!(m["values_truncated"], 0);
        assert!(kept > 10 && kept < 100, "{fields:?}: {kept} rows");
        assert_eq!(m["rows_truncated"], 100 - kept, "{fields:?}");
    }
    // What is left is the head of the report order: count, then values
    // ascending (user ids ascend with the IPs' order of generation).
    let mut ascending = ips.clone();
    ascending.sort();
    for (fields, order) in [(&["ip"][..], &ascending), (&["user_id", "ip"], &ips)] {
        let rows = slice(&v, fields)["duplicates"].as_array().unwrap();
        for (row, ip) in rows.iter().zip(order) {
            assert_eq!(row["ip"], ip.as_str(), "{fields:?}");
        }
    }
    let whole = slice(&v, &["app_version"]);
    assert_eq!(whole["rows_truncated"], 0);
    assert_eq!(whole["duplicates"][0]["count"], 300);
    assert_schema_valid(std::slice::from_ref(&v));

    let dead = read_all(&b.bootstrap, DLQ);
    assert_eq!(dead.len(), 1, "the message that is not JSON, once");
    let d = &dead[0];
    assert_eq!(d.headers["source.offset"], (end - 1).to_string());
    assert_eq!(d.headers["dead_letter.truncated"], "true");
    assert_eq!(d.headers["dead_letter.original_bytes"], "100000");
    assert!(
        d.payload.len() < DLQ_MAX && d.payload.len() > DLQ_MAX - 2_000,
        "{} bytes kept",
        d.payload.len()
    );
    assert_eq!(d.payload, not_json[..d.payload.len()]);

    svc.assert_running();
    svc.signal("TERM");
    assert_eq!(svc.wait_exit(DONE), Some(0), "{}", svc.stderr_tail(40));
}

/// Packets that each fit the output topic but not together: the broker
/// judges a batch, and the producer puts the packets of one delivery into one
/// batch. A bounded run closes its two windows at its end and delivers both
/// packets at once, each of random values cut to just under the topic's
/// 60,000 bytes; the broker refuses the batch, the packets are sent again
/// one by one, and the run ends by itself, committed, with both published.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn packets_refused_together_are_sent_again_one_by_one() {
    const OUT_MAX: usize = 60_000;
    let b = Broker::start();
    b.create_topic(INPUT, 1).await;
    b.create_topic_with(OUTPUT, 1, &[("max.message.bytes", &OUT_MAX.to_string())])
        .await;
    b.create_topic(DLQ, 1).await;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut random = |n: usize| -> String {
        (0..n)
            .map(|_| ALPHABET[rng.gen_range(0..ALPHABET.len())] as char)
            .collect()
    };
    let window = (now_ms() - 3_600_000) / 10_000 * 10_000;
    let mut msgs = Vec::new();
    for start in [window, window + 10_000] {
        for i in 0..150 {
            let ip = random(500);
            for j in 0..2 {
                let user = format!("user-{i:03}");
                let device = format!("d-{i}-{j}");
                msgs.push(input(0, event(&user, &ip, &device, start + i)));
            }
        }
    }
    produce(&b.bootstrap, INPUT, &msgs);
    let end = msgs.len() as i64;

    let dir = tempfile::tempdir().unwrap();
    let mut svc = Service::start_with(
        dir.path(),
        "together",
        &logged_env(&b.bootstrap, "together", &[("BATCH__MODE", "window")]),
        &["--until-end"],
    );
    assert_eq!(svc.wait_exit(DONE), Some(0), "{}", svc.stderr_tail(40));
    assert_eq!(committed(&b.bootstrap, "together", 1), [end]);
    let out = read_all(&b.bootstrap, OUTPUT);
    assert_eq!(out.len(), 2, "two windows, two packets");
    for r in &out {
        let v: Value = serde_json::from_slice(&r.payload).unwrap();
        assert_eq!(v["truncated"], true);
        assert_eq!(v["window"]["closed_by"], "end");
        assert!(r.payload.len() <= OUT_MAX - PACKET_HEADROOM);
        assert!(
            r.payload.len() > OUT_MAX - 5_000,
            "{} bytes",
            r.payload.len()
        );
    }
    assert!(
        svc.stderr()
            .contains("record refused for its size; sending it again in a batch of its own"),
        "the packets went together first: {}",
        svc.stderr_tail(40)
    );
}
