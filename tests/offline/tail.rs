//! `login-metrics tail`: the real binary on metrics logs written by the
//! service's own `MetricsLog` (rotation included) with packets built by the
//! service's own window rules, analysis and packet builder.
//!
//! Following is driven without timing: the test reads the child's output line
//! by line (blocking) until what it expects has been printed, then changes the
//! file. A watchdog kills a child that hangs, so a broken follow fails the
//! test instead of blocking it; it asserts nothing.

use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use chrono::DateTime;
use flate2::write::GzEncoder;
use flate2::Compression;
use login_metrics::commands::generator::{Generator, GeneratorConfig};
use login_metrics::commands::tail::format_packet;
use login_metrics::core::analysis;
use login_metrics::core::event::{self, Field, Requirements};
use login_metrics::core::grouping::window::{LatePolicy, WindowConfig, Windower};
use login_metrics::core::packet::{self, Identity, Packet};
use login_metrics::core::privacy::Pseudonymizer;
use login_metrics::sink::metrics_log::{rotated_path, MetricsLog};

use crate::common::cli::{bin, run};

/// `count` consecutive window packets of a generated login stream, as the
/// service publishes them: events through `Windower` (one partition, windows
/// of 10 s split into panes at 700 events, a few late events), each closed
/// window analysed and built into a packet.
fn packets(seed: u64, count: usize) -> Vec<Packet> {
    let mut cfg = GeneratorConfig::new(seed);
    cfg.users = 300;
    cfg.events_per_sec = 100.0;
    let mut generator = Generator::new(cfg);
    let mut windower = Windower::new(
        WindowConfig {
            size: Duration::from_secs(10),
            hop: Duration::from_secs(10),
            grace: Duration::from_millis(300),
            idle: Duration::from_secs(3600),
            max_wait: Duration::from_secs(3600),
            max_events: 700,
            max_buffered: usize::MAX,
            max_dead_letters: usize::MAX,
            late: LatePolicy::DeadLetter,
        },
        "user-login",
    );
    let now = Instant::now();
    windower.assign(0, None, None, now);
    let required = Requirements {
        fields: vec![Field::UserId],
        timestamp: true,
        not_after_ms: None,
    };
    let slices = vec![
        vec![Field::Ip],
        vec![Field::UserId, Field::Ip],
        vec![Field::AppVersion, Field::Locale],
    ];
    let privacy = Pseudonymizer::disabled();
    let identity = Identity::new("login-metrics", "user-login", &slices, 10, &privacy);
    let mut out = Vec::new();
    let mut offset = 0;
    while out.len() < count {
        let m = generator.next_message();
        let key = m.key.as_deref().map(str::as_bytes);
        match event::parse(&m.payload, &required) {
            Ok(e) => windower.push_event(0, offset, key, &m.payload, &e, now),
            Err(e) => windower.push_invalid(0, offset, key, &m.payload, e, now),
        }
        offset += 1;
        for batch in windower
            .take_work(now, false)
            .into_iter()
            .flat_map(|w| w.batches)
        {
            let reports = analysis::analyze(&batch.columns, &slices, 10).unwrap();
            let emitted =
                DateTime::from_timestamp_millis(batch.ts_max_ms.unwrap() + 1_000).unwrap();
            out.push(packet::build(
                &batch, &reports, &privacy, &identity, emitted,
            ));
        }
    }
    out.truncate(count);
    out
}

fn formatted(packets: &[Packet]) -> String {
    packets.iter().map(format_packet).collect()
}

/// Writes `packets` through the service's `MetricsLog` with a size limit of
/// about two packets a file, so they spread over several rotated files.
fn rotated_log(dir: &Path, packets: &[Packet]) -> PathBuf {
    let path = dir.join("metrics.log");
    let longest = packets
        .iter()
        .map(|p| p.to_json().len() as u64)
        .max()
        .unwrap();
    let mut log = MetricsLog::open(&path, 2 * longest + 2, 10).unwrap();
    for p in packets {
        log.append(&p.to_json()).unwrap();
    }
    assert!(
        rotated_path(&path, 3).exists() && fs::metadata(&path).unwrap().len() > 0,
        "three rotated files and a live one at least"
    );
    path
}

