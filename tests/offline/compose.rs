//! The compose files are valid and agree with the program: every
//! `LOGIN_METRICS__...` variable they set is a key `login-metrics` accepts.
//! Debian's docker-compose validates without a Docker engine
//! (`scripts/install-compose` installs it).

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

fn compose_config(files: &[&str]) -> String {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut cmd = Command::new("docker-compose");
    for f in files {
        cmd.arg("-f").arg(root.join(f));
    }
    let out = cmd.arg("config").current_dir(root).output().unwrap_or_else(|e| {
        panic!("docker-compose is not installed ({e}). Fix: run scripts/install-compose, or the whole suite with scripts/test")
    });
    assert!(
        out.status.success(),
        "docker-compose {files:?} config failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
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
        ],
    );
}
