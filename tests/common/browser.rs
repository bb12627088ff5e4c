//! Headless Chromium (Debian's package, installed by `scripts/install-chromium`)
//! loading a page the way a person's browser does, script and all, and
//! returning the DOM it rendered.
//!
//! When Chromium is missing, the tests fail with the reason and the fix; they
//! are never skipped.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// `LOGIN_METRICS_TEST_CHROMIUM`, else `chromium` on PATH.
pub fn chromium() -> PathBuf {
    if let Some(path) = std::env::var_os("LOGIN_METRICS_TEST_CHROMIUM") {
        let path = PathBuf::from(path);
        assert!(
            path.is_file(),
            "LOGIN_METRICS_TEST_CHROMIUM={} is not a file.\n\
             Fix: run scripts/install-chromium (Debian's chromium package) and unset the variable, \
             or point it at a Chromium binary.",
            path.display()
        );
        return path;
    }
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join("chromium"))
            .find(|p| p.is_file())
    });
    found.unwrap_or_else(|| {
        panic!(
            "headless Chromium is not installed: `chromium` is not on PATH.\n\
             Fix: run scripts/install-chromium (it installs Debian's chromium package), \
             or run the whole suite with scripts/test, or set LOGIN_METRICS_TEST_CHROMIUM \
             to a Chromium binary."
        )
    })
}

/// Loads `url` in a fresh headless Chromium, lets the page run its scripts
/// for `budget` of virtual time (network fetches pause that clock until they
/// answer), and returns the DOM as HTML.
pub fn dump_dom(url: &str, budget: Duration) -> String {
    let profile = tempfile::tempdir().expect("a profile directory");
    let out = run(
        profile.path(),
        &[
            format!("--virtual-time-budget={}", budget.as_millis()),
            "--dump-dom".to_string(),
            url.to_string(),
        ],
    );
    String::from_utf8_lossy(&out).into_owned()
}

fn run(profile: &Path, args: &[String]) -> Vec<u8> {
    let bin = chromium();
    let mut child = Command::new(&bin)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
    // Read stdout on a thread so a large DOM cannot block the browser on a full pipe.
    let mut stdout = child.stdout.take().expect("piped stdout");
    let reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        std::io::Read::read_to_end(&mut stdout, &mut buf).map(|_| buf)
    });
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        match child.try_wait().expect("try_wait on chromium") {
            Some(_) => break,
            None if Instant::now() > deadline => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("chromium did not finish within 120 s: {args:?}");
            }
            None => std::thread::sleep(Duration::from_millis(50)),
        }
    }
    reader
        .join()
        .expect("stdout reader")
        .expect("chromium's output")
}