#[test]
fn rotated_files_are_printed_oldest_first_then_the_live_file() {
    let dir = tempfile::tempdir().unwrap();
    let ps = packets(1, 9);
    assert!(
        ps.iter().any(|p| p.window.pane == Some(1)) && ps.iter().any(|p| p.events.late > Some(0)),
        "the packets cover split windows and late events"
    );
    let path = rotated_log(dir.path(), &ps);
    let (out, text, err) = run(bin().arg("tail").arg(&path));
    assert!(out.status.success(), "{err}");
    assert_eq!(err, "");
    assert_eq!(text, formatted(&ps));
}

#[test]
fn json_passes_every_line_through_byte_for_byte() {
    let dir = tempfile::tempdir().unwrap();
    let ps = packets(2, 7);
    let path = rotated_log(dir.path(), &ps);
    // A packet as another writer might format it: spaces, another key order.
    let mut value = serde_json::to_value(&ps[0]).unwrap();
    let version = value
        .as_object_mut()
        .unwrap()
        .remove("schema_version")
        .unwrap();
    value["schema_version"] = version;
    let odd = serde_json::to_string(&value)
        .unwrap()
        .replace("\":", "\": ");
    assert_ne!(odd, ps[0].to_json());
    OpenOptions::new()
        .append(true)
        .open(&path)
        .unwrap()
        .write_all(format!("{odd}\n").as_bytes())
        .unwrap();

    let (out, text, err) = run(bin().args(["tail", "--json"]).arg(&path));
    assert!(out.status.success(), "{err}");
    assert_eq!(err, "");
    let mut expected: String = ps.iter().map(|p| p.to_json() + "\n").collect();
    expected.push_str(&odd);
    expected.push('\n');
    assert_eq!(text, expected);
}

#[test]
fn lines_that_are_not_packets_are_reported_with_file_and_line_and_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("metrics.log");
    let ps = packets(3, 5);
    let line = |p: &Packet| p.to_json() + "\n";
    let rotated = rotated_path(&path, 1);
    let mut gz = GzEncoder::new(File::create(&rotated).unwrap(), Compression::default());
    gz.write_all((line(&ps[0]) + "garbage\n" + &line(&ps[1])).as_bytes())
        .unwrap();
    gz.finish().unwrap();
    let whole = ps[4].to_json();
    let torn = &whole[..200];
    fs::write(
        &path,
        line(&ps[2]) + "{\"schema_version\":3,\"packet_id\":\"x\"}\n" + &line(&ps[3]) + torn,
    )
    .unwrap();

    let (out, text, err) = run(bin().arg("tail").arg(&path));
    assert!(out.status.success(), "{err}");
    assert_eq!(text, formatted(&ps[..4]));
    let rotated = rotated.display().to_string();
    let live = path.display().to_string();
    let reports: Vec<&str> = err.lines().collect();
    assert_eq!(reports.len(), 3, "{err}");
    assert!(
        reports[0].starts_with(&format!("{rotated}:2: skipped, not a packet: ")),
        "{err}"
    );
    assert!(
        reports[1].starts_with(&format!("{live}:2: skipped, not a packet: ")),
        "{err}"
    );
    assert!(
        reports[2].starts_with(&format!(
            "{live}:4: skipped (last line, no newline: a torn write?)"
        )),
        "{err}"
    );

    let (out, text, err) = run(bin().args(["tail", "--json"]).arg(&path));
    assert!(out.status.success(), "{err}");
    assert_eq!(text, ps[..4].iter().map(line).collect::<String>());
    assert_eq!(err.lines().count(), 3, "{err}");
}

#[test]
fn the_default_file_is_the_configured_metrics_log() {
    let dir = tempfile::tempdir().unwrap();
    let ps = packets(4, 2);
    let path = dir.path().join("m.log");
    let mut log = MetricsLog::open(&path, 1 << 20, 1).unwrap();
    for p in &ps {
        log.append(&p.to_json()).unwrap();
    }
    let config = dir.path().join("c.toml");
    fs::write(
        &config,
        format!("[metrics_log]\npath = {:?}\n", path.display().to_string()),
    )
    .unwrap();
    let (out, text, err) = run(bin().args(["tail", "-c"]).arg(&config));
    assert!(out.status.success(), "{err}");
    assert_eq!(text, formatted(&ps));

    let (out, _, err) = run(bin()
        .arg("tail")
        .env("LOGIN_METRICS__METRICS_LOG__PATH", ""));
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("metrics_log.path is empty"), "{err}");

    let (out, _, err) = run(bin().arg("tail").arg(dir.path().join("none.log")));
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("no metrics log at"), "{err}");
}

