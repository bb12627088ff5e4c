//! `mock-cluster`: librdkafka's mock Kafka cluster on loopback until a
//! signal, for tests that kill the service while its broker keeps running.

use std::process::ExitCode;

use tokio_util::sync::CancellationToken;

/// Creates each `NAME:PARTITIONS` topic, prints the bootstrap servers on the
/// first line of stdout and serves until `stop`.
pub async fn run(topics: &[String], stop: CancellationToken) -> ExitCode {
    let cluster = match rdkafka::mocking::MockCluster::new(1) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("login-metrics mock-cluster: {e}");
            return ExitCode::FAILURE;
        }
    };
    for t in topics {
        let created = t
            .rsplit_once(':')
            .and_then(|(name, n)| Some((name, n.parse::<i32>().ok()?)))
            .map(|(name, n)| cluster.create_topic(name, n, 1));
        if !matches!(created, Some(Ok(()))) {
            eprintln!("login-metrics mock-cluster: cannot create topic `{t}` (NAME:PARTITIONS)");
            return ExitCode::from(2);
        }
    }
    println!("{}", cluster.bootstrap_servers());
    stop.cancelled().await;
    ExitCode::SUCCESS
}
