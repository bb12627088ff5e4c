//! Observability: /metrics counters equal what a run on the mock cluster did,
//! /healthz and /readyz answer as specified before, during and after the run,
//! and every metric deploy/'s dashboard and alert rules use is exported.
//! (The only pipeline run in its test binary: the Prometheus recorder is process-wide.)

use std::time::{Duration, Instant};

use crate::common::*;
use login_metrics::telemetry;
use login_metrics::Pipeline;
use rdkafka::mocking::MockCluster;
use tokio_util::sync::CancellationToken;

/// The value of one sample line (`name` including any labels) in a scrape.
fn sample(scrape: &str, name: &str) -> f64 {
    scrape
        .lines()
        .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')))
        .unwrap_or_else(|| panic!("{name} not in the scrape:\n{scrape}"))
        .trim()
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_health_and_readiness_follow_the_run() {
    let c = MockCluster::new(1).unwrap();
    c.create_topic(INPUT, 2, 1).unwrap();
    c.create_topic(OUTPUT, 1, 1).unwrap();
    c.create_topic(DLQ, 1, 1).unwrap();
    let bs = c.bootstrap_servers();
    let dir = tempfile::tempdir().unwrap();
    let (inputs, malformed) = generated_input(71, 2_000, 5_000, 2);
    produce_input(&bs, &inputs, &malformed);
    let invalid = malformed.iter().filter(|m| **m).count() as f64;
    assert!(invalid > 0.0);

    let pipeline = Pipeline::new(settings(
        &bs,
        &dir.path().join("m.log"),
        // Not a divisor of the input: the last batch closes by batch.max_wait,
        // after the last message, when no statistics are due.
        &[("BATCH__MAX_EVENTS", "1700")],
    ));
    let health = pipeline.health();
    let progress = pipeline.progress();
    let server_stop = CancellationToken::new();
    let addr = login_metrics::web::server::serve(
        "127.0.0.1:0".parse().unwrap(),
        health,
        server_stop.clone(),
    )
    .await
    .unwrap()
    .to_string();

    // Before the pipeline loop runs: neither alive nor ready.
    assert_eq!(http_get(&addr, "/healthz").unwrap().0, 503);
    assert_eq!(http_get(&addr, "/readyz").unwrap().0, 503);

    let shutdown = CancellationToken::new();
    // A failed assertion stops the pipeline too: the runtime, dropped as the
    // panic unwinds, waits for the consumer thread, which runs until then.
    let _stop_on_failure = (
        shutdown.clone().drop_guard(),
        server_stop.clone().drop_guard(),
    );
    let run = tokio::spawn(pipeline.run(shutdown.clone()));
    let deadline = Instant::now() + Duration::from_secs(60);
    while http_get(&addr, "/readyz").unwrap().0 != 200 {
        assert!(Instant::now() < deadline, "never ready");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        http_get(&addr, "/healthz").unwrap().0,
        200,
        "alive once ready"
    );
    while progress.messages.load(std::sync::atomic::Ordering::Relaxed) < inputs.len() as u64 {
        assert!(Instant::now() < deadline, "not all consumed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The consumer lag comes with librdkafka's statistics, every 5 s.
    while !http_get(&addr, "/metrics")
        .unwrap()
        .1
        .contains(&format!("{}{{", telemetry::CONSUMER_LAG))
    {
        assert!(Instant::now() < deadline, "no statistics with the lag");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Committed to the end while the consumer still holds its partitions:
    // the lag reads 0 on every partition at once, not at the next statistics
    // (5 s apart), which may come after the last commit or never.
    while progress
        .committed_messages
        .load(std::sync::atomic::Ordering::Relaxed)
        < inputs.len() as u64
    {
        assert!(Instant::now() < deadline, "not all committed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let scrape = http_get(&addr, "/metrics").unwrap().1;
    let lags: Vec<&str> = scrape
        .lines()
        .filter(|l| l.starts_with(&format!("{}{{", telemetry::CONSUMER_LAG)))
        .collect();
    assert_eq!(lags.len(), 2, "{scrape}");
    for l in lags {
        assert!(l.ends_with(" 0"), "{l}");
    }
    shutdown.cancel();
    let summary = run.await.unwrap().unwrap();

    // After the loop has stopped: neither alive nor ready.
    assert_eq!(http_get(&addr, "/healthz").unwrap().0, 503);
    assert_eq!(http_get(&addr, "/readyz").unwrap().0, 503);

    let (status, scrape) = http_get(&addr, "/metrics").unwrap();
    assert_eq!(status, 200);
    let packets = read_packets(&bs).len() as f64;
    let n = inputs.len() as f64;
    assert_eq!(sample(&scrape, telemetry::MESSAGES), n);
    assert_eq!(sample(&scrape, telemetry::EVENTS_VALID), n - invalid);
    let by_kind: f64 = scrape
        .lines()
        .filter(|l| l.starts_with(&format!("{}{{", telemetry::EVENTS_INVALID)))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
        .sum();
    assert_eq!(by_kind, invalid);
    assert_eq!(sample(&scrape, telemetry::DEAD_LETTERS), invalid);
    assert_eq!(sample(&scrape, telemetry::PACKETS), packets);
    assert_eq!(packets, summary.packets as f64);
    assert_eq!(
        sample(&scrape, telemetry::PACKET_BYTES),
        summary.packet_bytes as f64
    );
    assert_eq!(
        sample(&scrape, telemetry::COMMITTED),
        n,
        "every message committed"
    );
    // Nothing open once the run is over.
    assert_eq!(sample(&scrape, telemetry::WINDOWS_OPEN), 0.0);
    // Acknowledgements that arrive together are committed together.
    let commits = sample(&scrape, telemetry::COMMITS);
    assert!(
        commits >= 1.0 && commits <= packets,
        "{commits} commits for {packets} packets"
    );
    assert_eq!(
        sample(&scrape, &format!("{}_count", telemetry::ANALYSIS_SECONDS)),
        packets
    );
    assert_eq!(
        sample(&scrape, &format!("{}_count", telemetry::BATCH_EVENTS)),
        packets
    );
    assert_eq!(
        sample(&scrape, &format!("{}_sum", telemetry::BATCH_EVENTS)),
        n - invalid
    );
    let closed: f64 = scrape
        .lines()
        .filter(|l| l.starts_with(&format!("{}{{", telemetry::BATCHES)))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
        .sum();
    assert_eq!(closed, packets);
    let full_batches = (n - invalid) as u64 / 1700;
    assert_eq!(
        sample(
            &scrape,
            &format!("{}{{closed_by=\"count\"}}", telemetry::BATCHES)
        ),
        full_batches as f64
    );
    assert_eq!(
        sample(
            &scrape,
            &format!("{}{{closed_by=\"wait\"}}", telemetry::BATCHES)
        ),
        1.0,
        "the last batch closes by batch.max_wait before the shutdown"
    );
    assert!(scrape.contains(&format!(
        "{}{{version=\"{}\"}} 1",
        telemetry::BUILD_INFO,
        env!("CARGO_PKG_VERSION")
    )));
    assert!(sample(&scrape, telemetry::UPTIME) > 0.0);
    assert!(
        scrape.contains("# TYPE login_metrics_delivery_seconds histogram"),
        "{scrape}"
    );
    // Every metric the Grafana dashboard and the alert rules in deploy/ use
    // is exported, the rare ones (failures, late events) from the start.
    let missing = crate::monitoring::missing_from(&scrape);
    assert!(
        missing.is_empty(),
        "deploy/ uses metrics the service does not export: {missing:?}\n{scrape}"
    );
    server_stop.cancel();
}
