//! Several instances, one answer (`scale.merge = true`): the same input —
//! out-of-order events, late events, invalid messages, six partitions —
//! read by one, two and three instances of a group publishes the same
//! packets, byte for byte but for `emitted_at`, under the same ids, each
//! window's counts equal to a naive count of its on-time events; and so it
//! does with an instance killed (SIGKILL) and restarted, one added and one
//! removed while it reads.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::common::broker::Broker;
use crate::common::output::read_all;
use crate::common::service::{logged_env, Service};
use crate::common::windowed::*;
use crate::common::*;

const READY: Duration = Duration::from_secs(60);
const DONE: Duration = Duration::from_secs(240);

/// The settings of a merged group writing to its own output topics.
fn merged_env(bootstrap: &str, group: &str) -> Vec<(String, String)> {
    let (out, dlq) = (format!("{group}-out"), format!("{group}-dlq"));
    logged_env(
        bootstrap,
        group,
        &[
            ("BATCH__MODE", "window"),
            ("SCALE__MERGE", "true"),
            ("KAFKA__OUTPUT_TOPIC", &out),
            ("KAFKA__DLQ_TOPIC", &dlq),
        ],
    )
}

/// Valid events the group's output accounts for: counted in a distinct
/// packet, or dead-lettered as late.
fn accounted(bootstrap: &str, group: &str) -> u64 {
    let mut seen = std::collections::BTreeSet::new();
    let mut valid = 0;
    for r in read_all(bootstrap, &format!("{group}-out")) {
        let p: login_metrics::core::packet::Packet =
            serde_json::from_slice(&r.payload).expect("packet JSON");
        if seen.insert(p.packet_id.clone()) {
            valid += p.events.valid;
        }
    }
    let late: std::collections::BTreeSet<(String, String)> =
        read_all(bootstrap, &format!("{group}-dlq"))
            .into_iter()
            .filter(|d| d.headers["error.kind"] == "late")
            .map(|d| {
                (
                    d.headers["source.partition"].clone(),
                    d.headers["source.offset"].clone(),
                )
            })
            .collect();
    valid + late.len() as u64
}

