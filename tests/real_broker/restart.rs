//! Static group membership against Apache Kafka: a restarted instance takes
//! its own place in the group again, with its partitions, without waiting
//! for its predecessor's session to time out; an instance stopped with
//! SIGTERM keeps its place until it comes back; and of two live processes
//! under one name the older is fenced and stops, naming the setting.
//!
//! The session timeout is set far beyond anything the tests wait for
//! (120 s, and `max.poll.interval.ms`, the rebalance timeout, longer
//! still), so a restart that had to wait for the killed member's session
//! could not finish its work before the broker removed that member; what
//! shows it did not wait is the group's own record: the broker's log says
//! the restarted instance replaced the killed member, and never that it
//! removed the killed member for a missed session.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use serde_json::Value;

use crate::common::broker::Broker;
use crate::common::order::published_count;
use crate::common::service::{service_env, wait_committed_while_running, Service};
use crate::common::*;

const READY: Duration = Duration::from_secs(60);
/// Far beyond what a restart with static membership takes, and beyond the
/// session timeout too, so that a restart which waits for it still ends
/// here and fails on the evidence rather than on the clock.
const DONE: Duration = Duration::from_secs(300);
const PARTITIONS: i32 = 3;
const SESSION_TIMEOUT_MS: &str = "120000";

async fn broker_with_topics() -> Broker {
    let b = Broker::start();
    b.create_topic(INPUT, PARTITIONS).await;
    b.create_topic(OUTPUT, 1).await;
    b.create_topic(DLQ, 1).await;
    b
}

/// The service in window mode (the default) with a long session: the
/// killed member stays in the group for two minutes unless replaced.
fn restart_env(bootstrap: &str, group: &str, extra: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut e = service_env(bootstrap, group);
    let vars = [
        ("BATCH__MODE", "window"),
        ("BATCH__MAX_WAIT", "2s"),
        ("KAFKA__CONSUMER__SESSION_TIMEOUT_MS", SESSION_TIMEOUT_MS),
        ("KAFKA__CONSUMER__MAX_POLL_INTERVAL_MS", "300000"),
    ];
    e.extend(
        vars.iter()
            .chain(extra)
            .map(|(k, v)| (format!("LOGIN_METRICS__{k}"), v.to_string())),
    );
    e
}

/// `per_partition` login events on each partition, a minute of event time
/// from `start_ms`, in order on each partition.
fn events(start_ms: i64, per_partition: usize) -> Vec<Input> {
    let mut out = Vec::new();
    for i in 0..per_partition {
        let ts = start_ms + (i as i64 * 60_000) / per_partition as i64;
        for p in 0..PARTITIONS {
            let user = format!("user-{}", (i * 7 + p as usize) % 40);
            let ip = format!("10.0.{p}.{}", i % 20);
            let payload = event_json(
                &[
                    ("user_id", Some(&user)),
                    ("ip", Some(&ip)),
                    ("device_id", Some("d-1")),
                    ("app_version", Some("2.3.0")),
                    ("locale", Some("DE")),
                    ("device_type", Some("android")),
                ],
                Value::from(ts),
            );
            out.push(input(p, payload));
        }
    }
    out
}

/// The group's state and its members' ids, as the coordinator describes them.
fn describe(bootstrap: &str, group: &str) -> (String, Vec<String>) {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()
        .expect("a client to describe the group");
    let list = c
        .fetch_group_list(Some(group), Duration::from_secs(10))
        .expect("the group described");
    let g = list
        .groups()
        .iter()
        .find(|g| g.name() == group)
        .expect("the group");
    let members = g.members().iter().map(|m| m.id().to_string()).collect();
    (g.state().to_string(), members)
}

