//! The `login-metrics` binary: configuration errors, the effective
//! configuration, pseudonyms and the demo.

use crate::common::cli::{bin, run};

#[test]
fn bad_configuration_exits_non_zero_naming_every_key() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.toml");
    std::fs::write(&file, "[kafka]\ntopic = \"x\"\n[batch]\nmax_events = 0\n").unwrap();
    let (out, _, err) = run(bin()
        .args(["config", "--config"])
        .arg(&file)
        .env("LOGIN_METRICS__BATCH__MAX_SPAN", "ten seconds"));
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("kafka.topic: unknown key"), "{err}");
    assert!(
        err.contains("batch.max_events: must be at least 1"),
        "{err}"
    );
    assert!(err.contains("batch.max_span:"), "{err}");
    assert!(err.contains("3 problems"), "{err}");
}

#[test]
fn run_refuses_a_bad_configuration_before_connecting() {
    let (out, _, err) = run(bin()
        .arg("run")
        .env("LOGIN_METRICS__BATCH__MAX_WAIT", "soon"));
    assert_eq!(out.status.code(), Some(2));
    assert!(err.contains("batch.max_wait"), "{err}");
}

#[test]
fn a_bounded_run_refuses_merged_windows_naming_the_setting() {
    let (out, _, err) = run(bin()
        .args(["run", "--until-end"])
        .env("LOGIN_METRICS__SCALE__MERGE", "true")
        .env("LOGIN_METRICS__TELEMETRY__LISTEN", "")
        .env("LOGIN_METRICS__METRICS_LOG__PATH", ""));
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("scale.merge"), "{err}");
}

#[test]
fn a_missing_config_file_is_named() {
    let (out, _, err) = run(bin().args(["config", "--config", "/nonexistent/lm.toml"]));
    assert_eq!(out.status.code(), Some(2));
    assert!(
        err.contains("--config") && err.contains("/nonexistent/lm.toml"),
        "{err}"
    );
}

#[test]
fn config_prints_the_effective_configuration_with_secrets_redacted() {
    let (out, text, err) = run(bin()
        .arg("config")
        .env("LOGIN_METRICS__KAFKA__BOOTSTRAP_SERVERS", "kafka:9092")
        .env("LOGIN_METRICS__KAFKA__CONSUMER__SASL_PASSWORD", "s3cr3t-pw")
        .env("LOGIN_METRICS__PRIVACY__PSEUDONYMIZE", "ip")
        .env("LOGIN_METRICS__PRIVACY__KEY", "k3y-material"));
    assert!(out.status.success(), "{err}");
    assert!(
        text.contains("bootstrap_servers = \"kafka:9092\""),
        "{text}"
    );
    assert!(
        text.contains("\"sasl.password\" = \"<redacted>\""),
        "{text}"
    );
    assert!(
        !text.contains("s3cr3t-pw") && !text.contains("k3y-material"),
        "{text}"
    );
}

/// The default sets `"compression.level" = "1"`; an operator's override,
/// spelled the only way an environment variable can spell it, or in a
/// `--config` file, wins in every process, whatever the process's hash
/// seeds (the two spellings once were two keys of an unordered map).
#[test]
fn a_property_override_beats_the_default_on_every_start() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("c.toml");
    std::fs::write(&file, "[kafka.producer]\ncompression_level = \"7\"\n").unwrap();
    for start in 0..20 {
        let (out, text, err) = run(bin()
            .arg("config")
            .env("LOGIN_METRICS__KAFKA__PRODUCER__COMPRESSION_LEVEL", "9"));
        assert!(out.status.success(), "{err}");
        assert!(
            text.contains("\"compression.level\" = \"9\"")
                && text.matches("compression").count() == 2,
            "start {start}: {text}"
        );
        let (out, text, err) = run(bin().arg("config").arg("--config").arg(&file));
        assert!(out.status.success(), "{err}");
        assert!(
            text.contains("\"compression.level\" = \"7\""),
            "start {start}: {text}"
        );
    }
}

#[test]
fn pseudonym_prints_the_keyed_hmac_of_each_value() {
    let (out, text, err) = run(bin()
        .args(["pseudonym", "what do ya want for nothing?", "10.0.0.1"])
        .env("LOGIN_METRICS__PRIVACY__KEY", "Jefe"));
    assert!(out.status.success(), "{err}");
    let first = text.lines().next().unwrap();
    assert_eq!(
        first,
        "5bdcc146bf60754e6a042426089575c7\twhat do ya want for nothing?"
    );
    let (out, _, err) = run(bin().args(["pseudonym", "x"]));
    assert_eq!(out.status.code(), Some(2));
    assert!(err.contains("privacy.key"), "{err}");
}

#[test]
fn health_fails_when_nothing_listens() {
    let (out, _, err) = run(bin().args(["health", "--url", "http://127.0.0.1:9/healthz"]));
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("unhealthy"), "{err}");
}

