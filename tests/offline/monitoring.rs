//! The monitoring kit in `deploy/`: Prometheus's configuration and alert rules
//! pass promtool (syntax, and the rules' unit tests in `alerts_test.yml`), and
//! the Grafana dashboard queries the provisioned data source. That every
//! metric the dashboard and the rules use is really exported is checked on
//! the scrape of a real run, in `telemetry.rs`, through
//! [`missing_from`].

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

fn deploy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy")
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The Grafana dashboards, by path.
fn dashboards() -> Vec<PathBuf> {
    let dir = deploy().join("grafana/dashboards");
    let mut out: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    out.sort();
    assert!(!out.is_empty(), "no dashboard in {}", dir.display());
    out
}

/// The files whose queries must name real metrics: the dashboards and the
/// alert rules.
fn board_and_rules() -> Vec<PathBuf> {
    let mut files = dashboards();
    files.push(deploy().join("prometheus/alerts.yml"));
    files
}

/// `LOGIN_METRICS_TEST_PROMTOOL`, else `promtool` on PATH.
fn promtool() -> PathBuf {
    if let Some(path) = std::env::var_os("LOGIN_METRICS_TEST_PROMTOOL") {
        let path = PathBuf::from(path);
        assert!(
            path.is_file(),
            "LOGIN_METRICS_TEST_PROMTOOL={} is not a file.\n\
             Fix: run scripts/install-promtool (Debian's prometheus package) and unset the variable, \
             or point it at a promtool binary.",
            path.display()
        );
        return path;
    }
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join("promtool"))
            .find(|p| p.is_file())
    });
    found.unwrap_or_else(|| {
        panic!(
            "Prometheus's promtool is not installed: `promtool` is not on PATH.\n\
             Fix: run scripts/install-promtool (it installs Debian's prometheus package), \
             or run the whole suite with scripts/test, or set LOGIN_METRICS_TEST_PROMTOOL \
             to a promtool binary."
        )
    })
}