/// The characters of `text` a terminal would act on rather than show (the
/// line ends aside): C0 controls, DEL, C1 controls, and the bidi and
/// separator characters that reorder or break a line.
fn acted_on(text: &str) -> Vec<char> {
    let reorders_or_breaks = |c: char| {
        matches!(
            c,
            '\u{61c}' | '\u{200e}' | '\u{200f}' | '\u{2028}'..='\u{202e}' | '\u{2066}'..='\u{2069}'
        )
    };
    text.chars()
        .filter(|&c| c != '\n' && (c.is_control() || reorders_or_breaks(c)))
        .collect()
}

#[test]
fn values_from_producers_reach_the_terminal_escaped() {
    let dir = tempfile::tempdir().unwrap();
    // Diagnostics name the file: its name is shown escaped too.
    let path = dir.path().join("metrics\u{1b}[8m.log");
    // A packet whose values a producer wrote: an OSC that retitles the
    // terminal, a screen clear, the one-byte C1 CSI, a right-to-left override.
    let mut p = packets(6, 1).remove(0);
    let hostile = [
        ("ip", "\u{1b}]0;pwned\u{7}"),
        ("user_id", "\u{1b}[2J"),
        ("app_version", "\u{9b}31m\u{7f}"),
        ("locale", "\u{202e}SU"),
    ];
    for m in &mut p.metrics {
        if m.duplicates.is_empty() {
            let mut row = serde_json::Map::new();
            for f in &m.slice {
                row.insert(f.clone(), "x".into());
            }
            row.insert("count".into(), 2.into());
            m.duplicates.push(row);
            m.duplicate_groups += 1;
        }
        for (field, value) in hostile {
            if m.slice.iter().any(|f| f == field) {
                m.duplicates[0].insert(field.into(), value.into());
            }
        }
    }
    let json = p.to_json();
    assert!(json.contains('\u{9b}') && json.contains('\u{202e}') && json.contains("\\u001b"));
    // And a line that is not a packet, whose diagnostic quotes it.
    fs::write(
        &path,
        format!("{json}\n{{\"schema_version\":\"\\u001b]0;pwned\\u0007\"}}\n"),
    )
    .unwrap();

    let (out, text, err) = run(bin().arg("tail").arg(&path));
    assert!(out.status.success(), "{err}");
    assert_eq!(acted_on(&text), Vec::<char>::new(), "{text}");
    assert_eq!(acted_on(&err), Vec::<char>::new(), "{err}");
    for shown in [
        "\\u{1b}]0;pwned\\u{7}",
        "\\u{1b}[2J",
        "\\u{9b}31m\\u{7f}",
        "\\u{202e}SU",
    ] {
        assert!(text.contains(shown), "{shown} not in:\n{text}");
    }
    assert!(
        err.contains("metrics\\u{1b}[8m.log:2: skipped, not a packet: invalid type: string \"\\u{1b}]0;pwned\\u{7}\""),
        "{err}"
    );

    let (out, text, err) = run(bin().args(["tail", "--json"]).arg(&path));
    assert!(out.status.success(), "{err}");
    assert_eq!(acted_on(&text), Vec::<char>::new(), "{text}");
    assert_eq!(acted_on(&err), Vec::<char>::new(), "{err}");
    for shown in ["\\u001b]0;pwned\\u0007", "\\u009b31m\\u007f", "\\u202eSU"] {
        assert!(text.contains(shown), "{shown} not in:\n{text}");
    }
    // The same packet, escapes and all.
    assert_eq!(text.lines().count(), 1, "{text}");
    assert_eq!(serde_json::from_str::<Packet>(&text).unwrap(), p);
}

/// A `tail --follow` child, its output read line by line.
struct Follower {
    child: Child,
    out: BufReader<ChildStdout>,
    watchdog: mpsc::Sender<()>,
}

