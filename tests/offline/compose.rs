//! The compose files are valid and agree with the program: every
//! `LOGIN_METRICS__...` variable they set is a key `login-metrics` accepts.
//! Debian's docker-compose validates without a Docker engine
//! (`scripts/install-compose` installs it).

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

/// The host user's ids, as the README has people export them.
const IDS: [(&str, &str); 2] = [("UID", "1234"), ("GID", "2345")];

fn compose_config(files: &[&str]) -> String {
    let out = run_compose(files, &IDS);
    assert!(
        out.status.success(),
        "docker-compose {files:?} config failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// `docker-compose config` on `files` with exactly the variables `ids` of
/// UID and GID (the others removed).
fn run_compose(files: &[&str], ids: &[(&str, &str)]) -> std::process::Output {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut cmd = Command::new("docker-compose");
    for f in files {
        cmd.arg("-f").arg(root.join(f));
    }
    cmd.env_remove("UID")
        .env_remove("GID")
        .envs(ids.iter().copied());
    cmd.arg("config").current_dir(root).output().unwrap_or_else(|e| {
        panic!("docker-compose is not installed ({e}). Fix: run scripts/install-compose, or the whole suite with scripts/test")
    })
}

/// Shells set UID but do not export it: a default would silently run the
/// service as some other user, whose metrics log the host user cannot touch.
/// Without the ids, compose stops and says what to export; with them, the
/// service runs as that user.
#[test]
fn the_service_runs_as_the_exported_host_user_or_compose_says_what_to_export() {
    let out = run_compose(&["docker-compose.yaml"], &[]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("export UID") && err.contains("GID"), "{err}");
    let normalised = compose_config(&["docker-compose.yaml"]);
    assert!(normalised.contains("user: 1234:2345"), "{normalised}");
}

/// service → its LOGIN_METRICS__ variables, from the normalised output of
/// `docker-compose config` (services at two spaces, keys at four, variables at six).
fn login_metrics_env(normalised: &str) -> BTreeMap<String, Vec<(String, String)>> {
    let mut out: BTreeMap<String, Vec<(String, String)>> = BTreeMap::new();
    let (mut in_services, mut service, mut in_env) = (false, String::new(), false);
    for line in normalised.lines() {
        let indent = line.len() - line.trim_start().len();
        let text = line.trim();
        match indent {
            0 => in_services = text == "services:",
            2 if in_services => {
                service = text.trim_end_matches(':').to_string();
                out.entry(service.clone()).or_default();
                in_env = false;
            }
            4 if in_services => in_env = text == "environment:",
            6 if in_services && in_env => {
                if let Some((k, v)) = text.split_once(": ") {
                    if k.starts_with("LOGIN_METRICS__") {
                        let v = v.trim_matches('\'').trim_matches('"').to_string();
                        out.get_mut(&service).unwrap().push((k.to_string(), v));
                    }
                }
            }
            _ => {}
        }
    }
    out
}

fn check(files: &[&str], expected_services: &[&str]) {
    let normalised = compose_config(files);
    let services = login_metrics_env(&normalised);
    for s in expected_services {
        assert!(
            services.contains_key(*s),
            "service {s} missing from {files:?}: {:?}",
            services.keys()
        );
    }
    let mut checked = 0;
    for (service, vars) in services.iter().filter(|(_, v)| !v.is_empty()) {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_login-metrics"));
        cmd.arg("config");
        for (k, _) in std::env::vars() {
            if k.starts_with("LOGIN_METRICS__") {
                cmd.env_remove(k);
            }
        }
        let out = cmd.envs(vars.iter().map(|(k, v)| (k, v))).output().unwrap();
        assert!(
            out.status.success(),
            "{files:?}: service {service} sets variables login-metrics rejects:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let printed = String::from_utf8_lossy(&out.stdout);
        assert!(
            printed.contains("bootstrap_servers = \"kafka:9092\""),
            "{service}: {printed}"
        );
        checked += 1;
    }
    assert!(
        checked > 0,
        "no service of {files:?} configures login-metrics"
    );
}

#[test]
fn the_main_compose_file_is_valid_and_agrees_with_the_program() {
    check(
        &["docker-compose.yaml"],
        &["kafka", "create-topics", "data-generator", "login-metrics"],
    );
}

#[test]
fn the_development_overrides_are_valid_and_agree_with_the_program() {
    check(
        &["docker-compose.yaml", "docker-compose-overrides.yaml"],
        &[
            "kafka",
            "create-topics",
            "data-generator",
            "login-metrics",
            "kafka-ui",
            "fast-generator",
            "prometheus",
            "grafana",
        ],
    );
}

/// The lines of one service in the normalised output (services at two
/// spaces, their keys deeper).
fn service_block(normalised: &str, service: &str) -> String {
    let head = format!("  {service}:");
    normalised
        .lines()
        .skip_while(|l| *l != head)
        .skip(1)
        .take_while(|l| l.starts_with("    "))
        .map(|l| format!("{l}\n"))
        .collect()
}

/// The generator runs the login-metrics image, whose HEALTHCHECK asks a
/// /healthz a generator does not serve: the overrides switch it off, so the
/// generator does not show as unhealthy. And the development overlay keeps
/// window mode's wall-clock rules at their defaults (a short batch.max_wait
/// would close windows before their events arrive and dead-letter them as late).
#[test]
fn the_generator_has_no_health_check_and_the_overrides_keep_the_window_rules() {
    let normalised = compose_config(&["docker-compose.yaml", "docker-compose-overrides.yaml"]);
    let generator = service_block(&normalised, "fast-generator");
    assert!(
        generator.contains("healthcheck:\n      test:\n      - NONE"),
        "{generator}"
    );
    let service = service_block(&normalised, "login-metrics");
    for key in [
        "BATCH__MAX_WAIT",
        "BATCH__MAX_EVENTS",
        "BATCH__IDLE",
        "BATCH__MODE",
    ] {
        assert!(
            !service.contains(key),
            "the overrides set {key}:\n{service}"
        );
    }
}