/// Runs promtool in `deploy/prometheus` and asserts that it succeeds.
fn run_promtool(args: &[&str]) {
    let dir = deploy().join("prometheus");
    let out = Command::new(promtool())
        .args(args)
        .current_dir(&dir)
        .output()
        .unwrap_or_else(|e| panic!("promtool {args:?}: {e}"));
    assert!(
        out.status.success(),
        "promtool {} failed in {}:\n{}{}",
        args.join(" "),
        dir.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_alert_rules_pass_promtool() {
    run_promtool(&["check", "rules", "alerts.yml"]);
}

#[test]
fn the_prometheus_configuration_passes_promtool() {
    // Also checks the rule files it names.
    run_promtool(&["check", "config", "prometheus.yml"]);
}

#[test]
fn each_alert_fires_in_its_unit_test_and_only_there() {
    run_promtool(&["test", "rules", "alerts_test.yml"]);
}

/// Every `login_metrics_...` name the dashboards and the alert rules use, as
/// written (a histogram's with its `_bucket`, `_sum` or `_count` suffix).
pub fn names_used_by_board_and_rules() -> BTreeSet<String> {
    const PREFIX: &str = "login_metrics_";
    let mut names = BTreeSet::new();
    for file in board_and_rules() {
        let text = read(&file);
        let mut rest = text.as_str();
        while let Some(at) = rest.find(PREFIX) {
            let preceded_by_word = rest[..at]
                .chars()
                .next_back()
                .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_');
            let tail = &rest[at..];
            let len = tail
                .find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
                .unwrap_or(tail.len());
            if !preceded_by_word {
                names.insert(tail[..len].to_string());
            }
            rest = &tail[len..];
        }
    }
    // A wrong path or format would make the check below vacuous.
    assert!(
        names.len() >= 10,
        "only {names:?} found in {:?}",
        board_and_rules()
    );
    names
}

/// The names of [`names_used_by_board_and_rules`] that are no metric family
/// of `scrape` (Prometheus text format): neither declared by a `# TYPE` line
/// nor the name of a sample; `_bucket`, `_sum` and `_count` count only for
/// a histogram (or, `_sum` and `_count`, a summary).
pub fn missing_from(scrape: &str) -> Vec<String> {
    let mut types: BTreeMap<&str, &str> = BTreeMap::new();
    let mut samples: BTreeSet<&str> = BTreeSet::new();
    for line in scrape.lines() {
        if let Some(decl) = line.strip_prefix("# TYPE ") {
            let mut words = decl.split_whitespace();
            if let (Some(name), Some(kind)) = (words.next(), words.next()) {
                types.insert(name, kind);
            }
        } else if !line.starts_with('#') && !line.trim().is_empty() {
            let end = line.find(['{', ' ']).unwrap_or(line.len());
            samples.insert(&line[..end]);
        }
    }
    let family = |name: &str| {
        if types.contains_key(name) {
            return true;
        }
        let histogram = |base: &str, kinds: &[&str]| {
            types.get(base).is_some_and(|k| kinds.contains(k)) && samples.contains(name)
        };
        if let Some(base) = name.strip_suffix("_bucket") {
            return histogram(base, &["histogram"]);
        }
        if let Some(base) = name
            .strip_suffix("_sum")
            .or_else(|| name.strip_suffix("_count"))
        {
            return histogram(base, &["histogram", "summary"]);
        }
        samples.contains(name)
    };
    names_used_by_board_and_rules()
        .into_iter()
        .filter(|n| !family(n))
        .collect()
}

#[test]
fn the_metric_family_check_tells_present_from_missing() {
    let scrape = "# TYPE login_metrics_delivery_seconds histogram\n\
                  login_metrics_delivery_seconds_bucket{le=\"0.1\"} 1\n\
                  login_metrics_packets_published_total 3\n\
                  # TYPE login_metrics_uptime_seconds gauge\n\
                  login_metrics_uptime_seconds 5\n";
    let missing = missing_from(scrape);
    for present in [
        "login_metrics_delivery_seconds_bucket",
        "login_metrics_packets_published_total",
        "login_metrics_uptime_seconds",
    ] {
        assert!(
            names_used_by_board_and_rules().contains(present),
            "{present}"
        );
        assert!(!missing.contains(&present.to_string()), "{present}");
    }
    assert!(missing.contains(&"login_metrics_consumer_lag".to_string()));
    assert!(missing.contains(&"login_metrics_batch_analysis_seconds_bucket".to_string()));
}

/// The `uid` of the data source Grafana provisions.
fn provisioned_datasource_uid() -> String {
    let path = deploy().join("grafana/provisioning/datasources/prometheus.yml");
    let text = read(&path);
    let uids: Vec<&str> = text
        .lines()
        .filter_map(|l| l.trim().strip_prefix("uid:"))
        .map(|v| v.trim().trim_matches('"'))
        .collect();
    assert_eq!(
        uids.len(),
        1,
        "one data source with a uid in {}",
        path.display()
    );
    uids[0].to_string()
}

/// Every `datasource` object in `v`, with where it is.
fn datasources<'a>(
    v: &'a serde_json::Value,
    at: String,
    out: &mut Vec<(String, &'a serde_json::Value)>,
) {
    match v {
        serde_json::Value::Object(map) => {
            for (k, x) in map {
                if k == "datasource" {
                    out.push((at.clone(), x));
                }
                datasources(x, format!("{at}.{k}"), out);
            }
        }
        serde_json::Value::Array(items) => {
            for (i, x) in items.iter().enumerate() {
                datasources(x, format!("{at}[{i}]"), out);
            }
        }
        _ => {}
    }
}

#[test]
fn the_dashboard_queries_the_provisioned_datasource() {
    let uid = provisioned_datasource_uid();
    for path in dashboards() {
        let board: serde_json::Value = serde_json::from_str(&read(&path))
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert!(board["uid"].is_string(), "{}: no uid", path.display());
        let panels = board["panels"].as_array().expect("panels");
        assert!(!panels.is_empty());
        for p in panels {
            let targets = p["targets"].as_array().expect("targets");
            assert!(
                !targets.is_empty(),
                "{}: {} has no query",
                path.display(),
                p["title"]
            );
            for t in targets {
                assert!(
                    t["expr"]
                        .as_str()
                        .is_some_and(|e| e.contains("login_metrics_")),
                    "{}: {}: {t}",
                    path.display(),
                    p["title"]
                );
            }
        }
        let mut found = Vec::new();
        datasources(&board, String::new(), &mut found);
        assert!(found.len() > panels.len());
        for (at, ds) in found {
            assert_eq!(ds["type"], "prometheus", "{}{at}", path.display());
            assert_eq!(ds["uid"], uid.as_str(), "{}{at}", path.display());
        }
    }
}

#[test]
fn grafana_and_prometheus_read_the_files_compose_mounts() {
    let compose =
        read(&Path::new(env!("CARGO_MANIFEST_DIR")).join("docker-compose-overrides.yaml"));
    let provider = read(&deploy().join("grafana/provisioning/dashboards/login-metrics.yml"));
    let path = provider
        .lines()
        .find_map(|l| l.trim().strip_prefix("path:"))
        .expect("the provider's path")
        .trim();
    for mount in [
        format!("./deploy/grafana/dashboards:{path}:ro"),
        "./deploy/grafana/provisioning:/etc/grafana/provisioning:ro".to_string(),
        "./deploy/prometheus:/etc/prometheus:ro".to_string(),
    ] {
        assert!(
            compose.contains(&mount),
            "docker-compose-overrides.yaml does not mount {mount}"
        );
    }
    let prometheus = read(&deploy().join("prometheus/prometheus.yml"));
    assert!(prometheus.contains("login-metrics:9464"), "{prometheus}");
}
