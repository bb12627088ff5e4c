//! The web surface under load while the pipeline runs: the real binary on
//! Apache Kafka with its default listener limits, 2,000 pages long-polling
//! `/api/packets` and 500 connections that never finish their headers. Every
//! long-poll must be answered with the packets published meanwhile, the page
//! and its status must answer throughout, the slow connections must be
//! closed by the service, and every input message must be committed. The
//! same backlog is first processed without load, and both rates are printed
//! (figures only: nothing is asserted about time).
//!
//! Then the listener's rules one by one: a `Host` that is not allowed gets
//! 403 from an open dashboard (DNS rebinding) while `/metrics` stays open,
//! and connections beyond `telemetry.max_connections` get 503 until slow ones
//! are closed.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::common::broker::Broker;
use crate::common::service::{service_env, Service};
use crate::common::*;

const LONG_POLLS: usize = 2_000;
const SLOW: usize = 500;
const EVENTS: usize = 60_000;
const PARTITIONS: i32 = 3;
const DONE: Duration = Duration::from_secs(240);

/// Window mode with the defaults, except windows small enough that the
/// backlog makes a few dozen packets.
fn start(b: &Broker, dir: &std::path::Path, group: &str, extra: &[(&str, &str)]) -> Service {
    let mut env = service_env(&b.bootstrap, group);
    for (k, v) in [("BATCH__MODE", "window"), ("BATCH__MAX_SPAN", "1s")]
        .iter()
        .chain(extra)
    {
        env.push((format!("LOGIN_METRICS__{k}"), v.to_string()));
    }
    let svc = Service::start(dir, group, &env);
    svc.wait_ready(Duration::from_secs(60));
    svc
}

/// One request on its own connection; (status, headers, body), or None when
/// the connection ends without a response.
async fn request(port: u16, head: &str) -> Option<(u16, String, Vec<u8>)> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.ok()?;
    s.write_all(head.as_bytes()).await.ok()?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).await.ok()?;
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    let headers = String::from_utf8_lossy(&raw[..split]).to_string();
    let status = headers.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, headers, raw[split + 4..].to_vec()))
}

fn get(path: &str, host: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n")
}

fn header(headers: &str, name: &str) -> Option<u64> {
    headers.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim()
            .eq_ignore_ascii_case(name)
            .then(|| v.trim().parse().ok())?
    })
}

/// A page's long-poll loop: asks for packets after `after` until one comes;
/// returns the ids it received.
async fn long_poll(port: u16, after: u64, deadline: Instant) -> Result<Vec<String>, String> {
    loop {
        if Instant::now() > deadline {
            return Err("no packet before the deadline".into());
        }
        let path = format!("/api/packets?after={after}&wait=30&limit=5");
        let Some((status, headers, body)) = request(port, &get(&path, "localhost")).await else {
            return Err("the connection ended without a response".into());
        };
        if status != 200 {
            return Err(format!("status {status}"));
        }
        let packets: Vec<serde_json::Value> =
            serde_json::from_slice(&body).map_err(|e| format!("body: {e}"))?;
        if !packets.is_empty() {
            assert!(header(&headers, "x-packet-seq").unwrap() > after);
            return Ok(packets
                .iter()
                .map(|p| p["packet_id"].as_str().unwrap().to_string())
                .collect());
        }
    }
}

/// Connects and sends part of a request line, then waits for the service to
/// close the connection; true when it did.
async fn slow_connection(port: u16, deadline: Instant) -> bool {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)).await else {
        return false;
    };
    if s.write_all(b"GET /api/status HTTP/1.1\r\nHo")
        .await
        .is_err()
    {
        return true;
    }
    let mut buf = [0u8; 256];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
            Err(_) => return false,
        }
    }
}