/// The one member of the group, once it has one (with its instance stable).
fn sole_member(bootstrap: &str, group: &str) -> String {
    let deadline = Instant::now() + READY;
    loop {
        let (state, members) = describe(bootstrap, group);
        if state == "Stable" && members.len() == 1 {
            return members[0].clone();
        }
        assert!(
            Instant::now() < deadline,
            "the group {group} has no single stable member: {state} {members:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// What the broker logged about the group's members: static replacements
/// (the member replaced) and members removed for a missed session.
struct GroupRecord {
    replaced: Vec<String>,
    timed_out: Vec<String>,
}

fn group_record(broker: &Broker, group: &str) -> GroupRecord {
    let log = std::fs::read_to_string(&broker.log).expect("the broker's log");
    let joins = format!("unknown member id joins group {group} in ");
    let failed = format!(" in group {group} has failed, removing it from the group");
    let mut record = GroupRecord {
        replaced: vec![],
        timed_out: vec![],
    };
    for line in log.lines() {
        if line.contains(&joins) {
            if let Some(rest) = line.split("Replacing previously mapped member ").nth(1) {
                let member = rest.split(" with this groupInstanceId").next().unwrap();
                record.replaced.push(member.to_string());
            }
        }
        if let Some((head, _)) = line.split_once(&failed) {
            let member = head.rsplit("Member ").next().unwrap();
            record.timed_out.push(member.to_string());
        }
    }
    record
}

/// The instance name the process logged at start (None: dynamic).
fn logged_instance(stderr: &str) -> Option<String> {
    stderr
        .lines()
        .find_map(|l| {
            let v: Value = serde_json::from_str(l).ok()?;
            let m = v["message"].as_str()?;
            if m.starts_with("dynamic group membership") {
                return Some(String::new());
            }
            m.starts_with("static group membership")
                .then(|| v["instance"].as_str().unwrap().to_string())
        })
        .filter(|n| !n.is_empty())
}

/// The partitions the process logged as assigned to it.
fn logged_assigned(stderr: &str) -> BTreeSet<String> {
    stderr
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["message"] == "partitions assigned")
        .flat_map(|v| {
            v["partitions"]
                .as_str()
                .unwrap_or_default()
                .split(',')
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .collect::<Vec<_>>()
        })
        .collect()
}

/// Waits until the restarted `svc` has committed the group to `ends`,
/// failing at once when the group is found waiting for `old`, the member it
/// should have replaced, to rejoin: a restart that joined as a new member,
/// whose partitions wait for `old`'s session timeout.
fn wait_done_without_waiting_for(
    b: &Broker,
    group: &str,
    svc: &mut Service,
    old: &str,
    ends: &[i64],
) {
    let deadline = Instant::now() + DONE;
    loop {
        if committed(&b.bootstrap, group, PARTITIONS) == ends {
            return;
        }
        svc.assert_running();
        let (state, members) = describe(&b.bootstrap, group);
        assert!(
            !(state == "PreparingRebalance" && members.iter().any(|m| m == old)),
            "the group rebalances for the restarted instance while the killed member {old} is \
             still in it ({members:?}): the restart waits for its session timeout \
             ({SESSION_TIMEOUT_MS} ms) instead of taking its place; the restart's log:\n{}",
            svc.stderr_tail(40)
        );
        assert!(
            Instant::now() < deadline,
            "committed offsets {:?}, expected {ends:?} within {DONE:?}; the restart's log:\n{}",
            committed(&b.bootstrap, group, PARTITIONS),
            svc.stderr_tail(80)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Checks, after a restart finished its work, that it took `old`'s place:
/// it was assigned every partition, the broker replaced `old` by it, and
/// never removed `old` for a missed session; `replacements` is how many
/// replacements the group has seen in all.
fn assert_took_the_place_of(
    b: &Broker,
    group: &str,
    svc: &Service,
    old: &str,
    replacements: usize,
) {
    let stderr = svc.stderr();
    let all: BTreeSet<String> = (0..PARTITIONS).map(|p| format!("{INPUT}/{p}")).collect();
    assert_eq!(
        logged_assigned(&stderr),
        all,
        "the restart was assigned every partition:\n{}",
        svc.stderr_tail(40)
    );
    assert!(
        published_count(&stderr) > 0,
        "the restart published the windows of the input produced while it was down"
    );
    let record = group_record(b, group);
    assert!(
        record.timed_out.is_empty(),
        "the broker removed {:?} for a missed session: the restart waited for it",
        record.timed_out
    );
    assert_eq!(
        record.replaced.len(),
        replacements,
        "the broker's static replacements in {group}: {:?}\n{}",
        record.replaced,
        b.log_tail()
    );
    assert_eq!(
        record.replaced.last().map(String::as_str),
        Some(old),
        "the restart replaced the member it restarts"
    );
    let (state, members) = describe(&b.bootstrap, group);
    assert!(
        state == "Stable" && members.len() == 1 && members[0] != old,
        "one new member in the group: {state} {members:?}"
    );
}

/// kill -9, then a restart at once with the same configuration: the
/// restart replaces the killed member (the same `group.instance.id`, derived
/// from the host and the metrics log), is assigned every partition, and
/// publishes and commits what was produced meanwhile, while the killed
/// member's two-minute session is still running. Then SIGTERM: the process
/// exits 0, stays in the group (a static member sends no LeaveGroup), and
/// its restart takes its place again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_after_kill_9_takes_its_place_in_the_group_without_waiting_for_the_session() {
    let b = broker_with_topics().await;
    let group = "static";
    let dir = tempfile::tempdir().unwrap();
    let e = restart_env(&b.bootstrap, group, &[]);
    let start_ms = (chrono::Utc::now().timestamp_millis() - 3_600_000) / 10_000 * 10_000;
    let per_part = 200usize;
    let mut produced = 0usize;
    let mut produce_part = |part: i64| {
        produce(
            &b.bootstrap,
            INPUT,
            &events(start_ms + part * 60_000, per_part),
        );
        produced += per_part;
        vec![produced as i64; PARTITIONS as usize]
    };

    let ends = produce_part(0);
    let mut first = Service::start(dir.path(), "svc", &e);
    first.wait_ready(READY);
    wait_committed_while_running(&b.bootstrap, group, &ends, DONE, &mut [&mut first]);
    let first_name = logged_instance(&first.stderr()).expect("static membership, derived");
    let killed = sole_member(&b.bootstrap, group);

    first.signal("KILL");
    assert_eq!(first.wait_exit(Duration::from_secs(10)), None, "killed");
    let first_log = first.stderr();
    let ends = produce_part(1);
    let killed_at = Instant::now();
    // The same name: the same configuration, so the same metrics log.
    let mut second = Service::start(dir.path(), "svc", &e);
    wait_done_without_waiting_for(&b, group, &mut second, &killed, &ends);
    eprintln!(
        "after kill -9: the restart committed everything {:.1}s after it started \
         (session timeout {SESSION_TIMEOUT_MS} ms)",
        killed_at.elapsed().as_secs_f64()
    );
    assert_eq!(
        logged_instance(&second.stderr()).as_deref(),
        Some(first_name.as_str()),
        "the restart has the killed run's instance name; the killed run's log:\n{first_log}"
    );
    assert_took_the_place_of(&b, group, &second, &killed, 1);

    // SIGTERM: an orderly close, and the member stays for its session.
    let stopped = sole_member(&b.bootstrap, group);
    second.signal("TERM");
    assert_eq!(second.wait_exit(DONE), Some(0), "{}", second.stderr());
    assert!(
        second.stderr().contains("all work delivered and committed"),
        "{}",
        second.stderr_tail(20)
    );
    let (_, members) = describe(&b.bootstrap, group);
    assert_eq!(
        members,
        vec![stopped.clone()],
        "a stopped static member stays in the group until its session ends"
    );
    let ends = produce_part(2);
    let mut third = Service::start(dir.path(), "svc", &e);
    wait_done_without_waiting_for(&b, group, &mut third, &stopped, &ends);
    assert_took_the_place_of(&b, group, &third, &stopped, 2);
    third.signal("TERM");
    assert_eq!(third.wait_exit(DONE), Some(0), "{}", third.stderr());
}

/// Two live processes under one `kafka.instance_name`: the second takes the
/// name's place in the group, and the first, fenced, stops with exit code 1
/// naming the setting instead of idling without partitions; the second
/// goes on and commits the input.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn of_two_live_instances_with_one_name_the_older_is_fenced_and_stops_naming_the_setting() {
    let b = broker_with_topics().await;
    let group = "twins";
    let dir = tempfile::tempdir().unwrap();
    let e = restart_env(&b.bootstrap, group, &[("KAFKA__INSTANCE_NAME", "twin")]);
    let start_ms = (chrono::Utc::now().timestamp_millis() - 3_600_000) / 10_000 * 10_000;

    let mut older = Service::start(dir.path(), "older", &e);
    older.wait_ready(READY);
    let replaced = sole_member(&b.bootstrap, group);
    let mut newer = Service::start(dir.path(), "newer", &e);
    // Fenced at its next heartbeat, half a second away.
    assert_eq!(
        older.wait_exit(READY),
        Some(1),
        "the fenced process stops; its log:\n{}",
        older.stderr_tail(30)
    );
    let stderr = older.stderr();
    assert!(
        stderr.contains("fenced") && stderr.contains("kafka.instance_name"),
        "the fenced process says why, naming the setting:\n{}",
        older.stderr_tail(30)
    );
    for n in [&older, &newer].map(|s| logged_instance(&s.stderr())) {
        assert_eq!(n.as_deref(), Some("twin"));
    }
    assert_eq!(group_record(&b, group).replaced, vec![replaced]);

    produce(&b.bootstrap, INPUT, &events(start_ms, 100));
    newer.wait_ready(READY);
    wait_committed_while_running(&b.bootstrap, group, &[100; 3], DONE, &mut [&mut newer]);
    newer.signal("TERM");
    assert_eq!(newer.wait_exit(DONE), Some(0), "{}", newer.stderr());
}
