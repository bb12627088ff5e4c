//! Running the `login-metrics` binary in tests.

use std::process::{Command, Output};

/// The binary, with nothing of the caller's configuration environment: the
/// tests decide it.
pub fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_login-metrics"));
    for (k, _) in std::env::vars() {
        if k.starts_with("LOGIN_METRICS__") || k == "RUST_LOG" {
            c.env_remove(k);
        }
    }
    c
}

/// Runs `c` to completion: its output, stdout and stderr as text.
pub fn run(c: &mut Command) -> (Output, String, String) {
    let out = c.output().expect("runs");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    (out, stdout, stderr)
}
