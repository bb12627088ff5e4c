//! The `login-metrics` binary run as a subprocess against a broker, its
//! environment, and waits on what it did.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::broker::free_port;
use super::order::COMMIT_LOG;

/// A `login-metrics run` subprocess.
pub struct Service {
    pub child: Child,
    pub log_path: PathBuf,
    pub metrics_port: u16,
    pub stderr_path: PathBuf,
}

/// Settings every run of the binary uses: short group timeouts, so that a
/// killed member leaves the group quickly, and arrival mode unless the test
/// sets `BATCH__MODE` again (a later variable wins).
pub fn service_env(bootstrap: &str, group: &str) -> Vec<(String, String)> {
    [
        ("BATCH__MODE", "arrival"),
        ("KAFKA__BOOTSTRAP_SERVERS", bootstrap),
        ("KAFKA__GROUP_ID", group),
        ("KAFKA__CONSUMER__MAX_POLL_INTERVAL_MS", "10000"),
        ("KAFKA__CONSUMER__SESSION_TIMEOUT_MS", "6000"),
        ("KAFKA__CONSUMER__HEARTBEAT_INTERVAL_MS", "500"),
        ("TELEMETRY__PROGRESS_INTERVAL", "1s"),
    ]
    .iter()
    .map(|(k, v)| (format!("LOGIN_METRICS__{k}"), v.to_string()))
    .collect()
}

/// [`service_env`], with commits logged (so that a run's order can be
/// checked, [`super::order`]), then `extra` (`SECTION__KEY`, value).
pub fn logged_env(bootstrap: &str, group: &str, extra: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut e = service_env(bootstrap, group);
    e.extend(
        std::iter::once(&COMMIT_LOG)
            .chain(extra)
            .map(|(k, v)| (format!("LOGIN_METRICS__{k}"), v.to_string())),
    );
    e
}

/// Committed offsets as the base of a commit-order check (none: 0).
pub fn base(committed: &[i64]) -> HashMap<i32, i64> {
    committed
        .iter()
        .enumerate()
        .map(|(p, o)| (p as i32, (*o).max(0)))
        .collect()
}

impl Service {
    /// Starts `login-metrics run` with `env` (full variable names) and a metrics log in `dir`.
    pub fn start(dir: &Path, name: &str, env: &[(String, String)]) -> Service {
        Service::start_with(dir, name, env, &[])
    }

    /// [`Service::start`] with arguments after `run` (a bounded run's range).
    pub fn start_with(dir: &Path, name: &str, env: &[(String, String)], args: &[&str]) -> Service {
        let log_path = dir.join(format!("{name}.metrics.log"));
        let stderr_path = dir.join(format!("{name}.stderr.log"));
        let metrics_port = free_port();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_login-metrics"));
        cmd.arg("run").args(args);
        for (k, _) in std::env::vars() {
            if k.starts_with("LOGIN_METRICS__") {
                cmd.env_remove(k);
            }
        }
        cmd.envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .env("LOGIN_METRICS__METRICS_LOG__PATH", &log_path)
            .env(
                "LOGIN_METRICS__TELEMETRY__LISTEN",
                format!("127.0.0.1:{metrics_port}"),
            )
            .env("LOGIN_METRICS__LOG__FORMAT", "json")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr_path).expect("stderr file"));
        let child = cmd.spawn().expect("login-metrics starts");
        Service {
            child,
            log_path,
            metrics_port,
            stderr_path,
        }
    }

    pub fn http_get(&self, path: &str) -> Option<(u16, String)> {
        super::http_get(&format!("127.0.0.1:{}", self.metrics_port), path)
    }

    /// Waits until /readyz answers 200 (connected, partitions assigned).
    pub fn wait_ready(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some((200, _)) = self.http_get("/readyz") {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "login-metrics was not ready in {timeout:?}; stderr:\n{}",
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The telemetry page `/metrics` (empty when nothing answers).
    pub fn metrics(&self) -> String {
        self.http_get("/metrics")
            .map(|(_, body)| body)
            .unwrap_or_default()
    }

    /// The dashboard's `/api/status` (None when nothing answers).
    pub fn status(&self) -> Option<serde_json::Value> {
        let (code, body) = self.http_get("/api/status")?;
        (code == 200).then(|| serde_json::from_str(&body).ok())?
    }

    /// Input messages this process has consumed so far (`/api/status` events).
    pub fn consumed(&self) -> Option<u64> {
        self.status()?["events"].as_u64()
    }

    /// Fails, with the process's log, when it is no longer running.
    pub fn assert_running(&mut self) {
        if let Some(status) = self.child.try_wait().expect("try_wait") {
            panic!(
                "login-metrics exited ({status}) while the test expected it to run; stderr:\n{}",
                self.stderr()
            );
        }
    }

    /// Waits until `done` holds, checking that the process still runs; fails
    /// naming `what` after `timeout`.
    pub fn wait_for(
        &mut self,
        what: &str,
        timeout: Duration,
        mut done: impl FnMut(&Service) -> bool,
    ) {
        let deadline = Instant::now() + timeout;
        loop {
            if done(self) {
                return;
            }
            self.assert_running();
            assert!(
                Instant::now() < deadline,
                "{what}: not seen in {timeout:?}; stderr:\n{}",
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The last `n` lines of the process's log, without the periodic
    /// progress lines.
    pub fn stderr_tail(&self, n: usize) -> String {
        let all = self.stderr();
        let lines: Vec<&str> = all
            .lines()
            .filter(|l| !l.contains("\"message\":\"progress\""))
            .collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// The packets this process wrote to its metrics log.
    pub fn logged_packets(&self) -> Vec<login_metrics::core::packet::Packet> {
        std::fs::read_to_string(&self.log_path)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).expect("packet line"))
            .collect()
    }

    pub fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .args([&format!("-{sig}"), &self.child.id().to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success(), "kill -{sig} failed");
    }

    /// Waits for the process to exit; returns its exit code (None: killed by a signal).
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status.code();
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!(
                    "login-metrics did not exit in {timeout:?}; stderr:\n{}",
                    self.stderr()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits until `group`'s committed offsets on the input topic equal
/// `expected`, failing (with its log) when one of `services` stops meanwhile.
pub fn wait_committed_while_running(
    bootstrap: &str,
    group: &str,
    expected: &[i64],
    timeout: Duration,
    services: &mut [&mut Service],
) {
    let deadline = Instant::now() + timeout;
    loop {
        let now = super::committed(bootstrap, group, expected.len() as i32);
        if now == expected {
            return;
        }
        for s in services.iter_mut() {
            s.assert_running();
        }
        if Instant::now() >= deadline {
            let logs: Vec<String> = services.iter().map(|s| s.stderr_tail(80)).collect();
            panic!(
                "committed offsets {now:?}, expected {expected:?}; the services' last log lines:\n{}",
                logs.join("\n----\n")
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}