impl Follower {
    fn spawn(path: &Path) -> Follower {
        let mut child = bin()
            .args(["tail", "--follow"])
            .arg(path)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let out = BufReader::new(child.stdout.take().unwrap());
        let (watchdog, done) = mpsc::channel::<()>();
        let pid = child.id().to_string();
        std::thread::spawn(move || {
            if done.recv_timeout(Duration::from_secs(120)).is_err() {
                eprintln!("watchdog: tail --follow did not print what was expected; killing it");
                let _ = Command::new("kill").args(["-KILL", &pid]).status();
            }
        });
        Follower {
            child,
            out,
            watchdog,
        }
    }

    /// Reads as many lines as `expected` has and compares.
    fn expect(&mut self, expected: &str, what: &str) {
        let mut got = String::new();
        for _ in 0..expected.lines().count() {
            let n = self.out.read_line(&mut got).unwrap();
            assert!(
                n > 0,
                "tail --follow ended before printing {what}; printed:\n{got}"
            );
        }
        assert_eq!(got, expected, "{what}");
    }

    fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([signal, &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }
}

impl Drop for Follower {
    fn drop(&mut self) {
        let _ = self.watchdog.send(());
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn follow_prints_appended_packets_through_both_kinds_of_rotation() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("metrics.log");
    let ps = packets(5, 7);
    let json: Vec<String> = ps.iter().map(Packet::to_json).collect();
    // Four packets fit; the fifth rotates the file.
    let max_bytes = json[..4].iter().map(|j| j.len() as u64 + 1).sum();
    let mut log = MetricsLog::open(&path, max_bytes, 3).unwrap();
    log.append(&json[0]).unwrap();
    log.append(&json[1]).unwrap();

    let mut tail = Follower::spawn(&path);
    tail.expect(&formatted(&ps[..2]), "the packets already there");

    log.append(&json[2]).unwrap();
    tail.expect(&formatted(&ps[2..3]), "an appended packet");

    // metrics_log's own rotation (rename to .0, compress to .1.gz on a
    // thread of its own), with a packet appended just before it that tail has
    // not read yet: stopped, it cannot.
    tail.signal("-STOP");
    log.append(&json[3]).unwrap();
    log.append(&json[4]).unwrap();
    log.settle().unwrap();
    assert!(rotated_path(&path, 1).exists());
    assert_eq!(fs::read_to_string(&path).unwrap(), format!("{}\n", json[4]));
    tail.signal("-CONT");
    tail.expect(
        &formatted(&ps[3..5]),
        "the packet appended before the rotation, then the one after",
    );

    // Rotation by rename: a packet still lands in the old file, then a new file appears.
    drop(log);
    let old = dir.path().join("metrics.log.old");
    fs::rename(&path, &old).unwrap();
    let mut f = OpenOptions::new().append(true).open(&old).unwrap();
    f.write_all(format!("{}\n", json[5]).as_bytes()).unwrap();
    fs::write(&path, format!("{}\n", json[6])).unwrap();
    tail.expect(
        &formatted(&ps[5..7]),
        "the rest of the renamed file, then the new file",
    );
}

/// Added fields are a compatible change (docs/packet.md): a packet carrying
/// fields this reader does not know is printed; one of a newer schema
/// version is reported and skipped.
#[test]
fn added_fields_are_read_past_and_a_newer_schema_version_is_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("metrics.log");
    let ps = packets(2, 3);
    let mut added = serde_json::to_value(&ps[0]).unwrap();
    added["added_later"] = serde_json::json!({"x": 1});
    added["window"]["added_later"] = serde_json::json!(true);
    let mut newer = serde_json::to_value(&ps[1]).unwrap();
    newer["schema_version"] = serde_json::json!(login_metrics::core::packet::SCHEMA_VERSION + 1);
    fs::write(&path, format!("{added}\n{newer}\n")).unwrap();

    let (out, text, err) = run(bin().arg("tail").arg(&path));
    assert!(out.status.success(), "{err}");
    assert_eq!(text, formatted(&ps[..1]));
    assert!(
        err.contains(":2: skipped, a packet of schema version"),
        "{err}"
    );
    let (out, text, err) = run(bin().args(["tail", "--json"]).arg(&path));
    assert!(out.status.success(), "{err}");
    assert_eq!(text, format!("{added}\n"));
}