/// Seconds from the service's first consumed message to its last commit.
fn processing_seconds(b: &Broker, svc: &Service, group: &str, end: &[i64]) -> f64 {
    let deadline = Instant::now() + DONE;
    while svc.consumed().unwrap_or(0) == 0 {
        assert!(
            Instant::now() < deadline,
            "nothing consumed:\n{}",
            svc.stderr_tail(30)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let first = Instant::now();
    wait_committed(&b.bootstrap, group, end, DONE);
    first.elapsed().as_secs_f64()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_polls_and_slow_connections_while_the_pipeline_runs() {
    let b = Broker::start();
    b.create_topic(INPUT, PARTITIONS).await;
    b.create_topic(OUTPUT, 1).await;
    b.create_topic(DLQ, 1).await;
    let dir = tempfile::tempdir().unwrap();
    let (inputs, malformed) = generated_input(23, 2_000, EVENTS, PARTITIONS);
    let map = produce_input(&b.bootstrap, &inputs, &malformed);
    let end = end_offsets(&map, PARTITIONS);

    // The same backlog without load, for the rate printed below.
    let mut quiet = start(&b, dir.path(), "quiet", &[]);
    let quiet_s = processing_seconds(&b, &quiet, "quiet", &end);
    quiet.signal("TERM");
    quiet.wait_exit(Duration::from_secs(60));

    // Under load: the service starts, the load arrives before it has
    // consumed (it waits on the group join), and stays while it runs.
    let group = "loaded";
    let svc = start(&b, dir.path(), group, &[]);
    let port = svc.metrics_port;
    let deadline = Instant::now() + DONE;
    let slow: Vec<_> = (0..SLOW)
        .map(|_| tokio::spawn(slow_connection(port, deadline)))
        .collect();
    let polls: Vec<_> = (0..LONG_POLLS)
        .map(|_| tokio::spawn(long_poll(port, 0, deadline)))
        .collect();
    let loaded_s = processing_seconds(&b, &svc, group, &end);

    // The page and its status answer while the long-polls and slow
    // connections are open.
    let (status, _, body) = request(port, &get("/", "localhost"))
        .await
        .expect("the page");
    assert_eq!(status, 200);
    assert!(String::from_utf8_lossy(&body).contains("<html"));
    let (status, _, body) = request(port, &get("/api/status", "localhost"))
        .await
        .expect("the status");
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));

    let mut answered = 0;
    let mut ids = BTreeSet::new();
    for p in polls {
        let got = p
            .await
            .unwrap()
            .unwrap_or_else(|e| panic!("a long-poll: {e}"));
        ids.extend(got);
        answered += 1;
    }
    assert_eq!(answered, LONG_POLLS);
    let published: BTreeSet<String> = svc
        .logged_packets()
        .into_iter()
        .map(|p| p.packet_id)
        .collect();
    assert!(
        ids.is_subset(&published),
        "long-polls were answered with packets the service did not publish"
    );
    let mut closed = 0;
    for s in slow {
        closed += usize::from(s.await.unwrap());
    }
    assert_eq!(closed, SLOW, "slow connections the service did not close");
    eprintln!(
        "web load: {EVENTS} events in {quiet_s:.2} s without load ({:.0}/s), {loaded_s:.2} s with {LONG_POLLS} long-polls and {SLOW} slow connections ({:.0}/s): ratio {:.2}",
        EVENTS as f64 / quiet_s,
        EVENTS as f64 / loaded_s,
        quiet_s / loaded_s
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_dashboard_refuses_foreign_hosts_and_extra_connections() {
    let b = Broker::start();
    b.create_topic(INPUT, 1).await;
    b.create_topic(OUTPUT, 1).await;
    b.create_topic(DLQ, 1).await;
    let dir = tempfile::tempdir().unwrap();
    let svc = start(
        &b,
        dir.path(),
        "limits",
        &[
            ("TELEMETRY__MAX_CONNECTIONS", "20"),
            ("TELEMETRY__HEADER_TIMEOUT", "3s"),
        ],
    );
    let port = svc.metrics_port;

    // DNS rebinding: a page of attacker.example resolved to 127.0.0.1.
    for path in ["/", "/api/status", "/api/packets"] {
        let (status, _, _) = request(port, &get(path, "attacker.example:9464"))
            .await
            .unwrap();
        assert_eq!(status, 403, "{path}");
        let (status, _, _) = request(port, &get(path, &format!("localhost:{port}")))
            .await
            .unwrap();
        assert_eq!(status, 200, "{path}");
    }
    let (status, _, _) = request(port, &get("/metrics", "prometheus.example"))
        .await
        .unwrap();
    assert_eq!(status, 200, "scrapers come by any name");

    // Twenty slow connections take every place; the next is refused at once.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut held = Vec::new();
    for _ in 0..20 {
        let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        s.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
        held.push(s);
    }
    let mut refused = false;
    while !refused {
        assert!(Instant::now() < deadline, "never refused beyond the limit");
        if let Some((status, _, body)) = request(port, &get("/api/status", "localhost")).await {
            refused = status == 503;
            if refused {
                assert!(String::from_utf8_lossy(&body).contains("too many connections"));
            }
        }
    }
    // Their headers never complete: the service closes them, and answers again.
    for mut s in held {
        let mut buf = [0u8; 256];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, s.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => break,
                Ok(Ok(_)) => continue,
                Err(_) => panic!("a slow connection stays open"),
            }
        }
    }
    loop {
        assert!(
            Instant::now() < deadline,
            "the listener does not answer again"
        );
        if let Some((200, _, _)) = request(port, &get("/api/status", "localhost")).await {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let metrics = svc.metrics();
    assert!(
        metric(&metrics, "login_metrics_http_connections_refused_total").unwrap_or(0.0) >= 1.0,
        "{metrics}"
    );
}