/// Without `--url`, `health` asks the listener the configuration names (a
/// container that moves `telemetry.listen` keeps a working health check).
#[test]
fn health_asks_the_configured_listener() {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = std::thread::spawn(move || {
        let (mut conn, _) = listener.accept().unwrap();
        let mut request = Vec::new();
        let mut buf = [0u8; 1024];
        while !request.ends_with(b"\r\n\r\n") {
            let n = conn.read(&mut buf).unwrap();
            assert!(n > 0, "the request ends early");
            request.extend_from_slice(&buf[..n]);
        }
        conn.write_all(b"HTTP/1.0 200 OK\r\n\r\nok\n").unwrap();
        String::from_utf8_lossy(&request).into_owned()
    });
    let (out, _, err) = run(bin().arg("health").env(
        "LOGIN_METRICS__TELEMETRY__LISTEN",
        format!("0.0.0.0:{port}"),
    ));
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(server.join().unwrap().starts_with("GET /healthz "));

    let (out, _, err) = run(bin()
        .arg("health")
        .env("LOGIN_METRICS__TELEMETRY__LISTEN", ""));
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("telemetry.listen"), "{err}");
}

#[test]
fn demo_runs_on_the_mock_cluster_and_leaves_the_metrics_log() {
    let dir = tempfile::tempdir().unwrap();
    let (out, text, err) = run(bin()
        .args(["demo", "--events", "30000", "--seed", "5"])
        .current_dir(dir.path()));
    assert!(out.status.success(), "{err}");
    assert!(text.contains("events processed  30000"), "{text}");
    assert!(text.contains("user_id + ip"), "{text}");
    let log = std::fs::read_to_string(dir.path().join("login-metrics.log")).unwrap();
    let packets: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(
        packets.iter().all(|p| p["window"]["start"].is_string()),
        "the demo runs window mode"
    );
    let valid: u64 = packets
        .iter()
        .map(|p| p["events"]["valid"].as_u64().unwrap())
        .sum();
    let late = number_after(&text, "late events");
    let reported_valid = number_after(&text, "valid");
    assert_eq!(
        valid + late,
        reported_valid,
        "every valid event is in exactly one window or late:\n{text}"
    );
    let windows: std::collections::BTreeSet<&str> = packets
        .iter()
        .map(|p| p["window"]["start"].as_str().unwrap())
        .collect();
    assert!(
        text.contains(&format!("windows           {} (", windows.len())),
        "{text}"
    );
    // A bounded run: the last windows close when the input is read, not
    // batch.max_wait later; nothing else closes by wall clock.
    let closed_by: std::collections::BTreeSet<&str> = packets
        .iter()
        .map(|p| p["window"]["closed_by"].as_str().unwrap())
        .collect();
    assert!(closed_by.contains("end"), "{closed_by:?}");
    assert!(!closed_by.contains("wait"), "{closed_by:?}");
}

/// The number on the summary line that starts with `label` (or, for "late
/// events", the number before it).
fn number_after(text: &str, label: &str) -> u64 {
    if label == "late events" {
        let i = text.find(" late events)").expect("a late count");
        let start = text[..i].rfind('(').unwrap() + 1;
        return text[start..i].trim().parse().unwrap();
    }
    let line = text
        .lines()
        .find(|l| l.trim_start().starts_with(label))
        .unwrap_or_else(|| panic!("no `{label}` line in {text}"));
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// A broker that cannot be reached: librdkafka reports every refused
/// connection of every client (producer, consumer, checkpoint store) through
/// both its log and its error callback, and retries on its own. The service
/// says so in one WARN line and never at ERROR, while every report is
/// counted in `login_metrics_kafka_errors_total`.
#[test]
fn an_unreachable_broker_is_one_warning_not_a_flood_of_errors() {
    use std::io::Read;
    use std::time::{Duration, Instant};

    let dir = tempfile::tempdir().unwrap();
    // Bound, then closed: nothing listens there.
    let closed = crate::common::broker::free_port();
    let listen = format!("127.0.0.1:{}", crate::common::broker::free_port());
    let mut child = bin()
        .arg("run")
        .env(
            "LOGIN_METRICS__KAFKA__BOOTSTRAP_SERVERS",
            format!("127.0.0.1:{closed}"),
        )
        .env("LOGIN_METRICS__TELEMETRY__LISTEN", &listen)
        .env("LOGIN_METRICS__METRICS_LOG__PATH", dir.path().join("m.log"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let reported = || {
        crate::common::http_get(&listen, "/metrics")
            .map(|(_, page)| {
                page.lines()
                    .filter(|l| l.starts_with("login_metrics_kafka_errors_total{"))
                    .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                    .sum::<f64>()
            })
            .unwrap_or(0.0)
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut n = 0.0;
    // The producer, the topic check and the admin client each meet it.
    while n < 3.0 {
        assert!(
            Instant::now() < deadline,
            "librdkafka reported {n} errors in 60 s"
        );
        std::thread::sleep(Duration::from_millis(100));
        n = reported();
    }
    let _ = std::process::Command::new("kill")
        .args(["-KILL", &child.id().to_string()])
        .status();
    child.wait().unwrap();
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    let errors: Vec<&str> = err.lines().filter(|l| l.contains(" ERROR ")).collect();
    assert!(errors.is_empty(), "ERROR lines: {errors:#?}");
    let refused: Vec<&str> = err
        .lines()
        .filter(|l| l.contains("Connection refused"))
        .collect();
    assert_eq!(
        refused.len(),
        1,
        "one line for {n} reports of the refused connection: {refused:#?}"
    );
    assert!(refused[0].contains(" WARN "), "{}", refused[0]);
}
