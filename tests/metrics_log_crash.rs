//! kill -9 during rotations of the metrics log: a writer process appends
//! numbered lines to a log bounded to a few hundred bytes, so it rotates
//! every dozen lines (rename to `PATH.0`, directory fsync, compression to
//! `PATH.1.gz` on a thread, shifting the older files), and prints each
//! line's number once its append has returned. The test kills it forty
//! times, reopening the log each time: every other time as soon as it sees a
//! rotation's `PATH.0` (the rename done, the compression under way), the
//! others after a varying number of acknowledged lines. At the end every
//! acknowledged line (every number the writer printed, read to the end of its
//! output after the kill) is in the log files exactly once, every line is
//! whole, and a line written but not acknowledged is there at most once.
//!
//! The test runs its own executable as the writer (`harness = false`: this
//! file's `main` is both), so the writer is a separate process that really
//! dies by SIGKILL at whatever step it is in.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use login_metrics::sink::metrics_log::{pending_path, rotated_path, MetricsLog};

const WRITER: &str = "LOGIN_METRICS_TEST_LOG_WRITER";
const MAX_BYTES: u64 = 300;
const KEEP: usize = 1000;
const RUNS: u64 = 40;

fn main() {
    match std::env::var(WRITER) {
        Ok(spec) => writer(&spec),
        Err(_) => {
            kills_during_rotation_lose_no_acknowledged_line_and_duplicate_none();
            println!(
                "test kills_during_rotation_lose_no_acknowledged_line_and_duplicate_none ... ok"
            );
            println!("test result: ok. 1 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out");
        }
    }
}

/// The writer: `PATH RUN`; appends `{"run":RUN,"n":N}` for N = 0, 1, ... and
/// prints N after each append returned, until it is killed.
fn writer(spec: &str) {
    let (path, run) = spec.rsplit_once(' ').expect("PATH RUN");
    let mut log = MetricsLog::open(Path::new(path), MAX_BYTES, KEEP).expect("the log opens");
    let mut out = std::io::stdout().lock();
    for n in 0u64.. {
        log.append(&format!("{{\"run\":{run},\"n\":{n}}}"))
            .expect("append");
        writeln!(out, "{n}").unwrap();
        out.flush().unwrap();
    }
}

fn kills_during_rotation_lose_no_acknowledged_line_and_duplicate_none() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.log");
    let exe = std::env::current_exe().unwrap();
    // Acknowledged lines per run; the kill comes after a varying number.
    let mut acked: Vec<u64> = Vec::new();
    let mut pending_at_kill = 0;
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    for run in 0..RUNS {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let wanted = 1 + seed % 80;
        let mut child = Command::new(&exe)
            .env(WRITER, format!("{} {run}", path.display()))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut seen = 0;
        while seen < wanted {
            match lines.next() {
                Some(Ok(n)) => {
                    assert_eq!(n.parse::<u64>().unwrap(), seen);
                    seen += 1;
                }
                _ => {
                    let mut err = String::new();
                    child
                        .stderr
                        .take()
                        .unwrap()
                        .read_to_string(&mut err)
                        .unwrap();
                    panic!("writer {run} stopped after {seen} lines: {err}");
                }
            }
        }
        if run % 2 == 0 {
            // Kill in the middle of a rotation: the writer goes on appending
            // (its output pipe holds thousands of lines), so one comes soon.
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
            while !pending_path(&path).exists() {
                assert!(
                    std::time::Instant::now() < deadline,
                    "writer {run}: no rotation seen in 30 s"
                );
                std::thread::yield_now();
            }
        }
        child.kill().unwrap();
        child.wait().unwrap();
        if pending_path(&path).exists() {
            pending_at_kill += 1;
        }
        // Every number printed was acknowledged.
        for n in lines {
            assert_eq!(n.unwrap().parse::<u64>().unwrap(), seen);
            seen += 1;
        }
        acked.push(seen);
    }
    // The last open finishes what the last kill interrupted.
    let mut log = MetricsLog::open(&path, MAX_BYTES, KEEP).unwrap();
    log.settle().unwrap();
    drop(log);

    let mut files: Vec<PathBuf> = (1..=KEEP)
        .map(|n| rotated_path(&path, n))
        .filter(|p| p.exists())
        .collect();
    assert!(files.len() > 50, "only {} rotated files", files.len());
    assert!(!pending_path(&path).exists(), "PATH.0 compressed at open");
    files.push(path.clone());
    let mut count: HashMap<(u64, u64), u32> = HashMap::new();
    for f in &files {
        let text = if f.extension().is_some_and(|e| e == "gz") {
            let mut s = String::new();
            flate2::read::GzDecoder::new(std::fs::File::open(f).unwrap())
                .read_to_string(&mut s)
                .unwrap_or_else(|e| panic!("{}: {e}", f.display()));
            s
        } else {
            std::fs::read_to_string(f).unwrap()
        };
        assert!(
            text.is_empty() || text.ends_with('\n'),
            "{}: torn",
            f.display()
        );
        for line in text.lines() {
            let v: serde_json::Value = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("{}: `{line}` is not whole: {e}", f.display()));
            let key = (v["run"].as_u64().unwrap(), v["n"].as_u64().unwrap());
            *count.entry(key).or_default() += 1;
        }
    }
    let twice: Vec<_> = count.iter().filter(|(_, c)| **c > 1).collect();
    assert!(
        twice.is_empty(),
        "lines in the log more than once: {twice:?}"
    );
    for (run, &n) in acked.iter().enumerate() {
        for i in 0..n {
            assert_eq!(
                count.get(&(run as u64, i)),
                Some(&1),
                "acknowledged line {i} of writer {run} is missing"
            );
        }
    }
    eprintln!(
        "{RUNS} kills, {} acknowledged lines, {} rotated files; PATH.0 awaiting compression at {pending_at_kill} of the kills",
        acked.iter().sum::<u64>(),
        files.len() - 1
    );
}