/// Waits until the output accounts for every valid event of the input,
/// checking that `services` run meanwhile.
fn wait_accounted(b: &Broker, group: &str, input: &Timed, services: &mut [&mut Service]) {
    let want = input.ts.iter().flatten().count() as u64;
    let deadline = Instant::now() + DONE;
    loop {
        let got = accounted(&b.bootstrap, group);
        if got == want {
            return;
        }
        for s in services.iter_mut() {
            s.assert_running();
        }
        assert!(
            Instant::now() < deadline,
            "{group}: the output accounts for {got} of {want} valid events; last log lines:\n{}",
            services
                .iter()
                .map(|s| s.stderr_tail(40))
                .collect::<Vec<_>>()
                .join("\n----\n")
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Each packet id's content (without `emitted_at`), checked against the
/// input by [`check_windows`].
fn published(b: &Broker, group: &str, input: &Timed) -> BTreeMap<String, Value> {
    let checked = check_windows(
        group,
        &b.bootstrap,
        &format!("{group}-out"),
        &format!("{group}-dlq"),
        input,
        &Expect {
            oracle_late: true,
            ..Expect::default()
        },
    );
    assert_closed_by_watermark_and_wait(group, &checked);
    checked
        .packets
        .iter()
        .map(|(id, p)| (id.clone(), content(p)))
        .collect()
}

async fn topics(b: &Broker, group: &str) {
    b.create_topic(&format!("{group}-out"), 1).await;
    b.create_topic(&format!("{group}-dlq"), 1).await;
}

fn stop(group: &str, mut services: Vec<Service>) {
    for s in &services {
        s.signal("TERM");
    }
    for s in &mut services {
        assert_eq!(s.wait_exit(DONE), Some(0), "{group}: {}", s.stderr());
    }
}

fn assert_same(name: &str, got: &BTreeMap<String, Value>, want: &BTreeMap<String, Value>) {
    let only_got: Vec<&String> = got.keys().filter(|k| !want.contains_key(*k)).collect();
    let only_want: Vec<&String> = want.keys().filter(|k| !got.contains_key(*k)).collect();
    assert!(
        only_got.is_empty() && only_want.is_empty(),
        "{name}: other packet ids than one instance's: {} only here {:?}, {} only there {:?}",
        only_got.len(),
        only_got.iter().take(5).collect::<Vec<_>>(),
        only_want.len(),
        only_want.iter().take(5).collect::<Vec<_>>()
    );
    for (id, v) in got {
        assert_eq!(
            v, &want[id],
            "{name}: packet {id} differs from one instance's"
        );
    }
}

/// The ids of the packets in the group's output topic.
fn distinct_ids(b: &Broker) -> std::collections::BTreeSet<String> {
    read_all(&b.bootstrap, &format!("{GROUP}-out"))
        .iter()
        .map(|r| String::from_utf8(r.key.clone().expect("keyed")).unwrap())
        .collect()
}

/// The ids of the packets an instance's dashboard shows.
fn dashboard_ids(s: &Service) -> std::collections::BTreeSet<String> {
    let Some((200, body)) = s.http_get("/api/packets?limit=200") else {
        return Default::default();
    };
    let v: Value = serde_json::from_str(&body).expect("JSON");
    let list = v.get("packets").unwrap_or(&v);
    list.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|p| p["packet_id"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// The group of every run: packet ids name the group, so the runs compare
/// under one, each on a broker of its own.
const GROUP: &str = "merged";

/// A fresh broker with the input topic; the input produced first unless
/// `live`, when `run` produces it while the instances read.
async fn broker() -> Broker {
    let b = Broker::start();
    b.create_topic(INPUT, 6).await;
    topics(&b, GROUP).await;
    b
}

/// `names` instances of the group read `input` on a broker of their own,
/// while it is produced (3,000 messages a second) when `live`, as a backlog
/// otherwise; returns what they published, checked.
async fn run(names: &[&str], input: &Timed, live: bool) -> BTreeMap<String, Value> {
    let b = broker().await;
    if !live {
        Feed::start(&b.bootstrap, INPUT, input.inputs.clone(), 1e9).finish();
    }
    let dir = tempfile::tempdir().unwrap();
    let env = merged_env(&b.bootstrap, GROUP);
    let mut services: Vec<Service> = names
        .iter()
        .map(|n| Service::start(dir.path(), n, &env))
        .collect();
    for s in &services {
        s.wait_ready(READY);
    }
    if live {
        let feed = Feed::start(&b.bootstrap, INPUT, input.inputs.clone(), 3_000.0);
        assert_eq!(feed.finish(), input.inputs.len());
    }
    {
        let mut refs: Vec<&mut Service> = services.iter_mut().collect();
        wait_accounted(&b, GROUP, input, &mut refs);
    }
    // The dashboard of each instance shows every packet of the group.
    let ids = distinct_ids(&b);
    for s in &services {
        let deadline = Instant::now() + READY;
        loop {
            let shown = dashboard_ids(s);
            if shown == ids {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{names:?}: the dashboard shows {} of the group's {} packets",
                shown.len(),
                ids.len()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    // Each instance merges a share of the group's windows.
    for s in &services {
        let m = s.metrics();
        let merged = m
            .lines()
            .find_map(|l| l.strip_prefix("login_metrics_merge_partitions "))
            .and_then(|v| v.trim().parse::<f64>().ok());
        assert!(
            merged.is_some_and(|n| n >= 1.0),
            "{names:?}: each instance merges shares partitions: {merged:?}"
        );
    }
    stop(GROUP, services);
    published(&b, GROUP, input)
}

/// Three instances read the input while it is produced; then one instance
/// and two read it as a backlog. All three runs publish the same packets.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_two_and_three_merged_instances_publish_the_same_packets() {
    let input = timed_input(91, 5_000, 30_000, 6, 4.0);
    let three = run(&["a", "b", "c"], &input, true).await;
    let one = run(&["a"], &input, false).await;
    let two = run(&["a", "b"], &input, false).await;
    assert_same("three instances, live", &three, &one);
    assert_same("two instances, backlog", &two, &one);
    eprintln!(
        "merged: {} packets, the same from one, two and three instances",
        one.len()
    );
}

/// Packets the group published so far (distinct ids).
fn packets_out(b: &Broker) -> usize {
    distinct_ids(b).len()
}

/// Waits until the group has published `n` distinct packets, the services
/// running.
fn wait_packets(b: &Broker, n: usize, services: &mut [&mut Service]) {
    let deadline = Instant::now() + DONE;
    while packets_out(b) < n {
        for s in services.iter_mut() {
            s.assert_running();
        }
        assert!(Instant::now() < deadline, "{n} packets published");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// While the input is produced (1,500 messages a second), the two instances
/// `a` and `b` are killed with SIGKILL and restarted at three points (`a`,
/// `b`, `a`), then `c` joins and `b` is stopped, each step once the group
/// has published one more packet: the input partitions and the shares
/// partitions move on both sides of the shares topic, and whatever a killed
/// instance had read, sent or merged without committing is read again. The
/// group still publishes exactly the packets one instance does: every copy
/// of an id with the same content, every on-time event counted once, every
/// late and invalid message a dead letter.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn merged_instances_killed_added_and_removed_publish_the_packets_of_one() {
    let input = timed_input(92, 5_000, 40_000, 6, 4.0);
    let one = run(&["a"], &input, false).await;

    let b = broker().await;
    let dir = tempfile::tempdir().unwrap();
    let env = merged_env(&b.bootstrap, GROUP);
    let names = ["a", "b"];
    let mut services: Vec<Service> = names
        .iter()
        .map(|n| Service::start(dir.path(), n, &env))
        .collect();
    for s in &services {
        s.wait_ready(READY);
    }
    let feed = Feed::start(&b.bootstrap, INPUT, input.inputs.clone(), 1_500.0);
    wait_packets(&b, 1, &mut services.iter_mut().collect::<Vec<_>>());
    for victim in [0, 1, 0] {
        let at = packets_out(&b);
        wait_packets(&b, at + 1, &mut services.iter_mut().collect::<Vec<_>>());
        services[victim].signal("KILL");
        assert_eq!(
            services[victim].wait_exit(DONE),
            None,
            "killed by the signal"
        );
        services[victim] = Service::start(dir.path(), names[victim], &env);
        services[victim].wait_ready(READY);
    }
    let at = packets_out(&b);
    wait_packets(&b, at + 1, &mut services.iter_mut().collect::<Vec<_>>());
    services.push(Service::start(dir.path(), "c", &env));
    services[2].wait_ready(READY);
    let at = packets_out(&b);
    wait_packets(&b, at + 1, &mut services.iter_mut().collect::<Vec<_>>());
    let removed = services.remove(1);
    stop(GROUP, vec![removed]);
    assert_eq!(feed.finish(), input.inputs.len());
    wait_accounted(
        &b,
        GROUP,
        &input,
        &mut services.iter_mut().collect::<Vec<_>>(),
    );
    stop(GROUP, services);
    let chaos = published(&b, GROUP, &input);
    assert_same("killed, added and removed", &chaos, &one);
    eprintln!(
        "merged: {} packets, the same with instances killed at three points, one added and one removed",
        one.len()
    );
}
